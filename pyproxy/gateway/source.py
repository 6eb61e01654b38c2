"""Gateway API manifests as a configuration source of a running pyproxy (issue 17, file mode).

The pyproxy file's `gateway` key names manifest files and folders; `GatewayManifests` is the source
(pyproxy.config.sources) that reads and translates them at each load:

    read_paths → translate → write the PEM files and the translated entities → validate_fragment

The translated entities are written as `translated.yaml` in `gateway.runtime_dir` and validated as
read from there, so an error in them names a line one can read (`dump_document` builds what reading
the file gives as it writes it, rather than parsing it back). A manifest file that cannot be
read or is not YAML fails the source, and with it the load: the running configuration keeps serving.
A malformed object is a warning (`FILE:LINE: Kind namespace/name: field: message`); the other
objects apply, and so does its last valid version if pyproxy read one (as the API server refuses a
bad `kubectl apply` and keeps the object as it was): every valid object read is kept in
`last-valid.json` in the runtime folder (0600: Secrets are among them), across reloads and restarts.

`manifest_state(paths)` is what the master polls to notice a changed, added or removed file.
"""

from __future__ import annotations

import datetime
import json
import os
from dataclasses import replace
from typing import Any

from pyproxy.config import Config, ConfigError, ConfigIssue
from pyproxy.config.loader import dump_document, read_document
from pyproxy.config.sources import Loaded, Warn
from pyproxy.config.validate import collector_paused, validate_fragment

from . import objects
from .manifests import Resource, manifest_files, read_paths
from .objects import Malformed
from .secrets import write_pem_files
from .translate import Options, StatusKey, translate

TRANSLATED = "translated.yaml"
LAST_VALID = "last-valid.json"
PARSED = "parsed.marshal"          # the manifest files' documents by their text's hash (read_paths)

# The order `-t --status` lists the objects in: a Gateway's class first, the routes after it.
KIND_ORDER = ("GatewayClass", "Gateway", "TCPRoute", "TLSRoute", "UDPRoute", "BackendTLSPolicy", "TCPIngress",
              "UDPIngress")
# One file's state as the master compares it: (path, mtime in ns, size); a folder's too (add, remove).
FileState = tuple[str, int, int]


class GatewayManifests:
    """The manifests the pyproxy file's `gateway` key names, as a source of entities, listeners and
    certificates (see the module docstring)."""

    def __init__(self, file: Config):
        assert file.gateway is not None, "a file without a gateway key names no manifests"
        self.file = file
        self.settings = file.gateway

    @property
    def name(self) -> str:
        return os.path.join(self.settings.runtime_dir, TRANSLATED)

    def load(self, warn: Warn) -> Loaded:
        with collector_paused():        # as the other sources load: see there
            return self._load(warn)

    def _load(self, warn: Warn) -> Loaded:
        resources, notices = read_paths(self.paths(), cache=os.path.join(self.settings.runtime_dir, PARSED))
        unreadable = [ConfigIssue(notice.file, notice.line, "", notice.message)
                      for notice in notices if notice.unreadable]
        if unreadable:
            return None, unreadable
        resources, last_valid, known = self._keep_last_valid(resources, warn)
        options = Options(controller_name=self.settings.controller_name, addresses=self.settings.addresses,
                          runtime_dir=self.settings.runtime_dir,
                          stream_listen=tuple(f"{listen}{' ssl' if listen.ssl else ''}"
                                              for listen in self.file.stream_listen),
                          status_listen=self.file.status_listen)
        translation = translate(resources, options, known)
        if warn is not None:
            for notice in notices + translation.notices:
                warn(str(notice))
        entities = {key: items for key, items in translation.entities.items() if items}
        text, document = dump_document(entities)
        files = {**translation.files, self.name: text.encode(),
                 os.path.join(self.settings.runtime_dir, LAST_VALID): last_valid}
        try:
            write_pem_files(files)
            _remove_stale_pem_files(self.settings.runtime_dir, files)
            if document is None:
                document = read_document(self.name)
        except OSError as exc:
            where = f' "{exc.filename}"' if exc.filename else ""
            return None, [ConfigIssue(self.file.path, self.settings.line, "gateway.runtime_dir",
                                      f"cannot write the translated manifests{where}: {exc.strerror or exc}")]
        except ConfigError as exc:
            return None, exc.errors
        fragment, errors = validate_fragment(self.name, document, self.file)
        if fragment is None:
            return None, errors
        versions = {_identity(resource): resource.api_version for resource in resources}
        return replace(fragment, gateway_status=kubectl_statuses(translation.statuses, versions)), errors

    def paths(self) -> tuple[str, ...]:
        """The manifests to read: with `gateway.kubernetes`, `paths` ends with the snapshot of the API
        server's objects (pyproxy.gateway.cluster), which does not exist until it was first read."""
        paths = self.settings.paths
        if self.settings.kubernetes is not None and not os.path.exists(paths[-1]):
            return paths[:-1]
        return paths

    def _keep_last_valid(self, resources: list[Resource],
                         warn: Warn) -> tuple[list[Resource], bytes, dict[int, objects.Parsed]]:
        """`resources` with each malformed object of a kind pyproxy reads replaced by its last valid
        version, when there is one (the translation reports and skips the others); the valid
        objects as `last-valid.json` will hold them; and what they parsed to, by their id()."""
        previous: dict[StatusKey, Resource] | None = None       # read at the first malformed object
        kept, valid = [], []
        known: dict[int, objects.Parsed] = {}
        for resource in resources:
            if resource.api_version in objects.API_VERSIONS.get(resource.kind, ()):
                try:
                    known[id(resource)] = objects.parse(resource)
                except Malformed as error:
                    if previous is None:
                        previous = self._last_valid()
                    last = previous.get(_identity(resource))
                    if last is None:
                        kept.append(resource)
                        continue
                    if warn is not None:
                        warn(str(resource.notice(f"{error.message}; its last valid version, read from "
                                                 f"{last.file}:{last.line}, is kept", error.field)))
                    resource = last
                valid.append(resource)
            kept.append(resource)
        return kept, json.dumps([vars(resource) for resource in valid], default=str).encode(), known

    def _last_valid(self) -> dict[StatusKey, Resource]:
        """The objects `last-valid.json` holds, by identity."""
        try:
            with open(os.path.join(self.settings.runtime_dir, LAST_VALID), "rb") as stream:
                return {_identity(resource): resource
                        for resource in (Resource(**fields) for fields in json.load(stream))}
        except (OSError, ValueError, TypeError):
            return {}           # none yet, or not ours: nothing to fall back on


