"""The Admin API's entities: a Kong declarative document kept in the `admin_state` file.

Every change builds a candidate document, writes it to a temporary file beside the state file and
loads the whole configuration with it (`load_sources(..., admin_state=candidate)`: the pyproxy file,
its `declarative_config`, then the candidate, through Kong's translation and pyproxy's one
validator, host names resolved), exactly as the master's next reload will. Only a candidate that
loads replaces the state file (fsync, then rename: a crash leaves the old file or the new one,
never half of one); the master is then asked to reload. A candidate that does not load is deleted,
and its errors become Kong's 400.
"""

from __future__ import annotations

import copy
import math
import os
import re
import tempfile
import uuid
from collections.abc import Callable

import yaml

from pyproxy.addresses import host_port
from pyproxy.config import Config, ConfigError, ConfigIssue, YamlFile, load_sources
from pyproxy.config.loader import read_document
from pyproxy.kong.translate import kong_id
from pyproxy.loop import Loop
from pyproxy.shared import ADMIN_HEALTHY, ADMIN_UNHEALTHY, HealthTable

from .entities import KINDS, ApiError, schema_violation, url_fields

ORDER = ("services", "routes", "upstreams", "targets", "ca_certificates", "certificates", "snis", "plugins")
Document = dict[str, list[dict[str, object]]]
_STEP = re.compile(r"\.?([^.\[\]]+)|\[(\d+)\]")


def empty() -> Document:
    return {kind: [] for kind in ORDER}


class Stale(Exception):
    """Another instance changed the shared entities since this one read them (DatabaseState): the
    request is answered again on the newer ones."""


class StateFile:
    """The document of entities and the file that keeps it."""

    database = "off"          # Kong's `database` setting that this state matches

    def __init__(self, path: str, config_path: str, changed: Callable[[], None], warn: Callable[[str], None],
                 health: HealthTable | None = None):
        self.path = path
        self.config_path = config_path      # the pyproxy file, loaded with each candidate
        self.changed = changed              # asks the master for a reload
        self.warn = warn
        self.health = health                # the workers' (pyproxy.shared): targets' weights and health
        self.document = empty()
        self.config: Config | None = None   # what the document loads into, once asked (`current`)

    @property
    def source(self) -> str:
        """Where the entities are kept, as the Admin API's `GET /` shows it."""
        return self.path

    @property
    def reachable(self) -> bool:
        """Whether changes can be kept: a file always can."""
        return True

    def start(self, loop: Loop) -> None:
        """In the admin process, once its loop exists: the entities of the state file."""
        self.read()

    def read(self) -> None:
        """The entities of the state file (none when it does not exist yet)."""
        if os.path.exists(self.path):
            self.document = flatten(plain(read_document(self.path).root))
        self.config = None

    def current(self) -> Config:
        """The configuration the entities load into (the master's, the targets' addresses resolved
        here), for what targets' health the Admin API tells the workers."""
        if self.config is None:
            try:
                self.config = load_sources([YamlFile(self.config_path)])
            except ConfigError as exc:
                raise ApiError(500, {"message": f"the configuration does not load: {exc}"}) from None
        return self.config

    def refresh(self) -> None:
        """Before a change: the entities as they are now. Nobody else changes a file."""

    def commit(self, candidate: Document, blame: tuple[str, int] | None) -> None:
        """Make `candidate` the state if the configuration loads with it, else raise Kong's 400,
        its `fields` those of the entity at `blame` (kind, index) and `@entity` the rest."""
        temporary, config = self.loaded(candidate, blame)
        try:
            self.publish(candidate)
            os.replace(temporary, self.path)
        except BaseException:
            unlink_if_there(temporary)
            raise
        self.adopted(candidate, config)

    def loaded(self, candidate: Document, blame: tuple[str, int] | None) -> tuple[str, Config]:
        """A temporary file beside the state file holding `candidate`, and the configuration
        loaded with it; Kong's 400 (no file left) if it does not load."""
        folder = os.path.dirname(self.path)
        fd, temporary = tempfile.mkstemp(prefix=".admin_state.", suffix=".yml", dir=folder)
        try:
            with os.fdopen(fd, "w") as stream:
                stream.write(render(candidate))
                stream.flush()
                os.fsync(stream.fileno())
            try:
                return temporary, load_sources([YamlFile(self.config_path)], admin_state=temporary)
            except ConfigError as exc:
                raise invalid(exc.errors, temporary, blame, self.path) from None
        except BaseException:
            unlink_if_there(temporary)
            raise

    def publish(self, candidate: Document) -> None:
        """Where the state is shared (DatabaseState), `candidate` is written there first; a file is
        its own truth."""

    def adopted(self, candidate: Document, config: Config) -> None:
        """`candidate` was renamed over the state file and loads as `config`: it is the state now,
        and the master reloads; unless only targets' weights changed: the workers are told them
        (HealthTable.tell), so sessions open on a target whose weight became 0 go on (a reload would
        end them after worker_shutdown_timeout)."""
        directory = os.open(os.path.dirname(self.path), os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)
        weights = reweighed(self.document, candidate)
        before = {route["id"]: route for route in self.document["routes"]}
        self.document, self.config = candidate, config
        if weights is None or not self.tell_weights(weights):
            self.changed()
        # Said of the routes this change made or changed (an unnamed route is named by its id).
        changed = {route.get("name") or route["id"] for route in candidate["routes"]
                   if before.get(route["id"]) != route}
        for route, port in unheard_ports(config):
            if route in changed:
                self.warn(f"admin: route {route!r} names destinations port {port}, where no "
                          f"stream_listen entry of {self.config_path} listens: it matches nothing until "
                          "one does")


    def tell_weights(self, weights: dict[str, int]) -> bool:
        """Tell the workers each target's new weight (by target id) for each of its addresses; False
        if one cannot be told (then a reload applies them)."""
        if self.health is None:
            return False
        upstreams = {u["id"]: u["name"] for u in self.document["upstreams"]}
        addresses = {(u.name, str(t)): t.addresses for u in self.current().upstreams for t in u.targets}
        for target in self.document["targets"]:
            if target["id"] not in weights:
                continue
            upstream = upstreams.get(str(reference_id(target.get("upstream"))))
            found = addresses.get((str(upstream), str(target["target"])))
            if not found:
                return False
            for address in found:
                if not self.health.tell(HealthTable.key(str(upstream), host_port(*address)),
                                        weight=weights[str(target["id"])]):
                    return False
        return True

    def tell_health(self, upstream: str, addresses: list[tuple[str, int]], healthy: bool) -> None:
        """`PUT /upstreams/{u}/targets/{t}/healthy|unhealthy`: told to every worker, and stored as the
        target's health too, so that a generation booting meanwhile (whose workers take the health
        the table holds, not the Admin API's events) starts with it."""
        state = ADMIN_HEALTHY if healthy else ADMIN_UNHEALTHY
        for address in addresses:
            key = HealthTable.key(upstream, host_port(*address))
            if self.health is None:
                raise ApiError(500, {"message": "the workers' health table is full or busy"})
            self.health.store(key, 0.0 if healthy else math.inf)    # first: see build_balancers
            if not self.health.tell(key, health=state):
                raise ApiError(500, {"message": "the workers' health table is full or busy"})


