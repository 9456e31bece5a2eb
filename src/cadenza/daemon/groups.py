"""Process groups: every worker leads one, and nothing of it outlives its generation.

A worker is exec'd as the leader of a process group of its own (process.spawn calls setpgid in
the child and in the master, so the group exists before either side runs on). Every signal the
master sends a worker goes to its whole group (loop.signal_group): a wrapper that does not exec
(`sh -c 'server & wait'`), a gunicorn arbiter and its workers, hear the same TERM, QUIT or KILL
as the worker itself. The group's id is the worker's pid, and the kernel gives no new process a
pid that is still some group's id, so a group can be signalled by number for as long as it has
a member, without reaching a stranger.

This module is the one place that knows what belongs to a worker:

- `Leftovers`: once a worker is reaped, whatever remains of its group (the child of a wrapper
  that died or was killed) gets SIGTERM at once and SIGKILL after graceful_timeout, and counts
  as running until its last process is gone: the pool reports "drained" only then, so a
  generation that leaves (after `systemctl reload` too, where systemd's KillMode=mixed does
  nothing) leaves nothing of its workers behind serving the old release.
- `worker_of`: the worker a notify sender belongs to (itself, a member of its group, or a
  descendant), the way NotifyAccess=all accepts what comes from the unit's cgroup.
- `signal_tree`: a next generation that will not stop is killed with all it started, its
  workers' groups included.

A process that leaves its worker's group (setsid(), setpgid()) and its ancestry (a double fork)
is not followed: the unit's cgroup still holds it, and `systemctl stop` ends it.
"""

from __future__ import annotations

import logging
import os
import signal
from ..records import record, field
from typing import Callable, Container

from ..notify import command_line
from .loop import Loop, Timer, signal_group

log = logging.getLogger("cadenza.master")

ANCESTRY_DEPTH = 16       # parents walked up from a notify sender before it counts as a stranger
RETRY = 0.1               # seconds before looking again at a group whose members could not be watched
KILL_WAIT = 3.0           # seconds a SIGKILLed group may take to go before it is given up on


