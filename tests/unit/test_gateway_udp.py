"""UDP through the Gateway API and Kong's UDPIngress (issues 17 and 22): UDP listeners, UDPRoute
attachment and statuses (GW `apis/v1alpha2/udproute_types.go`, conformance `udproute-*`), the `udp`
services and `ADDR:PORT udp` listeners they become (validated by the configuration's own loader)."""

from __future__ import annotations

import pytest

from tests.unit.test_gateway_translate import (
    ACCEPTED,
    GROUP,
    INFRA,
    RESOLVED,
    backend,
    conditions,
    gateway,
    listener,
    listener_status,
    load,
    parent,
    reference_grant,
    route,
    run,
    service,
    tcp_route,
)


def udp_route(name: str, parents: list[dict], backends: list[dict], **extra) -> dict:
    return route("UDPRoute", name, parents, backends, **extra)


def udp_service(name: str, namespace: str = INFRA, port: int = 53, target: int = 5353,
                protocol: str = "UDP") -> list[dict]:
    """A Service with one port of `protocol` and its EndpointSlice at 127.0.0.1:`target`."""
    return [
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": namespace},
         "spec": {"ports": [{"name": "dns", "port": port, "protocol": protocol}]}},
        {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
         "metadata": {"name": f"{name}-1", "namespace": namespace,
                      "labels": {"kubernetes.io/service-name": name}},
         "addressType": "IPv4", "ports": [{"name": "dns", "port": target, "protocol": protocol}],
         "endpoints": [{"addresses": ["127.0.0.1"], "conditions": {"ready": True}}]},
    ]


def udp_ingress(name: str, rules: list[dict], ingress_class: str | None = "kong") -> dict:
    annotations = {"kubernetes.io/ingress.class": ingress_class} if ingress_class else {}
    return {"apiVersion": "configuration.konghq.com/v1beta1", "kind": "UDPIngress",
            "metadata": {"name": name, "namespace": INFRA, "annotations": annotations},
            "spec": {"rules": rules}}


def test_a_udp_route_on_a_udp_listener_becomes_a_udp_service_and_listener(tmp_path):
    gw = gateway([listener("dns", 5300, "UDP", allowedRoutes={"kinds": [{"kind": "UDPRoute"}]})])
    result = run(tmp_path, gw, udp_service("coredns"),
                 udp_route("udp-coredns", [{"name": "gw", "sectionName": "dns"}], [backend("coredns", 53)]))
    assert parent(result, "UDPRoute", "udp-coredns") == {"Accepted": ACCEPTED, "ResolvedRefs": RESOLVED}
    status = listener_status(result, "dns")
    assert status["supportedKinds"] == [{"group": GROUP, "kind": "UDPRoute"}]
    assert status["attachedRoutes"] == 1
    assert conditions(status["conditions"]) == {
        "Accepted": ACCEPTED, "ResolvedRefs": RESOLVED, "Programmed": ("True", "Programmed"),
        "Conflicted": ("False", "NoConflicts")}
    features = result.statuses[("GatewayClass", "", "pyproxy")]["supportedFeatures"]
    assert {"name": "UDPRoute"} in features
    assert result.entities["stream_listen"] == ["127.0.0.1:5300 udp"]
    config = load(tmp_path, result)
    [svc] = config.services
    assert svc.protocol == "udp"
    [udp] = svc.routes
    assert udp.protocols == ("udp",) and [d.port for d in udp.destinations] == [5300]
    assert [str(target) for target in config.upstream(svc.upstream).targets] == ["127.0.0.1:5353"]
    assert [(listen.port, listen.udp) for listen in config.stream_listen] == [(5300, True)]


