"""Cluster mode (issue 17): real pyproxy processes reading their Gateway API objects from an API
server, `gateway.kubernetes`. The API server is tests.unit.test_gateway_cluster.FakeApiServer, which
replays the API server's answers (no kube-apiserver can run here): traffic, watch events applied
with sessions surviving, 410 Gone, the API server down and up, statuses and the Lease."""

from __future__ import annotations

import hashlib
import time
from typing import Any

import pytest

from pyproxy.demo.echo import EchoServer
from tests.integration.test_gateway_file_source import echoed_digest, greeting
from tests.support import (
    connect,
    free_port,
    pattern_bytes,
    peer_common_name,
    recv_line,
    tag_handler,
    tls_client,
    wait_until,
)
from tests.unit.test_gateway_cluster import FakeApiServer, kubeconfig, seed_objects

GROUP = "gateway.networking.k8s.io"


def config(kube: Any, address: str = "127.0.0.1", runtime: str = "") -> str:
    return f"""
        worker_processes: 2
        gateway:
          address: {address}
          {f"runtime_dir: {runtime}" if runtime else ""}
          kubernetes:
            kubeconfig: {kube}
            lease_duration: 2s
            lease_retry: 300ms
        """


@pytest.fixture
def api():
    server = FakeApiServer(free_port()).start()
    yield server
    server.stop()


def gateway(*listeners: tuple[str, int]) -> dict[str, Any]:
    return {"apiVersion": f"{GROUP}/v1", "kind": "Gateway", "metadata": {"name": "edge"},
            "spec": {"gatewayClassName": "pyproxy",
                     "listeners": [{"name": name, "port": port, "protocol": "TCP"}
                                   for name, port in listeners]}}


def tcp_route(name: str, backend: str, section: str = "plain") -> dict[str, Any]:
    return {"apiVersion": f"{GROUP}/v1alpha2", "kind": "TCPRoute", "metadata": {"name": name},
            "spec": {"parentRefs": [{"name": "edge", "sectionName": section}],
                     "rules": [{"backendRefs": [{"name": backend, "port": 1025}]}]}}


def service(name: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name},
            "spec": {"ports": [{"name": "tcp", "port": 1025, "protocol": "TCP"}]}}


def endpoint_slice(service_name: str, port: int) -> dict[str, Any]:
    return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": f"{service_name}-loopback",
                         "labels": {"kubernetes.io/service-name": service_name}},
            "addressType": "IPv4", "ports": [{"name": "tcp", "port": port, "protocol": "TCP"}],
            "endpoints": [{"addresses": ["127.0.0.1"], "conditions": {"ready": True}}]}


@pytest.fixture
def cluster(api, upstreams):
    """The API server holding a GatewayClass, a Gateway listening on a free port, a TCPRoute to
    Service `one`, and Services `one` and `two`, each in front of its own tagging echo server."""
    one, two = upstreams(tag_handler, name="one"), upstreams(tag_handler, name="two")
    port = free_port()
    api.apply({"apiVersion": f"{GROUP}/v1", "kind": "GatewayClass", "metadata": {"name": "pyproxy"},
               "spec": {"controllerName": "gateway.pyproxy.dev/controller"}})
    api.apply(gateway(("plain", port)))
    api.apply(tcp_route("echo", "one"))
    for name, upstream in (("one", one), ("two", two)):
        api.apply(service(name))
        api.apply(endpoint_slice(name, upstream.port))
    return port, one, two


def conditions(obj: dict[str, Any] | None) -> dict[str, str]:
    """The Accepted/ResolvedRefs... reasons of a route's first parent status, {} before any."""
    parents = ((obj or {}).get("status") or {}).get("parents") or []
    return {c["type"]: c["reason"] for c in parents[0]["conditions"]} if parents else {}


