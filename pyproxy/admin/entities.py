"""Kong's stream entities as the Admin API shows them: their fields with Kong's defaults, the
foreign keys between them, the field names a form-encoded body's strings are converted for, and
Kong's error bodies (kong/db/errors.lua: `{"code", "name", "message", "fields"}`).
"""

from __future__ import annotations

import copy
import hashlib
import ssl
import uuid
from dataclasses import dataclass, field
from urllib.parse import urlsplit

# Kong 3.x's schema defaults (kong/db/schema/entities/*.lua), which a created entity gets.
_HEALTHCHECKS = {
    "active": {
        "type": "http", "timeout": 1, "concurrency": 10, "http_path": "/", "https_sni": None,
        "https_verify_certificate": True, "headers": None,
        "healthy": {"interval": 0, "successes": 0, "http_statuses": [200, 302]},
        "unhealthy": {"interval": 0, "tcp_failures": 0, "timeouts": 0, "http_failures": 0,
                      "http_statuses": [429, 404, 500, 501, 502, 503, 504, 505]},
    },
    "passive": {
        "type": "http",
        "healthy": {"successes": 0, "http_statuses": [200, 201, 202, 203, 204, 205, 206, 207, 208, 226,
                                                      300, 301, 302, 303, 304, 305, 306, 307, 308]},
        "unhealthy": {"tcp_failures": 0, "timeouts": 0, "http_failures": 0, "http_statuses": [429, 500, 503]},
    },
    "threshold": 0,
}


@dataclass(frozen=True)
class Kind:
    """One kind of entity: `services`, `routes`…"""

    name: str
    endpoint_key: str | None                 # the field that names one besides its id
    defaults: dict[str, object]
    references: dict[str, str] = field(default_factory=dict)    # foreign key field → kind
    required: tuple[str, ...] = ()


KINDS = {kind.name: kind for kind in (
    Kind("services", "name", {
        "name": None, "protocol": "http", "host": None, "port": 80, "path": None, "retries": 5,
        "connect_timeout": 60000, "write_timeout": 60000, "read_timeout": 60000, "tags": None,
        "client_certificate": None, "tls_verify": None, "tls_verify_depth": None,
        "ca_certificates": None, "enabled": True}, {"client_certificate": "certificates"},
        required=("host",)),
    Kind("routes", "name", {
        "name": None, "protocols": ["http", "https"], "methods": None, "hosts": None, "paths": None,
        "headers": None, "https_redirect_status_code": 426, "regex_priority": 0, "strip_path": True,
        "path_handling": "v0", "preserve_host": False, "request_buffering": True,
        "response_buffering": True, "snis": None, "sources": None, "destinations": None, "tags": None,
        "service": None}, {"service": "services"}),
    Kind("upstreams", "name", {
        "name": None, "algorithm": "round-robin", "hash_on": "none", "hash_fallback": "none",
        "hash_on_cookie_path": "/", "slots": 10000, "healthchecks": _HEALTHCHECKS, "tags": None,
        "host_header": None, "client_certificate": None, "use_srv_name": False},
        {"client_certificate": "certificates"}, required=("name",)),
    Kind("targets", "target", {"target": None, "weight": 100, "upstream": None, "tags": None},
         {"upstream": "upstreams"}, required=("target",)),
    Kind("certificates", None, {"cert": None, "key": None, "cert_alt": None, "key_alt": None,
                                "tags": None}, required=("cert", "key")),
    Kind("ca_certificates", None, {"cert": None, "cert_digest": None, "tags": None}, required=("cert",)),
    Kind("snis", "name", {"name": None, "certificate": None, "tags": None},
         {"certificate": "certificates"}, required=("name", "certificate")),
    Kind("plugins", None, {
        "name": None, "instance_name": None, "config": {}, "enabled": True,
        "protocols": ["tcp", "tls", "tls_passthrough"], "service": None, "route": None,
        "consumer": None, "tags": None}, {"service": "services", "route": "routes"},
        required=("name",)),
)}

# Form-encoded values are strings; Kong converts them by the schema's types (kong/api/arguments.lua).
INTEGER_FIELDS = frozenset((
    "port", "retries", "connect_timeout", "write_timeout", "read_timeout", "tls_verify_depth", "weight",
    "slots", "successes", "tcp_failures", "timeouts", "http_failures", "concurrency", "threshold",
    "regex_priority", "https_redirect_status_code", "priority"))
