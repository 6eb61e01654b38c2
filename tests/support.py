"""Shared test machinery: free ports below 32768, real upstream servers, a real pyproxy process.

Everything here talks to loopback only and every wait is bounded.
"""

from __future__ import annotations

import hashlib
import os
import random
import signal
import socket
import socketserver
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable
from pathlib import Path

import psutil

from pyproxy.demo.echo import echo

PORT_RANGE = (20000, 32000)     # below the ephemeral range (32768+), where client ports live
_used_ports: set[int] = set()
_port_lock = threading.Lock()


def free_port(host: str = "127.0.0.1") -> int:
    """A port below 32768 that nothing listens on right now (checked by binding it)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    rng = random.Random(os.getpid() ^ time.monotonic_ns())
    with _port_lock:
        for _ in range(500):
            port = rng.randrange(*PORT_RANGE)
            if port in _used_ports:
                continue
            with socket.socket(family, socket.SOCK_STREAM) as probe:
                try:
                    probe.bind((host, port))
                except OSError:
                    continue
            _used_ports.add(port)
            return port
    raise RuntimeError("no free port found below 32768")


def wait_until(predicate: Callable[[], object], timeout: float = 10.0, interval: float = 0.02,
               what: str = ""):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what or predicate}")


# -- upstreams -----------------------------------------------------------------------------------
class _Server(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True
    request_queue_size = 256


class Upstream:
    """A real threaded TCP server running `handler(conn, upstream)` per connection."""

    def __init__(self, handler: Callable[[socket.socket, Upstream], None], host: str = "127.0.0.1",
                 port: int | None = None, name: str = "up"):
        self.name = name
        self.handler = handler
        self.connections = 0
        self.lock = threading.Lock()
        port = port or free_port(host)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        outer = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self):
                with outer.lock:
                    outer.connections += 1
                try:
                    outer.handler(self.request, outer)
                except OSError:
                    pass

        server_class = type("S", (_Server,), {"address_family": family})
        self.server = server_class((host, port), Handler)
        self.host, self.port = host, port
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.1},
                                       daemon=True)
        self.thread.start()

    @property
    def target(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def echo_handler(conn: socket.socket, up: Upstream) -> None:
    """Echo until EOF, then half-close back."""
    echo(conn)


def tag_handler(conn: socket.socket, up: Upstream) -> None:
    """Say who we are (`name\\n`), then echo: lets a test see which backend answered."""
    conn.sendall(f"{up.name}\n".encode())
    echo_handler(conn, up)


def hash_handler(conn: socket.socket, up: Upstream) -> None:
    """Read until the client half-closes, then answer `<byte count> <sha256>\\n` and close."""
    digest = hashlib.sha256()
    total = 0
    while True:
        data = conn.recv(262144)
        if not data:
            break
        digest.update(data)
        total += len(data)
    conn.sendall(f"{total} {digest.hexdigest()}\n".encode())
    conn.shutdown(socket.SHUT_WR)


def pattern_bytes(size: int, seed: int = 7) -> bytes:
    """Deterministic pseudo-random bytes (fast: repeated blocks of a seeded stream)."""
    rng = random.Random(seed)
    block = rng.randbytes(1 << 20)
    return (block * (size // len(block) + 1))[:size]


def source_handler_for(size: int) -> Callable[[socket.socket, Upstream], None]:
    """An upstream that sends `size` pattern bytes on connect, then closes."""
    payload = pattern_bytes(size)

    def handler(conn: socket.socket, up: Upstream) -> None:
        conn.sendall(payload)
        conn.shutdown(socket.SHUT_WR)
        while conn.recv(65536):
            pass
    return handler


# -- clients -------------------------------------------------------------------------------------
def connect(port: int, host: str = "127.0.0.1", source: str | None = None,
            timeout: float = 10.0) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    if source:
        sock.bind((source, 0))
    sock.connect((host, port))
    return sock


def recv_line(sock: socket.socket, limit: int = 65536) -> bytes:
    data = b""
    while not data.endswith(b"\n") and len(data) < limit:
        chunk = sock.recv(1)
        if not chunk:
            break
        data += chunk
    return data


def recv_all(sock: socket.socket) -> bytes:
    chunks = []
    while True:
        chunk = sock.recv(262144)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


def upload_and_hash(port: int, payload: bytes, host: str = "127.0.0.1") -> bytes:
    """Send payload, half-close, return what the (hash) upstream answered."""
    with connect(port, host, timeout=30) as sock:
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        return recv_all(sock)


def expected_hash_reply(payload: bytes) -> bytes:
    return f"{len(payload)} {hashlib.sha256(payload).hexdigest()}\n".encode()


# -- a real pyproxy process ----------------------------------------------------------------------
class Proxy:
    """`python -m pyproxy -c <tmp>/pyproxy.conf` with its error and access logs in files."""

    def __init__(self, workdir: Path, config: str, extra_args: tuple[str, ...] = ()):
        self.dir = workdir
        self.conf = workdir / "pyproxy.conf"
        self.error_log = workdir / "error.log"
        self.access_log = workdir / "access.log"
        self.pid_file = workdir / "pyproxy.pid"
        self.write_config(config)
        self.extra_args = extra_args
        self.proc: subprocess.Popen | None = None

    def write_config(self, body: str) -> None:
        """Write a config; error_log/access_log/pid default to files in the work dir."""
        body = textwrap.dedent(body)
        head = []
        if "error_log:" not in body:
            head.append(f"error_log: {self.error_log}")
        if "access_log:" not in body:
            head.append(f"access_log: {self.access_log}")
        if "pid:" not in body:
            head.append(f"pid: {self.pid_file}")
        if "log_level:" not in body:
            head.append("log_level: info")
        self.conf.write_text("\n".join(head) + "\n" + body)

    def command(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "pyproxy", "-c", str(self.conf), *args]

    def run_cli(self, *args: str, timeout: float = 30) -> subprocess.CompletedProcess:
        return subprocess.run(self.command(*args), capture_output=True, text=True, timeout=timeout)

    def start(self, wait: bool = True, own_group: bool = False) -> Proxy:
        """`own_group`: run in a process group of its own, which a test may signal as a whole."""
        self.stdout = open(self.dir / "stdout.txt", "wb")    # noqa: SIM115 (closed by stop())
        self.stderr = open(self.dir / "stderr.txt", "wb")    # noqa: SIM115 (closed by stop())
        self.proc = subprocess.Popen(self.command(*self.extra_args), stdout=self.stdout, stderr=self.stderr,
                                     stdin=subprocess.DEVNULL, process_group=0 if own_group else None)
        if wait:
            self.wait_log("ready:", timeout=20)
        return self

    def log_text(self) -> str:
        try:
            return self.error_log.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_log(self, needle: str, timeout: float = 10.0, count: int = 1) -> str:
        def seen():
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"pyproxy exited with {self.proc.returncode}:\n{self.log_text()}\n"
                                     f"{(self.dir / 'stderr.txt').read_text(errors='replace')}")
            return self.log_text().count(needle) >= count
        wait_until(seen, timeout, what=f"{needle!r} x{count} in the error log")
        return self.log_text()

    def access_lines(self) -> list[str]:
        try:
            return self.access_log.read_text().splitlines()
        except FileNotFoundError:
            return []

    def wait_access(self, count: int, timeout: float = 10.0) -> list[str]:
        wait_until(lambda: len(self.access_lines()) >= count, timeout, what=f"{count} access log lines")
        return self.access_lines()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def worker_pids(self) -> list[int]:
        """The master's worker processes (not its status process), told apart by their title."""
        return [pid for pid, title in self.children() if title.startswith("pyproxy: worker process")]

    def children(self) -> list[tuple[int, str]]:
        """(pid, process title) of each live child of the master."""
        found = []
        for child in psutil.Process(self.pid).children():
            try:
                found.append((child.pid, " ".join(part for part in child.cmdline() if part)))
            except psutil.NoSuchProcess:        # it exited meanwhile (an old worker)
                continue
        return found

    def send_signal(self, sig: int) -> None:
        os.kill(self.pid, sig)

    def reload(self, config: str | None = None, expect: str = "reload complete", timeout: float = 20) -> None:
        """Rewrite the config (if given), send HUP, wait for the master to say how it went."""
        if config is not None:
            self.write_config(config)
        done = self.log_text().count(expect)
        self.send_signal(signal.SIGHUP)
        self.wait_log(expect, timeout=timeout, count=done + 1)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15) -> int:
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        for fh in (self.stdout, self.stderr):
            fh.close()
        # Workers never outlive their master (they poll getppid); make sure in tests anyway.
        return self.proc.returncode


