"""The route index: the same route wins as when every candidate is scored in turn (the reference)."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyproxy.config.model import AddressMatch, Listen, Route
from pyproxy.router import LINEAR_MAX, UNKNOWN, RouteIndex, Router, parsed_address, select_linear

fuzz = settings(max_examples=300, deadline=None)

# Small pools, so that random routes and sessions often meet: names share labels, networks overlap.
LABELS = ["a", "b", "www", "example", "com", "x"]
V4 = ["10.0.0.1", "10.0.0.2", "10.0.0.129", "10.0.1.1", "10.0.128.1", "10.1.0.1", "10.128.0.1",
      "127.0.0.1", "192.0.2.9", "0.0.0.0", "255.255.255.255"]
V6 = ["::1", "2001:db8::1", "2001:db8::2", "2001:db8::8000:1", "2001:db8:1::1", "2001:db8:8000::1",
      "::ffff:10.0.0.1", "fe80::1"]
PORTS = [9000, 9443, 40000, 40001]
LISTENS = [Listen("127.0.0.1", 9000), Listen("0.0.0.0", 9000), Listen("::", 9000),
           Listen("10.0.0.1", 40000), Listen("0.0.0.0", 9443, ssl=True), Listen("::1", 9443, ssl=True),
           Listen("10.0.0.2", 9443, ssl=True)]

names = st.lists(st.sampled_from(LABELS), min_size=1, max_size=4).map(".".join)
patterns = st.one_of(names, names.map(lambda n: "*." + n), names.map(lambda n: n + ".*"),
                     st.sampled_from(["*.", ".*", "*", "*.*", "a..b"]))
client_names = st.one_of(names, st.sampled_from([".", "a.", ".a", ".example.com", "*.example.com",
                                                  "example.*", "..", ""]))


@st.composite
def networks(draw):
    if draw(st.booleans()):
        address, bits = draw(st.sampled_from(V4)), 32
    else:
        address, bits = draw(st.sampled_from(V6)), 128
    prefix = draw(st.one_of(st.just(bits), st.integers(0, bits)))
    return ipaddress.ip_network(f"{address}/{prefix}", strict=False)


entries = st.builds(AddressMatch, network=st.one_of(st.none(), networks()),
                    port=st.one_of(st.none(), st.sampled_from(PORTS)))
protocols = st.sampled_from([("tcp",), ("tls",), ("tls_passthrough",), ("tcp", "tls")])
ALPN = ["h2", "http/1.1", "postgresql", "acme-tls/1"]
route_alpn = st.lists(st.sampled_from(ALPN), max_size=2).map(lambda names: tuple(dict.fromkeys(names)))
# A client's list: as the parser gives it (any order, repeats possible from a hostile client).
client_alpn = st.lists(st.sampled_from([*ALPN, "spdy/3"]), max_size=4).map(tuple)
IDENTITIES = ["CN=alice", "CN=bob,O=Example", "DNS:alice.example", "URI:spiffe://example/bob"]
route_identities = st.lists(st.sampled_from(IDENTITIES), max_size=2).map(
    lambda names: tuple(dict.fromkeys(names)))
# Before the handshake (None: client_identities taken as matching), or a verified certificate's.
client_identity = st.one_of(st.none(), st.frozensets(st.sampled_from([*IDENTITIES, "CN=carol"]), max_size=3))


# Few patterns, nested and repeated: ties between routes found under different keys.
CROWDED = ["a.example.com", "*.example.com", "*.b.example.com", "*.zzz.com", "*.com", "example.*",
           "a.example.*", "*.example.com"]
crowded_names = st.sampled_from(["a.example.com", "a.b.example.com", "b.example.com", "*.example.com",
                                 "example.com", "a.example.org", "x.zzz.com"])


@st.composite
def route_sets(draw, max_size=30, patterns=patterns, bare=False):
    """Routes; with `bare`, half of them set nothing but `snis` (the index's `sure` routes)."""
    routes = []
    for position in range(draw(st.integers(0, max_size))):
        alone = bare and draw(st.booleans())
        routes.append(Route(
            name=f"r{position}", service="svc", protocols=draw(protocols),
            sources=() if alone else tuple(draw(st.lists(entries, max_size=3))),
            destinations=() if alone else tuple(draw(st.lists(entries, max_size=3))),
            snis=tuple(draw(st.lists(patterns, max_size=3))),
            alpn=() if alone else draw(route_alpn),
            client_identities=() if alone else draw(route_identities),
            index=draw(st.integers(0, 10))))          # repeated indexes: the order given breaks the tie
    return tuple(routes)


# A wildcard listener's local address, or None: not asked for (no route of the listener looks at it).
sessions = st.tuples(st.sampled_from(V4 + V6), st.sampled_from(PORTS),
                     st.one_of(st.none(), st.sampled_from(V4 + V6)), st.one_of(st.none(), client_names),
                     client_alpn, client_identity)


def answers(routes, listen, session):
    """(linear answer, indexed answer) for one session on one listener."""
    src_text, src_port, local_text, sni, alpn, identity = session
    candidates = Router(routes, (listen,)).for_listener(listen).candidates
    src = parsed_address(src_text)
    if not listen.wildcard:
        dst = parsed_address(listen.host)
    else:
        dst = parsed_address(local_text) if local_text is not None else UNKNOWN
    return (select_linear(candidates, src[0], src_port, dst[0], listen.port, sni, alpn, identity),
            RouteIndex(candidates).select(src, src_port, dst, listen.port, sni, alpn, identity))


@fuzz
@given(route_sets(), st.sampled_from(LISTENS), st.lists(sessions, min_size=1, max_size=8))
def test_index_picks_what_scoring_every_route_picks(routes, listen, session_list):
    for session in session_list:
        linear, indexed = answers(routes, listen, session)
        assert indexed is linear


@fuzz
@given(route_sets(max_size=12, patterns=st.sampled_from(CROWDED), bare=True), st.sampled_from(LISTENS),
       st.lists(st.tuples(st.sampled_from(V4), st.sampled_from(PORTS), st.none(), crowded_names,
                          client_alpn, client_identity), min_size=1, max_size=8))
def test_crowded_names_pick_the_same_route(routes, listen, session_list):
    for session in session_list:
        linear, indexed = answers(routes, listen, session)
        assert indexed is linear


@fuzz
@given(route_sets(max_size=12), st.data())
def test_sessions_that_hit_routes_pick_the_same_route(routes, data):
    """Sessions made from the routes' own patterns and addresses: most of them match something, and
    names and addresses at the edges (`.example.com` for `*.example.com`, a network's first and last
    address) are tried."""
    listen = data.draw(st.sampled_from(LISTENS))
    pool_names = [name for r in routes for p in r.snis
                  for name in (p, p.replace("*", "w"), p.replace("*", ""), p.replace("*", "a.b"))] or ["a"]
    pool_addresses = [str(address) for r in routes for e in r.sources + r.destinations
                      if e.network is not None for address in (e.network[0], e.network[-1])] or V4
    for _ in range(4):
        session = (data.draw(st.sampled_from(pool_addresses)), data.draw(st.sampled_from(PORTS)),
                   data.draw(st.one_of(st.none(), st.sampled_from(pool_addresses))),
                   data.draw(st.one_of(st.none(), st.sampled_from(pool_names))),
                   data.draw(client_alpn), data.draw(client_identity))
        linear, indexed = answers(routes, listen, session)
        assert indexed is linear


# -- each rule, through the index -------------------------------------------------------------------

PLAIN = Listen("127.0.0.1", 9000)
TLS = Listen("0.0.0.0", 9443, ssl=True)


def net(text):
    return ipaddress.ip_network(text, strict=False)


def route(name, index, protocols=("tcp",), sources=(), destinations=(), snis=()):
    return Route(name=name, service="svc-" + name, protocols=protocols, sources=tuple(sources),
                 destinations=tuple(destinations), snis=tuple(snis), index=index)


def padding(protocols, count=LINEAR_MAX + 20):
    """Routes that match no session of the tests: enough of them that the listener uses its index."""
    if protocols == ("tcp",):
        return [route(f"pad{i}", 100 + i, sources=[AddressMatch(network=net(f"198.51.100.{i}/32"))])
                for i in range(count)]
    return [route(f"pad{i}", 100 + i, protocols=protocols, snis=[f"pad{i}.invalid"]) for i in range(count)]


def match(routes, listen, src="127.0.0.1", sport=40000, local="127.0.0.1", sni=None):
    """The winner's name for one session on a listener with `routes` and the padding: through the index."""
    protocols = ("tcp",) if not listen.ssl else ("tls",)
    listener = Router(tuple(padding(protocols) + list(routes)), (listen,)).for_listener(listen)
    assert listener.index is not None
    won = listener.match(src, sport, local if listen.wildcard else None, listen.port, sni)
    return won.name if won else None


def test_a_small_listener_scores_its_routes_and_a_large_one_uses_the_index():
    routes = [route("a", 0, sources=[AddressMatch(network=net("127.0.0.0/8"))])]
    assert Router(tuple(routes), (PLAIN,)).for_listener(PLAIN).index is None
    assert Router(tuple(routes + padding(("tcp",))), (PLAIN,)).for_listener(PLAIN).index is not None


def test_exact_sni_beats_wildcard_beats_no_sni_whatever_else_they_set():
    routes = [route("none", 0, protocols=("tls",),
                    sources=[AddressMatch(network=net("127.0.0.1/32"), port=40000)],
                    destinations=[AddressMatch(network=net("127.0.0.1/32"), port=9443)]),
              route("wild", 1, protocols=("tls",), snis=["*.example.com"],
                    sources=[AddressMatch(network=net("127.0.0.1/32"))]),
              route("prefix", 2, protocols=("tls",), snis=["a.example.*"]),
              route("exact", 3, protocols=("tls_passthrough",), snis=["a.example.com"])]
    assert match(routes, TLS, sni="a.example.com") == "exact"
    assert match(routes, TLS, sni="b.example.com") == "wild"
    assert match(routes, TLS, sni="a.example.org") == "prefix"
    assert match(routes, TLS, sni="b.example.org") == "none"
    assert match(routes, TLS, sni=None) == "none"


def test_an_exact_sni_that_fails_on_its_address_gives_way_to_a_wildcard():
    routes = [route("exact", 0, protocols=("tls",), snis=["a.example.com"],
                    sources=[AddressMatch(network=net("10.0.0.0/8"))]),
              route("wild", 1, protocols=("tls",), snis=["*.example.com"])]
    assert match(routes, TLS, src="127.0.0.1", sni="a.example.com") == "wild"
    assert match(routes, TLS, src="10.1.2.3", sni="a.example.com") == "exact"


@pytest.mark.parametrize("sni,wins", [
    ("a.example.com", "suffix"), ("a.b.example.com", "suffix"), ("example.com", "prefix"),
    ("b.example", None), ("example.org", "prefix"), ("example.", None), ("www.example.org", None),
])
def test_wildcards_match_any_depth_and_need_a_label(sni, wins):
    routes = [route("suffix", 0, protocols=("tls",), snis=["*.example.com"]),
              route("prefix", 1, protocols=("tls",), snis=["example.*"])]
    assert match(routes, TLS, sni=sni) == wins


def test_a_name_that_equals_a_wildcard_pattern_is_an_exact_match():
    routes = [route("com", 0, protocols=("tls",), snis=["*.com"]),
              route("literal", 1, protocols=("tls",), snis=["*.example.com"])]
    assert match(routes, TLS, sni="*.example.com") == "literal"
    assert match(routes, TLS, sni="a.other.com") == "com"


@pytest.mark.parametrize("sources", [(), ("127.0.0.0/8",)])
def test_a_wildcard_of_more_labels_wins_over_one_written_first(sources):
    """`*.b.example.com` over `*.example.com` for `a.b.example.com` (Gateway API, nginx), and the
    first written still wins between two wildcards of one depth (`example.*` is as deep as `*.com`)."""
    sources = [AddressMatch(network=net(s)) for s in sources]
    routes = [route("other", 0, protocols=("tls",), snis=["*.zzz.com"]),
              route("shallow", 1, protocols=("tls",), snis=["*.example.com"], sources=sources),
              route("deep", 2, protocols=("tls",), snis=["*.b.example.com"], sources=sources),
              route("com", 3, protocols=("tls",), snis=["*.com"], sources=sources),
              route("prefix", 4, protocols=("tls",), snis=["a.*"], sources=sources)]
    assert match(routes, TLS, sni="a.b.example.com") == "deep"
    assert match(routes, TLS, sni="c.example.com") == "shallow"
    assert match(routes, TLS, sni="a.other.com") == "com"


@pytest.mark.parametrize("sni", ["a.example.com", "a.b.example.com"])
def test_a_tie_between_routes_with_the_same_name_goes_to_the_first_written(sni):
    pattern = "a.example.com" if sni == "a.example.com" else "*.example.com"
    routes = [route("first", 0, protocols=("tls",), snis=[pattern]),
              route("second", 1, protocols=("tls_passthrough",), snis=[pattern])]
    assert match(routes, TLS, sni=sni) == "first"


def test_a_wildcard_of_more_labels_beats_more_fields_and_fields_break_a_tie_of_depth():
    routes = [route("deep", 0, protocols=("tls",), snis=["*.b.example.com"]),
              route("shallow+src", 1, protocols=("tls",), snis=["*.example.com"],
                    sources=[AddressMatch(network=net("127.0.0.0/8"))]),
              route("deep+src", 2, protocols=("tls",), snis=["*.b.example.com"],
                    sources=[AddressMatch(network=net("127.0.0.2/32"))])]
    assert match(routes, TLS, sni="a.b.example.com") == "deep"
    assert match(routes, TLS, sni="c.example.com") == "shallow+src"
    assert match(routes, TLS, src="127.0.0.2", sni="a.b.example.com") == "deep+src"


def test_more_fields_beat_fewer():
    routes = [route("src", 0, sources=[AddressMatch(network=net("127.0.0.1/32"), port=40000)]),
              route("src+dst", 1, sources=[AddressMatch(network=net("127.0.0.0/8"))],
                    destinations=[AddressMatch(port=9000)])]
    assert match(routes, PLAIN) == "src+dst"


def test_longer_prefixes_beat_shorter_over_sources_and_destinations_together():
    wild = Listen("0.0.0.0", 9000)
    routes = [route("24+8", 0, sources=[AddressMatch(network=net("127.0.0.0/24"))],
                    destinations=[AddressMatch(network=net("127.0.0.0/8"))]),
              route("16+24", 1, sources=[AddressMatch(network=net("127.0.0.0/16"))],
                    destinations=[AddressMatch(network=net("127.0.0.0/24"))]),
              route("32+0", 2, sources=[AddressMatch(network=net("127.0.0.1/32"))],
                    destinations=[AddressMatch(port=9000)])]
    assert match(routes, wild, src="127.0.0.1", local="127.0.0.1") == "16+24"
    assert match(routes, wild, src="127.0.0.2", local="127.1.0.1") == "24+8"


def test_the_best_entry_of_a_route_counts():
    routes = [route("one-24", 0, sources=[AddressMatch(network=net("127.0.0.0/24"))]),
              route("8-or-32", 1, sources=[AddressMatch(network=net("127.0.0.0/8")),
                                           AddressMatch(network=net("127.0.0.1/32"))])]
    assert match(routes, PLAIN, src="127.0.0.1") == "8-or-32"
    assert match(routes, PLAIN, src="127.0.0.2") == "one-24"


def test_written_ports_beat_none():
    routes = [route("ip", 0, sources=[AddressMatch(network=net("127.0.0.0/8"))]),
              route("ip+port", 1, sources=[AddressMatch(network=net("127.0.0.0/8"), port=40000)])]
    assert match(routes, PLAIN, sport=40000) == "ip+port"
    assert match(routes, PLAIN, sport=40001) == "ip"


def test_a_tie_goes_to_the_route_written_first_not_the_one_listed_first():
    routes = [route("second", 7, sources=[AddressMatch(network=net("127.0.0.0/8"))]),
              route("first", 3, sources=[AddressMatch(port=40000)], destinations=[AddressMatch(port=9000)]),
              route("third", 9, sources=[AddressMatch(network=net("127.0.0.0/8"))])]
    assert match(routes, PLAIN) == "first"
    routes[1] = route("first", 3, sources=[AddressMatch(network=net("127.0.0.0/8"))])
    assert match(routes, PLAIN) == "first"


@pytest.mark.parametrize("network,inside,outside", [
    ("10.0.0.0/23", ["10.0.0.0", "10.0.1.255"], ["10.0.2.0", "9.255.255.255"]),
    ("10.0.0.2/31", ["10.0.0.2", "10.0.0.3"], ["10.0.0.1", "10.0.0.4"]),
    ("10.128.0.0/9", ["10.128.0.0", "10.255.255.255"], ["10.127.255.255", "11.0.0.0"]),
    ("2001:db8::/33", ["2001:db8::", "2001:db8:7fff:ffff:ffff:ffff:ffff:ffff"], ["2001:db8:8000::"]),
    ("::1/128", ["::1"], ["::2", "::"]),
])
def test_a_network_matches_from_its_first_to_its_last_address(network, inside, outside):
    routes = [route("net", 0, sources=[AddressMatch(network=net(network))])]
    for address in inside:
        assert match(routes, PLAIN, src=address) == "net", address
    for address in outside:
        assert match(routes, PLAIN, src=address) is None, address


def test_addresses_of_the_other_family_never_match():
    routes = [route("v4-any", 0, sources=[AddressMatch(network=net("0.0.0.0/0"))]),
              route("v6-any", 1, sources=[AddressMatch(network=net("::/0"))])]
    assert match(routes, PLAIN, src="127.0.0.1") == "v4-any"
    assert match(routes, PLAIN, src="::1") == "v6-any"
    assert match(routes, PLAIN, src="::ffff:127.0.0.1") == "v6-any"


def test_a_route_without_fields_matches_every_session_and_loses_to_any_other():
    routes = [route("bare", 0), route("bare-too", 1),
              route("src", 2, sources=[AddressMatch(network=net("127.0.0.0/8"))])]
    assert match(routes, PLAIN, src="127.0.0.1") == "src"
    assert match(routes, PLAIN, src="10.0.0.1") == "bare"


def test_no_route_matches():
    routes = [route("ten", 0, sources=[AddressMatch(network=net("10.0.0.0/8"))])]
    assert match(routes, PLAIN) is None
    assert match([route("sni", 0, protocols=("tls",), snis=["a.example"])], TLS, sni=None) is None
