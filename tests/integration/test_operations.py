"""More of what an operator relies on: log rotation, daemon mode, algorithms, timeouts, IPv6."""

from __future__ import annotations

import collections
import os
import signal
import socket
import subprocess
import threading
import time

import psutil
import pytest

from tests.integration.test_core import one_service
from tests.support import (
    Proxy,
    connect,
    echo_handler,
    free_port,
    recv_all,
    recv_line,
    tag_handler,
    wait_until,
)


def test_usr1_reopens_logs_after_logrotate_moved_them(proxy, upstreams):
    up = upstreams(echo_handler)
    port = free_port()
    p = proxy(one_service(port, [up.target], workers=2))
    with connect(port) as sock:
        sock.sendall(b"a")
        assert sock.recv(1) == b"a"
    p.wait_access(1)
    rotated = p.dir / "access.log.1"
    os.rename(p.access_log, rotated)
    os.rename(p.error_log, p.dir / "error.log.1")
    p.send_signal(signal.SIGUSR1)
    wait_until(lambda: p.error_log.exists() and "reopening logs" in p.error_log.read_text(),
               what="a new error log")
    time.sleep(0.3)                                   # the workers reopen on their next tick
    for _ in range(4):                                # sessions land on either worker
        with connect(port) as sock:
            sock.sendall(b"b")
            assert sock.recv(1) == b"b"
    lines = p.wait_access(4)
    assert len(lines) == 4
    assert len(rotated.read_text().splitlines()) == 1      # nothing more went to the moved file


def test_daemon_mode_detaches_and_stops_with_s_stop(tmp_path, upstreams):
    up = upstreams(tag_handler, name="daemon")
    port = free_port()
    p = Proxy(tmp_path, one_service(port, [up.target]))
    result = subprocess.run(p.command("-d"), capture_output=True, text=True, timeout=20)
    assert result.returncode == 0, result.stderr
    pid = int(wait_until(lambda: p.pid_file.exists() and p.pid_file.read_text().strip(), what="the pid file"))
    try:
        wait_until(lambda: "ready:" in p.log_text(), what="the daemon to be ready")
        assert psutil.Process(pid).ppid() == 1 or psutil.Process(pid).ppid() != os.getpid()
        with connect(port) as sock:
            assert recv_line(sock) == b"daemon\n"
        assert p.run_cli("-s", "stop").returncode == 0
        wait_until(lambda: not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE,
                   what="the daemon to exit")
        assert not p.pid_file.exists()
    finally:
        if psutil.pid_exists(pid):
            os.kill(pid, signal.SIGKILL)


def test_least_connections_sends_new_sessions_to_the_idle_target(proxy, upstreams):
    a = upstreams(tag_handler, name="a")
    b = upstreams(tag_handler, name="b")
    port = free_port()
    p = proxy(one_service(port, [a.target, b.target], algorithm="least-connections"))
    held = connect(port)
    first = recv_line(held)
    others = []
    for i in range(5):                               # while `first` holds its target, the other wins
        with connect(port) as sock:
            others.append(recv_line(sock))
        p.wait_access(i + 1)                         # that session is over before the next starts
    assert set(others) == {b"b\n" if first == b"a\n" else b"a\n"}
    held.close()


def test_consistent_hashing_pins_a_client_address_to_one_target(proxy, upstreams):
    targets = [upstreams(tag_handler, name=f"t{i}") for i in range(3)]
    port = free_port()
    proxy(one_service(port, [t.target for t in targets], workers=2, algorithm="consistent-hashing"))
    by_source = collections.defaultdict(set)
    for i in range(2, 12):
        source = f"127.0.0.{i}"
        for _ in range(3):
            with connect(port, source=source) as sock:
                by_source[source].add(recv_line(sock))
    assert all(len(seen) == 1 for seen in by_source.values())          # same answer every time, any worker
    assert len(set().union(*by_source.values())) > 1                   # and clients do spread


