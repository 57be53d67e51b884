//! Any bytes as a Debezium message: decoding must return Ok or Err, never
//! panic, and every decoded value must render for any column type.
#![no_main]

use libfuzzer_sys::fuzz_target;
use regionsync::decode::{decode_json, Decoded};

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

fuzz_target!(|data: &[u8]| {
    // A 2-byte big-endian key length, the key, the value (empty: null), as
    // decode_avro's input and the seeds (fuzz/seeds/decode_json/).
    let [a, b, rest @ ..] = data else { return };
    let split = usize::from(u16::from_be_bytes([*a, *b])).min(rest.len());
    let (key, value) = rest.split_at(split);
    let value = (!value.is_empty()).then_some(value);
    if let Ok(Decoded::Change(change)) = decode_json(Some(key), value) {
        for row in [change.before, change.after].into_iter().flatten() {
            for typed in row.values() {
                for t in TYPES {
                    let _ = typed.to_pg_text(t);
                }
            }
        }
    }
});
