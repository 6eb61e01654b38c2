"""Gateway API and Kong TCPIngress/UDPIngress objects → pyproxy configuration entities and object statuses.

`translate(resources, options)` is pure: it writes no file and opens no socket (a Secret's key pair is
checked in memory files) and returns `Translation(entities, statuses, files, notices)`:

- `entities`: a mapping in pyproxy's own configuration schema (`stream_listen`, `certificates`,
  `upstreams`, `services` with their `routes`), to be merged with a configuration file and checked by
  the same validator (see `merge_entities`);
- `statuses`: for each object pyproxy owns, keyed `(kind, namespace, name)`, the `status` the Gateway
  API asks for (conditions without `lastTransitionTime`, which the writer stamps);
- `files`: the PEM files the certificates and CA bundles name (`secrets.write_pem_files` writes them);
- `notices`: malformed objects skipped, kinds ignored, choices the user should know of.

Sources of every rule: docs/design/gateway-api.md (§2 attachment, §3 status, §5 TCPIngress; §9 says
what is implemented and what the configuration model cannot express yet).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from pyproxy.addresses import host_port, is_ip_address
from pyproxy.config import Invalid, parse_address
from pyproxy.config.values import parse_sni

from . import hostnames, objects
from .manifests import Notice, Resource
from .objects import GATEWAY_GROUP, Malformed, ObjectRef
from .secrets import ca_path, check_ca_bundle, check_pair, pem_paths

CONTROLLER_NAME = "gateway.pyproxy.dev/controller"
SUPPORTED_FEATURES = ("BackendTLSPolicy", "Gateway", "ReferenceGrant", "TCPRoute", "TLSRoute",
                      "TLSRouteModeMixed", "TLSRouteModeTerminate", "UDPRoute")
ROUTE_PROTOCOLS = ("tcp", "tls", "tls_passthrough")
# The service, upstream and routes (`.PORT`) that refuse an isolated listener's SNIs: `_` is in no
# Kubernetes name, so no translated name can be this.
ISOLATION = "gateway_listener-isolation"
Entities = dict[str, list[Any]]
StatusKey = tuple[str, str, str]         # (kind, namespace, name); namespace "" for a GatewayClass
_Condition = tuple[bool, str, str]       # (status, reason, message) of a condition being decided
# A service entity with its precedence: (route's age key, order written).
_Program = tuple[tuple[str, str, str], int, dict[str, Any]]
_Attachment = tuple[int, "_Listener", tuple[str, ...]]   # (parentRef index, listener, SNIs there)


@dataclass(frozen=True)
class Options:
    """What the translation needs to know besides the objects."""

    controller_name: str = CONTROLLER_NAME
    ingress_class: str = "kong"
    # Where Gateway listeners listen; each listener port is opened on each of these addresses.
    addresses: tuple[str, ...] = ("0.0.0.0",)
    # Folder of the PEM files made from Secrets (named in `certificates`, written by write_pem_files).
    runtime_dir: str = "/run/pyproxy/gateway"
    # The configuration file's own stream_listen entries: a Gateway listener on one of those addresses
    # adds no entry (and must agree on `ssl`); TCPIngress rules need a port served by one or the other.
    stream_listen: tuple[str, ...] = ()
    # The configuration file's status_listen address (HTTP /metrics): a Gateway listener may not take it.
    status_listen: tuple[str, int] | None = None
    # The addresses clients reach pyproxy at, written in Gateway and TCPIngress statuses.
    publish_addresses: tuple[str, ...] = ()
    # False until the configuration carrying this translation is running: Programmed is then Pending.
    programmed: bool = True


@dataclass
class Translation:
    entities: Entities
    statuses: dict[StatusKey, dict[str, Any]]
    files: dict[str, bytes]
    notices: list[Notice]


def condition(kind: str, ok: bool | None, reason: str, message: str, generation: int) -> dict[str, Any]:
    """A metav1.Condition without lastTransitionTime; `ok` None is status Unknown."""
    status = "Unknown" if ok is None else "True" if ok else "False"
    return {"type": kind, "status": status, "reason": reason, "message": message,
            "observedGeneration": generation}


def merge_entities(base: dict[str, Any], entities: Entities) -> dict[str, Any]:
    """A configuration: `base` (a parsed configuration file) with the translated entities appended."""
    merged = dict(base)
    for key, items in entities.items():
        if items:
            existing = merged.get(key) or []
            if isinstance(existing, str):           # Kong's "a, b ssl" form of stream_listen
                existing = [part.strip() for part in existing.split(",")]
            merged[key] = [*existing, *items]
    return merged


# --- working state ----------------------------------------------------------------------------------

@dataclass
class _Listener:
    """A Gateway listener while it is judged: its conditions so far and what attached to it."""

    gateway: objects.Gateway
    spec: objects.Listener
    kinds: list[tuple[str, str]]
    accepted: _Condition = (True, "Accepted", "")
    conflicted: str | None = None
    resolved: _Condition = (True, "ResolvedRefs", "")
    overlapping: bool = False
    attached: int = 0
    certificate: objects.Secret | None = None

    @property
    def usable(self) -> bool:
        """Accepted, and able to terminate when it must: routes on it carry traffic."""
        return self.accepted[0] and (self.spec.tls_mode != "Terminate" or self.certificate is not None)


@dataclass
class _Backend:
    """A backendRef (or a TCPIngress backend) resolved: the targets, or why there are none."""

    upstream: str
    targets: list[tuple[str, int]]
    weight: int
    reason: str = ""
    message: str = ""
    service: objects.Service | None = None
    port_name: str = ""


@dataclass
class _Policy:
    """A BackendTLSPolicy judged: its conditions, the service settings it gives, the Gateways using it."""

    policy: objects.BackendTLSPolicy
    accepted: _Condition = (True, "Accepted", "")
    resolved: _Condition = (True, "ResolvedRefs", "")
    settings: dict[str, Any] | None = None       # protocol, tls_verify, ...; None: connections must fail
    ancestors: list[objects.Gateway] = field(default_factory=list)


@dataclass
class _State:
    options: Options
    notices: list[Notice]
    services: dict[tuple[str, str], objects.Service] = field(default_factory=dict)
    slices: dict[tuple[str, str], list[objects.EndpointSlice]] = field(
        default_factory=lambda: defaultdict(list))
    # v1 Endpoints, as slices: a Service's endpoints when it has no EndpointSlice at all.
    legacy_endpoints: dict[tuple[str, str], tuple[objects.EndpointSlice, ...]] = field(default_factory=dict)
    secrets: dict[tuple[str, str], objects.Secret] = field(default_factory=dict)
    namespaces: dict[str, dict[str, str]] = field(default_factory=dict)
    grants: dict[str, list[objects.ReferenceGrant]] = field(default_factory=lambda: defaultdict(list))
    statuses: dict[StatusKey, dict[str, Any]] = field(default_factory=dict)
    files: dict[str, bytes] = field(default_factory=dict)
    # (cert path, listener port or None: every listener) → entry
    certificates: dict[tuple[str, int | None], dict[str, Any]] = field(default_factory=dict)
    sni_owner: dict[tuple[str, int | None], str] = field(default_factory=dict)  # (SNI, port) → cert path
    upstreams: dict[str, dict[str, Any]] = field(default_factory=dict)
    # (precedence, service entity): sorted before they are written, so the oldest route comes first.
    programs: list[_Program] = field(default_factory=list)
    stream_listen: dict[tuple[str, int], bool] = field(default_factory=dict)  # (host, port) → ssl
    udp_listen: set[tuple[str, int]] = field(default_factory=set)             # the file's `udp` ones
    tls_listeners: dict[int, list[_Listener]] = field(default_factory=lambda: defaultdict(list))
    port_hostnames: dict[int, hostnames.PortHostnames] = field(default_factory=dict)   # of tls_listeners
    key_pairs: dict[tuple[bytes, bytes], tuple[tuple[str, ...], str | None]] = field(default_factory=dict)
    config_maps: dict[tuple[str, str], objects.ConfigMap] = field(default_factory=dict)
    # (namespace, Service, port name or None for every port) → the policies naming it, oldest first.
    policies: dict[tuple[str, str, str | None], list[_Policy]] = field(
        default_factory=lambda: defaultdict(list))

    def key_pair(self, secret: objects.Secret) -> tuple[tuple[str, ...], str | None]:
        """`secrets.check_pair` of a TLS Secret, once per content however many listeners name it."""
        assert secret.certificate is not None and secret.key is not None
        pair = (secret.certificate, secret.key)
        if pair not in self.key_pairs:
            self.key_pairs[pair] = check_pair(*pair)
        return self.key_pairs[pair]

    def permitted(self, from_kind: str, from_namespace: str, ref: ObjectRef) -> bool:
        """A reference to another namespace is allowed by a ReferenceGrant there (GW ReferenceGrant)."""
        if ref.namespace == from_namespace:
            return True
        for grant in self.grants.get(ref.namespace, ()):
            if ((GATEWAY_GROUP, from_kind, from_namespace) in grant.sources
                    and any(group == ref.group and kind == ref.kind and name in (None, ref.name)
                            for group, kind, name in grant.targets)):
                return True
        return False

    def namespace_labels(self, namespace: str) -> dict[str, str]:
        return self.namespaces.get(namespace, {"kubernetes.io/metadata.name": namespace})


# --- entry point ------------------------------------------------------------------------------------

def translate(resources: list[Resource], options: Options | None = None,
              known: dict[int, objects.Parsed] | None = None) -> Translation:
    """Translate the objects (as read by `read_paths` or from the API); see the module docstring.
    `known`: `objects.parse` of some of them, by their id(), which are not parsed again."""
    options = options or Options()
    state = _State(options, [])
    parsed = _parse_all(state, resources, known or {})
    for listen in options.stream_listen:
        address, *flags = listen.split()
        try:
            if "udp" in flags:      # a UDP port: a TCP or TLS Gateway listener may share its number
                state.udp_listen.add(parse_address(address))
            else:
                state.stream_listen[parse_address(address)] = "ssl" in flags
        except Invalid:
            continue            # the validator reports the file's own entries
    for item in parsed:
        if isinstance(item, objects.Service):
            state.services[(item.meta.namespace, item.meta.name)] = item
        elif isinstance(item, objects.EndpointSlice) and item.service_name:
            state.slices[(item.meta.namespace, item.service_name)].append(item)
        elif isinstance(item, objects.Endpoints):
            state.legacy_endpoints[(item.meta.namespace, item.meta.name)] = item.slices
        elif isinstance(item, objects.Secret):
            state.secrets[(item.meta.namespace, item.meta.name)] = item
        elif isinstance(item, objects.Namespace):
            state.namespaces[item.meta.name] = item.labels
        elif isinstance(item, objects.ReferenceGrant):
            state.grants[item.meta.namespace].append(item)
        elif isinstance(item, objects.ConfigMap):
            state.config_maps[(item.meta.namespace, item.meta.name)] = item
    judged = [_backend_tls_policy(state, item) for item in
              sorted((item for item in parsed if isinstance(item, objects.BackendTLSPolicy)),
                     key=lambda policy: policy.meta.resource.age_key)]

    classes = {item.meta.name for item in parsed
               if isinstance(item, objects.GatewayClass) and _gateway_class(state, item)}
    gateways = sorted((item for item in parsed if isinstance(item, objects.Gateway)
                       and item.class_name in classes), key=lambda gateway: gateway.meta.resource.age_key)
    listeners = _listeners(state, gateways)
    routes = sorted((item for item in parsed if isinstance(item, objects.Route)),
                    key=lambda route: route.meta.resource.age_key)
    by_gateway: dict[tuple[str, str], list[_Listener]] = defaultdict(list)
    for entry in listeners:
        by_gateway[(entry.gateway.meta.namespace, entry.gateway.meta.name)].append(entry)
    for route in routes:
        _route(state, route, by_gateway)
    for gateway in gateways:
        _gateway_status(state, gateway, by_gateway[(gateway.meta.namespace, gateway.meta.name)])
    for policy in judged:
        _policy_status(state, policy)
    # KIC's ExactOrEmptyClassMatch: no class annotation means the default IngressClass, if that is ours.
    by_default = any(isinstance(item, objects.IngressClass) and item.meta.name == options.ingress_class
                     and item.is_default for item in parsed)
    ingresses = sorted((item for item in parsed if isinstance(item, objects.TCPIngress)
                        and (item.ingress_class or (options.ingress_class if by_default else None))
                        == options.ingress_class),
                       key=lambda ingress: ingress.meta.resource.age_key)
    ports = {port: ssl for (_, port), ssl in state.stream_listen.items()}
    ports.update({entry.spec.port: entry.spec.protocol == "TLS" for entry in listeners
                  if entry.accepted[0] and entry.spec.protocol != "UDP"})
    for ingress in ingresses:
        _tcp_ingress(state, ingress, ports)
    udp_ports = {port for _, port in state.udp_listen}
    udp_ports.update(entry.spec.port for entry in listeners
                     if entry.accepted[0] and entry.spec.protocol == "UDP")
    for udp_ingress in sorted((item for item in parsed if isinstance(item, objects.UDPIngress)
                               and (item.ingress_class or (options.ingress_class if by_default else None))
                               == options.ingress_class),
                              key=lambda ingress: ingress.meta.resource.age_key):
        _udp_ingress(state, udp_ingress, udp_ports)
    return Translation(_entities(state, listeners), state.statuses, state.files, state.notices)


def _parse_all(state: _State, resources: list[Resource],
               known: dict[int, objects.Parsed]) -> list[objects.Parsed]:
    """The objects of the kinds pyproxy reads, typed (those `known` by their id() as they are there);
    one notice per other kind, one per bad object."""
    parsed: list[objects.Parsed] = []
    ignored: dict[tuple[str, str], list[Resource]] = defaultdict(list)
    seen: dict[tuple[str, str, str], Resource] = {}
    for resource in resources:
        if resource.api_version not in objects.API_VERSIONS.get(resource.kind, ()):
            ignored[(resource.api_version, resource.kind)].append(resource)
            continue
        identity = (resource.kind, resource.namespace, resource.name)
        if identity in seen:
            first = seen[identity]
            state.notices.append(resource.notice(f"already defined at {first.file}:{first.line}; "
                                                 "this one is skipped"))
            continue
        seen[identity] = resource
        item = known.get(id(resource))
        try:
            parsed.append(item if item is not None else objects.parse(resource))
        except Malformed as error:
            state.notices.append(resource.notice(f"{error.message}; the object is skipped", error.field))
    for (api_version, kind), skipped in ignored.items():
        first = skipped[0]
        versions = objects.API_VERSIONS.get(kind)
        why = (f"pyproxy reads {kind} as {', '.join(versions)}" if versions
               else "not a kind pyproxy reads")
        state.notices.append(Notice(first.file, first.line, f"{kind} ({api_version}): {why}: "
                                                            f"{len(skipped)} object(s) ignored"))
    return parsed


# --- GatewayClass and Gateway -----------------------------------------------------------------------

def _gateway_class(state: _State, gateway_class: objects.GatewayClass) -> bool:
    """True when the class is pyproxy's (its status is then written)."""
    if gateway_class.controller_name != state.options.controller_name:
        return False
    generation = gateway_class.meta.generation
    if gateway_class.has_parameters:
        accepted = condition("Accepted", False, "InvalidParameters", "pyproxy takes no parametersRef",
                             generation)
    else:
        accepted = condition("Accepted", True, "Accepted", "", generation)
    state.statuses[("GatewayClass", "", gateway_class.meta.name)] = {
        "conditions": [accepted, condition("SupportedVersion", True, "SupportedVersion", "", generation)],
        "supportedFeatures": [{"name": name} for name in SUPPORTED_FEATURES],
    }
    return not gateway_class.has_parameters


