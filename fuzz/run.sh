#!/usr/bin/env bash
# make fuzz: each decoder's fuzz target (fuzz/fuzz_targets/) for a fixed
# time, from the seeds in fuzz/seeds/ (real change events) and whatever
# fuzz/corpus/ holds from earlier runs. Installs cargo-fuzz on first use
# (into ~/.cargo/bin). A crash, a hang (one input over 10 s) or an input
# taking over 2 GB fails the run; libFuzzer writes it to
# fuzz/artifacts/<target>/ — fix the cause and keep the input as a unit
# test (fuzz/README.md).
#   fuzz/run.sh [SECONDS_PER_TARGET]   (default 60)
set -euo pipefail
cd "$(dirname "$0")"
seconds="${1:-60}"
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
# Without sanitizers: the code fuzzed is safe Rust; libFuzzer still catches
# panics, aborts, stack overflows, hangs and runaway memory. With debug
# assertions: an arithmetic overflow is a crash.
for target in decode_json decode_avro; do
  mkdir -p "corpus/$target"
  cargo +nightly fuzz run "$target" --sanitizer none --debug-assertions \
    "corpus/$target" "seeds/$target" -- \
    -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1
done
