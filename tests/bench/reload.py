"""`systemctl reload` of an idle service, step by step; and an upgrade of 64 workers.

    sudo .venv/bin/python tests/bench/reload.py [--reps 15] [--preload off,on] [--bytecode cached,none]
                                                [--scale 64] [--scale-reps 2] [--src DIR] [--json docs/reload.json]

Each case boots a private systemd (tests/sdns.py), deploys the benchmark app (tests/deploy.py's
APP: a WSGI app that answers "release TAG") as a socket-activated cadenza service in the test
units' shape (deploy.AppRoot.units: `Type=notify`, `ExecReload=` the pinned `supervisorctl
upgrade`, no sandboxing; what the shipped unit's sandboxing adds is measured apart), warms up
with two reloads, then deploys a new release and runs `systemctl reload APP` REPS times, idle,
checking each time that the new release answers.

- reload: the wall time of `systemctl reload APP` on the host (it runs through nsenter, whose own
  cost is measured and reported beside it: `nsenter true`).
- app: the application's own start in that very reload, from the journal: each process of the
  new generation from the line the new master logs when it starts it to the one it logs at its
  READY=1; the slowest worker, plus with preload the preloader's own start (its import of the
  app). overhead = reload - app, reload by reload; the forks in between count as overhead.
- steps: every reload is cut into steps by the timestamps journald gave the lines systemd, both
  masters and supervisorctl logged (journald's monotonic clock is the host's: the namespace has
  no time namespace of its own), plus the host's own start and end of `systemctl reload`.
- bytecode: "cached" sets PYTHONPYCACHEPREFIX for the service (the warm-up writes it), as a
  release installed from a wheel has its .pyc; "none" runs cadenza from its source tree, which
  the namespace mounts read-only, so every process compiles cadenza's modules again.
- preload: `[workers] preload = true` in every release. A case that cannot start (preload
  refused by this version of cadenza, say) is reported as not measured, with the reason.

--scale N (0: skip) then upgrades N workers SCALE_REPS times per preload mode, with an app whose
import takes a while (`import flask`, as any Flask app does), and compares the reload with the
app's import time: `python -c 'import app'` in the release, wall time, on the host.

Prints markdown tables and writes every figure to --json (default docs/reload.json).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (also puts tests/ on sys.path)
from common import PYTHON, REPO, deploy, free_port, median, ms, pct, release, served_release, wait_http  # noqa: E402
from contenders import APP, CADENZA, UNIT  # noqa: E402
import sdns  # noqa: E402

RELOAD_TIMEOUT = 180
SOURCE: Path | None = None   # --src: the directory holding the cadenza package to run instead
WARMUP = 2
SCALE_APP_BODY = "import flask\n\nflask_app = flask.Flask(__name__)"

# The lines each step ends at; OLD and NEW are the pids of the two masters, GEN the new generation.
MASTER = r"master\[(?P<pid>\d+)\]: "
PATTERNS = {
    "job": re.compile(r"^Reloading " + re.escape(UNIT)),
    "connected": re.compile(MASTER + r"control: upgrade from pid"),
    "preflight": re.compile(MASTER + r"upgrade: pre-flight passed"),
    "forked": re.compile(MASTER + r"upgrade: generation (?P<gen>\d+) started \(pid (?P<new>\d+)\)"),
    "master_up": re.compile(MASTER + r"generation (?P<gen>\d+) starting"),
    "app_start": re.compile(MASTER + r"(worker \d+ started|preloader started)"),
    "worker_ready": re.compile(MASTER + r"worker \d+ \(pid \d+\) ready after"),
    "preloader_ready": re.compile(MASTER + r"preloader \(pid \d+\) ready after"),
    "ready": re.compile(MASTER + r"upgrade: generation \d+ ready"),
    "mainpid": re.compile(MASTER + r"upgrade: MAINPID=\d+ sent"),
    "handed": re.compile(MASTER + r"upgrade: MAINPID handed over"),
    "old_exit": re.compile(MASTER + r"worker \d+ \(pid \d+\) exited"),
    "child_start": re.compile(MASTER + r"(?P<kind>worker|preloader)( \d+)? started \(pid (?P<child>\d+)\)"),
    "child_ready": re.compile(MASTER + r"(?P<kind>worker|preloader)( \d+)? \(pid (?P<child>\d+)\) ready after"),
    "done": re.compile(r"^generation \d+ serves; generation \d+ drained"),
    "reloaded": re.compile(r"^Reloaded " + re.escape(UNIT)),
}
# (step, from, to): consecutive marks; "t0"/"t1" are the host's start and end of `systemctl reload`.
STEPS = [
    ("systemctl + nsenter to systemd's job", "t0", "job"),
    ("supervisorctl starts and connects", "job", "connected"),
    ("pre-flight", "connected", "preflight"),
    ("fork of the next master", "preflight", "forked"),
    ("next master: exec, imports, config", "forked", "master_up"),
    ("next master: listeners, pool, first spawn", "master_up", "app_start"),
    ("app processes: first started to last READY=1", "app_start", "workers_ready"),
    ("ready, MAINPID=, BARRIER=1, \"main\"", "workers_ready", "handed"),
    ("old workers drain and are reaped", "handed", "old_exit"),
    ("old master answers done", "old_exit", "done"),
    ("supervisorctl exits, systemd ends the job", "done", "reloaded"),
    ("systemctl returns", "reloaded", "t1"),
]


def log(*args) -> None:
    print(*args, file=sys.stderr, flush=True)


# ---- one case -------------------------------------------------------------------------------

def install(ns, port: int, workers: int, preload: bool, bytecode: str, app_body: str = "",
            budget: float = 30) -> deploy.AppRoot:
    root = deploy.AppRoot(ns.state, APP, port, count=workers, ready_timeout=budget, graceful_timeout=10,
                          upgrade_timeout=budget)
    deploy_release(root, "r1", preload, app_body)
    for name, text in CADENZA.units(root, workers, 10).items():
        ns.write_unit(name, text)
    env = service_env(ns, bytecode)
    ns.write_unit(f"{UNIT}.d/bench.conf", "[Service]\n" + "".join(f"Environment={k}={v}\n" for k, v in env.items()))
    ns.systemctl("daemon-reload", check=True)
    start = ns.systemctl("start", f"{APP}.socket", UNIT, timeout=budget + 30)
    if start.returncode != 0:
        raise CaseFailed(f"the service did not start: {start.stderr.strip()}\n"
                         + ns.journal("-o", "cat", "-n", "15"))
    wait_http(port)
    return root


class CaseFailed(Exception):
    pass


def service_env(ns, bytecode: str) -> dict[str, str]:
    env = ({"PYTHONPYCACHEPREFIX": f"{ns.state}/pycache"} if bytecode == "cached"
           else {"PYTHONDONTWRITEBYTECODE": "1"})
    if SOURCE is not None:
        # The namespace sees the checkout and the venv, not the rest of the host's /tmp: a copy.
        copy = ns.state / "src"
        if not copy.exists():
            shutil.copytree(SOURCE / "cadenza", copy / "cadenza", symlinks=True,
                            ignore=shutil.ignore_patterns("__pycache__"))
        env["PYTHONPATH"] = str(copy)
    return env


def deploy_release(root: deploy.AppRoot, tag: str, preload: bool, app_body: str = "") -> None:
    release(root, tag, app_body=app_body, **({"preload": True} if preload else {}))


def reload_once(ns, root: deploy.AppRoot, tag: str, preload: bool, app_body: str = "") -> dict:
    deploy_release(root, tag, preload, app_body)
    t0 = time.monotonic()
    proc = ns.systemctl("reload", APP, timeout=RELOAD_TIMEOUT)
    t1 = time.monotonic()
    answer = served_release(root.port)
    if proc.returncode != 0 or answer != tag:
        raise CaseFailed(f"reload to {tag} failed (rc {proc.returncode}, {answer} answers): "
                         f"{proc.stderr.strip()}\n" + ns.journal("-o", "cat", "-n", "25"))
    return {"tag": tag, "t0": t0, "t1": t1, "seconds": t1 - t0}


def journal_entries(ns) -> list[tuple[float, str]]:
    out = ns.journal("-o", "json", "--output-fields=MESSAGE")
    entries = []
    for line in out.splitlines():
        try:
            e = json.loads(line)
        except ValueError:
            continue
        message = e.get("MESSAGE")
        if isinstance(message, str):
            entries.append((int(e["__MONOTONIC_TIMESTAMP"]) / 1e6, message))
    return entries


def marks(entries: list[tuple[float, str]], r: dict) -> dict[str, float]:
    """The time of each mark of reload `r`, from the journal lines in its window."""
    # Nothing of this reload happens before `systemctl reload` starts; its last lines may reach
    # journald a little after systemctl returned.
    window = [(t, m) for t, m in entries if r["t0"] <= t <= r["t1"] + 0.05]
    found: dict[str, float] = {"t0": r["t0"], "t1": r["t1"]}
    first: dict[str, tuple[float, re.Match]] = {}
    last: dict[str, tuple[float, re.Match]] = {}
    for t, message in window:
        for name, pattern in PATTERNS.items():
            match = pattern.search(message)
            if match:
                first.setdefault(name, (t, match))
                last[name] = (t, match)
    if "forked" not in first:
        return found
    new = first["forked"][1]["new"]
    old = first["forked"][1]["pid"]
    for name in ("job", "connected", "preflight", "forked", "ready", "mainpid", "handed", "done", "reloaded"):
        if name in first:
            found[name] = first[name][0]
    # The new master's lines, and the old one's workers: by the pid in the line.
    started: dict[str, tuple[str, float]] = {}
    took: dict[str, list[float]] = {"worker": [], "preloader": []}
    for t, message in window:
        for name in ("master_up", "app_start", "worker_ready", "preloader_ready", "old_exit",
                     "child_start", "child_ready"):
            match = PATTERNS[name].search(message)
            if not match:
                continue
            pid = match["pid"]
            if name == "old_exit" and pid == old:
                found["old_exit"] = t                        # the last one wins
            elif pid != new or name == "old_exit":
                continue
            elif name in ("master_up", "app_start"):
                found.setdefault(name, t)
            elif name == "child_start":
                started[match["child"]] = (match["kind"], t)
            elif name == "child_ready":
                if match["child"] in started:
                    kind, t_start = started[match["child"]]
                    took[kind].append(t - t_start)
            else:
                found["workers_ready" if name == "worker_ready" else name] = t
    # The app's own start: each process from its start to its READY=1, the slowest worker, plus
    # the preloader's import with preload. What lies between (forking, asking the preloader for
    # a worker) is cadenza's, and counts as overhead.
    if took["worker"]:
        found["app"] = max(took["worker"]) + sum(took["preloader"])
    return found


def steps_of(found: dict[str, float]) -> dict[str, float | None]:
    return {name: (found[b] - found[a]) if a in found and b in found else None for name, a, b in STEPS}


def nsenter_cost(ns, n: int = 10) -> float:
    times = []
    for _ in range(n):
        t0 = time.monotonic()
        ns.run("true")
        times.append(time.monotonic() - t0)
    return median(times)


def status_time(ns, root: deploy.AppRoot, bytecode: str, n: int = 10) -> float:
    ctl = root.root / "shared" / "bin" / "supervisorctl"
    env = {**sdns.INNER_ENV, **service_env(ns, bytecode)}
    times = []
    for _ in range(n):
        t0 = time.monotonic()
        proc = ns.run(str(ctl), "status", timeout=30, env=env)
        times.append(time.monotonic() - t0)
        if proc.returncode != 0:
            raise CaseFailed(f"supervisorctl status failed: {proc.stderr.strip()}")
    return median(times)


def idle_case(preload: bool, bytecode: str, reps: int, workers: int) -> dict:
    case = {"preload": preload, "bytecode": bytecode, "workers": workers, "reps": reps}
    with sdns.SystemdNS(net="host") as ns:
        try:
            root = install(ns, free_port(), workers, preload, bytecode)
            n = 2
            for _ in range(WARMUP):
                reload_once(ns, root, f"r{n}", preload)
                n += 1
                time.sleep(0.3)
            runs = []
            for _ in range(reps):
                runs.append(reload_once(ns, root, f"r{n}", preload))
                n += 1
                time.sleep(0.3)   # the next generation settles (the old one is gone already)
            case["nsenter_ms"] = ms(nsenter_cost(ns))
            case["supervisorctl_status_ms"] = ms(status_time(ns, root, bytecode))
            entries = journal_entries(ns)
        except CaseFailed as exc:
            case["error"] = str(exc)
            return case
    rows = []
    for r in runs:
        found = marks(entries, r)
        app = found.get("app")
        rows.append({"tag": r["tag"], "reload_ms": ms(r["seconds"]), "app_ms": ms(app),
                     "overhead_ms": ms(r["seconds"] - app) if app is not None else None,
                     "steps_ms": {k: ms(v) for k, v in steps_of(found).items()}})
    case["runs"] = rows
    case["summary"] = summarize(rows)
    return case


def summarize(rows: list[dict]) -> dict:
    def stat(key):
        xs = [r[key] for r in rows if r[key] is not None]
        return {"median": round(median(xs), 1) if xs else None, "p90": pct(xs, 90), "min": min(xs, default=None)}
    steps = {name: round(median([r["steps_ms"][name] for r in rows
                                 if r["steps_ms"][name] is not None]) or 0, 1)
             for name, _, _ in STEPS}
    return {"reload_ms": stat("reload_ms"), "app_ms": stat("app_ms"), "overhead_ms": stat("overhead_ms"),
            "steps_median_ms": steps}


# ---- systemd by itself ------------------------------------------------------------------------

SANDBOXING = re.compile(r"(Protect|Private|Restrict|NoNewPrivileges|LockPersonality|SystemCall|Capability"
                        r"|AmbientCapabilities|KeyringMode|ReadWritePaths|UMask|RuntimeDirectory)")


def shipped_sandboxing() -> list[str]:
    """The sandboxing lines of the shipped unit's [Service] (units/cadenza@.service), for one instance."""
    text = (REPO / "units" / "cadenza@.service").read_text()
    service = text.split("[Service]", 1)[1].split("\n[", 1)[0]
    return [line.replace("%i", APP) for line in service.splitlines() if SANDBOXING.match(line)]


