"""The built-in worker's `[http]` settings, each shown taking effect: the real worker process on a
listening socket this test owns (fd 3, LISTEN_FDS=1; TCP on 127.0.0.1 or a unix socket), the
test playing NOTIFY_SOCKET, real clients (http.client, raw sockets, ssl) and, for the proxy
headers, a real nginx in front of a unix socket.

A setting that the HTTP engine carries out (keepalive, limit_concurrency, root_path, TLS, the
access log, a unix-socket peer, a client leaving mid-response) runs against both engines:
httptools on uvloop and h11 on asyncio (ENGINES). The rest runs on the default one.
"""
from __future__ import annotations

import hashlib
import http.client
import json
import os
import select
import shutil
import socket
import ssl
import subprocess
import tempfile
import threading
import signal
import time
from pathlib import Path

import pytest

from cadenza.worker.wsgi import SPOOL_MEMORY

from procs import accepted, self_signed, wait
from worker_harness import ENGINES, REQUEST, Reply, Worker, clean_eof

APPS = '''\
import asyncio, hashlib, json, os, sys, threading, time, wsgiref.util


def wait_for(path, timeout=20):
    deadline = time.monotonic() + timeout
    while not os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.01)


def touch(path):
    open(path, "w").close()


def _json(start_response, data, status="200 OK"):
    body = json.dumps(data).encode()
    start_response(status, [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
    return [body]


async def _reply(send, data, status=200):
    body = json.dumps(data).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]})
    await send({"type": "http.response.body", "body": body})


# ---- WSGI --------------------------------------------------------------------------------

ENVIRON_KEYS = ("SCRIPT_NAME", "PATH_INFO", "QUERY_STRING", "REMOTE_ADDR", "wsgi.url_scheme",
                "HTTP_X_FORWARDED_FOR", "HTTP_X_FORWARDED_PROTO", "REQUEST_METHOD")


def environ_app(environ, start_response):
    """What a WSGI application sees of its request."""
    data = {key: environ.get(key) for key in ENVIRON_KEYS}
    data["request_uri"] = wsgiref.util.request_uri(environ)   # the URL a framework rebuilds
    return _json(start_response, data)


def gated(environ, start_response):
    print("gated: request in the app", file=sys.stderr, flush=True)
    wait_for(environ["QUERY_STRING"])
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "8")])
    return [b"released"]


def thread_name(environ, start_response):
    time.sleep(0.2)
    name = threading.current_thread().name.encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(name)))])
    return [name]


class Chunks:
    """A streamed response (neither list nor tuple) whose close() leaves a marker file."""

    def __init__(self, chunks, marker, pause=0.0):
        self.chunks, self.marker, self.pause = chunks, marker, pause

    def __iter__(self):
        for chunk in self.chunks:
            if self.pause:
                time.sleep(self.pause)
            yield chunk

    def close(self):
        touch(self.marker)


def endless():
    n = 0
    while True:
        n += 1
        yield b"chunk %08d\\n" % n


BIG = bytes(range(256)) * 4096      # 1 MiB


def suite(environ, start_response):
    """The WSGI adapter's cases, by PATH_INFO; markers go where QUERY_STRING says."""
    path, query = environ["PATH_INFO"], environ["QUERY_STRING"]
    if path == "/stream":
        start_response("200 OK", [("Content-Type", "text/plain")])
        return Chunks([b"one ", b"two ", b"three ", b"four"], query, pause=0.02)
    if path == "/endless":
        start_response("200 OK", [("Content-Type", "text/plain")])
        return Chunks(endless(), query)
    if path == "/big":
        start_response("200 OK", [("Content-Type", "application/octet-stream")])
        return [BIG]
    if path == "/upload":
        stream = environ["wsgi.input"]
        body = stream.read(int(environ.get("CONTENT_LENGTH") or 0))
        return _json(start_response, {"length": len(body), "sha256": hashlib.sha256(body).hexdigest(),
                                      "spooled_to_disk": bool(getattr(stream, "_rolled", False))})
    if path == "/write":
        write = start_response("200 OK", [("Content-Type", "text/plain")])
        write(b"written, ")
        return [b"then returned"]
    if path == "/broken":
        raise RuntimeError("broken before start_response")
    return environ_app(environ, start_response)


# ---- ASGI --------------------------------------------------------------------------------

async def scope_app(scope, receive, send):
    """What an ASGI application sees of its request; no lifespan of its own."""
    if scope["type"] != "http":
        return
    await _reply(send, {"root_path": scope["root_path"], "path": scope["path"],
                        "client": scope["client"], "scheme": scope["scheme"]})


async def lifespan_gated(scope, receive, send):
    """Startup: a marker, then waits for a gate file and sets state; shutdown: a marker."""
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                touch("startup.began")
                while not os.path.exists("startup.gate"):
                    await asyncio.sleep(0.01)
                scope["state"]["greeting"] = "set by startup"
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                touch("shutdown.ran")
                await send({"type": "lifespan.shutdown.complete"})
                return
    await _reply(send, {"state": scope["state"].get("greeting")})


async def lifespan_reports_failure(scope, receive, send):
    if scope["type"] == "lifespan":
        await receive()
        await send({"type": "lifespan.startup.failed", "message": "database unreachable at db:5432"})
        return
    await _reply(send, {"served": True})


async def lifespan_raises(scope, receive, send):
    if scope["type"] == "lifespan":
        await receive()
        raise RuntimeError("database unreachable at db:5432")
    await _reply(send, {"served": True})


async def lifespan_marks(scope, receive, send):
    if scope["type"] == "lifespan":
        touch("lifespan.called")
        message = await receive()
        await send({"type": message["type"] + ".complete"})
        return
    await _reply(send, {"served": True})


async def no_lifespan(scope, receive, send):
    if scope["type"] != "http":
        raise ValueError(f"unsupported scope type {scope['type']!r}")
    await _reply(send, {"served": True})

'''


