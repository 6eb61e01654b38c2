"""The floor under pyproxy's TLS handshake row: the least a CPython TLS terminator can do per session,
measured beside nginx and pyproxy in the same interleaved rounds.

    python -m bench.floor                      # 4 rounds of 5 s; about 2 minutes
    python -m bench.floor --rounds 6 --bio socket

The `tls-handshake` row of `bench.run` (wrk, 50 connections, `Connection: close`: a resumed TLS 1.3
handshake, one request, the upstream's answer and its close per session) is run against nginx's stream
module, pyproxy, and `serve` below: a terminator of some 100 lines with nothing pyproxy has but the
TLS (no preread unless `--preread`, no routing, no timers, no plugins, no log, no half-close, no
backpressure), on the same certificate, context options and upstream, with as many worker processes.
With `--bio memory` (the default) OpenSSL reads and writes through memory BIOs as pyproxy's
TLSStream does; with `--bio socket` it reads and writes the socket itself (CPython's SSLSocket way),
which costs fewer interpreter steps per session but gives up what pyproxy's TLSStream needs memory
BIOs for (README, "What a terminated TLS session costs"). Each target's rate and CPU per handshake
(its processes' user + system time over the handshakes) is printed per round, then the medians and
the ratios to nginx. The rate follows the inverse of the proxy's CPU per handshake (README), so the
floor's ratio is about the best any Python design on this interpreter can reach on this row.

Only loopback, ports from `--base-port` (below 32768); every process started is stopped by pid.
"""

from __future__ import annotations

import _socket
import argparse
import datetime
import os
import select
import shlex
import socket
import ssl
import statistics
import sys
import time

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import configs
from bench.configs import LOOPBACK, Layout
from bench.processes import Fleet, total_cpu_seconds
from bench.run import DEFAULT_BASE_PORT, RESULTS_DIR, UPSTREAM_WORKERS, WORKERS, start_proxy
from bench.tools import run_wrk

CONNECTIONS = 50            # as the tls-handshake row
THREADS = 2
FLOOR_PORT_OFFSET = 50      # the floor's port: past the layout's four targets (4 x PORT_STRIDE)
EVENTS = select.EPOLLIN | select.EPOLLOUT | select.EPOLLRDHUP | select.EPOLLET
BUFFER = 65536


class _Socket(_socket.socket):
    """The C socket, weak-referenceable as SSLContext._wrap_socket requires."""

    __slots__ = ("__weakref__",)


