"""UDP as a user sees it: dig through pyproxy to a real DNS server, many clients each getting only
their own replies, consistent hashing, passive health from ICMP port unreachable, read_timeout,
truncation, the worker_connections cap under a flood of source ports, and a reload mid-flow."""

from __future__ import annotations

import hashlib
import os
import pwd
import select
import shutil
import signal
import socket
import subprocess
import threading
import time

import pytest

from tests.support import free_port, wait_until

DNSMASQ = shutil.which("dnsmasq") or "/usr/sbin/dnsmasq"


def udp_port() -> int:
    """A port below 32768 free for both TCP (free_port checks that) and UDP."""
    for _ in range(50):
        port = free_port()
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port
    raise RuntimeError("no free UDP port")


class UdpUpstream:
    """A UDP server on loopback that answers each datagram with `NAME PORT DIGEST`: its name, the
    source port it came from (the proxy's upstream socket) and a digest of the datagram, so a
    client can tell that a reply is its own. `silent`: it answers nothing."""

    def __init__(self, name: str, silent: bool = False, port: int | None = None, delay: float = 0.0):
        self.name = name
        self.silent = silent
        self.delay = delay
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", port or udp_port()))
        self.sock.settimeout(0.1)
        self.port = self.sock.getsockname()[1]
        self.received: list[tuple[bytes, tuple[str, int]]] = []
        self.running = True
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _serve(self) -> None:
        while self.running:
            try:
                data, addr = self.sock.recvfrom(65535)
            except TimeoutError:
                continue
            except OSError:
                return
            self.received.append((data, addr))
            if self.delay:
                threading.Timer(self.delay, self._answer, (data, addr)).start()
            elif not self.silent:
                self._answer(data, addr)

    def _answer(self, data: bytes, addr: tuple[str, int]) -> None:
        if not self.silent and self.running:
            self.sock.sendto(reply_for(self.name, addr[1], data), addr)

    def stop(self) -> None:
        self.running = False
        self.thread.join(5)
        self.sock.close()


def reply_for(name: str, port: int, data: bytes) -> bytes:
    return f"{name} {port} {hashlib.sha256(data).hexdigest()[:16]}".encode()


def parse_reply(reply: bytes) -> tuple[str, int, str]:
    name, port, digest = reply.decode().split()
    return name, int(port), digest


@pytest.fixture
def udp_upstreams():
    started: list[UdpUpstream] = []

    def make(name: str, silent: bool = False, port: int | None = None, delay: float = 0.0) -> UdpUpstream:
        up = UdpUpstream(name, silent, port, delay)
        started.append(up)
        return up

    yield make
    for up in started:
        up.stop()


def client(source: str = "127.0.0.1") -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((source, 0))
    sock.settimeout(3)
    return sock


def ask(sock: socket.socket, port: int, data: bytes, host: str = "127.0.0.1") -> tuple[str, int, str]:
    """Send `data` to the proxy, return the reply's (upstream name, upstream-side port, digest),
    after checking that it answers this datagram and came from the address it was sent to."""
    sock.sendto(data, (host, port))
    reply, addr = sock.recvfrom(65535)
    assert addr == (host, port)
    name, up_port, digest = parse_reply(reply)
    assert digest == hashlib.sha256(data).hexdigest()[:16]
    return name, up_port, digest


def udp_config(port: int, targets: list[str], service: str = "", upstream: str = "",
               head: str = "worker_processes: 1") -> str:
    target_lines = "\n".join(f"      - {{target: {t}}}" for t in targets)
    return f"""
{head}
stream_listen: [127.0.0.1:{port} udp]
upstreams:
  - name: pool
{upstream}
    targets:
{target_lines}
services:
  - name: dns
    protocol: udp
    host: pool
{service}
    routes:
      - name: r
        protocols: [udp]
        destinations: [{{port: {port}}}]
"""


# -- a real DNS server ------------------------------------------------------------------------

