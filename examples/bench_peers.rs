//! `make bench-peers`: regionsync side by side with the Debezium JDBC sink
//! connector (Kafka Connect), on the same mirrored Debezium events, in the
//! same run, on the same machine.
//!
//! 1. Bulk apply: the N cached changes of `make bench` (examples/bench.rs),
//!    in JSON with schemas and in Avro, replayed from the first offset into
//!    an empty copy of the table in region B by each peer in turn —
//!    regionsync (the release binary) and the JDBC sink (registered on
//!    region B's Connect worker) — R runs each, alternating. A run is timed
//!    from its start until the peer's stored (regionsync) or committed
//!    (Connect) offsets reach the topic's end; the copy is then compared
//!    with A's table, and a run whose copy differs fails the bench.
//! 2. Live end-to-end latency: a writer inserts rows in region A at a steady
//!    rate for a while; for each row, latency = its commit time in B − its
//!    commit time in A, both read from PostgreSQL
//!    (`pg_xact_commit_timestamp`, `track_commit_timestamp = on`), never
//!    from the peers' own metrics. Each peer starts at the topic's current
//!    end, warms up on a few seconds of rows, and then the measured window
//!    runs.
//!
//! The table is printed at the end and written to `target/bench/peers.md`,
//! `target/bench/peers.json` and a chart, `target/bench/peers.svg`.
//!
//! ```text
//! cargo run --release --example bench_peers [-- --changes N --runs R
//!     --rates 1000,5000 --live-seconds 60 --sink-batch 4000 --sink-tasks 4
//!     --only jdbc|regionsync | --source-only]
//! ```

mod support;

use std::collections::HashMap;
use std::fmt::Write as _;
use std::process::Command;
use std::sync::atomic::Ordering::SeqCst;
use std::sync::atomic::{AtomicBool, AtomicI64};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::{Offset, TopicPartitionList};
use serde::Serialize;
use support::*;
use tokio_postgres::Client;

const CONNECT_A: &str = "http://127.0.0.1:18083";
const CONNECT_B: &str = "http://127.0.0.1:28083";
const REGISTRY_URL: &str = "http://127.0.0.1:18081/apis/registry/v2";
const LIVE_TABLE: &str = "bench_live";
const WARMUP: Duration = Duration::from_secs(5);

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
enum Peer {
    Regionsync,
    JdbcSink,
}

impl Peer {
    fn name(self) -> &'static str {
        match self {
            Peer::Regionsync => "regionsync",
            Peer::JdbcSink => "Debezium JDBC sink",
        }
    }
    fn short(self) -> &'static str {
        match self {
            Peer::Regionsync => "rs",
            Peer::JdbcSink => "jdbc",
        }
    }
}

const PEERS: [Peer; 2] = [Peer::Regionsync, Peer::JdbcSink];

/// The JDBC sink's settings under test (`--sink-batch`, `--sink-tasks`).
#[derive(Clone, Copy, Debug, Serialize)]
struct SinkSettings {
    batch_size: u64,
    tasks: u64,
}

fn list_arg(name: &str, default: &[u64]) -> Vec<u64> {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .map(|v| v.split(',').filter_map(|x| x.trim().parse().ok()).collect())
        .unwrap_or_else(|| default.to_vec())
}

// ---------------------------------------------------------------------------
// The JDBC sink on Connect B

