"""YAML → plain Python values that remember the line where each was written.

The file is composed into PyYAML nodes (SafeLoader rules) and walked by hand, so that every mapping
knows the line of each of its keys and values and every list the line of each item. Everything that is
YAML-specific (tags, anchors, merge keys, syntax errors) stays in this module.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import yaml
from yaml.constructor import SafeConstructor
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode
from yaml.resolver import Resolver

from .errors import ConfigError, ConfigIssue, describe, item_path, key_path

_TAG = "tag:yaml.org,2002:"
_MAP_TAG = _TAG + "map"
_SEQ_TAG = _TAG + "seq"
_MERGE_TAG = _TAG + "merge"
_SCALAR_TAGS = {_TAG + name for name in ("str", "int", "float", "bool", "null", "timestamp", "binary")}

# Aliases let a small file expand into a huge tree ("billion laughs"); a real configuration is far below.
MAX_NODES = 1_000_000
MAX_DEPTH = 64


def _implicit_patterns() -> dict[str, list]:
    """For each scalar tag, the patterns a plain scalar must match to get that tag implicitly."""
    patterns: dict[str, list] = {}
    for resolvers in Resolver.yaml_implicit_resolvers.values():
        for tag, regexp in resolvers:
            patterns.setdefault(tag, []).append(regexp)
    return patterns


_IMPLICIT_PATTERNS = _implicit_patterns()


class YamlMap(dict):
    """A YAML mapping: a dict that also knows the line of the mapping, of each key and of each value."""

    def __init__(self, line: int):
        super().__init__()
        self.line = line
        self.key_lines: dict[object, int] = {}
        self.value_lines: dict[object, int] = {}


class YamlList(list):
    """A YAML sequence: a list that also knows its own line and the line of each item."""

    def __init__(self, line: int):
        super().__init__()
        self.line = line
        self.item_lines: list[int] = []


# What the loader returns: a YamlMap, a YamlList, or a scalar (str, int, float, bool, None, bytes, date).
YamlValue = object


@dataclass
class Document:
    """A parsed file: its root value, and the problems of single values (a duplicate key, an unknown tag)
    that did not stop the rest of the file from being read."""

    root: YamlValue
    issues: list[ConfigIssue] = field(default_factory=list)
    refused: set[str] = field(default_factory=set)    # key paths of values that read as None because of an issue


def read_document(path: str) -> Document:
    """Read and parse the YAML file at `path` (absolute); an empty file gives an empty YamlMap.

    Raises ConfigError for a file that cannot be read or is not YAML at all.
    """
    try:
        with open(path, "rb") as stream:
            data = stream.read()
    except FileNotFoundError:
        _fail(path, 1, "no such file")
    except IsADirectoryError:
        _fail(path, 1, "is a directory, not a configuration file")
    except OSError as error:
        _fail(path, 1, f"cannot read the file: {error.strerror or error}")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        _fail(path, data.count(b"\n", 0, error.start) + 1, f"not UTF-8 text (byte {data[error.start]:#04x})")

    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as error:
        _fail(path, _mark_line(error.problem_mark or error.context_mark), _describe_yaml_error(error))
    except yaml.reader.ReaderError as error:
        # Raised for characters YAML forbids (control characters); it carries an offset, not a mark.
        _fail(path, text.count("\n", 0, error.position) + 1, f"invalid YAML: {_reader_problem(error)}")
    except yaml.YAMLError as error:
        _fail(path, 1, f"invalid YAML: {error}")
    except RecursionError:
        # PyYAML composes nested collections recursively.
        _fail(path, 1, "invalid YAML: collections nested too deeply")
    if root is None:
        return Document(YamlMap(line=1))
    converter = _Converter(path)
    value = converter.convert(root, path="", depth=0)
    if converter.hopeless:
        raise ConfigError(converter.issues)
    return Document(value, converter.issues, converter.refused)


def _fail(path: str, line: int, message: str):
    raise ConfigError([ConfigIssue(path, line, "-", message)])


def _mark_line(mark) -> int:
    return mark.line + 1 if mark is not None else 1


def _describe_yaml_error(error: yaml.MarkedYAMLError) -> str:
    message = f"invalid YAML: {error.problem or error.context or 'syntax error'}"
    if error.problem and error.context:
        where = f" at line {_mark_line(error.context_mark)}" if error.context_mark is not None else ""
        message += f" ({error.context}{where})"
    return message


def _reader_problem(error: yaml.reader.ReaderError) -> str:
    character = error.character
    if isinstance(character, str):
        character = ord(character)
    return f"{error.reason} (character #x{character:04x})"


class _Converter:
    """Walks composed nodes into YamlMap / YamlList / scalars, collecting problems instead of raising."""

    def __init__(self, path: str):
        self.path = path
        self.issues: list[ConfigIssue] = []
        self.refused: set[str] = set()
        self.nodes_seen = 0
        self.hopeless = False                  # too big or too deep: not worth validating
        self.in_progress: set[int] = set()     # ids of collections being converted: a cycle means recursion
        self.constructor = SafeConstructor()

    def problem(self, node: Node, path: str, message: str) -> None:
        """Record a problem at the node's line."""
        self.issues.append(ConfigIssue(self.path, _mark_line(node.start_mark), path or "-", message))

    def refuse(self, node: Node, path: str, message: str) -> None:
        """Record a problem with a value that will read as None."""
        self.problem(node, path, message)
        self.refused.add(path)

    def convert(self, node: Node, path: str, depth: int) -> YamlValue:
        """The plain value of `node` (None where it has a problem); `path` is its key path, for messages."""
        self.nodes_seen += 1
        if self.nodes_seen > MAX_NODES:
            if not self.hopeless:
                self.problem(node, path, f"the document expands to more than {MAX_NODES} values (aliases?)")
                self.hopeless = True
            return None
        if depth > MAX_DEPTH:
            if not self.hopeless:
                self.problem(node, "-", f"collections nested more than {MAX_DEPTH} deep")
                self.hopeless = True
            return None
        if isinstance(node, ScalarNode):
            return self.scalar(node, path)
        if id(node) in self.in_progress:
            self.refuse(node, path, "an alias refers to a collection that contains it (recursive YAML)")
            return None
        self.in_progress.add(id(node))
        try:
            if isinstance(node, SequenceNode):
                return self.sequence(node, path, depth)
            return self.mapping(node, path, depth)
        finally:
            self.in_progress.discard(id(node))

    def scalar(self, node: ScalarNode, path: str) -> YamlValue:
        value, problem = self.construct_scalar(node)
        if problem is not None:
            self.refuse(node, path, problem)
        return value

    def construct_scalar(self, node: ScalarNode) -> tuple[YamlValue, Optional[str]]:
        """`(value, None)` for a scalar node SafeLoader would accept, else `(None, what is wrong)`."""
        if node.tag not in _SCALAR_TAGS:
            return None, f"unsupported YAML tag {node.tag!r}"
        patterns = _IMPLICIT_PATTERNS.get(node.tag)
        if patterns and not any(pattern.match(node.value) for pattern in patterns):
            return None, f"{describe(node.value)} is not a valid {node.tag.replace(_TAG, '!!')}"
        try:
            return self.constructor.construct_object(node, deep=True), None
        except (yaml.YAMLError, ValueError) as error:
            # PyYAML's constructors raise ValueError on some values its resolver accepted
            # (`0b_`, `2001-13-45`); both are the user's text being wrong, not a bug here.
            problem = getattr(error, "problem", None) or str(error)
            return None, f"invalid value {describe(node.value)}: {problem}"

    def sequence(self, node: SequenceNode, path: str, depth: int) -> YamlList:
        result = YamlList(_mark_line(node.start_mark))
        if node.tag != _SEQ_TAG:
            self.refuse(node, path, f"unsupported YAML tag {node.tag!r}")
            return result
        for index, item in enumerate(node.value):
            result.append(self.convert(item, item_path(path, index), depth + 1))
            result.item_lines.append(_mark_line(item.start_mark))
        return result

    def mapping(self, node: MappingNode, path: str, depth: int) -> YamlMap:
        result = YamlMap(_mark_line(node.start_mark))
        if node.tag != _MAP_TAG:
            self.refuse(node, path, f"unsupported YAML tag {node.tag!r}")
            return result
        merged: list[YamlMap] = []
        for key_node, value_node in node.value:
            if key_node.tag == _MERGE_TAG:
                merged.extend(self.merge_sources(value_node, path, depth))
                continue
            if not isinstance(key_node, ScalarNode):
                self.problem(key_node, path, "a mapping key must be a plain value, not a list or a mapping")
                continue
            key, problem = self.construct_scalar(key_node)
            if problem is not None:
                self.problem(key_node, path, f"bad key: {problem}")
                continue
            key_line = _mark_line(key_node.start_mark)
            if key in result.key_lines:
                self.problem(key_node, key_path(path, key),
                             f"duplicate key {describe(key)}: already set at line {result.key_lines[key]}")
                continue
            result[key] = self.convert(value_node, key_path(path, key), depth + 1)
            result.key_lines[key] = key_line
            result.value_lines[key] = _mark_line(value_node.start_mark)
        # YAML merge keys (`<<: *defaults`): keys written here win, then the first source listed.
        for source in merged:
            for key, value in source.items():
                if key not in result.key_lines:
                    result[key] = value
                    result.key_lines[key] = source.key_lines[key]
                    result.value_lines[key] = source.value_lines[key]
        return result

    def merge_sources(self, node: Node, path: str, depth: int) -> list[YamlMap]:
        """The mappings named by a `<<` merge key: one mapping or a list of them."""
        value = self.convert(node, path, depth + 1)
        sources = value if isinstance(value, YamlList) else [value]
        if not all(isinstance(source, YamlMap) for source in sources):
            self.problem(node, path, "a merge key (<<) takes a mapping or a list of mappings")
            return []
        return sources
