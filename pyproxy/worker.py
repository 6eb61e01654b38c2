"""A worker process: one thread, one event loop, accepting on its slot's listening sockets.

As in gunicorn, `Worker.__init__` runs in the master before the fork and touches nothing of the
process; `init_process` runs in the child. A worker that cannot finish `init_process` exits with
WORKER_BOOT_ERROR so the master stops instead of respawning it forever; after `init_process` it
writes one byte on its ready pipe, which is how the master knows a reload may retire the old workers.
"""

from __future__ import annotations

import _socket
import errno
import gc
import os
import pwd
import signal
import socket
import time
from collections.abc import Callable, Iterable
from types import FrameType
from typing import Any, Literal

from setproctitle import setproctitle

from pyproxy.accesslog import AccessLog
from pyproxy.config.model import STATUS_INTERNAL, STATUS_OVER_LIMIT, Config, Listen, Service
from pyproxy.config.values import congestion_control_refused
from pyproxy.context import WorkerContext
from pyproxy.forward import SCRATCH_SIZE, PipePool
from pyproxy.healthcheck import ActiveChecker, start_active_checks
from pyproxy.listeners import ListenSocket
from pyproxy.log import ErrorLog
from pyproxy.loop import EPOLLIN, Loop
from pyproxy.metrics import WorkerMetrics, load_library
from pyproxy.plugins import PluginChains, PluginContext
from pyproxy.router import Router
from pyproxy.session import ClientAddress, Connection, LingeringClose, Session
from pyproxy.shared import SharedState
from pyproxy.tls.contexts import TLSContexts
from pyproxy.udp import UdpListener, UdpTable
from pyproxy.upstream import Balancer, build_balancers

WORKER_BOOT_ERROR = 3
# Bytes a worker writes on its pipe to the master: ready to serve, and no longer accepting.
READY, QUIESCED = b"R", b"Q"
ACCEPT_BATCH = 64             # connections taken per readiness event of a listening socket
ACCEPT_PAUSE = 0.5            # seconds to stop accepting after EMFILE/ENFILE (nginx: accept_mutex_delay)
LINGER_MAX = 1024             # refused clients read until their FIN at once, per worker
GC_THRESHOLD = 20000          # young-generation allocations between collections (CPython's default: 700)
TRIM_INTERVAL = 5.0           # seconds between checks for an idle worker's free heap to release


def find_malloc_trim() -> None:
    """Look up glibc's malloc_trim once. Workers do it before dropping privileges: `user` may not
    be able to read the interpreter's ctypes module."""
    global _malloc_trim
    if _malloc_trim is None:
        try:
            import ctypes
            _malloc_trim = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _malloc_trim = False


def release_free_heap() -> None:
    """glibc's malloc_trim(0): return free heap pages to the OS. A no-op elsewhere (musl, macOS)."""
    find_malloc_trim()
    if _malloc_trim:
        _malloc_trim(0)


_malloc_trim: Callable[[int], int] | Literal[False] | None = None     # None: not looked up yet


def drop_privileges(user: str | None, log: ErrorLog) -> None:
    """Become `user` (workers only, after the master bound the ports as root)."""
    if user is None or os.geteuid() != 0:
        return
    entry = pwd.getpwnam(user)
    os.setgroups([])
    os.setgid(entry.pw_gid)
    os.setuid(entry.pw_uid)
    log.debug(f"worker runs as user {user} (uid {entry.pw_uid})")


