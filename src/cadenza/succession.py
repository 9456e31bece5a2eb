"""Upgrades: generation N hands the service to generation N+1 (DESIGN §4).

Invariants:
- At most two generations exist, and at most one of them is not ready.
- One upgrade at a time: a request during an upgrade joins it and hears its outcome.
- Nothing is forked before the pre-flight passed; a refusal says why and changes nothing.
- The new master is exec'd from the pinned `exec_path` in the *unresolved* `directory`: never
  from sys.executable or argv[0], whose release a deploy may have pruned.
- Only the main process speaks MAINPID= (NotifyAccess=main): master N sends it, after N+1
  said "ready" and before N+1 is told "you are main". Until then N+1 says nothing to systemd.
- On any failure N+1's whole process group is killed and N keeps serving.

The channel between the two masters is a socketpair (CADENZA_HANDOFF_FD) carrying lines:
N+1 -> N: "progress TEXT", "ready", "failed REASON";  N -> N+1: "main", or "stop" when the
service stops during the upgrade.
N+1's own output goes through a pipe to N until it is ready, so a failed upgrade can report
its last lines; its workers write straight to the service's log (CADENZA_LOG_FD).
"""

from __future__ import annotations

import collections
import logging
import os
import signal
import socket
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from . import config as C
from .listeners import Listener
from .trust import config_problems, unsafe_reason
from .workers import PRIVATE_VARIABLES, describe_status, fork, place_fds

log = logging.getLogger("cadenza.succession")

CONTROL_FDNAME = "cadenza-control"
OUTPUT_TAIL = 20
BARRIER_TIMEOUT = 2.0


class UpgradeRefused(Exception):
    """The pre-flight failed: nothing was started, the running generation keeps serving."""


@dataclass
class Plan:
    exec_path: str
    directory: str          # unresolved, the new master's cwd
    release: str            # what `directory` resolves to now
    config_path: str | None


@dataclass
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


# ---- pre-flight ---------------------------------------------------------------------------------

def preflight(cfg: C.Config, argv: list[str], service_uid: int | None = None) -> Plan:
    exec_path = cfg.exec_path
    if exec_path is None:
        raise UpgradeRefused("no exec_path: set app.root (exec_path defaults to ROOT/shared/bin/cadenza) "
                             "or app.exec_path, and write it with `cadenza pin --root ROOT`")
    check_pinned_path(exec_path, os.geteuid() if service_uid is None else service_uid)
    directory = str(cfg.directory) if cfg.directory else os.getcwd()
    release = os.path.realpath(directory)
    if not os.path.isdir(release):
        raise UpgradeRefused(f"{directory} does not resolve to an existing release (it points at {release})")
    config_path = new_config_path(argv, directory)
    if config_path:
        try:
            C.load(config_path)
        except C.ConfigError as exc:
            raise UpgradeRefused(f"the new release's config is invalid:\n{exc}") from None
        unsafe = config_problems(config_path, writers=0o002)
        if unsafe:
            raise UpgradeRefused("the new release's config is unsafe:\n" + "\n".join(unsafe))
    return Plan(str(exec_path), directory, release, config_path)


def check_pinned_path(path: Path, service_uid: int) -> None:
    """exec_path exists, is executable, and nobody but root or the service user can replace it."""
    try:
        st = os.stat(path)
    except OSError as exc:
        raise UpgradeRefused(f"pinned path {path} is unusable: {exc.strerror}; "
                             f"write it with `cadenza pin --root ROOT`") from None
    if not stat.S_ISREG(st.st_mode) or not os.access(path, os.X_OK):
        raise UpgradeRefused(f"pinned path {path} is not an executable file; run `cadenza pin --root ROOT`")
    reason = unsafe_reason(path, service_uid)
    if reason:
        raise UpgradeRefused(f"pinned path {path} is unsafe: {reason}")


