"""How long a new worker takes, from the master's request to its first accepted connection,
with and without preload.

    .venv/bin/python tests/bench/respawn.py [--reps 20] [--app MOD:OBJ] [--json docs/respawn.json]

A `cadenza run` master (no systemd, loopback only) serves the app with 2 workers; the benchmark
plays its NOTIFY_SOCKET (tests/procs.Master). Each repetition sends SIGTTIN and measures:

- request -> ready: from the signal to the STATUS= that says the third worker is ready (the
  worker sends READY=1 once it listens, and the master passes it on at once);
- request -> first answer: from the signal to the first response that names the new worker's
  pid, from a client that opens a fresh connection after each answer (the kernel hands a
  connection to whichever worker accepts first, so this includes waiting to be picked);

then SIGTTOU takes the worker away again, and the next repetition waits until it is gone. The
app (default: the built-in demo) is imported once per run with preload, once per worker without. The target (DESIGN §4.3): a preloaded respawn <= 50 ms from
the request to the first accept. Prints a markdown table; about 30 s.
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from procs import Master, descendants, free_port  # noqa: E402


def pid_answer(port: int) -> int | None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", "/")
        body = conn.getresponse().read().decode()
    except OSError:
        return None
    finally:
        conn.close()
    words = body.split()
    return int(words[words.index("pid") + 1]) if "pid" in words else None


def run_mode(tmp: Path, preload: bool, reps: int, app: str) -> dict:
    port = free_port()
    config = tmp / f"cadenza-{preload}.toml"
    config.write_text(f'[app]\nname = "respawn"\n[listen]\naddresses = ["127.0.0.1:{port}"]\n'
                      f'[workers]\ncount = 2\napp = "{app}"\npreload = {str(preload).lower()}\n'
                      f'[control]\nsocket = "{tmp}/control-{preload}.sock"\n')
    master = Master(tmp, "-c", str(config))
    ready, answered = [], []
    try:
        master.wait_ready(60)
        for _ in range(reps):
            before = set(descendants(master.pid))
            t0 = time.monotonic()
            master.signal(signal.SIGTTIN)
            master.wait_status("3/3 workers ready", timeout=30)
            ready.append(time.monotonic() - t0)
            new = set(descendants(master.pid)) - before
            while True:
                pid = pid_answer(port)
                if pid in new:
                    answered.append(time.monotonic() - t0)
                    break
                if time.monotonic() - t0 > 30:
                    raise RuntimeError("the new worker never answered")
            master.signal(signal.SIGTTOU)
            master.wait_status("2/2 workers ready", timeout=30)
            deadline = time.monotonic() + 30
            while set(descendants(master.pid)) & new and time.monotonic() < deadline:
                time.sleep(0.01)
        master.signal(signal.SIGTERM)
        master.wait_exit(60)
    finally:
        master.close()
    return {"preload": preload, "ready_ms": [round(x * 1000, 1) for x in ready],
            "first_answer_ms": [round(x * 1000, 1) for x in answered]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--app", default="cadenza.demo:app")
    parser.add_argument("--json", default=str(Path(__file__).resolve().parents[2] / "docs/respawn.json"))
    args = parser.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for preload in (False, True):
            results.append(run_mode(Path(tmp), preload, args.reps, args.app))
    print(f"| mode | request -> ready, median | p90 | request -> first answer, median | p90 |")
    print("|---|---|---|---|---|")
    for r in results:
        def q(xs, p):
            return sorted(xs)[min(len(xs) - 1, int(p * len(xs)))]
        print(f"| {'preload' if r['preload'] else 'exec'} | {statistics.median(r['ready_ms']):.1f} ms "
              f"| {q(r['ready_ms'], 0.9):.1f} ms | {statistics.median(r['first_answer_ms']):.1f} ms "
              f"| {q(r['first_answer_ms'], 0.9):.1f} ms |")
    Path(args.json).write_text(json.dumps({"app": args.app, "reps": args.reps, "cpus": os.cpu_count(),
                                           "date": time.strftime("%Y-%m-%d"), "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
