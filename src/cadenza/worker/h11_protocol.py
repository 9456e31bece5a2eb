"""The h11 engine (the fallback when httptools is not installed), with the drain of drain.py."""

from __future__ import annotations

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from .drain import Draining


class DrainingH11Protocol(Draining, H11Protocol):

    def response_in_flight(self) -> bool:
        cycle = self.cycle
        return (self.conn.our_state in (h11.SEND_RESPONSE, h11.SEND_BODY)
                or (cycle is not None and not cycle.response_complete))

    def _arriving(self) -> bool:
        return self.conn.their_state is not h11.IDLE

    def _parser_buffered(self) -> int:
        return len(self.conn.trailing_data[0])

    def _client_closes(self) -> bool:
        cycle = self.cycle
        if cycle is None:
            return False
        tokens = b",".join(value.lower() for name, value in cycle.scope["headers"] if name == b"connection")
        if b"close" in tokens:
            return True
        return cycle.scope["http_version"] == "1.0" and b"keep-alive" not in tokens

    def _end_of_input(self) -> None:
        if self.conn.our_state in (h11.IDLE, h11.DONE, h11.MUST_CLOSE):
            self.conn.send(h11.ConnectionClosed())

    def handle_events(self) -> None:
        super().handle_events()
        cycle = self.cycle
        if cycle is not None and not cycle.response_started and "send" not in vars(cycle):
            self._wrap_send(cycle)

    def _wrap_send(self, cycle) -> None:
        # Installed before the request's task first runs, so the app receives this `send`.
        send = cycle.send
        cycle.transport = self._closing_transport

        async def send_closing_when_draining(message):
            if message["type"] == "http.response.start" and (self.draining or self.discarding
                                                             or not cycle.keep_alive):
                # h11 sees the header, answers with "Connection: close" and ends the connection.
                cycle.keep_alive = False
                headers = message.get("headers", [])
                if not any(name.lower() == b"connection" and b"close" in value.lower() for name, value in headers):
                    message = {**message, "headers": [*headers, (b"connection", b"close")]}
            await send(message)
        cycle.send = send_closing_when_draining

    def send_400_response(self, msg: str) -> None:
        # h11 rejected what the client sent. uvicorn answers 400 and closes, but h11 cannot send a
        # second response while one is written (our_state SEND_BODY): uvicorn's attempt raises in
        # data_received, asyncio drops the connection and the response in flight is cut after its
        # headers. That is what a client pipelining after a draining "Connection: close" response
        # gets (h11: "Got data when expecting EOF"). Here a complete request in flight is answered
        # (with "Connection: close" if not started), the rest of the input is discarded and the
        # connection closes after the response.
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete and not cycle.more_body:
            self._log("%s: %s while a response is written; it completes, then the connection closes",
                      self._peer(), msg)
            self.discarding = True
            cycle.keep_alive = False
            return
        if cycle is not None and not cycle.response_complete:
            cycle.disconnected = True   # its request is broken: the app hears http.disconnect
            cycle.message_event.set()
        self._closing_transport.flush()
        if self.conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
            for event in (h11.Response(status_code=400, reason=b"Bad Request",
                                       headers=[(b"content-type", b"text/plain; charset=utf-8"),
                                                (b"connection", b"close")]),
                          h11.Data(data=msg.encode("ascii")), h11.EndOfMessage()):
                self.transport.write(self.conn.send(event))
        self.close_lingering("invalid request")
