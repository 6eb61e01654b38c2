"""Gateway API hostnames: wildcard matching and the listener ∩ route intersection.

A wildcard `*.example.com` stands for one label *or more* in front of `example.com`, never for
`example.com` itself (GW `apis/v1/gateway_types.go` Listener.Hostname; conformance
`tlsroute-hostname-intersection`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable


def matches(wildcard: str, hostname: str) -> bool:
    """True when `wildcard` (`*.example.com`, or an exact name) covers `hostname` (exact or wildcard)."""
    if not wildcard.startswith("*."):
        return wildcard == hostname
    suffix = wildcard[1:]                  # ".example.com"
    if hostname.startswith("*."):
        return hostname == wildcard or hostname.endswith(suffix)
    return hostname.endswith(suffix) and len(hostname) > len(suffix)


def intersect(listener: str | None, route: str) -> str | None:
    """The names both a listener hostname (None = any) and a route hostname accept, or None."""
    if listener is None or listener == route:
        return route
    if matches(listener, route):
        return route                       # the route's name is inside the listener's wildcard
    if matches(route, listener):
        return listener
    return None


def route_hostnames(listener: str | None, route: Iterable[str]) -> tuple[str, ...] | None:
    """The SNIs a route serves on a listener; () = any SNI; None = no hostname in common.

    A route without hostnames (TLSRoute v1alpha2, and every TCPRoute) takes the listener's.
    """
    names = tuple(route)
    if not names:
        return (listener,) if listener is not None else ()
    common = [name for name in (intersect(listener, route_name) for route_name in names) if name is not None]
    return tuple(dict.fromkeys(common)) or None


def specificity(hostname: str | None) -> tuple[int, int]:
    """Listener precedence (GW "Listener Isolation"): an exact name, then a wildcard of more labels, then
    no hostname; a larger value is more specific."""
    if hostname is None:
        return (0, 0)
    return (1 if hostname.startswith("*.") else 2, hostname.count("."))


def isolated(listener: str | None, others: Iterable[str | None], names: tuple[str, ...]) -> tuple[str, ...]:
    """The route hostnames a listener serves once each is left to the most specific listener of the
    port that covers it (`others`: the hostnames of the port's other listeners). Pairwise: the
    reference PortHostnames.isolated is tested against."""
    rank = specificity(listener)
    closer = [other for other in others if other is not None and specificity(other) > rank]
    return tuple(name for name in names if not any(matches(other, name) for other in closer))


def overlap(one: str | None, other: str | None) -> bool:
    """True when some SNI would match both listener hostnames (None = any)."""
    if one is None or other is None:
        return True
    return intersect(one, other) is not None


def _ancestors(domain: str) -> list[str]:
    """`a.b.c` → [`b.c`, `c`]: the domains a wildcard may stand above."""
    parts = domain.split(".")
    return [".".join(parts[index:]) for index in range(1, len(parts))]


class PortHostnames:
    """The hostnames of one port's TLS listeners (with repeats), indexed so that `isolated` and
    `overlaps` cost a few dict lookups per name, not a scan of every listener: a Gateway with 1,000
    listeners on port 443 is translated in linear time (issue 17's 1,000-route target).

    A wildcard `*.s` covers a name exactly when `s` is a proper ancestor of the name's domain (the name
    itself without its `*.`), or the name is `*.s` itself; so the wildcards covering a name are found
    by its ancestors, and the names under `*.s` are counted per ancestor when the set is built."""

    def __init__(self, names: Iterable[str | None]):
        self.count: Counter[str | None] = Counter(names)
        # Ancestor domain → how many hostnames of the set it stands above (a wildcard `*.s` counts
        # under `s` too: `*.s` and `*.x.s` overlap).
        self.below: Counter[str] = Counter()
        for name, repeats in self.count.items():
            if name is None:
                continue
            domain = name[2:] if name.startswith("*.") else name
            for ancestor in ([domain] if name.startswith("*.") else []) + _ancestors(domain):
                self.below[ancestor] += repeats

    def covering(self, name: str) -> list[str]:
        """The hostnames of the set that `matches()` `name` (each once)."""
        domain = name[2:] if name.startswith("*.") else name
        found = [name] if name in self.count else []
        found.extend(wildcard for wildcard in (f"*.{ancestor}" for ancestor in _ancestors(domain))
                     if wildcard in self.count)
        return found

    def isolated(self, listener: str | None, names: tuple[str, ...]) -> tuple[str, ...]:
        """`isolated(listener, <the other hostnames of the set>, names)`."""
        rank = specificity(listener)
        return tuple(name for name in names
                     if not any(specificity(other) > rank for other in self.covering(name)))

    def shadowed(self) -> list[str]:
        """The hostnames of the set that a less specific one covers too (no hostname covers every
        name): their SNIs belong to their own listener and never reach the other's routes (GW
        "Listener Isolation")."""
        return [name for name in self.count if name is not None
                and (None in self.count or any(specificity(other) < specificity(name)
                                               for other in self.covering(name)))]

    def overlaps(self, hostname: str | None) -> bool:
        """Whether another listener of the set (another entry than this one) overlaps `hostname`."""
        others = sum(self.count.values()) - 1
        if hostname is None or (self.count[None] - (hostname is None)) > 0:
            return others > 0
        related = sum(self.count[other] for other in self.covering(hostname))     # itself included
        if hostname.startswith("*."):
            related += self.below[hostname[2:]] - self.count[hostname]     # the names under it
        return related - 1 > 0

