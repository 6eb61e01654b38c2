"""The upstream side of a session until it carries bytes: choosing a peer, connecting, retrying
another peer, and what precedes the stream (a PROXY header, TLS with the upstream)."""

from __future__ import annotations

import _socket
import errno
import os
import socket
import ssl
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING

from pyproxy.config.model import STATUS_BAD_GATEWAY, STATUS_INTERNAL, STATUS_OVER_LIMIT
from pyproxy.loop import EPOLLOUT, STREAM_EVENTS
from pyproxy.phases import (
    CLOSED,
    CONNECTING,
    ERR_EVENTS,
    IN_EVENTS,
    NO_IO,
    UPSTREAM_HANDSHAKE,
    UPSTREAM_HUP,
    UPSTREAM_STARTTLS,
    SessionBase,
    ssl_reason,
)
from pyproxy.proxy_protocol import build_v1, build_v2

if TYPE_CHECKING:
    from pyproxy.config.model import Service
    from pyproxy.phases import Connection
    from pyproxy.tls.stream import TLSStream
    from pyproxy.upstream import Balancer, Peer

UPSTREAM_SOCKET_TYPE = socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC
SEND_PROXY_HEADER = {"v1": build_v1, "v2": build_v2}
# How often a session waiting in an upstream's queue looks for a free slot: a slot freed by another
# worker is seen only so (each worker counts its own sessions in shared memory).
QUEUE_POLL = 0.02


