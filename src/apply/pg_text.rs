//! PostgreSQL text rendering: a decoded [`Field`] as the text input of the
//! target column's type, so that the applier can bind every value as text
//! and cast it in SQL (`$1::text[]` → `::numeric`, `::date`, …). Dates,
//! times and decimals are formatted exactly, in integer arithmetic;
//! Debezium's stand-ins for `±infinity` ([`sentinel`]) become `infinity`
//! and `-infinity` again; bit strings, points and intervals are rebuilt
//! from the forms Debezium gives them. A value the column's type cannot
//! take, or that Debezium carried without what would make it exact, is a
//! [`RenderError`], never a different value. docs/TYPES.md lists each type.

use std::borrow::Cow;
use std::fmt::Write as _;

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;

use crate::change::semantic::*;
use serde_json::Value as Json;

use crate::change::{Field, Typed, UNAVAILABLE_PLACEHOLDER};
use crate::decode::json_plain;

/// Why a value cannot be written to a column of its type. Carries no
/// column name: the caller knows it and names table, column and type.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{0}")]
pub struct RenderError(pub String);

/// The numbers Debezium's PostgreSQL connector (3.6) writes for PostgreSQL's
/// `infinity` and `-infinity` in `date` and `timestamp` columns
/// (`timestamptz` carries the words themselves, as `ZonedTimestamp` text).
///
/// Read in debezium-connector-postgres 3.6.1.Final,
/// `PostgresValueConverter` (`POSITIVE_INFINITY_LOCAL_DATE_TIME`, …, built
/// from pgjdbc's `PGStatement.DATE_POSITIVE_INFINITY` /
/// `DATE_NEGATIVE_INFINITY`, read as microseconds since the epoch, and
/// `convertTimestampToEpochNanos`) and `connection/DateTimeFormat.date`
/// (the two dates), and in the connector's documentation ("TIMESTAMP
/// type": `9223372036825200000` and `-9223372036832400000`; with
/// `time.precision.mode=nanoseconds`, `Long.MAX_VALUE` and
/// `Long.MIN_VALUE`).
///
/// The dates were measured on the local stack (`date 'infinity'` arrives
/// as -2147472692). The dates and the negative instants lie outside
/// PostgreSQL's ranges, so they cannot be real values. The positive
/// instant is a real timestamp, 294247-01-10 04:00:25.2 (at millisecond
/// precision the same): that one value arrives as `infinity`
/// (docs/TYPES.md).
pub mod sentinel {
    /// `io.debezium.time.MicroTimestamp` (microseconds since the epoch).
    pub const TIMESTAMP_INFINITY_MICROS: i64 = 9_223_372_036_825_200_000;
    pub const TIMESTAMP_MINUS_INFINITY_MICROS: i64 = -9_223_372_036_832_400_000;
    /// `io.debezium.time.Timestamp` and Connect's `Timestamp` (milliseconds):
    /// the same instants.
    pub const TIMESTAMP_INFINITY_MILLIS: i64 = TIMESTAMP_INFINITY_MICROS / 1000;
    pub const TIMESTAMP_MINUS_INFINITY_MILLIS: i64 = TIMESTAMP_MINUS_INFINITY_MICROS / 1000;
    /// `io.debezium.time.NanoTimestamp` (nanoseconds).
    pub const TIMESTAMP_INFINITY_NANOS: i64 = i64::MAX;
    pub const TIMESTAMP_MINUS_INFINITY_NANOS: i64 = i64::MIN;
    /// `io.debezium.time.Date` (days since the epoch): the dates
    /// -5877611-06-21 (`infinity`) and -5877611-06-22 (`-infinity`).
    pub const DATE_INFINITY_DAYS: i64 = -2_147_472_692;
    pub const DATE_MINUS_INFINITY_DAYS: i64 = -2_147_472_691;
    /// The same in a `date[]` element, which Debezium converts another way
    /// (through pgjdbc's array reader): measured on the local stack, with
    /// the Connect JVM in UTC. Both lie millions of years before
    /// PostgreSQL's first date.
    pub const DATE_ARRAY_INFINITY_DAYS: i64 = -622_191_234;
    pub const DATE_ARRAY_MINUS_INFINITY_DAYS: i64 = -625_821_272;
    /// A `timestamptz[]` element `-infinity` arrives as this text
    /// (`+292269055-12-02T23:00:00.000000Z`, measured; `infinity` arrives
    /// as the word), far beyond PostgreSQL's last year, 294276.
    pub const TIMESTAMPTZ_ARRAY_MINUS_INFINITY_PREFIX: &str = "+292269055-12-02T";
}

const MICROS_PER_DAY: i128 = 86_400_000_000;
/// Far beyond PostgreSQL's date range, small enough that no calendar
/// arithmetic on it can overflow.
const MAX_ABS_DAYS: i128 = 1_000_000_000;
/// PostgreSQL's largest numeric (131072 digits before the point, 16383
/// after) fits in about 61 KiB; bounding the input bounds the work.
pub(crate) const MAX_DECIMAL_BYTES: usize = 64 * 1024;
/// PostgreSQL's largest numeric display scale.
const MAX_DECIMAL_SCALE: u32 = 16383;

/// What rendering a PostgreSQL type needs from `format_type`'s output.
#[derive(Clone, Debug)]
enum PgKind {
    Int,
    Numeric {
        scale: Option<u32>,
    },
    Float,
    Bool,
    Date,
    Timestamp {
        precision: Option<u32>,
    },
    TimestampTz,
    Time {
        precision: Option<u32>,
    },
    TimeTz {
        precision: Option<u32>,
    },
    Interval,
    Bytea,
    Json,
    Uuid,
    /// `bit(n)`: exactly `length` bits.
    Bit {
        length: u32,
    },
    /// `bit varying(n)` (`max`), or unconstrained.
    VarBit {
        max: Option<u32>,
    },
    Point,
    /// `hstore`: Debezium's JSON object text (`hstore.handling.mode=json`)
    /// is rebuilt as `"k"=>"v"` pairs.
    Hstore,
    /// A type Debezium's PostgreSQL connector leaves out of its change
    /// events (it has no converter for it): why, for the dead-letter reason.
    NotCarried(&'static str),
    /// Text types, enums and anything unknown.
    Text,
    Array(Box<PgType>),
}

/// A column type as `format_type` prints it, parsed once for rendering
/// (see [`Typed::to_pg_text_as`]).
#[derive(Clone, Debug)]
pub struct PgType {
    name: String,
    kind: PgKind,
}

impl PgType {
    pub fn parse(pg_type: &str) -> PgType {
        let name = pg_type.trim();
        if let Some(element) = name.strip_suffix("[]") {
            let element = PgType::parse(element);
            let kind = match not_carried_array(&element) {
                Some(why) => PgKind::NotCarried(why),
                None => PgKind::Array(Box::new(element)),
            };
            return PgType {
                name: name.to_owned(),
                kind,
            };
        }
        let lower = name.to_ascii_lowercase();
        // `timestamp(3) without time zone` → base `timestamp without time
        // zone`, modifiers `3`.
        let (base, modifiers) = match lower.split_once('(') {
            Some((head, rest)) => match rest.split_once(')') {
                Some((modifiers, tail)) => (
                    format!("{} {}", head.trim(), tail.trim()).trim().to_owned(),
                    Some(modifiers.to_owned()),
                ),
                None => (lower.clone(), None),
            },
            None => (lower.clone(), None),
        };
        let numbers: Vec<Option<u32>> = modifiers
            .as_deref()
            .map(|m| m.split(',').map(|n| n.trim().parse().ok()).collect())
            .unwrap_or_default();
        let first = numbers.first().copied().flatten();
        let kind = match base.as_str() {
            "smallint" | "integer" | "bigint" | "int" | "int2" | "int4" | "int8" => PgKind::Int,
            "numeric" | "decimal" => PgKind::Numeric {
                // `numeric(p)` has scale 0; plain `numeric` has none.
                scale: match numbers.as_slice() {
                    [] => None,
                    [_] => Some(0),
                    [_, scale, ..] => *scale,
                },
            },
            "real" | "double precision" | "float4" | "float8" => PgKind::Float,
            "boolean" | "bool" => PgKind::Bool,
            "date" => PgKind::Date,
            "timestamp without time zone" | "timestamp" => PgKind::Timestamp { precision: first },
            "timestamp with time zone" | "timestamptz" => PgKind::TimestampTz,
            "time without time zone" | "time" => PgKind::Time { precision: first },
            "time with time zone" | "timetz" => PgKind::TimeTz { precision: first },
            "bytea" => PgKind::Bytea,
            "json" | "jsonb" => PgKind::Json,
            "uuid" => PgKind::Uuid,
            // `bit` alone is `bit(1)`.
            "bit" => PgKind::Bit {
                length: first.unwrap_or(1),
            },
            "bit varying" | "varbit" => PgKind::VarBit { max: first },
            "point" => PgKind::Point,
            "hstore" => PgKind::Hstore,
            "box" | "lseg" | "path" | "polygon" | "circle" | "line" => {
                PgKind::NotCarried(NOT_CARRIED_GEOMETRY)
            }
            b if b.ends_with("multirange") => PgKind::NotCarried(NOT_CARRIED_MULTIRANGE),
            "tsquery" | "pg_lsn" | "txid_snapshot" | "pg_snapshot" | "xid" | "xid8" | "cid"
            | "tid" | "regclass" | "regproc" | "regprocedure" | "regoper" | "regoperator"
            | "regtype" | "regrole" | "regnamespace" | "regconfig" | "regdictionary"
            | "regcollation" => PgKind::NotCarried(NOT_CARRIED_TYPE),
            b if b.starts_with("interval") => PgKind::Interval,
            _ => PgKind::Text,
        };
        PgType {
            name: name.to_owned(),
            kind,
        }
    }

