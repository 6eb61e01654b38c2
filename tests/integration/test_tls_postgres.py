"""PostgreSQL through an `ssl` listener, routed by the name the client asks for (issue 19).

Real PostgreSQL 15 servers (Debian's, started by the test as `nobody` in a temporary directory: it
refuses to run as root) behind a real pyproxy; clients are `psql` (its SSLRequest) and, for what
psql 15 cannot send (GSSENCRequest answered, PostgreSQL 17's direct TLS, bad input), Python speaking
the protocol's first messages.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import ssl
import struct
import subprocess
import tempfile
from pathlib import Path

import pytest

from tests.support import free_port, make_cert, wait_until

PG_BIN = Path("/usr/lib/postgresql/15/bin")
SSL_REQUEST = struct.pack("!ii", 8, 80877103)
GSSENC_REQUEST = struct.pack("!ii", 8, 80877104)

pytestmark = pytest.mark.skipif(not (PG_BIN / "postgres").exists() or not shutil.which("psql"),
                                reason="PostgreSQL 15 (make test installs it)")


class Cluster:
    """A PostgreSQL server of its own, `cluster_name` NAME (what a query through pyproxy reads back
    to tell the servers apart), trusting every local connection; with `cert`, it does TLS too."""

    def __init__(self, root: Path, name: str, cert: tuple[Path, Path] | None = None):
        self.name = name
        self.port = free_port()
        self.data = root / name
        as_nobody = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"]
        subprocess.run([*as_nobody, str(PG_BIN / "initdb"), "-D", str(self.data), "-U", "postgres",
                        "-A", "trust", "--no-sync", "-E", "UTF8"],
                       check=True, capture_output=True, timeout=60)
        settings = {"listen_addresses": "127.0.0.1", "port": str(self.port), "unix_socket_directories": "",
                    "cluster_name": name, "fsync": "off", "ssl": "off"}
        if cert is not None:
            for source, target in zip(cert, ("server.crt", "server.key"), strict=True):
                shutil.copy(source, self.data / target)
                os.chown(self.data / target, *_nobody())
                os.chmod(self.data / target, 0o600)
            settings["ssl"] = "on"
        command = [*as_nobody, str(PG_BIN / "postgres"), "-D", str(self.data)]
        for key, value in settings.items():
            command += ["-c", f"{key}={value}"]
        self.log_path = root / f"{name}.log"
        self.log = open(self.log_path, "wb")     # noqa: SIM115 (closed by stop())
        # setpriv execs: this pid is the postmaster's, which a SIGINT stops (fast shutdown).
        self.proc = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL)
        wait_until(self._ready, 30, what=f"PostgreSQL {name} on port {self.port}")

    def _ready(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"postgres {self.name} exited: {self.log_path.read_text()}")
        return subprocess.run([str(PG_BIN / "pg_isready"), "-q", "-h", "127.0.0.1", "-p", str(self.port)],
                              timeout=10).returncode == 0

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        self.log.close()


def _nobody() -> tuple[int, int]:
    import pwd
    entry = pwd.getpwnam("nobody")
    return entry.pw_uid, entry.pw_gid


@pytest.fixture(scope="module")
def pg(tmp_path_factory):
    """Two PostgreSQL servers: alpha (plain) and beta (with TLS), and the certificates."""
    certs = tmp_path_factory.mktemp("pg-certs")
    root = Path(tempfile.mkdtemp(prefix="pyproxy-pg-"))      # not under /tmp/pytest-of-root: nobody's
    os.chown(root, *_nobody())
    clusters = []
    try:
        proxy_cert = make_cert(certs, "db.test", ["*.db.test"])
        clusters.append(Cluster(root, "alpha"))
        clusters.append(Cluster(root, "beta", make_cert(certs, "beta-server", ["beta-server"])))
        yield {"alpha": clusters[0], "beta": clusters[1], "proxy": proxy_cert}
    finally:
        for cluster in clusters:
            cluster.stop()
        shutil.rmtree(root, ignore_errors=True)


def config(port: int, pg, ssl_extra: str = "", services_extra: str = "") -> str:
    return f"""
stream_listen:
  - 127.0.0.1:{port} ssl
access_log_format: '$status $protocol $ssl_server_name $route'
ssl:
  preread_timeout: 2s{ssl_extra}
