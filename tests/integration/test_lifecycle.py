"""Operating pyproxy: -t, signals, reloads, a worker crash, the pid file, the demo launcher."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil

from tests.integration.test_core import one_service
from tests.support import (
    Proxy,
    connect,
    echo_handler,
    expected_hash_reply,
    free_port,
    hash_handler,
    pattern_bytes,
    peer_common_name,
    recv_all,
    recv_line,
    tag_handler,
    tls_client,
    upload_and_hash,
    wait_until,
)


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
    wait_until(lambda: len(p.worker_pids()) == 2 and victim not in p.worker_pids(),
               what="a replacement worker")
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
    repo_conf = (Path(__file__).parents[2] / "conf" / "pyproxy.conf").read_text()
    conf.write_text(repo_conf.replace("9000", str(listen)).replace("1025", str(echo_port))
                    .replace(":9443", f":{tls_listen}").replace("pid: pyproxy.pid",
                                                                f"pid: {tmp_path}/demo.pid"))
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

    p = Proxy(tmp_path, routed_to(free_port(), free_port()).replace("worker_processes: 2",
                                                                    "worker_processes: 1"))
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


def _workers_of(pid: int) -> list[int]:
    """The master's worker processes (not its configuration loader child)."""
    found = []
    for child in psutil.Process(pid).children():
        try:
            if child.cmdline()[0].startswith("pyproxy: worker process"):
                found.append(child.pid)
        except (psutil.NoSuchProcess, IndexError):
            pass
    return found


def test_a_stop_sent_to_the_whole_process_group_exits_at_once_without_respawning(tmp_path, upstreams):
    """`timeout`, a terminal's Ctrl-C, a container runtime: the signal reaches the master and every
    worker at once. The workers' exits are not crashes to repair: the master stops within a second
    or two, exit code 0, nothing respawned, nothing killed. Also right after a HUP, while workers fork."""
    up = upstreams(tag_handler, name="up")
    for name in ("TERM", "INT", "QUIT"):
        for round_ in range(4):
            workdir = tmp_path / f"{name}-{round_}"
            workdir.mkdir()
            port = free_port()
            p = Proxy(workdir, routed_to(port, up.port)).start(own_group=True)
            try:
                with connect(port) as sock:
                    assert recv_line(sock) == b"up\n"
                if round_ == 3:
                    p.send_signal(signal.SIGHUP)
                started = time.monotonic()
                os.killpg(p.pid, getattr(signal, f"SIG{name}"))
                code = p.proc.wait(10)
                elapsed = time.monotonic() - started
            finally:
                if p.proc.poll() is None:
                    os.killpg(p.pid, signal.SIGKILL)
                p.stop()
            log = p.log_text()
            assert code == 0, log
            assert elapsed < 2.5, f"SIG{name} round {round_}: {elapsed:.1f}s\n{log}"
            assert "unexpectedly" not in log and "starting a new one" not in log, log
            assert "killing it" not in log, log


