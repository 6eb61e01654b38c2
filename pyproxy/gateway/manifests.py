"""Kubernetes manifests from files: every object with the file and line it was written at.

Reads what `kubectl get -o yaml` (or `-o json`) writes and what people hand to `kubectl apply -f`:
multi-document YAML, JSON, `kind: List` (and `*List`) wrappers, and folders of such files. Nothing
here knows a kind's fields; `objects.py` does.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import marshal
import os
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import yaml

MANIFEST_SUFFIXES = (".yaml", ".yml", ".json")
# Cluster-scoped kinds pyproxy reads: they have no namespace. Every other kind defaults to `default`.
CLUSTER_SCOPED = ("GatewayClass", "Namespace", "IngressClass")

_Loader = yaml.CSafeLoader if yaml.__with_libyaml__ else yaml.SafeLoader


@dataclass(frozen=True)
class Notice:
    """A message about the input at a place: a malformed object, an ignored kind, a choice made."""

    file: str
    line: int
    message: str
    # The file, or its rest, could not be read: a source serving these files must not go on without it.
    unreadable: bool = field(default=False, compare=False)

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.message}"


@dataclass(frozen=True)
class Resource:
    """One Kubernetes object as read: its identity, its whole body, and where it was written."""

    kind: str
    api_version: str
    namespace: str                # "" for a cluster-scoped kind
    name: str
    body: dict[str, Any]
    file: str
    line: int

    @property
    def metadata(self) -> dict[str, Any]:
        metadata = self.body.get("metadata")
        return metadata if isinstance(metadata, dict) else {}

    @property
    def ref(self) -> str:
        """`Kind namespace/name` (`Kind name` when cluster-scoped), as messages name an object."""
        return f"{self.kind} {self.namespace}/{self.name}" if self.namespace else f"{self.kind} {self.name}"

    @property
    def age_key(self) -> tuple[str, str, str]:
        """Gateway API precedence: oldest `creationTimestamp` first, then namespace, then name.

        An object read from a file often has none: it sorts before every stamped one.
        """
        return (_timestamp(self.metadata.get("creationTimestamp")), self.namespace, self.name)

    def notice(self, message: str, field: str = "") -> Notice:
        where = f"{self.ref}: {field}: " if field else f"{self.ref}: "
        return Notice(self.file, self.line, where + message)


def _timestamp(value: object) -> str:
    """A creationTimestamp as comparable text (YAML reads an unquoted one as a datetime)."""
    if isinstance(value, datetime.datetime):
        if value.tzinfo is not None:
            value = value.astimezone(datetime.UTC).replace(tzinfo=None)
        return value.strftime("%Y-%m-%dT%H:%M:%SZ")
    return value if isinstance(value, str) else ""


def manifest_files(paths: Iterable[str]) -> Iterator[str]:
    """Each path, a folder standing for its `.yaml`, `.yml` and `.json` files (sorted, not recursive)."""
    for path in paths:
        if os.path.isdir(path):
            for entry in sorted(os.listdir(path)):
                full = os.path.join(path, entry)
                if entry.endswith(MANIFEST_SUFFIXES) and os.path.isfile(full):
                    yield full
        else:
            yield path


def read_paths(paths: Iterable[str], cache: str | None = None) -> tuple[list[Resource], list[Notice]]:
    """Every object in the files and folders at `paths`, in reading order, and what was wrong.

    A file that cannot be read or parsed is reported at the line of the problem; the objects read
    before it are kept. An object without `apiVersion`, `kind` or `metadata.name` is reported and
    skipped; the others are not affected.

    `cache`: a file where the documents of each manifest file are kept by a hash of its text, so that
    a reload parses only the files that changed (PyYAML builds 1,000 objects in about 0.5 s).
    """
    resources: list[Resource] = []
    notices: list[Notice] = []
    parsed = _ParseCache(cache)
    for path in manifest_files(paths):
        try:
            with open(path, encoding="utf-8-sig") as stream:
                text = stream.read()
        except (OSError, UnicodeDecodeError) as error:
            reason = getattr(error, "strerror", None) or error
            notices.append(Notice(path, 1, f"cannot read the file: {reason}", unreadable=True))
            continue
        for value, line in parsed.documents(path, text, notices):
            _collect(path, value, line, resources, notices)
    parsed.save()
    return resources, notices


class _ParseCache:
    """`{path: (hash of the text, [(document, line)], [(notice line, message, unreadable)])}` in a
    `marshal` file (exact types back, a thousand documents in milliseconds); a document marshal cannot
    hold (a datetime YAML made of an unquoted timestamp) leaves its file out. The file is private to
    pyproxy (gateway.runtime_dir, 0700; the file 0600: Secrets are in it) and written atomically; one
    that cannot be read is ignored. A file no longer read leaves it at the next save."""

    def __init__(self, path: str | None):
        self.path = path
        self.entries: dict[str, tuple[bytes, list[tuple[object, int]], list[tuple[int, str, bool]]]] = {}
        self.changed = False
        self.seen: set[str] = set()
        if path is None:
            return
        try:
            with open(path, "rb") as stream:
                version, entries = marshal.load(stream)
            if version == sys.version_info[:2] and isinstance(entries, dict):
                self.entries = entries
        except (OSError, EOFError, ValueError, TypeError):
            pass

    def documents(self, path: str, text: str, notices: list[Notice]) -> list[tuple[object, int]]:
        digest = hashlib.sha256(text.encode()).digest()
        self.seen.add(path)
        entry = self.entries.get(path)
        if entry is not None and entry[0] == digest:
            notices.extend(Notice(path, line, message, unreadable) for line, message, unreadable in entry[2])
            return entry[1]
        mine: list[Notice] = []
        documents = list(_documents(path, text, mine))
        notices.extend(mine)
        if self.path is not None:
            self.entries[path] = (digest, documents, [(n.line, n.message, n.unreadable) for n in mine])
            self.changed = True
        return documents

    def save(self) -> None:
        if self.path is None or not (self.changed or self.entries.keys() - self.seen):
            return
        for path, entry in list(self.entries.items()):
            try:
                if path not in self.seen:
                    raise ValueError("a file no longer read")
                marshal.dumps(entry)
            except ValueError:
                del self.entries[path]
        temporary = f"{self.path}.tmp"
        try:
            # 0600 in a 0700 folder: the documents include Secrets' keys, like the PEM files beside it.
            os.makedirs(os.path.dirname(self.path), mode=0o700, exist_ok=True)
            descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            with open(descriptor, "wb") as stream:
                marshal.dump((sys.version_info[:2], self.entries), stream)
            os.replace(temporary, self.path)
        except OSError:
            pass            # a cache: the next reload parses again


def _documents(path: str, text: str, notices: list[Notice]) -> Iterator[tuple[object, int]]:
    """`(document, line)` for each YAML document; a `List`'s items carry their own lines.

    JSON is YAML, with one exception YAML refuses: tabs that indent. Such a file is read as JSON,
    every object at line 1.
    """
    loader = _Loader(text)
    try:
        while loader.check_node():
            node = loader.get_node()
            if node is None:
                continue
            document = loader.construct_document(node)
            yield from _with_item_lines(document, node)
    except yaml.MarkedYAMLError as error:
        if text.lstrip().startswith(("{", "[")):
            try:
                yield json.loads(text), 1
                return
            except ValueError:
                pass
        mark = error.problem_mark or error.context_mark
        notices.append(Notice(path, mark.line + 1 if mark is not None else 1,
                              f"invalid YAML: {error.problem or error.context}; "
                              "the rest of the file is skipped", unreadable=True))
    except yaml.YAMLError as error:
        notices.append(Notice(path, 1, f"invalid YAML: {error}; the rest of the file is skipped",
                              unreadable=True))
    finally:
        loader.dispose()


def _with_item_lines(document: object, node: yaml.Node) -> Iterator[tuple[object, int]]:
    line = node.start_mark.line + 1
    if isinstance(document, dict) and isinstance(node, yaml.MappingNode) and _is_list(document):
        for key, value in node.value:
            if key.value == "items" and isinstance(value, yaml.SequenceNode):
                for item, item_node in zip(document["items"], value.value, strict=True):
                    yield item, item_node.start_mark.line + 1
                return
    yield document, line


def _is_list(document: dict[Any, Any]) -> bool:
    """A `kind: List` (what `kubectl get -o yaml` writes for several objects) or a typed `FooList`."""
    kind = document.get("kind")
    return isinstance(kind, str) and kind.endswith("List") and isinstance(document.get("items"), list)


def _collect(path: str, value: object, line: int, resources: list[Resource], notices: list[Notice]) -> None:
    if value is None:
        return                      # an empty document (`---` twice)
    if isinstance(value, dict) and _is_list(value):
        for item in value["items"]:     # a JSON List: no lines of its own
            _collect(path, item, line, resources, notices)
        return
    if not isinstance(value, dict):
        notices.append(Notice(path, line, "expected a Kubernetes object (a mapping with apiVersion, kind "
                                          "and metadata), got " + type(value).__name__))
        return
    kind, api_version = value.get("kind"), value.get("apiVersion")
    metadata = value.get("metadata")
    name = metadata.get("name") if isinstance(metadata, dict) else None
    required = (("apiVersion", api_version), ("kind", kind), ("metadata.name", name))
    missing = [field for field, given in required if not isinstance(given, str) or not given]
    if missing:
        notices.append(Notice(path, line, f"{kind if isinstance(kind, str) else 'object'}: "
                                          f"{', '.join(missing)} missing; the object is skipped"))
        return
    assert isinstance(kind, str) and isinstance(api_version, str) and isinstance(name, str)
    assert isinstance(metadata, dict)
    namespace = "" if kind in CLUSTER_SCOPED else metadata.get("namespace") or "default"
    if not isinstance(namespace, str):
        notices.append(Notice(path, line, f"{kind} {name}: metadata.namespace: expected text; "
                                          "the object is skipped"))
        return
    resources.append(Resource(kind, api_version, namespace, name, value, path, line))
