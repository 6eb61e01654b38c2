"""pyproxy.config: the SPEC example loads into the expected dataclasses; every kind of mistake is
reported with its file, line and key path."""

from __future__ import annotations

import ipaddress
import os
import shutil
import subprocess
import textwrap
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

import pyproxy.dns
from pyproxy.config import (
    ACCESS_LOG_VARIABLES,
    AddressMatch,
    Certificate,
    CertKey,
    Config,
    ConfigError,
    ConfigIssue,
    Listen,
    load_config,
    loader,
    parse_address,
    parse_duration,
    pid_path_of,
    resolve_hostnames,
    validate_config,
)
from pyproxy.config.loader import YamlList, YamlMap, read_document
from pyproxy.config.model import Answer

# SPEC.md's example configuration, verbatim.
EXAMPLE = """\
worker_processes: auto            # or a number; auto = CPU count
worker_connections: 16384         # concurrent sessions per worker; beyond it new ones are refused (status 503)
worker_shutdown_timeout: 30s
pid: pyproxy.pid
user: nobody                      # when started as root: workers drop to this user after binding
status_listen: 127.0.0.1:9100     # optional: GET /metrics (Prometheus text) and /status (JSON)
error_log: stderr                 # or a path
log_level: notice
access_log: stdout                # or a path, or off
access_log_format: '$remote_addr [$time_local] $protocol $status $bytes_sent $bytes_received $session_time "$upstream_addr" "$ssl_server_name" $route'

stream_listen:                    # Kong's stream_listen: address:port [flags]
  - 0.0.0.0:9000
  - 0.0.0.0:9443 ssl              # TLS expected: the ClientHello is read before routing
  - "[::]:9000"
  - 127.0.0.1:9500 proxy_protocol backlog=16384   # PROXY v1/v2 header expected from a load balancer in front

ssl:                              # for terminating listeners
  protocols: [TLSv1.2, TLSv1.3]
  ciphers: ECDHE+AESGCM:ECDHE+CHACHA20
  default_certificate: {cert: certs/default.crt, key: certs/default.key}   # no or unknown SNI

certificates:
  - cert: certs/tls9443.kong.example.crt
    key: certs/tls9443.kong.example.key
    snis: [tls9443.kong.example]  # optional: default is the certificate's own names; wildcards allowed

upstreams:
  - name: echo-upstream
    algorithm: round-robin        # round-robin | least-connections | consistent-hashing
    hash_on: ip                   # consistent-hashing key: ip | sni
    healthchecks:
      active:  {type: tcp, interval: 5s, timeout: 1s, healthy: {successes: 2}, unhealthy: {tcp_failures: 2, timeouts: 2}}
      passive: {unhealthy: {tcp_failures: 3, timeouts: 3}}
    targets:
      - {target: 127.0.0.1:1025, weight: 100}
      - {target: 127.0.0.1:1026, weight: 50}

services:
  - name: echo
    protocol: tcp                 # tcp | tls (encrypt towards the upstream)
    host: echo-upstream           # an upstream's name, or a hostname / IP address
    port: 1025                    # used when host is not an upstream
    connect_timeout: 60s
    read_timeout: 60s             # idle time without bytes from the upstream
    write_timeout: 60s
    retries: 5                    # other targets tried when a connect fails
    tls_verify: false             # for protocol tls
    ca_certificates: []
    tls_server_name: null         # SNI sent upstream; default: host (or the client's SNI when passing through)
    proxy_protocol: off           # v1 | v2: send a PROXY header to the upstream
    routes:
      - name: echo-plaintext
        protocols: [tcp]
        destinations: [{port: 9000}]
      - name: echo-tls            # terminate, forward plain TCP
        protocols: [tls]
        snis: [tls9443.kong.example]
      - name: echo-pass           # do not terminate: forward the raw TLS stream
        protocols: [tls_passthrough]
        snis: ["*.pass.example"]
        sources: [{ip: 10.0.0.0/8}]

plugins:                          # run in the preread phase (before the upstream is chosen) and the log phase
  - name: ip-restriction
    route: echo-plaintext         # or service: NAME, or neither for every session
    config: {allow: [127.0.0.0/8], deny: []}
"""  # noqa: E501 (SPEC.md's example, verbatim)

# The smallest valid file, to which tests add the part they are about.
MINIMAL = """\
stream_listen: [127.0.0.1:9000]
services:
  - name: svc
    host: 127.0.0.1
    port: 1025
    routes:
      - name: plain
        destinations: [{port: 9000}]
"""

ISSUE_FORMAT = r"^.+:\d+: (\S+: )?.+$"


# --- certificates made with the openssl command line ------------------------------------------------

def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


def make_certificate(folder: Path, stem: str, common_name: str, dns_names: tuple[str, ...] = (),
                     days: int = 3) -> None:
    """A self-signed RSA certificate `stem.crt` and its key `stem.key` (mode 0600) in `folder`.

    `days` may be negative: the certificate is then already expired.
    """
    cert, key = folder / f"{stem}.crt", folder / f"{stem}.key"
    if days > 0:
        names = ",".join(f"DNS:{name}" for name in dns_names)
        extra = ["-addext", f"subjectAltName={names}"] if dns_names else []
        _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", str(days),
                 "-subj", f"/CN={common_name}", *extra, "-keyout", str(key), "-out", str(cert))
    else:
        # `req -x509` refuses a negative -days; `x509 -req` signing a request accepts one (OpenSSL 3.0).
        request = folder / f"{stem}.csr"
        _openssl("req", "-new", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={common_name}",
                 "-keyout", str(key), "-out", str(request))
        _openssl("x509", "-req", "-in", str(request), "-signkey", str(key), "-days", str(days),
                 "-out", str(cert))
    os.chmod(key, 0o600)


@pytest.fixture(scope="session")
def certificate_folder(tmp_path_factory) -> Path:
    """Every certificate the tests use, made once per session."""
    folder = tmp_path_factory.mktemp("certificates")
    make_certificate(folder, "default", "default.example", ("default.example",))
    make_certificate(folder, "tls9443.kong.example", "tls9443.kong.example", ("tls9443.kong.example",))
    make_certificate(folder, "multi", "multi.example", ("A.Example", "*.b.example"))
    make_certificate(folder, "cn-only", "CN-Only.Example")
    make_certificate(folder, "expired", "expired.example", days=-1)
    return folder


@pytest.fixture
def conf_dir(tmp_path: Path, certificate_folder: Path) -> Path:
    """A folder with `certs/` holding a copy of every test certificate."""
    shutil.copytree(certificate_folder, tmp_path / "certs")
    return tmp_path


def write(conf_dir: Path, text: str, name: str = "pyproxy.conf") -> str:
    path = conf_dir / name
    path.write_text(textwrap.dedent(text))
    return str(path)


def errors_of(conf_dir: Path, text: str) -> list[ConfigIssue]:
    """The errors load_config reports for `text` (the test fails if it loads)."""
    with pytest.raises(ConfigError) as raised:
        load_config(write(conf_dir, text))
    for issue in raised.value.errors:
        assert issue.file == str(conf_dir / "pyproxy.conf")
    return raised.value.errors


def only_error(conf_dir: Path, text: str) -> ConfigIssue:
    errors = errors_of(conf_dir, text)
    assert len(errors) == 1, "\n".join(map(str, errors))
    return errors[0]


def line_of(text: str, needle: str) -> int:
    """The 1-based number of the first line of `text` containing `needle`."""
    for number, line in enumerate(textwrap.dedent(text).splitlines(), start=1):
        if needle in line:
            return number
    raise AssertionError(f"{needle!r} not in the text")


def load(conf_dir: Path, text: str, warnings: list[str] | None = None) -> Config:
    return load_config(write(conf_dir, text), warn=warnings.append if warnings is not None else None)


# --- the SPEC example ---------------------------------------------------------------------------------

