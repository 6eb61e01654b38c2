"""Kong's Admin API routes for stream entities, answered from a `StateFile`.

`AdminAPI.handle(method, target, content_type, body)` gives `(status, JSON body or None)`:
paths, methods, shapes, pagination (`data`, `next`, `offset`, `size`) and error bodies as Kong's
`kong/api/` answers them. No I/O but the state file's. An `offset` is the next entity's id in
base64: a page stays right when entities are added meanwhile.
"""

from __future__ import annotations

import base64
import binascii
import copy
import email.parser
import email.policy
import hashlib
import json
import os
import tempfile
import time
import uuid
from collections import defaultdict
from typing import Any
from urllib.parse import parse_qsl, quote, unquote, urlsplit

from pyproxy import __version__
from pyproxy.addresses import host_port
from pyproxy.config import ConfigError
from pyproxy.config.loader import read_document
from pyproxy.kong.translate import STREAM_PLUGINS
from pyproxy.shared import HealthTable

from .entities import (
    ARRAY_FIELDS,
    BOOLEAN_FIELDS,
    INTEGER_FIELDS,
    KINDS,
    NUMBER_FIELDS,
    ApiError,
    Kind,
    bad_request,
    foreign_key_violation,
    is_uuid,
    merge_into,
    not_found,
    referenced_by,
    schema_violation,
    unique_violation,
    url_fields,
    with_defaults,
    with_digest,
)
from .state import Document, StateFile, flatten, invalid, plain, reference_id, render

DEFAULT_SIZE = 100
MAX_SIZE = 1000
Answer = tuple[int, object]
# Nested collections: /PARENT/{p}/CHILD, with the child's field that refers to the parent.
NESTED = {("services", "routes"): "service", ("services", "plugins"): "service",
          ("routes", "plugins"): "route", ("upstreams", "targets"): "upstream",
          ("certificates", "snis"): "certificate"}
# What deleting an entity deletes with it (Kong's `on_delete = "cascade"`), and what forbids it.
CASCADE = {"services": ("plugins",), "routes": ("plugins",), "upstreams": ("targets",),
           "certificates": ("snis",)}
# Entities that cannot be deleted while others refer to them: the kind and field that refer.
RESTRICT = {"services": (("routes", "service"),),
            "certificates": (("services", "client_certificate"), ("upstreams", "client_certificate"))}


