//! The local two-region stack carries real Debezium change events across
//! regions: PostgreSQL → Debezium → Kafka → MirrorMaker 2 → the other
//! region's Kafka, in JSON (with schemas) and in Avro through the registry.
//! Runs against the stack `make stack-up` starts; every test writes its own
//! fresh row keys, so the tests run in parallel.

mod support;

use std::time::{Duration, Instant};

use apache_avro::types::Value as Avro;
use rdkafka::message::{Message, OwnedMessage};
use schema_registry_converter::async_impl::avro::AvroDecoder;
use schema_registry_converter::async_impl::schema_registry::SrSettings;
use serde_json::Value as Json;
use support::*;

/// The bound: an event is on the other region's Kafka within 60 s.
const ARRIVAL: Duration = Duration::from_secs(60);

fn op_of(msg: &OwnedMessage) -> Option<String> {
    json_payload(msg.payload()).map(|v| v["op"].as_str().expect("op").to_string())
}

/// Insert, update and delete one user in `src`; read the four events (create,
/// update, delete, tombstone) from `dst`'s Kafka, on the mirrored topic.
async fn row_lifecycle_crosses_regions(src: Region, dst: Region) {
    let db = app_db(&src).await;
    let key = fresh_key();
    let written_at = now_ms();
    db.execute(
        "INSERT INTO users (id, email, display_name, age) VALUES ($1, $2, 'first', 30)",
        &[&key, &format!("u{key}@example.com")],
    )
    .await
    .expect("insert");
    db.execute(
        "UPDATE users SET display_name = 'second', age = 31 WHERE id = $1",
        &[&key],
    )
    .await
    .expect("update");
    db.execute("DELETE FROM users WHERE id = $1", &[&key])
        .await
        .expect("delete");

    let topic = mirrored(&src, "cdc.public.users");
    let deadline = Instant::now() + ARRIVAL;
    let reader = tokio::task::block_in_place(|| TopicReader::open(&dst, &topic, deadline));
    let events = tokio::task::block_in_place(|| {
        reader.collect(
            deadline,
            |m| {
                json_payload(m.key())
                    .map(|k| k["id"] == key)
                    .unwrap_or(false)
            },
            |found| found.len() >= 4,
        )
    });
    assert_eq!(
        events.len(),
        4,
        "expected create, update, delete and tombstone of id {key} on {topic} at {} within {ARRIVAL:?}; got {} events",
        dst.name,
        events.len()
    );
    let ops: Vec<Option<String>> = events.iter().map(op_of).collect();
    assert_eq!(
        ops,
        vec![Some("c".into()), Some("u".into()), Some("d".into()), None],
        "events of one row arrive in order, the delete followed by a tombstone"
    );
    // One row's events share a partition, and MM2 keeps partitions and order.
    assert!(events
        .iter()
        .all(|e| e.partition() == events[0].partition()));
    assert!(events.windows(2).all(|w| w[0].offset() < w[1].offset()));

    let create = json_payload(events[0].payload()).unwrap();
    assert_eq!(create["after"]["display_name"], "first");
    assert_eq!(create["after"]["origin_region"], src.name.as_str());
    assert!(create["after"]["hlc"].as_i64().unwrap() > 0, "HLC stamped");
    assert_eq!(create["source"]["table"], "users");
    let commit_ms = create["source"]["ts_ms"].as_i64().unwrap();
    assert!(
        commit_ms >= written_at - 5_000 && commit_ms <= now_ms(),
        "source.ts_ms {commit_ms} is the commit time of the write at {written_at}"
    );

    // REPLICA IDENTITY FULL: the update's `before` is the whole old row.
    let update = json_payload(events[1].payload()).unwrap();
    assert_eq!(update["before"]["display_name"], "first");
    assert_eq!(update["before"]["age"], 30);
    assert_eq!(update["after"]["display_name"], "second");
    assert_eq!(update["after"]["age"], 31);
    assert!(
        update["after"]["hlc"].as_i64() > update["before"]["hlc"].as_i64(),
        "the update's HLC is above the version it replaced"
    );

    let delete = json_payload(events[2].payload()).unwrap();
    assert_eq!(delete["after"], Json::Null);
    assert_eq!(delete["before"]["display_name"], "second");
    assert_eq!(delete["before"]["email"], format!("u{key}@example.com"));

    assert!(events[3].payload().is_none(), "tombstone has a null value");
    assert_eq!(json_payload(events[3].key()).unwrap()["id"], key);
}