@pytest.fixture
def dnsmasq(tmp_path):
    """dnsmasq answering names from a hosts file on a loopback port, and nothing else."""
    hosts = tmp_path / "hosts"
    hosts.write_text("192.0.2.10 www.example.test\n198.51.100.7 db.example.test\n")
    port = udp_port()
    proc = subprocess.Popen([DNSMASQ, "--keep-in-foreground", "--no-resolv", "--no-hosts",
                             f"--addn-hosts={hosts}", f"--port={port}", "--listen-address=127.0.0.1",
                             "--bind-interfaces", "--conf-file=/dev/null", "--pid-file=",
                             # as us: the hosts file is in pytest's private temporary folder
                             "--user=" + pwd.getpwuid(os.geteuid()).pw_name,
                             "--log-facility=-"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: dig_short(port, "www.example.test") == ["192.0.2.10"], 10, what="dnsmasq")
        yield port
    finally:
        proc.terminate()
        proc.wait(5)


def dig_short(port: int, name: str, tries: int = 1) -> list[str]:
    done = subprocess.run(["dig", "@127.0.0.1", "-p", str(port), name, "A", "+short", "+time=1",
                           f"+tries={tries}", "+notcp"], capture_output=True, text=True, timeout=10)
    return done.stdout.split()


def test_dig_through_pyproxy_to_dnsmasq(proxy, dnsmasq):
    port = udp_port()
    p = proxy(udp_config(port, [f"127.0.0.1:{dnsmasq}"], service="    proxy_responses: 1"))
    assert dig_short(port, "www.example.test") == ["192.0.2.10"]
    assert dig_short(port, "db.example.test") == ["198.51.100.7"]
    # proxy_responses 1: each query is a session that ends with its answer, not at read_timeout.
    lines = p.wait_access(2, timeout=3)
    assert all(" udp 200 " in line and f'"127.0.0.1:{dnsmasq}"' in line for line in lines), lines


def test_tcp_and_udp_on_one_port(proxy, dnsmasq, upstreams):
    """DNS listens on both: `ADDR:PORT` and `ADDR:PORT udp` are two listeners."""
    from tests.support import connect, recv_line, tag_handler
    tcp_up = upstreams(tag_handler, name="tcp")
    port = udp_port()
    p = proxy(udp_config(port, [f"127.0.0.1:{dnsmasq}"], service="    proxy_responses: 1")
              .replace(f"stream_listen: [127.0.0.1:{port} udp]",
                       f"stream_listen: [127.0.0.1:{port} udp, 127.0.0.1:{port}]")
              + f"""
  - name: plain
    host: 127.0.0.1
    port: {tcp_up.port}
    routes:
      - name: t
        protocols: [tcp]
        destinations: [{{port: {port}}}]
""")
    assert dig_short(port, "www.example.test") == ["192.0.2.10"]
    with connect(port) as sock:
        assert recv_line(sock) == b"tcp\n"
    p.wait_access(2)


# -- sessions ---------------------------------------------------------------------------------

def test_many_concurrent_clients_each_get_only_their_own_replies(proxy, udp_upstreams):
    ups = [udp_upstreams("a"), udp_upstreams("b")]
    port = udp_port()
    proxy(udp_config(port, [u.target for u in ups], head="worker_processes: 2"))
    failures: list[str] = []

    def run(index: int) -> None:
        with client() as sock:
            seen_ports = set()
            for i in range(20):
                data = f"client {index} datagram {i} ".encode() * (1 + index % 5)
                try:
                    _, up_port, _ = ask(sock, port, data)
                except (AssertionError, OSError) as exc:
                    failures.append(f"client {index}: {exc!r}")
                    return
                seen_ports.add(up_port)
            if len(seen_ports) != 1:        # one session: one upstream socket for all 20
                failures.append(f"client {index}: replies through {seen_ports}")

    threads = [threading.Thread(target=run, args=(i,)) for i in range(40)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not failures, failures[:5]


def test_consistent_hashing_keeps_a_client_address_on_one_target(proxy, udp_upstreams):
    ups = [udp_upstreams(name) for name in "abc"]
    port = udp_port()
    proxy(udp_config(port, [u.target for u in ups], service="    proxy_responses: 1",
                     upstream="    algorithm: consistent-hashing"))
    chosen: dict[str, set[str]] = {}
    for last in range(2, 12):
        source = f"127.0.0.{last}"
        for _ in range(5):                  # a new session (and source port) each time
            with client(source) as sock:
                name, _, _ = ask(sock, port, b"who")
            chosen.setdefault(source, set()).add(name)
    assert all(len(names) == 1 for names in chosen.values()), chosen
    assert len({next(iter(names)) for names in chosen.values()}) > 1     # and they do spread


def test_a_query_sent_as_soon_as_the_previous_answer_came_is_answered(proxy, udp_upstreams):
    """With proxy_responses 1 each answer ends a session; clients that send their next query from
    the same port as soon as the answer comes may reach the ending session's socket before it is
    closed: every such query is answered all the same (by a new session)."""
    up = udp_upstreams("a")
    port = udp_port()
    proxy(udp_config(port, [up.target], service="    proxy_responses: 1", head="worker_processes: 2"))
    epoll = select.epoll()
    socks = {}
    for _ in range(32):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK)
        sock.connect(("127.0.0.1", port))
        sock.send(b"query")
        socks[sock.fileno()] = [sock, time.monotonic()]
        epoll.register(sock.fileno(), select.EPOLLIN)
    answered = 0
    stuck: list[int] = []
    try:
        deadline = time.monotonic() + 20
        while answered < 4000 and not stuck and time.monotonic() < deadline:
            for fd, _ in epoll.poll(0.1):
                entry = socks[fd]
                entry[0].recv(65535)
                answered += 1
                entry[0].send(b"query")
                entry[1] = time.monotonic()
            now = time.monotonic()
            stuck = [entry[0].getsockname()[1] for entry in socks.values() if now - entry[1] > 2]
    finally:
        for sock, _ in socks.values():
            sock.close()
        epoll.close()
    assert not stuck, f"queries from ports {stuck} got no answer ({answered} answered before)"
    assert answered >= 4000


def test_read_timeout_ends_an_idle_session(proxy, udp_upstreams):
    up = udp_upstreams("a")
    port = udp_port()
    p = proxy(udp_config(port, [up.target], service="    read_timeout: 300ms"))
    with client() as sock:
        _, first, _ = ask(sock, port, b"one")
        _, second, _ = ask(sock, port, b"two")
        assert first == second                          # one session
        line = p.wait_access(1, timeout=3)[0]
        assert " udp 200 " in line
        _, third, _ = ask(sock, port, b"three")        # idle past read_timeout: a new session
        assert third != first


def test_upstream_that_never_replies_times_out_as_a_502(proxy, udp_upstreams):
    silent = udp_upstreams("silent", silent=True)
    port = udp_port()
    p = proxy(udp_config(port, [silent.target], service="    read_timeout: 300ms\n    proxy_responses: 1"))
    with client() as sock:
        sock.sendto(b"anyone?", ("127.0.0.1", port))
        line = p.wait_access(1, timeout=3)[0]
    assert " udp 502 " in line
    assert "upstream timed out (0.3s read_timeout)" in p.log_text()
    assert f"target {silent.target} is down" in p.log_text()      # passive health counts timeouts


def test_icmp_port_unreachable_is_a_failure_and_the_next_target_answers(proxy, udp_upstreams):
    live = udp_upstreams("live")
    dead = f"127.0.0.1:{udp_port()}"        # nothing listens: the kernel answers ICMP port unreachable
    port = udp_port()
    p = proxy(udp_config(port, [dead, live.target], service="    proxy_responses: 1"))
    for i in range(6):
        with client() as sock:
            assert ask(sock, port, f"q{i}".encode())[0] == "live"
    log = p.log_text()
    assert "(111: Connection refused) while proxying datagrams" in log
    assert f"target {dead} is down" in log
    assert log.count("Connection refused") == 1       # down after one failure: not tried again


def test_active_udp_checks_take_a_silent_or_refusing_target_out_and_bring_it_back(proxy, udp_upstreams):
    live = udp_upstreams("live")
    silent = udp_upstreams("silent", silent=True)
    dead_port = udp_port()
    port = udp_port()
    active = ("    healthchecks:\n      active: {type: udp, interval: 100ms, timeout: 300ms, send: ping, "
              "expect: 'live ', healthy: {successes: 1}, unhealthy: {tcp_failures: 1, timeouts: 1}}")
    p = proxy(udp_config(port, [live.target, silent.target, f"127.0.0.1:{dead_port}"], upstream=active,
                         service="    proxy_responses: 1"))
    p.wait_log(f"target 127.0.0.1:{dead_port} is down (active health check: read failed "
               f"(Connection refused))")
    p.wait_log(f"target {silent.target} is down (active health check: timed out after 0.3s)")
    for i in range(6):
        with client() as sock:
            assert ask(sock, port, f"q{i}".encode())[0] == "live"
    assert all(data == b"ping" for data, _ in silent.received)      # probes only, no session
    udp_upstreams("live", port=dead_port)             # answers `live …`: what the probes expect
    p.wait_log(f"target 127.0.0.1:{dead_port} is up again")


def test_datagram_longer_than_the_buffer_is_truncated_and_logged_once(proxy, udp_upstreams):
    up = udp_upstreams("a")
    port = udp_port()
    p = proxy(udp_config(port, [up.target], service="    proxy_buffer_size: 100"))
    with client() as sock:
        for _ in range(3):
            data = os.urandom(500)
            _, _, digest = parse_reply(_roundtrip(sock, port, data))
            assert digest == hashlib.sha256(data[:100]).hexdigest()[:16]     # the first 100 bytes
    assert all(len(data) == 100 for data, _ in up.received)
    assert p.log_text().count("truncated (logged once)") == 1


def _roundtrip(sock: socket.socket, port: int, data: bytes) -> bytes:
    sock.sendto(data, ("127.0.0.1", port))
    return sock.recvfrom(65535)[0]


def test_proxy_requests_starts_a_new_session_after_that_many_datagrams(proxy, udp_upstreams):
    up = udp_upstreams("a")
    port = udp_port()
    p = proxy(udp_config(port, [up.target], service="    proxy_requests: 2\n    proxy_responses: 1"))
    with client() as sock:
        ports = [ask(sock, port, f"d{i}".encode())[1] for i in range(4)]
    assert ports[0] == ports[1] != ports[2] == ports[3]
    assert len(p.wait_access(2, timeout=3)) == 2


def test_proxy_requests_on_a_flow_hands_the_client_to_a_new_session(proxy, udp_upstreams):
    """Without proxy_responses a session has its own client socket; proxy_requests closes it after
    that many datagrams, and the old session still answers through the listening socket."""
    up = udp_upstreams("a")
    port = udp_port()
    p = proxy(udp_config(port, [up.target], service="    proxy_requests: 2\n    read_timeout: 500ms"))
    with client() as sock:
        ports = [ask(sock, port, f"d{i}".encode())[1] for i in range(5)]
    assert ports[0] == ports[1] != ports[2] == ports[3] != ports[4]
    lines = p.wait_access(3, timeout=5)
    assert all(" udp 200 " in line for line in lines), lines


def test_flood_of_source_ports_evicts_idle_sessions_and_others_keep_working(proxy, udp_upstreams):
    up = udp_upstreams("a")
    port = udp_port()
    p = proxy(udp_config(port, [up.target], head="worker_processes: 1\nworker_connections: 20\n"
                                                 "access_log_format: '$remote_port $protocol $status'"))
    steady = client()
    flood = [client() for _ in range(150)]
    try:
        ask(steady, port, b"before")
        for i, sock in enumerate(flood):
            sock.sendto(b"flood", ("127.0.0.1", port))
            if i % 10 == 9:
                ask(steady, port, f"during {i}".encode())       # the active client keeps an answer
        ask(steady, port, b"after")
        p.wait_log("worker_connections are not enough: closing the UDP session idle longest")
        evicted = [line for line in p.wait_access(100, timeout=5) if line.endswith(" udp 503")]
        assert len(evicted) >= 100
        # The active client was never the one idle longest: its session was never evicted.
        assert f"{steady.getsockname()[1]} udp 503" not in evicted
    finally:
        steady.close()
        for sock in flood:
            sock.close()


def test_a_tcp_session_at_worker_connections_takes_the_place_of_an_idle_udp_one(proxy, udp_upstreams,
                                                                                upstreams):
    """UDP sessions count against worker_connections, and a UDP flood must not lock TCP clients out:
    a new TCP session in a full worker closes the UDP session idle longest instead of being refused."""
    from tests.support import connect, recv_line, tag_handler
    tcp_up = upstreams(tag_handler, name="tcp")
    up = udp_upstreams("a")
    port, tcp_port = udp_port(), udp_port()
    config = udp_config(port, [up.target], head="worker_processes: 1\nworker_connections: 5").replace(
        f"stream_listen: [127.0.0.1:{port} udp]",
        f"stream_listen: [127.0.0.1:{port} udp, 127.0.0.1:{tcp_port}]")
    p = proxy(config + f"""
  - name: plain
    host: 127.0.0.1
    port: {tcp_up.port}
    routes:
      - name: t
        protocols: [tcp]
        destinations: [{{port: {tcp_port}}}]
""")
    socks = [client() for _ in range(5)]
    try:
        for sock in socks:
            ask(sock, port, b"hold a slot")
        with connect(tcp_port) as conn:
            assert recv_line(conn) == b"tcp\n"
        assert " udp 503 " in p.wait_access(1)[0]
        assert "worker_connections are not enough, refusing" not in p.log_text()
    finally:
        for sock in socks:
            sock.close()


# -- reloads ------------------------------------------------------------------------------------

def test_a_reload_does_not_split_a_flow(proxy, udp_upstreams):
    """A client in the middle of a flow keeps its session (its upstream socket) across a reload, on
    the old generation, and loses no datagram; a new client meets the new generation."""
    up = udp_upstreams("a")
    port = udp_port()
    config = udp_config(port, [up.target], service="    read_timeout: 1s", head="worker_processes: 2")
    p = proxy(config)
    replies: list[int] = []
    errors: list[str] = []
    stop = threading.Event()

    def flow() -> None:
        with client() as sock:
            i = 0
            while not stop.is_set():
                try:
                    replies.append(ask(sock, port, f"flow {i}".encode())[1])
                except (AssertionError, OSError) as exc:
                    errors.append(f"datagram {i}: {exc!r}")
                i += 1
                time.sleep(0.01)

    thread = threading.Thread(target=flow)
    thread.start()
    try:
        wait_until(lambda: len(replies) >= 10, 5)
        old_workers = set(p.worker_pids())
        p.reload(config.replace("read_timeout: 1s", "read_timeout: 2s"))
        count = len(replies)
        wait_until(lambda: len(replies) >= count + 30, 5)
        with client() as sock:
            _, newcomer, _ = ask(sock, port, b"new client")
    finally:
        stop.set()
        thread.join(10)
    assert not errors, errors[:3]
    assert len(set(replies)) == 1, "the flow changed upstream sockets: it was split"
    assert newcomer not in replies
    # The old generation served the flow until it went idle, then exited.
    wait_until(lambda: not (old_workers & set(p.worker_pids())), 10, what="old workers to exit")
    lines = p.wait_access(2, timeout=5)
    assert all(" udp 200 " in line for line in lines), lines


def test_an_exchange_under_way_at_a_reload_gets_its_answer(proxy, udp_upstreams):
    """A DNS-like exchange (proxy_responses 1) replies through the listening socket: the old
    generation keeps its copy open while it drains, so an answer that comes after the reload still
    reaches the client, from the address it asked."""
    slow = udp_upstreams("slow", delay=1.5)
    port = udp_port()
    config = udp_config(port, [slow.target], service="    proxy_responses: 1", head="worker_processes: 2")
    p = proxy(config)
    with client() as sock:
        sock.settimeout(10)
        sock.sendto(b"question", ("127.0.0.1", port))
        wait_until(lambda: slow.received, 5)
        p.reload(config.replace("worker_processes: 2", "worker_processes: 1"))
        reply, addr = sock.recvfrom(65535)
    assert addr == ("127.0.0.1", port)
    assert parse_reply(reply)[2] == hashlib.sha256(b"question").hexdigest()[:16]
    assert " udp 200 " in p.wait_access(1)[0]


def test_fast_stop_ends_udp_sessions_with_their_log_line(proxy, udp_upstreams):
    up = udp_upstreams("a")
    port = udp_port()
    p = proxy(udp_config(port, [up.target]))
    with client() as sock:
        ask(sock, port, b"hello")
    p.stop(signal.SIGTERM)
    lines = p.access_lines()
    assert len(lines) == 1 and " udp 200 " in lines[0]


def test_ipv6_and_wildcard_listeners_answer_from_the_address_asked(proxy, udp_upstreams):
    """On `[::1]` and on `0.0.0.0` (where the session binds the address the datagram was sent to,
    learnt from IP_PKTINFO), replies come from the address and port the client sent to."""
    up = udp_upstreams("a")
    port, wild = udp_port(), udp_port()
    config = udp_config(port, [up.target]).replace(
        f"stream_listen: [127.0.0.1:{port} udp]", f"stream_listen: ['[::1]:{port} udp', '0.0.0.0:{wild} udp']"
    ).replace(f"destinations: [{{port: {port}}}]", f"destinations: [{{port: {port}}}, {{port: {wild}}}]")
    p = proxy(config)
    with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as sock:
        sock.settimeout(3)
        sock.bind(("::1", 0))
        for i in range(3):
            sock.sendto(f"six {i}".encode(), ("::1", port))
            reply, addr = sock.recvfrom(65535)
            assert addr[:2] == ("::1", port)
            assert parse_reply(reply)[2] == hashlib.sha256(f"six {i}".encode()).hexdigest()[:16]
    with client("127.0.0.3") as sock:
        ports = {ask(sock, wild, f"wild {i}".encode(), host="127.0.0.2")[1] for i in range(3)}
    assert len(ports) == 1
    p.stop()
    assert sum(" udp 200 " in line for line in p.access_lines()) == 2


def test_a_reject_share_drops_that_share_of_new_sessions(proxy, udp_upstreams):
    """The Gateway API's invalid-backend share, for datagrams: of ten one-query sessions (a new source
    port each), the 4th, 7th and 10th get no answer, the others theirs."""
    up = udp_upstreams("one")
    port = udp_port()
    p = proxy(udp_config(port, [f"127.0.0.1:{up.port}"],
                         service="    proxy_responses: 1\n    reject_share: 0.3"))
    answered = []
    for index in range(10):
        with client() as sock:
            sock.settimeout(1.0)
            try:
                ask(sock, port, f"query {index}".encode())
                answered.append(True)
            except TimeoutError:
                answered.append(False)
    assert [index + 1 for index, ok in enumerate(answered) if not ok] == [4, 7, 10]
    p.wait_log('it falls in the reject_share (0.3) of service "dns"; its datagram is dropped')
