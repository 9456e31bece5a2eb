"""Helpers of tests/test_systemd_os_faults.py: a real TasksMax= limit, HTTP clients that keep
every failure and say which worker answered, an ASGI app without threads, an unprivileged peer
that holds control connections open, and looks at APP.service from the host (the same as
test_systemd_upgrade's, kept here so this file depends on nothing being rewritten)."""
from __future__ import annotations

import collections
import contextlib
import http.client
import select
import subprocess
import threading
import time
from pathlib import Path

import tally
from handover_fixtures import answer, heir, journal_has, main_pid, poll, status, title, unit_procs  # noqa: F401 - shared
from procs import get

APP = "web"
UNIT = f"{APP}.service"

# Appended to deploy.APP: the same answers, served without the WSGI thread pool, so that a
# worker never needs a new task per request while the unit sits at its TasksMax=.
ASGI = '''
async def asgi(scope, receive, send):
    if scope["type"] != "http":
        return
    headers = {}
    environ = {"QUERY_STRING": scope["query_string"].decode(), "PATH_INFO": scope["path"]}
    body = b"".join(app(environ, lambda status, h: headers.update(h)))
    await send({"type": "http.response.start", "status": 200,
                "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()]})
    await send({"type": "http.response.body", "body": body})
'''
ASGI_RELEASE = {"app_body": ASGI, "app": "app:asgi"}   # AppRoot.release()'s settings for it


def _v1_pids_root() -> Path | None:
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fstype, _, options = right.split()[:3]
            if fstype == "cgroup" and "pids" in options.split(","):
                return Path(left.split()[4])
    return None


class TaskLimit:
    """TasksMax= on a unit as a real kernel limit: fork() and clone() fail with EAGAIN at it.

    Always `systemctl set-property --runtime UNIT TasksMax=N`. systemd enforces it with the pids
    controller of the namespace's cgroup2 when that has one. On a hybrid host pids is bound to
    the v1 hierarchy and cgroup2 offers none (a controller lives in one hierarchy only), so the
    limit goes, as systemd's hybrid mode would put it, on a v1 pids cgroup holding the unit's
    processes; whatever they fork inherits it.
    """

    def __init__(self, ns, unit: str):
        self.ns, self.unit = ns, unit
        self.v2 = "pids" in (ns.cgroup / "cgroup.controllers").read_text().split()
        self.v1_dir: Path | None = None
        if not self.v2:
            root = _v1_pids_root()
            assert root is not None, "no pids controller: neither in the namespace's cgroup2 nor in a v1 hierarchy"
            self.v1_dir = root / f"sdns-{ns.id}-{unit}"
            self.v1_dir.mkdir()
            for _ in range(3):   # until no process of the unit is outside (one may fork meanwhile)
                missing = self._unit_pids() - set(self._read("cgroup.procs").split())
                for pid in missing:
                    with contextlib.suppress(ProcessLookupError):
                        (self.v1_dir / "cgroup.procs").write_text(pid)
            assert not self._unit_pids() - set(self._read("cgroup.procs").split())

    def _unit_pids(self) -> set[str]:
        cgroup = self.ns.show(self.unit, "ControlGroup")["ControlGroup"]
        return set((self.ns.cgroup / cgroup.lstrip("/") / "cgroup.procs").read_text().split())

    def _dir(self) -> Path:
        if self.v1_dir is not None:
            return self.v1_dir
        return self.ns.cgroup / self.ns.show(self.unit, "ControlGroup")["ControlGroup"].lstrip("/")

    def _read(self, name: str) -> str:
        return (self._dir() / name).read_text()

    def current(self) -> int:
        return int(self._read("pids.current"))

    def failures(self) -> int:
        """How many forks the limit has refused so far (pids.events "max")."""
        return int(dict(line.split() for line in self._read("pids.events").splitlines())["max"])

    def set(self, n: int | None) -> None:
        """N tasks, or None for no limit."""
        self.ns.systemctl("set-property", "--runtime", self.unit,
                          f"TasksMax={'infinity' if n is None else n}", check=True)
        if self.v1_dir is not None:
            (self.v1_dir / "pids.max").write_text("max" if n is None else str(n))
        assert self._read("pids.max").strip() == ("max" if n is None else str(n))

    def close(self) -> None:
        if self.v1_dir is None or not self.v1_dir.exists():
            return
        deadline = time.monotonic() + 10
        while True:   # back to the root, then the empty cgroup goes
            for pid in self._read("cgroup.procs").split():
                with contextlib.suppress(ProcessLookupError):
                    (self.v1_dir.parent / "cgroup.procs").write_text(pid)
            try:
                self.v1_dir.rmdir()
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.01)


