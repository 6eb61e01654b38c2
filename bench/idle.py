"""Memory per idle proxied connection: open N idle sessions through a proxy and weigh its processes.

The idle upstream accepts connections in a thread of this process and holds them, counting them, so
we know when the proxy has opened all N upstream sides. The client side is N non-blocking sockets in
this process too. This process then holds 2·N descriptors: N = 4000 fits in `ulimit -n` = 20000.

The figure is (PSS of all the proxy's processes with N sessions − PSS with none) / N. PSS counts a
page shared by k processes as 1/k in each, so the sum over master and workers counts it once.
Kernel memory (socket buffers) is not in PSS and is the same for every proxy anyway.
"""

from __future__ import annotations

import resource
import selectors
import socket
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import psutil

from bench.processes import total_pss

CONNECT_BATCH = 500        # connects in flight at once: below the listen backlog of every server
CONNECT_TIMEOUT = 30.0     # seconds for all N sessions to reach the upstream
SETTLE = 1.0               # default seconds to let the proxy finish its bookkeeping before weighing it
PSS_SAMPLES = 3            # weighings averaged: PSS moves a little between reads
DESCRIPTORS_SPARE = 200    # descriptors this process needs besides the 2·N sockets


class IdleUpstream:
    """A TCP server that accepts connections and holds them open, silently, in a thread."""

    def __init__(self, host: str, port: int, backlog: int = 4096):
        self.listener = socket.create_server((host, port), backlog=backlog, reuse_port=False)
        self.listener.settimeout(0.2)       # so that `close` stops the thread promptly
        self.accepted: list[socket.socket] = []
        self._lock = threading.Lock()
        self._running = True
        self._thread = threading.Thread(target=self._accept_forever, name="idle-upstream", daemon=True)
        self._thread.start()

    def _accept_forever(self) -> None:
        while self._running:
            try:
                conn, _ = self.listener.accept()
            except (TimeoutError, BlockingIOError):
                continue
            except OSError:
                return                        # listener closed
            with self._lock:
                self.accepted.append(conn)

    @property
    def count(self) -> int:
        with self._lock:
            return len(self.accepted)

    def drop_all(self) -> None:
        """Close every held connection."""
        with self._lock:
            held, self.accepted = self.accepted, []
        for conn in held:
            conn.close()

    def close(self) -> None:
        self._running = False
        self._thread.join(2.0)
        self.listener.close()
        self.drop_all()


def ensure_descriptors(connections: int) -> None:
    """Raise this process's soft RLIMIT_NOFILE so it can hold both sides of `connections` sessions."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    needed = 2 * connections + DESCRIPTORS_SPARE
    if needed > hard:
        raise RuntimeError(f"{connections} idle sessions need {needed} descriptors; the hard limit is {hard}")
    if soft < needed:
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))


def open_idle_clients(host: str, port: int, count: int,
                      timeout: float = CONNECT_TIMEOUT) -> list[socket.socket]:
    """Open `count` connections to host:port with non-blocking connects, CONNECT_BATCH at a time."""
    clients: list[socket.socket] = []
    deadline = time.monotonic() + timeout
    try:
        with selectors.DefaultSelector() as selector:
            while len(clients) < count:
                batch = []
                for _ in range(min(CONNECT_BATCH, count - len(clients))):
                    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                    clients.append(sock)
                    sock.setblocking(False)
                    sock.connect_ex((host, port))
                    selector.register(sock, selectors.EVENT_WRITE)
                    batch.append(sock)
                pending = len(batch)
                while pending:
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"{count} connections to port {port} not made in {timeout:.0f}s")
                    for key, _ in selector.select(timeout=0.5):
                        sock = key.fileobj
                        selector.unregister(sock)
                        pending -= 1
                        error = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                        if error:
                            raise ConnectionError(f"connect to port {port} failed: errno {error}")
    except BaseException:
        for sock in clients:
            sock.close()
        raise
    return clients


@dataclass(frozen=True)
class IdleMemory:
    """One idle-memory measurement."""

    connections: int
    pss_before: int            # bytes, all the proxy's processes, no session
    pss_after: int             # bytes, with `connections` idle sessions

    @property
    def bytes_per_connection(self) -> float:
        return (self.pss_after - self.pss_before) / self.connections


def _weigh(processes: Callable[[], Iterable[psutil.Process]]) -> int:
    """The proxy's total PSS, averaged over a few reads."""
    samples = []
    for _ in range(PSS_SAMPLES):
        samples.append(total_pss(processes()))
        time.sleep(0.1)
    return int(sum(samples) / len(samples))


def measure_idle_memory(processes: Callable[[], Iterable[psutil.Process]], upstream: IdleUpstream,
                        host: str, port: int, count: int, settle: float = SETTLE) -> IdleMemory:
    """Weigh the proxy listening on host:port (whose processes `processes()` lists) with no session,
    then with `count` idle sessions to `upstream`; close them again before returning."""
    ensure_descriptors(count)
    upstream.drop_all()
    time.sleep(settle)
    before = _weigh(processes)
    clients = open_idle_clients(host, port, count)
    try:
        deadline = time.monotonic() + CONNECT_TIMEOUT
        while upstream.count < count:
            if time.monotonic() > deadline:
                raise TimeoutError(f"the upstream saw {upstream.count} of {count} "
                                   f"sessions through port {port}")
            time.sleep(0.05)
        time.sleep(settle)
        after = _weigh(processes)
    finally:
        for sock in clients:
            sock.close()
        upstream.drop_all()
    return IdleMemory(count, before, after)
