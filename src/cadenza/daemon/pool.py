"""A generation's workers: one slot per worker, respawn with backoff, drain.

The pool knows processes, not policy. It reports to its owner through callbacks:
`on_ready()` after any worker became ready, `on_respawn(slot)` when a slot lost its worker
(the owner consults the table and calls `respawn(slot)` or not), `on_app_error(slot, reason)`
instead when that worker exited 3 ("the application could not be loaded") before any worker of
the pool was ever ready, and `on_drained()` when no worker is left after `drain()`. A fork
that fails (EAGAIN under TasksMax=, ENOMEM) is a worker that died at once: the slot is retried
with the same backoff, never the end of the master.

Replacing workers make-before-break (a rolling restart, recycling: `on_recycle(slot, cause,
detail)` asks the owner) and the watchdog's kill of a silent worker are recycle.py's.

Every signal goes to a worker's process group, and what remains of a group once its worker was
reaped counts as running (`pids()`, drained or not) until it is gone: groups.py.

A worker is started by the pool's *starter*: process.ExecStarter (fork + exec) or the preloader
(preloading.py), which forks it. A starter not ready (a preloader importing, or being replaced)
leaves the slot waiting; `starter_ready()` fills the waiting slots.
"""

from __future__ import annotations

import logging
import os
import random
import signal
import time
from collections import Counter
from ..records import record, field
from typing import Callable

from ..exitcodes import WORKER_APP_ERROR
from ..figures import Figures
from . import groups, process
from .loop import Loop, Timer, signal_group
from .recycle import Recycler

log = logging.getLogger("cadenza.master")

BACKOFF_FIRST = 0.1
BACKOFF_CAP = 10.0
# A worker that was ready this long before it died is not "failing at start": respawn at once.
STABLE_AFTER = 10.0


def backoff_delay(failures: int) -> float:
    """0 for the first death of a stable worker, then 0.1 s doubling up to BACKOFF_CAP."""
    return min(BACKOFF_FIRST * 2 ** (failures - 1), BACKOFF_CAP) if failures > 0 else 0.0


@record
class Worker:
    id: int
    pid: int
    generation: int
    started: float = field(default_factory=time.monotonic)
    state: str = "booting"          # booting -> ready -> stopping
    ready_at: float | None = None
    status: str = ""
    failure: str = ""               # why the master killed it, when it did
    restarts: int = 0
    last_ping: float | None = None  # its last WATCHDOG=1
    killed: bool = False            # its group gets SIGKILL (sent, or due after a stack dump)
    requests: int = 0               # completed requests, as its last CADENZA_REQUESTS= said
    max_requests: int = 0           # its own limit (max_requests + jitter); 0: none
    cause: str = ""                 # "watchdog" when the pool killed it for that
    due: tuple[str, str] | None = None   # (cause, detail) once due for recycling (recycle.py)
    starter_pid: int | None = None  # the preloader that forked it (None: exec'd by the master)
    figures: Figures = field(default_factory=Figures)  # its responses, as it last said (figures.py)

    def age(self, now: float | None = None) -> float:
        return (now or time.monotonic()) - self.started


@record
class Slot:
    """One place for a worker: its process and, during a rolling restart, the next one."""
    id: int
    worker: Worker | None = None
    incoming: Worker | None = None
    failures: int = 0
    restarts: int = 0
    respawn: Timer | None = None
    last_death: str = ""
    waiting: bool = False           # for the starter to be ready
    last_restart: dict | None = None    # {"cause", "detail"} of its latest new worker (recycle.py)


@record
class Spec:
    """How this generation starts a worker."""
    argv: list[str]
    generation: int
    app_name: str
    release: str
    listeners: list
    notify_address: str
    ready: object                   # config.Readiness
    ready_timeout: float
    graceful_timeout: float
    watchdog: float
    output_fd: int | None
    env: dict[str, str] = field(default_factory=dict)   # config.worker_environment: [workers.env], [http]
    max_requests: int = 0
    max_requests_jitter: int = 0
    max_lifetime: float = 0.0
    max_memory: int = 0             # MB
    builtin: bool = False           # the built-in worker: signals.STACK_DUMP dumps its stacks (faulthandler)


