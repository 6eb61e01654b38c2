"""TLS towards upstreams resumes sessions: one full handshake per peer and worker, not one per
connection (issue 19)."""

from __future__ import annotations

import socket
import ssl

import pytest

from tests.support import Upstream, connect, echo, free_port, make_ca, make_cert, recv_line


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    d = tmp_path_factory.mktemp("certs")
    ca = make_ca(d)
    return {"ca": ca, "upstream": make_cert(d, "upstream.internal", ["upstream.internal"], ca=ca)}


def resumption_reporter(certs, version: ssl.TLSVersion):
    """An upstream terminating TLS (up to `version`) that first says whether the client resumed a
    session (`resumed` / `full`), then echoes."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(str(certs["upstream"][0]), str(certs["upstream"][1]))
    ctx.maximum_version = version

    def handler(conn: socket.socket, up: Upstream) -> None:
        try:
            tls = ctx.wrap_socket(conn, server_side=True)
        except (ssl.SSLError, OSError):
            return
        tls.sendall(b"resumed\n" if tls.session_reused else b"full\n")
        echo(tls)
    return handler


def tls_service_config(port: int, up_port: int, certs, ca: bool = True) -> str:
    return f"""
worker_processes: 1
stream_listen: [127.0.0.1:{port}]
services:
  - name: tls-backend
    protocol: tls
    host: 127.0.0.1
    port: {up_port}
    tls_server_name: upstream.internal
    tls_verify: {'true' if ca else 'false'}
    {f'ca_certificates: [{certs["ca"][0]}]' if ca else ''}
    routes:
      - name: all
        protocols: [tcp]
        destinations: [{{port: {port}}}]
"""


def handshakes(p, port: int, count: int) -> list[bytes]:
    """What the upstream said of each of `count` sessions, each begun once the one before has
    ended in the proxy (logged): a session is kept when its connection closes."""
    said = []
    for _ in range(count):
        logged = len(p.access_lines())
        with connect(port) as sock:
            said.append(recv_line(sock))
            sock.sendall(b"ping\n")
            assert recv_line(sock) == b"ping\n"
        p.wait_access(logged + 1)
    return said


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_3, ssl.TLSVersion.TLSv1_2])
def test_upstream_sessions_are_resumed(proxy, upstreams, certs, version):
    up = upstreams(resumption_reporter(certs, version))
    port = free_port()
    p = proxy(tls_service_config(port, up.port, certs))
    assert handshakes(p, port, 4) == [b"full\n", b"resumed\n", b"resumed\n", b"resumed\n"]


def test_an_upstream_that_forgets_sessions_gets_full_handshakes(proxy, upstreams, certs):
    """A restarted upstream (new ticket keys) declines the saved session: a full handshake, which
    verifies its certificate again, and the sessions after it resume the new one."""
    first = resumption_reporter(certs, ssl.TLSVersion.TLSv1_3)
    up = upstreams(first)
    port = free_port()
    p = proxy(tls_service_config(port, up.port, certs))
    assert handshakes(p, port, 2) == [b"full\n", b"resumed\n"]
    up.handler = resumption_reporter(certs, ssl.TLSVersion.TLSv1_3)     # new context, new ticket keys
    assert handshakes(p, port, 2) == [b"full\n", b"resumed\n"]
