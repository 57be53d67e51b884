#!/usr/bin/env python3
"""Writes deploy/k8s/base/prometheusrule.yaml from deploy/prometheus/regionsync.rules.yml.

The Prometheus rules have one source, the file that `make rules-test` checks
with promtool. The PrometheusRule carries its groups unchanged except for one
added annotation per alert, `runbook_url`: the runbook's base URL and the
alert's section anchor in docs/RUNBOOK.md (its name in lower case, as a
Markdown heading `## <AlertName>` is anchored).

    python3 deploy/k8s/tools/gen_prometheusrule.py           # write the file
    python3 deploy/k8s/tools/gen_prometheusrule.py --check   # exit 1 if stale

RUNBOOK_BASE_URL (environment) sets where docs/RUNBOOK.md is served; without
it the base of the runbook_url already in the committed file is kept.
"""

import os
import sys

import yaml

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", ".."))
SOURCE = os.path.join(ROOT, "deploy", "prometheus", "regionsync.rules.yml")
TARGET = os.path.join(ROOT, "deploy", "k8s", "base", "prometheusrule.yaml")
# Where docs/RUNBOOK.md is published: an example host, replaced by setting
# RUNBOOK_BASE_URL when regenerating (deploy/k8s/README.md).
DEFAULT_BASE = "https://git.example.com/regionsync/blob/main/docs/RUNBOOK.md"

HEADER = """\
# GENERATED from deploy/prometheus/regionsync.rules.yml by
# deploy/k8s/tools/gen_prometheusrule.py (make k8s-rules). Do not edit: change
# the rules file, run make k8s-rules, and commit both. make k8s-check fails
# when this file or a rendered overlay's rules differ from the rules file.
"""


def anchor(alert):
    return alert.lower()


def runbook_url(base, alert):
    return f"{base}#{anchor(alert)}"


def base_in(path):
    """The runbook base URL of an existing generated file, if any."""
    try:
        with open(path) as f:
            doc = yaml.safe_load(f)
    except FileNotFoundError:
        return None
    for group in doc.get("spec", {}).get("groups", []):
        for rule in group.get("rules", []):
            url = rule.get("annotations", {}).get("runbook_url")
            if url and "#" in url:
                return url.split("#", 1)[0]
    return None


def with_runbooks(groups, base):
    out = []
    for group in groups:
        g = dict(group)
        rules = []
        for rule in group["rules"]:
            r = dict(rule)
            if "alert" in r:
                ann = dict(r.get("annotations", {}))
                ann["runbook_url"] = runbook_url(base, r["alert"])
                r["annotations"] = ann
            rules.append(r)
        g["rules"] = rules
        out.append(g)
    return out


class Dumper(yaml.SafeDumper):
    pass


def _str(dumper, value):
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


Dumper.add_representer(str, _str)


def render(base):
    with open(SOURCE) as f:
        source = yaml.safe_load(f)
    doc = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {
            "name": "regionsync",
            "labels": {
                "app.kubernetes.io/component": "worker",
                # kube-prometheus's default ruleSelector.
                "prometheus": "k8s",
                "role": "alert-rules",
            },
        },
        "spec": {"groups": with_runbooks(source["groups"], base)},
    }
    return HEADER + yaml.dump(doc, Dumper=Dumper, sort_keys=False, width=100, allow_unicode=True)


def main():
    check = "--check" in sys.argv[1:]
    base = os.environ.get("RUNBOOK_BASE_URL") or base_in(TARGET) or DEFAULT_BASE
    text = render(base)
    if check:
        try:
            with open(TARGET) as f:
                current = f.read()
        except FileNotFoundError:
            current = ""
        if current != text:
            print(
                f"{os.path.relpath(TARGET, ROOT)} is not what {os.path.relpath(SOURCE, ROOT)} "
                "generates: run make k8s-rules and commit it",
                file=sys.stderr,
            )
            return 1
        print(f"{os.path.relpath(TARGET, ROOT)}: up to date with the rules file")
        return 0
    with open(TARGET, "w") as f:
        f.write(text)
    print(f"wrote {os.path.relpath(TARGET, ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