NUMBER_FIELDS = frozenset(("interval", "timeout"))
BOOLEAN_FIELDS = frozenset((
    "enabled", "tls_verify", "strip_path", "preserve_host", "request_buffering", "response_buffering",
    "https_verify_certificate", "use_srv_name"))
ARRAY_FIELDS = frozenset((
    "protocols", "snis", "tags", "hosts", "paths", "methods", "ca_certificates", "sources",
    "destinations", "allow", "deny", "http_statuses"))


def is_uuid(text: str) -> bool:
    try:
        uuid.UUID(text)
    except ValueError:
        return False
    return True


def with_defaults(kind: Kind, values: dict[str, object]) -> dict[str, object]:
    """A new entity: Kong's defaults, then `values` (records merged into the default's)."""
    entity: dict[str, object] = copy.deepcopy(kind.defaults)
    merge_into(entity, values)
    return entity


def merge_into(entity: dict[str, object], values: dict[str, object]) -> None:
    """PATCH: the fields written replace the entity's; a record is merged field by field."""
    for key, value in values.items():
        old = entity.get(key)
        if isinstance(value, dict) and isinstance(old, dict) and key not in KIND_REFERENCE_FIELDS:
            merge_into(old, value)
        else:
            entity[key] = copy.deepcopy(value)


KIND_REFERENCE_FIELDS = frozenset(ref for kind in KINDS.values() for ref in kind.references)


class ApiError(Exception):
    """An answer other than success: the HTTP status and Kong's JSON body."""

    def __init__(self, status: int, body: dict[str, object]):
        super().__init__(body.get("message"))
        self.status = status
        self.body = body


def not_found() -> ApiError:
    return ApiError(404, {"message": "Not found"})


def bad_request(message: str) -> ApiError:
    return ApiError(400, {"message": message})


def schema_violation(fields: dict[str, object], messages: list[str]) -> ApiError:
    """Kong's code 2: the entity does not fit its schema; `fields` names what is wrong."""
    count = len(messages)
    head = "schema violation" if count == 1 else f"{count} schema violations"
    return ApiError(400, {"code": 2, "name": "schema violation",
                          "message": f"{head} ({'; '.join(messages)})", "fields": fields})


def unique_violation(field_name: str, value: object) -> ApiError:
    """Kong's code 5, a 409: another entity has that name."""
    return ApiError(409, {"code": 5, "name": "unique constraint violation",
                          "message": f"UNIQUE violation detected on '{{{field_name}=\"{value}\"}}'",
                          "fields": {field_name: value}})


def foreign_key_violation(field_name: str, reference: object, kind: str) -> ApiError:
    """Kong's code 4: a reference to an entity that does not exist."""
    shown = (", ".join(f'{k}="{v}"' for k, v in reference.items()) if isinstance(reference, dict)
             else reference)
    return ApiError(400, {"code": 4, "name": "foreign key violation",
                          "message": f"the foreign key '{{{shown}}}' does not reference an existing "
                                     f"'{kind}' entity.",
                          "fields": {field_name: reference}})


def referenced_by(kind: str, by: str) -> ApiError:
    """Kong's answer to deleting an entity others still refer to."""
    return ApiError(400, {"code": 4, "name": "foreign key violation",
                          "message": f"an existing '{by}' entity references this '{kind}' entity",
                          "fields": {"@referenced_by": by}})


def with_digest(kind: Kind, entity: dict[str, object]) -> None:
    """A CA certificate's `cert_digest`, as Kong computes it: the SHA-256 of its DER, in hex (left as
    it is for a `cert` that is not a PEM certificate: the validator says what is wrong with it)."""
    if kind.name != "ca_certificates" or not isinstance(entity.get("cert"), str):
        return
    try:
        der = ssl.PEM_cert_to_DER_cert(str(entity["cert"]).strip())
    except ValueError:
        return
    entity["cert_digest"] = hashlib.sha256(der).hexdigest()


def url_fields(url: str) -> dict[str, object]:
    """Kong's `url` shorthand: protocol, host, port and path."""
    parts = urlsplit(url)
    try:
        port = parts.port
    except ValueError:
        raise schema_violation({"url": "invalid url"}, ["url: invalid url"]) from None
    if not parts.scheme or not parts.hostname:
        raise schema_violation({"url": "missing host in url"}, ["url: missing host in url"])
    fields: dict[str, object] = {"protocol": parts.scheme, "host": parts.hostname,
                                 "port": port or {"http": 80, "https": 443}.get(parts.scheme, 80)}
    if parts.path not in ("", "/"):
        fields["path"] = parts.path
    return fields
