"""UDP: `stream_listen: ADDR:PORT udp` listeners and their sessions, as nginx's stream proxy keeps them.

A session is a client address and port on a listener. Its first datagram reaches one of the
listener's SO_REUSEPORT sockets (one per worker slot, like TCP); the worker routes it, picks an
upstream target (the balancer, its health, consistent hashing on the client address) and opens two
connected sockets for the session (one for an exchange, below):

- a client socket bound to the address and port the client sent to and connected to the client.
  Linux delivers a datagram to the connected socket that matches its 4-tuple before any unconnected
  one, so from then on every datagram of this client reaches this session in this worker, whichever
  worker or generation reads the listening sockets (the affinity that holds across reloads, see
  docs/design/udp.md). Replies leave from it, so the client sees them come from the address it
  sent to. An *exchange*, a session of a service with `proxy_responses` (DNS), lasts one round trip
  and has none: it replies through the listening socket, and a further datagram of its client comes
  through the listener (the SO_REUSEPORT hash keeps it on this worker) and is found by address. So
  does a session whose client socket cannot be bound (a port below 1024 after `user` dropped
  privileges).
- an upstream socket connected to the target: replies come back on it alone, and an ICMP port
  unreachable from the target shows as ECONNREFUSED on it (passive health).

`read_timeout` (nginx's proxy_timeout) ends a session idle in both directions; `proxy_responses`
ends it once the upstream sent that many datagrams per client datagram (DNS: 1) and
`proxy_requests` hands a client to a new session after that many datagrams (nginx's directives of
the same names). Sessions are Sessions for the access log, the metrics and the plugins, and count
against worker_connections; when it is full, the session idle longest goes first.

The hot path, a datagram of an established session, reads into the worker's one preallocated
buffer with recv_into and sends a memoryview of it (a cached slice per length): nothing is copied
and no buffer is allocated per datagram.
"""

from __future__ import annotations

import _socket
import errno
import socket
from collections import OrderedDict
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING

from pyproxy.config.model import STATUS_BAD_GATEWAY, STATUS_NO_ROUTE, STATUS_OK, STATUS_OVER_LIMIT, Listen
from pyproxy.loop import EPOLLIN
from pyproxy.phases import CLOSED, FORWARDING, NO_IO
from pyproxy.session import Session

if TYPE_CHECKING:
    from pyproxy.config.model import Route
    from pyproxy.context import WorkerContext
    from pyproxy.phases import ClientAddress

DATAGRAM_MAX = 65535          # the largest UDP payload (IPv4's is 65507)
READ_BATCH = 64               # datagrams read per readiness event of one socket (level-triggered)
DATAGRAM_TYPE = socket.SOCK_DGRAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC
PKTINFO_SPACE = socket.CMSG_SPACE(40)     # in6_pktinfo (20 bytes) or in_pktinfo (12), with room
IP_PKTINFO = getattr(socket, "IP_PKTINFO", 8)     # Linux's value; typeshed does not list it
# Seconds a session's client socket reads with recvfrom, checking who sent each datagram (see
# UdpSession._checked_reads); then with recv_into. A misdelivered datagram is queued microseconds after
# the connect at most: a second covers it with room to spare (and a DNS session its whole life).
CHECKED_FOR = 1.0
EVICTION_LOG_INTERVAL = 10.0  # seconds between warnings that full worker_connections evict sessions
MSG_TRUNC = socket.MSG_TRUNC  # recv_into returns a datagram's whole length, also when it was cut
DROPPED = (errno.EAGAIN, errno.ENOBUFS, errno.EMSGSIZE)   # a datagram not sent: UDP may lose it


def prepare_udp_listener(sock: socket.socket, listen: Listen) -> None:
    """Options of a UDP listening socket, before bind: on a wildcard address, ask for each
    datagram's destination address (IP_PKTINFO): a session's client socket is bound to it and its
    routes may match on it."""
    if listen.wildcard:
        if listen.family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_RECVPKTINFO, 1)
        else:
            sock.setsockopt(socket.IPPROTO_IP, IP_PKTINFO, 1)


def _pktinfo_address(ancdata: list[tuple[int, int, bytes]]) -> str | None:
    """The destination address of a datagram, from its IP_PKTINFO/IPV6_PKTINFO ancillary data."""
    for level, kind, data in ancdata:
        if level == socket.IPPROTO_IP and kind == IP_PKTINFO and len(data) >= 12:
            return socket.inet_ntop(socket.AF_INET, data[8:12])        # in_pktinfo.ipi_addr
        if level == socket.IPPROTO_IPV6 and kind == socket.IPV6_PKTINFO and len(data) >= 16:
            return socket.inet_ntop(socket.AF_INET6, data[:16])        # in6_pktinfo.ipi6_addr
    return None


