"""Gateway API hostnames: wildcard matching and the listener ∩ route intersection.

A wildcard `*.example.com` stands for one label *or more* in front of `example.com`, never for
`example.com` itself (GW `apis/v1/gateway_types.go` Listener.Hostname; conformance
`tlsroute-hostname-intersection`).
"""

from __future__ import annotations

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
    port that covers it (`others`: the hostnames of the port's other listeners)."""
    rank = specificity(listener)
    closer = [other for other in others if other is not None and specificity(other) > rank]
    return tuple(name for name in names if not any(matches(other, name) for other in closer))


def overlap(one: str | None, other: str | None) -> bool:
    """True when some SNI would match both listener hostnames (None = any)."""
    if one is None or other is None:
        return True
    return intersect(one, other) is not None

