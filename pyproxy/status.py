"""The status process: `status_listen` (/metrics, /status, /gateway/status) served away from the workers.

A scrape reads every process's metric file and asks the kernel about every process: milliseconds of
work that, in a worker, stalled every session that worker held. So the master forks one small
process for it, as nginx forks its cache manager: named `pyproxy: status process`, one loop of its
own, the only holder of the status_listen socket, at most MAX_SCRAPES requests at once (the rest
wait in the listen backlog), and niced so that a burst of scrapers yields the CPU to the workers.
It also keeps the metrics folder small: before each scrape, and every few seconds, it folds the
files of processes that exited into an archive (pyproxy.metrics.fold_dead_files).

`StatusProcess` is the master's side: it forks the process, restarts it when it dies, replaces it
when a reload changes status_listen (or the user or error log it runs with) and stops it, and the
metrics folder with it, when the master exits. `StatusServer` is the process itself.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import time
import traceback
from collections.abc import Callable
from functools import partial

from setproctitle import setproctitle

from pyproxy import __version__, metrics
from pyproxy.config.model import Config
from pyproxy.listeners import ListenerSet, ListenSocket
from pyproxy.log import ErrorLog
from pyproxy.loop import EPOLLET, EPOLLIN, STREAM_EVENTS, Loop
from pyproxy.worker import WORKER_BOOT_ERROR, drop_privileges

TITLE = "pyproxy: status process"
MAX_SCRAPES = 32              # requests served at once; more wait in the kernel's accept queue
FOLD_INTERVAL = 5.0           # seconds between folds of dead processes' files without scrapes
NICENESS = 10                 # under full load a scrape waits; a session does not
RESPAWN_DELAY = 1.0           # a status process that keeps dying is restarted after 1 s, then 2 s,
RESPAWN_MAX_DELAY = 60.0      # 4 s… up to once a minute
MASTER_SIGNALS = (signal.SIGHUP, signal.SIGQUIT, signal.SIGINT, signal.SIGTERM, signal.SIGUSR1,
                  signal.SIGCHLD)
GATEWAY_STATUS = "gateway-status.json"   # in the metrics folder: what GET /gateway/status answers
STOP_GRACE = 5.0              # seconds to exit after SIGTERM before the master sends SIGKILL


class StatusProcess:
    """The master's handle on its status process (nothing is forked before `start`). The admin
    process's handle (pyproxy.admin) is one too, for the same life: `reaped`, `send`, `stop`."""

    NAME = "status process"         # in the log

    def __init__(self, log: ErrorLog):
        self.log = log
        self.pid = 0
        self.retired: list[int] = []        # told to stop, not reaped yet
        self.listeners: ListenerSet | None = None
        self.sockets: list[ListenSocket] = []
        self.settings: tuple[object, ...] = ()      # what the running process was started with
        self.user: str | None = None
        self.directory: str | None = None
        self.started = 0.0
        self.delay = 0.0                    # before the next restart after a crash
        self.respawn_at = 0.0
        self.gateway_statuses: dict[str, object] | None = None   # as last written, for their times

    # -- in the master ----------------------------------------------------------------------------
    def start(self, config: Config, listeners: ListenerSet) -> None:
        """Once the master runs and before any worker is forked: the metrics folder (named after the
        master's final pid, after daemonizing; workers find it in their environment), then the
        status process if status_listen is configured."""
        try:
            self.directory = metrics.prepare_directory(config.user)
        except OSError as exc:
            from pyproxy.master import MasterError  # not at the top: pyproxy.master imports us
            where = f' "{exc.filename}"' if exc.filename else ""
            raise MasterError(f"cannot create the metrics folder{where}: {exc.strerror or exc}") from None
        self.follow(config, listeners)

    def follow(self, config: Config, listeners: ListenerSet) -> None:
        """After start and after each reload that succeeded: one status process serves the
        status_listen socket the master holds. A reload that keeps the socket, the user and the
        error log keeps the process (and the scrapes it is answering)."""
        self.listeners = listeners
        self.publish_gateway_status(config)
        sockets = listeners.status_sockets()
        settings = (tuple(ls.sock for ls in sockets), config.user, config.error_log, config.log_level)
        if settings == self.settings:
            return
        self.settings, self.sockets, self.user = settings, sockets, config.user
        if self.pid:
            self.log.notice(f"stop status process {self.pid}: status_listen, user or error_log changed")
        self._retire()
        self.delay = 0.0
        if sockets:
            self._spawn()

    def publish_gateway_status(self, config: Config) -> None:
        """The statuses of the Gateway API objects of the running configuration, for GET
        /gateway/status: written whole beside the metric files and renamed over the last ones, so the
        status process never reads half of them; removed when the configuration has no gateway."""
        if self.directory is None:
            return
        path = os.path.join(self.directory, GATEWAY_STATUS)
        try:
            if config.gateway is None:
                self.gateway_statuses = None
                if os.path.exists(path):
                    os.unlink(path)
                return
            from pyproxy.gateway.source import keep_transition_times, status_list
            statuses = keep_transition_times(status_list(config), self.gateway_statuses)
            staged = f"{path}.new"
            with open(staged, "w") as stream:
                os.fchmod(stream.fileno(), 0o644)   # the status process may run as another user
                json.dump(statuses, stream, indent=2)
            os.replace(staged, path)
            self.gateway_statuses = statuses
        except OSError as exc:
            self.log.error(f'cannot write the gateway statuses "{exc.filename or path}": '
                           f"{exc.strerror or exc}")

    def manage(self) -> None:
        """From the master's loop: start a status process again once one that died may be replaced."""
        if self.sockets and not self.pid and time.monotonic() >= self.respawn_at:
            self._spawn()

    def reaped(self, pid: int, status: int) -> None:
        """The master collected `pid`, which is none of its workers: ours, if anything."""
        if pid in self.retired:
            self.retired.remove(pid)
            return
        if pid != self.pid:
            return
        self.pid = 0
        code = os.waitstatus_to_exitcode(status)
        how = f"exited with code {code}" if code >= 0 else f"exited on signal {-code}"
        now = time.monotonic()
        if now - self.started > RESPAWN_MAX_DELAY:
            self.delay = 0.0                    # it served a good while: no crash loop, start at once
        self.respawn_at = now + self.delay
        self.delay = min(max(self.delay * 2, RESPAWN_DELAY), RESPAWN_MAX_DELAY)
        if code == 0:       # told to stop (a Ctrl-C reaches the whole process group) or master gone
            self.log.notice(f"{self.NAME} {pid} {how}")
        else:
            self.log.error(f"{self.NAME} {pid} {how} unexpectedly; starting a new one")

    def send(self, sig: int) -> None:
        """Pass a signal on (SIGUSR1: reopen the error log)."""
        if self.pid:
            _kill(self.pid, sig)

    def stop(self) -> None:
        """When the master exits: the status process exits with it, the metrics folder goes."""
        self.sockets = []
        self._retire()
        deadline = time.monotonic() + STOP_GRACE
        while self._reap_retired():
            if time.monotonic() >= deadline:
                for pid in self.retired:
                    _kill(pid, signal.SIGKILL)
                deadline = time.monotonic() + STOP_GRACE
            time.sleep(0.01)
        if self.directory is not None:
            metrics.remove_directory(self.directory)

    def _reap_retired(self) -> bool:
        """Collect the retired processes that exited; True while some still run."""
        for pid in list(self.retired):
            try:
                done = os.waitpid(pid, os.WNOHANG)[0]
            except ChildProcessError:       # the master's reap_workers collected it already
                done = pid
            if done:
                self.retired.remove(pid)
        return bool(self.retired)

    def _retire(self) -> None:
        if self.pid:
            _kill(self.pid, signal.SIGTERM)
            self.retired.append(self.pid)
            self.pid = 0

    def _spawn(self) -> None:
        def serve(master_pid: int) -> int:
            self._close_what_the_master_holds()
            assert self.directory is not None, "start() made the metrics folder before any spawn"
            return StatusServer(self.log, self.sockets, master_pid, self.user, self.directory).run()

        if pid := self._fork(serve):
            where = ", ".join(str(ls.listen) for ls in self.sockets)
            self.log.notice(f"start status process {pid} on {where}")

    def _fork(self, run: Callable[[int], int]) -> int:
        """Fork this helper process, which runs `run(master pid)` and exits with what it returns;
        its pid, or 0 when fork() failed (logged; `manage` tries again after RESPAWN_DELAY). The
        admin and the gateway cluster processes are forked the same way."""
        master_pid = os.getpid()
        # As for workers (Master.fork_child): the master's signals stay blocked in the child until
        # it has its own handlers, so a stop sent to the whole process group is not lost.
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, MASTER_SIGNALS)
        try:
            pid = os.fork()
        except OSError as exc:          # out of processes or memory: the master tries again later
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)
            self.respawn_at = time.monotonic() + RESPAWN_DELAY
            self.log.error(f"cannot start the {self.NAME}: fork() failed ({exc.strerror}); "
                           f"trying again in {RESPAWN_DELAY:g}s")
            return 0
        if pid == 0:
            code = 1
            try:
                code = run(master_pid)
            finally:
                os._exit(code)
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
        self.pid = pid
        self.started = time.monotonic()
        return pid

    def _close_what_the_master_holds(self) -> None:
        """In the fresh child: keep the status sockets and the error log, close every other fd.
        The stream listeners must go (a SO_REUSEPORT socket that nobody accepts on would hold the
        connections the kernel hands it); so must the workers' pipes and the master's wakeup pipe.
        The sweep, rather than a list, also covers whatever fd the master opens in the future. The
        Python objects that owned the swept fds are the master's and are never used here."""
        signal.set_wakeup_fd(-1)
        keep = {ls.fd for ls in self.sockets}
        for ls in self.listeners.all() if self.listeners is not None else ():
            if ls.fd not in keep:
                ls.sock.close()
        keep |= {0, 1, 2, self.log.fd}
        low = 3
        for fd in sorted(keep):
            if fd >= low:
                os.closerange(low, fd)
                low = fd + 1
        os.closerange(low, os.sysconf("SC_OPEN_MAX"))


