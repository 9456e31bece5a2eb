"""The rollback window (DESIGN §4.5), both sides. Part of Generation (`Warm`).

With upgrade.rollback_window = W > 0, a generation N that handed over does not exit once its
workers have drained: it stays WARM for W seconds. Its master (and, with preload, its preloader)
holds no worker, no MainPID, no control socket nor metrics socket, but keeps its copies of the
listeners and the hand-off channel to N+1, which it announces with "warm W RELEASE".

`supervisorctl rollback` (to N+1, the main one) makes N main again the way an upgrade does,
with the roles swapped: N+1 adopts N as its successor (succession.Succession.adopt), tells it
"rollback"; N starts its workers (with preload, forks: milliseconds) and says "ready"; N+1 sends
MAINPID=N, waits for the barrier, says "main", then drains and exits (it does not stay warm).

- Refused, before anything changes: no warm generation (the window is off or over), or the warm
  generation's release directory is gone (pruned). That holds with preload too, although its
  code is imported: an application reads its release's files after import (templates, static
  files, lazy imports), so a pruned release cannot be trusted to serve.
- The window ends (W passed, or N+1 says "expire" because a new upgrade starts, or "stop"):
  N leaves, its preloader with it; nothing of it remains.
- N+1 stops: it tells N "stop" first. N+1 dies: N leaves (systemd restarts the unit anyway).
- N's workers cannot start (a rollback that fails): N says "failed", N+1 tells it to stop and
  serves on; the rollback fails with the reason.
"""

from __future__ import annotations

import logging
import os
import signal
import time

from .. import exitcodes
from ..records import record
from .handoff import Inheritance
from .loop import Timer
from .policy import Event, State
from .succession import Succession

log = logging.getLogger("cadenza.master")

WARM_NOTICE_WAIT = 10.0   # seconds the "warm" notice waits for the multiprocess merges of our last workers
LEAVE_MARGIN = 5.0        # beyond graceful_timeout, how long a warm generation told to leave may take


@record
class WarmPredecessor:
    generation: int
    release: str
    expires: float
    leaving: str = ""      # why it was told to leave ("expire"); it is going, and cannot be rolled back to


