"""Clients that send no SNI, or one no certificate names, on a terminating listener without
`ssl.default_certificate`: they get the first certificate, as nginx serves its first (issue 19)."""

from __future__ import annotations

import socket
import subprocess

import pytest

from tests.support import (
    Upstream,
    free_port,
    make_cert,
    peer_common_name,
    recv_all,
    recv_line,
    s_client_lines,
    tag_handler,
    tls_client,
)


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    d = tmp_path_factory.mktemp("certs")
    return {
        "first": make_cert(d, "first.example", ["first.example"]),
        "second": make_cert(d, "second.example", ["second.example"]),
    }


def http_handler(conn: socket.socket, up: Upstream) -> None:
    """A one-request HTTP server: answers the request line it got."""
    request = recv_line(conn)
    body = b"upstream saw " + request.strip() + b"\n"
    conn.sendall(b"HTTP/1.0 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))


def no_default_config(port: int, certs, up_port: int, snis: str = "", log_level: str = "info") -> str:
    """Two certificates, no ssl.default_certificate, one terminating route. Without `snis` it
    matches by the listener's port (Kong's rules want sources, destinations or snis on a tls
    route): the route a session without SNI can match."""
    match = snis or f"        destinations: [{{port: {port}}}]"
    return f"""
log_level: {log_level}
stream_listen:
  - 127.0.0.1:{port} ssl
certificates:
  - {{cert: {certs['first'][0]}, key: {certs['first'][1]}}}
  - {{cert: {certs['second'][0]}, key: {certs['second'][1]}}}
services:
  - name: web
    host: 127.0.0.1
    port: {up_port}
    routes:
      - name: web-route
        protocols: [tls]
{match}
"""


def test_curl_to_an_ip_url_gets_the_first_certificate_and_the_upstream(proxy, upstreams, certs):
    up = upstreams(http_handler)
    port = free_port()
    p = proxy(no_default_config(port, certs, up.port))
    result = subprocess.run(["curl", "-k", "-sS", "--max-time", "10", "-w", "\n%{http_code}",
                             f"https://127.0.0.1:{port}/path"], capture_output=True, text=True, timeout=20)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "upstream saw GET /path HTTP/1.1\n\n200"
    assert " 200 " in p.wait_access(1)[0]


def test_openssl_s_client_without_servername_gets_the_first_certificate(proxy, upstreams, certs):
    up = upstreams(tag_handler, name="tagged")
    port = free_port()
    proxy(no_default_config(port, certs, up.port))
    lines = s_client_lines(port, b"tagged\n", "-noservername")
    assert b"subject=CN = first.example\n" in lines
    assert b"tagged\n" in lines


def test_python_client_without_sni_and_with_an_unknown_sni(proxy, upstreams, certs):
    up = upstreams(tag_handler, name="tagged")
    port = free_port()
    proxy(no_default_config(port, certs, up.port))
    for name in (None, "nobody.example"):
        with tls_client(port, name) as sock:
            assert peer_common_name(sock) == "first.example"
            assert recv_line(sock) == b"tagged\n"
    with tls_client(port, "second.example") as sock:           # a named certificate still wins
        assert peer_common_name(sock) == "second.example"


def test_unmatched_sni_gets_a_handshake_then_404(proxy, upstreams, certs):
    """What the README promises: a client whose SNI matches no route gets a certificate and a
    handshake, then the close; nothing reaches an upstream."""
    up = upstreams(tag_handler)
    port = free_port()
    p = proxy(no_default_config(port, certs, up.port, snis="        snis: [second.example]"))
    for name in (None, "nobody.example"):
        with tls_client(port, name) as sock:
            assert peer_common_name(sock) == "first.example"
            assert recv_all(sock) == b""
    lines = p.wait_access(2)
    assert all(" 404 " in line for line in lines), lines
    assert up.connections == 0


def test_t_says_which_certificate_clients_without_a_matching_name_get(proxy, certs):
    p = proxy(no_default_config(free_port(), certs, free_port()), start=False)
    result = p.run_cli("-t")
    assert result.returncode == 0, result.stderr
    notice = (f"pyproxy: [notice] no ssl.default_certificate: clients without a matching server name get "
              f"{certs['first'][0]} (the first certificate)")
    assert result.stderr.splitlines().count(notice) == 1, result.stderr
    # With a default certificate, nothing to say.
    cert, key = certs["second"]
    p.write_config(no_default_config(free_port(), certs, free_port()) +
                   f"ssl: {{default_certificate: {{cert: {cert}, key: {key}}}}}\n")
    assert "[notice]" not in p.run_cli("-t").stderr


def test_a_client_no_certificate_suits_is_one_plain_notice(proxy, upstreams, certs):
    """The certificates are ECDSA; a client that accepts only RSA signatures gets none it can use.
    The error log says so at `notice`, in words, not OpenSSL's reason alone at info."""
    up = upstreams(tag_handler)
    port = free_port()
    p = proxy(no_default_config(port, certs, up.port, log_level="notice"))
    subprocess.run(["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-servername", "second.example",
                    "-sigalgs", "RSA-PSS+SHA256:RSA+SHA256"], input=b"", capture_output=True, timeout=20)
    log = p.wait_log("no certificate for SNI second.example that the client can use")
    line = next(line for line in log.splitlines() if "no certificate for SNI" in line)
    assert "[notice]" in line and "set ssl.default_certificate or add one for it" in line, line
    assert " 400 " in p.wait_access(1)[0]
    assert up.connections == 0