    /// The type as `format_type` printed it.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The type of an array whose element type is a domain: Debezium has
    /// no converter for it (its `PostgresValueConverter` says so) and
    /// leaves such a column out of its events.
    pub fn array_of_domain(name: &str) -> PgType {
        PgType {
            name: name.to_owned(),
            kind: PgKind::NotCarried(NOT_CARRIED_DOMAIN_ARRAY),
        }
    }

    /// Whether a value whose type a schema gave (`Change::typed`) cannot
    /// have come from a column of this type: Debezium carries each
    /// PostgreSQL type as one Connect type (int2/int4/int8 as integers,
    /// boolean as a boolean, dates and times as integers or ISO texts …),
    /// so a value of another kind means the source region's column is of
    /// another type: a schema difference, not bad data. Only kinds no
    /// setting of Debezium's (`decimal.handling.mode`,
    /// `time.precision.mode`, Avro's loss of semantic names) gives this
    /// type are named here; NULL fits every column.
    pub fn cannot_come_from(&self, value: &Typed) -> bool {
        use Field as F;
        let not_scalar = |f: &Field| matches!(f, F::Bytes(_) | F::Json(_) | F::Array(_));
        match (&self.kind, &value.field) {
            (_, F::Null | F::Unavailable) => false,
            // A bit string carries its source column's width: a `bit(m)`
            // column of another width, or a `bit varying(m)` narrower than
            // it, is another type; so is a column that holds no bits.
            (PgKind::Bit { length }, F::Bits { length: source, .. }) => length != source,
            (PgKind::VarBit { max }, F::Bits { length: source, .. }) => {
                max.is_some_and(|max| max < *source)
            }
            (PgKind::NotCarried(_), F::Bits { .. }) => false,
            (_, F::Bits { .. }) => true,
            (PgKind::Int, f) => {
                not_scalar(f)
                    || matches!(
                        f,
                        F::String(_) | F::Bool(_) | F::Float(_) | F::Decimal { .. }
                    )
            }
            (PgKind::Bool, f) => {
                not_scalar(f)
                    || matches!(
                        f,
                        F::String(_) | F::Int(_) | F::Float(_) | F::Decimal { .. }
                    )
            }
            (PgKind::Float, f) => {
                not_scalar(f) || matches!(f, F::String(_) | F::Bool(_) | F::Decimal { .. })
            }
            // `decimal.handling.mode` string and double give texts and
            // floats.
            (PgKind::Numeric { .. }, f) => not_scalar(f) || matches!(f, F::Bool(_)),
            (
                PgKind::Date
                | PgKind::Timestamp { .. }
                | PgKind::TimestampTz
                | PgKind::Time { .. }
                | PgKind::TimeTz { .. },
                F::String(s),
            ) => value.semantic.is_none() && !iso_temporal(s),
            (
                PgKind::Date
                | PgKind::Timestamp { .. }
                | PgKind::TimestampTz
                | PgKind::Time { .. }
                | PgKind::TimeTz { .. },
                f,
            ) => not_scalar(f) || matches!(f, F::Bool(_) | F::Float(_) | F::Decimal { .. }),
            (PgKind::Uuid, f) => {
                not_scalar(f)
                    || matches!(f, F::Bool(_) | F::Int(_) | F::Float(_) | F::Decimal { .. })
            }
            _ => false,
        }
    }

    /// Why Debezium's PostgreSQL connector leaves a column of this type
    /// out of its change events, if it does: such a column is absent from
    /// every event, and a row that has it cannot be written exactly.
    pub fn not_carried(&self) -> Option<&'static str> {
        match self.kind {
            PgKind::NotCarried(why) => Some(why),
            _ => None,
        }
    }
}

/// A date, time or timestamp as Debezium writes one as text (the ISO
/// forms of `ZonedTimestamp`, `ZonedTime`, Avro without its semantic name,
/// `infinity`): a signed year of four or more digits and a dash, or
/// `HH:MM`.
fn iso_temporal(s: &str) -> bool {
    if matches!(s, "infinity" | "-infinity") {
        return true;
    }
    let b = s.as_bytes();
    let digits = |from: usize| b[from..].iter().take_while(|c| c.is_ascii_digit()).count();
    let unsigned = usize::from(matches!(b.first(), Some(b'+' | b'-')));
    let year = digits(unsigned);
    let date = year >= 4 && b.get(unsigned + year) == Some(&b'-');
    let time = digits(0) == 2 && b.get(2) == Some(&b':');
    date || time
}

// Measured on the local stack (Debezium 3.6.1): the column is missing from
// the event's schema and payload, and Connect's log says "No converter
// found for column … The column will not be part of change events".
const NOT_CARRIED_GEOMETRY: &str = "Debezium does not carry this geometric type \
     (its PostgreSQL connector has no converter for it and leaves the column out of \
     every change event), so the row cannot be written exactly";
const NOT_CARRIED_MULTIRANGE: &str = "Debezium does not carry multiranges (its \
     PostgreSQL connector has no converter for them and leaves the column out of every \
     change event), so the row cannot be written exactly";
const NOT_CARRIED_TYPE: &str = "Debezium does not carry this type (its PostgreSQL \
     connector has no converter for it and leaves the column out of every change event), \
     so the row cannot be written exactly";
const NOT_CARRIED_BIT_ARRAY: &str = "Debezium does not carry arrays of bit strings (it \
     gives the column the scalar's Bits schema and sends NULL for every value), so no \
     value of the column, NULL included, can be told from a lost one";
const NOT_CARRIED_ARRAY: &str = "Debezium does not carry arrays of this type (its \
     PostgreSQL connector has no converter for them and leaves the column out of every \
     change event), so the row cannot be written exactly";
const NOT_CARRIED_DOMAIN_ARRAY: &str = "Debezium does not carry arrays of a domain type \
     (its PostgreSQL connector has no converter for them and leaves the column out of \
     every change event), so the row cannot be written exactly";

/// Arrays whose elements Debezium cannot convert (`PostgresValueConverter`
/// returns no schema for `money[]`, `interval[]`, `bit varying[]`,
/// `xml[]`, `point[]`, `name[]`; nor for the element types it does not
/// carry at all).
fn not_carried_array(element: &PgType) -> Option<&'static str> {
    match &element.kind {
        PgKind::Bit { .. } => Some(NOT_CARRIED_BIT_ARRAY),
        PgKind::Interval | PgKind::VarBit { .. } | PgKind::Point | PgKind::NotCarried(_) => {
            Some(NOT_CARRIED_ARRAY)
        }
        _ => match element.name.to_ascii_lowercase().as_str() {
            "money" | "xml" | "name" => Some(NOT_CARRIED_ARRAY),
            _ => None,
        },
    }
}

fn render_error(problem: impl Into<String>) -> RenderError {
    RenderError(problem.into())
}

impl Typed {
    /// Renders the value as PostgreSQL text input for a column of type
    /// `pg_type` (as `format_type` prints it); `None` for SQL NULL.
    /// Fails on [`Field::Unavailable`]: the caller substitutes the stored
    /// value first.
    pub fn to_pg_text(&self, pg_type: &str) -> Result<Option<String>, RenderError> {
        self.to_pg_text_as(&PgType::parse(pg_type))
    }

    /// [`Typed::to_pg_text`] for a type parsed beforehand (per column, not
    /// per value).
    pub fn to_pg_text_as(&self, ty: &PgType) -> Result<Option<String>, RenderError> {
        match &self.field {
            // A NULL of a type Debezium does not carry may be a lost value.
            _ if ty.not_carried().is_some() => render(&self.field, None, ty).map(Some),
            Field::Null => Ok(None),
            field => render(field, self.semantic.as_deref(), ty).map(Some),
        }
    }

