"""Canary upgrades (DESIGN §4.5), both sides. Part of Generation (`Canary`).

N (the main generation) starts N+1 with CADENZA_CANARY=K: N+1 starts K workers and says
"ready" as usual. N then stops K of its own workers (CANARY), so that both generations accept
from the same sockets with count workers in all, N+1 taking about K/count of the connections.
After upgrade.canary_duration N asks N+1 for its figures ("report" / "figures JSON" on the
hand-off channel) and compares them with its own over the same time (the gate, `judge`):

- passed (PROMOTING): N tells N+1 "grow", and N+1 grows slot by slot, make-before-break: it
  starts one more worker, and once that one is ready says "grown M" (M of count ready), and N
  stops one of its own (keeping one at least); then the next. Once all of N+1's count are ready it
  says "ready", and N commits as in any upgrade (MAINPID=, the barrier, the hand-over) and drains
  the worker it kept. The two generations never have fewer than count ready workers between them.
- failed (ROLLING_BACK): N starts its K workers again and, once all of its workers are ready,
  stops N+1 gracefully; the upgrade fails with both generations' figures (outcome rolled_back).
- N+1 gone during any of it (its master crashed or was killed): N grows back at once; the
  upgrade fails, rolled back.

The figures are the built-in workers' (figures.py): responses, 5xx among them, and crashes
(workers that died of an exit, a signal or the watchdog). Command workers report no responses:
they are judged on crashes and on being ready only. A canary that served nothing is not judged
bad: there is no evidence, and the text says so.
"""

from __future__ import annotations

import json
import logging
import os
import time
from ..records import record

from .loop import Timer
from .policy import Event, State

log = logging.getLogger("cadenza.master")

REPORT_TIMEOUT = 2.0       # seconds N+1 has to answer "report"
CANARY_ENV = "CADENZA_CANARY"
CRASHES = ("exit", "signal", "watchdog")


@record
class CanaryRun:
    generation: int
    pid: int
    workers: int                # K
    count: int                  # N's count before the canary
    baseline: dict
    due: float
    timer: Timer | None = None
    answer: Timer | None = None
    judged: bool = False
    reason: str = ""
    restore: Timer | None = None
    committing: bool = False    # promoted and all ready: MAINPID= goes out

    def cancel(self, *, restore: bool = True) -> None:
        """Its pending judgement (and the bound on growing back, with `restore`) will not fire."""
        for timer in (self.timer, self.answer, self.restore if restore else None):
            if timer is not None:
                timer.cancel()


def figures_of(gen) -> dict:
    responses = [0] * 5
    for _, figures in gen._slot_figures():
        responses = [a + b for a, b in zip(responses, figures.responses)]
    restarts = gen.pool.restarts
    return {"responses": sum(responses), "errors": responses[4], "crashes": sum(restarts[c] for c in CRASHES),
            "ready": gen.pool.ready_count()}


def parse_figures(text: str) -> dict | None:
    """A canary's answer to "report": counts, or None when they do not parse."""
    try:
        data = json.loads(text)
        return {key: int(data[key]) for key in ("responses", "errors", "crashes", "ready")}
    except (ValueError, TypeError, KeyError):
        return None


def judge(old: dict, new: dict, max_rate: float, old_gen: int, new_gen: int) -> tuple[bool, str]:
    """(passed, the figures of both): N+1's 5xx rate may exceed N's by max_rate; it may not crash
    more often than N did over the same time."""
    def rate(f):
        return f["errors"] / f["responses"] if f["responses"] else 0.0

    def said(g, f):
        return (f"generation {g} answered {f['errors']} of {f['responses']} requests with 5xx "
                f"({100 * rate(f):.1f} %) and had {f['crashes']} worker crash(es)")
    text = (f"{said(new_gen, new)}; {said(old_gen, old)}; the limit is generation {old_gen}'s rate + "
            f"{100 * max_rate:.1f} % (upgrade.canary_max_error_rate)")
    if new["crashes"] > old["crashes"]:
        return False, text
    if not new["responses"]:
        return True, text + "; no request reached the canary, so nothing counts against it"
    return rate(new) <= rate(old) + max_rate + 1e-12, text


