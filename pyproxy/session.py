"""A proxied session as nginx's stream phases, written as plain methods called in order:

    accept → preread (ssl listeners) → route → access (plugins) → connect (balancer, retries)
           → forward → log

Each phase either moves on to the next or ends the session with an nginx stream status (200, 400,
403, 404, 500, 502, 503) that the access log prints. Sockets are registered once, edge-triggered,
when they appear; events only update readiness flags and then run whatever the current phase needs.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
from typing import TYPE_CHECKING, Optional

from pyproxy.config.model import (STATUS_BAD_GATEWAY, STATUS_INTERNAL, STATUS_NO_ROUTE, STATUS_OK,
                                  Listen)
from pyproxy.forward import DONE, DST_ERROR, MORE, SRC_ERROR, SplicePump
from pyproxy.loop import EPOLLERR, EPOLLHUP, EPOLLIN, EPOLLOUT, EPOLLRDHUP, STREAM_EVENTS

if TYPE_CHECKING:
    from pyproxy.upstream import Peer
    from pyproxy.worker import Worker

IN_EVENTS = EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR
OUT_EVENTS = EPOLLOUT | EPOLLHUP | EPOLLERR
LINGER_RESET = struct.pack("ii", 1, 0)      # SO_LINGER {on, 0s}: close() sends a RST

# Phases
PREREAD, ROUTING, CONNECTING, FORWARDING, CLOSED = range(5)


def _send_reset(sock: socket.socket) -> None:
    """Make the coming close() abort the connection with a RST instead of a FIN."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
    except OSError:
        pass


