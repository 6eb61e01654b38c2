"""ALPN on `ssl` listeners (issue 19): routes that match the ClientHello's ALPN list (`alpn`), the
protocols a terminating handshake selects from (`ssl.alpn`), `$ssl_alpn_protocol`; `curl --http2`
through pyproxy to a real nginx speaking HTTP/2."""

from __future__ import annotations

import shutil
import socket
import ssl
import subprocess
import textwrap
import time

import pytest

from tests.support import free_port, make_cert, recv_line, tag_handler, tls_handler_for, wait_until


@pytest.fixture(scope="module")
def cert(tmp_path_factory):
    return make_cert(tmp_path_factory.mktemp("alpn-certs"), "alpn.test", ["alpn.test", "*.alpn.test"])


def hello(port: int, alpn: list[str] | None, server_name: str = "alpn.test") -> tuple[bytes, str | None]:
    """(the first line read through pyproxy, the ALPN protocol pyproxy's handshake selected) for a
    client offering `alpn`; b"" when the session was refused."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    if alpn:
        ctx.set_alpn_protocols(alpn)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        try:
            with ctx.wrap_socket(raw, server_hostname=server_name) as tls:
                return recv_line(tls), tls.selected_alpn_protocol()
        except (ssl.SSLError, ConnectionResetError):
            return b"", None


def routes_config(port: int, cert, h2: int, other: int, protocol: str, ssl_settings: str = "") -> str:
    return f"""
stream_listen:
  - 127.0.0.1:{port} ssl
access_log_format: '$status $route $ssl_alpn_protocol'
{ssl_settings}
certificates:
  - {{cert: {cert[0]}, key: {cert[1]}}}
services:
  - name: h2
    host: 127.0.0.1
    port: {h2}
    routes:
      - name: h2
        protocols: [{protocol}]
        snis: [alpn.test]
        alpn: [h2, h2c]
  - name: other
    host: 127.0.0.1
    port: {other}
    routes:
      - name: other
        protocols: [{protocol}]
        snis: [alpn.test]
"""


def test_passthrough_routes_on_the_alpn_list(proxy, upstreams, cert):
    """A route with `alpn` takes the clients that offer one of its protocols (anywhere in their
    list); with the same SNI, it is more specific than the route without."""
    h2 = upstreams(tls_handler_for(cert, tag_handler), name="h2")
    other = upstreams(tls_handler_for(cert, tag_handler), name="other")
    port = free_port()
    p = proxy(routes_config(port, cert, h2.port, other.port, "tls_passthrough"))
    assert hello(port, ["h2", "http/1.1"])[0] == b"h2\n"
    assert hello(port, ["http/1.1", "h2c"])[0] == b"h2\n"
    assert hello(port, ["http/1.1"])[0] == b"other\n"
    assert hello(port, None)[0] == b"other\n"
    assert sorted(p.wait_access(4)) == sorted(["200 h2 -", "200 h2 -", "200 other -", "200 other -"])


def test_terminating_routes_on_the_alpn_list_and_selects_from_ssl_alpn(proxy, upstreams, cert):
    h2 = upstreams(tag_handler, name="h2")
    other = upstreams(tag_handler, name="other")
    port = free_port()
    p = proxy(routes_config(port, cert, h2.port, other.port, "tls", "ssl:\n  alpn: [h2, http/1.1]"))
    assert hello(port, ["http/1.1", "h2"]) == (b"h2\n", "h2")            # ours are preferred in our order
    assert hello(port, ["http/1.1"]) == (b"other\n", "http/1.1")
    assert hello(port, ["spdy/3"]) == (b"other\n", None)                # nothing in common: no ALPN
    assert hello(port, None) == (b"other\n", None)
    assert sorted(p.wait_access(4)) == sorted(["200 h2 h2", "200 other http/1.1", "200 other -",
                                               "200 other -"])


def test_without_ssl_alpn_a_terminating_handshake_selects_none(proxy, upstreams, cert):
    h2 = upstreams(tag_handler, name="h2")
    other = upstreams(tag_handler, name="other")
    port = free_port()
    p = proxy(routes_config(port, cert, h2.port, other.port, "tls"))
    assert hello(port, ["h2", "http/1.1"]) == (b"h2\n", None)            # routed on it all the same
    assert p.wait_access(1) == ["200 h2 -"]


def test_alpn_ranks_after_the_sni_match(proxy, upstreams, cert):
    """Through the route index (more than one candidate): an exact SNI still beats a wildcard with
    `alpn`; among the wildcard's routes the one with `alpn` wins when it matches."""
    acme = upstreams(tls_handler_for(cert, tag_handler), name="acme")
    other = upstreams(tls_handler_for(cert, tag_handler), name="other")
    port = free_port()
    p = proxy(f"""
stream_listen:
  - 127.0.0.1:{port} ssl
access_log_format: '$status $route'
services:
  - name: acme
    host: 127.0.0.1
    port: {acme.port}
    routes:
      - name: acme
        protocols: [tls_passthrough]
        snis: ["*.alpn.test"]
        alpn: [acme-tls/1]
  - name: other
    host: 127.0.0.1
    port: {other.port}
    routes:
      - name: other
        protocols: [tls_passthrough]
        snis: [www.alpn.test]
      - name: other-wildcard
        protocols: [tls_passthrough]
        snis: ["*.alpn.test"]
""")
    assert hello(port, ["acme-tls/1"], "www.alpn.test")[0] == b"other\n"
    assert hello(port, ["acme-tls/1"], "x.alpn.test")[0] == b"acme\n"
    assert hello(port, ["h2"], "x.alpn.test")[0] == b"other\n"
    assert sorted(p.wait_access(3)) == sorted(["200 other", "200 acme", "200 other-wildcard"])


