"""The seed (Kong's "Proxy TCP requests" how-to), both tabs applied, translated from
examples/gateway/: the statuses its `kubectl get` checks read, and a configuration pyproxy's own
validator accepts that routes port 9000 and SNI tls9443.kong.example on 9443 to the echo Service."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest
import yaml

from pyproxy.gateway import Options, Translation, translate_paths
from pyproxy.router import Router
from tests.support import make_cert
from tests.unit.test_gateway_translate import conditions, load

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "gateway"
GROUP = "gateway.networking.k8s.io"


def seed_secret(folder: Path) -> Path:
    """The how-to's Secret: a certificate for CN/SAN kong.example (Kong's add-certificate.md) stored
    as the kubernetes.io/tls Secret tls9443.kong.example, as `kubectl create secret tls` writes it."""
    crt, key = make_cert(folder, "kong.example", ["kong.example"])
    secret = {"apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/tls",
              "metadata": {"name": "tls9443.kong.example", "namespace": "default"},
              "data": {"tls.crt": base64.b64encode(crt.read_bytes()).decode(),
                       "tls.key": base64.b64encode(key.read_bytes()).decode()}}
    path = folder / "secret.yaml"
    path.write_text(yaml.safe_dump(secret))
    return path


@pytest.fixture
def seed(tmp_path) -> Translation:
    paths = [str(EXAMPLES / "seed.yaml"), str(EXAMPLES / "echo-loopback.yaml"), str(seed_secret(tmp_path))]
    return translate_paths(paths, Options(runtime_dir=str(tmp_path / "run")))


def test_seed_routes_are_accepted(seed):
    assert seed.notices == []
    routes = (("TCPRoute", "echo-plaintext", "stream9000"), ("TLSRoute", "echo-tls", "stream9443"))
    for kind, name, section in routes:
        [entry] = seed.statuses[(kind, "default", name)]["parents"]
        assert entry["parentRef"] == {"group": GROUP, "kind": "Gateway", "name": "kong",
                                      "sectionName": section}
        assert entry["controllerName"] == "gateway.pyproxy.dev/controller"
        assert conditions(entry["conditions"]) == {"Accepted": ("True", "Accepted"),
                                                   "ResolvedRefs": ("True", "ResolvedRefs")}
    # What the how-to's `kubectl get tcproute echo-plaintext -ojsonpath=...` prints, but for the
    # lastTransitionTime the status writer stamps.
    [entry] = seed.statuses[("TCPRoute", "default", "echo-plaintext")]["parents"]
    assert [c for c in entry["conditions"] if c["reason"] == "Accepted"] == [
        {"type": "Accepted", "status": "True", "reason": "Accepted", "message": "", "observedGeneration": 1}]


def test_seed_gateway_listeners(seed):
    status = seed.statuses[("Gateway", "default", "kong")]
    listeners = {item["name"]: item for item in status["listeners"]}
    ok = {"Accepted": ("True", "Accepted"), "ResolvedRefs": ("True", "ResolvedRefs"),
          "Programmed": ("True", "Programmed"), "Conflicted": ("False", "NoConflicts")}
    assert conditions(listeners["stream9000"]["conditions"]) == ok
    assert conditions(listeners["stream9443"]["conditions"]) == ok
    assert listeners["stream9000"]["supportedKinds"] == [{"group": GROUP, "kind": "TCPRoute"}]
    assert listeners["stream9443"]["supportedKinds"] == [{"group": GROUP, "kind": "TLSRoute"},
                                                         {"group": GROUP, "kind": "TCPRoute"}]
    assert listeners["stream9000"]["attachedRoutes"] == listeners["stream9443"]["attachedRoutes"] == 1
    # Kong's own `proxy` HTTP listener, from the how-to's prerequisites: not pyproxy's to serve.
    assert conditions(listeners["proxy"]["conditions"])["Accepted"] == ("False", "UnsupportedProtocol")
    assert listeners["proxy"]["supportedKinds"] == []
    assert conditions(status["conditions"]) == {"Accepted": ("True", "ListenersNotValid"),
                                                "Programmed": ("True", "Programmed")}
    assert conditions(seed.statuses[("GatewayClass", "", "kong")]["conditions"])["Accepted"] == (
        "True", "Accepted")


def test_seed_entities(seed):
    entities = seed.entities
    assert entities["stream_listen"] == ["0.0.0.0:9000", "0.0.0.0:9443 ssl"]
    # The listener's Secret on its port, the TCPIngress's (the same Secret: one file) on every listener.
    listener_certificate, ingress_certificate = entities["certificates"]
    assert listener_certificate["snis"] == ingress_certificate["snis"] == ["tls9443.kong.example"]
    assert listener_certificate["listen"] == [9443] and "listen" not in ingress_certificate
    assert listener_certificate["cert"] == ingress_certificate["cert"]
    assert entities["upstreams"] == [{"name": "k8s.default.echo.1025",
                                      "targets": [{"target": "127.0.0.1:1025", "weight": 100}]}]
    routes = {r["name"]: (svc["host"], r) for svc in entities["services"] for r in svc["routes"]}
    assert routes == {
        "tcproute.default.echo-plaintext.0.stream9000": ("k8s.default.echo.1025", {
            "name": "tcproute.default.echo-plaintext.0.stream9000", "protocols": ["tcp"],
            "destinations": [{"port": 9000}]}),
        "tlsroute.default.echo-tls.0.stream9443": ("k8s.default.echo.1025", {
            "name": "tlsroute.default.echo-tls.0.stream9443", "protocols": ["tls"],
            "destinations": [{"port": 9443}], "snis": ["tls9443.kong.example"]}),
        # KIC's translation of the TCPIngresses: route <namespace>.<name>.<rule>, protocols tcp+tls.
        "default.echo-plaintext.0": ("k8s.default.echo.1025", {
            "name": "default.echo-plaintext.0", "protocols": ["tcp"], "destinations": [{"port": 9000}]}),
        "default.echo-tls.0": ("k8s.default.echo.1025", {
            "name": "default.echo-tls.0", "protocols": ["tcp", "tls"], "destinations": [{"port": 9443}],
            "snis": ["tls9443.kong.example"]}),
    }


def test_seed_configuration_validates_and_routes(tmp_path, seed):
    config = load(tmp_path, seed)
    assert [(str(listen), listen.ssl) for listen in config.stream_listen] == [("0.0.0.0:9000", False),
                                                                             ("0.0.0.0:9443", True)]
    assert config.certificates[0].snis == ("tls9443.kong.example",)
    router = Router(config.routes, config.stream_listen)
    plain = router.for_listener(config.stream_listen[0]).match("192.0.2.1", 40000, "192.0.2.3", 9000)
    secure = router.for_listener(config.stream_listen[1]).match("192.0.2.1", 40000, "192.0.2.3", 9443,
                                                               "tls9443.kong.example")
    assert plain is not None and config.service(plain.service).upstream == "k8s.default.echo.1025"
    assert secure is not None and secure.protocols == ("tls",)     # terminated, as the how-to says
    assert config.service(secure.service).upstream == "k8s.default.echo.1025"
