"""Recycling under load: workers.max_requests retires workers make-before-break (DESIGN §4.4).

    .venv/bin/python tests/bench/recycle.py [--duration 20] [--workers 4] [--max-requests 100]
                                            [--keepalive 3] [--fresh 3] [--json docs/recycle.json]

One real master outside systemd (`cadenza run -c FILE`: the built-in worker serving
cadenza.demo:app on a loopback port, workers.count = 4, workers.max_requests = 100) is loaded for
DURATION seconds by KEEPALIVE client loops that reuse one connection each and FRESH loops that open
a new connection per request (http.client, one thread per loop, in two client processes of their
own). Every request counts: an exception or a status other than 200 is a failed request. A
keep-alive loop follows `Connection: close` (a draining worker's answer) by connecting again, as
any HTTP client does; it never retries a request.

Meanwhile, every 50 ms, the master's status is read over its control socket (what `supervisorctl
status --json` prints) and its workers in state "ready" and "booting" counted. Reported: the
fewest ready workers in any sample (the target: never below the count), the most replacements
starting at once (one slot at a time: at most 1), the recycles done (the master's log: "replaced
by pid") and how long a replacement took to be ready (median), the most requests a worker was
seen to have served (a worker serves on past its limit until its replacement is ready, and the
replacements come one at a time), requests answered and failed (the target: 0), and the samples
taken with their largest gap. Prints a table and writes every figure, with the machine, as JSON.
"""
from __future__ import annotations

import argparse
import http.client
import itertools
import multiprocessing
import re
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

from common import REPO, dump_json, machine
from procs import Master, free_port

from cadenza.tools.supervisorctl import request

SAMPLE_EVERY = 0.05


def _loop(port: int, keepalive: bool, until: float, totals, lock) -> None:
    ok = failed = 0
    errors: dict[str, int] = {}
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    while time.monotonic() < until:
        try:
            conn.request("GET", "/")
            resp = conn.getresponse()
            resp.read()
            if resp.status == 200:
                ok += 1
            else:
                failed += 1
                errors[str(resp.status)] = errors.get(str(resp.status), 0) + 1
            if not keepalive or resp.getheader("connection", "").lower() == "close":
                conn.close()   # the next request connects again
        except Exception as exc:  # noqa: BLE001 - every failure counts, whatever its kind
            failed += 1
            errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1
            conn.close()
    conn.close()
    with lock:
        totals["ok"] += ok
        totals["failed"] += failed
        for kind, n in errors.items():
            totals.setdefault(kind, 0)
            totals[kind] += n