certificates:
  - {{cert: {pg['proxy'][0]}, key: {pg['proxy'][1]}}}
services:
  - name: alpha
    host: 127.0.0.1
    port: {pg['alpha'].port}
    routes:
      - name: alpha
        protocols: [tls]
        snis: [alpha.db.test]
  - name: beta
    host: 127.0.0.1
    port: {pg['beta'].port}
    routes:
      - name: beta
        protocols: [tls]
        snis: [beta.db.test]
      - name: beta-passthrough
        protocols: [tls_passthrough]
        snis: [through.db.test]
{services_extra}"""


QUERY = "select current_setting('cluster_name'), ssl from pg_stat_ssl where pid = pg_backend_pid()"


def psql(port: int, host: str, sslmode: str = "require") -> subprocess.CompletedProcess:
    """`psql "host=HOST hostaddr=127.0.0.1 … sslmode=require"`: libpq sends HOST as SNI."""
    conninfo = (f"host={host} hostaddr=127.0.0.1 port={port} user=postgres dbname=postgres "
                f"sslmode={sslmode} gssencmode=disable connect_timeout=10")
    return subprocess.run(["psql", conninfo, "-XAtc", QUERY], capture_output=True, text=True, timeout=30,
                          env={**os.environ, "PGPASSFILE": "/dev/null"})


def test_psql_with_sslmode_require_reaches_the_database_its_host_names(proxy, pg):
    """Two databases on one port by hostname, TLS ended by pyproxy: each server sees a plain
    connection (pg_stat_ssl says f) and is the one the name routes to."""
    port = free_port()
    p = proxy(config(port, pg))
    alpha = psql(port, "alpha.db.test")
    assert (alpha.returncode, alpha.stdout) == (0, "alpha|f\n"), alpha.stderr
    beta = psql(port, "beta.db.test")
    assert (beta.returncode, beta.stdout) == (0, "beta|f\n"), beta.stderr
    assert sorted(p.wait_access(2)) == sorted(["200 tls alpha.db.test alpha", "200 tls beta.db.test beta"])


def test_psql_passthrough_gets_the_database_servers_own_tls(proxy, pg):
    """Passthrough: pyproxy answered the SSLRequest, sends it again to the server and splices once
    it answers S; TLS is then the server's own (pg_stat_ssl says t)."""
    port = free_port()
    p = proxy(config(port, pg))
    result = psql(port, "through.db.test")
    assert (result.returncode, result.stdout) == (0, "beta|t\n"), result.stderr
    assert p.wait_access(1) == ["200 tls_passthrough through.db.test beta-passthrough"]


def test_passthrough_to_a_server_without_tls_fails_the_attempt(proxy, pg):
    """alpha has ssl = off and answers N: the attempt fails with a line that says so."""
    port = free_port()
    p = proxy(config(port, pg, services_extra=f"""
  - name: alpha-tls
    host: 127.0.0.1
    port: {pg['alpha'].port}
    retries: 0
    routes:
      - name: nossl
        protocols: [tls_passthrough]
        snis: [nossl.db.test]
"""))
    result = psql(port, "nossl.db.test")
    assert result.returncode != 0
    assert p.wait_access(1) == ["502 tls_passthrough nossl.db.test nossl"]
    p.wait_log("failed: the upstream answered it b'N' instead of 'S' to the PostgreSQL SSLRequest")


# -- the protocol by hand: what psql 15 does not send ------------------------------------------------
def _client_context(alpn: list[str] | None = None) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    if alpn:
        ctx.set_alpn_protocols(alpn)
    return ctx


def _read_message(sock) -> tuple[bytes, bytes]:
    head = _read_exactly(sock, 5)
    length = struct.unpack("!i", head[1:])[0]
    return head[:1], _read_exactly(sock, length - 4)


