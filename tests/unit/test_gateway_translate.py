"""pyproxy.gateway.translate: Gateway API semantics, each case from the specification or its
conformance tests (docs/design/gateway-api.md §2–§4), checked on the statuses a user reads with
kubectl and on the configuration pyproxy would run (validated by the configuration's own loader)."""

from __future__ import annotations

import base64
import copy
import os
import stat
from pathlib import Path

import pytest
import yaml

from pyproxy.config import Config, load_config
from pyproxy.gateway import (
    Options,
    Resource,
    Translation,
    merge_entities,
    translate,
    translate_paths,
    write_pem_files,
)
from pyproxy.gateway.hostnames import intersect, matches, route_hostnames
from pyproxy.gateway.manifests import CLUSTER_SCOPED
from pyproxy.router import Router
from tests.support import make_cert

GROUP = "gateway.networking.k8s.io"
V1 = f"{GROUP}/v1"
INFRA = "infra"


# --- manifests, as Python values --------------------------------------------------------------------

def gateway_class(name: str = "pyproxy", controller: str = "gateway.pyproxy.dev/controller") -> dict:
    return {"apiVersion": V1, "kind": "GatewayClass", "metadata": {"name": name},
            "spec": {"controllerName": controller}}


def listener(name: str, port: int, protocol: str = "TCP", **extra) -> dict:
    return {"name": name, "port": port, "protocol": protocol, **extra}


def gateway(listeners: list[dict], name: str = "gw", namespace: str = INFRA, class_name: str = "pyproxy",
            created: str | None = None, generation: int = 1) -> dict:
    metadata = {"name": name, "namespace": namespace, "generation": generation}
    if created:
        metadata["creationTimestamp"] = created
    return {"apiVersion": V1, "kind": "Gateway", "metadata": metadata,
            "spec": {"gatewayClassName": class_name, "listeners": listeners}}


def backend(name: str, port: int = 1025, **extra) -> dict:
    return {"name": name, "port": port, **extra}


def route(kind: str, name: str, parents: list[dict], backends: list[dict], namespace: str = INFRA,
          hostnames: list[str] | None = None, created: str | None = None, version: str = "v1alpha2",
          rules: list[dict] | None = None, generation: int = 1) -> dict:
    metadata = {"name": name, "namespace": namespace, "generation": generation}
    if created:
        metadata["creationTimestamp"] = created
    spec: dict = {"parentRefs": parents, "rules": rules or [{"backendRefs": backends}]}
    if hostnames is not None:
        spec["hostnames"] = hostnames
    return {"apiVersion": f"{GROUP}/{version}", "kind": kind, "metadata": metadata, "spec": spec}


def tcp_route(name: str, parents: list[dict], backends: list[dict], **extra) -> dict:
    return route("TCPRoute", name, parents, backends, **extra)


def tls_route(name: str, parents: list[dict], backends: list[dict], hostnames: list[str], **extra) -> dict:
    return route("TLSRoute", name, parents, backends, hostnames=hostnames, **extra)


def service(name: str, namespace: str = INFRA, ports: dict[str, int] | None = None,
            addresses: tuple[str, ...] = ("127.0.0.1",), target: int | None = None) -> list[dict]:
    """A Service and its EndpointSlice: every port named, the slice's ports at `target` (or the same)."""
    ports = ports or {"tcp": 1025}
    return [
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": namespace},
         "spec": {"ports": [{"name": port_name, "port": port, "protocol": "TCP"}
                           for port_name, port in ports.items()]}},
        {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
         "metadata": {"name": f"{name}-1", "namespace": namespace,
                      "labels": {"kubernetes.io/service-name": name}},
         "addressType": "IPv4",
         "ports": [{"name": port_name, "port": target or port, "protocol": "TCP"}
                   for port_name, port in ports.items()],
         "endpoints": [{"addresses": [address], "conditions": {"ready": True}} for address in addresses]},
    ]


def reference_grant(namespace: str, from_namespace: str, from_kind: str = "TCPRoute",
                    to_kind: str = "Service",
                    to_name: str | None = None, from_group: str = GROUP, to_group: str = "",
                    name: str = "grant") -> dict:
    to = {"group": to_group, "kind": to_kind}
    if to_name is not None:
        to["name"] = to_name
    return {"apiVersion": "gateway.networking.k8s.io/v1beta1", "kind": "ReferenceGrant",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {"from": [{"group": from_group, "kind": from_kind, "namespace": from_namespace}],
                     "to": [to]}}


def tls_secret(name: str, cert: tuple, namespace: str = INFRA, key: bytes | None = None) -> dict:
    crt = cert[0].read_bytes()
    return {"apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/tls",
            "metadata": {"name": name, "namespace": namespace},
            "data": {"tls.crt": base64.b64encode(crt).decode(),
                     "tls.key": base64.b64encode(key if key is not None else cert[1].read_bytes()).decode()}}


def run(tmp_path, *objects, **options) -> Translation:
    """Translate the objects as a manifest file (the GatewayClass `pyproxy` included)."""
    flat = [gateway_class()]
    for item in objects:
        flat.extend(item if isinstance(item, list) else [item])
    path = tmp_path / "manifest.yaml"
    path.write_text(yaml.safe_dump_all(flat, sort_keys=False))
    options.setdefault("runtime_dir", str(tmp_path / "run"))
    options.setdefault("addresses", ("127.0.0.1",))
    return translate_paths([str(path)], Options(**options))


def load(tmp_path, translation: Translation, base: dict | None = None) -> Config:
    """The configuration pyproxy would run: the entities merged into a small file, through load_config."""
    write_pem_files(translation.files)
    config = merge_entities({"pid": "off", "access_log": "off", **(base or {})}, translation.entities)
    path = tmp_path / "pyproxy.conf"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return load_config(str(path))


# --- status readers ---------------------------------------------------------------------------------

def conditions(items: list[dict]) -> dict[str, tuple[str, str]]:
    return {c["type"]: (c["status"], c["reason"]) for c in items}


def parent(translation: Translation, kind: str, name: str, index: int = 0, namespace: str = INFRA) -> dict:
    return conditions(translation.statuses[(kind, namespace, name)]["parents"][index]["conditions"])


def listener_status(translation: Translation, name: str, gateway_name: str = "gw",
                    namespace: str = INFRA) -> dict:
    status = translation.statuses[("Gateway", namespace, gateway_name)]
    return next(item for item in status["listeners"] if item["name"] == name)


def routes_by_port(translation: Translation) -> dict[int, list[str]]:
    found: dict[int, list[str]] = {}
    for svc in translation.entities["services"]:
        for item in svc["routes"]:
            for destination in item["destinations"]:
                found.setdefault(destination["port"], []).append(item["name"])
    return found


ACCEPTED = ("True", "Accepted")
RESOLVED = ("True", "ResolvedRefs")


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("certs")
    return {"tls": make_cert(folder, "tls.example.com", ["tls.example.com"]),
            "other": make_cert(folder, "other.example.com", ["other.example.com"])}


# --- hostnames (GW Listener.Hostname; conformance tlsroute-hostname-intersection) ---------------------

@pytest.mark.parametrize(("wildcard", "hostname", "expected"), [
    ("*.example.com", "abc.example.com", True),
    ("*.example.com", "foo.abc.example.com", True),     # one label or more
    ("*.example.com", "example.com", False),
    ("*.com", "abc.example.com", True),
    ("*.com", "*.example.com", True),
    ("*.example.com", "*.com", False),
    ("abc.example.com", "abc.example.com", True),
    ("abc.example.com", "other.example.com", False),
])
def test_wildcards_cover_one_label_or_more(wildcard, hostname, expected):
    assert matches(wildcard, hostname) is expected


