"""Health checks as an operator sees them: dead targets skipped, revived targets used again."""

from __future__ import annotations

import time

from tests.support import Upstream, connect, free_port, recv_all, recv_line, tag_handler, wait_until


def checked_upstream(port: int, targets: list[str], active: str = "", passive: str = "",
                     workers: int = 1, interval: str = "100ms", successes: int = 2) -> str:
    target_lines = "\n".join(f"      - {{target: {t}}}" for t in targets)
    return f"""
worker_processes: {workers}
stream_listen: [127.0.0.1:{port}]
upstreams:
  - name: pool
    healthchecks:
      active: {{type: tcp, interval: {interval}, timeout: 500ms, healthy: {{successes: {successes}}},
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


def answers_once_revived(p, port: int, dead_port: int, workers: int = 1) -> set[bytes]:
    """Start an upstream on the dead target's port, wait until the probes of every worker brought it
    back, and return the first lines of a few sessions."""
    revived = Upstream(tag_handler, port=dead_port, name="revived")
    try:
        p.wait_log(f"target 127.0.0.1:{dead_port} is up again", timeout=5, count=workers)
        answers = set()
        for _ in range(4 * workers + 2):
            with connect(port) as sock:
                answers.add(recv_line(sock))
        return answers
    finally:
        revived.stop()


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

    assert answers_once_revived(p, port, dead_port) == {b"live\n", b"revived\n"}


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


def test_a_target_found_down_stays_down_across_a_reload_and_comes_back_when_it_recovers(proxy, upstreams):
    """The new generation starts from the health the old one found: no session of its first moments
    goes to the dead target (listed first, so round robin would try it first), and its own probes
    bring the target back once it answers."""
    live = upstreams(tag_handler, name="live")
    dead_port = free_port()
    port = free_port()
    # Probes every 2s: a new worker's first probe comes at a random time within that.
    conf = checked_upstream(port, [f"127.0.0.1:{dead_port}", live.target], workers=2, interval="2s",
                            successes=1)
    p = proxy(conf)
    p.wait_log(f"target 127.0.0.1:{dead_port} is down (active health check", timeout=5)
    p.reload(conf)
    for _ in range(6):
        with connect(port) as sock:
            assert recv_line(sock) == b"live\n"
    assert "while connecting to upstream" not in p.log_text()      # no session tried the dead one
    assert (f"target 127.0.0.1:{dead_port} is still down until an active health check succeeds "
            f"(as the previous generation left it)") in p.log_text()

    assert answers_once_revived(p, port, dead_port, workers=2) == {b"live\n", b"revived\n"}


def test_a_target_passive_checks_took_out_stays_out_across_a_reload(proxy, upstreams):
    """Without active checks: a failed session takes the target out for fail_timeout, and the reload
    does not bring it back before that."""
    live = upstreams(tag_handler, name="live")
    dead_port = free_port()
    port = free_port()
    conf = checked_upstream(port, [f"127.0.0.1:{dead_port}", live.target], interval="0",
                            passive="passive: {unhealthy: {tcp_failures: 1}, fail_timeout: 60s}")
    p = proxy(conf)
    with connect(port) as sock:               # tries the dead target first, then the live one
        assert recv_line(sock) == b"live\n"
    assert p.log_text().count("while connecting to upstream") == 1
    p.reload(conf)
    for _ in range(4):
        with connect(port) as sock:
            assert recv_line(sock) == b"live\n"
    log = p.log_text()
    assert log.count("while connecting to upstream") == 1
    assert f"target 127.0.0.1:{dead_port} is still down for " in log
