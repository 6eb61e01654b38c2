"""A proxied session as nginx's stream phases, written as plain methods called in order:

    accept → preread (ssl listeners) → route → access (plugins) → connect (balancer, retries)
           → forward → log

Each phase either moves on to the next or ends the session with an nginx stream status (200, 400,
403, 404, 500, 502, 503) that the access log prints. Sockets are registered once, edge-triggered,
when they appear; events only update readiness flags and then run whatever the current phase needs.

Session is made of parts, one module each, that it inherits (mixins, so a call from one part to
another is a plain method call on the one session object, and a session is one allocation):

    ClientPreread      (pyproxy.preread)    PROXY header, ClientHello preread, TLS with the client
    UpstreamConnector  (pyproxy.connector)  peer choice, connect, retries, PROXY header and TLS upstream
    Forwarder          (pyproxy.forwarder)  the pumps, splice, forwarding's timeouts

Session itself keeps the phase (and passes each socket's events to the part whose phase it is),
routing and the plugins' access phase, the one timer, close, and the accessors the log phase
reads. The parts share pyproxy.phases (phases, event masks, SessionBase); what a session needs of
its worker is a WorkerContext (pyproxy.context).
"""

from __future__ import annotations

import _socket
import socket
from typing import TYPE_CHECKING, Any

from pyproxy.config.model import STATUS_BAD_REQUEST, STATUS_NO_ROUTE, STATUS_OK, Listen
from pyproxy.connector import UpstreamConnector
from pyproxy.forward import BufferPump
from pyproxy.forwarder import Forwarder
from pyproxy.loop import STREAM_EVENTS
from pyproxy.phases import (
    CLIENT_HUP,
    CLOSED,
    CONNECTING,
    FORWARDING,
    HANDSHAKE,
    HUP_EVENTS,
    IN_EVENTS,
    NO_IO,
    OUT_EVENTS,
    PREREAD,
    PROXY_HEADER,
    UPSTREAM_HANDSHAKE,
    UPSTREAM_HUP,
    UPSTREAM_STARTTLS,
    ClientAddress,
    Connection,
)
from pyproxy.plugins import PENDING
from pyproxy.preread import ClientPreread
from pyproxy.tls.stream import TLSStream

if TYPE_CHECKING:
    from pyproxy.context import WorkerContext
    from pyproxy.loop import Loop
    from pyproxy.plugins import Plugin
    from pyproxy.tls.contexts import ServerTLS

__all__ = ["ClientAddress", "Connection", "LINGER_TIMEOUT", "LingeringClose", "Session"]

LINGER_TIMEOUT = 2.0        # how long a refused client may keep sending after our FIN
LINGER_READS = 16           # reads per event while lingering; the rest waits for the next edge