@pytest.mark.parametrize(("listener_name", "route_name", "expected"), [
    (None, "abc.example.com", "abc.example.com"),
    ("*.example.com", "abc.example.com", "abc.example.com"),
    ("abc.example.com", "*.example.com", "abc.example.com"),
    ("*.com", "*.example.com", "*.example.com"),
    ("*.example.com", "*.com", "*.example.com"),
    ("*.example.com", "non.matching.org", None),
    ("www.example.com", "*.nomatch.com", None),
])
def test_listener_and_route_hostname_intersection(listener_name, route_name, expected):
    assert intersect(listener_name, route_name) == expected


def test_route_without_hostnames_takes_the_listener_s():
    assert route_hostnames("abc.example.com", ()) == ("abc.example.com",)
    assert route_hostnames(None, ()) == ()
    assert route_hostnames("*.example.com", ("a.example.com", "b.other.org")) == ("a.example.com",)
    assert route_hostnames("*.example.com", ("b.other.org",)) is None


# --- attachment (GW ParentReference; conformance tcproute-parentref-*) ------------------------------

def test_parent_ref_without_section_attaches_to_every_listener(tmp_path):
    listeners = [listener(name, port) for name, port in
                 (("one", 9310), ("two", 9311), ("three", 9312), ("four", 9313))]
    result = run(tmp_path, gateway(listeners), tcp_route("r", [{"name": "gw"}], [backend("echo")]),
                 service("echo"))
    assert parent(result, "TCPRoute", "r") == {"Accepted": ACCEPTED, "ResolvedRefs": RESOLVED}
    assert result.statuses[("TCPRoute", INFRA, "r")]["parents"][0]["parentRef"] == {
        "group": GROUP, "kind": "Gateway", "name": "gw"}
    names = ("one", "two", "three", "four")
    assert [listener_status(result, name)["attachedRoutes"] for name in names] == [1] * 4
    assert sorted(routes_by_port(result)) == [9310, 9311, 9312, 9313]
    config = load(tmp_path, result)
    assert [str(listen) for listen in config.stream_listen] == [f"127.0.0.1:{port}" for port in
                                                                 (9310, 9311, 9312, 9313)]


def test_parent_ref_by_port_by_section_and_by_both(tmp_path):
    gw = gateway([listener("one", 9300), listener("two", 9301), listener("three", 9302)])
    result = run(tmp_path, gw, service("one"), service("two"), service("three"),
                 tcp_route("by-port", [{"name": "gw", "port": 9300}], [backend("one")]),
                 tcp_route("by-section", [{"name": "gw", "sectionName": "two"}], [backend("two")]),
                 tcp_route("by-both", [{"name": "gw", "sectionName": "three", "port": 9302}],
                           [backend("three")]),
                 tcp_route("nowhere", [{"name": "gw", "sectionName": "nonexistent-listener"}],
                           [backend("one")]),
                 tcp_route("mismatch", [{"name": "gw", "sectionName": "three", "port": 9301}],
                           [backend("one")]))
    for name in ("by-port", "by-section", "by-both"):
        assert parent(result, "TCPRoute", name)["Accepted"] == ACCEPTED
    assert parent(result, "TCPRoute", "nowhere")["Accepted"] == ("False", "NoMatchingParent")
    assert parent(result, "TCPRoute", "mismatch")["Accepted"] == ("False", "NoMatchingParent")
    assert routes_by_port(result) == {9300: ["tcproute.infra.by-port.0.one"],
                                      9301: ["tcproute.infra.by-section.0.two"],
                                      9302: ["tcproute.infra.by-both.0.three"]}
    config = load(tmp_path, result)
    assert {r.name: config.service(r.service).upstream for r in config.routes} == {
        "tcproute.infra.by-port.0.one": "k8s.infra.one.1025",
        "tcproute.infra.by-section.0.two": "k8s.infra.two.1025",
        "tcproute.infra.by-both.0.three": "k8s.infra.three.1025"}


def test_parent_that_is_not_ours_gets_no_status_entry(tmp_path):
    result = run(tmp_path, gateway_class("other", "example.com/other"),
                 gateway([listener("tcp", 9000)], name="theirs", class_name="other"),
                 gateway([listener("tcp", 9001)]),
                 tcp_route("r", [{"name": "theirs"}, {"name": "missing"}, {"name": "gw"}], [backend("echo")]),
                 service("echo"))
    assert ("Gateway", INFRA, "theirs") not in result.statuses
    assert ("GatewayClass", "", "other") not in result.statuses
    parents = result.statuses[("TCPRoute", INFRA, "r")]["parents"]
    assert [p["parentRef"]["name"] for p in parents] == ["gw"]
    assert result.entities["stream_listen"] == ["127.0.0.1:9001"]


def test_several_tcp_routes_on_one_listener_all_accepted_the_oldest_carries_traffic(tmp_path):
    gw = gateway([listener("tcp", 9310, allowedRoutes={"namespaces": {"from": "Same"},
                                                        "kinds": [{"kind": "TCPRoute"}]})])
    newer = tcp_route("newer", [{"name": "gw", "sectionName": "tcp"}], [backend("backend-2")],
                      created="2026-12-01T10:00:01Z")
    older = tcp_route("older", [{"name": "gw", "sectionName": "tcp"}], [backend("backend-1")],
                      created="2026-12-01T10:00:00Z")
    result = run(tmp_path, gw, newer, older, service("backend-1", addresses=("127.0.0.1",)),
                 service("backend-2", addresses=("127.0.0.2",)))
    assert parent(result, "TCPRoute", "older")["Accepted"] == ACCEPTED
    assert parent(result, "TCPRoute", "newer")["Accepted"] == ACCEPTED
    status = listener_status(result, "tcp")
    assert status["attachedRoutes"] == 2
    assert status["supportedKinds"] == [{"group": GROUP, "kind": "TCPRoute"}]
    config = load(tmp_path, result)
    listen = config.stream_listen[0]
    routes = Router(config.routes, config.stream_listen).for_listener(listen)
    chosen = routes.match("127.0.0.9", 1, None, 9310)
    assert chosen is not None and chosen.name == "tcproute.infra.older.0.tcp"


def test_tcp_route_with_two_rules_is_not_accepted(tmp_path):
    result = run(tmp_path, gateway([listener("tcp", 9000)]), service("echo"),
                 tcp_route("two-rules", [{"name": "gw"}], [],
                           rules=[{"backendRefs": [backend("echo")]}, {"backendRefs": [backend("echo")]}]))
    assert parent(result, "TCPRoute", "two-rules")["Accepted"] == ("False", "UnsupportedValue")
    assert listener_status(result, "tcp")["attachedRoutes"] == 0
    assert result.entities["services"] == []


# --- allowedRoutes (GW AllowedRoutes; conformance tcproute-invalid-non-tcp-listener) -------------------

def test_tcp_route_to_an_http_listener_is_not_allowed(tmp_path):
    gw = gateway([listener("http", 5300, "HTTP", allowedRoutes={"kinds": [{"kind": "HTTPRoute"}]})])
    result = run(tmp_path, gw, service("echo"),
                 tcp_route("r", [{"name": "gw", "sectionName": "http"}], [backend("echo")]))
    assert parent(result, "TCPRoute", "r")["Accepted"] == ("False", "NotAllowedByListeners")
    status = listener_status(result, "http")
    assert status["attachedRoutes"] == 0
    assert status["supportedKinds"] == []
    assert conditions(status["conditions"])["Accepted"] == ("False", "UnsupportedProtocol")
    gateway_conditions = conditions(result.statuses[("Gateway", INFRA, "gw")]["conditions"])
    assert gateway_conditions["Accepted"] == ("False", "ListenersNotValid")
    assert result.entities["stream_listen"] == []


