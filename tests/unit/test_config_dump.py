"""`pyproxy -T` prints a configuration that loads again and means the same (issue 15, item 9)."""

from __future__ import annotations

import dataclasses
import os
import pwd
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from pyproxy.config import Config, load_config
from pyproxy.config.dump import dump_config
from tests.unit.test_config import certificate_folder, conf_dir, make_certificate, write  # noqa: F401 (fixtures)

REPOSITORY = Path(__file__).resolve().parents[2]

# Every key the validator takes, most of them away from their defaults.
RICH = """\
worker_processes: 3
worker_connections: 5000
worker_shutdown_timeout: 1m30s
worker_sched_policy: batch
proxy_protocol_timeout: 750ms
reload_coalesce: 1s500ms
pid: run/pyproxy.pid
user: {user}
status_listen: "[::1]:9100"
error_log: logs/error.log
log_level: info
access_log: logs/access.log
access_log_format: '$remote_addr $status ${{upstream_addr}} $route'
plugin_modules: [extra_plugins]

stream_listen:
  - 127.0.0.1:9000 backlog=64
  - 0.0.0.0:9443 ssl
  - "[::1]:9500 proxy_protocol ssl backlog=16384"
  - 127.0.0.1:9600 reuseport

ssl:
  protocols: [TLSv1.3, TLSv1.2]
  ciphers: ECDHE+AESGCM
  default_certificate: {{cert: certs/default.crt, key: certs/default.key}}
  preread_timeout: 2500ms
  handshake_timeout: 1h

certificates:
  - {{cert: certs/tls9443.kong.example.crt, key: certs/tls9443.kong.example.key,
      snis: [tls9443.kong.example, "*.w.example"]}}
  - {{cert: certs/multi.crt, key: certs/multi.key, listen: [9443, "[::1]:9500"], wildcard_depth: any}}

upstreams:
  - name: pool
    algorithm: consistent-hashing
    hash_on: sni
    healthchecks:
      active:
        type: tcp
        interval: 2s
        timeout: 300ms
        send: "PING\\r\\n"
        expect: !!binary /wBQT05H
        healthy: {{successes: 5}}
        unhealthy: {{tcp_failures: 0, timeouts: 7}}
      passive:
        type: tcp
        unhealthy: {{tcp_failures: 4, timeouts: 0}}
        fail_timeout: 1d2h3m4s5ms
    targets:
      - {{target: 127.0.0.1:1025, weight: 0}}
      - {{target: "[::1]:1026", weight: 65535}}
      - {{target: localhost}}
  - name: empty
    algorithm: least-connections
    healthchecks: {{passive: {{fail_timeout: 0}}}}
    targets: []

services:
  - name: secure
    protocol: tls
    host: pool
    port: 443
    connect_timeout: 1s
    read_timeout: 10m
    write_timeout: 45s
    retries: 0
    tls_verify: true
    ca_certificates: [certs/default.crt, certs/multi.crt]
    tls_server_name: upstream.example
    proxy_protocol: v2
    tcp_congestion: reno
    routes:
      - name: by-everything
        protocols: [tls]
        sources: [{{ip: 10.0.0.0/8, port: 40000}}, {{ip: "2001:db8::/32"}}, {{port: 1}}]
        destinations: [{{ip: 127.0.0.1, port: 9443}}]
        snis: [A.Example, "*.b.example", "c.*"]
      - name: passthrough
        protocols: [tls_passthrough]
        snis: [pass.example]
  - name: direct
    host: 127.0.0.1
    port: 1025
    proxy_protocol: v1
    routes:
      - {{name: plain, protocols: [tcp], destinations: [{{port: 9000}}]}}
      - {{name: v6, protocols: [tcp], destinations: [{{ip: "::1"}}]}}
  - name: resolved
    host: localhost
    port: 1030
    proxy_protocol: off
    routes: []

plugins:
  - {{name: ip-restriction, route: plain, config: {{allow: [127.0.0.0/8, "::1"], deny: []}}}}
  - {{name: limit-conn, service: direct, config: {{limit: 100, per: route}}}}
  - {{name: rate-limit, config: {{rate: 0.5, burst: 3, per: ip}}}}
  - {{name: file-log, route: by-everything, config: {{path: logs/sessions.json}}}}
  - {{name: extra, config: {{nested: {{list: [1, two, {{three: 3.5}}], flag: false, nothing: null}}}}}}
"""