def test_spec_example_loads_with_expected_values(conf_dir: Path):
    warnings: list[str] = []
    config = load(conf_dir, EXAMPLE, warnings)
    path = str(conf_dir / "pyproxy.conf")

    assert config.path == path
    assert config.worker_processes == os.cpu_count()
    assert config.worker_connections == 16384
    assert config.worker_shutdown_timeout == 30.0
    assert config.worker_sched_policy == "normal"
    assert config.pid == str(conf_dir / "pyproxy.pid")
    assert config.user == "nobody"
    assert config.status_listen == ("127.0.0.1", 9100)
    assert (config.error_log, config.log_level, config.access_log) == ("stderr", "notice", "stdout")
    assert config.access_log_format.startswith("$remote_addr [$time_local]")
    assert config.stream_listen == (
        Listen("0.0.0.0", 9000, line=13),
        Listen("0.0.0.0", 9443, ssl=True, line=14),
        Listen("::", 9000, line=15),
        Listen("127.0.0.1", 9500, proxy_protocol=True, backlog=16384, line=16),
    )
    assert config.ssl.protocols == ("TLSv1.2", "TLSv1.3")
    assert config.ssl.ciphers == "ECDHE+AESGCM:ECDHE+CHACHA20"
    assert config.ssl.default_certificate == CertKey(f"{conf_dir}/certs/default.crt",
                                                     f"{conf_dir}/certs/default.key")
    assert (config.ssl.preread_timeout, config.ssl.handshake_timeout) == (5.0, 10.0)
    assert config.certificates == (Certificate(f"{conf_dir}/certs/tls9443.kong.example.crt",
                                               f"{conf_dir}/certs/tls9443.kong.example.key",
                                               ("tls9443.kong.example",)),)

    upstream = config.upstream("echo-upstream")
    assert (upstream.algorithm, upstream.hash_on) == ("round-robin", "ip")
    active, passive = upstream.healthchecks.active, upstream.healthchecks.passive
    assert (active.type, active.interval, active.timeout) == ("tcp", 5.0, 1.0)
    assert (active.healthy_successes, active.unhealthy_tcp_failures, active.unhealthy_timeouts) == (2, 2, 2)
    assert (passive.unhealthy_tcp_failures, passive.unhealthy_timeouts, passive.fail_timeout) == (3, 3, 10.0)
    assert [(t.host, t.port, t.weight, t.addresses, t.line) for t in upstream.targets] == [
        ("127.0.0.1", 1025, 100, (("127.0.0.1", 1025),), 36),
        ("127.0.0.1", 1026, 50, (("127.0.0.1", 1026),), 37),
    ]

    service = config.service("echo")
    assert (service.protocol, service.host, service.port, service.upstream, service.addresses) == \
        ("tcp", "echo-upstream", 1025, "echo-upstream", ())
    assert (service.connect_timeout, service.read_timeout, service.write_timeout) == (60.0, 60.0, 60.0)
    assert (service.retries, service.tls_verify, service.ca_certificates) == (5, False, ())
    assert (service.tls_server_name, service.proxy_protocol) == (None, "off")
    plaintext, tls, passthrough = config.routes
    assert (plaintext.name, plaintext.service, plaintext.protocols, plaintext.index, plaintext.line) == \
        ("echo-plaintext", "echo", ("tcp",), 0, 53)
    assert plaintext.destinations == (AddressMatch(port=9000),)
    assert (tls.protocols, tls.snis, tls.index) == (("tls",), ("tls9443.kong.example",), 1)
    assert (passthrough.protocols, passthrough.snis, passthrough.index) == \
        (("tls_passthrough",), ("*.pass.example",), 2)
    assert passthrough.sources == (AddressMatch(network=ipaddress.ip_network("10.0.0.0/8")),)

    (plugin,) = config.plugins
    assert (plugin.name, plugin.route, plugin.service, plugin.line) == ("ip-restriction", "echo-plaintext",
                                                                         None, 65)
    assert plugin.config == (("allow", ("127.0.0.0/8",)), ("deny", ()))
    hash(config)     # frozen all the way down

    assert warnings == []


def test_minimal_config_gets_the_model_defaults(conf_dir: Path):
    config = load(conf_dir, MINIMAL)
    assert config.worker_processes == 1 and config.access_log == "stdout"
    assert config.pid == f"{conf_dir}/pyproxy.pid"          # nginx-like: a pid file unless `pid: off`
    assert config.ssl.default_certificate is None and config.upstreams == ()
    (service,) = config.services
    assert (service.upstream, service.addresses, service.proxy_protocol) == (None, (("127.0.0.1", 1025),),
                                                                             "off")
    assert config.routes[0].protocols == ("tcp",)


# --- errors of the whole file -------------------------------------------------------------------------

def test_missing_file(tmp_path: Path):
    with pytest.raises(ConfigError) as raised:
        load_config(str(tmp_path / "nope.conf"))
    assert str(raised.value) == f"{tmp_path}/nope.conf:1: no such file"


def test_directory_instead_of_file(tmp_path: Path):
    with pytest.raises(ConfigError, match="is a directory"):
        load_config(str(tmp_path))


def test_relative_path_is_reported_absolute(conf_dir: Path, monkeypatch):
    write(conf_dir, MINIMAL + "bogus: 1\n")
    monkeypatch.chdir(conf_dir)
    with pytest.raises(ConfigError) as raised:
        load_config("pyproxy.conf")
    assert str(raised.value).startswith(f"{conf_dir}/pyproxy.conf:9: bogus: unknown key 'bogus'")


def test_not_utf8_names_the_line(conf_dir: Path):
    path = conf_dir / "pyproxy.conf"
    path.write_bytes(MINIMAL.encode() + b"user: caf\xe9\n")
    with pytest.raises(ConfigError) as raised:
        load_config(str(path))
    assert str(raised.value) == f"{path}:9: not UTF-8 text (byte 0xe9)"


def test_yaml_syntax_error_names_the_line(conf_dir: Path):
    text = MINIMAL + "ssl:\n  protocols: [TLSv1.2\n  ciphers: x\n"
    error = only_error(conf_dir, text)
    assert error.key == "ssl.protocols" and error.message.startswith("invalid YAML:")
    assert error.line in (11, 12)


def test_tab_indentation_is_a_yaml_error(conf_dir: Path):
    error = only_error(conf_dir, "stream_listen:\n\t- 127.0.0.1:9000\n")
    assert (error.line, error.key) == (2, "stream_listen")
    assert "invalid YAML" in error.message


def test_control_character_is_a_yaml_error(conf_dir: Path):
    error = only_error(conf_dir, MINIMAL + "user: a\x07b\n")
    assert (error.line, error.key) == (9, "user")


def test_empty_file_has_nothing_to_listen_on(conf_dir: Path):
    error = only_error(conf_dir, "")
    assert str(error) == (f"{conf_dir}/pyproxy.conf:1: stream_listen: nothing to listen on: add at least "
                          "one stream_listen address")


@pytest.mark.parametrize("text, message", [
    ("- a\n- b\n", "expected a mapping, got a list"),
    ("just words\n", "expected a mapping, got 'just words'"),
])
def test_top_level_must_be_a_mapping(conf_dir: Path, text: str, message: str):
    error = only_error(conf_dir, text)
    assert (error.line, error.key, error.message) == (1, "", message)


def test_duplicate_key_names_both_lines(conf_dir: Path):
    text = MINIMAL + "log_level: info\nworker_connections: 10\nlog_level: debug\n"
    error = only_error(conf_dir, text)
    assert (error.line, error.key) == (11, "log_level")
    assert error.message == "duplicate key 'log_level': already set at line 9"


def test_duplicate_key_in_a_nested_mapping(conf_dir: Path):
    text = MINIMAL.replace("    port: 1025\n", "    port: 1025\n    port: 1026\n")
    error = only_error(conf_dir, text)
    assert (error.line, error.key) == (6, "services[0].port")


def test_every_error_is_listed_in_file_order(conf_dir: Path):
    text = """\
        worker_processes: 0
        stream_listen: [127.0.0.1:9000, 127.0.0.1:99999]
        log_level: loud
        services:
          - name: svc
            host: 127.0.0.1
            retries: -1
            routes:
              - {name: r, destinations: [{port: 9000}], snis: [a.*.b]}
        """
    errors = errors_of(conf_dir, text)
    assert [(e.line, e.key) for e in errors] == [
        (1, "worker_processes"),
        (2, "stream_listen[1]"),
        (3, "log_level"),
        (7, "services[0].retries"),
        (9, "services[0].routes[0].snis[0]"),
        (9, "services[0].routes[0].snis"),
    ]
    assert str(ConfigError(errors)).count("\n") == len(errors) - 1


def test_issue_and_error_strings():
    issue = ConfigIssue("/etc/pyproxy/pyproxy.conf", 42, "services[0].routes[1].snis[0]", "bad\nname")
    assert str(issue) == "/etc/pyproxy/pyproxy.conf:42: services[0].routes[1].snis[0]: bad name"
    error = ConfigError([issue, issue])
    assert str(error) == f"{issue}\n{issue}" and error.errors == [issue, issue]


# --- unknown keys and types ---------------------------------------------------------------------------

def test_unknown_top_level_key_suggests_the_close_one(conf_dir: Path):
    error = only_error(conf_dir, MINIMAL + "worker_conections: 10\n")
    assert str(error).endswith(":9: worker_conections: unknown key 'worker_conections'; "
                               "did you mean 'worker_connections'?")


def test_unknown_nested_key_has_its_path(conf_dir: Path):
    text = MINIMAL.replace("        destinations:", "        snsi: [a.example]\n        destinations:")
    error = only_error(conf_dir, text)
    assert (error.line, error.key) == (8, "services[0].routes[0].snsi")
    assert error.message == "unknown key 'snsi'; did you mean 'snis'?"


def test_unknown_key_without_a_close_match(conf_dir: Path):
    error = only_error(conf_dir, MINIMAL + "zzz: 1\n")
    assert error.message == "unknown key 'zzz'"


