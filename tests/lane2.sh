#!/usr/bin/env bash
# make test's second lane: most of the suites that stop, freeze, kill or
# restart the stack's services (lag, failover, the whole-region failure, the
# stack's own lifecycle) run on a second local stack — its own directory
# (STACK_DIR) and ports, below — beside the suites that run on the first,
# instead of after them. Most of their time is waiting for a stall to show
# (lag past 30 s, an alert's `for:`), so the two lanes share the box well.
#
#   tests/lane2.sh start OWNER_PID   bring the second stack up and run the
#                                    suites, in the background, for as long
#                                    as process OWNER_PID (make) lives;
#                                    output in target/lane2.log
#   tests/lane2.sh wait              wait for them, print their output,
#                                    stop the second stack; exit status is
#                                    theirs
#   tests/lane2.sh env               print the lane's variables (to run one
#                                    of its suites by hand: `env $(tests/
#                                    lane2.sh env) cargo test --test lag`)
set -euo pipefail
self="$(cd "$(dirname "$0")" && pwd)/$(basename "$0")"
cd "$(dirname "$0")/.."
log=target/lane2.log
status=target/lane2.status
watcher=target/lane2.pid

# The second stack's directory and ports: each default of deploy/local/env.sh
# plus 10 (stack.sh checks that no two services share a port).
lane_env=(
  STACK_DIR=target/stack-lane2
  PG_PORT_A=15442 PG_PORT_B=25442
  KAFKA_PORT_A=19102 KAFKA_PORT_B=29102
  KAFKA_CONTROLLER_PORT_A=19103 KAFKA_CONTROLLER_PORT_B=29104 KAFKA_SASL_PORT_B=29103
  CONNECT_PORT_A=18093 CONNECT_PORT_B=28093
  REGISTRY_PORT=18091 PROMETHEUS_PORT=9100
  WORKER_METRICS_PORT_A=19474 WORKER_METRICS_PORT_B=29474
)

suites() {
  bash deploy/local/stack.sh up
  cargo test --test lag -- --test-threads=1
  cargo test --test failover -- --test-threads=1
  cargo test --test region_failure -- --test-threads=1 --nocapture
  cargo test --test stack_lifecycle
}

case "${1:-}" in
  start)
    owner="${2:?start needs the pid of the process it serves}"
    mkdir -p target
    rm -f "$status"
    echo "lane2: lag, failover, region_failure and stack_lifecycle on a second stack (STACK_DIR=target/stack-lane2), in the background; output: $log"
    (
      set +e
      export "${lane_env[@]}"
      setsid bash "$self" --suites >"$log" 2>&1 &
      runner=$!
      while kill -0 "$runner" 2>/dev/null; do
        if ! kill -0 "$owner" 2>/dev/null; then
          kill -TERM -- "-$runner" 2>/dev/null
          echo "owner $owner ended: lane stopped" >>"$log"
          wait "$runner"
          bash deploy/local/stack.sh down >>"$log" 2>&1
          echo 143 >"$status"
          exit 0
        fi
        sleep 5
      done
      wait "$runner"
      echo $? >"$status"
    ) </dev/null >/dev/null 2>&1 &
    echo $! >"$watcher"
    ;;
  --suites)
    suites
    ;;
  wait)
    pid=$(cat "$watcher" 2>/dev/null || true)
    rm -f "$watcher"
    while [ ! -s "$status" ]; do
      if [ -z "$pid" ] || ! kill -0 "$pid" 2>/dev/null; then
        [ -s "$status" ] && break
        echo "lane2: its watcher (${pid:-none}) ended without a status: was it started?" >&2
        tail -n 60 "$log" >&2 2>/dev/null || true
        exit 1
      fi
      sleep 5
    done
    rc=$(cat "$status")
    echo "lane2: ---------------- output of the second lane ($log) ----------------"
    cat "$log"
    echo "lane2: ---------------- end of the second lane: exit $rc ----------------"
    env "${lane_env[@]}" bash deploy/local/stack.sh down
    exit "$rc"
    ;;
  env)
    echo "${lane_env[@]}"
    ;;
  *)
    echo "usage: tests/lane2.sh start OWNER_PID | wait | env" >&2
    exit 2
    ;;
esac
