"""Configuration sources: where a configuration's entities (upstreams, services with their routes,
plugins) come from, and how the entities of several sources make one Config.

The pyproxy file (`YamlFile`) is the first source, always, and the only one for the process settings
(worker_processes, logs, ssl, plugin_modules): `merge` takes them from it. Another source may add
listeners (stream_listen) and certificates besides entities: the Gateway API manifests that the
file's `gateway` key names (`named_sources`) do.
Later sources (a Kong declarative file, Gateway API manifests, the Admin API) each produce entities the
same way, as a Config fragment, and whatever changes one of them asks the master for the same
generation reload as a SIGHUP (`Master.request_reload(reason)`). A load is:

    parse + validate each source → merge → prepare (resolve host names) → the generation reload

A name defined by two sources is an error naming both places. References (a service's upstream, a
plugin's route) are resolved within the source that writes them.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Protocol

from .errors import ConfigError, ConfigIssue
from .loader import read_document
from .model import Config
from .prepare import resolve_hostnames
from .validate import collector_paused, validate_document

# What a source's load gives: its fragment, meaningful only when there are no errors (its host names
# are still looked up then, so that every error is listed at once), and the errors.
Loaded = tuple[Config | None, list[ConfigIssue]]
Warn = Callable[[str], None] | None


class ConfigSource(Protocol):
    """A place entities come from."""

    @property
    def name(self) -> str:
        """The source in messages (a file's path): ConfigIssue.file of its errors, Config.path of its
        fragment."""

    def load(self, warn: Warn) -> Loaded:
        """Read and validate the source now: its entities as a Config fragment (the process settings of
        any source but the pyproxy file are ignored), their host names not resolved yet. Errors are
        returned, not raised; warnings are passed to `warn`."""


class YamlFile:
    """The pyproxy configuration file: the process settings, and entities of its own."""

    def __init__(self, path: str):
        self.path = os.path.abspath(path)

    @property
    def name(self) -> str:
        return self.path

    def load(self, warn: Warn) -> Loaded:
        with collector_paused():
            try:
                document = read_document(self.path)
            except ConfigError as exc:
                return None, exc.errors
            return validate_document(self.path, document, warn)


def load_sources(sources: Sequence[ConfigSource], warn: Warn = None, named: bool = True) -> Config:
    """Load every source (the pyproxy file first) and, unless `named` is False, the sources the pyproxy
    file names (`named_sources`); merge their entities, resolve the host names.

    Raises ConfigError listing every error of every source, by source then line."""
    loaded = [source.load(warn) for source in sources]
    if named and loaded[0][0] is not None:
        more = named_sources(loaded[0][0])
        sources = [*sources, *more]
        loaded += [source.load(warn) for source in more]
    errors = [error for _, source_errors in loaded for error in source_errors]
    fragments = [fragment for fragment, _ in loaded if fragment is not None]
    config = None
    if loaded[0][0] is not None:      # the pyproxy file: without it there is nothing to merge into
        try:
            config = resolve_hostnames(merge(fragments))
        except ConfigError as exc:
            errors += exc.errors
    if errors or config is None:
        order = {source.name: index for index, source in enumerate(sources)}
        raise ConfigError(sorted(errors, key=lambda issue: (order.get(issue.file, 0), issue.line)))
    return config


def named_sources(config: Config) -> list[ConfigSource]:
    """The sources the pyproxy file's own settings name: its `gateway` manifests."""
    if config.gateway is None:
        return []
    from pyproxy.gateway.source import GatewayManifests  # not at the top: pyproxy.gateway imports us
    return [GatewayManifests(config)]


def merge(fragments: Sequence[Config]) -> Config:
    """The first fragment (the pyproxy file's) with the entities of the others added after its own.

    Route indexes go on counting over the sources, so a tie between routes still goes to the first
    written. Raises ConfigError for each upstream, service or route name that two sources define."""
    merged, *others = fragments
    if not others:
        return merged
    defined: dict[tuple[str, str], tuple[str, int]] = {}
    errors = []

    def claim(fragment: Config, kind: str, name: str, line: int) -> None:
        first = defined.setdefault((kind, name), (fragment.path, line))
        if first[0] != fragment.path:
            errors.append(ConfigIssue(fragment.path, line, "", f"{kind} {name!r} is defined in {first[0]} "
                                                               f"(line {first[1]}) and in {fragment.path} "
                                                               f"(line {line})"))

    for fragment in fragments:
        for listen in fragment.stream_listen:
            claim(fragment, "stream_listen address", str(listen), listen.line)
        for upstream in fragment.upstreams:
            claim(fragment, "upstream", upstream.name, upstream.line)
        for service in fragment.services:
            claim(fragment, "service", service.name, service.line)
            for route in service.routes:
                claim(fragment, "route", route.name, route.line)
    if errors:
        raise ConfigError(errors)
    for fragment in others:
        offset = len(merged.routes)
        services = tuple(replace(service, routes=tuple(replace(route, index=route.index + offset)
                                                       for route in service.routes))
                         for service in fragment.services)
        merged = replace(merged, stream_listen=merged.stream_listen + fragment.stream_listen,
                         certificates=merged.certificates + fragment.certificates,
                         gateway_status={**merged.gateway_status, **fragment.gateway_status},
                         upstreams=merged.upstreams + fragment.upstreams,
                         services=merged.services + services, plugins=merged.plugins + fragment.plugins,
                         plugin_types={**fragment.plugin_types, **merged.plugin_types},
                         hostnames=merged.hostnames + fragment.hostnames)
    return merged
