//! What both encodings share: the envelope's parts once the format is peeled
//! off, its `op` and `source.snapshot` values, the errors that name a
//! column or a part, and the semantic type names as borrowed strings.

use std::borrow::Cow;

use super::DecodeError;
use crate::change::semantic::*;
use crate::change::{Change, Decoded, Field, Op, Row, VERSION_COLUMNS};

/// Whether a column of the before image is decoded. The apply reads all of
/// a delete's, but of any other change's only the version it replaced and
/// the values its after image left out (unchanged TOAST): decoding the
/// rest of every update's before image was a third of the decode's work.
#[inline]
pub(super) fn before_wanted(op: Op, after: Option<&Row>, column: &str) -> bool {
    op == Op::Delete
        || VERSION_COLUMNS.contains(&column)
        || after.is_some_and(|a| a.get(column).is_some_and(|t| t.field == Field::Unavailable))
}

/// A semantic type name, without an allocation for the names rendering
/// looks at (the common case: every date, time and decimal column).
pub(super) fn semantic_name(name: &str) -> Cow<'static, str> {
    const KNOWN: [&str; 18] = [
        BITS,
        INTERVAL,
        MICRO_DURATION,
        POINT,
        DATE,
        TIME,
        MICRO_TIME,
        NANO_TIME,
        TIMESTAMP,
        MICRO_TIMESTAMP,
        NANO_TIMESTAMP,
        CONNECT_DATE,
        CONNECT_TIME,
        CONNECT_TIMESTAMP,
        UUID,
        ENUM,
        DECIMAL,
        VARIABLE_SCALE_DECIMAL,
    ];
    // Other names Debezium's PostgreSQL connector gives values: kept only,
    // but borrowed too, as each is cloned into every value of its column.
    const OTHER: [&str; 10] = [
        "io.debezium.data.Json",
        "io.debezium.data.Xml",
        "io.debezium.data.EnumSet",
        "io.debezium.data.Ltree",
        "io.debezium.time.ZonedTimestamp",
        "io.debezium.time.ZonedTime",
        "io.debezium.time.IsoDate",
        "io.debezium.time.IsoTime",
        "io.debezium.time.IsoTimestamp",
        "io.debezium.data.geometry.Geometry",
    ];
    match KNOWN.iter().chain(&OTHER).find(|k| **k == name) {
        Some(known) => Cow::Borrowed(known),
        None => Cow::Owned(name.to_owned()),
    }
}

#[inline]
pub(super) fn column_error(column: &str, problem: impl Into<String>) -> DecodeError {
    DecodeError::Column {
        column: column.to_owned(),
        problem: problem.into(),
    }
}

#[inline]
pub(super) fn envelope_error(problem: impl Into<String>) -> DecodeError {
    DecodeError::Envelope(problem.into())
}

#[inline]
pub(super) fn parse_op(op: &str) -> Result<Op, DecodeError> {
    match op {
        "c" => Ok(Op::Create),
        "u" => Ok(Op::Update),
        "d" => Ok(Op::Delete),
        "r" => Ok(Op::Read),
        "t" => Ok(Op::Truncate),
        other => Err(DecodeError::UnknownOp(other.to_owned())),
    }
}

/// `source.snapshot`: Debezium writes "false" outside snapshots and one of
/// "true", "first", "last", … (or a bool in older versions) inside them.
#[inline]
pub(super) fn snapshot_flag(value: Option<&str>) -> Result<bool, DecodeError> {
    match value {
        None | Some("false") => Ok(false),
        Some(
            "true"
            | "first"
            | "last"
            | "first_in_data_collection"
            | "last_in_data_collection"
            | "incremental",
        ) => Ok(true),
        Some(other) => Err(envelope_error(format!(
            "field `source.snapshot` has unknown value {other:?}"
        ))),
    }
}

/// An envelope's parts once the format is peeled off.
pub(super) struct Envelope {
    pub(super) op: Op,
    pub(super) schema: String,
    pub(super) table: String,
    pub(super) before: Option<Row>,
    pub(super) after: Option<Row>,
    pub(super) source_ts_ms: i64,
    pub(super) lsn: Option<i64>,
    pub(super) origin: Option<String>,
    pub(super) snapshot: bool,
    /// Whether a schema gave the values' types ([`Change::typed`]).
    pub(super) typed: bool,
}

impl Envelope {
    /// Only a truncate (which concerns no row) comes without a key.
    pub(super) fn into_keyless_change(self) -> Result<Decoded, DecodeError> {
        if self.op == Op::Truncate {
            self.into_change(Row::new())
        } else {
            Err(DecodeError::MissingKey)
        }
    }

    pub(super) fn into_change(self, key: Row) -> Result<Decoded, DecodeError> {
        // The applier relies on the image each op needs being there.
        let missing = match self.op {
            Op::Create | Op::Read | Op::Update if self.after.is_none() => Some("after"),
            Op::Delete if self.before.is_none() => Some("before"),
            _ => None,
        };
        if let Some(image) = missing {
            return Err(envelope_error(format!(
                "op {:?} has no `{image}` row image",
                self.op
            )));
        }
        Ok(Decoded::Change(Change {
            op: self.op,
            schema: self.schema,
            table: self.table,
            key,
            before: self.before,
            after: self.after,
            source_ts_ms: self.source_ts_ms,
            lsn: self.lsn,
            origin: self.origin,
            snapshot: self.snapshot,
            typed: self.typed,
        }))
    }
}

/// A list that is only Debezium's placeholder: an unchanged TOASTed array.
#[inline]
pub(super) fn is_placeholder_list<T>(items: &[T], is_placeholder: impl Fn(&T) -> bool) -> bool {
    matches!(items, [only] if is_placeholder(only))
}
