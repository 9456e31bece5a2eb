"""What a draining connection owes its client, for both HTTP engines (h11 and httptools).

Draining (SIGTERM/SIGQUIT/SIGINT): stop accepting, finish the requests in flight and answer
them with `Connection: close`. An idle keep-alive connection is not cut at once: a client such
as wrk writes its next request the moment a response arrives, and closing the connection under
that request is exactly the error it would see. The idle connection is kept for a short grace,
its next request is answered with `Connection: close`, and only a connection that stays idle
through the grace is closed. A request whose bytes reached us (the parser's buffer or the
kernel's) before that decision is answered; the decision is never taken while a response is
written.

Every close this worker decides lingers (DESIGN.md 4.2): FIN first, then whatever the client still
sends is read and discarded until its EOF or LINGER, then close. A plain close() with unread
bytes in the receive buffer makes the kernel answer with RST, and a client then sees ECONNRESET
instead of the response or the clean EOF it can retry after.

A client that half-closes (sends its request, then shuts down its write side) still gets its
response: `eof_received` keeps the write side open while a request is answered, and the
connection closes after that response.

The server's shutdown (app.py) does not poll for the end: the last connection of a draining
server to end calls its state's `drained` (report.py), and the shutdown goes on at once.

`Draining` is a mixin placed before uvicorn's protocol class. The engine-specific parts are
`response_in_flight()`, `_arriving()` (a request partly received) and `_end_of_input()`.
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import struct
import termios
import time
import weakref

log = logging.getLogger("cadenza.worker")

IDLE_GRACE = 1.0     # seconds an idle keep-alive connection is kept open once draining starts
PARTIAL_GRACE = 5.0  # seconds a half-received request gets to complete once draining starts
LINGER = 2.0         # seconds a closing connection reads and discards after its FIN, at most


SETTLE_TURNS = 8
HANDSHAKE_WAIT = 2.0   # seconds a drain waits for TLS handshakes under way, at most
CORK_LIMIT = 64 * 1024  # bytes a connection's writes are gathered into one, at most


class ClosingTransport:
    """The transport a request's cycle writes to. Its close() lingers instead of cutting, and it
    gathers a response's writes into one.

    uvicorn writes a response's head and each body message separately, and uvloop sends each
    write at once: two send() calls and two TCP segments for the smallest response, each read
    separately by the client. Here writes are gathered until the response completes, the
    connection closes, CORK_LIMIT bytes are waiting, or the event loop's current round ends
    (call_soon), whichever comes first; so a streamed response is not delayed, and uvicorn's flow
    control still sees every byte beyond CORK_LIMIT. Every write of the connection goes through
    here (or after flush()), so nothing overtakes a gathered response."""

    def __init__(self, protocol: Draining, transport) -> None:
        self._protocol, self._transport = protocol, transport
        self._loop = protocol.loop
        self._pending: list[bytes] = []
        self._size = 0
        self._scheduled = False

    def write(self, data: bytes) -> None:
        if not data:
            return
        self._pending.append(data)
        self._size += len(data)
        if self._size >= CORK_LIMIT:
            self.flush()
        elif not self._scheduled:
            self._scheduled = True
            self._loop.call_soon(self._flush_soon)

    def writelines(self, chunks) -> None:
        for chunk in chunks:
            self.write(chunk)

    def _flush_soon(self) -> None:
        self._scheduled = False
        self.flush()

    def flush(self) -> None:
        if self._pending:
            data = self._pending[0] if len(self._pending) == 1 else b"".join(self._pending)
            self._pending.clear()
            self._size = 0
            if not self._transport.is_closing():
                self._transport.write(data)

    def close(self) -> None:
        cycle = self._protocol.cycle
        self._protocol.close_lingering("response sent" if cycle is None or cycle.response_complete
                                       else "application ended its response early")

    def is_closing(self) -> bool:
        return self._transport.is_closing() or self._protocol.lingering

    def get_write_buffer_size(self) -> int:
        return self._size + self._transport.get_write_buffer_size()

    def __getattr__(self, name):
        return getattr(self._transport, name)


class Draining:
    draining = False
    lingering = False          # FIN sent: input is read and discarded until EOF or LINGER
    discarding = False         # input is read and discarded (lingering, or after a protocol error)
    peer_eof = False           # the client shut down its write side
    discarded = 0
    _linger_timer: asyncio.TimerHandle | None = None
    # Set once the server starts its shutdown. asyncio may have accepted a connection whose
    # connection_made() runs only after uvicorn told every known connection to shut down; such
    # a late one must drain too, or it keeps serving until the graceful timeout cuts it.
    server_draining = False
    # Protocols whose connection_made() has not come yet. With TLS that is the whole handshake:
    # asyncio's (and uvloop's) SSL protocol calls it only once the handshake is done, so a
    # connection accepted just before the drain is in no list until then (app.py waits for it).
    arriving: weakref.WeakSet = weakref.WeakSet()

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if self.config.is_ssl:   # without TLS, connection_made follows within the settle turns
            Draining.arriving.add(self)

    # ---- engine-specific ------------------------------------------------------------------

    def response_in_flight(self) -> bool:
        raise NotImplementedError

    def _arriving(self) -> bool:
        """A request has begun to arrive but is not complete."""
        raise NotImplementedError

    def _end_of_input(self) -> None:
        """Tell the parser that no more input will be read."""

    def _parser_buffered(self) -> int:
        return 0

    def _client_closes(self) -> bool:
        """The client's last request said `Connection: close` (or was HTTP/1.0 without
        keep-alive): it sends nothing after it (RFC 9112 9.6)."""
        return False

    # ---- asyncio protocol -----------------------------------------------------------------

    def connection_made(self, transport) -> None:
        Draining.arriving.discard(self)
        super().connection_made(transport)
        self._closing_transport = ClosingTransport(self, transport)
        if Draining.server_draining:
            self.shutdown()

    def data_received(self, data: bytes) -> None:
        if self.discarding:
            self.discarded += len(data)
            return
        super().data_received(data)

    def handle_websocket_upgrade(self) -> None:
        self._closing_transport.flush()   # a response gathered before the upgrade goes first
        super().handle_websocket_upgrade()

    def eof_received(self):
        if self.lingering:
            return None            # the EOF a lingering close waits for: close now
        self.peer_eof = True
        cycle = self.cycle
        if self.response_in_flight() and not (cycle is not None and cycle.more_body):
            # Half-closed after its request: answer it, then close (on_response_complete).
            if cycle is not None:
                cycle.keep_alive = False
            return True
        # Nothing owed, or EOF inside a request's body, whose rest can never come: asyncio closes
        # the transport, and the application waiting for the body hears http.disconnect.
        return None

    def connection_lost(self, exc) -> None:
        # The client's EOF (asyncio closes when eof_received returns None), LINGER, or an error.
        if self._linger_timer is not None:
            self._linger_timer.cancel()
        if self.discarded:
            self._log("%s: discarded %d byte(s) that arrived after the close", self._peer(), self.discarded)
        self._unset_keepalive_if_required()
        super().connection_lost(exc)
        if Draining.server_draining and not self.connections:
            drained = getattr(self.server_state, "drained", None)   # report.RequestCount's
            if drained is not None:
                drained()   # the last connection of a draining server: its shutdown goes on now

    def on_response_complete(self) -> None:
        self._closing_transport.flush()
        if self.lingering:   # the response that ended the connection: nothing follows it
            self.server_state.total_requests += 1
            return
        super().on_response_complete()
        if self.peer_eof and not self.transport.is_closing():
            self.close_lingering("client closed its side")

    # ---- drain ----------------------------------------------------------------------------

    def shutdown(self) -> None:
        # Nothing is cut here. A response not yet started goes out with "Connection: close"; one
        # whose headers already promised keep-alive completes, and the request that follows on
        # its connection is answered with "Connection: close"; a connection that stays idle
        # through the grace is closed.
        self.draining = True
        cycle = self.cycle
        if cycle is not None and not cycle.response_started:
            cycle.keep_alive = False
        self.loop.call_later(IDLE_GRACE, self._close_if_idle)

    def _unread(self) -> int:
        """Bytes of a request that reached us but were not yet parsed: the parser's + the kernel's."""
        try:
            fd = self.transport.get_extra_info("socket").fileno()
            kernel = struct.unpack("i", fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0"))[0]
        except (AttributeError, OSError, ValueError):
            kernel = 0
        return self._parser_buffered() + kernel

    def _close_if_idle(self, waited: float = 0.0) -> None:
        if self.transport.is_closing() or self.lingering:
            return
        # A request in flight is never cut (uvicorn's graceful timeout bounds it); a request that
        # is still arriving, or whose bytes wait in a buffer, gets PARTIAL_GRACE to complete.
        arriving = self._arriving() or self._unread() > 0
        if self.response_in_flight() or (arriving and waited < PARTIAL_GRACE):
            self.loop.call_later(IDLE_GRACE, self._close_if_idle, waited + IDLE_GRACE)
            return
        self.close_lingering("idle" if not arriving else f"request incomplete after {waited:g}s")

    def timeout_keep_alive_handler(self) -> None:
        # uvicorn's h11 handler ends the connection unconditionally, in the middle of a response
        # too. Never mid-message; on_response_complete re-arms.
        if self.transport.is_closing() or self.lingering or self.response_in_flight():
            return
        if self._arriving() or self._unread() > 0:
            return   # a request just reached us: data_received takes it from here
        self.close_lingering("keep-alive timeout")

    def close_lingering(self, reason: str) -> None:
        """End the connection without RST: FIN, read and discard until the client's EOF (or
        LINGER), then close. The drain and the keep-alive timer never call this while a response
        is written (response_in_flight); uvicorn does when the application fails mid-response."""
        if self.transport.is_closing() or self.lingering:
            return
        self._closing_transport.flush()
        cycle = self.cycle
        if self.draining or log.isEnabledFor(logging.DEBUG):
            started, complete = (cycle.response_started, cycle.response_complete) if cycle else (False, False)
            self._log("%s: closing (%s): cycle=%s response_started=%s response_complete=%s unread=%d",
                      self._peer(), reason, "none" if cycle is None else "done" if complete else "in flight",
                      started, complete, self._unread())
        self._end_of_input()
        self.lingering = self.discarding = True
        self._unset_keepalive_if_required()
        if self.peer_eof or (self._client_closes() and not self._arriving()):
            # The client's EOF came already, or it asked for the close (and so sends nothing
            # after its request, RFC 9112 9.6): a plain close() sends FIN, and no later byte of
            # the client's can meet it.
            self.transport.close()
            return
        self.flow.resume_reading()
        self.transport.resume_reading()
        try:
            self.transport.write_eof()
        except (OSError, NotImplementedError, RuntimeError):   # gone already, or no half-close (TLS)
            self.transport.close()
            return
        self._linger_timer = self.loop.call_later(LINGER, self.transport.close)

    def _peer(self) -> str:
        return f"{self.client[0]}:{self.client[1]}" if self.client else "unix client"

    def _log(self, fmt: str, *args) -> None:
        log.log(logging.INFO if self.draining else logging.DEBUG, fmt, *args)


async def settle() -> None:
    """A few turns of the loop. A connection accepted just before the listeners closed reaches
    its protocol's connection_made() only some turns later (asyncio accepts in a task, which then
    schedules connection_made): until then it is in no list, and a worker that exited would leave
    it to the kernel, which resets it. uvicorn's fixed 0.1 s sleep covered this; a few turns are
    microseconds."""
    for _ in range(SETTLE_TURNS):
        await asyncio.sleep(0)


async def handshakes() -> None:
    """TLS connections accepted before the listeners closed, whose handshake is still under way,
    are in no list yet (Draining.arriving): they are waited for, HANDSHAKE_WAIT at most, so
    that their request is served rather than cut mid-handshake. A failed handshake leaves its
    protocol to the collector; the bound covers one that has not been collected yet."""
    deadline = time.monotonic() + HANDSHAKE_WAIT
    while Draining.arriving and time.monotonic() < deadline:
        await asyncio.sleep(0.005)
