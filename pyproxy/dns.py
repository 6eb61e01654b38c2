"""Host names that follow DNS: resolved in the master, never in a worker, and published to the workers.

Three parts:

- `Resolver`: non-blocking DNS queries over UDP (dnspython builds and parses the messages; the
  sockets are ours, so the master's select() loop drives them and nothing ever waits on a server).
  `lookup()` answers a host name: the hosts file first (`dns_hostsfile`), then A and AAAA queries; a
  name that starts with `_` (`_service._proto.name`) is an SRV name, whose records give the targets'
  addresses, ports and weights (Kong's behaviour), their own names resolved in turn.
- `DnsFollower`: the master's side. It follows the names of the configuration being served,
  re-resolves each when its TTL expires (`dns_valid_ttl` overrides the record's), keeps the last good
  addresses of a name that stops resolving for `dns_stale_ttl` (and logs each cause once), and
  publishes every change to `pyproxy.shared.AddressTable`, shared memory the workers' balancers read
  when its generation moves: new addresses reach the workers without a reload.

`resolve_now()` runs the same lookups to completion, for the loader (pyproxy.config.prepare).
"""

from __future__ import annotations

import contextlib
import ipaddress
import math
import os
import select
import socket
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from functools import partial

import dns.exception
import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype

from pyproxy.addresses import family_of, host_port, is_ip_address
from pyproxy.config.model import MAX_ADDRESSES, Answer, DnsSettings, Record
from pyproxy.shared import AddressTable

DNS_PORT = 53
QUERY_TIMEOUT = 1.0         # seconds a server has to answer one query before the next server is asked
MIN_TTL = 1.0               # a record's TTL of 0 is re-resolved once a second, not in a loop
HOSTS_TTL = 10.0            # how often a name found in the hosts file is looked up again
EDNS_PAYLOAD = 4096         # the UDP answer size we accept (larger ones arrive truncated)
RESOLV_CONF = "/etc/resolv.conf"
READ_BATCH = 256            # datagrams taken per readiness of a socket (the master has more to do)
NOT_FOUND_RCODES = (dns.rcode.NXDOMAIN, dns.rcode.NOERROR)    # NOERROR without records: no such type


def is_srv_name(host: str) -> bool:
    """True for a name whose SRV records give the targets (`_service._proto.example.com`)."""
    return host.startswith("_")


@dataclass(frozen=True)
class ResolvConf:
    """What pyproxy takes from resolv.conf: the servers (127.0.0.1 when there are none, as the C
    library does), the search domains and ndots (Kubernetes writes `search NS.svc.cluster.local …`
    and `options ndots:5`, so that a Service's short name resolves)."""

    servers: tuple[tuple[str, int], ...] = (("127.0.0.1", DNS_PORT),)
    search: tuple[str, ...] = ()
    ndots: int = 1

    @classmethod
    def read(cls, path: str) -> ResolvConf:
        servers: list[tuple[str, int]] = []
        search: tuple[str, ...] = ()
        ndots = 1
        try:
            with open(path) as fh:
                lines = [line.split() for line in fh]
        except OSError:
            return cls()
        for words in lines:
            if len(words) >= 2 and words[0] == "nameserver" and is_ip_address(words[1].split("%")[0]):
                servers.append((words[1].split("%")[0], DNS_PORT))
            elif words and words[0] in ("search", "domain"):      # the last one written wins
                search = tuple(name.rstrip(".") for name in words[1:])
            elif words and words[0] == "options":
                for option in words[1:]:
                    name, _, value = option.partition(":")
                    if name == "ndots" and value.isdigit():
                        ndots = min(int(value), 15)
        return cls(tuple(servers) or cls.servers, search, ndots)

    def names_for(self, host: str) -> list[str]:
        """The names to ask for `host`, in order: with each search domain first when it has fewer
        dots than ndots (and no trailing dot), then as written; as written first otherwise."""
        if host.endswith(".") or is_ip_address(host) or not self.search:
            return [host]
        searched = [f"{host}.{domain}" for domain in self.search]
        return [*searched, host] if host.count(".") < self.ndots else [host, *searched]


