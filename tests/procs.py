"""Running a real cadenza master outside systemd, and listening to what it tells NOTIFY_SOCKET."""

from __future__ import annotations

import http.client
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import tally

VENV_BIN = Path(sys.executable).parent
CADENZA = str(VENV_BIN / "cadenza")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(port: int, path: str = "/", timeout: float = 10.0, host: str = "127.0.0.1") -> tuple[int, str]:
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read().decode()
    finally:
        conn.close()


class Client:
    """Sequential GETs on fresh connections from a thread; every failure is kept, by kind."""

    def __init__(self, port: int):
        self.port, self.ok, self.failures = port, 0, []
        self._stop = threading.Event()
        # A daemon: a test that fails before stop() must not keep the run from ending.
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                status, _ = get(self.port, timeout=15)
                if status == 200:
                    self.ok += 1
                else:
                    self.failures.append(status)
            except Exception as exc:  # noqa: BLE001 - every failure counts
                self.failures.append(repr(exc))

    def stop(self) -> "Client":
        self._stop.set()
        self._thread.join()
        tally.add(self.ok, len(self.failures))
        return self


class Master:
    """`cadenza run ...` as a child of the test, with the test playing systemd's NOTIFY_SOCKET."""

    def __init__(self, tmp: Path, *args: str, cwd: Path | None = None, env: dict | None = None):
        self.tmp = tmp
        self.notify_path = str(tmp / f"notify-{time.monotonic_ns()}.sock")
        self.inbox = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.inbox.bind(self.notify_path)
        self.messages: list[dict[str, str]] = []
        self.cursor = 0
        self._arrived = threading.Condition()
        threading.Thread(target=self._read_notifications, daemon=True).start()
        self.log_path = tmp / f"master-{time.monotonic_ns()}.log"
        self._log = open(self.log_path, "wb")
        full_env = {k: v for k, v in os.environ.items() if not k.startswith(("LISTEN_", "NOTIFY_", "JOURNAL_"))}
        full_env.update(env or {})
        full_env["NOTIFY_SOCKET"] = self.notify_path
        self.proc = subprocess.Popen([CADENZA, "run", *args], cwd=cwd or tmp, env=full_env,
                                     stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)
        self.pid = self.proc.pid

    def _read_notifications(self) -> None:
        # Reads like systemd does, as they come: a BARRIER=1 fd is closed on receipt.
        while True:
            try:
                data = self.inbox.recv(65536)
            except OSError:
                return
            msg = dict(line.split("=", 1) for line in data.decode().split("\n") if "=" in line)
            with self._arrived:
                self.messages.append(msg)
                self._arrived.notify_all()

    def wait_for(self, predicate, timeout: float = 15.0) -> dict[str, str]:
        """Block until a message not yet matched satisfies `predicate`.

        Messages are consumed in order: a later wait_for only sees what came after this match.
        """
        deadline = time.monotonic() + timeout
        with self._arrived:
            while True:
                while self.cursor < len(self.messages):
                    msg = self.messages[self.cursor]
                    self.cursor += 1
                    if predicate(msg):
                        return msg
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(f"no matching notification in {timeout}s; got {self.messages[-5:]}\n"
                                         f"log:\n{self.log()}")
                self._arrived.wait(remaining)

    def wait_ready(self, timeout: float = 15.0) -> dict[str, str]:
        return self.wait_for(lambda m: m.get("READY") == "1", timeout)

    def wait_status(self, text: str, timeout: float = 15.0) -> dict[str, str]:
        return self.wait_for(lambda m: text in m.get("STATUS", ""), timeout)

    def workers(self) -> list[int]:
        return children(self.pid)

    def signal(self, sig: int) -> None:
        os.kill(self.pid, sig)

    def wait_exit(self, timeout: float = 30.0) -> int:
        return self.proc.wait(timeout)

    def wait_log(self, text: str, timeout: float = 15.0) -> None:
        """For events only the log shows (a worker beginning its drain)."""
        deadline = time.monotonic() + timeout
        while text not in self.log():
            if time.monotonic() > deadline:
                raise AssertionError(f"{text!r} not logged in {timeout}s:\n{self.log()}")
            time.sleep(0.02)

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def close(self) -> None:
        if self.proc.poll() is None:
            # Each worker leads a process group of its own; with preload they are the preloader's.
            for worker in descendants(self.pid):
                try:
                    os.killpg(worker, signal.SIGKILL)
                except OSError:   # gone, or a fork that is no group's leader (yet)
                    pass
            os.killpg(self.pid, signal.SIGKILL)
            self.proc.wait()
        self.inbox.close()
        self._log.close()
        # Every test of a master also checks that no process of it hit the error guard (the
        # loop's, the control server's, boot's), which would otherwise only be logged.
        text = self.log_path.read_text(errors="replace")
        if "please report" in text:
            at = text.index("please report")
            raise AssertionError(f"the master logged an internal error:\n{text[max(0, at - 300):at + 3000]}")


def children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except FileNotFoundError:
        return []
    return [int(p) for p in text.split()]


def wait(predicate, timeout: float = 20.0, what: str = "condition"):
    """The predicate's first true value, polled every 20 ms; AssertionError naming `what` after
    `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached in {timeout}s")
        time.sleep(0.02)


def descendants(pid: int) -> list[int]:
    found = []
    for child in children(pid):
        found += [child, *descendants(child)]
    return found


def cmdline(pid: int) -> str:
    """"" once it has gone: a child listed a moment ago may have exited since."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
    except OSError:
        return ""


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:   # gone, or going (ESRCH)
        return False
    return state != "Z"


def accepted(port: int, client_port: int) -> bool:
    """Has a worker accept()ed our connection?  A queued one has no socket inode yet."""
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        f = line.split()
        if int(f[1].split(":")[1], 16) == port and int(f[2].split(":")[1], 16) == client_port:
            return f[9] != "0"
    return False


def self_signed(directory: Path, subject_alt_name: str) -> tuple[Path, Path]:
    """A self-signed certificate (cert.pem) and its key (key.pem) in `directory`, for
    `subject_alt_name` ("DNS:localhost", "IP:127.0.0.1"), with the key usage that Python 3.13's
    strict X.509 checks ask of a CA certificate."""
    directory.mkdir(parents=True, exist_ok=True)
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=localhost",
                    "-days", "1", "-addext", f"subjectAltName={subject_alt_name}",
                    "-addext", "keyUsage=critical,digitalSignature,keyEncipherment,keyCertSign",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    return cert, key
