"""Markdown tables from the results dict that run.py builds (and writes as JSON)."""
from __future__ import annotations

TARGETS = {
    "reload_errors": "cadenza: 0 socket errors and 0 non-2xx over >= 20 reloads",
    "overhead": "median and p95 <= 150 ms",
    "throughput": ">= 0.98",
}


def table(head: list[str], rows: list[list]) -> str:
    def cell(v) -> str:
        return "–" if v is None else str(v)
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _n(v, digits=0):
    if v is None:
        return None
    return f"{v:,.{digits}f}"


def reload_table(rows: list[dict]) -> str:
    out = []
    for r in rows:
        w, s = r["wrk"], r["slow_client"]
        out.append([
            f"**{r['contender']}** ({r['verb']})", f"{r['reloads']} ({r['reloads_failed']} failed)",
            f"{r['reloads_effective']}/{r['reloads']}", _n(w["requests"]), _n(w["rps"]),
            f"{w['connect']}/{w['read']}/{w['write']}/{w['timeout']}", w["non2xx"], w["p99_ms"],
            f"{s['ok']}/{s['requests']} ({s['errors']} err, {s['non2xx']} non-2xx)",
            f"{_n(r['reload_median_ms'])} / {_n(r['reload_max_ms'])}", r["mainpid_changes"],
            f"{r['final_state']}, {r['processes_left']} procs",
        ])
    return table(["contender", "reloads", "new release serving¹", "wrk requests", "req/s",
                  "socket errors c/r/w/t", "non-2xx", "p99 ms", "slow client ok/total",
                  "reload ms median / max", "MainPID changes", "final unit"], out)


def journal_notes(rows: list[dict]) -> str:
    notes = []
    for r in rows:
        lines = [line.strip()[:140] for line in r.get("journal_noteworthy", [])
                 if "Traceback" not in line and line.strip()[:1] not in ("^", "~")][:3]
        if lines:
            shown = "; ".join(f"`{line}`" for line in lines)
            notes.append(f"- {r['contender']}: {r['journal_noteworthy_lines']} journal line(s) of note, e.g. {shown}")
    return "Journal of the service during the run:\n" + "\n".join(notes) if notes else ""


def overhead_table(r: dict) -> str:
    rows = [
        ["`systemctl reload` wall time", r["reload_ms"]["median"], r["reload_ms"]["p95"]],
        [f"app start-to-ready ({r['workers']} built-in workers at once, no supervisor)",
         r["app_start_to_ready_ms"]["median"], r["app_start_to_ready_ms"]["p95"]],
        ["**overhead** = reload − median start-to-ready", f"**{r['overhead_ms']['median']}**",
         f"**{r['overhead_ms']['p95']}**"],
        ["(nsenter + `systemctl show` round trip, for scale)", r["systemctl_roundtrip_ms"], None],
        ["(nsenter + pinned `supervisorctl status`: its Python start and one request)",
         r.get("supervisorctl_status_ms"), None],
        ["upgrade over the control socket from the host (no systemctl, no supervisorctl)",
         r["direct_upgrade_ms"]["median"], None],
    ]
    text = table(["over " + str(r["reps"]) + " reloads", "median ms", "p95 ms"], rows)
    events = r["direct_upgrade_ms"]["events"]
    if events:
        at = {}
        for t, name, _ in events:
            at.setdefault(name, t * 1000)
        steps = " → ".join(f"{e[1]} {e[0] * 1000:.0f}" for e in events)
        text += f"\n\nWhere an upgrade's time goes (ms since the request, median run): {steps}."
        if {"started", "ready", "mainpid", "done"} <= at.keys():
            text += (f" That is {at['ready'] - at['started']:.0f} ms from the fork of the next master to all of its"
                     f" workers ready (the workers alone: {r['app_start_to_ready_ms']['median']:.0f} ms), "
                     f"{at['mainpid'] - at['ready']:.0f} ms of hand-over, and {at['done'] - at['mainpid']:.0f} ms"
                     f" until the old generation has drained and exited, which `supervisorctl upgrade` waits for.")
    return text


