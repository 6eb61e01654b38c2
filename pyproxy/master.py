"""The master process: config, listening sockets, workers, signals (gunicorn's arbiter, nginx's master).

Signal handlers only queue the signal; the main loop sleeps, dispatches the queued signals by name
(`handle_hup`, `handle_quit`, …), then reaps, kills what must die and keeps the worker count right.
Nothing in the loop blocks for long, so a stop signal is handled within a second whatever else is
going on. A reload is uvicorn's rolling kind, driven step by step from the loop: a short-lived
loader child reads and validates the file, the new generation of workers is started on the same
listening sockets and must report ready before the old generation is told to drain; if it never
does, the old one stays.
"""

from __future__ import annotations

import fcntl
import gc
import math
import os
import pickle
import select
import signal
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from types import FrameType
from typing import TYPE_CHECKING, NoReturn

from setproctitle import setproctitle

from pyproxy import __version__, metrics
from pyproxy.admin import AdminProcess
from pyproxy.config import ConfigError, ConfigSource, YamlFile, load_sources
from pyproxy.config.model import Config
from pyproxy.dns import DnsFollower
from pyproxy.listeners import BindError, ListenerSet, ListenSocket, configured_listens
from pyproxy.log import ErrorLog
from pyproxy.plugins import REGISTRY, load_plugin_module
from pyproxy.shared import SharedState
from pyproxy.status import StatusProcess
from pyproxy.tls.contexts import TLSContexts
from pyproxy.worker import QUIESCED, READY, WORKER_BOOT_ERROR, Worker, find_malloc_trim, worker_main

if TYPE_CHECKING:
    from pyproxy.gateway.cluster import ClusterProcess
    from pyproxy.gateway.source import FileState

READY_TIMEOUT = 15.0          # seconds a new worker has to report ready
QUIESCE_TIMEOUT = 5.0         # seconds a retired worker has to confirm it stopped accepting
KILL_GRACE = 5.0              # after worker_shutdown_timeout (or a SIGTERM), SIGKILL a worker that lingers
RESPAWN_WINDOW = 10.0         # crashes of one slot within this window slow its respawn down
# Seconds between two looks at the gateway manifests' mtimes: a change serves in under a second (a
# look, the coalesced reload, the loader child's translation, the new workers' start).
MANIFEST_POLL = 0.25
SPAWN_RETRY = 1.0             # seconds before starting a worker again after fork() or pipe2() failed
# A ready worker whose heartbeat (a timestamp it stores in shared memory every second) is older than
# this is stopped (SIGSTOP, a debugger) or hung in a loop: it is SIGKILLed and replaced, and its
# slot's listening socket, with what waits in its accept queue, passes to the replacement.
HEARTBEAT_TIMEOUT = 10.0
# Generations allowed to drain at once (HAProxy's mworker-max-reloads, counted in generations): the
# oldest beyond it are told to close their sessions now, so a burst of reloads under long sessions
# cannot pile up processes and memory.
DRAINING_GENERATIONS = 3
SIGNAL_NAMES = {getattr(signal, f"SIG{name}"): name.lower()
                for name in ("HUP", "QUIT", "INT", "TERM", "USR1", "CHLD")}
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT)


class MasterError(Exception):
    """The master cannot start or must stop; the message is for the operator."""


class SpawnError(MasterError):
    """A worker could not be forked (pipe2() or fork() failed): fatal at startup, retried later
    for a respawn, a failed reload otherwise."""


@dataclass
class WorkerProcess:
    """What the master knows of one forked worker."""

    pid: int
    slot: int
    generation: int
    ready_fd: int
    row: int = -1                    # its row in the shared counters and heartbeats (pyproxy.shared)
    ready: bool = False
    retiring: bool = False           # told to drain (reload or QUIT)
    quiesced: bool = False           # said it stopped accepting, or closed its pipe (it exited)
    terminated: bool = False         # told to close its sessions now (SIGTERM)
    hung: bool = False               # killed for a missing heartbeat; its slot is free at once
    kill_at: float = 0.0             # monotonic deadline for SIGKILL once retiring or terminated
    started: float = field(default_factory=time.monotonic)

    def awaited_byte(self) -> bool:
        """True while the master waits for a byte on its pipe: READY, then QUIESCED once retiring."""
        return not self.quiesced and (not self.ready or self.retiring)


@dataclass
class Reload:
    """A reload in flight. Phases: "loading" (a loader child reads, validates and merges the
    configuration sources, resolves their host names and sends the Config back through a pipe; the
    master follows those names from what it found, pyproxy.dns),
    "booting" (the new generation starts), "quiescing" (the old generation confirms it stopped
    accepting; the reload is then reported complete)."""

    generation: int                  # the number the new generation gets
    loader_pid: int
    result_fd: int                   # the master's end of the loader's pipe; -1 once closed
    result: bytearray = field(default_factory=bytearray)
    loader_status: int | None = None   # its wait status, once reaped
    phase: str = "loading"
    config: Config | None = None
    tls: TLSContexts | None = None
    created: list[ListenSocket] = field(default_factory=list)
    procs: list[WorkerProcess] = field(default_factory=list)
    old: list[WorkerProcess] = field(default_factory=list)
    deadline: float = 0.0


