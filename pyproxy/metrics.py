"""Metrics: Prometheus text on `/metrics` and a JSON summary on `/status`, from every process.

Why prometheus_client: its multiprocess mode is the pre-fork model exactly — every process writes
its own memory-mapped file in one directory (no locks between processes, no IPC), and a scrape
sums the files; counters of a worker that exited stay in its file, so totals never go backwards
across reloads or crashes, and `mark_process_dead` drops a dead worker's live gauges. Writing the
exposition format and that aggregation by hand would repeat a well-kept library.

The session hot path never touches it: a worker counts in plain dicts and flushes the deltas at
most 20 times a second (and 50 ms after the last session ended), so /metrics trails the truth by
about 50 ms at most.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter as Tally
from typing import Optional

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
FLUSH_DELAY = 0.05

_metrics = None      # the prometheus objects of this process, made after the fork (see _objects)


def _objects():
    """Create this process's metric objects once (prometheus_client must be imported after the
    master set PROMETHEUS_MULTIPROC_DIR, so it is imported here, not at module level)."""
    global _metrics
    if _metrics is None:
        from prometheus_client import Counter, Gauge

        class M:
            sessions = Counter("pyproxy_sessions_total", "Sessions ended, by service, route and status",
                               ["service", "route", "status"])
            received = Counter("pyproxy_client_received_bytes_total", "Bytes received from clients",
                               ["service"])
            sent = Counter("pyproxy_client_sent_bytes_total", "Bytes sent to clients", ["service"])
            upstream_sent = Counter("pyproxy_upstream_sent_bytes_total", "Bytes sent to upstreams", ["service"])
            upstream_received = Counter("pyproxy_upstream_received_bytes_total", "Bytes received from upstreams",
                                        ["service"])
            handshakes = Counter("pyproxy_tls_handshakes_total", "TLS handshakes with clients, by result",
                                 ["result"])
            active = Gauge("pyproxy_active_sessions", "Sessions open now", multiprocess_mode="livesum")
            healthy = Gauge("pyproxy_upstream_target_healthy",
                            "1 when a target is in rotation (0 if any worker has it out)",
                            ["upstream", "target"], multiprocess_mode="livemin")
            reloads = Counter("pyproxy_reloads_total", "Configuration reloads, by result", ["result"])
            generation = Gauge("pyproxy_config_generation", "Configuration generation being served",
                               multiprocess_mode="max")
        _metrics = M
    return _metrics


class WorkerMetrics:
    """A worker's tallies: O(1) dict updates per session, flushed in batches."""

    def __init__(self, worker):
        self.worker = worker
        self.loop = worker.loop
        self.sessions: Tally = Tally()
        self.bytes: dict[str, list[int]] = {}
        self.handshakes: Tally = Tally()
        self.flush_timer = None
        self.last_flush = 0.0
        self.metrics = _objects()

    def session_ended(self, session) -> None:
        route = session.route
        service = route.service if route is not None else "-"
        self.sessions[(service, route.name if route is not None else "-", str(session.status))] += 1
        counts = self.bytes.get(service)
        if counts is None:
            counts = self.bytes[service] = [0, 0, 0, 0]
        counts[0] += session.bytes_received()
        counts[1] += session.bytes_sent()
        counts[2] += session.upstream_bytes_sent()
        counts[3] += session.upstream_bytes_received()
        self._soon()

    def handshake(self, ok: bool) -> None:
        self.handshakes["ok" if ok else "failed"] += 1
        self._soon()

    def _soon(self) -> None:
        if self.flush_timer is None:
            self.flush_timer = self.loop.call_later(FLUSH_DELAY, self.flush)

    def flush(self) -> None:
        """Hand the tallies to prometheus_client (one mmap write per label set that changed)."""
        self.flush_timer = None
        m = self.metrics
        for labels, n in self.sessions.items():
            m.sessions.labels(*labels).inc(n)
        self.sessions.clear()
        for service, (received, sent, up_sent, up_received) in self.bytes.items():
            m.received.labels(service).inc(received)
            m.sent.labels(service).inc(sent)
            m.upstream_sent.labels(service).inc(up_sent)
            m.upstream_received.labels(service).inc(up_received)
        self.bytes.clear()
        for result, n in self.handshakes.items():
            m.handshakes.labels(result).inc(n)
        self.handshakes.clear()
        self.sample()

    def sample(self) -> None:
        """Gauges: open sessions, the worker's view of target health, its generation."""
        m = self.metrics
        now = self.loop.now
        m.active.set(len(self.worker.sessions))
        m.generation.set(self.worker.generation)
        seen = set()
        for balancer in self.worker.balancers.values():
            if balancer.name in seen:
                continue
            seen.add(balancer.name)
            for peer in balancer.peers:
                m.healthy.labels(balancer.name, peer.name).set(1 if peer.available(now) else 0)


