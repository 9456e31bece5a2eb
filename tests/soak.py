"""Soak: N consecutive `systemctl reload`s of one app under a steady HTTP client, in a real
systemd 252 booted in namespaces (tests/sdns.py).

    sudo .venv/bin/python tests/soak.py [--upgrades 500] [--every 50] [--keepalive 4] [--json PATH]

Two releases ("a" and "b") are deployed once; each upgrade points `current` at the other one,
reloads, and waits on a pidfd until the old master has exited.  Before the first upgrade, every
`every` upgrades and after the last, the current master and the unit's cgroup are sampled:
open fds, RSS, processes in the cgroup, zombies, and any process that is not a worker of the
current generation parented by the master.  Exit status 0 only if all of it held: no failed
request, the same fds in every master started by an upgrade, 1 + workers.count processes,
no zombie, no stray, and a master RSS spread within RSS_SPREAD_MB.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import select
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import sdns  # noqa: E402
from deploy import AppRoot  # noqa: E402
from procs import free_port  # noqa: E402
from test_systemd_upgrade import APP, UNIT, Hammer, answer, main_pid, title  # noqa: E402

TAGS = ("a", "b")
RSS_SPREAD_MB = 3.0
EXIT_TIMEOUT = 60.0   # the old master drains (graceful_timeout 10 s) and exits well within this
MASTER_TITLE = re.compile(rf"cadenza master gen (\d+) \[{APP}\]")


def stat(pid: int) -> tuple[str, int] | None:
    """(state, ppid) of a host pid; None once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return fields[0], int(fields[1])


def cgroup_pids(ns) -> list[int]:
    cgroup = ns.show(UNIT, "ControlGroup")["ControlGroup"]
    return [int(p) for p in (ns.cgroup / cgroup.lstrip("/") / "cgroup.procs").read_text().split()]


