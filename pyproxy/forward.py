"""Moving bytes: one pump per direction, recv/send through a buffer, or socket → pipe → socket with
`os.splice` (zero copy) once a plain direction carries bulk.

A pump is told readiness by the session (edge-triggered epoll: `readable`/`writable` stay True until
a syscall answers EAGAIN, or a plain recv comes back short) and moves bytes until its source is dry,
its destination is full, or its budget for this tick is spent. As in nginx's
`ngx_stream_proxy_process`, the direction is not a code path: the session owns two pumps of the same
class with source and destination swapped, where nginx passes a `from_upstream` flag. What differs
is how bytes move, so there are two pump classes, each serving both directions: `BufferPump`
(recv/send through the worker's scratch buffer; any side may be TLS) and `SplicePump` (plain to
plain, zero copy), to which a BufferPump hands its direction over once it carries bulk.

Pipes are borrowed from the worker's pool only while bytes are in flight, so an idle session holds
no pipe at all: two sockets, two fds. A pipe holds at most `PipePool.size` bytes, which bounds what a
session buffers per direction whatever its peers do (backpressure: a destination that does not
drain stops the source from being read, and TCP's window does the rest).
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import ssl
from typing import Literal, Protocol

from pyproxy.tls.stream import TLSStream

SPLICE_FLAGS = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK
# 1 MiB, the default /proc/sys/fs/pipe-max-size: a bulk direction moves up to 1 MiB per pair of splice
# calls. Measured here, one iperf3 stream, worker CPU per GB: 0.12 s against 0.14 with 256 KiB (0.08
# against 0.11 under `worker_sched_policy: batch`), throughput about 5 % higher. A pipe's slots count
# against the per-user budget whether filled or not (pipe-user-pages-soft, 64 MiB unless root), so a
# worker keeps few idle ones.
PIPE_SIZE = 1024 * 1024
POOL_KEEP = 16          # idle pipes a worker keeps for reuse; more are closed when returned

# What a pump's run() reports.
WAIT = 0        # nothing more can move until the next readiness event
MORE = 1        # budget spent with bytes still moving: run again on the next tick
DONE = 2        # source ended and everything was delivered; the destination got a FIN
SRC_ERROR = 3   # reading the source failed (a reset); errno in pump.error
DST_ERROR = 4   # writing the destination failed (reset or broken pipe); errno in pump.error
LOCAL_ERROR = 5  # our own resources failed (no fd for a pipe); errno in pump.error

_BUDGET = 16    # splice round-trips per run: keeps one bulk session from starving the others


class Stream(Protocol):
    """What a pump moves bytes between: a socket, or a TLSStream, which looks like one."""

    def fileno(self) -> int: ...
    def recv_into(self, buffer: memoryview, /) -> int: ...
    def send(self, data: memoryview, /) -> int: ...
    def shutdown(self, how: int, /) -> None: ...


class PipePool:
    """Reusable, enlarged, non-blocking pipes for one worker."""

    def __init__(self, size: int = PIPE_SIZE, keep: int = POOL_KEEP):
        self.wanted = size
        self.keep = keep
        self.free: list[tuple[int, int]] = []
        self.size = self._probe_size()

    def _new(self) -> tuple[int, int]:
        r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, self.wanted)
        except OSError:
            # Over /proc/sys/fs/pipe-max-size or the per-user pipe page budget: the pipe keeps
            # the size it was made with (64 KiB; 8 KiB past the budget), just more syscalls per MiB.
            pass
        return r, w

    def _probe_size(self) -> int:
        pipe = self._new()
        size = fcntl.fcntl(pipe[1], fcntl.F_GETPIPE_SZ)
        self.free.append(pipe)
        return size

    def get(self) -> tuple[int, int]:
        return self.free.pop() if self.free else self._new()

    def put(self, pipe: tuple[int, int]) -> None:
        """Return an EMPTY pipe for reuse."""
        if len(self.free) < self.keep:
            self.free.append(pipe)
        else:
            self.discard(pipe)

    @staticmethod
    def discard(pipe: tuple[int, int]) -> None:
        """Close a pipe that may still hold bytes (an aborted session)."""
        os.close(pipe[0])
        os.close(pipe[1])

    def close(self) -> None:
        for pipe in self.free:
            self.discard(pipe)
        self.free.clear()


class SplicePump:
    """One direction of a plain-TCP session: src socket → pipe → dst socket."""

    __slots__ = ("pool", "src", "dst", "readable", "writable", "eof", "done", "pending", "pipe",
                 "received", "sent", "error", "last_io", "blocked_at")
    bulk: Literal[False] = False        # already spliced (see BufferPump.bulk)
    tls_dst: None = None                # plain to plain (see BufferPump.tls_dst)

    def __init__(self, pool: PipePool, src: Stream, dst: Stream):
        self.pool = pool
        self.src = src
        self.dst = dst
        self.readable = False
        self.writable = False
        self.eof = False          # the source sent its FIN (or the session decided it is over)
        self.done = False         # the FIN was passed on
        self.pending = 0          # bytes sitting in the pipe
        self.pipe: tuple[int, int] | None = None
        self.received = 0         # bytes read from src
        self.sent = 0             # bytes written to dst
        self.error = 0
        self.last_io = 0.0
        self.blocked_at = 0.0     # when dst last refused bytes we hold; 0 when nothing is stuck

    def run(self, now: float) -> int:
        if self.done:
            return DONE
        pool = self.pool
        src_fd = self.src.fileno()
        dst_fd = self.dst.fileno()
        size = pool.size
        for _ in range(_BUDGET):
            moved = False
            room = size - self.pending
            if self.readable and not self.eof and room > 0:
                pipe = self.pipe
                if pipe is None:
                    try:
                        pipe = self.pipe = pool.get()
                    except OSError as exc:     # EMFILE/ENFILE: no pipe to be had right now
                        self.error = exc.errno or errno.EMFILE
                        return LOCAL_ERROR
                try:
                    n = os.splice(src_fd, pipe[1], room, flags=SPLICE_FLAGS)
                except BlockingIOError:
                    # With an empty pipe EAGAIN means the socket is dry. With bytes in the pipe it
                    # may instead mean the pipe ran out of slots: keep `readable` and retry after
                    # draining, or an edge-triggered session would stall with data in the socket.
                    if not self.pending:
                        self.readable = False
                except OSError as exc:
                    self.error = exc.errno or errno.ECONNRESET
                    return SRC_ERROR
                else:
                    if n:
                        self.pending += n
                        self.received += n
                        moved = True
                        # A short read does NOT prove the socket drained here (nginx's rule for
                        # recv): a splice also stops when the pipe runs out of slots, one per skb
                        # fragment, with bytes still queued. Only EAGAIN clears `readable`.
                    else:
                        self.eof = True
            if self.pending and self.writable:
                try:
                    # Bytes pending are bytes in a pipe: self.pipe is set. (A check here would cost
                    # on every write of a bulk transfer, for mypy's sake only.)
                    n = os.splice(self.pipe[0], dst_fd, self.pending,  # type: ignore[index]
                                  flags=SPLICE_FLAGS)
                except BlockingIOError:
                    self.writable = False
                    if not self.blocked_at:
                        self.blocked_at = now
                except OSError as exc:
                    self.error = exc.errno or errno.ECONNRESET
                    return DST_ERROR
                else:
                    self.pending -= n
                    self.sent += n
                    self.blocked_at = 0.0
                    moved = True
            if not self.pending:
                if self.pipe is not None:
                    pool.put(self.pipe)
                    self.pipe = None
                if self.eof:
                    self.finish()
                    return DONE
            if not moved:
                if self.pending and not self.writable and not self.blocked_at:
                    self.blocked_at = now
                return WAIT
            self.last_io = now
        return MORE

    def finish(self) -> None:
        """Pass the FIN on: the half-close of nginx's stream proxy."""
        self.done = True
        try:
            self.dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass    # the destination is already gone; its own events end the session

    def release(self) -> None:
        """Give back (or throw away) the pipe when the session ends."""
        if self.pipe is not None:
            if self.pending:
                self.pool.discard(self.pipe)
            else:
                self.pool.put(self.pipe)
            self.pipe = None
            self.pending = 0