/// `connectors/debezium-jdbc-sink[-avro].json` with its placeholders filled.
fn sink_config(encoding: &str, topic: &str, group: &str, copy: &str, s: SinkSettings) -> String {
    let file = match encoding {
        "avro" => "connectors/debezium-jdbc-sink-avro.json",
        _ => "connectors/debezium-jdbc-sink.json",
    };
    let template = std::fs::read_to_string(root().join(file)).expect(file);
    let values = [
        ("SINK_TASKS", s.tasks.to_string()),
        ("SINK_TOPICS", topic.to_string()),
        ("SINK_GROUP", group.to_string()),
        ("PG_HOST", "127.0.0.1".into()),
        ("PG_PORT", PG_PORT_B.to_string()),
        ("PG_DATABASE", "app".into()),
        ("SINK_USER", "regionsync".into()),
        ("SINK_TABLE_FORMAT", format!("bench.{copy}")),
        ("SINK_BATCH_SIZE", s.batch_size.to_string()),
        ("REGISTRY_URL", REGISTRY_URL.into()),
    ];
    let mut out = template;
    for (k, v) in values {
        out = out.replace(&format!("{{{{{k}}}}}"), &v);
    }
    assert!(
        !out.contains("{{"),
        "{file}: a placeholder is left unfilled"
    );
    out
}

struct Sink {
    name: String,
    group: String,
    http: reqwest::Client,
}

impl Sink {
    async fn register(name: &str, group: &str, config: String) -> Sink {
        let http = reqwest::Client::new();
        let r = http
            .put(format!("{CONNECT_B}/connectors/{name}/config"))
            .header("Content-Type", "application/json")
            .body(config)
            .send()
            .await
            .expect("Connect B's REST API (is the stack up?)");
        let status = r.status();
        assert!(
            status.is_success(),
            "registering {name} on Connect B: {status}: {}",
            r.text().await.unwrap_or_default()
        );
        Sink {
            name: name.into(),
            group: group.into(),
            http,
        }
    }

    /// Ok(true) once the connector and all its tasks run; Err with the trace
    /// of a failed task.
    async fn running(&self) -> Result<bool, String> {
        let Ok(r) = self
            .http
            .get(format!("{CONNECT_B}/connectors/{}/status", self.name))
            .send()
            .await
        else {
            return Ok(false);
        };
        let Ok(v) = r.json::<serde_json::Value>().await else {
            return Ok(false);
        };
        let tasks = v["tasks"].as_array().cloned().unwrap_or_default();
        if let Some(failed) = tasks.iter().find(|t| t["state"] == "FAILED") {
            let trace = failed["trace"].as_str().unwrap_or("");
            return Err(trace.lines().take(12).collect::<Vec<_>>().join("\n"));
        }
        Ok(v["connector"]["state"] == "RUNNING"
            && !tasks.is_empty()
            && tasks.iter().all(|t| t["state"] == "RUNNING"))
    }