class HostsFile:
    """The hosts file, read again when it changes (its mtime is checked at most once a second)."""

    def __init__(self, path: str | None):
        self.path = path
        self.names: dict[str, list[str]] = {}
        self.stamp: tuple[int, int] | None = None
        self.checked = -1.0

    def addresses(self, host: str, now: float) -> list[str]:
        if self.path is None:
            return []
        if now - self.checked >= 1.0:
            self.checked = now
            self._reread()
        return self.names.get(host.lower().rstrip("."), [])

    def _reread(self) -> None:
        assert self.path is not None
        try:
            info = os.stat(self.path)
            stamp = (info.st_mtime_ns, info.st_size)
            if stamp == self.stamp:
                return
            with open(self.path, encoding="utf-8", errors="replace") as fh:
                text = fh.read()
        except OSError:
            self.names, self.stamp = {}, None
            return
        names: dict[str, list[str]] = {}
        for line in text.splitlines():
            words = line.partition("#")[0].split()
            if len(words) >= 2 and is_ip_address(words[0]):
                for name in words[1:]:
                    names.setdefault(name.lower().rstrip("."), []).append(words[0])
        self.names, self.stamp = names, stamp


@dataclass
class _Query:
    """One question in flight: sent to servers[server], answered or timed out at `deadline`."""

    qid: int
    qname: str
    rdtype: dns.rdatatype.RdataType
    wire: bytes
    done: Callable[[dns.message.Message | None, str], None]
    server: int = 0
    deadline: float = 0.0
    error: str = ""             # why the last server could not even be asked