def _remove_stale_pem_files(folder: str, files: dict[str, bytes]) -> None:
    """Remove the PEM files of Secrets and ConfigMaps that are gone or changed: a rotated key does not
    stay on disk. The running generation has its certificates in memory already."""
    for name in os.listdir(folder):
        path = os.path.join(folder, name)
        if name.startswith(("tls-", "ca-")) and name.endswith((".crt", ".key")) and path not in files:
            os.unlink(path)


def _identity(resource: Resource) -> StatusKey:
    return (resource.kind, resource.namespace, resource.name)


def kubectl_statuses(statuses: dict[StatusKey, dict[str, Any]],
                     versions: dict[StatusKey, str]) -> dict[StatusKey, dict[str, Any]]:
    """Each status inside its object's identity, as `kubectl get -o yaml` shows it, every condition
    stamped with `lastTransitionTime` now (the translation leaves it to the writer)."""
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")

    def stamped(value: Any) -> Any:
        """A copy of the dict or list `value`, its conditions stamped (scalars are not copied)."""
        if isinstance(value, dict):
            value = {key: stamped(item) if isinstance(item, (dict, list)) else item
                     for key, item in value.items()}
            if "type" in value and "reason" in value and "status" in value:
                value["lastTransitionTime"] = now
            return value
        return [stamped(item) if isinstance(item, (dict, list)) else item for item in value]

    objects = {}
    for key, status in statuses.items():
        kind, namespace, name = key
        metadata = {"name": name, "namespace": namespace} if namespace else {"name": name}
        objects[key] = {"apiVersion": versions.get(key, ""), "kind": kind, "metadata": metadata,
                        "status": stamped(status)}
    return objects


def status_list(config: Config) -> dict[str, Any]:
    """The statuses of `config` as one `kind: List`, GatewayClasses first, then Gateways, then routes."""
    def order(key: StatusKey) -> tuple[int, str, str]:
        kind, namespace, name = key
        return (KIND_ORDER.index(kind) if kind in KIND_ORDER else len(KIND_ORDER), namespace, name)

    return {"apiVersion": "v1", "kind": "List",
            "items": [config.gateway_status[key] for key in sorted(config.gateway_status, key=order)]}


def keep_transition_times(listing: dict[str, Any], previous: dict[str, Any] | None) -> dict[str, Any]:
    """`listing` (a `status_list`) with each condition whose status and reason are those it had in
    `previous` stamped with the time it had there: `lastTransitionTime` is when a condition last
    changed, not when it was last computed. Conditions are matched by object, by their place in
    the status (a listener by name, a route parent by parentRef, a policy ancestor by ancestorRef)
    and by type."""
    if not previous:
        return listing
    stamps: dict[str, tuple[object, object, object]] = {}

    def walk(value: Any, path: str, record: bool) -> Any:
        if isinstance(value, list):
            return [walk(item, f"{path}/{_item_key(item, index)}", record)
                    for index, item in enumerate(value)]
        if not isinstance(value, dict):
            return value
        if "type" in value and "lastTransitionTime" in value:
            key = f"{path}:{value['type']}"
            if record:
                stamps[key] = (value.get("status"), value.get("reason"), value["lastTransitionTime"])
                return value
            status, reason, stamp = stamps.get(key, (None, None, None))
            if (status, reason) == (value.get("status"), value.get("reason")):
                return {**value, "lastTransitionTime": stamp}
            return value
        return {key: walk(item, f"{path}.{key}", record) for key, item in value.items()}

    walk(previous.get("items", []), "", True)
    return {**listing, "items": walk(listing.get("items", []), "", False)}


def _item_key(item: Any, index: int) -> str:
    """What identifies a list item of a status across loads (its index when nothing else does)."""
    if isinstance(item, dict):
        for field in ("metadata", "name", "parentRef", "ancestorRef"):
            if field in item:
                return f"{item.get('kind', '')}{json.dumps(item[field], sort_keys=True)}"
    return str(index)


def manifest_state(paths: tuple[str, ...]) -> tuple[FileState, ...]:
    """What a change to the manifests changes: each path's and each manifest file's mtime and size
    (a folder's mtime changes when a file is added, removed or renamed in it). A path that cannot be
    read counts as (path, -1, -1)."""
    state = []
    for path in (*paths, *manifest_files(paths)):
        try:
            info = os.stat(path)
        except OSError:
            state.append((path, -1, -1))
        else:
            state.append((path, info.st_mtime_ns, info.st_size))
    return tuple(state)
