"""`dump_document` writes what yaml.dump writes, and gives what `read_document` reads from it (issue 17:
the Gateway API source's translated.yaml is no longer parsed back)."""

from __future__ import annotations

import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from pyproxy.config.loader import YamlList, YamlMap, dump_document, read_document

DUMPER = yaml.CSafeDumper if yaml.__with_libyaml__ else yaml.SafeDumper


def lines_and_values(value: object) -> object:
    """`value` with the lines a YamlMap or YamlList knows, comparable with ==."""
    if isinstance(value, YamlMap):
        return ("map", value.line, value.key_lines, value.value_lines,
                [(key, lines_and_values(item)) for key, item in value.items()])
    if isinstance(value, YamlList):
        return ("list", value.line, value.item_lines, [lines_and_values(item) for item in value])
    return (type(value), value)


def read_back(tmp_path, text: str) -> object:
    path = tmp_path / "dumped.yaml"
    path.write_text(text)
    document = read_document(str(path))
    assert document.issues == [] and document.refused == set()
    return lines_and_values(document.root)


def same_as_yaml_dump(tmp_path, root: dict) -> bool:
    """dump_document's text is yaml.dump's; its Document (when it built one) is what reading that
    text gives. True when it built the Document."""
    text, document = dump_document(root)
    assert text == yaml.dump(root, Dumper=DUMPER, sort_keys=False, width=1 << 16)
    if document is None:
        return False
    assert lines_and_values(document.root) == read_back(tmp_path, text)
    return True


# Strings yaml.dump writes plain, quoted (indicators, implicit types, spaces, `: `, ` #`), escaped.
STRINGS = ["name", "k8s.default.one.1025", "/run/tls-0a1b.crt", "127.0.0.1:20400 ssl", "r1.bench.example",
           "*.example.com", "yes", "no", "on", "null", "~", "true", "1.5", "0x1f", "1_000", "2001-01-01", "",
           "a b", "a  b", " a", "a ", "a: b", "a:", "a:b", "a #b", "a#b", "#a", "-a", "- a", ".a", "---",
           "it's", "'q'", '"q"', "%x", "@x", "`x", "!x", "&x", "|", ">", "?", "[x]", "{x}", "a,b", "é", "\t",
           "\x7f", "a\nb", "a\\b", "x" * 1001, "x " * 600, "=", "<<"]


def test_nested_mappings_and_lists_read_back_with_the_same_lines(tmp_path):
    root = {"services": [{"name": "a", "listen": [443, 8443], "tls": {"verify": True, "ca": None},
                          "empty": [], "none": {}},
                         [1, [2, 3], {"h": None}, [], {}],
                         {"deep": {"deeper": {"deepest": [{"w": False}, "x"]}}}],
            "strings": [string for string in STRINGS if "\n" not in string and len(string) < 1000],
            "upstreams": {"u": [{"target": "127.0.0.1:1"}]}}
    assert same_as_yaml_dump(tmp_path, root)


def test_what_it_does_not_write_itself_is_read_back_from_yaml_dump(tmp_path):
    shared = {"a": 1}
    for root in ({}, {"x": [shared, shared]}, {"x": "a\nb"}, {"x": "x" * 1001}, {"x": 1.5},
                 {"#a": 1}, {"yes": 1}, {"x" * 128: 1}, {"x": {1: 2}}):
        assert not same_as_yaml_dump(tmp_path, root)


KEYS = st.sampled_from(["a", "name", "snis", "listen", "cert", "x-y", "k8s.io/name", "yes", "a b", "1"])
SCALARS = (st.sampled_from(STRINGS) | st.text(st.sampled_from("ab:#- ./'\"*1é\n"), max_size=6)
           | st.integers() | st.booleans() | st.none())
VALUES = st.recursive(SCALARS, lambda children: st.lists(children, max_size=4)
                      | st.dictionaries(KEYS, children, max_size=4), max_leaves=25)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(KEYS, VALUES, min_size=1, max_size=4))
def test_any_document_reads_back_as_it_is_written(tmp_path_factory, root):
    same_as_yaml_dump(tmp_path_factory.mktemp("dump"), root)
