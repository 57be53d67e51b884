# regionsync — developer entry points. See README.md.
SHELL := /bin/bash
STACK := deploy/local/stack.sh

.PHONY: help demo test test-long test-failover fuzz fuzz-build-background lint rules-test deny-install unit integration stack-up stack-down stack-status stack-install bench bench-decode bench-peers bench-rebuild bench-verify types-peer workers-up workers-down k8s-check k8s-rules k8s-runtime-check image-check

help:
	@echo "make demo          local two-region stack replicating live, lag visible"
	@echo "make test          the whole test suite (brings the stack up if needed)"
	@echo "make test-long     the long variants of the scenario suites (after make test's set-up)"
	@echo "make test-failover a whole-region failure and failback under every policy (RTO, RPO)"
	@echo "make fuzz          the decoders' fuzz targets, FUZZ_SECONDS (60) each"
	@echo "make stack-up      start the local two-region stack (idempotent)"
	@echo "make stack-down    stop it; data under target/stack/ is kept"
	@echo "make stack-status  one line per service: state, address, pid, log"
	@echo "make workers-up    build regionsync (release) and start one worker per region"
	@echo "make workers-down  stop the workers"
	@echo "make bench         the apply benchmark, then bench-rebuild, bench-verify, bench-decode and bench-peers"
	@echo "make bench-decode  decode + prepare CPU per change, from memory (after make bench)"
	@echo "make bench-rebuild regionsync rebuild against PostgreSQL's COPY, the replay and the ceiling"
	@echo "make bench-verify  regionsync verify on a 1M-row table in both regions against the naive to_jsonb comparison"
	@echo "make bench-peers   regionsync against the Debezium JDBC sink, same events, same run"
	@echo "make types-peer    what the Debezium JDBC sink writes for the wide type table (target/types-peer.md)"
	@echo "make k8s-check     render deploy/k8s overlays into target/k8s/ and validate them (offline)"
	@echo "make k8s-rules     regenerate deploy/k8s/base/prometheusrule.yaml from the rules file"
	@echo "make k8s-runtime-check  run the worker as the pod does (uid, read-only root, mounts; needs the stack)"
	@echo "make image-check   build the Dockerfile with podman and run the image against the stack (slow)"

stack-install:
	@bash $(STACK) install

stack-up:
	@bash $(STACK) up

stack-down:
	@bash $(STACK) down

stack-status:
	@bash $(STACK) status

# One regionsync worker per region (deploy/local/regionsync-<region>.toml),
# against the running stack; `stack-up` does not start them.
workers-up:
	@bash $(STACK) workers-up

workers-down:
	@bash $(STACK) workers-down

# stack-up, workers-up, then the demo writer in the foreground (Ctrl-C stops
# it and the workers it started; the stack is left running).
# Demo options: make demo DEMO_ARGS="--rate 200".
demo:
	@bash deploy/local/demo.sh $(DEMO_ARGS)

# bench-rebuild (tools/src/bin/bench-rebuild; run by make bench after bench,
# on its topics): `regionsync rebuild` against PostgreSQL's own COPY into an
# empty table of the same shape, the worker's replay and the ceiling, side
# by side; BENCH_ARGS as for bench, plus the rebuild's --chunk-rows N,
# --chunk-mb M, --chunk C (its own defaults when absent).
bench-rebuild: stack-up
	cargo build --release -p regionsync -p regionsync-tools --bin regionsync --bin bench-rebuild
	./target/release/bench-rebuild $(BENCH_ARGS)

# bench-verify (tools/src/bin/bench-verify; run by make bench): regionsync
# verify of a table of N rows (default 1,000,000; VERIFY_ARGS="--rows N
# --runs R") built alike in both regions, equal and with 10 keys changed,
# against the naive comparison of every row's to_jsonb text, same run.
bench-verify: stack-up
	cargo build --release -p regionsync -p regionsync-tools --bin regionsync --bin bench-verify
	./target/release/bench-verify $(VERIFY_ARGS)

# The apply benchmark on real Debezium events (tools/src/bin/bench): N changes
# (default 1,000,000; make bench BENCH_ARGS="--changes 200000 --runs 3"),
# cached in the topics between runs; prints rows/s, batch commit latency,
# peak RSS, CPU, and the rate as a fraction of the in-memory ceiling. Then
# bench-decode and bench-peers on the same changes.
bench: stack-up
	cargo build --release -p regionsync -p regionsync-tools --bin regionsync --bin bench --bin bench-decode --bin bench-peers --bin bench-rebuild --bin bench-verify
	./target/release/bench $(BENCH_ARGS)
	./target/release/bench-rebuild $(BENCH_ARGS)
	./target/release/bench-verify $(VERIFY_ARGS)
	./target/release/bench-decode $(BENCH_ARGS)
	./target/release/bench-peers $(BENCH_ARGS) $(PEERS_ARGS)

# The worker's decode + prepare CPU per change on the first 100,000 changes
# of bench's topics, from memory: no Kafka, no PostgreSQL, so unlike the
# replay rates it does not move with the rest of the box (tools/src/bin/
# bench-decode). Needs the topics bench produced.
bench-decode: stack-up
	cargo build --release -p regionsync-tools --bin bench-decode
	./target/release/bench-decode

# regionsync against the Debezium JDBC sink on Connect B (tools/src/bin/
# bench-peers; the sink's configs are in tools/peer/): bulk apply of the same
# N changes in JSON and Avro, and live end-to-end latency at 1,000 and 5,000
# writes/s; writes target/bench/peers.md, peers.json and peers.svg. Options:
# make bench-peers PEERS_ARGS="--changes 200000 --runs 1 --rates 1000
# --live-seconds 30 --sink-batch 4000 --sink-tasks 4".
bench-peers: stack-up
	cargo build --release -p regionsync -p regionsync-tools --bin regionsync --bin bench-peers
	./target/release/bench-peers $(PEERS_ARGS)

