"""The built-in worker's drain, without a master: the real worker process on a listening socket
this test owns (fd 3, LISTEN_FDS=1), the test playing NOTIFY_SOCKET, real TCP clients.

What a draining worker owes its clients (DESIGN.md 4.2): no RST ever; a request whose bytes
reached it before it decided to close is answered (with `Connection: close`); a response is
never cut; a closing connection lingers (FIN, read and discard, close). Because the test owns
the listening socket, it can also play the successor: a connection the worker never accepted is
still in the backlog, and the test answers it after the worker has exited.

Every test runs against both engines: httptools on uvloop (the default) and h11 on asyncio (the
fallback), chosen as an operator would, with `[http] protocol` and `loop` (CADENZA_HTTP).
"""
from __future__ import annotations

import asyncio
import json
import random
import re
import socket
import threading
import time
from pathlib import Path

import h11
import pytest
import uvicorn
from uvicorn.server import ServerState

from cadenza.worker.drain import IDLE_GRACE, LINGER
from cadenza.worker.h11_protocol import DrainingH11Protocol
from cadenza.worker.httptools_protocol import DrainingHttpToolsProtocol

from worker_harness import ENGINES, REQUEST, SUCCESSOR, Reply, Worker, clean_eof

PROTOCOLS = {"httptools": DrainingHttpToolsProtocol, "h11": DrainingH11Protocol}

GATED_APP = '''\
import os, sys, time


def wait_for(path):
    deadline = time.monotonic() + 20
    while not os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.01)


def app(environ, start_response):
    gate = environ["QUERY_STRING"]
    print("gated: request in the app", file=sys.stderr, flush=True)
    wait_for(gate + ".start")
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "20")])
    yield b"first half"
    wait_for(gate + ".end")
    yield b"other half"
'''


@pytest.fixture(params=sorted(ENGINES))
def engine(request) -> str:
    return request.param


@pytest.fixture
def worker(tmp_path, engine):
    workers = []

    def _start(app: str = "cadenza.demo:app", env: dict | None = None) -> Worker:
        w = Worker(tmp_path, app, {"CADENZA_HTTP": json.dumps(ENGINES[engine]), **(env or {})})
        w.engine = engine
        workers.append(w)
        w.wait_ready()
        return w
    yield _start
    for w in workers:
        w.close()


def test_idle_close_racing_a_request_never_resets(worker):
    """Keep-alive clients send their next request just as the drain closes idle connections.
    Each request is answered (Connection: close) or meets a clean EOF, and only one that the
    worker read after deciding to close: its close line says nothing was unread (unread=0) and
    it discarded exactly that request. Before the lingering close, ~10% saw ECONNRESET."""
    w = worker()
    clients = 200
    primed = threading.Barrier(clients + 1, timeout=30)
    drain_started: list[float] = []
    go = threading.Event()
    results: dict[int, Reply] = {}

    def client():
        with socket.create_connection(("127.0.0.1", w.port), timeout=15) as s:
            port = s.getsockname()[1]
            s.sendall(REQUEST)
            first = Reply(s)
            assert first.kind == "ok" and not first.closes, first
            primed.wait()
            assert go.wait(30)
            # The race is the point: the drain decides at IDLE_GRACE; aim around that moment.
            time.sleep(max(0.0, drain_started[0] + random.uniform(IDLE_GRACE - 0.05, IDLE_GRACE + 0.08)
                           - time.monotonic()))
            try:
                s.sendall(REQUEST)
            except (BrokenPipeError, ConnectionResetError):
                results[port] = Reply(None, "reset")
                return
            reply = results[port] = Reply(s)
            if reply.kind == "ok":
                reply.clean_eof = clean_eof(s)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    primed.wait()
    w.drain()
    drain_started.append(time.monotonic())
    go.set()
    for t in threads:
        t.join(30)
    assert w.proc.wait(15) == 0
    kinds = [r.kind for r in results.values()]
    assert len(kinds) == clients
    assert kinds.count("reset") == 0 and kinds.count("truncated") == 0, sorted(set(kinds))
    for port, reply in results.items():
        if reply.kind == "ok":
            assert reply.status == 200 and reply.closes and reply.clean_eof, reply
            continue
        close = w.wait_log(f"127.0.0.1:{port}: closing (")
        assert "closing (idle)" in close and "unread=0" in close, close
        assert f"127.0.0.1:{port}: discarded {len(REQUEST)} byte(s)" in w.log(), port
    assert "ok" in kinds, "no request beat the idle close: the race was not run"