@pytest.mark.parametrize(("routes_from", "expected"), [
    ({"from": "Same"}, ("False", "NotAllowedByListeners")),
    ({"from": "All"}, ACCEPTED),
    ({"from": "Selector", "selector": {"matchLabels": {"team": "web"}}}, ACCEPTED),
    ({"from": "Selector", "selector": {"matchExpressions": [
        {"key": "team", "operator": "In", "values": ["db"]}]}}, ("False", "NotAllowedByListeners")),
    ({"from": "Selector", "selector": {"matchLabels": {"kubernetes.io/metadata.name": "apps"}}}, ACCEPTED),
])
def test_allowed_routes_namespaces(tmp_path, routes_from, expected):
    namespace = {"apiVersion": "v1", "kind": "Namespace",
                 "metadata": {"name": "apps",
                              "labels": {"team": "web", "kubernetes.io/metadata.name": "apps"}}}
    gw = gateway([listener("tcp", 9000, allowedRoutes={"namespaces": routes_from})])
    result = run(tmp_path, gw, namespace, service("echo", namespace="apps"),
                 tcp_route("r", [{"name": "gw", "namespace": INFRA}], [backend("echo")], namespace="apps"))
    assert parent(result, "TCPRoute", "r", namespace="apps")["Accepted"] == expected
    assert listener_status(result, "tcp")["attachedRoutes"] == (1 if expected == ACCEPTED else 0)


def test_invalid_route_kind_is_dropped_from_supported_kinds(tmp_path):
    gw = gateway([listener("bad", 9000, allowedRoutes={"kinds": [{"kind": "InvalidRoute"}]}),
                  listener("mixed", 9001,
                           allowedRoutes={"kinds": [{"kind": "InvalidRoute"}, {"kind": "TCPRoute"}]})])
    result = run(tmp_path, gw)
    bad, mixed = listener_status(result, "bad"), listener_status(result, "mixed")
    assert bad["supportedKinds"] == []
    assert conditions(bad["conditions"])["ResolvedRefs"] == ("False", "InvalidRouteKinds")
    assert mixed["supportedKinds"] == [{"group": GROUP, "kind": "TCPRoute"}]
    assert conditions(mixed["conditions"])["ResolvedRefs"] == ("False", "InvalidRouteKinds")


# --- TLS listeners (conformance tlsroute-*) ---------------------------------------------------------

def test_passthrough_listener_supports_tls_routes_only(tmp_path):
    gw = gateway([listener("tls", 443, "TLS", hostname="*.example.com", tls={"mode": "Passthrough"},
                           allowedRoutes={"kinds": [{"kind": "TCPRoute"}, {"kind": "TLSRoute"}]})])
    result = run(tmp_path, gw)
    status = listener_status(result, "tls")
    assert status["supportedKinds"] == [{"group": GROUP, "kind": "TLSRoute"}]
    assert conditions(status["conditions"])["ResolvedRefs"] == ("False", "InvalidRouteKinds")
    assert status["attachedRoutes"] == 0


def test_passthrough_route_gets_the_hostname_intersection(tmp_path):
    gw = gateway([listener("tls", 8443, "TLS", hostname="*.example.com", tls={"mode": "Passthrough"})])
    result = run(tmp_path, gw, service("tls-backend", ports={"tls": 8443}),
                 tls_route("r", [{"name": "gw"}], [backend("tls-backend", 8443)],
                           ["abc.example.com", "other.org"]))
    assert parent(result, "TLSRoute", "r") == {"Accepted": ACCEPTED, "ResolvedRefs": RESOLVED}
    [svc] = result.entities["services"]
    assert svc["routes"] == [{"name": "tlsroute.infra.r.0.tls", "protocols": ["tls_passthrough"],
                              "destinations": [{"port": 8443}], "snis": ["abc.example.com"]}]
    config = load(tmp_path, result)
    assert config.stream_listen[0].ssl


def test_route_hostnames_outside_every_listener_are_not_accepted(tmp_path):
    gw = gateway([listener("www", 8443, "TLS", hostname="www.example.com", tls={"mode": "Passthrough"}),
                  listener("wild", 8443, "TLS", hostname="*.example.com", tls={"mode": "Passthrough"})])
    result = run(tmp_path, gw, service("echo"),
                 tls_route("r", [{"name": "gw"}], [backend("echo")], ["www.nomatch.com", "*.nomatch.com"]))
    assert parent(result, "TLSRoute", "r")["Accepted"] == ("False", "NoMatchingListenerHostname")
    assert [listener_status(result, name)["attachedRoutes"] for name in ("www", "wild")] == [0, 0]


def test_terminate_listener_binds_its_certificate_to_its_hostname(tmp_path, certs):
    # The certificate is for tls.example.com; the listener's hostname decides where it is served.
    gw = gateway([listener("tls", 8443, "TLS", hostname="serve.example.net",
                           tls={"certificateRefs": [{"name": "cert"}]})])
    result = run(tmp_path, gw, tls_secret("cert", certs["tls"]), service("echo"),
                 tls_route("r", [{"name": "gw"}], [backend("echo")], ["serve.example.net"]),
                 tcp_route("plain", [{"name": "gw"}], [backend("echo")], created="2030-01-01T00:00:00Z"))
    status = listener_status(result, "tls")
    assert conditions(status["conditions"]) == {
        "Accepted": ACCEPTED, "ResolvedRefs": RESOLVED, "Programmed": ("True", "Programmed"),
        "Conflicted": ("False", "NoConflicts")}
    assert status["supportedKinds"] == [{"group": GROUP, "kind": "TLSRoute"},
                                        {"group": GROUP, "kind": "TCPRoute"}]
    assert status["attachedRoutes"] == 2
    [certificate] = result.entities["certificates"]
    assert (certificate["snis"], certificate["listen"]) == (["serve.example.net"], [8443])
    assert not (tmp_path / "run").exists()          # translate() writes nothing: write_pem_files does
    config = load(tmp_path, result)
    assert config.certificates[0].snis == ("serve.example.net",)
    assert stat.S_IMODE(os.stat(config.certificates[0].key).st_mode) == 0o600
    assert [(r.name, r.protocols, r.snis) for r in config.routes] == [
        ("tlsroute.infra.r.0.tls", ("tls",), ("serve.example.net",)),
        ("tcproute.infra.plain.0.tls", ("tls",), ("serve.example.net",))]


def test_two_ports_serve_one_hostname_each_with_its_own_secret(tmp_path, certs):
    """A Terminate listener's Secret is served on its port only (certificates[].listen): two listeners
    on two ports with two Secrets for one hostname each serve their own, without a notice."""
    gw = gateway([listener("a", 8443, "TLS", hostname="shared.example.com",
                           tls={"certificateRefs": [{"name": "cert-a"}]}),
                  listener("b", 9443, "TLS", hostname="shared.example.com",
                           tls={"certificateRefs": [{"name": "cert-b"}]}),
                  listener("b-more", 9443, "TLS", hostname="more.example.com",
                           tls={"certificateRefs": [{"name": "cert-b"}]})])
    result = run(tmp_path, gw, tls_secret("cert-a", certs["tls"]), tls_secret("cert-b", certs["other"]))
    assert result.notices == []
    for name in ("a", "b", "b-more"):
        assert conditions(listener_status(result, name)["conditions"])["Programmed"] == ("True", "Programmed")
    assert [(c["snis"], c["listen"]) for c in result.entities["certificates"]] == [
        (["shared.example.com"], [8443]), (["shared.example.com", "more.example.com"], [9443])]
    config = load(tmp_path, result)
    assert [(c.cert, c.snis, c.listen) for c in config.certificates] == [
        (result.entities["certificates"][0]["cert"], ("shared.example.com",), ((None, 8443),)),
        (result.entities["certificates"][1]["cert"], ("shared.example.com", "more.example.com"),
         ((None, 9443),))]
    assert config.certificates[0].cert != config.certificates[1].cert


