"""Load balancing and passive health checks for one worker process.

Each worker owns its own balancers (one per upstream, plus one per service that names a plain
host:port). Nothing here does I/O or blocks, and the clock is passed in as `now` (a time.monotonic()
value), so a test can play with time. A balancer stores every change of a peer's health in the
shared `HealthTable`, and a new generation's balancers start from it (`build_balancers`).

The shapes follow nginx's `ngx_stream_upstream_round_robin`: passive health lives on the peer (its
weight, current/effective weight, connection count, consecutive failures and the time it is out of
rotation until), and the algorithms are nginx's smooth weighted round robin and least connections, plus
a Ketama-style hash ring for consistent hashing.

Targets may also be `backup` (picked only while no other target is usable), capped at `max_conns`
sessions at once (counted over every worker in shared memory) and ramped up over `slow_start` after
being down. A target written as a host name follows DNS: the master re-resolves it and publishes the
addresses (pyproxy.dns.AddressTable); a balancer sees the table's generation move at its next pick and
rebuilds its peers, keeping the state of the addresses that stay.

The session code drives a balancer like this:

    tried = []
    while (peer := balancer.pick(now, key, tried)) is not None and len(tried) <= retries:
        tried.append(peer)
        ...connect...  ->  balancer.connected(peer, now)   # then balancer.released(peer) at the end
                       or  balancer.failed(peer, now, timeout=...)
"""

from __future__ import annotations

import bisect
import hashlib
import math
from collections.abc import Callable, Collection

from pyproxy.addresses import family_of, host_port, is_ip_address
from pyproxy.config.model import ALGORITHMS, Config, PassiveHealthcheck, Queue, Record, Target
from pyproxy.shared import ADMIN_HEALTHY, ADMIN_UNHEALTHY, AddressTable, CounterRows, HealthTable, slot_of

__all__ = ["Peer", "Balancer", "build_balancers", "peer_name", "stable_hash"]

# Ring points per 100 units of weight (Ketama uses 160 per server of weight 1; nginx's `hash ...
# consistent` uses 160 * weight). Enough for an even spread over a handful of targets.
POINTS_PER_100_WEIGHT = 160

LogFn = Callable[[str, str], None]
NO_QUEUE = Queue()


def stable_hash(data: str) -> int:
    """A 32-bit hash of `data` that is the same in every process and every run.

    Python's `hash()` is salted per process (PYTHONHASHSEED), and workers must agree on which target a
    key goes to, so the ring uses the first four bytes of MD5 — Ketama's choice — instead.
    """
    digest = hashlib.md5(data.encode("utf-8", "surrogatepass"), usedforsecurity=False).digest()
    return int.from_bytes(digest[:4], "big")


def peer_name(addr: tuple[str, int]) -> str:
    """How an address is written in logs and `$upstream_addr`: `127.0.0.1:1025` or `[::1]:1025`."""
    return host_port(addr[0], addr[1])


def _seconds(value: float) -> str:
    return f"{value:g}s"


class Peer:
    """One resolved address of a target, with its balancing and passive-health state."""

    __slots__ = ("addr", "family", "name", "weight", "current_weight", "effective_weight",
                 "conns", "fails", "timeouts", "down_until", "backup", "max_conns", "slot",
                 "slow_start", "back_at")

    def __init__(self, addr: tuple[str, int], weight: int = 100, name: str | None = None,
                 backup: bool = False, max_conns: int = 0, slow_start: float = 0.0):
        self.addr = (addr[0], addr[1])
        self.family = family_of(addr[0])
        self.name = name if name is not None else peer_name(addr)
        self.weight = weight
        self.current_weight = 0           # smooth weighted round robin's running score
        self.effective_weight = weight    # lowered by failures, recovers by one per pick (nginx)
        self.conns = 0                    # sessions currently connected through this peer
        self.fails = 0                    # consecutive connect failures (refused, unreachable)
        self.timeouts = 0                 # consecutive connect timeouts
        self.down_until = 0.0             # out of rotation until this monotonic time
        self.backup = backup              # picked only while no other peer is usable
        self.max_conns = max_conns        # sessions at once over every worker; 0: no cap
        self.slot = -1                    # where those sessions are counted (Balancer.counts)
        self.slow_start = slow_start      # seconds to ramp its weight up once back from down
        self.back_at = 0.0                # when it came (or comes) back from down

    def recovered_weight(self, now: float) -> int:
        """The effective weight of the next pick for a peer whose weight was lowered: one more
        (nginx), or with slow_start, the share of its weight that the time since it came back earns."""
        if not self.slow_start:
            return self.effective_weight + 1
        if now < self.back_at + self.slow_start:
            return max(1, int(self.weight * (now - self.back_at) / self.slow_start))
        return self.weight

    def available(self, now: float) -> bool:
        """Whether passive (or active) health lets new sessions use this peer at `now`."""
        return now >= self.down_until

    def __repr__(self) -> str:
        return (f"Peer({self.name}, weight={self.weight}, conns={self.conns}, fails={self.fails}, "
                f"timeouts={self.timeouts}, down_until={self.down_until})")


