"""The figures, targets and markdown of the memory benchmark (memory.py), from its runs."""
from __future__ import annotations

import sys
from pathlib import Path

from common import median
from report import _n, table

TARGET_VS_NO_PRELOAD, TARGET_VS_GUNICORN = 0.4, 1.0
PRELOAD, NO_PRELOAD, GUNICORN = "cadenza-preload", "cadenza", "gunicorn-preload"
LABELS = {PRELOAD: "cadenza, preload = true", NO_PRELOAD: "cadenza, preload = false",
          GUNICORN: "gunicorn --preload (sync)", "gunicorn": "gunicorn (sync, no preload)"}
FIGURES = ("tree_pss_mb", "tree_pss_anon_mb", "tree_pss_file_mb", "tree_rss_mb", "worker_uss_mb",
           "worker_uss_max_mb", "worker_pss_mb", "worker_rss_mb", "master_rss_mb", "master_pss_mb",
           "preloader_rss_mb", "preloader_pss_mb", "ready_s", "processes")


def _measured(run: dict) -> bool:
    return "failed" not in run and not run.get("not_in_effect")


def _ratios(runs: list[dict], app: str, workers: int, over: str) -> list[float]:
    """cadenza-preload's tree PSS / OVER's, per round where both were measured."""
    by = {(r["mode"], r["round"]): r for r in runs if r["app"] == app and r["workers"] == workers}
    out = []
    for (mode, rnd), run in sorted(by.items(), key=lambda kv: kv[0][1]):
        other = by.get((over, rnd))
        if mode == PRELOAD and _measured(run) and other and _measured(other):
            out.append(round(run["tree_pss_mb"] / other["tree_pss_mb"], 3))
    return out


def summarise(runs: list[dict], apps: list[str], counts: list[int], modes: list[str]) -> list[dict]:
    """One row per (app, workers, mode): medians over the rounds it was measured in."""
    rows = []
    for app in apps:
        for n in counts:
            for mode in modes:
                mine = [r for r in runs if (r["app"], r["workers"], r["mode"]) == (app, n, mode)]
                ok = [r for r in mine if _measured(r)]
                row = {"app": app, "workers": n, "mode": mode, "label": LABELS[mode],
                       "rounds": len(ok), "of_rounds": len(mine),
                       "failed": [r.get("failed") or r.get("not_in_effect") for r in mine if not _measured(r)],
                       "tree_pss_mb_rounds": [r["tree_pss_mb"] for r in ok]}
                row.update({k: median([r.get(k) for r in ok]) for k in FIGURES})
                row["warm_up_requests"] = sum(r["warm_up"]["requests"] for r in ok)
                row["warm_up_failures"] = sum(r["warm_up"]["failures"] for r in ok)
                row["per_worker_min"] = min((r["warm_up"]["per_worker_min"] for r in ok), default=None)
                row["per_worker_max"] = max((r["warm_up"]["per_worker_max"] for r in ok), default=None)
                if mode == PRELOAD:
                    for key, over in (("vs_no_preload", NO_PRELOAD), ("vs_gunicorn", GUNICORN)):
                        row[f"{key}_rounds"] = _ratios(runs, app, n, over)
                        row[key] = median(row[f"{key}_rounds"])
                rows.append(row)
    return rows


def _row(rows: list[dict], app: str, n: int, mode: str) -> dict:
    return next((r for r in rows if (r["app"], r["workers"], r["mode"]) == (app, n, mode)), {})


def verdicts(rows: list[dict]) -> list[dict]:
    out = []
    for app, n in dict.fromkeys((r["app"], r["workers"]) for r in rows):
        pre = _row(rows, app, n, PRELOAD)
        v = {"app": app, "workers": n}
        for key, over, target in (("vs_no_preload", NO_PRELOAD, TARGET_VS_NO_PRELOAD),
                                  ("vs_gunicorn", GUNICORN, TARGET_VS_GUNICORN)):
            ratio, other = pre.get(key), _row(rows, app, n, over)
            v[key] = ratio
            if ratio is None:
                why = "; ".join(x for x in (pre.get("failed") or []) + (other.get("failed") or []) if x)
                v[f"{key}_verdict"] = f"not measured ({why[:200] or 'no round with both'})"
            elif ratio <= target:
                v[f"{key}_verdict"] = "PASS"
            else:
                excess = pre["tree_pss_mb"] - target * other["tree_pss_mb"]
                v[f"{key}_verdict"] = (f"MISS: {ratio:.2f} ×, {excess:.0f} MB over {target:g} × "
                                       f"{LABELS[over]}'s {other['tree_pss_mb']:.0f} MB")
        out.append(v)
    return out