class Warm:
    warm: WarmPredecessor | None = None      # N+1's side: the generation kept warm for a rollback
    keep_channel = False                     # N+1's side: N said "keep" before "main"
    warm_timer: Timer | None = None          # N's side
    rolling_back = False                     # N+1's side: this hand-over is a rollback
    predecessor_number: int | None = None    # whose figures fold into ours when it is gone
    left_warm = False                        # N's side: warm, or leaving from warm: never the last
    stop_passed = False                      # N's side: a stop was passed on to N+1 (pass_stop_on)
    said_warm = False                        # N's side: N+1 was told we are warm (it may roll back)

    # ---- N's side: going warm, and back ---------------------------------------------------

    def warm_window(self) -> float:
        """0 for a generation that must not stay warm: it handed over for a rollback, or a stop
        reached it (a stop of the service ends a warm generation too)."""
        if self.rolling_back or self.pending_stop or self.stop_passed:
            return 0.0
        return self.config.upgrade.rollback_window

    def _leave_warm(self) -> None:
        """_leave() of a generation that will stay warm. Its control and metrics sockets stopped
        accepting (as for any leaving one: the requests under way finish), and accept again if
        it is main again."""

    def can_go_warm(self) -> bool:
        """Drained after a hand-over that kept the channel, and N+1 still there to roll back from
        (it may have crashed, or be of a release that closed the channel: then we exit)."""
        succession = self.succession
        return (self.warm_window() > 0 and succession is not None and succession.alive()
                and succession.has_channel())

    def _go_warm(self) -> None:
        """Drained: instead of exiting, wait for a rollback (the channel to N+1 stays ours)."""
        succession, window = self.succession, self.warm_window()
        self._drop_inherited()       # a warm predecessor of ours, told to leave, may still be going
        channel, pidfd = succession.detach()
        self.succession = None
        self.inherited = Inheritance(self.number, self.inherited.owns, channel, None, pidfd)
        self.predecessor_number = succession.generation
        self.loop.add_reader(channel, self._on_channel)
        self.loop.add_reader(pidfd, self._on_predecessor_exit)
        self.state = State.WARM
        # From here until a rollback makes us main again, the socket paths and the multiprocess
        # directory are the main generation's: whatever ends us (the window, a stop, a rollback
        # that fails) must leave them (boot._cleanup).
        self.left_warm = True
        self.warm_timer = self.loop.after(window, lambda: self.handle(Event.WARM_EXPIRED,
                                                                      why="its rollback window is over"))
        # N+1 folds our multiprocess directory once told: our last workers' merges go first
        # (for WARM_NOTICE_WAIT at most: a tool that cannot even be started must not hide us).
        self.wait_until(lambda: self.multiproc is None or not self.multiproc.busy() or self.state is not State.WARM,
                        lambda: self._say_warm(window))
        self.loop.after(WARM_NOTICE_WAIT, lambda: self._say_warm(window))

    def _say_warm(self, window: float) -> None:
        if self.state is State.WARM and not self.said_warm:
            self.said_warm = True
            self.inherited.say(f"warm {window:g} {self.release}")
            log.info("generation %d is warm for a rollback for %gs (upgrade.rollback_window); generation %d serves",
                     self.number, window, self.predecessor_number)

    def _drop_inherited(self) -> None:
        old = self.inherited
        if old.channel is not None and not old.channel.closed:
            self.loop.remove(old.channel)
            old.channel.close()
        if old.predecessor_fd is not None:
            self.loop.remove(old.predecessor_fd)
            old.close_predecessor()
        if self.warm is not None and self.multiproc is not None:
            self.multiproc.fold_from(self.warm.generation)
        self.warm = None

    def on_dismiss_new_warm(self, **_) -> None:
        """We stop while our predecessor drains, and it went warm meanwhile: it leaves too."""
        self.inherited.say("expire the service stops")

    def on_warm_expired(self, why: str = "", text: str = "", source: str = "", **_) -> None:
        """The window's end, the main generation's word ("expire WHY"), stop or death, or a stop
        signal or command that reached this warm master itself."""
        if self.warm_timer is not None:
            self.warm_timer.cancel()
        if not why:
            why = f"a stop ({source})" if source else \
                f"the main generation told it to leave ({text or 'no reason given'})"
        log.info("generation %d leaves: %s", self.number, why)
        self.left_warm = True
        self._stop(exitcodes.OK)

    def on_roll_back(self, **_) -> None:
        self.warm_timer.cancel()
        log.info("rollback: generation %d starts its workers again", self.number)
        self.state = State.STARTING
        pool = self.pool
        self.said_warm = False
        if self.multiproc is not None:    # folded into N+1's while we were warm
            self.multiproc.remake()
        pool.draining = pool.starter_kept = False
        pool._cancel_kill()
        if self.preloader is not None and self.preloader.pid is None:
            # It died while this generation drained: the slots below wait for a new one.
            log.warning("rollback: generation %d's preloader has gone; a new one is started", self.number)
            self.preloader.stopping = False
            self.preloader.start()
        for slot in pool.slots.values():      # a drained slot still names its last worker
            slot.incoming = None
            slot.worker = pool._spawn(slot)
        while len(pool.slots) < self.config.workers.count:   # a canary's promotion took K of them
            pool.add_slot()
        self._start_timer = self.loop.after(self.config.workers.ready_timeout, self._start_deadline)

    def on_restart_warm_preloader(self, **kw) -> None:
        """Its PROMETHEUS_MULTIPROC_DIR was folded into N+1's: a new preloader needs it again."""
        if self.multiproc is not None:
            self.multiproc.remake()
        self.on_restart_preloader(**kw)

    # ---- N+1's side -----------------------------------------------------------------------

    def on_predecessor_warm(self, text: str = "", **_) -> None:
        seconds, _, release = text.partition(" ")
        try:
            window = float(seconds)
        except ValueError:
            log.error("internal error: unreadable warm notice %r", text[:200])
            return
        number = self.inherited.predecessor if self.predecessor_number is None else self.predecessor_number
        self.warm = WarmPredecessor(number, release, time.monotonic() + window)
        self.state = State.SERVING
        if self.multiproc is not None:    # no worker of it writes any more: its counts are ours from now
            self.multiproc.fold_from(self.warm.generation)
        log.info("generation %d is warm for a rollback for %gs; generation %d serves alone", self.warm.generation,
                 window, self.number)
        deferred, self.deferred = self.deferred, []
        for source, watcher in deferred:
            self.handle(Event.UPGRADE, source=source, watcher=watcher)

    def dismiss_warm(self, why: str) -> None:
        """The warm generation leaves (a new upgrade, a stop)."""
        if self.warm is not None and self.inherited.channel is not None and not self.warm.leaving:
            log.info("generation %d (warm) is told to leave: %s", self.warm.generation, why)
            self.warm.leaving = why
            self.inherited.say(f"expire {why}")
            # Our upgrade's answer (and our own exit) waits for it: a warm master that hangs
            # must not hold them, nor the next upgrade, for ever.
            bound = self.config.workers.graceful_timeout + LEAVE_MARGIN
            self.loop.after(bound, lambda: self._warm_overdue(bound))

    def _warm_overdue(self, bound: float) -> None:
        pidfd = self.inherited.predecessor_fd
        if self.warm is None or not self.warm.leaving or pidfd is None:
            return
        log.warning("generation %d (warm) was told to leave %gs ago and is still there; killing it",
                    self.warm.generation, bound)
        try:
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)   # its pidfd: never another process
        except OSError as exc:
            log.warning("generation %d (warm) could not be killed: %s", self.warm.generation, exc)

    def on_start_rollback(self, source: str = "", watcher=None, **_) -> None:
        warm = self.warm
        refused = None
        if warm is None:
            refused = ("no generation is warm: upgrade.rollback_window is 0 (off), or the window of the "
                       "previous generation is over")
        elif warm.leaving:
            refused = (f"generation {warm.generation} is no longer warm: it was told to leave ({warm.leaving}) "
                       "and is exiting")
        elif not os.path.isdir(warm.release):
            refused = (f"generation {warm.generation}'s release {warm.release} is gone (pruned); keep the "
                       "release of a warm generation until its rollback window is over")
        if refused:
            log.error("rollback requested by %s refused: %s", source, refused)
            if watcher:
                watcher({"event": "refused", "text": f"rollback refused: {refused}", "generation": self.number})
            return
        channel, pidfd = self.inherited.channel, self.inherited.predecessor_fd
        try:
            succession = Succession.adopt(self.loop, warm.generation, _Adopted(warm.release), _pid_of(pidfd),
                                          channel, pidfd,
                                          timeout=self.config.upgrade.timeout,
                                          graceful_timeout=self.config.workers.graceful_timeout,
                                          report=self._successor_report)
        except (OSError, ValueError) as exc:     # EMFILE reading /proc, or it has just exited
            log.error("rollback requested by %s failed: %s; generation %d serves on", source, exc, self.number)
            if watcher:
                watcher({"event": "failed", "text": f"rollback failed: {exc}", "generation": warm.generation})
            return
        self.loop.remove(channel)
        self.loop.remove(pidfd)
        self.inherited.channel, self.inherited.predecessor_fd = None, None
        succession.watch()
        if watcher:
            succession.watchers.append(watcher)
        log.info("rollback requested by %s: generation %d (pid %d) starts its workers", source, warm.generation,
                 succession.pid)
        self.warm, self.rolling_back, self.succession = None, True, succession
        self.state = State.UPGRADING
        succession.ask("rollback")
        succession.emit("progress", f"rolling back to generation {warm.generation} in {warm.release}")

    def warm_describe(self) -> dict | None:
        warm = self.warm
        if warm is None:
            return None
        return {"generation": warm.generation, "release": warm.release,
                "expires_in": round(max(warm.expires - time.monotonic(), 0.0), 1), "leaving": warm.leaving or None}


class _Adopted:
    """The plan of a rollback: nothing to exec, a release to name."""

    def __init__(self, release: str):
        self.release = release
        self.exec_path = self.directory = None


def _pid_of(pidfd: int) -> int:
    with open(f"/proc/self/fdinfo/{pidfd}") as info:
        for line in info:
            if line.startswith("Pid:") and int(line.split()[1]) > 0:
                return int(line.split()[1])
    raise ValueError("the warm generation has just exited")
