"""Reading YAML mappings against a schema: known keys, converted values, problems at the right place.

A `Report` collects every error and warning of one validation run; a `Section` reads one mapping,
reports its unknown keys, and converts its values, so that schema code reads as a list of fields.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TypeVar, overload

from .errors import ConfigIssue, Invalid, describe, item_path, key_path
from .loader import YamlList, YamlMap
from .model import Hostname
from .values import did_you_mean

T = TypeVar("T")
D = TypeVar("D")


@dataclass(frozen=True)
class Place:
    """Where a value was written: its key path and line."""

    path: str
    line: int


class Report:
    """The errors and warnings found in one configuration file, and the host names it writes (for
    pyproxy.config.prepare to resolve: validation does no DNS)."""

    def __init__(self, file: str):
        self.file = file
        self.errors: list[ConfigIssue] = []
        self.warnings: list[ConfigIssue] = []
        self.hostnames: list[Hostname] = []

    def error(self, place: Place, message: str) -> None:
        """Record a problem that makes the configuration unusable."""
        self.errors.append(ConfigIssue(self.file, place.line, place.path, message))

    def warn(self, place: Place, message: str) -> None:
        """Record something that works but deserves the user's attention."""
        self.warnings.append(ConfigIssue(self.file, place.line, place.path, message))

    def hostname(self, place: Place, host: str, port: int, service_host: bool = False) -> None:
        """Record the host name `host` written at `place`, to be resolved with `port`."""
        self.hostnames.append(Hostname(host, port, self.file, place.line, place.path, service_host))

    def section(self, place: Place, value: object, known: Iterable[str]) -> Section | None:
        """`value` as a Section with the keys `known`, or None (and an error) if it is not a mapping."""
        if not isinstance(value, YamlMap):
            self.error(place, f"expected a mapping, got {describe(value)}")
            return None
        return Section(self, place, value, tuple(known))

    def items(self, place: Place, value: object) -> list[tuple[Place, object]]:
        """The items of the list `value` with their places ([] and an error if it is not a list)."""
        if not isinstance(value, YamlList):
            self.error(place, f"expected a list, got {describe(value)}")
            return []
        return [(Place(item_path(place.path, index), line), item)
                for index, (item, line) in enumerate(zip(value, value.item_lines, strict=True))]

    def convert(self, place: Place, value: object, convert: Callable[[object], T]) -> T | None:
        """`convert(value)`, or None after reporting the Invalid it raised at `place`."""
        try:
            return convert(value)
        except Invalid as problem:
            self.error(place, str(problem))
            return None


class Section:
    """One YAML mapping read against the keys it may contain; unknown keys are reported at once."""

    def __init__(self, report: Report, place: Place, mapping: YamlMap, known: tuple[str, ...]):
        self.report = report
        self.place = place
        self.mapping = mapping
        for key in mapping:
            if key not in known:
                where = Place(key_path(place.path, key), mapping.key_lines[key])
                report.error(where, f"unknown key {describe(key)}{did_you_mean(key, known)}")

    def has(self, key: str) -> bool:
        """True when `key` is written with a value (`key: null` counts as absent)."""
        return self.mapping.get(key) is not None

    def place_of(self, key: str) -> Place:
        """Where the value of `key` is (the mapping's own line when the key is missing)."""
        line = self.mapping.value_lines.get(key, self.mapping.line)
        return Place(key_path(self.place.path, key), line)

    @overload
    def get(self, key: str, convert: Callable[[object], T], default: None = None,
            required: bool = False) -> T | None: ...
    @overload
    def get(self, key: str, convert: Callable[[object], T], default: D, required: bool = False) -> T | D: ...

    def get(self, key: str, convert: Callable[[object], T], default: D | None = None,
            required: bool = False) -> T | D | None:
        """The value of `key` passed through `convert`; `default` if it is absent or wrong."""
        value = self.mapping.get(key)
        if value is None:
            if required:
                self.report.error(self.place_of(key), "required key is missing")
            return default
        try:
            return convert(value)
        except Invalid as problem:
            self.report.error(self.place_of(key), str(problem))
            return default

    @overload
    def nested(self, key: str, build: Callable[[Report, Place, object], T]) -> T | None: ...
    @overload
    def nested(self, key: str, build: Callable[[Report, Place, object], T], default: D) -> T | D: ...

    def nested(self, key: str, build: Callable[[Report, Place, object], T],
               default: D | None = None) -> T | D | None:
        """`build(report, place, value)` for a key holding a structure; `default` if it is absent."""
        value = self.mapping.get(key)
        if value is None:
            return default
        return build(self.report, self.place_of(key), value)

    def items(self, key: str) -> list[tuple[Place, object]]:
        """The items, with their places, of the list under `key` ([] if it is absent)."""
        value = self.mapping.get(key)
        if value is None:
            return []
        return self.report.items(self.place_of(key), value)
