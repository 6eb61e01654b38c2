"""YAML → plain Python values that remember the line where each was written.

The parser's events are built by hand into dicts and lists (SafeLoader's rules), so that every mapping
knows the line of each of its keys and values and every list the line of each item. Everything that is
YAML-specific (tags, anchors, merge keys, syntax errors) stays in this module.

The events come from libyaml's parser (C) when PyYAML was built with it, as its wheels are: on a large
file that is several times faster than PyYAML's pure-Python parser, which is the fallback. Events rather
than PyYAML's composed nodes: a node tree holds two marks per value, and for a 50 MB file the tree
alone took gigabytes.
"""

from __future__ import annotations

import codecs
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NoReturn, Protocol

import yaml
from yaml.constructor import SafeConstructor
from yaml.nodes import ScalarNode
from yaml.resolver import Resolver

from .errors import ConfigError, ConfigIssue, describe, item_path, key_path

_TAG = "tag:yaml.org,2002:"
_MAP_TAG = _TAG + "map"
_SEQ_TAG = _TAG + "seq"
_MERGE_TAG = _TAG + "merge"
_STR_TAG = _TAG + "str"
_SCALAR_TAGS = {_TAG + name for name in ("str", "int", "float", "bool", "null", "timestamp", "binary")}
_NON_SPECIFIC_TAGS = (None, "!")     # no tag, or `!`: the tag is the collection's kind, or resolved

# Aliases let a small file expand into a huge tree ("billion laughs"); a real configuration is far below.
MAX_ALIASED_VALUES = 1_000_000
MAX_DEPTH = 64
# The largest file read. A dense file costs some 20 bytes of Python objects per byte while it is
# validated, and a configuration with 100,000 routes is under a tenth of this.
MAX_CONFIG_BYTES = 64 << 20

# libyaml's parser takes the file as UTF-8 bytes, PyYAML's own (the fallback) as text.
_LIBYAML = yaml.__with_libyaml__
_Parser = yaml.CSafeLoader if _LIBYAML else yaml.SafeLoader


class _Mark(Protocol):
    """A position in the file, as both parsers give it (yaml.error.Mark, libyaml's yaml._yaml.Mark)."""

    line: int
    column: int


def _implicit_patterns() -> dict[str, list[re.Pattern[str]]]:
    """For each scalar tag, the patterns a plain scalar must match to get that tag implicitly."""
    patterns: dict[str, list[re.Pattern[str]]] = {}
    for resolvers in Resolver.yaml_implicit_resolvers.values():
        for tag, regexp in resolvers:
            patterns.setdefault(tag, []).append(regexp)
    return patterns


_IMPLICIT_PATTERNS = _implicit_patterns()


def _resolvers_by_first_character() -> dict[str, tuple[tuple[str, re.Pattern[str]], ...]]:
    """SafeLoader's implicit resolvers, looked up by the first character of a plain scalar."""
    resolvers = Resolver.yaml_implicit_resolvers
    wildcard = tuple(resolvers.get(None, ()))
    return {first: tuple(pairs) + wildcard for first, pairs in resolvers.items() if first is not None}


_RESOLVERS = _resolvers_by_first_character()


def _scalar_tag(event: yaml.ScalarEvent) -> str:
    """The tag of a scalar: the one written, else SafeLoader's implicit one (int, bool, null…) for a
    plain scalar, else str."""
    tag = event.tag
    if tag is not None and tag not in _NON_SPECIFIC_TAGS:
        return tag
    if event.implicit[0]:
        for tag, pattern in _RESOLVERS.get(event.value[:1], ()):
            if pattern.match(event.value):
                return tag
    return _STR_TAG


class YamlMap(dict[Any, object]):
    """A YAML mapping: a dict that also knows the line of the mapping, of each key and of each value."""

    def __init__(self, line: int):
        super().__init__()
        self.line = line
        self.key_lines: dict[object, int] = {}
        self.value_lines: dict[object, int] = {}


class YamlList(list[object]):
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
    # Key paths of values that read as None because of an issue.
    refused: set[str] = field(default_factory=set)


