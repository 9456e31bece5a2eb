"""The contenders of the request-path benchmark (engine.py), and one server process of each.

Each server is a plain process started in a session of its own, with the bench directory as its
working directory and an environment without socket activation, notify or CADENZA_* variables;
it is stopped by its pid, and whatever is left of its session is waited for, then SIGKILLed by
pid, and reported.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import common
import engine_apps
from common import BENCH, VENV_BIN, procs

READY_TIMEOUT = 60.0
STOP_TIMEOUT = 30.0
# The line each built-in worker logs once it knows its engine ("serving WSGI (10 threads) with
# httptools on uvloop"); a worker that logs none is reported as "not stated".
SERVING = re.compile(r"serving (?:ASGI|WSGI)\b.*? with (\w+) on (\w+)")


class Unavailable(Exception):
    """A contender that cannot be measured here: the message says why, and how to fix it."""


# ---- the contenders ----------------------------------------------------------------------

@dataclass(frozen=True)
class Contender:
    key: str
    label: str
    interfaces: tuple[str, ...]
    program: str
    # cadenza only: the [http] tables to offer, in order of preference (None: no [http] table)
    http: tuple[dict | None, ...] = ()

    def argv(self, interface: str, workers: int, port: int, config: Path | None) -> list[str]:
        app, exe = f"engine_apps:{interface}", str(VENV_BIN / self.program)
        if self.program == "cadenza":
            return [exe, "run", "-c", str(config), "--app", app, "--bind", f"127.0.0.1:{port}",
                    "--workers", str(workers)]
        if self.program == "gunicorn":
            return [exe, "-w", str(workers), "-b", f"127.0.0.1:{port}", app]
        if self.program == "uvicorn":
            return [exe, "--workers", str(workers), "--http", "httptools", "--loop", "uvloop",
                    "--no-access-log", "--host", "127.0.0.1", "--port", str(port), app]
        return [exe, "--interface", interface, "--workers", str(workers), "--host", "127.0.0.1",
                "--port", str(port), app]


CONTENDERS = (
    Contender("cadenza", "cadenza (default engine)", ("wsgi", "asgi"), "cadenza",
              http=({"access_log": False}, None)),
    Contender("cadenza-h11", "cadenza, h11 + asyncio", ("wsgi", "asgi"), "cadenza",
              http=({"protocol": "h11", "loop": "asyncio", "access_log": False},
                    {"protocol": "h11", "loop": "asyncio"})),
    Contender("gunicorn", "gunicorn 27, sync", ("wsgi",), "gunicorn"),
    Contender("uvicorn", "uvicorn, httptools + uvloop", ("asgi",), "uvicorn"),
    Contender("granian", "granian", ("wsgi", "asgi"), "granian"),
)
BY_KEY = {c.key: c for c in CONTENDERS}


def _toml(value) -> str:
    return ("true" if value else "false") if isinstance(value, bool) else json.dumps(value)


def cadenza_config(contender: Contender, tmp: Path) -> tuple[Path, dict | None]:
    """The config file of a cadenza variant: its [app] name, a control socket under TMP, and the
    first of its [http] tables that `cadenza check` accepts. Unavailable if it accepts none."""
    refused = []
    for http in contender.http:
        text = (f'[app]\nname = "engine-{contender.key}"\n'
                f'[control]\nsocket = "{tmp / (contender.key + ".sock")}"\n')
        if http is not None:
            text += "[http]\n" + "".join(f"{k} = {_toml(v)}\n" for k, v in http.items())
        path = tmp / f"{contender.key}.toml"
        path.write_text(text)
        probe = tmp / f"{contender.key}.check.toml"
        probe.write_text(text + '[workers]\napp = "engine_apps:wsgi"\n')
        proc = subprocess.run([str(VENV_BIN / "cadenza"), "check", "-c", str(probe)], cwd=BENCH,
                              env=_env(), capture_output=True, text=True, timeout=60)
        if proc.returncode == 0:
            return path, http
        refused.append(f"[http] {http or '(none)'}: {(proc.stdout + proc.stderr).strip()}")
    raise Unavailable("this cadenza refuses its config: " + " | ".join(refused))


def _env() -> dict[str, str]:
    """Our environment minus what would steer a server: socket activation, notify, CADENZA_*."""
    return {k: v for k, v in os.environ.items()
            if not k.startswith(("LISTEN_", "NOTIFY_", "JOURNAL_", "CADENZA_", "GUNICORN_", "UVICORN_",
                                 "GRANIAN_", "WEB_CONCURRENCY"))}


# ---- one server: a process leading its own session ---------------------------------------

def session_members(sid: int) -> list[int]:
    """Live processes of session SID (its leader included while it lives)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid and fields[0] != "Z":
            found.append(int(entry.name))
    return found