# -- TLS -----------------------------------------------------------------------------------------
def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def make_ca(directory: Path, name: str = "test-ca") -> tuple[Path, Path]:
    """A self-signed CA certificate and key."""
    crt, key = directory / f"{name}.crt", directory / f"{name}.key"
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-days", "3",
             "-subj", f"/CN={name}", "-keyout", str(key), "-out", str(crt), cwd=directory)
    return crt, key


def make_cert(directory: Path, name: str, sans: list[str],
              ca: tuple[Path, Path] | None = None) -> tuple[Path, Path]:
    """A leaf certificate for `sans` (DNS names), self-signed or signed by `ca`."""
    stem = name.replace("*", "wildcard")
    crt, key = directory / f"{stem}.crt", directory / f"{stem}.key"
    san = "subjectAltName=" + ",".join(f"DNS:{s}" for s in sans)
    if ca is None:
        _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                 "-days", "3", "-subj", f"/CN={name}", "-addext", san, "-keyout", str(key), "-out", str(crt),
                 cwd=directory)
    else:
        csr = directory / f"{stem}.csr"
        ext = directory / f"{stem}.ext"
        ext.write_text(san + "\n")
        _openssl("req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                 "-subj", f"/CN={name}", "-keyout", str(key), "-out", str(csr), cwd=directory)
        _openssl("x509", "-req", "-in", str(csr), "-CA", str(ca[0]), "-CAkey", str(ca[1]), "-CAcreateserial",
                 "-days", "3", "-extfile", str(ext), "-out", str(crt), cwd=directory)
    os.chmod(key, 0o600)
    return crt, key


def tls_handler_for(cert: tuple[Path, Path], inner: Callable[[socket.socket, Upstream], None]):
    """An upstream handler that terminates TLS with `cert`, then runs `inner` on the decrypted stream."""
    import ssl

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(str(cert[0]), str(cert[1]))

    def handler(conn: socket.socket, up: Upstream) -> None:
        try:
            tls = ctx.wrap_socket(conn, server_side=True)
        except (ssl.SSLError, OSError):
            return
        inner(tls, up)
    return handler


def s_client_lines(port: int, until: bytes, *args: str, timeout: float = 15.0) -> list[bytes]:
    """What `openssl s_client -connect 127.0.0.1:PORT ARGS…` prints up to the line `until` (or its
    end, killed after `timeout`). Its stdin stays open: at its EOF s_client quits before reading."""
    client = subprocess.Popen(["openssl", "s_client", "-connect", f"127.0.0.1:{port}", *args],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    timer = threading.Timer(timeout, client.kill)
    timer.start()
    try:
        lines = [client.stdout.readline()]
        while lines[-1] and lines[-1] != until:
            lines.append(client.stdout.readline())
    finally:
        timer.cancel()
        client.kill()
        client.wait(10)
        client.stdin.close()
        client.stdout.close()
    return lines


def tls_client(port: int, server_name: str | None, host: str = "127.0.0.1", timeout: float = 10.0):
    """A TLS client that accepts any certificate (the tests look at which one it got)."""
    import ssl

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    sock = connect(port, host, timeout=timeout)
    return ctx.wrap_socket(sock, server_hostname=server_name)


def peer_common_name(tls_sock) -> str:
    """The CN of the certificate the server presented (parsed from DER with the openssl CLI)."""
    der = tls_sock.getpeercert(binary_form=True)
    out = subprocess.run(["openssl", "x509", "-inform", "DER", "-noout", "-subject", "-nameopt", "multiline"],
                         input=der, capture_output=True, timeout=10).stdout.decode()
    for line in out.splitlines():
        if "commonName" in line:
            return line.split("=", 1)[1].strip()
    return ""