# What the Debezium JDBC sink (the benchmark's peer) writes for the wide
# table of tests/types.rs, JSON and Avro: tests/types_peer.rs (#[ignore]d,
# so not in make test; several minutes) writes target/types-peer.md, from
# which docs/TYPES.md's "JDBC sink" column is filled. Records the sink's
# differences and failures; fails only if it cannot run.
# TYPES_PEER_ENCODINGS=json (or avro) measures one encoding.
types-peer: stack-up
	cargo test --test types_peer -- --ignored --nocapture

# The whole suite: installs what the stack needs (a no-op once done), formatting,
# lints and the Prometheus rule tests, unit tests, then the integration tests
# in two lanes: suites that stop, kill or restart the stack's services
# (lag, failover, region_failure, stack_lifecycle) run in the
# background on a second stack of their own (tests/lane2.sh: target/
# stack-lane2, other ports; its output is printed when it ends), the others
# here on the default stack (started if it is not up). Then the fuzz
# targets, whose build (nightly, fuzz/target/) runs in the background at low
# priority from the start.
test: fuzz-build-background stack-install lint
	cargo test --lib --bins --test cli_route --test config_doc
	cargo test -p regionsync-tools
	cargo test --no-run
	bash deploy/k8s/check.sh
	bash $(STACK) up
	bash tests/lane2.sh start $$PPID
	bash deploy/k8s/tools/runtime_check.sh
	cargo test --test stack --test pipeline --test crash --test types
	cargo test --test secure
	cargo test --test outages
	cargo test --test faults -- --test-threads=1
	cargo test --test dlq -- --test-threads=1
	cargo test --test active_active
	cargo test --test schema_changes -- --test-threads=6
	cargo test --test verify --test rebuild -- --test-threads=1
	bash fuzz/run.sh --wait $(FUZZ_SECONDS)
	bash tests/lane2.sh wait

# The long variants of scenario suites whose short variant is in make test
# (REGIONSYNC_LONG_TESTS=1): the lag alert watched through every stall,
# then the whole-region failure under every policy (test-failover).
test-long: stack-up
	REGIONSYNC_LONG_TESTS=1 cargo test --test lag -- --test-threads=1
	$(MAKE) test-failover

# A whole-region failure (tests/region_failure.rs): us-east-1's PostgreSQL,
# Kafka, Connect and MirrorMaker 2 killed at once while both regions' users
# write, failed over to eu-west-1 and back with the commands, under each
# policy (lww, reject, manual) with longer write phases than make test's
# short variant. Prints RTO and RPO per policy (docs/BENCHMARKS.md). It
# kills part of the stack, so nothing else may use the stack meanwhile.
test-failover: stack-up
	cargo test --test region_failure -- --ignored --test-threads=1 --nocapture

# The JSON and Avro decoders' fuzz targets (cargo-fuzz, nightly; fuzz/
# README.md), each for FUZZ_SECONDS from the seeds in fuzz/seeds/; installs
# cargo-fuzz on first use. A crash fails it, its input in fuzz/artifacts/.
FUZZ_SECONDS ?= 60
fuzz:
	bash fuzz/run.sh $(FUZZ_SECONDS)

# make test's first step: the fuzz build in the background at low priority,
# for as long as make runs; make test's last steps wait for it.
fuzz-build-background:
	bash fuzz/run.sh --build-background $$PPID

lint: rules-test deny-install
	cargo fmt --all --check
	cargo clippy --workspace --all-targets -- -D warnings
	RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps
	cargo deny check licenses bans sources

# cargo-deny checks licences, bans and sources (deny.toml); its advisories
# need a database this machine cannot fetch, so they are not checked.
deny-install:
	@command -v cargo-deny >/dev/null || cargo install cargo-deny --locked

# Kubernetes manifests (deploy/k8s/README.md): renders every overlay with a
# pinned kustomize into target/k8s/<region>.yaml and checks it offline —
# Kubernetes schemas (strict), the CRD objects, a security scan, the config
# (check-config) and the rules against deploy/prometheus/. Installs its
# tools under target/k8s-tools/ on first use.
k8s-check:
	bash deploy/k8s/check.sh

k8s-rules:
	bash deploy/k8s/check.sh --tools-only
	target/k8s-tools/venv/bin/python deploy/k8s/tools/gen_prometheusrule.py

# The image's runtime contract without a container engine: the worker as
# uid 10001 on a read-only Debian root with the manifest's mounts, against
# the running stack's eu-west-1 (make k8s-check first, for target/k8s/).
k8s-runtime-check:
	bash deploy/k8s/tools/runtime_check.sh

# The Dockerfile built with podman here (local stand-ins for the base
# images, which cannot be pulled) and the image run as the pod runs it,
# against the stack. Not in make test: its build stage is a release build.
image-check: k8s-check
	bash deploy/k8s/tools/image_check.sh

# The Prometheus alert and recording rules (deploy/prometheus/) and their
# promtool unit tests, and the Grafana dashboard's queries against them.
rules-test:
	@command -v promtool >/dev/null || { echo "promtool missing: run make stack-install" >&2; exit 1; }
	promtool check rules deploy/prometheus/*.rules.yml
	promtool test rules deploy/prometheus/tests/*.yml
	python3 deploy/grafana/check.py
