"""The built-in worker: `python -m cadenza.worker.app MODULE:OBJECT`.

Serves a WSGI or ASGI application with uvicorn on the listeners its master passed as fds 3..n
(`Server.run(sockets=...)`, not `--fd`, which mislabels TCP sockets as AF_UNIX and loses
TCP_NODELAY). The engine is httptools (llhttp) on uvloop when they are installed, h11 on asyncio
otherwise, or what `[http] protocol` and `loop` ask for; both engines drain the same way
(drain.py). WSGI applications run through wsgi.py's thread pool. READY=1 goes to the
generation's NOTIFY_SOCKET once the ASGI lifespan startup has completed and the server listens;
a startup that fails ends the worker with exit 3 and its reason in STATUS=.

The `[http]` settings arrive as the JSON object CADENZA_HTTP (config.http_environment). What one
worker process needs of its own is set up in serve(), which a preloader's forked child calls too
(preloader.py): faulthandler on every thread (a crash, and the master's signals.STACK_DUMP
before it kills a silent worker, write every thread's stack to stderr), the request count sent
as CADENZA_REQUESTS= (report.py) and, with CADENZA_TIMEOUT, the request timeouts and their
monitor thread (timeouts.py).

The drain is event-driven: a stop signal wakes the loop at once (uvicorn polls should_exit every
0.1 s and sleeps 0.1 s more in its shutdown), and the shutdown goes on the moment the last
connection ends and the last request's task is done, so an idle worker exits within milliseconds.
"""

from __future__ import annotations

import asyncio
import faulthandler
import gc
import json
import logging
import os
import signal
import socket
import sys

import setproctitle
import uvicorn
from uvicorn.lifespan.on import LifespanOn

from .. import logs
from ..config import HttpSection
from ..exitcodes import USAGE, WORKER_APP_ERROR
from ..listeners import ListenerError, adopt_from_env
from ..notify import Notifier
from ..signals import STACK_DUMP, ignore_master_signals
from .drain import Draining, handshakes, settle
from .h11_protocol import DrainingH11Protocol
from .loading import is_asgi, load_app
from .report import RequestCount
from .timeouts import Timeouts

log = logging.getLogger("cadenza.worker")
uvicorn_log = logging.getLogger("uvicorn.error")
RECHECK = 1.0   # seconds: the drain looks again (a WebSocket's end does not wake it, an HTTP one's does)
MASTER_PIDFD: int | None = None   # a preloader's fork: the master's pidfd (preloader.py)


class StartupFailed(Exception):
    """The application could not be loaded or its lifespan startup failed: exit 3."""


class RecordingLifespan(LifespanOn):
    """uvicorn's lifespan, keeping why a startup failed for STATUS=."""

    failure = ""

    async def send(self, message) -> None:
        if message["type"] == "lifespan.startup.failed":
            text = (message.get("message") or "").strip()
            self.failure = text.splitlines()[-1] if text else "the application reported lifespan.startup.failed"
        await super().send(message)

    async def main(self) -> None:
        await super().main()
        raised = getattr(self, "error_occurred", getattr(self, "error_occured", False))
        if raised and not self.failure and self.config.lifespan == "on":
            self.failure = "the lifespan handler raised (see the traceback above)"


class NotifyingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, notifier: Notifier, max_requests: int = 0,
                 timeouts: Timeouts | None = None, counted: RequestCount | None = None):
        super().__init__(config)
        self.notifier = notifier
        self.max_requests, self.timeouts = max_requests, timeouts
        self.server_state = counted or RequestCount(notifier)   # before the first connection
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wakeup: asyncio.Future | None = None

    async def startup(self, sockets=None) -> None:
        self._loop = asyncio.get_running_loop()
        self._wake_on_signals(self._loop)
        if MASTER_PIDFD is not None:
            self._loop.add_reader(MASTER_PIDFD, self._master_gone)
        self.server_state.start(self._loop, self.max_requests)
        self.server_state.drained = self._wake
        if self.timeouts is not None:
            self.timeouts.start(self._loop)
        await super().startup(sockets=sockets)
        if not self.should_exit:
            self.notifier.send(ready=1, status="serving")
            usec = os.environ.get("WATCHDOG_USEC", "")
            if usec.isdigit() and int(usec) > 0:
                self._ping(int(usec) / 2e6)

    def handle_exit(self, sig, frame) -> None:
        # uvicorn's signal handler (signal.signal: it runs in the main thread between two
        # bytecodes, and only sets a flag). The loop may sleep in epoll until its next timer:
        # wake it, from here the way another thread would.
        super().handle_exit(sig, frame)
        if self._loop is not None:
            try:
                self._loop.call_soon_threadsafe(self._wake)
            except RuntimeError:   # the loop has closed
                pass

    def _master_gone(self) -> None:
        """A forked worker's master has exited (its pidfd is readable): drain, as a worker exec'd
        by the master does on PR_SET_PDEATHSIG's SIGTERM."""
        self._loop.remove_reader(MASTER_PIDFD)
        if not self.should_exit:
            log.warning("the master has exited; draining")
            self.handle_exit(signal.SIGTERM, None)

    def _wake_on_signals(self, loop) -> None:
        """A stop signal may land on any thread (the WSGI pool's, the timeout monitor's). Python
        runs its handler in the main thread, but only once the loop wakes for something else: a
        WSGI response due then would go out before the drain began, with keep-alive. A wakeup fd
        wakes the loop (uvloop sets its own; asyncio's loop does only for add_signal_handler)."""
        old = signal.set_wakeup_fd(-1)
        if old != -1:
            signal.set_wakeup_fd(old)
            return
        r, w = socket.socketpair()
        r.setblocking(False)
        w.setblocking(False)
        signal.set_wakeup_fd(w.fileno(), warn_on_full_buffer=False)

        def drain_wakeups() -> None:
            try:
                r.recv(4096)
            except BlockingIOError:
                pass
        loop.add_reader(r.fileno(), drain_wakeups)
        self._signal_socks = (r, w)

    def _wake(self) -> None:
        if self._wakeup is not None and not self._wakeup.done():
            self._wakeup.set_result(None)

    async def _sleep(self, seconds: float, *also) -> None:
        """Until _wake(), `seconds`, or one of `also` (tasks) is done."""
        loop = asyncio.get_running_loop()
        self._wakeup = loop.create_future()
        timer = loop.call_later(seconds, self._wake)
        try:
            await asyncio.wait([self._wakeup, *also], return_when=asyncio.FIRST_COMPLETED)
        finally:
            timer.cancel()

    async def main_loop(self) -> None:
        # uvicorn's on_tick(0) refreshes the Date header; once a second, as uvicorn does.
        while not await self.on_tick(0):
            await self._sleep(1.0)

    async def shutdown(self, sockets=None) -> None:
        """uvicorn's shutdown, without its fixed sleep and its 0.1 s polls."""
        Draining.server_draining = True
        uvicorn_log.info("Shutting down")
        # asyncio's Server refuses a transport made after close() (Server._attach asserts): a
        # connection accepted just before, whose transport is made a turn later, would be
        # dropped, reset. So: stop accepting, let those reach connection_made, then close.
        loop = asyncio.get_running_loop()
        for sock in sockets or []:
            try:
                loop.remove_reader(sock.fileno())   # uvloop's own servers: not registered here, a no-op
            except (ValueError, OSError):
                pass
        await settle()
        for server in self.servers:
            server.close()
        for sock in sockets or []:
            sock.close()
        await settle()
        if self.config.is_ssl:
            await handshakes()
        for connection in list(self.server_state.connections):
            connection.shutdown()
        try:
            await asyncio.wait_for(self._drain(), timeout=self.config.timeout_graceful_shutdown)
        except TimeoutError:
            uvicorn_log.error("Cancel %s running task(s), timeout graceful shutdown exceeded",
                              len(self.server_state.tasks))
            for task in self.server_state.tasks:
                task.cancel(msg="Task cancelled, timeout graceful shutdown exceeded")
        self.server_state.report()
        if not self.force_exit:
            await self.lifespan.shutdown()

    async def _drain(self) -> None:
        state = self.server_state
        if state.connections and not self.force_exit:
            uvicorn_log.info("Waiting for connections to close.")
        while not self.force_exit:
            while state.connections and not self.force_exit:
                await self._sleep(RECHECK)
            await settle()
            if not state.connections:   # none was still on its way in
                break
        if state.tasks and not self.force_exit:
            uvicorn_log.info("Waiting for background tasks to complete.")
        while state.tasks and not self.force_exit:
            await self._sleep(RECHECK, *state.tasks)
        for server in self.servers:
            await server.wait_closed()

    def _ping(self, interval: float) -> None:
        # From the event loop itself: a loop that is stuck (or a stopped process) stops pinging.
        if not self.should_exit:
            self.notifier.send(watchdog=1)
            asyncio.get_running_loop().call_later(interval, self._ping, interval)


