"""The master's side of preload (DESIGN §4.3): one preloader per generation, asked for workers.

The preloader is exec'd from the generation's release like a worker (process.spawn: the
listeners at fds 3..n, then the channel), imports the application once, calls gc.freeze() and
says "ready". The master then asks it for each worker and gets the pid back. The worker is the
preloader's child, so the preloader reports its exit status; everything else stays here: which
slot, when, and every signal (the master signals a worker's group itself, as without preload).

The channel is a SOCK_SEQPACKET socketpair carrying one JSON object per packet:

    master -> preloader   {"fork": ID, "env": {...}}     env: what differs from the preloader's own
                          {"drain": true}    fork no more; exit once the workers have
    preloader -> master   {"ready": true}
                          {"forked": ID, "pid": PID}  or  {"fork_failed": ID, "errno": N, "error": TEXT}
                          {"exited": PID, "status": WAIT_STATUS}
                          {"failed": TEXT}       it cannot import the application; exit 3 follows

A fork is answered within FORK_TIMEOUT or the preloader is taken for stuck: it is killed, and the
fork fails as fork(2) would (the slot retries with its backoff). One that is not ready within
workers.ready_timeout, or refuses a fork it was never told to refuse, is replaced the same way.
The preloader runs the application's import, so what it sends is checked like any input. Each worker is also watched
through a pidfd (os.pidfd_open): a worker that has exited and is not reported within
FORK_TIMEOUT means a stuck preloader, which is killed in the same way. A preloader that dies
leaves its workers serving. They are reparented, their exits are then learnt from their pidfds
(without a status), and the owner decides whether a new preloader is started (the table:
PRELOADER_GONE).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import select
import signal
import socket
import sys
import time
from typing import Callable

from ..exitcodes import WORKER_APP_ERROR
from . import process
from .loop import Loop, signal_group, signal_process
from .pool import backoff_delay

log = logging.getLogger("cadenza.master")

FORK_TIMEOUT = 2.0
MAX_MESSAGE = 65536
LOST = (errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN)    # the preloader is gone: a new one is started


def preloader_argv(app: str) -> list[str]:
    return [sys.executable, "-m", "cadenza.worker.preloader", app]


class Preloader:
    """A pool's starter with preload (process.ExecStarter is the one without)."""

    def __init__(self, loop: Loop, spec, app: str, *, on_ready: Callable[[], None],
                 on_gone: Callable[[str, bool], None]):
        self.loop, self.spec, self.app = loop, spec, app
        self.on_ready, self.on_gone = on_ready, on_gone    # on_gone(reason, app_error)
        self.argv = preloader_argv(app)
        self.pid: int | None = None
        self.ready = False
        self.started = 0.0
        self.ready_after: float | None = None
        self.starts = 0
        self.failures = 0               # starts in a row that ended before "ready"
        self.stopping = False
        self.failure = ""               # what it said before exiting
        self._channel: socket.socket | None = None
        self._watched: dict[int, _Watch] = {}
        self._backlog: list[dict] = []
        self._env: dict[str, str] = {}          # the preloader's own, which its workers inherit
        self._timer = None

    # ---- the preloader itself ----------------------------------------------------------

    def start(self) -> None:
        """Start a preloader; a fork that fails is retried with backoff."""
        self._timer = None
        if self.stopping or self.pid is not None:
            return
        spec = self.spec
        env = {**spec.env, "CADENZA_PRELOADER_FD": str(3 + len(spec.listeners))}
        try:
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        except OSError as exc:   # EMFILE, ENFILE, ENOMEM
            self._start_failed(f"no channel to it: {exc.strerror or exc}")
            return
        try:
            pid = process.spawn(self.argv, worker_id=0, generation=spec.generation, app_name=spec.app_name,
                                listeners=spec.listeners, notify_address=spec.notify_address,
                                cwd=spec.release, extra_env=env, output_fd=spec.output_fd,
                                extra_fds=(theirs.fileno(),), ours=True)
        except OSError as exc:
            ours.close()
            self._start_failed(f"fork failed: {exc.strerror or exc}")
            return
        finally:
            theirs.close()
        self._env = env
        ours.setblocking(False)
        self.pid, self._channel, self.failure = pid, ours, ""
        self.started, self.ready_after = time.monotonic(), None
        self.starts += 1
        self.loop.add_reader(ours, self._on_channel)
        self.loop.watch_child(pid, self._exited)
        log.info("preloader started (pid %d): importing %s", pid, self.app)
        limit = spec.ready_timeout
        self.loop.after(limit, lambda: self.pid == pid and not self.ready and self._stuck(
            f"was not ready within {limit:g}s (workers.ready_timeout)"))

    def _start_failed(self, why: str) -> None:
        self.failures += 1
        self.failure = f"the preloader could not be started: {why}"
        log.error("%s; retrying in %.1fs", self.failure, backoff_delay(self.failures))
        self.schedule_start()

    def schedule_start(self) -> None:
        if self._timer is None and not self.stopping:
            self._timer = self.loop.after(backoff_delay(self.failures), self.start)

    def _exited(self, status: int) -> None:
        try:
            self._on_channel()     # what it said before it went: exits of its workers, why it failed
        except OSError as exc:
            log.warning("the preloader's last messages could not be read: %s", exc)
        pid, self.pid, self.ready = self.pid, None, False
        self._close_channel()
        for watch in list(self._watched.values()):
            if watch.parent != pid:
                continue
            if watch.exited:
                self._ended(watch, None)
            elif watch.fd is None:
                self._poll_orphan(watch)
        how = process.describe_status(status)
        app_error = os.WIFEXITED(status) and os.WEXITSTATUS(status) == WORKER_APP_ERROR
        if self.ready_after is None:
            self.failures += 1
        reason = f"the preloader (pid {pid}) {how}" + (f": {self.failure}" if self.failure else "")
        (log.info if self.stopping else log.error)("%s", reason)
        self.on_gone(reason, app_error)

    def drain(self) -> None:
        """No more workers: it exits once its workers have (it still reports their exits)."""
        self.stopping = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._channel is not None:
            try:   # over the channel: a signal could come from anyone (systemctl kill, a user)
                self._channel.send(b'{"drain": true}')
            except OSError as exc:   # the kill timer of the pool's drain still bounds it
                log.warning("the preloader (pid %d) could not be told to stop: %s", self.pid, exc)

    def kill(self) -> None:
        self.stopping = True
        if self.pid is not None:
            signal_group(self.pid, signal.SIGKILL)

    def pids(self) -> set[int]:
        return {self.pid} if self.pid is not None else set()

    def describe(self) -> dict:
        return {"pid": self.pid, "state": "ready" if self.ready else "starting" if self.pid else "down",
                "starts": self.starts, "ready_after": self.ready_after, "failure": self.failure}

    # ---- workers -------------------------------------------------------------------------

    def spawn(self, worker_id: int, extra_env: dict[str, str]) -> int:
        """Ask for a worker and wait for its pid (a fork: milliseconds)."""
        if self._channel is None or not self.ready:
            raise OSError(errno.EAGAIN, "the preloader is not ready")
        env = {key: value for key, value in extra_env.items() if self._env.get(key) != value}
        try:
            self._channel.send(json.dumps({"fork": worker_id, "env": env}).encode())
        except OSError as exc:
            self.ready = self.ready and exc.errno not in LOST
            raise OSError(exc.errno, f"the preloader cannot be asked for a worker: {exc.strerror or exc}")
        deadline = time.monotonic() + FORK_TIMEOUT
        try:
            while True:
                message = self._receive(deadline)
                if message.get("forked") == worker_id and _number(message.get("pid"), 2):
                    return message["pid"]
                if message.get("fork_failed") == worker_id:
                    if not message.get("errno") and not self.stopping:
                        self._stuck("refused a fork this master never told it to refuse")
                    raise OSError(message.get("errno") or errno.EAGAIN, message.get("error", "fork failed"))
                self._backlog.append(message)
        finally:
            if self._backlog:
                self.loop.after(0, self._on_channel)

    def _receive(self, deadline: float) -> dict:
        while True:
            remaining = deadline - time.monotonic()
            poller = select.poll()
            poller.register(self._channel, select.POLLIN)
            if remaining <= 0 or not poller.poll(remaining * 1000):
                self._stuck(f"did not answer a fork within {FORK_TIMEOUT:g}s")
                raise OSError(errno.ETIMEDOUT, f"the preloader did not answer within {FORK_TIMEOUT:g}s")
            try:
                data = self._channel.recv(MAX_MESSAGE)
            except BlockingIOError:
                continue
            except OSError as exc:
                self.ready = self.ready and exc.errno not in LOST
                raise
            if not data:
                self.ready = False
                raise OSError(errno.EPIPE, "the preloader is gone")
            message = _decode(data)
            if message is not None:
                return message

    def _stuck(self, what: str) -> None:
        if self.pid is None:
            return
        log.error("the preloader (pid %d) %s; killing it", self.pid, what)
        self.failure = f"it {what}"
        self.ready = False
        signal_group(self.pid, signal.SIGKILL)

    def watch(self, pid: int, on_exit: Callable[[int | None], None]) -> None:
        watch = _Watch(pid, on_exit, self.pid)
        self._watched[pid] = watch
        try:
            watch.fd = os.pidfd_open(pid)
        except ProcessLookupError:   # it has exited already; the preloader reports it
            watch.exited = True
            return
        except OSError as exc:       # EMFILE: the preloader's report is all there is, while it lives
            log.warning("worker pid %d cannot be watched through a pidfd: %s", pid, exc.strerror or exc)
            return
        self.loop.add_reader(watch.fd, lambda: self._pidfd_ready(watch))

    def _poll_orphan(self, watch: _Watch) -> None:
        """A worker without a pidfd whose preloader is gone: looked at once a second."""
        if self._watched.get(watch.pid) is not watch:
            return
        try:
            os.kill(watch.pid, 0)
        except ProcessLookupError:
            self._ended(watch, None)
            return
        except OSError:
            pass
        self.loop.after(1.0, lambda: self._poll_orphan(watch))

    def _pidfd_ready(self, watch: _Watch) -> None:
        """The worker has exited. Its status comes from the preloader, which reaps it; one that
        does not say so in time is stuck, and without one nobody can wait for it."""
        self.loop.remove(watch.fd)
        watch.exited = True
        if watch.parent != self.pid:    # its preloader is gone: nobody reaps it to say how
            self._ended(watch, None)
        elif self._watched.get(watch.pid) is watch:
            watch.timer = self.loop.after(FORK_TIMEOUT, lambda: self._unreported(watch))

    def _unreported(self, watch: _Watch) -> None:
        if self._watched.get(watch.pid) is watch:
            self._stuck(f"did not report the exit of worker pid {watch.pid} within {FORK_TIMEOUT:g}s")

    def _ended(self, watch: _Watch, status: int | None) -> None:
        if self._watched.pop(watch.pid, None) is not watch:
            return
        if watch.timer is not None:
            watch.timer.cancel()
        if watch.fd is not None:
            if not watch.exited:
                self.loop.remove(watch.fd)
            os.close(watch.fd)
        watch.on_exit(status)

    def _on_channel(self) -> None:
        backlog, self._backlog = self._backlog, []
        for message in backlog:
            self._handle(message)
        while self._channel is not None:
            try:
                data = self._channel.recv(MAX_MESSAGE)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if not data:
                self._close_channel()
                return
            message = _decode(data)
            if message is not None:
                self._handle(message)

    def _handle(self, message: dict) -> None:
        if "exited" in message and not (_number(message["exited"], 1) and _number(message.get("status"), 0)):
            log.warning("ignored a malformed message from the preloader: %.200r", message)
            return
        if message.get("ready") is True and not self.ready:
            self.ready, self.failures = True, 0
            self.ready_after = time.monotonic() - self.started
            log.info("preloader (pid %d) ready after %.2fs", self.pid, self.ready_after)
            self.on_ready()
        elif "exited" in message:
            watch = self._watched.get(int(message["exited"]))
            if watch is not None:
                self._ended(watch, int(message["status"]))
        elif "failed" in message:
            self.failure = str(message["failed"])[:1000]
        elif "forked" in message:   # answered after its fork timed out: nobody owns that worker
            pid = message.get("pid")
            if _number(pid, 2) and pid not in self._watched and not signal_group(pid, signal.SIGKILL):
                signal_process(pid, signal.SIGKILL)   # it may not lead its group yet

    def _close_channel(self) -> None:
        if self._channel is not None:
            self.loop.remove(self._channel)
            self._channel.close()
            self._channel = None



class _Watch:
    def __init__(self, pid: int, on_exit: Callable[[int | None], None], parent: int | None):
        self.pid, self.on_exit, self.parent = pid, on_exit, parent
        self.fd: int | None = None
        self.exited = False
        self.timer = None


def _number(value, low: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value < 2 ** 31


def _decode(data: bytes) -> dict | None:
    try:
        message = json.loads(data)
    except ValueError:
        message = None
    if not isinstance(message, dict):
        log.warning("ignored a malformed message from the preloader: %r", data[:200])
        return None
    return message