def master_reloaded(ok: bool, generation: int) -> None:
    m = _objects()
    m.reloads.labels("ok" if ok else "failed").inc()
    m.generation.set(generation)


def process_dead(pid: int) -> None:
    """In the master, after reaping a worker: its live gauges leave the sums (its counters stay)."""
    if os.environ.get(MULTIPROC_ENV):
        from prometheus_client import multiprocess
        multiprocess.mark_process_dead(pid)


# -- rendering (in whichever worker answered the scrape) -------------------------------------------
def _registry(master_pid: int):
    from prometheus_client import CollectorRegistry
    from prometheus_client.multiprocess import MultiProcessCollector

    registry = CollectorRegistry()
    MultiProcessCollector(registry)
    registry.register(_ProcessCollector(master_pid))
    return registry


class _ProcessCollector:
    """RSS and CPU seconds of the master and each worker, read with psutil at scrape time."""

    def __init__(self, master_pid: int):
        self.master_pid = master_pid

    def collect(self):
        import psutil
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        rss = GaugeMetricFamily("pyproxy_process_resident_memory_bytes", "Resident memory of each process",
                                labels=["pid", "role"])
        cpu = CounterMetricFamily("pyproxy_process_cpu_seconds", "CPU time of each process (user+system)",
                                  labels=["pid", "role"])
        fds = GaugeMetricFamily("pyproxy_process_open_fds", "Open file descriptors of each process",
                                labels=["pid", "role"])
        for proc, role in _processes(self.master_pid):
            try:
                with proc.oneshot():
                    times = proc.cpu_times()
                    labels = [str(proc.pid), role]
                    rss.add_metric(labels, proc.memory_info().rss)
                    cpu.add_metric(labels, times.user + times.system)
                    fds.add_metric(labels, proc.num_fds())
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        yield rss
        yield cpu
        yield fds


def _processes(master_pid: int):
    import psutil
    try:
        master = psutil.Process(master_pid)
        yield master, "master"
        for child in master.children():
            yield child, "worker"
    except psutil.NoSuchProcess:
        return


def render_metrics(master_pid: int) -> bytes:
    from prometheus_client import generate_latest
    return generate_latest(_registry(master_pid))


def render_status(master_pid: int, version: str) -> bytes:
    """/status: the same numbers as /metrics, summed into a small JSON document."""
    registry = _registry(master_pid)
    status: dict = {"version": version, "master_pid": master_pid, "time": time.time(),
                    "sessions": {"active": 0, "total": 0, "by_status": {}}, "bytes": {},
                    "upstreams": {}, "processes": [], "reloads": {}, "generation": None}
    for family in registry.collect():
        for sample in family.samples:
            name, labels, value = sample.name, sample.labels, sample.value
            if name == "pyproxy_active_sessions":
                status["sessions"]["active"] = int(value)
            elif name == "pyproxy_sessions_total":
                status["sessions"]["total"] += int(value)
                by = status["sessions"]["by_status"]
                by[labels["status"]] = by.get(labels["status"], 0) + int(value)
            elif name.endswith("_bytes_total") and name.startswith(("pyproxy_client", "pyproxy_upstream")):
                key = name[len("pyproxy_"):-len("_bytes_total")]
                status["bytes"][key] = status["bytes"].get(key, 0) + int(value)
            elif name == "pyproxy_upstream_target_healthy":
                status["upstreams"].setdefault(labels["upstream"], {})[labels["target"]] = bool(value)
            elif name == "pyproxy_reloads_total":
                status["reloads"][labels["result"]] = int(value)
            elif name == "pyproxy_config_generation":
                status["generation"] = int(value)
            elif name == "pyproxy_process_resident_memory_bytes":
                status["processes"].append({"pid": int(labels["pid"]), "role": labels["role"], "rss": int(value)})
    return (json.dumps(status, indent=2, sort_keys=True) + "\n").encode()