def _supported_kinds(listener: objects.Listener) -> tuple[list[tuple[str, str]], list[str]]:
    """`(supported (group, kind) list, kinds refused)` (GW AllowedRoutes.Kinds; brief §2.2)."""
    if listener.protocol == "TCP":
        defaults = ["TCPRoute"]
    elif listener.protocol == "UDP":
        defaults = ["UDPRoute"]
    elif listener.protocol == "TLS" and listener.tls_mode == "Passthrough":
        defaults = ["TLSRoute"]
    elif listener.protocol == "TLS":
        defaults = ["TLSRoute", "TCPRoute"]
    else:
        defaults = []
    if listener.kinds is None:
        return [(GATEWAY_GROUP, kind) for kind in defaults], []
    supported = [(group, kind) for group, kind in listener.kinds
                 if group == GATEWAY_GROUP and kind in defaults]
    refused = [kind for group, kind in listener.kinds if (group, kind) not in supported]
    return list(dict.fromkeys(supported)), refused


def _listeners(state: _State, gateways: list[objects.Gateway]) -> list[_Listener]:
    """Every listener of pyproxy's Gateways, judged: protocol, conflicts, route kinds, certificates."""
    entries: list[_Listener] = []
    # Listeners accepted so far, per port — earlier Gateways win.
    taken: dict[int, _PortHolders] = defaultdict(_PortHolders)
    udp_taken: dict[int, objects.Gateway] = {}      # UDP listeners accepted so far: port → Gateway
    for gateway in gateways:
        mine = []
        for spec in gateway.listeners:
            kinds, refused = _supported_kinds(spec)
            entry = _Listener(gateway, spec, kinds)
            if refused:
                entry.resolved = (False, "InvalidRouteKinds",
                                  f"not route kinds of a {spec.protocol} listener: {', '.join(refused)}")
            if spec.protocol not in ("TCP", "TLS", "UDP"):
                entry.accepted = (False, "UnsupportedProtocol",
                                  f"pyproxy serves TCP, TLS and UDP listeners, not {spec.protocol}")
            mine.append(entry)
        # Listeners conflict within a transport: a UDP listener shares its number with any TCP or TLS one.
        by_port: dict[tuple[bool, int], list[_Listener]] = defaultdict(list)
        for entry in mine:
            if entry.accepted[0]:
                by_port[(entry.spec.protocol == "UDP", entry.spec.port)].append(entry)
        for (_, port), group in by_port.items():
            if len(group) > 1 and any(entry.spec.protocol == "TCP" for entry in group):
                for entry in group:
                    entry.conflicted = "ProtocolConflict"
                    entry.accepted = (False, "ProtocolConflict",
                                      f"port {port} has a TCP listener and another listener in this Gateway")
        for entry in mine:
            if entry.spec.protocol == "UDP":
                _check_udp_port(entry, udp_taken)
                continue
            if entry.accepted[0]:
                _check_port(state, entry, taken[entry.spec.port])
            if entry.accepted[0]:
                taken[entry.spec.port].add(entry.spec.protocol, entry.spec.hostname, gateway)
            if entry.spec.tls_mode == "Terminate":
                _listener_certificate(state, entry)
        entries.extend(mine)
    for entry in entries:
        if entry.accepted[0] and entry.spec.protocol == "TLS":
            state.tls_listeners[entry.spec.port].append(entry)
    for port, group in state.tls_listeners.items():
        names = state.port_hostnames[port] = hostnames.PortHostnames(entry.spec.hostname for entry in group)
        for entry in group:
            entry.overlapping = names.overlaps(entry.spec.hostname)
    return entries


