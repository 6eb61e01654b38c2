"""The seed's manifests, translated, run by a real pyproxy: the how-to's `telnet $PROXY_IP 9000` and
`openssl s_client -connect $PROXY_IP:9443 -servername tls9443.kong.example` reach the echo Service
(on free ports below 32768 instead of 9000 and 9443), with the Gateway API tab, the Ingress tab, or
both applied."""

from __future__ import annotations

import re

import pytest
import yaml

from pyproxy.demo.echo import EchoServer
from pyproxy.gateway import Options, merge_entities, translate_paths, write_pem_files
from tests.support import connect, free_port, peer_common_name, recv_line, tls_client
from tests.unit.test_gateway_seed import EXAMPLES, seed_secret

# The access log's route for port 9000 and for 9443, per tab of the how-to applied.
ROUTES = {
    "gateway": ("tcproute.default.echo-plaintext.0.stream9000", "tlsroute.default.echo-tls.0.stream9443"),
    "ingress": ("default.echo-plaintext.0", "default.echo-tls.0"),
    # Both tabs: equivalent routes of equal age on each port; the Gateway API's are written first.
    "both": ("tcproute.default.echo-plaintext.0.stream9000", "tlsroute.default.echo-tls.0.stream9443"),
}


@pytest.mark.parametrize("tab", ["gateway", "ingress", "both"])
def test_seed_through_a_running_pyproxy(proxy, tmp_path, tab):
    echo = EchoServer("127.0.0.1", free_port(), name="echo").start()
    try:
        plain_port, tls_port = free_port(), free_port()
        seed = re.sub(r"port: 9000\b", f"port: {plain_port}", (EXAMPLES / "seed.yaml").read_text())
        seed = re.sub(r"port: 9443\b", f"port: {tls_port}", seed)
        documents = [document for document in yaml.safe_load_all(seed)
                     if tab == "both" or (document["kind"] == "TCPIngress") == (tab == "ingress")]
        # The EndpointSlice port (where the echo listens); the Service port stays 1025.
        loopback = (EXAMPLES / "echo-loopback.yaml").read_text().replace(
            "- {name: tcp, port: 1025, protocol: TCP}\n",
            f"- {{name: tcp, port: {echo.address[1]}, protocol: TCP}}\n")
        (tmp_path / "manifests").mkdir()
        (tmp_path / "manifests" / "seed.yaml").write_text(yaml.safe_dump_all(documents))
        (tmp_path / "manifests" / "echo.yaml").write_text(loopback)
        seed_secret(tmp_path / "manifests")
        # The how-to's KONG_STREAM_LISTEN, which a TCPIngress needs (it makes no listener of its own).
        stream_listen = f"127.0.0.1:{plain_port}, 127.0.0.1:{tls_port} ssl" if tab == "ingress" else None
        options = Options(addresses=("127.0.0.1",), runtime_dir=str(tmp_path / "run"),
                          stream_listen=tuple(stream_listen.split(", ")) if stream_listen else ())
        translation = translate_paths([str(tmp_path / "manifests")], options)
        assert translation.notices == []
        write_pem_files(translation.files)
        base = {"worker_processes": 2, **({"stream_listen": stream_listen} if stream_listen else {})}
        p = proxy(yaml.safe_dump(merge_entities(base, translation.entities)))

        with connect(plain_port) as client:          # telnet $PROXY_IP 9000
            assert recv_line(client).startswith(b"Welcome, you are connected to node ")
            assert recv_line(client) == b"Running on Pod echo.\n"
            recv_line(client), recv_line(client)
            client.sendall(b"This text will be echoed back.\n")
            assert recv_line(client) == b"This text will be echoed back.\n"

        with tls_client(tls_port, "tls9443.kong.example") as client:   # openssl s_client -servername ...
            assert peer_common_name(client) == "kong.example"          # bound by the hostname, not by CN
            assert recv_line(client).startswith(b"Welcome, you are connected to node ")
            for _ in range(3):
                recv_line(client)
            client.sendall(b"hello\n")
            assert recv_line(client) == b"hello\n"

        plain_route, tls_route = ROUTES[tab]
        lines = p.wait_access(2)
        assert any(" tcp 200 " in line and line.endswith(f" {plain_route}") for line in lines), lines
        assert any(" tls 200 " in line and line.endswith(f" {tls_route}") for line in lines), lines
    finally:
        echo.stop()
