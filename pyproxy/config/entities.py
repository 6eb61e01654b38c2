"""Kong-shaped entities: upstreams with targets and health checks, services with routes, plugins.

Names are checked for uniqueness and references (a service's upstream, a plugin's route or service) are
resolved. A host name (a target's, a service's `host`) is only recorded in the report: prepare.py
resolves it once, after validation and before any worker starts, so that no worker waits on DNS.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from pyproxy.addresses import is_ip_address

from .errors import Invalid, describe, key_path
from .loader import YamlList, YamlMap
from .model import (
    ALGORITHMS,
    ROUTE_PROTOCOLS,
    ActiveHealthcheck,
    AddressMatch,
    CertKey,
    ClientCertificate,
    Healthchecks,
    PassiveHealthcheck,
    Plugin,
    Queue,
    Route,
    Service,
    Target,
    Upstream,
)
from .sections import Place, Report, Section
from .tlsfiles import DecodedCertificate, check_ca_file, load_certificate_pair
from .values import (
    Converter,
    did_you_mean,
    in_folder,
    integer,
    is_hostname,
    one_of,
    parse_bool,
    parse_duration,
    parse_host,
    parse_host_port,
    parse_name,
    parse_network,
    parse_port,
    parse_sni,
    parse_text,
    positive_duration,
    usable_congestion_control,
)

if TYPE_CHECKING:
    from pyproxy.plugins import Plugin as PluginClass

UPSTREAM_KEYS = ("name", "algorithm", "hash_on", "healthchecks", "targets", "queue")
QUEUE_KEYS = ("size", "timeout")
HEALTHCHECKS_KEYS = ("active", "passive")
ACTIVE_KEYS = ("type", "interval", "timeout", "healthy", "unhealthy", "send", "expect")
# `fail_timeout` is ours, not Kong's: nginx's fail_timeout, how long a target stays out after failing.
PASSIVE_KEYS = ("type", "unhealthy", "fail_timeout")
HEALTHY_KEYS = ("successes",)                       # the counters of `healthy` and `unhealthy`
UNHEALTHY_KEYS = ("tcp_failures", "timeouts")
TARGET_KEYS = ("target", "weight", "backup", "max_conns", "slow_start")
SERVICE_KEYS = (
    "name", "protocol", "host", "port", "connect_timeout", "read_timeout", "write_timeout", "retries",
    "tls_verify", "ca_certificates", "tls_server_name", "client_certificate", "proxy_protocol",
    "tcp_congestion", "proxy_responses", "proxy_requests", "proxy_buffer_size", "reject_share",
    "routes",
)
CERT_KEY_KEYS = ("cert", "key")
ROUTE_KEYS = ("name", "protocols", "sources", "destinations", "snis", "alpn", "ssl", "client_identities")
ROUTE_SSL_KEYS = ("client_certificate", "alpn")
# The subjectAltName types a route's client_identities may name, as Python's getpeercert() and
# OpenSSL's text form write them.
SAN_TYPES = ("DNS", "email", "URI", "IP Address")
CLIENT_CERTIFICATE_KEYS = ("ca", "verify", "depth", "crl")
ADDRESS_MATCH_KEYS = ("ip", "port")
PLUGIN_KEYS = ("name", "route", "service", "config")

DEFAULT_TARGET_PORT = 8000                  # Kong's default when a target omits its port
HEALTH_COUNTER = integer(0, 255)            # Kong's range for health check counters
TLS_ONLY_SERVICE_KEYS = ("tls_verify", "ca_certificates", "tls_server_name", "client_certificate")
UDP_ONLY_SERVICE_SETTINGS = ("proxy_responses", "proxy_requests", "proxy_buffer_size")
STREAM_ONLY_SERVICE_SETTINGS = ("proxy_protocol", "tcp_congestion")
DATAGRAM_COUNT = integer(0, 2**31 - 1)      # proxy_responses, proxy_requests (see Service)


@dataclass(frozen=True)
class TLSContext:
    """What the rest of the file offers routes that need TLS."""

    can_terminate: bool          # a default certificate or at least one certificate
    has_ssl_listener: bool
    asks_client_certificate: bool = False     # the top-level ssl.client_certificate is set


class _UniqueNames:
    """Remembers where each name of one kind was first written, to report a second use."""

    def __init__(self, report: Report, kind: str):
        self.report = report
        self.kind = kind
        self.lines: dict[str, int] = {}

    def claim(self, place: Place, name: str) -> bool:
        """Record `name` as written at `place`; False (and an error) if it was already used."""
        if name in self.lines:
            self.report.error(place, f"{self.kind} name {name!r} is already used at line {self.lines[name]}")
            return False
        self.lines[name] = place.line
        return True


def _addresses(report: Report, place: Place, host: str, port: int,
               service_host: bool = False) -> tuple[tuple[str, int], ...]:
    """The (ip, port) of `host` if it is an IP address; for a host name, () until prepare resolves it
    (recorded in the report, with whether it is a service's host, which may be a misspelt upstream)."""
    if is_ip_address(host):
        return ((host, port),)
    report.hostname(place, host, port, service_host)
    return ()


def read_snis(report: Report, place: Place, value: object) -> list[tuple[Place, str]]:
    """The valid SNI patterns of a `snis` list, with their places."""
    snis = []
    for item_place, item in report.items(place, value):
        sni = report.convert(item_place, item, parse_sni)
        if sni is not None:
            snis.append((item_place, sni))
    return snis


def _alpn_protocol(value: object) -> str:
    """An ALPN protocol ID as IANA registers them (`h2`, `http/1.1`, `postgresql`): 1-255 printable
    ASCII characters."""
    name = parse_text(value)
    if len(name) > 255 or not name.isascii() or not name.isprintable() or " " in name:
        raise Invalid(f"{describe(name)} is not an ALPN protocol ID (1-255 printable ASCII characters, "
                      f"no space: h2, http/1.1)")
    return name


def _client_identity(value: object) -> str:
    """A subject as $ssl_client_s_dn writes it (`CN=alice,O=Example`) or a subjectAltName with its
    type (`DNS:alice.example`, `email:alice@example.com`, `URI:spiffe://example/alice`,
    `IP Address:10.0.0.1`)."""
    text = parse_text(value)
    kind = text.split(":", 1)[0] if ":" in text else None
    if kind in SAN_TYPES or ("=" in text and kind is None):
        return text
    raise Invalid(f"{describe(text)} is neither a subject (CN=alice,O=Example) nor a subjectAltName "
                  f"with its type ({', '.join(f'{t}:…' for t in SAN_TYPES)})")


def read_alpn(report: Report, place: Place, value: object) -> tuple[str, ...]:
    """The ALPN protocol IDs of an `alpn` list (ssl.alpn, a route's), in order, each once."""
    names = [report.convert(item_place, item, _alpn_protocol)
             for item_place, item in report.items(place, value)]
    return tuple(dict.fromkeys(name for name in names if name is not None))


def read_client_certificate(report: Report, place: Place, value: object,
                            base: str) -> ClientCertificate | None:
    """An `ssl.client_certificate` mapping (the top-level `ssl`'s, a route's), or None when wrong."""
    section = report.section(place, value, CLIENT_CERTIFICATE_KEYS)
    if section is None:
        return None
    defaults = ClientCertificate(ca="")
    ca = section.get("ca", lambda v: in_folder(base, v), required=True)
    crl = section.get("crl", lambda v: in_folder(base, v))
    verify = section.get("verify", _verify_client, defaults.verify)
    depth = section.get("depth", integer(0, 100), defaults.depth)
    ca_ok = ca is not None and check_ca_file(report, section.place_of("ca"), ca)
    crl_ok = crl is None or check_ca_file(report, section.place_of("crl"), crl, "CRLs")
    if ca is None or not ca_ok or not crl_ok or verify is None or depth is None:
        return None
    return ClientCertificate(ca=ca, verify=verify, depth=depth, crl=crl)


def _verify_client(value: object) -> str:
    # YAML reads a bare `on` as true.
    if value is True or value == "on":
        return "on"
    if value == "optional":
        return "optional"
    raise Invalid(f"expected on or optional, got {describe(value)} "
                  "(without client_certificate, no certificate is asked for)")


# --- upstreams --------------------------------------------------------------------------------------

def read_upstreams(report: Report, root: Section) -> tuple[Upstream, ...]:
    """Every valid `upstreams[]` entry."""
    names = _UniqueNames(report, "upstream")
    upstreams = []
    for place, value in root.items("upstreams"):
        upstream = _upstream(report, place, value, names)
        if upstream is not None:
            upstreams.append(upstream)
    return tuple(upstreams)


def _upstream(report: Report, place: Place, value: object, names: _UniqueNames) -> Upstream | None:
    section = report.section(place, value, UPSTREAM_KEYS)
    if section is None:
        return None
    defaults = Upstream(name="")
    name = section.get("name", parse_name, required=True)
    if name is not None and not names.claim(section.place_of("name"), name):
        name = None
    upstream = Upstream(
        name=name if name is not None else "",
        algorithm=section.get("algorithm", one_of(ALGORITHMS), defaults.algorithm),
        hash_on=section.get("hash_on", one_of(("ip", "sni")), defaults.hash_on),
        healthchecks=section.nested("healthchecks", _healthchecks, defaults.healthchecks),
        targets=_targets(report, section),
        queue=section.nested("queue", _queue, defaults.queue),
        line=place.line,
    )
    if not section.has("targets") or section.mapping["targets"] == []:
        report.warn(place, "the upstream has no targets: sessions sent to it will fail (502)")
    return upstream if name is not None else None


def _queue(report: Report, place: Place, value: object) -> Queue:
    section = report.section(place, value, QUEUE_KEYS)
    if section is None:
        return Queue()
    return Queue(size=section.get("size", integer(1, 2**31 - 1), 0, required=True),
                 timeout=section.get("timeout", positive_duration, Queue().timeout))


def _healthchecks(report: Report, place: Place, value: object) -> Healthchecks:
    section = report.section(place, value, HEALTHCHECKS_KEYS)
    if section is None:
        return Healthchecks()
    return Healthchecks(
        active=section.nested("active", _active_healthcheck, ActiveHealthcheck()),
        passive=section.nested("passive", _passive_healthcheck, PassiveHealthcheck()),
    )


def _active_healthcheck(report: Report, place: Place, value: object) -> ActiveHealthcheck:
    defaults = ActiveHealthcheck()
    section = report.section(place, value, ACTIVE_KEYS)
    if section is None:
        return defaults
    healthy = _counters(section, "healthy", HEALTHY_KEYS)
    unhealthy = _counters(section, "unhealthy", UNHEALTHY_KEYS)
    check = ActiveHealthcheck(
        type=section.get("type", one_of(("tcp", "udp")), defaults.type),
        interval=section.get("interval", parse_duration, defaults.interval),
        timeout=section.get("timeout", positive_duration, defaults.timeout),
        send=section.get("send", _bytes, defaults.send),
        expect=section.get("expect", _bytes, defaults.expect),
        healthy_successes=healthy.get("successes", defaults.healthy_successes),
        unhealthy_tcp_failures=unhealthy.get("tcp_failures", defaults.unhealthy_tcp_failures),
        unhealthy_timeouts=unhealthy.get("timeouts", defaults.unhealthy_timeouts),
    )
    if check.type == "udp" and check.interval > 0 and not check.send:
        report.error(section.place_of("send") if section.has("send") else place,
                     "a udp probe is the datagram in `send`: set it (a target answers nothing to nothing)")
    return check


def _passive_healthcheck(report: Report, place: Place, value: object) -> PassiveHealthcheck:
    defaults = PassiveHealthcheck()
    section = report.section(place, value, PASSIVE_KEYS)
    if section is None:
        return defaults
    section.get("type", one_of(("tcp",)))     # Kong's passive `type`: tcp is the only one we have
    unhealthy = _counters(section, "unhealthy", UNHEALTHY_KEYS)
    return PassiveHealthcheck(
        unhealthy_tcp_failures=unhealthy.get("tcp_failures", defaults.unhealthy_tcp_failures),
        unhealthy_timeouts=unhealthy.get("timeouts", defaults.unhealthy_timeouts),
        fail_timeout=section.get("fail_timeout", parse_duration, defaults.fail_timeout),
    )


def _counters(parent: Section, key: str, names: tuple[str, ...]) -> dict[str, int]:
    """The health counters written in the `key` sub-mapping (`healthy`, `unhealthy`), by name."""
    if not parent.has(key):
        return {}
    section = parent.report.section(parent.place_of(key), parent.mapping[key], names)
    if section is None:
        return {}
    counters = {name: section.get(name, HEALTH_COUNTER) for name in names}
    return {name: count for name, count in counters.items() if count is not None}


def _bytes(value: object) -> bytes:
    """Bytes to send or expect: a string (UTF-8 encoded) or YAML `!!binary`."""
    if isinstance(value, bytes) and value:
        return value
    return parse_text(value).encode("utf-8")


def _targets(report: Report, upstream: Section) -> tuple[Target, ...]:
    targets = []
    first_lines: dict[tuple[str, int], int] = {}
    for place, value in upstream.items("targets"):
        section = report.section(place, value, TARGET_KEYS)
        if section is None:
            continue
        host_port = section.get("target", lambda text: parse_host_port(text, DEFAULT_TARGET_PORT),
                                required=True)
        defaults = Target("", 0)
        weight = section.get("weight", integer(0, 65535), defaults.weight)
        backup = section.get("backup", parse_bool, defaults.backup)
        max_conns = section.get("max_conns", integer(0, 2**31 - 1), defaults.max_conns)
        slow_start = section.get("slow_start", parse_duration, defaults.slow_start)
        if host_port is None:
            continue
        host, port = host_port
        target_place = section.place_of("target")
        identity = (host.lower(), port)
        if identity in first_lines:
            report.error(target_place, f"target {describe(section.mapping['target'])} "
                                       f"is already listed at line {first_lines[identity]}")
            continue
        first_lines[identity] = target_place.line
        addresses = _addresses(report, target_place, host, port)
        targets.append(Target(host=host, port=port, weight=weight, addresses=addresses, line=place.line,
                              backup=backup, max_conns=max_conns, slow_start=slow_start))
    return tuple(targets)


# --- services and routes ----------------------------------------------------------------------------

def read_services(report: Report, root: Section, base: str, upstreams: tuple[Upstream, ...],
                  tls: TLSContext) -> tuple[Service, ...]:
    """Every valid `services[]` entry with its routes; route indexes count over the whole file."""
    service_names = _UniqueNames(report, "service")
    route_names = _UniqueNames(report, "route")
    upstream_names = {upstream.name for upstream in upstreams}
    services = []
    route_count = 0
    for place, value in root.items("services"):
        section = report.section(place, value, SERVICE_KEYS)
        if section is None:
            continue
        service = _service(report, section, base, upstream_names)
        routes = []
        for route_place, route_value in section.items("routes"):
            route = _route(report, route_place, route_value, service.name, route_count, tls, route_names,
                           base)
            route_count += 1
            if route is not None and (service.protocol == "udp") != ("udp" in route.protocols):
                report.error(route_place, "a udp route belongs to a service with protocol udp, and a "
                                          "service with protocol udp has only udp routes")
            elif route is not None:
                routes.append(route)
        if service.name is not None and service_names.claim(section.place_of("name"), service.name):
            services.append(replace(service, routes=tuple(routes)))
    return tuple(services)


def _service(report: Report, section: Section, base: str, upstream_names: set[str]) -> Service:
    defaults = Service(name="")
    name = section.get("name", parse_name, required=True)
    protocol = section.get("protocol", one_of(("tcp", "tls", "udp")), defaults.protocol)
    port = section.get("port", parse_port, defaults.port)
    host = section.get("host", lambda text: _upstream_name_or_host(text, upstream_names), required=True)
    upstream = host if host in upstream_names else None
    addresses: tuple[tuple[str, int], ...] = ()
    if host is not None and upstream is None:
        addresses = _addresses(report, section.place_of("host"), host, port, service_host=True)
    ca_certificates = []
    for place, value in section.items("ca_certificates"):
        path = report.convert(place, value, lambda text: in_folder(base, text))
        if path is not None and check_ca_file(report, place, path):
            ca_certificates.append(path)
    if protocol in ("tcp", "udp"):
        for key in TLS_ONLY_SERVICE_KEYS:
            if section.has(key) and section.mapping[key] not in (False, []):
                report.warn(section.place_of(key), f"{key} is only used with protocol tls")
    for key in UDP_ONLY_SERVICE_SETTINGS if protocol != "udp" else STREAM_ONLY_SERVICE_SETTINGS:
        if section.has(key) and section.mapping[key] not in (False, "off", None):
            report.warn(section.place_of(key), f"{key} is not used with protocol {protocol}")
    return Service(
        name=name if name is not None else "",
        protocol=protocol,
        host=host or "",
        port=port,
        upstream=upstream,
        addresses=addresses,
        connect_timeout=section.get("connect_timeout", positive_duration, defaults.connect_timeout),
        read_timeout=section.get("read_timeout", positive_duration, defaults.read_timeout),
        write_timeout=section.get("write_timeout", positive_duration, defaults.write_timeout),
        retries=section.get("retries", integer(0, 32767), defaults.retries),
        tls_verify=section.get("tls_verify", parse_bool, defaults.tls_verify),
        ca_certificates=tuple(ca_certificates),
        tls_server_name=section.get("tls_server_name", _server_name, defaults.tls_server_name),
        client_certificate=section.nested("client_certificate",
                                          lambda r, p, v: read_cert_key(r, p, v, base)),
        proxy_protocol=section.get("proxy_protocol", _proxy_protocol_version, defaults.proxy_protocol),
        tcp_congestion=section.get("tcp_congestion", usable_congestion_control, defaults.tcp_congestion),
        reject_share=section.get("reject_share", _share, defaults.reject_share),
        proxy_responses=section.get("proxy_responses", DATAGRAM_COUNT, defaults.proxy_responses),
        proxy_requests=section.get("proxy_requests", DATAGRAM_COUNT, defaults.proxy_requests),
        proxy_buffer_size=section.get("proxy_buffer_size", integer(1, 65535), defaults.proxy_buffer_size),
        line=section.place.line,
    )


def read_cert_key(report: Report, place: Place, value: object, base: str) -> CertKey | None:
    """A `{cert, key}` mapping (ssl.default_certificate, a service's client_certificate), or None
    after reporting why it is unusable."""
    section = report.section(place, value, CERT_KEY_KEYS)
    if section is None:
        return None
    files = certificate_files(report, section, base)
    return CertKey(cert=files[0], key=files[1]) if files else None


def certificate_files(report: Report, section: Section,
                      base: str) -> tuple[str, str, DecodedCertificate] | None:
    """`(cert, key, decoded certificate)` for a mapping with `cert` and `key`, or None if unusable."""
    cert = section.get("cert", lambda v: in_folder(base, v), required=True)
    key = section.get("key", lambda v: in_folder(base, v), required=True)
    if cert is None or key is None:
        return None
    decoded = load_certificate_pair(report, section.place_of("cert"), section.place_of("key"), cert, key)
    return (cert, key, decoded) if decoded is not None else None


def _upstream_name_or_host(value: object, upstream_names: set[str]) -> str:
    if isinstance(value, str) and value in upstream_names:
        return value
    try:
        return parse_host(value)
    except Invalid as problem:
        # An upstream name may hold what a host name cannot (`~`): a misspelt one fails here, not at DNS.
        raise Invalid(f"{problem}{did_you_mean(value, upstream_names, kind='upstream')}") from None


def _share(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
        raise Invalid(f"expected a number from 0 to 1 (0.25: a quarter of the sessions), "
                      f"got {describe(value)}")
    return float(value)


def _server_name(value: object) -> str:
    if not isinstance(value, str) or not is_hostname(value) or is_ip_address(value):
        raise Invalid(f"expected a host name to send as SNI, got {describe(value)}")
    return value


def _proxy_protocol_version(value: object) -> str:
    # YAML 1.1 reads a bare `off` (or `no`) as the boolean false.
    if value is False:
        return "off"
    return one_of(("off", "v1", "v2"))(value)


def _route(report: Report, place: Place, value: object, service: str | None, index: int,
           tls: TLSContext, names: _UniqueNames, base: str) -> Route | None:
    section = report.section(place, value, ROUTE_KEYS)
    if section is None:
        return None
    name = section.get("name", parse_name, required=True)
    if name is not None and not names.claim(section.place_of("name"), name):
        name = None
    protocols = section.nested("protocols", _route_protocols, Route("", "").protocols)
    sources = _address_matches(report, section, "sources")
    destinations = _address_matches(report, section, "destinations")
    snis = read_snis(report, section.place_of("snis"), section.mapping["snis"]) if section.has("snis") else []
    alpn = read_alpn(report, section.place_of("alpn"), section.mapping["alpn"]) if section.has("alpn") else ()
    identities = tuple(dict.fromkeys(
        identity for identity in (report.convert(item_place, item, _client_identity)
                                  for item_place, item in section.items("client_identities"))
        if identity is not None))
    client_certificate = None
    ssl_alpn = None
    if section.has("ssl"):
        route_ssl = report.section(section.place_of("ssl"), section.mapping["ssl"], ROUTE_SSL_KEYS)
        if route_ssl is not None:
            if route_ssl.has("alpn"):
                ssl_alpn = read_alpn(report, route_ssl.place_of("alpn"), route_ssl.mapping["alpn"])
                if protocols is not None and "tls" not in protocols:
                    report.error(route_ssl.place_of("alpn"), "ssl.alpn needs a tls route: a passthrough "
                                                             "route's upstream selects the protocol")
            client_certificate = route_ssl.nested(
                "client_certificate", lambda r, p, v: read_client_certificate(r, p, v, base))
            if client_certificate is not None and protocols is not None and "tls" not in protocols:
                report.error(route_ssl.place_of("client_certificate"),
                             "ssl.client_certificate needs a tls route: a passthrough route never sees "
                             "the client's certificate")
    if identities and protocols is not None:
        if "tls" not in protocols:
            report.error(section.place_of("client_identities"),
                         "client_identities need a tls route: a passthrough route never sees the client's "
                         "certificate")
        elif client_certificate is None and not tls.asks_client_certificate:
            report.error(section.place_of("client_identities"),
                         "client_identities match a verified client certificate: set ssl.client_certificate "
                         "(the route's or the top-level one)")
    if protocols is not None:
        _check_route_rules(report, section, protocols, tls)
    if name is None or protocols is None or service is None:
        return None
    return Route(name=name, service=service, protocols=protocols, sources=sources,
                 destinations=destinations, snis=tuple(dict.fromkeys(sni for _, sni in snis)), alpn=alpn,
                 client_certificate=client_certificate, ssl_alpn=ssl_alpn, client_identities=identities,
                 index=index,
                 line=place.line)


def _route_protocols(report: Report, place: Place, value: object) -> tuple[str, ...] | None:
    """The route's protocols, or None when the list is wrong (the rules cannot be checked then)."""
    items = report.items(place, value)
    converted = [report.convert(item_place, item, one_of(ROUTE_PROTOCOLS)) for item_place, item in items]
    protocols = [protocol for protocol in converted if protocol is not None]
    if not isinstance(value, YamlList) or len(protocols) != len(converted):
        return None
    if not protocols:
        report.error(place, f"list at least one of {', '.join(ROUTE_PROTOCOLS)}")
        return None
    return tuple(dict.fromkeys(protocols))


def _check_route_rules(report: Report, section: Section, protocols: tuple[str, ...], tls: TLSContext) -> None:
    """Kong's rules on which fields each protocol needs, and whether the file can serve the route."""
    def given(key: str) -> bool:
        return section.has(key) and section.mapping[key] != []

    where = section.place_of("protocols") if section.has("protocols") else section.place
    if "tcp" in protocols and not (given("sources") or given("destinations")):
        report.error(where, "a tcp route needs sources or destinations")
    if "udp" in protocols and not (given("sources") or given("destinations")):
        report.error(where, "a udp route needs sources or destinations")
    if "udp" in protocols and len(protocols) > 1:
        report.error(where, "a udp route has protocols [udp] alone: datagrams are neither TCP nor TLS")
    if "tls" in protocols and not (given("sources") or given("destinations") or given("snis")):
        report.error(where, "a tls route needs sources, destinations or snis")
    if "tls_passthrough" in protocols and not (given("sources") or given("destinations") or given("snis")):
        report.error(where, "a tls_passthrough route needs sources, destinations or snis")
    if "tls" in protocols and "tls_passthrough" in protocols:
        report.error(where, "a route either terminates TLS (tls) or passes it through (tls_passthrough), "
                            "not both")
    if given("snis") and protocols in (("tcp",), ("udp",)):
        report.error(section.place_of("snis"), "snis need TLS: add tls or tls_passthrough to protocols")
    if given("alpn") and protocols == ("tcp",):
        report.error(section.place_of("alpn"), "alpn needs TLS: add tls or tls_passthrough to protocols")
    if "tls" in protocols and not tls.can_terminate:
        report.error(where, "a tls route terminates TLS, but there is no certificate: "
                            "add ssl.default_certificate or certificates")
    if not tls.has_ssl_listener and any(protocol in ("tls", "tls_passthrough") for protocol in protocols):
        report.warn(where, "no stream_listen address has the ssl flag: this route never matches TLS")


def _address_matches(report: Report, route: Section, key: str) -> tuple[AddressMatch, ...]:
    matches = []
    for place, value in route.items(key):
        section = report.section(place, value, ADDRESS_MATCH_KEYS)
        if section is None:
            continue
        if not (section.has("ip") or section.has("port")):
            report.error(place, "give an ip, a port or both")
            continue
        matches.append(AddressMatch(network=section.get("ip", parse_network),
                                    port=section.get("port", parse_port)))
    return tuple(matches)


# --- plugins ----------------------------------------------------------------------------------------

def read_plugins(report: Report, root: Section, services: tuple[Service, ...],
                 types: Mapping[str, type[PluginClass]]) -> tuple[Plugin, ...]:
    """Every valid `plugins[]` entry; the route or service it names must exist, and its plugin must
    be one of `types` (whose check() validates its config)."""
    route_names = [route.name for service in services for route in service.routes]
    service_names = [service.name for service in services]
    plugins = []
    for place, value in root.items("plugins"):
        section = report.section(place, value, PLUGIN_KEYS)
        if section is None:
            continue
        name = section.get("name", parse_text, required=True)
        route = section.get("route", _reference("route", route_names))
        service = section.get("service", _reference("service", service_names))
        if section.has("route") and section.has("service"):
            report.error(section.place_of("service"), "a plugin applies to a route or to a service, not both")
        config = section.nested("config", _plugin_config, ())
        config_path = section.place_of("config").path
        config_refused = any(e.key == config_path or e.key.startswith(config_path + ".")
                             for e in report.errors)
        if name is not None and not _known_plugin(report, section.place_of("name"), name, types):
            continue
        if name is not None and config is not None:
            if not config_refused:      # no second opinion on a mapping already refused
                _check_plugin_config(report, section.place_of("config"), types[name], config)
            plugins.append(Plugin(name=name, route=route, service=service, config=config, line=place.line))
    return tuple(plugins)


def _known_plugin(report: Report, place: Place, name: str, types: Mapping[str, type[PluginClass]]) -> bool:
    from pyproxy.plugins import REGISTRY  # here, not at the top: plugins import the model package
    if name in types:
        return True
    report.error(place, f"unknown plugin {name!r}{did_you_mean(name, types)}; "
                        f"built in: {', '.join(sorted(REGISTRY))}")
    return False


def _check_plugin_config(report: Report, place: Place, plugin: type[PluginClass],
                         config: tuple[tuple[str, object], ...]) -> None:
    """The plugin's own checks; its problems are reported at the config's line (their keys inside
    `config`, and inside a record in it, `redis.host`, are named in the key path)."""
    from pyproxy.plugins import plain
    for key, message in plugin.check(plain(config) or {}):
        head, bracket, index = key.partition("[")      # "allow[2]" → allow, then the index
        path = place.path
        for word in head.split("."):                   # "redis.host": `host` in the record `redis`
            inner = key_path(path, word)
            if inner == path:                          # not a plain word: the path stays one word
                message = f"{word!r}: {message}"
                break
            path = inner
        else:
            if bracket:
                path += bracket + index
        report.error(Place(path, place.line), message)


def _reference(kind: str, names: list[str]) -> Converter[str]:
    def convert(value: object) -> str:
        if not isinstance(value, str):
            raise Invalid(f"expected the name of a {kind}, got {describe(value)}")
        if value not in names:
            raise Invalid(f"no {kind} named {describe(value)}{did_you_mean(value, names)}")
        return value
    return convert


def _plugin_config(report: Report, place: Place, value: object) -> tuple[tuple[str, object], ...] | None:
    if not isinstance(value, YamlMap):
        report.error(place, f"expected a mapping, got {describe(value)}")
        return None
    return _frozen_mapping(report, place, value)


def _frozen_settings(report: Report, place: Place, value: object) -> object:
    """A plugin's settings made immutable: lists become tuples, mappings tuples of (key, value) sorted by
    key. Keys must be strings, as in Kong's JSON plugin configurations; None after reporting one that
    is not."""
    if isinstance(value, YamlMap):
        return _frozen_mapping(report, place, value)
    if isinstance(value, YamlList):
        return tuple(_frozen_settings(report, item_place, item)
                     for item_place, item in report.items(place, value))
    return value


def _frozen_mapping(report: Report, place: Place, value: YamlMap) -> tuple[tuple[str, object], ...] | None:
    """A mapping of plugin settings as (key, frozen value) pairs sorted by key (see _frozen_settings)."""
    pairs = []
    for key, item in value.items():
        if not isinstance(key, str):
            report.error(Place(place.path, value.key_lines[key]),
                         f"plugin settings are named by strings, not {describe(key)}")
            return None
        item_place = Place(key_path(place.path, key), value.value_lines[key])
        pairs.append((key, _frozen_settings(report, item_place, item)))
    return tuple(sorted(pairs, key=lambda pair: pair[0]))
