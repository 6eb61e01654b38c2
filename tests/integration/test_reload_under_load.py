"""Zero-loss reloads: under continuous load, many HUPs in a row refuse, reset or truncate nothing."""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import socket
import threading
import time

from tests.support import (
    connect,
    expected_hash_reply,
    free_port,
    hash_handler,
    pattern_bytes,
    recv_all,
    recv_line,
    tag_handler,
    wait_until,
)


def hashing_service(port: int, target_port: int, workers: int) -> str:
    return f"""
worker_processes: {workers}
worker_shutdown_timeout: 60s
stream_listen: [127.0.0.1:{port}]
services:
  - name: hash
    host: 127.0.0.1
    port: {target_port}
    routes:
      - name: r
        protocols: [tcp]
        destinations: [{{port: {port}}}]
"""


class Load:
    """Client threads doing short hashed sessions, plus one paced bulk upload spanning everything."""

    def __init__(self, port: int, clients: int = 4):
        self.port = port
        self.stop = threading.Event()
        self.failures: list[str] = []
        self.done = 0
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self.short_sessions, args=(i,)) for i in range(clients)]
        self.bulk_result: list[bool] = []
        self.threads.append(threading.Thread(target=self.bulk_session))

    def short_sessions(self, seed: int) -> None:
        n = 0
        while not self.stop.is_set():
            n += 1
            payload = pattern_bytes(1000 + (seed * 7919 + n * 104729) % 60000, seed=seed + n)
            try:
                with connect(self.port, timeout=20) as sock:
                    sock.sendall(payload)
                    sock.shutdown(socket.SHUT_WR)
                    reply = recv_all(sock)
                if reply != expected_hash_reply(payload):
                    self.failures.append(f"wrong reply {reply[:60]!r}")
            except OSError as exc:
                self.failures.append(f"{type(exc).__name__}: {exc}")
            with self.lock:
                self.done += 1

    def bulk_session(self) -> None:
        """~64 MiB sent in paced chunks for as long as the reloads go on."""
        digest, total = hashlib.sha256(), 0
        chunk = pattern_bytes(256 * 1024, seed=99)
        try:
            with connect(self.port, timeout=60) as sock:
                while not self.stop.is_set() or total < (16 << 20):
                    sock.sendall(chunk)
                    digest.update(chunk)
                    total += len(chunk)
                    time.sleep(0.01)
                sock.shutdown(socket.SHUT_WR)
                reply = recv_all(sock)
            self.bulk_result.append(reply == f"{total} {digest.hexdigest()}\n".encode())
        except OSError as exc:
            self.failures.append(f"bulk: {type(exc).__name__}: {exc}")

    def __enter__(self) -> Load:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(120)


def test_100_reloads_under_load_lose_nothing(proxy, upstreams):
    up = upstreams(hash_handler)
    port = free_port()
    p = proxy(hashing_service(port, up.port, workers=2))
    with Load(port) as load:
        wait_until(lambda: load.done > 20, what="the load to start")
        for _ in range(100):
            p.reload()
        before = load.done
        wait_until(lambda: load.done > before + 20, what="sessions after the last reload")
    assert load.failures == []
    assert load.bulk_result == [True]
    assert load.done > 200
    assert "reload failed" not in p.log_text()
    # Every retired generation drained and exited: only the newest two workers are left.
    wait_until(lambda: len(p.worker_pids()) == 2, timeout=30, what="old generations to exit")


def test_shrinking_and_growing_the_worker_count_under_load_loses_nothing(proxy, upstreams):
    up = upstreams(hash_handler)
    port = free_port()
    p = proxy(hashing_service(port, up.port, workers=3))
    with Load(port) as load:
        wait_until(lambda: load.done > 20, what="the load to start")
        for workers in (1, 2, 1, 3, 2):
            p.reload(hashing_service(port, up.port, workers=workers))
            before = load.done
            wait_until(lambda before=before: load.done > before + 10, what=f"sessions with {workers} workers")
    assert load.failures == []
    assert load.bulk_result == [True]
    wait_until(lambda: len(p.worker_pids()) == 2, timeout=30, what="old generations to exit")