class Worker:
    """One worker slot of one configuration generation."""

    # Set by init_process, in the child.
    loop: Loop
    pool: PipePool
    router: Router
    services: dict[str, Service]
    balancers: dict[str, Balancer]
    scratch: memoryview
    access_log: AccessLog
    plugins: PluginChains
    congestion: dict[str, bytes]
    checkers: list[ActiveChecker]
    trimmed_at: int
    metrics: WorkerMetrics | None
    context: WorkerContext
    udp: UdpTable
    ready_fd: int
    _wakeup: tuple[socket.socket, socket.socket]

    def __init__(self, slot: int, generation: int, config: Config, listeners: list[ListenSocket],
                 log: ErrorLog, shared: SharedState, row: int, tls: TLSContexts):
        self.slot = slot
        self.server_tls = tls.server          # shared by the generation: see TLSContexts
        self.listener_tls = tls.listeners
        self.upstream_tls = tls.upstream
        self.shared = shared
        self.row = row
        self.generation = generation
        self.config = config
        self.listeners = listeners
        self.log = log
        self.master_pid = os.getpid()
        self.sessions: set[Session] = set()
        self.lingering: set[LingeringClose] = set()   # refused clients read until their FIN
        self.serial = 0
        self.draining = False
        self.accepting = False
        self.signals: list[int] = []

    # -- process setup ------------------------------------------------------------------------
    def take_signals(self) -> None:
        """First thing after the fork, while the master keeps its signals blocked for us: install
        this worker's handlers, then unblock. A signal sent to the new process meanwhile (a stop
        sent to the whole process group) waited, pending, for them; it is handled at the first tick."""
        for sig in (signal.SIGQUIT, signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
            signal.signal(sig, self._queue_signal)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)          # the master reloads, not us
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        signal.signal(signal.SIGPIPE, signal.SIG_IGN)
        signal.pthread_sigmask(signal.SIG_SETMASK, [])

    def init_process(self, ready_fd: int) -> None:
        config = self.config
        setproctitle(f"pyproxy: worker process #{self.slot}")
        self.log.slot = self.slot
        # This generation's error_log and log_level: the log object is the master's, copied by the
        # fork, and the master switches its own only once the new generation is ready.
        self.log.configure(config.error_log, config.log_level)
        self._set_sched_policy(config.worker_sched_policy)
        self.loop = Loop()
        self.loop.on_error = self.on_callback_error
        self.pool = PipePool()
        self.router = Router(config.routes, config.stream_listen)
        self.services = {s.name: s for s in config.services}
        self.balancers = build_balancers(config, self.log.log, self.shared.health, self.loop.now,
                                         self.shared.dns, self.shared.conns)
        self.scratch = memoryview(bytearray(SCRATCH_SIZE))
        self.access_log = AccessLog(config.access_log, config.access_log_format)
        self.shared.conns.claim(self.row)
        if self.row < 0 and config.plugins:
            self.log.warn("more worker processes alive than shared-state rows: limit-conn does not "
                          "count this worker's sessions")
        self.plugins = PluginChains(config, PluginContext(self.log.log, self.shared,
                                                          os.path.dirname(config.path)))
        if config.status_listen is not None:
            load_library()          # before the drop: `user` may not be able to read the library
        find_malloc_trim()          # likewise for ctypes
        drop_privileges(config.user, self.log)
        self.congestion = self._usable_congestion(config.services)
        self._install_signals()
        self.checkers = start_active_checks(self.loop, self.balancers, config.upstreams, self.log.log)
        self.trimmed_at = 0
        self.loop.call_later(TRIM_INTERVAL, self._trim_when_idle)
        self.metrics = WorkerMetrics(self) if config.status_listen is not None else None
        if self.metrics is not None:
            self.loop.call_later(1.0, self._sample_metrics)
        # All a session reads of its worker (see pyproxy.context).
        self.context = WorkerContext(
            loop=self.loop, config=config, log=self.log, router=self.router, services=self.services,
            balancers=self.balancers, plugins=self.plugins, server_tls=self.server_tls,
            upstream_tls=self.upstream_tls, congestion=self.congestion, scratch=self.scratch,
            pool=self.pool, metrics=self.metrics, closed=self.session_closed, linger=self.linger,
            reject_credit={})
        self.udp = UdpTable(self.context, self.sessions, self._next_serial)
        self.resume_accepting()
        self.loop.after_tick.append(self.after_tick)
        self.loop.call_later(1.0, self.heartbeat)
        self.ready_fd = ready_fd
        # The cyclic GC scans every tracked object on its older-generation passes; a worker holds
        # thousands of long-lived ones (config, contexts, sessions), and a collection triggered by
        # any small allocation stalls the loop. Startup objects never become garbage: freeze them
        # out of the scan, and collect the young generation less often (sessions break their own
        # cycles: cancelled timers and closed sockets drop their references).
        gc.freeze()
        gc.set_threshold(GC_THRESHOLD, 20, 20)
        self.shared.beats.beat(self.row, time.monotonic())     # the master watches us from now on
        os.write(ready_fd, READY)

    def _set_sched_policy(self, policy: str) -> None:
        """`worker_sched_policy: batch`: SCHED_BATCH for this worker (any user may choose it). A worker
        woken by bytes then waits for the running task's slice or an idle CPU instead of preempting
        the process that produces them. "normal" keeps whatever policy the worker inherited."""
        if policy != "batch":
            return
        try:
            os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))
        except OSError as exc:      # a seccomp filter or an unusual kernel: run on as before
            self.log.warn(f"worker_sched_policy batch cannot be set ({exc.strerror or exc}): "
                          "the worker keeps its scheduling policy")

    def _install_signals(self) -> None:
        """Signals wake the loop through a socketpair (the handlers were installed by take_signals)."""
        r, w = socket.socketpair()
        r.setblocking(False)
        w.setblocking(False)
        self._wakeup = (r, w)
        signal.set_wakeup_fd(w.fileno(), warn_on_full_buffer=False)
        self.loop.add(r.fileno(), EPOLLIN, self._drain_wakeup)
        if self.signals:
            w.send(b"\0")          # queued while we were starting: handle them at the first tick

    def _queue_signal(self, signum: int, frame: FrameType | None) -> None:
        if signum not in self.signals:      # the same signal twice before a tick means it once
            self.signals.append(signum)

    def _drain_wakeup(self, mask: int) -> None:
        try:
            while self._wakeup[0].recv(512):
                pass
        except BlockingIOError:
            pass

    def run(self, ready_fd: int) -> int:
        """The child's whole life: returns the exit code."""
        self.take_signals()
        try:
            self.init_process(ready_fd)
        except OSError as exc:
            where = f' "{exc.filename}"' if exc.filename else ""
            self.log.crit(f"worker process #{self.slot} could not start: {exc.strerror or exc}{where}")
            return WORKER_BOOT_ERROR
        except Exception as exc:   # anything at all: the master must hear "could not boot", not see a hang
            self.log.crit(f"worker process #{self.slot} could not start: {exc!r}")
            return WORKER_BOOT_ERROR
        self.log.debug(f"worker process #{self.slot} started (generation {self.generation})")
        self.loop.run()
        if self.metrics is not None:
            self.metrics.flush()            # what this worker counted outlives it in its file
        self.access_log.close()
        self.plugins.close()
        self.pool.close()
        return 0

    # -- accepting ------------------------------------------------------------------------------
    def resume_accepting(self) -> None:
        if self.draining or self.accepting:
            return
        self.accepting = True
        for ls in self.listeners:
            if ls.listen.udp:
                self.loop.add(ls.fd, EPOLLIN, UdpListener(self.udp, ls.listen, ls.sock).on_readable)
            else:
                self.loop.add(ls.fd, EPOLLIN, self._acceptor(ls))

    def pause_accepting(self) -> None:
        if self.accepting:
            self.accepting = False
            for ls in self.listeners:
                self.loop.remove(ls.fd)

    def _usable_congestion(self, services: Iterable[Service]) -> dict[str, bytes]:
        """Service name -> the `tcp_congestion` to set on its upstream sockets, for the services
        that ask for one this process may use. The configuration check tried each as the master's
        user; a worker that became `user` may be refused one outside the kernel's
        tcp_allowed_congestion_control: it says so once and keeps the host's default."""
        usable: dict[str, bytes] = {}
        for service in services:
            if service.tcp_congestion is None:
                continue
            refused = congestion_control_refused(service.tcp_congestion)
            if refused is not None:
                self.log.warn(f'service "{service.name}": tcp_congestion {service.tcp_congestion} cannot be '
                              f"used by this worker ({refused}); its upstream connections keep the "
                              f"host's default")
                continue
            usable[service.name] = service.tcp_congestion.encode()
        return usable

    def _acceptor(self, ls: ListenSocket) -> Callable[[int], None]:
        """The readiness handler of one listening socket: accept a batch, hand each connection on."""
        # socket.socket's own C-level accept, which typeshed does not list (see below for why).
        accept: Callable[[], tuple[int, Any]] = ls.sock._accept  # type: ignore[attr-defined]
        family = int(ls.listen.family)
        start = self._start_session(ls.listen)

        def on_readable(mask: int) -> None:
            for _ in range(ACCEPT_BATCH):
                try:
                    # socket.accept() wraps the fd in Python: a Python __init__ and enum conversions
                    # of the family and type. The C socket object does all a session needs.
                    fd, addr = accept()
                except BlockingIOError:
                    return
                except OSError as exc:
                    if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                        self._out_of_resources(exc)
                        return
                    continue        # ECONNABORTED and friends: that client gave up, take the next
                conn = _socket.socket(family, socket.SOCK_STREAM, 0, fd)
                conn.setblocking(False)
                start(conn, addr)

        return on_readable

    def _start_session(self, listen: Listen) -> Callable[[_socket.socket, ClientAddress], None]:
        limit = self.config.worker_connections
        server_tls = self.listener_tls.get(listen.key)     # its certificates, if it has ssl

        def start(conn: _socket.socket, addr: ClientAddress) -> None:
            self.serial += 1
            session = Session(self.context, listen, conn, addr, self.serial, server_tls)
            # Full: the UDP session idle longest makes room, if there is one (pyproxy.udp).
            if len(self.sessions) >= limit and not self.udp.make_room():
                session.log("warn", f"{limit} worker_connections are not enough, refusing")
                session.close(STATUS_OVER_LIMIT)
                return
            self.sessions.add(session)
            session.start()

        return start

    def _next_serial(self) -> int:
        """The $connection number of a new UDP session (TCP sessions count in _start_session)."""
        self.serial += 1
        return self.serial

    def _trim_when_idle(self) -> None:
        """Every few seconds: once no session is open and some ran since the last time, give the
        C heap's free memory back to the OS. OpenSSL and socket objects are malloc()ed; after a
        burst of sessions glibc keeps the freed memory, and RSS would stay at the burst's high
        water for the worker's life."""
        if not self.sessions and self.serial != self.trimmed_at:
            self.trimmed_at = self.serial
            release_free_heap()
        if not self.draining:
            self.loop.call_later(TRIM_INTERVAL, self._trim_when_idle)

    def _sample_metrics(self) -> None:
        if self.metrics is None:
            return
        self.metrics.flush()
        if not self.draining:
            self.loop.call_later(1.0, self._sample_metrics)

    def _out_of_resources(self, exc: OSError) -> None:
        """EMFILE/ENFILE: stop accepting for a moment instead of spinning on a ready listener."""
        self.log.error(f"accept() failed ({exc.errno}: {exc.strerror}); pausing accepts for {ACCEPT_PAUSE}s")
        self.pause_accepting()
        self.loop.call_later(ACCEPT_PAUSE, self.resume_accepting)

    # -- sessions -------------------------------------------------------------------------------
    def on_callback_error(self, callback: Callable[..., object], exc: BaseException) -> None:
        """A bug surfaced in a callback: log it with its traceback and end only the session it
        belongs to (status 500); the worker and its other sessions carry on."""
        owner = getattr(callback, "__self__", None)
        where = f"; {owner.describe()}" if isinstance(owner, Session) else ""
        self.log.exception("error", f"internal error, please report it: {exc!r}{where}", exc)
        if isinstance(owner, Session):
            try:
                owner.close(STATUS_INTERNAL)
            except Exception:       # a session too broken to close cleanly: drop our reference
                self.sessions.discard(owner)

    def session_closed(self, session: Session) -> None:
        self.sessions.discard(session)
        self.access_log.write(session)
        if self.metrics is not None:
            self.metrics.session_ended(session)
        for plugin in self.plugins.for_route(session.route):
            plugin.log(session)
        if self.draining and not self.sessions:
            self.loop.stop()

    def linger(self, sock: Connection) -> None:
        """Take a refused client that got our FIN (Session._refuse): read it until its own FIN, up to
        LINGER_MAX at once; past that it is closed at once (a flood gets RSTs, not our fds)."""
        if len(self.lingering) < LINGER_MAX:
            LingeringClose(self.loop, sock, self.scratch, self.lingering)
        else:
            self.loop.forget(sock.fileno())
            sock.close()

    # -- housekeeping ---------------------------------------------------------------------------
    def after_tick(self) -> None:
        self.access_log.flush()
        if self.signals:
            pending, self.signals = self.signals, []
            for signum in pending:
                self.handle_signal(signum)

    def handle_signal(self, signum: int) -> None:
        if signum == signal.SIGQUIT:
            self.start_draining()
        elif signum in (signal.SIGTERM, signal.SIGINT):
            self.stop_now()
        elif signum == signal.SIGUSR1:
            self.log.reopen()
            self.access_log.reopen()
            self.plugins.reopen()

    def start_draining(self) -> None:
        """Graceful stop: close our copies of the listening sockets, finish open sessions, exit."""
        if self.draining:
            return
        self.pause_accepting()
        self.draining = True
        for checker in self.checkers:
            checker.stop()
        for ls in self.listeners:
            # The master (and a successor worker) still hold the socket: no reset. A UDP listener
            # is no longer read but stays open until we exit: the sessions of exchanges (pyproxy.udp)
            # send their replies through it; the others have sockets of their own.
            if not ls.listen.udp:
                ls.sock.close()
        try:
            os.write(self.ready_fd, QUIESCED)   # tell the master: from now on only the new generation accepts
        except OSError:
            pass
        setproctitle(f"pyproxy: worker process #{self.slot} is shutting down")
        if not self.sessions:
            self.loop.stop()
            return
        self.log.notice(f"gracefully shutting down, {len(self.sessions)} open session(s)")
        self.loop.call_later(self.config.worker_shutdown_timeout, self._shutdown_timeout)

    def _shutdown_timeout(self) -> None:
        self.log.notice(f"worker_shutdown_timeout ({self.config.worker_shutdown_timeout:g}s) reached, "
                        f"closing {len(self.sessions)} open session(s)")
        self.stop_now()

    def stop_now(self) -> None:
        for session in list(self.sessions):
            session.close(session.status)
        self.loop.stop()

    def heartbeat(self) -> None:
        """Every second: tell the master we are alive (one store to shared memory; a worker whose
        heartbeat stops is killed and replaced, see pyproxy.master.HEARTBEAT_TIMEOUT), apply what the
        Admin API said of targets (Balancer.administer), and exit if the master is gone (killed with
        SIGKILL): nobody would ever stop us otherwise."""
        self.shared.beats.beat(self.row, self.loop.now)
        for balancer in self.balancers.values():     # what the Admin API said of targets, if new
            balancer.administer(self.loop.now)
        if os.getppid() != self.master_pid:
            self.log.error("master process is gone, exiting")
            self.stop_now()
            return
        self.loop.call_later(1.0, self.heartbeat)


def worker_main(worker: Worker, ready_fd: int) -> None:
    """Entry point in the forked child; never returns. os._exit: the child must not run the
    master's atexit handlers nor flush its copies of the master's buffers, so whatever escaped the
    worker is logged here, or its traceback would be lost with the process."""
    code = 1
    try:
        code = worker.run(ready_fd)
    except KeyboardInterrupt:
        code = 0
    except BaseException as exc:
        worker.log.exception("crit", f"worker process #{worker.slot} failed, please report it: {exc!r}", exc)
    finally:
        os._exit(code)
