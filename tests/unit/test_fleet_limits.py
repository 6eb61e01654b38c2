"""policy: redis as a configuration sees it (checks and messages), the RESP codec, and the worker's
Redis client against a real redis-server, driven by a real pyproxy.loop.Loop."""

from __future__ import annotations

import shutil
import socket
import time
from pathlib import Path

import pytest

from pyproxy.config import load_config
from pyproxy.loop import Loop
from pyproxy.plugins.redis_client import (
    UNAVAILABLE,
    RedisClient,
    ReplyError,
    _Incomplete,
    client_for,
    encode,
    parse,
)
from tests.redis_support import RedisServer
from tests.support import free_port, make_cert
from tests.unit.test_config import MINIMAL, only_error, write

needs_redis = pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs redis-server")


# -- configuration ---------------------------------------------------------------------------------
@pytest.mark.parametrize("config, key, message", [
    ("{limit: 1, policy: cluster}", "policy", "expected one of local, redis, got 'cluster'"),
    ("{limit: 1, policy: redis}", "redis_host", "required with policy: redis"),
    ("{limit: 1, policy: redis, redis_host: ''}", "redis_host", "expected a host name or address, got ''"),
    ("{limit: 1, policy: redis, redis_host: r, redis_port: 70000}", "redis_port",
     "expected an integer from 1 to 65535, got 70000"),
    ("{limit: 1, policy: redis, redis_host: r, redis_timeout: 2s}", "redis_timeout",
     "expected an integer from 1 to 3600000, got '2s'"),
    ("{limit: 1, policy: redis, redis_host: r, redis_database: -1}", "redis_database",
     "expected an integer from 0 to 2147483648, got -1"),
    ("{limit: 1, policy: redis, redis_host: r, redis_password: 12}", "redis_password",
     "expected a string, got 12"),
    ("{limit: 1, policy: redis, redis_host: r, redis_ssl: yes please}", "redis_ssl",
     "expected true or false, got 'yes please'"),
    ("{limit: 1, redis_hots: r}", "redis_hots",
     "unknown key; expected one of limit, per, policy, redis_host, redis_port, redis_username, "
     "redis_password, redis_database, redis_timeout, redis_ssl, redis_ssl_verify, redis_server_name, "
     "fault_tolerant, redis"),
    # Kong 3.6's nested record: the same checks, named where the value is.
    ("{limit: 1, redis: {hots: r}}", "redis.hots", "unknown key; did you mean 'host'?"),
    ("{limit: 1, policy: redis, redis: {host: r, colour: blue}}", "redis.colour",
     "unknown key; expected one of host, port, username, password, database, timeout, ssl, ssl_verify, "
     "server_name"),
    ("{limit: 1, policy: redis, redis: {port: 6379}}", "redis.host", "required with policy: redis"),
    ("{limit: 1, policy: redis, redis: {host: r, port: 70000}}", "redis.port",
     "expected an integer from 1 to 65535, got 70000"),
    ("{limit: 1, policy: redis, redis: {host: r, ssl: maybe}}", "redis.ssl",
     "expected true or false, got 'maybe'"),
    ("{limit: 1, redis: r:6379}", "redis",
     "expected a mapping of host, port, username, password, database, timeout, ssl, ssl_verify, server_name, "
     "got 'r:6379'"),
    ("{limit: 1, policy: redis, redis_port: 6380, redis: {host: r, port: 6379}}", "redis.port",
     "6379 disagrees with redis_port: 6380; give one of the two (redis_* is Kong's older form)"),
    ("{limit: 1, policy: redis, redis_host: r, fault_tolerant: no thanks}", "fault_tolerant",
     "expected true or false, got 'no thanks'"),
])
def test_bad_redis_settings_are_named_where_they_are(tmp_path: Path, config: str, key: str, message: str):
    error = only_error(tmp_path, MINIMAL + f"plugins:\n  - {{name: limit-conn, config: {config}}}\n")
    assert (error.line, error.key, error.message) == (10, f"plugins[0].config.{key}", message)


def test_kong_style_settings_with_nulls_load(tmp_path: Path):
    """What deck writes: every redis_* field, unset ones as null, and policy local beside them."""
    plugins = """plugins:
  - name: rate-limit
    config: {rate: 5, policy: local, redis_host: null, redis_port: 6379, redis_password: null,
             redis_username: null, redis_database: 0, redis_timeout: 2000, redis_ssl: false}
  - name: limit-conn
    config: {limit: 5, policy: redis, redis_host: redis.internal, redis_password: null, redis_ssl: null}
"""
    config = load_config(write(tmp_path, MINIMAL + plugins))
    assert [entry.name for entry in config.plugins] == ["rate-limit", "limit-conn"]


