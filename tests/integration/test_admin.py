"""Kong's Admin API on `admin_listen`, as a Kong user drives it: curl with Kong's form syntax, then
bytes through the proxy; lookups, pagination, Kong's error bodies, and the entities persisted across
a restart. Real pyproxy processes, real HTTP on loopback."""

from __future__ import annotations

import json
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

from tests.support import (
    connect,
    echo_handler,
    free_port,
    make_cert,
    peer_common_name,
    recv_line,
    tls_client,
    wait_until,
)

CONFIG = """
stream_listen: [127.0.0.1:{tcp}, 127.0.0.1:{tls} ssl]
admin_listen: {admin}
reload_coalesce: 50ms
"""


def start(proxy, tcp: int, tls: int | None = None):
    admin = free_port()
    p = proxy(CONFIG.format(tcp=tcp, tls=tls or free_port(), admin=admin))
    p.admin = f"http://127.0.0.1:{admin}"
    wait_until(lambda: _answers(p.admin), what="the Admin API")
    return p


def _answers(base: str) -> bool:
    try:
        return call(base, "GET", "/")[0] == 200
    except OSError:
        return False


def call(base: str, method: str, path: str, body: dict | None = None, data: bytes | None = None,
         content_type: str = "application/json") -> tuple[int, object]:
    if body is not None:
        data = json.dumps(body).encode()
    request = urllib.request.Request(base + path, data=data, method=method,
                                     headers={"Content-Type": content_type} if data is not None else {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            text = response.read()
            return response.status, json.loads(text) if text else None
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def curl(*args: str) -> dict:
    """curl as Kong's documentation writes it; the JSON it printed."""
    done = subprocess.run(["curl", "-sS", "--max-time", "10", *args], capture_output=True, text=True,
                          timeout=20, check=True)
    return json.loads(done.stdout)


def echoed(port: int, line: bytes = b"hello\n") -> bytes:
    with connect(port) as sock:
        sock.sendall(line)
        return recv_line(sock)


def served(port: int, server_name: str | None = None) -> bytes:
    """The echo of one line once the change is served: a change applies through a reload that
    coalesces with the others asked for meanwhile, so the test waits as a user would, by trying."""
    def attempt() -> bytes:
        try:
            if server_name is None:
                return echoed(port)
            with tls_client(port, server_name) as sock:
                assert peer_common_name(sock) == server_name
                sock.sendall(b"hello\n")
                return recv_line(sock)
        except OSError:
            return b""
    return wait_until(attempt, what=f"an echo through port {port}")


def reloads(p) -> int:
    """Reloads started so far."""
    return p.log_text().count("reloading configuration")


def settled(p) -> bool:
    """No reload in flight, and none asked for that is still to start: two changes in a row make one
    reload and then a second, coalesced, which starts up to reload_coalesce (200ms) after the first."""
    started = reloads(p)
    if started != p.log_text().count("reload complete"):
        return False
    time.sleep(0.5)
    return reloads(p) == started


def test_the_seed_workflow_with_curl_tcp_then_tls(proxy, upstreams, tmp_path: Path):
    echo = upstreams(echo_handler)
    tcp, tls = free_port(), free_port()
    p = start(proxy, tcp, tls)
    # A service with protocol tcp, a route on destinations: Kong's docs, verbatim but for the ports.
    service = curl("-X", "POST", f"{p.admin}/services", "--data", "name=tcp-echo", "--data", "protocol=tcp",
                   "--data", "host=127.0.0.1", "--data", f"port={echo.port}")
    assert service["name"] == "tcp-echo" and service["port"] == echo.port and service["retries"] == 5
    route = curl("-X", "POST", f"{p.admin}/services/tcp-echo/routes", "--data", "name=tcp-route",
                 "--data", "protocols[]=tcp", "--data", f"destinations[1].port={tcp}")
    assert route["destinations"] == [{"port": tcp}] and route["service"] == {"id": service["id"]}
    assert served(tcp) == b"hello\n"
    assert [title for _, title in p.children() if "admin" in title] == ["pyproxy: admin process"]

    # A certificate with its SNI (multipart, as `curl -F` sends it), then a tls route on snis.
    crt, key = make_cert(tmp_path, "tls.admin.example", ["tls.admin.example"])
    certificate = curl("-X", "POST", f"{p.admin}/certificates", "-F", f"cert=@{crt}", "-F", f"key=@{key}",
                       "-F", "snis[]=tls.admin.example")
    assert certificate["snis"] == ["tls.admin.example"]
    curl("-X", "POST", f"{p.admin}/services", "--data", "name=tls-echo", "--data",
         f"url=tcp://127.0.0.1:{echo.port}")
    curl("-X", "POST", f"{p.admin}/services/tls-echo/routes", "--data", "protocols=tls",
         "--data", "snis[]=tls.admin.example", "--data", f"destinations[1].port={tls}")
    assert served(tls, "tls.admin.example") == b"hello\n"
    assert curl(f"{p.admin}/snis/tls.admin.example")["certificate"] == {"id": certificate["id"]}
    assert curl(f"{p.admin}/certificates/tls.admin.example")["id"] == certificate["id"]


def test_lookup_by_name_and_id_and_pagination(proxy):
    p = start(proxy, free_port())
    ids = []
    for index in range(5):
        status, made = call(p.admin, "POST", "/upstreams", {"name": f"pool-{index}"})
        assert status == 201
        ids.append(made["id"])
    assert call(p.admin, "GET", "/upstreams/pool-3") == call(p.admin, "GET", f"/upstreams/{ids[3]}")
    seen, path = [], "/upstreams?size=2"
    while path:
        status, page = call(p.admin, "GET", path)
        assert status == 200 and len(page["data"]) <= 2
        seen += [u["name"] for u in page["data"]]
        path = page["next"]
        assert (page.get("offset") is None) == (path is None)
    assert seen == [f"pool-{index}" for index in range(5)]
    assert call(p.admin, "GET", "/upstreams?size=0")[1]["name"] == "invalid size"
    assert call(p.admin, "GET", "/upstreams?offset=bm9wZQ")[1]["code"] == 7

    status, target = call(p.admin, "POST", "/upstreams/pool-0/targets", data=b"target=127.0.0.1",
                          content_type="application/x-www-form-urlencoded")
    assert status == 201 and target["target"] == "127.0.0.1:8000" and target["weight"] == 100
    assert call(p.admin, "GET", "/upstreams/pool-0/targets")[1]["data"] == [target]
    assert call(p.admin, "PATCH", "/upstreams/pool-1", {"algorithm": "least-connections"})[1]["algorithm"] \
        == "least-connections"
    assert call(p.admin, "DELETE", "/upstreams/pool-0") == (204, None)
    assert call(p.admin, "GET", "/upstreams/pool-0") == (404, {"message": "Not found"})


def test_a_bad_request_is_kongs_400_and_changes_nothing(proxy, upstreams):
    echo = upstreams(echo_handler)
    tcp = free_port()
    p = start(proxy, tcp)
    call(p.admin, "POST", "/services", {"name": "echo", "protocol": "tcp", "host": "127.0.0.1",
                                        "port": echo.port})
    assert call(p.admin, "POST", "/services/echo/routes",
                {"name": "r", "protocols": ["tcp"], "destinations": [{"port": tcp}]})[0] == 201
    assert served(tcp) == b"hello\n"
    wait_until(lambda: settled(p), what="no reload in flight or still to start")
    state = (p.dir / "admin_state.yml").read_bytes()
    before = reloads(p)

    status, body = call(p.admin, "POST", "/services/echo/routes",
                        {"name": "bad", "protocols": ["tcp"], "destinations": [{"port": "ninety"}]})
    assert status == 400
    assert body == {"code": 2, "name": "schema violation",
                    "message": "schema violation (destinations[0].port: expected an integer)",
                    "fields": {"destinations": [{"port": "expected an integer"}]}}
    status, body = call(p.admin, "PATCH", "/services/echo", {"colour": "blue"})
    assert (status, body["fields"]) == (400, {"colour": "unknown field"})
    status, body = call(p.admin, "POST", "/services", {"name": "echo", "host": "x"})
    assert (status, body["name"]) == (409, "unique constraint violation")
    status, body = call(p.admin, "POST", "/routes", {"service": {"name": "nope"}, "protocols": ["tcp"]})
    assert (status, body["code"]) == (400, 4)
    status, body = call(p.admin, "DELETE", "/services/echo")
    assert (status, body["fields"]) == (400, {"@referenced_by": "routes"})
    assert call(p.admin, "POST", "/services", data=b"{not json")[1] == {"message": "Cannot parse JSON body"}

    assert (p.dir / "admin_state.yml").read_bytes() == state
    assert [r["name"] for r in call(p.admin, "GET", "/routes")[1]["data"]] == ["r"]
    assert echoed(tcp) == b"hello\n"
    assert reloads(p) == before


def test_a_restart_brings_the_entities_back(proxy, upstreams):
    echo = upstreams(echo_handler)
    tcp = free_port()
    p = start(proxy, tcp)
    curl("-X", "POST", f"{p.admin}/services", "--data", "name=kept", "--data",
         f"url=tcp://127.0.0.1:{echo.port}")
    route = curl("-X", "POST", f"{p.admin}/routes", "--data", "service.name=kept", "--data",
                 "protocols[]=tcp", "--data", f"destinations[1].port={tcp}")
    assert served(tcp) == b"hello\n"
    p.stop()
    p.start()
    wait_until(lambda: _answers(p.admin), what="the Admin API after the restart")
    assert echoed(tcp) == b"hello\n"          # served from the state file at startup
    assert call(p.admin, "GET", f"/routes/{route['id']}") == (200, route)
    assert call(p.admin, "GET", "/services/kept")[1]["port"] == echo.port


def test_a_route_on_a_port_nobody_listens_on_is_kept_and_logged(proxy, upstreams):
    echo = upstreams(echo_handler)
    p = start(proxy, free_port())
    unheard = free_port()
    call(p.admin, "POST", "/services", {"name": "s", "url": f"tcp://127.0.0.1:{echo.port}"})
    status, created = call(p.admin, "POST", "/services/s/routes",
                         {"name": "nowhere", "protocols": ["tcp"], "destinations": [{"port": unheard}]})
    # As in Kong, whose stream_listen is kong.conf's: kept, and it matches nothing; the log says so.
    assert (status, created["destinations"]) == (201, [{"port": unheard}])
    p.wait_log(f"route 'nowhere' names destinations port {unheard}, where no stream_listen entry")
    assert call(p.admin, "POST", "/upstreams", {"name": "other"})[0] == 201
    p.wait_log("admin: POST /upstreams: 201")
    assert p.log_text().count("route 'nowhere' names") == 1         # said once, when it was made


def test_config_export_import_and_what_is_refused(proxy, upstreams):
    echo = upstreams(echo_handler)
    tcp = free_port()
    p = start(proxy, tcp)
    kong_yml = (f'_format_version: "3.0"\nservices:\n- name: whole\n  url: tcp://127.0.0.1:{echo.port}\n'
                "  routes:\n  - name: whole-route\n    protocols: [tcp]\n"
                f"    destinations: [{{port: {tcp}}}]\n")
    (p.dir / "kong.yml").write_text(kong_yml)
    loaded = curl("-X", "POST", f"{p.admin}/config", "-F", f"config=@{p.dir / 'kong.yml'}")
    assert [s["name"] for s in loaded["services"]] == ["whole"]
    assert served(tcp) == b"hello\n"
    exported = call(p.admin, "GET", "/config")[1]["config"]
    assert "whole-route" in exported and exported.startswith("_format_version: '3.0'")

    status, body = call(p.admin, "POST", "/config", {"_format_version": "3.0", "services": [
        {"name": "x", "protocol": "tcp", "host": "127.0.0.1", "port": "no"}]})
    assert (status, body["name"], body["fields"]) == (
        400, "invalid declarative configuration", {"services": [{"port": "expected an integer"}]})
    assert call(p.admin, "GET", "/services/whole")[0] == 200

    assert call(p.admin, "GET", "/no/such/thing") == (404, {"message": "Not found"})
    assert call(p.admin, "DELETE", "/status") == (405, {"message": "Method not allowed"})
    status, body = call(p.admin, "POST", "/config", data=b"x" * ((10 << 20) + 1),
                        content_type="application/x-yaml")
    assert status == 413
    assert echoed(tcp) == b"hello\n"
    status, root = call(p.admin, "GET", "/")
    assert status == 200 and "version" in root and "configuration" in root
    assert call(p.admin, "GET", "/status")[1]["database"] == {"reachable": True}


def test_a_burst_of_changes_is_coalesced_into_fewer_reloads(proxy):
    admin = free_port()
    p = proxy(f"stream_listen: [127.0.0.1:{free_port()}]\nadmin_listen: {admin}\nreload_coalesce: 1s\n")
    base = f"http://127.0.0.1:{admin}"
    wait_until(lambda: _answers(base), what="the Admin API")
    for index in range(6):
        assert call(base, "POST", "/upstreams", {"name": f"burst-{index}"})[0] == 201
    p.wait_log("requests coalesced into one reload")
    wait_until(lambda: settled(p), what="no reload in flight or still to start")
    assert 1 <= reloads(p) < 6
    assert len(call(base, "GET", "/upstreams")[1]["data"]) == 6


def test_a_slow_client_holds_up_nobody(proxy):
    p = start(proxy, free_port())
    port = int(p.admin.rsplit(":", 1)[1])
    with connect(port) as slow:
        slow.sendall(b"POST /services HTTP/1.1\r\nContent-Length: 100\r\n\r\n{")     # and no more
        status, _ = call(p.admin, "POST", "/upstreams", {"name": "meanwhile"})
        assert status == 201
        slow.settimeout(15)
        assert slow.recv(100) == b""        # dropped after the request timeout, unanswered
    assert [u["name"] for u in call(p.admin, "GET", "/upstreams")[1]["data"]] == ["meanwhile"]


def test_a_taken_admin_port_is_logged_and_tried_again_while_the_proxy_serves(proxy, upstreams):
    echo = upstreams(echo_handler)
    tcp, admin = free_port(), free_port()
    holder = socket.socket()
    holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    holder.bind(("127.0.0.1", admin))
    holder.listen()
    try:
        p = proxy(f"stream_listen: [127.0.0.1:{tcp}]\nadmin_listen: {admin}\n"
                  f"services: [{{name: s, host: 127.0.0.1, port: {echo.port}, routes: "
                  f"[{{name: r, destinations: [{{port: {tcp}}}]}}]}}]\n")
        p.wait_log(f"admin process could not start: cannot listen on 127.0.0.1:{admin} (admin_listen): "
                   "Address already in use")
        assert echoed(tcp) == b"hello\n"
    finally:
        holder.close()
    wait_until(lambda: _answers(f"http://127.0.0.1:{admin}"), what="the admin process, started again")


def test_admin_token_is_required_in_kong_admin_token(proxy):
    admin = free_port()
    token = "0123456789abcdef0123"
    proxy(f"stream_listen: [127.0.0.1:{free_port()}]\nadmin_listen: {admin}\nadmin_token: {token}\n")
    base = f"http://127.0.0.1:{admin}"
    wait_until(lambda: curl_status("-H", f"Kong-Admin-Token: {token}", base + "/status") == "200",
               what="the Admin API")
    for header in ("Kong-Admin-Token: wrong-0123456789abcdef", "X-Other: 1"):
        assert curl_status("-H", header, "-X", "POST", base + "/upstreams", "--data", "name=x") == "401"
    assert curl("-H", "X-Other: 1", base + "/upstreams") == {
        "message": "Invalid credentials. Token or User credentials required"}
    assert curl("-H", f"Kong-Admin-Token: {token}", "-X", "POST", base + "/upstreams",
                "--data", "name=allowed")["name"] == "allowed"
    assert [u["name"] for u in curl("-H", f"Kong-Admin-Token: {token}", base + "/upstreams")["data"]] \
        == ["allowed"]


def curl_status(*args: str) -> str:
    """The HTTP status curl got ("000": none)."""
    done = subprocess.run(["curl", "-s", "-o", "/dev/null", "--max-time", "5", "-w", "%{http_code}", *args],
                          capture_output=True, text=True, timeout=10)
    return done.stdout