def test_the_seed_served_from_the_api_server_with_its_status_written(api, proxy, tmp_path):
    echo = EchoServer("127.0.0.1", free_port(), name="echo").start()
    try:
        plain_port, tls_port = free_port(), free_port()
        api.installed.discard(("configuration.konghq.com", "v1beta1", "tcpingresses"))   # Kong's CRDs absent
        for obj in seed_objects(echo.address[1], (plain_port, tls_port)):
            if obj["kind"] != "TCPIngress":
                api.apply(obj)
        p = proxy(config(kubeconfig(tmp_path, api.port)))
        wait_until(lambda: "reload complete" in p.log_text(), timeout=15, what="the objects applied")

        with connect(plain_port) as client:          # telnet $PROXY_IP 9000
            assert recv_line(client).startswith(b"Welcome, you are connected to node ")
            for _ in range(3):
                recv_line(client)
            payload = pattern_bytes(1 << 20)
            assert echoed_digest(client, payload) == hashlib.sha256(payload).hexdigest()
        with tls_client(tls_port, "tls9443.kong.example") as client:
            assert peer_common_name(client) == "kong.example"
            for _ in range(4):
                recv_line(client)
            client.sendall(b"hello\n")
            assert recv_line(client) == b"hello\n"

        # kubectl get tcproute echo-plaintext \
        #   -o jsonpath='{.status.parents[0].conditions[?(@.reason=="Accepted")]}'
        for kind, name in (("TCPRoute", "echo-plaintext"), ("TLSRoute", "echo-tls")):
            wait_until(lambda kind=kind, name=name: conditions(api.get(kind, name)).get("Accepted"),
                       timeout=10, what=f"the status of {kind} {name}")
            route = api.get(kind, name)
            assert route is not None
            [parent] = route["status"]["parents"]
            assert parent["controllerName"] == "gateway.pyproxy.dev/controller"
            assert conditions(route) == {"Accepted": "Accepted", "ResolvedRefs": "ResolvedRefs"}
            assert all(c["observedGeneration"] == 1 and c["lastTransitionTime"].endswith("Z")
                       for c in parent["conditions"])
        wait_until(lambda: (api.get("Gateway", "kong") or {}).get("status"), what="the Gateway's status")
        listeners = {entry["name"]: entry for entry in api.get("Gateway", "kong")["status"]["listeners"]}
        assert listeners["stream9000"]["attachedRoutes"] == 1
        assert [c["status"] for c in api.get("GatewayClass", "kong")["status"]["conditions"]
                if c["type"] == "Accepted"] == ["True"]
        # Merge patches of the status subresource, each with the resourceVersion it was computed from.
        patches = api.writes("PATCH")
        assert patches and all(body["metadata"]["resourceVersion"] for _, body in patches)

        # Written once: the same statuses are not written again (nor do they reload anything).
        count = len(patches)
        time.sleep(2.5)
        assert len(api.writes("PATCH")) == count
        assert p.log_text().count("reload complete") == 1
        # The missing CRD: one line, and the rest works.
        assert p.log_text().count("no TCPIngress is served") == 1
    finally:
        echo.stop()


def test_watch_events_apply_with_open_sessions_going_on(api, cluster, proxy, tmp_path):
    port, one, two = cluster
    p = proxy(config(kubeconfig(tmp_path, api.port)))
    wait_until(lambda: reached(port) == b"one\n", timeout=15, what="the route from the API server")
    payload = pattern_bytes(4 << 20)
    with connect(port, timeout=10) as before:
        assert recv_line(before) == b"one\n"
        assert echoed_digest(before, payload[:1 << 20]) == hashlib.sha256(payload[:1 << 20]).hexdigest()

        # An EndpointSlice changed: Service one now points at backend two.
        api.apply(endpoint_slice("one", two.port))
        changed = time.monotonic()
        wait_until(lambda: greeting(port) == b"two\n", timeout=10, what="the changed EndpointSlice")
        assert time.monotonic() - changed < 3.0
        assert echoed_digest(before, payload) == hashlib.sha256(payload).hexdigest()

    # A burst of changes is written as one snapshot, or a few: not one reload per event.
    reloads = p.log_text().count("reloading configuration")
    for round_ in range(20):
        api.apply(endpoint_slice("one", (two, one)[round_ % 2].port))     # ends on backend one
    wait_until(lambda: greeting(port) == b"one\n", timeout=10, what="the last of the burst")
    time.sleep(1.5)
    assert p.log_text().count("reloading configuration") - reloads <= 3

    # A TCPRoute added, on a listener added to the Gateway.
    second = free_port()
    api.apply(endpoint_slice("one", one.port))
    api.apply(gateway(("plain", port), ("other", second)))
    api.apply(tcp_route("other", "two", section="other"))
    wait_until(lambda: reached(second) == b"two\n" and greeting(port) == b"one\n", timeout=10,
               what="the added route")

    # 410 Gone, as the watch's ERROR event: changes the watch never announced are listed.
    api.apply(tcp_route("echo", "two"), notify=False)
    api.expire()
    wait_until(lambda: greeting(port) == b"two\n", timeout=10, what="the relist after the ERROR 410 event")
    assert "410 Gone, the watch expired; listing again" in p.log_text()

    # 410 Gone as the HTTP status of the watch request.
    api.gone_as_http = True
    api.apply(tcp_route("echo", "one"), notify=False)
    api.expire()
    wait_until(lambda: greeting(port) == b"one\n", timeout=10, what="the relist after an HTTP 410")
    assert greeting(second) == b"two\n"


