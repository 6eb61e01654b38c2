"""`make soak`: hold several thousand sessions with mixed traffic through a real pyproxy, bounded in time.

    .venv/bin/python -m soak.run [--seconds 120] [--long 3000] ...      (or: SOAK_SECONDS=600 make soak)

What runs (all on loopback, ports below 32768, every wait bounded):

- an upstream process (`--serve-upstreams`, its own process group): an event-driven echo server
  (selectors, one thread, for the thousands of idle-ish long sessions), and threaded servers from
  tests/support.py for the short sessions: hash (read to EOF, answer `<n> <sha256>`), framed hash
  (`<n>\\n` then n bytes: usable over TLS without a half-close), download (`<n>\\n` → n pattern bytes)
  and a TLS upstream (framed hash behind a certificate signed by a generated CA);
- a real pyproxy (`python -m pyproxy -c <generated conf>`, worker_processes 2, its own process group)
  with plain listeners (echo, hash, download, a dead upstream, TLS towards the upstream) and one ssl
  listener (terminating by SNI for echo/hash, passthrough by SNI to the TLS upstream);
- in this process: one selectors thread holding the long sessions (default 3000, 20 % of them TLS
  terminated by pyproxy), each sending a few bytes every few seconds and checking the echo, living a
  random time and being replaced; a handful of client threads running a paced mix of short sessions
  (hashed uploads of 1 B–2 MiB, downloads, TLS terminated, passthrough, TLS to the upstream, a dead
  upstream expecting a clean 502 close, garbage on the ssl port expecting a clean 400 close, client
  resets); and the main thread, which samples pyproxy's processes every 5 s (RSS, PSS, fds, TCP
  sockets), sends the reloads (SIGHUP), and at the end closes everything, waits for the proxy to go
  idle, and checks that its fds and RSS came back to where they started.

Exit status: 0 when no session failed unexpectedly, the access log accounts for every session with
the status it should have, every reload completed and nothing leaked; 1 otherwise; 130 on Ctrl-C.
Results: soak/results/latest.json and latest.md (the work directory with pyproxy's logs is kept, and
named, when the run fails).
"""

from __future__ import annotations

import argparse
import errno
import hashlib
import json
import math
import os
import random
import resource
import selectors
import shutil
import signal
import socket
import ssl
import struct
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections import Counter
from pathlib import Path
from typing import ClassVar

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import psutil  # noqa: E402

from tests.support import (  # noqa: E402
    Proxy,
    Upstream,
    connect,
    expected_hash_reply,
    free_port,
    hash_handler,
    make_ca,
    make_cert,
    pattern_bytes,
    recv_all,
    recv_line,
    tls_handler_for,
    wait_until,
)

MiB = 1 << 20
MAX_UPLOAD = 2 * MiB
DOWNLOAD_SEED = 11
RESULTS = Path(__file__).resolve().parent / "results"

CONNECT_TIMEOUT = 15.0      # a long session's TCP connect + TLS handshake
ECHO_TIMEOUT = 30.0         # a long session's oldest unanswered byte
WARMUP_SETTLE = 6.0        # idle seconds after the warm-up: the workers' idle malloc_trim runs every 5 s
SHORT_TIMEOUT = 30.0        # any blocking call of a short session
LINGER_RESET = struct.pack("ii", 1, 0)

SNI_ECHO = "echo.soak.test"          # ssl listener: terminated, to the echo upstream
SNI_HASH = "hash.soak.test"          # ssl listener: terminated, to the framed hash upstream
SNI_PASS = "pass.soak.test"          # ssl listener: passed through to the TLS upstream
UPSTREAM_NAME = "upstream.soak.test"


def log(msg: str) -> None:
    print(f"[soak {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def raise_nofile() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


# ==============================================================================================
# Upstreams (run in their own process: `python -m soak.run --serve-upstreams DIR`)
# ==============================================================================================
class EchoServer:
    """Event-driven echo for thousands of concurrent connections: one thread, one selector,
    non-blocking sockets. Echoes everything; on the client's FIN it flushes, then closes (a FIN)."""

    def __init__(self, host: str = "127.0.0.1"):
        self.port = free_port(host)
        self.lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.lsock.bind((host, self.port))
        self.lsock.listen(4096)
        self.lsock.setblocking(False)
        self.sel = selectors.DefaultSelector()
        self.sel.register(self.lsock, selectors.EVENT_READ, None)
        self.out: dict[socket.socket, bytearray] = {}
        self.eof: set[socket.socket] = set()
        self.accepted = 0
        self.resets = 0

    def serve(self, should_stop) -> None:
        last_check = time.monotonic()
        while True:
            for key, mask in self.sel.select(0.5):
                if key.data is None:
                    self._accept()
                else:
                    self._service(key.fileobj, mask)
            now = time.monotonic()
            if now - last_check > 1.0:
                last_check = now
                if should_stop():
                    return

    def _accept(self) -> None:
        for _ in range(256):
            try:
                conn, _ = self.lsock.accept()
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE):
                    print(f"echo: accept failed: {exc}", file=sys.stderr, flush=True)
                    time.sleep(0.1)
                return
            conn.setblocking(False)
            self.accepted += 1
            self.out[conn] = bytearray()
            self.sel.register(conn, selectors.EVENT_READ, True)

    def _close(self, conn: socket.socket) -> None:
        try:
            self.sel.unregister(conn)
        except (KeyError, ValueError):
            pass
        self.out.pop(conn, None)
        self.eof.discard(conn)
        conn.close()

    def _service(self, conn: socket.socket, mask: int) -> None:
        out = self.out.get(conn)
        if out is None:
            return
        if mask & selectors.EVENT_READ and conn not in self.eof:
            for _ in range(16):
                try:
                    data = conn.recv(65536)
                except BlockingIOError:
                    break
                except OSError:                 # a reset passed on by the proxy: that session is over
                    self.resets += 1
                    self._close(conn)
                    return
                if not data:
                    self.eof.add(conn)
                    break
                out += data
        if out:
            try:
                sent = conn.send(out)
                del out[:sent]
            except BlockingIOError:
                pass
            except OSError:
                self.resets += 1
                self._close(conn)
                return
        if not out and conn in self.eof:
            self._close(conn)                    # all echoed, client sent its FIN: close with a FIN
            return
        want = (0 if conn in self.eof else selectors.EVENT_READ) | (selectors.EVENT_WRITE if out else 0)
        self.sel.modify(conn, want, True)


def framed_hash_handler(conn: socket.socket, up: Upstream) -> None:
    """`<n>\\n` then n bytes → `<n> <sha256>\\n`, then a FIN, then read until the client closes.
    Unlike hash_handler it needs no half-close from the client, so it works behind TLS."""
    header = recv_line(conn, 32)
    size = int(header.strip() or b"0")
    digest, got = hashlib.sha256(), 0
    while got < size:
        data = conn.recv(min(262144, size - got))
        if not data:
            break
        digest.update(data)
        got += len(data)
    conn.sendall(f"{got} {digest.hexdigest()}\n".encode())
    conn.shutdown(socket.SHUT_WR)
    while conn.recv(65536):
        pass