def test_odd_unknown_key_stays_out_of_the_path(conf_dir: Path):
    error = only_error(conf_dir, MINIMAL + "ssl: {'two words': 1}\n")
    assert (error.key, error.message) == ("ssl", "unknown key 'two words'")


@pytest.mark.parametrize("line, key, message", [
    ("worker_connections: abc", "worker_connections", "expected an integer, got 'abc'"),
    ("worker_connections: 0", "worker_connections", "0 is out of range (1-2147483647)"),
    ("worker_connections: 1.5", "worker_connections", "expected an integer, got 1.5"),
    ("worker_connections: true", "worker_connections", "expected an integer, got true"),
    ("worker_processes: 0", "worker_processes", "0 is out of range (1-1024)"),
    ("worker_processes: 2000", "worker_processes", "2000 is out of range (1-1024)"),
    ("worker_processes: many", "worker_processes", "expected auto or a number of processes, got 'many'"),
    ("worker_shutdown_timeout: -5s", "worker_shutdown_timeout",
     "expected a duration such as 500ms, 30s, 5m or 1m30s, got '-5s'"),
    ("log_level: warning", "log_level",
     "expected one of debug, info, notice, warn, error, crit, got 'warning'; did you mean 'warn'?"),
    ("user: no-such-user-here", "user", "no such user: 'no-such-user-here'"),
    ("worker_sched_policy: fifo", "worker_sched_policy", "expected one of normal, batch, got 'fifo'"),
    ("status_listen: localhost:9100", "status_listen",
     "expected an IPv4 address to listen on, got 'localhost'"),
    ("status_listen: 127.0.0.1:9000", "status_listen", "the status address is also a stream_listen address"),
    ("error_log: off", "error_log", "error_log goes to stderr or to a file, not false"),
    ("pid: [a]", "pid", "expected a string, got a list"),
    ("access_log: nowhere/access.log", "access_log", "the folder {dir}/nowhere does not exist"),
    ("ssl: []", "ssl", "expected a mapping, got a list"),
    ("upstreams: {name: x}", "upstreams", "expected a list, got a mapping"),
])
def test_wrong_values(conf_dir: Path, line: str, key: str, message: str):
    error = only_error(conf_dir, MINIMAL + line + "\n")
    assert (error.line, error.key, error.message) == (9, key, message.format(dir=conf_dir))


@pytest.mark.parametrize("fragment, key, message", [
    ("port: 70000", "services[0].port", "port 70000 is out of range (1-65535)"),
    ("retries: 40000", "services[0].retries", "40000 is out of range (0-32767)"),
    ("retries: -1", "services[0].retries", "-1 is out of range (0-32767)"),
    ("connect_timeout: 0", "services[0].connect_timeout", "must be longer than 0"),
    ("protocol: quic", "services[0].protocol", "expected one of tcp, tls, udp, got 'quic'"),
    ("proxy_protocol: v3", "services[0].proxy_protocol", "expected one of off, v1, v2, got 'v3'"),
    ("proxy_protocol: true", "services[0].proxy_protocol", "expected one of off, v1, v2, got true"),
    ("tls_verify: maybe", "services[0].tls_verify", "expected true or false, got 'maybe'"),
    ("tls_server_name: '*.x'", "services[0].tls_server_name",
     "expected a host name to send as SNI, got '*.x'"),
    ("tcp_congestion: 5", "services[0].tcp_congestion",
     "expected the name of a TCP congestion control algorithm such as cubic, got 5"),
    ("tcp_congestion: Cubic", "services[0].tcp_congestion",
     "expected the name of a TCP congestion control algorithm such as cubic, got 'Cubic'"),
])
def test_wrong_service_values(conf_dir: Path, fragment: str, key: str, message: str):
    text = MINIMAL.replace("    port: 1025\n", f"    port: 1025\n    {fragment}\n", 1)
    if fragment.startswith("port:"):
        text = text.replace("    port: 1025\n", "", 1)
    error = only_error(conf_dir, text)
    assert (error.key, error.message) == (key, message)
    assert error.line == line_of(text, fragment)


def test_tcp_congestion_is_what_the_kernel_takes(conf_dir: Path):
    text = MINIMAL.replace("    port: 1025\n", "    port: 1025\n    tcp_congestion: reno\n", 1)
    assert load(conf_dir, text).services[0].tcp_congestion == "reno"     # reno is always built in
    assert load(conf_dir, MINIMAL).services[0].tcp_congestion is None


def test_tcp_congestion_the_kernel_refuses_names_what_it_has(conf_dir: Path):
    text = MINIMAL.replace("    port: 1025\n", "    port: 1025\n    tcp_congestion: renoo\n", 1)
    error = only_error(conf_dir, text)
    assert (error.key, error.line) == ("services[0].tcp_congestion", line_of(text, "tcp_congestion"))
    assert error.message.startswith("TCP congestion control 'renoo' cannot be used here (")
    available = Path("/proc/sys/net/ipv4/tcp_available_congestion_control").read_text().split()
    assert f"this host has {', '.join(available)}; did you mean 'reno'?" in error.message


def test_names_use_kongs_alphabet(conf_dir: Path):
    error = only_error(conf_dir, MINIMAL.replace("name: svc", "name: 'has space'"))
    assert (error.line, error.key, error.message) == \
        (3, "services[0].name", "invalid name 'has space': use letters, digits, '.', '-', '_' and '~'")


def test_required_key_missing_points_at_the_mapping(conf_dir: Path):
    text = MINIMAL.replace("  - name: svc\n    host: 127.0.0.1\n", "  - host: 127.0.0.1\n")
    error = only_error(conf_dir, text)
    assert (error.line, error.key, error.message) == (3, "services[0].name", "required key is missing")


def test_null_counts_as_absent(conf_dir: Path):
    config = load(conf_dir, MINIMAL + "log_level: null\nssl: ~\n")
    assert config.log_level == "notice" and config.ssl.protocols == ("TLSv1.2", "TLSv1.3")


# --- durations and addresses --------------------------------------------------------------------------

@pytest.mark.parametrize("value, seconds", [
    ("500ms", 0.5), ("30s", 30.0), ("5m", 300.0), ("1h", 3600.0), ("1d", 86400.0), ("1m30s", 90.0),
    ("1h 30m", 5400.0), ("1s500ms", 1.5), (250, 0.25), ("250", 0.25), (0, 0.0), ("0s", 0.0),
])
def test_parse_duration(value, seconds):
    assert parse_duration(value) == seconds


@pytest.mark.parametrize("value", [
    -1, "-1s", "1.5s", "abc", "", "s", "5 minutes", "30s1m", "1s1s", True, None, [], "1y", 10**20, "400d",
])
def test_parse_duration_rejects(value):
    with pytest.raises(ValueError):
        parse_duration(value)


@pytest.mark.parametrize("text, address", [
    ("127.0.0.1:9000", ("127.0.0.1", 9000)),
    ("[::1]:9000", ("::1", 9000)),
    ("[0:0::0]:9000", ("::", 9000)),
    ("0.0.0.0:9000", ("0.0.0.0", 9000)),
    ("*:9000", ("0.0.0.0", 9000)),
    ("9000", ("0.0.0.0", 9000)),
    (9000, ("0.0.0.0", 9000)),
])
def test_parse_address(text, address):
    assert parse_address(text) == address


@pytest.mark.parametrize("text", [
    "localhost:9000", "::1:9000", "[::1]", "[127.0.0.1]:80", "127.0.0.1", "1.2.3.4:0", "1.2.3.4:65536",
    "1.2.3.4:http", "", None, True, 70000, "[::1]:9000x",
])
def test_parse_address_rejects(text):
    with pytest.raises(ValueError):
        parse_address(text)


# --- paths and logs -----------------------------------------------------------------------------------

def test_paths_are_relative_to_the_config_folder(conf_dir: Path, monkeypatch):
    (conf_dir / "logs").mkdir()
    monkeypatch.chdir("/")
    config = load(conf_dir,
                  MINIMAL + "pid: run.pid\nerror_log: logs/error.log\naccess_log: ./logs/../access.log\n")
    assert config.pid == f"{conf_dir}/run.pid"
    assert config.error_log == f"{conf_dir}/logs/error.log"
    assert config.access_log == f"{conf_dir}/access.log"


def test_absolute_paths_are_kept(conf_dir: Path):
    config = load(conf_dir, MINIMAL + f"pid: {conf_dir}/x.pid\n")
    assert config.pid == f"{conf_dir}/x.pid"


@pytest.mark.parametrize("value, expected", [("off", None), ("'off'", None), ("false", None),
                                             ("stdout", "stdout"), ("stderr", "stderr")])
def test_access_log_words(conf_dir: Path, value: str, expected):
    assert load(conf_dir, MINIMAL + f"access_log: {value}\n").access_log == expected


