"""A non-blocking Redis client that runs in a worker's event loop, for the limits' `policy: redis`.

Why not redis-py: its calls block. A worker that waits for Redis, even 100 µs on loopback, stalls
every session it holds, and a Redis that accepts but never answers would stall them for the whole
timeout. Here a command is written into the worker's loop (pyproxy.loop) and its reply comes back
to a callback: the session that asked waits, the others run on. The protocol the limits need is
small (RESP2 commands out; integers, strings, errors, arrays back), so the client is too.

- Commands issued in one tick leave in one `send` at the end of it (pipelining): a burst of new
  sessions costs one write and one read, not one round trip each.
- Every command has a deadline, `timeout` after it was issued: a reply that comes later than that,
  a refused or dropped connection, or an error reply (NOAUTH, NOSCRIPT, OOM…) ends the connection. All the
  commands waiting on it are answered `UNAVAILABLE` at once, and the client is *down*: further
  calls are refused on the spot (`call` returns False) so the limits count locally, without
  waiting. That is logged once, with its cause.
- While down, a probe reconnects every `RETRY` seconds in the background (connect, AUTH, SELECT,
  SCRIPT LOAD, PING, bounded by the same timeout); sessions never wait on it. When it is answered,
  the client is up again and `on_up` callbacks run (the limits re-assert what this worker holds);
  the first command answered then is logged, once, as Redis's return.
- Only the first connection, made when the first session asks, is waited on by sessions: those
  of that first tick would otherwise count locally for no reason.

With a TLS context (`redis_ssl`), the connection is a pyproxy.tls.stream.TLSStream over the same
socket (OpenSSL through memory BIOs, driven by the same events), its handshake done before the
first command leaves.

Lua scripts given to `script()` are loaded at each (re)connection and called by their SHA1
(EVALSHA), so a session sends a few dozen bytes, never a script's text.
"""

from __future__ import annotations

import errno
import hashlib
import os
import socket
import ssl
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING

from pyproxy.loop import EPOLLERR, EPOLLHUP, EPOLLIN, EPOLLOUT, EPOLLRDHUP, STREAM_EVENTS
from pyproxy.phases import ssl_reason
from pyproxy.tls.stream import TLSStream, WantRead

if TYPE_CHECKING:
    from pyproxy.loop import Loop, Timer

RETRY = 1.0              # seconds between reconnection probes while Redis is down
READ_SIZE = 65536


class ReplyError(str):
    """An error reply (`-ERR ...`, `-NOSCRIPT ...`): its text."""


class _Unavailable:
    """What a callback is given instead of a reply when Redis did not answer in time or the
    connection failed; the caller decides locally."""

    def __repr__(self) -> str:
        return "UNAVAILABLE"


UNAVAILABLE = _Unavailable()
Reply = int | bytes | str | list["Reply"] | ReplyError | None
Callback = Callable[[object], None]


class _Incomplete(Exception):
    pass


def encode(args: tuple[object, ...]) -> bytes:
    """A command as RESP: an array of bulk strings."""
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        data = arg if isinstance(arg, bytes) else str(arg).encode()
        parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(parts)


def parse(buf: bytes | bytearray, pos: int) -> tuple[Reply, int]:
    """One reply starting at `pos`: (value, position after it). Raises _Incomplete if `buf` ends
    first, ValueError if it is not RESP."""
    end = buf.find(b"\r\n", pos)
    if end < 0:
        raise _Incomplete
    kind, line = buf[pos:pos + 1], bytes(buf[pos + 1:end])
    pos = end + 2
    if kind == b"+":
        return line.decode(errors="replace"), pos
    if kind == b"-":
        return ReplyError(line.decode(errors="replace")), pos
    if kind == b":":
        return int(line), pos
    if kind == b"$":
        size = int(line)
        if size < 0:
            return None, pos
        if len(buf) < pos + size + 2:
            raise _Incomplete
        return bytes(buf[pos:pos + size]), pos + size + 2
    if kind == b"*":
        count = int(line)
        if count < 0:
            return None, pos
        items: list[Reply] = []
        for _ in range(count):
            item, pos = parse(buf, pos)
            items.append(item)
        return items, pos
    raise ValueError(f"not a RESP reply: {bytes(buf[pos - 2 - len(line) - 1:end])[:40]!r}")


