"""Cluster mode (issue 17): pyproxy.gateway.cluster's list + watch, relist on 410, a missing CRD,
status writes and the Lease, against `FakeApiServer`.

No Kubernetes API server can run on this machine (no kube-apiserver binary is reachable from the
package registries it has), so `FakeApiServer` is a real HTTP server on loopback that answers as the
API server does, from the bodies in tests/data/kube/ (written from the Kubernetes API reference and
API concepts): lists with `metadata.resourceVersion`, chunked watch streams of ADDED, MODIFIED,
DELETED and BOOKMARK events, `410 Gone` (the HTTP status or the watch's ERROR event, the Status
object with reason Expired), `404` for a resource whose CRD is not installed, the `status`
subresource (merge patch and PUT, `409 Conflict` on a stale resourceVersion) and Leases. The
integration tests (tests/integration/test_gateway_cluster.py) run real pyproxy processes against it.
"""

from __future__ import annotations

import copy
import json
import os
import re
import sys
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml

from pyproxy.config import ConfigError, load_config
from pyproxy.gateway.cluster import BY_KIND, KINDS, ClusterWatcher, merged_status
from pyproxy.log import ErrorLog
from tests.support import free_port, wait_until

DATA = Path(__file__).resolve().parent.parent / "data" / "kube"
TOKEN = "fake-token"            # the bearer token the kubeconfig carries and the server requires
CORE_KINDS = {"services": "Service", "secrets": "Secret", "configmaps": "ConfigMap",
              "namespaces": "Namespace"}
CLUSTER_SCOPED = {"gatewayclasses", "namespaces", "ingressclasses"}
# group/version/plural of every collection pyproxy reads, as the API server with the Gateway API
# experimental CRDs and Kong's CRDs serves them (the seed's routes are v1alpha2).
COLLECTIONS = {
    "GatewayClass": ("gateway.networking.k8s.io", "v1", "gatewayclasses"),
    "Gateway": ("gateway.networking.k8s.io", "v1", "gateways"),
    "TCPRoute": ("gateway.networking.k8s.io", "v1alpha2", "tcproutes"),
    "TLSRoute": ("gateway.networking.k8s.io", "v1alpha2", "tlsroutes"),
    "UDPRoute": ("gateway.networking.k8s.io", "v1alpha2", "udproutes"),
    "ReferenceGrant": ("gateway.networking.k8s.io", "v1beta1", "referencegrants"),
    "BackendTLSPolicy": ("gateway.networking.k8s.io", "v1", "backendtlspolicies"),
    "TCPIngress": ("configuration.konghq.com", "v1beta1", "tcpingresses"),
    "UDPIngress": ("configuration.konghq.com", "v1beta1", "udpingresses"),
    "Service": ("", "v1", "services"),
    "EndpointSlice": ("discovery.k8s.io", "v1", "endpointslices"),
    "Secret": ("", "v1", "secrets"),
    "ConfigMap": ("", "v1", "configmaps"),
    "Namespace": ("", "v1", "namespaces"),
    "IngressClass": ("networking.k8s.io", "v1", "ingressclasses"),
    "Lease": ("coordination.k8s.io", "v1", "leases"),
}


def api_status(name: str, message: str | None = None) -> dict[str, Any]:
    """A Status body from tests/data/kube (`status-expired-410`, `status-notfound-404`...)."""
    body: dict[str, Any] = json.loads((DATA / f"{name}.json").read_text())
    if message is not None:
        body["message"] = message
    return body


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch, as the API server applies `application/merge-patch+json`."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


