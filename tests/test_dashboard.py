"""deploy/grafana/cadenza.json against the metrics the master exposes.

Every metric a panel, an annotation or a template variable asks for must be a family of
`cadenza.daemon.metrics.FAMILIES`, used as its type allows (rate() of a counter, quantiles of a
histogram's buckets), with only the labels and label values the exposition carries: a dashboard
whose query names a metric nobody exports draws an empty panel and says nothing.
"""
from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

DASHBOARD = Path(__file__).resolve().parent.parent / "deploy" / "grafana" / "cadenza.json"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}

# The exposition's families by panel theme, and each family's labels (DESIGN §9). Canary
# figures have no panel yet.
THEMES = {
    "generations": {"cadenza_generation_info", "cadenza_generation_main",
                    "cadenza_generation_workers", "cadenza_generation_ready_seconds",
                    "cadenza_generation_start_time_seconds", "cadenza_generations_total"},
    "upgrades": {"cadenza_upgrades_total", "cadenza_upgrade_duration_seconds"},
    "restarts": {"cadenza_worker_restarts_total"},
    "requests and errors": {"cadenza_http_requests_total", "cadenza_http_responses_total",
                            "cadenza_http_request_duration_seconds"},
}
GEN = {"generation", "release"}
LABELS = {
    "cadenza_generation_info": GEN | {"state"},
    "cadenza_generation_main": GEN,
    "cadenza_generation_workers": GEN | {"state"},
    "cadenza_generation_ready_seconds": GEN,
    "cadenza_generation_start_time_seconds": GEN,
    "cadenza_http_requests_total": GEN | {"worker"},
    "cadenza_http_responses_total": GEN | {"worker", "code"},
    "cadenza_http_request_duration_seconds": GEN | {"worker"},
    "cadenza_worker_restarts_total": {"cause"},
    "cadenza_upgrades_total": {"outcome"},
    "cadenza_upgrade_duration_seconds": set(),
    "cadenza_generations_total": set(),
}
VALUES = {
    ("cadenza_generation_info", "state"): {"serving", "upgrading", "committed", "leaving",
                                           "stopping", "starting", "canary", "warm"},
    ("cadenza_generation_workers", "state"): {"starting", "ready", "draining"},
    ("cadenza_http_responses_total", "code"): {"1xx", "2xx", "3xx", "4xx", "5xx"},
    ("cadenza_worker_restarts_total", "cause"): {"exit", "signal", "watchdog", "timeout",
                                                 "recycled", "memory", "restart"},
    ("cadenza_upgrades_total", "outcome"): {"ok", "failed", "refused", "rolled_back"},
}
TARGET_LABELS = {"job", "instance"}   # added by Prometheus to every scraped series
SUFFIXES = ("_bucket", "_sum", "_count")
MACROS = ("$__rate_interval", "$__interval", "$__range")

NAME = re.compile(r"\bcadenza_[a-z_]+")
SELECTOR = re.compile(r"\b(cadenza_[a-z_]+)\s*(?:\{([^}]*)\})?")
MATCHER = re.compile(r'\s*([A-Za-z_]\w*)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"\s*(?:,|$)')
MATCHERS = re.compile(r'(?:\s*[A-Za-z_]\w*\s*(?:=~|!~|!=|=)\s*"(?:[^"\\]|\\.)*"\s*(?:,|$))*\s*')
STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
LEGEND = re.compile(r"\{\{\s*(\w+)\s*\}\}")
LABEL_VALUES = re.compile(r"^label_values\((.*),\s*(\w+)\)$")
VARIABLE = re.compile(r"\$\{?(\w+)")


def load() -> dict:
    return json.loads(DASHBOARD.read_text())


def panels(dashboard: dict) -> list[dict]:
    """Every panel, those inside collapsed rows too; rows themselves only group."""
    found = []
    for panel in dashboard["panels"]:
        found.extend(panel.get("panels", []))
        if panel["type"] != "row":
            found.append(panel)
    return found


