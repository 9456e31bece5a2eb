"""What the master says of itself: STATUS= for systemd, and its figures as Prometheus text
(DESIGN §9). Part of Generation (`Metrics`).

Where each figure lives, and why counters never go backwards:

- Per worker slot (`cadenza_http_*`, labels generation, release, worker): a built-in worker sends
  its running totals (figures.py); when it exits they are added to its slot's `retired` totals, so
  a slot's series is retired + what its live workers said, across deaths and recycles. A slot
  removed by TTOU keeps its retired totals: TTIN gives the number back with them.
- Per generation (`cadenza_generation_*`): the generation's own master says them while it is
  main. A generation's series end with it; the next one's start at 0 under new labels, which is
  what Prometheus expects of a new target process (rate() never sees a reset).
- Service-wide (`cadenza_worker_restarts_total`, `cadenza_upgrades_total`,
  `cadenza_upgrade_duration_seconds`): counted by the main master and carried to the next one at
  the hand-over ("totals JSON" before "main" on the channel, handoff.py). They reset only when
  the service restarts.

prometheus_client is not used here: the master must stay small and may not import `ssl`, which
its exposition imports (tests/test_boundary.py); this module writes the text format itself
(it is a line per sample). The tests read it back with prometheus_client's own parser.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections import Counter

from ..figures import CLASSES, LATENCY_BUCKETS, Figures
from .policy import State

log = logging.getLogger("cadenza.master")

RESTART_CAUSES = ("exit", "signal", "watchdog", "timeout", "recycled", "memory", "restart")
OUTCOMES = ("ok", "failed", "refused", "rolled_back")
UPGRADE_BUCKETS = (0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
WORKER_STATES = ("starting", "ready", "draining")

FAMILIES = {
    "cadenza_generation_info": "gauge",
    "cadenza_generation_main": "gauge",
    "cadenza_generation_workers": "gauge",
    "cadenza_generation_ready_seconds": "gauge",
    "cadenza_generation_start_time_seconds": "gauge",
    "cadenza_http_requests_total": "counter",
    "cadenza_http_responses_total": "counter",
    "cadenza_http_request_duration_seconds": "histogram",
    "cadenza_worker_restarts_total": "counter",
    "cadenza_upgrades_total": "counter",
    "cadenza_upgrade_duration_seconds": "histogram",
    "cadenza_generations_total": "counter",
    "cadenza_canary_workers": "gauge",
}
HELP = {
    "cadenza_generation_info": "The generation this master runs: its release and state.",
    "cadenza_generation_main": "1 when the generation is the service's main one.",
    "cadenza_generation_workers": "Workers of the generation, by state.",
    "cadenza_generation_ready_seconds": "Seconds from the master's start to its generation serving.",
    "cadenza_generation_start_time_seconds": "Unix time the generation's master started.",
    "cadenza_http_requests_total": "Requests the built-in workers of this slot completed.",
    "cadenza_http_responses_total": "Responses by status class.",
    "cadenza_http_request_duration_seconds": "Time the application took to answer.",
    "cadenza_worker_restarts_total": "New workers by the cause of their slot's restart.",
    "cadenza_upgrades_total": "Upgrades by outcome.",
    "cadenza_upgrade_duration_seconds": "Upgrades that started, from the request to their end.",
    "cadenza_generations_total": "Generations this service instance started (the main one's number).",
    "cadenza_canary_workers": "Workers of the next generation while it runs as a canary; 0 when none.",
}


class Totals:
    """The service-wide counters carried from generation to generation."""

    def __init__(self) -> None:
        self.restarts: Counter = Counter()        # carried from earlier generations
        self.upgrades: Counter = Counter()
        self.buckets = [0] * (len(UPGRADE_BUCKETS) + 1)
        self.seconds = 0.0
        self.generations = 0                      # the highest generation number started

    def upgrade(self, outcome: str, seconds: float | None) -> None:
        self.upgrades[outcome] += 1
        if seconds is not None:
            self.buckets[next((i for i, b in enumerate(UPGRADE_BUCKETS) if seconds <= b), -1)] += 1
            self.seconds += seconds

    def as_json(self, restarts: Counter, generations: int) -> str:
        return json.dumps({"restarts": dict(self.restarts + restarts), "upgrades": dict(self.upgrades),
                           "buckets": self.buckets, "seconds": self.seconds,
                           "generations": max(self.generations, generations)}, separators=(",", ":"))

    def carry(self, text: str, own: Counter | None = None) -> None:
        """What the previous generation counted (a peer of ours, but checked all the same). `own`:
        we are a warm generation rolled back to (warm.py), whose totals, and its own restarts
        `own`, the sender's already hold: they are replaced, not added to."""
        try:
            data = json.loads(text)
            restarts = {k: int(v) for k, v in data["restarts"].items() if k in RESTART_CAUSES}
            upgrades = {k: int(v) for k, v in data["upgrades"].items() if k in OUTCOMES}
            buckets = [int(v) for v in data["buckets"]]
            seconds = float(data["seconds"])
            generations = int(data.get("generations", 0))
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            log.error("internal error: the previous generation's totals are unreadable (%s); "
                      "this generation counts from 0", exc)
            return
        if len(buckets) != len(self.buckets):
            log.error("internal error: the previous generation's upgrade histogram has %d buckets, not %d; "
                      "this generation counts from its own", len(buckets), len(self.buckets))
            return
        if own is not None:
            self.__init__()
            restarts = {k: v - own[k] for k, v in restarts.items()}
        self.restarts.update(restarts)
        self.upgrades.update(upgrades)
        self.buckets = [a + b for a, b in zip(self.buckets, buckets)]
        self.seconds += seconds
        self.generations = max(self.generations, generations)