def test_an_alpn_list_of_10000_entries_costs_only_its_session(proxy, upstreams, cert):
    """10,000 protocols (30 KB, two records): routed within the preread's bounds like any other
    hello, and the next client is served at once."""
    h2 = upstreams(tag_handler, name="h2")
    other = upstreams(tag_handler, name="other")
    port = free_port()
    p = proxy(routes_config(port, cert, h2.port, other.port, "tls", "ssl:\n  alpn: [h2, http/1.1]"))
    started = time.monotonic()
    assert hello(port, [f"x{i}" for i in range(9999)] + ["h2"]) == (b"h2\n", "h2")
    assert hello(port, ["h2"] * 10000) == (b"h2\n", "h2")
    assert hello(port, ["x"] * 10000) == (b"other\n", None)
    assert hello(port, ["http/1.1"]) == (b"other\n", "http/1.1")
    assert time.monotonic() - started < 5
    assert sorted(p.wait_access(4)) == sorted(["200 h2 h2", "200 h2 h2", "200 other -", "200 other http/1.1"])


@pytest.mark.skipif(not (shutil.which("nginx") and shutil.which("curl")), reason="nginx and curl")
def test_curl_http2_negotiates_h2_through_pyproxy_to_nginx(proxy, cert, tmp_path):
    """curl --http2 → pyproxy (TLS, ALPN h2) → nginx's HTTP/2 over plain TCP (prior knowledge)."""
    nginx_port, port = free_port(), free_port()
    nginx_conf = tmp_path / "nginx.conf"
    nginx_conf.write_text(textwrap.dedent(f"""
        daemon off;
        worker_processes 1;
        pid {tmp_path}/nginx.pid;
        error_log {tmp_path}/nginx-error.log;
        events {{ worker_connections 64; }}
        http {{
            access_log off;
            client_body_temp_path {tmp_path};
            proxy_temp_path {tmp_path};
            fastcgi_temp_path {tmp_path};
            uwsgi_temp_path {tmp_path};
            scgi_temp_path {tmp_path};
            server {{
                listen 127.0.0.1:{nginx_port} http2;
                location / {{ return 200 "nginx saw $server_protocol\\n"; }}
            }}
        }}
    """))
    p = proxy(f"""
stream_listen:
  - 127.0.0.1:{port} ssl
access_log_format: '$status $route $ssl_alpn_protocol'
ssl:
  alpn: [h2, http/1.1]
certificates:
  - {{cert: {cert[0]}, key: {cert[1]}}}
services:
  - name: web
    host: 127.0.0.1
    port: {nginx_port}
    routes:
      - name: web
        protocols: [tls]
        snis: [alpn.test]
        alpn: [h2]
""")
    nginx = subprocess.Popen(["nginx", "-c", str(nginx_conf)], stderr=subprocess.PIPE)
    try:
        def served():
            with socket.socket() as probe:
                return probe.connect_ex(("127.0.0.1", nginx_port)) == 0
        wait_until(served, 10, what="nginx")
        result = subprocess.run(["curl", "-sS", "-v", "-k", "--http2", "--max-time", "10",
                                 "--resolve", f"alpn.test:{port}:127.0.0.1", f"https://alpn.test:{port}/"],
                                capture_output=True, text=True, timeout=30)
    finally:
        nginx.terminate()
        nginx.wait(10)
    assert result.stdout == "nginx saw HTTP/2.0\n", result.stderr
    assert "ALPN: server accepted h2" in result.stderr or "ALPN, server accepted to use h2" in result.stderr
    assert p.wait_access(1) == ["200 web h2"]


def test_a_routes_ssl_alpn_replaces_the_top_level_one(proxy, upstreams, cert):
    """The route is chosen before the handshake: its own `ssl.alpn` is what that handshake selects
    from (a database route selects postgresql, the web route h2, on one port)."""
    web = upstreams(tag_handler, name="web")
    db = upstreams(tag_handler, name="db")
    port = free_port()
    p = proxy(f"""
stream_listen:
  - 127.0.0.1:{port} ssl
access_log_format: '$status $route $ssl_alpn_protocol'
ssl:
  alpn: [h2, http/1.1]
certificates:
  - {{cert: {cert[0]}, key: {cert[1]}}}
services:
  - name: web
    host: 127.0.0.1
    port: {web.port}
    routes:
      - name: web
        protocols: [tls]
        snis: [www.alpn.test]
  - name: db
    host: 127.0.0.1
    port: {db.port}
    routes:
      - name: db
        protocols: [tls]
        snis: [db.alpn.test]
        ssl:
          alpn: [postgresql]
""")
    assert hello(port, ["h2", "postgresql"], "www.alpn.test") == (b"web\n", "h2")
    assert hello(port, ["h2", "postgresql"], "db.alpn.test") == (b"db\n", "postgresql")
    assert hello(port, ["h2"], "db.alpn.test") == (b"db\n", None)
    assert sorted(p.wait_access(3)) == sorted(["200 web h2", "200 db postgresql", "200 db -"])