def _kill(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


class StatusServer:
    """The status process: accepts on the status_listen socket and answers one request per connection.
    The admin process (pyproxy.admin) is one too, for its start, signals and master check."""

    NAME = "status process"         # in the log

    def __init__(self, log: ErrorLog, sockets: list[ListenSocket], master_pid: int, user: str | None,
                 directory: str):
        self.log = log
        self.sockets = sockets
        self.master_pid = master_pid
        self.user = user
        self.directory = directory
        self.sessions: set[HttpConnection] = set()
        self.backlogged = False             # connections may wait that no edge will announce again
        self.signals: list[int] = []

    def run(self) -> int:
        """The child's whole life: returns the exit code."""
        try:
            self.init_process()
        except OSError as exc:
            where = f' "{exc.filename}"' if exc.filename else ""
            self.log.crit(f"{self.NAME} could not start: {exc.strerror or exc}{where}")
            return WORKER_BOOT_ERROR
        except Exception as exc:
            self.log.crit(f"{self.NAME} could not start: {exc!r}")
            return WORKER_BOOT_ERROR
        self.loop.run()
        return 0

    def init_process(self) -> None:
        setproctitle(TITLE)
        metrics.load_library(scrapes=True)      # before the privilege drop: see load_library
        os.nice(NICENESS)
        self.loop = Loop()
        self.loop.on_error = self.on_callback_error
        drop_privileges(self.user, self.log)
        self._install_signals()
        self.listen()
        self.loop.call_later(1.0, self.check_master)
        self.loop.call_later(FOLD_INTERVAL, self.fold_periodically)

    def _install_signals(self) -> None:
        """Handlers only note the signal; the wakeup pipe makes the loop handle it on its next tick
        (a handler that acted at once could interrupt a fold halfway)."""
        r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.wakeup = r
        signal.set_wakeup_fd(w, warn_on_full_buffer=False)
        self.loop.add(r, EPOLLIN, self._handle_signals)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGUSR1):
            signal.signal(sig, lambda signum, frame: self.signals.append(signum))
        signal.signal(signal.SIGHUP, signal.SIG_IGN)            # the master reloads, not us
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        signal.signal(signal.SIGPIPE, signal.SIG_IGN)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, MASTER_SIGNALS)   # blocked by StatusProcess._spawn

    def _handle_signals(self, mask: int) -> None:
        try:
            while os.read(self.wakeup, 512):
                pass
        except BlockingIOError:
            pass
        pending, self.signals = self.signals, []
        for signum in pending:
            if signum == signal.SIGUSR1:
                self.log.reopen()
            else:
                self.loop.stop()                # open requests end with us: a scraper retries

    # -- accepting ----------------------------------------------------------------------------------
    def listen(self) -> None:
        """Edge-triggered: when MAX_SCRAPES requests are open, what else waits stays in the accept
        queue, unannounced, and is taken when a request ends (no epoll_ctl to pause and resume)."""
        for ls in self.sockets:
            self.loop.add(ls.fd, EPOLLIN | EPOLLET, partial(self._on_listener_event, ls))

    def _on_listener_event(self, ls: ListenSocket, mask: int) -> None:
        self._accept(ls)

    def _accept(self, ls: ListenSocket) -> None:
        while len(self.sessions) < MAX_SCRAPES:
            try:
                conn, _ = ls.sock.accept()
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno in (errno.ECONNABORTED, errno.EPROTO, errno.EPERM):
                    continue            # that client gave up, or a firewall refused it: take the next
                self.log.error(f"accept() on {ls.listen} failed ({exc.errno}: {exc.strerror}); "
                               f"trying again when a request ends or a client connects")
                break
            conn.setblocking(False)
            session = StatusSession(self, conn)
            self.sessions.add(session)
            session.start()
        self.backlogged = True

    def connection_closed(self, session: HttpConnection) -> None:
        self.sessions.discard(session)
        if self.backlogged:
            self.backlogged = False
            for ls in self.sockets:
                self._accept(ls)

    # -- answers ------------------------------------------------------------------------------------
    def answer_metrics(self) -> bytes:
        self.fold()
        return metrics.render_metrics(self.master_pid)

    def answer_status(self) -> bytes:
        self.fold()
        return metrics.render_status(self.master_pid, __version__)

    def answer_gateway_status(self) -> bytes | None:
        """The statuses the master wrote for the running configuration; None without a gateway."""
        try:
            with open(os.path.join(self.directory, GATEWAY_STATUS), "rb") as stream:
                return stream.read()
        except FileNotFoundError:
            return None

    def fold(self) -> None:
        """Fold the files of processes that exited, so that a scrape reads the live ones only. If
        that fails, the scrape still reads every file and its numbers stay right."""
        try:
            metrics.fold_dead_files(self.directory, self._alive)
        except OSError as exc:
            self.log.error('cannot fold the metric files of exited processes '
                           f'("{exc.filename or self.directory}"): '
                           f"{exc.strerror or exc}")

    def _alive(self, pid: int) -> bool:
        """A metric file's writer is alive while it is the master or a child of it (a pid reused by
        an unrelated process is not)."""
        import psutil
        if pid == self.master_pid:
            return True
        try:
            return psutil.Process(pid).ppid() == self.master_pid
        except psutil.NoSuchProcess:
            return False

    def fold_periodically(self) -> None:
        """Without scrapes too: the files of exited workers must not pile up until the next one."""
        self.loop.call_later(FOLD_INTERVAL, self.fold_periodically)
        self.fold()

    # -- housekeeping -------------------------------------------------------------------------------
    def check_master(self) -> None:
        """Exit if the master is gone (killed with SIGKILL): nobody would ever stop us otherwise."""
        if os.getppid() != self.master_pid:
            self.log.error("master process is gone, exiting")
            self.loop.stop()
            return
        self.loop.call_later(1.0, self.check_master)

    def on_callback_error(self, callback: Callable[..., object], exc: BaseException) -> None:
        """A bug: log it with its traceback, end the request it belongs to, keep serving."""
        trace = "".join(traceback.format_exception(exc)).rstrip().replace("\n", "\n    ")
        self.log.error(f"internal error in the {self.NAME}, please report it: {exc!r}\n    {trace}")
        owner = getattr(callback, "__self__", None)
        if isinstance(owner, StatusSession):
            owner.close()