    /// As [`Typed::to_pg_text_as`], taking the value: a text that is its
    /// own rendering (`is_own_rendering`) is moved, not copied.
    pub fn into_pg_text_as(self, ty: &PgType) -> Result<Option<String>, RenderError> {
        match (self.field, &ty.kind) {
            (Field::String(s), kind) if is_own_rendering(&s, kind) => Ok(Some(s)),
            (field, _) => Typed {
                field,
                semantic: self.semantic,
            }
            .to_pg_text_as(ty),
        }
    }
}

/// Whether `render_string` gives `s` back unchanged: it changes bytea's,
/// numeric's and bit strings' texts, and timestamptz texts with a signed or
/// zero year (`signed_year_timestamp`).
fn is_own_rendering(s: &str, kind: &PgKind) -> bool {
    match kind {
        PgKind::Bytea
        | PgKind::Numeric { .. }
        | PgKind::Bit { .. }
        | PgKind::VarBit { .. }
        | PgKind::Hstore
        | PgKind::NotCarried(_) => false,
        PgKind::TimestampTz => !s.starts_with(['-', '+', '0']),
        _ => true,
    }
}

fn render(field: &Field, semantic: Option<&str>, ty: &PgType) -> Result<String, RenderError> {
    match (&ty.kind, field) {
        (PgKind::NotCarried(why), _) => return Err(render_error(*why)),
        (PgKind::Array(element), _) => return render_array(field, semantic, element),
        (_, Field::Null | Field::Unavailable) => {}
        (PgKind::Bit { .. } | PgKind::VarBit { .. }, _) => {
            return render_bits(field, semantic, &ty.kind)
        }
        (PgKind::Point, Field::Json(point)) => return render_point(point),
        (PgKind::Hstore, Field::String(s)) => return render_hstore(s),
        (PgKind::Hstore, Field::Json(map)) => return hstore_text(map),
        _ => {}
    }
    match field {
        Field::Null => Err(render_error("NULL has no text form")),
        Field::Unavailable => Err(render_error(format!(
            "the unchanged TOAST placeholder ({UNAVAILABLE_PLACEHOLDER}) cannot be written; \
             the stored value must be substituted first"
        ))),
        Field::Bool(b) => Ok(b.to_string()),
        Field::Int(i) => render_int(*i, semantic, ty),
        Field::Float(f) => Ok(render_float(*f)),
        Field::String(s) => render_string(s, ty),
        Field::Bytes(bytes) => render_bytes(bytes, ty),
        Field::Decimal { unscaled, scale } => match ty.kind {
            PgKind::Bytea => Ok(hex_bytea(unscaled)),
            // Integer input rejects `12.00`; a fraction that is not zero is
            // an error rather than a silent truncation.
            PgKind::Int => {
                let text = decimal_text(unscaled, *scale)?;
                match text.split_once('.') {
                    None => Ok(text),
                    Some((int, frac)) if frac.bytes().all(|b| b == b'0') => Ok(int.to_owned()),
                    Some(_) => Err(render_error(format!("{text} is not an integer"))),
                }
            }
            _ => decimal_text(unscaled, *scale),
        },
        Field::Bits { .. } => Err(render_error(
            "a bit string (io.debezium.data.Bits) cannot be written to a column \
             that is not a bit string",
        )),
        Field::Json(value) => Ok(value.to_string()),
        Field::Array(_) => Err(render_error(
            "an array value cannot be written to a column that is not an array",
        )),
    }
}

/// `semantic`: the elements' semantic name (the decoders give an array its
/// elements'), which says a time element's unit.
fn render_array(
    field: &Field,
    semantic: Option<&str>,
    element: &PgType,
) -> Result<String, RenderError> {
    match field {
        Field::Array(items) => array_literal(items, semantic, element),
        // Already PostgreSQL's array text.
        Field::String(s) => Ok(s.clone()),
        Field::Json(Json::Array(items)) => {
            let items = items
                .iter()
                .map(|item| json_plain(item, "", true))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| match e {
                    crate::decode::DecodeError::Column { problem, .. } => RenderError(problem),
                    other => RenderError(other.to_string()),
                })?;
            array_literal(&items, None, element)
        }
        Field::Null | Field::Unavailable => render(field, None, element),
        _ => Err(render_error(
            "a scalar value cannot be written to an array column",
        )),
    }
}

/// `{"a","b,c",NULL}`: every element quoted, so no element text needs
/// PostgreSQL's rules for when quoting is required.
fn array_literal(
    items: &[Field],
    semantic: Option<&str>,
    element: &PgType,
) -> Result<String, RenderError> {
    let mut out = String::from("{");
    for (i, item) in items.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        match item {
            Field::Null => out.push_str("NULL"),
            Field::Array(inner) => out.push_str(&array_literal(inner, semantic, element)?),
            item => {
                let text = render(item, semantic, element)?;
                out.push('"');
                for c in text.chars() {
                    if c == '"' || c == '\\' {
                        out.push('\\');
                    }
                    out.push(c);
                }
                out.push('"');
            }
        }
    }
    out.push('}');
    Ok(out)
}

fn render_int(i: i64, semantic: Option<&str>, ty: &PgType) -> Result<String, RenderError> {
    if let Some(word) = infinity(i, semantic, &ty.kind) {
        return Ok(word.to_owned());
    }
    let i = i128::from(i);
    match ty.kind {
        PgKind::Date => {
            let days = match semantic {
                Some(TIMESTAMP | MICRO_TIMESTAMP | NANO_TIMESTAMP | CONNECT_TIMESTAMP) => {
                    // A date holds no time of day: a timestamp with one
                    // would lose it.
                    let micros = instant_micros(i, semantic, None);
                    if micros.rem_euclid(MICROS_PER_DAY) != 0 {
                        return Err(render_error(
                            "a timestamp with a time of day cannot be written to a date                              column exactly (the time would be lost)",
                        ));
                    }
                    micros.div_euclid(MICROS_PER_DAY)
                }
                _ => i,
            };
            let (date, bc) = civil_date(days)?;
            Ok(if bc { format!("{date} BC") } else { date })
        }
        PgKind::Timestamp { precision } => {
            timestamp_text(instant_micros(i, semantic, precision), "")
        }
        // A bare number for timestamptz is an instant in UTC microseconds.
        PgKind::TimestampTz => timestamp_text(instant_micros(i, semantic, None), "+00"),
        PgKind::Time { precision } => time_text(time_micros(i, semantic, precision)?),
        PgKind::TimeTz { precision } => {
            Ok(time_text(time_micros(i, semantic, precision)?)? + "+00")
        }
        // Debezium's MicroDuration (interval.handling.mode=numeric).
        PgKind::Interval => Ok(format!("{i} microseconds")),
        PgKind::Bytea => Err(render_error(
            "an integer cannot be written to a bytea column",
        )),
        _ => Ok(i.to_string()),
    }
}

/// `infinity` or `-infinity` where `i` is Debezium's [`sentinel`] for it in
/// the unit the semantic type (or, lacking one, the column) says.
fn infinity(i: i64, semantic: Option<&str>, kind: &PgKind) -> Option<&'static str> {
    use sentinel::*;
    let (plus, minus) = match (kind, semantic) {
        (PgKind::Timestamp { .. } | PgKind::TimestampTz | PgKind::Date, Some(NANO_TIMESTAMP)) => {
            (TIMESTAMP_INFINITY_NANOS, TIMESTAMP_MINUS_INFINITY_NANOS)
        }
        (
            PgKind::Timestamp { .. } | PgKind::TimestampTz | PgKind::Date,
            Some(TIMESTAMP | CONNECT_TIMESTAMP),
        ) => (TIMESTAMP_INFINITY_MILLIS, TIMESTAMP_MINUS_INFINITY_MILLIS),
        (PgKind::Timestamp { .. } | PgKind::TimestampTz | PgKind::Date, Some(MICRO_TIMESTAMP)) => {
            (TIMESTAMP_INFINITY_MICROS, TIMESTAMP_MINUS_INFINITY_MICROS)
        }
        (PgKind::Date, _) => (DATE_INFINITY_DAYS, DATE_MINUS_INFINITY_DAYS),
        // Avro drops the semantic name of a primitive: the column's
        // precision says the unit, as for any other value (`instant_micros`).
        (PgKind::Timestamp { precision }, _) if precision.is_some_and(|p| p <= 3) => {
            (TIMESTAMP_INFINITY_MILLIS, TIMESTAMP_MINUS_INFINITY_MILLIS)
        }
        (PgKind::Timestamp { .. } | PgKind::TimestampTz, _) => {
            (TIMESTAMP_INFINITY_MICROS, TIMESTAMP_MINUS_INFINITY_MICROS)
        }
        _ => return None,
    };
    let (plus_element, minus_element) = match kind {
        PgKind::Date => (DATE_ARRAY_INFINITY_DAYS, DATE_ARRAY_MINUS_INFINITY_DAYS),
        _ => (plus, minus),
    };
    if i == plus || i == plus_element {
        Some("infinity")
    } else if i == minus || i == minus_element {
        Some("-infinity")
    } else {
        None
    }
}