class _PortHolders:
    """The listeners of earlier Gateways accepted on one port, indexed by what refuses a later one:
    the first of each protocol, and the first TLS listener of each hostname (so that 1,000 listeners
    on one port are checked in linear time)."""

    def __init__(self) -> None:
        self.count = 0
        self.first_of_protocol: dict[str, tuple[int, objects.Gateway]] = {}
        self.first_of_hostname: dict[str | None, tuple[int, objects.Gateway]] = {}

    def add(self, protocol: str, hostname: str | None, gateway: objects.Gateway) -> None:
        self.first_of_protocol.setdefault(protocol, (self.count, gateway))
        self.first_of_hostname.setdefault(hostname, (self.count, gateway))
        self.count += 1

    def refusal(self, protocol: str, hostname: str | None) -> tuple[str, str, objects.Gateway] | None:
        """`(reason, the holder's protocol, its Gateway)` of the first earlier listener that refuses
        a listener of `protocol` and `hostname`: any for TCP (or one of another protocol),
        one of the same hostname for TLS."""
        found = [(order, "PortUnavailable", held, gateway)
                 for held, (order, gateway) in self.first_of_protocol.items()
                 if held != protocol or held == "TCP"]
        if protocol != "TCP" and hostname in self.first_of_hostname:
            order, gateway = self.first_of_hostname[hostname]
            found.append((order, "HostnameConflict", protocol, gateway))
        if not found:
            return None
        _, reason, held, gateway = min(found, key=lambda item: item[0])
        return reason, held, gateway