def test_pid_off(conf_dir: Path):
    assert load(conf_dir, MINIMAL + "pid: off\n").pid is None


def test_pid_path_of_reads_only_the_pid(conf_dir: Path):
    path = write(conf_dir, MINIMAL + "pid: master.pid\nlog_level: broken\n")
    assert pid_path_of(path) == f"{conf_dir}/master.pid"
    write(conf_dir, "pid: off\n")
    assert pid_path_of(path) is None
    write(conf_dir, "log_level: broken\n")
    assert pid_path_of(path) == f"{conf_dir}/pyproxy.pid"


def test_access_log_format_variables(conf_dir: Path):
    every_variable = " ".join("$" + name for name in ACCESS_LOG_VARIABLES) + " ${route}x"
    config = load(conf_dir, MINIMAL + f"access_log_format: '{every_variable}'\n")
    assert config.access_log_format == every_variable


@pytest.mark.parametrize("fmt, message", [
    ("$remote_adr $status", "unknown variable '$remote_adr'; did you mean 'remote_addr'?"),
    ("${bytes_sen}", "unknown variable '$bytes_sen'; did you mean 'bytes_sent'?"),
    ("$request_uri", "unknown variable '$request_uri'"),
    ("cost: $ 5", "'$' at offset 6 is not followed by a variable name (write $name or ${name})"),
    ("${status", "'$' at offset 0 is not followed by a variable name (write $name or ${name})"),
])
def test_access_log_format_errors(conf_dir: Path, fmt: str, message: str):
    error = only_error(conf_dir, MINIMAL + f"access_log_format: '{fmt}'\n")
    assert (error.line, error.key, error.message) == (9, "access_log_format", message)


# --- stream_listen ------------------------------------------------------------------------------------

def test_listen_flags(conf_dir: Path):
    warnings: list[str] = []
    text = MINIMAL.replace("stream_listen: [127.0.0.1:9000]",
                           "stream_listen:\n  - 127.0.0.1:9000 ssl proxy_protocol backlog=100 reuseport\n"
                           "  - '*:9001'\n  - 9002\n  - '[::1]:9000'")
    config = load(conf_dir, text, warnings)
    assert config.stream_listen == (
        Listen("127.0.0.1", 9000, ssl=True, proxy_protocol=True, backlog=100, line=2),
        Listen("0.0.0.0", 9001, line=3),
        Listen("0.0.0.0", 9002, line=4),
        Listen("::1", 9000, line=5),
    )
    assert any(":2: stream_listen[0]: reuseport is always on" in warning for warning in warnings)


def test_listen_as_kong_comma_separated_string(conf_dir: Path):
    text = MINIMAL.replace("stream_listen: [127.0.0.1:9000]",
                           "stream_listen: 127.0.0.1:9000, 127.0.0.1:9443 ssl")
    config = load(conf_dir, text)
    assert [(listen.port, listen.ssl) for listen in config.stream_listen] == [(9000, False), (9443, True)]


def test_ipv4_and_ipv6_wildcards_on_one_port_are_fine(conf_dir: Path):
    text = MINIMAL.replace("[127.0.0.1:9000]", "[0.0.0.0:9000, '[::]:9000']")
    assert len(load(conf_dir, text).stream_listen) == 2


def test_duplicate_listen_address(conf_dir: Path):
    text = MINIMAL.replace("stream_listen: [127.0.0.1:9000]",
                           "stream_listen:\n  - 127.0.0.1:9000\n  - 127.0.0.1:9000 ssl")
    error = only_error(conf_dir, text)
    assert (error.line, error.key, error.message) == (3, "stream_listen[1]",
                                                      "127.0.0.1:9000 is already listed at line 2")


@pytest.mark.parametrize("entry, message", [
    ("127.0.0.1:9000 sssl", "unknown listen flag 'sssl'; did you mean 'ssl'?"),
    ("127.0.0.1:9000 backlog=many", "expected an integer, got 'many'"),
    ("127.0.0.1:9000 backlog=0", "0 is out of range (1-2147483647)"),
    ("127.0.0.1:9000 backlog", "unknown listen flag 'backlog'; did you mean 'backlog'?"),
    ("127.0.0.1:9000 ssl ssl", "listen flag 'ssl' is given twice"),
    ("::1:9000", "write an IPv6 address in brackets, such as [::1]:9000, got '::1:9000'"),
    ("example.com:9000", "expected an IPv4 address to listen on, got 'example.com'"),
    ("127.0.0.1:0", "port 0 is out of range (1-65535)"),
])
def test_bad_listen_entries(conf_dir: Path, entry: str, message: str):
    text = MINIMAL.replace("stream_listen: [127.0.0.1:9000]",
                           f"stream_listen:\n  - 127.0.0.1:9001\n  - '{entry}'")
    error = only_error(conf_dir, text)
    assert (error.line, error.key, error.message) == (3, "stream_listen[1]", message)


def test_empty_stream_listen(conf_dir: Path):
    error = only_error(conf_dir, MINIMAL.replace("[127.0.0.1:9000]", "[]"))
    assert (error.line, error.key) == (1, "stream_listen")
    assert error.message.startswith("nothing to listen on")


# --- upstreams and targets ----------------------------------------------------------------------------

UPSTREAMS = """\
stream_listen: [127.0.0.1:9000]
upstreams:
  - name: pool
    algorithm: consistent-hashing
    hash_on: sni
    targets:
      - {target: 10.0.0.1}
      - {target: "[::1]:7000", weight: 0}
      - {target: "::2"}
      - {target: backend.test:7001, weight: 65535}
services:
  - name: svc
    host: pool
    routes:
      - {name: plain, destinations: [{port: 9000}]}
"""


NOT_FOUND = Answer(error="not found (NXDOMAIN)", not_found=True)


def answer_from(table: dict[str, list[str]], asked: list[str] | None = None):
    """A pyproxy.dns.resolve_now answering from `table`, and NXDOMAIN for every other name."""
    def resolve_now(hosts, settings, timeout=10.0):
        if asked is not None:
            asked.extend(hosts)
        return {host: Answer(tuple((ip, 0, 0) for ip in table[host]), 30.0) if host in table else NOT_FOUND
                for host in hosts}
    return resolve_now


@pytest.fixture
def fake_dns(monkeypatch):
    """Answers `*.test` names from a table and NXDOMAIN for every other name, without the network."""
    table = {"backend.test": ["192.0.2.10", "2001:db8::10"], "db.test": ["192.0.2.20"]}
    monkeypatch.setattr(pyproxy.dns, "resolve_now", answer_from(table))


def test_targets_and_their_addresses(conf_dir: Path, fake_dns):
    upstream = load(conf_dir, UPSTREAMS).upstream("pool")
    assert (upstream.algorithm, upstream.hash_on) == ("consistent-hashing", "sni")
    assert [(t.host, t.port, t.weight, t.addresses) for t in upstream.targets] == [
        ("10.0.0.1", 8000, 100, (("10.0.0.1", 8000),)),
        ("::1", 7000, 0, (("::1", 7000),)),
        ("::2", 8000, 100, (("::2", 8000),)),
        ("backend.test", 7001, 65535, (("192.0.2.10", 7001), ("2001:db8::10", 7001))),
    ]
    assert [t.line for t in upstream.targets] == [7, 8, 9, 10]


def test_unresolvable_target(conf_dir: Path, fake_dns):
    text = UPSTREAMS.replace("backend.test:7001", "nowhere.test:7001")
    warnings: list[str] = []
    config = load(conf_dir, text, warnings)
    assert config.upstream("pool").targets[3].addresses == ()
    assert warnings == [f"{conf_dir / 'pyproxy.conf'}:10: upstreams[0].targets[3].target: cannot resolve "
                        "'nowhere.test': not found (NXDOMAIN) (dns_strict is off: it has no address until "
                        "it resolves)"]
    error = only_error(conf_dir, "dns_strict: on\n" + text)
    assert (error.line, error.key) == (11, "upstreams[0].targets[3].target")
    assert error.message == "cannot resolve 'nowhere.test': not found (NXDOMAIN)"


def test_service_host_is_resolved(conf_dir: Path, fake_dns):
    service = load(conf_dir, MINIMAL.replace("host: 127.0.0.1", "host: db.test")).service("svc")
    assert (service.upstream, service.addresses) == (None, (("192.0.2.20", 1025),))


def test_unresolvable_service_host(conf_dir: Path, fake_dns):
    text = "dns_strict: on\n" + MINIMAL.replace("host: 127.0.0.1", "host: nowhere.test")
    error = only_error(conf_dir, text)
    assert (error.line, error.key) == (5, "services[0].host")


