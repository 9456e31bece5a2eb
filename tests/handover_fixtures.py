"""What the real-systemd upgrade tests share (test_systemd_upgrade.py, test_systemd_handover.py):
an app root served by a socket-activated APP.service (`site`), HTTP clients that count every
failure (`Hammer`, `slow_request`), and looks at the unit from the host (pids through its
cgroup, the journal, the control socket).  The hand-over tests add a frozen systemd (`frozen`),
`supervisorctl upgrade` read line by line (`Upgrade`) and a sampler of the unit's processes
(`Sampler`, `masters`).

Test modules load it with `pytest_plugins = ("handover_fixtures",)` after importing names from
it, too late for pytest to rewrite its asserts (they carry their own messages): PYTEST_DONT_REWRITE.
"""
from __future__ import annotations

import collections
import contextlib
import http.client
import json
import os
import queue
import re
import signal
import socket
import subprocess
import threading
import time
import typing
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest

import tally
from deploy import AppRoot
from procs import accepted, alive, free_port, get

APP = "web"
UNIT = f"{APP}.service"
CLIENTS = ThreadPoolExecutor(max_workers=16)   # HTTP clients beside the test; .result() re-raises


class Hammer:
    """Sequential GETs on new connections, and on `keepalive` keep-alive connections, until check()."""

    def __init__(self, port: int, keepalive: int = 1, context=None, new_connection=None):
        """With an ssl.SSLContext as `context`, HTTPS; `new_connection` is then the
        (status, body) of one request on a new connection."""
        self.port, self.done, self.context = port, threading.Event(), context
        self.failures: list[str] = []
        self.seen: collections.Counter[str] = collections.Counter()   # "release rN" -> answers
        self.clients = [CLIENTS.submit(self._loop, "new-connection", new_connection or (lambda: get(port))),
                        *(CLIENTS.submit(self._keepalive) for _ in range(keepalive))]

    def _loop(self, name: str, request) -> None:
        while not self.done.wait(0.005):   # only pacing, so the masters are not starved of CPU
            try:
                status, body = request()
            except Exception as exc:  # noqa: BLE001 - every failure is what the test counts
                self.failures.append(f"{name} {time.strftime('%T')}: {exc!r}")
                continue
            self.seen[body.split(" pid")[0] if status == 200 else f"HTTP {status}"] += 1

    def _keepalive(self) -> None:
        conn = (http.client.HTTPConnection("127.0.0.1", self.port, timeout=10) if self.context is None
                else http.client.HTTPSConnection("127.0.0.1", self.port, timeout=10, context=self.context))

        def request():   # http.client reconnects by itself after a "Connection: close"
            try:
                conn.request("GET", "/")
                resp = conn.getresponse()
                try:
                    return resp.status, resp.read().decode()
                except http.client.IncompleteRead as exc:   # say which worker, and what it promised
                    raise http.client.HTTPException(f"{exc!r} after headers {resp.getheaders()}") from exc
            except Exception:
                conn.close()   # start afresh; this request still counts as failed
                raise
        self._loop("keep-alive", request)
        conn.close()

    def finish(self) -> list[str]:
        if not self.done.is_set():
            self.done.set()
            for client in self.clients:
                client.result(timeout=60)
            tally.add(sum(self.seen.values()), len(self.failures))
        return self.failures

    def check(self) -> collections.Counter:
        self.finish()
        assert not self.failures, f"{len(self.failures)} failed request(s): {self.failures[:10]}"
        assert sum(self.seen.values()) > 20 and not any(k.startswith("HTTP") for k in self.seen), self.seen
        return self.seen


@pytest.fixture
def site(systemd, request):
    """APP serving release r1 from its pinned launcher, socket-activated.  Other AppRoot settings,
    for every release: @pytest.mark.parametrize("site", [{"upgrade_timeout": 5}], indirect=True)."""
    return make_site(systemd, **getattr(request, "param", {}))