def reweighed(before: Document, after: Document) -> dict[str, int] | None:
    """{target id: weight} when the only change from `before` to `after` is targets' weights (their
    `updated_at` aside), else None."""
    if any(before[kind] != after[kind] for kind in ORDER if kind != "targets"):
        return None
    old = {str(t["id"]): t for t in before["targets"]}
    weights = {}
    for target in after["targets"]:
        was = old.pop(str(target["id"]), None)
        if was is None:
            return None
        if {**was, "weight": None, "updated_at": None} != {**target, "weight": None, "updated_at": None}:
            return None
        weight = target.get("weight")
        if was.get("weight") != weight and isinstance(weight, int):
            weights[str(target["id"])] = weight
    return weights if weights and not old else None


def reference_id(reference: object) -> object:
    """The id a reference (`{"id": …}`) names."""
    return reference.get("id") if isinstance(reference, dict) else None


def unlink_if_there(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def unheard_ports(config: Config) -> list[tuple[str, int]]:
    """(route, port) for each destinations port that no listener has: as in Kong, whose
    stream_listen is kong.conf's, such a route is kept and matches nothing."""
    ports = {listen.port for listen in config.stream_listen}
    return [(route.name, match.port) for route in config.routes for match in route.destinations
            if match.port is not None and match.port not in ports]


def render(document: Document) -> str:
    """The state as a Kong declarative file (deck's flat form: references by id)."""
    out: dict[str, object] = {"_format_version": "3.0"}
    out.update((kind, items) for kind, items in document.items() if items)
    return str(yaml.dump(out, Dumper=yaml.CSafeDumper, sort_keys=False, allow_unicode=True))


def plain(value: object) -> object:
    """The loader's values (mappings that know their lines) as plain dicts and lists."""
    if isinstance(value, dict):
        return {str(key): plain(item) for key, item in value.items()}
    if isinstance(value, list):
        return [plain(item) for item in value]
    return value


def invalid(issues: list[ConfigIssue], candidate: str, blame: tuple[str, int] | None,
            shown_as: str) -> ApiError:
    """Kong's schema violation for a candidate (a file) that did not load, which messages call
    `shown_as`."""
    fields: dict[str, object] = {}
    messages = []
    prefix = f"{blame[0]}[{blame[1]}]" if blame is not None else ""
    for issue in issues:
        key = issue.key if issue.file == candidate else ""
        text = (issue.message if issue.file == candidate else str(issue)).replace(candidate, shown_as)
        if prefix and key.startswith(prefix) and key[len(prefix):len(prefix) + 1] in (".", ""):
            key = key[len(prefix) + 1:]
        elif prefix and key:            # another entity's field: told whole, for the entity
            key, text = "", f"{key}: {text}"
        messages.append(f"{key}: {text}" if key else text)
        _put(fields, key, text)
    return schema_violation(fields, messages)


def _put(fields: dict[str, object], key: str, message: str) -> None:
    """`message` at `key` (`destinations[0].port`) in Kong's nested `fields`; `@entity` for none."""
    steps: list[str | int] = [name if name else int(index) for name, index in _STEP.findall(key)]
    if not steps:
        entity = fields.setdefault("@entity", [])
        if isinstance(entity, list):
            entity.append(message)
        return
    node: object = fields
    for step, following in zip(steps, [*steps[1:], None], strict=True):
        fresh: object = [] if isinstance(following, int) else {}
        if isinstance(node, dict) and isinstance(step, str):
            if following is None:
                node[step] = message
                return
            node = node.setdefault(step, fresh)
        elif isinstance(node, list) and isinstance(step, int):
            node.extend([None] * (step + 1 - len(node)))
            if following is None:
                node[step] = message
                return
            if node[step] is None:
                node[step] = fresh
            node = node[step]
        else:
            return


def flatten(root: object) -> Document:
    """A declarative document as `deck` or a user writes it (nested routes, targets, snis, plugins;
    references by name) as the Admin API keeps it: one list per kind, references by id, every entity
    with an id and Kong's defaults. Raises ApiError (a schema violation) for what cannot be read."""
    if not isinstance(root, dict):
        raise schema_violation({"@entity": ["expected a mapping"]}, ["expected a mapping"])
    document = empty()
    ids: dict[tuple[str, str], str] = {}

    def add(kind: str, entity: object, path: str, references: dict[str, object]) -> None:
        if not isinstance(entity, dict):
            problem = f"{path}: expected a record"
            raise schema_violation({"@entity": [problem]}, [problem])
        entity = dict(entity)
        if kind == "services" and isinstance(entity.get("url"), str):
            entity = {**url_fields(str(entity.pop("url"))), **entity}
        nested = {key: entity.pop(key) for key in ("routes", "targets", "plugins")
                  if isinstance(entity.get(key), list) and not (kind == "routes" and key == "routes")}
        snis = entity.pop("snis", None) if kind == "certificates" else None
        entity.update(references)
        key = entity.get(KINDS[kind].endpoint_key or "") if KINDS[kind].endpoint_key else None
        if not isinstance(entity.get("id"), str):
            entity["id"] = kong_id(kind, key) if isinstance(key, str) and kind in (
                "services", "routes", "upstreams") else str(uuid.uuid4())
        full = {"id": entity.pop("id"), **copy.deepcopy(KINDS[kind].defaults), **entity}
        document[kind].append(full)
        for alias in (full["id"], key):
            if isinstance(alias, str):
                ids[(kind, alias)] = str(full["id"])
        own = {"services": "service", "routes": "route", "upstreams": "upstream"}.get(kind)
        for child_kind, children in nested.items():
            for index, child in enumerate(children):
                add(child_kind, child, f"{path}.{child_kind}[{index}]",
                    {own: {"id": full["id"]}} if own else {})
        for index, sni in enumerate(snis if isinstance(snis, list) else []):
            add("snis", {"name": sni} if isinstance(sni, str) else sni, f"{path}.snis[{index}]",
                {"certificate": {"id": full["id"]}})

    for kind in ("ca_certificates", "certificates", "snis", "upstreams", "targets", "services", "routes",
                 "plugins"):
        items = root.get(kind)
        for index, entity in enumerate(items if isinstance(items, list) else []):
            add(kind, entity, f"{kind}[{index}]", {})
    for kind in ORDER:                   # references by name become references by id
        for entity in document[kind]:
            for field_name, target in KINDS[kind].references.items():
                reference = entity.get(field_name)
                name = reference if isinstance(reference, str) else (
                    reference.get("id") or reference.get("name") if isinstance(reference, dict) else None)
                if isinstance(name, str) and (target, name) in ids:
                    entity[field_name] = {"id": ids[(target, name)]}
    return document
