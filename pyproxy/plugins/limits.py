"""`limit-conn` and `rate-limit`: concurrent sessions and new sessions per second, status 503.

    - name: limit-conn
      config: {limit: 100, per: ip}          # at most 100 open sessions per client address
    - name: rate-limit
      config: {rate: 10, burst: 20, per: ip}  # 10 new sessions/s per client, bursts of 20

`per` is `ip` (the client address), `route` or `service` (one budget for everybody on it). The
counts are shared by all workers and survive reloads (`pyproxy.shared`), like nginx's
`limit_conn_zone` / `limit_req_zone`. rate-limit is a token bucket of `burst` tokens refilled at
`rate` per second, kept as one GCRA timestamp per key.

`policy: redis` (Kong's field, with Kong's `redis_host`, `redis_port`…) makes one limit for every
pyproxy instance that names the same Redis: the classes in pyproxy.plugins.fleet_limits, which a
LimitConn or RateLimit configured so becomes when it is made. `policy: local` (the default) is the
code below, untouched.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from pyproxy.config.model import STATUS_OVER_LIMIT
from pyproxy.plugins import Plugin, PluginConfig, PluginContext, register, unknown_keys
from pyproxy.shared import slot_of

if TYPE_CHECKING:
    from pyproxy.session import Session

PER = ("ip", "route", "service")


def _key(per: str, session: Session) -> str:
    if per == "ip":
        return session.client_addr[0]
    route = session.route
    assert route is not None, "the access phase runs for routed sessions only"
    return route.name if per == "route" else route.service


def _number(config: PluginConfig, key: str, integer: bool, minimum: float) -> list[tuple[str, str]]:
    value = config.get(key)
    ok = isinstance(value, int) if integer else isinstance(value, (int, float))
    if value is None or isinstance(value, bool) or not ok or value < minimum:
        kind = "an integer" if integer else "a number"
        return [(key, f"expected {kind} ≥ {minimum:g}, got {value!r}")]
    return []


def _check_common(config: PluginConfig, allowed: tuple[str, ...]) -> list[tuple[str, str]]:
    from pyproxy.plugins.fleet_limits import REDIS_KEYS, check_policy

    problems = unknown_keys(config, allowed + REDIS_KEYS)
    if config.get("per", "ip") not in PER:
        problems.append(("per", f"expected one of {', '.join(PER)}, got {config.get('per')!r}"))
    return problems + check_policy(config)


@register
class LimitConn(Plugin):
    name = "limit-conn"
    priority = 1000

    @classmethod
    def check(cls, config: PluginConfig) -> list[tuple[str, str]]:
        return _check_common(config, ("limit", "per")) + _number(config, "limit", True, 1)

    def __new__(cls, config: PluginConfig, context: PluginContext) -> LimitConn:
        if cls is LimitConn and config.get("policy") == "redis":
            from pyproxy.plugins.fleet_limits import FleetLimitConn
            cls = FleetLimitConn
        return super().__new__(cls)

    def __init__(self, config: PluginConfig, context: PluginContext):
        super().__init__(config, context)
        self.limit = config["limit"]
        self.per = config.get("per", "ip")
        self.counts = context.shared.conns

    def access(self, session: Session) -> int | None:
        key = _key(self.per, session)
        slot = slot_of(f"limit-conn|{self.scope}|{key}")
        # Count first, then look: two workers admitting at the same instant both see both counts,
        # so the limit can be undershot in a race but never exceeded.
        self.counts.add(slot, 1)
        if self.counts.total(slot) > self.limit:
            self.counts.add(slot, -1)
            return self.refuse(session, key)
        session.annotate(self.name, slot)
        return None

    def refuse(self, session: Session, key: str, where: str = "") -> int:
        session.log("info",
                    f"limit-conn: {self.limit} open session(s) per {self.per} reached for {key}{where}")
        return STATUS_OVER_LIMIT

    def log(self, session: Session) -> None:
        slot = session.annotation(self.name)
        if slot is not None:
            self.counts.add(slot, -1)


@register
class RateLimit(Plugin):
    name = "rate-limit"
    priority = 900

    @classmethod
    def check(cls, config: PluginConfig) -> list[tuple[str, str]]:
        problems = _check_common(config, ("rate", "burst", "per")) + _number(config, "rate", False, 0.001)
        if "burst" in config:
            problems += _number(config, "burst", True, 1)
        return problems

    def __new__(cls, config: PluginConfig, context: PluginContext) -> RateLimit:
        if cls is RateLimit and config.get("policy") == "redis":
            from pyproxy.plugins.fleet_limits import FleetRateLimit
            cls = FleetRateLimit
        return super().__new__(cls)

    def __init__(self, config: PluginConfig, context: PluginContext):
        super().__init__(config, context)
        self.rate = float(config["rate"])
        self.burst = int(config.get("burst", max(1, math.ceil(self.rate))))
        self.per = config.get("per", "ip")
        self.table = context.shared.rates

    def access(self, session: Session) -> int | None:
        key = _key(self.per, session)
        verdict = self.table.admit(slot_of(f"rate-limit|{self.scope}|{key}"), self.rate, self.burst)
        if verdict is None:
            self.context.log("warn",
                             "rate-limit: the shared table was busy for 10 ms; letting the session through")
            return None
        if verdict:
            return None
        return self.refuse(session, key)

    def refuse(self, session: Session, key: str, where: str = "") -> int:
        session.log("info", f"rate-limit: more than {self.rate:g} new session(s)/s (burst {self.burst}) "
                            f"per {self.per} for {key}{where}")
        return STATUS_OVER_LIMIT
