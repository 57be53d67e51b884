#!/usr/bin/env bash
# make k8s-check: render every overlay and check it, offline once the tools
# are installed (they are installed here, idempotently, under target/k8s-tools).
#
#   1. kustomize (sigs.k8s.io/kustomize/kustomize/v5, pinned, built with this
#      machine's Go) renders deploy/k8s/overlays/<region> into
#      target/k8s/<region>.yaml.
#   2. Built-in objects strictly against the Kubernetes $K8S_VERSION schemas
#      (kubernetes-validate --strict), the ScaledObject against
#      tools/schemas/, plus the project's own consistency checks
#      (tools/validate.py).
#   3. ServiceMonitor and PrometheusRule against the Prometheus Operator's Go
#      types, decoded strictly (tools/crdcheck).
#   4. The PrometheusRule's rules equal deploy/prometheus/regionsync.rules.yml
#      (promtool-tested by make rules-test) plus a runbook_url per alert into
#      docs/RUNBOOK.md; the committed base/prometheusrule.yaml is what the
#      generator writes; promtool check rules on the rendered rules.
#   5. The rendered ConfigMap's regionsync.toml passes `regionsync
#      check-config`, with the PostgreSQL password file at the manifest's
#      path (in a private mount namespace).
#   6. checkov on the rendered manifests and the Dockerfile: no failed check;
#      each skipped one is listed with its reason (written next to it).
# Every check is also shown to fail on a broken copy (self-tests).
# --tools-only: install the tools and stop (make k8s-rules uses it).
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
K8S_VERSION=1.33.0
KUSTOMIZE_VERSION=v5.8.0
TOOLS=$ROOT/target/k8s-tools
OUT=$ROOT/target/k8s
export PATH="$TOOLS/bin:$PATH:/usr/local/go/bin"
start=$(date +%s)
say() { echo "[k8s-check] $*"; }
fail() { echo "[k8s-check] FAIL: $*" >&2; exit 1; }
mkdir -p "$TOOLS/bin" "$OUT"

# --- tools ---------------------------------------------------------------------
if ! "$TOOLS/bin/kustomize" version 2>/dev/null | grep -qx "$KUSTOMIZE_VERSION"; then
  say "building kustomize $KUSTOMIZE_VERSION with $(go version | cut -d' ' -f3)"
  GOBIN="$TOOLS/bin" GOFLAGS=-mod=mod GOTOOLCHAIN=local \
    go install "sigs.k8s.io/kustomize/kustomize/v5@$KUSTOMIZE_VERSION"
fi
# crdcheck: go.mod/go.sum pin the Prometheus Operator types; Go's build cache
# makes this a no-op when nothing changed.
(cd deploy/k8s/tools/crdcheck && GOTOOLCHAIN=local go build -o "$TOOLS/bin/crdcheck" .)
REQ=deploy/k8s/tools/requirements.txt
if ! cmp -s "$REQ" "$TOOLS/venv/requirements.installed" 2>/dev/null; then
  say "installing $(grep -v '^#' $REQ | tr '\n' ' ')into $TOOLS/venv"
  rm -rf "$TOOLS/venv"
  python3 -m venv "$TOOLS/venv"
  "$TOOLS/venv/bin/pip" install -q --disable-pip-version-check -r "$REQ"
  cp "$REQ" "$TOOLS/venv/requirements.installed"
fi
PY="$TOOLS/venv/bin/python"
if ! command -v promtool >/dev/null; then
  say "installing Debian's prometheus (promtool)"
  policy=/usr/sbin/policy-rc.d created=
  if [ ! -e $policy ]; then printf '#!/bin/sh\nexit 101\n' >$policy; chmod +x $policy; created=1; fi
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null
  if [ -n "$created" ]; then rm -f $policy; fi
fi
[ "${1:-}" = --tools-only ] && exit 0
# The debug binary, for check-config (a no-op in make test, where the tests
# before this built it).
cargo build -q --bin regionsync
say "tools ready ($(( $(date +%s) - start )) s)"

