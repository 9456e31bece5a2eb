"""Memory: the whole process tree's PSS with `workers.preload = true`, without it, and under
gunicorn --preload, in the same run, for a Django project and an app of 100 MB of objects.

    .venv/bin/python tests/bench/memory.py [--quick] [--rounds R] [--workers 8,16]
                                           [--apps django,synthetic] [--requests N] [--json PATH]
    .venv/bin/python tests/bench/memory.py --from-json docs/memory.json [--markdown | --update-docs]

The full run (3 rounds, 200 requests per worker) takes about 13 minutes on 2 cores, --quick
(1 round, 50 requests per worker) about 3. No root and no systemd: each server is a plain
process leading a session of its own on a loopback port, with tests/bench/memory_apps as its
working directory. Needs gunicorn and Django in the venv (.venv/bin/pip install -e '.[bench,test]').

The apps (tests/bench/memory_apps):
  django     `shop.wsgi:application`: the admin, sessions, auth, messages, four models, sqlite
             (a database per run, migrated and seeded); requests: the admin's login page, a
             page of 50 books with publisher, authors and review figures, one book
  synthetic  `synthetic:application`: about 100 MB of objects made at import time (generated
             modules of classes and functions from .pyc, records of dicts, strings and lists)

The modes, each with the same worker count:
  cadenza-preload   `cadenza run -c FILE` with [workers] preload = true: one preloader imports
                    the app, calls gc.freeze() and forks the workers
  cadenza           the same FILE with preload = false: each worker imports the app itself
  gunicorn-preload  `gunicorn --preload -w N -b 127.0.0.1:PORT APP`: sync workers, defaults

For each round, app and worker count, the modes run one after the other, the order rotating
from one block to the next, none running while another is measured (so that no other
server's processes share its files' pages): started, waited for until it answers and has its N
workers, warmed up (N client threads send N x REQUESTS requests, half over keep-alive
connections of 10 requests, half on new connections, then more on new connections until every
worker has served at least REQUESTS / 4, for 60 s at most), left 1 s, measured, stopped.
Measured: every process of the tree (the leader and all its descendants, /proc/*/stat), from
/proc/PID/smaps_rollup: PSS (and its anonymous part), RSS, USS (Private_Clean + Private_Dirty).
A cell quotes medians over the rounds of the tree's PSS, the workers' USS, the master's RSS, and
the medians of the per-round ratios preload / no preload and preload / gunicorn --preload.
Targets: preload <= 0.4 x no preload, and no more than gunicorn --preload.

Prints the tables on stdout (progress on stderr), writes every figure to JSON (default
docs/memory.json); --markdown prints the results block of docs/benchmarks.md's "Memory"
section, --update-docs writes it there between its markers. Everything a server starts is
stopped by pid at the end of its measurement, on error and on SIGTERM/SIGINT too. The servers
and procfs readings are in memory_servers.py, the tables and targets in memory_report.py.
"""
from __future__ import annotations

import argparse
import datetime
import http.client
import json
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (also puts tests/ on sys.path)
from common import REPO, VENV_BIN, comma_list as _list  # noqa: E402
from memory_report import markdown, summarise, update_docs, verdicts  # noqa: E402
from memory_servers import APPS, Failed, Server, measure_tree, prepare  # noqa: E402

DOCS = REPO / "docs" / "benchmarks.md"
BEGIN, END = "<!-- memory-results-begin -->", "<!-- memory-results-end -->"
PARAMS = {"full": {"rounds": 3, "requests": 200}, "quick": {"rounds": 1, "requests": 50}}
COVER_TIMEOUT, SETTLE = 60.0, 1.0
MODES = ("cadenza-preload", "cadenza", "gunicorn-preload")
EXTRA_MODES = ("gunicorn",)                 # gunicorn without --preload, on request only


def log(*args) -> None:
    print(*args, file=sys.stderr, flush=True)


# ---- warm-up -----------------------------------------------------------------------------

