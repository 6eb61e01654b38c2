"""The admin process: Kong's Admin API on `admin_listen`, served away from the workers.

Like the status process (pyproxy.status), the master forks one small process for it, named
`pyproxy: admin process`, with one loop of its own and no threads, at nice +19 (under CPU contention
the workers go first). It binds `admin_listen` itself (so no worker ever holds that socket), keeps
the entities (`StateFile`), and after each change that loaded it sends the master a SIGHUP: the
same reload as `pyproxy -s reload`, coalesced by `reload_coalesce`. It holds at most MAX_CLIENTS
connections; a request must arrive whole within REQUEST_TIMEOUT, its body at most MAX_BODY bytes
(413 beyond); with `admin_token`, its head must carry the token in `Kong-Admin-Token` (401
otherwise, before any body is read).

`AdminProcess` is the master's side: it forks the process, restarts it when it dies (after a delay
that grows while it keeps dying: a port someone else holds), replaces it when a reload changes
admin_listen, admin_state or admin_token, and stops it when the master exits.
"""

from __future__ import annotations

import errno
import hmac
import json
import os
import signal
import socket
import time
from collections.abc import Callable

from setproctitle import setproctitle

from pyproxy.addresses import host_port
from pyproxy.config.model import Config
from pyproxy.log import ErrorLog
from pyproxy.loop import EPOLLET, EPOLLIN, Loop
from pyproxy.shared import HealthTable
from pyproxy.status import HttpConnection, StatusProcess, StatusServer, _kill

TITLE = "pyproxy: admin process"
MAX_CLIENTS = 32              # with MAX_BODY, what abusive clients can make the process hold
MAX_HEAD = 16384              # the request line and headers
MAX_BODY = 10 << 20           # Kong's nginx_admin_client_max_body_size
REQUEST_TIMEOUT = 10.0
NICENESS = 19                 # the lowest: under CPU contention the workers go first (bench.admin_flood)
STALE_RETRIES = 5             # a change made again on entities that another instance changed meanwhile
REASONS = {100: "Continue", 200: "OK", 201: "Created", 204: "No Content", 400: "Bad Request",
           401: "Unauthorized", 404: "Not Found", 405: "Method Not Allowed", 409: "Conflict",
           413: "Payload Too Large", 431: "Request Header Fields Too Large", 500: "Internal Server Error",
           501: "Not Implemented", 503: "Service Unavailable"}


class AdminProcess(StatusProcess):
    """The master's handle on its admin process: started, restarted and stopped as the status
    process is (`reaped`, `send` and `stop` are StatusProcess's), for admin_listen."""

    NAME = "admin process"

    def __init__(self, log: ErrorLog, health: HealthTable):
        super().__init__(log)
        self.config: Config | None = None
        self.health = health            # the workers' (pyproxy.shared), where target health is told

    def follow(self, config: Config) -> None:  # type: ignore[override]
        """At start and after each reload that succeeded: an admin process when admin_listen is
        set, started again if its address or state file changed."""
        settings = (config.admin_listen, config.admin_state, config.admin_database, config.admin_token,
                    config.path)
        self.config = config
        if settings == self.settings:
            return
        self.settings = settings
        if self.pid:
            self.log.notice(f"stop admin process {self.pid}: admin_listen or admin_state changed")
        self._retire()
        self.delay = 0.0
        if config.admin_listen is not None:
            self._spawn()

    def manage(self) -> None:
        """From the master's loop: start an admin process again once one that died may be replaced."""
        wanted = self.config is not None and self.config.admin_listen is not None
        if wanted and not self.pid and time.monotonic() >= self.respawn_at:
            self._spawn()

    def stop(self) -> None:
        self.config = None
        super().stop()

    def _spawn(self) -> None:
        config = self.config
        assert config is not None and config.admin_listen is not None and config.admin_state is not None

        def serve(master_pid: int) -> int:
            _close_inherited(self.log.fd)
            return AdminServer(self.log, config, master_pid, self.health).run()

        pid = self._fork(serve)
        if not pid:
            return
        if config.admin_database is not None:
            from pyproxy.config.validate import redacted
            kept = f"{redacted(config.admin_database)} (cached in {config.admin_state})"
        else:
            kept = config.admin_state
        self.log.notice(f"start admin process {pid} on {host_port(*config.admin_listen)}, entities in {kept}")


