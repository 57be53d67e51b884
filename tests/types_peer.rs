//! What the Debezium JDBC sink (the benchmark's peer, `tools/peer/`) writes
//! for the wide table's values (docs/TYPES.md, "JDBC sink" column): a
//! harness that records the differences, not a test of the peer. Run by
//! `make types-peer` (it is `#[ignore]`d, so `make test` leaves it out).
//!
//! The wide table of `tests/types.rs` is created in us-east-1 (and, with
//! its enum and domains, in eu-west-1), and a copy of the same definition in
//! eu-west-1's schema `jdbcpeer` per encoding (not `public`, whose tables
//! region B's Debezium captures and MirrorMaker 2 would mirror back). The
//! JDBC sink is registered on Connect B for the wide table's mirrored topic
//! (JSON with schemas and Avro), with `tools/peer/`'s configs, one event
//! per batch, writing into that copy (`schema.evolution=none`: the sink
//! guesses no types). The rows of `tests/types.rs` are then written in A
//! one at a time, each waited for until the sink has written it or its task
//! has failed. A failed task stops the sink for good (it reports no errant
//! records), so the harness records the task's trace and registers the
//! sink anew in a consumer group that starts after that event. A row the
//! sink failed on is then written again column by column, so a failure is
//! traced to the column and value that caused it. Last, every column of
//! every row the sink wrote is compared as `col::text` with A's, and
//! `target/types-peer.md` lists, per column: exact, the differences (A's
//! value → the sink's), the values the sink's task failed on with its
//! error. The harness fails only if it cannot run.

mod support;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use support::wide::*;
use support::*;

/// The schema in B that holds the sink's copies.
const SINK_SCHEMA: &str = "jdbcpeer";
/// How long one probe may take to reach the sink's table.
const PROBE_TIMEOUT: Duration = Duration::from_secs(90);
/// The first probe also waits for MirrorMaker 2 to create the topic in B.
const FIRST_PROBE_TIMEOUT: Duration = Duration::from_secs(240);
/// Columns whose type makes the sink fail every row of the table, NULL or
/// not (measured): a Debezium `Point` is written with PostGIS's
/// `ST_GeomFromWKB`, and an `io.debezium.data.Json` value (an `hstore`
/// with `hstore.handling.mode=json`) is bound as `json`, which an `hstore`
/// column does not take.
const FAILS_EVERY_ROW: &[(&str, &str)] = &[
    ("c_point", "point"),
    ("c_hstore", "hstore"),
    ("c_hstore_arr", "hstore[]"),
];
/// The region of one of the harness's tables: A's wide table is in `public`,
/// the sink's copies in B's [`SINK_SCHEMA`].
fn region_of(table: &str) -> Region {
    if table.starts_with("public.") {
        region_a()
    } else {
        region_b()
    }
}

/// The first id of the probes that copy some columns of a failed row.
const COLUMN_PROBE_IDS: i64 = 1_000_000;
/// The measurement's default time budget (`TYPES_PEER_BUDGET_SECONDS`):
/// probes still queued after it are listed as not measured.
const DEFAULT_BUDGET: Duration = Duration::from_secs(1800);

/// One write in A: a row of the wide test, or one column of such a row.
#[derive(Clone, Debug)]
struct Probe {
    id: i64,
    /// What it holds, for the report.
    what: String,
    /// The columns it sets (besides `id`), if not all of them.
    columns: Option<Vec<String>>,
    /// The row of A it copies them from, if it copies.
    copied_from: Option<i64>,
    sql: String,
}

/// What a sink did with one probe.
#[derive(Clone, Debug)]
enum Outcome {
    Written,
    Failed(String),
    TimedOut,
}

fn connect_b() -> String {
    format!(
        "http://{}:{}",
        stack_env::HOST,
        stack_env::CONNECT_PORT_B.get()
    )
}