#[tokio::test(flavor = "multi_thread")]
async fn json_events_cross_from_a_to_b() {
    row_lifecycle_crosses_regions(region_a(), region_b()).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn json_events_cross_from_b_to_a() {
    row_lifecycle_crosses_regions(region_b(), region_a()).await;
}

/// A Debezium heartbeat (its `heartbeat.action.query` touching
/// regionsync.heartbeat) reaches the other region with no user write.
async fn heartbeat_crosses_regions(src: Region, dst: Region) {
    let started = now_ms();
    let topic = mirrored(&src, "cdc.regionsync.heartbeat");
    let deadline = Instant::now() + ARRIVAL;
    let reader = tokio::task::block_in_place(|| TopicReader::open(&dst, &topic, deadline));
    let beats = tokio::task::block_in_place(|| {
        reader.collect(
            deadline,
            |m| {
                json_payload(m.payload())
                    .map(|v| v["source"]["ts_ms"].as_i64().unwrap_or(0) > started)
                    .unwrap_or(false)
            },
            |found| !found.is_empty(),
        )
    });
    assert!(
        !beats.is_empty(),
        "no heartbeat committed after the test began reached {topic} at {}",
        dst.name
    );
    let beat = json_payload(beats[0].payload()).unwrap();
    assert_eq!(beat["after"]["region"], src.name.as_str());
    assert_eq!(beat["source"]["table"], "heartbeat");
}

#[tokio::test(flavor = "multi_thread")]
async fn heartbeat_reaches_b_without_user_writes() {
    heartbeat_crosses_regions(region_a(), region_b()).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn heartbeat_reaches_a_without_user_writes() {
    heartbeat_crosses_regions(region_b(), region_a()).await;
}

/// `regionsync.stamp_hlc` looks up the key's tombstone on every local insert,
/// so it must go through the tombstones' primary key: the trigger's
/// `TG_TABLE_SCHEMA || '.' || TG_TABLE_NAME` is of collation "C", and
/// compared without `COLLATE "default"` it scanned every tombstone (2.4 ms
/// per insert with 30,000 of them). Counted in buffer accesses, not timed;
/// everything is rolled back.
#[tokio::test(flavor = "multi_thread")]
async fn the_hlc_trigger_finds_a_tombstone_through_the_index() {
    let db = admin_db(&region_a()).await;
    let name = format!("tsidx_{}", fresh_key());
    let future_hlc = (now_ms() + 86_400_000) << 16;
    db.batch_execute(&format!(
        "BEGIN;
         INSERT INTO regionsync.tombstones (table_name, row_key, hlc, origin_region)
             SELECT 'public.{name}_other' || (g % 10), g::text, 1, 'us-east-1'
               FROM generate_series(1, 20000) g;
         CREATE TABLE public.{name} (LIKE public.users INCLUDING DEFAULTS INCLUDING CONSTRAINTS INCLUDING INDEXES);
         CREATE TRIGGER regionsync_stamp_hlc BEFORE INSERT OR UPDATE ON public.{name}
             FOR EACH ROW EXECUTE FUNCTION regionsync.stamp_hlc('id');
         INSERT INTO regionsync.tombstones (table_name, row_key, hlc, origin_region)
             VALUES ('public.{name}', '7', {future_hlc}, 'eu-west-1');"
    ))
    .await
    .expect("set up");
    let plan: Json = db
        .query_one(
            &format!(
                "EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON)
                 INSERT INTO public.{name} (id, email) SELECT g, 'x' FROM generate_series(1, 500) g"
            ),
            &[],
        )
        .await
        .expect("explain the insert")
        .get(0);
    let node = &plan[0]["Plan"];
    let blocks =
        node["Shared Hit Blocks"].as_i64().unwrap() + node["Shared Read Blocks"].as_i64().unwrap();
    let hlc: i64 = db
        .query_one(&format!("SELECT hlc FROM public.{name} WHERE id = 7"), &[])
        .await
        .expect("row 7")
        .get(0);
    db.batch_execute("ROLLBACK").await.expect("rollback");
    assert_eq!(
        hlc,
        future_hlc + 1,
        "a re-inserted key is stamped one step after its tombstone"
    );
    assert!(
        blocks / 500 < 30,
        "{blocks} buffer accesses for 500 inserts: the trigger scans the tombstones"
    );
}

// --- Avro ----------------------------------------------------------------------

/// The non-null branch of an optional field.
fn unwrap_union(v: &Avro) -> &Avro {
    match v {
        Avro::Union(_, inner) => inner,
        other => other,
    }
}

fn record_fields(v: &Avro) -> std::collections::HashMap<String, Avro> {
    match unwrap_union(v) {
        Avro::Record(fields) => fields.iter().cloned().collect(),
        other => panic!("expected a record, got {other:?}"),
    }
}

fn field<'a>(rec: &'a std::collections::HashMap<String, Avro>, name: &str) -> &'a Avro {
    unwrap_union(
        rec.get(name)
            .unwrap_or_else(|| panic!("field {name} missing")),
    )
}

