//! Any bytes as an Avro message in the Confluent wire format, keyed and
//! valued, against the schemas Debezium registers for the local stack's
//! tables (schemas/avro/) and a few hostile ones (a recursive schema, one
//! that apache-avro reads, every kind of value): reading and decoding
//! must return Ok or Err, never panic, overflow the stack or hang, and
//! every decoded value must render for any column type.
//!
//! Input: a 2-byte big-endian key length, the key, the value (empty: a
//! tombstone's null). Schema ids 1..=9 are `SCHEMAS` in order; the seeds
//! (fuzz/seeds/decode_avro/, real change events from the stack) use them.
#![no_main]

use std::sync::LazyLock;

use futures::executor::block_on;
use libfuzzer_sys::fuzz_target;
use regionsync::decode::registry::{self, AvroSource, FixedSchemas};
use regionsync::decode::{decode_avro, decode_avro_keyless, Decoded};

const TYPES: &[&str] = &[
    "bigint",
    "numeric(12,2)",
    "numeric",
    "date",
    "timestamp without time zone",
    "timestamp with time zone",
    "bytea",
    "text[]",
    "jsonb",
    "uuid",
    "double precision",
];

/// Schema id n is `SCHEMAS[n - 1]`.
const SCHEMAS: &[&str] = &[
    include_str!("../../schemas/avro/public.users-key.avsc"),
    include_str!("../../schemas/avro/public.users-value.avsc"),
    include_str!("../../schemas/avro/public.orders-key.avsc"),
    include_str!("../../schemas/avro/public.orders-value.avsc"),
    include_str!("../../schemas/avro/regionsync.heartbeat-key.avsc"),
    include_str!("../../schemas/avro/regionsync.heartbeat-value.avsc"),
    // A record that holds itself: nesting bounded only by the reader.
    r#"{"type": "record", "name": "Node", "fields": [
        {"name": "id", "type": "long"},
        {"name": "next", "type": ["null", "Node"]},
        {"name": "children", "type": {"type": "array", "items": "Node"}}]}"#,
    // A uuid (a leaf apache-avro reads) in a recursive record.
    r#"{"type": "record", "name": "U", "fields": [
        {"name": "id", "type": {"type": "string", "logicalType": "uuid"}},
        {"name": "next", "type": ["null", "U"]}]}"#,
    // Every other kind, as an envelope would hold it.
    r#"{"type": "record", "name": "Envelope", "namespace": "k", "fields": [
        {"name": "before", "type": ["null", {"type": "record", "name": "Value", "fields": [
            {"name": "id", "type": "long"},
            {"name": "b", "type": "boolean"}, {"name": "f", "type": "float"},
            {"name": "d", "type": "double"}, {"name": "by", "type": "bytes"},
            {"name": "fx", "type": {"type": "fixed", "name": "F3", "size": 3}},
            {"name": "e", "type": {"type": "enum", "name": "E", "symbols": ["A", "B"]}},
            {"name": "a", "type": {"type": "array", "items": ["null", "long"]}},
            {"name": "m", "type": {"type": "map", "values": "string"}},
            {"name": "dec", "type": {"type": "bytes", "logicalType": "decimal", "precision": 10, "scale": 2}},
            {"name": "bigdec", "type": {"type": "bytes", "logicalType": "big-decimal"}},
            {"name": "date", "type": {"type": "int", "logicalType": "date"}},
            {"name": "tsu", "type": {"type": "long", "logicalType": "timestamp-micros"}},
            {"name": "dur", "type": {"type": "fixed", "name": "Dur", "size": 12, "logicalType": "duration"}},
            {"name": "empty", "type": {"type": "array", "items": {"type": "record", "name": "Empty", "fields": []}}}
        ]}]},
        {"name": "after", "type": ["null", "Value"]},
        {"name": "source", "type": {"type": "record", "name": "Source", "fields": [
            {"name": "ts_ms", "type": "long"}, {"name": "schema", "type": "string"},
            {"name": "table", "type": "string"}, {"name": "lsn", "type": ["null", "long"]}]}},
        {"name": "op", "type": "string"},
        {"name": "transaction", "type": ["null", {"type": "array", "items": {"type": "array", "items": "null"}}]}]}"#,
];

static SOURCE: LazyLock<AvroSource> = LazyLock::new(|| {
    let schemas = SCHEMAS
        .iter()
        .enumerate()
        .map(|(i, text)| {
            // As the worker reads a registered schema: Debezium's time
            // units marked as Avro logical types, bit string lengths on their fields.
            let schema = registry::with_debezium_marks(text)
                .unwrap_or_else(|| apache_avro::Schema::parse_str(text).expect("a schema"));
            (i as u32 + 1, schema)
        })
        .collect();
    AvroSource::with_schemas(FixedSchemas(schemas))
});

fuzz_target!(|data: &[u8]| {
    let [a, b, rest @ ..] = data else { return };
    let split = usize::from(u16::from_be_bytes([*a, *b])).min(rest.len());
    let (key, value) = rest.split_at(split);
    let value = (!value.is_empty()).then_some(value);
    // The whole datum too: it reads fields the envelope skips.
    let _ = block_on(SOURCE.decode(value));
    let (Ok(key), Ok(value)) = (
        block_on(SOURCE.decode(Some(key))),
        block_on(SOURCE.decode_envelope(value)),
    ) else {
        return;
    };
    let decoded = match (key, value) {
        (Some(k), Some(v)) => decode_avro(k.value, &k.schema, Some((v.value, &*v.schema))),
        (Some(k), None) => decode_avro(k.value, &k.schema, None),
        (None, Some(v)) => decode_avro_keyless(v.value, &v.schema),
        (None, None) => return,
    };
    if let Ok(Decoded::Change(change)) = decoded {
        for row in [change.before, change.after].into_iter().flatten() {
            for typed in row.values() {
                for t in TYPES {
                    let _ = typed.to_pg_text(t);
                }
            }
        }
    }
});
