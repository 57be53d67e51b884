//! Any bytes as a Debezium message: decoding must return Ok or Err, never
//! panic, and every decoded value must render for any column type.
#![no_main]

use libfuzzer_sys::fuzz_target;
use regionsync::decode::{decode_json, Decoded};

const TYPES: &[&str] = &[
    "bigint", "numeric(12,2)", "numeric", "date", "timestamp without time zone",
    "timestamp with time zone", "bytea", "text[]", "jsonb", "uuid", "double precision",
];

fuzz_target!(|data: &[u8]| {
    // First byte splits the input into key and value.
    let split = data.first().map_or(0, |b| *b as usize).min(data.len().saturating_sub(1));
    let (key, value) = data.split_at(split);
    if let Ok(Decoded::Change(change)) = decode_json(Some(key), Some(value)) {
        for row in [change.before, change.after].into_iter().flatten() {
            for typed in row.values() {
                for t in TYPES {
                    let _ = typed.to_pg_text(t);
                }
            }
        }
    }
});
