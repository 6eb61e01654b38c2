"""The `gateway` key and the Gateway API manifests source, loaded the way `-t`, the start and every
reload load them (pyproxy.config.load_config): what the file and the manifests make together, and
the errors and warnings a user reads."""

from __future__ import annotations

import json
import marshal
import os
from pathlib import Path

import pytest

from pyproxy.config import ConfigError, load_config
from pyproxy.gateway.source import keep_transition_times, status_list
from tests.integration.test_gateway_file_source import CLASS_AND_GATEWAY, listener, service, tcp_route
from tests.unit.test_gateway_seed import seed_secret


def write_manifests(folder: Path, listeners: str, backend_port: int = 20001) -> Path:
    folder.mkdir(exist_ok=True)
    (folder / "gateway.yaml").write_text(CLASS_AND_GATEWAY.format(listeners=listeners))
    (folder / "route.yaml").write_text(tcp_route("echo", "one"))
    (folder / "services.yaml").write_text(service("one", backend_port))
    return folder


def load(tmp_path: Path, body: str, warnings: list[str] | None = None):
    path = tmp_path / "pyproxy.conf"
    path.write_text(body)
    return load_config(str(path), warn=None if warnings is None else warnings.append)


def errors(tmp_path: Path, body: str) -> list[str]:
    with pytest.raises(ConfigError) as failed:
        load(tmp_path, body)
    return [str(issue) for issue in failed.value.errors]


def test_the_manifests_add_listeners_upstreams_and_routes(tmp_path):
    folder = write_manifests(tmp_path / "m", listener("plain", 20000))
    config = load(tmp_path, f"gateway: {{paths: [{folder}], address: [127.0.0.1, '::1']}}\n")
    assert [(listen.host, listen.port, listen.ssl) for listen in config.stream_listen] == [
        ("127.0.0.1", 20000, False), ("::1", 20000, False)]
    assert [route.name for route in config.routes] == ["tcproute.default.echo.0.plain"]
    [upstream] = config.upstreams
    assert [(target.host, target.port) for target in upstream.targets] == [("127.0.0.1", 20001)]
    assert config.gateway is not None and config.gateway.runtime_dir == str(tmp_path / "gateway-runtime")
    assert (tmp_path / "gateway-runtime" / "translated.yaml").exists()
    statuses = config.gateway_status
    assert statuses[("TCPRoute", "default", "echo")]["apiVersion"] == "gateway.networking.k8s.io/v1alpha2"


def test_without_an_address_the_listeners_open_on_every_ipv4_and_ipv6_address(tmp_path):
    """The SPEC's default, as nginx users write `listen 9000; listen [::]:9000;`: a Gateway listener
    is reachable over IPv6 too (this host has IPv6: the tests use ::1)."""
    folder = write_manifests(tmp_path / "m", listener("plain", 20000))
    config = load(tmp_path, f"gateway: {{paths: [{folder}]}}\n")
    listening = [(listen.host, listen.port) for listen in config.stream_listen]
    assert listening == [("0.0.0.0", 20000), ("::", 20000)]


def test_a_port_of_the_file_is_shared_when_it_agrees_and_refused_when_it_does_not(tmp_path):
    folder = write_manifests(tmp_path / "m", listener("plain", 20000) + "\n"
                             + listener("tls", 20002, "TLS", ", tls: {mode: Passthrough}"))
    config = load(tmp_path, f"stream_listen: [127.0.0.1:20000, 127.0.0.1:20002]\n"
                            f"gateway: {{paths: [{folder}], address: 127.0.0.1}}\n")
    assert [str(listen) for listen in config.stream_listen] == ["127.0.0.1:20000", "127.0.0.1:20002"]
    listeners = {entry["name"]: {c["type"]: c["reason"] for c in entry["conditions"]}
                 for entry in config.gateway_status[("Gateway", "default", "edge")]["status"]["listeners"]}
    assert listeners["plain"]["Accepted"] == "Accepted"
    assert listeners["tls"]["Accepted"] == "PortUnavailable"


def test_a_udp_port_of_the_file_does_not_hold_the_number_for_tcp_and_tls(tmp_path):
    folder = write_manifests(tmp_path / "m", listener("tls", 20002, "TLS", ", tls: {mode: Passthrough}"))
    config = load(tmp_path, f"stream_listen: ['127.0.0.1:20002 udp']\n"
                            f"gateway: {{paths: [{folder}], address: 127.0.0.1}}\n")
    listeners = {entry["name"]: {c["type"]: c["reason"] for c in entry["conditions"]}
                 for entry in config.gateway_status[("Gateway", "default", "edge")]["status"]["listeners"]}
    assert listeners["tls"]["Accepted"] == "Accepted"
    listening = sorted(str(listen) for listen in config.stream_listen)
    assert listening == ["127.0.0.1:20002", "127.0.0.1:20002 udp"]


