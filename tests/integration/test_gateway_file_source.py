"""Gateway API manifests as a configuration source of a running pyproxy (issue 17, file mode): the
`gateway` key, changes applied without a signal, bad manifests, `-t --status` and GET /gateway/status."""

from __future__ import annotations

import hashlib
import json
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.support import connect, free_port, pattern_bytes, recv_line, tag_handler, wait_until

CLASS_AND_GATEWAY = """\
apiVersion: gateway.networking.k8s.io/v1
kind: GatewayClass
metadata: {{name: pyproxy}}
spec: {{controllerName: gateway.pyproxy.dev/controller}}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {{name: edge, namespace: default}}
spec:
  gatewayClassName: pyproxy
  listeners:
{listeners}
"""


def tcp_route(name: str, backend: str, section: str = "plain") -> str:
    return f"""\
apiVersion: gateway.networking.k8s.io/v1alpha2
kind: TCPRoute
metadata: {{name: {name}, namespace: default}}
spec:
  parentRefs: [{{name: edge, sectionName: {section}}}]
  rules: [{{backendRefs: [{{name: {backend}, port: 1025}}]}}]
"""


def service(name: str, port: int) -> str:
    """A Service without a selector and the EndpointSlice that points it at 127.0.0.1:`port`."""
    return f"""\
apiVersion: v1
kind: Service
metadata: {{name: {name}, namespace: default}}
spec:
  ports: [{{name: tcp, port: 1025, protocol: TCP}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: {name}-loopback
  namespace: default
  labels: {{kubernetes.io/service-name: {name}}}
addressType: IPv4
ports: [{{name: tcp, port: {port}, protocol: TCP}}]
endpoints: [{{addresses: ["127.0.0.1"], conditions: {{ready: true}}}}]
"""


def listener(name: str, port: int, protocol: str = "TCP", more: str = "") -> str:
    return f"  - {{name: {name}, port: {port}, protocol: {protocol}{more}}}"


def get_json(port: int, path: str):
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
        return json.load(response)


def untimed(listing: dict) -> str:
    """A status listing without its times, which each load stamps anew."""
    return re.sub(r'"lastTransitionTime": "[^"]*"', "", json.dumps(listing))


def greeting(port: int) -> bytes:
    """The name of the backend a new session on `port` reaches (tag_handler says it first)."""
    with connect(port, timeout=5) as client:
        return recv_line(client)


def echoed_digest(sock: socket.socket, payload: bytes) -> str:
    """Send `payload` while reading the echo; the SHA-256 of what came back."""
    sender = threading.Thread(target=sock.sendall, args=(payload,))
    sender.start()
    digest, received = hashlib.sha256(), 0
    while received < len(payload):
        chunk = sock.recv(262144)
        assert chunk, f"the session ended after {received} of {len(payload)} bytes"
        digest.update(chunk)
        received += len(chunk)
    sender.join()
    return digest.hexdigest()


@pytest.fixture
def manifests(tmp_path: Path, upstreams):
    """A folder with a Gateway listening on a free port, a TCPRoute to Service `one`, and Services
    `one` and `two`, each in front of its own tagging echo server."""
    folder = tmp_path / "manifests"
    folder.mkdir()
    one, two = upstreams(tag_handler, name="one"), upstreams(tag_handler, name="two")
    port = free_port()
    (folder / "gateway.yaml").write_text(CLASS_AND_GATEWAY.format(listeners=listener("plain", port)))
    (folder / "route.yaml").write_text(tcp_route("echo", "one"))
    (folder / "services.yaml").write_text(service("one", one.port) + "---\n" + service("two", two.port))
    return folder, port


