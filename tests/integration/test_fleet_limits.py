"""limit-conn and rate-limit with `policy: redis`: one limit for several pyproxy instances, through a
real redis-server that each test starts on its own loopback port; what happens when it dies, comes
back, or accepts and never answers."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import threading
import time

import pytest

from tests.integration.test_plugins import with_plugins
from tests.redis_support import RedisServer
from tests.support import Proxy, connect, free_port, recv_line, tag_handler, wait_until

pytestmark = pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs redis-server")

DOWN = "unavailable ("
BACK = "answers again"


@pytest.fixture
def redis():
    servers: list[RedisServer] = []

    def make(port: int | None = None) -> RedisServer:
        server = RedisServer(port).start()
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.stop()


@pytest.fixture
def fleet(tmp_path):
    """`fleet(config_for_port, ports)`: one pyproxy instance per port, each in a folder of its own."""
    started: list[Proxy] = []

    def make(config_for, ports: list[int]) -> list[Proxy]:
        for port in ports:
            folder = tmp_path / str(port)
            folder.mkdir()
            started.append(Proxy(folder, config_for(port)).start())
        return started

    yield make
    for p in started:
        p.stop()
    for p in started:
        assert "internal error" not in p.log_text(), p.log_text()


config = with_plugins       # a route `main` on the port, to the upstream, with these plugins


def limit_conn(redis_port: int, limit: int, timeout_ms: int = 1000, nested: bool = False,
               more: str = "") -> str:
    """`nested`: the Redis settings as Kong 3.6 writes them (`redis: {host, …}`); `more`: more config."""
    if nested:
        redis = f"redis: {{host: 127.0.0.1, port: {redis_port}, timeout: {timeout_ms}}}"
    else:
        redis = f"redis_host: 127.0.0.1, redis_port: {redis_port}, redis_timeout: {timeout_ms}"
    return f"""
  - name: limit-conn
    route: main
    config: {{limit: {limit}, per: route, policy: redis, {redis}{more}}}
"""


def opened(port: int) -> socket.socket | None:
    """A session the upstream greeted (held open), or None when pyproxy refused it."""
    sock = connect(port)
    if recv_line(sock) == b"up\n":
        return sock
    sock.close()
    return None


@pytest.mark.parametrize("nested", [False, True], ids=["redis_host", "redis.host"])
def test_two_instances_share_one_connection_limit(fleet, upstreams, redis, nested):
    server = redis()
    up = upstreams(tag_handler, name="up")
    ports = [free_port(), free_port()]
    instances = fleet(lambda port: config(port, up.port, limit_conn(server.port, 3, nested=nested)), ports)
    held = []
    for i in range(3):                              # a, b, a: three sessions in all, on two instances
        sock = opened(ports[i % 2])
        assert sock is not None, f"session {i} was refused"
        held.append(sock)
    assert opened(ports[1]) is None                 # the 4th is refused wherever it lands
    assert opened(ports[0]) is None
    held.pop(0).close()                             # one ends on instance a…
    wait_until(lambda: (sock := opened(ports[1])) is not None and held.append(sock) is None,
               timeout=5, what="the freed slot to be taken on instance b")
    assert opened(ports[0]) is None                 # …and the limit is full again
    for sock in held:
        sock.close()
    for p in instances:
        assert "reached for main across the fleet" in p.log_text()
        assert DOWN not in p.log_text()


def test_a_crashed_instance_stops_counting_when_its_lease_ends(fleet, upstreams, redis):
    server = redis()
    up = upstreams(tag_handler, name="up")
    ports = [free_port(), free_port()]
    doomed, _ = fleet(lambda port: config(port, up.port, limit_conn(server.port, 2), workers=1), ports)
    held = [opened(ports[0]), opened(ports[0])]
    assert all(held) and opened(ports[1]) is None
    for pid in [*doomed.worker_pids(), doomed.pid]:  # no log phase, no goodbye to Redis
        os.kill(pid, signal.SIGKILL)
    killed = time.monotonic()
    for sock in held:
        sock.close()
    wait_until(lambda: (sock := opened(ports[1])) is not None and sock.close() is None, timeout=10,
               interval=0.2, what="the crashed instance's sessions to stop counting")
    assert 3 < time.monotonic() - killed < 8         # the lease (5 s) ended, not before


@pytest.mark.parametrize("nested", [False, True], ids=["redis_host", "redis.host"])
def test_two_instances_share_one_rate_limit(fleet, upstreams, redis, nested):
    server = redis()
    up = upstreams(tag_handler, name="up")
    ports = [free_port(), free_port()]
    where = (f"redis: {{host: 127.0.0.1, port: {server.port}}}" if nested else
             f"redis_host: 127.0.0.1, redis_port: {server.port}")
    plugin = f"""
  - name: rate-limit
    config: {{rate: 1, burst: 4, per: ip, policy: redis, {where}}}
