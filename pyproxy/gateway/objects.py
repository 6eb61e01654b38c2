"""The kinds pyproxy reads, as typed objects with the API server's defaults applied.

`parse(resource)` turns one `Resource` into the dataclass of its kind, applying the defaults the
CRDs declare (the API server applies them to objects in a cluster; objects read from files have
none) and re-checking the CRD validation rules the translation relies on. A value the API server
would refuse raises `Malformed` naming the field; the caller reports it and skips that object.
Fields pyproxy does not use are not read.
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass
from typing import Any

from .manifests import Resource

GATEWAY_GROUP = "gateway.networking.k8s.io"
KONG_GROUP = "configuration.konghq.com"
# kind → the apiVersions read (every served version: conversion is None, the shapes are supersets).
API_VERSIONS: dict[str, tuple[str, ...]] = {
    "GatewayClass": (f"{GATEWAY_GROUP}/v1", f"{GATEWAY_GROUP}/v1beta1"),
    "Gateway": (f"{GATEWAY_GROUP}/v1", f"{GATEWAY_GROUP}/v1beta1"),
    "TCPRoute": (f"{GATEWAY_GROUP}/v1", f"{GATEWAY_GROUP}/v1alpha2"),
    "TLSRoute": (f"{GATEWAY_GROUP}/v1", f"{GATEWAY_GROUP}/v1alpha3", f"{GATEWAY_GROUP}/v1alpha2"),
    "UDPRoute": (f"{GATEWAY_GROUP}/v1alpha2",),          # no other version upstream (GW apis/)
    "ReferenceGrant": (f"{GATEWAY_GROUP}/v1", f"{GATEWAY_GROUP}/v1beta1", f"{GATEWAY_GROUP}/v1alpha2"),
    "TCPIngress": (f"{KONG_GROUP}/v1beta1",),
    "UDPIngress": (f"{KONG_GROUP}/v1beta1",),
    "Service": ("v1",),
    "Secret": ("v1",),
    "Namespace": ("v1",),
    "EndpointSlice": ("discovery.k8s.io/v1",),
    "Endpoints": ("v1",),
    "BackendTLSPolicy": (f"{GATEWAY_GROUP}/v1", f"{GATEWAY_GROUP}/v1alpha3"),
    "ConfigMap": ("v1",),
    "IngressClass": ("networking.k8s.io/v1",),
}
ROUTE_KINDS = ("TCPRoute", "TLSRoute", "UDPRoute")
MAX_WEIGHT = 1_000_000
SECRET_TYPE_TLS = "kubernetes.io/tls"
INGRESS_CLASS_ANNOTATION = "kubernetes.io/ingress.class"
DEFAULT_CLASS_ANNOTATION = "ingressclass.kubernetes.io/is-default-class"
PROTOCOLS_ANNOTATION = "konghq.com/protocols"
SERVICE_NAME_LABEL = "kubernetes.io/service-name"
# GW `Hostname`: RFC 1123 labels, lower case, an optional leading `*.` label.
_HOSTNAME = re.compile(r"(\*\.)?[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
# GW `SectionName`, Kubernetes object names and label values are within this alphabet.
_SECTION_NAME = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")


class Malformed(ValueError):
    """A field the API server would refuse: the object cannot be used."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field
        self.message = message


@dataclass(frozen=True)
class Meta:
    """What every kind carries: where it is, its generation and its precedence."""

    resource: Resource
    generation: int

    @property
    def namespace(self) -> str:
        return self.resource.namespace

    @property
    def name(self) -> str:
        return self.resource.name


@dataclass(frozen=True)
class GatewayClass:
    meta: Meta
    controller_name: str
    has_parameters: bool


@dataclass(frozen=True)
class ObjectRef:
    """A certificateRef, a backendRef or a parentRef, every default applied."""

    group: str
    kind: str
    namespace: str
    name: str
    namespace_given: bool = True
    port: int | None = None
    section_name: str | None = None
    weight: int = 1