def test_validation_only_records_host_names_and_prepare_resolves_them(conf_dir: Path, monkeypatch):
    """The master's reload path validates without waiting on DNS; prepare asks once per name."""
    asked: list[str] = []
    monkeypatch.setattr(pyproxy.dns, "resolve_now", answer_from({"backend.test": ["192.0.2.10"]}, asked))
    text = "dns_strict: on\n" + UPSTREAMS + """\
  - name: direct
    host: db.test
    port: 5432
    routes: [{name: db, destinations: [{port: 9001}]}]
"""
    path = write(conf_dir, text)
    config = validate_config(path, read_document(path))
    assert asked == []
    assert [(h.host, h.port, h.line, h.key) for h in config.hostnames] == [
        ("backend.test", 7001, 11, "upstreams[0].targets[3].target"),
        ("db.test", 5432, line_of(text, "db.test"), "services[1].host")]
    assert config.upstream("pool").targets[3].addresses == ()
    with pytest.raises(ConfigError) as raised:
        resolve_hostnames(config)
    assert [str(error) for error in raised.value.errors] == [
        f"{path}:{line_of(text, 'db.test')}: services[1].host: cannot resolve 'db.test': "
        "not found (NXDOMAIN)"]
    prepared = resolve_hostnames(replace(config, hostnames=config.hostnames[:1]))
    assert prepared.upstream("pool").targets[3].addresses == (("192.0.2.10", 7001),)
    assert prepared.upstream("pool").targets[0] == config.upstream("pool").targets[0]
    assert asked == ["backend.test", "db.test", "backend.test"]


def test_unresolvable_names_are_listed_with_the_other_errors(conf_dir: Path, fake_dns):
    text = "dns_strict: on\n" + UPSTREAMS.replace("backend.test:7001", "nowhere.test:7001")
    errors = errors_of(conf_dir, text.replace("weight: 0", "weight: -1"))
    assert [(error.line, error.key) for error in errors] == [
        (9, "upstreams[0].targets[1].weight"), (11, "upstreams[0].targets[3].target")]


@pytest.mark.parametrize("target, message", [
    ("10.0.0.1:0", "port 0 is out of range (1-65535)"),
    ("10.0.0.1:x", "expected a port number, got 'x'"),
    ("bad_host!:80", "expected a hostname or an IP address, got 'bad_host!'"),
    ("10.0.0:80", "expected a hostname or an IP address, got '10.0.0'"),
    ("[10.0.0.1]:80", "'10.0.0.1' is not an IPv6 address"),
    ("1:2:3", "expected HOST:PORT (IPv6 addresses in brackets), got '1:2:3'"),
])
def test_bad_targets(conf_dir: Path, fake_dns, target: str, message: str):
    error = only_error(conf_dir, UPSTREAMS.replace("10.0.0.1}", f"'{target}'}}"))
    assert (error.line, error.key, error.message) == (7, "upstreams[0].targets[0].target", message)


def test_target_weight_range(conf_dir: Path, fake_dns):
    error = only_error(conf_dir, UPSTREAMS.replace("weight: 65535", "weight: 65536"))
    assert (error.line, error.key, error.message) == \
        (10, "upstreams[0].targets[3].weight", "65536 is out of range (0-65535)")


def test_duplicate_target(conf_dir: Path, fake_dns):
    error = only_error(conf_dir, UPSTREAMS.replace('"::2"', '"[::1]:7000"'))
    assert (error.line, error.key, error.message) == \
        (9, "upstreams[0].targets[2].target", "target '[::1]:7000' is already listed at line 8")


def test_duplicate_upstream_name(conf_dir: Path, fake_dns):
    text = UPSTREAMS.replace("services:", "  - {name: pool, targets: [{target: 10.0.0.9}]}\nservices:")
    error = only_error(conf_dir, text)
    assert (error.line, error.key, error.message) == (11, "upstreams[1].name",
                                                      "upstream name 'pool' is already used at line 3")


def test_bad_algorithm_suggests(conf_dir: Path, fake_dns):
    error = only_error(conf_dir, UPSTREAMS.replace("consistent-hashing", "round_robin"))
    assert error.message.endswith("got 'round_robin'; did you mean 'round-robin'?")
    assert (error.line, error.key) == (4, "upstreams[0].algorithm")


def test_healthchecks(conf_dir: Path, fake_dns):
    warnings: list[str] = []
    text = UPSTREAMS.replace("    targets:\n", """\
    healthchecks:
      active: {send: "PING\\r\\n", expect: !!binary UE9ORw==, timeout: 250ms}
      passive: {type: tcp, unhealthy: {timeouts: 0}, fail_timeout: 1m}
    targets:
""")
    health = load(conf_dir, text, warnings).upstream("pool").healthchecks
    assert (health.active.send, health.active.expect, health.active.timeout) == (b"PING\r\n", b"PONG", 0.25)
    assert health.active.interval == 0 and health.active.unhealthy_tcp_failures == 2
    passive = health.passive
    assert (passive.unhealthy_tcp_failures, passive.unhealthy_timeouts, passive.fail_timeout) == (1, 0, 60.0)
    assert not any("not implemented" in warning for warning in warnings)


@pytest.mark.parametrize("active, key, message", [
    ("{type: http}", "active.type", "expected one of tcp, udp, got 'http'"),
    ("{healthy: {successes: 300}}", "active.healthy.successes", "300 is out of range (0-255)"),
    ("{unhealthy: {http_failures: 1}}", "active.unhealthy.http_failures",
     "unknown key 'http_failures'; did you mean 'tcp_failures'?"),
    ("{timeout: 0}", "active.timeout", "must be longer than 0"),
    ("{send: ''}", "active.send", "expected a non-empty string"),
    ("{interval: soon}", "active.interval",
     "expected a duration such as 500ms, 30s, 5m or 1m30s, got 'soon'"),
])
def test_bad_active_healthchecks(conf_dir: Path, fake_dns, active: str, key: str, message: str):
    text = UPSTREAMS.replace("    targets:\n", f"    healthchecks:\n      active: {active}\n    targets:\n")
    error = only_error(conf_dir, text)
    assert (error.line, error.key, error.message) == (7, f"upstreams[0].healthchecks.{key}", message)


# --- services and routes ------------------------------------------------------------------------------

def test_service_host_naming_an_upstream(conf_dir: Path, fake_dns):
    service = load(conf_dir, UPSTREAMS).service("svc")
    assert (service.upstream, service.host, service.addresses) == ("pool", "pool", ())


def test_proxy_protocol_values(conf_dir: Path):
    for written, expected in [("off", "off"), ("false", "off"), ("'off'", "off"), ("v1", "v1"), ("v2", "v2")]:
        text = MINIMAL.replace("port: 1025", f"port: 1025\n    proxy_protocol: {written}")
        assert load(conf_dir, text).service("svc").proxy_protocol == expected


def test_route_indexes_count_over_all_services(conf_dir: Path):
    text = MINIMAL + """\
  - name: second
    host: 127.0.0.2
    routes:
      - {name: b, sources: [{ip: 192.0.2.0/24, port: 5000}]}
      - {name: c, protocols: [tcp, tls], destinations: [{ip: 10.1.2.3}]}
"""
    text = text.replace("[127.0.0.1:9000]", "[127.0.0.1:9000, 127.0.0.1:9443 ssl]")
    text += "ssl: {default_certificate: {cert: certs/default.crt, key: certs/default.key}}\n"
    routes = load(conf_dir, text).routes
    assert [(r.name, r.service, r.index, r.line) for r in routes] == \
        [("plain", "svc", 0, 7), ("b", "second", 1, 12), ("c", "second", 2, 13)]
    assert routes[1].sources == (AddressMatch(ipaddress.ip_network("192.0.2.0/24"), 5000),)
    assert routes[2].destinations == (AddressMatch(ipaddress.ip_network("10.1.2.3/32")),)
    assert routes[2].protocols == ("tcp", "tls")


def test_route_names_are_unique_across_services(conf_dir: Path):
    text = MINIMAL + ("  - name: other\n    host: 127.0.0.2\n    routes: [{name: "
                      "plain, sources: [{port: 1}]}]\n")
    error = only_error(conf_dir, text)
    assert (error.line, error.key, error.message) == (11, "services[1].routes[0].name",
                                                      "route name 'plain' is already used at line 7")


def test_service_names_are_unique(conf_dir: Path):
    text = MINIMAL + "  - name: svc\n    host: 127.0.0.2\n"
    error = only_error(conf_dir, text)
    assert (error.line, error.key, error.message) == (9, "services[1].name",
                                                      "service name 'svc' is already used at line 3")


SNI_FORMS = ("invalid server name '{}': expected host.example, a leftmost wildcard *.example.com "
             "or a rightmost one example.*")

TLS_BASE = """\
stream_listen: [127.0.0.1:9000, 127.0.0.1:9443 ssl]
ssl: {default_certificate: {cert: certs/default.crt, key: certs/default.key}}
services:
  - name: svc
    host: 127.0.0.1
    routes:
      - ROUTE
"""


