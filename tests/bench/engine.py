"""The request path: cadenza's built-in worker against its peers, every one in the same run.

    .venv/bin/python tests/bench/engine.py [--quick] [--duration S] [--rounds R] [--json PATH]
                                           [--workers 2,4] [--interfaces wsgi,asgi] [--markdown]
    .venv/bin/python tests/bench/engine.py --from-json docs/engine.json [--markdown | --update-docs]

One trivial application (engine_apps.py: 14 bytes, text/plain, Content-Length), as WSGI and as
ASGI, served by each contender on a loopback port of its own, as a plain process leading a
session of its own (no systemd, no root):

  cadenza      `cadenza run -c FILE --app engine_apps:wsgi|asgi --bind 127.0.0.1:PORT --workers N`,
               the built-in worker with its default engine ([http] protocol and loop "auto")
  cadenza-h11  the same with [http] protocol = "h11", loop = "asyncio"
  gunicorn     (WSGI) `gunicorn -w N -b 127.0.0.1:PORT engine_apps:wsgi`: sync workers, defaults
  uvicorn      (ASGI) `uvicorn --workers N --http httptools --loop uvloop --no-access-log ...`
  granian      `granian --interface wsgi|asgi --workers N ...`, defaults

FILE only gives the master a control socket of its own (and the [http] table); when this
cadenza does not accept a variant's [http] table, that variant is reported as not available.

For each interface and worker count, every contender is started, waited for until it answers
and has its N workers, and warmed up; then, in R rounds, `wrk -t2 -c64 -dS --latency` loads each
in turn, with keep-alive and with `-H 'Connection: close'`, the order rotating from one block to
the next (A B C D, B C D A, ...), so that neighbouring measurements see the same machine. A cell
quotes medians over the rounds (req/s, p50, p99), the sum of socket errors and non-2xx, and the
median of the per-round ratios to the peer (gunicorn for WSGI, uvicorn for ASGI). The targets:
WSGI >= 1.2 x gunicorn, ASGI >= 1.0 x uvicorn, p99 no worse than the peer's, no socket error and
no non-2xx response.

Prints markdown tables on stdout (progress on stderr) and writes every figure, with the machine,
as JSON (default docs/engine.json). --markdown prints the results block of docs/benchmarks.md
("Request path"); --update-docs writes it there, between its markers. The full run takes about
10 minutes, --quick about 4 and a half. Needs wrk and the `bench` extra
(.venv/bin/pip install -e '.[bench]').
"""
from __future__ import annotations

import argparse
import datetime
import json
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (also puts tests/ on sys.path)
from common import REPO, VENV_BIN, comma_list as _list, median  # noqa: E402
from engine_servers import CONTENDERS, Server, Unavailable, cadenza_config  # noqa: E402
from engine_report import DOCS, PEER, markdown, update_docs, verdicts  # noqa: E402

PARAMS = {"full": {"duration": 5, "rounds": 3, "warmup": 2},
          "quick": {"duration": 2, "rounds": 3, "warmup": 1}}
MODES = {"keep-alive": False, "close": True}      # name: wrk -H 'Connection: close'


def log(*args) -> None:
    print(*args, file=sys.stderr, flush=True)


# ---- measuring ---------------------------------------------------------------------------

def _wrk(port: int, seconds: float, close: bool) -> dict:
    res = common.run_wrk(port, seconds, close=close)
    keep = ("requests", "rps", "p50_ms", "p99_ms", "max_ms", "connect", "read", "write", "timeout",
            "socket_errors", "non2xx")
    out = {k: res[k] for k in keep}
    if res["rps"] is None:
        out["raw"] = res["raw"][-500:]
    return out


def _rotate(keys: list[str], by: int) -> list[str]:
    by %= len(keys) or 1
    return keys[by:] + keys[:by]


def _bring_up(interface: str, workers: int, tmp: Path, configs: dict, started: list[Server],
              unavailable: dict[str, str]) -> dict[str, Server]:
    """Every contender of INTERFACE started at once (each one appended to STARTED, for the
    caller to stop), then waited for; those that cannot serve are stopped and go to UNAVAILABLE."""
    servers = {}
    for c in CONTENDERS:
        if interface not in c.interfaces:
            continue
        config = configs.get(c.key)
        if isinstance(config, Unavailable):
            unavailable[c.key] = str(config)
            continue
        s = Server(c, interface, workers, tmp, config[0] if config else None)
        s.config_http = config[1] if config else None
        started.append(s)
        try:
            s.start()
        except (Unavailable, OSError) as exc:
            unavailable[c.key] = str(exc)
            continue
        servers[c.key] = s
    for s in list(servers.values()):
        try:
            s.wait_ready()
        except Unavailable as exc:
            unavailable[s.key] = str(exc)
            s.stop()
            del servers[s.key]
    return servers


