"""Small servers and TLS clients for the rows wrk and iperf3 cannot measure.

    python -m bench.tlsload sink PORT                  # reads and discards (the TLS bulk upstream)
    python -m bench.tlsload tag PORT LETTER            # writes LETTER to each connection, closes (reloads)
    python -m bench.tlsload bulk PORT --seconds 5      # one TLS stream pushing bytes; prints JSON
    python -m bench.tlsload handshakes PORT --names FILE --seconds 5 --processes 4

`bulk` writes 1 MiB buffers through one TLS connection for the given time and counts the bytes its
TLS layer accepted: what is still in flight at the end (the socket buffers, a few MiB) is under 1 %
of what a run moves. `handshakes` runs `--processes` client processes, each making connection after
connection: a full TLS handshake with a server name drawn at random from `--names` (no resumption:
a client meets each name rarely), one HTTP request with `Connection: close` (TCP_NODELAY set, as
wrk does), the answer read to the end. Both print one line of JSON. The clients are C (OpenSSL) for
everything but a few calls per buffer or per connection, and the same for every proxy.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import ssl
import sys
import threading
import time

LOOPBACK = "127.0.0.1"
BULK_BUFFER = 1 << 20
REQUEST = b"GET / HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n"


def _serve(port: int, handle) -> None:
    """Accept forever on 127.0.0.1:`port`, one thread per connection running `handle(conn)`."""
    listener = socket.create_server((LOOPBACK, port), backlog=4096)
    while True:
        conn, _ = listener.accept()
        threading.Thread(target=handle, args=(conn,), daemon=True).start()


def _discard(conn: socket.socket) -> None:
    buffer = bytearray(BULK_BUFFER)
    with conn:
        try:
            while conn.recv_into(buffer):
                pass
        except OSError:
            pass


def _client_context() -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def bulk(port: int, seconds: float) -> dict[str, float]:
    """Push bytes through one TLS connection to 127.0.0.1:`port` for `seconds`."""
    data = memoryview(bytes(BULK_BUFFER))
    with socket.create_connection((LOOPBACK, port), timeout=30) as raw, \
            _client_context().wrap_socket(raw, server_hostname="localhost") as tls:
        sent = 0
        started = time.perf_counter()
        deadline = started + seconds
        while time.perf_counter() < deadline:
            tls.sendall(data)
            sent += BULK_BUFFER
        elapsed = time.perf_counter() - started
        version = tls.version()
    return {"bytes": sent, "seconds": elapsed, "gbit_s": sent * 8 / elapsed / 1e9, "version": version}


def _handshake_loop(port: int, names: list[str], deadline: float, out: int) -> None:
    """One client process: connections until `deadline`; writes "done errors" to the pipe `out`."""
    context = _client_context()
    pick = random.Random(os.getpid()).choice
    done = errors = 0
    buffer = bytearray(4096)
    while time.perf_counter() < deadline:
        try:
            with socket.create_connection((LOOPBACK, port), timeout=10) as raw:
                # As wrk does: with Nagle on, a request written while the client's Finished is not
                # acknowledged yet waits for that ACK, which a server that sends nothing right after
                # the handshake (pyproxy holds its TLS 1.3 ticket until its first reply) delays by
                # the peer's delayed-ACK timer, 40 ms on Linux.
                raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                with context.wrap_socket(raw, server_hostname=pick(names)) as tls:
                    tls.sendall(REQUEST)
                    while tls.recv_into(buffer):
                        pass
            done += 1
        except (OSError, ssl.SSLError):
            errors += 1
    os.write(out, f"{done} {errors}\n".encode())


def handshakes(port: int, names: list[str], seconds: float, processes: int) -> dict[str, float]:
    """`processes` clients making full handshakes with random server names for `seconds`."""
    read_end, write_end = os.pipe()
    started = time.perf_counter()
    deadline = started + seconds
    children = []
    for _ in range(processes):
        pid = os.fork()
        if pid == 0:
            try:
                os.close(read_end)
                _handshake_loop(port, names, deadline, write_end)
            finally:
                os._exit(0)
        children.append(pid)
    os.close(write_end)
    for pid in children:
        os.waitpid(pid, 0)
    elapsed = time.perf_counter() - started
    with os.fdopen(read_end) as results:
        counts = [tuple(map(int, line.split())) for line in results]
    done, errors = sum(c[0] for c in counts), sum(c[1] for c in counts)
    return {"connections": done, "errors": errors, "seconds": elapsed, "rate": done / elapsed}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.tlsload", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    sink = commands.add_parser("sink", help="read and discard every connection's bytes")
    sink.add_argument("port", type=int)
    tag = commands.add_parser("tag", help="write LETTER to every connection and close it")
    tag.add_argument("port", type=int)
    tag.add_argument("letter")
    push = commands.add_parser("bulk", help="one TLS stream pushing bytes")
    push.add_argument("port", type=int)
    push.add_argument("--seconds", type=float, default=5.0)
    shake = commands.add_parser("handshakes", help="new TLS connections with random server names")
    shake.add_argument("port", type=int)
    shake.add_argument("--names", required=True, help="a file of server names, one a line")
    shake.add_argument("--seconds", type=float, default=5.0)
    shake.add_argument("--processes", type=int, default=4)
    args = parser.parse_args(argv)
    if args.command == "sink":
        _serve(args.port, _discard)
    elif args.command == "tag":
        letter = args.letter.encode()

        def answer(conn: socket.socket) -> None:
            with conn:
                conn.sendall(letter)
        _serve(args.port, answer)
    elif args.command == "bulk":
        print(json.dumps(bulk(args.port, args.seconds)))
    else:
        with open(args.names) as lines:
            names = [line.strip() for line in lines if line.strip()]
        print(json.dumps(handshakes(args.port, names, args.seconds, args.processes)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