def download_handler_for(payload: bytes):
    def handler(conn: socket.socket, up: Upstream) -> None:
        size = int(recv_line(conn, 32).strip() or b"0")
        conn.sendall(payload[:size])
        conn.shutdown(socket.SHUT_WR)
        while conn.recv(65536):
            pass
    return handler


RESETS: Counter = Counter()           # upstream process: resets seen, by server
_RESETS_LOCK = threading.Lock()


def counting_resets(name: str, handler):
    """Wrap a handler: a reset from the proxy is counted (the soak judges which ones were expected)."""
    def wrapped(conn: socket.socket, up: Upstream) -> None:
        try:
            handler(conn, up)
        except (ConnectionResetError, BrokenPipeError):
            with _RESETS_LOCK:
                RESETS[name] += 1
    return wrapped


def serve_upstreams(workdir: Path) -> int:
    """The upstream process: start everything, publish the ports, serve until the soak goes away."""
    raise_nofile()
    signal.signal(signal.SIGINT, signal.SIG_IGN)       # the soak stops us (SIGTERM), not the terminal
    parent = os.getppid()
    echo = EchoServer()
    hash_up = Upstream(counting_resets("hash", hash_handler), name="hash")
    framed = Upstream(counting_resets("framed", framed_hash_handler), name="framed")
    download = Upstream(counting_resets("download", download_handler_for(
        pattern_bytes(MAX_UPLOAD, seed=DOWNLOAD_SEED))), name="download")
    tls_up = Upstream(tls_handler_for((workdir / f"{UPSTREAM_NAME}.crt", workdir / f"{UPSTREAM_NAME}.key"),
                                      counting_resets("tls", framed_hash_handler)), name="tls")
    ports = {"echo": echo.port, "hash": hash_up.port, "framed": framed.port, "download": download.port,
             "tls": tls_up.port}
    publish(workdir / "upstreams.json", ports)

    def tick() -> bool:
        with _RESETS_LOCK:
            resets = dict(RESETS)
        resets["echo"] = echo.resets
        publish(workdir / "upstream-stats.json", {"resets": resets, "echo_accepted": echo.accepted})
        return os.getppid() != parent
    echo.serve(tick)
    return 0


def publish(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data))
    tmp.rename(path)


# ==============================================================================================
# Bookkeeping shared by the client threads
# ==============================================================================================
class SoakError(Exception):
    def __init__(self, category: str, detail: str = ""):
        super().__init__(f"{category}: {detail}" if detail else category)
        self.category = category
        self.detail = detail


class Stats:
    def __init__(self, t0: float):
        self.t0 = t0
        self.lock = threading.Lock()
        self.errors: Counter = Counter()
        self.examples: list[dict] = []
        self.error_times: list[float] = []
        self.ok: Counter = Counter()              # short scenario → completed as expected
        self.expected_status: Counter = Counter()  # sessions that reached the proxy, by expected status
        self.short_in_flight = 0
        self.resets_sent: Counter = Counter()      # client resets sent, by the upstream they reach
        self.long_started = 0
        self.long_completed = 0
        self.long_open = 0
        self.long_messages = 0

    def error(self, category: str, detail: str = "", count: int = 1) -> None:
        now = time.monotonic() - self.t0
        with self.lock:
            self.errors[category] += count
            self.error_times.extend([now] * count)
            if self.errors[category] - count < 5 and len(self.examples) < 100:     # a few of each kind
                self.examples.append({"t": round(now, 1), "category": category, "detail": detail[:300]})

    def reached_proxy(self, status: int) -> None:
        with self.lock:
            self.expected_status[status] += 1

    @property
    def error_count(self) -> int:
        with self.lock:
            return sum(self.errors.values())


# ==============================================================================================
# Long sessions: thousands of idle-ish echo sessions in one selectors thread
# ==============================================================================================
CONNECTING, HANDSHAKE, OPEN, CLOSING = range(4)


class LongConn:
    __slots__ = ("sock", "tls", "state", "expect", "out", "waiting_since", "next_send", "end_at", "deadline",
                 "seq", "events")

    def __init__(self, sock: socket.socket, tls: bool, now: float, end_at: float):
        self.sock = sock
        self.tls = tls
        self.state = CONNECTING
        self.expect = bytearray()
        self.out = bytearray()
        self.waiting_since: float | None = None
        self.next_send = 0.0
        self.end_at = end_at
        self.deadline = now + CONNECT_TIMEOUT
        self.seq = 0
        self.events = 0


