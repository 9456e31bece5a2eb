"""cadenza.tools.multiproc against real processes that count with the real prometheus_client in
multiprocess mode, read back by the real MultiProcessCollector: what a scrape of the
application's metrics shows after the dead are merged must be what the processes counted."""

from __future__ import annotations

import fcntl
import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from prometheus_client.mmap_dict import MmapedDict
from prometheus_client.multiprocess import MultiProcessCollector

from cadenza.tools import multiproc

MODES = ("all", "livesum", "min", "max", "sum", "mostrecent")

# One application process: counts what the test asks, then exits, or says "ready" and waits
# (to be SIGKILLed, or to stay alive while the tool runs).
APP = r'''
import json, sys
from prometheus_client import Counter, Gauge, Histogram
spec = json.loads(sys.argv[1])
jobs = Counter("jobs", "jobs done", ["kind"])
latency = Histogram("latency_seconds", "latency", buckets=(0.25, 0.5, 1.0))
gauges = {m: Gauge("g_" + m, m + " gauge", multiprocess_mode=m) for m in MODES}
for _ in range(spec["count"]):
    jobs.labels("a").inc()
for v in spec["observe"]:
    latency.observe(v)
for g in gauges.values():
    g.set(spec["gauge"])
if spec.get("wait"):
    print("ready", flush=True)
    sys.stdin.read()
'''.replace("MODES", repr(MODES), 1)

# A preloader that forks N workers one after the other; worker i counts i + 1. It prints each
# worker's pid once reaped and, with "step", waits for a line (the test has merged it).
FORKER = r'''
import os, sys
from prometheus_client import Counter
jobs = Counter("jobs", "jobs done", ["kind"])
n, step = int(sys.argv[1]), sys.argv[2] == "step"
for i in range(n):
    pid = os.fork()
    if pid == 0:
        jobs.labels("a").inc(i + 1)
        os._exit(0)
    os.waitpid(pid, 0)
    print(pid, flush=True)
    if step:
        sys.stdin.readline()
'''


class App:
    def __init__(self, directory: Path, count: int, observe: list[float], gauge: float,
                 wait: bool = False):
        self.count, self.observe, self.gauge = count, observe, gauge
        spec = json.dumps({"count": count, "observe": observe, "gauge": gauge, "wait": wait})
        self.proc = subprocess.Popen(
            [sys.executable, "-c", APP, spec], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            text=True, env={**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(directory)})
        self.pid = self.proc.pid
        if wait:
            assert self.proc.stdout.readline() == "ready\n"
        else:
            assert self.proc.wait(timeout=30) == 0

    def kill(self) -> None:
        self.proc.kill()
        assert self.proc.wait(timeout=30) == -signal.SIGKILL


def tool(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cadenza.tools.multiproc", *map(str, args)],
                          check=False, capture_output=True, text=True, timeout=60, **kw)


def scrape(directory: Path) -> dict:
    out = {}
    for metric in MultiProcessCollector(None, path=str(directory)).collect():
        for s in metric.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def expected(apps: list[App], live: list[App] = ()) -> dict:
    """What the collector must show once the dead among `apps` are merged."""
    obs = [v for a in apps for v in a.observe]
    out = {("jobs_total", (("kind", "a"),)): float(sum(a.count for a in apps)),
           ("latency_seconds_sum", ()): float(sum(obs)),
           ("latency_seconds_count", ()): float(len(obs))}
    for le, bound in (("0.25", 0.25), ("0.5", 0.5), ("1.0", 1.0), ("+Inf", float("inf"))):
        out[("latency_seconds_bucket", (("le", le),))] = float(sum(v <= bound for v in obs))
    gauges = [a.gauge for a in apps]
    out.update({("g_min", ()): min(gauges), ("g_max", ()): max(gauges),
                ("g_sum", ()): sum(gauges), ("g_mostrecent", ()): apps[-1].gauge})
    if live:
        out[("g_livesum", ())] = sum(a.gauge for a in live)
        for a in live:
            out[("g_all", (("pid", str(a.pid)),))] = a.gauge
    return out


def dbs(directory: Path) -> set[str]:
    return {p.name for p in directory.glob("*.db")}


ARCHIVES = {"counter_archive.db", "histogram_archive.db",
            *(f"gauge_{m}_archive.db" for m in ("min", "max", "sum", "mostrecent"))}