def _warm_up(servers: dict[str, Server], seconds: float) -> None:
    for s in servers.values():
        for close in MODES.values():
            _wrk(s.port, seconds, close)
        s.note_engine()
        if s.mismatch:
            log(f"  WARNING: {s.key}: {s.mismatch}")


def _rounds(servers: dict[str, Server], params: dict, what: str) -> dict:
    """{mode: {key: [wrk result of each round]}}: one contender at a time, the order rotating."""
    runs = {mode: {} for mode in MODES}
    keys = list(servers)
    for r in range(params["rounds"]):
        for m, (mode, close) in enumerate(MODES.items()):
            for key in _rotate(keys, r * len(MODES) + m):
                s = servers[key]
                if s.failed:
                    continue
                if not s.alive():
                    s.failed = f"exited with status {s.proc.returncode} during the run: {s.log_tail()}"
                    log(f"  {key} {s.failed}")
                    continue
                res = _wrk(s.port, params["duration"], close)
                res["round"] = r
                runs[mode].setdefault(key, []).append(res)
                log(f"  {what} {mode:10} round {r + 1}/{params['rounds']} {key:12}"
                    f" {res['rps'] or 0:9,.0f} req/s  p99 {res['p99_ms']} ms"
                    f"  errors {res['socket_errors']}  non-2xx {res['non2xx']}")
    return runs


def run_group(interface: str, workers: int, params: dict, tmp: Path, configs: dict) -> dict:
    """Every contender of INTERFACE with WORKERS workers: started together, then measured in turn."""
    started: list[Server] = []
    unavailable: dict[str, str] = {}
    try:
        servers = _bring_up(interface, workers, tmp, configs, started, unavailable)
        _warm_up(servers, params["warmup"])
        log(f"  {interface} x{workers}: serving "
            + ", ".join(f"{k} :{s.port}" + (f" [{'+'.join(s.loaded)}]" if s.loaded else "")
                        + (f" ({'; '.join(s.said) or 'engine not stated'})" if s.said is not None else "")
                        for k, s in servers.items())
            + "".join(f"; {k} not available ({why[:160]})" for k, why in unavailable.items()))
        runs = _rounds(servers, params, f"{interface} x{workers}")
    finally:
        for s in started:
            s.stop()
    for s in servers.values():
        if s.stopped["killed"] or s.stopped["still_there"]:
            log(f"  WARNING: {s.key} left processes behind at its stop: {s.stopped}")
    return {"interface": interface, "workers": workers,
            "servers": {k: {"port": s.port, "argv": s.contender.argv(interface, workers, s.port, s.config),
                            "loaded": s.loaded, "said": s.said, "mismatch": s.mismatch,
                            "failed": s.failed, "stopped": s.stopped}
                        for k, s in servers.items()},
            "unavailable": unavailable, "runs": runs}


def summarise(group: dict) -> list[dict]:
    """One row per (mode, contender): medians over the rounds, sums of errors, ratio to the peer."""
    interface, peer = group["interface"], PEER[group["interface"]]
    rows = []
    for mode, by_key in group["runs"].items():
        peer_rps = {x["round"]: x["rps"] for x in by_key.get(peer, [])}
        for c in CONTENDERS:
            if interface not in c.interfaces:
                continue
            xs = by_key.get(c.key, [])
            row = {"interface": interface, "workers": group["workers"], "mode": mode,
                   "contender": c.key, "label": c.label,
                   "unavailable": group["unavailable"].get(c.key)
                   or (group["servers"].get(c.key) or {}).get("failed")}
            if not xs:
                row["unavailable"] = row["unavailable"] or "no measurement"
                rows.append(row)
                continue
            ratios = [x["rps"] / peer_rps[x["round"]] for x in xs
                      if x["rps"] and peer_rps.get(x["round"])]
            med = median([x["rps"] for x in xs])
            peer_med = median(list(peer_rps.values()))
            row.update({
                "rounds": len(xs), "rps": med,
                "p50_ms": median([x["p50_ms"] for x in xs]), "p99_ms": median([x["p99_ms"] for x in xs]),
                "max_ms": max((x["max_ms"] for x in xs if x["max_ms"] is not None), default=None),
                "requests": sum(x["requests"] or 0 for x in xs),
                "connect": sum(x["connect"] for x in xs), "read": sum(x["read"] for x in xs),
                "write": sum(x["write"] for x in xs), "timeout": sum(x["timeout"] for x in xs),
                "socket_errors": sum(x["socket_errors"] for x in xs),
                "non2xx": sum(x["non2xx"] for x in xs),
                "failed_runs": sum(1 for x in xs if x["rps"] is None),
                "ratio": round(median(ratios), 3) if ratios else None,
                "ratios": [round(x, 3) for x in ratios],
                "ratio_of_medians": round(med / peer_med, 3) if med and peer_med else None,
                "loaded": (group["servers"].get(c.key) or {}).get("loaded"),
                "said": (group["servers"].get(c.key) or {}).get("said"),
                "mismatch": (group["servers"].get(c.key) or {}).get("mismatch"),
            })
            rows.append(row)
    return rows


