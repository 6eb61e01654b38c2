"""A UDPRoute served by a running pyproxy in gateway file mode (issues 17 and 22): the UDP listener
opens, datagrams reach the Service's endpoint and each reply is the client's own; dig through it to
a real DNS server; the statuses on /gateway/status; the same objects read from an API server."""

from __future__ import annotations

import json
import urllib.request

import yaml

from tests.integration.test_gateway_cluster import (
    api,  # noqa: F401 (a fixture)
    conditions,
)
from tests.integration.test_gateway_cluster import config as cluster_config
from tests.integration.test_gateway_file_source import CLASS_AND_GATEWAY, listener
from tests.integration.test_udp import ask, client, dig_short, dnsmasq, udp_port, udp_upstreams  # noqa: F401
from tests.support import wait_until
from tests.unit.test_gateway_cluster import kubeconfig

ROUTE_AND_SERVICE = """\
---
apiVersion: gateway.networking.k8s.io/v1alpha2
kind: UDPRoute
metadata: {name: coredns, namespace: default}
spec:
  parentRefs: [{name: edge, sectionName: dns}]
  rules: [{backendRefs: [{name: coredns, port: 53}]}]
---
apiVersion: v1
kind: Service
metadata: {name: coredns, namespace: default}
spec:
  ports: [{name: dns, port: 53, protocol: UDP}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: coredns-loopback
  namespace: default
  labels: {kubernetes.io/service-name: coredns}
addressType: IPv4
ports: [{name: dns, port: TARGET, protocol: UDP}]
endpoints: [{addresses: ["127.0.0.1"], conditions: {ready: true}}]
"""


def manifests(port: int, target: int) -> str:
    """A Gateway with the UDP listener `dns` on `port`, a UDPRoute to Service `coredns` (UDP port 53),
    whose endpoint is 127.0.0.1:`target`."""
    dns = listener("dns", port, "UDP", ", allowedRoutes: {kinds: [{kind: UDPRoute}]}")
    return CLASS_AND_GATEWAY.format(listeners=dns) + ROUTE_AND_SERVICE.replace("TARGET", str(target))


def start(proxy, tmp_path, target: int):
    port, status_port = udp_port(), udp_port()
    folder = tmp_path / "manifests"
    folder.mkdir()
    (folder / "dns.yaml").write_text(manifests(port, target))
    p = proxy(f"""
        worker_processes: 2
        status_listen: 127.0.0.1:{status_port}
        gateway:
          paths: [{folder}]
          address: 127.0.0.1
        """)
    return p, port, status_port


def test_a_udp_route_carries_datagrams_to_its_backend(proxy, udp_upstreams, tmp_path):  # noqa: F811 (a fixture)
    backend = udp_upstreams("coredns")
    p, port, status_port = start(proxy, tmp_path, backend.port)
    sock = client()
    try:
        for payload in (b"first", bytes(range(256)) * 4, b"third"):
            name, _, _ = ask(sock, port, payload)          # the reply names this datagram's digest
            assert name == "coredns"
    finally:
        sock.close()
    assert [data for data, _ in backend.received] == [b"first", bytes(range(256)) * 4, b"third"]
    with urllib.request.urlopen(f"http://127.0.0.1:{status_port}/gateway/status", timeout=10) as answer:
        listing = json.load(answer)
    by_name = {(item["kind"], item["metadata"]["name"]): item["status"] for item in listing["items"]}
    [parent] = by_name[("UDPRoute", "coredns")]["parents"]
    assert {c["type"]: c["reason"] for c in parent["conditions"]} == {"Accepted": "Accepted",
                                                                       "ResolvedRefs": "ResolvedRefs"}
    [dns] = by_name[("Gateway", "edge")]["listeners"]
    assert dns["attachedRoutes"] == 1
    assert dns["supportedKinds"] == [{"group": "gateway.networking.k8s.io", "kind": "UDPRoute"}]
    assert "internal error" not in p.log_text()


def test_dig_through_a_udp_route_to_dnsmasq(proxy, dnsmasq, tmp_path):  # noqa: F811 (a fixture)
    _, port, _ = start(proxy, tmp_path, dnsmasq)
    assert dig_short(port, "www.example.test", tries=2) == ["192.0.2.10"]
    assert dig_short(port, "db.example.test", tries=2) == ["198.51.100.7"]


def test_a_udp_route_from_the_api_server_answers_and_gets_its_status(api, proxy, udp_upstreams,  # noqa: F811
                                                                      tmp_path):
    """Cluster mode: the objects of `manifests` from the (fake) API server; the Lease holder writes the
    UDPRoute's status subresource."""
    backend = udp_upstreams("coredns")
    port = udp_port()
    for obj in yaml.safe_load_all(manifests(port, backend.port)):
        api.apply(obj)
    proxy(cluster_config(kubeconfig(tmp_path, api.port)))
    wait_until(lambda: conditions(api.get("UDPRoute", "coredns")).get("Accepted"), timeout=15,
               what="the UDPRoute's status")
    assert conditions(api.get("UDPRoute", "coredns")) == {"Accepted": "Accepted",
                                                          "ResolvedRefs": "ResolvedRefs"}
    sock = client()
    try:
        assert ask(sock, port, b"from the cluster")[0] == "coredns"
    finally:
        sock.close()
