"""What the parts of a session share: its phases, event masks and types, and `SessionBase`, the
state and methods every part may use (see pyproxy.session for how the parts make up a Session).
"""

from __future__ import annotations

import _socket
import socket
import struct
from typing import TYPE_CHECKING

from pyproxy.forward import BufferPump, SplicePump
from pyproxy.loop import EPOLLERR, EPOLLHUP, EPOLLIN, EPOLLOUT, EPOLLRDHUP
from pyproxy.tls.stream import TLSStream

if TYPE_CHECKING:
    from pyproxy.config.model import Listen, Route
    from pyproxy.context import WorkerContext
    from pyproxy.loop import Loop, Timer
    from pyproxy.tls.contexts import ServerTLS

# A socket as accept() gives it (the C type), or the TLS connection over it once terminated.
Connection = _socket.socket | TLSStream
# The client's address: accept()'s (an IPv6 one has four fields), or what a PROXY header announced.
ClientAddress = tuple[str, int] | tuple[str, int, int, int]
Pump = BufferPump | SplicePump

IN_EVENTS = EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR
OUT_EVENTS = EPOLLOUT | EPOLLHUP | EPOLLERR
HUP_EVENTS = EPOLLRDHUP | EPOLLHUP | EPOLLERR
ERR_EVENTS = EPOLLHUP | EPOLLERR
CLIENT_HUP = 1
UPSTREAM_HUP = 2
LINGER_RESET = struct.pack("ii", 1, 0)      # SO_LINGER {on, 0s}: close() sends a RST

# Phases. NO_IO: nothing is awaited from either socket; the session runs through code that does
# not wait (routing, the plugins' access checks) and events only set readiness flags.
PROXY_HEADER, PREREAD, HANDSHAKE, NO_IO, CONNECTING, UPSTREAM_HANDSHAKE, FORWARDING, CLOSED = range(8)
# A passthrough session whose client sent PostgreSQL's SSLRequest: the upstream's answer to it is awaited.
UPSTREAM_STARTTLS = 8


def send_reset(sock: Connection) -> None:
    """Make the coming close() abort the connection with a RST instead of a FIN."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
    except OSError:
        pass


def ssl_reason(exc: Exception) -> str:
    """OpenSSL's short reason ("WRONG_VERSION_NUMBER") or the OS error, for one log line."""
    reason = getattr(exc, "reason", None)
    if reason:
        return str(reason)
    if isinstance(exc, OSError) and exc.errno:
        return f"{exc.errno}: {exc.strerror}"
    return str(exc) or exc.__class__.__name__


class SessionBase:
    """The state and methods of a session that every part uses. The parts (ClientPreread,
    UpstreamConnector, Forwarder) derive from it and Session from them all. The slots of all of
    them are laid out here, since only one class of a diamond may have slots (the parts and Session
    have `__slots__ = ()`); each part annotates the state it owns."""

    __slots__ = (
        # Session's
        "ctx", "loop", "listen", "client", "client_addr", "phase", "route", "status", "started", "ended",
        "timer", "deadline", "serial", "protocol", "sni", "alpn", "ssl_protocol", "ssl_cipher", "notes",
        "_local_ip", "hups", "server_tls",
        # ClientPreread's
        "preread_need", "hello_reader", "starttls",
        # UpstreamConnector's
        "service", "balancer", "tried", "peer", "upstream", "connect_started", "connect_time",
        # Forwarder's
        "c2u", "u2c", "scheduled",
    )

    ctx: WorkerContext
    loop: Loop
    listen: Listen
    client: Connection
    client_addr: ClientAddress
    phase: int
    route: Route | None
    status: int
    serial: int
    protocol: str           # "tcp", "tls" (terminated), "tls_passthrough": the access log's $protocol
    sni: str | None
    alpn: tuple[str, ...]   # the ALPN protocols of the client's ClientHello, for routing
    ssl_protocol: str | None
    ssl_cipher: str | None
    hups: int               # CLIENT_HUP | UPSTREAM_HUP: a FIN or error epoll reported
    # The PostgreSQL request the client sent before its ClientHello, which ClientPreread answered:
    # its SSLRequest (replayed to a passthrough upstream by UpstreamConnector), b"" after a
    # GSSENCRequest (nothing to replay), or None.
    starttls: bytes | None
    timer: Timer | None
    deadline: float
    _local_ip: str | None
    # The TLS contexts of the listener it came to (its certificates), None on a listener without ssl.
    server_tls: ServerTLS | None

    if TYPE_CHECKING:
        # Session's, which the parts call.
        def log(self, level: str, message: str) -> None: ...
        def annotate(self, key: str, value: object) -> None: ...
        def local_ip(self) -> str: ...
        def close(self, status: int, linger: bool = False) -> None: ...
        def _refuse(self, status: int) -> None: ...
        def _phase_deadline(self, delay: float) -> None: ...
        def _due_by(self, deadline: float) -> None: ...
        def _set_timer(self, deadline: float) -> None: ...
        def route_phase(self) -> None: ...
        def _no_route(self) -> None: ...
        def access_phase(self) -> None: ...
        def on_upstream_event(self, mask: int) -> None: ...
        # Forwarder's, which the connector ends in.
        def forward_phase(self, upstream_readable: bool = True) -> None: ...
