//! regionsync under benchmark: a region-B worker (the release binary)
//! replaying one mirrored topic into a copy, and one timed bulk run of it,
//! measured until its stored offsets reach the topic's end.

use std::collections::HashMap;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tokio_postgres::Client;

use crate::copy::fresh_copy;
use crate::kafka::reached;
use crate::probe::{cpu_seconds, peak_rss_mb, postgres_b_cpu};
use crate::stack::{
    kafka_b, mirrored, pg_port_b, region_a, region_b, regionsync_password, registry_ccompat_url,
    root, HOST,
};
use crate::stats::{histogram_mean, histogram_percentiles};

/// A regionsync worker of region B (the release binary) applying
/// `<region A>.<source_topic>` into `bench.<copy>`.
pub struct Worker {
    pub child: std::process::Child,
    pub group: String,
    pub metrics_port: u16,
}

impl Worker {
    /// The consumer group of the worker applying into `bench.<copy>`.
    pub fn group_for(copy: &str) -> String {
        format!("bench-{copy}-{}", std::process::id())
    }

    pub fn start(source_topic: &str, copy: &str, source_table: &str) -> Worker {
        let group = Worker::group_for(copy);
        let metrics_port = std::net::TcpListener::bind(format!("{HOST}:0"))
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let toml = worker_toml(source_topic, copy, source_table, &group, metrics_port);
        let path = root().join(format!("target/bench/{copy}.toml"));
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, toml).unwrap();
        let child = Command::new(root().join("target/release/regionsync"))
            .arg("--config")
            .arg(&path)
            .arg("run")
            .env("REGIONSYNC_POSTGRES__PASSWORD", regionsync_password())
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()
            .expect("start target/release/regionsync (cargo build --release first)");
        Worker {
            child,
            group,
            metrics_port,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Stored offsets of the worker's group for `topic`.
    pub async fn stored(&self, b_admin: &Client, topic: &str) -> HashMap<i32, i64> {
        b_admin
            .query(
                "SELECT partition, next_offset FROM regionsync.offsets WHERE consumer_group = $1 AND topic = $2",
                &[&self.group, &topic],
            )
            .await
            .expect("offsets")
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect()
    }

    pub async fn metrics(&self) -> String {
        match reqwest::get(format!("http://{HOST}:{}/metrics", self.metrics_port)).await {
            Ok(r) => r.text().await.unwrap_or_default(),
            Err(_) => String::new(),
        }
    }

    /// SIGTERM (a clean stop), then wait for the exit.
    pub fn stop(mut self) {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        let _ = self.child.wait();
    }
}

/// One timed bulk run of a peer.
#[derive(Clone, Debug, serde::Serialize)]
pub struct RunResult {
    pub rows_per_s: f64,
    pub seconds: f64,
    /// Batch commit latency percentiles, where the peer reports them.
    pub p50: f64,
    pub p99: f64,
    /// Mean changes per applied batch, where the peer reports it.
    pub batch_rows: f64,
    pub rss_mb: f64,
    pub cpu_sink: f64,
    pub cpu_pg: f64,
}

/// Replays `<region A>.<source_topic>` (end offsets `ends`) with regionsync
/// into the empty copy `bench.<copy>`, timed until its stored offsets reach
/// the ends.
pub async fn run_regionsync(
    b_admin: &Client,
    source_topic: &str,
    source_table: &str,
    copy: &str,
    ends: &HashMap<i32, i64>,
    n: u64,
) -> RunResult {
    fresh_copy(b_admin, copy).await;
    let pg_before = postgres_b_cpu();
    let started = Instant::now();
    let worker = Worker::start(source_topic, copy, source_table);
    let topic = mirrored(source_topic);
    while !reached(ends, &worker.stored(b_admin, &topic).await) {
        assert!(
            started.elapsed() < Duration::from_secs(1800),
            "run did not finish in 30 min"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let seconds = started.elapsed().as_secs_f64();
    let cpu_sink = cpu_seconds(worker.pid());
    let rss_mb = peak_rss_mb(worker.pid());
    let metrics = worker.metrics().await;
    let (p50, p99) = histogram_percentiles(&metrics, "regionsync_apply_batch_seconds");
    let batch_rows = histogram_mean(&metrics, "regionsync_apply_batch_rows");
    let cpu_pg = postgres_b_cpu() - pg_before;
    worker.stop();
    RunResult {
        rows_per_s: n as f64 / seconds,
        seconds,
        p50,
        p99,
        batch_rows,
        rss_mb,
        cpu_sink,
        cpu_pg,
    }
}

/// The config of a region-B regionsync applying (or rebuilding)
/// `<region A>.<source_topic>` into `bench.<copy>` under consumer group
/// `group`.
pub fn worker_toml(
    source_topic: &str,
    copy: &str,
    source_table: &str,
    group: &str,
    metrics_port: u16,
) -> String {
    format!(
        r#"region = "{b}"
regions = ["{a}", "{b}"]
consumer_group = "{group}"
# A replay into an empty copy (a rebuild): the cached topics may be older
# than the tombstone grace.
late_changes = "apply"
[kafka]
bootstrap_servers = "{kafka}"
[schema_registry]
url = "{registry}"
[postgres]
host = "{HOST}"
port = {port}
dbname = "app"
user = "regionsync"
pool_size = 2
[metrics]
listen = "{HOST}:{metrics_port}"
[[tables]]
topics = ["{source_topic}"]
target = "bench.{copy}"
key = ["id"]
source_table = "public.{source_table}"
"#,
        a = region_a(),
        b = region_b(),
        kafka = kafka_b(),
        registry = registry_ccompat_url(),
        port = pg_port_b(),
    )
}

/// A free local port.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind(format!("{HOST}:0"))
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// One timed `regionsync rebuild` (the release binary) of `bench.<copy>`
/// from `<region A>.<source_topic>` (and B's own topic of the table, if
/// any), from process start to its exit; `n` changes make the rate.
/// `shadow`: `rebuild --shadow`, into a shadow table swapped in at the end
/// (the copy is then owned by the rebuild's role, which may create in
/// schema `bench`, as the swap needs). `options`: more of the rebuild's
/// options (`--chunk-rows N`, …), passed as they are.
pub async fn run_rebuild(
    b_admin: &Client,
    source_topic: &str,
    source_table: &str,
    copy: &str,
    n: u64,
    options: &[String],
    shadow: bool,
) -> RunResult {
    fresh_copy(b_admin, copy).await;
    if shadow {
        b_admin
            .batch_execute(&format!(
                // The swap renames the old table and creates in its schema.
                "ALTER TABLE bench.{copy} OWNER TO regionsync; GRANT CREATE ON SCHEMA bench TO regionsync"
            ))
            .await
            .expect("give the copy to regionsync");
    }
    let group = format!("bench-rebuild-{copy}-{}", std::process::id());
    let toml = worker_toml(source_topic, copy, source_table, &group, free_port());
    let path = root().join(format!("target/bench/{copy}-rebuild.toml"));
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(&path, toml).unwrap();
    let pg_before = postgres_b_cpu();
    let started = Instant::now();
    let child = Command::new(root().join("target/release/regionsync"))
        .arg("--config")
        .arg(&path)
        .arg("rebuild")
        .args(options)
        .args(shadow.then_some("--shadow"))
        .env("REGIONSYNC_POSTGRES__PASSWORD", regionsync_password())
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .spawn()
        .expect("start target/release/regionsync (cargo build --release first)");
    let pid = child.id();
    let sampler = crate::probe::RssSampler::start(pid);
    let cpu = crate::probe::ChildCpu::start(pid);
    let out = tokio::task::spawn_blocking(move || child.wait_with_output())
        .await
        .unwrap()
        .expect("rebuild");
    let seconds = started.elapsed().as_secs_f64();
    let cpu_pg = postgres_b_cpu() - pg_before;
    let rss_mb = sampler.stop();
    let cpu_sink = cpu.cpu();
    assert!(
        out.status.success(),
        "the rebuild failed: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    let said = String::from_utf8_lossy(&out.stdout);
    println!("  regionsync rebuild said: {}", said.trim());
    b_admin
        .execute(
            // The rebuild's own group (rebuild::group), and the worker's.
            "DELETE FROM regionsync.offsets WHERE consumer_group IN ($1, $1 || '-rebuild')",
            &[&group],
        )
        .await
        .expect("forget the rebuild's offsets");
    RunResult {
        rows_per_s: n as f64 / seconds,
        seconds,
        p50: 0.0,
        p99: 0.0,
        batch_rows: 0.0,
        rss_mb,
        cpu_sink,
        cpu_pg,
    }
}
