"""Shared pieces of the benchmarks: paths, the app, procfs readings, wrk, a slow client, stats,
the machine a run measured.

Nothing here is hard-coded to a checkout: the project venv is the one running the benchmark
(sys.executable), and the harness modules (sdns, deploy, procs) come from tests/.
"""
from __future__ import annotations

import argparse
import hashlib
import http.client
import json
import os
import platform
import re
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
TESTS = BENCH.parent
REPO = TESTS.parent
sys.path.insert(0, str(TESTS))

import deploy  # noqa: E402  (tests/deploy.py: AppRoot)
import procs  # noqa: E402  (tests/procs.py: free_port, get)

VENV_BIN = Path(sys.executable).parent
PYTHON = str(VENV_BIN / "python")
WRK = "wrk"

# The ASGI face of the very same WSGI app (tests/deploy.py's APP, written as app.py by AppRoot):
# a2wsgi, so that uvicorn's Multiprocess supervisor serves it too (these benchmarks measure
# reloads and footprint; the request path has its own, tests/bench/engine.py).
ASGI = "from a2wsgi import WSGIMiddleware\nfrom app import app as wsgi\napp = WSGIMiddleware(wsgi)\n"


def release(root: deploy.AppRoot, tag: str, **kw) -> Path:
    """Deploy release TAG (no venv of its own: the pinned launcher uses the project venv)."""
    rel = root.deploy(tag, venv=False, **kw)
    (rel / "asgi.py").write_text(ASGI)
    return rel


# ---- statistics --------------------------------------------------------------------------

def median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def pct(xs, q: float):
    """Nearest-rank percentile (q in 0..100); None for no data."""
    xs = sorted(x for x in xs if x is not None)
    if not xs:
        return None
    k = max(0, min(len(xs) - 1, int(round(q / 100 * len(xs) + 0.5)) - 1))
    return xs[k]


def ms(seconds):
    return None if seconds is None else round(seconds * 1000, 1)


# ---- procfs ------------------------------------------------------------------------------

def proc_status(pid: int) -> dict[str, str]:
    text = Path(f"/proc/{pid}/status").read_text()  # /proc/TID/status works for a thread too
    return {k: v.strip() for k, _, v in (line.partition(":") for line in text.splitlines())}


def footprint(pid: int) -> dict:
    """RSS (kB), context switches (voluntary+nonvoluntary) and CPU seconds of one process."""
    st = proc_status(pid)
    ctxt, threads = 0, 0
    for task in Path(f"/proc/{pid}/task").iterdir():   # every thread: /proc/PID/status counts the leader only
        try:
            t = proc_status(int(task.name))
        except FileNotFoundError:
            continue
        ctxt += int(t["voluntary_ctxt_switches"]) + int(t["nonvoluntary_ctxt_switches"])
        threads += 1
    return {"rss_kb": int(st["VmRSS"].split()[0]), "ctxt": ctxt, "threads": threads,
            "cpu_s": procs.cpu_seconds(pid)}


def pss_kb(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def cgroup_pids(ns, unit: str) -> dict[int, int]:
    """{namespace pid: host pid} of every live process in UNIT's cgroup (host view)."""
    cg = ns.show(unit, "ControlGroup").get("ControlGroup", "")
    if not cg:
        return {}
    try:
        pids = (ns.cgroup / cg.lstrip("/") / "cgroup.procs").read_text().split()
    except FileNotFoundError:
        return {}
    found = {}
    for pid in pids:
        try:
            nspid = proc_status(int(pid))["NSpid"].split()[-1]
        except (FileNotFoundError, KeyError):
            continue
        if procs.alive(int(pid)):
            found[int(nspid)] = int(pid)
    return found


def main_host_pid(ns, unit: str) -> int | None:
    pid = int(ns.show(unit, "MainPID")["MainPID"])
    return cgroup_pids(ns, unit).get(pid) if pid else None


def unit_pss_mb(ns, unit: str) -> float | None:
    """Sum of the PSS of every process in UNIT (the host's cgroup2 may have no memory controller)."""
    total = [pss_kb(pid) for pid in cgroup_pids(ns, unit).values()]
    return round(sum(t for t in total if t) / 1024, 1) if total else None


# ---- HTTP --------------------------------------------------------------------------------

def wait_http(port: int, timeout: float = 30.0) -> str:
    deadline = time.monotonic() + timeout
    while True:
        try:
            status, body = procs.get(port, timeout=5)
            if status == 200:
                return body
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"nothing answered 200 on 127.0.0.1:{port} within {timeout}s")
        time.sleep(0.05)