def _check_port(state: _State, entry: _Listener, earlier: _PortHolders) -> None:
    """Refuse a listener whose port an earlier Gateway's listener or the configuration file holds."""
    spec = entry.spec
    refused = earlier.refusal(spec.protocol, spec.hostname)
    if refused is not None:
        reason, protocol, gateway = refused
        if reason == "PortUnavailable":
            entry.accepted = (False, "PortUnavailable",
                              f"port {spec.port} is already used by a {protocol} listener of Gateway "
                              f"{gateway.meta.namespace}/{gateway.meta.name}")
        else:
            entry.conflicted = "HostnameConflict"
            entry.accepted = (False, "HostnameConflict",
                              f"Gateway {gateway.meta.namespace}/{gateway.meta.name} already has a TLS "
                              f"listener on port {spec.port} for {spec.hostname or 'every hostname'}")
        return
    status = state.options.status_listen
    if status is not None and status[1] == spec.port and (
            status[0] in state.options.addresses or status[0] in ("0.0.0.0", "::")
            or any(address in ("0.0.0.0", "::") for address in state.options.addresses)):
        entry.accepted = (False, "PortUnavailable",
                          f"port {spec.port} is the status_listen address of the configuration file")
        return
    for (_, port), ssl in state.stream_listen.items():
        if port == spec.port and ssl != (spec.protocol == "TLS"):
            entry.accepted = (False, "PortUnavailable",
                              f"port {port} is a stream_listen address of the configuration file "
                              f"{'with' if ssl else 'without'} ssl")
            return


def _check_udp_port(entry: _Listener, taken: dict[int, objects.Gateway]) -> None:
    """Refuse a UDP listener whose port an earlier Gateway's UDP listener holds; else take the port.
    (A `udp` stream_listen entry of the configuration file on that port is shared, as for TCP.)"""
    if not entry.accepted[0]:
        return
    port = entry.spec.port
    holder = taken.setdefault(port, entry.gateway)
    if holder is not entry.gateway:
        entry.accepted = (False, "PortUnavailable", f"port {port} is already used by a UDP listener of "
                                                    f"Gateway {holder.meta.namespace}/{holder.meta.name}")


def _listener_certificate(state: _State, entry: _Listener) -> None:
    """Resolve a Terminate listener's certificateRefs: the first usable Secret serves the listener."""
    gateway = entry.gateway
    problems: list[tuple[str, str]] = []
    if not entry.spec.certificate_refs:
        problems.append(("InvalidCertificateRef", "a Terminate listener needs tls.certificateRefs"))
    for ref in entry.spec.certificate_refs:
        what = f"Secret {ref.namespace}/{ref.name}"
        if ref.group not in ("", "core") or ref.kind != "Secret":
            problems.append(("InvalidCertificateRef", f"a certificateRef must name a Secret, not "
                                                      f"{ref.kind} of group {ref.group!r}"))
        elif not state.permitted("Gateway", gateway.meta.namespace, ref):
            problems.append(("RefNotPermitted", f"no ReferenceGrant in namespace {ref.namespace} lets "
                                                f"Gateways of {gateway.meta.namespace} use {what}"))
        else:
            secret = state.secrets.get((ref.namespace, ref.name))
            why = _unusable_secret(state, secret)
            if why is not None:
                problems.append(("InvalidCertificateRef", f"{what}: {why}"))
            elif entry.certificate is None:
                entry.certificate = secret
    if problems:
        entry.resolved = (False, problems[0][0], "; ".join(message for _, message in problems))
    if entry.certificate is not None and entry.accepted[0]:
        hostname = entry.spec.hostname
        _add_certificate(state, entry.certificate, (hostname,) if hostname else None,
                         f"listener {entry.spec.name} of {gateway.meta.resource.ref}", gateway.meta.resource,
                         entry.spec.port)


def _unusable_secret(state: _State, secret: objects.Secret | None) -> str | None:
    if secret is None:
        return "not found"
    if secret.type != objects.SECRET_TYPE_TLS:
        return f"type {secret.type}, not {objects.SECRET_TYPE_TLS}"
    if not secret.certificate or not secret.key:
        return "tls.crt or tls.key is missing"
    return state.key_pair(secret)[1]


def _add_certificate(state: _State, secret: objects.Secret, snis: tuple[str, ...] | None, user: str,
                     resource: Resource, port: int | None = None) -> None:
    """Serve `secret` for `snis` (None: the names inside it) on the ssl listeners of `port` (its
    `listen`), or on every listener (None: a TCPIngress's, as KIC's are); a name already served on
    the same listeners stays with the first. A listener's certificate takes its names over the
    TCPIngresses' there, and serves its wildcard hostname as the listener matches it: one label or
    more (`wildcard_depth: any`)."""
    assert secret.certificate is not None and secret.key is not None
    cert_path, key_path = pem_paths(state.options.runtime_dir, secret.certificate, secret.key)
    deep = port is not None and snis is not None     # a listener's hostname
    if snis is None:
        snis = tuple(name for name in state.key_pair(secret)[0] if _is_sni(name))
    entry = state.certificates.get((cert_path, port))
    for sni in snis:
        owner = state.sni_owner.setdefault((sni, port), cert_path)
        if owner != cert_path:
            where = f"port {port}" if port is not None else "every listener"
            state.notices.append(resource.notice(
                f"{user}: {sni} is already served on {where} by another Secret's certificate, "
                "which it keeps"))
            continue
        if entry is None:
            entry = state.certificates[cert_path, port] = {"cert": cert_path, "key": key_path, "snis": []}
            if port is not None:
                entry["listen"] = [port]
            state.files[cert_path], state.files[key_path] = secret.certificate, secret.key
        if sni not in entry["snis"]:
            entry["snis"].append(sni)
        if deep and sni.startswith("*."):
            entry["wildcard_depth"] = "any"