class Session:
    """One client connection and, once connected, its upstream connection."""

    __slots__ = ("worker", "loop", "listen", "client", "client_addr", "upstream", "c2u", "u2c", "phase",
                 "route", "service", "balancer", "tried", "peer", "status", "started", "ended",
                 "connect_started", "connect_time", "connect_timer", "timer", "scheduled", "serial",
                 "protocol", "sni", "ssl_protocol", "ssl_cipher", "_local_ip")

    def __init__(self, worker: "Worker", listen: Listen, client: socket.socket, client_addr, serial: int):
        self.worker = worker
        self.loop = worker.loop
        self.listen = listen
        self.client = client
        self.client_addr = client_addr
        self.upstream: Optional[socket.socket] = None
        self.c2u = SplicePump(worker.pool, client)
        self.u2c = SplicePump(worker.pool, None)
        self.phase = ROUTING
        self.route = None
        self.service = None
        self.balancer = None
        self.tried: list["Peer"] = []
        self.peer: Optional["Peer"] = None
        self.status = STATUS_OK
        self.started = self.ended = self.loop.now
        self.connect_started = 0.0
        self.connect_time: Optional[float] = None
        self.connect_timer = None
        self.timer = None
        self.scheduled = False
        self.serial = serial
        self.protocol = "tls" if listen.ssl else "tcp"
        self.sni: Optional[str] = None
        self.ssl_protocol: Optional[str] = None
        self.ssl_cipher: Optional[str] = None
        self._local_ip: Optional[str] = None

    # -- accept ---------------------------------------------------------------------------
    def start(self) -> None:
        self.loop.add(self.client.fileno(), STREAM_EVENTS, self.on_client_event)
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
        return f"client: {self.client_addr[0]}:{self.client_addr[1]}, server: {self.listen}"

    # -- route ----------------------------------------------------------------------------
    def route_phase(self) -> None:
        routes = self.worker.router.for_listener(self.listen)
        local_ip = self.local_ip() if routes.needs_local_ip else None
        route = routes.match(self.client_addr[0], self.client_addr[1], local_ip, self.listen.port, self.sni)
        if route is None:
            self.worker.log.info(f"no route matched, closing; {self.describe()}")
            self.close(STATUS_NO_ROUTE)
            return
        self.route = route
        self.service = self.worker.services[route.service]
        self.balancer = self.worker.balancers[route.service]
        self.access_phase()

    # -- access ---------------------------------------------------------------------------
    def access_phase(self) -> None:
        """Preread plugins (ip-restriction and friends) run here once a later issue adds them."""
        self.connect_phase()

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
        family = socket.AF_INET6 if ":" in peer.addr[0] else socket.AF_INET
        try:
            sock = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
        except OSError as exc:
            # EMFILE/ENFILE/ENOBUFS: this worker is out of resources, not the upstream's fault.
            self.worker.log.error(f"socket() failed ({exc.errno}: {exc.strerror}) while connecting to "
                                  f"upstream {peer.name}; {self.describe()}")
            self.close(STATUS_INTERNAL)
            return
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        err = sock.connect_ex(peer.addr)
        if err not in (0, errno.EINPROGRESS):
            sock.close()
            self._connect_failed(peer, err, timed_out=False)
            return
        self.upstream = sock
        self.loop.add(sock.fileno(), STREAM_EVENTS, self.on_upstream_event)
        self.connect_timer = self.loop.call_later(service.connect_timeout, self.on_connect_timeout)

    def _give_up(self) -> None:
        tried = ", ".join(p.name for p in self.tried) or "none"
        self.worker.log.error(f'no upstream could be reached for service "{self.service.name}" '
                              f"(tried: {tried}); {self.describe()}")
        self.close(STATUS_BAD_GATEWAY)

    def _drop_upstream(self) -> None:
        if self.connect_timer is not None:
            self.connect_timer.cancel()
            self.connect_timer = None
        sock = self.upstream
        if sock is not None:
            self.upstream = None
            self.loop.remove(sock.fileno())
            sock.close()

    def _connect_failed(self, peer: "Peer", err: int, timed_out: bool) -> None:
        self._drop_upstream()
        self.balancer.failed(peer, self.loop.now, timed_out)
        reason = "timed out" if timed_out else f"failed ({err}: {os.strerror(err)})"
        self.worker.log.error(f"connect() to {peer.name} {reason} while connecting to upstream; {self.describe()}")
        self.try_next_peer()

    def on_connect_timeout(self) -> None:
        self.connect_timer = None
        if self.phase == CONNECTING:
            self._connect_failed(self.tried[-1], errno.ETIMEDOUT, timed_out=True)

    def _connected(self, mask: int) -> None:
        if self.connect_timer is not None:
            self.connect_timer.cancel()
            self.connect_timer = None
        now = self.loop.now
        peer = self.tried[-1]
        self.peer = peer
        self.balancer.connected(peer, now)
        self.connect_time = now - self.connect_started
        sock = self.upstream
        self.c2u.dst = sock
        self.c2u.writable = True
        self.u2c.src = sock
        self.u2c.dst = self.client
        self.u2c.readable = bool(mask & IN_EVENTS)
        self.forward_phase()

    # -- forward --------------------------------------------------------------------------
    def forward_phase(self) -> None:
        self.phase = FORWARDING
        now = self.loop.now
        self.c2u.last_io = self.u2c.last_io = now
        self.timer = self.loop.call_at(now + self.service.read_timeout, self.on_timer)
        self.forward()

    def on_client_event(self, mask: int) -> None:
        if mask & IN_EVENTS:
            self.c2u.readable = True
        if mask & OUT_EVENTS:
            self.u2c.writable = True
        if self.phase == FORWARDING:
            self.forward()

    def on_upstream_event(self, mask: int) -> None:
        if self.phase == CONNECTING:
            err = self.upstream.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                self._connect_failed(self.tried[-1], err, timed_out=False)
            elif mask & EPOLLOUT:
                self._connected(mask)
            return
        if mask & IN_EVENTS:
            self.u2c.readable = True
        if mask & OUT_EVENTS:
            self.c2u.writable = True
        if self.phase == FORWARDING:
            self.forward()

    def forward(self) -> None:
        now = self.loop.now
        up = self.c2u.run(now)
        if up >= SRC_ERROR:
            self._pump_failed(self.c2u, up, client_side=up == SRC_ERROR)
            return
        down = self.u2c.run(now)
        if down >= SRC_ERROR:
            self._pump_failed(self.u2c, down, client_side=down == DST_ERROR)
            return
        if up == DONE and down == DONE:
            self.close(STATUS_OK)
        elif (up == MORE or down == MORE) and not self.scheduled:
            self.scheduled = True
            self.loop.call_soon(self._resume)

    def _resume(self) -> None:
        self.scheduled = False
        if self.phase == FORWARDING:
            self.forward()

    def _pump_failed(self, pump: SplicePump, result: int, client_side: bool) -> None:
        """A reset (or a vanished peer) on one side becomes a reset on the other side."""
        err = pump.error
        side = "client" if client_side else "upstream"
        self.worker.log.info(f"{side} connection {'reset' if err == errno.ECONNRESET else 'failed'} "
                             f"({err}: {os.strerror(err)}) while proxying; {self.describe()}")
        other = self.upstream if client_side else self.client
        if other is not None:
            _send_reset(other)
        self.close(STATUS_OK if client_side else STATUS_BAD_GATEWAY)

    def on_timer(self) -> None:
        """The session's one lazy timer: idle (read_timeout) and stuck-write (write_timeout)."""
        self.timer = None
        if self.phase != FORWARDING:
            return
        now = self.loop.now
        service = self.service
        idle_deadline = max(self.c2u.last_io, self.u2c.last_io) + service.read_timeout
        deadline = idle_deadline
        for pump in (self.c2u, self.u2c):
            if pump.blocked_at and pump.pending:
                write_deadline = pump.blocked_at + service.write_timeout
                if write_deadline <= now:
                    self.worker.log.info(f"write timed out after {service.write_timeout:g}s "
                                         f"(write_timeout) while proxying; {self.describe()}")
                    self.close(STATUS_OK)
                    return
                deadline = min(deadline, write_deadline)
        if idle_deadline <= now:
            self.worker.log.info(f"session idle for {service.read_timeout:g}s (read_timeout), closing; "
                                 f"{self.describe()}")
            self.close(STATUS_OK)
            return
        self.timer = self.loop.call_at(deadline, self.on_timer)

    # -- log ------------------------------------------------------------------------------
    def bytes_received(self) -> int:
        return self.c2u.received

    def bytes_sent(self) -> int:
        return self.u2c.sent

    def upstream_bytes_sent(self) -> int:
        return self.c2u.sent

    def upstream_bytes_received(self) -> int:
        return self.u2c.received

    def close(self, status: int) -> None:
        """End the session: close both sockets, give back pipes and the peer, write the log line."""
        if self.phase == CLOSED:
            return
        self.phase = CLOSED
        self.status = status
        self.ended = self.loop.now
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self._drop_upstream()
        self.loop.remove(self.client.fileno())
        self.client.close()
        self.c2u.release()
        self.u2c.release()
        if self.peer is not None:
            self.balancer.released(self.peer)
        self.worker.session_closed(self)
