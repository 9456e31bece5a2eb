"""Preload and recycling under faults (DESIGN §4.1, §4.3, §4.4), with a real master outside
systemd: stray signals to the preloader, a replacement preloader whose import hangs, fd
exhaustion while it is restarted, a fork request larger than a channel packet, garbage on the
channel, kills in the middle of a rolling restart, stops while the preloader is being replaced,
and what the master holds (fds, zombies) after many restarts. Each test says what must hold."""

from __future__ import annotations

import os
import re
import resource
import signal
import time
from pathlib import Path

from procs import Client, alive, children, cmdline, descendants, get, wait
from test_preload import site as preload_site

from cadenza.tools.supervisorctl import request

APP = '''
import json, os, pathlib, subprocess, sys, threading, time
GATE = os.environ.get("TEST_IMPORT_GATE")
if GATE and os.path.exists(GATE + ".once"):
    open(GATE).read()          # a FIFO: every import after the first waits for the test
elif GATE:
    pathlib.Path(GATE + ".once").touch()
GARBAGE = os.environ.get("TEST_GARBAGE")
if GARBAGE and not os.path.exists(GARBAGE):
    pathlib.Path(GARBAGE).touch()
    fd = int(os.environ.get("CADENZA_PRELOADER_FD") or 4)
    for packet in (b"\\xff" * 10, b"[1]", *[json.dumps({"exited": "x"}).encode()] * 50):
        os.write(fd, packet)
    os._exit(1)                # the first preloader dies right after its garbage
if os.environ.get("TEST_THREAD"):
    def chatter():
        while True:
            print("chatter", file=sys.stderr, flush=True)
            time.sleep(0.001)
    threading.Thread(target=chatter, daemon=True).start()
with open(os.environ["TEST_IMPORTS"], "a") as f:
    f.write(f"{os.getpid()}\\n")
BIG = [str(i) * 10 for i in range(100_000)]

def app(environ, start_response):
    if environ["PATH_INFO"] == "/spawn":     # a worker that leaves a child behind and dies
        child = subprocess.Popen(["sleep", "300"])
        pathlib.Path(os.environ["TEST_LEFTOVER"]).write_text(str(child.pid))
        os._exit(1)
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [f"pid {os.getpid()} parent {os.getppid()}".encode()]
'''


def site(tmp_path: Path, start, count: int = 2, extra: str = "", env=None, envtable: str = ""):
    return preload_site(tmp_path, start, count, "fapp", extra, env, envtable, name="pf", app=APP)


def preloaders(m) -> list[int]:
    return [k for k in children(m.pid) if cmdline(k).startswith("cadenza preloader")]


def ready_preloader(m, not_pid: int | None = None, workers: int | None = None) -> int:
    """A preloader other than `not_pid` that has forked `workers` (when given) live workers."""
    def probe():
        found = [p for p in preloaders(m) if p != not_pid]
        if len(found) == 1 and (workers is None or len([w for w in children(found[0]) if alive(w)]) == workers):
            return found[0]
        return None
    return wait(probe, what=f"a preloader other than {not_pid}")


def pool_pids(tmp_path: Path) -> list[int]:
    """The pids of the workers the master counts, from `supervisorctl status`."""
    for event in request(str(tmp_path / "control.sock"), {"cmd": "status"}, 10):
        if event.get("done"):
            return sorted(w["pid"] for w in event["status"]["workers"])
    raise AssertionError("no status")


def grow(m, by: int, start: int) -> None:
    """TTIN `by` times, each once the last was taken (a pending signal is not queued twice)."""
    for total in range(start + 1, start + by + 1):
        m.signal(signal.SIGTTIN)
        m.wait_status(f"/{total} workers ready")


def importers(imports: Path) -> list[int]:
    return [int(line) for line in imports.read_text().split()]


def fds(pid: int) -> list[str]:
    """Each fd of `pid` and what it is (a pidfd: the pid it refers to, -1 once reaped)."""
    out = []
    for fd in sorted(os.listdir(f"/proc/{pid}/fd"), key=int):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            if "pidfd" in target:
                target += " " + Path(f"/proc/{pid}/fdinfo/{fd}").read_text().split("Pid:")[1].split()[0]
        except (OSError, IndexError):
            continue
        out.append(f"{fd} -> {target}")
    return out


