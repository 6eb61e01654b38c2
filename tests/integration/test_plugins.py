"""Plugins as a user configures them: ip-restriction, limit-conn, rate-limit, file-log."""

from __future__ import annotations

import json
import os
import signal
import socket
import time

from tests.support import connect, free_port, recv_all, recv_line, tag_handler, wait_until


def with_plugins(port: int, upstream_port: int, plugins: str, workers: int = 2) -> str:
    return f"""
worker_processes: {workers}
stream_listen: [127.0.0.1:{port}]
access_log_format: '$remote_addr $status $route'
services:
  - name: svc
    host: 127.0.0.1
    port: {upstream_port}
    routes:
      - name: main
        protocols: [tcp]
        destinations: [{{port: {port}}}]
plugins:
{plugins}
"""


def answered(port: int, source: str = "127.0.0.1") -> bool:
    """True when the upstream greeted us, False when pyproxy closed the session first."""
    with connect(port, source=source) as sock:
        return recv_line(sock) == b"up\n"


def test_ip_restriction_refuses_with_403_and_lets_allowed_through(proxy, upstreams):
    up = upstreams(tag_handler, name="up")
    port = free_port()
    p = proxy(with_plugins(port, up.port, """
  - name: ip-restriction
    route: main
    config: {allow: [127.0.0.0/29], deny: [127.0.0.5]}
"""))
    assert answered(port, "127.0.0.1")
    assert not answered(port, "127.0.0.5")          # inside allow, but deny wins
    assert not answered(port, "127.0.0.9")          # outside allow
    lines = p.wait_access(3)
    assert sorted(lines) == ["127.0.0.1 200 main", "127.0.0.5 403 main", "127.0.0.9 403 main"]
    assert up.connections == 1                      # refused sessions never reached the upstream
    assert "ip-restriction: client 127.0.0.9 is not allowed" in p.log_text()


def test_route_plugin_wins_over_global(proxy, upstreams):
    up = upstreams(tag_handler, name="up")
    port = free_port()
    proxy(with_plugins(port, up.port, """
  - name: ip-restriction
    config: {deny: [0.0.0.0/0]}
  - name: ip-restriction
    route: main
    config: {allow: [127.0.0.1]}
"""))
    assert answered(port, "127.0.0.1")
    assert not answered(port, "127.0.0.2")


def test_limit_conn_is_shared_by_all_workers(proxy, upstreams):
    up = upstreams(tag_handler, name="up")
    port = free_port()
    p = proxy(with_plugins(port, up.port, """
  - name: limit-conn
    config: {limit: 2, per: ip}
"""))
    held, refused = [], 0
    for _ in range(6):                      # connections land on both workers; only 2 may stay open
        sock = connect(port, source="127.0.0.3")
        if recv_line(sock) == b"up\n":
            held.append(sock)
        else:
            refused += 1
            sock.close()
    assert (len(held), refused) == (2, 4)
    assert answered(port, "127.0.0.4")       # another client has its own budget
    held.pop().close()
    wait_until(lambda: sum(" 200 " in line for line in p.access_lines()) >= 2, what="the close to be seen")
    assert answered(port, "127.0.0.3")       # a slot was freed
    for sock in held:
        sock.close()
    assert "limit-conn: 2 open session(s) per ip reached for 127.0.0.3" in p.log_text()
    assert sum(" 503 " in line for line in p.access_lines()) == 4


def test_limit_conn_forgets_the_sessions_of_a_killed_worker(proxy, upstreams):
    up = upstreams(tag_handler, name="up")
    port = free_port()
    p = proxy(with_plugins(port, up.port, """
  - name: limit-conn
    config: {limit: 1, per: route}
""", workers=1))
    held = connect(port)
    assert recv_line(held) == b"up\n"
    assert not answered(port)                # the route's one slot is taken
    (victim,) = p.worker_pids()
    os.kill(victim, signal.SIGKILL)
    wait_until(lambda: p.worker_pids() and p.worker_pids() != [victim], what="a new worker")
    held.close()
    wait_until(lambda: answered(port), timeout=10, what="the dead worker's count to be dropped")


def test_rate_limit_token_bucket_across_workers(proxy, upstreams):
    up = upstreams(tag_handler, name="up")
    port = free_port()
    p = proxy(with_plugins(port, up.port, """
  - name: rate-limit
    config: {rate: 1, burst: 3, per: ip}
"""))
    started = time.monotonic()
    results = [answered(port, "127.0.0.6") for _ in range(8)]
    assert time.monotonic() - started < 0.9          # all within the first second…
    assert results[:3] == [True, True, True]         # …the burst passes
    assert results[3:].count(True) == 0              # and the rest is refused
    time.sleep(1.2)
    assert answered(port, "127.0.0.6")               # one token back after a second
    assert sum(" 503 " in line for line in p.wait_access(9)) == 5


