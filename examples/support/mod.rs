//! What `make bench` (examples/bench.rs), `make bench-decode`
//! (examples/bench_decode.rs) and `make bench-peers` (examples/bench_peers.rs)
//! share: the cached source changes in region A,
//! the mirrored topics' settled end offsets, a regionsync run into an empty
//! copy in region B, and the process and checksum probes that time and
//! verify every run.

#![allow(dead_code)] // each example uses its own subset

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::admin::{
    AdminClient, AdminOptions, AlterConfig, NewTopic, ResourceSpecifier, TopicReplication,
};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::RDKafkaErrorCode;
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use regionsync::apply::TargetTable;
use regionsync::config::TableConfig;
use tokio_postgres::{Client, NoTls};

pub const KAFKA_A: &str = "127.0.0.1:19092";
pub const KAFKA_B: &str = "127.0.0.1:29092";
/// The local stack's partitions per change topic (deploy/local/env.sh).
pub const TOPIC_PARTITIONS: i32 = 4;
pub const PG_PORT_A: u16 = 15432;
pub const PG_PORT_B: u16 = 25432;
pub const REGIONSYNC_PASSWORD: &str = "regionsync-local";

/// The replicas live in schema `bench`, outside the `regionsync_cdc`
/// publication (which covers `public`): otherwise region B's own Debezium
/// would capture every applied row and compete for the two cores, measuring
/// the stack rather than the apply path.
pub const BENCH_SCHEMA_SQL: &str = "CREATE SCHEMA IF NOT EXISTS bench;
     GRANT USAGE ON SCHEMA bench TO regionsync;";

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// `--name VALUE` from the command line, or `default`.
pub fn arg(name: &str, default: u64) -> u64 {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

pub async fn connect(port: u16, user: &str, password: &str) -> Client {
    let mut conn_str = format!("host=127.0.0.1 port={port} dbname=app user={user}");
    if !password.is_empty() {
        conn_str.push_str(&format!(" password={password}"));
    }
    let (client, conn) = tokio_postgres::connect(&conn_str, NoTls)
        .await
        .unwrap_or_else(|e| panic!("connect to 127.0.0.1:{port} as {user}: {e}"));
    tokio::spawn(async move {
        let _ = conn.await;
    });
    client
}

/// One pooled connection, as the worker's pool makes them: its statements
/// are prepared once and cached, like the worker's.
pub async fn connect_pooled(port: u16, user: &str) -> deadpool_postgres::Object {
    let mut config = tokio_postgres::Config::new();
    config.host("127.0.0.1").port(port).dbname("app").user(user);
    let manager = deadpool_postgres::Manager::from_config(
        config,
        NoTls,
        deadpool_postgres::ManagerConfig {
            recycling_method: deadpool_postgres::RecyclingMethod::Fast,
        },
    );
    let pool = deadpool_postgres::Pool::builder(manager)
        .max_size(1)
        .build()
        .expect("a pool");
    pool.get()
        .await
        .unwrap_or_else(|e| panic!("connect to 127.0.0.1:{port} as {user}: {e}"))
}

/// The source table of an N-change bench: one table (and so one topic) per
/// N, so that the topics of a differently sized earlier bench never mix in.
pub fn source_table(n: u64) -> String {
    format!("bench_src_{n}")
}

/// The change topics of source table `t` in region A, JSON then Avro
/// (connectors/debezium-postgres-*.json), and their mirrors in B.
pub fn source_topics(t: &str) -> [String; 2] {
    [format!("cdc.public.{t}"), format!("cdc.avro.public.{t}")]
}

fn admin(bootstrap: &str) -> AdminClient<DefaultClientContext> {
    ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .create()
        .expect("Kafka admin client")
}

/// The bench topics' configs: every change kept, nothing compacted.
const BENCH_TOPIC_CONFIGS: [(&str, &str); 3] = [
    ("cleanup.policy", "delete"),
    ("retention.ms", "-1"),
    ("retention.bytes", "-1"),
];

/// Creates the change topics of `t` in A before any change is written,
/// replacing older ones (and their mirrors in B). The connectors would
/// create them compacted (connectors/*.json: right for rebuilding a replica,
/// wrong for a benchmark): the log cleaner would then drop superseded
/// changes and a replay would apply fewer than N. These keep every change;
/// MirrorMaker 2 gives the mirrors the same config.
async fn create_uncompacted_topics(t: &str) {
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    let topics = source_topics(t);
    let mirrors: Vec<String> = topics.iter().map(|x| format!("us-east-1.{x}")).collect();
    let names: Vec<&str> = topics.iter().map(String::as_str).collect();
    let mirror_names: Vec<&str> = mirrors.iter().map(String::as_str).collect();
    let admin_a = admin(KAFKA_A);
    // Absent topics answer UnknownTopicOrPartition: nothing to delete.
    let _ = admin_a.delete_topics(&names, &opts).await;
    let _ = admin(KAFKA_B).delete_topics(&mirror_names, &opts).await;
    // A deletion completes asynchronously: until it has, the name is taken.
    let mut pending: Vec<&String> = topics.iter().collect();
    let consumer = kafka_consumer(KAFKA_A, "bench-unused");
    for _ in 0..60 {
        let new: Vec<NewTopic> = pending
            .iter()
            .map(|x| {
                BENCH_TOPIC_CONFIGS.iter().fold(
                    NewTopic::new(x, TOPIC_PARTITIONS, TopicReplication::Fixed(1)),
                    |topic, (k, v)| topic.set(k, v),
                )
            })
            .collect();
        let results = admin_a
            .create_topics(&new, &opts)
            .await
            .expect("create_topics");
        let mut still = Vec::new();
        for r in results {
            match r {
                Ok(_) => {}
                Err((name, RDKafkaErrorCode::TopicAlreadyExists)) => still.push(name),
                Err((name, e)) => panic!("creating the bench topic {name}: {e}"),
            }
        }
        pending = topics.iter().filter(|x| still.contains(x)).collect();
        if pending.is_empty() {
            return;
        }
        // A client's metadata request can re-create a deleted name at once
        // (auto.create.topics.enable; seen 90 ms after the deletion): an
        // empty topic is as good as a new one, given the bench's configs.
        let empty = |t: &String| {
            let ends = ends_seen_by(&consumer, t);
            ends.len() == TOPIC_PARTITIONS as usize && ends.values().all(|e| *e == 0)
        };
        if pending.iter().all(|t| empty(t)) {
            let configs: Vec<AlterConfig> = pending
                .iter()
                .map(|t| {
                    BENCH_TOPIC_CONFIGS.iter().fold(
                        AlterConfig::new(ResourceSpecifier::Topic(t)),
                        |config, (k, v)| config.set(k, v),
                    )
                })
                .collect();
            for r in admin_a
                .alter_configs(&configs, &opts)
                .await
                .expect("alter_configs")
            {
                r.unwrap_or_else(|(t, e)| panic!("configuring the bench topic {t:?}: {e}"));
            }
            return;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    panic!("the old bench topics {pending:?} were not deleted in 60 s");
}

/// Panics unless the mirrored topic `topic` in B keeps every message: a
/// compacted one (left by an older bench) would make a run apply fewer
/// changes than it is credited with.
pub async fn assert_uncompacted(topic: &str) {
    let opts = AdminOptions::new().request_timeout(Some(Duration::from_secs(30)));
    let results = admin(KAFKA_B)
        .describe_configs(&[ResourceSpecifier::Topic(topic)], &opts)
        .await
        .expect("describe_configs");
    let policy = results
        .into_iter()
        .next()
        .and_then(|r| r.ok())
        .and_then(|r| r.get("cleanup.policy").and_then(|e| e.value.clone()));
    assert_eq!(
        policy.as_deref(),
        Some("delete"),
        "{topic} in B's Kafka has cleanup.policy {policy:?}: the log cleaner may have dropped changes. \
         Delete its row from regionsync.bench_meta in A to regenerate the source"
    );
}

/// An empty copy of `public.users` in B's schema `bench`, writable by the
/// `regionsync` role (which the JDBC sink uses too).
pub async fn fresh_copy(b_admin: &Client, copy: &str) {
    b_admin
        .batch_execute(&format!(
            "{BENCH_SCHEMA_SQL}
             DROP TABLE IF EXISTS bench.{copy};
             CREATE TABLE bench.{copy} (LIKE public.users INCLUDING DEFAULTS INCLUDING CONSTRAINTS INCLUDING INDEXES);
             GRANT ALL ON bench.{copy} TO regionsync;
             {}",
            forget_copy_sql(copy)
        ))
        .await
        .unwrap_or_else(|e| panic!("create bench.{copy}: {e}"));
    // Each timed run starts with no checkpoint pending from the last one.
    b_admin
        .batch_execute("CHECKPOINT")
        .await
        .expect("checkpoint");
}

/// Removes a verified copy and its tombstones, so that the next run finds
/// the database as this one did.
pub async fn drop_copy(b_admin: &Client, copy: &str) {
    b_admin
        .batch_execute(&format!(
            "DROP TABLE IF EXISTS bench.{copy}; {}",
            forget_copy_sql(copy)
        ))
        .await
        .unwrap_or_else(|e| panic!("drop bench.{copy}: {e}"));
    b_admin
        .batch_execute("VACUUM regionsync.tombstones")
        .await
        .expect("vacuum");
}

/// Forgets what an earlier run of a copy left in regionsync's schema: its
/// tombstones would otherwise refuse the replay's older inserts (less work
/// than an empty copy really takes) and its truncation marks everything.
pub fn forget_copy_sql(copy: &str) -> String {
    format!(
        "DELETE FROM regionsync.tombstones WHERE table_name = 'bench.{copy}';
         DELETE FROM regionsync.truncations WHERE table_name = 'bench.{copy}';"
    )
}

/// A copy of `public.users` in region A, captured like any replicated table
/// (the local stack's publication covers schema `public`): the HLC stamp and
/// delete-mark triggers of `regionsync setup`, and the full before image.
pub async fn create_source_table(a: &Client, t: &str) {
    a.batch_execute(&format!(
        "DROP TABLE IF EXISTS public.{t};
         CREATE TABLE public.{t} (LIKE public.users INCLUDING DEFAULTS INCLUDING CONSTRAINTS INCLUDING INDEXES);
         ALTER TABLE public.{t} OWNER TO app;
         ALTER TABLE public.{t} REPLICA IDENTITY FULL;
         CREATE TRIGGER regionsync_stamp_hlc BEFORE INSERT OR UPDATE ON public.{t}
             FOR EACH ROW EXECUTE FUNCTION regionsync.stamp_hlc('id');
         CREATE TRIGGER regionsync_mark_deleted AFTER DELETE ON public.{t}
             FOR EACH ROW EXECUTE FUNCTION regionsync.mark_deleted('id');"
    ))
    .await
    .unwrap_or_else(|e| panic!("create the source table public.{t}: {e}"));
}

/// The columns and values one generated user row `g` gets (`g` is a bigint
/// expression), shared by the bulk source and the live writer.
pub const USER_COLUMNS: &str =
    "id, email, display_name, age, balance, score, verified, profile, tags, birth_date, last_login";
pub const USER_VALUES: &str =
    "g, 'b' || g || '@example.com', 'user ' || g, (g % 90)::int, (g % 100000) / 100.0,
     g / 7.0, g % 2 = 0, jsonb_build_object('g', g), ARRAY['t' || (g % 10)],
     date '1980-01-01' + (g % 10000)::int, timestamp '2024-01-01' + make_interval(secs => g)";

/// Writes the N source changes in A (70 % updates, 20 % inserts, 10 %
/// deletes over N/5 keys) unless a previous bench did (cached).
pub async fn ensure_source(a: &Client, n: u64) {
    a.batch_execute(
        "CREATE TABLE IF NOT EXISTS regionsync.bench_meta (changes bigint PRIMARY KEY, done_at timestamptz)",
    )
    .await
    .expect("bench_meta");
    let t = source_table(n);
    let cached = a
        .query_opt(
            "SELECT 1 FROM regionsync.bench_meta m WHERE changes = $1
                AND to_regclass('public.' || $2::text) IS NOT NULL",
            &[&(n as i64), &t],
        )
        .await
        .expect("meta")
        .is_some();
    if cached {
        println!("source: {n} changes already in the topics (cached)");
        return;
    }
    create_uncompacted_topics(&t).await;
    create_source_table(a, &t).await;
    let started = Instant::now();
    let rounds = (n / 10_000).max(1);
    let (ins, upd, del) = (n / rounds / 5, n / rounds * 7 / 10, n / rounds / 10);
    let mut next_key: i64 = 1;
    let mut total = 0u64;
    for round in 0..rounds {
        a.batch_execute("BEGIN").await.unwrap();
        total += a
            .execute(
                &format!(
                    "INSERT INTO {t} ({USER_COLUMNS})
                     SELECT {USER_VALUES} FROM generate_series($1::bigint, $2::bigint) g"
                ),
                &[&next_key, &(next_key + ins as i64 - 1)],
            )
            .await
            .expect("inserts");
        next_key += ins as i64;
        let mut done = 0u64;
        while done < upd {
            done += a
                .execute(
                    &format!(
                        "UPDATE {t} SET age = coalesce(age, 0) + 1, score = random(), display_name = 'round {round}'
                          WHERE id IN (SELECT id FROM {t} ORDER BY random() LIMIT $1)"
                    ),
                    &[&((upd - done) as i64)],
                )
                .await
                .expect("updates");
        }
        total += done;
        total += a
            .execute(
                &format!(
                    "DELETE FROM {t} WHERE id IN (SELECT id FROM {t} ORDER BY random() LIMIT $1)"
                ),
                &[&(del as i64)],
            )
            .await
            .expect("deletes");
        a.batch_execute("COMMIT").await.unwrap();
    }
    println!(
        "source: {total} changes written to public.{t} in A in {:.1}s",
        started.elapsed().as_secs_f64()
    );
    a.execute(
        "INSERT INTO regionsync.bench_meta VALUES ($1, now()) ON CONFLICT (changes) DO UPDATE SET done_at = now()",
        &[&(n as i64)],
    )
    .await
    .expect("meta");
}

pub fn kafka_b_consumer(group: &str) -> BaseConsumer {
    kafka_consumer(KAFKA_B, group)
}

pub fn kafka_consumer(bootstrap: &str, group: &str) -> BaseConsumer {
    ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .create()
        .expect("consumer")
}

/// A consumer of B's Kafka assigned to partitions `partitions` of `topic`,
/// each from its first offset.
pub fn kafka_b_from_beginning(
    topic: &str,
    partitions: impl IntoIterator<Item = i32>,
) -> BaseConsumer {
    let consumer = kafka_b_consumer("bench-unused");
    let mut tpl = TopicPartitionList::new();
    for p in partitions {
        tpl.add_partition_offset(topic, p, Offset::Beginning)
            .expect("partition offset");
    }
    consumer.assign(&tpl).expect("assign");
    consumer
}

/// The target table `target` in region B, a copy of `users` keyed by `id`,
/// as the worker loads it (shared affinity, last writer wins).
pub async fn users_copy_target(b: &Client, target: &str) -> TargetTable {
    let config = TableConfig {
        topics: vec![],
        target: target.into(),
        key: vec!["id".into()],
        columns: Default::default(),
        source_table: None,
        affinity: regionsync::config::SHARED.into(),
        home_region_column: None,
        policy: Default::default(),
        residency: vec![],
        counters: Default::default(),
    };
    let regions = ["us-east-1".to_string(), "eu-west-1".to_string()];
    TargetTable::load(b, &config, &regions)
        .await
        .unwrap_or_else(|e| panic!("target table {target} in region B: {e}"))
}

/// A topic's current end offset per partition in B's Kafka.
pub fn topic_ends(topic: &str) -> HashMap<i32, i64> {
    ends_seen_by(&kafka_b_consumer("bench-unused"), topic)
}

/// A topic's current end offset per partition in the Kafka `consumer` is
/// connected to (kept by a caller that asks often).
pub fn ends_seen_by(consumer: &BaseConsumer, topic: &str) -> HashMap<i32, i64> {
    let md = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(5))
        .expect("metadata");
    let partitions = md
        .topics()
        .first()
        .map(|t| t.partitions().len())
        .unwrap_or(0);
    (0..partitions as i32)
        .map(|p| {
            // A topic created moments ago may have no leader yet
            // (NotLeaderForPartition): ask again for up to 30 s.
            let mut attempts = 0;
            let (_, high) = loop {
                match consumer.fetch_watermarks(topic, p, Duration::from_secs(5)) {
                    Ok(w) => break w,
                    Err(e) if attempts < 30 => {
                        attempts += 1;
                        eprintln!("watermarks of {topic}/{p}: {e}; asking again");
                        std::thread::sleep(Duration::from_secs(1));
                    }
                    Err(e) => panic!("watermarks of {topic}/{p}: {e}"),
                }
            };
            (p, high)
        })
        .collect()
}

/// The mirrored topic's end offsets, once they stop growing (Debezium and
/// MirrorMaker 2 have carried everything).
pub fn settled_ends(topic: &str) -> HashMap<i32, i64> {
    let mut last = HashMap::new();
    let mut stable = 0;
    loop {
        let ends = topic_ends(topic);
        if !ends.is_empty() && ends == last {
            stable += 1;
            if stable >= 5 {
                return ends;
            }
        } else {
            stable = 0;
        }
        last = ends;
        std::thread::sleep(Duration::from_secs(2));
    }
}

/// user + system CPU seconds of a process (and its reaped children).
pub fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat.rsplit(") ").next().unwrap_or("").split(' ').collect();
    let ticks: f64 = [11, 12, 13, 14]
        .iter()
        .filter_map(|i| fields.get(*i).and_then(|v| v.parse::<f64>().ok()))
        .sum();
    ticks / 100.0
}

/// The pid recorded by `stack.sh` for one of the stack's services.
pub fn stack_pid(service: &str) -> u32 {
    std::fs::read_to_string(root().join(format!("target/stack/pids/{service}.pid")))
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or_else(|| panic!("no pid for {service}: is the stack up (make stack-up)?"))
}

/// CPU seconds of region B's PostgreSQL: the postmaster and its backends.
pub fn postgres_b_cpu() -> f64 {
    let pid = stack_pid("postgres-eu-west-1");
    let mut total = cpu_seconds(pid);
    if let Ok(entries) = std::fs::read_dir("/proc") {
        for e in entries.flatten() {
            if let Ok(child) = e.file_name().to_string_lossy().parse::<u32>() {
                let stat =
                    std::fs::read_to_string(format!("/proc/{child}/stat")).unwrap_or_default();
                let ppid = stat.rsplit(") ").next().and_then(|r| r.split(' ').nth(1));
                if ppid == Some(&pid.to_string()) {
                    total += cpu_seconds(child);
                }
            }
        }
    }
    total
}

/// Resident set size of a process now, in MB.
pub fn rss_mb(pid: u32) -> f64 {
    status_kb(pid, "VmRSS:") / 1024.0
}

/// Peak resident set size of a process over its life, in MB.
pub fn peak_rss_mb(pid: u32) -> f64 {
    status_kb(pid, "VmHWM:") / 1024.0
}

fn status_kb(pid: u32, field: &str) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<f64>().ok())
        .unwrap_or(0.0)
}