def _clients(port: int, loops: int, keepalive: bool, until: float, out) -> None:
    """One client process: `loops` threads; puts {"ok", "failed", <error kind>: n} on `out`."""
    totals, lock = {"ok": 0, "failed": 0}, threading.Lock()
    threads = [threading.Thread(target=_loop, args=(port, keepalive, until, totals, lock)) for _ in range(loops)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    out.put(totals)


def _status(sock: str) -> dict:
    for event in request(sock, {"cmd": "status"}, 10):
        if event.get("done"):
            return event["status"]
    raise RuntimeError("no answer from the control socket")


def run(duration: float, workers: int, max_requests: int, keepalive: int, fresh: int, log=print) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="cadenza-recycle-"))
    port, sock = free_port(), str(tmp / "control.sock")
    (tmp / "cadenza.toml").write_text(
        f'[app]\nname = "recycle"\n[listen]\naddresses = ["127.0.0.1:{port}"]\n'
        f'[workers]\ncount = {workers}\napp = "cadenza.demo:app"\nmax_requests = {max_requests}\n'
        f'graceful_timeout = 10\n[control]\nsocket = "{sock}"\n')
    m = Master(tmp, "-c", "cadenza.toml")
    try:
        m.wait_ready(timeout=60)
        ctx = multiprocessing.get_context("spawn")
        out = ctx.Queue()
        until = time.monotonic() + duration
        procs = [ctx.Process(target=_clients, args=(port, n, ka, until, out))
                 for n, ka in ((keepalive, True), (fresh, False)) if n]
        for p in procs:
            p.start()
        ready, booting, taken, served, errors = [], [], [], {}, []
        while time.monotonic() < until:
            at = time.monotonic()
            try:
                st = _status(sock)
            except Exception as exc:  # noqa: BLE001 - a sample lost is reported, not hidden
                errors.append(repr(exc))
            else:
                ready.append(sum(1 for w in st["workers"] if w["state"] == "ready"))
                booting.append(sum(1 for w in st["workers"] if w["state"] == "booting"))
                for w in st["workers"]:
                    served[w["pid"]] = max(served.get(w["pid"], 0), w.get("requests") or 0)
            taken.append(at)
            time.sleep(max(0.0, at + SAMPLE_EVERY - time.monotonic()))
        totals = {"ok": 0, "failed": 0}
        for _ in procs:
            for kind, n in out.get(timeout=60).items():
                totals[kind] = totals.get(kind, 0) + n
        for p in procs:
            p.join()
        text = m.log()
        recycles = len(re.findall(r"replaced by pid \d+; it drains", text))
        gaps = [b - a for a, b in itertools.pairwise(taken)]
        starts = [float(x) for x in re.findall(r"\) ready after ([0-9.]+)s", text)][workers:]   # replacements
        result = {
            "min_ready": min(ready), "max_ready": max(ready), "count": workers,
            "max_booting": max(booting), "recycles": recycles,
            "workers_seen": len(served), "most_served_by_one_worker": max(served.values()),
            "replacement_ready_s_median": round(statistics.median(starts), 3) if starts else None,
            "answered": totals.pop("ok"), "failed": totals.pop("failed"), "failures_by_kind": totals,
            "requests_per_s": None, "samples": len(ready), "sample_errors": errors,
            "largest_sample_gap_ms": round(max(gaps) * 1000, 1) if gaps else None,
            "master_errors": [line for line in text.splitlines() if " ERROR " in line][:20],
        }
        result["requests_per_s"] = round((result["answered"] + result["failed"]) / duration)
        return result
    finally:
        m.close()
        shutil.rmtree(tmp, ignore_errors=True)


def table(settings: dict, r: dict) -> str:
    rows = [
        ("ready workers, fewest in a sample", f"{r['min_ready']} (count {r['count']})"),
        ("replacements starting at once, most", f"{r['max_booting']}"),
        ("recycles done", f"{r['recycles']} ({r['workers_seen']} workers seen)"),
        ("a replacement's start to ready, median", f"{r['replacement_ready_s_median']} s"),
        ("most requests one worker served",
         f"{r['most_served_by_one_worker']} (max_requests {settings['max_requests']})"),
        ("requests answered", f"{r['answered']} ({r['requests_per_s']}/s)"),
        ("failed requests", f"{r['failed']}" + (f" {r['failures_by_kind']}" if r["failures_by_kind"] else "")),
        ("status samples",
         f"{r['samples']} (largest gap {r['largest_sample_gap_ms']} ms, {len(r['sample_errors'])} lost)"),
    ]
    width = max(len(k) for k, _ in rows)
    lines = [f"| {'':<{width}} | result |", f"|{'-' * (width + 2)}|--------|"]
    lines += [f"| {k:<{width}} | {v} |" for k, v in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--duration", type=float, default=20.0)
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--max-requests", type=int, default=100)
    p.add_argument("--keepalive", type=int, default=3, help="keep-alive client loops")
    p.add_argument("--fresh", type=int, default=3, help="new-connection client loops")
    p.add_argument("--json", type=Path, default=REPO / "docs/recycle.json")
    args = p.parse_args(argv)
    settings = {"duration_s": args.duration, "workers": args.workers, "max_requests": args.max_requests,
                "keepalive_loops": args.keepalive, "fresh_loops": args.fresh,
                "sample_every_ms": SAMPLE_EVERY * 1000}
    print(f"recycling under load: {settings}", file=sys.stderr)
    info = machine()
    result = run(args.duration, args.workers, args.max_requests, args.keepalive, args.fresh)
    print(table(settings, result))
    dump_json(args.json, {"machine": info, "settings": settings, "result": result})
    print(f"wrote {args.json}", file=sys.stderr)
    ok = result["failed"] == 0 and result["min_ready"] >= args.workers and result["max_booting"] <= 1
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
