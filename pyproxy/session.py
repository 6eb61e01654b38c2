"""A proxied session as nginx's stream phases, written as plain methods called in order:

    accept → preread (ssl listeners) → route → access (plugins) → connect (balancer, retries)
           → forward → log

Each phase either moves on to the next or ends the session with an nginx stream status (200, 400,
403, 404, 500, 502, 503) that the access log prints. Sockets are registered once, edge-triggered,
when they appear; events only update readiness flags and then run whatever the current phase needs.
"""

from __future__ import annotations

import _socket
import errno
import fcntl
import os
import socket
import ssl
import struct
import sys
import termios
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from pyproxy.config.model import (
    STATUS_BAD_GATEWAY,
    STATUS_BAD_REQUEST,
    STATUS_INTERNAL,
    STATUS_NO_ROUTE,
    STATUS_OK,
    Listen,
)
from pyproxy.forward import DONE, LOCAL_ERROR, MORE, SCRATCH_SIZE, SRC_ERROR, BufferPump, SplicePump
from pyproxy.loop import EPOLLERR, EPOLLHUP, EPOLLIN, EPOLLOUT, EPOLLRDHUP, STREAM_EVENTS
from pyproxy.proxy_protocol import DEFAULT_MAX_SIZE as PROXY_HEADER_MAX_SIZE
from pyproxy.proxy_protocol import (
    ProxyProtocolError,
    build_v1,
    build_v2,
    parse_proxy_header,
    proxy_header_need,
)
from pyproxy.tls.clienthello import ClientHelloError, ClientHelloReader, parse_client_hello
from pyproxy.tls.stream import TLSStream

if TYPE_CHECKING:
    from pyproxy.config.model import Route, Service
    from pyproxy.loop import Loop, Timer
    from pyproxy.upstream import Balancer, Peer
    from pyproxy.worker import Worker

# A socket as accept() gives it (the C type), or the TLS connection over it once terminated.
Connection = _socket.socket | TLSStream
# The client's address: accept()'s (an IPv6 one has four fields), or what a PROXY header announced.
ClientAddress = tuple[str, int] | tuple[str, int, int, int]
Pump = BufferPump | SplicePump
T = TypeVar("T")

IN_EVENTS = EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR
OUT_EVENTS = EPOLLOUT | EPOLLHUP | EPOLLERR
HUP_EVENTS = EPOLLRDHUP | EPOLLHUP | EPOLLERR
ERR_EVENTS = EPOLLHUP | EPOLLERR
UPSTREAM_SOCKET_TYPE = socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC
CLIENT_HUP = 1
UPSTREAM_HUP = 2
LINGER_RESET = struct.pack("ii", 1, 0)      # SO_LINGER {on, 0s}: close() sends a RST

PREREAD_MAX = SCRATCH_SIZE                   # bytes of ClientHello we wait for (peeked into scratch)
MSG_PEEK = socket.MSG_PEEK
_INT_BYTES = bytes(4)

LINGER_TIMEOUT = 2.0        # how long a refused client may keep sending after our FIN
LINGER_READS = 16           # reads per event while lingering; the rest waits for the next edge
SEND_PROXY_HEADER = {"v1": build_v1, "v2": build_v2}

# Phases
PROXY_HEADER, PREREAD, HANDSHAKE, ROUTING, CONNECTING, UPSTREAM_HANDSHAKE, FORWARDING, CLOSED = range(8)


def _proxy_header_need(session: Session, data: bytes) -> int:
    """When the PROXY header can have grown enough to parse again (see proxy_header_need)."""
    return proxy_header_need(data)


def _hello_need(session: Session, data: bytes) -> int:
    """How many bytes must be queued before the ClientHello can be complete (see ClientHelloReader).
    From the first look that found it incomplete on, the session keeps a reader, so each later look
    walks only the records completed since the last one and the next comes no sooner than the hello
    can be complete: a hello sent as thousands of 1-byte records costs a constant work per byte."""
    reader = session.hello_reader
    if reader is None:
        reader = session.hello_reader = ClientHelloReader()
        reader.parse(data, PREREAD_MAX)         # None, as parse_client_hello just found
    return reader.need


