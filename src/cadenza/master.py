"""The master of one generation: one thread, one selector loop.

Invariants:
- Signal handlers only wake the loop (set_wakeup_fd); all work happens in the loop.
- Every child is reaped in `_reap`, which hands the pid and its status to the owner registered
  in `self.children` (a worker). The next generation's master is not our child (see
  succession._spawn_orphan): its exit arrives through a pidfd.
- systemd hears READY=1 only when every worker slot holds a ready worker, and STATUS= always
  says the generation and how many workers are ready.
- The master never imports application code: workers are exec'd programs.
"""

from __future__ import annotations

import logging
import os
import selectors
import signal
import socket
import time
from dataclasses import dataclass
from typing import Callable

from .control import commands
from .control import server as control
from . import workers as W
from .config import Config
from .listeners import Listener, unix_paths
from .notify import Notifier, NotifyInbox, monotonic_usec
from .succession import Heir, Outcome, Succession, UpgradeRefused, preflight
from .timers import Timer, Timers

log = logging.getLogger("cadenza.master")

EXIT_OK = 0
EXIT_START_FAILED = 75   # sysexits EX_TEMPFAIL: the workers did not become ready
HEIR_MAX_FAILURES = 5    # failed worker starts in a row that end an upgrade early
HANDLED_SIGNALS = (signal.SIGTERM, signal.SIGQUIT, signal.SIGINT, signal.SIGHUP, signal.SIGUSR2,
                   signal.SIGTTIN, signal.SIGTTOU, signal.SIGCHLD, signal.SIGUSR1, signal.SIGALRM)


@dataclass
class Slot:
    """One place for a worker: its current process and, during a rolling restart, the next one."""
    id: int
    worker: W.Worker | None = None
    incoming: W.Worker | None = None
    failures: int = 0
    restarts: int = 0
    respawn: Timer | None = None
    last_death: str = ""


