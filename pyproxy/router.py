"""Route matching with Kong's rules: every field a route sets must match; the most specific match wins.

Specificity, compared in this order (ties go to the route written first):
  1. exact SNI over wildcard SNI over no SNI, and a wildcard of more labels over one of fewer
     (`*.foo.example.com` over `*.example.com`: the Gateway API's and nginx's order; Kong ranks them alike),
  2. more fields set (sources, destinations, snis, alpn, client_identities) over fewer,
  3. longer matching address prefixes (sources + destinations) over shorter,
  4. more matching ports written over fewer.

Wildcard SNIs follow nginx's `server_name`: `*.example.com` matches any name ending in
`.example.com` (one label or more), `example.*` any name starting with `example.`.
A route's `alpn` matches a ClientHello whose ALPN list holds one of its protocols (HAProxy's
`req.ssl_alpn`, Traefik's `ALPN()`). Its `client_identities` match the verified client certificate,
known only after the handshake: before it (`identity` None) they are taken as matching, so that the
route that could win is the one whose handshake is made; after it, the session is routed again
with the certificate's identity (Session.handshake).
Candidates are narrowed per listener once, when the router is built; a listener whose answer cannot
depend on the client is resolved once and never evaluated per session. A listener with more than
`LINEAR_MAX` candidates is looked up in a `RouteIndex`, whose cost per session does not grow with the
number of routes; one with a single route scores it (`select_linear`, which scores every candidate in
turn: the matcher the index is tested against).
"""

from __future__ import annotations

import ipaddress

from pyproxy.config.model import AddressMatch, Listen, Route

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
# A session's address as the router needs it: the ipaddress object, its number and its bits (32 or
# 128), or UNKNOWN: (None, 0, 0).
Address = tuple[IPAddress | None, int, int]
UNKNOWN: Address = (None, 0, 0)
_ADDRESSES: dict[str, Address] = {}     # address text → Address: clients come back, parsing costs
_ADDRESSES_MAX = 4096          # a worker's recent clients; emptied when full (no LRU bookkeeping)
LINEAR_MAX = 1                 # candidates a listener scores in turn; more go through a RouteIndex
EXACT = 1 << 16                # sni_rank of an exact SNI: above a wildcard of any number of labels

Score = tuple[int, int, int, int]
# A verified client certificate as client_identities name it: its subject (RFC 2253) and each
# subjectAltName with its type ("DNS:a.example").
Identity = frozenset[str]
Hit = tuple[int, Route]        # (position among the listener's candidates, route): the position breaks ties


def parsed_address(text: str) -> Address:
    """(ipaddress.ip_address(text), its number, its bits), remembered for the next session from the
    same address."""
    address = _ADDRESSES.get(text)
    if address is None:
        if len(_ADDRESSES) >= _ADDRESSES_MAX:
            _ADDRESSES.clear()
        ip = ipaddress.ip_address(text)
        address = _ADDRESSES[text] = (ip, int(ip), ip.max_prefixlen)
    return address


def sni_rank(patterns: tuple[str, ...], sni: str) -> int:
    """EXACT when `sni` equals a pattern; else the labels written in the longest wildcard pattern that
    matches it (`*.example.com`: 2, `example.*`: 1), its dots; 0 when nothing matches."""
    best = 0
    for pattern in patterns:
        if pattern == sni:
            return EXACT
        if pattern.startswith("*."):
            if not (sni.endswith(pattern[1:]) and len(sni) > len(pattern) - 1):
                continue
        elif not (pattern.endswith(".*") and sni.startswith(pattern[:-1]) and len(sni) > len(pattern) - 1):
            continue
        depth = pattern.count(".")
        if depth > best:
            best = depth
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


def _route_score(route: Route, src: IPAddress | None, src_port: int, dst: IPAddress | None, dst_port: int,
                 sni: str | None, alpn: tuple[str, ...], identity: Identity | None) -> Score | None:
    """The route's specificity for this session, compared as a tuple; None when it does not match."""
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
    if route.alpn:
        for name in route.alpn:
            if name in alpn:
                break
        else:
            return None
        fields += 1
    if route.client_identities:
        if identity is not None:
            for name in route.client_identities:
                if name in identity:
                    break
            else:
                return None
        fields += 1
    return (rank, fields, prefix, ports)