def queries(dashboard: dict) -> list[tuple[str, str, str, str]]:
    """(where, PromQL, label templates, "panel"|"annotation"|"variable") of every query."""
    out = []
    for panel in panels(dashboard):
        for target in panel.get("targets", []):
            out.append((f"panel {panel['id']} {panel['title']!r} target {target['refId']}",
                        target["expr"], target.get("legendFormat", ""), "panel"))
    for note in dashboard["annotations"]["list"]:
        if note.get("datasource", {}).get("type") == "prometheus":
            labels = "".join(f"{{{{{key}}}}}" for key in note.get("tagKeys", "").split(",") if key)
            out.append((f"annotation {note['name']!r}", note["expr"],
                        note.get("titleFormat", "") + note.get("textFormat", "") + labels,
                        "annotation"))
    for var in dashboard["templating"]["list"]:
        if var["type"] == "query":
            query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
            call = LABEL_VALUES.match(query)
            assert call, f"variable {var['name']!r}: {query!r} is not label_values(selector, label)"
            out.append((f"variable {var['name']!r}", call.group(1),
                        f"{{{{{call.group(2)}}}}}", "variable"))
    return out


def family(name: str) -> str:
    """A histogram's series name mapped back to its family: _bucket/_sum/_count stripped."""
    for suffix in SUFFIXES:
        if name.endswith(suffix) and name[: -len(suffix)] in LABELS:
            return name[: -len(suffix)]
    return name


def allowed_labels(expr: str) -> set[str]:
    names = NAME.findall(expr)
    labels = set(TARGET_LABELS)
    for name in names:
        labels |= LABELS.get(family(name), set())
        if name.endswith("_bucket"):
            labels.add("le")
    return labels


def arguments(expr: str, function: str) -> list[str]:
    """The text inside each call of `function` in expr, by matching its parentheses."""
    found = []
    for start in re.finditer(rf"\b{function}\s*\(", expr):
        depth, i = 1, start.end()
        while depth and i < len(expr):
            depth += {"(": 1, ")": -1}.get(expr[i], 0)
            i += 1
        found.append(expr[start.end(): i - 1])
    return found


def balance_problem(expr: str) -> str | None:
    stack = []
    for i, ch in enumerate(STRING.sub('""', expr)):
        if ch in "([{":
            stack.append(ch)
        elif ch in ")]}" and (not stack or "([{"[")]}".index(ch)] != stack.pop()):
            return f"unmatched {ch!r} at {i}"
    return f"unclosed {stack[-1]!r}" if stack else None


def families_module():
    # Imported here, not at the top: the other checks do not need the master's module.
    from cadenza.daemon.metrics import FAMILIES
    return FAMILIES


