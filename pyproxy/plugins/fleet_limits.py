"""`limit-conn` and `rate-limit` with `policy: redis`: one limit for a fleet of pyproxy instances.

    - name: limit-conn
      config: {limit: 100, per: ip, policy: redis, redis_host: 10.0.0.5, redis_timeout: 200}

The fields are Kong's: `policy`, `fault_tolerant`, and the Redis connection as Kong 3.6 and later
write it, `redis: {host, port, username, password, database, timeout, ssl, ssl_verify,
server_name}` (`timeout` in milliseconds, default 2000), or as the flat shorthands older Kongs wrote
and newer ones still take (`redis_host`, `redis_port`…): the same meaning, and a field given both
ways with two different values is refused, as Kong 3.8 and later refuse it. Each worker process has one
connection to each Redis it is given, in its own event loop (pyproxy.plugins.redis_client): a
session on a limited route waits for one round trip, other sessions do not wait at all, and the
commands of one tick go out in one write.

**limit-conn** counts each worker's open sessions on each key in a Redis hash (`<key>:n`, one
field per worker process: host name, pid and a random tag) and keeps a lease per worker in a sorted
set (`<key>:alive`, score = when the lease ends, in Redis's clock). One Lua script admits a
session: it first drops the fields of workers whose lease ended (an instance that crashed, or lost
its Redis, stops counting after LEASE seconds), sums the rest, and counts the session if the sum is
below the limit. So the check and the count are one atomic step across the fleet: N sessions are
admitted in total, the N+1th is refused, whichever instance it lands on. The end of a session is
one HINCRBY -1 (sent with the others of its tick, no reply awaited). A worker with open sessions
renews its leases every BEAT seconds, and with them re-asserts its counts (HSET of what it holds),
which also repairs what an outage or a restarted Redis lost.

Why not one sorted-set member per session: its renewal would cost a write per open session per
beat; a field per worker costs one per key. Why not a plain counter: a crashed instance's sessions
would count forever.

**rate-limit** keeps the same token bucket as the local policy (GCRA: one "theoretical arrival
time" per key, refilled at `rate` per second, `burst` deep) in Redis, updated by one Lua script
in Redis's clock, so the instances' clocks do not matter and the fleet shares one bucket. This is
stricter and smoother than Kong's fixed per-second and per-minute windows (no double burst at a
window's edge), and a local and a redis policy mean the same numbers.

**When Redis fails** (refused, dropped, an error reply, or no answer within `redis_timeout`) the
plugins fail open, as Kong does: every session waiting on it and every later one is decided by the
local policy (the instance's shared-memory counts, which always count every session the instance
holds) until Redis answers again. The error log says it once when it starts and once when it ends,
per worker process. Sessions decided locally meanwhile are counted in Redis once it is back (the
re-assert above). With `fault_tolerant: false` (Kong's field; true by default) the sessions that
would be decided locally are refused instead, status 500 as Kong's 500 then (not the limit's 503:
nobody knows whether the limit was reached); the log lines are the same.
"""

from __future__ import annotations

import os
import socket
from typing import TYPE_CHECKING

from pyproxy.config.model import STATUS_INTERNAL
from pyproxy.config.values import did_you_mean
from pyproxy.phases import CLOSED
from pyproxy.plugins import PENDING, PluginConfig, PluginContext
from pyproxy.plugins.limits import LimitConn, RateLimit, _key
from pyproxy.plugins.redis_client import RedisClient, client_for
from pyproxy.shared import slot_of

if TYPE_CHECKING:
    from pyproxy.loop import Loop, Timer
    from pyproxy.session import Session

POLICIES = ("local", "redis")
REDIS_FIELDS = ("host", "port", "username", "password", "database", "timeout", "ssl", "ssl_verify",
                "server_name")     # Kong's `redis: {…}` record (3.6 and later); `redis_<field>` before
REDIS_KEYS = ("policy", *(f"redis_{field}" for field in REDIS_FIELDS), "fault_tolerant", "redis")
LEASE_MS = 5000          # a worker's counts stop counting this long after its last renewal
BEAT = 1.0               # seconds between renewals, while the worker holds sessions on the key
BEAT_KEYS = 200          # keys per renewal command