class Resolver:
    """DNS over UDP without blocking: `lookup()` starts, `readable()` and `expire()` move it on.

    Queries go to the first server and, when it does not answer within QUERY_TIMEOUT, to the next
    (each once). An answer must come from the server asked, with the query's id and question, or it
    is ignored (a late or spoofed packet); one that cannot be parsed fails its query."""

    def __init__(self, settings: DnsSettings):
        self.settings = settings
        system = ResolvConf.read(RESOLV_CONF)
        self.servers = settings.resolver or system.servers
        self.system = system
        self.hosts = HostsFile(settings.hostsfile)
        self.socks: dict[int, socket.socket] = {}     # by address family
        self.queries: dict[int, _Query] = {}
        self.next_id = int.from_bytes(os.urandom(2), "big")

    def close(self) -> None:
        for sock in self.socks.values():
            sock.close()
        self.socks.clear()
        self.queries.clear()

    def fds(self) -> list[int]:
        return [sock.fileno() for sock in self.socks.values()]

    def due(self) -> float | None:
        """The earliest deadline of a query in flight."""
        return min((q.deadline for q in self.queries.values()), default=None)

    # -- names ------------------------------------------------------------------------------------
    def lookup(self, host: str, now: float, done: Callable[[Answer], None]) -> None:
        """Resolve `host` (an SRV name or a host name) with the search domains of resolv.conf; `done`
        is called once, maybe at once. A name of the hosts file is only looked up there."""
        names = [host] if self.hosts.addresses(host, now) else self.system.names_for(host)
        self._first_of(names, now, done)

    def _first_of(self, names: list[str], now: float, done: Callable[[Answer], None]) -> None:
        """The answer for the first of `names` that exists (as the C library walks the search list:
        on to the next name only when one does not exist)."""
        name, rest = names[0], names[1:]

        def answered(answer: Answer) -> None:
            if answer.records or not answer.not_found or not rest:
                done(answer)
            else:
                self._first_of(rest, time.monotonic(), done)

        if is_srv_name(name):
            self._srv(name, now, answered)
        else:
            self._addresses(name, now, answered)

    def _addresses(self, host: str, now: float, done: Callable[[Answer], None]) -> None:
        if is_ip_address(host):
            done(Answer(((host, 0, 0),), math.inf))
            return
        listed = self.hosts.addresses(host, now)
        if listed:
            done(Answer(tuple((ip, 0, 0) for ip in listed), HOSTS_TTL))
            return
        answers: dict[dns.rdatatype.RdataType, Answer] = {}

        def each(rdtype: dns.rdatatype.RdataType, message: dns.message.Message | None, error: str) -> None:
            answers[rdtype] = _address_answer(message, error, rdtype)
            if len(answers) == 2:
                done(_combine(list(answers.values())))

        for rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA):
            self.ask(host, rdtype, now, partial(each, rdtype))

    def _srv(self, host: str, now: float, done: Callable[[Answer], None]) -> None:
        def answered(message: dns.message.Message | None, error: str) -> None:
            if message is None:
                done(Answer(error=error))
                return
            records, ttl, problem = _srv_records(message)
            if problem:
                done(Answer(error=problem, not_found=message.rcode() in NOT_FOUND_RCODES))
                return
            # Addresses the server added to its answer save a query each (dnsmasq and most servers do).
            extra: dict[str, list[tuple[str, float]]] = {}
            for rrset in message.additional:
                if rrset.rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA):
                    name = rrset.name.to_text().lower()
                    extra.setdefault(name, []).extend((rd.address, rrset.ttl) for rd in rrset)
            waiting = {target for target, _, _ in records if target not in extra}

            def finish() -> None:
                out: list[Record] = []
                low = ttl
                failed = []
                for target, port, weight in records:
                    if target in extra:
                        out.extend((ip, port, weight) for ip, _ in extra[target])
                        low = min(low, *(t for _, t in extra[target]))
                    else:
                        answer = resolved[target]
                        if answer.records:
                            out.extend((ip, port, weight) for ip, _, _ in answer.records)
                            low = min(low, answer.ttl)
                        else:
                            failed.append(f"{target.rstrip('.')} ({answer.error})")
                if not out:
                    done(Answer(error="its SRV targets do not resolve: " + ", ".join(failed)))
                    return
                done(Answer(tuple(dict.fromkeys(out)), low))

            resolved: dict[str, Answer] = {}

            def one(target: str, answer: Answer) -> None:
                resolved[target] = answer
                if len(resolved) == len(waiting):
                    finish()

            if not waiting:
                finish()
            for target in waiting:
                self._addresses(target.rstrip("."), time.monotonic(), partial(one, target))

        self.ask(host, dns.rdatatype.SRV, now, answered)

    # -- queries ----------------------------------------------------------------------------------
    def ask(self, qname: str, rdtype: dns.rdatatype.RdataType, now: float,
            done: Callable[[dns.message.Message | None, str], None]) -> None:
        """Send one question; `done(message, "")` with the answer or `done(None, why)`."""
        try:
            message = dns.message.make_query(qname, rdtype, use_edns=0, payload=EDNS_PAYLOAD)
        except (dns.exception.DNSException, ValueError) as exc:
            done(None, f"not a valid DNS name ({exc})")
            return
        self.next_id = (self.next_id + 1) & 0xFFFF
        while self.next_id in self.queries:
            self.next_id = (self.next_id + 1) & 0xFFFF
        message.id = self.next_id
        query = _Query(message.id, qname, rdtype, message.to_wire(), done)
        self.queries[query.qid] = query
        self._send(query, now)

    def _send(self, query: _Query, now: float) -> None:
        address = self.servers[query.server]
        family = family_of(address[0])
        sock = self.socks.get(family)
        try:
            if sock is None:
                sock = socket.socket(family, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
                self.socks[family] = sock
            sock.sendto(query.wire, address)
        except OSError as exc:
            query.deadline = now         # the next expire() tries the next server
            query.error = f"cannot send to {host_port(*address)} ({exc.strerror})"
            return
        query.deadline = now + QUERY_TIMEOUT
        query.error = ""

    def readable(self, fd: int) -> None:
        """Take every datagram waiting on `fd`."""
        for sock in self.socks.values():
            if sock.fileno() == fd:
                break
        else:
            return
        for _ in range(READ_BATCH):
            try:
                wire, source = sock.recvfrom(65535)
            except ConnectionRefusedError:
                continue            # an ICMP port unreachable, reported on the socket: the query times out
            except OSError:
                return              # nothing more (EAGAIN), or nothing we can read
            self._answer(wire, (source[0], source[1]))

    def _answer(self, wire: bytes, source: tuple[str, int]) -> None:
        if len(wire) < 2:
            return
        query = self.queries.get(int.from_bytes(wire[:2], "big"))
        if query is None or _normal(self.servers[query.server]) != _normal(source):
            return
        try:
            message = dns.message.from_wire(wire, ignore_trailing=True)
        except Exception as exc:       # dnspython raises many kinds for a malformed packet
            del self.queries[query.qid]
            query.done(None, f"malformed answer from {host_port(*source)} ({exc.__class__.__name__})")
            return
        question = message.question
        if (len(question) != 1 or question[0].rdtype != query.rdtype
                or question[0].name.to_text().lower().rstrip(".") != query.qname.lower().rstrip(".")):
            return
        del self.queries[query.qid]
        query.done(message, "")

    def expire(self, now: float) -> None:
        """Queries whose server did not answer in time go to the next server, or fail."""
        for query in [q for q in self.queries.values() if q.deadline <= now]:
            if query.server + 1 < len(self.servers):
                query.server += 1
                self._send(query, now)
                continue
            del self.queries[query.qid]
            asked = ", ".join(host_port(*server) for server in self.servers)
            query.done(None, query.error or f"timed out (no answer from {asked} within {QUERY_TIMEOUT:g}s)")


def _normal(address: tuple[str, int]) -> tuple[str, int]:
    return (str(ipaddress.ip_address(address[0].split("%")[0])), address[1])


def _rcode_error(message: dns.message.Message) -> str:
    return f"the server answered {dns.rcode.to_text(message.rcode())}"


def _address_answer(message: dns.message.Message | None, error: str,
                    rdtype: dns.rdatatype.RdataType) -> Answer:
    """The A or AAAA records of an answer (those of a CNAME's target within it too)."""
    if message is None:
        return Answer(error=error)
    rcode = message.rcode()
    if rcode == dns.rcode.NXDOMAIN:
        return Answer(error="not found (NXDOMAIN)", not_found=True)
    if rcode != dns.rcode.NOERROR:
        return Answer(error=_rcode_error(message))
    records: list[Record] = []
    ttl = math.inf
    for rrset in message.answer:
        if rrset.rdtype == rdtype:
            records.extend((rd.address, 0, 0) for rd in rrset)
            ttl = min(ttl, rrset.ttl)
    if not records:
        what = "truncated answer without records" if message.flags & dns.flags.TC else "no A or AAAA records"
        return Answer(error=what, not_found=not message.flags & dns.flags.TC)
    return Answer(tuple(records), ttl)


def _combine(answers: list[Answer]) -> Answer:
    """The A and AAAA answers of a name as one: the addresses of both, or the more telling error."""
    records = tuple(dict.fromkeys(r for a in answers for r in a.records))
    if records:
        return Answer(records, min(a.ttl for a in answers if a.records))
    failed = [a for a in answers if not a.not_found] or answers
    return Answer(error=failed[0].error, not_found=all(a.not_found for a in answers))


def _srv_records(message: dns.message.Message) -> tuple[list[tuple[str, int, int]], float, str]:
    """(target, port, weight) of the lowest priority's SRV records, their TTL, or a problem."""
    rcode = message.rcode()
    if rcode == dns.rcode.NXDOMAIN:
        return [], 0.0, "not found (NXDOMAIN)"
    if rcode != dns.rcode.NOERROR:
        return [], 0.0, _rcode_error(message)
    found = [(rd, rrset.ttl) for rrset in message.answer if rrset.rdtype == dns.rdatatype.SRV for rd in rrset]
    if not found:
        return [], 0.0, "no SRV records"
    low = min(rd.priority for rd, _ in found)
    records = [(rd.target.to_text().lower(), rd.port, max(rd.weight, 1))
               for rd, _ in found if rd.priority == low and rd.port > 0]
    if not records:
        return [], 0.0, "no usable SRV records (port 0)"
    return records, min(ttl for _, ttl in found), ""


def resolve_now(hosts: Iterable[str], settings: DnsSettings, timeout: float = 10.0) -> dict[str, Answer]:
    """Resolve every name of `hosts` at once, waiting for the answers (at most `timeout` seconds):
    for the loader and `pyproxy -t`, which may wait, unlike the master's loop and the workers."""
    resolver = Resolver(settings)
    answers: dict[str, Answer] = {}
    deadline = time.monotonic() + timeout
    try:
        for host in dict.fromkeys(hosts):
            resolver.lookup(host, time.monotonic(), partial(answers.__setitem__, host))
        while resolver.queries:
            now = time.monotonic()
            if now >= deadline:
                break
            due = resolver.due()
            wait = max(0.0, min(deadline, due if due is not None else deadline) - now)
            readable, _, _ = select.select(resolver.fds(), [], [], wait)
            for fd in readable:
                resolver.readable(fd)
            resolver.expire(time.monotonic())
    finally:
        resolver.close()
    for host in hosts:
        answers.setdefault(host, Answer(error=f"timed out (no answer within {timeout:g}s)"))
    return answers


@dataclass
class _Followed:
    """What the master knows of one followed name."""

    records: tuple[Record, ...] = ()
    good_until: float = 0.0      # the records' TTL end; kept dns_stale_ttl longer when lookups fail
    next_at: float = 0.0         # when to look it up again
    busy: bool = False           # a lookup is under way
    cause: str = ""              # the failure last logged, so that each cause is logged once
    too_many: bool = False       # more than MAX_ADDRESSES (logged once)


class DnsFollower:
    """The master's DNS: follows the names of the served configuration and publishes their records."""

    def __init__(self, table: AddressTable, log: Callable[[str, str], None]):
        self.table = table
        self.log = log
        self.settings = DnsSettings()
        self.resolver: Resolver | None = None
        self.names: dict[str, _Followed] = {}

    def follow(self, settings: DnsSettings, answers: dict[str, Answer], now: float) -> None:
        """Follow the names of a configuration about to be served too, starting from what its loader
        resolved (`answers`); a name it could not resolve keeps the records already known. The names
        followed so far stay until `keep_only` (the generation being served reads them)."""
        if settings != self.settings or self.resolver is None:
            if self.resolver is not None:
                self.resolver.close()       # its lookups under way end unanswered: start them again
                for followed in self.names.values():
                    followed.busy = False
            self.settings = settings
            self.resolver = Resolver(settings)
        names = dict(self.names)
        for host, answer in answers.items():
            known = names[host] = self.names.get(host, _Followed())
            if answer.records:
                self._take(host, known, answer, now)
            elif not known.busy:
                # The loader logged this failure (at the file's line): ask again when it is due,
                # and log only a change of cause from here on.
                known.cause = answer.error
                known.next_at = now + (settings.not_found_ttl if answer.not_found else settings.error_ttl)
        self.names = names
        self._publish()

    def keep_only(self, hosts: Iterable[str]) -> None:
        """A new generation serves: stop following the names it does not write."""
        wanted = set(hosts)
        dropped = [host for host in self.names if host not in wanted]
        for host in dropped:
            del self.names[host]
        if dropped:
            self._publish()

    def close(self) -> None:
        if self.resolver is not None:
            self.resolver.close()

    def fds(self) -> list[int]:
        return self.resolver.fds() if self.resolver is not None else []

    def due(self) -> float | None:
        """When `tick` has something to do next."""
        if self.resolver is None:
            return None
        times = [f.next_at for f in self.names.values() if not f.busy]
        query = self.resolver.due()
        if query is not None:
            times.append(query)
        return min(times, default=None)

    def readable(self, fd: int) -> None:
        if self.resolver is not None:
            with self._guarded():
                self.resolver.readable(fd)

    def tick(self, now: float) -> None:
        """Time out queries, and start the lookups that are due."""
        resolver = self.resolver
        if resolver is None:
            return
        with self._guarded():
            resolver.expire(now)
            for host, followed in self.names.items():
                if not followed.busy and now >= followed.next_at:
                    followed.busy = True
                    resolver.lookup(host, now, partial(self._answered, host, followed))

    @contextlib.contextmanager
    def _guarded(self) -> Iterator[None]:
        """A bug here (an answer no test thought of) is logged, and costs DNS updates, not the master."""
        try:
            yield
        except Exception as exc:
            self.log("crit", f"dns: internal error, please report it: {exc!r}")

    def _ttl(self, answer: Answer) -> float:
        ttl = self.settings.valid_ttl if self.settings.valid_ttl is not None else answer.ttl
        return max(MIN_TTL, min(ttl, 86400.0))

    def _answered(self, host: str, followed: _Followed, answer: Answer) -> None:
        followed.busy = False
        if self.names.get(host) is followed and self._take(host, followed, answer, time.monotonic()):
            self._publish()

    def _take(self, host: str, followed: _Followed, answer: Answer, now: float) -> bool:
        """Keep what a lookup of `host` gave, logging what changed; True if its records did."""
        if len(answer.records) > MAX_ADDRESSES:
            if not followed.too_many:
                self.log("warn", f'dns: "{host}" has {len(answer.records)} addresses, using the first '
                                 f'{MAX_ADDRESSES}')
            followed.too_many = True
            answer = Answer(answer.records[:MAX_ADDRESSES], answer.ttl)
        elif answer.records:
            followed.too_many = False
        settings = self.settings
        if answer.records:
            if followed.cause:
                followed.cause = ""
                self.log("notice", f'dns: "{host}" resolves again')
            followed.good_until = followed.next_at = now + self._ttl(answer)
            if answer.records == followed.records:
                return False
            followed.records = answer.records
            self.log("notice", f'dns: "{host}" resolves to {_listed(answer.records)}')
            return True
        followed.next_at = now + (settings.not_found_ttl if answer.not_found else settings.error_ttl)
        if followed.records and now >= followed.good_until + settings.stale_ttl:
            followed.records = ()
            followed.cause = answer.error
            self.log("warn", f'dns: cannot resolve "{host}" ({answer.error}) for dns_stale_ttl '
                             f'({settings.stale_ttl:g}s) after its TTL: its targets have no address now')
            return True
        if answer.error != followed.cause:
            followed.cause = answer.error
            kept = (f"keeping its last addresses {_listed(followed.records)}" if followed.records
                    else "its targets have no address until it resolves")
            self.log("warn", f'dns: cannot resolve "{host}" ({answer.error}): {kept}')
        return False

    def _publish(self) -> None:
        # A name without records is published too: its targets then have no address, rather than
        # the ones a configuration was loaded with.
        entries = {host: f.records for host, f in self.names.items()}
        if not self.table.publish(entries):
            self.log("error", "dns: the resolved addresses do not fit the shared table: the workers "
                              "keep the previous ones")


def _listed(records: tuple[Record, ...]) -> str:
    shown = ", ".join(host_port(ip, port) if port else ip for ip, port, _ in records[:8])
    return shown + (f" and {len(records) - 8} more" if len(records) > 8 else "")
