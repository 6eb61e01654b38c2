"""The client side of a session before routing: the PROXY protocol header, the ClientHello preread
of `ssl` listeners, and the TLS handshake with the client when the route terminates TLS.

Nothing here consumes a byte the upstream should see: the PROXY header is read exactly, the
ClientHello only peeked at (passthrough forwards it untouched, termination lets OpenSSL read it).
PostgreSQL's SSLRequest, which a client sends before its ClientHello and waits for an answer to, is
consumed and answered here; a passthrough upstream is sent it again (UpstreamConnector), a
terminating route's upstream gets the plain protocol that follows the handshake, as it would from a
client with `sslmode=disable`.
"""

from __future__ import annotations

import _socket
import fcntl
import socket
import ssl
import sys
import termios
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

from pyproxy.accesslog import rfc2253_subject
from pyproxy.config.model import STATUS_BAD_REQUEST, STATUS_INTERNAL, STATUS_NO_ROUTE
from pyproxy.forward import SCRATCH_SIZE
from pyproxy.loop import EPOLLIN
from pyproxy.phases import HANDSHAKE, IN_EVENTS, NO_IO, PREREAD, Connection, SessionBase, ssl_reason
from pyproxy.proxy_protocol import DEFAULT_MAX_SIZE as PROXY_HEADER_MAX_SIZE
from pyproxy.proxy_protocol import ProxyProtocolError, parse_proxy_header, proxy_header_need
from pyproxy.tls.clienthello import ClientHelloError, ClientHelloReader, StartTLSRequest, parse_client_hello

if TYPE_CHECKING:
    from pyproxy.config.model import Route
    from pyproxy.tls.stream import TLSStream

T = TypeVar("T")

PREREAD_MAX = SCRATCH_SIZE                   # bytes of ClientHello we wait for (peeked into scratch)
MSG_PEEK = socket.MSG_PEEK
_INT_BYTES = bytes(4)
# What OpenSSL says when the server has no certificate the client can take (none at all, or none
# signed with an algorithm the client offers): TLS 1.3's and TLS 1.2's words for it.
NO_CERTIFICATE_REASONS = frozenset(("NO_SUITABLE_SIGNATURE_ALGORITHM", "NO_SHARED_CIPHER"))
# What it says when `ssl.client_certificate.verify: on` and the client sent none (TLS 1.3, 1.2).
NO_CLIENT_CERTIFICATE_REASONS = frozenset(("PEER_DID_NOT_RETURN_A_CERTIFICATE", "CERTIFICATE_REQUIRED"))
X509_V_ERR_CERT_CHAIN_TOO_LONG = 22
# PostgreSQL's requests before its ClientHello (protocol.html, "SSL Session Encryption"): an Int32
# length (8) and an Int32 code, 80877103 (SSLRequest, answered `S`: TLS follows) or 80877104
# (GSSENCRequest, answered `N`: no GSSAPI encryption here, and the client may ask for TLS instead).
SSL_REQUEST = b"\x00\x00\x00\x08\x04\xd2\x16\x2f"
GSSENC_REQUEST = b"\x00\x00\x00\x08\x04\xd2\x16\x30"
START_TLS_REQUEST_LENGTH = 8
GSSENC_ANSWERED = b""       # `starttls` once a GSSENCRequest was answered: nothing to replay upstream


def _proxy_header_need(session: ClientPreread, data: bytes) -> int:
    """When the PROXY header can have grown enough to parse again (see proxy_header_need)."""
    return proxy_header_need(data)


def _hello_need(session: ClientPreread, data: bytes) -> int:
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


