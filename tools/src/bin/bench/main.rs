//! `make bench`: regionsync's apply rate on real Debezium events, against the
//! ceiling of its own bulk statements fed from memory.
//!
//! 1. Source (cached between runs): N changes to `public.bench_src_<N>` in
//!    region A (70 % updates, 20 % inserts, 10 % deletes over N/5 keys),
//!    carried by the real Debezium connectors and MirrorMaker 2 into region
//!    B's Kafka, in JSON and in Avro.
//! 2. Each run replays one mirrored topic from its first offset with the
//!    release `regionsync` binary into an empty copy of the table in B,
//!    timed until its stored offsets reach the topic's end; the copy must
//!    then equal A's table (checked; a differing run fails the bench).
//! 3. The ceiling: the same changes, decoded beforehand and held in memory,
//!    applied through the same bulk statements on two connections, once per
//!    round of runs (the median is the ceiling).
//!
//! Every timed run starts from a checkpoint with no other copy's rows or
//! tombstones left in the database.
//!
//! ```text
//! cargo run --release -p regionsync-tools --bin bench [-- --changes N --runs R --only json|avro]
//! ```

mod ceiling;

use std::collections::HashMap;

use regionsync_tools::args::{arg, exit_if_help, only};
use regionsync_tools::copy::drop_copy;
use regionsync_tools::kafka::{assert_uncompacted, settled_ends};
use regionsync_tools::pg::{checksum, connect};
use regionsync_tools::source::{ensure_source, source_table, source_topics};
use regionsync_tools::stack::{mirrored, pg_port_a, pg_port_b};
use regionsync_tools::stats::median;
use regionsync_tools::worker::{run_regionsync, RunResult};

use crate::ceiling::{ceiling, ceiling_input};

const USAGE: &str = "usage: bench [--changes N (default 1000000)] [--runs R (default 3)] [--only json|avro]
regionsync's apply rate on real Debezium events against the in-memory ceiling of its own statements (the local stack must be up).";

#[tokio::main]
async fn main() {
    exit_if_help(USAGE);
    let n = arg("--changes", 1_000_000);
    let runs = arg("--runs", 3);
    let a = connect(pg_port_a(), "postgres", "").await;
    let b = connect(pg_port_b(), "postgres", "").await;
    ensure_source(&a, n).await;
    let table = source_table(n);
    let want = checksum(&a, &format!("public.{table}")).await;
    // `--only json` or `--only avro` replays one encoding (for profiling).
    let only = only();
    let mut results: Vec<(&str, Vec<RunResult>)> = [("json", vec![]), ("avro", vec![])]
        .into_iter()
        .filter(|(enc, _)| only.as_deref().is_none_or(|o| o == *enc))
        .collect();
    let mut ends_by = HashMap::new();
    for (enc, topic) in ["json", "avro"].into_iter().zip(source_topics(&table)) {
        let mirror = mirrored(&topic);
        assert_uncompacted(&mirror).await;
        let ends = settled_ends(&mirror);
        let events: i64 = ends.values().sum();
        println!("{enc}: {events} messages on {mirror} in B's Kafka");
        ends_by.insert(enc, (topic, ends));
    }
    let (json_topic, json_ends) = &ends_by["json"];
    let input = ceiling_input(&b, &mirrored(json_topic), json_ends).await;
    let mut ceilings = Vec::new();
    for run in 0..runs {
        let (c, cpu_pg) = ceiling(&b, &input, n).await;
        println!("ceiling run {run} (same statements, from memory, 2 connections): {c:.0} rows/s, CPU PostgreSQL {cpu_pg:.1}s");
        ceilings.push(c);
        for (enc, list) in results.iter_mut() {
            let (topic, ends) = &ends_by[enc];
            let copy = format!("bench_copy_{enc}_{run}");
            let r = run_regionsync(&b, topic, &table, &copy, ends, n).await;
            let got = checksum(&b, &format!("bench.{copy}")).await;
            assert_eq!(
                got, want,
                "{enc} run {run}: the replica differs from A: failed, not timed"
            );
            drop_copy(&b, &copy).await;
            println!(
                "{enc} run {run}: {:.0} rows/s, batch commit p50 {:.3}s p99 {:.3}s, {:.0} changes per batch, peak RSS {:.0} MB, CPU regionsync {:.1}s PostgreSQL {:.1}s",
                r.rows_per_s, r.p50, r.p99, r.batch_rows, r.rss_mb, r.cpu_sink, r.cpu_pg
            );
            list.push(r);
        }
    }
    let ceiling_rate = median(ceilings.clone());
    println!(
        "\nceiling: median {ceiling_rate:.0} rows/s (runs {})",
        ceilings
            .iter()
            .map(|c| format!("{c:.0}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    for (enc, list) in &results {
        let rate = median(list.iter().map(|r| r.rows_per_s).collect());
        println!(
            "{enc}: median {rate:.0} rows/s = {:.2} of the ceiling; batch commit p50 {:.3}s p99 {:.3}s; peak RSS {:.0} MB; CPU per 1M changes: regionsync {:.1}s, PostgreSQL {:.1}s",
            rate / ceiling_rate,
            median(list.iter().map(|r| r.p50).collect()),
            median(list.iter().map(|r| r.p99).collect()),
            list.iter().map(|r| r.rss_mb).fold(0.0, f64::max),
            median(list.iter().map(|r| r.cpu_sink).collect()) * 1e6 / n as f64,
            median(list.iter().map(|r| r.cpu_pg).collect()) * 1e6 / n as f64,
        );
    }
}