class FakeApiServer:
    """An in-memory API server on 127.0.0.1:`port` (see the module docstring). Objects are kept per
    collection (group, version, plural) with one resourceVersion counter, and every change is an
    event that open watches of its collection receive."""

    def __init__(self, port: int, bookmark_interval: float = 0.5):
        self.port = port
        self.bookmark_interval = bookmark_interval
        self.lock = threading.Condition()
        self.version = 1000
        self.announced = 1000           # the last resourceVersion a watch event carried
        self.objects: dict[tuple[str, str, str], dict[tuple[str, str], dict[str, Any]]] = {}
        self.events: list[tuple[int, tuple[str, str, str], str, dict[str, Any]]] = []
        self.installed = {collection for collection in COLLECTIONS.values()}
        self.compacted = 0              # a watch from an older resourceVersion gets 410 Gone
        self.gone_as_http = False       # 410 as the HTTP status of the watch request, not an ERROR event
        self.generation = 0             # bumped by expire(): open watches end with an ERROR 410
        self.requests: list[tuple[str, str, dict[str, str], Any]] = []   # method, path, query, body
        self.scripted: dict[str, bytes] = {}   # a path's watch answered with these lines, as they are
        self.forbidden: set[tuple[str, str, str]] = set()   # collections the token may not read
        self.after_write: Callable[[], None] | None = None  # run once a write is stored, before its answer
        self.server: ThreadingHTTPServer | None = None

    # -- life -------------------------------------------------------------------------------------
    def start(self) -> FakeApiServer:
        handler = type("Handler", (_Handler,), {"api": self})
        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), handler)
        self.server.daemon_threads = True
        self.server.block_on_close = False
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05},
                         daemon=True).start()
        return self

    def stop(self) -> None:
        """Down: no new connection is accepted and every open watch ends (its connection closes)."""
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None
        with self.lock:
            self.generation += 1
            self.lock.notify_all()

    @property
    def up(self) -> bool:
        return self.server is not None

    # -- what a test does to the cluster ------------------------------------------------------------
    def apply(self, obj: dict[str, Any], notify: bool = True) -> dict[str, Any]:
        """Create or replace an object (its status is kept, as `kubectl apply` keeps it). `notify`
        False changes it without a watch event: as if the event was lost to compaction."""
        obj = copy.deepcopy(obj)
        collection = COLLECTIONS[obj["kind"]]
        meta = obj.setdefault("metadata", {})
        if collection[2] not in CLUSTER_SCOPED:
            meta.setdefault("namespace", "default")
        key = (meta.get("namespace", ""), meta["name"])
        with self.lock:
            old = self.objects.setdefault(collection, {}).get(key)
            meta.setdefault("uid", f"uid-{collection[2]}-{key[0]}-{key[1]}")
            meta.setdefault("creationTimestamp", old["metadata"]["creationTimestamp"] if old else
                            time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
            spec_changed = old is None or old.get("spec") != obj.get("spec")
            meta["generation"] = (old["metadata"].get("generation", 1) + spec_changed) if old else 1
            if old is not None and "status" in old and "status" not in obj:
                obj["status"] = old["status"]
            self._store(collection, key, obj, "MODIFIED" if old else "ADDED", notify)
        return obj

    def delete(self, kind: str, name: str, namespace: str = "default") -> None:
        collection = COLLECTIONS[kind]
        with self.lock:
            scope = namespace if collection[2] not in CLUSTER_SCOPED else ""
            obj = self.objects[collection].pop((scope, name))
            self.version += 1
            obj["metadata"]["resourceVersion"] = str(self.version)
            self.announced = self.version
            self.events.append((self.version, collection, "DELETED", copy.deepcopy(obj)))
            self.lock.notify_all()

    def get(self, kind: str, name: str, namespace: str = "default") -> dict[str, Any] | None:
        collection = COLLECTIONS[kind]
        with self.lock:
            obj = self.objects.get(collection, {}).get(
                ("" if collection[2] in CLUSTER_SCOPED else namespace, name))
            return copy.deepcopy(obj)

    def expire(self) -> None:
        """Compaction: every resourceVersion so far is too old to watch from; open watches end with
        the ERROR event 410 (or, `gone_as_http`, the next watch request is answered 410)."""
        with self.lock:
            self.compacted = self.version
            self.generation += 1
            self.lock.notify_all()

    def writes(self, method: str = "PATCH", suffix: str = "/status") -> list[tuple[str, Any]]:
        return [(path, body) for m, path, _, body in self.requests if m == method and path.endswith(suffix)]

    def _store(self, collection: tuple[str, str, str], key: tuple[str, str], obj: dict[str, Any],
               kind: str, notify: bool = True) -> None:
        self.version += 1
        obj["metadata"]["resourceVersion"] = str(self.version)
        self.objects.setdefault(collection, {})[key] = obj
        if notify:
            self.announced = self.version
            self.events.append((self.version, collection, kind, copy.deepcopy(obj)))
        self.lock.notify_all()

    # -- requests -----------------------------------------------------------------------------------
    def list(self, collection: tuple[str, str, str], namespace: str | None,
             query: dict[str, str]) -> dict[str, Any]:
        group, version, _ = collection
        with self.lock:
            items = [copy.deepcopy(obj) for obj in self.objects.get(collection, {}).values()
                     if _selected(obj, namespace, query)]
            metadata: dict[str, Any] = {"resourceVersion": str(self.version)}
            # A page of `limit` items and, while more follow, a `continue` token (here the offset of
            # the next page; the API server's is opaque), as the API server pages a list.
            start = int(query.get("continue") or 0)
            limit = int(query.get("limit") or 0)
            if limit:
                if start + limit < len(items):
                    metadata["continue"] = str(start + limit)
                    metadata["remainingItemCount"] = len(items) - start - limit
                items = items[start:start + limit]
            listing = {"kind": f"{COLLECTION_KINDS[collection]}List",
                       "apiVersion": f"{group}/{version}" if group else version,
                       "metadata": metadata, "items": items}
        if not group:   # the API server leaves out each item's kind and apiVersion for built-in lists
            for item in items:
                item.pop("kind", None)
                item.pop("apiVersion", None)
        return listing

    def watch(self, collection: tuple[str, str, str], namespace: str | None,
              query: dict[str, str]) -> Iterator[dict[str, Any]]:
        """The events of a watch from `resourceVersion`, then an ERROR 410 if it expires, bookmarks
        while nothing happens (`allowWatchBookmarks`), until `timeoutSeconds`."""
        since = int(query.get("resourceVersion") or self.version)
        deadline = time.monotonic() + float(query.get("timeoutSeconds") or 1800)
        bookmarks = query.get("allowWatchBookmarks") == "true"
        with self.lock:
            generation = self.generation
        next_bookmark = time.monotonic() + self.bookmark_interval
        while time.monotonic() < deadline:
            with self.lock:
                ended = since < self.compacted or generation != self.generation
                expired = self.up and since < self.compacted
                pending = [(version, kind, obj) for version, where, kind, obj in self.events
                           if where == collection and version > since and _selected(obj, namespace, query)]
                if not pending and not ended:
                    self.lock.wait(0.05)
            if ended:
                if expired:
                    yield {"type": "ERROR", "object": api_status(
                        "status-expired-410", f"too old resource version: {since} ({self.compacted})")}
                return
            for version, kind, obj in pending:
                since = max(since, version)
                yield {"type": kind, "object": obj}
            if bookmarks and time.monotonic() >= next_bookmark:
                group, version_name, _ = collection
                with self.lock:
                    if any(where == collection and version > since and _selected(obj, namespace, query)
                           for version, where, _, obj in self.events):
                        continue        # events came meanwhile: they go first, the bookmark after
                    since = max(since, self.announced)
                next_bookmark = time.monotonic() + self.bookmark_interval
                yield {"type": "BOOKMARK", "object": {
                    "kind": COLLECTION_KINDS[collection],
                    "apiVersion": f"{group}/{version_name}" if group else version_name,
                    "metadata": {"resourceVersion": str(since), "creationTimestamp": None}}}

    def write(self, method: str, collection: tuple[str, str, str], namespace: str, name: str | None,
              subresource: str | None, body: Any, content_type: str) -> tuple[int, dict[str, Any]]:
        """POST (create), PUT (replace, or the status subresource) and PATCH (merge patch of the
        status subresource): 409 on a stale resourceVersion or an existing name."""
        key = (namespace, name or (body.get("metadata") or {}).get("name", ""))
        with self.lock:
            current = self.objects.get(collection, {}).get(key)
            if method == "POST":
                if current is not None:
                    return 409, api_status("status-alreadyexists-409")
                obj = copy.deepcopy(body)
                obj["metadata"]["namespace"] = namespace
                obj["metadata"].setdefault("creationTimestamp", time.strftime("%Y-%m-%dT%H:%M:%SZ"))
                self._store(collection, key, obj, "ADDED")
                return 201, obj
            if current is None:
                return 404, api_status("status-notfound-404", f'{collection[2]} "{key[1]}" not found')
            if method == "PATCH" and content_type != "application/merge-patch+json":
                return 415, {"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 415,
                             "reason": "UnsupportedMediaType", "message": "the body of the request was "
                             "in an unknown format - accepted media types include: "
                             "application/json-patch+json, application/merge-patch+json"}
            wanted = (body.get("metadata") or {}).get("resourceVersion")
            if wanted is not None and wanted != current["metadata"]["resourceVersion"]:
                return 409, api_status("status-conflict-409")
            if subresource == "status":
                status = (merge_patch(current.get("status"), body.get("status")) if method == "PATCH"
                          else copy.deepcopy(body.get("status")))
                obj = {**copy.deepcopy(current), "status": status}
            else:
                obj = copy.deepcopy(body)
                obj["metadata"] = {**current["metadata"], **obj.get("metadata", {})}
            self._store(collection, key, obj, "MODIFIED")
        if self.after_write is not None:
            self.after_write()
        return 200, obj


COLLECTION_KINDS = {collection: kind for kind, collection in COLLECTIONS.items()}


def _selected(obj: dict[str, Any], namespace: str | None, query: dict[str, str]) -> bool:
    if namespace is not None and obj["metadata"].get("namespace") != namespace:
        return False
    selector = query.get("fieldSelector")
    if selector:
        field, _, value = selector.partition("=")
        if field == "type" and obj.get("type") != value:
            return False
    return True


class _Handler(BaseHTTPRequestHandler):
    api: FakeApiServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        self._serve("GET")

    def do_POST(self) -> None:
        self._serve("POST")

    def do_PUT(self) -> None:
        self._serve("PUT")

    def do_PATCH(self) -> None:
        self._serve("PATCH")

    def _serve(self, method: str) -> None:
        url = urllib.parse.urlsplit(self.path)
        query = dict(urllib.parse.parse_qsl(url.query))
        length = int(self.headers.get("Content-Length") or 0)
        body = json.loads(self.rfile.read(length)) if length else None
        self.api.requests.append((method, url.path, query, body))
        if self.headers.get("Authorization") != f"Bearer {TOKEN}":
            self._answer(401, {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                               "message": "Unauthorized", "reason": "Unauthorized", "code": 401})
            return
        where = _parse_path(url.path)
        if where is None or where[0] not in self.api.installed:
            self._answer(404, api_status("status-notfound-404"))
            return
        collection, namespace, name, subresource = where
        if collection in self.api.forbidden:
            group, _, plural = collection
            self._answer(403, {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                               "message": f'{plural}{"." + group if group else ""} is forbidden: User '
                               f'"system:serviceaccount:pyproxy:pyproxy" cannot list resource "{plural}" in '
                               f'API group "{group}" at the cluster scope', "reason": "Forbidden",
                               "details": {"group": group, "kind": plural}, "code": 403})
            return
        if method == "GET" and name is None:
            if query.get("watch") in ("true", "1"):
                self._watch(collection, namespace, query)
            else:
                self._answer(200, self.api.list(collection, namespace, query))
        elif method == "GET":
            with self.api.lock:
                obj = self.api.objects.get(collection, {}).get((namespace or "", name))
                obj = copy.deepcopy(obj)
            self._answer(*(200, obj) if obj else (404, api_status("status-notfound-404",
                                                                  f'{collection[2]} "{name}" not found')))
        else:
            self._answer(*self.api.write(method, collection, namespace or "", name, subresource, body,
                                         self.headers.get("Content-Type", "").split(";")[0]))

    def _answer(self, code: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _watch(self, collection: tuple[str, str, str], namespace: str | None, query: dict[str, str]) -> None:
        since = int(query.get("resourceVersion") or 0)
        script = self.api.scripted.pop(urllib.parse.urlsplit(self.path).path, None)
        if script is not None:
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for line in script.splitlines(keepends=True):
                self.wfile.write(b"%x\r\n%s\r\n" % (len(line), line))
            self.wfile.write(b"0\r\n\r\n")
            self.close_connection = True
            return
        if self.api.gone_as_http and since < self.api.compacted:
            self._answer(410, api_status("status-expired-410",
                                         f"too old resource version: {since} ({self.api.compacted})"))
            return
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        try:
            for event in self.api.watch(collection, namespace, query):
                if self.api.gone_as_http and event["type"] == "ERROR":
                    break       # ends the stream: the next watch request is answered 410
                line = json.dumps(event).encode() + b"\n"
                self.wfile.write(b"%x\r\n%s\r\n" % (len(line), line))
                self.wfile.flush()
            self.wfile.write(b"0\r\n\r\n")
        except OSError:
            pass
        self.close_connection = True


_PATH = re.compile(r"/(?:api/(?P<core>v1)|apis/(?P<group>[^/]+)/(?P<version>[^/]+))"
                   r"(?:/namespaces/(?P<namespace>[^/]+))?/(?P<plural>[^/]+)(?:/(?P<name>[^/]+))?"
                   r"(?:/(?P<sub>status))?")


def _parse_path(path: str) -> tuple[tuple[str, str, str], str | None, str | None, str | None] | None:
    """(collection, namespace, name, subresource) of an API path; `/api/v1/namespaces/x` is the
    Namespace x, not a namespace with no collection."""
    match = _PATH.fullmatch(path)
    if match is None:
        return None
    if match["core"] and match["namespace"] and match["plural"] in ("status",):
        return None
    collection = ("", "v1", match["plural"]) if match["core"] else (match["group"], match["version"],
                                                                       match["plural"])
    if match["core"] and match["namespace"] and match["plural"] not in CORE_KINDS:
        return None
    return collection, match["namespace"], match["name"], match["sub"]


def seed_objects(echo_port: int, ports: tuple[int, int] | None = None) -> list[dict[str, Any]]:
    """The seed's manifests (examples/gateway/seed.yaml, their listener ports moved to `ports`), the
    echo Service pointed at 127.0.0.1:`echo_port` and the seed's Secret, as objects to apply."""
    from tests.unit.test_gateway_seed import EXAMPLES, seed_secret
    seed = (EXAMPLES / "seed.yaml").read_text()
    if ports is not None:
        seed = re.sub(r"port: 9000\b", f"port: {ports[0]}", seed)
        seed = re.sub(r"port: 9443\b", f"port: {ports[1]}", seed)
    loopback = (EXAMPLES / "echo-loopback.yaml").read_text().replace(
        "- {name: tcp, port: 1025, protocol: TCP}\n", f"- {{name: tcp, port: {echo_port}, protocol: TCP}}\n")
    documents = [document for document in yaml.safe_load_all(seed + "\n---\n" + loopback) if document]
    with tempfile.TemporaryDirectory() as folder:
        secret = yaml.safe_load(seed_secret(Path(folder)).read_text())
    return [*documents, secret]


def kubeconfig(folder: Path, port: int) -> Path:
    """A kubeconfig for the FakeApiServer on `port`, with a bearer token as a service account has."""
    path = folder / "kubeconfig"
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "fake",
        "clusters": [{"name": "fake", "cluster": {"server": f"http://127.0.0.1:{port}"}}],
        "users": [{"name": "fake", "user": {"token": TOKEN}}],
        "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "fake"}}]}))
    return path


# --- the tests -------------------------------------------------------------------------------------

CONTROLLER = "gateway.pyproxy.dev/controller"


@pytest.fixture
def api():
    server = FakeApiServer(free_port()).start()
    yield server
    server.stop()


def make_watcher(tmp_path: Path, api: FakeApiServer, extra: str = "") -> tuple[ClusterWatcher, Path]:
    """A ClusterWatcher for `api`, run by the test itself (no fork, no signal handlers), and the
    log file it writes to."""
    conf = tmp_path / "pyproxy.conf"
    conf.write_text(f"gateway:\n  kubernetes:\n    kubeconfig: {kubeconfig(tmp_path, api.port)}\n"
                    f"    lease_duration: 2s\n    lease_retry: 300ms\n{extra}")
    (tmp_path / "metrics").mkdir(exist_ok=True)
    log_path = tmp_path / "error.log"
    watcher = ClusterWatcher(ErrorLog(str(log_path), "info"), load_config(str(conf)), os.getpid(),
                             str(tmp_path / "metrics"))
    watcher.client = watcher._client()
    os.makedirs(watcher.gateway.runtime_dir, exist_ok=True)
    return watcher, log_path


def follow(watcher: ClusterWatcher, *kinds: str) -> None:
    """Only these kinds, each listed and watched in its thread as the cluster process does
    (the test stops them with watcher._stop())."""
    watcher.collections = [(BY_KIND[kind], None) for kind in kinds]
    watcher.store.unsynced = len(kinds)
    for kind, namespace in watcher.collections:
        threading.Thread(target=watcher.follow, args=(kind, namespace), daemon=True).start()


def route(name: str, backend: str = "echo", **metadata: Any) -> dict[str, Any]:
    return {"apiVersion": "gateway.networking.k8s.io/v1alpha2", "kind": "TCPRoute",
            "metadata": {"name": name, **metadata},
            "spec": {"parentRefs": [{"name": "kong", "sectionName": "stream9000"}],
                     "rules": [{"backendRefs": [{"name": backend, "port": 1025}]}]}}


def test_the_kubernetes_key_is_validated(tmp_path):
    conf = tmp_path / "pyproxy.conf"
    (tmp_path / "kubeconfig").write_text("{}")
    conf.write_text("gateway:\n  kubernetes: {in_cluster: true, kubeconfig: kubeconfig, "
                    "namespaces: [Bad_Name],"
                    " lease_duration: 3s, lease_retry: 5s, watch: yes}\n")
    with pytest.raises(ConfigError) as caught:
        load_config(str(conf))
    assert [str(error) for error in caught.value.errors] == [
        f"{conf}:2: gateway.kubernetes.watch: unknown key 'watch'",
        f"{conf}:2: gateway.kubernetes: expected either kubeconfig: FILE or in_cluster: true",
        f"{conf}:2: gateway.kubernetes.namespaces[0]: expected a Kubernetes name (lower case letters, "
        "digits, '-' and '.'), got 'Bad_Name'",
        f"{conf}:2: gateway.kubernetes.lease_retry: must be shorter than lease_duration (3s): a leader "
        "renews the Lease every lease_retry",
    ]
    conf.write_text("gateway:\n  kubernetes: {kubeconfig: nowhere}\n")
    with pytest.raises(ConfigError) as caught:
        load_config(str(conf))
    assert [str(error) for error in caught.value.errors] == [
        f"{conf}:2: gateway.kubernetes.kubeconfig: no such file: {tmp_path / 'nowhere'}"]
    # Without paths: the snapshot of the API server's objects is the one manifest path, not there yet.
    conf.write_text("gateway:\n  kubernetes: {in_cluster: true, namespaces: default, lease_duration: 3s}\n")
    config = load_config(str(conf))
    assert config.gateway is not None and config.gateway.kubernetes is not None
    assert config.gateway.paths == (str(tmp_path / "gateway-runtime" / "cluster-objects.json"),)
    assert config.gateway.kubernetes.namespaces == ("default",)
    assert config.gateway.kubernetes.lease_retry == 1.0          # a third of lease_duration
    assert config.stream_listen == ()


def test_without_the_kubernetes_package_the_key_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "kubernetes", None)     # as if it were not installed
    conf = tmp_path / "pyproxy.conf"
    conf.write_text("gateway:\n  kubernetes: {in_cluster: true}\n")
    with pytest.raises(ConfigError) as caught:
        load_config(str(conf))
    assert [str(error) for error in caught.value.errors] == [
        f"{conf}:2: gateway.kubernetes: reading from an API server needs the Kubernetes client: "
        "pip install 'pyproxy[kubernetes]'"]


def test_a_list_answer_as_the_api_server_writes_it(api, tmp_path):
    """The fake server's lists have the shape of the reference answers in tests/data/kube, and the
    watcher gives each item of a built-in list the kind and apiVersion the API server leaves out."""
    reference = json.loads((DATA / "service-list.json").read_text())
    api.apply(service := {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "echo"},
                          "spec": reference["items"][0]["spec"]})
    listing = api.list(("", "v1", "services"), None, {})
    assert listing.keys() == reference.keys() and listing["kind"] == reference["kind"]
    assert "kind" not in listing["items"][0] and int(listing["metadata"]["resourceVersion"]) > 0
    custom = json.loads((DATA / "tcproute-list.json").read_text())
    api.apply(custom["items"][0])
    assert api.list(COLLECTIONS["TCPRoute"], None, {})["items"][0]["kind"] == "TCPRoute"

    watcher, _ = make_watcher(tmp_path, api)
    version = watcher.list_kind(BY_KIND["Service"], None, True)
    assert version == str(api.version)
    assert watcher.store.get(("Service", "default", "echo"))["apiVersion"] == "v1"
    assert watcher.store.get(("Service", "default", "echo"))["spec"] == service["spec"]


