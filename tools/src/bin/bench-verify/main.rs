//! `make bench-verify`: `regionsync verify`'s rate on a table of N rows
//! (default 1,000,000, the users shape) held by both regions, side by side
//! with the naive comparison (every row's `to_jsonb` text from both regions
//! at once, compared by the client), in one run.
//!
//! The table, `bench.verify_<N>` in A and B, is built once by the same
//! `generate_series` in both (outside the captured schema `public`, so
//! nothing replicates it) and kept for the next run. Each round:
//! 1. `regionsync verify` (the release binary) of B against A, tables
//!    equal: rows/s per side (both sides checksum at once), the CPU of
//!    regionsync and of each PostgreSQL, peak RSS;
//! 2. the naive comparison: `COPY (SELECT to_jsonb(t)::text … ORDER BY id)
//!    TO STDOUT` from both regions at once, compared line by line: rows/s
//!    and the bytes each side sends;
//! 3. `regionsync verify` again with 10 rows of B changed (bypassing
//!    nothing: the table has no triggers), which must name exactly those
//!    10 keys: the cost of bisecting down to them. The rows are then put
//!    back.
//!
//! ```text
//! cargo run --release -p regionsync-tools --bin bench-verify [-- --rows N --runs R]
//! ```

use std::hash::Hasher as _;
use std::process::{Command, Stdio};
use std::time::Instant;

use futures::StreamExt as _;
use regionsync_tools::args::{arg, exit_if_help};
use regionsync_tools::copy::BENCH_SCHEMA_SQL;
use regionsync_tools::pg::{checksum, connect};
use regionsync_tools::probe::{postgres_cpu, ChildCpu, RssSampler};
use regionsync_tools::source::{USER_COLUMNS, USER_VALUES};
use regionsync_tools::stack::{pg_port_a, region_a, region_b, regionsync_password, root, HOST};
use regionsync_tools::stats::median;
use regionsync_tools::worker::{free_port, worker_toml};
use tokio_postgres::Client;

const USAGE: &str = "usage: bench-verify [--rows N (default 1000000)] [--runs R (default 3)]
regionsync verify's rate against the naive to_jsonb comparison (the local stack must be up).";

/// Rows changed in B for the bisection round.
const CHANGED: i64 = 10;

/// Builds `bench.<table>` with `n` generated rows in a region, unless it
/// is there already with that many.
async fn ensure_table(c: &Client, table: &str, n: i64, region: &str) {
    let have: Option<i64> = c
        .query_one(
            "SELECT CASE WHEN to_regclass('bench.' || $1::text) IS NULL THEN NULL
                    ELSE (SELECT reltuples::bigint FROM pg_class WHERE oid = to_regclass('bench.' || $1::text)) END",
            &[&table],
        )
        .await
        .expect("look for the table")
        .get(0);
    if let Some(have) = have {
        let exact: i64 = c
            .query_one(&format!("SELECT count(*) FROM bench.{table}"), &[])
            .await
            .expect("count")
            .get(0);
        if exact == n {
            println!("{region}: bench.{table} holds its {n} rows (kept from an earlier run; estimate {have})");
            return;
        }
    }
    let started = Instant::now();
    c.batch_execute(&format!(
        "{BENCH_SCHEMA_SQL}
         DROP TABLE IF EXISTS bench.{table};
         CREATE TABLE bench.{table} (LIKE public.users INCLUDING DEFAULTS INCLUDING CONSTRAINTS INCLUDING INDEXES);
         INSERT INTO bench.{table} ({USER_COLUMNS}, created_at, hlc, origin_region)
              SELECT {USER_VALUES}, timestamptz '2024-01-01 00:00:00+00' + make_interval(secs => g),
                     g << 16, '{a}'
                FROM generate_series(1, {n}::bigint) g;
         GRANT SELECT ON bench.{table} TO regionsync;",
        a = region_a(),
    ))
    .await
    .unwrap_or_else(|e| panic!("{region}: build bench.{table}: {e:?}"));
    // Outside the implicit transaction of a multi-statement query.
    c.batch_execute(&format!("VACUUM ANALYZE bench.{table}"))
        .await
        .unwrap_or_else(|e| panic!("{region}: vacuum bench.{table}: {e:?}"));
    println!(
        "{region}: bench.{table} built with {n} rows in {:.1}s",
        started.elapsed().as_secs_f64()
    );
}

