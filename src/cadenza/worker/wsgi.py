"""WSGI applications on the worker's event loop: PEP 3333 in a thread pool, one hop per request.

The request body is read on the loop first (in memory up to SPOOL_MEMORY, then in a temporary
file), so a slow client never holds one of the pool's threads. The application then runs in the
pool (`[http] wsgi_threads`, the most requests one worker runs at once). A response whose body is
a list or tuple, which is what most frameworks return, comes back in the same hop and goes out as
one write with a Content-Length; any other iterable is streamed, one pool hop per chunk, so a
generator or a file wrapper never sits in memory whole, and it stops when the client goes away.
The iterable's close() is always called, in the pool, as PEP 3333 requires.

The pool's threads are daemons: a view abandoned after workers.timeout answered its request 504
(timeouts.py) may still run when the worker exits, and the exit does not wait for it. With
workers.timeout set, each hop runs through the request's `run`, which names the thread serving it.
"""

from __future__ import annotations

import asyncio
import functools
import io
import logging
import queue
import sys
import tempfile
import threading
from concurrent.futures import Executor, Future

log = logging.getLogger("cadenza.worker")

SPOOL_MEMORY = 1 << 20     # request bodies above this go to a temporary file
_END = object()


class _Response:
    __slots__ = ("status", "headers", "started", "written")

    def __init__(self) -> None:
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.started = False
        self.written: list[bytes] = []


def _environ(scope, body) -> dict:
    root = scope.get("root_path", "")
    path = scope["path"]
    if root and path.startswith(root):
        path = path[len(root):]
    server = scope.get("server") or ("localhost", 80)
    client = scope.get("client")
    environ = {
        "REQUEST_METHOD": scope["method"],
        "SCRIPT_NAME": root.encode("utf-8").decode("latin-1"),
        "PATH_INFO": path.encode("utf-8").decode("latin-1"),
        "QUERY_STRING": scope["query_string"].decode("latin-1"),
        "SERVER_NAME": str(server[0]),
        "SERVER_PORT": str(server[1] if server[1] is not None else 80),
        "SERVER_PROTOCOL": "HTTP/" + scope["http_version"],
        "wsgi.version": (1, 0),
        "wsgi.url_scheme": scope.get("scheme", "http"),
        "wsgi.input": body,
        "wsgi.errors": sys.stderr,
        "wsgi.multithread": True,
        "wsgi.multiprocess": True,
        "wsgi.run_once": False,
    }
    if client:
        environ["REMOTE_ADDR"], environ["REMOTE_PORT"] = client[0], str(client[1])
    for name, value in scope["headers"]:
        key = name.decode("latin-1").upper().replace("-", "_")
        if key not in ("CONTENT_TYPE", "CONTENT_LENGTH"):
            key = "HTTP_" + key
        value = value.decode("latin-1")
        environ[key] = f"{environ[key]},{value}" if key in environ else value
    return environ