"""
    fleet(lambda port: config(port, up.port, plugin), ports)
    started = time.monotonic()
    results = []
    for i in range(10):
        sock = opened(ports[i % 2])
        results.append(sock is not None)
        if sock is not None:
            sock.close()
    assert time.monotonic() - started < 0.9          # all within the first second
    assert results == [True] * 4 + [False] * 6       # one bucket of 4 for both instances
    time.sleep(1.2)
    assert opened(ports[1]) is not None             # a token back after a second


def test_redis_killed_under_traffic_then_back(proxy, upstreams, redis):
    """Redis dies: sessions keep flowing, limited per instance, and the log says so once; it comes
    back: the log says so once, and the sessions held meanwhile count across the fleet again."""
    server = redis()
    up = upstreams(tag_handler, name="up")
    port = free_port()
    p = proxy(config(port, up.port, limit_conn(server.port, 2, timeout_ms=500), workers=1))
    first = opened(port)
    assert first is not None
    server.stop()
    held = [opened(port) for _ in range(3)]          # the first after the kill finds the connection dead
    assert [sock is not None for sock in held] == [True, False, False]   # local limit: 2 with `first`
    p.wait_log(DOWN)
    first.close()
    wait_until(lambda: (sock := opened(port)) is not None and held.append(sock) is None, timeout=5,
               what="a slot freed locally while redis is down")
    assert p.log_text().count(DOWN) == 1

    server = redis(server.port)                      # a new, empty Redis on the same port
    p.wait_log(BACK, timeout=5)
    # This worker's two sessions, admitted while Redis was away, are counted in the new one.
    held = [sock for sock in held if sock is not None]
    assert len(held) == 2
    wait_until(lambda: _count(server) == 2, timeout=5, what="the held sessions counted in the new Redis")
    assert opened(port) is None
    held.pop().close()
    wait_until(lambda: _count(server) == 1, timeout=5, what="the ended session to stop counting in Redis")
    assert opened(port) is not None
    assert p.log_text().count(DOWN) == 1 and p.log_text().count(BACK) == 1
    for sock in held:
        sock.close()


def _count(server: RedisServer) -> int:
    """The sessions Redis counts for the route `main`, all instances together."""
    return sum(int(n) for n in server.cli("HVALS", "pyproxy:limit-conn:route:main:main:n").split())


def test_redis_that_never_answers_costs_the_limited_session_its_timeout_and_others_nothing(
        proxy, upstreams):
    """A Redis that accepts and reads but never replies: the first session on the limited route
    waits redis_timeout, then is decided locally; a session on an unlimited route meanwhile is
    served at once; later sessions on the limited route no longer wait."""
    mute = socket.socket()
    mute.bind(("127.0.0.1", 0))
    mute.listen(16)
    stop = threading.Event()
    accepted: list[socket.socket] = []

    def swallow():
        mute.settimeout(0.1)
        while not stop.is_set():
            try:
                conn, _ = mute.accept()
                accepted.append(conn)
            except OSError:
                continue
            for conn in accepted:
                conn.setblocking(False)
                try:
                    while conn.recv(65536):
                        pass
                except OSError:
                    pass

    thread = threading.Thread(target=swallow, daemon=True)
    thread.start()
    try:
        up = upstreams(tag_handler, name="up")
        port, free = free_port(), free_port()
        other = f"""
      - name: other
        protocols: [tcp]
        destinations: [{{port: {free}}}]
