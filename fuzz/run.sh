#!/usr/bin/env bash
# make fuzz: each decoder's fuzz target (fuzz/fuzz_targets/) for a fixed
# time, from the seeds in fuzz/seeds/ (real change events) and whatever
# fuzz/corpus/ holds from earlier runs. Installs cargo-fuzz on first use
# (into ~/.cargo/bin). A crash, a hang (one input over 10 s) or an input
# taking over 2 GB fails the run; libFuzzer writes it to
# fuzz/artifacts/<target>/ — fix the cause and keep the input as a unit
# test (fuzz/README.md).
#
#   fuzz/run.sh [SECONDS_PER_TARGET]     build (if needed) and run (default 60 s)
#   fuzz/run.sh --build-background PID   start the build in the background,
#                                        at low priority, for as long as
#                                        process PID (make) lives
#   fuzz/run.sh --wait [SECONDS]         wait for that build, then run
#
# make test uses the last two: the fuzz build (nightly, its own target
# dir, ~13 min from cold) then overlaps the stack tests, which mostly wait
# on the stack, instead of adding to the suite's time.
set -euo pipefail
self="$(cd "$(dirname "$0")" && pwd)/$(basename "$0")"
cd "$(dirname "$0")"
log=target/background-build.log
status=target/background-build.status
watcher=target/background-build.pid

# Without sanitizers: the code fuzzed is safe Rust; libFuzzer still catches
# panics, aborts, stack overflows, hangs and runaway memory. With debug
# assertions: an arithmetic overflow is a crash.
flags=(--sanitizer none --debug-assertions)
targets=(decode_json decode_avro)

build() {
  command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
  for target in "${targets[@]}"; do
    cargo +nightly fuzz build "$target" "${flags[@]}"
  done
}

run() {
  local seconds="$1"
  for target in "${targets[@]}"; do
    mkdir -p "corpus/$target"
    cargo +nightly fuzz run "$target" "${flags[@]}" \
      "corpus/$target" "seeds/$target" -- \
      -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1
  done
}

case "${1:-}" in
  --build-background)
    owner="${2:?--build-background needs the pid of the process it serves}"
    mkdir -p target
    rm -f "$status"
    echo "fuzz: building the fuzz targets in the background (log: fuzz/$log)"
    (
      # Its own process group, so that the owner's exit ends all of it.
      set +e
      setsid nice -n 19 bash "$self" --build-only >"$log" 2>&1 &
      builder=$!
      while kill -0 "$builder" 2>/dev/null; do
        if ! kill -0 "$owner" 2>/dev/null; then
          kill -TERM -- "-$builder" 2>/dev/null
          echo "owner $owner ended: build stopped" >>"$log"
          wait "$builder"
          echo 143 >"$status"
          exit 0
        fi
        sleep 5
      done
      wait "$builder"
      echo $? >"$status"
    ) </dev/null >/dev/null 2>&1 &
    echo $! >"$watcher"
    ;;
  --build-only)
    # setsid gave this build a session, and so a scheduler autogroup, of
    # its own: nice within it would rank it only against itself, and the
    # group would take an equal share of the CPU beside make test's. The
    # group's own nice makes it take what the tests leave.
    echo 19 >/proc/self/autogroup 2>/dev/null || true
    build
    ;;
  --wait)
    seconds="${2:-60}"
    if [ -s "$watcher" ]; then
      pid=$(cat "$watcher")
      rm -f "$watcher"
      while [ ! -s "$status" ]; do
        if ! kill -0 "$pid" 2>/dev/null && [ ! -s "$status" ]; then
          echo "fuzz: the background build's watcher ($pid) ended without a status; its log, fuzz/$log:" >&2
          tail -n 60 "$log" >&2
          exit 1
        fi
        sleep 5
      done
      rc=$(cat "$status")
      if [ "$rc" != 0 ]; then
        echo "fuzz: the background build failed (exit $rc); its log, fuzz/$log:" >&2
        tail -n 60 "$log" >&2
        exit 1
      fi
      echo "fuzz: background build done ($(grep -c '^ *Compiling' "$log") crates compiled)"
    fi
    build
    run "$seconds"
    ;;
  *)
    build
    run "${1:-60}"
    ;;
esac