def select_linear(candidates: list[Route], src: IPAddress | None, src_port: int, dst: IPAddress | None,
                  dst_port: int, sni: str | None, alpn: tuple[str, ...] = (),
                  identity: Identity | None = None) -> Route | None:
    """The winner among `candidates` (in the order written), every one of them scored."""
    best_route: Route | None = None
    best_score: Score | None = None
    for route in candidates:
        score = _route_score(route, src, src_port, dst, dst_port, sni, alpn, identity)
        if score is not None and (best_score is None or score > best_score):
            best_route, best_score = route, score
    return best_route


def _best(hits: list[Hit], src: IPAddress | None, src_port: int, dst: IPAddress | None, dst_port: int,
          sni: str | None, alpn: tuple[str, ...], identity: Identity | None) -> Hit | None:
    """What select_linear gives over the routes of `hits` (in any order, repeated or not), with its
    position."""
    best: Hit | None = None
    best_key = ((0, 0, 0, 0), 0)
    for hit in hits:
        score = _route_score(hit[1], src, src_port, dst, dst_port, sni, alpn, identity)
        if score is not None and (best is None or (score, -hit[0]) > best_key):
            best, best_key = hit, (score, -hit[0])
    return best


class _Names:
    """The routes under one SNI key of a RouteIndex. A route that sets nothing but `snis` matches
    whenever its key does, so only the first written of them counts (`sure`); one that also sets
    addresses or alpn (in `checked`) beats it when those match too, by having more fields."""

    __slots__ = ("sure", "checked")

    def __init__(self) -> None:
        self.sure: Hit | None = None
        self.checked: list[Hit] = []

    def add(self, hit: Hit) -> None:
        route = hit[1]
        if route.sources or route.destinations or route.alpn or route.client_identities:
            self.checked.append(hit)
        elif self.sure is None:
            self.sure = hit


# An entry of an _AddressIndex: (its port or None, the route's score when the entry matches or None
# when the route's other fields must be checked, position, route).
AddressHit = tuple[int | None, Score | None, int, Route]


class _AddressIndex:
    """Routes by one address field (`sources` or `destinations`): looking up an address and port
    finds the entries that match it in one dict lookup per prefix length in use (at most 33 for IPv4,
    129 for IPv6), one for the ports, whatever the number of routes."""

    __slots__ = ("networks", "ports", "anything")

    def __init__(self) -> None:
        # bits of the address (32, 128; 0: UNKNOWN) → [(host bits, {number >> host bits: entries})],
        # one per prefix length in use.
        self.networks: dict[int, list[tuple[int, dict[int, list[AddressHit]]]]] = {0: [], 32: [], 128: []}
        self.ports: dict[int, list[AddressHit]] = {}      # entries with a port and no address
        self.anything: list[AddressHit] = []              # entries with neither

    def add(self, route: Route, position: int, entries: tuple[AddressMatch, ...], alone: bool) -> None:
        """Index `route` by `entries`; `alone` when it sets no other field, so that an entry that
        matches gives its score right away."""
        for entry in dict.fromkeys(entries):
            network = entry.network
            prefix = 0 if network is None else network.prefixlen
            score = (0, 1, prefix, entry.port is not None) if alone else None
            hit = (entry.port, score, position, route)
            if network is not None:
                tables = self.networks[network.max_prefixlen]
                shift = network.max_prefixlen - prefix
                table = next((t for s, t in tables if s == shift), None)
                if table is None:
                    table = {}
                    tables.append((shift, table))
                table.setdefault(int(network.network_address) >> shift, []).append(hit)
            elif entry.port is not None:
                self.ports.setdefault(entry.port, []).append(hit)
            else:
                self.anything.append(hit)

    def collect(self, address: Address, port: int, hits: list[AddressHit]) -> None:
        """Append to `hits` the entries that match address:port."""
        number = address[1]
        for shift, table in self.networks[address[2]]:
            key = number >> shift
            if key in table:
                for hit in table[key]:
                    if hit[0] is None or hit[0] == port:
                        hits.append(hit)
        if port in self.ports:
            hits += self.ports[port]
        hits += self.anything