class Master:
    """Owns the configuration, the listening sockets and the worker processes."""

    def __init__(self, config: Config, log: ErrorLog, argv_title: str):
        self.config = config
        self.log = log
        self.title = argv_title
        self.listeners = ListenerSet()
        self.shared = SharedState()      # mapped before any fork: every worker sees the same memory
        self.status = StatusProcess(log)      # /metrics and /status, away from the workers
        self.admin = AdminProcess(log, self.shared.health)   # the Admin API (admin_listen), away from workers
        self.dns = DnsFollower(self.shared.dns, log.log)    # host names re-resolved, for the workers
        # gateway.kubernetes: the API server's watches and Lease (made with the first such config).
        self.cluster: ClusterProcess | None = None
        self.workers: dict[int, WorkerProcess] = {}
        self.generation = 1
        self.signals: list[int] = []
        self.crashes: dict[int, list[float]] = {}
        self.stopping = False
        self.fast_stopping = False
        self.exit_code = 0
        self.pid_written = False
        # Where a reload reads the configuration from: the pyproxy file first (its process settings
        # and entities), then any other source of entities (see pyproxy/config/sources.py).
        self.sources: list[ConfigSource] = [YamlFile(config.path)]
        self.reload: Reload | None = None
        self.reload_wanted: str | None = None    # why the next reload was asked for
        self.reload_requests = 0                  # requests that the next reload answers
        self.last_reload_at = -math.inf
        self.spawn_retry_at = 0.0
        # The gateway manifests as last seen (paths, manifest_state): polled every MANIFEST_POLL.
        self.manifests = self._manifests_now(config)
        self.manifests_checked_at = time.monotonic()

    # -- startup ------------------------------------------------------------------------------
    def load_tls(self, config: Config, previous: TLSContexts | None) -> TLSContexts:
        """The SSL contexts for a generation, read as the master's user (keys may be root-only);
        those of `previous` whose files and settings are unchanged are reused."""
        try:
            tls = TLSContexts(config, previous)
        except (OSError, ValueError) as exc:      # ssl.SSLError is an OSError
            raise MasterError(f"cannot load the TLS certificates and keys: {exc}") from None
        self.log.debug(f"reused {tls.reused} TLS contexts, built {tls.built}")
        return tls

    def bind(self) -> None:
        """Create every listening socket (before daemonizing, so bind errors reach the terminal)."""
        self.tls = self.load_tls(self.config, None)
        try:
            self.listeners.ensure(configured_listens(self.config), self.config.worker_processes)
        except BindError as exc:
            raise MasterError(str(exc)) from None

    def start(self) -> None:
        setproctitle(f"pyproxy: master process {self.title}")
        self.write_pid()
        self._install_signals()
        self.log.notice(f"pyproxy/{__version__} master started, configuration {self.config.path}")
        self.status.start(self.config, self.listeners)
        self.admin.follow(self.config)
        self.follow_cluster(self.config)
        # Load ctypes for the workers' heap trim here, once: its pages are then shared with every
        # worker instead of being private to each (1.3 MiB a worker when each loaded its own).
        find_malloc_trim()
        self.dns.follow(self.config.dns, dict(self.config.dns_answers), time.monotonic())
        new = [self.spawn_worker(slot, self.config, self.tls, self.generation)
               for slot in range(self.config.worker_processes)]
        failed = self.wait_ready(new)
        if failed:
            raise MasterError(failed)
        # No address: gateway manifests that open no listener yet.
        listens = ", ".join(str(listen) for listen in self.config.stream_listen) or "no address yet"
        self.log.notice(f"ready: {len(new)} worker process(es) listening on {listens}")

    def _install_signals(self) -> None:
        r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.wakeup_r, self.wakeup_w = r, w
        signal.set_wakeup_fd(w, warn_on_full_buffer=False)
        for sig in SIGNAL_NAMES:
            signal.signal(sig, self._queue_signal)
        signal.signal(signal.SIGPIPE, signal.SIG_IGN)

    def _queue_signal(self, signum: int, frame: FrameType | None) -> None:
        # Each signal is queued once: a burst of HUPs is one reload request anyway, and a queue
        # of six distinct signals can never be full when a TERM arrives.
        if signum not in self.signals:
            self.signals.append(signum)

    # -- pid file -----------------------------------------------------------------------------
    def write_pid(self) -> None:
        path = self.config.pid
        if path is None:
            return
        other = read_pid(path)
        if other and other != os.getpid() and process_alive(other):
            raise MasterError(f'pyproxy is already running (pid {other}, pid file "{path}")')
        tmp = f"{path}.{os.getpid()}.tmp"
        try:
            with open(tmp, "w") as fh:
                fh.write(f"{os.getpid()}\n")
            os.replace(tmp, path)
        except OSError as exc:
            raise MasterError(f'cannot write pid file "{path}": {exc.strerror}') from None
        self.pid_written = True

    def remove_pid(self) -> None:
        if self.pid_written and self.config.pid and read_pid(self.config.pid) == os.getpid():
            try:
                os.unlink(self.config.pid)
            except OSError:
                pass

    # -- children -----------------------------------------------------------------------------
    def fork_child(self) -> int:
        """os.fork() with the master's signals blocked until the child has its own handlers.

        A child starts with the master's Python handlers: a signal that reached it before it
        installed its own (a stop sent to the whole process group) would be queued in the child's
        copy of the master's queue, where nobody reads it. Blocked, it waits, pending, until the
        child unblocks (Worker.take_signals, _run_loader)."""
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, SIGNAL_NAMES)
        try:
            pid = os.fork()
        except OSError:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)
            raise
        if pid == 0:
            self._close_master_fds()
        else:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)
        return pid

    def _close_master_fds(self) -> None:
        """In a fresh child: close what only the master may hold (the listening sockets stay: a
        worker closes the ones it does not serve, a loader child never touches them)."""
        for other in self.workers.values():
            os.close(other.ready_fd)
        if self.reload is not None and self.reload.result_fd >= 0:
            os.close(self.reload.result_fd)
        os.close(self.wakeup_r)
        os.close(self.wakeup_w)
        signal.set_wakeup_fd(-1)
        self.dns.close()

    def spawn_worker(self, slot: int, config: Config, tls: TLSContexts, generation: int) -> WorkerProcess:
        """Fork a worker for `slot`; raises SpawnError (and leaks nothing) if the system refuses."""
        sockets = self.listeners.for_slot(configured_listens(config), slot, config.worker_processes)
        try:
            ready_r, ready_w = os.pipe2(os.O_CLOEXEC)
        except OSError as exc:
            raise SpawnError(f"cannot start worker process #{slot}: pipe2() failed "
                             f"({exc.errno}: {exc.strerror})") from None
        row = self.shared.take_row()
        self.shared.beats.beat(row, time.monotonic())    # its first beat comes when it is ready
        worker = Worker(slot, generation, config, sockets, self.log, self.shared, row, tls)
        tls.install()
        try:
            pid = self.fork_child()
        except OSError as exc:
            os.close(ready_r)
            os.close(ready_w)
            self.shared.release_row(row)
            raise SpawnError(f"cannot start worker process #{slot}: fork() failed "
                             f"({exc.errno}: {exc.strerror})") from None
        if pid == 0:
            # The child: keep only our slot's listening sockets and our end of the ready pipe.
            os.close(ready_r)
            mine = {ls.fd for ls in sockets}
            for ls in self.listeners.all():
                if ls.fd not in mine:
                    ls.sock.close()
            worker_main(worker, ready_w)
        os.close(ready_w)
        proc = WorkerProcess(pid, slot, generation, ready_r, row)
        self.workers[pid] = proc
        self.log.notice(f"start worker process {pid} (#{slot}, generation {generation})")
        return proc

    def wait_ready(self, procs: list[WorkerProcess]) -> str | None:
        """At startup: wait until every process in `procs` reported ready; return why not, or None."""
        deadline = time.monotonic() + READY_TIMEOUT
        waiting = {p.ready_fd: p for p in procs}
        while waiting:
            timeout = deadline - time.monotonic()
            if timeout <= 0:
                return _not_ready(list(waiting.values()))
            readable, _, _ = _select(list(waiting), min(timeout, 0.5))
            for fd in readable:
                proc = waiting.pop(fd)
                if os.read(fd, 1) == READY:
                    proc.ready = True
                else:
                    return self._boot_failure(proc)
            for proc in list(waiting.values()):
                if self._reap_one(proc):
                    waiting.pop(proc.ready_fd, None)
                    return self._boot_failure(proc)
        return None

    def _boot_failure(self, proc: WorkerProcess) -> str:
        self._reap_one(proc, block=True)
        return (f"worker process #{proc.slot} (pid {proc.pid}) could not start; "
                f"see the error log above for why")

    def _reap_one(self, proc: WorkerProcess, block: bool = False) -> bool:
        """Collect one specific worker if it exited; True when it did."""
        try:
            pid, _ = os.waitpid(proc.pid, 0 if block else os.WNOHANG)
        except ChildProcessError:
            pid = proc.pid
        if pid:
            self._forget(proc)
            return True
        return False

    def _forget(self, proc: WorkerProcess) -> None:
        if self.workers.pop(proc.pid, None) is not None:
            self.shared.release_row(proc.row)   # its sessions died with it: stop counting them
            try:
                os.close(proc.ready_fd)
            except OSError:
                pass

    def current_workers(self) -> list[WorkerProcess]:
        """The workers serving the current generation's slots."""
        return [p for p in self.workers.values()
                if p.generation == self.generation and not p.retiring and not p.hung]

    def signal_workers(self, sig: int, procs: Iterable[WorkerProcess] | None = None) -> None:
        for proc in list(self.workers.values() if procs is None else procs):
            try:
                os.kill(proc.pid, sig)
            except ProcessLookupError:
                pass

    def retire(self, procs: list[WorkerProcess], timeout: float) -> None:
        """Tell workers to stop accepting and finish their sessions; SIGKILL them if they linger."""
        deadline = time.monotonic() + timeout + KILL_GRACE
        for proc in procs:
            proc.retiring = True
            proc.kill_at = deadline
        self.signal_workers(signal.SIGQUIT, procs)

    def terminate(self, procs: list[WorkerProcess]) -> None:
        """Tell workers to close their sessions and exit now (SIGTERM); SIGKILL them after KILL_GRACE."""
        deadline = time.monotonic() + KILL_GRACE
        for proc in procs:
            proc.retiring = proc.terminated = True
            proc.kill_at = min(proc.kill_at or deadline, deadline)
        self.signal_workers(signal.SIGTERM, procs)

    # -- main loop ----------------------------------------------------------------------------
    def run(self) -> int:
        """Serve until stopped; returns the process exit code."""
        try:
            try:
                self.start()
            except MasterError as exc:
                self.fail(exc)
            while not (self.stopping and not self.workers):
                try:
                    self.sleep()
                    # Queued signals first: a stop sent to the whole process group also made the
                    # workers exit, and reaping them before it would respawn them.
                    self.dispatch_signals()
                    self.reap_workers()
                    self.murder_workers()
                    self.watch_manifests()
                    self.advance_reload()
                    self.manage_workers()
                    self.status.manage()
                    self.admin.manage()
                    if self.cluster is not None:
                        self.cluster.manage()
                except MasterError as exc:
                    self.fail(exc)
            self.log.notice("exit")
            return self.exit_code
        finally:
            self.listeners.close()
            self.remove_pid()
            self.status.stop()
            self.admin.stop()
            self.dns.close()
            if self.cluster is not None:
                self.cluster.stop()

    def fail(self, exc: MasterError) -> None:
        """Stop because the master cannot go on (a worker that cannot boot, a failed startup)."""
        self.log.crit(str(exc))
        self.exit_code = 1
        self._stop_fast()

    def sleep(self) -> None:
        """Wait for a signal (via the wakeup pipe), a worker's byte or the loader's result."""
        by_fd = {p.ready_fd: p for p in self.workers.values() if p.awaited_byte()}
        fds = [self.wakeup_r, *by_fd]
        reload = self.reload
        if reload is not None and reload.result_fd >= 0:
            fds.append(reload.result_fd)
        dns_fds = self.dns.fds()
        readable, _, _ = _select(fds + dns_fds, self._sleep_timeout())
        for fd in readable:
            if fd == self.wakeup_r:
                _drain(fd)
            elif fd in by_fd:
                self._read_worker_byte(by_fd[fd])
            elif fd in dns_fds:
                self.dns.readable(fd)
            elif reload is not None:        # the one other fd: the loader's pipe
                self._read_loader_result(reload)
        self.dns.tick(time.monotonic())

    def _sleep_timeout(self) -> float:
        """At most a second (heartbeats and kill deadlines are checked once a second), less when
        a coalesced reload, a reload deadline or a look at the gateway manifests is due sooner."""
        now = time.monotonic()
        due = [now + 1.0]
        if self.config.gateway is not None:
            due.append(self.manifests_checked_at + MANIFEST_POLL)
        dns_due = self.dns.due()
        if dns_due is not None:
            due.append(dns_due)
        if self.reload is not None and self.reload.deadline:
            due.append(self.reload.deadline)
        elif self.reload is None and self.reload_wanted is not None:
            due.append(self.last_reload_at + self.config.reload_coalesce)
        return max(min(due) - now, 0.0)

    def _read_worker_byte(self, proc: WorkerProcess) -> None:
        try:
            byte = os.read(proc.ready_fd, 1)
        except OSError:
            byte = b""
        if byte == READY:
            proc.ready = True
        elif byte == QUIESCED or not byte:
            proc.quiesced = True        # b"": the worker exited (reaping tells how)

    def dispatch_signals(self) -> None:
        """Handle the queued signals, stops first (a reap triggered by CHLD must see `stopping`)."""
        while self.signals:
            pending, self.signals = self.signals, []
            pending.sort(key=lambda signum: signum not in STOP_SIGNALS)
            for signum in pending:
                getattr(self, f"handle_{SIGNAL_NAMES[signum]}")()

    def reap_workers(self) -> None:
        """Collect exited children; a current-generation worker that died is replaced by manage_workers."""
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            if self.reload is not None and pid == self.reload.loader_pid:
                self.reload.loader_status = status
                continue
            proc = self.workers.get(pid)
            if proc is None:
                self.status.reaped(pid, status)
                self.admin.reaped(pid, status)
                if self.cluster is not None:
                    self.cluster.reaped(pid, status)
                continue
            self._forget(proc)
            how = describe_exit(status)
            if proc.retiring or proc.hung or self.stopping:
                self.log.notice(f"worker process {pid} (#{proc.slot}, generation {proc.generation}) {how}")
                continue
            if (self.reload is not None and self.reload.phase == "booting"
                    and proc.generation == self.reload.generation):
                self.reload_failed(f"worker process #{proc.slot} (pid {pid}) could not start ({how}); "
                                   f"see the error log above for why")
                continue
            if os.waitstatus_to_exitcode(status) == WORKER_BOOT_ERROR or not proc.ready:
                raise MasterError(f"worker process #{proc.slot} (pid {pid}) could not start ({how}); "
                                  f"stopping instead of respawning it")
            self.log.error(f"worker process {pid} (#{proc.slot}) {how} unexpectedly; starting a new one")
            self.crashes.setdefault(proc.slot, []).append(time.monotonic())

    def murder_workers(self) -> None:
        """SIGKILL workers past their stop deadline, and ready workers whose heartbeat stopped
        (gunicorn's murder_workers): a stopped or hung worker would otherwise keep its share of
        new connections waiting in its accept queue forever."""
        now = time.monotonic()
        for proc in list(self.workers.values()):
            if proc.kill_at and now >= proc.kill_at:
                why = "a SIGTERM" if proc.terminated else "worker_shutdown_timeout"
                self.log.warn(f"worker process {proc.pid} (#{proc.slot}) still running {KILL_GRACE:g}s "
                              f"after {why}, killing it")
                self.signal_workers(signal.SIGKILL, [proc])
                proc.kill_at = 0.0
            elif proc.ready and not proc.hung and proc.row >= 0:
                silent = self.shared.beats.age(proc.row, now)
                if silent > HEARTBEAT_TIMEOUT:
                    self._kill_hung(proc, silent)

    def _kill_hung(self, proc: WorkerProcess, silent: float) -> None:
        current = not proc.retiring and proc.generation == self.generation
        then = "; a new worker takes its slot" if current and not self.stopping else ""
        self.log.error(f"worker process {proc.pid} (#{proc.slot}, generation {proc.generation}) sent no "
                       f"heartbeat for {silent:.1f}s (stopped or hung), killing it{then}")
        proc.hung = True
        self.signal_workers(signal.SIGKILL, [proc])

    def manage_workers(self) -> None:
        """Start a worker for every slot of the current generation that has none."""
        now = time.monotonic()
        if self.stopping or now < self.spawn_retry_at:
            return
        taken = {p.slot for p in self.current_workers()}
        for slot in range(self.config.worker_processes):
            if slot in taken:
                continue
            recent = [t for t in self.crashes.get(slot, []) if now - t < RESPAWN_WINDOW]
            self.crashes[slot] = recent
            # A slot that keeps crashing is respawned at most once a second, never in a tight loop.
            if len(recent) > 3 and now - recent[-1] < 1.0:
                continue
            try:
                self.spawn_worker(slot, self.config, self.tls, self.generation)
            except SpawnError as exc:
                self.log.error(f"{exc}; trying again in {SPAWN_RETRY:g}s")
                self.spawn_retry_at = now + SPAWN_RETRY
                return

    # -- reloads ------------------------------------------------------------------------------
    def request_reload(self, reason: str) -> None:
        """Ask for a reload: SIGHUP today; a file watcher or the Admin API can ask the same way.

        Requests coalesce: one reload is in flight at a time, and requests made meanwhile become
        one more reload after it, which reads the file as it is then (the last request wins). A
        reload starts at most once per `reload_coalesce` (of the configuration being served)."""
        if self.stopping:
            return
        self.reload_wanted = reason
        self.reload_requests += 1

    def watch_manifests(self) -> None:
        """Every MANIFEST_POLL, when the served configuration has a `gateway` key: a manifest file
        changed, added or removed asks for a reload (the loader child translates them, not the master).

        Polled rather than watched with inotify: a stat() of each file costs microseconds (four
        looks a second at 1,000 files cost the master about 0.5% of a core), and it sees folders and
        files alike, even replaced through a symlink as Kubernetes updates a mounted ConfigMap, or on
        filesystems inotify does not cover. A reload that fails on what it read keeps
        the old configuration and is not retried until the manifests change again."""
        now = time.monotonic()
        if self.config.gateway is None or now < self.manifests_checked_at + MANIFEST_POLL:
            return
        self.manifests_checked_at = now
        seen, self.manifests = self.manifests, self._manifests_now(self.config)
        if seen[0] != self.manifests[0]:
            return          # a reload changed the paths: what it read is the new starting point
        changed = sorted({path for path, _, _ in set(seen[1]) ^ set(self.manifests[1])},
                         key=lambda path: path in self.manifests[0])     # a file before its folder
        if changed:
            self.request_reload(f"gateway manifests changed: {changed[0]}")

    def follow_cluster(self, config: Config) -> None:
        """At start and after each reload that succeeded: the gateway cluster process runs while the
        configuration has `gateway.kubernetes`. Its module is imported only then: the workers are
        forked from the master, which need not carry it otherwise."""
        if self.cluster is None:
            if config.gateway is None or config.gateway.kubernetes is None:
                return
            from pyproxy.gateway.cluster import ClusterProcess
            self.cluster = ClusterProcess(self.log)
        self.cluster.follow(config, self.status.directory)

    @staticmethod
    def _manifests_now(config: Config) -> tuple[tuple[str, ...], tuple[FileState, ...]]:
        if config.gateway is None:
            return (), ()
        # Imported only with a `gateway` key: the workers are forked from the master, which need not
        # carry the Gateway API's modules otherwise.
        from pyproxy.gateway.source import manifest_state
        return config.gateway.paths, manifest_state(config.gateway.paths)

    def advance_reload(self) -> None:
        """Start the reload that was asked for once it is due, or move the one in flight on."""
        reload = self.reload
        if self.stopping:
            return
        if reload is None:
            if (self.reload_wanted is not None
                    and time.monotonic() >= self.last_reload_at + self.config.reload_coalesce):
                self.start_reload()
        elif reload.phase == "loading":
            if reload.result_fd < 0:
                self.boot_generation(reload)
        elif reload.phase == "booting":
            if all(p.ready for p in reload.procs):
                self.switch_generation(reload)
            elif time.monotonic() >= reload.deadline:
                self.reload_failed(_not_ready([p for p in reload.procs if not p.ready]))
        elif reload.phase == "quiescing":
            self.finish_reload(reload)

    def start_reload(self) -> None:
        """Fork the loader child: reading a large file takes seconds, which the master spends
        reaping, answering signals and replacing workers instead."""
        why = self.reload_wanted
        assert why is not None, "a reload starts only when one was asked for"
        if self.reload_requests > 1:
            why += f"; {self.reload_requests} requests coalesced into one reload"
        self.reload_wanted, self.reload_requests = None, 0
        self.last_reload_at = time.monotonic()
        self.log.notice(f"reloading configuration ({why})")
        try:
            result_r, result_w = os.pipe2(os.O_CLOEXEC)
        except OSError as exc:
            self.reload_failed(f"cannot start the configuration loader: pipe2() failed "
                               f"({exc.errno}: {exc.strerror})")
            return
        # Targets' weights the Admin API told the workers are in its state file, which the loader reads
        # after this: the new generation has them from there, not from what a later change replaced.
        self.shared.health.forget_weights(self.shared.health.admin_version())
        try:
            pid = self.fork_child()
        except OSError as exc:
            os.close(result_r)
            os.close(result_w)
            self.reload_failed(f"cannot start the configuration loader: fork() failed "
                               f"({exc.errno}: {exc.strerror})")
            return
        if pid == 0:
            os.close(result_r)
            for ls in self.listeners.all():
                ls.sock.close()
            _run_loader(self.sources, result_w, self.log)
        os.close(result_w)
        os.set_blocking(result_r, False)
        try:
            fcntl.fcntl(result_r, fcntl.F_SETPIPE_SZ, 1 << 20)    # fewer wakeups for a large Config
        except OSError:
            pass
        self.reload = Reload(self.generation + 1, pid, result_r)

    def _read_loader_result(self, reload: Reload) -> None:
        """Take what the loader wrote so far; its end of the pipe closing means it is done."""
        try:
            while chunk := os.read(reload.result_fd, 1 << 20):
                reload.result += chunk
        except BlockingIOError:
            return
        except OSError:
            pass
        os.close(reload.result_fd)
        reload.result_fd = -1

    def boot_generation(self, reload: Reload) -> None:
        """The loader is done: on a valid Config, bind what is new and fork the new generation."""
        if reload.loader_status is None:
            try:
                _, reload.loader_status = os.waitpid(reload.loader_pid, 0)   # it closed the pipe: exiting
            except ChildProcessError:
                reload.loader_status = 0
        try:
            kind, value = pickle.loads(reload.result)
        except Exception:           # nothing, or a truncated result: the loader died on the way
            self.reload_failed(f"the configuration loader process {describe_exit(reload.loader_status)} "
                               f"without a result")
            return
        if kind == "invalid":
            for issue in value:
                self.log.error(issue)
            self.reload_failed("the configuration is invalid")
            return
        if kind != "ok":
            self.reload_failed(value)
            return
        try:
            reload.config = config = with_plugin_types(value)
            reload.tls = self.load_tls(config, self.tls)
            self.dns.follow(config.dns, dict(config.dns_answers), time.monotonic())
            reload.created = self.listeners.ensure(configured_listens(config), config.worker_processes)
            for slot in range(config.worker_processes):
                reload.procs.append(self.spawn_worker(slot, config, reload.tls, reload.generation))
        except (MasterError, BindError) as exc:
            self.reload_failed(str(exc))
            return
        reload.phase = "booting"
        reload.deadline = time.monotonic() + READY_TIMEOUT

    def switch_generation(self, reload: Reload) -> None:
        """The new generation is ready: it becomes the current one, the old one drains."""
        old = [p for p in self.workers.values()
               if not p.retiring and not p.hung and p.generation != reload.generation]
        config, tls = reload.config, reload.tls
        assert config is not None and tls is not None, "a generation boots from a loaded configuration"
        self.generation = reload.generation
        self.retire(old, self.config.worker_shutdown_timeout)
        self.bound_draining()
        self.listeners.close_unused(configured_listens(config))
        self.log.configure(config.error_log, config.log_level)
        self.config, self.tls = config, tls
        self.dns.keep_only(config.dns_answers)
        self.status.follow(config, self.listeners)
        self.admin.follow(config)
        self.follow_cluster(config)
        reload.old, reload.phase = old, "quiescing"
        reload.deadline = time.monotonic() + QUIESCE_TIMEOUT

    def bound_draining(self) -> None:
        """Keep at most DRAINING_GENERATIONS generations draining: tell the oldest beyond that to
        close their sessions now."""
        draining = sorted({p.generation for p in self.workers.values() if p.retiring and not p.terminated})
        for generation in draining[:-DRAINING_GENERATIONS]:
            procs = [p for p in self.workers.values()
                     if p.generation == generation and p.retiring and not p.terminated]
            self.log.warn(f"generation {generation} told to close its sessions now ({len(procs)} worker "
                          f"process(es)): more than {DRAINING_GENERATIONS} generations were draining")
            self.terminate(procs)

    def finish_reload(self, reload: Reload) -> None:
        """Report the reload complete once every old worker stopped accepting: from then on every
        new session meets the new configuration."""
        waiting = [p for p in reload.old if p.pid in self.workers and not p.quiesced]
        if waiting and time.monotonic() < reload.deadline:
            return
        for proc in waiting:
            self.log.warn(f"worker process {proc.pid} (#{proc.slot}) did not confirm it stopped accepting")
        self.reload = None
        self._count_reload(True)
        self.log.notice(f"reload complete: generation {self.generation}, {len(reload.procs)} worker "
                        f"process(es), {len(reload.old)} old worker process(es) draining")

    def reload_failed(self, reason: str) -> None:
        """Undo the reload in flight, keep serving the current generation, say why."""
        self._drop_reload()
        self.log.error(f"reload failed: {reason}; still serving generation {self.generation}")
        self._count_reload(False)

    def _drop_reload(self) -> None:
        """Stop the loader, and the new generation: workers not ready yet are killed, ready ones
        drain (they may have accepted sessions already); close the sockets bound for it."""
        reload, self.reload = self.reload, None
        if reload is None or reload.phase == "quiescing":     # switched already: nothing to undo
            return
        if reload.result_fd >= 0:
            os.close(reload.result_fd)
        if reload.loader_status is None:
            try:
                os.kill(reload.loader_pid, signal.SIGKILL)
                os.waitpid(reload.loader_pid, 0)
            except (ProcessLookupError, ChildProcessError):
                pass
        new = [p for p in reload.procs if p.pid in self.workers]
        self.signal_workers(signal.SIGKILL, [p for p in new if not p.ready])
        for proc in new:
            if not proc.ready:
                self._reap_one(proc, block=True)
        ready = [p for p in new if p.ready]
        if ready:                   # booted, so from reload.config
            self.retire(ready, (reload.config or self.config).worker_shutdown_timeout)
        for ls in reload.created:
            self.listeners.sockets.pop((ls.listen.key, ls.slot), None)
            ls.sock.close()

    def _count_reload(self, ok: bool) -> None:
        """Only with status_listen on: otherwise the master would open metric files that every
        worker forked later inherits and never uses (workers must hold no fd they do not own)."""
        if self.config.status_listen is not None:
            metrics.master_reloaded(ok, self.generation)

    # -- signal handlers ----------------------------------------------------------------------
    def handle_chld(self) -> None:
        self.reap_workers()

    def handle_hup(self) -> None:
        self.request_reload("SIGHUP")

    def handle_usr1(self) -> None:
        self.log.reopen()
        self.log.notice("reopening logs (SIGUSR1)")
        for path in (self.config.error_log, self.config.access_log):
            if self.config.user and os.geteuid() == 0 and path not in (None, "stderr", "stdout"):
                import pwd
                entry = pwd.getpwnam(self.config.user)
                try:
                    os.chown(path, entry.pw_uid, -1)   # workers run as `user` and reopen it themselves
                except OSError:
                    pass
        self.signal_workers(signal.SIGUSR1)
        self.status.send(signal.SIGUSR1)
        self.admin.send(signal.SIGUSR1)
        if self.cluster is not None:
            self.cluster.send(signal.SIGUSR1)

    def handle_quit(self) -> None:
        """Graceful stop: workers finish their sessions (up to worker_shutdown_timeout)."""
        if self.stopping:
            return
        self.log.notice("graceful shutdown (SIGQUIT)")
        self._begin_stop()
        self.listeners.close()
        self.retire([p for p in self.workers.values() if not p.retiring], self.config.worker_shutdown_timeout)

    def handle_term(self) -> None:
        self._fast_shutdown("SIGTERM")

    def handle_int(self) -> None:
        self._fast_shutdown("SIGINT")

    def _fast_shutdown(self, name: str) -> None:
        """Sessions are closed now, also after a QUIT (a second, impatient stop escalates)."""
        if self.fast_stopping:
            return
        during = " during the graceful one" if self.stopping else ""
        self.log.notice(f"fast shutdown ({name}{during})")
        self._stop_fast()

    def _stop_fast(self) -> None:
        self._begin_stop()
        self.fast_stopping = True
        self.terminate(list(self.workers.values()))

    def _begin_stop(self) -> None:
        """From now on nothing is respawned and no reload starts; the main loop runs until the
        last worker is reaped."""
        self.stopping = True
        self.reload_wanted = None
        self._drop_reload()


