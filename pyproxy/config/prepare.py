"""The step between a validated Config and one workers can run: what needs the world beyond the file.

Validation (validate.py, entities.py) reads the document and only records the host names it writes
(`Config.hostnames`). Here they are resolved, once per load, where loading runs (the master's loader
child, `pyproxy -t`, the start), so that no worker ever waits on DNS:

    config = resolve_hostnames(validate_config(path, document))

With several sources (sources.py), their entities are merged first and the names of all resolved here.

A name that does not resolve is a ConfigError at the place it was written, as any error of the file.
"""

from __future__ import annotations

import socket
from dataclasses import replace

from .errors import ConfigError, ConfigIssue
from .model import Config, Hostname, Service, Target
from .values import did_you_mean

Addresses = tuple[tuple[str, int], ...]


def resolve_hostnames(config: Config) -> Config:
    """`config` with the addresses of every host name it writes. Raises ConfigError listing every
    name that does not resolve."""
    addresses, errors = _look_up(config.hostnames, [upstream.name for upstream in config.upstreams])
    if errors:
        raise ConfigError(errors)
    return _with_addresses(config, addresses)


def _look_up(hostnames: tuple[Hostname, ...],
             upstream_names: list[str]) -> tuple[dict[tuple[str, int], Addresses], list[ConfigIssue]]:
    """What DNS answers now for each (host, port) of `hostnames` (each asked once), and an error at
    each place whose name does not resolve."""
    found: dict[tuple[str, int], Addresses | str] = {}
    errors = []
    for hostname in hostnames:
        key = (hostname.host, hostname.port)
        if key not in found:
            found[key] = _getaddrinfo(hostname.host, hostname.port)
        answer = found[key]
        if isinstance(answer, str):
            errors.append(_unresolved(hostname, answer, upstream_names))
    return {key: answer for key, answer in found.items() if not isinstance(answer, str)}, errors


def _with_addresses(config: Config, addresses: dict[tuple[str, int], Addresses]) -> Config:
    """`config` with the resolved `addresses` filled into its targets and service hosts (only the
    upstreams and services that write a host name are made anew)."""
    if not addresses:
        return config

    def target(target: Target) -> Target:
        resolved = addresses.get((target.host, target.port))
        return target if resolved is None else replace(target, addresses=resolved)

    def service(service: Service) -> Service:
        resolved = addresses.get((service.host, service.port)) if service.upstream is None else None
        return service if resolved is None else replace(service, addresses=resolved)

    upstreams = tuple(replace(upstream, targets=tuple(map(target, upstream.targets)))
                      if any((t.host, t.port) in addresses for t in upstream.targets) else upstream
                      for upstream in config.upstreams)
    return replace(config, upstreams=upstreams, services=tuple(map(service, config.services)))


def _getaddrinfo(host: str, port: int) -> Addresses | str:
    """The (ip, port) pairs DNS gives for `host`, or why there are none."""
    try:
        answers = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as error:
        # gaierror for an unknown name; UnicodeError from the IDNA codec for labels it refuses.
        return getattr(error, "strerror", None) or str(error)
    return tuple(dict.fromkeys((str(answer[4][0]), int(answer[4][1])) for answer in answers))


def _unresolved(hostname: Hostname, reason: str, upstream_names: list[str]) -> ConfigIssue:
    """The error for a name that does not resolve. A service host close to an upstream's name is most
    likely that upstream misspelt: the error says so rather than blame DNS."""
    upstream = did_you_mean(hostname.host, upstream_names, kind="upstream") if hostname.service_host else ""
    if upstream:
        message = (f"no upstream is named {hostname.host!r}, and as a host name it does not resolve "
                   f"({reason}){upstream}")
    else:
        message = f"cannot resolve {hostname.host!r}: {reason}"
    return ConfigIssue(hostname.file, hostname.line, hostname.key, message)