def test_bytes_sent_while_a_draining_response_is_written_do_not_cut_it(worker, tmp_path):
    """A response going out with "Connection: close" (the drain's) makes h11 reject anything
    the client sends after it. uvicorn then tries a 400 in the middle of the response, h11
    raises inside data_received, asyncio drops the connection: the client had the headers
    (Content-Length: 20) and 10 bytes, then EOF. The response must complete instead."""
    (tmp_path / "gated.py").write_text(GATED_APP)
    w = worker("gated:app")
    gate = tmp_path / "g"
    with socket.create_connection(("127.0.0.1", w.port), timeout=15) as s:
        s.sendall(f"GET /?{gate} HTTP/1.1\r\nHost: test\r\n\r\n".encode())
        w.wait_log("gated: request in the app")
        w.drain()
        Path(f"{gate}.start").touch()
        head = b""
        while head.count(b"\r\n\r\n") == 0 or not head.endswith(b"first half"):
            chunk = s.recv(65536)
            assert chunk, f"EOF after {head!r}"
            head += chunk
        assert b"connection: close" in head.lower()
        s.sendall(REQUEST)   # a pipelining client: its next request, while the body is written
        # h11 rejects it (data after a closing request); llhttp parses it and leaves it unanswered.
        w.wait_log("Invalid HTTP request received." if w.engine == "h11" else "is not answered")
        Path(f"{gate}.end").touch()
        rest = b""
        while len(rest) < len(b"other half"):
            chunk = s.recv(65536)
            assert chunk, f"response cut after {head + rest!r}"
            rest += chunk
        assert rest == b"other half"
        assert clean_eof(s)
    assert w.proc.wait(15) == 0
    if w.engine == "h11":
        assert "while a response is written; it completes" in w.log()


@pytest.mark.parametrize("engine", sorted(PROTOCOLS))
def test_no_close_while_a_response_is_written(engine):
    """Neither the drain's idle check nor uvicorn's keep-alive timer may end a connection, or
    tell h11 it ended, between a response's headers and its body. uvicorn's own handler sends
    h11.ConnectionClosed regardless: h11 raises and is left in ERROR, so the response's next
    write fails and uvicorn closes after the headers (Content-Length promised, no body)."""
    release = asyncio.Event()

    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"19")]})
        await release.wait()
        await send({"type": "http.response.body", "body": b"release a pid 1234\n"})

    class Transport(asyncio.Transport):
        def __init__(self):
            super().__init__()
            self.out, self.closed, self.eof = bytearray(), False, False

        def write(self, data):
            assert not self.closed and not self.eof, "write after close"
            self.out += data

        def close(self):
            self.closed = True

        def is_closing(self):
            return self.closed

        def write_eof(self):
            self.eof = True

        def can_write_eof(self):
            return True

        def get_extra_info(self, name, default=None):
            return {"peername": ("127.0.0.1", 40000), "sockname": ("127.0.0.1", 80)}.get(name, default)

        def pause_reading(self):
            pass

        def resume_reading(self):
            pass

    async def scenario():
        cls = PROTOCOLS[engine]
        config = uvicorn.Config(app, http=cls, lifespan="off", log_config=None)
        config.load()
        protocol = cls(config, ServerState(), {}, _loop=asyncio.get_running_loop())
        transport = Transport()
        protocol.connection_made(transport)
        protocol.data_received(REQUEST)
        while not (protocol.cycle and protocol.cycle.response_started):
            await asyncio.sleep(0)   # the app's task runs up to its headers
        protocol.shutdown()
        protocol._close_if_idle(waited=60.0)
        protocol.timeout_keep_alive_handler()
        assert protocol.response_in_flight()
        if engine == "h11":
            assert protocol.conn.our_state is h11.SEND_BODY
        assert not transport.closed and not transport.eof
        release.set()
        for _ in range(100):
            if protocol.cycle.response_complete:
                break
            await asyncio.sleep(0)
        assert transport.out.endswith(b"\r\n\r\nrelease a pid 1234\n")
        for task in protocol.tasks:
            await task

    asyncio.run(scenario())


