"""A kong.yml with a udp service run as is (issue 22): `pyproxy -c kong.yml` listens on the udp
route's destinations port for datagrams and each client gets its own replies from the upstream."""

from __future__ import annotations

from pathlib import Path

from tests.integration.test_kong import KongProxy
from tests.integration.test_udp import ask, client, udp_port, udp_upstreams  # noqa: F401


def test_a_kong_file_udp_service_proxies_datagrams(tmp_path: Path, udp_upstreams, monkeypatch):  # noqa: F811
    upstream = udp_upstreams("dns")
    port = udp_port()
    monkeypatch.delenv("KONG_STREAM_LISTEN", raising=False)
    proxy = KongProxy(tmp_path, f"""_format_version: "3.0"
services:
- name: dns
  url: udp://127.0.0.1:{upstream.port}
  read_timeout: 300
  routes:
  - name: dns-udp
    protocols: [udp]
    destinations: [{{port: {port}}}]
""")
    try:
        proxy.start()
        assert f"listening on 0.0.0.0:{port} udp (the ports" in proxy.log_text()
        first, second = client(), client()
        try:
            for payload in (b"query one", bytes(range(256)) * 8):
                assert ask(first, port, payload)[0] == "dns"
            assert ask(second, port, b"query two")[0] == "dns"
        finally:
            first.close()
            second.close()
        assert sorted(data for data, _ in upstream.received) == sorted(
            [b"query one", bytes(range(256)) * 8, b"query two"])
        # Each client's session ends after read_timeout (Kong's milliseconds) with its log line.
        assert [line.split()[-1] for line in proxy.wait_access(2)] == ["dns-udp", "dns-udp"]
    finally:
        proxy.stop()
