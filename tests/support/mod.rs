//! Shared harness for the integration tests: the local two-region stack's
//! addresses (deploy/local/env.sh, overridable from the environment, read
//! through deploy/local/stack_env.rs like the tools' programs), clients
//! for its PostgreSQL and Kafka, and a reader that collects the events of one
//! row key from a topic. Tests isolate themselves by using fresh row keys.
#![allow(dead_code)]

pub mod kit;
#[path = "../../deploy/local/stack_env.rs"]
pub mod stack_env;
pub mod wide;

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use metrics_util::registry::{AtomicStorage, Registry};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Message, OwnedMessage};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

/// One region of the local stack.
#[derive(Clone, Debug)]
pub struct Region {
    pub name: String,
    pub pg_port: u16,
    pub kafka: String,
}

pub fn region_a() -> Region {
    Region {
        name: stack_env::REGION_A.get(),
        pg_port: stack_env::PG_PORT_A.get().parse().expect("PG_PORT_A"),
        kafka: format!("{}:{}", stack_env::HOST, stack_env::KAFKA_PORT_A.get()),
    }
}

pub fn region_b() -> Region {
    Region {
        name: stack_env::REGION_B.get(),
        pg_port: stack_env::PG_PORT_B.get().parse().expect("PG_PORT_B"),
        kafka: format!("{}:{}", stack_env::HOST, stack_env::KAFKA_PORT_B.get()),
    }
}

/// The registry's Confluent-compatible API, shared by both regions.
pub fn registry_ccompat_url() -> String {
    format!(
        "http://{}:{}/apis/ccompat/v7",
        stack_env::HOST,
        stack_env::REGISTRY_PORT.get()
    )
}

/// The name MirrorMaker 2 gives, in the other region, to `topic` of `source`.
pub fn mirrored(source: &Region, topic: &str) -> String {
    format!("{}.{}", source.name, topic)
}

/// A row key no other test (nor an earlier run) uses.
pub fn fresh_key() -> i64 {
    static NEXT: AtomicI64 = AtomicI64::new(0);
    let micros = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_micros() as i64;
    micros * 8 + NEXT.fetch_add(1, Ordering::Relaxed) % 8
}

pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_millis() as i64
}

/// A connection to `region`'s database `app` as the application's role.
pub async fn app_db(region: &Region) -> tokio_postgres::Client {
    let conn = format!(
        "host={} port={} dbname=app user=app password={}",
        stack_env::HOST,
        region.pg_port,
        stack_env::APP_PASSWORD.get()
    );
    let (client, connection) = tokio_postgres::connect(&conn, tokio_postgres::NoTls)
        .await
        .unwrap_or_else(|e| panic!("connect to PostgreSQL of {}: {e}", region.name));
    tokio::spawn(async move {
        let _ = connection.await;
    });
    client
}

/// A connection to `region`'s database `app` as the superuser (the local
/// stack trusts it over loopback), to read regionsync's own tables.
pub async fn admin_db(region: &Region) -> tokio_postgres::Client {
    let conn = format!(
        "host={} port={} dbname=app user=postgres",
        stack_env::HOST,
        region.pg_port
    );
    let (client, connection) = tokio_postgres::connect(&conn, tokio_postgres::NoTls)
        .await
        .unwrap_or_else(|e| panic!("connect to PostgreSQL of {} as postgres: {e}", region.name));
    tokio::spawn(async move {
        let _ = connection.await;
    });
    client
}

/// Reads a topic of `region`'s Kafka from the beginning and keeps the events
/// whose key matches, in offset order per partition.
pub struct TopicReader {
    consumer: BaseConsumer,
    topic: String,
}

