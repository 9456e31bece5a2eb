"""`workers.timeout` in the built-in worker: a request that runs too long (DESIGN.md 4.4).

CADENZA_TIMEOUT (seconds, from workers.timeout) turns it on; without it nothing here is created
and the request path is untouched.

`Timeouts` is the outermost ASGI application. It registers each HTTP request while it runs: when
it started (its headers complete), its task, its coroutine's frame and, for WSGI, the pool thread
running it at the moment. One monitor thread sleeps until the oldest request's deadline, so while
requests finish in time it wakes about once per timeout. A request found past its deadline is

1. logged at error, once, with its method, path, age and the stack of what serves it: a WSGI view
   in the pool: that thread's stack (sys._current_frames()); an ASGI handler holding the event
   loop (the main thread is inside its coroutine): the main thread's stack; an ASGI handler
   suspended in an await: its task's stack. Stacks are read from the monitor thread under the
   GIL: a request that moves on meanwhile can make the listing stale, never invalid;
2. reported to the master, once: CADENZA_TIMEOUT=<METHOD> <PATH> <age>s (it recycles the worker,
   make-before-break);
3. answered 504 with `Connection: close` if its response has not started. One that has started is
   left to finish: its client has a status already, and the drain bounds it.

The 504 is written on the event loop by the request's own task, in this middleware: the monitor
asks the loop (call_soon_threadsafe) to cancel the task, and the CancelledError that comes back
up here becomes the 504. A WSGI view cannot be stopped: its thread runs on, abandoned, and the
pool has a thread fewer until it returns. Nothing waits for it: its task is done and its
connection closed, so the drain does not count it, and the pool's threads are daemons (wsgi.py),
so the worker's exit does not either.

An ASGI handler that never yields (a CPU loop, a blocking call on the loop) cannot be cancelled:
the loop that would run the cancellation is the one it holds. The monitor then sends INTERRUPT to
the main thread, whose handler raises RequestTimeout there, but only after checking that the code
it interrupted is inside that request's coroutine (this middleware's frame for that request is
among its callers, and is not the interrupted frame itself). So the exception can only appear in
the application's code for that request (or what it called), never in the event loop, uvicorn or
another request, which it could leave broken. It is delivered as Ctrl+C delivers
KeyboardInterrupt: between two bytecodes, or when a blocking call such as time.sleep() is
interrupted; a long C call that checks for no signal delays it until it returns. RequestTimeout
is a BaseException, so `except Exception` in the application does not swallow it. What the
handler had half done stays half done, as after any interrupt; the worker is retired right after.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
import threading
import time
import traceback

log = logging.getLogger("cadenza.worker")

INTERRUPT = signal.SIGRTMIN + 3   # main thread: raise RequestTimeout in the request holding the loop
RETRY = 0.05                      # seconds between two attempts to answer a request past its deadline
BODY = b"Gateway Timeout: the request ran longer than the server allows\n"
HEADERS = [(b"content-type", b"text/plain; charset=utf-8"), (b"content-length", b"%d" % len(BODY)),
           (b"connection", b"close")]


class RequestTimeout(BaseException):
    """Raised into an ASGI handler that held the event loop past workers.timeout."""


def printable(text: str, limit: int = 200) -> str:
    """A client's text for one log line or notify field: no control character, bounded."""
    text = "".join(c if c.isprintable() else "?" for c in text[:limit])
    return text + "…" if len(text) >= limit else text


class Request:
    __slots__ = ("method", "path", "start", "task", "frame", "thread", "started", "reported",
                 "answered", "queued", "_send")

    def __init__(self, scope, send, start: float, task, frame) -> None:
        self.method = scope["method"]
        raw = scope.get("raw_path")
        self.path = raw.decode("latin-1") if raw else scope["path"]
        self.start, self.task, self.frame, self._send = start, task, frame, send
        self.thread: int | None = None   # the pool thread running it now (WSGI)
        self.started = self.reported = self.answered = self.queued = False

    async def send(self, message) -> None:
        if not self.started:
            if self.answered:   # answered 504 already: the application is not heard any more
                raise RequestTimeout()
            if message["type"] == "http.response.start":
                self.started = True
        await self._send(message)

    def run(self, fn, *args):
        """In a pool thread (wsgi.py): fn(*args), known as this request's thread meanwhile."""
        self.thread = threading.get_ident()
        try:
            return fn(*args)
        finally:
            self.thread = None

    def label(self) -> str:
        return f"{printable(self.method, 20)} {printable(self.path)}"