class AdminAPI:
    """Kong's Admin API over one StateFile."""

    def __init__(self, state: StateFile):
        self.state = state

    def handle(self, method: str, target: str, content_type: str, body: bytes) -> Answer:
        try:
            return self.route(method, target, content_type, body)
        except ApiError as exc:
            return exc.status, exc.body

    def route(self, method: str, target: str, content_type: str, body: bytes) -> Answer:
        parts = urlsplit(target)
        query = dict(parse_qsl(parts.query))
        steps = [unquote(step) for step in parts.path.strip("/").split("/") if step]
        if not steps:
            _allow(method, "GET")
            return self.root()
        if steps == ["status"]:
            _allow(method, "GET")
            return self.status()
        if steps == ["config"]:
            if method == "GET":
                return 200, {"config": render(self.state.document)}
            _allow(method, "POST")
            return self.config(content_type, body)
        kind = steps[0]
        if kind not in KINDS or kind == "targets":
            raise not_found()
        parent: tuple[str, dict[str, object]] | None = None
        if len(steps) >= 3:
            child = steps[2]
            if kind == "upstreams" and child == "health" and len(steps) == 3:
                _allow(method, "GET")
                return self.health(steps[1], query)
            if kind == "upstreams" and child == "targets" and len(steps) in (5, 6) and steps[-1] in (
                    "healthy", "unhealthy"):
                _allow(method, "PUT")
                return self.set_health(steps[1], steps[3], steps[4] if len(steps) == 6 else None,
                                       steps[-1] == "healthy")
            if (kind, child) not in NESTED:
                raise not_found()
            holder = self.find(kind, steps[1])
            if holder is None:
                raise not_found()
            parent = (NESTED[(kind, child)], holder)
            kind, steps = child, steps[2:]
        if len(steps) == 1:
            if method == "GET":
                return 200, self.page(kind, parent, query, parts.path)
            _allow(method, "POST")
            return self.create(kind, self.values(content_type, body), parent)
        if len(steps) != 2:
            raise not_found()
        key = steps[1]
        if method == "GET":
            found = self.find(kind, key, parent)
            if found is None:
                raise not_found()
            return 200, self.shown(kind, found)
        if method == "DELETE":
            return self.delete(kind, key, parent)
        if method in ("PATCH", "PUT"):
            return self.change(kind, key, self.values(content_type, body), parent, method == "PUT")
        raise ApiError(405, {"message": "Method not allowed"})

    # -- GET / and /status ----------------------------------------------------------------------
    def root(self) -> Answer:
        """Kong's `GET /`: version, node, configuration, plugins."""
        state = self.state
        return 200, {
            "tagline": "Welcome to pyproxy", "version": __version__,
            "hostname": os.uname().nodename, "node_id": self.node_id(),
            "configuration": {"database": state.database, "admin_state": state.source,
                              "prefix": os.path.dirname(state.config_path), "role": "traditional"},
            "plugins": {"available_on_server": {name: {"version": __version__} for name in STREAM_PLUGINS},
                        "enabled_in_cluster": sorted({str(p["name"]) for p in state.document["plugins"]})},
        }

    def node_id(self) -> str:
        return str(uuid.uuid5(uuid.NAMESPACE_URL, self.state.path))

    def status(self) -> Answer:
        """Kong's `GET /status`, of what pyproxy has: whether changes can be kept now (a file always,
        a database while it answers), and the hash of the entities served."""
        return 200, {"database": {"reachable": self.state.reachable},
                     "configuration_hash": _hash(render(self.state.document))}

    # -- targets' health ---------------------------------------------------------------------------
    def set_health(self, upstream_key: str, target_key: str, address: str | None, healthy: bool) -> Answer:
        """Kong's `PUT /upstreams/{u}/targets/{t}[/{address}]/healthy|unhealthy`: every worker takes
        the target's addresses (or that one) in or out of rotation within a second, no reload."""
        upstream, target, addresses = self.target_addresses(upstream_key, target_key)
        if address is not None:
            addresses = [a for a in addresses if address in (a[0], host_port(*a))]
            if not addresses:
                raise bad_request(f"target {target['target']} has no address {address}")
        self.state.tell_health(str(upstream["name"]), addresses, healthy)
        return 204, None

    def target_addresses(self, upstream_key: str, target_key: str
                         ) -> tuple[dict[str, object], dict[str, object], list[tuple[str, int]]]:
        upstream = self.find("upstreams", upstream_key)
        target = self.find("targets", target_key, ("upstream", upstream)) if upstream is not None else None
        if upstream is None or target is None:
            raise not_found()
        return upstream, target, self.addresses(upstream)[str(target["target"])]

    def addresses(self, upstream: dict[str, object]) -> dict[str, list[tuple[str, int]]]:
        """An upstream's targets' resolved addresses, by target (`host:port`)."""
        for loaded in self.state.current().upstreams:
            if loaded.name == upstream["name"]:
                return defaultdict(list, {str(t): list(t.addresses) for t in loaded.targets})
        return defaultdict(list)

    def health(self, upstream_key: str, query: dict[str, str]) -> Answer:
        """Kong's `GET /upstreams/{u}/health` (`?balancer_health=1`: the upstream's as a whole), as
        the workers last stored it (pyproxy.shared.HealthTable)."""
        upstream = self.find("upstreams", upstream_key)
        if upstream is None:
            raise not_found()
        loaded = next(u for u in self.state.current().upstreams if u.name == upstream["name"])
        passive = loaded.healthchecks.passive
        checked = (loaded.healthchecks.active.interval > 0 or passive.unhealthy_tcp_failures > 0
                   or passive.unhealthy_timeouts > 0)
        addresses = self.addresses(upstream)
        data, statuses = [], []
        for target in self.children("targets", ("upstream", upstream)):
            status = self.target_status(str(upstream["name"]), target, addresses[str(target["target"])],
                                        checked)
            health = "DNS_ERROR" if not status["addresses"] else "HEALTHCHECKS_OFF"
            for address in status["addresses"]:
                if address["health"] == "HEALTHY":
                    health = "HEALTHY"
                    break
                if address["health"] == "UNHEALTHY":
                    health = "UNHEALTHY"
            data.append({**target, "health": health, "data": status})
            statuses.append(status)
        if query.get("balancer_health") != "1":
            return 200, {"data": data, "next": None, "node_id": self.node_id()}
        total = sum(status["weight"]["total"] for status in statuses)
        available = sum(status["weight"]["available"] for status in statuses)
        threshold = float(str(_get(upstream, "healthchecks", "threshold") or 0))
        healthy = available > 0 and available * 100 >= threshold * total
        verdict = "HEALTHY" if healthy else "UNHEALTHY"
        details = {"healthy": healthy, "hosts": statuses,
                   "weight": {"total": total, "available": available, "unavailable": total - available}}
        return 200, {"data": {"health": verdict if checked else "HEALTHCHECKS_OFF",
                              "balancer_health": verdict, "id": upstream["id"], "details": details},
                     "next": None, "node_id": self.node_id()}

    def target_status(self, upstream: str, target: dict[str, object], addresses: list[tuple[str, int]],
                      checked: bool) -> dict[str, Any]:
        """Kong's balancer status of one target: its addresses' health and weights."""
        weight = int(str(target.get("weight", 100)))
        table, now = self.state.health, time.monotonic()
        shown = []
        for address in addresses:
            until = table.load(HealthTable.key(upstream, host_port(*address))) if table is not None else None
            # Kong's words, but a target taken out (by `unhealthy` too) is said so with checks off.
            health = "HEALTHY" if checked else "HEALTHCHECKS_OFF"
            if weight == 0:
                health = "HEALTHCHECKS_OFF"
            elif until is not None and until > now:
                health = "UNHEALTHY"
            shown.append({"ip": address[0], "port": address[1], "weight": weight, "health": health})
        out = weight * sum(1 for address in shown if address["health"] == "UNHEALTHY")
        host, _, port = str(target["target"]).rpartition(":")
        return {"host": host.strip("[]"), "port": int(port), "nodeWeight": weight,
                "weight": {"total": weight * len(shown), "unavailable": out,
                           "available": weight * len(shown) - out},
                "addresses": shown}

    # -- reading ----------------------------------------------------------------------------------
    def find(self, kind: str, key: str, parent: tuple[str, dict[str, object]] | None = None
             ) -> dict[str, object] | None:
        """The entity named by `key` (its id, or its endpoint key), within `parent` if given."""
        endpoint = KINDS[kind].endpoint_key
        for entity in self.children(kind, parent):
            if entity["id"] == key or (endpoint is not None and entity.get(endpoint) == key):
                return entity
        if kind == "certificates":          # Kong finds a certificate by one of its SNIs too
            for sni in self.state.document["snis"]:
                if sni["name"] == key:
                    return self.find("certificates", str(reference_id(sni.get("certificate"))))
        return None

    def children(self, kind: str, parent: tuple[str, dict[str, object]] | None) -> list[dict[str, object]]:
        """The entities of `kind`, those of `parent` (the field referring to it, and it) if given."""
        items = self.state.document[kind]
        if parent is None:
            return items
        field_name, holder = parent
        return [e for e in items if reference_id(e.get(field_name)) == holder["id"]]

    def shown(self, kind: str, entity: dict[str, object]) -> dict[str, object]:
        """The entity as Kong answers it (a certificate lists its SNIs)."""
        if kind != "certificates":
            return entity
        snis = sorted(str(s["name"]) for s in self.state.document["snis"]
                      if reference_id(s.get("certificate")) == entity["id"])
        return {**entity, "snis": snis}

    def page(self, kind: str, parent: tuple[str, dict[str, object]] | None, query: dict[str, str],
             path: str) -> dict[str, object]:
        """One page of a list, Kong's way: `data`, and `next` and `offset` while more follow; with
        `?tags=a,b` those tagged both, `?tags=a/b` either."""
        items = self.children(kind, parent)
        tags = query.get("tags")
        if tags is not None:
            wanted, every = _tags_filter(tags)
            check = all if every else any
            items = [e for e in items if check(tag in _list(e.get("tags")) for tag in wanted)]
        written = query.get("size")
        size = DEFAULT_SIZE
        if written is not None:
            if not written.isdigit():
                raise ApiError(400, {"code": 9, "name": "invalid size", "message": "size must be a number",
                                     "fields": {"size": written}})
            size = int(written)
            if not 1 <= size <= MAX_SIZE:
                raise ApiError(400, {"code": 9, "name": "invalid size",
                                     "message": f"size must be an integer between 1 and {MAX_SIZE}",
                                     "fields": {"size": size}})
        start = 0
        offset = query.get("offset")
        if offset is not None:
            try:
                after = base64.urlsafe_b64decode(offset.encode()).decode()
                start = next(i for i, e in enumerate(items) if e["id"] == after)
            except (binascii.Error, UnicodeDecodeError, ValueError, StopIteration):
                raise ApiError(400, {"code": 7, "name": "invalid offset",
                                     "message": f"'{offset}' is not a valid offset: no such entity",
                                     "fields": {"offset": offset}}) from None
        data = [self.shown(kind, e) for e in items[start:start + size]]
        answer: dict[str, object] = {"data": data, "next": None}
        if start + size < len(items):
            token = base64.urlsafe_b64encode(str(items[start + size]["id"]).encode()).decode()
            extra = (f"&tags={quote(tags)}" if tags is not None else "") + (
                f"&size={size}" if written is not None else "")
            answer["offset"] = token
            answer["next"] = f"{path}?offset={quote(token)}{extra}"
        return answer

    # -- bodies -----------------------------------------------------------------------------------
    def values(self, content_type: str, body: bytes) -> dict[str, object]:
        """A request's fields: JSON, form-encoded (Kong's `a.b=`, `a[]=`, `a[1].b=`), or multipart."""
        kind = content_type.split(";", 1)[0].strip().lower()
        if kind == "application/json":
            try:
                value = json.loads(body or b"{}")
            except (ValueError, UnicodeDecodeError):
                raise bad_request("Cannot parse JSON body") from None
            if not isinstance(value, dict):
                raise bad_request("Cannot parse JSON body")
            return value
        if kind == "multipart/form-data":
            return form_values(_multipart(content_type, body))
        try:
            return form_values(parse_qsl(body.decode(), keep_blank_values=True, strict_parsing=bool(body)))
        except (ValueError, UnicodeDecodeError):
            raise bad_request("Cannot parse the form-encoded body") from None

    # -- changes ----------------------------------------------------------------------------------
    def create(self, kind: str, values: dict[str, object], parent: tuple[str, dict[str, object]] | None,
               entity_id: str | None = None, created_at: int | None = None) -> Answer:
        candidate = copy.deepcopy(self.state.document)
        entity = self.built(KINDS[kind], values, parent, candidate, entity_id, created_at)
        candidate[kind].append(entity)
        self.state.commit(candidate, (kind, len(candidate[kind]) - 1))
        return (200 if created_at is not None else 201), self.shown(kind, entity)

    def change(self, kind: str, key: str, values: dict[str, object],
               parent: tuple[str, dict[str, object]] | None, replace: bool) -> Answer:
        found = self.find(kind, key, parent)
        if found is None:
            if not replace:
                raise not_found()
            endpoint = KINDS[kind].endpoint_key
            if not is_uuid(key) and endpoint is not None:
                values = {**values, endpoint: key}
            return self.create(kind, values, parent, key if is_uuid(key) else None, int(time.time()))
        candidate = copy.deepcopy(self.state.document)
        index = next(i for i, e in enumerate(candidate[kind]) if e["id"] == found["id"])
        if replace:
            endpoint = KINDS[kind].endpoint_key
            if not is_uuid(key) and endpoint is not None:
                values = {**values, endpoint: key}
            entity = self.built(KINDS[kind], values, parent, candidate, str(found["id"]),
                                int(str(found.get("created_at") or 0)), replacing=True)
        else:
            entity = copy.deepcopy(found)
            values = dict(values)
            snis = values.pop("snis", None) if kind == "certificates" else None
            values.pop("id", None)
            merge_into(entity, self.resolved(KINDS[kind], values, candidate))
            entity["updated_at"] = int(time.time())
            self.unique(KINDS[kind], entity, candidate)
            with_digest(KINDS[kind], entity)
            if isinstance(snis, list):
                self.attach_snis(entity, snis, candidate)
        candidate[kind][index] = entity
        self.state.commit(candidate, (kind, index))
        return 200, self.shown(kind, entity)

    def delete(self, kind: str, key: str, parent: tuple[str, dict[str, object]] | None) -> Answer:
        found = self.find(kind, key, parent)
        if found is None:
            return 204, None
        candidate = copy.deepcopy(self.state.document)
        single = kind[:-1]
        for other, field_name in RESTRICT.get(kind, ()):
            if any(reference_id(e.get(field_name)) == found["id"] for e in candidate[other]):
                raise referenced_by(kind, other)
        for other in CASCADE.get(kind, ()):
            candidate[other] = [e for e in candidate[other] if reference_id(e.get(single)) != found["id"]]
        candidate[kind] = [e for e in candidate[kind] if e["id"] != found["id"]]
        self.state.commit(candidate, None)
        return 204, None

    def config(self, content_type: str, body: bytes) -> Answer:
        """DB-less `POST /config`: a whole declarative file replaces every entity."""
        kind = content_type.split(";", 1)[0].strip().lower()
        text: object = body
        if kind in ("application/x-www-form-urlencoded", "multipart/form-data"):
            text = self.values(content_type, body).get("config")
        elif kind == "application/json":
            value = self.values(content_type, body)
            text = value["config"] if isinstance(value.get("config"), str) else json.dumps(value)
        if isinstance(text, str):
            text = text.encode()
        if not isinstance(text, bytes) or not text.strip():
            raise bad_request("expected a declarative configuration")
        folder = os.path.dirname(self.state.path)
        fd, path = tempfile.mkstemp(prefix=".admin_config.", suffix=".yml", dir=folder)
        try:
            with os.fdopen(fd, "wb") as stream:
                stream.write(text)
            root = read_document(path).root
        except ConfigError as exc:
            raise invalid(exc.errors, path, None, "the body") from None
        finally:
            os.unlink(path)
        candidate = flatten(plain(root))
        try:
            self.state.commit(candidate, None)
        except ApiError as exc:         # Kong's words for a declarative file that does not load
            raise ApiError(400, {**exc.body, "code": 14, "name": "invalid declarative configuration",
                                 "message": f"declarative config is invalid: {exc.body.get('message')}"}
                           ) from None
        return 201, {kind: [self.shown(kind, e) for e in items] for kind, items in candidate.items()}

    # -- building an entity -----------------------------------------------------------------------
    def built(self, kind: Kind, values: dict[str, object], parent: tuple[str, dict[str, object]] | None,
              candidate: Document, entity_id: str | None, created_at: int | None,
              replacing: bool = False) -> dict[str, object]:
        """A new (or replacing) entity of `kind` from a request's fields, checked for what only the
        Admin API can check (required fields, references, unique names); the rest is the
        translation's and the validator's, in `StateFile.commit`."""
        values = dict(values)
        snis = values.pop("snis", None) if kind.name == "certificates" else None
        if kind.name == "services" and isinstance(values.get("url"), str):
            values.update(url_fields(str(values.pop("url"))))
        if parent is not None:
            values[parent[0]] = {"id": parent[1]["id"]}
        target = values.get("target")
        if kind.name == "targets" and isinstance(target, str) and ":" not in target:
            values["target"] = f"{target}:8000"         # Kong's default port of a target
        written_id = values.pop("id", None)
        fields = with_defaults(kind, self.resolved(kind, values, candidate))
        entity: dict[str, object] = {"id": None, **fields}       # the id first, as Kong answers
        missing = [name for name in kind.required if entity.get(name) is None]
        if missing:
            raise schema_violation({name: "required field missing" for name in missing},
                                   [f"{name}: required field missing" for name in missing])
        now = int(time.time())
        entity["id"] = entity_id or (str(written_id) if written_id is not None else str(uuid.uuid4()))
        entity["created_at"] = created_at or now
        entity["updated_at"] = now
        if not replacing and any(e["id"] == entity["id"] for e in candidate[kind.name]):
            raise ApiError(409, {"code": 3, "name": "primary key violation",
                                 "message": f"primary key violation on key '{{id=\"{entity['id']}\"}}'",
                                 "fields": {"id": entity["id"]}})
        self.unique(kind, entity, candidate)
        with_digest(kind, entity)
        if isinstance(snis, list):
            self.attach_snis(entity, snis, candidate)
        return entity

    def resolved(self, kind: Kind, values: dict[str, object], candidate: Document) -> dict[str, object]:
        """`values` with each reference (`{id}`, `{name}` or a name) made `{id}` of an entity that
        exists; Kong's foreign key violation otherwise."""
        for field_name, target in kind.references.items():
            reference = values.get(field_name)
            if reference is None:
                continue
            key = reference if isinstance(reference, str) else (
                reference.get("id") or reference.get("name") if isinstance(reference, dict) else None)
            found = [e for e in candidate[target] if isinstance(key, str) and key in (
                e["id"], e.get(KINDS[target].endpoint_key or "id"))]
            if not found:
                raise foreign_key_violation(field_name, reference, target)
            values = {**values, field_name: {"id": found[0]["id"]}}
        return values

    def unique(self, kind: Kind, entity: dict[str, object], candidate: Document) -> None:
        endpoint = kind.endpoint_key
        if endpoint is None or entity.get(endpoint) is None:
            return
        for other in candidate[kind.name]:
            if other["id"] == entity["id"] or other.get(endpoint) != entity.get(endpoint):
                continue
            if kind.name == "targets" and (reference_id(other.get("upstream"))
                                           != reference_id(entity.get("upstream"))):
                continue
            raise unique_violation(endpoint, entity[endpoint])

    def attach_snis(self, certificate: dict[str, object], names: list[object], candidate: Document) -> None:
        """A certificate's `snis` field: the SNI entities that point at it become these names."""
        candidate["snis"] = [s for s in candidate["snis"]
                             if reference_id(s.get("certificate")) != certificate["id"]]
        for name in names:
            if any(s["name"] == name for s in candidate["snis"]):
                raise unique_violation("name", name)
            sni = with_defaults(KINDS["snis"], {"name": name, "certificate": {"id": certificate["id"]}})
            sni.update(id=str(uuid.uuid4()), created_at=certificate["created_at"],
                       updated_at=certificate["updated_at"])
            candidate["snis"].append(sni)


