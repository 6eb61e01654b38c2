"""HealthTable: what one process stores, a process forked later (or earlier) reads."""

from __future__ import annotations

import math
import os

from pyproxy.shared import HealthTable


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