class HttpConnection:
    """One HTTP/1.x connection to a small process of the master's (the status process, the admin
    process): one request read, answered, then the connection closed. Subclasses read the request and
    make `response`; this holds the socket and its timer, sends the answer and closes."""

    def __init__(self, server: StatusServer, sock: socket.socket, timeout: float):
        self.server = server
        self.loop = server.loop
        self.sock: socket.socket | None = sock      # None once closed
        self.response: memoryview | None = None
        self.timer = self.loop.call_later(timeout, self.close)

    def start(self) -> None:
        if self.sock is not None:
            self.loop.add(self.sock.fileno(), STREAM_EVENTS, self.on_event)

    def on_event(self, mask: int) -> None:
        raise NotImplementedError

    def send_response(self) -> bool:
        """Send what is left of `response`: False while the socket is full (the next event sends
        on), True once it is all sent or the client is gone."""
        sock = self.sock
        if sock is None or self.response is None:
            return sock is None
        try:
            while self.response:
                self.response = self.response[sock.send(self.response):]
        except BlockingIOError:
            return False
        except OSError:
            pass
        return True

    def close(self) -> None:
        if self.sock is None:
            return
        self.timer.cancel()
        self.loop.forget(self.sock.fileno())
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        self.sock.close()
        self.sock = None
        self.server.connection_closed(self)