def test_a_tcp_and_a_udp_listener_on_one_port_do_not_conflict(tmp_path):
    gw = gateway([listener("dns-tcp", 5300, "TCP"), listener("dns-udp", 5300, "UDP")])
    result = run(tmp_path, gw, udp_service("coredns"), service("echo"),
                 tcp_route("t", [{"name": "gw", "sectionName": "dns-tcp"}], [backend("echo")]),
                 udp_route("u", [{"name": "gw", "sectionName": "dns-udp"}], [backend("coredns", 53)]))
    for name in ("dns-tcp", "dns-udp"):
        status = listener_status(result, name)
        assert conditions(status["conditions"])["Conflicted"] == ("False", "NoConflicts")
        assert status["attachedRoutes"] == 1
    assert parent(result, "TCPRoute", "t")["Accepted"] == ACCEPTED
    assert parent(result, "UDPRoute", "u")["Accepted"] == ACCEPTED
    assert result.entities["stream_listen"] == ["127.0.0.1:5300", "127.0.0.1:5300 udp"]
    config = load(tmp_path, result)
    assert sorted(service.protocol for service in config.services) == ["tcp", "udp"]


def test_a_udp_port_of_an_older_gateway_is_unavailable_to_a_newer_one(tmp_path):
    older = gateway([listener("dns", 5300, "UDP")], name="older", created="2024-01-01T00:00:00Z")
    newer = gateway([listener("dns", 5300, "UDP"), listener("tcp", 5300)], name="newer",
                    created="2024-02-01T00:00:00Z")
    result = run(tmp_path, older, newer)
    assert conditions(listener_status(result, "dns", "older")["conditions"])["Accepted"] == ACCEPTED
    refused = listener_status(result, "dns", "newer")
    assert conditions(refused["conditions"])["Accepted"] == ("False", "PortUnavailable")
    assert conditions(refused["conditions"])["Programmed"] == ("False", "Invalid")
    assert conditions(listener_status(result, "tcp", "newer")["conditions"])["Accepted"] == ACCEPTED
    assert result.entities["stream_listen"] == ["127.0.0.1:5300 udp", "127.0.0.1:5300"]


def test_a_udp_stream_listen_entry_of_the_file_is_shared(tmp_path):
    result = run(tmp_path, gateway([listener("dns", 5300, "UDP")]), stream_listen=("127.0.0.1:5300 udp",))
    assert conditions(listener_status(result, "dns")["conditions"])["Accepted"] == ACCEPTED
    assert result.entities["stream_listen"] == []


@pytest.mark.parametrize(("protocol", "kind", "reason"), [
    ("TCP", "UDPRoute", "NotAllowedByListeners"),        # conformance udproute-invalid-... alike
    ("UDP", "TCPRoute", "NotAllowedByListeners"),
])
def test_a_route_of_the_other_transport_is_not_allowed(tmp_path, protocol, kind, reason):
    result = run(tmp_path, gateway([listener("l", 5300, protocol)]), udp_service("coredns"),
                 route(kind, "r", [{"name": "gw"}], [backend("coredns", 53)]))
    assert parent(result, kind, "r")["Accepted"] == ("False", reason)
    assert listener_status(result, "l")["attachedRoutes"] == 0
    assert result.entities["services"] == []


def test_a_tcp_route_kind_on_a_udp_listener_is_an_invalid_route_kind(tmp_path):
    gw = gateway([listener("dns", 5300, "UDP", allowedRoutes={"kinds": [{"kind": "TCPRoute"}]})])
    status = listener_status(run(tmp_path, gw), "dns")
    assert conditions(status["conditions"])["ResolvedRefs"] == ("False", "InvalidRouteKinds")
    assert status["supportedKinds"] == []


@pytest.mark.parametrize(("port_protocol", "expected"), [
    ("UDP", RESOLVED),
    ("TCP", ("False", "BackendNotFound")),        # a backendRef of a UDPRoute names a UDP Service port
])
def test_a_udp_route_backend_is_a_udp_service_port(tmp_path, port_protocol, expected):
    result = run(tmp_path, gateway([listener("dns", 5300, "UDP")]),
                 udp_service("coredns", protocol=port_protocol),
                 udp_route("r", [{"name": "gw"}], [backend("coredns", 53)]))
    assert parent(result, "UDPRoute", "r")["ResolvedRefs"] == expected
    if port_protocol == "TCP":
        message = result.statuses[("UDPRoute", INFRA, "r")]["parents"][0]["conditions"][1]["message"]
        assert "has no UDP port 53" in message