def test_a_wildcard_listener_s_certificate_covers_its_names_of_any_depth(tmp_path, certs):
    gw = gateway([listener("wild", 8443, "TLS", hostname="*.example.com",
                           tls={"certificateRefs": [{"name": "cert"}]}),
                  listener("exact", 8443, "TLS", hostname="exact.example.net",
                           tls={"certificateRefs": [{"name": "other"}]})])
    result = run(tmp_path, gw, tls_secret("cert", certs["tls"]), tls_secret("other", certs["other"]))
    assert [(c["snis"], c.get("wildcard_depth")) for c in result.entities["certificates"]] == [
        (["*.example.com"], "any"), (["exact.example.net"], None)]
    assert [c.wildcard_depth for c in load(tmp_path, result).certificates] == ["any", "one"]


def test_unchanged_secret_keeps_its_file_names(tmp_path, certs):
    gw = gateway([listener("tls", 8443, "TLS", hostname="a.example.com",
                           tls={"certificateRefs": [{"name": "cert"}]})])
    first = run(tmp_path, gw, tls_secret("cert", certs["tls"]))
    again = run(tmp_path, gw, tls_secret("cert", certs["tls"]))
    changed = run(tmp_path, gw, tls_secret("cert", certs["other"]))
    assert first.files == again.files and len(first.files) == 2
    assert set(changed.files).isdisjoint(first.files)
    write_pem_files(first.files)
    for path, content in first.files.items():
        with open(path, "rb") as written:
            assert written.read() == content
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600


@pytest.mark.parametrize(("ref", "secret", "reason"), [
    ({"name": "missing"}, None, "InvalidCertificateRef"),
    ({"name": "cert", "group": "example.com", "kind": "Vault"}, None, "InvalidCertificateRef"),
    ({"name": "cert"}, "opaque", "InvalidCertificateRef"),
    ({"name": "cert"}, "garbage", "InvalidCertificateRef"),
    ({"name": "cert"}, "wrong-key", "InvalidCertificateRef"),
    ({"name": "cert", "namespace": "secrets"}, "elsewhere", "RefNotPermitted"),
])
def test_unusable_certificate_ref(tmp_path, certs, ref, secret, reason):
    objects: list = [gateway([listener("tls", 8443, "TLS", hostname="a.example.com",
                                       tls={"certificateRefs": [ref]})])]
    if secret == "opaque":
        objects.append({**tls_secret("cert", certs["tls"]), "type": "Opaque"})
    elif secret == "garbage":
        objects.append({**tls_secret("cert", certs["tls"]),
                        "data": {"tls.crt": "bm90IFBFTQ==", "tls.key": "eA=="}})
    elif secret == "wrong-key":
        objects.append(tls_secret("cert", certs["tls"], key=certs["other"][1].read_bytes()))
    elif secret == "elsewhere":
        objects.append(tls_secret("cert", certs["tls"], namespace="secrets"))
    result = run(tmp_path, *objects)
    status = conditions(listener_status(result, "tls")["conditions"])
    assert status["ResolvedRefs"] == ("False", reason)
    assert status["Programmed"] == ("False", "Invalid")
    assert status["Accepted"] == ACCEPTED
    assert result.entities["certificates"] == []


def test_cross_namespace_secret_with_a_grant(tmp_path, certs):
    gw = gateway([listener("tls", 8443, "TLS", hostname="a.example.com",
                           tls={"certificateRefs": [{"name": "cert", "namespace": "secrets"}]})])
    grant = reference_grant("secrets", INFRA, from_kind="Gateway", to_kind="Secret", to_name="cert")
    result = run(tmp_path, gw, grant, tls_secret("cert", certs["tls"], namespace="secrets"))
    assert conditions(listener_status(result, "tls")["conditions"])["ResolvedRefs"] == RESOLVED


# --- backends (GW BackendRef; conformance tcproute-weighted-routing, -invalid-*, -reference-grant) -----

def test_weighted_backend_refs_share_by_weight(tmp_path):
    result = run(tmp_path, gateway([listener("tcp", 9300)]),
                 service("v1", addresses=("10.0.0.1", "10.0.0.2")), service("v2", addresses=("10.0.0.3",)),
                 service("v3", addresses=("10.0.0.4",)),
                 tcp_route("r", [{"name": "gw"}], [backend("v1", weight=70), backend("v2", weight=30),
                                                   backend("v3", weight=0)]))
    [upstream] = result.entities["upstreams"]
    weights = {target["target"]: target["weight"] for target in upstream["targets"]}
    assert set(weights) == {"10.0.0.1:1025", "10.0.0.2:1025", "10.0.0.3:1025"}
    v1 = weights["10.0.0.1:1025"] + weights["10.0.0.2:1025"]
    assert v1 / (v1 + weights["10.0.0.3:1025"]) == pytest.approx(0.7, abs=0.001)
    load(tmp_path, result)


def test_an_invalid_backend_s_weight_is_the_service_s_reject_share(tmp_path):
    result = run(tmp_path, gateway([listener("tcp", 9300)]), service("v1", addresses=("10.0.0.1",)),
                 service("empty", addresses=()),
                 tcp_route("r", [{"name": "gw"}], [backend("v1", weight=60), backend("missing", weight=30),
                                                   backend("empty", weight=10)]))
    assert parent(result, "TCPRoute", "r")["ResolvedRefs"] == ("False", "BackendNotFound")
    config = load(tmp_path, result)
    [service_] = config.services
    assert service_.reject_share == pytest.approx(0.4)
    assert [str(target) for target in config.upstream(service_.upstream).targets] == ["10.0.0.1:1025"]


def test_nonexistent_backend_is_backend_not_found(tmp_path):
    result = run(tmp_path, gateway([listener("tcp", 9300)]),
                 tcp_route("r", [{"name": "gw"}], [backend("nonexistent-service", 8080)]))
    assert parent(result, "TCPRoute", "r") == {"Accepted": ACCEPTED,
                                               "ResolvedRefs": ("False", "BackendNotFound")}
    # Its connections are refused: the upstream has no target (status 502).
    config = load(tmp_path, result)
    assert config.upstream(config.services[0].upstream).targets == ()


def test_unknown_backend_kind_is_invalid_kind(tmp_path):
    result = run(tmp_path, gateway([listener("tcp", 9300)]),
                 tcp_route("r", [{"name": "gw"}], [{"group": "unknownkind.example.com", "kind": "NonExistent",
                                                    "name": "x", "port": 1}]))
    assert parent(result, "TCPRoute", "r")["ResolvedRefs"] == ("False", "InvalidKind")


WRONG_GRANTS = [
    {"namespace": "other"}, {"from_group": "wrong.example.com"}, {"from_kind": "TLSRoute"},
    {"from_namespace": "other"}, {"to_group": "wrong.example.com"}, {"to_kind": "Secret"},
    {"to_name": "other"},
]


@pytest.mark.parametrize("wrong", [None, *WRONG_GRANTS])
def test_cross_namespace_backend_needs_an_exact_reference_grant(tmp_path, wrong):
    objects: list = [gateway([listener("tcp", 9320)]), service("web", namespace="web-backend"),
                     tcp_route("r", [{"name": "gw"}], [backend("web", namespace="web-backend")])]
    if wrong is not None:
        arguments = {"namespace": "web-backend", "from_namespace": INFRA, "to_name": "web", **wrong}
        namespace, from_namespace = arguments.pop("namespace"), arguments.pop("from_namespace")
        objects.append(reference_grant(namespace, from_namespace, **arguments))
    result = run(tmp_path, *objects)
    assert parent(result, "TCPRoute", "r") == {"Accepted": ACCEPTED,
                                               "ResolvedRefs": ("False", "RefNotPermitted")}