# The frameworks' own URL building, for an application mounted under a prefix (root_path).
FRAMEWORKS = '''\
from django.conf import settings

settings.configure(ROOT_URLCONF=__name__, ALLOWED_HOSTS=["*"], SECRET_KEY="test only", USE_TZ=True)

from django.core.wsgi import get_wsgi_application
from django.http import JsonResponse
from django.urls import path, reverse
from flask import Flask, request, url_for
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route


def django_x(request):
    return JsonResponse({"reverse": reverse("x"), "absolute": request.build_absolute_uri(),
                         "path": request.path, "path_info": request.path_info})


urlpatterns = [path("x", django_x, name="x")]
django_app = get_wsgi_application()

flask_app = Flask(__name__)


@flask_app.route("/x")
def flask_x():
    return {"url_for": url_for("flask_x"), "external": url_for("flask_x", _external=True),
            "path": request.path, "script_root": request.script_root}


async def starlette_x(request):
    return JSONResponse({"url_for": str(request.url_for("x")), "url": str(request.url)})


starlette_app = Starlette(routes=[Route("/x", starlette_x, name="x")])
'''


def write_apps(directory: Path) -> None:
    (directory / "httpapps.py").write_text(APPS)
    (directory / "frameworks.py").write_text(FRAMEWORKS)


@pytest.fixture(params=sorted(ENGINES))
def engine(request) -> str:
    return request.param


@pytest.fixture
def start(tmp_path):
    """start(app, http={...}, engine=None, **worker_options) -> a Worker, not yet ready."""
    write_apps(tmp_path)
    workers = []

    def _start(app: str, http: dict | None = None, engine: str | None = None, **options) -> Worker:
        settings = {**(ENGINES[engine] if engine else {}), **(http or {})}
        w = Worker(tmp_path, app, {"CADENZA_HTTP": json.dumps(settings)}, **options)
        w.engine = engine
        workers.append(w)
        return w
    yield _start
    for w in workers:
        w.close()


