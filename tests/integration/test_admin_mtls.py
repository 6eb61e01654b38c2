"""The Admin API behind client certificates: Kong's own advice for its Admin API ("Admin API
loopback": keep admin_listen on loopback and reach it through the proxy, with authentication on
that route), done with pyproxy's per-route mTLS. curl with and without a certificate, as an
operator would."""

from __future__ import annotations

import json
import subprocess

from tests.integration.test_tls_client_certificates import PrivateCA
from tests.support import free_port, make_cert, wait_until


def curl(url: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["curl", "-sS", "--max-time", "10", *args, url], capture_output=True, text=True,
                          timeout=20)


def test_the_admin_api_through_a_route_that_asks_for_a_client_certificate(proxy, tmp_path):
    admin, front = free_port(), free_port()
    ca = PrivateCA(tmp_path, "operators")
    operator = ca.issue("alice")
    stranger = PrivateCA(tmp_path, "others").issue("mallory")
    server = make_cert(tmp_path, "admin.example", ["admin.example"])
    proxy(f"""
admin_listen: 127.0.0.1:{admin}
stream_listen: [127.0.0.1:{front} ssl]
certificates:
  - {{cert: {server[0]}, key: {server[1]}}}
services:
  - name: admin-api
    host: 127.0.0.1
    port: {admin}
    routes:
      - name: admin-over-mtls
        protocols: [tls]
        snis: [admin.example]
        ssl:
          client_certificate: {{ca: {ca.crt}, verify: on}}
""")
    url = f"https://admin.example:{front}/status"
    resolve = ("--resolve", f"admin.example:{front}:127.0.0.1")
    def operator_call():
        return curl(url, *resolve, "--cacert", str(server[0]), "--cert", str(operator[0]),
                    "--key", str(operator[1]))

    # The admin process starts beside the workers: wait until it answers.
    wait_until(lambda: operator_call().returncode == 0, what="the Admin API through the mTLS route")
    ok = operator_call()
    assert ok.returncode == 0, ok.stderr
    assert "database" in json.loads(ok.stdout)
    created = curl(f"https://admin.example:{front}/upstreams", *resolve, "--cacert", str(server[0]),
                   "--cert", str(operator[0]), "--key", str(operator[1]), "-d", "name=pool")
    assert json.loads(created.stdout)["name"] == "pool"
    # No certificate, or one of another CA: no byte of the Admin API.
    for refused in (curl(url, *resolve, "--cacert", str(server[0])),
                    curl(url, *resolve, "--cacert", str(server[0]), "--cert", str(stranger[0]),
                         "--key", str(stranger[1]))):
        assert refused.returncode != 0 and refused.stdout == "", refused