def test_dashboard_imports_into_grafana_with_any_prometheus():
    dashboard = load()
    assert dashboard["schemaVersion"] >= 36 and dashboard["uid"] and dashboard["title"]
    assert dashboard.get("id") is None, "a fixed id makes an import overwrite another dashboard"
    variables = {var["name"]: var for var in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for name in ("job", "instance"):
        assert variables[name]["type"] == "query"
        assert variables[name]["datasource"] == DATASOURCE
    assert "label_values(cadenza_generation_info" in variables["instance"]["definition"]
    ids = [panel["id"] for panel in dashboard["panels"]] + [
        inner["id"] for panel in dashboard["panels"] for inner in panel.get("panels", [])]
    assert len(ids) == len(set(ids)), f"panel ids repeat: {sorted(ids)}"
    for panel in panels(dashboard):
        where = f"panel {panel['id']} {panel['title']!r}"
        assert panel.get("datasource") == DATASOURCE, f"{where}: datasource {panel.get('datasource')}"
        assert panel.get("targets"), f"{where} has no query"
        refs = [target["refId"] for target in panel["targets"]]
        assert len(refs) == len(set(refs)), f"{where}: refIds repeat: {refs}"
        for target in panel["targets"]:
            assert target.get("datasource") == DATASOURCE, f"{where}: target {target['refId']}"
            assert target.get("expr", "").strip(), f"{where}: target {target['refId']} is empty"
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, f"{where} is wider than the dashboard: {grid}"


def test_every_metric_is_a_family_of_the_exposition_used_as_its_type_allows():
    families = families_module()
    for where, expr, _, _ in queries(load()):
        names = NAME.findall(expr)
        assert names, f"{where}: {expr!r} asks for no cadenza metric"
        for name in names:
            base = name
            for suffix in SUFFIXES:
                if name.endswith(suffix) and families.get(name[: -len(suffix)]) == "histogram":
                    base = name[: -len(suffix)]
            assert base in families, (
                f"{where}: {name!r} is not a family of cadenza.daemon.metrics.FAMILIES "
                f"(families: {sorted(families)}); rename the query or export the family")
            if families[base] == "histogram":
                assert base != name, f"{where}: {name!r} is a histogram: ask for _bucket/_sum/_count"
        for function in ("rate", "irate", "increase"):
            for argument in arguments(expr, function):
                for name in NAME.findall(argument):
                    kind = "histogram" if name.endswith(SUFFIXES) else families.get(name)
                    assert kind in ("counter", "histogram"), (
                        f"{where}: {function}() of {name!r}, a {kind}: only counters count up")
        for argument in arguments(expr, "histogram_quantile"):
            buckets = [name for name in NAME.findall(argument) if name.endswith("_bucket")]
            assert buckets, f"{where}: histogram_quantile() over no _bucket series: {argument!r}"
            grouped = [set(group.replace(" ", "").split(",")) for group in GROUPING.findall(argument)]
            assert any("le" in group for group in grouped), (
                f"{where}: histogram_quantile() needs the buckets summed by (..., le)")


def test_every_family_of_the_four_themes_has_a_panel():
    families = families_module()
    on_panels = {family(name) for _, expr, _, kind in queries(load()) if kind == "panel"
                 for name in NAME.findall(expr)}
    for theme, names in THEMES.items():
        missing = sorted(name for name in names if name in families and name not in on_panels)
        assert not missing, f"the {theme} panels leave out {missing}"


def test_queries_use_only_the_labels_and_values_the_exposition_carries():
    dashboard = load()
    defined = {var["name"] for var in dashboard["templating"]["list"]}
    for where, expr, legend, kind in queries(dashboard):
        allowed = allowed_labels(expr)
        for name, braces in SELECTOR.findall(expr):
            assert family(name) in LABELS, f"{where}: {name!r} has no labels in this test's contract"
            assert MATCHERS.fullmatch(braces), f"{where}: unreadable matchers {{{braces}}}"
            matchers = MATCHER.findall(braces)
            if kind != "variable":
                # So the job and instance pickers narrow every panel and annotation.
                assert {("job", "=~", "$job"), ("instance", "=~", "$instance")} <= set(matchers), (
                    f'{where}: {name} lacks job=~"$job", instance=~"$instance"')
            for label, op, value in matchers:
                assert label in allowed, f"{where}: {name} has no label {label!r}"
                known = VALUES.get((family(name), label))
                if known is None or "$" in value:
                    continue
                parts = value.split("|") if op in ("=~", "!~") and re.fullmatch(r"[\w|]+", value) \
                    else [value] if op in ("=", "!=") else []
                for part in parts:
                    assert part in known, f"{where}: {name}{{{label}={part!r}}}: not one of {sorted(known)}"
        for group in GROUPING.findall(STRING.sub('""', expr)):
            for label in filter(None, (part.strip() for part in group.split(","))):
                assert label in allowed, f"{where}: groups by {label!r}, which {expr!r} does not carry"
        for label in LEGEND.findall(legend):
            assert label in allowed, f"{where}: legend or title shows {{{{{label}}}}}, not a label here"
        for name in VARIABLE.findall(expr):
            assert name.startswith("__") or name in defined, f"{where}: ${name} is not a variable"


def as_promql(expr: str) -> str:
    """What Grafana sends, with the range macros as 5m and every picker at "All" (.*)."""
    for macro in MACROS:
        expr = expr.replace(macro, "5m")
    return re.sub(r"\$\{?\w+\}?", ".*", expr)


def test_every_query_is_well_formed_promql(tmp_path):
    found = queries(load())
    for where, expr, _, _ in found:
        problem = balance_problem(expr)
        assert problem is None, f"{where}: {problem} in {expr!r}"
    promtool = shutil.which("promtool")
    if promtool is None:   # Debian's prometheus package carries it; then PromQL's own parser judges
        return
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"cadenza_dashboard:query{i}", "expr": as_promql(expr)}
        for i, (_, expr, _, _) in enumerate(found)]}]}
    path = tmp_path / "dashboard.rules.yml"
    path.write_text(json.dumps(rules, indent=1))   # JSON is YAML
    proc = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True,
                          text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr + "\n".join(
        f"query{i}: {where}" for i, (where, _, _, _) in enumerate(found))
    assert f"{len(found)} rules found" in proc.stdout, proc.stdout
