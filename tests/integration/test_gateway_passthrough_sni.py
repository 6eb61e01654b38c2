"""TLS passthrough listeners sharing a port, run by a real pyproxy in gateway file mode (issue 17, gaps
9.2 c, d, f): which real TLS backend answers for which SNI, and which SNIs are refused (GW "Listener
Isolation", conformance `listener-isolation`; a listener and a TLSRoute without hostname take every
other client, those without SNI too)."""

from __future__ import annotations

import ssl

import pytest

from tests.integration.test_gateway_file_source import CLASS_AND_GATEWAY, listener, service
from tests.support import free_port, make_cert, recv_line, tag_handler, tls_client, tls_handler_for

PASSTHROUGH = ", tls: {mode: Passthrough}"


def tls_route(name: str, section: str, backend: str, hostnames: list[str]) -> str:
    written = f"\n  hostnames: [{', '.join(hostnames)}]" if hostnames else ""
    return f"""\
apiVersion: gateway.networking.k8s.io/v1alpha2
kind: TLSRoute
metadata: {{name: {name}, namespace: default}}
spec:
  parentRefs: [{{name: edge, sectionName: {section}}}]
  rules: [{{backendRefs: [{{name: {backend}, port: 1025}}]}}]{written}
"""


@pytest.fixture
def gateway_port(proxy, upstreams, tmp_path):
    """A port with four Passthrough listeners: `*.example.com` (a route for all of it, backend `wild`),
    `*.foo.example.com` (a route for `a.foo.example.com` only, backend `foo`), `abc.example.com` (no
    route) and one without hostname (a route without hostnames, backend `any`); each backend a TLS
    server that says its name."""
    folder = tmp_path / "manifests"
    folder.mkdir()
    port = free_port()
    listeners = [listener("wild", port, "TLS", f", hostname: '*.example.com'{PASSTHROUGH}"),
                 listener("foo", port, "TLS", f", hostname: '*.foo.example.com'{PASSTHROUGH}"),
                 listener("exact", port, "TLS", f", hostname: abc.example.com{PASSTHROUGH}"),
                 listener("any", port, "TLS", PASSTHROUGH)]
    (folder / "gateway.yaml").write_text(CLASS_AND_GATEWAY.format(listeners="\n".join(listeners)))
    documents = [tls_route("wild", "wild", "wild", ["'*.example.com'"]),
                 tls_route("foo", "foo", "foo", ["a.foo.example.com"]),
                 tls_route("any", "any", "any", [])]
    for name in ("wild", "foo", "any"):
        cert = make_cert(tmp_path, name, [f"{name}.backend.test"])
        documents.append(service(name, upstreams(tls_handler_for(cert, tag_handler), name=name).port))
    (folder / "routes.yaml").write_text("---\n".join(documents))
    p = proxy(f"""
        gateway:
          paths: [{folder}]
          address: 127.0.0.1
        """)
    assert "no traffic" not in p.log_text()
    return port, p


def answer(port: int, sni: str | None) -> bytes:
    """The name the backend says through a TLS session made end to end with it."""
    with tls_client(port, sni) as client:
        return recv_line(client)


@pytest.mark.parametrize(("sni", "backend"), [
    ("b.example.com", b"wild\n"),
    ("x.y.example.com", b"wild\n"),
    ("a.foo.example.com", b"foo\n"),        # its listener's wildcard has more labels than `*.example.com`
    ("x.example.org", b"any\n"),
    (None, b"any\n"),                       # no SNI: the listener without hostname
])
def test_each_sni_reaches_the_backend_of_its_most_specific_listener(gateway_port, sni, backend):
    port, p = gateway_port
    assert answer(port, sni) == backend
    [line] = p.wait_access(1)
    assert " tls_passthrough 200 " in line


@pytest.mark.parametrize("sni", ["abc.example.com", "b.foo.example.com"])
def test_an_sni_whose_listener_has_no_route_for_it_is_refused(gateway_port, sni):
    """Not passed on to `*.example.com`'s route nor to the listener without hostname: the connection is
    closed without a TLS alert (the conformance accepts EOF or a reset only)."""
    port, p = gateway_port
    with pytest.raises((ssl.SSLEOFError, ConnectionResetError)):
        answer(port, sni)
    [line] = p.wait_access(1)
    assert " tls_passthrough 502 " in line and "gateway_listener-isolation" in line
    assert "[error]" not in p.log_text()        # a refusal by design, logged at info level
