"""The reliability and security results table (docs/reliability.md and .json), from real runs of
the tests that prove them against a real systemd (issue: faults, bad input, soak, security).

    sudo .venv/bin/python tests/reliability_report.py [--repeat 3] [--out docs]

Runs the selected tests --repeat times (the soak, 2,000 upgrades under 4 keep-alive clients, and the Debian package tests once),
each run with $CADENZA_RESULTS_FILE set, so conftest.py records every test's outcome and the
requests its HTTP clients had answered and lost; then writes one table row per scenario.
Exit status: 0 when every run of every scenario passed.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# (section, test node prefixes or patterns); first match wins; a test matching none is not shown.
SECTIONS = [
    ("Soak", [r"test_soak\.py::"]),
    ("Security", [r"test_unsafe_pinned_path", r"test_a_user_not_allowed", r"test_workers_never_see",
                  r"test_other_users_are_denied", r"test_upgrade_refused_when", r"test_pin_refuses",
                  r"test_world_writable_file", r"test_others_writable", r"config-writable-by-others",
                  r"test_packaging\.py::.*user"]),
    ("Faults during a hand-off", [r"test_systemd_upgrade\.py::test_(old|new)_master", r"test_stop_during",
                                  r"test_ten_usr2", r"test_requests_in_flight", r"test_failed_upgrade",
                                  r"test_five_deploys"]),
    ("The fault matrix: every step of the hand-over", [r"test_systemd_matrix\.py::"]),
    ("The hand-over's committed point (systemd frozen in the barrier window) and its drain",
     [r"test_systemd_handover\.py::"]),
    ("Failures of the OS and of a new release's config", [r"test_systemd_os_faults\.py::"]),
    ("Faults of workers, of the unit and of its limits",
     [r"test_systemd_reliability\.py::test_(random|a_stopped|a_unit)", r"test_out_of_file_descriptors"]),
    ("The fd store", [r"test_fd_store"]),
    ("Bad input, fuzzed", [r"test_fuzz\.py::"]),
]
# Seen outside the runs of a report, and not explained yet: printed under the tables.
KNOWN = [
    "One run of the 500-upgrade soak under `.ci/run` (2026-11-27) lost 1 request of 84,800: a "
    "keep-alive request to a draining worker got its response headers (`Content-Length: 19`) and "
    "then the end of the connection, without the body (`IncompleteRead(0 bytes read, 19 more "
    "expected)`); the worker closed that connection as idle once its 1 s grace was over. It did "
    "not happen in 4,300 other upgrades under systemd (four soaks of 500; one of 800 and one "
    "of 1,500 with five keep-alive clients, 1,030,000 requests between these two; none failed), nor in 350 upgrades "
    "and 510 rolling restarts with 4–6 keep-alive clients outside systemd. The test clients now "
    "print the headers of such a response, the worker's pid (`X-Pid`) among them. Two ways uvicorn's "
    "h11 protocol cuts a response after its headers were found and closed off (see the worker's "
    "drain in `cadenza/worker/app.py`): bytes a client sends after a `Connection: close` response "
    "started make h11 raise, and uvicorn's 400 path then aborts the connection mid-body; and a "
    "`ConnectionClosed` sent while a body is being written puts h11 in ERROR, so the next body write "
    "fails and the transport is closed. The worker now logs every close it decides, with the "
    "client's port and h11's states. 2,000 upgrades under four keep-alive clients (1,250,507 "
    "requests) did not show it again.",
]
# Scenarios where a passing run may lose requests, and why (the test bounds it and checks that
# no connection was refused).
LOSS_NOTES = {
    "test_fd_store": "a crash takes the requests its SIGKILLed workers held; none refused",
    "test_random_workers_killed": "a SIGKILLed worker takes its request in flight; none refused",
    "before_the_fork": "a crash: systemd SIGKILLs the dead master's workers; none refused",
    "while_the_next_one_boots": "a crash: systemd SIGKILLs the dead master's workers; none refused",
}
ONCE = ["tests/test_soak.py", "tests/test_packaging.py"]
REPEATED = ["tests/test_systemd_upgrade.py", "tests/test_systemd_reliability.py", "tests/test_systemd_handover.py",
            "tests/test_systemd_os_faults.py", *(["tests/test_systemd_matrix.py"] if (REPO / "tests/test_systemd_matrix.py").exists() else []),
            "tests/test_systemd_units.py::test_a_user_not_allowed_gets_exit_4", "tests/test_fuzz.py",
            "tests/test_control.py", "tests/test_config.py"]


def run_pytest(targets: list[str], results: Path, env: dict) -> None:
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *targets]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=REPO, env=dict(env, CADENZA_RESULTS_FILE=str(results)))


def section_of(nodeid: str) -> str | None:
    for section, patterns in SECTIONS:
        if any(re.search(p, nodeid) for p in patterns):
            return section
    return None


def scenario(nodeid: str) -> str:
    name = nodeid.split("::", 1)[1]
    base, _, param = name.partition("[")
    text = base.removeprefix("test_").replace("_", " ")
    return f"{text} [{param}" if param else text


def aggregate(runs: list[dict]) -> list[dict]:
    rows: dict[str, dict] = {}
    for results in runs:
        for nodeid, r in results.items():
            section = section_of(nodeid)
            if section is None or r["outcome"] == "skipped":
                continue
            row = rows.setdefault(nodeid, dict(section=section, scenario=scenario(nodeid), test=nodeid,
                                               runs=0, failed_runs=0, answered=0, lost=0))
            row["runs"] += 1
            row["failed_runs"] += r["outcome"] == "failed"
            row["answered"] += r["requests"][0]
            row["lost"] += r["requests"][1]
            if "soak" in r:
                row["samples"] = r["soak"]
                last = r["soak"].strip().splitlines()[-1].split()[0]
                row["scenario"] = f"{last} {row['scenario']}"
    for row in rows.values():
        row["verdict"] = "pass" if row["failed_runs"] == 0 else "FAIL"
        row["note"] = next((n for k, n in LOSS_NOTES.items() if k in row["test"]), "")
    order = [s for s, _ in SECTIONS]
    return sorted(rows.values(), key=lambda r: order.index(r["section"]))


def markdown(rows: list[dict], meta: dict) -> str:
    out = ["# Reliability and security results", "",
           f"Produced by `{meta['command']}` on {meta['date']}: {meta['machine']}. Each scenario is a "
           "test against a real systemd 252 booted in namespaces (tests/sdns.py) or, for bad input, "
           "against the real parsers and master; its docstring says what it asserts. *Runs* is how many "
           "times the test ran here, *failed runs* how many of them failed; *requests* are those of "
           "the HTTP clients that ran throughout (answered / lost: failed, reset or refused).", ""]
    for section in dict.fromkeys(r["section"] for r in rows):
        out += [f"## {section}", "", "| scenario | runs | failed runs | requests answered | requests lost | verdict |",
                "|---|---|---|---|---|---|"]
        for r in (r for r in rows if r["section"] == section):
            lost = f"{r['lost']} ({r['note']})" if r["lost"] and r["note"] else str(r["lost"])
            answered = f"{r['answered']:,}" if r["answered"] or r["lost"] else "–"
            out.append(f"| {r['scenario']} (`{r['test'].split('::')[0].removeprefix('tests/')}`) | {r['runs']} | "
                       f"{r['failed_runs']} | {answered} | {lost if answered != '–' else '–'} | {r['verdict']} |")
        out.append("")
        for r in (r for r in rows if r["section"] == section and r.get("samples")):
            out += ["The soak's samples: the master (a new process after every upgrade), its open fds "
                    "and RSS, the processes in the unit's cgroup, zombies, processes that are not the "
                    "current generation's, and the client's requests so far.", "", "```",
                    r["samples"], "```", ""]
    total = sum(r["runs"] for r in rows)
    failed = sum(r["failed_runs"] for r in rows)
    out += [f"In all: {len(rows)} scenarios, {total} runs, {failed} failed; "
            f"{sum(r['answered'] for r in rows):,} requests answered, {sum(r['lost'] for r in rows)} lost.", ""]
    if KNOWN:
        out += ["## Seen elsewhere, not explained yet", "", *(f"- {k}" for k in KNOWN), ""]
    return "\n".join(out)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--out", type=Path, default=REPO / "docs")
    parser.add_argument("--soak-upgrades", type=int, default=2000)
    args = parser.parse_args()
    env = dict(os.environ, CADENZA_REQUIRE_SYSTEMD="1", CADENZA_SOAK_UPGRADES=str(args.soak_upgrades))
    runs = []
    with tempfile.TemporaryDirectory(prefix="cadenza-reliability-") as tmp:
        if "CADENZA_DEB" not in env:   # one package for every run
            build = subprocess.run(["bash", str(REPO / "packaging/build-deb.sh"), tmp],
                                   capture_output=True, text=True)
            if build.returncode != 0:
                print(build.stdout[-3000:], build.stderr[-3000:], file=sys.stderr)
                return 1
            env["CADENZA_DEB"] = str(next(Path(tmp).glob("cadenza_*.deb")))
        for i in range(args.repeat):
            results = Path(tmp) / f"run-{i}.json"
            run_pytest(REPEATED + (ONCE if i == 0 else []), results, env)
            runs.append(json.loads(results.read_text()))
    rows = aggregate(runs)
    systemd = subprocess.run(["/lib/systemd/systemd", "--version"], capture_output=True, text=True).stdout
    meta = dict(command="sudo .venv/bin/python tests/reliability_report.py" +
                        (f" --repeat {args.repeat}" if args.repeat != 3 else ""),
                date=time.strftime("%Y-%m-%d"),
                machine=f"{os.cpu_count()} CPUs, Linux {platform.release()}, {systemd.split(chr(10))[0]}")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "reliability.md").write_text(markdown(rows, meta))
    (args.out / "reliability.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1) + "\n")
    print(markdown(rows, meta))
    return 0 if all(r["failed_runs"] == 0 for r in rows) and rows else 1


if __name__ == "__main__":
    sys.exit(main())