def test_cross_namespace_backend_with_its_grant(tmp_path):
    result = run(tmp_path, gateway([listener("tcp", 9320)]), service("web", namespace="web-backend"),
                 reference_grant("web-backend", INFRA),
                 tcp_route("r", [{"name": "gw"}], [backend("web", namespace="web-backend")]))
    assert parent(result, "TCPRoute", "r")["ResolvedRefs"] == RESOLVED
    assert result.entities["upstreams"] == [{"name": "k8s.web-backend.web.1025",
                                             "targets": [{"target": "127.0.0.1:1025", "weight": 100}]}]


def test_service_port_leads_to_the_endpoint_slice_port_of_the_same_name(tmp_path):
    objects = service("echo", ports={"tcp": 1025, "admin": 9901}, addresses=("10.0.0.1",), target=8080)
    objects[1]["endpoints"].append({"addresses": ["10.0.0.2"], "conditions": {"ready": False}})
    objects[1]["endpoints"].append({"addresses": ["10.0.0.3"]})      # ready: null means ready
    result = run(tmp_path, gateway([listener("tcp", 9000)]), objects,
                 tcp_route("r", [{"name": "gw"}], [backend("echo", 1025)]),
                 tcp_route("wrong-port", [{"name": "gw"}], [backend("echo", 1026)]))
    targets = [t["target"] for t in result.entities["upstreams"][0]["targets"]]
    assert targets == ["10.0.0.1:8080", "10.0.0.3:8080"]
    assert parent(result, "TCPRoute", "wrong-port")["ResolvedRefs"] == ("False", "BackendNotFound")


def test_a_service_without_endpoint_slices_falls_back_to_its_v1_endpoints(tmp_path):
    """Clusters (or `kubectl get endpoints -o yaml` dumps) with only v1 Endpoints: `subsets[].addresses`
    are the ready endpoints, `notReadyAddresses` are not, the port is found by the Service port's name;
    a Service that has EndpointSlices ignores its Endpoints (they are the legacy mirror)."""
    def endpoints(name: str, subsets: list[dict]) -> dict:
        return {"apiVersion": "v1", "kind": "Endpoints", "metadata": {"name": name, "namespace": INFRA},
                "subsets": subsets}
    legacy = service("legacy", ports={"tcp": 1025, "admin": 9901})[:1]
    sliced = service("sliced", addresses=("10.0.0.9",))
    result = run(tmp_path, gateway([listener("a", 9000), listener("b", 9001)]), legacy, sliced,
                 endpoints("legacy", [{"addresses": [{"ip": "10.0.0.1"}, {"ip": "fd00::1"}],
                                       "notReadyAddresses": [{"ip": "10.0.0.2"}],
                                       "ports": [{"name": "admin", "port": 19901},
                                                 {"name": "tcp", "port": 8080}]},
                                      {"addresses": [{"ip": "10.0.0.3"}],
                                       "ports": [{"name": "tcp", "port": 8081}]}]),
                 endpoints("sliced", [{"addresses": [{"ip": "10.0.0.8"}],
                                       "ports": [{"name": "tcp", "port": 1}]}]),
                 tcp_route("r", [{"name": "gw", "sectionName": "a"}], [backend("legacy", 1025)]),
                 tcp_route("s", [{"name": "gw", "sectionName": "b"}], [backend("sliced", 1025)]))
    targets = {upstream["name"]: [t["target"] for t in upstream["targets"]]
               for upstream in result.entities["upstreams"]}
    assert targets == {"k8s.infra.legacy.1025": ["10.0.0.1:8080", "[fd00::1]:8080", "10.0.0.3:8081"],
                       "k8s.infra.sliced.1025": ["10.0.0.9:1025"]}
    assert parent(result, "TCPRoute", "r")["ResolvedRefs"] == RESOLVED


def test_service_without_ready_endpoints(tmp_path):
    objects = service("echo", addresses=())
    result = run(tmp_path, gateway([listener("tcp", 9000)]), objects,
                 tcp_route("r", [{"name": "gw"}], [backend("echo")]))
    assert parent(result, "TCPRoute", "r") == {"Accepted": ACCEPTED,
                                               "ResolvedRefs": ("False", "EndpointsNotFound")}


# --- Gateway and listener status (GW ListenerConditionType; brief §2.4, §3) -----------------------------

def test_tcp_and_tls_on_one_port_of_a_gateway_conflict(tmp_path, certs):
    gw = gateway([listener("tcp", 9000), listener("tls", 9000, "TLS", tls={"mode": "Passthrough"}),
                  listener("ok", 9001)])
    result = run(tmp_path, gw)
    for name in ("tcp", "tls"):
        status = conditions(listener_status(result, name)["conditions"])
        assert status["Accepted"] == ("False", "ProtocolConflict")
        assert status["Conflicted"] == ("True", "ProtocolConflict")
        assert status["Programmed"] == ("False", "ProtocolConflict")
    assert conditions(result.statuses[("Gateway", INFRA, "gw")]["conditions"])["Accepted"] == (
        "True", "ListenersNotValid")
    assert result.entities["stream_listen"] == ["127.0.0.1:9001"]


def test_later_gateway_cannot_take_a_used_port(tmp_path):
    first = gateway([listener("tcp", 9000), listener("tls", 9443, "TLS", hostname="a.example.com",
                                                     tls={"mode": "Passthrough"})],
                    name="first", created="2026-01-01T00:00:00Z")
    second = gateway([listener("tcp", 9000), listener("tls", 9443, "TLS", hostname="a.example.com",
                                                      tls={"mode": "Passthrough"}),
                      listener("other", 9443, "TLS", hostname="b.example.com", tls={"mode": "Passthrough"})],
                     name="second", created="2026-01-02T00:00:00Z")
    result = run(tmp_path, second, first)
    assert conditions(listener_status(result, "tcp", "first")["conditions"])["Accepted"] == ACCEPTED
    assert conditions(listener_status(result, "tcp", "second")["conditions"])["Accepted"] == (
        "False", "PortUnavailable")
    assert conditions(listener_status(result, "tls", "second")["conditions"])["Accepted"] == (
        "False", "HostnameConflict")
    other = conditions(listener_status(result, "other", "second")["conditions"])
    assert other["Accepted"] == ACCEPTED
    assert "OverlappingTLSConfig" not in other
    assert result.entities["stream_listen"] == ["127.0.0.1:9000", "127.0.0.1:9443 ssl"]


def test_overlapping_tls_hostnames_are_reported(tmp_path):
    gw = gateway([listener("exact", 9443, "TLS", hostname="foo.example.com", tls={"mode": "Passthrough"}),
                  listener("wild", 9443, "TLS", hostname="*.example.com", tls={"mode": "Passthrough"}),
                  listener("apart", 9443, "TLS", hostname="foo.example.org", tls={"mode": "Passthrough"})])
    result = run(tmp_path, gw)
    assert conditions(listener_status(result, "exact")["conditions"])["OverlappingTLSConfig"] == (
        "True", "OverlappingHostnames")
    assert conditions(listener_status(result, "wild")["conditions"])["OverlappingTLSConfig"] == (
        "True", "OverlappingHostnames")
    assert "OverlappingTLSConfig" not in conditions(listener_status(result, "apart")["conditions"])