def test_a_large_list_is_read_in_pages(api, tmp_path):
    """1,201 Services are listed in three pages of at most 500, each asked for with the `continue`
    token of the one before: every Service is in the store, and no request asked for all at once."""
    for number in range(1201):
        api.apply({"apiVersion": "v1", "kind": "Service", "metadata": {"name": f"s{number:04d}"},
                   "spec": {"ports": [{"port": 80}]}}, notify=False)
    watcher, _ = make_watcher(tmp_path, api)
    api.requests.clear()
    watcher.list_kind(BY_KIND["Service"], None, True)
    lists = [query for method, path, query, _ in api.requests
             if method == "GET" and path == "/api/v1/services"]
    assert [(query.get("limit"), query.get("continue")) for query in lists] == [
        ("500", None), ("500", "500"), ("500", "1000")]
    assert all(watcher.store.get(("Service", "default", f"s{number:04d}")) for number in range(1201))


def test_a_recorded_watch_stream_is_followed_to_its_410(api, tmp_path):
    """tests/data/kube/watch-events.jsonl, replayed as one chunked stream: ADDED, MODIFIED, BOOKMARK,
    DELETED, then the ERROR event 410 that makes the watcher list again."""
    watcher, _ = make_watcher(tmp_path, api)
    kind = BY_KIND["TCPRoute"]
    watcher.list_kind(kind, None, True)
    path = kind.path("v1alpha2", None)
    api.scripted[path] = (DATA / "watch-events.jsonl").read_bytes()
    seen: list[dict[str, Any] | None] = []
    original = watcher.store.put
    watcher.store.put = lambda obj: (seen.append(obj), original(obj))[1]   # type: ignore[method-assign]
    with pytest.raises(Exception) as caught:
        watcher.watch(kind, None, "1187")
    assert type(caught.value).__name__ == "Gone"
    assert [obj["metadata"]["generation"] for obj in seen] == [1, 2]       # ADDED, MODIFIED
    assert watcher.store.get(("TCPRoute", "default", "second")) is None     # DELETED
    [watch] = [query for method, where, query, _ in api.requests if where == path and "watch" in query]
    assert watch["resourceVersion"] == "1187" and watch["allowWatchBookmarks"] == "true"
    assert int(watch["timeoutSeconds"]) > 0