def test_a_gateway_listener_on_the_status_listen_port_is_refused(tmp_path):
    folder = write_manifests(tmp_path / "m", listener("plain", 20000) + "\n" + listener("metrics", 20003))
    config = load(tmp_path, f"status_listen: 127.0.0.1:20003\n"
                            f"gateway: {{paths: [{folder}], address: 127.0.0.1}}\n")
    assert [str(listen) for listen in config.stream_listen] == ["127.0.0.1:20000"]
    [_, metrics] = config.gateway_status[("Gateway", "default", "edge")]["status"]["listeners"]
    assert {c["type"]: c["reason"] for c in metrics["conditions"]}["Accepted"] == "PortUnavailable"


def test_the_gateway_key_is_validated_with_errors_naming_it(tmp_path):
    conf = tmp_path / "pyproxy.conf"
    assert errors(tmp_path, "gateway:\n  paths: [nope, 3]\n  address: [localhost]\n"
                            "  controller_name: x\n  runtime: a\n") == [
        f"{conf}:2: gateway.paths[0]: no such file or folder: {tmp_path / 'nope'}",
        f"{conf}:2: gateway.paths[1]: expected a string, got 3",
        f"{conf}:3: gateway.address[0]: expected an IP address, got 'localhost'",
        f"{conf}:4: gateway.controller_name: expected a domain-prefixed path like "
        "gateway.pyproxy.dev/controller, got 'x'",
        f"{conf}:5: gateway.runtime: unknown key 'runtime'; did you mean 'runtime_dir'?",
    ]
    assert errors(tmp_path, "gateway: {address: 127.0.0.1}\n") == [
        f"{conf}:1: gateway.paths: required key is missing: list the manifest files and folders"]
    assert errors(tmp_path, "worker_processes: 1\n") == [
        f"{conf}:1: stream_listen: nothing to listen on: add at least one stream_listen address"]


def test_a_file_that_is_not_yaml_fails_the_load_a_malformed_object_is_a_warning(tmp_path):
    folder = write_manifests(tmp_path / "m", listener("plain", 20000))
    body = f"gateway: {{paths: [{folder}], address: 127.0.0.1}}\n"
    (folder / "broken.yaml").write_text("kind: TCPRoute\nmetadata: [unclosed\n")
    assert errors(tmp_path, body) == [
        f"{folder / 'broken.yaml'}:3: invalid YAML: did not find expected ',' or ']'; "
        "the rest of the file is skipped"]

    (folder / "broken.yaml").write_text(tcp_route("wrong", "one").replace("port: 1025", "port: web"))
    warnings: list[str] = []
    config = load(tmp_path, body, warnings)
    assert [route.name for route in config.routes] == ["tcproute.default.echo.0.plain"]
    assert warnings == [f"{folder / 'broken.yaml'}:1: TCPRoute default/wrong: "
                        "spec.rules[0].backendRefs[0].port: expected a number 1–65535, got 'web'; "
                        "the object is skipped"]


def test_a_malformed_object_keeps_its_last_valid_version(tmp_path):
    """As the API server refuses a bad `kubectl apply`: the object stays as it was, across loads."""
    folder = write_manifests(tmp_path / "m", listener("plain", 20000))
    body = f"gateway: {{paths: [{folder}], address: 127.0.0.1}}\n"
    first = load(tmp_path, body)
    broken = tcp_route("echo", "two").replace("port: 1025", "port: web")
    (folder / "route.yaml").write_text("# edited\n" + broken)
    for _ in range(2):
        warnings: list[str] = []
        config = load(tmp_path, body, warnings)
        assert warnings == [f"{folder / 'route.yaml'}:2: TCPRoute default/echo: "
                            "spec.rules[0].backendRefs[0].port: expected a number 1–65535, got 'web'; "
                            "its last valid version, read from "
                            f"{folder / 'route.yaml'}:1, is kept"]
        assert config.services == first.services and config.upstreams == first.upstreams
    assert (tmp_path / "gateway-runtime" / "last-valid.json").stat().st_mode & 0o777 == 0o600

    (folder / "route.yaml").unlink()            # removed: its last valid version goes too
    assert load(tmp_path, body).routes == ()


def test_a_name_the_file_and_the_manifests_both_define_is_an_error_naming_both(tmp_path):
    folder = write_manifests(tmp_path / "m", listener("plain", 20000))
    found = errors(tmp_path, "stream_listen: [127.0.0.1:20005]\n"
                             "upstreams: [{name: k8s.default.one.1025,\n"
                             "             targets: [{target: 127.0.0.1:20001}]}]\n"
                             f"gateway: {{paths: [{folder}], address: 127.0.0.1}}\n")
    assert len(found) == 1
    assert found[0].startswith(f"{tmp_path / 'gateway-runtime' / 'translated.yaml'}:")
    assert f"upstream 'k8s.default.one.1025' is defined in {tmp_path / 'pyproxy.conf'} (line 2)" in found[0]


