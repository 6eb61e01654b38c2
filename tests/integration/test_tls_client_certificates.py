"""Client certificates (mTLS) on terminating listeners: `ssl.client_certificate` (issue 19).

A private CA made by the test with `openssl ca` (which can also backdate a certificate and
revoke one), clients made with Python's ssl and curl."""

from __future__ import annotations

import hashlib
import socket
import ssl
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import free_port, make_ca, make_cert, recv_line, s_client_lines, tag_handler, wait_until


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


class PrivateCA:
    """A CA that issues client certificates, revokes them and publishes its CRL."""

    def __init__(self, directory: Path, name: str):
        self.dir = directory / name
        self.dir.mkdir()
        self.crt, self.key = make_ca(self.dir, name)
        (self.dir / "index.txt").write_text("")
        (self.dir / "serial").write_text("1000\n")
        (self.dir / "crlnumber").write_text("1000\n")
        self.conf = self.dir / "ca.cnf"
        self.conf.write_text(f"""
[ca]
default_ca = this
[this]
database = {self.dir}/index.txt
serial = {self.dir}/serial
crlnumber = {self.dir}/crlnumber
new_certs_dir = {self.dir}
certificate = {self.crt}
private_key = {self.key}
default_md = sha256
default_days = 3
default_crl_days = 3
policy = any
unique_subject = no
[any]
commonName = supplied
organizationName = optional
""")

    def issue(self, name: str, dates: tuple[str, str] | None = None) -> tuple[Path, Path]:
        """A client certificate for `/O=Test Org/CN=name`; `dates`: (start, end) as YYYYMMDDHHMMSSZ."""
        crt, key, csr = self.dir / f"{name}.crt", self.dir / f"{name}.key", self.dir / f"{name}.csr"
        openssl("req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                "-subj", f"/O=Test Org/CN={name}", "-keyout", str(key), "-out", str(csr), cwd=self.dir)
        period = ["-startdate", dates[0], "-enddate", dates[1]] if dates else []
        openssl("ca", "-batch", "-config", str(self.conf), "-notext", "-in", str(csr), "-out", str(crt),
                *period, cwd=self.dir)
        return crt, key

    def revoke(self, crt: Path) -> None:
        openssl("ca", "-batch", "-config", str(self.conf), "-revoke", str(crt), cwd=self.dir)

    def crl(self) -> Path:
        path = self.dir / "crl.pem"
        openssl("ca", "-batch", "-config", str(self.conf), "-gencrl", "-out", str(path), cwd=self.dir)
        return path


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    d = tmp_path_factory.mktemp("pki")
    ca, other = PrivateCA(d, "client-ca"), PrivateCA(d, "other-ca")
    pki = {
        "server": make_cert(d, "mtls.example", ["mtls.example"]),
        "ca": ca,
        "alice": ca.issue("alice"),
        "expired": ca.issue("expired", ("20200101000000Z", "20200102000000Z")),
        "revoked": ca.issue("revoked"),
        "stranger": other.issue("stranger"),
    }
    ca.revoke(pki["revoked"][0])
    pki["crl"] = ca.crl()
    return pki


FORMAT = "access_log_format: '$status $ssl_client_verify \"$ssl_client_s_dn\" $ssl_client_fingerprint'"


def mtls_config(port: int, pki, up_port: int, client_certificate: str) -> str:
    return f"""
stream_listen:
  - 127.0.0.1:{port} ssl
{FORMAT}
ssl:
  client_certificate: {client_certificate}
certificates:
  - {{cert: {pki['server'][0]}, key: {pki['server'][1]}}}
services:
  - name: app
    host: 127.0.0.1
    port: {up_port}
    routes:
      - name: app-route
        protocols: [tls]
        snis: [mtls.example]
"""


def exchange(port: int, cert: tuple[Path, Path] | None, name: str = "mtls.example") -> bytes:
    """What a client asking for `name` and presenting `cert` (or none) reads first through the
    proxy; b"" when the proxy refused it. In TLS 1.3 the server checks the client's certificate
    after the client's side of the handshake is done, so a refusal shows at the first read."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    if cert is not None:
        ctx.load_cert_chain(str(cert[0]), str(cert[1]))
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, \
            ctx.wrap_socket(raw, server_hostname=name) as sock:
        try:
            return recv_line(sock)
        except (ssl.SSLError, ConnectionResetError):
            return b""


def fingerprint(cert: tuple[Path, Path]) -> str:
    return hashlib.sha1(ssl.PEM_cert_to_DER_cert(cert[0].read_text())).hexdigest()


def subject(cert: tuple[Path, Path]) -> str:
    """The subject as OpenSSL writes it in RFC 2253 (what nginx's $ssl_client_s_dn is)."""
    out = subprocess.run(["openssl", "x509", "-in", str(cert[0]), "-noout", "-subject",
                          "-nameopt", "RFC2253"], capture_output=True, text=True, check=True,
                         timeout=10).stdout
    return out.strip().removeprefix("subject=")


def test_verify_on_lets_a_certificate_of_the_ca_through_and_logs_it(proxy, upstreams, pki):
    up = upstreams(tag_handler, name="app")
    port = free_port()
    p = proxy(mtls_config(port, pki, up.port, f"{{ca: {pki['ca'].crt}, verify: on}}"))
    assert exchange(port, pki["alice"]) == b"app\n"
    assert subject(pki["alice"]) == "O=Test Org,CN=alice"
    assert p.wait_access(1)[0] == f'200 SUCCESS "{subject(pki["alice"])}" {fingerprint(pki["alice"])}'


@pytest.mark.parametrize("who, verify, reason", [
    (None, "NONE", "client sent no required SSL certificate"),
    ("stranger", "FAILED:unable to get local issuer certificate",
     "client SSL certificate verify error: (20:unable to get local issuer certificate)"),
    ("expired", "FAILED:certificate has expired",
     "client SSL certificate verify error: (10:certificate has expired)"),
])
def test_verify_on_refuses_the_others_before_any_upstream(proxy, upstreams, pki, who, verify, reason):
    up = upstreams(tag_handler)
    port = free_port()
    p = proxy(mtls_config(port, pki, up.port, f"{{ca: {pki['ca'].crt}, verify: on}}"))
    assert exchange(port, pki[who] if who else None) == b""
    assert p.wait_access(1)[0] == f'400 {verify} "-" -'
    assert reason in p.log_text()
    assert up.connections == 0


def test_verify_optional_lets_a_client_without_a_certificate_through(proxy, upstreams, pki):
    up = upstreams(tag_handler, name="app")
    port = free_port()
    p = proxy(mtls_config(port, pki, up.port, f"{{ca: {pki['ca'].crt}, verify: optional}}"))
    assert exchange(port, None) == b"app\n"
    assert exchange(port, pki["alice"]) == b"app\n"
    assert exchange(port, pki["stranger"]) == b""          # presented, and wrong: refused, as nginx does
    lines = p.wait_access(3)
    assert lines[0] == '200 NONE "-" -'
    assert lines[1] == f'200 SUCCESS "{subject(pki["alice"])}" {fingerprint(pki["alice"])}'
    assert lines[2] == '400 FAILED:unable to get local issuer certificate "-" -'


def test_a_revoked_certificate_is_refused_with_the_crl(proxy, upstreams, pki):
    up = upstreams(tag_handler, name="app")
    port = free_port()
    p = proxy(mtls_config(port, pki, up.port, f"{{ca: {pki['ca'].crt}, crl: {pki['crl']}}}"))
    assert exchange(port, pki["revoked"]) == b""
    assert exchange(port, pki["alice"]) == b"app\n"
    lines = p.wait_access(2)
    assert lines[0] == '400 FAILED:certificate revoked "-" -'
    assert lines[1].startswith("200 SUCCESS ")


def test_depth_bounds_the_chain(proxy, upstreams, pki):
    """depth 0: only a certificate the CA file holds itself; alice's is one level below."""
    up = upstreams(tag_handler)
    port = free_port()
    p = proxy(mtls_config(port, pki, up.port, f"{{ca: {pki['ca'].crt}, depth: 0}}"))
    assert exchange(port, pki["alice"]) == b""
    assert p.wait_access(1)[0] == '400 FAILED:certificate chain too long "-" -'
    assert "client SSL certificate verify error: (22:certificate chain too long)" in p.log_text()
    assert up.connections == 0


def test_an_oversized_certificate_chain_costs_only_its_session(proxy, upstreams, pki, tmp_path):
    """A client whose Certificate message is over OpenSSL's 100 KiB for a peer's chain (alice's
    certificate and 300 copies of the CA's) is refused in the handshake, logged in one line; the
    next client is served."""
    up = upstreams(tag_handler, name="app")
    port = free_port()
    p = proxy(mtls_config(port, pki, up.port, f"{{ca: {pki['ca'].crt}, verify: on}}"))
    chain = tmp_path / "oversized.pem"
    ca_pem = pki["ca"].crt.read_text()
    chain.write_text(pki["alice"][0].read_text() + ca_pem * 300)
    assert len(chain.read_bytes()) > 150_000
    assert exchange(port, (chain, pki["alice"][1])) == b""
    assert p.wait_access(1)[0].startswith("400 ")
    assert "SSL handshake with the client failed (EXCESSIVE_MESSAGE_SIZE)" in p.log_text()
    assert up.connections == 0
    assert exchange(port, pki["alice"]) == b"app\n"
    assert p.wait_access(2)[1].startswith("200 SUCCESS ")


def test_openssl_s_client_with_a_client_certificate(proxy, upstreams, pki):
    up = upstreams(tag_handler, name="app")
    port = free_port()
    p = proxy(mtls_config(port, pki, up.port, f"{{ca: {pki['ca'].crt}}}"))
    lines = s_client_lines(port, b"app\n", "-servername", "mtls.example",
                           "-cert", str(pki["alice"][0]), "-key", str(pki["alice"][1]))
    assert b"app\n" in lines
    assert p.wait_access(1)[0].startswith("200 SUCCESS ")


def test_bad_client_certificate_settings_name_their_place(proxy, pki, tmp_path):
    p = proxy(mtls_config(free_port(), pki, free_port(),
                          f"{{ca: {tmp_path / 'missing.pem'}, verify: maybe, depth: -1}}"), start=False)
    result = p.run_cli("-t")
    assert result.returncode == 1
    assert f"ssl.client_certificate.ca: no such file: {tmp_path / 'missing.pem'}" in result.stderr
    assert "ssl.client_certificate.verify: expected on or optional, got 'maybe'" in result.stderr
    assert "ssl.client_certificate.depth:" in result.stderr
    assert "Traceback" not in result.stderr
    not_pem = tmp_path / "not.pem"
    not_pem.write_text("hello\n")
    p.write_config(mtls_config(free_port(), pki, free_port(), f"{{ca: {not_pem}}}"))
    result = p.run_cli("-t")
    assert f"ssl.client_certificate.ca: cannot load CA certificates from {not_pem}" in result.stderr


def test_T_prints_the_settings_and_its_output_loads(proxy, pki, tmp_path):
    p = proxy(mtls_config(free_port(), pki, free_port(),
                          f"{{ca: {pki['ca'].crt}, verify: optional, crl: {pki['crl']}}}"), start=False)
    dumped = p.run_cli("-T")
    assert dumped.returncode == 0, dumped.stderr
    assert "client_certificate:" in dumped.stdout and "verify: optional" in dumped.stdout
    again = tmp_path / "dumped.conf"
    again.write_text(dumped.stdout)
    reloaded = subprocess.run([sys.executable, "-m", "pyproxy", "-c", str(again), "-T"], capture_output=True,
                              text=True, timeout=30)
    assert reloaded.returncode == 0, reloaded.stderr
    assert reloaded.stdout.split("\n", 1)[1] == dumped.stdout.split("\n", 1)[1]


def test_a_resumed_session_keeps_its_verified_certificate(proxy, upstreams, pki):
    up = upstreams(tag_handler, name="app")
    port = free_port()
    p = proxy(mtls_config(port, pki, up.port, f"{{ca: {pki['ca'].crt}}}"))
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    ctx.load_cert_chain(str(pki["alice"][0]), str(pki["alice"][1]))
    session, reused = None, []
    for _ in range(3):
        with ctx.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=10),
                             server_hostname="mtls.example", session=session) as sock:
            assert recv_line(sock) == b"app\n"          # reading also takes in the TLS 1.3 ticket
            session = sock.session
            reused.append(sock.session_reused)
    assert reused == [False, True, True]
    expected = f'200 SUCCESS "{subject(pki["alice"])}" {fingerprint(pki["alice"])}'
    assert p.wait_access(3) == [expected] * 3