def http_settings(environ=os.environ) -> HttpSection:
    """[http] as the master passed it; the defaults when run without a master."""
    raw = environ.get("CADENZA_HTTP")
    if not raw:
        return HttpSection()
    values = json.loads(raw)
    return HttpSection(**{key: tuple(value) if isinstance(value, list) else value
                          for key, value in values.items()})


def engine(settings: HttpSection) -> tuple[type, str]:
    """The protocol class and the loop name: httptools and uvloop when installed (or asked for)."""
    protocol = DrainingH11Protocol
    if settings.protocol in ("auto", "httptools"):
        try:
            from .httptools_protocol import DrainingHttpToolsProtocol
            protocol = DrainingHttpToolsProtocol
        except ImportError as exc:
            if settings.protocol == "httptools":
                raise StartupFailed(f"[http] protocol = \"httptools\" but httptools cannot be imported "
                                    f"({exc}); install it in the release's venv or set protocol = "
                                    f"\"auto\"") from exc
    loop = "asyncio"
    if settings.loop in ("auto", "uvloop"):
        try:
            import uvloop  # noqa: F401 - only whether it imports
            loop = "uvloop"
        except ImportError as exc:
            if settings.loop == "uvloop":
                raise StartupFailed(f"[http] loop = \"uvloop\" but uvloop cannot be imported ({exc}); "
                                    f"install it in the release's venv or set loop = \"auto\"") from exc
    return protocol, loop


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ignore_master_signals()
    worker_id = os.environ.get("CADENZA_WORKER_ID", "?")
    generation = os.environ.get("CADENZA_GENERATION", "?")
    name = os.environ.get("CADENZA_APP_NAME", "cadenza")
    logs.setup(f"worker {worker_id}")
    setproctitle.setproctitle(f"cadenza worker {worker_id} gen {generation} [{name}]")
    if len(argv) != 1:
        log.error("usage: python -m cadenza.worker.app MODULE:OBJECT")
        return USAGE
    notifier = Notifier.from_environ()
    try:
        sockets = [listener.sock for listener in adopt_from_env()]
    except ListenerError as exc:
        log.error("%s", exc)
        return USAGE
    if not sockets:
        log.error("no listening sockets: this program is started by cadenza with LISTEN_FDS set")
        return USAGE
    sys.path.insert(0, os.getcwd())
    try:
        settings = http_settings()
        try:
            app = load_app(argv[0])
        except Exception as exc:  # noqa: BLE001 - any import-time error of the app is reported the same way
            raise StartupFailed(f"cannot load app {argv[0]!r} from {os.getcwd()}: "
                                f"{type(exc).__name__}: {exc}") from exc
        code = serve(app, sockets, notifier, settings)
    except StartupFailed as exc:
        log.error("%s", exc)
        notifier.send(status=str(exc))
        return WORKER_APP_ERROR
    # Drained. The interpreter's exit would now collect garbage through every object the
    # application and its imports made: tens of milliseconds, a few hundred on a loaded machine,
    # while the master waits for the worker's exit. Frozen, they are only released by their
    # reference counts: atexit handlers still run and open files are flushed and closed; what is
    # left in reference cycles is not collected (nor its __del__ run, which Python does not
    # promise at exit anyway).
    gc.freeze()
    return code