def test_merge_keeps_what_the_dead_counted_and_drops_their_live_gauges(tmp_path):
    d = tmp_path / "gen-1"
    d.mkdir()
    a = App(d, 3, [0.125, 2.0], 5.0)
    b = App(d, 4, [0.25, 0.75, 0.75], -2.0)
    c = App(d, 7, [0.5], 9.0, wait=True)
    c.kill()
    alive = App(d, 2, [1.0], 1.5, wait=True)
    try:
        r = tool("merge", d, a.pid, b.pid, c.pid, alive.pid)
        assert r.returncode == 0, r.stderr
        assert f"pid {alive.pid} is alive" in r.stderr
        # The live process's files are its own; the dead left nothing but archives.
        assert dbs(d) == ARCHIVES | {f"counter_{alive.pid}.db", f"histogram_{alive.pid}.db",
                                     *(f"gauge_{m}_{alive.pid}.db" for m in MODES)}
        assert scrape(d) == expected([a, b, c, alive], live=[alive])
        assert stat.S_IMODE(os.stat(d / ".lock").st_mode) == 0o600
    finally:
        alive.kill()
    r = tool("merge", d, alive.pid)
    assert (r.returncode, r.stderr) == (0, "")
    assert dbs(d) == ARCHIVES
    assert scrape(d) == expected([a, b, c, alive])
    # Merging the same pids again (the master retrying) finds nothing and changes nothing.
    assert tool("merge", d, a.pid, b.pid).returncode == 0
    assert scrape(d) == expected([a, b, c, alive])


