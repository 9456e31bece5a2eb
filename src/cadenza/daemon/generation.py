"""The generation a master runs: it owns the pool and the upgrade, and obeys the table.

Invariants (DESIGN §4.1):
- Every signal, control command, timer and notice becomes an Event, and `handle()` looks up
  (state, event) in policy.TABLE: an action below (`on_<name>`), or a refusal phrased by
  policy.refusal. Nothing else decides.
- "Is this the main master" is the state (State.main), stored nowhere else.
- systemd hears READY=1 only when every slot holds a ready worker; STATUS= always says the
  generation and how many workers are ready. Only the main master speaks to systemd.
- The master never imports application code: workers are exec'd programs, or forks of the
  generation's preloader (preloading.py), itself exec'd from the release.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from typing import Callable

from .. import exitcodes
from ..config import Config, worker_environment
from ..notify import Notifier, NotifyInbox
from .handoff import Inheritance
from .loop import Loop
from .canary import Canary
from .metrics import Metrics
from .warm import Warm
from .policy import Event, Ignore, Refuse, State, decide, refusal
from .pool import Pool, Spec
from .preloading import Preloader
from .takeover import Takeover
from .upgrades import Upgrades
from .process import builtin_argv
from .succession import Outcome, Stage, Succession

log = logging.getLogger("cadenza.master")

HEIR_MAX_FAILURES = 5      # failed worker starts in a row that end an upgrade early
PREDECESSOR_MARGIN = 5.0   # beyond graceful_timeout, how long a stopping main waits for its predecessor
SIGNALS = {signal.SIGTERM: Event.STOP, signal.SIGQUIT: Event.STOP, signal.SIGINT: Event.STOP_NOW,
           signal.SIGHUP: Event.RESTART, signal.SIGTTIN: Event.GROW, signal.SIGTTOU: Event.SHRINK,
           signal.SIGUSR2: Event.UPGRADE}


class Generation(Upgrades, Takeover, Metrics, Canary, Warm):

    def __init__(self, loop: Loop, config: Config, listeners: list, notifier: Notifier, inherited: Inheritance,
                 *, release: str, argv: list[str], control_sock, control_owned: bool, bound_here: bool,
                 fd_store: bool, watchdog_usec: int, serve_control: Callable):
        self.loop, self.config, self.listeners, self.systemd = loop, config, listeners, notifier
        self.inherited = inherited
        self.number = inherited.generation
        self.name = config.app.name
        self.release, self.argv = release, argv
        self.control_sock, self.control_owned = control_sock, control_owned
        self.bound_here, self.fd_store = bound_here, fd_store
        self.watchdog_usec = watchdog_usec
        self._serve_control = serve_control
        self.control = None
        self.state = State.STARTING
        self.started = time.monotonic()
        self.exit_code: int | None = None
        self.succession: Succession | None = None
        self.last_upgrade: Outcome | None = None
        self.deferred: list[tuple[str, Callable | None]] = []
        self.pending_stop = False
        self.exit_code_pending = exitcodes.OK
        self.waiting_for_predecessor = False
        self._waits: list[tuple[Callable[[], bool], Callable[[], None]]] = []
        self._last_status = ""
        self.inbox = NotifyInbox(f"{self.name}/gen{self.number}")
        w = config.workers
        argv_ = list(w.command) if w.command else builtin_argv(w.app)
        spec = Spec(argv_, self.number, self.name, release, listeners, self.inbox.address,
                    w.ready, w.ready_timeout, w.graceful_timeout, w.watchdog, inherited.log_fd,
                    env=worker_environment(config), max_requests=w.max_requests,
                    max_requests_jitter=w.max_requests_jitter, max_lifetime=w.max_lifetime,
                    max_memory=w.max_memory, builtin=not w.command)
        self.preloader: Preloader | None = None
        if w.preload:
            self.preloader = Preloader(
                loop, spec, w.app, on_ready=lambda: self.handle(Event.PRELOADER_READY),
                on_gone=lambda reason, app_error: self._preloader_gone(reason, app_error))
        self.pool = Pool(loop, spec, starter=self.preloader,
                         on_ready=lambda: self.handle(Event.WORKERS_READY),
                         on_respawn=lambda slot: self.handle(Event.RESPAWN, slot=slot),
                         on_drained=lambda: self.handle(Event.DRAINED),
                         on_app_error=lambda slot, reason: self.handle(Event.APP_FAILED, slot=slot, reason=reason),
                         on_recycle=lambda slot, cause, detail: self.handle(Event.RECYCLE, slot=slot, cause=cause,
                                                                            detail=detail),
                         read_notifications=self._on_notify)
        self._setup_metrics()
        self._setup_canary()
        if inherited.heir:
            notifier.muted = True   # NotifyAccess=main: systemd would refuse all we said before "main"

    # ---- the one dispatch ---------------------------------------------------------------

    def handle(self, event: Event, **kw) -> str | None:
        """Apply the table; the refusal's text when refused, else None."""
        cell = decide(self.state, event)
        if isinstance(cell, Refuse):
            text = refusal(self.number, self.state, event, cell)
            log.warning("%s%s", text, f" (from {kw['source']})" if kw.get("source") else "")
            watcher = kw.get("watcher")
            if watcher:
                watcher({"event": "refused", "text": text, "generation": self.number + 1})
            if event is Event.UPGRADE:
                self.count_upgrade("refused")
            return text
        if isinstance(cell, Ignore):
            log.debug("%s in state %s: %s", event.value, self.state.value, cell.why)
        else:
            getattr(self, f"on_{cell}")(**kw)
        self._publish_status()
        return None

    def on_signal(self, signum: int) -> None:
        event = SIGNALS.get(signum)
        if event is None:
            # Their default action would end the master (and with it the service): never.
            log.warning("ignored %s: cadenza gives it no meaning", signal.Signals(signum).name)
            return
        self.handle(event, source=signal.Signals(signum).name)

    # ---- running ------------------------------------------------------------------------

    def run(self) -> int:
        self.loop.on_signal = self.on_signal
        self.loop.after_each = self._publish_status
        self.loop.install_signals()
        self.loop.add_reader(self.inbox.sock, self._on_notify)
        if not self.inherited.heir:
            self._start_control()
        else:
            self.loop.add_reader(self.inherited.channel, self._on_channel)
            self.loop.add_reader(self.inherited.predecessor_fd, self._on_predecessor_exit)
        log.info("generation %d starting %d worker(s) in %s on %s", self.number, self.config.workers.count,
                 self.release, ", ".join(l.describe() for l in self.listeners))
        # The generation's deadline comes before its workers' own (same length, set earlier): it
        # finds every worker that never said READY=1 still there, not already killed and reaped.
        self._start_timer = self.loop.after(self.config.workers.ready_timeout, self._start_deadline)
        if self.preloader is not None:
            self.preloader.start()    # the slots below wait for it to be ready
        for _ in range(self.canary_workers or self.config.workers.count):
            self.pool.add_slot()
        if self.watchdog_usec:
            self._watchdog()
        self._publish_status()
        self.loop.run()
        self._check_waits()
        return self.exit_code

    def _start_control(self) -> None:
        if self.control_sock is not None and self.control is None:
            self.control = self._serve_control(self)
        elif self.control is not None:
            self.control.start_accepting()      # main again: a rollback (warm.py)
        self._start_metrics()

    def _on_notify(self) -> None:
        for pid, fields in self.inbox.receive(self.pool.worker_of):
            self.pool.notified(pid, fields)

    def _start_deadline(self) -> None:
        w = self.config.workers
        reason = f"{self.pool.ready_count()}/{len(self.pool.slots)} workers ready after {w.ready_timeout:g}s"
        if self.pool.deaths():
            reason += f" (last: {self.pool.deaths()[-1]})"
        silent = [slot.id for slot in self.pool.slots.values()
                  if slot.worker is not None and slot.worker.state == "booting"]
        if silent and w.ready.kind == "notify":
            reason += "; " + self._silent_workers(silent)
        self.handle(Event.START_FAILED, reason=reason)

    def _silent_workers(self, ids: list[int]) -> str:
        """Why a worker that is alive is not ready, and the fix when it is a program of the user's:
        uvicorn, gunicorn and most servers never send READY=1."""
        w = self.config.workers
        who = f"worker {ids[0]}" if len(ids) == 1 else "workers " + ", ".join(map(str, ids))
        text = f"no READY=1 arrived from {who} within {w.ready_timeout:g}s (workers.ready_timeout)"
        if w.command:
            where = (f"in {os.path.abspath(self.config.source)}" if self.config.source
                     else "in a config file (cadenza run -c FILE)")
            text += (f"; a command worker that does not speak sd_notify needs ready = \"spawn\" or "
                     f"ready = \"uptime:2s\" under [workers] {where}")
        return text

    # ---- starting -----------------------------------------------------------------------

    def on_started(self, **_) -> None:
        if self.inherited.heir:
            self.inherited.say(f"progress workers ready {self.pool.ready_count()}/{len(self.pool.slots)}")
        if not self.pool.all_ready():
            return
        self._start_timer.cancel()
        self.ready_after = round(time.monotonic() - self.started, 3)
        log.info("generation %d serving: %d/%d workers ready after %.2fs", self.number, len(self.pool.slots),
                 len(self.pool.slots), self.ready_after)
        if self.inherited.heir:
            self.inherited.redirect_output()
            self.state = State.STANDBY
            # master N now sends MAINPID=us, then says "main"; a canary says how many it started
            self.inherited.say(f"ready {len(self.pool.slots)}" if self.canary_workers else "ready")
        else:
            self.state = State.SERVING
            self.systemd.send(ready=1, status=self.status_text(), **self._watchdog_field())

    def on_start_failed(self, reason: str, code: int = exitcodes.TEMPFAIL, **_) -> None:
        reason = f"generation {self.number} start failed: {reason}"
        log.error("%s", reason)
        self.inherited.say(f"failed {reason}")
        self._stop(code, status=reason)

    def on_app_failed(self, reason: str, **_) -> None:
        # 78, like a refused config: the release as deployed cannot serve, and a restart of the
        # unit would only fail the same way (the shipped unit lists 78 in RestartPreventExitStatus=).
        self.handle(Event.START_FAILED, reason=reason, code=exitcodes.CONFIG)

    def on_respawn(self, slot, **_) -> None:
        if self.state is State.STARTING and self.inherited.heir and slot.failures >= HEIR_MAX_FAILURES:
            self.handle(Event.START_FAILED, reason=f"{slot.failures} failed starts in a row (last: {slot.last_death})")
            return
        self.pool.respawn(slot)

    def on_recycle(self, slot, cause: str, detail: str, **_) -> None:
        self.pool.recycler.recycle(slot, cause, detail)

    # ---- the preloader ------------------------------------------------------------------

    def _preloader_gone(self, reason: str, app_error: bool) -> None:
        self.pool.check_drained()     # a draining pool also waits for its preloader
        self.handle(Event.PRELOADER_GONE, reason=reason, app_error=app_error)

    def on_preloader_ready(self, **_) -> None:
        self.pool.starter_ready()

    def on_preloader_replaced(self, **_) -> None:
        # The workers still serve from the old preloader's memory: replacing them, one slot at a
        # time and each only once its successor is ready, shares the new preloader's again. A
        # worker of the old one still booting is queued once it is ready (pool.mark_ready).
        self.pool.starter_ready()
        for slot in list(self.pool.slots.values()):
            self.pool.replace_stale(slot)

    def on_restart_preloader(self, reason: str, **_) -> None:
        log.warning("%s; its workers keep serving, a new preloader is started", reason)
        self.preloader.schedule_start()

    def on_preloader_lost_at_start(self, reason: str, app_error: bool, **_) -> None:
        if app_error:   # the release's application cannot be imported: no retry will change that
            self.handle(Event.START_FAILED, reason=reason, code=exitcodes.CONFIG)
        elif self.inherited.heir and self.preloader.failures >= HEIR_MAX_FAILURES:
            # As for workers: an upgrade ends early rather than retrying until upgrade.timeout.
            self.handle(Event.START_FAILED, reason=f"{self.preloader.failures} failed preloader starts in a "
                                                   f"row (last: {reason})")
        else:
            self.on_restart_preloader(reason)

    # ---- requests -----------------------------------------------------------------------

    def on_stop(self, source: str = "", **_) -> None:
        log.info("graceful stop requested%s: draining %d worker(s), up to %gs", f" by {source}" if source else "",
                 len(self.pool.workers), self.config.workers.graceful_timeout)
        self._stop(exitcodes.OK)

    def on_stop_after_predecessor(self, source: str = "", **_) -> None:
        # We may be systemd's main process already: exiting before the predecessor drained would
        # let systemd's final SIGKILL (KillMode=mixed) cut its requests in flight.
        self.waiting_for_predecessor = True
        self.loop.after(self.config.workers.graceful_timeout + PREDECESSOR_MARGIN, self._stop_waiting)
        self.on_stop(source)

    def _stop_waiting(self) -> None:
        if self.waiting_for_predecessor:
            log.warning("the previous generation is still running after %gs; not waiting for it any more",
                        self.config.workers.graceful_timeout + PREDECESSOR_MARGIN)
            self.waiting_for_predecessor = False
            self._maybe_exit()

    def on_stop_now(self, source: str = "", **_) -> None:
        log.info("immediate stop requested%s", f" by {source}" if source else "")
        if self.succession is not None:
            self.succession.kill_now()
        self.waiting_for_predecessor = False
        self._stop(exitcodes.OK, kill=True)

    def on_forward_stop(self, source: str = "", **_) -> None:
        log.info("stop requested%s after MAINPID= was sent: it is passed on to generation %d once it is main",
                 f" by {source}" if source else "", self.number + 1)
        self.pending_stop = True

    def on_pass_stop_on(self, source: str = "", **_) -> None:
        # systemd TERMs the main process it knows; one that reaches us after the hand-over was
        # sent before systemd took MAINPID= (it may come in the same turn as BARRIER=1's answer).
        self.stop_passed = True     # and no warm window after it: the service stops
        if self.succession is not None and self.succession.signal(signal.SIGTERM):
            log.info("stop requested%s after the hand-over: it is passed on to generation %d; "
                     "this generation keeps draining", f" by {source}" if source else "", self.number + 1)

    def on_forward_stop_now(self, source: str = "", **_) -> None:
        self.on_forward_stop(source)
        self.pool.kill_all()

    def _stop(self, code: int, status: str | None = None, kill: bool = False) -> None:
        if self.state is not State.STOPPING:
            self.exit_code_pending = code
            self.systemd.send(stopping=1, status=status or f"generation {self.number} stopping")
        # STOPPING first: the failure below is handled in it (a canary's N grows nothing back).
        self.state = State.STOPPING
        if self.succession is not None and self.succession.stage is Stage.BOOTING:
            self.succession.fail("the service is stopping")
        self._answer_deferred("the service is stopping")
        self.dismiss_warm("the service stops")
        self._close_listeners()
        if kill:
            self.pool.kill_all()
        self.pool.drain()
        self._maybe_exit()

    def on_restart(self, source: str = "", **_) -> None:
        if not self.pool.recycler.restart():
            log.warning("rolling restart ignored: one is already running")

    def on_grow(self, source: str = "", **_) -> None:
        log.info("added worker %d", self.pool.add_slot().id)

    def on_shrink(self, source: str = "", **_) -> None:
        if not self.pool.remove_slot():
            log.warning("worker count stays at %d: it cannot go below 1", len(self.pool.slots))

    def _close_listeners(self) -> None:
        """Sockets cadenza bound itself (no socket unit, no fd store) are closed by a generation
        that starts no worker again, so that once its draining workers close theirs the kernel
        refuses new connections (ECONNREFUSED) at once instead of queueing them in a backlog
        nobody accepts from. systemd's sockets stay: new connections wait for the next start. A
        leaving generation's copies are its successor's too: closing them takes nothing from it."""
        if self.bound_here and not self.fd_store:
            for listener in self.listeners:
                listener.close()

    # ---- ending -------------------------------------------------------------------------

    def on_maybe_exit(self, **_) -> None:
        self._maybe_exit()

    def _maybe_exit(self) -> None:
        if self.state not in (State.STOPPING, State.LEAVING) or self.pool.pids():
            return
        if self.state is State.LEAVING and self.warm is not None and self.inherited.predecessor_fd is not None:
            return   # the warm one this upgrade told to leave still runs: the answer waits for it
        if self.state is State.LEAVING and self.can_go_warm():
            self._go_warm()
            return
        if self.state is State.LEAVING and self.pool.starter_kept:
            self.pool.drain()   # a preloader kept for a warm window that will not be goes too, then DRAINED
            return
        if self.state is State.LEAVING and self.multiproc is not None and self.multiproc.running is not None:
            # Our last merge runs on gen-N, which the successor folds (renames) once we are gone.
            self.wait_until(lambda: self.multiproc.running is None, self._maybe_exit)
            return
        if self.state is State.STOPPING:
            if self.succession is not None and self.succession.stage is not Stage.DONE and self.succession.alive():
                return   # a next generation that was told to stop is still draining
            if self.waiting_for_predecessor and self.inherited.predecessor_fd is not None:
                return   # the previous generation still drains: systemd's SIGKILL would cut it
        self.exit_code = self.exit_code_pending
        self.loop.stopped = True
        self._check_waits()

    # ---- waiting, status ----------------------------------------------------------------

    def wait_until(self, predicate: Callable[[], bool], then: Callable[[], None]) -> None:
        """Run `then` once `predicate` holds; checked after every handled event."""
        self._waits.append((predicate, then))
        self._check_waits()

    def _check_waits(self) -> None:
        done = [w for w in self._waits if w[0]()]
        self._waits = [w for w in self._waits if w not in done]
        for _, then in done:
            then()

    def _watchdog_field(self) -> dict[str, int]:
        return {"watchdog": 1} if self.watchdog_usec else {}

    def _watchdog(self) -> None:
        # Reached only when the loop turns, so a stuck master stops pinging and systemd acts.
        # A muted notifier (not main yet, or handed over) sends nothing: the duty moves with MAINPID.
        self.systemd.send(watchdog=1)
        self.loop.after(self.watchdog_usec / 2e6, self._watchdog)