def _bold(verdict: str) -> str:
    head, sep, rest = verdict.partition(":")
    return f"**{head}**{sep}{rest}" if head in ("PASS", "MISS") else verdict


def results_table(rows: list[dict], app: str) -> str:
    body = []
    for r in rows:
        if r["app"] != app:
            continue
        name = f"**{r['label']}**" if r["mode"] == PRELOAD else r["label"]
        if not r["rounds"]:
            body.append([r["workers"], name, f"not measured: {'; '.join(filter(None, r['failed']))[:240]}"]
                        + [None] * 9)
            continue
        holder = r["preloader_rss_mb"] if r["mode"] == PRELOAD else (
            r["master_rss_mb"] if r["mode"].endswith("preload") else None)
        body.append([r["workers"], name, _n(r["tree_pss_mb"], 1), _n(r["tree_pss_anon_mb"], 1),
                     _n(r.get("vs_no_preload"), 2), _n(r.get("vs_gunicorn"), 2),
                     _n(r["worker_uss_mb"], 1), _n(r["worker_pss_mb"], 1), _n(r["master_rss_mb"], 1),
                     _n(holder, 1), f"{r['per_worker_min']}–{r['per_worker_max']} ({r['warm_up_failures']})"])
    return table(["workers", "mode", "tree PSS MB", "of which anon", "× no preload¹", "× gunicorn --preload¹",
                  "USS per worker MB", "PSS per worker MB", "master RSS MB", "app holder RSS MB²",
                  "requests per worker min–max (failed)"], body)


def verdict_table(vs: list[dict]) -> str:
    return table(["app, workers", f"≤ {TARGET_VS_NO_PRELOAD:g} × no preload", "verdict",
                  "≤ gunicorn --preload", "verdict"],
                 [[f"{v['app']}, {v['workers']}", _n(v["vs_no_preload"], 2), _bold(v["vs_no_preload_verdict"]),
                   _n(v["vs_gunicorn"], 2), _bold(v["vs_gunicorn_verdict"])] for v in vs])


def markdown(res: dict) -> str:
    """The results block of docs/benchmarks.md's "Memory" section."""
    m, p = res["machine"], res["params"]
    parts = [
        (f"Run of {res['date']} ({res['mode']}: {p['rounds']} round(s), {p['requests']} warm-up requests "
         f"per worker; {res['run_seconds']:.0f} s in all), command `{res['command']}`."),
        (f"{m['nproc']} × {m['cpu']}, {m['mem_gb']} GB, Linux {m['kernel']}, Python {m['python']}; "
         f"{m['gunicorn']}, Django {res.get('django')}; load average {' '.join(m['loadavg_at_start'])} at "
         f"the start; cadenza `src/` at {m['cadenza_commit']} (HEAD {m['head']})."),
    ]
    for app in p["apps"]:
        parts += [f"#### {app}", results_table(res["rows"], app)]
    parts.append("Medians over the rounds. ¹ the median over the rounds of cadenza-preload's tree PSS ÷ "
                 "the other mode's in the same round. ² the process that imported the app before forking: "
                 "cadenza's preloader, gunicorn's master.")
    parts += ["#### Targets", verdict_table(res["verdicts"])]
    return "\n\n".join(parts) + "\n"


def update_docs(block: str, docs: Path, begin: str, end: str) -> None:
    text = docs.read_text()
    if begin not in text or end not in text:
        sys.exit(f"{docs} has no {begin} ... {end} block; add one to its \"Memory\" section")
    head, _, rest = text.partition(begin)
    _, _, tail = rest.partition(end)
    docs.write_text(f"{head}{begin}\n{block}{end}{tail}")
