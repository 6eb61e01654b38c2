"""Target options as an operator sees them: a backup target, a connection cap shared by the workers."""

from __future__ import annotations

import select
import socket
import time

from tests.support import connect, free_port, recv_line, tag_handler, wait_until


def config_for(port: int, targets: list[str], workers: int = 2, head: str = "") -> str:
    """One service on `port` over an upstream of `targets` (each a YAML flow mapping); `head` adds
    top-level keys."""
    target_lines = "\n".join(f"      - {t}" for t in targets)
    return f"""
worker_processes: {workers}
{head}
stream_listen: [127.0.0.1:{port}]
upstreams:
  - name: pool
    healthchecks:
      passive: {{unhealthy: {{tcp_failures: 1}}, fail_timeout: 1s}}
    targets:
{target_lines}
services:
  - name: svc
    host: pool
    connect_timeout: 1s
    routes:
      - name: r
        protocols: [tcp]
        destinations: [{{port: {port}}}]
"""


def first_line(port: int) -> bytes:
    """The first line a new session hears (tag_handler's upstream name)."""
    with connect(port) as sock:
        return recv_line(sock)


def test_the_backup_target_takes_sessions_only_while_the_others_are_down(proxy, upstreams):
    port, main_port, spare_port = free_port(), free_port(), free_port()
    main = upstreams(tag_handler, port=main_port, name="main")
    upstreams(tag_handler, port=spare_port, name="spare")
    p = proxy(config_for(port, [f"{{target: 127.0.0.1:{main_port}}}",
                                f"{{target: 127.0.0.1:{spare_port}, backup: true}}"]))
    assert {first_line(port) for _ in range(8)} == {b"main\n"}
    main.stop()
    # The first session finds main refused and goes on to the backup; the next ones go there at once.
    assert {first_line(port) for _ in range(8)} == {b"spare\n"}
    upstreams(tag_handler, port=main_port, name="main again")
    wait_until(lambda: first_line(port) == b"main again\n", timeout=10, what="main to be used again")
    assert "target 127.0.0.1:" in p.log_text()


def test_max_conns_caps_a_target_over_all_workers(proxy, upstreams):
    port, capped_port, spare_port = free_port(), free_port(), free_port()
    upstreams(tag_handler, port=capped_port, name="capped")
    upstreams(tag_handler, port=spare_port, name="spare")
    proxy(config_for(port, [f"{{target: 127.0.0.1:{capped_port}, max_conns: 3}}",
                            f"{{target: 127.0.0.1:{spare_port}, backup: true}}"], workers=2))
    held: list[socket.socket] = []
    try:
        for _ in range(3):
            sock = connect(port)
            assert recv_line(sock) == b"capped\n"
            held.append(sock)
        # SO_REUSEPORT spread those three over both workers; every worker sees the cap reached.
        assert {first_line(port) for _ in range(10)} == {b"spare\n"}
        held.pop().close()
        wait_until(lambda: first_line(port) == b"capped\n", timeout=5,
                   what="a free slot on the capped target")
    finally:
        for sock in held:
            sock.close()


def test_a_session_beyond_every_cap_is_refused(proxy, upstreams):
    port, capped_port = free_port(), free_port()
    upstreams(tag_handler, port=capped_port, name="capped")
    p = proxy(config_for(port, [f"{{target: 127.0.0.1:{capped_port}, max_conns: 1}}"], workers=1))
    with connect(port) as held:
        assert recv_line(held) == b"capped\n"
        with connect(port) as refused:
            assert refused.recv(100) == b""
        p.wait_log('no upstream could be reached for service "svc" (tried: none)')


def test_a_queue_holds_sessions_until_a_slot_frees_or_its_timeout(proxy, upstreams):
    port, capped_port = free_port(), free_port()
    upstreams(tag_handler, port=capped_port, name="capped")
    config = config_for(port, [f"{{target: 127.0.0.1:{capped_port}, max_conns: 1}}"], workers=2)
    p = proxy(config.replace("    targets:", "    queue: {size: 2, timeout: 1s}\n    targets:"))
    held = connect(port)
    assert recv_line(held) == b"capped\n"
    waiting = [connect(port), connect(port)]
    time.sleep(0.3)                          # both accepted and waiting
    with connect(port) as third:             # two are waiting already: refused at once
        assert third.recv(100) == b""
    p.wait_log("the queue is full (2 sessions waiting)")
    held.close()
    # The slot goes to one waiting session (whichever polls first), then the other once it leaves.
    readable, _, _ = select.select(waiting, [], [], 5)
    assert len(readable) == 1
    first = readable[0]
    waiting.remove(first)
    assert recv_line(first) == b"capped\n"
    first.close()
    second = waiting.pop()
    assert recv_line(second) == b"capped\n"
    with connect(port) as late:              # waits for 1s behind `second`, then is refused
        started = time.monotonic()
        assert late.recv(100) == b""
        assert 0.9 <= time.monotonic() - started < 3
    second.close()
    p.wait_log("waited 1s in the queue (queue.timeout)")
