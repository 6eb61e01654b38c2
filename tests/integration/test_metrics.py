"""status_listen: /metrics in Prometheus text (parsed by Prometheus' parser) and /status in JSON."""

from __future__ import annotations

import json
import os
import pwd
import signal
import socket
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

from pyproxy.worker import TRIM_INTERVAL
from tests.support import Proxy, connect, free_port, recv_all, recv_line, tag_handler, wait_until


def config(port: int, status_port: int, upstream_port: int, dead_port: int) -> str:
    return f"""
worker_processes: 2
status_listen: 127.0.0.1:{status_port}
stream_listen: [127.0.0.1:{port}]
upstreams:
  - name: pool
    targets: [{{target: 127.0.0.1:{upstream_port}}}]
services:
  - name: svc
    host: pool
    routes:
      - name: r
        protocols: [tcp]
        sources: [{{ip: 127.0.0.1}}]
  - name: dead
    host: 127.0.0.1
    port: {dead_port}
    routes:
      - name: to-dead
        protocols: [tcp]
        sources: [{{ip: 127.0.0.2}}]
"""


def scrape(status_port: int) -> dict:
    """{(name, frozenset(labels)): value} from /metrics, through Prometheus' own parser."""
    with urllib.request.urlopen(f"http://127.0.0.1:{status_port}/metrics", timeout=10) as response:
        assert response.headers["Content-Type"].startswith("text/plain")
        text = response.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def value(samples: dict, name: str, **labels) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def count_sessions(p, port: int, status_port: int, n: int) -> None:
    """Make n sessions through the `svc` route and wait until /metrics counts them."""
    for _ in range(n):
        with connect(port) as sock:
            assert recv_line(sock) == b"up\n"
    p.wait_access(n)
    wait_until(lambda: value(scrape(status_port), "pyproxy_sessions_total", service="svc", route="r",
                             status="200") == n, timeout=5, interval=0.1, what=f"{n} sessions in /metrics")


def test_metrics_count_the_sessions_made(proxy, upstreams):
    up = upstreams(tag_handler, name="up")
    port, status_port = free_port(), free_port()
    p = proxy(config(port, status_port, up.port, free_port()))
    for _ in range(5):
        with connect(port) as sock:
            assert recv_line(sock) == b"up\n"
            sock.sendall(b"abc")
            sock.shutdown(socket.SHUT_WR)
            assert recv_all(sock) == b"abc"
    for _ in range(2):
        with connect(port, source="127.0.0.2") as sock:
            assert recv_all(sock) == b""                    # 502: nothing listens there
    with connect(port, source="127.0.0.3") as sock:
        assert recv_all(sock) == b""                        # 404: no route
    p.wait_access(8)

    def counted():
        samples = scrape(status_port)
        done = value(samples, "pyproxy_sessions_total", service="svc", route="r", status="200") == 5
        return samples if done else None
    samples = wait_until(counted, timeout=5, interval=0.1, what="5 sessions in /metrics")
    assert value(samples, "pyproxy_sessions_total", service="dead", route="to-dead", status="502") == 2
    assert value(samples, "pyproxy_sessions_total", service="-", route="-", status="404") == 1
    assert value(samples, "pyproxy_client_received_bytes_total", service="svc") == 15
    assert value(samples, "pyproxy_client_sent_bytes_total", service="svc") == 5 * len(b"up\nabc")
    assert value(samples, "pyproxy_upstream_target_healthy", upstream="pool", target=up.target) == 1
    assert value(samples, "pyproxy_active_sessions") == 0
    roles = sorted(labels for (name, labels) in samples if name == "pyproxy_process_resident_memory_bytes")
    assert len(roles) == 4                                  # the master, its status process, two workers

    held = connect(port)
    assert recv_line(held) == b"up\n"
    wait_until(lambda: value(scrape(status_port), "pyproxy_active_sessions") == 1, timeout=5, interval=0.2,
               what="the open session in the gauge")
    held.close()


def test_counters_survive_a_reload_and_reloads_are_counted(proxy, upstreams):
    up = upstreams(tag_handler, name="up")
    port, status_port = free_port(), free_port()
    conf = config(port, status_port, up.port, free_port())
    p = proxy(conf)
    count_sessions(p, port, status_port, 3)
    p.reload(conf)
    p.reload("not: [valid", expect="reload failed")
    samples = scrape(status_port)
    assert value(samples, "pyproxy_sessions_total", service="svc", route="r", status="200") == 3
    assert value(samples, "pyproxy_reloads_total", result="ok") == 1
    assert value(samples, "pyproxy_reloads_total", result="failed") == 1
    assert value(samples, "pyproxy_config_generation") == 2