class UpstreamConnector(SessionBase):
    """Connect a session to one of its service's peers, as nginx's stream proxy does.

    Its interface, for any session class that derives from it (Session today; a UDP session would
    reuse the peer choice, the retries, passive health and the log fields, with a socket type of
    its own in place of UPSTREAM_SOCKET_TYPE and neither PROXY header v1 nor TLS):

    - In: the host sets `service` and `balancer` (routing), then calls `connect_phase()`.
    - The connector picks a peer (`balancer.pick`, hashing on the SNI or the client's address),
      opens a non-blocking socket, registers it with the host's `on_upstream_event` and sets the
      phase timer to the service's connect_timeout (the host's `_phase_deadline`).
    - Events: the host passes the upstream socket's events to `connect_event(mask)` in the
      CONNECTING phase and to `upstream_handshake()` in UPSTREAM_HANDSHAKE, and its timer's expiry
      in either phase to `_connect_failed(self.tried[-1], reason, timed_out=True)`.
    - A failed attempt is logged, reported to the balancer (passive health) and followed by the
      next peer, up to `service.retries` retries; then `_refuse(502)` (the host's) ends the session.
    - When every peer left is at its max_conns and the upstream has a `queue`, the session waits
      (polling every QUEUE_POLL) for a slot, up to the queue's timeout; then `_refuse(503)`.
    - Out: once connected (TCP, then the PROXY header and TLS if the service asks for them),
      `upstream` is the connection, `peer` and `connect_time` are set, the balancer counts the
      connection, and the host's `forward_phase()` takes over. The host's close calls
      `_drop_upstream()` and gives the peer back (`balancer.released(peer)`).
    - It also reads `ctx` (congestion, upstream_tls, scratch), `loop`, `listen` and `client_addr`
      (the PROXY header), `sni` (hashing, the upstream's SNI), and clears UPSTREAM_HUP in `hups`
      for each new socket; it writes `phase` (CONNECTING, UPSTREAM_HANDSHAKE) and logs with `log`.

    `tried` and `connect_time` are the access log's $upstream_addr and $upstream_connect_time.
    """

    __slots__ = ()
    service: Service
    balancer: Balancer
    tried: list[Peer]               # every peer tried, in order; the last is the current attempt's
    peer: Peer | None               # the one connected to
    upstream: Connection | None
    connect_started: float
    connect_time: float | None

    def connect_phase(self) -> None:
        self.connect_started = self.loop.now
        service = self.service
        if service.reject_share and self.ctx.rejected(service):
            self.log("info", f'session refused: it falls in the reject_share ({service.reject_share:g}) of '
                             f'service "{service.name}"')
            self._refuse(STATUS_BAD_GATEWAY)
            return
        self.try_next_peer()

    def try_next_peer(self) -> None:
        service = self.service
        if len(self.tried) > service.retries:
            self._give_up()
            return
        balancer = self.balancer
        sni = self.sni
        key = sni if sni and balancer.hash_on == "sni" else self.client_addr[0]
        peer = balancer.pick(self.loop.now, key, self.tried)
        if peer is None:
            if balancer.may_wait(self.tried):
                self._enter_queue()
            else:
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
        congestion = self.ctx.congestion.get(service.name)
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

    def _enter_queue(self) -> None:
        balancer = self.balancer
        if not balancer.enter_queue():
            self.log("error", f'upstream "{balancer.name}": every target is at max_conns and the queue '
                              f'is full ({balancer.queue.size} sessions waiting)')
            self._refuse(STATUS_OVER_LIMIT)
            return
        self.phase = NO_IO                  # no socket of ours, no connect timeout: the queue's
        self.loop.call_later(QUEUE_POLL, partial(self._in_queue, self.loop.now + balancer.queue.timeout))

    def _in_queue(self, until: float) -> None:
        """A queued session's turn to look for a free slot, or to give up at `until`."""
        balancer = self.balancer
        if self.phase == CLOSED:
            balancer.leave_queue()          # closed meanwhile (the client left, the worker stops)
        elif balancer.has_room(self.tried):
            balancer.leave_queue()
            self.try_next_peer()
        elif self.loop.now >= until:
            balancer.leave_queue()
            self.log("error", f'upstream "{balancer.name}": every target is at max_conns; waited '
                              f'{balancer.queue.timeout:g}s in the queue (queue.timeout)')
            self._refuse(STATUS_OVER_LIMIT)
        else:
            self.loop.call_later(QUEUE_POLL, partial(self._in_queue, until))

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

    def connect_event(self, mask: int) -> None:
        """An event of the connecting socket: connected, or failed."""
        sock = self.upstream
        if TYPE_CHECKING:       # for mypy only, here and below: what the phase guarantees
            assert isinstance(sock, _socket.socket)
        # A failed connect always raises EPOLLERR (Linux sets the socket's error first), so
        # only then is SO_ERROR worth a system call: a plain EPOLLOUT means connected.
        err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) if mask & ERR_EVENTS else 0
        if err:
            self._connect_failed(self.tried[-1], f"failed ({err}: {os.strerror(err)})", timed_out=False)
            return
        if not mask & EPOLLOUT:
            return
        service = self.service
        send_header = SEND_PROXY_HEADER.get(service.proxy_protocol)
        if send_header is not None and not self._send_proxy_header(sock, send_header):
            return
        if self.starttls and self.protocol == "tls_passthrough":
            self._replay_starttls(sock)
            return
        tls = self.ctx.upstream_tls.get(service.name)
        if tls is None:
            # This event is the socket's first (edge-triggered): bytes the upstream sent are in it.
            self._connected(upstream_readable=bool(mask & IN_EVENTS))
            return
        self.phase = UPSTREAM_HANDSHAKE
        try:
            self.upstream = tls.wrap(sock, self.ctx.scratch, self.sni, self.loop, self.tried[-1].addr)
        except (OSError, ValueError) as exc:
            self._connect_failed(self.tried[-1], f"could not start TLS ({exc})", timed_out=False)
            return
        self.upstream_handshake()

    def _send_proxy_header(self, sock: _socket.socket,
                           build: Callable[[tuple[str, int], tuple[str, int]], bytes]) -> bool:
        """Tell the upstream who the client is (before any TLS: the header precedes the stream)."""
        header = build((self.client_addr[0], self.client_addr[1]), (self.local_ip(), self.listen.port))
        try:
            # A fresh socket's send buffer is empty: a header of at most a few hundred bytes fits.
            sent = sock.send(header)
        except OSError as exc:
            self._connect_failed(self.tried[-1], f"failed sending the PROXY header ({exc.strerror})",
                                 timed_out=False)
            return False
        if sent != len(header):
            self._connect_failed(self.tried[-1], "failed sending the PROXY header (short write)",
                                 timed_out=False)
            return False
        return True

    def _replay_starttls(self, sock: _socket.socket) -> None:
        """The client's TLS goes through untouched to an upstream that expects PostgreSQL's
        SSLRequest first, which pyproxy consumed and answered: send it, and splice once the
        upstream answers `S` (upstream_starttls)."""
        request = self.starttls
        if TYPE_CHECKING:
            assert request is not None
        try:
            sent = sock.send(request)       # 8 bytes into a fresh socket's buffer
        except OSError as exc:
            self._connect_failed(self.tried[-1], f"failed sending the PostgreSQL SSLRequest ({exc.strerror})",
                                 timed_out=False)
            return
        if sent != len(request):
            self._connect_failed(self.tried[-1], "failed sending the PostgreSQL SSLRequest (short write)",
                                 timed_out=False)
            return
        self.phase = UPSTREAM_STARTTLS
        self.upstream_starttls()

    def upstream_starttls(self) -> None:
        """The upstream's one-byte answer to the SSLRequest: `S` (TLS follows) or a failed attempt."""
        sock = self.upstream
        if TYPE_CHECKING:
            assert isinstance(sock, _socket.socket)
        try:
            answer = sock.recv(1)
        except BlockingIOError:
            return
        except OSError as exc:
            self._connect_failed(self.tried[-1], f"failed: reading the answer to the PostgreSQL SSLRequest "
                                                 f"failed ({exc.errno}: {exc.strerror})", timed_out=False)
            return
        if answer != b"S":
            said = f"answered it {answer!r}" if answer else "closed the connection"
            self._connect_failed(self.tried[-1], f"failed: the upstream {said} instead of 'S' to the "
                                                 f"PostgreSQL SSLRequest (is it a PostgreSQL server with "
                                                 f"ssl = on?)", timed_out=False)
            return
        self._connected()

    def upstream_handshake(self) -> None:
        upstream = self.upstream
        if TYPE_CHECKING:
            assert isinstance(upstream, TLSStream)
        try:
            if not upstream.handshake():
                return
        except ssl.SSLCertVerificationError as exc:
            self._connect_failed(self.tried[-1], f"failed: upstream SSL certificate verify failed "
                                                 f"({exc.verify_message})", timed_out=False)
            return
        except (ssl.SSLError, OSError) as exc:
            self._connect_failed(self.tried[-1], f"failed: SSL handshake with the upstream failed "
                                                 f"({ssl_reason(exc)})", timed_out=False)
            return
        self._connected()

    def _connected(self, upstream_readable: bool = True) -> None:
        """`upstream_readable`: False when the upstream is known to have sent nothing yet (see
        Forwarder.forward_phase)."""
        now = self.loop.now
        peer = self.tried[-1]
        self.peer = peer
        self.balancer.connected(peer, now)
        self.connect_time = now - self.connect_started
        self.forward_phase(upstream_readable)
