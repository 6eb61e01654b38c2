"""deploy/gateway/ (issue 17): every manifest parses, the RBAC grants exactly what the cluster
process uses (the kinds it lists and watches, the statuses it writes, its Lease) and nothing more,
the ConfigMap's pyproxy.conf loads, and the Deployment's readiness probe is on its status_listen."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from pyproxy.config import load_config
from pyproxy.gateway.cluster import BY_KIND, KINDS, LEASE, STATUS_KINDS

DEPLOY = Path(__file__).resolve().parents[2] / "deploy" / "gateway"


@pytest.fixture(scope="module")
def documents() -> list[dict[str, Any]]:
    found = []
    for path in sorted(DEPLOY.glob("*.yaml")):
        found += [document for document in yaml.safe_load_all(path.read_text()) if document]
    assert found
    for document in found:
        assert {"apiVersion", "kind", "metadata"} <= document.keys(), document
    return found


def one(documents: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    [found] = [document for document in documents
               if document["kind"] == kind and name in (None, document["metadata"]["name"])]
    return found


def grants(rules: list[dict[str, Any]]) -> dict[tuple[str, str], set[str]]:
    """(apiGroup, resource) → verbs, over every rule."""
    granted: dict[tuple[str, str], set[str]] = {}
    for rule in rules:
        assert set(rule) == {"apiGroups", "resources", "verbs"}, rule       # no resourceNames, no "*"
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                granted.setdefault((group, resource), set()).update(rule["verbs"])
    assert not any("*" in key or "*" in verbs for key, verbs in granted.items())
    return granted


def test_the_cluster_role_covers_every_kind_watched_and_nothing_more(documents):
    granted = grants(one(documents, "ClusterRole")["rules"])
    read = {(kind.group, kind.plural): {"get", "list", "watch"} for kind in KINDS}
    written = {(BY_KIND[kind].group, f"{BY_KIND[kind].plural}/status"): {"update", "patch"}
               for kind in STATUS_KINDS}
    assert granted == {**read, **written}
    for group, plural in (("gateway.networking.k8s.io", "udproutes"),           # issue 22
                          ("configuration.konghq.com", "udpingresses")):
        assert granted[(group, plural)] == {"get", "list", "watch"}
        assert granted[(group, f"{plural}/status")] == {"update", "patch"}


def test_the_lease_is_granted_in_pyproxy_s_namespace_only(documents):
    role = one(documents, "Role")
    assert role["metadata"]["namespace"] == "pyproxy"
    assert grants(role["rules"]) == {(LEASE.group, LEASE.plural): {"get", "create", "update"}}
    account = one(documents, "ServiceAccount")
    for binding_kind, role_kind in (("ClusterRoleBinding", "ClusterRole"), ("RoleBinding", "Role")):
        binding = one(documents, binding_kind)
        assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": role_kind,
                                      "name": one(documents, role_kind)["metadata"]["name"]}
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": account["metadata"]["name"],
                                        "namespace": account["metadata"]["namespace"]}]


def test_the_configuration_loads_and_the_deployment_probes_status_listen(documents, tmp_path):
    config_map = one(documents, "ConfigMap")
    conf = tmp_path / "pyproxy.conf"
    conf.write_text(config_map["data"]["pyproxy.conf"])
    config = load_config(str(conf))
    assert config.gateway is not None and config.gateway.kubernetes is not None
    assert config.gateway.kubernetes.kubeconfig is None             # in_cluster
    assert config.status_listen is not None

    assert one(documents, "GatewayClass")["spec"]["controllerName"] == config.gateway.controller_name
    deployment = one(documents, "Deployment", "pyproxy")
    pod = deployment["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == one(documents, "ServiceAccount")["metadata"]["name"]
    [container] = pod["containers"]
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    assert container["readinessProbe"]["httpGet"] == {"path": "/status", "port": "status"}
    assert ports["status"] == config.status_listen[1]
    volumes = {volume["name"]: volume for volume in pod["volumes"]}
    assert volumes["config"]["configMap"]["name"] == config_map["metadata"]["name"]
    mounts = {mount["name"]: mount["mountPath"] for mount in container["volumeMounts"]}
    assert config.gateway.runtime_dir.startswith(mounts["runtime"])