/// Microseconds since the epoch from an integer in the unit its semantic
/// type (or, lacking one, Debezium's adaptive precision mode) says.
fn instant_micros(i: i128, semantic: Option<&str>, precision: Option<u32>) -> i128 {
    match semantic {
        Some(TIMESTAMP | CONNECT_TIMESTAMP) => i * 1000,
        Some(MICRO_TIMESTAMP) => i,
        Some(NANO_TIMESTAMP) => i.div_euclid(1000),
        Some(DATE | CONNECT_DATE) => i * MICROS_PER_DAY,
        _ if precision.is_some_and(|p| p <= 3) => i * 1000,
        _ => i,
    }
}

fn time_micros(
    i: i128,
    semantic: Option<&str>,
    precision: Option<u32>,
) -> Result<i128, RenderError> {
    let micros = match semantic {
        Some(TIME | CONNECT_TIME) => i * 1000,
        Some(MICRO_TIME) => i,
        Some(NANO_TIME) => i.div_euclid(1000),
        _ if precision.is_some_and(|p| p <= 3) => i * 1000,
        _ => i,
    };
    // 24:00:00 is valid PostgreSQL time input.
    if !(0..=MICROS_PER_DAY).contains(&micros) {
        return Err(render_error(format!(
            "time of day {i} ({micros} µs) is outside 00:00:00..24:00:00"
        )));
    }
    Ok(micros)
}

fn time_text(micros: i128) -> Result<String, RenderError> {
    let mut out = String::with_capacity(15);
    push_time(&mut out, micros);
    Ok(out)
}

/// `HH:MM:SS.ffffff` of a time of day in 0..=24h (in i64: formatting an
/// i128 is several times slower, and this runs for every time value).
fn push_time(out: &mut String, micros: i128) {
    let micros = micros.clamp(0, MICROS_PER_DAY) as i64;
    let (secs, frac) = (micros / 1_000_000, micros % 1_000_000);
    let _ = write!(
        out,
        "{:02}:{:02}:{:02}.{frac:06}",
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    );
}

fn timestamp_text(micros: i128, zone: &str) -> Result<String, RenderError> {
    let mut out = String::with_capacity(32);
    let bc = push_civil_date(&mut out, micros.div_euclid(MICROS_PER_DAY))?;
    out.push(' ');
    push_time(&mut out, micros.rem_euclid(MICROS_PER_DAY));
    out.push_str(zone);
    if bc {
        out.push_str(" BC");
    }
    Ok(out)
}

/// Days since 1970-01-01 → (`YYYY-MM-DD`, before Christ) in the proleptic
/// Gregorian calendar PostgreSQL uses (year 0 is 1 BC).
fn civil_date(days: i128) -> Result<(String, bool), RenderError> {
    let mut out = String::with_capacity(10);
    let bc = push_civil_date(&mut out, days)?;
    Ok((out, bc))
}

/// Appends [`civil_date`]'s text; returns whether the date is BC.
fn push_civil_date(out: &mut String, days: i128) -> Result<bool, RenderError> {
    if !(-MAX_ABS_DAYS..=MAX_ABS_DAYS).contains(&days) {
        return Err(render_error(format!(
            "date {days} days from 1970-01-01 is out of range"
        )));
    }
    // In range, so i64 cannot overflow. Howard Hinnant's civil_from_days.
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let bc = year <= 0;
    let year = if bc { 1 - year } else { year };
    let _ = write!(out, "{year:04}-{month:02}-{day:02}");
    Ok(bc)
}

fn render_float(f: f64) -> String {
    if f.is_nan() {
        "NaN".to_owned()
    } else if f.is_infinite() {
        if f > 0.0 { "Infinity" } else { "-Infinity" }.to_owned()
    } else {
        // Display is the shortest text that round-trips.
        f.to_string()
    }
}

fn render_string(s: &str, ty: &PgType) -> Result<String, RenderError> {
    match ty.kind {
        PgKind::TimestampTz => Ok(signed_year_timestamp(s).unwrap_or_else(|| s.to_owned())),
        // Schemaless JSON carries bytes as base64.
        PgKind::Bytea if s.starts_with("\\x") => Ok(s.to_owned()),
        PgKind::Bytea => BASE64
            .decode(s)
            .map(|bytes| hex_bytea(&bytes))
            .map_err(|e| render_error(format!("text for a bytea column is not base64: {e}"))),
        PgKind::Numeric { .. } if is_numeric_literal(s) => Ok(s.to_owned()),
        // Schemaless JSON carries a Decimal as base64 of its unscaled value.
        PgKind::Numeric { scale } => {
            let bytes = BASE64.decode(s).map_err(|_| {
                render_error(format!("{s:?} is neither a number nor a base64 decimal"))
            })?;
            let scale = scale.ok_or_else(|| {
                render_error(format!(
                    "base64 decimal {s:?} whose scale the column does not declare: the scale is unknown"
                ))
            })?;
            decimal_text(&bytes, scale)
        }
        _ => Ok(s.to_owned()),
    }
}

/// Debezium's `ZonedTimestamp` is Java's ISO text, with astronomical years
/// signed outside 0000..=9999: `-0043-03-15T12:00:00Z` is 44 BC, `0000-…`
/// is 1 BC, `+10000-01-01T00:00:00Z` the year 10000. PostgreSQL reads
/// neither sign (the `-` as a time zone) nor year 0, so these are written
/// with its `BC` suffix or without the `+`. `None` for any other text
/// (`-infinity` included).
fn signed_year_timestamp(s: &str) -> Option<String> {
    if s.starts_with(sentinel::TIMESTAMPTZ_ARRAY_MINUS_INFINITY_PREFIX) {
        return Some("-infinity".to_owned());
    }
    let (sign, rest) = match s.as_bytes().first()? {
        b'-' => (-1, &s[1..]),
        b'+' => (1, &s[1..]),
        _ => (0, s),
    };
    let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
    let tail = &rest[digits..];
    if digits < 4 || !tail.starts_with('-') {
        return None;
    }
    let year: i64 = rest[..digits].parse().ok()?;
    match (sign, year) {
        (1, _) => Some(rest.to_owned()),
        // Astronomical -Y (and 0) is Y+1 BC.
        (-1, _) | (0, 0) => Some(format!("{:04}{tail} BC", year + 1)),
        _ => None,
    }
}

fn render_bytes(bytes: &[u8], ty: &PgType) -> Result<String, RenderError> {
    match ty.kind {
        PgKind::Bytea => Ok(hex_bytea(bytes)),
        PgKind::Numeric { scale: Some(scale) } => decimal_text(bytes, scale),
        PgKind::Numeric { scale: None } => Err(render_error(
            "bytes of a decimal whose scale the column does not declare: the scale is unknown",
        )),
        PgKind::Uuid if bytes.len() == 16 => {
            let hex = hex(bytes);
            let part =
                |range: std::ops::Range<usize>| hex.get(range).unwrap_or_default().to_owned();
            Ok([
                part(0..8),
                part(8..12),
                part(12..16),
                part(16..20),
                part(20..32),
            ]
            .join("-"))
        }
        _ => String::from_utf8(bytes.to_vec())
            .map_err(|_| render_error("bytes that are not UTF-8 have no text form for this type")),
    }
}