class Session(ClientPreread, UpstreamConnector, Forwarder):
    """One client connection and, once connected, its upstream connection."""

    __slots__ = ()
    started: float          # monotonic seconds (the loop's clock) when accepted
    ended: float            # and when closed
    notes: dict[str, Any] | None    # what plugins wrote on the session (annotate)

    def __init__(self, ctx: WorkerContext, listen: Listen, client: _socket.socket, client_addr: ClientAddress,
                 serial: int, server_tls: ServerTLS | None):
        self.ctx = ctx
        self.loop = loop = ctx.loop
        self.listen = listen
        self.server_tls = server_tls
        self.client = client
        self.client_addr = client_addr
        self.phase = NO_IO
        self.route = None
        self.status = STATUS_OK
        self.started = self.ended = loop.now
        self.timer = None                  # the session's one timer (see _phase_deadline)
        self.deadline = 0.0                # when the current phase before forwarding times out
        self.serial = serial
        self.protocol = "tls" if listen.ssl else "tcp"
        self.sni = None
        self.alpn = ()
        self.ssl_protocol = None
        self.ssl_cipher = None
        self.notes = None
        self._local_ip = None
        self.hups = 0
        # ClientPreread's
        self.preread_need = 1
        self.hello_reader = None
        self.starttls = None
        # UpstreamConnector's (service and balancer: set by routing)
        self.tried = []
        self.peer = None
        self.upstream = None
        self.connect_started = 0.0
        self.connect_time = None
        # Forwarder's (the pumps: see forward_phase)
        self.scheduled = False

    # -- accept ---------------------------------------------------------------------------
    def start(self) -> None:
        # Registration is edge-triggered: bytes already waiting are reported right away.
        self.loop.add(self.client.fileno(), STREAM_EVENTS, self.on_client_event)
        listen = self.listen
        # What after_proxy_header does, written out: one call fewer for a session without PROXY header.
        if listen.proxy_protocol:
            self.phase = PROXY_HEADER
            self._phase_deadline(self.ctx.config.proxy_protocol_timeout)
        elif listen.ssl:
            self.phase = PREREAD
            self._phase_deadline(self.ctx.config.ssl.preread_timeout)
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
        log = self.ctx.log
        if log.enabled(level):
            log.log(level, f"{message}; {self.describe()}")

    # -- events ---------------------------------------------------------------------------
    def _hung_up(self, side: int, sock: Connection | None) -> None:
        """epoll reported a FIN (or an error) on one side: once only (edge-triggered), perhaps in a
        phase that reads nothing. Remembered, so that this side is read until EOF instead of
        trusting a short read (TLSStream._fill, BufferPump; a SplicePump trusts none)."""
        self.hups |= side
        if type(sock) is TLSStream:
            sock.hup = True
        elif self.phase == FORWARDING:
            pump = self.c2u if side == CLIENT_HUP else self.u2c
            if type(pump) is BufferPump:
                pump.hup = True

    def on_client_event(self, mask: int) -> None:
        if mask & HUP_EVENTS:
            self._hung_up(CLIENT_HUP, self.client)
        phase = self.phase
        if phase == FORWARDING:
            # Edge-triggered epoll reports EPOLLOUT with every event of a writable socket: it only
            # concerns the pump that writes here if that pump was waiting for it, or waits for its
            # close_notify, which waits for the client's records to be read (see forward_up).
            u2c = self.u2c
            down = (mask & OUT_EVENTS and not u2c.writable) or (u2c.eof and not u2c.done)
            if down:
                u2c.writable = True
            if mask & IN_EVENTS:
                self.c2u.readable = True
                if down:
                    self.forward()
                else:
                    self.forward_up()
            elif down:
                self.forward_down()
            return
        # Before forwarding, only what the client sends moves a phase on: the EPOLLOUT alone of a
        # fresh registration (reported at the first poll, before the hello may be there) would only
        # cost a read that finds nothing. (A handshake also waits for EPOLLOUT: see handshake.)
        if phase == PREREAD:
            if mask & IN_EVENTS:
                self.preread(ended=bool(mask & HUP_EVENTS))
        elif phase == PROXY_HEADER:
            if mask & IN_EVENTS:
                self.read_proxy_header(ended=bool(mask & HUP_EVENTS))
        elif phase == HANDSHAKE:
            self.handshake(mask)

    def on_upstream_event(self, mask: int) -> None:
        if mask & HUP_EVENTS:
            self._hung_up(UPSTREAM_HUP, self.upstream)
        phase = self.phase
        if phase == FORWARDING:
            c2u = self.c2u
            up = ((mask & OUT_EVENTS and not c2u.writable) or (c2u.eof and not c2u.done)
                  or c2u.tls_dst is not None)
            if up:
                c2u.writable = True
            if mask & IN_EVENTS:
                self.u2c.readable = True
                if up:
                    self.forward()
                else:
                    self.forward_down()
            elif up:
                self.forward_up()
        elif phase == CONNECTING:
            self.connect_event(mask)
        elif phase == UPSTREAM_HANDSHAKE:
            self.upstream_handshake()
        elif phase == UPSTREAM_STARTTLS:
            self.upstream_starttls()

    # -- route ----------------------------------------------------------------------------
    def route_phase(self) -> None:
        ctx = self.ctx
        routes = ctx.router.for_listener(self.listen)
        local_ip = self.local_ip() if routes.needs_local_ip else None
        route = routes.match(self.client_addr[0], self.client_addr[1], local_ip, self.listen.port, self.sni,
                             self.alpn)
        if route is None:
            tls = self.server_tls
            if tls is not None and (tls.has_default or tls.context_for(self.sni)):
                # Like Kong: the client still gets a certificate (its SNI's or the default one)
                # and a completed handshake, and only then the close; nothing reaches an upstream.
                self.start_handshake()
                return
            self._no_route()
            return
        self.route = route
        self.service = ctx.services[route.service]
        self.balancer = ctx.balancers[route.service]
        if self.listen.ssl:
            if "tls" in route.protocols:
                self.start_handshake()
                return
            self.protocol = "tls_passthrough"
        self.access_phase()

    def _no_route(self) -> None:
        self.log("info", "no route matched, closing")
        self._refuse(STATUS_NO_ROUTE)

    # -- access ---------------------------------------------------------------------------
    def access_phase(self) -> None:
        """The route's plugins, highest priority first; the first that answers a status refuses."""
        for plugin in self.ctx.plugins.for_route(self.route):
            status = plugin.access(self)
            if status:
                if status == PENDING:
                    return          # the plugin waits for an answer, then calls resume_access
                self._refuse(status)
                return
        self.connect_phase()

    def resume_access(self, plugin: Plugin, status: int | None) -> None:
        """The verdict of a plugin whose access answered PENDING (it asked Redis): refuse, or run
        the plugins after it and go on. Nothing is awaited from the client meanwhile (NO_IO)."""
        if self.phase == CLOSED:
            return
        if status:
            self._refuse(status)
            return
        chain = self.ctx.plugins.for_route(self.route)
        for later in chain[chain.index(plugin) + 1:]:
            status = later.access(self)
            if status:
                if status != PENDING:
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

    # -- refusal and close -----------------------------------------------------------------
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

    # -- timeouts -------------------------------------------------------------------------
    def _phase_deadline(self, delay: float) -> None:
        """The current phase (PROXY header, preread, handshake, connect attempt) must be over within
        `delay` seconds. One timer serves every phase, lazily, like the forwarding one: it is only
        moved when the new deadline comes sooner than it is set for; when it fires too early,
        on_timer sets it again. A short session so costs one timer, not one per phase. (_due_by's
        test, written out: a phase's start is on every session's path.)"""
        self.deadline = deadline = self.loop.now + delay
        if self.timer is None or self.timer.deadline > deadline:
            self._set_timer(deadline)

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
            self._bad_preread(f"no complete ClientHello within {self.ctx.config.ssl.preread_timeout:g}s "
                              f"(ssl.preread_timeout)")
        elif phase == HANDSHAKE:
            self.log("info", f"SSL handshake timed out after {self.ctx.config.ssl.handshake_timeout:g}s")
            self.close(STATUS_BAD_REQUEST)
        elif phase in (CONNECTING, UPSTREAM_HANDSHAKE, UPSTREAM_STARTTLS):
            self._connect_failed(self.tried[-1], f"timed out after {self.service.connect_timeout:g}s "
                                                 f"(connect_timeout)", timed_out=True)
        elif phase == PROXY_HEADER:
            self._bad_preread("no PROXY protocol header within "
                              f"{self.ctx.config.proxy_protocol_timeout:g}s "
                              f"(proxy_protocol_timeout)")

    # -- log ------------------------------------------------------------------------------
    # The byte counts are the pumps'; a session that never forwarded has none (connect_time is set
    # right before forward_phase makes them).
    def bytes_received(self) -> int:
        return self.c2u.received if self.connect_time is not None else 0

    def bytes_sent(self) -> int:
        return self.u2c.sent if self.connect_time is not None else 0

    def upstream_bytes_sent(self) -> int:
        return self.c2u.sent if self.connect_time is not None else 0

    def upstream_bytes_received(self) -> int:
        return self.u2c.received if self.connect_time is not None else 0

    def close(self, status: int, linger: bool = False) -> None:
        """End the session: close both sockets, give back pipes and the peer, write the log line.
        `linger`: the client socket (already shut down for writing) goes to a LingeringClose instead."""
        phase = self.phase
        if phase == CLOSED:
            return
        self.phase = CLOSED
        self.status = status
        self.ended = self.loop.now
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self._drop_upstream()
        if linger:
            self.ctx.linger(self.client)
        else:
            self.loop.forget(self.client.fileno())
            self.client.close()
        if phase == FORWARDING:
            self.c2u.release()
            self.u2c.release()
        if self.peer is not None:
            self.balancer.released(self.peer)
        self.ctx.closed(self)


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