def served_release(port: int) -> str:
    """"rN" of whoever answers a new connection, or "error: ..."."""
    try:
        status, body = procs.get(port, timeout=5)
    except OSError as exc:
        return f"error: {exc!r}"
    return body.split()[1] if status == 200 and body.startswith("release ") else f"HTTP {status}"


class SlowClient(threading.Thread):
    """GET /slow?s=S in a loop on one keep-alive connection (http.client reconnects after a
    `Connection: close`); counts answers, failures, non-2xx and the worst latency. Bounded by
    `deadline` (monotonic) and by `stop`."""

    def __init__(self, port: int, seconds: float, deadline: float):
        super().__init__(daemon=True)
        self.port, self.seconds, self.deadline = port, seconds, deadline
        self.stop = threading.Event()
        self.ok = self.non2xx = 0
        self.errors: list[str] = []
        self.worst = 0.0

    def run(self) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        while not self.stop.is_set() and time.monotonic() < self.deadline:
            t0 = time.monotonic()
            try:
                conn.request("GET", f"/slow?s={self.seconds}")
                resp = conn.getresponse()
                resp.read()
                if 200 <= resp.status < 300:
                    self.ok += 1
                else:
                    self.non2xx += 1
            except Exception as exc:  # noqa: BLE001 - every failure is what we count
                conn.close()
                self.errors.append(f"{time.strftime('%T')} {exc!r}")
                self.stop.wait(0.05)
                continue
            self.worst = max(self.worst, time.monotonic() - t0)
        conn.close()

    def result(self) -> dict:
        return {"requests": self.ok + self.non2xx + len(self.errors), "ok": self.ok,
                "non2xx": self.non2xx, "errors": len(self.errors), "error_samples": self.errors[:5],
                "max_latency_ms": ms(self.worst)}


# ---- wrk ---------------------------------------------------------------------------------

_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1000.0, "m": 60000.0}


def _latency_ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text)
    return round(float(m.group(1)) * _UNITS[m.group(2)], 2)


def wrk_cmd(port: int, seconds: float, threads: int = 2, conns: int = 64, path: str = "/",
            close: bool = False) -> list[str]:
    """close: every request on a new connection (`Connection: close`)."""
    return [WRK, f"-t{threads}", f"-c{conns}", f"-d{int(seconds)}s", "--latency",
            *(["-H", "Connection: close"] if close else []), f"http://127.0.0.1:{port}{path}"]


def parse_wrk(out: str) -> dict:
    """wrk 4.1 text output -> requests, rps, socket errors, non-2xx/3xx, latency percentiles."""
    res = {"requests": None, "rps": None, "connect": 0, "read": 0, "write": 0, "timeout": 0,
           "non2xx": 0, "p50_ms": None, "p99_ms": None, "max_ms": None}
    if m := re.search(r"(\d+) requests in ([\d.]+\w+)", out):
        res["requests"] = int(m.group(1))
    if m := re.search(r"Requests/sec:\s+([\d.]+)", out):
        res["rps"] = float(m.group(1))
    if m := re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out):
        res.update(zip(("connect", "read", "write", "timeout"), map(int, m.groups())))
    if m := re.search(r"Non-2xx or 3xx responses: (\d+)", out):
        res["non2xx"] = int(m.group(1))
    for q, key in (("50", "p50_ms"), ("99", "p99_ms")):
        if m := re.search(rf"^[ \t]+{q}(?:\.000)?%[ \t]+(\S+)", out, re.M):
            res[key] = _latency_ms(m.group(1))
    if m := re.search(r"^[ \t]+Latency[ \t]+\S+[ \t]+\S+[ \t]+(\S+)", out, re.M):
        res["max_ms"] = _latency_ms(m.group(1))
    res["socket_errors"] = res["connect"] + res["read"] + res["write"] + res["timeout"]
    return res


