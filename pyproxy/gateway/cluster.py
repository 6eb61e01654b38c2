"""Gateway API manifests from a Kubernetes API server (issue 17, cluster mode): `gateway.kubernetes`.

The master forks one helper, the cluster process (`pyproxy: gateway cluster process`), as it forks
the status and admin processes; the workers never talk to the API server. The helper:

- lists and watches every kind the translation reads (`KINDS`), each in its own thread with the
  official client's `watch.Watch`: the list's `metadata.resourceVersion` starts the watch,
  `allowWatchBookmarks` keeps it current while nothing changes, a watch that ends (its
  `timeoutSeconds`) starts again from the last resourceVersion, a `410 Gone` (the watch request's
  HTTP status or the stream's ERROR event) lists again, other errors retry after a backoff of
  0.5 s doubling to 30 s, and a kind whose CRD is not installed (404 on every version) or that
  pyproxy may not list (403) is logged once, held as empty (the others apply) and listed again
  every `MISSING_RETRY` seconds;
- writes what it holds, once every kind was listed and then at most every `DEBOUNCE` seconds after a
  change, as one `kind: List` (`gateway.runtime_dir/cluster-objects.json`, written whole and renamed,
  0600: Secrets are in it). Validation makes that file the last of `gateway.paths`, so the master's
  manifest polling reloads it like any manifest file: the coalesced, zero-loss generation reload,
  the translation unchanged. Fields that change without a change of meaning (`resourceVersion`,
  `managedFields`, `status`) are left out: a status write does not reload;
- elects one replica with a `coordination.k8s.io/v1` Lease (acquire, renew every `lease_retry`,
  release at exit); the leader writes to each object's `status` subresource the statuses of the
  configuration being served (the master's `gateway-status.json`, what GET /gateway/status answers),
  as a JSON merge patch carrying the object's resourceVersion (a `409 Conflict` waits for the watch
  to bring the newer object), only when they differ, with `lastTransitionTime` kept for each
  condition whose status did not change, and the route parents and policy ancestors of other
  controllers kept. Every replica serves traffic; only the statuses need a single writer.

Threads are fine here: this process forks nothing, and the watches block in the client library.
"""

from __future__ import annotations

import copy
import datetime
import json
import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from setproctitle import setproctitle

from pyproxy.log import ErrorLog
from pyproxy.status import GATEWAY_STATUS, MASTER_SIGNALS, StatusProcess
from pyproxy.worker import WORKER_BOOT_ERROR

if TYPE_CHECKING:
    from pyproxy.config.model import Config, KubernetesSettings

TITLE = "pyproxy: gateway cluster process"
GATEWAY_GROUP = "gateway.networking.k8s.io"
KONG_GROUP = "configuration.konghq.com"
DEBOUNCE = 0.2              # seconds without a change before the snapshot is written
MAX_DELAY = 1.0             # ... but a stream of changes is written at least this often
BACKOFF_MIN, BACKOFF_MAX = 0.5, 30.0      # seconds before trying an API server that failed again
MISSING_RETRY = 60.0        # seconds between lists of a kind whose CRD is not installed
WATCH_TIMEOUT = 300         # seconds: the API server ends each watch after this (timeoutSeconds)
REQUEST_TIMEOUT = 10.0      # seconds for a list, a status write or a Lease request
LIST_PAGE = 500             # objects per page of a list (client-go's informers ask for as many)
RELEASE_TIMEOUT = 2.0       # ... for each of the two requests that give the Lease up at exit
STATUS_INTERVAL = 1.0       # seconds between comparisons of the statuses served and written
SERVICE_ACCOUNT_NAMESPACE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"
VOLATILE_METADATA = ("resourceVersion", "managedFields")


