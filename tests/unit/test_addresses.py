"""pyproxy.addresses: the one place that tells IPv4 from IPv6 and writes `host:port`."""

from __future__ import annotations

import socket

from pyproxy.addresses import family_of, host_port, is_ip_address
from pyproxy.config.model import Listen, Target
from pyproxy.upstream import Peer


def test_an_ipv6_address_is_written_in_brackets_everywhere_an_address_is_shown():
    assert host_port("::1", 9000) == "[::1]:9000"
    assert host_port("127.0.0.1", 9000) == "127.0.0.1:9000"
    assert host_port("backend.example", 80) == "backend.example:80"
    # The listener in logs, a target in `pyproxy -T`, a peer in $upstream_addr: the same text.
    assert str(Listen("::", 443)) == str(Target("::", 443)) == Peer(("::", 443)).name == "[::]:443"


def test_the_family_follows_the_address():
    assert family_of("::ffff:127.0.0.1") == socket.AF_INET6
    assert family_of("127.0.0.1") == socket.AF_INET
    assert Listen("::", 443).family == Peer(("::1", 80)).family == socket.AF_INET6


def test_only_literal_addresses_are_ip_addresses():
    assert is_ip_address("10.0.0.1") and is_ip_address("fe80::1")
    assert not is_ip_address("10.0.0") and not is_ip_address("localhost") and not is_ip_address("[::1]")
