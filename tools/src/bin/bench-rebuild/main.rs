//! `make bench-rebuild`: `regionsync rebuild`'s rate on bench's topics,
//! side by side with PostgreSQL's own COPY into an empty table of the same
//! shape, the worker's replay rate and the in-memory ceiling, in one run.
//!
//! Each round, in turn, on region B:
//! 1. PostgreSQL's COPY: the bench table's rows, sent from memory with
//!    `COPY … FROM STDIN` into an empty copy of `users` (same indexes and
//!    defaults), timed by the client: N rows (A's table repeated, ids and
//!    emails made unique, as many rows as the topic has changes), and the
//!    table itself (its R rows: what the rebuild ends with).
//! 2. `regionsync rebuild` (the release binary) of an empty copy from the
//!    Avro topic, from process start to exit (history check, empty, replay,
//!    marker); the copy must then equal A's table.
//! 3. `regionsync rebuild --shadow` of the same (into a shadow table, then
//!    swapped in), timed the same way; the copy must then equal A's table.
//! 4. The worker's replay of the same topic into an empty copy (as
//!    `make bench`), and the ceiling of its statements from memory (JSON).
//!
//! ```text
//! cargo run --release -p regionsync-tools --bin bench-rebuild [-- --changes N --runs R]
//!     [--chunk-rows N --chunk-mb M --chunk C: passed to `regionsync rebuild`; its defaults if absent]
//! ```

#[path = "../bench/ceiling.rs"]
mod ceiling;

use std::time::Instant;

use futures::SinkExt as _;
use futures::StreamExt as _;
use regionsync_tools::args::{arg, exit_if_help};
use regionsync_tools::copy::{drop_copy, fresh_copy};
use regionsync_tools::kafka::{assert_uncompacted, settled_ends};
use regionsync_tools::pg::{checksum, connect};
use regionsync_tools::probe::postgres_b_cpu;
use regionsync_tools::source::{ensure_source, source_table, source_topics};
use regionsync_tools::stack::{mirrored, pg_port_a, pg_port_b};
use regionsync_tools::stats::median;
use regionsync_tools::worker::{run_rebuild, run_regionsync};
use tokio_postgres::Client;

use crate::ceiling::{ceiling, ceiling_input};

const USAGE: &str = "usage: bench-rebuild [--changes N (default 1000000)] [--runs R (default 3)] [--chunk-rows N] [--chunk-mb M] [--chunk C]
regionsync rebuild's rate against PostgreSQL's COPY, the worker's replay and the ceiling (the local stack must be up; uses bench's topics).
--chunk-rows, --chunk-mb, --chunk: passed to regionsync rebuild (its own defaults when absent: regionsync rebuild --help).";

/// The rebuild's chunk options given on the command line, passed on as
/// they are.
fn rebuild_options() -> Vec<String> {
    let args: Vec<String> = std::env::args().collect();
    let mut out = Vec::new();
    for name in ["--chunk-rows", "--chunk-mb", "--chunk"] {
        if let Some(i) = args.iter().position(|a| a == name) {
            let value = args.get(i + 1).unwrap_or_else(|| {
                eprintln!("{name}: a value is missing\n{USAGE}");
                std::process::exit(2)
            });
            out.extend([name.to_string(), value.clone()]);
        }
    }
    out
}

/// One timed rebuild (plain or `--shadow`) of an empty copy, checked equal
/// to A's table (`want`) and printed: its rate and what it cost.
#[allow(clippy::too_many_arguments)]
async fn timed_rebuild(
    b: &Client,
    (avro_topic, table, want): (&str, &str, &str),
    run: u64,
    n: u64,
    r: u64,
    options: &[String],
    shadow: bool,
) -> regionsync_tools::worker::RunResult {
    let (what, copy) = if shadow {
        ("regionsync rebuild --shadow", format!("bench_shadow_{run}"))
    } else {
        ("regionsync rebuild", format!("bench_rebuild_{run}"))
    };
    let rb = run_rebuild(b, avro_topic, table, &copy, n, options, shadow).await;
    let got = checksum(b, &format!("bench.{copy}")).await;
    assert_eq!(
        got, want,
        "{what} run {run}: the copy differs from A: failed, not timed"
    );
    drop_copy(b, &copy).await;
    println!(
        "run {run}: {what}: {:.0} changes/s ({:.2}s for {r} rows: {:.0} rows/s), peak RSS {:.0} MB, CPU regionsync {:.1}s PostgreSQL {:.1}s ({:.1} + {:.1} µs per change)",
        rb.rows_per_s, rb.seconds, r as f64 / rb.seconds, rb.rss_mb, rb.cpu_sink, rb.cpu_pg,
        rb.cpu_sink * 1e6 / n as f64, rb.cpu_pg * 1e6 / n as f64
    );
    rb
}