class WSGIAdapter:
    """An ASGI application that runs a WSGI one."""

    def __init__(self, app, threads: int) -> None:
        self.app = app
        self.threads = threads
        self.executor = DaemonPool(threads, "wsgi")

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":     # WSGI has no lifespan and no WebSocket
            if scope["type"] == "websocket":
                await send({"type": "websocket.close", "code": 1003})
            return
        body = await self._read_body(receive)
        loop = asyncio.get_running_loop()
        request = scope.get("cadenza.request")     # timeouts.Request, with workers.timeout set
        start = self._start if request is None else functools.partial(request.run, self._start)
        status, headers, chunks, iterator = await loop.run_in_executor(
            self.executor, start, _environ(scope, body))
        if iterator is None:
            content = b"".join(chunks)
            if not any(name == b"content-length" for name, _ in headers):
                headers.append((b"content-length", b"%d" % len(content)))
            await send({"type": "http.response.start", "status": status, "headers": headers})
            await send({"type": "http.response.body", "body": content})
            return
        step, finish = iterator.next, iterator.close
        if request is not None:
            step, finish = functools.partial(request.run, step), functools.partial(request.run, finish)
        await self._stream(loop, status, headers, chunks, step, finish, receive, send)

    async def _read_body(self, receive):
        message = await receive()
        data = message.get("body", b"")
        if not message.get("more_body", False):
            return io.BytesIO(data)
        spool = tempfile.SpooledTemporaryFile(max_size=SPOOL_MEMORY)
        spool.write(data)
        while message.get("more_body", False):
            message = await receive()
            if message["type"] == "http.disconnect":
                break
            spool.write(message.get("body", b""))
        spool.seek(0)
        return spool

    def _start(self, environ):
        """In the pool: call the app; return its status and headers, and either the whole body
        (a list or tuple) or the first chunk and the iterator that yields the rest."""
        response = _Response()

        def start_response(status, headers, exc_info=None):
            if exc_info is not None:
                try:
                    if response.started:
                        raise exc_info[1].with_traceback(exc_info[2])
                finally:
                    exc_info = None
            elif response.status:
                raise RuntimeError("start_response called twice without exc_info")
            response.status = int(status[:3])
            response.headers = [(name.lower().encode("latin-1"), value.encode("latin-1"))
                                for name, value in headers]
            return response.written.append

        result = self.app(environ, start_response)
        if isinstance(result, (list, tuple)):
            _close(result)
            response.started = True
            return response.status, response.headers, [*response.written, *result], None
        try:
            iterator = iter(result)
            first = next(iterator, _END)    # a generator calls start_response on its first step
        except BaseException:
            _close(result)
            raise
        response.started = True
        chunks = [*response.written] + ([] if first is _END else [first])
        if first is _END:
            _close(result)
            return response.status, response.headers, chunks, None
        return response.status, response.headers, chunks, _Iteration(result, iterator)

    async def _stream(self, loop, status, headers, chunks, step, finish, receive, send) -> None:
        gone = asyncio.ensure_future(_disconnect(receive))
        try:
            await send({"type": "http.response.start", "status": status, "headers": headers})
            for chunk in chunks:
                if chunk:
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
            while not gone.done():
                chunk = await loop.run_in_executor(self.executor, step)
                if chunk is _END:
                    await send({"type": "http.response.body", "body": b""})
                    return
                if chunk:
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
            log.debug("the client left during a streamed response; its iterable is closed")
        finally:
            gone.cancel()
            await loop.run_in_executor(self.executor, finish)


class _Iteration:
    def __init__(self, result, iterator) -> None:
        self.result, self.iterator = result, iterator

    def next(self):
        return next(self.iterator, _END)

    def close(self) -> None:
        _close(self.result)


async def _disconnect(receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


class DaemonPool(Executor):
    """ThreadPoolExecutor's scheduling (a thread is started only when none is idle, up to
    `size`) with daemon threads, which the interpreter's exit does not join."""

    def __init__(self, size: int, name: str) -> None:
        self.size, self.name = size, name
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._idle = threading.Semaphore(0)
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._shutdown = False

    def submit(self, fn, /, *args, **kwargs) -> Future:
        if self._shutdown:
            raise RuntimeError("cannot schedule new work after shutdown")
        future: Future = Future()
        self._queue.put((future, fn, args, kwargs))
        if not self._idle.acquire(timeout=0):
            with self._lock:
                if len(self._threads) < self.size:
                    thread = threading.Thread(target=self._work, name=f"{self.name}_{len(self._threads)}",
                                              daemon=True)
                    thread.start()
                    self._threads.append(thread)
        return future

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            future, fn, args, kwargs = item
            del item
            if future.set_running_or_notify_cancel():
                try:
                    result = fn(*args, **kwargs)
                except BaseException as exc:  # noqa: BLE001 - handed to the awaiting request
                    future.set_exception(exc)
                    del exc
                else:
                    future.set_result(result)
                    del result
            del future, fn, args, kwargs
            self._idle.release()

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        self._shutdown = True
        with self._lock:
            threads = list(self._threads)
        for _ in threads:
            self._queue.put(None)
        if wait:
            for thread in threads:
                thread.join()


def _close(result) -> None:
    close = getattr(result, "close", None)
    if close is not None:
        close()