# KEYS: the counts hash, the leases set. ARGV: this worker, the limit, the lease (ms).
ADMIT = """
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local ended = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now)
if #ended > 0 then
  redis.call('HDEL', KEYS[1], unpack(ended))
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
end
local total = 0
for _, n in ipairs(redis.call('HVALS', KEYS[1])) do total = total + tonumber(n) end
if total >= tonumber(ARGV[2]) then return 0 end
redis.call('HINCRBY', KEYS[1], ARGV[1], 1)
redis.call('ZADD', KEYS[2], now + ARGV[3], ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
redis.call('PEXPIRE', KEYS[2], ARGV[3])
return 1
"""
# KEYS: the counts hash. ARGV: this worker. A count never goes below zero (a Redis that lost it).
RELEASE = """
if redis.call('HINCRBY', KEYS[1], ARGV[1], -1) <= 0 then redis.call('HDEL', KEYS[1], ARGV[1]) end
return 1
"""
# KEYS: pairs (counts hash, leases set). ARGV: this worker, the lease (ms), then for each pair the
# sessions the worker holds there (≥ 1), or -1 when an admission is on its way (its count is not
# known yet: only the lease is renewed).
BEAT_SCRIPT = """
local t = redis.call('TIME')
local ends = t[1] * 1000 + math.floor(t[2] / 1000) + ARGV[2]
for i = 1, #KEYS, 2 do
  local n = tonumber(ARGV[2 + (i + 1) / 2])
  if n >= 0 then redis.call('HSET', KEYS[i], ARGV[1], n) end
  redis.call('ZADD', KEYS[i + 1], ends, ARGV[1])
  redis.call('PEXPIRE', KEYS[i], ARGV[2])
  redis.call('PEXPIRE', KEYS[i + 1], ARGV[2])
end
return 1
"""
# KEYS: the bucket. ARGV: ms per token, the tolerance (burst - 1 tokens) in ms.
GCRA = """
local t = redis.call('TIME')
local now = t[1] * 1000 + t[2] / 1000
local tat = tonumber(redis.call('GET', KEYS[1]) or 0)
if tat < now then tat = now end
if tat - now > tonumber(ARGV[2]) then return 0 end
tat = tat + tonumber(ARGV[1])
redis.call('SET', KEYS[1], string.format('%.3f', tat), 'PX', math.ceil(tat - now) + 1000)
return 1
"""


def redis_settings(config: PluginConfig) -> PluginConfig:
    """The Redis connection's fields (`host`, `port`…) that are set, from `redis: {…}` or the flat
    `redis_*` shorthands (check_policy has refused the two disagreeing)."""
    nested = config.get("redis")
    settings = {field: config.get(f"redis_{field}") for field in REDIS_FIELDS}
    if isinstance(nested, dict):
        settings.update((field, value) for field, value in nested.items()
                        if field in settings and value is not None)
    return {field: value for field, value in settings.items() if value is not None}


def check_policy(config: PluginConfig) -> list[tuple[str, str]]:
    """Problems with `policy`, `fault_tolerant` and the Redis fields (None is Kong's "not set"); a
    problem names the key the value came from (`redis.port` or `redis_port`)."""
    problems: list[tuple[str, str]] = []
    policy = config.get("policy", "local")
    if policy not in POLICIES:
        problems.append(("policy", f"expected one of {', '.join(POLICIES)}, got {policy!r}"))
    fault_tolerant = config.get("fault_tolerant")
    if fault_tolerant is not None and not isinstance(fault_tolerant, bool):
        problems.append(("fault_tolerant", f"expected true or false, got {fault_tolerant!r}"))
    nested = config.get("redis")
    if nested is not None and not isinstance(nested, dict):
        problems.append(("redis", f"expected a mapping of {', '.join(REDIS_FIELDS)}, got {nested!r}"))
        nested = None
    where = {field: f"redis_{field}" for field in REDIS_FIELDS}
    for field, value in (nested or {}).items():
        flat = f"redis_{field}"
        if field not in REDIS_FIELDS:
            hint = did_you_mean(field, REDIS_FIELDS)
            problems.append((f"redis.{field}",
                             f"unknown key{hint}" if hint else
                             f"unknown key; expected one of {', '.join(REDIS_FIELDS)}"))
        elif value is not None:
            where[field] = f"redis.{field}"
            if config.get(flat) is not None and config[flat] != value:
                # Kong ≥ 3.8 refuses a deprecated field that disagrees with its replacement.
                problems.append((f"redis.{field}", f"{value!r} disagrees with {flat}: {config[flat]!r}; "
                                                   f"give one of the two (redis_* is Kong's older form)"))
    settings = redis_settings(config)
    host = settings.get("host")
    if policy == "redis" and host is None:
        problems.append(("redis.host" if nested else "redis_host", "required with policy: redis"))
    if host is not None and (not isinstance(host, str) or not host):
        problems.append((where["host"], f"expected a host name or address, got {host!r}"))
    for field, low, high in (("port", 1, 65535), ("database", 0, 1 << 31), ("timeout", 1, 3_600_000)):
        value = settings.get(field)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                  or not low <= value <= high):
            problems.append((where[field], f"expected an integer from {low} to {high}, got {value!r}"))
    for field in ("username", "password", "server_name"):
        value = settings.get(field)
        if value is not None and not isinstance(value, str):
            problems.append((where[field], f"expected a string, got {value!r}"))
    for field in ("ssl", "ssl_verify"):
        value = settings.get(field)
        if value is not None and not isinstance(value, bool):
            problems.append((where[field], f"expected true or false, got {value!r}"))
    return problems