class UdpTable:
    """One worker's UDP sessions by (listener, client address), oldest idle first, and the buffer
    every one of them reads into."""

    def __init__(self, ctx: WorkerContext, sessions: set[Session], next_serial: Callable[[], int]):
        self.ctx = ctx
        self.sessions = sessions            # the worker's: UDP sessions count against worker_connections
        self.next_serial = next_serial
        self.limit = ctx.config.worker_connections
        self.by_client: OrderedDict[tuple[tuple[str, int, bool], ClientAddress], UdpSession] = OrderedDict()
        self.buffer = bytearray(DATAGRAM_MAX + 1)
        self.view = memoryview(self.buffer)
        # view[:n] for each length n met so far: a datagram is sent without a new memoryview.
        self.slices: dict[int, memoryview] = {}
        self.evicted = 0
        self.evicted_logged_at = -EVICTION_LOG_INTERVAL
        self.truncation_logged: set[str] = set()   # services whose truncation was logged already

    def slice(self, n: int) -> memoryview:
        view = self.slices[n] = self.view[:n]
        return view

    def make_room(self) -> bool:
        """At worker_connections: end the UDP session idle longest (second chance: one active since
        it was last looked at goes to the back), for a new session of either protocol. False when no
        UDP session can go (TCP ones fill the worker)."""
        by_client = self.by_client
        if len(self.sessions) < self.limit:
            return True
        for _ in range(2 * len(by_client)):        # after one pass, every session had its chance
            key, session = by_client.popitem(last=False)
            if session.last > session.placed:
                session.placed = session.last
                by_client[key] = session
                continue
            by_client[key] = session        # close() takes it out
            self.evicted += 1
            now = self.ctx.loop.now
            if now - self.evicted_logged_at >= EVICTION_LOG_INTERVAL:
                self.evicted_logged_at = now
                session.log("warn", f"{self.limit} worker_connections are not enough: closing the UDP "
                                    f"session idle longest ({self.evicted} so far)")
            session.close(STATUS_OVER_LIMIT)
            return True
        return False

    def truncated(self, session: UdpSession, size: int) -> None:
        """A datagram longer than the service's proxy_buffer_size was cut: counted on the session
        ($status stays), logged once per service per worker."""
        session.truncated += 1
        name = session.service.name
        if name not in self.truncation_logged:
            self.truncation_logged.add(name)
            session.log("warn", f'datagram longer than proxy_buffer_size ({size}) of service "{name}" '
                                f"truncated (logged once)")


class UdpListener:
    """The readiness handler of one UDP listening socket in a worker: datagrams of clients that have
    no session in this worker (or one replying through this socket)."""

    def __init__(self, table: UdpTable, listen: Listen, sock: socket.socket):
        self.table = table
        self.listen = listen
        self.sock = sock
        self.key = listen.key
        self.routes = table.ctx.router.for_listener(listen)
        self.buffers = (table.view[:DATAGRAM_MAX],)     # recvmsg_into's

    def on_readable(self, mask: int) -> None:
        sock = self.sock
        view = self.table.view
        buffers = self.buffers
        wildcard = self.listen.wildcard
        local_ip = self.listen.host
        for _ in range(READ_BATCH):
            try:
                if wildcard:
                    n, ancdata, _, addr = sock.recvmsg_into(buffers, PKTINFO_SPACE)
                    local_ip = _pktinfo_address(ancdata) or self.listen.host
                else:
                    n, addr = sock.recvfrom_into(view, DATAGRAM_MAX)
            except BlockingIOError:
                return
            except OSError:
                continue            # an ICMP error queued on the socket: it concerns no session
            self.datagram(n, addr, local_ip)

    def take_leftovers(self, sock: _socket.socket, local_ip: str) -> None:
        """What waited in an ended session's client socket (UdpSession._release_client), as if it
        had come to this listener; then the socket is closed."""
        view = self.table.view
        while True:
            try:
                n, addr = sock.recvfrom_into(view, DATAGRAM_MAX)
            except OSError:
                break
            self.datagram(n, addr, local_ip)
        sock.close()

    def datagram(self, n: int, addr: ClientAddress, local_ip: str) -> None:
        """A datagram of `n` bytes in the table's buffer from `addr`, sent to local_ip."""
        session = self.table.by_client.get((self.key, addr))
        if session is not None:             # it replies through this socket, or raced its own
            size = session.size
            if n > size:
                self.table.truncated(session, size)
                n = size
            session.from_client(n)
            return
        if not self.table.make_room():
            return                          # every slot is a TCP session: the datagram is dropped
        table = self.table
        session = UdpSession(table.ctx, self.listen, table, addr, local_ip, table.next_serial())
        route = self.routes.match(addr[0], addr[1], local_ip if self.routes.needs_local_ip else None,
                                  self.listen.port)
        if route is None:
            session.log("info", "no route matched, datagram dropped")
            session.close(STATUS_NO_ROUTE)
            return
        session.serve_first(route, self, n)