def new_config_path(argv: list[str], directory: str) -> str | None:
    """The config file the new master will read: its -c (relative to `directory`), else
    $CADENZA_CONFIG, else DIRECTORY/cadenza.toml when it exists."""
    for i, arg in enumerate(argv):
        if arg in ("-c", "--config") and i + 1 < len(argv):
            return os.path.join(directory, argv[i + 1])
        if arg.startswith("--config="):
            return os.path.join(directory, arg.split("=", 1)[1])
    if os.environ.get("CADENZA_CONFIG"):
        return os.path.join(directory, os.environ["CADENZA_CONFIG"])
    candidate = os.path.join(directory, "cadenza.toml")
    return candidate if os.path.isfile(candidate) else None


# ---- master N's side ----------------------------------------------------------------------------

class Succession:
    """One upgrade attempt, driven by events of master N's loop."""

    def __init__(self, host, plan: Plan, generation: int, timeout: float):
        self.host = host                      # the master: selector, timers, children, systemd
        self.plan = plan
        self.generation = generation
        self.timeout = timeout
        self.pid = 0
        self.state = "starting"               # starting -> handing-over -> done | failed
        self.output: collections.deque[str] = collections.deque(maxlen=OUTPUT_TAIL)
        self.watchers: list[Callable[[dict], None]] = []
        self.progress = ""
        self.started = time.monotonic()
        self._buffer = b""
        self._out_r: int | None = None
        self._chan: socket.socket | None = None
        self._timer = None
        self._barrier_r: int | None = None
        self.pidfd: int | None = None

    # start -----------------------------------------------------------------------------------

    def start(self, listeners: list[Listener], control: socket.socket | None, argv: list[str]) -> None:
        named = [(listener.fd, listener.name) for listener in listeners]
        if control is not None:
            named.append((control.fileno(), CONTROL_FDNAME))
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        out_r, out_w = os.pipe()
        env = self._environment(named)
        fds = [fd for fd, _ in named] + [theirs.fileno(), 2]
        pid, self.pidfd = _spawn_orphan(lambda: _become_heir(self.plan, argv, env, fds, len(named), out_w))
        theirs.close()
        os.close(out_w)
        self.pid, self._chan, self._out_r = pid, mine, out_r
        mine.setblocking(False)
        os.set_blocking(out_r, False)
        self.host.selector.register(mine, 1, self._on_channel)
        self.host.selector.register(out_r, 1, self._on_output)
        self.host.selector.register(self.pidfd, 1, self._on_exit)
        self._timer = self.host.timers.after(self.timeout, self._on_timeout)
        self.emit("started", f"generation {self.generation} started (pid {pid}) from {self.plan.exec_path} "
                             f"in {self.plan.directory} -> {self.plan.release}")

    def _environment(self, named: list[tuple[int, str]]) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in PRIVATE_VARIABLES}
        env["LISTEN_FDS"] = str(len(named))
        env["LISTEN_FDNAMES"] = ":".join(name for _, name in named)
        env["CADENZA_GENERATION"] = str(self.generation)
        env["CADENZA_OWNS"] = ",".join(name for name, mine in (("listeners", self.host.bound_here),
                                                               ("control", self.host.control_owned),
                                                               ("fdstore", self.host.fd_store)) if mine)
        env["CADENZA_HANDOFF_FD"] = str(3 + len(named))
        env["CADENZA_LOG_FD"] = str(4 + len(named))
        if self.host.systemd.address:
            env["NOTIFY_SOCKET"] = self.host.systemd.address
        if self.host.watchdog_usec:
            env["WATCHDOG_USEC"] = str(self.host.watchdog_usec)
        return env

    # events ----------------------------------------------------------------------------------

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
        os.write(2, data)   # relayed as is: N+1's lines are already formatted for the journal
        self.output.extend(data.decode(errors="replace").splitlines())
        return True

    def _close_output(self) -> None:
        if self._out_r is not None:
            self.host.selector.unregister(self._out_r)
            os.close(self._out_r)
            self._out_r = None

    def _on_channel(self) -> None:
        try:
            data = self._chan.recv(65536)
        except BlockingIOError:
            return
        if not data:
            self._close_channel()
            if self.state == "starting":
                self._fail(f"generation {self.generation} closed the hand-off channel before it was ready")
            return
        self._buffer += data
        while b"\n" in self._buffer:
            line, self._buffer = self._buffer.split(b"\n", 1)
            verb, _, text = line.decode(errors="replace").partition(" ")
            if verb == "progress":
                self.progress = text
                self.emit("progress", f"generation {self.generation}: {text}")
            elif verb == "ready" and self.state == "starting":
                self._hand_over()
            elif verb == "failed":
                self._fail(text)

    def _close_channel(self) -> None:
        if self._chan is not None:
            self.host.selector.unregister(self._chan)
            self._chan.close()
            self._chan = None

    def _on_exit(self) -> None:
        # The pidfd is readable: N+1's master has exited (it is not our child: no status).
        self.host.selector.unregister(self.pidfd)
        os.close(self.pidfd)
        self.pidfd = None
        if self.state in ("starting", "handing-over", "mainpid-sent"):
            self._drain_output()
            self._fail(f"generation {self.generation} (pid {self.pid}) exited before it was main")
        else:
            log.info("generation %d (pid %d) exited", self.generation, self.pid)
        self.host.successor_exited(self)

    def _on_timeout(self) -> None:
        if self.state in ("starting", "handing-over"):
            self._fail(f"generation {self.generation} was not ready within {self.timeout:g}s (upgrade.timeout)")

    # hand-over -------------------------------------------------------------------------------

    def _hand_over(self) -> None:
        self.state = "handing-over"
        self.emit("ready", f"generation {self.generation} ready")
        if not self.host.systemd.enabled:
            self._tell_main()
            return
        sent = self.host.systemd.send(mainpid=self.pid, ready=1,
                                      status=f"serving generation {self.generation}")
        if not sent:
            self._fail("could not send MAINPID= to systemd (NOTIFY_SOCKET refused it)")
            return
        # MAINPID= is out: from here on there is no rollback, only the hand-over.
        self.state = "mainpid-sent"
        # BARRIER=1 (sd_notify_barrier(3)): systemd closes the fd once it has processed MAINPID=.
        # Bounded: a systemd that is slow to read must not stall the hand-over forever.
        self._barrier_r = self.host.systemd.barrier()
        if self._barrier_r is None:
            self._tell_main()
            return
        self.host.selector.register(self._barrier_r, 1, self._on_barrier)
        self.host.timers.after(BARRIER_TIMEOUT, self._on_barrier)

    def _on_barrier(self) -> None:
        if self._barrier_r is not None:
            self.host.selector.unregister(self._barrier_r)
            os.close(self._barrier_r)
            self._barrier_r = None
        if self.state == "mainpid-sent":
            self._tell_main()

    def _tell_main(self) -> None:
        try:
            if self._chan is None:
                raise OSError("the hand-off channel is closed")
            self._chan.sendall(b"main\n")
        except OSError as exc:
            self._fail(f"could not tell generation {self.generation} it is main: {exc}")
            return
        self.state = "done"
        self._finish()
        self.emit("mainpid", f"MAINPID handed over to generation {self.generation} (pid {self.pid})",
                  pid=self.pid)
        self.host.succession_done(self.outcome(True))

    def _fail(self, reason: str) -> None:
        if self.state in ("failed", "done"):
            return
        self.state = "failed"
        self._finish()
        _killpg(self.pid)
        self._drain_output()
        self._close_output()
        self.emit("failed", f"upgrade to generation {self.generation} failed: {reason}",
                  output=list(self.output))
        self.host.succession_done(self.outcome(False, reason))

    def _finish(self) -> None:
        if self._timer:
            self._timer.cancel()
        self._close_channel()
        if self._barrier_r is not None:
            self.host.selector.unregister(self._barrier_r)
            os.close(self._barrier_r)
            self._barrier_r = None

    def _drain_output(self) -> None:
        while self._on_output():
            pass

    def abort(self, sig: int = signal.SIGTERM) -> None:
        """The service is stopping: N+1 (not main yet) drains and exits with it."""
        if self.state in ("starting", "handing-over"):
            self.state = "failed"
            try:
                self._chan.sendall(b"stop\n")   # so N+1 stops as told, not as orphaned
            except (OSError, AttributeError):
                pass
            _kill(self.pid, sig)
            self._finish()
            self.host.succession_done(self.outcome(False, "the service is stopping"))

    def outcome(self, ok: bool, reason: str = "") -> Outcome:
        return Outcome(ok, self.generation, reason, self.pid, list(self.output), self.started, time.monotonic())

    def alive(self) -> bool:
        return self.pidfd is not None