/// `COPY (query) TO STDOUT` of A, in memory.
async fn copy_out(a: &Client, query: &str) -> (Vec<u8>, u64) {
    let stream = a
        .copy_out(&format!("COPY ({query}) TO STDOUT"))
        .await
        .expect("copy out");
    futures::pin_mut!(stream);
    let mut data = Vec::new();
    while let Some(part) = stream.next().await {
        data.extend_from_slice(&part.expect("copy out"));
    }
    let rows = data.iter().filter(|b| **b == b'\n').count() as u64;
    (data, rows)
}

/// PostgreSQL's COPY of `data` into an empty copy `bench.<copy>` of B:
/// rows/s and PostgreSQL's CPU seconds.
async fn pg_copy(b: &Client, copy: &str, data: &[u8], rows: u64) -> (f64, f64) {
    fresh_copy(b, copy).await;
    let cpu_before = postgres_b_cpu();
    let started = Instant::now();
    let sink = b
        .copy_in(&format!("COPY bench.{copy} FROM STDIN"))
        .await
        .expect("copy in");
    futures::pin_mut!(sink);
    for part in data.chunks(1 << 20) {
        sink.send(bytes::Bytes::copy_from_slice(part))
            .await
            .expect("copy in");
    }
    let n = sink.finish().await.expect("copy in");
    let secs = started.elapsed().as_secs_f64();
    let cpu = postgres_b_cpu() - cpu_before;
    assert_eq!(n, rows, "COPY loaded {n} rows, not {rows}");
    drop_copy(b, copy).await;
    (rows as f64 / secs, cpu)
}

/// The box's load averages (1, 5, 15 min): the rates move with it on a
/// shared machine, so each run says it.
fn load() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