def with_plugin_types(config: Config) -> Config:
    """`config` as the loader child sent it, with its plugin classes: the workers are forked from the
    master, and find the plugins of `plugin_modules` only if the master imported them (afresh, as
    the loader did to validate the file)."""
    types = dict(REGISTRY)
    for name in config.plugin_modules:
        try:
            types.update(load_plugin_module(name, os.path.dirname(config.path)))
        except Exception as exc:     # changed since the loader imported it: as a config error would
            raise MasterError(f"cannot import plugin module {name!r}: {exc.__class__.__name__}: "
                              f"{exc}") from None
    return replace(config, plugin_types=types)


def _not_ready(procs: list[WorkerProcess]) -> str:
    slots = ", ".join(f"#{p.slot}" for p in procs)
    return f"worker process(es) {slots} did not become ready within {READY_TIMEOUT:g}s"


def _run_loader(sources: list[ConfigSource], result_fd: int, log: ErrorLog) -> NoReturn:
    """The loader child's whole life: load and validate the sources, send the outcome back pickled
    (("ok", Config), ("invalid", [issue, …]) or ("error", message)), exit. Warnings are logged here."""
    code = 1
    try:
        setproctitle("pyproxy: configuration loader")
        # What the loader inherits from the master is never its garbage: out of the collector's
        # passes, which would walk (and so copy, page by page) the master's whole heap.
        gc.freeze()
        for sig in (*STOP_SIGNALS, signal.SIGCHLD):
            signal.signal(sig, signal.SIG_DFL)       # a stop for the group ends the loader too
        for sig in (signal.SIGHUP, signal.SIGUSR1):
            signal.signal(sig, signal.SIG_IGN)
        signal.pthread_sigmask(signal.SIG_SETMASK, [])
        outcome: tuple[str, object]
        try:
            # Without its plugin classes: those of plugin_modules come from modules imported for this
            # load alone, which pickle cannot name. The master imports them again (with_plugin_types).
            outcome = ("ok", replace(load_sources(sources, warn=log.warn), plugin_types={}))
        except ConfigError as exc:
            outcome = ("invalid", [str(issue) for issue in exc.errors])
        except Exception as exc:     # a bug: the master must hear of it, not wait
            log.exception("crit", f"internal error while loading {sources[0].name}, please report it", exc)
            outcome = ("error", f"internal error while loading the configuration: {exc!r}")
        view = memoryview(pickle.dumps(outcome, pickle.HIGHEST_PROTOCOL))
        while view:
            view = view[os.write(result_fd, view):]
        code = 0
    except BaseException as exc:
        log.exception("crit", "the configuration loader failed", exc)
    finally:
        os._exit(code)


