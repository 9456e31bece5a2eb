"""The servers of the memory benchmark (memory.py): the apps' data, one server of each mode
leading a session of its own, and the figures of its process tree from procfs."""
from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import common
from common import VENV_BIN, median
from engine_servers import _env, session_members

APPS_DIR = Path(__file__).resolve().parent / "memory_apps"
APPS = {
    "django": {"app": "shop.wsgi:application", "paths": ["/admin/login/", "/books/", "/books/{n}/"]},
    "synthetic": {"app": "synthetic:application", "paths": ["/", "/items", "/item/{n}", "/search"]},
}
READY_TIMEOUT, STOP_TIMEOUT = 180.0, 30.0
SMAPS = ("Rss", "Pss", "Pss_Anon", "Pss_File", "Private_Clean", "Private_Dirty", "Swap")


class Failed(Exception):
    """A server that could not be measured: the message says what happened."""


# ---- the apps' data ----------------------------------------------------------------------

def prepare(apps: list[str], tmp: Path) -> dict[str, str]:
    """The environment the apps need, their data made under TMP: the Django database (migrated
    and seeded) and the synthetic app's generated modules (compiled)."""
    env = {"MEMORY_BENCH_DB": str(tmp / "shop.sqlite3"), "SYNTHETIC_CODE": str(tmp / "code"),
           "DJANGO_SETTINGS_MODULE": "shop.settings"}
    steps = []
    if "django" in apps:
        steps += [["manage.py", "migrate", "-v0"], ["manage.py", "seed"]]
    if "synthetic" in apps:
        steps.append(["codegen.py", env["SYNTHETIC_CODE"]])
    for step in steps:
        proc = subprocess.run([common.PYTHON, *step], cwd=APPS_DIR, env={**_env(), **env},
                              capture_output=True, text=True, timeout=300, check=False)
        if proc.returncode != 0:
            raise SystemExit(f"cannot prepare the apps: `python {' '.join(step)}` in {APPS_DIR} exited "
                             f"{proc.returncode}: {(proc.stdout + proc.stderr).strip()[-800:]}")
    return env


# ---- procfs ------------------------------------------------------------------------------