class StatusSession:
    """One HTTP/1.x request on `status_listen`: GET /metrics or /status, answered, then closed."""

    MAX_REQUEST = 8192
    TIMEOUT = 5.0

    def __init__(self, worker, sock):
        self.worker = worker
        self.loop = worker.loop
        self.sock = sock
        self.request = b""
        self.response: Optional[memoryview] = None
        self.timer = self.loop.call_later(self.TIMEOUT, self.close)

    def start(self) -> None:
        from pyproxy.loop import STREAM_EVENTS
        self.loop.add(self.sock.fileno(), STREAM_EVENTS, self.on_event)

    def on_event(self, mask: int) -> None:
        if self.response is None:
            self._read()
        if self.response is not None:
            self._write()

    def _read(self) -> None:
        try:
            while b"\r\n\r\n" not in self.request and b"\n\n" not in self.request:
                data = self.sock.recv(4096)
                if not data:
                    self.close()
                    return
                self.request += data
                if len(self.request) > self.MAX_REQUEST:
                    self._respond(431, "text/plain", b"request too large\n")
                    return
        except BlockingIOError:
            return
        except OSError:
            self.close()
            return
        line = self.request.split(b"\n", 1)[0].decode("latin-1").split()
        method, path = (line[0], line[1].split("?", 1)[0]) if len(line) >= 2 else ("", "")
        if method not in ("GET", "HEAD"):
            self._respond(405, "text/plain", b"only GET\n")
        elif path == "/metrics":
            from prometheus_client import CONTENT_TYPE_LATEST
            self._respond(200, CONTENT_TYPE_LATEST, render_metrics(self.worker.master_pid), method == "HEAD")
        elif path == "/status":
            from pyproxy import __version__
            self._respond(200, "application/json", render_status(self.worker.master_pid, __version__),
                          method == "HEAD")
        else:
            self._respond(404, "text/plain", b"try /metrics or /status\n")

    def _respond(self, code: int, content_type: str, body: bytes, head_only: bool = False) -> None:
        reason = {200: "OK", 404: "Not Found", 405: "Method Not Allowed", 431: "Request Header Fields Too Large"}
        head = (f"HTTP/1.1 {code} {reason[code]}\r\nContent-Type: {content_type}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
        self.response = memoryview(head + (b"" if head_only else body))

    def _write(self) -> None:
        try:
            while self.response:
                n = self.sock.send(self.response)
                self.response = self.response[n:]
        except BlockingIOError:
            return
        except OSError:
            pass
        self.close()

    def close(self) -> None:
        if self.sock is None:
            return
        self.timer.cancel()
        self.loop.forget(self.sock.fileno())
        self.sock.close()
        self.sock = None


def prepare_directory(user: Optional[str]) -> str:
    """In the master, before any fork and before prometheus_client is imported: the folder where
    every process keeps its metric files (given to the worker user when we start as root)."""
    import tempfile

    path = tempfile.mkdtemp(prefix="pyproxy-metrics-")
    if user and os.geteuid() == 0:
        import pwd
        entry = pwd.getpwnam(user)
        os.chown(path, entry.pw_uid, entry.pw_gid)
    os.environ[MULTIPROC_ENV] = path
    return path


def remove_directory(path: str) -> None:
    import shutil
    shutil.rmtree(path, ignore_errors=True)
