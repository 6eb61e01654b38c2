"""The master process: config, listening sockets, workers, signals (gunicorn's arbiter, nginx's master).

Signal handlers only queue the signal; the main loop dispatches by name (`handle_hup`,
`handle_quit`, …) and otherwise sleeps, reaps and keeps the worker count right. A reload is
uvicorn's rolling kind: the new generation of workers is started on the same listening sockets and
must report ready before the old generation is told to drain; if it never does, the old one stays.
"""

from __future__ import annotations

import errno
import os
import select
import signal
import sys
import time
from dataclasses import dataclass, field

from setproctitle import setproctitle

from pyproxy import __version__
from pyproxy.config import ConfigError, load_config
from pyproxy.config.model import Config
from pyproxy import metrics
from pyproxy.listeners import BindError, ListenerSet, configured_listens
from pyproxy.log import ErrorLog
from pyproxy.shared import SharedState
from pyproxy.status import StatusProcess
from pyproxy.tls.contexts import TLSContexts
from pyproxy.worker import READY, WORKER_BOOT_ERROR, Worker, worker_main

READY_TIMEOUT = 15.0          # seconds a new worker has to report ready
KILL_GRACE = 5.0              # after worker_shutdown_timeout, SIGKILL a worker that still lingers
RESPAWN_WINDOW = 10.0         # crashes of one slot within this window slow its respawn down
SIGNAL_NAMES = {getattr(signal, f"SIG{name}"): name.lower()
                for name in ("HUP", "QUIT", "INT", "TERM", "USR1", "CHLD")}


class MasterError(Exception):
    """The master cannot start or must stop; the message is for the operator."""


@dataclass
class WorkerProcess:
    """What the master knows of one forked worker."""

    pid: int
    slot: int
    generation: int
    ready_fd: int
    row: int = -1                    # its row in the shared counters (pyproxy.shared)
    ready: bool = False
    retiring: bool = False           # told to drain (reload or QUIT)
    kill_at: float = 0.0             # monotonic deadline for SIGKILL once retiring
    started: float = field(default_factory=time.monotonic)


