"""pyproxy.gateway.read_paths: manifests as kubectl writes them, each object with its file and line;
a bad object or file is reported where it is and does not hide the good ones."""

from __future__ import annotations

import json

from pyproxy.gateway import read_paths, translate_paths

SERVICE = """\
apiVersion: v1
kind: Service
metadata:
  name: {name}
spec:
  ports:
  - {{name: tcp, port: 1025}}
"""


def test_multi_document_yaml_keeps_each_object_line(tmp_path):
    path = tmp_path / "all.yaml"
    path.write_text("---\n" + SERVICE.format(name="one") + "---\n" + SERVICE.format(name="two")
                    + "---\n---\n")
    resources, notices = read_paths([str(path)])
    assert notices == []
    assert [(r.kind, r.namespace, r.name, r.line) for r in resources] == [
        ("Service", "default", "one", 2), ("Service", "default", "two", 10)]
    assert resources[0].file == str(path)


def test_kubectl_list_items_keep_their_lines(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("apiVersion: v1\nkind: List\nitems:\n"
                    "- apiVersion: v1\n  kind: Namespace\n  metadata: {name: web}\n"
                    "- apiVersion: gateway.networking.k8s.io/v1\n  kind: GatewayClass\n"
                    "  metadata: {name: pyproxy}\n  spec: {controllerName: x}\n")
    resources, notices = read_paths([str(path)])
    assert notices == []
    assert [(r.kind, r.namespace, r.name, r.line) for r in resources] == [
        ("Namespace", "", "web", 4), ("GatewayClass", "", "pyproxy", 7)]


def test_json_object_and_typed_list(tmp_path):
    (tmp_path / "one.json").write_text(json.dumps(
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "a", "namespace": "web"}}, indent=2))
    # Tabs that indent are JSON but not YAML: read as JSON all the same.
    (tmp_path / "list.json").write_text(json.dumps(
        {"apiVersion": "v1", "kind": "ServiceList",
         "items": [{"apiVersion": "v1", "kind": "Service", "metadata": {"name": "b"}}]}, indent="\t"))
    resources, notices = read_paths([str(tmp_path)])
    assert notices == []
    assert sorted((r.namespace, r.name) for r in resources) == [("default", "b"), ("web", "a")]


def test_a_folder_reads_its_manifest_files_in_name_order(tmp_path):
    (tmp_path / "b.yml").write_text(SERVICE.format(name="b"))
    (tmp_path / "a.yaml").write_text(SERVICE.format(name="a"))
    (tmp_path / "notes.txt").write_text("not a manifest")
    resources, _ = read_paths([str(tmp_path)])
    assert [r.name for r in resources] == ["a", "b"]


def test_an_object_without_identity_is_skipped_and_named(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(SERVICE.format(name="good") + "---\napiVersion: v1\nkind: Service\nmetadata: {}\n"
                    "---\n- just\n- a list\n")
    resources, notices = read_paths([str(path)])
    assert [r.name for r in resources] == ["good"]
    assert [str(n) for n in notices] == [
        f"{path}:9: Service: metadata.name missing; the object is skipped",
        f"{path}:13: expected a Kubernetes object (a mapping with apiVersion, kind and metadata), got list",
    ]


def test_a_yaml_error_keeps_the_objects_before_it(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text(SERVICE.format(name="first") + "---\nkind: [unclosed\n")
    resources, notices = read_paths([str(path)])
    assert [r.name for r in resources] == ["first"]
    assert len(notices) == 1
    assert str(notices[0]).startswith(f"{path}:10: invalid YAML: ")


def test_a_missing_file_is_reported(tmp_path):
    resources, notices = read_paths([str(tmp_path / "nope.yaml")])
    assert resources == []
    assert [str(n) for n in notices] == [f"{tmp_path / 'nope.yaml'}:1: cannot read the file: "
                                         "No such file or directory"]


def test_unknown_kinds_get_one_notice_each(tmp_path):
    path = tmp_path / "app.yaml"
    deployment = "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: %s}\n"
    old_route = "apiVersion: gateway.networking.k8s.io/v1beta1\nkind: TCPRoute\nmetadata: {name: old}\n"
    path.write_text(deployment % "a" + "---\n" + deployment % "b" + "---\n" + SERVICE.format(name="echo")
                    + "---\n" + old_route)
    translation = translate_paths([str(path)])
    assert [str(n) for n in translation.notices] == [
        f"{path}:1: Deployment (apps/v1): not a kind pyproxy reads: 2 object(s) ignored",
        f"{path}:17: TCPRoute (gateway.networking.k8s.io/v1beta1): pyproxy reads TCPRoute as "
        "gateway.networking.k8s.io/v1, gateway.networking.k8s.io/v1alpha2: 1 object(s) ignored"]


def test_a_malformed_object_names_file_line_kind_name_and_field(tmp_path):
    path = tmp_path / "gw.yaml"
    path.write_text(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: GatewayClass\nmetadata: {name: pyproxy}\n"
        "spec: {controllerName: gateway.pyproxy.dev/controller}\n---\n"
        "apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {name: bad, namespace: web}\n"
        "spec:\n  gatewayClassName: pyproxy\n  listeners:\n  - {name: one, port: ninety, protocol: TCP}\n"
        "---\n"
        "apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {name: good, namespace: web}\n"
        "spec:\n  gatewayClassName: pyproxy\n  listeners:\n  - {name: one, port: 9000, protocol: TCP}\n")
    translation = translate_paths([str(path)])
    assert [str(n) for n in translation.notices] == [
        f"{path}:6: Gateway web/bad: spec.listeners[0].port: expected a number 1–65535, got 'ninety'; "
        "the object is skipped"]
    assert ("Gateway", "web", "good") in translation.statuses
    assert ("Gateway", "web", "bad") not in translation.statuses
    assert translation.entities["stream_listen"] == ["0.0.0.0:9000"]
