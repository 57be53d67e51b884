# Names, ports and local-only credentials of the local two-region stack.
# Sourced by stack.sh and the Makefile's helpers. Rust code (tests/support and
# the tools/ programs) reads the same variables through deploy/local/
# stack_env.rs, whose names and defaults must match these (a unit test of
# regionsync-tools checks it). Override any of them from the environment.
: "${REGION_A:=us-east-1}"
: "${REGION_B:=eu-west-1}"
: "${PG_PORT_A:=15432}"
: "${PG_PORT_B:=25432}"
: "${KAFKA_PORT_A:=19092}"
: "${KAFKA_PORT_B:=29092}"
: "${KAFKA_CONTROLLER_PORT_A:=19093}"  # each broker's KRaft controller
: "${KAFKA_CONTROLLER_PORT_B:=29094}"
: "${KAFKA_SASL_PORT_B:=29093}"        # Kafka B's SASL_SSL listener (SCRAM-SHA-512)
: "${CONNECT_PORT_A:=18083}"
: "${CONNECT_PORT_B:=28083}"
: "${REGISTRY_PORT:=18081}"
: "${PROMETHEUS_PORT:=9090}"
: "${WORKER_METRICS_PORT_A:=19464}"
: "${WORKER_METRICS_PORT_B:=29464}"
: "${TOPIC_PARTITIONS:=4}"
# Where the stack keeps its data, logs and pids: relative to the checkout, or
# absolute. make test runs a second stack beside the first in its own
# directory, on its own ports (see the Makefile's LANE2).
: "${STACK_DIR:=target/stack}"
# Local loopback stack only; real deployments take secrets from their own store.
: "${APP_PASSWORD:=app-local}"
: "${DEBEZIUM_PASSWORD:=debezium-local}"
: "${REGIONSYNC_PASSWORD:=regionsync-local}"  # also the SCRAM password of Kafka B's user regionsync
