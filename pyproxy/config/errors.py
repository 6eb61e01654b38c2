"""What a bad configuration turns into: issues with a file, a line and a key path."""

from __future__ import annotations

import re
from dataclasses import dataclass

_SIMPLE_KEY = re.compile(r"[A-Za-z0-9_\-]+")


class Invalid(ValueError):
    """One value is wrong; the message says why. The validator adds the file, line and key."""


@dataclass(frozen=True)
class ConfigIssue:
    """One problem (or warning) found in the configuration file.

    `key` is a path such as `services[0].routes[1].snis[0]`, or empty for the file as a whole (its
    string then reads `FILE:LINE: message`).
    """

    file: str
    line: int
    key: str
    message: str

    def __str__(self) -> str:
        # One issue is one line of output, whatever a YAML message or a value may contain.
        message = " ".join(self.message.split("\n"))
        where = f"{self.file}:{self.line}: {self.key}" if self.key else f"{self.file}:{self.line}"
        return f"{where}: {message}"


class ConfigError(Exception):
    """The configuration cannot be used; `errors` lists every problem found, in file order."""

    def __init__(self, errors: list[ConfigIssue]):
        self.errors = list(errors)
        super().__init__("\n".join(str(issue) for issue in self.errors))

    def __str__(self) -> str:
        return "\n".join(str(issue) for issue in self.errors)


def key_path(parent: str, key: object) -> str:
    """The path of `key` inside the mapping at `parent` (`""` for the top level).

    A key that is not a plain word (spaces, dots, numbers…) is left out of the path so that a path is
    always one word; messages about such a key quote it.
    """
    if not isinstance(key, str) or not _SIMPLE_KEY.fullmatch(key):
        return parent
    return f"{parent}.{key}" if parent else key


def item_path(parent: str, index: int) -> str:
    """The path of item `index` of the list at `parent`."""
    return f"{parent}[{index}]"


def describe(value: object) -> str:
    """A value as a message shows it: `'abc'`, `12`, `true`, `null`, `a list`, `a mapping`."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, (list, tuple)):
        return "a list"
    if isinstance(value, int) and value.bit_length() > 64:
        return "a very large number"     # repr() of a huge int may even raise (int_max_str_digits)
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
