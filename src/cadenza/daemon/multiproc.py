"""`[metrics] multiprocess = true`: cadenza owns the application's PROMETHEUS_MULTIPROC_DIR
(DESIGN §9; prometheus_client #115 and #275 are what happens when nobody does).

- Each generation has a fresh directory, RUNTIME/metrics/gen-N (RUNTIME: the control socket's
  directory), made 0700 before its first worker and given to its workers and its preloader.
- A worker that exited has its files merged into the directory's archive files and removed
  (`merge`, with prometheus_client's mark_process_dead for its live gauges), so the files stay
  bounded however often workers are recycled, and the application's counters stay whole.
- A generation's directory goes away with it, folded into its successor's (`fold`): the main
  master folds its predecessor's once that one has gone (or has gone warm: no worker of it
  writes any more, and its counts would otherwise be missing for the whole rollback window),
  and a master folds the directory of a next generation that failed (its workers may have
  served a few requests). A warm generation rolled back to makes its directory again. A fresh start
  (generation 1, or no predecessor) removes the directories that no process owns (`prune`).

The work is cadenza/tools/multiproc.py, run as a child with the release's own Python, one at a
time (the tool also locks the directory), reaped by the loop like every child. The master never
imports prometheus_client. A tool that fails is logged with its exit status; its pids are not
retried (their files stay, and the fold at the generation's end takes them).
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import sys
import time
from pathlib import Path

from .process import describe_status

log = logging.getLogger("cadenza.master")

ENV = "PROMETHEUS_MULTIPROC_DIR"
RETRY = 1.0   # seconds before a run that could not be started is tried again


class MultiprocDirs:
    deadline = 60.0   # seconds a run may take (one waiting for a lock nobody releases): then it is killed

    def __init__(self, loop, base: Path, number: int):
        self.loop, self.base, self.number = loop, base, number
        self.path = base / f"gen-{number}"
        self.queue: list[list[str]] = []
        self.pending: list[int] = []     # dead workers not merged yet
        self.running: int | None = None
        self._overdue = None
        self._retry = None
        self.aside: list[Path] = []      # directories we set aside to fold (remove() takes only ours)

    @classmethod
    def setup(cls, gen) -> MultiprocDirs | None:
        base = Path(gen.control_sock.getsockname()).parent / "metrics" if gen.control_sock is not None else None
        if base is None:
            return None
        dirs = cls(gen.loop, base, gen.number)
        try:
            base.mkdir(mode=0o700, exist_ok=True)
            if dirs.path.exists():   # left by a master of this number that was killed: start afresh
                dirs.remove()
            dirs.path.mkdir(mode=0o700)
        except OSError as exc:
            log.error("metrics.multiprocess: cannot create %s: %s; the workers run without "
                      "%s", dirs.path, exc.strerror or exc, ENV)
            return None
        gen.pool.spec.env[ENV] = str(dirs.path)
        if not gen.inherited.heir:
            dirs._run("prune", str(base), dirs.path.name)
        return dirs

    def dead(self, pid: int) -> None:
        self.pending.append(pid)
        self._next()

    def fold_from(self, number: int) -> None:
        """Generation `number` is gone (or warm, with no worker): its figures join ours. Its
        directory is set aside at once (a rename), so that a next attempt of the same number,
        whose setup starts gen-N afresh, never meets the fold still to run."""
        src = self.base / f"gen-{number}"
        aside = self.base / f"gen-{number}.folding-{time.monotonic_ns()}"
        try:
            os.rename(src, aside)
        except FileNotFoundError:
            return          # folded already, or never made
        except OSError as exc:
            log.warning("metrics.multiprocess: cannot set %s aside: %s; folding it in place", src,
                        exc.strerror or exc)
            aside = src
        else:
            self.aside.append(aside)
        self._run("fold", str(aside), str(self.path))

    def remake(self) -> None:
        """Ours again after it was folded into a successor's (a rollback to a warm generation)."""
        try:
            self.path.mkdir(mode=0o700, exist_ok=True)
        except OSError as exc:
            log.error("metrics.multiprocess: cannot create %s: %s", self.path, exc.strerror or exc)

    def busy(self) -> bool:
        return self.running is not None or bool(self.queue or self.pending)

    def remove(self) -> None:
        """Its figures have nowhere to go (the service stops, or it is a stale directory): it goes,
        now (systemd removes RuntimeDirectory= at the stop too, `cadenza run` has none), with a
        run of the tool still under way (a fold would make it again) and what was set aside."""
        for timer in (self._overdue, self._retry):
            if timer is not None:
                timer.cancel()
        if self.running is not None:
            try:
                os.kill(self.running, signal.SIGKILL)
                os.waitpid(self.running, 0)
            except (ChildProcessError, ProcessLookupError):
                pass
            self.running = None
        self.queue.clear()
        for path in (self.path, *self.aside):
            shutil.rmtree(path, ignore_errors=True)

    def discard(self, number: int) -> None:
        """Generation `number` has gone and we stop: its figures have nowhere to go either."""
        shutil.rmtree(self.base / f"gen-{number}", ignore_errors=True)

    def _run(self, *args: str) -> None:
        self.queue.append(list(args))
        self._next()

    def _next(self) -> None:
        if self.running is not None or self._retry is not None:
            return
        if self.queue:
            args = self.queue.pop(0)
        elif self.pending:
            args, self.pending = ["merge", str(self.path), *map(str, self.pending)], []
        else:
            return
        argv = [sys.executable, "-m", "cadenza.tools.multiproc", *args]
        try:
            pid = os.posix_spawn(sys.executable, argv, {k: v for k, v in os.environ.items() if k != ENV})
        except OSError as exc:   # EAGAIN under TasksMax=, ENOMEM: the run is kept, and tried again
            log.error("metrics.multiprocess: cannot run %s: %s; trying again in %gs",
                      " ".join(argv[1:4]), exc.strerror or exc, RETRY)
            self.queue.insert(0, args)
            self._retry = self.loop.after(RETRY, self._retried)
            return
        self.running = pid
        self.loop.watch_child(pid, lambda status, a=args: self._done(a, status))
        self._overdue = self.loop.after(self.deadline, lambda a=args: self._kill(pid, a))

    def _retried(self) -> None:
        self._retry = None
        self._next()

    def _kill(self, pid: int, args: list[str]) -> None:
        if self.running == pid:
            log.error("metrics.multiprocess: %s %s still running after %gs (a lock on %s/.lock that is "
                      "never released?); killing it, the next run goes on", " ".join(args[:1]), args[1],
                      self.deadline, args[1])
            os.kill(pid, signal.SIGKILL)

    def _done(self, args: list[str], status: int) -> None:
        if self._overdue is not None:
            self._overdue.cancel()
            self._overdue = None
        self.running = None
        if not (os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0):
            log.error("metrics.multiprocess: %s %s %s", " ".join(args[:2]), describe_status(status),
                      "(its reason is above)")
        self._next()