class Canary:
    canary_run: CanaryRun | None = None
    restore_count = 0           # N's count before a promoted canary, until the hand-over is done
    canary_workers = 0          # N+1's side: started as a canary of this many workers
    canary_growing = False

    # ---- N+1's side ---------------------------------------------------------------------

    def _setup_canary(self) -> None:
        value = os.environ.pop(CANARY_ENV, "")
        if self.inherited.heir and value.isdigit() and int(value) > 0:
            self.canary_workers = min(int(value), self.config.workers.count)

    def _canary_line(self, line: str) -> bool:
        """A canary's lines from N: "report" (answered at once) and "grow"."""
        if line == "report":
            self.inherited.say("figures " + json.dumps(figures_of(self), separators=(",", ":")))
        elif line == "grow":
            self.handle(Event.PROMOTE_NOTICE, source="the previous generation")
        else:
            return False
        return True

    def on_grow_to_count(self, **_) -> None:
        log.info("the canary passed: generation %d grows from %d to %d worker(s), one at a time", self.number,
                 len(self.pool.slots), self.config.workers.count)
        self.canary_workers, self.canary_growing = 0, True
        self._grow_one()

    def on_standby_workers_ready(self, **_) -> None:
        if self.canary_growing and self.pool.all_ready():
            self.inherited.say(f"grown {len(self.pool.slots)} {self.config.workers.count}")
            self._grow_one()

    def _grow_one(self) -> None:
        """The next slot, once every one before it is ready; "ready" once all count are."""
        if not self.pool.all_ready():
            return
        if len(self.pool.slots) < self.config.workers.count:
            self.pool.add_slot()
        else:
            self.canary_growing = False
            self.inherited.say("ready")

    # ---- N's side -----------------------------------------------------------------------

    def on_successor_ready(self, **_) -> None:
        succession = self.succession
        if not succession.canary:
            self.on_commit()
            return
        k, count = succession.canary, len(self.pool.slots)
        for _ in range(k):
            self.pool.remove_slot()
        duration = self.config.upgrade.canary_duration
        run = self.canary_run = CanaryRun(succession.generation, succession.pid, k, count, figures_of(self),
                                          time.monotonic() + duration)
        run.timer = self.loop.after(duration, lambda: self.handle(Event.CANARY_DUE))
        succession.hold()
        self.state = State.CANARY
        succession.emit("progress", f"canary: generation {run.generation} serves with {k} worker(s), generation "
                                    f"{self.number} with {count - k}; judged in {duration:g}s")

    def on_judge_canary(self, **_) -> None:
        self.succession.ask("report")
        self.canary_run.answer = self.loop.after(REPORT_TIMEOUT, lambda: self.handle(Event.CANARY_FIGURES))

    def on_canary_figures(self, figures: dict | None = None, **_) -> None:
        run, succession = self.canary_run, self.succession
        if run.answer is not None:
            run.answer.cancel()
        if run.judged:
            return
        run.judged = True
        now = figures_of(self)
        mine = {key: now[key] - run.baseline[key] for key in ("responses", "errors", "crashes")}
        if figures is None:
            passed, text = False, f"generation {run.generation} did not report its figures within {REPORT_TIMEOUT:g}s"
        else:
            passed, text = judge(mine, figures, self.config.upgrade.canary_max_error_rate, self.number,
                                 run.generation)
        if passed:
            log.info("canary passed: %s", text)
            succession.emit("progress", f"canary passed: {text}; generation {run.generation} grows to its count")
            self.state = State.PROMOTING
            succession.defer_failure = self._fail_after_growing_back
            succession.promote()
            return
        run.reason = f"canary failed: {text}"
        log.error("%s; generation %d grows back to %d worker(s), then generation %d stops", run.reason,
                  self.number, run.count, run.generation)
        succession.emit("progress", f"{run.reason}; generation {self.number} grows back to {run.count} worker(s)")
        self.state = State.ROLLING_BACK
        self._grow_back(run)
        # Workers that cannot start again must not keep the bad canary serving for ever.
        run.restore = self.loop.after(self.config.workers.ready_timeout, self._stop_canary)
        self.on_canary_restored()

    def on_canary_restored(self, **_) -> None:
        if self.pool.all_ready():
            self._stop_canary()

    def _stop_canary(self) -> None:
        run = self.canary_run
        if run is not None and self.state is State.ROLLING_BACK and self.succession is not None:
            if run.restore is not None:
                run.restore.cancel()
            self.succession.fail(run.reason)

    def on_canary_grew(self, workers: int = 0, count: int = 0, **_) -> None:
        """N+1 has `workers` ready of its `count`: one of ours stops (make-before-break)."""
        run = self.canary_run
        keep = max(run.count - workers, 1)
        while len(self.pool.slots) > keep and self.pool.remove_slot():
            pass
        self.succession.emit("progress", f"generation {run.generation} has {workers} of {count or run.count} "
                                         f"worker(s) ready; generation {self.number} keeps {len(self.pool.slots)}")

    def _fail_after_growing_back(self, reason: str) -> bool:
        """A promoted canary fails while it grows (upgrade.timeout, its own "failed", MAINPID=
        refused): N starts its workers again first, and N+1 is told to stop only once they are
        ready (bounded by workers.ready_timeout), as after a gate that failed."""
        run = self.canary_run
        succession = self.succession
        if run is None or self.state is not State.PROMOTING or not (succession.alive() and succession.has_channel()):
            return False
        run.reason = f"the upgrade failed while its canary grew: {reason}"
        run.committing = False
        log.error("%s; generation %d grows back to %d worker(s), then generation %d stops", run.reason,
                  self.number, run.count, run.generation)
        self.state = State.ROLLING_BACK
        self._grow_back(run)
        run.restore = self.loop.after(self.config.workers.ready_timeout, self._stop_canary)
        self.loop.after(0, self.on_canary_restored)    # once the caller's turn is over
        return True

    def on_promoted_ready(self, **_) -> None:
        run = self.canary_run
        self.restore_count = run.count      # N+1 lost before "main": we serve on at our count (_reclaim)
        run.committing = True
        self.on_commit()
        if self.state is not State.PROMOTING and self.state is not State.ROLLING_BACK:
            self._end_canary()

    def on_canary_gone(self, **_) -> None:
        """N+1 exited: it was stopped by the gate, or crashed (or was killed) while a canary."""
        run, succession = self._end_canary(), self.succession
        self.succession = None
        if self.multiproc is not None:
            self.multiproc.fold_from(succession.generation)   # what the canary served is ours
        self._grow_back(run)
        self.state = State.SERVING
        reason = run.reason or (f"canary failed: generation {run.generation} (pid {run.pid}) exited while it was "
                                f"the canary{': ' + succession.reason if succession.reason else ''}")
        self._upgrade_over(succession, reason, outcome="rolled_back")

    def _grow_back(self, run: CanaryRun) -> None:
        """N's own count again: the K it stopped for the canary, and those it stopped as it grew."""
        while len(self.pool.slots) < run.count:
            self.pool.add_slot()

    def _end_canary(self) -> CanaryRun:
        run, self.canary_run = self.canary_run, None
        run.cancel()
        return run

    def canary_describe(self) -> dict | None:
        run = self.canary_run
        if run is None:
            return None
        left = run.due - time.monotonic()
        return {"generation": run.generation, "pid": run.pid, "workers": run.workers, "state": self.state.value,
                "judging_in": round(max(left, 0.0), 1) if self.state is State.CANARY else None}

    def extra_metrics(self) -> list:
        run = self.canary_run
        return [("cadenza_canary_workers", [({}, run.workers if run is not None and not run.committing else 0)])]