def systemd_baseline(reps: int) -> dict:
    """`systemctl reload` of a unit whose ExecReload= is /bin/true: what systemctl and systemd
    cost by themselves, with the test units' shape and with the shipped unit's sandboxing (which
    systemd sets up again for every control process, ExecReload= included)."""
    base = "[Service]\nType=simple\nExecStart=/bin/sleep 600\nExecReload=/bin/true\n"
    units = {"plain": base, "sandboxed": base + "\n".join(shipped_sandboxing()) + "\n"}
    times: dict[str, list[float]] = {name: [] for name in units}
    with sdns.SystemdNS(net="host") as ns:
        for name, text in units.items():
            ns.write_unit(f"{name}.service", text)
        ns.systemctl("daemon-reload", check=True)
        ns.systemctl("start", *(f"{name}.service" for name in units), check=True)
        for _ in range(reps):
            for name in units:
                t0 = time.monotonic()
                ns.systemctl("reload", f"{name}.service", check=True)
                times[name].append(time.monotonic() - t0)
        nsenter = nsenter_cost(ns)
    return {"nsenter_ms": ms(nsenter), "sandboxing": shipped_sandboxing(),
            **{f"{name}_ms": {"median": ms(median(ts)), "min": ms(min(ts))} for name, ts in times.items()}}


