"""The seed's manifests, translated, run by a real pyproxy: the how-to's `telnet $PROXY_IP 9000` and
`openssl s_client -connect $PROXY_IP:9443 -servername tls9443.kong.example` reach the echo Service
(on free ports below 32768 instead of 9000 and 9443)."""

from __future__ import annotations

import re

import yaml

from pyproxy.demo.echo import EchoServer
from pyproxy.gateway import Options, merge_entities, translate_paths, write_pem_files
from tests.support import connect, free_port, peer_common_name, recv_line, tls_client
from tests.unit.test_gateway_seed import EXAMPLES, seed_secret


def test_seed_through_a_running_pyproxy(proxy, tmp_path):
    echo = EchoServer("127.0.0.1", free_port(), name="echo").start()
    try:
        plain_port, tls_port = free_port(), free_port()
        seed = re.sub(r"port: 9000\b", f"port: {plain_port}", (EXAMPLES / "seed.yaml").read_text())
        seed = re.sub(r"port: 9443\b", f"port: {tls_port}", seed)
        # The EndpointSlice port (where the echo listens); the Service port stays 1025.
        loopback = (EXAMPLES / "echo-loopback.yaml").read_text().replace(
            "- {name: tcp, port: 1025, protocol: TCP}\n",
            f"- {{name: tcp, port: {echo.address[1]}, protocol: TCP}}\n")
        (tmp_path / "manifests").mkdir()
        (tmp_path / "manifests" / "seed.yaml").write_text(seed)
        (tmp_path / "manifests" / "echo.yaml").write_text(loopback)
        seed_secret(tmp_path / "manifests")
        translation = translate_paths([str(tmp_path / "manifests")],
                                      Options(addresses=("127.0.0.1",), runtime_dir=str(tmp_path / "run")))
        assert translation.notices == []
        write_pem_files(translation.files)
        p = proxy(yaml.safe_dump(merge_entities({"worker_processes": 2}, translation.entities)))

        with connect(plain_port) as client:          # telnet $PROXY_IP 9000
            assert recv_line(client).startswith(b"Welcome, you are connected to node ")
            assert recv_line(client) == b"Running on Pod echo.\n"
            recv_line(client), recv_line(client)
            client.sendall(b"This text will be echoed back.\n")
            assert recv_line(client) == b"This text will be echoed back.\n"

        with tls_client(tls_port, "tls9443.kong.example") as client:   # openssl s_client -servername ...
            assert peer_common_name(client) == "kong.example"          # bound by the listener's hostname
            assert recv_line(client).startswith(b"Welcome, you are connected to node ")
            for _ in range(3):
                recv_line(client)
            client.sendall(b"hello\n")
            assert recv_line(client) == b"hello\n"

        lines = p.wait_access(2)
        assert any(" tcp 200 " in line and line.endswith(" tcproute.default.echo-plaintext.0.stream9000")
                   for line in lines)
        assert any(" tls 200 " in line and line.endswith(" tlsroute.default.echo-tls.0.stream9443")
                   for line in lines)
    finally:
        echo.stop()
