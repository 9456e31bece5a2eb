"""The master's event loop: one thread, one selector, and nothing else (trio's and s6's shape).

- Signal handlers only write the signal number to a socketpair (signal.set_wakeup_fd); the loop
  reads it and calls the one signal callback. Nothing runs inside a handler.
- A timeout is just another event: `after()` puts a deadline in the heap that select() honours.
- Every child is reaped in `reap()`, which hands (pid, status) to the owner that `watch_child()`
  registered. A child nobody registered is reaped and logged.
- Every fd handler, timer and signal runs through `_guarded`: an OSError (EAGAIN from fork under
  TasksMax=, EMFILE, ENOMEM) or a bug in one handler is logged with its cause and the master
  carries on. Handlers that can fail in a way the operator must hear about turn the error into
  an outcome themselves (an upgrade that fails, a respawn that is retried); this guard is the
  floor under all of them, so no event can end the master.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import os
import selectors
import signal
import socket
import time
from typing import Callable

log = logging.getLogger("cadenza.master")

HANDLED_SIGNALS = (signal.SIGTERM, signal.SIGQUIT, signal.SIGINT, signal.SIGHUP, signal.SIGUSR2,
                   signal.SIGTTIN, signal.SIGTTOU, signal.SIGCHLD, signal.SIGUSR1, signal.SIGALRM)


class Timer:
    __slots__ = ("when", "callback", "cancelled")

    def __init__(self, when: float, callback: Callable[[], None]):
        self.when = when
        self.callback = callback
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class Timers:
    """Deadlines for a selector loop."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, Timer]] = []
        self._seq = itertools.count()

    def after(self, seconds: float, callback: Callable[[], None]) -> Timer:
        timer = Timer(time.monotonic() + seconds, callback)
        heapq.heappush(self._heap, (timer.when, next(self._seq), timer))
        return timer

    def timeout(self) -> float | None:
        """Seconds until the next live deadline, for select(); None when there is none."""
        while self._heap and self._heap[0][2].cancelled:
            heapq.heappop(self._heap)
        if not self._heap:
            return None
        return max(0.0, self._heap[0][0] - time.monotonic())

    def due(self) -> list[Timer]:
        now = time.monotonic()
        out = []
        while self._heap and self._heap[0][0] <= now:
            _, _, timer = heapq.heappop(self._heap)
            if not timer.cancelled:
                timer.cancelled = True
                out.append(timer)
        return out


class Acceptor:
    """A listening socket's place in the loop: `start()`, `stop()`, and `pause()` after an accept
    that failed for want of fds (EMFILE): the connection stays queued and would wake the loop
    again at once, so the socket leaves the selector for `seconds`. Whatever order a rollback's
    start, a hand-over's stop and a pause's end come in, the socket is registered once or not at
    all (selectors refuses a second registration)."""

    def __init__(self, loop: Loop, sock: socket.socket, on_ready: Callable[[], None], seconds: float):
        self.loop, self.sock, self.on_ready, self.seconds = loop, sock, on_ready, seconds
        self.accepting = False
        self._paused: Timer | None = None

    def start(self) -> None:
        if not self.accepting:
            self.accepting = True
            if self._paused is None:
                self.loop.add_reader(self.sock, self.on_ready)

    def stop(self) -> None:
        if self.accepting:
            self.accepting = False
            if self._paused is None:
                self.loop.remove(self.sock)

    def pause(self) -> None:
        if self.accepting and self._paused is None:
            self.loop.remove(self.sock)
            self._paused = self.loop.after(self.seconds, self._resume)

    def _resume(self) -> None:
        self._paused = None
        if self.accepting:
            self.loop.add_reader(self.sock, self.on_ready)