EXTRA_PLUGINS = """\
from pyproxy.plugins import Plugin, register


@register
class Extra(Plugin):
    name = "extra"
"""


def without_places(value):
    """`value` with what depends on where the file is (its path, the lines) blanked out."""
    if dataclasses.is_dataclass(value):
        changes = {field.name: without_places(getattr(value, field.name))
                   for field in dataclasses.fields(value)}
        if "line" in changes:
            changes["line"] = 0
        if isinstance(value, Config):
            changes["path"] = ""
        return dataclasses.replace(value, **changes)
    if isinstance(value, tuple):
        return tuple(without_places(item) for item in value)
    return value


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pyproxy", *args], capture_output=True, text=True,
                          timeout=60, cwd=REPOSITORY)


def _dump_and_reload(path: str, dump_path: Path) -> tuple[Config, Config]:
    """`pyproxy -T -c path` written to `dump_path`, checked with `pyproxy -t`; both files loaded."""
    dumped = _cli("-T", "-c", path)
    assert dumped.returncode == 0, dumped.stderr
    dump_path.write_text(dumped.stdout)
    tested = _cli("-t", "-c", str(dump_path))
    assert tested.returncode == 0, f"{tested.stderr}\n--- the dump:\n{dumped.stdout}"
    assert tested.stderr.endswith(f"configuration file {dump_path} test is successful\n"), tested.stderr
    return load_config(path), load_config(str(dump_path))


def test_dump_of_the_demo_configuration_loads_and_means_the_same(tmp_path: Path):
    (tmp_path / "certs").mkdir()
    make_certificate(tmp_path / "certs", "tls9443.kong.example", "tls9443.kong.example",
                     ("tls9443.kong.example",))
    shutil.copy(REPOSITORY / "conf" / "pyproxy.conf", tmp_path / "pyproxy.conf")
    (tmp_path / "elsewhere").mkdir()
    original, reloaded = _dump_and_reload(str(tmp_path / "pyproxy.conf"),
                                          tmp_path / "elsewhere" / "dumped.conf")
    assert without_places(reloaded) == without_places(original)


def test_dump_of_every_key_loads_and_means_the_same(conf_dir: Path):  # noqa: F811 (the fixture imported above)
    (conf_dir / "run").mkdir()
    (conf_dir / "logs").mkdir()
    (conf_dir / "extra_plugins.py").write_text(EXTRA_PLUGINS)
    path = write(conf_dir, RICH.format(user=pwd.getpwuid(os.getuid()).pw_name))
    original, reloaded = _dump_and_reload(path, conf_dir / "dumped.conf")
    assert original.ssl.default_certificate is not None and original.plugin_modules == ("extra_plugins",)
    assert original.upstream("pool").healthchecks.active.expect == b"\xff\x00PONG"
    assert without_places(reloaded) == without_places(original)


def test_dump_is_plain_data_in_the_files_own_shape(conf_dir: Path):  # noqa: F811 (the fixture imported above)
    """The dump is a function of the config package (an Admin API will export the same), made of the
    keys and value forms a user writes: durations with units, addresses as text, nothing internal."""
    (conf_dir / "run").mkdir()
    (conf_dir / "logs").mkdir()
    (conf_dir / "extra_plugins.py").write_text(EXTRA_PLUGINS)
    config = load_config(write(conf_dir, RICH.format(user=pwd.getpwuid(os.getuid()).pw_name)))
    document = dump_config(config)
    assert yaml.safe_load(yaml.safe_dump(document)) == document
    assert document["worker_shutdown_timeout"] == "1m30s"
    assert document["upstreams"][0]["healthchecks"]["passive"]["fail_timeout"] == "1d2h3m4s5ms"
    assert document["stream_listen"][2] == "[::1]:9500 ssl proxy_protocol backlog=16384"
    assert document["services"][0]["routes"][0]["sources"][1] == {"ip": "2001:db8::/32"}
    assert document["upstreams"][0]["targets"][1] == {"target": "[::1]:1026", "weight": 65535,
                                                      "backup": False, "max_conns": 0, "slow_start": "0s"}
