"""WSGI applications on the worker's event loop: PEP 3333 in a thread pool, one hop per request.

The request body is read on the loop first (in memory up to SPOOL_MEMORY, then in a temporary
file), so a slow client never holds one of the pool's threads. The application then runs in the
pool (`[http] wsgi_threads`, the most requests one worker runs at once). A response whose body is
a list or tuple, which is what most frameworks return, comes back in the same hop and goes out as
one write with a Content-Length; any other iterable is streamed, one pool hop per chunk, so a
generator or a file wrapper never sits in memory whole, and it stops when the client goes away.
The iterable's close() is always called, in the pool, as PEP 3333 requires.
"""

from __future__ import annotations

import asyncio
import io
import logging
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor

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
        self.executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="wsgi")

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":     # WSGI has no lifespan and no WebSocket
            if scope["type"] == "websocket":
                await send({"type": "websocket.close", "code": 1003})
            return
        body = await self._read_body(receive)
        loop = asyncio.get_running_loop()
        status, headers, chunks, iterator = await loop.run_in_executor(
            self.executor, self._start, _environ(scope, body))
        if iterator is None:
            content = b"".join(chunks)
            if not any(name == b"content-length" for name, _ in headers):
                headers.append((b"content-length", b"%d" % len(content)))
            await send({"type": "http.response.start", "status": status, "headers": headers})
            await send({"type": "http.response.body", "body": content})
            return
        await self._stream(loop, status, headers, chunks, iterator, receive, send)

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

    async def _stream(self, loop, status, headers, chunks, iteration, receive, send) -> None:
        gone = asyncio.ensure_future(_disconnect(receive))
        try:
            await send({"type": "http.response.start", "status": status, "headers": headers})
            for chunk in chunks:
                if chunk:
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
            while not gone.done():
                chunk = await loop.run_in_executor(self.executor, iteration.next)
                if chunk is _END:
                    await send({"type": "http.response.body", "body": b""})
                    return
                if chunk:
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
            log.debug("the client left during a streamed response; its iterable is closed")
        finally:
            gone.cancel()
            await loop.run_in_executor(self.executor, iteration.close)


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


def _close(result) -> None:
    close = getattr(result, "close", None)
    if close is not None:
        close()
