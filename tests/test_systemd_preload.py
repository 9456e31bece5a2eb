"""Preload (`[workers] preload = true`, DESIGN §4.3) under a real systemd 252 (tests/sdns.py).

Each generation has one preloader ("cadenza preloader gen N [APP]"), exec'd from its release,
that imports the application once and forks the workers on the master's request. A full upgrade
therefore loads the new release's code and the dependencies of the new release's own venv; a
preloader that dies leaves its workers serving and is replaced; one that cannot import the app
fails the upgrade with the reason. Every test keeps a client running that must lose nothing.
Pids: systemd and `supervisorctl status` report the namespace's; /proc on the host is read
through the unit's cgroup (handover_fixtures.unit_procs maps the one to the other).
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

import tally
from deploy import PY_DIR, AppRoot
from handover_fixtures import (APP, CLIENTS, UNIT, Hammer, Sampler, answer, journal_has, main_pid, poll,
                               start_site, status, title, unit_procs)
from osfaults import Clients, TaskLimit
from procs import alive, free_port, get

# A package installed by pip into each release's own venv, at a version of the release's own.
DEP_PROJECT = """\
[build-system]
requires = ["setuptools"]
build-backend = "setuptools.build_meta"

[project]
name = "thedep"
version = "{version}"

[tool.setuptools]
packages = ["thedep"]
"""

# The app of a release with thedep: GET /dep says what this worker was loaded with; the rest is
# deploy.APP's ("release TAG pid PID").
PROBE = """\
import importlib.metadata
import json
import os
import sys

import thedep
from app import app as plain

LOADED = {{"release": {tag!r}, "version": importlib.metadata.version("thedep"), "value": thedep.VALUE,
          "dep_file": thedep.__file__, "executable": sys.executable, "prefix": sys.prefix}}


def app(environ, start_response):
    if environ["PATH_INFO"] != "/dep":
        return plain(environ, start_response)
    body = json.dumps({{**LOADED, "pid": os.getpid(), "ppid": os.getppid()}}).encode()
    start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
    return [body]
