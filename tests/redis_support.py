"""A real redis-server for tests: on its own loopback port below 32768, nothing saved to disk,
stopped by its pid."""

from __future__ import annotations

import socket
import ssl
import subprocess
from pathlib import Path

from tests.support import free_port, wait_until


class RedisServer:
    """`redis-server` on 127.0.0.1:port; `args` are more of its options (`--requirepass`, …).
    `tls`: (certificate, key) to serve TLS only, on that port."""

    def __init__(self, port: int | None = None, *args: str, tls: tuple[Path, Path] | None = None):
        self.port = port or free_port()
        self.args = args
        self.tls = tls
        self.proc: subprocess.Popen | None = None

    def start(self) -> RedisServer:
        ports = ["--port", str(self.port)]
        if self.tls is not None:
            ports = ["--port", "0", "--tls-port", str(self.port), "--tls-cert-file", str(self.tls[0]),
                     "--tls-key-file", str(self.tls[1]), "--tls-ca-cert-file", str(self.tls[0]),
                     "--tls-auth-clients", "no"]
        self.proc = subprocess.Popen(
            ["redis-server", *ports, "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--daemonize", "no", "--dir", "/tmp", "--logfile", "", *self.args],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_until(self.ping, timeout=10, what="redis-server to answer PING")
        return self

    def ping(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise AssertionError(f"redis-server exited with {self.proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock:
                if self.tls is not None:
                    context = ssl.create_default_context(cafile=str(self.tls[0]))
                    context.check_hostname = False
                    sock = context.wrap_socket(sock)
                sock.sendall(b"PING\r\n")
                return sock.recv(64).startswith((b"+PONG", b"-NOAUTH"))
        except OSError:
            return False

    def cli(self, *args: str) -> str:
        return subprocess.run(["redis-cli", "-p", str(self.port), *args], capture_output=True, text=True,
                              timeout=10).stdout

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