class UdpSession(Session):
    """One client of one UDP listener, and its upstream (see the module's docstring)."""

    __slots__ = ("table", "key", "listener", "shared", "checked", "reply", "size", "received", "sent",
                 "up_received", "up_sent", "requests", "responses", "first", "last", "placed", "truncated")

    table: UdpTable
    listener: UdpListener
    client: _socket.socket
    upstream: _socket.socket | None
    first: bytes | None
    reply: Callable[[memoryview], int]      # sends a datagram to the client

    def __init__(self, ctx: WorkerContext, listen: Listen, table: UdpTable, addr: ClientAddress,
                 local_ip: str, serial: int):
        self.ctx = ctx
        self.loop = loop = ctx.loop
        self.listen = listen
        self.table = table
        self.key = (listen.key, addr)
        self.client_addr = addr
        self.phase = NO_IO
        self.route = None
        self.status = STATUS_OK
        self.started = self.ended = self.last = self.placed = loop.now
        self.timer = None
        self.serial = serial
        self.protocol = "udp"
        self.sni = self.ssl_protocol = self.ssl_cipher = None
        self.notes = None
        self._local_ip = local_ip
        self.hups = 0
        self.tried = []
        self.peer = None
        self.upstream = None
        self.connect_time = None
        self.shared = False             # replies go through the listening socket
        self.checked = True             # reads check the sender (see _checked_reads)
        self.received = self.sent = self.up_received = self.up_sent = 0
        self.requests = self.responses = self.truncated = 0
        self.first = None
        table.sessions.add(self)

    # -- start ----------------------------------------------------------------------------
    def serve_first(self, route: Route, listener: UdpListener, n: int) -> None:
        """Serve the first datagram (`n` bytes in the table's buffer) of a routed client."""
        ctx = self.ctx
        self.route = route
        self.service = service = ctx.services[route.service]
        self.balancer = ctx.balancers[service.name]
        self.listener = listener
        self.size = min(service.proxy_buffer_size, DATAGRAM_MAX)
        self.table.by_client[self.key] = self
        for plugin in ctx.plugins.for_route(route):
            status = plugin.access(self)
            if status:
                self.close(status)
                return
        if service.reject_share and ctx.rejected(service):
            self.log("info", f'session refused: it falls in the reject_share ({service.reject_share:g}) of '
                             f'service "{service.name}"; its datagram is dropped')
            self.close(STATUS_BAD_GATEWAY)
            return
        if service.proxy_responses is None:
            self._open_client_socket(listener)
        else:
            # An exchange (DNS: one query, one answer) ends before a client socket would pay for
            # itself: its replies go through the listening socket, whose SO_REUSEPORT hash keeps the
            # client's datagrams on this worker meanwhile (see docs/design/udp.md).
            self._share_listener(listener, None)
        self.phase = FORWARDING
        if n > self.size:
            self.table.truncated(self, self.size)
            n = self.size
        self.first = bytes(self.table.view[:n])     # resent to the next target if this one refuses
        self.connect_started = self.loop.now
        if not self._next_peer():
            return
        self.from_client(n)
        if self.phase != CLOSED and not self.shared:
            self._checked_reads()
        self._arm_timer()

    def _open_client_socket(self, listener: UdpListener) -> None:
        """The connected client socket (see the module's docstring), or replies through the listener."""
        addr = self.client_addr
        try:
            sock = _socket.socket(self.listen.family, DATAGRAM_TYPE)
        except OSError as exc:
            self._share_listener(listener, exc)
            return
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if self.listen.family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind((self.local_ip(), self.listen.port))
            sock.connect(addr)
        except OSError as exc:
            sock.close()
            self._share_listener(listener, exc)
            return
        self.client = sock
        self.reply = sock.send
        self.loop.add(sock.fileno(), EPOLLIN, self.on_client)

    def _share_listener(self, listener: UdpListener, exc: OSError | None) -> None:
        """No client socket: reply through the listening socket; datagrams are found by address
        (`exc`: why the client socket could not be made; None for an exchange, or once
        proxy_requests let the client go)."""
        self.shared = True
        self.client = listener.sock
        sendto = listener.sock.sendto
        addr = self.client_addr

        def reply(data: memoryview) -> int:
            return sendto(data, addr)

        self.reply = reply
        if exc is not None:
            self.log("info", f"no client socket for the session ({exc.strerror or exc}): replies go through "
                             f"the listening socket, and a reload moves the client to the new generation")

    def _checked_reads(self) -> None:
        """The client socket's reads while it is young: a datagram of another client may have been
        given to it between its bind and its connect (the kernel looks the socket up, on any CPU,
        before it queues the datagram), so each read says where the datagram came from, and one of
        another client goes where the listening socket would have taken it."""
        if self.loop.now - self.started > CHECKED_FOR:
            self.checked = False
        view = self.table.view
        mine = self.client_addr
        size = self.size
        for _ in range(READ_BATCH):
            try:
                n, addr = self.client.recvfrom_into(view, DATAGRAM_MAX)
            except BlockingIOError:
                return
            except OSError as exc:
                self._client_gone(exc)
                return
            if addr[:2] != mine[:2]:
                self.listener.datagram(n, addr, self.local_ip())
            else:
                if n > size:
                    self.table.truncated(self, size)
                    n = size
                self.from_client(n)
            if self.shared or self.phase == CLOSED:
                return

    def _next_peer(self) -> bool:
        """Connect an upstream socket to the next target; False (and the session closed) when none."""
        service = self.service
        while len(self.tried) <= service.retries:
            peer = self.balancer.pick(self.loop.now, self.client_addr[0], self.tried)
            if peer is None:
                break
            self.tried.append(peer)
            try:
                sock = _socket.socket(peer.family, DATAGRAM_TYPE)
            except OSError as exc:
                self.log("error", f"socket() failed ({exc.errno}: {exc.strerror}) for upstream {peer.name}")
                break
            try:
                sock.connect(peer.addr)
            except OSError as exc:
                sock.close()
                self.balancer.failed(peer, self.loop.now, False)
                self.log("error", f"connect() to {peer.name} failed ({exc.errno}: {exc.strerror}) "
                                  f"while connecting to upstream")
                continue
            self.upstream = sock
            self.connect_time = self.loop.now - self.connect_started
            self.loop.add(sock.fileno(), EPOLLIN, self.on_upstream)
            return True
        tried = ", ".join(p.name for p in self.tried) or "none"
        self.log("error", f'no upstream could be reached for service "{service.name}" (tried: {tried})')
        self.close(STATUS_BAD_GATEWAY)
        return False

    # -- datagrams ------------------------------------------------------------------------
    def on_client(self, mask: int) -> None:
        if self.checked:
            self._checked_reads()
            return
        recv_into = self.client.recv_into
        view = self.table.view
        size = self.size
        for _ in range(READ_BATCH):
            try:
                n = recv_into(view, size, MSG_TRUNC)
            except BlockingIOError:
                return
            except OSError as exc:
                self._client_gone(exc)
                return
            if n > size:
                self.table.truncated(self, size)
                n = size
            self.from_client(n)
            if self.shared or self.phase == CLOSED:
                return                  # proxy_requests closed the client socket, or the session ended

    def from_client(self, n: int) -> None:
        """A client datagram of `n` bytes (cut to `size` already) in the buffer: to the upstream."""
        self.requests += 1
        self.received += n
        self.last = self.loop.now
        upstream = self.upstream
        assert upstream is not None
        try:
            self.up_sent += upstream.send(self.table.slices.get(n) or self.table.slice(n))
        except OSError as exc:
            if exc.errno not in DROPPED:
                self._upstream_error(exc)
                return
        service = self.service
        if service.proxy_requests and self.requests >= service.proxy_requests:
            self._let_client_go()
        if service.proxy_responses == 0 and self._done():
            self.close(STATUS_OK)

    def _let_client_go(self) -> None:
        """nginx's proxy_requests reached: the client's next datagram starts a new session; this one
        still waits for its replies, and sends them through the listening socket."""
        if self.table.by_client.get(self.key) is self:
            del self.table.by_client[self.key]
        if not self.shared:
            self._release_client()
            self._share_listener(self.listener, None)

    def _release_client(self) -> None:
        """Give the client back to the listeners. Its next datagram may already be on the way (a DNS
        client's next query from the same port, sent as soon as the answer came): connected to its
        own address, the socket matches no datagram from now on, and what was queued in it (or is
        being queued on another CPU) is read on the next tick and goes where the listener would
        take it, to a new session. Only then is the socket closed."""
        sock = self.client
        self.loop.forget(sock.fileno())
        try:
            sock.connect((self.local_ip(), self.listen.port))
        except OSError:
            pass                # cannot happen for a bound address; the close comes anyway
        self.loop.call_soon(partial(self.listener.take_leftovers, sock, self.local_ip()))

    def _done(self) -> bool:
        """nginx's test: every client datagram proxy_requests allows came, and proxy_responses
        replies to each of them."""
        service = self.service
        if service.proxy_requests and self.requests < service.proxy_requests:
            return False
        expected = service.proxy_responses
        return expected is not None and self.responses >= expected * self.requests

    def on_upstream(self, mask: int) -> None:
        upstream = self.upstream
        assert upstream is not None
        recv_into = upstream.recv_into
        view = self.table.view
        size = self.size
        reply = self.reply
        for _ in range(READ_BATCH):
            try:
                n = recv_into(view, size, MSG_TRUNC)
            except BlockingIOError:
                return
            except OSError as exc:
                self._upstream_error(exc)
                return
            if n > size:
                self.table.truncated(self, size)
                n = size
            if self.peer is None:
                self._answered()
            self.up_received += n
            self.responses += 1
            self.last = self.loop.now
            try:
                self.sent += reply(self.table.slices.get(n) or self.table.slice(n))
            except OSError as exc:
                if exc.errno not in DROPPED:
                    self._client_gone(exc)
                    return
            if self._done():
                self.close(STATUS_OK)
                return

    def _answered(self) -> None:
        """The target's first reply: it is alive (passive health), and the session counts on it."""
        peer = self.tried[-1]
        self.peer = peer
        self.first = None
        self.balancer.connected(peer, self.loop.now)

    def _upstream_error(self, exc: OSError) -> None:
        """ECONNREFUSED (ICMP port unreachable) and the like: the target failed. Before any reply,
        the first datagram goes to the next target, as a refused connect would for TCP."""
        peer = self.tried[-1]
        self.balancer.failed(peer, self.loop.now, False)
        self.log("error", f"recv() failed ({exc.errno}: {exc.strerror}) while proxying datagrams, "
                          f"upstream: {peer.name}")
        first = self.first
        if self.peer is not None or first is None:
            self.close(STATUS_BAD_GATEWAY)
            return
        self._drop_upstream()
        if not self._next_peer():
            return
        try:
            self.up_sent += self.upstream.send(first)        # type: ignore[union-attr]
        except OSError as again:
            if again.errno not in DROPPED:
                self._upstream_error(again)

    def _client_gone(self, exc: OSError) -> None:
        self.log("info", f"client error ({exc.errno}: {exc.strerror}) while proxying datagrams")
        self.close(STATUS_OK)

    # -- timeout --------------------------------------------------------------------------
    def _arm_timer(self) -> None:
        if self.phase != CLOSED:
            self.timer = self.loop.call_at(self.last + self.service.read_timeout, self.on_timer)

    def on_timer(self) -> None:
        """read_timeout (nginx's proxy_timeout) with nothing either way: the session ends. If replies
        were expected (proxy_responses) and none came, the target timed out (passive health)."""
        self.timer = None
        if self.phase == CLOSED:
            return
        if self.loop.now < self.last + self.service.read_timeout:
            self._arm_timer()
            return
        expected = self.service.proxy_responses
        if expected is None or self.responses >= expected * self.requests:
            self.close(STATUS_OK)       # nginx: "udp timed out", a normal end
            return
        peer = self.tried[-1]
        self.log("error", f"upstream timed out ({self.service.read_timeout:g}s read_timeout) while proxying "
                          f"datagrams, upstream: {peer.name}")
        if self.peer is None:
            self.balancer.failed(peer, self.loop.now, True)
        self.close(STATUS_BAD_GATEWAY)

    # -- log and close ----------------------------------------------------------------------
    def local_ip(self) -> str:
        assert self._local_ip is not None
        return self._local_ip

    def bytes_received(self) -> int:
        return self.received

    def bytes_sent(self) -> int:
        return self.sent

    def upstream_bytes_sent(self) -> int:
        return self.up_sent

    def upstream_bytes_received(self) -> int:
        return self.up_received

    def close(self, status: int, linger: bool = False) -> None:
        if self.phase == CLOSED:
            return
        phase = self.phase
        self.phase = CLOSED
        self.status = status
        self.ended = self.loop.now
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self._drop_upstream()
        if self.table.by_client.get(self.key) is self:
            del self.table.by_client[self.key]
        if phase == FORWARDING and not self.shared:
            self._release_client()
        if self.peer is not None:
            self.balancer.released(self.peer)
        self.ctx.closed(self)