def test_a_stopped_worker_is_replaced_and_what_waited_in_its_queue_is_served(proxy, upstreams):
    """A worker that stops answering (SIGSTOP here, a hang in general) is found by its missing
    heartbeat, killed and replaced on the same listening socket: connections that queued for it
    meanwhile are served by the replacement, and new ones by both workers."""
    from pyproxy.master import HEARTBEAT_TIMEOUT

    up = upstreams(tag_handler, name="up")
    port = free_port()
    p = proxy(routed_to(port, up.port))
    victim = _workers_of(p.pid)[0]
    os.kill(victim, signal.SIGSTOP)
    try:
        stopped_at = time.monotonic()
        clients = [connect(port, timeout=HEARTBEAT_TIMEOUT + 20) for _ in range(16)]
        served_after = []
        for sock in clients:
            assert recv_line(sock) == b"up\n"
            served_after.append(time.monotonic() - stopped_at)
            sock.close()
        log = p.wait_log("sent no heartbeat", timeout=5)
        line = next(text for text in log.splitlines() if "sent no heartbeat" in text)
        assert f"worker process {victim} (#" in line and "killing it" in line, line
        # Some clients waited in the stopped worker's queue: the replacement took them over.
        assert max(served_after) > HEARTBEAT_TIMEOUT - 1, served_after
        wait_until(lambda: len(_workers_of(p.pid)) == 2 and victim not in _workers_of(p.pid),
                   what="a replacement worker")
        for _ in range(20):
            with connect(port, timeout=5) as sock:
                assert recv_line(sock) == b"up\n"
        assert "unexpectedly" not in p.log_text()
    finally:
        try:
            os.kill(victim, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_a_log_level_change_applies_to_the_workers_of_that_reload(proxy, upstreams):
    """`log_level: info` on reload: the new workers log their info lines at once, not one reload later."""
    up = upstreams(tag_handler, name="up")
    port, unrouted = free_port(), free_port()

    def config(level: str) -> str:
        return routed_to(port, up.port).replace(
            f"stream_listen: [127.0.0.1:{port}]",
            f"log_level: {level}\nstream_listen: [127.0.0.1:{port}, 127.0.0.1:{unrouted}]")

    def refused(count: int) -> None:
        for _ in range(count):          # no route for this port: refused, an info line each
            with connect(unrouted) as sock:
                assert recv_all(sock) == b""

    p = proxy(config("notice"))
    refused(4)
    p.wait_access(4)
    assert "no route matched" not in p.log_text()
    p.reload(config("info"))
    refused(4)
    p.wait_access(8)
    assert p.log_text().count("no route matched") == 4, p.log_text()


def test_term_during_a_graceful_stop_closes_the_sessions_at_once(proxy, upstreams):
    """QUIT waits for sessions (up to worker_shutdown_timeout); a TERM after it escalates."""
    up = upstreams(tag_handler, name="up")
    port = free_port()
    p = proxy(routed_to(port, up.port) + "worker_shutdown_timeout: 60s\n")
    held = connect(port)
    assert recv_line(held) == b"up\n"
    p.send_signal(signal.SIGQUIT)
    p.wait_log("graceful shutdown")
    held.sendall(b"still served\n")
    assert recv_line(held) == b"still served\n"
    p.send_signal(signal.SIGTERM)
    assert p.proc.wait(5) == 0
    assert recv_all(held) == b""
    held.close()
    assert "fast shutdown (SIGTERM during the graceful one)" in p.log_text()


def test_a_worker_that_cannot_be_forked_is_retried_while_the_master_keeps_serving(proxy, upstreams):
    """pipe2() failing (EMFILE) for a respawn is logged and retried; no traceback, no exit."""
    up = upstreams(tag_handler, name="up")
    port = free_port()
    p = proxy(routed_to(port, up.port))
    master = psutil.Process(p.pid)
    open_fds = {int(fd) for fd in os.listdir(f"/proc/{p.pid}/fd")}
    lowest_free = min(set(range(len(open_fds) + 1)) - open_fds)
    limits = master.rlimit(psutil.RLIMIT_NOFILE)
    # Every fd number below the limit is taken: the dead worker's pipe frees one, pipe2() needs two.
    master.rlimit(psutil.RLIMIT_NOFILE, (lowest_free, limits[1]))
    try:
        victim = _workers_of(p.pid)[0]
        os.kill(victim, signal.SIGKILL)
        p.wait_log("pipe2() failed")
        assert "cannot start worker process #" in p.log_text()
        assert "trying again in 1s" in p.log_text()
        assert p.proc.poll() is None
        # Meanwhile the slot's socket stays open: what queues there waits for the next worker.
        clients = [connect(port, timeout=20) for _ in range(8)]
    finally:
        master.rlimit(psutil.RLIMIT_NOFILE, limits)
    wait_until(lambda: len(_workers_of(p.pid)) == 2, what="the worker started once fds are available")
    for sock in clients:
        assert recv_line(sock) == b"up\n"
        sock.close()
    assert "Traceback" not in p.log_text() + (p.dir / "stderr.txt").read_text()


def test_a_reload_stuck_reading_its_file_leaves_the_master_responsive(proxy, upstreams):
    """The file is read by a loader child, not by the master: while that read waits (a named pipe
    here, a huge file or a slow disk in life), the master replaces a dead worker and answers TERM."""
    first = upstreams(tag_handler, name="first")
    second = upstreams(tag_handler, name="second")
    port = free_port()
    p = proxy(routed_to(port, first.port))
    p.conf.unlink()
    os.mkfifo(p.conf)               # the next read of the file waits for a writer
    p.send_signal(signal.SIGHUP)
    p.wait_log("reloading configuration (SIGHUP)")
    victim = _workers_of(p.pid)[0]
    os.kill(victim, signal.SIGKILL)
    wait_until(lambda: len(_workers_of(p.pid)) == 2 and victim not in _workers_of(p.pid),
               what="a replacement worker while the reload reads its file")
    with connect(port) as sock:
        assert recv_line(sock) == b"first\n"
    p.write_config(routed_to(port, second.port))     # the loader reads it and the reload goes on
    p.wait_log("reload complete")
    with connect(port) as sock:
        assert recv_line(sock) == b"second\n"

    p.conf.unlink()
    os.mkfifo(p.conf)
    p.send_signal(signal.SIGHUP)
    loaders = wait_until(lambda: [c for c in psutil.Process(p.pid).children()
                                  if "configuration loader" in " ".join(c.cmdline())],
                         what="the configuration loader")
    p.send_signal(signal.SIGTERM)
    assert p.proc.wait(5) == 0
    assert not psutil.pid_exists(loaders[0].pid)
    assert "Traceback" not in p.log_text()


def test_a_plugin_module_first_named_at_a_reload_reaches_the_new_workers(proxy, upstreams):
    """The loader child imports plugin_modules to validate them; the workers are forked from the
    master, so the master must have imported them too before the new generation starts."""
    up = upstreams(tag_handler, name="up")
    port = free_port()
    p = proxy(routed_to(port, up.port))
    (p.dir / "refuse_all.py").write_text(
        "from pyproxy.plugins import Plugin, register\n\n\n"
        "@register\n"
        "class RefuseAll(Plugin):\n"
        "    name = 'refuse-all'\n\n"
        "    def preread(self, session):\n"
        "        return 403\n")
    p.reload(routed_to(port, up.port) + "plugin_modules: [refuse_all]\nplugins: [{name: refuse-all}]\n")
    with connect(port) as sock:
        assert recv_all(sock) == b""
    assert " 403 " in p.wait_access(1)[-1]


def test_a_burst_of_hups_within_reload_coalesce_is_one_reload(proxy, upstreams):
    """`reload_coalesce: 2s`: the HUP after a reload started waits for the window, and the four
    behind it join it, so the burst costs one reload, which the log counts."""
    up = upstreams(tag_handler, name="up")
    port = free_port()
    p = proxy("reload_coalesce: 2s\n" + routed_to(port, up.port))
    started = time.monotonic()
    p.reload()
    for _ in range(5):
        p.send_signal(signal.SIGHUP)
        time.sleep(0.05)
    log = p.wait_log("reload complete", count=2)
    waited = time.monotonic() - started
    assert re.findall(r"reloading configuration \(.*\)", log) == [
        "reloading configuration (SIGHUP)",
        "reloading configuration (SIGHUP; 5 requests coalesced into one reload)"]
    assert waited > 2.0                     # the window is the configured 2s, not the default 200ms
    with connect(port) as sock:
        assert recv_line(sock) == b"up\n"
