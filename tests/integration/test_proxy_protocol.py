"""PROXY protocol: received from a load balancer in front, sent to upstreams behind."""

from __future__ import annotations

import ipaddress
import shutil
import struct
import subprocess
import textwrap
import time

import pytest

from tests.support import (
    connect,
    free_port,
    make_cert,
    recv_all,
    recv_line,
    tag_handler,
    tls_handler_for,
    wait_until,
)

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"


def v2_tcp4(src: tuple[str, int], dst: tuple[str, int]) -> bytes:
    """A PROXY v2 header for TCP over IPv4, packed by hand from the spec's layout."""
    body = (ipaddress.IPv4Address(src[0]).packed + ipaddress.IPv4Address(dst[0]).packed
            + struct.pack("!HH", src[1], dst[1]))
    return V2_SIGNATURE + bytes([0x21, 0x11]) + struct.pack("!H", len(body)) + body


def by_source_config(port: int, flags: str, routes: str, extra: str = "") -> str:
    return f"""
stream_listen: ["127.0.0.1:{port} {flags}"]
proxy_protocol_timeout: 1s
access_log_format: '$remote_addr $remote_port $status $route'
{extra}
services:
{routes}
"""


def source_route(name: str, upstream_port: int, cidr: str, protocol: str = "tcp", snis: str = "") -> str:
    snis_line = f"\n        snis: [{snis}]" if snis else ""
    return f"""
  - name: {name}
    host: 127.0.0.1
    port: {upstream_port}
    routes:
      - name: {name}
        protocols: [{protocol}]
        sources: [{{ip: {cidr}}}]{snis_line}
"""


def test_v1_header_gives_the_real_client_address_to_routing_and_logs(proxy, upstreams):
    lb_clients = upstreams(tag_handler, name="from-192")
    others = upstreams(tag_handler, name="others")
    port = free_port()
    p = proxy(by_source_config(port, "proxy_protocol",
                               source_route("doc-net", lb_clients.port, "192.0.2.0/24")
                               + source_route("loopback", others.port, "127.0.0.0/8")))
    with connect(port) as sock:
        sock.sendall(f"PROXY TCP4 192.0.2.7 127.0.0.1 5555 {port}\r\n".encode())
        assert recv_line(sock) == b"from-192\n"
        sock.sendall(b"payload after the header\n")
        assert recv_line(sock) == b"payload after the header\n"     # the header was consumed, not forwarded
    assert p.wait_access(1)[0] == "192.0.2.7 5555 200 doc-net"


def test_v2_header_and_local_command(proxy, upstreams):
    lb_clients = upstreams(tag_handler, name="from-198")
    others = upstreams(tag_handler, name="loopback")
    port = free_port()
    p = proxy(by_source_config(port, "proxy_protocol",
                               source_route("doc-net", lb_clients.port, "198.51.100.0/24")
                               + source_route("loopback", others.port, "127.0.0.0/8")))
    with connect(port) as sock:
        sock.sendall(v2_tcp4(("198.51.100.9", 4242), ("127.0.0.1", port)))
        assert recv_line(sock) == b"from-198\n"
    local = V2_SIGNATURE + bytes([0x20, 0x00]) + struct.pack("!H", 0)      # LOCAL: health check of the LB
    with connect(port) as sock:
        sock.sendall(local)
        assert recv_line(sock) == b"loopback\n"                             # the connection's own address
    lines = p.wait_access(2)
    assert lines[0] == "198.51.100.9 4242 200 doc-net"
    assert lines[1].startswith("127.0.0.1 ")


@pytest.mark.parametrize("sent", [b"GET / HTTP/1.1\r\n\r\n", b"PROXY TCP5 1.2.3.4\r\n", b""])
def test_missing_or_broken_header_is_refused_with_400(proxy, upstreams, sent):
    up = upstreams(tag_handler)
    port = free_port()
    p = proxy(by_source_config(port, "proxy_protocol", source_route("any", up.port, "0.0.0.0/0")))
    with connect(port) as sock:
        if sent:
            sock.sendall(sent)
        started = time.monotonic()
        assert recv_all(sock) == b""
        if not sent:
            assert 0.8 < time.monotonic() - started < 5          # proxy_protocol_timeout: 1s
    assert p.wait_access(1)[0].endswith(" 400 -")
    assert up.connections == 0