def _stat(pid: int) -> tuple[str, int, int] | None:
    """(state, ppid, pgrp) from /proc/PID/stat (proc(5)); None once it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:   # gone, or going (ESRCH)
        return None
    fields = data[data.rfind(b")") + 2:].split()   # the command name may hold spaces and parentheses
    try:
        return fields[0].decode(), int(fields[1]), int(fields[2])
    except (IndexError, ValueError):
        return None


def _processes():
    for name in os.listdir("/proc"):
        if name.isdigit():
            stat = _stat(int(name))
            if stat is not None:
                yield int(name), stat


def members(pgid: int) -> list[int]:
    """The live processes of group `pgid`; zombies are not, they only wait for their reaper."""
    return [pid for pid, (state, _, pgrp) in _processes() if pgrp == pgid and state not in ("Z", "X")]


def worker_of(pid: int, workers: Container[int]) -> int | None:
    """The worker `pid` is, or belongs to: a member of its process group, or a descendant (up to
    ANCESTRY_DEPTH parents up); None for any other process, or one that has gone. A sender must
    still run when its message is read: systemd-notify waits for that (BARRIER=1)."""
    master = os.getpid()
    for _ in range(ANCESTRY_DEPTH):
        if pid in workers:
            return pid
        stat = _stat(pid)
        if stat is None:
            return None
        _, ppid, pgrp = stat
        if pgrp in workers:   # a worker's pid is its group's id
            return pgrp
        if ppid <= 1 or ppid == master:
            return None
        pid = ppid
    return None


def signal_tree(root: int, sig: int) -> None:
    """`sig` to the group of `root` and to the group of every process it descends to (a next
    master and its workers, each of which leads a group of its own), read in one pass over /proc
    before anything is signalled. Never our own group (signal_group refuses it)."""
    children: dict[int, list[int]] = {}
    groups_of: dict[int, int] = {}
    for pid, (_, ppid, pgrp) in _processes():
        children.setdefault(ppid, []).append(pid)
        groups_of[pid] = pgrp
    found, todo, seen = {root}, [root], set()
    while todo:
        pid = todo.pop()
        if pid not in seen:
            seen.add(pid)
            found.add(groups_of.get(pid, root))
            todo += children.get(pid, [])
    for pgid in sorted(found):
        signal_group(pgid, sig)


@record
class _Group:
    pgid: int
    what: str                                          # "worker 2 (pid 123)"
    sig: int                                           # what it was sent last
    watched: dict[int, int] = field(default_factory=dict)   # pidfd -> pid
    timer: Timer | None = None


class Leftovers:
    """The groups of reaped workers that still have members. Each member is watched through a
    pidfd, which becomes readable when it exits, whoever reaps it (often nobody soon: an orphan
    goes to PID 1 or a subreaper); a group is gone once none of its members is left alive."""

    def __init__(self, loop: Loop, grace: float, on_gone: Callable[[], None]):
        self.loop, self.grace, self.on_gone = loop, grace, on_gone
        self._groups: dict[int, _Group] = {}

    def __bool__(self) -> bool:
        return bool(self._groups)

    def pgids(self) -> set[int]:
        return set(self._groups)

    def sweep(self, pgid: int, what: str, sig: int | None = signal.SIGTERM) -> None:
        """`what`, the leader of group `pgid`, was just reaped: `sig` to what remains of it, and
        SIGKILL after the grace period. `sig` None: the group was told to stop already (a drain),
        and a second TERM could make a server cut its requests (uvicorn takes it for "force
        exit"); it only gets the SIGKILL. Costs one kill(2) when nothing remains (an exec'd worker)."""
        if pgid in self._groups or not _exists(pgid):
            return
        pids = members(pgid)
        if not pids:
            return   # zombies only: exited already
        listed = ", ".join(f"pid {p} ({command_line(p, 80)})" for p in pids[:5])
        if sig is None:
            log.info("%s has exited; %d process(es) of its group still run: %s; SIGKILL in %gs if they still do",
                     what, len(pids), listed, self.grace)
        else:
            log.warning("%s has exited, but %d process(es) of its group remain: %s; sending %s%s", what,
                        len(pids), listed, signal.Signals(sig).name,
                        "" if sig == signal.SIGKILL else f", SIGKILL in {self.grace:g}s")
        group = _Group(pgid, what, signal.SIGTERM if sig is None else sig)
        self._groups[pgid] = group
        if sig is not None:
            signal_group(pgid, sig)   # the group exists: its members were just seen
        if group.sig != signal.SIGKILL:
            group.timer = self.loop.after(self.grace, lambda: self._kill(group))
        self._watch(group, pids, send=False)

    def kill_all(self) -> None:
        for group in list(self._groups.values()):
            self._kill(group)

    def _kill(self, group: _Group) -> None:
        if self._groups.get(group.pgid) is not group:
            return
        if group.timer is not None:
            group.timer.cancel()
            group.timer = None
        if group.sig != signal.SIGKILL:
            log.warning("what remains of the group of %s is still running; killing it", group.what)
        group.sig = signal.SIGKILL
        for fd in group.watched:
            _send(fd, signal.SIGKILL)
        self._watch(group, members(group.pgid), send=True)
        # Uninterruptible sleep, or a member we may not signal (it changed its uid): the
        # generation must not wait for it for ever; the unit's cgroup still holds it.
        group.timer = self.loop.after(KILL_WAIT, lambda: self._give_up(group))

    def _give_up(self, group: _Group) -> None:
        if self._groups.get(group.pgid) is not group:
            return
        pids = members(group.pgid)
        log.error("what remains of the group of %s did not end %gs after SIGKILL: %s; not waiting for it "
                  "any more (`systemctl stop` ends it with the unit)", group.what, KILL_WAIT,
                  ", ".join(f"pid {p} ({command_line(p, 80)})" for p in pids[:5]) or "gone by now")
        for fd in list(group.watched):
            self.loop.remove(fd)
            os.close(fd)
        group.watched.clear()
        group.timer = None
        self._recheck(group, give_up=True)

    def _watch(self, group: _Group, pids: list[int], send: bool) -> None:
        """Watch the members not watched yet (`send`: they joined after the signal; send it)."""
        known = set(group.watched.values())
        for pid in pids:
            if pid in known:
                continue
            try:
                fd = os.pidfd_open(pid)   # O_CLOEXEC: never inherited by a worker
            except OSError:   # gone already, or out of fds (looked at again below)
                continue
            stat = _stat(pid)
            if stat is None or stat[2] != group.pgid:   # the pid is another process's by now
                os.close(fd)
                continue
            group.watched[fd] = pid
            self.loop.add_reader(fd, lambda fd=fd: self._exited(group, fd))
            if send:
                _send(fd, group.sig)
        if not group.watched:
            # All of them exited meanwhile, or none could be watched (EMFILE): look again.
            self.loop.after(RETRY if pids else 0, lambda: self._recheck(group))

    def _exited(self, group: _Group, fd: int) -> None:
        self.loop.remove(fd)
        os.close(fd)
        group.watched.pop(fd, None)
        if not group.watched:
            self._recheck(group)

    def _recheck(self, group: _Group, give_up: bool = False) -> None:
        if self._groups.get(group.pgid) is not group or group.watched:
            return
        pids = [] if give_up else members(group.pgid)   # one forked after the last look is a member too
        if pids:
            self._watch(group, pids, send=True)
            return
        if group.timer is not None:
            group.timer.cancel()
        del self._groups[group.pgid]
        if not give_up:
            log.info("what remained of the group of %s has gone", group.what)
        if not self._groups:
            self.on_gone()


def _exists(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _send(pidfd: int, sig: int) -> None:
    try:
        signal.pidfd_send_signal(pidfd, sig)
    except (ProcessLookupError, PermissionError):   # gone; or not ours to signal (KILL_WAIT bounds it)
        pass