# --- 1. render -------------------------------------------------------------------
regions=()
rm -f "$OUT"/*.yaml "$OUT"/*.yml "$OUT"/*.toml
for dir in deploy/k8s/overlays/*/; do
  region=$(basename "$dir")
  kustomize build "$dir" >"$OUT/$region.yaml"
  regions+=("$region")
done
[ ${#regions[@]} -ge 3 ] || fail "expected at least 3 overlays, found ${#regions[@]}"
files=("${regions[@]/#/$OUT/}"); files=("${files[@]/%/.yaml}")
say "rendered ${regions[*]} into target/k8s/"

# The checks below run without a network (unshare -n): offline for real.
offline() { unshare -n "$@"; }

# --- 2. schemas and consistency --------------------------------------------------
offline "$PY" deploy/k8s/tools/validate.py --k8s-version "$K8S_VERSION" "${files[@]}"

# --- 3. CRD objects ----------------------------------------------------------------
offline crdcheck "${files[@]}"
"$PY" - "$OUT/${regions[0]}.yaml" "$OUT/selftest-crd.yaml" <<'PY'
import sys, yaml
docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]
for d in docs:
    if d["kind"] == "ServiceMonitor":
        d["spec"]["endpoints"][0]["scrapeIntervall"] = "15s"
yaml.safe_dump_all(docs, open(sys.argv[2], "w"))
PY
if offline crdcheck "$OUT/selftest-crd.yaml" >/dev/null 2>&1; then
  fail "self-test: crdcheck accepted a ServiceMonitor with an unknown field"
fi
rm -f "$OUT/selftest-crd.yaml"
say "self-test: crdcheck rejects an unknown ServiceMonitor field"

# --- 4. rules ------------------------------------------------------------------------
"$PY" deploy/k8s/tools/gen_prometheusrule.py --check
"$PY" deploy/k8s/tools/check_rules.py "${files[@]}"
for r in "${regions[@]}"; do
  promtool check rules "$OUT/$r.rules.yml" >/dev/null || fail "promtool check rules $OUT/$r.rules.yml"
done
say "promtool check rules: rendered rules of ${#regions[@]} overlays pass"
"$PY" - "$OUT/${regions[0]}.yaml" "$OUT/selftest-rules.yaml" <<'PY'
import sys, yaml
docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]
changed = 0
for d in docs:
    if d["kind"] == "PrometheusRule":
        for g in d["spec"]["groups"]:
            for r in g["rules"]:
                if r.get("alert") == "RegionsyncReplicationLagHigh":
                    r["expr"] = r["expr"].replace("> 30", "> 31")
                    changed += 1
assert changed == 1, "self-test: no RegionsyncReplicationLagHigh to change"
yaml.safe_dump_all(docs, open(sys.argv[2], "w"))
PY
if "$PY" deploy/k8s/tools/check_rules.py "$OUT/selftest-rules.yaml" >/dev/null; then
  fail "self-test: a changed alert threshold was not detected"
fi
rm -f "$OUT"/selftest-rules.*
say "self-test: a changed threshold in the PrometheusRule is detected"

# --- 5. check-config -----------------------------------------------------------------
for r in "${regions[@]}"; do
  "$PY" -c 'import sys,yaml
for d in yaml.safe_load_all(open(sys.argv[1])):
    if d and d["kind"] == "ConfigMap": sys.stdout.write(d["data"]["regionsync.toml"])' \
    "$OUT/$r.yaml" >"$OUT/$r.regionsync.toml"