def test_a_udp_route_backend_in_another_namespace_needs_a_reference_grant(tmp_path):
    gw = gateway([listener("dns", 5300, "UDP")])
    r = udp_route("r", [{"name": "gw"}], [backend("coredns", 53, namespace="dns")])
    refused = run(tmp_path, gw, udp_service("coredns", namespace="dns"), r)
    assert parent(refused, "UDPRoute", "r")["ResolvedRefs"] == ("False", "RefNotPermitted")
    granted = run(tmp_path, gw, udp_service("coredns", namespace="dns"), r,
                  reference_grant("dns", INFRA, from_kind="UDPRoute"))
    assert parent(granted, "UDPRoute", "r")["ResolvedRefs"] == RESOLVED
    load(tmp_path, granted)


def test_udp_route_weights_split_the_sessions_and_an_invalid_share_is_rejected(tmp_path):
    gw = gateway([listener("dns", 5300, "UDP")])
    result = run(tmp_path, gw, udp_service("a", target=5301), udp_service("b", target=5302),
                 udp_route("r", [{"name": "gw"}], [backend("a", 53, weight=3), backend("b", 53, weight=1),
                                                   backend("missing", 53)]))
    assert parent(result, "UDPRoute", "r")["ResolvedRefs"] == ("False", "BackendNotFound")
    config = load(tmp_path, result)
    [svc] = config.services
    assert svc.reject_share == pytest.approx(1 / 5)      # "missing" weighs 1 of 3 + 1 + 1
    weights = {str(target): target.weight for target in config.upstream(svc.upstream).targets}
    assert weights == {"127.0.0.1:5301": 65535, "127.0.0.1:5302": 21845}


def test_a_udp_route_with_two_rules_is_unsupported(tmp_path):
    result = run(tmp_path, gateway([listener("dns", 5300, "UDP")]), udp_service("coredns"),
                 udp_route("r", [{"name": "gw"}], [], rules=[{"backendRefs": [backend("coredns", 53)]}] * 2))
    assert parent(result, "UDPRoute", "r")["Accepted"] == ("False", "UnsupportedValue")


def test_other_listener_protocols_are_still_unsupported(tmp_path):
    status = listener_status(run(tmp_path, gateway([listener("web", 80, "HTTP")])), "web")
    assert conditions(status["conditions"])["Accepted"] == ("False", "UnsupportedProtocol")


# --- Kong UDPIngress (KIC `UDPIngressRule`) ------------------------------------------------------------

def test_udp_ingress_translates_as_kic(tmp_path):
    coredns = {"serviceName": "coredns", "servicePort": 53}
    result = run(tmp_path, udp_service("coredns"),
                 udp_ingress("dns", [{"port": 9999, "backend": coredns}]),
                 udp_ingress("theirs", [{"port": 9998, "backend": coredns}], ingress_class="other"),
                 stream_listen=("127.0.0.1:9999 udp",), publish_addresses=("192.0.2.1",))
    published = {"loadBalancer": {"ingress": [{"ip": "192.0.2.1"}]}}
    assert result.statuses[("UDPIngress", INFRA, "dns")] == published
    assert ("UDPIngress", INFRA, "theirs") not in result.statuses
    assert not result.notices
    config = load(tmp_path, result, {"stream_listen": ["127.0.0.1:9999 udp"]})
    [svc] = config.services
    assert svc.protocol == "udp" and svc.name == f"{INFRA}.dns.0.udp"
    [udp] = svc.routes
    assert udp.protocols == ("udp",) and [d.port for d in udp.destinations] == [9999]
    assert [str(target) for target in config.upstream(svc.upstream).targets] == ["127.0.0.1:5353"]


def test_udp_ingress_problems_are_notices(tmp_path):
    result = run(tmp_path, udp_service("coredns", protocol="TCP"),
                 udp_ingress("dns", [{"port": 9999, "backend": {"serviceName": "coredns", "servicePort": 53}},
                                     {"port": 9999, "backend": {"serviceName": "gone", "servicePort": 53}}]))
    messages = [notice.message for notice in result.notices]
    assert any("port 9999 is neither a `udp` stream_listen port" in message for message in messages)
    assert any("has no UDP port 53: its datagrams are dropped" in message for message in messages)
    assert any("Service infra/gone not found" in message for message in messages)
