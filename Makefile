# regionsync — developer entry points. See README.md.
SHELL := /bin/bash
STACK := deploy/local/stack.sh

.PHONY: help demo test lint unit integration stack-up stack-down stack-status stack-install bench

help:
	@echo "make demo          local two-region stack replicating live, lag visible"
	@echo "make test          the whole test suite (brings the stack up if needed)"
	@echo "make stack-up      start the local two-region stack (idempotent)"
	@echo "make stack-down    stop it; data under target/stack/ is kept"
	@echo "make stack-status  one line per service: state, address, pid, log"

stack-install:
	@bash $(STACK) install

stack-up:
	@bash $(STACK) up

stack-down:
	@bash $(STACK) down

stack-status:
	@bash $(STACK) status

demo:
	@echo "make demo: not yet — the apply pipeline (issue 3) is not built."
	@echo "What runs today: 'make stack-up' starts both regions with Debezium and"
	@echo "MirrorMaker 2; 'make stack-status' shows them."

# The whole suite: formatting and lints, unit tests, then the integration tests
# against the running stack (started here if it is not up), and last the
# stack lifecycle test, which restarts and rebuilds the stack and so runs alone.
test: lint
	cargo test --lib --bins
	bash $(STACK) up
	cargo test --test stack --test pipeline
	cargo test --test stack_lifecycle

lint:
	cargo fmt --check
	cargo clippy --all-targets -- -D warnings