    async fn wait_running(&self) {
        let started = Instant::now();
        loop {
            match self.running().await {
                Ok(true) => return,
                Ok(false) => {}
                Err(trace) => panic!("{}: a task failed:\n{trace}", self.name),
            }
            assert!(
                started.elapsed() < Duration::from_secs(120),
                "{} not running after 120 s",
                self.name
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    async fn delete(self) {
        let _ = self
            .http
            .delete(format!("{CONNECT_B}/connectors/{}", self.name))
            .send()
            .await;
        // The worker stops the tasks asynchronously; let it finish before
        // the next peer's run is timed.
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(30) {
            let gone = self
                .http
                .get(format!("{CONNECT_B}/connectors/{}", self.name))
                .send()
                .await
                .map(|r| r.status() == reqwest::StatusCode::NOT_FOUND)
                .unwrap_or(false);
            if gone {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}

/// The offsets the group has committed for `topic` in B's Kafka.
fn committed(group: &str, topic: &str, ends: &HashMap<i32, i64>) -> HashMap<i32, i64> {
    let consumer = kafka_b_consumer(group);
    let mut tpl = TopicPartitionList::new();
    for p in ends.keys() {
        tpl.add_partition(topic, *p);
    }
    match consumer.committed_offsets(tpl, Duration::from_secs(5)) {
        Ok(c) => c
            .elements()
            .iter()
            .filter_map(|e| match e.offset() {
                Offset::Offset(o) => Some((e.partition(), o)),
                _ => None,
            })
            .collect(),
        Err(_) => HashMap::new(),
    }
}

/// Commits `positions` for a group that has no members yet, so that a sink
/// started afterwards in that group begins exactly there.
fn precommit(group: &str, topic: &str, positions: &HashMap<i32, i64>) {
    let consumer = kafka_b_consumer(group);
    let mut tpl = TopicPartitionList::new();
    for (p, o) in positions {
        tpl.add_partition_offset(topic, *p, Offset::Offset(*o))
            .unwrap();
    }
    consumer
        .commit(&tpl, CommitMode::Sync)
        .unwrap_or_else(|e| panic!("commit start offsets for {group}: {e}"));
}

async fn run_jdbc_sink(
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
    let connect = stack_pid("connect-eu-west-1");
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

// ---------------------------------------------------------------------------
// Live end-to-end latency

#[derive(Clone, Debug, Serialize)]
struct LiveResult {
    peer: Peer,
    rate: u64,
    seconds: u64,
    rows: usize,
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
    /// p50 of the first and of the last tenth of the window: a backlog that
    /// grows shows as a later median far above the earlier one.
    p50_first_ms: f64,
    p50_last_ms: f64,
    /// From the writer's last commit until every row was in B.
    drain_s: f64,
    /// The rate the writer achieved, and its slowest insert (a busy machine
    /// shows here first).
    written_per_s: f64,
    slowest_insert_s: f64,
    cpu_sink_per_m: f64,
    cpu_pg_per_m: f64,
    /// Where the backlog was, sampled every second from the writer's first
    /// commit until every row was in B.
    stages: StageBacklog,
}

/// Rows behind at each stage of the path, in rows (one change event each):
/// Debezium A (committed in A, not yet in Kafka A), MirrorMaker 2 (in Kafka
/// A, not yet in Kafka B) and the sink under test (in Kafka B, not yet in
/// B's copy). The largest sample, and the sample when the writer stopped.
#[derive(Clone, Debug, Default, Serialize)]
struct StageBacklog {
    debezium_max: i64,
    mirrormaker_max: i64,
    sink_max: i64,
    debezium_at_end: i64,
    mirrormaker_at_end: i64,
    sink_at_end: i64,
    samples: usize,
}

impl StageBacklog {
    fn summary(&self) -> String {
        format!(
            "{} / {} / {} (max), {} / {} / {} (writer's end)",
            self.debezium_max,
            self.mirrormaker_max,
            self.sink_max,
            self.debezium_at_end,
            self.mirrormaker_at_end,
            self.sink_at_end
        )
    }
}

/// Samples [`StageBacklog`] each second until `done` is set. `written` is
/// the writer's next id; `writing` is cleared when the writer stops.
async fn sample_stages(
    source_topic: String,
    mirrored_topic: String,
    copy: String,
    first_id: i64,
    written: Arc<AtomicI64>,
    writing: Arc<AtomicBool>,
    done: Arc<AtomicBool>,
) -> StageBacklog {
    let b = connect(PG_PORT_B, "postgres", "").await;
    // One consumer per Kafka for the whole window: the box is saturated
    // while it is sampled, so no new client every second.
    let consumers = Arc::new((
        kafka_consumer(KAFKA_A, "bench-unused"),
        kafka_b_consumer("bench-unused"),
    ));
    // Messages in the source topic in Kafka A and in its copy in Kafka B.
    let ends = || {
        let (consumers, source, mirrored) = (
            consumers.clone(),
            source_topic.clone(),
            mirrored_topic.clone(),
        );
        tokio::task::spawn_blocking(move || {
            let (a, b) = &*consumers;
            let sum = |c: &BaseConsumer, t: &str| ends_seen_by(c, t).values().sum::<i64>();
            (sum(a, &source), sum(b, &mirrored))
        })
    };
    let (base_a, base_b) = ends().await.expect("topic ends");
    let mut s = StageBacklog::default();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut was_writing = true;
    while !done.load(SeqCst) {
        tick.tick().await;
        let still_writing = writing.load(SeqCst);
        let committed = written.load(SeqCst) - first_id;
        let (in_a, in_b) = ends().await.expect("topic ends");
        let (in_a, in_b) = (in_a - base_a, in_b - base_b);
        let applied = count_ids(&b, &format!("bench.{copy}"), (first_id, i64::MAX)).await;
        let (dbz, mm2, sink) = (
            (committed - in_a).max(0),
            (in_a - in_b).max(0),
            (in_b - applied).max(0),
        );
        s.debezium_max = s.debezium_max.max(dbz);
        s.mirrormaker_max = s.mirrormaker_max.max(mm2);
        s.sink_max = s.sink_max.max(sink);
        if was_writing && !still_writing {
            (s.debezium_at_end, s.mirrormaker_at_end, s.sink_at_end) = (dbz, mm2, sink);
        }
        was_writing = still_writing;
        s.samples += 1;
    }
    s
}

impl LiveResult {
    fn backlog_grows(&self) -> bool {
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

async fn count_ids(c: &Client, table: &str, ids: (i64, i64)) -> i64 {
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
async fn ensure_live_table(a: &Client) -> String {
    create_source_table(a, LIVE_TABLE).await;
    a.execute(
        &format!(
            "INSERT INTO public.{LIVE_TABLE} ({USER_COLUMNS}) SELECT {USER_VALUES} FROM generate_series(1, 10) g"
        ),
        &[],
    )
    .await
    .expect("first live rows");
    let topic = format!("us-east-1.cdc.public.{LIVE_TABLE}");
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

/// Region A's Avro capture connector, paused for the live phase and resumed
/// when this is dropped. The live rows travel on the JSON topic only, but
/// both connectors capture every table, and on two cores the second capture
/// in the same Connect worker was the largest cost on the path: at 5,000
/// writes/s Connect A took 18 of the box's 60 CPU seconds per 30 s, the
/// backlog built up before Kafka A (rows behind Debezium 132,368, behind
/// MirrorMaker 2 at most 5,280, behind regionsync at most 1,048), and the
/// writer fell short of its rate. Both peers run under the same condition.
struct AvroCapturePaused;

impl AvroCapturePaused {
    const NAME: &'static str = "cdc-avro";

    fn pause() -> Self {
        assert!(
            Self::request("pause"),
            "pausing {} on Connect A failed",
            Self::NAME
        );
        let started = Instant::now();
        while Self::task_state().as_deref() != Some("PAUSED") {
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "{} on Connect A not paused after 60 s",
                Self::NAME
            );
            std::thread::sleep(Duration::from_millis(500));
        }
        println!("live phase: {} on Connect A paused", Self::NAME);
        AvroCapturePaused
    }

    fn request(action: &str) -> bool {
        Command::new("curl")
            .args(["-fsS", "-X", "PUT"])
            .arg(format!("{CONNECT_A}/connectors/{}/{action}", Self::NAME))
            .status()
            .is_ok_and(|s| s.success())
    }

    fn task_state() -> Option<String> {
        let out = Command::new("curl")
            .arg("-fsS")
            .arg(format!("{CONNECT_A}/connectors/{}/status", Self::NAME))
            .output()
            .ok()?;
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        v["tasks"][0]["state"].as_str().map(str::to_owned)
    }
}

impl Drop for AvroCapturePaused {
    fn drop(&mut self) {
        // Not an assert: this may run while a panic unwinds.
        if Self::request("resume") {
            println!("live phase over: {} on Connect A resumed", Self::NAME);
        } else {
            eprintln!(
                "resuming {} on Connect A failed: resume it by hand (curl -X PUT {CONNECT_A}/connectors/{}/resume)",
                Self::NAME,
                Self::NAME
            );
        }
    }
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
    let source_topic = topic.trim_start_matches("us-east-1.");
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
        Running::Sink(_) => stack_pid("connect-eu-west-1"),
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

async fn checksum_where(c: &Client, table: &str, filter: &str) -> String {
    c.query_one(
        &format!("SELECT count(*)::text || ':' || coalesce(md5(string_agg(t::text, '|' ORDER BY id)), '') FROM {table} t {filter}"),
        &[],
    )
    .await
    .expect("checksum")
    .get(0)
}

// ---------------------------------------------------------------------------
// Report

#[derive(Serialize)]
struct BulkSummary {
    encoding: String,
    peer: Peer,
    runs: Vec<RunResult>,
    rows_per_s_median: f64,
    rows_per_s_min: f64,
    rows_per_s_max: f64,
    cpu_sink_per_m_median: f64,
    cpu_pg_per_m_median: f64,
    peak_rss_mb: f64,
}

#[derive(Serialize)]
struct Report {
    machine: String,
    changes: u64,
    runs: u64,
    sink_settings: SinkSettings,
    bulk: Vec<BulkSummary>,
    ratios: HashMap<String, f64>,
    live: Vec<LiveResult>,
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .map(|s| s.trim().to_string())
        .unwrap_or_default();
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let mem_gib = std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<f64>().ok())
        .unwrap_or(0.0)
        / 1024.0
        / 1024.0;
    format!("{cores} cores ({cpu}), {mem_gib:.0} GiB, everything on one box")
}

fn markdown(r: &Report) -> String {
    let mut md = String::new();
    let _ = writeln!(md, "# regionsync vs the Debezium JDBC sink\n");
    let _ = writeln!(
        md,
        "Machine: {}. Command: `make bench-peers` (N = {}, {} runs per peer and input, alternating). JDBC sink: batch.size = max.poll.records = {}, tasks.max = {}, reduction buffer, reWriteBatchedInserts.\n",
        r.machine, r.changes, r.runs, r.sink_settings.batch_size, r.sink_settings.tasks
    );
    if !r.bulk.is_empty() {
        let _ = writeln!(
            md,
            "## Bulk apply ({} changes to users, replayed from the first offset)\n",
            r.changes
        );
        let _ = writeln!(md, "| input | peer | rows/s median | min | max | CPU s / 1M events (sink) | CPU s / 1M (PostgreSQL) | peak RSS MB |");
        let _ = writeln!(md, "|---|---|---:|---:|---:|---:|---:|---:|");
        for b in &r.bulk {
            let _ = writeln!(
                md,
                "| {} | {} | {:.0} | {:.0} | {:.0} | {:.1} | {:.1} | {:.0} |",
                b.encoding,
                b.peer.name(),
                b.rows_per_s_median,
                b.rows_per_s_min,
                b.rows_per_s_max,
                b.cpu_sink_per_m_median,
                b.cpu_pg_per_m_median,
                b.peak_rss_mb
            );
        }
        let _ = writeln!(md);
        let mut ratios: Vec<_> = r.ratios.iter().collect();
        ratios.sort_by(|a, b| a.0.cmp(b.0));
        for (enc, ratio) in ratios {
            let _ = writeln!(
                md,
                "- {enc}: regionsync / JDBC sink = **{ratio:.1}×** (medians)"
            );
        }
        let _ = writeln!(md);
    }
    if !r.live.is_empty() {
        let _ = writeln!(
            md,
            "## Live end-to-end latency (commit in B − commit in A, per row)\n"
        );
        let _ = writeln!(md, "| writes/s | peer | rows | p50 ms | p99 ms | max ms | p50 first/last tenth ms | drain s | backlog | rows behind Debezium / MM2 / sink, max | at the writer's end | CPU s / 1M (sink) | CPU s / 1M (PostgreSQL) |");
        let _ = writeln!(
            md,
            "|---:|---|---:|---:|---:|---:|---|---:|---|---|---|---:|---:|"
        );
        for l in &r.live {
            let _ = writeln!(
                md,
                "| {} | {} | {} | {:.0} | {:.0} | {:.0} | {:.0} / {:.0} | {:.1} | {} | {} / {} / {} | {} / {} / {} | {:.1} | {:.1} |",
                l.rate,
                l.peer.name(),
                l.rows,
                l.p50_ms,
                l.p99_ms,
                l.max_ms,
                l.p50_first_ms,
                l.p50_last_ms,
                l.drain_s,
                if l.backlog_grows() { "GROWS" } else { "steady" },
                l.stages.debezium_max,
                l.stages.mirrormaker_max,
                l.stages.sink_max,
                l.stages.debezium_at_end,
                l.stages.mirrormaker_at_end,
                l.stages.sink_at_end,
                l.cpu_sink_per_m,
                l.cpu_pg_per_m
            );
        }
        let _ = writeln!(md);
    }
    let _ = writeln!(md, "Sink CPU and RSS for the JDBC sink are those of region B's whole Connect worker JVM (it also hosts B's idle Debezium source connectors); for regionsync, of its process.");
    md
}

/// Two bar charts side by side: bulk rows/s per input and live p50/p99 per
/// rate, one colour per peer.
fn chart(r: &Report) -> String {
    let colour = |p: Peer| match p {
        Peer::Regionsync => "#1f77b4",
        Peer::JdbcSink => "#d62728",
    };
    let (w, h, top, bottom) = (960.0, 420.0, 50.0, 360.0);
    let mut svg = format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">
<rect width="100%" height="100%" fill="white"/>
"#
    );
    // (panel x, title, groups of (label, [(peer, value)]))
    let bulk: Vec<(String, Vec<(Peer, f64)>)> = ["json", "avro"]
        .iter()
        .map(|enc| {
            (
                enc.to_string(),
                r.bulk
                    .iter()
                    .filter(|b| b.encoding == *enc)
                    .map(|b| (b.peer, b.rows_per_s_median))
                    .collect(),
            )
        })
        .filter(|g: &(String, Vec<(Peer, f64)>)| !g.1.is_empty())
        .collect();
    let mut live: Vec<(String, Vec<(Peer, f64)>)> = Vec::new();
    let mut rates: Vec<u64> = r.live.iter().map(|l| l.rate).collect();
    rates.dedup();
    for rate in rates {
        for (q, pick) in [("p50", 0), ("p99", 1)] {
            live.push((
                format!("{rate}/s {q}"),
                r.live
                    .iter()
                    .filter(|l| l.rate == rate)
                    .map(|l| (l.peer, if pick == 0 { l.p50_ms } else { l.p99_ms }))
                    .collect(),
            ));
        }
    }
    for (x0, title, groups) in [
        (40.0, "bulk apply, rows/s (median)", bulk),
        (520.0, "live end-to-end latency, ms", live),
    ] {
        let max = groups
            .iter()
            .flat_map(|g| g.1.iter().map(|v| v.1))
            .filter(|v| v.is_finite())
            .fold(1.0, f64::max);
        let _ = writeln!(
            svg,
            r#"<text x="{}" y="25" font-size="14" font-weight="bold">{title}</text>"#,
            x0
        );
        let _ = writeln!(
            svg,
            r#"<line x1="{x0}" y1="{bottom}" x2="{}" y2="{bottom}" stroke="black"/>"#,
            x0 + 400.0
        );
        let slot = 400.0 / groups.len().max(1) as f64;
        for (i, (label, bars)) in groups.iter().enumerate() {
            let gx = x0 + i as f64 * slot;
            let bw = (slot - 20.0) / bars.len().max(1) as f64;
            for (j, (peer, v)) in bars.iter().enumerate() {
                let bh = if v.is_finite() {
                    v / max * (bottom - top)
                } else {
                    0.0
                };
                let bx = gx + 10.0 + j as f64 * bw;
                let _ = writeln!(
                    svg,
                    r#"<rect x="{bx:.1}" y="{:.1}" width="{:.1}" height="{bh:.1}" fill="{}"/><text x="{:.1}" y="{:.1}" text-anchor="middle" font-size="10">{v:.0}</text>"#,
                    bottom - bh,
                    bw - 4.0,
                    colour(*peer),
                    bx + (bw - 4.0) / 2.0,
                    bottom - bh - 4.0
                );
            }
            let _ = writeln!(
                svg,
                r#"<text x="{:.1}" y="{}" text-anchor="middle">{label}</text>"#,
                gx + slot / 2.0,
                bottom + 18.0
            );
        }
    }
    for (i, p) in PEERS.iter().enumerate() {
        let y = 395.0;
        let x = 40.0 + i as f64 * 200.0;
        let _ = writeln!(
            svg,
            r#"<rect x="{x}" y="{}" width="12" height="12" fill="{}"/><text x="{}" y="{y}">{}</text>"#,
            y - 10.0,
            colour(*p),
            x + 18.0,
            p.name()
        );
    }
    svg.push_str("</svg>\n");
    svg
}

#[tokio::main]
async fn main() {
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
    let a = connect(PG_PORT_A, "postgres", "").await;
    let b = connect(PG_PORT_B, "postgres", "").await;
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
            assert_uncompacted(&format!("us-east-1.{topic}")).await;
            let ends = settled_ends(&format!("us-east-1.{topic}"));
            println!(
                "{} messages on us-east-1.{topic} in B's Kafka",
                ends.values().sum::<i64>()
            );
        }
        return;
    }
    if runs > 0 {
        ensure_source(&a, n).await;
        let table = source_table(n);
        let want = checksum(&a, &format!("public.{table}")).await;
        let mut results: HashMap<(&str, Peer), Vec<RunResult>> = HashMap::new();
        let mut inputs = Vec::new();
        for (enc, topic) in ["json", "avro"].into_iter().zip(source_topics(&table)) {
            assert_uncompacted(&format!("us-east-1.{topic}")).await;
            let ends = settled_ends(&format!("us-east-1.{topic}"));
            println!(
                "{enc}: {} messages on us-east-1.{topic} in B's Kafka",
                ends.values().sum::<i64>()
            );
            inputs.push((enc, topic, ends));
        }
        for run in 0..runs {
            for (enc, topic, ends) in &inputs {
                // Alternate which peer goes first, so neither always runs on
                // a warmer cache.
                let mut order = peers.clone();
                if run % 2 == 1 {
                    order.reverse();
                }
                for peer in order {
                    let copy = format!("peer_{}_{enc}_{run}", peer.short());
                    let r = match peer {
                        Peer::Regionsync => run_regionsync(&b, topic, &table, &copy, ends, n).await,
                        Peer::JdbcSink => {
                            let mirrored = format!("us-east-1.{topic}");
                            run_jdbc_sink(&b, enc, &mirrored, &copy, ends, n, settings).await
                        }
                    };
                    let got = checksum(&b, &format!("bench.{copy}")).await;
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
                    drop_copy(&b, &copy).await;
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

    if live_seconds > 0 && !rates.is_empty() {
        let topic = ensure_live_table(&a).await;
        let _paused = AvroCapturePaused::pause();
        let mut next_id: i64 = 1_000;
        for rate in &rates {
            for peer in peers.iter().copied() {
                let l = run_live(
                    &a,
                    &b,
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

    let dir = root().join("target/bench");
    std::fs::create_dir_all(&dir).unwrap();
    let md = markdown(&report);
    std::fs::write(dir.join("peers.md"), &md).unwrap();
    std::fs::write(
        dir.join("peers.json"),
        serde_json::to_string_pretty(&report).unwrap(),
    )
    .unwrap();
    std::fs::write(dir.join("peers.svg"), chart(&report)).unwrap();
    println!("\n{md}");
    println!("written: target/bench/peers.md, target/bench/peers.json, target/bench/peers.svg");
}