def _read_exactly(sock, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise ConnectionError(f"closed after {len(data)} of {size} bytes")
        data += chunk
    return data


def cluster_name(sock) -> str:
    """Start a session as `postgres` (trusted) and ask which server this is."""
    params = b"user\0postgres\0database\0postgres\0\0"
    sock.sendall(struct.pack("!ii", 8 + len(params), 196608) + params)
    kind = b""
    while kind != b"Z":                                 # ReadyForQuery
        kind, body = _read_message(sock)
        assert kind != b"E", body
    query = b"select current_setting('cluster_name')\0"
    sock.sendall(b"Q" + struct.pack("!i", 4 + len(query)) + query)
    value = None
    while kind != b"C":                                 # CommandComplete
        kind, body = _read_message(sock)
        assert kind != b"E", body
        if kind == b"D":                                # DataRow: Int16 columns, Int32 length, bytes
            length = struct.unpack("!i", body[2:6])[0]
            value = body[6:6 + length].decode()
    assert value is not None
    return value


def test_a_gssencrequest_is_answered_n_and_the_sslrequest_after_it_s(proxy, pg):
    """libpq asks for GSSAPI encryption first when it has Kerberos credentials; answered N, it
    falls back to the SSLRequest."""
    port = free_port()
    p = proxy(config(port, pg))
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        raw.sendall(GSSENC_REQUEST)
        assert raw.recv(1) == b"N"
        raw.sendall(SSL_REQUEST)
        assert raw.recv(1) == b"S"
        with _client_context().wrap_socket(raw, server_hostname="beta.db.test") as tls:
            assert cluster_name(tls) == "beta"
    assert p.wait_access(1) == ["200 tls beta.db.test beta"]


def test_direct_tls_of_postgresql_17_routes_by_its_sni(proxy, pg):
    """`sslnegotiation=direct` (PostgreSQL 17) is a ClientHello with ALPN postgresql and no
    SSLRequest before it: routed like any other. libpq 17 then requires the server to have selected
    ALPN postgresql, which `ssl.alpn` offers."""
    port = free_port()
    p = proxy(config(port, pg, ssl_extra="\n  alpn: [postgresql]"))
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, \
            _client_context(["postgresql"]).wrap_socket(raw, server_hostname="alpha.db.test") as tls:
        assert tls.selected_alpn_protocol() == "postgresql"
        assert cluster_name(tls) == "alpha"
    assert p.wait_access(1) == ["200 tls alpha.db.test alpha"]


@pytest.mark.parametrize("after, reason", [
    (b"GET / HTTP/1.1\r\n\r\n", "not a TLS ClientHello: not TLS: first byte 0x47 ('G')"),
    (SSL_REQUEST, "not a TLS ClientHello after the PostgreSQL SSLRequest: not TLS: first byte 0x00"),
    (None, "client closed the connection before a complete ClientHello"),
    (b"", "no complete ClientHello within 2s (ssl.preread_timeout)"),
])
def test_an_sslrequest_followed_by_no_clienthello_costs_only_its_session(proxy, pg, after, reason):
    port = free_port()
    p = proxy(config(port, pg))
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        raw.sendall(SSL_REQUEST)
        assert raw.recv(1) == b"S"
        if after is None:
            raw.shutdown(socket.SHUT_WR)
        else:
            raw.sendall(after)
        assert raw.recv(100) == b""                 # closed, nothing answered
    assert p.wait_access(1) == ["400 tls - -"]
    p.wait_log(reason)
    # the next client is served
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        raw.sendall(SSL_REQUEST)
        assert raw.recv(1) == b"S"
        with _client_context().wrap_socket(raw, server_hostname="alpha.db.test") as tls:
            assert cluster_name(tls) == "alpha"


def test_bytes_sent_with_the_sslrequest_before_its_answer_are_refused(proxy, pg):
    """What a client sends before the S cannot be part of the TLS stream (CVE-2021-23214's case)."""
    port = free_port()
    p = proxy(config(port, pg))
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        raw.sendall(SSL_REQUEST + b"\0\0\0\x08injected")
        assert raw.recv(100) == b""
    assert p.wait_access(1) == ["400 tls - -"]
    p.wait_log("PostgreSQL client sent 12 bytes after its SSLRequest, before the answer")


def test_an_sslrequest_in_pieces_is_answered_once_whole(proxy, pg):
    port = free_port()
    proxy(config(port, pg))
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        raw.sendall(SSL_REQUEST[:3])
        raw.settimeout(0.3)
        with pytest.raises(TimeoutError):
            raw.recv(1)
        raw.settimeout(10)
        raw.sendall(SSL_REQUEST[3:])
        assert raw.recv(1) == b"S"
        with _client_context().wrap_socket(raw, server_hostname="beta.db.test") as tls:
            assert cluster_name(tls) == "beta"