@dataclass(frozen=True)
class Kind:
    """One kind the translation reads, where the API server serves it."""

    kind: str
    group: str                      # "" for the core group
    versions: tuple[str, ...]       # the first one the API server serves is watched
    plural: str
    namespaced: bool = True
    field_selector: str | None = None

    def path(self, version: str, namespace: str | None, name: str | None = None) -> str:
        root = f"/apis/{self.group}/{version}" if self.group else f"/api/{version}"
        where = f"/namespaces/{namespace}" if namespace else ""
        return f"{root}{where}/{self.plural}" + (f"/{name}" if name else "")

    def api_version(self, version: str) -> str:
        return f"{self.group}/{version}" if self.group else version


KINDS = (
    Kind("GatewayClass", GATEWAY_GROUP, ("v1", "v1beta1"), "gatewayclasses", namespaced=False),
    Kind("Gateway", GATEWAY_GROUP, ("v1", "v1beta1"), "gateways"),
    Kind("TCPRoute", GATEWAY_GROUP, ("v1", "v1alpha2"), "tcproutes"),
    Kind("TLSRoute", GATEWAY_GROUP, ("v1", "v1alpha3", "v1alpha2"), "tlsroutes"),
    Kind("UDPRoute", GATEWAY_GROUP, ("v1alpha2",), "udproutes"),
    Kind("ReferenceGrant", GATEWAY_GROUP, ("v1", "v1beta1"), "referencegrants"),
    Kind("BackendTLSPolicy", GATEWAY_GROUP, ("v1", "v1alpha3"), "backendtlspolicies"),
    Kind("TCPIngress", KONG_GROUP, ("v1beta1",), "tcpingresses"),
    Kind("UDPIngress", KONG_GROUP, ("v1beta1",), "udpingresses"),
    Kind("Service", "", ("v1",), "services"),
    Kind("EndpointSlice", "discovery.k8s.io", ("v1",), "endpointslices"),
    Kind("Secret", "", ("v1",), "secrets", field_selector="type=kubernetes.io/tls"),
    Kind("ConfigMap", "", ("v1",), "configmaps"),         # BackendTLSPolicy's CA certificates
    Kind("Namespace", "", ("v1",), "namespaces", namespaced=False),   # allowedRoutes selectors
    Kind("IngressClass", "networking.k8s.io", ("v1",), "ingressclasses", namespaced=False),
)
BY_KIND = {kind.kind: kind for kind in KINDS}
# The kinds whose status the translation works out, and so the only `*/status` pyproxy writes.
STATUS_KINDS = ("GatewayClass", "Gateway", "TCPRoute", "TLSRoute", "UDPRoute", "BackendTLSPolicy",
                "TCPIngress", "UDPIngress")
LEASE = Kind("Lease", "coordination.k8s.io", ("v1",), "leases")


class ClusterProcess(StatusProcess):
    """The master's handle on its cluster process: started when the configuration has
    `gateway.kubernetes`, started again when that key changes, restarted and stopped as the status
    process is (`reaped`, `send` and `stop` are StatusProcess's)."""

    NAME = "gateway cluster process"

    def __init__(self, log: ErrorLog):
        super().__init__(log)
        self.config: Config | None = None

    def follow(self, config: Config, directory: str | None) -> None:  # type: ignore[override]
        """At start and after each reload that succeeded. `directory` is the metrics folder, where
        the master writes the statuses it serves."""
        gateway = config.gateway
        settings = ((gateway.kubernetes, gateway.runtime_dir, gateway.controller_name)
                    if gateway is not None and gateway.kubernetes is not None else None,)
        self.config = config
        self.directory = directory
        if settings == self.settings:
            return
        self.settings = settings
        if self.pid:
            self.log.notice(f"stop {self.NAME} {self.pid}: gateway.kubernetes changed")
        self._retire()
        self.delay = 0.0
        if settings[0] is not None:
            self._spawn()

    def manage(self) -> None:
        """From the master's loop: start it again once one that died may be replaced."""
        wanted = self.settings not in ((), (None,))
        if wanted and not self.pid and time.monotonic() >= self.respawn_at:
            self._spawn()

    def stop(self) -> None:
        self.config = None
        self.settings = ()          # nothing to start again
        self.directory = None       # the status process's handle removes the metrics folder
        super().stop()

    def _spawn(self) -> None:
        config = self.config
        assert config is not None and config.gateway is not None and config.gateway.kubernetes is not None

        def watch(master_pid: int) -> int:
            self._close_what_the_master_holds()
            return ClusterWatcher(self.log, config, master_pid, self.directory).run()

        pid = self._fork(watch)
        if not pid:
            return
        where = config.gateway.kubernetes.kubeconfig or "the Pod's service account"
        self.log.notice(f"start {self.NAME} {pid}: watching the API server of {where}")