def test_ipv6_listener_and_upstream(proxy, upstreams):
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    try:
        up = upstreams(tag_handler, name="six", host="::1")
    except OSError:
        pytest.skip("::1 is not configured on this machine")
    port = free_port("::1")
    proxy(f"""
stream_listen: ["[::1]:{port}"]
services:
  - name: v6
    host: "::1"
    port: {up.port}
    routes:
      - name: r
        protocols: [tcp]
        sources: [{{ip: "::1/128"}}]
""")
    with connect(port, host="::1") as sock:
        assert recv_line(sock) == b"six\n"


def test_connect_timeout_moves_on_to_the_next_target(proxy, upstreams):
    # A listener whose accept queue is full drops SYNs: a connect to it hangs until our timeout.
    black_hole = socket.socket()
    black_hole.bind(("127.0.0.1", free_port()))
    black_hole.listen(0)
    fillers = []
    for _ in range(3):
        s = socket.socket()
        s.setblocking(False)
        s.connect_ex(black_hole.getsockname())
        fillers.append(s)
    time.sleep(0.2)
    live = upstreams(tag_handler, name="live")
    port = free_port()
    try:
        p = proxy(one_service(port, [f"127.0.0.1:{black_hole.getsockname()[1]}", live.target])
                  .replace("connect_timeout: 2s", "connect_timeout: 300ms"))
        with connect(port) as sock:
            assert recv_line(sock) == b"live\n"
        assert "timed out after 0.3s (connect_timeout)" in p.wait_log("connect_timeout")
    finally:
        for s in fillers:
            s.close()
        black_hole.close()


def test_write_timeout_ends_a_session_whose_client_stopped_reading(proxy, upstreams):
    blob = b"z" * (64 << 20)

    def flood(conn, up):
        try:
            conn.sendall(blob)
        except OSError:
            pass

    up = upstreams(flood)
    port = free_port()
    p = proxy(one_service(port, [up.target], service_extra="    write_timeout: 500ms"))
    sock = connect(port)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    time.sleep(2.0)                                   # never read: pyproxy's writes stall
    line = p.wait_access(1)[0]
    assert " 200 " in line
    assert "write_timeout" in p.log_text()
    sock.close()


def test_client_reset_becomes_upstream_reset(proxy, upstreams):
    seen = []

    def watcher(conn, up):
        conn.sendall(b"hi\n")
        try:
            while conn.recv(100):
                pass
            seen.append("eof")
        except ConnectionResetError:
            seen.append("reset")

    up = upstreams(watcher)
    port = free_port()
    proxy(one_service(port, [up.target]))
    sock = connect(port)
    assert recv_line(sock) == b"hi\n"
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    sock.close()
    wait_until(lambda: seen, what="the upstream to notice")
    assert seen == ["reset"]


def test_dump_prints_the_effective_configuration(tmp_path):
    port = free_port()
    p = Proxy(tmp_path, one_service(port, ["127.0.0.1:1"]))
    result = p.run_cli("-T")
    assert result.returncode == 0, result.stderr
    assert "worker_connections: 16384" in result.stdout          # a default, filled in
    assert f"port: {port}" in result.stdout


def test_worker_processes_auto_is_the_cpu_count(proxy, upstreams):
    up = upstreams(echo_handler)
    port = free_port()
    p = proxy(one_service(port, [up.target]).replace("worker_processes: 1", "worker_processes: auto"))
    from pyproxy.config.validate import usable_cpus
    assert len(p.worker_pids()) == usable_cpus()


def test_sessions_survive_100_short_sessions_in_parallel_with_a_reload(proxy, upstreams):
    """A reload in the middle of a stream of sessions refuses none of them."""
    up = upstreams(echo_handler)
    port = free_port()
    p = proxy(one_service(port, [up.target], workers=2))
    failures = []
    stop = threading.Event()

    def client():
        while not stop.is_set():
            try:
                with connect(port) as sock:
                    sock.sendall(b"ping")
                    sock.shutdown(socket.SHUT_WR)
                    if recv_all(sock) != b"ping":
                        failures.append("short reply")
            except OSError as exc:
                failures.append(repr(exc))

    threads = [threading.Thread(target=client) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        for _ in range(5):
            p.reload()
            time.sleep(0.2)
    finally:
        stop.set()
        for t in threads:
            t.join(10)
    assert failures == []
    assert len(p.access_lines()) > 20
