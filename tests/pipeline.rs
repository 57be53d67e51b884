//! The apply pipeline end to end on the real stack: changes written in
//! region A travel through Debezium, Kafka A, MirrorMaker 2 and Kafka B, and
//! a regionsync worker (run in-process, its own consumer group) applies them
//! to region B. Each test creates its own table in both regions, so tests
//! run in parallel without sharing rows, topics or offsets.

mod support;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use rdkafka::message::Message;

use support::kit::*;
use support::*;

async fn converges(prefix: &str, topic_prefix: &str) {
    let table = TestTable::create(prefix).await;
    let worker = Worker::start(worker_config(
        &table,
        &format!("{topic_prefix}.public.{}", table.name),
    ));
    write_mixed(&table, 10_000, 1_000, 0x9e3779b97f4a7c15).await;
    let rows = table.wait_converged(Duration::from_secs(240)).await;
    assert!(rows > 100, "the mixed workload leaves rows behind ({rows})");
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn json_changes_converge_in_the_other_region() {
    converges("conv_json", "cdc").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn avro_changes_converge_in_the_other_region() {
    converges("conv_avro", "cdc.avro").await;
}

/// A schemaless Debezium-shaped create of `id` for table `source_table`,
/// stamped now (an older stamp would be a late change, not applied).
fn create_event(source_table: &str, id: i64, age: serde_json::Value, bio: &str) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "before": null,
        "after": {"id": id, "email": format!("p{id}@example.com"), "status": "active", "age": age,
                  "bio": bio, "created_at": "2024-01-01T00:00:00Z", "hlc": now_ms() << 16,
                  "origin_region": "us-east-1"},
        "source": {"ts_ms": now_ms(), "schema": "public", "table": source_table, "lsn": 1, "snapshot": "false"},
        "op": "c",
        "ts_ms": now_ms()
    }))
    .expect("json")
}

