"""Limits and hostile peers: a squeeze on file descriptors, slow readers, connect storms, privileges."""

from __future__ import annotations

import os
import pwd
import resource
import signal
import socket
import subprocess
import threading
import time

import psutil
import pytest

from tests.integration.test_core import one_service
from tests.support import Proxy, connect, echo_handler, free_port, recv_all, source_handler_for, wait_until


def worker(p: Proxy) -> psutil.Process:
    (pid,) = p.worker_pids()
    return psutil.Process(pid)


def echo_once(port: int, payload: bytes = b"ping") -> bytes:
    with connect(port) as sock:
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        return recv_all(sock)


def test_out_of_file_descriptors_pauses_accepting_then_resumes(tmp_path, upstreams):
    up = upstreams(echo_handler)
    port = free_port()
    probe = Proxy(tmp_path, one_service(port, [up.target]))
    probe.start()
    assert echo_once(port) == b"ping"
    probe.wait_access(1)                              # that session is closed: its fds are not counted
    idle_fds = worker(probe).num_fds()
    probe.stop()
    probe.error_log.unlink()

    # Room for exactly two proxied sessions (two fds each) in the worker.
    limit = idle_fds + 4
    p = Proxy(tmp_path, one_service(port, [up.target]))
    p.proc = subprocess.Popen(p.command(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit)))
    p.stdout = p.stderr = open(os.devnull, "wb")       # noqa: SIM115 (closed by p.stop())
    try:
        p.wait_log("ready:")
        held = [connect(port), connect(port)]
        for sock in held:
            sock.sendall(b"a")
            assert sock.recv(1) == b"a"
        waiting = connect(port)                       # lands in the accept queue: EMFILE on accept
        waiting.sendall(b"patient")
        p.wait_log("Too many open files); pausing accepts")
        assert p.proc.poll() is None
        for sock in held:
            sock.close()
        waiting.shutdown(socket.SHUT_WR)
        assert recv_all(waiting) == b"patient"       # served once fds were free again, not reset
        waiting.close()
        assert echo_once(port) == b"ping"
    finally:
        p.stop()


def test_slow_reader_cannot_make_pyproxy_buffer_without_bound(proxy, upstreams):
    up = upstreams(source_handler_for(256 << 20))     # 256 MiB for a client that never reads
    port = free_port()
    p = proxy(one_service(port, [up.target]))
    w = worker(p)
    before = w.memory_info().rss
    sock = connect(port)
    time.sleep(1.5)                                   # everything that can fill up has filled up
    grown = w.memory_info().rss - before
    assert grown < 8 << 20, f"worker RSS grew by {grown} bytes for one stuck session"
    sock.close()


def test_connect_storm_to_a_dead_upstream_leaks_nothing(proxy):
    port = free_port()
    p = proxy(one_service(port, [f"127.0.0.1:{free_port()}"], workers=1))
    w = worker(p)
    fds_before = w.num_fds()
    results = []

    def client():
        for _ in range(50):
            try:
                with connect(port) as sock:
                    results.append(recv_all(sock))
            except OSError as exc:
                results.append(repr(exc))

    threads = [threading.Thread(target=client) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert results == [b""] * 400                     # each one closed cleanly (502), none refused
    wait_until(lambda: len(p.access_lines()) == 400, what="400 access lines")
    assert all(" 502 " in line for line in p.access_lines())
    assert w.num_fds() == fds_before
    assert p.log_text().count("all targets are unhealthy, trying them anyway") == 1


def test_fds_and_memory_return_to_baseline_after_many_sessions(proxy, upstreams):
    up = upstreams(echo_handler)
    port = free_port()
    p = proxy(one_service(port, [up.target]))
    assert echo_once(port) == b"ping"
    p.wait_access(1)                      # that session is closed: its fds are not in the baseline
    w = worker(p)
    fds, rss = w.num_fds(), w.memory_info().rss
    held = [connect(port) for _ in range(300)]
    for sock in held:
        sock.sendall(b"x")
    for sock in held:
        assert sock.recv(1) == b"x"
    assert w.num_fds() >= fds + 600                   # two fds per open session, no more
    for sock in held:
        sock.close()
    wait_until(lambda: w.num_fds() == fds, what="fds back to baseline")
    assert w.memory_info().rss - rss < 4 << 20


@pytest.mark.skipif(os.geteuid() != 0, reason="privilege drop needs root")
def test_workers_drop_to_user_after_the_master_binds(proxy, upstreams):
    nobody = pwd.getpwnam("nobody")
    up = upstreams(echo_handler)
    port = free_port()
    p = proxy(one_service(port, [up.target], extra="user: nobody"))
    assert psutil.Process(p.pid).uids().real == 0
    assert {psutil.Process(pid).uids().effective for pid in p.worker_pids()} == {nobody.pw_uid}
    assert echo_once(port) == b"ping"


def test_upstream_that_accepts_and_never_answers_ends_at_read_timeout(proxy, upstreams):
    import threading as _threading

    release = _threading.Event()

    def mute(conn, up):
        release.wait(20)                        # accepts, reads nothing, says nothing

    up = upstreams(mute)
    port = free_port()
    p = proxy(one_service(port, [up.target], service_extra="    read_timeout: 700ms"))
    try:
        with connect(port) as sock:
            started = time.monotonic()
            assert recv_all(sock) == b""
            assert 0.5 < time.monotonic() - started < 5
        assert " 200 " in p.wait_access(1)[0]
        assert "read_timeout" in p.log_text()
    finally:
        release.set()


def test_worker_killed_mid_transfer_costs_only_its_own_sessions(proxy, upstreams):
    """Two workers, a long transfer on each; SIGKILL one worker: the other's transfer completes
    intact and new sessions are served by the replacement."""
    from tests.support import expected_hash_reply, hash_handler, pattern_bytes

    up = upstreams(hash_handler)
    port = free_port()
    p = proxy(one_service(port, [up.target], workers=2))
    def client_ports(pid):
        """Client ports of the sessions a worker accepted (its sockets on the listening port)."""
        return {c.raddr[1] for c in psutil.Process(pid).net_connections()
                if c.laddr and c.laddr[1] == port and c.raddr}

    socks = []
    owned = {}
    for _ in range(40):                       # SO_REUSEPORT hashes clients over both workers
        sock = connect(port, timeout=30)
        sock.sendall(b"x")
        socks.append(sock)
        time.sleep(0.05)
        owned = {pid: [s for s in socks if s.getsockname()[1] in client_ports(pid)]
                 for pid in p.worker_pids()}
        if all(owned.values()):
            break
    victim, survivor = owned
    assert owned[victim] and owned[survivor], "both workers must hold a session"
    os.kill(victim, signal.SIGKILL)
    payload = pattern_bytes(4 << 20, seed=11)
    for sock in owned[survivor]:
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        assert recv_all(sock) == expected_hash_reply(b"x" + payload)   # untouched by the other's death
    for sock in owned[victim]:
        try:
            sock.sendall(payload)
            sock.shutdown(socket.SHUT_WR)
            assert recv_all(sock) != expected_hash_reply(b"x" + payload)
        except OSError:
            pass                                                        # reset: it died with its worker
    wait_until(lambda: len(p.worker_pids()) == 2 and victim not in p.worker_pids(), what="a replacement")
    fresh = pattern_bytes(100_000, seed=12)
    with connect(port) as sock:
        sock.sendall(fresh)
        sock.shutdown(socket.SHUT_WR)
        assert recv_all(sock) == expected_hash_reply(fresh)
    for sock in socks:
        sock.close()