class Loop:
    def __init__(self) -> None:
        self.selector = selectors.DefaultSelector()
        self.timers = Timers()
        self.children: dict[int, Callable[[int], None]] = {}
        self.on_signal: Callable[[int], None] = lambda signum: None
        self.after_each: Callable[[], None] = lambda: None   # the owner's bookkeeping after any event
        self.stopped = False
        self._wake_r, self._wake_w = socket.socketpair()

    # ---- registration --------------------------------------------------------------------

    def add_reader(self, fd, callback: Callable[[], None]) -> None:
        self.selector.register(fd, selectors.EVENT_READ, callback)

    def set_events(self, fd, events: int, callback: Callable[[], None]) -> None:
        try:
            self.selector.modify(fd, events, callback)
        except (KeyError, ValueError):
            pass

    def acceptor(self, sock: socket.socket, on_ready: Callable[[], None], seconds: float) -> Acceptor:
        return Acceptor(self, sock, on_ready, seconds)

    def remove(self, fd) -> None:
        try:
            self.selector.unregister(fd)
        except (KeyError, ValueError):
            pass

    def after(self, seconds: float, callback: Callable[[], None]) -> Timer:
        return self.timers.after(seconds, callback)

    def watch_child(self, pid: int, owner: Callable[[int], None]) -> None:
        """`owner(status)` runs when `pid` is reaped. Register before the child can exit unseen:
        reaping happens only in this loop, so any time before the next turn is early enough."""
        self.children[pid] = owner

    # ---- running -------------------------------------------------------------------------

    def install_signals(self) -> None:
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        signal.set_wakeup_fd(self._wake_w.fileno(), warn_on_full_buffer=False)
        for sig in HANDLED_SIGNALS:
            signal.signal(sig, _wake_only)
        self.add_reader(self._wake_r, self._on_wakeup)

    def run(self) -> None:
        while not self.stopped:
            for key, _ in self.selector.select(self.timers.timeout()):
                # A handler earlier in this batch may have closed this fd (an upgrade that failed
                # closes its channel and its output pipe at once): skip it then.
                if not self.stopped and self.selector.get_map().get(key.fd) is key:
                    self._guarded(key.data)
            for timer in self.timers.due():
                if not self.stopped:
                    self._guarded(timer.callback)

    def close(self) -> None:
        signal.set_wakeup_fd(-1)
        self.selector.close()
        self._wake_r.close()
        self._wake_w.close()

    def _guarded(self, handler: Callable[[], None]) -> None:
        try:
            handler()
            self.after_each()
        except OSError as exc:
            log.error("%s failed: %s; the master carries on", _name(handler), exc)
        except Exception:   # noqa: BLE001 - one bad event must not take the service down
            log.exception("internal error in %s; the master carries on (please report this)",
                          _name(handler))

    def _on_wakeup(self) -> None:
        try:
            data = self._wake_r.recv(4096)
        except BlockingIOError:
            return
        for signum in data:
            if signum == signal.SIGCHLD:
                self.reap()
            else:
                self._guarded(lambda s=signum: self.on_signal(s))

    def reap(self) -> None:
        """The one place children are waited for."""
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
                self._guarded(lambda o=owner, s=status: o(s))


def _wake_only(signum, frame) -> None:
    """Signals only wake the loop: set_wakeup_fd has already written the number."""


def _name(handler) -> str:
    return getattr(handler, "__qualname__", None) or repr(handler)


def signal_process(pid: int, sig: int) -> bool:
    """kill(2) one process we know by pid; never 0 or -1 (which would signal our own group or
    every process we may signal). False when it is gone, or not ours to signal (logged)."""
    if pid <= 1:
        log.error("internal error: refusing to send %s to pid %d", signal.Signals(sig).name, pid)
        return False
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        return False
    except PermissionError:
        log.error("cannot send %s to pid %d: it runs as a user this master may not signal",
                  signal.Signals(sig).name, pid)
        return False
    return True


def signal_group(pgid: int, sig: int) -> bool:
    """killpg(2) a group led by a child of ours (a worker, a next generation) or what remains of
    one (groups.py); never our own group."""
    if pgid <= 1 or pgid == os.getpgrp():
        log.error("internal error: refusing to signal process group %d", pgid)
        return False
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        return False
    except PermissionError:
        return signal_process(pgid, sig)
    return True
