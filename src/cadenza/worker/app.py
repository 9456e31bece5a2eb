"""The built-in worker: `python -m cadenza.worker.app MODULE:OBJECT`.

Serves a WSGI or ASGI application with uvicorn on the listeners its master passed as fds 3..n
(`Server.run(sockets=...)`, not `--fd`, which mislabels TCP sockets as AF_UNIX and loses
TCP_NODELAY). WSGI applications run through a2wsgi's WSGIMiddleware. READY=1 goes to the
generation's NOTIFY_SOCKET once the application is imported and the server listens.

Draining (SIGTERM/SIGQUIT/SIGINT): stop accepting, finish the requests in flight and answer
them with `Connection: close`. An idle keep-alive connection is not cut at once: a client such
as wrk writes its next request the moment a response arrives, and closing the connection under
that request is exactly the error it would see. The idle connection is kept for a short grace,
its next request is answered with `Connection: close`, and only a connection that stays idle
through the grace is closed. A request whose bytes reached us (h11's buffer or the kernel's)
before that decision is answered; the decision is never taken while a response is written.

Every close this worker decides lingers (DESIGN.md 4.2): FIN first, then whatever the client still
sends is read and discarded until its EOF or LINGER, then close. A plain close() with unread
bytes in the receive buffer makes the kernel answer with RST, and a client then sees ECONNRESET
instead of the response or the clean EOF it can retry after.
"""

from __future__ import annotations

import asyncio
import fcntl
import importlib
import inspect
import logging
import os
import signal
import socket
import struct
import sys
import termios

import h11
import setproctitle
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from .. import logs
from ..listeners import ListenerError, adopt_from_env
from ..notify import Notifier

log = logging.getLogger("cadenza.worker")

IDLE_GRACE = 1.0     # seconds an idle keep-alive connection is kept open once draining starts
PARTIAL_GRACE = 5.0  # seconds a half-received request gets to complete once draining starts
LINGER = 2.0         # seconds a closing connection reads and discards after its FIN, at most
EXIT_APP_ERROR = 3


class _CycleTransport:
    """The transport a request's RequestResponseCycle writes to: its close() lingers."""

    def __init__(self, protocol: DrainingH11Protocol, cycle) -> None:
        self._protocol, self._cycle, self._transport = protocol, cycle, protocol.transport

    def close(self) -> None:
        # uvicorn closes here after a response with "Connection: close" (or keep_alive False), and
        # when the application failed after starting its response.
        self._protocol.close_lingering("response sent" if self._cycle.response_complete
                                       else "application ended its response early")

    def is_closing(self) -> bool:
        return self._transport.is_closing() or self._protocol.lingering

    def __getattr__(self, name):
        return getattr(self._transport, name)