class Timeouts:
    def __init__(self, timeout: float, notifier) -> None:
        self.timeout, self.notifier = timeout, notifier
        self.app = None
        self.running: set[Request] = set()
        self.abandoned: list[Request] = []   # answered 504 while their WSGI thread ran
        self._loop: asyncio.AbstractEventLoop | None = None
        self._main: int | None = None
        self._interruptible = False
        self._pending: Request | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def wrap(self, app) -> Timeouts:
        self.app = app
        return self

    # ---- on the event loop -----------------------------------------------------------------

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        request = Request(scope, send, time.monotonic(), asyncio.current_task(), sys._getframe())
        scope["cadenza.request"] = request
        self.running.add(request)
        try:
            await self.app(scope, receive, request.send)
        except (asyncio.CancelledError, RequestTimeout, Exception) as exc:
            if not request.answered:
                raise
            if isinstance(exc, asyncio.CancelledError):
                request.task.uncancel()   # the cancellation was ours, and it ends here
        finally:
            self.running.discard(request)
            # No cycle through the frame, the task or uvicorn's cycle: the request is freed at once.
            request.frame = request.task = request._send = None
        if request.answered:
            await send({"type": "http.response.start", "status": 504, "headers": HEADERS})
            await send({"type": "http.response.body", "body": BODY})

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._main = threading.get_ident()
        if threading.current_thread() is threading.main_thread():
            signal.signal(INTERRUPT, self._interrupt)
            self._interruptible = True
        self._thread = threading.Thread(target=self._watch, name="cadenza-timeout", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(1.0)
        still = [request.label() for request in self.abandoned if request.thread is not None]
        if still:
            log.warning("exiting with %d request(s) answered 504 still running in their threads "
                        "(not waited for): %s", len(still), ", ".join(still))

    def _cancel(self, request: Request) -> None:
        task = request.task
        if task is None or task.done() or request.started or request.answered:
            return
        request.answered = True
        if request.thread is not None:
            self.abandoned.append(request)
        task.cancel()

    def _interrupt(self, signum, frame) -> None:
        # In the main thread, between two bytecodes of whatever it runs: raise only inside the
        # request the monitor found holding the loop.
        request, self._pending = self._pending, None
        if request is None or request.answered or request.started or request.frame is None:
            return
        if frame is request.frame or not _inside(frame, request.frame):
            return   # it has yielded meanwhile (the monitor cancels it then), or is in this module
        request.answered = True
        raise RequestTimeout()

    # ---- in the monitor thread -------------------------------------------------------------

    def _watch(self) -> None:
        wait = self.timeout
        while not self._stop.wait(wait):
            try:
                wait = self._check(time.monotonic())
            except Exception:   # the monitor says why it stopped
                log.exception("the request timeout monitor failed; requests are no longer timed")
                return

    def _check(self, now: float) -> float:
        wait = self.timeout
        for request in list(self.running):   # a copy, made under the GIL: the loop adds and removes
            if request.answered or request.task is None:
                continue
            left = request.start + self.timeout - now
            if left > 0:
                wait = min(wait, left)
                continue
            if not request.reported:
                request.reported = True
                self._report(request, now - request.start)
            if not request.started:
                self._answer(request)
                wait = min(wait, RETRY)
        return max(wait, 0.001)

    def _report(self, request: Request, age: float) -> None:
        frame, task, thread = request.frame, request.task, request.thread
        if frame is None or task is None:
            return   # it has just finished
        frames = sys._current_frames()
        if thread is not None and thread in frames:
            names = {t.ident: t.name for t in threading.enumerate()}
            where = f"in thread {names.get(thread, thread)}"
            stack = _after(_chain(frames[thread]), Request.run.__code__)
        elif _inside(frames.get(self._main), frame):
            where = "holding the event loop: it has not yielded since"
            stack = _chain(frames[self._main])
            stack = stack[stack.index(frame):] if frame in stack else stack
        else:
            where = "waiting in an await"
            stack = _awaiting(task.get_coro())
            stack = stack[stack.index(frame):] if frame in stack else stack
        summary = traceback.StackSummary.extract(((f, f.f_lineno) for f in stack), lookup_lines=False)
        action = ("runs on: its response has started" if request.started
                  else "is answered 504 (Connection: close)")
        log.error("request timed out: %s has run %.1fs, past workers.timeout = %gs, and %s; the worker "
                  "is due for recycling. Its stack (%s):\n%s", request.label(), age, self.timeout, action,
                  where, "".join(summary.format()).rstrip("\n"))
        self.notifier.send(cadenza_timeout=f"{request.label()} {age:.1f}s")

    def _answer(self, request: Request) -> None:
        frame = request.frame
        if (request.thread is None and self._interruptible and frame is not None
                and _inside(sys._current_frames().get(self._main), frame)):
            self._pending = request
            signal.pthread_kill(self._main, INTERRUPT)
        elif not request.queued:
            request.queued = True
            try:
                self._loop.call_soon_threadsafe(self._cancel, request)
            except RuntimeError:   # the loop has closed: the worker is exiting
                pass


def _chain(frame) -> list:
    """A thread's frames, outermost first."""
    frames = []
    while frame is not None:
        frames.append(frame)
        frame = frame.f_back
    frames.reverse()
    return frames


def _awaiting(coro) -> list:
    """A suspended coroutine's frames, outermost first, down what each one awaits (Task.get_stack()
    gives only the outermost: a suspended coroutine's frame has no f_back)."""
    frames = []
    while coro is not None:
        frame = getattr(coro, "cr_frame", None) or getattr(coro, "gi_frame", None)
        if frame is None:
            break
        frames.append(frame)
        coro = getattr(coro, "cr_await", None) or getattr(coro, "gi_yieldfrom", None)
    return frames


def _inside(frame, target) -> bool:
    while frame is not None:
        if frame is target:
            return True
        frame = frame.f_back
    return False


def _after(frames: list, code) -> list:
    """The frames above the last one running `code` (the pool's own frames are not the view's)."""
    for index in range(len(frames) - 1, -1, -1):
        if frames[index].f_code is code:
            return frames[index + 1:]
    return frames
