"""The two applications of the request-path benchmark (engine.py), served by every contender.

`wsgi` and `asgi` answer every request with the same 14 bytes, `Content-Type: text/plain` and a
`Content-Length`, so that a server never has to chunk or close to delimit the body. They do
nothing else: what the benchmark measures is the server around them.

`asgi` answers the lifespan protocol too (uvicorn and granian run it by default; cadenza's
built-in worker does not), so that no server logs a lifespan error or falls back.
"""
from __future__ import annotations

BODY = b"Hello, world!\n"
WSGI_HEADERS = [("Content-Type", "text/plain"), ("Content-Length", str(len(BODY)))]
ASGI_START = {"type": "http.response.start", "status": 200,
              "headers": [(b"content-type", b"text/plain"), (b"content-length", str(len(BODY)).encode())]}
ASGI_BODY = {"type": "http.response.body", "body": BODY}


def wsgi(environ, start_response):
    start_response("200 OK", WSGI_HEADERS)
    return [BODY]


async def asgi(scope, receive, send):
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    await send(ASGI_START)
    await send(ASGI_BODY)