def test_status_json_and_unknown_paths(proxy, upstreams):
    up = upstreams(tag_handler, name="up")
    port, status_port = free_port(), free_port()
    p = proxy(config(port, status_port, up.port, free_port()))
    with connect(port) as sock:
        assert recv_line(sock) == b"up\n"
    p.wait_access(1)

    def status():
        with urllib.request.urlopen(f"http://127.0.0.1:{status_port}/status", timeout=10) as response:
            doc = json.loads(response.read())
        return doc if doc["sessions"]["total"] == 1 else None
    doc = wait_until(status, timeout=5, interval=0.1, what="/status to count the session")
    assert doc["sessions"]["by_status"] == {"200": 1}
    assert doc["upstreams"]["pool"] == {up.target: True}
    assert {proc["role"] for proc in doc["processes"]} == {"master", "status", "worker"}
    assert doc["master_pid"] == p.pid
    try:
        urllib.request.urlopen(f"http://127.0.0.1:{status_port}/nope", timeout=10)
        raise AssertionError("expected a 404")
    except urllib.error.HTTPError as exc:
        assert exc.code == 404


# -- where scrapes are answered (issue 15: a scrape stalled the worker that answered it) -----------
STATUS_TITLE = "pyproxy: status process"


def status_pid(p) -> int:
    """The master's status process, once it runs (by its process title)."""
    def find():
        pids = [pid for pid, title in p.children() if title == STATUS_TITLE]
        return pids[0] if len(pids) == 1 else None
    return wait_until(find, timeout=10, interval=0.05, what="the status process")


def get(status_port: int, path: str, timeout: float = 5) -> bytes:
    with urllib.request.urlopen(f"http://127.0.0.1:{status_port}{path}", timeout=timeout) as response:
        return response.read()


def listening_on(pid: int, port: int) -> bool:
    return any(c.status == psutil.CONN_LISTEN and c.laddr[1] == port
               for c in psutil.Process(pid).net_connections())


def test_scrapes_are_answered_while_every_worker_is_stopped(proxy, upstreams):
    """/metrics and /status come from the status process: workers frozen with SIGSTOP (a stand-in
    for a worker busy with sessions) do not hold a scrape up, and no worker holds the socket."""
    up = upstreams(tag_handler, name="up")
    port, status_port = free_port(), free_port()
    p = proxy(config(port, status_port, up.port, free_port()))
    count_sessions(p, port, status_port, 1)
    workers = p.worker_pids()
    assert len(workers) == 2
    for pid in workers:
        os.kill(pid, signal.SIGSTOP)
    try:
        doc = json.loads(get(status_port, "/status"))
        assert doc["sessions"]["total"] == 1
        assert value(scrape(status_port), "pyproxy_sessions_total", service="svc", route="r",
                     status="200") == 1
    finally:
        for pid in workers:
            os.kill(pid, signal.SIGCONT)
    status = status_pid(p)
    assert listening_on(status, status_port)
    assert not any(listening_on(pid, status_port) for pid in workers)
    assert {(proc["pid"], proc["role"]) for proc in doc["processes"]} == \
        {(p.pid, "master"), (status, "status")} | {(pid, "worker") for pid in workers}


def test_more_scrapers_than_served_at_once_all_get_their_answer(proxy, upstreams):
    """The status process serves 32 requests at once; the 33rd and later wait in the accept queue
    and are answered as earlier ones end."""
    up = upstreams(tag_handler, name="up")
    port, status_port = free_port(), free_port()
    proxy(config(port, status_port, up.port, free_port()))
    clients = [connect(status_port) for _ in range(48)]      # connected, nothing asked yet
    try:
        for sock in clients:
            sock.sendall(b"GET /status HTTP/1.0\r\n\r\n")
        for sock in clients:
            head, _, body = recv_all(sock).partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200 ") and json.loads(body)["master_pid"]
    finally:
        for sock in clients:
            sock.close()


def metrics_folder(p) -> Path:
    """The folder of the metric files, found where a worker has them open."""
    for pid in p.worker_pids():
        for f in psutil.Process(pid).open_files():
            if f.path.endswith(".db"):
                return Path(f.path).parent
    raise AssertionError("no worker has a metric file open")


def test_metric_files_stay_few_and_totals_survive_30_reloads(proxy, upstreams):
    """A worker that exits leaves its counts behind, not its files: after 30 reloads the folder
    holds the live processes' files and an archive, and every session is still counted."""
    up = upstreams(tag_handler, name="up")
    port, status_port = free_port(), free_port()
    conf = config(port, status_port, up.port, free_port()).replace("worker_processes: 2",
                                                                   "worker_processes: 1")
    p = proxy(conf)
    folder = metrics_folder(p)
    for n in range(30):
        with connect(port) as sock:
            assert recv_line(sock) == b"up\n"
        p.wait_access(n + 1)
        p.reload()
    wait_until(lambda: len(p.worker_pids()) == 1, timeout=10, what="the old generations to exit")

    def settled():
        samples = scrape(status_port)
        files = sorted(path.name for path in folder.glob("*.db"))
        # The master's, the one worker's, an archive: a handful, whatever the number of reloads.
        return (samples, files) if len(files) <= 8 else None
    samples, files = wait_until(settled, timeout=10, interval=0.2, what="the dead workers' files to go")
    assert value(samples, "pyproxy_sessions_total", service="svc", route="r", status="200") == 30, files
    assert value(samples, "pyproxy_client_sent_bytes_total", service="svc") == 30 * len(b"up\n")
    assert value(samples, "pyproxy_reloads_total", result="ok") == 30
    assert value(samples, "pyproxy_active_sessions") == 0


