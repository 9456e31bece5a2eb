"""Benchmark 1: reloads under load.

For each contender, in a fresh private systemd: wrk -t2 -c64 --latency on `/`, one client looping
on `/slow?s=S` over a keep-alive connection, and RELOADS times a new release deployed (`current`
switched) followed by `systemctl reload APP` (`restart` for uvicorn), timed. Reloads start every
INTERVAL seconds from 1 s in; one that overruns its slot delays the next to 1 s after its end (no
bunching). At the end of each slot, three requests on new connections check whether the release
just deployed is the one serving ("effective" reload). The load lasts DURATION seconds, or longer
if the reloads do: wrk is stopped (SIGINT, it then prints its summary) 2 s after the last reload
has returned, so every reload happens under load.
"""
from __future__ import annotations

import re
import signal
import subprocess
import time

from common import (SlowClient, cgroup_pids, finish_wrk, free_port, median, ms, served_release,
                    start_wrk)
from contenders import APP, UNIT, Contender, next_release
import sdns  # noqa: E402  (tests/sdns.py, on sys.path through common)

PROBES = 3
RELOAD_TIMEOUT = 120
NOTEWORTHY = re.compile(r"Traceback|Error|ERROR|error:|Failed|failed|SIGKILL|timed out")


def run(contender: Contender, *, duration: float, interval: float, reloads: int,
        slow_seconds: float, log=print) -> dict:
    with sdns.SystemdNS(net="host") as ns:
        port = free_port()
        root = contender.install(ns, port)
        main_pids = [ns.show(UNIT, "MainPID")["MainPID"]]
        t0 = time.monotonic()
        slow = SlowClient(port, slow_seconds, deadline=t0 + duration + reloads * 15)
        slow.start()
        bound = duration + reloads * 15       # wrk's own bound; normally stopped long before
        wrk = start_wrk(port, bound)
        done: list[dict] = []
        next_at = t0 + 1.0
        for i in range(reloads):
            _sleep_until(next_at)
            if time.monotonic() > t0 + bound - 5:
                log(f"  {contender.key}: out of time after {i} reloads")
                break
            tag = next_release(root, i + 2)
            started = time.monotonic()
            try:
                rc = ns.systemctl(contender.verb, APP, timeout=RELOAD_TIMEOUT).returncode
            except subprocess.TimeoutExpired:
                rc = "timeout"
            ended = time.monotonic()
            pid = ns.show(UNIT, "MainPID")["MainPID"]
            _sleep_until(started + interval - 0.2)   # async reloads get the whole slot
            answers = [served_release(port) for _ in range(PROBES)]
            done.append({"tag": tag, "at_s": round(started - t0, 2), "seconds": round(ended - started, 4),
                         "rc": rc, "main_pid": pid, "answers": answers,
                         "effective": all(a == tag for a in answers)})
            main_pids.append(pid)
            next_at = max(started + interval, ended + 1.0)
        _sleep_until(max(t0 + duration, time.monotonic() + 2.0))
        wrk.send_signal(signal.SIGINT)
        load_s = time.monotonic() - t0
        load = finish_wrk(wrk, 30)
        slow.stop.set()
        slow.join(timeout=40)
        props = ns.show(UNIT, "ActiveState", "SubState", "Result", "NRestarts", "MainPID")
        procs_left = len(cgroup_pids(ns, UNIT))
        journal = ns.journal("-o", "cat", "-u", UNIT).splitlines()
    noteworthy = [line for line in journal if NOTEWORTHY.search(line)]
    times = [r["seconds"] for r in done]
    changes = sum(1 for a, b in zip(main_pids, main_pids[1:]) if a != b)
    res = {
        "contender": contender.key, "what": contender.what, "verb": contender.verb,
        "duration_s": duration, "load_s": round(load_s, 1), "interval_s": interval, "slow_route_s": slow_seconds,
        "wrk": {k: v for k, v in load.items() if k != "raw"}, "wrk_raw": load["raw"],
        "slow_client": slow.result(),
        "reloads": len(done),
        "reloads_failed": sum(r["rc"] != 0 for r in done),
        "reloads_effective": sum(r["effective"] for r in done),
        "reload_median_ms": ms(median(times)), "reload_max_ms": ms(max(times) if times else None),
        "mainpid_changes": changes,
        "final_state": f"{props.get('ActiveState')}/{props.get('SubState')}",
        "final": props, "processes_left": procs_left, "reload_log": done,
        "journal_noteworthy_lines": len(noteworthy),
        "journal_noteworthy": sorted(set(noteworthy), key=noteworthy.index)[:8],
    }
    res["errors_total"] = res["wrk"]["socket_errors"] + res["slow_client"]["errors"]
    res["non2xx_total"] = res["wrk"]["non2xx"] + res["slow_client"]["non2xx"]
    return res


def _sleep_until(t: float) -> None:
    delay = t - time.monotonic()
    if delay > 0:
        time.sleep(delay)