class DrainingH11Protocol(H11Protocol):
    draining = False
    lingering = False          # FIN sent: input is read and discarded until EOF or LINGER
    discarding = False         # input is read and discarded (lingering, or after a protocol error)
    discarded = 0
    _linger_timer: asyncio.TimerHandle | None = None
    # Set once the server starts its shutdown. asyncio may have accepted a connection whose
    # connection_made() runs only after uvicorn told every known connection to shut down; such
    # a late one must drain too, or it keeps serving until the graceful timeout cuts it.
    server_draining = False

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        if DrainingH11Protocol.server_draining:
            self.shutdown()

    def data_received(self, data: bytes) -> None:
        if self.discarding:
            self.discarded += len(data)
            return
        super().data_received(data)

    def connection_lost(self, exc) -> None:
        # The client's EOF (asyncio closes when eof_received returns None), LINGER, or an error.
        if self._linger_timer is not None:
            self._linger_timer.cancel()
        if self.discarded:
            self._log("%s: discarded %d byte(s) that arrived after the close", self._peer(), self.discarded)
        self._unset_keepalive_if_required()
        super().connection_lost(exc)

    def handle_events(self) -> None:
        super().handle_events()
        cycle = self.cycle
        if cycle is not None and not cycle.response_started and "send" not in vars(cycle):
            self._wrap_send(cycle)

    def _wrap_send(self, cycle) -> None:
        # Installed before the request's task first runs, so the app receives this `send`.
        send = cycle.send
        cycle.transport = _CycleTransport(self, cycle)

        async def send_closing_when_draining(message):
            if message["type"] == "http.response.start" and (self.draining or self.discarding):
                # h11 sees the header, answers with "Connection: close" and ends the connection.
                cycle.keep_alive = False
                message = {**message, "headers": [*message.get("headers", []), (b"connection", b"close")]}
            await send(message)
        cycle.send = send_closing_when_draining

    def on_response_complete(self) -> None:
        if self.lingering:   # the response that ended the connection: nothing follows it
            self.server_state.total_requests += 1
            return
        super().on_response_complete()

    def send_400_response(self, msg: str) -> None:
        # h11 rejected what the client sent. uvicorn answers 400 and closes, but h11 cannot send a
        # second response while one is written (our_state SEND_BODY): uvicorn's attempt raises in
        # data_received, asyncio drops the connection and the response in flight is cut after its
        # headers. That is what a client pipelining after a draining "Connection: close" response
        # gets (h11: "Got data when expecting EOF"). Here a complete request in flight is answered
        # (with "Connection: close" if not started), the rest of the input is discarded and the
        # connection closes after the response.
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete and not cycle.more_body:
            self._log("%s: %s while a response is written; it completes, then the connection closes",
                      self._peer(), msg)
            self.discarding = True
            cycle.keep_alive = False
            return
        if cycle is not None and not cycle.response_complete:
            cycle.disconnected = True   # its request is broken: the app hears http.disconnect
            cycle.message_event.set()
        if self.conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
            for event in (h11.Response(status_code=400, reason=b"Bad Request",
                                       headers=[(b"content-type", b"text/plain; charset=utf-8"),
                                                (b"connection", b"close")]),
                          h11.Data(data=msg.encode("ascii")), h11.EndOfMessage()):
                self.transport.write(self.conn.send(event))
        self.close_lingering("invalid request")

    def shutdown(self) -> None:
        # Nothing is cut here. A response not yet started goes out with "Connection: close" (see
        # _wrap_send); one whose headers already promised keep-alive completes, and the request
        # that follows on its connection is answered with "Connection: close"; a connection
        # that stays idle through the grace is closed.
        self.draining = True
        self.loop.call_later(IDLE_GRACE, self._close_if_idle)

    def response_in_flight(self) -> bool:
        cycle = self.cycle
        return (self.conn.our_state in (h11.SEND_RESPONSE, h11.SEND_BODY)
                or (cycle is not None and not cycle.response_complete))

    def _unread(self) -> int:
        """Bytes of a request that reached us but were not yet parsed: h11's buffer + the kernel's."""
        try:
            fd = self.transport.get_extra_info("socket").fileno()
            kernel = struct.unpack("i", fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0"))[0]
        except (AttributeError, OSError):
            kernel = 0
        return len(self.conn.trailing_data[0]) + kernel

    def _close_if_idle(self, waited: float = 0.0) -> None:
        if self.transport.is_closing() or self.lingering:
            return
        # A request in flight is never cut (uvicorn's graceful timeout bounds it); a request that
        # is still arriving, or whose bytes wait in a buffer, gets PARTIAL_GRACE to complete.
        arriving = self.conn.their_state is not h11.IDLE or self._unread() > 0
        if self.response_in_flight() or (arriving and waited < PARTIAL_GRACE):
            self.loop.call_later(IDLE_GRACE, self._close_if_idle, waited + IDLE_GRACE)
            return
        self.close_lingering("idle" if not arriving else f"request incomplete after {waited:g}s")

    def timeout_keep_alive_handler(self) -> None:
        # uvicorn's handler sends h11.ConnectionClosed unconditionally: in the middle of a response
        # that raises and leaves h11 in ERROR, so the response's next write fails and uvicorn
        # closes the connection after its headers. Never mid-message; on_response_complete re-arms.
        if self.transport.is_closing() or self.lingering or self.response_in_flight():
            return
        if self._unread() > 0:
            return   # a request just reached us: data_received takes it from here
        self.close_lingering("keep-alive timeout")

    def close_lingering(self, reason: str) -> None:
        """End the connection without RST: FIN, read and discard until the client's EOF (or
        LINGER), then close. The drain and the keep-alive timer never call this while a response
        is written (response_in_flight); uvicorn does when the application fails mid-response."""
        if self.transport.is_closing() or self.lingering:
            return
        cycle = self.cycle
        started, complete = (cycle.response_started, cycle.response_complete) if cycle else (False, False)
        self._log("%s: closing (%s): our_state=%s their_state=%s cycle=%s response_started=%s "
                  "response_complete=%s unread=%d", self._peer(), reason, self.conn.our_state.__name__,
                  self.conn.their_state.__name__,
                  "none" if cycle is None else "done" if complete else "in flight",
                  started, complete, self._unread())
        if self.conn.our_state in (h11.IDLE, h11.DONE, h11.MUST_CLOSE):
            self.conn.send(h11.ConnectionClosed())
        self.lingering = self.discarding = True
        self._unset_keepalive_if_required()
        self.flow.resume_reading()
        self.transport.resume_reading()
        try:
            self.transport.write_eof()
        except (OSError, NotImplementedError):   # the client is gone already, or no half-close
            self.transport.close()
            return
        self._linger_timer = self.loop.call_later(LINGER, self.transport.close)

    def _peer(self) -> str:
        return f"{self.client[0]}:{self.client[1]}" if self.client else "unix client"

    def _log(self, fmt: str, *args) -> None:
        log.log(logging.INFO if self.draining else logging.DEBUG, fmt, *args)


class NotifyingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, notifier: Notifier):
        super().__init__(config)
        self.notifier = notifier

    async def startup(self, sockets=None) -> None:
        await super().startup(sockets=sockets)
        if not self.should_exit:
            self.notifier.send(ready=1, status="serving")
            usec = os.environ.get("WATCHDOG_USEC", "")
            if usec.isdigit() and int(usec) > 0:
                self._ping(int(usec) / 2e6)

    async def shutdown(self, sockets=None) -> None:
        DrainingH11Protocol.server_draining = True
        await super().shutdown(sockets=sockets)

    def _ping(self, interval: float) -> None:
        # From the event loop itself: a loop that is stuck (or a stopped process) stops pinging.
        if not self.should_exit:
            self.notifier.send(watchdog=1)
            asyncio.get_running_loop().call_later(interval, self._ping, interval)