def zombies(parents: set[int]) -> list[int]:
    """Host pids in state Z whose parent is one of `parents`."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (st := stat(int(entry))) and st[0] == "Z" and st[1] in parents:
            found.append(int(entry))
    return found


def requests(hammer: Hammer) -> tuple[int, int]:
    """(answered 200, failed or non-200) so far."""
    seen = dict(hammer.seen)
    ok = sum(n for key, n in seen.items() if key.startswith("release "))
    return ok, len(hammer.failures) + sum(seen.values()) - ok


def sample(ns, hammer: Hammer, upgrade: int) -> dict:
    _, master = main_pid(ns)
    pids = cgroup_pids(ns)
    gen = int(MASTER_TITLE.match(title(master)).group(1))
    worker_title = re.compile(rf"cadenza worker \d+ gen {gen} \[{APP}\]")
    strays = [f"{pid} ppid {st[1] if st else '-'} {title(pid)!r}" for pid in pids if pid != master
              if not ((st := stat(pid)) and st[1] == master and worker_title.match(title(pid)))]
    rss_kb = int(Path(f"/proc/{master}/status").read_text().split("VmRSS:")[1].split()[0])
    ok, failed = requests(hammer)
    return dict(upgrade=upgrade, master=master, gen=gen, fds=len(os.listdir(f"/proc/{master}/fd")),
                rss_mb=round(rss_kb / 1024, 2), procs=len(pids), zombies=zombies({*pids, master}),
                strays=strays, ok=ok, failed=failed)


def upgrade(ns, app: AppRoot, tag: str) -> None:
    """Point `current` at `tag`, reload, and return once the old master has exited."""
    before, old = main_pid(ns)
    app.switch(tag)
    pidfd = os.pidfd_open(old)
    try:
        reload = ns.systemctl("reload", APP)
        assert reload.returncode == 0, (f"reload exited {reload.returncode}: {reload.stderr}\n"
                                        f"--- journal tail ---\n{ns.journal('-o', 'cat', '-n', '40')}")
        after = ns.show(UNIT, "MainPID")["MainPID"]
        assert after != before, f"MainPID still {before} after the reload"
        readable, _, _ = select.select([pidfd], [], [], EXIT_TIMEOUT)
        assert readable, f"old master {old} still running {EXIT_TIMEOUT}s after the reload"
    finally:
        os.close(pidfd)
    assert (got := answer(app)) == f"release {tag}", got


def soak(ns, tmp_dir: Path, upgrades: int = 500, every: int = 50, keepalive: int = 4) -> dict:
    """Deploy APP in `ns`, reload it `upgrades` times under a Hammer, sample every `every`.

    An upgrade that fails stops the soak; its message is in result["error"].  The journal of
    the run is written to tmp_dir/journal.txt.
    """
    app = AppRoot(ns.state, APP, free_port())
    for tag in TAGS:
        app.release(tag)
    app.switch(TAGS[0])
    app.pin()
    for name, text in app.units().items():
        ns.write_unit(name, text)
    ns.systemctl("daemon-reload", check=True)
    ns.systemctl("start", f"{APP}.socket", UNIT, check=True)
    assert answer(app) == f"release {TAGS[0]}"

    result = dict(upgrades=upgrades, done=0, every=every, keepalive=keepalive, workers=app.workers["count"],
                  samples=[], error=None, durations=[])
    hammer = Hammer(app.port, keepalive=keepalive)
    t0 = time.monotonic()
    try:
        result["samples"].append(sample(ns, hammer, 0))
        for n in range(1, upgrades + 1):
            started = time.monotonic()
            upgrade(ns, app, TAGS[n % 2])
            result["durations"].append(time.monotonic() - started)
            result["done"] = n
            if n % every == 0 or n == upgrades:
                result["samples"].append(sample(ns, hammer, n))
    except AssertionError as exc:
        result["error"] = f"upgrade {result['done'] + 1}: {exc}"
    finally:
        result["seconds"] = round(time.monotonic() - t0, 1)
        try:
            hammer.check()
            result["hammer_error"] = None
        except AssertionError as exc:
            result["hammer_error"] = str(exc)
        result["ok"], result["failed"] = requests(hammer)
        result["failures"] = hammer.failures[:20]
        (Path(tmp_dir) / "journal.txt").write_text(ns.journal("-o", "short-monotonic"))
    durations = result.pop("durations")
    if durations:
        result["upgrade_seconds"] = dict(median=round(statistics.median(durations), 3),
                                         max=round(max(durations), 3))
    rss = [s["rss_mb"] for s in result["samples"]]
    result["rss_spread_mb"] = round(max(rss) - min(rss), 2) if rss else None
    return result


def problems(result: dict) -> list[str]:
    """Every property of the soak that did not hold; empty when all did."""
    samples, found = result["samples"], []
    if result["error"]:
        found.append(result["error"])
    if result["done"] != result["upgrades"]:
        found.append(f"only {result['done']} of {result['upgrades']} upgrades done")
    if result["failed"] or result["hammer_error"]:
        found.append(f"{result['failed']} failed request(s): {result['hammer_error']}")
    # Generation 1 is started by systemd; every later one by an upgrade, and holds one fd more
    # for its life: the service's log (CADENZA_LOG_FD), which its respawned workers write to.
    first = samples[0]["fds"] if samples else 0
    if any(s["fds"] != first + (s["upgrade"] > 0) for s in samples):
        found.append(f"master's open fds changed: {[s['fds'] for s in samples]} "
                     f"(expected {first}, then {first + 1} in every upgraded master)")
    if any(s["procs"] != 1 + result["workers"] for s in samples):
        found.append(f"cgroup processes not 1 + {result['workers']}: {[s['procs'] for s in samples]}")
    if any(s["zombies"] for s in samples):
        found.append(f"zombies: {[(s['upgrade'], s['zombies']) for s in samples if s['zombies']]}")
    if any(s["strays"] for s in samples):
        found.append(f"stray processes: {[(s['upgrade'], s['strays']) for s in samples if s['strays']]}")
    if result["rss_spread_mb"] is not None and result["rss_spread_mb"] > RSS_SPREAD_MB:
        found.append(f"master RSS spread {result['rss_spread_mb']} MB > {RSS_SPREAD_MB} MB: "
                     f"{[s['rss_mb'] for s in samples]}")
    return found


def table(result: dict) -> str:
    rows = [f"{'upgrade':>7} {'master':>8} {'gen':>4} {'fds':>4} {'RSS MB':>7} {'procs':>5} "
            f"{'zombies':>7} {'strays':>6} {'ok':>8} {'failed':>6}"]
    rows += [f"{s['upgrade']:>7} {s['master']:>8} {s['gen']:>4} {s['fds']:>4} {s['rss_mb']:>7.2f} "
             f"{s['procs']:>5} {len(s['zombies']):>7} {len(s['strays']):>6} {s['ok']:>8} {s['failed']:>6}"
             for s in result["samples"]]
    return "\n".join(rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--upgrades", type=int, default=500)
    parser.add_argument("--every", type=int, default=50)
    parser.add_argument("--keepalive", type=int, default=4, help="keep-alive clients beside the new-connection one")
    parser.add_argument("--json", type=Path, help="write the samples and totals here")
    args = parser.parse_args()
    ok, reason = sdns.available()
    if not ok:
        print(f"soak: no real systemd: {reason}", file=sys.stderr)
        return 2
    tmp_dir = Path(tempfile.mkdtemp(prefix="cadenza-soak-"))
    with sdns.SystemdNS(net="host") as ns:
        result = soak(ns, tmp_dir, upgrades=args.upgrades, every=args.every, keepalive=args.keepalive)
    print(table(result))
    found = problems(result)
    print(f"{result['done']} upgrades in {result['seconds']} s (per upgrade {result.get('upgrade_seconds')}), "
          f"{result['ok']} requests answered, {result['failed']} failed, "
          f"master RSS spread {result['rss_spread_mb']} MB; journal in {tmp_dir / 'journal.txt'}")
    print("verdict: " + ("PASS" if not found else "FAIL\n  " + "\n  ".join(found)))
    if args.json:
        args.json.write_text(json.dumps(dict(result, problems=found), indent=2) + "\n")
    return 0 if not found else 1


if __name__ == "__main__":
    sys.exit(main())
