"""Configuration sources: the pyproxy file plus another source of entities make one Config; a name
that two sources define is an error naming both places."""

from __future__ import annotations

from pathlib import Path

import pytest

from pyproxy.config import (
    AddressMatch,
    Config,
    ConfigError,
    ConfigIssue,
    Route,
    Service,
    Target,
    Upstream,
    YamlFile,
    load_sources,
)
from pyproxy.config.model import Hostname
from tests.unit.test_config import MINIMAL

PYPROXY_FILE = "worker_processes: 2\n" + MINIMAL     # service svc at line 4, its route plain at line 8


class Entities:
    """A source of entities held in memory, as an Admin API would hold them (for these tests only)."""

    name = "memory:admin-api"

    def __init__(self, fragment: Config, errors: list[ConfigIssue] | None = None):
        self.fragment = fragment
        self.errors = errors or []

    def load(self, warn):
        return self.fragment, self.errors


def _fragment(service: str = "api", route: str = "api-route", host: str = "pool") -> Config:
    return Config(
        path=Entities.name,
        worker_processes=7,                    # a process setting: only the pyproxy file's counts
        upstreams=(Upstream(name="pool", targets=(Target("localhost", 7000, line=4),), line=2),),
        services=(Service(name=service, host=host, upstream="pool" if host == "pool" else None, line=10,
                          routes=(Route(name=route, service=service, line=12, index=0,
                                        sources=(AddressMatch(port=5),)),)),),
        hostnames=(Hostname("localhost", 7000, Entities.name, 4, "upstreams[0].targets[0].target"),),
    )


@pytest.fixture
def pyproxy_file(tmp_path: Path) -> YamlFile:
    (tmp_path / "pyproxy.conf").write_text(PYPROXY_FILE)
    return YamlFile(str(tmp_path / "pyproxy.conf"))


def test_the_entities_of_both_sources_make_one_config(pyproxy_file: YamlFile):
    config = load_sources([pyproxy_file, Entities(_fragment())])
    assert config.path == pyproxy_file.name and config.worker_processes == 2
    assert [service.name for service in config.services] == ["svc", "api"]
    assert [(route.name, route.index) for route in config.routes] == [("plain", 0), ("api-route", 1)]
    (target,) = config.upstream("pool").targets
    assert ("127.0.0.1", 7000) in target.addresses          # the other source's host names resolved too


@pytest.mark.parametrize("kind, name, first_line, line",
                         [("service", "svc", 4, 10), ("route", "plain", 8, 12)])
def test_a_name_two_sources_define_is_an_error_naming_both_places(pyproxy_file: YamlFile, kind, name,
                                                                  first_line, line):
    with pytest.raises(ConfigError) as raised:
        load_sources([pyproxy_file, Entities(_fragment(**{kind: name}))])
    assert [str(error) for error in raised.value.errors] == [
        f"{Entities.name}:{line}: {kind} {name!r} is defined in {pyproxy_file.name} (line {first_line}) "
        f"and in {Entities.name} (line {line})"]


def test_the_errors_of_every_source_are_listed_the_pyproxy_file_first(pyproxy_file: YamlFile, tmp_path: Path):
    (tmp_path / "pyproxy.conf").write_text(PYPROXY_FILE.replace("port: 1025", "port: 0"))
    theirs = ConfigIssue(Entities.name, 1, "services[0]", "a problem of the other source")
    with pytest.raises(ConfigError) as raised:
        load_sources([pyproxy_file, Entities(_fragment(), [theirs])])
    assert [(error.file, error.line) for error in raised.value.errors] == [
        (pyproxy_file.name, 6), (Entities.name, 1)]
