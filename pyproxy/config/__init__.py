"""pyproxy's configuration: read the YAML file, validate it, hand out frozen dataclasses.

    config = load_config("conf/pyproxy.conf", warn=log.warning)

`load_config` either returns a `Config` or raises `ConfigError` listing every problem, each as
`FILE:LINE: key.path: message`. Nothing YAML-shaped leaves this package.
"""

from __future__ import annotations

import contextlib
import gc
import os
from collections.abc import Callable, Iterator

from .dump import config_as_yaml, dump_config
from .errors import ConfigError, ConfigIssue, Invalid
from .loader import YamlMap, read_document
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
from .sections import Place, Report
from .validate import build_config, default_pid_path, pid_file
from .values import ACCESS_LOG_VARIABLES, parse_address, parse_duration

__all__ = [
    "load_config", "pid_path_of", "dump_config", "config_as_yaml",
    "ConfigError", "ConfigIssue", "Invalid", "parse_duration", "parse_address",
    "ACCESS_LOG_VARIABLES", "ALGORITHMS", "LOG_LEVELS", "ROUTE_PROTOCOLS",
    "ActiveHealthcheck", "AddressMatch", "Certificate", "CertKey", "Config", "Healthchecks", "Listen",
    "PassiveHealthcheck", "Plugin", "Route", "Service", "SSLSettings", "Target", "Upstream",
]


def load_config(path: str, warn: Callable[[str], None] | None = None) -> Config:
    """Read, parse and validate the configuration file at `path`.

    Returns the validated Config. Raises ConfigError listing every error found, in file order.
    Warnings (settings that work but deserve attention) are passed to `warn`, one full
    `FILE:LINE: key: message` string each, whether or not there are errors.
    """
    path = os.path.abspath(path)
    with _collector_paused():
        document = read_document(path)
        report = Report(path)
        config = build_config(report, document.root)
    if warn is not None:
        for warning in sorted(report.warnings, key=lambda issue: issue.line):
            warn(str(warning))
    errors = document.issues + [error for error in report.errors
                                if not _follows_from(error, document.refused)]
    if errors or config is None:
        raise ConfigError(sorted(errors, key=lambda issue: issue.line))
    return config


@contextlib.contextmanager
def _collector_paused() -> Iterator[None]:
    """Python's cyclic garbage collector off while a file is read and validated.

    Loading makes millions of objects and keeps them all until the end, and each collection of the
    oldest generation walks every one of them: a 5 MB file took three times as long with the collector
    running. What loading leaves behind is freed by reference counting or at the next collection.
    """
    paused = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if paused:
            gc.enable()


def _follows_from(error: ConfigIssue, refused: set[str]) -> bool:
    """True if `error` is about a value the loader already refused (it reads as null to the validator)."""
    return any(error.key == path or error.key.startswith((path + ".", path + "["))
               for path in refused if path)


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