def _is_sni(name: str) -> bool:
    try:
        parse_sni(name)
    except Invalid:
        return False
    return True


def _gateway_status(state: _State, gateway: objects.Gateway, entries: list[_Listener]) -> None:
    generation = gateway.meta.generation
    pending = not state.options.programmed
    listener_statuses = []
    for entry in entries:
        conditions = [
            condition("Accepted", *entry.accepted, generation),
            condition("ResolvedRefs", *entry.resolved, generation),
        ]
        if not entry.usable:
            reason = entry.conflicted or "Invalid"
            conditions.append(condition("Programmed", False, reason, entry.accepted[2] or entry.resolved[2],
                                        generation))
        elif pending:
            conditions.append(condition("Programmed", None, "Pending", "", generation))
        else:
            conditions.append(condition("Programmed", True, "Programmed", "", generation))
        if entry.conflicted:
            conditions.append(condition("Conflicted", True, entry.conflicted, entry.accepted[2], generation))
        else:
            conditions.append(condition("Conflicted", False, "NoConflicts", "", generation))
        if entry.overlapping:
            conditions.append(condition("OverlappingTLSConfig", True, "OverlappingHostnames",
                                        "another TLS listener on this port serves overlapping hostnames",
                                        generation))
        listener_statuses.append({
            "name": entry.spec.name,
            "supportedKinds": [{"group": group, "kind": kind} for group, kind in entry.kinds],
            "attachedRoutes": entry.attached,
            "conditions": conditions,
        })
    valid = sum(1 for entry in entries if entry.accepted[0])
    if valid == len(entries):
        accepted = condition("Accepted", True, "Accepted", "", generation)
    else:
        accepted = condition("Accepted", valid > 0, "ListenersNotValid",
                             f"{len(entries) - valid} of {len(entries)} listeners are not valid", generation)
    if not any(entry.usable for entry in entries):
        programmed = condition("Programmed", False, "Invalid", "no listener can be programmed", generation)
    elif pending:
        programmed = condition("Programmed", None, "Pending", "", generation)
    else:
        programmed = condition("Programmed", True, "Programmed", "", generation)
    status: dict[str, Any] = {"conditions": [accepted, programmed], "listeners": listener_statuses}
    if state.options.publish_addresses:
        status["addresses"] = [{"type": "IPAddress" if is_ip_address(address) else "Hostname",
                                "value": address} for address in state.options.publish_addresses]
    state.statuses[("Gateway", gateway.meta.namespace, gateway.meta.name)] = status


# --- TCPRoute and TLSRoute --------------------------------------------------------------------------

def _route(state: _State, route: objects.Route, listeners: dict[tuple[str, str], list[_Listener]]) -> None:
    """Attach a route to the listeners its parentRefs select (`listeners`: by Gateway namespace and
    name), write its parent statuses, program it."""
    generation = route.meta.generation
    namespace = route.meta.namespace
    parents = []
    attachments: list[_Attachment] = []
    backends: list[_Backend] | None = None
    for index, ref in enumerate(route.parent_refs):
        if ref.group != GATEWAY_GROUP or ref.kind != "Gateway":
            continue
        candidates = listeners.get((ref.namespace, ref.name))
        if not candidates:
            continue            # not a Gateway of pyproxy's: its controller writes that entry
        accepted, attached = _attach(state, route, ref, candidates)
        for entry, snis in attached:
            entry.attached += 1
            attachments.append((index, entry, snis))
        if backends is None:
            backends = _route_backends(state, route)
        parent_ref: dict[str, Any] = {"group": ref.group, "kind": ref.kind, "name": ref.name}
        if ref.namespace_given:
            parent_ref["namespace"] = ref.namespace
        if ref.section_name is not None:
            parent_ref["sectionName"] = ref.section_name
        if ref.port is not None:
            parent_ref["port"] = ref.port
        parents.append({
            "parentRef": parent_ref,
            "controllerName": state.options.controller_name,
            "conditions": [condition("Accepted", *accepted, generation),
                           condition("ResolvedRefs", *_resolved_refs(backends), generation)],
        })
    if parents:
        state.statuses[(route.kind, namespace, route.meta.name)] = {"parents": parents}
    if attachments and backends is not None and route.kind == "UDPRoute":
        _program_udp_route(state, route, attachments, backends)
    elif attachments and backends is not None:
        _program_route(state, route, attachments, backends)


def _attach(state: _State, route: objects.Route, ref: ObjectRef,
            candidates: list[_Listener]) -> tuple[_Condition, list[tuple[_Listener, tuple[str, ...]]]]:
    """The Accepted condition of one parentRef, and the listeners (with the route's SNIs there)."""
    selected = [entry for entry in candidates
                if (ref.section_name is None or entry.spec.name == ref.section_name)
                and (ref.port is None or entry.spec.port == ref.port)]
    if not selected:
        return (False, "NoMatchingParent", "no listener of the Gateway matches sectionName/port"), []
    allowed = [entry for entry in selected if _allows(state, entry, route)]
    if not allowed:
        return (False, "NotAllowedByListeners",
                f"no selected listener allows {route.kind}s from namespace {route.meta.namespace}"), []
    if route.kind in ("TCPRoute", "UDPRoute") and len(route.rules) > 1:
        return (False, "UnsupportedValue", f"a {route.kind} has only one rule"), []
    attached = []
    for entry in allowed:
        snis = hostnames.route_hostnames(entry.spec.hostname, route.hostnames)
        if snis is not None:
            attached.append((entry, snis))
    if not attached:
        return (False, "NoMatchingListenerHostname",
                "no hostname of the route intersects a selected listener's hostname"), []
    return (True, "Accepted", ""), attached


def _allows(state: _State, entry: _Listener, route: objects.Route) -> bool:
    """The listener takes this kind of route, from this namespace (allowedRoutes)."""
    if (GATEWAY_GROUP, route.kind) not in entry.kinds:
        return False
    spec = entry.spec
    gateway_namespace = entry.gateway.meta.namespace
    if spec.routes_from == "Same":
        return route.meta.namespace == gateway_namespace
    if spec.routes_from == "Selector":
        assert spec.selector is not None
        return spec.selector.matches(state.namespace_labels(route.meta.namespace))
    return True


