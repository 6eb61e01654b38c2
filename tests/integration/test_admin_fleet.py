"""Fleet mode: pyproxy instances sharing their entities through a real PostgreSQL
(`admin_state: postgres://…`), as Kong's traditional mode shares its database. Each test starts its
own cluster (initdb in a temporary folder, as an unprivileged user when run as root, since postgres
refuses root), on a port below 32768 with its socket in that folder, and stops it by pid."""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import threading
from pathlib import Path

import pytest

from tests.integration.test_admin import _answers, call, curl
from tests.support import (
    Proxy,
    connect,
    expected_hash_reply,
    free_port,
    hash_handler,
    pattern_bytes,
    recv_line,
    tag_handler,
    upload_and_hash,
    wait_until,
)


def postgres_bin() -> Path:
    """The newest PostgreSQL server Debian installed (/usr/lib/postgresql/VERSION/bin)."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/postgres"),
                   key=lambda path: int(Path(path).parts[-3].split(".")[0]))
    assert found, "no PostgreSQL server in /usr/lib/postgresql: `make test` installs Debian's postgresql"
    return Path(found[-1]).parent


class Postgres:
    """A throwaway cluster: started, stopped and started again by pid, on one port and folder."""

    def __init__(self) -> None:
        self.bin = postgres_bin()
        self.dir = Path(tempfile.mkdtemp(prefix="pyproxy-pg-"))
        self.port = free_port()
        self.url = f"postgres://pyproxy@127.0.0.1:{self.port}/postgres"
        self.proc: subprocess.Popen | None = None
        self.prefix: list[str] = []
        if os.getuid() == 0:            # postgres refuses to run as root: as nobody, then
            nobody = pwd.getpwnam("nobody")
            os.chown(self.dir, nobody.pw_uid, nobody.pw_gid)
            self.prefix = ["setpriv", f"--reuid={nobody.pw_uid}", f"--regid={nobody.pw_gid}",
                           "--clear-groups"]
        self.data = self.dir / "data"
        subprocess.run([*self.prefix, str(self.bin / "initdb"), "-D", str(self.data), "-U", "pyproxy",
                        "--auth=trust", "-E", "UTF8", "--no-sync"],
                       check=True, capture_output=True, timeout=60)

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [*self.prefix, str(self.bin / "postgres"), "-D", str(self.data), "-p", str(self.port),
             "-k", str(self.dir), "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off"],
            stdout=subprocess.DEVNULL, stderr=open(self.dir / "log", "ab"), stdin=subprocess.DEVNULL)  # noqa: SIM115
        wait_until(lambda: subprocess.run([str(self.bin / "pg_isready"), "-q", "-h", "127.0.0.1", "-p",
                                           str(self.port)], timeout=5).returncode == 0,
                   timeout=30, what="PostgreSQL accepting connections")

    def stop(self) -> None:
        """Fast shutdown (SIGINT): the clients' connections are closed, as in an outage."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None


@pytest.fixture
def postgres():
    cluster = Postgres()
    cluster.start()
    yield cluster
    cluster.stop()
    shutil.rmtree(cluster.dir, ignore_errors=True)


@pytest.fixture
def fleet(tmp_path, postgres):
    """`fleet(name, address, port)`: a pyproxy instance on ADDRESS:PORT keeping its entities in the
    cluster, with an Admin API of its own; each in a folder of its own, all stopped at teardown."""
    started: list[Proxy] = []

    def make(name: str, address: str, port: int) -> Proxy:
        folder = tmp_path / name
        folder.mkdir()
        admin = free_port()
        p = Proxy(folder, f"stream_listen: [{address}:{port}]\nadmin_listen: {admin}\n"
                          f"admin_state: {postgres.url}\nreload_coalesce: 50ms\n")
        p.admin = f"http://127.0.0.1:{admin}"
        started.append(p)
        p.start()
        wait_until(lambda: _answers(p.admin), what=f"{name}'s Admin API")
        return p

    yield make
    for p in started:
        p.stop()
    for p in started:
        assert "internal error" not in p.log_text(), p.log_text()


PAYLOAD = pattern_bytes(256 << 10)


def hashed(port: int, host: str) -> bool:
    """256 KiB through host:port came back hashed right (the route is served there)."""
    try:
        return upload_and_hash(port, PAYLOAD, host) == expected_hash_reply(PAYLOAD)
    except OSError:
        return False


