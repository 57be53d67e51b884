//! The source of every benchmark: N changes to a copy of `users` in region
//! A, written once and then cached in the topics between runs. Owns the
//! source table's name and shape, its change topics (created uncompacted
//! before the first change is written), and the writer that produces the
//! 70 / 20 / 10 mix of updates, inserts and deletes.

use std::time::{Duration, Instant};

use rdkafka::admin::{AdminOptions, AlterConfig, NewTopic, ResourceSpecifier, TopicReplication};
use rdkafka::error::RDKafkaErrorCode;
use tokio_postgres::Client;

use crate::kafka::{admin, ends_seen_by, kafka_consumer};
use crate::stack::{kafka_a, kafka_b, mirrored, topic_partitions};

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
    let partitions = topic_partitions();
    let topics = source_topics(t);
    let mirrors: Vec<String> = topics.iter().map(|x| mirrored(x)).collect();
    let names: Vec<&str> = topics.iter().map(String::as_str).collect();
    let mirror_names: Vec<&str> = mirrors.iter().map(String::as_str).collect();
    let admin_a = admin(&kafka_a());
    // Absent topics answer UnknownTopicOrPartition: nothing to delete.
    let _ = admin_a.delete_topics(&names, &opts).await;
    let _ = admin(&kafka_b()).delete_topics(&mirror_names, &opts).await;
    // A deletion completes asynchronously: until it has, the name is taken.
    let mut pending: Vec<&String> = topics.iter().collect();
    let consumer = kafka_consumer(&kafka_a(), "bench-unused");
    for _ in 0..60 {
        let new: Vec<NewTopic> = pending
            .iter()
            .map(|x| {
                BENCH_TOPIC_CONFIGS.iter().fold(
                    NewTopic::new(x, partitions, TopicReplication::Fixed(1)),
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
            ends.len() == partitions as usize && ends.values().all(|e| *e == 0)
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
