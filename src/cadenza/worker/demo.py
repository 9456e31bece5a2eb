"""The built-in demo application (WSGI): says who answered, and can be slow on purpose.

    GET /          -> "hello from cadenza worker 1 gen 1 pid 1234 release /srv/demo/releases/1"
    GET /slow?s=2  -> the same, after sleeping 2 seconds (at most 60)
"""

from __future__ import annotations

import os
import time
from urllib.parse import parse_qs


def app(environ, start_response):
    path = environ.get("PATH_INFO", "/")
    if path == "/slow":
        query = parse_qs(environ.get("QUERY_STRING", ""))
        try:
            seconds = min(float(query.get("s", ["1"])[0]), 60.0)
        except ValueError:
            seconds = 1.0
        time.sleep(max(seconds, 0.0))
    elif path not in ("/", "/health"):
        start_response("404 Not Found", [("Content-Type", "text/plain")])
        return [b"not found\n"]
    body = (f"hello from cadenza worker {os.environ.get('CADENZA_WORKER_ID', '?')} "
            f"gen {os.environ.get('CADENZA_GENERATION', '?')} pid {os.getpid()} "
            f"release {os.getcwd()}\n").encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]