@dataclass(frozen=True)
class LabelSelector:
    match_labels: tuple[tuple[str, str], ...]
    expressions: tuple[tuple[str, str, tuple[str, ...]], ...]    # (key, operator, values)

    def matches(self, labels: dict[str, str]) -> bool:
        if any(labels.get(key) != value for key, value in self.match_labels):
            return False
        for key, operator, values in self.expressions:
            present = key in labels
            if operator == "In" and not (present and labels[key] in values):
                return False
            if operator == "NotIn" and present and labels[key] in values:
                return False
            if (operator == "Exists") != present and operator in ("Exists", "DoesNotExist"):
                return False
        return True


@dataclass(frozen=True)
class Listener:
    name: str
    port: int
    protocol: str
    hostname: str | None
    tls_mode: str | None                      # Terminate | Passthrough on a TLS listener
    certificate_refs: tuple[ObjectRef, ...]
    routes_from: str                          # Same | All | Selector
    selector: LabelSelector | None
    kinds: tuple[tuple[str, str], ...] | None  # (group, kind) as written; None = the protocol's default


@dataclass(frozen=True)
class Gateway:
    meta: Meta
    class_name: str
    listeners: tuple[Listener, ...]


@dataclass(frozen=True)
class Route:
    """A TCPRoute, a TLSRoute or a UDPRoute: `hostnames` is empty for a TCPRoute and a UDPRoute."""

    meta: Meta
    kind: str
    parent_refs: tuple[ObjectRef, ...]
    hostnames: tuple[str, ...]
    rules: tuple[tuple[ObjectRef, ...], ...]   # each rule's backendRefs


@dataclass(frozen=True)
class ReferenceGrant:
    meta: Meta
    sources: tuple[tuple[str, str, str], ...]          # (group, kind, namespace)
    targets: tuple[tuple[str, str, str | None], ...]   # (group, kind, name or None for all)


@dataclass(frozen=True)
class ServicePort:
    name: str
    port: int
    protocol: str


@dataclass(frozen=True)
class Service:
    meta: Meta
    type: str
    external_name: str | None
    ports: tuple[ServicePort, ...]


@dataclass(frozen=True)
class EndpointSlice:
    meta: Meta
    service_name: str | None
    address_type: str
    ports: tuple[ServicePort, ...]            # name, port, protocol of the slice's ports
    addresses: tuple[str, ...]                # the first address of each ready endpoint


@dataclass(frozen=True)
class Endpoints:
    """A v1 Endpoints object, read as the EndpointSlices it stands for: one per subset and address
    family (the fallback for Services that have no EndpointSlice, SPEC "Resources read")."""

    meta: Meta
    slices: tuple[EndpointSlice, ...]


@dataclass(frozen=True)
class Secret:
    meta: Meta
    type: str
    certificate: bytes | None
    key: bytes | None


@dataclass(frozen=True)
class Namespace:
    meta: Meta
    labels: dict[str, str]


@dataclass(frozen=True)
class BackendTLSPolicy:
    """How pyproxy connects to a Service's port with TLS (GW `apis/v1/backendtlspolicy_types.go`)."""

    meta: Meta
    targets: tuple[ObjectRef, ...]            # section_name: the Service port's name, None = every port
    ca_refs: tuple[ObjectRef, ...]
    well_known: str | None                    # "System": the system's CA store
    hostname: str                             # the SNI sent and the name verified
    subject_alt_names: int                    # how many are listed (pyproxy verifies `hostname` only)


@dataclass(frozen=True)
class ConfigMap:
    meta: Meta
    ca_certificate: str | None                # data["ca.crt"]


@dataclass(frozen=True)
class IngressClass:
    meta: Meta
    is_default: bool                          # the class of Ingresses that name none


@dataclass(frozen=True)
class IngressRule:
    host: str | None
    port: int
    service_name: str
    service_port: int


@dataclass(frozen=True)
class TCPIngress:
    meta: Meta
    ingress_class: str | None
    protocols: tuple[str, ...] | None          # konghq.com/protocols, as written
    rules: tuple[IngressRule, ...]
    tls: tuple[tuple[str, tuple[str, ...]], ...]   # (secretName, hosts)