class Load:
    """GET requests from threads to one server, counted by the worker that answered them
    (its X-Worker-Pid header): keep-alive batches of 10 on one connection, or 10 requests on
    a new connection each (`Connection: close`), the app's paths in turn."""

    BATCH = 10

    def __init__(self, port: int, paths: list[str]):
        self.port, self.paths = port, paths
        self.lock = threading.Lock()
        self.by_pid: dict[int, int] = {}
        self.sent = self.ok = 0
        self.failures: list[str] = []

    def _claim(self, budget: int | None) -> int | None:
        with self.lock:
            if budget is not None and self.sent >= budget:
                return None
            first, self.sent = self.sent, self.sent + self.BATCH
            return first

    def _batch(self, first: int, keepalive: bool) -> None:
        conn = None
        for i in range(first, first + self.BATCH):
            if conn is None or not keepalive:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
            path = self.paths[i % len(self.paths)].format(n=1 + i * 7 % 500)
            try:
                conn.request("GET", path, headers={} if keepalive else {"Connection": "close"})
                resp = conn.getresponse()
                resp.read()
            except (OSError, http.client.HTTPException) as exc:
                conn.close()
                conn = None
                self._fail(f"GET {path}: {exc!r}")
                continue
            if not keepalive:
                conn.close()
            with self.lock:
                pid = resp.getheader("X-Worker-Pid", "")
                if pid.isdigit():
                    self.by_pid[int(pid)] = self.by_pid.get(int(pid), 0) + 1
                if resp.status == 200:
                    self.ok += 1
                else:
                    self.failures.append(f"GET {path}: HTTP {resp.status}")
        if conn is not None:
            conn.close()

    def _fail(self, what: str) -> None:
        with self.lock:
            self.failures.append(what)

    def run(self, threads: int, budget: int | None = None, keepalive_too: bool = True,
            until=lambda: False, deadline: float | None = None) -> None:
        """THREADS threads until BUDGET requests are sent, or UNTIL() holds, or DEADLINE passes;
        each thread alternates keep-alive and new-connection batches when KEEPALIVE_TOO."""
        def loop(t: int) -> None:
            keepalive = keepalive_too and t % 2 == 0
            while not until() and (deadline is None or time.monotonic() < deadline):
                first = self._claim(budget)
                if first is None:
                    return
                self._batch(first, keepalive)
                keepalive = keepalive_too and not keepalive
        pool = [threading.Thread(target=loop, args=(t,), daemon=True) for t in range(threads)]
        for th in pool:
            th.start()
        for th in pool:
            th.join()