impl TopicReader {
    /// Waits (up to `deadline`) for the topic to exist, then assigns all of
    /// its partitions from their first offset. No consumer group is joined.
    pub fn open(region: &Region, topic: &str, deadline: Instant) -> TopicReader {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &region.kafka)
            .set("group.id", "regionsync-tests-unused")
            .set("enable.auto.commit", "false")
            .set("allow.auto.create.topics", "false")
            // A topic MirrorMaker 2 has just created may not answer the
            // first-offset lookup yet; librdkafka's fallback must then still
            // be the first offset, not the end (the default).
            .set("auto.offset.reset", "earliest")
            .create()
            .expect("kafka consumer");
        let partitions = loop {
            let md = consumer.fetch_metadata(Some(topic), Duration::from_secs(5));
            let found = md.ok().and_then(|md| {
                md.topics()
                    .iter()
                    .find(|t| t.name() == topic && t.error().is_none())
                    .map(|t| t.partitions().len())
                    .filter(|n| *n > 0)
            });
            if let Some(n) = found {
                break n;
            }
            assert!(
                Instant::now() < deadline,
                "topic {topic} did not appear on {} ({}) in time",
                region.kafka,
                region.name
            );
            std::thread::sleep(Duration::from_millis(500));
        };
        let mut tpl = TopicPartitionList::new();
        for p in 0..partitions as i32 {
            tpl.add_partition_offset(topic, p, Offset::Beginning)
                .expect("partition offset");
        }
        consumer.assign(&tpl).expect("assign");
        TopicReader {
            consumer,
            topic: topic.to_string(),
        }
    }

    /// Every message now on the topic: reads each partition up to the high
    /// watermark it had when called.
    pub fn read_all(&self, deadline: Instant) -> Vec<OwnedMessage> {
        let mut remaining: HashMap<i32, i64> = HashMap::new();
        let partitions = self.consumer.assignment().expect("assignment");
        for elem in partitions.elements() {
            let (low, high) = self
                .consumer
                .fetch_watermarks(&self.topic, elem.partition(), Duration::from_secs(5))
                .expect("watermarks");
            if high > low {
                remaining.insert(elem.partition(), high);
            }
        }
        let mut out = Vec::new();
        while !remaining.is_empty() {
            assert!(
                Instant::now() < deadline,
                "reading {} to its end timed out",
                self.topic
            );
            if let Some(Ok(msg)) = self.consumer.poll(Duration::from_millis(200)) {
                let msg = msg.detach();
                if let Some(high) = remaining.get(&msg.partition()) {
                    if msg.offset() + 1 >= *high {
                        remaining.remove(&msg.partition());
                    }
                    out.push(msg);
                }
            }
        }
        out
    }

    /// Polls until `done(events so far)` holds or `deadline` passes; returns
    /// the matching events in the order they were read.
    pub fn collect(
        &self,
        deadline: Instant,
        matches: impl Fn(&OwnedMessage) -> bool,
        done: impl Fn(&[OwnedMessage]) -> bool,
    ) -> Vec<OwnedMessage> {
        let mut found = Vec::new();
        while !done(&found) {
            if Instant::now() >= deadline {
                break;
            }
            match self.consumer.poll(Duration::from_millis(200)) {
                Some(Ok(msg)) => {
                    let msg = msg.detach();
                    if matches(&msg) {
                        found.push(msg);
                    }
                }
                Some(Err(e)) => eprintln!("kafka poll on {}: {e}", self.topic),
                None => {}
            }
        }
        found
    }
}

/// The `payload` part of a JSON-with-schemas message body (key or value).
pub fn json_payload(bytes: Option<&[u8]>) -> Option<serde_json::Value> {
    let bytes = bytes?;
    let v: serde_json::Value = serde_json::from_slice(bytes).expect("message is JSON");
    Some(
        v.get("payload")
            .cloned()
            .expect("JSON with schemas has a payload"),
    )
}

/// Headers of a message as strings (Debezium and MM2 headers are text).
pub fn headers(msg: &OwnedMessage) -> HashMap<String, String> {
    use rdkafka::message::Headers;
    let mut out = HashMap::new();
    if let Some(h) = msg.headers() {
        for header in h.iter() {
            let value = header
                .value
                .map(|v| String::from_utf8_lossy(v).into_owned())
                .unwrap_or_default();
            out.insert(header.key.to_string(), value);
        }
    }
    out
}