def start_site(systemd, app: AppRoot) -> AppRoot:
    """`app`, with r1 deployed, pinned, its units written and started; r1 answers."""
    app.pin()
    for name, text in app.units().items():
        systemd.write_unit(name, text)
    systemd.systemctl("daemon-reload", check=True)
    systemd.systemctl("start", f"{APP}.socket", UNIT, check=True)
    assert answer(app) == "release r1"
    return app


def make_site(systemd, **settings) -> AppRoot:
    """The `site` fixture's work, with AppRoot's settings (upgrade_timeout=...) for all releases."""
    app = AppRoot(systemd.state, APP, free_port(), **settings)
    app.deploy("r1")
    return start_site(systemd, app)


@pytest.fixture
def hammer(site):
    h = Hammer(site.port)
    yield h
    h.finish()


def answer(app: AppRoot) -> str:
    status, body = get(app.port)
    assert status == 200, body
    return body.split(" pid")[0]


def poll(probe, timeout: float = 15.0, what: str = "condition"):
    """probe()'s first truthy value; only for states that nothing announces to the test."""
    deadline = time.monotonic() + timeout
    while not (value := probe()):
        assert time.monotonic() < deadline, f"no {what} within {timeout}s"
        time.sleep(0.01)
    return value


def title(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
    except OSError:   # gone, or going (ProcessLookupError, ESRCH)
        return ""


def unit_procs(ns) -> dict[int, int]:
    """{namespace pid: host pid} of every live process in the unit's cgroup."""
    cgroup = ns.show(UNIT, "ControlGroup")["ControlGroup"]   # "" once the unit stopped
    found = {}
    for pid in (ns.cgroup / cgroup.lstrip("/") / "cgroup.procs").read_text().split() if cgroup else ():
        with contextlib.suppress(OSError, IndexError):   # it exited while we looked
            nspid = Path(f"/proc/{pid}/status").read_text().split("NSpid:")[1].split("\n")[0].split()[-1]
            if alive(int(pid)):
                found[int(nspid)] = int(pid)
    return found


def main_pid(ns) -> tuple[str, int]:
    """MainPID as systemd says it, and the host pid of that process."""
    pid = ns.show(UNIT, "MainPID")["MainPID"]
    return pid, unit_procs(ns)[int(pid)]


def heir(ns, app: AppRoot) -> int | None:
    """Host pid of the next generation's master while an upgrade runs, as master N reports it
    (not as its child: cadenza double-forks it so that systemd adopts it)."""
    upgrading = status(app)["upgrading"]
    return upgrading and unit_procs(ns).get(upgrading["pid"])


class Answer(typing.NamedTuple):
    started: float
    ended: float
    status: int
    release: str
    pid: int | None       # the worker's, in the namespace ("release TAG pid PID")
    keepalive: bool


class Crowd:
    """GETs from `fresh` threads, each on a new connection (so that connections wait for whichever
    worker accepts first, as under real load), and from one thread on a keep-alive connection,
    until stop(). Every answer is kept (an Answer), every exception too."""

    def __init__(self, port: int, fresh: int = 3):
        self.port = port
        self.answers: list[Answer] = []
        self.errors: list[str] = []
        self._done = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(keepalive,), daemon=True)
                         for keepalive in [False] * fresh + [True]]
        for thread in self._threads:
            thread.start()

    def _run(self, keepalive: bool) -> None:
        conn = None
        while not self._done.wait(0.01):   # only pacing, so the masters are not starved of CPU
            started = time.monotonic()
            try:
                # http.client opens a new connection by itself after a "Connection: close"
                conn = conn or http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
                conn.request("GET", "/")
                response = conn.getresponse()
                body = response.read().decode()
            except Exception as exc:  # noqa: BLE001 - every failure is what the test counts
                self.errors.append(f"{'keep-alive' if keepalive else 'new-connection'} "
                                   f"{time.strftime('%T')}: {exc!r}")
                if conn is not None:   # start afresh; this request still counts as failed
                    conn.close()
                    conn = None
                continue
            if not keepalive:
                conn.close()
                conn = None
            words = body.split()
            pid = int(words[3]) if len(words) > 3 and words[3].isdigit() else None
            self.answers.append(Answer(started, time.monotonic(), response.status,
                                       words[1] if len(words) > 1 else body, pid, keepalive))
        if conn is not None:
            conn.close()

    def stop(self, failing: str | None = None) -> Crowd:
        """Stops the threads; `failing` names the release whose 5xx are its own (not a loss)."""
        if not self._done.is_set():
            self._done.set()
            for thread in self._threads:
                thread.join(30)
            lost = len(self.errors) + len(self.failures(failing))
            tally.add(len(self.answers) + len(self.errors) - lost, lost)
        return self

    def failures(self, failing: str | None = None) -> list[Answer]:
        """Answers other than 200, but those of the release `failing`."""
        return [a for a in self.answers if a.status != 200 and a.release != failing]

    def since(self, t0: float) -> list[Answer]:
        return [a for a in list(self.answers) if a.started >= t0]

    def releases_since(self, t0: float) -> collections.Counter:
        return collections.Counter(a.release for a in self.since(t0))

    def seen(self, t0: float = 0.0, t1: float = float("inf"), fresh_only: bool = False) -> collections.Counter:
        """Answers by (release, HTTP status) of the requests started in [t0, t1)."""
        return collections.Counter((a.release, a.status) for a in list(self.answers)
                                   if t0 <= a.started < t1 and not (fresh_only and a.keepalive))

    def wait_answers(self, since: float, n: int = 20, release: str | None = None) -> None:
        """Until `n` requests started since `since` were answered (by `release`, if named)."""
        poll(lambda: sum(v for (r, _), v in self.seen(since).items() if release in (None, r)) >= n,
             timeout=30, what=f"{n} answers{f' from {release}' if release else ''}")

    def wait_workers(self, since: float, pids: set[int], release: str) -> None:
        """Until each worker in `pids` has answered a request started since `since` as `release`."""
        poll(lambda: pids <= {a.pid for a in self.since(since) if a.release == release and a.status == 200},
             timeout=30, what=f"an answer of release {release} from each of the workers {sorted(pids)}")

    def check(self) -> None:
        self.stop()
        assert self.errors == [], f"{len(self.errors)} failed request(s): {self.errors[:10]}"
        assert self.failures() == [], self.failures()[:10]
        assert len(self.answers) > 20, f"only {len(self.answers)} answers"