class Pool:
    def __init__(self, loop: Loop, spec: Spec, *, on_ready: Callable[[], None],
                 on_respawn: Callable[[Slot], None], on_drained: Callable[[], None],
                 on_app_error: Callable[[Slot, str], None] | None = None,
                 read_notifications: Callable[[], None] = lambda: None,
                 on_recycle: Callable[[Slot, str, str], None] | None = None, starter=None):
        self.loop = loop
        self.spec = spec
        self.starter = starter or process.ExecStarter(loop, spec)
        # (slot, cause, detail): a worker is due for recycling (recycle.py); the owner consults
        # the table and calls recycle() or not.
        self.on_recycle = on_recycle or (lambda slot, cause, detail: None)
        self.on_ready, self.on_respawn, self.on_drained = on_ready, on_respawn, on_drained
        self.on_app_error = on_app_error or (lambda slot, reason: on_respawn(slot))
        # A worker that cannot load its app says why in STATUS= and exits at once: its datagram is
        # queued before the exit, but the loop may see the SIGCHLD first. Reading the notify
        # socket before such an exit is judged gives its reason to the failure, not to chance.
        self.read_notifications = read_notifications
        self.served = False             # whether any worker of this pool was ever ready
        self.slots: dict[int, Slot] = {}
        self.workers: dict[int, Worker] = {}
        self.recycler = Recycler(self)
        self.draining = self.starter_kept = False
        self._dead = (0, "")
        self._kill_timer: Timer | None = None
        self.leftovers = groups.Leftovers(loop, spec.graceful_timeout, self.check_drained)
        self.restarts: Counter = Counter()  # new workers by cause (recycle.py), for the metrics
        self.on_exit: Callable[[Worker], None] = lambda worker: None   # each worker's end (metrics.py)

    # ---- counts ---------------------------------------------------------------------------

    def ready_count(self) -> int:
        return sum(1 for s in self.slots.values() if s.worker is not None and s.worker.state == "ready")

    def all_ready(self) -> bool:
        return bool(self.slots) and self.ready_count() == len(self.slots)

    def deaths(self) -> list[str]:
        return [s.last_death for s in self.slots.values() if s.last_death]

    # ---- starting -------------------------------------------------------------------------

    def add_slot(self) -> Slot:
        slot = Slot(max(self.slots, default=0) + 1)
        self.slots[slot.id] = slot
        slot.worker = self._spawn(slot)
        return slot

    def _spawn(self, slot: Slot, replacing: bool = False) -> Worker | None:
        spec = self.spec
        if not self.starter.ready:      # the preloader is being replaced
            if not replacing:           # a replacement waits in the recycler's queue instead
                slot.waiting = True
            return None
        extra = {**spec.env, "CADENZA_GRACEFUL_TIMEOUT": str(spec.graceful_timeout)}
        if spec.watchdog:
            extra["WATCHDOG_USEC"] = str(int(spec.watchdog * 1e6))
        limit = 0
        if spec.max_requests:
            limit = spec.max_requests + random.randint(0, spec.max_requests_jitter)
            extra["CADENZA_MAX_REQUESTS"] = str(limit)
        try:
            pid = self.starter.spawn(slot.id, extra)
        except OSError as exc:
            if not self.starter.ready:  # the preloader was lost on the way: wait for the next one
                log.warning("worker %d could not be %s: %s; it waits for the next preloader",
                            slot.id, "replaced" if replacing else "started", exc.strerror or exc)
                slot.waiting = not replacing
                return None
            if replacing:   # a rolling restart's replacement: the old worker keeps serving
                log.error("worker %d could not be replaced: fork failed: %s", slot.id, exc.strerror or exc)
                return None
            # EAGAIN under TasksMax=, ENOMEM: as if the worker died at once; retried with backoff.
            slot.failures += 1
            slot.last_death = f"worker {slot.id} could not be started: fork failed: {exc.strerror or exc}"
            delay = backoff_delay(slot.failures)
            log.error("%s; retrying in %.1fs", slot.last_death, delay)
            slot.respawn = self.loop.after(delay, lambda: self._respawn_due(slot))
            return None
        worker = Worker(slot.id, pid, spec.generation, restarts=slot.restarts, max_requests=limit,
                        starter_pid=self.starter.pid)
        self.workers[pid] = worker
        self.starter.watch(pid, lambda status, w=worker: self._exited(w, status))
        if spec.ready.kind == "spawn":
            self.loop.after(0, lambda: self.mark_ready(worker))
        else:
            if spec.ready.kind == "uptime":
                self.loop.after(spec.ready.seconds, lambda: self.mark_ready(worker))
            self.loop.after(spec.ready_timeout, lambda: self._ready_deadline(worker))
        log.info("worker %d started (pid %d)", slot.id, pid)
        return worker

    def starter_ready(self) -> None:
        """The starter can start workers again: fill the slots that waited for it."""
        for slot in list(self.slots.values()):
            if slot.waiting and slot.worker is None and not self.draining:
                slot.waiting = False
                slot.worker = self._spawn(slot)
        self.recycler.resume()          # the replacements that waited for it

    def respawn(self, slot: Slot) -> None:
        """Fill `slot` again after its worker died, at once or after its backoff."""
        if slot.id not in self.slots or slot.worker is not None or slot.respawn is not None:
            return
        delay = backoff_delay(slot.failures)
        if slot.failures:
            slot.last_death += f", retry in {delay:.1f}s ({slot.failures} failed start(s) in a row)"
        log.warning("worker %d (pid %d) %s; respawning in %.1fs", slot.id, *self._dead, delay)
        slot.respawn = self.loop.after(delay, lambda: self._respawn_due(slot))

    def _respawn_due(self, slot: Slot) -> None:
        slot.respawn = None
        if slot.id in self.slots and slot.worker is None and not self.draining:
            slot.restarts += 1
            slot.worker = self._spawn(slot)

    # ---- what workers say -----------------------------------------------------------------

    def worker_of(self, pid: int) -> int | None:
        """The worker a notify sender speaks for: itself, or one of its group or descendants."""
        return groups.worker_of(pid, self.workers)

    def notified(self, pid: int, fields: dict[str, str]) -> None:
        worker = self.workers.get(pid)
        if worker is None:
            log.debug("ignored notification from pid %d, not a worker of this generation", pid)
            return
        if "STATUS" in fields:
            worker.status = fields["STATUS"][:1000]   # enough for a path and an exception
        if fields.get("READY") == "1" and self.spec.ready.kind == "notify":
            self.mark_ready(worker)
        worker.figures.update(fields)
        self.recycler.notified(worker, fields)      # WATCHDOG=1, CADENZA_REQUESTS=, CADENZA_TIMEOUT=

    def mark_ready(self, worker: Worker) -> None:
        if self.workers.get(worker.pid) is not worker or worker.state != "booting":
            return
        worker.state = "ready"
        worker.ready_at = time.monotonic()
        self.served = True
        log.info("worker %d (pid %d) ready after %.3fs", worker.id, worker.pid, worker.age())
        slot = self.slots.get(worker.id)
        if slot is not None and slot.incoming is worker:
            self.recycler.replaced(slot)
        self.recycler.ready(worker)
        self.on_ready()
        if slot is not None and slot.worker is worker:
            self.replace_stale(slot)

    def replace_stale(self, slot: Slot) -> None:
        """A worker forked by a preloader that has since been replaced is recycled (make-before-
        break), so that every worker shares the current preloader's memory."""
        worker = slot.worker
        if (worker is not None and worker.state == "ready" and self.starter.pid is not None
                and worker.starter_pid != self.starter.pid and self.starter.ready):
            # Asked again until a serving generation takes it (the table ignores it elsewhere).
            self.recycler.due(worker, "recycled", "forked by a preloader that was replaced")

    def _ready_deadline(self, worker: Worker) -> None:
        if self.workers.get(worker.pid) is worker and worker.state == "booting":
            worker.failure = f"not ready within {self.spec.ready_timeout:g}s"
            log.error("worker %d (pid %d) %s; killing it", worker.id, worker.pid, worker.failure)
            self._kill(worker)

    def _exited(self, worker: Worker, status: int) -> None:
        app_error = not self.served and _exit_code(status) == WORKER_APP_ERROR and not worker.failure
        if app_error:
            self.read_notifications()
        del self.workers[worker.pid]
        self.on_exit(worker)
        # What it started may outlive it (a wrapper that did not exec, killed): that goes too.
        # A group told to stop already is not told twice (groups.Leftovers.sweep).
        self.leftovers.sweep(worker.pid, f"worker {worker.id} (pid {worker.pid})",
                             signal.SIGKILL if worker.killed else None if worker.state == "stopping"
                             else signal.SIGTERM)
        how = worker.failure or process.describe_status(status)
        if worker.state == "booting" and worker.status:
            how += f" ({worker.status})"
        slot = self.slots.get(worker.id)
        if worker.state == "stopping" or slot is None or self.draining:
            log.info("worker %d (pid %d) %s", worker.id, worker.pid, how)
        elif slot.incoming is worker:
            slot.incoming = None
            self.recycler.failed(slot, how, lost=worker.starter_pid != self.starter.pid or not self.starter.ready)
        elif slot.worker is worker:
            slot.worker = None
            stable = worker.ready_at is not None and time.monotonic() - worker.ready_at >= STABLE_AFTER
            slot.failures = 0 if stable else slot.failures + 1
            slot.last_death = f"worker {worker.id} {how}"
            self._dead = (worker.pid, how)
            self.recycler.died(slot, worker, status, how)   # a replacement starting takes its place
            if slot.worker is None and app_error and not self.served:
                reason = f"worker {worker.id} {process.describe_status(status)}"
                self.on_app_error(slot, f"{reason}: {worker.status}" if worker.status else reason)
            elif slot.worker is None:
                self.on_respawn(slot)
            if slot.respawn is None and slot.worker is None and not self.draining:
                log.warning("worker %d (pid %d) %s; not respawned", worker.id, worker.pid, how)
        self.check_drained()

    def check_drained(self) -> None:
        """on_drained() once a draining pool has nothing left: no worker, no remnant of a worker's
        group, no preloader."""
        if self.draining and not self.workers and not self.leftovers and not self._starter_pids():
            self._cancel_kill()
            self.on_drained()

    # ---- scaling (a rolling restart and recycling: self.recycler) --------------------------

    def remove_slot(self) -> bool:
        if len(self.slots) <= 1:
            return False
        slot = self.slots.pop(max(self.slots))
        log.info("removing worker %d", slot.id)
        if slot.respawn:
            slot.respawn.cancel()
        for worker in (slot.worker, slot.incoming):
            if worker is not None:
                self.stop_worker(worker)
        self.recycler.forget(slot.id)
        return True

    # ---- stopping -------------------------------------------------------------------------

    def stop_worker(self, worker: Worker, sig: int = signal.SIGTERM) -> None:
        if worker.state != "stopping" or sig == signal.SIGKILL:
            worker.state = "stopping"
            if sig == signal.SIGKILL:
                self._kill(worker)
            else:
                signal_group(worker.pid, sig)

    def drain(self, sig: int = signal.SIGTERM, bound: float | None = None, keep_starter: bool = False) -> None:
        """Stop every worker (TERM: they finish their requests) and respawn none; on_drained()
        follows once none is left. Stragglers get SIGKILL after graceful_timeout (or `bound`).
        `keep_starter`: the preloader stays (a generation kept warm, warm.py)."""
        self.draining, self.starter_kept = True, keep_starter
        self.recycler.clear()
        for slot in self.slots.values():
            if slot.respawn:
                slot.respawn.cancel()
                slot.respawn = None
        for worker in list(self.workers.values()):
            self.stop_worker(worker, sig)
        if not keep_starter:
            self.starter.drain()
        if self._kill_timer is None and (self.workers or self.leftovers or self._starter_pids()):
            seconds = self.spec.graceful_timeout if bound is None else bound
            self._kill_timer = self.loop.after(seconds, self._kill_stragglers)
        if not self.workers and not self.leftovers and not self._starter_pids():
            self.loop.after(0, self.on_drained)

    def _kill_stragglers(self) -> None:
        self._kill_timer = None
        for worker in self.workers.values():
            log.warning("worker %d (pid %d) still running after %gs; killing it", worker.id, worker.pid,
                        self.spec.graceful_timeout)
            self._kill(worker)
        self.leftovers.kill_all()
        if not self.starter_kept:     # a warm generation's preloader is not a straggler
            self.starter.kill()

    def _cancel_kill(self) -> None:
        if self._kill_timer is not None:
            self._kill_timer.cancel()
            self._kill_timer = None

    def kill_all(self) -> None:
        for worker in self.workers.values():
            worker.state = "stopping"
            self._kill(worker)
        self.leftovers.kill_all()
        self.starter.kill()

    def _kill(self, worker: Worker) -> None:
        worker.killed = True
        signal_group(worker.pid, signal.SIGKILL)

    def pids(self) -> set[int]:
        """The workers, and the groups of reaped ones that still have members (by their old pid)."""
        return set(self.workers) | self.leftovers.pgids() | self._starter_pids()

    def _starter_pids(self) -> set[int]:
        return set() if self.starter_kept else self.starter.pids()


def _exit_code(status: int | None) -> int | None:
    return os.WEXITSTATUS(status) if status is not None and os.WIFEXITED(status) else None
