"""Client certificates per route: `services[].routes[].ssl.client_certificate` (issue 19).

The route is chosen from the ClientHello (SNI, ALPN, addresses) before the handshake, so the
handshake asks for the certificate that route wants, verified against its CA; routes without one
are left as the top-level `ssl.client_certificate` says."""

from __future__ import annotations

import pytest

from tests.integration.test_tls_client_certificates import PrivateCA, exchange, fingerprint, subject
from tests.support import free_port, make_cert, recv_line, tag_handler


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    d = tmp_path_factory.mktemp("route-pki")
    ours, theirs = PrivateCA(d, "ours-ca"), PrivateCA(d, "theirs-ca")
    return {
        "server": make_cert(d, "mtls.example", ["*.mtls.example"]),
        "ours": ours, "theirs": theirs,
        "alice": ours.issue("alice"),
        "bob": theirs.issue("bob"),
    }


def config(port: int, pki, up: int, top: str = "") -> str:
    return f"""
stream_listen:
  - 127.0.0.1:{port} ssl
access_log_format: '$status $route $ssl_client_verify "$ssl_client_s_dn" $ssl_client_fingerprint'
{top}
certificates:
  - {{cert: {pki['server'][0]}, key: {pki['server'][1]}}}
services:
  - name: app
    host: 127.0.0.1
    port: {up}
    routes:
      - name: open
        protocols: [tls]
        snis: [open.mtls.example]
      - name: ours
        protocols: [tls]
        snis: [ours.mtls.example]
        ssl:
          client_certificate: {{ca: {pki['ours'].crt}, verify: on}}
      - name: theirs
        protocols: [tls]
        snis: [theirs.mtls.example]
        ssl:
          client_certificate: {{ca: {pki['theirs'].crt}, verify: optional}}
"""


def test_each_route_asks_for_its_own_certificate(proxy, upstreams, pki):
    up = upstreams(tag_handler, name="app")
    port = free_port()
    p = proxy(config(port, pki, up.port))
    assert exchange(port, None, "open.mtls.example") == b"app\n"          # not asked
    assert exchange(port, pki["alice"], "ours.mtls.example") == b"app\n"
    assert exchange(port, None, "ours.mtls.example") == b""               # verify: on
    assert exchange(port, pki["bob"], "ours.mtls.example") == b""         # another CA's
    assert exchange(port, pki["bob"], "theirs.mtls.example") == b"app\n"
    assert exchange(port, None, "theirs.mtls.example") == b"app\n"        # verify: optional
    assert exchange(port, pki["alice"], "theirs.mtls.example") == b""
    alice, bob = pki["alice"], pki["bob"]
    assert sorted(p.wait_access(7)) == sorted([
        '200 open NONE "-" -',
        f'200 ours SUCCESS "{subject(alice)}" {fingerprint(alice)}',
        '400 ours NONE "-" -',
        '400 ours FAILED:unable to get local issuer certificate "-" -',
        f'200 theirs SUCCESS "{subject(bob)}" {fingerprint(bob)}',
        '200 theirs NONE "-" -',
        '400 theirs FAILED:unable to get local issuer certificate "-" -',
    ])


def test_a_routes_certificate_replaces_the_top_level_one(proxy, upstreams, pki):
    """Top level: ours, required. The `theirs` route asks for theirs (optional) instead; `open`
    keeps the top-level one."""
    up = upstreams(tag_handler, name="app")
    port = free_port()
    p = proxy(config(port, pki, up.port, f"ssl:\n  client_certificate: {{ca: {pki['ours'].crt}}}"))
    assert exchange(port, None, "open.mtls.example") == b""
    assert exchange(port, pki["alice"], "open.mtls.example") == b"app\n"
    assert exchange(port, None, "theirs.mtls.example") == b"app\n"
    assert exchange(port, pki["bob"], "theirs.mtls.example") == b"app\n"
    lines = p.wait_access(4)
    assert sorted(line.split(" ")[:3] for line in lines) == sorted([
        ["400", "open", "NONE"], ["200", "open", "SUCCESS"],
        ["200", "theirs", "NONE"], ["200", "theirs", "SUCCESS"]])