# ---- many workers ---------------------------------------------------------------------------

def import_time(release_dir: Path, bytecode_env: dict[str, str], n: int = 5) -> float:
    env = {**os.environ, **bytecode_env, "PYTHONPATH": str(release_dir)}
    times = []
    for _ in range(n):
        t0 = time.monotonic()
        subprocess.run([PYTHON, "-c", "import app"], cwd=release_dir, env=env, check=True)
        times.append(time.monotonic() - t0)
    return median(times)


def scale_case(preload: bool, workers: int, reps: int) -> dict:
    case = {"preload": preload, "workers": workers, "reps": reps, "bytecode": "cached"}
    budget = 30 + workers
    with sdns.SystemdNS(net="host") as ns:
        try:
            root = install(ns, free_port(), workers, preload, "cached", SCALE_APP_BODY, budget=budget)
            reload_once(ns, root, "r2", preload, SCALE_APP_BODY)      # the warm-up: every .pyc written
            runs = [reload_once(ns, root, f"r{3 + i}", preload, SCALE_APP_BODY) for i in range(reps)]
            case["import_ms"] = ms(import_time(root.path(runs[-1]["tag"]),
                                               {"PYTHONPYCACHEPREFIX": f"{ns.state}/pycache"}))
            entries = journal_entries(ns)
        except CaseFailed as exc:
            case["error"] = str(exc)
            return case
    rows = []
    for r in runs:
        found = marks(entries, r)
        rows.append({"tag": r["tag"], "reload_ms": ms(r["seconds"]),
                     "steps_ms": {k: ms(v) for k, v in steps_of(found).items()}})
    case["runs"] = rows
    case["reload_ms"] = {"median": ms(median([r["seconds"] for r in runs])),
                         "max": ms(max(r["seconds"] for r in runs))}
    case["steps_median_ms"] = {name: ms(median([r["steps_ms"][name] / 1000 for r in rows
                                                if r["steps_ms"][name] is not None]))
                               for name, _, _ in STEPS}
    case["reload_minus_import_ms"] = round(case["reload_ms"]["median"] - case["import_ms"], 1)
    return case


