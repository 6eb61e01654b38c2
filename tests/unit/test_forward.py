"""The pumps on real sockets: bytes arrive intact, half-close passes, backpressure holds, and a plain
direction moves from recv/send to splice once it carries bulk."""

from __future__ import annotations

import hashlib
import os
import socket

from pyproxy.forward import (
    DONE,
    DST_ERROR,
    MORE,
    SCRATCH_SIZE,
    SRC_ERROR,
    WAIT,
    BufferPump,
    PipePool,
    SplicePump,
)


def pair():
    a, b = socket.socketpair()
    a.setblocking(False)
    b.setblocking(False)
    return a, b


def make_pump(pool):
    """client ⇄ [src  pump  dst] ⇄ server, each side a real socketpair."""
    client, src = pair()
    dst, server = pair()
    pump = SplicePump(pool, src, dst)
    pump.readable = pump.writable = True
    return client, pump, server


def drain(sock):
    out = bytearray()
    while True:
        try:
            chunk = sock.recv(1 << 20)
        except BlockingIOError:
            return bytes(out)
        if not chunk:
            return bytes(out)
        out += chunk


def pump_through(client, pump, server, payload: bytes, chunk: int):
    """Send payload and a FIN from `client`, run the pump as the session does (a BufferPump that
    reports bulk is swapped for its SplicePump) until the FIN is passed on. Returns the bytes
    `server` got, the last pump, and how many bytes were read before a switch (None: no switch)."""
    received = bytearray()
    view = memoryview(payload)
    switched_at = None
    while view or not pump.done:
        if view:
            try:
                view = view[client.send(view[:chunk]):]
            except BlockingIOError:
                pass
            if not view:
                client.shutdown(socket.SHUT_WR)
        pump.readable = pump.writable = True
        result = pump.run(0.0)
        assert result in (WAIT, MORE, DONE)
        if result == MORE and pump.bulk:               # what Session.forward does
            switched_at = pump.received
            pump = pump.spliced()
            assert isinstance(pump, SplicePump) and not pump.bulk
        received += drain(server)
    received += drain(server)
    return bytes(received), pump, switched_at


def test_bytes_pass_intact_and_fin_is_forwarded():
    pool = PipePool()
    client, pump, server = make_pump(pool)
    payload = os.urandom(3 << 20)
    received, pump, _ = pump_through(client, pump, server, payload, 1 << 16)
    assert hashlib.sha256(received).digest() == hashlib.sha256(payload).digest()
    assert pump.received == pump.sent == len(payload)
    assert pump.pipe is None                     # the pipe went back to the pool


def test_idle_pump_holds_no_pipe():
    pool = PipePool()
    client, pump, server = make_pump(pool)
    client.sendall(b"hello")
    pump.run(0.0)
    assert server.recv(10) == b"hello"
    assert pump.pipe is None and not pump.readable   # dry socket seen, nothing borrowed
    assert pool.size >= 64 * 1024


def test_backpressure_bounds_buffering_to_one_pipe():
    pool = PipePool()
    client, pump, _server = make_pump(pool)
    sent = 0
    chunk = b"x" * 65536
    for _ in range(400):                          # the server never reads
        try:
            sent += client.send(chunk)
        except BlockingIOError:
            pass
        pump.readable = True
        pump.run(1.0)
    assert pump.pending <= pool.size
    assert pump.blocked_at == 1.0 and not pump.writable
    assert pump.received - pump.sent == pump.pending
    assert sent > pump.received                   # the rest waits in the kernel: TCP flow control


def test_source_reset_and_destination_gone_are_reported():
    pool = PipePool()
    client, pump, server = make_pump(pool)
    client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    client.close()
    result = pump.run(0.0)
    assert result in (DONE, SRC_ERROR)          # AF_UNIX pairs report a close as EOF

    client, pump, server = make_pump(pool)
    server.close()
    client.sendall(b"data")
    assert pump.run(0.0) == DST_ERROR


# -- recv/send first, splice for bulk ------------------------------------------------------------
class CountingSocket:
    """A real socket whose recv_into calls are counted (the C socket type takes no attributes)."""

    def __init__(self, sock):
        self.sock = sock
        self.recvs = 0

    def recv_into(self, buffer):
        self.recvs += 1
        return self.sock.recv_into(buffer)

    def fileno(self):
        return self.sock.fileno()

    def shutdown(self, how):
        self.sock.shutdown(how)


def make_buffer_pump(pool):
    client, src = pair()
    dst, server = pair()
    pump = BufferPump(memoryview(bytearray(SCRATCH_SIZE)), CountingSocket(src), dst, pool)
    pump.readable = pump.writable = True
    return client, pump, server


def test_small_message_is_one_recv_and_no_pipe():
    """nginx's rule: a short recv emptied the socket, so no second recv only to hear EAGAIN."""
    pool = PipePool()
    client, pump, server = make_buffer_pump(pool)
    client.sendall(b"GET / HTTP/1.1\r\n\r\n")
    assert pump.run(0.0) == WAIT
    assert server.recv(100) == b"GET / HTTP/1.1\r\n\r\n"
    assert pump.src.recvs == 1 and not pump.readable
    assert not pump.bulk                               # stays on recv/send: no pipe for it


def test_reported_fin_is_read_after_a_short_read():
    """Bytes and FIN queued together: once epoll reported the FIN, a short read is not trusted."""
    client, pump, server = make_buffer_pump(PipePool())
    client.sendall(b"last words")
    client.shutdown(socket.SHUT_WR)
    pump.hup = True
    assert pump.run(0.0) == DONE
    assert drain(server) == b"last words"              # and then EOF: the FIN was passed on


def test_bulk_switches_to_splice_without_reordering():
    pool = PipePool()
    client, pump, server = make_buffer_pump(pool)
    payload = os.urandom(4 << 20)
    received, pump, switched_at = pump_through(client, pump, server, payload, 1 << 18)
    assert switched_at == SCRATCH_SIZE                 # one full buffer read, then splice
    assert hashlib.sha256(received).digest() == hashlib.sha256(payload).digest()
    assert pump.received == pump.sent == len(payload)  # the counters carried over