/// Poison messages on the mirrored topic: each lands in the dead-letter
/// topic with headers naming the error and its origin; the good changes
/// around them are applied; the worker keeps running.
#[tokio::test(flavor = "multi_thread")]
async fn poison_messages_go_to_the_dead_letter_topic_and_the_rest_applies() {
    use rdkafka::producer::{FutureProducer, FutureRecord};

    let counters = counters();
    let dead_lettered = || counters.total("regionsync_events_total", &[("outcome", "dlq")]);
    let dead_lettered_before = dead_lettered();
    let table = TestTable::create("poison").await;
    let topic = format!("cdc.public.{}", table.name);
    let mirrored_topic = mirrored(&region_a(), &topic);
    // An unknown schema id is held and retried by default (the registry
    // may be behind); here it is dead-lettered, as an operator may choose.
    let toml = worker_toml(&table, &topic, "max_message_bytes = 65536").replace(
        "[schema_registry]",
        "[schema_registry]\nunknown_schema = \"dlq\"",
    );
    let worker = Worker::start(regionsync::config::Config::from_toml(&toml).expect("config"));
    insert_users(&table, 1, 100).await;
    table.wait_converged(Duration::from_secs(120)).await;

    let key = |id: i64| serde_json::to_vec(&serde_json::json!({ "id": id })).unwrap();
    let good = create_event(&table.name, 900_001, serde_json::json!(7), "x");
    let (avro_key, avro_value) = avro_create_event(&table.name, 900_009).await;
    assert!(
        avro_value.len() > 100,
        "the Avro event is long enough to cut inside a field"
    );
    // (what, key, value)
    type Poison<'a> = (&'a str, Option<Vec<u8>>, Vec<u8>);
    let poison: Vec<Poison> = vec![
        (
            "truncated",
            Some(key(900_001)),
            good[..good.len() / 2].to_vec(),
        ),
        ("not json", Some(key(900_002)), b"hello, not json".to_vec()),
        (
            "truncated avro",
            Some(avro_key.clone()),
            avro_value[..avro_value.len() / 2].to_vec(),
        ),
        (
            "unknown schema id",
            Some(vec![0, 0x7f, 0xff, 0xff, 0xf0, 2]),
            vec![0, 0x7f, 0xff, 0xff, 0xf0, 2, 4],
        ),
        (
            "wrong magic byte",
            Some(key(900_004)),
            vec![7, 0, 0, 0, 1, 2, 3],
        ),
        (
            "unconfigured table",
            Some(key(900_005)),
            create_event("some_other_table", 900_005, serde_json::json!(1), "x"),
        ),
        (
            "value does not fit",
            Some(key(900_007)),
            create_event(&table.name, 900_007, serde_json::json!("forty"), "x"),
        ),
        (
            "oversized",
            Some(key(900_008)),
            create_event(
                &table.name,
                900_008,
                serde_json::json!(1),
                &"b".repeat(100_000),
            ),
        ),
    ];
    let producer: FutureProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &region_b().kafka)
        .create()
        .expect("producer");
    let mut poisoned = Vec::new();
    for (what, k, v) in &poison {
        let mut record: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(&mirrored_topic)
            .payload(v.as_slice())
            .partition(0);
        if let Some(k) = k {
            record = record.key(k.as_slice());
        }
        let delivery = producer
            .send(record, Duration::from_secs(10))
            .await
            .unwrap_or_else(|(e, _)| panic!("produce {what}: {e}"));
        poisoned.push((*what, delivery.partition, delivery.offset));
    }
    // A null key cannot even reach the mirrored topic: CDC topics are
    // compacted, and the broker refuses unkeyed records on them. (The
    // decoder's unit tests cover a null key on an uncompacted topic.)
    let unkeyed = producer
        .send(
            FutureRecord::<'_, [u8], [u8]>::to(&mirrored_topic)
                .payload(&good)
                .partition(0),
            Duration::from_secs(10),
        )
        .await;
    assert!(
        matches!(&unkeyed, Err((e, _)) if e.to_string().contains("InvalidRecord")),
        "the broker refuses a null key on a compacted topic: {unkeyed:?}"
    );
    insert_users(&table, 101, 100).await;
    let rows = table.wait_converged(Duration::from_secs(120)).await;
    assert_eq!(rows, 200, "every good change is applied, no poison one");

    let dlq = format!("regionsync.dlq.test-{}", table.name);
    let deadline = Instant::now() + Duration::from_secs(60);
    let dead = tokio::task::block_in_place(|| {
        TopicReader::open(&region_b(), &dlq, deadline).collect(
            deadline,
            |_| true,
            |found| found.len() >= poison.len(),
        )
    });
    assert_eq!(
        dead.len(),
        poison.len(),
        "one dead letter per poison message"
    );
    for (what, partition, offset) in &poisoned {
        let letter = dead
            .iter()
            .find(|m| {
                let h = headers(m);
                h.get("regionsync.partition") == Some(&partition.to_string())
                    && h.get("regionsync.offset") == Some(&offset.to_string())
            })
            .unwrap_or_else(|| {
                panic!("no dead letter for the {what} message at {partition}/{offset}")
            });
        let h = headers(letter);
        assert_eq!(h.get("regionsync.topic"), Some(&mirrored_topic), "{what}");
        assert!(
            !h.get("regionsync.error")
                .cloned()
                .unwrap_or_default()
                .is_empty(),
            "{what}: error header"
        );
        assert!(h.contains_key("regionsync.reason"), "{what}: reason header");
        if *what == "truncated avro" {
            // Registered schemas, so only the cut can be what failed.
            assert_eq!(h["regionsync.reason"], "bad_avro", "{what}");
            assert!(
                h["regionsync.error"].contains("the datum ends"),
                "{what}: {:?}",
                h["regionsync.error"]
            );
        }
    }
    let reasons: Vec<String> = dead
        .iter()
        .map(|m| headers(m)["regionsync.reason"].clone())
        .collect();
    for expected in [
        "not_json",
        "bad_avro",
        "unconfigured_table",
        "rejected_by_postgres",
        "oversized",
    ] {
        assert!(
            reasons.iter().any(|r| r == expected),
            "no {expected} among {reasons:?}"
        );
    }
    // The events counter counts them too (its outcome `dlq`), once the
    // batches around them have committed.
    let deadline = Instant::now() + Duration::from_secs(30);
    while dead_lettered() - dead_lettered_before < poison.len() as u64 && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        dead_lettered() - dead_lettered_before >= poison.len() as u64,
        "regionsync_events_total{{outcome=\"dlq\"}} counted {} of the {} dead letters",
        dead_lettered() - dead_lettered_before,
        poison.len()
    );
    worker.stop().await;
}

