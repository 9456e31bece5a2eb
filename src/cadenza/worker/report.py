"""What the built-in worker counts for its master: CADENZA_REQUESTS=<n> (DESIGN.md 4.4), and its
responses by status class and their latency (figures.py, DESIGN §9).

Both engines count a completed response where uvicorn does, `server_state.total_requests += 1`
(httptools_protocol.py, drain.py and uvicorn's h11 protocol). `RequestCount` is that server state,
with `total_requests` a property: the increment costs one attribute store and two comparisons, and
nothing else unless a report is due. The first completion after a report arms one loop timer, and
the count goes to NOTIFY_SOCKET when it fires: at most once a second, and no wake-up while idle.
The count that reaches CADENZA_MAX_REQUESTS (this worker's limit, max_requests + its jitter) is
sent at once. The worker serves on after its limit; the master retires it, make-before-break.

`wrap(app)` is the ASGI middleware that sees each response's status and the time the application
took to answer it (from its call to its return), outermost but for uvicorn's own: a 504 of
timeouts.py, and an application that fails before it responds (uvicorn's 500), count as 5xx; a
request whose client left (http.disconnect) before any response began counts in neither.
They go in the same report as the count.

The state also carries the drain's wake-up: `drained`, called by a draining connection when it was
the last one (drain.py), so that the server's shutdown waits on an event, not a poll.
"""

from __future__ import annotations

import asyncio
import time
from bisect import bisect_left
from collections.abc import Callable

from uvicorn.server import ServerState

from ..figures import LATENCY_BUCKETS, Figures, status_class

REPORT_INTERVAL = 1.0   # seconds between two CADENZA_REQUESTS reports, at least


class RequestCount(ServerState):
    limit = -1              # CADENZA_MAX_REQUESTS; -1: none
    _quiet = True           # no timer to arm: one is armed, or reports are off (not started, no socket)
    drained: Callable[[], None] | None = None

    def __init__(self, notifier) -> None:
        self.notifier = notifier
        self._count = self._reported = 0
        self.figures = Figures()
        self._recorded = self._sent = 0     # responses recorded by wrap(), and as of the last report
        self._loop: asyncio.AbstractEventLoop | None = None
        super().__init__()

    @property
    def total_requests(self) -> int:
        return self._count

    @total_requests.setter
    def total_requests(self, value: int) -> None:
        self._count = value
        if not self._quiet:
            self._quiet = True
            self._loop.call_later(REPORT_INTERVAL, self._due)
        if value == self.limit:
            self.report()

    def start(self, loop: asyncio.AbstractEventLoop, limit: int) -> None:
        self._loop = loop
        self.limit = limit if limit > 0 else -1
        self._quiet = not self.notifier.enabled

    def _due(self) -> None:
        self._quiet = False
        self.report()

    def report(self) -> None:
        """Send the totals now, if they changed since the last report."""
        if self._count != self._reported or self._recorded != self._sent:
            self._reported, self._sent = self._count, self._recorded
            figures = self.figures
            figures.requests = self._count
            self.notifier.send(**figures.fields())

    def wrap(self, app):
        figures, buckets, responses = self.figures, self.figures.buckets, self.figures.responses
        clock = time.monotonic

        async def counted(scope, receive, send):
            if scope["type"] != "http":
                return await app(scope, receive, send)
            status = 0
            gone = False

            async def sending(message):
                nonlocal status
                if message["type"] == "http.response.start":
                    status = message["status"]
                await send(message)

            async def receiving():
                nonlocal gone
                message = await receive()
                gone = gone or message["type"] == "http.disconnect"
                return message
            started = clock()
            try:
                await app(scope, receiving, sending)
            finally:
                # A client that left before any response began got none: no status to count
                # (counted as 5xx it would fail a canary on its clients' impatience).
                if status or not gone:
                    took = clock() - started
                    responses[status_class(status)] += 1
                    buckets[bisect_left(LATENCY_BUCKETS, took)] += 1
                    figures.seconds += took
                    self._recorded += 1
        return counted
