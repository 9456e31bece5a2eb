"""What a built-in worker tells its master about its responses, both ends of the wire (DESIGN §9).

A worker sends its running totals in its CADENZA_REQUESTS= datagram (worker/report.py):

    CADENZA_REQUESTS=1234                    completed responses (the count max_requests uses)
    CADENZA_RESPONSES=0,1200,20,10,4         by status class: 1xx,2xx,3xx,4xx,5xx
    CADENZA_LATENCY=5,900,...,0;12.5         per LATENCY_BUCKETS (and +Inf) NOT cumulative; ";" sum in s

They are totals since the worker started, so a datagram lost or coalesced loses nothing but
time: the next one carries everything. The master keeps the last totals of each worker and,
when it exits, adds them to its slot's (daemon/metrics.py). A worker is not trusted: a field
that does not parse is ignored, and the numbers are bounded.
"""

from __future__ import annotations

from .records import record, field

CLASSES = ("1xx", "2xx", "3xx", "4xx", "5xx")
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)   # prometheus_client's
MAX_COUNT = 10 ** 15


def status_class(status: int) -> int:
    """The index in CLASSES of an HTTP status; anything outside 100..599 counts as 5xx (uvicorn
    answers 500 for an application that fails before it responds)."""
    return status // 100 - 1 if 100 <= status <= 599 else 4


@record
class Figures:
    requests: int = 0
    responses: list[int] = field(default_factory=lambda: [0] * len(CLASSES))
    buckets: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS) + 1))
    seconds: float = 0.0                # the sum of the latencies

    def add(self, other: Figures) -> None:
        self.requests += other.requests
        self.responses = [a + b for a, b in zip(self.responses, other.responses)]
        self.buckets = [a + b for a, b in zip(self.buckets, other.buckets)]
        self.seconds += other.seconds

    def fields(self) -> dict[str, str]:
        """The notify fields of these totals (the worker's side)."""
        return {"cadenza_requests": str(self.requests),
                "cadenza_responses": ",".join(map(str, self.responses)),
                "cadenza_latency": ",".join(map(str, self.buckets)) + f";{self.seconds:.6f}"}

    def update(self, fields: dict[str, str]) -> bool:
        """Take what a worker sent (the master's side); whether anything parsed. Totals only grow:
        a lower figure (an application writing to NOTIFY_SOCKET) is not taken."""
        changed = False
        requests = _count(fields.get("CADENZA_REQUESTS", ""))
        if requests is not None:
            self.requests, changed = max(self.requests, requests), True
        responses = _counts(fields.get("CADENZA_RESPONSES", ""), len(CLASSES))
        if responses is not None:
            self.responses, changed = [max(a, b) for a, b in zip(self.responses, responses)], True
        counts, _, total = fields.get("CADENZA_LATENCY", "").partition(";")
        buckets = _counts(counts, len(LATENCY_BUCKETS) + 1)
        try:
            seconds = float(total)
        except ValueError:
            seconds = -1.0
        if buckets is not None and 0 <= seconds < 1e12:
            self.buckets = [max(a, b) for a, b in zip(self.buckets, buckets)]
            self.seconds, changed = max(self.seconds, seconds), True
        return changed


def _count(text: str) -> int | None:
    text = text.strip()
    if not text.isascii() or not text.isdigit() or len(text) > 16:
        return None
    value = int(text)
    return value if value <= MAX_COUNT else None


def _counts(text: str, n: int) -> list[int] | None:
    parts = text.split(",") if text else []
    if len(parts) != n:
        return None
    values = [_count(part) for part in parts]
    return None if None in values else values
