//! What regionsync's benchmarks and live demo share. They run against the
//! local two-region stack (deploy/local/stack.sh): region A is the source,
//! region B applies.
//!
//! | module   | owns |
//! |----------|------|
//! | `stack`  | the stack's names and addresses (deploy/local/stack_env.rs, the Rust twin of env.sh), the repository root, the pids stack.sh recorded |
//! | `args`   | `--name VALUE` options |
//! | `pg`     | connections to the stack's PostgreSQL; the checksum every run is verified by |
//! | `kafka`  | Kafka clients of A and B; topics' end offsets; the uncompacted check |
//! | `source` | the N cached source changes of `make bench`: table, topics, writer |
//! | `copy`   | the empty copies in B's schema `bench` a run applies into |
//! | `probe`  | CPU and RSS of processes, from /proc |
//! | `stats`  | medians, quantiles, Prometheus histogram summaries |
//! | `worker` | a regionsync release worker replaying into a copy; one timed run |
//!
//! The programs are binaries of this crate, one folder each under
//! `src/bin/`: `bench`, `bench-decode`, `bench-peers` (regionsync against
//! the Debezium JDBC sink, whose configs are in `tools/peer/`) and `demo`.

pub mod args;
pub mod copy;
pub mod kafka;
pub mod pg;
pub mod probe;
pub mod source;
pub mod stack;
pub mod stats;
pub mod worker;