def test_a_runtime_dir_that_cannot_be_written_is_an_error_of_the_gateway_key(tmp_path):
    folder = write_manifests(tmp_path / "m", listener("plain", 20000))
    (tmp_path / "taken").write_text("a file, not a folder")
    [error] = errors(tmp_path, f"gateway: {{paths: [{folder}], runtime_dir: taken/run}}\n")
    assert error.startswith(f"{tmp_path / 'pyproxy.conf'}:1: gateway.runtime_dir: "
                            "cannot write the translated manifests")


def test_a_condition_keeps_its_transition_time_until_it_changes(tmp_path):
    """What GET /gateway/status serves across reloads: the time a condition last changed."""
    folder = write_manifests(tmp_path / "m", listener("plain", 20000))
    body = f"gateway: {{paths: [{folder}], address: 127.0.0.1}}\n"
    before = status_list(load(tmp_path, body))
    before_json = json.dumps(before)
    before = json.loads(before_json.replace('"lastTransitionTime": "20', '"lastTransitionTime": "19'))
    (folder / "route.yaml").write_text(tcp_route("echo", "absent"))      # ResolvedRefs turns False
    after = keep_transition_times(status_list(load(tmp_path, body)), before)

    def stamps(listing, kind):
        [item] = [item for item in listing["items"] if item["kind"] == kind]
        conditions = item["status"]["parents"][0]["conditions"] if kind == "TCPRoute" else \
            item["status"]["listeners"][0]["conditions"]
        return {c["type"]: (c["status"], c["lastTransitionTime"][:2]) for c in conditions}

    assert stamps(after, "TCPRoute") == {"Accepted": ("True", "19"), "ResolvedRefs": ("False", "20")}
    assert stamps(after, "Gateway")["Accepted"] == ("True", "19")
    assert keep_transition_times(after, None) is after


def test_a_rotated_secret_leaves_no_old_key_on_disk(tmp_path):
    folder = write_manifests(tmp_path / "m", listener("tls", 20000, "TLS",
                                                      ", hostname: kong.example, tls: {certificateRefs: "
                                                      "[{name: tls9443.kong.example}]}"))
    body = f"gateway: {{paths: [{folder}], address: 127.0.0.1}}\n"
    runtime = tmp_path / "gateway-runtime"
    written = []
    for _ in range(2):
        seed_secret(folder)
        config = load(tmp_path, body)
        [certificate] = config.certificates
        assert certificate.snis == ("kong.example",)
        written.append(sorted(path.name for path in runtime.glob("tls-*")))
        assert written[-1] == sorted(os.path.basename(path) for path in (certificate.cert, certificate.key))
    assert written[0] != written[1]


def test_a_reload_parses_only_the_manifest_files_that_changed(tmp_path):
    """The documents of each file are kept by a hash of its text in runtime_dir (0600: Secrets are in
    it): an unchanged file is not parsed again, a changed one is, a broken cache is ignored."""
    folder = write_manifests(tmp_path / "m", listener("plain", 20000))
    (folder / "stamped.yaml").write_text(       # an unquoted timestamp: a datetime, which is not cached
        "apiVersion: v1\nkind: Namespace\n"
        "metadata: {name: stamped, creationTimestamp: 2024-01-01T00:00:00Z}\n")
    body = f"gateway: {{paths: [{folder}], address: 127.0.0.1}}\n"
    load(tmp_path, body)
    cache = tmp_path / "gateway-runtime" / "parsed.marshal"
    assert cache.stat().st_mode & 0o777 == 0o600
    # What is cached is what is used: a cached document altered in place shows in the next load.
    version, entries = marshal.loads(cache.read_bytes())
    assert str(folder / "stamped.yaml") not in entries
    documents = entries[str(folder / "services.yaml")][1]
    documents[1][0]["endpoints"][0]["addresses"] = ["127.0.0.2"]
    cache.write_bytes(marshal.dumps((version, entries)))
    [upstream] = load(tmp_path, body).upstreams
    assert [target.host for target in upstream.targets] == ["127.0.0.2"]
    # A changed file is parsed again; a cache that is not one is ignored.
    (folder / "services.yaml").write_text(service("one", 20005))
    [upstream] = load(tmp_path, body).upstreams
    assert [(target.host, target.port) for target in upstream.targets] == [("127.0.0.1", 20005)]
    cache.write_bytes(b"not marshal")
    [upstream] = load(tmp_path, body).upstreams
    assert [(target.host, target.port) for target in upstream.targets] == [("127.0.0.1", 20005)]
