"""Hypothesis: whatever the file holds, load_config returns a Config or raises a ConfigError whose every
issue reads `FILE:LINE: key: message` (`FILE:LINE: message` for the file as a whole) — never any other
exception. And whatever loads, `pyproxy -T`'s dump of it loads again into the same Config."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import pyproxy.dns
from pyproxy.config import Config, ConfigError, config_as_yaml, load_config
from pyproxy.config.model import Answer
from tests.unit.test_config import EXAMPLE, make_certificate
from tests.unit.test_config_dump import without_places

ISSUE = re.compile(r"^.+:\d+: (\S+: )?.+$")
EXAMPLE_DOCUMENT = yaml.safe_load(EXAMPLE)
FUZZ_SETTINGS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _all_keys(value) -> set:
    if isinstance(value, dict):
        return set(value) | {key for item in value.values() for key in _all_keys(item)}
    if isinstance(value, list):
        return {key for item in value for key in _all_keys(item)}
    return set()


KEYS = [*sorted(_all_keys(EXAMPLE_DOCUMENT)), "fail_timeout", "send", "expect", "ip", "port", "snis"]
INTERESTING_WORDS = [
    "auto", "off", "on", "tcp", "tls", "tls_passthrough", "v1", "v2", "10.0.0.0/8", "*.example", "example.*",
    "a.*.b", "*", "1m30s", "500ms", "-5s", "[::1]:80", "[::]:9000", "127.0.0.1:1025", "0.0.0.0:9000 ssl",
    "127.0.0.1:9000 backlog=-1", "echo-upstream", "echo", "echo-plaintext", "certs/default.crt",
    "certs/default.key", "certs", "/", "", "$foo", "${route", "nobody", "TLSv1", "HIGH", "\0", "a" * 300,
]

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-2**40, max_value=2**70), st.floats(),
    st.text(max_size=12), st.sampled_from(INTERESTING_WORDS),
)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=3)
    | st.dictionaries(st.one_of(st.sampled_from(KEYS), st.text(max_size=6), st.integers()), inner,
                      max_size=3),
    max_leaves=6,
)


def _slots(value, path=()):
    """Every (container path, key or index) in a document, depth first."""
    if isinstance(value, dict):
        items = list(value.items())
    elif isinstance(value, list):
        items = list(enumerate(value))
    else:
        return
    for key, item in items:
        yield path, key
        yield from _slots(item, (*path, key))


def _at(document, path):
    for key in path:
        document = document[key]
    return document


@st.composite
def mutated_documents(draw):
    """The SPEC example with one to four keys or values deleted, replaced, re-typed, renamed or copied."""
    document = copy.deepcopy(EXAMPLE_DOCUMENT)
    for _ in range(draw(st.integers(min_value=1, max_value=4))):
        slots = list(_slots(document))
        if not slots:
            break
        path, key = draw(st.sampled_from(slots))
        container = _at(document, path)
        operation = draw(st.sampled_from(["delete", "replace", "retype", "rename", "copy"]))
        if operation == "delete":
            del container[key]
        elif operation == "replace":
            container[key] = draw(values)
        elif operation == "retype":
            value = container[key]
            container[key] = draw(st.sampled_from([[value], {"x": value}, str(value), None, 0, "", []]))
        elif operation == "rename" and isinstance(container, dict):
            new_key = draw(st.one_of(st.sampled_from(KEYS), st.text(max_size=8)))
            container[new_key] = container.pop(key)
        elif operation == "copy" and isinstance(container, list):
            container.insert(key, copy.deepcopy(container[key]))
    return document


@st.composite
def mutated_texts(draw):
    """The SPEC example's text with lines deleted, copied or swapped and random text inserted."""
    lines = EXAMPLE.splitlines(keepends=True)
    for _ in range(draw(st.integers(min_value=1, max_value=3))):
        index = draw(st.integers(min_value=0, max_value=len(lines) - 1))
        operation = draw(st.sampled_from(["delete", "copy", "swap", "insert", "indent"]))
        if operation == "delete" and len(lines) > 1:
            del lines[index]
        elif operation == "copy":
            lines.insert(index, lines[index])
        elif operation == "swap":
            other = draw(st.integers(min_value=0, max_value=len(lines) - 1))
            lines[index], lines[other] = lines[other], lines[index]
        elif operation == "insert":
            line = lines[index]
            column = draw(st.integers(min_value=0, max_value=len(line)))
            lines[index] = line[:column] + draw(st.text(max_size=8)) + line[column:]
        elif operation == "indent":
            lines[index] = draw(st.sampled_from([" ", "  ", "\t", "- "])) + lines[index]
    return "".join(lines)


@pytest.fixture(scope="module")
def example_dir(tmp_path_factory) -> Path:
    """A folder with the certificates the SPEC example names."""
    folder = tmp_path_factory.mktemp("fuzz")
    (folder / "certs").mkdir()
    make_certificate(folder / "certs", "default", "default.example", ("default.example",))
    make_certificate(folder / "certs", "tls9443.kong.example", "tls9443.kong.example",
                     ("tls9443.kong.example",))
    return folder


@pytest.fixture(scope="module", autouse=True)
def no_dns():
    """Mutations turn addresses into host names: answer them all "unknown", fast and without a network."""
    def refuse(hosts, settings, timeout=10.0):
        return {host: Answer(error="not found (NXDOMAIN)", not_found=True) for host in hosts}
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(pyproxy.dns, "resolve_now", refuse)
        yield


def assert_config_or_clean_errors(path: Path) -> Config | None:
    """The Config at `path`, or None after checking the shape of every error."""
    warnings: list[str] = []
    config = None
    try:
        config = load_config(str(path), warn=warnings.append)
    except ConfigError as error:
        assert error.errors, "a ConfigError must list at least one issue"
        for issue in error.errors:
            # "-" is the key of an issue that names none, unless the file's own key is "-".
            own_key = "unknown key '-'" in issue.message
            assert ISSUE.match(str(issue)) and (issue.key != "-" or own_key), str(issue)
    else:
        assert isinstance(config, Config)
        hash(config)        # frozen all the way down
    for warning in warnings:
        assert ISSUE.match(warning), warning
    return config


def assert_dump_loads_the_same(config: Config, folder: Path) -> None:
    dumped = folder / "dumped.conf"
    dumped.write_text(config_as_yaml(config))
    assert without_places(load_config(str(dumped))) == without_places(config), dumped.read_text()


def test_the_unmutated_example_loads(example_dir: Path):
    (example_dir / "pyproxy.conf").write_text(EXAMPLE)
    assert isinstance(load_config(str(example_dir / "pyproxy.conf")), Config)


@FUZZ_SETTINGS
@given(document=mutated_documents())
def test_mutated_documents(example_dir: Path, document):
    path = example_dir / "pyproxy.conf"
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    config = assert_config_or_clean_errors(path)
    if config is not None:
        assert_dump_loads_the_same(config, example_dir)


@FUZZ_SETTINGS
@given(text=mutated_texts())
def test_mutated_text(example_dir: Path, text: str):
    path = example_dir / "pyproxy.conf"
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    assert_config_or_clean_errors(path)


@settings(max_examples=100, deadline=None)
@given(document=values)
def test_random_documents(example_dir: Path, document):
    path = example_dir / "pyproxy.conf"
    path.write_text(yaml.safe_dump(document))
    assert_config_or_clean_errors(path)


@settings(max_examples=100, deadline=None)
@given(data=st.binary(max_size=300))
def test_random_bytes(example_dir: Path, data: bytes):
    path = example_dir / "pyproxy.conf"
    path.write_bytes(data)
    assert_config_or_clean_errors(path)
