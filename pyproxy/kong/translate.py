"""Kong's declarative configuration (kong.yml, as `deck` and Kong DB-less write it) rewritten in
pyproxy's own schema, so that pyproxy's one validator checks it.

The translation keeps every value as the loader read it, with its line, and records which key path
of the pyproxy document stands for which key path of Kong's file (`Translation.renames`): the
validator's errors are then told in Kong's terms (`services[1].routes[0].destinations[0].port`) at
the Kong file's line. What only Kong checks (its field names, the types of the fields pyproxy does
not have, references between entities, ids) is checked here with Kong's words ("unknown field",
"expected an integer", "invalid reference"). Entities and fields that only concern HTTP, and those
pyproxy has no use for, are collected in `Translation.ignored` for one warning.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from pyproxy.config.errors import ConfigIssue, describe, item_path, key_path
from pyproxy.config.loader import YamlList, YamlMap
from pyproxy.config.values import did_you_mean

FORMAT_VERSIONS = ("1.1", "2.1", "3.0")       # Kong 3.x reads all three
# Keys of the file that are not entities: `_transform` (hash credentials, irrelevant to stream
# entities), comments and deck's bookkeeping.
META_KEYS = ("_format_version", "_transform", "_comment", "_workspace", "_info", "_konnect", "_ignore")
ENTITIES = ("services", "routes", "upstreams", "targets", "certificates", "ca_certificates", "snis",
            "plugins")
# Kong's entities that only concern HTTP (consumers and their credentials) or Kong's own machinery.
IGNORED_ENTITIES = (
    "consumers", "consumer_groups", "acls", "keyauth_credentials", "basicauth_credentials",
    "hmacauth_credentials", "jwt_secrets", "oauth2_credentials", "mtls_auth_credentials", "vaults",
    "key_sets", "keys", "filter_chains", "partials", "workspaces", "parameters", "licenses",
    "custom_entities", "degraphql_routes",
)
# Fields every entity may carry that pyproxy does not use.
ENTITY_META = ("id", "created_at", "updated_at", "tags", "_comment", "_ignore")

SERVICE_FIELDS = ("name", "url", "protocol", "host", "port", "path", "retries", "connect_timeout",
                  "write_timeout", "read_timeout", "client_certificate", "tls_verify", "tls_verify_depth",
                  "ca_certificates", "tls_sans", "enabled", "routes", "plugins")
ROUTE_FIELDS = ("name", "protocols", "sources", "destinations", "snis", "service", "plugins")
# A route's HTTP fields, with the value deck writes on every route (not worth a mention then).
ROUTE_HTTP_FIELDS: dict[str, object] = {
    "methods": None, "hosts": None, "paths": None, "headers": None, "expression": None,
    "https_redirect_status_code": 426, "regex_priority": 0, "strip_path": True, "path_handling": "v0",
    "preserve_host": False, "request_buffering": True, "response_buffering": True, "priority": 0,
}
UPSTREAM_FIELDS = ("name", "algorithm", "hash_on", "healthchecks", "targets", "client_certificate")
UPSTREAM_HTTP_FIELDS: dict[str, object] = {
    "hash_fallback": "none", "hash_on_header": None, "hash_fallback_header": None, "hash_on_cookie": None,
    "hash_on_cookie_path": "/", "hash_on_query_arg": None, "hash_fallback_query_arg": None,
    "hash_on_uri_capture": None, "hash_fallback_uri_capture": None, "host_header": None,
    "sticky_sessions_cookie": None, "sticky_sessions_cookie_path": "/",
    "slots": 10000, "use_srv_name": False,
}
TARGET_FIELDS = ("target", "weight", "upstream")
CERTIFICATE_FIELDS = ("cert", "key", "cert_alt", "key_alt", "snis")
SNI_FIELDS = ("name", "certificate")
CA_CERTIFICATE_FIELDS = ("cert", "cert_digest")
PLUGIN_FIELDS = ("name", "instance_name", "service", "route", "consumer", "consumer_group", "config",
                 "protocols", "enabled", "ordering")
HEALTHCHECKS_FIELDS = ("active", "passive", "threshold")
ACTIVE_FIELDS = ("type", "timeout", "concurrency", "http_path", "https_sni", "https_verify_certificate",
                 "headers", "healthy", "unhealthy")
PASSIVE_FIELDS = ("type", "healthy", "unhealthy")
# The HTTP settings of Kong's health checks, with the defaults `deck` writes on every upstream (not
# worth a mention then), by record.
HTTP_CHECK_DEFAULTS: dict[str, dict[str, object]] = {
    "active": {"http_path": "/", "https_sni": None, "https_verify_certificate": True, "headers": None},
    "active.healthy": {"http_statuses": [200, 302]},
    "active.unhealthy": {"http_statuses": [429, 404, 500, 501, 502, 503, 504, 505], "http_failures": 0},
    "passive.healthy": {"http_statuses": [200, 201, 202, 203, 204, 205, 206, 207, 208, 226,
                                          300, 301, 302, 303, 304, 305, 306, 307, 308]},
    "passive.unhealthy": {"http_statuses": [429, 500, 503], "http_failures": 0},
}
HEALTHY_FIELDS = ("interval", "successes", "http_statuses")
UNHEALTHY_FIELDS = ("interval", "tcp_failures", "timeouts", "http_failures", "http_statuses")

STREAM_PROTOCOLS = ("tcp", "tls", "tls_passthrough", "udp")
SERVICE_PROTOCOLS = ("tcp", "tls", "udp")
DEFAULT_PORTS = {"http": 80, "https": 443}
ALGORITHMS = ("round-robin", "consistent-hashing", "least-connections")
# Plugins pyproxy runs, with the settings of Kong's plugin it takes; a plugin only pyproxy has (no Kong
# plugin of that name) keeps all of its settings.
STREAM_PLUGINS: dict[str, tuple[str, ...] | None] = {
    "ip-restriction": ("allow", "deny"), "file-log": ("path",), "limit-conn": None, "rate-limit": None,
}

# Kong 3.x names the entities of a declarative file without an `id` by uuid5 over their endpoint key
# (kong/db/schema/others/declarative_config.lua): namespace uuid5(_entities, "<entity>").
ENTITIES_NAMESPACE = uuid.UUID("fd02801f-0957-4a15-a55a-c8d9606f30b5")


_NAMESPACES = {entity: uuid.uuid5(ENTITIES_NAMESPACE, entity) for entity in ENTITIES}


def kong_id(entity: str, key: str) -> str:
    """The id Kong DB-less gives an entity of kind `entity` (`services`…) whose endpoint key is `key`."""
    return str(uuid.uuid5(_NAMESPACES[entity], key))


@dataclass
class Translation:
    """A Kong file rewritten in pyproxy's schema."""

    file: str                                       # the Kong file
    root: YamlMap                                   # pyproxy's document
    errors: list[ConfigIssue] = field(default_factory=list)
    refused: set[str] = field(default_factory=set)  # pyproxy key paths whose value Kong's checks refused
    renames: dict[str, str] = field(default_factory=dict)   # pyproxy key path → Kong key path
    ignored: list[str] = field(default_factory=list)

    def kong_path(self, path: str) -> str:
        """`path` (of pyproxy's document) as the Kong file's key path."""
        prefix = path
        while prefix:
            if prefix in self.renames:
                return self.renames[prefix] + path[len(prefix):]
            cut = max(prefix.rfind("."), prefix.rfind("["))
            prefix = prefix[:cut] if cut > 0 else ""
        return path


