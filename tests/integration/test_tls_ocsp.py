"""OCSP stapling from a response file: `certificates[].ocsp_response` (issue 19).

A test CA issues the server certificate with `openssl ca` and answers for it with `openssl ocsp`
(offline: request file in, response file out); `openssl s_client -status` shows what was stapled.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

from tests.integration.test_tls_client_certificates import PrivateCA
from tests.support import free_port, s_client_lines, wait_until


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


@pytest.fixture
def ca(tmp_path):
    return PrivateCA(tmp_path, "ocsp-ca")


def ocsp_response(ca: PrivateCA, cert: Path, out: Path) -> Path:
    """What the CA's OCSP responder says of `cert` now (good, or revoked once revoked), DER."""
    request = out.with_suffix(".req")
    openssl("ocsp", "-issuer", str(ca.crt), "-cert", str(cert), "-no_nonce", "-reqout", str(request),
            cwd=ca.dir)
    staging = out.with_suffix(".new")
    openssl("ocsp", "-index", str(ca.dir / "index.txt"), "-rsigner", str(ca.crt), "-rkey", str(ca.key),
            "-CA", str(ca.crt), "-reqin", str(request), "-respout", str(staging), "-ndays", "1", cwd=ca.dir)
    os.replace(staging, out)        # as a renewal tool does: the file is whole or not there
    return out


def stapled(port: int, name: str) -> str:
    """What `openssl s_client -status` prints about the stapled response (the OCSP lines)."""
    lines = s_client_lines(port, b"---\n", "-servername", name, "-status")
    text = b"".join(lines).decode(errors="replace")
    for line in lines:
        if b"no response sent" in line:
            return "no response sent"
    return "\n".join(line for line in text.splitlines() if "Status" in line)


def config(port: int, cert: Path, key: Path, response: Path | None, plain: tuple[Path, Path]) -> str:
    ocsp = f", ocsp_response: {response}" if response else ""
    return f"""
stream_listen:
  - 127.0.0.1:{port} ssl
certificates:
  - {{cert: {plain[0]}, key: {plain[1]}, snis: [plain.example]}}
  - {{cert: {cert}, key: {key}, snis: [ocsp.example]{ocsp}}}
services:
  - name: app
    host: 127.0.0.1
    port: 9
    routes:
      - name: app
        protocols: [tls]
        snis: [nothing.example]
"""


def test_the_response_is_stapled_and_followed_when_the_file_changes(proxy, ca, tmp_path):
    server = ca.issue("ocsp.example")
    plain = ca.issue("plain.example")
    response = ocsp_response(ca, server[0], tmp_path / "ocsp.der")
    port = free_port()
    proxy(config(port, server[0], server[1], response, plain))
    first = stapled(port, "ocsp.example")
    assert "OCSP Response Status: successful" in first
    assert "Cert Status: good" in first
    assert stapled(port, "plain.example") == "no response sent"     # another certificate: none
    ca.revoke(server[0])
    ocsp_response(ca, server[0], response)
    wait_until(lambda: "Cert Status: revoked" in stapled(port, "ocsp.example"), 15, interval=0.5,
               what="the renewed response stapled")


def test_no_response_file_staples_nothing(proxy, ca, tmp_path):
    server = ca.issue("ocsp.example")
    port = free_port()
    proxy(config(port, server[0], server[1], None, ca.issue("plain.example")))
    assert stapled(port, "ocsp.example") == "no response sent"


def test_a_response_file_that_is_not_der_is_refused_by_t(proxy, ca, tmp_path):
    server = ca.issue("ocsp.example")
    bad = tmp_path / "ocsp.pem"
    bad.write_text("-----BEGIN OCSP RESPONSE-----\n")
    p = proxy(config(free_port(), server[0], server[1], bad, ca.issue("plain.example")), start=False)
    result = p.run_cli("-t")
    assert result.returncode != 0
    assert f"certificates[1].ocsp_response: {bad} is not a DER OCSP response" in result.stderr + result.stdout


def test_a_broken_renewal_keeps_the_last_good_response(proxy, ca, tmp_path):
    server = ca.issue("ocsp.example")
    response = ocsp_response(ca, server[0], tmp_path / "ocsp.der")
    port = free_port()
    proxy(config(port, server[0], server[1], response, ca.issue("plain.example")))
    assert "Cert Status: good" in stapled(port, "ocsp.example")
    response.write_bytes(b"")
    time.sleep(1.2)
    assert "Cert Status: good" in stapled(port, "ocsp.example")