class Gone(Exception):
    """410: the resourceVersion watched from is too old; list again."""


class Missing(Exception):
    """404 on every version of a kind: its CRD is not installed."""


class Forbidden(Exception):
    """403 on a list: pyproxy's service account may not read that kind."""


class Store:
    """The objects the watches hold, by (kind, namespace, name), and when they last changed."""

    def __init__(self, collections: int):
        self.lock = threading.Condition()
        self.objects: dict[tuple[str, str, str], dict[str, Any]] = {}
        self.unsynced = collections         # collections not listed yet
        self.changed_at = 0.0               # monotonic time of the last change
        self.first_unwritten = 0.0          # ... of the first change not in a snapshot yet (0: none)

    def replace(self, kind: str, namespace: str | None, items: list[dict[str, Any]], first: bool) -> None:
        """A list's result: every object of `kind` (in `namespace`, or all) is these."""
        with self.lock:
            for key in [key for key in self.objects
                        if key[0] == kind and (namespace is None or key[1] == namespace)]:
                del self.objects[key]
            for item in items:
                self.objects[_key(item)] = item
            if first:
                self.unsynced -= 1
            self._changed()

    def put(self, obj: dict[str, Any]) -> None:
        with self.lock:
            self.objects[_key(obj)] = obj
            self._changed()

    def remove(self, obj: dict[str, Any]) -> None:
        with self.lock:
            self.objects.pop(_key(obj), None)
            self._changed()

    def get(self, key: tuple[str, str, str]) -> dict[str, Any] | None:
        with self.lock:
            return self.objects.get(key)

    def _changed(self) -> None:
        now = time.monotonic()
        self.first_unwritten = self.first_unwritten or now
        self.changed_at = now
        self.lock.notify_all()

    def snapshot(self) -> dict[str, Any]:
        """What the manifests source reads: every object, without what changes without meaning."""
        with self.lock:
            objects = [self.objects[key] for key in sorted(self.objects)]
            self.first_unwritten = 0.0
        items = []
        for obj in objects:
            metadata = {key: value for key, value in obj.get("metadata", {}).items()
                        if key not in VOLATILE_METADATA}
            items.append({**{key: value for key, value in obj.items() if key != "status"},
                          "metadata": metadata})
        return {"apiVersion": "v1", "kind": "List", "items": items}


def _key(obj: dict[str, Any]) -> tuple[str, str, str]:
    metadata = obj.get("metadata") or {}
    return (obj.get("kind", ""), metadata.get("namespace", ""), metadata.get("name", ""))