@pytest.mark.parametrize("route, key, message", [
    ("{name: r, protocols: [tcp]}", "protocols", "a tcp route needs sources or destinations"),
    ("{name: r}", "", "a tcp route needs sources or destinations"),
    ("{name: r, protocols: [tls]}", "protocols", "a tls route needs sources, destinations or snis"),
    ("{name: r, protocols: [tls_passthrough]}", "protocols",
     "a tls_passthrough route needs sources, destinations or snis"),
    ("{name: r, protocols: [tcp], sources: [{port: 1}], snis: [a.example]}", "snis",
     "snis need TLS: add tls or tls_passthrough to protocols"),
    ("{name: r, protocols: [tls, tls_passthrough], snis: [a.example]}", "protocols",
     "a route either terminates TLS (tls) or passes it through (tls_passthrough), not both"),
    ("{name: r, protocols: [], sources: [{port: 1}]}", "protocols",
     "list at least one of tcp, tls, tls_passthrough, udp"),
    ("{name: r, protocols: [tpc], sources: [{port: 1}]}", "protocols[0]",
     "expected one of tcp, tls, tls_passthrough, udp, got 'tpc'; did you mean 'tcp'?"),
    ("{name: r, protocols: tcp, sources: [{port: 1}]}", "protocols", "expected a list, got 'tcp'"),
    ("{name: r, sources: [{}]}", "sources[0]", "give an ip, a port or both"),
    ("{name: r, sources: [{ip: 10.0.0.0/33}]}", "sources[0].ip",
     "expected an IP address or CIDR such as 10.0.0.0/8, got '10.0.0.0/33'"),
    ("{name: r, destinations: [{port: 0}]}", "destinations[0].port", "port 0 is out of range (1-65535)"),
    ("{name: r, destinations: [{host: x}]}", "destinations[0].host", "unknown key 'host'"),
    ("{name: r, destinations: {port: 1}}", "destinations", "expected a list, got a mapping"),
    ("{name: r, protocols: [tls], snis: [a.*.b]}", "snis[0]",
     SNI_FORMS.format("a.*.b")),
    ("{name: r, protocols: [tls], snis: ['*']}", "snis[0]", SNI_FORMS.format("*")),
    ("{name: r, protocols: [tls], snis: ['']}", "snis[0]", SNI_FORMS.format("")),
    ("{name: r, protocols: [tls], snis: ['*.example.*']}", "snis[0]",
     SNI_FORMS.format("*.example.*")),
    ("{name: r, protocols: [tls], snis: ['a..b']}", "snis[0]", SNI_FORMS.format("a..b")),
    ("{name: r, protocols: [tls], snis: ['*x.example']}", "snis[0]",
     SNI_FORMS.format("*x.example")),
    ("{name: r, protocols: [tls], snis: [5]}", "snis[0]", "expected a server name, got 5"),
])
def test_route_rules(conf_dir: Path, route: str, key: str, message: str):
    errors = errors_of(conf_dir, TLS_BASE.replace("ROUTE", route))
    expected = ("services[0].routes[0]" + (f".{key}" if key else "")).replace(".protocols[", ".protocols[")
    assert (errors[0].line, errors[0].key, errors[0].message) == (7, expected, message)


def test_snis_are_lower_cased_and_wildcards_allowed(conf_dir: Path):
    route = ("{name: r, protocols: [tls], snis: [WWW.Example.COM, '*.Wild.example', "
             "'right.*', www.example.com]}")
    assert load(conf_dir, TLS_BASE.replace("ROUTE", route)).routes[0].snis == \
        ("www.example.com", "*.wild.example", "right.*")


def test_tls_route_needs_a_certificate(conf_dir: Path):
    text = TLS_BASE.replace("ROUTE", "{name: r, protocols: [tls], snis: [a.example]}").replace(
        "ssl: {default_certificate: {cert: certs/default.crt, key: certs/default.key}}\n", "")
    error = only_error(conf_dir, text)
    assert (error.line, error.key) == (6, "services[0].routes[0].protocols")
    assert error.message == ("a tls route terminates TLS, but there is no certificate: "
                             "add ssl.default_certificate or certificates")


def test_passthrough_route_needs_no_certificate(conf_dir: Path):
    text = TLS_BASE.replace("ROUTE", "{name: r, protocols: [tls_passthrough], snis: [a.example]}").replace(
        "ssl: {default_certificate: {cert: certs/default.crt, key: certs/default.key}}\n", "")
    assert load(conf_dir, text).routes[0].protocols == ("tls_passthrough",)


def test_tls_route_without_ssl_listener_warns(conf_dir: Path):
    warnings: list[str] = []
    text = TLS_BASE.replace("ROUTE", "{name: r, protocols: [tls_passthrough], snis: [a.example]}").replace(
        ", 127.0.0.1:9443 ssl", "")
    load(conf_dir, text, warnings)
    assert warnings == [f"{conf_dir}/pyproxy.conf:7: services[0].routes[0].protocols: "
                        "no stream_listen address has the ssl flag: this route never matches TLS"]


def test_tls_only_settings_on_a_tcp_service_warn(conf_dir: Path):
    warnings: list[str] = []
    load(conf_dir, MINIMAL.replace("port: 1025", "port: 1025\n    tls_verify: true"), warnings)
    assert warnings == [f"{conf_dir}/pyproxy.conf:6: services[0].tls_verify: tls_verify is "
                        "only used with protocol tls"]


def test_ca_certificates(conf_dir: Path):
    (conf_dir / "garbage.pem").write_text("not a certificate\n")
    text = MINIMAL.replace("port: 1025", "port: 1025\n    protocol: tls\n    tls_verify: true\n"
                                         "    tls_server_name: db.internal\n"
                                         "    ca_certificates: [certs/default.crt]")
    service = load(conf_dir, text).service("svc")
    assert service.ca_certificates == (f"{conf_dir}/certs/default.crt",)
    assert (service.protocol, service.tls_verify, service.tls_server_name) == ("tls", True, "db.internal")

    errors = errors_of(conf_dir, text.replace("[certs/default.crt]", "[garbage.pem, missing.pem]"))
    assert [(e.line, e.key) for e in errors] == [(9, "services[0].ca_certificates[0]"),
                                                 (9, "services[0].ca_certificates[1]")]
    assert errors[0].message.startswith(f"cannot load CA certificates from {conf_dir}/garbage.pem")
    assert errors[1].message == f"no such file: {conf_dir}/missing.pem"


# --- ssl and certificates -----------------------------------------------------------------------------

def test_ssl_protocols_and_ciphers(conf_dir: Path):
    warnings: list[str] = []
    config = load(conf_dir, MINIMAL + "ssl:\n  protocols: [TLSv1.1, TLSv1.3]\n  ciphers: HIGH\n"
                                      "  preread_timeout: 2s\n  handshake_timeout: 1500ms\n", warnings)
    assert config.ssl.protocols == ("TLSv1.1", "TLSv1.3") and config.ssl.ciphers == "HIGH"
    assert (config.ssl.preread_timeout, config.ssl.handshake_timeout) == (2.0, 1.5)
    assert warnings == [f"{conf_dir}/pyproxy.conf:10: ssl.protocols[0]: TLSv1.1 is obsolete and insecure; "
                        "clients should use TLSv1.2 or later"]


@pytest.mark.parametrize("ssl_text, line, key, message", [
    ("  protocols: [TLSv1.4]", 10, "ssl.protocols[0]",
     "expected one of TLSv1, TLSv1.1, TLSv1.2, TLSv1.3, got 'TLSv1.4'; did you mean 'TLSv1.3'?"),
    ("  protocols: []", 10, "ssl.protocols", "list at least one TLS version"),
    ("  ciphers: NOT-A-CIPHER", 10, "ssl.ciphers", "OpenSSL accepts no cipher from 'NOT-A-CIPHER'"),
    ("  preread_timeout: 0s", 10, "ssl.preread_timeout", "must be longer than 0"),
    ("  default_certificate: {cert: certs/default.crt}", 10, "ssl.default_certificate.key",
     "required key is missing"),
    ("  default_certificate: certs/default.crt", 10, "ssl.default_certificate",
     "expected a mapping, got 'certs/default.crt'"),
])
def test_bad_ssl_settings(conf_dir: Path, ssl_text: str, line: int, key: str, message: str):
    error = only_error(conf_dir, MINIMAL + "ssl:\n" + ssl_text + "\n")
    assert (error.line, error.key, error.message) == (line, key, message)


def test_certificate_snis_default_to_its_names(conf_dir: Path):
    text = MINIMAL + """\
certificates:
  - {cert: certs/multi.crt, key: certs/multi.key}
  - {cert: certs/cn-only.crt, key: certs/cn-only.key}
  - {cert: certs/default.crt, key: certs/default.key, snis: [Other.Example, '*.other.example']}
"""
    certificates = load(conf_dir, text).certificates
    assert [c.snis for c in certificates] == [
        ("a.example", "*.b.example"), ("cn-only.example",), ("other.example", "*.other.example")]
    assert certificates[0] == Certificate(f"{conf_dir}/certs/multi.crt", f"{conf_dir}/certs/multi.key",
                                          ("a.example", "*.b.example"))