def _route_backends(state: _State, route: objects.Route) -> list[_Backend]:
    """Every backendRef of every rule, resolved (rules pool their backends: brief §2.3)."""
    resolved = []
    for rule in route.rules:
        for ref in rule:
            resolved.append(_backend(state, route, ref))
    return resolved


def _backend(state: _State, route: objects.Route, ref: ObjectRef) -> _Backend:
    what = f"{ref.kind} {ref.namespace}/{ref.name}"
    if ref.group not in ("", "core") or ref.kind != "Service":
        return _Backend("", [], ref.weight, "InvalidKind", f"{what}: only core Services are backends")
    if not state.permitted(route.kind, route.meta.namespace, ref):
        return _Backend("", [], ref.weight, "RefNotPermitted",
                        f"{what}: no ReferenceGrant in namespace {ref.namespace} lets {route.kind}s of "
                        f"{route.meta.namespace} use it")
    assert ref.port is not None
    service = state.services.get((ref.namespace, ref.name))
    if service is None:
        return _Backend("", [], ref.weight, "BackendNotFound", f"{what} not found")
    if service.type == "ExternalName":
        return _Backend("", [], ref.weight, "BackendNotFound",
                        f"{what} is an ExternalName Service, which Gateway API backends may not be")
    protocol = "UDP" if route.kind == "UDPRoute" else "TCP"
    return _service_backend(state, service, ref.port, ref.weight, protocol)


def _service_backend(state: _State, service: objects.Service, port: int, weight: int,
                     protocol: str = "TCP") -> _Backend:
    """A Service port's ready endpoints: Service port (of `protocol`) → its name → the EndpointSlices'
    port of that name (the v1 Endpoints object's, for a Service that has no EndpointSlice)."""
    what = f"Service {service.meta.namespace}/{service.meta.name}"
    upstream = f"k8s.{service.meta.namespace}.{service.meta.name}.{port}"
    if protocol == "UDP":
        upstream += ".udp"      # DNS: port 53 is a TCP port and a UDP port, of different upstreams
    service_port = next((item for item in service.ports if (item.port, item.protocol) == (port, protocol)),
                        None)
    if service_port is None:
        return _Backend(upstream, [], weight, "BackendNotFound", f"{what} has no {protocol} port {port}")
    if service.type == "ExternalName" and service.external_name:
        return _Backend(upstream, [(service.external_name, port)], weight)
    targets: dict[tuple[str, int], None] = {}
    key = (service.meta.namespace, service.meta.name)
    for endpoint_slice in state.slices.get(key) or state.legacy_endpoints.get(key, ()):
        if endpoint_slice.address_type not in ("IPv4", "IPv6"):
            continue
        slice_port = next((item for item in endpoint_slice.ports
                           if (item.name, item.protocol) == (service_port.name, service_port.protocol)), None)
        if slice_port is None:
            continue
        for address in endpoint_slice.addresses:
            targets[(address, slice_port.port)] = None
    if not targets:
        return _Backend(upstream, [], weight, "EndpointsNotFound",
                        f"{what} port {port} has no ready endpoint")
    return _Backend(upstream, list(targets), weight, service=service, port_name=service_port.name)


def _resolved_refs(backends: list[_Backend]) -> _Condition:
    problems = [backend for backend in backends if backend.reason]
    if not problems:
        return (True, "ResolvedRefs", "")
    return (False, problems[0].reason, "; ".join(backend.message for backend in problems))


def _program_route(state: _State, route: objects.Route, attachments: list[_Attachment],
                   backends: list[_Backend]) -> None:
    """The route's service (with one pyproxy route per listener it attached to) and its upstream."""
    base = f"{route.kind.lower()}.{route.meta.namespace}.{route.meta.name}"
    routes = []
    originated: list[dict[str, Any]] = []       # terminated here, TLS again towards the backends
    settings: dict[str, Any] = {}
    for index, entry, snis in attachments:
        if not entry.usable:
            continue
        spec = entry.spec
        if spec.protocol == "TCP":
            protocols = ["tcp"]
        else:
            protocols = ["tls_passthrough" if spec.tls_mode == "Passthrough" else "tls"]
        if spec.protocol == "TLS" and snis:
            snis = state.port_hostnames[spec.port].isolated(spec.hostname, snis)
            if not snis:
                continue        # every hostname belongs to a more specific listener of the port
        pyproxy_route: dict[str, Any] = {"name": f"{base}.{index}.{spec.name}", "protocols": protocols,
                                         "destinations": [{"port": spec.port}]}
        if snis:
            pyproxy_route["snis"] = list(snis)
        if spec.tls_mode != "Terminate":
            routes.append(pyproxy_route)
            continue
        policy, why = _backend_tls(state, entry.gateway, backends)
        if why:
            state.notices.append(route.meta.resource.notice(f"listener {spec.name}: {why}; its connections "
                                                            "are refused"))
        elif policy is None:
            routes.append(pyproxy_route)
        else:
            settings = policy
            originated.append(pyproxy_route)
    if routes or originated:
        upstream = _upstream(state, base, backends)
        share = _reject_share(backends)
        for name, chosen, extra in ((base, routes, {}), (f"{base}.backend-tls", originated, settings)):
            if chosen:
                state.programs.append((route.meta.resource.age_key, len(state.programs),
                                       {"name": name, "host": upstream, **extra, **share, "routes": chosen}))


def _reject_share(backends: list[_Backend]) -> dict[str, float]:
    """`{"reject_share": …}` when some backendRefs are invalid: their share (by weight) of the
    connections is rejected (GW BackendRef). All of them: the upstream has no target, and every
    session ends with 502 without it."""
    weighed = sum(backend.weight for backend in backends)
    rejected = sum(backend.weight for backend in backends if not backend.targets)
    return {"reject_share": round(rejected / weighed, 6)} if 0 < rejected < weighed else {}


def _program_udp_route(state: _State, route: objects.Route, attachments: list[_Attachment],
                       backends: list[_Backend]) -> None:
    """A UDPRoute's `udp` service, one `udp` route per UDP listener it attached to, and its upstream;
    the invalid backendRefs' share of the sessions (a client's flow, a DNS query) is refused by
    `reject_share`, as for TCP."""
    base = f"{route.kind.lower()}.{route.meta.namespace}.{route.meta.name}"
    routes = [{"name": f"{base}.{index}.{entry.spec.name}", "protocols": ["udp"],
               "destinations": [{"port": entry.spec.port}]}
              for index, entry, _ in attachments if entry.usable]
    if not routes:
        return
    upstream = _upstream(state, base, backends)
    state.programs.append((route.meta.resource.age_key, len(state.programs),
                           {"name": base, "protocol": "udp", "host": upstream, **_reject_share(backends),
                            "routes": routes}))