def start_wrk(port: int, seconds: float, **kw) -> subprocess.Popen:
    return subprocess.Popen(wrk_cmd(port, seconds, **kw), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def finish_wrk(proc: subprocess.Popen, seconds: float) -> dict:
    try:
        out, _ = proc.communicate(timeout=seconds + 30)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
    res = parse_wrk(out)
    res["raw"] = out
    return res


def run_wrk(port: int, seconds: float, **kw) -> dict:
    return finish_wrk(start_wrk(port, seconds, **kw), seconds)


def dump_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")


# ---- the machine -------------------------------------------------------------------------

def _out(*cmd: str) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=20).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return ""


def _diff_id() -> str:
    """A short fingerprint of the uncommitted changes in src/, to tell two dirty states apart."""
    diff = subprocess.run(["git", "-C", str(REPO), "diff", "HEAD", "--", "src"], capture_output=True).stdout
    return hashlib.sha256(diff).hexdigest()[:8]


def cadenza_commit() -> str:
    """The commit of src/, and a fingerprint of its uncommitted changes if there are any."""
    dirty = _out("git", "-C", str(REPO), "status", "--porcelain", "--", "src")
    return (_out("git", "-C", str(REPO), "log", "-1", "--format=%h", "--", "src")
            + (f" + uncommitted changes in src/ (diff {_diff_id()})" if dirty else ""))


def _version(module: str) -> str:
    return _out(PYTHON, "-c", f"import {module}; print({module}.__version__)") or "not installed"


def machine() -> dict:
    cpuinfo = Path("/proc/cpuinfo").read_text()
    model = next((line.split(":", 1)[1].strip() for line in cpuinfo.splitlines()
                  if line.startswith("model name")), platform.processor())
    mem = next(line.split()[1] for line in Path("/proc/meminfo").read_text().splitlines()
               if line.startswith("MemTotal"))
    return {
        "nproc": os.cpu_count(), "cpu": model, "mem_gb": round(int(mem) / 2**20, 1),
        "kernel": platform.release(), "systemd": _out("systemctl", "--version").split("\n")[0],
        "python": platform.python_version(), "wrk": _out("wrk", "-v").split("\n")[0],
        "gunicorn": _out(str(VENV_BIN / "gunicorn"), "--version"),
        "uvicorn": _version("uvicorn"), "granian": _version("granian"),
        "httptools": _version("httptools"), "uvloop": _version("uvloop"),
        "cadenza_commit": cadenza_commit(),
        "head": _out("git", "-C", str(REPO), "rev-parse", "--short", "HEAD"),
        "loadavg_at_start": Path("/proc/loadavg").read_text().split()[:3],
    }


def free_port() -> int:
    return procs.free_port()


def fd_at_3(fd: int) -> str:
    """sh redirections that put FD at 3 for the exec'd program (nothing when it is 3 already)."""
    return "" if fd == 3 else f" 3<&{fd} {fd}<&-"


def bound_socket() -> socket.socket:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(1024)
    return sock


def comma_list(text: str, allowed=None, kind=str) -> list:
    """An argparse type: "a,b,c" as a list, each item checked against `allowed` when given."""
    items = [kind(x.strip()) for x in text.split(",") if x.strip()]
    if allowed is not None and (bad := [x for x in items if x not in allowed]):
        raise argparse.ArgumentTypeError(f"unknown: {', '.join(map(str, bad))} (choose from {', '.join(allowed)})")
    return items