def _client(config: PluginConfig, context: PluginContext) -> RedisClient:
    settings = redis_settings(config)
    return client_for(settings["host"], settings.get("port", 6379), settings.get("timeout", 2000) / 1000,
                      context.log, settings.get("username"), settings.get("password"),
                      settings.get("database", 0), bool(settings.get("ssl")),
                      bool(settings.get("ssl_verify")), settings.get("server_name"))


def _unavailable(plugin: LimitConn | RateLimit, session: Session) -> int:
    """`fault_tolerant: false` and Redis cannot be asked: the session is refused, status 500 (Kong's
    answer then; 503, the limit's refusal, would say the limit was reached, which nobody knows)."""
    session.log("info", f"{plugin.name}: Redis unavailable and fault_tolerant is false; session refused")
    return STATUS_INTERNAL


def _worker_id() -> str:
    """This worker process in the fleet: unique even where two hosts share a name and a pid
    (containers)."""
    return f"{socket.gethostname()}:{os.getpid()}:{os.urandom(4).hex()}"


class FleetLimitConn(LimitConn):
    """limit-conn, counted in Redis across the fleet (see the module's docstring)."""

    def __init__(self, config: PluginConfig, context: PluginContext):
        super().__init__(config, context)
        self.client = client = _client(config, context)
        self.admit_sha = client.script(ADMIT)
        self.release_sha = client.script(RELEASE)
        self.beat_sha = client.script(BEAT_SCRIPT)
        self.me = _worker_id()
        self.held: dict[str, int] = {}       # Redis key -> this worker's sessions admitted there
        self.asking: dict[str, int] = {}     # Redis key -> admissions sent, not answered yet
        self.loop: Loop | None = None
        self.beat_timer: Timer | None = None
        self.fault_tolerant = config.get("fault_tolerant") is not False
        client.on_up.append(self.beat)

    def access(self, session: Session) -> int | None:
        key = _key(self.per, session)
        rkey = f"pyproxy:limit-conn:{self.scope}:{key}"
        self.loop = loop = session.loop

        def answered(reply: object) -> None:
            self._answered(session, key, rkey, reply)

        if self.client.call(loop, answered, "EVALSHA", self.admit_sha, 2, f"{rkey}:n", f"{rkey}:alive",
                            self.me, self.limit, LEASE_MS):
            self.asking[rkey] = self.asking.get(rkey, 0) + 1
            return PENDING
        return self._local(session, key, rkey)

    def _answered(self, session: Session, key: str, rkey: str, reply: object) -> None:
        asking = self.asking[rkey] - 1
        if asking:
            self.asking[rkey] = asking
        else:
            del self.asking[rkey]
        if reply == 1:
            if session.phase == CLOSED:         # gone while we asked: give the count back
                self.client.call(session.loop, None, "EVALSHA", self.release_sha, 1, f"{rkey}:n", self.me)
                return
            slot = slot_of(f"limit-conn|{self.scope}|{key}")
            self.counts.add(slot, 1)            # the instance's own count knows it too
            self._admitted(session, slot, rkey)
            session.resume_access(self, None)
        elif reply == 0:
            if session.phase != CLOSED:
                session.resume_access(self, self.refuse(session, key, " across the fleet"))
        elif session.phase != CLOSED:           # UNAVAILABLE: Redis failed, decide locally
            session.resume_access(self, self._local(session, key, rkey))

    def _local(self, session: Session, key: str, rkey: str) -> int | None:
        """The local policy's verdict (Redis is down), or a refusal with `fault_tolerant: false`; an
        admitted session is counted in Redis too once it is back (beat)."""
        if not self.fault_tolerant:
            return _unavailable(self, session)
        slot = slot_of(f"limit-conn|{self.scope}|{key}")
        self.counts.add(slot, 1)
        if self.counts.total(slot) > self.limit:
            self.counts.add(slot, -1)
            return self.refuse(session, key)
        self._admitted(session, slot, rkey)
        return None

    def _admitted(self, session: Session, slot: int, rkey: str) -> None:
        self.held[rkey] = self.held.get(rkey, 0) + 1
        session.annotate(self.name, (slot, rkey))
        if self.beat_timer is None and self.loop is not None:
            self.beat_timer = self.loop.call_later(BEAT, self.beat)

    def log(self, session: Session) -> None:
        note = session.annotation(self.name)
        if note is None:
            return
        slot, rkey = note
        self.counts.add(slot, -1)
        held = self.held[rkey] - 1
        if held:
            self.held[rkey] = held
        else:
            del self.held[rkey]
        self.client.call(session.loop, None, "EVALSHA", self.release_sha, 1, f"{rkey}:n", self.me)

    def beat(self) -> None:
        """Renew this worker's leases on the keys it holds sessions on, and say how many it holds
        (every BEAT seconds while it holds any, and as soon as Redis answers again)."""
        if self.beat_timer is not None:       # called as Redis came back, not by the timer
            self.beat_timer.cancel()
        self.beat_timer = None
        if self.loop is None:
            return
        if self.held:
            self.beat_timer = self.loop.call_later(BEAT, self.beat)
        keys = list(self.held)
        for start in range(0, len(keys), BEAT_KEYS):
            chunk = keys[start:start + BEAT_KEYS]
            names = [name for rkey in chunk for name in (f"{rkey}:n", f"{rkey}:alive")]
            counts = [-1 if rkey in self.asking else self.held[rkey] for rkey in chunk]
            if not self.client.call(self.loop, None, "EVALSHA", self.beat_sha, len(names), *names,
                                    self.me, LEASE_MS, *counts):
                return

    def close(self) -> None:
        if self.beat_timer is not None:
            self.beat_timer.cancel()
        self.client.close()


