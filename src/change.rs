//! The change vocabulary: what `decode` makes of a Debezium message and what
//! `route`, `conflict` and `apply` read. Plain data, no behaviour beyond
//! naming: a [`Change`] of typed [`Field`]s, each with the semantic type
//! name the envelope gave it ([`semantic`]).

use std::borrow::Cow;
use std::collections::BTreeMap;

/// What Debezium did to the row.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Op {
    /// `c`: insert.
    Create,
    /// `u`: update.
    Update,
    /// `d`: delete.
    Delete,
    /// `r`: a row read by a snapshot.
    Read,
    /// `t`: the table was truncated.
    Truncate,
}

/// The placeholder Debezium writes for an unchanged TOASTed column.
pub const UNAVAILABLE_PLACEHOLDER: &str = "__debezium_unavailable_value";

/// One column value as the envelope carried it.
#[derive(Clone, Debug, PartialEq)]
pub enum Field {
    Null,
    Bool(bool),
    Int(i64),
    Float(f64),
    String(String),
    Bytes(Vec<u8>),
    /// A bit string (`io.debezium.data.Bits`): its bits little-endian
    /// (the string's last bit is bit 0 of the first byte), without
    /// leading zero bytes, and the source column's `length` parameter:
    /// `bit(n)`'s n (the value's length), `bit varying(n)`'s maximum n
    /// (2147483647 unconstrained; the value's own length is not carried).
    Bits {
        bytes: Vec<u8>,
        length: u32,
    },
    /// A fixed-scale decimal: big-endian two's-complement unscaled value.
    Decimal {
        unscaled: Vec<u8>,
        scale: u32,
    },
    Array(Vec<Field>),
    /// A nested JSON value of a schemaless envelope (e.g. an untyped struct).
    Json(serde_json::Value),
    /// An unchanged TOASTed value Debezium did not send.
    Unavailable,
}

/// A column value with the semantic type name the envelope gave it, e.g.
/// `io.debezium.time.Date`, `org.apache.kafka.connect.data.Decimal`;
/// `None` in schemaless JSON or for plain types.
#[derive(Clone, Debug, PartialEq)]
pub struct Typed {
    pub field: Field,
    pub semantic: Option<Cow<'static, str>>,
}

/// A row image: column name → value, in column-name order.
pub type Row = BTreeMap<String, Typed>;

/// One decoded Debezium change event.
#[derive(Clone, Debug, PartialEq)]
pub struct Change {
    pub op: Op,
    /// `source.schema` and `source.table` of the source database.
    pub schema: String,
    pub table: String,
    /// The message key's fields (the row's primary key).
    pub key: Row,
    /// A delete's before image whole; an update's only as far as the apply
    /// reads it (see `decode::envelope::before_wanted`).
    pub before: Option<Row>,
    pub after: Option<Row>,
    /// `source.ts_ms`: the commit time in the source database.
    pub source_ts_ms: i64,
    /// `source.lsn`, when present.
    pub lsn: Option<i64>,
    /// `source.origin`: the replication origin the source transaction ran
    /// under, if any (a regionsync apply session's is `regionsync_<pid>`).
    pub origin: Option<String>,
    /// `source.snapshot` is set (anything but "false").
    pub snapshot: bool,
    /// The values' types came with the message (JSON with `schemas.enable`,
    /// Avro): each value's kind is its source column's Connect type, so a
    /// kind this region's column cannot come from is a schema difference
    /// (`apply::prepare`). Schemaless JSON carries only the JSON kinds.
    pub typed: bool,
}

/// The outcome of decoding one message.
#[derive(Clone, Debug, PartialEq)]
pub enum Decoded {
    Change(Change),
    /// A null value after a delete: Kafka compaction's tombstone. Carries the
    /// key for completeness; the delete event before it did the work.
    Tombstone {
        key: Row,
    },
}

/// The columns of a row's version (DESIGN.md §4).
pub const VERSION_COLUMNS: [&str; 2] = ["hlc", "origin_region"];

/// Connect / Debezium semantic type names that decoding and rendering
/// act on.
pub mod semantic {
    pub const DATE: &str = "io.debezium.time.Date";
    pub const TIME: &str = "io.debezium.time.Time";
    pub const MICRO_TIME: &str = "io.debezium.time.MicroTime";
    pub const NANO_TIME: &str = "io.debezium.time.NanoTime";
    pub const TIMESTAMP: &str = "io.debezium.time.Timestamp";
    pub const MICRO_TIMESTAMP: &str = "io.debezium.time.MicroTimestamp";
    pub const NANO_TIMESTAMP: &str = "io.debezium.time.NanoTimestamp";
    // Connect's own logical types (`time.precision.mode=connect`).
    pub const CONNECT_DATE: &str = "org.apache.kafka.connect.data.Date";
    pub const CONNECT_TIME: &str = "org.apache.kafka.connect.data.Time";
    pub const CONNECT_TIMESTAMP: &str = "org.apache.kafka.connect.data.Timestamp";
    pub const UUID: &str = "io.debezium.data.Uuid";
    pub const ENUM: &str = "io.debezium.data.Enum";
    pub const DECIMAL: &str = "org.apache.kafka.connect.data.Decimal";
    pub const VARIABLE_SCALE_DECIMAL: &str = "io.debezium.data.VariableScaleDecimal";
    /// `bit(n)`, `bit varying`: little-endian bytes, parameter `length`
    /// ([`super::Field::Bits`]).
    pub const BITS: &str = "io.debezium.data.Bits";
    /// `interval` with `interval.handling.mode=string`: ISO 8601 text.
    pub const INTERVAL: &str = "io.debezium.time.Interval";
    /// `interval` with `interval.handling.mode=numeric`: microseconds.
    pub const MICRO_DURATION: &str = "io.debezium.time.MicroDuration";
    /// `point`: a struct `{x, y, wkb, srid}`.
    pub const POINT: &str = "io.debezium.data.geometry.Point";
}