def zombies(pids) -> list[int]:
    out = []
    for pid in pids:
        try:
            if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                out.append(pid)
        except OSError:
            pass
    return out


# ---- defects: each test states the behaviour that must hold --------------------------------

def test_a_preloader_told_to_stop_from_outside_does_not_end_respawning(start, tmp_path):
    """`kill PRELOADER` (or any stray TERM) while serving: the slots must still be refilled."""
    m, port, imports = site(tmp_path, start)
    m.wait_ready()
    first = ready_preloader(m, workers=2)
    os.kill(first, signal.SIGTERM)
    victim = children(first)[0]
    os.kill(victim, signal.SIGKILL)
    m.wait_status("1/2 workers ready")
    m.wait_status("2/2 workers ready", timeout=10)


def test_a_replacement_preloader_whose_import_hangs_is_not_waited_for_for_ever(start, tmp_path):
    """workers.ready_timeout bounds a preloader's import, as it bounds a worker's start."""
    gate = tmp_path / "gate"
    os.mkfifo(gate)
    m, port, imports = site(tmp_path, start, extra="ready_timeout = 3\n", env={"TEST_IMPORT_GATE": str(gate)})
    m.wait_ready()
    first = ready_preloader(m, workers=2)
    os.kill(first, signal.SIGKILL)
    second = ready_preloader(m, not_pid=first)
    m.wait_status("preloader importing the application")
    wait(lambda: not alive(second), timeout=8, what=f"the hung preloader {second} killed after ready_timeout")


def test_a_preloader_restart_that_hits_emfile_is_retried(start, tmp_path):
    """EMFILE is an event like any other (§4.1): the start fails with its reason and is retried."""
    m, port, imports = site(tmp_path, start)
    m.wait_ready()
    first = ready_preloader(m, workers=2)
    limits = resource.prlimit(m.pid, resource.RLIMIT_NOFILE)
    resource.prlimit(m.pid, resource.RLIMIT_NOFILE, (3, limits[1]))   # no new fd at all
    os.kill(first, signal.SIGKILL)
    m.wait_log("Too many open files")
    resource.prlimit(m.pid, resource.RLIMIT_NOFILE, limits)
    second = ready_preloader(m, not_pid=first, workers=2)
    assert importers(imports) == [first, second]
    m.wait_status("2/2 workers ready")


def test_a_large_workers_env_does_not_break_the_fork_requests(start, tmp_path):
    """A [workers.env] value of 70 kB is a valid environment (exec takes up to 128 kB a string)."""
    big = "x" * 70_000
    m, port, imports = site(tmp_path, start, extra="ready_timeout = 8\n",
                            envtable=f'[workers.env]\nBIG = "{big}"\n')
    try:
        m.wait_ready(timeout=8)
    finally:
        assert "did not answer a fork" not in m.log(), m.log()[-2000:]
    assert get(port)[0] == 200


def test_garbage_from_a_dying_preloader_does_not_stop_its_replacement(start, tmp_path):
    """The preloader runs application code: what it sends is not trusted, and its death is still
    seen (and it is restarted) whatever it said before."""
    m, port, imports = site(tmp_path, start, env={"TEST_GARBAGE": str(tmp_path / "garbage-sent")})
    m.wait_ready(timeout=10)
    assert len(importers(imports)) == 1
    assert "internal error" not in m.log()


def test_a_preloader_killed_with_all_its_workers_forks_each_slot_once(start, tmp_path):
    """Every worker comes from the new preloader already: no rolling restart of them."""
    m, port, imports = site(tmp_path, start)
    m.wait_ready()
    first = ready_preloader(m, workers=2)
    mark = len(m.log())
    for pid in [first, *children(first)]:
        os.killpg(pid, signal.SIGKILL)
    second = ready_preloader(m, not_pid=first, workers=2)
    wait(lambda: m.log()[mark:].count(" ready after ") >= 2, what="two workers ready")
    after = m.log()[mark:]
    assert pool_pids(tmp_path) == sorted(children(second))
    assert "rolling restart" not in after, after
    assert len(re.findall(r"worker \d+ started \(pid", after)) == 2, after


