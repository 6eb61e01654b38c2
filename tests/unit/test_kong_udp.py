"""Kong's udp services and routes in kong.yml and the Admin API's state (issue 22): they become
pyproxy's `protocol: udp` services with `udp` routes, and the listeners derived from the routes'
destinations (or KONG_STREAM_LISTEN's `udp` flag) take datagrams."""

from __future__ import annotations

import textwrap
from pathlib import Path

from pyproxy.admin.api import AdminAPI
from pyproxy.admin.state import StateFile
from pyproxy.config import YamlFile, load_sources
from tests.unit.test_kong import load

DNS = """\
_format_version: "3.0"
services:
- name: dns
  url: udp://127.0.0.1:5353
  read_timeout: 2000
  routes:
  - name: dns-udp
    protocols: [udp]
    destinations: [{port: 9053}]
- name: dns-tcp
  url: tcp://127.0.0.1:5353
  routes:
  - name: dns-over-tcp
    protocols: [tcp, udp]
    destinations: [{port: 9053}]
"""


def test_a_udp_service_and_route_become_pyproxy_udp_entities(tmp_path: Path, monkeypatch):
    monkeypatch.delenv("KONG_STREAM_LISTEN", raising=False)
    (tmp_path / "kong.yml").write_text(DNS)
    config, warnings = load(tmp_path / "kong.yml")
    assert [(str(listen), listen.udp) for listen in config.stream_listen] == [
        ("0.0.0.0:9053", False), ("0.0.0.0:9053 udp", True)]
    udp, tcp = config.services
    assert (udp.name, udp.protocol, udp.port, udp.read_timeout) == ("dns", "udp", 5353, 2.0)
    assert [(route.name, route.protocols) for route in udp.routes] == [("dns-udp", ("udp",))]
    assert (tcp.protocol, [(route.name, route.protocols) for route in tcp.routes]) == (
        "tcp", [("dns-over-tcp", ("tcp",))])
    # Kong's stream route may list udp with tcp: on a tcp service pyproxy takes the tcp part.
    assert any("services[1].routes[0].protocols udp" in warning for warning in warnings)
    assert any("listening on 0.0.0.0:9053, 0.0.0.0:9053 udp" in warning for warning in warnings)


def test_kong_stream_listen_with_the_udp_flag(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("KONG_STREAM_LISTEN", "127.0.0.1:9053 udp, 127.0.0.1:9053")
    (tmp_path / "kong.yml").write_text(DNS)
    config, _ = load(tmp_path / "kong.yml")
    assert sorted((str(listen), listen.udp) for listen in config.stream_listen) == [
        ("127.0.0.1:9053", False), ("127.0.0.1:9053 udp", True)]


def test_a_route_of_the_other_transport_than_its_service_is_ignored(tmp_path: Path, monkeypatch):
    monkeypatch.delenv("KONG_STREAM_LISTEN", raising=False)
    (tmp_path / "kong.yml").write_text(textwrap.dedent("""\
        _format_version: "3.0"
        services:
        - name: dns
          url: udp://127.0.0.1:5353
          routes:
          - {name: by-tcp, protocols: [tcp], destinations: [{port: 9054}]}
          - {name: by-udp, protocols: [udp], destinations: [{port: 9053}]}
        - name: echo
          url: tcp://127.0.0.1:7000
          routes:
          - {name: echo-udp, protocols: [udp], destinations: [{port: 9055}]}
          - {name: echo-tcp, protocols: [tcp], destinations: [{port: 9056}]}
        """))
    config, warnings = load(tmp_path / "kong.yml")
    assert [route.name for route in config.routes] == ["by-udp", "echo-tcp"]
    [ignored] = [warning for warning in warnings if "ignored (HTTP only, or not in pyproxy)" in warning]
    assert "services[0].routes[0] 'by-tcp' (protocols tcp: its service is udp)" in ignored
    assert "services[1].routes[0] 'echo-udp' (protocols udp: its service is not udp)" in ignored


def test_a_pyproxy_file_udp_listener_serves_the_kong_file_s_udp_route(tmp_path: Path):
    (tmp_path / "kong.yml").write_text(DNS)
    (tmp_path / "pyproxy.conf").write_text(
        "stream_listen: [127.0.0.1:9053 udp, 127.0.0.1:9053]\ndeclarative_config: kong.yml\n")
    config, _ = load(tmp_path / "pyproxy.conf")
    assert [service.protocol for service in config.services] == ["udp", "tcp"]


def test_the_admin_api_takes_a_udp_service_and_route(tmp_path: Path):
    path = str(tmp_path / "pyproxy.conf")
    Path(path).write_text("stream_listen: [127.0.0.1:20053 udp]\naccess_log: off\nadmin_listen: 8001\n")
    asked: list[str] = []
    api = AdminAPI(StateFile(str(tmp_path / "admin_state.yml"), path, lambda: asked.append("reload"), print))
    status, service = api.handle("POST", "/services", "application/x-www-form-urlencoded",
                                 b"name=dns&url=udp://127.0.0.1:5353")
    assert (status, service["protocol"], service["port"]) == (201, "udp", 5353)
    status, route = api.handle("POST", "/services/dns/routes", "application/x-www-form-urlencoded",
                               b"name=dns-udp&protocols[]=udp&destinations[1].port=20053")
    assert (status, route["protocols"], asked) == (201, ["udp"], ["reload", "reload"])
    config = load_sources([YamlFile(path)])
    [udp] = config.services
    assert (udp.protocol, [(r.name, r.protocols) for r in udp.routes]) == ("udp", [("dns-udp", ("udp",))])
    # A tcp route of a udp service is kept (Kong takes it) and ignored, as in a file.
    status, _ = api.handle("POST", "/services/dns/routes", "application/json",
                              b'{"name": "on-tcp", "protocols": ["tcp"], "destinations": [{"port": 20053}]}')
    assert status == 201 and [r.name for r in load_sources([YamlFile(path)]).routes] == ["dns-udp"]
