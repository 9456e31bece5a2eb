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
through the grace is closed.
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
import logging
import os
import signal
import socket
import sys

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
EXIT_APP_ERROR = 3


class DrainingH11Protocol(H11Protocol):
    draining = False
    # Set once the server starts its shutdown. asyncio may have accepted a connection whose
    # connection_made() runs only after uvicorn told every known connection to shut down; such
    # a late one must drain too, or it keeps serving until the graceful timeout cuts it.
    server_draining = False

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        if DrainingH11Protocol.server_draining:
            self.shutdown()

    def handle_events(self) -> None:
        super().handle_events()
        cycle = self.cycle
        if cycle is not None and not cycle.response_started and "send" not in vars(cycle):
            self._wrap_send(cycle)

    def _wrap_send(self, cycle) -> None:
        # Installed before the request's task first runs, so the app receives this `send`.
        send = cycle.send

        async def send_closing_when_draining(message):
            if message["type"] == "http.response.start" and self.draining:
                # h11 sees the header, answers with "Connection: close" and ends the connection.
                cycle.keep_alive = False
                message = {**message, "headers": [*message.get("headers", []), (b"connection", b"close")]}
            await send(message)
        cycle.send = send_closing_when_draining

    def shutdown(self) -> None:
        # Nothing is cut here. A response not yet started goes out with "Connection: close" (see
        # _wrap_send); one whose headers already promised keep-alive completes, and the request
        # that follows on its connection is answered with "Connection: close"; a connection
        # that stays idle through the grace is closed.
        self.draining = True
        self.loop.call_later(IDLE_GRACE, self._close_if_idle)

    def _close_if_idle(self, waited: float = 0.0) -> None:
        if self.transport.is_closing():
            return
        in_flight = self.cycle is not None and not self.cycle.response_complete
        arriving = self.conn.their_state is not h11.IDLE or bool(self.conn.trailing_data[0])
        # A request in flight is never cut (uvicorn's graceful timeout bounds it); a request
        # still arriving gets PARTIAL_GRACE to complete.
        if in_flight or (arriving and waited < PARTIAL_GRACE):
            self.loop.call_later(IDLE_GRACE, self._close_if_idle, waited + IDLE_GRACE)
            return
        try:
            self.conn.send(h11.ConnectionClosed())
        except h11.LocalProtocolError:
            pass   # h11 refuses to say "closed" mid-message; closing the transport is what counts
        self.transport.close()


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