def test_watch_bookmarks_and_http_410_and_a_missing_crd(api, tmp_path):
    api.installed.discard(COLLECTIONS["TCPIngress"])
    api.apply(route("first"))
    watcher, log = make_watcher(tmp_path, api)
    follow(watcher, "TCPRoute", "TCPIngress")
    try:
        wait_until(lambda: watcher.store.unsynced == 0, what="both kinds listed")
        api.apply(route("second"))
        wait_until(lambda: watcher.store.get(("TCPRoute", "default", "second")), what="the ADDED event")
        # Bookmarks move the watch on: after one, a restarted watch starts from the bookmark's version.
        time.sleep(1.2)
        watches = [query["resourceVersion"] for _, where, query, _ in api.requests
                   if where.endswith("/tcproutes") and "watch" in query]
        assert watches
        # 410 as the HTTP status of a watch request: listed again, the change it missed is seen.
        api.gone_as_http = True
        api.apply(route("first", backend="other"), notify=False)
        api.expire()
        wait_until(lambda: watcher.store.get(("TCPRoute", "default", "first"))["spec"]["rules"][0]
                   ["backendRefs"][0]["name"] == "other", what="the relist after HTTP 410")
        lists = [query for _, where, query, _ in api.requests
                 if where.endswith("/tcproutes") and "watch" not in query]
        assert len(lists) >= 2
    finally:
        watcher._stop()
    assert log.read_text().count("no TCPIngress is served") == 1
    assert "410 Gone, the watch expired; listing again" in log.read_text()


