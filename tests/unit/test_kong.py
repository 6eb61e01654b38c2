"""Kong's declarative file as a configuration source (pyproxy/kong): real kong.yml files from Kong's
documentation load, what only concerns HTTP is ignored with one warning, the stream entities become
pyproxy's, and a bad file gets errors in Kong's terms at the file's lines."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import pytest

from pyproxy.config import ConfigError, load_config
from pyproxy.kong.translate import kong_id
from tests.support import make_cert

DATA = Path(__file__).resolve().parents[1] / "data" / "kong"
SNI = "tls9443.kong.example"


def with_certificate(text: str, folder: Path, sni: str = SNI) -> str:
    """`text` (a Kong file) with a certificate for `sni` and its nested SNI, as PEM text."""
    crt, key = make_cert(folder, sni, [sni])
    indent = lambda pem: textwrap.indent(pem, "    ")          # noqa: E731
    return (text + "certificates:\n- cert: |\n" + indent(crt.read_text()) + "  key: |\n"
            + indent(key.read_text()) + f"  snis:\n  - name: {sni}\n")


def load(path: Path) -> tuple[object, list[str]]:
    warnings: list[str] = []
    return load_config(str(path), warn=warnings.append), warnings


def errors_of(path: Path) -> list[str]:
    with pytest.raises(ConfigError) as raised:
        load_config(str(path))
    return [str(error).replace(f"{path}:", "") for error in raised.value.errors]


@pytest.fixture
def seed(tmp_path: Path) -> Path:
    path = tmp_path / "kong.yml"
    path.write_text(with_certificate((DATA / "seed-stream.yml").read_text(), tmp_path))
    return path


def test_the_seed_workflow_becomes_pyproxy_entities(seed: Path, monkeypatch):
    monkeypatch.delenv("KONG_STREAM_LISTEN", raising=False)
    config, warnings = load(seed)
    assert [(str(listen), listen.ssl) for listen in config.stream_listen] == [
        ("0.0.0.0:9000", False), ("0.0.0.0:9443", True)]
    (service,) = config.services
    assert (service.name, service.protocol, service.upstream) == ("echo", "tcp", "echo-upstream")
    assert (service.connect_timeout, service.read_timeout, service.retries) == (5.0, 60.0, 3)
    assert [(route.name, route.protocols) for route in service.routes] == [
        ("echo-tcp", ("tcp",)), ("echo-tls", ("tls",))]
    assert service.routes[1].snis == (SNI,)
    (upstream,) = config.upstreams
    active, passive = upstream.healthchecks.active, upstream.healthchecks.passive
    assert (active.interval, active.timeout, active.healthy_successes) == (5.0, 1.0, 1)
    assert (active.unhealthy_tcp_failures, active.unhealthy_timeouts) == (2, 3)
    assert (passive.unhealthy_tcp_failures, passive.unhealthy_timeouts) == (3, 3)
    (certificate,) = config.certificates
    assert certificate.snis == (SNI,) and Path(certificate.cert).stat().st_mode & 0o077 == 0
    (plugin,) = config.plugins
    assert (plugin.name, plugin.route) == ("ip-restriction", "echo-tcp")
    assert any("listening on 0.0.0.0:9000, 0.0.0.0:9443 ssl" in warning for warning in warnings)


def test_kong_stream_listen_chooses_the_listeners(seed: Path, monkeypatch):
    monkeypatch.setenv("KONG_STREAM_LISTEN", "127.0.0.1:9000, 127.0.0.1:9443 ssl")
    config, warnings = load(seed)
    assert [(str(listen), listen.ssl) for listen in config.stream_listen] == [
        ("127.0.0.1:9000", False), ("127.0.0.1:9443", True)]
    assert any("(KONG_STREAM_LISTEN)" in warning for warning in warnings)


def test_kong_defaults_turn_health_checks_off(tmp_path: Path, monkeypatch):
    """Kong's counters default to 0 (off), passive ones included, unlike pyproxy's own defaults."""
    monkeypatch.delenv("KONG_STREAM_LISTEN", raising=False)
    (tmp_path / "kong.yml").write_text(textwrap.dedent("""\
        _format_version: "2.1"
        upstreams:
        - name: pool
          targets: [{target: "127.0.0.1:7000"}]
        services:
        - {name: s, protocol: tcp, host: pool, routes: [{protocols: [tcp], destinations: [{port: 9000}]}]}
        """))
    config, _ = load(tmp_path / "kong.yml")
    checks = config.upstream("pool").healthchecks
    active = checks.active
    assert (active.interval, active.healthy_successes, active.unhealthy_tcp_failures) == (0, 0, 0)
    assert (checks.passive.unhealthy_tcp_failures, checks.passive.unhealthy_timeouts) == (0, 0)
    (route,) = config.routes
    assert route.name == kong_id("routes", f"{tmp_path / 'kong.yml'}:services[0].routes[0]")


def test_ids_are_kongs_uuid5_of_the_endpoint_key():
    """Kong names an entity uuid5(uuid5(_entities, "services"), name) with lua-resty-jit-uuid, whose
    v5 is RFC 4122's, as Python's: its own test vectors (t/05-v5.t) agree."""
    jit_uuid_vectors = [
        ("e6ebd542-06ae-11e6-8e82-bba81706b27d", "hello", "4850816f-1658-5890-8bfd-1ed14251f1f0"),
        ("1b985f4a-06be-11e6-aff4-ff8d14e25128", "foobar", "98520401-1e2b-5cbb-926b-c5c4aae4e69d"),
    ]
    for namespace, name, expected in jit_uuid_vectors:
        assert str(uuid.uuid5(uuid.UUID(namespace), name)) == expected
    namespace = uuid.uuid5(uuid.UUID("fd02801f-0957-4a15-a55a-c8d9606f30b5"), "services")
    assert kong_id("services", "echo") == str(uuid.uuid5(namespace, "echo"))


@pytest.mark.parametrize("name", ["db-less-example.yml", "kong-config-init.yml",
                                  "upstream-entity-example.yml"])
def test_real_kong_files_from_kongs_documentation_load(tmp_path: Path, name: str):
    (tmp_path / "pyproxy.conf").write_text(f"stream_listen: [127.0.0.1:9000]\n"
                                           f"declarative_config: {DATA / name}\n")
    config, warnings = load(tmp_path / "pyproxy.conf")
    assert config.services == ()
    ignored = [warning for warning in warnings if "ignored (HTTP only" in warning]
    if name == "upstream-entity-example.yml":
        assert config.upstreams[0].name == "example-upstream" and not ignored
    else:
        (line,) = ignored
        assert ("consumers (1)" in line and "(protocol http" in line) or "(protocol https" in line


def test_the_kong_config_init_file_says_what_it_ignores(tmp_path: Path):
    (tmp_path / "pyproxy.conf").write_text(
        f"stream_listen: [127.0.0.1:9000]\ndeclarative_config: {DATA / 'kong-config-init.yml'}\n")
    _, warnings = load(tmp_path / "pyproxy.conf")
    assert warnings == [
        f"{DATA / 'kong-config-init.yml'}:1: ignored (HTTP only, or not in pyproxy): consumers (1); "
        "services[0] 'example-service' (protocol http: HTTP only) with its routes and plugins; "
        "services[1] 'another-service' (protocol https: HTTP only) with its routes and plugins; "
        "routes[0] 'another-route' (its service is ignored); "
        "plugins[0] 'rate-limiting' (not a stream plugin pyproxy has)"]


def test_test_mode_prints_what_was_ignored_and_why_nothing_listens(tmp_path: Path):
    command = [sys.executable, "-m", "pyproxy", "-t", "-c", str(DATA / "db-less-example.yml")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert "ignored (HTTP only, or not in pyproxy): consumers (1); services[0] 'my-service'" in result.stderr
    assert "nothing to listen on: no tcp, tls or udp route names a destinations port" in result.stderr
    assert "Traceback" not in result.stderr


def test_entities_come_from_the_kong_file_and_settings_from_the_pyproxy_file(seed: Path, tmp_path: Path):
    (tmp_path / "pyproxy.conf").write_text("worker_processes: 3\nstream_listen: [127.0.0.1:9000, "
                                           "127.0.0.1:9443 ssl]\ndeclarative_config: kong.yml\n")
    config, _ = load(tmp_path / "pyproxy.conf")
    assert config.worker_processes == 3 and [str(listen) for listen in config.stream_listen] == [
        "127.0.0.1:9000", "127.0.0.1:9443"]
    assert [route.name for route in config.routes] == ["echo-tcp", "echo-tls"]
    assert config.certificates[0].snis == (SNI,)


def test_a_name_both_files_define_is_an_error_naming_both_places(seed: Path, tmp_path: Path):
    conf = tmp_path / "pyproxy.conf"
    conf.write_text("stream_listen: [127.0.0.1:9000]\ndeclarative_config: kong.yml\nservices:\n"
                    "- name: echo\n  host: 127.0.0.1\n  port: 7\n")
    with pytest.raises(ConfigError) as raised:
        load_config(str(conf))
    assert [str(error) for error in raised.value.errors] == [
        f"{seed}:32: service 'echo' is defined in {conf} (line 4) and in {seed} (line 32)"]


def test_a_missing_declarative_file_is_an_error_of_that_file(tmp_path: Path):
    (tmp_path / "pyproxy.conf").write_text("stream_listen: [127.0.0.1:9000]\ndeclarative_config: nope.yml\n")
    assert errors_of(tmp_path / "pyproxy.conf") == [f"{tmp_path / 'nope.yml'}:1: no such file"]


def test_bad_files_get_errors_in_kongs_terms_at_their_lines(tmp_path: Path):
    path = tmp_path / "kong.yml"
    path.write_text(textwrap.dedent("""\
        _format_version: "3.0"
        services:
        - name: a
          protocol: tcp
          host: 127.0.0.1
          port: 1025
        - name: b
          protocol: tcp
          host: 127.0.0.1
          connect_timeout: 5s
          routes:
          - name: r
            protocols: [tcp]
            destinations:
            - port: "9000"
            colour: red
        routes:
        - name: top
          protocols: [tcp]
          service: {name: nope}
          destinations: [{port: 9001}]
        - name: pass
          protocols: [tls_passthrough]
          service: a
          destinations: [{port: 9443}]
        upstreams:
        - name: u
          healthchecks:
            active:
              healthy: {interval: "5s"}
          targets:
          - target: "127.0.0.1:x"
        """))
    assert errors_of(path) == [
        "10: services[1].connect_timeout: expected an integer",
        "15: services[1].routes[0].destinations[0].port: expected an integer",
        "16: services[1].routes[0].colour: unknown field",
        "20: routes[0].service: invalid reference 'service: {\"name\":\"nope\"}' "
        "(no such entry in 'services')",
        "23: routes[1].protocols: a tls_passthrough route needs snis",
        "30: upstreams[0].healthchecks.active.healthy.interval: expected a number",
        "32: upstreams[0].targets[0].target: expected a port number, got 'x'",
    ]


@pytest.mark.parametrize("text, expected", [
    ("_format_version:\nservices: []\n", ["1: _format_version: required field missing"]),
    ('_format_version: "4.0"\n', ["1: _format_version: expected one of: 1.1, 2.1, 3.0"]),
    ('_format_version: "3.0"\nservice: []\n', ["2: service: unknown field; did you mean 'services'?"]),
    ('_format_version: "3.0"\nservices: {}\n', ["2: services: expected an array"]),
    ('_format_version: "3.0"\ncertificates:\n- cert: not-a-pem\n  key: x\n',
     ["3: certificates[0].cert: invalid PEM: expected the certificate or key itself (PEM text)",
      "4: certificates[0].key: invalid PEM: expected the certificate or key itself (PEM text)"]),
    ('_format_version: "3.0"\nservices:\n- {name: s, url: "tcp://db:x"}\n',
     ["3: services[0].url: invalid url 'tcp://db:x': expected SCHEME://HOST[:PORT][/PATH]"]),
])
def test_whole_file_errors(tmp_path: Path, text: str, expected: list[str]):
    (tmp_path / "kong.yml").write_text(text)
    errors = errors_of(tmp_path / "kong.yml")
    assert errors[:len(expected)] == expected


def test_top_level_targets_snis_and_ids(tmp_path: Path, monkeypatch):
    monkeypatch.delenv("KONG_STREAM_LISTEN", raising=False)
    certificate_id = "2e4b7e0c-4d2f-4d55-9a2f-4f6c1b3b6a11"
    text = with_certificate("", tmp_path, "a.example").replace("  snis:\n  - name: a.example\n", "")
    text = text.replace("- cert:", f"- id: {certificate_id}\n  cert:")
    (tmp_path / "kong.yml").write_text('_format_version: "3.0"\n' + text + textwrap.dedent(f"""\
        snis:
        - name: b.example
          certificate: {{id: {certificate_id}}}
        upstreams:
        - name: pool
        targets:
        - target: 127.0.0.1:7001
          upstream: pool
          weight: 5
        services:
        - url: tls://pool:443
          routes:
          - name: t
            protocols: [tls]
            destinations: [{{port: 9443}}]
        """))
    config, _ = load(tmp_path / "kong.yml")
    assert config.certificates[0].snis == ("b.example",)
    assert [(t.port, t.weight) for t in config.upstream("pool").targets] == [(7001, 5)]
    (service,) = config.services
    assert (service.name, service.protocol, service.port) == (kong_id("services", f"{tmp_path / 'kong.yml'}"
                                                                       ":services[0]"), "tls", 443)


def test_plugins_keep_their_scope_and_http_ones_are_ignored(tmp_path: Path, monkeypatch):
    monkeypatch.delenv("KONG_STREAM_LISTEN", raising=False)
    (tmp_path / "kong.yml").write_text(textwrap.dedent("""\
        _format_version: "3.0"
        services:
        - name: s
          url: tcp://127.0.0.1:7000
          plugins:
          - name: file-log
            config: {path: sessions.log, reopen: true}
          routes:
          - name: r
            protocols: [tcp]
            destinations: [{port: 9000}]
            plugins:
            - name: ip-restriction
              config: {deny: [10.0.0.0/8], status: 403, message: go away}
        plugins:
        - name: ip-restriction
          enabled: false
          config: {allow: [127.0.0.1]}
        - name: rate-limiting
          config: {minute: 5}
        - name: limit-conn
          service: s
          config: {limit: 10}
        - name: ip-restriction
          protocols: [http, https]
          config: {allow: [127.0.0.1]}
        """))
    config, warnings = load(tmp_path / "kong.yml")
    plugins = [(plugin.name, plugin.route, plugin.service, dict(plugin.config)) for plugin in config.plugins]
    assert sorted(plugins) == [
        ("file-log", None, "s", {"path": "sessions.log"}),
        ("ip-restriction", "r", None, {"deny": ("10.0.0.0/8",)}),
        ("limit-conn", None, "s", {"limit": 10}),
    ]
    (ignored,) = [warning for warning in warnings if "ignored" in warning]
    assert sorted(ignored.partition("not in pyproxy): ")[2].split("; ")) == [
        "plugins[0] 'ip-restriction' (enabled: false)",
        "plugins[1] 'rate-limiting' (not a stream plugin pyproxy has)",
        "plugins[3] 'ip-restriction' (protocols http, https: not stream traffic)",
        "services[0].plugins[0].config.reopen",
        "services[0].routes[0].plugins[0].config.message",
        "services[0].routes[0].plugins[0].config.status",
    ]


def test_a_tls_service_trusts_the_ca_certificates_it_names(tmp_path: Path, monkeypatch):
    monkeypatch.delenv("KONG_STREAM_LISTEN", raising=False)
    crt, _ = make_cert(tmp_path, "ca.example", ["ca.example"])
    pem = textwrap.indent(crt.read_text(), "    ")
    ca_id = "7c2d7b9a-8a6e-4f43-9b7f-5a2b8d1c0e11"
    (tmp_path / "kong.yml").write_text(
        f'_format_version: "3.0"\nca_certificates:\n- id: {ca_id}\n  cert: |\n{pem}'
        f"services:\n- {{name: s, url: 'tls://127.0.0.1:8443', tls_verify: true,\n"
        f"   ca_certificates: [{ca_id}],\n"
        "   routes: [{protocols: [tcp], destinations: [{port: 9000}]}]}\n")
    config, _ = load(tmp_path / "kong.yml")
    (service,) = config.services
    assert service.tls_verify and Path(service.ca_certificates[0]).read_text() == crt.read_text()


def test_kong_tls_routes_may_terminate_with_the_pyproxy_files_certificates(tmp_path: Path):
    crt, key = make_cert(tmp_path, "own.example", ["own.example"])
    (tmp_path / "kong.yml").write_text(
        '_format_version: "3.0"\nservices:\n- name: s\n  url: tcp://127.0.0.1:7000\n  routes:\n'
        "  - {name: t, protocols: [tls], snis: [own.example]}\n")
    (tmp_path / "pyproxy.conf").write_text(f"stream_listen: ['127.0.0.1:9443 ssl']\n"
                                           f"declarative_config: kong.yml\n"
                                           f"certificates: [{{cert: {crt}, key: {key}}}]\n")
    config, _ = load(tmp_path / "pyproxy.conf")
    assert [route.name for route in config.routes] == ["t"] and len(config.certificates) == 1


def test_what_deck_writes_on_every_stream_entity_is_not_reported(tmp_path: Path, monkeypatch):
    """`deck dump` writes Kong's defaults, HTTP ones included, on every upstream and route: a stream
    configuration dumped so loads without an 'ignored' warning."""
    monkeypatch.delenv("KONG_STREAM_LISTEN", raising=False)
    (tmp_path / "kong.yml").write_text(textwrap.dedent("""\
        _format_version: "3.0"
        _info: {select_tags: [stream], defaults: {}}
        upstreams:
        - name: pool
          algorithm: round-robin
          hash_fallback: none
          hash_on: none
          hash_on_cookie_path: /
          healthchecks:
            active:
              concurrency: 10
              healthy: {http_statuses: [200, 302], interval: 0, successes: 0}
              http_path: /
              https_verify_certificate: true
              timeout: 1
              type: http
              unhealthy:
                http_failures: 0
                http_statuses: [429, 404, 500, 501, 502, 503, 504, 505]
                interval: 0
                tcp_failures: 0
                timeouts: 0
            passive:
              healthy:
                http_statuses: [200, 201, 202, 203, 204, 205, 206, 207, 208, 226, 300, 301, 302, 303, 304,
                                305, 306, 307, 308]
                successes: 0
              type: http
              unhealthy: {http_failures: 0, http_statuses: [429, 500, 503], tcp_failures: 0, timeouts: 0}
            threshold: 0
          slots: 10000
          use_srv_name: false
          targets:
          - {target: "127.0.0.1:7000", weight: 100}
        services:
        - name: db
          host: pool
          port: 5432
          protocol: tcp
          connect_timeout: 60000
          read_timeout: 60000
          write_timeout: 60000
          retries: 5
          enabled: true
          routes:
          - name: db
            https_redirect_status_code: 426
            path_handling: v0
            preserve_host: false
            protocols: [tcp]
            destinations: [{port: 9000}]
            regex_priority: 0
            request_buffering: true
            response_buffering: true
            strip_path: true
        """))
    config, warnings = load(tmp_path / "kong.yml")
    assert [route.name for route in config.routes] == ["db"]
    assert not [warning for warning in warnings if "ignored" in warning]


def test_a_port_wanted_for_tls_and_for_plain_tcp_is_an_error(tmp_path: Path, monkeypatch):
    monkeypatch.delenv("KONG_STREAM_LISTEN", raising=False)
    (tmp_path / "kong.yml").write_text(textwrap.dedent("""\
        _format_version: "3.0"
        services:
        - name: s
          url: tcp://127.0.0.1:7000
          routes:
          - {name: plain, protocols: [tcp], destinations: [{port: 9000}]}
          - {name: pass, protocols: [tls_passthrough], snis: [a.example], destinations: [{port: 9000}]}
          - {name: sni-only, protocols: [tls_passthrough], snis: [b.example]}
        """))
    assert errors_of(tmp_path / "kong.yml") == [
        "7: services[0].routes[1]: port 9000 is wanted for TLS and for plain TCP (by services[0].routes[0]): "
        "a listener is one or the other; set KONG_STREAM_LISTEN"]
    monkeypatch.setenv("KONG_STREAM_LISTEN", "127.0.0.1:9000, 127.0.0.1:9443 ssl")
    config, _ = load(tmp_path / "kong.yml")
    assert [route.name for route in config.routes] == ["plain", "pass", "sni-only"]


def test_test_mode_names_the_key_and_line_of_a_bad_kong_file(tmp_path: Path):
    (tmp_path / "kong.yml").write_text('_format_version: "3.0"\nservices:\n- name: s\n  protocol: tcp\n'
                                       '  host: 127.0.0.1\n  routes:\n  - protocols: [tcp]\n'
                                       '    destinations: [{port: nine}]\n')
    command = [sys.executable, "-m", "pyproxy", "-t", "-c", str(tmp_path / "kong.yml")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert (f"pyproxy: [emerg] {tmp_path / 'kong.yml'}:8: services[0].routes[0].destinations[0].port: "
            "expected an integer\n") in result.stderr


def test_a_server_name_both_files_certificates_serve_is_an_error(seed: Path, tmp_path: Path):
    crt, key = make_cert(tmp_path, "own", [SNI])
    conf = tmp_path / "pyproxy.conf"
    conf.write_text(f"stream_listen: ['127.0.0.1:9443 ssl']\ndeclarative_config: kong.yml\n"
                    f"certificates: [{{cert: {crt}, key: {key}}}]\n")
    assert errors_of(conf) == [
        f"{seed}:1: certificate for server name '{SNI}' is defined in {conf} and in {seed}"]


def test_the_dump_of_a_kong_configuration_loads_as_a_pyproxy_file(seed: Path, tmp_path: Path, monkeypatch):
    """`pyproxy -T -c kong.yml` prints a pyproxy file that means the same."""
    from pyproxy.config import config_as_yaml
    from tests.unit.test_config_dump import without_places

    monkeypatch.delenv("KONG_STREAM_LISTEN", raising=False)
    config, _ = load(seed)
    (tmp_path / "dumped.conf").write_text(config_as_yaml(config))
    again, _ = load(tmp_path / "dumped.conf")
    assert without_places(again) == without_places(config)
