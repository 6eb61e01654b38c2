"""The splice pump on real sockets: bytes arrive intact, half-close passes, backpressure holds."""

from __future__ import annotations

import hashlib
import os
import socket

from pyproxy.forward import DONE, DST_ERROR, MORE, SRC_ERROR, WAIT, PipePool, SplicePump


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


def test_bytes_pass_intact_and_fin_is_forwarded():
    pool = PipePool()
    client, pump, server = make_pump(pool)
    payload = os.urandom(3 << 20)
    received = bytearray()
    view = memoryview(payload)
    while view or not pump.done:
        if view:
            try:
                view = view[client.send(view[:1 << 16]):]
            except BlockingIOError:
                pass
            if not view:
                client.shutdown(socket.SHUT_WR)
        pump.readable = pump.writable = True
        result = pump.run(0.0)
        assert result in (WAIT, MORE, DONE)
        received += drain(server)
    received += drain(server)
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
    client, pump, server = make_pump(pool)
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