/// A create event of `source_table` in the Avro wire format, key and value,
/// with its schemas registered in the registry the workers read.
async fn avro_create_event(source_table: &str, id: i64) -> (Vec<u8>, Vec<u8>) {
    use apache_avro::types::Value;
    let namespace = format!("regionsync_test.{source_table}");
    let key_schema = serde_json::json!({
        "type": "record", "name": "Key", "namespace": namespace,
        "fields": [{ "name": "id", "type": "long" }]
    });
    let value_schema = serde_json::json!({
        "type": "record", "name": "Envelope", "namespace": namespace,
        "fields": [
            { "name": "before", "type": ["null", {
                "type": "record", "name": "Value",
                "fields": [
                    { "name": "id", "type": "long" },
                    { "name": "bio", "type": ["null", "string"] }
                ]
            }], "default": null },
            { "name": "after", "type": ["null", "Value"], "default": null },
            { "name": "source", "type": {
                "type": "record", "name": "Source",
                "fields": [
                    { "name": "ts_ms", "type": "long" },
                    { "name": "schema", "type": "string" },
                    { "name": "table", "type": "string" }
                ]
            }},
            { "name": "op", "type": "string" }
        ]
    });
    let framed = |id: u32, datum: Vec<u8>| [vec![0], id.to_be_bytes().to_vec(), datum].concat();
    let datum = |schema: &apache_avro::Schema, value: Value| {
        apache_avro::writer::datum::GenericDatumWriter::builder(schema)
            .build()
            .and_then(|w| w.write_value_to_vec(value))
            .expect("an Avro datum of the test's schema")
    };
    let subject = format!("regionsync-test.{source_table}");
    let key_id = register_schema(&format!("{subject}-key"), &key_schema).await;
    let value_id = register_schema(&format!("{subject}-value"), &value_schema).await;
    let key_schema = apache_avro::Schema::parse(&key_schema).expect("key schema");
    let value_schema = apache_avro::Schema::parse(&value_schema).expect("value schema");
    let key = Value::Record(vec![("id".into(), Value::Long(id))]);
    let after = Value::Record(vec![
        ("id".into(), Value::Long(id)),
        (
            "bio".into(),
            Value::Union(1, Box::new(Value::String("b".repeat(200)))),
        ),
    ]);
    let source = Value::Record(vec![
        ("ts_ms".into(), Value::Long(1_700_000_000_000)),
        ("schema".into(), Value::String("public".into())),
        ("table".into(), Value::String(source_table.into())),
    ]);
    let value = Value::Record(vec![
        ("before".into(), Value::Union(0, Box::new(Value::Null))),
        ("after".into(), Value::Union(1, Box::new(after))),
        ("source".into(), source),
        ("op".into(), Value::String("c".into())),
    ]);
    (
        framed(key_id, datum(&key_schema, key)),
        framed(value_id, datum(&value_schema, value)),
    )
}

/// Registers `schema` under `subject` through the registry's
/// Confluent-compatible API; returns its id.
async fn register_schema(subject: &str, schema: &serde_json::Value) -> u32 {
    let url = format!("{}/subjects/{subject}/versions", registry_ccompat_url());
    let response: serde_json::Value = reqwest::Client::new()
        .post(url)
        .json(&serde_json::json!({ "schema": schema.to_string() }))
        .send()
        .await
        .and_then(reqwest::Response::error_for_status)
        .unwrap_or_else(|e| panic!("registering {subject}: {e}"))
        .json()
        .await
        .expect("the registry answers with JSON");
    let id = response["id"].as_u64().expect("the registry returns an id");
    u32::try_from(id).expect("a schema id fits 4 bytes")
}

