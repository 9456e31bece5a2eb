"""Starting child processes: a worker (fork + exec), and what every fork must get right.

Workers are exec'd programs, never forks running the master's code: the master never imports
application code. A worker receives the listeners as fds 3..n with LISTEN_* set for its own pid
(sd_listen_fds(3)) and its generation's NOTIFY_SOCKET, exactly as if systemd had started it.
It leads a process group of its own, which is what the master signals (groups.py).
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

from ..exitcodes import WORKER_APP_ERROR, WORKER_EXEC_FAILED
from ..listeners import LISTEN_FDS_START, Listener
from ..signals import MASTER_ONLY

# Variables of the master's own that a worker must never see (DESIGN §4).
PRIVATE_VARIABLES = ("LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES", "NOTIFY_SOCKET",
                     "WATCHDOG_USEC", "WATCHDOG_PID", "CADENZA_HANDOFF_FD", "FDSTORE")

_PR_SET_PDEATHSIG = 1


def builtin_argv(app: str) -> list[str]:
    return [sys.executable, "-m", "cadenza.worker.app", app]


def spawn(argv: list[str], *, worker_id: int, generation: int, app_name: str,
          listeners: list[Listener], notify_address: str, cwd: str,
          extra_env: dict[str, str], output_fd: int | None = None, extra_fds: tuple[int, ...] = (),
          ours: bool = False) -> int:
    """fork + exec one worker (or a preloader); returns its pid. Exec failures show up as exit
    status 127. `extra_fds` follow the listeners, at 3 + len(listeners) onwards. `ours`: the
    built-in worker or the preloader, which ignore signals.MASTER_ONLY from exec on (SIG_IGN
    survives it), so that a `systemctl kill -s HUP` during their start-up cannot end them."""
    env = {k: v for k, v in os.environ.items() if k not in PRIVATE_VARIABLES}
    env.update(extra_env)
    env.update({
        "LISTEN_FDS": str(len(listeners)),
        "LISTEN_FDNAMES": ":".join(listener.name for listener in listeners),
        "NOTIFY_SOCKET": notify_address,
        "CADENZA_WORKER_ID": str(worker_id),
        "CADENZA_GENERATION": str(generation),
        "CADENZA_APP_NAME": app_name,
    })
    fds = [listener.fd for listener in listeners] + list(extra_fds)
    master = os.getpid()
    pid = fork()
    if pid:
        try:
            # Here too, not only in the child: a signal sent to the group before the child got
            # that far must find it (groups.py), not fail with ESRCH.
            os.setpgid(pid, pid)
        except OSError:   # EACCES: it has already exec'd, after its own setpgid()
            pass
        return pid
    try:
        _become_worker(argv, env, fds, cwd, master, output_fd, ours)
    except BaseException as exc:  # noqa: BLE001 - in the child every error must end in _exit
        os.write(2, f"cadenza: cannot start worker {worker_id} ({argv[0]}): {exc}\n".encode())
    os._exit(127)


def fork() -> int:
    """os.fork() with every signal blocked until the child has reset its handlers (and unblocks
    them itself): a TERM in between would reach the master's do-nothing handler and be lost."""
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals())
    pid = -1
    try:
        pid = os.fork()
    finally:
        if pid != 0:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
    return pid


def _become_worker(argv: list[str], env: dict[str, str], fds: list[int], cwd: str, master: int,
                   output_fd: int | None, ours: bool) -> None:
    signal.set_wakeup_fd(-1)
    for sig in (signal.SIGPIPE, signal.SIGXFSZ, signal.SIGINT, signal.SIGTERM, signal.SIGQUIT, signal.SIGCHLD):
        signal.signal(sig, signal.SIG_DFL)
    for sig in MASTER_ONLY:
        signal.signal(sig, signal.SIG_IGN if ours else signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_SETMASK, [])
    # A process group of its own: whatever the master sends it reaches what it starts too.
    os.setpgid(0, 0)
    # A worker whose master vanished (SIGKILL, OOM) drains and exits instead of serving alone.
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != master:
        os._exit(0)
    place_fds(fds)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    if output_fd is not None:
        os.dup2(output_fd, 1)
        os.dup2(output_fd, 2)
    os.chdir(cwd)
    env["LISTEN_PID"] = str(os.getpid())
    if "WATCHDOG_USEC" in env:
        env["WATCHDOG_PID"] = str(os.getpid())
    os.execvpe(argv[0], argv, env)


def place_fds(fds: list[int]) -> None:
    """Put `fds` at 3..n (inheritable) in a freshly forked child.

    They are first copied above the target range so that a source already sitting at 3..n (fds
    adopted from systemd are exactly there) is never overwritten before it is copied.
    """
    import fcntl
    floor = LISTEN_FDS_START + len(fds)
    high = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, floor) for fd in fds]
    for i, fd in enumerate(high):
        os.dup2(fd, LISTEN_FDS_START + i, inheritable=True)
        os.close(fd)


class ExecStarter:
    """How a generation without preload starts a worker: fork + exec here, reaped by the loop.
    The preloader (preloading.py) offers the same three calls."""

    ready = True
    pid = None

    def __init__(self, loop, spec):
        self.loop, self.spec = loop, spec

    def spawn(self, worker_id: int, extra_env: dict[str, str]) -> int:
        spec = self.spec
        return spawn(spec.argv, worker_id=worker_id, generation=spec.generation, app_name=spec.app_name,
                     listeners=spec.listeners, notify_address=spec.notify_address, cwd=spec.release,
                     extra_env=extra_env, output_fd=spec.output_fd, ours=spec.builtin)

    def watch(self, pid: int, on_exit) -> None:
        self.loop.watch_child(pid, on_exit)

    def pids(self) -> set[int]:
        return set()

    def drain(self) -> None:
        pass

    def kill(self) -> None:
        pass


def describe_status(status: int | None) -> str:
    if status is None:   # a preloaded worker that outlived its preloader: nobody could wait for it
        return "exited (its exit status was lost with its preloader)"
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        return f"killed by {signal.Signals(sig).name}" if sig in signal.valid_signals() else f"killed by signal {sig}"
    code = os.waitstatus_to_exitcode(status)
    if code == WORKER_EXEC_FAILED:
        return f"exited with status {code} (could not be executed)"
    if code == WORKER_APP_ERROR:
        return f"exited with status {code} (the application could not be loaded)"
    return f"exited with status {code}"
