"""The targets and the markdown of the request-path benchmark (engine.py), from its results."""
from __future__ import annotations

import json
import sys

from common import REPO
from report import _n, table

DOCS = REPO / "docs" / "benchmarks.md"
BEGIN, END = "<!-- engine-results-begin -->", "<!-- engine-results-end -->"
PEER = {"wsgi": "gunicorn", "asgi": "uvicorn"}
TARGET_RATIO = {"wsgi": 1.2, "asgi": 1.0}


def verdicts(rows: list[dict]) -> list[dict]:
    """The targets, per cell, for cadenza with its default engine."""
    out = []
    cells = {(r["interface"], r["workers"], r["mode"]): {} for r in rows}
    for r in rows:
        cells[(r["interface"], r["workers"], r["mode"])][r["contender"]] = r
    for (interface, workers, mode), by_key in cells.items():
        cz, peer = by_key.get("cadenza", {}), by_key.get(PEER[interface], {})
        v = {"interface": interface, "workers": workers, "mode": mode, "peer": PEER[interface],
             "target_ratio": TARGET_RATIO[interface]}
        if cz.get("rps") is None or peer.get("rps") is None:
            missing = "cadenza" if cz.get("rps") is None else PEER[interface]
            why = (cz if missing == "cadenza" else peer).get("unavailable") or "no measurement"
            v.update(ratio=None, ratio_verdict=f"not measured ({missing}: {why[:100]})",
                     p99_verdict="not measured", errors_verdict="not measured")
            if cz.get("rps") is not None:
                v["errors"] = cz["socket_errors"] + cz["non2xx"]
                v["errors_verdict"] = "PASS" if v["errors"] == 0 else f"MISS: {v['errors']} errors"
            out.append(v)
            continue
        ratio, target = cz["ratio"], TARGET_RATIO[interface]
        v["ratio"] = ratio
        if ratio is not None and ratio >= target:
            v["ratio_verdict"] = "PASS"
        elif ratio is not None:
            v["ratio_verdict"] = f"MISS: {ratio:.2f} ×, {(target / ratio - 1) * 100:.0f} % more req/s needed"
        else:
            v["ratio_verdict"] = "not measured (no round with both)"
        v["p99_ms"], v["peer_p99_ms"] = cz["p99_ms"], peer["p99_ms"]
        if cz["p99_ms"] is None or peer["p99_ms"] is None:
            v["p99_verdict"] = "not measured"
        elif cz["p99_ms"] <= peer["p99_ms"]:
            v["p99_verdict"] = "PASS"
        else:
            v["p99_verdict"] = (f"MISS: +{cz['p99_ms'] - peer['p99_ms']:.2f} ms "
                                f"({cz['p99_ms'] / peer['p99_ms']:.2f} × the peer's)")
        v["errors"] = cz["socket_errors"] + cz["non2xx"]
        v["errors_verdict"] = "PASS" if v["errors"] == 0 else (
            f"MISS: {cz['socket_errors']} socket errors "
            f"(c/r/w/t {cz['connect']}/{cz['read']}/{cz['write']}/{cz['timeout']}), {cz['non2xx']} non-2xx")
        out.append(v)
    return out


def results_table(rows: list[dict], interface: str) -> str:
    peer = PEER[interface]
    body = []
    for r in rows:
        if r["interface"] != interface:
            continue
        name = f"**{r['label']}**" if r["contender"] == "cadenza" else r["label"]
        if r.get("rps") is None:
            body.append([r["workers"], r["mode"], name, f"not available: {(r['unavailable'] or '')[:200]}",
                         None, None, None, None, None])
            continue
        if r.get("mismatch"):
            name += f" ⚠ {r['mismatch']}"
        ratio = "1" if r["contender"] == peer else _n(r["ratio"], 2)
        body.append([r["workers"], r["mode"], name, _n(r["rps"]), ratio, r["p50_ms"], r["p99_ms"],
                     f"{r['connect']}/{r['read']}/{r['write']}/{r['timeout']}", r["non2xx"]])
    return table(["workers", "connections", "server", "req/s (median)", f"× {peer}¹", "p50 ms", "p99 ms",
                  "socket errors c/r/w/t", "non-2xx"], body)


