"""The UDP configuration: `udp` listeners, `udp` routes and services, and what they refuse."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import yaml

from pyproxy.config.dump import dump_config
from pyproxy.listeners import open_listener
from pyproxy.router import Router
from tests.support import free_port
from tests.unit.test_config import errors_of, load, only_error
from tests.unit.test_config_dump import without_places

UDP = """\
stream_listen: [127.0.0.1:5353 udp, 127.0.0.1:5353]
services:
  - name: dns
    protocol: udp
    host: 127.0.0.1
    port: 53
    proxy_responses: 1
    proxy_requests: 4
    proxy_buffer_size: 512
    routes:
      - name: dns-udp
        protocols: [udp]
        destinations: [{port: 5353}]
  - name: dns-tcp
    host: 127.0.0.1
    port: 53
    routes:
      - name: dns-tcp
        destinations: [{port: 5353}]
"""


@pytest.fixture
def conf_dir(tmp_path: Path) -> Path:
    return tmp_path


def test_udp_and_tcp_listeners_on_one_port_and_their_routes(conf_dir: Path):
    config = load(conf_dir, UDP)
    udp, tcp = config.stream_listen
    assert (udp.udp, tcp.udp) == (True, False) and udp.key != tcp.key
    assert str(udp) == "127.0.0.1:5353 udp"
    service = config.service("dns")
    assert (service.protocol, service.proxy_responses, service.proxy_requests,
            service.proxy_buffer_size) == ("udp", 1, 4, 512)
    assert config.service("dns-tcp").proxy_responses is None        # no limit
    router = Router(config.routes, config.stream_listen)
    assert router.for_listener(udp).match("127.0.0.1", 4000, None, 5353).name == "dns-udp"
    assert router.for_listener(tcp).match("127.0.0.1", 4000, None, 5353).name == "dns-tcp"


def test_a_udp_listener_is_a_datagram_socket_beside_the_tcp_one(conf_dir: Path):
    config = load(conf_dir, UDP.replace("5353", str(free_port())))
    sockets = [open_listener(listen, 0) for listen in config.stream_listen]
    try:
        assert [ls.sock.type for ls in sockets] == [socket.SOCK_DGRAM, socket.SOCK_STREAM]
    finally:
        for ls in sockets:
            ls.sock.close()


@pytest.mark.parametrize("listen, message", [
    ("127.0.0.1:5353 udp ssl", "listen flag 'ssl' is for TCP listeners, not with udp"),
    ("127.0.0.1:5353 udp proxy_protocol", "listen flag 'proxy_protocol' is for TCP listeners, not with udp"),
    ("127.0.0.1:5353 udp backlog=10", "listen flag 'backlog' is for TCP listeners, not with udp"),
])
def test_tcp_only_listen_flags_are_refused_with_udp(conf_dir: Path, listen: str, message: str):
    error = only_error(conf_dir, UDP.replace("127.0.0.1:5353 udp", listen))
    assert (error.key, error.message) == ("stream_listen[0]", message)


def test_a_udp_address_listed_twice_is_refused(conf_dir: Path):
    error = only_error(conf_dir, UDP.replace("127.0.0.1:5353]", "127.0.0.1:5353, 127.0.0.1:5353 udp]"))
    assert error.message == "127.0.0.1:5353 udp is already listed at line 1"


def test_udp_routes_and_udp_services_go_together(conf_dir: Path):
    # A udp route on a tcp service, and a tcp route on a udp service.
    text = UDP.replace("        protocols: [udp]\n", "").replace(
        "      - name: dns-tcp\n", "      - name: dns-tcp\n        protocols: [udp]\n")
    messages = sorted((e.key, e.message) for e in errors_of(conf_dir, text))
    together = ("a udp route belongs to a service with protocol udp, and a service with protocol udp "
                "has only udp routes")
    assert messages == [("services[0].routes[0]", together), ("services[1].routes[0]", together)]


@pytest.mark.parametrize("protocols, message", [
    ("[udp, tcp]", "a udp route has protocols [udp] alone: datagrams are neither TCP nor TLS"),
])
def test_udp_route_rules(conf_dir: Path, protocols: str, message: str):
    errors = errors_of(conf_dir, UDP.replace("protocols: [udp]", f"protocols: {protocols}"))
    assert message in [e.message for e in errors]


def test_a_udp_route_needs_sources_or_destinations(conf_dir: Path):
    errors = errors_of(conf_dir, UDP.replace("        destinations: [{port: 5353}]\n", "", 1))
    assert "a udp route needs sources or destinations" in [e.message for e in errors]


def test_settings_of_the_other_kind_of_service_are_warnings(conf_dir: Path):
    warnings: list[str] = []
    text = (UDP.replace("    proxy_responses: 1\n", "    proxy_responses: 1\n    proxy_protocol: v2\n")
            .replace("  - name: dns-tcp\n    host", "  - name: dns-tcp\n    proxy_requests: 3\n    host"))
    load(conf_dir, text, warnings)
    assert any("proxy_protocol is not used with protocol udp" in w for w in warnings), warnings
    assert any("proxy_requests is not used with protocol tcp" in w for w in warnings), warnings


@pytest.mark.parametrize("fragment, message", [
    ("proxy_requests: -1", "-1 is out of range (0-2147483647)"),
    ("proxy_buffer_size: 0", "0 is out of range (1-65535)"),
    ("proxy_buffer_size: 70000", "70000 is out of range (1-65535)"),
])
def test_wrong_udp_values(conf_dir: Path, fragment: str, message: str):
    error = only_error(conf_dir, UDP.replace("    proxy_requests: 4\n    proxy_buffer_size: 512\n",
                                             f"    {fragment}\n"))
    assert error.message == message


def test_a_udp_probe_needs_a_datagram_to_send(conf_dir: Path):
    text = UDP.replace("services:", """upstreams:
  - name: pool
    healthchecks:
      active: {type: udp, interval: 1s}
    targets: [{target: "127.0.0.1:53"}]
services:""")
    error = only_error(conf_dir, text)
    assert (error.key, error.message) == (
        "upstreams[0].healthchecks.active",
        "a udp probe is the datagram in `send`: set it (a target answers nothing to nothing)")
    assert load(conf_dir, text.replace("interval: 1s", "interval: 1s, send: ping")).upstreams[0] \
        .healthchecks.active.type == "udp"


def test_the_dump_of_a_udp_configuration_loads_and_means_the_same(conf_dir: Path):
    text = UDP.replace("services:", """upstreams:
  - name: pool
    healthchecks:
      active: {type: udp, interval: 1s, send: ping, expect: pong}
    targets: [{target: "127.0.0.1:53"}]
services:""").replace("    host: 127.0.0.1\n    port: 53\n    proxy_responses",
                       "    host: pool\n    proxy_responses")
    warnings: list[str] = []
    original = load(conf_dir, text)
    document = dump_config(original)
    assert document["stream_listen"][0] == "127.0.0.1:5353 udp"
    assert "proxy_responses" not in document["services"][1]       # a tcp service's dump has none
    (conf_dir / "dumped").mkdir()
    reloaded = load(conf_dir / "dumped", yaml.safe_dump(document), warnings)
    assert without_places(reloaded) == without_places(original)
    assert warnings == []
