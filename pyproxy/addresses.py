"""IP addresses as text: which family one is, and how `host:port` is written, in one place.

The addresses pyproxy handles at run time are literal IPs as text: the config loader normalises what
the file says (`[0::0]` becomes `::`), and accept(), getaddrinfo() and the PROXY protocol give them
the same way. An IPv6 literal always contains a colon, an IPv4 literal or a host name never does,
so one `":" in host` tells them apart without parsing.
"""

from __future__ import annotations

import ipaddress
import socket

__all__ = ["family_of", "host_port", "is_ip_address", "wildcard_addresses"]


def family_of(host: str) -> socket.AddressFamily:
    """The socket family of a literal IP (or a host name, which is taken for IPv4)."""
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def host_port(host: str, port: int) -> str:
    """`host:port` as nginx and the config file write it: an IPv6 address goes in brackets
    (`[::1]:9000`), so that the port cannot be read as the address's last group."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def is_ip_address(text: str) -> bool:
    """True for a literal IPv4 or IPv6 address (no DNS needed)."""
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def wildcard_addresses() -> tuple[str, ...]:
    """Every address of the host, as a listener that names none binds them: `0.0.0.0` and `::`, or
    `0.0.0.0` alone on a host without IPv6 (a kernel booted with ipv6.disable=1, a container
    without it), where a bind to `::` would fail the start. Asked once per configuration load."""
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            probe.bind(("::", 0))
    except OSError:
        return ("0.0.0.0",)
    return ("0.0.0.0", "::")