def test_mismatched_key_names_the_key(conf_dir: Path):
    text = MINIMAL + "certificates:\n  - cert: certs/multi.crt\n    key: certs/default.key\n"
    error = only_error(conf_dir, text)
    assert (error.line, error.key) == (11, "certificates[0].key")
    assert error.message == (f"the private key {conf_dir}/certs/default.key does not match "
                             f"the certificate {conf_dir}/certs/multi.crt")


def test_expired_certificate(conf_dir: Path):
    text = MINIMAL + "ssl:\n  default_certificate:\n    cert: certs/expired.crt\n    key: certs/expired.key\n"
    error = only_error(conf_dir, text)
    assert (error.line, error.key) == (11, "ssl.default_certificate.cert")
    assert error.message.startswith(f"the certificate {conf_dir}/certs/expired.crt expired on ")


def test_key_readable_by_others_warns(conf_dir: Path):
    os.chmod(conf_dir / "certs/default.key", 0o644)
    warnings: list[str] = []
    load(conf_dir,
         MINIMAL + "ssl: {default_certificate: {cert: certs/default.crt, key: certs/default.key}}\n",
         warnings)
    assert warnings == [f"{conf_dir}/pyproxy.conf:9: ssl.default_certificate.key: the private key "
                        f"{conf_dir}/certs/default.key is readable by group or others "
                        "(mode 0644); chmod 600 it"]


@pytest.mark.parametrize("entry, key, message", [
    ("{cert: certs/none.crt, key: certs/default.key}", "certificates[0].cert",
     "no such file: {dir}/certs/none.crt"),
    ("{cert: certs, key: certs/default.key}", "certificates[0].cert", "not a regular file: {dir}/certs"),
    ("{cert: certs/default.key, key: certs/default.key}", "certificates[0].cert",
     "not a PEM certificate: {dir}/certs/default.key (Error decoding PEM-encoded file)"),
    ("{cert: certs/default.crt, key: certs/default.crt}", "certificates[0].key",
     "cannot load the private key {dir}/certs/default.crt with its certificate (PEM lib)"),
    ("{cert: certs/default.crt}", "certificates[0].key", "required key is missing"),
    ("{cert: certs/default.crt, key: certs/default.key, snis: ['a.*.b']}", "certificates[0].snis[0]",
     SNI_FORMS.format("a.*.b")),
])
def test_bad_certificates(conf_dir: Path, entry: str, key: str, message: str):
    error = only_error(conf_dir, MINIMAL + f"certificates:\n  - {entry}\n")
    assert (error.line, error.key, error.message) == (10, key, message.format(dir=conf_dir))


def test_encrypted_key_is_refused_without_prompting(conf_dir: Path):
    _openssl("genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048", "-aes256",
             "-pass", "pass:secret", "-out", str(conf_dir / "enc.key"))
    _openssl("req", "-x509", "-key", str(conf_dir / "enc.key"), "-passin", "pass:secret", "-days", "3",
             "-subj", "/CN=enc.example", "-out", str(conf_dir / "enc.crt"))
    os.chmod(conf_dir / "enc.key", 0o600)
    error = only_error(conf_dir, MINIMAL + "certificates: [{cert: enc.crt, key: enc.key}]\n")
    assert error.key == "certificates[0].key" and "is encrypted" in error.message


def test_duplicate_sni_across_certificates(conf_dir: Path):
    text = MINIMAL + """\
certificates:
  - {cert: certs/multi.crt, key: certs/multi.key}
  - cert: certs/default.crt
    key: certs/default.key
    snis: [z.example, A.example]
"""
    error = only_error(conf_dir, text)
    assert (error.line, error.key, error.message) == \
        (13, "certificates[1].snis[1]",
         "server name 'a.example' is already served by the certificate at line 10")


# --- plugins ------------------------------------------------------------------------------------------

def test_plugins(conf_dir: Path):
    text = MINIMAL + """\
plugins:
  - {name: ip-restriction, service: svc, config: {deny: [10.0.0.0/8, "::1"]}}
  - {name: rate-limit, config: {rate: 5, per: route}}
"""
    first, second = load(conf_dir, text).plugins
    assert (first.service, first.route, first.line) == ("svc", None, 10)
    assert first.config == (("deny", ("10.0.0.0/8", "::1")),)
    assert (second.name, second.route, second.service) == ("rate-limit", None, None)
    assert second.config == (("per", "route"), ("rate", 5))


ALLOW = "config: {allow: [127.0.0.1]}"


@pytest.mark.parametrize("plugin, key, message", [
    (f"{{name: ip-restriction, route: plan, {ALLOW}}}", "plugins[0].route",
     "no route named 'plan'; did you mean 'plain'?"),
    (f"{{name: ip-restriction, service: nope, {ALLOW}}}", "plugins[0].service", "no service named 'nope'"),
    (f"{{name: ip-restriction, route: plain, service: svc, {ALLOW}}}", "plugins[0].service",
     "a plugin applies to a route or to a service, not both"),
    ("{name: ip-restriction, config: [1]}", "plugins[0].config", "expected a mapping, got a list"),
    ("{name: '', config: {}}", "plugins[0].name", "expected a non-empty string"),
    ("{route: plain}", "plugins[0].name", "required key is missing"),
    (f"{{name: ip-restriction, enabled: true, {ALLOW}}}", "plugins[0].enabled", "unknown key 'enabled'"),
    ("{name: ip-restrictions, config: {}}", "plugins[0].name",
     "unknown plugin 'ip-restrictions'; did you mean 'ip-restriction'?; built in: file-log, ip-restriction, "
     "limit-conn, rate-limit"),
    ("{name: limit-conn, config: {limit: many}}", "plugins[0].config.limit",
     "expected an integer ≥ 1, got 'many'"),
    ("{name: ip-restriction, config: {allow: [300.1.1.1]}}", "plugins[0].config.allow[0]",
     "not an IP address or CIDR network: '300.1.1.1'"),
])
def test_bad_plugins(conf_dir: Path, plugin: str, key: str, message: str):
    error = only_error(conf_dir, MINIMAL + f"plugins:\n  - {plugin}\n")
    assert (error.line, error.key, error.message) == (10, key, message)


# --- YAML features ------------------------------------------------------------------------------------

def test_anchors_and_merge_keys(conf_dir: Path):
    text = """\
        stream_listen: [127.0.0.1:9000]
        services:
          - &base
            name: one
            host: 127.0.0.1
            retries: 1
            routes: [{name: r1, destinations: [{port: 9000}]}]
          - <<: *base
            name: two
            routes: [{name: r2, sources: [{port: 1}]}]
        """
    _one, two = load(conf_dir, textwrap.dedent(text)).services
    assert (two.name, two.host, two.retries, two.routes[0].name) == ("two", "127.0.0.1", 1, "r2")


def test_recursive_alias_is_an_error(conf_dir: Path):
    error = only_error(conf_dir, MINIMAL + "plugins: &loop\n  - {name: ip-restriction, config: {allow: "
                                           "[127.0.0.1], again: *loop}}\n")
    assert error.message == "an alias refers to a collection that contains it (recursive YAML)"
    assert error.line == 10 and error.key == "plugins[0].config.again"    # where the alias is


def test_undefined_alias_is_an_error_at_its_place(conf_dir: Path):
    errors = errors_of(conf_dir, MINIMAL + "log_level: *nowhere\nworker_connections: 0\n")
    assert [(e.line, e.key, e.message) for e in errors] == [
        (9, "log_level", "no anchor named 'nowhere' before this alias"),
        (10, "worker_connections", "0 is out of range (1-2147483647)"),
    ]


def _with_lines(value):
    """A loaded value with the lines it remembers, for comparing two loads."""
    if isinstance(value, YamlMap):
        return ("map", value.line, [(key, value.key_lines[key], value.value_lines[key], _with_lines(item))
                                    for key, item in value.items()])
    if isinstance(value, YamlList):
        return ("list", value.line,
                [(line, _with_lines(item)) for line, item in zip(value.item_lines, value, strict=True)])
    return value


def _read(path: str):
    try:
        document = read_document(path)
    except ConfigError as error:
        return [(issue.line, issue.key) for issue in error.errors]
    return _with_lines(document.root), [(issue.line, issue.key, issue.message) for issue in document.issues]


