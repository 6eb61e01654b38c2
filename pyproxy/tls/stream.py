"""One TLS connection over a non-blocking socket, driven through OpenSSL memory BIOs.

CPython's SSLSocket hands OpenSSL the socket itself, and OpenSSL then reads each TLS record with two
`read()`s (its 5-byte header, then the body) and writes each flight as it is produced; making one
also costs four system calls (SO_TYPE, getsockname, getpeername, FIONBIO). Here OpenSSL only ever
sees two memory buffers: one `recv_into` takes whatever the socket holds (a whole handshake flight,
several records), and what OpenSSL produced leaves in one `send`. This is asyncio's design
(`sslproto`), minus the coroutines.

A TLSStream looks like a socket to the pumps: `recv_into` answers plaintext or raises
`ssl.SSLWantReadError`, `send` takes plaintext or raises `BlockingIOError`, and `flush` puts what
was written on the wire (a pump flushes once per pass, so what one pass wrote shares a `send`).
Ciphertext the socket would not take waits in `backlog` and goes out first; while any waits, `send`
accepts nothing new, so a slow reader holds at most about one buffer's worth of ciphertext here
(backpressure as with sockets).
"""

from __future__ import annotations

import _socket
import ssl
from collections.abc import Hashable
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from pyproxy.loop import Loop

# Raised by recv_into when the socket has no more to give (like SSLSocket in non-blocking mode).
WantRead = ssl.SSLWantReadError
TLS1_3 = "TLSv1.3"


class RenegotiationRefused(ssl.SSLError):
    """A TLS <= 1.2 client started a renegotiation, which the server refused (OP_NO_RENEGOTIATION:
    OpenSSL answers a no_renegotiation alert, already sent when this is raised)."""
# Upstream sessions kept per service and worker: (peer, name) pairs, the name perhaps the client's SNI.
UPSTREAM_SESSIONS_MAX = 1024
FLUSH_AT = 64 * 1024            # ciphertext that send() hands to the socket without waiting for flush()
RECORD_MAX = 16384              # the most plaintext one TLS record carries (RFC 8446, 5.1)
CIPHERTEXT_MAX = 5 + RECORD_MAX + 256   # a record's largest ciphertext, header included: one is whole


class SSLObject(Protocol):
    """The C object (`_ssl._SSLSocket`) that `SSLContext._wrap_bio` makes: what ssl.SSLObject wraps
    and forwards to. typeshed does not describe it; this is the part we call."""

    server_side: bool
    session: ssl.SSLSession | None

    def do_handshake(self) -> None: ...
    def read(self, size: int, buffer: memoryview, /) -> int: ...
    def write(self, data: bytes | memoryview, /) -> int: ...
    def pending(self) -> int: ...
    def shutdown(self) -> Any: ...
    def version(self) -> str | None: ...
    def cipher(self) -> tuple[str, str, int] | None: ...
    def getpeercert(self, binary_form: bool = False, /) -> Any: ...
    def get_verified_chain(self) -> list[Any] | None: ...
    def selected_alpn_protocol(self) -> str | None: ...