/// The JDBC sink on Connect B for one encoding's mirrored topic.
struct Sink {
    encoding: &'static str,
    topic: String,
    /// The table it writes, `jdbcpeer.<name>_<encoding>`.
    table: String,
    base: String,
    /// How many times it was registered anew after a failed task.
    restarts: u32,
    http: reqwest::Client,
}

impl Sink {
    fn name(&self) -> String {
        format!("{}-{}", self.base, self.restarts)
    }

    /// `tools/peer/debezium-jdbc-sink[-avro].json` with its placeholders
    /// filled (as `bench-peers` does): one task, one event per batch, so a
    /// failure is the failing event's.
    fn config(&self) -> String {
        let file = match self.encoding {
            "avro" => "tools/peer/debezium-jdbc-sink-avro.json",
            _ => "tools/peer/debezium-jdbc-sink.json",
        };
        let template = std::fs::read_to_string(repo_root().join(file))
            .unwrap_or_else(|e| panic!("read {file}: {e}"));
        let values = [
            ("SINK_TASKS", "1".to_string()),
            ("SINK_TOPICS", self.topic.clone()),
            ("SINK_GROUP", self.name()),
            ("PG_HOST", stack_env::HOST.to_string()),
            ("PG_PORT", region_b().pg_port.to_string()),
            ("PG_DATABASE", "app".into()),
            ("SINK_USER", "regionsync".into()),
            ("SINK_TABLE_FORMAT", self.table.clone()),
            ("SINK_BATCH_SIZE", "1".into()),
            (
                "REGISTRY_URL",
                format!(
                    "http://{}:{}/apis/registry/v2",
                    stack_env::HOST,
                    stack_env::REGISTRY_PORT.get()
                ),
            ),
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

    async fn register(&self) {
        let name = self.name();
        let r = self
            .http
            .put(format!("{}/connectors/{name}/config", connect_b()))
            .header("Content-Type", "application/json")
            .body(self.config())
            .send()
            .await
            .expect("Connect B's REST API (is the stack up?)");
        let status = r.status();
        assert!(
            status.is_success(),
            "registering {name} on Connect B: {status}: {}",
            r.text().await.unwrap_or_default()
        );
    }

    /// The trace of a failed connector or task, if one failed.
    async fn failure(&self) -> Option<String> {
        let v: serde_json::Value = self
            .http
            .get(format!("{}/connectors/{}/status", connect_b(), self.name()))
            .send()
            .await
            .ok()?
            .json()
            .await
            .ok()?;
        let tasks = v["tasks"].as_array().cloned().unwrap_or_default();
        tasks
            .iter()
            .chain(std::iter::once(&v["connector"]))
            .find(|t| t["state"] == "FAILED")
            .map(|t| t["trace"].as_str().unwrap_or("(no trace)").to_string())
    }

    async fn delete(&self) {
        let url = format!("{}/connectors/{}", connect_b(), self.name());
        let _ = self.http.delete(&url).send().await;
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            let gone = self
                .http
                .get(&url)
                .send()
                .await
                .is_ok_and(|r| r.status() == reqwest::StatusCode::NOT_FOUND);
            if gone {
                return;
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }

    /// After a failed task: the sink anew, in a group that starts at the
    /// topic's end (past the event it failed on).
    async fn register_past_end(&mut self) {
        self.delete().await;
        self.restarts += 1;
        let (group, topic) = (self.name(), self.topic.clone());
        tokio::task::spawn_blocking(move || commit_topic_end(&group, &topic))
            .await
            .expect("commit the topic's end");
        self.register().await;
    }

    /// Whether the sink's table holds `id` yet, or its task failed.
    async fn check(&self, b: &tokio_postgres::Client, id: i64) -> Option<Outcome> {
        let select = format!("SELECT 1 FROM {} WHERE id = $1", self.table);
        let written = b
            .query_opt(&select, &[&id])
            .await
            .expect("select in the sink's table");
        if written.is_some() {
            return Some(Outcome::Written);
        }
        self.failure().await.map(Outcome::Failed)
    }
}

/// Commits, for `group`, the end of every partition of `topic` in B.
fn commit_topic_end(group: &str, topic: &str) {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", region_b().kafka)
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .create()
        .expect("kafka consumer");
    let md = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .expect("topic metadata");
    let mut tpl = TopicPartitionList::new();
    for t in md.topics().iter().filter(|t| t.name() == topic) {
        for p in t.partitions() {
            let (_, high) = consumer
                .fetch_watermarks(topic, p.id(), Duration::from_secs(10))
                .expect("watermarks");
            tpl.add_partition_offset(topic, p.id(), Offset::Offset(high))
                .expect("partition offset");
        }
    }
    consumer
        .commit(&tpl, CommitMode::Sync)
        .unwrap_or_else(|e| panic!("commit {topic}'s end for {group}: {e}"));
}

/// The root cause of a Connect trace: its first line and last `Caused by:`.
fn root_cause(trace: &str) -> String {
    let first = trace.lines().next().unwrap_or("").trim();
    let cause = trace
        .lines()
        .filter_map(|l| l.trim().strip_prefix("Caused by: "))
        .next_back()
        .unwrap_or(first);
    one_line(cause, 400)
}

/// `s` on one line, at most `max` characters, for a markdown table cell.
fn one_line(s: &str, max: usize) -> String {
    let s: String = s
        .replace('|', "\\|")
        .replace(['\n', '\r'], " ")
        .chars()
        .collect();
    if s.chars().count() > max {
        let cut: String = s.chars().take(max).collect();
        format!("{cut}… ({} characters)", s.chars().count())
    } else {
        s
    }
}

fn shown(v: &Option<String>) -> String {
    match v {
        None => "NULL".into(),
        Some(s) => format!("`{}`", one_line(s, 80).replace('`', "'")),
    }
}

/// The full-row probes: the wide test's rows, its documented differences
/// and its refused values (single columns).
fn row_probes(name: &str) -> Vec<Probe> {
    let mut out: Vec<Probe> = EXACT_ROWS
        .iter()
        .zip(EXACT_ROWS_MORE)
        .map(|((id, v), more)| Probe {
            id: *id,
            what: format!("row {id}"),
            columns: None,
            copied_from: None,
            sql: format!("INSERT INTO public.{name} VALUES ({v}, {more})"),
        })
        .collect();
    let singles = DIFFERENT
        .iter()
        .map(|(id, column, value, _)| (*id, *column, *value))
        .chain(
            REFUSED
                .iter()
                .map(|(id, column, value, ..)| (*id, *column, *value)),
        );
    for (id, column, value) in singles {
        out.push(Probe {
            id,
            what: format!("row {id}: {column} = {value}"),
            columns: Some(vec![column.to_string()]),
            copied_from: None,
            sql: format!("INSERT INTO public.{name} (id, {column}) VALUES ({id}, {value})"),
        });
    }
    out
}

/// The non-NULL columns of row `id` of A (but `id`, `hlc`, `origin_region`).
async fn set_columns(name: &str, id: i64) -> Vec<String> {
    app_db(&region_a())
        .await
        .query(
            &format!(
                "SELECT key FROM public.{name} t, jsonb_each(to_jsonb(t))
                 WHERE id = $1 AND value <> 'null'::jsonb
                   AND key NOT IN ('id', 'hlc', 'origin_region')"
            ),
            &[&id],
        )
        .await
        .expect("the row's non-NULL columns")
        .iter()
        .map(|r| r.get(0))
        .collect()
}

/// A probe that copies `columns` of row `from` (already in A) into a new row.
fn copy_probe(name: &str, id: i64, from: i64, columns: &[String]) -> Probe {
    let list = columns.join(", ");
    let what = match columns {
        [one] => format!("row {from}'s {one} alone"),
        _ => format!("row {from}'s {} columns {}…", columns.len(), columns[0]),
    };
    Probe {
        id,
        what,
        columns: Some(columns.to_vec()),
        copied_from: Some(from),
        sql: format!(
            "INSERT INTO public.{name} (id, {list}) SELECT {id}, {list} FROM public.{name} WHERE id = {from}"
        ),
    }
}

/// The two halves of a failed probe's columns (bisection: a failure is
/// traced to its column in about log2(columns) probes per failing column).
async fn halves(name: &str, probe: &Probe, next_id: &mut i64) -> Vec<Probe> {
    let (from, columns) = match (&probe.copied_from, &probe.columns) {
        (Some(from), Some(columns)) => (*from, columns.clone()),
        (None, None) => (probe.id, set_columns(name, probe.id).await),
        // A single-column probe of the wide test: nothing to split.
        _ => return Vec::new(),
    };
    if columns.len() < 2 {
        return Vec::new();
    }
    let (left, right) = columns.split_at(columns.len() / 2);
    [left, right]
        .iter()
        .map(|part| {
            *next_id += 1;
            copy_probe(name, *next_id, from, part)
        })
        .collect()
}

/// (name, type) of every column of `table` in `region`, in order.
async fn columns_of(region: &Region, table: &str) -> Vec<(String, String)> {
    admin_db(region)
        .await
        .query(
            "SELECT attname::text, format_type(atttypid, atttypmod) FROM pg_attribute
             WHERE attrelid = $1::text::regclass AND attnum > 0 AND NOT attisdropped
             ORDER BY attnum",
            &[&table],
        )
        .await
        .expect("columns")
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

/// Every column of every row of `table` as text, by id.
async fn texts(
    region: &Region,
    table: &str,
    columns: &[(String, String)],
) -> BTreeMap<i64, Vec<Option<String>>> {
    let list: Vec<String> = columns.iter().map(|(c, _)| format!("{c}::text")).collect();
    admin_db(region)
        .await
        .query(
            &format!("SELECT id, ARRAY[{}] FROM {table} t", list.join(", ")),
            &[],
        )
        .await
        .expect("select the rows as text")
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

/// `to_jsonb(row)` of every row of `table`, by id.
async fn jsonb_rows(region: &Region, table: &str) -> BTreeMap<i64, String> {
    admin_db(region)
        .await
        .query(&format!("SELECT id, to_jsonb(t)::text FROM {table} t"), &[])
        .await
        .expect("select the rows as jsonb")
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

/// What one column did across the probes, for one encoding.
#[derive(Default)]
struct ColumnResult {
    equal: usize,
    differences: Vec<String>,
    failures: Vec<String>,
}

/// The sink's version as Connect B lists its plugin.
async fn sink_version(http: &reqwest::Client) -> String {
    let plugins: serde_json::Value = http
        .get(format!("{}/connector-plugins", connect_b()))
        .send()
        .await
        .expect("Connect B's plugins")
        .json()
        .await
        .expect("plugins as JSON");
    plugins
        .as_array()
        .into_iter()
        .flatten()
        .find(|p| p["class"] == "io.debezium.connector.jdbc.JdbcSinkConnector")
        .and_then(|p| p["version"].as_str())
        .expect("the JDBC sink is installed on Connect B (stack.sh install)")
        .to_string()
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "a measurement of the JDBC sink for docs/TYPES.md: make types-peer"]
async fn jdbc_sink_writes_the_wide_table() {
    let started = Instant::now();
    let http = reqwest::Client::new();
    let version = sink_version(&http).await;
    let name = create_table("types_peer", false).await.name;
    let encodings: Vec<&'static str> = std::env::var("TYPES_PEER_ENCODINGS")
        .unwrap_or_else(|_| "json,avro".into())
        .split(',')
        .map(|e| match e.trim() {
            "json" => "json",
            "avro" => "avro",
            other => panic!("TYPES_PEER_ENCODINGS: unknown encoding {other:?} (json, avro)"),
        })
        .collect();
    let budget = std::env::var("TYPES_PEER_BUDGET_SECONDS")
        .ok()
        .map(|s| Duration::from_secs(s.parse().expect("TYPES_PEER_BUDGET_SECONDS: seconds")))
        .unwrap_or(DEFAULT_BUDGET);
    // Columns that make the sink fail every row, NULL or not: text for the
    // main run (their values go in as text), their own type again one at a
    // time for a last probe each.
    let retype = |table: &str, column: &str, pg_type: &str| {
        format!(
            "ALTER TABLE {table} ALTER COLUMN {column} TYPE {pg_type} USING {column}::{pg_type}"
        )
    };
    for region in [region_a(), region_b()] {
        let db = admin_db(&region).await;
        for (column, _) in FAILS_EVERY_ROW {
            db.batch_execute(&retype(&format!("public.{name}"), column, "text"))
                .await
                .expect("a column that fails every row as text");
        }
    }
    let admin_b = admin_db(&region_b()).await;
    let mut sinks = Vec::new();
    for encoding in &encodings {
        let copy = format!("{SINK_SCHEMA}.{name}_{encoding}");
        admin_b
            .batch_execute(&format!(
                "CREATE SCHEMA IF NOT EXISTS {SINK_SCHEMA};
                 GRANT USAGE ON SCHEMA {SINK_SCHEMA} TO regionsync;
                 CREATE TABLE {copy} (LIKE public.{name} INCLUDING ALL);
                 GRANT SELECT, INSERT, UPDATE, DELETE ON {copy} TO regionsync;"
            ))
            .await
            .unwrap_or_else(|e| panic!("create {copy} in B: {e}"));
        let prefix = if *encoding == "avro" {
            "cdc.avro"
        } else {
            "cdc"
        };
        sinks.push(Sink {
            encoding,
            topic: mirrored(&region_a(), &format!("{prefix}.public.{name}")),
            table: copy,
            base: format!("types-peer-{encoding}-{}", fresh_key()),
            restarts: 0,
            http: http.clone(),
        });
    }

    let a = app_db(&region_a()).await;
    let mut queue: std::collections::VecDeque<Probe> = row_probes(&name).into();
    let mut probes: Vec<Probe> = Vec::new();
    let mut unmeasured: Vec<Probe> = Vec::new();
    let mut next_id = COLUMN_PROBE_IDS;
    let mut last_probes = FAILS_EVERY_ROW.iter();
    let mut retyped: Option<&str> = None;
    // (encoding, probe id) → outcome
    let mut outcomes: BTreeMap<(&'static str, i64), Outcome> = BTreeMap::new();
    let mut first = true;
    let b = admin_db(&region_b()).await;
    loop {
        let Some(probe) = queue.pop_front() else {
            // The columns that fail every row: one at a time its own type
            // again (in A and in the copies), probed with row 1's value.
            let mut tables = vec![format!("public.{name}")];
            tables.extend(sinks.iter().map(|s| s.table.clone()));
            if let Some(column) = retyped.take() {
                for table in &tables {
                    admin_db(&region_of(table))
                        .await
                        .batch_execute(&retype(table, column, "text"))
                        .await
                        .expect("back to text");
                }
            }
            let Some((column, pg_type)) = last_probes.next() else {
                break;
            };
            for table in &tables {
                admin_db(&region_of(table))
                    .await
                    .batch_execute(&retype(table, column, pg_type))
                    .await
                    .unwrap_or_else(|e| panic!("{table}.{column} as {pg_type}: {e}"));
            }
            retyped = Some(column);
            next_id += 1;
            queue.push_back(copy_probe(&name, next_id, 1, &[column.to_string()]));
            continue;
        };
        // The last probes (a column that fails every row) are never skipped.
        if !first && retyped.is_none() && started.elapsed() > budget {
            unmeasured.push(probe);
            continue;
        }
        a.batch_execute(&probe.sql)
            .await
            .unwrap_or_else(|e| panic!("write {} in A: {e}", probe.what));
        if first {
            // The sinks start once MirrorMaker 2 has made the topics in B,
            // so that their consumers do not create them.
            let deadline = Instant::now() + FIRST_PROBE_TIMEOUT;
            for sink in &sinks {
                let topic = sink.topic.clone();
                tokio::task::spawn_blocking(move || {
                    TopicReader::open(&region_b(), &topic, deadline);
                })
                .await
                .expect("wait for the mirrored topic");
                sink.register().await;
            }
        }
        let deadline = Instant::now()
            + if first {
                FIRST_PROBE_TIMEOUT
            } else {
                PROBE_TIMEOUT
            };
        first = false;
        // Every sink's outcome, polled together.
        let mut pending: Vec<usize> = (0..sinks.len()).collect();
        while !pending.is_empty() {
            let mut still = Vec::new();
            for i in pending {
                match sinks[i].check(&b, probe.id).await {
                    Some(outcome) => {
                        outcomes.insert((sinks[i].encoding, probe.id), outcome);
                    }
                    None if Instant::now() > deadline => {
                        outcomes.insert((sinks[i].encoding, probe.id), Outcome::TimedOut);
                    }
                    None => still.push(i),
                }
            }
            pending = still;
            if !pending.is_empty() {
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        }
        let mut failed_somewhere = false;
        for sink in &mut sinks {
            let outcome = &outcomes[&(sink.encoding, probe.id)];
            println!(
                "[{:>4} s] {} {}: {}",
                started.elapsed().as_secs(),
                sink.encoding,
                probe.what,
                match outcome {
                    Outcome::Failed(t) => format!("failed: {}", root_cause(t)),
                    other => format!("{other:?}"),
                }
            );
            if let Outcome::Failed(_) = outcome {
                failed_somewhere = true;
                sink.register_past_end().await;
            }
        }
        if failed_somewhere {
            for half in halves(&name, &probe, &mut next_id).await.into_iter().rev() {
                queue.push_front(half);
            }
        }
        probes.push(probe);
    }
    // The report names the wide table's types, not the stand-ins.
    let columns: Vec<(String, String)> = columns_of(&region_a(), &format!("public.{name}"))
        .await
        .into_iter()
        .map(|(c, t)| {
            let own = FAILS_EVERY_ROW.iter().find(|(f, _)| *f == c);
            (c, own.map_or(t, |(_, t)| t.to_string()))
        })
        .collect();

    // Compare every column of every row each sink wrote with A's.
    let in_a = texts(&region_a(), &format!("public.{name}"), &columns).await;
    let jsonb_a = jsonb_rows(&region_a(), &format!("public.{name}")).await;
    let mut report = String::new();
    let now: String = a
        .query_one(
            "SELECT to_char(now() AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI')",
            &[],
        )
        .await
        .expect("now")
        .get(0);
    writeln!(
        report,
        "# What the Debezium JDBC sink writes for the wide table's values\n\n\
         Measured {now} UTC by `make types-peer` (`tests/types_peer.rs`): \
         Debezium JDBC sink {version} on Connect B, configured as \
         `tools/peer/debezium-jdbc-sink[-avro].json` (one task, one event per \
         batch), writing `{SINK_SCHEMA}.{name}_<encoding>` (created in B like \
         A's table); {} probes written in A one at a time; took {} s.\n\n\
         Each column of each row the sink wrote is compared as `col::text` with \
         A's row. A probe the sink's task failed on is not in its table; the \
         columns of a failed row are then written again in halves (copied \
         from A's row), down to the column that fails. The columns \
         that make the sink fail every row, NULL or not (`c_point`, `c_hstore`, \
         `c_hstore_arr`), are `text` in both tables for all probes but the \
         last three, which write each in its own type, one at a time. {} \
         probes not measured (time budget, `TYPES_PEER_BUDGET_SECONDS`).\n",
        probes.len(),
        started.elapsed().as_secs(),
        unmeasured.len(),
    )
    .unwrap();
    for sink in &sinks {
        let in_sink = texts(&region_b(), &sink.table, &columns).await;
        let jsonb_sink = jsonb_rows(&region_b(), &sink.table).await;
        let mut per_column: Vec<ColumnResult> =
            columns.iter().map(|_| Default::default()).collect();
        let mut failures = Vec::new();
        let (mut rows_equal, mut rows_written) = (0, 0);
        for probe in &probes {
            let a_row = &in_a[&probe.id];
            match &outcomes[&(sink.encoding, probe.id)] {
                Outcome::Written => {
                    rows_written += 1;
                    if jsonb_a.get(&probe.id) == jsonb_sink.get(&probe.id) {
                        rows_equal += 1;
                    }
                    let s_row = &in_sink[&probe.id];
                    for (i, result) in per_column.iter_mut().enumerate() {
                        if a_row[i] == s_row[i] {
                            if a_row[i].is_some() && columns[i].0 != "id" {
                                result.equal += 1;
                            }
                        } else {
                            result.differences.push(format!(
                                "{} → {} ({})",
                                shown(&a_row[i]),
                                shown(&s_row[i]),
                                probe.what
                            ));
                        }
                    }
                }
                Outcome::Failed(trace) => {
                    let cause = root_cause(trace);
                    failures.push(format!("| {} | {} | {cause} |", probe.id, probe.what));
                    if let Some([c]) = probe.columns.as_deref() {
                        let i = columns.iter().position(|(n, _)| n == c).expect("column");
                        per_column[i]
                            .failures
                            .push(format!("{}: {cause}", shown(&a_row[i])));
                    }
                }
                Outcome::TimedOut => {
                    failures.push(format!(
                        "| {} | {} | not in the sink's table after {} s, task not failed |",
                        probe.id,
                        probe.what,
                        PROBE_TIMEOUT.as_secs()
                    ));
                    if let Some([c]) = probe.columns.as_deref() {
                        let i = columns.iter().position(|(n, _)| n == c).expect("column");
                        per_column[i]
                            .failures
                            .push(format!("{}: not written (timed out)", shown(&a_row[i])));
                    }
                }
            }
        }
        writeln!(
            report,
            "## {}\n\nTopic `{}`; {rows_written} of {} probes written, {rows_equal} of them \
             with `to_jsonb(row)` equal to A's; the sink was registered {} times \
             (once more after each failed task).\n\n\
             | column | type | non-NULL values equal | differences (A → sink) | task fails on |\n\
             |---|---|---:|---|---|",
            sink.encoding.to_uppercase(),
            sink.topic,
            probes.len(),
            sink.restarts + 1
        )
        .unwrap();
        for ((column, pg_type), r) in columns.iter().zip(&per_column) {
            writeln!(
                report,
                "| `{column}` | `{pg_type}` | {} | {} | {} |",
                r.equal,
                r.differences.join("<br>"),
                r.failures.join("<br>")
            )
            .unwrap();
        }
        writeln!(
            report,
            "\n### Probes the sink's task failed on\n\n| id | probe | error (root cause) |\n|---|---|---|"
        )
        .unwrap();
        for f in &failures {
            writeln!(report, "{f}").unwrap();
        }
        writeln!(report).unwrap();
    }
    if !unmeasured.is_empty() {
        writeln!(report, "## Not measured (time budget)\n").unwrap();
        for p in &unmeasured {
            writeln!(report, "- {} (id {})", p.what, p.id).unwrap();
        }
    }
    let out = repo_root().join("target/types-peer.md");
    std::fs::write(&out, &report).expect("write target/types-peer.md");
    println!("{report}\nwritten to {}", out.display());

    // Clean up: the connectors, the copies, the wide table and its types.
    for sink in &sinks {
        sink.delete().await;
        admin_b
            .batch_execute(&format!("DROP TABLE IF EXISTS {}", sink.table))
            .await
            .expect("drop the sink's table");
    }
    for region in [region_a(), region_b()] {
        admin_db(&region)
            .await
            .batch_execute(&format!(
                "DROP TABLE public.{name};
                 DROP TYPE public.{name}_mood; DROP DOMAIN public.{name}_posint;
                 DROP DOMAIN public.{name}_day;"
            ))
            .await
            .unwrap_or_else(|e| panic!("drop {name} in {}: {e}", region.name));
    }
}
