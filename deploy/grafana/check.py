#!/usr/bin/env python3
"""Checks deploy/grafana/regionsync.json (run by `make rules-test`).

- It is well-formed JSON with the datasource, region and source_region
  template variables, and every panel and query uses the ${datasource}
  Prometheus variable.
- Every query names only the worker's metrics (METRICS.md), Prometheus's
  `up`, or a recording rule of deploy/prometheus/*.rules.yml, and calls only
  known PromQL functions.
- Every query parses: with the Grafana variables substituted, they are
  checked by `promtool check rules` as throwaway recording rules.
"""

import glob
import json
import os
import re
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DASHBOARD = os.path.join(ROOT, "deploy/grafana/regionsync.json")
RULES = sorted(glob.glob(os.path.join(ROOT, "deploy/prometheus/*.rules.yml")))

GAUGES_AND_COUNTERS = {
    "regionsync_replication_lag_seconds",
    "regionsync_heartbeat_age_seconds",
    "regionsync_consumer_lag_messages",
    "regionsync_events_total",
    "regionsync_conflicts_total",
    "regionsync_dlq_messages_total",
    "regionsync_postgres_reconnects_total",
    "regionsync_ready",
    "up",
}
HISTOGRAMS = {
    "regionsync_end_to_end_latency_seconds",
    "regionsync_apply_batch_rows",
    "regionsync_apply_batch_seconds",
}
FUNCTIONS = {
    # aggregations
    "sum", "min", "max", "avg", "count", "group", "stddev", "stdvar", "topk",
    "bottomk", "quantile", "count_values",
    # functions
    "abs", "absent", "absent_over_time", "ceil", "clamp", "clamp_max",
    "clamp_min", "changes", "delta", "deriv", "floor", "histogram_quantile",
    "idelta", "increase", "irate", "label_replace", "label_join", "predict_linear",
    "rate", "resets", "round", "scalar", "sort", "sort_desc", "time", "timestamp",
    "vector", "avg_over_time", "min_over_time", "max_over_time", "sum_over_time",
    "count_over_time", "last_over_time", "quantile_over_time",
}
KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right",
            "bool", "and", "or", "unless", "offset", "inf", "nan"}
VARIABLES = {"datasource", "region", "source_region"}
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}


def allowed_names():
    names = set(GAUGES_AND_COUNTERS)
    for h in HISTOGRAMS:
        names |= {h + "_bucket", h + "_sum", h + "_count"}
    for path in RULES:
        with open(path, encoding="utf-8") as f:
            names |= set(re.findall(r"^\s*-?\s*record:\s*([A-Za-z_:][A-Za-z0-9_:]*)\s*$",
                                    f.read(), re.M))
    return names


def names_in(expr):
    """(metric names, function names) used by a PromQL expression."""
    e = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'', '""', expr)  # strings
    e = re.sub(r"\{[^}]*\}", "", e)                                     # matchers
    e = re.sub(r"\[[^\]]*\]", "", e)                                    # ranges
    e = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", e)
    e = re.sub(r"\boffset\s+\S+", " ", e)
    e = re.sub(r"\$\{?\w+\}?", " ", e)                                 # Grafana variables
    e = re.sub(r"(?<![A-Za-z0-9_:])[0-9][0-9.eE+-]*[a-z]*", " ", e)     # numbers, durations
    metrics, functions = set(), set()
    for m in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", e):
        word = m.group(0)
        if re.match(r"\s*\(", e[m.end():]):
            functions.add(word)
        elif word.lower() not in KEYWORDS:
            metrics.add(word)
    return metrics, functions


def substitute(expr):
    """The expression as Prometheus would receive it with every variable at All."""
    expr = expr.replace("$__rate_interval", "5m").replace("$__interval", "1m")
    return re.sub(r"\$\{?(\w+)\}?", ".*", expr)


def panels_of(items):
    for p in items:
        yield p
        yield from panels_of(p.get("panels", []))


def main():
    problems = []
    try:
        with open(DASHBOARD, encoding="utf-8") as f:
            dash = json.load(f)
    except (OSError, ValueError) as e:
        print(f"{DASHBOARD}: {e}", file=sys.stderr)
        return 1
    allowed = allowed_names()
    queries = []  # (where, expr)

    variables = {v.get("name"): v for v in dash.get("templating", {}).get("list", [])}
    if set(variables) != VARIABLES:
        problems.append(f"template variables are {sorted(variables)}, want {sorted(VARIABLES)}")
    ds = variables.get("datasource", {})
    if ds.get("type") != "datasource" or ds.get("query") != "prometheus":
        problems.append("variable datasource: want type datasource, query prometheus")
    for name in ("region", "source_region"):
        v = variables.get(name, {})
        q = v.get("query")
        q = q.get("query") if isinstance(q, dict) else q
        m = re.fullmatch(r"\s*label_values\((.*),\s*(\w+)\)\s*", q or "")
        if v.get("type") != "query" or not m or m.group(2) != name:
            problems.append(f"variable {name}: want a label_values(..., {name}) query")
        else:
            queries.append((f"variable {name}", m.group(1)))
        if v.get("datasource") != DATASOURCE:
            problems.append(f"variable {name}: datasource is not ${{datasource}}")

    ids = set()
    for p in panels_of(dash.get("panels", [])):
        title = p.get("title", "?")
        if p.get("id") in ids:
            problems.append(f"panel {title!r}: duplicate id {p.get('id')}")
        ids.add(p.get("id"))
        if p.get("type") == "row":
            continue
        if p.get("datasource") != DATASOURCE:
            problems.append(f"panel {title!r}: datasource is not ${{datasource}}")
        if not p.get("targets"):
            problems.append(f"panel {title!r}: no queries")
        for t in p.get("targets", []):
            if t.get("datasource") != DATASOURCE:
                problems.append(f"panel {title!r} query {t.get('refId')}: datasource is not ${{datasource}}")
            queries.append((f"panel {title!r} query {t.get('refId')}", t.get("expr", "")))

    for where, expr in queries:
        metrics, functions = names_in(expr)
        if not metrics:
            problems.append(f"{where}: names no metric: {expr}")
        for name in sorted(metrics - allowed):
            problems.append(f"{where}: unknown metric or recording rule {name!r}")
        for name in sorted(functions - FUNCTIONS):
            problems.append(f"{where}: unknown function {name!r}")

    # Parse every query with promtool, as recording rules of a scratch file.
    with tempfile.NamedTemporaryFile("w", suffix=".yml", encoding="utf-8") as f:
        rules = [{"record": f"dashboard_query_{i}", "expr": substitute(e)}
                 for i, (_, e) in enumerate(queries)]
        json.dump({"groups": [{"name": "dashboard", "rules": rules}]}, f)  # JSON is YAML
        f.flush()
        run = subprocess.run(["promtool", "check", "rules", f.name],
                             capture_output=True, text=True)
        if run.returncode != 0:
            problems.append("promtool cannot parse a query:\n" + run.stdout + run.stderr)

    for p in problems:
        print(f"{os.path.relpath(DASHBOARD, ROOT)}: {p}", file=sys.stderr)
    if problems:
        return 1
    print(f"{os.path.relpath(DASHBOARD, ROOT)}: {len(ids)} panels, {len(queries)} queries OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
