//! `make bench`: regionsync's apply rate on real Debezium events, against the
//! ceiling of its own bulk statements fed from memory.
//!
//! 1. Source (cached between runs): N changes to `public.bench_users_<N>` in
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
//! cargo run --release --example bench [-- --changes N --runs R --only json|avro]
//! ```

mod support;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use rdkafka::message::Message;
use regionsync::apply::{self, Final, TargetTable};
use regionsync::config::DEFAULT_BATCH_MAX_ROWS;
use regionsync::decode::{decode_json, Decoded};
use support::*;
use tokio_postgres::Client;

const CEILING_COPY: &str = "bench_ceiling";

/// The ceiling's input: the JSON topic's changes decoded into memory, in
/// batches of the worker's default `batch_max_rows` per partition,
/// partitions spread over two lanes (connections).
struct CeilingInput {
    table: TargetTable,
    lanes: Vec<Vec<Vec<Final>>>,
}

async fn ceiling_input(b_admin: &Client, topic: &str, ends: &HashMap<i32, i64>) -> CeilingInput {
    let copy = CEILING_COPY;
    fresh_copy(b_admin, copy).await;
    let consumer = kafka_b_from_beginning(topic, ends.keys().copied());
    let table = users_copy_target(b_admin, &format!("bench.{copy}")).await;
    let mut per_partition: HashMap<i32, Vec<Final>> = HashMap::new();
    let mut remaining: HashMap<i32, i64> = ends.clone();
    while !remaining.is_empty() {
        if let Some(Ok(m)) = consumer.poll(Duration::from_millis(500)) {
            if m.offset() + 1 >= remaining.get(&m.partition()).copied().unwrap_or(0) {
                remaining.remove(&m.partition());
            }
            if let Ok(Decoded::Change(c)) = decode_json(m.key(), m.payload()) {
                if let Ok(f) = apply::prepare(&table, c, "us-east-1") {
                    per_partition.entry(m.partition()).or_default().push(f);
                }
            }
        }
    }
    let mut lanes: Vec<Vec<Vec<Final>>> = vec![vec![], vec![]];
    for (i, (_, finals)) in per_partition.into_iter().enumerate() {
        lanes[i % 2].extend(finals.chunks(DEFAULT_BATCH_MAX_ROWS).map(|c| c.to_vec()));
    }
    CeilingInput { table, lanes }
}

/// The ceiling: the decoded changes applied to an empty copy through the
/// same statements as the worker's (collapsed per batch; the conflict
/// check, then the apply), two connections. Measured once per round, like
/// the runs, so all see the same state of the database.
async fn ceiling(b_admin: &Client, input: &CeilingInput, n: u64) -> (f64, f64) {
    fresh_copy(b_admin, CEILING_COPY).await;
    let pg_before = postgres_b_cpu();
    let table = &input.table;
    let lanes = input.lanes.clone();
    let started = Instant::now();
    let mut tasks = Vec::new();
    for lane in lanes {
        let table = table.clone();
        tasks.push(tokio::spawn(async move {
            let mut c = connect_pooled(PG_PORT_B, "postgres").await;
            c.batch_execute(regionsync::apply::session::APPLY_SESSION_SQL)
                .await
                .unwrap();
            for batch in lane {
                let tx = c.transaction().await.unwrap();
                tx.batch_execute(regionsync::apply::session::APPLY_TRANSACTION_SQL)
                    .await
                    .unwrap();
                let checked = regionsync::conflict::check(
                    &tx,
                    &table,
                    apply::collapse(&batch),
                    "us-east-1",
                    "eu-west-1",
                    None,
                )
                .await
                .expect("check");
                apply::apply_finals(&tx, &table, &checked.finals)
                    .await
                    .expect("apply");
                tx.commit().await.unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let rate = n as f64 / started.elapsed().as_secs_f64();
    // The lanes' backends have exited: their time is in the postmaster's.
    let cpu_pg = postgres_b_cpu() - pg_before;
    drop_copy(b_admin, CEILING_COPY).await;
    (rate, cpu_pg)
}

#[tokio::main]
async fn main() {
    let n = arg("--changes", 1_000_000);
    let runs = arg("--runs", 3);
    let a = connect(PG_PORT_A, "postgres", "").await;
    let b = connect(PG_PORT_B, "postgres", "").await;
    ensure_source(&a, n).await;
    let table = source_table(n);
    let want = checksum(&a, &format!("public.{table}")).await;
    // `--only json` or `--only avro` replays one encoding (for profiling).
    let only = std::env::args().skip_while(|a| a != "--only").nth(1);
    let mut results: Vec<(&str, Vec<RunResult>)> = [("json", vec![]), ("avro", vec![])]
        .into_iter()
        .filter(|(enc, _)| only.as_deref().is_none_or(|o| o == *enc))
        .collect();
    let mut ends_by = HashMap::new();
    for (enc, topic) in ["json", "avro"].into_iter().zip(source_topics(&table)) {
        assert_uncompacted(&format!("us-east-1.{topic}")).await;
        let ends = settled_ends(&format!("us-east-1.{topic}"));
        let events: i64 = ends.values().sum();
        println!("{enc}: {events} messages on us-east-1.{topic} in B's Kafka");
        ends_by.insert(enc, (topic, ends));
    }
    let (json_topic, json_ends) = &ends_by["json"];
    let input = ceiling_input(&b, &format!("us-east-1.{json_topic}"), json_ends).await;
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
