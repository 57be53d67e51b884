#!/usr/bin/env python3
"""The rendered PrometheusRule of each overlay must carry exactly the rules
that `make rules-test` checks with promtool (deploy/prometheus/regionsync.rules.yml),
plus one runbook_url per alert that points at a section of docs/RUNBOOK.md.

    check_rules.py target/k8s/<region>.yaml ...

Writes each rendered rule set to target/k8s/<region>.rules.yml for
`promtool check rules`. Exit 1 naming every rule that differs.
"""

import os
import re
import sys

import yaml

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", ".."))
SOURCE = os.path.join(ROOT, "deploy", "prometheus", "regionsync.rules.yml")
RUNBOOK = os.path.join(ROOT, "docs", "RUNBOOK.md")


def rule_id(rule):
    return rule.get("alert") or rule.get("record")


def anchors(markdown):
    """GitHub-style anchors of the Markdown headings."""
    out = set()
    for line in markdown.splitlines():
        m = re.match(r"^#{1,6}\s+(.*?)\s*$", line)
        if m:
            a = re.sub(r"[^\w\- ]", "", m.group(1).lower()).replace(" ", "-")
            out.add(a)
    return out


def main():
    with open(SOURCE) as f:
        source = yaml.safe_load(f)["groups"]
    with open(RUNBOOK) as f:
        runbook_anchors = anchors(f.read())
    failed = False
    for path in sys.argv[1:]:
        with open(path) as f:
            rules = [o for o in yaml.safe_load_all(f) if o and o.get("kind") == "PrometheusRule"]
        problems = []
        if len(rules) != 1:
            problems.append(f"expected one PrometheusRule, found {len(rules)}")
        else:
            groups = rules[0]["spec"]["groups"]
            stripped = []
            bases = set()
            for g in groups:
                sg = dict(g)
                sg["rules"] = []
                for r in g.get("rules", []):
                    r = dict(r)
                    if "alert" in r:
                        ann = dict(r.get("annotations", {}))
                        url = ann.pop("runbook_url", None)
                        if not url:
                            problems.append(f"alert {r['alert']}: no runbook_url")
                        else:
                            base, _, anchor = url.partition("#")
                            bases.add(base)
                            if not base.endswith("/docs/RUNBOOK.md"):
                                problems.append(f"alert {r['alert']}: runbook_url {url} is not docs/RUNBOOK.md")
                            if anchor != r["alert"].lower() or anchor not in runbook_anchors:
                                problems.append(f"alert {r['alert']}: docs/RUNBOOK.md has no section #{anchor}")
                        r["annotations"] = ann
                    sg["rules"].append(r)
                stripped.append(sg)
            if len(bases) > 1:
                problems.append(f"runbook_url bases differ: {sorted(bases)}")
            if stripped != source:
                problems.append("rules differ from deploy/prometheus/regionsync.rules.yml (run make k8s-rules):")
                src = {(g["name"], rule_id(r)): r for g in source for r in g["rules"]}
                got = {(g["name"], rule_id(r)): r for g in stripped for r in g["rules"]}
                for k in sorted(set(src) | set(got), key=str):
                    if src.get(k) != got.get(k):
                        what = "missing" if k not in got else "extra" if k not in src else "changed"
                        problems.append(f"  {what}: group {k[0]}, rule {k[1]}")
                if [g["name"] for g in source] != [g["name"] for g in stripped]:
                    problems.append("  group names or order differ")
            out = path[: -len(".yaml")] + ".rules.yml"
            with open(out, "w") as f:
                yaml.safe_dump({"groups": groups}, f, sort_keys=False, width=100)
        if problems:
            failed = True
            for p in problems:
                print(f"FAIL {path}: {p}")
        else:
            n = sum(len(g["rules"]) for g in source)
            print(f"ok   {path}: PrometheusRule = regionsync.rules.yml ({n} rules) + runbook_url per alert")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
