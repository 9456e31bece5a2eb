"""A built-in worker run for real, without a master: the test owns its listening socket (fd 3,
LISTEN_FDS=1) and plays NOTIFY_SOCKET, and reads what the worker logs. Shared by the worker's
tests (test_worker_drain.py, test_worker_http.py)."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

# The engines, chosen as an operator would, with `[http] protocol` and `loop` (CADENZA_HTTP).
ENGINES = {"httptools": {"protocol": "httptools", "loop": "uvloop"},
           "h11": {"protocol": "h11", "loop": "asyncio"}}

REQUEST = b"GET / HTTP/1.1\r\nHost: test\r\n\r\n"
SUCCESSOR = b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\nConnection: close\r\n\r\nsuccessor"
# The worker with its own logger at DEBUG: the lines it keeps out of a production log (a
# keep-alive close outside a drain, say) are what some tests look for.
DEBUG_MAIN = """import logging, sys
logging.getLogger("cadenza.worker").setLevel(logging.DEBUG)
from cadenza.worker.app import main
sys.exit(main())
"""
# Puts the listener at fd 3 and execs the worker: the pid stays, so LISTEN_PID is right.
LAUNCH = f"""import os, sys
fd = int(sys.argv[1])
if fd != 3:
    os.dup2(fd, 3)
    os.close(fd)
os.environ["LISTEN_PID"] = str(os.getpid())
if sys.argv[3:] == ["debug"]:
    os.execv(sys.executable, [sys.executable, "-c", {DEBUG_MAIN!r}, sys.argv[2]])
os.execv(sys.executable, [sys.executable, "-m", "cadenza.worker.app", sys.argv[2]])
"""


class Worker:
    """`listener`: a listening socket to pass instead of a fresh TCP one on 127.0.0.1 (a unix
    socket, say); `port` is then None. `debug`: the worker's own logger at DEBUG."""

    def __init__(self, tmp: Path, app: str = "cadenza.demo:app", env: dict | None = None, *,
                 listener: socket.socket | None = None, debug: bool = False):
        if listener is None:
            listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            listener.bind(("127.0.0.1", 0))
            listener.listen(1024)
        self.listener = listener
        self.port = listener.getsockname()[1] if listener.family != socket.AF_UNIX else None
        self.inbox = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.inbox.bind(str(tmp / f"notify-{time.monotonic_ns()}"))
        self.messages: list[str] = []   # every datagram the worker sent to NOTIFY_SOCKET, in order
        full_env = {k: v for k, v in os.environ.items() if not k.startswith(("LISTEN_", "NOTIFY_"))}
        full_env.update(LISTEN_FDS="1", NOTIFY_SOCKET=self.inbox.getsockname(), **(env or {}))
        fd = self.listener.fileno()
        self.proc = subprocess.Popen([sys.executable, "-c", LAUNCH, str(fd), app]
                                     + (["debug"] if debug else []), pass_fds=(fd,),
                                     cwd=tmp, env=full_env, stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        self._eof = False
        self._cond = threading.Condition()
        threading.Thread(target=self._read_stderr, daemon=True).start()

    def _read_stderr(self) -> None:
        for line in self.proc.stderr:
            with self._cond:
                self.lines.append(line.rstrip("\n"))
                self._cond.notify_all()
        with self._cond:
            self._eof = True
            self._cond.notify_all()

    def _receive(self, timeout: float) -> bool:
        """Read the next datagram from the worker, waiting up to `timeout` (0: not at all)."""
        self.inbox.settimeout(timeout)
        try:
            data = self.inbox.recv(4096)
        except (BlockingIOError, TimeoutError):
            return False
        self.messages.append(data.decode("utf-8", "replace"))
        return True

    def notified(self, field: str) -> bool:
        """Whether the worker has sent `field` (such as "READY=1") so far."""
        while self._receive(0):
            pass
        return any(field in message.split("\n") for message in self.messages)

    def values(self, name: str) -> list[str]:
        """Every value the worker sent for the notify field `name` (such as "CADENZA_REQUESTS"), in order."""
        while self._receive(0):
            pass
        return [line[len(name) + 1:] for message in self.messages for line in message.split("\n")
                if line.startswith(name + "=")]

    def wait_notified(self, field: str, timeout: float = 15) -> float:
        """Wait until the worker has sent the line `field` (any value when it ends with "="); the
        time.monotonic() it was read at."""
        deadline = time.monotonic() + timeout
        while not (self.values(field[:-1]) if field.endswith("=") else self.notified(field)):
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"the worker never sent {field!r} (it sent {self.messages}):\n{self.log()}")
            self._receive(left)
        return time.monotonic()

    def statuses(self) -> list[str]:
        """Every STATUS= the worker sent so far, in order."""
        while self._receive(0):
            pass
        return [line[len("STATUS="):] for message in self.messages for line in message.split("\n")
                if line.startswith("STATUS=")]

    def wait_ready(self, timeout: float = 15) -> None:
        deadline = time.monotonic() + timeout
        while not self.notified("READY=1"):
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"the worker sent no READY=1 within {timeout}s:\n{self.log()}")
            if self.proc.poll() is not None and not self._receive(0):
                raise AssertionError(f"the worker exited {self.proc.returncode} before READY=1 "
                                     f"(STATUS={self.statuses()}):\n{self.log()}")
            self._receive(min(left, 0.1))

    def wait_exit(self, timeout: float = 15) -> int:
        """The worker's exit code, once it exited and its stderr is read to the end."""
        code = self.proc.wait(timeout)
        with self._cond:
            self._cond.wait_for(lambda: self._eof, timeout)
        return code

    def wait_log(self, text: str, timeout: float = 15) -> str:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for line in self.lines:
                    if text in line:
                        return line
                left = deadline - time.monotonic()
                if left <= 0 or self._eof:
                    raise AssertionError(f"worker never logged {text!r}:\n{self.log()}")
                self._cond.wait(left)

    def drain(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.wait_log("Shutting down")

    def log(self) -> str:
        return "\n".join(self.lines)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        self.listener.close()
        self.inbox.close()



class Reply:
    """What a client saw for one request: "ok", "eof" (clean EOF before any byte), "reset",
    "truncated" (some bytes, then EOF)."""

    def __init__(self, sock: socket.socket | None, kind: str = "eof"):
        self.kind, self.headers, self.body = kind, {}, b""
        if sock is not None:
            self._read(sock)

    def _read(self, sock: socket.socket) -> None:
        data = b""
        try:
            while b"\r\n\r\n" not in data:
                chunk = sock.recv(65536)
                if not chunk:
                    self.kind = "truncated" if data else "eof"
                    return
                data += chunk
            head, _, self.body = data.partition(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            self.status = int(lines[0].split()[1])
            self.headers = {k.strip().lower(): v.strip() for k, _, v in (x.partition(":") for x in lines[1:])}
            length = int(self.headers.get("content-length", "0"))
            while len(self.body) < length:
                chunk = sock.recv(65536)
                if not chunk:
                    self.kind = "truncated"
                    return
                self.body += chunk
            self.kind = "ok"
        except ConnectionResetError:
            self.kind = "reset"

    @property
    def closes(self) -> bool:
        return self.headers.get("connection", "").lower() == "close"

    def __repr__(self) -> str:
        return f"<{self.kind} {self.headers} {self.body[:40]!r}>"


def clean_eof(sock: socket.socket) -> bool:
    """After a response with "Connection: close": the worker's FIN, not an RST."""
    try:
        return sock.recv(65536) == b""
    except ConnectionResetError:
        return False


