"""Fleet mode: `admin_state: postgres://…` keeps the Admin API's entities in PostgreSQL, as Kong's
traditional mode does, and every instance sharing the database follows them.

The schema, created when missing (under an advisory lock, so instances starting together agree):
one table holding one row, the whole document and its version (SCHEMA below). The connection is the
admin process's, never a worker's.

- At start, the entities are those of the local cache (the StateFile's path, which the master's
  reloads read), then the database's as soon as it answers.
- A write (`commit`) is checked like a file first (`StateFile.loaded`); then, in one transaction,
  the row is locked, its version must still be this instance's (else another instance wrote
  meanwhile: `Stale`, and the request is answered again on the newer entities), the document is
  replaced, the version raised and `pyproxy_admin_state` notified. The cache follows the commit.
- Every instance LISTENs on that channel; a notification, and a check every CHECK_EVERY (the
  safety net), compare the row's version with this instance's. A newer document is checked like a
  file (one that does not load here is logged and skipped, the last good kept), written to the
  cache, and the master reloads.
- The database unreachable: the entities stay the cache's (a restart during an outage comes back
  with them, and says so), reads answer from them, writes are refused with a 503 in Kong's shape
  (`database error`), and the connection is tried again every CHECK_EVERY.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg.types.json import Json

from pyproxy.config.validate import redacted
from pyproxy.log import ErrorLog
from pyproxy.loop import EPOLLIN, Loop
from pyproxy.shared import HealthTable

from .entities import ApiError
from .state import ORDER, Document, Stale, StateFile, unlink_if_there

TABLE = "pyproxy_admin_state"       # and the channel a change is notified on
HEALTH = "pyproxy_admin_health"     # the channel `healthy`/`unhealthy` are told the fleet on
SCHEMA = (f"CREATE TABLE IF NOT EXISTS {TABLE} ("
          "id smallint PRIMARY KEY CHECK (id = 1), "   # one row
          "version bigint NOT NULL, "                   # raised by one at each change
          "document json NOT NULL, "                    # {services: [...], routes: [...], ...}
          "updated_at timestamptz NOT NULL DEFAULT now())")
CHECK_EVERY = 1.0
# libpq's settings unless the URL has its own: a database that stops answering is given up within
# seconds, and holds the admin process no longer.
CONNECTION = {"connect_timeout": "2", "tcp_user_timeout": "5000", "keepalives": "1",
              "keepalives_idle": "5", "keepalives_interval": "2", "keepalives_count": "2",
              "application_name": "pyproxy admin"}
Connection = psycopg.Connection[tuple[object, ...]]


class DatabaseState(StateFile):
    """The entities of a PostgreSQL database, with the file that caches them (`path`)."""

    database = "postgres"

    def __init__(self, url: str, path: str, config_path: str, changed: Callable[[], None], log: ErrorLog,
                 health: HealthTable | None = None):
        super().__init__(path, config_path, changed, log.warn, health)
        self.url = url
        self.log = log
        self.loop: Loop | None = None
        self.conn: Connection | None = None
        self.fd = -1                        # the connection's socket, watched for notifications
        self.version: int | None = None     # the database's version of `document`; None: not read
        self.problem: str | None = None     # why the database is unreachable, while it is

    @property
    def source(self) -> str:
        return redacted(self.url)

    @property
    def reachable(self) -> bool:
        return self.conn is not None

    def start(self, loop: Loop) -> None:
        """The cache's entities, then the database's if it answers; checked every CHECK_EVERY."""
        self.loop = loop
        self.read()
        self.sync()
        if self.conn is None:
            self.log.warn(f"admin: the entities are the last ones {self.source} gave, from {self.path}, "
                          "until it answers")
        loop.call_later(CHECK_EVERY, self.check)

    def check(self) -> None:
        self.sync()
        assert self.loop is not None
        self.loop.call_later(CHECK_EVERY, self.check)

    def refresh(self) -> None:
        self.sync()

    def sync(self, mask: int = 0) -> None:
        """Connect if need be; follow the database's entities if their version is not ours."""
        try:
            conn = self.connect()
            row = conn.execute(f"SELECT version FROM {TABLE} WHERE id = 1").fetchone()
            if row is not None and row[0] != self.version:
                row = conn.execute(f"SELECT version, document FROM {TABLE} WHERE id = 1").fetchone()
                if row is not None:
                    self.follow(row[1], int(str(row[0])))
        except psycopg.Error as exc:
            self.lost(exc)

    def connect(self) -> Connection:
        if self.conn is not None:
            return self.conn
        written = conninfo_to_dict(self.url)
        defaults = {key: value for key, value in CONNECTION.items() if key not in written}
        conn: Connection = psycopg.connect(make_conninfo(self.url, **defaults), autocommit=True)
        try:
            with conn.transaction():
                conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (TABLE,))
                conn.execute(SCHEMA)
                conn.execute(f"INSERT INTO {TABLE} (id, version, document) VALUES (1, 0, '{{}}') "
                             "ON CONFLICT (id) DO NOTHING")
            conn.execute(f"LISTEN {TABLE}")
            conn.execute(f"LISTEN {HEALTH}")
            # A change's notification only wakes `sync`, which reads the version; a health one is
            # heard when psycopg reads it, during a query.
            conn.add_notify_handler(self.heard)
        except BaseException:
            conn.close()
            raise
        self.conn, self.fd = conn, conn.fileno()
        if self.loop is not None:
            self.loop.add(self.fd, EPOLLIN, self.sync)
        self.log.notice(f"admin: entities in {self.source}" if self.problem is None
                        else f"admin: {self.source} answers again")
        self.problem = None
        return conn

    def tell_health(self, upstream: str, addresses: list[tuple[str, int]], healthy: bool) -> None:
        """Told to this instance's workers, then to the fleet's (as Kong broadcasts it to its cluster):
        `upstream`, the state and the addresses on HEALTH. Not told further while the database is
        unreachable (this instance's workers have it)."""
        super().tell_health(upstream, addresses, healthy)
        if self.conn is None:
            return
        told = "\n".join([upstream, "healthy" if healthy else "unhealthy",
                          *(f"{ip} {port}" for ip, port in addresses)])
        try:
            self.conn.execute("SELECT pg_notify(%s, %s)", (HEALTH, told))
        except psycopg.Error as exc:
            self.lost(exc)

    def heard(self, notify: psycopg.Notify) -> None:
        """Another instance's `healthy`/`unhealthy`: told to this one's workers."""
        if notify.channel != HEALTH or self.conn is None or notify.pid == self.conn.info.backend_pid:
            return
        upstream, state, *addresses = notify.payload.split("\n")
        pairs = [(ip, int(port)) for ip, _, port in (address.partition(" ") for address in addresses)]
        try:
            super().tell_health(upstream, pairs, state == "healthy")
        except ApiError as exc:
            self.log.error(f"admin: {state!r} told by another instance for {upstream!r}: "
                           f"{exc.body.get('message')}")

    def lost(self, exc: psycopg.Error) -> None:
        """The connection failed: closed, and said once until the database answers again."""
        problem = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        if self.conn is not None:
            if self.loop is not None:
                self.loop.remove(self.fd)
            self.conn.close()
            self.conn, self.fd = None, -1
        if self.problem is None:
            self.log.error(f"admin: {self.source} is unreachable ({problem}): the last entities it gave "
                           "keep serving, changes are refused until it answers")
        self.problem = problem

    def follow(self, value: object, version: int) -> None:
        """Another instance's change (or the database's entities at start): the state if the
        configuration loads with it, else logged and skipped."""
        document: Document = {kind: [] for kind in ORDER}
        if isinstance(value, dict):
            document.update((kind, value[kind]) for kind in ORDER if isinstance(value.get(kind), list))
        self.version = version
        if document == self.document:
            return
        try:
            temporary, config = self.loaded(document, None)
        except ApiError as exc:
            self.log.error(f"admin: the entities of {self.source} (version {version}) do not load here, "
                           f"the last good ones keep serving: {exc.body.get('message')}")
            return
        try:
            os.replace(temporary, self.path)
        except BaseException:
            unlink_if_there(temporary)
            raise
        self.adopted(document, config)
        self.log.notice(f"admin: entities of {self.source} version {version} followed")

    def publish(self, candidate: Document) -> None:
        """In one transaction: the row locked, still at our version, replaced and notified."""
        conn = self.conn
        if conn is None or self.version is None:
            raise unavailable(self.problem or "not connected yet")
        try:
            with conn.transaction():
                row = conn.execute(f"SELECT version FROM {TABLE} WHERE id = 1 FOR UPDATE").fetchone()
                if row is None or row[0] != self.version:
                    raise Stale()
                conn.execute(f"UPDATE {TABLE} SET document = %s, version = version + 1, updated_at = now() "
                             "WHERE id = 1", (Json(candidate),))
                conn.execute("SELECT pg_notify(%s, %s)", (TABLE, str(self.version + 1)))
        except psycopg.Error as exc:
            self.lost(exc)
            raise unavailable(self.problem or "") from None
        self.version += 1


def unavailable(problem: str) -> ApiError:
    """Kong's `database error` (code 8), as a 503: the change was not made, try again later."""
    return ApiError(503, {"code": 8, "name": "database error",
                          "message": f"the database is unreachable, changes are refused until it answers: "
                                     f"{problem}"})