plugins:"""
        text = config(port, up.port, limit_conn(mute.getsockname()[1], 5, timeout_ms=800), workers=1)
        listeners = f"[127.0.0.1:{port}, 127.0.0.1:{free}]"
        p = proxy(text.replace("plugins:", other).replace(f"[127.0.0.1:{port}]", listeners))
        result: dict[str, float] = {}

        def limited():
            started = time.monotonic()
            sock = opened(port)
            result["limited"] = time.monotonic() - started
            assert sock is not None
            sock.close()

        waiting = threading.Thread(target=limited)
        waiting.start()
        time.sleep(0.2)                               # the limited session now waits on Redis
        started = time.monotonic()
        sock = opened(free)
        assert sock is not None and time.monotonic() - started < 0.3    # served while the other waits
        sock.close()
        waiting.join(10)
        assert 0.7 < result["limited"] < 1.6         # redis_timeout (800 ms), then the local verdict
        started = time.monotonic()
        sock = opened(port)
        assert sock is not None and time.monotonic() - started < 0.3    # down now: decided locally at once
        sock.close()
        log = p.wait_log(DOWN)
        assert "no answer within redis_timeout 800ms" in log and log.count(DOWN) == 1
    finally:
        stop.set()
        thread.join(5)
        for conn in accepted:
            conn.close()
        mute.close()


def test_sessions_keep_flowing_while_redis_is_killed_under_load(upstreams, redis, proxy):
    """Three clients open sessions back to back through two workers, both limits on Redis (far
    from full); Redis is killed halfway: every session is still served, none waits longer than
    redis_timeout, and each worker says once that it counts locally."""
    server = redis()
    up = upstreams(tag_handler, name="up")
    port = free_port()
    plugins = limit_conn(server.port, 1000, timeout_ms=500) + f"""
  - name: rate-limit
    config: {{rate: 10000, per: ip, policy: redis, redis_host: 127.0.0.1, redis_port: {server.port},
              redis_timeout: 500}}
"""
    p = proxy(config(port, up.port, plugins, workers=2))
    served, slowest, done = [], [0.0], threading.Event()

    def client():
        while not done.is_set():
            started = time.monotonic()
            sock = opened(port)
            slowest[0] = max(slowest[0], time.monotonic() - started)
            served.append(sock is not None)
            if sock is not None:
                sock.close()

    threads = [threading.Thread(target=client) for _ in range(3)]
    for thread in threads:
        thread.start()
    try:
        wait_until(lambda: len(served) >= 150, what="sessions through Redis")
        server.stop()
        count = len(served)
        wait_until(lambda: len(served) >= count + 150, what="sessions after the kill")
    finally:
        done.set()
        for thread in threads:
            thread.join(10)
    assert all(served) and slowest[0] < 1.0
    assert 1 <= p.log_text().count(DOWN) <= 2          # once per worker that had sessions meanwhile


def test_redis_over_tls(proxy, upstreams, tmp_path):
    from tests.support import make_cert

    server = RedisServer(None, tls=make_cert(tmp_path, "redis.test", ["redis.test"])).start()
    try:
        up = upstreams(tag_handler, name="up")
        port = free_port()
        p = proxy(config(port, up.port, limit_conn(server.port, 1).replace(
            "redis_timeout:", "redis_ssl: true, redis_timeout:"), workers=1))
        held = opened(port)
        assert held is not None and opened(port) is None
        held.close()
        assert "reached for main across the fleet" in p.log_text() and DOWN not in p.log_text()
    finally:
        server.stop()


def test_sessions_of_a_draining_generation_still_count_in_redis(proxy, upstreams, redis):
    """A reload starts new workers (new counts in Redis); the old ones, draining, keep renewing the
    leases of the sessions they still hold."""
    server = redis()
    up = upstreams(tag_handler, name="up")
    port = free_port()
    conf = config(port, up.port, limit_conn(server.port, 2), workers=1)
    p = proxy(conf)
    held = [opened(port), opened(port)]
    assert all(held)
    p.reload(conf)
    time.sleep(6)                                     # longer than a lease: only renewals keep them
    assert opened(port) is None                      # the new generation counts the old one's sessions
    held.pop().close()
    wait_until(lambda: (sock := opened(port)) is not None and held.append(sock) is None, timeout=5,
               what="the ended session to stop counting")
    assert opened(port) is None
    for sock in held:
        sock.close()


def with_unlimited_route(text: str, port: int, free: int) -> str:
    """`text` (config()) with a second listener, `free`, whose route `other` no plugin limits."""
    other = f"""
      - name: other
        protocols: [tcp]
        destinations: [{{port: {free}}}]
