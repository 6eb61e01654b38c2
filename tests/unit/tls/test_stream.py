"""TLSStream on real sockets: handshakes through memory BIOs, bytes intact both ways under
backpressure, close_notify that never discards the peer's data, tickets that ride the first reply."""

from __future__ import annotations

import hashlib
import os
import socket
import ssl

import pytest

from pyproxy.loop import Loop
from pyproxy.tls.stream import RECORD_MAX, TLSStream
from tests.support import make_cert


@pytest.fixture(scope="module")
def server_context(tmp_path_factory):
    cert, key = make_cert(tmp_path_factory.mktemp("stream"), "stream.test", ["stream.test"])
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.options |= ssl.OP_IGNORE_UNEXPECTED_EOF
    ctx.load_cert_chain(str(cert), str(key))
    return ctx


def client_context():
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.options |= ssl.OP_IGNORE_UNEXPECTED_EOF
    return ctx


def connected_pair(server_context):
    """A client and a server TLSStream over a socketpair, handshake done."""
    a, b = socket.socketpair()
    a.setblocking(False)
    b.setblocking(False)
    client = TLSStream(a, client_context(), False, memoryview(bytearray(65536)), "stream.test")
    server = TLSStream(b, server_context, True, memoryview(bytearray(65536)))
    done = {client: False, server: False}
    for _ in range(20):
        for side in (client, server):
            if not done[side]:
                done[side] = side.handshake()
        if all(done.values()):
            return client, server
    raise AssertionError("handshake did not complete")


def read_available(stream: TLSStream) -> tuple[bytes, bool]:
    """Everything `stream` can decrypt now, and whether the peer ended its side."""
    out = bytearray()
    buf = memoryview(bytearray(65536))
    while True:
        try:
            n = stream.recv_into(buf)
        except ssl.SSLWantReadError:
            return bytes(out), False
        if n == 0:
            return bytes(out), True
        out += buf[:n]


def test_handshake_then_bytes_both_ways(server_context):
    client, server = connected_pair(server_context)
    assert server.version() == client.version() == "TLSv1.3"
    assert server.cipher()[0] == client.cipher()[0]
    client.send(b"ping from the client")
    client.flush()
    assert read_available(server) == (b"ping from the client", False)
    server.send(b"pong from the server")
    server.flush()
    assert read_available(client) == (b"pong from the server", False)


def test_backpressure_holds_ciphertext_and_loses_nothing(server_context):
    client, server = connected_pair(server_context)
    payload = os.urandom(8 << 20)
    view = memoryview(payload)
    received = bytearray()
    refused = 0
    while not refused:                 # the client reads nothing until the server is refused
        taken = _send_some(server, view)
        if taken is None:
            refused += 1
        else:
            view = view[taken:]
    assert server.pending > 0          # the ciphertext the socket would not take waits
    while view or server.pending:
        taken = _send_some(server, view) if view else 0
        if taken is None:
            refused += 1
        else:
            view = view[taken:]
        server.flush()
        received += read_available(client)[0]
    received += read_available(client)[0]
    assert hashlib.sha256(received).digest() == hashlib.sha256(payload).digest()


def _send_some(stream: TLSStream, view: memoryview):
    """What send() took (then flushed), or None when it refused."""
    try:
        taken = stream.send(view[:65536])
    except BlockingIOError:
        return None
    stream.flush()
    return taken


def test_close_notify_waits_until_the_peers_records_are_read(server_context):
    client, server = connected_pair(server_context)
    client.send(b"x" * 1000)
    client.flush()
    small = memoryview(bytearray(10))
    assert server.recv_into(small) == 10          # the rest of the record waits inside OpenSSL
    assert server.close_notify() is False           # it would be discarded by CPython's shutdown()
    rest, ended = read_available(server)
    assert (len(rest), ended) == (990, False)
    assert server.close_notify() is True
    server.shutdown(socket.SHUT_WR)
    assert read_available(client) == (b"", True)
    client.send(b"after the server's close_notify")  # TLS half-close: the other way still works
    client.flush()
    assert read_available(server) == (b"after the server's close_notify", False)


def test_tls13_tickets_leave_with_the_handshake(server_context):
    """Not with the first reply: a client with Nagle's algorithm on waits for its Finished to be
    acknowledged before it sends its request (test_tls has the whole story)."""
    client, server = connected_pair(server_context)
    assert read_available(client) == (b"", False)
    assert client.obj.session.has_ticket            # read before the server said anything
    server.send(b"first reply")
    server.flush()
    assert read_available(client) == (b"first reply", False)


def test_a_peer_that_is_not_tls_fails_the_handshake_with_an_error(server_context):
    a, b = socket.socketpair()
    a.setblocking(False)
    b.setblocking(False)
    server = TLSStream(b, server_context, True, memoryview(bytearray(65536)))
    a.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    with pytest.raises(ssl.SSLError):
        server.handshake()


def test_a_short_read_spares_the_next_recv_until_the_next_poll(server_context):
    """nginx's rule: after a recv that came back short, no recv until epoll could report more;
    once a FIN was reported, every read goes to the socket."""
    loop = Loop()
    try:
        client, server = connected_pair(server_context)
        server.loop = loop
        client.send(b"first")
        client.flush()
        assert read_available(server) == (b"first", False)       # short read at poll 0
        client.send(b"second")
        client.flush()
        assert read_available(server) == (b"", False)            # same tick: not read yet
        loop.polls += 1                                          # the next poll reports it
        assert read_available(server) == (b"second", False)
        client.send(b"third")
        client.flush()
        client.shutdown(socket.SHUT_WR)
        server.hup = True                                        # epoll said: FIN
        assert read_available(server) == (b"third", True)
    finally:
        loop.close()


def test_what_a_pump_wrote_to_tls_leaves_even_when_its_source_then_failed(server_context):
    """A plain upstream that sends its last reply and resets at once: the pump reads the reply,
    writes it to the client's TLS stream, then reads the reset. The records must still leave:
    before, the end-of-run flush was skipped on a source error and the reply was lost."""
    import select

    from pyproxy.forward import SRC_ERROR, BufferPump

    client, server = connected_pair(server_context)          # server: our side of the client
    listener = socket.create_server(("127.0.0.1", 0))
    upstream = socket.create_connection(listener.getsockname())
    ours, _ = listener.accept()
    listener.close()
    ours.setblocking(False)
    upstream.sendall(b"the last reply")
    upstream.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    upstream.close()
    poller = select.poll()
    poller.register(ours, select.POLLIN)
    assert poller.poll(5000)[0][1] & (select.POLLHUP | select.POLLERR)   # the reply and the reset are queued

    pump = BufferPump(memoryview(bytearray(65536)), ours, server)
    pump.readable = pump.writable = True
    pump.hup = True
    assert pump.run(0.0) == SRC_ERROR
    assert pump.received == pump.sent == len(b"the last reply") and not pump.pending
    assert read_available(client)[0] == b"the last reply"
    ours.close()


def test_buffered_full_records_come_out_of_one_read(server_context):
    # Bulk: one recv_into gives the destination several 16 KiB records at once (one send for
    # them, as nginx's ngx_ssl_recv fills its buffer), and the bytes stay whole and in order.
    client, server = connected_pair(server_context)
    payload = os.urandom(4 * RECORD_MAX)
    assert client.send(payload) == len(payload)
    client.flush()
    buf = memoryview(bytearray(65536))
    first = server.recv_into(buf)
    assert first > RECORD_MAX
    received = bytes(buf[:first]) + read_available(server)[0]
    assert received == payload