class StatusSession(HttpConnection):
    """One HTTP/1.x request on `status_listen`: GET /metrics or /status, answered, then closed."""

    MAX_REQUEST = 8192
    TIMEOUT = 5.0

    def __init__(self, server: StatusServer, sock: socket.socket):
        super().__init__(server, sock, self.TIMEOUT)
        self.request = b""

    def on_event(self, mask: int) -> None:
        if self.response is None:
            self._read()
        if self.response is not None and self.send_response():
            self.close()

    def _read(self) -> None:
        sock = self.sock
        if sock is None:
            return
        try:
            while b"\r\n\r\n" not in self.request and b"\n\n" not in self.request:
                data = sock.recv(4096)
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
            self._respond(200, CONTENT_TYPE_LATEST, self.server.answer_metrics(), method == "HEAD")
        elif path == "/status":
            self._respond(200, "application/json", self.server.answer_status(), method == "HEAD")
        elif path == "/gateway/status" and (statuses := self.server.answer_gateway_status()) is not None:
            self._respond(200, "application/json", statuses, method == "HEAD")
        elif path == "/gateway/status":
            self._respond(404, "text/plain", b"no gateway manifests in the running configuration\n")
        else:
            self._respond(404, "text/plain", b"try /metrics, /status or /gateway/status\n")

    def _respond(self, code: int, content_type: str, body: bytes, head_only: bool = False) -> None:
        reason = {200: "OK", 404: "Not Found", 405: "Method Not Allowed",
                  431: "Request Header Fields Too Large"}
        head = (f"HTTP/1.1 {code} {reason[code]}\r\nContent-Type: {content_type}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
        self.response = memoryview(head + (b"" if head_only else body))