def _queued(sock: Connection) -> int:
    """Bytes waiting in a socket's receive queue, without copying them (FIONREAD, 0.8 µs); on an
    error, as many as could be wanted (the peek that follows reports the error).

    A peek is no substitute once a hello is known to be incomplete: it copies everything queued,
    and Linux's tcp_recvmsg walks the receive queue from its head again for every segment a peek
    copies from, so one peek costs the square of the segments queued: measured here, 0.2 ms for
    2,000 queued 6-byte segments, 350 ms for 10,000 when the kernel had not merged them."""
    try:
        return int.from_bytes(fcntl.ioctl(sock.fileno(), termios.FIONREAD, _INT_BYTES), sys.byteorder)
    except OSError:
        return sys.maxsize


def _send_reset(sock: Connection) -> None:
    """Make the coming close() abort the connection with a RST instead of a FIN."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
    except OSError:
        pass


class Session:
    """One client connection and, once connected, its upstream connection."""

    __slots__ = ("worker", "loop", "listen", "client", "client_addr", "upstream", "c2u", "u2c", "phase",
                 "route", "service", "balancer", "tried", "peer", "status",
                 "started", "ended", "connect_started", "connect_time", "timer", "deadline",
                 "scheduled", "serial", "protocol", "sni", "ssl_protocol", "ssl_cipher", "preread_need",
                 "hello_reader", "notes", "_local_ip", "hups")
    started: float          # monotonic seconds (the loop's clock) when accepted
    ended: float            # and when closed

    def __init__(self, worker: Worker, listen: Listen, client: _socket.socket, client_addr: ClientAddress,
                 serial: int):
        self.worker = worker
        self.loop = worker.loop
        self.listen: Listen = listen
        self.client: Connection = client
        self.client_addr: ClientAddress = client_addr
        self.upstream: Connection | None = None
        # The two pumps, made when forwarding starts.
        self.c2u: Pump | None = None
        self.u2c: Pump | None = None
        self.phase = ROUTING
        self.route: Route | None = None
        self.service: Service | None = None
        self.balancer: Balancer | None = None
        self.tried: list[Peer] = []
        self.peer: Peer | None = None
        self.status: int = STATUS_OK
        self.started = self.ended = self.loop.now
        self.connect_started = 0.0
        self.connect_time: float | None = None
        self.timer: Timer | None = None    # the session's one timer (see _phase_deadline)
        self.deadline = 0.0                # when the current phase before forwarding times out
        self.scheduled = False
        self.serial: int = serial
        self.protocol: str = "tls" if listen.ssl else "tcp"
        self.sni: str | None = None
        self.ssl_protocol: str | None = None
        self.ssl_cipher: str | None = None
        self.preread_need = 1
        self.hello_reader: ClientHelloReader | None = None    # once a look found the hello incomplete
        self.notes: dict[str, Any] | None = None    # what plugins wrote on the session (annotate)
        self._local_ip: str | None = None
        self.hups = 0                           # CLIENT_HUP | UPSTREAM_HUP: a FIN or error epoll reported

    # -- accept ---------------------------------------------------------------------------
    def start(self) -> None:
        # Registration is edge-triggered: bytes already waiting are reported right away.
        self.loop.add(self.client.fileno(), STREAM_EVENTS, self.on_client_event)
        if self.listen.proxy_protocol:
            self.phase = PROXY_HEADER
            self._phase_deadline(self.worker.config.proxy_protocol_timeout)
        else:
            self.after_proxy_header()

    def after_proxy_header(self) -> None:
        if self.listen.ssl:
            self.phase = PREREAD
            self._phase_deadline(self.worker.config.ssl.preread_timeout)
        else:
            self.route_phase()

    def local_ip(self) -> str:
        """The address the client connected to ($server_addr); one getsockname only if needed."""
        if self._local_ip is None:
            if self.listen.wildcard:
                try:
                    self._local_ip = self.client.getsockname()[0]
                except OSError:
                    self._local_ip = self.listen.host
            else:
                self._local_ip = self.listen.host
        return self._local_ip

    def describe(self) -> str:
        """Where a log line about this session happened, nginx style."""
        where = f"client: {self.client_addr[0]}:{self.client_addr[1]}, server: {self.listen}"
        return f"{where}, sni: {self.sni}" if self.sni else where

    def log(self, level: str, message: str) -> None:
        """A line about this session in the error log, ending with where it happened (`describe`),
        like nginx's `..., client: ..., server: ...`. The place is only written out for a line
        that the log level lets through."""
        log = self.worker.log
        if log.enabled(level):
            log.log(level, f"{message}; {self.describe()}")

    def _hung_up(self, side: int, sock: Connection | None, pump: Pump | None) -> None:
        """epoll reported a FIN (or an error) on one side: once only (edge-triggered), perhaps in a
        phase that reads nothing. Remembered, so that this side is read until EOF instead of
        trusting a short read (TLSStream._fill, BufferPump; a SplicePump trusts none)."""
        self.hups |= side
        if type(sock) is TLSStream:
            sock.hup = True
        elif type(pump) is BufferPump:
            pump.hup = True

    def on_client_event(self, mask: int) -> None:
        if mask & HUP_EVENTS:
            self._hung_up(CLIENT_HUP, self.client, self.c2u)
        phase = self.phase
        if phase == FORWARDING:
            if mask & IN_EVENTS:
                self.c2u.readable = True
            if mask & OUT_EVENTS:
                self.u2c.writable = True
            self.forward()
            return
        if phase == PREREAD:
            self.preread(ended=bool(mask & HUP_EVENTS))
        elif phase == PROXY_HEADER:
            self.read_proxy_header(ended=bool(mask & HUP_EVENTS))
        elif phase == HANDSHAKE:
            self.handshake()

    # -- PROXY protocol (listeners with the proxy_protocol flag) -----------------------------
    def read_proxy_header(self, ended: bool = False) -> None:
        """Read the PROXY v1/v2 header a load balancer in front sends first, consuming exactly its
        bytes; from then on the address it announces is the client's, for routing and logs."""
        header = self._peek_parse(parse_proxy_header, ProxyProtocolError, PROXY_HEADER_MAX_SIZE,
                                  _proxy_header_need, "PROXY protocol header",
                                  "broken PROXY protocol header", ended)
        if header is None:
            return
        try:
            self.client.recv(header.length)          # the header only; the stream stays queued
        except OSError as exc:
            self._bad_preread(f"reading the PROXY protocol header failed ({exc.errno}: {exc.strerror})")
            return
        self.preread_need = 1
        if header.source is not None:                 # LOCAL / UNKNOWN: the connection's own addresses
            self.client_addr = header.source
        self.after_proxy_header()
        if self.phase == PREREAD:
            self.preread(ended)                        # the hello may already be queued: no new edge comes

    # -- preread (ssl listeners) ----------------------------------------------------------
    def preread(self, ended: bool = False) -> None:
        """Peek at the ClientHello without consuming it: passthrough then forwards it untouched,
        termination lets OpenSSL read it. Bounded by PREREAD_MAX bytes and ssl.preread_timeout.
        `ended`: the client sent its FIN (or reset), so an incomplete hello will never complete."""
        reader = self.hello_reader
        if reader is None:
            parse = parse_client_hello                  # the first look: usually the whole hello is there
        elif not ended and _queued(self.client) < reader.need:
            return                                      # it cannot be complete yet: no peek (see _queued)
        else:
            parse = reader.parse
        hello = self._peek_parse(parse, ClientHelloError, PREREAD_MAX, _hello_need,
                                 "ClientHello", "not a TLS ClientHello", ended)
        if hello is None:
            return
        self.sni = hello.sni
        self.ssl_protocol = hello.protocol
        self.phase = ROUTING
        self.route_phase()

    def _peek_parse(self, parse: Callable[[bytes, int], T | None], error: type[Exception], limit: int,
                    next_need: Callable[[Session, bytes], int], what: str, broken: str,
                    ended: bool) -> T | None:
        """Peek at what the client has sent and `parse` it without consuming a byte.

        Returns the parsed value, or None: when more bytes are needed (`self.preread_need` then
        says how many must be queued before it is worth peeking again: `next_need(self, data)`), or
        when the session was refused — the bytes prove it is not `what` (`broken`: the parser's
        reason), the read failed, or the client sent its FIN (`ended`) before `what` was complete.
        """
        scratch = self.worker.scratch
        try:
            # One peek into the worker's buffer (limit <= its size): no FIONREAD first.
            waiting = self.client.recv_into(scratch, limit, MSG_PEEK)
            if waiting < self.preread_need:
                parsed = None
            else:
                data = bytes(scratch[:waiting])
                parsed = parse(data, limit)
                if parsed is None:
                    self.preread_need = next_need(self, data)
        except error as exc:
            self._bad_preread(f"{broken}: {exc}")
            return None
        except BlockingIOError:
            return None
        except OSError as exc:
            self._bad_preread(f"reading the {what} failed ({exc.errno}: {exc.strerror})")
            return None
        if parsed is None and ended:
            self._bad_preread(f"client closed the connection before a complete {what}")
        return parsed

    def _bad_preread(self, reason: str) -> None:
        self.log("info", reason)
        self._refuse(STATUS_BAD_REQUEST)

    def _refuse(self, status: int) -> None:
        """Close a client we will not serve (or no longer can) with a FIN, not a RST: a close() with
        unread bytes (peeked, or sent before we decided) would make the kernel reset the connection. What has
        arrived is read now; a plain client that has not sent its FIN yet gets ours and is then
        read until it does (LingeringClose), so bytes it sends meanwhile are not answered by a RST."""
        client = self.client
        ended = False
        try:
            for _ in range(4):
                if not client.recv(65536):
                    ended = True
                    break
        except BlockingIOError:
            pass
        except (OSError, ValueError):
            ended = True            # reset or gone: nothing to wait for
        linger = not ended and type(client) is not TLSStream
        if linger:
            try:
                client.shutdown(socket.SHUT_WR)
            except OSError:
                linger = False
        self.close(status, linger)

    # -- route ----------------------------------------------------------------------------
    def route_phase(self) -> None:
        routes = self.worker.router.for_listener(self.listen)
        local_ip = self.local_ip() if routes.needs_local_ip else None
        route = routes.match(self.client_addr[0], self.client_addr[1], local_ip, self.listen.port, self.sni)
        if route is None:
            tls = self.worker.server_tls
            if self.listen.ssl and tls is not None and (tls.has_default or tls.context_for(self.sni)):
                # Like Kong: the client still gets a certificate (its SNI's or the default one)
                # and a completed handshake, and only then the close; nothing reaches an upstream.
                self.start_handshake()
                return
            self._no_route()
            return
        self.route = route
        self.service = self.worker.services[route.service]
        self.balancer = self.worker.balancers[route.service]
        if self.listen.ssl:
            if "tls" in route.protocols:
                self.start_handshake()
                return
            self.protocol = "tls_passthrough"
        self.access_phase()

    def _no_route(self) -> None:
        self.log("info", "no route matched, closing")
        self._refuse(STATUS_NO_ROUTE)

    # -- TLS termination ------------------------------------------------------------------
    def start_handshake(self) -> None:
        self.phase = HANDSHAKE
        self.protocol = "tls"
        self.ssl_protocol = None
        try:
            # Same fd: the registration stays.
            self.client = self.worker.server_tls.wrap(self.client, self.worker.scratch, self.loop)
        except (OSError, ValueError) as exc:
            self.log("error", f"cannot start TLS ({exc})")
            self.close(STATUS_INTERNAL)
            return
        self._phase_deadline(self.worker.config.ssl.handshake_timeout)
        self.handshake()

    def handshake(self) -> None:
        try:
            if not self.client.handshake():
                return
        except (ssl.SSLError, OSError) as exc:
            self.log("info", f"SSL handshake with the client failed ({_ssl_reason(exc)})")
            if self.worker.metrics is not None:
                self.worker.metrics.handshake(ok=False)
            self.close(STATUS_BAD_REQUEST)
            return
        if self.worker.metrics is not None:
            self.worker.metrics.handshake(ok=True)
        self.ssl_protocol = self.client.version()
        cipher = self.client.cipher()
        self.ssl_cipher = cipher[0] if cipher else None
        if self.route is None:
            self._no_route()
            return
        self.phase = ROUTING
        self.access_phase()

    # -- access ---------------------------------------------------------------------------
    def access_phase(self) -> None:
        """The route's plugins, highest priority first; the first that answers a status refuses."""
        for plugin in self.worker.plugins.for_route(self.route):
            status = plugin.access(self)
            if status:
                self._refuse(status)
                return
        self.connect_phase()

    def annotate(self, key: str, value: Any) -> None:
        """A plugin's note on this session, read back in its log hook (or by other plugins)."""
        if self.notes is None:
            self.notes = {}
        self.notes[key] = value

    def annotation(self, key: str, default: Any = None) -> Any:
        return default if self.notes is None else self.notes.get(key, default)

    # -- connect --------------------------------------------------------------------------
    def connect_phase(self) -> None:
        self.phase = CONNECTING
        self.connect_started = self.loop.now
        self.try_next_peer()

    def _hash_key(self) -> str:
        if self.balancer.hash_on == "sni" and self.sni:
            return self.sni
        return self.client_addr[0]

    def try_next_peer(self) -> None:
        service = self.service
        if len(self.tried) > service.retries:
            self._give_up()
            return
        peer = self.balancer.pick(self.loop.now, self._hash_key(), self.tried)
        if peer is None:
            self._give_up()
            return
        self.tried.append(peer)
        self.phase = CONNECTING
        self.hups &= ~UPSTREAM_HUP          # what the last attempt's socket reported is not ours
        try:
            # The C socket type: socket.socket's Python __init__ and close() add nothing we use.
            sock = _socket.socket(peer.family, UPSTREAM_SOCKET_TYPE)
        except OSError as exc:
            # EMFILE/ENFILE/ENOBUFS: this worker is out of resources, not the upstream's fault.
            self.log("error", f"socket() failed ({exc.errno}: {exc.strerror}) while connecting to "
                              f"upstream {peer.name}")
            self._refuse(STATUS_INTERNAL)
            return
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        congestion = self.worker.congestion.get(service.name)
        if congestion is not None:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, congestion)
            except OSError:
                pass        # the worker tried it at start; this connection keeps the host's default
        err = sock.connect_ex(peer.addr)
        if err not in (0, errno.EINPROGRESS):
            sock.close()
            self._connect_failed(peer, f"failed ({err}: {os.strerror(err)})", timed_out=False)
            return
        self.upstream = sock
        self.loop.add(sock.fileno(), STREAM_EVENTS, self.on_upstream_event)
        self._phase_deadline(service.connect_timeout)

    def _give_up(self) -> None:
        tried = ", ".join(p.name for p in self.tried) or "none"
        self.log("error", f'no upstream could be reached for service "{self.service.name}" (tried: {tried})')
        self._refuse(STATUS_BAD_GATEWAY)

    def _drop_upstream(self) -> None:
        sock = self.upstream
        if sock is not None:
            self.upstream = None
            self.loop.forget(sock.fileno())
            sock.close()

    def _connect_failed(self, peer: Peer, reason: str, timed_out: bool) -> None:
        self._drop_upstream()
        self.balancer.failed(peer, self.loop.now, timed_out)
        self.log("error", f"connect() to {peer.name} {reason} while connecting to upstream")
        self.try_next_peer()

    def on_upstream_event(self, mask: int) -> None:
        if mask & HUP_EVENTS:
            self._hung_up(UPSTREAM_HUP, self.upstream, self.u2c)
        phase = self.phase
        if phase == FORWARDING:
            if mask & IN_EVENTS:
                self.u2c.readable = True
            if mask & OUT_EVENTS:
                self.c2u.writable = True
            self.forward()
        elif phase == CONNECTING:
            # A failed connect always raises EPOLLERR (Linux sets the socket's error first), so
            # only then is SO_ERROR worth a system call: a plain EPOLLOUT means connected.
            err = self.upstream.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) if mask & ERR_EVENTS else 0
            if err:
                self._connect_failed(self.tried[-1], f"failed ({err}: {os.strerror(err)})", timed_out=False)
            elif mask & EPOLLOUT:
                self._tcp_connected()
        elif phase == UPSTREAM_HANDSHAKE:
            self.upstream_handshake()

    def _tcp_connected(self) -> None:
        send_header = SEND_PROXY_HEADER.get(self.service.proxy_protocol)
        if send_header is not None and not self._send_proxy_header(send_header):
            return
        tls = self.worker.upstream_tls.get(self.service.name)
        if tls is None:
            self._connected()
            return
        self.phase = UPSTREAM_HANDSHAKE
        try:
            self.upstream = tls.wrap(self.upstream, self.worker.scratch, self.sni, self.loop)
        except (OSError, ValueError) as exc:
            self._connect_failed(self.tried[-1], f"could not start TLS ({exc})", timed_out=False)
            return
        self.upstream_handshake()

    def _send_proxy_header(self, build: Callable[[tuple[str, int], tuple[str, int]], bytes]) -> bool:
        """Tell the upstream who the client is (before any TLS: the header precedes the stream)."""
        header = build((self.client_addr[0], self.client_addr[1]), (self.local_ip(), self.listen.port))
        try:
            # A fresh socket's send buffer is empty: a header of at most a few hundred bytes fits.
            sent = self.upstream.send(header)
        except OSError as exc:
            self._connect_failed(self.tried[-1], f"failed sending the PROXY header ({exc.strerror})",
                                 timed_out=False)
            return False
        if sent != len(header):
            self._connect_failed(self.tried[-1], "failed sending the PROXY header (short write)",
                                 timed_out=False)
            return False
        return True

    def upstream_handshake(self) -> None:
        try:
            if not self.upstream.handshake():
                return
        except ssl.SSLCertVerificationError as exc:
            self._connect_failed(self.tried[-1], f"failed: upstream SSL certificate verify failed "
                                                 f"({exc.verify_message})", timed_out=False)
            return
        except (ssl.SSLError, OSError) as exc:
            self._connect_failed(self.tried[-1], f"failed: SSL handshake with the upstream failed "
                                                 f"({_ssl_reason(exc)})", timed_out=False)
            return
        self._connected()

    def _connected(self) -> None:
        now = self.loop.now
        peer = self.tried[-1]
        self.peer = peer
        self.balancer.connected(peer, now)
        self.connect_time = now - self.connect_started
        self.forward_phase()

    # -- forward --------------------------------------------------------------------------
    def forward_phase(self) -> None:
        client, upstream = self.client, self.upstream
        # recv/send first; two plain sockets switch a direction to splice once it carries bulk.
        pool = None if isinstance(client, TLSStream) or isinstance(upstream, TLSStream) else self.worker.pool
        scratch = self.worker.scratch
        self.c2u = BufferPump(scratch, client, upstream, pool)
        self.u2c = BufferPump(scratch, upstream, client, pool)
        self.c2u.hup = bool(self.hups & CLIENT_HUP)
        self.u2c.hup = bool(self.hups & UPSTREAM_HUP)
        # What we know of readiness so far; anything unknown is simply tried (EAGAIN costs little).
        self.c2u.readable = True
        self.c2u.writable = True
        self.u2c.readable = True
        self.u2c.writable = True
        self.phase = FORWARDING
        now = self.loop.now
        self.c2u.last_io = self.u2c.last_io = now
        self._due_by(now + min(self.service.read_timeout, self.service.write_timeout))
        self.forward()

    def forward(self) -> None:
        now = self.loop.now
        up = self.c2u.run(now)
        if up >= SRC_ERROR:
            self._pump_failed(self.c2u, up, client_is_source=True)
            return
        if up == MORE and self.c2u.bulk:
            self.c2u = self.c2u.spliced()
        down = self.u2c.run(now)
        if down >= SRC_ERROR:
            self._pump_failed(self.u2c, down, client_is_source=False)
            return
        if down == MORE and self.u2c.bulk:
            self.u2c = self.u2c.spliced()
        if up == DONE and down == DONE:
            self.close(STATUS_OK)
        elif (up == MORE or down == MORE) and not self.scheduled:
            self.scheduled = True
            self.loop.call_soon(self._resume)

    def _resume(self) -> None:
        self.scheduled = False
        if self.phase == FORWARDING:
            self.forward()

    def _pump_failed(self, pump: Pump, result: int, client_is_source: bool) -> None:
        """A reset (or a vanished peer) on one side becomes a reset on the other side; a failure
        of our own (no fd for a pipe) ends the session with 500 and resets nobody.

        An upstream that fails once it has done its part (see _upstream_done) has ended the
        session, not broken it: PostgreSQL, say, closes on a client's Terminate with the client's
        close_notify still unread, which makes its kernel send a reset. As nginx (whose stream
        proxy takes a read error for the end of the stream), that is status 200, and the client
        gets a FIN, not a RST that could destroy the reply it has not read yet. While pyproxy
        still held bytes for either side, they are lost: 502, and the reset is passed on."""
        err = pump.error
        if result == LOCAL_ERROR:
            self.log("error", f"cannot get a pipe ({err}: {os.strerror(err)}) while proxying")
            self.close(STATUS_INTERNAL)
            return
        client_side = (result == SRC_ERROR) == client_is_source
        what = f"connection {'reset' if err == errno.ECONNRESET else 'failed'} ({err}: {os.strerror(err)})"
        status = STATUS_OK if client_side else STATUS_BAD_GATEWAY
        if client_side and type(self.client) is TLSStream and self.client.renegotiation_refused:
            # nginx logs "SSL renegotiation disabled" and drops the connection; the client has its
            # no_renegotiation alert (TLSStream._answer_peer). A protocol violation: 400.
            self.log("notice", "client tried to renegotiate TLS, which is disabled, closing")
            status = STATUS_BAD_REQUEST
        elif not client_side and self._upstream_done():
            self.log("info", f"upstream {what} after all data was delivered, closing")
            if type(self.client) is TLSStream:
                self.client.close_notify()
            self._refuse(STATUS_OK)
            return
        else:
            self.log("info", f"{'client' if client_side else 'upstream'} {what} while proxying")
        other = self.upstream if client_side else self.client
        if other is not None:
            _send_reset(other)
        self.close(status)

    def _upstream_done(self) -> bool:
        """Whether a failing upstream had done its part: every byte read from either side went to
        the other side's socket (none held in a buffer, a pipe or TLS records not sent yet, none
        lost in a failed write), and the client had ended its stream or been answered. (An
        upstream that resets a client still sending, without a word, failed it.)"""
        c2u, u2c = self.c2u, self.u2c
        for pump in (c2u, u2c):
            if pump.received != pump.sent or pump.pending:
                return False
        return c2u.eof or u2c.received > 0

    # -- timeouts -------------------------------------------------------------------------
    def _phase_deadline(self, delay: float) -> None:
        """The current phase (PROXY header, preread, handshake, connect attempt) must be over within
        `delay` seconds. One timer serves every phase, lazily, like the forwarding one: it is only
        moved when the new deadline comes sooner than it is set for; when it fires too early,
        on_timer sets it again. A short session so costs one timer, not one per phase."""
        self.deadline = self.loop.now + delay
        self._due_by(self.deadline)

    def _due_by(self, deadline: float) -> None:
        """Have the timer fire no later than `deadline`; a timer set sooner stays as it is."""
        if self.timer is None or self.timer.deadline > deadline:
            self._set_timer(deadline)

    def _set_timer(self, deadline: float) -> None:
        if self.timer is not None:
            self.timer.cancel()
        self.timer = self.loop.call_at(deadline, self.on_timer)

    def on_timer(self) -> None:
        """The current phase's timeout, or only a check that it is not due yet."""
        self.timer = None
        phase = self.phase
        if phase == FORWARDING:
            self._forwarding_timeouts()
        elif phase == CLOSED:
            return
        elif self.loop.now < self.deadline:
            self._set_timer(self.deadline)
        elif phase == PREREAD:
            self._bad_preread(f"no complete ClientHello within {self.worker.config.ssl.preread_timeout:g}s "
                              f"(ssl.preread_timeout)")
        elif phase == HANDSHAKE:
            self.log("info", f"SSL handshake timed out after {self.worker.config.ssl.handshake_timeout:g}s")
            self.close(STATUS_BAD_REQUEST)
        elif phase in (CONNECTING, UPSTREAM_HANDSHAKE):
            self._connect_failed(self.tried[-1], f"timed out after {self.service.connect_timeout:g}s "
                                                 f"(connect_timeout)", timed_out=True)
        elif phase == PROXY_HEADER:
            self._bad_preread("no PROXY protocol header within "
                              f"{self.worker.config.proxy_protocol_timeout:g}s "
                              f"(proxy_protocol_timeout)")

    def _forwarding_timeouts(self) -> None:
        """Forwarding's lazy timer: idle (read_timeout) and stuck writes (write_timeout).

        It comes due at the idle deadline, or sooner: within write_timeout of now when nothing is
        stuck (so a stall that starts later is caught on time), at the stall's deadline when a
        peer stopped taking bytes.
        """
        now = self.loop.now
        service = self.service
        idle_deadline = max(self.c2u.last_io, self.u2c.last_io) + service.read_timeout
        if idle_deadline <= now:
            self.log("info", f"session idle for {service.read_timeout:g}s (read_timeout), closing")
            self.close(STATUS_OK)
            return
        deadline = min(idle_deadline, now + service.write_timeout)
        for pump in (self.c2u, self.u2c):
            if pump.blocked_at and pump.pending:
                write_deadline = pump.blocked_at + service.write_timeout
                if write_deadline <= now:
                    self.log("info", f"write timed out after {service.write_timeout:g}s "
                                     f"(write_timeout) while proxying")
                    self.close(STATUS_OK)
                    return
                deadline = min(deadline, write_deadline)
        self._set_timer(deadline)

    # -- log ------------------------------------------------------------------------------
    def bytes_received(self) -> int:
        return self.c2u.received if self.c2u else 0

    def bytes_sent(self) -> int:
        return self.u2c.sent if self.u2c else 0

    def upstream_bytes_sent(self) -> int:
        return self.c2u.sent if self.c2u else 0

    def upstream_bytes_received(self) -> int:
        return self.u2c.received if self.u2c else 0

    def close(self, status: int, linger: bool = False) -> None:
        """End the session: close both sockets, give back pipes and the peer, write the log line.
        `linger`: the client socket (already shut down for writing) goes to a LingeringClose instead."""
        if self.phase == CLOSED:
            return
        self.phase = CLOSED
        self.status = status
        self.ended = self.loop.now
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self._drop_upstream()
        if linger:
            self.worker.linger(self.client)
        else:
            self.loop.forget(self.client.fileno())
            self.client.close()
        if self.c2u is not None:
            self.c2u.release()
            self.u2c.release()
        if self.peer is not None:
            self.balancer.released(self.peer)
        self.worker.session_closed(self)


