//! The live experiment: a writer inserts rows in region A at a steady rate;
//! for each row, latency = its commit time in B − its commit time in A,
//! both read from PostgreSQL (`pg_xact_commit_timestamp`), never from the
//! peers' own metrics. Each peer starts at the topic's current end, warms
//! up on a few seconds of rows, and then the measured window runs, with the
//! stage sampler (stages.rs) watching where the backlog is.

use std::collections::HashMap;
use std::sync::atomic::Ordering::SeqCst;
use std::sync::atomic::{AtomicBool, AtomicI64};
use std::sync::Arc;
use std::time::{Duration, Instant};

use regionsync_tools::copy::fresh_copy;
use regionsync_tools::kafka::{settled_ends, topic_ends};
use regionsync_tools::pg::checksum_where;
use regionsync_tools::probe::{cpu_seconds, postgres_b_cpu};
use regionsync_tools::source::{create_source_table, USER_COLUMNS, USER_VALUES};
use regionsync_tools::stack::{mirrored, region_a, region_b, stack_pid};
use regionsync_tools::stats::quantile;
use regionsync_tools::worker::Worker;
use serde::Serialize;
use tokio_postgres::Client;

use crate::connect::{AvroCapturePaused, Sink};
use crate::peer::{precommit, sink_config, Peer, SinkSettings};
use crate::report::Report;
use crate::stages::{sample_stages, StageBacklog};

const LIVE_TABLE: &str = "bench_live";
const WARMUP: Duration = Duration::from_secs(5);

#[derive(Clone, Debug, Serialize)]
pub struct LiveResult {
    pub peer: Peer,
    pub rate: u64,
    pub seconds: u64,
    pub rows: usize,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    /// p50 of the first and of the last tenth of the window: a backlog that
    /// grows shows as a later median far above the earlier one.
    pub p50_first_ms: f64,
    pub p50_last_ms: f64,
    /// From the writer's last commit until every row was in B.
    pub drain_s: f64,
    /// The rate the writer achieved, and its slowest insert (a busy machine
    /// shows here first).
    pub written_per_s: f64,
    pub slowest_insert_s: f64,
    pub cpu_sink_per_m: f64,
    pub cpu_pg_per_m: f64,
    /// Where the backlog was, sampled every second from the writer's first
    /// commit until every row was in B.
    pub stages: StageBacklog,
}

impl LiveResult {
    pub fn backlog_grows(&self) -> bool {
        self.p50_last_ms > 2.0 * self.p50_first_ms + 1000.0
    }
}

/// Inserts rows `first..` into A's live table at `rate` rows/s for
/// `duration`, in one transaction every 10 ms (more rows in one if the
/// previous insert took longer); returns the next free id and the slowest
/// insert's seconds.
async fn write_steadily(
    a: &Client,
    first: i64,
    rate: u64,
    duration: Duration,
    progress: &AtomicI64,
) -> (i64, f64) {
    let insert = a
        .prepare(&format!(
            "INSERT INTO public.{LIVE_TABLE} ({USER_COLUMNS})
             SELECT {USER_VALUES} FROM generate_series($1::bigint, $2::bigint) g"
        ))
        .await
        .expect("prepare the live insert");
    let started = Instant::now();
    let mut next = first;
    let mut slowest = 0f64;
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        tick.tick().await;
        let elapsed = started.elapsed().min(duration);
        let due = first + (elapsed.as_secs_f64() * rate as f64) as i64;
        if due > next {
            let t = Instant::now();
            a.execute(&insert, &[&next, &(due - 1)])
                .await
                .expect("live insert");
            slowest = slowest.max(t.elapsed().as_secs_f64());
            next = due;
            progress.store(next, SeqCst);
        }
        if elapsed >= duration {
            return (next, slowest);
        }
    }
}

/// Commit time (ms since the epoch) of every row of `table` in `ids`.
async fn commit_times(c: &Client, table: &str, ids: (i64, i64)) -> HashMap<i64, f64> {
    c.query(
        &format!(
            "SELECT id, (extract(epoch FROM pg_xact_commit_timestamp(xmin)) * 1000)::float8
               FROM {table} WHERE id >= $1 AND id < $2"
        ),
        &[&ids.0, &ids.1],
    )
    .await
    .unwrap_or_else(|e| panic!("commit times of {table} (track_commit_timestamp on?): {e}"))
    .iter()
    .map(|r| (r.get(0), r.get(1)))
    .collect()
}