def test_a_reload_with_another_ca_verifies_against_it(proxy, upstreams, pki, tmp_path):
    up = upstreams(tag_handler, name="app")
    port = free_port()
    p = proxy(mtls_config(port, pki, up.port, f"{{ca: {pki['ca'].crt}}}"))
    assert exchange(port, pki["alice"]) == b"app\n"
    other_ca = pki["stranger"][0].parent / "other-ca.crt"
    p.reload(mtls_config(port, pki, up.port, f"{{ca: {other_ca}}}"))
    assert exchange(port, pki["alice"]) == b""
    assert exchange(port, pki["stranger"]) == b"app\n"


def test_a_crl_file_that_is_not_one_names_its_place(proxy, pki, tmp_path):
    not_pem = tmp_path / "crl.pem"
    not_pem.write_text("hello\n")
    p = proxy(mtls_config(free_port(), pki, free_port(), f"{{ca: {pki['ca'].crt}, crl: {not_pem}}}"),
              start=False)
    result = p.run_cli("-t")
    assert result.returncode == 1
    assert f"ssl.client_certificate.crl: cannot load CRLs from {not_pem}" in result.stderr


def upstream_asking_for_a_certificate(pki):
    """A TLS upstream that requires a client certificate of the private CA and says whose it got."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(str(pki["server"][0]), str(pki["server"][1]))
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(cafile=str(pki["ca"].crt))

    def handler(conn, up) -> None:
        try:
            tls = ctx.wrap_socket(conn, server_side=True)
            subject = dict(rdn[0] for rdn in tls.getpeercert()["subject"])
            tls.sendall(f"hello {subject['commonName']}\n".encode())
            tls.recv(1)
        except (ssl.SSLError, OSError):
            return
    return handler


@pytest.mark.parametrize("presented", [True, False])
def test_a_service_presents_its_client_certificate_to_the_upstream(proxy, upstreams, pki, presented):
    up = upstreams(upstream_asking_for_a_certificate(pki))
    port = free_port()
    cert, key = pki["alice"]
    proxy(f"""