/// One timed `regionsync verify` of B against A for `bench.<table>`.
struct Verified {
    seconds: f64,
    cpu_regionsync: f64,
    cpu_pg_a: f64,
    cpu_pg_b: f64,
    rss_mb: f64,
    report: serde_json::Value,
    code: i32,
}

fn run_verify(config: &std::path::Path, table: &str) -> Verified {
    let against = format!(
        "host={HOST} port={} dbname=app user=regionsync sslmode=disable",
        pg_port_a()
    );
    let (a0, b0) = (postgres_cpu(&region_a()), postgres_cpu(&region_b()));
    let started = Instant::now();
    let child = Command::new(root().join("target/release/regionsync"))
        .arg("--config")
        .arg(config)
        .args(["verify", "--json", "--against", &against, "--table"])
        .arg(format!("bench.{table}"))
        .env("REGIONSYNC_POSTGRES__PASSWORD", regionsync_password())
        .env("PGPASSWORD", regionsync_password())
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start target/release/regionsync (cargo build --release first)");
    let pid = child.id();
    let sampler = RssSampler::start(pid);
    let cpu = ChildCpu::start(pid);
    let out = child.wait_with_output().expect("verify");
    let seconds = started.elapsed().as_secs_f64();
    let (cpu_pg_a, cpu_pg_b) = (
        postgres_cpu(&region_a()) - a0,
        postgres_cpu(&region_b()) - b0,
    );
    let rss_mb = sampler.stop();
    let cpu_regionsync = cpu.cpu();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let report = serde_json::from_str(&stdout).unwrap_or_else(|e| {
        panic!(
            "verify did not print JSON ({e}): {stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    Verified {
        seconds,
        cpu_regionsync,
        cpu_pg_a,
        cpu_pg_b,
        rss_mb,
        report,
        code: out.status.code().unwrap_or(-1),
    }
}

/// A `COPY … TO STDOUT`'s output hashed as it arrives, and its size.
async fn hashed(c: &Client, query: &str) -> (u64, u64) {
    let stream = c.copy_out(query).await.expect("copy out");
    futures::pin_mut!(stream);
    let (mut hash, mut bytes) = (std::hash::DefaultHasher::new(), 0u64);
    while let Some(part) = stream.next().await {
        let part = part.expect("copy out");
        bytes += part.len() as u64;
        hash.write(&part);
    }
    (hash.finish(), bytes)
}

/// The naive comparison: every row's `to_jsonb` text from both regions at
/// once, each side's stream hashed as it arrives and the two compared;
/// seconds, the bytes one side sent, whether equal, and the CPU seconds of
/// PostgreSQL A and B.
async fn naive(a: &Client, b: &Client, table: &str) -> (f64, u64, bool, f64, f64) {
    let query =
        format!("COPY (SELECT to_jsonb(t)::text FROM bench.{table} t ORDER BY id) TO STDOUT");
    let (a0, b0) = (postgres_cpu(&region_a()), postgres_cpu(&region_b()));
    let started = Instant::now();
    let ((ha, bytes_a), (hb, bytes_b)) = tokio::join!(hashed(a, &query), hashed(b, &query));
    (
        started.elapsed().as_secs_f64(),
        bytes_a,
        ha == hb && bytes_a == bytes_b,
        postgres_cpu(&region_a()) - a0,
        postgres_cpu(&region_b()) - b0,
    )
}

#[tokio::main]
async fn main() {
    exit_if_help(USAGE);
    let n = arg("--rows", 1_000_000) as i64;
    let runs = arg("--runs", 3);
    let table = format!("verify_{n}");
    let a = connect(pg_port_a(), "postgres", "").await;
    let b = connect(regionsync_tools::stack::pg_port_b(), "postgres", "").await;
    let (ra, rb) = (region_a(), region_b());
    tokio::join!(
        ensure_table(&a, &table, n, &ra),
        ensure_table(&b, &table, n, &rb)
    );
    let qualified = format!("bench.{table}");
    let (ca, cb) = tokio::join!(checksum(&a, &qualified), checksum(&b, &qualified));
    assert_eq!(
        ca, cb,
        "bench.{table} differs between the regions before the run"
    );

    // B's config naming the table (its topic is never read: verify only
    // reads the tables).
    let toml = worker_toml(
        "bench-verify-not-read",
        &table,
        &table,
        "bench-verify",
        free_port(),
    );
    let config = root().join(format!("target/bench/{table}-verify.toml"));
    std::fs::create_dir_all(config.parent().unwrap()).unwrap();
    std::fs::write(&config, toml).unwrap();

    let (mut rates, mut naive_rates, mut bisect_secs) = (vec![], vec![], vec![]);
    for run in 0..runs {
        b.batch_execute("CHECKPOINT").await.expect("checkpoint");
        let v = run_verify(&config, &table);
        assert_eq!(
            v.code, 0,
            "run {run}: equal tables, verify must exit 0: {:#}",
            v.report
        );
        assert_eq!(v.report["tables"][0]["rows_here"], n, "{:#}", v.report);
        let rate = n as f64 / v.seconds;
        println!(
            "run {run}: verify, equal: {:.2}s = {rate:.0} rows/s per side; CPU regionsync {:.1}s, PostgreSQL A {:.1}s B {:.1}s ({:.2} µs of PostgreSQL per row per side); peak RSS {:.0} MB",
            v.seconds,
            v.cpu_regionsync,
            v.cpu_pg_a,
            v.cpu_pg_b,
            (v.cpu_pg_a + v.cpu_pg_b) / 2.0 / n as f64 * 1e6,
            v.rss_mb
        );
        rates.push(rate);

        let (secs, bytes, equal, cpu_a, cpu_b) = naive(&a, &b, &table).await;
        assert!(
            equal,
            "run {run}: the naive comparison found the equal tables different"
        );
        println!(
            "run {run}: naive to_jsonb comparison: {secs:.2}s = {:.0} rows/s per side, {} MB sent per side; CPU PostgreSQL A {cpu_a:.1}s B {cpu_b:.1}s ({:.2} µs per row per side)",
            n as f64 / secs,
            bytes / 1_000_000,
            (cpu_a + cpu_b) / 2.0 / n as f64 * 1e6
        );
        naive_rates.push(n as f64 / secs);

        // CHANGED rows of B spread over the key range: bisection must find
        // exactly those keys.
        let step = (n / CHANGED).max(1);
        b.batch_execute(&format!(
            "UPDATE bench.{table} SET display_name = display_name || ' (changed)'
              WHERE id % {step} = 7 AND id <= {n}"
        ))
        .await
        .expect("change rows in B");
        let v = run_verify(&config, &table);
        b.batch_execute(&format!(
            "UPDATE bench.{table} SET display_name = 'user ' || id WHERE id % {step} = 7 AND id <= {n}"
        ))
        .await
        .expect("put B's rows back");
        let differences = v.report["tables"][0]["differences"]
            .as_array()
            .map_or(0, Vec::len);
        assert_eq!(v.code, 1, "run {run}: changed rows, verify must exit 1");
        assert_eq!(
            differences as i64,
            n.min(CHANGED * step) / step,
            "run {run}: verify must name each changed key: {:#}",
            v.report
        );
        println!(
            "run {run}: verify, {differences} keys different: {:.2}s ({:.0} rows/s per side), CPU regionsync {:.1}s, peak RSS {:.0} MB",
            v.seconds,
            n as f64 / v.seconds,
            v.cpu_regionsync,
            v.rss_mb
        );
        bisect_secs.push(v.seconds);
    }
    let list = |v: &[f64]| {
        v.iter()
            .map(|x| format!("{x:.0}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let (r, nr) = (median(rates.clone()), median(naive_rates.clone()));
    println!("\nmedians of {runs} runs ({n} rows per side):");
    println!(
        "  regionsync verify, equal:     {r:.0} rows/s per side ({})",
        list(&rates)
    );
    println!(
        "  naive to_jsonb comparison:    {nr:.0} rows/s per side ({}): verify is {:.2}x its rate",
        list(&naive_rates),
        r / nr
    );
    println!(
        "  regionsync verify, {CHANGED} keys different: {:.2}s ({})",
        median(bisect_secs.clone()),
        bisect_secs
            .iter()
            .map(|x| format!("{x:.2}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
}