class RouteIndex:
    """One listener's candidates indexed for lookup: the routes with `snis` by exact name, by wildcard
    suffix (`*.example.com` under `.example.com`) and prefix (`example.*` under `example.`); the
    others by their `sources`, those without by their `destinations`, those without either by their
    `alpn` protocols, and the first written of those without any on its own. A session looks up only
    what can match it, so its cost does not grow with the number of routes, only with the routes
    that share its SNI key, its address or its ALPN protocols. The
    winner is select_linear's: by rank first (a route whose SNI pattern equals the name beats every
    other, one with a matching wildcard beats one with a wildcard of fewer labels and every route
    without `snis`), then the routes found are scored the same way (a route that sets only the field
    it is found by has its score known).
    """

    __slots__ = ("exact", "wildcards", "sources", "destinations", "by_source", "by_destination", "by_alpn",
                 "by_identity", "anything")

    def __init__(self, candidates: list[Route]):
        self.exact: dict[str, _Names] = {}
        # (suffix or prefix, dots in the key, {key: routes}), a table per kind and number of dots
        # in use: `*.example.com` is under (True, 2, ".example.com"), `example.*` (False, 1, "example.").
        wildcards: dict[tuple[bool, int], dict[str, _Names]] = {}
        self.sources = _AddressIndex()
        self.destinations = _AddressIndex()
        # ALPN protocol → the routes that set only `alpn` among the fields and list it
        self.by_alpn: dict[str, list[AddressHit]] = {}
        self.by_identity: list[AddressHit] = []     # the routes that set only client_identities
        self.anything: Route | None = None      # the first written of the routes that set no field
        for hit in enumerate(candidates):
            position, route = hit
            if route.snis:
                for pattern in dict.fromkeys(route.snis):
                    _names(self.exact, pattern).add(hit)      # a wildcard pattern, too, equals itself
                    if pattern.startswith("*."):
                        key = pattern[1:]
                        _names(wildcards.setdefault((True, key.count(".")), {}), key).add(hit)
                    elif pattern.endswith(".*"):
                        key = pattern[:-1]
                        _names(wildcards.setdefault((False, key.count(".")), {}), key).add(hit)
            elif route.sources:
                self.sources.add(route, position, route.sources,
                                 alone=not (route.destinations or route.alpn or route.client_identities))
            elif route.destinations:
                self.destinations.add(route, position, route.destinations,
                                      alone=not (route.alpn or route.client_identities))
            elif route.alpn:
                for name in route.alpn:
                    self.by_alpn.setdefault(name, []).append((None, None, position, route))
            elif route.client_identities:
                self.by_identity.append((None, None, position, route))
            elif self.anything is None:
                self.anything = route
        self.wildcards = [(suffix, depth, table) for (suffix, depth), table in wildcards.items()]
        self.by_source = any(route.sources and not route.snis for route in candidates)
        self.by_destination = any(route.destinations and not (route.snis or route.sources)
                                  for route in candidates)

    def select(self, src: Address, src_port: int, dst: Address, dst_port: int,
               sni: str | None, alpn: tuple[str, ...] = (), identity: Identity | None = None) -> Route | None:
        """select_linear's answer."""
        if sni is not None:
            if sni in self.exact:
                names = self.exact[sni]
                if names.checked:
                    hit = _best(names.checked, src[0], src_port, dst[0], dst_port, sni, alpn, identity)
                    if hit is not None:
                        return hit[1]
                if names.sure is not None:
                    return names.sure[1]
            if self.wildcards:
                route = self._wildcard(src, src_port, dst, dst_port, sni, alpn, identity)
                if route is not None:
                    return route
        hits: list[AddressHit] = []
        if self.by_source:
            self.sources.collect(src, src_port, hits)
        if self.by_destination:
            self.destinations.collect(dst, dst_port, hits)
        if self.by_alpn and alpn:
            by_alpn = self.by_alpn
            for name in set(alpn):          # once each: a client may repeat one 10,000 times
                if name in by_alpn:
                    hits += by_alpn[name]
        if self.by_identity:
            hits += self.by_identity
        best = self.anything            # (0, 0, 0, 0): any route found by an address beats it
        best_key = ((0, 0, 0, 0), 0)
        for _, score, position, route in hits:
            if score is None:
                score = _route_score(route, src[0], src_port, dst[0], dst_port, sni, alpn, identity)
                if score is None:
                    continue
            key = (score, -position)
            if best is None or key > best_key:
                best, best_key = route, key
        return best

    def _wildcard(self, src: Address, src_port: int, dst: Address, dst_port: int, sni: str,
                  alpn: tuple[str, ...], identity: Identity | None) -> Route | None:
        """The best route with a wildcard pattern matching `sni`: one lookup per depth in use.

        A route that sets only `snis` and is first written under its key is `sure` there, with the
        key's depth as its rank: its rank may be higher by another of its patterns, but then it is
        under that pattern's key too, where it is sure or loses to the one that is."""
        labels = sni.split(".")
        count = len(labels)
        sure: Hit | None = None
        sure_depth = 0
        checked: list[Hit] = []
        for suffix, depth, table in self.wildcards:
            # The name has `depth` dots or more, and one more label, not empty, before (`*.x`) or
            # after (`x.*`) the key.
            if depth >= count:
                continue
            if suffix:
                if depth == count - 1 and not labels[0]:
                    continue
                key = "." + ".".join(labels[count - depth:])
            else:
                if depth == count - 1 and not labels[-1]:
                    continue
                key = ".".join(labels[:depth]) + "."
            if key in table:
                names = table[key]
                checked += names.checked
                found = names.sure
                if found is not None and (sure is None or (depth, -found[0]) > (sure_depth, -sure[0])):
                    sure, sure_depth = found, depth
        if checked:         # a route here that also equals the name failed on its addresses already
            hit = _best(checked, src[0], src_port, dst[0], dst_port, sni, alpn, identity)
            # It sets more fields than a sure route: it wins unless that one's wildcard is longer.
            if hit is not None and (sure is None or sni_rank(hit[1].snis, sni) >= sure_depth):
                return hit[1]
        return None if sure is None else sure[1]