/// Samples a process's RSS every 100 ms until stopped; `stop` returns the
/// largest sample in MB. For a process that outlives the run (the Connect
/// worker), where VmHWM would span its whole life.
pub struct RssSampler {
    stop: Arc<AtomicBool>,
    peak_kb: Arc<AtomicU64>,
    thread: std::thread::JoinHandle<()>,
}

impl RssSampler {
    pub fn start(pid: u32) -> RssSampler {
        let stop = Arc::new(AtomicBool::new(false));
        let peak_kb = Arc::new(AtomicU64::new(0));
        let (s, p) = (stop.clone(), peak_kb.clone());
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                p.fetch_max(status_kb(pid, "VmRSS:") as u64, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(100));
            }
        });
        RssSampler {
            stop,
            peak_kb,
            thread,
        }
    }

    pub fn stop(self) -> f64 {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.thread.join();
        self.peak_kb.load(Ordering::Relaxed) as f64 / 1024.0
    }
}

/// p50 and p99 of a Prometheus histogram, as bucket upper bounds.
pub fn histogram_percentiles(metrics: &str, name: &str) -> (f64, f64) {
    let mut buckets: Vec<(f64, f64)> = metrics
        .lines()
        .filter(|l| l.starts_with(&format!("{name}_bucket")))
        .filter_map(|l| {
            let le = l.split("le=\"").nth(1)?.split('"').next()?;
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().ok()?
            };
            Some((le, l.rsplit(' ').next()?.parse().ok()?))
        })
        .collect();
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    let total = buckets.last().map(|b| b.1).unwrap_or(0.0);
    let at = |q: f64| {
        buckets
            .iter()
            .find(|b| b.1 >= q * total)
            .map(|b| b.0)
            .unwrap_or(f64::NAN)
    };
    (at(0.5), at(0.99))
}

