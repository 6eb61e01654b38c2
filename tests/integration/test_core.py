"""The core, as a user meets it: a real pyproxy process in front of real loopback upstreams."""

from __future__ import annotations

import collections
import fcntl
import hashlib
import socket
import struct
import subprocess
import sys
import termios
import threading
import time
from pathlib import Path

import psutil
import pytest

from pyproxy.demo.echo import EchoServer
from pyproxy.session import LINGER_TIMEOUT
from tests.support import (
    connect,
    echo_handler,
    expected_hash_reply,
    free_port,
    hash_handler,
    pattern_bytes,
    recv_all,
    recv_line,
    source_handler_for,
    tag_handler,
    upload_and_hash,
    wait_until,
)


def one_service(listen_port: int, targets: list[str], workers: int = 1, extra: str = "",
                algorithm: str = "round-robin", service_extra: str = "") -> str:
    target_lines = "\n".join(f"      - {{target: {t}}}" if " " not in t else f"      - {t}" for t in targets)
    return f"""
worker_processes: {workers}
stream_listen:
  - 127.0.0.1:{listen_port}
{extra}
upstreams:
  - name: backend
    algorithm: {algorithm}
    targets:
{target_lines}
services:
  - name: svc
    host: backend
    connect_timeout: 2s
    retries: 3
{service_extra}
    routes:
      - name: by-port
        protocols: [tcp]
        destinations: [{{port: {listen_port}}}]
"""


def test_seed_echo_greets_and_echoes(proxy):
    """The seed's telnet session: the echo service's greeting, then our text echoed back."""
    echo = EchoServer("127.0.0.1", free_port(), name="echo-test").start()
    try:
        port = free_port()
        p = proxy(one_service(port, [f"127.0.0.1:{echo.address[1]}"], workers=2))
        with connect(port) as sock:
            lines = [recv_line(sock) for _ in range(4)]
            assert lines[0].startswith(b"Welcome, you are connected to node ")
            assert lines[1] == b"Running on Pod echo-test.\n"
            assert lines[3] == b"With IP address 127.0.0.1.\n"
            sock.sendall(b"This text will be echoed back.\n")
            assert recv_line(sock) == b"This text will be echoed back.\n"
        lines = p.wait_access(1)
        assert " 200 " in lines[0] and "by-port" in lines[0]
    finally:
        echo.stop()


def test_weighted_round_robin_follows_weights(proxy, upstreams):
    a = upstreams(tag_handler, name="a")
    b = upstreams(tag_handler, name="b")
    port = free_port()
    proxy(one_service(port, [f"{{target: {a.target}, weight: 100}}", f"{{target: {b.target}, weight: 50}}"]))
    seen = collections.Counter()
    for _ in range(30):
        with connect(port) as sock:
            seen[recv_line(sock).strip().decode()] += 1
    assert seen == {"a": 20, "b": 10}


def test_upload_8mib_then_half_close_gets_hash(proxy, upstreams):
    up = upstreams(hash_handler)
    port = free_port()
    proxy(one_service(port, [up.target], workers=2))
    payload = pattern_bytes(8 << 20, seed=1)
    assert upload_and_hash(port, payload) == expected_hash_reply(payload)


def test_bulk_both_ways_through_the_switch_to_splice(proxy, upstreams):
    """Plain sessions start on recv/send and move a direction to splice once it carries bulk: a
    large upload, then the reply, arrive intact across the switch, and nothing goes wrong on the
    way (the splice pump then yields to other sessions every 16 round trips)."""
    up = upstreams(hash_handler)
    port = free_port()
    p = proxy(one_service(port, [up.target]))
    payload = pattern_bytes(96 << 20, seed=3)
    assert upload_and_hash(port, payload) == expected_hash_reply(payload)
    assert f" {len(payload)} " in p.wait_access(1)[0]      # $bytes_received counts the upload
    assert "error" not in p.log_text()


def test_download_32mib_arrives_intact(proxy, upstreams):
    size = 32 << 20
    up = upstreams(source_handler_for(size))
    port = free_port()
    p = proxy(one_service(port, [up.target]))
    with connect(port, timeout=30) as sock:
        data = recv_all(sock)
    assert len(data) == size
    assert hashlib.sha256(data).digest() == hashlib.sha256(pattern_bytes(size)).digest()
    line = p.wait_access(1)[0]
    assert f" {size} " in line          # $bytes_sent counts what the client got


def test_many_concurrent_sessions_each_intact(proxy, upstreams):
    up = upstreams(hash_handler)
    port = free_port()
    proxy(one_service(port, [up.target], workers=2))
    results = {}

    def client(i):
        payload = pattern_bytes(200_000 + i * 997, seed=i)
        results[i] = upload_and_hash(port, payload) == expected_hash_reply(payload)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(40)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(results) == 40 and all(results.values())


def test_dead_target_is_skipped_by_retries(proxy, upstreams):
    live = upstreams(tag_handler, name="live")
    dead_port = free_port()        # nothing listens there: connect() is refused
    port = free_port()
    p = proxy(one_service(port, [f"127.0.0.1:{dead_port}", live.target]))
    for _ in range(6):
        with connect(port) as sock:
            assert recv_line(sock) == b"live\n"
    assert f"127.0.0.1:{dead_port}" in p.log_text()       # the refused connect was logged
    assert "is down for" in p.log_text()                  # and passive health took it out


def test_all_targets_dead_gives_502(proxy):
    port = free_port()
    p = proxy(one_service(port, [f"127.0.0.1:{free_port()}"]))
    with connect(port) as sock:
        assert recv_all(sock) == b""
    line = p.wait_access(1)[0]
    assert " 502 " in line


def test_routing_by_source_address(proxy, upstreams):
    one = upstreams(tag_handler, name="from-one")
    two = upstreams(tag_handler, name="from-two")
    port = free_port()
    proxy(f"""
stream_listen: [127.0.0.1:{port}]
services:
  - name: s1
    host: 127.0.0.1
    port: {one.port}
    routes:
      - name: r1
        protocols: [tcp]
        sources: [{{ip: 127.0.0.1}}]
  - name: s2
    host: 127.0.0.1
    port: {two.port}
    routes:
      - name: r2
        protocols: [tcp]
        sources: [{{ip: 127.0.0.2/32}}]
""")
    with connect(port, source="127.0.0.1") as sock:
        assert recv_line(sock) == b"from-one\n"
    with connect(port, source="127.0.0.2") as sock:
        assert recv_line(sock) == b"from-two\n"


def test_most_specific_route_wins(proxy, upstreams):
    wide = upstreams(tag_handler, name="wide")
    narrow = upstreams(tag_handler, name="narrow")
    port = free_port()
    proxy(f"""
stream_listen: [127.0.0.1:{port}]
services:
  - name: wide
    host: 127.0.0.1
    port: {wide.port}
    routes:
      - name: any-client
        protocols: [tcp]
        destinations: [{{port: {port}}}]
  - name: narrow
    host: 127.0.0.1
    port: {narrow.port}
    routes:
      - name: loopback-3
        protocols: [tcp]
        destinations: [{{port: {port}}}]
        sources: [{{ip: 127.0.0.3}}]
""")
    with connect(port, source="127.0.0.3") as sock:
        assert recv_line(sock) == b"narrow\n"
    with connect(port, source="127.0.0.4") as sock:
        assert recv_line(sock) == b"wide\n"


def test_no_route_closes_without_touching_upstream(proxy, upstreams):
    up = upstreams(tag_handler)
    port = free_port()
    p = proxy(f"""
stream_listen: [127.0.0.1:{port}]
services:
  - name: only-10
    host: 127.0.0.1
    port: {up.port}
    routes:
      - name: r
        protocols: [tcp]
        sources: [{{ip: 10.0.0.0/8}}]
""")
    with connect(port) as sock:
        assert recv_all(sock) == b""
    line = p.wait_access(1)[0]
    assert " 404 " in line
    assert up.connections == 0


def test_half_close_is_passed_both_ways(proxy, upstreams):
    """Client FIN reaches the upstream (it answers after EOF); upstream FIN reaches the client."""
    up = upstreams(hash_handler)
    port = free_port()
    proxy(one_service(port, [up.target]))
    with connect(port) as sock:
        sock.sendall(b"hello")
        sock.shutdown(socket.SHUT_WR)
        assert recv_all(sock) == expected_hash_reply(b"hello")


def test_upstream_reset_becomes_client_reset(proxy, upstreams):
    def resetter(conn, up):
        conn.recv(100)
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        conn.close()

    up = upstreams(resetter)
    port = free_port()
    p = proxy(one_service(port, [up.target]))
    with connect(port) as sock:
        sock.sendall(b"x")
        with pytest.raises(ConnectionResetError):
            while sock.recv(100):
                pass
    assert " 502 " in p.wait_access(1)[0]


def _abort(conn: socket.socket) -> None:
    """close() with SO_LINGER {on, 0s}: the peer gets a RST, as from a server closing with bytes unread."""
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    conn.close()


def _recv_exactly(sock: socket.socket, size: int) -> bytes:
    data = bytearray()
    while len(data) < size:
        chunk = sock.recv(min(size - len(data), 262144))
        if not chunk:
            break
        data += chunk
    return bytes(data)


@pytest.mark.parametrize("last", ["fin", "bytes"])
def test_upstream_reset_after_everything_was_delivered_is_a_normal_end(proxy, upstreams, last):
    """Issue 15: `psql sslmode=require` through a plain route logged most of its successful sessions
    502: PostgreSQL closes on the client's Terminate with the client's close_notify unread, and its
    kernel sends a reset. An upstream that resets after its reply was delivered and after the
    client's FIN (or the client's last bytes, read) ends the session as nginx ends it: 200, and the
    client gets a FIN, not a reset."""
    reply = pattern_bytes(1_000_000, seed=11)

    def replies_then_resets(conn, up):
        _recv_exactly(conn, 5)
        conn.sendall(reply)
        if last == "fin":
            while conn.recv(65536):                # until the client's FIN, passed on
                pass
        else:
            _recv_exactly(conn, 4)                 # the client's last bytes ("bye\n")
        _abort(conn)

    up = upstreams(replies_then_resets)
    port = free_port()
    p = proxy(one_service(port, [up.target]))
    with connect(port) as sock:
        sock.sendall(b"query")
        got = _recv_exactly(sock, len(reply))
        if last == "fin":
            sock.shutdown(socket.SHUT_WR)
        else:
            sock.sendall(b"bye\n")
        assert sock.recv(1) == b""                 # pyproxy's FIN (a reset would raise here)
    assert hashlib.sha256(got).digest() == hashlib.sha256(reply).digest()
    line = p.wait_access(1)[0]
    assert " 200 " in line and f" {len(reply)} " in line, line
    assert ("upstream connection reset (104: Connection reset by peer) after all data was delivered"
            in p.log_text())


def test_upstream_reset_while_client_bytes_are_still_held_is_502(proxy, upstreams):
    """The other side of the rule: an upstream that answered, then stopped reading an upload and
    reset it. pyproxy still holds bytes of the upload that can never be delivered: 502, and the
    reset is passed on to the client."""
    reset_now = threading.Event()

    def answers_then_stops_reading(conn, up):
        conn.sendall(b"ready\n")
        reset_now.wait(30)
        _abort(conn)

    up = upstreams(answers_then_stops_reading)
    port = free_port()
    p = proxy(one_service(port, [up.target]))
    chunk = pattern_bytes(1 << 20, seed=5)
    pushed, errors = [0], []
    with connect(port, timeout=30) as sock:
        assert recv_line(sock) == b"ready\n"

        def upload():
            try:
                for _ in range(512):
                    sock.sendall(chunk)
                    pushed[0] += len(chunk)
            except OSError as exc:
                errors.append(exc)

        sender = threading.Thread(target=upload, daemon=True)
        sender.start()
        # The upstream reads nothing, so the upload stalls: once our send queue stays full and
        # still, pyproxy has stopped reading us, which it only does while it holds bytes its
        # upstream will not take (and it goes on holding them: the upstream never reads).
        seen = {"last": None, "still": 0}

        def stalled() -> bool:
            unsent = fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, bytes(4))
            now = (pushed[0], int.from_bytes(unsent, sys.byteorder))
            seen["still"] = seen["still"] + 1 if now == seen["last"] and now[1] > 0 else 0
            seen["last"] = now
            return seen["still"] >= 5 or bool(errors)

        wait_until(stalled, timeout=20, what="the upload stalled behind pyproxy")
        assert not errors and pushed[0] >= 1 << 20, (errors, pushed)
        reset_now.set()
        sender.join(30)
        assert errors and isinstance(errors[0], (ConnectionResetError, BrokenPipeError)), errors
    line = p.wait_access(1)[0]
    assert " 502 " in line, line
    assert "upstream connection reset" in p.log_text() and "while proxying" in p.log_text()


def test_idle_session_ends_at_read_timeout(proxy, upstreams):
    up = upstreams(echo_handler)
    port = free_port()
    p = proxy(one_service(port, [up.target], service_extra="    read_timeout: 500ms"))
    with connect(port) as sock:
        sock.sendall(b"ping")
        assert sock.recv(10) == b"ping"
        assert recv_all(sock) == b""      # closed by pyproxy after 500 ms of silence
    assert "read_timeout" in p.log_text()


def test_worker_connections_limit_refuses_with_503(proxy, upstreams):
    up = upstreams(echo_handler)
    port = free_port()
    p = proxy(one_service(port, [up.target], extra="worker_connections: 2"))
    held = [connect(port), connect(port)]
    for sock in held:
        sock.sendall(b"a")
        assert sock.recv(1) == b"a"
    with connect(port) as third:
        assert recv_all(third) == b""
    assert any(" 503 " in line for line in p.wait_access(1))
    for sock in held:
        sock.sendall(b"b")
        assert sock.recv(1) == b"b"      # the sessions inside the limit are untouched
        sock.close()


def test_access_log_variables(proxy, upstreams):
    up = upstreams(echo_handler)
    port = free_port()
    fmt = ('$remote_addr $server_addr:$server_port $protocol $status $bytes_sent $bytes_received '
           '$upstream_addr $upstream_bytes_sent $upstream_bytes_received $route $service $connection '
           '$ssl_server_name')
    p = proxy(one_service(port, [up.target], extra=f"access_log_format: '{fmt}'"))
    with connect(port) as sock:
        sock.sendall(b"0123456789")
        sock.shutdown(socket.SHUT_WR)
        assert recv_all(sock) == b"0123456789"
    fields = p.wait_access(1)[0].split()
    assert fields == ["127.0.0.1", f"127.0.0.1:{port}", "tcp", "200", "10", "10",
                      up.target, "10", "10", "by-port", "svc", "1", "-"]


def test_502_after_the_client_already_sent_bytes_is_a_clean_close(proxy):
    """The client's unread bytes must not turn our close into a reset."""
    port = free_port()
    p = proxy(one_service(port, [f"127.0.0.1:{free_port()}"]))
    for _ in range(10):
        with connect(port) as sock:
            sock.sendall(b"hello")
            assert recv_all(sock) == b""         # FIN, not ConnectionResetError
    assert all(" 502 " in line for line in p.wait_access(10))


def _worker_sockets_from(p, client_port: int) -> list[str]:
    """States of the worker sockets whose peer is `client_port` (psutil: ESTABLISHED, FIN_WAIT2...)."""
    return [c.status for pid in p.worker_pids() for c in psutil.Process(pid).net_connections()
            if c.raddr and c.raddr[1] == client_port]


def _lingering(states: list[str]) -> bool:
    """One worker socket that sent its FIN and is still open (the FIN's ACK may be in flight)."""
    return len(states) == 1 and states[0] in ("FIN_WAIT1", "FIN_WAIT2")


def test_refused_client_that_keeps_sending_gets_a_fin_and_no_reset(proxy):
    """After a 502 the client gets our FIN, and what it sends after reading it is still read
    (lingering close): a close() at once would answer those bytes with a RST. Its own FIN ends it."""
    port = free_port()
    p = proxy(one_service(port, [f"127.0.0.1:{free_port()}"]))
    with connect(port) as sock:
        sock.sendall(b"hello")
        assert recv_all(sock) == b""                  # our FIN
        for _ in range(5):                            # a client that writes before it notices
            time.sleep(0.02)
            sock.sendall(b"x" * 4096)                 # EPIPE / ECONNRESET once the proxy reset it
        client_port = sock.getsockname()[1]
        assert _lingering(_worker_sockets_from(p, client_port))          # still reading us
    wait_until(lambda: _worker_sockets_from(p, client_port) in ([], ["TIME_WAIT"]),
               what="the proxy to close once the client's FIN came")
    assert " 502 " in p.wait_access(1)[0]


def test_refused_client_that_never_closes_is_dropped_after_the_linger_timeout(proxy):
    port = free_port()
    p = proxy(one_service(port, [f"127.0.0.1:{free_port()}"]))
    with connect(port) as sock:
        assert recv_all(sock) == b""
        client_port = sock.getsockname()[1]
        assert _lingering(_worker_sockets_from(p, client_port))
        start = time.monotonic()
        wait_until(lambda: not _worker_sockets_from(p, client_port), timeout=LINGER_TIMEOUT + 3,
                   what="the lingering socket to be closed")
        assert time.monotonic() - start < LINGER_TIMEOUT + 1


def _congestion_of_connections_to(port: int) -> list[str]:
    """The congestion control `ss` shows for each established connection to `port` on this host."""
    shown = subprocess.run(["ss", "-Htin", "state", "established", f"( dport = :{port} )"],
                           capture_output=True, text=True, check=True).stdout
    known = set(Path("/proc/sys/net/ipv4/tcp_available_congestion_control").read_text().split())
    return [word for word in shown.split() if word in known]


def test_tcp_congestion_applies_to_upstream_connections(proxy, upstreams):
    """`tcp_congestion` is what the kernel uses on the proxy's connection to the upstream (and only
    there: the client's own connection keeps the host's default); the bytes still arrive intact."""
    default = Path("/proc/sys/net/ipv4/tcp_congestion_control").read_text().strip()
    chosen = "reno" if default != "reno" else "cubic"
    up = upstreams(hash_handler)
    port = free_port()
    proxy(one_service(port, [up.target], service_extra=f"    tcp_congestion: {chosen}"))
    with connect(port) as sock:
        sock.sendall(b"x")
        wait_until(lambda: _congestion_of_connections_to(up.port), what="the upstream connection")
        assert _congestion_of_connections_to(up.port) == [chosen]
        assert _congestion_of_connections_to(port) == [default]
    payload = pattern_bytes(4 << 20, seed=3)
    assert upload_and_hash(port, payload) == expected_hash_reply(payload)