def _list(value: object) -> list[object]:
    return value if isinstance(value, list) else []


def _tags_filter(text: str) -> tuple[list[str], bool]:
    """Kong's `tags` filter: (the tags, whether all must be there), or its `invalid options`."""
    problem = ""
    every = "/" not in text
    wanted = text.split("," if every else "/")
    if not text:
        problem = "cannot be null"
    elif ("," in text and "/" in text) or not all(wanted):
        problem = "invalid filter syntax"
    elif len(wanted) > 5:
        problem = "cannot query more than 5 tags"
    if problem:
        raise ApiError(400, {"code": 11, "name": "invalid options",
                             "message": f"invalid option (tags: {problem})", "options": {"tags": problem}})
    return wanted, every


def _get(record: object, *path: str) -> object:
    """record[path[0]][path[1]]…, or None where one is missing."""
    for step in path:
        record = record.get(step) if isinstance(record, dict) else None
    return record


def _allow(method: str, allowed: str) -> None:
    """Kong's 405 for a method the path does not take."""
    if method != allowed:
        raise ApiError(405, {"message": "Method not allowed"})


def _hash(text: str) -> str:
    return hashlib.md5(text.encode(), usedforsecurity=False).hexdigest()


def _multipart(content_type: str, body: bytes) -> list[tuple[str, str]]:
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        f"Content-Type: {content_type}\r\n\r\n".encode() + body)
    pairs = []
    for part in message.iter_parts() if message.is_multipart() else ():
        name = part.get_param("name", header="content-disposition")
        payload = part.get_payload(decode=True)
        if isinstance(name, str) and isinstance(payload, bytes):
            pairs.append((name, payload.decode("utf-8", "replace")))
    return pairs


