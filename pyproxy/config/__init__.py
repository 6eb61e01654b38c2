"""pyproxy's configuration: read the YAML file, validate it, hand out frozen dataclasses.

    config = load_config("conf/pyproxy.conf", warn=log.warning)

`load_config` either returns a `Config` or raises `ConfigError` listing every problem, each as
`FILE:LINE: key.path: message`. Nothing YAML-shaped leaves this package. Loading is four steps:

- read: the file's bytes parsed into values that know their lines (loader.py);
- validate (`validate_config`): those values checked against the schema into a Config. No network:
  host names are only recorded (`Config.hostnames`). It does read local files the Config depends
  on: certificates and keys (their names become the certificate's SNIs, and a key that does not
  match is an error of the file, as `-t` promises) and CA files, and it imports the plugin_modules
  afresh, because a plugin's own check() validates its config;
- merge (sources.py): the entities of every configuration source made one Config (the file is the
  first source, and so far the only one);
- prepare (prepare.py, `resolve_hostnames`): the host names resolved into addresses.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from .dump import config_as_yaml, dump_config
from .errors import ConfigError, ConfigIssue, Invalid
from .loader import Document, YamlMap, read_document
from .model import (
    ALGORITHMS,
    LOG_LEVELS,
    ROUTE_PROTOCOLS,
    ActiveHealthcheck,
    AddressMatch,
    Certificate,
    CertKey,
    Config,
    Healthchecks,
    Listen,
    PassiveHealthcheck,
    Plugin,
    Route,
    Service,
    SSLSettings,
    Target,
    Upstream,
)
from .prepare import resolve_hostnames
from .sections import Place, Report
from .sources import ConfigSource, YamlFile, load_sources, merge
from .validate import collector_paused, default_pid_path, pid_file, validate_document
from .values import ACCESS_LOG_VARIABLES, parse_address, parse_duration

__all__ = [
    "load_config", "validate_config", "resolve_hostnames", "pid_path_of",
    "ConfigSource", "YamlFile", "load_sources", "merge", "dump_config", "config_as_yaml",
    "ConfigError", "ConfigIssue", "Invalid", "parse_duration", "parse_address",
    "ACCESS_LOG_VARIABLES", "ALGORITHMS", "LOG_LEVELS", "ROUTE_PROTOCOLS",
    "ActiveHealthcheck", "AddressMatch", "Certificate", "CertKey", "Config", "Healthchecks", "Listen",
    "PassiveHealthcheck", "Plugin", "Route", "Service", "SSLSettings", "Target", "Upstream",
]


def load_config(path: str, warn: Callable[[str], None] | None = None) -> Config:
    """Read, validate and prepare the configuration file at `path` (the one source: see sources.py).

    Returns the Config, its host names resolved. Raises ConfigError listing every error found, in
    file order: those of validation and the names that do not resolve alike. Warnings (settings that
    work but deserve attention) are passed to `warn`, one full `FILE:LINE: key: message` string
    each, whether or not there are errors.
    """
    return load_sources([YamlFile(path)], warn)


def validate_config(path: str, document: Document, warn: Callable[[str], None] | None = None) -> Config:
    """The Config that `document` (read from the file at `path`, absolute) describes, its host names
    not resolved yet (see resolve_hostnames). Raises ConfigError listing every error, in file order;
    warnings go to `warn` as load_config's do."""
    with collector_paused():
        config, errors = validate_document(path, document, warn)
    if errors or config is None:
        raise ConfigError(sorted(errors, key=lambda issue: issue.line))
    return config


def pid_path_of(path: str) -> str | None:
    """The pid file named by the configuration at `path` (None for `pid: off`).

    Reads only the `pid` key, so that `pyproxy -s stop` still finds the master when another part of
    the file has been broken since it started. Raises ConfigError if the file or that key is unusable.
    """
    path = os.path.abspath(path)
    root = read_document(path).root
    if not isinstance(root, YamlMap) or root.get("pid") is None:
        return default_pid_path(os.path.dirname(path))
    report = Report(path)
    place = Place("pid", root.value_lines["pid"])
    pid = report.convert(place, root["pid"], pid_file(os.path.dirname(path)))
    if report.errors:
        raise ConfigError(report.errors)
    return pid