class ClientPreread(SessionBase):
    """PROXY header → ClientHello preread → (routing, in Session) → TLS handshake with the client.

    Session.start sets the first phase (PROXY_HEADER or PREREAD); each step ends in the next one, in
    Session.route_phase, or with a refusal (400, 500). Session passes it the client's events in the
    PROXY_HEADER, PREREAD and HANDSHAKE phases and its timer's expiry (on_timer)."""

    __slots__ = ()
    preread_need: int                           # bytes that must be queued before the next peek
    hello_reader: ClientHelloReader | None      # once a look found the hello incomplete

    def after_proxy_header(self) -> None:
        if self.listen.ssl:
            self.phase = PREREAD
            self._phase_deadline(self.ctx.config.ssl.preread_timeout)
        else:
            self.route_phase()

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
        self.alpn = hello.alpn
        self.ssl_protocol = hello.protocol
        self.phase = NO_IO
        self.route_phase()

    def _peek_parse(self, parse: Callable[[bytes, int], T | None], error: type[Exception], limit: int,
                    next_need: Callable[[ClientPreread, bytes], int], what: str, broken: str,
                    ended: bool) -> T | None:
        """Peek at what the client has sent and `parse` it without consuming a byte.

        Returns the parsed value, or None: when more bytes are needed (`self.preread_need` then
        says how many must be queued before it is worth peeking again: `next_need(self, data)`), or
        when the session was refused — the bytes prove it is not `what` (`broken`: the parser's
        reason), the read failed, or the client sent its FIN (`ended`) before `what` was complete.
        """
        scratch = self.ctx.scratch
        client = self.client
        if TYPE_CHECKING:       # for mypy only, here and below: what the phase guarantees
            assert isinstance(client, _socket.socket)
        try:
            # One peek into the worker's buffer (limit <= its size): no FIONREAD first.
            waiting = client.recv_into(scratch, limit, MSG_PEEK)
            if waiting < self.preread_need:
                parsed = None
            else:
                data = bytes(scratch[:waiting])
                parsed = parse(data, limit)
                if parsed is None:
                    self.preread_need = next_need(self, data)
        except StartTLSRequest as exc:            # (only the ClientHello's parser raises it)
            self._start_tls_request(data, str(exc), ended)
            return None
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

    def _start_tls_request(self, data: bytes, not_tls: str, ended: bool) -> None:
        """The client's first bytes start with 0x00: PostgreSQL's SSLRequest is answered `S` and
        its GSSENCRequest `N` (each consumed, as a PostgreSQL server does), and the ClientHello
        that follows is read as any other; anything else is not TLS. Like PostgreSQL since
        CVE-2021-23214, bytes sent after a request before its answer are refused: they would
        have to be taken as the encrypted stream's, which they are not."""
        request = data[:START_TLS_REQUEST_LENGTH]
        answered = self.starttls
        if request == SSL_REQUEST and answered != SSL_REQUEST:
            name, answer = "SSLRequest", b"S"
        elif request == GSSENC_REQUEST and answered is None:
            name, answer = "GSSENCRequest", b"N"
        elif (len(data) < START_TLS_REQUEST_LENGTH and not ended
              and (SSL_REQUEST.startswith(data) or GSSENC_REQUEST.startswith(data))):
            self.preread_need = START_TLS_REQUEST_LENGTH      # the rest of the request
            return
        else:
            after = " after the PostgreSQL SSLRequest" if answered == SSL_REQUEST else ""
            self._bad_preread(f"not a TLS ClientHello{after}: {not_tls}")
            return
        if len(data) > START_TLS_REQUEST_LENGTH:
            self._bad_preread(f"PostgreSQL client sent {len(data) - START_TLS_REQUEST_LENGTH} bytes "
                              f"after its {name}, before the answer")
            return
        try:
            self.client.recv(START_TLS_REQUEST_LENGTH)     # peeked: all there
            self.client.send(answer)                       # a fresh socket's buffer takes a byte
        except OSError as exc:
            self._bad_preread(f"answering the PostgreSQL {name} failed ({exc.errno}: {exc.strerror})")
            return
        self.starttls = SSL_REQUEST if answer == b"S" else GSSENC_ANSWERED
        self.preread_need = 1
        if ended:
            self._bad_preread(f"client closed the connection after its PostgreSQL {name}")

    def _bad_preread(self, reason: str) -> None:
        self.log("info", reason)
        self._refuse(STATUS_BAD_REQUEST)

    # -- TLS termination ------------------------------------------------------------------
    def start_handshake(self) -> None:
        server_tls, client, route = self.server_tls, self.client, self.route
        if TYPE_CHECKING:       # an ssl listener's worker has server contexts; not terminated yet
            assert server_tls is not None and isinstance(client, _socket.socket)
        if route is not None and (route.client_certificate is not None or route.ssl_alpn is not None):
            server_tls = server_tls.routes[route.name]      # its contexts: its certificate, its ALPN
        self.phase = HANDSHAKE
        self.protocol = "tls"
        self.ssl_protocol = None
        try:
            # Same fd: the registration stays.
            self.client = server_tls.wrap(client, self.ctx.scratch, self.loop)
        except (OSError, ValueError) as exc:
            self.log("error", f"cannot start TLS ({exc})")
            self.close(STATUS_INTERNAL)
            return
        self._phase_deadline(self.ctx.config.ssl.handshake_timeout)
        self.handshake()

    def handshake(self, mask: int = EPOLLIN) -> None:
        """One step of the handshake with the client, on an event of its socket (`mask`)."""
        client, ctx = self.client, self.ctx
        server_tls = ctx.server_tls
        if TYPE_CHECKING:
            assert isinstance(client, TLSStream) and server_tls is not None
        if not mask & IN_EVENTS and client.backlog is None:
            return      # writable, with nothing of ours waiting for it: no step to take
        metrics = ctx.metrics
        try:
            if not client.handshake():
                return
        except (ssl.SSLError, OSError) as exc:
            reason = ssl_reason(exc)
            if isinstance(exc, ssl.SSLCertVerificationError):
                self._client_certificate_refused(exc.verify_code, exc.verify_message)
                return
            if reason in NO_CLIENT_CERTIFICATE_REASONS:
                self.annotate("ssl_client_verify", "NONE")
                self.log("info", "client sent no required SSL certificate")
            elif reason in NO_CERTIFICATE_REASONS:
                self.log("notice", f"no certificate for SNI {self.sni or '(none)'} that the client can "
                                   f"use ({reason}); set ssl.default_certificate or add one for it")
            else:
                self.log("info", f"SSL handshake with the client failed ({reason})")
            if metrics is not None:
                metrics.handshake(ok=False)
            self.close(STATUS_BAD_REQUEST)
            return
        route = self.route
        if route is not None and route.client_certificate is not None:
            depth: int | None = route.client_certificate.depth
        else:
            depth = server_tls.client_depth
        if depth is not None and not self._client_chain_fits(client, depth):
            return
        if metrics is not None:
            metrics.handshake(ok=True)
        self.ssl_protocol = client.negotiated
        cipher = client.obj.cipher()    # OpenSSL's answer, without the stream's wrapper
        self.ssl_cipher = cipher[0] if cipher else None
        if route is None:
            self._no_route()
            return
        if route.client_identities and not self._route_on_certificate(client, route):
            return
        self.phase = NO_IO
        self.access_phase()

    def _route_on_certificate(self, client: TLSStream, first: Route) -> bool:
        """`first` won with its client_identities taken as matching; now that the certificate is
        verified, route again knowing its identity (its subject and subjectAltNames). The new
        winner must ask for the certificate the handshake asked for (or none): a route whose
        `ssl.client_certificate` is another was not checked against. False: the session ended."""
        cert = client.obj.getpeercert()
        identity: frozenset[str] = frozenset()
        if cert:
            identity = frozenset((rfc2253_subject(cert),
                                  *(f"{kind}:{value}" for kind, value in cert.get("subjectAltName", ()))))
        ctx = self.ctx
        routes = ctx.router.for_listener(self.listen)
        local_ip = self.local_ip() if routes.needs_local_ip else None
        route = routes.match(self.client_addr[0], self.client_addr[1], local_ip, self.listen.port, self.sni,
                             self.alpn, identity)
        if route is None:
            self.route = None
            self.log("info", "no route matched the client certificate, closing")
            self._refuse(STATUS_NO_ROUTE)
            return False
        if route is not first:
            asked = ctx.config.ssl.client_certificate
            if "tls" not in route.protocols or (route.client_certificate or asked) not in (
                    None, first.client_certificate or asked):
                self.route = None
                self.log("info", f'route "{route.name}" matches the client certificate, but it asks for '
                                 f'another client certificate than route "{first.name}", whose handshake '
                                 f'this was; closing')
                self._refuse(STATUS_NO_ROUTE)
                return False
            self.route = route
            self.service = ctx.services[route.service]
            self.balancer = ctx.balancers[route.service]
        return True

    def _client_chain_fits(self, client: TLSStream, depth: int) -> bool:
        """Whether the client's verified chain holds at most `depth` certificates above its own
        (OpenSSL's verify depth, which Python does not set); if not, the session is refused. A
        resumed session has no chain to look at: it was checked when it was made."""
        chain = client.obj.get_verified_chain()
        if chain is None or len(chain) - 1 <= depth:
            return True
        self._client_certificate_refused(X509_V_ERR_CERT_CHAIN_TOO_LONG, "certificate chain too long")
        return False

    def _client_certificate_refused(self, code: int, message: str) -> None:
        """The client's certificate did not verify: nginx's log line and $ssl_client_verify."""
        self.annotate("ssl_client_verify", f"FAILED:{message}")
        self.log("info", f"client SSL certificate verify error: ({code}:{message})")
        metrics = self.ctx.metrics
        if metrics is not None:
            metrics.handshake(ok=False)
        self.close(STATUS_BAD_REQUEST)
