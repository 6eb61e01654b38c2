"""An echo server that greets like the echo service in Kong's TCP how-to, then echoes every byte.

    Welcome, you are connected to node <hostname>.
    Running on Pod <name>.
    In namespace default.
    With IP address <ip>.

Used by `make run` behind pyproxy, and by the tests as a real upstream. Run alone with
`python -m pyproxy.demo.echo --listen 127.0.0.1:1025 [--name echo-1]`.
"""

from __future__ import annotations

import argparse
import socket
import socketserver
import threading

from pyproxy.addresses import family_of


def greeting(name: str, ip: str) -> bytes:
    return (f"Welcome, you are connected to node {socket.gethostname()}.\n"
            f"Running on Pod {name}.\n"
            f"In namespace default.\n"
            f"With IP address {ip}.\n").encode()


def echo(conn: socket.socket) -> None:
    """Send back what `conn` sends until its EOF, then half-close (the test suite's echo upstream
    uses it too)."""
    while True:
        data = conn.recv(65536)
        if not data:
            break
        conn.sendall(data)
    conn.shutdown(socket.SHUT_WR)


class _Handler(socketserver.BaseRequestHandler):
    server: _Server

    def handle(self) -> None:
        conn: socket.socket = self.request
        try:
            conn.sendall(greeting(self.server.name, conn.getsockname()[0]))
            echo(conn)
        except OSError:
            pass


class _Server(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True
    request_queue_size = 128
    name = ""


class _Server6(_Server):
    address_family = socket.AF_INET6


class EchoServer:
    """A threaded echo server on (host, port); `start()` returns once it is listening."""

    def __init__(self, host: str = "127.0.0.1", port: int = 1025, name: str | None = None):
        server_class = _Server6 if family_of(host) == socket.AF_INET6 else _Server
        self.server = server_class((host, port), _Handler)
        self.server.name = name or f"echo-{port}"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.2},
                                       daemon=True, name=f"echo {host}:{port}")

    @property
    def address(self) -> tuple[str, int]:
        host, port = self.server.server_address[:2]
        return str(host), int(port)

    def start(self) -> EchoServer:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pyproxy.demo.echo", description=__doc__.splitlines()[0])
    parser.add_argument("--listen", default="127.0.0.1:1025", help="address:port (default 127.0.0.1:1025)")
    parser.add_argument("--name", default=None, help="the Pod name in the greeting")
    args = parser.parse_args(argv)
    host, _, port = args.listen.rpartition(":")
    try:
        server = EchoServer(host.strip("[]") or "127.0.0.1", int(port), args.name)
    except OSError as exc:
        print(f"echo: cannot listen on {args.listen}: {exc.strerror}")
        return 1
    print(f"echo: listening on {args.listen}")
    try:
        server.server.serve_forever(poll_interval=0.2)
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
