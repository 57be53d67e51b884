#!/usr/bin/env bash
# `make demo`: the local two-region stack replicating live, lag visible.
#
# Brings the stack up (idempotent), starts the two regionsync workers
# (deploy/local/regionsync-<region>.toml), then runs the demo writer
# (tools/src/bin/demo) in the foreground: it writes into region A and shows the
# changes applied in region B, with the lag. Ctrl-C stops the demo; the workers
# are stopped again if this script started them, and the stack is left running
# (`make stack-down` stops it). Arguments are passed to the demo, e.g.
# `deploy/local/demo.sh --rate 200`.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
HERE="$ROOT/deploy/local"
STACK="$HERE/stack.sh"

# shellcheck source=deploy/local/env.sh
source "$HERE/env.sh"
case "$STACK_DIR" in /*) STATE="$STACK_DIR" ;; *) STATE="$ROOT/$STACK_DIR" ;; esac
PIDS="$STATE/pids"
LOGS="$STATE/logs"
# The demo reads the same addresses and the app role's password.
export REGION_A REGION_B PG_PORT_A PG_PORT_B WORKER_METRICS_PORT_A WORKER_METRICS_PORT_B APP_PASSWORD

say() { printf '[demo] %s\n' "$*"; }

worker_running() {
  local p
  p=$(cat "$PIDS/regionsync-$1.pid" 2>/dev/null || true)
  [ -n "$p" ] && kill -0 "$p" 2>/dev/null
}

bash "$STACK" up

started_workers=
for region in "$REGION_A" "$REGION_B"; do
  worker_running "$region" || started_workers=1
done

cleanup() {
  trap - EXIT INT TERM
  echo
  if [ -n "$started_workers" ]; then
    say "stopping the regionsync workers this demo started"
    bash "$STACK" workers-down || true
  else
    say "the regionsync workers were already running before the demo: left running (make workers-down stops them)"
  fi
  say "the stack is left running: 'make stack-status' shows it, 'make stack-down' stops it"
}
trap cleanup EXIT
# Ctrl-C reaches the demo too (same process group): it prints its summary and
# exits; this script then only has to clean up.
trap ':' INT
trap 'exit 143' TERM

bash "$STACK" workers-up
say "building the demo (cargo build --release -p regionsync-tools --bin demo)"
(cd "$ROOT" && cargo build -q --release -p regionsync-tools --bin demo)

cat <<INFO

  Region $REGION_A (A): PostgreSQL 127.0.0.1:$PG_PORT_A, worker http://127.0.0.1:$WORKER_METRICS_PORT_A/metrics (/healthz, /readyz)
  Region $REGION_B (B): PostgreSQL 127.0.0.1:$PG_PORT_B, worker http://127.0.0.1:$WORKER_METRICS_PORT_B/metrics (/healthz, /readyz)
  One worker's picture: target/release/regionsync status --url http://127.0.0.1:$WORKER_METRICS_PORT_B
  Prometheus:           http://127.0.0.1:$PROMETHEUS_PORT/graph?g0.expr=regionsync_replication_lag_seconds
                        alerts (deploy/prometheus rules): http://127.0.0.1:$PROMETHEUS_PORT/alerts
  Grafana dashboard:    deploy/grafana/regionsync.json (import it; metrics in METRICS.md)
  Services:             make stack-status
  Worker logs:          $LOGS/regionsync-$REGION_A.log
                        $LOGS/regionsync-$REGION_B.log

  The demo writes users and orders into $REGION_A and follows them into $REGION_B.
  Ctrl-C stops it.$([ -n "$started_workers" ] && echo " The workers started here are stopped then;" || echo " The workers were already running and stay running;") the stack stays up.

INFO

status=0
"$ROOT/target/release/demo" "$@" || status=$?
exit $status