/// A `bit(n)` or `bit varying(n)` value from Debezium's
/// `io.debezium.data.Bits` ([`Field::Bits`]): the bits little-endian (the
/// string's last bit is bit 0 of the first byte), in as many bytes as the
/// highest `1` bit needs: leading zeros are not carried
/// (PostgresValueConverter.convertBits in debezium-connector-postgres
/// 3.6.1), and the source column's `length` parameter. A boolean for a
/// one-bit column.
///
/// The source's `length` is `bit(n)`'s n, or `bit varying(n)`'s maximum n
/// (Debezium's PostgreSQL data type mapping). The same schema for both, so
/// a value is read as `length` bits:
/// - a `bit(m)` column takes it when m is `length` (a `bit(n)` value of
///   another width would be padded or cut: refused);
/// - a `bit varying(m)` column takes it only when the highest `1` is the
///   `length`th bit, which then is the value's length, and m ≥ `length`;
///   any other value could have had leading zeros (`101` and `0101`
///   arrive alike from a `bit varying(8)`) and is refused.
///
/// Schemaless JSON carries the bytes alone, as base64, without the
/// source's length: the column's width stands in for it (docs/TYPES.md).
/// A typed `Bits` value without its `length` is refused.
fn render_bits(
    field: &Field,
    semantic: Option<&str>,
    kind: &PgKind,
) -> Result<String, RenderError> {
    let (bytes, source_length) = match field {
        Field::Bool(b) => {
            return match kind {
                PgKind::Bit { length: 1 } | PgKind::VarBit { max: Some(1) } => {
                    Ok(if *b { "1" } else { "0" }.to_owned())
                }
                _ => Err(render_error(
                    "a boolean is a one-bit value; the column holds more bits",
                )),
            };
        }
        Field::Bits { bytes, length } => (Cow::Borrowed(bytes.as_slice()), Some(*length)),
        Field::Bytes(_) if semantic == Some(BITS) => {
            return Err(render_error(
                "a bit string (io.debezium.data.Bits) without its `length` parameter: \
                 the source column's width is unknown, so it cannot be written exactly",
            ))
        }
        Field::Bytes(bytes) => (Cow::Borrowed(bytes.as_slice()), None),
        Field::String(s) => (
            Cow::Owned(BASE64.decode(s).map_err(|e| {
                render_error(format!(
                    "text for a bit string is not base64 of its bits: {e}"
                ))
            })?),
            None,
        ),
        other => {
            return Err(render_error(format!(
                "{} is not a bit string (Debezium sends io.debezium.data.Bits bytes)",
                field_kind(other)
            )))
        }
    };
    // Bits up to and including the highest 1.
    let significant = bytes
        .iter()
        .enumerate()
        .rev()
        .find(|(_, b)| **b != 0)
        .map_or(0, |(i, b)| i as u64 * 8 + u64::from(8 - b.leading_zeros()));
    if let Some(source) = source_length {
        if significant > u64::from(source) {
            return Err(render_error(format!(
                "{significant} significant bits do not fit the source's length {source}"
            )));
        }
    }
    let length = match (kind, source_length) {
        (&PgKind::Bit { length }, Some(source)) if source != length => {
            return Err(render_error(format!(
                "the source column's bit strings have {source} bits (Debezium's Bits \
                 length {source}); a bit({length}) column cannot hold them exactly \
                 (they would be padded or cut)"
            )))
        }
        (&PgKind::Bit { length }, _) if significant <= u64::from(length) => length,
        (&PgKind::Bit { length }, _) => {
            return Err(render_error(format!(
                "{significant} significant bits do not fit bit({length})"
            )))
        }
        // The value's length is known only when its first bit is a 1 at
        // the source's maximum.
        (&PgKind::VarBit { max }, Some(source)) if significant == u64::from(source) => match max {
            Some(max) if max < source => {
                return Err(render_error(format!(
                    "a bit string of {source} bits does not fit bit varying({max})"
                )))
            }
            _ => source,
        },
        (&PgKind::VarBit { max: Some(max) }, None) if significant == u64::from(max) => max,
        (&PgKind::VarBit { max }, source) => {
            let max = source.or(max);
            return Err(render_error(format!(
                "Debezium carries a varying bit string without its leading zeros: \
                 {significant} significant bits{}, so its length is unknown and \
                 it cannot be written exactly",
                max.map(|m| format!(" of at most {m}")).unwrap_or_default()
            )));
        }
        _ => return Err(render_error("not a bit string type")),
    };
    Ok((0..u64::from(length))
        .rev()
        .map(|k| {
            let byte = bytes.get((k / 8) as usize).copied().unwrap_or(0);
            if byte >> (k % 8) & 1 == 1 {
                '1'
            } else {
                '0'
            }
        })
        .collect())
}

/// Debezium's `io.debezium.data.geometry.Point` struct `{x, y, wkb, srid}`
/// as PostgreSQL's `(x,y)`: the coordinates as doubles, each in the
/// shortest text that reads back as the same double (JsonConverter writes
/// NaN and the infinities as strings).
fn render_point(point: &Json) -> Result<String, RenderError> {
    let coordinate = |name: &str| {
        point
            .get(name)
            .and_then(crate::decode::json_float)
            .ok_or_else(|| render_error(format!("a point without a number `{name}`")))
    };
    Ok(format!(
        "({},{})",
        render_float(coordinate("x")?),
        render_float(coordinate("y")?)
    ))
}

/// `hstore` from Debezium's JSON text of it (`hstore.handling.mode=json`,
/// `{"k":"v","n":null}`): every key and value quoted, `"` and `\`
/// escaped, a JSON null as `NULL`. Anything else is refused: an hstore
/// holds only text keys and text-or-NULL values.
fn render_hstore(s: &str) -> Result<String, RenderError> {
    let map: Json = serde_json::from_str(s)
        .map_err(|e| render_error(format!("hstore text is not Debezium's JSON object: {e}")))?;
    hstore_text(&map)
}

fn hstore_text(map: &Json) -> Result<String, RenderError> {
    let Json::Object(map) = map else {
        return Err(render_error("an hstore value that is not a JSON object"));
    };
    let quoted = |t: &str| {
        let mut out = String::with_capacity(t.len() + 2);
        out.push('"');
        for c in t.chars() {
            if c == '"' || c == '\\' {
                out.push('\\');
            }
            out.push(c);
        }
        out.push('"');
        out
    };
    let mut pairs = Vec::with_capacity(map.len());
    for (key, value) in map {
        let value = match value {
            Json::Null => "NULL".to_owned(),
            Json::String(v) => quoted(v),
            other => {
                return Err(render_error(format!(
                    "hstore value of key {key:?} is {other}, not text or null"
                )))
            }
        };
        pairs.push(format!("{}=>{value}", quoted(key)));
    }
    Ok(pairs.join(", "))
}

