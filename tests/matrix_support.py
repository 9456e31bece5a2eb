"""What tests/test_systemd_matrix.py adds to handover_fixtures and osfaults: an app served without
threads (so that a real pids limit refuses only the forks under test, never a request), gates a
release's workers wait at, `supervisorctl upgrade` read to its end, and a pids limit written to
the kernel while the namespace's systemd is stopped (systemctl cannot run then), and a census of
the unit's masters that survives processes vanishing under it.
"""
from __future__ import annotations

import errno
import queue
import subprocess
import sys
import threading
import time
from pathlib import Path

import handover_fixtures
from deploy import AppRoot
from handover_fixtures import APP, UNIT, masters, poll, proc_state, start_site, unit_procs
from osfaults import TaskLimit
from procs import free_port

# Appended to deploy.APP, served as ASGI: the same answers ("release rN pid P"), and /slow?s=N
# waits with asyncio, so a worker that holds a slow request still accepts and answers others,
# and no request needs a new thread (the WSGI thread pool would start one, refused at a pids limit).
ASGI = '''
import asyncio


async def asgi(scope, receive, send):
    if scope["type"] != "http":
        return
    query = parse_qs(scope["query_string"].decode())
    if scope["path"] == "/slow":
        await asyncio.sleep(float(query.get("s", ["1"])[0]))
    headers = {}
    body = b"".join(app({"QUERY_STRING": "", "PATH_INFO": "/"}, lambda status, h: headers.update(h)))
    await send({"type": "http.response.start", "status": 200,
                "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()]})
    await send({"type": "http.response.body", "body": body})
'''


def deploy(site: AppRoot, tag: str, gate: Path | None = None, switch: bool = True) -> Path:
    """Release TAG served by ASGI; with `gate`, each worker, at import, creates GATE.<worker id>
    and waits until GATE exists (so, until then, generation TAG accepts nothing)."""
    body = ASGI
    if gate is not None:
        body = (f"open({str(gate)!r} + '.' + os.environ['CADENZA_WORKER_ID'], 'w').close()\n"
                f"while not os.path.exists({str(gate)!r}):\n    time.sleep(0.01)\n") + body
    rel = site.release(tag, app_body=body, app="app:asgi", venv=False)
    if switch:
        site.switch(tag)
    return rel


def make_site(ns, **settings) -> AppRoot:
    """APP serving r1 from its pinned launcher, socket-activated (handover_fixtures.make_site's
    recipe, with the ASGI app)."""
    app = AppRoot(ns.state, APP, free_port(), **settings)
    deploy(app, "r1")
    return start_site(ns, app)


class Gate:
    def __init__(self, site: AppRoot, tag: str):
        self.path, self.count = site.root / "run" / f"gate-{tag}", site.workers["count"]
        deploy(site, tag, gate=self.path)

    def wait(self, count: int | None = None) -> None:
        """Until every worker of the gated release (or `count` of them) waits at the gate."""
        want = count or self.count
        poll(lambda: sum(Path(f"{self.path}.{i}").exists() for i in range(1, 64)) >= want, timeout=30,
             what="the new release's workers at the gate")

    def open(self) -> None:
        self.path.touch()


class Upgrade(handover_fixtures.Upgrade):
    """`supervisorctl upgrade`, read line by line; finish() waits for its end and its output."""

    def started(self, timeout: float = 30) -> str:
        """The namespace pid of the next generation's master, from "generation N started (pid P)"."""
        line = self.wait_line("generation ", timeout)
        while " started (pid " not in line:
            line = self.wait_line("generation ", timeout)
        return line.split(" started (pid ")[1].split(")")[0]

    def seen(self, prefix: str) -> bool:
        """Whether a line starting with `prefix` (timestamp cut) has come, without waiting."""
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is None:
                self._queue.put(None)
                break
            self.lines.append(item)
        return any(handover_fixtures.TIMESTAMP.sub("", line).startswith(prefix) for line in self.lines)

    def finish(self, timeout: float = 40) -> tuple[int, str]:
        """(exit code, every line it printed)."""
        code = self.wait(timeout)
        deadline = time.monotonic() + 10
        while True:   # the reader thread puts None after the last line
            item = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            if item is None:
                break
            self.lines.append(item)
        self.proc.stdout.close()
        return code, "\n".join(self.lines)


class ArmedUpgrade(Upgrade):
    """`supervisorctl upgrade` loaded beforehand (its Python started, cadenza.tools.supervisorctl
    imported: the code the pinned launcher execs), connecting only when fire()d: a request that
    must reach the master inside a window of a second or two, on a machine where starting Python
    may take longer than that."""

    PROGRAM = ("import sys; from cadenza.tools.supervisorctl import main; print('armed', flush=True); "
               "sys.stdin.readline(); sys.exit(main(sys.argv[1:]))")

    def __init__(self, ns, app: AppRoot):
        self.proc = ns.popen(sys.executable, "-c", self.PROGRAM, "-s", str(app.socket), "upgrade",
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self.wait_line("armed")

    def fire(self) -> None:
        self.proc.stdin.write("\n")
        self.proc.stdin.close()


def census(ns) -> set[str]:
    """handover_fixtures.masters(), robust to what a sampler meets while the unit changes: a
    process gone between the listing and its /proc/PID/cmdline (ProcessLookupError, which
    title() lets through) is read again; a cgroup removed while read (ENODEV) is a stopped unit."""
    for _ in range(100):
        try:
            return masters(ns)
        except ProcessLookupError:
            continue
        except OSError as exc:
            if exc.errno in (errno.ENODEV, errno.ENOENT):
                return set()
            raise
    return masters(ns)


class Census(handover_fixtures.Sampler):
    """handover_fixtures.Sampler of census(ns) every 10 ms: a third master would live for a whole
    boot (hundreds of ms), and a lighter sampler leaves the CPU to the masters whose windows the
    cells hit (BARRIER_TIMEOUT is 2 s)."""

    def __init__(self, ns):
        super().__init__(lambda: census(ns))

    def _run(self) -> None:
        while not self._done.wait(0.01):
            self.samples.append((time.monotonic(), self.probe()))


def host_pid(ns, ns_pid: str | int, timeout: float = 15) -> int:
    """Host pid of a process of the unit given by its namespace pid (needs a running systemd)."""
    return poll(lambda: unit_procs(ns).get(int(ns_pid)), timeout, f"pid {ns_pid} in {UNIT}")


def threads(pid: int) -> int:
    return int(Path(f"/proc/{pid}/status").read_text().split("Threads:")[1].split()[0])


class KernelLimit:
    """A TaskLimit's pids.max written straight to the kernel, for a window in which the
    namespace's systemd is stopped (`frozen`) and `systemctl set-property` would hang. It is the
    same limit systemd's TasksMax= sets; the path is found before systemd is stopped."""

    def __init__(self, limit: TaskLimit):
        self.limit, self.dir = limit, limit._dir()

    def current(self) -> int:
        return int((self.dir / "pids.current").read_text())

    def failures(self) -> int:
        return int(dict(line.split() for line in (self.dir / "pids.events").read_text().splitlines())["max"])

    def set(self, n: int | None) -> None:
        (self.dir / "pids.max").write_text("max" if n is None else str(n))


def zombies(ns) -> list[int]:
    """Host pids of the unit's processes that exited and nobody reaped."""
    procs = ns.cgroup / "system.slice" / UNIT / "cgroup.procs"
    try:
        pids = procs.read_text().split()
    except FileNotFoundError:
        return []
    return [int(p) for p in pids if proc_state(int(p)) == "Z"]