def test_the_snapshot_leaves_out_what_changes_without_meaning(api, tmp_path):
    watcher, _ = make_watcher(tmp_path, api)
    obj = api.apply(route("first"))
    watcher.store.put({**obj, "status": {"parents": []},
                       "metadata": {**obj["metadata"], "managedFields": [{"manager": "kubectl"}]}})
    watcher.write_snapshot()
    path = Path(watcher.snapshot_path)
    [item] = json.loads(path.read_text())["items"]
    assert "status" not in item and "resourceVersion" not in item["metadata"]
    assert "managedFields" not in item["metadata"] and item["metadata"]["generation"] == 1
    assert path.stat().st_mode & 0o777 == 0o600
    before = path.stat().st_mtime_ns
    watcher.store.put({**obj, "metadata": {**obj["metadata"], "resourceVersion": "99999"}})
    time.sleep(0.01)
    watcher.write_snapshot()
    assert path.stat().st_mtime_ns == before        # unchanged in meaning: not written, no reload


def test_merged_status_keeps_times_and_other_controllers():
    live = {"parents": [
        {"controllerName": "example.net/other", "parentRef": {"name": "theirs"}, "conditions": []},
        {"controllerName": CONTROLLER, "parentRef": {"name": "kong"}, "conditions": [
            {"type": "Accepted", "status": "True", "reason": "Accepted",
             "lastTransitionTime": "2026-01-01T00:00:00Z"},
            {"type": "ResolvedRefs", "status": "True", "reason": "ResolvedRefs",
             "lastTransitionTime": "2026-01-01T00:00:00Z"}]}]}
    computed = {"parents": [
        {"controllerName": CONTROLLER, "parentRef": {"name": "kong"}, "conditions": [
            {"type": "Accepted", "status": "True", "reason": "Accepted",
             "lastTransitionTime": "2026-12-07T10:00:00Z"},
            {"type": "ResolvedRefs", "status": "False", "reason": "BackendNotFound",
             "lastTransitionTime": "2026-12-07T10:00:00Z"}]}]}
    merged = merged_status(computed, live, CONTROLLER)
    theirs, ours = merged["parents"]
    assert theirs == live["parents"][0]
    assert {c["type"]: c["lastTransitionTime"] for c in ours["conditions"]} == {
        "Accepted": "2026-01-01T00:00:00Z",          # status unchanged: its time stays
        "ResolvedRefs": "2026-12-07T10:00:00Z"}      # changed: now
    # Nothing changed: what would be written is the live status itself, so nothing is written.
    assert merged_status({"parents": [live["parents"][1]]}, live, CONTROLLER) == live