# ---- main --------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="2 s runs and 1 s warm-ups: about 4 and a half minutes")
    ap.add_argument("--duration", type=int, help="seconds of each wrk run (default 5, --quick 2)")
    ap.add_argument("--rounds", type=int, help="rounds per cell, at least 3 (default 3)")
    ap.add_argument("--workers", type=lambda t: _list(t, kind=int), default=[2, 4],
                    help="comma-separated worker counts (default 2,4)")
    ap.add_argument("--interfaces", type=lambda t: _list(t, ("wsgi", "asgi")), default=["wsgi", "asgi"],
                    help="comma-separated subset of wsgi,asgi")
    ap.add_argument("--json", type=Path, default=REPO / "docs" / "engine.json",
                    help="where to write the results (default: docs/engine.json)")
    ap.add_argument("--from-json", type=Path, metavar="PATH",
                    help="measure nothing: print the report of the results in PATH")
    ap.add_argument("--markdown", action="store_true",
                    help="print the results block of docs/benchmarks.md's \"Request path\" section")
    ap.add_argument("--update-docs", action="store_true",
                    help="write that block into docs/benchmarks.md, between its markers")
    args = ap.parse_args(argv)
    if args.from_json:
        res = json.loads(args.from_json.read_text())
    else:
        res = measure(args, ap)
    block = markdown(res)
    if args.update_docs:
        update_docs(block)
        log(f"updated {DOCS}")
    print(block if args.markdown or args.update_docs else f"## Request path ({res['mode']} run)\n\n{block}")
    return 0


def measure(args, ap) -> dict:
    mode = "quick" if args.quick else "full"
    params = dict(PARAMS[mode])
    if args.duration is not None:
        params["duration"] = args.duration
    if args.rounds is not None:
        params["rounds"] = args.rounds
    if params["rounds"] < 3 or params["duration"] < 1 or any(w < 1 for w in args.workers):
        ap.error("--rounds must be at least 3, --duration and --workers at least 1")
    if shutil.which(common.WRK) is None:
        sys.exit("cannot run the benchmark: wrk is missing (apt-get install wrk)")
    if not (VENV_BIN / "cadenza").exists():
        sys.exit(f"cannot run the benchmark: {VENV_BIN}/cadenza is missing (.venv/bin/pip install -e '.[bench]')")
    params.update(workers=args.workers, interfaces=args.interfaces, wrk="-t2 -c64 --latency")
    command = ".venv/bin/python tests/bench/engine.py" + " ".join(
        [""] + (["--quick"] if args.quick else [])
        + ([f"--duration {args.duration}"] if args.duration is not None else [])
        + ([f"--rounds {args.rounds}"] if args.rounds is not None else [])
        + ([f"--workers {','.join(map(str, args.workers))}"] if args.workers != [2, 4] else [])
        + ([f"--interfaces {','.join(args.interfaces)}"] if args.interfaces != ["wsgi", "asgi"] else []))
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))   # stop the servers on the way out
    started = time.monotonic()
    res = {"mode": mode, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "command": command, "machine": common.machine(), "params": params}
    log(f"request path ({mode}): {res['machine']['nproc']} x {res['machine']['cpu']}, "
        f"cadenza src/ at {res['machine']['cadenza_commit']}")
    groups = []
    with tempfile.TemporaryDirectory(prefix="cadenza-engine-") as tmp:
        configs, res["cadenza_http"] = {}, {}
        for c in CONTENDERS:
            if not c.http:
                continue
            try:
                configs[c.key] = cadenza_config(c, Path(tmp))
                res["cadenza_http"][c.key] = {"http": configs[c.key][1]}
            except Unavailable as exc:
                configs[c.key] = exc
                res["cadenza_http"][c.key] = {"unavailable": str(exc)}
                log(f"  {c.key}: not available: {exc}")
        for interface in args.interfaces:
            for workers in args.workers:
                log(f"{interface.upper()}, {workers} workers")
                groups.append(run_group(interface, workers, params, Path(tmp), configs))
    res["groups"] = groups
    res["rows"] = [row for g in groups for row in summarise(g)]
    res["verdicts"] = verdicts(res["rows"])
    res["run_seconds"] = round(time.monotonic() - started, 1)
    end = common.cadenza_commit()
    if end != res["machine"]["cadenza_commit"]:
        res["machine"]["cadenza_commit"] += f" at the start, {end} at the end (src/ changed during the run)"
        log("WARNING: src/ changed during the run: the figures mix two versions of cadenza")
    common.dump_json(args.json, res)
    log(f"wrote {args.json} ({res['run_seconds']:.0f} s)")
    return res


if __name__ == "__main__":
    sys.exit(main())