def warm_up(server: Server, per_worker: int) -> dict:
    """N x PER_WORKER requests, half keep-alive, half new connections, from N threads; then
    new connections until every worker has served PER_WORKER / 4 (at most COVER_TIMEOUT)."""
    load = Load(server.port, APPS[server.app]["paths"])
    n = server.workers
    load.run(n, budget=n * per_worker)
    workers = [p for p, role in server.processes().items() if role == "worker"]
    least = max(1, per_worker // 4)

    def covered() -> bool:
        with load.lock:
            return all(load.by_pid.get(p, 0) >= least for p in workers)
    load.run(n, keepalive_too=False, until=covered, deadline=time.monotonic() + COVER_TIMEOUT)
    served = [load.by_pid.get(p, 0) for p in workers]
    return {"requests": load.sent, "ok": load.ok, "failures": len(load.failures),
            "failure_samples": load.failures[:5], "per_worker_min": min(served, default=0),
            "per_worker_max": max(served, default=0), "workers_served": sum(1 for s in served if s),
            "not_from_a_worker": sum(c for p, c in load.by_pid.items() if p not in workers)}


# ---- one measurement ---------------------------------------------------------------------

def run_one(mode: str, app: str, workers: int, tmp: Path, env: dict, per_worker: int) -> dict:
    server = Server(mode, app, workers, tmp, env)
    out = {"mode": mode, "app": app, "workers": workers, "port": server.port, "argv": server.argv()}
    try:
        server.start()
        out["ready_s"] = round(server.wait_ready(), 2)
        out["warm_up"] = warm_up(server, per_worker)
        time.sleep(SETTLE)                   # let the last responses' buffers go before reading
        if server.proc.poll() is not None:
            raise Failed(f"exited with status {server.proc.returncode} during the warm-up: {server.log_tail()}")
        out.update(measure_tree(server))
        if mode == "cadenza-preload" and not out["preload_in_effect"]:
            out["not_in_effect"] = ("preload = true, but the workers are not the children of a "
                                    "`cadenza preloader` process: "
                                    + ", ".join(f"{r['role']} {r['pid']} (parent {r['ppid']}) {r['title'][:60]}"
                                                for r in out["procs"][:4]))
    except Failed as exc:
        out["failed"] = str(exc)
    finally:
        server.stop()
        out["stopped"] = server.stopped
        if server.stopped and server.stopped["killed"]:
            log(f"  WARNING: {server.tag} left processes behind at its stop: {server.stopped['killed']}")
    return out


# ---- the run -----------------------------------------------------------------------------

def _rotate(items: list, by: int) -> list:
    by %= len(items) or 1
    return items[by:] + items[:by]


def measure(args) -> dict:
    mode = "quick" if args.quick else "full"
    params = dict(PARAMS[mode])
    for key in ("rounds", "requests"):
        if getattr(args, key) is not None:
            params[key] = getattr(args, key)
    params.update(apps=args.apps, workers=args.workers, modes=args.modes)
    for program in ("cadenza", "gunicorn"):
        if not (VENV_BIN / program).exists():
            sys.exit(f"cannot run the benchmark: {VENV_BIN / program} is missing "
                     "(.venv/bin/pip install -e '.[bench,test]')")
    res = {"mode": mode, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "command": ".venv/bin/python tests/bench/memory.py" + " ".join([""] + sys.argv[1:]),
           "machine": common.machine(), "params": params,
           "django": common._out(common.PYTHON, "-c", "import django; print(django.__version__)")}
    started = time.monotonic()
    log(f"memory ({mode}): {res['machine']['nproc']} x {res['machine']['cpu']}, "
        f"cadenza src/ at {res['machine']['cadenza_commit']}")
    runs = []
    with tempfile.TemporaryDirectory(prefix="cadenza-memory-") as tmp:
        env = prepare(args.apps, Path(tmp))
        blocks = [(app, n) for app in args.apps for n in args.workers]
        for r in range(params["rounds"]):
            for b, (app, n) in enumerate(blocks):
                for m in _rotate(list(args.modes), r * len(blocks) + b):
                    one = run_one(m, app, n, Path(tmp), env, params["requests"])
                    one["round"] = r
                    runs.append(one)
                    log(f"  round {r + 1}/{params['rounds']} {app:9} x{n:<2} {m:16} " + (
                        f"FAILED: {one['failed'][:300]}" if "failed" in one else
                        f"tree PSS {one['tree_pss_mb']:7.1f} MB (anon {one['tree_pss_anon_mb']:.1f}), "
                        f"worker USS {one['worker_uss_mb']:.1f} MB, master RSS {one['master_rss_mb']:.1f} MB, "
                        f"ready {one['ready_s']:.1f} s, requests {one['warm_up']['requests']} "
                        f"({one['warm_up']['per_worker_min']}..{one['warm_up']['per_worker_max']} per worker, "
                        f"{one['warm_up']['failures']} failed)"
                        + (f"  [{one['not_in_effect'][:120]}]" if one.get("not_in_effect") else "")))
    res["runs"] = runs
    res["rows"] = summarise(runs, args.apps, args.workers, args.modes)
    res["verdicts"] = verdicts(res["rows"])
    res["run_seconds"] = round(time.monotonic() - started, 1)
    end = common.cadenza_commit()
    if end != res["machine"]["cadenza_commit"]:
        res["machine"]["cadenza_commit"] += f" at the start, {end} at the end (src/ changed during the run)"
        log("WARNING: src/ changed during the run: the figures mix two versions of cadenza")
    common.dump_json(args.json, res)
    log(f"wrote {args.json} ({res['run_seconds']:.0f} s)")
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="1 round, 50 requests per worker: about 3 minutes")
    ap.add_argument("--rounds", type=int, help="rounds (default 3, --quick 1)")
    ap.add_argument("--requests", type=int, help="warm-up requests per worker (default 200, --quick 50)")
    ap.add_argument("--workers", type=lambda t: _list(t, kind=int), default=[8, 16],
                    help="comma-separated worker counts (default 8,16)")
    ap.add_argument("--apps", type=lambda t: _list(t, tuple(APPS)), default=list(APPS),
                    help="comma-separated subset of django,synthetic")
    ap.add_argument("--modes", type=lambda t: _list(t, MODES + EXTRA_MODES), default=list(MODES),
                    help=f"comma-separated modes (default {','.join(MODES)}; also: {','.join(EXTRA_MODES)})")
    ap.add_argument("--json", type=Path, default=REPO / "docs" / "memory.json",
                    help="where to write the results (default: docs/memory.json)")
    ap.add_argument("--from-json", type=Path, metavar="PATH", help="measure nothing: report the results in PATH")
    ap.add_argument("--markdown", action="store_true",
                    help="print the results block of docs/benchmarks.md's \"Memory\" section")
    ap.add_argument("--update-docs", action="store_true", help="write that block into docs/benchmarks.md")
    args = ap.parse_args(argv)
    if (args.rounds is not None and args.rounds < 1) or (args.requests is not None and args.requests < 4) \
            or any(n < 1 for n in args.workers):
        ap.error("--rounds and --workers must be at least 1, --requests at least 4")
    if args.from_json:
        res = json.loads(args.from_json.read_text())
    else:
        for sig in (signal.SIGTERM, signal.SIGHUP):     # stop the servers on the way out
            signal.signal(sig, lambda signum, _frame: sys.exit(128 + signum))
        res = measure(args)
    block = markdown(res)
    if args.update_docs:
        update_docs(block, DOCS, BEGIN, END)
        log(f"updated {DOCS}")
    print(block if args.markdown or args.update_docs else f"## Memory ({res['mode']} run)\n\n{block}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