def _spawn_orphan(become) -> tuple[int, int]:
    """fork twice so that the new master is an orphan, adopted by PID 1 (systemd), and return its
    pid and a pidfd. Under systemd this matters: MAINPID= naming a process that is *not* systemd's
    child makes it "alien" (service_set_main_pid), and on `systemctl stop` systemd then cannot
    wait for it and SIGKILLs the whole unit at once instead of letting it drain."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
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
            os.write(2, f"cadenza: cannot start the next generation: {exc}\n".encode())
            os._exit(127)
        os._exit(0)
    theirs.close()
    try:
        data, fds, _, _ = socket.recv_fds(ours, 64, 1)
    finally:
        ours.close()
        _, status = os.waitpid(middle, 0)   # it exits at once: the one wait that may block, briefly
    if not fds:
        raise OSError(f"the intermediate process {middle} {describe_status(status)} without a pid")
    return int(data), fds[0]


def _become_heir(plan: Plan, argv: list[str], env: dict[str, str], fds: list[int], nlisten: int,
                 out_w: int) -> None:
    signal.set_wakeup_fd(-1)
    for sig in range(1, signal.NSIG):
        if sig in (signal.SIGKILL, signal.SIGSTOP):
            continue
        try:
            signal.signal(sig, signal.SIG_DFL)
        except (OSError, ValueError):
            pass
    signal.pthread_sigmask(signal.SIG_SETMASK, [])
    os.setpgid(0, 0)   # its own group: a failed upgrade kills N+1's whole tree with one killpg
    place_fds(fds)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.dup2(out_w, 1)
    os.dup2(out_w, 2)
    os.chdir(plan.directory)
    env["LISTEN_PID"] = str(os.getpid())
    if "WATCHDOG_USEC" in env:
        env["WATCHDOG_PID"] = str(os.getpid())
    try:
        os.execve(plan.exec_path, [plan.exec_path, *argv], env)
    except BaseException as exc:  # noqa: BLE001 - in the child every error must end in _exit
        os.write(2, f"cadenza: cannot exec {plan.exec_path}: {exc}\n".encode())
    os._exit(127)


def _kill(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _killpg(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        _kill(pid, signal.SIGKILL)


# ---- master N+1's side --------------------------------------------------------------------------

class Heir:
    """The new master's end of the hand-off channel, until it is told it is main."""

    def __init__(self, chan: socket.socket, log_fd: int):
        self.chan = chan
        self.log_fd = log_fd
        self.main = False
        self._buffer = b""

    @classmethod
    def from_environ(cls) -> "Heir | None":
        chan_fd = os.environ.pop("CADENZA_HANDOFF_FD", None)
        log_fd = os.environ.pop("CADENZA_LOG_FD", None)
        if chan_fd is None or log_fd is None:
            return None
        chan = socket.socket(fileno=int(chan_fd))
        chan.set_inheritable(False)
        os.set_inheritable(int(log_fd), False)
        return cls(chan, int(log_fd))

    def say(self, line: str) -> None:
        try:
            self.chan.sendall(line.encode() + b"\n")
        except OSError:
            pass

    def ready(self) -> None:
        # From now on our output goes straight to the service's log, not through master N.
        os.dup2(self.log_fd, 1)
        os.dup2(self.log_fd, 2)
        self.say("ready")

    def read(self) -> str | None:
        """Returns "main", "stop", "closed" or None (nothing complete yet)."""
        try:
            data = self.chan.recv(4096)
        except BlockingIOError:
            return None
        if not data:
            return "closed"
        self._buffer += data
        if b"main\n" in self._buffer:
            self.main = True
            return "main"
        if b"stop\n" in self._buffer:
            return "stop"
        return None

    def close(self) -> None:
        self.chan.close()