def test_kong_nested_redis_settings_load_and_mean_the_flat_ones(tmp_path: Path):
    """What Kong 3.6 and later write (deck dumps the shorthands too, equal, and nulls)."""
    from pyproxy.plugins import plain
    from pyproxy.plugins.fleet_limits import redis_settings
    plugins = """plugins:
  - name: limit-conn
    config: {limit: 5, policy: redis, fault_tolerant: false, redis_host: redis.internal, redis_port: null,
             redis: {host: redis.internal, port: 6380, timeout: 300, ssl: false, password: null}}
  - name: rate-limit
    config: {rate: 5, policy: redis, redis_host: redis.internal, redis_port: 6380, redis_timeout: 300,
             redis_ssl: false}
"""
    nested, flat = load_config(write(tmp_path, MINIMAL + plugins)).plugins
    assert redis_settings(plain(nested.config)) == redis_settings(plain(flat.config)) == {
        "host": "redis.internal", "port": 6380, "timeout": 300, "ssl": False}


# -- RESP ------------------------------------------------------------------------------------------
def test_commands_are_encoded_as_arrays_of_bulk_strings():
    assert encode(("EVALSHA", "ab", 2, b"k\r\n")) == (
        b"*4\r\n$7\r\nEVALSHA\r\n$2\r\nab\r\n$1\r\n2\r\n$3\r\nk\r\n\r\n")


def test_replies_are_parsed_one_at_a_time_and_incomplete_ones_wait():
    buf = b"+PONG\r\n:1\r\n$-1\r\n-NOSCRIPT No matching script\r\n*2\r\n$3\r\nabc\r\n*1\r\n:-7\r\n$2\r\nhi"
    pos, replies = 0, []
    with pytest.raises(_Incomplete):
        while True:
            reply, pos = parse(buf, pos)
            replies.append(reply)
    assert replies == ["PONG", 1, None, "NOSCRIPT No matching script", [b"abc", [-7]]]
    assert isinstance(replies[3], ReplyError)
    assert parse(buf + b"\r\n", pos) == (b"hi", len(buf) + 2)
    with pytest.raises(ValueError):
        parse(b"?what\r\n", 0)


# -- the client, in a real loop, against a real Redis --------------------------------------------
class Recorder:
    def __init__(self) -> None:
        self.lines: list[tuple[str, str]] = []

    def __call__(self, level: str, message: str) -> None:
        self.lines.append((level, message))


