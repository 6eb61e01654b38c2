"""The validated configuration: frozen dataclasses, the only shape the rest of pyproxy sees.

The YAML never leaks past `pyproxy.config`: the loader turns the file into these objects (with every
path made absolute, every duration in seconds, every address parsed) or into a list of errors.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from pyproxy.addresses import family_of, host_port

if TYPE_CHECKING:
    from pyproxy.plugins import Plugin as PluginClass

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# nginx's stream status codes, used in the access log and metrics.
STATUS_OK = 200
STATUS_BAD_REQUEST = 400
STATUS_FORBIDDEN = 403
STATUS_NO_ROUTE = 404
STATUS_INTERNAL = 500
STATUS_BAD_GATEWAY = 502
STATUS_OVER_LIMIT = 503

LOG_LEVELS = ("debug", "info", "notice", "warn", "error", "crit")
# The Linux scheduling policy of the workers: "normal" is SCHED_OTHER (left as inherited), "batch" is
# SCHED_BATCH: a worker woken by incoming bytes does not preempt the process that is running, it waits
# for the next slice or an idle CPU (see README, Performance).
WORKER_SCHED_POLICIES = ("normal", "batch")
ROUTE_PROTOCOLS = ("tcp", "tls", "tls_passthrough", "udp")
ALGORITHMS = ("round-robin", "least-connections", "consistent-hashing")


@dataclass(frozen=True)
class Listen:
    """One `stream_listen` entry: `address:port [ssl] [proxy_protocol] [backlog=N]` or `address:port udp`."""

    host: str                     # literal IP as written: "0.0.0.0", "127.0.0.1", "::"
    port: int
    ssl: bool = False
    proxy_protocol: bool = False
    backlog: int = 511            # nginx's default
    line: int = 0                 # where it was written, for messages
    status: bool = False          # the status_listen socket (HTTP /metrics, /status), not a stream
    udp: bool = False             # Kong's `udp` flag: datagrams (pyproxy.udp), not a stream

    @property
    def family(self) -> int:
        return family_of(self.host)

    @property
    def key(self) -> tuple[str, int, bool]:
        """Identity of the listening socket: a reload keeps sockets whose key is unchanged. TCP and
        UDP on the same address and port are two sockets."""
        return (self.host, self.port, self.udp)

    @property
    def wildcard(self) -> bool:
        return self.host in ("0.0.0.0", "::")

    def __str__(self) -> str:
        text = host_port(self.host, self.port)
        return f"{text} udp" if self.udp else text


@dataclass(frozen=True)
class CertKey:
    cert: str                     # absolute path
    key: str                      # absolute path


@dataclass(frozen=True)
class Certificate:
    cert: str
    key: str
    snis: tuple[str, ...] = ()    # lower-cased; empty = the names inside the certificate
    ocsp_response: str | None = None     # absolute path of a DER OCSP response stapled with it
    # The ssl listeners it serves, as (host, port), host None for every address of the port;
    # empty = every ssl listener.
    listen: tuple[tuple[str | None, int], ...] = ()
    # "one": a `*.` name covers one label (RFC 6125); "any": one or more (nginx's server_name, a
    # Gateway listener's hostname).
    wildcard_depth: str = "one"

    def serves(self, listen: Listen) -> bool:
        """Whether clients of the ssl listener `listen` may get this certificate."""
        return not self.listen or any(port == listen.port and host in (None, listen.host)
                                      for host, port in self.listen)

    def competes_with(self, other: Certificate) -> bool:
        """Whether both would serve a name they share on some ssl listener (then they may not share
        one): neither has `listen`, or their `listen` have a listener in common. One with `listen`
        takes a name over one without, on its listeners."""
        if not self.listen or not other.listen:
            return not self.listen and not other.listen
        return any(port == other_port and (host is None or other_host is None or host == other_host)
                   for host, port in self.listen for other_host, other_port in other.listen)


@dataclass(frozen=True)
class ClientCertificate:
    """`ssl.client_certificate`: ask clients for a certificate and verify it (nginx's
    ssl_verify_client, ssl_client_certificate, ssl_verify_depth, ssl_crl)."""

    ca: str                       # absolute path of the PEM CA certificates
    verify: str = "on"            # "on": a client without one is refused; "optional": it goes through
    depth: int = 1                # CA certificates above the client's that the chain may hold
    crl: str | None = None        # absolute path of PEM CRLs, checked for the client's certificate


@dataclass(frozen=True)
class SSLSettings:
    protocols: tuple[str, ...] = ("TLSv1.2", "TLSv1.3")
    ciphers: str = "ECDHE+AESGCM:ECDHE+CHACHA20"
    default_certificate: CertKey | None = None
    client_certificate: ClientCertificate | None = None
    preread_timeout: float = 5.0       # seconds to receive a whole ClientHello
    alpn: tuple[str, ...] = ()         # ALPN protocols a terminating handshake selects from, preferred first
    handshake_timeout: float = 10.0


@dataclass(frozen=True)
class ActiveHealthcheck:
    type: str = "tcp"             # "udp": a datagram probe (pyproxy.healthcheck.UdpChecker)
    interval: float = 0.0         # seconds; 0 = off
    timeout: float = 1.0
    send: bytes | None = None  # optional bytes written after connect
    expect: bytes | None = None  # bytes the response must start with
    healthy_successes: int = 2
    unhealthy_tcp_failures: int = 2
    unhealthy_timeouts: int = 2


@dataclass(frozen=True)
class PassiveHealthcheck:
    """Failures seen on real sessions. `tcp_failures`/`timeouts` consecutive failures take the target
    out for `fail_timeout` (nginx's max_fails/fail_timeout); 0 disables that counter."""

    unhealthy_tcp_failures: int = 1
    unhealthy_timeouts: int = 1
    fail_timeout: float = 10.0


@dataclass(frozen=True)
class Healthchecks:
    active: ActiveHealthcheck = field(default_factory=ActiveHealthcheck)
    passive: PassiveHealthcheck = field(default_factory=PassiveHealthcheck)


@dataclass(frozen=True)
class Target:
    host: str                     # as written (hostname or IP)
    port: int
    weight: int = 100             # 0 = never picked
    addresses: tuple[tuple[str, int], ...] = ()   # resolved (ip, port) pairs, filled by prepare
    line: int = 0
    backup: bool = False          # used only while every other target is down (nginx, HAProxy)
    max_conns: int = 0            # sessions at once over all workers, per address; 0 = no cap (nginx)
    slow_start: float = 0.0       # seconds over which a target back from down ramps up its weight

    def __str__(self) -> str:
        return host_port(self.host, self.port)


MAX_ADDRESSES = 128     # addresses kept per host name (a balancer walks its peers at every pick)

# One address of a name as DNS gave it: (ip, port, weight). Port 0: the target's; weight 0: the
# target's (A and AAAA records carry neither, SRV records carry both).
Record = tuple[str, int, int]


@dataclass(frozen=True)
class Answer:
    """What one lookup of a host name gave (pyproxy.dns): its records and their TTL, or why none."""

    records: tuple[Record, ...] = ()
    ttl: float = 0.0
    error: str = ""             # empty when the name resolved
    not_found: bool = False     # NXDOMAIN or no records (retried after dns_not_found_ttl)


@dataclass(frozen=True)
class DnsSettings:
    """The `dns_*` keys (Kong's names): how the master resolves host names, and how often."""

    resolver: tuple[tuple[str, int], ...] = ()   # () = the nameservers of /etc/resolv.conf
    hostsfile: str | None = "/etc/hosts"         # read first; None = off
    valid_ttl: float | None = None               # None: each record's own TTL
    stale_ttl: float = 3600.0                    # last addresses kept this long past the TTL
    not_found_ttl: float = 30.0                  # a name that does not exist is asked again after
    error_ttl: float = 1.0                       # a lookup that failed otherwise is tried again after
    strict: bool = False                         # an unresolvable name at load is an error


@dataclass(frozen=True)
class Hostname:
    """A host name written where an address may be (a target, a service's `host`). Validation only
    records it; pyproxy.config.prepare resolves it, and reports one that does not resolve here."""

    host: str
    port: int
    file: str
    line: int
    key: str                      # key path of the value, for messages
    service_host: bool = False    # a service's `host`: may be a misspelt upstream name


@dataclass(frozen=True)
class Queue:
    """`queue`: sessions that find every target at its max_conns wait for a slot (HAProxy's maxconn
    with `timeout queue`) instead of being refused at once."""

    size: int = 0                 # sessions waiting at once over every worker; 0 = no queue
    timeout: float = 5.0          # then the session is refused (503)


@dataclass(frozen=True)
class Upstream:
    name: str
    algorithm: str = "round-robin"
    hash_on: str = "ip"           # ip | sni
    healthchecks: Healthchecks = field(default_factory=Healthchecks)
    targets: tuple[Target, ...] = ()
    queue: Queue = field(default_factory=Queue)
    line: int = field(default=0, compare=False)    # where it was written, for messages


@dataclass(frozen=True)
class AddressMatch:
    """One `sources`/`destinations` entry; a field left out matches anything."""

    network: IPNetwork | None = None
    port: int | None = None


@dataclass(frozen=True)
class Route:
    name: str
    service: str                  # name of the owning service
    protocols: tuple[str, ...] = ("tcp",)
    sources: tuple[AddressMatch, ...] = ()
    destinations: tuple[AddressMatch, ...] = ()
    snis: tuple[str, ...] = ()    # lower-cased; "*.example.com" or "example.*" wildcards allowed
    alpn: tuple[str, ...] = ()    # matches a ClientHello offering one of these ALPN protocols
    # `ssl.client_certificate` of a tls route: its clients' certificates, instead of the top-level one
    client_certificate: ClientCertificate | None = None
    # `ssl.alpn` of a tls route: the protocols its handshakes select from, instead of the top-level ones
    ssl_alpn: tuple[str, ...] | None = None
    # matches a verified client certificate whose subject (RFC 2253) or a subjectAltName
    # ("DNS:a.example") is one of these; known only after the handshake (see Session.route_phase)
    client_identities: tuple[str, ...] = ()
    index: int = 0                # position in the file over all services: ties go to the first written
    line: int = 0


@dataclass(frozen=True)
class Service:
    name: str
    protocol: str = "tcp"         # tcp | tls: encrypt towards the upstream | udp: datagrams (pyproxy.udp)
    host: str = ""
    port: int = 80
    upstream: str | None = None          # set when `host` names an upstream
    addresses: tuple[tuple[str, int], ...] = ()   # resolved (ip, port) when host is not an upstream (prepare)
    connect_timeout: float = 60.0
    read_timeout: float = 60.0
    write_timeout: float = 60.0
    retries: int = 5
    tls_verify: bool = False
    ca_certificates: tuple[str, ...] = ()   # absolute paths of PEM files
    tls_server_name: str | None = None
    client_certificate: CertKey | None = None   # presented to upstreams that ask (Kong's field)
    proxy_protocol: str = "off"   # off | v1 | v2
    tcp_congestion: str | None = None    # TCP congestion control of upstream connections; None: the host's
    # The share of new sessions refused at once, before any target is tried (0 to 1): the Gateway API
    # asks that an invalid backendRef's share of connections be rejected, not given to the others.
    reject_share: float = 0.0
    # UDP only, nginx's directives: the datagrams expected from the upstream for each client datagram
    # (None: no limit, the session ends by read_timeout); the client datagrams after which its next
    # one starts a new session (0: no limit); the longest datagram forwarded whole.
    proxy_responses: int | None = None
    proxy_requests: int = 0
    proxy_buffer_size: int = 65535
    routes: tuple[Route, ...] = ()
    line: int = field(default=0, compare=False)    # where it was written, for messages


@dataclass(frozen=True)
class Plugin:
    name: str
    route: str | None = None
    service: str | None = None
    config: tuple[tuple[str, object], ...] = ()   # validated later by the plugin itself
    line: int = 0


def _built_in_plugins() -> dict[str, type[PluginClass]]:
    from pyproxy.plugins import REGISTRY  # here, not at the top: the plugins import this module
    return dict(REGISTRY)


@dataclass(frozen=True)
class KubernetesSettings:
    """The `gateway.kubernetes` key: read the manifests from an API server (pyproxy.gateway.cluster)."""

    kubeconfig: str | None = None     # absolute; None: in_cluster (the Pod's service account)
    context: str | None = None        # the kubeconfig's context; None: its current-context
    namespaces: tuple[str, ...] = ()  # the namespaces watched; (): all
    lease_name: str = "pyproxy-gateway"
    lease_namespace: str | None = None    # None: the Pod's namespace in a cluster, else "default"
    lease_duration: float = 15.0      # seconds a leader holds the Lease without renewing it
    lease_retry: float = 2.0          # seconds between tries to acquire or renew it


@dataclass(frozen=True)
class GatewaySettings:
    """The `gateway` key: Kubernetes Gateway API (and Kong TCPIngress) manifests read from files as a
    second configuration source (pyproxy.gateway.source)."""

    paths: tuple[str, ...]        # absolute: manifest files, and folders of them (not recursive)
    # Where each Gateway listener port is opened; without `gateway.address`, 0.0.0.0 and :: (0.0.0.0
    # alone on a host without IPv6: pyproxy.addresses.wildcard_addresses).
    addresses: tuple[str, ...] = ("0.0.0.0",)
    runtime_dir: str = ""         # absolute: the PEM files made from Secrets, the translated entities
    controller_name: str = "gateway.pyproxy.dev/controller"
    line: int = field(default=0, compare=False)    # where the key was written, for messages
    # From an API server: its objects, as a snapshot in runtime_dir that `paths` ends with.
    kubernetes: KubernetesSettings | None = None


@dataclass(frozen=True)
class Config:
    path: str                     # absolute path of the file this came from (a source's fragment: its name)
    worker_processes: int = 1     # "auto" already turned into the CPU count
    worker_connections: int = 16384
    worker_shutdown_timeout: float = 30.0
    worker_sched_policy: str = "normal"   # "batch": workers run as SCHED_BATCH (see WORKER_SCHED_POLICIES)
    proxy_protocol_timeout: float = 5.0   # nginx's proxy_protocol_timeout: time to receive the header
    reload_coalesce: float = 0.2   # seconds: at most one reload starts per this long (requests coalesce)
    pid: str | None = None     # absolute path, None = "off"
    user: str | None = None
    status_listen: tuple[str, int] | None = None
    error_log: str = "stderr"     # "stderr" or an absolute path
    log_level: str = "notice"
    access_log: str | None = "stdout"   # "stdout", "stderr", an absolute path, or None (off)
    access_log_format: str = ('$remote_addr [$time_local] $protocol $status $bytes_sent $bytes_received '
                              '$session_time "$upstream_addr" "$ssl_server_name" $route')
    stream_listen: tuple[Listen, ...] = ()
    ssl: SSLSettings = field(default_factory=SSLSettings)
    certificates: tuple[Certificate, ...] = ()
    upstreams: tuple[Upstream, ...] = ()
    services: tuple[Service, ...] = ()
    plugins: tuple[Plugin, ...] = ()
    plugin_modules: tuple[str, ...] = ()   # imported at load: they register more plugins
    declarative_config: str | None = None  # a Kong declarative file of more entities (pyproxy.kong)
    gateway: GatewaySettings | None = None
    # The `status` of each Gateway API object pyproxy owns, by (kind, namespace, name), as the
    # manifests source worked it out (kubectl's shape: apiVersion, kind, metadata, status).
    gateway_status: Mapping[tuple[str, str, str], Mapping[str, object]] = field(
        default_factory=dict, compare=False, repr=False)
    admin_listen: tuple[str, int] | None = None   # the Admin API's address (pyproxy.admin)
    admin_state: str | None = None  # the Kong declarative file the Admin API keeps its entities in
    # `admin_state: postgres://…`: the database a fleet keeps its entities in; admin_state is then the
    # local cache of them (ADMIN_CACHE beside the file), which the reloads read.
    admin_database: str | None = None
    admin_token: str | None = field(default=None, repr=False)   # required in Kong-Admin-Token when set
    # The plugin classes `plugins` may name: the built-ins and those of plugin_modules, imported for
    # this Config alone (pyproxy.plugins.load_plugin_module). Not part of what the Config says.
    plugin_types: Mapping[str, type[PluginClass]] = field(default_factory=_built_in_plugins, compare=False,
                                                          repr=False)
    # The host names among targets and service hosts, where they were written: what prepare resolves.
    hostnames: tuple[Hostname, ...] = field(default=(), compare=False, repr=False)
    dns: DnsSettings = field(default_factory=DnsSettings)
    # What prepare's lookups gave for each host name, for the master to follow from (pyproxy.dns).
    dns_answers: Mapping[str, Answer] = field(default_factory=dict, compare=False, repr=False)

    @property
    def routes(self) -> tuple[Route, ...]:
        """Every route of every service, in the order written."""
        return tuple(r for s in self.services for r in s.routes)

    def upstream(self, name: str) -> Upstream:
        for u in self.upstreams:
            if u.name == name:
                return u
        raise KeyError(name)

    def service(self, name: str) -> Service:
        for s in self.services:
            if s.name == name:
                return s
        raise KeyError(name)
