"""State shared by every worker: anonymous shared memory the master maps once, before any fork.

SO_REUSEPORT spreads one client's connections over all workers, so a per-client limit must be
counted across them (nginx's `limit_conn_zone`, `limit_req_zone`). Two shapes:

- `CounterRows`: rows × slots of int64 counters. Each worker process owns one row and is the only
  writer of it, so counting needs no lock; a reader sums a slot over all rows. When a worker dies
  the master zeroes its row, so the sessions it took with it stop counting.
- `RateTable`: one float per slot (GCRA's "theoretical arrival time", the token bucket expressed as
  a single timestamp) updated under one process-shared lock. The lock is only ever held for a few
  instructions; a worker that cannot get it within 10 ms lets the session through and says so,
  rather than stall (a worker killed while holding it must not freeze the others).

- `Heartbeats`: one timestamp per row, stored by the row's worker every second and read by the
  master, which kills a worker whose heartbeat stopped (gunicorn's WorkerTmp, without its fchmod:
  a beat is one store to memory, no syscall).
- `HealthTable`: each target's health as a worker last changed it (down until when, or healthy),
  which the next generation's workers start from instead of believing every target healthy; and
  what the Admin API said of a target (healthy, unhealthy, a new weight), which every worker applies
  within a second, without a reload.
- `AddressTable`: the addresses of the host names the master follows (pyproxy.dns), which the
  workers' balancers read again when its generation counter moves.

Keys are hashed into a fixed number of slots: two keys that collide share a count, which can only
make a limit stricter, never looser. The tables live as long as the master, across reloads, so
sessions of draining workers still count against the new generation's limits, and a target the old
generation found down is still down for the new one.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import multiprocessing
import time
import zlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pyproxy.config.model import Record

SLOTS = 4096
ROWS = 256                 # worker processes alive at once, all generations together
ADDRESS_TABLE_SIZE = 16 << 20    # bytes; pages are only used once written
ADMIN_SLOTS = 1024         # target addresses the Admin API may have said something of
ADMIN_FIELDS = 5
ADMIN_HEALTHY, ADMIN_UNHEALTHY = 1, 2
ADMIN_LOCK_WAIT = 0.05


def slot_of(key: str, slots: int = SLOTS) -> int:
    """A slot every process computes the same way (Python's hash() is randomized per process)."""
    return zlib.crc32(key.encode("utf-8", "surrogateescape")) % slots


class CounterRows:
    """Per-process rows of counters; `add` writes this process's row, `total` reads all rows."""

    def __init__(self, rows: int = ROWS, slots: int = SLOTS):
        self.rows, self.slots = rows, slots
        self._memory = mmap.mmap(-1, rows * slots * 8)          # MAP_SHARED | MAP_ANONYMOUS
        self.view = memoryview(self._memory).cast("q")
        self.base = -1          # start of this process's row; -1 until claim()

    def claim(self, row: int) -> None:
        """In a worker: from now on this process writes row `row` (given by the master)."""
        self.base = row * self.slots

    def add(self, slot: int, n: int) -> None:
        if self.base >= 0:
            self.view[self.base + slot] += n

    def total(self, slot: int) -> int:
        return sum(self.view[slot::self.slots])

    def clear_row(self, row: int) -> None:
        """In the master, after the row's worker exited: its sessions are gone."""
        start = row * self.slots
        self.view[start:start + self.slots] = memoryview(bytes(self.slots * 8)).cast("q")


class RateTable:
    """Token buckets as GCRA timestamps, one per slot, shared by all workers."""

    def __init__(self, slots: int = SLOTS):
        self.slots = slots
        self._memory = mmap.mmap(-1, slots * 8)
        self.view = memoryview(self._memory).cast("d")
        self.lock = multiprocessing.Lock()

    def admit(self, slot: int, rate: float, burst: int, now: float | None = None) -> bool | None:
        """True if a new session fits `rate` per second with up to `burst` at once, False if not,
        None if the lock was not had in time (the caller lets the session through)."""
        if now is None:
            now = time.monotonic()          # CLOCK_MONOTONIC: one clock for every process
        interval = 1.0 / rate
        tolerance = (burst - 1) * interval
        if not self.lock.acquire(timeout=0.01):
            return None
        try:
            arrival = max(self.view[slot], now)
            if arrival - now > tolerance:
                return False
            self.view[slot] = arrival + interval
            return True
        finally:
            self.lock.release()


class Heartbeats:
    """CLOCK_MONOTONIC timestamps, one per row: `beat` in a worker, `age` in the master. An aligned
    8-byte store is atomic on every platform Linux runs CPython on: no lock."""

    def __init__(self, rows: int = ROWS):
        self._memory = mmap.mmap(-1, rows * 8)
        self.view = memoryview(self._memory).cast("d")

    def beat(self, row: int, now: float) -> None:
        if row >= 0:
            self.view[row] = now

    def age(self, row: int, now: float) -> float:
        """Seconds since the row's last beat."""
        return now - self.view[row]


class HealthTable:
    """Targets' health by a hash of (upstream, target address), as the workers last changed it.

    A worker stores every change it makes (taken out until a CLOCK_MONOTONIC time, or until an active
    check passes: inf; back in: 0.0); the balancers of a new worker start from what is stored. It is
    HAProxy's server-state-file, kept in memory rather than written at each reload. Within a
    generation each worker still keeps its own view: nothing is read on the session path.

    A slot holds a 64-bit tag of its key besides the state, so two keys that share a slot never read
    each other's health: the one that stored last owns the slot, the other starts healthy. The pair
    is written and read under one process-shared lock (changes are rare; a worker that cannot get it
    within 10 ms skips the store, or starts the target healthy, rather than stall).
    """

    def __init__(self, slots: int = SLOTS):
        self.slots = slots
        self._memory = mmap.mmap(-1, slots * 16)
        self.tags = memoryview(self._memory)[:slots * 8].cast("Q")
        self.until = memoryview(self._memory)[slots * 8:].cast("d")
        self._admin_memory = mmap.mmap(-1, (1 + ADMIN_SLOTS * ADMIN_FIELDS) * 8)
        self.admin = memoryview(self._admin_memory).cast("q")
        self.lock = multiprocessing.Lock()

    @staticmethod
    def key(upstream: str, address: str) -> str:
        """What a target address's health is kept under: its upstream's name and `ip:port`."""
        return f"{upstream}\n{address}"

    def _place(self, key: str) -> tuple[int, int]:
        digest = hashlib.blake2b(key.encode("utf-8", "surrogateescape"), digest_size=8).digest()
        tag = int.from_bytes(digest, "little") | 1            # never 0: an empty slot
        return tag % self.slots, tag

    def store(self, key: str, down_until: float) -> None:
        slot, tag = self._place(key)
        if not self.lock.acquire(timeout=0.01):
            return
        try:
            self.tags[slot] = tag
            self.until[slot] = down_until
        finally:
            self.lock.release()

    def load(self, key: str) -> float | None:
        """What was stored for `key`, or None (never stored, or the slot was taken by another key)."""
        slot, tag = self._place(key)
        if not self.lock.acquire(timeout=0.01):
            return None
        try:
            return self.until[slot] if self.tags[slot] == tag else None
        finally:
            self.lock.release()

    # -- what the Admin API said ------------------------------------------------------------------
    # ADMIN_SLOTS entries found by linear probing (never lost to a collision), each ADMIN_FIELDS
    # int64: a key's tag, the weight it was given (-1: none) and the version it was given at, its
    # health (ADMIN_HEALTHY, ADMIN_UNHEALTHY; 0: none said) and the version that was said at.
    # admin[0] is the version: it counts every change. The lock is the health's; one not had within
    # ADMIN_LOCK_WAIT (a process killed holding it) is a store not made, a read that finds nothing.

    def admin_version(self) -> int:
        return self.admin[0]

    def tell(self, key: str, weight: int | None = None, health: int | None = None) -> bool:
        """Store what the Admin API said of `key` (in the admin process); False if it could not."""
        tag = self._admin_tag(key)
        if not self.lock.acquire(timeout=ADMIN_LOCK_WAIT):
            return False
        try:
            base = self._admin_entry(tag, insert=True)
            if base < 0:
                return False
            version = self.admin[0] + 1
            if self.admin[base] != tag:               # a new entry: nothing said yet
                self.admin[base], self.admin[base + 1], self.admin[base + 3] = tag, -1, 0
            if weight is not None:
                self.admin[base + 1], self.admin[base + 2] = weight, version
            if health is not None:
                self.admin[base + 3], self.admin[base + 4] = health, version
            self.admin[0] = version
            return True
        finally:
            self.lock.release()

    def told(self, key: str) -> tuple[int, int, int] | None:
        """(weight or -1, health or 0, the version the health was said at) for `key`, or None."""
        tag = self._admin_tag(key)
        if not self.lock.acquire(timeout=ADMIN_LOCK_WAIT):
            return None
        try:
            base = self._admin_entry(tag, insert=False)
            if base < 0:
                return None
            return self.admin[base + 1], self.admin[base + 3], self.admin[base + 4]
        finally:
            self.lock.release()

    def forget_weights(self, upto: int) -> None:
        """In the master, before a reload's loader reads the configuration: the weights said until
        version `upto` are in it (the Admin API wrote them to its state first)."""
        if not self.lock.acquire(timeout=ADMIN_LOCK_WAIT):
            return
        try:
            for base in range(1, 1 + ADMIN_SLOTS * ADMIN_FIELDS, ADMIN_FIELDS):
                if self.admin[base] and self.admin[base + 1] >= 0 and self.admin[base + 2] <= upto:
                    self.admin[base + 1] = -1
        finally:
            self.lock.release()

    def _admin_tag(self, key: str) -> int:
        return self._place(key)[1] & (1 << 62) - 1 | 1        # fits int64, never 0

    def _admin_entry(self, tag: int, insert: bool) -> int:
        for probe in range(ADMIN_SLOTS):
            base = 1 + (tag + probe) % ADMIN_SLOTS * ADMIN_FIELDS
            held = self.admin[base]
            if held == tag:
                return base
            if held == 0:
                return base if insert else -1
        return -1


class AddressTable:
    """Every followed name's records in shared memory, behind a generation counter (a seqlock).

    Layout: int64 generation (odd while the master writes), int64 length, then the records as JSON
    ({name: [[ip, port, weight], …]}). The master maps it before forking; readers copy it out and
    check that the generation did not move meanwhile."""

    def __init__(self, size: int = ADDRESS_TABLE_SIZE):
        self._memory = mmap.mmap(-1, size)
        self.size = size
        self.header = memoryview(self._memory)[:16].cast("q")
        # The last read, in this process: every balancer of a worker reads the same change.
        self._last: tuple[int, dict[str, tuple[Record, ...]]] = (0, {})

    def publish(self, entries: dict[str, tuple[Record, ...]]) -> bool:
        """In the master: replace the table's content; False when it does not fit."""
        data = json.dumps(entries, separators=(",", ":")).encode()
        if len(data) > self.size - 16:
            return False
        generation = self.header[0]
        self.header[0] = generation + 1
        self.header[1] = len(data)
        self._memory[16:16 + len(data)] = data
        self.header[0] = generation + 2
        return True

    def read(self) -> tuple[int, dict[str, tuple[Record, ...]]] | None:
        """(generation, entries), or None while the master is writing (read again later)."""
        generation = self.header[0]
        if generation == self._last[0]:
            return self._last
        if generation & 1:
            return None
        length = self.header[1]
        data = self._memory[16:16 + length]
        if self.header[0] != generation:
            return None
        self._last = (generation, {name: tuple((ip, port, weight) for ip, port, weight in records)
                                   for name, records in json.loads(data).items()} if data else {})
        return self._last


class SharedState:
    """Everything the master maps for its workers, and the row bookkeeping for CounterRows."""

    def __init__(self) -> None:
        self.conns = CounterRows()
        self.rates = RateTable()
        self.beats = Heartbeats()
        self.health = HealthTable()
        self.dns = AddressTable()
        self.free_rows = list(range(ROWS - 1, -1, -1))

    def take_row(self) -> int:
        """A row for a worker about to be forked; -1 when all are in use (then its sessions are not
        counted, which the worker logs: only with more than ROWS worker processes alive)."""
        return self.free_rows.pop() if self.free_rows else -1

    def release_row(self, row: int) -> None:
        if row >= 0:
            self.conns.clear_row(row)
            self.free_rows.append(row)
