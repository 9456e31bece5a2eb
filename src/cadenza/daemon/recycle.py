"""Replacing a pool's workers make-before-break: the rolling restart and recycling (DESIGN §4.4).

One queue of slots to replace, served one slot at a time. A replacement is started in the slot
(`slot.incoming`), and only once it is ready is the old worker told to drain (SIGTERM to its
group): the pool never has fewer ready workers than slots. A rolling restart (HUP, a new
preloader) queues every slot, a recycle queues one, and a slot is in the queue once at most: a
recycle of a slot that a rolling restart queued already takes over that entry.

What makes a worker due for recycling, each reported through the pool's
`on_recycle(slot, cause, detail)` so that the table decides (an upgrading, starting or leaving
generation lets its workers be):
- its CADENZA_REQUESTS= reached its own limit (CADENZA_MAX_REQUESTS, set by the pool): "recycled";
- its CADENZA_TIMEOUT= (a request ran past workers.timeout): "timeout";
- workers.max_lifetime seconds since it became ready: "recycled";
- its unique memory (USS: Private_Clean + Private_Dirty of /proc/PID/smaps_rollup) is over
  workers.max_memory, sampled every MEMORY_EVERY seconds, and only when that is set: "memory".
A worker that is due and not yet queued asks again every ASK_AGAIN seconds: a request the table
ignored (during an upgrade that then failed) is not lost.

A replacement that cannot be started, or dies before it is ready, leaves the old worker serving.
A recycle is retried after RETRY_FIRST seconds, doubling up to RETRY_CAP, and holds the queue
meanwhile: a release that cannot start costs one attempt per delay, never a storm of them. A
rolling restart is abandoned then, as it always was; the recycles it held stay queued. A
replacement that finds no preloader ready (it is being replaced, or was lost while asked for a
worker) is no failure of the release: the queue waits for the next preloader, resume().

The watchdog (DESIGN §4.6): a worker that once said WATCHDOG=1 and then stays silent for
workers.watchdog seconds is killed (SIGKILL to its group). The built-in worker first gets signals.STACK_DUMP
on its pid, which its faulthandler answers with every thread's stack on its output (the journal),
and SIGKILL to its group ABORT_GRACE seconds later if it is still there.

Why each slot last got a new worker is kept for `supervisorctl status` (`slot.last_restart`):
exit, signal, watchdog (killed by the pool, worker.cause), restart (a rolling restart), or the
recycle's cause. A worker is not trusted: an ill-formed field it sends is ignored.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from ..records import record
from typing import TYPE_CHECKING

from ..signals import STACK_DUMP
from .loop import Timer, signal_process

if TYPE_CHECKING:
    from .pool import Pool, Slot, Worker

log = logging.getLogger("cadenza.master")

RETRY_FIRST = 1.0
RETRY_CAP = 30.0
ASK_AGAIN = 2.0
MEMORY_EVERY = 2.0
ABORT_GRACE = 1.0       # from the watchdog's stack dump signal to SIGKILL
MB = 1024 * 1024
MAX_TEXT = 200          # of a worker's CADENZA_TIMEOUT= text


@record
class Replacement:
    slot: int
    cause: str                  # "restart" for a rolling restart's own entry, else a recycle's
    detail: str
    restart: bool = False       # a rolling restart is waiting for it
    failures: int = 0           # replacements in a row that did not become ready
    retry: Timer | None = None


def retry_delay(failures: int) -> float:
    return min(RETRY_FIRST * 2 ** (failures - 1), RETRY_CAP)


class Recycler:
    def __init__(self, pool: Pool):
        self.pool = pool
        self.queue: list[Replacement] = []
        self._restarting = False        # a rolling restart is under way
        self._sampling: Timer | None = None

    # ---- the queue --------------------------------------------------------------------------

    def rolling(self) -> list[int]:
        """The slots a rolling restart still has to replace."""
        return [r.slot for r in self.queue if r.restart]

    def entry(self, slot_id: int) -> Replacement | None:
        return next((r for r in self.queue if r.slot == slot_id), None)

    def restart(self) -> bool:
        if self._restarting:
            return False
        self._restarting = True
        for slot_id in sorted(self.pool.slots):
            queued = self.entry(slot_id)
            if queued is None:
                self.queue.append(Replacement(slot_id, "restart", "rolling restart", restart=True))
            else:
                queued.restart = True
        log.info("rolling restart of %d worker(s)", len(self.pool.slots))
        self._next()
        return True

    def recycle(self, slot: Slot, cause: str, detail: str) -> None:
        pool, worker = self.pool, slot.worker
        if pool.draining or pool.slots.get(slot.id) is not slot or worker is None or worker.state != "ready":
            return
        queued = self.entry(slot.id)
        if queued is None:
            self.queue.append(Replacement(slot.id, cause, detail))
            self._next()
        elif queued.cause == "restart":     # the rolling restart's entry recycles it too
            queued.cause, queued.detail = cause, detail

    def _next(self) -> None:
        pool = self.pool
        while self.queue and (pool.draining or getattr(pool.slots.get(self.queue[0].slot), "worker", None) is None):
            self._drop(self.queue[0])       # its slot was removed, or has no worker to replace
        if self._restarting and not self.rolling():
            self._restarting = False
            log.info("rolling restart done")
        if not self.queue:
            return
        head = self.queue[0]
        slot = pool.slots[head.slot]
        if slot.incoming is not None or head.retry is not None:
            return                          # under way, or waiting for its retry
        if head.cause != "restart":
            log.info("recycling worker %d (pid %d): %s; starting its replacement",
                     slot.id, slot.worker.pid, head.detail)
        slot.incoming = pool._spawn(slot, replacing=True)
        if slot.incoming is None and pool.starter.ready:   # _spawn said why
            self._failed(head)
        # else the preloader is being replaced: the queue waits for resume(), the old worker serves

    def _restarted(self, slot: Slot, cause: str, detail: str) -> None:
        slot.last_restart = {"cause": cause, "detail": detail}
        self.pool.restarts[cause] += 1

    def resume(self) -> None:
        """The starter is ready again (a new preloader): the queue goes on where it waited."""
        self._next()

    def replaced(self, slot: Slot) -> None:
        """Its replacement is ready: it takes the slot, and the old worker drains."""
        old, slot.worker, slot.incoming = slot.worker, slot.incoming, None
        head = self.entry(slot.id)
        if head is not None:
            self.queue.remove(head)
        cause, detail = (head.cause, head.detail) if head is not None else ("restart", "rolling restart")
        self._restarted(slot, cause, detail)
        if old is not None:
            if cause != "restart":
                log.info("worker %d (pid %d) replaced by pid %d; it drains", slot.id, old.pid, slot.worker.pid)
            self.pool.stop_worker(old)
        self._next()

    def failed(self, slot: Slot, how: str, lost: bool = False) -> None:
        """Its replacement died before it was ready (`slot.incoming` is cleared already). `lost`:
        it went with the preloader that forked it, no failure of the release: it is started
        again from the next preloader (resume())."""
        head = self.entry(slot.id)
        if lost:
            log.warning("replacement for worker %d went with its preloader (%s); it is started again from the next one",
                        slot.id, how)
            self._next()
            return
        log.error("replacement for worker %d %s before it was ready", slot.id, how)
        if head is not None:
            self._failed(head)

    def _failed(self, head: Replacement) -> None:
        if self._restarting:
            log.error("rolling restart abandoned; the workers not replaced keep serving")
            self._restarting = False
            self.queue = [r for r in self.queue if r.cause != "restart"]
            for r in self.queue:
                r.restart = False
        if head not in self.queue:
            self._next()
            return
        head.failures += 1
        delay = retry_delay(head.failures)
        log.error("worker %d is not recycled yet (%s): it keeps serving; retrying in %.1fs (%d failed "
                  "replacement(s) in a row)", head.slot, head.detail, delay, head.failures)
        head.retry = self.pool.loop.after(delay, lambda: self._retry(head))

    def _retry(self, head: Replacement) -> None:
        head.retry = None
        self._next()

    def died(self, slot: Slot, worker: Worker, status: int | None, how: str) -> None:
        """The slot's worker died (`slot.worker` is cleared already). A replacement that was
        starting takes its place; a queued replacement has nothing left to replace."""
        signaled = status is not None and os.WIFSIGNALED(status)
        self._restarted(slot, worker.cause or ("signal" if signaled else "exit"), how)
        head = self.entry(slot.id)
        if head is None:
            return
        self._drop(head)
        if slot.incoming is not None:
            slot.worker, slot.incoming = slot.incoming, None
            log.info("worker %d: its replacement (pid %d) takes its place", slot.id, slot.worker.pid)
        self._next()

    def forget(self, slot_id: int) -> None:
        """The slot was removed."""
        head = self.entry(slot_id)
        if head is not None:
            self._drop(head)
            self._next()

    def _drop(self, head: Replacement) -> None:
        self.queue.remove(head)
        if head.retry is not None:
            head.retry.cancel()

    def clear(self) -> None:
        """The pool drains: nothing is replaced any more."""
        for head in list(self.queue):
            self._drop(head)
        self._restarting = False
        if self._sampling is not None:
            self._sampling.cancel()
            self._sampling = None

    # ---- what makes a worker due --------------------------------------------------------

    def notified(self, worker: Worker, fields: dict[str, str]) -> None:
        if fields.get("WATCHDOG") == "1" and self.pool.spec.watchdog:
            first = worker.last_ping is None
            worker.last_ping = time.monotonic()
            if first:
                self.pool.loop.after(self.pool.spec.watchdog, lambda: self._watchdog(worker))
        count = _count(fields.get("CADENZA_REQUESTS", ""))
        if count is not None:
            worker.requests = count
            limit = worker.max_requests
            if limit and count >= limit:
                base = self.pool.spec.max_requests
                setting = f"{base} + {limit - base} of jitter" if base and limit > base else f"{limit}"
                self.due(worker, "recycled", f"served {count} requests (workers.max_requests = {setting})")
        if "CADENZA_TIMEOUT" in fields:
            text = _text(fields["CADENZA_TIMEOUT"])
            limit = self.pool.spec.env.get("CADENZA_TIMEOUT")
            self.due(worker, "timeout", f"a request ran past workers.timeout = {limit}s: {text}" if limit
                     else f"a request ran past its timeout: {text}")

    def _watchdog(self, worker: Worker) -> None:
        """A worker that once said WATCHDOG=1 must keep saying it (sd_watchdog_enabled(3))."""
        pool = self.pool
        if pool.workers.get(worker.pid) is not worker or worker.state == "stopping":
            return
        timeout = pool.spec.watchdog
        silent = time.monotonic() - worker.last_ping
        if silent < timeout:
            pool.loop.after(timeout - silent, lambda: self._watchdog(worker))
            return
        worker.failure = f"sent no WATCHDOG=1 for {silent:.1f}s (workers.watchdog = {timeout:g})"
        worker.cause = "watchdog"
        if not pool.spec.builtin:
            log.error("worker %d (pid %d) %s; killing it", worker.id, worker.pid, worker.failure)
            pool._kill(worker)
            return
        # Its faulthandler writes every thread's stack to its output (the journal), then it waits.
        log.error("worker %d (pid %d) %s; dumping its stacks, then killing it", worker.id,
                  worker.pid, worker.failure)
        worker.killed = True            # what remains of its group gets SIGKILL too
        signal_process(worker.pid, STACK_DUMP)
        pool.loop.after(ABORT_GRACE, lambda: pool.workers.get(worker.pid) is worker and pool._kill(worker))

    def ready(self, worker: Worker) -> None:
        spec, loop = self.pool.spec, self.pool.loop
        if spec.max_lifetime:
            loop.after(spec.max_lifetime, lambda: self.due(
                worker, "recycled", f"served for {spec.max_lifetime:g}s (workers.max_lifetime)"))
        if spec.max_memory and self._sampling is None:
            self._sampling = loop.after(MEMORY_EVERY, self._sample)

    def _sample(self) -> None:
        pool = self.pool
        self._sampling = None
        if pool.draining:
            return
        for slot in list(pool.slots.values()):
            worker = slot.worker
            if worker is None or worker.state != "ready" or worker.due is not None:
                continue
            used = uss(worker.pid)
            if used is not None and used > pool.spec.max_memory * MB:
                self.due(worker, "memory", f"unique memory {used / MB:.0f} MB is over workers.max_memory "
                                           f"= {pool.spec.max_memory} MB")
        if pool.workers:
            self._sampling = pool.loop.after(MEMORY_EVERY, self._sample)

    def due(self, worker: Worker, cause: str, detail: str) -> None:
        """Ask once for the worker to be recycled, and again every ASK_AGAIN s until it is queued."""
        if not self._current(worker) or worker.due is not None:
            return
        worker.due = (cause, detail)
        log.info("worker %d (pid %d) is due for recycling: %s", worker.id, worker.pid, detail)
        self._ask(worker)

    def _ask(self, worker: Worker) -> None:
        if not self._current(worker):
            return
        self.pool.loop.after(ASK_AGAIN, lambda: self._ask(worker))
        if self.entry(worker.id) is None:
            self.pool.on_recycle(self.pool.slots[worker.id], *worker.due)

    def _current(self, worker: Worker) -> bool:
        """Still its slot's serving worker."""
        pool = self.pool
        slot = pool.slots.get(worker.id)
        return (not pool.draining and slot is not None and slot.worker is worker and worker.state == "ready"
                and pool.workers.get(worker.pid) is worker)


def uss(pid: int) -> int | None:
    """A process's unique memory in bytes (what its exit would free), None if unreadable."""
    try:
        with open(f"/proc/{pid}/smaps_rollup", "rb") as f:
            data = f.read()
    except OSError:
        return None
    total, seen = 0, False
    for line in data.splitlines():
        if line.startswith((b"Private_Clean:", b"Private_Dirty:")):
            parts = line.split()
            if len(parts) >= 2 and parts[1].isdigit():
                total += int(parts[1])
                seen = True
    return total * 1024 if seen else None


def _count(value: str) -> int | None:
    return int(value) if value.isascii() and value.isdigit() and len(value) <= 18 else None


def _text(value: str) -> str:
    return "".join(c if c.isprintable() else "?" for c in value[:MAX_TEXT]) or "?"
