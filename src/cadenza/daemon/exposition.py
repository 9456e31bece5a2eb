"""`[metrics] listen`: the main master answers Prometheus scrapes (DESIGN §9).

HTTP/1.1, one request per connection: `GET /metrics` (or `/`) is answered with the text of
metrics.py, then the connection closes. What a scrape may cost the master is bounded:

- nothing while nobody scrapes: no timer, no poll, only the listening socket in the selector;
- MAX_CLIENTS connections at once; one more takes the place of the oldest that has not sent its
  request yet, so idle connections cannot lock scrapers out, nor make the master hold fds it
  might need for workers; an accept that fails (EMFILE) pauses accepting for ACCEPT_PAUSE;
- the text is rendered once a request is complete, not for every connection;
- a client has DEADLINE seconds for its request line and for reading its answer. A slow or stalled
  scraper is written to only when its socket can take more (non-blocking, the loop's selector),
  and closed at its deadline: it never holds the loop.

The listening socket passes from generation to generation like the control socket (named
METRICS_FDNAME), so a scrape during an upgrade is answered by whichever master is main. From
MAINPID= on, the old master answers with the figures it had while main (`freeze`): a scrape it
accepted still describes a main generation, and a master that exits answers the scrapes it
accepted before it goes (close()), rather than cutting them.
"""

from __future__ import annotations

import logging
import selectors
import socket

from .loop import Acceptor, Loop, Timer

log = logging.getLogger("cadenza.master")

METRICS_FDNAME = "cadenza-metrics"
MAX_CLIENTS = 16
MAX_REQUEST = 8192
DEADLINE = 10.0
ANSWER_GRACE = 0.5   # seconds an exiting master gives each scrape it still owes an answer
ACCEPT_PAUSE = 0.5
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class Exposition:
    def __init__(self, loop: Loop, sock: socket.socket, render):
        self.loop, self.sock, self.render = loop, sock, render
        self.clients: list[_Scrape] = []       # oldest first
        self.frozen: str | None = None
        sock.setblocking(False)
        self.acceptor = Acceptor(loop, sock, self._accept, ACCEPT_PAUSE)
        self.acceptor.start()

    def text(self) -> str:
        return self.frozen if self.frozen is not None else self.render()

    def freeze(self, text: str | None) -> None:
        self.frozen = text

    def _accept(self) -> None:
        for _ in range(MAX_CLIENTS):
            try:
                conn, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:      # EMFILE and the like: pause, or the loop would spin on it
                log.warning("metrics: cannot accept a scrape: %s; accepting again in %gs",
                            exc.strerror or exc, ACCEPT_PAUSE)
                self.acceptor.pause()
                return
            if len(self.clients) >= MAX_CLIENTS:
                idle = next((c for c in self.clients if not c.answer), None)
                if idle is None:
                    conn.close()
                    continue
                idle.close()
            self.clients.append(_Scrape(self, conn))

    def start_accepting(self) -> None:
        self.acceptor.start()

    def stop_accepting(self) -> None:
        """Not main any more: the next main answers (scrapes under way finish)."""
        self.acceptor.stop()

    def close(self) -> None:
        self.stop_accepting()
        for client in list(self.clients):
            client.answer_now()


class _Scrape:
    def __init__(self, server: Exposition, conn: socket.socket):
        self.server, self.conn = server, conn
        self.request = b""
        self.answer = b""
        conn.setblocking(False)
        self.deadline: Timer = server.loop.after(DEADLINE, self.close)
        server.loop.add_reader(conn, self._read)

    def _read(self) -> None:
        try:
            data = self.conn.recv(MAX_REQUEST)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self.close()
            return
        self.request += data
        if b"\r\n\r\n" not in self.request and b"\n\n" not in self.request:
            if len(self.request) > MAX_REQUEST:
                self._respond(431, "request header too large\n")
            return
        line = self.request.split(b"\n", 1)[0].decode("latin-1").strip()
        method, _, rest = line.partition(" ")
        path = rest.split(" ", 1)[0].split("?", 1)[0]
        if method not in ("GET", "HEAD"):
            self._respond(405, "only GET is served here\n")
        elif path not in ("/metrics", "/"):
            self._respond(404, "the metrics are at /metrics\n")
        else:
            self._respond(200, self.server.text(), head=method == "HEAD")

    def _respond(self, code: int, body: str, head: bool = False) -> None:
        self._build(code, body, head)
        self.server.loop.set_events(self.conn, selectors.EVENT_WRITE, self._write)
        self._write()

    def _build(self, code: int, body: str, head: bool = False) -> None:
        reason = {200: "OK", 404: "Not Found", 405: "Method Not Allowed", 431: "Request Header Fields Too Large"}
        data = body.encode()
        self.answer = (f"HTTP/1.1 {code} {reason[code]}\r\nContent-Type: {CONTENT_TYPE}\r\n"
                       f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n").encode() + (b"" if head else data)

    def _write(self) -> None:
        try:
            sent = self.conn.send(self.answer)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self.close()
            return
        self.answer = self.answer[sent:]
        if not self.answer:
            self.close()

    def answer_now(self) -> None:
        """The master exits: what is owed is written now, blocking at most ANSWER_GRACE seconds."""
        if self.conn.fileno() < 0:
            return
        if not self.answer:
            try:
                self.request += self.conn.recv(MAX_REQUEST)
            except OSError:
                pass
            method = self.request.split(b" ", 1)[0]
            if method in (b"", b"GET", b"HEAD"):     # a request not (all) read yet is a scrape's
                self._build(200, self.server.text(), head=method == b"HEAD")
        try:
            self.conn.settimeout(ANSWER_GRACE)
            self.conn.sendall(self.answer)
        except OSError:
            pass
        self.close()

    def close(self) -> None:
        if self.conn.fileno() < 0:
            return
        self.deadline.cancel()
        self.server.loop.remove(self.conn)
        self.conn.close()
        if self in self.server.clients:
            self.server.clients.remove(self)