class ClusterWatcher:
    """The cluster process (see the module docstring)."""

    NAME = ClusterProcess.NAME

    def __init__(self, log: ErrorLog, config: Config, master_pid: int, directory: str | None):
        assert config.gateway is not None and config.gateway.kubernetes is not None
        self.log = log
        self.gateway = config.gateway
        self.settings: KubernetesSettings = config.gateway.kubernetes
        self.master_pid = master_pid
        self.status_file = os.path.join(directory, GATEWAY_STATUS) if directory else None
        self.snapshot_path = config.gateway.paths[-1]
        namespaces: tuple[str | None, ...] = self.settings.namespaces or (None,)
        self.collections = [(kind, namespace) for kind in KINDS
                            for namespace in (namespaces if kind.namespaced else (None,))]
        self.store = Store(len(self.collections))
        self.versions: dict[str, str] = {}      # the version each kind is watched in
        self.stopping = False
        self.identity = f"{socket.gethostname()}_{master_pid}"
        self.leader = False
        self.renewed_at = 0.0
        self.lease_problem = ""                 # the last error of the Lease, logged once
        self.observed: tuple[str, float] | None = None      # the Lease's (resourceVersion, when seen)
        self.written_statuses: dict[tuple[str, str, str], str] = {}
        self.failures_lock = threading.Lock()
        self.failing: set[str] = set()          # the collections whose last list or watch failed
        self.problems: set[str] = set()         # the errors logged since none failed

    # -- the process --------------------------------------------------------------------------------
    def run(self) -> int:
        try:
            setproctitle(TITLE)
            signal.signal(signal.SIGHUP, signal.SIG_IGN)
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            signal.signal(signal.SIGPIPE, signal.SIG_IGN)
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT):
                signal.signal(sig, lambda signum, frame: self._stop())
            signal.signal(signal.SIGUSR1, lambda signum, frame: self.log.reopen())
            signal.pthread_sigmask(signal.SIG_UNBLOCK, MASTER_SIGNALS)
            self.client = self._client()
            os.makedirs(self.gateway.runtime_dir, mode=0o700, exist_ok=True)
        except Exception as exc:
            self.log.crit(f"{self.NAME} could not start: {_describe(exc)}")
            return WORKER_BOOT_ERROR
        for kind, namespace in self.collections:
            threading.Thread(target=self.follow, args=(kind, namespace), daemon=True,
                             name=f"watch {kind.plural}").start()
        try:
            self.loop()
        finally:
            self.release()
        return 0

    def _stop(self) -> None:
        self.stopping = True
        with self.store.lock:
            self.store.lock.notify_all()

    def _client(self) -> Any:
        """The official client's ApiClient, configured from the kubeconfig or the service account."""
        from kubernetes import client
        from kubernetes import config as kube_config
        configuration = client.Configuration()
        if self.settings.kubeconfig is None:
            kube_config.load_incluster_config(client_configuration=configuration)  # type: ignore[no-untyped-call]
        else:
            kube_config.load_kube_config(  # type: ignore[no-untyped-call]
                config_file=self.settings.kubeconfig, context=self.settings.context,
                client_configuration=configuration, persist_config=False)
        # Each watch holds a connection for its whole life; the Lease and status writes need one more.
        configuration.connection_pool_maxsize = len(self.collections) + 1
        return client.ApiClient(configuration)

    def loop(self) -> None:
        """Write the snapshot when due, hold or seek the Lease, write statuses while leading."""
        next_lease = next_status = 0.0
        while not self.stopping:
            now = time.monotonic()
            store = self.store
            if (store.first_unwritten and not store.unsynced
                    and (now - store.changed_at >= DEBOUNCE or now - store.first_unwritten >= MAX_DELAY)):
                self.write_snapshot()
            if now >= next_lease:
                next_lease = now + self.settings.lease_retry
                self.elect()
            if self.leader and now >= next_status and not store.unsynced:
                next_status = now + STATUS_INTERVAL
                self.write_statuses()
            if os.getppid() != self.master_pid:
                self.log.notice(f"{self.NAME}: the master is gone; exiting")
                return
            with store.lock:
                if not self.stopping:
                    store.lock.wait(0.1)

    def write_snapshot(self) -> None:
        """The objects held, as the manifest file the master reloads when it changes (only then)."""
        snapshot = self.store.snapshot()
        data = json.dumps(snapshot, indent=1, sort_keys=True).encode()
        try:
            with open(self.snapshot_path, "rb") as stream:
                if stream.read() == data:
                    return
        except OSError:
            pass
        staged = f"{self.snapshot_path}.new"
        try:
            fd = os.open(staged, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            with os.fdopen(fd, "wb") as stream:
                stream.write(data)
            os.replace(staged, self.snapshot_path)
        except OSError as exc:
            self.log.error(f'{self.NAME}: cannot write "{exc.filename or staged}": {exc.strerror or exc}')
        else:
            self.log.info(f"{self.NAME}: {len(snapshot['items'])} objects written to {self.snapshot_path}")

    # -- list and watch -----------------------------------------------------------------------------
    def follow(self, kind: Kind, namespace: str | None) -> None:
        """One collection's thread: list, watch until 410, list again; back off on errors."""
        first, delay, missing = True, 0.0, False
        where = f"{kind.plural} in {namespace}" if namespace else kind.plural
        while not self.stopping:
            try:
                resource_version = self.list_kind(kind, namespace, first)
                first, delay, missing = False, 0.0, False
                self._recovered(where)
                self.watch(kind, namespace, resource_version)
            except Gone:
                self.log.info(f"{self.NAME}: {where}: 410 Gone, the watch expired; listing again")
            except (Missing, Forbidden) as exc:
                # Listed as empty, so that the other kinds apply: a CRD removed takes its objects.
                self.store.replace(kind.kind, namespace, [], first)
                if not missing and isinstance(exc, Forbidden):
                    self.log.error(f"{self.NAME}: {where}: {exc} (the RBAC of deploy/gateway/rbac.yaml "
                                   f"grants what pyproxy reads); trying again every {MISSING_RETRY:g}s")
                elif not missing:
                    self.log.notice(f"{self.NAME}: no {kind.kind} is served (versions "
                                    f"{', '.join(kind.versions)} of {kind.group or 'core'} return 404: is "
                                    f"its CRD installed?); trying again every {MISSING_RETRY:g}s")
                first, missing = False, True
                self._sleep(MISSING_RETRY)
            except Exception as exc:
                delay = min(max(delay * 2, BACKOFF_MIN), BACKOFF_MAX)
                self._failed(where, _describe(exc))
                self._sleep(delay)

    def _failed(self, where: str, problem: str) -> None:
        """One error line per problem, not one per kind: an API server that is down fails them all."""
        with self.failures_lock:
            self.failing.add(where)
            if problem in self.problems:
                return
            self.problems.add(problem)
        self.log.error(f"{self.NAME}: {where}: {problem}; trying again with a backoff from "
                       f"{BACKOFF_MIN:g}s to {BACKOFF_MAX:g}s (the objects read last go on serving)")

    def _recovered(self, where: str) -> None:
        with self.failures_lock:
            if where not in self.failing:
                return
            self.failing.discard(where)
            if self.failing:
                return
            self.problems.clear()
        self.log.notice(f"{self.NAME}: every kind listed again after the API server failed")

    def list_kind(self, kind: Kind, namespace: str | None, first: bool) -> str:
        """List `kind` in the first version served, LIST_PAGE objects a request (a cluster of
        thousands of Secrets or EndpointSlices is not asked for in one answer), following the API
        server's `continue` tokens; the resourceVersion of the list, kept for the watch. A token that
        expired meanwhile is 410 Gone, as a watch's: the whole list is made again."""
        for version in ([self.versions[kind.kind]] if kind.kind in self.versions else kind.versions):
            base: list[tuple[str, Any]] = [("limit", LIST_PAGE)]
            if kind.field_selector:
                base.append(("fieldSelector", kind.field_selector))
            items: list[dict[str, Any]] = []
            token = ""
            while True:
                query = [*base, ("continue", token)] if token else base
                status, body = self.request("GET", kind.path(version, namespace), query)
                if status == 404 and not token:
                    break
                if status == 410:
                    raise Gone()
                if status == 403:
                    raise Forbidden(ApiError(status, body))
                if status != 200:
                    raise ApiError(status, body)
                for item in body.get("items") or []:
                    # The API server leaves out kind and apiVersion of the items of a built-in list.
                    items.append({"apiVersion": kind.api_version(version), "kind": kind.kind, **item})
                metadata = body.get("metadata") or {}
                token = metadata.get("continue") or ""
                if not token:
                    self.versions[kind.kind] = version
                    self.store.replace(kind.kind, namespace, items, first)
                    return str(metadata.get("resourceVersion", ""))
        self.versions.pop(kind.kind, None)
        raise Missing()

    def watch(self, kind: Kind, namespace: str | None, resource_version: str) -> None:
        """Follow the changes from the list's resourceVersion; returns only on stop, raises on 410."""
        from kubernetes import watch
        from kubernetes.client.exceptions import ApiException
        while not self.stopping:
            stream = watch.Watch(return_type=object)  # type: ignore[no-untyped-call]
            stream.resource_version = resource_version
            query = dict(resource_version=resource_version, allow_watch_bookmarks=True,
                         timeout_seconds=WATCH_TIMEOUT, field_selector=kind.field_selector,
                         _request_timeout=(REQUEST_TIMEOUT, WATCH_TIMEOUT + 30))
            try:
                events = stream.stream(self._watch_call(kind, namespace), **query)  # type: ignore[no-untyped-call]
                for event in events:
                    obj = event["raw_object"]
                    if event["type"] in ("ADDED", "MODIFIED"):
                        self.store.put(obj)
                    elif event["type"] == "DELETED":
                        self.store.remove(obj)
                    resource_version = stream.resource_version or resource_version
                    if self.stopping:
                        return
            except ApiException as exc:
                if exc.status == 410:
                    raise Gone() from None
                raise

    def _watch_call(self, kind: Kind, namespace: str | None) -> Callable[..., Any]:
        """The official client's list function for `kind` (watch.Watch calls it with watch=True)."""
        from kubernetes import client
        version = self.versions[kind.kind]
        if kind.group:
            api = client.CustomObjectsApi(self.client)
            if namespace:
                return lambda **kw: api.list_namespaced_custom_object(kind.group, version, namespace,
                                                                      kind.plural, **kw)
            return lambda **kw: api.list_cluster_custom_object(kind.group, version, kind.plural, **kw)
        core = client.CoreV1Api(self.client)
        singular = {"services": "service", "secrets": "secret", "configmaps": "config_map"}.get(kind.plural)
        if singular is None:
            return core.list_namespace
        if namespace:
            function = getattr(core, f"list_namespaced_{singular}")
            return lambda **kw: function(namespace, **kw)
        return getattr(core, f"list_{singular}_for_all_namespaces")  # type: ignore[no-any-return]

    def request(self, method: str, path: str, query: list[tuple[str, Any]] | None = None,
                body: Any = None, content_type: str = "application/json",
                timeout: float = REQUEST_TIMEOUT) -> tuple[int, Any]:
        """One request through the client's connection pool and credentials: (status, JSON body)."""
        client = self.client
        headers = {"Accept": "application/json", "Content-Type": content_type}
        client.update_params_for_auth(headers, query, ["BearerToken"], path, method, body)
        url = client.configuration.host + path
        if query:
            from urllib.parse import urlencode
            url += "?" + urlencode(query)
        response = client.rest_client.request(method, url, headers=headers,
                                              body=body, _request_timeout=timeout)
        data = response.read()
        try:
            return response.status, json.loads(data) if data else None
        except ValueError:
            return response.status, {"message": data[:200].decode(errors="replace")}

    def _sleep(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while not self.stopping and time.monotonic() < deadline:
            time.sleep(min(0.1, deadline - time.monotonic()))

    # -- leader election ----------------------------------------------------------------------------
    @property
    def lease_namespace(self) -> str:
        if self.settings.lease_namespace:
            return self.settings.lease_namespace
        try:
            with open(SERVICE_ACCOUNT_NAMESPACE) as stream:
                return stream.read().strip() or "default"
        except OSError:
            return "default"

    def elect(self) -> None:
        """Acquire the Lease if it is free or expired, renew it if ours (client-go's leaderelection:
        expiry is judged by when this replica saw it change, not by the holder's clock)."""
        try:
            self._elect()
            self.lease_problem = ""
        except Exception as exc:
            problem = _describe(exc)
            if problem != self.lease_problem:       # once, not at every lease_retry
                self.log.warn(f"{self.NAME}: the Lease {self.lease_namespace}/{self.settings.lease_name}: "
                              f"{problem}")
            self.lease_problem = problem
        if self.leader and time.monotonic() - self.renewed_at > self.settings.lease_duration:
            self.leader = False
            self.log.notice(f"{self.NAME}: could not renew the Lease for {self.settings.lease_duration:g}s; "
                            f"no longer writing statuses")

    def _elect(self) -> None:
        namespace, name = self.lease_namespace, self.settings.lease_name
        path = LEASE.path("v1", namespace, name)
        now = time.monotonic()
        stamp = _micro_time()
        status, lease = self.request("GET", path)
        mine = {"holderIdentity": self.identity, "leaseDurationSeconds": round(self.settings.lease_duration),
                "renewTime": stamp}
        if status == 404:
            body = {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                    "metadata": {"name": name, "namespace": namespace},
                    "spec": {**mine, "acquireTime": stamp, "leaseTransitions": 0}}
            status, lease = self.request("POST", LEASE.path("v1", namespace), body=body)
            self._took(status, lease, now)
            return
        if status != 200:
            raise ApiError(status, lease)
        spec = lease.get("spec") or {}
        version = lease["metadata"]["resourceVersion"]
        if self.observed is None or self.observed[0] != version:
            self.observed = (version, now)
        holder = spec.get("holderIdentity")
        duration = float(spec.get("leaseDurationSeconds") or self.settings.lease_duration)
        if holder and holder != self.identity and now - self.observed[1] < duration:
            if self.leader:
                self.leader = False
                self.log.notice(f"{self.NAME}: {holder} holds the Lease; no longer writing statuses")
            return
        if holder != self.identity:
            mine = {**mine, "acquireTime": stamp,
                    "leaseTransitions": int(spec.get("leaseTransitions") or 0) + 1}
        body = {**lease, "spec": {**spec, **mine}}
        status, lease = self.request("PUT", path, body=body)
        self._took(status, lease, now)

    def _took(self, status: int, lease: Any, now: float) -> None:
        if status == 409:
            return                          # another replica wrote it first: try again next time
        if status not in (200, 201):
            raise ApiError(status, lease)
        self.observed = (lease["metadata"]["resourceVersion"], now)
        self.renewed_at = now
        if not self.leader:
            self.leader = True
            self.written_statuses.clear()
            self.log.notice(f"{self.NAME}: holding the Lease {self.lease_namespace}/"
                            f"{self.settings.lease_name} as {self.identity}: writing statuses")

    def release(self) -> None:
        """At exit: a leader gives the Lease up, so another replica takes it at once."""
        if not self.leader:
            return
        try:
            path = LEASE.path("v1", self.lease_namespace, self.settings.lease_name)
            status, lease = self.request("GET", path, timeout=RELEASE_TIMEOUT)
            if status == 200 and (lease.get("spec") or {}).get("holderIdentity") == self.identity:
                spec = {key: value for key, value in lease["spec"].items() if key != "holderIdentity"}
                released = {**spec, "leaseDurationSeconds": 1, "renewTime": _micro_time()}
                self.request("PUT", path, body={**lease, "spec": released}, timeout=RELEASE_TIMEOUT)
        except Exception as exc:
            self.log.warn(f"{self.NAME}: could not release the Lease: {_describe(exc)}")

    # -- statuses -----------------------------------------------------------------------------------
    def write_statuses(self) -> None:
        """Each status of the configuration being served that differs from the object's, written."""
        if self.status_file is None:
            return
        try:
            with open(self.status_file) as stream:
                listing = json.load(stream)
        except (OSError, ValueError):
            return              # no configuration served yet
        controller = self.gateway.controller_name
        for item in listing.get("items") or []:
            key = (item.get("kind", ""), item["metadata"].get("namespace", ""), item["metadata"]["name"])
            kind = BY_KIND.get(key[0]) if key[0] in STATUS_KINDS else None
            live = self.store.get(key)
            if kind is None or live is None or kind.kind not in self.versions:
                continue
            status = merged_status(item.get("status") or {}, live.get("status") or {}, controller)
            if status == live.get("status"):
                continue
            version = live["metadata"]["resourceVersion"]
            if self.written_statuses.get(key) == version:
                continue            # written from this version already: wait for the watch
            path = kind.path(self.versions[kind.kind], key[1] or None, key[2]) + "/status"
            body = {"metadata": {"resourceVersion": version}, "status": status}
            try:
                code, answer = self.request("PATCH", path, body=body,
                                            content_type="application/merge-patch+json")
            except Exception as exc:
                self.log.warn(f"{self.NAME}: cannot write the status of {key[0]} {'/'.join(key[1:])}: "
                              f"{_describe(exc)}")
                return
            if code == 200:
                # Not put into the store: the watch brings the written object in its order, and a
                # newer version of it may be there already (a spec changed meanwhile).
                self.written_statuses[key] = version
                self.log.info(f"{self.NAME}: wrote the status of {key[0]} {'/'.join(filter(None, key[1:]))}")
            elif code not in (404, 409):    # 409: a newer version is on its way through the watch
                self.log.warn(f"{self.NAME}: cannot write the status of {key[0]} {'/'.join(key[1:])}: "
                              f"{ApiError(code, answer)}")


def merged_status(computed: dict[str, Any], live: dict[str, Any], controller: str) -> dict[str, Any]:
    """The status to write: `computed` with the route parents and policy ancestors that other
    controllers wrote in `live` kept, and each condition's lastTransitionTime from `live` when its
    status did not change."""
    status = copy.deepcopy(computed)
    for field in ("parents", "ancestors"):
        if field in status or field in live:
            others = [entry for entry in live.get(field) or []
                      if isinstance(entry, dict) and entry.get("controllerName") != controller]
            status[field] = others + list(status.get(field) or [])
    _keep_times(status, live)
    return status


def _keep_times(new: Any, old: Any) -> None:
    """Copy lastTransitionTime from `old` into the conditions of `new` whose status is unchanged,
    matching list items by what identifies them (a listener's name, a parentRef, a condition type)."""
    if isinstance(new, dict) and isinstance(old, dict):
        if "type" in new and "lastTransitionTime" in new:
            if old.get("status") == new.get("status") and "lastTransitionTime" in old:
                new["lastTransitionTime"] = old["lastTransitionTime"]
            return
        for key, value in new.items():
            _keep_times(value, old.get(key))
    elif isinstance(new, list) and isinstance(old, list):
        by_identity = {_identity(item): item for item in old}
        for item in new:
            _keep_times(item, by_identity.get(_identity(item)))


def _identity(item: Any) -> str:
    if isinstance(item, dict):
        for field in ("type", "name", "parentRef", "ancestorRef"):
            if field in item:
                return f"{field}:{json.dumps(item[field], sort_keys=True)}:{item.get('controllerName', '')}"
    return json.dumps(item, sort_keys=True, default=str)


def _micro_time() -> str:
    """Now as a Kubernetes MicroTime (a Lease's acquireTime and renewTime)."""
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class ApiError(Exception):
    """An API server answer that is neither success nor an expected failure."""

    def __init__(self, status: int, body: Any):
        message = body.get("message") if isinstance(body, dict) else None
        reason = body.get("reason") if isinstance(body, dict) else None
        super().__init__(f"HTTP {status}" + (f" {reason}" if reason else "")
                         + (f": {message}" if message else ""))


def _describe(exc: BaseException) -> str:
    """An error in one line, without the client library's multi-line dumps: an HTTP status, the
    system's word for a connection that failed (through urllib3's wrappers), or the first line."""
    if type(exc).__name__ == "ApiException":
        return f"HTTP {getattr(exc, 'status', '')} {getattr(exc, 'reason', '')}".strip()
    cause: BaseException | None = exc
    seen = set()
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if isinstance(cause, OSError) and cause.strerror:
            return f"cannot reach the API server: {cause.strerror}"
        reason = getattr(cause, "reason", None)
        cause = reason if isinstance(reason, BaseException) else (cause.__cause__ or cause.__context__)
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return text[:300]

