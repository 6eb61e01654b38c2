"""A session without a worker process: a WorkerContext around this test's own loop, the client on
a real socketpair (or a loopback connection), a real echo upstream, the bytes compared by hash."""

from __future__ import annotations

import hashlib
import os
import socket
import ssl
import threading
from pathlib import Path

import pytest

from pyproxy.config import load_config
from pyproxy.config.model import STATUS_BAD_GATEWAY, STATUS_NO_ROUTE, STATUS_OK
from pyproxy.context import WorkerContext
from pyproxy.forward import SCRATCH_SIZE, PipePool
from pyproxy.log import ErrorLog
from pyproxy.loop import Loop
from pyproxy.plugins import PluginChains, PluginContext
from pyproxy.router import Router
from pyproxy.session import Session
from pyproxy.shared import SharedState
from pyproxy.tls.contexts import TLSContexts
from pyproxy.upstream import build_balancers
from tests.support import echo_handler, free_port, make_cert, pattern_bytes

PAYLOAD = pattern_bytes(3 * 1024 * 1024 + 17)     # past BufferPump's bulk threshold: splice too
TIMEOUT = 10.0


class Harness:
    """One worker's context without the worker: `run(client)` starts a session on `client` and
    runs the loop until it closes."""

    def __init__(self, tmp_path: Path, body: str):
        self.error_log = tmp_path / "error.log"
        conf = tmp_path / "pyproxy.conf"
        conf.write_text(f"error_log: {self.error_log}\nlog_level: info\n{body}")
        config = load_config(str(conf))
        self.config = config
        self.loop = Loop()
        self.log = ErrorLog(str(self.error_log), "info")
        self.shared = SharedState()
        self.closed: list[Session] = []
        tls = self.tls = TLSContexts(config)
        tls.install()               # as the master does before it forks a worker
        self.pool = PipePool()
        self.ctx = WorkerContext(
            loop=self.loop, config=config, log=self.log, router=Router(config.routes, config.stream_listen),
            services={s.name: s for s in config.services},
            balancers=build_balancers(config, log=self.log.log),
            plugins=PluginChains(config, PluginContext(self.log.log, self.shared, str(tmp_path))),
            server_tls=tls.server, upstream_tls=tls.upstream, congestion={},
            scratch=memoryview(bytearray(SCRATCH_SIZE)), pool=self.pool, metrics=None,
            closed=self.session_closed, linger=self.linger, reject_credit={})

    def session_closed(self, session: Session) -> None:
        self.closed.append(session)

    def linger(self, sock) -> None:
        self.loop.forget(sock.fileno())
        sock.close()

    def run(self, client: socket.socket, client_addr=("127.0.0.1", 40000)) -> Session:
        client.setblocking(False)
        listen = self.config.stream_listen[0]
        session = Session(self.ctx, listen, client, client_addr, serial=1,
                          server_tls=self.tls.listeners.get(listen.key))
        session.start()
        deadline = self.loop.now + TIMEOUT
        while not self.closed and self.loop.now < deadline:
            self.loop.run_once()
        assert self.closed == [session], "the session did not end in time"
        return session

    def close(self) -> None:
        self.pool.close()
        self.loop.close()
        self.log.close()


@pytest.fixture
def harness(tmp_path):
    made: list[Harness] = []

    def make(body: str) -> Harness:
        made.append(Harness(tmp_path, body))
        return made[-1]

    yield make
    for h in made:
        h.close()


def talk(sock: socket.socket, payload: bytes, result: dict) -> None:
    """The client: send `payload` and end its stream (meanwhile, from a thread of its own), hash
    everything that comes back until EOF."""

    def send() -> None:
        try:
            sock.sendall(payload)
            sock.shutdown(socket.SHUT_WR)
        except OSError as exc:          # refused: the session closed before reading it all
            result["send_error"] = exc

    digest = hashlib.sha256()
    received = 0
    try:
        sock.settimeout(TIMEOUT)
        sender = threading.Thread(target=send)
        sender.start()
        while chunk := sock.recv(65536):
            digest.update(chunk)
            received += len(chunk)
        sender.join(TIMEOUT)
        result["digest"], result["received"] = digest.hexdigest(), received
    except OSError as exc:
        result["error"] = exc
    finally:
        sock.close()


def plain_config(listen_port: int, upstream_port: int, sources: str = "") -> str:
    return f"""
stream_listen:
  - 127.0.0.1:{listen_port}
services:
  - name: svc
    host: 127.0.0.1
    port: {upstream_port}
    routes:
      - name: r
        protocols: [tcp]
        destinations: [{{port: {listen_port}}}]
{sources}
"""


def test_a_session_on_a_socketpair_carries_every_byte_to_the_upstream_and_back(harness, upstreams):
    up = upstreams(echo_handler)
    h = harness(plain_config(free_port(), up.port))
    ours, theirs = socket.socketpair()
    result: dict = {}
    client = threading.Thread(target=talk, args=(theirs, PAYLOAD, result))
    client.start()
    session = h.run(ours)
    client.join(TIMEOUT)
    assert result.get("digest") == hashlib.sha256(PAYLOAD).hexdigest(), result
    assert session.status == STATUS_OK
    assert session.bytes_received() == session.bytes_sent() == len(PAYLOAD)
    assert session.upstream_bytes_sent() == session.upstream_bytes_received() == len(PAYLOAD)
    assert [p.name for p in session.tried] == [f"127.0.0.1:{up.port}"]
    assert session.connect_time is not None
    assert up.connections == 1