@pytest.mark.parametrize("text", [
    EXAMPLE,
    "\ufeff" + MINIMAL + "log_level: *nowhere\nplugins: &p [{name: a, config: {b: *p}}]\nuser: !custom x\n",
    MINIMAL + "services: [{<<: {name: x, host: y}, port: 1}]\nworker_connections: "
              "0x10\nworker_processes: !!int x\n",
    MINIMAL + "ssl:\n  protocols: [TLSv1.2\n  ciphers: x\n",
    "stream_listen:\n\t- 127.0.0.1:9000\n",
    "é: 1\n" + MINIMAL + "user: a\x07b\n",
    MINIMAL + "---\nuser: x\n",
])
def test_libyaml_and_the_pure_python_fallback_read_the_same(conf_dir: Path, monkeypatch, text: str):
    """PyYAML without libyaml (a wheel built without it) falls back to its own parser: same values, same
    lines, same problems at the same places."""
    path = write(conf_dir, text)
    with_libyaml = _read(path)
    monkeypatch.setattr(loader, "_LIBYAML", False)
    monkeypatch.setattr(loader, "_Parser", yaml.SafeLoader)
    assert _read(path) == with_libyaml


def test_a_second_document_is_an_error(conf_dir: Path):
    error = only_error(conf_dir, MINIMAL + "---\nlog_level: info\n")
    assert (error.line, error.key, error.message) == (9, "",
                                                      "invalid YAML: a second document (---) in the file")


def test_billion_laughs_is_refused(conf_dir: Path):
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, 9)]
    error = only_error(conf_dir, "\n".join(lines) + "\n")
    assert "expands to more than" in error.message


def test_deep_nesting_is_refused(conf_dir: Path):
    error = only_error(conf_dir, MINIMAL + "plugins: " + "[" * 100 + "]" * 100 + "\n")
    assert error.line == 9 and "nested" in error.message


@pytest.mark.parametrize("value, message", [
    ("!!python/object:os.system x", "unsupported YAML tag 'tag:yaml.org,2002:python/object:os.system'"),
    ("!custom x", "unsupported YAML tag '!custom'"),
    ("!!int abc", "'abc' is not a valid !!int"),
    ("0b_", "invalid value '0b_'"),
    ("2001-13-45", "invalid value '2001-13-45'"),
])
def test_odd_yaml_scalars(conf_dir: Path, value: str, message: str):
    error = only_error(conf_dir, MINIMAL + f"user: {value}\n")
    assert (error.line, error.key) == (9, "user")
    assert error.message.startswith(message)


def test_yaml_timestamps_are_just_wrong_types(conf_dir: Path):
    error = only_error(conf_dir, MINIMAL + "worker_shutdown_timeout: 2001-01-01\n")
    assert error.message == ("expected a duration such as 500ms, 30s or 5m, got datetime.date(2001, 1, 1)")


def test_huge_numbers_are_reported_not_crashed_on(conf_dir: Path):
    # PyYAML builds hex and base-60 integers without int(str), so they can exceed Python's
    # int-to-string digit limit; a message must still be printable.
    text = MINIMAL + f"worker_connections: 0x{'F' * 10000}\nworker_processes: 1:{':'.join(['59'] * 3000)}\n"
    errors = errors_of(conf_dir, text)
    assert [(e.line, e.key, e.message) for e in errors] == [
        (9, "worker_connections", "a very large number is out of range (1-2147483647)"),
        (10, "worker_processes", "a very large number is out of range (1-1024)"),
    ]


def test_plugin_setting_names_must_be_strings(conf_dir: Path):
    text = MINIMAL + "plugins:\n  - name: ip-restriction\n    config:\n      outer:\n        1: one\n"
    error = only_error(conf_dir, text)
    assert (error.line, error.key, error.message) == \
        (13, "plugins[0].config.outer", "plugin settings are named by strings, not 1")


def test_yaml_value_errors_and_schema_errors_are_listed_together(conf_dir: Path):
    text = MINIMAL.replace("name: svc", "name: !custom svc") + "log_level: loud\nlog_level: info\n"
    errors = errors_of(conf_dir, text)
    # The refused tag reads as null, but no "required key is missing" follows it.
    assert [(e.line, e.key, e.message) for e in errors] == [
        (3, "services[0].name", "unsupported YAML tag '!custom'"),
        (9, "log_level", "expected one of debug, info, notice, warn, error, crit, got 'loud'"),
        (10, "log_level", "duplicate key 'log_level': already set at line 9"),
    ]


def test_a_bad_key_does_not_hide_the_errors_next_to_it(conf_dir: Path):
    text = MINIMAL.replace("    port: 1025\n", "    port: 70000\n    !custom odd: 1\n")
    errors = errors_of(conf_dir, text)
    assert [(e.line, e.key, e.message) for e in errors] == [
        (5, "services[0].port", "port 70000 is out of range (1-65535)"),
        (6, "services[0]", "bad key: unsupported YAML tag '!custom'"),
    ]


@pytest.mark.parametrize("files, expected", [
    ({"cpu.max": "max 100000\n"}, None),                       # no quota: the affinity mask decides
    ({"cpu.max": "150000 100000\n"}, 2),                        # 1.5 CPUs → 2 workers
    ({"cpu.max": "50000 100000\n"}, 1),
    ({"cpu/cpu.cfs_quota_us": "100000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 1),   # cgroup v1
    ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),
    ({}, None),
])
def test_auto_workers_follow_the_cgroup_cpu_quota(tmp_path: Path, files: dict, expected):
    import os

    from pyproxy.config.validate import usable_cpus
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    affinity = len(os.sched_getaffinity(0))
    assert usable_cpus(str(tmp_path)) == (affinity if expected is None else min(expected, affinity))


SCOPED = """\
stream_listen: [127.0.0.1:9000, 127.0.0.1:8443 ssl, 127.0.0.1:9443 ssl, 127.0.0.2:9443 ssl]
certificates:
  - cert: certs/default.crt
    key: certs/default.key
    snis: [a.example]
{more}"""


def test_certificate_listen_scopes_a_certificate_to_listeners(conf_dir: Path):
    text = SCOPED.format(more="""\
  - cert: certs/tls9443.kong.example.crt
    key: certs/tls9443.kong.example.key
    snis: [a.example]
    listen: [8443, "127.0.0.1:9443"]
  - cert: certs/multi.crt
    key: certs/multi.key
    snis: [a.example]
    listen: ["127.0.0.2:9443"]
""")
    config = load_config(write(conf_dir, text))
    assert [c.listen for c in config.certificates] == [(), ((None, 8443), ("127.0.0.1", 9443)),
                                                       (("127.0.0.2", 9443),)]
    serving = {str(listen): [c.cert.rsplit("/", 1)[1] for c in config.certificates if c.serves(listen)]
               for listen in config.stream_listen if listen.ssl}
    assert serving == {"127.0.0.1:8443": ["default.crt", "tls9443.kong.example.crt"],
                       "127.0.0.1:9443": ["default.crt", "tls9443.kong.example.crt"],
                       "127.0.0.2:9443": ["default.crt", "multi.crt"]}


@pytest.mark.parametrize(("listen", "key", "message"), [
    ("[9000]", "certificates[1].listen[0]", "no ssl listener in stream_listen is on *:9000"),
    ('["127.0.0.3:9443"]', "certificates[1].listen[0]",
     "no ssl listener in stream_listen is on 127.0.0.3:9443"),
    ("[tls]", "certificates[1].listen[0]", "expected ADDRESS:PORT (or a port alone), got 'tls'"),
    ("[70000]", "certificates[1].listen[0]", "port 70000 is out of range (1-65535)"),
    ("[]", "certificates[1].listen", "list at least one listener (without listen: every one)"),
    ("8443", "certificates[1].listen", "expected a list, got 8443"),
    ("[8443]\n    wildcard_depth: deep", "certificates[1].wildcard_depth",
     "expected one of one, any, got 'deep'"),
])
def test_certificate_listen_errors_name_the_place(conf_dir: Path, listen: str, key: str, message: str):
    text = SCOPED.format(more=f"""\
  - cert: certs/multi.crt
    key: certs/multi.key
    snis: [b.example]
    listen: {listen}
""")
    error = only_error(conf_dir, text)
    assert (error.key, error.message) == (key, message)


@pytest.mark.parametrize(("first", "second", "clash"), [
    ("[8443]", '["127.0.0.1:8443"]', True),          # the port's every listener includes that one
    ('["127.0.0.1:9443"]', '["127.0.0.2:9443"]', False),
    ("[9443]", "[8443]", False),
])
def test_certificates_with_listen_share_a_name_on_no_common_listener(conf_dir: Path, first: str, second: str,
                                                                     clash: bool):
    text = SCOPED.format(more=f"""\
  - cert: certs/tls9443.kong.example.crt
    key: certs/tls9443.kong.example.key
    snis: [b.example]
    listen: {first}
  - cert: certs/multi.crt
    key: certs/multi.key
    snis: [b.example]
    listen: {second}
""")
    if not clash:
        assert len(load_config(write(conf_dir, text)).certificates) == 3
        return
    error = only_error(conf_dir, text)
    assert (error.line, error.key, error.message) == (
        12, "certificates[2].snis[0]",
        "server name 'b.example' is already served on a listener both serve by the certificate at line 6")
