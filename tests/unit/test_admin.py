"""The Admin API's pieces without a process: `admin_listen`'s loopback rule, Kong's form-encoded
bodies, Kong's error fields, and a state file that only ever holds a configuration that loads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pyproxy.admin.api import AdminAPI, form_values
from pyproxy.admin.state import StateFile
from pyproxy.config import ConfigError, load_config


def conf(tmp_path: Path, text: str) -> str:
    path = tmp_path / "pyproxy.conf"
    path.write_text("stream_listen: [127.0.0.1:20001]\naccess_log: off\n" + text)
    return str(path)


def test_admin_listen_is_loopback_unless_public_is_written(tmp_path: Path):
    config = load_config(conf(tmp_path, "admin_listen: 8001\n"))
    assert config.admin_listen == ("127.0.0.1", 8001)
    assert config.admin_state == str(tmp_path / "admin_state.yml")
    with pytest.raises(ConfigError) as refused:
        load_config(conf(tmp_path, "admin_listen: 0.0.0.0:8001\n"))
    assert "pyproxy.conf:3: admin_listen: 0.0.0.0:8001 is not a loopback address" in str(refused.value)
    public = load_config(conf(tmp_path, "admin_listen: 0.0.0.0:8001 public\n"))
    assert public.admin_listen == ("0.0.0.0", 8001)
    config = load_config(conf(tmp_path, "admin_listen: '[::1]:8001'\nadmin_state: state/kong.yml\n"))
    assert (config.admin_listen, config.admin_state) == (("::1", 8001), str(tmp_path / "state/kong.yml"))
    assert load_config(conf(tmp_path, "")).admin_state is None


def test_kongs_form_encoded_fields():
    assert form_values([("name", "r"), ("protocols[]", "tcp"), ("destinations[1].port", "9000"),
                        ("destinations[1].ip", "10.0.0.1"), ("destinations[2].port", "9001"),
                        ("snis", "a.example"), ("snis", "b.example"), ("service.name", "s"),
                        ("tags", "")]) == {
        "name": "r", "protocols": ["tcp"], "destinations": [{"port": 9000, "ip": "10.0.0.1"}, {"port": 9001}],
        "snis": ["a.example", "b.example"], "service": {"name": "s"}, "tags": None}
    assert form_values([("healthchecks.active.healthy.interval", "2.5"), ("port", "x"),
                        ("enabled", "false"), ("config.allow[]", "10.0.0.0/8")]) == {
        "healthchecks": {"active": {"healthy": {"interval": 2.5}}}, "port": "x", "enabled": False,
        "config": {"allow": ["10.0.0.0/8"]}}


def test_a_change_that_does_not_load_leaves_the_state_file_alone(tmp_path: Path):
    path = conf(tmp_path, "admin_listen: 8001\n")
    asked: list[str] = []
    state = StateFile(str(tmp_path / "admin_state.yml"), path, lambda: asked.append("reload"), asked.append)
    api = AdminAPI(state)
    status, service = api.handle("POST", "/services", "application/x-www-form-urlencoded",
                                 b"name=s&url=tcp://127.0.0.1:7")
    assert (status, service["protocol"], service["port"], asked) == (201, "tcp", 7, ["reload"])
    written = (tmp_path / "admin_state.yml").read_text()
    assert (tmp_path / "admin_state.yml").stat().st_mode & 0o777 == 0o600     # it may hold keys
    status, body = api.handle("PATCH", "/services/s", "application/json",
                              b'{"retries": "many", "connect_timeout": true}')
    assert status == 400
    assert body["fields"] == {"retries": "expected an integer", "connect_timeout": "expected an integer"}
    assert body["message"].startswith("2 schema violations (")
    assert (tmp_path / "admin_state.yml").read_text() == written and asked == ["reload"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".admin")] == []   # no leftovers
    state.read()                        # what a restarted admin process finds
    assert state.document["services"] == [service]


def test_a_name_the_pyproxy_file_has_is_refused_naming_both_places(tmp_path: Path):
    path = conf(tmp_path, "admin_listen: 8001\nservices: [{name: db, host: 127.0.0.1, port: 5432}]\n")
    api = AdminAPI(StateFile(str(tmp_path / "admin_state.yml"), path, lambda: None, print))
    status, body = api.handle("POST", "/services", "application/json",
                              b'{"name": "db", "url": "tcp://127.0.0.1:5433"}')
    assert status == 400
    assert body["fields"] == {"@entity": [
        f"service 'db' is defined in {path} (line 4) and in {tmp_path / 'admin_state.yml'} (line 3)"]}


def test_admin_state_may_name_a_postgresql_database(tmp_path: Path):
    config = load_config(conf(tmp_path, "admin_listen: 8001\nadmin_state: postgres://kong:s3cret@db:5432/kong\n"))
    assert config.admin_database == "postgres://kong:s3cret@db:5432/kong"
    assert config.admin_state == str(tmp_path / "admin_state.cache.yml")       # what reloads read
    with pytest.raises(ConfigError) as refused:
        load_config(conf(tmp_path, "admin_listen: 8001\nadmin_state: postgres://kong:s3cret@db:5432\n"))
    assert ("pyproxy.conf:4: admin_state: 'postgres://kong:***@db:5432' names no database: "
            "postgres://USER@HOST:PORT/DATABASE") in str(refused.value)
    with pytest.raises(ConfigError) as refused:
        load_config(conf(tmp_path, "admin_listen: 8001\nadmin_state: postgresql://db:99999/kong\n"))
    assert "'postgresql://db:99999/kong': the port is not one from 1 to 65535" in str(refused.value)


def test_a_change_of_targets_weights_only_is_told_not_reloaded():
    from pyproxy.admin.state import empty, reweighed
    before = empty()
    before["upstreams"] = [{"id": "u", "name": "pool"}]
    before["targets"] = [{"id": "t1", "target": "10.0.0.1:80", "weight": 100, "upstream": {"id": "u"},
                          "updated_at": 1}, {"id": "t2", "target": "10.0.0.2:80", "weight": 100,
                                             "upstream": {"id": "u"}, "updated_at": 1}]
    after = {kind: [dict(e) for e in items] for kind, items in before.items()}
    after["targets"][1].update(weight=0, updated_at=2)
    assert reweighed(before, after) == {"t2": 0}
    after["targets"][1]["target"] = "10.0.0.3:80"                  # more than a weight
    assert reweighed(before, after) is None
    assert reweighed(before, {**before, "targets": before["targets"][:1]}) is None      # one deleted
    assert reweighed(before, {**before, "services": [{"id": "s"}]}) is None
    assert reweighed(before, before) is None                        # nothing to tell


def test_lists_filtered_by_tags_as_kong_does(tmp_path: Path):
    api = AdminAPI(StateFile(str(tmp_path / "admin_state.yml"), conf(tmp_path, "admin_listen: 8001\n"),
                             lambda: None, print))
    for name, tags in (("a", ["db", "eu"]), ("b", ["db"]), ("c", ["eu"]), ("d", None)):
        assert api.handle("POST", "/upstreams", "application/json",
                          json.dumps({"name": name, "tags": tags}).encode())[0] == 201

    def names(query: str) -> list[str]:
        status, page = api.handle("GET", f"/upstreams?{query}", "", b"")
        assert status == 200, page
        return [u["name"] for u in page["data"]]

    assert names("tags=db,eu") == ["a"]
    assert names("tags=db/eu") == ["a", "b", "c"]
    assert names("tags=db") == ["a", "b"]
    assert api.handle("GET", "/upstreams?tags=db&size=1", "", b"")[1]["next"].endswith("&tags=db&size=1")
    assert api.handle("GET", "/upstreams?tags=db,eu/x", "", b"") == (400, {
        "code": 11, "name": "invalid options", "message": "invalid option (tags: invalid filter syntax)",
        "options": {"tags": "invalid filter syntax"}})


def test_ca_certificates_with_kongs_digest_and_services_naming_them(tmp_path: Path):
    import hashlib
    import ssl

    from tests.support import make_ca
    api = AdminAPI(StateFile(str(tmp_path / "admin_state.yml"), conf(tmp_path, "admin_listen: 8001\n"),
                             lambda: None, print))
    pem = make_ca(tmp_path)[0].read_text()
    status, ca = api.handle("POST", "/ca_certificates", "application/json",
                            json.dumps({"cert": pem}).encode())
    assert status == 201
    assert ca["cert_digest"] == hashlib.sha256(ssl.PEM_cert_to_DER_cert(pem)).hexdigest()
    assert api.handle("GET", f"/ca_certificates/{ca['id']}", "", b"") == (200, ca)
    status, service = api.handle("POST", "/services", "application/x-www-form-urlencoded",
                                 f"name=s&url=tls://127.0.0.1:9&tls_verify=true&ca_certificates[]={ca['id']}"
                                 .encode())
    assert (status, service["ca_certificates"]) == (201, [ca["id"]])
    status, body = api.handle("PATCH", "/services/s", "application/json",
                              b'{"ca_certificates": ["6c5f6e36-0ff0-4a8a-8d17-0c9c5a0e6b1d"]}')
    assert status == 400 and "no such entry in 'ca_certificates'" in body["message"]
    status, body = api.handle("POST", "/ca_certificates", "application/json", b'{"cert": "not a pem"}')
    assert (status, list(body["fields"])) == (400, ["cert"])
