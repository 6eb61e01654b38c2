"""Host names that follow DNS, against a real DNS server (Debian's dnsmasq) the tests start and change.

dnsmasq answers from a hosts file of the test's own (`--addn-hosts`, re-read on SIGHUP) and from
`--srv-host` records, with a one-second TTL, for names under `.test` only (anything else is NXDOMAIN).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import dns.message
import dns.rrset
import pytest

import pyproxy.dns
from pyproxy.config.model import Answer, DnsSettings
from pyproxy.dns import resolve_now
from tests.integration.test_targets import config_for as pool_config
from tests.integration.test_targets import first_line
from tests.support import connect, free_port, recv_line, tag_handler, wait_until

DNSMASQ = shutil.which("dnsmasq") or "/usr/sbin/dnsmasq"
pytestmark = pytest.mark.skipif(not os.path.exists(DNSMASQ), reason="dnsmasq is not installed "
                                "(make test installs dnsmasq-base)")


class DnsServer:
    """dnsmasq on 127.0.0.1:<port>, its answers in `hosts` (change them with `set_hosts`)."""

    def __init__(self, directory: Path, hosts: str, srv: tuple[str, ...] = ()):
        self.dir = directory
        self.hosts = directory / "dns-hosts"
        self.hosts.write_text(hosts)
        self.port = free_port()
        pid_file = directory / "dnsmasq.pid"
        args = [DNSMASQ, "--keep-in-foreground", "--no-resolv", "--no-hosts", f"--addn-hosts={self.hosts}",
                "--listen-address=127.0.0.1", "--bind-interfaces", f"--port={self.port}", "--local-ttl=1",
                "--local=/test/", f"--pid-file={pid_file}", f"--user={_user()}", "--cache-size=0",
                *(f"--srv-host={record}" for record in srv)]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        wait_until(lambda: self._answers("ready.check") is not None, timeout=10, what="dnsmasq to answer")

    def _answers(self, name: str) -> dns.message.Message | None:
        query = dns.message.make_query(name, "A")
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.settimeout(0.2)
            try:
                sock.sendto(query.to_wire(), ("127.0.0.1", self.port))
                return dns.message.from_wire(sock.recv(4096))
            except OSError:
                return None

    def set_hosts(self, hosts: str) -> None:
        """New answers: dnsmasq re-reads its hosts files on SIGHUP."""
        self.hosts.write_text(hosts)
        self.proc.send_signal(signal.SIGHUP)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(5)
        self.proc.stderr.close()


def _user() -> str:
    import pwd
    return pwd.getpwuid(os.getuid()).pw_name


@pytest.fixture
def dns_server(tmp_path):
    started: list[DnsServer] = []

    def make(hosts: str, srv: tuple[str, ...] = ()) -> DnsServer:
        server = DnsServer(tmp_path, hosts, srv)
        started.append(server)
        return server

    yield make
    for server in started:
        server.stop()


def config_for(port: int, resolver: int, targets: list[str], more: str = "", workers: int = 2) -> str:
    """A pool of `targets` (HOST:PORT) resolved by the DNS server on port `resolver`."""
    return pool_config(port, [f"{{target: {t}}}" for t in targets], workers,
                       f"dns_resolver: [127.0.0.1:{resolver}]\n{more}")


def startup_warnings(p) -> str:
    """What the start printed before the error log took over (the configuration's warnings)."""
    return (p.dir / "stderr.txt").read_text()


class Load:
    """Sessions one after another in a thread, each answer's first line kept (b"" for a failure)."""

    def __init__(self, port: int):
        self.port = port
        self.answers: list[bytes] = []
        self.running = True
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while self.running:
            try:
                self.answers.append(first_line(self.port))
            except OSError:
                self.answers.append(b"")
            time.sleep(0.005)

    def stop(self) -> list[bytes]:
        self.running = False
        self.thread.join(10)
        return self.answers


def test_sessions_move_to_the_new_address_without_a_reload_and_open_ones_survive(proxy, upstreams,
                                                                                dns_server):
    port, up_port = free_port(), free_port()
    upstreams(tag_handler, host="127.0.0.2", port=up_port, name="old")
    upstreams(tag_handler, host="127.0.0.3", port=up_port, name="new")
    server = dns_server("127.0.0.2 svc.test\n")
    p = proxy(config_for(port, server.port, [f"svc.test:{up_port}"]))
    workers = sorted(p.worker_pids())
    long_session = connect(port)
    assert recv_line(long_session) == b"old\n"
    load = Load(port)
    try:
        wait_until(lambda: len(load.answers) >= 20, timeout=10, what="sessions before the change")
        server.set_hosts("127.0.0.3 svc.test\n")
        wait_until(lambda: load.answers[-5:] == [b"new\n"] * 5, timeout=10,
                   what="sessions on the new address")
    finally:
        answers = load.stop()
    long_session.sendall(b"still here\n")
    assert recv_line(long_session) == b"still here\n"
    long_session.close()
    assert b"" not in answers
    assert set(answers) == {b"old\n", b"new\n"}
    assert sorted(p.worker_pids()) == workers
    log = p.log_text()
    assert "reload" not in log
    assert 'dns: "svc.test" resolves to 127.0.0.3' in log
    statuses = {line.split("] ")[1].split()[1] for line in p.wait_access(len(answers) + 1)}
    assert statuses == {"200"}, statuses


def test_a_name_that_stops_resolving_keeps_its_last_addresses(proxy, upstreams, dns_server):
    port, up_port = free_port(), free_port()
    upstreams(tag_handler, host="127.0.0.2", port=up_port, name="kept")
    server = dns_server("127.0.0.2 gone.test\n")
    p = proxy(config_for(port, server.port, [f"gone.test:{up_port}"], "dns_not_found_ttl: 200ms"))
    server.set_hosts("")
    p.wait_log('dns: cannot resolve "gone.test" (not found (NXDOMAIN)): keeping its last addresses 127.0.0.2',
               timeout=10)
    time.sleep(1.5)          # more lookups fail meanwhile: the cause is logged once
    assert [first_line(port) for _ in range(5)] == [b"kept\n"] * 5
    assert p.log_text().count('cannot resolve "gone.test"') == 1
    server.set_hosts("127.0.0.2 gone.test\n")
    p.wait_log('dns: "gone.test" resolves again', timeout=10)


def test_srv_records_give_the_ports_and_weights(proxy, upstreams, dns_server):
    port, heavy_port, light_port = free_port(), free_port(), free_port()
    upstreams(tag_handler, port=heavy_port, name="heavy")
    upstreams(tag_handler, port=light_port, name="light")
    server = dns_server("127.0.0.1 a.test\n", srv=(f"_app._tcp.svc.test,a.test,{heavy_port},0,30",
                                                   f"_app._tcp.svc.test,a.test,{light_port},0,10"))
    p = proxy(config_for(port, server.port, ["_app._tcp.svc.test"], workers=1))
    answers = [first_line(port) for _ in range(80)]
    assert answers.count(b"heavy\n") == 60 and answers.count(b"light\n") == 20
    assert f"127.0.0.1:{heavy_port}" in p.log_text()


def test_a_name_missing_at_start_is_a_warning_and_used_once_it_resolves(proxy, upstreams, dns_server):
    port, up_port = free_port(), free_port()
    upstreams(tag_handler, host="127.0.0.2", port=up_port, name="late")
    server = dns_server("")
    p = proxy(config_for(port, server.port, [f"late.test:{up_port}"], "dns_not_found_ttl: 200ms"))
    line = next(n for n, text in enumerate(p.conf.read_text().splitlines(), 1) if "late.test" in text)
    assert (f"{p.conf}:{line}: upstreams[0].targets[0].target: cannot resolve 'late.test': not found "
            f"(NXDOMAIN) (dns_strict is off") in startup_warnings(p)
    with connect(port) as sock:
        assert sock.recv(100) == b""            # no address yet: the session is closed (502)
    server.set_hosts("127.0.0.2 late.test\n")
    p.wait_log('dns: "late.test" resolves to 127.0.0.2', timeout=10)
    wait_until(lambda: first_line(port) == b"late\n", timeout=5)
    assert "reload" not in p.log_text()


def test_dns_strict_makes_a_missing_name_an_error_at_its_line(proxy, dns_server):
    server = dns_server("")
    p = proxy(config_for(free_port(), server.port, ["missing.test:80"], "dns_strict: on"), start=False)
    result = p.run_cli("-t")
    assert result.returncode != 0
    line = next(n for n, text in enumerate(p.conf.read_text().splitlines(), 1) if "missing.test" in text)
    assert f"{p.conf}:{line}: upstreams[0].targets[0].target: cannot resolve 'missing.test': " \
           f"not found (NXDOMAIN)" in result.stderr, result.stderr


class BadDnsServer:
    """A UDP server that answers `junk.test` with garbage, never answers `slow.test`, and gives
    `many.test` 500 addresses."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.port = free_port()
        self.sock.bind(("127.0.0.1", self.port))
        self.sock.settimeout(0.2)
        self.running = True
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while self.running:
            try:
                wire, client = self.sock.recvfrom(4096)
            except OSError:
                continue
            query = dns.message.from_wire(wire)
            name = query.question[0].name.to_text()
            if name.startswith("junk."):
                self.sock.sendto(wire[:2] + b"\x81\x80garbage that is no DNS message", client)
            elif name.startswith("many.") and query.question[0].rdtype == 1:
                reply = dns.message.make_response(query)
                reply.answer.append(dns.rrset.from_text_list(
                    name, 60, "IN", "A", [f"127.1.{i // 250}.{i % 250 + 1}" for i in range(500)]))
                self.sock.sendto(reply.to_wire(max_size=65535), client)
            elif not name.startswith("slow."):
                self.sock.sendto(dns.message.make_response(query).to_wire(), client)

    def stop(self) -> None:
        self.running = False
        self.thread.join(5)
        self.sock.close()


def test_a_resolver_that_answers_garbage_times_out_or_gives_500_addresses(proxy, upstreams):
    port, up_port = free_port(), free_port()
    upstreams(tag_handler, port=up_port, name="ip")
    bad = BadDnsServer()
    try:
        config = config_for(port, bad.port, [f"127.0.0.1:{up_port}", "junk.test:80", "slow.test:80",
                                              "many.test:80"], "dns_error_ttl: 100ms")
        p = proxy(config)
        warnings = startup_warnings(p)
        assert "cannot resolve 'junk.test': malformed answer from 127.0.0.1" in warnings
        assert "cannot resolve 'slow.test': timed out" in warnings
        p.wait_log('dns: "many.test" has 500 addresses, using the first 128', timeout=10)
        # Sessions keep flowing (over the IP target, and the others where they answer) while the
        # master asks again every 100ms; each cause is logged once.
        load = Load(port)
        time.sleep(2)
        answers = load.stop()
        assert answers.count(b"ip\n") >= 10
        log = p.log_text()
        # Said once at start (above); the master's lookups failing the same way since add nothing.
        assert "junk.test" not in log and "slow.test" not in log
        assert log.count("500 addresses") == 1
    finally:
        bad.stop()


def test_a_reload_during_an_outage_keeps_the_last_addresses(proxy, upstreams, dns_server):
    port, up_port = free_port(), free_port()
    upstreams(tag_handler, host="127.0.0.2", port=up_port, name="kept")
    server = dns_server("127.0.0.2 svc.test\n")
    p = proxy(config_for(port, server.port, [f"svc.test:{up_port}"]))
    server.set_hosts("")
    p.wait_log('dns: cannot resolve "svc.test"', timeout=10)
    p.reload()
    # The new generation's loader could not resolve the name either: its workers start from the
    # addresses the master kept.
    assert [first_line(port) for _ in range(6)] == [b"kept\n"] * 6


# -- the resolver on its own, against the same server ---------------------------------------------------

def test_short_names_take_the_search_domains_of_resolv_conf(dns_server, tmp_path, monkeypatch):
    server = dns_server("127.0.0.2 svc.ns.test\n127.0.0.3 db.test\n")
    resolv_conf = tmp_path / "resolv.conf"
    resolv_conf.write_text("nameserver 192.0.2.1\nsearch other.test ns.test\noptions ndots:2 timeout:1\n")
    monkeypatch.setattr(pyproxy.dns, "RESOLV_CONF", str(resolv_conf))
    settings = DnsSettings(resolver=(("127.0.0.1", server.port),), hostsfile=None)
    answers = resolve_now(["svc", "svc.ns.test", "db.test", "nowhere"], settings, timeout=5)
    assert answers["svc"].records == (("127.0.0.2", 0, 0),)
    assert answers["svc.ns.test"].records == (("127.0.0.2", 0, 0),)
    assert answers["db.test"].records == (("127.0.0.3", 0, 0),)
    # nowhere.other.test and nowhere.ns.test do not exist; then "nowhere" itself is asked, which this
    # server refuses (it answers for .test only).
    assert answers["nowhere"].error == "the server answered REFUSED"


def test_srv_records_whose_targets_do_not_resolve_say_so(dns_server):
    server = dns_server("127.0.0.2 up.test\n", srv=("_half._tcp.svc.test,up.test,7001,0,10",
                                                     "_half._tcp.svc.test,down.test,7002,0,10",
                                                     "_none._tcp.svc.test,down.test,7002,0,10"))
    settings = DnsSettings(resolver=(("127.0.0.1", server.port),), hostsfile=None)
    answers = resolve_now(["_half._tcp.svc.test", "_none._tcp.svc.test"], settings, timeout=5)
    assert answers["_half._tcp.svc.test"].records == (("127.0.0.2", 7001, 10),)
    assert answers["_none._tcp.svc.test"].error == ("its SRV targets do not resolve: "
                                                    "down.test (not found (NXDOMAIN))")


def test_the_hosts_file_is_read_first_and_again_when_it_changes(dns_server, tmp_path):
    server = dns_server("127.0.0.2 svc.test\n")
    hosts = tmp_path / "hosts"
    hosts.write_text("127.0.0.9 svc.test\n")
    resolver = pyproxy.dns.Resolver(DnsSettings(resolver=(("127.0.0.1", server.port),), hostsfile=str(hosts)))
    answers: list[Answer] = []
    resolver.lookup("svc.test", 0.0, answers.append)
    assert answers == [Answer((("127.0.0.9", 0, 0),), pyproxy.dns.HOSTS_TTL)]
    hosts.write_text("# svc.test moved to DNS\n")
    resolver.lookup("svc.test", 2.0, answers.append)      # a second later: the file is read again
    assert len(answers) == 1 and len(resolver.queries) == 2   # A and AAAA, asked over DNS this time
    resolver.close()


def test_a_reload_that_fails_after_loading_leaves_the_served_names_followed(proxy, upstreams, dns_server):
    port, up_port = free_port(), free_port()
    upstreams(tag_handler, host="127.0.0.2", port=up_port, name="old")
    upstreams(tag_handler, host="127.0.0.3", port=up_port, name="new")
    server = dns_server("127.0.0.2 svc.test\n127.0.0.2 other.test\n")
    config = config_for(port, server.port, [f"svc.test:{up_port}"])
    p = proxy(config)
    with socket.socket() as taken:           # the new configuration's second listener cannot bind
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        p.reload(config.replace("svc.test", "other.test").replace(
            f"stream_listen: [127.0.0.1:{port}]", f"stream_listen: [127.0.0.1:{port}, 127.0.0.1:{busy}]"),
            expect="reload failed")
    server.set_hosts("127.0.0.3 svc.test\n127.0.0.2 other.test\n")
    wait_until(lambda: first_line(port) == b"new\n", timeout=10, what="the served name to follow DNS")


def test_active_checks_probe_the_addresses_dns_brings(proxy, upstreams, dns_server):
    port, up_port = free_port(), free_port()
    upstreams(tag_handler, host="127.0.0.2", port=up_port, name="old")
    server = dns_server("127.0.0.2 svc.test\n")
    config = config_for(port, server.port, [f"svc.test:{up_port}"], workers=1).replace(
        "    healthchecks:\n", "    healthchecks:\n      active: {interval: 100ms, timeout: 500ms, "
                             "unhealthy: {tcp_failures: 1}}\n")
    p = proxy(config)
    server.set_hosts("127.0.0.2 svc.test\n127.0.0.3 svc.test\n")     # nothing listens on .3
    p.wait_log(f"target 127.0.0.3:{up_port} is down (active health check: connect failed", timeout=10)
    assert {first_line(port) for _ in range(6)} == {b"old\n"}