@dataclass
class _Entity:
    """One Kong entity being read: its mapping, its key path in Kong's file and in pyproxy's document."""

    kong: YamlMap
    path: str
    py_path: str = ""


def _set(target: YamlMap, key: str, value: object, line: int) -> None:
    target[key] = value
    target.key_lines[key] = line
    target.value_lines[key] = line


def _copy(target: YamlMap, source: YamlMap, key: str) -> None:
    """`source[key]` into `target`, with its lines, when it is written and not null."""
    if source.get(key) is not None:
        target[key] = source[key]
        target.key_lines[key] = source.key_lines[key]
        target.value_lines[key] = source.value_lines[key]


def _list(line: int, items: list[tuple[object, int]]) -> YamlList:
    result = YamlList(line)
    for value, item_line in items:
        result.append(value)
        result.item_lines.append(item_line)
    return result


class Translator:
    """Reads one Kong document; `translate()` gives the Translation."""

    def __init__(self, file: str, root: YamlMap, store_pem: Callable[[str], str]):
        self.file = file
        self.kong = root
        self.store_pem = store_pem       # PEM text → the path of a file holding it
        self.out = Translation(file, YamlMap(root.line))
        self.services: dict[str, YamlMap | None] = {}      # name and id → pyproxy service (None: ignored)
        self.routes: dict[str, str | None] = {}            # name and id → pyproxy route name
        self.upstreams: dict[str, YamlMap] = {}            # name and id → pyproxy upstream
        self.certificates: dict[str, YamlMap] = {}         # id → pyproxy certificate
        # id() of a translated upstream → the client certificate its Kong entity names.
        self.upstream_client_certificates: dict[int, YamlMap] = {}
        self.ca_files: dict[str, str] = {}                 # id → file
        self.plugins: list[tuple[_Entity, str | None, str | None]] = []   # with their route, service
        self.py_services = YamlList(root.line)
        self.py_upstreams = YamlList(root.line)
        self.py_certificates = YamlList(root.line)
        self.py_plugins = YamlList(root.line)
        self.places: dict[int, str] = {}     # id() of a translated certificate, upstream, service → its path

    # -- reporting --------------------------------------------------------------------------------
    def error(self, line: int, path: str, message: str, py_path: str = "") -> None:
        self.out.errors.append(ConfigIssue(self.file, line, path, message))
        if py_path:
            self.out.refused.add(py_path)

    def ignore(self, what: str) -> None:
        self.out.ignored.append(what)

    def fields(self, entity: _Entity, known: tuple[str, ...], http: dict[str, object] | None = None) -> None:
        """Kong's "unknown field" for keys the entity cannot have; HTTP fields set to anything but
        their default are noted as ignored."""
        http = http or {}
        for key in entity.kong:
            if key in http:
                value = entity.kong[key]
                if value is not None and value != http[key] and value != []:
                    self.ignore(key_path(entity.path, key))
            elif key not in known and key not in ENTITY_META:
                line = entity.kong.key_lines[key]
                self.error(line, key_path(entity.path, key),
                           f"unknown field{did_you_mean(key, known + tuple(http))}")

    def typed(self, entity: _Entity, key: str, check: Callable[[object], str | None]) -> object:
        """The value of `key` when `check` finds nothing wrong with it (None otherwise, after Kong's
        error); its pyproxy path is marked refused so that the validator does not say it again."""
        value = entity.kong.get(key)
        if value is None:
            return None
        problem = check(value)
        if problem is None:
            return value
        self.error(entity.kong.value_lines[key], key_path(entity.path, key), problem,
                   key_path(entity.py_path, key) if entity.py_path else "")
        return None

    def entries(self, parent: YamlMap, key: str, path: str) -> list[_Entity]:
        """The mappings of the list `parent[key]`, each with its Kong path."""
        value = parent.get(key)
        if value is None:
            return []
        place = key_path(path, key)
        if not isinstance(value, YamlList):
            self.error(parent.value_lines[key], place, "expected an array")
            return []
        found = []
        for index, (item, line) in enumerate(zip(value, value.item_lines, strict=True)):
            if isinstance(item, YamlMap):
                found.append(_Entity(item, item_path(place, index)))
            else:
                self.error(line, item_path(place, index), "expected a record")
        return found

    def check_id(self, entity: _Entity, kind: str, key: str | None) -> str:
        """The entity's id: as written (a UUID), else Kong's uuid5 of its endpoint key, else one
        derived from its place in the file (Kong would draw a random one)."""
        value = self.typed(entity, "id", _uuid)
        if isinstance(value, str):
            return value
        return kong_id(kind, key if key is not None else f"{self.file}:{entity.path}")

    # -- the document -----------------------------------------------------------------------------
    def translate(self) -> Translation:
        self.format_version()
        for key in self.kong:
            if key in IGNORED_ENTITIES:
                value = self.kong[key]
                count = len(value) if isinstance(value, list) else 1
                self.ignore(f"{key} ({count})")
            elif key not in ENTITIES and key not in META_KEYS:
                self.error(self.kong.key_lines[key], key_path("", key),
                           f"unknown field{did_you_mean(key, ENTITIES + META_KEYS)}")
        for entity in self.entries(self.kong, "ca_certificates", ""):
            self.ca_certificate(entity)
        for entity in self.entries(self.kong, "certificates", ""):
            self.certificate(entity)
        for entity in self.entries(self.kong, "snis", ""):
            self.sni(entity, None)
        for entity in self.entries(self.kong, "upstreams", ""):
            self.upstream(entity)
        for entity in self.entries(self.kong, "targets", ""):
            self.target(entity, None)
        for entity in self.entries(self.kong, "services", ""):
            self.service(entity)
        for entity in self.entries(self.kong, "routes", ""):
            self.route(entity, None)
        for entity in self.entries(self.kong, "plugins", ""):
            self.plugins.append((entity, None, None))
        for entity, route, service in self.plugins:
            self.plugin(entity, route, service)
        for key, items in (("certificates", self.py_certificates), ("upstreams", self.py_upstreams),
                           ("services", self.py_services), ("plugins", self.py_plugins)):
            if items:
                _set(self.out.root, key, items, self.kong.value_lines.get(key, self.kong.line))
        return self.out

    def format_version(self) -> None:
        version = self.kong.get("_format_version")
        line = self.kong.value_lines.get("_format_version", self.kong.line)
        if version is None:
            self.error(line, "_format_version", "required field missing")
        elif isinstance(version, float):        # `3.0` unquoted reads as a number; Kong's files quote it
            version = repr(version)
        if version is not None and version not in FORMAT_VERSIONS:
            self.error(line, "_format_version", f"expected one of: {', '.join(FORMAT_VERSIONS)}")
        self.typed(_Entity(self.kong, ""), "_transform", _boolean)

    # -- certificates ---------------------------------------------------------------------------
    def ca_certificate(self, entity: _Entity) -> None:
        self.fields(entity, CA_CERTIFICATE_FIELDS)
        cert = self.typed(entity, "cert", _pem)
        if cert is None and "cert" not in entity.kong:
            self.error(entity.kong.line, key_path(entity.path, "cert"), "required field missing")
        ca_id = self.check_id(entity, "ca_certificates", None)
        if isinstance(cert, str):
            self.ca_files[ca_id] = self.store_pem(cert)

    def place(self, entity: _Entity, py_path: str) -> None:
        """`entity` is written at `py_path` of the translated document: the validator's errors there
        are shown at the entity's own path in the Kong file."""
        entity.py_path = py_path
        self.out.renames[py_path] = entity.path

    def place_in(self, entity: _Entity, parent: YamlMap, key: str) -> YamlList:
        """Place `entity` as the next item of the translated `parent`'s list `key` (a target in its
        upstream, a route in its service), and return that list for it to be appended to."""
        items = parent[key]
        assert isinstance(items, YamlList), f"every translated parent has a {key} list"
        self.place(entity, item_path(key_path(self.places[id(parent)], key), len(items)))
        return items

    def certificate(self, entity: _Entity) -> None:
        index = len(self.py_certificates)
        self.place(entity, item_path("certificates", index))
        self.fields(entity, CERTIFICATE_FIELDS)
        for key in ("cert_alt", "key_alt"):
            if entity.kong.get(key) is not None:
                self.ignore(f"{key_path(entity.path, key)} (one certificate per entity in pyproxy)")
        certificate = YamlMap(entity.kong.line)
        for key in ("cert", "key"):
            pem = self.typed(entity, key, _pem)
            if isinstance(pem, str):
                _set(certificate, key, self.store_pem(pem), entity.kong.value_lines[key])
            elif key not in entity.kong:
                self.error(entity.kong.line, key_path(entity.path, key), "required field missing")
        cert_id = self.check_id(entity, "certificates", None)
        self.certificates[cert_id] = certificate
        self.places[id(certificate)] = entity.py_path
        self.py_certificates.append(certificate)
        self.py_certificates.item_lines.append(entity.kong.line)
        if "snis" in entity.kong:
            snis_line = entity.kong.value_lines["snis"]
            _set(certificate, "snis", YamlList(snis_line), snis_line)
            self.out.renames[key_path(entity.py_path, "snis")] = key_path(entity.path, "snis")
            value = entity.kong["snis"]
            if isinstance(value, YamlList):
                for index, (item, line) in enumerate(zip(value, value.item_lines, strict=True)):
                    path = item_path(key_path(entity.path, "snis"), index)
                    if isinstance(item, YamlMap):
                        self.sni(_Entity(item, path), certificate)
                    else:           # the Admin API's shorthand: the names alone
                        self.add_sni(certificate, item, line, path)
            else:
                self.error(snis_line, key_path(entity.path, "snis"), "expected an array")

    def sni(self, entity: _Entity, certificate: YamlMap | None) -> None:
        self.fields(entity, SNI_FIELDS)
        name = entity.kong.get("name")
        line = entity.kong.value_lines.get("name", entity.kong.line)
        if name is None:
            self.error(line, key_path(entity.path, "name"), "required field missing")
            return
        self.typed(entity, "id", _uuid)            # nothing refers to an SNI by its id
        if certificate is None:
            reference = entity.kong.get("certificate")
            if reference is None:
                self.error(entity.kong.line, key_path(entity.path, "certificate"), "required field missing")
                return
            certificate = self.certificates.get(_reference_key(reference) or "")
            if certificate is None:
                self.error(entity.kong.value_lines["certificate"], key_path(entity.path, "certificate"),
                           f"invalid reference 'certificate: {_shown(reference)}' "
                           "(no such entry in 'certificates')")
                return
            if "snis" not in certificate:
                _set(certificate, "snis", YamlList(line), line)
        self.add_sni(certificate, name, line, key_path(entity.path, "name"))

    def add_sni(self, certificate: YamlMap, name: object, line: int, path: str) -> None:
        snis = certificate["snis"]
        assert isinstance(snis, YamlList), "set by certificate() or sni() before any name is added"
        snis_path = key_path(self.places[id(certificate)], "snis")
        self.out.renames[item_path(snis_path, len(snis))] = path
        snis.append(name)
        snis.item_lines.append(line)

    # -- upstreams and targets ------------------------------------------------------------------
    def upstream(self, entity: _Entity) -> None:
        self.place(entity, item_path("upstreams", len(self.py_upstreams)))
        self.fields(entity, UPSTREAM_FIELDS, UPSTREAM_HTTP_FIELDS)
        upstream = YamlMap(entity.kong.line)
        _copy(upstream, entity.kong, "name")
        algorithm = self.typed(entity, "algorithm", _string)
        if algorithm is not None and algorithm not in ALGORITHMS:
            if algorithm in ("latency", "sticky-sessions"):      # HTTP response times, cookies
                self.ignore(f"{key_path(entity.path, 'algorithm')} {algorithm} (round-robin instead)")
            else:
                self.error(entity.kong.value_lines["algorithm"], key_path(entity.path, "algorithm"),
                           f"expected one of: {', '.join((*ALGORITHMS, 'latency', 'sticky-sessions'))}")
        elif algorithm is not None:
            _copy(upstream, entity.kong, "algorithm")
        hash_on = self.typed(entity, "hash_on", _string)
        if hash_on not in (None, "none", "ip"):
            self.ignore(f"{key_path(entity.path, 'hash_on')} {hash_on} "
                        "(HTTP only: the client address instead)")
        _set(upstream, "healthchecks", self.healthchecks(entity), entity.kong.value_lines.get("healthchecks",
                                                                                              entity.kong.line))
        _set(upstream, "targets", YamlList(entity.kong.value_lines.get("targets", entity.kong.line)),
             entity.kong.value_lines.get("targets", entity.kong.line))
        certificate = self.client_certificate_of(entity)
        if certificate is not None:
            self.upstream_client_certificates[id(upstream)] = certificate
        name = entity.kong.get("name")
        upstream_id = self.check_id(entity, "upstreams", name if isinstance(name, str) else None)
        self.upstreams[upstream_id] = upstream
        self.places[id(upstream)] = entity.py_path
        if isinstance(name, str):
            self.upstreams[name] = upstream
        upstream_line = entity.kong.line
        self.py_upstreams.append(upstream)
        self.py_upstreams.item_lines.append(upstream_line)
        for target in self.entries(entity.kong, "targets", entity.path):
            self.target(target, upstream)

    def target(self, entity: _Entity, upstream: YamlMap | None) -> None:
        """A target, of `upstream` (nested in it) or of the one its `upstream` field names."""
        self.fields(entity, TARGET_FIELDS)
        if upstream is None:
            reference = entity.kong.get("upstream")
            upstream = self.upstreams.get(_reference_key(reference) or "")
            if upstream is None:
                where = entity.kong.value_lines.get("upstream", entity.kong.line)
                message = ("required field missing" if reference is None else
                           f"invalid reference 'upstream: {_shown(reference)}' "
                           "(no such entry in 'upstreams')")
                self.error(where, key_path(entity.path, "upstream"), message)
                return
        targets = self.place_in(entity, upstream, "targets")
        target = YamlMap(entity.kong.line)
        _copy(target, entity.kong, "target")
        if self.typed(entity, "weight", _integer) is not None:
            _copy(target, entity.kong, "weight")
        self.typed(entity, "id", _uuid)            # nothing refers to a target: no id to make
        targets.append(target)
        targets.item_lines.append(entity.kong.line)

    def healthchecks(self, upstream: _Entity) -> YamlMap:
        """Kong's health checks in pyproxy's shape, Kong's defaults written out (0: off)."""
        line = upstream.kong.value_lines.get("healthchecks", upstream.kong.line)
        path = key_path(upstream.path, "healthchecks")
        py_path = key_path(upstream.py_path, "healthchecks")
        kong = upstream.kong.get("healthchecks")
        if kong is not None and not isinstance(kong, YamlMap):
            self.error(line, path, "expected a record")
            kong = None
        kong = kong if kong is not None else YamlMap(line)
        checks = _Entity(kong, path)
        self.fields(checks, HEALTHCHECKS_FIELDS)
        if kong.get("threshold") not in (None, 0):
            self.ignore(key_path(path, "threshold"))
        active = self.record(checks, "active", ACTIVE_FIELDS)
        passive = self.record(checks, "passive", PASSIVE_FIELDS)
        active_healthy = self.record(active, "healthy", HEALTHY_FIELDS)
        active_unhealthy = self.record(active, "unhealthy", UNHEALTHY_FIELDS)
        passive_healthy = self.record(passive, "healthy", HEALTHY_FIELDS)
        passive_unhealthy = self.record(passive, "unhealthy", UNHEALTHY_FIELDS)

        py_active = YamlMap(active.kong.line)
        healthy_interval = self.seconds(active_healthy, "interval")
        unhealthy_interval = self.seconds(active_unhealthy, "interval")
        intervals = [ms for ms in (healthy_interval, unhealthy_interval) if ms]
        if len(set(intervals)) > 1:
            self.ignore(f"{key_path(active_unhealthy.path, 'interval')} (one interval for every target: "
                        f"the shorter, {min(intervals)}ms)")
        interval_from = active_healthy if healthy_interval else active_unhealthy
        _set(py_active, "interval", min(intervals, default=0),
             interval_from.kong.value_lines.get("interval", active.kong.line))
        self.out.renames[key_path(py_path, "active.interval")] = key_path(interval_from.path, "interval")
        timeout = self.seconds(active, "timeout")
        _set(py_active, "timeout", 1000 if timeout is None else timeout,
             active.kong.value_lines.get("timeout", active.kong.line))
        check_type = self.typed(active, "type", _string)
        if intervals and check_type not in (None, "tcp"):
            self.ignore(f"{key_path(active.path, 'type')} {check_type} (probed with a TCP connect)")
        self.counters(py_active, "healthy", active_healthy, ("successes",), key_path(py_path, "active"))
        self.counters(py_active, "unhealthy", active_unhealthy, ("tcp_failures", "timeouts"),
                      key_path(py_path, "active"))

        py_passive = YamlMap(passive.kong.line)
        self.counters(py_passive, "unhealthy", passive_unhealthy, ("tcp_failures", "timeouts"),
                      key_path(py_path, "passive"))
        for record in (active, active_healthy, active_unhealthy, passive_healthy, passive_unhealthy):
            for key, default in HTTP_CHECK_DEFAULTS[record.path[len(path) + 1:]].items():
                if record.kong.get(key) not in (None, default):
                    self.ignore(key_path(record.path, key))
        if passive_healthy.kong.get("successes") not in (None, 0):
            self.ignore(f"{key_path(passive_healthy.path, 'successes')} (a target taken out by passive "
                        "checks is tried again after fail_timeout)")
        result = YamlMap(line)
        _set(result, "active", py_active, active.kong.line)
        _set(result, "passive", py_passive, passive.kong.line)
        self.out.renames[py_path] = path
        return result

    def record(self, parent: _Entity, key: str, known: tuple[str, ...]) -> _Entity:
        value = parent.kong.get(key)
        path = key_path(parent.path, key)
        line = parent.kong.value_lines.get(key, parent.kong.line)
        if value is not None and not isinstance(value, YamlMap):
            self.error(line, path, "expected a record")
            value = None
        entity = _Entity(value if value is not None else YamlMap(line), path)
        self.fields(entity, known)
        return entity

    def seconds(self, entity: _Entity, key: str) -> int | None:
        """Kong's `seconds` (a number, 0–65535) as pyproxy's bare milliseconds; None if not written."""
        value = self.typed(entity, key, _seconds)
        return round(value * 1000) if isinstance(value, (int, float)) else None

    def counters(self, target: YamlMap, key: str, record: _Entity, names: tuple[str, ...],
                 py_parent: str) -> None:
        counters = YamlMap(record.kong.line)
        for name in names:
            value = self.typed(record, name, _integer)
            _set(counters, name, 0 if value is None else value,
                 record.kong.value_lines.get(name, record.kong.line))
        _set(target, key, counters, record.kong.line)
        self.out.renames[key_path(py_parent, key)] = record.path

    # -- services and routes --------------------------------------------------------------------
    def service(self, entity: _Entity) -> None:
        self.fields(entity, SERVICE_FIELDS)
        name = entity.kong.get("name")
        service_id = self.check_id(entity, "services", name if isinstance(name, str) else None)
        keys = [service_id] + ([name] if isinstance(name, str) else [])
        protocol, host, port = self.service_address(entity)
        if self.typed(entity, "enabled", _boolean) is False:
            self.ignore(f"{entity.path} (enabled: false) with its routes and plugins")
            protocol = None
        elif protocol not in SERVICE_PROTOCOLS:
            label = f"{entity.path} {name!r}" if isinstance(name, str) else entity.path
            self.ignore(f"{label} (protocol {protocol}: HTTP only) with its routes and plugins")
            protocol = None
        if protocol is None:
            for key in keys:
                self.services[key] = None
            for route in self.entries(entity.kong, "routes", entity.path):
                self.routes_of_ignored(route)
            return
        self.place(entity, item_path("services", len(self.py_services)))
        service = YamlMap(entity.kong.line)
        _set(service, "name", name if name is not None else service_id,
             entity.kong.value_lines.get("name", entity.kong.line))
        url_line = entity.kong.value_lines.get("url", entity.kong.line)
        _set(service, "protocol", protocol, entity.kong.value_lines.get("protocol", url_line))
        if host is not None:
            _set(service, "host", host, entity.kong.value_lines.get("host", url_line))
        if port is not None:
            _set(service, "port", port, entity.kong.value_lines.get("port", url_line))
        if "url" in entity.kong:
            for key in ("protocol", "host", "port"):
                if key not in entity.kong:
                    self.out.renames[key_path(entity.py_path, key)] = key_path(entity.path, "url")
        for key in ("retries", "connect_timeout", "write_timeout", "read_timeout"):
            if self.typed(entity, key, _integer) is not None:
                _copy(service, entity.kong, key)
        if self.typed(entity, "tls_verify", _boolean) is not None:
            _copy(service, entity.kong, "tls_verify")
        self.ca_certificates_of(entity, service)
        # Kong's: the service's client_certificate, else that of the upstream its host names.
        certificate = self.client_certificate_of(entity)
        upstream = self.upstreams.get(host) if isinstance(host, str) else None
        if certificate is None and entity.kong.get("client_certificate") is None and upstream is not None:
            certificate = self.upstream_client_certificates.get(id(upstream))
        if certificate is not None:
            line = entity.kong.value_lines.get("client_certificate", entity.kong.line)
            pair = YamlMap(line)
            for key in ("cert", "key"):
                if key in certificate:
                    _set(pair, key, certificate[key], line)
            _set(service, "client_certificate", pair, line)
        for key in ("tls_verify_depth", "tls_sans"):
            if entity.kong.get(key) is not None:
                self.ignore(key_path(entity.path, key))
        if entity.kong.get("path") is not None:
            self.ignore(key_path(entity.path, "path"))
        url = entity.kong.get("url")
        if isinstance(url, str) and urlsplit(url).path not in ("", "/"):
            self.ignore(f"{key_path(entity.path, 'url')} path {urlsplit(url).path}")
        _set(service, "routes", YamlList(entity.kong.value_lines.get("routes", entity.kong.line)),
             entity.kong.value_lines.get("routes", entity.kong.line))
        for key in keys:
            self.services[key] = service
        self.places[id(service)] = entity.py_path
        self.py_services.append(service)
        self.py_services.item_lines.append(entity.kong.line)
        for route in self.entries(entity.kong, "routes", entity.path):
            self.route(route, service)
        for plugin in self.entries(entity.kong, "plugins", entity.path):
            self.plugins.append((plugin, None, str(service["name"])))

    def service_address(self, entity: _Entity) -> tuple[object, object, object]:
        """(protocol, host, port) from `url` or the fields, Kong's defaults filled in."""
        protocol = self.typed(entity, "protocol", _string)
        host = entity.kong.get("host")
        port = self.typed(entity, "port", _integer)
        url = self.typed(entity, "url", _string)
        if isinstance(url, str):
            parts = urlsplit(url)
            try:
                url_port = parts.port
            except ValueError:              # not a number, or out of range
                url_port = -1
            if not parts.scheme or not parts.hostname or url_port == -1:
                self.error(entity.kong.value_lines["url"], key_path(entity.path, "url"),
                           f"invalid url {describe(url)}: expected SCHEME://HOST[:PORT][/PATH]")
                url_port = None
            protocol = protocol or parts.scheme or None
            host = host if host is not None else parts.hostname
            port = port if port is not None else url_port
        protocol = protocol or "http"
        if port is None and protocol in DEFAULT_PORTS:
            port = DEFAULT_PORTS[protocol]
        return protocol, host, port

    def ca_certificates_of(self, entity: _Entity, service: YamlMap) -> None:
        value = entity.kong.get("ca_certificates")
        if value is None:
            return
        line = entity.kong.value_lines["ca_certificates"]
        path = key_path(entity.path, "ca_certificates")
        if not isinstance(value, YamlList):
            self.error(line, path, "expected an array")
            return
        files = YamlList(line)
        for index, (item, item_line) in enumerate(zip(value, value.item_lines, strict=True)):
            found = self.ca_files.get(item) if isinstance(item, str) else None
            if found is None:
                self.error(item_line, item_path(path, index),
                           f"invalid reference 'ca_certificates: {_shown(item)}' "
                           "(no such entry in 'ca_certificates')")
                continue
            files.append(found)
            files.item_lines.append(item_line)
        _set(service, "ca_certificates", files, line)

    def client_certificate_of(self, entity: _Entity) -> YamlMap | None:
        """The certificate Kong's `client_certificate` of `entity` (a service or an upstream) names,
        by its id or `{id: …}` as the Admin API keeps it: its pair is what pyproxy presents to an
        upstream that asks (`services[].client_certificate: {cert, key}`). None when it names none."""
        value = entity.kong.get("client_certificate")
        if value is None:
            return None
        certificate = self.certificates.get(_reference_key(value) or "")
        if certificate is None:
            self.error(entity.kong.value_lines["client_certificate"],
                       key_path(entity.path, "client_certificate"),
                       f"invalid reference 'client_certificate: {_shown(value)}' "
                       "(no such entry in 'certificates')")
        return certificate

    def routes_of_ignored(self, entity: _Entity) -> None:
        name = entity.kong.get("name")
        route_id = self.check_id(entity, "routes", name if isinstance(name, str) else None)
        for key in (route_id, name):
            if isinstance(key, str):
                self.routes[key] = None

    def route(self, entity: _Entity, service: YamlMap | None) -> None:
        notes = len(self.out.ignored)
        self.fields(entity, ROUTE_FIELDS, ROUTE_HTTP_FIELDS)
        name = self.typed(entity, "name", _string)
        label = f"{entity.path} {name!r}" if isinstance(name, str) else entity.path
        if service is None:
            reference = entity.kong.get("service")
            key = _reference_key(reference)
            if reference is not None and key not in self.services:
                self.error(entity.kong.value_lines["service"], key_path(entity.path, "service"),
                           f"invalid reference 'service: {_shown(reference)}' (no such entry in 'services')")
                return
            service = self.services[key] if key is not None else None
            if service is None:           # none, or an ignored one: the route is ignored whole
                del self.out.ignored[notes:]
                self.ignore(f"{label} ({'no service' if reference is None else 'its service is ignored'})")
                self.routes_of_ignored(entity)
                return
        written = entity.kong.get("protocols")
        protocols = ["http", "https"]               # Kong's default
        if isinstance(written, YamlList) and all(isinstance(p, str) for p in written):
            protocols = [str(p) for p in written]
        elif written is not None:
            self.error(entity.kong.value_lines["protocols"], key_path(entity.path, "protocols"),
                       "expected an array of strings")
            return
        route_id = self.check_id(entity, "routes", name if isinstance(name, str) else None)
        # pyproxy's udp routes are those of udp services, and only they lead to one (Kong's stream
        # routes mix them: the other kind is ignored).
        udp = service.get("protocol") == "udp"
        stream = [protocol for protocol in protocols
                  if protocol in STREAM_PROTOCOLS and (protocol == "udp") == udp]
        if not stream:
            if not any(protocol in STREAM_PROTOCOLS for protocol in protocols):
                kind = "HTTP only"
            else:
                kind = "its service is udp" if udp else "its service is not udp"
            del self.out.ignored[notes:]
            self.ignore(f"{label} (protocols {', '.join(protocols)}: {kind})")
            self.routes_of_ignored(entity)
            return
        if "tls_passthrough" in stream and not entity.kong.get("snis"):
            # Kong's rule; pyproxy's own files may pass TLS through by address alone.
            self.error(entity.kong.value_lines["protocols"], key_path(entity.path, "protocols"),
                       "a tls_passthrough route needs snis")
            return
        routes = self.place_in(entity, service, "routes")
        route = YamlMap(entity.kong.line)
        route_name = name if isinstance(name, str) else route_id
        _set(route, "name", route_name, entity.kong.value_lines.get("name", entity.kong.line))
        if "protocols" in entity.kong:
            _copy(route, entity.kong, "protocols")
            if len(stream) != len(protocols) and isinstance(written, YamlList):
                dropped = [protocol for protocol in protocols if protocol not in stream]
                self.ignore(f"{key_path(entity.path, 'protocols')} {', '.join(dropped)}")
                pairs = zip(written, written.item_lines, strict=True)
                route["protocols"] = _list(written.line, [(p, line) for p, line in pairs if p in stream])
        for key in ("sources", "destinations"):
            self.address_matches(entity, key)
            _copy(route, entity.kong, key)
        _copy(route, entity.kong, "snis")
        routes.append(route)
        routes.item_lines.append(entity.kong.line)
        for alias in (route_id, name):
            if isinstance(alias, str):
                self.routes[alias] = route_name
        for plugin in self.entries(entity.kong, "plugins", entity.path):
            self.plugins.append((plugin, route_name, None))

    def address_matches(self, route: _Entity, key: str) -> None:
        """Kong's types for `sources`/`destinations` entries (`ip` a string, `port` an integer)."""
        for index, entry in enumerate(self.entries(route.kong, key, route.path)):
            entry.py_path = item_path(key_path(route.py_path, key), index)
            self.fields(entry, ("ip", "port"))
            self.typed(entry, "ip", _string)
            self.typed(entry, "port", _integer)

    # -- plugins --------------------------------------------------------------------------------
    def plugin(self, entity: _Entity, route: str | None, service: str | None) -> None:
        self.fields(entity, PLUGIN_FIELDS)
        name = self.typed(entity, "name", _string)
        if name is None:
            if "name" not in entity.kong:
                self.error(entity.kong.line, key_path(entity.path, "name"), "required field missing")
            return
        label = f"{entity.path} {name!r}"
        if self.typed(entity, "enabled", _boolean) is False:
            self.ignore(f"{label} (enabled: false)")
            return
        if name not in STREAM_PLUGINS:
            self.ignore(f"{label} (not a stream plugin pyproxy has)")
            return
        if entity.kong.get("consumer") is not None or entity.kong.get("consumer_group") is not None:
            self.ignore(f"{label} (applies to a consumer: HTTP only)")
            return
        protocols = entity.kong.get("protocols")
        if isinstance(protocols, list) and not any(p in STREAM_PROTOCOLS for p in protocols):
            self.ignore(f"{label} (protocols {', '.join(map(str, protocols))}: not stream traffic)")
            return
        for key, kind, names in (("route", "routes", self.routes), ("service", "services", self.services)):
            reference = entity.kong.get(key)
            if reference is None:
                continue
            ref = _reference_key(reference)
            if ref not in names:
                self.error(entity.kong.value_lines[key], key_path(entity.path, key),
                           f"invalid reference '{key}: {_shown(reference)}' (no such entry in '{kind}')")
                return
            found = names[ref or ""]
            if found is None:
                self.ignore(f"{label} (its {key} is ignored)")
                return
            if key == "route":
                route = str(found)
            else:
                assert isinstance(found, YamlMap), "services maps to translated services or None"
                service = str(found["name"])
        self.place(entity, item_path("plugins", len(self.py_plugins)))
        plugin = YamlMap(entity.kong.line)
        _copy(plugin, entity.kong, "name")
        line = entity.kong.line
        if route is not None:
            _set(plugin, "route", route, entity.kong.value_lines.get("route", line))
        elif service is not None:
            _set(plugin, "service", service, entity.kong.value_lines.get("service", line))
        config = entity.kong.get("config")
        settings = STREAM_PLUGINS[name]
        if isinstance(config, YamlMap) and settings is not None:
            kept = YamlMap(config.line)
            for key in config:
                if key in settings:
                    _copy(kept, config, key)
                elif config[key] is not None and config[key] != []:
                    self.ignore(key_path(key_path(entity.path, "config"), str(key)))
            config = kept
        if config is not None:
            _set(plugin, "config", config, entity.kong.value_lines["config"])
        self.py_plugins.append(plugin)
        self.py_plugins.item_lines.append(line)