def _backend_tls(state: _State, gateway: objects.Gateway,
                 backends: list[_Backend]) -> tuple[dict[str, Any] | None, str]:
    """The service settings the BackendTLSPolicy of a route's backends asks for (None: plain TCP), or why
    the route cannot honour it. One service serves all of a route's backends: they must agree."""
    chosen: list[_Policy | None] = []
    for backend in backends:
        if not backend.targets or backend.service is None:
            continue
        meta = backend.service.meta
        naming = (state.policies.get((meta.namespace, meta.name, backend.port_name))
                  or state.policies.get((meta.namespace, meta.name, None)) or [])
        for judged in naming:
            if gateway not in judged.ancestors:
                judged.ancestors.append(gateway)
        chosen.append(naming[0] if naming else None)
    if all(policy is None for policy in chosen):
        return None, ""
    first = chosen[0]
    if first is None or any(policy is not first for policy in chosen):
        return None, ("its backends differ in BackendTLSPolicy, and pyproxy speaks to all of a route's "
                      "backends alike")
    if first.settings is None:
        return None, f"BackendTLSPolicy {first.policy.meta.name} cannot be honoured ({first.accepted[2]})"
    return first.settings, ""


def _upstream(state: _State, name: str, backends: list[_Backend]) -> str:
    """The upstream of a set of weighted backends; its name.

    One backend: the Service port's own upstream, shared by every route to it. Several: an upstream of
    the route whose target weights give each valid backend its share among them (brief §1.4). Invalid
    backends (and those without a ready endpoint) and weight 0 are left out: the service's
    `reject_share` refuses the invalid ones' share (_program_route).
    """
    valid = [backend for backend in backends if backend.targets and backend.weight > 0]
    if len(backends) == 1 and valid:
        state.upstreams.setdefault(valid[0].upstream, {"name": valid[0].upstream,
                                                       "targets": _targets({target: 100 for target in
                                                                            valid[0].targets})})
        return valid[0].upstream
    shares: dict[tuple[str, int], float] = defaultdict(float)
    total = sum(backend.weight for backend in valid)
    for backend in valid:
        for target in backend.targets:
            shares[target] += backend.weight / total / len(backend.targets)
    top = max(shares.values(), default=0.0)
    weights = {target: max(1, round(share / top * 65535)) for target, share in shares.items()}
    state.upstreams[name] = {"name": name, "targets": _targets(weights)}
    return name


def _targets(weights: dict[tuple[str, int], int]) -> list[dict[str, Any]]:
    return [{"target": host_port(host, port), "weight": weight} for (host, port), weight in weights.items()]


# --- BackendTLSPolicy ------------------------------------------------------------------------------

def _backend_tls_policy(state: _State, policy: objects.BackendTLSPolicy) -> _Policy:
    """Judge a policy (oldest first): its CA certificates, and the Service ports no older one took."""
    judged = _Policy(policy)
    namespace = policy.meta.namespace
    problems: list[tuple[str, str]] = []
    ca_files: list[str] = []
    for ref in policy.ca_refs:
        what = f"{ref.kind} {namespace}/{ref.name}"
        config_map = state.config_maps.get((namespace, ref.name))
        if ref.group not in ("", "core") or ref.kind != "ConfigMap":
            problems.append(("InvalidKind", f"{what}: CA certificates come from ConfigMaps"))
        elif config_map is None or config_map.ca_certificate is None:
            missing = "no ca.crt" if config_map else "not found"
            problems.append(("InvalidCACertificateRef", f"{what}: {missing}"))
        elif (why := check_ca_bundle(config_map.ca_certificate)) is not None:
            problems.append(("InvalidCACertificateRef", f"{what}: {why}"))
        else:
            content = config_map.ca_certificate.encode()
            path = ca_path(state.options.runtime_dir, content)
            state.files[path] = content
            ca_files.append(path)
    if problems:
        judged.resolved = (False, problems[0][0], "; ".join(message for _, message in problems))
    if policy.ca_refs and not ca_files:
        judged.accepted = (False, "NoValidCACertificate", judged.resolved[2])
    elif policy.well_known not in (None, "System"):
        judged.accepted = (False, "Invalid", f"wellKnownCACertificates {policy.well_known!r} is not System")
    elif policy.subject_alt_names:
        judged.accepted = (False, "Invalid", "pyproxy verifies a backend's certificate against "
                                             "validation.hostname only, not subjectAltNames")
    else:
        judged.settings = {"protocol": "tls", "tls_verify": True, "tls_server_name": policy.hostname}
        if ca_files:
            judged.settings["ca_certificates"] = ca_files
    for target in policy.targets:
        if target.group in ("", "core") and target.kind == "Service":
            naming = state.policies[(namespace, target.name, target.section_name)]
            naming.append(judged)
            if naming[0] is not judged and judged.accepted[0]:
                judged.accepted = (False, "Conflicted", f"BackendTLSPolicy {naming[0].policy.meta.name} is "
                                                        "older and targets the same Service port")
                judged.settings = None
    return judged


def _policy_status(state: _State, judged: _Policy) -> None:
    """PolicyStatus: one ancestor per Gateway of pyproxy's whose terminated routes reach the target."""
    if not judged.ancestors:
        return
    generation = judged.policy.meta.generation
    state.statuses[("BackendTLSPolicy", judged.policy.meta.namespace, judged.policy.meta.name)] = {
        "ancestors": [{
            "ancestorRef": {"group": GATEWAY_GROUP, "kind": "Gateway", "namespace": gateway.meta.namespace,
                            "name": gateway.meta.name},
            "controllerName": state.options.controller_name,
            "conditions": [condition("Accepted", *judged.accepted, generation),
                           condition("ResolvedRefs", *judged.resolved, generation)],
        } for gateway in judged.ancestors],
    }


# --- Kong TCPIngress --------------------------------------------------------------------------------