/// Replaying a topic from its first offset over the converged replica (a
/// new consumer group, no stored offsets) changes nothing: every change is
/// stale (or superseded by a later one in its batch), none applied.
#[tokio::test(flavor = "multi_thread")]
async fn replaying_from_the_beginning_changes_nothing() {
    let counters = counters();
    let table = TestTable::create("replay").await;
    let topic = format!("cdc.public.{}", table.name);
    let worker = Worker::start(worker_config(&table, &topic));
    write_mixed(&table, 2_000, 300, 0x5eed).await;
    table.wait_converged(Duration::from_secs(180)).await;
    worker.stop().await;
    let converged = table.rows(&region_b()).await;

    // Every change event now on the mirrored topic (not Kafka's tombstones).
    let mirrored_topic = mirrored(&region_a(), &topic);
    let deadline = Instant::now() + Duration::from_secs(60);
    let messages = tokio::task::block_in_place(|| {
        TopicReader::open(&region_b(), &mirrored_topic, deadline).read_all(deadline)
    });
    let changes = messages.iter().filter(|m| m.payload().is_some()).count() as u64;
    let mut ends: HashMap<i32, i64> = HashMap::new();
    for m in &messages {
        let e = ends.entry(m.partition()).or_default();
        *e = (*e).max(m.offset() + 1);
    }

    let mut replay = worker_config(&table, &topic);
    replay.consumer_group = Some(format!("test-{}-replay", table.name));
    let group = replay.consumer_group.clone().unwrap();
    let target = format!("public.{}", table.name);
    let of = |outcome: &str| {
        counters.total(
            "regionsync_events_total",
            &[("table", target.as_str()), ("outcome", outcome)],
        )
    };
    let before = [of("applied"), of("stale"), of("superseded")];
    let worker = Worker::start(replay);
    // Done when the replay's stored offsets reach the ends of the topic.
    let db = admin_db(&region_b()).await;
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let rows = db
            .query(
                "SELECT partition, next_offset FROM regionsync.offsets WHERE consumer_group = $1 AND topic = $2",
                &[&group, &mirrored_topic],
            )
            .await
            .expect("offsets");
        let stored: HashMap<i32, i64> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
        if ends.iter().all(|(p, end)| stored.get(p) == Some(end)) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "replay did not reach the topic's end: {stored:?} vs {ends:?}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    worker.stop().await;

    assert_eq!(
        table.rows(&region_b()).await,
        converged,
        "the replay changed the replica"
    );
    let applied = of("applied") - before[0];
    let stale = of("stale") - before[1];
    let superseded = of("superseded") - before[2];
    assert_eq!(applied, 0, "the replay applied nothing");
    assert_eq!(
        stale + superseded,
        changes,
        "every replayed change counts as stale ({stale}) or superseded in its batch ({superseded})"
    );
    assert!(stale > 0);
}

/// An update that leaves a large (TOASTed) column unchanged keeps its value
/// in B, even where Debezium sends only the unavailable-value placeholder
/// (REPLICA IDENTITY DEFAULT: no before image to take it from).
#[tokio::test(flavor = "multi_thread")]
async fn unchanged_toast_values_are_kept() {
    let table = TestTable::create("toast").await;
    let a = app_db(&region_a()).await;
    a.batch_execute(&format!(
        "ALTER TABLE {} REPLICA IDENTITY DEFAULT",
        table.name
    ))
    .await
    .expect("replica identity default");
    let topic = format!("cdc.public.{}", table.name);
    let worker = Worker::start(worker_config(&table, &topic));
    // ~96 kB of hex digits: stored out of line.
    a.batch_execute(&format!(
        "INSERT INTO {t} (id, email, bio)
         SELECT g, 'g@example.com', (SELECT string_agg(md5(g::text || s::text), '') FROM generate_series(1, 3000) s)
           FROM generate_series(1, 3) g",
        t = table.name
    ))
    .await
    .expect("insert large rows");
    table.wait_converged(Duration::from_secs(120)).await;
    a.batch_execute(&format!(
        "UPDATE {} SET age = 40, display_name = 'changed' WHERE id IN (1, 2)",
        table.name
    ))
    .await
    .expect("update around the large column");
    table.wait_converged(Duration::from_secs(120)).await;
    let b = app_db(&region_b()).await;
    let kept: i64 = b
        .query_one(
            &format!(
                "SELECT count(*) FROM {} WHERE length(bio) = 96000 AND age = 40",
                table.name
            ),
            &[],
        )
        .await
        .expect("count")
        .get(0);
    assert_eq!(
        kept, 2,
        "updated rows keep their unchanged large value in B"
    );
    worker.stop().await;

    // Such an update behind an earlier version of its key in one batch (the
    // worker stopped meanwhile, so they arrive together): a row inserted
    // and then updated around its large column, and a row whose large
    // value is replaced and then updated around. Collapsed to the last
    // version alone, B would miss row 4 and keep row 3's old value.
    a.batch_execute(&format!(
        "BEGIN;
         INSERT INTO {t} (id, email, bio)
         SELECT 4, 'g@example.com', (SELECT string_agg(md5('new' || s::text), '') FROM generate_series(1, 3000) s);
         UPDATE {t} SET age = 41 WHERE id = 4;
         UPDATE {t} SET bio = (SELECT string_agg(md5('again' || s::text), '') FROM generate_series(1, 3000) s) WHERE id = 3;
         UPDATE {t} SET age = 42 WHERE id = 3;
         COMMIT;",
        t = table.name
    ))
    .await
    .expect("insert and update in one transaction");
    let worker = Worker::start(worker_config(&table, &topic));
    table.wait_converged(Duration::from_secs(120)).await;
    let rows: Vec<(i64, i32)> = b
        .query(
            &format!(
                "SELECT id, age FROM {} WHERE id IN (3, 4) AND length(bio) = 96000 ORDER BY id",
                table.name
            ),
            &[],
        )
        .await
        .expect("rows 3 and 4")
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(rows, vec![(3, 42), (4, 41)]);

    worker.stop().await;
}

