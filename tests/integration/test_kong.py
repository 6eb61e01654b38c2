"""A Kong user's kong.yml run as is: `pyproxy -c kong.yml` listens where the routes' destinations say
and proxies the bytes of a tcp route and of a tls route (terminated with the file's certificate) to an
echo upstream, unchanged."""

from __future__ import annotations

import socket
from pathlib import Path

from tests.support import (
    Proxy,
    connect,
    expected_hash_reply,
    free_port,
    hash_handler,
    pattern_bytes,
    peer_common_name,
    recv_line,
    tag_handler,
    tls_client,
    upload_and_hash,
)
from tests.unit.test_kong import DATA, SNI, with_certificate


class KongProxy(Proxy):
    """`python -m pyproxy -c kong.yml`: the Kong file is the whole configuration, so the logs go to
    pyproxy's defaults (the error log to stderr, the access log to stdout)."""

    def write_config(self, body: str) -> None:
        self.conf = self.dir / "kong.yml"
        self.conf.write_text(body)
        self.access_log = self.dir / "stdout.txt"

    def log_text(self) -> str:
        try:
            return (self.dir / "stderr.txt").read_text(errors="replace")
        except FileNotFoundError:
            return ""


def test_the_seed_workflow_as_a_kong_file_proxies_tcp_and_tls(tmp_path: Path, upstreams, monkeypatch):
    echo = upstreams(hash_handler)
    tcp_port, tls_port = free_port(), free_port()
    text = (DATA / "seed-stream.yml").read_text().replace("127.0.0.1:1025", f"127.0.0.1:{echo.port}")
    text = text.replace("port: 9000", f"port: {tcp_port}").replace("port: 9443", f"port: {tls_port}")
    monkeypatch.delenv("KONG_STREAM_LISTEN", raising=False)
    proxy = KongProxy(tmp_path, with_certificate(text, tmp_path))
    try:
        proxy.start()
        listens = sorted([(tcp_port, f"0.0.0.0:{tcp_port}"), (tls_port, f"0.0.0.0:{tls_port} ssl")])
        assert f"listening on {', '.join(text for _, text in listens)} (the ports" in proxy.log_text()

        payload = pattern_bytes(3 << 20)
        assert upload_and_hash(tcp_port, payload) == expected_hash_reply(payload)

        payload = pattern_bytes(1 << 20, seed=11)
        with tls_client(tls_port, SNI, timeout=30) as tls:
            assert peer_common_name(tls) == SNI           # the certificate of the Kong file
            tls.sendall(payload)
            socket.socket.shutdown(tls, socket.SHUT_WR)    # a bare FIN: the TLS session stays readable
            reply = b""
            while not reply.endswith(b"\n") and (chunk := tls.recv(65536)):
                reply += chunk
        assert reply == expected_hash_reply(payload)
        assert [line.split()[-1] for line in proxy.wait_access(2)] == ["echo-tcp", "echo-tls"]

        proxy.reload()                                     # a reload reads the Kong file again
        assert upload_and_hash(tcp_port, b"again") == expected_hash_reply(b"again")
        assert "internal error" not in proxy.log_text()
    finally:
        proxy.stop()


def test_declarative_config_entities_follow_the_kong_file_at_each_reload(proxy, upstreams, tmp_path: Path):
    """The pyproxy file listens; the Kong file it names says where sessions go, and a reload reads it
    again."""
    first, second = upstreams(tag_handler, name="first"), upstreams(tag_handler, name="second")
    port = free_port()
    kong = tmp_path / "kong.yml"

    def write_kong(target: int) -> None:
        kong.write_text(f"""_format_version: "3.0"
services:
- name: tagged
  url: tcp://127.0.0.1:{target}
  routes:
  - name: by-port
    protocols: [tcp]
    destinations: [{{port: {port}}}]
""")

    write_kong(first.port)
    p = proxy(f"stream_listen: [127.0.0.1:{port}]\ndeclarative_config: kong.yml\n")
    with connect(port) as sock:
        assert recv_line(sock) == b"first\n"
    write_kong(second.port)
    p.reload()
    with connect(port) as sock:
        assert recv_line(sock) == b"second\n"
    kong.write_text(kong.read_text().replace("port: ", "port: x"))    # a bad Kong file: kept serving
    p.reload(expect="reload failed")
    assert f"{kong}:8: services[0].routes[0].destinations[0].port: expected an integer" in p.log_text()
    with connect(port) as sock:
        assert recv_line(sock) == b"second\n"