def _tcp_ingress(state: _State, ingress: objects.TCPIngress, ports: dict[int, bool]) -> None:
    """KIC's translation of a TCPIngress (brief §5.3): one route per rule, certificates from `tls`."""
    resource = ingress.meta.resource
    namespace = ingress.meta.namespace
    for index, (secret_name, hosts) in enumerate(ingress.tls):
        if not secret_name or not hosts:
            continue
        secret = state.secrets.get((namespace, secret_name))
        why = _unusable_secret(state, secret)
        if why is not None:
            state.notices.append(resource.notice(f"Secret {namespace}/{secret_name}: {why}; not served",
                                                 f"spec.tls[{index}]"))
        else:
            assert secret is not None
            _add_certificate(state, secret, hosts, f"spec.tls[{index}]", resource)
    protocols = ingress.protocols
    if protocols is not None and not all(protocol in ROUTE_PROTOCOLS for protocol in protocols):
        state.notices.append(resource.notice(
            f"{', '.join(protocols)}: pyproxy routes {', '.join(ROUTE_PROTOCOLS)} only; annotation ignored",
            f"metadata.annotations.{objects.PROTOCOLS_ANNOTATION}"))
        protocols = None
    for index, rule in enumerate(ingress.rules):
        name = f"{namespace}.{ingress.meta.name}.{index}"
        if rule.port not in ports:
            state.notices.append(resource.notice(
                f"port {rule.port} is neither a stream_listen port nor a Gateway listener's: the rule "
                "never matches", f"spec.rules[{index}].port"))
        if protocols is not None:
            rule_protocols = list(protocols)
        elif rule.host is not None or ports.get(rule.port):
            rule_protocols = ["tcp", "tls"]
        else:
            rule_protocols = ["tcp"]
        route: dict[str, Any] = {"name": name, "protocols": rule_protocols,
                                 "destinations": [{"port": rule.port}]}
        if rule.host is not None:
            route["snis"] = [rule.host]
        service = state.services.get((namespace, rule.service_name))
        if service is None:
            backend = _Backend(f"k8s.{namespace}.{rule.service_name}.{rule.service_port}", [], 1,
                               "BackendNotFound", f"Service {namespace}/{rule.service_name} not found")
        else:
            backend = _service_backend(state, service, rule.service_port, 1)
        if backend.reason:
            state.notices.append(resource.notice(f"{backend.message}: its sessions end with status 502",
                                                 f"spec.rules[{index}].backend"))
        state.upstreams.setdefault(backend.upstream, {"name": backend.upstream, "targets": _targets(
            {target: 100 for target in backend.targets})})
        state.programs.append((ingress.meta.resource.age_key, len(state.programs),
                               {"name": name, "host": backend.upstream, "routes": [route]}))
    state.statuses[("TCPIngress", namespace, ingress.meta.name)] = _ingress_status(state)


def _ingress_status(state: _State) -> dict[str, Any]:
    """A TCPIngress's or UDPIngress's status: the addresses clients reach pyproxy at."""
    status: dict[str, Any] = {"loadBalancer": {}}
    if state.options.publish_addresses:
        status["loadBalancer"]["ingress"] = [{"ip" if is_ip_address(address) else "hostname": address}
                                             for address in state.options.publish_addresses]
    return status


def _udp_ingress(state: _State, ingress: objects.UDPIngress, ports: set[int]) -> None:
    """KIC's translation of a UDPIngress: a `udp` service and route per rule, on the rule's port."""
    resource = ingress.meta.resource
    namespace = ingress.meta.namespace
    for index, rule in enumerate(ingress.rules):
        name = f"{namespace}.{ingress.meta.name}.{index}.udp"         # §5.3, apart from a TCPIngress
        if rule.port not in ports:
            state.notices.append(resource.notice(
                f"port {rule.port} is neither a `udp` stream_listen port nor a UDP Gateway listener's: the "
                "rule never matches", f"spec.rules[{index}].port"))
        service = state.services.get((namespace, rule.service_name))
        if service is None:
            backend = _Backend(f"k8s.{namespace}.{rule.service_name}.{rule.service_port}.udp", [], 1,
                               "BackendNotFound", f"Service {namespace}/{rule.service_name} not found")
        else:
            backend = _service_backend(state, service, rule.service_port, 1, "UDP")
        if backend.reason:
            state.notices.append(resource.notice(f"{backend.message}: its datagrams are dropped",
                                                 f"spec.rules[{index}].backend"))
        state.upstreams.setdefault(backend.upstream, {"name": backend.upstream, "targets": _targets(
            {target: 100 for target in backend.targets})})
        route = {"name": name, "protocols": ["udp"], "destinations": [{"port": rule.port}]}
        state.programs.append((resource.age_key, len(state.programs), {
            "name": name, "protocol": "udp", "host": backend.upstream, "routes": [route]}))
    state.statuses[("UDPIngress", namespace, ingress.meta.name)] = _ingress_status(state)


# --- the entities -----------------------------------------------------------------------------------

def _entities(state: _State, listeners: list[_Listener]) -> Entities:
    stream_listen = []
    opened = {(host, port, False) for host, port in state.stream_listen}
    opened.update((host, port, True) for host, port in state.udp_listen)
    for entry in listeners:
        if not entry.accepted[0]:
            continue
        udp = entry.spec.protocol == "UDP"
        for address in state.options.addresses:
            key = (address, entry.spec.port, udp)
            if key in opened:
                continue
            opened.add(key)
            flags = " ssl" if entry.spec.protocol == "TLS" else " udp" if udp else ""
            stream_listen.append(host_port(address, entry.spec.port) + flags)
    # pyproxy gives a tie between routes to the one written first: oldest first (creationTimestamp,
    # namespace, name: GW Listener.AllowedRoutes).
    services = [service for _, _, service in sorted(state.programs, key=lambda program: program[:2])]
    upstreams = list(state.upstreams.values())
    # GW "Listener Isolation": an SNI of a listener's hostname that a less specific listener of the port
    # covers too is refused when no route of its own listener takes it. A passthrough route whose
    # service refuses every session (reject_share 1; its upstream has no target), written last: it
    # loses a tie to the listener's own routes (as specific as its hostname,
    # or more), and the less specific listener's routes rank below it (their names under this hostname
    # are taken out by PortHostnames.isolated; a wildcard of fewer labels or no SNI remains).
    refusals = [{"name": f"{ISOLATION}.{port}", "protocols": ["tls_passthrough"], "snis": shadowed,
                 "destinations": [{"port": port}]}
                for port, shadowed in ((port, names.shadowed())
                                       for port, names in state.port_hostnames.items())
                if shadowed]
    if refusals:
        upstreams.append({"name": ISOLATION, "targets": []})
        services.append({"name": ISOLATION, "host": ISOLATION, "reject_share": 1, "routes": refusals})
    return {
        "stream_listen": stream_listen,
        "certificates": list(state.certificates.values()),
        "upstreams": upstreams,
        "services": services,
    }