class Balancer:
    """Chooses a peer for each new connection attempt and keeps the peers' passive health.

    One instance per upstream per worker; services naming the same upstream share it, so their
    connection counts and failures add up.
    """

    __slots__ = ("name", "peers", "backups", "algorithm", "hash_on", "passive", "log", "health",
                 "revived_by_checks", "active_checks", "capped", "counts", "targets", "table", "table_seen",
                 "version", "told", "queue", "queue_slot", "_all_down", "_ring_points", "_ring_peers")

    def __init__(self, name: str, peers: list[Peer], algorithm: str = "round-robin", hash_on: str = "ip",
                 passive: PassiveHealthcheck = PassiveHealthcheck(), log: LogFn | None = None,
                 health: HealthTable | None = None, counts: CounterRows | None = None,
                 queue: Queue = NO_QUEUE):
        if algorithm not in ALGORITHMS:
            raise ValueError(f"unknown balancing algorithm {algorithm!r}")
        self.name = name
        self.algorithm = algorithm
        self.hash_on = hash_on            # which key the session passes to pick(): "ip" or "sni"
        self.passive = passive
        self.log = log
        self.health = health              # where peers' health changes are kept for the next generation
        self.counts = counts              # where max_conns sessions are counted over every worker
        self.queue = queue                # where sessions wait when every peer is at max_conns
        self.queue_slot = slot_of(f"queue\n{name}", counts.slots) if counts is not None else -1
        # With active health checks, a target that passive checks took out stays out until an
        # active check sees it healthy again (Kong's model) instead of coming back after fail_timeout.
        self.revived_by_checks = False
        self.active_checks = False        # this generation probes the peers (restore() is told)
        # The targets written as host names follow the master's DNS table (follow_dns): None when
        # every target is an IP address, and pick() then never looks.
        self.targets: tuple[Target, ...] = ()
        self.table: AddressTable | None = None
        self.table_seen = 0
        self.version = 0                  # one more at each change of the peers (active checks follow it)
        self.told = 0                     # the version of what the Admin API said that is applied
        self._all_down = False            # inside the "every target is unhealthy" state (logged once)
        self._ring_points: list[int] = []
        self._ring_peers: list[Peer] = []
        self.peers: list[Peer] = []
        self.backups: list[Peer] = []
        self.capped = False
        self._set_peers(peers)

    def _set_peers(self, peers: list[Peer]) -> None:
        for peer in peers:
            if peer.weight < 0:
                raise ValueError(f"negative weight for {peer.name}")
            if peer.max_conns and self.counts is not None:
                peer.slot = slot_of(f"max_conns\n{self._health_key(peer)}", self.counts.slots)
        self.peers = [peer for peer in peers if not peer.backup]
        self.backups = [peer for peer in peers if peer.backup]
        # Only with a cap and a place to count it does a pick look at the peers' counts.
        self.capped = self.counts is not None and any(peer.max_conns for peer in peers)
        self.version += 1
        if self.algorithm == "consistent-hashing":
            self._build_ring()

    # -- choosing -------------------------------------------------------------------------------

    def pick(self, now: float, key: str | None = None, tried: Collection[Peer] = ()) -> Peer | None:
        """The peer for a new connection attempt, or None when every peer has been tried.

        `key` is the client IP or SNI for consistent hashing (None falls back to round robin for this
        pick). Peers in `tried`, peers that are down and peers at their max_conns are skipped; backup
        peers are picked only when no other peer is left. If every untried peer is down they are tried
        anyway (as Kong does) rather than refusing the client, and the log says so once.
        """
        table = self.table
        if table is not None and table.header[0] != self.table_seen:
            self.follow_dns(now)
        peer = self._choose(self.peers, now, key, tried, True)
        if peer is None and self.backups:
            peer = self._choose(self.backups, now, None, tried, True)
        if peer is not None:
            if self._all_down:
                self._all_down = False
                self._say("notice", f'upstream "{self.name}": target {peer.name} is available again')
            return peer
        peer = self._choose(self.peers, now, key, tried, False)
        if peer is not None and not self._all_down and not self._any_available(now):
            # Only a real outage counts: a tried peer that is still up means this session was unlucky,
            # not that the upstream is down.
            self._all_down = True
            self._say("warn", f'upstream "{self.name}": all targets are unhealthy, trying them anyway')
        return peer

    def _choose(self, peers: list[Peer], now: float, key: str | None, tried: Collection[Peer],
                healthy_only: bool) -> Peer | None:
        if self.algorithm == "consistent-hashing" and key is not None:
            return self._pick_hash(now, key, tried, healthy_only)
        if self.algorithm == "least-connections":
            return self._pick_least_conns(peers, now, tried, healthy_only)
        return self._pick_round_robin(peers, now, tried, healthy_only)

    def _pick_round_robin(self, peers: list[Peer], now: float, tried: Collection[Peer], healthy_only: bool,
                          tie: Peer | None = None) -> Peer | None:
        # nginx's ngx_stream_upstream_get_peer: every eligible peer gains its effective weight, the
        # highest score wins and pays back the total. Picks interleave smoothly (a b a, not a a b).
        # With `tie`, only the peers as loaded as it (the same conns/weight) are eligible.
        best = None
        total = 0
        capped = self.capped
        for peer in peers:
            if peer.weight <= 0 or (tried and peer in tried) or (healthy_only and now < peer.down_until):
                continue
            if capped and peer.max_conns and self.full(peer):
                continue
            if tie is not None and peer.conns * tie.weight != tie.conns * peer.weight:
                continue
            peer.current_weight += peer.effective_weight
            total += peer.effective_weight
            if peer.effective_weight < peer.weight:
                peer.effective_weight = peer.recovered_weight(now)
            if best is None or peer.current_weight > best.current_weight:
                best = peer
        if best is not None:
            best.current_weight -= total
        return best

    def _pick_least_conns(self, peers: list[Peer], now: float, tried: Collection[Peer],
                          healthy_only: bool) -> Peer | None:
        # nginx's ngx_stream_upstream_get_least_conn_peer: the fewest conns/weight wins (compared by
        # cross-multiplying, no floats); ties are settled by smooth weighted round robin among them.
        best = None
        many = False
        capped = self.capped
        for peer in peers:
            if peer.weight <= 0 or (tried and peer in tried) or (healthy_only and now < peer.down_until):
                continue
            if capped and peer.max_conns and self.full(peer):
                continue
            if best is None or peer.conns * best.weight < best.conns * peer.weight:
                best = peer
                many = False
            elif peer.conns * best.weight == best.conns * peer.weight:
                many = True
        if best is None or not many:
            return best
        return self._pick_round_robin(peers, now, tried, healthy_only, tie=best)

    def _pick_hash(self, now: float, key: str, tried: Collection[Peer], healthy_only: bool) -> Peer | None:
        # Walk clockwise from the key's point to the first usable peer: a peer that is down or already
        # tried sends its keys to its neighbours on the ring, and only those keys move.
        points = self._ring_points
        count = len(points)
        if not count:
            return None
        ring = self._ring_peers
        capped = self.capped
        start = bisect.bisect_left(points, stable_hash(key))
        for i in range(start, start + count):
            peer = ring[i % count]
            if (tried and peer in tried) or (healthy_only and now < peer.down_until):
                continue
            if capped and peer.max_conns and self.full(peer):
                continue
            return peer
        return None

    def _build_ring(self) -> None:
        entries: list[tuple[int, str, Peer]] = []
        for peer in self.peers:
            if peer.weight <= 0:
                continue
            points = max(1, POINTS_PER_100_WEIGHT * peer.weight // 100)
            # A point depends only on the peer's own address, never on its position in the list, so
            # adding or removing a target moves only the keys that land next to its points.
            entries.extend((stable_hash(f"{peer.name}-{i}"), peer.name, peer) for i in range(points))
        entries.sort(key=lambda e: (e[0], e[1]))
        self._ring_points = [e[0] for e in entries]
        self._ring_peers = [e[2] for e in entries]

    def _any_available(self, now: float) -> bool:
        return any(peer.weight > 0 and now >= peer.down_until for peer in self.peers)

    def full(self, peer: Peer) -> bool:
        """Whether `peer` has max_conns sessions over all workers (read from shared memory: a worker
        that picks it meanwhile may go one over, as nginx's max_conns does with several workers)."""
        return self.counts is not None and self.counts.total(peer.slot) >= peer.max_conns

    # -- the queue (max_conns) -------------------------------------------------------------------

    def may_wait(self, tried: Collection[Peer]) -> bool:
        """Whether a session that found no peer should wait in the queue: there is one, and a peer
        it has not tried is at its max_conns (a slot may free up)."""
        return self.queue.size > 0 and self.capped and any(
            peer.weight > 0 and peer.max_conns and not (tried and peer in tried) and self.full(peer)
            for peer in (*self.peers, *self.backups))

    def has_room(self, tried: Collection[Peer]) -> bool:
        """Whether a peer not tried yet is below its max_conns (health aside: pick() decides)."""
        return any(peer.weight > 0 and not (tried and peer in tried)
                   and not (peer.max_conns and self.full(peer)) for peer in (*self.peers, *self.backups))

    def enter_queue(self) -> bool:
        """Count a waiting session over every worker; False when the queue is full."""
        counts = self.counts
        if counts is None or counts.total(self.queue_slot) >= self.queue.size:
            return False
        counts.add(self.queue_slot, 1)
        return True

    def leave_queue(self) -> None:
        if self.counts is not None:
            self.counts.add(self.queue_slot, -1)

    # -- outcomes -------------------------------------------------------------------------------

    def connected(self, peer: Peer, now: float) -> None:
        """The connect to `peer` succeeded: count the session and forget its failures."""
        peer.conns += 1
        if peer.slot >= 0:
            self._count(peer, 1)
        peer.fails = 0
        peer.timeouts = 0
        if peer.down_until > now:
            # Tried anyway while it was out, and it answered: it is back (a success is proof enough).
            peer.down_until = 0.0
            peer.back_at = now
            self._all_down = False
            self._store(peer)
            self._say("notice", f'upstream "{self.name}": target {peer.name} is up again')

    def failed(self, peer: Peer, now: float, timeout: bool) -> None:
        """The connect to `peer` was refused/unreachable (`timeout=False`) or timed out (`timeout=True`).

        Consecutive failures of each kind are counted; reaching that kind's threshold (0 disables it)
        takes the peer out of rotation for `fail_timeout` seconds (nginx's max_fails/fail_timeout).
        """
        if timeout:
            peer.timeouts += 1
            count, threshold, what = peer.timeouts, self.passive.unhealthy_timeouts, "connect timeout(s)"
        else:
            peer.fails += 1
            count, threshold, what = peer.fails, self.passive.unhealthy_tcp_failures, "connect failure(s)"
        if threshold <= 0:
            return
        # As nginx does, a failing peer also loses some weight, won back one point per pick.
        peer.effective_weight = max(0, peer.effective_weight - peer.weight // threshold)
        if count < threshold:
            return
        was_down = now < peer.down_until
        if self.revived_by_checks:
            self._take_out(peer, math.inf)
            if not was_down:
                self._say("warn", f'upstream "{self.name}": target {peer.name} is down after {count} {what}, '
                                  f'until an active health check succeeds')
            return
        self._take_out(peer, now + self.passive.fail_timeout)
        if not was_down:
            self._say("warn", f'upstream "{self.name}": target {peer.name} is down for '
                              f'{_seconds(self.passive.fail_timeout)} after {count} {what}')

    def _take_out(self, peer: Peer, until: float) -> None:
        peer.down_until = until
        peer.back_at = until              # slow_start ramps from there (an active check may say sooner)
        if peer.slow_start:
            peer.effective_weight = 0
        self._store(peer)

    def released(self, peer: Peer) -> None:
        """A session through `peer` ended."""
        if peer.conns > 0:
            peer.conns -= 1
            if peer.slot >= 0:
                self._count(peer, -1)

    def _count(self, peer: Peer, change: int) -> None:
        """Count a session of a capped peer in this worker's row of the shared counters."""
        if self.counts is not None:
            self.counts.add(peer.slot, change)

    # -- active health checks -------------------------------------------------------------------

    def mark_down(self, peer: Peer, now: float, duration: float = math.inf, reason: str = "") -> None:
        """Take `peer` out of rotation for `duration` seconds (default: until `mark_up`)."""
        was_down = now < peer.down_until
        self._take_out(peer, max(peer.down_until, now + duration))
        if not was_down:
            why = f" ({reason})" if reason else ""
            self._say("warn", f'upstream "{self.name}": target {peer.name} is down{why}')

    def mark_up(self, peer: Peer, now: float) -> None:
        """Put `peer` back in rotation now and forget its failures (an active check succeeded)."""
        was_down = now < peer.down_until
        peer.down_until = 0.0
        peer.fails = 0
        peer.timeouts = 0
        if was_down:
            peer.back_at = now
        self._store(peer)
        if was_down:
            self._say("notice", f'upstream "{self.name}": target {peer.name} is up again')

    # -- DNS ------------------------------------------------------------------------------------

    def follow(self, targets: tuple[Target, ...], table: AddressTable, now: float) -> None:
        """Take the addresses of `targets` written as host names from the master's `table` from now on."""
        self.targets = targets
        self.table = table
        self.follow_dns(now)

    def check_dns(self, now: float) -> None:
        """Rebuild the peers if the master's DNS table changed since they were built (pick() does
        the same inline)."""
        table = self.table
        if table is not None and table.header[0] != self.table_seen:
            self.follow_dns(now)

    def follow_dns(self, now: float) -> None:
        """The table changed: rebuild the peers from it, keeping the state of the addresses that stay
        (their health, counts and round-robin scores); a new address starts as a previous generation
        left it, or healthy."""
        assert self.table is not None, "only a balancer with host names follows DNS"
        read = self.table.read()
        if read is None:
            return                  # the master is writing: the next pick reads it
        self.table_seen, entries = read
        wanted = _wanted_peers(self.targets, entries)
        current = [(p.addr, p.weight, p.backup) for p in (*self.peers, *self.backups)]
        if [(addr, weight, target.backup) for addr, weight, target in wanted] == current:
            return
        old = {peer.addr: peer for peer in (*self.peers, *self.backups)}
        peers = []
        for addr, weight, target in wanted:
            peer = old.pop(addr, None)
            if peer is None:
                peer = Peer(addr, weight, None, target.backup, target.max_conns, target.slow_start)
                self._restore(peer, now)
            elif peer.weight != weight:
                peer.weight = peer.effective_weight = weight
            peers.append(peer)
        self._set_peers(peers)
        self.told = -1              # the weights the Admin API gave these addresses apply to new peers too
        self.administer(now, health_too=False)
        names = ", ".join(peer.name for peer in peers) or "none"
        self._say("debug", f'upstream "{self.name}": addresses from DNS: {names}')

    # -- what the Admin API said -----------------------------------------------------------------

    def administer(self, now: float, health_too: bool = True) -> None:
        """Apply what the Admin API said since the last call (HealthTable.tell), checked every second:
        a target's new weight (0: no new sessions, those open go on), `healthy` (back in rotation
        now), `unhealthy` (out until `healthy` or an active check succeeds). Health is an event, so
        a new generation (`health_too=False`) takes only the weights: `restore` gave it the health."""
        health = self.health
        if health is None or health.admin_version() == self.told:
            return
        version = health.admin_version()
        reweighed = False
        for peer in (*self.peers, *self.backups):
            said = health.told(self._health_key(peer))
            if said is None:
                continue
            weight, state, at = said
            if weight >= 0 and weight != peer.weight:
                peer.weight = peer.effective_weight = weight
                peer.current_weight = 0
                reweighed = True
                self._say("notice", f'upstream "{self.name}": target {peer.name} weight {weight} (Admin API)')
            if health_too and at > self.told:
                if state == ADMIN_UNHEALTHY:
                    self.mark_down(peer, now, reason="set unhealthy through the Admin API")
                elif state == ADMIN_HEALTHY:
                    self.mark_up(peer, now)
        if reweighed and self.algorithm == "consistent-hashing":
            self._build_ring()
        self.told = version

    # -- across generations ---------------------------------------------------------------------

    def _health_key(self, peer: Peer) -> str:
        return HealthTable.key(self.name, peer.name)

    def _store(self, peer: Peer) -> None:
        if self.health is not None:
            self.health.store(self._health_key(peer), peer.down_until)

    def restore(self, now: float, active_checks: bool) -> None:
        """Start each peer as a previous generation left it. A peer out until an active check passes
        starts healthy when this generation has no active checks for it (none would bring it back),
        unless the Admin API said it is unhealthy (its `healthy` will)."""
        self.active_checks = active_checks
        for peer in (*self.peers, *self.backups):
            self._restore(peer, now)

    def _restore(self, peer: Peer, now: float) -> None:
        if self.health is None:
            return
        until = self.health.load(self._health_key(peer))
        if until is None or until <= now or (until == math.inf and not self.active_checks
                                             and not self._said_unhealthy(peer)):
            return
        peer.down_until = peer.back_at = until
        if peer.slow_start:
            peer.effective_weight = 0
        left = ("until an active health check succeeds" if until == math.inf
                else f"for {_seconds(round(until - now, 1))}")
        self._say("info", f'upstream "{self.name}": target {peer.name} is still down {left} '
                          f'(as the previous generation left it)')

    def _said_unhealthy(self, peer: Peer) -> bool:
        said = self.health.told(self._health_key(peer)) if self.health is not None else None
        return said is not None and said[1] == ADMIN_UNHEALTHY

    def _say(self, level: str, message: str) -> None:
        if self.log is not None:
            self.log(level, message)

    def __repr__(self) -> str:
        return f"Balancer({self.name!r}, {self.algorithm}, {self.peers!r}, backups={self.backups!r})"


def _wanted_peers(targets: tuple[Target, ...],
                  entries: dict[str, tuple[Record, ...]]) -> list[tuple[tuple[str, int], int, Target]]:
    """(address, weight, target) of every peer `targets` give: a host name's from the DNS table
    (`entries`; its config-time addresses if the master does not follow it), an IP's as written. The
    first target to give an address owns it."""
    wanted: dict[tuple[str, int], tuple[tuple[str, int], int, Target]] = {}
    for target in targets:
        records = entries.get(target.host)
        if records is None:
            records = tuple((ip, port, 0) for ip, port in target.addresses)
        for ip, port, weight in records:
            addr = (ip, port or target.port)
            wanted.setdefault(addr, (addr, weight or target.weight, target))
    return list(wanted.values())


def _peers_of(targets: tuple[Target, ...]) -> list[Peer]:
    return [Peer(addr, target.weight, None, target.backup, target.max_conns, target.slow_start)
            for target in targets for addr in target.addresses]


def build_balancers(config: Config, log: LogFn | None = None, health: HealthTable | None = None,
                    now: float = 0.0, table: AddressTable | None = None,
                    counts: CounterRows | None = None) -> dict[str, Balancer]:
    """One balancer per service name, for one worker.

    Services whose host names an upstream share that upstream's balancer (one object per upstream);
    a service with a plain host:port gets its own round-robin balancer over its resolved addresses,
    named `host:port` in the log as nginx names an implicit upstream. With `health`, the peers start
    as the last generation left them at `now`, and their changes are stored there. With `table` (the
    master's DNS), the balancers of host names follow it; with `counts`, max_conns is counted there.
    """
    by_upstream: dict[str, Balancer] = {}
    for upstream in config.upstreams:
        balancer = Balancer(upstream.name, _peers_of(upstream.targets), upstream.algorithm, upstream.hash_on,
                            upstream.healthchecks.passive, log, health, counts, upstream.queue)
        # What the Admin API said is taken before the health is restored: a health said after this
        # is applied at the worker's next heartbeat, one said before is in the table (the admin
        # process stores it before telling it), so none falls between the two (test_admin_fleet).
        balancer.administer(now, health_too=False)
        balancer.restore(now, upstream.healthchecks.active.interval > 0)
        if table is not None and any(not is_ip_address(t.host) for t in upstream.targets):
            balancer.follow(upstream.targets, table, now)
        by_upstream[upstream.name] = balancer
    balancers: dict[str, Balancer] = {}
    for service in config.services:
        if service.upstream is not None:
            balancers[service.name] = by_upstream[service.upstream]
        else:
            target = Target(service.host, service.port, addresses=service.addresses)
            balancer = Balancer(host_port(service.host, service.port), _peers_of((target,)), log=log,
                                health=health)
            balancer.restore(now, False)
            if table is not None and not is_ip_address(service.host):
                balancer.follow((target,), table, now)
            balancers[service.name] = balancer
    return balancers