fn avro_string(v: &Avro) -> &str {
    match v {
        Avro::String(s) | Avro::Enum(_, s) => s,
        Avro::Uuid(_) => panic!("uuid as logical type; expected Debezium's string"),
        other => panic!("expected a string, got {other:?}"),
    }
}

fn avro_bytes(v: &Avro) -> Vec<u8> {
    match v {
        Avro::Bytes(b) | Avro::Fixed(_, b) => b.clone(),
        Avro::Decimal(d) => Vec::<u8>::try_from(d.clone()).expect("decimal bytes"),
        other => panic!("expected bytes, got {other:?}"),
    }
}

/// A big-endian two's-complement integer, as Avro and Connect encode decimals.
fn unscaled(bytes: &[u8]) -> i128 {
    let mut v: i128 = if bytes.first().is_some_and(|b| b & 0x80 != 0) {
        -1
    } else {
        0
    };
    for b in bytes {
        v = (v << 8) | *b as i128;
    }
    v
}

/// One user with a value in every column type of schemas/app.sql, written in
/// A and read back in B from the Avro topic, decoded through the registry's
/// Confluent-compatible API.
#[tokio::test(flavor = "multi_thread")]
async fn avro_event_of_every_column_type_decodes_in_the_other_region() {
    let (a, b) = (region_a(), region_b());
    let db = app_db(&a).await;
    let key = fresh_key();
    let bio = "regionsync ".repeat(4_000); // 44 kB: stored out of line (TOAST)
    let external_id = uuid::Uuid::new_v4();
    let avatar: Vec<u8> = (0u8..=255).collect();
    db.execute(
        "INSERT INTO users (id, email, display_name, status, age, balance, lifetime, score,
                            verified, external_id, profile, tags, avatar, bio, birth_date,
                            last_login, created_at, home_region)
         VALUES ($1, $2, 'Zoë', 'suspended', 42, 12345.67, 98765432109876543210.0123456789,
                 1234.5678, true, $3::text::uuid, '{\"plan\": \"pro\", \"seats\": 3}',
                 ARRAY['a', 'b,c', NULL], $4, $5, '1999-12-31', '2024-02-29 13:14:15.123456',
                 '2024-02-29 13:14:15.654321+02', 'eu-west-1')",
        &[
            &key,
            &format!("u{key}@example.com"),
            &external_id.to_string(),
            &avatar,
            &bio,
        ],
    )
    .await
    .expect("insert a user with every type");
    db.execute(
        "INSERT INTO orders (id, user_id, quantity, amount, currency, note, placed_at)
         VALUES ($1, $1, 7, 19.99, 'EUR', 'gift', '2025-01-02 03:04:05+00')",
        &[&key],
    )
    .await
    .expect("insert an order");

    let decoder = AvroDecoder::new(SrSettings::new(registry_ccompat_url()));
    let deadline = Instant::now() + ARRIVAL;
    let users_topic = mirrored(&a, "cdc.avro.public.users");
    let user = find_avro_event(&decoder, &b, &users_topic, key, deadline).await;
    let envelope = record_fields(&user);
    assert_eq!(avro_string(field(&envelope, "op")), "c");
    let after = record_fields(field(&envelope, "after"));

    assert_eq!(field(&after, "id"), &Avro::Long(key));
    assert_eq!(
        avro_string(field(&after, "email")),
        format!("u{key}@example.com")
    );
    assert_eq!(avro_string(field(&after, "display_name")), "Zoë");
    assert_eq!(avro_string(field(&after, "status")), "suspended");
    assert_eq!(field(&after, "age"), &Avro::Int(42));
    // numeric(12,2): Avro decimal, scale 2.
    assert_eq!(unscaled(&avro_bytes(field(&after, "balance"))), 1_234_567);
    // numeric without scale: Debezium's VariableScaleDecimal {scale, value}.
    let lifetime = record_fields(field(&after, "lifetime"));
    assert_eq!(field(&lifetime, "scale"), &Avro::Int(10));
    assert_eq!(
        unscaled(&avro_bytes(field(&lifetime, "value"))),
        987_654_321_098_765_432_100_123_456_789
    );
    assert_eq!(field(&after, "score"), &Avro::Double(1234.5678));
    assert_eq!(field(&after, "verified"), &Avro::Boolean(true));
    assert_eq!(
        avro_string(field(&after, "external_id")),
        external_id.to_string()
    );
    let profile: Json = serde_json::from_str(avro_string(field(&after, "profile"))).unwrap();
    assert_eq!(profile, serde_json::json!({"plan": "pro", "seats": 3}));
    match field(&after, "tags") {
        Avro::Array(items) => {
            let items: Vec<Option<&str>> = items
                .iter()
                .map(|i| match unwrap_union(i) {
                    Avro::Null => None,
                    v => Some(avro_string(v)),
                })
                .collect();
            assert_eq!(items, vec![Some("a"), Some("b,c"), None]);
        }
        other => panic!("tags: expected an array, got {other:?}"),
    }
    assert_eq!(avro_bytes(field(&after, "avatar")), avatar);
    assert_eq!(avro_string(field(&after, "bio")), bio);
    // date: days since the epoch (io.debezium.time.Date).
    let days = match field(&after, "birth_date") {
        Avro::Int(d) | Avro::Date(d) => *d,
        other => panic!("birth_date: {other:?}"),
    };
    assert_eq!(days, 10_956, "1999-12-31 is day 10956");
    // timestamp: microseconds since the epoch, no zone (MicroTimestamp).
    let micros = match field(&after, "last_login") {
        Avro::Long(m) | Avro::TimestampMicros(m) | Avro::LocalTimestampMicros(m) => *m,
        other => panic!("last_login: {other:?}"),
    };
    assert_eq!(micros, 1_709_212_455_123_456);
    // timestamptz: ISO-8601 in UTC (ZonedTimestamp).
    assert_eq!(
        avro_string(field(&after, "created_at")),
        "2024-02-29T11:14:15.654321Z"
    );
    assert_eq!(avro_string(field(&after, "home_region")), "eu-west-1");
    assert!(matches!(field(&after, "hlc"), Avro::Long(h) if *h > 0));
    assert_eq!(avro_string(field(&after, "origin_region")), a.name);

    let orders_topic = mirrored(&a, "cdc.avro.public.orders");
    let order = find_avro_event(&decoder, &b, &orders_topic, key, deadline).await;
    let after = record_fields(field(&record_fields(&order), "after"));
    assert_eq!(field(&after, "user_id"), &Avro::Long(key));
    assert_eq!(field(&after, "quantity"), &Avro::Int(7));
    assert_eq!(unscaled(&avro_bytes(field(&after, "amount"))), 1999);
    assert_eq!(avro_string(field(&after, "currency")), "EUR");
    assert_eq!(avro_string(field(&after, "note")), "gift");
    assert_eq!(
        avro_string(field(&after, "placed_at")),
        "2025-01-02T03:04:05.000000Z"
    );
}