/// A table snapshotted by Debezium (op `r`) arrives complete: a connector
/// of its own (own slot, topic prefix `cdc.snap…`, which MirrorMaker 2
/// mirrors like every `cdc.` topic) snapshots a table that already has rows.
#[tokio::test(flavor = "multi_thread")]
async fn a_snapshotted_table_arrives_complete() {
    let table = TestTable::create("snap").await;
    insert_users(&table, 1, 1_000).await;
    let prefix = format!("cdc.snap{}", fresh_key());
    let connector = format!("snapshot-{}", table.name);
    let mut config: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(repo_root().join("connectors/debezium-postgres-json.json"))
            .expect("connector config"),
    )
    .expect("connector JSON");
    let fill = |v: &mut serde_json::Value, key: &str, value: String| {
        v[key] = serde_json::Value::String(value);
    };
    let a = region_a();
    fill(&mut config, "database.hostname", "127.0.0.1".into());
    fill(&mut config, "database.port", a.pg_port.to_string());
    fill(&mut config, "database.dbname", "app".into());
    fill(&mut config, "database.user", "debezium".into());
    fill(&mut config, "slot.name", format!("snap_{}", fresh_key()));
    fill(&mut config, "slot.drop.on.stop", "true".into());
    fill(&mut config, "topic.prefix", prefix.clone());
    fill(
        &mut config,
        "table.include.list",
        format!("public\\.{}", table.name),
    );
    fill(&mut config, "topic.creation.default.partitions", "2".into());
    fill(
        &mut config,
        "topic.creation.default.replication.factor",
        "1".into(),
    );
    config
        .as_object_mut()
        .unwrap()
        .remove("heartbeat.action.query");
    config
        .as_object_mut()
        .unwrap()
        .remove("heartbeat.interval.ms");
    let connect = format!(
        "http://{}:{}/connectors/{connector}",
        support::stack_env::HOST,
        support::stack_env::CONNECT_PORT_A.get()
    );
    let http = reqwest::Client::new();
    let resp = http
        .put(format!("{connect}/config"))
        .json(&config)
        .send()
        .await
        .expect("register the snapshot connector");
    assert!(resp.status().is_success(), "register: {}", resp.status());

    let topic = format!("{prefix}.public.{}", table.name);
    let worker = Worker::start(worker_config(&table, &topic));
    let result = tokio::time::timeout(
        Duration::from_secs(180),
        table.wait_converged(Duration::from_secs(170)),
    )
    .await;
    let _ = http.delete(&connect).send().await;
    let rows = result.expect("converged in time");
    assert_eq!(rows, 1_000);
    let deadline = Instant::now() + Duration::from_secs(30);
    let events = tokio::task::block_in_place(|| {
        TopicReader::open(&region_b(), &mirrored(&a, &topic), deadline).read_all(deadline)
    });
    let reads: Vec<(i64, String)> = events
        .iter()
        .filter_map(|m| json_payload(m.payload()))
        .map(|v| {
            let id = v["after"]["id"].as_i64().unwrap_or(-1);
            (id, v["op"].as_str().unwrap_or_default().to_string())
        })
        .collect();
    assert!(
        reads.iter().all(|(_, op)| op == "r"),
        "snapshot reads only: {reads:?}"
    );
    // Connect and MirrorMaker 2 deliver at least once: a record can be on
    // the mirrored topic twice (seen once: 1,004 messages for 1,000 rows).
    // Every row is read, and none but the table's.
    let ids: std::collections::BTreeSet<i64> = reads.iter().map(|(id, _)| *id).collect();
    assert_eq!(
        ids,
        (1..=1_000).collect(),
        "one snapshot read per row of A's table ({} messages)",
        reads.len()
    );
    worker.stop().await;
}