def test_api_server_down_then_up_traffic_never_stops(api, cluster, proxy, tmp_path):
    port, _, _ = cluster
    p = proxy(config(kubeconfig(tmp_path, api.port)))
    wait_until(lambda: reached(port) == b"one\n", timeout=15, what="the route from the API server")
    with connect(port, timeout=10) as before:
        assert recv_line(before) == b"one\n"
        api.stop()
        api.apply(tcp_route("echo", "two"), notify=False)       # changed while pyproxy cannot see
        until = time.monotonic() + 3.0
        while time.monotonic() < until:                         # every new session still served
            assert greeting(port) == b"one\n"
            time.sleep(0.1)
        wait_until(lambda: "gateway cluster process: " in p.log_text() and "trying again with a backoff"
                   in p.log_text(), what="the failure logged")
        api.start()
        wait_until(lambda: greeting(port) == b"two\n", timeout=40, what="catching up with the API server")
        payload = pattern_bytes(1 << 20)
        assert echoed_digest(before, payload) == hashlib.sha256(payload).hexdigest()
    p.wait_log("every kind listed again after the API server failed", timeout=40)
    assert p.log_text().count("cannot reach the API server: Connection refused; trying again") == 1


def test_only_the_lease_holder_writes_statuses(api, cluster, proxy, tmp_path):
    port, _, _ = cluster
    first_dir, second_dir = tmp_path / "a", tmp_path / "b"
    first_dir.mkdir()
    second_dir.mkdir()
    kube = kubeconfig(tmp_path, api.port)
    a = proxy(config(kube, runtime=str(first_dir / "run")))
    wait_until(lambda: conditions(api.get("TCPRoute", "echo")).get("Accepted") == "Accepted", timeout=15,
               what="the first replica's status write")
    # The second replica: its own address (a replica of its own), the same Lease.
    from tests.support import Proxy
    b = Proxy(second_dir, config(kube, address="127.0.0.2", runtime=str(second_dir / "run")))
    b.start()
    try:
        wait_until(lambda: reached(port) == b"one\n" and _greeting_at("127.0.0.2", port) == b"one\n",
                   timeout=15, what="both replicas serving")
        api.apply(tcp_route("echo", "missing"))             # a new status: ResolvedRefs BackendNotFound
        wait_until(lambda: conditions(api.get("TCPRoute", "echo")).get("ResolvedRefs") == "BackendNotFound",
                   timeout=10, what="the changed status")
        assert "holding the Lease" in a.log_text()
        assert "wrote the status of TCPRoute default/echo" in a.log_text()
        assert "holding the Lease" not in b.log_text() and "wrote the status" not in b.log_text()
        lease = api.get("Lease", "pyproxy-gateway")
        assert lease is not None and lease["spec"]["holderIdentity"].endswith(f"_{a.pid}")

        # The leader stops: it releases the Lease, the other replica takes it and writes.
        a.stop()
        wait_until(lambda: "holding the Lease" in b.log_text(), timeout=10, what="the second replica leading")
        api.apply(tcp_route("echo", "one"))
        wait_until(lambda: conditions(api.get("TCPRoute", "echo")).get("ResolvedRefs") == "ResolvedRefs",
                   timeout=10, what="the second replica's status write")
        assert api.get("Lease", "pyproxy-gateway")["spec"]["leaseTransitions"] == 1
    finally:
        b.stop()


def _greeting_at(host: str, port: int) -> bytes | None:
    """The backend a new session on host:port reaches; None while nothing listens there."""
    try:
        with connect(port, host=host, timeout=5) as client:
            return recv_line(client)
    except ConnectionRefusedError:
        return None


def reached(port: int) -> bytes | None:
    return _greeting_at("127.0.0.1", port)
