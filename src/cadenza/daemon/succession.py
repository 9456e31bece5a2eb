"""An upgrade, seen from generation N: start N+1 from the pinned launcher and follow it.

Invariants (DESIGN §4.1; the table in policy.py decides what each event does):
- At most two generations with workers: an upgrade starts only from SERVING, never while a
  predecessor drains or a failed successor stops; a warm one (warm.py) is told to leave first.
- Nothing is forked before the pre-flight passed; a refusal says why and changes nothing.
- N+1 is exec'd, by fd, from the launcher the pre-flight checked, in the *unresolved*
  `directory`: never from sys.executable or argv[0], whose release a deploy may have pruned.
- Only the main process speaks MAINPID= (NotifyAccess=main): the generation sends it after
  N+1 said "ready"; then this succession tells N+1 "appointed", and "main" once systemd took it.
- A failed N+1 is stopped gracefully (its workers may hold requests), SIGKILLed only after
  graceful_timeout, and the upgrade is over only when it is gone: `systemctl reload` then
  returns with nothing of the failed release running.
"""

from __future__ import annotations

import collections
import enum
import logging
import os
import signal
import socket
import time
from ..records import record, field
from typing import Callable

from . import handoff
from .canary import parse_figures
from .groups import signal_tree
from .loop import Loop, Timer, signal_process
from .preflight import Plan
from .process import describe_status, fork, place_fds

log = logging.getLogger("cadenza.succession")

OUTPUT_TAIL = 20


class Stage(enum.Enum):
    BOOTING = "booting"          # N+1 starts its workers
    COMMITTED = "committed"      # MAINPID= names N+1
    DONE = "handed over"
    FAILING = "failing"          # N+1 is being stopped
    GONE = "gone"


@record
class Outcome:
    ok: bool
    generation: int
    reason: str = ""
    pid: int = 0
    output: list[str] = field(default_factory=list)
    started: float = 0.0
    finished: float = 0.0

    def as_dict(self) -> dict:
        return {"ok": self.ok, "generation": self.generation, "reason": self.reason, "pid": self.pid,
                "output": self.output, "duration": round(self.finished - self.started, 3)}