def _mapped(pid: int) -> set[str]:
    """Which of httptools and uvloop process PID has loaded (their C extensions in its maps)."""
    try:
        maps = Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return set()
    return {name for name in ("httptools", "uvloop") if f"/{name}/" in maps}


class Server:
    def __init__(self, contender: Contender, interface: str, workers: int, tmp: Path,
                 config: Path | None):
        self.contender, self.interface, self.workers = contender, interface, workers
        self.config = config
        self.port = common.free_port()
        self.log_path = tmp / f"{contender.key}-{interface}-{workers}.log"
        self.proc: subprocess.Popen | None = None
        self.failed: str | None = None
        self.loaded: list[str] | None = None
        self.said: list[str] | None = None
        self.mismatch: str | None = None
        self.config_http: dict | None = None
        self.stopped: dict | None = None

    @property
    def key(self) -> str:
        return self.contender.key

    def log_tail(self, lines: int = 6) -> str:
        try:
            text = self.log_path.read_text(errors="replace").strip().splitlines()
        except OSError:
            return ""
        return " / ".join(line.strip() for line in text[-lines:])

    def start(self) -> None:
        exe = VENV_BIN / self.contender.program
        if not exe.exists():
            raise Unavailable(f"{exe} is missing: .venv/bin/pip install -e '.[bench]'")
        argv = self.contender.argv(self.interface, self.workers, self.port, self.config)
        with open(self.log_path, "wb") as out:
            self.proc = subprocess.Popen(argv, cwd=BENCH, env=_env(), stdin=subprocess.DEVNULL,
                                         stdout=out, stderr=subprocess.STDOUT, start_new_session=True)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait_ready(self) -> None:
        """Until the app answers on the port and the leader has its N workers (or it exits)."""
        deadline = time.monotonic() + READY_TIMEOUT
        answered = False
        while True:
            if not self.alive():
                raise Unavailable(f"exited with status {self.proc.returncode} before it served: {self.log_tail()}")
            if not answered:
                try:
                    status, body = procs.get(self.port, timeout=5)
                    if status != 200 or body.encode() != engine_apps.BODY:
                        raise Unavailable(f"127.0.0.1:{self.port} answered {status} {body[:60]!r}, "
                                          f"not the app's {engine_apps.BODY!r}")
                    answered = True
                except OSError:
                    pass
            if answered and len(self.worker_pids()) >= self.workers:
                return
            if time.monotonic() > deadline:
                raise Unavailable(f"not serving with {self.workers} workers on 127.0.0.1:{self.port} "
                                  f"within {READY_TIMEOUT:.0f} s: {self.log_tail()}")
            time.sleep(0.05)

    def worker_pids(self) -> list[int]:
        """The leader's children but multiprocessing's resource tracker (uvicorn has one)."""
        pids = []
        for pid in procs.children(self.proc.pid):
            try:
                if "resource_tracker" not in procs.cmdline(pid):
                    pids.append(pid)
            except OSError:
                continue
        return pids

    def note_engine(self) -> None:
        """What the workers run: the C extensions they map and, for cadenza, the engine its
        workers say they serve with; `mismatch` when that is not the one its [http] asked for."""
        self.loaded = sorted(set().union(*(_mapped(pid) for pid in self.worker_pids())))
        if self.contender.program != "cadenza":
            return
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            text = ""
        said = sorted({(m.group(1), m.group(2)) for m in SERVING.finditer(text)})
        self.said = [f"{protocol} on {loop}" for protocol, loop in said]
        http = self.config_http or {}
        protocol, loop = http.get("protocol", "auto"), http.get("loop", "auto")
        wrong = [f"{p} on {lp}" for p, lp in said
                 if protocol not in ("auto", p) or loop not in ("auto", lp)]
        if wrong:
            self.mismatch = (f"asked for protocol {protocol}, loop {loop}; its workers said they serve "
                             f"with {', '.join(wrong)}")

    def stop(self) -> None:
        """SIGTERM to the leader, then whatever is left of its session is waited for and, after
        a deadline, SIGKILLed by pid. Records the exit status and anything that had to be killed."""
        if self.proc is None or self.stopped is not None:
            return
        pid, killed = self.proc.pid, []
        if self.proc.poll() is None:
            os.kill(pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                killed.append(f"{pid} {procs.cmdline(pid)[:80]} (leader, after {STOP_TIMEOUT:.0f} s)")
                os.kill(pid, signal.SIGKILL)
                self.proc.wait()
        deadline = time.monotonic() + 10
        while (left := session_members(pid)) and time.monotonic() < deadline:
            time.sleep(0.05)
        for member in left:
            try:
                killed.append(f"{member} {procs.cmdline(member)[:80]}")
                os.kill(member, signal.SIGKILL)
            except (ProcessLookupError, FileNotFoundError):
                pass
        deadline = time.monotonic() + 10
        while session_members(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        self.stopped = {"exit": self.proc.returncode, "killed": killed,
                        "still_there": session_members(pid)}