_WANT = (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError)
SCRATCH_SIZE = 64 * 1024


class BufferPump:
    """One direction through a worker-wide scratch buffer: recv_into, then send.

    It serves every direction where a side speaks TLS (that side is a TLSStream), and every plain
    direction until it turns out to be bulk (see `bulk`): for a small message recv/send costs less
    than splice, which takes two system calls and a pipe for the same bytes.

    Only what a destination refuses is copied out of the scratch buffer (into `held`), so an idle
    session holds no buffer either, and a stuck one holds at most one read's worth (plus, towards
    TLS, about a buffer of ciphertext in the stream's backlog). OpenSSL may keep decrypted bytes that
    epoll never reports, so a TLS source is read until it says "want read"; a plain socket whose
    recv came back short is empty (nginx's rule), unless its peer's FIN was reported (`hup`).
    """

    __slots__ = ("scratch", "src", "dst", "tls_dst", "readable", "writable", "eof", "done", "held",
                 "received", "sent", "error", "last_io", "blocked_at", "plain_src", "hup",
                 "splice_pool", "bulk")

    def __init__(self, scratch: memoryview, src: Stream, dst: Stream, splice_pool: PipePool | None = None):
        self.scratch = scratch
        self.src = src
        self.dst = dst
        self.tls_dst: TLSStream | None = dst if isinstance(dst, TLSStream) else None
        # A short recv empties a plain socket: edge-triggered epoll reports what arrives after it,
        # so no recv is made only to hear EAGAIN. A FIN queued before that short read would not be
        # reported again: once epoll reported one (`hup`), the socket is read until EAGAIN or EOF.
        self.plain_src = not isinstance(src, TLSStream)
        self.hup = False
        # Both sides plain: a read that fills the scratch buffer means bulk is flowing, and from
        # then on splice moves it without copying (HAProxy's splice-auto). The session swaps this
        # pump for `spliced()` when run() returns MORE with `bulk` set.
        self.splice_pool = splice_pool
        self.bulk = False
        self.readable = False
        self.writable = False
        self.eof = False
        self.done = False
        self.held: memoryview | None = None    # bytes read but refused by dst, waiting for EPOLLOUT
        self.received = 0
        self.sent = 0
        self.error = 0
        self.last_io = 0.0
        self.blocked_at = 0.0

    @property
    def pending(self) -> int:
        held = len(self.held) if self.held is not None else 0
        return held + self.tls_dst.pending if self.tls_dst is not None else held

    def _blocked(self, now: float) -> int:
        self.writable = False
        if not self.blocked_at:
            self.blocked_at = now
        return WAIT

    def _send(self, data: memoryview, now: float, scratch: bool) -> int:
        """Write what dst takes; keep the rest in `held`. Returns -1 on a write error."""
        try:
            n = self.dst.send(data)
        except _WANT:
            n = 0
        except OSError as exc:
            self.error = exc.errno or errno.ECONNRESET
            return -1
        self.sent += n
        if n < len(data):
            # The scratch buffer is shared by every session: keep a private copy of what is left.
            self.held = memoryview(bytes(data[n:])) if scratch else data[n:]
            self._blocked(now)
        else:
            self.held = None
            self.blocked_at = 0.0
        return n

    def run(self, now: float) -> int:
        """Move what can move now; what this run wrote towards TLS then leaves in one send (see
        TLSStream.send), also when the source has just failed: what it sent before is still owed
        to the destination. (One method, not a loop and a wrapper that flushes: a run is the pump's
        one call per readiness event, a dozen per short TLS session.)"""
        if self.done:
            return DONE
        scratch = self.scratch
        tls_dst = self.tls_dst
        for _ in range(_BUDGET):
            if tls_dst is not None and tls_dst.backlog is not None:
                # Ciphertext of an earlier write goes out before anything else.
                if not self.writable:
                    result = WAIT
                    break
                try:
                    flushed = tls_dst.flush()
                except OSError as exc:
                    self.error = exc.errno or errno.ECONNRESET
                    return DST_ERROR
                if not flushed:
                    result = self._blocked(now)
                    break
                self.blocked_at = 0.0
                self.last_io = now
            if self.held is not None:
                if not self.writable:
                    result = WAIT
                    break
                if self._send(self.held, now, scratch=False) < 0:
                    return DST_ERROR
                if self.held is not None:
                    result = WAIT
                    break
                self.last_io = now
                continue
            if self.bulk:
                result = MORE       # everything read was delivered: the session switches to splice
                break
            if self.eof:
                result = DONE if self.finish() else WAIT
                break
            if not self.readable:
                result = WAIT
                break
            try:
                n = self.src.recv_into(scratch)
            except _WANT:
                self.readable = False
                result = WAIT
                break
            except ssl.SSLError:
                self.error = errno.EPROTO
                result = SRC_ERROR
                break
            except OSError as exc:
                self.error = exc.errno or errno.ECONNRESET
                result = SRC_ERROR
                break
            if not n:
                self.eof = True
                continue
            self.received += n
            self.last_io = now
            if n < len(scratch):
                if self.plain_src and not self.hup:
                    self.readable = False
            elif self.splice_pool is not None:
                self.bulk = True
            if not self.writable:
                self.held = memoryview(bytes(scratch[:n]))
                result = self._blocked(now)
                break
            if self._send(scratch[:n], now, scratch=True) < 0:
                return DST_ERROR
        else:
            result = MORE
        if tls_dst is not None and tls_dst.unsent:
            try:
                if not tls_dst.flush():
                    self._blocked(now)
            except OSError as exc:
                self.error = exc.errno or errno.ECONNRESET
                return DST_ERROR
        return result

    def finish(self) -> bool:
        """Pass the FIN on; towards a TLS peer, after a close_notify (see TLSStream.close_notify).
        False while the close_notify has to wait: run() comes back here once it can go."""
        tls = self.tls_dst
        if tls is not None and not tls.close_notify():
            return False
        self.done = True
        try:
            self.dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        return True

    def release(self) -> None:
        self.held = None

    def spliced(self) -> SplicePump:
        """This direction, from now on through a pipe: called once `bulk` is set and nothing is
        held, so no byte can overtake another."""
        pool = self.splice_pool
        assert pool is not None, "only a pump between two plain sockets turns bulk"
        pump = SplicePump(pool, self.src, self.dst)
        pump.readable = self.readable
        pump.writable = self.writable
        pump.received = self.received
        pump.sent = self.sent
        pump.last_io = self.last_io
        return pump