def test_a_change_on_one_instance_serves_on_the_other(fleet, upstreams):
    hashing = upstreams(hash_handler)
    port = free_port()
    a, b = fleet("a", "127.0.0.1", port), fleet("b", "127.0.0.2", port)
    curl("-X", "POST", f"{a.admin}/services", "--data", "name=hash", "--data", "protocol=tcp",
         "--data", "host=127.0.0.1", "--data", f"port={hashing.port}")
    route = curl("-X", "POST", f"{a.admin}/services/hash/routes", "--data", "name=hash-route",
                 "--data", "protocols[]=tcp", "--data", f"destinations[1].port={port}")
    wait_until(lambda: hashed(port, "127.0.0.2"), timeout=3, what="the route served by b")
    wait_until(lambda: hashed(port, "127.0.0.1"), timeout=3, what="the route served by a")
    assert call(b.admin, "GET", "/routes/hash-route") == (200, route)
    assert call(b.admin, "GET", "/")[1]["configuration"]["database"] == "postgres"
    b.wait_log("admin: entities of postgres://pyproxy@127.0.0.1")

    # A change on b that does not load is refused there, and nothing reaches a.
    status, body = call(b.admin, "PATCH", "/services/hash", {"port": "many"})
    assert (status, body["fields"]) == (400, {"port": "expected an integer"})
    assert call(a.admin, "GET", "/services/hash")[1]["port"] == hashing.port


def test_the_database_down_stops_no_traffic_and_refuses_writes(fleet, upstreams, postgres):
    hashing = upstreams(hash_handler)
    port, later = free_port(), free_port()
    a = fleet("a", "127.0.0.1", port)
    call(a.admin, "POST", "/services", {"name": "hash", "url": f"tcp://127.0.0.1:{hashing.port}"})
    call(a.admin, "POST", "/services/hash/routes", {"protocols": ["tcp"], "destinations": [{"port": port}]})
    b = fleet("b", "127.0.0.2", port)
    wait_until(lambda: hashed(port, "127.0.0.2") and hashed(port, "127.0.0.1"), timeout=5,
               what="both instances serving")

    failures: list[str] = []
    done = threading.Event()

    def traffic() -> None:
        while not done.is_set():
            for host in ("127.0.0.1", "127.0.0.2"):
                if not hashed(port, host):
                    failures.append(host)

    sender = threading.Thread(target=traffic)
    sender.start()
    try:
        postgres.stop()
        for p in (a, b):
            p.wait_log(f"{postgres.url} is unreachable")
        status, body = call(a.admin, "POST", "/services", {"name": "new", "url": "tcp://127.0.0.1:9"})
        assert status == 503
        assert (body["code"], body["name"]) == (8, "database error")
        assert body["message"].startswith("the database is unreachable, changes are refused until it answers")
        assert call(b.admin, "GET", "/services/hash")[1]["port"] == hashing.port
        assert call(b.admin, "GET", "/status")[1]["database"] == {"reachable": False}

        postgres.start()
        for p in (a, b):
            p.wait_log(f"admin: {postgres.url} answers again", timeout=5)
    finally:
        done.set()
        sender.join(30)
    assert failures == []
    assert call(b.admin, "GET", "/services/new")[0] == 404          # the refused write was not made

    # Back: a change on b, on a port both listen on only from now on, serves on a.
    b_conf = b.conf.read_text().replace(f"[127.0.0.2:{port}]", f"[127.0.0.2:{port}, 127.0.0.2:{later}]")
    a_conf = a.conf.read_text().replace(f"[127.0.0.1:{port}]", f"[127.0.0.1:{port}, 127.0.0.1:{later}]")
    a.conf.write_text(a_conf)
    a.reload()
    b.conf.write_text(b_conf)
    b.reload()
    assert call(b.admin, "POST", "/services/hash/routes",
                {"name": "later", "protocols": ["tcp"], "destinations": [{"port": later}]})[0] == 201
    wait_until(lambda: hashed(later, "127.0.0.1"), timeout=3, what="b's change served by a")
    assert call(a.admin, "GET", "/status")[1]["database"] == {"reachable": True}


