"""Operating pyproxy: -t, signals, reloads, a worker crash, the pid file, the demo launcher."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time

import psutil

from tests.integration.test_core import one_service
from tests.support import (Proxy, connect, echo_handler, expected_hash_reply, free_port, hash_handler,
                           pattern_bytes, peer_common_name, recv_all, recv_line, tag_handler, tls_client,
                           upload_and_hash, wait_until)


def routed_to(port: int, target_port: int, name: str = "svc") -> str:
    return f"""
worker_processes: 2
stream_listen: [127.0.0.1:{port}]
services:
  - name: {name}
    host: 127.0.0.1
    port: {target_port}
    routes:
      - name: r
        protocols: [tcp]
        destinations: [{{port: {port}}}]
"""


def test_t_accepts_a_good_file_and_binds_nothing(tmp_path, upstreams):
    up = upstreams(echo_handler)
    port = free_port()
    p = Proxy(tmp_path, one_service(port, [up.target]))
    result = p.run_cli("-t")
    assert result.returncode == 0, result.stderr
    assert f"configuration file {p.conf} test is successful" in result.stderr
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", port))       # -t never binds: the port is still free


def test_t_reports_file_line_and_key(tmp_path):
    p = Proxy(tmp_path, """
stream_listen: [127.0.0.1:20001]
services:
  - name: svc
    host: 127.0.0.1
    port: 1
    routes:
      - name: r
        protocols: [tcp]
        destinatoins: [{port: 20001}]
""")
    result = p.run_cli("-t")
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    lines = p.conf.read_text().splitlines()
    line_no = next(i for i, text in enumerate(lines, 1) if "destinatoins" in text)
    assert re.search(rf"{re.escape(str(p.conf))}:{line_no}: services\[0\]\.routes\[0\]\.destinatoins: .*"
                     r"did you mean 'destinations'", result.stderr), result.stderr
    assert "test failed" in result.stderr


def test_master_and_workers_are_named_and_pid_file_written(proxy, upstreams):
    up = upstreams(echo_handler)
    port = free_port()
    p = proxy(one_service(port, [up.target], workers=2))
    assert int(p.pid_file.read_text()) == p.pid
    master = psutil.Process(p.pid)
    assert master.cmdline()[0].startswith("pyproxy: master process -c ")
    titles = sorted(child.cmdline()[0] for child in master.children())
    assert titles == ["pyproxy: worker process #0", "pyproxy: worker process #1"]
    assert p.stop(signal.SIGTERM) == 0
    assert not p.pid_file.exists()


def _sched_policies(pids: list[int]) -> list[int | None]:
    """Each process's scheduling policy; None for one that exited meanwhile (an old worker)."""
    policies: list[int | None] = []
    for pid in pids:
        try:
            policies.append(os.sched_getscheduler(pid))
        except ProcessLookupError:
            policies.append(None)
    return policies


def test_worker_sched_policy_batch_applies_to_workers_only_and_follows_a_reload(proxy, upstreams):
    """`worker_sched_policy: batch` makes each worker SCHED_BATCH (the master keeps its own policy);
    a reload back to `normal` starts workers with the master's; bytes pass intact under both."""
    up = upstreams(hash_handler)
    port = free_port()
    p = proxy(one_service(port, [up.target], workers=2, extra="worker_sched_policy: batch"))
    assert {os.sched_getscheduler(pid) for pid in p.worker_pids()} == {os.SCHED_BATCH}
    assert os.sched_getscheduler(p.pid) == os.SCHED_OTHER
    payload = pattern_bytes(8 << 20, seed=11)
    assert upload_and_hash(port, payload) == expected_hash_reply(payload)
    p.reload(one_service(port, [up.target], workers=2))
    wait_until(lambda: _sched_policies(p.worker_pids()) == [os.SCHED_OTHER] * 2,
               what="the new generation of workers under SCHED_OTHER")
    assert upload_and_hash(port, payload) == expected_hash_reply(payload)


def test_hup_reroutes_new_sessions_while_open_session_keeps_working(proxy, upstreams):
    old = upstreams(tag_handler, name="old")
    new = upstreams(tag_handler, name="new")
    port = free_port()
    p = proxy(routed_to(port, old.port))
    held = connect(port)
    assert recv_line(held) == b"old\n"
    p.reload(routed_to(port, new.port))
    with connect(port) as sock:
        assert recv_line(sock) == b"new\n"
    held.sendall(b"still here\n")
    assert recv_line(held) == b"still here\n"      # the old worker keeps serving it while draining
    held.close()


def test_broken_file_on_hup_changes_nothing(proxy, upstreams):
    up = upstreams(tag_handler, name="kept")
    port = free_port()
    p = proxy(routed_to(port, up.port))
    workers = sorted(p.worker_pids())
    p.reload("stream_listen: [127.0.0.1:not-a-port]\nservices: 7\n", expect="reload failed")
    assert p.proc.poll() is None
    assert sorted(p.worker_pids()) == workers
    with connect(port) as sock:
        assert recv_line(sock) == b"kept\n"
    assert re.search(r"pyproxy\.conf:\d+: ", p.log_text())


def test_killed_worker_is_replaced_and_service_continues(proxy, upstreams):
    up = upstreams(tag_handler, name="up")
    port = free_port()
    p = proxy(routed_to(port, up.port))
    victim = p.worker_pids()[0]
    os.kill(victim, signal.SIGKILL)
    wait_until(lambda: len(p.worker_pids()) == 2 and victim not in p.worker_pids(), what="a replacement worker")
    for _ in range(20):
        with connect(port) as sock:
            assert recv_line(sock) == b"up\n"
    assert "exited on signal 9" in p.log_text()


