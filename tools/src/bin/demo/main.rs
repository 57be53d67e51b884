//! The live demo: writes a steady mix of inserts, updates and deletes into
//! region A's PostgreSQL (as the application role `app`) and, once a second,
//! prints one line showing them arrive in region B through Debezium, Kafka,
//! MirrorMaker 2 and the regionsync worker of B.
//!
//! ```text
//! cargo run --release -p regionsync-tools --bin demo [-- --rate N] [--seconds S]
//! ```
//!
//! It needs the local stack and the workers (`make stack-up workers-up`, or
//! just `make demo`). Rows are written only in the demo id range (ids from
//! 1 000 000 000 upward), so the tests' rows are never touched. Ctrl-C stops
//! the writes; the demo then waits up to 15 s for B to catch up, prints a
//! summary and exits 0 (a second Ctrl-C skips the wait).
//!
//! Addresses follow deploy/local/env.sh (read through the tools' `stack`
//! module): REGION_A, REGION_B, PG_PORT_A, PG_PORT_B, WORKER_METRICS_PORT_B
//! and APP_PASSWORD from the environment, else the stack's defaults.
//!
//! This file owns the command line and the once-a-second picture; the
//! writer is in writer.rs, what is read from region B in watch.rs.

mod watch;
mod writer;

use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use regionsync_tools::stack::{env, HOST};
use tokio_postgres::{Client, NoTls};

use crate::watch::{diff, scrape};
use crate::writer::{writer, DEMO_ID_BASE};

/// How often the demo range is compared between A and B.
const DIFF_EVERY: Duration = Duration::from_secs(5);
/// How long to wait for B to catch up after Ctrl-C.
const DRAIN: Duration = Duration::from_secs(15);

struct Args {
    rate: f64,
    seconds: Option<f64>,
}

fn usage() -> ! {
    eprintln!(
        "usage: demo [--rate OPS_PER_SECOND (default 50)] [--seconds S (default: until Ctrl-C)]"
    );
    std::process::exit(2);
}

fn parse_args() -> Args {
    let mut args = Args {
        rate: 50.0,
        seconds: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let (flag, inline) = match a.split_once('=') {
            Some((f, v)) => (f.to_string(), Some(v.to_string())),
            None => (a.clone(), None),
        };
        let mut value = || -> f64 {
            let v = inline
                .clone()
                .or_else(|| it.next())
                .unwrap_or_else(|| usage());
            match v.parse::<f64>() {
                Ok(n) if n > 0.0 && n.is_finite() => n,
                _ => {
                    eprintln!("demo: {flag} needs a positive number, not {v:?}");
                    usage()
                }
            }
        };
        match flag.as_str() {
            "--rate" => args.rate = value(),
            "--seconds" => args.seconds = Some(value()),
            "-h" | "--help" => {
                eprintln!("Writes a steady mix of changes into region A and shows them applied in region B.");
                usage()
            }
            _ => {
                eprintln!("demo: unknown argument {a:?}");
                usage()
            }
        }
    }
    args
}

async fn connect(port: &str, password: &str, region: &str) -> Result<Client, String> {
    let conn = format!(
        "host={HOST} port={port} dbname=app user=app password={password} application_name=regionsync-demo connect_timeout=5"
    );
    let (client, connection) = tokio_postgres::connect(&conn, NoTls).await.map_err(|e| {
        format!("connecting to PostgreSQL {region} ({HOST}:{port}) as app: {e}; is the stack up (make stack-up)?")
    })?;
    let region = region.to_string();
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            eprintln!("\ndemo: PostgreSQL connection to {region}: {e}");
        }
    });
    Ok(client)
}

fn fmt_lag(lag: Option<f64>) -> String {
    lag.map_or("-".to_string(), |l| format!("{l:.1}s"))
}

fn fmt_diff(d: Option<usize>) -> String {
    d.map_or("-".to_string(), |n| n.to_string())
}

fn show(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = write!(out, "\r{line}\x1b[K");
    let _ = out.flush();
}

#[tokio::main]
async fn main() {
    if let Err(e) = demo(parse_args()).await {
        eprintln!("\ndemo: {e}");
        std::process::exit(1);
    }
}

