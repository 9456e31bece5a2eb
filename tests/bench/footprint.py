"""Benchmark 4: footprint of the master when idle, beside gunicorn's arbiter and uvicorn's
supervisor, all three socket-activated in one private systemd with 2 workers each and measured
over the same window.

RSS: VmRSS (and PSS from smaps_rollup) of the main process. Idle CPU: utime+stime over the
window. Wake-ups: voluntary + nonvoluntary context switches over the window, summed over every
thread of the process (/proc/PID/task/*/status; gunicorn 27's arbiter runs its control socket in
an asyncio thread), divided by the window: each time a sleeping process is woken to run counts
one switch when it blocks again.
"""
from __future__ import annotations

import time

from common import cgroup_pids, footprint, free_port, main_host_pid, pss_kb
from contenders import CADENZA, GUNICORN_HUP, UVICORN
import sdns  # noqa: E402  (tests/sdns.py, on sys.path through common)

PEERS = ((CADENZA, "cadenza master"), (GUNICORN_HUP, "gunicorn 27 arbiter"),
         (UVICORN, "uvicorn Multiprocess supervisor"))


def run(window: float, settle: float = 5.0, log=print) -> list[dict]:
    with sdns.SystemdNS(net="host") as ns:
        names = {}
        for contender, label in PEERS:
            name = contender.key.split("-")[0][:8]
            contender.install(ns, free_port(), name=name)
            names[name] = label
        time.sleep(settle)                        # let start-up work (imports, GC) finish
        before = {}
        for name in names:
            unit = f"{name}.service"
            master = main_host_pid(ns, unit)
            workers = [p for p in cgroup_pids(ns, unit).values() if p != master]
            before[name] = (master, workers, footprint(master), [footprint(w) for w in workers])
        t0 = time.monotonic()
        time.sleep(window)
        elapsed = time.monotonic() - t0
        rows = []
        for name, label in names.items():
            master, workers, m0, w0 = before[name]
            m1, w1 = footprint(master), [footprint(w) for w in workers]
            row = {
                "who": label, "unit": f"{name}.service", "window_s": round(elapsed, 1),
                "master_rss_mb": round(m1["rss_kb"] / 1024, 1),
                "master_pss_mb": round((pss_kb(master) or 0) / 1024, 1),
                "master_threads": m1["threads"],
                "master_wakeups_per_s": round((m1["ctxt"] - m0["ctxt"]) / elapsed, 2),
                "master_cpu_pct": round(100 * (m1["cpu_s"] - m0["cpu_s"]) / elapsed, 3),
                "workers": len(workers),
                "worker_rss_mb_each": round(sum(w["rss_kb"] for w in w1) / 1024 / max(len(w1), 1), 1),
                "workers_wakeups_per_s": round(sum(b["ctxt"] - a["ctxt"] for a, b in zip(w0, w1)) / elapsed, 1),
                "workers_cpu_pct": round(100 * sum(b["cpu_s"] - a["cpu_s"] for a, b in zip(w0, w1)) / elapsed, 2),
            }
            log(f"  footprint {label}: RSS {row['master_rss_mb']} MB, "
                f"{row['master_wakeups_per_s']} wake-ups/s, CPU {row['master_cpu_pct']} %")
            rows.append(row)
    return rows