def _names(table: dict[str, _Names], key: str) -> _Names:
    names = table.get(key)
    if names is None:
        names = table[key] = _Names()
    return names


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
    """True when nothing about the client (its address, the actual local address, the SNI, the ALPN
    list) matters."""
    if route.sources or route.snis or route.alpn or route.client_identities:
        return False
    return not (listen.wildcard and any(e.network is not None for e in route.destinations))


class ListenerRoutes:
    """The routes that can match on one listener for one protocol, in the order written."""

    __slots__ = ("candidates", "resolved", "static", "needs_local_ip", "listener_address", "index")

    def __init__(self, routes: list[Route], listen: Listen):
        self.candidates = routes
        # The local address of every session of a listener bound to one address: a session on it
        # is matched against `destinations` addresses without being asked for its own.
        self.listener_address = UNKNOWN if listen.wildcard else parsed_address(listen.host)
        self.needs_local_ip = listen.wildcard and any(
            e.network is not None for r in routes for e in r.destinations)
        # When no route looks at the client, the answer is the same for every session: found once.
        self.resolved = all(_client_independent(r, listen) for r in routes)
        self.static: Route | None = None
        self.index: RouteIndex | None = None
        if self.resolved:
            self.static = select_linear(routes, None, 0, self.listener_address[0], listen.port, None)
        elif len(routes) > LINEAR_MAX:
            self.index = RouteIndex(routes)

    def match(self, src_ip: str, src_port: int, dst_ip: str | None, dst_port: int,
              sni: str | None = None, alpn: tuple[str, ...] = (),
              identity: Identity | None = None) -> Route | None:
        """The winning route; `identity`: the verified client certificate's, after the handshake
        (None before it: client_identities are then taken as matching)."""
        if self.resolved:
            return self.static
        src = parsed_address(src_ip)
        dst = parsed_address(dst_ip) if dst_ip is not None else self.listener_address
        if self.index is None:
            return select_linear(self.candidates, src[0], src_port, dst[0], dst_port, sni, alpn, identity)
        return self.index.select(src, src_port, dst, dst_port, sni, alpn, identity)


class Router:
    """All routes of a configuration, narrowed per listener.

    A plain listener's sessions are `tcp`, a `udp` listener's `udp`; an `ssl` listener's sessions
    match the `tls` and `tls_passthrough` routes together, and the route that wins says whether to
    terminate.
    """

    def __init__(self, routes: tuple[Route, ...], listens: tuple[Listen, ...]):
        ordered = sorted(routes, key=lambda r: r.index)
        self.by_listener: dict[tuple[str, int, bool], ListenerRoutes] = {}
        for listen in listens:
            wanted = ("udp",) if listen.udp else ("tls", "tls_passthrough") if listen.ssl else ("tcp",)
            self.by_listener[listen.key] = ListenerRoutes(
                [r for r in ordered
                 if any(p in r.protocols for p in wanted) and _could_match_listener(r, listen)],
                listen)

    def for_listener(self, listen: Listen) -> ListenerRoutes:
        return self.by_listener[listen.key]