def test_s_reload_under_load_loses_nothing(proxy, upstreams):
    up = upstreams(hash_handler)
    port = free_port()
    p = proxy(hashing_service(port, up.port, workers=2))
    with Load(port, clients=2) as load:
        wait_until(lambda: load.done > 10, what="the load to start")
        for i in range(10):
            assert p.run_cli("-s", "reload").returncode == 0
            p.wait_log("reload complete", count=i + 1)
    assert load.failures == []
    assert load.bulk_result == [True]


def test_quit_lets_the_bulk_transfer_finish(proxy, upstreams):
    up = upstreams(hash_handler)
    port = free_port()
    p = proxy(hashing_service(port, up.port, workers=2))
    payload = pattern_bytes(32 << 20, seed=5)
    sock = connect(port, timeout=30)
    sock.sendall(payload[: 1 << 20])
    p.send_signal(signal.SIGQUIT)
    time.sleep(0.3)
    sock.sendall(payload[1 << 20:])                  # the session outlives the QUIT
    sock.shutdown(socket.SHUT_WR)
    assert recv_all(sock) == expected_hash_reply(payload)
    sock.close()
    assert p.proc.wait(20) == 0


def test_a_burst_of_reloads_under_long_sessions_keeps_the_worker_count_bounded(proxy, upstreams):
    """50 HUPs in 5 s while clients keep opening sessions and holding them: reloads coalesce, at
    most DRAINING_GENERATIONS generations drain at once (older ones are told to close their
    sessions), the number of worker processes stays bounded, and the last configuration wins."""
    import psutil

    from pyproxy.master import DRAINING_GENERATIONS

    ups = [upstreams(tag_handler, name=name) for name in ("a", "b", "last")]
    port = free_port()
    p = proxy(tagged_service(port, ups[0].port, workers=2))
    versions = []
    for i, up in enumerate(ups):                 # complete files, swapped in atomically
        p.write_config(tagged_service(port, up.port, workers=2))
        versions.append(p.dir / f"v{i}.conf")
        p.conf.rename(versions[-1])
    bound = 2 * (DRAINING_GENERATIONS + 2) + 2   # draining + current + booting, + 2 told to stop
    held: list[socket.socket] = []
    peak = [0]
    stop = threading.Event()

    def churn() -> None:
        while not stop.is_set():
            try:
                sock = connect(port, timeout=20)
                recv_line(sock)
                held.append(sock)
            except OSError:
                pass
            time.sleep(0.02)

    def workers() -> int:
        count = 0
        for child in psutil.Process(p.pid).children():
            try:
                if child.status() != psutil.STATUS_ZOMBIE and "worker process" in child.cmdline()[0]:
                    count += 1
            except (psutil.NoSuchProcess, IndexError):
                pass
        return count

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], workers())
            time.sleep(0.02)

    threads = [threading.Thread(target=churn), threading.Thread(target=sample)]
    for t in threads:
        t.start()
    try:
        for i in range(50):
            shutil.copyfile(versions[2 if i == 49 else i % 2], p.dir / "next.conf")
            os.replace(p.dir / "next.conf", p.conf)
            p.send_signal(signal.SIGHUP)
            time.sleep(0.1)
            if peak[0] > bound:
                break                             # failed already: do not pile up more processes
        assert peak[0] <= bound, f"{peak[0]} worker processes at once"

        def last_wins():
            with connect(port) as sock:
                return recv_line(sock) == b"last\n"
        wait_until(last_wins, timeout=20, what="the last configuration to serve")
    finally:
        stop.set()
        for t in threads:
            t.join(30)
        for sock in held:
            sock.close()
    log = p.log_text()
    assert "requests coalesced into one reload" in log
    assert "told to close its sessions now" in log
    assert "reload failed" not in log
    assert peak[0] <= bound, f"{peak[0]} worker processes at once"


def tagged_service(port: int, target_port: int, workers: int) -> str:
    return hashing_service(port, target_port, workers).replace("name: hash", "name: tagged")
