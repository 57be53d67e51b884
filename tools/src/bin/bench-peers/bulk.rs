//! The bulk experiment: the N cached changes of `make bench`, in JSON and
//! in Avro, replayed from the first offset into an empty copy in region B
//! by each peer in turn, R runs each, alternating; each run timed until the
//! peer's stored (regionsync) or committed (Connect) offsets reach the
//! topic's end, and its copy compared with A's table.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use regionsync_tools::copy::{drop_copy, fresh_copy};
use regionsync_tools::kafka::{assert_uncompacted, reached, settled_ends};
use regionsync_tools::pg::checksum;
use regionsync_tools::probe::{cpu_seconds, postgres_b_cpu, RssSampler};
use regionsync_tools::source::{ensure_source, source_table, source_topics};
use regionsync_tools::stack::{mirrored, region_b, stack_pid};
use regionsync_tools::stats::median;
use regionsync_tools::worker::{run_regionsync, RunResult};
use serde::Serialize;
use tokio_postgres::Client;

use crate::connect::Sink;
use crate::peer::{committed, sink_config, Peer, SinkSettings, PEERS};
use crate::report::Report;

pub async fn run_jdbc_sink(
    b_admin: &Client,
    encoding: &str,
    topic: &str,
    copy: &str,
    ends: &HashMap<i32, i64>,
    n: u64,
    settings: SinkSettings,
) -> RunResult {
    fresh_copy(b_admin, copy).await;
    let group = format!("bench-jdbc-{copy}-{}", std::process::id());
    let connect = stack_pid(&format!("connect-{}", region_b()));
    let rss = RssSampler::start(connect);
    let (cpu_before, pg_before) = (cpu_seconds(connect), postgres_b_cpu());
    let started = Instant::now();
    let config = sink_config(encoding, topic, &group, copy, settings);
    let sink = Sink::register(&format!("bench-{copy}"), &group, config).await;
    loop {
        if let Err(trace) = sink.running().await {
            sink.delete().await;
            panic!("{encoding} JDBC sink run into bench.{copy}: a task failed:\n{trace}");
        }
        if reached(ends, &committed(&sink.group, topic, ends)) {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(3600),
            "JDBC sink run did not finish in 60 min"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let seconds = started.elapsed().as_secs_f64();
    let cpu_sink = cpu_seconds(connect) - cpu_before;
    let cpu_pg = postgres_b_cpu() - pg_before;
    sink.delete().await;
    RunResult {
        rows_per_s: n as f64 / seconds,
        seconds,
        p50: f64::NAN,
        p99: f64::NAN,
        batch_rows: f64::NAN,
        rss_mb: rss.stop(),
        cpu_sink,
        cpu_pg,
    }
}

#[derive(Serialize)]
pub struct BulkSummary {
    pub encoding: String,
    pub peer: Peer,
    pub runs: Vec<RunResult>,
    pub rows_per_s_median: f64,
    pub rows_per_s_min: f64,
    pub rows_per_s_max: f64,
    pub cpu_sink_per_m_median: f64,
    pub cpu_pg_per_m_median: f64,
    pub peak_rss_mb: f64,
}

/// The bulk experiment: `runs` rounds over both inputs, each peer of
/// `peers` in turn (alternating which goes first), every copy verified
/// against A; the medians go into `report.bulk`, and the regionsync / JDBC
/// sink ratio per input into `report.ratios` when both peers ran.
pub async fn run(
    a: &Client,
    b: &Client,
    n: u64,
    runs: u64,
    peers: &[Peer],
    settings: SinkSettings,
    report: &mut Report,
) {
    ensure_source(a, n).await;
    let table = source_table(n);
    let want = checksum(a, &format!("public.{table}")).await;
    let mut results: HashMap<(&str, Peer), Vec<RunResult>> = HashMap::new();
    let mut inputs = Vec::new();
    for (enc, topic) in ["json", "avro"].into_iter().zip(source_topics(&table)) {
        let mirror = mirrored(&topic);
        assert_uncompacted(&mirror).await;
        let ends = settled_ends(&mirror);
        println!(
            "{enc}: {} messages on {mirror} in B's Kafka",
            ends.values().sum::<i64>()
        );
        inputs.push((enc, topic, ends));
    }
    for run in 0..runs {
        for (enc, topic, ends) in &inputs {
            // Alternate which peer goes first, so neither always runs on
            // a warmer cache.
            let mut order = peers.to_vec();
            if run % 2 == 1 {
                order.reverse();
            }
            for peer in order {
                let copy = format!("peer_{}_{enc}_{run}", peer.short());
                let r = match peer {
                    Peer::Regionsync => run_regionsync(b, topic, &table, &copy, ends, n).await,
                    Peer::JdbcSink => {
                        let mirror = mirrored(topic);
                        run_jdbc_sink(b, enc, &mirror, &copy, ends, n, settings).await
                    }
                };
                let got = checksum(b, &format!("bench.{copy}")).await;
                assert_eq!(
                    got,
                    want,
                    "{} {enc} run {run}: the replica differs from A: failed, not timed",
                    peer.name()
                );
                println!(
                    "{enc} run {run} {}: {:.0} rows/s ({:.1}s), CPU sink {:.1}s PostgreSQL {:.1}s, peak RSS {:.0} MB",
                    peer.name(),
                    r.rows_per_s,
                    r.seconds,
                    r.cpu_sink,
                    r.cpu_pg,
                    r.rss_mb
                );
                drop_copy(b, &copy).await;
                results.entry((enc, peer)).or_default().push(r);
            }
        }
    }
    for (enc, _, _) in &inputs {
        for peer in peers.iter().copied() {
            let list = &results[&(*enc, peer)];
            let rates: Vec<f64> = list.iter().map(|r| r.rows_per_s).collect();
            report.bulk.push(BulkSummary {
                encoding: enc.to_string(),
                peer,
                runs: list.clone(),
                rows_per_s_median: median(rates.clone()),
                rows_per_s_min: rates.iter().copied().fold(f64::INFINITY, f64::min),
                rows_per_s_max: rates.iter().copied().fold(0.0, f64::max),
                cpu_sink_per_m_median: median(list.iter().map(|r| r.cpu_sink).collect()) * 1e6
                    / n as f64,
                cpu_pg_per_m_median: median(list.iter().map(|r| r.cpu_pg).collect()) * 1e6
                    / n as f64,
                peak_rss_mb: list.iter().map(|r| r.rss_mb).fold(0.0, f64::max),
            });
        }
        let med = |p: Peer| {
            report
                .bulk
                .iter()
                .find(|b| b.encoding == *enc && b.peer == p)
                .map(|b| b.rows_per_s_median)
                .unwrap_or(f64::NAN)
        };
        if peers.len() == PEERS.len() {
            report
                .ratios
                .insert(enc.to_string(), med(Peer::Regionsync) / med(Peer::JdbcSink));
        }
    }
}