fn field_kind(field: &Field) -> &'static str {
    match field {
        Field::Null => "NULL",
        Field::Bool(_) => "a boolean",
        Field::Int(_) => "an integer",
        Field::Float(_) => "a float",
        Field::String(_) => "a text",
        Field::Bytes(_) => "bytes",
        Field::Bits { .. } => "a bit string",
        Field::Decimal { .. } => "a decimal",
        Field::Array(_) => "an array",
        Field::Json(_) => "a JSON value",
        Field::Unavailable => "the unchanged TOAST placeholder",
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn hex_bytea(bytes: &[u8]) -> String {
    format!("\\x{}", hex(bytes))
}

/// A number PostgreSQL's numeric input accepts: `-12.5`, `1e-3`, `NaN`, …
fn is_numeric_literal(s: &str) -> bool {
    let body = s.trim();
    let body = body.strip_prefix(['+', '-']).unwrap_or(body);
    if ["nan", "infinity", "inf"]
        .iter()
        .any(|w| body.eq_ignore_ascii_case(w))
    {
        return true;
    }
    let (mantissa, exponent) = match body.split_once(['e', 'E']) {
        Some((m, e)) => (m, Some(e)),
        None => (body, None),
    };
    let (int, frac) = mantissa.split_once('.').unwrap_or((mantissa, ""));
    let digits = |t: &str| t.bytes().all(|b| b.is_ascii_digit());
    let mantissa_ok = digits(int) && digits(frac) && !(int.is_empty() && frac.is_empty());
    let exponent_ok = exponent.is_none_or(|e| {
        let e = e.strip_prefix(['+', '-']).unwrap_or(e);
        !e.is_empty() && digits(e)
    });
    mantissa_ok && exponent_ok
}

/// Exact decimal text of a big-endian two's-complement unscaled value.
fn decimal_text(unscaled: &[u8], scale: u32) -> Result<String, RenderError> {
    if unscaled.len() > MAX_DECIMAL_BYTES {
        return Err(render_error(format!(
            "decimal of {} bytes exceeds PostgreSQL's numeric range",
            unscaled.len()
        )));
    }
    if scale > MAX_DECIMAL_SCALE {
        return Err(render_error(format!(
            "decimal scale {scale} exceeds PostgreSQL's maximum {MAX_DECIMAL_SCALE}"
        )));
    }
    let negative = unscaled.first().is_some_and(|b| b & 0x80 != 0);
    let mut magnitude = unscaled.to_vec();
    if negative {
        // Two's-complement negation: invert, then add one.
        let mut carry = true;
        for b in magnitude.iter_mut().rev() {
            *b = !*b;
            if carry {
                let (sum, overflow) = b.overflowing_add(1);
                *b = sum;
                carry = overflow;
            }
        }
    }
    // Base 2^32 limbs, most significant first.
    let padding = (4 - magnitude.len() % 4) % 4;
    let padded: Vec<u8> = std::iter::repeat_n(0, padding).chain(magnitude).collect();
    let mut limbs: Vec<u32> = padded
        .chunks_exact(4)
        .map(|c| c.iter().fold(0u32, |acc, &b| (acc << 8) | u32::from(b)))
        .collect();
    // Base 10^9 chunks, least significant first, by repeated long division.
    let mut chunks: Vec<u32> = Vec::new();
    loop {
        let lead = limbs.iter().take_while(|&&l| l == 0).count();
        limbs.drain(..lead);
        if limbs.is_empty() {
            break;
        }
        let mut rem: u64 = 0;
        for limb in limbs.iter_mut() {
            let cur = (rem << 32) | u64::from(*limb);
            // rem < 10^9, so the quotient fits in 32 bits.
            *limb = (cur / 1_000_000_000) as u32;
            rem = cur % 1_000_000_000;
        }
        chunks.push(rem as u32);
    }
    let mut digits = match chunks.split_last() {
        None => "0".to_owned(),
        Some((most, rest)) => {
            let mut d = most.to_string();
            for chunk in rest.iter().rev() {
                d.push_str(&format!("{chunk:09}"));
            }
            d
        }
    };
    let scale = scale as usize;
    if scale > 0 {
        if digits.len() <= scale {
            digits = "0".repeat(scale + 1 - digits.len()) + &digits;
        }
        digits.insert(digits.len() - scale, '.');
    }
    Ok(if negative {
        format!("-{digits}")
    } else {
        digits
    })
}

#[cfg(test)]
mod tests {
    use std::borrow::Cow;

    use serde_json::json;

    use super::sentinel::*;
    use super::*;

    fn text(field: Field, semantic: Option<&str>, pg_type: &str) -> Result<String, RenderError> {
        Typed {
            field,
            semantic: semantic.map(|s| Cow::Owned(s.to_owned())),
        }
        .to_pg_text(pg_type)
        .map(|t| t.expect("not NULL"))
    }

    #[test]
    fn a_kind_no_column_of_the_type_gives_is_a_schema_difference() {
        let typed = |field: Field, semantic: Option<&str>| Typed {
            field,
            semantic: semantic.map(|s| Cow::Owned(s.to_owned())),
        };
        let differs = |pg_type: &str, value: &Typed| PgType::parse(pg_type).cannot_come_from(value);
        let text = |s: &str| typed(Field::String(s.into()), None);
        // A text column's value where this region has an integer, boolean,
        // double or date.
        for pg_type in [
            "integer",
            "bigint",
            "smallint",
            "boolean",
            "double precision",
            "real",
        ] {
            assert!(differs(pg_type, &text("42")), "{pg_type}");
        }
        assert!(differs("date", &text("abc")));
        assert!(differs(
            "timestamp without time zone",
            &text("next tuesday")
        ));
        assert!(differs("time(2) without time zone", &text("noon")));
        // An integer or a number where this region has a boolean or a uuid,
        // a boolean where it has a number, a numeric where it has an integer.
        assert!(differs("boolean", &typed(Field::Int(1), None)));
        assert!(differs("uuid", &typed(Field::Int(1), None)));
        assert!(differs("numeric(12,2)", &typed(Field::Bool(true), None)));
        let decimal = typed(
            Field::Decimal {
                unscaled: vec![1],
                scale: 0,
            },
            Some(DECIMAL),
        );
        assert!(differs("integer", &decimal));
        assert!(differs("double precision", &decimal));
        // What Debezium gives each type, in every mode it has: never a
        // schema difference.
        for (pg_type, value) in [
            ("integer", typed(Field::Int(5), None)),
            ("boolean", typed(Field::Bool(true), None)),
            ("double precision", typed(Field::Float(1.5), None)),
            ("real", typed(Field::Float(f64::NAN), None)),
            ("numeric(12,2)", decimal.clone()),
            ("numeric", text("12.50")),
            ("numeric", typed(Field::Float(12.5), None)),
            ("date", typed(Field::Int(19000), Some(DATE))),
            ("date", typed(Field::Int(19000), None)),
            ("date", text("2024-02-29")),
            ("date", text("+10000-01-01")),
            ("timestamp with time zone", text("2024-02-29T11:14:15.654Z")),
            ("timestamp with time zone", text("-0043-03-15T12:00:00Z")),
            ("timestamp with time zone", text("infinity")),
            ("time with time zone", text("10:00:00Z")),
            (
                "timestamp without time zone",
                typed(Field::Int(1), Some(MICRO_TIMESTAMP)),
            ),
            ("uuid", text("a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11")),
            ("text", typed(Field::Int(5), None)),
            ("text", typed(Field::Bool(false), None)),
            ("money", decimal.clone()),
            ("integer", typed(Field::Null, None)),
            ("date", typed(Field::Unavailable, None)),
            ("integer[]", text("{1,2}")),
        ] {
            assert!(!differs(pg_type, &value), "{pg_type} from {value:?}");
        }
    }

    #[test]
    fn timestamp_sentinels_are_infinity_in_every_unit() {
        let cases = [
            (
                TIMESTAMP_INFINITY_MICROS,
                Some(MICRO_TIMESTAMP),
                "timestamp without time zone",
                "infinity",
            ),
            (
                TIMESTAMP_MINUS_INFINITY_MICROS,
                Some(MICRO_TIMESTAMP),
                "timestamp(6) without time zone",
                "-infinity",
            ),
            (
                TIMESTAMP_INFINITY_MILLIS,
                Some(TIMESTAMP),
                "timestamp(3) without time zone",
                "infinity",
            ),
            (
                TIMESTAMP_MINUS_INFINITY_MILLIS,
                Some(TIMESTAMP),
                "timestamp(0) without time zone",
                "-infinity",
            ),
            (
                TIMESTAMP_INFINITY_MILLIS,
                Some(CONNECT_TIMESTAMP),
                "timestamp without time zone",
                "infinity",
            ),
            (
                TIMESTAMP_INFINITY_NANOS,
                Some(NANO_TIMESTAMP),
                "timestamp without time zone",
                "infinity",
            ),
            (
                TIMESTAMP_MINUS_INFINITY_NANOS,
                Some(NANO_TIMESTAMP),
                "timestamp without time zone",
                "-infinity",
            ),
            // Avro: no semantic name; the column's precision says the unit.
            (
                TIMESTAMP_INFINITY_MICROS,
                None,
                "timestamp without time zone",
                "infinity",
            ),
            (
                TIMESTAMP_MINUS_INFINITY_MICROS,
                None,
                "timestamp(4) without time zone",
                "-infinity",
            ),
            (
                TIMESTAMP_INFINITY_MILLIS,
                None,
                "timestamp(3) without time zone",
                "infinity",
            ),
            (
                TIMESTAMP_MINUS_INFINITY_MILLIS,
                None,
                "timestamp(1) without time zone",
                "-infinity",
            ),
            (
                TIMESTAMP_INFINITY_MICROS,
                None,
                "timestamp with time zone",
                "infinity",
            ),
        ];
        for (value, semantic, pg_type, expected) in cases {
            assert_eq!(
                text(Field::Int(value), semantic, pg_type).as_deref(),
                Ok(expected),
                "{value} {semantic:?} as {pg_type}"
            );
        }
        // The documented collision: the positive instant is a real one.
        assert_eq!(
            timestamp_text(i128::from(TIMESTAMP_INFINITY_MICROS), "").unwrap(),
            "294247-01-10 04:00:25.200000"
        );
        // A sentinel in another unit is an ordinary instant.
        assert_eq!(
            text(
                Field::Int(TIMESTAMP_INFINITY_MILLIS),
                Some(MICRO_TIMESTAMP),
                "timestamp without time zone"
            )
            .unwrap(),
            "2262-04-11 23:47:16.825200"
        );
        // The negative instant, were it not a sentinel, is out of range.
        assert!(
            timestamp_text(i128::from(TIMESTAMP_MINUS_INFINITY_MICROS), "")
                .unwrap()
                .ends_with(" BC")
        );
    }

    #[test]
    fn zoned_timestamps_with_signed_years_become_bc_or_lose_the_plus() {
        let tz = "timestamp with time zone";
        for (zoned, expected) in [
            (
                "-0043-03-15T12:00:00.123456Z",
                "0044-03-15T12:00:00.123456Z BC",
            ),
            ("0000-06-01T00:00:00Z", "0001-06-01T00:00:00Z BC"),
            ("0001-01-01T00:00:00Z", "0001-01-01T00:00:00Z"),
            ("-4712-01-01T00:00:00Z", "4713-01-01T00:00:00Z BC"),
            ("+10000-01-01T00:00:00Z", "10000-01-01T00:00:00Z"),
            ("-infinity", "-infinity"),
            ("2024-02-29T11:14:15.654321Z", "2024-02-29T11:14:15.654321Z"),
            // A timestamptz[] element's -infinity, as measured.
            ("+292269055-12-02T23:00:00.000000Z", "-infinity"),
        ] {
            assert_eq!(
                text(Field::String(zoned.into()), None, tz).as_deref(),
                Ok(expected)
            );
            let moved = Typed {
                field: Field::String(zoned.into()),
                semantic: None,
            }
            .into_pg_text_as(&PgType::parse(tz));
            assert_eq!(moved, Ok(Some(expected.to_owned())), "taken: {zoned}");
        }
    }

    #[test]
    fn date_sentinels_are_infinity() {
        for semantic in [Some(DATE), Some(CONNECT_DATE), None] {
            assert_eq!(
                text(Field::Int(DATE_INFINITY_DAYS), semantic, "date").as_deref(),
                Ok("infinity")
            );
            assert_eq!(
                text(Field::Int(DATE_MINUS_INFINITY_DAYS), semantic, "date").as_deref(),
                Ok("-infinity")
            );
        }
        // One day either side is an ordinary (out of range) date.
        assert!(text(Field::Int(DATE_INFINITY_DAYS - 1), Some(DATE), "date").is_err());
        assert_eq!(
            text(Field::Int(-2_440_550), Some(DATE), "date").as_deref(),
            Ok("4713-01-01 BC")
        );
        // A timestamp's sentinel into a date column.
        assert_eq!(
            text(
                Field::Int(TIMESTAMP_INFINITY_MICROS),
                Some(MICRO_TIMESTAMP),
                "date"
            )
            .as_deref(),
            Ok("infinity")
        );
        // timestamptz carries the words as text.
        assert_eq!(
            text(
                Field::String("-infinity".into()),
                None,
                "timestamp with time zone"
            )
            .as_deref(),
            Ok("-infinity")
        );
    }

    /// A `Bits` value of a source column of `length` bits.
    fn bits_of(bytes: &[u8], length: u32, pg_type: &str) -> Result<String, RenderError> {
        let field = Field::Bits {
            bytes: bytes.to_vec(),
            length,
        };
        text(field, Some(BITS), pg_type)
    }

    #[test]
    fn a_timestamp_reaches_a_date_column_only_without_a_time_of_day() {
        // 2024-02-29 00:00:00 and 13:14:15, in microseconds.
        let midnight = 1_709_164_800_000_000;
        assert_eq!(
            text(Field::Int(midnight), Some(MICRO_TIMESTAMP), "date").as_deref(),
            Ok("2024-02-29")
        );
        let err = text(
            Field::Int(midnight + 47_655_000_000),
            Some(MICRO_TIMESTAMP),
            "date",
        )
        .unwrap_err();
        assert!(err.0.contains("time of day"), "{err:?}");
        // The same element of an array.
        let array = Field::Array(vec![Field::Int(midnight + 1)]);
        assert!(text(array, Some(MICRO_TIMESTAMP), "date[]").is_err());
    }

    #[test]
    fn bit_strings_are_rebuilt_little_endian() {
        // As measured on the stack: B'00000101' arrives as 0x05, B'10000000'
        // as 0x80, B'00000000' as no bytes at all, each with length 8.
        let bits = |bytes: &[u8], pg_type: &str| bits_of(bytes, 8, pg_type);
        assert_eq!(bits(&[0x05], "bit(8)").as_deref(), Ok("00000101"));
        assert_eq!(bits(&[0x80], "bit(8)").as_deref(), Ok("10000000"));
        assert_eq!(bits(&[], "bit(8)").as_deref(), Ok("00000000"));
        assert_eq!(
            bits_of(&[0x01, 0x02], 12, "bit(12)").as_deref(),
            Ok("001000000001")
        );
        assert_eq!(bits_of(&[0x05], 3, "bit(3)").as_deref(), Ok("101"));
        assert!(
            bits_of(&[0x05], 2, "bit(2)").is_err(),
            "a 1 beyond the length"
        );
        // bit(1) and bit varying(1) come as booleans.
        assert_eq!(text(Field::Bool(true), None, "bit(1)").as_deref(), Ok("1"));
        assert_eq!(text(Field::Bool(false), None, "bit").as_deref(), Ok("0"));
        assert_eq!(
            text(Field::Bool(true), None, "bit varying(1)").as_deref(),
            Ok("1")
        );
        assert!(text(Field::Bool(true), None, "bit(8)").is_err());
        // Schemaless JSON: base64, no length; the column's width stands in.
        assert_eq!(
            text(Field::String("gA==".into()), None, "bit(8)").as_deref(),
            Ok("10000000")
        );
        // bit varying: exact only when the highest 1 is at the source's
        // maximum length, which is then the value's length.
        assert_eq!(bits(&[0x81], "bit varying(8)").as_deref(), Ok("10000001"));
        assert_eq!(bits_of(&[0x05], 3, "bit varying(3)").as_deref(), Ok("101"));
        for (bytes, length, pg_type) in [
            (&[0x05][..], 8, "bit varying(8)"),
            (&[0x05][..], 2_147_483_647, "bit varying"),
            (&[][..], 8, "bit varying(8)"),
            // 0010000001 from a bit varying(10) is not 10000001.
            (&[0x81][..], 10, "bit varying(8)"),
            (&[0x81][..], 10, "bit varying"),
        ] {
            let err = bits_of(bytes, length, pg_type).unwrap_err();
            assert!(err.0.contains("leading zeros"), "{pg_type}: {err}");
            assert!(
                !err.0.contains(pg_type),
                "the type is named by the caller: {err}"
            );
        }
        // Arrays of bits are not carried this way.
        assert!(text(Field::Int(5), None, "bit(8)").is_err());
    }

    #[test]
    fn bit_strings_keep_the_source_width_or_are_refused() {
        // A bit(8) value into a column of another width: never padded nor
        // cut (PostgreSQL's explicit cast would do either).
        for pg_type in ["bit(12)", "bit(4)", "bit(7)", "bit"] {
            let err = bits_of(&[0x05], 8, pg_type).unwrap_err();
            assert!(
                err.0.contains("have 8 bits") && err.0.contains("padded or cut"),
                "{pg_type}: {err}"
            );
        }
        // Zero bits too: B'00000000' is not B'0000'.
        assert!(bits_of(&[], 8, "bit(4)").is_err());
        // A bit varying(8) value whose length is known (its first bit is 1)
        // fits any bit varying at least as wide; not a narrower one.
        assert_eq!(
            bits_of(&[0x81], 8, "bit varying(10)").as_deref(),
            Ok("10000001")
        );
        assert_eq!(
            bits_of(&[0x81], 8, "bit varying").as_deref(),
            Ok("10000001")
        );
        let err = bits_of(&[0x81], 8, "bit varying(4)").unwrap_err();
        assert!(err.0.contains("does not fit bit varying(4)"), "{err}");
        // A 1 beyond the source's length is no value Debezium sends.
        assert!(bits_of(&[0x81, 0x01], 8, "bit varying").is_err());
        // Typed Bits without their length: the width is unknown.
        let err = text(Field::Bytes(vec![0x05]), Some(BITS), "bit(8)").unwrap_err();
        assert!(err.0.contains("without its `length`"), "{err}");
        // Bits into a column that holds no bits.
        for pg_type in ["text", "bytea", "integer"] {
            assert!(bits_of(&[0x05], 8, pg_type).is_err(), "{pg_type}");
        }
    }

    #[test]
    fn a_bit_column_of_another_width_is_a_type_difference() {
        let value = |length: u32| Typed {
            field: Field::Bits {
                bytes: vec![0x05],
                length,
            },
            semantic: Some(Cow::Borrowed(BITS)),
        };
        let differs =
            |pg_type: &str, length: u32| PgType::parse(pg_type).cannot_come_from(&value(length));
        assert!(!differs("bit(8)", 8));
        assert!(differs("bit(12)", 8));
        assert!(differs("bit(4)", 8));
        assert!(!differs("bit varying(8)", 8));
        assert!(!differs("bit varying(12)", 8));
        assert!(!differs("bit varying", 8));
        assert!(differs("bit varying(4)", 8));
        assert!(differs("text", 8));
        assert!(differs("bytea", 8));
        // bit(n)[] is refused as not carried, not as a type difference.
        assert!(!differs("bit(8)[]", 8));
    }

    #[test]
    fn points_are_rebuilt_from_their_coordinates() {
        let point = |x: serde_json::Value, y: serde_json::Value| {
            text(
                Field::Json(json!({"x": x, "y": y, "wkb": "AQEAAAA=", "srid": null})),
                Some(POINT),
                "point",
            )
        };
        assert_eq!(point(json!(1.5), json!(-2.0)).as_deref(), Ok("(1.5,-2)"));
        assert_eq!(point(json!(-0.0), json!(1e-300)).as_deref(), Ok("(-0,0.000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000001)"));
        assert_eq!(
            point(json!("NaN"), json!("Infinity")).as_deref(),
            Ok("(NaN,Infinity)")
        );
        assert_eq!(
            point(json!("-Infinity"), json!(3)).as_deref(),
            Ok("(-Infinity,3)")
        );
        assert!(point(json!("east"), json!(3)).is_err());
        assert!(text(Field::Json(json!({"y": 1})), Some(POINT), "point").is_err());
        // Already PostgreSQL's text.
        assert_eq!(
            text(Field::String("(1,2)".into()), None, "point").as_deref(),
            Ok("(1,2)")
        );
    }

    #[test]
    fn intervals_keep_iso_text_or_are_microseconds() {
        // interval.handling.mode=string: months, days and time kept apart.
        for iso in [
            "P1Y2M20DT4H5M6.789S",
            "P0Y0M-1DT2H3M4.5S",
            "P-1Y-2M0DT0H0M0S",
        ] {
            assert_eq!(
                text(Field::String(iso.into()), Some(INTERVAL), "interval").as_deref(),
                Ok(iso)
            );
        }
        // numeric: one number of microseconds (what it loses: docs/TYPES.md).
        assert_eq!(
            text(
                Field::Int(1_728_000_000_000),
                Some(MICRO_DURATION),
                "interval"
            )
            .as_deref(),
            Ok("1728000000000 microseconds")
        );
        assert_eq!(
            text(Field::Int(-1), None, "interval second(6)").as_deref(),
            Ok("-1 microseconds")
        );
    }

    #[test]
    fn hstore_is_rebuilt_from_debeziums_json() {
        let hstore = |json: &str| text(Field::String(json.into()), None, "hstore");
        assert_eq!(
            hstore(r#"{"a":"1","b":null,"c d":"e\"f","back\\slash":""}"#).as_deref(),
            // Keys in sorted order (hstore keeps its own order anyway).
            Ok(r#""a"=>"1", "b"=>NULL, "back\\slash"=>"", "c d"=>"e\"f""#)
        );
        assert_eq!(hstore("{}").as_deref(), Ok(""));
        assert!(hstore(r#"{"a":1}"#).is_err(), "a value that is not text");
        assert!(hstore("a=>1").is_err(), "not Debezium's JSON");
        // hstore[]: each element its own hstore text, quoted in the array.
        assert_eq!(
            text(
                Field::Array(vec![
                    Field::String(r#"{"a":"1","b":null}"#.into()),
                    Field::Null
                ]),
                None,
                "hstore[]"
            )
            .as_deref(),
            Ok(r#"{"\"a\"=>\"1\", \"b\"=>NULL",NULL}"#)
        );
    }

    #[test]
    fn types_debezium_leaves_out_are_known() {
        for pg_type in [
            "box",
            "lseg",
            "path",
            "polygon",
            "circle",
            "line",
            "int4multirange",
            "tstzmultirange",
            "money[]",
            "interval[]",
            "interval day to second[]",
            "bit varying(4)[]",
            "xml[]",
            "point[]",
            "box[]",
            "name[]",
            "bit(4)[]",
            "tsquery",
            "pg_lsn",
            "txid_snapshot",
            "regclass",
        ] {
            let ty = PgType::parse(pg_type);
            assert!(ty.not_carried().is_some(), "{pg_type}");
            let err = text(Field::String("x".into()), None, pg_type).unwrap_err();
            assert!(err.0.starts_with("Debezium does not carry"), "{err}");
        }
        for pg_type in [
            "point",
            "money",
            "int4range",
            "date[]",
            "text[]",
            "hstore",
            "xml",
        ] {
            assert!(PgType::parse(pg_type).not_carried().is_none(), "{pg_type}");
        }
        assert!(PgType::array_of_domain("posint[]").not_carried().is_some());
        // bit(n)[] arrives as NULL whatever the value: a NULL is refused too.
        let null = Typed {
            field: Field::Null,
            semantic: None,
        };
        assert!(null
            .to_pg_text("bit(4)[]")
            .unwrap_err()
            .0
            .starts_with("Debezium does not carry arrays of bit strings"));
        assert_eq!(null.to_pg_text("bit(4)"), Ok(None));
        assert!(PgType::parse("region").not_carried().is_none());
    }

    #[test]
    fn date_array_elements_have_their_own_sentinels() {
        let dates = text(
            Field::Array(vec![
                Field::Int(DATE_ARRAY_INFINITY_DAYS),
                Field::Int(DATE_ARRAY_MINUS_INFINITY_DAYS),
                Field::Null,
                Field::Int(19_782),
            ]),
            None,
            "date[]",
        );
        assert_eq!(
            dates.as_deref(),
            Ok(r#"{"infinity","-infinity",NULL,"2024-02-29"}"#)
        );
        // A timestamp[] element's sentinels are the scalar's.
        assert_eq!(
            text(
                Field::Array(vec![
                    Field::Int(TIMESTAMP_INFINITY_MICROS),
                    Field::Int(TIMESTAMP_MINUS_INFINITY_MICROS)
                ]),
                None,
                "timestamp without time zone[]"
            )
            .as_deref(),
            Ok(r#"{"infinity","-infinity"}"#)
        );
    }

    #[test]
    fn array_elements_are_read_in_their_own_unit() {
        // 2024-02-29 13:14:15 in microseconds (a timestamp[] source's
        // MicroTimestamp elements) into a timestamp(0)[] column: not read
        // as milliseconds, as the column's precision alone would say.
        let micros = Field::Array(vec![Field::Int(1_709_212_455_000_000), Field::Null]);
        assert_eq!(
            text(
                micros.clone(),
                Some(MICRO_TIMESTAMP),
                "timestamp(0) without time zone[]"
            )
            .as_deref(),
            Ok(r#"{"2024-02-29 13:14:15.000000",NULL}"#)
        );
        assert_eq!(
            text(
                Field::Array(vec![Field::Int(1_709_212_455_000)]),
                Some(TIMESTAMP),
                "timestamp without time zone[]"
            )
            .as_deref(),
            Ok(r#"{"2024-02-29 13:14:15.000000"}"#)
        );
    }

    #[test]
    fn money_is_its_decimal_and_other_strings_pass_through() {
        // Debezium: Decimal with scale 2 (money.fraction.digits), measured:
        // -1234.56 arrives as 0xfe1dc0.
        let money = |bytes: &[u8]| {
            text(
                Field::Decimal {
                    unscaled: bytes.to_vec(),
                    scale: 2,
                },
                Some(DECIMAL),
                "money",
            )
        };
        assert_eq!(money(&[0xfe, 0x1d, 0xc0]).as_deref(), Ok("-1234.56"));
        assert_eq!(
            money(&[0x7f, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff]).as_deref(),
            Ok("92233720368547758.07")
        );
        assert_eq!(
            money(&[0x80, 0, 0, 0, 0, 0, 0, 0]).as_deref(),
            Ok("-92233720368547758.08")
        );
        for (value, pg_type) in [
            ("MiXeD", "citext"),
            ("08:00:2b:01:02:03:04:05", "macaddr8"),
            ("<a x=\"1\">t&amp;</a>", "xml"),
            ("top.sci.astro", "ltree"),
            ("'a' 'cat' 'fat'", "tsvector"),
            ("[\"2024-01-01 00:00:00\",infinity)", "tsrange"),
            ("empty", "daterange"),
        ] {
            assert_eq!(
                text(Field::String(value.into()), None, pg_type).as_deref(),
                Ok(value),
                "{pg_type}"
            );
        }
    }

    #[test]
    fn render_errors_name_neither_column_nor_type() {
        let cases: Vec<(Field, &str)> = vec![
            (Field::Bytes(vec![0xff]), "character(5)"),
            (Field::Bytes(vec![0x05]), "bit varying(16)"),
            (Field::Array(vec![]), "text"),
            (Field::Int(1), "integer[]"),
            (Field::Bytes(vec![1]), "numeric"),
            (Field::String("x".into()), "numeric"),
        ];
        for (field, pg_type) in cases {
            let err = text(field.clone(), None, pg_type).unwrap_err();
            assert!(!err.0.contains(pg_type), "{field:?} as {pg_type}: {err}");
            assert!(!err.0.contains("column :"), "{err}");
        }
    }
}