class Metrics:
    """Generation's part: the figures, the exposition's socket, and the text."""

    metrics_sock = None         # the listening socket of [metrics] listen (boot.py), or None
    exposition = None

    def _setup_metrics(self) -> None:
        self.totals = Totals()
        self.retired: dict[int, Figures] = {}
        self.ready_after: float | None = None
        self.wall_started = time.time() - (time.monotonic() - self.started)
        self.pool.on_exit = self._worker_exited
        from .multiproc import MultiprocDirs
        self.multiproc = MultiprocDirs.setup(self) if self.config.metrics.multiprocess else None

    def _worker_exited(self, worker) -> None:
        self.retired.setdefault(worker.id, Figures()).add(worker.figures)
        if self.multiproc is not None:
            self.multiproc.dead(worker.pid)

    def _start_metrics(self) -> None:
        if self.metrics_sock is not None and self.exposition is None:
            from .exposition import Exposition
            self.exposition = Exposition(self.loop, self.metrics_sock, self.metrics_text)
        elif self.exposition is not None:
            self.exposition.freeze(None)
            self.exposition.start_accepting()

    def freeze_metrics(self, frozen: bool) -> None:
        if self.exposition is not None:
            self.exposition.freeze(self.metrics_text() if frozen else None)

    def _stop_metrics(self) -> None:
        if self.exposition is not None:
            self.exposition.stop_accepting()

    def count_upgrade(self, outcome: str, succession=None) -> None:
        self.totals.upgrade(outcome, time.monotonic() - succession.started if succession is not None else None)

    # ---- STATUS= ------------------------------------------------------------------------

    def status_text(self) -> str:
        pool = self.pool
        # A new main serves while its predecessor drains: "serving" is what an operator needs to read.
        label = "serving" if self.state is State.TAKING_OVER else self.state.value
        text = f"generation {self.number} {label}: {pool.ready_count()}/{len(pool.slots)} workers ready"
        waiting = [s.last_death for s in pool.slots.values() if s.worker is None and s.last_death]
        if waiting:
            text += "; " + waiting[0]
        if self.state is State.TAKING_OVER:
            text += f"; generation {self.number - 1} still draining"
        if pool.recycler.rolling():
            text += "; rolling restart"
        if self.preloader is not None and not self.preloader.ready and self.state not in (State.LEAVING, State.STOPPING):
            text += "; preloader " + ("importing the application" if self.preloader.pid else "down")
            if self.preloader.failure:
                text += f" (last: {self.preloader.failure})"
        return text

    def _publish_status(self) -> None:
        self._check_waits()
        text = self.status_text()
        # A next generation's notifier is muted until it is main: only the main master speaks.
        if text != self._last_status and self.state not in (State.COMMITTED, State.LEAVING, State.STOPPING):
            self._last_status = text
            self.systemd.send(status=text)

    # ---- the text -----------------------------------------------------------------------

    def metrics_text(self) -> str:
        out: list[str] = []
        gen = {"generation": str(self.number), "release": os.path.basename(self.release.rstrip("/"))}
        family = _Family(out)
        family("cadenza_generation_info", [({**gen, "state": self.state.value}, 1)])
        family("cadenza_generation_main", [(gen, int(self.state.main))])
        by_state = Counter(_worker_state(w) for w in self.pool.workers.values())
        family("cadenza_generation_workers", [({**gen, "state": s}, by_state[s]) for s in WORKER_STATES])
        family("cadenza_generation_ready_seconds", [(gen, self.ready_after)] if self.ready_after is not None else [])
        family("cadenza_generation_start_time_seconds", [(gen, round(self.wall_started, 3))])
        slots = self._slot_figures()
        family("cadenza_http_requests_total", [({**gen, "worker": str(i)}, f.requests) for i, f in slots])
        family("cadenza_http_responses_total", [({**gen, "worker": str(i), "code": c}, n)
                                                for i, f in slots for c, n in zip(CLASSES, f.responses)])
        family.histogram("cadenza_http_request_duration_seconds",
                         [({**gen, "worker": str(i)}, f.buckets, f.seconds) for i, f in slots], LATENCY_BUCKETS)
        restarts = self.totals.restarts + self.pool.restarts
        family("cadenza_worker_restarts_total", [({"cause": c}, restarts[c]) for c in RESTART_CAUSES])
        family("cadenza_upgrades_total", [({"outcome": o}, self.totals.upgrades[o]) for o in OUTCOMES])
        family.histogram("cadenza_upgrade_duration_seconds", [({}, self.totals.buckets, self.totals.seconds)],
                         UPGRADE_BUCKETS)
        family("cadenza_generations_total", [({}, max(self.number, self.totals.generations))])
        for extra in getattr(self, "extra_metrics", lambda: [])():
            family(*extra)
        return "\n".join(out) + "\n"

    def _slot_figures(self) -> list[tuple[int, Figures]]:
        totals: dict[int, Figures] = {}
        for slot_id in {*self.retired, *self.pool.slots}:
            figures = totals[slot_id] = Figures()
            if slot_id in self.retired:
                figures.add(self.retired[slot_id])
        for worker in self.pool.workers.values():
            totals.setdefault(worker.id, Figures()).add(worker.figures)
        return sorted(totals.items())


