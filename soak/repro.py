"""Minimal reproductions of the pyproxy bugs `make soak` found (each prints OK or BUG).

    .venv/bin/python -m soak.repro

1. A dead upstream (connect refused → status 502): a client that already sent bytes gets a RST,
   not the clean FIN that the 400/404 paths give (`Session._refuse` drains first; `_give_up` doesn't).
2. TLS half-close from the client on a terminated session: the client sends its request and a bare
   TCP FIN (no close_notify) — the very convention pyproxy uses itself ("Half-close on a TLS side is
   passed on as a TCP FIN without close_notify"). OpenSSL 3 on pyproxy's side calls that an
   "unexpected EOF", sends the client a fatal decode_error alert and refuses to write any more, so the
   upstream's answer never reaches the client. (The server context lacks ssl.OP_IGNORE_UNEXPECTED_EOF,
   which nginx sets.)
3. The upstream closes first on a terminated session: pyproxy passes the FIN to the client as a bare
   TCP FIN; an OpenSSL 3 client answers with a decode_error alert; pyproxy logs "client connection
   failed (71: Protocol error)" and resets the upstream (SO_LINGER 0), which had done nothing wrong.
4. After a reload the master holds prometheus_client's memory-mapped files (6 fds: it counts the
   reload), and every worker forked after that inherits them and keeps them (without status_listen
   nothing in the worker ever touches prometheus_client, which would close them). The README says
   "Workers close every inherited fd they do not own"; the soak's fd check sees +6 per process.
"""

from __future__ import annotations

import os
import socket
import ssl
import sys
import tempfile
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.support import (  # noqa: E402
    Proxy,
    Upstream,
    connect,
    expected_hash_reply,
    free_port,
    hash_handler,
    make_cert,
    recv_all,
    recv_line,
)


def main() -> int:
    work = Path(tempfile.mkdtemp(prefix="pyproxy-repro-"))
    make_cert(work, "t.example", ["t.example", "h.example"])
    upstream_resets: list[str] = []

    def bye_handler(conn: socket.socket, up: Upstream) -> None:
        """Answer, close first (FIN), then wait for the client's FIN."""
        conn.sendall(b"bye\n")
        conn.shutdown(socket.SHUT_WR)
        try:
            while conn.recv(65536):
                pass
        except ConnectionResetError:
            upstream_resets.append("reset")

    hasher = Upstream(hash_handler)
    closer = Upstream(bye_handler)
    plain, tls_port, dead = free_port(), free_port(), free_port()
    proxy = Proxy(work, f"""
stream_listen: [127.0.0.1:{plain}, 127.0.0.1:{tls_port} ssl]
ssl:
  default_certificate: {{cert: t.example.crt, key: t.example.key}}
services:
  - name: dead
    host: 127.0.0.1
    port: {dead}
    routes: [{{name: dead, protocols: [tcp], destinations: [{{port: {plain}}}]}}]
  - name: hash
    host: 127.0.0.1
    port: {hasher.port}
    routes: [{{name: hash, protocols: [tls], snis: [h.example]}}]
  - name: closer
    host: 127.0.0.1
    port: {closer.port}
    routes: [{{name: closer, protocols: [tls], snis: [t.example]}}]
""").start()
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    failed = 0
    try:
        # 1. dead upstream, client sent first
        with connect(plain) as sock:
            sock.sendall(b"hello\n")
            try:
                outcome = f"clean close, {len(recv_all(sock))} bytes"
            except ConnectionResetError:
                outcome = "RST"
        failed += report("1. 502 after the client sent bytes", outcome, outcome.startswith("clean"))

        # 2. TLS client half-close: the request goes up, the answer must come back
        payload = b"x" * 1000
        with ctx.wrap_socket(connect(tls_port), server_hostname="h.example") as sock:
            sock.sendall(payload)
            socket.socket.shutdown(sock, socket.SHUT_WR)     # a FIN, no close_notify
            try:
                reply = recv_line(sock)
                outcome = f"reply {reply!r}"
            except ssl.SSLError as exc:
                reply, outcome = b"", f"{exc.__class__.__name__}: {exc.reason}"
        failed += report("2. TLS half-close from the client", outcome, reply == expected_hash_reply(payload))

        # 3. upstream closes first on a terminated session
        with ctx.wrap_socket(connect(tls_port), server_hostname="t.example") as sock:
            data = recv_all(sock)        # b"bye\n", then the FIN pyproxy passes on
        done = threading.Event()
        threading.Timer(1.0, done.set).start()
        done.wait()
        outcome = f"client got {data!r}; upstream saw {'a RST' if upstream_resets else 'a clean close'}"
        failed += report("3. upstream closes first (TLS terminated)", outcome, not upstream_resets)
        log = proxy.log_text()
        if "Protocol error" in log:
            print("   error log: " + next(line for line in log.splitlines() if "Protocol error" in line))

        # 4. workers forked after a reload inherit the master's metrics files
        proxy.reload()
        proxy.reload()
        inherited = []
        for pid in proxy.worker_pids():
            for fd in os.listdir(f"/proc/{pid}/fd"):
                try:
                    target = os.readlink(f"/proc/{pid}/fd/{fd}")
                except OSError:
                    continue
                if f"_{proxy.pid}.db" in target:
                    inherited.append(f"worker {pid} fd {fd} -> {target}")
        failed += report("4. workers hold the master's metrics files after a reload",
                         f"{len(inherited)} such fds" + (f", e.g. {inherited[0]}" if inherited else ""),
                         not inherited)
    finally:
        proxy.stop()
        hasher.stop()
        closer.stop()
    return 1 if failed else 0


def report(what: str, outcome: str, ok: bool) -> int:
    print(f"{'OK ' if ok else 'BUG'} {what}: {outcome}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