class LingeringClose:
    """A refused plain client after our FIN: what it still sends is read and dropped until its own
    FIN, an error, or LINGER_TIMEOUT, then the socket is closed. Closing at once with bytes arriving
    would answer them with a RST, and a RST can destroy the refusal before the client read it
    (nginx's HTTP `lingering_close` does the same for the same reason)."""

    __slots__ = ("loop", "sock", "fd", "scratch", "held", "timer")

    def __init__(self, loop: Loop, sock: Connection, scratch: memoryview, held: set[LingeringClose]):
        self.loop = loop
        self.sock = sock
        self.fd = sock.fileno()
        self.scratch = scratch
        self.held = held
        held.add(self)
        loop.rebind(self.fd, self.on_event)     # still registered, edge-triggered: no epoll_ctl
        self.timer = loop.call_later(LINGER_TIMEOUT, self.close)
        # The refusal's reads may have stopped with bytes still queued: no new edge reports them.
        self.on_event(0)

    def on_event(self, mask: int) -> None:
        recv_into = self.sock.recv_into
        scratch = self.scratch
        try:
            for _ in range(LINGER_READS):
                if not recv_into(scratch):
                    break                        # its FIN: done
            else:
                return                           # still streaming: the next edge comes back here
        except BlockingIOError:
            return
        except OSError:
            pass
        self.timer.cancel()
        self.close()

    def close(self) -> None:
        if self in self.held:
            self.held.discard(self)
            self.loop.forget(self.fd)
            self.sock.close()


def _ssl_reason(exc: Exception) -> str:
    """OpenSSL's short reason ("WRONG_VERSION_NUMBER") or the OS error, for one log line."""
    reason = getattr(exc, "reason", None)
    if reason:
        return str(reason)
    if isinstance(exc, OSError) and exc.errno:
        return f"{exc.errno}: {exc.strerror}"
    return str(exc) or exc.__class__.__name__