pub fn repo_root() -> std::path::PathBuf {
    std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Counters (and gauges) recorded by in-process workers, read where they
/// are kept: a counter's total since the test binary started, a gauge's
/// last value. (metrics-util's debugging recorder drains both on each
/// read, so a gauge read twice read 0 the second time.) Installed once
/// per test binary; tests use their own tables and labels.
pub struct Counters {
    registry: Arc<Registry<metrics::Key, AtomicStorage>>,
}

/// The recorder behind [`Counters`]: atomic storage, nothing drained.
struct TestRecorder(Arc<Registry<metrics::Key, AtomicStorage>>);

impl metrics::Recorder for TestRecorder {
    fn describe_counter(
        &self,
        _: metrics::KeyName,
        _: Option<metrics::Unit>,
        _: metrics::SharedString,
    ) {
    }
    fn describe_gauge(
        &self,
        _: metrics::KeyName,
        _: Option<metrics::Unit>,
        _: metrics::SharedString,
    ) {
    }
    fn describe_histogram(
        &self,
        _: metrics::KeyName,
        _: Option<metrics::Unit>,
        _: metrics::SharedString,
    ) {
    }

    fn register_counter(&self, key: &metrics::Key, _: &metrics::Metadata<'_>) -> metrics::Counter {
        self.0
            .get_or_create_counter(key, |c| metrics::Counter::from_arc(c.clone()))
    }

    fn register_gauge(&self, key: &metrics::Key, _: &metrics::Metadata<'_>) -> metrics::Gauge {
        self.0
            .get_or_create_gauge(key, |g| metrics::Gauge::from_arc(g.clone()))
    }

    fn register_histogram(
        &self,
        key: &metrics::Key,
        _: &metrics::Metadata<'_>,
    ) -> metrics::Histogram {
        self.0
            .get_or_create_histogram(key, |h| metrics::Histogram::from_arc(h.clone()))
    }
}

pub fn counters() -> &'static Counters {
    static COUNTERS: std::sync::OnceLock<Counters> = std::sync::OnceLock::new();
    COUNTERS.get_or_init(|| {
        let registry = Arc::new(Registry::atomic());
        metrics::set_global_recorder(TestRecorder(registry.clone()))
            .expect("no other metrics recorder in tests");
        Counters { registry }
    })
}

/// Whether `key` is `name` with (at least) `labels`.
fn matches(key: &metrics::Key, name: &str, labels: &[(&str, &str)]) -> bool {
    key.name() == name
        && labels
            .iter()
            .all(|(k, v)| key.labels().any(|l| l.key() == *k && l.value() == *v))
}

impl Counters {
    /// The total of counter `name` over every label set that includes `labels`.
    pub fn total(&self, name: &str, labels: &[(&str, &str)]) -> u64 {
        let mut total = 0;
        self.registry.visit_counters(|key, c| {
            if matches(key, name, labels) {
                total += c.load(std::sync::atomic::Ordering::Acquire);
            }
        });
        total
    }

    /// The sum of the last values of gauge `name` over every label set that
    /// includes `labels`.
    pub fn gauge(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let mut sum = 0.0;
        self.registry.visit_gauges(|key, g| {
            if matches(key, name, labels) {
                sum += f64::from_bits(g.load(std::sync::atomic::Ordering::Acquire));
            }
        });
        sum
    }
}

/// The stack's state directory: target/stack/, or `STACK_DIR`.
pub fn stack_dir() -> std::path::PathBuf {
    stack_env::state_dir(&repo_root())
}

/// The pid the stack recorded for `service` (`stack_dir()/pids/`).
pub fn stack_pid(service: &str) -> String {
    std::fs::read_to_string(stack_dir().join(format!("pids/{service}.pid")))
        .unwrap_or_else(|e| panic!("pid of {service}: {e}"))
        .trim()
        .to_string()
}

/// PostgreSQL B's postmaster and its children (to SIGSTOP the whole
/// server in a test).
pub fn postgres_b_processes() -> Vec<String> {
    let postmaster = stack_pid(&format!("postgres-{}", region_b().name));
    let children = std::process::Command::new("pgrep")
        .arg("-P")
        .arg(&postmaster)
        .output()
        .expect("pgrep");
    let mut pids: Vec<String> = String::from_utf8_lossy(&children.stdout)
        .split_whitespace()
        .map(str::to_string)
        .collect();
    pids.push(postmaster);
    pids
}

/// The parent of PostgreSQL B's postmaster (the stack's `runuser`), if it
/// has one: it stops itself when its child is stopped and must be
/// continued too, or it never reaps the postmaster when that exits.
pub fn postgres_b_parent() -> Option<String> {
    let postmaster = stack_pid(&format!("postgres-{}", region_b().name));
    let out = std::process::Command::new("ps")
        .args(["-o", "ppid=", "-p", &postmaster])
        .output()
        .expect("ps");
    Some(String::from_utf8_lossy(&out.stdout).trim().to_string())
        .filter(|p| !p.is_empty() && p != "1")
}

/// Runs a command to completion (off the async worker) and asserts success.
pub fn run(cmd: &mut std::process::Command) {
    let status = tokio::task::block_in_place(|| cmd.status()).expect("run command");
    assert!(status.success(), "{cmd:?} failed: {status}");
}