def load_app(spec: str):
    module_name, _, attr = spec.partition(":")
    module = importlib.import_module(module_name)
    obj = module
    for part in (attr or "application").split("."):
        obj = getattr(obj, part)
    return obj


def is_asgi(app) -> bool:
    call = app if inspect.isfunction(app) or inspect.ismethod(app) else getattr(app, "__call__", None)
    return inspect.iscoroutinefunction(call) or inspect.iscoroutinefunction(app)


def asgi_app(app):
    if is_asgi(app):
        return app
    from a2wsgi import WSGIMiddleware
    return WSGIMiddleware(app)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    worker_id = os.environ.get("CADENZA_WORKER_ID", "?")
    generation = os.environ.get("CADENZA_GENERATION", "?")
    name = os.environ.get("CADENZA_APP_NAME", "cadenza")
    logs.setup(f"worker {worker_id}")
    setproctitle.setproctitle(f"cadenza worker {worker_id} gen {generation} [{name}]")
    if len(argv) != 1:
        log.error("usage: python -m cadenza.worker.app MODULE:OBJECT")
        return 64
    notifier = Notifier.from_environ()
    try:
        sockets = [listener.sock for listener in adopt_from_env()]
    except ListenerError as exc:
        log.error("%s", exc)
        return 64
    if not sockets:
        log.error("no listening sockets: this program is started by cadenza with LISTEN_FDS set")
        return 64
    sys.path.insert(0, os.getcwd())
    try:
        app = asgi_app(load_app(argv[0]))
    except Exception as exc:  # noqa: BLE001 - any import-time error of the app is reported the same way
        log.error("cannot load app %r from %s: %s: %s", argv[0], os.getcwd(), type(exc).__name__, exc)
        notifier.send(status=f"cannot load app {argv[0]}: {type(exc).__name__}: {exc}")
        return EXIT_APP_ERROR
    return serve(app, sockets, notifier)


def serve(app, sockets: list[socket.socket], notifier: Notifier) -> int:
    graceful = float(os.environ.get("CADENZA_GRACEFUL_TIMEOUT", "30"))
    config = uvicorn.Config(app, http=DrainingH11Protocol, lifespan="off", log_config=None,
                            access_log=False, timeout_graceful_shutdown=max(graceful - 0.5, 0.1),
                            server_header=False)
    server = NotifyingServer(config, notifier)
    # Until uvicorn installs its own handlers (inside run()), a stop signal must not be lost;
    # afterwards uvicorn re-raises it once it has shut down, and this handler turns that into a
    # plain exit 0, so the master sees a clean exit rather than a death by signal.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: setattr(server, "should_exit", True))
    server.run(sockets=sockets)
    return 0


if __name__ == "__main__":
    sys.exit(main())
