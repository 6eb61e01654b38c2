"""Health checks as an operator sees them: dead targets skipped, revived targets used again."""

from __future__ import annotations

import time

from tests.support import Upstream, connect, free_port, recv_all, recv_line, tag_handler, wait_until


def checked_upstream(port: int, targets: list[str], active: str = "", passive: str = "",
                     workers: int = 1) -> str:
    target_lines = "\n".join(f"      - {{target: {t}}}" for t in targets)
    return f"""
worker_processes: {workers}
stream_listen: [127.0.0.1:{port}]
upstreams:
  - name: pool
    healthchecks:
      active: {{type: tcp, interval: 100ms, timeout: 500ms, healthy: {{successes: 2}},
               unhealthy: {{tcp_failures: 1, timeouts: 1}} {active}}}
      {passive}
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


def test_active_check_takes_a_dead_target_out_and_brings_it_back(proxy, upstreams):
    live = upstreams(tag_handler, name="live")
    dead_port = free_port()
    port = free_port()
    p = proxy(checked_upstream(port, [live.target, f"127.0.0.1:{dead_port}"]))
    p.wait_log(f"target 127.0.0.1:{dead_port} is down (active health check: connect failed (111")
    for _ in range(10):
        with connect(port) as sock:
            assert recv_line(sock) == b"live\n"
    assert "while connecting to upstream" not in p.log_text()      # no session ever tried the dead one

    revived = Upstream(tag_handler, port=dead_port, name="revived")
    try:
        p.wait_log(f"target 127.0.0.1:{dead_port} is up again")
        answers = set()
        for _ in range(6):
            with connect(port) as sock:
                answers.add(recv_line(sock))
        assert answers == {b"live\n", b"revived\n"}
    finally:
        revived.stop()


def test_send_expect_check_catches_a_target_that_answers_wrongly(proxy, upstreams):
    def good(conn, up):
        if conn.recv(4) == b"PING":
            conn.sendall(b"PONG")
            return
        tag_handler(conn, up)

    def wrong(conn, up):
        if conn.recv(4) == b"PING":
            conn.sendall(b"NOPE")
            return
        tag_handler(conn, up)

    ok = upstreams(good, name="good")
    bad = upstreams(wrong, name="bad")
    port = free_port()
    p = proxy(checked_upstream(port, [ok.target, bad.target], active=', send: "PING", expect: "PONG"'))
    p.wait_log(f"target {bad.target} is down (active health check: unexpected reply b'NOPE')")
    for _ in range(6):
        with connect(port) as sock:
            sock.sendall(b"hey!")                  # this protocol's clients speak first
            assert recv_line(sock) == b"good\n"
    assert f"target {ok.target} is down" not in p.log_text()


def test_passive_failure_waits_for_an_active_check_to_come_back(proxy, upstreams):
    """With active checks on, a target taken out by a failed session returns only once probes pass."""
    flaky = upstreams(tag_handler, name="flaky")
    port = free_port()
    p = proxy(checked_upstream(port, [flaky.target]))
    with connect(port) as sock:
        assert recv_line(sock) == b"flaky\n"
    flaky_port = flaky.port
    flaky.stop()
    p.wait_log(f"target 127.0.0.1:{flaky_port} is down")
    back = Upstream(tag_handler, port=flaky_port, name="back")
    try:
        p.wait_log(f"target 127.0.0.1:{flaky_port} is up again")
        with connect(port) as sock:
            assert recv_line(sock) == b"back\n"
    finally:
        back.stop()


def test_all_targets_down_is_tried_anyway_and_logged_once(proxy):
    dead = [free_port(), free_port()]
    port = free_port()
    p = proxy(checked_upstream(port, [f"127.0.0.1:{d}" for d in dead]))
    for d in dead:
        p.wait_log(f"target 127.0.0.1:{d} is down")
    for _ in range(5):
        with connect(port) as sock:
            assert recv_all(sock) == b""
    lines = p.wait_access(5)
    assert all(" 502 " in line for line in lines)
    log = p.log_text()
    assert log.count("all targets are unhealthy, trying them anyway") == 1     # once, not per session
    assert log.count("while connecting to upstream") >= 5                      # they were tried anyway


def test_draining_worker_stops_probing(proxy, upstreams):
    """After a reload only the new generation probes: the old worker's checks stop with it."""
    up = upstreams(tag_handler)
    probes_port = free_port()
    probes = []

    def count(conn, u):
        probes.append(time.monotonic())

    counter = Upstream(count, port=probes_port)
    port = free_port()
    try:
        p = proxy(checked_upstream(port, [up.target, counter.target]))
        wait_until(lambda: len(probes) >= 3, what="probes")
        held = connect(port)                 # keeps the old worker alive (draining) after the reload
        p.reload()
        time.sleep(1.0)
        window = [t for t in probes if t > time.monotonic() - 0.5]
        # 100 ms interval: one worker probes ~5 times per 0.5 s; two probing workers would be ~10.
        assert len(window) <= 7, len(window)
        held.close()
    finally:
        counter.stop()
