"""The step between a validated Config and one workers can run: what needs the world beyond the file.

Validation (validate.py, entities.py) reads the document and only records the host names it writes
(`Config.hostnames`). Here they are resolved, once per load, where loading runs (the master's loader
child, `pyproxy -t`, the start), with the `dns_*` settings of the file (pyproxy.dns), so that no
worker ever waits on DNS:

    config = resolve_hostnames(validate_config(path, document), warn)

With several sources (sources.py), their entities are merged first and the names of all resolved here.
The answers go along in `Config.dns_answers`: the master follows the names from there (pyproxy.dns).

A name that does not resolve is, with `dns_strict: on`, a ConfigError at the place it was written, as
any error of the file; by default a warning there, and its targets have no address until it resolves
(in Kubernetes a Service may appear after the proxy).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

from .errors import ConfigError, ConfigIssue
from .model import MAX_ADDRESSES, Answer, Config, Hostname, Service, Target
from .values import did_you_mean

Addresses = tuple[tuple[str, int], ...]
LOAD_TIMEOUT = 10.0        # seconds the lookups of one load may take in all


def resolve_hostnames(config: Config, warn: Callable[[str], None] | None = None) -> Config:
    """`config` with the addresses of every host name it writes. With `dns_strict`, raises ConfigError
    listing every name that does not resolve; otherwise each is a warning passed to `warn`."""
    if not config.hostnames:
        return config
    from pyproxy.dns import resolve_now  # here: pyproxy.dns imports this package's model
    answers = resolve_now([hostname.host for hostname in config.hostnames], config.dns, LOAD_TIMEOUT)
    upstream_names = [upstream.name for upstream in config.upstreams]
    errors: list[ConfigIssue] = []
    warnings: list[ConfigIssue] = []
    for hostname in config.hostnames:
        if not answers[hostname.host].records:
            issue, error = _unresolved(hostname, answers[hostname.host].error, upstream_names,
                                       config.dns.strict)
            (errors if error else warnings).append(issue)
    if errors:
        raise ConfigError(errors)
    for issue in warnings:
        if warn is not None:
            warn(str(issue))
    return replace(_with_addresses(config, answers), dns_answers=answers)


def addresses_of(answer: Answer, port: int) -> Addresses:
    """The (ip, port) pairs of a name written with `port` (an SRV record's own port wins), at most
    MAX_ADDRESSES (the master says when there are more)."""
    return tuple(dict.fromkeys((ip, record_port or port)
                               for ip, record_port, _ in answer.records[:MAX_ADDRESSES]))


def _with_addresses(config: Config, answers: dict[str, Answer]) -> Config:
    """`config` with the resolved addresses filled into its targets and service hosts (only the
    upstreams and services that write a host name are made anew)."""

    def target(target: Target) -> Target:
        answer = answers.get(target.host)
        return target if answer is None else replace(target, addresses=addresses_of(answer, target.port))

    def service(service: Service) -> Service:
        answer = answers.get(service.host) if service.upstream is None else None
        return service if answer is None else replace(service, addresses=addresses_of(answer, service.port))

    upstreams = tuple(replace(upstream, targets=tuple(map(target, upstream.targets)))
                      if any(t.host in answers for t in upstream.targets) else upstream
                      for upstream in config.upstreams)
    return replace(config, upstreams=upstreams, services=tuple(map(service, config.services)))


def _unresolved(hostname: Hostname, reason: str, upstream_names: list[str],
                strict: bool) -> tuple[ConfigIssue, bool]:
    """The problem with a name that does not resolve, and whether it is an error. A service host
    close to an upstream's name is most likely that upstream misspelt: an error that says so rather
    than blame DNS, whatever dns_strict says."""
    upstream = did_you_mean(hostname.host, upstream_names, kind="upstream") if hostname.service_host else ""
    if upstream:
        message = (f"no upstream is named {hostname.host!r}, and as a host name it does not resolve "
                   f"({reason}){upstream}")
    elif strict:
        message = f"cannot resolve {hostname.host!r}: {reason}"
    else:
        message = (f"cannot resolve {hostname.host!r}: {reason} (dns_strict is off: it has no address "
                   f"until it resolves)")
    return ConfigIssue(hostname.file, hostname.line, hostname.key, message), bool(upstream) or strict