def test_s_reload_and_s_quit_through_the_pid_file(proxy, upstreams):
    first = upstreams(tag_handler, name="first")
    second = upstreams(tag_handler, name="second")
    port = free_port()
    p = proxy(routed_to(port, first.port))
    p.write_config(routed_to(port, second.port))
    result = p.run_cli("-s", "reload")
    assert result.returncode == 0, result.stderr
    p.wait_log("reload complete")
    with connect(port) as sock:
        assert recv_line(sock) == b"second\n"
    held = connect(port)
    assert recv_line(held) == b"second\n"
    result = p.run_cli("-s", "quit")
    assert result.returncode == 0, result.stderr
    time.sleep(0.5)
    held.sendall(b"draining\n")                   # graceful: the open session is served to its end
    assert recv_line(held) == b"draining\n"
    held.close()
    p.proc.wait(20)
    assert p.proc.returncode == 0
    assert not p.pid_file.exists()


def test_s_without_running_master_says_so(tmp_path):
    p = Proxy(tmp_path, routed_to(free_port(), free_port()))
    result = p.run_cli("-s", "stop")
    assert result.returncode == 1
    assert "is pyproxy running?" in result.stderr
    assert "Traceback" not in result.stderr


def test_port_in_use_is_a_clear_error(tmp_path):
    port = free_port()
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", port))
        squatter.listen()
        p = Proxy(tmp_path, routed_to(port, free_port()))
        result = p.run_cli(timeout=20)
    assert result.returncode == 1
    assert f"bind() to 127.0.0.1:{port} failed (98: Address already in use)" in result.stderr
    assert "Traceback" not in result.stderr


def test_demo_launcher_runs_the_seed_scenario(tmp_path):
    """`make run` = python -m pyproxy.demo: echo upstream + pyproxy; here on free ports."""
    listen, tls_listen, echo_port = free_port(), free_port(), free_port()
    conf = tmp_path / "demo.conf"
    repo_conf = open(os.path.join(os.path.dirname(__file__), "..", "..", "conf", "pyproxy.conf")).read()
    conf.write_text(repo_conf.replace("9000", str(listen)).replace("1025", str(echo_port))
                    .replace(":9443", f":{tls_listen}").replace("pid: pyproxy.pid", f"pid: {tmp_path}/demo.pid"))
    demo = subprocess.Popen([sys.executable, "-m", "pyproxy.demo", "-c", str(conf), "--echo",
                             f"127.0.0.1:{echo_port}"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        def greeting():
            try:
                with connect(listen, timeout=5) as sock:
                    return recv_line(sock)
            except OSError:
                return None
        assert wait_until(greeting, 20, what="the demo to answer").startswith(b"Welcome, you are connected")
        with connect(listen) as sock:
            for _ in range(4):
                recv_line(sock)
            sock.sendall(b"hello\n")
            assert recv_line(sock) == b"hello\n"
            sock.shutdown(socket.SHUT_WR)
            assert recv_all(sock) == b""
        assert (tmp_path / "certs" / "tls9443.kong.example.crt").exists()    # made on first run
        with tls_client(tls_listen, "tls9443.kong.example") as sock:
            assert peer_common_name(sock) == "tls9443.kong.example"
            assert recv_line(sock).startswith(b"Welcome, you are connected")
    finally:
        demo.send_signal(signal.SIGINT)
        demo.wait(20)


def test_worker_that_cannot_boot_stops_the_master_without_respawning(tmp_path):
    """A worker that cannot start (here: too few file descriptors for its epoll and pipes) makes
    the master stop with a message, instead of respawning it forever."""
    import resource

    p = Proxy(tmp_path, routed_to(free_port(), free_port()).replace("worker_processes: 2", "worker_processes: 1"))
    for limit in range(6, 12):
        def tight(limit=limit):
            resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))
        result = subprocess.run(p.command(), capture_output=True, text=True, timeout=30, preexec_fn=tight)
        log = p.log_text()
        if "could not start" in log:
            assert result.returncode == 1
            assert log.count("start worker process") == 1           # no respawn storm
            assert "Too many open files" in log
            assert "Traceback" not in log + result.stderr
            return
        p.error_log.unlink(missing_ok=True)
    raise AssertionError("no file descriptor limit made the worker fail while the master started")


def test_workers_after_a_reload_hold_no_fd_of_the_master(proxy, upstreams):
    """Without status_listen, nothing about metrics may leak into workers forked after a reload."""
    up = upstreams(tag_handler, name="up")
    port = free_port()
    p = proxy(routed_to(port, up.port))
    before = {len(psutil.Process(pid).open_files()) for pid in p.worker_pids()}
    p.reload()
    p.reload()
    for pid in p.worker_pids():
        files = [f.path for f in psutil.Process(pid).open_files()]
        assert not any("pyproxy-metrics" in path for path in files), files
    assert {len(psutil.Process(pid).open_files()) for pid in p.worker_pids()} == before


def test_world_readable_key_is_warned_about_at_t_and_at_start(tmp_path):
    from tests.support import make_cert

    cert, key = make_cert(tmp_path, "warn.example", ["warn.example"])
    os.chmod(key, 0o644)
    port = free_port()
    p = Proxy(tmp_path, f"""
stream_listen: ["127.0.0.1:{port} ssl"]
ssl:
  default_certificate: {{cert: {cert}, key: {key}}}
services:
  - name: s
    host: 127.0.0.1
    port: 1
    routes: [{{name: r, protocols: [tls], sources: [{{ip: 127.0.0.1}}]}}]
""")
    result = p.run_cli("-t")
    assert result.returncode == 0
    assert f"{key} is readable by group or others (mode 0644); chmod 600 it" in result.stderr
    p.start()
    try:
        assert "readable by group or others" in (tmp_path / "stderr.txt").read_text()
    finally:
        p.stop()