def test_file_log_writes_one_json_object_per_session(proxy, upstreams, tmp_path):
    up = upstreams(tag_handler, name="up")
    port = free_port()
    proxy(with_plugins(port, up.port, f"""
  - name: file-log
    config: {{path: {tmp_path}/sessions.json}}
"""))
    with connect(port) as sock:
        assert recv_line(sock) == b"up\n"
        sock.sendall(b"12345")
        sock.shutdown(socket.SHUT_WR)
        assert recv_all(sock) == b"12345"
    path = tmp_path / "sessions.json"
    wait_until(lambda: path.exists() and path.read_text().strip(), what="the JSON log")
    (record,) = [json.loads(line) for line in path.read_text().splitlines()]
    assert record["session"]["status"] == 200
    assert record["session"]["received"] == 5 and record["session"]["sent"] == 8
    assert record["client"]["ip"] == "127.0.0.1"
    assert record["upstream"]["tried"] == [up.target]
    assert record["route"] == "main" and record["service"] == "svc" and record["tls"] is None


def test_the_documented_example_plugin_loads_from_beside_the_config(proxy, upstreams, tmp_path):
    """docs/examples/deny_sni.py, used exactly as docs/plugins.md says."""
    import shutil
    from pathlib import Path

    from tests.support import make_cert, tls_client, tls_handler_for

    shutil.copy(Path(__file__).parents[2] / "docs" / "examples" / "deny_sni.py", tmp_path / "deny_sni.py")
    cert = make_cert(tmp_path, "backend", ["backend"])
    up = upstreams(tls_handler_for(cert, tag_handler), name="up")
    port = free_port()
    p = proxy(f"""
stream_listen: ["127.0.0.1:{port} ssl"]
plugin_modules: [deny_sni]
services:
  - name: pass
    host: 127.0.0.1
    port: {up.port}
    routes:
      - name: my-tls-route
        protocols: [tls_passthrough]
        snis: ["*.example.com"]
plugins:
  - name: deny-sni
    route: my-tls-route
    config: {{names: [old.example.com], status: 403}}
""")
    with tls_client(port, "new.example.com") as sock:
        assert recv_line(sock) == b"up\n"
    raw = connect(port)
    import ssl
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    try:
        ctx.wrap_socket(raw, server_hostname="old.example.com").close()
        raise AssertionError("the handshake should not have completed")
    except (ssl.SSLError, OSError):
        pass
    assert any(" 403 " in line for line in p.wait_access(2))
    # Session.log: the plugin's line ends with the session's place, like every line about a session.
    assert "deny-sni: refusing old.example.com; client: 127.0.0.1:" in p.log_text()
    assert f"server: 127.0.0.1:{port}, sni: old.example.com" in p.log_text()


def test_plugin_module_errors_are_config_errors(tmp_path):
    from tests.support import Proxy

    (tmp_path / "broken_plugin.py").write_text("raise RuntimeError('half-written')\n")
    p = Proxy(tmp_path, f"""
stream_listen: [127.0.0.1:{free_port()}]
plugin_modules: [broken_plugin, not_there]
services:
  - name: s
    host: 127.0.0.1
    port: 1
    routes: [{{name: r, protocols: [tcp], sources: [{{ip: 127.0.0.1}}]}}]
""")
    result = p.run_cli("-t")
    assert result.returncode == 1
    assert ("plugin_modules[0]: cannot import plugin module 'broken_plugin': RuntimeError: half-written"
            in result.stderr)
    assert "plugin_modules[1]: cannot import plugin module 'not_there': ModuleNotFoundError" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_reload_runs_the_plugin_module_as_edited(proxy, upstreams):
    """plugin_modules are imported afresh by each load: after an edit (same size, same second) and
    a HUP, new sessions meet the new code, also that of a module the plugin imports from beside it."""
    up = upstreams(tag_handler, name="up")
    port = free_port()
    p = proxy(with_plugins(port, up.port, "  - name: answer\n", workers=1), start=False)
    p.conf.write_text(p.conf.read_text() + "plugin_modules: [answer]\n")
    (p.dir / "answer.py").write_text("from pyproxy.plugins import Plugin, register\n"
                                     "from answer_status import STATUS\n\n\n"
                                     "@register\n"
                                     "class Answer(Plugin):\n"
                                     "    name = 'answer'\n\n"
                                     "    def access(self, session):\n"
                                     "        return STATUS\n")
    (p.dir / "answer_status.py").write_text("STATUS = 403\n")
    p.start()
    assert not answered(port)
    (p.dir / "answer_status.py").write_text("STATUS = 503\n")
    p.reload()
    assert not answered(port)
    assert [line.split()[1] for line in p.wait_access(2)] == ["403", "503"]