class TLSStream:
    """A TLS connection (either side) over `sock`, whose readiness the caller tracks."""

    __slots__ = ("sock", "obj", "incoming", "outgoing", "scratch", "backlog", "notified", "unsent",
                 "loop", "empty_at", "hup", "renegotiation_refused", "tls13", "negotiated", "_fileno")

    def __init__(self, sock: _socket.socket, context: ssl.SSLContext, server_side: bool,
                 scratch: memoryview, server_hostname: str | None = None, loop: Loop | None = None):
        self.sock = sock
        self.incoming = ssl.MemoryBIO()
        self.outgoing = ssl.MemoryBIO()
        # CPython's C object, without the pure-Python ssl.SSLObject around it (which only forwards
        # calls): with no owner, an SNI callback is handed this object, whose `context` it may set.
        self.obj: SSLObject = context._wrap_bio(  # type: ignore[attr-defined]  # private, see above
            self.incoming, self.outgoing, server_side, server_hostname)
        self.scratch = scratch          # the worker's receive buffer; only borrowed within a call
        self.backlog: memoryview | None = None   # ciphertext the socket has not taken yet
        self.notified = False           # our close_notify is written
        self.unsent = False             # send() left records in OpenSSL's buffer: flush() them
        # nginx's short-read rule (see _fill): the loop's poll count when a recv came back short,
        # and whether epoll reported the peer's FIN (then every read goes to the socket).
        self.loop = loop
        self.empty_at = -1
        self.hup = False
        self.renegotiation_refused = False
        self.tls13 = False              # the handshake completed with TLS 1.3 (see _answer_peer)
        self.negotiated: str | None = None    # the version it completed with ("TLSv1.3"), once it has
        self._fileno = sock.fileno()

    # -- the socket underneath --------------------------------------------------------------
    def fileno(self) -> int:
        return self._fileno

    def close(self) -> None:
        self.sock.close()
        self.backlog = None

    # What a session does with its client socket whatever it carries: drain it before closing,
    # arrange a reset, ask which local address it has.
    def recv(self, size: int, flags: int = 0) -> bytes:
        return self.sock.recv(size, flags)

    def setsockopt(self, level: int, option: int, value: int | bytes) -> None:
        self.sock.setsockopt(level, option, value)

    def getsockname(self) -> Any:
        return self.sock.getsockname()

    def shutdown(self, how: int) -> None:
        self.sock.shutdown(how)

    def _fill(self) -> bool:
        """Move what the socket holds into OpenSSL: False when there is nothing to read now.
        Raises OSError when the connection failed; the peer's FIN becomes OpenSSL's EOF.

        A recv that came back short emptied the socket, and edge-triggered epoll reports whatever
        arrives after it at the next poll: until then, another recv could only answer EAGAIN, so
        none is made (nginx's rule). Not once a FIN was reported: a FIN queued before that short
        read will not be reported again."""
        loop = self.loop
        if loop is not None and self.empty_at == loop.polls and not self.hup:
            return False
        scratch = self.scratch
        try:
            n = self.sock.recv_into(scratch)
        except BlockingIOError:
            return False
        if n:
            self.incoming.write(scratch[:n])
            if n < len(scratch) and loop is not None:
                self.empty_at = loop.polls
        elif self.incoming.eof:
            return False            # OpenSSL already knows, and still asks: nothing more to give
        else:
            self.incoming.write_eof()
        return True

    def flush(self) -> bool:
        """Send what OpenSSL produced, after any backlog. True when nothing is left waiting."""
        self.unsent = False
        backlog = self.backlog
        if backlog is None:
            if not self.outgoing.pending:
                return True
            backlog = memoryview(self.outgoing.read())
        elif self.outgoing.pending:
            backlog = memoryview(bytes(backlog) + self.outgoing.read())
        try:
            n = self.sock.send(backlog)
        except BlockingIOError:
            n = 0
        if n == len(backlog):
            self.backlog = None
            return True
        self.backlog = backlog[n:]
        return False

    @property
    def pending(self) -> int:
        """Ciphertext bytes waiting for the socket."""
        return len(self.backlog) if self.backlog is not None else 0

    # -- TLS ---------------------------------------------------------------------------------
    def handshake(self) -> bool:
        """One step of the handshake: True once it completed, False while waiting for the peer.
        Raises ssl.SSLError (or OSError) when it failed; an alert for the peer is sent first."""
        obj = self.obj
        outgoing = self.outgoing
        if obj.server_side and not self.incoming.pending:
            # Nothing new for OpenSSL (it would only answer "want read"): read first. (A client
            # calls OpenSSL first: its first step has nothing to read and writes the ClientHello.)
            if self.backlog is not None or outgoing.pending:
                self.flush()
            if not self._fill():
                return False
        while True:
            try:
                obj.do_handshake()
            except WantRead:
                if self.backlog is not None or outgoing.pending:
                    self.flush()
                if not self._fill():
                    return False
            except ssl.SSLError:
                self._flush_quietly()       # the alert that tells the peer why
                raise
            else:
                # What the handshake wrote leaves now, a TLS 1.3 server's session tickets too: held
                # until the first reply, they left nothing to acknowledge the client's Finished but
                # the delayed-ACK timer, and a client with Nagle's algorithm on (no TCP_NODELAY:
                # Java's and Python's default sockets) then waited ~40 ms to send its first request.
                self.negotiated = version = obj.version()
                self.tls13 = version == TLS1_3
                if self.backlog is not None or outgoing.pending:
                    self.flush()
                return True

    def recv_into(self, buffer: memoryview) -> int:
        """Decrypt into `buffer`: the byte count, 0 at the peer's close_notify or FIN, or WantRead
        when nothing more can be read now. Raises RenegotiationRefused (see _answer_peer)."""
        obj = self.obj
        incoming = self.incoming
        while True:
            if not incoming.pending and not incoming.eof and not obj.pending():
                # OpenSSL has nothing to decrypt and would only raise "want read" (an exception
                # built from its error queue, several times dearer than this test): refill first.
                if not self._fill():
                    if self.outgoing.pending and not self.tls13:
                        self._answer_peer()
                    raise WantRead
                continue
            try:
                n = obj.read(len(buffer), buffer)
            except WantRead:
                if not self._fill():
                    if self.outgoing.pending and not self.tls13:
                        self._answer_peer()
                    raise
                continue
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                return 0            # EOF without close_notify: only without OP_IGNORE_UNEXPECTED_EOF
            # A full record with whole ones still buffered is bulk: decrypt them into the same buffer,
            # so that the destination gets one send for up to its size instead of one per 16 KiB
            # (nginx's ngx_ssl_recv fills its buffer the same way). A small message skips this.
            while n == RECORD_MAX and incoming.pending >= CIPHERTEXT_MAX and len(buffer) - n >= RECORD_MAX:
                try:
                    n += obj.read(RECORD_MAX, buffer[n:])
                except (WantRead, ssl.SSLZeroReturnError, ssl.SSLEOFError):
                    break           # not application data after all: the next call sees it
            return n

    def _answer_peer(self) -> None:
        """Reading is over for now and OpenSSL has records to send, in TLS 1.2 or earlier (the
        callers check `tls13`: in TLS 1.3 they are session tickets, or a KeyUpdate's answer, which
        leave with the next write or the close_notify; RFC 8446 only asks for the answer before
        our next application data, and no call is spent on them). In TLS 1.2 and earlier,
        reading writes only when the peer started a renegotiation, and the peer now waits for the
        answer, so it leaves at once: our ClientHello when an upstream asked us to renegotiate,
        the no_renegotiation alert when a client tried to (a server context has
        OP_NO_RENEGOTIATION). Then, like nginx ("SSL renegotiation disabled"), the server ends the
        connection: a client that renegotiates is in no state we can serve."""
        self._flush_quietly()
        if self.obj.server_side:
            self.renegotiation_refused = True
            raise RenegotiationRefused("client tried to renegotiate TLS, which is disabled")

    def send(self, data: bytes | memoryview) -> int:
        """Encrypt all of `data`, or raise BlockingIOError and take none of it while earlier
        ciphertext is still waiting for the socket. The records leave at the caller's flush()
        (the pump's, once its run ends), so a reply and the close_notify after it, or several
        small writes, share one send; a full buffer's worth leaves at once."""
        if self.backlog is not None and not self.flush():
            raise BlockingIOError
        n = self.obj.write(data)
        if self.outgoing.pending >= FLUSH_AT:
            self.flush()
        else:
            self.unsent = True
        return n

    def close_notify(self) -> bool:
        """Send TLS's close_notify, keeping the connection readable (TLS half-close): an OpenSSL 3
        peer takes a bare FIN for a truncation attack. True once it left (with any backlog).

        Not while the peer's records wait to be read (False then, try again later): CPython's
        shutdown() calls SSL_shutdown twice, and the second call reads, discarding application
        data; with nothing buffered it stops at "want read" and consumes nothing."""
        if not self.notified:
            if self.incoming.pending or self.obj.pending():
                return False
            self.notified = True
            try:
                self.obj.shutdown()
            except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                pass            # close_notify is written; OpenSSL would now wait for the peer's
            except (ssl.SSLError, ValueError):
                pass
        return self._flush_quietly()

    def _flush_quietly(self) -> bool:
        try:
            return self.flush()
        except OSError:
            self.backlog = None
            return True

    def version(self) -> str | None:
        return self.obj.version()

    def cipher(self) -> tuple[str, str, int] | None:
        return self.obj.cipher()