/// With `clock_ahead = "apply"`, a change stamped an hour in the future (a
/// source clock far ahead) is applied — the version order stays total —
/// but counted against `max_clock_skew`; a change stamped now is not.
/// (By default it is held: tests/faults.rs.)
#[tokio::test(flavor = "multi_thread")]
async fn a_change_from_a_clock_far_ahead_is_flagged() {
    let counters = counters();
    let table = TestTable::create("skew").await;
    let topic = format!("cdc.public.{}", table.name);
    let worker = Worker::start(
        regionsync::config::Config::from_toml(
            &worker_toml(&table, &topic, "").replace("[kafka]", "clock_ahead = \"apply\"\n[kafka]"),
        )
        .expect("valid test config"),
    );
    let flagged = || {
        counters.total(
            "regionsync_clock_skew_exceeded_total",
            &[("source_region", region_a().name.as_str())],
        )
    };
    insert_users(&table, 1, 5).await;
    table.wait_converged(Duration::from_secs(120)).await;
    let before = flagged();

    // The superuser writes past the stamping trigger, as a skewed clock would.
    let ahead = (now_ms() + 3_600_000) << 16;
    admin_db(&region_a())
        .await
        .batch_execute(&format!(
            "SET session_replication_role = replica;
             INSERT INTO public.{} (id, email, hlc, origin_region)
                  VALUES (6, 'ahead@example.com', {ahead}, '{}')",
            table.name,
            region_a().name
        ))
        .await
        .expect("insert with a future hlc");
    table.wait_converged(Duration::from_secs(120)).await;
    assert_eq!(flagged() - before, 1, "one change from a clock far ahead");
    worker.stop().await;
}

/// What region B's worker applies, B's Debezium captures again: those events
/// carry the worker's replication origin (`source.origin`), and region A's
/// worker skips them as relays (their originals came from A itself), so
/// nothing loops or is re-versioned.
#[tokio::test(flavor = "multi_thread")]
async fn changes_applied_by_a_worker_are_marked_and_skipped_as_relays() {
    let counters = counters();
    let (a, b) = (region_a(), region_b());
    let table = TestTable::create("relay").await;
    let topic = format!("cdc.public.{}", table.name);
    let worker_b = Worker::start(worker_config(&table, &topic));
    write_mixed(&table, 300, 50, 0xfeed).await;
    let rows = table.wait_converged(Duration::from_secs(120)).await;
    worker_b.stop().await;

    // B's own capture of what its worker wrote, mirrored into A's Kafka.
    // B's Debezium may still be capturing what the suites before this one
    // had B's workers write (crash.rs: 100,000 changes) on a busy box.
    let relayed_topic = mirrored(&b, &topic);
    let deadline = Instant::now() + Duration::from_secs(240);
    let relayed = tokio::task::block_in_place(|| {
        TopicReader::open(&a, &relayed_topic, deadline).collect(
            deadline,
            |m| m.payload().is_some(),
            |found| found.len() >= rows,
        )
    });
    assert!(relayed.len() >= rows, "{} relayed events", relayed.len());
    for m in &relayed {
        let v = json_payload(m.payload()).expect("JSON event");
        let origin = v["source"]["origin"].as_str().unwrap_or_default();
        assert!(
            origin.starts_with("regionsync_"),
            "a change applied by the worker carries its origin: {}",
            v["source"]
        );
    }

    // A's worker consumes B's topic: every event is a relay, none applied.
    let before = table.rows(&a).await;
    let toml = worker_toml_for(&a, &table, "");
    let worker_a = Worker::start(regionsync::config::Config::from_toml(&toml).expect("A's config"));
    let target = format!("public.{}", table.name);
    let of = |outcome: &str| {
        counters.total(
            "regionsync_events_total",
            &[
                ("source_region", b.name.as_str()),
                ("table", target.as_str()),
                ("outcome", outcome),
            ],
        )
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while of("relay") < relayed.len() as u64 {
        assert!(
            Instant::now() < deadline,
            "{} of {} relays counted",
            of("relay"),
            relayed.len()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert_eq!(of("applied"), 0, "no relay is applied");
    assert_eq!(table.rows(&a).await, before, "A's table is unchanged");
    worker_a.stop().await;
}