def _stat(pid: int | str) -> tuple[int, str, int] | None:
    """(ppid, state, start time) of PID, None when it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return int(fields[1]), fields[0], int(fields[19])


def tree(leader: int) -> list[int]:
    """LEADER and every live descendant, whichever thread forked it (/proc/*/stat's ppid)."""
    kids: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (st := _stat(entry)) and st[1] != "Z":
            kids.setdefault(st[0], []).append(int(entry))
    found, todo = [], [leader]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo += kids.get(pid, [])
    return found


def smaps(pid: int) -> dict[str, int] | None:
    """The SMAPS fields of /proc/PID/smaps_rollup, in kB; None when it is gone."""
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return None
    out = {k: 0 for k in SMAPS}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        if key in out:
            out[key] = int(rest.split()[0])
    return out


def title(pid: int) -> str:
    try:
        return common.procs.cmdline(pid)
    except OSError:
        return ""


# ---- one server --------------------------------------------------------------------------

class Server:
    """One mode serving one app: a process leading its own session, stopped by pid."""

    def __init__(self, mode: str, app: str, workers: int, tmp: Path, env: dict[str, str]):
        self.mode, self.app, self.workers, self.env = mode, app, workers, env
        self.port = common.free_port()
        self.tag = f"{app}-{mode}-{workers}"
        self.log_path = tmp / f"{self.tag}.log"
        self.config = tmp / f"{self.tag}.toml"
        self.proc: subprocess.Popen | None = None
        self.seen: dict[int, int] = {}          # pid: start time, of every process of the tree seen
        self.stopped: dict | None = None

    def argv(self) -> list[str]:
        target = APPS[self.app]["app"]
        if self.mode.startswith("cadenza"):
            self.config.write_text(
                f'[app]\nname = "{self.tag}"\n'
                f'[listen]\naddresses = ["127.0.0.1:{self.port}"]\n'
                f'[workers]\ncount = {self.workers}\napp = "{target}"\n'
                f'preload = {"true" if self.mode == "cadenza-preload" else "false"}\n'
                # 16 interpreters importing 100 MB each on 2 cores can take more than the
                # default 30 s; gunicorn has no such limit
                f'ready_timeout = {READY_TIMEOUT:.0f}\n'
                f'[control]\nsocket = "{self.config.with_suffix(".sock")}"\n')
            return [str(VENV_BIN / "cadenza"), "run", "-c", str(self.config)]
        return [str(VENV_BIN / "gunicorn"), *(["--preload"] if self.mode == "gunicorn-preload" else []),
                "-w", str(self.workers), "-b", f"127.0.0.1:{self.port}", target]

    def start(self) -> None:
        with open(self.log_path, "wb") as out:
            self.proc = subprocess.Popen(self.argv(), cwd=APPS_DIR, env={**_env(), **self.env},
                                         stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True)

    def log_tail(self, lines: int = 8) -> str:
        """The log's errors and warnings (the first few), then its last LINES lines."""
        try:
            text = self.log_path.read_text(errors="replace").strip().splitlines()
        except OSError:
            return ""
        notable = [line for line in text[:-lines] if any(w in line for w in (" ERROR ", " WARNING ", "Error"))]
        return " / ".join(line.strip() for line in notable[:4] + text[-lines:])

    def processes(self) -> dict[int, str]:
        """{pid: role} of the tree: master (the leader), preloader, worker."""
        pids = tree(self.proc.pid)
        for pid in pids:
            if st := _stat(pid):
                self.seen.setdefault(pid, st[2])
        return {pid: "master" if pid == self.proc.pid
                else "preloader" if title(pid).startswith("cadenza preloader") else "worker"
                for pid in pids}

    def wait_ready(self) -> float:
        """Seconds until the app answers 200 and the tree holds N workers."""
        t0, deadline = time.monotonic(), time.monotonic() + READY_TIMEOUT
        path = APPS[self.app]["paths"][0]
        while True:
            if self.proc.poll() is not None:
                raise Failed(f"exited with status {self.proc.returncode} before it served: {self.log_tail()}")
            workers = [p for p, role in self.processes().items() if role == "worker"]
            if len(workers) >= self.workers:
                try:
                    if common.procs.get(self.port, path, timeout=10)[0] == 200:
                        return time.monotonic() - t0
                except OSError:
                    pass
            if time.monotonic() > deadline:
                raise Failed(f"not serving with {self.workers} workers on 127.0.0.1:{self.port} within "
                             f"{READY_TIMEOUT:.0f} s ({len(workers)} workers): {self.log_tail()}")
            time.sleep(0.1)

    def stop(self) -> None:
        """SIGTERM to the leader; then whatever is left of its session, or of the tree seen,
        is waited for and SIGKILLed by pid after a deadline. Records what had to be killed."""
        if self.proc is None or self.stopped is not None:
            return
        pid, killed = self.proc.pid, []
        if self.proc.poll() is None:
            os.kill(pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                killed.append(f"{pid} (leader, after {STOP_TIMEOUT:.0f} s)")
                os.kill(pid, signal.SIGKILL)
                self.proc.wait()

        def left() -> set[int]:
            return set(session_members(pid)) | {p for p, t in self.seen.items() if p != pid and _same(p, t)}
        deadline = time.monotonic() + 10
        while left() and time.monotonic() < deadline:
            time.sleep(0.05)
        for member in left():
            try:
                killed.append(f"{member} {title(member)[:80]}")
                os.kill(member, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.stopped = {"exit": self.proc.returncode, "killed": killed}


def _same(pid: int, started: int) -> bool:
    """PID is still the live process that started at STARTED (not a pid since reused)."""
    st = _stat(pid)
    return st is not None and st[1] != "Z" and st[2] == started


def measure_tree(server: Server) -> dict:
    """The tree's figures, in MB, and every process's own."""
    rows = []
    for pid, role in server.processes().items():
        sm, st = smaps(pid), _stat(pid)
        if sm is None or st is None:
            continue
        rows.append({"pid": pid, "ppid": st[0], "role": role, "title": title(pid)[:120],
                     **{k.lower(): v for k, v in sm.items()},
                     "uss": sm["Private_Clean"] + sm["Private_Dirty"]})
    workers = [r for r in rows if r["role"] == "worker"]
    master = next((r for r in rows if r["role"] == "master"), None)
    preloaders = [r for r in rows if r["role"] == "preloader"]
    mb = lambda kb: None if kb is None else round(kb / 1024, 1)  # noqa: E731
    return {
        "tree_pss_mb": mb(sum(r["pss"] for r in rows)),
        "tree_pss_anon_mb": mb(sum(r["pss_anon"] for r in rows)),
        "tree_pss_file_mb": mb(sum(r["pss_file"] for r in rows)),
        "tree_rss_mb": mb(sum(r["rss"] for r in rows)),
        "processes": len(rows), "workers": len(workers),
        "worker_uss_mb": mb(median([w["uss"] for w in workers])),
        "worker_uss_max_mb": mb(max((w["uss"] for w in workers), default=None)),
        "worker_pss_mb": mb(median([w["pss"] for w in workers])),
        "worker_rss_mb": mb(median([w["rss"] for w in workers])),
        "master_rss_mb": mb(master and master["rss"]), "master_pss_mb": mb(master and master["pss"]),
        "preloader_rss_mb": mb(preloaders[0]["rss"]) if preloaders else None,
        "preloader_pss_mb": mb(preloaders[0]["pss"]) if preloaders else None,
        "preload_in_effect": bool(preloaders) and all(
            w["ppid"] in {p["pid"] for p in preloaders} for w in workers),
        "procs": rows,
    }