@pytest.fixture
def clients():
    """clients(port) -> a Crowd, stopped when the test ends (whether or not the test stopped it)."""
    made: list[Crowd] = []

    def start(port: int) -> Crowd:
        made.append(Crowd(port))
        return made[-1]
    yield start
    for one in made:
        one.stop()


def unit_journal(ns, *args: str) -> str:
    return ns.journal("-o", "cat", "-u", UNIT, *args)


def unit_state(ns) -> dict:
    return ns.show(UNIT, "MainPID", "ActiveState", "NRestarts")


def logged_at(ns, text: str) -> float:
    """When journald received the unit's first line containing `text`, on the test's
    time.monotonic() clock (the namespace has no clock namespace: CLOCK_MONOTONIC is the host's)."""
    def probe():
        for line in ns.journal("-u", UNIT, "-o", "json", "--output-fields=MESSAGE").splitlines():
            entry = json.loads(line)
            if text in str(entry.get("MESSAGE")):
                return int(entry["__MONOTONIC_TIMESTAMP"]) / 1e6
        return None
    return poll(probe, what=f"journal line {text!r}")


def status(app: AppRoot) -> dict:
    """`supervisorctl status --json`, spoken directly on the control socket from the host."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(str(app.socket))
        sock.sendall(b'{"cmd": "status"}\n')
        return json.loads(sock.makefile().read().splitlines()[-1])["status"]


def journal_has(ns, text: str) -> str:
    # journald reads streams asynchronously: a line written before systemctl returned may lag.
    return poll(lambda: text in (j := ns.journal("-o", "cat")) and j, what=f"journal line {text!r}")



def slow_request(port: int, seconds: float) -> Future:
    """GET /slow?s=N, returned once a worker holds it; result() gives the answer."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request("GET", f"/slow?s={seconds}")

    def read():
        resp = conn.getresponse()
        return dict(status=resp.status, body=resp.read().decode(), at=time.monotonic(),
                    connection=resp.getheader("connection"))
    poll(lambda: accepted(port, conn.sock.getsockname()[1]), what="accept() of the slow request")
    return CLIENTS.submit(read)