stream_listen: [127.0.0.1:{port}]
services:
  - name: backend
    protocol: tls
    host: 127.0.0.1
    port: {up.port}
    {f'client_certificate: {{cert: {cert}, key: {key}}}' if presented else ''}
    routes:
      - name: all
        destinations: [{{port: {port}}}]
""")
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        try:
            said = recv_line(sock)
        except ConnectionResetError:
            said = b""
    assert said == (b"hello alice\n" if presented else b"")


@pytest.mark.parametrize("on", ["service", "upstream"])
def test_a_kong_service_presents_its_client_certificate_entity(tmp_path, upstreams, pki, proxy, on):
    """Kong's `client_certificate` on a service names a certificate entity (else the one of the
    upstream the service's host names, as Kong falls back): a kong.yml run as is presents that
    certificate to an upstream that asks for one."""
    up = upstreams(upstream_asking_for_a_certificate(pki))
    port = free_port()
    cert, key = pki["alice"]
    indent = "\n      "
    reference = "client_certificate: 2e1f6d3a-8a63-4f0b-9c87-31c1b9d3a001"
    kong = tmp_path / "kong.yml"
    kong.write_text(f"""_format_version: "3.0"
certificates:
  - id: 2e1f6d3a-8a63-4f0b-9c87-31c1b9d3a001
    cert: |
      {indent.join(cert.read_text().splitlines())}
    key: |
      {indent.join(key.read_text().splitlines())}
upstreams:
  - name: backends
    {reference if on == "upstream" else ""}
    targets: [{{target: "127.0.0.1:{up.port}"}}]
services:
  - name: backend
    protocol: tls
    host: backends
    {reference if on == "service" else ""}
    routes:
      - name: all
        protocols: [tcp]
        destinations: [{{port: {port}}}]
""")
    proxy(f"stream_listen: [127.0.0.1:{port}]\ndeclarative_config: {kong}\n")
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        assert recv_line(sock) == b"hello alice\n"


def test_a_kong_client_certificate_naming_no_certificate_names_its_place(tmp_path, pki, proxy):
    kong = tmp_path / "kong.yml"
    kong.write_text("""_format_version: "3.0"
services:
  - name: backend
    url: tls://127.0.0.1:1
    client_certificate: {id: 2e1f6d3a-8a63-4f0b-9c87-31c1b9d3a0ff}
""")
    config = tmp_path / "pyproxy.conf"
    config.write_text(f"stream_listen: [127.0.0.1:{free_port()}]\ndeclarative_config: {kong}\n")
    result = subprocess.run([sys.executable, "-m", "pyproxy", "-t", "-c", str(config)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert (f"{kong}:5: services[0].client_certificate: invalid reference 'client_certificate: "
            '{"id":"2e1f6d3a-8a63-4f0b-9c87-31c1b9d3a0ff"}\' (no such entry in \'certificates\')'
            ) in result.stderr
    assert "Traceback" not in result.stderr


def test_an_admin_api_service_presents_its_client_certificate(proxy, upstreams, pki):
    """The same through Kong's Admin API: a certificate, then a service whose `client_certificate`
    names it (`client_certificate.id=…`, Kong's form syntax); a reference to no certificate is
    Kong's foreign key violation, and the certificate cannot be deleted while the service uses it."""
    from tests.integration.test_admin import call, curl, start

    up = upstreams(upstream_asking_for_a_certificate(pki))
    port = free_port()
    p = start(proxy, port)
    cert, key = pki["alice"]
    certificate = curl("-X", "POST", f"{p.admin}/certificates", "-F", f"cert=@{cert}", "-F", f"key=@{key}")
    nothing = "00000000-0000-4000-8000-000000000000"
    status, body = call(p.admin, "POST", "/services", {"name": "backend", "url": f"tls://127.0.0.1:{up.port}",
                                                       "client_certificate": {"id": nothing}})
    assert status == 400 and body["name"] == "foreign key violation"
    service = curl("-X", "POST", f"{p.admin}/services", "--data", "name=backend", "--data",
                   f"url=tls://127.0.0.1:{up.port}", "--data", f"client_certificate.id={certificate['id']}")
    assert service["client_certificate"] == {"id": certificate["id"]}
    curl("-X", "POST", f"{p.admin}/services/backend/routes", "--data", "protocols[]=tcp",
         "--data", f"destinations[1].port={port}")

    def greeted() -> bytes:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
                return recv_line(sock)
        except OSError:
            return b""
    assert wait_until(greeted, what="the upstream's greeting") == b"hello alice\n"
    status, body = call(p.admin, "DELETE", f"/certificates/{certificate['id']}")
    assert status == 400
    assert body["message"] == "an existing 'services' entity references this 'certificates' entity"
