"""Configuration sources: where a configuration's entities (upstreams, services with their routes,
plugins) come from, and how the entities of several sources make one Config.

The pyproxy file (`YamlFile`) is the first source, always, and the only one for the process settings
(worker_processes, logs, ssl, plugin_modules): `merge` takes them from it. Later sources each produce
entities the same way, as a Config fragment: the Kong declarative file the pyproxy file's
`declarative_config` names (entities and certificates), the Gateway API manifests its `gateway` key
names (listeners, certificates and entities; see `named_sources`), and later the Admin API. Whatever
changes one of them asks the master for the same generation reload as a SIGHUP
(`Master.request_reload(reason)`). A load is:

    parse + validate each source → merge → prepare (resolve host names) → the generation reload

A name defined by two sources is an error naming both places. References (a service's upstream, a
plugin's route) are resolved within the source that writes them.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Protocol

from pyproxy.addresses import host_port

from .errors import ConfigError, ConfigIssue
from .loader import YamlMap, read_document
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
    """The pyproxy configuration file: the process settings, and entities of its own. A Kong
    declarative file (its top level has `_format_version`) given here is the whole configuration
    (pyproxy.kong)."""

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
            if isinstance(document.root, YamlMap) and "_format_version" in document.root:
                from pyproxy.kong import KongDeclarative  # here: pyproxy.kong imports this package
                return KongDeclarative(self.path).load_document(document, warn)
            return validate_document(self.path, document, warn)


def load_sources(sources: Sequence[ConfigSource], warn: Warn = None, manifests: bool = True,
                 admin_state: str | None = None) -> Config:
    """Load every source (the pyproxy file first) and the sources the pyproxy file names
    (`named_sources`, right after it; its gateway manifests only if `manifests`; `admin_state` names
    a file to read instead of the Admin API's state file: the Admin API checks a candidate state so);
    merge their entities, resolve the host names.

    Raises ConfigError listing every error of every source, by source then line."""
    loaded = [source.load(warn) for source in sources]
    if loaded[0][0] is not None:
        more = named_sources(loaded[0][0], manifests, admin_state)
        sources = [sources[0], *more, *sources[1:]]
        loaded[1:1] = [source.load(warn) for source in more]
    errors = [error for _, source_errors in loaded for error in source_errors]
    fragments = [fragment for fragment, _ in loaded if fragment is not None]
    config = None
    if loaded[0][0] is not None:      # the pyproxy file: without it there is nothing to merge into
        try:
            config = resolve_hostnames(merge(fragments), warn)
        except ConfigError as exc:
            errors += exc.errors
    if errors or config is None:
        order = {source.name: index for index, source in enumerate(sources)}
        raise ConfigError(sorted(errors, key=lambda issue: (order.get(issue.file, 0), issue.line)))
    return config


def named_sources(config: Config, manifests: bool = True,
                  admin_state: str | None = None) -> list[ConfigSource]:
    """The sources the pyproxy file's own settings name: the Kong file of its `declarative_config`, the
    Admin API's state file (a Kong file too; with `admin_listen`, once it exists, or `admin_state`
    instead of it), then its `gateway` manifests (unless `manifests` is False)."""
    # Imported here, not at the top: pyproxy.kong and pyproxy.gateway import this package.
    kong_files = [config.declarative_config] if config.declarative_config is not None else []
    if config.admin_listen is not None:
        state = admin_state or config.admin_state
        if state is not None and (admin_state or os.path.exists(state)):
            kong_files.append(state)
    named: list[ConfigSource] = []
    if kong_files:
        from pyproxy.kong import KongDeclarative
        named += [KongDeclarative(path, pyproxy_file=config) for path in kong_files]
    if config.gateway is not None and manifests:
        from pyproxy.gateway.source import GatewayManifests
        named.append(GatewayManifests(config))
    return named


def merge(fragments: Sequence[Config]) -> Config:
    """The first fragment (the pyproxy file's) with the entities (and certificates) of the others added
    after its own.

    Route indexes go on counting over the sources, so a tie between routes still goes to the first
    written. Raises ConfigError for each upstream, service or route name that two sources define, and
    for each server name two sources' certificates serve (on one listener)."""
    merged, *others = fragments
    if not others:
        return merged
    defined: dict[tuple[str, str], tuple[str, int]] = {}
    errors = []

    def claim(fragment: Config, kind: str, name: str, line: int) -> None:
        first = defined.setdefault((kind, name), (fragment.path, line))
        if first[0] != fragment.path:
            # Certificates keep no line: theirs is the file's first.
            where = [f"{path} (line {at})" if at else path for path, at in (first, (fragment.path, line))]
            errors.append(ConfigIssue(fragment.path, line or 1, "",
                                      f"{kind} {name!r} is defined in {where[0]} and in {where[1]}"))

    for fragment in fragments:
        for listen in fragment.stream_listen:
            claim(fragment, "stream_listen address", str(listen), listen.line)
        for upstream in fragment.upstreams:
            claim(fragment, "upstream", upstream.name, upstream.line)
        for service in fragment.services:
            claim(fragment, "service", service.name, service.line)
            for route in service.routes:
                claim(fragment, "route", route.name, route.line)
        for certificate in fragment.certificates:
            # One with `listen` competes only with those of its listeners (Certificate.competes_with).
            ons = [f" on {port}" if host is None else f" on {host_port(host, port)}"
                   for host, port in certificate.listen] or [""]
            for sni in certificate.snis:
                for on in ons:
                    claim(fragment, "certificate for server name", sni + on, 0)
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