def test_a_preloader_replaced_while_a_roll_s_replacement_boots_leaves_no_worker_of_the_old_one(start, tmp_path):
    """The new preloader is ready before the roll's first replacement (forked by the old one) is:
    the roll must still end with every worker forked by the new preloader (§4.3)."""
    m, port, imports = site(tmp_path, start, extra='ready = "uptime:1500ms"\n')
    m.wait_ready()
    first = ready_preloader(m, workers=2)
    m.signal(signal.SIGHUP)
    m.wait_log("rolling restart of 2 worker(s)")
    os.kill(first, signal.SIGKILL)
    second = ready_preloader(m, not_pid=first)
    m.wait_log(f"preloader (pid {second}) ready")
    wait(lambda: m.log().count("rolling restart done") >= 1, what="the rolling restart")
    wait(lambda: len(pool_pids(tmp_path)) == 2 and m.log().count(" ready after ") >= 7, what="the pool settled")
    assert pool_pids(tmp_path) == sorted(children(second)), (pool_pids(tmp_path), children(second))


# ---- coverage of the state machine: behaviour that holds -------------------------------------

def test_a_preloader_killed_in_a_rolling_restart_ends_with_every_worker_its_successor_s(start, tmp_path):
    m, port, imports = site(tmp_path, start, count=3)
    m.wait_ready()
    first = ready_preloader(m, workers=3)
    client = Client(port)
    m.signal(signal.SIGHUP)
    m.wait_log("rolling restart of 3 worker(s)")
    os.kill(first, signal.SIGKILL)
    second = ready_preloader(m, not_pid=first)
    wait(lambda: len(children(second)) == 3 and set(descendants(m.pid)) == {second, *children(second)},
         what="three workers, all the new preloader's, and nothing else")
    client.stop()
    assert client.ok > 0 and client.failures == [], client.failures[:3]


def test_ttin_twenty_times_forks_twenty_workers_from_one_import(start, tmp_path):
    m, port, imports = site(tmp_path, start)
    m.wait_ready()
    preloader = ready_preloader(m, workers=2)
    grow(m, 20, 2)
    m.wait_status("22/22 workers ready", timeout=20)
    assert len(children(preloader)) == 22 and importers(imports) == [preloader]
    m.signal(signal.SIGTERM)
    assert m.wait_exit() == 0


def test_a_stopped_preloader_does_not_hold_a_draining_generation(start, tmp_path):
    m, port, imports = site(tmp_path, start)
    m.wait_ready()
    preloader = ready_preloader(m, workers=2)
    tree = [preloader, *children(preloader)]
    os.kill(preloader, signal.SIGSTOP)
    t0 = time.monotonic()
    m.signal(signal.SIGTERM)
    assert m.wait_exit(timeout=10) == 0
    assert time.monotonic() - t0 < 6          # FORK_TIMEOUT (2 s), well before graceful_timeout + more
    wait(lambda: not any(alive(p) for p in tree), timeout=5, what="nothing left")


def test_a_stop_while_the_preloader_is_replaced_ends_everything(start, tmp_path):
    gate = tmp_path / "gate"
    os.mkfifo(gate)
    m, port, imports = site(tmp_path, start, env={"TEST_IMPORT_GATE": str(gate)})
    m.wait_ready()
    first = ready_preloader(m, workers=2)
    tree = [first, *children(first)]
    os.kill(first, signal.SIGKILL)
    second = ready_preloader(m, not_pid=first)
    m.wait_status("preloader importing the application")
    m.signal(signal.SIGTERM)
    assert m.wait_exit(timeout=10) == 0
    wait(lambda: not any(alive(p) for p in [*tree, second]), timeout=5, what="nothing left")