class Clients:
    """Sequential GETs from threads beside the test: one per new connection and/or a run on one
    keep-alive connection. Every failure is kept; `keepalive_pid` is the (namespace) pid of the
    worker that holds the keep-alive connection, answers being "release rN pid P"."""

    def __init__(self, port: int, new_connections: bool = True, keepalive: bool = True):
        self.port, self.failures, self.seen = port, [], collections.Counter()
        self.keepalive_pid: int | None = None
        self._done = threading.Event()
        self._conn = http.client.HTTPConnection("127.0.0.1", port, timeout=15)
        loops = [("new-connection", lambda: get(port, timeout=15))] if new_connections else []
        loops += [("keep-alive", self._keepalive)] if keepalive else []
        self._threads = [threading.Thread(target=self._loop, args=loop, daemon=True) for loop in loops]
        for thread in self._threads:
            thread.start()

    def _keepalive(self) -> tuple[int, str]:
        try:   # http.client opens a new connection by itself after a "Connection: close"
            self._conn.request("GET", "/")
            resp = self._conn.getresponse()
            return resp.status, resp.read().decode()
        except Exception:
            self._conn.close()
            raise

    def _loop(self, name: str, request) -> None:
        while not self._done.wait(0.005):   # pacing only
            try:
                status, body = request()
            except Exception as exc:  # noqa: BLE001 - every failure is what the test counts
                self.failures.append(f"{name} {time.strftime('%T')}: {exc!r}")
                continue
            if status != 200:
                self.failures.append(f"{name} {time.strftime('%T')}: HTTP {status} {body[:200]!r}")
                continue
            release, _, pid = body.strip().partition(" pid ")
            self.seen[release] += 1
            if name == "keep-alive":
                self.keepalive_pid = int(pid)

    def wait_keepalive_pid(self, timeout: float = 15) -> int:
        deadline = time.monotonic() + timeout
        while self.keepalive_pid is None:
            assert time.monotonic() < deadline, f"no keep-alive answer in {timeout}s: {self.failures[:5]}"
            time.sleep(0.01)
        return self.keepalive_pid

    def stop(self) -> Clients:
        if not self._done.is_set():
            self._done.set()
            for thread in self._threads:
                thread.join(timeout=60)
            self._conn.close()
            tally.add(sum(self.seen.values()), len(self.failures))
        return self

    def check(self) -> collections.Counter:
        self.stop()
        assert not self.failures, f"{len(self.failures)} failed request(s): {self.failures[:10]}"
        assert sum(self.seen.values()) > 10, self.seen
        return self.seen


# Run as an unprivileged user: keeps WANT connections to the control socket open and sends
# nothing; one the master hangs up is opened again (at most every 0.1 s, so a master that
# refuses at once is not flooded). Prints "held WANT" once all were connected at the same time;
# exits when its stdin closes.
HOLDER = r'''
import select, socket, sys, time
path, want = sys.argv[1], int(sys.argv[2])
held, told = [], False
while True:
    while len(held) < want:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(path)
        except OSError as exc:
            print("cannot connect:", exc, flush=True)
            sys.exit(1)
        s.setblocking(False)
        held.append(s)
    if not told:
        print("held", len(held), flush=True)
        told = True
    for s in select.select([sys.stdin, *held], [], [], 0.5)[0]:
        if s is sys.stdin:
            sys.exit(0)
        try:
            data = s.recv(4096)
        except OSError:
            data = b""
        if not data:
            held.remove(s)
            s.close()
    time.sleep(0.1)
'''


@contextlib.contextmanager
def control_connections_held(ns, python: str, path, count: int, uid: int, gid: int):
    """HOLDER inside the namespace as uid/gid and no other group (setpriv: a setuid child), from
    the moment it holds `count` connections to the end of the block."""
    proc = ns.popen("setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups",
                    python, "-I", "-c", HOLDER, str(path), str(count),
                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        ready, _, _ = select.select([proc.stdout], [], [], 15)
        line = proc.stdout.readline().strip() if ready else "(nothing within 15s)"
        assert line == f"held {count}", f"uid {uid} could not hold {count} control connections: {line}"
        yield proc
        assert proc.poll() is None, f"the holder ended early: {proc.stdout.read()}"
    finally:
        proc.stdin.close()   # it exits; nsenter with it
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