def test_a_session_resumed_on_one_route_is_not_resumed_on_another(proxy, upstreams, pki):
    """Two routes for the same name, on two ports: a ticket from the one that asks nothing must not
    let a client skip the other's check (a resumed session is not asked for a certificate). Each
    route's contexts have their own ticket keys: the second port makes a full handshake."""
    import socket
    import ssl

    up = upstreams(tag_handler, name="app")
    open_port, ours_port = free_port(), free_port()
    proxy(f"""
stream_listen:
  - 127.0.0.1:{open_port} ssl
  - 127.0.0.1:{ours_port} ssl
certificates:
  - {{cert: {pki['server'][0]}, key: {pki['server'][1]}}}
services:
  - name: app
    host: 127.0.0.1
    port: {up.port}
    routes:
      - name: open
        protocols: [tls]
        snis: [same.mtls.example]
        destinations: [{{port: {open_port}}}]
      - name: ours
        protocols: [tls]
        snis: [same.mtls.example]
        destinations: [{{port: {ours_port}}}]
        ssl:
          client_certificate: {{ca: {pki['ours'].crt}, verify: on}}
""")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE

    def visit(port, session=None):
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, \
                ctx.wrap_socket(raw, server_hostname="same.mtls.example", session=session) as sock:
            try:
                answer = recv_line(sock)
            except (ssl.SSLError, ConnectionResetError):
                answer = b""
            return answer, sock.session, sock.session_reused

    answer, session, _ = visit(open_port)
    assert answer == b"app\n"
    assert visit(open_port, session)[::2] == (b"app\n", True)         # resumable where it was made
    assert visit(ours_port, session)[::2] == (b"", False)             # not there


def test_routes_match_on_the_verified_certificates_subject_or_san(proxy, upstreams, pki, tmp_path):
    """client_identities: the route is chosen again after the handshake, knowing the certificate;
    a certificate no route names goes to the route without client_identities, and where there is
    none, the session ends with 404."""
    ours = pki["ours"]
    carol = make_cert(tmp_path, "carol", ["carol.clients.example"], ca=(ours.crt, ours.key))
    dave = ours.issue("dave")
    ups = {name: upstreams(tag_handler, name=name) for name in ("alice", "carol", "anyone")}
    port = free_port()
    p = proxy(f"""
stream_listen:
  - 127.0.0.1:{port} ssl
access_log_format: '$status $route $ssl_client_verify'
ssl:
  client_certificate: {{ca: {ours.crt}, verify: optional}}
certificates:
  - {{cert: {pki['server'][0]}, key: {pki['server'][1]}}}
services:
  - name: alice
    host: 127.0.0.1
    port: {ups['alice'].port}
    routes:
      - name: alice
        protocols: [tls]
        snis: [app.mtls.example, strict.mtls.example]
        client_identities: ["{subject(pki['alice'])}"]
  - name: carol
    host: 127.0.0.1
    port: {ups['carol'].port}
    routes:
      - name: carol
        protocols: [tls]
        snis: [app.mtls.example]
        client_identities: ["DNS:carol.clients.example"]
  - name: anyone
    host: 127.0.0.1
    port: {ups['anyone'].port}
    routes:
      - name: anyone
        protocols: [tls]
        snis: [app.mtls.example]
""")
    assert exchange(port, pki["alice"], "app.mtls.example") == b"alice\n"
    assert exchange(port, carol, "app.mtls.example") == b"carol\n"
    assert exchange(port, dave, "app.mtls.example") == b"anyone\n"
    assert exchange(port, None, "app.mtls.example") == b"anyone\n"
    assert exchange(port, pki["alice"], "strict.mtls.example") == b"alice\n"
    assert exchange(port, dave, "strict.mtls.example") == b""
    assert sorted(p.wait_access(6)) == sorted(["200 alice SUCCESS", "200 carol SUCCESS", "200 anyone SUCCESS",
                                "200 anyone NONE", "200 alice SUCCESS", "404 - SUCCESS"])
    p.wait_log("no route matched the client certificate")
    assert ups["alice"].connections == 2 and ups["anyone"].connections == 2


def test_a_certificate_verified_for_one_route_is_not_taken_for_a_route_trusting_another_ca(
        proxy, upstreams, pki):
    """`ours` (its own CA, client_identities alice) wins before the handshake; dave's certificate,
    verified against ours' CA, names nobody, and the fallback trusts another CA: refused."""
    up = upstreams(tag_handler, name="app")
    dave = pki["ours"].issue("dave2")
    port = free_port()
    p = proxy(f"""
stream_listen:
  - 127.0.0.1:{port} ssl
access_log_format: '$status $route $ssl_client_verify'
certificates:
  - {{cert: {pki['server'][0]}, key: {pki['server'][1]}}}
services:
  - name: app
    host: 127.0.0.1
    port: {up.port}
    routes:
      - name: ours
        protocols: [tls]
        snis: [x.mtls.example]
        client_identities: ["{subject(pki['alice'])}"]
        ssl:
          client_certificate: {{ca: {pki['ours'].crt}}}
      - name: theirs
        protocols: [tls]
        snis: [x.mtls.example]
        ssl:
          client_certificate: {{ca: {pki['theirs'].crt}}}
""")
    assert exchange(port, pki["alice"], "x.mtls.example") == b"app\n"
    assert exchange(port, dave, "x.mtls.example") == b""
    assert sorted(p.wait_access(2)) == sorted(["200 ours SUCCESS", "404 - SUCCESS"])
    p.wait_log('route "theirs" matches the client certificate, but it asks for another client certificate '
               'than route "ours"')
    assert up.connections == 1
