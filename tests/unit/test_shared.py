"""HealthTable: what one process stores, a process forked later (or earlier) reads."""

from __future__ import annotations

import math
import os

from pyproxy.shared import ADMIN_SLOTS, ADMIN_UNHEALTHY, HealthTable


def test_stored_health_is_read_back_and_unknown_keys_have_none():
    table = HealthTable()
    table.store("pool\n127.0.0.1:1025", math.inf)
    table.store("pool\n127.0.0.1:1026", 12.5)
    table.store("pool\n127.0.0.1:1026", 0.0)           # the last change wins
    assert table.load("pool\n127.0.0.1:1025") == math.inf
    assert table.load("pool\n127.0.0.1:1026") == 0.0
    assert table.load("pool\n127.0.0.1:1027") is None


def test_keys_sharing_a_slot_never_read_each_others_health():
    table = HealthTable(slots=1)
    table.store("a\n10.0.0.1:80", math.inf)
    table.store("b\n10.0.0.2:80", 5.0)
    assert table.load("a\n10.0.0.1:80") is None         # starts healthy rather than as b
    assert table.load("b\n10.0.0.2:80") == 5.0


def test_a_process_forked_before_the_store_sees_it():
    """The master maps the table before any fork: an old worker stores, a new worker reads."""
    table = HealthTable()
    pid = os.fork()
    if pid == 0:
        table.store("pool\n[::1]:1025", 42.0)
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert table.load("pool\n[::1]:1025") == 42.0


def test_what_the_admin_api_said_of_targets_is_kept_per_key_and_weights_are_forgotten_once_loaded():
    table = HealthTable()
    assert table.told("pool\n10.0.0.1:80") is None and table.admin_version() == 0
    assert table.tell("pool\n10.0.0.1:80", health=ADMIN_UNHEALTHY)
    assert table.tell("pool\n10.0.0.1:80", weight=0)
    assert table.told("pool\n10.0.0.1:80") == (0, ADMIN_UNHEALTHY, 1)
    mark = table.admin_version()
    assert table.tell("pool\n10.0.0.2:80", weight=5)
    table.forget_weights(mark)              # a generation that loaded after version 2 serves
    assert table.told("pool\n10.0.0.1:80") == (-1, ADMIN_UNHEALTHY, 1)     # health is kept
    assert table.told("pool\n10.0.0.2:80") == (5, 0, 0)                    # said after: kept
    # Linear probing: every key keeps its own entry until the table is full.
    keys = [f"pool\n10.1.{i // 250}.{i % 250}:80" for i in range(ADMIN_SLOTS - 2)]
    assert all(table.tell(key, weight=i) for i, key in enumerate(keys))
    assert all(table.told(key) == (i, 0, 0) for i, key in enumerate(keys))
    assert not table.tell("one too many", weight=1)
