"""Memory per idle proxied connection: open N idle sessions through a proxy and weigh its processes.

The idle upstream accepts connections in a thread of this process and holds them, counting them, so
we know when the proxy has opened all N upstream sides. The client side is N non-blocking sockets in
this process too. This process then holds 2·N descriptors: N = 4000 fits in `ulimit -n` = 20000. For
more (`idle-memory-9k`: 9,000 a worker), `IdleUpstreamProcess` holds the upstream sides in a process
of its own (`python -m bench.idle PORT`), and this one holds N.

The figure is (PSS of all the proxy's processes with N sessions − PSS with none) / N. PSS counts a
page shared by k processes as 1/k in each, so the sum over master and workers counts it once.
Kernel memory (socket buffers) is not in PSS and is the same for every proxy anyway.
"""

from __future__ import annotations

import resource
import selectors
import socket
import struct
import subprocess
import sys
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


LINGER_RESET = struct.pack("ii", 1, 0)     # SO_LINGER on, 0 s: close() sends a reset


def reset(sock: socket.socket) -> None:
    """Close `sock` with a reset rather than a FIN: no TIME_WAIT left behind. Thousands of sessions
    closed normally leave as many ports of the ephemeral range in TIME_WAIT for a minute, and a
    second count of 18,000 in a row then fails to connect (the range holds 28,232)."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
    except OSError:
        pass
    sock.close()


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
        """Close every held connection, with a reset (see `reset`)."""
        with self._lock:
            held, self.accepted = self.accepted, []
        for conn in held:
            reset(conn)

    def close(self) -> None:
        self._running = False
        self._thread.join(2.0)
        self.listener.close()
        self.drop_all()


class IdleUpstreamProcess:
    """An IdleUpstream in a child process (`python -m bench.idle PORT`), with the same methods: the
    sessions' upstream sides then count against the child's descriptor limit, not this process's."""

    def __init__(self, host: str, port: int, backlog: int = 4096):
        self.child = subprocess.Popen([sys.executable, "-m", "bench.idle", host, str(port), str(backlog)],
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                      start_new_session=True)
        self._ask("count")                    # answers once it listens

    def _ask(self, command: str) -> str:
        assert self.child.stdin is not None and self.child.stdout is not None
        self.child.stdin.write(command + "\n")
        self.child.stdin.flush()
        answer = self.child.stdout.readline()
        if not answer:
            raise ConnectionError(f"the idle upstream process exited ({self.child.poll()})")
        return answer.strip()

    @property
    def count(self) -> int:
        return int(self._ask("count"))

    def drop_all(self) -> None:
        self._ask("drop")

    def close(self) -> None:
        if self.child.poll() is None:
            self.child.kill()
        self.child.wait()


def serve_commands(host: str, port: int, backlog: int) -> None:
    """The child of IdleUpstreamProcess: an IdleUpstream answering `count` and `drop` on stdin."""
    resource.setrlimit(resource.RLIMIT_NOFILE, (resource.getrlimit(resource.RLIMIT_NOFILE)[1],) * 2)
    upstream = IdleUpstream(host, port, backlog)
    for line in sys.stdin:
        if line.strip() == "drop":
            upstream.drop_all()
            print("ok", flush=True)
        else:
            print(upstream.count, flush=True)
    upstream.close()


def ensure_descriptors(connections: int, sides: int = 2) -> None:
    """Raise this process's soft RLIMIT_NOFILE so it can hold `sides` sides (the client's, and the
    upstream's unless a child holds them) of `connections` sessions."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    needed = sides * connections + DESCRIPTORS_SPARE
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
                        raise TimeoutError(f"{count} connections to port {port} not made in {timeout:.0f}s "
                                           f"({len(clients) - pending} made)")
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


def measure_idle_memory(processes: Callable[[], Iterable[psutil.Process]],
                        upstream: IdleUpstream | IdleUpstreamProcess,
                        host: str, port: int, count: int, settle: float = SETTLE) -> IdleMemory:
    """Weigh the proxy listening on host:port (whose processes `processes()` lists) with no session,
    then with `count` idle sessions to `upstream`; close them again before returning."""
    ensure_descriptors(count, 1 if isinstance(upstream, IdleUpstreamProcess) else 2)
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
        upstream.drop_all()           # first: the proxy's upstream sockets (ephemeral ports) get a reset
        for sock in clients:
            reset(sock)
    return IdleMemory(count, before, after)


if __name__ == "__main__":
    serve_commands(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