class RedisClient:
    """One connection to one Redis from one worker process, shared by the plugin instances that
    name the same server (see `client_for`)."""

    def __init__(self, host: str, port: int, timeout: float, log: Callable[[str, str], None],
                 username: str | None = None, password: str | None = None, database: int = 0,
                 tls: ssl.SSLContext | None = None, server_name: str | None = None):
        self.where = f"{host}:{port}"
        self.tls, self.server_name = tls, server_name
        self.stream: TLSStream | None = None     # with `tls`, once the TCP connection is made
        self.secured = False                     # its handshake completed
        self.host, self.port = host, port
        self.timeout = timeout
        self.log = log
        self.username, self.password, self.database = username, password, database
        self.scripts: dict[str, bytes] = {}          # sha1 -> text, loaded at each connection
        self.on_up: list[Callable[[], None]] = []
        self.loop: Loop | None = None
        self.sock: socket.socket | None = None
        self.up = False
        self.settled = False        # the first connection was answered or failed
        self.down_logged = False
        self.connecting = False
        self.writable = False
        self.connected = False      # the TCP connection was made (its first EPOLLOUT)
        self.out = bytearray()
        self.inbuf = bytearray()
        self.scratch = memoryview(bytearray(READ_SIZE))         # plaintext, with TLS
        self.tls_scratch = memoryview(bytearray(READ_SIZE if tls else 0))      # ciphertext
        # One entry per command on the wire, in order: (deadline, callback or None).
        self.waiting: deque[tuple[float, Callback | None]] = deque()
        self.flush_queued = False
        self.timer: Timer | None = None
        self.retry_timer: Timer | None = None
        self.parsed = 0
        self.family = socket.AF_INET
        self.address: tuple[str, int] | None = None
        self.unresolved = ""
        self._resolve()

    # -- the callers' side ------------------------------------------------------------------
    def script(self, text: str) -> str:
        """Register a Lua script; returns the SHA1 to give `call("EVALSHA", sha, ...)`."""
        sha = hashlib.sha1(text.encode()).hexdigest()
        self.scripts[sha] = text.encode()
        return sha

    def call(self, loop: Loop, callback: Callback | None, *args: object) -> bool:
        """Send a command; `callback(reply)` runs in a later tick with the reply, or with
        UNAVAILABLE. False (and no callback) when Redis is down: decide without it, now."""
        if self.loop is None:
            self.loop = loop
            self._connect()
        if not self.up and self.settled:
            return False
        self.waiting.append((loop.now + self.timeout, callback))
        self.out += encode(args)
        if not self.flush_queued:
            self.flush_queued = True
            loop.call_soon(self._flush)
        if self.timer is None:
            self.timer = loop.call_at(self.waiting[0][0], self._check_deadline)
        return True

    def close(self) -> None:
        """The worker is done: what still waits is dropped unanswered (its sessions are over)."""
        self.waiting.clear()
        self._drop()
        if self.retry_timer is not None:
            self.retry_timer.cancel()
            self.retry_timer = None
        self.on_up.clear()

    # -- connection -----------------------------------------------------------------------------
    def _resolve(self) -> None:
        """The server's address, looked up once, when the worker makes its plugins: before its
        loop runs, so that a slow resolver delays its start, never a session. A name that does
        not resolve leaves the limits local for this generation (a reload looks it up again)."""
        try:
            family, _, _, _, sockaddr = socket.getaddrinfo(self.host, self.port, type=socket.SOCK_STREAM)[0]
        except (OSError, UnicodeError) as exc:
            self.unresolved = f"cannot resolve {self.host}: {exc}"
            return
        self.family, self.address = family, (str(sockaddr[0]), int(sockaddr[1]))

    def _connect(self) -> None:
        self.retry_timer = None
        assert self.loop is not None
        if self.address is None:
            self._failed(self.unresolved)
            return
        sock = socket.socket(self.family, socket.SOCK_STREAM)
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        code = sock.connect_ex(self.address)
        if code not in (0, errno.EINPROGRESS):
            sock.close()
            self._failed(f"connect: {errno.errorcode.get(code, code)}: {os.strerror(code)}")
            return
        self.sock = sock
        self.connecting = True
        self.writable = self.connected = False
        self.loop.add(sock.fileno(), STREAM_EVENTS, self._on_event)
        # The handshake goes first on the wire; commands issued meanwhile queue behind it.
        handshake: list[tuple[object, ...]] = []
        if self.password is not None:
            handshake.append(("AUTH", self.username, self.password) if self.username
                             else ("AUTH", self.password))
        if self.database:
            handshake.append(("SELECT", self.database))
        handshake += [("SCRIPT", "LOAD", text) for text in self.scripts.values()]
        deadline = self.loop.now + self.timeout
        for args in handshake:
            self.out += encode(args)
        self.out += encode(("PING",))
        self.waiting.extend([(deadline, None)] * len(handshake))
        self.waiting.append((deadline, self._ready))
        if self.timer is None:
            self.timer = self.loop.call_at(deadline, self._check_deadline)

    def _ready(self, reply: object) -> None:
        """The handshake's PING was answered: commands may go. That Redis is back is logged at
        the first command it answers (`_answer`), not here: a Redis that answers PING and then
        an error to every command (a read-only replica, a cluster node, out of memory) must not
        log its return and its failure once a second."""
        if reply == "PONG":
            self.connecting = False
            self.up = self.settled = True
            for callback in self.on_up:
                callback()
        elif reply is not UNAVAILABLE:
            self._failed(f"unexpected answer to PING: {reply!r}")

    def _failed(self, cause: str) -> None:
        """The connection is unusable: answer everything waiting with UNAVAILABLE, log it once
        per outage, and probe again in RETRY seconds."""
        if not self.down_logged:
            self.down_logged = True
            self.log("warn", f"redis {self.where} unavailable ({cause}): limits count locally, "
                             f"per instance, until it answers")
        self.settled = True        # from now on sessions never wait for a connection to come up
        self._drop()
        if self.retry_timer is None and self.loop is not None and self.address is not None:
            self.retry_timer = self.loop.call_later(RETRY, self._connect)

    def _drop(self) -> None:
        self.up = self.connecting = self.secured = False
        self.stream = None
        if self.sock is not None:
            assert self.loop is not None
            self.loop.forget(self.sock.fileno())
            self.sock.close()
            self.sock = None
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.out.clear()
        self.inbuf.clear()
        waiting, self.waiting = self.waiting, deque()
        for _, callback in waiting:
            if callback is not None:
                callback(UNAVAILABLE)

    # -- I/O ----------------------------------------------------------------------------------
    def _on_event(self, mask: int) -> None:
        if mask & (EPOLLERR | EPOLLHUP) and not mask & EPOLLIN:
            assert self.sock is not None
            code = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            self._failed(os.strerror(code) if code else "connection closed")
            return
        if mask & EPOLLOUT:
            self.writable = self.connected = True
            if self.tls is not None and self.stream is None:
                assert self.sock is not None
                self.stream = TLSStream(self.sock, self.tls, False, self.tls_scratch,
                                        self.server_name or self.host)
        if self.stream is not None and not self.secured:
            self._handshake()
            return
        if mask & EPOLLOUT:
            self._flush()
        if mask & (EPOLLIN | EPOLLRDHUP) and self.sock is not None:
            self._read()

    def _handshake(self) -> None:
        """One step of the TLS handshake; once it is done, the commands waiting go out."""
        assert self.stream is not None
        try:
            if not self.stream.handshake():
                return
        except (ssl.SSLError, OSError) as exc:
            self._failed(f"TLS handshake: {ssl_reason(exc)}")
            return
        self.secured = True
        self._flush()
        if self.sock is not None:
            self._read()            # a reply may have come with the handshake's last flight

    def _flush(self) -> None:
        self.flush_queued = False
        sock = self.sock
        if self.stream is not None:
            self._flush_tls()
            return
        if sock is None or not self.writable or not self.out:
            return
        try:
            sent = sock.send(self.out)
        except BlockingIOError:
            self.writable = False
            return
        except OSError as exc:
            self._failed(exc.strerror or str(exc))
            return
        del self.out[:sent]
        if self.out:
            self.writable = False          # the next EPOLLOUT edge sends the rest

    def _flush_tls(self) -> None:
        """Encrypt what waits and send it; ciphertext the socket does not take waits in the
        stream's backlog for the next EPOLLOUT (TLSStream.send refuses more meanwhile)."""
        stream = self.stream
        assert stream is not None
        if not self.secured:
            return
        try:
            if self.out:
                with memoryview(self.out) as view:
                    sent = stream.send(view)
                del self.out[:sent]
            stream.flush()
        except BlockingIOError:
            return
        except (ssl.SSLError, OSError) as exc:
            self._failed(ssl_reason(exc))

    def _read(self) -> None:
        sock = self.sock
        assert sock is not None
        while True:
            try:
                data: bytes | memoryview = (sock.recv(READ_SIZE) if self.stream is None else
                                            self.scratch[:self.stream.recv_into(self.scratch)])
            except (BlockingIOError, WantRead):
                break
            except (ssl.SSLError, OSError) as exc:
                self._failed(ssl_reason(exc))
                return
            if not data:
                self._failed("connection closed by redis")
                return
            self.inbuf += data
            if len(data) < READ_SIZE and self.stream is None:
                break
        buf = self.inbuf
        try:
            self._answer(sock, buf)
        finally:
            if self.sock is sock:
                del buf[:self.parsed]

    def _answer(self, sock: socket.socket, buf: bytearray) -> None:
        """Hand the complete replies in `buf` to their callbacks; `parsed` is how far it got, kept
        as it goes so that a callback that raises cannot have a reply delivered twice."""
        self.parsed = pos = 0
        while pos < len(buf) and self.waiting:
            try:
                reply, pos = parse(buf, pos)
            except _Incomplete:
                return
            except ValueError as exc:
                self._failed(str(exc))
                return
            self.parsed = pos
            _, callback = self.waiting.popleft()
            if isinstance(reply, ReplyError):
                # NOAUTH, NOSCRIPT (scripts flushed), OOM, LOADING…: reconnecting is the cure for
                # most, and until then the limits count locally.
                if callback is not None:
                    callback(UNAVAILABLE)
                self._failed(f"it answered {reply}")
                return
            if self.up and self.down_logged:
                self.down_logged = False
                self.log("notice", f"redis {self.where} answers again: limits count across the fleet again")
            if callback is not None:
                callback(reply)
            if self.sock is not sock:       # that reply's callback ended the connection
                return

    def _check_deadline(self) -> None:
        self.timer = None
        if not self.waiting:
            return
        assert self.loop is not None
        deadline = self.waiting[0][0]
        if self.loop.now >= deadline:
            what = "answer" if self.connected else "connection"
            self._failed(f"no {what} within redis_timeout {self.timeout * 1000:g}ms")
        else:
            self.timer = self.loop.call_at(deadline, self._check_deadline)


_clients: dict[tuple[object, ...], RedisClient] = {}


def client_for(host: str, port: int, timeout: float, log: Callable[[str, str], None],
               username: str | None, password: str | None, database: int,
               tls: bool = False, verify: bool = False, server_name: str | None = None) -> RedisClient:
    """This worker's client for that server and database (one connection however many plugin
    instances name it). `tls`: over TLS, checking the server's certificate against the system's
    CAs and its name (`server_name`, else `host`) only with `verify` (Kong's defaults)."""
    key = (host, port, timeout, username, password, database, tls, verify, server_name)
    client = _clients.get(key)
    if client is None:
        context = None
        if tls:
            context = ssl.create_default_context()
            if not verify:
                context.check_hostname = False
                context.verify_mode = ssl.CERT_NONE
        client = _clients[key] = RedisClient(host, port, timeout, log, username, password, database,
                                             context, server_name)
    return client