def form_values(pairs: list[tuple[str, str]]) -> dict[str, object]:
    """Kong's form-encoded fields as a record: `a.b=1` → {a: {b: 1}}, `snis[]=x` and repeated `snis=`
    → lists, `destinations[1].port=9000` → [{port: 9000}]; strings converted by the field's type,
    an empty value is null."""
    result: dict[str, object] = {}
    for key, text in pairs:
        steps: list[str | int | None] = []
        for part in key.split("."):
            name, _, rest = part.partition("[")
            steps.append(name)
            for index in rest.rstrip("]").split("][") if rest else ():
                steps.append(int(index) - 1 if index.isdigit() and int(index) > 0 else None)
        _assign(result, steps, text)
    converted = _converted(result, "")
    assert isinstance(converted, dict)
    return converted


def _assign(node: dict[str, object] | list[object], steps: list[str | int | None], value: str) -> None:
    step, rest = steps[0], steps[1:]
    fresh: object = value if not rest else ([] if not isinstance(rest[0], str) else {})
    if isinstance(node, dict) and isinstance(step, str):
        if not rest:
            old = node.get(step)
            if step in ARRAY_FIELDS and old is not None:
                node[step] = [*old, value] if isinstance(old, list) else [old, value]
            else:
                node[step] = value
            return
        child = node.setdefault(step, fresh)
    elif isinstance(node, list):
        if step is None:
            node.append(fresh)
            child = node[-1]
        elif isinstance(step, int):
            node.extend([None] * (step + 1 - len(node)))
            if node[step] is None:
                node[step] = fresh
            child = node[step]
        else:
            return
    else:
        return
    if rest and isinstance(child, (dict, list)):
        _assign(child, rest, value)


def _converted(value: object, name: str) -> object:
    if isinstance(value, dict):
        return {key: _converted(item, key) for key, item in value.items()}
    if isinstance(value, list):
        return [_converted(item, name) if not isinstance(item, str)
                else int(item) if name == "http_statuses" and item.isdigit() else item
                for item in value if item is not None]
    if not isinstance(value, str):
        return value
    if value == "":
        return None
    if name in ARRAY_FIELDS:
        return [value]
    if name in INTEGER_FIELDS and value.lstrip("-").isdigit():
        return int(value)
    if name in NUMBER_FIELDS:
        try:
            return int(value) if value.isdigit() else float(value)
        except ValueError:
            return value
    if name in BOOLEAN_FIELDS and value in ("true", "false"):
        return value == "true"
    return value
