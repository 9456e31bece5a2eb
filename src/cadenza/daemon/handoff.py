"""What passes from generation N to generation N+1, both ends of it, in one place.

N starts N+1 with these fds at 3..n and these variables (everything else of N's own
environment that a next master must not see is dropped):

    fds 3..      the listeners, then the control socket    LISTEN_FDS, LISTEN_FDNAMES
    next fd      the hand-off channel (socketpair)         CADENZA_HANDOFF_FD
    next fd      the service's log (N's stderr)            CADENZA_LOG_FD
    next fd      a pidfd of N itself                       CADENZA_PREDECESSOR_FD
    next fd      the launcher N checked and execs by fd     CADENZA_EXEC_FD (closed by N+1)
                                                           CADENZA_GENERATION, CADENZA_OWNS,
                                                           NOTIFY_SOCKET, WATCHDOG_USEC

The channel carries lines. N+1 -> N: "progress TEXT", "ready", "failed REASON".
N -> N+1: "appointed" (MAINPID= names you), "totals JSON" (the service-wide counters, metrics.py)
then "main" (systemd took it), "stop".
N+1 learns that N is gone from the pidfd, which a dead channel cannot tell apart from a close.
"""

from __future__ import annotations

import os
import socket

from .process import PRIVATE_VARIABLES

CONTROL_FDNAME = "cadenza-control"
HANDOFF_VARIABLES = ("CADENZA_HANDOFF_FD", "CADENZA_LOG_FD", "CADENZA_PREDECESSOR_FD", "CADENZA_EXEC_FD",
                     "CADENZA_GENERATION", "CADENZA_OWNS", "CADENZA_PREDECESSOR")
MAX_LINE = 64 * 1024


class Channel:
    """A line protocol over a non-blocking stream socket."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        sock.setblocking(False)
        self._buffer = b""
        self.closed = False

    def fileno(self) -> int:
        return self.sock.fileno()

    def send(self, *lines: str) -> bool:
        if self.closed:
            return False
        data = b"".join(line.encode(errors="replace") + b"\n" for line in lines)
        try:
            self.sock.setblocking(True)   # a few bytes into an empty socketpair: never blocks long
            self.sock.settimeout(1.0)
            self.sock.sendall(data)
        except OSError:
            return False
        finally:
            if not self.closed:
                self.sock.setblocking(False)
        return True

    def receive(self) -> tuple[list[str], bool]:
        """(complete lines, whether the other end is gone)."""
        try:
            data = self.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return [], False
        except OSError:
            data = b""
        if not data:
            return self._split(final=True), True
        self._buffer += data
        if len(self._buffer) > MAX_LINE and b"\n" not in self._buffer:
            self._buffer = b""
        return self._split(), False

    def _split(self, final: bool = False) -> list[str]:
        *lines, self._buffer = self._buffer.split(b"\n")
        return [line.decode(errors="replace") for line in lines]

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.sock.close()


# ---- N's end ------------------------------------------------------------------------------------

def successor_environment(*, generation: int, names: list[str], owns: list[str],
                          notify_address: str | None, watchdog_usec: int, predecessor: int = 0) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in PRIVATE_VARIABLES + HANDOFF_VARIABLES}
    n = len(names)
    env.update({
        "LISTEN_FDS": str(n), "LISTEN_FDNAMES": ":".join(names),
        "CADENZA_GENERATION": str(generation), "CADENZA_OWNS": ",".join(owns),
        "CADENZA_PREDECESSOR": str(predecessor or generation - 1),   # not generation - 1 after a rollback
        "CADENZA_HANDOFF_FD": str(3 + n), "CADENZA_LOG_FD": str(4 + n),
        "CADENZA_PREDECESSOR_FD": str(5 + n), "CADENZA_EXEC_FD": str(6 + n),
    })
    if notify_address:
        env["NOTIFY_SOCKET"] = notify_address
    if watchdog_usec:
        env["WATCHDOG_USEC"] = str(watchdog_usec)
    return env


# ---- N+1's end ----------------------------------------------------------------------------------

class Inheritance:
    """What this master received from its predecessor; `channel` is None for a first generation."""

    def __init__(self, generation: int = 1, owns: frozenset[str] = frozenset(), channel: Channel | None = None,
                 log_fd: int | None = None, predecessor_fd: int | None = None, predecessor: int = 0):
        self.generation = generation
        self.predecessor = predecessor or generation - 1   # the number of the generation we follow
        self.owns = owns
        self.channel = channel
        self.log_fd = log_fd
        self.predecessor_fd = predecessor_fd

    @classmethod
    def from_environ(cls, environ=None) -> "Inheritance":
        """Consumes the variables, so that nothing of them reaches a worker."""
        env = os.environ if environ is None else environ
        values = {name: env.pop(name, "") for name in HANDOFF_VARIABLES}
        if values["CADENZA_EXEC_FD"].isdigit():
            _close(int(values["CADENZA_EXEC_FD"]))   # the launcher we were exec'd from: done with
        owns = frozenset(filter(None, values["CADENZA_OWNS"].split(",")))
        generation = int(values["CADENZA_GENERATION"]) if values["CADENZA_GENERATION"].isdigit() else 1
        predecessor = int(values["CADENZA_PREDECESSOR"]) if values["CADENZA_PREDECESSOR"].isdigit() else 0
        fds = [values[k] for k in ("CADENZA_HANDOFF_FD", "CADENZA_LOG_FD", "CADENZA_PREDECESSOR_FD")]
        if not all(fd.isdigit() for fd in fds):
            return cls(generation, owns)
        chan_fd, log_fd, pred_fd = (int(fd) for fd in fds)
        for fd in (chan_fd, log_fd, pred_fd):
            os.set_inheritable(fd, False)
        return cls(generation, owns, Channel(socket.socket(fileno=chan_fd)), log_fd, pred_fd, predecessor)

    @property
    def heir(self) -> bool:
        return self.channel is not None

    def say(self, line: str) -> None:
        if self.channel is not None:
            self.channel.send(line)

    def redirect_output(self) -> None:
        """Once ready, our output goes straight to the service's log, not through master N."""
        if self.log_fd is not None:
            os.dup2(self.log_fd, 1)
            os.dup2(self.log_fd, 2)

    def close_channel(self) -> None:
        if self.channel is not None:
            self.channel.close()

    def close_predecessor(self) -> None:
        if self.predecessor_fd is not None:
            _close(self.predecessor_fd)
            self.predecessor_fd = None


def _close(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass
