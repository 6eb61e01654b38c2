"""`alpn` on routes, `ssl.alpn`, a route's `ssl.client_certificate` (issue 19): what -t takes and refuses."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.unit.test_config import TLS_BASE, certificate_folder, conf_dir, errors_of, load  # noqa: F401 (fixtures)


def test_route_and_ssl_alpn_are_read_in_order_each_once(conf_dir: Path):  # noqa: F811 (the fixture imported above)
    text = TLS_BASE.replace("ROUTE", "{name: r, protocols: [tls], snis: [a.example], "
                                     "alpn: [h2, http/1.1, h2]}")
    text = text.replace("ssl: {", "ssl: {alpn: [postgresql, h2], ")
    config = load(conf_dir, text)
    assert config.routes[0].alpn == ("h2", "http/1.1")
    assert config.ssl.alpn == ("postgresql", "h2")
    plain = TLS_BASE.replace("ROUTE", "{name: r, protocols: [tls], snis: [a.example]}")
    assert load(conf_dir, plain).ssl.alpn == ()


@pytest.mark.parametrize("route, key, message", [
    ("{name: r, protocols: [tcp], sources: [{port: 1}], alpn: [h2]}", "alpn",
     "alpn needs TLS: add tls or tls_passthrough to protocols"),
    ("{name: r, protocols: [tls], snis: [a.example], alpn: ['h 2']}", "alpn[0]",
     "'h 2' is not an ALPN protocol ID (1-255 printable ASCII characters, no space: h2, http/1.1)"),
    ("{name: r, protocols: [tls], snis: [a.example], alpn: ['']}", "alpn[0]", "expected a non-empty string"),
    ("{name: r, protocols: [tls], snis: [a.example], alpn: h2}", "alpn", "expected a list, got 'h2'"),
])
def test_route_alpn_refused(conf_dir: Path, route: str, key: str, message: str):  # noqa: F811
    errors = errors_of(conf_dir, TLS_BASE.replace("ROUTE", route))
    assert (errors[0].line, errors[0].key, errors[0].message) == (7, f"services[0].routes[0].{key}", message)


def test_ssl_alpn_refused_with_its_place(conf_dir: Path):  # noqa: F811 (the fixture imported above)
    text = TLS_BASE.replace("ROUTE", "{name: r, protocols: [tls], snis: [a.example]}")
    errors = errors_of(conf_dir, text.replace("ssl: {", "ssl: {alpn: [h2, 'é'], "))
    assert (errors[0].key, errors[0].message) == (
        "ssl.alpn[1]",
        "'é' is not an ALPN protocol ID (1-255 printable ASCII characters, no space: h2, http/1.1)")


def test_a_routes_client_certificate_is_read_and_needs_a_tls_route(conf_dir: Path):  # noqa: F811
    ca = conf_dir / "certs" / "default.crt"
    route = (f"{{name: r, protocols: [tls], snis: [a.example], "
             f"ssl: {{client_certificate: {{ca: {ca}, depth: 2}}}}}}")
    client = load(conf_dir, TLS_BASE.replace("ROUTE", route)).routes[0].client_certificate
    assert (client.ca, client.verify, client.depth) == (str(ca), "on", 2)
    passthrough = route.replace("[tls]", "[tls_passthrough]")
    errors = errors_of(conf_dir, TLS_BASE.replace("ROUTE", passthrough))
    assert (errors[0].key, errors[0].message) == (
        "services[0].routes[0].ssl.client_certificate",
        "ssl.client_certificate needs a tls route: a passthrough route never sees the client's certificate")
    misspelt = route.replace("client_certificate", "client_cert")
    unknown = errors_of(conf_dir, TLS_BASE.replace("ROUTE", misspelt))
    assert unknown[0].key == "services[0].routes[0].ssl.client_cert"


@pytest.mark.parametrize("route, message", [
    ("{name: r, protocols: [tls], snis: [a.example], client_identities: [CN=alice]}",
     "client_identities match a verified client certificate: set ssl.client_certificate "
     "(the route's or the top-level one)"),
    ("{name: r, protocols: [tls_passthrough], snis: [a.example], client_identities: [CN=alice]}",
     "client_identities need a tls route: a passthrough route never sees the client's certificate"),
])
def test_client_identities_need_a_verified_certificate(conf_dir: Path, route: str, message: str):  # noqa: F811
    errors = errors_of(conf_dir, TLS_BASE.replace("ROUTE", route))
    assert (errors[0].key, errors[0].message) == ("services[0].routes[0].client_identities", message)


def test_client_identities_are_subjects_or_typed_sans(conf_dir: Path):  # noqa: F811
    ca = conf_dir / "certs" / "default.crt"
    text = TLS_BASE.replace("ssl: {", f"ssl: {{client_certificate: {{ca: {ca}}}, ").replace(
        "ROUTE", "{name: r, protocols: [tls], snis: [a.example], "
                 "client_identities: ['CN=alice,O=Example', 'DNS:a.example', 'URI:spiffe://x/y', alice]}")
    errors = errors_of(conf_dir, text)
    assert (errors[0].key, errors[0].message) == (
        "services[0].routes[0].client_identities[3]",
        "'alice' is neither a subject (CN=alice,O=Example) nor a subjectAltName with its type "
        "(DNS:…, email:…, URI:…, IP Address:…)")
    route = load(conf_dir, text.replace(", alice]", "]")).routes[0]
    assert route.client_identities == ("CN=alice,O=Example", "DNS:a.example", "URI:spiffe://x/y")


def test_a_routes_ssl_alpn_is_read_and_needs_a_tls_route(conf_dir: Path):  # noqa: F811
    route = "{name: r, protocols: [tls], snis: [a.example], ssl: {alpn: [postgresql]}}"
    assert load(conf_dir, TLS_BASE.replace("ROUTE", route)).routes[0].ssl_alpn == ("postgresql",)
    errors = errors_of(conf_dir, TLS_BASE.replace("ROUTE", route.replace("[tls]", "[tls_passthrough]")))
    assert (errors[0].key, errors[0].message) == (
        "services[0].routes[0].ssl.alpn",
        "ssl.alpn needs a tls route: a passthrough route's upstream selects the protocol")
