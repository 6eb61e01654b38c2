"""A connected session's bytes: the two pumps (pyproxy.forward), the switch to splice, how a
reset on one side ends the other, and forwarding's timeouts (read_timeout, write_timeout)."""

from __future__ import annotations

import errno
import os
from typing import TYPE_CHECKING

from pyproxy.config.model import STATUS_BAD_GATEWAY, STATUS_BAD_REQUEST, STATUS_INTERNAL, STATUS_OK
from pyproxy.forward import DONE, LOCAL_ERROR, MORE, SRC_ERROR, BufferPump
from pyproxy.phases import CLIENT_HUP, FORWARDING, UPSTREAM_HUP, Pump, SessionBase, send_reset
from pyproxy.tls.stream import TLSStream

if TYPE_CHECKING:
    from pyproxy.config.model import Service
    from pyproxy.phases import Connection


class Forwarder(SessionBase):
    """Forwarding, from `forward_phase()` (the connector calls it once connected) to the close.

    Session passes it the readiness events of both sockets in the FORWARDING phase (setting the
    pumps' readable/writable flags, then `forward()`) and its timer's expiry (`_forwarding_timeouts`).
    """

    __slots__ = ()
    # The two pumps: client → upstream and upstream → client. Unset until forward_phase makes them
    # (just before the phase becomes FORWARDING): typed without None, so forwarding needs no check.
    c2u: Pump
    u2c: Pump
    scheduled: bool                 # a _resume is queued for the next tick
    # The connector's: the connected upstream, and the service's read and write timeouts.
    service: Service
    upstream: Connection | None

    def forward_phase(self, upstream_readable: bool = True) -> None:
        """`upstream_readable`: False when a plain upstream's connect event said it has sent nothing,
        so the first pass makes no recv only to hear EAGAIN (a system call and an exception); what
        it sends later is a new edge. The client is always tried: its events while connecting were
        not recorded, and a TLS client may hold decrypted bytes that no event announces."""
        client, upstream = self.client, self.upstream
        if TYPE_CHECKING:       # for mypy only, here and below: what the phase guarantees
            assert upstream is not None
        # recv/send first; two plain sockets switch a direction to splice once it carries bulk.
        pool = None if isinstance(client, TLSStream) or isinstance(upstream, TLSStream) else self.ctx.pool
        scratch = self.ctx.scratch
        self.c2u = BufferPump(scratch, client, upstream, pool)
        self.u2c = BufferPump(scratch, upstream, client, pool)
        self.c2u.hup = bool(self.hups & CLIENT_HUP)
        self.u2c.hup = bool(self.hups & UPSTREAM_HUP)
        # What we know of readiness so far; anything unknown is simply tried (EAGAIN costs little).
        self.c2u.readable = True
        self.c2u.writable = True
        self.u2c.readable = upstream_readable
        self.u2c.writable = True
        self.phase = FORWARDING
        now = self.loop.now
        self.c2u.last_io = self.u2c.last_io = now
        service = self.service
        self._due_by(now + (service.read_timeout if service.read_timeout < service.write_timeout
                            else service.write_timeout))     # min() of two: a builtin call dearer than this
        self.forward()

    def forward(self) -> None:
        now = self.loop.now
        up = self.c2u.run(now)
        if up >= SRC_ERROR:
            self._pump_failed(self.c2u, up, client_is_source=True)
            return
        if up == MORE and self.c2u.bulk:
            self.c2u = self.c2u.spliced()
        down = self.u2c.run(now)
        if down >= SRC_ERROR:
            self._pump_failed(self.u2c, down, client_is_source=False)
            return
        if down == MORE and self.u2c.bulk:
            self.u2c = self.u2c.spliced()
        if up == DONE and down == DONE:
            self.close(STATUS_OK)
        elif (up == MORE or down == MORE) and not self.scheduled:
            self.scheduled = True
            self.loop.call_soon(self._resume)

    # What an event tells one pump: the client readable, or the upstream writable while client →
    # upstream was waiting for it (`writable` False: the pump held bytes or ciphertext it could not
    # send), moves client → upstream; and the other way round. A pump the event tells nothing has
    # nothing new to do: it stopped because its source was dry or its destination full, and neither
    # changed; one that stopped with work left queued a _resume, which runs both. Except: a pump
    # whose FIN waits for its close_notify, which waits until the other pump has read the records
    # its TLS peer sent (TLSStream.close_notify), runs after it; and towards a TLS upstream both
    # run on every upstream event, since reading the upstream may leave ciphertext for client →
    # upstream to send (the answer to a TLS 1.2 renegotiation, TLSStream._answer_peer). So the
    # pumps of a short session run about half as often. Both run (forward) when the event
    # concerns both. The two methods mirror each other, as forward() spells both directions out:
    # one method taking the direction would add a call to every event.
    def forward_up(self) -> None:
        """Client → upstream only; see above."""
        c2u = self.c2u
        up = c2u.run(self.loop.now)
        if up >= SRC_ERROR:
            self._pump_failed(c2u, up, client_is_source=True)
        elif up == DONE:
            if self.u2c.done:
                self.close(STATUS_OK)
        elif up == MORE:
            if c2u.bulk:
                self.c2u = c2u.spliced()
            if not self.scheduled:
                self.scheduled = True
                self.loop.call_soon(self._resume)

    def forward_down(self) -> None:
        """Upstream → client only; see above."""
        u2c = self.u2c
        down = u2c.run(self.loop.now)
        if down >= SRC_ERROR:
            self._pump_failed(u2c, down, client_is_source=False)
        elif down == DONE:
            if self.c2u.done:
                self.close(STATUS_OK)
        elif down == MORE:
            if u2c.bulk:
                self.u2c = u2c.spliced()
            if not self.scheduled:
                self.scheduled = True
                self.loop.call_soon(self._resume)

    def _resume(self) -> None:
        self.scheduled = False
        if self.phase == FORWARDING:
            self.forward()

    def _pump_failed(self, pump: Pump, result: int, client_is_source: bool) -> None:
        """A reset (or a vanished peer) on one side becomes a reset on the other side; a failure
        of our own (no fd for a pipe) ends the session with 500 and resets nobody.

        An upstream that fails once it has done its part (see _upstream_done) has ended the
        session, not broken it: PostgreSQL, say, closes on a client's Terminate with the client's
        close_notify still unread, which makes its kernel send a reset. As nginx (whose stream
        proxy takes a read error for the end of the stream), that is status 200, and the client
        gets a FIN, not a RST that could destroy the reply it has not read yet. While pyproxy
        still held bytes for either side, they are lost: 502, and the reset is passed on."""
        err = pump.error
        if result == LOCAL_ERROR:
            self.log("error", f"cannot get a pipe ({err}: {os.strerror(err)}) while proxying")
            self.close(STATUS_INTERNAL)
            return
        client_side = (result == SRC_ERROR) == client_is_source
        what = f"connection {'reset' if err == errno.ECONNRESET else 'failed'} ({err}: {os.strerror(err)})"
        status = STATUS_OK if client_side else STATUS_BAD_GATEWAY
        if client_side and type(self.client) is TLSStream and self.client.renegotiation_refused:
            # nginx logs "SSL renegotiation disabled" and drops the connection; the client has its
            # no_renegotiation alert (TLSStream._answer_peer). A protocol violation: 400.
            self.log("notice", "client tried to renegotiate TLS, which is disabled, closing")
            status = STATUS_BAD_REQUEST
        elif not client_side and self._upstream_done():
            self.log("info", f"upstream {what} after all data was delivered, closing")
            if type(self.client) is TLSStream:
                self.client.close_notify()
            self._refuse(STATUS_OK)
            return
        else:
            self.log("info", f"{'client' if client_side else 'upstream'} {what} while proxying")
        other = self.upstream if client_side else self.client
        if other is not None:
            send_reset(other)
        self.close(status)

    def _upstream_done(self) -> bool:
        """Whether a failing upstream had done its part: every byte read from either side went to
        the other side's socket (none held in a buffer, a pipe or TLS records not sent yet, none
        lost in a failed write), and the client had ended its stream or been answered. (An
        upstream that resets a client still sending, without a word, failed it.)"""
        c2u, u2c = self.c2u, self.u2c
        for pump in (c2u, u2c):
            if pump.received != pump.sent or pump.pending:
                return False
        return c2u.eof or u2c.received > 0

    def _forwarding_timeouts(self) -> None:
        """Forwarding's lazy timer: idle (read_timeout) and stuck writes (write_timeout).

        It comes due at the idle deadline, or sooner: within write_timeout of now when nothing is
        stuck (so a stall that starts later is caught on time), at the stall's deadline when a
        peer stopped taking bytes.
        """
        now = self.loop.now
        service = self.service
        idle_deadline = max(self.c2u.last_io, self.u2c.last_io) + service.read_timeout
        if idle_deadline <= now:
            self.log("info", f"session idle for {service.read_timeout:g}s (read_timeout), closing")
            self.close(STATUS_OK)
            return
        deadline = min(idle_deadline, now + service.write_timeout)
        for pump in (self.c2u, self.u2c):
            if pump.blocked_at and pump.pending:
                write_deadline = pump.blocked_at + service.write_timeout
                if write_deadline <= now:
                    self.log("info", f"write timed out after {service.write_timeout:g}s "
                                     f"(write_timeout) while proxying")
                    self.close(STATUS_OK)
                    return
                deadline = min(deadline, write_deadline)
        self._set_timer(deadline)