def test_the_master_keeps_no_fd_and_no_zombie_after_many_preloader_and_worker_deaths(start, tmp_path):
    m, port, imports = site(tmp_path, start)
    m.wait_ready()
    preloader = ready_preloader(m, workers=2)
    baseline = fds(m.pid)
    for round_ in range(4):
        for _ in range(2):
            victim = children(preloader)[0]
            os.kill(victim, signal.SIGKILL)
            wait(lambda p=preloader, v=victim: len([w for w in children(p) if alive(w) and w != v]) == 2,
                 what="a respawn")
        os.kill(preloader, signal.SIGKILL)
        old = preloader
        preloader = ready_preloader(m, not_pid=old, workers=2)
        # The old workers are orphans now (not the master's descendants): each is recycled onto
        # the new preloader, make-before-break.
        wait(lambda p=preloader: pool_pids(tmp_path) == sorted(children(p)) and len(children(p)) == 2,
             what="every worker forked by the new preloader")
        wait(lambda p=preloader: pool_pids(tmp_path) == sorted(children(p)), what="every worker the new one's")
    # The control connection of the last status closes a moment later; a leaked fd never does.
    try:
        wait(lambda: len(fds(m.pid)) == len(baseline), timeout=2, what="the fds of the start")
    except AssertionError:
        raise AssertionError("before:\n" + "\n".join(baseline) + "\nafter:\n" + "\n".join(fds(m.pid))) from None
    assert zombies(children(m.pid)) == [] and zombies(children(preloader)) == []
    assert len(importers(imports)) == 5


def test_max_requests_one_under_load_loses_nothing(start, tmp_path):
    m, port, imports = site(tmp_path, start, extra="max_requests = 1\n")
    m.wait_ready()
    preloader = ready_preloader(m, workers=2)
    client = Client(port)
    m.wait_log("replaced by pid", timeout=10)
    deadline = time.monotonic() + 3
    wait(lambda: time.monotonic() > deadline and m.log().count("replaced by pid") >= 5, what="five recycles")
    client.stop()
    assert client.ok > 5 and client.failures == [], client.failures[:3]
    assert importers(imports) == [preloader]
    m.wait_status("2/2 workers ready")


def test_recycle_hup_and_ttou_together_leave_count_minus_one_ready_workers(start, tmp_path):
    m, port, imports = site(tmp_path, start, count=3, extra="max_requests = 2\n")
    m.wait_ready()
    preloader = ready_preloader(m, workers=3)
    client = Client(port)
    m.wait_log("is due for recycling", timeout=10)
    for sig in (signal.SIGHUP, signal.SIGTTOU, signal.SIGHUP, signal.SIGTTIN, signal.SIGTTOU):
        m.signal(sig)
    m.wait_status("2/2 workers ready", timeout=15)
    client.stop()
    assert client.failures == [], client.failures[:3]
    m.wait_log("rolling restart done")
    m.signal(signal.SIGTERM)
    assert m.wait_exit() == 0
    assert "internal error" not in m.log()
    assert not any(alive(p) for p in children(preloader))


def test_a_preloaded_worker_s_leftover_child_is_stopped_when_it_dies(start, tmp_path):
    leftover = tmp_path / "leftover"
    m, port, imports = site(tmp_path, start, env={"TEST_LEFTOVER": str(leftover)})
    m.wait_ready()
    preloader = ready_preloader(m, workers=2)
    try:
        get(port, "/spawn", timeout=5)
    except Exception as exc:   # noqa: BLE001 - the worker dies under the request
        assert "Remote" in repr(exc) or "Reset" in repr(exc) or "Timeout" in repr(exc), repr(exc)
    child = int(wait(lambda: leftover.exists() and leftover.read_text(), what="the leftover"))
    m.wait_log("of its group remain")
    wait(lambda: not alive(child), timeout=8, what=f"the leftover {child} stopped")
    m.wait_status("2/2 workers ready")
    assert importers(imports) == [preloader]


def test_an_app_that_starts_a_thread_at_import_still_gets_working_workers(start, tmp_path):
    m, port, imports = site(tmp_path, start, env={"TEST_THREAD": "1"})
    m.wait_ready()
    preloader = ready_preloader(m, workers=2)
    grow(m, 8, 2)
    m.wait_status("10/10 workers ready", timeout=15)
    answers = [get(port)[0] for _ in range(20)]
    assert answers == [200] * 20
    assert importers(imports) == [preloader]