def publish(tmp_path: Path, *items: dict[str, Any]) -> None:
    """What the master writes for GET /gateway/status: the statuses it serves."""
    (tmp_path / "metrics" / "gateway-status.json").write_text(
        json.dumps({"apiVersion": "v1", "kind": "List", "items": list(items)}))


def accepted(generation: int = 1, reason: str = "Accepted") -> dict[str, Any]:
    return {"apiVersion": "gateway.networking.k8s.io/v1alpha2", "kind": "TCPRoute",
            "metadata": {"name": "first", "namespace": "default"},
            "status": {"parents": [{"controllerName": CONTROLLER, "parentRef": {"name": "kong"},
                                    "conditions": [
                {"type": "Accepted", "status": "True", "reason": reason, "observedGeneration": generation,
                 "lastTransitionTime": "2026-12-07T10:00:00Z", "message": ""}]}]}}


def test_statuses_are_written_by_the_lease_holder_with_a_409_retried(api, tmp_path):
    watcher, _ = make_watcher(tmp_path, api)
    api.apply(route("first"))
    watcher.list_kind(BY_KIND["TCPRoute"], None, True)
    publish(tmp_path, accepted())

    # Another replica holds the Lease and renews it: this one writes nothing.
    api.apply({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
               "metadata": {"name": "pyproxy-gateway", "namespace": "default"},
               "spec": {"holderIdentity": "other", "leaseDurationSeconds": 2, "leaseTransitions": 0}})
    watcher.elect()
    assert not watcher.leader

    # It stops renewing: after lease_duration as this replica saw it, the Lease is taken over.
    time.sleep(2.1)
    watcher.elect()
    lease = api.get("Lease", "pyproxy-gateway")
    assert watcher.leader and lease["spec"]["holderIdentity"] == watcher.identity
    assert lease["spec"]["leaseTransitions"] == 1 and lease["spec"]["renewTime"].endswith("Z")
    reference = json.loads((DATA / "lease.json").read_text())     # a Lease as client-go writes it
    assert lease["spec"].keys() == reference["spec"].keys()
    assert len(lease["spec"]["renewTime"]) == len(reference["spec"]["renewTime"])    # MicroTime

    # A stale resourceVersion: 409, nothing written; once the watch brought the newer object, written.
    stale = watcher.store.get(("TCPRoute", "default", "first"))
    api.apply({**route("first"), "metadata": {"name": "first", "labels": {"a": "b"}}})
    watcher.write_statuses()
    assert api.writes()[-1][1]["metadata"]["resourceVersion"] == stale["metadata"]["resourceVersion"]
    assert "status" not in api.get("TCPRoute", "first")
    watcher.list_kind(BY_KIND["TCPRoute"], None, False)
    watcher.write_statuses()
    written = api.get("TCPRoute", "first")["status"]
    assert written == accepted()["status"]
    count = len(api.writes())
    watcher.write_statuses()                         # the watch did not bring it yet: not again
    assert len(api.writes()) == count
    watcher.list_kind(BY_KIND["TCPRoute"], None, False)     # as the watch brings the written object
    watcher.write_statuses()                         # unchanged: not written again
    assert len(api.writes()) == count

    # The same status computed again later: lastTransitionTime stays that of the first write.
    later = accepted()
    later["status"]["parents"][0]["conditions"][0]["lastTransitionTime"] = "2026-12-07T11:00:00Z"
    publish(tmp_path, later)
    watcher.write_statuses()
    assert len(api.writes()) == count

    # A reason changed with the status unchanged: written, its time kept.
    publish(tmp_path, accepted(generation=2, reason="Accepted2"))
    watcher.write_statuses()
    assert len(api.writes()) == count + 1
    [condition] = api.get("TCPRoute", "first")["status"]["parents"][0]["conditions"]
    assert condition["observedGeneration"] == 2 and condition["lastTransitionTime"] == "2026-12-07T10:00:00Z"
    # The merge patch went to the status subresource of the version watched.
    assert api.writes()[-1][0] == ("/apis/gateway.networking.k8s.io/v1alpha2/namespaces/default/"
                                   "tcproutes/first/status")

    # A spec changed while a status is written, the watch bringing it before the write's answer:
    # what the watch brought stays (the answer, older, does not replace it in the snapshot).
    def changed_meanwhile() -> None:
        api.after_write = None
        api.apply({**route("first", backend="other"), "metadata": {"name": "first"}})
        watcher.store.put(api.get("TCPRoute", "first"))

    api.after_write = changed_meanwhile
    watcher.list_kind(BY_KIND["TCPRoute"], None, False)
    publish(tmp_path, accepted(generation=3))
    watcher.write_statuses()
    assert api.after_write is None                  # written
    held = watcher.store.get(("TCPRoute", "default", "first"))
    assert held["spec"]["rules"][0]["backendRefs"][0]["name"] == "other"

    # Released at exit: no holder, so the next replica need not wait for it to expire.
    watcher.release()
    assert "holderIdentity" not in api.get("Lease", "pyproxy-gateway")["spec"]


