"""Metrics: what every process counts, and how the status process turns it into /metrics and /status.

Why prometheus_client: its multiprocess mode is the pre-fork model exactly — every process writes
its own memory-mapped file in one folder (no locks between processes, no IPC), and a scrape sums
the files. Writing the exposition format and that aggregation by hand would repeat a well-kept
library.

The session hot path never touches it: a worker counts in plain dicts and flushes the deltas at
most 20 times a second (and 50 ms after the last session ended), so /metrics trails the truth by
about 50 ms at most.

Scrapes never run in a worker: the status process (pyproxy.status) answers them. Before each one it
folds the files of processes that exited into one archive file per metric type (`fold_dead_files`),
so counters keep their totals across reloads and crashes while a scrape reads only the live
processes' files and the archive, however many reloads came before.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import tempfile
import time
from collections import Counter as Tally
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import psutil
    from prometheus_client import CollectorRegistry, Gauge
    from prometheus_client import Counter as PromCounter
    from prometheus_client.metrics_core import Metric

    from pyproxy.loop import Timer
    from pyproxy.session import Session
    from pyproxy.worker import Worker

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
FLUSH_DELAY = 0.05
FOLDER_PREFIX = "pyproxy-metrics-"
ARCHIVE = "archive"             # `counter_archive.db`: what processes that exited counted



class _Metrics(Protocol):
    """The prometheus_client objects of one process (the class `_objects` makes)."""

    sessions: PromCounter
    received: PromCounter
    sent: PromCounter
    upstream_sent: PromCounter
    upstream_received: PromCounter
    handshakes: PromCounter
    active: Gauge
    healthy: Gauge
    reloads: PromCounter
    generation: Gauge


_metrics: _Metrics | None = None     # this process's prometheus objects, made after the fork (see _objects)
_folder_owner: tuple[int, int] | None = None     # (uid, gid) the master gave the folder to


def load_library(scrapes: bool = False) -> None:
    """Import prometheus_client now (and what answering scrapes needs, with `scrapes`), before the
    process drops privileges: the `user` of the configuration may be unable to read the
    interpreter's own library (a pyenv under /root, mode 700), and prometheus_client imports more
    of it (gzip, http.server, ssl…) when it is first imported, not when it is first used."""
    import prometheus_client
    if scrapes:
        import prometheus_client.core
        import prometheus_client.mmap_dict
        import prometheus_client.multiprocess  # noqa: F401
        import psutil  # noqa: F401


def _objects() -> _Metrics:
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
            upstream_sent = Counter("pyproxy_upstream_sent_bytes_total", "Bytes sent to upstreams",
                                    ["service"])
            upstream_received = Counter("pyproxy_upstream_received_bytes_total",
                                        "Bytes received from upstreams", ["service"])
            handshakes = Counter("pyproxy_tls_handshakes_total", "TLS handshakes with clients, by result",
                                 ["result"])
            active = Gauge("pyproxy_active_sessions", "Sessions open now", multiprocess_mode="livesum")
            healthy = Gauge("pyproxy_upstream_target_healthy",
                            "1 when a target is in rotation (0 if any worker has it out)",
                            ["upstream", "target"], multiprocess_mode="livemin")
            reloads = Counter("pyproxy_reloads_total", "Configuration reloads, by result", ["result"])
            generation = Gauge("pyproxy_config_generation", "Configuration generation being served",
                               multiprocess_mode="max")
        _metrics = M()
    return _metrics


class WorkerMetrics:
    """A worker's tallies: O(1) dict updates per session, flushed in batches."""

    def __init__(self, worker: Worker):
        self.worker = worker
        self.loop = worker.loop
        self.sessions: Tally[tuple[str, str, str]] = Tally()
        self.bytes: dict[str, list[int]] = {}
        self.handshakes: Tally[str] = Tally()
        self.flush_timer: Timer | None = None
        self.last_flush = 0.0
        self.metrics = _objects()

    def session_ended(self, session: Session) -> None:
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
    _give_own_files_to_folder_owner()