pub async fn count_ids(c: &Client, table: &str, ids: (i64, i64)) -> i64 {
    c.query_one(
        &format!("SELECT count(*) FROM {table} WHERE id >= $1 AND id < $2"),
        &[&ids.0, &ids.1],
    )
    .await
    .expect("count")
    .get(0)
}

/// Waits until B's copy holds all of `ids`; the seconds it took.
async fn wait_arrived(b: &Client, copy: &str, ids: (i64, i64)) -> f64 {
    let started = Instant::now();
    let want = ids.1 - ids.0;
    loop {
        let got = count_ids(b, &format!("bench.{copy}"), ids).await;
        if got >= want {
            return started.elapsed().as_secs_f64();
        }
        assert!(
            started.elapsed() < Duration::from_secs(600),
            "bench.{copy}: {got} of {want} live rows arrived in 600 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The live table in A and its mirrored topic in B.
pub async fn ensure_live_table(a: &Client) -> String {
    create_source_table(a, LIVE_TABLE).await;
    a.execute(
        &format!(
            "INSERT INTO public.{LIVE_TABLE} ({USER_COLUMNS}) SELECT {USER_VALUES} FROM generate_series(1, 10) g"
        ),
        &[],
    )
    .await
    .expect("first live rows");
    let topic = mirrored(&format!("cdc.public.{LIVE_TABLE}"));
    let started = Instant::now();
    while topic_ends(&topic).values().sum::<i64>() == 0 {
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "{topic} did not appear in B's Kafka in 120 s (Debezium A, MirrorMaker 2 running?)"
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    topic
}

#[allow(clippy::too_many_arguments)]
async fn run_live(
    a: &Client,
    b: &Client,
    topic: &str,
    peer: Peer,
    rate: u64,
    seconds: u64,
    next_id: &mut i64,
    settings: SinkSettings,
) -> LiveResult {
    let copy = format!("live_{}_{rate}", peer.short());
    fresh_copy(b, &copy).await;
    let prefix = format!("{}.", region_a());
    let source_topic = topic.trim_start_matches(&prefix);
    let start_at = settled_ends(topic);
    enum Running {
        Worker(Worker),
        Sink(Sink),
    }
    let running = match peer {
        Peer::Regionsync => {
            let group = Worker::group_for(&copy);
            for (p, o) in &start_at {
                b.execute(
                    "INSERT INTO regionsync.offsets (consumer_group, topic, partition, next_offset)
                     VALUES ($1, $2, $3, $4)",
                    &[&group, &topic, p, o],
                )
                .await
                .expect("store the start offsets");
            }
            Running::Worker(Worker::start(source_topic, &copy, LIVE_TABLE))
        }
        Peer::JdbcSink => {
            let group = format!("bench-jdbc-{copy}-{}", std::process::id());
            precommit(&group, topic, &start_at);
            let config = sink_config("json", topic, &group, &copy, settings);
            let sink = Sink::register(&format!("bench-{copy}"), &group, config).await;
            sink.wait_running().await;
            Running::Sink(sink)
        }
    };
    // Warm-up: the peer joins its group, connects and reaches steady state.
    let progress = Arc::new(AtomicI64::new(*next_id));
    let warm = (
        *next_id,
        write_steadily(a, *next_id, rate, WARMUP, &progress).await.0,
    );
    wait_arrived(b, &copy, warm).await;
    let sink_pid = match &running {
        Running::Worker(w) => w.pid(),
        Running::Sink(_) => stack_pid(&format!("connect-{}", region_b())),
    };
    let (cpu_before, pg_before) = (cpu_seconds(sink_pid), postgres_b_cpu());
    let (still_writing, done) = (
        Arc::new(AtomicBool::new(true)),
        Arc::new(AtomicBool::new(false)),
    );
    let sampler = tokio::spawn(sample_stages(
        format!("cdc.public.{LIVE_TABLE}"),
        topic.to_string(),
        copy.clone(),
        warm.1,
        progress.clone(),
        still_writing.clone(),
        done.clone(),
    ));
    let writing = Instant::now();
    let (end, slowest_insert_s) =
        write_steadily(a, warm.1, rate, Duration::from_secs(seconds), &progress).await;
    still_writing.store(false, SeqCst);
    let ids = (warm.1, end);
    let written_per_s = (end - warm.1) as f64 / writing.elapsed().as_secs_f64();
    *next_id = ids.1;
    let drain_s = wait_arrived(b, &copy, ids).await;
    done.store(true, SeqCst);
    let stages = sampler.await.expect("the stage sampler");
    let cpu_sink = cpu_seconds(sink_pid) - cpu_before;
    let cpu_pg = postgres_b_cpu() - pg_before;
    match running {
        Running::Worker(w) => w.stop(),
        Running::Sink(s) => s.delete().await,
    }
    let in_a = commit_times(a, &format!("public.{LIVE_TABLE}"), ids).await;
    let in_b = commit_times(b, &format!("bench.{copy}"), ids).await;
    let mut by_id: Vec<(i64, f64)> = in_b
        .iter()
        .filter_map(|(id, tb)| in_a.get(id).map(|ta| (*id, tb - ta)))
        .collect();
    assert_eq!(
        by_id.len(),
        (ids.1 - ids.0) as usize,
        "{} at {rate}/s: rows missing a commit time",
        peer.name()
    );
    by_id.sort_by_key(|(id, _)| *id);
    let tenth = (by_id.len() / 10).max(1);
    let p50_of = |part: &[(i64, f64)]| {
        let mut v: Vec<f64> = part.iter().map(|x| x.1).collect();
        v.sort_by(|x, y| x.total_cmp(y));
        quantile(&v, 0.5)
    };
    let (p50_first_ms, p50_last_ms) = (
        p50_of(&by_id[..tenth]),
        p50_of(&by_id[by_id.len() - tenth..]),
    );
    let mut lat: Vec<f64> = by_id.iter().map(|x| x.1).collect();
    lat.sort_by(|x, y| x.total_cmp(y));
    let rows = lat.len();
    // The copy must hold exactly what A holds for these rows.
    let range = format!("WHERE id >= {} AND id < {}", ids.0, ids.1);
    let want = checksum_where(a, &format!("public.{LIVE_TABLE}"), &range).await;
    let got = checksum_where(b, &format!("bench.{copy}"), &range).await;
    assert_eq!(
        got,
        want,
        "{} at {rate}/s: the copy differs from A",
        peer.name()
    );
    LiveResult {
        peer,
        rate,
        seconds,
        rows,
        p50_ms: quantile(&lat, 0.5),
        p99_ms: quantile(&lat, 0.99),
        max_ms: lat.last().copied().unwrap_or(f64::NAN),
        p50_first_ms,
        p50_last_ms,
        drain_s,
        written_per_s,
        slowest_insert_s,
        cpu_sink_per_m: cpu_sink * 1e6 / rows as f64,
        cpu_pg_per_m: cpu_pg * 1e6 / rows as f64,
        stages,
    }
}

/// The live experiment: for each rate, each peer of `peers` in turn, with
/// region A's Avro capture paused throughout; the results go into
/// `report.live`.
pub async fn run(
    a: &Client,
    b: &Client,
    rates: &[u64],
    peers: &[Peer],
    live_seconds: u64,
    settings: SinkSettings,
    report: &mut Report,
) {
    let topic = ensure_live_table(a).await;
    let _paused = AvroCapturePaused::pause();
    let mut next_id: i64 = 1_000;
    for rate in rates {
        for peer in peers.iter().copied() {
            let l = run_live(
                a,
                b,
                &topic,
                peer,
                *rate,
                live_seconds,
                &mut next_id,
                settings,
            )
            .await;
            println!(
                "live {rate}/s {}: p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms over {} rows; drain {:.1}s; written {:.0}/s, slowest insert {:.3}s; rows behind Debezium / MirrorMaker 2 / sink: {}",
                peer.name(),
                l.p50_ms,
                l.p99_ms,
                l.max_ms,
                l.rows,
                l.drain_s,
                l.written_per_s,
                l.slowest_insert_s,
                l.stages.summary()
            );
            report.live.push(l);
        }
    }
}