class UpstreamTLSStream(TLSStream):
    """The client side of TLS towards an upstream that resumes the last session made with the same
    peer and name (`sessions[key]`) and leaves its own there when closed: an upstream that issues
    tickets or caches sessions then does one full handshake per worker, not one per connection.

    Saved at the close because a TLS 1.3 server sends its ticket after the handshake, with its
    first bytes; a session without one (or, before 1.3, without an id) cannot be resumed."""

    __slots__ = ("sessions", "key")

    def __init__(self, sock: _socket.socket, context: ssl.SSLContext, scratch: memoryview,
                 server_hostname: str | None, loop: Loop, sessions: dict[Hashable, ssl.SSLSession],
                 key: Hashable):
        super().__init__(sock, context, False, scratch, server_hostname=server_hostname, loop=loop)
        self.sessions = sessions
        self.key = key
        session = sessions.get(key)
        if session is not None:
            self.obj.session = session

    def close(self) -> None:
        version = self.negotiated               # None: no handshake completed
        if version is not None:
            session = self.obj.session
            if session is not None and (session.has_ticket if version == TLS1_3 else session.id):
                sessions = self.sessions
                if len(sessions) >= UPSTREAM_SESSIONS_MAX and self.key not in sessions:
                    del sessions[next(iter(sessions))]      # the oldest peer and name
                sessions[self.key] = session
        super().close()