def test_every_kind_the_translation_reads_is_watched():
    """But v1 Endpoints, the fallback for manifests: a cluster has EndpointSlices (design doc §9.3)."""
    from pyproxy.gateway.objects import API_VERSIONS
    assert {kind.kind for kind in KINDS} == set(API_VERSIONS) - {"Endpoints"}
    for kind in KINDS:
        assert {kind.api_version(version) for version in kind.versions} <= set(API_VERSIONS[kind.kind])


def test_namespaces_limit_what_is_watched(api, tmp_path):
    api.apply(route("mine"))
    api.apply({**route("theirs"), "metadata": {"name": "theirs", "namespace": "other"}})
    watcher, _ = make_watcher(tmp_path, api, "    namespaces: [default]\n")
    assert (BY_KIND["TCPRoute"], "default") in watcher.collections
    assert (BY_KIND["GatewayClass"], None) in watcher.collections        # cluster-scoped: whole
    assert not any(namespace is None for kind, namespace in watcher.collections if kind.namespaced)
    watcher.list_kind(BY_KIND["TCPRoute"], "default", True)
    assert watcher.store.get(("TCPRoute", "default", "mine")) is not None
    assert watcher.store.get(("TCPRoute", "other", "theirs")) is None
    assert api.requests[-1][1] == "/apis/gateway.networking.k8s.io/v1alpha2/namespaces/default/tcproutes"


def test_a_kind_pyproxy_may_not_list_is_logged_and_does_not_hold_the_others(api, tmp_path):
    api.forbidden.add(COLLECTIONS["ConfigMap"])
    api.apply(route("first"))
    watcher, log = make_watcher(tmp_path, api)
    follow(watcher, "TCPRoute", "ConfigMap")
    try:
        wait_until(lambda: watcher.store.unsynced == 0, what="both kinds counted as listed")
    finally:
        watcher._stop()
    assert watcher.store.get(("TCPRoute", "default", "first")) is not None
    [line] = [line for line in log.read_text().splitlines() if "configmaps" in line]
    assert "[error]" in line and "HTTP 403 Forbidden: configmaps is forbidden" in line