def _give_own_files_to_folder_owner() -> None:
    """The master runs as root while the status process reads the folder as `user`: the master's
    own metric files are given to that user too, or a umask such as 027 would hide them."""
    if _folder_owner is None:
        return
    folder = os.environ[MULTIPROC_ENV]
    suffix = f"_{os.getpid()}.db"
    for name in os.listdir(folder):
        if name.endswith(suffix):
            try:
                os.chown(os.path.join(folder, name), *_folder_owner)
            except OSError:
                pass


# -- rendering (in the status process) -------------------------------------------------------------
def _registry(master_pid: int) -> CollectorRegistry:
    from prometheus_client import CollectorRegistry
    from prometheus_client.multiprocess import MultiProcessCollector

    registry = CollectorRegistry()
    MultiProcessCollector(registry)
    registry.register(_ProcessCollector(master_pid))
    return registry


class _ProcessCollector:
    """RSS, CPU seconds and open fds of the master and each of its children, read with psutil at
    scrape time."""

    def __init__(self, master_pid: int):
        self.master_pid = master_pid

    def collect(self) -> Iterator[Metric]:
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
                    try:
                        fds.add_metric(labels, proc.num_fds())
                    except psutil.AccessDenied:     # the root master, seen from `user`
                        pass
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        yield rss
        yield cpu
        yield fds


def _processes(master_pid: int) -> Iterator[tuple[psutil.Process, str]]:
    """The master, then each child: the status process (this one) and the workers."""
    import psutil
    try:
        master = psutil.Process(master_pid)
        yield master, "master"
        for child in master.children():
            yield child, "status" if child.pid == os.getpid() else "worker"
    except psutil.NoSuchProcess:
        return


def render_metrics(master_pid: int) -> bytes:
    from prometheus_client import generate_latest
    return generate_latest(_registry(master_pid))