def test_a_changed_manifest_applies_without_a_signal_and_open_sessions_go_on(proxy, manifests):
    folder, port = manifests
    status_port = free_port()
    p = proxy(f"""
        worker_processes: 2
        status_listen: 127.0.0.1:{status_port}
        gateway:
          paths: [{folder}]
          address: 127.0.0.1
        """)
    assert greeting(port) == b"one\n"
    payload = pattern_bytes(4 << 20)
    with connect(port, timeout=10) as before:
        assert recv_line(before) == b"one\n"
        assert echoed_digest(before, payload[:1 << 20]) == hashlib.sha256(payload[:1 << 20]).hexdigest()

        (folder / "route.yaml").write_text(tcp_route("echo", "two"))       # no HUP
        changed = time.monotonic()
        wait_until(lambda: greeting(port) == b"two\n", timeout=10, what="the new backend")
        took = time.monotonic() - changed
        assert took < 3.0, f"the change took {took:.1f}s to apply"
        assert f"gateway manifests changed: {folder / 'route.yaml'}" in p.log_text()

        # The session opened before the change still reaches backend one, every byte intact.
        assert echoed_digest(before, payload) == hashlib.sha256(payload).hexdigest()

    # A file added to the folder applies too: a second route on a second listener.
    second = free_port()
    (folder / "gateway.yaml").write_text(CLASS_AND_GATEWAY.format(
        listeners=listener("plain", port) + "\n" + listener("other", second)))
    (folder / "route-2.yaml").write_text(tcp_route("other", "one", section="other"))
    wait_until(lambda: p.log_text().count("reload complete") >= 2 and greeting(second) == b"one\n",
               timeout=10, what="the added route")

    # GET /gateway/status: the statuses of the configuration being served.
    listing = get_json(status_port, "/gateway/status")
    assert listing["kind"] == "List"
    by_name = {(item["kind"], item["metadata"]["name"]): item for item in listing["items"]}
    gateway = by_name[("Gateway", "edge")]["status"]
    attached = {entry["name"]: entry["attachedRoutes"] for entry in gateway["listeners"]}
    assert attached == {"plain": 1, "other": 1}
    [parent] = by_name[("TCPRoute", "other")]["status"]["parents"]
    assert parent["controllerName"] == "gateway.pyproxy.dev/controller"
    assert {c["type"]: c["reason"] for c in parent["conditions"]} == {"Accepted": "Accepted",
                                                                       "ResolvedRefs": "ResolvedRefs"}
    assert all(c["lastTransitionTime"].endswith("Z") for c in parent["conditions"])


def test_bad_manifests_never_replace_what_is_serving(proxy, manifests):
    folder, port = manifests
    p = proxy(f"""
        worker_processes: 1
        gateway:
          paths: [{folder}]
          address: 127.0.0.1
        """)
    assert greeting(port) == b"one\n"

    # A file that is no longer YAML (an editor half-way through a save): the load fails, the file
    # and line are logged, and the running configuration goes on serving.
    (folder / "route.yaml").write_text(tcp_route("echo", "two") + "  - [unclosed\n")
    p.wait_log("reload failed", timeout=10)
    assert f"{folder / 'route.yaml'}:7: invalid YAML" in p.log_text()
    assert greeting(port) == b"one\n"

    # A malformed object: the warning names its file, line and identity, and its last valid version
    # goes on serving, as the API server would have refused the change.
    (folder / "route.yaml").write_text(tcp_route("echo", "two").replace("port: 1025", "port: web"))
    p.wait_log("reload complete", timeout=10)
    assert (f"{folder / 'route.yaml'}:1: TCPRoute default/echo: spec.rules[0].backendRefs[0].port: expected "
            f"a number 1–65535, got 'web'; its last valid version, read from {folder / 'route.yaml'}:1, is "
            "kept") in p.log_text()
    assert greeting(port) == b"one\n"

    # A new malformed object without a valid version is skipped; the valid ones apply (the route,
    # repaired, now goes to two).
    (folder / "route.yaml").write_text(tcp_route("echo", "two"))
    (folder / "wrong.yaml").write_text("# a route with a wrong field\n"
                                       + tcp_route("wrong", "one").replace("port: 1025", "port: web"))
    p.wait_log("reload complete", timeout=10, count=2)
    assert f"{folder / 'wrong.yaml'}:2: TCPRoute default/wrong: spec.rules[0].backendRefs[0].port:" \
        in p.log_text()
    assert greeting(port) == b"two\n"

    # A file removed from the folder applies too: without its route, a session finds no backend.
    (folder / "route.yaml").unlink()
    p.wait_log("reload complete", timeout=10, count=3)
    reloads = [line for line in p.log_text().splitlines() if "reloading configuration" in line]
    assert reloads[-1].endswith(f"(gateway manifests changed: {folder / 'route.yaml'})")
    assert greeting(port) == b""