def test_hammered_worker_exits_and_every_connection_ends_with_close(worker):
    """Keep-alive clients that never pause and clients on new connections, through a drain:
    every request is answered, by the worker or by the successor (the test, from the backlog of
    the listening socket the worker stops accepting on); every connection the worker served
    ends with a response carrying "Connection: close" and then its clean FIN, those accepted
    after the drain began included; and the worker exits within its grace plus its linger."""
    w = worker()
    stop = threading.Event()
    failures: list[str] = []
    served = threading.Semaphore(0)
    counts = {"worker": 0, "successor": 0}
    lock = threading.Lock()

    def keepalive_client():
        while not stop.is_set():
            with socket.create_connection(("127.0.0.1", w.port), timeout=15) as s:
                while not stop.is_set():
                    s.sendall(REQUEST)
                    reply = Reply(s)
                    if reply.kind != "ok" or reply.status != 200:
                        failures.append(f"keep-alive: {reply!r}")
                        return
                    with lock:
                        counts["successor" if reply.body == b"successor" else "worker"] += 1
                    served.release()
                    if reply.closes:
                        if not clean_eof(s):
                            failures.append(f"keep-alive: no clean EOF after {reply!r}")
                        break

    def new_connection_client():
        while not stop.is_set():
            with socket.create_connection(("127.0.0.1", w.port), timeout=15) as s:
                s.sendall(REQUEST)
                reply = Reply(s)
                if reply.kind != "ok" or reply.status != 200:
                    failures.append(f"new connection: {reply!r}")
                    return
                served.release()

    threads = ([threading.Thread(target=keepalive_client) for _ in range(8)]
               + [threading.Thread(target=new_connection_client) for _ in range(4)])
    for t in threads:
        t.start()
    for _ in range(200):   # traffic first: the drain must meet connections in every state
        assert served.acquire(timeout=15), failures
    started = time.monotonic()
    w.drain()
    assert w.proc.wait(15) == 0
    took = time.monotonic() - started
    # The successor: whatever the worker left in the backlog is answered here.
    w.listener.settimeout(0.2)
    stop.set()
    deadline = time.monotonic() + 15
    while any(t.is_alive() for t in threads) and time.monotonic() < deadline:
        try:
            conn, _ = w.listener.accept()
        except TimeoutError:
            continue
        with conn:
            conn.settimeout(5)
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = conn.recv(65536)
                if not chunk:
                    break
                data += chunk
            if data:
                conn.sendall(SUCCESSOR)
    for t in threads:
        t.join(5)
    assert not failures, failures[:5]
    assert counts["worker"] > 0, counts
    assert took < IDLE_GRACE + LINGER + 3, f"the worker took {took:.1f}s to drain"
    closes = [line for line in w.lines if ": closing (" in line]
    assert all(re.search(r": closing \((response sent|idle)\)", line) for line in closes), closes


def test_a_client_that_half_closes_after_its_request_gets_the_response(worker):
    """`printf 'GET / ...' | nc host port` sends its request, then shuts down its write side.
    The EOF must not end the connection before the response: it is answered, then closed."""
    w = worker()
    with socket.create_connection(("127.0.0.1", w.port), timeout=15) as s:
        s.sendall(REQUEST)
        s.shutdown(socket.SHUT_WR)
        reply = Reply(s)
        assert reply.kind == "ok" and reply.status == 200, reply
        assert clean_eof(s)


def test_a_client_that_asks_for_the_close_is_closed_at_once_without_reset(worker):
    """`Connection: close` from the client: it sends nothing after its request, so the worker
    closes at once (no linger), and the client sees the whole response, then a clean EOF."""
    w = worker()
    for _ in range(20):
        with socket.create_connection(("127.0.0.1", w.port), timeout=15) as s:
            s.sendall(b"GET / HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n")
            reply = Reply(s)
            assert reply.kind == "ok" and reply.status == 200 and reply.closes, reply
            assert clean_eof(s)
