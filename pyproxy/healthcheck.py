"""Active health checks: probe every target of an upstream on a timer, inside a worker's loop.

A probe is a non-blocking TCP connect, optionally followed by writing `send` and reading until the
reply starts with `expect`, all within `timeout` (`type: udp`: `send` as one datagram from a
connected socket, and a datagram back that starts with `expect`; ICMP port unreachable is a
failure). `unhealthy.tcp_failures` failed probes (refused, reset, wrong reply) or
`unhealthy.timeouts` timed-out probes in a row take the target out; `healthy.successes` good probes
in a row bring it back — also after passive checks took it out.

Each worker probes for itself (as Kong's per-worker checkers do): no extra process, and a worker's
view never waits on another's. With W workers a target sees W probes per interval; the log says
which worker saw a change (the `pid#slot` of the line). The changes also go to the shared
`HealthTable` (through the balancer), so the next generation's checkers start from them: a target
found down stays down across a reload until probes bring it back. When DNS changes a balancer's
addresses (pyproxy.dns), the checker probes the new ones and forgets those that went.
"""

from __future__ import annotations

import errno
import math
import os
import random
import socket
from collections.abc import Callable, Iterable
from functools import partial

from pyproxy.config.model import ActiveHealthcheck, Upstream
from pyproxy.loop import EPOLLERR, EPOLLHUP, EPOLLIN, EPOLLOUT, EPOLLRDHUP, STREAM_EVENTS, Loop, Timer
from pyproxy.upstream import Balancer, Peer


class _Probe:
    """The state of one target's probing: counters between probes, the socket during one."""

    __slots__ = ("peer", "successes", "failures", "timeouts", "sock", "timer", "reply", "sent", "gone")

    def __init__(self, peer: Peer):
        self.peer = peer
        self.successes = self.failures = self.timeouts = 0
        self.sock: socket.socket | None = None
        self.timer: Timer | None = None
        self.reply = b""
        self.sent = False
        self.gone = False           # its address left the balancer (DNS): no more probes