def test_listener_whose_port_the_file_serves_otherwise(tmp_path):
    result = run(tmp_path, gateway([listener("tls", 9443, "TLS", tls={"mode": "Passthrough"}),
                                    listener("tcp", 9000)]),
                 stream_listen=("127.0.0.1:9443", "127.0.0.1:9000"))
    assert conditions(listener_status(result, "tls")["conditions"])["Accepted"] == (
        "False", "PortUnavailable")
    assert conditions(listener_status(result, "tcp")["conditions"])["Accepted"] == ACCEPTED
    assert result.entities["stream_listen"] == []       # 9000 is the file's own entry


def test_conditions_carry_each_object_s_generation(tmp_path):
    result = run(tmp_path, gateway([listener("tcp", 9000)], generation=7), service("echo"),
                 tcp_route("r", [{"name": "gw"}], [backend("echo")], generation=3))
    gateway_status = result.statuses[("Gateway", INFRA, "gw")]
    generations = {c["observedGeneration"] for c in gateway_status["conditions"]}
    generations |= {c["observedGeneration"]
                    for item in gateway_status["listeners"] for c in item["conditions"]}
    assert generations == {7}
    route_status = result.statuses[("TCPRoute", INFRA, "r")]
    assert {c["observedGeneration"] for c in route_status["parents"][0]["conditions"]} == {3}


def test_programmed_is_pending_until_the_configuration_runs(tmp_path):
    result = run(tmp_path, gateway([listener("tcp", 9000)]), programmed=False,
                 publish_addresses=("192.0.2.3",))
    status = result.statuses[("Gateway", INFRA, "gw")]
    assert conditions(status["conditions"])["Programmed"] == ("Unknown", "Pending")
    assert conditions(listener_status(result, "tcp")["conditions"])["Programmed"] == ("Unknown", "Pending")
    assert status["addresses"] == [{"type": "IPAddress", "value": "192.0.2.3"}]


def test_gateway_class_status(tmp_path):
    result = run(tmp_path, {**gateway_class("with-params"),
                            "spec": {"controllerName": "gateway.pyproxy.dev/controller",
                                     "parametersRef": {"group": "x", "kind": "y", "name": "z"}}})
    status = result.statuses[("GatewayClass", "", "pyproxy")]
    assert conditions(status["conditions"]) == {"Accepted": ACCEPTED,
                                                "SupportedVersion": ("True", "SupportedVersion")}
    names = [feature["name"] for feature in status["supportedFeatures"]]
    assert names == sorted(names) and "TLSRouteModeTerminate" in names
    assert conditions(result.statuses[("GatewayClass", "", "with-params")]["conditions"])["Accepted"] == (
        "False", "InvalidParameters")


# --- TCPIngress (KIC translate_kong_l4.go; brief §5) -----------------------------------------------

def tcp_ingress(name: str, rules: list[dict], tls: list[dict] | None = None,
                ingress_class: str | None = "kong",
                protocols: str | None = None) -> dict:
    annotations = {}
    if ingress_class is not None:
        annotations["kubernetes.io/ingress.class"] = ingress_class
    if protocols is not None:
        annotations["konghq.com/protocols"] = protocols
    spec: dict = {"rules": rules}
    if tls is not None:
        spec["tls"] = tls
    return {"apiVersion": "configuration.konghq.com/v1beta1", "kind": "TCPIngress",
            "metadata": {"name": name, "namespace": INFRA, "annotations": annotations}, "spec": spec}


def ingress_rule(port: int, service_name: str = "echo", service_port: int = 1025,
                 host: str | None = None) -> dict:
    rule: dict = {"port": port, "backend": {"serviceName": service_name, "servicePort": service_port}}
    if host is not None:
        rule["host"] = host
    return rule


def test_tcp_ingress_of_another_class_is_ignored(tmp_path):
    result = run(tmp_path, service("echo"), tcp_ingress("other", [ingress_rule(9000)], ingress_class="nginx"),
                 tcp_ingress("none", [ingress_rule(9000)], ingress_class=None))
    assert result.entities["services"] == []
    assert ("TCPIngress", INFRA, "other") not in result.statuses


def test_tcp_ingress_translates_as_kic(tmp_path, certs):
    result = run(tmp_path, service("echo"), tls_secret("tls", certs["tls"]),
                 tcp_ingress("plain", [ingress_rule(9000)]),
                 tcp_ingress("secure", [ingress_rule(9443, host="tls.example.com")],
                             tls=[{"secretName": "tls", "hosts": ["tls.example.com"]}]),
                 tcp_ingress("pass", [ingress_rule(9443, host="pass.example.com")],
                             protocols="tls_passthrough"),
                 stream_listen=("127.0.0.1:9000", "127.0.0.1:9443 ssl"), publish_addresses=("192.0.2.3",))
    routes = {r["name"]: r for svc in result.entities["services"] for r in svc["routes"]}
    assert routes == {
        "infra.plain.0": {"name": "infra.plain.0", "protocols": ["tcp"], "destinations": [{"port": 9000}]},
        "infra.secure.0": {"name": "infra.secure.0", "protocols": ["tcp", "tls"],
                           "destinations": [{"port": 9443}],
                           "snis": ["tls.example.com"]},
        "infra.pass.0": {"name": "infra.pass.0", "protocols": ["tls_passthrough"],
                         "destinations": [{"port": 9443}],
                         "snis": ["pass.example.com"]},
    }
    assert [c["snis"] for c in result.entities["certificates"]] == [["tls.example.com"]]
    assert result.statuses[("TCPIngress", INFRA, "plain")] == {
        "loadBalancer": {"ingress": [{"ip": "192.0.2.3"}]}}
    assert result.notices == []
    load(tmp_path, result, {"stream_listen": ["127.0.0.1:9000", "127.0.0.1:9443 ssl"]})


def test_tcp_ingress_problems_are_notices(tmp_path):
    result = run(tmp_path, tcp_ingress("lost", [ingress_rule(9100, "missing")], protocols="udp"))
    messages = [n.message for n in result.notices]
    assert messages == [
        "TCPIngress infra/lost: metadata.annotations.konghq.com/protocols: udp: pyproxy routes tcp, tls, "
        "tls_passthrough only; annotation ignored",
        "TCPIngress infra/lost: spec.rules[0].port: port 9100 is neither a stream_listen port nor a Gateway "
        "listener's: the rule never matches",
        "TCPIngress infra/lost: spec.rules[0].backend: Service infra/missing not found: its sessions end "
        "with status 502",
    ]


# --- bad input --------------------------------------------------------------------------------------