def _reference_key(reference: object) -> str | None:
    """What a foreign key names: `"name"`, `{name: …}` or `{id: …}`."""
    if isinstance(reference, str):
        return reference
    if isinstance(reference, dict):
        for key in ("id", "name"):
            if isinstance(reference.get(key), str):
                return str(reference[key])
    return None


def _shown(reference: object) -> str:
    if isinstance(reference, dict):
        return "{" + ", ".join(f'"{k}":"{v}"' for k, v in reference.items()) + "}"
    return str(reference)


# Kong's type checks, with Kong's messages; each returns the problem or None.
def _integer(value: object) -> str | None:
    return None if isinstance(value, int) and not isinstance(value, bool) else "expected an integer"


def _seconds(value: object) -> str | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return "expected a number"
    return None if 0 <= value <= 65535 else "value should be between 0 and 65535"


def _string(value: object) -> str | None:
    return None if isinstance(value, str) else "expected a string"


def _boolean(value: object) -> str | None:
    return None if isinstance(value, bool) else "expected a boolean"


def _pem(value: object) -> str | None:
    if not isinstance(value, str):
        return "expected a string"
    return None if "-----BEGIN" in value else "invalid PEM: expected the certificate or key itself (PEM text)"


def _uuid(value: object) -> str | None:
    try:
        uuid.UUID(str(value))
    except ValueError:
        return "expected a valid UUID"
    return None if isinstance(value, str) else "expected a valid UUID"