def serve(port: int, upstream_port: int, cert: str, key: str, bio: str, preread: bool) -> None:
    """One worker of the floor, in this process, until killed."""
    from pyproxy.tls.clienthello import parse_client_hello

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    # pyproxy's server context options (pyproxy.tls.contexts), so OpenSSL does the same work.
    context.options |= (ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE | ssl.OP_NO_RENEGOTIATION
                        | ssl.OP_IGNORE_UNEXPECTED_EOF)
    context.num_tickets = 1
    memory = bio == "memory"
    upstream_addr = (LOOPBACK, upstream_port)
    scratch = memoryview(bytearray(BUFFER))
    want_read = ssl.SSLWantReadError
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    listener.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    listener.bind((LOOPBACK, port))
    listener.listen(configs.LISTEN_BACKLOG)
    epoll = select.epoll()
    handlers = {}

    class Session:
        __slots__ = ("client", "fd", "tls", "incoming", "outgoing", "upstream", "upstream_fd", "state")

        def fill(self) -> bool:
            try:
                n = self.client.recv_into(scratch)
            except BlockingIOError:
                return False
            except OSError:
                n = 0
            if n:
                self.incoming.write(scratch[:n])
            else:
                self.incoming.write_eof()
            return True

        def flush(self) -> None:
            if self.outgoing.pending:
                try:
                    self.client.send(self.outgoing.read())
                except OSError:
                    pass

        def on_client(self, mask: int) -> None:
            if self.state == 0:         # preread: the whole ClientHello, peeked and parsed
                try:
                    n = self.client.recv_into(scratch, BUFFER, socket.MSG_PEEK)
                except OSError:
                    return
                if parse_client_hello(bytes(scratch[:n]), BUFFER) is None:
                    return
                self.state = 1
            if self.state == 1:         # handshake
                try:
                    while True:
                        try:
                            self.tls.do_handshake()
                            break
                        except want_read:
                            if not memory:
                                return
                            self.flush()
                            if not self.fill():
                                return
                    if memory:
                        self.flush()
                except (ssl.SSLError, OSError):
                    self.close()
                    return
                upstream = self.upstream = _socket.socket(socket.AF_INET,
                                                          socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
                upstream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                upstream.connect_ex(upstream_addr)
                self.upstream_fd = upstream.fileno()
                epoll.register(self.upstream_fd, EVENTS)
                handlers[self.upstream_fd] = self.on_upstream
                self.state = 2
            elif self.state == 3:
                self.to_upstream()

        def on_upstream(self, mask: int) -> None:
            if self.state == 2 and mask & select.EPOLLOUT:
                self.state = 3
                self.to_upstream()
            if self.state == 3:
                self.to_client()

        def to_upstream(self) -> None:
            while True:
                try:
                    data = self.tls.read(BUFFER)
                except want_read:
                    if memory and self.fill():
                        continue
                    return
                except (ssl.SSLError, OSError):
                    data = b""
                if not data:
                    self.close()
                    return
                self.upstream.send(data)

        def to_client(self) -> None:
            while True:
                try:
                    data = self.upstream.recv(BUFFER)
                except BlockingIOError:
                    return
                except OSError:
                    data = b""
                if not data:
                    try:
                        self.tls.shutdown()
                    except (ssl.SSLError, OSError):
                        pass
                    if memory:
                        self.flush()
                    self.close()
                    return
                try:
                    self.tls.write(data)
                except (ssl.SSLError, OSError):
                    self.close()
                    return
                if memory:
                    self.flush()

        def close(self) -> None:
            if self.state == 4:
                return
            self.state = 4
            handlers.pop(self.fd, None)
            self.client.close()
            if self.upstream is not None:
                handlers.pop(self.upstream_fd, None)
                self.upstream.close()

    accept = listener._accept  # type: ignore[attr-defined]  # the C accept: no Python wrapper

    def on_accept(mask: int) -> None:
        for _ in range(64):
            try:
                fd, _addr = accept()
            except BlockingIOError:
                return
            except OSError:
                continue
            session = Session()
            session.client = client = _Socket(socket.AF_INET, socket.SOCK_STREAM, 0, fd)
            client.setblocking(False)
            session.fd = fd
            session.upstream = None
            session.state = 0 if preread else 1
            if memory:
                session.incoming = incoming = ssl.MemoryBIO()
                session.outgoing = outgoing = ssl.MemoryBIO()
                session.tls = context._wrap_bio(incoming, outgoing, True, None)  # type: ignore[attr-defined]
            else:
                session.tls = context._wrap_socket(client, True, None)  # type: ignore[attr-defined]
            epoll.register(fd, EVENTS)
            handlers[fd] = session.on_client

    epoll.register(listener.fileno(), select.EPOLLIN)
    handlers[listener.fileno()] = on_accept
    while True:
        for fd, mask in epoll.poll(1.0, 512):
            handler = handlers.get(fd)
            if handler is not None:
                handler(mask)


def start_floor(fleet: Fleet, port: int, upstream_port: int, cert: configs.Certificate, bio: str,
                preread: bool) -> None:
    """The floor's workers, one process each (SO_REUSEPORT), as server "floor"."""
    argv = [sys.executable, "-m", "bench.floor", "--serve", str(port), str(upstream_port), cert.cert,
            cert.key, bio, "1" if preread else "0"]
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    fleet.start("floor", ["sh", "-c", " & ".join([shlex.join(argv)] * WORKERS) + "; wait"], cwd=here)
    fleet.wait_ready("floor", [port], processes=1 + WORKERS)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.floor", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--duration", type=int, default=5, help="seconds of wrk per target and round")
    parser.add_argument("--bio", choices=("memory", "socket"), default="memory")
    parser.add_argument("--preread", action="store_true", help="peek at and parse the ClientHello first")
    parser.add_argument("--base-port", type=int, default=DEFAULT_BASE_PORT)
    parser.add_argument("--serve", nargs=6, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        port, upstream_port, cert, key, bio, preread = args.serve
        serve(int(port), int(upstream_port), cert, key, bio, preread == "1")
        return 0
    layout = Layout(args.base_port)
    floor_port = args.base_port + FLOOR_PORT_OFFSET
    run_dir = os.path.join(RESULTS_DIR, "floor-" + datetime.datetime.now().strftime("%Y%m%d-%H%M%S"))
    os.makedirs(run_dir)
    names = ("nginx", "pyproxy", "floor")
    results: dict[str, list[tuple[float, float]]] = {name: [] for name in names}
    with Fleet(run_dir) as fleet:
        files = configs.write_configs(run_dir, layout, WORKERS, "ec", UPSTREAM_WORKERS)
        up = layout.upstream
        fleet.start("upstream-http", ["nginx", "-p", run_dir, "-c", files.upstream_nginx,
                                      "-e", os.path.join(run_dir, "upstream-http.error.log")])
        fleet.wait_ready("upstream-http", [up.http, up.https], processes=1 + UPSTREAM_WORKERS)
        for proxy in ("nginx", "pyproxy"):
            start_proxy(fleet, proxy, proxy, files, layout, run_dir)
        start_floor(fleet, floor_port, up.http, files.cert, args.bio, args.preread)
        ports = {"nginx": layout.front("nginx").https, "pyproxy": layout.front("pyproxy").https,
                 "floor": floor_port}

        def url(name: str) -> str:
            return f"https://{LOOPBACK}:{ports[name]}/"

        for name in names:          # warm-up: contexts, caches, the clients' first full handshakes
            run_wrk(url(name), connections=CONNECTIONS, threads=THREADS, duration=1,
                    headers=["Connection: close"])
        print(f"floor: --bio {args.bio}{' --preread' if args.preread else ''}, {WORKERS} workers each; "
              f"rate (hs/s) and CPU per handshake (µs)", flush=True)
        for number in range(args.rounds):
            order = names if number % 2 == 0 else names[::-1]
            for name in order:
                time.sleep(0.5)
                processes = fleet.servers[name].processes()
                before = total_cpu_seconds(processes)
                result = run_wrk(url(name), connections=CONNECTIONS, threads=THREADS, duration=args.duration,
                                 headers=["Connection: close"])
                cpu = total_cpu_seconds(processes) - before
                results[name].append((result.rate, cpu / max(result.requests, 1) * 1e6))
            print("  ".join(f"{name} {results[name][-1][0]:7,.0f} {results[name][-1][1]:5.0f}"
                            for name in names), flush=True)
    rate = {name: statistics.median(r for r, _ in results[name]) for name in names}
    cpu = {name: statistics.median(c for _, c in results[name]) for name in names}
    for name in names:
        print(f"{name:8} median {rate[name]:7,.0f} hs/s ({rate[name] / rate['nginx']:.2f}x nginx), "
              f"{cpu[name]:5.0f} µs CPU per handshake ({cpu[name] / cpu['nginx']:.2f}x nginx)")
    print(f"results: {os.path.relpath(run_dir)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