def uvicorn_config(app, settings: HttpSection, timeouts: Timeouts | None = None,
                   counted: RequestCount | None = None) -> uvicorn.Config:
    protocol, loop = engine(settings)
    asgi = is_asgi(app)
    if not asgi:
        from .wsgi import WSGIAdapter
        app = WSGIAdapter(app, settings.wsgi_threads)
    if settings.proxy_headers:
        from .proxy import ProxyHeaders
        app = ProxyHeaders(app, settings.forwarded_allow_ips)
    if timeouts is not None:
        app = timeouts.wrap(app)
    if counted is not None:
        app = counted.wrap(app)
    graceful = float(os.environ.get("CADENZA_GRACEFUL_TIMEOUT", "30"))
    config = uvicorn.Config(
        app, http=protocol, loop=loop, interface="asgi3",
        lifespan=settings.lifespan if asgi else "off",
        timeout_keep_alive=settings.keepalive,
        # uvicorn counts the connection of the request it checks: its limit N serves N - 1.
        limit_concurrency=settings.limit_concurrency + 1 if settings.limit_concurrency else None,
        root_path=settings.root_path,
        proxy_headers=False,          # ProxyHeaders above, which also knows unix-socket peers
        ssl_certfile=settings.certfile, ssl_keyfile=settings.keyfile,
        access_log=settings.access_log, log_config=None,
        timeout_graceful_shutdown=max(graceful - 0.5, 0.1), server_header=False)
    try:
        config.load()
    except (OSError, ValueError) as exc:   # a certificate or key that cannot be read or used
        key = f"keyfile {settings.keyfile}" if settings.keyfile else "its key (no keyfile: in the certfile)"
        raise StartupFailed(f"[http] certfile {settings.certfile} or {key} cannot be used: {exc}; "
                            "both must be readable PEM files, the key matching the certificate") from exc
    if config.lifespan != "off":
        config.lifespan_class = RecordingLifespan
    log.info("serving %s with %s on %s%s", "ASGI" if asgi else f"WSGI ({settings.wsgi_threads} threads)",
             "httptools" if protocol is not DrainingH11Protocol else "h11", loop,
             ", TLS" if settings.certfile else "")
    return config


def _number(environ, name: str, kind: type, what: str):
    raw = environ.get(name, "").strip()
    try:
        value = kind(raw) if raw else kind(0)
    except ValueError:
        value = -1
    if not 0 <= value < float("inf"):   # NaN too
        raise StartupFailed(f"{name}={raw!r} is not {what}; cadenza sets it from the release's "
                            f"cadenza.toml: check [workers] there")
    return value


def serve(app, sockets: list[socket.socket], notifier: Notifier, settings: HttpSection | None = None) -> int:
    """Serve `app` (loaded already) on `sockets` until a stop signal; 0 once drained. Everything of
    this process is set up here, not at import: a preloader's forked child calls it too, after
    setting its own CADENZA_* variables in os.environ."""
    faulthandler.enable(file=2, all_threads=True)   # fd 2: whatever the application made of sys.stderr
    faulthandler.register(STACK_DUMP, file=2, all_threads=True)
    timeout = _number(os.environ, "CADENZA_TIMEOUT", float, "a number of seconds (workers.timeout)")
    limit = _number(os.environ, "CADENZA_MAX_REQUESTS", int, "a count of requests (workers.max_requests)")
    timeouts = Timeouts(timeout, notifier) if timeout > 0 else None
    counted = RequestCount(notifier)
    config = uvicorn_config(app, settings or HttpSection(), timeouts, counted if notifier.enabled else None)
    server = NotifyingServer(config, notifier, limit, timeouts, counted)
    # Until uvicorn installs its own handlers (inside run()), a stop signal must not be lost;
    # afterwards uvicorn re-raises it once it has shut down, and this handler turns that into a
    # plain exit 0, so the master sees a clean exit rather than a death by signal.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: setattr(server, "should_exit", True))
    try:
        server.run(sockets=sockets)
    except SystemExit:
        pass   # uvicorn's way out when the lifespan startup failed (or was unsupported with "on")
    finally:
        if timeouts is not None:
            timeouts.stop()
    lifespan = getattr(server, "lifespan", None)
    if not server.started and lifespan is not None and lifespan.should_exit:
        failure = getattr(lifespan, "failure", "") or "the application reported it"
        raise StartupFailed(f"the application's lifespan startup failed: {failure}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