def read_document(path: str) -> Document:
    """Read and parse the YAML file at `path` (absolute); an empty file gives an empty YamlMap.

    Raises ConfigError for a file that cannot be read, is larger than MAX_CONFIG_BYTES or is not YAML.
    """
    data = _read_file(path)
    bom = data.startswith(codecs.BOM_UTF8)
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        _fail(path, data.count(b"\n", 0, error.start) + 1, f"not UTF-8 text (byte {data[error.start]:#04x})")
    source = (data[len(codecs.BOM_UTF8):] if bom else data) if _LIBYAML else text
    del data

    builder = _Builder(path)
    try:
        root = builder.build(source)
    except yaml.MarkedYAMLError as error:
        _fail(path, _mark_line(error.problem_mark or error.context_mark), _describe_yaml_error(error, text),
              builder.where)
    except yaml.reader.ReaderError as error:
        # Raised for characters YAML forbids (control characters), possibly before the parser reaches
        # them; it carries an offset into the source (bytes for libyaml), not a mark.
        if isinstance(source, bytes):
            line = source.count(b"\n", 0, error.position) + 1
        else:
            line = source.count("\n", 0, error.position) + 1
        _fail(path, line, f"invalid YAML: {_reader_problem(error)}",
              _Builder(path).last_path(source[:error.position]))
    except yaml.YAMLError as error:
        _fail(path, 1, f"invalid YAML: {error}")
    except _GiveUp:
        raise ConfigError(builder.issues) from None
    if root is None:
        return Document(YamlMap(line=1))
    return Document(root, builder.issues, builder.refused)


def _read_file(path: str) -> bytes:
    """The bytes of the file at `path`, at most MAX_CONFIG_BYTES of them (ConfigError if there are more)."""
    try:
        with open(path, "rb") as stream:
            data = stream.read(MAX_CONFIG_BYTES + 1)
    except FileNotFoundError:
        _fail(path, 1, "no such file")
    except IsADirectoryError:
        _fail(path, 1, "is a directory, not a configuration file")
    except OSError as error:
        _fail(path, 1, f"cannot read the file: {error.strerror or error}")
    if len(data) > MAX_CONFIG_BYTES:
        _fail(path, 1, f"the file is larger than {MAX_CONFIG_BYTES >> 20} MiB, the most pyproxy reads "
                       "as a configuration file")
    return data


def _fail(path: str, line: int, message: str, key: str = "") -> NoReturn:
    raise ConfigError([ConfigIssue(path, line, key, message)])


def _mark_line(mark: _Mark | None) -> int:
    return mark.line + 1 if mark is not None else 1


def _describe_yaml_error(error: yaml.MarkedYAMLError, text: str) -> str:
    if _character_at(text, error.problem_mark) == "\t":
        # Both parsers' words for this ("found character that cannot start any token") hide the cause.
        return "invalid YAML: a tab character cannot indent YAML: use spaces"
    message = f"invalid YAML: {error.problem or error.context or 'syntax error'}"
    if error.problem and error.context:
        where = f" at line {_mark_line(error.context_mark)}" if error.context_mark is not None else ""
        message += f" ({error.context}{where})"
    return message


def _character_at(text: str, mark: _Mark | None) -> str:
    """The character at a mark's line and column ('' when there is none)."""
    if mark is None:
        return ""
    start = 0
    for _ in range(mark.line):
        start = text.find("\n", start) + 1
        if start == 0:
            return ""
    return text[start + mark.column:start + mark.column + 1]


def _reader_problem(error: yaml.reader.ReaderError) -> str:
    character = error.character
    if isinstance(character, str):
        character = ord(character)
    return f"{error.reason} (character #x{character:04x})"


class _GiveUp(Exception):
    """The document is too big or too deep to be worth validating (the problem is in the issues)."""


@dataclass
class _Anchor:
    value: YamlValue = None
    size: int | None = None     # the values it stands for, None while its collection is being read


