"""The httptools engine (llhttp, the parser of Node.js), with the drain of drain.py.

Imported only when httptools is installed. uvicorn's cycle already writes `Connection: close`
when its `keep_alive` is false, so the drain needs no wrapper around the application's `send`:
a cycle created or still unanswered while draining gets `keep_alive = False`, and its transport
is the connection's ClosingTransport, whose close() lingers.
"""

from __future__ import annotations

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from .drain import ClosingTransport, Draining


class DrainingHttpToolsProtocol(Draining, HttpToolsProtocol):
    _in_message = False

    def response_in_flight(self) -> bool:
        cycle = self.cycle
        return cycle is not None and not cycle.response_complete

    def _arriving(self) -> bool:
        return self._in_message

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._closing_transport = ClosingTransport(self, transport)

    def on_message_begin(self) -> None:
        self._in_message = True
        super().on_message_begin()

    def on_headers_complete(self) -> None:
        previous = self.cycle
        super().on_headers_complete()
        cycle = self.cycle
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

    def on_message_complete(self) -> None:
        self._in_message = False
        super().on_message_complete()

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
        self.transport.write(b"HTTP/1.1 400 Bad Request\r\ncontent-type: text/plain; charset=utf-8\r\n"
                             b"content-length: %d\r\nconnection: close\r\n\r\n%s"
                             % (len(msg), msg.encode("ascii")))
        self.close_lingering("invalid request")