def test_header_then_tls_passthrough_routes_on_both(proxy, upstreams, tmp_path):
    cert = make_cert(tmp_path, "db.pass.example", ["db.pass.example"])
    up = upstreams(tls_handler_for(cert, tag_handler), name="tls-db")
    port = free_port()
    p = proxy(by_source_config(port, "ssl proxy_protocol",
                               source_route("pass", up.port, "203.0.113.0/24", "tls_passthrough",
                                            '"*.pass.example"')))
    raw = connect(port)
    raw.sendall(b"PROXY TCP4 203.0.113.5 127.0.0.1 6000 443\r\n")
    import ssl
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    with ctx.wrap_socket(raw, server_hostname="db.pass.example") as sock:
        assert recv_line(sock) == b"tls-db\n"
    assert p.wait_access(1)[0] == "203.0.113.5 6000 200 pass"


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_header_sent_to_the_upstream(proxy, upstreams, version):
    received = []

    def capture(conn, up):
        conn.settimeout(5)
        data = b""
        while b"hello" not in data:
            chunk = conn.recv(4096)
            if not chunk:
                break
            data += chunk
        received.append(data)
        conn.sendall(b"ok\n")

    up = upstreams(capture)
    port = free_port()
    proxy(f"""
stream_listen: [127.0.0.1:{port}]
services:
  - name: s
    host: 127.0.0.1
    port: {up.port}
    proxy_protocol: {version}
    routes:
      - name: r
        protocols: [tcp]
        destinations: [{{port: {port}}}]
""")
    with connect(port) as sock:
        client_port = sock.getsockname()[1]
        sock.sendall(b"hello")
        assert recv_line(sock) == b"ok\n"
    if version == "v1":
        expected = f"PROXY TCP4 127.0.0.1 127.0.0.1 {client_port} {port}\r\n".encode()
    else:
        expected = v2_tcp4(("127.0.0.1", client_port), ("127.0.0.1", port))
    assert received == [expected + b"hello"]


@pytest.mark.skipif(not (shutil.which("haproxy") and shutil.which("nginx")),
                    reason="needs HAProxy and nginx (make test installs them)")
def test_real_peers_haproxy_in_front_nginx_behind(proxy, tmp_path):
    """HAProxy's send-proxy-v2 → pyproxy → nginx stream with `proxy_protocol on`: nginx answers with
    the client address it was told, which must be the original client's."""
    hap_port, pyproxy_port, nginx_port = free_port(), free_port(), free_port()
    nginx_conf = tmp_path / "nginx.conf"
    modules = "/usr/share/nginx/modules-available/mod-stream.conf"
    load = f"include {modules};" if shutil.os.path.exists(modules) else ""
    nginx_conf.write_text(textwrap.dedent(f"""
        {load}
        daemon off;
        worker_processes 1;
        pid {tmp_path}/nginx.pid;
        error_log {tmp_path}/nginx-error.log;
        events {{ worker_connections 64; }}
        stream {{
            server {{
                listen 127.0.0.1:{nginx_port} proxy_protocol;
                return "client=$proxy_protocol_addr:$proxy_protocol_port\\n";
            }}
        }}
    """))
    hap_conf = tmp_path / "haproxy.cfg"
    hap_conf.write_text(textwrap.dedent(f"""
        global
            maxconn 64
        defaults
            mode tcp
            timeout connect 5s
            timeout client 10s
            timeout server 10s
        frontend fe
            bind 127.0.0.1:{hap_port}
            default_backend be
        backend be
            server py 127.0.0.1:{pyproxy_port} send-proxy-v2
    """))
    proxy(f"""
stream_listen: ["127.0.0.1:{pyproxy_port} proxy_protocol"]
services:
  - name: to-nginx
    host: 127.0.0.1
    port: {nginx_port}
    proxy_protocol: v1
    routes:
      - name: r
        protocols: [tcp]
        sources: [{{ip: 127.0.0.0/8}}]
""")
    nginx = subprocess.Popen(["nginx", "-c", str(nginx_conf)], stderr=subprocess.PIPE)
    hap = subprocess.Popen(["haproxy", "-db", "-f", str(hap_conf)], stdout=subprocess.DEVNULL,
                           stderr=subprocess.PIPE)
    try:
        def answer():
            try:
                with connect(hap_port, source="127.0.0.9", timeout=5) as sock:
                    return sock.getsockname()[1], recv_line(sock)
            except OSError:
                return None
        client_port, line = wait_until(answer, 15, interval=0.2, what="HAProxy → pyproxy → nginx")
        assert line == f"client=127.0.0.9:{client_port}\n".encode()
    finally:
        for proc in (hap, nginx):
            proc.terminate()
            proc.wait(10)