@dataclass(frozen=True)
class UDPIngress:
    """Kong's UDPIngress (KIC `UDPIngressRule`): a port and a backend per rule, no host."""

    meta: Meta
    ingress_class: str | None
    rules: tuple[IngressRule, ...]             # host is None


Parsed = (GatewayClass | Gateway | Route | ReferenceGrant | Service | EndpointSlice | Endpoints | Secret
          | Namespace | TCPIngress | UDPIngress | BackendTLSPolicy | ConfigMap | IngressClass)


def parse(resource: Resource) -> Parsed:
    """The typed object for a resource of a kind in API_VERSIONS. Raises Malformed."""
    meta = Meta(resource, _generation(resource.metadata.get("generation")))
    body = resource.body
    kind = resource.kind
    if kind == "Service":
        return _service(meta, _mapping(body.get("spec"), "spec"))
    if kind == "EndpointSlice":
        return _endpoint_slice(meta, body)
    if kind == "Endpoints":
        return _endpoints(meta, body)
    if kind == "Secret":
        return _secret(meta, body)
    if kind == "Namespace":
        return Namespace(meta, _labels(resource.metadata.get("labels"), "metadata.labels"))
    if kind == "IngressClass":
        annotations = _labels(resource.metadata.get("annotations"), "metadata.annotations")
        return IngressClass(meta, annotations.get(DEFAULT_CLASS_ANNOTATION) == "true")
    if kind == "ConfigMap":
        data = _mapping(body.get("data"), "data")
        return ConfigMap(meta, _text(data.get("ca.crt"), "data.ca.crt") or None)
    spec = _mapping(body.get("spec"), "spec")
    if kind == "GatewayClass":
        return GatewayClass(meta, _text(spec.get("controllerName"), "spec.controllerName", required=True),
                            spec.get("parametersRef") is not None)
    if kind == "Gateway":
        return _gateway(meta, spec)
    if kind in ROUTE_KINDS:
        return _route(meta, kind, spec)
    if kind == "ReferenceGrant":
        return _reference_grant(meta, spec)
    if kind == "TCPIngress":
        return _tcp_ingress(meta, spec)
    if kind == "UDPIngress":
        return _udp_ingress(meta, spec)
    if kind == "BackendTLSPolicy":
        return _backend_tls_policy(meta, spec)
    raise AssertionError(f"no parser for {kind}")


# --- values -----------------------------------------------------------------------------------------