def run_until(loop: Loop, predicate, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        loop.run_once()


@pytest.fixture
def redis_server():
    servers: list[RedisServer] = []

    def make(*args: str) -> RedisServer:
        servers.append(RedisServer(None, *args).start())
        return servers[-1]

    yield make
    for server in servers:
        server.stop()


@needs_redis
def test_a_tick_of_commands_is_answered_in_order(redis_server):
    server = redis_server()
    loop, log = Loop(), Recorder()
    client = RedisClient("127.0.0.1", server.port, 1.0, log)
    replies: list[object] = []
    for i in range(200):                      # one tick: pipelined behind the connection's handshake
        assert client.call(loop, replies.append, "INCRBY", "n", i)
    run_until(loop, lambda: len(replies) == 200)
    assert replies == [sum(range(i + 1)) for i in range(200)]
    assert client.up and log.lines == []
    client.close()
    loop.close()


@needs_redis
def test_credentials_and_database_are_used(redis_server):
    server = redis_server("--requirepass", "s3cret")
    loop, log = Loop(), Recorder()
    client = RedisClient("127.0.0.1", server.port, 1.0, log, password="s3cret", database=3)
    replies: list[object] = []
    client.call(loop, replies.append, "SET", "where", "db3")
    run_until(loop, lambda: replies)
    assert replies == ["OK"] and log.lines == []
    assert server.cli("-a", "s3cret", "--no-auth-warning", "-n", "3", "GET", "where").strip() == "db3"
    client.close()

    wrong = RedisClient("127.0.0.1", server.port, 1.0, log, password="guess")
    wrong.call(loop, replies.append, "GET", "where")
    run_until(loop, lambda: len(replies) == 2)
    assert replies[1] is UNAVAILABLE          # refused: the caller decides locally
    assert not wrong.call(loop, replies.append, "GET", "where")      # and from now on at once
    ((level, message),) = log.lines
    assert level == "warn" and "WRONGPASS" in message
    assert message.startswith(f"redis 127.0.0.1:{server.port} unavailable")
    wrong.close()
    loop.close()


def test_a_name_that_does_not_resolve_leaves_the_limits_local_and_says_so_once():
    loop, log = Loop(), Recorder()
    client = RedisClient("no-such-host.invalid", 6379, 1.0, log)
    assert not client.call(loop, print, "PING")
    assert not client.call(loop, print, "PING")
    ((level, message),) = log.lines
    assert level == "warn" and "cannot resolve no-such-host.invalid" in message
    client.close()
    loop.close()


@needs_redis
def test_a_refused_connection_is_retried_in_the_background_and_its_return_logged_once():
    port = free_port()
    loop, log = Loop(), Recorder()
    client = RedisClient("127.0.0.1", port, 0.5, log)
    replies: list[object] = []
    client.call(loop, replies.append, "PING")
    run_until(loop, lambda: log.lines)
    assert replies in ([], [UNAVAILABLE])
    server = RedisServer(port).start()
    try:
        run_until(loop, lambda: client.up, timeout=5)       # the probe got in
        assert client.call(loop, replies.append, "PING")
        run_until(loop, lambda: replies[-1:] == ["PONG"])
        assert [level for level, _ in log.lines] == ["warn", "notice"]
        assert "answers again" in log.lines[1][1]
    finally:
        server.stop()
        client.close()
        loop.close()


@needs_redis
def test_a_redis_that_answers_ping_and_refuses_every_command_is_logged_once(redis_server):
    """A read-only replica: each reconnection's PING passes, every write is refused. One line,
    not a return and a failure every second."""
    server = redis_server("--replicaof", "127.0.0.1", str(free_port()))
    loop, log = Loop(), Recorder()
    client = RedisClient("127.0.0.1", server.port, 1.0, log)
    replies: list[object] = []
    deadline = time.monotonic() + 3.5                    # three reconnections at least
    while time.monotonic() < deadline:
        client.call(loop, replies.append, "INCR", "n")
        loop.run_once()
    assert replies.count(UNAVAILABLE) >= 3
    ((level, message),) = log.lines
    assert level == "warn" and "READONLY" in message
    client.close()
    loop.close()


def test_a_connection_dropped_mid_command_answers_what_waits_and_is_logged_once():
    """A server that reads the first command and closes without a reply."""
    listener = socket.create_server(("127.0.0.1", 0))
    loop, log = Loop(), Recorder()
    client = RedisClient("127.0.0.1", listener.getsockname()[1], 2.0, log)
    replies: list[object] = []
    client.call(loop, replies.append, "GET", "a")
    client.call(loop, replies.append, "GET", "b")
    listener.settimeout(5)
    conn, _ = listener.accept()
    conn.settimeout(0.05)
    received = b""
    while b"GET" not in received:            # the loop sends; the server reads the commands…
        loop.run_once()
        try:
            received += conn.recv(1024)
        except TimeoutError:
            pass
    conn.close()                             # …and hangs up without a word
    started = time.monotonic()
    run_until(loop, lambda: len(replies) == 2)
    assert replies == [UNAVAILABLE, UNAVAILABLE] and time.monotonic() - started < 1.0    # not the timeout
    ((level, message),) = log.lines
    assert level == "warn" and "connection closed by redis" in message
    assert not client.call(loop, replies.append, "GET", "c")
    client.close()
    loop.close()
    listener.close()


@needs_redis
def test_redis_over_tls_with_and_without_checking_its_certificate(tmp_path):
    cert = make_cert(tmp_path, "redis.test", ["redis.test"])
    server = RedisServer(None, tls=cert).start()
    try:
        loop, log = Loop(), Recorder()
        # Kong's default: TLS without checking the certificate.
        client = client_for("127.0.0.1", server.port, 1.0, log, None, None, 0, tls=True)
        replies: list[object] = []
        for _ in range(50):
            client.call(loop, replies.append, "INCR", "tls")
        run_until(loop, lambda: len(replies) == 50)
        assert replies == list(range(1, 51)) and log.lines == []
        client.close()
        # Checked against the system's CAs, which do not know this self-signed certificate.
        checked = client_for("127.0.0.1", server.port, 1.0, log, None, None, 0, tls=True, verify=True,
                             server_name="redis.test")
        checked.call(loop, replies.append, "INCR", "tls")
        run_until(loop, lambda: len(replies) == 51)
        assert replies[-1] is UNAVAILABLE
        ((level, message),) = log.lines
        assert level == "warn" and "TLS handshake: CERTIFICATE_VERIFY_FAILED" in message
        checked.close()
        loop.close()
    finally:
        server.stop()