done
sed 's/^region = .*/region = "nowhere-1"/' "$OUT/${regions[0]}.regionsync.toml" >"$OUT/selftest.regionsync.toml"
pwfile=$(grep -E '^password_file *=' "$OUT/${regions[0]}.regionsync.toml" | sed -E 's/.*= *"(.*)"/\1/')
case "$pwfile" in /var/run/*|/run/*) ;; *) fail "password_file $pwfile is not under /run";; esac
pwfile=/run/${pwfile#/var/run/}; pwfile=/run/${pwfile#/run/}
# A private mount namespace with an empty /run holding the Secret's file at
# the manifest's path, as the pod sees it; a clean environment, no network.
unshare -m -n --propagation private bash -euo pipefail -c '
  pw=$1 bin=$2 out=$3; shift 3
  mount -t tmpfs -o size=1m tmpfs /run
  mkdir -p "$(dirname "$pw")"; printf "not-the-password" >"$pw"
  for r in "$@"; do
    env -i PATH=/usr/bin:/bin "$bin" --config "$out/$r.regionsync.toml" check-config
  done
  if env -i PATH=/usr/bin:/bin "$bin" --config "$out/selftest.regionsync.toml" check-config >/dev/null 2>&1; then
    echo "[k8s-check] FAIL: self-test: check-config accepted a region outside the region list" >&2; exit 1
  fi
  rm -f "$pw"
  if env -i PATH=/usr/bin:/bin "$bin" --config "$out/$1.regionsync.toml" check-config >/dev/null 2>&1; then
    echo "[k8s-check] FAIL: self-test: check-config accepted a missing password file" >&2; exit 1
  fi
' _ "$pwfile" "$ROOT/target/debug/regionsync" "$OUT" "${regions[@]}"
rm -f "$OUT/selftest.regionsync.toml"
say "check-config: every rendered config is valid; a bad region and a missing password file are refused"

# --- 6. security scan ----------------------------------------------------------------
scan() {  # framework, report, files...
  local framework=$1 report=$2; shift 2
  local args=(); for f in "$@"; do args+=(-f "$f"); done
  offline "$TOOLS/venv/bin/checkov" "${args[@]}" --framework "$framework" --skip-download \
    --compact -o json >"$report" 2>"$report.err" || true
  "$PY" - "$report" "$framework" <<'PY'
import json, sys
data = json.load(open(sys.argv[1]))
reports = data if isinstance(data, list) else [data]
failed = 0
for rep in reports:
    res = rep.get("results", {})
    s = rep.get("summary", {})
    for c in res.get("failed_checks", []):
        failed += 1
        print(f"[k8s-check] FAIL checkov {c['check_id']} {c['check_name']}: {c.get('resource')} ({c.get('file_path')})")
    skips = {}
    for c in res.get("skipped_checks", []):
        reason = (c.get("check_result") or {}).get("suppress_comment", "")
        if not reason.strip():
            failed += 1
            print(f"[k8s-check] FAIL checkov {c['check_id']} skipped without a reason: {c.get('resource')}")
        skips.setdefault((c["check_id"], c.get("resource"), reason), []).append(c.get("file_path", ""))
    for (cid, resource, reason), where in skips.items():
        print(f"[k8s-check]   skipped {cid} on {resource} ({len(where)} file(s)): {reason}")
    print(f"[k8s-check] checkov {sys.argv[2]}: {s.get('passed', 0)} passed, {s.get('failed', 0)} failed, {s.get('skipped', 0)} skipped")
    if s.get("passed", 0) == 0:
        failed += 1
        print("[k8s-check] FAIL checkov ran no check")
if not reports:
    failed += 1
    print("[k8s-check] FAIL checkov produced no report")
sys.exit(1 if failed else 0)
PY
}
scan kubernetes "$OUT/checkov-kubernetes.json" "${files[@]}" || fail "checkov: failed checks in the manifests"
scan dockerfile "$OUT/checkov-dockerfile.json" Dockerfile || fail "checkov: failed checks in the Dockerfile"
# Self-test: the same Deployment with a writable root filesystem must fail.
"$PY" - "$OUT/${regions[0]}.yaml" "$OUT/selftest-scan.yaml" <<'PY'
import sys, yaml
docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d and d["kind"] == "Deployment"]
docs[0]["spec"]["template"]["spec"]["containers"][0]["securityContext"]["readOnlyRootFilesystem"] = False
yaml.safe_dump_all(docs, open(sys.argv[2], "w"))
PY
if scan kubernetes "$OUT/selftest-scan.json" "$OUT/selftest-scan.yaml" >/dev/null; then
  fail "self-test: checkov passed a Deployment with a writable root filesystem"
fi
rm -f "$OUT"/selftest-scan.*
say "self-test: checkov fails a Deployment with a writable root filesystem"

say "all checks passed in $(( $(date +%s) - start )) s; manifests in target/k8s/"
