"""A worker's event loop: one epoll, a timer heap and a queue of work to finish on the next tick.

Why `select.epoll` and not `selectors.EpollSelector`: the selectors wrapper cannot ask for
edge-triggered events (EPOLLET) nor EPOLLRDHUP, and it wraps every event in a key object. Sessions
register each socket once, edge-triggered, for their whole life, and keep the readiness they were told
about in plain flags, so forwarding costs no epoll_ctl calls at all (nginx does the same).

Timers are lazy: a session keeps one timer and, when it fires, re-arms it if its activity moved the
deadline on. Activity itself costs one float assignment, never a heap operation.
"""

from __future__ import annotations

import heapq
import itertools
import select
import time
from collections import deque
from collections.abc import Callable

EPOLLIN = select.EPOLLIN
EPOLLOUT = select.EPOLLOUT
EPOLLERR = select.EPOLLERR
EPOLLHUP = select.EPOLLHUP
EPOLLRDHUP = select.EPOLLRDHUP
EPOLLET = select.EPOLLET

# A stream socket's registration for life: readable, writable, peer half-close, edge-triggered.
STREAM_EVENTS = EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET


class Timer:
    """A cancellable one-shot callback; `cancel()` is O(1) (the heap entry is skipped when it pops).

    Cancelling drops the callback at once: a closed session's timer may sit in the heap until its
    deadline (read_timeout, 60 s), and must not keep the session alive all that time.
    """

    __slots__ = ("deadline", "callback", "cancelled", "loop")

    def __init__(self, deadline: float, callback: Callable[[], None], loop: Loop):
        self.deadline = deadline
        self.callback: Callable[[], None] | None = callback     # None once cancelled or run
        self.cancelled = False
        self.loop: Loop | None = loop                            # None once cancelled or run

    def cancel(self) -> None:
        loop = self.loop
        if loop is not None:            # neither cancelled nor run yet
            self.cancelled = True
            self.callback = None
            self.loop = None
            loop.timer_cancelled()


class Loop:
    """epoll + timers + call_soon; `now` is the monotonic time of the current tick."""

    def __init__(self, max_events: int = 512):
        self.epoll = select.epoll()
        self.handlers: dict[int, Callable[[int], None]] = {}
        self.timers: list[tuple[float, int, Timer]] = []
        self.cancelled_timers = 0      # cancelled entries still in the heap
        # fds closed while a batch of events is being dispatched: the rest of the batch may hold
        # stale events for them, and a socket accepted in the same batch may reuse the number.
        self.gone: set[int] = set()
        self.soon: deque[Callable[[], None]] = deque()
        self.after_tick: list[Callable[[], None]] = []
        self.seq = itertools.count()
        self.max_events = max_events
        self.now = time.monotonic()
        # epoll_waits so far. Readiness learned after poll N is only reported anew at poll N+1:
        # a socket found empty in this tick stays "nothing new" until the next poll.
        self.polls = 0
        self.running = False
        # Called with (callback, exception) when a callback raises: a bug must cost one session,
        # never the worker and every session it holds.
        self.on_error: Callable[[Callable[..., object], BaseException], None] = _reraise

    # -- file descriptors -------------------------------------------------------------------
    def add(self, fd: int, events: int, handler: Callable[[int], None]) -> None:
        self.epoll.register(fd, events)
        self.handlers[fd] = handler

    def rebind(self, fd: int, handler: Callable[[int], None]) -> None:
        """Give a registered fd's events to another handler: same registration, no syscall."""
        self.handlers[fd] = handler

    def remove(self, fd: int) -> None:
        """Stop watching fd, which stays open (a listening socket that another process keeps)."""
        if self.handlers.pop(fd, None) is not None:
            self.gone.add(fd)
            try:
                self.epoll.unregister(fd)
            except (OSError, ValueError):
                pass

    def forget(self, fd: int) -> None:
        """Stop watching fd because the caller is about to close it: no epoll_ctl, the close takes
        it out of epoll (valid for fds never dup'd, which is every session socket)."""
        if self.handlers.pop(fd, None) is not None:
            self.gone.add(fd)

    # -- time -------------------------------------------------------------------------------
    def call_at(self, deadline: float, callback: Callable[[], None]) -> Timer:
        timer = Timer(deadline, callback, self)
        heapq.heappush(self.timers, (deadline, next(self.seq), timer))
        return timer

    def timer_cancelled(self) -> None:
        """Keep the heap mostly live: when cancelled entries are the majority, rebuild it (O(n),
        amortised O(1) per cancel), so a burst of short sessions cannot grow it for 60 s."""
        self.cancelled_timers += 1
        if self.cancelled_timers > 1024 and self.cancelled_timers * 2 > len(self.timers):
            self.timers = [entry for entry in self.timers if not entry[2].cancelled]
            heapq.heapify(self.timers)
            self.cancelled_timers = 0

    def call_later(self, delay: float, callback: Callable[[], None]) -> Timer:
        return self.call_at(self.now + delay, callback)

    def call_soon(self, callback: Callable[[], None]) -> None:
        """Run callback on the next tick, after this tick's events (fairness for busy sessions)."""
        self.soon.append(callback)

    # -- running ----------------------------------------------------------------------------
    def _poll_timeout(self) -> float:
        if self.soon:
            return 0
        timers = self.timers
        while timers and timers[0][2].cancelled:
            heapq.heappop(timers)
            self.cancelled_timers -= 1
        if not timers:
            return 1.0
        return min(max(timers[0][0] - time.monotonic(), 0.0), 1.0)

    def _run_timers(self) -> None:
        now = self.now
        # self.timers is re-read every time: a callback's cancel() may have rebuilt the heap.
        while self.timers and self.timers[0][0] <= now:
            timer = heapq.heappop(self.timers)[2]
            callback = timer.callback
            if callback is None:                # cancelled
                self.cancelled_timers -= 1
                continue
            timer.callback = timer.loop = None
            timer.cancelled = True
            try:
                callback()
            except Exception as exc:
                self.on_error(callback, exc)

    def run_once(self) -> None:
        try:
            events = self.epoll.poll(self._poll_timeout(), self.max_events)
        except InterruptedError:
            events = []
        self.polls += 1
        self.now = time.monotonic()
        handlers = self.handlers
        gone = self.gone
        gone.clear()
        for fd, mask in events:
            handler = handlers.get(fd)
            if handler is not None and not (gone and fd in gone):
                try:
                    handler(mask)
                except Exception as exc:
                    self.on_error(handler, exc)
        soon = self.soon
        for _ in range(len(soon)):
            callback = soon.popleft()
            try:
                callback()
            except Exception as exc:
                self.on_error(callback, exc)
        self._run_timers()
        for callback in self.after_tick:
            callback()

    def run(self) -> None:
        self.running = True
        while self.running:
            self.run_once()

    def stop(self) -> None:
        self.running = False

    def close(self) -> None:
        self.epoll.close()


def _reraise(callback: Callable[..., object], exc: BaseException) -> None:
    raise exc
