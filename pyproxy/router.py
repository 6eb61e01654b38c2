"""Route matching with Kong's rules: every field a route sets must match; the most specific match wins.

Specificity, compared in this order (ties go to the route written first):
  1. exact SNI over wildcard SNI over no SNI,
  2. more fields set (sources, destinations, snis) over fewer,
  3. longer matching address prefixes (sources + destinations) over shorter,
  4. more matching ports written over fewer.

Wildcard SNIs follow nginx's `server_name`: `*.example.com` matches any name ending in
`.example.com` (one label or more), `example.*` any name starting with `example.`.
Candidates are narrowed per listener once, when the router is built; a listener whose answer cannot
depend on the client is resolved once and never evaluated per session.
"""

from __future__ import annotations

import ipaddress

from pyproxy.config.model import AddressMatch, Listen, Route

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
_ADDRESSES: dict[str, IPAddress] = {}   # address text → ipaddress object: clients come back, parsing costs
_ADDRESSES_MAX = 4096          # a worker's recent clients; emptied when full (no LRU bookkeeping)


def parsed_address(text: str) -> IPAddress:
    """ipaddress.ip_address(text), remembered for the next session from the same address."""
    ip = _ADDRESSES.get(text)
    if ip is None:
        if len(_ADDRESSES) >= _ADDRESSES_MAX:
            _ADDRESSES.clear()
        ip = _ADDRESSES[text] = ipaddress.ip_address(text)
    return ip


def sni_rank(patterns: tuple[str, ...], sni: str) -> int:
    """2 when `sni` equals a pattern, 1 when it matches a wildcard pattern, 0 when nothing matches."""
    best = 0
    for pattern in patterns:
        if pattern == sni:
            return 2
        if pattern.startswith("*."):
            if sni.endswith(pattern[1:]) and len(sni) > len(pattern) - 1:
                best = 1
        elif pattern.endswith(".*") and sni.startswith(pattern[:-1]) and len(sni) > len(pattern) - 1:
            best = 1
    return best


def _address_score(entries: tuple[AddressMatch, ...], ip: IPAddress | None,
                   port: int) -> tuple[int, int] | None:
    """(prefix length, ports written) of the best entry matching ip:port, or None when none does."""
    best = None
    for entry in entries:
        if entry.port is not None and entry.port != port:
            continue
        if entry.network is not None:
            if ip is None or ip.version != entry.network.version or ip not in entry.network:
                continue
            prefix = entry.network.prefixlen
        else:
            prefix = 0
        score = (prefix, entry.port is not None)
        if best is None or score > best:
            best = score
    return best


def _could_match_listener(route: Route, listen: Listen) -> bool:
    """False when the route's destinations can never match a session on this listener."""
    if not route.destinations:
        return True
    listener_ip = None if listen.wildcard else ipaddress.ip_address(listen.host)
    for entry in route.destinations:
        if entry.port is not None and entry.port != listen.port:
            continue
        if (entry.network is not None and listener_ip is not None
                and (listener_ip.version != entry.network.version or listener_ip not in entry.network)):
            continue
        return True
    return False


def _client_independent(route: Route, listen: Listen) -> bool:
    """True when nothing about the client (its address, the actual local address, the SNI) matters."""
    if route.sources or route.snis:
        return False
    return not (listen.wildcard and any(e.network is not None for e in route.destinations))


class ListenerRoutes:
    """The routes that can match on one listener for one protocol, in the order written."""

    __slots__ = ("candidates", "resolved", "static", "needs_local_ip", "listener_ip")

    def __init__(self, routes: list[Route], listen: Listen):
        self.candidates = routes
        # The local address of every session of a listener bound to one address: a session on it
        # is matched against `destinations` addresses without being asked for its own.
        self.listener_ip = None if listen.wildcard else ipaddress.ip_address(listen.host)
        self.needs_local_ip = listen.wildcard and any(
            e.network is not None for r in routes for e in r.destinations)
        # When no route looks at the client, the answer is the same for every session: found once.
        self.resolved = all(_client_independent(r, listen) for r in routes)
        self.static: Route | None = None
        if self.resolved:
            self.static = self._select(None, 0, self.listener_ip, listen.port, None)

    def match(self, src_ip: str, src_port: int, dst_ip: str | None, dst_port: int,
              sni: str | None = None) -> Route | None:
        if self.resolved:
            return self.static
        src = parsed_address(src_ip)
        dst = parsed_address(dst_ip) if dst_ip is not None else self.listener_ip
        return self._select(src, src_port, dst, dst_port, sni)

    def _select(self, src: IPAddress | None, src_port: int, dst: IPAddress | None, dst_port: int,
                sni: str | None) -> Route | None:
        best_route: Route | None = None
        best_score: tuple[int, int, int, int] | None = None
        for route in self.candidates:
            score = _route_score(route, src, src_port, dst, dst_port, sni)
            if score is not None and (best_score is None or score > best_score):
                best_route, best_score = route, score
        return best_route


def _route_score(route: Route, src: IPAddress | None, src_port: int, dst: IPAddress | None, dst_port: int,
                 sni: str | None) -> tuple[int, int, int, int] | None:
    rank = 0
    if route.snis:
        if sni is None:
            return None
        rank = sni_rank(route.snis, sni)
        if rank == 0:
            return None
    prefix = ports = 0
    for entries, ip, port in ((route.sources, src, src_port), (route.destinations, dst, dst_port)):
        if entries:
            score = _address_score(entries, ip, port)
            if score is None:
                return None
            prefix += score[0]
            ports += score[1]
    fields = bool(route.sources) + bool(route.destinations) + bool(route.snis)
    return (rank, fields, prefix, ports)


class Router:
    """All routes of a configuration, narrowed per listener.

    A plain listener's sessions are `tcp`; an `ssl` listener's sessions match the `tls` and
    `tls_passthrough` routes together, and the route that wins says whether to terminate.
    """

    def __init__(self, routes: tuple[Route, ...], listens: tuple[Listen, ...]):
        ordered = sorted(routes, key=lambda r: r.index)
        self.by_listener: dict[tuple[str, int], ListenerRoutes] = {}
        for listen in listens:
            wanted = ("tls", "tls_passthrough") if listen.ssl else ("tcp",)
            self.by_listener[listen.key] = ListenerRoutes(
                [r for r in ordered
                 if any(p in r.protocols for p in wanted) and _could_match_listener(r, listen)],
                listen)

    def for_listener(self, listen: Listen) -> ListenerRoutes:
        return self.by_listener[listen.key]