def test_a_restart_during_an_outage_comes_back_with_the_last_entities(fleet, upstreams, postgres):
    hashing = upstreams(hash_handler)
    port = free_port()
    a = fleet("a", "127.0.0.1", port)
    call(a.admin, "POST", "/services", {"name": "hash", "url": f"tcp://127.0.0.1:{hashing.port}"})
    route = call(a.admin, "POST", "/services/hash/routes",
                 {"name": "kept", "protocols": ["tcp"], "destinations": [{"port": port}]})[1]
    wait_until(lambda: hashed(port, "127.0.0.1"), what="the route served")
    postgres.stop()
    a.stop()
    a.start(wait=False)
    a.wait_log("ready:", count=2, timeout=20)
    assert hashed(port, "127.0.0.1")               # at once: the cache is read at start
    a.wait_log(f"the entities are the last ones {postgres.url} gave, from {a.dir / 'admin_state.cache.yml'}, "
               "until it answers")
    wait_until(lambda: _answers(a.admin), what="the Admin API")
    assert call(a.admin, "GET", "/routes/kept") == (200, route)
    assert call(a.admin, "DELETE", "/routes/kept")[0] == 503

    postgres.start()
    a.wait_log(f"admin: {postgres.url} answers again", timeout=5)
    assert call(a.admin, "DELETE", "/routes/kept") == (204, None)
    wait_until(lambda: not hashed(port, "127.0.0.1"), timeout=3, what="the route gone")


def test_a_change_made_on_entities_another_instance_changed_meanwhile_is_stale(postgres, tmp_path):
    """Two admin states on one database, without their loops: the second writes without having
    followed the first's change, and is told so (the admin process then answers again on the newer
    entities, AdminServer.answer); once it followed, its change is made on top of the first's."""
    from pyproxy.admin.api import AdminAPI
    from pyproxy.admin.database import DatabaseState
    from pyproxy.admin.state import Stale
    from pyproxy.log import ErrorLog

    states = []
    for name in ("a", "b"):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "pyproxy.conf").write_text(f"stream_listen: [127.0.0.1:{free_port()}]\naccess_log: off\n"
                                             f"admin_listen: {free_port()}\nadmin_state: {postgres.url}\n")
        states.append(DatabaseState(postgres.url, str(folder / "admin_state.cache.yml"),
                                    str(folder / "pyproxy.conf"), lambda: None, ErrorLog("stderr")))
    for state in states:
        state.read()
        state.sync()
    a, b = (AdminAPI(state) for state in states)
    assert a.handle("POST", "/upstreams", "application/json", b'{"name": "first"}')[0] == 201
    with pytest.raises(Stale):
        b.handle("POST", "/upstreams", "application/json", b'{"name": "second"}')
    states[1].refresh()
    assert b.handle("POST", "/upstreams", "application/json", b'{"name": "second"}')[0] == 201
    states[0].refresh()
    assert [u["name"] for u in a.handle("GET", "/upstreams", "", b"")[1]["data"]] == ["first", "second"]
    assert states[0].version == states[1].version == 2


def test_unhealthy_on_one_instance_takes_the_target_out_on_the_others(fleet, upstreams):
    first, second = upstreams(tag_handler, name="first"), upstreams(tag_handler, name="second")
    port = free_port()
    a, b = fleet("a", "127.0.0.1", port), fleet("b", "127.0.0.2", port)
    call(a.admin, "POST", "/upstreams", {"name": "pool"})
    for up in (first, second):
        call(a.admin, "POST", "/upstreams/pool/targets", {"target": up.target})
    call(a.admin, "POST", "/services", {"name": "s", "protocol": "tcp", "host": "pool"})
    call(a.admin, "POST", "/services/s/routes", {"protocols": ["tcp"], "destinations": [{"port": port}]})

    def answering(host: str) -> set[str]:
        names = set()
        for _ in range(8):
            try:
                with connect(port, host) as sock:
                    names.add(recv_line(sock).decode().strip())
            except OSError:
                names.add("")
        return names

    wait_until(lambda: answering("127.0.0.2") == {"first", "second"}, timeout=5, what="b serving both")
    assert call(a.admin, "PUT", f"/upstreams/pool/targets/{first.target}/unhealthy") == (204, None)
    wait_until(lambda: answering("127.0.0.2") == {"second"}, timeout=3, what="first out on b too")
    # On a too: within a second of the PUT (the next heartbeat), or at once for a generation the
    # entities' own reload boots meanwhile.
    wait_until(lambda: answering("127.0.0.1") == {"second"}, timeout=3, what="first out on a")
    by_target = {t["target"]: t["health"] for t in call(b.admin, "GET", "/upstreams/pool/health")[1]["data"]}
    assert by_target[first.target] == "UNHEALTHY"
    assert call(b.admin, "PUT", f"/upstreams/pool/targets/{first.target}/healthy") == (204, None)
    wait_until(lambda: answering("127.0.0.1") == {"first", "second"}, timeout=3, what="first back on a")