class Succession:
    """One upgrade attempt. `report(name, **kw)` tells the generation what happened:
    "ready", "failed" (reason=...), "gone"."""

    def __init__(self, loop: Loop, plan: Plan, generation: int, *, timeout: float, graceful_timeout: float,
                 report: Callable[..., None]):
        self.loop = loop
        self.plan = plan
        self.generation = generation
        self.timeout = timeout
        self.graceful_timeout = graceful_timeout
        self.report = report
        self.stage = Stage.BOOTING
        self.pid = 0
        self.reason = ""
        self.progress = ""
        self.output: collections.deque[str] = collections.deque(maxlen=OUTPUT_TAIL)
        self.watchers: list[Callable[[dict], None]] = []
        self.started = time.monotonic()
        self.canary = 0                  # K: N+1 starts as a canary of K workers (canary.py)
        # True: the generation takes the failure over, and calls fail() again later (canary.py)
        self.defer_failure: Callable[[str], bool] = lambda reason: False
        self.said_ready = False          # a canary stays BOOTING after its first "ready"
        self._chan: handoff.Channel | None = None
        self._out_r: int | None = None
        self._pidfd: int | None = None
        self._timers: list[Timer] = []

    # ---- start --------------------------------------------------------------------------

    def start(self, named: list[tuple[int, str]], argv: list[str], env: dict[str, str]) -> None:
        """fork N+1; an OSError (EAGAIN, EMFILE, ENOMEM) leaves nothing behind and is raised."""
        created: list[int] = []
        mine = theirs = None
        try:
            mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            out_r, out_w = os.pipe2(os.O_CLOEXEC)
            created += [out_r, out_w]
            me = os.pidfd_open(os.getpid())
            created.append(me)
            fds = [fd for fd, _ in named] + [theirs.fileno(), 2, me, self.plan.exec_fd]
            self.pid, self._pidfd = _spawn_orphan(
                self.loop, lambda: _become_next(self.plan, argv, env, fds, out_w))
        except BaseException:
            for fd in created:
                _close(fd)
            for sock in (mine, theirs):
                if sock is not None:
                    sock.close()
            raise
        theirs.close()
        _close(out_w)
        _close(me)
        self._chan, self._out_r = handoff.Channel(mine), out_r
        os.set_blocking(out_r, False)
        self.loop.add_reader(self._chan, self._on_channel)
        self.loop.add_reader(out_r, self._on_output)
        self.loop.add_reader(self._pidfd, self._on_exit)
        self._timers.append(self.loop.after(self.timeout, self._on_timeout))
        self.emit("started", f"generation {self.generation} started (pid {self.pid}) from {self.plan.exec_path} "
                             f"in {self.plan.directory} -> {self.plan.release}")

    @classmethod
    def adopt(cls, loop: Loop, generation: int, plan, pid: int, channel: handoff.Channel, pidfd: int, *,
              timeout: float, graceful_timeout: float, report: Callable[..., None]) -> Succession:
        """A rollback (warm.py): the warm predecessor, already running, is followed as an upgrade's N+1."""
        succession = cls(loop, plan, generation, timeout=timeout, graceful_timeout=graceful_timeout, report=report)
        succession.pid = pid
        succession._chan, succession._pidfd = channel, pidfd
        return succession

    def watch(self) -> None:
        """An adopted one: its channel and pidfd are ours now (after the caller let them go)."""
        self.loop.add_reader(self._chan, self._on_channel)
        self.loop.add_reader(self._pidfd, self._on_exit)
        self._timers.append(self.loop.after(self.timeout, self._on_timeout))

    def has_channel(self) -> bool:
        return self._chan is not None and not self._chan.closed

    def detach(self) -> tuple[handoff.Channel, int]:
        """The kept channel and N+1's pidfd of a generation going warm, no longer watched here."""
        channel, pidfd, self._chan, self._pidfd = self._chan, self._pidfd, None, None
        self.loop.remove(channel)
        self.loop.remove(pidfd)
        return channel, pidfd

    # ---- what N+1 does ------------------------------------------------------------------

    def emit(self, event: str, text: str, **extra) -> None:
        log.info("upgrade: %s", text)
        message = {"event": event, "text": text, "generation": self.generation, **extra}
        for watcher in list(self.watchers):
            watcher(message)

    def _on_output(self) -> bool:
        """Relay what N+1 wrote; False when there is nothing more to read now."""
        if self._out_r is None:
            return False
        try:
            data = os.read(self._out_r, 65536)
        except BlockingIOError:
            return False
        if not data:
            self._close_output()
            return False
        try:
            os.write(2, data)   # relayed as is: N+1's lines are already formatted for the journal
        except OSError:
            pass
        self.output.extend(data.decode(errors="replace").splitlines())
        return True

    def _close_output(self) -> None:
        if self._out_r is not None:
            self.loop.remove(self._out_r)
            _close(self._out_r)
            self._out_r = None

    def _on_channel(self) -> None:
        lines, gone = self._chan.receive()
        for line in lines:
            verb, _, text = line.partition(" ")
            if verb == "progress":
                self.progress = text[:200]
                self.emit("progress", f"generation {self.generation}: {self.progress}")
            elif verb == "ready" and self.stage is Stage.BOOTING:
                if text.isdigit() and not self.said_ready:   # a canary: the workers it started
                    self.canary = min(self.canary, int(text)) if self.canary else 0
                self.said_ready = True
                self.emit("ready", f"generation {self.generation} ready")
                self.report("ready")
            elif verb == "failed":
                self.fail(text[:2000])
            elif verb == "figures" and self.stage is Stage.BOOTING:
                self.report("figures", figures=parse_figures(text))
            elif verb == "grown" and self.stage is Stage.BOOTING and text.split(" ")[0].isdigit():
                # Each new worker of a promoted canary has upgrade.timeout of its own (one at a time).
                self.hold()
                self._timers.append(self.loop.after(self.timeout, self._on_timeout))
                grown, _, count = text.partition(" ")
                self.report("grown", workers=int(grown), count=int(count) if count.isdigit() else 0)
        if gone:
            self._close_channel()
            if self.stage is Stage.BOOTING:
                self.fail(f"generation {self.generation} closed the hand-off channel"
                          + ("" if self.said_ready else " before it was ready"))

    def _close_channel(self) -> None:
        if self._chan is not None:
            self.loop.remove(self._chan)
            self._chan.close()
            self._chan = None

    def _on_exit(self) -> None:
        # The pidfd is readable: N+1's master has exited (not our child: it has no status for us).
        self.loop.remove(self._pidfd)
        _close(self._pidfd)
        self._pidfd = None
        while self._on_output():
            pass
        if self.stage is Stage.BOOTING:
            self.fail(f"generation {self.generation} (pid {self.pid}) exited"
                      + ("" if self.said_ready else " before it was ready"))
        log.info("generation %d (pid %d) exited", self.generation, self.pid)
        self._cleanup()
        if self.stage is not Stage.DONE:
            self.stage = Stage.GONE
        self.report("gone")

    def _on_timeout(self) -> None:
        if self.stage is Stage.BOOTING:
            self.fail(f"generation {self.generation} was not ready within {self.timeout:g}s (upgrade.timeout)")

    def alive(self) -> bool:
        return self._pidfd is not None

    def signal(self, sig: int) -> bool:
        """Signal N+1's master through its pidfd (never a reused pid); False once it is gone."""
        if self._pidfd is None:
            return False
        try:
            signal.pidfd_send_signal(self._pidfd, sig)
        except ProcessLookupError:
            return False
        return True

    # ---- what N decides -----------------------------------------------------------------

    def fail(self, reason: str) -> None:
        """Stop N+1 gracefully; the upgrade is over once it is gone (report "gone")."""
        if self.stage is not Stage.BOOTING or self.defer_failure(reason):
            return
        self.stage = Stage.FAILING
        self.reason = reason
        log.error("upgrade to generation %d failed: %s; stopping it", self.generation, reason)
        if self._chan is None or not self._chan.send("stop"):
            signal_process(self.pid, signal.SIGTERM)
        self._timers.append(self.loop.after(self.graceful_timeout, self._kill))
        self.report("failed", reason=reason)

    def _kill(self) -> None:
        if self.alive():
            log.warning("generation %d (pid %d) still running %gs after it was told to stop; killing it",
                        self.generation, self.pid, self.graceful_timeout)
            signal_tree(self.pid, signal.SIGKILL)   # its workers lead groups of their own

    def kill_now(self) -> None:
        """An immediate stop before the commit: N+1 goes with us."""
        if self.stage in (Stage.BOOTING, Stage.FAILING) and self.alive():
            self.stage = Stage.FAILING
            self.reason = self.reason or "the service was stopped immediately (SIGINT)"
            signal_tree(self.pid, signal.SIGKILL)

    def hold(self) -> None:
        """A canary is judged: upgrade.timeout does not run meanwhile."""
        for timer in self._timers:
            timer.cancel()
        self._timers.clear()

    def ask(self, line: str) -> None:
        if self._chan is not None:
            self._chan.send(line)

    def promote(self) -> None:
        """The canary passed: it grows, and has upgrade.timeout again to be ready."""
        self.ask("grow")
        self._timers.append(self.loop.after(self.timeout, self._on_timeout))

    def appointed(self) -> None:
        self.stage = Stage.COMMITTED
        if self._chan is not None:
            self._chan.send("appointed")
        self.emit("committed", f"MAINPID={self.pid} sent: generation {self.generation} is main once "
                               "systemd has taken it (BARRIER=1)", pid=self.pid)

    def hand_over(self, stop: bool, totals: str = "{}", keep: bool = False) -> bool:
        """Tell N+1 it is main (and to stop, when a stop reached us in the barrier window), with
        the service-wide counters it carries on (metrics.py); `keep`: we stay warm (warm.py), so
        the channel stays open."""
        lines = [f"totals {totals}", *(["keep"] if keep else []), "main", *(["stop"] if stop else [])]
        told = self._chan is not None and self._chan.send(*lines)
        self.stage = Stage.DONE
        self._cleanup(keep_pidfd=True, keep_channel=keep)
        self.emit("mainpid", f"MAINPID handed over to generation {self.generation} (pid {self.pid})",
                  pid=self.pid)
        return told

    def _cleanup(self, keep_pidfd: bool = False, keep_channel: bool = False) -> None:
        for timer in self._timers:
            timer.cancel()
        if not keep_channel:
            self._close_channel()
        self._close_output()
        if not keep_pidfd and self._pidfd is not None:
            self.loop.remove(self._pidfd)
            _close(self._pidfd)
            self._pidfd = None

    def outcome(self, ok: bool, reason: str = "") -> Outcome:
        return Outcome(ok, self.generation, reason, self.pid, list(self.output), self.started, time.monotonic())