def _close_inherited(log_fd: int) -> None:
    """In the fresh child: every fd but the standard ones and the error log (the stream listeners,
    the workers' pipes, the master's wakeup pipe) is the master's, never used here."""
    signal.set_wakeup_fd(-1)
    keep = sorted({0, 1, 2, log_fd})
    low = 3
    for fd in keep:
        if fd >= low:
            os.closerange(low, fd)
            low = fd + 1
    os.closerange(low, os.sysconf("SC_OPEN_MAX"))


class AdminServer(StatusServer):
    """The admin process: accepts on admin_listen, one request per connection. Its start, signals
    and master check are the status process's."""

    NAME = "admin process"

    def __init__(self, log: ErrorLog, config: Config, master_pid: int, health: HealthTable):
        super().__init__(log, [], master_pid, None, "")
        assert config.admin_listen is not None and config.admin_state is not None
        self.address = config.admin_listen
        self.token = config.admin_token.encode() if config.admin_token is not None else None
        # Imported in the admin process only: the master, which every worker is forked from, does not
        # carry the Admin API's modules (and the Kong translation they import).
        from .api import AdminAPI
        from .state import StateFile
        self.state = StateFile(config.admin_state, config.path, self.changed, log.warn, health)
        if config.admin_database is not None:
            from .database import DatabaseState
            self.state = DatabaseState(config.admin_database, config.admin_state, config.path, self.changed,
                                       log, health)
        self.api = AdminAPI(self.state)
        self.clients: set[HttpConnection] = set()

    def init_process(self) -> None:
        setproctitle(TITLE)
        os.nice(NICENESS)
        self.loop = Loop()
        self.loop.on_error = self.on_callback_error
        self._install_signals()
        self.state.start(self.loop)
        host, port = self.address
        self.sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self.sock.bind((host, port))
        except OSError as exc:
            raise OSError(exc.errno, f"cannot listen on {host_port(host, port)} (admin_listen): "
                                     f"{exc.strerror}") from None
        self.sock.listen(128)
        self.sock.setblocking(False)
        self.loop.add(self.sock.fileno(), EPOLLIN | EPOLLET, self._accept_clients)
        self.loop.call_later(1.0, self.check_master)

    def _accept_clients(self, mask: int = 0) -> None:
        while len(self.clients) < MAX_CLIENTS:
            try:
                conn, _ = self.sock.accept()
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno in (errno.ECONNABORTED, errno.EPROTO, errno.EPERM):
                    continue
                self.log.error(f"accept() on admin_listen failed ({exc.strerror})")
                return
            conn.setblocking(False)
            client = AdminClient(self, conn)
            self.clients.add(client)
            client.start()

    def connection_closed(self, client: HttpConnection) -> None:
        self.clients.discard(client)
        self._accept_clients()

    def changed(self) -> None:
        """The state file changed: the master reloads, as for `pyproxy -s reload`."""
        _kill(self.master_pid, signal.SIGHUP)

    def on_callback_error(self, callback: Callable[..., object], exc: BaseException) -> None:
        """A bug: logged as the status process logs it; the request it belongs to gets a 500."""
        super().on_callback_error(callback, exc)
        owner = getattr(callback, "__self__", None)
        if isinstance(owner, AdminClient):
            owner.respond(500, {"message": "An unexpected error occurred"})
            owner.write()

    def answer(self, method: str, target: str, content_type: str, body: bytes) -> tuple[int, object]:
        """The API's answer; a change is made on the entities as they are now (another instance may
        have changed shared ones), and made again on the newer ones if they changed meanwhile."""
        from .state import Stale
        for attempt in range(STALE_RETRIES):
            if method != "GET":
                self.state.refresh()
            try:
                status, answer = self.api.handle(method, target, content_type, body)
                break
            except Stale:
                if attempt + 1 == STALE_RETRIES:
                    status, answer = 409, {"message": "the entities kept changing meanwhile: try again"}
        if method != "GET" and status < 300:
            self.log.notice(f"admin: {method} {target.split('?', 1)[0]}: {status}")
        return status, answer