# ---- report ---------------------------------------------------------------------------------

def markdown(res: dict) -> str:
    sd = res["systemd"]
    workers = res["idle"][0]["workers"] if res["idle"] else "?"
    out = ["### systemd by itself", "",
           "| `systemctl reload` of `ExecReload=/bin/true` | median | min |", "|---|---|---|",
           f"| the test units' shape (no sandboxing) | {sd['plain_ms']['median']} ms | {sd['plain_ms']['min']} ms |",
           f"| with the shipped unit's sandboxing | {sd['sandboxed_ms']['median']} ms | {sd['sandboxed_ms']['min']} ms |",
           f"| `nsenter true` (the harness's own part of both) | {sd['nsenter_ms']} ms | |", "",
           f"### Idle reload ({workers} workers)", "",
           "| preload | bytecode | reload median / p90 | app's own start median | overhead median / p90 | "
           "`nsenter true` | `supervisorctl status` |",
           "|---|---|---|---|---|---|---|"]
    for c in res["idle"]:
        label = ("on" if c["preload"] else "off", c["bytecode"])
        if "error" in c:
            out.append(f"| {label[0]} | {label[1]} | not measured: {c['error'].splitlines()[0]} | | | | |")
            continue
        s = c["summary"]
        out.append(f"| {label[0]} | {label[1]} | {s['reload_ms']['median']} / {s['reload_ms']['p90']} ms | "
                   f"{s['app_ms']['median']} ms | **{s['overhead_ms']['median']}** / {s['overhead_ms']['p90']} ms | "
                   f"{c['nsenter_ms']} ms | {c['supervisorctl_status_ms']} ms |")
    measured = [c for c in res["idle"] if "error" not in c]
    if measured:
        out += ["", "### Where an idle reload's time goes (medians, ms)", "",
                "| step | " + " | ".join(f"preload {'on' if c['preload'] else 'off'}, {c['bytecode']}"
                                        for c in measured) + " |",
                "|---|" + "---|" * len(measured)]
        for name, _, _ in STEPS:
            out.append(f"| {name} | " + " | ".join(str(c["summary"]["steps_median_ms"][name]) for c in measured)
                       + " |")
    if res.get("scale"):
        app_step, drain_step = STEPS[6][0], STEPS[8][0]
        out += ["", f"### Upgrade of {res['scale'][0]['workers']} workers (app: `import flask`; bytecode cached)",
                "", "| preload | reload median (max) | app's import (`python -c 'import app'`) | reload - import "
                    "| of the reload: first app process to last READY=1 | old workers' drain |",
                "|---|---|---|---|---|---|"]
        for c in res["scale"]:
            if "error" in c:
                out.append(f"| {'on' if c['preload'] else 'off'} | not measured: {c['error'].splitlines()[0]} "
                           "| | | | |")
                continue
            steps = c["steps_median_ms"]
            out.append(f"| {'on' if c['preload'] else 'off'} | {c['reload_ms']['median']} "
                       f"({c['reload_ms']['max']}) ms | {c['import_ms']} ms | **{c['reload_minus_import_ms']}** ms "
                       f"| {steps[app_step]} ms | {steps[drain_step]} ms |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    global SOURCE
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=15, help="measured reloads per case (default 15)")
    ap.add_argument("--workers", type=int, default=2, help="workers of the idle cases (default 2)")
    ap.add_argument("--preload", default="off,on", help="off, on or off,on (default)")
    ap.add_argument("--bytecode", default="cached,none", help="cached, none or cached,none (default)")
    ap.add_argument("--scale", type=int, default=64, metavar="N", help="workers of the upgrade timing (0: skip)")
    ap.add_argument("--scale-reps", type=int, default=2, help="upgrades per preload mode (default 2)")
    ap.add_argument("--json", type=Path, default=REPO / "docs" / "reload.json", help="default: docs/reload.json")
    ap.add_argument("--src", type=Path, metavar="DIR",
                    help="run the cadenza package in DIR (DIR/cadenza) instead of the installed one, to "
                         "compare two versions (`git archive REV src | tar -x -C /tmp/rev`: --src /tmp/rev/src)")
    args = ap.parse_args(argv)
    if args.src is not None:
        if not (args.src / "cadenza" / "__init__.py").is_file():
            ap.error(f"--src {args.src}: no cadenza package there")
        SOURCE = args.src.resolve()
    preloads = [{"off": False, "on": True}[v.strip()] for v in args.preload.split(",")]
    bytecodes = [v.strip() for v in args.bytecode.split(",")]
    if set(bytecodes) - {"cached", "none"}:
        ap.error("--bytecode: cached, none or cached,none")
    ok, why = sdns.available()
    if not ok:
        sys.exit(f"cannot run: {why}")
    sdns.janitor()
    started = time.monotonic()
    res = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "command": "sudo .venv/bin/python tests/bench/reload.py " + " ".join(argv if argv is not None else sys.argv[1:]),
           "machine": common.machine(), "source": str(SOURCE or "the installed cadenza (the checkout)"),
           "idle": [], "scale": []}
    log("systemd by itself: `systemctl reload` of ExecReload=/bin/true")
    res["systemd"] = systemd_baseline(args.reps)
    for preload in preloads:
        for bytecode in bytecodes:
            log(f"idle reload: preload {'on' if preload else 'off'}, bytecode {bytecode}, {args.reps} reloads")
            case = idle_case(preload, bytecode, args.reps, args.workers)
            log(f"  {case.get('error', '').splitlines()[0] if 'error' in case else case['summary']['overhead_ms']}")
            res["idle"].append(case)
    if args.scale:
        for preload in preloads:
            log(f"upgrade of {args.scale} workers: preload {'on' if preload else 'off'}, {args.scale_reps} upgrades")
            case = scale_case(preload, args.scale, args.scale_reps)
            log(f"  {case.get('error', '').splitlines()[0] if 'error' in case else case['reload_ms']}")
            res["scale"].append(case)
    res["run_seconds"] = round(time.monotonic() - started, 1)
    res["loadavg_at_end"] = Path("/proc/loadavg").read_text().split()[:3]
    common.dump_json(args.json, res)
    print(markdown(res))
    log(f"wrote {args.json} ({res['run_seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