"""


@pytest.fixture
def lossless():
    """lossless(port, pinned=False): a client that must lose nothing, stopped when the test ends.
    Hammer (new connections and keep-alive), or with pinned=True only one keep-alive connection
    (osfaults.Clients), so that every other worker is idle and may be killed without a loss."""
    made: list = []

    def start(port: int, pinned: bool = False):
        made.append(Clients(port, new_connections=False) if pinned else Hammer(port))
        return made[-1]
    yield start
    for client in made:
        client.finish() if isinstance(client, Hammer) else client.stop()


def preload_site(systemd, count: int = 2, upgrade_timeout: float = 20, **release) -> AppRoot:
    """APP serving release r1 with preload, socket-activated, from its pinned launcher."""
    app = AppRoot(systemd.state, APP, free_port(), count=count, upgrade_timeout=upgrade_timeout)
    app.deploy("r1", preload=True, **release)
    return start_site(systemd, app)


def ppid(host_pid: int) -> int:
    """Host pid of the parent of host_pid (/proc/PID/status: the reader's pid namespace)."""
    return int(Path(f"/proc/{host_pid}/status").read_text().split("PPid:")[1].split()[0])


def ready_preloader(ns, app: AppRoot, generation: int, not_pid: int | None = None,
                    timeout: float = 15) -> tuple[int, int]:
    """(namespace pid, host pid) of the main generation's preloader once it is ready (and is not
    `not_pid`), after checking its title."""
    def probe():
        info = status(app)["preloader"]
        assert info is not None, "BUG: `status --json` shows no preloader with workers.preload = true"
        pid = info["pid"]
        return info["state"] == "ready" and pid and pid != not_pid and unit_procs(ns).get(pid) and pid
    pid = poll(probe, timeout, f"a ready preloader of generation {generation} other than {not_pid}")
    host = unit_procs(ns)[pid]
    assert title(host).startswith(f"cadenza preloader gen {generation} [{APP}]"), f"titled {title(host)!r}"
    return pid, host


def workers(app: AppRoot) -> dict[int, str]:
    """{namespace pid: state} of the main generation's workers."""
    return {w["pid"]: w["state"] for w in status(app)["workers"]}


def settled(ns, app: AppRoot, master: int, preloader: int, count: int) -> dict[int, int] | None:
    """{namespace pid: host pid} of the workers once `count` are ready, all forked by `preloader`
    (host pid), and nothing else is left in the unit (no worker still draining)."""
    states = workers(app)
    procs = unit_procs(ns)
    if len(states) != count or set(states.values()) != {"ready"} or not set(states) <= set(procs):
        return None
    found = {pid: procs[pid] for pid in states}
    try:
        if any(ppid(host) != preloader for host in found.values()):
            return None
    except (OSError, IndexError):   # one exited while we looked
        return None
    return set(procs.values()) == {master, preloader, *found.values()} and found


def unit_ok(ns, master_ns: str) -> None:
    props = ns.show(UNIT, "MainPID", "ActiveState", "NRestarts")
    assert props == {"MainPID": master_ns, "ActiveState": "active", "NRestarts": "0"}, props


def served_by(port: int, pid: int, timeout: float = 15) -> None:
    """Until `pid` (namespace) answers a new connection; every request must be answered."""
    deadline = time.monotonic() + timeout
    while True:
        # A few at once: the kernel hands each to whichever worker accepts first.
        answers = [f.result() for f in [CLIENTS.submit(get, port) for _ in range(4)]]
        assert all(code == 200 for code, _ in answers), answers
        tally.add(len(answers), 0)
        if any(body.strip().endswith(f" pid {pid}") for _, body in answers):
            return
        assert time.monotonic() < deadline, f"worker {pid} answered none within {timeout}s: {answers}"


# ---- 1. a full upgrade: new code and a new dependency version from the release's venv --------

def release_with_dep(app: AppRoot, tag: str, version: str, value: str, sources: Path) -> subprocess.Popen:
    """Release TAG (not switched to) whose venv gets thedep VERSION (thedep.VALUE = value) from
    pip, offline; returns the running pip."""
    rel = app.release(tag, preload=True, app="probe:app")
    (rel / "probe.py").write_text(PROBE.format(tag=tag))
    src = sources / f"thedep-{version}"
    (src / "thedep").mkdir(parents=True)
    (src / "pyproject.toml").write_text(DEP_PROJECT.format(version=version))
    (src / "thedep" / "__init__.py").write_text(f"VALUE = {value!r}\n")
    # The release venv's python sees the project venv's site-packages (deploy.py's .pth), pip and
    # setuptools included, yet installs into its own prefix.
    return subprocess.Popen([str(rel / ".venv" / "bin" / "python"), "-m", "pip", "install", "--quiet",
                             "--no-index", "--no-build-isolation", "--no-deps", "--no-cache-dir", str(src)],
                            env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def loaded(app: AppRoot) -> dict:
    code, body = get(app.port, "/dep")
    assert code == 200, body
    tally.add(1, 0)
    return json.loads(body)


def references(host_pid: int, path: str) -> list[str]:
    """What of process host_pid is under `path`: cwd, exe, argv, open files, mapped files."""
    def under(target: str) -> bool:
        return target == path or target.startswith(path + "/")
    base, found = f"/proc/{host_pid}", []
    try:
        for link in ("cwd", "exe", *(f"fd/{fd}" for fd in os.listdir(f"{base}/fd"))):
            try:
                if under(target := os.readlink(f"{base}/{link}")):
                    found.append(f"{link} -> {target}")
            except FileNotFoundError:   # an fd closed while we looked
                pass
        if path in (argv := title(host_pid)):
            found.append(f"cmdline {argv!r}")
        found += [f"maps {line.split()[-1]}" for line in Path(f"{base}/maps").read_text().splitlines()
                  if path in line]
    except (ProcessLookupError, FileNotFoundError):   # it exited while we looked
        pass
    return found


def test_full_upgrade_with_preload_loads_the_new_code_and_the_new_release_s_dependency(
        systemd, lossless, tmp_path):
    assert importlib.util.find_spec("thedep") is None, "thedep must come from the release venvs only"
    app = AppRoot(systemd.state, APP, free_port(), count=2)
    pips = [release_with_dep(app, "r1", "1.0", "one", tmp_path),
            release_with_dep(app, "r2", "2.0", "two", tmp_path)]
    for pip in pips:
        out, _ = pip.communicate(timeout=120)
        assert pip.returncode == 0, f"pip install of thedep failed:\n{out}"
    app.switch("r1")
    start_site(systemd, app)
    r1, r2 = (os.path.realpath(app.path(tag)) for tag in ("r1", "r2"))
    master_ns, _ = main_pid(systemd)
    old_ns, old_host = ready_preloader(systemd, app, 1)
    before = loaded(app)
    assert (before["release"], before["version"], before["value"]) == ("r1", "1.0", "one"), before
    assert os.path.realpath(before["prefix"]) == f"{r1}/.venv", before
    assert before["ppid"] == old_ns, f"worker {before['pid']} was not forked by the preloader {old_ns}"

    client = lossless(app.port)
    app.switch("r2")
    reload = systemd.systemctl("reload", APP)
    assert reload.returncode == 0, reload.stderr + systemd.journal("-o", "cat", "-n", "40")
    # `systemctl reload` returned: nothing of the unit runs from r1 any more (pruning is safe).
    procs = unit_procs(systemd)
    left = {host: (title(host), refs) for host in procs.values() if (refs := references(host, r1))}
    if left:   # how long past the reload's return they stay says which wait is missing
        returned = time.monotonic()
        poll(lambda: not any(alive(host) for host in left), what="the end of what ran from r1")
        assert not left, (f"BUG: when `systemctl reload` returned, still running from {r1} (gone "
                          f"{(time.monotonic() - returned) * 1e3:.0f} ms later): {left}")
    titles = [title(host) for host in procs.values()]
    assert titles and all(" gen 2 " in t for t in titles), titles

    new_ns, new_host = ready_preloader(systemd, app, 2)
    assert new_ns != old_ns and not alive(old_host), (old_ns, new_ns)
    assert os.path.realpath(f"/proc/{new_host}/cwd") == r2, os.readlink(f"/proc/{new_host}/cwd")
    for _ in range(6):   # new connections: both workers, most likely
        after = loaded(app)
        assert (after["release"], after["version"], after["value"]) == ("r2", "2.0", "two"), after
        assert os.path.realpath(after["prefix"]) == f"{r2}/.venv", after
        assert os.path.realpath(after["dep_file"]).startswith(f"{r2}/.venv/lib/{PY_DIR}/site-packages/"), after
        assert os.path.dirname(after["executable"]) == f"{app.path('r2')}/.venv/bin", after
        assert after["ppid"] == new_ns, f"worker {after['pid']} was not forked by the preloader {new_ns}"
    st = status(app)
    assert (st["generation"], st["release"], st["last_upgrade"]["ok"]) == (2, str(app.path("r2")), True), st
    now = unit_procs(systemd)
    forked = {w["pid"]: ppid(now[w["pid"]]) for w in st["workers"]}
    assert len(forked) == 2 and set(forked.values()) == {new_host}, (forked, new_host)
    props = systemd.show(UNIT, "MainPID", "ActiveState", "NRestarts")
    assert props["MainPID"] != master_ns and (props["ActiveState"], props["NRestarts"]) == ("active", "0"), props
    assert app.prune(keep=1) == ["r1"] and answer(app) == "release r2"
    assert set(client.check()) == {"release r1", "release r2"}


# ---- 2. the preloader dies while serving ----------------------------------------------------

def test_killed_preloader_is_replaced_the_workers_serve_throughout_and_respawns_work_again(
        systemd, lossless):
    app = preload_site(systemd)
    master_ns, master = main_pid(systemd)
    old_ns, old_host = ready_preloader(systemd, app, 1)
    first = poll(lambda: settled(systemd, app, master, old_host, 2), what="2 workers of the preloader")
    client = lossless(app.port)
    # Make-before-break: at no moment are fewer than `count` workers ready.
    ready = Sampler(lambda: sum(state == "ready" for state in workers(app).values()))
    os.kill(old_host, signal.SIGKILL)
    _, new_host = ready_preloader(systemd, app, 1, not_pid=old_ns)
    # DESIGN §4.3: the master restarts the preloader, then its workers, make-before-break.
    now = poll(lambda: settled(systemd, app, master, new_host, 2), timeout=30,
               what="every worker replaced by one of the new preloader")
    samples = ready.stop()
    assert not set(now) & set(first), (first, now)
    assert samples and min(count for _, count in samples) >= 2, [c for _, c in samples if c < 2][:5]
    assert set(client.check()) == {"release r1"}
    unit_ok(systemd, master_ns)
    # The operator is told: a journal line names the preloader, its pid and the signal.
    poll(lambda: [line for line in systemd.journal("-o", "cat").splitlines()
                  if "preloader" in line and f"pid {old_ns}" in line and "SIGKILL" in line],
         what=f"a journal line on the preloader {old_ns} killed by SIGKILL")

    # A worker that dies now comes from the new preloader: killed while idle, so nothing is lost
    # (the pinned client's keep-alive connection is held by the other one).
    pinned = lossless(app.port, pinned=True)
    held = pinned.wait_keepalive_pid()
    (victim,) = set(now) - {held}
    os.kill(now[victim], signal.SIGKILL)
    respawned = poll(lambda: settled(systemd, app, master, new_host, 2) and
                     (fresh := set(workers(app)) - {held, victim}) and fresh.pop(),
                     what="the killed worker respawned by the new preloader")
    assert ppid(unit_procs(systemd)[respawned]) == new_host
    served_by(app.port, respawned)
    assert set(pinned.check()) == {"release r1"}
    unit_ok(systemd, master_ns)


# ---- 3. a release whose app cannot be imported ----------------------------------------------

def test_upgrade_to_a_release_whose_app_cannot_be_preloaded_fails_with_the_reason(systemd, lossless):
    app = preload_site(systemd, upgrade_timeout=60)
    master_ns, _ = main_pid(systemd)
    pre_ns, pre_host = ready_preloader(systemd, app, 1)
    procs_before = set(unit_procs(systemd).values())
    client = lossless(app.port)
    app.deploy("r2", preload=True, app_body='raise ImportError("the release lacks missing_dep")', ready_timeout=60)
    t0 = time.monotonic()
    reload = systemd.systemctl("reload", APP)
    took = time.monotonic() - t0
    # upgrade.timeout and ready_timeout are 60 s: the reload fails on the preloader's exit 3.
    assert reload.returncode != 0 and took < 20, (took, reload.stdout, reload.stderr)
    unit_ok(systemd, master_ns)
    last = status(app)["last_upgrade"]
    assert not last["ok"] and "the release lacks missing_dep" in last["reason"], last
    assert "preloader" in last["reason"], last
    # What `supervisorctl upgrade` (ExecReload=) printed: the reason, in the journal.
    poll(lambda: "the release lacks missing_dep" in systemd.journal("-o", "cat", "-t", "supervisorctl"),
         what="the reason in the failed ExecReload's output")
    journal_has(systemd, "ImportError: the release lacks missing_dep")
    assert answer(app) == "release r1"
    assert ready_preloader(systemd, app, 1) == (pre_ns, pre_host)
    poll(lambda: set(unit_procs(systemd).values()) == procs_before, what="generation 2 gone")
    # The operator fixes the release: the next reload works.
    app.deploy("r3", preload=True)
    done = systemd.systemctl("reload", APP)
    assert done.returncode == 0, done.stderr + systemd.journal("-o", "cat", "-n", "40")
    assert answer(app) == "release r3"
    # The failed attempt's number may be used again: the generation is whatever status says.
    assert ready_preloader(systemd, app, status(app)["generation"])[0] != pre_ns
    assert set(client.check()) == {"release r1", "release r3"}


# ---- 4. a respawn is a fork -----------------------------------------------------------------

def preloader_children(host_pid: int) -> set[int]:
    children = set()
    for task in os.listdir(f"/proc/{host_pid}/task"):
        try:
            children.update(map(int, Path(f"/proc/{host_pid}/task/{task}/children").read_text().split()))
        except FileNotFoundError:   # a thread that ended
            pass
    return children


def respawn_delay(ns, pid: int) -> float | None:
    """The backoff the master logged before respawning worker `pid` (namespace), if it did."""
    deadline = time.monotonic() + 3   # journald reads the master's stream asynchronously
    while time.monotonic() < deadline:
        found = re.search(rf"\(pid {pid}\) killed by SIGKILL; respawning in ([\d.]+)s", ns.journal("-o", "cat"))
        if found:
            return float(found.group(1))
    return None


def test_respawn_with_preload_is_a_fork_of_the_preloader(systemd, record_property):
    """One worker, killed while idle: the next request, sent once it is dead, waits in the
    listening socket's queue and is the first one its replacement accepts. The figures are
    reported, not asserted (benchmarks judge speed); the replacement's parent is."""
    app = preload_site(systemd, count=1)
    master_ns, master = main_pid(systemd)
    pre_ns, pre_host = ready_preloader(systemd, app, 1)
    (victim,) = poll(lambda: settled(systemd, app, master, pre_host, 1), what="the worker of the preloader")
    victim_host = unit_procs(systemd)[victim]
    for _ in range(5):   # the test's own client, sequential: nothing is in flight at the kill
        assert answer(app) == "release r1"
    known = preloader_children(pre_host)
    killed_at = time.perf_counter()
    os.kill(victim_host, signal.SIGKILL)
    while alive(victim_host):   # no poll() pacing: the replacement may be forked within 10 ms
        assert time.perf_counter() - killed_at < 5, "the killed worker is still there after 5s"
    request = CLIENTS.submit(lambda: (get(app.port), time.perf_counter()))
    while not (fresh := preloader_children(pre_host) - known):
        assert time.perf_counter() - killed_at < 15, "no new child of the preloader within 15s"
        time.sleep(0.0002)   # pacing: the request's thread needs the GIL too
    forked_at = time.perf_counter()
    (code, body), answered_at = request.result(timeout=30)
    assert code == 200 and body.startswith("release r1 pid "), (code, body)
    new = int(body.split(" pid ")[1])
    new_host = unit_procs(systemd)[new]
    assert new != victim and new_host in fresh, (victim, new, fresh)
    assert ppid(new_host) == pre_host, f"BUG: worker {new} is not a child of the preloader {pre_ns}"
    delay = respawn_delay(systemd, victim)
    figures = {"kill_to_fork_ms": round((forked_at - killed_at) * 1e3, 1),
               "fork_to_first_answer_ms": round((answered_at - forked_at) * 1e3, 1),
               "kill_to_first_answer_ms": round((answered_at - killed_at) * 1e3, 1),
               "respawn_backoff_s": delay,
               "kill_to_fork_beyond_backoff_ms": round((forked_at - killed_at - (delay or 0)) * 1e3, 1)}
    record_property("respawn", figures)
    print(f"\nrespawn with preload: {figures}")
    for _ in range(5):
        assert answer(app) == "release r1"
    tally.add(11, 0)
    unit_ok(systemd, master_ns)


# ---- 5. a fork that fails under TasksMax= ---------------------------------------------------

def test_a_preloader_fork_refused_by_tasksmax_is_retried_and_the_old_workers_serve_on(systemd, lossless):
    """DESIGN §4.1: fork EAGAIN is an event like any other. The preloader's fork of a worker fails
    under a real TasksMax=; the slot is retried with backoff, the preloader is not taken for
    broken, the other worker serves on, and once the limit is lifted the slot is filled."""
    app = preload_site(systemd)
    master_ns, master = main_pid(systemd)
    pre_ns, pre_host = ready_preloader(systemd, app, 1)
    first = poll(lambda: settled(systemd, app, master, pre_host, 2), what="2 workers of the preloader")
    pinned = lossless(app.port, pinned=True)
    held = pinned.wait_keepalive_pid()
    (victim,) = set(first) - {held}
    limit = TaskLimit(systemd, UNIT)
    try:
        # Its tasks (threads included) are what the limit leaves once it is gone: not one more.
        threads = int(Path(f"/proc/{first[victim]}/status").read_text().split("Threads:")[1].split()[0])
        limit.set(limit.current() - threads)
        os.kill(first[victim], signal.SIGKILL)
        journal = journal_has(systemd, "could not be started: fork failed")
        line = next(l for l in journal.splitlines() if "could not be started: fork failed" in l)
        assert "Resource temporarily unavailable" in line and "retrying in" in line, line
        assert limit.failures() > 0
        assert status(app)["preloader"]["pid"] == pre_ns and alive(pre_host)   # not replaced for it
        limit.set(None)
        again = poll(lambda: settled(systemd, app, master, pre_host, 2), timeout=30,
                     what="the slot filled by the same preloader once the limit is lifted")
    finally:
        limit.set(None)
        limit.close()
    assert held in again and victim not in again
    assert set(pinned.check()) == {"release r1"}
    unit_ok(systemd, master_ns)