class Master:
    def __init__(self, config: Config, listeners: list[Listener], notifier: Notifier, *,
                 generation: int = 1, release: str | None = None, bound_here: bool = True,
                 heir: Heir | None = None, argv: list[str] | None = None,
                 control: socket.socket | None = None, control_owned: bool = True,
                 fd_store: bool = False):
        self.config = config
        self.listeners = listeners
        self.systemd = notifier
        self.generation = generation
        self.release = release or os.getcwd()
        self.bound_here = bound_here
        self.name = config.app.name
        self.state = "starting"            # starting -> serving -> leaving (handed over) | stopping
        self.heir = heir                   # our channel to the predecessor, until we are main
        self.argv = argv or ["run"]        # how the next generation is started from exec_path
        self.control_sock = control
        self.control_owned = control_owned
        self.fd_store = fd_store           # our sockets were offered to systemd's fd store
        self.succession: Succession | None = None
        self.last_upgrade: Outcome | None = None
        self._aborted: Succession | None = None   # an upgrade aborted by a stop: it drains with us
        self.control: control.ControlServer | None = None
        self._waits: list[tuple[Callable[[], bool], Callable[[], None]]] = []
        if heir is not None:
            notifier.muted = True
        self.exit_code: int | None = None
        self.timers = Timers()
        self.selector = selectors.DefaultSelector()
        self.inbox = NotifyInbox(f"{self.name}/gen{generation}")
        self.slots: dict[int, Slot] = {}
        self.workers: dict[int, W.Worker] = {}       # every live worker process, by pid
        self.children: dict[int, Callable[[int], None]] = {}
        self.rolling: list[int] = []                 # slot ids still to restart (HUP)
        self.started = time.monotonic()
        self._last_status = ""
        self._kill_timer: Timer | None = None
        self._pending_exit = EXIT_OK
        self._wake_r, self._wake_w = socket.socketpair()
        self.watchdog_usec = _watchdog_usec()
        self._watchdog_interval = self.watchdog_usec / 2e6

    # ---- loop -------------------------------------------------------------------------------

    def run(self) -> int:
        self._install_signals()
        self.selector.register(self._wake_r, selectors.EVENT_READ, self._on_wakeup)
        self.selector.register(self.inbox.sock, selectors.EVENT_READ, self._on_notify)
        if self.control_sock is not None and self.heir is None:
            self._serve_control()
        log.info("generation %d starting %d worker(s) in %s on %s", self.generation,
                 self.config.workers.count, self.release, ", ".join(l.describe() for l in self.listeners))
        for slot_id in range(1, self.config.workers.count + 1):
            self._add_slot(slot_id)
        self.timers.after(self.config.workers.ready_timeout, self._start_deadline)
        if self.heir is not None:
            self.selector.register(self.heir.chan, selectors.EVENT_READ, self._on_heir_channel)
        if self._watchdog_interval:
            self.timers.after(self._watchdog_interval, self._watchdog)
        self._publish_status()
        while self.exit_code is None:
            for key, _ in self.selector.select(self.timers.timeout()):
                # A handler earlier in this batch may have closed this fd (an upgrade that
                # failed closes its channel and its output pipe at once): skip it then.
                if self.selector.get_map().get(key.fd) is key:
                    self._dispatch(key.data)
            self.timers.fire_due()
        self._check_waits()
        self._cleanup()
        return self.exit_code

    def _serve_control(self) -> None:
        """Only the main master answers the control socket: both generations hold it during an
        upgrade, and a request must reach the one that can act on it."""
        c = self.config.control
        self.control = control.ControlServer(self, self.control_sock,
                                             control.Access(c.allow_users, c.allow_groups, c.status_groups))

    def _dispatch(self, handler: Callable[[], None]) -> None:
        try:
            handler()
        except Exception:
            # One bad event must not take the service down with the master: log it loudly.
            log.exception("internal error while handling an event; the master carries on")

    def _install_signals(self) -> None:
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        signal.set_wakeup_fd(self._wake_w.fileno(), warn_on_full_buffer=False)
        for sig in HANDLED_SIGNALS:
            signal.signal(sig, _wake_only)

    def _on_wakeup(self) -> None:
        try:
            data = self._wake_r.recv(4096)
        except BlockingIOError:
            return
        for signum in data:
            handler = self.SIGNAL_ACTIONS.get(signum)
            if handler is None:
                log.error("internal error: signal %d woke the loop but has no action", signum)
                continue
            handler(self)

    def _on_notify(self) -> None:
        for pid, fields in self.inbox.receive():
            worker = self.workers.get(pid)
            if worker is None:
                log.debug("ignored notification from pid %d, not a worker of this generation", pid)
                continue
            if "STATUS" in fields:
                worker.status = fields["STATUS"]
            if fields.get("READY") == "1" and self.config.workers.ready.kind == "notify":
                self._worker_ready(worker)
            if fields.get("WATCHDOG") == "1" and self.config.workers.watchdog:
                first = worker.last_ping is None
                worker.last_ping = time.monotonic()
                if first:
                    self.timers.after(self.config.workers.watchdog, lambda w=worker: self._worker_watchdog(w))

    # ---- workers ----------------------------------------------------------------------------

    def _add_slot(self, slot_id: int) -> None:
        slot = Slot(slot_id)
        self.slots[slot_id] = slot
        slot.worker = self._spawn(slot)

    def _argv(self) -> list[str]:
        w = self.config.workers
        return list(w.command) if w.command else W.builtin_argv(w.app)

    def _spawn(self, slot: Slot) -> W.Worker | None:
        extra = {"CADENZA_GRACEFUL_TIMEOUT": str(self.config.workers.graceful_timeout)}
        if self.config.workers.watchdog:
            extra["WATCHDOG_USEC"] = str(int(self.config.workers.watchdog * 1e6))
        pid = W.spawn(self._argv(), worker_id=slot.id, generation=self.generation, app_name=self.name,
                      listeners=self.listeners, notify_address=self.inbox.address, cwd=self.release,
                      extra_env=extra, output_fd=self.heir.log_fd if self.heir is not None else None)
        worker = W.Worker(slot.id, pid, self.generation, restarts=slot.restarts)
        self.workers[pid] = worker
        self.children[pid] = lambda status, w=worker: self._worker_exited(w, status)
        ready = self.config.workers.ready
        if ready.kind == "spawn":
            self._worker_ready(worker)
        else:
            if ready.kind == "uptime":
                self.timers.after(ready.seconds, lambda: self._uptime_reached(worker))
            self.timers.after(self.config.workers.ready_timeout, lambda: self._ready_deadline(worker))
        log.info("worker %d started (pid %d)", slot.id, pid)
        return worker

    def _uptime_reached(self, worker: W.Worker) -> None:
        if self.workers.get(worker.pid) is worker:
            self._worker_ready(worker)

    def _ready_deadline(self, worker: W.Worker) -> None:
        if self.workers.get(worker.pid) is worker and worker.state == "booting":
            worker.failure = f"not ready within {self.config.workers.ready_timeout:g}s"
            log.error("worker %d (pid %d) %s; killing it", worker.id, worker.pid, worker.failure)
            _kill(worker.pid, signal.SIGKILL)

    def _worker_watchdog(self, worker: W.Worker) -> None:
        """A worker that once said WATCHDOG=1 must keep saying it (sd_watchdog_enabled(3))."""
        if self.workers.get(worker.pid) is not worker or worker.state == "stopping":
            return
        timeout = self.config.workers.watchdog
        silent = time.monotonic() - worker.last_ping
        if silent < timeout:
            self.timers.after(timeout - silent, lambda: self._worker_watchdog(worker))
            return
        worker.failure = f"sent no WATCHDOG=1 for {silent:.1f}s (workers.watchdog = {timeout:g})"
        log.error("worker %d (pid %d) %s; killing it", worker.id, worker.pid, worker.failure)
        _kill(worker.pid, signal.SIGKILL)

    def _worker_ready(self, worker: W.Worker) -> None:
        if worker.state != "booting":
            return
        worker.state = "ready"
        worker.ready_at = time.monotonic()
        slot = self.slots.get(worker.id)
        log.info("worker %d (pid %d) ready after %.2fs", worker.id, worker.pid, worker.age())
        if slot is not None and slot.incoming is worker:
            self._finish_roll(slot)
        if self.state == "starting" and self.heir is not None:
            self.heir.say(f"progress workers ready {self.ready_count()}/{len(self.slots)}")
        self._check_all_ready()
        self._publish_status()

    def _worker_exited(self, worker: W.Worker, status: int) -> None:
        del self.workers[worker.pid]
        how = worker.failure or W.describe_status(status)
        if worker.state == "booting" and worker.status:
            how += f" ({worker.status})"
        slot = self.slots.get(worker.id)
        if worker.state == "stopping" or slot is None or self.state == "stopping":
            log.info("worker %d (pid %d) %s", worker.id, worker.pid, W.describe_status(status))
        elif slot.incoming is worker:
            slot.incoming = None
            log.error("replacement for worker %d %s before it was ready; rolling restart abandoned",
                      worker.id, how)
            self.rolling.clear()
        elif slot.worker is worker:
            self._respawn_later(slot, worker, how)
        self._publish_status()
        self._maybe_exit()

    def _respawn_later(self, slot: Slot, worker: W.Worker, how: str) -> None:
        slot.worker = None
        stable = worker.ready_at is not None and time.monotonic() - worker.ready_at >= W.STABLE_AFTER
        slot.failures = 0 if stable else slot.failures + 1
        slot.restarts += 1
        delay = W.backoff_delay(slot.failures)
        slot.last_death = f"worker {slot.id} {how}"
        if slot.failures:
            slot.last_death += f", retry in {delay:.1f}s ({slot.failures} failed start(s) in a row)"
        log.warning("worker %d (pid %d) %s; respawning in %.1fs", slot.id, worker.pid, how, delay)
        if self.heir is not None and self.state == "starting" and slot.failures >= HEIR_MAX_FAILURES:
            # A new release whose workers crash at every start fails its upgrade now, not after
            # upgrade.timeout: the old generation is still serving and the operator is waiting.
            self._give_up(f"worker {slot.id} {how}; {slot.failures} failed starts in a row")
            return
        slot.respawn = self.timers.after(delay, lambda: self._respawn(slot))

    def _respawn(self, slot: Slot) -> None:
        if self.state != "stopping" and self.slots.get(slot.id) is slot and slot.worker is None:
            slot.worker = self._spawn(slot)
            self._publish_status()

    def _stop_worker(self, worker: W.Worker, sig: int = signal.SIGTERM) -> None:
        worker.state = "stopping"
        _kill(worker.pid, sig)

    def ready_count(self) -> int:
        return sum(1 for s in self.slots.values() if s.worker is not None and s.worker.state == "ready")

    def _check_all_ready(self) -> None:
        if self.state == "starting" and self.ready_count() == len(self.slots):
            self.state = "serving"
            log.info("generation %d serving: %d/%d workers ready after %.2fs", self.generation,
                     len(self.slots), len(self.slots), time.monotonic() - self.started)
            if self.heir is not None and not self.heir.main:
                self.heir.ready()     # master N now tells systemd MAINPID=us, then says "main"
            else:
                self.systemd.send(ready=1, status=self.status_text(), **self._watchdog_field())

    def _start_deadline(self) -> None:
        if self.state != "starting":
            return
        reason = (f"{self.ready_count()}/{len(self.slots)} workers ready after "
                  f"{self.config.workers.ready_timeout:g}s")
        deaths = [s.last_death for s in self.slots.values() if s.last_death]
        if deaths:
            reason += f" (last: {deaths[-1]})"
        self._give_up(reason)

    def _give_up(self, why: str) -> None:
        reason = f"generation {self.generation} start failed: {why}"
        log.error("%s", reason)
        if self.heir is not None:
            self.heir.say(f"failed {reason}")
        self._begin_stop(signal.SIGKILL, exit_code=EXIT_START_FAILED, status=reason)

    # ---- signals ----------------------------------------------------------------------------

    def on_term(self) -> None:
        if self.state == "leaving":
            log.info("stop requested while leaving: still draining")
        elif self.state != "stopping":
            log.info("graceful stop requested: draining %d worker(s), up to %gs",
                     len(self.workers), self.config.workers.graceful_timeout)
            self._begin_stop(signal.SIGTERM, exit_code=EXIT_OK)

    def on_int(self) -> None:
        log.info("immediate stop requested")
        self._begin_stop(signal.SIGKILL, exit_code=EXIT_OK)

    def on_hup(self) -> None:
        if self.state != "serving" or self.rolling:
            log.warning("rolling restart ignored: generation is %s%s", self.state,
                        " and a rolling restart is running" if self.rolling else "")
            return
        self.rolling = sorted(self.slots)
        log.info("rolling restart of %d worker(s)", len(self.rolling))
        self._roll_next()

    def on_ttin(self) -> None:
        if self.state == "stopping":
            return
        slot_id = max(self.slots, default=0) + 1
        log.info("adding worker %d", slot_id)
        self._add_slot(slot_id)
        self._publish_status()

    def on_ttou(self) -> None:
        if self.state == "stopping" or len(self.slots) <= 1:
            log.warning("worker count stays at %d: it cannot go below 1", len(self.slots))
            return
        slot = self.slots.pop(max(self.slots))
        log.info("removing worker %d", slot.id)
        if slot.respawn:
            slot.respawn.cancel()
        for worker in (slot.worker, slot.incoming):
            if worker is not None:
                self._stop_worker(worker)
        if slot.id in self.rolling:
            self.rolling.remove(slot.id)
        self._check_all_ready()
        self._publish_status()

    def on_usr2(self) -> None:
        self.request_upgrade("SIGUSR2")

    def on_chld(self) -> None:
        self._reap()

    def on_unexpected(self) -> None:
        # Their default action would end the master (and with it the service): never.
        log.warning("ignored SIGUSR1/SIGALRM: cadenza gives them no meaning")

    SIGNAL_ACTIONS = {signal.SIGTERM: on_term, signal.SIGQUIT: on_term, signal.SIGINT: on_int,
                      signal.SIGHUP: on_hup, signal.SIGTTIN: on_ttin, signal.SIGTTOU: on_ttou,
                      signal.SIGUSR2: on_usr2, signal.SIGCHLD: on_chld,
                      signal.SIGUSR1: on_unexpected, signal.SIGALRM: on_unexpected}

    # ---- upgrades ---------------------------------------------------------------------------

    def request_upgrade(self, source: str, watcher=None) -> Succession | None:
        """Start an upgrade, or join the one running; None (and `watcher` told why) if refused."""
        if self.succession is not None:
            log.info("upgrade requested by %s: joining the upgrade to generation %d already running",
                     source, self.succession.generation)
            if watcher:
                self.succession.watchers.append(watcher)
            return self.succession
        try:
            if self.state != "serving" or (self.heir is not None and not self.heir.main):
                raise UpgradeRefused(f"generation {self.generation} is {self.state}"
                                     f"{'' if self.heir is None or self.heir.main else ' and not main yet'}; "
                                     "only a serving generation can start the next one")
            plan = preflight(self.config, self.argv)
        except UpgradeRefused as exc:
            log.error("upgrade requested by %s refused: %s", source, exc)
            self.last_upgrade = Outcome(False, self.generation + 1, f"refused: {exc}",
                                        started=time.monotonic(), finished=time.monotonic())
            if watcher:
                watcher({"event": "refused", "text": f"upgrade refused: {exc}", "generation": self.generation + 1})
            return None
        nxt = self.generation + 1
        log.info("upgrade requested by %s: pre-flight passed, starting generation %d", source, nxt)
        self.systemd.send(reloading=1, monotonic_usec=monotonic_usec(), status=f"upgrading to generation {nxt}")
        self.succession = Succession(self, plan, nxt, self.config.upgrade.timeout)
        if watcher:
            self.succession.watchers.append(watcher)
        self.succession.emit("preflight", f"pre-flight passed: {plan.exec_path} in {plan.directory} "
                                          f"-> {plan.release}")
        self.succession.start(self.listeners, self.control_sock, self.argv)
        return self.succession

    def succession_done(self, outcome: Outcome) -> None:
        self.last_upgrade = outcome
        succession, self.succession = self.succession, None
        if self.state == "stopping":
            self._aborted = succession
            self._maybe_exit()
            return
        if not outcome.ok:
            status = f"upgrade to generation {outcome.generation} failed: {outcome.reason.splitlines()[0]}"
            self._last_status = status
            self.systemd.send(ready=1, status=status)
            return
        log.info("handed over to generation %d (pid %d); draining %d worker(s)", outcome.generation,
                 outcome.pid, len(self.workers))
        self.systemd.muted = True      # not main any more: systemd would refuse what we said
        self.state = "leaving"
        if self.control is not None:
            self.control.stop_accepting()   # new requests go to the new main; ours finish
        self._drain(signal.SIGTERM)

    def successor_exited(self, succession: Succession) -> None:
        if succession is self._aborted:
            self._maybe_exit()

    def _on_heir_channel(self) -> None:
        what = self.heir.read()
        if what is not None:
            # Whatever came is the channel's last word: main, stop, or the predecessor is gone.
            self.selector.unregister(self.heir.chan)
            self.heir.close()
        if what == "main":
            self.systemd.muted = False
            log.info("generation %d is main", self.generation)
            if self.control_sock is not None:
                self._serve_control()
            self.last_upgrade = Outcome(True, self.generation, "became main", os.getpid(), [],
                                        self.started, time.monotonic())
            self._last_status = ""
            self._publish_status()
            if self._watchdog_interval:
                self.systemd.send(watchdog=1)
        elif what == "stop":
            log.info("the service is stopping during the upgrade: generation %d stops too", self.generation)
            self._begin_stop(signal.SIGTERM, exit_code=EXIT_OK)
        elif what == "closed":
            if not self.heir.main and self.state != "stopping":
                log.error("the previous generation went away before making generation %d main; stopping",
                          self.generation)
                self._begin_stop(signal.SIGTERM, exit_code=1)

    # ---- control commands (control.py decided who may ask; commands.py says what they do) --

    def wait_until(self, predicate: Callable[[], bool], then: Callable[[], None]) -> None:
        """Run `then` once `predicate` holds; checked after every change of state."""
        self._waits.append((predicate, then))
        self._check_waits()

    def _check_waits(self) -> None:
        done = [w for w in self._waits if w[0]()]
        self._waits = [w for w in self._waits if w not in done]
        for _, then in done:
            then()

    def control_command(self, client, cmd: str, request: dict) -> None:
        commands.run(self, client, cmd, request)

    # ---- rolling restart --------------------------------------------------------------------

    def _roll_next(self) -> None:
        while self.rolling:
            slot = self.slots.get(self.rolling[0])
            if slot is None or slot.worker is None:
                self.rolling.pop(0)
                continue
            slot.incoming = self._spawn(slot)
            return
        log.info("rolling restart done")

    def _finish_roll(self, slot: Slot) -> None:
        old, slot.worker, slot.incoming = slot.worker, slot.incoming, None
        if old is not None:
            self._stop_worker(old)
        if self.rolling and self.rolling[0] == slot.id:
            self.rolling.pop(0)
        self._roll_next()

    # ---- stopping ---------------------------------------------------------------------------

    def _begin_stop(self, sig: int, exit_code: int, status: str | None = None) -> None:
        first = self.state != "stopping"
        if first:
            self._pending_exit = exit_code
            # A failed start keeps its reason as the unit's last STATUS= (`systemctl status`).
            self.systemd.send(stopping=1, status=status or f"generation {self.generation} stopping")
        if self.succession is not None:
            self.succession.abort(sig)
        self.state = "stopping"
        self._drain(sig)

    def _drain(self, sig: int) -> None:
        self.rolling.clear()
        for slot in self.slots.values():
            if slot.respawn:
                slot.respawn.cancel()
        for worker in list(self.workers.values()):
            self._stop_worker(worker, sig)
        if self._kill_timer is None:
            self._kill_timer = self.timers.after(self.config.workers.graceful_timeout, self._kill_stragglers)
        self._maybe_exit()

    def _kill_stragglers(self) -> None:
        for worker in self.workers.values():
            log.warning("worker %d (pid %d) still running after %gs; killing it", worker.id, worker.pid,
                        self.config.workers.graceful_timeout)
            _kill(worker.pid, signal.SIGKILL)
        if self._aborted is not None and self._aborted.alive():
            os.killpg(self._aborted.pid, signal.SIGKILL)

    def _maybe_exit(self) -> None:
        if self.state not in ("stopping", "leaving") or self.workers:
            return
        if self.state == "stopping" and self._aborted is not None and self._aborted.alive():
            return   # an aborted next generation is still draining
        self.exit_code = self._pending_exit
        self._check_waits()

    def _cleanup(self) -> None:
        signal.set_wakeup_fd(-1)
        # Socket paths go with the last generation only: never with one that hands over, nor
        # with a new one that failed before it was main (the old one still serves on them).
        # Nor when systemd's fd store may hand the same sockets to the next start: their paths
        # must still lead to them (a stale path is replaced at the next bind anyway).
        last = self.state == "stopping" and (self.heir is None or self.heir.main) and not self.fd_store
        if self.control is not None:
            self.control.close()
            if last and self.control_owned:
                _unlink(self.control_sock.getsockname())
        if self.bound_here and last:
            for path in unix_paths(self.listeners):
                try:
                    os.unlink(path)
                except OSError:
                    pass
        log.info("generation %d stopped", self.generation)

    # ---- reaping ----------------------------------------------------------------------------

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            owner = self.children.pop(pid, None)
            if owner is None:
                log.debug("reaped pid %d, not ours to track", pid)
            else:
                owner(status)

    # ---- what systemd and operators see -----------------------------------------------------

    def status_text(self) -> str:
        text = f"generation {self.generation} {self.state}: {self.ready_count()}/{len(self.slots)} workers ready"
        waiting = [s.last_death for s in self.slots.values() if s.worker is None and s.last_death]
        if waiting:
            text += "; " + waiting[0]
        if self.rolling:
            text += "; rolling restart"
        return text

    def _publish_status(self) -> None:
        self._check_waits()
        text = self.status_text()
        if text != self._last_status and self.state in ("starting", "serving"):
            self._last_status = text
            self.systemd.send(status=text)

    def _watchdog_field(self) -> dict[str, int]:
        return {"watchdog": 1} if self._watchdog_interval else {}

    def _watchdog(self) -> None:
        # Reached only when the loop turns, so a stuck master stops pinging and systemd acts.
        # A muted notifier (not main yet, or handed over) sends nothing: the duty moves with MAINPID.
        self.systemd.send(watchdog=1)
        self.timers.after(self._watchdog_interval, self._watchdog)


def _unlink(path) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def _wake_only(signum, frame) -> None:
    """Signals only wake the loop: set_wakeup_fd has already written the number."""


def _kill(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _watchdog_usec() -> int:
    usec = os.environ.pop("WATCHDOG_USEC", None)
    pid = os.environ.pop("WATCHDOG_PID", None)
    if not usec or (pid and pid != str(os.getpid())):
        return 0
    try:
        return max(int(usec), 0)
    except ValueError:
        return 0