class AdminClient(HttpConnection):
    """One HTTP/1.x connection: one request read (headers, then Content-Length bytes), answered in
    JSON, then closed."""

    server: AdminServer

    def __init__(self, server: AdminServer, sock: socket.socket):
        super().__init__(server, sock, REQUEST_TIMEOUT)
        self.data = bytearray()
        self.head: tuple[str, str, dict[str, str], int] | None = None   # method, target, headers, body start
        self.continued = False
        self.read_whole = False     # the request's head and body were all read
        self.lingering = False      # answered before that: the rest is read and dropped

    def on_event(self, mask: int) -> None:
        if self.lingering:
            self.discard()
            return
        if self.response is None:
            self.read()
        if self.response is not None:
            self.write()

    def read(self) -> None:
        sock = self.sock
        if sock is None:
            return
        try:
            while True:
                chunk = sock.recv(65536)
                if not chunk:
                    self.close()
                    return
                self.data += chunk
                if self.parse():
                    return
        except BlockingIOError:
            return
        except OSError:
            self.close()

    def parse(self) -> bool:
        """True once the request is answered (or refused)."""
        if self.head is None:
            end = self.data.find(b"\r\n\r\n")
            if end < 0:
                if len(self.data) > MAX_HEAD:
                    self.respond(431, {"message": "Request header too large"})
                    return True
                return False
            lines = self.data[:end].decode("latin-1").split("\r\n")
            request = lines[0].split()
            if len(request) != 3 or not request[2].startswith("HTTP/1."):
                self.respond(400, {"message": "Bad request"})
                return True
            headers = {}
            for line in lines[1:]:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
            self.head = (request[0], request[1], headers, end + 4)
            token = self.server.token
            if token is not None and not hmac.compare_digest(
                    headers.get("kong-admin-token", "").encode("latin-1"), token):
                self.respond(401, {"message": "Invalid credentials. Token or User credentials required"})
                return True
        method, target, headers, start = self.head
        length = headers.get("content-length", "0")
        if "chunked" in headers.get("transfer-encoding", "").lower() or not length.isdigit():
            self.respond(400, {"message": "a body needs Content-Length (chunked bodies are not read)"})
            return True
        if int(length) > MAX_BODY:
            self.respond(413, {"message": f"Payload too large: at most {MAX_BODY} bytes"})
            return True
        if len(self.data) - start < int(length):
            if headers.get("expect", "").lower() == "100-continue" and not self.continued and self.sock:
                self.continued = True
                try:
                    self.sock.send(b"HTTP/1.1 100 Continue\r\n\r\n")
                except OSError:
                    pass
            return False
        body = bytes(self.data[start:start + int(length)])
        self.read_whole = True
        status, answer = self.server.answer(method, target, headers.get("content-type", ""), body)
        self.respond(status, answer)
        return True

    def respond(self, status: int, answer: object) -> None:
        body = b"" if answer is None else json.dumps(answer).encode() + b"\n"
        head = (f"HTTP/1.1 {status} {REASONS.get(status, 'Error')}\r\n"
                f"Content-Type: application/json; charset=utf-8\r\nContent-Length: {len(body)}\r\n"
                f"Server: pyproxy\r\nConnection: close\r\n\r\n").encode()
        self.response = memoryview(head + body)

    def write(self) -> None:
        if not self.send_response() or self.sock is None:
            return
        if not self.read_whole:
            self.linger()
        else:
            self.close()

    def linger(self) -> None:
        """nginx's lingering close: a client still sending the body it was refused would get a reset
        instead of the answer if the socket closed with unread bytes; read them until it is done."""
        self.lingering = True
        if self.sock is not None:
            try:
                self.sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass
        self.discard()

    def discard(self) -> None:
        sock = self.sock
        if sock is None:
            return
        try:
            while sock.recv(65536):
                pass
        except BlockingIOError:
            return
        except OSError:
            pass
        self.close()
