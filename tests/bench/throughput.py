"""Benchmark 3: throughput overhead of the supervisor.

Two listening sockets, bound here the same way (127.0.0.1, backlog 1024), each with its fleet:
  bare     N x `python -m cadenza.worker.app app:app` started directly (the socket as fd 3,
           LISTEN_FDS=1, LISTEN_PID = its own pid), no supervisor at all;
  cadenza  `cadenza run` with [workers] count = N, app = "app:app" and its socket as fd 3 (as
           systemd would pass it), which starts the same N worker programs on it.
Both fleets stay up; wrk -t2 -c64 then alternates between them in short runs (A B B A A B ...),
so that every pair of neighbouring runs sees the same machine, and the result is the median of
the per-pair ratios cadenza/bare. (The fleet not under load is idle: its cost is its wake-ups.)
(Loading both fleets at once instead, wrk -t1 -c32 each, was worse: the two sessions do not get
equal CPU shares, and the ratio ranged from 0.27 to 1.42.)

wrk sends `Connection: close`, so every request is a new connection that the kernel hands to
whichever worker is waiting. With keep-alive, the 64 connections are shared out once, at
connect time, and one asyncio worker often grabs most of them: the same fleet then measured
2,100 or 4,700 requests/s from one run to the next, and the ratio was noise.

Each fleet is one session (setsid) as the kernel's autogroup scheduler shares CPU time between
sessions: bare = a shell that starts the N workers and waits, cadenza = its master.
"""
from __future__ import annotations

import os
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from common import PYTHON, VENV_BIN, bound_socket, deploy, median, pct, run_wrk, wait_http


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LISTEN_", "NOTIFY_", "JOURNAL_"))}
    env["LISTEN_FDS"] = "1"
    return env


def _start(kind: str, app_dir: Path, fd: int, workers: int) -> subprocess.Popen:
    if kind == "bare":
        one = f"LISTEN_PID=\\$\\$ exec {PYTHON} -m cadenza.worker.app app:app"
        cmd = f'for i in $(seq {workers}); do sh -c "{one}" & done; wait'
    else:
        cmd = f"LISTEN_PID=$$ exec {VENV_BIN / 'cadenza'} run -c cadenza.toml"
    return subprocess.Popen(["sh", "-c", f"exec 3<&{fd} {fd}<&-; {cmd}" if fd != 3 else cmd], cwd=app_dir,
                            env=_env(), pass_fds=(fd,), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)


def _stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:                  # each is the leader of its own session: it and its workers
        try:
            os.killpg(p.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    for p in procs:
        try:
            p.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    time.sleep(0.5)                  # workers of cadenza exit after their master's drain


def _wrk(sock, seconds: float) -> dict:
    res = run_wrk(sock.getsockname()[1], seconds, close=True)
    return {"rps": res["rps"], "p99_ms": res["p99_ms"], "socket_errors": res["socket_errors"],
            "non2xx": res["non2xx"]}


def run(pairs: int, seconds: float, workers: int, log=print) -> dict:
    with tempfile.TemporaryDirectory(prefix="cadenza-bench-") as tmp, \
            bound_socket() as bare_sock, bound_socket() as cadenza_sock:
        app_dir = deploy.AppRoot(Path(tmp), "tp", 0).deploy("r1", venv=False)
        # The release's cadenza.toml: its control socket under tmp, nothing on the host's /run.
        (app_dir / "cadenza.toml").write_text(
            f'[app]\nname = "tp"\nroot = "{tmp}/tp"\n[workers]\ncount = {workers}\napp = "app:app"\n'
            f'[control]\nsocket = "{tmp}/control.sock"\n')
        socks = {"bare": bare_sock, "cadenza": cadenza_sock}
        fleets = []
        try:
            for kind, sock in socks.items():
                fleets.append(_start(kind, app_dir, sock.fileno(), workers))
            for sock in socks.values():
                wait_http(sock.getsockname()[1], timeout=60)
            time.sleep(1.0)                      # every worker imported and listening
            for sock in socks.values():
                _wrk(sock, 2)                    # warm-up
            runs = {"bare": [], "cadenza": []}
            ratios = []
            for i in range(pairs):
                order = ("bare", "cadenza") if i % 2 == 0 else ("cadenza", "bare")
                got = {kind: _wrk(socks[kind], seconds) for kind in order}
                for kind in order:
                    runs[kind].append(got[kind])
                ratio = got["cadenza"]["rps"] / got["bare"]["rps"] if got["bare"]["rps"] else None
                ratios.append(ratio)
                log(f"  throughput pair {i + 1}/{pairs}: bare {got['bare']['rps']:.0f} rps, "
                    f"cadenza {got['cadenza']['rps']:.0f} rps, ratio {ratio:.3f}")
        finally:
            _stop(fleets)
    ratios = [x for x in ratios if x is not None]
    return {"workers": workers, "pairs": pairs, "seconds": seconds, "runs": runs,
            "bare_rps": median([x["rps"] for x in runs["bare"]]),
            "cadenza_rps": median([x["rps"] for x in runs["cadenza"]]),
            "ratio_median": round(median(ratios), 4) if ratios else None,
            "ratio_of_medians": round(median([x["rps"] for x in runs["cadenza"]])
                                      / median([x["rps"] for x in runs["bare"]]), 4),
            "ratios": [round(x, 4) for x in ratios],
            "ratio_iqr": [round(pct(ratios, 25), 4), round(pct(ratios, 75), 4)] if ratios else None,

            "errors": sum(x["socket_errors"] + x["non2xx"] for k in runs for x in runs[k])}
