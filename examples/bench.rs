//! `make bench`: regionsync's apply rate on real Debezium events, against the
//! ceiling of its own bulk statements fed from memory.
//!
//! 1. Source (cached between runs): N changes to `public.bench_users` in
//!    region A (70 % updates, 20 % inserts, 10 % deletes over N/5 keys),
//!    carried by the real Debezium connectors and MirrorMaker 2 into region
//!    B's Kafka, in JSON and in Avro.
//! 2. Each run replays one mirrored topic from its first offset with the
//!    release `regionsync` binary into an empty copy of the table in B,
//!    timed until its stored offsets reach the topic's end; the copy must
//!    then equal A's table (checked; a differing run fails the bench).
//! 3. The ceiling: the same changes, decoded beforehand and held in memory,
//!    applied through the same bulk statements on two connections.
//!
//! ```text
//! cargo run --release --example bench [-- --changes N --runs R]
//! ```

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use regionsync::apply::{self, Final, TargetTable};
use regionsync::config::TableConfig;
use regionsync::decode::{decode_json, Decoded};
use tokio_postgres::{Client, NoTls};

const KAFKA_B: &str = "127.0.0.1:29092";

/// The replicas live in schema `bench`, outside the `regionsync_cdc`
/// publication (which covers `public`): otherwise region B's own Debezium
/// would capture every applied row and compete for the two cores, measuring
/// the stack rather than the apply path.
const BENCH_SCHEMA_SQL: &str = "CREATE SCHEMA IF NOT EXISTS bench;
     GRANT USAGE ON SCHEMA bench TO regionsync;";
const SOURCE_TABLE: &str = "bench_users";

