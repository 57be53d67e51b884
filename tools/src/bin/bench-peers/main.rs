//! `make bench-peers`: regionsync side by side with the Debezium JDBC sink
//! connector (Kafka Connect), on the same mirrored Debezium events, in the
//! same run, on the same machine.
//!
//! 1. Bulk apply (bulk.rs): the N cached changes of `make bench`
//!    (src/bin/bench), in JSON with schemas and in Avro, replayed from the
//!    first offset into an empty copy of the table in region B by each peer
//!    in turn — regionsync (the release binary) and the JDBC sink
//!    (registered on region B's Connect worker, connect.rs, with the configs
//!    of tools/peer/, peer.rs) — R runs each, alternating. A run is timed
//!    from its start until the peer's stored (regionsync) or committed
//!    (Connect) offsets reach the topic's end; the copy is then compared
//!    with A's table, and a run whose copy differs fails the bench.
//! 2. Live end-to-end latency (live.rs, stages.rs): a writer inserts rows in
//!    region A at a steady rate for a while; for each row, latency = its
//!    commit time in B − its commit time in A, both read from PostgreSQL
//!    (`pg_xact_commit_timestamp`, `track_commit_timestamp = on`), never
//!    from the peers' own metrics. Each peer starts at the topic's current
//!    end, warms up on a few seconds of rows, and then the measured window
//!    runs.
//!
//! The table is printed at the end and written (report.rs, markdown.rs,
//! svg.rs) to `target/bench/peers.md`, `target/bench/peers.json` and a
//! chart, `target/bench/peers.svg`. This file owns the command line and the
//! order of the phases.
//!
//! ```text
//! cargo run --release -p regionsync-tools --bin bench-peers [-- --changes N --runs R
//!     --rates 1000,5000 --live-seconds 60 --sink-batch 4000 --sink-tasks 4
//!     --only jdbc|regionsync | --source-only]
//! ```

mod bulk;
mod connect;
mod live;
mod markdown;
mod peer;
mod report;
mod stages;
mod svg;

use std::collections::HashMap;

use regionsync_tools::args::{arg, exit_if_help, list_arg};
use regionsync_tools::kafka::{assert_uncompacted, settled_ends};
use regionsync_tools::pg::connect;
use regionsync_tools::source::{ensure_source, source_table, source_topics};
use regionsync_tools::stack::{mirrored, pg_port_a, pg_port_b};

use crate::peer::{Peer, SinkSettings, PEERS};
use crate::report::{machine, Report};

const USAGE: &str = "usage: bench-peers [--changes N (default 1000000)] [--runs R (default 3)] [--rates 1000,5000] [--live-seconds S (default 60)]
                   [--sink-batch B (default 4000)] [--sink-tasks T (default 4)] [--only jdbc|regionsync | --source-only]
regionsync against the Debezium JDBC sink on Connect B, on the same events: bulk apply and live end-to-end latency (the local stack must be up).";

#[tokio::main]
async fn main() {
    exit_if_help(USAGE);
    let n = arg("--changes", 1_000_000);
    let runs = arg("--runs", 3);
    let rates = list_arg("--rates", &[1000, 5000]);
    let live_seconds = arg("--live-seconds", 60);
    let settings = SinkSettings {
        batch_size: arg("--sink-batch", 4000),
        tasks: arg("--sink-tasks", 4),
    };
    // `--only jdbc` or `--only regionsync`: one peer, e.g. to tune the sink.
    let args: Vec<String> = std::env::args().collect();
    let peers: Vec<Peer> = match args
        .iter()
        .position(|a| a == "--only")
        .map(|i| args.get(i + 1))
    {
        Some(Some(p)) if p == "jdbc" => vec![Peer::JdbcSink],
        Some(Some(p)) if p == "regionsync" => vec![Peer::Regionsync],
        Some(other) => panic!("--only takes jdbc or regionsync, not {other:?}"),
        None => PEERS.to_vec(),
    };
    let a = connect(pg_port_a(), "postgres", "").await;
    let b = connect(pg_port_b(), "postgres", "").await;
    let mut report = Report {
        machine: machine(),
        changes: n,
        runs,
        sink_settings: settings,
        bulk: vec![],
        ratios: HashMap::new(),
        live: vec![],
    };

    if std::env::args().any(|a| a == "--source-only") {
        ensure_source(&a, n).await;
        let table = source_table(n);
        for topic in source_topics(&table) {
            let mirror = mirrored(&topic);
            assert_uncompacted(&mirror).await;
            let ends = settled_ends(&mirror);
            println!(
                "{} messages on {mirror} in B's Kafka",
                ends.values().sum::<i64>()
            );
        }
        return;
    }
    if runs > 0 {
        bulk::run(&a, &b, n, runs, &peers, settings, &mut report).await;
    }

    if live_seconds > 0 && !rates.is_empty() {
        live::run(&a, &b, &rates, &peers, live_seconds, settings, &mut report).await;
    }

    report::write(&report);
}