class _Builder:
    """Builds YamlMap / YamlList / scalars from the parser's events, collecting problems instead of raising.

    A recursive descent: each method reads the events of one node. `where` follows the key path being
    read, so that a syntax error the parser raises midway is reported there.
    """

    def __init__(self, path: str):
        self.path = path
        self.issues: list[ConfigIssue] = []
        self.refused: set[str] = set()
        self.where = ""           # key path of the value being read
        self.last = ""            # key path of the last node started
        self.anchors: dict[str, _Anchor] = {}
        self.values = 0           # values read, an alias counting the values it stands for
        self.aliased = 0          # of which through aliases
        self.constructor = SafeConstructor()
        self.next_event: Callable[[], yaml.Event] = _no_parser

    def build(self, source: str | bytes) -> YamlValue:
        """The root value of the one document in `source` (None for an empty stream)."""
        parser = _Parser(source)
        # get_event is typed to return None too: only once the stream ended, past the StreamEndEvent
        # after which build() reads nothing more.
        self.next_event = parser.get_event  # type: ignore[assignment]
        try:
            self.next_event()                                   # StreamStart
            if isinstance(self.next_event(), yaml.StreamEndEvent):
                return None
            root = self.node(self.next_event(), "", 0)          # after DocumentStart
            self.next_event()                                   # DocumentEnd
            event = self.next_event()
        finally:
            parser.dispose()
        if not isinstance(event, yaml.StreamEndEvent):
            raise ConfigError([ConfigIssue(self.path, _mark_line(event.start_mark), "",
                                           "invalid YAML: a second document (---) in the file")])
        return root

    def last_path(self, source: str | bytes) -> str:
        """The key path of the last node `source` starts: where the file stops being readable."""
        try:
            self.build(source)
        except (yaml.YAMLError, ConfigError, _GiveUp):
            return self.where
        return self.last

    def problem(self, event: yaml.Event, path: str, message: str) -> None:
        """Record a problem at the event's line."""
        self.issues.append(ConfigIssue(self.path, _mark_line(event.start_mark), path, message))

    def refuse(self, event: yaml.Event, path: str, message: str) -> None:
        """Record a problem with a value that will read as None."""
        self.problem(event, path, message)
        self.refused.add(path)

    def give_up(self, event: yaml.Event, path: str, message: str) -> NoReturn:
        self.problem(event, path, message)
        raise _GiveUp()

    def node(self, event: yaml.Event, path: str, depth: int) -> YamlValue:
        """The value whose first event is `event` (None where it has a problem); `path` is its key path."""
        self.last = path
        if isinstance(event, yaml.AliasEvent):
            return self.alias(event, path)
        if depth > MAX_DEPTH:
            self.give_up(event, "", f"collections nested more than {MAX_DEPTH} deep")
        self.values += 1
        first = self.values
        anchor = None
        if isinstance(event, yaml.NodeEvent) and event.anchor is not None:
            anchor = self.anchors[event.anchor] = _Anchor()
        value: YamlValue
        if isinstance(event, yaml.ScalarEvent):
            value = self.scalar(event, path)
        elif isinstance(event, yaml.SequenceStartEvent):
            value = self.sequence(event, path, depth)
        elif isinstance(event, yaml.MappingStartEvent):
            value = self.mapping(event, path, depth)
        else:       # the parsers start a node with one of the events above, and nothing else
            raise AssertionError(f"unexpected YAML event {event!r} at {path!r}")
        if anchor is not None:
            anchor.value, anchor.size = value, self.values - first + 1
        return value

    def alias(self, event: yaml.AliasEvent, path: str) -> YamlValue:
        """What the anchor stands for: the very value built where it was written."""
        anchor = self.anchors.get(event.anchor) if event.anchor is not None else None
        if anchor is None:
            self.refuse(event, path, f"no anchor named {event.anchor!r} before this alias")
            return None
        if anchor.size is None:
            self.refuse(event, path, "an alias refers to a collection that contains it (recursive YAML)")
            return None
        self.values += anchor.size
        self.aliased += anchor.size
        if self.aliased > MAX_ALIASED_VALUES:
            self.give_up(event, path, f"the document expands to more than {MAX_ALIASED_VALUES} values "
                                      "through aliases")
        return anchor.value

    def scalar(self, event: yaml.ScalarEvent, path: str) -> YamlValue:
        value, problem = self.construct_scalar(event)
        if problem is not None:
            self.refuse(event, path, problem)
        return value

    def construct_scalar(self, event: yaml.ScalarEvent) -> tuple[YamlValue, str | None]:
        """`(value, None)` for a scalar SafeLoader would accept, else `(None, what is wrong)`."""
        tag = _scalar_tag(event)
        if tag == _STR_TAG:
            return event.value, None       # most scalars: SafeConstructor keeps the text as it is
        if tag not in _SCALAR_TAGS:
            return None, f"unsupported YAML tag {tag!r}"
        patterns = _IMPLICIT_PATTERNS.get(tag)
        if patterns and not any(pattern.match(event.value) for pattern in patterns):
            return None, f"{describe(event.value)} is not a valid {tag.replace(_TAG, '!!')}"
        # libyaml's marks (yaml._yaml.Mark) serve as well as PyYAML's; its stubs only name the latter.
        node = ScalarNode(tag, event.value, event.start_mark, event.end_mark,  # type: ignore[arg-type]
                          event.style)
        try:
            return self.constructor.yaml_constructors[tag](self.constructor, node), None
        except (yaml.YAMLError, ValueError) as error:
            # PyYAML's constructors raise ValueError on some values its resolver accepted
            # (`0b_`, `2001-13-45`); both are the user's text being wrong, not a bug here.
            problem = getattr(error, "problem", None) or str(error)
            return None, f"invalid value {describe(event.value)}: {problem}"

    def refuse_tag(self, event: yaml.CollectionStartEvent, path: str, tag: str) -> bool:
        """True (after refusing the value) when a collection is tagged other than `tag`."""
        if event.tag in _NON_SPECIFIC_TAGS or event.tag == tag:
            return False
        self.refuse(event, path, f"unsupported YAML tag {event.tag!r}")
        return True

    def sequence(self, start: yaml.SequenceStartEvent, path: str, depth: int) -> YamlList:
        result = YamlList(_mark_line(start.start_mark))
        refused = self.refuse_tag(start, path, _SEQ_TAG)
        while True:
            self.where = path
            event = self.next_event()
            if isinstance(event, yaml.SequenceEndEvent):
                return YamlList(result.line) if refused else result
            result.append(self.node(event, item_path(path, len(result)), depth + 1))
            result.item_lines.append(_mark_line(event.start_mark))

    def mapping(self, start: yaml.MappingStartEvent, path: str, depth: int) -> YamlMap:
        result = YamlMap(_mark_line(start.start_mark))
        refused = self.refuse_tag(start, path, _MAP_TAG)
        merged: list[YamlMap] = []
        while True:
            self.where = path
            event = self.next_event()
            if isinstance(event, yaml.MappingEndEvent):
                break
            key, is_merge = self.key(event, path, depth)
            value_path = path if key is _NO_KEY else key_path(path, key)
            self.where = value_path
            value_event = self.next_event()
            if is_merge:
                merged.extend(self.merge_sources(value_event, path, depth))
                continue
            if key is not _NO_KEY and key in result.key_lines:
                self.problem(event, value_path,
                             f"duplicate key {describe(key)}: already set at line {result.key_lines[key]}")
                key = _NO_KEY
            value = self.node(value_event, value_path, depth + 1)    # read even when it is not kept
            if key is not _NO_KEY:
                result[key] = value
                result.key_lines[key] = _mark_line(event.start_mark)
                result.value_lines[key] = _mark_line(value_event.start_mark)
        if refused:
            return YamlMap(result.line)
        # YAML merge keys (`<<: *defaults`): keys written here win, then the first source listed.
        for source in merged:
            for key, value in source.items():
                if key not in result.key_lines:
                    result[key] = value
                    result.key_lines[key] = source.key_lines[key]
                    result.value_lines[key] = source.value_lines[key]
        return result

    def key(self, event: yaml.Event, path: str, depth: int) -> tuple[object, bool]:
        """`(key, is a merge key)` for a key whose first event is `event`; _NO_KEY if it cannot be one."""
        if isinstance(event, yaml.ScalarEvent):
            if _scalar_tag(event) == _MERGE_TAG:
                return _NO_KEY, True
            key, problem = self.construct_scalar(event)
            if problem is not None:
                self.problem(event, path, f"bad key: {problem}")
                return _NO_KEY, False
            return key, False
        key = self.node(event, path, depth + 1)      # an alias, or a collection to read past
        if isinstance(key, (YamlMap, YamlList)):
            self.problem(event, path, "a mapping key must be a plain value, not a list or a mapping")
            return _NO_KEY, False
        return (key, False) if key is not None else (_NO_KEY, False)

    def merge_sources(self, event: yaml.Event, path: str, depth: int) -> list[YamlMap]:
        """The mappings named by a `<<` merge key: one mapping or a list of them."""
        value = self.node(event, path, depth + 1)
        sources = value if isinstance(value, YamlList) else [value]
        mappings = [source for source in sources if isinstance(source, YamlMap)]
        if len(mappings) != len(sources):
            self.problem(event, path, "a merge key (<<) takes a mapping or a list of mappings")
            return []
        return mappings