class Master:
    """Owns the configuration, the listening sockets and the worker processes."""

    def __init__(self, config: Config, log: ErrorLog, argv_title: str):
        self.config = config
        self.log = log
        self.title = argv_title
        self.listeners = ListenerSet()
        self.shared = SharedState()      # mapped before any fork: every worker sees the same memory
        self.status = StatusProcess(log)      # /metrics and /status, away from the workers
        self.workers: dict[int, WorkerProcess] = {}
        self.generation = 1
        self.signals: list[int] = []
        self.crashes: dict[int, list[float]] = {}
        self.stopping = False
        self.pid_written = False

    # -- startup ------------------------------------------------------------------------------
    def load_tls(self, config: Config) -> TLSContexts:
        """The SSL contexts for a generation, read as the master's user (keys may be root-only)."""
        try:
            return TLSContexts(config)
        except (OSError, ValueError) as exc:      # ssl.SSLError is an OSError
            raise MasterError(f"cannot load the TLS certificates and keys: {exc}") from None

    def bind(self) -> None:
        """Create every listening socket (before daemonizing, so bind errors reach the terminal)."""
        self.tls = self.load_tls(self.config)
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
        new = [self.spawn_worker(slot, self.config, self.tls) for slot in range(self.config.worker_processes)]
        failed = self.wait_ready(new)
        if failed:
            raise MasterError(failed)
        listens = ", ".join(str(listen) for listen in self.config.stream_listen)
        self.log.notice(f"ready: {len(new)} worker process(es) listening on {listens}")

    def _install_signals(self) -> None:
        r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.wakeup_r, self.wakeup_w = r, w
        signal.set_wakeup_fd(w, warn_on_full_buffer=False)
        for sig in SIGNAL_NAMES:
            signal.signal(sig, self._queue_signal)
        signal.signal(signal.SIGPIPE, signal.SIG_IGN)

    def _queue_signal(self, signum, frame) -> None:
        if len(self.signals) < 32:
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

    # -- workers ------------------------------------------------------------------------------
    def spawn_worker(self, slot: int, config: Config, tls: TLSContexts) -> WorkerProcess:
        sockets = self.listeners.for_slot(configured_listens(config), slot, config.worker_processes)
        ready_r, ready_w = os.pipe2(os.O_CLOEXEC)
        row = self.shared.take_row()
        worker = Worker(slot, self.generation, config, sockets, self.log, self.shared, row, tls)
        pid = os.fork()
        if pid == 0:
            # The child: keep only our slot's listening sockets and our end of the ready pipe.
            os.close(ready_r)
            mine = {ls.fd for ls in sockets}
            for ls in self.listeners.all():
                if ls.fd not in mine:
                    ls.sock.close()
            for other in self.workers.values():
                os.close(other.ready_fd)
            os.close(self.wakeup_r)
            os.close(self.wakeup_w)
            signal.set_wakeup_fd(-1)
            worker_main(worker, ready_w)
        os.close(ready_w)
        proc = WorkerProcess(pid, slot, self.generation, ready_r, row)
        self.workers[pid] = proc
        self.log.notice(f"start worker process {pid} (#{slot}, generation {self.generation})")
        return proc

    def wait_ready(self, procs: list[WorkerProcess]) -> str | None:
        """Wait until every process in `procs` reported ready; return why not, or None."""
        deadline = time.monotonic() + READY_TIMEOUT
        waiting = {p.ready_fd: p for p in procs}
        while waiting:
            timeout = deadline - time.monotonic()
            if timeout <= 0:
                slots = ", ".join(f"#{p.slot}" for p in waiting.values())
                return f"worker process(es) {slots} did not become ready within {READY_TIMEOUT:g}s"
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
        return [p for p in self.workers.values() if not p.retiring]

    def signal_workers(self, sig: int, procs=None) -> None:
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

    def wait_quiesced(self, procs: list[WorkerProcess], timeout: float = 5.0) -> None:
        """Wait until each retiring worker says it stopped accepting (or exited), so that once a
        reload is reported complete, every new session meets the new configuration."""
        waiting = {p.ready_fd: p for p in procs if p.pid in self.workers}
        deadline = time.monotonic() + timeout
        while waiting and time.monotonic() < deadline:
            readable, _, _ = _select(list(waiting), min(0.2, max(deadline - time.monotonic(), 0)))
            for fd in readable:
                proc = waiting.pop(fd)
                try:
                    os.read(fd, 1)           # QUIESCED, or b"" when the worker already exited
                except OSError:
                    pass
        for proc in waiting.values():
            self.log.warn(f"worker process {proc.pid} (#{proc.slot}) did not confirm it stopped accepting")

    # -- main loop ----------------------------------------------------------------------------
    def run(self) -> int:
        """Serve until stopped; returns the process exit code."""
        try:
            self.start()
            while not self.stopping:
                if self.signals:
                    signum = self.signals.pop(0)
                    getattr(self, f"handle_{SIGNAL_NAMES[signum]}")()
                    continue
                self.sleep()
                self.reap_workers()
                self.murder_workers()
                self.manage_workers()
                self.status.manage()
            return 0
        except MasterError as exc:
            self.log.crit(str(exc))
            self.stop_workers(signal.SIGTERM, 5.0)
            return 1
        finally:
            self.listeners.close()
            self.remove_pid()
            self.status.stop()

    def sleep(self) -> None:
        """Wait for a signal (via the wakeup pipe) or a late ready byte, at most one second."""
        fds = [self.wakeup_r] + [p.ready_fd for p in self.workers.values() if not p.ready]
        readable, _, _ = _select(fds, 1.0)
        for fd in readable:
            if fd == self.wakeup_r:
                try:
                    while os.read(fd, 512):
                        pass
                except BlockingIOError:
                    pass
                continue
            for proc in self.workers.values():
                if proc.ready_fd == fd:
                    proc.ready = os.read(fd, 1) == READY or proc.ready

    def reap_workers(self) -> None:
        """Collect exited workers; a current-generation worker that died is replaced by manage_workers."""
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            proc = self.workers.get(pid)
            if proc is None:
                self.status.reaped(pid, status)
                continue
            self._forget(proc)
            code = os.waitstatus_to_exitcode(status)
            how = f"exited with code {code}" if code >= 0 else f"exited on signal {-code}"
            if proc.retiring or self.stopping:
                self.log.notice(f"worker process {pid} (#{proc.slot}, generation {proc.generation}) {how}")
                continue
            if code == WORKER_BOOT_ERROR or not proc.ready:
                raise MasterError(f"worker process #{proc.slot} (pid {pid}) could not start ({how}); "
                                  f"stopping instead of respawning it")
            self.log.error(f"worker process {pid} (#{proc.slot}) {how} unexpectedly; starting a new one")
            self.crashes.setdefault(proc.slot, []).append(time.monotonic())

    def murder_workers(self) -> None:
        """SIGKILL retiring workers that outlived worker_shutdown_timeout plus a grace period."""
        now = time.monotonic()
        for proc in list(self.workers.values()):
            if proc.retiring and proc.kill_at and now >= proc.kill_at:
                self.log.warn(f"worker process {proc.pid} (#{proc.slot}) still running after "
                              f"worker_shutdown_timeout, killing it")
                self.signal_workers(signal.SIGKILL, [proc])
                proc.kill_at = 0.0

    def manage_workers(self) -> None:
        """Start a worker for every slot of the current generation that has none."""
        if self.stopping:
            return
        taken = {p.slot for p in self.current_workers()}
        now = time.monotonic()
        for slot in range(self.config.worker_processes):
            if slot in taken:
                continue
            recent = [t for t in self.crashes.get(slot, []) if now - t < RESPAWN_WINDOW]
            self.crashes[slot] = recent
            # A slot that keeps crashing is respawned at most once a second, never in a tight loop.
            if len(recent) > 3 and now - recent[-1] < 1.0:
                continue
            self.spawn_worker(slot, self.config, self.tls)

    # -- signal handlers ----------------------------------------------------------------------
    def handle_chld(self) -> None:
        self.reap_workers()

    def handle_hup(self) -> None:
        """Reload: validate the new file; on success roll a new worker generation over, else keep all."""
        self.log.notice("reloading configuration (SIGHUP)")
        try:
            config = load_config(self.config.path, warn=self.log.warn)
        except ConfigError as exc:
            for issue in exc.errors:
                self.log.error(str(issue))
            self.log.error(f"reload failed: the configuration is invalid; still serving generation "
                           f"{self.generation}")
            self._count_reload(False)
            return
        try:
            tls = self.load_tls(config)
        except MasterError as exc:
            self.log.error(f"reload failed: {exc}; still serving generation {self.generation}")
            self._count_reload(False)
            return
        try:
            created = self.listeners.ensure(configured_listens(config), config.worker_processes)
        except BindError as exc:
            self.log.error(f"reload failed: {exc}; still serving generation {self.generation}")
            self._count_reload(False)
            return
        old = self.current_workers()
        self.generation += 1
        new = [self.spawn_worker(slot, config, tls) for slot in range(config.worker_processes)]
        failure = self.wait_ready(new)
        if failure:
            self.signal_workers(signal.SIGKILL, [p for p in new if p.pid in self.workers])
            for proc in new:
                if proc.pid in self.workers:
                    self._reap_one(proc, block=True)
            for ls in created:
                self.listeners.sockets.pop((ls.listen.key, ls.slot), None)
                ls.sock.close()
            self.generation -= 1
            self.log.error(f"reload failed: {failure}; still serving generation {self.generation}")
            self._count_reload(False)
            return
        self.retire(old, self.config.worker_shutdown_timeout)
        self.wait_quiesced(old)
        self.listeners.close_unused(configured_listens(config))
        if (config.error_log, config.log_level) != (self.config.error_log, self.config.log_level):
            self.log.configure(config.error_log, config.log_level)
        self.config = config
        self.tls = tls
        self.status.follow(config, self.listeners)
        self._count_reload(True)
        self.log.notice(f"reload complete: generation {self.generation}, {len(new)} worker process(es), "
                        f"{len(old)} old worker process(es) draining")

    def _count_reload(self, ok: bool) -> None:
        """Only with status_listen on: otherwise the master would open metric files that every
        worker forked later inherits and never uses (workers must hold no fd they do not own)."""
        if self.config.status_listen is not None:
            metrics.master_reloaded(ok, self.generation)

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

    def handle_quit(self) -> None:
        """Graceful stop: workers finish their sessions (up to worker_shutdown_timeout)."""
        self.log.notice("graceful shutdown (SIGQUIT)")
        self.stopping = True
        self.listeners.close()
        self.retire(list(self.workers.values()), self.config.worker_shutdown_timeout)
        self.wait_workers(self.config.worker_shutdown_timeout + KILL_GRACE)
        self.log.notice("exit")

    def handle_term(self) -> None:
        self.log.notice("fast shutdown (SIGTERM)")
        self.stop_workers(signal.SIGTERM, KILL_GRACE)
        self.log.notice("exit")

    def handle_int(self) -> None:
        self.log.notice("fast shutdown (SIGINT)")
        self.stop_workers(signal.SIGTERM, KILL_GRACE)
        self.log.notice("exit")

    def stop_workers(self, sig: int, timeout: float) -> None:
        self.stopping = True
        self.signal_workers(sig)
        self.wait_workers(timeout)

    def wait_workers(self, timeout: float) -> None:
        """Reap workers until none is left; SIGKILL whatever remains after `timeout`."""
        deadline = time.monotonic() + timeout
        while self.workers:
            self.reap_workers()
            if not self.workers:
                break
            if time.monotonic() >= deadline:
                self.signal_workers(signal.SIGKILL)
                deadline = time.monotonic() + 5.0
            time.sleep(0.05)


def _select(fds: list[int], timeout: float):
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