/// The first Avro event on `topic` whose key's `id` is `key`, decoded.
async fn find_avro_event(
    decoder: &AvroDecoder,
    region: &Region,
    topic: &str,
    key: i64,
    deadline: Instant,
) -> Avro {
    let reader = tokio::task::block_in_place(|| TopicReader::open(region, topic, deadline));
    loop {
        let batch = tokio::task::block_in_place(|| {
            reader.collect(
                (Instant::now() + Duration::from_secs(1)).min(deadline),
                |m| m.key().is_some() && m.payload().is_some(),
                |found| found.len() >= 500,
            )
        });
        for msg in &batch {
            let k = decoder
                .decode(msg.key())
                .await
                .unwrap_or_else(|e| panic!("decode key on {topic}: {e}"));
            let id = record_fields(&k.value).get("id").cloned();
            if id == Some(Avro::Long(key)) {
                return decoder
                    .decode(msg.payload())
                    .await
                    .unwrap_or_else(|e| panic!("decode value on {topic}: {e}"))
                    .value;
            }
        }
        assert!(
            Instant::now() < deadline,
            "no Avro event for id {key} on {topic} at {} within {ARRIVAL:?}",
            region.name
        );
    }
}

/// schemas/avro/ holds the change-event schemas exactly as Debezium registers
/// them: a user and an order written now register (or reuse) them, and each
/// committed file equals the registry's latest version of its subject.
#[tokio::test(flavor = "multi_thread")]
async fn committed_avro_schemas_match_the_registry() {
    let a = region_a();
    let db = app_db(&a).await;
    let key = fresh_key();
    db.execute(
        "INSERT INTO users (id, email) VALUES ($1, 'schema@example.com')",
        &[&key],
    )
    .await
    .expect("insert user");
    db.execute(
        "INSERT INTO orders (id, user_id, quantity, amount, currency) VALUES ($1, $1, 1, 1, 'USD')",
        &[&key],
    )
    .await
    .expect("insert order");

    let http = reqwest::Client::new();
    let dir = repo_root().join("schemas/avro");
    let mut checked = 0;
    for entry in std::fs::read_dir(&dir).expect("schemas/avro") {
        let path = entry.expect("dir entry").path();
        let file = path.file_name().unwrap().to_string_lossy().into_owned();
        let Some(stem) = file.strip_suffix(".avsc") else {
            continue;
        };
        let committed: Json =
            serde_json::from_str(&std::fs::read_to_string(&path).expect("read avsc"))
                .unwrap_or_else(|e| panic!("{file} is not JSON: {e}"));
        let subject = format!("cdc.avro.{stem}");
        let url = format!(
            "{}/subjects/{subject}/versions/latest/schema",
            registry_ccompat_url()
        );
        let deadline = Instant::now() + ARRIVAL;
        let registered: Json = loop {
            let resp = http.get(&url).send().await.expect("registry answers");
            if resp.status().is_success() {
                break resp.json().await.expect("schema JSON");
            }
            assert!(
                Instant::now() < deadline,
                "subject {subject} not registered: {}",
                resp.status()
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        };
        assert_eq!(
            committed, registered,
            "schemas/avro/{file} differs from the registry's {subject}"
        );
        checked += 1;
    }
    assert_eq!(
        checked, 6,
        "key and value schemas of users, orders, heartbeat"
    );
}
