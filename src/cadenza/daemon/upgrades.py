"""The actions of the table for an upgrade this generation starts (it is N): pre-flight, fork,
MAINPID=, the barrier, the hand-over, and a failure's graceful end. Part of Generation."""

from __future__ import annotations

import logging
import os
import time
from typing import Callable

from .. import exitcodes
from ..notify import monotonic_usec
from . import preflight
from .canary import CANARY_ENV
from .exposition import METRICS_FDNAME
from .handoff import CONTROL_FDNAME, successor_environment
from .policy import Event, State
from .succession import Outcome, Stage, Succession

log = logging.getLogger("cadenza.master")

BARRIER_TIMEOUT = 2.0


class Upgrades:
    def on_start_upgrade(self, source: str = "", watcher: Callable | None = None, canary: int | None = None,
                         **_) -> None:
        nxt = max(self.number, self.totals.generations) + 1   # a number once used (then rolled back) is not reused
        canary = self.config.upgrade.canary if canary is None else canary
        try:
            if canary and canary >= len(self.pool.slots):
                raise preflight.UpgradeRefused(
                    f"--canary {canary} needs more than {canary} workers: generation {self.number} has "
                    f"{len(self.pool.slots)} (the canary takes K of them; the rest keep serving)")
            plan = preflight.check(self.config, self.argv)
        except preflight.UpgradeRefused as exc:
            log.error("upgrade requested by %s refused: %s", source, exc)
            now = time.monotonic()
            self.last_upgrade = Outcome(False, nxt, f"refused: {exc}", started=now, finished=now)
            self.count_upgrade("refused")
            if watcher:
                watcher({"event": "refused", "text": f"upgrade refused: {exc}", "generation": nxt})
            return
        log.info("upgrade requested by %s: pre-flight passed, starting generation %d", source, nxt)
        succession = Succession(self.loop, plan, nxt, timeout=self.config.upgrade.timeout,
                                graceful_timeout=self.config.workers.graceful_timeout,
                                report=self._successor_report)
        succession.canary = canary
        if watcher:
            succession.watchers.append(watcher)
        self.systemd.send(reloading=1, monotonic_usec=monotonic_usec(), status=f"upgrading to generation {nxt}")
        succession.emit("preflight", f"pre-flight passed: {plan.exec_path} in {plan.directory} -> {plan.release}")
        try:
            succession.start(self._handed_fds(), self.argv, {**self._successor_env(nxt),
                                                             **({CANARY_ENV: str(canary)} if canary else {})})
        except OSError as exc:
            reason = f"could not start generation {nxt}: {exc.strerror or exc}"
            log.error("upgrade failed: %s; generation %d keeps serving", reason, self.number)
            self._upgrade_over(succession, reason)
            return
        finally:
            plan.close()
        self.succession = succession
        self.state = State.UPGRADING
        self.dismiss_warm("an upgrade starts")     # only now: a refused upgrade changes nothing

    def _handed_fds(self) -> list[tuple[int, str]]:
        named = [(listener.fd, listener.name) for listener in self.listeners]
        if self.control_sock is not None:
            named.append((self.control_sock.fileno(), CONTROL_FDNAME))
        if self.metrics_sock is not None:
            named.append((self.metrics_sock.fileno(), METRICS_FDNAME))
        return named

    def _successor_env(self, nxt: int) -> dict[str, str]:
        owns = [name for name, mine in (("listeners", self.bound_here), ("control", self.control_owned),
                                        ("fdstore", self.fd_store)) if mine]
        return successor_environment(generation=nxt, names=[name for _, name in self._handed_fds()], owns=owns,
                                     notify_address=self.systemd.address, watchdog_usec=self.watchdog_usec,
                                     predecessor=self.number)

    def on_join_upgrade(self, source: str = "", watcher: Callable | None = None, **_) -> None:
        if self.rolling_back:     # a deploy must not hear that a rollback was its upgrade
            text = f"upgrade refused: generation {self.number} is rolling back; upgrade once it is over"
            log.warning("%s (from %s)", text, source)
            if watcher:
                watcher({"event": "refused", "text": text, "generation": self.number + 1})
            return
        log.info("upgrade requested by %s: joining the upgrade to generation %d already running",
                 source, self.succession.generation)
        if watcher:
            self.succession.watchers.append(watcher)

    def on_defer_upgrade(self, source: str = "", watcher: Callable | None = None, **_) -> None:
        log.info("upgrade requested by %s: waiting until generation %d has drained", source, self.number - 1)
        self.deferred.append((source, watcher))
        if watcher:
            watcher({"event": "progress", "generation": self.number + 1,
                     "text": f"waiting for generation {self.number - 1} to finish draining"})

    def _answer_deferred(self, why: str) -> None:
        deferred, self.deferred = self.deferred, []
        for _, watcher in deferred:
            if watcher:
                watcher({"event": "refused", "text": f"upgrade refused: {why}", "generation": self.number + 1})

    def _successor_report(self, what: str, reason: str = "", figures: dict | None = None, workers: int = 0,
                          count: int = 0) -> None:
        event = {"ready": Event.SUCCESSOR_READY, "failed": Event.SUCCESSOR_FAILED, "gone": Event.SUCCESSOR_GONE,
                 "figures": Event.CANARY_FIGURES, "grown": Event.CANARY_GREW}[what]
        if what == "figures":
            self.handle(event, figures=figures)
        elif what == "grown":
            self.handle(event, workers=workers, count=count)
        else:
            self.handle(event, reason=reason) if reason else self.handle(event)

    def on_commit(self, **_) -> None:
        self.freeze_metrics(True)     # from MAINPID= on, we answer scrapes as we were while main
        succession = self.succession
        if not self.systemd.enabled:
            succession.appointed()
            self.state = State.COMMITTED
            self.on_hand_over()
            return
        if not self.systemd.send(mainpid=succession.pid, ready=1, status=f"serving generation {succession.generation}"):
            self.freeze_metrics(False)
            succession.fail("could not send MAINPID= to systemd (NOTIFY_SOCKET refused it)")
            return
        # MAINPID= is out: from here on there is no way back, only the hand-over.
        self.state = State.COMMITTED
        succession.appointed()
        self._after_barrier(lambda: self.handle(Event.BARRIER))
        # Not main any more: after BARRIER=1 (which systemd takes from anyone) we say nothing.
        self.systemd.muted = True

    def on_hand_over(self, **_) -> None:
        succession = self.succession
        self.count_upgrade("rolled_back" if self.rolling_back else "ok", succession)
        if not succession.hand_over(stop=self.pending_stop, totals=self.totals.as_json(self.pool.restarts, succession.generation),
                                    keep=self.warm_window() > 0):
            log.error("could not tell generation %d it is main: it has gone; systemd decides what follows",
                      succession.generation)
        log.info("handed over to generation %d (pid %d); draining %d worker(s)", succession.generation,
                 succession.pid, len(self.pool.workers))
        self.last_upgrade = succession.outcome(True)
        self._leave()

    def _leave(self) -> None:
        self.systemd.muted = True      # not main any more: systemd would refuse what we said
        self.state = State.LEAVING
        self.exit_code_pending = exitcodes.OK
        if self.control is not None:
            self.control.stop_accepting()   # new requests go to the new main; ours finish
        self._stop_metrics()
        warm = self.warm_window() > 0
        if warm:
            self._leave_warm()      # its listeners stay: a rollback serves on them again
        else:
            self._close_listeners()
        self.pool.drain(keep_starter=warm)
        self._maybe_exit()

    def on_upgrade_failed(self, reason: str = "", **_) -> None:
        self._last_status = ""   # STATUS= shows the failing upgrade until it is over
        run = self.canary_run
        if run is not None:
            run.judged = True    # N+1 is being stopped: no judgement (nor its reason) comes after this one
            run.cancel(restore=False)
            if self.state in (State.CANARY, State.PROMOTING, State.ROLLING_BACK):
                self._grow_back(run)   # N+1 drains now: our own workers come back first

    def on_successor_gone(self, **_) -> None:
        succession = self.succession
        if succession is None:
            return
        if self.multiproc is not None and succession.stage is not Stage.DONE:
            self.multiproc.fold_from(succession.generation)   # what its workers served is ours
        if self.state is State.COMMITTED:
            self._reclaim(succession)
            return
        if succession.stage is Stage.DONE:
            return   # the main generation we handed over to has gone: not ours to judge
        self.succession = None
        if self.state is State.UPGRADING:
            self.state = State.SERVING
        run = self._end_canary() if self.canary_run is not None else None
        if run is not None and run.reason:   # a stop after the gate failed: its verdict is the outcome
            self._upgrade_over(succession, f"{run.reason}; then {succession.reason}", outcome="rolled_back")
        else:
            self._upgrade_over(succession, succession.reason or "the new generation exited")
        self._maybe_exit()

    def _reclaim(self, succession: Succession) -> None:
        """N+1 died between MAINPID= and "main". systemd refuses a MAINPID= naming a dead process
        ("does not exist or is a zombie"), and then we are still its main process: say so and serve
        on, with every worker we still have. Had systemd taken it before N+1 died, it treats that
        as its main process failing and restarts the unit whatever we say (it refuses ours)."""
        reason = (f"generation {succession.generation} (pid {succession.pid}) exited after MAINPID= named it; "
                  f"generation {self.number} serves on")
        log.error("%s", reason)
        self.succession = None
        self.systemd.muted = False
        self.freeze_metrics(False)
        self.systemd.send(mainpid=os.getpid())
        self.state = State.SERVING
        for slot in self.pool.slots.values():   # deaths while committed were not respawned
            self.pool.respawn(slot)
        while len(self.pool.slots) < self.restore_count:   # a promoted canary had taken all but one
            self.pool.add_slot()
        self.restore_count = 0
        self._upgrade_over(succession, reason)
        if self.pending_stop:
            self.pending_stop = False
            self.handle(Event.STOP, source="the stop that reached us in the barrier window")

    def _upgrade_over(self, succession: Succession, reason: str, outcome: str = "failed") -> None:
        """A failed upgrade: READY=1 with the reason, then (once systemd took it, so that a failed
        `systemctl reload` finds the unit active again) the waiting clients hear why."""
        self.last_upgrade = succession.outcome(False, reason)
        self.count_upgrade(outcome, succession)
        self.restore_count = 0
        self.rolling_back = False
        status = f"upgrade to generation {succession.generation} failed: {reason.splitlines()[0]}"
        if self.state is not State.STOPPING:
            self._last_status = status
            self.systemd.send(ready=1, status=status)
        def tell() -> None:
            succession.emit("failed", f"upgrade to generation {succession.generation} failed: {reason}",
                            output=list(succession.output))
        if self.state is State.STOPPING:
            tell()
        else:
            self._after_barrier(tell)

    def _after_barrier(self, then: Callable[[], None]) -> None:
        fd = self.systemd.barrier()
        if fd is None:
            if self.systemd.enabled and not self.systemd.muted:
                log.warning("BARRIER=1 could not be sent (%s); going on without systemd's confirmation",
                            self.systemd.last_error)
            self.loop.after(0, then)
            return
        log.debug("waiting for systemd to take what we sent (BARRIER=1)")
        fired = []

        def once() -> None:
            if not fired:
                fired.append(True)
                self.loop.remove(fd)
                os.close(fd)
                then()

        def readable() -> None:
            # Only the end of the pipe means systemd took it; anything else is a spurious wake-up.
            try:
                data = os.read(fd, 1)
            except BlockingIOError:
                log.warning("BARRIER=1: spurious wake-up on fd %d; still waiting", fd)
                return
            if not data:
                once()
        self.loop.add_reader(fd, readable)
        self.loop.after(BARRIER_TIMEOUT, once)   # a systemd slow to read must not stall us forever