def request(port: int, path: str = "/", method: str = "GET", headers: dict | None = None,
            body: bytes | None = None, context: ssl.SSLContext | None = None):
    """(status, headers, body) of one request on a new connection."""
    if context is None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=15)
    else:
        conn = http.client.HTTPSConnection("127.0.0.1", port, timeout=15, context=context)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        conn.close()


def get_json(port: int, path: str = "/", **options) -> dict:
    status, _, body = request(port, path, **options)
    assert status == 200, (status, body)
    return json.loads(body)


def stopped(w: Worker) -> int:
    """Drain the worker; its exit code once it exited and its stderr is read."""
    w.drain()
    return w.wait_exit()


def poll(condition, timeout: float = 10, what: str = "the condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what} did not happen within {timeout}s"
        time.sleep(0.01)


# ---- keepalive ----------------------------------------------------------------------------

def test_keepalive_ends_an_idle_connection_with_a_clean_eof(start, engine):
    w = start("httpapps:environ_app", {"keepalive": 1}, engine, debug=True)
    w.wait_ready()
    with socket.create_connection(("127.0.0.1", w.port), timeout=10) as s:
        local = s.getsockname()[1]
        s.sendall(REQUEST)
        reply = Reply(s)
        assert reply.kind == "ok" and reply.status == 200 and not reply.closes, reply
        idle_since = time.monotonic()
        assert clean_eof(s), "the keep-alive timeout ended the connection with an RST"
        idle = time.monotonic() - idle_since
    assert 0.8 < idle < 3.0, f"closed after {idle:.2f}s idle, with keepalive = 1"
    w.wait_log(f"127.0.0.1:{local}: closing (keep-alive timeout)")


def test_default_keepalive_keeps_an_idle_connection_past_two_seconds(start, engine):
    w = start("httpapps:environ_app", {}, engine)
    w.wait_ready()
    with socket.create_connection(("127.0.0.1", w.port), timeout=10) as s:
        s.sendall(REQUEST)
        assert Reply(s).kind == "ok"
        readable, _, _ = select.select([s], [], [], 2.0)
        assert not readable, "the worker ended an idle connection within 2s (default keepalive is 5s)"
        s.sendall(REQUEST)
        reply = Reply(s)
        assert reply.kind == "ok" and reply.status == 200, reply


# ---- limit_concurrency --------------------------------------------------------------------

def test_limit_concurrency_answers_503_beyond_the_limit(start, engine, tmp_path):
    w = start("httpapps:gated", {"limit_concurrency": 1}, engine)
    w.wait_ready()
    gate = tmp_path / "gate"
    with socket.create_connection(("127.0.0.1", w.port), timeout=15) as held:
        held.sendall(f"GET /?{gate} HTTP/1.1\r\nHost: test\r\n\r\n".encode())
        w.wait_log("gated: request in the app")
        status, headers, body = request(w.port)
        assert status == 503, (status, body)
        assert body == b"Service Unavailable" and headers.get("connection") == "close", (headers, body)
        gate.touch()
        reply = Reply(held)
        assert reply.kind == "ok" and reply.status == 200 and reply.body == b"released", reply
    # Both connections ended: once the worker has seen that, the next one is served again.
    poll(lambda: request(w.port, f"/?{gate}")[0] == 200, what="a 200 once the limit freed")
    assert "Exceeded concurrency limit." in w.log()


# ---- root_path ----------------------------------------------------------------------------

def test_root_path_becomes_script_name_for_wsgi(start, engine):
    w = start("httpapps:environ_app", {"root_path": "/api"}, engine)
    w.wait_ready()
    # The proxy stripped /api: the request reaches the worker as /x.
    seen = get_json(w.port, "/x?y=1", headers={"Host": "example.test"})
    assert (seen["SCRIPT_NAME"], seen["PATH_INFO"], seen["QUERY_STRING"]) == ("/api", "/x", "y=1"), seen
    assert seen["request_uri"] == "http://example.test/api/x?y=1"
    # PEP 3333: PATH_INFO carries the URL's bytes as latin-1 (what Django and Werkzeug decode).
    seen = get_json(w.port, "/caf%C3%A9")
    assert seen["PATH_INFO"].encode("latin-1").decode("utf-8") == "/café", seen
    assert seen["SCRIPT_NAME"] == "/api"


def test_root_path_reaches_an_asgi_scope(start, engine):
    w = start("httpapps:scope_app", {"root_path": "/api"}, engine)
    w.wait_ready()
    seen = get_json(w.port, "/x")
    # ASGI: `path` is the full path, root_path included (uvicorn prepends it).
    assert (seen["root_path"], seen["path"]) == ("/api", "/api/x"), seen


@pytest.mark.parametrize("framework, expected", [
    ("django", {"reverse": "/api/x", "absolute": "http://example.test/api/x", "path": "/api/x",
                "path_info": "/x"}),
    ("flask", {"url_for": "/api/x", "external": "http://example.test/api/x", "path": "/x",
               "script_root": "/api"}),
    ("starlette", {"url_for": "http://example.test/api/x", "url": "http://example.test/api/x"})])
def test_root_path_gives_frameworks_their_mount_prefix(start, framework, expected):
    """Behind a proxy that strips /api, the application's own links carry /api again."""
    w = start(f"frameworks:{framework}_app", {"root_path": "/api"})
    w.wait_ready()
    assert get_json(w.port, "/x", headers={"Host": "example.test"}) == expected


# ---- TLS ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def certificate(tmp_path_factory) -> tuple[Path, Path]:
    return self_signed(tmp_path_factory.mktemp("tls"), "DNS:localhost")


def test_tls_on_the_inherited_listener(start, engine, certificate):
    cert, key = certificate
    w = start("httpapps:environ_app", {"certfile": str(cert), "keyfile": str(key)}, engine)
    w.wait_ready()
    context = ssl.create_default_context(cafile=str(cert))
    context.verify_flags |= ssl.VERIFY_X509_STRICT   # as Python 3.13 verifies by default
    with socket.create_connection(("127.0.0.1", w.port), timeout=15) as raw:
        with context.wrap_socket(raw, server_hostname="localhost") as tls:
            assert dict(x[0] for x in tls.getpeercert()["subject"])["commonName"] == "localhost"
            tls.sendall(REQUEST)
            reply = Reply(tls)
    assert reply.kind == "ok" and reply.status == 200, reply
    assert json.loads(reply.body)["wsgi.url_scheme"] == "https"
    # A client that does not trust the certificate is refused by its own verification.
    with pytest.raises(ssl.SSLCertVerificationError):
        request(w.port, context=ssl.create_default_context())
    assert "TLS" in w.wait_log("serving WSGI")


def test_a_tls_handshake_under_way_when_the_drain_begins_is_finished_and_served(start, engine, certificate):
    """A connection accepted before the drain whose handshake is not over is in no list of the
    server's (its protocol hears connection_made only after the handshake): it must not be cut.
    Here the client starts its handshake only once the worker is shutting down."""
    cert, key = certificate
    w = start("httpapps:environ_app", {"certfile": str(cert), "keyfile": str(key)}, engine)
    w.wait_ready()
    context = ssl.create_default_context(cafile=str(cert))
    raw = socket.create_connection(("127.0.0.1", w.port), timeout=15)
    try:
        wait(lambda: accepted(w.port, raw.getsockname()[1]), what="the connection accepted")
        w.proc.send_signal(signal.SIGTERM)
        w.wait_log("Shutting down")
        with context.wrap_socket(raw, server_hostname="localhost") as tls:
            tls.sendall(REQUEST)
            reply = Reply(tls)
    finally:
        raw.close()
    assert reply.kind == "ok" and reply.status == 200, (reply, w.log())
    assert w.wait_exit() == 0


@pytest.mark.parametrize("problem", ["missing", "not a key", "a directory"])
def test_a_key_that_cannot_be_used_ends_the_worker_with_exit_3(start, certificate, tmp_path, problem):
    cert, _ = certificate
    key = tmp_path / "server.key"
    if problem == "not a key":
        key.write_text("this is not a PEM private key\n")
    elif problem == "a directory":   # unreadable as a file, for root too
        key.mkdir()
    w = start("httpapps:environ_app", {"certfile": str(cert), "keyfile": str(key)})
    assert w.wait_exit() == 3, w.log()
    assert not w.notified("READY=1")
    statuses = w.statuses()
    assert statuses and "[http]" in statuses[-1] and f"keyfile {key} cannot be used" in statuses[-1], statuses


# ---- access_log ---------------------------------------------------------------------------

def test_access_log_writes_one_line_per_request(start, engine):
    w = start("httpapps:environ_app", {"access_log": True}, engine)
    w.wait_ready()
    with socket.create_connection(("127.0.0.1", w.port), timeout=15) as s:
        local = s.getsockname()[1]
        for target in ("/p?q=1", "/other"):
            s.sendall(f"GET {target} HTTP/1.1\r\nHost: test\r\n\r\n".encode())
            assert Reply(s).status == 200
    assert stopped(w) == 0
    # uvicorn's access logger: '%s - "%s %s HTTP/%s" %d' (client, method, path?query, version, status)
    lines = [line for line in w.lines if ' - "' in line]
    assert len(lines) == 2, lines
    assert lines[0].endswith(f' INFO 127.0.0.1:{local} - "GET /p?q=1 HTTP/1.1" 200'), lines
    assert lines[1].endswith(f' INFO 127.0.0.1:{local} - "GET /other HTTP/1.1" 200'), lines


def test_no_access_log_by_default(start, engine):
    w = start("httpapps:environ_app", {}, engine)
    w.wait_ready()
    assert request(w.port, "/p?q=1")[0] == 200
    assert stopped(w) == 0
    assert not [line for line in w.lines if '"GET /p?q=1 HTTP/1.1"' in line], w.log()


# ---- proxy_headers ------------------------------------------------------------------------

FORWARDED = {"X-Forwarded-For": "203.0.113.7", "X-Forwarded-Proto": "https"}


def seen_by_both(start, http: dict, headers: dict) -> tuple[dict, dict]:
    """What a WSGI and an ASGI application each see of one request from 127.0.0.1."""
    wsgi, asgi = start("httpapps:environ_app", http), start("httpapps:scope_app", http)
    wsgi.wait_ready()
    asgi.wait_ready()
    return get_json(wsgi.port, headers=headers), get_json(asgi.port, headers=headers)


def test_proxy_headers_from_a_trusted_peer(start):
    wsgi, asgi = seen_by_both(start, {}, FORWARDED)   # 127.0.0.1 is trusted by default
    assert (wsgi["REMOTE_ADDR"], wsgi["wsgi.url_scheme"]) == ("203.0.113.7", "https"), wsgi
    assert (asgi["client"], asgi["scheme"]) == (["203.0.113.7", 0], "https"), asgi


def test_proxy_headers_take_the_rightmost_untrusted_hop(start):
    chain = {"X-Forwarded-For": "198.51.100.1, 203.0.113.7, 127.0.0.1"}
    wsgi, asgi = seen_by_both(start, {}, chain)
    assert wsgi["REMOTE_ADDR"] == "203.0.113.7", wsgi   # the client may have forged the first
    assert asgi["client"] == ["203.0.113.7", 0], asgi


@pytest.mark.parametrize("http", [{"forwarded_allow_ips": ["10.9.9.9"]}, {"proxy_headers": False}],
                         ids=["peer-not-allowed", "proxy-headers-off"])
def test_proxy_headers_ignored(start, http):
    wsgi, asgi = seen_by_both(start, http, FORWARDED)
    assert (wsgi["REMOTE_ADDR"], wsgi["wsgi.url_scheme"]) == ("127.0.0.1", "http"), wsgi
    assert wsgi["HTTP_X_FORWARDED_FOR"] == "203.0.113.7"   # left to the application, unused
    assert asgi["client"][0] == "127.0.0.1" and asgi["client"][1] > 0 and asgi["scheme"] == "http", asgi


class Nginx:
    """A real nginx (Debian's package) in the foreground, in front of a unix socket."""

    def __init__(self, directory: Path, upstream: Path):
        self.directory = directory
        for attempt in range(5):
            with socket.socket() as probe:
                probe.bind(("127.0.0.1", 0))
                self.port = probe.getsockname()[1]
            conf = directory / "nginx.conf"
            conf.write_text(f"""
{"user root;" if os.geteuid() == 0 else ""}
daemon off;
master_process off;
pid {directory}/nginx.pid;
error_log {directory}/error.log info;
events {{ worker_connections 64; }}
http {{
    access_log off;
    client_body_temp_path {directory}/body;
    proxy_temp_path {directory}/proxy;
    fastcgi_temp_path {directory}/fastcgi;
    uwsgi_temp_path {directory}/uwsgi;
    scgi_temp_path {directory}/scgi;
    server {{
        listen 127.0.0.1:{self.port};
        location / {{
            proxy_pass http://unix:{upstream};
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_set_header X-Forwarded-Proto $scheme;
            proxy_set_header Host $host;
        }}
    }}
}}
""")
            self.proc = subprocess.Popen([self.binary(), "-p", str(directory), "-c", str(conf),
                                          "-e", str(directory / "error.log")],
                                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            if self._listening():
                return
            self.proc.wait(10)   # the port was taken in between: another one
        raise AssertionError(f"nginx did not start:\n{self.errors()}")

    @staticmethod
    def binary() -> str:
        path = shutil.which("nginx") or ("/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else None)
        assert path, "nginx is not installed: apt-get install nginx (scripts/install.sh --test does)"
        return path

    def _listening(self) -> bool:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return True
            except OSError:
                time.sleep(0.02)
        self.stop()
        raise AssertionError(f"nginx does not listen on 127.0.0.1:{self.port}:\n{self.errors()}")

    def errors(self) -> str:
        path = self.directory / "error.log"
        return path.read_text() if path.exists() else ""

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
        self.proc.wait(10)


def unix_listener(path: Path) -> socket.socket:
    if path.exists():
        path.unlink()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(128)
    return listener


def test_proxy_headers_behind_nginx_on_a_unix_socket(start, engine):
    # A short directory: a unix socket's path has at most 107 bytes.
    directory = Path(tempfile.mkdtemp(prefix="cadenza-nginx-"))
    upstream = directory / "app.sock"
    nginx = Nginx(directory, upstream)
    try:
        # A client that forges both headers; nginx appends the address it saw and sets the scheme.
        forged = {"X-Forwarded-For": "198.51.100.1", "X-Forwarded-Proto": "https"}
        w = start("httpapps:environ_app", {"forwarded_allow_ips": ["unix"]}, engine,
                  listener=unix_listener(upstream))
        w.wait_ready()
        seen = get_json(nginx.port, headers=forged)
        assert seen["HTTP_X_FORWARDED_FOR"] == "198.51.100.1, 127.0.0.1", seen   # nginx's doing
        assert (seen["REMOTE_ADDR"], seen["wsgi.url_scheme"]) == ("127.0.0.1", "http"), seen
        assert stopped(w) == 0
        # The default list (127.0.0.1) does not cover a unix-socket peer: nothing is believed.
        w = start("httpapps:environ_app", {}, engine, listener=unix_listener(upstream))
        w.wait_ready()
        seen = get_json(nginx.port, headers=forged)
        assert seen["HTTP_X_FORWARDED_FOR"] == "198.51.100.1, 127.0.0.1", seen
        assert seen["REMOTE_ADDR"] is None and seen["wsgi.url_scheme"] == "http", seen
        assert stopped(w) == 0
    finally:
        nginx.stop()
        shutil.rmtree(directory, ignore_errors=True)
    assert "[emerg]" not in nginx.errors() and "[crit]" not in nginx.errors(), nginx.errors()


# ---- wsgi_threads -------------------------------------------------------------------------

def thread_names(port: int, clients: int = 8) -> list[str]:
    names: list[str] = []
    failures: list[BaseException] = []
    ready = threading.Barrier(clients, timeout=15)

    def client():
        try:
            ready.wait()
            status, _, body = request(port)
            assert status == 200, status
            names.append(body.decode())
        except BaseException as exc:  # noqa: BLE001 - reported below
            failures.append(exc)
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not failures, failures
    assert len(names) == clients
    return names


def test_wsgi_threads_bound_the_pool(start):
    two, eight = start("httpapps:thread_name", {"wsgi_threads": 2}), start("httpapps:thread_name",
                                                                            {"wsgi_threads": 8})
    two.wait_ready()
    eight.wait_ready()
    started = time.monotonic()
    names = thread_names(two.port)
    assert len(set(names)) == 2, names
    assert time.monotonic() - started >= 4 * 0.2, "8 requests of 0.2s ran more than 2 at a time"
    assert len(set(thread_names(eight.port))) > 2
    assert "WSGI (2 threads)" in two.wait_log("serving WSGI")


# ---- lifespan -----------------------------------------------------------------------------

def test_lifespan_startup_gates_ready_and_shutdown_runs_on_drain(start, engine, tmp_path):
    w = start("httpapps:lifespan_gated", {"lifespan": "auto"}, engine)
    poll(lambda: (tmp_path / "startup.began").exists() or w.proc.poll() is not None, what="the startup")
    assert w.proc.poll() is None, w.log()
    assert not w.notified("READY=1"), "READY=1 before the lifespan startup completed"
    with socket.create_connection(("127.0.0.1", w.port), timeout=15) as early:
        early.sendall(REQUEST)   # waits in the backlog: the server is not accepting yet
        (tmp_path / "startup.gate").touch()
        w.wait_ready()
        reply = Reply(early)
    assert reply.kind == "ok" and json.loads(reply.body) == {"state": "set by startup"}, reply
    assert get_json(w.port) == {"state": "set by startup"}
    assert not (tmp_path / "shutdown.ran").exists()
    assert stopped(w) == 0, w.log()
    assert (tmp_path / "shutdown.ran").exists()


@pytest.mark.parametrize("app, lifespan", [("lifespan_reports_failure", "auto"),
                                           ("lifespan_reports_failure", "on"),
                                           ("lifespan_raises", "on")])
def test_a_failed_lifespan_startup_ends_the_worker_with_exit_3(start, app, lifespan):
    w = start(f"httpapps:{app}", {"lifespan": lifespan})
    assert w.wait_exit() == 3, w.log()
    assert not w.notified("READY=1")
    statuses = w.statuses()
    assert statuses and statuses[-1].startswith("the application's lifespan startup failed: "), statuses
    if app == "lifespan_reports_failure":
        assert statuses[-1].endswith("database unreachable at db:5432"), statuses
    else:
        assert "raised" in statuses[-1], statuses
        assert "RuntimeError: database unreachable at db:5432" in w.log()


def test_lifespan_off_never_calls_the_apps_lifespan(start, tmp_path):
    w = start("httpapps:lifespan_marks", {"lifespan": "off"})
    w.wait_ready()
    assert get_json(w.port) == {"served": True}
    assert stopped(w) == 0
    assert not (tmp_path / "lifespan.called").exists()


def test_lifespan_auto_serves_an_app_without_lifespan(start):
    w = start("httpapps:no_lifespan", {"lifespan": "auto"})
    w.wait_ready()
    assert get_json(w.port) == {"served": True}
    assert "ASGI 'lifespan' protocol appears unsupported." in w.log()
    assert stopped(w) == 0


def test_lifespan_auto_runs_an_apps_lifespan(start, tmp_path):
    w = start("httpapps:lifespan_marks", {})
    w.wait_ready()
    assert (tmp_path / "lifespan.called").exists()


@pytest.mark.parametrize("lifespan", ["auto", "on"])
def test_wsgi_apps_have_no_lifespan(start, lifespan):
    w = start("httpapps:environ_app", {"lifespan": lifespan})
    w.wait_ready()
    assert get_json(w.port, "/x")["PATH_INFO"] == "/x"
    assert stopped(w) == 0
    assert "lifespan" not in w.log().lower() and "Application startup" not in w.log(), w.log()


# ---- the WSGI adapter ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    directory = tmp_path_factory.mktemp("wsgi")
    write_apps(directory)
    w = Worker(directory, "httpapps:suite", {"CADENZA_HTTP": "{}"})
    w.directory = directory
    try:
        w.wait_ready()
        yield w
    finally:
        w.close()


def test_wsgi_streamed_response_in_order_then_closed(suite):
    marker = suite.directory / "stream.closed"
    status, headers, body = request(suite.port, f"/stream?{marker}")
    assert status == 200 and body == b"one two three four", body
    assert headers.get("transfer-encoding") == "chunked" and "content-length" not in headers, headers
    poll(marker.exists, what="the iterable's close()")


def test_wsgi_one_megabyte_body_exact(suite):
    status, headers, body = request(suite.port, "/big")
    assert status == 200 and headers["content-length"] == str(1 << 20)
    assert body == bytes(range(256)) * 4096


def test_wsgi_three_megabyte_post_is_spooled(suite):
    payload = os.urandom(3 << 20)
    status, _, body = request(suite.port, "/upload", method="POST", body=payload,
                              headers={"Content-Type": "application/octet-stream"})
    assert status == 200, body
    assert json.loads(body) == {"length": len(payload), "sha256": hashlib.sha256(payload).hexdigest(),
                                "spooled_to_disk": len(payload) > SPOOL_MEMORY}


def test_wsgi_write_from_start_response(suite):
    status, headers, body = request(suite.port, "/write")
    assert status == 200 and body == b"written, then returned", body
    assert headers["content-length"] == str(len(body))


def test_wsgi_app_raising_before_start_response_is_a_500(suite):
    status, _, body = request(suite.port, "/broken")
    assert status == 500 and body == b"Internal Server Error", (status, body)
    assert "RuntimeError: broken before start_response" in suite.wait_log("RuntimeError: broken")
    assert request(suite.port, "/x")[0] == 200   # the worker goes on serving


def test_wsgi_head_has_headers_and_no_body(suite):
    with socket.create_connection(("127.0.0.1", suite.port), timeout=15) as s:
        s.sendall(b"HEAD /x HTTP/1.1\r\nHost: test\r\n\r\n")
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = s.recv(65536)
            assert chunk, head
            head += chunk
        status_line, _, rest = head.partition(b"\r\n")
        assert status_line == b"HTTP/1.1 200 OK" and b"content-length: " in rest.lower(), head
        assert head.endswith(b"\r\n\r\n"), f"HEAD answered with a body: {head!r}"
        s.sendall(b"GET /x HTTP/1.1\r\nHost: test\r\n\r\n")   # the same connection is still in step
        reply = Reply(s)
    assert reply.kind == "ok" and json.loads(reply.body)["REQUEST_METHOD"] == "GET", reply


def test_wsgi_client_leaving_an_endless_stream_closes_the_iterable(start, engine, tmp_path):
    w = start("httpapps:suite", {}, engine)
    w.wait_ready()
    marker = tmp_path / "endless.closed"
    with socket.create_connection(("127.0.0.1", w.port), timeout=15) as s:
        s.sendall(f"GET /endless?{marker} HTTP/1.1\r\nHost: test\r\n\r\n".encode())
        received = b""
        while received.count(b"chunk ") < 100:
            chunk = s.recv(65536)
            assert chunk, received[-200:]
            received += chunk
    poll(marker.exists, what="close() of the endless iterable after the client left")
    assert request(w.port, "/x")[0] == 200