def _worker_state(worker) -> str:
    return {"booting": "starting", "ready": "ready"}.get(worker.state, "draining")


class _Family:
    """Writes one family: # HELP, # TYPE, then its samples (Prometheus text format 0.0.4)."""

    def __init__(self, out: list[str]):
        self.out = out

    def __call__(self, name: str, samples, kind: str | None = None) -> None:
        self._head(name, kind or FAMILIES.get(name, "gauge"))
        for labels, value in samples:
            self.out.append(f"{name}{_labels(labels)} {_number(value)}")

    def histogram(self, name: str, series, bounds) -> None:
        self._head(name, "histogram")
        for labels, buckets, total in series:
            running = 0
            for bound, count in zip((*bounds, float("inf")), buckets):
                running += count
                self.out.append(f"{name}_bucket{_labels({**labels, 'le': _number(bound)})} {running}")
            self.out.append(f"{name}_sum{_labels(labels)} {_number(total)}")
            self.out.append(f"{name}_count{_labels(labels)} {running}")

    def _head(self, name: str, kind: str) -> None:
        self.out.append(f"# HELP {name} {HELP.get(name, name)}")
        self.out.append(f"# TYPE {name} {kind}")


def _labels(labels: dict[str, str]) -> str:
    if not labels:
        return ""
    escaped = (f'{k}="{_escape(str(v))}"' for k, v in labels.items())
    return "{" + ",".join(escaped) + "}"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value) -> str:
    if isinstance(value, float):
        if value == float("inf"):
            return "+Inf"
        return repr(round(value, 6))
    return str(value)