/// Mean of a Prometheus histogram (its `_sum` over its `_count`, summed
/// over all label sets).
pub fn histogram_mean(metrics: &str, name: &str) -> f64 {
    let total = |suffix: &str| -> f64 {
        metrics
            .lines()
            .filter(|l| l.starts_with(&format!("{name}_{suffix}")))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    total("sum") / total("count")
}

/// Row count and md5 of every row of `table` (schema-qualified), by id.
pub async fn checksum(client: &Client, table: &str) -> String {
    client
        .query_one(
            &format!("SELECT count(*)::text || ':' || coalesce(md5(string_agg(t::text, '|' ORDER BY id)), '') FROM {table} t"),
            &[],
        )
        .await
        .expect("checksum")
        .get(0)
}

pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// The `q` quantile (0..=1) of sorted values, nearest rank.
pub fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

/// A regionsync worker of region B (the release binary) applying
/// `us-east-1.<source_topic>` into `bench.<copy>`.
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
        let metrics_port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let toml = format!(
            r#"region = "eu-west-1"
regions = ["us-east-1", "eu-west-1"]
consumer_group = "{group}"
# A replay into an empty copy (a rebuild): the cached topics may be older
# than the tombstone grace.
late_changes = "apply"
[kafka]
bootstrap_servers = "{KAFKA_B}"
[schema_registry]
url = "http://127.0.0.1:18081/apis/ccompat/v7"
[postgres]
host = "127.0.0.1"
port = {PG_PORT_B}
dbname = "app"
user = "regionsync"
pool_size = 2
[metrics]
listen = "127.0.0.1:{metrics_port}"
[[tables]]
topics = ["{source_topic}"]
target = "bench.{copy}"
key = ["id"]
source_table = "public.{source_table}"
"#
        );
        let path = root().join(format!("target/bench/{copy}.toml"));
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, toml).unwrap();
        let child = Command::new(root().join("target/release/regionsync"))
            .arg("--config")
            .arg(&path)
            .arg("run")
            .env("REGIONSYNC_POSTGRES__PASSWORD", REGIONSYNC_PASSWORD)
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
        match reqwest::get(format!("http://127.0.0.1:{}/metrics", self.metrics_port)).await {
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

/// Whether every partition's position has reached its end offset.
pub fn reached(ends: &HashMap<i32, i64>, positions: &HashMap<i32, i64>) -> bool {
    ends.iter()
        .all(|(p, e)| positions.get(p).copied().unwrap_or(0) >= *e)
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

/// Replays `us-east-1.<source_topic>` (end offsets `ends`) with regionsync
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
    let topic = format!("us-east-1.{source_topic}");
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
