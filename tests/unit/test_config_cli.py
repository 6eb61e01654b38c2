"""What `pyproxy -t` prints for a bad file: the exact lines a user reads, each naming FILE:LINE."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pyproxy.config.model import DnsSettings
from pyproxy.dns import resolve_now
from tests.unit.test_config import MINIMAL

SIZE_LIMIT = 64 << 20      # documented in docs/configuration.md
REPOSITORY = Path(__file__).resolve().parents[2]

UPSTREAM_AND_SERVICE = """\
stream_listen: [127.0.0.1:9000]
upstreams:
  - name: echo-upstream
    targets: [{target: 127.0.0.1:1025}]
services:
  - name: echo
    host: echo-upstrem
    routes:
      - {name: plain, destinations: [{port: 9000}]}
"""


def _test(path: Path) -> list[str]:
    """`pyproxy -t -c path`'s stderr lines; the test fails if it exits 0 or prints a traceback."""
    result = subprocess.run([sys.executable, "-m", "pyproxy", "-t", "-c", str(path)], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    return result.stderr.splitlines()


def _dns_failure(name: str) -> str:
    """What this host's resolver says about `name` (the message quotes it)."""
    return resolve_now([name], DnsSettings())[name].error


def test_a_misspelt_upstream_name_is_not_blamed_on_dns(tmp_path: Path):
    path = tmp_path / "pyproxy.conf"
    path.write_text(UPSTREAM_AND_SERVICE)
    assert _test(path) == [
        f"pyproxy: [emerg] {path}:7: services[0].host: no upstream is named "
        "'echo-upstrem', and as a host name "
        f"it does not resolve ({_dns_failure('echo-upstrem')}); did you mean upstream 'echo-upstream'?",
        f"pyproxy: configuration file {path} test failed",
    ]


def test_a_name_far_from_every_upstream_is_a_dns_failure(tmp_path: Path):
    path = tmp_path / "pyproxy.conf"
    path.write_text("dns_strict: on\n" + UPSTREAM_AND_SERVICE.replace("echo-upstrem", "nowhere.invalid"))
    assert _test(path)[0] == (f"pyproxy: [emerg] {path}:8: services[0].host: cannot "
                              "resolve 'nowhere.invalid': "
                              f"{_dns_failure('nowhere.invalid')}")


def test_invalid_yaml_names_the_key_it_stopped_in(tmp_path: Path):
    path = tmp_path / "pyproxy.conf"
    path.write_text("stream_listen:\n\t- 127.0.0.1:9000\n")
    assert _test(path) == [
        f"pyproxy: [emerg] {path}:2: stream_listen: invalid YAML: a tab character "
        "cannot indent YAML: use spaces",
        f"pyproxy: configuration file {path} test failed",
    ]


@pytest.mark.parametrize("tail, line, key", [
    ("ssl:\n  protocols: [TLSv1.2\n  ciphers: x\n", 11, "ssl.protocols"),
    ("upstreams:\n  - name: a\n    targets: {target: \n", 12, "upstreams[0].targets.target"),
    ("user: a\x07b\n", 9, "user"),
    ("plugins:\n  - name: x\n  - name: [\n  - name: y\n", 12, "plugins[1].name"),
    ("]\n", 9, ""),
])
def test_invalid_yaml_places(tmp_path: Path, tail: str, line: int, key: str):
    path = tmp_path / "pyproxy.conf"
    path.write_text(MINIMAL + tail)
    first = _test(path)[0]
    where = f"{path}:{line}: {key}: " if key else f"{path}:{line}: "
    assert first.startswith(f"pyproxy: [emerg] {where}invalid YAML: "), first


def test_the_whole_file_has_no_key_path(tmp_path: Path):
    path = tmp_path / "pyproxy.conf"
    path.write_bytes(MINIMAL.encode() + b"user: caf\xe9\n")
    assert _test(path)[0] == f"pyproxy: [emerg] {path}:9: not UTF-8 text (byte 0xe9)"


def test_a_file_over_the_size_limit_is_refused_unread(tmp_path: Path):
    path = tmp_path / "huge.conf"
    with open(path, "wb") as huge:       # sparse: no disk is used
        huge.write(MINIMAL.encode())
        huge.truncate(SIZE_LIMIT + 1)
    assert _test(path) == [
        f"pyproxy: [emerg] {path}:1: the file is larger than 64 MiB, the most pyproxy "
        "reads as a configuration file",
        f"pyproxy: configuration file {path} test failed",
    ]


def test_make_install_makes_what_the_demo_configuration_needs(tmp_path: Path):
    """In a fresh clone, `make install` then `pyproxy -t -c conf/pyproxy.conf` passes (issue 15, item 14).

    The clone is the Makefile and conf/ copied; the venv is this one, already installed (its stamp is
    newer than the copied package metadata), so make has only the rest to do."""
    for name in ("Makefile", "setup.cfg", "pyproject.toml"):
        shutil.copy(REPOSITORY / name, tmp_path / name)
        os.utime(tmp_path / name, (0, 0))
    shutil.copytree(REPOSITORY / "conf", tmp_path / "conf",
                    ignore=shutil.ignore_patterns("certs", "*.pid", "logs"))
    venv = Path(sys.executable).parent.parent
    assert (venv / ".installed").exists()
    made = subprocess.run(["make", "install", f"VENV={venv}"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120)
    assert made.returncode == 0, made.stdout + made.stderr
    tested = subprocess.run([str(venv / "bin" / "pyproxy"), "-t", "-c", "conf/pyproxy.conf"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=60)
    assert tested.returncode == 0, tested.stderr
    assert tested.stderr == f"pyproxy: configuration file {tmp_path}/conf/pyproxy.conf test is successful\n"


def test_make_run_gateway_makes_what_the_gateway_demo_needs(tmp_path: Path):
    """`make run-gateway`'s prerequisites in a fresh clone: the demo certificate as the Secret the
    seed's Gateway names; then `pyproxy -t --status` on conf/pyproxy-gateway.conf shows the seed's
    two routes Accepted on the listeners of ports 9000 and 9443 (issue 17)."""
    for name in ("Makefile", "setup.cfg", "pyproject.toml"):
        shutil.copy(REPOSITORY / name, tmp_path / name)
        os.utime(tmp_path / name, (0, 0))
    shutil.copytree(REPOSITORY / "conf", tmp_path / "conf",
                    ignore=shutil.ignore_patterns("certs", "gateway", "*.pid", "logs"))
    shutil.copytree(REPOSITORY / "examples" / "gateway", tmp_path / "examples" / "gateway")
    venv = Path(sys.executable).parent.parent
    secret = "conf/gateway/tls9443.kong.example.yaml"
    made = subprocess.run(["make", "install", secret, f"VENV={venv}"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)
    assert made.returncode == 0, made.stdout + made.stderr
    assert (tmp_path / secret).stat().st_mode & 0o777 == 0o600
    tested = subprocess.run([str(venv / "bin" / "pyproxy"), "-t", "--status", "-o", "json", "-c",
                             "conf/pyproxy-gateway.conf"], cwd=tmp_path, capture_output=True, text=True,
                            timeout=60)
    assert tested.returncode == 0, tested.stderr
    assert tested.stderr.endswith("conf/pyproxy-gateway.conf test is successful\n"), tested.stderr
    items = {(item["kind"], item["metadata"]["name"]): item["status"]
             for item in json.loads(tested.stdout)["items"]}
    listeners = {entry["name"]: entry for entry in items[("Gateway", "kong")]["listeners"]}
    for name in ("stream9000", "stream9443"):
        assert listeners[name]["attachedRoutes"] == 1
        assert {c["type"]: c["status"] for c in listeners[name]["conditions"]}["Accepted"] == "True"
    for kind, name in (("TCPRoute", "echo-plaintext"), ("TLSRoute", "echo-tls")):
        [parent] = items[(kind, name)]["parents"]
        assert {c["type"]: c["reason"] for c in parent["conditions"]} == {"Accepted": "Accepted",
                                                                          "ResolvedRefs": "ResolvedRefs"}