def throughput_table(r: dict) -> str:
    iqr = r.get("ratio_iqr")
    return table(["workers", "bare req/s (median)", "under cadenza req/s (median)", "ratio (median of pairs)",
                  "pair ratios: IQR", "min–max", "errors"],
                 [[r["workers"], _n(r["bare_rps"]), _n(r["cadenza_rps"]), f"**{r['ratio_median']}**",
                   f"{iqr[0]}–{iqr[1]}" if iqr else None,
                   f"{min(r['ratios'])}–{max(r['ratios'])}" if r["ratios"] else None, r["errors"]]])


def footprint_table(rows: list[dict]) -> str:
    return table(["main process", "RSS MB", "PSS MB", "threads", "wake-ups/s", "CPU %",
                  "other processes", "their wake-ups/s", "their RSS MB each"],
                 [[f"**{r['who']}**", r["master_rss_mb"], r["master_pss_mb"], r["master_threads"],
                   r["master_wakeups_per_s"], r["master_cpu_pct"], r["workers"],
                   r["workers_wakeups_per_s"], r["worker_rss_mb_each"]] for r in rows])


def scale_table(rows: list[dict]) -> str:
    return table(["workers", "start → READY ms", "upgrade (`systemctl reload`) ms", "unit PSS MB",
                  "processes", "runs (ready; upgrade)"],
                 [[r["workers"], _n(r["ready_ms"]), _n(r["upgrade_ms"]), r["pss_mb"], r["processes"],
                   f"{r['ready_all']}; {r['upgrade_all']}"] for r in rows])


def verdicts(res: dict) -> list[list]:
    out = []
    if "reload" in res:
        cz = next((r for r in res["reload"] if r["contender"] == "cadenza"), None)
        if cz:
            clean = cz["errors_total"] == 0 and cz["non2xx_total"] == 0
            enough = cz["reloads"] >= 20
            out.append(["1 reload under load", TARGETS["reload_errors"],
                        f"{cz['errors_total']} errors, {cz['non2xx_total']} non-2xx over "
                        f"{cz['reloads']} reloads",
                        "**missed**" if not clean else "met" if enough else "too few reloads (quick run)"])
    if "overhead" in res:
        o = res["overhead"]["overhead_ms"]
        ok = o["median"] is not None and o["median"] <= 150 and o["p95"] <= 150
        out.append(["2 reload overhead", TARGETS["overhead"], f"median {o['median']} ms, p95 {o['p95']} ms",
                    "met" if ok else "**missed**"])
    if "throughput" in res:
        t = res["throughput"]["ratio_median"]
        out.append(["3 throughput ratio", TARGETS["throughput"], t,
                    "met" if t is not None and t >= 0.98 else "**missed**"])
    return out


def markdown(res: dict) -> str:
    parts = []
    if "reload" in res:
        p = res["params"]["reload"]
        loads = "/".join(f"{r['load_s']:.0f}" for r in res["reload"])
        parts += [f"### 1. Reload under load (wrk -t2 -c64 --latency on `/` for {p['duration']} s or until 2 s after "
                  f"the last reload ({loads} s); {p['reloads']} reloads, one every {p['interval']} s from 1 s in; "
                  f"one keep-alive client looping on `/slow?s={p['slow']}`)",
                  reload_table(res["reload"]),
                  "¹ reloads after which 3 requests on new connections, just before the next reload, "
                  "were all answered by the release just deployed.", journal_notes(res["reload"])]
    if "overhead" in res:
        parts += ["### 2. Reload overhead (cadenza, 2 workers, idle)", overhead_table(res["overhead"])]
    if "throughput" in res:
        t = res["throughput"]
        parts += [f"### 3. Throughput overhead (wrk -t2 -c64 `Connection: close`, {t['pairs']} pairs of "
                  f"{t['seconds']} s runs)", throughput_table(t)]
    if "footprint" in res:
        w = res["footprint"][0]["window_s"] if res["footprint"] else None
        parts += [f"### 4. Footprint, idle, 2 workers each, over the same {w} s window",
                  footprint_table(res["footprint"])]
    if "scale" in res:
        parts += ["### 5. Scale (cadenza)", scale_table(res["scale"])]
    v = verdicts(res)
    if v:
        parts += ["### Targets", table(["benchmark", "target", "measured", "verdict"], v)]
    return "\n\n".join(parts) + "\n"
