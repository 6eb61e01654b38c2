"""The event loop on a real epoll: timers fire in order, cancel works, a raising callback is contained."""

from __future__ import annotations

import socket

import pytest

from pyproxy.loop import EPOLLIN, Loop


def test_timers_fire_in_deadline_order_and_cancel_skips():
    loop = Loop()
    fired = []
    loop.call_later(0.03, lambda: fired.append("late"))
    loop.call_later(0.01, lambda: fired.append("early"))
    loop.call_later(0.02, lambda: fired.append("cancelled")).cancel()
    loop.call_later(0.05, loop.stop)
    loop.run()
    assert fired == ["early", "late"]


def test_call_soon_runs_on_the_next_tick_without_waiting():
    loop = Loop()
    seen = []
    loop.call_soon(lambda: seen.append(1))
    loop.run_once()             # poll timeout is 0 while work is queued: no 1 s wait
    assert seen == [1]


def test_a_raising_handler_is_reported_and_the_loop_goes_on():
    loop = Loop()
    errors = []
    loop.on_error = lambda callback, exc: errors.append(exc)
    a, b = socket.socketpair()
    c, d = socket.socketpair()
    got = []

    def broken(mask):
        a.recv(10)
        raise RuntimeError("bug")

    loop.add(a.fileno(), EPOLLIN, broken)
    loop.add(c.fileno(), EPOLLIN, lambda mask: got.append(c.recv(10)))
    loop.call_soon(lambda: 1 / 0)
    b.send(b"x")
    d.send(b"y")
    loop.run_once()
    assert got == [b"y"]                          # the other handler still ran
    assert sorted(type(e).__name__ for e in errors) == ["RuntimeError", "ZeroDivisionError"]
    for s in (a, b, c, d):
        s.close()


def test_without_an_error_hook_exceptions_propagate():
    loop = Loop()
    loop.call_soon(lambda: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        loop.run_once()


def test_removed_fd_is_not_dispatched_later_in_the_same_batch():
    loop = Loop()
    a, b = socket.socketpair()
    c, d = socket.socketpair()
    calls = []

    def first(mask):
        calls.append("first")
        loop.remove(c.fileno())                  # a session closing its other socket mid-batch

    loop.add(a.fileno(), EPOLLIN, first)
    loop.add(c.fileno(), EPOLLIN, lambda mask: calls.append("second"))
    b.send(b"x")
    d.send(b"y")
    loop.run_once()
    assert calls in (["first"], ["second", "first"])
    for s in (a, b, c, d):
        s.close()


def test_cancelled_timers_release_their_callbacks_and_the_heap_is_compacted():
    import gc
    import weakref

    class Owner:
        def fire(self):
            raise AssertionError("a cancelled timer fired")

    loop = Loop()
    owners = [Owner() for _ in range(5000)]
    refs = [weakref.ref(o) for o in owners]
    timers = [loop.call_later(60, o.fire) for o in owners]
    keep = loop.call_later(60, lambda: None)
    for t in timers:
        t.cancel()
    del owners, timers
    gc.collect()
    assert all(r() is None for r in refs)          # nothing keeps a closed session alive
    assert len(loop.timers) < 2500                 # and the heap does not hold 5000 dead entries
    assert any(entry[2] is keep for entry in loop.timers)


def test_a_callback_cancelling_many_timers_does_not_confuse_the_run():
    loop = Loop()
    fired = []
    later = [loop.call_later(0.001, lambda i=i: fired.append(i)) for i in range(3000)]

    def cancel_most():
        for t in later[1:]:
            t.cancel()                             # triggers a heap rebuild mid-run
    loop.call_later(0.0, cancel_most)
    loop.call_later(0.02, loop.stop)
    loop.run()
    assert fired == [0]