def _spawn_orphan(loop: Loop, become) -> tuple[int, int]:
    """fork twice so that the new master is an orphan, adopted by PID 1 (systemd), and return its
    pid and a pidfd. Under systemd this matters: MAINPID= naming a process that is *not* systemd's
    child makes it "alien" (service_set_main_pid), and on `systemctl stop` systemd then cannot
    wait for it and SIGKILLs the whole unit at once instead of letting it drain.
    The middle process is reaped by the loop like every other child."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
    try:
        middle = fork()
        if middle == 0:
            try:
                ours.close()
                pid = fork()
                if pid == 0:
                    theirs.close()
                    become()
                # Our child cannot be reaped (so its pid not reused) until we exit: the pidfd is safe.
                socket.send_fds(theirs, [str(pid).encode()], [os.pidfd_open(pid)])
            except BaseException as exc:  # noqa: BLE001 - in the child every error must end in _exit
                try:
                    theirs.send(f"error {getattr(exc, 'strerror', None) or exc}".encode())
                finally:
                    os._exit(71)
            os._exit(0)
        loop.watch_child(middle, lambda status: None)
        theirs.close()
        ours.settimeout(10)   # the middle process only forks and sends: microseconds
        # MSG_CMSG_CLOEXEC: the pidfd must not leak into the workers we start later.
        data, fds, _, _ = socket.recv_fds(ours, 256, 1, socket.MSG_CMSG_CLOEXEC)
    finally:
        ours.close()
    text = data.decode(errors="replace")
    for fd in fds:
        os.set_inheritable(fd, False)   # belt and braces over MSG_CMSG_CLOEXEC: it must not reach a worker
    if not fds:
        raise OSError(f"the next master could not be forked: {text.removeprefix('error ') or 'no answer'}")
    return int(text), fds[0]


def _become_next(plan: Plan, argv: list[str], env: dict[str, str], fds: list[int], out_w: int) -> None:
    try:
        signal.set_wakeup_fd(-1)
        for sig in range(1, signal.NSIG):
            if sig in (signal.SIGKILL, signal.SIGSTOP):
                continue
            try:
                signal.signal(sig, signal.SIG_DFL)
            except (OSError, ValueError):
                pass
        signal.pthread_sigmask(signal.SIG_SETMASK, [])
        os.setpgid(0, 0)   # its own group: a failed upgrade that will not stop is killed with its tree
        place_fds(fds)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(out_w, 1)
        os.dup2(out_w, 2)
        os.chdir(plan.directory)
        env["LISTEN_PID"] = str(os.getpid())
        if "WATCHDOG_USEC" in env:
            env["WATCHDOG_PID"] = str(os.getpid())
        exec_fd = 3 + len(fds) - 1     # place_fds put the checked launcher last
        os.execve(exec_fd, [plan.exec_path, *argv], env)
    except BaseException as exc:  # noqa: BLE001 - in the child every error must end in _exit
        os.write(2, f"cadenza: cannot exec {plan.exec_path}: {exc}\n".encode())
    os._exit(127)


def _close(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass


__all__ = ["Succession", "Stage", "Outcome", "describe_status"]