class LongSessions(threading.Thread):
    """Keeps `target` echo sessions open through the proxy; each sends a few bytes every few seconds
    and checks the echo, lives a random time, half-closes and expects a clean end, and is replaced."""

    def __init__(self, stats: Stats, plain_port: int, ssl_port: int, target: int, tls_share: float,
                 life: tuple[float, float], interval: tuple[float, float], open_rate: float, seed: int):
        super().__init__(name="long-sessions", daemon=True)
        self.stats = stats
        self.plain_port, self.ssl_port = plain_port, ssl_port
        self.target = target
        self.tls_share = tls_share
        self.life = life
        self.interval = interval
        self.open_rate = open_rate
        self.rng = random.Random(seed)
        self.sel = selectors.DefaultSelector()
        self.conns: set[LongConn] = set()
        self.closing = threading.Event()      # no new sessions; close the open ones cleanly
        self.abort = threading.Event()        # give up now (Ctrl-C, watchdog)
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        self.ctx.check_hostname = False
        self.ctx.verify_mode = ssl.CERT_NONE
        self.alphabet = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"

    # -- the loop --------------------------------------------------------------------------------
    def run(self) -> None:
        try:
            self._run()
        except Exception as exc:        # a bug here must show, not silently stop the long sessions
            self.stats.error("long-sessions: internal", "".join(traceback.format_exception(exc))[-300:])
        finally:
            for c in list(self.conns):
                self._drop(c)

    def _run(self) -> None:
        budget, last = 0.0, time.monotonic()
        next_scan = 0.0
        while not self.abort.is_set():
            now = time.monotonic()
            budget = min(budget + (now - last) * self.open_rate, self.open_rate * 0.2)
            last = now
            if not self.closing.is_set():
                while budget >= 1 and len(self.conns) < self.target:
                    budget -= 1
                    self._open(now)
            elif not self.conns:
                return
            for key, mask in self.sel.select(0.05):
                c = key.data
                if c in self.conns:
                    self._on_event(c, mask, time.monotonic())
            now = time.monotonic()
            if now >= next_scan:
                next_scan = now + 0.2
                self._scan(now)
            with self.stats.lock:
                self.stats.long_open = len(self.conns)

    def _open(self, now: float) -> None:
        tls = self.rng.random() < self.tls_share
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        err = sock.connect_ex(("127.0.0.1", self.ssl_port if tls else self.plain_port))
        if err not in (0, errno.EINPROGRESS):
            sock.close()
            self.stats.error("long: connect failed", os.strerror(err))
            return
        end_at = now + self.rng.uniform(*self.life)
        c = LongConn(sock, tls, now, end_at)
        self.conns.add(c)
        self._watch(c, selectors.EVENT_WRITE)

    def _watch(self, c: LongConn, events: int) -> None:
        if events == c.events:
            return
        if c.events == 0:
            self.sel.register(c.sock, events, c)
        elif events == 0:
            self.sel.unregister(c.sock)
        else:
            self.sel.modify(c.sock, events, c)
        c.events = events

    def _drop(self, c: LongConn) -> None:
        if c.events:
            try:
                self.sel.unregister(c.sock)
            except (KeyError, ValueError):
                pass
            c.events = 0
        try:
            c.sock.close()
        except OSError:
            pass
        self.conns.discard(c)

    def _fail(self, c: LongConn, category: str, detail: str = "") -> None:
        kind = "tls" if c.tls else "tcp"
        self.stats.error(f"long {kind}: {category}", detail)
        self._drop(c)

    def _on_event(self, c: LongConn, mask: int, now: float) -> None:
        if c.state == CONNECTING:
            err = c.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                self._fail(c, "connect failed", os.strerror(err))
                return
            with self.stats.lock:
                self.stats.long_started += 1
            self.stats.reached_proxy(200)
            c.next_send = now + self.rng.uniform(0, self.interval[1])
            if c.tls:
                self._watch(c, 0)
                c.sock = self.ctx.wrap_socket(c.sock, server_hostname=SNI_ECHO, do_handshake_on_connect=False)
                c.state = HANDSHAKE
                self._handshake(c)
            else:
                c.state = OPEN
                self._watch(c, selectors.EVENT_READ)
            return
        if c.state == HANDSHAKE:
            self._handshake(c)
            return
        if c.out and not self._flush(c):
            return
        self._read(c, now)

    def _handshake(self, c: LongConn) -> None:
        try:
            c.sock.do_handshake()
        except ssl.SSLWantReadError:
            self._watch(c, selectors.EVENT_READ)
            return
        except ssl.SSLWantWriteError:
            self._watch(c, selectors.EVENT_WRITE)
            return
        except (ssl.SSLError, OSError) as exc:
            self._fail(c, "TLS handshake failed", repr(exc))
            return
        c.state = OPEN
        self._watch(c, selectors.EVENT_READ)

    def _flush(self, c: LongConn) -> bool:
        while c.out:
            try:
                sent = c.sock.send(c.out)
            except (BlockingIOError, ssl.SSLWantWriteError, ssl.SSLWantReadError):
                break
            except OSError as exc:
                self._fail(c, "send failed", repr(exc))
                return False
            del c.out[:sent]
        self._watch(c, selectors.EVENT_READ | (selectors.EVENT_WRITE if c.out else 0))
        return True

    def _read(self, c: LongConn, now: float) -> None:
        for _ in range(64):
            try:
                data = c.sock.recv(65536)
            except (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
                return
            except ConnectionResetError:
                self._fail(c, "reset by the proxy" if c.state == OPEN else "reset while closing")
                return
            except ssl.SSLError as exc:
                self._fail(c, f"TLS error from the proxy ({exc.reason or exc.__class__.__name__})"
                           + (" after our half-close" if c.state == CLOSING else ""), repr(exc))
                return
            except OSError as exc:
                self._fail(c, "recv failed", repr(exc))
                return
            if not data:
                if c.state == CLOSING and not c.expect:
                    with self.stats.lock:
                        self.stats.long_completed += 1
                    self._drop(c)
                elif c.state == CLOSING:
                    self._fail(c, "echo truncated at close", f"{len(c.expect)} bytes missing")
                else:
                    self._fail(c, "closed by the proxy", f"{len(c.expect)} bytes unanswered")
                return
            n = len(data)
            if n > len(c.expect) or c.expect[:n] != data:
                self._fail(c, "wrong echo", f"expected {bytes(c.expect[:40])!r}, got {data[:40]!r}")
                return
            del c.expect[:n]
            c.waiting_since = now if c.expect else None

    def _send_message(self, c: LongConn, now: float) -> None:
        c.seq += 1
        body = bytes(self.rng.choices(self.alphabet, k=self.rng.randint(4, 60)))
        message = b"%d:%s\n" % (c.seq, body)
        c.expect += message
        c.out += message
        if c.waiting_since is None:
            c.waiting_since = now
        with self.stats.lock:
            self.stats.long_messages += 1
        self._flush(c)

    def _scan(self, now: float) -> None:
        closing = self.closing.is_set()
        for c in list(self.conns):
            if c not in self.conns:
                continue
            if c.state in (CONNECTING, HANDSHAKE):
                if now > c.deadline:
                    self._fail(c, "connect/handshake timed out", f"{CONNECT_TIMEOUT:g}s")
            elif c.state == OPEN:
                if c.waiting_since is not None and now - c.waiting_since > ECHO_TIMEOUT:
                    self._fail(c, "echo timed out", f"{len(c.expect)} bytes unanswered for {ECHO_TIMEOUT:g}s")
                elif (closing or now >= c.end_at) and not c.expect and not c.out:
                    try:
                        socket.socket.shutdown(c.sock, socket.SHUT_WR)   # a FIN, also under TLS
                    except OSError as exc:
                        self._fail(c, "shutdown failed", repr(exc))
                        continue
                    c.state = CLOSING
                    c.deadline = now + ECHO_TIMEOUT
                elif now >= c.next_send and not closing:
                    c.next_send = now + self.rng.uniform(*self.interval)
                    self._send_message(c, now)
            elif c.state == CLOSING and now > c.deadline:
                self._fail(c, "clean close timed out", f"no EOF within {ECHO_TIMEOUT:g}s")


# ==============================================================================================
# Short sessions: a paced mix from a handful of threads
# ==============================================================================================
def _reset_close(sock) -> None:
    """Close with a RST (SO_LINGER 0), as a crashing or impatient client does."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
    finally:
        sock.close()


class ShortSessions:
    # name → (weight, status pyproxy must log)
    SCENARIOS: ClassVar[dict[str, tuple[int, int]]] = {
        "hash upload": (25, 200),
        "download": (14, 200),
        "tls terminated": (15, 200),
        "tls passthrough": (10, 200),
        "tls to upstream": (10, 200),
        "dead upstream": (8, 502),
        "garbage on ssl port": (8, 400),
        "client reset": (10, 200),
    }

    def __init__(self, stats: Stats, ports: dict[str, int], ders: dict[str, bytes], threads: int,
                 rate: float, seed: int):
        self.stats = stats
        self.ports = ports
        self.ders = ders
        self.rate = rate
        self.stop = threading.Event()
        self.pool = random.Random(seed).randbytes(MAX_UPLOAD + MiB)
        self.download = pattern_bytes(MAX_UPLOAD, seed=DOWNLOAD_SEED)
        self.names = list(self.SCENARIOS)
        self.weights = [self.SCENARIOS[n][0] for n in self.names]
        self.threads = [threading.Thread(target=self._loop, args=(i, seed + i, threads), daemon=True,
                                         name=f"short-{i}") for i in range(threads)]

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def join(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for t in self.threads:
            t.join(max(0.1, deadline - time.monotonic()))

    def _loop(self, index: int, seed: int, nthreads: int) -> None:
        rng = random.Random(seed)
        period = nthreads / self.rate if self.rate > 0 else 0.0
        next_start = time.monotonic() + rng.uniform(0, period)
        while not self.stop.is_set():
            now = time.monotonic()
            if next_start > now:
                time.sleep(min(next_start - now, 0.5))
                continue
            next_start = max(next_start + period, now)
            name = rng.choices(self.names, self.weights)[0]
            with self.stats.lock:
                self.stats.short_in_flight += 1
            try:
                getattr(self, "_" + name.replace(" ", "_"))(rng)
                with self.stats.lock:
                    self.stats.ok[name] += 1
            except SoakError as exc:
                self.stats.error(f"{name}: {exc.category}", exc.detail)
            except ConnectionRefusedError as exc:
                self.stats.error(f"{name}: connection refused", repr(exc))
            except ConnectionResetError as exc:
                self.stats.error(f"{name}: reset", repr(exc))
            except TimeoutError as exc:
                self.stats.error(f"{name}: timed out", repr(exc))
            except (OSError, ValueError) as exc:
                self.stats.error(f"{name}: {type(exc).__name__}", repr(exc))
            except Exception as exc:    # a bug in the soak itself: count it, keep going
                self.stats.error(f"{name}: internal {type(exc).__name__}",
                                 "".join(traceback.format_exception(exc))[-300:])
            finally:
                with self.stats.lock:
                    self.stats.short_in_flight -= 1

    # -- helpers -----------------------------------------------------------------------------
    def _size(self, rng: random.Random) -> int:
        return max(1, min(MAX_UPLOAD, int(math.exp(rng.uniform(0, math.log(MAX_UPLOAD))))))

    def _payload(self, rng: random.Random) -> bytes:
        size = self._size(rng)
        offset = rng.randrange(0, len(self.pool) - size + 1)
        return self.pool[offset:offset + size]

    def _connect(self, port: int, status: int = 200) -> socket.socket:
        sock = connect(port, timeout=SHORT_TIMEOUT)
        self.stats.reached_proxy(status)
        return sock

    def _tls(self, sni: str, status: int = 200):
        raw = self._connect(self.ports["ssl"], status)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        try:
            return ctx.wrap_socket(raw, server_hostname=sni)
        except BaseException:
            raw.close()
            raise

    def _framed_hash(self, sock, payload: bytes) -> None:
        sock.sendall(b"%d\n" % len(payload))
        sock.sendall(payload)
        reply = recv_line(sock, 200)
        if reply != expected_hash_reply(payload):
            raise SoakError("wrong hash reply", f"{len(payload)} bytes sent, got {reply[:80]!r}")
        rest = recv_all(sock)
        if rest:
            raise SoakError("bytes after the reply", repr(rest[:60]))

    # -- scenarios (each raises on anything unexpected) --------------------------------------
    def _hash_upload(self, rng):
        payload = self._payload(rng)
        with self._connect(self.ports["hash"]) as sock:
            sock.sendall(payload)
            sock.shutdown(socket.SHUT_WR)
            reply = recv_all(sock)
        if reply != expected_hash_reply(payload):
            raise SoakError("wrong hash reply", f"{len(payload)} bytes sent, got {reply[:80]!r}")

    def _download(self, rng):
        size = self._size(rng)
        with self._connect(self.ports["download"]) as sock:
            sock.sendall(b"%d\n" % size)
            data = recv_all(sock)
        if data != self.download[:size]:
            raise SoakError("wrong download", f"{size} bytes asked, {len(data)} received"
                            + (" (content differs)" if len(data) == size else ""))

    def _tls_terminated(self, rng):
        with self._tls(SNI_HASH) as sock:
            if sock.getpeercert(binary_form=True) != self.ders["term"]:
                raise SoakError("wrong certificate", "not the terminating certificate")
            self._framed_hash(sock, self._payload(rng))

    def _tls_passthrough(self, rng):
        with self._tls(SNI_PASS) as sock:
            if sock.getpeercert(binary_form=True) != self.ders["upstream"]:
                raise SoakError("wrong certificate", "not the upstream's certificate: not passed through")
            self._framed_hash(sock, self._payload(rng))

    def _tls_to_upstream(self, rng):
        with self._connect(self.ports["tls_up"]) as sock:
            self._framed_hash(sock, self._payload(rng))

    def _dead_upstream(self, rng):
        """The upstream refuses: pyproxy must close with a FIN (status 502), whether or not the
        client already sent something."""
        send_first = rng.random() < 0.5
        what = "after sending" if send_first else "without sending"
        with self._connect(self.ports["dead"], 502) as sock:
            try:
                if send_first:
                    sock.sendall(b"hello, anyone there?\n")
                data = recv_all(sock)
            except ConnectionResetError as exc:
                raise SoakError(f"reset instead of a clean close ({what})", repr(exc)) from None
        if data:
            raise SoakError("bytes from a dead upstream", repr(data[:60]))

    def _garbage_on_ssl_port(self, rng):
        garbage = rng.choice([b"GET / HTTP/1.1\r\nHost: soak\r\n\r\n", b"\x00\x01garbage\r\n",
                              b"SSH-2.0-OpenSSH_9.6\r\n",
                              bytes([0x80 | rng.randrange(128)]) + rng.randbytes(200)])
        with self._connect(self.ports["ssl"], 400) as sock:
            try:
                sock.sendall(garbage)
                sock.shutdown(socket.SHUT_WR)
                data = recv_all(sock)
            except ConnectionResetError as exc:
                raise SoakError("reset instead of a clean close", repr(exc)) from None
        if data:
            raise SoakError("bytes in answer to garbage", repr(data[:60]))

    def _client_reset(self, rng):
        kind = rng.randrange(3)
        if kind == 0:           # an echo session, answered, then reset
            sock = self._connect(self.ports["echo"])
            try:
                sock.sendall(b"reset me\n")
                if recv_line(sock) != b"reset me\n":
                    raise SoakError("wrong echo before the reset")
            finally:
                self._reset(sock, "echo")
        elif kind == 1:         # an upload cut by a reset halfway
            sock = self._connect(self.ports["hash"])
            try:
                sock.sendall(self.pool[:rng.randint(1, 512 * 1024)])
            finally:
                self._reset(sock, "hash")
        else:                   # a TLS terminated session reset after one echo
            sock = self._tls(SNI_ECHO)
            try:
                sock.sendall(b"tls reset me\n")
                if recv_line(sock) != b"tls reset me\n":
                    raise SoakError("wrong echo before the reset")
            finally:
                self._reset(sock, "echo")

    def _reset(self, sock, upstream: str) -> None:
        _reset_close(sock)
        with self.stats.lock:
            self.stats.resets_sent[upstream] += 1


# ==============================================================================================
# pyproxy, sampled
# ==============================================================================================
class SoakProxy(Proxy):
    """tests.support.Proxy, started in its own process group (Ctrl-C reaches only the soak, which
    then stops pyproxy itself; the group lets the soak clean up even a stray worker)."""

    def start(self, wait: bool = True) -> SoakProxy:
        self.stdout = open(self.dir / "stdout.txt", "wb")    # noqa: SIM115 (closed by stop())
        self.stderr = open(self.dir / "stderr.txt", "wb")    # noqa: SIM115 (closed by stop())
        self.proc = subprocess.Popen(self.command(*self.extra_args), stdout=self.stdout, stderr=self.stderr,
                                     stdin=subprocess.DEVNULL, start_new_session=True, cwd=ROOT)
        if wait:
            self.wait_log("ready:", timeout=30)
        return self


def proxy_config(workdir: Path, ports: dict[str, int], up: dict[str, int], shutdown_timeout: float) -> str:
    listen = "\n".join(f"  - 127.0.0.1:{ports[k]}" for k in ("echo", "hash", "download", "dead", "tls_up"))
    return f"""\
worker_processes: 2
worker_shutdown_timeout: {int(shutdown_timeout)}s
error_log: {workdir}/error.log
access_log: {workdir}/access.log
pid: {workdir}/pyproxy.pid
log_level: info
access_log_format: '$remote_addr $remote_port $server_port $protocol $status $bytes_sent $bytes_received
  $session_time "$upstream_addr" $route'

stream_listen:
{listen}
  - 127.0.0.1:{ports['ssl']} ssl

ssl:
  default_certificate: {{cert: default.soak.test.crt, key: default.soak.test.key}}

certificates:
  - {{cert: term.soak.test.crt, key: term.soak.test.key}}

services:
  - name: echo
    host: 127.0.0.1
    port: {up['echo']}
    routes:
      - {{name: echo-tcp, protocols: [tcp], destinations: [{{port: {ports['echo']}}}]}}
      - {{name: echo-tls, protocols: [tls], snis: [{SNI_ECHO}]}}
  - name: hash
    host: 127.0.0.1
    port: {up['hash']}
    routes:
      - {{name: hash-tcp, protocols: [tcp], destinations: [{{port: {ports['hash']}}}]}}
  - name: framed-hash
    host: 127.0.0.1
    port: {up['framed']}
    routes:
      - {{name: hash-tls, protocols: [tls], snis: [{SNI_HASH}]}}
  - name: download
    host: 127.0.0.1
    port: {up['download']}
    routes:
      - {{name: download-tcp, protocols: [tcp], destinations: [{{port: {ports['download']}}}]}}
  - name: dead
    host: 127.0.0.1
    port: {ports['nothing']}
    connect_timeout: 5s
    routes:
      - {{name: dead-tcp, protocols: [tcp], destinations: [{{port: {ports['dead']}}}]}}
  - name: passthrough
    host: 127.0.0.1
    port: {up['tls']}
    routes:
      - {{name: pass, protocols: [tls_passthrough], snis: [{SNI_PASS}]}}
  - name: to-tls
    protocol: tls
    host: 127.0.0.1
    port: {up['tls']}
    tls_verify: true
    tls_server_name: {UPSTREAM_NAME}
    ca_certificates: [soak-ca.crt]
    routes:
      - {{name: to-tls-tcp, protocols: [tcp], destinations: [{{port: {ports['tls_up']}}}]}}
"""


class AccessLogTail:
    """Counts the access log's lines and statuses as they come ($status is the 5th field)."""

    def __init__(self, path: Path):
        self.path = path
        self.offset = 0
        self.partial = b""
        self.lines = 0
        self.statuses: Counter = Counter()

    def poll(self) -> int:
        try:
            with open(self.path, "rb") as fh:
                fh.seek(self.offset)
                data = fh.read()
        except FileNotFoundError:
            return self.lines
        self.offset += len(data)
        data = self.partial + data
        *complete, self.partial = data.split(b"\n")
        for line in complete:
            fields = line.split()
            if len(fields) > 4:
                self.lines += 1
                self.statuses[fields[4].decode(errors="replace")] += 1
        return self.lines


def proxy_processes(master_pid: int) -> list[psutil.Process]:
    try:
        master = psutil.Process(master_pid)
        return [master, *master.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def measure(master_pid: int) -> dict:
    """pyproxy's processes (master and every worker, draining ones included), summed; and each one."""
    rss = pss = fds = sockets = 0
    procs = proxy_processes(master_pid)
    each = []
    for proc in procs:
        try:
            info = proc.memory_full_info()
            nfds = proc.num_fds()
            nsock = sum(1 for c in proc.net_connections("tcp") if c.status != psutil.CONN_LISTEN)
            title = " ".join(proc.cmdline())[:60]
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        rss += info.rss
        pss += info.pss
        fds += nfds
        sockets += nsock
        each.append({"pid": proc.pid, "title": title, "rss_mib": round(info.rss / MiB, 1),
                     "pss_mib": round(info.pss / MiB, 1), "fds": nfds, "sockets": nsock})
    return {"rss_mib": round(rss / MiB, 1), "pss_mib": round(pss / MiB, 1), "fds": fds,
            "procs": len(each), "proxy_sockets": sockets, "processes": each}


# ==============================================================================================
# The run
# ==============================================================================================
class Soak:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.workdir = Path(tempfile.mkdtemp(prefix="pyproxy-soak-"))
        self.t0 = time.monotonic()
        self.stats = Stats(self.t0)
        self.samples: list[dict] = []
        self.reloads: list[dict] = []
        self.upstream_proc: subprocess.Popen | None = None
        self.proxy: SoakProxy | None = None
        self.long: LongSessions | None = None
        self.short: ShortSessions | None = None
        self.tail = AccessLogTail(self.workdir / "access.log")
        self.last_sample = (self.t0, 0)
        self.phase = "setup"
        self.result: dict = {}

    # -- setup ---------------------------------------------------------------------------------
    def setup(self) -> None:
        a = self.args
        d = self.workdir
        log(f"work directory {d}; fd limit {raise_nofile()}")
        ca = make_ca(d, "soak-ca")
        make_cert(d, UPSTREAM_NAME, [UPSTREAM_NAME], ca=ca)
        make_cert(d, "term.soak.test", [SNI_ECHO, SNI_HASH])
        make_cert(d, "default.soak.test", ["default.soak.test"])
        self.ders = {"term": ssl.PEM_cert_to_DER_cert((d / "term.soak.test.crt").read_text()),
                     "upstream": ssl.PEM_cert_to_DER_cert((d / f"{UPSTREAM_NAME}.crt").read_text())}

        self.upstream_out = open(d / "upstreams.log", "wb")   # noqa: SIM115 (closed with the upstreams)
        self.upstream_proc = subprocess.Popen([sys.executable, "-m", "soak.run", "--serve-upstreams", str(d)],
                                              cwd=ROOT, stdin=subprocess.DEVNULL, stdout=self.upstream_out,
                                              stderr=subprocess.STDOUT, start_new_session=True)
        wait_until(lambda: (d / "upstreams.json").exists() or self.upstream_proc.poll() is not None, 30,
                   what="the upstream process")
        if self.upstream_proc.poll() is not None:
            raise RuntimeError(f"the upstream process exited: {(d / 'upstreams.log').read_text()[-2000:]}")
        self.up = json.loads((d / "upstreams.json").read_text())

        names = ("echo", "hash", "download", "dead", "tls_up", "ssl", "nothing")
        self.ports = {name: free_port() for name in names}
        config = proxy_config(d, self.ports, self.up, shutdown_timeout=a.seconds + 300)
        self.proxy = SoakProxy(d, config)
        self.proxy.start()
        workers = len(self.proxy.worker_pids())
        log(f"pyproxy {self.proxy.pid} ready with {workers} workers; upstreams "
            f"{self.up}; listeners {self.ports}")

    # -- sampling ------------------------------------------------------------------------------
    def sample(self, note: str = "") -> dict:
        now = time.monotonic()
        lines = self.tail.poll()
        prev_t, prev_lines = self.last_sample
        rate = (lines - prev_lines) / (now - prev_t) if now > prev_t else 0.0
        self.last_sample = (now, lines)
        s = self.stats
        with s.lock:
            open_sessions = s.long_open + s.short_in_flight
            long_open = s.long_open
            errors = sum(s.errors.values())
        row = {"t": round(now - self.t0, 1), "phase": self.phase, **measure(self.proxy.pid),
               "open_sessions": open_sessions, "long_open": long_open,
               "sessions_per_s": round(rate, 1), "logged": lines, "errors": errors, "note": note}
        self.samples.append(row)
        log(f"t={row['t']:6.1f}s rss={row['rss_mib']:7.1f}MiB "
            f"pss={row['pss_mib']:7.1f}MiB fds={row['fds']:5d} "
            f"procs={row['procs']} sockets={row['proxy_sockets']:5d} open={open_sessions:5d} "
            f"rate={rate:6.1f}/s errors={errors} {note}")
        return row

    def reload(self, number: int) -> dict:
        errors_before = self.stats.error_count
        started = time.monotonic()
        entry = {"number": number, "t": round(started - self.t0, 1), "ok": True, "detail": ""}
        try:
            self.proxy.reload(timeout=30)
            entry["seconds"] = round(time.monotonic() - started, 2)
        except AssertionError as exc:
            entry["ok"] = False
            entry["detail"] = str(exc)[:300]
            self.stats.error("reload did not complete", str(exc)[:300])
        entry["errors_before"] = errors_before
        self.reloads.append(entry)
        log(f"reload #{number}: {'complete' if entry['ok'] else 'FAILED'} in {entry.get('seconds', '?')}s")
        return entry

    def warm_up(self, seconds: float) -> None:
        """The same session mix for `seconds`, then everything closed and a few idle seconds.

        A process's memory first grows to the high-water mark of the load it carries (Python's
        allocator and the C heap keep what they reserved; tables sized for 3000 sessions stay
        that size) and the master imports what its first reload needs. Taking the baseline after
        this warm-up makes the leak check measure growth that repeats, which is what a leak is.
        """
        a = self.args
        self.phase = "warm-up"
        log(f"warm-up: {seconds:g} s of the same load before the baseline")
        long = LongSessions(self.stats, self.ports["echo"], self.ports["ssl"], a.long, a.long_tls,
                            life=(seconds, seconds), interval=(a.interval_min, a.interval_max),
                            open_rate=a.open_rate, seed=a.seed + 7)
        short = ShortSessions(self.stats, self.ports, self.ders, a.clients, a.short_rate, a.seed + 2000)
        long.start()
        short.start()
        time.sleep(seconds / 2)
        self.reload(len(self.reloads) + 1)       # the master's first reload loads what reloads need
        time.sleep(seconds / 2)
        short.stop.set()
        long.closing.set()
        short.join(SHORT_TIMEOUT + 10)
        long.join(ECHO_TIMEOUT + 15)
        wait_until(lambda: measure(self.proxy.pid)["proxy_sockets"] == 0, timeout=45, interval=0.5,
                   what="the warm-up sessions to close")
        time.sleep(WARMUP_SETTLE)
        self.sample("warm-up done: all sessions closed")

    # -- the run -------------------------------------------------------------------------------
    def run(self) -> int:
        a = self.args
        self.setup()
        time.sleep(2.0)
        self.phase = "start"
        self.last_sample = (time.monotonic(), self.tail.poll())
        if a.warmup > 0:
            self.warm_up(a.warmup)
        start = self.sample("baseline (idle, after the warm-up)" if a.warmup > 0 else
                            "baseline (idle, before any session)")

        self.long = LongSessions(self.stats, self.ports["echo"], self.ports["ssl"], a.long, a.long_tls,
                                 life=(min(a.life_min, a.seconds), max(a.seconds, a.life_min)),
                                 interval=(a.interval_min, a.interval_max), open_rate=a.open_rate,
                                 seed=a.seed)
        self.short = ShortSessions(self.stats, self.ports, self.ders, a.clients, a.short_rate, a.seed + 1000)
        self.phase = "load"
        load_start = time.monotonic()
        self.long.start()
        self.short.start()
        reload_at = [load_start + a.seconds * (k + 1) / (a.reloads + 1) for k in range(a.reloads)]
        next_sample = load_start + a.sample
        end = load_start + a.seconds
        while True:
            now = time.monotonic()
            if now >= end:
                break
            if reload_at and now >= reload_at[0]:
                reload_at.pop(0)
                entry = self.reload(len(self.reloads) + 1)
                self.sample(f"after reload #{entry['number']}")
                next_sample = time.monotonic() + a.sample
                continue
            if now >= next_sample:
                self.sample()
                next_sample += a.sample
                continue
            time.sleep(min(0.2, max(0.0, min([next_sample, end, *reload_at]) - now)))
            if not self.long.is_alive():
                self.stats.error("long-sessions thread died")
                break
        for entry in self.reloads:     # errors in the 10 s after each reload
            entry["errors_within_10s"] = sum(1 for t in self.stats.error_times
                                             if entry["t"] <= t < entry["t"] + 10 + entry.get("seconds", 0))

        # -- drain: stop the short clients, close every long session cleanly --------------------
        self.phase = "drain"
        log("load done: stopping the short clients, closing the long sessions")
        self.short.stop.set()
        self.long.closing.set()
        self.short.join(SHORT_TIMEOUT + 10)
        self.long.join(ECHO_TIMEOUT + 15)
        if self.long.is_alive():
            self.stats.error("long sessions did not close in time", f"{len(self.long.conns)} still open")
            self.long.abort.set()
            self.long.join(5)
        self.sample("all client sessions closed")

        # -- idle: the proxy must hold no session and only its current workers ----------------
        self.phase = "idle"
        wanted_procs = start["procs"]

        def idle() -> bool:
            m = measure(self.proxy.pid)
            return m["proxy_sockets"] == 0 and m["procs"] == wanted_procs
        try:
            wait_until(idle, timeout=45, interval=0.5, what="pyproxy idle with its current workers")
        except AssertionError as exc:
            m = measure(self.proxy.pid)
            self.stats.error("proxy did not go idle", f"{exc}; now {m}")
        time.sleep(a.idle)
        end_row = self.sample("end (idle, after everything closed)")
        self.finish(start, end_row)
        return 0 if self.result["passed"] else 1

    # -- verdict ---------------------------------------------------------------------------------
    def reconcile_access_log(self) -> dict:
        with self.stats.lock:
            expected = Counter({str(k): v for k, v in self.stats.expected_status.items()})
        total = sum(expected.values())
        try:
            wait_until(lambda: self.tail.poll() >= total, timeout=10, interval=0.25)
        except AssertionError:
            pass
        got = Counter(self.tail.statuses)
        ok = got == expected
        if not ok:
            self.stats.error("access log does not account for every session",
                             f"expected statuses {dict(expected)}, logged {dict(got)}")
        return {"expected": dict(expected), "logged": dict(got), "lines": self.tail.lines, "ok": ok}

    def check_upstream_resets(self) -> dict:
        """Resets the upstreams saw. Only a client's reset may become one (pyproxy passes it on):
        the framed-hash, download and TLS upstreams never get one from a client; echo and hash at
        most as many as the clients sent them."""
        try:
            seen = json.loads((self.workdir / "upstream-stats.json").read_text())["resets"]
        except (OSError, ValueError, KeyError) as exc:
            self.stats.error("upstream statistics unreadable", repr(exc))
            return {}
        with self.stats.lock:
            sent = dict(self.stats.resets_sent)
        what = {"framed": "framed hash upstream (behind TLS termination)", "download": "download upstream",
                "tls": "TLS upstream (passthrough, TLS to upstream)", "echo": "echo upstream",
                "hash": "hash upstream"}
        for name, count in seen.items():
            extra = count - sent.get(name, 0)
            if extra > 0:
                self.stats.error(f"upstream saw a reset no client sent: {what.get(name, name)}",
                                 f"{count} resets seen, {sent.get(name, 0)} sent by clients", count=extra)
        return {"seen": seen, "sent_by_clients": sent}

    def finish(self, start: dict, end: dict) -> None:
        upstream_resets = self.check_upstream_resets()
        access = self.reconcile_access_log()
        leak = {
            "rss_start_mib": start["rss_mib"], "rss_end_mib": end["rss_mib"],
            "rss_delta_mib": round(end["rss_mib"] - start["rss_mib"], 1),
            "pss_start_mib": start["pss_mib"], "pss_end_mib": end["pss_mib"],
            "pss_delta_mib": round(end["pss_mib"] - start["pss_mib"], 1),
            "fds_start": start["fds"], "fds_end": end["fds"], "fds_delta": end["fds"] - start["fds"],
            "rss_margin_mib": self.args.rss_margin, "fd_margin": self.args.fd_margin,
            "processes_start": start["processes"], "processes_end": end["processes"],
        }
        leak["rss_ok"] = leak["rss_delta_mib"] <= self.args.rss_margin
        leak["fds_ok"] = leak["fds_delta"] <= self.args.fd_margin
        peak = max(self.samples, key=lambda r: r["rss_mib"])
        s = self.stats
        with s.lock:
            errors = dict(s.errors)
            self.result = {
                "passed": (not errors and leak["rss_ok"] and leak["fds_ok"]
                           and all(r["ok"] for r in self.reloads)),
                "settings": vars(self.args) | {"workers": 2},
                "duration_s": round(time.monotonic() - self.t0, 1),
                "sessions": {
                    "short_ok": dict(s.ok), "short_ok_total": sum(s.ok.values()),
                    "long_started": s.long_started, "long_completed": s.long_completed,
                    "long_messages_echoed": s.long_messages,
                    "reached_proxy": sum(s.expected_status.values()),
                    "peak_open": max(r["open_sessions"] for r in self.samples),
                    "peak_proxy_sockets": max(r["proxy_sockets"] for r in self.samples),
                },
                "peak": {"rss_mib": peak["rss_mib"], "pss_mib": max(r["pss_mib"] for r in self.samples),
                         "fds": max(r["fds"] for r in self.samples)},
                "errors": errors, "error_count": sum(errors.values()), "error_examples": list(s.examples),
                "reloads": self.reloads, "leak_check": leak, "access_log": access,
                "upstream_resets": upstream_resets, "samples": self.samples,
                "workdir": str(self.workdir),
            }
        self.report()

    def report(self) -> None:
        r = self.result
        table = format_table(self.samples)
        print("\n" + table)
        print(summary_text(r))
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / "latest.json").write_text(json.dumps(r, indent=2) + "\n")
        (RESULTS / "latest.md").write_text(markdown(r, table))
        log(f"wrote {RESULTS / 'latest.json'} and {RESULTS / 'latest.md'}")

    # -- teardown --------------------------------------------------------------------------------
    def cleanup(self) -> None:
        if self.short is not None:
            self.short.stop.set()
        if self.long is not None:
            self.long.abort.set()
        if self.proxy is not None and self.proxy.proc is not None:
            pgid = self.proxy.proc.pid
            try:
                self.proxy.stop(signal.SIGTERM, timeout=15)
            except Exception as exc:
                log(f"stopping pyproxy: {exc!r}")
            _kill_group(pgid)
        if self.upstream_proc is not None:
            pgid = self.upstream_proc.pid
            if self.upstream_proc.poll() is None:
                self.upstream_proc.terminate()
                try:
                    self.upstream_proc.wait(10)
                except subprocess.TimeoutExpired:
                    self.upstream_proc.kill()
                    self.upstream_proc.wait(5)
            _kill_group(pgid)
            self.upstream_out.close()


def _kill_group(pgid: int) -> None:
    """Whatever is left of a process group we started (a worker that outlived its master)."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


# ==============================================================================================
# Reports
# ==============================================================================================
COLUMNS = [("t (s)", "t", "{:.0f}"), ("phase", "phase", "{}"), ("RSS MiB", "rss_mib", "{:.1f}"),
           ("PSS MiB", "pss_mib", "{:.1f}"), ("fds", "fds", "{}"), ("procs", "procs", "{}"),
           ("proxy sockets", "proxy_sockets", "{}"), ("open sessions", "open_sessions", "{}"),
           ("sessions/s", "sessions_per_s", "{:.1f}"), ("errors", "errors", "{}"), ("note", "note", "{}")]


def format_table(rows: list[dict]) -> str:
    head = [c[0] for c in COLUMNS]
    body = [[fmt.format(row[key]) for _, key, fmt in COLUMNS] for row in rows]
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(head)]

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(head), rule, *(line(b) for b in body)])


def summary_text(r: dict) -> str:
    leak, ses, acc = r["leak_check"], r["sessions"], r["access_log"]
    out = [
        f"verdict: {'PASS' if r['passed'] else 'FAIL'}",
        f"sessions: {ses['reached_proxy']} reached the proxy; {ses['short_ok_total']} short ok "
        f"({', '.join(f'{k} {v}' for k, v in sorted(ses['short_ok'].items()))}); long: {ses['long_started']} "
        f"started, {ses['long_completed']} closed cleanly, {ses['long_messages_echoed']} messages; "
        f"peak {ses['peak_open']} open, {ses['peak_proxy_sockets']} proxy sockets",
        "reloads: " + ", ".join(f"#{x['number']} at {x['t']:.0f}s {'ok' if x['ok'] else 'FAILED'} "
                                f"({x.get('errors_within_10s', 0)} errors within 10 s)"
                                for x in r["reloads"]),
        f"leak check: RSS {leak['rss_start_mib']} → {leak['rss_end_mib']} MiB ({leak['rss_delta_mib']:+} "
        f"MiB, limit +{leak['rss_margin_mib']:g}) {'ok' if leak['rss_ok'] else 'FAILED'}; "
        f"PSS {leak['pss_start_mib']} → {leak['pss_end_mib']} MiB; "
        f"fds {leak['fds_start']} → {leak['fds_end']} ({leak['fds_delta']:+}, limit "
        f"+{leak['fd_margin']}) {'ok' if leak['fds_ok'] else 'FAILED'}",
        "per process (RSS MiB, fds) at start: " + _procs(leak["processes_start"]) + "; at end: "
        + _procs(leak["processes_end"]),
        f"access log: {acc['lines']} lines, statuses {acc['logged']} (expected {acc['expected']}) "
        f"{'ok' if acc['ok'] else 'MISMATCH'}",
        f"upstream resets: seen {r['upstream_resets'].get('seen')}, sent by clients "
        f"{r['upstream_resets'].get('sent_by_clients')}",
        f"errors: {r['error_count']}" + "".join(f"\n  {v:6d}  {k}" for k, v in sorted(r["errors"].items())),
    ]
    for ex in r["error_examples"][:10]:
        out.append(f"  e.g. t={ex['t']}s {ex['category']}: {ex['detail']}")
    if not r["passed"]:
        out.append(f"pyproxy's logs are kept in {r['workdir']}")
    return "\n".join(out)


def _procs(each: list[dict]) -> str:
    names = []
    for p in each:
        title = p["title"]
        if "master" in title:
            name = "master"
        else:
            name = "#" + title.split("#", 1)[1].split()[0] if "#" in title else title
        names.append(f"{name} {p['rss_mib']}/{p['fds']}")
    return ", ".join(names)


def markdown(r: dict, table: str) -> str:
    s = r["settings"]
    return (f"# Soak: {'PASS' if r['passed'] else 'FAIL'}\n\n"
            f"{time.strftime('%Y-%m-%d %H:%M:%S %z')}, {s['seconds']} s of load, {s['long']} long sessions "
            f"({s['long_tls']:.0%} TLS), {s['clients']} short-session threads at {s['short_rate']:g}/s, "
            f"{s['reloads']} reloads, pyproxy with 2 workers; total run {r['duration_s']} s.\n\n"
            f"{table}\n\n```\n{summary_text(r)}\n```\n")


# ==============================================================================================
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m soak.run", description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=float(os.environ.get("SOAK_SECONDS", 120)),
                   help="load duration (default: $SOAK_SECONDS or 120)")
    p.add_argument("--long", type=int, default=int(os.environ.get("SOAK_LONG", 3000)),
                   help="concurrent long sessions (default 3000)")
    p.add_argument("--long-tls", type=float, default=0.2, help="share of long sessions TLS terminated (0.2)")
    p.add_argument("--life-min", type=float, default=30.0,
                   help="shortest long-session life, s (30; longest: --seconds)")
    p.add_argument("--interval-min", type=float, default=2.0, help="long sessions send every 2..6 s")
    p.add_argument("--interval-max", type=float, default=6.0)
    p.add_argument("--open-rate", type=float, default=600.0,
                   help="new long sessions per second at most (600)")
    p.add_argument("--clients", type=int, default=6, help="short-session threads (6)")
    p.add_argument("--short-rate", type=float, default=60.0,
                   help="short sessions per second, all threads (60)")
    p.add_argument("--reloads", type=int, default=2, help="SIGHUPs during the load (2)")
    p.add_argument("--sample", type=float, default=5.0, help="seconds between samples (5)")
    p.add_argument("--idle", type=float, default=5.0, help="idle seconds before the final sample (5)")
    p.add_argument("--warmup", type=float, default=30.0,
                   help="seconds of the same load before the baseline is taken (0: cold baseline) (30)")
    p.add_argument("--rss-margin", type=float, default=20.0,
                   help="leak check: pyproxy's total RSS at the end may exceed the "
                        "start by this many MiB (20)")
    p.add_argument("--fd-margin", type=int, default=10,
                   help="leak check: pyproxy's total fds at the end may exceed the start by this many (10)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--serve-upstreams", metavar="DIR", help=argparse.SUPPRESS)
    return p.parse_args(argv)


class _Watchdog(BaseException):
    pass


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.serve_upstreams:
        return serve_upstreams(Path(args.serve_upstreams))
    soak = Soak(args)
    budget = int(args.seconds + 4 * ECHO_TIMEOUT + 180)        # setup, drain, idle, stop: all bounded

    def on_alarm(signum, frame):
        raise _Watchdog()

    def on_term(signum, frame):
        raise KeyboardInterrupt()
    signal.signal(signal.SIGALRM, on_alarm)
    # Ctrl-C, and a SIGTERM (a CI timeout, `kill`), stop everything too; also when started in the
    # background, where the shell left SIGINT ignored.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, on_term)
    signal.alarm(budget)
    code = 1
    try:
        code = soak.run()
    except KeyboardInterrupt:
        log("interrupted: stopping everything")
        code = 130
    except _Watchdog:
        log(f"watchdog: the soak overran its {budget}s budget, stopping everything")
        code = 1
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGINT, signal.SIG_IGN)     # a second Ctrl-C must not cut the cleanup short
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        soak.cleanup()
        if code == 0:
            shutil.rmtree(soak.workdir, ignore_errors=True)
        else:
            log(f"pyproxy's logs: {soak.workdir}")
    return code


if __name__ == "__main__":
    sys.exit(main())