def test_a_hundred_workers_merged_one_by_one_leave_one_archive(tmp_path):
    d = tmp_path / "gen-1"
    d.mkdir()
    forker = subprocess.Popen([sys.executable, "-c", FORKER, "100", "step"],
                              env={**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(d)},
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    most = 0
    for i in range(100):
        pid = int(forker.stdout.readline())
        most = max(most, len(dbs(d)))
        assert multiproc.merge(str(d), [pid]) == []
        assert dbs(d) == {"counter_archive.db"}
        forker.stdin.write("\n")
        forker.stdin.flush()
    assert forker.wait(timeout=30) == 0
    assert most <= 2   # the archive and the one worker just reaped, never 100
    assert scrape(d) == {("jobs_total", (("kind", "a"),)): float(sum(range(1, 101)))}


def test_fold_carries_a_gone_generation_into_the_next(tmp_path):
    old, new = tmp_path / "gen-1", tmp_path / "gen-2"
    old.mkdir()
    new.mkdir()
    a1 = App(old, 5, [0.125], 3.0)
    assert tool("merge", old, a1.pid).returncode == 0   # so gen-1 holds archives too
    a2 = App(old, 6, [2.0, 0.25], 10.0)
    a3 = App(old, 1, [], 0.5, wait=True)
    a3.kill()
    b1 = App(new, 2, [0.75], -1.0)
    assert tool("merge", new, b1.pid).returncode == 0
    b2 = App(new, 8, [0.5, 0.5], 4.0, wait=True)
    try:
        r = tool("fold", old, new)
        assert (r.returncode, r.stderr) == (0, "")
        assert not old.exists()
        assert scrape(new) == expected([a1, a2, a3, b1, b2], live=[b2])
        assert f"counter_{b2.pid}.db" in dbs(new)
    finally:
        b2.kill()


def test_fold_into_a_new_directory_then_into_a_newer_one_and_away(tmp_path):
    src, dst, newer = tmp_path / "gen-5", tmp_path / "gen-6", tmp_path / "gen-7"
    src.mkdir()
    newer.mkdir()
    a = App(src, 3, [0.25], 2.0)
    b = App(newer, 1, [0.5], 8.0)     # set after a's: the most recent, though folded into last
    assert tool("merge", newer, b.pid).returncode == 0
    assert tool("fold", tmp_path / "gen-4", dst).returncode == 0   # no SRC: nothing to do
    assert not dst.exists()
    r = tool("fold", src, dst)
    assert (r.returncode, r.stderr) == (0, "")
    assert stat.S_IMODE(os.stat(dst).st_mode) == 0o700
    assert not src.exists() and dbs(dst) == ARCHIVES
    assert scrape(dst) == expected([a])
    assert tool("fold", dst, newer).returncode == 0
    assert scrape(newer) == expected([a, b])
    assert tool("fold", newer, "-").returncode == 0
    assert not newer.exists()


def _waiters(lock: Path) -> set[int]:
    """The pids blocked in flock(2) on `lock`, from /proc/locks ("N: -> FLOCK ... PID dev:ino")."""
    ino = os.stat(lock).st_ino
    pids = set()
    for line in Path("/proc/locks").read_text().splitlines():
        f = line.split()
        if len(f) > 6 and f[1] == "->" and f[6].rsplit(":", 1)[-1] == str(ino):
            pids.add(int(f[5]))
    return pids


def test_runs_at_the_same_time_on_one_directory_lose_nothing(tmp_path):
    other, d = tmp_path / "gen-1", tmp_path / "gen-2"
    env = {**os.environ}
    counted = 0
    pids = {}
    for directory, n in ((other, 20), (d, 60)):
        directory.mkdir()
        env["PROMETHEUS_MULTIPROC_DIR"] = str(directory)
        out = subprocess.run([sys.executable, "-c", FORKER, str(n), "all"], env=env,
                             capture_output=True, text=True, timeout=60, check=True).stdout
        pids[directory] = out.split()
        counted += n * (n + 1) // 2
    assert multiproc.merge(str(other), pids[other][:5]) == []   # gen-1 has an archive too
    # Hold gen-2's lock until all three runs wait on it, then let them race for it.
    lock = os.open(d / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(lock, fcntl.LOCK_EX)
    cmd = [sys.executable, "-m", "cadenza.tools.multiproc"]
    runs = [subprocess.Popen([*cmd, "merge", str(d), *pids[d][:30]], stderr=subprocess.PIPE),
            subprocess.Popen([*cmd, "merge", str(d), *pids[d][30:]], stderr=subprocess.PIPE),
            subprocess.Popen([*cmd, "fold", str(other), str(d)], stderr=subprocess.PIPE)]
    try:
        deadline = time.monotonic() + 30
        while _waiters(d / ".lock") != {r.pid for r in runs}:
            assert time.monotonic() < deadline, "the runs never waited on DIR/.lock"
            assert all(r.poll() is None for r in runs), "a run did not wait for the lock"
            time.sleep(0.01)
    finally:
        os.close(lock)
    for r in runs:
        assert r.wait(timeout=60) == 0, r.stderr.read()
    assert not other.exists()
    assert dbs(d) == {"counter_archive.db"}
    assert scrape(d) == {("jobs_total", (("kind", "a"),)): float(counted)}


def _entry(key: bytes, length: int | None = None) -> bytes:
    pad = b" " * (8 - (len(key) + 4) % 8)
    return (len(key) if length is None else length).to_bytes(4, sys.byteorder, signed=True) \
        + key + pad + b"\0" * 16


def _mmap_file(path: Path, body: bytes) -> None:
    path.write_bytes((8 + len(body)).to_bytes(4, sys.byteorder) + b"\0" * 4 + body)


def test_damaged_files_are_set_aside_and_the_rest_merged(tmp_path):
    d = tmp_path / "gen-1"
    d.mkdir()
    a = App(d, 3, [0.125], 1.0)
    b = App(d, 4, [0.5], 7.0)
    c = App(d, 5, [2.0], 3.0)
    truncated, garbage, backwards = (d / f"counter_{a.pid}.db", d / f"gauge_max_{b.pid}.db",
                                     d / f"histogram_{c.pid}.db")
    os.truncate(truncated, 20)                      # killed mid-copy: used > size
    _mmap_file(garbage, _entry(b"not json at all"))
    _mmap_file(backwards, _entry(b"x" * 40, length=-100) + b"\0" * 64)
    (d / "gauge_min_archive.db").write_bytes(b"\xff" * 3)
    r = tool("merge", d, a.pid, b.pid, c.pid)
    assert r.returncode == 1
    lines = r.stderr.splitlines()
    for path, why in ((truncated, "header says"), (garbage, "not prometheus_client's"),
                      (backwards, "points back"), (d / "gauge_min_archive.db", "shorter")):
        assert any(str(path) in line and why in line for line in lines), (path, r.stderr)
        assert Path(f"{path}.bad").exists()
    assert not any(p.exists() for p in (truncated, garbage, backwards))
    totals = scrape(d)
    assert totals[("jobs_total", (("kind", "a"),))] == 9.0          # b and c
    assert totals[("latency_seconds_count", ())] == 2.0             # a and b
    assert totals[("g_max", ())] == 3.0                             # a and c
    assert totals[("g_min", ())] == 1.0                             # archive rebuilt from a, b, c
    assert dbs(d) == ARCHIVES
    # A file set aside is never read again.
    assert tool("merge", d, a.pid, b.pid, c.pid).returncode == 0
    assert scrape(d) == totals


def test_an_empty_file_of_a_worker_killed_at_birth_is_not_damage(tmp_path):
    (tmp_path / "counter_4242.db").write_bytes(b"")
    MmapedDict(str(tmp_path / "histogram_4242.db")).close()     # preallocated, nothing used
    assert multiproc.merge(str(tmp_path), [4242]) == []
    assert dbs(tmp_path) == set()


@pytest.mark.parametrize("args", [[], ["frobnicate"], ["merge"], ["merge", "/tmp"],
                                  ["merge", "/tmp", "12x"], ["merge", "/tmp", "0"],
                                  ["fold", "/tmp/a"], ["fold", "/tmp/a", "/tmp/a"],
                                  ["prune", "/tmp"]])
def test_usage_errors(args):
    r = tool(*args)
    assert r.returncode == 2
    assert r.stdout == "" and len(r.stderr.splitlines()) == 1 and "usage: " in r.stderr


def test_without_prometheus_client_it_says_which_python_and_how_to_fix(tmp_path):
    # A real interpreter to which prometheus_client cannot be imported.
    blocked = "import sys, runpy; sys.modules['prometheus_client'] = None; " \
              "runpy.run_module('cadenza.tools.multiproc', run_name='__main__')"
    (tmp_path / "gen-1").mkdir()
    for args, code in ((["merge", tmp_path, "123"], 3), (["fold", tmp_path / "gen-1", tmp_path], 3),
                       (["fold", tmp_path / "gen-1", "-"], 0), (["prune", tmp_path, "gen-2"], 0)):
        r = subprocess.run([sys.executable, "-c", blocked, *map(str, args)],
                           check=False, capture_output=True, text=True, timeout=60)
        assert r.returncode == code, (args, r.stderr)
        if code == 3:
            assert sys.executable in r.stderr and "pip install 'prometheus-client" in r.stderr
    assert list(tmp_path.iterdir()) == []


def test_prune_keeps_only_the_named_generations(tmp_path):
    for name in ("gen-1", "gen-2", "gen-3", "other"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "counter_1.db").write_bytes(b"x")
    (tmp_path / "gen-9").write_text("a file, not a generation")
    r = tool("prune", tmp_path, "gen-2", "gen-7")
    assert (r.returncode, r.stderr) == (0, "")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gen-2", "gen-9", "other"]
    assert tool("prune", tmp_path / "missing", "gen-1").returncode == 0


def test_a_run_stuck_on_a_lock_is_killed_at_its_deadline_and_the_next_one_runs(tmp_path, caplog):
    """The master's side (daemon/multiproc.py) on a real loop: a merge waiting for a lock that
    somebody holds for ever would block every later run; at the deadline it is killed."""
    import fcntl
    import logging
    from cadenza.daemon.loop import Loop
    from cadenza.daemon.multiproc import MultiprocDirs
    loop = Loop()
    dirs = MultiprocDirs(loop, tmp_path, 1)
    dirs.path.mkdir()
    dirs.deadline = 1.0
    holder = os.open(dirs.path / ".lock", os.O_CREAT | os.O_RDWR, 0o600)
    fcntl.flock(holder, fcntl.LOCK_EX)          # held, as by a process that never lets go
    dirs.dead(12345)                            # a merge: it waits for the lock
    stuck = dirs.running
    assert stuck is not None
    dirs.dead(12346)                            # waits for the stuck one, one run at a time
    assert dirs.running == stuck and dirs.pending == [12346]
    reaped = []

    def check():   # the master reaps on SIGCHLD; this test, which installs no handlers, polls
        loop.reap()
        if dirs.running != stuck:
            reaped.append(dirs.running)
            loop.stopped = True
        else:
            loop.after(0.05, check)
    loop.after(0.05, check)
    loop.after(15, lambda: setattr(loop, "stopped", True))
    with caplog.at_level(logging.ERROR):
        loop.run()
    assert reaped and reaped[0] not in (None, stuck), f"the stuck run was not ended, or none came next: {reaped}"
    assert any("still running after 1s" in m and "killing it" in m for m in caplog.messages), caplog.messages
    os.close(holder)                            # the lock is free: the next run finishes
    os.waitpid(reaped[0], 0)
    loop.close()