def verdict_table(vs: list[dict]) -> str:
    body = []
    for v in vs:
        p99 = (f"{v['p99_ms']} / {v['peer_p99_ms']}" if v.get("p99_ms") is not None
               and v.get("peer_p99_ms") is not None else None)
        body.append([f"{v['interface'].upper()}, {v['workers']} workers, {v['mode']}",
                     f"≥ {v['target_ratio']:.1f} × {v['peer']}", _n(v.get("ratio"), 2),
                     _bold(v["ratio_verdict"]), p99, _bold(v["p99_verdict"]), v.get("errors"),
                     _bold(v["errors_verdict"])])
    return table(["cell", "req/s target", "measured", "verdict", "p99 ms cadenza / peer", "verdict",
                  "errors", "verdict"], body)


def _bold(verdict: str) -> str:
    head, sep, rest = verdict.partition(":")
    return f"**{head}**{sep}{rest}" if head in ("PASS", "MISS") else verdict


def tally(vs: list[dict]) -> str:
    keys = ("ratio_verdict", "p99_verdict", "errors_verdict")
    verdict = [v[k] for v in vs for k in keys]
    passed = sum(x == "PASS" for x in verdict)
    missed = sum(x.startswith("MISS") for x in verdict)
    return (f"{passed} of {len(verdict)} checks PASS, {missed} MISS, "
            f"{len(verdict) - passed - missed} not measured.")


def markdown(res: dict) -> str:
    """The results block of docs/benchmarks.md's "Request path" section."""
    m, p = res["machine"], res["params"]
    variants = []
    for key in ("cadenza", "cadenza-h11"):
        got = res["cadenza_http"].get(key)
        variants.append(f"`{key}`: " + (f"not available ({got['unavailable'][:300]})" if "unavailable" in got
                                        else f"[http] {json.dumps(got['http']) if got['http'] else '(none)'}"))
    said = sorted({f"{r['contender']} ({r['interface']}): {', '.join(r['said']) or 'not stated'}"
                   for r in res["rows"] if r.get("said") is not None})
    loaded = sorted({f"{r['contender']} ({r['interface']}): {'+'.join(r['loaded']) or 'neither'}"
                     for r in res["rows"] if r.get("loaded") is not None})
    parts = [
        f"Run of {res['date']} ({res['mode']}: {p['rounds']} rounds of {p['duration']} s per server and "
        f"cell, warm-up {p['warmup']} s per start; {res['run_seconds']:.0f} s in all), "
        f"command `{res['command']}`.",
        f"{m['nproc']} × {m['cpu']}, {m['mem_gb']} GB, Linux {m['kernel']}, Python {m['python']}; "
        f"{m['gunicorn']}, uvicorn {m['uvicorn']}, granian {m['granian']}, httptools {m['httptools']}, "
        f"uvloop {m['uvloop']}, {m['wrk'].split(' Copyright')[0]}; load average {' '.join(m['loadavg_at_start'])} "
        f"at the start; cadenza `src/` at {m['cadenza_commit']} (HEAD {m['head']}).",
        "cadenza's configs: " + "; ".join(variants) + ".",
    ]
    if said:
        parts.append("The engine cadenza's workers said they serve with: " + "; ".join(said) + ".")
    if loaded:
        parts.append("httptools and uvloop mapped by the workers (/proc/PID/maps): " + "; ".join(loaded) + ".")
    for interface in res["params"]["interfaces"]:
        parts += [f"#### {interface.upper()} (`engine_apps:{interface}`)", results_table(res["rows"], interface)]
    parts.append("¹ the median over the rounds of req/s ÷ the peer's req/s in the same round.")
    parts += ["#### Targets (cadenza, default engine)", verdict_table(res["verdicts"]), tally(res["verdicts"])]
    return "\n\n".join(parts) + "\n"


def update_docs(block: str) -> None:
    text = DOCS.read_text()
    if BEGIN not in text or END not in text:
        sys.exit(f"{DOCS} has no {BEGIN} ... {END} block; add one to its \"Request path\" section")
    head, _, rest = text.partition(BEGIN)
    _, _, tail = rest.partition(END)
    DOCS.write_text(f"{head}{BEGIN}\n{block}{END}{tail}")