def test_status_option_prints_the_statuses_kubectl_shows(proxy, manifests, tmp_path):
    folder, port = manifests
    file_port, tls_port = free_port(), free_port()
    (folder / "gateway.yaml").write_text(CLASS_AND_GATEWAY.format(listeners="\n".join([
        listener("plain", port), listener("clash", file_port, "TLS", ", tls: {mode: Passthrough}"),
        listener("tls", tls_port, "TLS", ", tls: {mode: Passthrough}")])))
    (folder / "missing.yaml").write_text(tcp_route("nowhere", "absent"))
    (folder / "stray.yaml").write_text(tcp_route("stray", "one", section="nope"))
    p = proxy(f"""
        stream_listen: [127.0.0.1:{file_port}]
        gateway:
          paths: [{folder}]
          address: 127.0.0.1
        """, start=False)
    done = p.run_cli("-t", "--status", "-o", "json")
    assert done.returncode == 0, done.stderr
    assert "test is successful" in done.stderr
    listing = json.loads(done.stdout)
    assert [item["kind"] for item in listing["items"]][:2] == ["GatewayClass", "Gateway"]
    by_name = {(item["kind"], item["metadata"]["name"]): item for item in listing["items"]}
    assert by_name[("TCPRoute", "echo")]["apiVersion"] == "gateway.networking.k8s.io/v1alpha2"
    assert by_name[("TCPRoute", "echo")]["metadata"] == {"name": "echo", "namespace": "default"}

    def reasons(conditions):
        return {c["type"]: (c["status"], c["reason"]) for c in conditions}

    listeners = {entry["name"]: entry for entry in by_name[("Gateway", "edge")]["status"]["listeners"]}
    assert reasons(listeners["plain"]["conditions"])["Accepted"] == ("True", "Accepted")
    assert listeners["plain"]["supportedKinds"] == [{"group": "gateway.networking.k8s.io",
                                                     "kind": "TCPRoute"}]
    assert listeners["plain"]["attachedRoutes"] == 2      # echo, and nowhere (attached, no backend)
    assert reasons(listeners["clash"]["conditions"])["Accepted"] == ("False", "PortUnavailable")
    assert reasons(listeners["tls"]["conditions"])["Accepted"] == ("True", "Accepted")

    def parent(name):
        [entry] = by_name[("TCPRoute", name)]["status"]["parents"]
        return reasons(entry["conditions"])

    assert parent("echo") == {"Accepted": ("True", "Accepted"), "ResolvedRefs": ("True", "ResolvedRefs")}
    assert parent("nowhere")["ResolvedRefs"] == ("False", "BackendNotFound")
    assert parent("stray")["Accepted"] == ("False", "NoMatchingParent")

    yaml_output = p.run_cli("-t", "--status")
    assert yaml_output.returncode == 0 and yaml_output.stdout.startswith("apiVersion: v1\nkind: List\n")

    # -T prints the file's own configuration with its gateway key; that output loads again, with
    # the same statuses.
    dumped = p.run_cli("-T")
    assert dumped.returncode == 0, dumped.stderr
    assert f"- {folder}\n" in dumped.stdout
    (tmp_path / "dumped.conf").write_text(dumped.stdout)
    again = subprocess.run([sys.executable, "-m", "pyproxy", "-t", "--status", "-o", "json", "-c",
                            str(tmp_path / "dumped.conf")], capture_output=True, text=True, timeout=30)
    assert again.returncode == 0, again.stderr
    assert untimed(json.loads(again.stdout)) == untimed(listing)
    assert "--status goes with -t" in p.run_cli("--status").stderr


def test_gateway_status_is_not_found_without_a_gateway_key(proxy):
    status_port = free_port()
    proxy(f"""
        stream_listen: [127.0.0.1:{free_port()}]
        status_listen: 127.0.0.1:{status_port}
        """)
    with pytest.raises(urllib.error.HTTPError) as refused:
        get_json(status_port, "/gateway/status")
    assert refused.value.code == 404


def test_a_pyproxy_started_without_manifests_opens_their_listeners_when_they_come(proxy, upstreams, tmp_path):
    folder = tmp_path / "later"
    folder.mkdir()
    p = proxy(f"""
        worker_processes: 2
        gateway:
          paths: [{folder}]
          address: 127.0.0.1
        """)
    assert "listening on no address yet" in p.log_text()
    one, port = upstreams(tag_handler, name="one"), free_port()
    (folder / "all.yaml").write_text(CLASS_AND_GATEWAY.format(listeners=listener("plain", port)) + "---\n"
                                     + tcp_route("echo", "one") + "---\n" + service("one", one.port))
    p.wait_log("reload complete", timeout=10)
    assert f"gateway manifests changed: {folder / 'all.yaml'}" in p.log_text()
    assert greeting(port) == b"one\n"


def test_an_invalid_backend_s_share_of_the_connections_is_refused(proxy, manifests):
    """GW BackendRef: 'connections that would have been routed to an invalid backend are rejected' —
    by weight: 30 of every 100 sessions end at once (EOF or RST, nothing from any backend), the other
    70 reach the valid backend, never the invalid one's share given to it."""
    folder, port = manifests
    (folder / "route.yaml").write_text(tcp_route("echo", "one").replace(
        "backendRefs: [{name: one, port: 1025}]",
        "backendRefs: [{name: one, port: 1025, weight: 70}, {name: gone, port: 1025, weight: 30}]"))
    p = proxy(f"""
        worker_processes: 2
        gateway:
          paths: [{folder}]
          address: 127.0.0.1
        """)
    answers = []
    for _ in range(100):
        try:
            answers.append(greeting(port))
        except ConnectionResetError:
            answers.append(b"")
    refused = answers.count(b"")
    # Each worker refuses exactly 30% of its own sessions (an evenly spread credit), so the total is
    # 30 give or take one per worker.
    assert 28 <= refused <= 32, answers
    assert answers.count(b"one\n") == 100 - refused
    p.wait_log('session refused: it falls in the reject_share (0.3) of service "tcproute.default.echo"')