class ActiveChecker:
    """Probes the peers of one balancer every `interval` seconds."""

    def __init__(self, loop: Loop, balancer: Balancer, settings: ActiveHealthcheck,
                 log: Callable[[str, str], None]):
        self.loop = loop
        self.balancer = balancer
        self.settings = settings
        self.log = log
        self.probes = [_Probe(peer) for peer in (*balancer.peers, *balancer.backups) if peer.weight > 0]
        self.version = balancer.version
        self.stopped = False
        balancer.revived_by_checks = True

    def start(self) -> None:
        for probe in self.probes:
            self._first(probe)

    def _first(self, probe: _Probe) -> None:
        # Spread the first probes over one interval so that targets (and workers) do not probe in step.
        self.loop.call_later(random.uniform(0, self.settings.interval), partial(self._probe, probe))

    def _follow_peers(self) -> None:
        """Probe what the balancer's peers are now, when DNS changed them."""
        balancer = self.balancer
        balancer.check_dns(self.loop.now)
        if balancer.version == self.version:
            return
        self.version = balancer.version
        peers = {peer for peer in (*balancer.peers, *balancer.backups) if peer.weight > 0}
        for probe in self.probes:
            if probe.peer not in peers:
                probe.gone = True
                self._end_probe(probe)
        self.probes = [probe for probe in self.probes if not probe.gone]
        for peer in peers - {probe.peer for probe in self.probes}:
            probe = _Probe(peer)
            self.probes.append(probe)
            self._first(probe)

    def stop(self) -> None:
        """No more probes (a draining worker): end the ones under way, skip the scheduled ones."""
        self.stopped = True
        for probe in self.probes:
            self._end_probe(probe)

    # -- one probe --------------------------------------------------------------------------------
    def _probe(self, probe: _Probe) -> None:
        self._follow_peers()
        if probe.sock is not None or self.stopped or probe.gone:
            return
        addr = probe.peer.addr
        try:
            sock = socket.socket(probe.peer.family,
                                 socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
        except OSError:
            self._schedule(probe)            # out of fds: this worker has bigger problems; try later
            return
        err = sock.connect_ex(addr)
        if err not in (0, errno.EINPROGRESS):
            sock.close()
            self._failed(probe, f"connect failed ({err}: {os.strerror(err)})", timed_out=False)
            return
        probe.sock, probe.reply, probe.sent = sock, b"", False
        self.loop.add(sock.fileno(), STREAM_EVENTS, partial(self._on_event, probe))
        probe.timer = self.loop.call_later(self.settings.timeout, partial(self._on_timeout, probe))

    def _on_event(self, probe: _Probe, mask: int) -> None:
        sock = probe.sock
        if sock is None:
            return
        if not probe.sent:
            err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                self._failed(probe, f"connect failed ({err}: {os.strerror(err)})", timed_out=False)
                return
            if not mask & EPOLLOUT:
                return
            probe.sent = True
            if self.settings.send:
                try:
                    sock.send(self.settings.send)   # a probe is small: one send fits a fresh socket
                except OSError as exc:
                    self._failed(probe, f"send failed ({exc.strerror})", timed_out=False)
                    return
            if not self.settings.expect:
                self._succeeded(probe)
                return
        if mask & (EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR):
            self._read_reply(probe)

    def _read_reply(self, probe: _Probe) -> None:
        expect, sock = self.settings.expect, probe.sock
        if expect is None or sock is None:
            return                  # nothing to wait for: the probe succeeded on connect
        while len(probe.reply) < len(expect):
            try:
                data = sock.recv(len(expect) - len(probe.reply))
            except BlockingIOError:
                return
            except OSError as exc:
                self._failed(probe, f"read failed ({exc.strerror})", timed_out=False)
                return
            if not data:
                self._failed(probe, f"closed after {len(probe.reply)} byte(s) of the expected reply",
                             timed_out=False)
                return
            probe.reply += data
        if probe.reply == expect:
            self._succeeded(probe)
        else:
            self._failed(probe, f"unexpected reply {probe.reply!r}", timed_out=False)

    def _on_timeout(self, probe: _Probe) -> None:
        probe.timer = None
        if probe.sock is not None:
            self._failed(probe, f"timed out after {self.settings.timeout:g}s", timed_out=True)

    def _end_probe(self, probe: _Probe) -> None:
        if probe.timer is not None:
            probe.timer.cancel()
            probe.timer = None
        if probe.sock is not None:
            self.loop.forget(probe.sock.fileno())
            probe.sock.close()
            probe.sock = None

    def _schedule(self, probe: _Probe) -> None:
        self.loop.call_later(self.settings.interval, partial(self._probe, probe))

    # -- verdicts ---------------------------------------------------------------------------------
    def _succeeded(self, probe: _Probe) -> None:
        self._end_probe(probe)
        probe.failures = probe.timeouts = 0
        probe.successes += 1
        peer, now = probe.peer, self.loop.now
        if not peer.available(now) and probe.successes >= self.settings.healthy_successes:
            self.balancer.mark_up(peer, now)
        self._schedule(probe)

    def _failed(self, probe: _Probe, reason: str, timed_out: bool) -> None:
        self._end_probe(probe)
        probe.successes = 0
        if timed_out:
            probe.timeouts += 1
            count, threshold = probe.timeouts, self.settings.unhealthy_timeouts
        else:
            probe.failures += 1
            count, threshold = probe.failures, self.settings.unhealthy_tcp_failures
        peer, now = probe.peer, self.loop.now
        if threshold > 0 and count >= threshold and peer.available(now):
            self.balancer.mark_down(peer, now, math.inf, f"active health check: {reason}")
        self._schedule(probe)


class UdpChecker(ActiveChecker):
    """`type: udp`: each probe sends `send` as a datagram from a socket connected to the target and
    waits for a datagram that starts with `expect` (any datagram without it). A refusal (ICMP port
    unreachable, ECONNREFUSED on the connected socket) is a failure, silence past `timeout` a timeout."""

    def _probe(self, probe: _Probe) -> None:
        if probe.sock is not None or self.stopped:
            return
        try:
            sock = socket.socket(probe.peer.family,
                                 socket.SOCK_DGRAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
        except OSError:
            self._schedule(probe)
            return
        try:
            sock.connect(probe.peer.addr)
            sock.send(self.settings.send or b"")
        except OSError as exc:
            sock.close()
            self._failed(probe, f"send failed ({exc.strerror})", timed_out=False)
            return
        probe.sock, probe.sent = sock, True
        self.loop.add(sock.fileno(), EPOLLIN, partial(self._on_datagram, probe))
        probe.timer = self.loop.call_later(self.settings.timeout, partial(self._on_timeout, probe))

    def _on_datagram(self, probe: _Probe, mask: int) -> None:
        sock = probe.sock
        if sock is None:
            return
        try:
            reply = sock.recv(65535)
        except BlockingIOError:
            return
        except OSError as exc:
            self._failed(probe, f"read failed ({exc.strerror})", timed_out=False)
            return
        expect = self.settings.expect
        if expect is None or reply.startswith(expect):
            self._succeeded(probe)
        else:
            self._failed(probe, f"unexpected reply {reply[:len(expect)]!r}", timed_out=False)


CHECKERS: dict[str, type[ActiveChecker]] = {"tcp": ActiveChecker, "udp": UdpChecker}


def start_active_checks(loop: Loop, balancers: dict[str, Balancer], upstreams: Iterable[Upstream],
                        log: Callable[[str, str], None]) -> list[ActiveChecker]:
    """Start a checker for every upstream with `healthchecks.active.interval` > 0."""
    by_name = {b.name: b for b in balancers.values()}   # implicit balancers are "host:port": no clash
    checkers = []
    for upstream in upstreams:
        settings = upstream.healthchecks.active
        if settings.interval > 0 and upstream.name in by_name:
            checker = CHECKERS[settings.type](loop, by_name[upstream.name], settings, log)
            checker.start()
            checkers.append(checker)
    return checkers