# ---- for the hand-over's fault cells --------------------------------------------------------

def proc_state(pid: int) -> str:
    """R, S, T (stopped), Z ...; "" once the process is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:   # gone, or going (ESRCH)
        return ""


@contextlib.contextmanager
def frozen(ns):
    """The namespace's systemd stopped (SIGSTOP from the host reaches a namespace's init): it reads
    no notification meanwhile, so a BARRIER=1 sent now cannot complete until the block is left.
    Nothing in the block may call systemctl; it would hang."""
    os.kill(ns.pid1, signal.SIGSTOP)
    try:
        poll(lambda: proc_state(ns.pid1) == "T", 5, "systemd stopped")
        yield
    finally:
        os.kill(ns.pid1, signal.SIGCONT)


TIMESTAMP = re.compile(r"^\d\d:\d\d:\d\d ")


class Upgrade:
    """`supervisorctl upgrade ARGS`, the pinned one, run inside the namespace; read line by line.
    It speaks to the control socket, not to systemd: it works while systemd is frozen."""

    def __init__(self, ns, app: AppRoot, *args: str):
        self.proc = ns.popen(str(app.root / "shared" / "bin" / "supervisorctl"), "upgrade", *args,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self._queue.put(line.rstrip("\n"))
        self._queue.put(None)

    def wait_line(self, prefix: str, timeout: float = 30) -> str:
        """The text (timestamp cut) of the next progress line that starts with `prefix`."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"no line starting {prefix!r} within {timeout}s: {self.lines}") from None
            if line is None:
                raise AssertionError(f"supervisorctl upgrade ended (rc {self.proc.wait(5)}) without a line "
                                     f"starting {prefix!r}: {self.lines}")
            self.lines.append(line)
            text = TIMESTAMP.sub("", line)
            if text.startswith(prefix):
                return text

    def committed(self, timeout: float = 30) -> int:
        """Wait for the "committed" event (master N sent MAINPID=): the new master's pid."""
        return int(re.match(r"MAINPID=(\d+)", self.wait_line("MAINPID=", timeout)).group(1))

    def wait(self, timeout: float = 60) -> int:
        return self.proc.wait(timeout)


class Sampler:
    """Calls probe() from a thread every few ms until stop(); keeps (time, value) of each call."""

    def __init__(self, probe):
        self.probe, self.samples = probe, []
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._done.wait(0.003):
            self.samples.append((time.monotonic(), self.probe()))

    def stop(self) -> list:
        self._done.set()
        self._thread.join(10)
        return self.samples


def masters(ns) -> set[str]:
    """The masters in the unit's cgroup now, read from the host without systemctl, one per
    generation: a master's fork (the double fork of the next one, a worker before its exec)
    carries its title, and a just-exec'd master is titled "cadenza master" until it knows its
    generation."""
    procs = ns.cgroup / "system.slice" / UNIT / "cgroup.procs"
    try:
        pids = procs.read_text().split()
    except OSError:   # the unit is not running, or its cgroup is going (ENODEV)
        return set()
    return {t.split(" [")[0] for t in map(title, map(int, pids)) if t.startswith("cadenza master")}