_NO_KEY = object()      # a mapping entry whose key is unusable: its value is read and dropped


def _no_parser() -> yaml.Event:
    raise RuntimeError("no YAML document is being read")


# --- writing -------------------------------------------------------------------------------------

# PyYAML's emitter when it has libyaml's (10x faster than its Python one).
_Dumper = yaml.CSafeDumper if _LIBYAML else yaml.SafeDumper
_WIDTH = 1 << 16        # no line of a dumped file is folded
# A string yaml.dump writes as it is (plain) when no implicit tag resolves it (it is not `true`, `1.5`,
# a date…): these characters (no indicator first), no `:` before a space or last, no space last or twice.
_PLAIN = re.compile(r"[A-Za-z0-9_/][A-Za-z0-9_/.: -]*")
# The longest string dump_document writes itself: yaml.dump may fold a longer one, where it is written.
_MAX_STRING = 1000


def dump_document(root: dict[str, Any]) -> tuple[str, Document | None]:
    """`root` as YAML text, as `yaml.dump(root, sort_keys=False)` writes it (lines never folded), and
    the Document `read_document` reads from that text, built as the text is written rather than
    parsed back. The Document is None when `root` holds what this does not write itself (a value
    other than a dict, list, str, int, bool or None; an empty root; a list or dict in two places,
    which yaml.dump anchors; a key yaml.dump quotes, a long string): read the file written."""
    lines: list[str] = []
    try:
        if root:
            document = Document(_Writer(lines).mapping(root, 0, ""))
            lines.append("")
            return "\n".join(lines), document
    except _NotWritten:
        pass
    return yaml.dump(root, Dumper=_Dumper, sort_keys=False, width=_WIDTH), None


