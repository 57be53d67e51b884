//! Decode: one Kafka message (key and value bytes) carrying a Debezium
//! envelope into one typed [`Decoded`] change. Pure: no I/O; the Avro path
//! takes the writer schema already fetched by the caller (`registry`).
//! Never panics on input: every problem is a [`DecodeError`] that names it.
//!
//! Values are decoded into [`Field`]s that keep what the envelope says about
//! them (Connect/Debezium semantic type names where the format carries them);
//! `apply::pg_text` then renders a field as PostgreSQL's text input for the
//! target column's type.
//!
//! | file | holds |
//! |---|---|
//! | `envelope` | what both encodings share: ops, the source block, semantic names |
//! | `json` | Kafka Connect's JsonConverter format, with or without schemas |
//! | `connect_schema` | a JSON message's Connect schema, parsed once and cached per thread |
//! | `avro` | the Avro envelope and its values |
//! | `avro_reader` | Avro datums read with the unused envelope fields skipped |
//! | `registry` | the Confluent wire format and writer schemas from the registry |

mod avro;
pub mod avro_reader;
mod connect_schema;
mod envelope;
mod json;
pub mod registry;
#[cfg(test)]
mod tests;

pub use crate::change::{Change, Decoded, Field, Op, Row, Typed, UNAVAILABLE_PLACEHOLDER};
pub use avro::{decode_avro, decode_avro_keyless};
pub use json::decode_json;
pub(crate) use json::{json_float, json_plain};

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum DecodeError {
    #[error("message has no key; Debezium keys every change by primary key")]
    MissingKey,
    #[error("not valid JSON: {0}")]
    Json(String),
    #[error("Avro payload: {0}")]
    Avro(String),
    #[error("not a Debezium envelope: {0}")]
    Envelope(String),
    #[error("unknown op {0:?} (expected c, u, d, r or t)")]
    UnknownOp(String),
    #[error("column {column}: {problem}")]
    Column { column: String, problem: String },
}