def test_status_process_is_restarted_and_follows_status_listen(proxy, upstreams):
    up = upstreams(tag_handler, name="up")
    port, status_port, dead_port = free_port(), free_port(), free_port()
    p = proxy(config(port, status_port, up.port, dead_port))
    first = status_pid(p)
    os.kill(first, signal.SIGKILL)
    p.wait_log(f"status process {first} exited on signal 9")
    second = wait_until(lambda: status_pid(p) != first and status_pid(p), timeout=10,
                        what="a new status process")
    assert b'"master_pid"' in get(status_port, "/status")
    p.reload()                                          # status_listen unchanged: the same process
    assert status_pid(p) == second
    assert b'"master_pid"' in get(status_port, "/status")
    moved = free_port()
    p.reload(config(port, moved, up.port, dead_port))   # a new address: a new process serves it
    wait_until(lambda: status_pid(p) != second, timeout=10, what="the status process to be replaced")
    assert b'"master_pid"' in get(moved, "/status")
    try:
        get(status_port, "/status", timeout=2)
        raise AssertionError("the old status_listen address still answers")
    except urllib.error.URLError as exc:
        assert isinstance(exc.reason, ConnectionRefusedError), exc
    p.reload(config(port, moved, up.port, dead_port).replace(f"status_listen: 127.0.0.1:{moved}\n", ""))
    wait_until(lambda: not any(title == STATUS_TITLE for _, title in p.children()), timeout=10,
               what="the status process to stop with status_listen gone")
    assert p.stop() == 0
    assert "internal error" not in p.log_text() and "Traceback" not in p.log_text()


@pytest.mark.skipif(os.geteuid() != 0, reason="privilege drop needs root")
def test_user_with_status_listen_counts_sessions(proxy, upstreams):
    """With `user:`, everything the metrics need is imported before the privilege drop: the
    interpreter's own library may be unreadable by that user (a pyenv under /root, mode 700)."""
    nobody = pwd.getpwnam("nobody")
    up = upstreams(tag_handler, name="up")
    port, status_port = free_port(), free_port()
    p = proxy("user: nobody\n" + config(port, status_port, up.port, free_port()))
    assert {psutil.Process(pid).uids().effective for pid in p.worker_pids()} == {nobody.pw_uid}
    status = status_pid(p)
    wait_until(lambda: psutil.Process(status).uids().effective == nobody.pw_uid, timeout=10,
               what="the status process to become nobody")
    count_sessions(p, port, status_port, 2)
    p.reload()                                          # the master's own metric files join in
    samples = scrape(status_port)
    assert value(samples, "pyproxy_reloads_total", result="ok") == 1
    assert "could not start" not in p.log_text()
    # An idle worker gives its free heap back TRIM_INTERVAL after its sessions ended, through
    # ctypes, which `nobody` cannot import from a private interpreter: it must be loaded before.
    with connect(port) as sock:                          # a session in the new generation
        assert recv_line(sock) == b"up\n"
    time.sleep(TRIM_INTERVAL + 1.5)
    assert "internal error" not in p.log_text()


# -- the metrics folder of a master killed with SIGKILL (issue 15) --------------------------------
def kill_all(p) -> None:
    """SIGKILL the master and every child of it, as the OOM killer or `kill -9` of a group would."""
    victims = [psutil.Process(p.pid), *psutil.Process(p.pid).children()]
    for proc in victims:
        proc.kill()
    psutil.wait_procs(victims, timeout=10)
    p.proc.wait(10)


def test_a_killed_masters_metrics_folder_is_removed_at_the_next_start(tmp_path, upstreams, monkeypatch):
    up = upstreams(tag_handler, name="up")
    # The masters of this test keep their folders in a temporary folder of its own: a pyproxy started
    # meanwhile by another test run on the machine would otherwise clean the killed master's first.
    (tmp_path / "tmp").mkdir()
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))
    started = []

    def start(name: str) -> Proxy:
        workdir = tmp_path / name
        workdir.mkdir()
        p = Proxy(workdir, config(free_port(), free_port(), up.port, free_port()))
        started.append(p)
        return p.start()
    try:
        killed, alive = start("killed"), start("alive")
        killed_folder, alive_folder = metrics_folder(killed), metrics_folder(alive)
        assert killed_folder != alive_folder
        kill_all(killed)
        assert killed_folder.exists()                       # nobody was left to remove it
        later = start("later")
        assert not killed_folder.exists()
        assert alive_folder.exists()
        assert metrics_folder(alive) == alive_folder          # the live master keeps its own
        assert later.stop() == 0 and alive.stop() == 0
        assert not alive_folder.exists()
    finally:
        for p in started:
            p.stop()
