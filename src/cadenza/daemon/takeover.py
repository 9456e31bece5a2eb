"""The actions of the table for a generation that is handed the service (it is N+1): what its
predecessor says on the channel, and what its predecessor's end means. Part of Generation."""

from __future__ import annotations

import logging
import os
import time

from .. import exitcodes
from .policy import Event, State
from .succession import Outcome

log = logging.getLogger("cadenza.master")


class Takeover:
    def _on_channel(self) -> None:
        channel = self.inherited.channel
        lines, gone = channel.receive()
        for line in lines:
            if line.startswith("totals "):
                self.totals.carry(line[7:], self.pool.restarts if self.predecessor_number is not None else None)
                continue
            if self._canary_line(line):
                continue
            verb, _, rest = line.partition(" ")
            if verb in ("keep", "warm", "rollback", "expire"):
                if verb == "keep":
                    self.keep_channel = True
                else:
                    self.handle({"warm": Event.WARM_NOTICE, "rollback": Event.ROLLBACK_NOTICE,
                                 "expire": Event.WARM_EXPIRED}[verb], text=rest)
                continue
            notice = {"appointed": Event.APPOINTED_NOTICE, "main": Event.MAIN_NOTICE,
                      "stop": Event.STOP_NOTICE}.get(line)
            if notice is None:
                log.error("internal error: unknown line %r from the previous generation", line[:80])
            else:
                self.handle(notice, source="the previous generation", why="the main generation stops")
        if gone and not channel.closed:
            self.loop.remove(channel)
            channel.close()
            self.handle(Event.PREDECESSOR_GONE, why="the main generation has gone")

    def _on_predecessor_exit(self) -> None:
        self.loop.remove(self.inherited.predecessor_fd)
        self.inherited.close_predecessor()
        self.handle(Event.PREDECESSOR_GONE, why="the main generation has gone")

    def on_appointed(self, **_) -> None:
        self.state = State.APPOINTED

    def on_made_main(self, **_) -> None:
        channel = self.inherited.channel
        if not channel.closed and not self.keep_channel:    # kept: N may stay warm (warm.py)
            self.loop.remove(channel)
            channel.close()
        self.systemd.muted = False
        self.left_warm = False          # rolled back to: main again, and so possibly the last (warm.py)
        self.state = State.TAKING_OVER if self.inherited.predecessor_fd is not None else State.SERVING
        log.info("generation %d is main%s", self.number,
                 "; the previous generation still drains" if self.state is State.TAKING_OVER else "")
        self._start_control()
        self.last_upgrade = Outcome(True, self.number, "became main", os.getpid(), [], self.started,
                                    time.monotonic())
        self._last_status = ""
        if self.watchdog_usec:
            self.systemd.send(watchdog=1)

    def on_orphaned(self, **_) -> None:
        log.error("the previous generation went away before naming generation %d in MAINPID=; stopping",
                  self.number)
        self._stop(exitcodes.UNCLEAN_HANDOVER)

    def on_predecessor_gone(self, **_) -> None:
        if self.inherited.predecessor_fd is None and self.warm is None and self.state is State.SERVING:
            return      # told twice (its channel closed, its pidfd): once is enough
        if self.inherited.predecessor_fd is not None:
            self.loop.remove(self.inherited.predecessor_fd)
        self.inherited.close_predecessor()
        channel = self.inherited.channel
        if channel is not None and not channel.closed:
            self.loop.remove(channel)
            channel.close()
        if self.warm is not None:
            log.info("generation %d (warm) has gone", self.warm.generation)
            self.warm = None
        if self.multiproc is not None:
            gone = self.inherited.predecessor if self.predecessor_number is None else self.predecessor_number
            if self.state.main or self.state in (State.COMMITTED, State.LEAVING):   # our successor folds ours
                self.multiproc.fold_from(gone)
            elif self.state is State.STOPPING and not self.left_warm:   # a warm one, told to leave by our stop
                self.multiproc.discard(gone)
        if self.state is State.TAKING_OVER:
            log.info("the previous generation has gone: generation %d serves alone", self.number)
            self.state = State.SERVING
            deferred, self.deferred = self.deferred, []
            for source, watcher in deferred:
                self.handle(Event.UPGRADE, source=source, watcher=watcher)
        self._maybe_exit()