def test_a_session_over_loopback_tcp_tries_the_next_peer_when_one_refuses(harness, upstreams, tmp_path):
    up = upstreams(echo_handler)
    dead = free_port()
    listen_port = free_port()
    h = harness(f"""
stream_listen:
  - 127.0.0.1:{listen_port}
upstreams:
  - name: pool
    algorithm: round-robin
    targets:
      - target: 127.0.0.1:{dead}
      - target: 127.0.0.1:{up.port}
services:
  - name: svc
    host: pool
    retries: 1
    routes:
      - name: r
        protocols: [tcp]
        destinations: [{{port: {listen_port}}}]
""")
    with socket.create_server(("127.0.0.1", 0)) as server:
        theirs = socket.create_connection(server.getsockname())
        ours, addr = server.accept()
    payload = os.urandom(100_000)
    result: dict = {}
    client = threading.Thread(target=talk, args=(theirs, payload, result))
    client.start()
    session = h.run(ours, addr)
    client.join(TIMEOUT)
    assert result.get("digest") == hashlib.sha256(payload).hexdigest(), result
    assert session.status == STATUS_OK
    assert [p.name for p in session.tried] == [f"127.0.0.1:{dead}", f"127.0.0.1:{up.port}"]
    assert f"connect() to 127.0.0.1:{dead} failed (111: Connection refused)" in h.error_log.read_text()


def test_no_reachable_upstream_is_502_and_the_client_gets_an_end_of_stream(harness):
    h = harness(plain_config(free_port(), free_port()))
    ours, theirs = socket.socketpair()
    result: dict = {}
    client = threading.Thread(target=talk, args=(theirs, b"hello", result))
    client.start()
    session = h.run(ours)
    client.join(TIMEOUT)
    assert result.get("received") == 0, result
    assert session.status == STATUS_BAD_GATEWAY
    assert 'no upstream could be reached for service "svc"' in h.error_log.read_text()


def test_a_reject_share_refuses_that_share_of_sessions_evenly_before_any_upstream(harness, upstreams):
    """`reject_share: 0.3`: the 4th, 7th and 10th of every ten sessions end with 502 and an end of
    stream, without a connect to any target; the others carry their bytes."""
    up = upstreams(echo_handler)
    h = harness(plain_config(free_port(), up.port).replace("    port:", "    reject_share: 0.3\n    port:"))
    statuses = []
    for _ in range(20):
        ours, theirs = socket.socketpair()
        result: dict = {}
        client = threading.Thread(target=talk, args=(theirs, b"hello", result))
        client.start()
        h.closed.clear()
        statuses.append(h.run(ours).status)
        client.join(TIMEOUT)
        assert result.get("received") == (0 if statuses[-1] == STATUS_BAD_GATEWAY else 5), result
    refused = [index + 1 for index, status in enumerate(statuses) if status == STATUS_BAD_GATEWAY]
    assert refused == [4, 7, 10, 14, 17, 20]
    assert statuses.count(STATUS_OK) == 14
    assert 'it falls in the reject_share (0.3) of service "svc"' in h.error_log.read_text()


def test_a_client_no_route_accepts_is_404_before_any_upstream_is_tried(harness, upstreams):
    up = upstreams(echo_handler)
    listen_port = free_port()
    h = harness(plain_config(listen_port, up.port, sources="        sources: [{ip: 10.0.0.0/8}]"))
    ours, theirs = socket.socketpair()
    result: dict = {}
    client = threading.Thread(target=talk, args=(theirs, b"hello", result))
    client.start()
    session = h.run(ours, ("192.0.2.7", 40000))
    client.join(TIMEOUT)
    assert result.get("received") == 0, result
    assert session.status == STATUS_NO_ROUTE
    assert session.tried == [] and session.route is None
    assert up.connections == 0
    assert "no route matched, closing; client: 192.0.2.7:40000" in h.error_log.read_text()


def test_a_terminated_tls_session_on_a_socketpair_hands_the_upstream_the_plain_bytes(harness, upstreams,
                                                                                      tmp_path):
    up = upstreams(echo_handler)
    cert = make_cert(tmp_path, "a.example", ["a.example"])
    h = harness(f"""
stream_listen:
  - 127.0.0.1:{free_port()} ssl
certificates:
  - {{cert: {cert[0]}, key: {cert[1]}}}
services:
  - name: svc
    host: 127.0.0.1
    port: {up.port}
    routes:
      - name: r
        protocols: [tls]
        snis: [a.example]
""")
    ours, theirs = socket.socketpair()
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(str(cert[0]))
    result: dict = {}
    # An SSL socket cannot read and write from two threads at once: the client sends all first,
    # so the payload is what the buffers on the way hold; it ends with its close_notify (unwrap).
    payload = os.urandom(256 * 1024)

    def tls_client() -> None:
        try:
            theirs.settimeout(TIMEOUT)
            tls = context.wrap_socket(theirs, server_hostname="a.example")
            tls.sendall(payload)
            digest = hashlib.sha256()
            received = 0
            while received < len(payload) and (chunk := tls.recv(65536)):
                digest.update(chunk)
                received += len(chunk)
            result["digest"], result["received"] = digest.hexdigest(), received
            tls.unwrap()
        except (OSError, ssl.SSLError) as exc:
            result["error"] = exc
        finally:
            theirs.close()

    client = threading.Thread(target=tls_client)
    client.start()
    session = h.run(ours)
    client.join(TIMEOUT)
    assert result.get("digest") == hashlib.sha256(payload).hexdigest(), result
    assert session.status == STATUS_OK
    assert (session.protocol, session.sni) == ("tls", "a.example")
    assert session.ssl_protocol is not None and session.ssl_cipher is not None
    assert session.upstream_bytes_sent() == len(payload)     # decrypted: exactly the client's bytes