class FleetRateLimit(RateLimit):
    """rate-limit, one token bucket per key in Redis for the fleet (see the module's docstring)."""

    def __init__(self, config: PluginConfig, context: PluginContext):
        super().__init__(config, context)
        self.client = _client(config, context)
        self.gcra_sha = self.client.script(GCRA)
        interval = 1000.0 / self.rate
        self.interval, self.tolerance = f"{interval:.6f}", f"{(self.burst - 1) * interval:.6f}"
        self.fault_tolerant = config.get("fault_tolerant") is not False

    def access(self, session: Session) -> int | None:
        key = _key(self.per, session)

        def answered(reply: object) -> None:
            if session.phase == CLOSED:
                return
            if reply == 1:
                session.resume_access(self, None)
            elif reply == 0:
                session.resume_access(self, self.refuse(session, key, " across the fleet"))
            else:                               # UNAVAILABLE: Redis failed, decide locally
                session.resume_access(self, self._local(session))

        if self.client.call(session.loop, answered, "EVALSHA", self.gcra_sha, 1,
                            f"pyproxy:rate-limit:{self.scope}:{key}", self.interval, self.tolerance):
            return PENDING
        return self._local(session)

    def _local(self, session: Session) -> int | None:
        """The local policy's verdict (Redis is down), or a refusal with `fault_tolerant: false`."""
        return RateLimit.access(self, session) if self.fault_tolerant else _unavailable(self, session)

    def close(self) -> None:
        self.client.close()

