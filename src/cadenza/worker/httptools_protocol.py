"""The httptools engine (llhttp, the parser of Node.js), with the drain of drain.py.

Imported only when httptools is installed. uvicorn's cycle already writes `Connection: close`
when its `keep_alive` is false, so the drain needs no wrapper around the application's `send`:
a cycle created or still unanswered while draining gets `keep_alive = False`, and its transport
is the connection's ClosingTransport, whose close() lingers.
"""

from __future__ import annotations

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from .drain import Draining


class DrainingHttpToolsProtocol(Draining, HttpToolsProtocol):

    def response_in_flight(self) -> bool:
        cycle = self.cycle
        return cycle is not None and not cycle.response_complete

    def _arriving(self) -> bool:
        # on_message_begin gives each request a new scope; its cycle (and so self.cycle) exists
        # once its headers are complete, and more_body stays true until its body is.
        scope, cycle = self.scope, self.cycle
        if scope is None:
            return False
        # A body still arriving after its response completed is not waited for: the close
        # lingers, and lingering reads and discards it.
        return cycle is None or cycle.scope is not scope or (cycle.more_body and not cycle.response_complete)

    _client_close = False

    def _client_closes(self) -> bool:
        return self._client_close

    def on_headers_complete(self) -> None:
        previous = self.cycle
        super().on_headers_complete()
        cycle = self.cycle
        if cycle is not previous and cycle is not None:
            self._client_close = not cycle.keep_alive     # as uvicorn made it: the client's wish
        if (previous is not None and not previous.response_complete and not previous.keep_alive
                and cycle is not previous):
            # Pipelined behind a response that ends the connection: HTTP/1.1 (RFC 9112 9.3.2)
            # leaves such a request to the client to send again on a new connection.
            self._log("%s: a request pipelined behind a closing response is not answered; the "
                      "client sends it again", self._peer())
        if cycle is not None and cycle.transport is not self._closing_transport:
            # The request's task has not run yet: it sees this transport and this keep_alive.
            cycle.transport = self._closing_transport
            if self.draining or self.discarding or self.peer_eof:
                cycle.keep_alive = False

    # The keep-alive timer. uvicorn arms a new timer after every response and cancels it when
    # the next request arrives: two heap operations per request. Here one timer per connection
    # stays armed and, when it fires, looks at how long the connection has been idle.
    _idle_since: float | None = None
    _idle_timer = None

    def _unset_keepalive_if_required(self) -> None:
        self._idle_since = None

    def on_response_complete(self) -> None:
        self._closing_transport.flush()
        self.server_state.total_requests += 1
        if self.lingering or self.transport.is_closing():
            return
        self.flow.resume_reading()
        if self.pipeline:
            cycle, app = self.pipeline.pop()
            self._start_asgi_task(cycle, app)
        else:
            self._idle_since = self.loop.time()
            if self._idle_timer is None:
                self._idle_timer = self.loop.call_later(self.timeout_keep_alive, self._idle_check)
        if self.peer_eof:
            self.close_lingering("client closed its side")

    def _idle_check(self) -> None:
        self._idle_timer = None
        if self._idle_since is None or self.transport.is_closing() or self.lingering:
            return   # busy (the next response re-arms), or ending anyway
        left = self._idle_since + self.timeout_keep_alive - self.loop.time()
        if left > 0:
            self._idle_timer = self.loop.call_later(left, self._idle_check)
            return
        self.timeout_keep_alive_handler()
        if not (self.transport.is_closing() or self.lingering):   # a request just came in
            self._idle_timer = self.loop.call_later(self.timeout_keep_alive, self._idle_check)

    def connection_lost(self, exc) -> None:
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None
        super().connection_lost(exc)

    def send_400_response(self, msg: str) -> None:
        # llhttp rejected what the client sent. uvicorn would write a 400 into the middle of a
        # response in flight (a pipelined request after garbage): here that response completes
        # with "Connection: close" and the rest of the input is discarded.
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete:
            self._log("%s: %s while a response is written; it completes, then the connection closes",
                      self._peer(), msg)
            self.discarding = True
            cycle.keep_alive = False
            if cycle.more_body:          # its own request is broken: the app hears http.disconnect
                cycle.disconnected = True
                cycle.message_event.set()
            return
        self._closing_transport.flush()
        self.transport.write(b"HTTP/1.1 400 Bad Request\r\ncontent-type: text/plain; charset=utf-8\r\n"
                             b"content-length: %d\r\nconnection: close\r\n\r\n%s"
                             % (len(msg), msg.encode("ascii")))
        self.close_lingering("invalid request")