def render_status(master_pid: int, version: str) -> bytes:
    """/status: the same numbers as /metrics, summed into a small JSON document."""
    registry = _registry(master_pid)
    status: dict[str, Any] = {"version": version, "master_pid": master_pid, "time": time.time(),
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
                status["processes"].append({"pid": int(labels["pid"]), "role": labels["role"],
                                            "rss": int(value)})
    return (json.dumps(status, indent=2, sort_keys=True) + "\n").encode()


# -- the folder of metric files ------------------------------------------------------------------
def prepare_directory(user: str | None) -> str:
    """In the master once it runs (its pid is final: after daemonizing), before any fork and before
    prometheus_client is imported: the folder where every process keeps its metric files, named
    after the master's pid (given to the worker user when we start as root). Folders that masters
    killed with SIGKILL left behind are removed first."""
    global _folder_owner
    owners = {os.geteuid()}
    if user and os.geteuid() == 0:
        import pwd
        entry = pwd.getpwnam(user)
        _folder_owner = (entry.pw_uid, entry.pw_gid)
        owners.add(entry.pw_uid)
    parent = tempfile.gettempdir()
    remove_stale_directories(parent, owners)
    path = tempfile.mkdtemp(prefix=f"{FOLDER_PREFIX}{os.getpid()}-", dir=parent)
    if _folder_owner is not None:
        os.chown(path, *_folder_owner)
    os.environ[MULTIPROC_ENV] = path
    return path


def remove_directory(path: str) -> None:
    shutil.rmtree(path, ignore_errors=True)


def remove_stale_directories(parent: str, owners: set[int]) -> None:
    """Remove the metric folders in `parent` whose master is gone (killed with SIGKILL, it could not
    remove its own). Only folders owned by `owners` are looked at; a folder whose master runs is
    left alone, and so is one whose owner cannot be told."""
    for name in os.listdir(parent):
        if not name.startswith(FOLDER_PREFIX):
            continue
        path = os.path.join(parent, name)
        try:
            info = os.lstat(path)
        except OSError:
            continue
        if stat.S_ISDIR(info.st_mode) and info.st_uid in owners and _abandoned(name, path):
            shutil.rmtree(path, ignore_errors=True)


def _abandoned(name: str, path: str) -> bool:
    """`pyproxy-metrics-<master pid>-<random>`: abandoned when no pyproxy master has that pid.
    Folders of older versions (`pyproxy-metrics-<random>`) do not name their master: abandoned when
    they hold metric files and none of their writers is alive."""
    import psutil

    stem = name[len(FOLDER_PREFIX):]
    head, dash, _ = stem.partition("-")
    if dash and head.isdigit():
        try:
            title = psutil.Process(int(head)).cmdline()
        except psutil.NoSuchProcess:
            return True
        except psutil.AccessDenied:
            return False
        return not (title and title[0].startswith("pyproxy: master process"))
    writers = [_writer_pid(entry) for entry in os.listdir(path)]
    pids = [pid for pid in writers if pid is not None]
    return bool(pids) and not any(psutil.pid_exists(pid) for pid in pids)


def _writer_pid(name: str) -> int | None:
    """The pid in a metric file's name (`counter_1234.db`), None for anything else."""
    if not name.endswith(".db"):
        return None
    ident = name[:-3].rpartition("_")[2]
    return int(ident) if ident.isdigit() else None


def fold_dead_files(path: str, alive: Callable[[int], bool]) -> int:
    """Fold the metric files of processes that exited into the archive; return how many went.

    What a dead process counted (counters, and histograms and summaries should we have any) is
    added into `<type>_archive.db`, so totals never go backwards across reloads and crashes; its
    gauges are dropped, as prometheus_client's `mark_process_dead` does for live gauges (a gauge
    describes a live process: its open sessions, the health it sees, its generation). Only the
    status process calls this, between two scrapes, so no scrape sees a count in both the archive
    and the dead file. The archive is written aside and renamed into place; a crash between that
    rename and the unlinks would count those files twice, a crash before it changes nothing.
    """
    from prometheus_client.mmap_dict import MmapedDict

    verdicts: dict[int, bool] = {}          # a process has several files: ask once per pid
    dead = []
    for name in os.listdir(path):
        pid = _writer_pid(name)
        if pid is None:
            continue
        if pid not in verdicts:
            verdicts[pid] = alive(pid)
        if not verdicts[pid]:
            dead.append(name)
    sums: dict[str, dict[str, float]] = {}
    for name in dead:
        kind = name.rpartition("_")[0]
        if kind.startswith("gauge"):
            continue
        totals = sums.setdefault(kind, {})
        for key, count, _, _ in MmapedDict.read_all_values_from_file(os.path.join(path, name)):
            totals[key] = totals.get(key, 0.0) + count
    for kind, totals in sums.items():
        _add_to_archive(path, kind, totals)
    for name in dead:
        try:
            os.unlink(os.path.join(path, name))
        except FileNotFoundError:
            pass
    return len(dead)


def _add_to_archive(path: str, kind: str, totals: dict[str, float]) -> None:
    """Rewrite `<kind>_archive.db` with its counts plus `totals` (by prometheus_client's own keys)."""
    from prometheus_client.mmap_dict import MmapedDict

    archive = os.path.join(path, f"{kind}_{ARCHIVE}.db")
    if os.path.exists(archive):
        for key, count, _, _ in MmapedDict.read_all_values_from_file(archive):
            totals[key] = totals.get(key, 0.0) + count
    staged = archive + ".new"           # not *.db: a scrape never reads a half-written archive
    if os.path.exists(staged):
        os.unlink(staged)               # left by a status process that died while writing it
    new = MmapedDict(staged)
    try:
        for key, count in totals.items():
            new.write_value(key, count, 0.0)
    finally:
        new.close()
    os.replace(staged, archive)
