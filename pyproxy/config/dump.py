"""`pyproxy -T`: the effective configuration (defaults filled in, paths absolute) as YAML."""

from __future__ import annotations

import dataclasses
import ipaddress

import yaml

from pyproxy.config.model import Config


def _plain(value):
    """Dataclasses, tuples, networks and bytes → what yaml.safe_dump can print."""
    if dataclasses.is_dataclass(value):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    if isinstance(value, (ipaddress.IPv4Network, ipaddress.IPv6Network)):
        return str(value)
    if isinstance(value, bytes):
        return value.decode("latin-1")
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def dump_config(config: Config) -> str:
    header = f"# effective configuration of {config.path}\n"
    return header + yaml.safe_dump(_plain(config), sort_keys=False, default_flow_style=False)