def _field_paths(value, path=()):
    yield path
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _field_paths(item, (*path, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _field_paths(item, (*path, index))


IDENTITY = (("apiVersion",), ("kind",), ("metadata", "name"), ("metadata", "namespace"))


def test_no_value_in_any_field_makes_the_translation_raise():
    """Every field of the seed's objects (and of a Secret, a grant, a Namespace, a BackendTLSPolicy, a
    ConfigMap, an IngressClass and v1 Endpoints), set in turn to a value of each wrong shape: the
    translation reports or ignores it, it never raises. (The fields that make an object's identity are
    read_paths' to check: test_gateway_manifests.py.)"""
    folder = Path(__file__).resolve().parents[2] / "examples" / "gateway"
    documents = [document for name in ("seed.yaml", "echo-loopback.yaml")
                 for document in yaml.safe_load_all((folder / name).read_text())]
    documents += [
        {"apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/tls", "metadata": {"name": "s"},
         "data": {"tls.crt": "eA==", "tls.key": "eA=="}},
        reference_grant("default", "other"),
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "n", "labels": {"a": "b"}}},
        {**backend_tls_policy("p", "echo", section="tcp"), "metadata": {"name": "p", "namespace": "default"}},
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "ca"}, "data": {"ca.crt": "x"}},
        {"apiVersion": "networking.k8s.io/v1", "kind": "IngressClass",
         "metadata": {"name": "kong",
                      "annotations": {"ingressclass.kubernetes.io/is-default-class": "true"}}},
        {"apiVersion": "v1", "kind": "Endpoints", "metadata": {"name": "echo"},
         "subsets": [{"addresses": [{"ip": "127.0.0.1"}], "ports": [{"name": "tcp", "port": 1025}]}]},
    ]
    wrong = [None, 5, "x", [], {}, True, -1, [None], {"a": None}, "*.*", 10**20]
    tried = 0
    for index, document in enumerate(documents):
        for field in list(_field_paths(document))[1:]:
            if field[:2] in IDENTITY or field == ("metadata",):
                continue
            for value in wrong:
                mutated = copy.deepcopy(documents)
                parent_value = mutated[index]
                for key in field[:-1]:
                    parent_value = parent_value[key]
                parent_value[field[-1]] = value
                resources = [Resource(item["kind"], item["apiVersion"],
                                      "" if item["kind"] in CLUSTER_SCOPED else "default",
                                      item["metadata"]["name"], item, "mutated.yaml", number)
                             for number, item in enumerate(mutated)]
                translate(resources, Options(runtime_dir="/nonexistent"))
                tried += 1
    assert tried > 1000


# --- BackendTLSPolicy (GW backendtlspolicy_types.go; conformance backendtlspolicy-tlsroute-terminate) -----

def backend_tls_policy(name: str, service_name: str = "tls-backend", section: str | None = None,
                       config_map: str | None = "ca", created: str | None = None, **validation) -> dict:
    target = {"group": "", "kind": "Service", "name": service_name}
    if section is not None:
        target["sectionName"] = section
    metadata = {"name": name, "namespace": INFRA}
    if created:
        metadata["creationTimestamp"] = created
    checks = {"hostname": "abc.example.com", **validation}
    if config_map is not None:
        checks.setdefault("caCertificateRefs", [{"group": "", "kind": "ConfigMap", "name": config_map}])
    return {"apiVersion": V1, "kind": "BackendTLSPolicy", "metadata": metadata,
            "spec": {"targetRefs": [target], "validation": checks}}


def ca_config_map(ca_file, name: str = "ca") -> dict:
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name, "namespace": INFRA},
            "data": {"ca.crt": ca_file.read_text()}}


@pytest.fixture(scope="module")
def ca(tmp_path_factory):
    from tests.support import make_ca
    return make_ca(tmp_path_factory.mktemp("ca"))


def terminate_gateway(passthrough: bool = False) -> dict:
    listeners = [listener("tls", 8443, "TLS", hostname="tls.example.com",
                          tls={"certificateRefs": [{"name": "cert"}]})]
    if passthrough:
        listeners.append(listener("pass", 8443, "TLS", hostname="pass.example.com",
                                  tls={"mode": "Passthrough"}))
    return gateway(listeners)


def test_backend_tls_policy_makes_terminated_routes_speak_tls_to_the_backend(tmp_path, certs, ca):
    result = run(tmp_path, terminate_gateway(passthrough=True), tls_secret("cert", certs["tls"]),
                 service("tls-backend", ports={"btls": 443}), ca_config_map(ca[0]),
                 backend_tls_policy("policy", section="btls"),
                 tls_route("r", [{"name": "gw"}], [backend("tls-backend", 443)],
                           ["tls.example.com", "pass.example.com"]))
    assert parent(result, "TLSRoute", "r") == {"Accepted": ACCEPTED, "ResolvedRefs": RESOLVED}
    [ancestor] = result.statuses[("BackendTLSPolicy", INFRA, "policy")]["ancestors"]
    assert ancestor["ancestorRef"] == {"group": GROUP, "kind": "Gateway", "namespace": INFRA, "name": "gw"}
    assert conditions(ancestor["conditions"]) == {"Accepted": ACCEPTED, "ResolvedRefs": RESOLVED}
    config = load(tmp_path, result)
    by_route = {r.name: config.service(r.service) for r in config.routes}
    terminated = by_route["tlsroute.infra.r.0.tls"]
    assert (terminated.protocol, terminated.tls_verify, terminated.tls_server_name) == ("tls", True,
                                                                                         "abc.example.com")
    assert [Path(path).read_text() for path in terminated.ca_certificates] == [ca[0].read_text()]
    passed = by_route["tlsroute.infra.r.0.pass"]         # passthrough is already end to end
    assert (passed.protocol, passed.tls_verify) == ("tcp", False)


def test_backend_tls_policy_for_another_port_or_service_does_not_apply(tmp_path, certs, ca):
    result = run(tmp_path, terminate_gateway(), tls_secret("cert", certs["tls"]),
                 service("tls-backend", ports={"tcp": 1025}), ca_config_map(ca[0]),
                 backend_tls_policy("other-port", section="btls"),
                 backend_tls_policy("other", "other-service"),
                 tls_route("r", [{"name": "gw"}], [backend("tls-backend")], ["tls.example.com"]))
    assert not any(key[0] == "BackendTLSPolicy" for key in result.statuses)
    [svc] = result.entities["services"]
    assert "protocol" not in svc


@pytest.mark.parametrize(("config_maps", "policy", "accepted", "resolved"), [
    ([], {}, ("False", "NoValidCACertificate"), ("False", "InvalidCACertificateRef")),
    (["garbage"], {}, ("False", "NoValidCACertificate"), ("False", "InvalidCACertificateRef")),
    ([], {"caCertificateRefs": [{"group": "example.com", "kind": "Bundle", "name": "ca"}]},
     ("False", "NoValidCACertificate"), ("False", "InvalidKind")),
    (["ca"], {"subjectAltNames": [{"type": "Hostname", "hostname": "abc.example.com"}]},
     ("False", "Invalid"), RESOLVED),
])
def test_unusable_backend_tls_policy_refuses_the_connections(tmp_path, certs, ca, config_maps, policy,
                                                             accepted, resolved):
    objects: list = [terminate_gateway(), tls_secret("cert", certs["tls"]), service("tls-backend"),
                     backend_tls_policy("policy", **policy),
                     tls_route("r", [{"name": "gw"}], [backend("tls-backend")], ["tls.example.com"])]
    if "ca" in config_maps:
        objects.append(ca_config_map(ca[0]))
    if "garbage" in config_maps:
        objects.append({**ca_config_map(ca[0]), "data": {"ca.crt": "not a certificate"}})
    result = run(tmp_path, *objects)
    [ancestor] = result.statuses[("BackendTLSPolicy", INFRA, "policy")]["ancestors"]
    assert conditions(ancestor["conditions"]) == {"Accepted": accepted, "ResolvedRefs": resolved}
    assert result.entities["services"] == []
    assert any("its connections are refused" in notice.message for notice in result.notices)


def test_older_backend_tls_policy_wins(tmp_path, certs, ca):
    result = run(tmp_path, terminate_gateway(), tls_secret("cert", certs["tls"]), service("tls-backend"),
                 ca_config_map(ca[0]),
                 backend_tls_policy("newer", created="2026-01-02T00:00:00Z", hostname="new.example.com"),
                 backend_tls_policy("older", created="2026-01-01T00:00:00Z"),
                 tls_route("r", [{"name": "gw"}], [backend("tls-backend")], ["tls.example.com"]))
    newer = result.statuses[("BackendTLSPolicy", INFRA, "newer")]["ancestors"][0]
    assert conditions(newer["conditions"])["Accepted"] == ("False", "Conflicted")
    [svc] = result.entities["services"]
    assert svc["tls_server_name"] == "abc.example.com"


