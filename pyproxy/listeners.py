"""Listening sockets: one per worker slot per `stream_listen` address, all in one SO_REUSEPORT group.

The master creates them and keeps them for its whole life. A worker slot's sockets are inherited by
the worker that serves the slot, and on reload by its successor; because no socket of the group is
ever closed while its address stays configured, a connection waiting in an accept queue is never
reset (closing a SO_REUSEPORT socket resets what waits in its own queue unless the kernel's
net.ipv4.tcp_migrate_req is on).
"""

from __future__ import annotations

import errno
import os
import socket
from dataclasses import dataclass

from pyproxy.config.model import Config, Listen
from pyproxy.udp import prepare_udp_listener


def configured_listens(config: Config) -> tuple[Listen, ...]:
    """Every address a configuration asks for: the stream listeners, plus status_listen (bound
    once, for the status process, not once per worker slot)."""
    if config.status_listen is None:
        return config.stream_listen
    host, port = config.status_listen
    return (*config.stream_listen, Listen(host, port, status=True))


class BindError(Exception):
    """A listening socket could not be created; the message is ready for the operator."""


@dataclass
class ListenSocket:
    """A bound, listening, non-blocking socket and the configuration it was made for."""

    listen: Listen
    slot: int
    sock: socket.socket

    @property
    def fd(self) -> int:
        return self.sock.fileno()


def open_listener(listen: Listen, slot: int) -> ListenSocket:
    """Bind and listen on one address for one worker slot (a `udp` address: bind a datagram socket)."""
    kind = socket.SOCK_DGRAM if listen.udp else socket.SOCK_STREAM
    sock = socket.socket(listen.family, kind | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
    try:
        # SO_REUSEADDR also lets a UDP session's client socket bind the same address (pyproxy.udp).
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if listen.udp:
            prepare_udp_listener(sock, listen)
        else:
            # Accepted sockets inherit TCP_NODELAY from the listener (Linux): one setsockopt here
            # instead of one per session. A byte-stream proxy must not add Nagle delays.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if listen.family == socket.AF_INET6:
            # nginx's ipv6only=on: "[::]:9000" and "0.0.0.0:9000" are separate sockets.
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((listen.host, listen.port))
        if not listen.udp:
            sock.listen(listen.backlog)
    except OSError as exc:
        sock.close()
        reason = os.strerror(exc.errno or errno.EIO)
        raise BindError(f"bind() to {listen} failed ({exc.errno}: {reason})") from None
    return ListenSocket(listen, slot, sock)


def _slots_of(listen: Listen, slots: int) -> int:
    """Sockets an address needs: one per worker slot, or one for status_listen."""
    return 1 if listen.status else slots


class ListenerSet:
    """Every listening socket the master holds, keyed by (address key, slot)."""

    def __init__(self) -> None:
        self.sockets: dict[tuple[tuple[str, int, bool], int], ListenSocket] = {}

    def slots(self) -> int:
        return 1 + max((slot for _, slot in self.sockets), default=-1)

    def ensure(self, listens: tuple[Listen, ...], slots: int) -> list[ListenSocket]:
        """Bind whatever `listens` x `slots` needs that is not bound yet; return what was created.

        Sockets already bound keep serving (a reload that changes nothing about an address leaves
        its sockets and their accept queues alone). On a bind failure everything created by this
        call is closed again and BindError is raised, so a failed reload changes nothing.
        """
        created: list[ListenSocket] = []
        try:
            for listen in listens:
                for slot in range(_slots_of(listen, slots)):
                    key = (listen.key, slot)
                    current = self.sockets.get(key)
                    if current is None:
                        ls = open_listener(listen, slot)
                        created.append(ls)
                    elif current.listen.backlog != listen.backlog and not listen.udp:
                        current.sock.listen(listen.backlog)   # listen() again just resizes the queue
        except BindError:
            for ls in created:
                ls.sock.close()
            raise
        for ls in created:
            self.sockets[(ls.listen.key, ls.slot)] = ls
        for listen in listens:                      # remember the newest flags (ssl, proxy_protocol)
            for slot in range(_slots_of(listen, slots)):
                self.sockets[(listen.key, slot)].listen = listen
        return created

    def for_slot(self, listens: tuple[Listen, ...], slot: int, slots: int) -> list[ListenSocket]:
        """The sockets a worker in `slot` of a `slots`-worker generation accepts on.

        When a reload shrinks the worker count, the sockets of the slots beyond it stay open (their
        queues must not be reset) and are served by the remaining workers: slot s by worker s % slots.
        """
        keys = {listen.key for listen in listens if not listen.status}
        return [ls for (key, s), ls in self.sockets.items() if key in keys and s % slots == slot]

    def status_sockets(self) -> list[ListenSocket]:
        """The status_listen socket, which only the status process accepts on (pyproxy.status)."""
        return [ls for ls in self.sockets.values() if ls.listen.status]

    def close_unused(self, listens: tuple[Listen, ...]) -> list[ListenSocket]:
        """Close the sockets of addresses that are no longer configured; return them. (So are the
        extra slots of a stream address that became status_listen: nobody would accept on them.)"""
        wanted = {(listen.key, slot) for listen in listens for slot in range(_slots_of(listen, self.slots()))}
        gone = [ls for key, ls in self.sockets.items() if key not in wanted]
        for ls in gone:
            del self.sockets[(ls.listen.key, ls.slot)]
            ls.sock.close()
        return gone

    def all(self) -> list[ListenSocket]:
        return list(self.sockets.values())

    def close(self) -> None:
        for ls in self.sockets.values():
            ls.sock.close()
        self.sockets.clear()