class _NotWritten(Exception):
    """A value dump_document leaves to yaml.dump."""


class _Writer:
    """Block-style YAML into `lines`, as PyYAML's emitter lays it out: a mapping's keys one a line, a
    list's items under its key (not indented), the first key of a mapping in a list on the item's line,
    empty collections as `{}` and `[]`."""

    def __init__(self, lines: list[str]):
        self.lines = lines
        self.quoted: dict[str, str] = {}     # what yaml.dump wrote for the strings not written plain
        self.seen: set[int] = set()     # id() of the lists and dicts written

    def mapping(self, value: dict[str, Any], indent: int, prefix: str) -> YamlMap:
        """Write `value` at `indent`, its first key after `prefix` (what its line starts with)."""
        self.once(value)
        result = YamlMap(len(self.lines) + 1)
        for key, item in value.items():
            line = len(self.lines) + 1
            # Plain keys only: yaml.dump writes a long key, or one on two lines, otherwise.
            if not (isinstance(key, str) and len(key) < 128 and self.scalar(key) == key):
                raise _NotWritten(key)
            head = f"{prefix}{key}:"
            prefix = " " * indent
            result.key_lines[key] = line
            if type(item) is dict and item:
                self.lines.append(head)
                result[key] = self.mapping(item, indent + 2, " " * (indent + 2))
                result.value_lines[key] = line + 1
            elif type(item) is list and item:
                self.lines.append(head)
                result[key] = self.sequence(item, indent, prefix)
                result.value_lines[key] = line + 1
            else:
                result[key] = self.flow(item, head + " ", line)
                result.value_lines[key] = line
        return result

    def sequence(self, value: list[object], indent: int, prefix: str) -> YamlList:
        """Write `value`'s items at `indent`, the first after `prefix`."""
        self.once(value)
        result = YamlList(len(self.lines) + 1)
        for item in value:
            line = len(self.lines) + 1
            head = f"{prefix}- "
            prefix = " " * indent
            if type(item) is dict and item:
                result.append(self.mapping(item, indent + 2, head))
            elif type(item) is list and item:
                result.append(self.sequence(item, indent + 2, head))
            else:
                result.append(self.flow(item, head, line))
            result.item_lines.append(line)
        return result

    def flow(self, value: object, head: str, line: int) -> object:
        """Write a scalar or an empty collection on one line after `head`; what reading it gives."""
        if type(value) is dict:
            self.once(value)
            self.lines.append(head + "{}")
            return YamlMap(line)
        if type(value) is list:
            self.once(value)
            self.lines.append(head + "[]")
            return YamlList(line)
        text = self.scalar(value)
        if text is None:
            raise _NotWritten(value)
        self.lines.append(head + text)
        return value

    def once(self, value: object) -> None:
        if id(value) in self.seen:
            raise _NotWritten(value)
        self.seen.add(id(value))

    def scalar(self, value: object) -> str | None:
        """How yaml.dump writes a str, int, bool or None on one line (None for another value, a
        string longer than _MAX_STRING, or one it writes on several lines)."""
        kind = type(value)
        if kind is not str:
            if value is None:
                return "null"
            if kind is bool:
                return "true" if value else "false"
            return str(value) if kind is int else None
        assert isinstance(value, str)
        if len(value) > _MAX_STRING:
            return None
        if (_PLAIN.fullmatch(value) and not value.endswith((":", " "))
                and ": " not in value and "  " not in value
                and not any(pattern.match(value) for _, pattern in _RESOLVERS.get(value[0], ()))):
            return value
        text = self.quoted.get(value)
        if text is None:
            dumped = yaml.dump([value], Dumper=_Dumper, width=_WIDTH)
            if not dumped.startswith("- ") or dumped.count("\n") != 1:
                return None
            text = self.quoted[value] = dumped[2:-1]
        return text