plugins:"""
    listeners = f"[127.0.0.1:{port}, 127.0.0.1:{free}]"
    return text.replace("plugins:", other).replace(f"[127.0.0.1:{port}]", listeners)


def test_not_fault_tolerant_refuses_the_limited_route_while_redis_is_away(proxy, upstreams, redis):
    """fault_tolerant: false: with Redis stopped the limited route's sessions are refused (status
    500, logged once as unavailable), the unlimited route still serves; Redis back: served again."""
    server = redis()
    up = upstreams(tag_handler, name="up")
    port, free = free_port(), free_port()
    plugin = limit_conn(server.port, 5, timeout_ms=500, nested=True, more=", fault_tolerant: false")
    p = proxy(with_unlimited_route(config(port, up.port, plugin, workers=1), port, free))
    first = opened(port)
    assert first is not None                        # Redis up: served (1 of 5)
    server.stop()
    assert [opened(port) for _ in range(3)] == [None, None, None]   # far below the limit: refused
    served = opened(free)
    assert served is not None                       # no limit there: Redis does not matter
    served.close()
    p.wait_log(DOWN)
    assert "fault_tolerant is false; session refused" in p.log_text()
    statuses = [line.split()[1] for line in p.wait_access(4)]     # `first` is still open
    assert statuses == ["500"] * 3 + ["200"], statuses

    server = redis(server.port)
    p.wait_log(BACK, timeout=5)
    again = opened(port)
    assert again is not None                        # served again once Redis answers
    again.close()
    first.close()
    log = p.log_text()
    assert log.count(DOWN) == 1 and log.count(BACK) == 1


def test_a_bad_key_in_the_redis_record_is_refused_by_t(proxy):
    text = config(free_port(), free_port(), """
  - name: limit-conn
    config: {limit: 3, policy: redis, redis: {hots: 127.0.0.1, port: 6379}}
""")
    result = proxy(text, start=False).run_cli("-t")
    assert result.returncode != 0
    assert "plugins[0].config.redis.hots: unknown key; did you mean 'host'?" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def test_a_kong_file_with_the_redis_record_limits_across_two_instances(tmp_path, upstreams, redis,
                                                                       monkeypatch):
    """A kong.yml as deck dumps a Kong 3.6 limit (`redis: {…}`, the shorthands beside it, equal or
    null), run as is by two pyproxy instances: one limit for both."""
    from tests.integration.test_kong import KongProxy
    server = redis()
    up = upstreams(tag_handler, name="up")
    ports = [free_port(), free_port()]
    monkeypatch.delenv("KONG_STREAM_LISTEN", raising=False)
    instances = []
    try:
        for port in ports:
            folder = tmp_path / str(port)
            folder.mkdir()
            instances.append(KongProxy(folder, f"""_format_version: "3.0"
services:
- name: echo
  protocol: tcp
  host: 127.0.0.1
  port: {up.port}
  routes:
  - name: main
    protocols: [tcp]
    destinations: [{{port: {port}}}]
    plugins:
    - name: limit-conn
      config:
        limit: 2
        per: route
        policy: redis
        fault_tolerant: true
        redis_host: 127.0.0.1
        redis_port: null
        redis_password: null
        redis:
          host: 127.0.0.1
          port: {server.port}
          timeout: 1000
          database: 0
          username: null
          password: null
          ssl: false
          ssl_verify: false
          server_name: null
""").start())
        held = [opened(ports[0]), opened(ports[1])]
        assert all(held)
        assert opened(ports[0]) is None and opened(ports[1]) is None    # 2 in all, on both instances
        assert _count(server) == 2                  # counted in the Redis the record names
        for sock in held:
            sock.close()
        for p in instances:
            assert DOWN not in p.log_text() and "internal error" not in p.log_text()
    finally:
        for p in instances:
            p.stop()


def test_the_admin_api_takes_the_redis_record_and_names_a_bad_key(proxy, upstreams, redis):
    """Kong's Admin API, as a Kong 3.6 user posts a limit: the record works and a typo in it is
    Kong's 400, naming the key."""
    from tests.integration.test_admin import call, settled, start
    server = redis()
    up = upstreams(tag_handler, name="up")
    port = free_port()
    p = start(proxy, port)
    call(p.admin, "POST", "/services", {"name": "svc", "protocol": "tcp", "host": "127.0.0.1",
                                        "port": up.port})
    assert call(p.admin, "POST", "/services/svc/routes",
                {"name": "main", "protocols": ["tcp"], "destinations": [{"port": port}]})[0] == 201
    status, body = call(p.admin, "POST", "/routes/main/plugins", {"name": "limit-conn", "config": {
        "limit": 1, "per": "route", "policy": "redis", "redis": {"hots": "127.0.0.1", "port": server.port}}})
    assert status == 400 and "redis.hots: unknown key; did you mean 'host'?" in body["message"], body
    status, body = call(p.admin, "POST", "/routes/main/plugins", {"name": "limit-conn", "config": {
        "limit": 1, "per": "route", "policy": "redis", "fault_tolerant": False,
        "redis": {"host": "127.0.0.1", "port": server.port}}})
    assert status == 201, body
    wait_until(lambda: settled(p), what="the new generation with the plugin")
    held = opened(port)
    assert held is not None and opened(port) is None   # limit 1…
    assert _count(server) == 1                         # …counted in the Redis the record names
    held.close()