#[tokio::main]
async fn main() {
    exit_if_help(USAGE);
    let n = arg("--changes", 1_000_000);
    let runs = arg("--runs", 3);
    let options = rebuild_options();
    let a = connect(pg_port_a(), "postgres", "").await;
    let b = connect(pg_port_b(), "postgres", "").await;
    ensure_source(&a, n).await;
    let table = source_table(n);
    let want = checksum(&a, &format!("public.{table}")).await;
    let [json_topic, avro_topic] = source_topics(&table);
    for t in [&json_topic, &avro_topic] {
        assert_uncompacted(&mirrored(t)).await;
    }
    let avro_ends = settled_ends(&mirrored(&avro_topic));
    let json_ends = settled_ends(&mirrored(&json_topic));
    let messages: i64 = avro_ends.values().sum();
    println!(
        "avro: {messages} messages ({n} changes) on {} in B's Kafka",
        mirrored(&avro_topic)
    );
    println!(
        "regionsync rebuild options: {}",
        if options.is_empty() {
            "its defaults".to_string()
        } else {
            options.join(" ")
        }
    );

    // The COPY input: A's table (R rows), and N rows of the same shape.
    let columns: Vec<String> = a
        .query(
            "SELECT quote_ident(attname) FROM pg_attribute
              WHERE attrelid = $1::text::regclass AND attnum > 0 AND NOT attisdropped ORDER BY attnum",
            &[&format!("public.{table}")],
        )
        .await
        .expect("columns")
        .iter()
        .map(|r| r.get(0))
        .collect();
    let (table_rows, r) = copy_out(&a, &format!("SELECT * FROM public.{table}")).await;
    let repeated: Vec<String> = columns
        .iter()
        .map(|c| match c.as_str() {
            "id" => "id + k * 10000000000 AS id".to_string(),
            "email" => "k || '.' || email AS email".to_string(),
            _ => c.clone(),
        })
        .collect();
    let (n_rows, n_copied) = copy_out(
        &a,
        &format!(
            "SELECT {} FROM generate_series(0, {}) k, public.{table} ORDER BY k, id LIMIT {n}",
            repeated.join(", "),
            n / r.max(1)
        ),
    )
    .await;
    println!(
        "COPY input: {r} rows of A's table ({} MB), {n_copied} rows of the same shape ({} MB)",
        table_rows.len() / 1_000_000,
        n_rows.len() / 1_000_000
    );

    let input = ceiling_input(&b, &mirrored(&json_topic), &json_ends).await;
    let (mut copy_n, mut copy_r, mut rebuilds, mut replays, mut ceilings) =
        (vec![], vec![], vec![], vec![], vec![]);
    let mut rebuild_secs = vec![];
    let mut shadows = vec![];
    for run in 0..runs {
        println!("run {run}: load average {}", load());
        let (rate, cpu) = pg_copy(&b, "bench_pgcopy", &n_rows, n_copied).await;
        println!("run {run}: PostgreSQL COPY of {n_copied} rows: {rate:.0} rows/s, CPU PostgreSQL {cpu:.1}s");
        copy_n.push(rate);
        let (rate, cpu) = pg_copy(&b, "bench_pgcopy", &table_rows, r).await;
        println!("run {run}: PostgreSQL COPY of A's {r} rows: {rate:.0} rows/s ({:.2}s), CPU PostgreSQL {cpu:.1}s", r as f64 / rate);
        copy_r.push(rate);

        let source = (avro_topic.as_str(), table.as_str(), want.as_str());
        let rb = timed_rebuild(&b, source, run, n, r, &options, false).await;
        rebuilds.push(rb.rows_per_s);
        rebuild_secs.push(rb.seconds);
        let sh = timed_rebuild(&b, source, run, n, r, &options, true).await;
        shadows.push(sh.rows_per_s);
        println!(
            "run {run}: of this round's COPY rate: rebuild {:.2}, rebuild --shadow {:.2}",
            rb.rows_per_s / copy_n[run as usize],
            sh.rows_per_s / copy_n[run as usize]
        );

        let copy = format!("bench_replay_{run}");
        let rp = run_regionsync(&b, &avro_topic, &table, &copy, &avro_ends, n).await;
        let got = checksum(&b, &format!("bench.{copy}")).await;
        assert_eq!(
            got, want,
            "replay run {run}: the copy differs from A: failed, not timed"
        );
        drop_copy(&b, &copy).await;
        println!("run {run}: worker replay: {:.0} changes/s", rp.rows_per_s);
        replays.push(rp.rows_per_s);

        let (c, _) = ceiling(&b, &input, n).await;
        println!("run {run}: ceiling (the worker's statements from memory): {c:.0} changes/s");
        println!("run {run}: load average {} at its end", load());
        ceilings.push(c);
    }
    let list = |v: &[f64]| {
        v.iter()
            .map(|x| format!("{x:.0}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let (cn, cr, rb, rp, ce) = (
        median(copy_n.clone()),
        median(copy_r.clone()),
        median(rebuilds.clone()),
        median(replays.clone()),
        median(ceilings.clone()),
    );
    let rb_secs = median(rebuild_secs.clone());
    // Each round's rebuild against that round's COPY: the box's load moves
    // both, so this ratio moves less than the rates.
    let per_round = |v: &[f64]| {
        v.iter()
            .zip(&copy_n)
            .map(|(x, c)| format!("{:.2}", x / c))
            .collect::<Vec<_>>()
            .join(", ")
    };
    println!(
        "\nmedians of {runs} runs ({n} changes, {r} rows in the table; the median of an even number of runs is the mean of the middle two):"
    );
    println!(
        "  PostgreSQL COPY, {n_copied} rows:      {cn:.0} rows/s ({})",
        list(&copy_n)
    );
    println!(
        "  regionsync rebuild:               {rb:.0} changes/s ({}) = {:.2} of COPY's rate (per round: {})",
        list(&rebuilds),
        rb / cn,
        per_round(&rebuilds)
    );
    println!(
        "  regionsync rebuild --shadow:      {:.0} changes/s ({}) = {:.2} of COPY's rate (per round: {})",
        median(shadows.clone()),
        list(&shadows),
        median(shadows.clone()) / cn,
        per_round(&shadows)
    );
    println!(
        "  worker replay:                    {rp:.0} changes/s ({})",
        list(&replays)
    );
    println!(
        "  ceiling (statements from memory): {ce:.0} changes/s ({})",
        list(&ceilings)
    );
    println!(
        "  the table's {r} rows: COPY {:.2}s ({cr:.0} rows/s, runs {}), rebuild {rb_secs:.2}s: {:.2} of COPY's rate",
        r as f64 / cr,
        list(&copy_r),
        (r as f64 / rb_secs) / cr
    );
}