def _mapping(value: object, field: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise Malformed(field, "expected a mapping")
    return value


def _items(value: object, field: str) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise Malformed(field, "expected a list")
    return value


def _text(value: object, field: str, required: bool = False, default: str = "") -> str:
    if value is None:
        if required:
            raise Malformed(field, "required")
        return default
    if not isinstance(value, str):
        raise Malformed(field, f"expected text, got {type(value).__name__}")
    if required and not value:
        raise Malformed(field, "must not be empty")
    return value


def _integer(value: object, field: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise Malformed(field, f"expected a number {low}–{high}, got {value!r}")
    return value


def _port(value: object, field: str) -> int:
    return _integer(value, field, 1, 65535)


def _generation(value: object) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 1


def _hostname(value: object, field: str) -> str:
    text = _text(value, field, required=True)
    if len(text) > 253 or not _HOSTNAME.fullmatch(text):
        raise Malformed(field, f"invalid hostname {text!r}: lower-case DNS labels, an optional leading '*.'")
    return text


def _labels(value: object, field: str) -> dict[str, str]:
    labels = _mapping(value, field)
    return {str(key): str(label) for key, label in labels.items()}


def _selector(value: object, field: str) -> LabelSelector:
    spec = _mapping(value, field)
    match_labels = tuple(sorted(_labels(spec.get("matchLabels"), f"{field}.matchLabels").items()))
    expressions = []
    for index, item in enumerate(_items(spec.get("matchExpressions"), f"{field}.matchExpressions")):
        where = f"{field}.matchExpressions[{index}]"
        expression = _mapping(item, where)
        operator = _text(expression.get("operator"), f"{where}.operator", required=True)
        if operator not in ("In", "NotIn", "Exists", "DoesNotExist"):
            raise Malformed(f"{where}.operator", f"unknown operator {operator!r}")
        values = tuple(str(v) for v in _items(expression.get("values"), f"{where}.values"))
        expressions.append((_text(expression.get("key"), f"{where}.key", required=True), operator, values))
    return LabelSelector(match_labels, tuple(expressions))


def _reference(value: object, field: str, namespace: str, group: str, kind: str) -> ObjectRef:
    """A reference with the CRD defaults for `group`, `kind` and the namespace of the referrer."""
    ref = _mapping(value, field)
    given = ref.get("namespace")
    port = ref.get("port")
    section = ref.get("sectionName")
    if section is not None and not (isinstance(section, str) and _SECTION_NAME.fullmatch(section)):
        raise Malformed(f"{field}.sectionName", f"invalid section name {section!r}")
    return ObjectRef(
        group=_text(ref.get("group"), f"{field}.group", default=group),
        kind=_text(ref.get("kind"), f"{field}.kind", default=kind),
        namespace=_text(given, f"{field}.namespace", default=namespace) or namespace,
        name=_text(ref.get("name"), f"{field}.name", required=True),
        namespace_given=given is not None,
        port=None if port is None else _port(port, f"{field}.port"),
        section_name=section,
        weight=_integer(ref.get("weight", 1), f"{field}.weight", 0, MAX_WEIGHT),
    )


# --- Gateway API ------------------------------------------------------------------------------------

def _gateway(meta: Meta, spec: dict[str, Any]) -> Gateway:
    listeners = []
    seen_names: set[str] = set()
    seen: set[tuple[int, str, str | None]] = set()
    for index, item in enumerate(_items(spec.get("listeners"), "spec.listeners")):
        field = f"spec.listeners[{index}]"
        listener = _listener(meta, _mapping(item, field), field)
        if listener.name in seen_names:
            raise Malformed(f"{field}.name", f"listener name {listener.name!r} is used twice")
        identity = (listener.port, listener.protocol, listener.hostname)
        if identity in seen:
            raise Malformed(field, "two listeners with the same port, protocol and hostname")
        seen_names.add(listener.name)
        seen.add(identity)
        listeners.append(listener)
    if not listeners:
        raise Malformed("spec.listeners", "a Gateway needs at least one listener")
    return Gateway(meta, _text(spec.get("gatewayClassName"), "spec.gatewayClassName", required=True),
                   tuple(listeners))


def _listener(meta: Meta, spec: dict[str, Any], field: str) -> Listener:
    protocol = _text(spec.get("protocol"), f"{field}.protocol", required=True)
    hostname = spec.get("hostname")
    tls = spec.get("tls")
    if protocol in ("TCP", "UDP", "HTTP") and tls is not None:
        raise Malformed(f"{field}.tls", f"a {protocol} listener takes no tls")
    if protocol in ("TCP", "UDP") and hostname is not None:
        raise Malformed(f"{field}.hostname", f"a {protocol} listener takes no hostname")
    tls_spec = _mapping(tls, f"{field}.tls")
    mode = None
    refs: tuple[ObjectRef, ...] = ()
    if protocol == "TLS":
        mode = _text(tls_spec.get("mode"), f"{field}.tls.mode", default="Terminate")
        if mode not in ("Terminate", "Passthrough"):
            raise Malformed(f"{field}.tls.mode", f"expected Terminate or Passthrough, got {mode!r}")
    if tls is not None:
        refs = tuple(_reference(ref, f"{field}.tls.certificateRefs[{index}]", meta.namespace, "", "Secret")
                     for index, ref in enumerate(_items(tls_spec.get("certificateRefs"),
                                                        f"{field}.tls.certificateRefs")))
    allowed = _mapping(spec.get("allowedRoutes"), f"{field}.allowedRoutes")
    namespaces = _mapping(allowed.get("namespaces"), f"{field}.allowedRoutes.namespaces")
    routes_from = _text(namespaces.get("from"), f"{field}.allowedRoutes.namespaces.from", default="Same")
    if routes_from not in ("Same", "All", "Selector"):
        raise Malformed(f"{field}.allowedRoutes.namespaces.from",
                        f"expected Same, All or Selector, got {routes_from!r}")
    selector = None
    if routes_from == "Selector":
        selector = _selector(namespaces.get("selector"), f"{field}.allowedRoutes.namespaces.selector")
    kinds = None
    if allowed.get("kinds") is not None:
        kinds = tuple(
            (_text(_mapping(kind, f"{field}.allowedRoutes.kinds[{index}]").get("group"),
                   f"{field}.allowedRoutes.kinds[{index}].group", default=GATEWAY_GROUP),
             _text(kind.get("kind"), f"{field}.allowedRoutes.kinds[{index}].kind", required=True))
            for index, kind in enumerate(_items(allowed["kinds"], f"{field}.allowedRoutes.kinds")))
    name = _text(spec.get("name"), f"{field}.name", required=True)
    if not _SECTION_NAME.fullmatch(name):
        raise Malformed(f"{field}.name", f"invalid listener name {name!r}")
    return Listener(
        name=name,
        port=_port(spec.get("port"), f"{field}.port"),
        protocol=protocol,
        hostname=None if hostname is None else _hostname(hostname, f"{field}.hostname"),
        tls_mode=mode,
        certificate_refs=refs,
        routes_from=routes_from,
        selector=selector,
        kinds=kinds,
    )


def _route(meta: Meta, kind: str, spec: dict[str, Any]) -> Route:
    parents = tuple(_reference(ref, f"spec.parentRefs[{index}]", meta.namespace, GATEWAY_GROUP, "Gateway")
                    for index, ref in enumerate(_items(spec.get("parentRefs"), "spec.parentRefs")))
    seen: set[tuple[str, str, str, str, str | None, int | None]] = set()
    for index, parent in enumerate(parents):
        identity = (parent.group, parent.kind, parent.namespace, parent.name, parent.section_name,
                    parent.port)
        if identity in seen:
            raise Malformed(f"spec.parentRefs[{index}]", "the same parent is referenced twice")
        seen.add(identity)
    hostnames: tuple[str, ...] = ()
    if kind == "TLSRoute":
        hostnames = tuple(_hostname(name, f"spec.hostnames[{index}]")
                          for index, name in enumerate(_items(spec.get("hostnames"), "spec.hostnames")))
    rules = []
    for index, rule in enumerate(_items(spec.get("rules"), "spec.rules")):
        field = f"spec.rules[{index}].backendRefs"
        listed = _items(_mapping(rule, f"spec.rules[{index}]").get("backendRefs"), field)
        refs = tuple(_reference(ref, f"{field}[{number}]", meta.namespace, "", "Service")
                     for number, ref in enumerate(listed))
        for number, ref in enumerate(refs):
            if ref.group == "" and ref.kind == "Service" and ref.port is None:
                raise Malformed(f"{field}[{number}].port", "a Service backendRef needs a port")
        rules.append(refs)
    if not rules:
        raise Malformed("spec.rules", "a route needs at least one rule")
    return Route(meta, kind, parents, hostnames, tuple(rules))


def _reference_grant(meta: Meta, spec: dict[str, Any]) -> ReferenceGrant:
    sources = []
    for index, item in enumerate(_items(spec.get("from"), "spec.from")):
        entry = _mapping(item, f"spec.from[{index}]")
        sources.append((_text(entry.get("group"), f"spec.from[{index}].group", required=False),
                        _text(entry.get("kind"), f"spec.from[{index}].kind", required=True),
                        _text(entry.get("namespace"), f"spec.from[{index}].namespace", required=True)))
    targets = []
    for index, item in enumerate(_items(spec.get("to"), "spec.to")):
        entry = _mapping(item, f"spec.to[{index}]")
        name = entry.get("name")
        targets.append((_text(entry.get("group"), f"spec.to[{index}].group"),
                        _text(entry.get("kind"), f"spec.to[{index}].kind", required=True),
                        None if name in (None, "") else _text(name, f"spec.to[{index}].name")))
    return ReferenceGrant(meta, tuple(sources), tuple(targets))


def _backend_tls_policy(meta: Meta, spec: dict[str, Any]) -> BackendTLSPolicy:
    targets = tuple(_reference(ref, f"spec.targetRefs[{index}]", meta.namespace, "", "Service")
                    for index, ref in enumerate(_items(spec.get("targetRefs"), "spec.targetRefs")))
    if not targets:
        raise Malformed("spec.targetRefs", "a BackendTLSPolicy needs at least one targetRef")
    validation = _mapping(spec.get("validation"), "spec.validation")
    field = "spec.validation.caCertificateRefs"
    refs = tuple(_reference(ref, f"{field}[{index}]", meta.namespace, "", "ConfigMap")
                 for index, ref in enumerate(_items(validation.get("caCertificateRefs"), field)))
    well_known = _text(validation.get("wellKnownCACertificates"), "spec.validation.wellKnownCACertificates")
    if bool(refs) == bool(well_known):
        raise Malformed("spec.validation", "exactly one of caCertificateRefs and wellKnownCACertificates")
    hostname = _hostname(validation.get("hostname"), "spec.validation.hostname")
    if hostname.startswith("*."):
        raise Malformed("spec.validation.hostname", "a precise hostname, without a wildcard")
    subject_alt_names = _items(validation.get("subjectAltNames"), "spec.validation.subjectAltNames")
    return BackendTLSPolicy(meta, targets, refs, well_known or None, hostname, len(subject_alt_names))


# --- core and discovery -----------------------------------------------------------------------------

def _service(meta: Meta, spec: dict[str, Any]) -> Service:
    ports = []
    for index, item in enumerate(_items(spec.get("ports"), "spec.ports")):
        port = _mapping(item, f"spec.ports[{index}]")
        ports.append(ServicePort(_text(port.get("name"), f"spec.ports[{index}].name"),
                                 _port(port.get("port"), f"spec.ports[{index}].port"),
                                 _text(port.get("protocol"), f"spec.ports[{index}].protocol", default="TCP")))
    kind = _text(spec.get("type"), "spec.type", default="ClusterIP")
    external = spec.get("externalName")
    return Service(meta, kind, None if external is None else _text(external, "spec.externalName"),
                   tuple(ports))


def _endpoint_slice(meta: Meta, body: dict[str, Any]) -> EndpointSlice:
    labels = _labels(meta.resource.metadata.get("labels"), "metadata.labels")
    ports = []
    for index, item in enumerate(_items(body.get("ports"), "ports")):
        port = _mapping(item, f"ports[{index}]")
        number = port.get("port")
        if number is None:
            continue                # "all ports": pyproxy needs a number to connect to
        ports.append(ServicePort(_text(port.get("name"), f"ports[{index}].name"),
                                 _port(number, f"ports[{index}].port"),
                                 _text(port.get("protocol"), f"ports[{index}].protocol", default="TCP")))
    addresses = []
    for index, item in enumerate(_items(body.get("endpoints"), "endpoints")):
        endpoint = _mapping(item, f"endpoints[{index}]")
        conditions = _mapping(endpoint.get("conditions"), f"endpoints[{index}].conditions")
        listed = _items(endpoint.get("addresses"), f"endpoints[{index}].addresses")
        if conditions.get("ready") is False or not listed:
            continue                # ready: null means ready (KAPI EndpointConditions)
        addresses.append(_text(listed[0], f"endpoints[{index}].addresses[0]", required=True))
    return EndpointSlice(meta, labels.get(SERVICE_NAME_LABEL),
                         _text(body.get("addressType"), "addressType", required=True), tuple(ports),
                         tuple(dict.fromkeys(addresses)))


def _endpoints(meta: Meta, body: dict[str, Any]) -> Endpoints:
    """`subsets[].addresses` are the ready endpoints (`notReadyAddresses` are not), `subsets[].ports`
    their ports, named like the Service's ports (KAPI EndpointSubset)."""
    slices: list[EndpointSlice] = []
    for index, item in enumerate(_items(body.get("subsets"), "subsets")):
        subset = _mapping(item, f"subsets[{index}]")
        ports = []
        for number, entry in enumerate(_items(subset.get("ports"), f"subsets[{index}].ports")):
            port = _mapping(entry, f"subsets[{index}].ports[{number}]")
            ports.append(ServicePort(_text(port.get("name"), f"subsets[{index}].ports[{number}].name"),
                                     _port(port.get("port"), f"subsets[{index}].ports[{number}].port"),
                                     _text(port.get("protocol"), f"subsets[{index}].ports[{number}].protocol",
                                           default="TCP")))
        by_family: dict[str, list[str]] = {"IPv4": [], "IPv6": []}
        for number, entry in enumerate(_items(subset.get("addresses"), f"subsets[{index}].addresses")):
            address = _mapping(entry, f"subsets[{index}].addresses[{number}]")
            ip = _text(address.get("ip"), f"subsets[{index}].addresses[{number}].ip", required=True)
            by_family["IPv6" if ":" in ip else "IPv4"].append(ip)
        slices.extend(EndpointSlice(meta, meta.name, family, tuple(ports), tuple(dict.fromkeys(addresses)))
                      for family, addresses in by_family.items() if addresses)
    return Endpoints(meta, tuple(slices))


def _secret(meta: Meta, body: dict[str, Any]) -> Secret:
    data = _mapping(body.get("data"), "data")
    string_data = _mapping(body.get("stringData"), "stringData")

    def value(key: str) -> bytes | None:
        if isinstance(string_data.get(key), str):
            return str(string_data[key]).encode()
        encoded = data.get(key)
        if encoded is None:
            return None
        if not isinstance(encoded, str):
            raise Malformed(f"data.{key}", "expected base64 text")
        try:
            return base64.b64decode(encoded, validate=True)
        except binascii.Error:
            raise Malformed(f"data.{key}", "not base64") from None
    return Secret(meta, _text(body.get("type"), "type", default="Opaque"), value("tls.crt"), value("tls.key"))


# --- Kong -------------------------------------------------------------------------------------------

def _tcp_ingress(meta: Meta, spec: dict[str, Any]) -> TCPIngress:
    annotations = _labels(meta.resource.metadata.get("annotations"), "metadata.annotations")
    protocols = annotations.get(PROTOCOLS_ANNOTATION)
    rules = _ingress_rules(spec, with_host=True)
    tls = []
    for index, item in enumerate(_items(spec.get("tls"), "spec.tls")):
        entry = _mapping(item, f"spec.tls[{index}]")
        hosts = tuple(_hostname(host, f"spec.tls[{index}].hosts[{number}]")
                      for number, host in enumerate(_items(entry.get("hosts"), f"spec.tls[{index}].hosts")))
        tls.append((_text(entry.get("secretName"), f"spec.tls[{index}].secretName"), hosts))
    return TCPIngress(
        meta,
        annotations.get(INGRESS_CLASS_ANNOTATION),
        None if protocols is None else tuple(word.strip() for word in protocols.split(",") if word.strip()),
        rules,
        tuple(tls),
    )


def _udp_ingress(meta: Meta, spec: dict[str, Any]) -> UDPIngress:
    annotations = _labels(meta.resource.metadata.get("annotations"), "metadata.annotations")
    return UDPIngress(meta, annotations.get(INGRESS_CLASS_ANNOTATION), _ingress_rules(spec, with_host=False))


def _ingress_rules(spec: dict[str, Any], with_host: bool) -> tuple[IngressRule, ...]:
    """`spec.rules` of a TCPIngress (`host` read) or a UDPIngress (which has none)."""
    rules = []
    for index, item in enumerate(_items(spec.get("rules"), "spec.rules")):
        field = f"spec.rules[{index}]"
        rule = _mapping(item, field)
        backend = _mapping(rule.get("backend"), f"{field}.backend")
        host = rule.get("host") if with_host else None
        rules.append(IngressRule(
            host=None if host in (None, "") else _hostname(host, f"{field}.host"),
            port=_port(rule.get("port"), f"{field}.port"),
            service_name=_text(backend.get("serviceName"), f"{field}.backend.serviceName", required=True),
            service_port=_port(backend.get("servicePort"), f"{field}.backend.servicePort"),
        ))
    return tuple(rules)