fn arg(name: &str, default: u64) -> u64 {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

async fn connect(port: u16, user: &str, password: &str) -> Client {
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

/// Writes the source changes in A unless a previous bench did (cached).
async fn ensure_source(a: &Client, n: u64) {
    a.batch_execute(
        "CREATE TABLE IF NOT EXISTS regionsync.bench_meta (changes bigint PRIMARY KEY, done_at timestamptz)",
    )
    .await
    .expect("bench_meta");
    let cached = a
        .query_opt(
            "SELECT 1 FROM regionsync.bench_meta WHERE changes = $1",
            &[&(n as i64)],
        )
        .await
        .expect("meta")
        .is_some();
    if cached {
        println!("source: {n} changes already in the topics (cached)");
        return;
    }
    let t = SOURCE_TABLE;
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
    .expect("create the source table");
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
                    "INSERT INTO {t} (id, email, display_name, age, balance, score, verified, profile, tags, birth_date, last_login)
                     SELECT g, 'b' || g || '@example.com', 'user ' || g, (g % 90)::int, (g % 100000) / 100.0,
                            g / 7.0, g % 2 = 0, jsonb_build_object('g', g), ARRAY['t' || (g % 10)],
                            date '1980-01-01' + (g % 10000)::int, timestamp '2024-01-01' + make_interval(secs => g)
                       FROM generate_series($1::bigint, $2::bigint) g"
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
        "source: {total} changes written in A in {:.1}s",
        started.elapsed().as_secs_f64()
    );
    a.execute(
        "INSERT INTO regionsync.bench_meta VALUES ($1, now())",
        &[&(n as i64)],
    )
    .await
    .expect("meta");
}

/// The mirrored topic's end offsets, once they stop growing (Debezium and
/// MirrorMaker 2 have carried everything).
fn settled_ends(topic: &str) -> HashMap<i32, i64> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", KAFKA_B)
        .set("group.id", "bench-unused")
        .create()
        .expect("consumer");
    let mut last = HashMap::new();
    let mut stable = 0;
    loop {
        let md = consumer
            .fetch_metadata(Some(topic), Duration::from_secs(5))
            .expect("metadata");
        let partitions = md
            .topics()
            .first()
            .map(|t| t.partitions().len())
            .unwrap_or(0);
        let mut ends = HashMap::new();
        for p in 0..partitions as i32 {
            let (_, high) = consumer
                .fetch_watermarks(topic, p, Duration::from_secs(5))
                .expect("watermarks");
            ends.insert(p, high);
        }
        if partitions > 0 && ends == last {
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
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat.rsplit(") ").next().unwrap_or("").split(' ').collect();
    let ticks: f64 = [11, 12, 13, 14]
        .iter()
        .filter_map(|i| fields.get(*i).and_then(|v| v.parse::<f64>().ok()))
        .sum();
    ticks / 100.0
}

/// CPU seconds of region B's PostgreSQL: the postmaster and its backends.
fn postgres_b_cpu() -> f64 {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let pid: u32 = std::fs::read_to_string(root.join("target/stack/pids/postgres-eu-west-1.pid"))
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0);
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

fn peak_rss_mb(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<f64>().ok())
        .unwrap_or(0.0)
        / 1024.0
}

/// p50 and p99 of a Prometheus histogram, as bucket upper bounds.
fn histogram_percentiles(metrics: &str, name: &str) -> (f64, f64) {
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

struct RunResult {
    rows_per_s: f64,
    p50: f64,
    p99: f64,
    rss_mb: f64,
    cpu_worker: f64,
    cpu_pg: f64,
}

/// Row count and md5 of every row of `table` (schema-qualified), by id.
async fn checksum(client: &Client, table: &str) -> String {
    client
        .query_one(
            &format!("SELECT count(*)::text || ':' || coalesce(md5(string_agg(t::text, '|' ORDER BY id)), '') FROM {table} t"),
            &[],
        )
        .await
        .expect("checksum")
        .get(0)
}

async fn run_worker(
    b_admin: &Client,
    source_topic: &str,
    copy: &str,
    ends: &HashMap<i32, i64>,
    n: u64,
) -> RunResult {
    b_admin
        .batch_execute(&format!(
            "{BENCH_SCHEMA_SQL}
             DROP TABLE IF EXISTS bench.{copy};
             CREATE TABLE bench.{copy} (LIKE public.users INCLUDING DEFAULTS INCLUDING CONSTRAINTS INCLUDING INDEXES);
             GRANT ALL ON bench.{copy} TO regionsync;"
        ))
        .await
        .expect("copy table");
    let group = format!("bench-{copy}-{}", std::process::id());
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let toml = format!(
        r#"region = "eu-west-1"
regions = ["us-east-1", "eu-west-1"]
consumer_group = "{group}"
[kafka]
bootstrap_servers = "{KAFKA_B}"
[schema_registry]
url = "http://127.0.0.1:18081/apis/ccompat/v7"
[postgres]
host = "127.0.0.1"
port = 25432
dbname = "app"
user = "regionsync"
pool_size = 2
[metrics]
listen = "127.0.0.1:{port}"
[[tables]]
topics = ["{source_topic}"]
target = "bench.{copy}"
key = ["id"]
source_table = "public.{SOURCE_TABLE}"
"#
    );
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let path = root.join(format!("target/bench/{copy}.toml"));
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(&path, toml).unwrap();
    let pg_before = postgres_b_cpu();
    let started = Instant::now();
    let mut child = Command::new(root.join("target/release/regionsync"))
        .arg("--config")
        .arg(&path)
        .arg("run")
        .env("REGIONSYNC_POSTGRES__PASSWORD", "regionsync-local")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .expect("start target/release/regionsync (cargo build --release first)");
    let topic = format!("us-east-1.{source_topic}");
    loop {
        let rows = b_admin
            .query(
                "SELECT partition, next_offset FROM regionsync.offsets WHERE consumer_group = $1 AND topic = $2",
                &[&group, &topic],
            )
            .await
            .expect("offsets");
        let stored: HashMap<i32, i64> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
        if ends
            .iter()
            .all(|(p, e)| stored.get(p).copied().unwrap_or(0) >= *e)
        {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(1800),
            "run did not finish in 30 min"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let cpu_worker = cpu_seconds(child.id());
    let rss_mb = peak_rss_mb(child.id());
    let metrics = reqwest::get(format!("http://127.0.0.1:{port}/metrics"))
        .await
        .expect("metrics")
        .text()
        .await
        .unwrap_or_default();
    let (p50, p99) = histogram_percentiles(&metrics, "regionsync_apply_batch_seconds");
    let cpu_pg = postgres_b_cpu() - pg_before;
    let _ = Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status();
    let _ = child.wait();
    RunResult {
        rows_per_s: n as f64 / elapsed,
        p50,
        p99,
        rss_mb,
        cpu_worker,
        cpu_pg,
    }
}

/// The ceiling: the JSON topic's changes decoded into memory, then applied
/// through the same statements (collapsed per batch of 5,000 per
/// partition), partitions spread over two connections.
async fn ceiling(b_admin: &Client, ends: &HashMap<i32, i64>, n: u64) -> f64 {
    let copy = "bench_ceiling";
    b_admin
        .batch_execute(&format!(
            "{BENCH_SCHEMA_SQL}
             DROP TABLE IF EXISTS bench.{copy};
             CREATE TABLE bench.{copy} (LIKE public.users INCLUDING DEFAULTS INCLUDING CONSTRAINTS INCLUDING INDEXES);"
        ))
        .await
        .expect("ceiling table");
    let topic = format!("us-east-1.cdc.public.{SOURCE_TABLE}");
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", KAFKA_B)
        .set("group.id", "bench-unused")
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    for p in ends.keys() {
        tpl.add_partition_offset(&topic, *p, Offset::Beginning)
            .unwrap();
    }
    consumer.assign(&tpl).unwrap();
    let config = TableConfig {
        topics: vec![],
        target: format!("bench.{copy}"),
        key: vec!["id".into()],
        columns: Default::default(),
        source_table: None,
    };
    let table = TargetTable::load(b_admin, &config).await.expect("target");
    let mut per_partition: HashMap<i32, Vec<Final>> = HashMap::new();
    let mut remaining: HashMap<i32, i64> = ends.clone();
    while !remaining.is_empty() {
        if let Some(Ok(m)) = consumer.poll(Duration::from_millis(500)) {
            if m.offset() + 1 >= remaining.get(&m.partition()).copied().unwrap_or(0) {
                remaining.remove(&m.partition());
            }
            if let Ok(Decoded::Change(c)) = decode_json(m.key(), m.payload()) {
                if let Ok(f) = apply::prepare(&table, &c, "us-east-1") {
                    per_partition.entry(m.partition()).or_default().push(f);
                }
            }
        }
    }
    let mut lanes: Vec<Vec<Vec<Final>>> = vec![vec![], vec![]];
    for (i, (_, finals)) in per_partition.into_iter().enumerate() {
        lanes[i % 2].extend(finals.chunks(5_000).map(|c| c.to_vec()));
    }
    let started = Instant::now();
    let mut tasks = Vec::new();
    for lane in lanes {
        let table = table.clone();
        tasks.push(tokio::spawn(async move {
            let mut c = connect(25432, "postgres", "").await;
            for batch in lane {
                let tx = c.transaction().await.unwrap();
                tx.batch_execute("SET LOCAL session_replication_role = replica")
                    .await
                    .unwrap();
                apply::apply_finals(&tx, &table, &apply::collapse(batch))
                    .await
                    .expect("apply");
                tx.commit().await.unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    n as f64 / started.elapsed().as_secs_f64()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

#[tokio::main]
async fn main() {
    let n = arg("--changes", 1_000_000);
    let runs = arg("--runs", 3);
    let a = connect(15432, "postgres", "").await;
    let b = connect(25432, "postgres", "").await;
    ensure_source(&a, n).await;
    let want = checksum(&a, &format!("public.{SOURCE_TABLE}")).await;
    let mut results: Vec<(&str, Vec<RunResult>)> = vec![("json", vec![]), ("avro", vec![])];
    let mut ends_by = HashMap::new();
    for (enc, topic) in [
        ("json", "cdc.public.bench_users"),
        ("avro", "cdc.avro.public.bench_users"),
    ] {
        let ends = settled_ends(&format!("us-east-1.{topic}"));
        let events: i64 = ends.values().sum();
        println!("{enc}: {events} messages on us-east-1.{topic} in B's Kafka");
        ends_by.insert(enc, (topic, ends));
    }
    for run in 0..runs {
        for (enc, list) in results.iter_mut() {
            let (topic, ends) = &ends_by[enc];
            let copy = format!("bench_copy_{enc}_{run}");
            let r = run_worker(&b, topic, &copy, ends, n).await;
            let got = checksum(&b, &format!("bench.{copy}")).await;
            assert_eq!(
                got, want,
                "{enc} run {run}: the replica differs from A: failed, not timed"
            );
            println!(
                "{enc} run {run}: {:.0} rows/s, batch commit p50 {:.3}s p99 {:.3}s, peak RSS {:.0} MB, CPU regionsync {:.1}s PostgreSQL {:.1}s",
                r.rows_per_s, r.p50, r.p99, r.rss_mb, r.cpu_worker, r.cpu_pg
            );
            list.push(r);
        }
    }
    let ceiling_rate = ceiling(&b, &ends_by["json"].1, n).await;
    println!("\nceiling (same statements, from memory, 2 connections): {ceiling_rate:.0} rows/s");
    for (enc, list) in &results {
        let rate = median(list.iter().map(|r| r.rows_per_s).collect());
        println!(
            "{enc}: median {rate:.0} rows/s = {:.2} of the ceiling; batch commit p50 {:.3}s p99 {:.3}s; peak RSS {:.0} MB; CPU per 1M changes: regionsync {:.1}s, PostgreSQL {:.1}s",
            rate / ceiling_rate,
            median(list.iter().map(|r| r.p50).collect()),
            median(list.iter().map(|r| r.p99).collect()),
            list.iter().map(|r| r.rss_mb).fold(0.0, f64::max),
            median(list.iter().map(|r| r.cpu_worker).collect()) * 1e6 / n as f64,
            median(list.iter().map(|r| r.cpu_pg).collect()) * 1e6 / n as f64,
        );
    }
}