async fn demo(args: Args) -> Result<(), String> {
    let region_a = env::REGION_A.get();
    let region_b = env::REGION_B.get();
    let password = env::APP_PASSWORD.get();
    let port_a = env::PG_PORT_A.get();
    let port_b = env::PG_PORT_B.get();
    let metrics_url = format!("http://{HOST}:{}/metrics", env::WORKER_METRICS_PORT_B.get());

    let writer_client = connect(&port_a, &password, &region_a).await?;
    let check_a = connect(&port_a, &password, &region_a).await?;
    let check_b = connect(&port_b, &password, &region_b).await?;
    let http = reqwest::Client::builder()
        .timeout(Duration::from_millis(800))
        .build()
        .map_err(|e| e.to_string())?;
    let first = scrape(&http, &metrics_url, &region_a).await.map_err(|e| {
        format!("the worker of {region_b} does not answer ({e}); start it with `make workers-up`")
    })?;

    println!(
        "demo: writing {} ops/s (users and orders, ids >= {DEMO_ID_BASE}) into {region_a} ({HOST}:{port_a}); \
         watching {region_b}'s worker at {metrics_url}. Ctrl-C to stop.",
        args.rate
    );
    println!(
        "      'applied' = regionsync_events_total{{outcome=\"applied\"}} in {region_b} (all sources, since the worker started); \
         lag = the worker's regionsync_replication_lag_seconds for {region_a}; diff = demo rows differing A vs B (checked every {}s)",
        DIFF_EVERY.as_secs()
    );

    let writes = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let mut writer_task = tokio::spawn(writer(
        writer_client,
        args.rate,
        writes.clone(),
        errors.clone(),
        stop.clone(),
    ));

    let started = Instant::now();
    let mut prev = first;
    let mut prev_at = Instant::now();
    let mut last = first;
    let mut last_diff: Option<usize> = None;
    let mut last_diff_at: Option<Instant> = None;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.tick().await;
    let mut ctrl_c = Box::pin(tokio::signal::ctrl_c());
    let deadline = args.seconds.map(|s| started + Duration::from_secs_f64(s));
    let mut writer_done = false;

    loop {
        tokio::select! {
            _ = &mut ctrl_c => break,
            _ = tick.tick() => {}
            r = &mut writer_task, if !writer_done => {
                writer_done = true;
                match r {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => return Err(e),
                    Err(e) => return Err(format!("the writer failed: {e}")),
                }
            }
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            break;
        }
        let now = Instant::now();
        let scraped = scrape(&http, &metrics_url, &region_a).await;
        let rate_line = match scraped {
            Ok(s) => {
                let dt = now.duration_since(prev_at).as_secs_f64().max(0.001);
                let per_s = (s.applied - prev.applied).max(0.0) / dt;
                prev = s;
                prev_at = now;
                last = s;
                format!(
                    "applied in {region_b}: {:>8} ({per_s:>5.0}/s) | lag {:>6}",
                    s.applied as u64,
                    fmt_lag(s.lag)
                )
            }
            Err(_) => format!("applied in {region_b}: worker not answering"),
        };
        if last_diff_at.is_none_or(|t| t.elapsed() >= DIFF_EVERY) {
            last_diff = diff(&check_a, &check_b).await.ok();
            last_diff_at = Some(Instant::now());
        }
        show(&format!(
            "[{:>5.0}s] writes in {region_a}: {:>7} | {rate_line} | diff {}",
            started.elapsed().as_secs_f64(),
            writes.load(Ordering::Relaxed),
            fmt_diff(last_diff)
        ));
    }

    // Stop writing, then give B a moment to catch up.
    stop.store(true, Ordering::Relaxed);
    if !writer_done {
        if let Ok(Ok(Err(e))) = tokio::time::timeout(Duration::from_secs(5), &mut writer_task).await
        {
            eprintln!("\ndemo: {e}");
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    let total_writes = writes.load(Ordering::Relaxed);
    println!();
    let drain_start = Instant::now();
    let mut skip = false;
    let mut final_diff = None;
    while drain_start.elapsed() < DRAIN && !skip {
        final_diff = diff(&check_a, &check_b).await.ok();
        if let Ok(s) = scrape(&http, &metrics_url, &region_a).await {
            last = s;
        }
        if final_diff == Some(0) {
            break;
        }
        show(&format!(
            "stopped writing; waiting for {region_b} to catch up ({:.0}s, Ctrl-C to skip): {} demo rows differ, lag {}",
            drain_start.elapsed().as_secs_f64(),
            fmt_diff(final_diff),
            fmt_lag(last.lag)
        ));
        tokio::select! {
            _ = tokio::signal::ctrl_c() => skip = true,
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
    let converged = match final_diff {
        Some(0) => format!(
            "A and B agree on every demo row (after {:.1}s)",
            drain_start.elapsed().as_secs_f64()
        ),
        Some(n) => format!("{n} demo rows still differ between A and B"),
        None => "could not compare A and B".to_string(),
    };
    let errs = errors.load(Ordering::Relaxed);
    show(&format!(
        "demo: {elapsed:.1}s, {total_writes} writes in {region_a} ({:.1}/s{}), {} events applied in {region_b} during the demo \
         ({} since the worker started), last lag {}; {converged}",
        total_writes as f64 / elapsed.max(0.001),
        if errs > 0 { format!(", {errs} failed") } else { String::new() },
        (last.applied - first.applied).max(0.0) as u64,
        last.applied as u64,
        fmt_lag(last.lag),
    ));
    println!();
    Ok(())
}
