"""cadenza's benchmarks, against gunicorn 27 and uvicorn, in a real systemd booted in namespaces.

    sudo .venv/bin/python tests/bench/run.py [--quick] [--json PATH] [--only NAMES]

Prints markdown tables on stdout (progress on stderr) and writes every figure, with the
machine it was measured on, as JSON (default: docs/benchmarks.json). Needs root (the private
systemd of tests/sdns.py), wrk, and gunicorn 27 in the project venv. All load stays on
127.0.0.1; every loop is bounded in count and time. The full run takes about 10 minutes,
--quick about 3.

    1 reload    reloads under load, cadenza vs gunicorn (USR2, HUP) vs uvicorn (restart)
    2 overhead  `systemctl reload` wall time minus the app's own start-to-ready time
    3 throughput requests/s under cadenza / the same worker programs without it
    4 footprint idle RSS, CPU and wake-ups of the master beside gunicorn's and uvicorn's
    5 scale     time to READY and upgrade time at 1, 8, 32 and 64 workers
"""
from __future__ import annotations

import argparse
import datetime
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (also puts tests/ on sys.path)
import sdns  # noqa: E402
import contenders  # noqa: E402
import footprint  # noqa: E402
import overhead  # noqa: E402
import reload_load  # noqa: E402
import report  # noqa: E402
import throughput  # noqa: E402

REPO = common.REPO
NAMES = ("reload", "overhead", "throughput", "footprint", "scale")
PARAMS = {
    "full": {"reload": {"duration": 60, "interval": 3, "reloads": 20, "slow": 0.5},
             "overhead": {"reps": 20, "direct": 5},
             "throughput": {"pairs": 24, "seconds": 3, "workers": 2},
             "footprint": {"window": 60},
             "scale": {"counts": [1, 8, 32, 64], "reps": 2}},
    "quick": {"reload": {"duration": 15, "interval": 3, "reloads": 5, "slow": 0.5},
              "overhead": {"reps": 5, "direct": 2},
              "throughput": {"pairs": 3, "seconds": 3, "workers": 2},
              "footprint": {"window": 10},
              "scale": {"counts": [1, 8, 32], "reps": 1}},
}


def log(*args) -> None:
    print(*args, file=sys.stderr, flush=True)


def preflight() -> None:
    ok, why = sdns.available()
    problems = [] if ok else [why]
    if shutil.which(common.WRK) is None:
        problems.append("wrk is missing: apt-get install wrk")
    if not (common.VENV_BIN / "gunicorn").exists():
        problems.append(f"gunicorn is missing: {common.VENV_BIN}/pip install 'gunicorn==27.*'")
    if problems:
        sys.exit("cannot run the benchmarks:\n  " + "\n  ".join(problems))
    sdns.janitor()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a smoke run of about 3 minutes")
    ap.add_argument("--json", type=Path, default=REPO / "docs" / "benchmarks.json",
                    help="where to write the results (default: docs/benchmarks.json)")
    ap.add_argument("--only", default=",".join(NAMES), help=f"comma-separated subset of {','.join(NAMES)}")
    args = ap.parse_args(argv)
    only = [n.strip() for n in args.only.split(",") if n.strip()]
    if unknown := set(only) - set(NAMES):
        ap.error(f"unknown benchmark(s): {', '.join(sorted(unknown))}")
    preflight()
    mode = "quick" if args.quick else "full"
    params = PARAMS[mode]
    started = time.monotonic()
    res: dict = {"mode": mode, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                 "command": "sudo .venv/bin/python tests/bench/run.py" + (" --quick" if args.quick else ""),
                 "machine": common.machine(), "params": {k: params[k] for k in only}}
    log(f"cadenza benchmarks ({mode}) on {res['machine']['nproc']} x {res['machine']['cpu']}")
    if "reload" in only:
        p = params["reload"]
        res["reload"] = []
        for contender in contenders.ALL:
            log(f"1. reload under load: {contender.key} ({p['duration']} s)")
            r = reload_load.run(contender, duration=p["duration"], interval=p["interval"],
                                reloads=p["reloads"], slow_seconds=p["slow"], log=log)
            log(f"   {r['reloads']} reloads, {r['errors_total']} errors, {r['non2xx_total']} non-2xx, "
                f"reload median {r['reload_median_ms']} ms")
            res["reload"].append(r)
    if "overhead" in only:
        p = params["overhead"]
        log(f"2. reload overhead ({p['reps']} reloads)")
        res["overhead"] = overhead.reload_overhead(p["reps"], p["direct"], log=log)
        log(f"   overhead median {res['overhead']['overhead_ms']['median']} ms")
    if "throughput" in only:
        p = params["throughput"]
        log(f"3. throughput ({p['pairs']} pairs of {p['seconds']} s)")
        res["throughput"] = throughput.run(p["pairs"], p["seconds"], p["workers"], log=log)
    if "footprint" in only:
        p = params["footprint"]
        log(f"4. footprint ({p['window']} s idle)")
        res["footprint"] = footprint.run(p["window"], log=log)
    if "scale" in only:
        p = params["scale"]
        log(f"5. scale {p['counts']} x {p['reps']}")
        res["scale"] = overhead.scale(p["counts"], p["reps"], log=log)
    res["run_seconds"] = round(time.monotonic() - started, 1)
    end = common.cadenza_commit()
    if end != res["machine"]["cadenza_commit"]:
        res["machine"]["cadenza_commit"] += f" at the start, {end} at the end (src/ changed during the run)"
        log("WARNING: src/ changed during the run: the figures mix two versions of cadenza")
    res["verdicts"] = report.verdicts(res)
    common.dump_json(args.json, res)
    m = res["machine"]
    print(f"## cadenza benchmarks ({mode} run, {res['date']})\n\n"
          f"{m['nproc']} x {m['cpu']}, {m['mem_gb']} GB, Linux {m['kernel']}, {m['systemd']}, "
          f"Python {m['python']}, {m['gunicorn']}, uvicorn {m['uvicorn']}, {m['wrk']}; "
          f"cadenza src/ at {m['cadenza_commit']} (HEAD {m['head']}). Run time {res['run_seconds']:.0f} s.\n")
    print(report.markdown(res))
    log(f"wrote {args.json} ({res['run_seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