def test_a_hostname_goes_to_the_most_specific_listener_of_its_port(tmp_path, certs):
    """GW "Listener Isolation": a route attached to a wildcard listener and to an exact one on the same
    port serves the exact name through the exact listener only (there: terminated, not passed)."""
    gw = gateway([listener("wild", 8443, "TLS", hostname="*.example.com", tls={"mode": "Passthrough"}),
                  listener("exact", 8443, "TLS", hostname="tls.example.com",
                           tls={"certificateRefs": [{"name": "cert"}]}),
                  listener("any", 8443, "TLS", tls={"mode": "Passthrough"})])
    result = run(tmp_path, gw, tls_secret("cert", certs["tls"]), service("echo"),
                 tls_route("r", [{"name": "gw"}], [backend("echo")],
                           ["tls.example.com", "other.example.com", "x.example.org"]))
    assert [listener_status(result, name)["attachedRoutes"] for name in ("wild", "exact", "any")] == [1, 1, 1]
    config = load(tmp_path, result)
    assert {r.name: (r.protocols, r.snis) for r in config.routes} == {
        "tlsroute.infra.r.0.wild": (("tls_passthrough",), ("other.example.com",)),
        "tlsroute.infra.r.0.exact": (("tls",), ("tls.example.com",)),
        "tlsroute.infra.r.0.any": (("tls_passthrough",), ("x.example.org",)),
        "gateway_listener-isolation.8443": (("tls_passthrough",), ("*.example.com", "tls.example.com")),
    }


def test_longer_wildcard_wins_over_an_older_shorter_one(tmp_path):
    gw = gateway([listener("tls", 8443, "TLS", tls={"mode": "Passthrough"})])
    result = run(tmp_path, gw, service("short"), service("long"), service("exact"),
                 tls_route("short", [{"name": "gw"}], [backend("short")], ["*.example.com"],
                           created="2026-01-01T00:00:00Z"),
                 tls_route("long", [{"name": "gw"}], [backend("long")], ["*.foo.example.com"],
                           created="2026-01-02T00:00:00Z"),
                 tls_route("exact", [{"name": "gw"}], [backend("exact")], ["a.foo.example.com"],
                           created="2026-01-03T00:00:00Z"))
    config = load(tmp_path, result)
    routes = Router(config.routes, config.stream_listen).for_listener(config.stream_listen[0])

    def chosen(sni: str) -> str:
        found = routes.match("192.0.2.1", 40000, "127.0.0.1", 8443, sni)
        return found.name if found is not None else ""
    assert chosen("b.foo.example.com") == "tlsroute.infra.long.0.tls"
    assert chosen("b.example.com") == "tlsroute.infra.short.0.tls"
    assert chosen("a.foo.example.com") == "tlsroute.infra.exact.0.tls"


def chooser(tmp_path, result: Translation, port: int = 8443):
    """The name of the route a TLS client of `port` takes for an SNI (None: no SNI), "" for none."""
    config = load(tmp_path, result)
    listen = next(listen for listen in config.stream_listen if listen.port == port)
    routes = Router(config.routes, config.stream_listen).for_listener(listen)

    def chosen(sni: str | None) -> str:
        found = routes.match("192.0.2.1", 40000, "127.0.0.1", port, sni)
        return found.name if found is not None else ""
    return chosen


def test_passthrough_without_any_hostname_takes_every_client(tmp_path):
    """GW: a Passthrough listener without hostname and a TLSRoute without hostnames carry every SNI, and
    clients without SNI too (brief §9.2 f); a route with hostnames on the listener wins for its names."""
    gw = gateway([listener("tls", 8443, "TLS", tls={"mode": "Passthrough"})])
    result = run(tmp_path, gw, service("any"), service("named"),
                 route("TLSRoute", "any", [{"name": "gw"}], [backend("any")], created="2026-01-01T00:00:00Z"),
                 tls_route("named", [{"name": "gw"}], [backend("named")], ["a.example.com"],
                           created="2026-01-02T00:00:00Z"))
    assert result.notices == []
    assert parent(result, "TLSRoute", "any")["Accepted"] == ACCEPTED
    chosen = chooser(tmp_path, result)
    assert chosen("b.example.org") == "tlsroute.infra.any.0.tls"
    assert chosen(None) == "tlsroute.infra.any.0.tls"
    assert chosen("a.example.com") == "tlsroute.infra.named.0.tls"


def test_an_sni_of_a_more_specific_listener_never_reaches_a_less_specific_one(tmp_path):
    """GW "Listener Isolation": a name under a listener's hostname is served by that listener's routes
    or refused, even where a less specific listener of the port has a route that would take it."""
    gw = gateway([listener("wild", 8443, "TLS", hostname="*.example.com", tls={"mode": "Passthrough"}),
                  listener("exact", 8443, "TLS", hostname="abc.example.com", tls={"mode": "Passthrough"}),
                  listener("foo", 8443, "TLS", hostname="*.foo.example.com", tls={"mode": "Passthrough"}),
                  listener("any", 8443, "TLS", tls={"mode": "Passthrough"})])
    result = run(tmp_path, gw, service("wild"), service("foo"), service("any"),
                 tls_route("wild", [{"name": "gw", "sectionName": "wild"}], [backend("wild")],
                           ["*.example.com"]),
                 tls_route("foo", [{"name": "gw", "sectionName": "foo"}], [backend("foo")],
                           ["a.foo.example.com"]),
                 route("TLSRoute", "any", [{"name": "gw", "sectionName": "any"}], [backend("any")]))
    assert [listener_status(result, name)["attachedRoutes"] for name in ("wild", "exact", "foo", "any")] == [
        1, 0, 1, 1]
    chosen = chooser(tmp_path, result)
    refused = "gateway_listener-isolation.8443"
    assert chosen("b.example.com") == "tlsroute.infra.wild.0.wild"
    assert chosen("abc.example.com") == refused         # its listener has no route
    assert chosen("a.foo.example.com") == "tlsroute.infra.foo.0.foo"
    assert chosen("b.foo.example.com") == refused
    assert chosen("x.example.org") == "tlsroute.infra.any.0.any"
    assert chosen(None) == "tlsroute.infra.any.0.any"
    config = load(tmp_path, result)
    assert [target for upstream in config.upstreams if upstream.name == "gateway_listener-isolation"
            for target in upstream.targets] == []


def test_a_port_without_nested_listener_hostnames_needs_no_refusal(tmp_path):
    gw = gateway([listener("a", 8443, "TLS", hostname="a.example.com", tls={"mode": "Passthrough"}),
                  listener("b", 8443, "TLS", hostname="*.example.org", tls={"mode": "Passthrough"})])
    result = run(tmp_path, gw, service("a"),
                 tls_route("a", [{"name": "gw"}], [backend("a")], ["a.example.com"]))
    assert [service["name"] for service in result.entities["services"]] == ["tlsroute.infra.a"]


@pytest.mark.parametrize(("default", "translated"), [("true", True), ("false", False), (None, False)])
def test_tcp_ingress_without_class_belongs_to_the_default_ingress_class(tmp_path, default, translated):
    ingress_class = {"apiVersion": "networking.k8s.io/v1", "kind": "IngressClass",
                     "metadata": {"name": "kong"},
                     "spec": {"controller": "ingress-controllers.konghq.com/kong"}}
    if default is not None:
        ingress_class["metadata"]["annotations"] = {"ingressclass.kubernetes.io/is-default-class": default}
    result = run(tmp_path, ingress_class, service("echo"),
                 tcp_ingress("unnamed", [ingress_rule(9000)], ingress_class=None), stream_listen=("9000",))
    assert bool(result.entities["services"]) is translated
    assert (("TCPIngress", INFRA, "unnamed") in result.statuses) is translated
