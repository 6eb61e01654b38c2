"""Route matching: Kong's rules, most specific wins, ties to the first written."""

from __future__ import annotations

import ipaddress

import pytest

from pyproxy.config.model import AddressMatch, Listen, Route
from pyproxy.router import EXACT, Router, sni_rank


def net(text):
    return ipaddress.ip_network(text, strict=False)


def route(name, index, protocols=("tcp",), sources=(), destinations=(), snis=()):
    return Route(name=name, service="svc-" + name, protocols=protocols, sources=tuple(sources),
                 destinations=tuple(destinations), snis=tuple(snis), index=index)


PLAIN = Listen("127.0.0.1", 9000)
WILD = Listen("0.0.0.0", 9000)
TLS = Listen("0.0.0.0", 9443, ssl=True)


def match(routes, listen, src="127.0.0.1", sport=40000, dst=None, sni=None):
    r = Router(tuple(routes), (listen,)).for_listener(listen).match(src, sport, dst, listen.port, sni)
    return r.name if r else None


def test_port_route_matches_its_listener_only():
    routes = [route("a", 0, destinations=[AddressMatch(port=9000)])]
    assert match(routes, PLAIN) == "a"
    other = Listen("127.0.0.1", 9001)
    assert Router(tuple(routes), (other,)).for_listener(other).match("127.0.0.1", 1, None, 9001) is None


def test_static_listener_is_resolved_once():
    routes = [route("a", 0, destinations=[AddressMatch(port=9000)])]
    lr = Router(tuple(routes), (PLAIN,)).for_listener(PLAIN)
    assert lr.static is not None and lr.static.name == "a"


def test_sources_cidr_and_longest_prefix_wins():
    routes = [route("wide", 0, sources=[AddressMatch(network=net("127.0.0.0/8"))]),
              route("narrow", 1, sources=[AddressMatch(network=net("127.0.0.2/32"))])]
    assert match(routes, PLAIN, src="127.0.0.2") == "narrow"
    assert match(routes, PLAIN, src="127.0.0.9") == "wide"
    assert match(routes, PLAIN, src="10.0.0.1") is None


def test_more_fields_beat_fewer():
    routes = [route("port", 0, destinations=[AddressMatch(port=9000)]),
              route("port+src", 1, destinations=[AddressMatch(port=9000)],
                    sources=[AddressMatch(network=net("127.0.0.0/8"))])]
    assert match(routes, PLAIN) == "port+src"


def test_tie_goes_to_first_written():
    routes = [route("first", 0, destinations=[AddressMatch(port=9000)]),
              route("second", 1, destinations=[AddressMatch(port=9000)])]
    assert match(routes, PLAIN) == "first"


def test_destination_ip_on_wildcard_listener_uses_local_address():
    routes = [route("lo2", 0, destinations=[AddressMatch(network=net("127.0.0.2/32"))]),
              route("any", 1, destinations=[AddressMatch(port=9000)])]
    lr = Router(tuple(routes), (WILD,)).for_listener(WILD)
    assert lr.needs_local_ip
    assert lr.match("127.0.0.1", 1, "127.0.0.2", 9000).name == "lo2"
    assert lr.match("127.0.0.1", 1, "127.0.0.1", 9000).name == "any"


def test_source_port_condition():
    routes = [route("p", 0, sources=[AddressMatch(port=5555)])]
    assert match(routes, PLAIN, sport=5555) == "p"
    assert match(routes, PLAIN, sport=5556) is None


def test_ipv6_sources_do_not_match_ipv4_clients():
    routes = [route("v6", 0, sources=[AddressMatch(network=net("::1/128"))])]
    assert match(routes, PLAIN, src="127.0.0.1") is None
    v6 = Listen("::1", 9000)
    assert match(routes, v6, src="::1") == "v6"


@pytest.mark.parametrize("patterns,sni,rank", [
    (("a.example.com",), "a.example.com", EXACT),
    (("*.example.com",), "a.example.com", 2),
    (("*.example.com",), "a.b.example.com", 2),
    (("*.example.com", "*.b.example.com", "*.com"), "a.b.example.com", 3),
    (("*.b.example.com", "a.b.example.com"), "a.b.example.com", EXACT),
    (("*.example.com",), "example.com", 0),
    (("example.*",), "example.org", 1),
    (("www.example.*",), "www.example.org", 2),
    (("example.*",), "example.", 0),
    (("other.com",), "a.example.com", 0),
])
def test_sni_rank(patterns, sni, rank):
    assert sni_rank(patterns, sni) == rank


def test_exact_sni_beats_wildcard_and_tls_routes_only_on_ssl_listeners():
    routes = [route("wild", 0, protocols=("tls",), snis=["*.example.com"]),
              route("exact", 1, protocols=("tls_passthrough",), snis=["a.example.com"]),
              route("plain", 2, protocols=("tcp",), destinations=[AddressMatch(port=9443)])]
    assert match(routes, TLS, sni="a.example.com") == "exact"
    assert match(routes, TLS, sni="b.example.com") == "wild"
    assert match(routes, TLS, sni=None) is None


def test_destination_address_on_a_listener_bound_to_one_address():
    """A listener bound to one address matches `destinations` addresses with it, also when the route
    looks at the client too (the session does not ask for its local address there)."""
    routes = [route("src+dst", 0, sources=[AddressMatch(network=net("127.0.0.0/8"))],
                    destinations=[AddressMatch(network=net("127.0.0.1/32"))]),
              route("other-dst", 1, sources=[AddressMatch(network=net("127.0.0.0/8"))],
                    destinations=[AddressMatch(network=net("127.0.0.2/32"))])]
    lr = Router(tuple(routes), (PLAIN,)).for_listener(PLAIN)
    assert not lr.needs_local_ip
    assert lr.match("127.0.0.5", 1, None, 9000).name == "src+dst"
    tls_routes = [route("sni+dst", 0, protocols=("tls",), snis=["a.example"],
                        destinations=[AddressMatch(network=net("127.0.0.1/32"), port=9443)])]
    tls = Listen("127.0.0.1", 9443, ssl=True)
    assert match(tls_routes, tls, sni="a.example") == "sni+dst"


def test_a_passthrough_route_by_port_alone_takes_every_sni_no_sni_route_takes():
    """A tls_passthrough route without snis (a Gateway API Passthrough listener without hostname) ranks
    below every route with a matching SNI, and takes the clients without SNI."""
    routes = [route("any", 0, protocols=("tls_passthrough",), destinations=[AddressMatch(port=9443)]),
              route("wild", 1, protocols=("tls_passthrough",), snis=["*.example.com"]),
              route("exact", 2, protocols=("tls_passthrough",), snis=["a.example.com"])]
    assert match(routes, TLS, sni="a.example.com") == "exact"
    assert match(routes, TLS, sni="b.example.com") == "wild"
    assert match(routes, TLS, sni="example.org") == "any"
    assert match(routes, TLS, sni=None) == "any"