def describe_exit(status: int) -> str:
    code = os.waitstatus_to_exitcode(status)
    return f"exited with code {code}" if code >= 0 else f"exited on signal {-code}"


def _drain(fd: int) -> None:
    try:
        while os.read(fd, 512):
            pass
    except BlockingIOError:
        pass


def _select(fds: list[int], timeout: float) -> tuple[list[int], list[int], list[int]]:
    try:
        return select.select(fds, [], [], timeout)
    except InterruptedError:
        return [], [], []


def read_pid(path: str) -> int | None:
    try:
        with open(path) as fh:
            return int(fh.read().strip())
    except (OSError, ValueError):
        return None


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def daemonize(log: ErrorLog) -> None:
    """Detach from the terminal (nginx's `daemon on`): fork twice, new session, stdin and stdout to
    /dev/null, stderr to the error log file when there is one (else it stays for a supervisor)."""
    if os.fork():
        os._exit(0)
    os.setsid()
    if os.fork():
        os._exit(0)
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    os.dup2(devnull, 1)
    if log.fd > 2:
        os.dup2(log.fd, 2)      # nginx does the same: stray stderr output lands in the error log
    elif sys.stderr.isatty():
        os.dup2(devnull, 2)     # a log on stderr stays where a supervisor collects it, never on a tty
    os.close(devnull)
