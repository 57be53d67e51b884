//! Decode: one Kafka message (key and value bytes) carrying a Debezium
//! envelope into one typed [`Decoded`] change. Pure: no I/O; the Avro path
//! takes the writer schema already fetched by the caller. Never panics on
//! input: every problem is a [`DecodeError`] that names it.
//!
//! Values are decoded into [`Field`]s that keep what the envelope says about
//! them (Connect/Debezium semantic type names where the format carries them);
//! [`Typed::to_pg_text`] then renders a field as PostgreSQL's text input for
//! the target column's type, so that the applier can bind every value as
//! text and cast it in SQL (`$1::text[]` → `::numeric`, `::date`, …).
//!
//! apache-avro keeps custom attributes only on named and container schemas,
//! so an Avro primitive loses Debezium's `connect.name` (a Date is a bare
//! `int`); semantic names there come from records, Avro logical types and
//! decimals only, and `to_pg_text` falls back on the column type.

use std::borrow::Cow;
use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::rc::Rc;

use apache_avro::schema::Name;
use apache_avro::types::Value as AvroValue;
use apache_avro::Schema;
use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use rustc_hash::FxHashMap;
use serde_json::value::RawValue;
use serde_json::Value as Json;

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
    /// reads it (see [`before_wanted`]).
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

/// Why a message could not be decoded.
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

impl DecodeError {
    /// Names `column` in a [`DecodeError::Column`] that has none yet (as
    /// [`Typed::to_pg_text`] returns them); other errors pass unchanged.
    pub fn for_column(self, column: &str) -> Self {
        match self {
            DecodeError::Column { column: c, problem } if c.is_empty() => DecodeError::Column {
                column: column.to_owned(),
                problem,
            },
            other => other,
        }
    }
}

// Connect / Debezium semantic type names.
const DATE: &str = "io.debezium.time.Date";
const TIME: &str = "io.debezium.time.Time";
const MICRO_TIME: &str = "io.debezium.time.MicroTime";
const NANO_TIME: &str = "io.debezium.time.NanoTime";
const TIMESTAMP: &str = "io.debezium.time.Timestamp";
const MICRO_TIMESTAMP: &str = "io.debezium.time.MicroTimestamp";
const NANO_TIMESTAMP: &str = "io.debezium.time.NanoTimestamp";
// Connect's own logical types (`time.precision.mode=connect`).
const CONNECT_DATE: &str = "org.apache.kafka.connect.data.Date";
const CONNECT_TIME: &str = "org.apache.kafka.connect.data.Time";
const CONNECT_TIMESTAMP: &str = "org.apache.kafka.connect.data.Timestamp";
const UUID: &str = "io.debezium.data.Uuid";
const ENUM: &str = "io.debezium.data.Enum";
const DECIMAL: &str = "org.apache.kafka.connect.data.Decimal";
const VARIABLE_SCALE_DECIMAL: &str = "io.debezium.data.VariableScaleDecimal";

/// The columns of a row's version (DESIGN.md §4).
pub const VERSION_COLUMNS: [&str; 2] = ["hlc", "origin_region"];

/// Whether a column of the before image is decoded. The apply reads all of
/// a delete's, but of any other change's only the version it replaced and
/// the values its after image left out (unchanged TOAST): decoding the
/// rest of every update's before image was a third of the decode's work.
fn before_wanted(op: Op, after: Option<&Row>, column: &str) -> bool {
    op == Op::Delete
        || VERSION_COLUMNS.contains(&column)
        || after.is_some_and(|a| a.get(column).is_some_and(|t| t.field == Field::Unavailable))
}

/// A semantic type name, without an allocation for the names rendering
/// looks at (the common case: every date, time and decimal column).
fn semantic_name(name: &str) -> Cow<'static, str> {
    const KNOWN: [&str; 14] = [
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
    const OTHER: [&str; 13] = [
        "io.debezium.data.Json",
        "io.debezium.data.Xml",
        "io.debezium.data.Bits",
        "io.debezium.data.EnumSet",
        "io.debezium.data.Ltree",
        "io.debezium.time.ZonedTimestamp",
        "io.debezium.time.ZonedTime",
        "io.debezium.time.MicroDuration",
        "io.debezium.time.Interval",
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

/// The placeholder as schemaless JSON carries it for a `bytes` column.
const UNAVAILABLE_BASE64: &str = "X19kZWJleml1bV91bmF2YWlsYWJsZV92YWx1ZQ==";

const MICROS_PER_DAY: i128 = 86_400_000_000;
/// Far beyond PostgreSQL's date range, small enough that no calendar
/// arithmetic on it can overflow.
const MAX_ABS_DAYS: i128 = 1_000_000_000;
/// PostgreSQL's largest numeric (131072 digits before the point, 16383
/// after) fits in about 61 KiB; bounding the input bounds the work.
const MAX_DECIMAL_BYTES: usize = 64 * 1024;
/// PostgreSQL's largest numeric display scale.
const MAX_DECIMAL_SCALE: u32 = 16383;

fn column_error(column: &str, problem: impl Into<String>) -> DecodeError {
    DecodeError::Column {
        column: column.to_owned(),
        problem: problem.into(),
    }
}

fn envelope_error(problem: impl Into<String>) -> DecodeError {
    DecodeError::Envelope(problem.into())
}

fn parse_op(op: &str) -> Result<Op, DecodeError> {
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
fn snapshot_flag(value: Option<&str>) -> Result<bool, DecodeError> {
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
struct Envelope {
    op: Op,
    schema: String,
    table: String,
    before: Option<Row>,
    after: Option<Row>,
    source_ts_ms: i64,
    lsn: Option<i64>,
    origin: Option<String>,
    snapshot: bool,
}

impl Envelope {
    /// Only a truncate (which concerns no row) comes without a key.
    fn into_keyless_change(self) -> Result<Decoded, DecodeError> {
        if self.op == Op::Truncate {
            self.into_change(Row::new())
        } else {
            Err(DecodeError::MissingKey)
        }
    }

    fn into_change(self, key: Row) -> Result<Decoded, DecodeError> {
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
        }))
    }
}

// ---------------------------------------------------------------- JSON ----

/// Decodes one message of Kafka Connect's JsonConverter, with or without
/// `schemas.enable`. `value` `None` is a tombstone. Only a truncate event
/// may come without a key.
pub fn decode_json(key: Option<&[u8]>, value: Option<&[u8]>) -> Result<Decoded, DecodeError> {
    let key = key.map(json_key).transpose()?;
    let tombstone = |key: Option<Row>| {
        key.map(|key| Decoded::Tombstone { key })
            .ok_or(DecodeError::MissingKey)
    };
    let Some(value) = value else {
        return tombstone(key);
    };
    let mut general = None;
    let (payload, schema) = parse_framed_object::<Payload>(value, "value", &mut general)?;
    let schema = schema.as_deref();
    let payload = match payload {
        Ok(object) => object,
        // JsonConverter's form of a null value: a tombstone too.
        Err(Json::Null) => return tombstone(key),
        Err(other) => {
            return Err(envelope_error(format!(
                "the value is {}, expected an object",
                json_kind(&other)
            )))
        }
    };
    let envelope = json_envelope(&payload, schema)?;
    match key {
        Some(key) => envelope.into_change(key),
        None => envelope.into_keyless_change(),
    }
}

fn parse_json(bytes: &[u8], what: &str) -> Result<Json, DecodeError> {
    serde_json::from_slice(bytes).map_err(|e| DecodeError::Json(format!("{what}: {e}")))
}

/// A JSON object as its members' texts, in document order, each parsed
/// only when it is used. Building a `serde_json::Value` for a whole 6 KB
/// envelope (a string and a map entry per member) was most of the decode.
struct LazyObject<'a> {
    members: Vec<(Cow<'a, str>, &'a RawValue)>,
}

impl<'a> LazyObject<'a> {
    /// A member's text; the last one where a name repeats (as a
    /// `serde_json::Map` keeps it).
    fn get(&self, name: &str) -> Option<&'a RawValue> {
        self.members
            .iter()
            .rev()
            .find(|(n, _)| n == name)
            .map(|(_, v)| *v)
    }

    /// A member's value, parsed. Its text is valid JSON (the object was
    /// scanned whole), but a number may still be out of range.
    fn value(&self, name: &str) -> Result<Option<Json>, DecodeError> {
        self.get(name)
            .map(|raw| serde_json::from_str(raw.get()))
            .transpose()
            .map_err(|e| envelope_error(format!("field `{name}`: {e}")))
    }
}

/// A member name, borrowed unless it has escapes.
struct MemberName<'a>(Cow<'a, str>);

impl<'de> serde::Deserialize<'de> for MemberName<'de> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = MemberName<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a member name")
            }
            fn visit_borrowed_str<E>(self, v: &'de str) -> Result<MemberName<'de>, E> {
                Ok(MemberName(Cow::Borrowed(v)))
            }
            fn visit_str<E>(self, v: &str) -> Result<MemberName<'de>, E> {
                Ok(MemberName(Cow::Owned(v.to_owned())))
            }
        }
        d.deserialize_str(V)
    }
}

/// An object's members, each kept as text.
fn lazy_members<'de, A: serde::de::MapAccess<'de>>(
    mut map: A,
) -> Result<LazyObject<'de>, A::Error> {
    let mut members = Vec::with_capacity(map.size_hint().unwrap_or(16));
    while let Some(MemberName(name)) = map.next_key()? {
        members.push((name, map.next_value::<&'de RawValue>()?));
    }
    Ok(LazyObject { members })
}

impl<'de> serde::Deserialize<'de> for LazyObject<'de> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = LazyObject<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("an object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                map: A,
            ) -> Result<LazyObject<'de>, A::Error> {
                lazy_members(map)
            }
        }
        d.deserialize_map(V)
    }
}

/// An envelope's payload, read in one pass: the row images and `source`
/// split into their members as they are met (scanning them once as text
/// and again as objects was a tenth of the JSON decode), every other
/// member kept as text. A repeated name: the last one counts.
struct Payload<'a> {
    members: LazyObject<'a>,
    before: Option<Nested<'a>>,
    after: Option<Nested<'a>>,
    source: Option<Nested<'a>>,
}

/// A payload member that should hold an object.
enum Nested<'a> {
    Object(LazyObject<'a>),
    Null,
    /// What it holds instead, as `json_kind` names it.
    Other(&'static str),
}

/// A message's payload read as `T` (see [`parse_object`]), with its schema:
/// by the fast path where the message starts with a known schema and its
/// payload parses, else the general way (`parse_framed`, whose errors are
/// relative to the whole message). `general` holds the payload's text when
/// that way had to build it.
fn parse_framed_object<'a, T: serde::Deserialize<'a>>(
    bytes: &'a [u8],
    what: &str,
    general: &'a mut Option<Cow<'a, str>>,
) -> Result<ParsedObject<T>, DecodeError> {
    let fast = parse_known_framed(bytes)
        .and_then(|(text, schema)| Some((parse_object(text, what).ok()?, Some(schema))));
    if let Some(parsed) = fast {
        return Ok(parsed);
    }
    let (text, schema) = parse_framed(bytes, what)?;
    Ok((parse_object(general.insert(text), what)?, schema))
}

/// An object read as `T`, or the other value found, and its schema.
type ParsedObject<T> = (Result<T, Json>, Option<Rc<ConnectSchema>>);

/// The object in `text` (valid JSON) read as `T`; otherwise `Err` with the
/// value `text` holds, for the caller to say what it expected.
fn parse_object<'a, T: serde::Deserialize<'a>>(
    text: &'a str,
    what: &str,
) -> Result<Result<T, Json>, DecodeError> {
    if text.trim_start().starts_with('{') {
        serde_json::from_str(text)
            .map(Ok)
            .map_err(|e| DecodeError::Json(format!("{what}: {e}")))
    } else {
        parse_json(text.as_bytes(), what).map(Err)
    }
}

impl<'de> serde::Deserialize<'de> for Payload<'de> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Payload<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("an object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<Payload<'de>, A::Error> {
                let mut p = Payload {
                    members: LazyObject {
                        members: Vec::with_capacity(4),
                    },
                    before: None,
                    after: None,
                    source: None,
                };
                while let Some(MemberName(name)) = map.next_key()? {
                    match &*name {
                        "before" => p.before = Some(map.next_value()?),
                        "after" => p.after = Some(map.next_value()?),
                        "source" => p.source = Some(map.next_value()?),
                        _ => p.members.members.push((name, map.next_value()?)),
                    }
                }
                Ok(p)
            }
        }
        d.deserialize_map(V)
    }
}

impl<'de> serde::Deserialize<'de> for Nested<'de> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Nested<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                map: A,
            ) -> Result<Self::Value, A::Error> {
                lazy_members(map).map(Nested::Object)
            }
            fn visit_unit<E>(self) -> Result<Self::Value, E> {
                Ok(Nested::Null)
            }
            fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> {
                Ok(Nested::Other("a boolean"))
            }
            fn visit_i64<E>(self, _: i64) -> Result<Self::Value, E> {
                Ok(Nested::Other("a number"))
            }
            fn visit_u64<E>(self, _: u64) -> Result<Self::Value, E> {
                Ok(Nested::Other("a number"))
            }
            fn visit_f64<E>(self, _: f64) -> Result<Self::Value, E> {
                Ok(Nested::Other("a number"))
            }
            fn visit_str<E>(self, _: &str) -> Result<Self::Value, E> {
                Ok(Nested::Other("a string"))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<Self::Value, A::Error> {
                while seq.next_element::<serde::de::IgnoredAny>()?.is_some() {}
                Ok(Nested::Other("an array"))
            }
        }
        d.deserialize_any(V)
    }
}

/// `{"schema": …, "payload": …}` → (payload, schema); anything else is its
/// own payload. Debezium repeats the same schema, often most of the bytes,
/// in every message: it is parsed once per distinct text (per thread) and
/// shared, and only the payload is built anew.
fn parse_framed<'a>(
    bytes: &'a [u8],
    what: &str,
) -> Result<(Cow<'a, str>, Option<Rc<ConnectSchema>>), DecodeError> {
    #[derive(serde::Deserialize)]
    struct Framed<'a> {
        #[serde(default, borrow, deserialize_with = "present")]
        schema: Option<&'a RawValue>,
        #[serde(default, borrow, deserialize_with = "present")]
        payload: Option<&'a RawValue>,
    }
    // A key that is there, even as `null`, is Some (serde would say None).
    fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<&'de RawValue>, D::Error> {
        serde::Deserialize::deserialize(d).map(Some)
    }
    let is_object = bytes
        .iter()
        .find(|b| !b.is_ascii_whitespace())
        .is_some_and(|b| *b == b'{');
    let whole = |bytes: &'a [u8]| {
        std::str::from_utf8(bytes)
            .map(Cow::Borrowed)
            .map_err(|e| DecodeError::Json(format!("{what}: {e}")))
    };
    if is_object {
        match serde_json::from_slice::<Framed>(bytes) {
            Ok(Framed {
                schema: Some(schema),
                payload: Some(payload),
            }) => {
                return Ok((
                    Cow::Borrowed(payload.get()),
                    cached_schema(schema.get(), what)?,
                ))
            }
            // Schemaless: the whole object is the payload.
            Ok(_) => return Ok((whole(bytes)?, None)),
            Err(_) => {}
        }
    }
    // Not an object, or unusual (e.g. a repeated key, where the last one
    // counts): the whole document, split as it is.
    match parse_json(bytes, what)? {
        Json::Object(mut doc) if doc.contains_key("schema") && doc.contains_key("payload") => {
            let payload = doc.remove("payload").unwrap_or(Json::Null);
            let schema = doc
                .remove("schema")
                .filter(|s| !s.is_null())
                .map(|s| Rc::new(ConnectSchema::new(s)));
            Ok((Cow::Owned(payload.to_string()), schema))
        }
        _ => Ok((whole(bytes)?, None)),
    }
}

/// Distinct schema texts kept per thread; a topic has a handful (one per
/// table version), so the bound is only a guard against a schema per message.
const SCHEMA_CACHE_SIZE: usize = 256;

/// Parsed schemas by the xxh64 of their text, with the text to confirm a hit.
type SchemaCache = HashMap<u64, (Box<str>, Rc<ConnectSchema>)>;

/// The schema texts last seen (a key's and a value's, per table), tried
/// as a prefix of each message before it is parsed at all.
const RECENT_SCHEMAS: usize = 4;

thread_local! {
    static SCHEMAS: RefCell<SchemaCache> = RefCell::new(HashMap::new());
    static RECENT: RefCell<Vec<(Box<str>, Rc<ConnectSchema>)>> = const { RefCell::new(Vec::new()) };
}

/// JsonConverter writes `{"schema":<schema>,"payload":<payload>}`, compact,
/// and the schema text is the same in every message of a table version:
/// most of a message's bytes. When the bytes start with one of the recent
/// schema texts (a complete JSON value, so it ends where the text ends) and
/// end with the frame's `}`, what lies between is the payload's text: the
/// schema is neither scanned nor hashed, and the payload is scanned only
/// by the caller's parse. Where that parse fails (trailing bytes, a
/// repeated key, a broken payload), the caller goes the general way
/// (`parse_framed`), which decides and words the error as it always did.
fn parse_known_framed(bytes: &[u8]) -> Option<(&str, Rc<ConnectSchema>)> {
    let rest = bytes.strip_prefix(b"{\"schema\":")?;
    let (schema, rest) = RECENT.with(|recent| {
        recent.borrow().iter().find_map(|(text, schema)| {
            rest.strip_prefix(text.as_bytes())
                .map(|rest| (schema.clone(), rest))
        })
    })?;
    let payload = rest
        .strip_prefix(b",\"payload\":")?
        .trim_ascii_end()
        .strip_suffix(b"}")?;
    Some((std::str::from_utf8(payload).ok()?, schema))
}

fn remember_recent(text: &str, schema: &Rc<ConnectSchema>) {
    RECENT.with(|recent| {
        let mut recent = recent.borrow_mut();
        if !recent.iter().any(|(t, _)| &**t == text) {
            if recent.len() >= RECENT_SCHEMAS {
                recent.remove(0);
            }
            recent.push((text.into(), schema.clone()));
        }
    });
}

/// A Connect schema with the positions of its struct fields by name, for
/// the schema itself and for each of its struct-typed fields (an envelope's
/// `before` and `after`): a row's columns are looked up by name in every
/// message, and a linear search per column was a measurable share of the
/// decode.
pub(crate) struct ConnectSchema {
    json: Json,
    /// The schema's own fields.
    own: FieldIndex,
    /// The fields of each struct-typed field, by its name.
    nested: FxHashMap<String, FieldIndex>,
}

/// A struct schema's fields: their positions by name, and what decoding
/// each one's value needs, read once per schema instead of per message.
struct FieldIndex {
    positions: FxHashMap<String, usize>,
    plans: Vec<FieldPlan>,
}

/// A field's Connect type as far as the common values' quick path needs it,
/// and its semantic name.
struct FieldPlan {
    kind: ConnectKind,
    semantic: Option<Cow<'static, str>>,
}

/// Connect types whose JSON values [`quick_field`] reads without building a
/// JSON value first; the rest go the general way.
#[derive(Clone, Copy, PartialEq, Eq)]
enum ConnectKind {
    Int,
    Boolean,
    String,
    Other,
}

impl FieldIndex {
    fn of(schema: &Json) -> Self {
        let fields = schema.get("fields").and_then(Json::as_array);
        let mut positions = FxHashMap::default();
        let mut plans = Vec::new();
        for (i, f) in fields.into_iter().flatten().enumerate() {
            if let Some(name) = f.get("field").and_then(Json::as_str) {
                // The first of a repeated name, as a linear search finds.
                positions.entry(name.to_owned()).or_insert(i);
            }
            let kind = match f.get("type").and_then(Json::as_str) {
                Some("int8" | "int16" | "int32" | "int64") => ConnectKind::Int,
                Some("boolean") => ConnectKind::Boolean,
                Some("string") => ConnectKind::String,
                _ => ConnectKind::Other,
            };
            let semantic = f.get("name").and_then(Json::as_str).map(semantic_name);
            plans.push(FieldPlan { kind, semantic });
        }
        FieldIndex { positions, plans }
    }
}

/// One struct of a [`ConnectSchema`]: its field schemas and their index.
#[derive(Clone, Copy)]
struct StructSchema<'a> {
    fields: &'a [Json],
    index: &'a FieldIndex,
}

impl<'a> StructSchema<'a> {
    fn field(&self, name: &str) -> Option<&'a Json> {
        self.fields.get(*self.index.positions.get(name)?)
    }

    /// A field's schema with its plan.
    fn planned_field(&self, name: &str) -> Option<(&'a Json, &'a FieldPlan)> {
        let i = *self.index.positions.get(name)?;
        Some((self.fields.get(i)?, self.index.plans.get(i)?))
    }
}

impl ConnectSchema {
    fn new(json: Json) -> Self {
        let own = FieldIndex::of(&json);
        let nested = own
            .positions
            .iter()
            .filter_map(|(name, i)| {
                let field = json.get("fields")?.get(*i)?;
                Some((name.clone(), FieldIndex::of(field)))
            })
            .collect();
        ConnectSchema { json, own, nested }
    }

    /// The schema itself, as a struct (a key's row).
    fn as_struct(&self) -> Option<StructSchema<'_>> {
        Some(StructSchema {
            fields: self.json.get("fields")?.as_array()?,
            index: &self.own,
        })
    }

    /// Its field `name`, as a struct (an envelope's `before` or `after`).
    fn struct_field(&self, name: &str) -> Option<StructSchema<'_>> {
        Some(StructSchema {
            fields: self.as_struct()?.field(name)?.get("fields")?.as_array()?,
            index: self.nested.get(name)?,
        })
    }
}

fn cached_schema(text: &str, what: &str) -> Result<Option<Rc<ConnectSchema>>, DecodeError> {
    if text == "null" {
        return Ok(None);
    }
    let hash = xxhash_rust::xxh64::xxh64(text.as_bytes(), 0);
    let hit = SCHEMAS.with(|c| {
        c.borrow()
            .get(&hash)
            .filter(|(t, _)| &**t == text)
            .map(|(_, s)| s.clone())
    });
    if let Some(schema) = hit {
        remember_recent(text, &schema);
        return Ok(Some(schema));
    }
    let schema = Rc::new(ConnectSchema::new(parse_json(text.as_bytes(), what)?));
    remember_recent(text, &schema);
    SCHEMAS.with(|c| {
        let mut c = c.borrow_mut();
        if c.len() >= SCHEMA_CACHE_SIZE {
            c.clear();
        }
        c.insert(hash, (text.into(), schema.clone()));
    });
    Ok(Some(schema))
}

fn json_kind(value: &Json) -> &'static str {
    match value {
        Json::Null => "null",
        Json::Bool(_) => "a boolean",
        Json::Number(_) => "a number",
        Json::String(_) => "a string",
        Json::Array(_) => "an array",
        Json::Object(_) => "an object",
    }
}

fn json_key(bytes: &[u8]) -> Result<Row, DecodeError> {
    let mut general = None;
    let (key, schema) = parse_framed_object::<LazyObject>(bytes, "key", &mut general)?;
    let schema = schema.as_deref().and_then(ConnectSchema::as_struct);
    match key {
        Ok(fields) => json_row(&fields, schema, &|_| true),
        Err(Json::Null) => Err(DecodeError::MissingKey),
        Err(other) => Err(envelope_error(format!(
            "the key is {}, expected an object",
            json_kind(&other)
        ))),
    }
}

fn json_envelope(
    payload: &Payload<'_>,
    schema: Option<&ConnectSchema>,
) -> Result<Envelope, DecodeError> {
    let op = match payload.members.value("op")? {
        None | Some(Json::Null) => return Err(envelope_error("field `op` is missing")),
        Some(Json::String(op)) => parse_op(&op)?,
        Some(other) => {
            return Err(envelope_error(format!(
                "field `op` is {}, expected a string",
                json_kind(&other)
            )))
        }
    };
    let source = match &payload.source {
        None | Some(Nested::Null) => return Err(envelope_error("field `source` is missing")),
        Some(Nested::Object(source)) => source,
        Some(Nested::Other(kind)) => {
            return Err(envelope_error(format!(
                "field `source` is {kind}, expected an object"
            )))
        }
    };
    // Only the members read here are parsed.
    let member = |name: &str| {
        source
            .get(name)
            .map(|raw| serde_json::from_str::<Json>(raw.get()))
            .transpose()
            .map_err(|e| envelope_error(format!("field `source.{name}`: {e}")))
    };
    let source_ts_ms = match member("ts_ms")? {
        None | Some(Json::Null) => return Err(envelope_error("field `source.ts_ms` is missing")),
        Some(v) => v.as_i64().ok_or_else(|| {
            envelope_error(format!(
                "field `source.ts_ms` is {}, expected an integer",
                json_kind(&v)
            ))
        })?,
    };
    let text = |name: &str| match member(name)? {
        None | Some(Json::Null) => Err(envelope_error(format!("field `source.{name}` is missing"))),
        Some(Json::String(s)) => Ok(s),
        Some(other) => Err(envelope_error(format!(
            "field `source.{name}` is {}, expected a string",
            json_kind(&other)
        ))),
    };
    let lsn = match member("lsn")? {
        None | Some(Json::Null) => None,
        Some(v) => Some(v.as_i64().ok_or_else(|| {
            envelope_error(format!(
                "field `source.lsn` is {}, expected an integer",
                json_kind(&v)
            ))
        })?),
    };
    let origin = match member("origin")? {
        None | Some(Json::Null) => None,
        Some(Json::String(s)) => Some(s),
        Some(other) => {
            return Err(envelope_error(format!(
                "field `source.origin` is {}, expected a string",
                json_kind(&other)
            )))
        }
    };
    let snapshot = match member("snapshot")? {
        None | Some(Json::Null) => false,
        Some(Json::Bool(b)) => b,
        Some(Json::String(s)) => snapshot_flag(Some(&s))?,
        Some(other) => {
            return Err(envelope_error(format!(
                "field `source.snapshot` is {}, expected a string or boolean",
                json_kind(&other)
            )))
        }
    };
    let image =
        |name: &str, nested: &Option<Nested<'_>>, wanted: &dyn Fn(&str) -> bool| match nested {
            None | Some(Nested::Null) => Ok(None),
            Some(Nested::Object(fields)) => {
                json_row(fields, schema.and_then(|s| s.struct_field(name)), wanted).map(Some)
            }
            Some(Nested::Other(kind)) => Err(envelope_error(format!(
                "field `{name}` is {kind}, expected an object or null"
            ))),
        };
    let schema_name = text("schema")?;
    let table = text("table")?;
    let after = image("after", &payload.after, &|_| true)?;
    let before = image("before", &payload.before, &|c| {
        before_wanted(op, after.as_ref(), c)
    })?;
    Ok(Envelope {
        op,
        schema: schema_name,
        table,
        before,
        after,
        source_ts_ms,
        lsn,
        origin,
        snapshot,
    })
}

/// A row image (or key) left as text: each column's value is parsed on its
/// own, straight into its typed form; only the columns `wanted` are.
fn json_row(
    fields: &LazyObject<'_>,
    schema: Option<StructSchema>,
    wanted: &dyn Fn(&str) -> bool,
) -> Result<Row, DecodeError> {
    let mut row = Row::new();
    for (name, raw) in &fields.members {
        if !wanted(name) {
            continue;
        }
        let planned = schema.and_then(|s| s.planned_field(name));
        let quick = planned.and_then(|(_, plan)| {
            quick_field(raw.get(), plan.kind).map(|field| Typed {
                field,
                semantic: plan.semantic.clone(),
            })
        });
        let typed = match quick {
            Some(typed) => typed,
            None => {
                let value: Json = serde_json::from_str(raw.get())
                    .map_err(|e| column_error(name, format!("not valid JSON: {e}")))?;
                match planned {
                    Some((field_schema, _)) => json_typed(&value, field_schema, name)?,
                    None => Typed {
                        field: json_plain(&value, name, false)?,
                        semantic: None,
                    },
                }
            }
        };
        // A repeated name: the last one counts, as in a parsed object.
        row.insert(name.clone().into_owned(), typed);
    }
    Ok(row)
}

/// The common values read straight from their JSON text: a null, an
/// integer, a boolean, a string without escapes (not the placeholder).
/// `None` sends the value the general way ([`json_typed`]), which decodes
/// everything else and words the errors; for what this reads, it gives the
/// same field.
fn quick_field(raw: &str, kind: ConnectKind) -> Option<Field> {
    if raw == "null" {
        return Some(Field::Null);
    }
    match kind {
        // serde_json reads `-0` as a float, which no integer column takes.
        ConnectKind::Int if raw == "-0" => None,
        ConnectKind::Int => raw.parse().ok().map(Field::Int),
        ConnectKind::Boolean => match raw {
            "true" => Some(Field::Bool(true)),
            "false" => Some(Field::Bool(false)),
            _ => None,
        },
        ConnectKind::String => {
            let text = raw.strip_prefix('"')?.strip_suffix('"')?;
            (!text.contains('\\') && text != UNAVAILABLE_PLACEHOLDER)
                .then(|| Field::String(text.to_owned()))
        }
        ConnectKind::Other => None,
    }
}

fn is_placeholder_list<T>(items: &[T], is_placeholder: impl Fn(&T) -> bool) -> bool {
    matches!(items, [only] if is_placeholder(only))
}

fn json_typed(value: &Json, schema: &Json, column: &str) -> Result<Typed, DecodeError> {
    let semantic = schema.get("name").and_then(Json::as_str).map(semantic_name);
    let field = json_with_schema(value, schema, semantic.as_deref(), column, false)?;
    Ok(Typed { field, semantic })
}

/// Decodes `value` by its Connect schema. Inside arrays (`in_array`) the
/// placeholder is data: Debezium only replaces whole columns.
fn json_with_schema(
    value: &Json,
    schema: &Json,
    semantic: Option<&str>,
    column: &str,
    in_array: bool,
) -> Result<Field, DecodeError> {
    if value.is_null() {
        return Ok(Field::Null);
    }
    if !in_array && value.as_str() == Some(UNAVAILABLE_PLACEHOLDER) {
        return Ok(Field::Unavailable);
    }
    let ty = schema.get("type").and_then(Json::as_str).unwrap_or("");
    let wrong = || {
        column_error(
            column,
            format!("expected a {ty} value, got {}", json_kind(value)),
        )
    };
    let field = match ty {
        "int8" | "int16" | "int32" | "int64" => Field::Int(value.as_i64().ok_or_else(wrong)?),
        "float32" | "float64" => Field::Float(json_float(value).ok_or_else(wrong)?),
        "boolean" => Field::Bool(value.as_bool().ok_or_else(wrong)?),
        "string" => Field::String(value.as_str().ok_or_else(wrong)?.to_owned()),
        "bytes" => {
            let bytes = base64_bytes(value.as_str().ok_or_else(wrong)?, column)?;
            if !in_array && bytes == UNAVAILABLE_PLACEHOLDER.as_bytes() {
                Field::Unavailable
            } else if semantic == Some(DECIMAL) {
                Field::Decimal {
                    unscaled: bytes,
                    scale: connect_decimal_scale(schema, column)?,
                }
            } else {
                Field::Bytes(bytes)
            }
        }
        "array" => {
            let items = value.as_array().ok_or_else(wrong)?;
            if !in_array
                && is_placeholder_list(items, |i| i.as_str() == Some(UNAVAILABLE_PLACEHOLDER))
            {
                return Ok(Field::Unavailable);
            }
            let item_schema = schema.get("items");
            let item_semantic = item_schema
                .and_then(|s| s.get("name"))
                .and_then(Json::as_str);
            let items = items
                .iter()
                .map(|item| match item_schema {
                    Some(s) => json_with_schema(item, s, item_semantic, column, true),
                    None => json_plain(item, column, true),
                })
                .collect::<Result<_, _>>()?;
            Field::Array(items)
        }
        "struct" if semantic == Some(VARIABLE_SCALE_DECIMAL) => {
            variable_scale_decimal(value, column)?
        }
        "struct" | "map" => {
            if !value.is_object() {
                return Err(wrong());
            }
            Field::Json(value.clone())
        }
        _ => json_plain(value, column, in_array)?,
    };
    Ok(field)
}

/// Decodes a schemaless value by its JSON shape alone.
fn json_plain(value: &Json, column: &str, in_array: bool) -> Result<Field, DecodeError> {
    Ok(match value {
        Json::Null => Field::Null,
        Json::Bool(b) => Field::Bool(*b),
        Json::Number(n) => match n.as_i64() {
            Some(i) => Field::Int(i),
            None => Field::Float(
                n.as_f64()
                    .ok_or_else(|| column_error(column, format!("number {n} is out of range")))?,
            ),
        },
        Json::String(s) => {
            if !in_array && (s == UNAVAILABLE_PLACEHOLDER || s == UNAVAILABLE_BASE64) {
                Field::Unavailable
            } else {
                Field::String(s.clone())
            }
        }
        Json::Array(items) => {
            if !in_array
                && is_placeholder_list(items, |i| i.as_str() == Some(UNAVAILABLE_PLACEHOLDER))
            {
                Field::Unavailable
            } else {
                Field::Array(
                    items
                        .iter()
                        .map(|item| json_plain(item, column, true))
                        .collect::<Result<_, _>>()?,
                )
            }
        }
        Json::Object(map)
            if map.len() == 2 && map.contains_key("scale") && map.contains_key("value") =>
        {
            variable_scale_decimal(value, column)?
        }
        Json::Object(_) => Field::Json(value.clone()),
    })
}

/// JsonConverter writes non-finite doubles as the strings Jackson uses.
fn json_float(value: &Json) -> Option<f64> {
    match value {
        Json::Number(n) => n.as_f64(),
        Json::String(s) => match s.as_str() {
            "NaN" => Some(f64::NAN),
            "Infinity" => Some(f64::INFINITY),
            "-Infinity" => Some(f64::NEG_INFINITY),
            _ => None,
        },
        _ => None,
    }
}

fn base64_bytes(text: &str, column: &str) -> Result<Vec<u8>, DecodeError> {
    BASE64
        .decode(text)
        .map_err(|e| column_error(column, format!("bytes value is not base64: {e}")))
}

/// `parameters.scale` of a Connect Decimal schema (a string, by Connect's
/// convention; a number is accepted too).
fn connect_decimal_scale(schema: &Json, column: &str) -> Result<u32, DecodeError> {
    let scale = schema.get("parameters").and_then(|p| p.get("scale"));
    let parsed = match scale {
        Some(Json::String(s)) => s.parse::<u32>().ok(),
        Some(Json::Number(n)) => n.as_u64().and_then(|n| u32::try_from(n).ok()),
        _ => None,
    };
    parsed.ok_or_else(|| {
        column_error(
            column,
            "Decimal schema has no valid `parameters.scale` (a non-negative integer)",
        )
    })
}

/// Debezium's VariableScaleDecimal struct `{scale: int32, value: bytes}`.
fn variable_scale_decimal(value: &Json, column: &str) -> Result<Field, DecodeError> {
    let scale = value
        .get("scale")
        .and_then(Json::as_i64)
        .ok_or_else(|| column_error(column, "VariableScaleDecimal has no integer `scale`"))?;
    let scale = u32::try_from(scale).map_err(|_| {
        column_error(
            column,
            format!("VariableScaleDecimal scale {scale} is negative or too large"),
        )
    })?;
    let text = value
        .get("value")
        .and_then(Json::as_str)
        .ok_or_else(|| column_error(column, "VariableScaleDecimal has no base64 `value`"))?;
    Ok(Field::Decimal {
        unscaled: base64_bytes(text, column)?,
        scale,
    })
}

// ---------------------------------------------------------------- Avro ----

/// The schema a message was written with, to follow its `Schema::Ref`s to
/// the named schema they refer to. Found by walking the (small) schema, not
/// through a map built for every message.
#[derive(Clone, Copy)]
struct Names<'a> {
    root: Option<&'a Schema>,
}

impl<'a> Names<'a> {
    fn of(root: &'a Schema) -> Self {
        Names { root: Some(root) }
    }

    fn get(&self, name: &Name) -> Option<&'a Schema> {
        fn find<'a>(schema: &'a Schema, name: &Name) -> Option<&'a Schema> {
            match schema {
                Schema::Record(record) if record.name == *name => Some(schema),
                Schema::Enum(e) if e.name == *name => Some(schema),
                Schema::Fixed(f) if f.name == *name => Some(schema),
                Schema::Record(record) => record.fields.iter().find_map(|f| find(&f.schema, name)),
                Schema::Array(a) => find(&a.items, name),
                Schema::Map(m) => find(&m.types, name),
                Schema::Union(u) => u.variants().iter().find_map(|v| find(v, name)),
                _ => None,
            }
        }
        find(self.root?, name)
    }
}

fn resolve<'a>(schema: &'a Schema, names: &Names<'a>) -> &'a Schema {
    match schema {
        Schema::Ref { name } => names.get(name).unwrap_or(schema),
        _ => schema,
    }
}

/// Steps through unions (picking the branch's schema) to the value inside.
fn avro_branch<'a>(
    mut value: AvroValue,
    mut schema: Option<&'a Schema>,
    names: &Names<'a>,
    what: &str,
) -> Result<(AvroValue, Option<&'a Schema>), DecodeError> {
    schema = schema.map(|s| resolve(s, names));
    while let AvroValue::Union(index, inner) = value {
        if let Some(Schema::Union(union)) = schema {
            let variant = usize::try_from(index)
                .ok()
                .and_then(|i| union.variants().get(i))
                .ok_or_else(|| {
                    DecodeError::Avro(format!("{what}: union branch {index} is not in the schema"))
                })?;
            schema = Some(resolve(variant, names));
        }
        value = *inner;
    }
    Ok((value, schema))
}

fn record_field_schema<'a>(schema: Option<&'a Schema>, name: &str) -> Option<&'a Schema> {
    match schema {
        Some(Schema::Record(record)) => record
            .lookup
            .get(name)
            .and_then(|&i| record.fields.get(i))
            .map(|f| &f.schema),
        _ => None,
    }
}

fn avro_kind(value: &AvroValue) -> &'static str {
    match value {
        AvroValue::Null => "null",
        AvroValue::Boolean(_) => "boolean",
        AvroValue::Int(_) => "int",
        AvroValue::Long(_) => "long",
        AvroValue::Float(_) => "float",
        AvroValue::Double(_) => "double",
        AvroValue::Bytes(_) => "bytes",
        AvroValue::String(_) => "string",
        AvroValue::Fixed(..) => "fixed",
        AvroValue::Enum(..) => "enum",
        AvroValue::Union(..) => "union",
        AvroValue::Array(_) => "array",
        AvroValue::Map(_) => "map",
        AvroValue::Record(_) => "record",
        AvroValue::Date(_) => "date",
        AvroValue::Decimal(_) | AvroValue::BigDecimal(_) => "decimal",
        AvroValue::TimeMillis(_) | AvroValue::TimeMicros(_) => "time",
        AvroValue::TimestampMillis(_)
        | AvroValue::TimestampMicros(_)
        | AvroValue::TimestampNanos(_)
        | AvroValue::LocalTimestampMillis(_)
        | AvroValue::LocalTimestampMicros(_)
        | AvroValue::LocalTimestampNanos(_) => "timestamp",
        AvroValue::Duration(_) => "duration",
        AvroValue::Uuid(_) => "uuid",
    }
}

/// Decodes one message from its key and value datums with their writer
/// schemas (see `registry`), taking their strings and bytes over. `value`
/// `None` is a tombstone.
pub fn decode_avro(
    key: AvroValue,
    key_schema: &Schema,
    value: Option<(AvroValue, &Schema)>,
) -> Result<Decoded, DecodeError> {
    let key_names = Names::of(key_schema);
    let key = match avro_branch(key, Some(key_schema), &key_names, "key")? {
        (AvroValue::Null, _) => return Err(DecodeError::MissingKey),
        (AvroValue::Record(fields), schema) => avro_row(fields, schema, &key_names)?,
        (other, _) => {
            return Err(envelope_error(format!(
                "the key is an Avro {}, expected a record",
                avro_kind(&other)
            )))
        }
    };
    let Some((value, schema)) = value else {
        return Ok(Decoded::Tombstone { key });
    };
    let names = Names::of(schema);
    let (fields, schema) = match avro_branch(value, Some(schema), &names, "value")? {
        (AvroValue::Null, _) => return Ok(Decoded::Tombstone { key }),
        (AvroValue::Record(fields), schema) => (fields, schema),
        (other, _) => {
            return Err(envelope_error(format!(
                "the value is an Avro {}, expected a record",
                avro_kind(&other)
            )))
        }
    };
    avro_envelope(fields, schema, &names)?.into_change(key)
}

/// An Avro message without a key: only a truncate event may be one.
pub fn decode_avro_keyless(value: AvroValue, schema: &Schema) -> Result<Decoded, DecodeError> {
    let names = Names::of(schema);
    match avro_branch(value, Some(schema), &names, "value")? {
        (AvroValue::Record(fields), schema) => {
            avro_envelope(fields, schema, &names)?.into_keyless_change()
        }
        _ => Err(DecodeError::MissingKey),
    }
}

fn avro_get<'v>(fields: &'v [(String, AvroValue)], name: &str) -> Option<&'v AvroValue> {
    let value = fields.iter().find(|(n, _)| n == name).map(|(_, v)| v)?;
    let mut value = value;
    while let AvroValue::Union(_, inner) = value {
        value = inner;
    }
    Some(value)
}

/// Takes a field's value out of a record (leaving a null).
fn avro_take(fields: &mut [(String, AvroValue)], name: &str) -> Option<AvroValue> {
    let (_, value) = fields.iter_mut().find(|(n, _)| n == name)?;
    Some(std::mem::replace(value, AvroValue::Null))
}

fn unwrap_unions(mut value: AvroValue) -> AvroValue {
    while let AvroValue::Union(_, inner) = value {
        value = *inner;
    }
    value
}

fn avro_envelope<'a>(
    mut fields: Vec<(String, AvroValue)>,
    schema: Option<&'a Schema>,
    names: &Names<'a>,
) -> Result<Envelope, DecodeError> {
    let op = match avro_get(&fields, "op") {
        None | Some(AvroValue::Null) => return Err(envelope_error("field `op` is missing")),
        Some(AvroValue::String(op) | AvroValue::Enum(_, op)) => parse_op(op)?,
        Some(other) => {
            return Err(envelope_error(format!(
                "field `op` is an Avro {}, expected a string",
                avro_kind(other)
            )))
        }
    };
    // Taken out, so that the images can be taken out of `fields` after it.
    let source = match avro_take(&mut fields, "source").map(unwrap_unions) {
        None | Some(AvroValue::Null) => return Err(envelope_error("field `source` is missing")),
        Some(AvroValue::Record(source)) => source,
        Some(other) => {
            return Err(envelope_error(format!(
                "field `source` is an Avro {}, expected a record",
                avro_kind(&other)
            )))
        }
    };
    let long = |name: &str, required: bool| match avro_get(&source, name) {
        None | Some(AvroValue::Null) if required => {
            Err(envelope_error(format!("field `source.{name}` is missing")))
        }
        None | Some(AvroValue::Null) => Ok(None),
        Some(AvroValue::Long(v)) => Ok(Some(*v)),
        Some(AvroValue::Int(v)) => Ok(Some(i64::from(*v))),
        Some(other) => Err(envelope_error(format!(
            "field `source.{name}` is an Avro {}, expected a long",
            avro_kind(other)
        ))),
    };
    let text = |name: &str| match avro_get(&source, name) {
        None | Some(AvroValue::Null) => {
            Err(envelope_error(format!("field `source.{name}` is missing")))
        }
        Some(AvroValue::String(s) | AvroValue::Enum(_, s)) => Ok(s.clone()),
        Some(other) => Err(envelope_error(format!(
            "field `source.{name}` is an Avro {}, expected a string",
            avro_kind(other)
        ))),
    };
    let snapshot = match avro_get(&source, "snapshot") {
        None | Some(AvroValue::Null) => false,
        Some(AvroValue::Boolean(b)) => *b,
        Some(AvroValue::String(s) | AvroValue::Enum(_, s)) => snapshot_flag(Some(s))?,
        Some(other) => {
            return Err(envelope_error(format!(
                "field `source.snapshot` is an Avro {}, expected a string or boolean",
                avro_kind(other)
            )))
        }
    };
    let mut image = |name: &str, wanted: &dyn Fn(&str) -> bool| {
        let Some(value) = avro_take(&mut fields, name) else {
            return Ok(None);
        };
        match avro_branch(value, record_field_schema(schema, name), names, name)? {
            (AvroValue::Null, _) => Ok(None),
            (AvroValue::Record(mut row), row_schema) => {
                row.retain(|(c, _)| wanted(c));
                avro_row(row, row_schema, names).map(Some)
            }
            (other, _) => Err(envelope_error(format!(
                "field `{name}` is an Avro {}, expected a record or null",
                avro_kind(&other)
            ))),
        }
    };
    let schema_name = text("schema")?;
    let table = text("table")?;
    let after = image("after", &|_| true)?;
    let before = image("before", &|c| before_wanted(op, after.as_ref(), c))?;
    Ok(Envelope {
        op,
        schema: schema_name,
        table,
        before,
        after,
        source_ts_ms: long("ts_ms", true)?.unwrap_or_default(),
        lsn: long("lsn", false)?,
        origin: match avro_get(&source, "origin") {
            Some(AvroValue::String(s)) => Some(s.clone()),
            _ => None,
        },
        snapshot,
    })
}

fn avro_row<'a>(
    fields: Vec<(String, AvroValue)>,
    schema: Option<&'a Schema>,
    names: &Names<'a>,
) -> Result<Row, DecodeError> {
    fields
        .into_iter()
        .map(|(name, value)| {
            let typed = avro_typed(
                value,
                record_field_schema(schema, &name),
                names,
                &name,
                false,
            )?;
            Ok((name, typed))
        })
        .collect()
}

/// `connect.name` where apache-avro keeps custom attributes (records, enums,
/// fixed, arrays, maps; not primitives).
fn connect_name(schema: Option<&Schema>) -> Option<Cow<'static, str>> {
    schema?
        .custom_attributes()?
        .get("connect.name")?
        .as_str()
        .map(semantic_name)
}

fn avro_typed<'a>(
    value: AvroValue,
    schema: Option<&'a Schema>,
    names: &Names<'a>,
    column: &str,
    in_array: bool,
) -> Result<Typed, DecodeError> {
    let (value, schema) = avro_branch(value, schema, names, column)?;
    let inferred = |name: &'static str| Some(connect_name(schema).unwrap_or(Cow::Borrowed(name)));
    let placeholder = |bytes: &[u8]| !in_array && bytes == UNAVAILABLE_PLACEHOLDER.as_bytes();
    let (field, semantic) = match value {
        AvroValue::Null => (Field::Null, connect_name(schema)),
        AvroValue::Boolean(b) => (Field::Bool(b), connect_name(schema)),
        AvroValue::Int(i) => (Field::Int(i64::from(i)), connect_name(schema)),
        AvroValue::Long(i) => (Field::Int(i), connect_name(schema)),
        AvroValue::Float(f) => (Field::Float(f64::from(f)), connect_name(schema)),
        AvroValue::Double(f) => (Field::Float(f), connect_name(schema)),
        AvroValue::String(s) if !in_array && s == UNAVAILABLE_PLACEHOLDER => {
            (Field::Unavailable, None)
        }
        AvroValue::String(s) => (Field::String(s), connect_name(schema)),
        AvroValue::Bytes(b) | AvroValue::Fixed(_, b) if placeholder(&b) => {
            (Field::Unavailable, None)
        }
        AvroValue::Bytes(b) | AvroValue::Fixed(_, b) => (Field::Bytes(b), connect_name(schema)),
        AvroValue::Enum(_, symbol) => (Field::String(symbol), inferred(ENUM)),
        AvroValue::Uuid(uuid) => (Field::String(uuid.to_string()), inferred(UUID)),
        AvroValue::Date(days) => (Field::Int(i64::from(days)), inferred(DATE)),
        AvroValue::TimeMillis(t) => (Field::Int(i64::from(t)), inferred(TIME)),
        AvroValue::TimeMicros(t) => (Field::Int(t), inferred(MICRO_TIME)),
        AvroValue::TimestampMillis(t) | AvroValue::LocalTimestampMillis(t) => {
            (Field::Int(t), inferred(TIMESTAMP))
        }
        AvroValue::TimestampMicros(t) | AvroValue::LocalTimestampMicros(t) => {
            (Field::Int(t), inferred(MICRO_TIMESTAMP))
        }
        AvroValue::TimestampNanos(t) | AvroValue::LocalTimestampNanos(t) => {
            (Field::Int(t), inferred(NANO_TIMESTAMP))
        }
        AvroValue::Decimal(decimal) => {
            let unscaled = Vec::<u8>::try_from(&decimal)
                .map_err(|e| column_error(column, format!("Avro decimal: {e}")))?;
            if placeholder(&unscaled) {
                (Field::Unavailable, None)
            } else {
                let scale = match schema {
                    Some(Schema::Decimal(d)) => u32::try_from(d.scale).map_err(|_| {
                        column_error(column, format!("decimal scale {} is too large", d.scale))
                    })?,
                    _ => {
                        return Err(column_error(
                            column,
                            "Avro decimal value without a decimal schema",
                        ))
                    }
                };
                (Field::Decimal { unscaled, scale }, inferred(DECIMAL))
            }
        }
        // Not emitted by Debezium; its text is valid numeric input.
        AvroValue::BigDecimal(d) => (Field::String(d.to_string()), None),
        AvroValue::Duration(d) => (
            Field::String(format!(
                "{} months {} days {} milliseconds",
                u32::from(d.months()),
                u32::from(d.days()),
                u32::from(d.millis())
            )),
            None,
        ),
        AvroValue::Array(items) => {
            let is_placeholder = |item: &AvroValue| {
                let mut item = item;
                while let AvroValue::Union(_, inner) = item {
                    item = inner;
                }
                matches!(item, AvroValue::String(s) if s == UNAVAILABLE_PLACEHOLDER)
            };
            if !in_array && is_placeholder_list(&items, is_placeholder) {
                (Field::Unavailable, None)
            } else {
                let item_schema = match schema {
                    Some(Schema::Array(a)) => Some(a.items.as_ref()),
                    _ => None,
                };
                let items = items
                    .into_iter()
                    .map(|item| avro_typed(item, item_schema, names, column, true).map(|t| t.field))
                    .collect::<Result<_, _>>()?;
                (Field::Array(items), connect_name(schema))
            }
        }
        AvroValue::Record(ref fields) => {
            let semantic = connect_name(schema).or_else(|| match schema {
                Some(Schema::Record(r)) => Some(Cow::Owned(r.name.fullname(None))),
                _ => None,
            });
            let is_vsd = semantic.as_deref() == Some(VARIABLE_SCALE_DECIMAL)
                || (fields.len() == 2
                    && avro_get(fields, "scale").is_some()
                    && avro_get(fields, "value").is_some());
            if is_vsd {
                (avro_variable_scale_decimal(fields, column)?, semantic)
            } else {
                (avro_json(value, column)?, semantic)
            }
        }
        AvroValue::Map(_) => (avro_json(value, column)?, connect_name(schema)),
        // avro_branch stepped through every union.
        AvroValue::Union(..) => return Err(column_error(column, "nested Avro union")),
    };
    Ok(Typed { field, semantic })
}

fn avro_json(value: AvroValue, column: &str) -> Result<Field, DecodeError> {
    Json::try_from(value)
        .map(Field::Json)
        .map_err(|e| column_error(column, format!("Avro value has no JSON form: {e}")))
}

fn avro_variable_scale_decimal(
    fields: &[(String, AvroValue)],
    column: &str,
) -> Result<Field, DecodeError> {
    let scale = match avro_get(fields, "scale") {
        Some(AvroValue::Int(s)) => i64::from(*s),
        Some(AvroValue::Long(s)) => *s,
        _ => {
            return Err(column_error(
                column,
                "VariableScaleDecimal has no integer `scale`",
            ))
        }
    };
    let scale = u32::try_from(scale).map_err(|_| {
        column_error(
            column,
            format!("VariableScaleDecimal scale {scale} is negative or too large"),
        )
    })?;
    let unscaled = match avro_get(fields, "value") {
        Some(AvroValue::Bytes(b) | AvroValue::Fixed(_, b)) => b.clone(),
        _ => {
            return Err(column_error(
                column,
                "VariableScaleDecimal has no bytes `value`",
            ))
        }
    };
    Ok(Field::Decimal { unscaled, scale })
}

// ------------------------------------------------------------ PG text ----

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
            return PgType {
                name: name.to_owned(),
                kind: PgKind::Array(Box::new(PgType::parse(element))),
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
            b if b.starts_with("interval") => PgKind::Interval,
            _ => PgKind::Text,
        };
        PgType {
            name: name.to_owned(),
            kind,
        }
    }
}

/// Errors from rendering carry no column name: the caller knows it (see
/// [`DecodeError::for_column`]).
fn render_error(problem: impl Into<String>) -> DecodeError {
    column_error("", problem)
}

impl Typed {
    /// Renders the value as PostgreSQL text input for a column of type
    /// `pg_type` (as `format_type` prints it); `None` for SQL NULL.
    /// Fails on [`Field::Unavailable`]: the caller substitutes the stored
    /// value first.
    pub fn to_pg_text(&self, pg_type: &str) -> Result<Option<String>, DecodeError> {
        self.to_pg_text_as(&PgType::parse(pg_type))
    }

    /// [`Typed::to_pg_text`] for a type parsed beforehand (per column, not
    /// per value).
    pub fn to_pg_text_as(&self, ty: &PgType) -> Result<Option<String>, DecodeError> {
        match &self.field {
            Field::Null => Ok(None),
            field => render(field, self.semantic.as_deref(), ty).map(Some),
        }
    }

    /// As [`Typed::to_pg_text_as`], taking the value: a text that is its
    /// own rendering (`render_string` changes only bytea's and numeric's)
    /// is moved, not copied.
    pub fn into_pg_text_as(self, ty: &PgType) -> Result<Option<String>, DecodeError> {
        match (self.field, &ty.kind) {
            (Field::String(s), kind) if !matches!(kind, PgKind::Bytea | PgKind::Numeric { .. }) => {
                Ok(Some(s))
            }
            (field, _) => Typed {
                field,
                semantic: self.semantic,
            }
            .to_pg_text_as(ty),
        }
    }
}

fn render(field: &Field, semantic: Option<&str>, ty: &PgType) -> Result<String, DecodeError> {
    if let PgKind::Array(element) = &ty.kind {
        return render_array(field, element, ty);
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
                    Some(_) => Err(render_error(format!(
                        "{text} is not an integer for type {}",
                        ty.name
                    ))),
                }
            }
            _ => decimal_text(unscaled, *scale),
        },
        Field::Json(value) => Ok(value.to_string()),
        Field::Array(_) => Err(render_error(format!(
            "an array value cannot be written to a column of type {}",
            ty.name
        ))),
    }
}

fn render_array(field: &Field, element: &PgType, ty: &PgType) -> Result<String, DecodeError> {
    match field {
        Field::Array(items) => array_literal(items, element),
        // Already PostgreSQL's array text.
        Field::String(s) => Ok(s.clone()),
        Field::Json(Json::Array(items)) => {
            let items = items
                .iter()
                .map(|item| json_plain(item, "", true))
                .collect::<Result<Vec<_>, _>>()?;
            array_literal(&items, element)
        }
        Field::Null | Field::Unavailable => render(field, None, element),
        _ => Err(render_error(format!(
            "a scalar value cannot be written to a column of type {}",
            ty.name
        ))),
    }
}

/// `{"a","b,c",NULL}`: every element quoted, so no element text needs
/// PostgreSQL's rules for when quoting is required.
fn array_literal(items: &[Field], element: &PgType) -> Result<String, DecodeError> {
    let mut out = String::from("{");
    for (i, item) in items.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        match item {
            Field::Null => out.push_str("NULL"),
            Field::Array(inner) => out.push_str(&array_literal(inner, element)?),
            item => {
                let text = render(item, None, element)?;
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

fn render_int(i: i64, semantic: Option<&str>, ty: &PgType) -> Result<String, DecodeError> {
    let i = i128::from(i);
    match ty.kind {
        PgKind::Date => {
            let days = match semantic {
                Some(TIMESTAMP | MICRO_TIMESTAMP | NANO_TIMESTAMP | CONNECT_TIMESTAMP) => {
                    instant_micros(i, semantic, None).div_euclid(MICROS_PER_DAY)
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
) -> Result<i128, DecodeError> {
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

fn time_text(micros: i128) -> Result<String, DecodeError> {
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

fn timestamp_text(micros: i128, zone: &str) -> Result<String, DecodeError> {
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
fn civil_date(days: i128) -> Result<(String, bool), DecodeError> {
    let mut out = String::with_capacity(10);
    let bc = push_civil_date(&mut out, days)?;
    Ok((out, bc))
}

/// Appends [`civil_date`]'s text; returns whether the date is BC.
fn push_civil_date(out: &mut String, days: i128) -> Result<bool, DecodeError> {
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

fn render_string(s: &str, ty: &PgType) -> Result<String, DecodeError> {
    match ty.kind {
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
                render_error(format!(
                    "{s:?} is neither a number nor a base64 decimal for type {}",
                    ty.name
                ))
            })?;
            let scale = scale.ok_or_else(|| {
                render_error(format!(
                    "base64 decimal {s:?} for type {} that has no scale: the scale is unknown",
                    ty.name
                ))
            })?;
            decimal_text(&bytes, scale)
        }
        _ => Ok(s.to_owned()),
    }
}

fn render_bytes(bytes: &[u8], ty: &PgType) -> Result<String, DecodeError> {
    match ty.kind {
        PgKind::Bytea => Ok(hex_bytea(bytes)),
        PgKind::Numeric { scale: Some(scale) } => decimal_text(bytes, scale),
        PgKind::Numeric { scale: None } => Err(render_error(format!(
            "bytes for type {} that has no scale: the scale is unknown",
            ty.name
        ))),
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
        _ => String::from_utf8(bytes.to_vec()).map_err(|_| {
            render_error(format!(
                "bytes that are not UTF-8 cannot be written to a column of type {}",
                ty.name
            ))
        }),
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
fn decimal_text(unscaled: &[u8], scale: u32) -> Result<String, DecodeError> {
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
    use super::*;
    use serde_json::json;

    const PLACEHOLDER_B64: &str = UNAVAILABLE_BASE64;

    fn typed(field: Field, semantic: Option<&str>) -> Typed {
        Typed {
            field,
            semantic: semantic.map(|s| Cow::Owned(s.to_owned())),
        }
    }

    fn plain(field: Field) -> Typed {
        typed(field, None)
    }

    fn text(field: Field, semantic: Option<&str>, pg_type: &str) -> Option<String> {
        typed(field, semantic).to_pg_text(pg_type).unwrap()
    }

    fn change(decoded: Decoded) -> Change {
        match decoded {
            Decoded::Change(c) => c,
            other => panic!("expected a change, got {other:?}"),
        }
    }

    fn envelope_problem(result: Result<Decoded, DecodeError>) -> String {
        match result {
            Err(DecodeError::Envelope(problem)) => problem,
            other => panic!("expected an envelope error, got {other:?}"),
        }
    }

    fn source() -> serde_json::Value {
        json!({"version": "3.6.1.Final", "connector": "postgresql", "name": "cdc",
               "ts_ms": 1795813071636i64, "snapshot": "false", "db": "app",
               "sequence": "[\"26864688\",\"26864688\"]", "schema": "public",
               "table": "users", "txId": 998, "lsn": 26864688, "xmin": null, "origin": null})
    }

    const KEY: &[u8] = br#"{"schema":{"type":"struct","fields":[{"type":"int64","optional":false,"field":"id"}],"optional":false,"name":"cdc.public.users.Key"},"payload":{"id":1}}"#;

    fn users_row_schema(field: &str) -> serde_json::Value {
        json!({"type": "struct", "optional": true, "name": "cdc.public.users.Value", "field": field,
        "fields": [
          {"type": "int64", "optional": false, "field": "id"},
          {"type": "string", "optional": false, "field": "email"},
          {"type": "string", "optional": true, "field": "display_name"},
          {"type": "string", "optional": false, "name": "io.debezium.data.Enum", "version": 1,
           "parameters": {"allowed": "active,suspended,closed"}, "default": "active", "field": "status"},
          {"type": "int32", "optional": true, "field": "age"},
          {"type": "bytes", "optional": true, "name": "org.apache.kafka.connect.data.Decimal", "version": 1,
           "parameters": {"scale": "2", "connect.decimal.precision": "12"}, "field": "balance"},
          {"type": "struct", "fields": [{"type": "int32", "optional": false, "field": "scale"},
                                        {"type": "bytes", "optional": false, "field": "value"}],
           "optional": true, "name": "io.debezium.data.VariableScaleDecimal", "version": 1,
           "doc": "Variable scaled decimal", "field": "lifetime"},
          {"type": "float64", "optional": true, "field": "score"},
          {"type": "boolean", "optional": true, "field": "verified"},
          {"type": "string", "optional": true, "name": "io.debezium.data.Uuid", "version": 1, "field": "external_id"},
          {"type": "string", "optional": true, "name": "io.debezium.data.Json", "version": 1, "field": "profile"},
          {"type": "array", "items": {"type": "string", "optional": true}, "optional": true, "field": "tags"},
          {"type": "bytes", "optional": true, "field": "avatar"},
          {"type": "string", "optional": true, "field": "bio"},
          {"type": "int32", "optional": true, "name": "io.debezium.time.Date", "version": 1, "field": "birth_date"},
          {"type": "int64", "optional": true, "name": "io.debezium.time.MicroTimestamp", "version": 1, "field": "last_login"},
          {"type": "string", "optional": false, "name": "io.debezium.time.ZonedTimestamp", "version": 1,
           "default": "1970-01-01T00:00:00.000000Z", "field": "created_at"},
          {"type": "string", "optional": true, "field": "home_region"},
          {"type": "int64", "optional": false, "default": 0, "field": "hlc"},
          {"type": "string", "optional": false, "default": "", "field": "origin_region"}
        ]})
    }

    fn users_envelope_schema() -> serde_json::Value {
        json!({"type": "struct", "optional": false, "name": "cdc.public.users.Envelope", "version": 2,
        "fields": [
          users_row_schema("before"),
          users_row_schema("after"),
          {"type": "struct", "fields": [{"type": "int64", "optional": false, "field": "ts_ms"}],
           "optional": false, "name": "io.debezium.connector.postgresql.Source", "field": "source"},
          {"type": "string", "optional": false, "field": "op"},
          {"type": "int64", "optional": true, "field": "ts_ms"}
        ]})
    }

    fn users_after() -> serde_json::Value {
        json!({"id": 1, "email": "a@x", "display_name": "Ann", "status": "active", "age": 42,
               "balance": "MDk=", "lifetime": {"scale": 1, "value": "AQ=="}, "score": 2.5,
               "verified": true, "external_id": "0b4c8f4e-8f4a-4a4e-9a39-3a7a0c7c2f11",
               "profile": "{\"theme\":\"dark\"}", "tags": ["a", null], "avatar": "AQL/",
               "bio": "hello", "birth_date": 10956, "last_login": 1709212455123456i64,
               "created_at": "2024-02-29T11:14:15.654321Z", "home_region": "eu",
               "hlc": 7, "origin_region": "us"})
    }

    fn with_schema(op: &str, before: serde_json::Value, after: serde_json::Value) -> Vec<u8> {
        json!({"schema": users_envelope_schema(),
               "payload": {"before": before, "after": after, "source": source(),
                           "transaction": null, "op": op, "ts_ms": 1795813071723i64}})
        .to_string()
        .into_bytes()
    }

    fn schemaless(op: &str, before: serde_json::Value, after: serde_json::Value) -> Vec<u8> {
        json!({"before": before, "after": after, "source": source(), "op": op, "ts_ms": 1})
            .to_string()
            .into_bytes()
    }

    /// The users columns with their PostgreSQL types (as `format_type`
    /// prints them) and the text expected for `users_after()`.
    const USERS_TEXT: &[(&str, &str, &str)] = &[
        ("id", "bigint", "1"),
        ("email", "character varying(320)", "a@x"),
        ("display_name", "text", "Ann"),
        ("status", "user_status", "active"),
        ("age", "integer", "42"),
        ("balance", "numeric(12,2)", "123.45"),
        ("lifetime", "numeric", "0.1"),
        ("score", "double precision", "2.5"),
        ("verified", "boolean", "true"),
        (
            "external_id",
            "uuid",
            "0b4c8f4e-8f4a-4a4e-9a39-3a7a0c7c2f11",
        ),
        ("profile", "jsonb", "{\"theme\":\"dark\"}"),
        ("tags", "text[]", "{\"a\",NULL}"),
        ("avatar", "bytea", "\\x0102ff"),
        ("bio", "text", "hello"),
        ("birth_date", "date", "1999-12-31"),
        (
            "last_login",
            "timestamp without time zone",
            "2024-02-29 13:14:15.123456",
        ),
        (
            "created_at",
            "timestamp with time zone",
            "2024-02-29T11:14:15.654321Z",
        ),
        ("home_region", "text", "eu"),
        ("hlc", "bigint", "7"),
        ("origin_region", "text", "us"),
    ];

    fn assert_users_text(row: &Row) {
        assert_eq!(row.len(), USERS_TEXT.len());
        for (column, pg_type, expected) in USERS_TEXT {
            let value = row
                .get(*column)
                .unwrap_or_else(|| panic!("no column {column}"));
            assert_eq!(
                value.to_pg_text(pg_type).unwrap().as_deref(),
                Some(*expected),
                "column {column} ({value:?})"
            );
        }
    }

    #[test]
    fn every_op_decodes() {
        let row = json!({"id": 1});
        for (op, expected) in [
            ("c", Op::Create),
            ("u", Op::Update),
            ("d", Op::Delete),
            ("r", Op::Read),
            ("t", Op::Truncate),
        ] {
            let (before, after) = match expected {
                Op::Delete => (row.clone(), json!(null)),
                Op::Truncate => (json!(null), json!(null)),
                _ => (row.clone(), row.clone()),
            };
            let c = change(decode_json(Some(KEY), Some(&schemaless(op, before, after))).unwrap());
            assert_eq!(c.op, expected);
            if expected == Op::Truncate {
                assert_eq!((c.before, c.after), (None, None));
            }
        }
    }

    #[test]
    fn framing_null_schema_null_payload_and_repeated_keys() {
        let payload = schemaless("c", json!(null), json!({"id": 1}));
        let payload: Json = serde_json::from_slice(&payload).unwrap();
        // `schema: null` (schemaless data with schemas.enable): the payload.
        let value = serde_json::to_vec(&json!({"schema": null, "payload": payload})).unwrap();
        assert_eq!(
            change(decode_json(Some(KEY), Some(&value)).unwrap()).op,
            Op::Create
        );
        // `payload: null`: a tombstone.
        let value = br#"{"schema": {"type": "struct"}, "payload": null}"#;
        assert!(matches!(
            decode_json(Some(KEY), Some(value)),
            Ok(Decoded::Tombstone { .. })
        ));
        // A repeated key: the last one counts, as before.
        let value = format!(r#"{{"schema": null, "payload": null, "payload": {payload}}}"#);
        assert_eq!(
            change(decode_json(Some(KEY), Some(value.as_bytes())).unwrap()).op,
            Op::Create
        );
        // A two-element array is not a schema/payload pair.
        let value = format!(r#"[null, {payload}]"#);
        assert!(decode_json(Some(KEY), Some(value.as_bytes())).is_err());
    }

    #[test]
    fn members_are_read_as_a_parsed_object_reads_them() {
        let source = source().to_string();
        let decode = |value: &str| decode_json(Some(KEY), Some(value.as_bytes()));
        // Escaped member names, whitespace, and a repeated member (the last
        // one counts, in the envelope and in a row).
        let value = format!(
            r#"{{ "op" : "c", "after": {{"id": 1}}, "s\u006furce": {source},
                 "after" : {{"id": 2, "n\u0061me": "x", "name": "y"}}, "ts_ms": 1 }}"#
        );
        let c = change(decode(&value).unwrap());
        let after = c.after.unwrap();
        assert_eq!(after.get("id").unwrap().field, Field::Int(2));
        assert_eq!(after.get("name").unwrap().field, Field::String("y".into()));
        assert_eq!(after.len(), 2);
        // The last image counts even where it is null.
        let value =
            format!(r#"{{"op": "c", "after": {{"id": 1}}, "after": null, "source": {source}}}"#);
        assert!(envelope_problem(decode(&value)).contains("has no `after` row image"));
        // A row image that is not an object, and one that is broken.
        let value = format!(r#"{{"op": "c", "after": [1], "source": {source}}}"#);
        assert!(envelope_problem(decode(&value)).contains("`after` is an array"));
        let value = format!(r#"{{"op": "c", "after": {{"id": 1,}}, "source": {source}}}"#);
        assert!(matches!(decode(&value), Err(DecodeError::Json(_))));
        // Valid JSON whose number does not fit: an error naming the place.
        let value = r#"{"op": "c", "after": {"id": 1}, "source": {"ts_ms": 1e400}}"#;
        assert!(envelope_problem(decode(value)).contains("field `source.ts_ms`"));
        let value = format!(r#"{{"op": "c", "after": {{"id": 1e400}}, "source": {source}}}"#);
        assert!(matches!(
            decode(&value),
            Err(DecodeError::Column { column, .. }) if column == "id"
        ));
    }

    #[test]
    fn an_updates_before_image_keeps_what_the_apply_reads() {
        let before =
            json!({"id": 1, "email": "old@x", "bio": "kept", "hlc": 6, "origin_region": "us"});
        let after = json!({"id": 1, "email": "new@x", "bio": UNAVAILABLE_PLACEHOLDER,
                           "hlc": 7, "origin_region": "us"});
        let c =
            change(decode_json(Some(KEY), Some(&schemaless("u", before.clone(), after))).unwrap());
        let kept = c.before.unwrap();
        assert_eq!(
            kept.keys().map(String::as_str).collect::<Vec<_>>(),
            ["bio", "hlc", "origin_region"]
        );
        assert_eq!(kept["bio"].field, Field::String("kept".into()));
        assert_eq!(kept["hlc"].field, Field::Int(6));
        // A delete's before image is whole: it names the row to delete.
        let c =
            change(decode_json(Some(KEY), Some(&schemaless("d", before, json!(null)))).unwrap());
        assert_eq!(c.before.unwrap().len(), 5);
    }

    /// JsonConverter's own layout: compact, the schema first.
    fn converter_layout(schema: &Json, payload: &str) -> Vec<u8> {
        format!(r#"{{"schema":{schema},"payload":{payload}}}"#).into_bytes()
    }

    #[test]
    fn a_known_schema_text_skips_the_schema_and_decodes_the_same() {
        let schema = users_envelope_schema();
        let payload = json!({"before": null, "after": users_after(), "source": source(),
                             "transaction": null, "op": "c", "ts_ms": 1i64})
        .to_string();
        let value = converter_layout(&schema, &payload);
        // A schema text not seen before on this thread: the general way.
        let first = change(decode_json(Some(KEY), Some(&value)).unwrap());
        let (fast_payload, fast_schema) = parse_known_framed(&value).expect("the fast path");
        assert_eq!(fast_payload, payload);
        assert_eq!(fast_schema.json, schema);
        let again = change(decode_json(Some(KEY), Some(&value)).unwrap());
        assert_eq!(format!("{first:?}"), format!("{again:?}"));
        assert_users_text(again.after.as_ref().unwrap());

        // After the known schema: a payload of null is a tombstone; trailing
        // bytes, a repeated key or a broken payload take the general way,
        // which decides as it always did.
        let value = converter_layout(&schema, "null");
        assert!(matches!(
            decode_json(Some(KEY), Some(&value)),
            Ok(Decoded::Tombstone { .. })
        ));
        let mut trailing = converter_layout(&schema, &payload);
        trailing.extend_from_slice(b"x");
        assert!(parse_known_framed(&trailing).is_none());
        assert!(decode_json(Some(KEY), Some(&trailing)).is_err());
        let repeated = format!(r#"{{"schema":{schema},"payload":{payload},"payload":null}}"#);
        assert!(matches!(
            decode_json(Some(KEY), Some(repeated.as_bytes())),
            Ok(Decoded::Tombstone { .. })
        ));
        let broken = converter_layout(&schema, &payload[..payload.len() - 1]);
        assert!(matches!(
            decode_json(Some(KEY), Some(&broken)),
            Err(DecodeError::Json(_))
        ));
        // A longer schema that starts like the known one is not mistaken
        // for it: the known text is a whole JSON value.
        let mut other = schema.clone();
        other["name"] = json!("another.Envelope");
        let value = converter_layout(&other, &payload);
        let decoded = change(decode_json(Some(KEY), Some(&value)).unwrap());
        assert_eq!(format!("{decoded:?}"), format!("{first:?}"));
    }

    #[test]
    fn only_a_truncate_may_come_without_a_key() {
        let truncate = schemaless("t", json!(null), json!(null));
        let c = change(decode_json(None, Some(&truncate)).unwrap());
        assert_eq!((c.op, c.key.len()), (Op::Truncate, 0));
        let create = schemaless("c", json!(null), json!({"id": 1}));
        assert_eq!(
            decode_json(None, Some(&create)),
            Err(DecodeError::MissingKey)
        );

        let schema = users_value_schema();
        let value = round_trip(avro_envelope_value("t", none(), none(), "false"), &schema);
        let c = change(decode_avro_keyless(value.clone(), &schema).unwrap());
        assert_eq!(c.op, Op::Truncate);
        let value = round_trip(
            avro_envelope_value(
                "d",
                some(avro_users_row(none(), none(), none())),
                none(),
                "false",
            ),
            &schema,
        );
        assert_eq!(
            decode_avro_keyless(value.clone(), &schema),
            Err(DecodeError::MissingKey)
        );
    }

    #[test]
    fn json_with_schemas_decodes_every_users_type() {
        let value = with_schema("c", json!(null), users_after());
        let c = change(decode_json(Some(KEY), Some(&value)).unwrap());
        assert_eq!(c.op, Op::Create);
        assert_eq!((c.schema.as_str(), c.table.as_str()), ("public", "users"));
        assert_eq!(c.source_ts_ms, 1795813071636);
        assert_eq!(c.lsn, Some(26864688));
        assert_eq!(c.origin, None, "no replication origin on a local write");
        assert!(!c.snapshot);
        assert_eq!(c.before, None);
        assert_eq!(c.key.get("id"), Some(&plain(Field::Int(1))));
        let after = c.after.unwrap();
        let get = |name: &str| after.get(name).unwrap().clone();
        assert_eq!(
            get("status"),
            typed(Field::String("active".into()), Some(ENUM))
        );
        assert_eq!(
            get("balance"),
            typed(
                Field::Decimal {
                    unscaled: vec![0x30, 0x39],
                    scale: 2
                },
                Some(DECIMAL)
            )
        );
        assert_eq!(
            get("lifetime"),
            typed(
                Field::Decimal {
                    unscaled: vec![1],
                    scale: 1
                },
                Some(VARIABLE_SCALE_DECIMAL)
            )
        );
        assert_eq!(get("score"), plain(Field::Float(2.5)));
        assert_eq!(get("verified"), plain(Field::Bool(true)));
        assert_eq!(
            get("tags"),
            plain(Field::Array(vec![Field::String("a".into()), Field::Null]))
        );
        assert_eq!(get("avatar"), plain(Field::Bytes(vec![1, 2, 0xff])));
        assert_eq!(get("birth_date"), typed(Field::Int(10956), Some(DATE)));
        assert_eq!(
            get("last_login"),
            typed(Field::Int(1709212455123456), Some(MICRO_TIMESTAMP))
        );
        assert_eq!(
            get("created_at").semantic.as_deref(),
            Some("io.debezium.time.ZonedTimestamp")
        );
        assert_eq!(
            get("profile").semantic.as_deref(),
            Some("io.debezium.data.Json")
        );
        assert_eq!(get("external_id").semantic.as_deref(), Some(UUID));
        assert_users_text(&after);
    }

    #[test]
    fn json_without_schemas_decodes_by_shape() {
        let key = br#"{"id":1}"#;
        let value = schemaless("u", users_after(), users_after());
        let c = change(decode_json(Some(key), Some(&value)).unwrap());
        assert_eq!(c.op, Op::Update);
        assert_eq!(c.key.get("id"), Some(&plain(Field::Int(1))));
        let after = c.after.unwrap();
        assert!(after.values().all(|t| t.semantic.is_none()));
        assert_eq!(
            after.get("balance"),
            Some(&plain(Field::String("MDk=".into())))
        );
        assert_eq!(
            after.get("lifetime"),
            Some(&plain(Field::Decimal {
                unscaled: vec![1],
                scale: 1
            }))
        );
        assert_eq!(after.get("score"), Some(&plain(Field::Float(2.5))));
        assert_eq!(after.get("birth_date"), Some(&plain(Field::Int(10956))));
        assert_users_text(&after);
        // Of a create's before image only the version is decoded.
        let version = |row: &Row| VERSION_COLUMNS.map(|c| row.get(c).cloned());
        assert_eq!(c.before.as_ref().map(|b| b.len()), Some(2));
        assert_eq!(version(c.before.as_ref().unwrap()), version(&after));
        // An object that is not a VariableScaleDecimal stays JSON.
        let value = schemaless("c", json!(null), json!({"id": 1, "doc": {"a": 1}}));
        let after = change(decode_json(Some(key), Some(&value)).unwrap())
            .after
            .unwrap();
        assert_eq!(after.get("doc"), Some(&plain(Field::Json(json!({"a": 1})))));
        assert_eq!(
            after
                .get("doc")
                .unwrap()
                .to_pg_text("jsonb")
                .unwrap()
                .as_deref(),
            Some(r#"{"a":1}"#)
        );
    }

    #[test]
    fn tombstones_and_keys() {
        let tombstone = decode_json(Some(KEY), None).unwrap();
        let mut key = Row::new();
        key.insert("id".into(), plain(Field::Int(1)));
        assert_eq!(tombstone, Decoded::Tombstone { key: key.clone() });
        assert_eq!(
            decode_json(Some(KEY), Some(b"null")).unwrap(),
            Decoded::Tombstone { key }
        );
        // Without a key the envelope must say it is a truncate; `{}` says nothing.
        assert!(matches!(
            decode_json(None, Some(b"{}")),
            Err(DecodeError::Envelope(_))
        ));
        assert_eq!(decode_json(None, None), Err(DecodeError::MissingKey));
        assert_eq!(
            decode_json(Some(b"null"), None),
            Err(DecodeError::MissingKey)
        );
        assert!(envelope_problem(decode_json(Some(b"[1]"), None)).contains("key is an array"));
        assert!(
            matches!(decode_json(Some(b"{"), None), Err(DecodeError::Json(m)) if m.starts_with("key:"))
        );
    }

    #[test]
    fn malformed_json_is_an_error() {
        assert!(matches!(
            decode_json(Some(KEY), Some(b"not json")),
            Err(DecodeError::Json(m)) if m.starts_with("value:")
        ));
        let value = with_schema("c", json!(null), users_after());
        let truncated = value.get(..value.len() / 2).unwrap();
        assert!(matches!(
            decode_json(Some(KEY), Some(truncated)),
            Err(DecodeError::Json(_))
        ));
        assert!(envelope_problem(decode_json(Some(KEY), Some(b"42"))).contains("a number"));
    }

    fn with_payload(edit: impl FnOnce(&mut serde_json::Map<String, serde_json::Value>)) -> Vec<u8> {
        let mut doc: serde_json::Value =
            serde_json::from_slice(&with_schema("c", json!(null), users_after())).unwrap();
        edit(doc.get_mut("payload").unwrap().as_object_mut().unwrap());
        doc.to_string().into_bytes()
    }

    fn source_mut(
        payload: &mut serde_json::Map<String, serde_json::Value>,
    ) -> &mut serde_json::Map<String, serde_json::Value> {
        payload.get_mut("source").unwrap().as_object_mut().unwrap()
    }

    #[test]
    fn envelope_errors_name_the_part() {
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (
                with_payload(|p| drop(p.remove("op"))),
                "field `op` is missing",
            ),
            (
                with_payload(|p| drop(p.insert("op".into(), json!(1)))),
                "field `op` is a number",
            ),
            (
                with_payload(|p| drop(p.remove("source"))),
                "field `source` is missing",
            ),
            (
                with_payload(|p| drop(p.insert("source".into(), json!("x")))),
                "field `source` is a string",
            ),
            (
                with_payload(|p| drop(source_mut(p).insert("ts_ms".into(), json!("1")))),
                "field `source.ts_ms` is a string, expected an integer",
            ),
            (
                with_payload(|p| drop(source_mut(p).remove("ts_ms"))),
                "field `source.ts_ms` is missing",
            ),
            (
                with_payload(|p| drop(source_mut(p).remove("table"))),
                "field `source.table` is missing",
            ),
            (
                with_payload(|p| drop(source_mut(p).insert("schema".into(), json!(3)))),
                "field `source.schema` is a number",
            ),
            (
                with_payload(|p| drop(source_mut(p).insert("lsn".into(), json!("x")))),
                "field `source.lsn` is a string",
            ),
            (
                with_payload(|p| drop(source_mut(p).insert("snapshot".into(), json!("maybe")))),
                "field `source.snapshot` has unknown value",
            ),
            (
                with_payload(|p| drop(p.insert("after".into(), json!([])))),
                "field `after` is an array",
            ),
            (
                with_payload(|p| drop(p.insert("after".into(), json!(null)))),
                "has no `after` row image",
            ),
            (
                with_payload(|p| drop(p.insert("op".into(), json!("d")))),
                "has no `before` row image",
            ),
        ];
        for (value, expected) in cases {
            let problem = envelope_problem(decode_json(Some(KEY), Some(&value)));
            assert!(problem.contains(expected), "{problem:?} lacks {expected:?}");
        }
        let unknown = with_payload(|p| drop(p.insert("op".into(), json!("m"))));
        assert_eq!(
            decode_json(Some(KEY), Some(&unknown)),
            Err(DecodeError::UnknownOp("m".into()))
        );
        // A column whose value contradicts its schema names the column.
        let mut after = users_after();
        after["age"] = json!("old");
        let err = decode_json(Some(KEY), Some(&with_schema("c", json!(null), after))).unwrap_err();
        assert!(
            matches!(&err, DecodeError::Column { column, .. } if column == "age"),
            "{err}"
        );
    }

    #[test]
    fn snapshot_and_lsn_variants() {
        for (snapshot, expected) in [
            (json!("false"), false),
            (json!(false), false),
            (json!(null), false),
            (json!("true"), true),
            (json!(true), true),
            (json!("last"), true),
            (json!("first"), true),
            (json!("first_in_data_collection"), true),
            (json!("last_in_data_collection"), true),
        ] {
            let value = with_payload(|p| drop(source_mut(p).insert("snapshot".into(), snapshot)));
            assert_eq!(
                change(decode_json(Some(KEY), Some(&value)).unwrap()).snapshot,
                expected
            );
        }
        let value = with_payload(|p| {
            let source = source_mut(p);
            source.remove("snapshot");
            source.insert("lsn".into(), json!(null));
        });
        let c = change(decode_json(Some(KEY), Some(&value)).unwrap());
        assert_eq!((c.snapshot, c.lsn), (false, None));

        // A change applied under a replication origin names it.
        let value = with_payload(|p| {
            source_mut(p).insert("origin".into(), json!("regionsync_4242"));
        });
        let c = change(decode_json(Some(KEY), Some(&value)).unwrap());
        assert_eq!(c.origin.as_deref(), Some("regionsync_4242"));
    }

    #[test]
    fn unavailable_placeholder_forms() {
        assert_eq!(BASE64.encode(UNAVAILABLE_PLACEHOLDER), PLACEHOLDER_B64);
        let mut after = users_after();
        after["bio"] = json!(UNAVAILABLE_PLACEHOLDER);
        after["profile"] = json!(UNAVAILABLE_PLACEHOLDER);
        after["avatar"] = json!(PLACEHOLDER_B64);
        after["tags"] = json!([UNAVAILABLE_PLACEHOLDER]);
        for value in [
            with_schema("u", users_after(), after.clone()),
            schemaless("u", users_after(), after.clone()),
        ] {
            let row = change(decode_json(Some(KEY), Some(&value)).unwrap())
                .after
                .unwrap();
            for column in ["bio", "profile", "avatar", "tags"] {
                assert_eq!(
                    row.get(column).unwrap().field,
                    Field::Unavailable,
                    "{column}"
                );
            }
            let err = row.get("bio").unwrap().to_pg_text("text").unwrap_err();
            assert!(err.to_string().contains("TOAST"), "{err}");
            assert!(matches!(
                err.for_column("bio"),
                DecodeError::Column { column, .. } if column == "bio"
            ));
            assert!(row.get("tags").unwrap().to_pg_text("text[]").is_err());
        }
        // Inside a longer array the placeholder text is data.
        let mut after = users_after();
        after["tags"] = json!([UNAVAILABLE_PLACEHOLDER, "b"]);
        let row =
            change(decode_json(Some(KEY), Some(&with_schema("c", json!(null), after))).unwrap())
                .after
                .unwrap();
        assert_eq!(
            row.get("tags").unwrap().field,
            Field::Array(vec![
                Field::String(UNAVAILABLE_PLACEHOLDER.into()),
                Field::String("b".into())
            ])
        );
    }

    #[test]
    fn decimals_render_exactly() {
        let dec = |v: i128, len: usize, scale: u32| {
            let bytes = v.to_be_bytes();
            let unscaled = bytes.get(16 - len..).unwrap().to_vec();
            text(Field::Decimal { unscaled, scale }, Some(DECIMAL), "numeric").unwrap()
        };
        assert_eq!(dec(1234567, 4, 2), "12345.67");
        assert_eq!(dec(-1234567, 4, 2), "-12345.67");
        assert_eq!(dec(0, 1, 2), "0.00");
        assert_eq!(dec(0, 1, 0), "0");
        assert_eq!(dec(5, 1, 3), "0.005");
        assert_eq!(dec(-5, 1, 3), "-0.005");
        assert_eq!(dec(-128, 1, 0), "-128");
        assert_eq!(dec(255, 2, 0), "255");
        assert_eq!(dec(-1, 1, 0), "-1");
        assert_eq!(dec(1_000_000_000, 8, 0), "1000000000");
        assert_eq!(
            dec(123456789012345678901234567890123, 16, 0),
            "123456789012345678901234567890123"
        );
        assert_eq!(
            dec(-123456789012345678901234567890123, 16, 5),
            "-1234567890123456789012345678.90123"
        );
        assert_eq!(dec(i128::MIN, 16, 0), i128::MIN.to_string());
        let hex_bytes = |h: &str| -> Vec<u8> {
            (0..h.len())
                .step_by(2)
                .map(|i| u8::from_str_radix(h.get(i..i + 2).unwrap(), 16).unwrap())
                .collect()
        };
        let big = |h: &str, scale| {
            text(
                Field::Decimal {
                    unscaled: hex_bytes(h),
                    scale,
                },
                None,
                "numeric",
            )
            .unwrap()
        };
        // ±(10^40), beyond i128.
        assert_eq!(
            big("1d6329f1c35ca4bfabb9f5610000000000", 0),
            format!("1{}", "0".repeat(40))
        );
        assert_eq!(
            big("e29cd60e3ca35b4054460a9f0000000001", 2),
            format!("-{}.99", "9".repeat(38))
        );
        assert_eq!(
            text(
                Field::Decimal {
                    unscaled: vec![],
                    scale: 1
                },
                None,
                "numeric"
            )
            .unwrap(),
            "0.0"
        );
        assert!(typed(
            Field::Decimal {
                unscaled: vec![1],
                scale: 100_000
            },
            None
        )
        .to_pg_text("numeric")
        .is_err());
        assert!(typed(
            Field::Decimal {
                unscaled: vec![1; MAX_DECIMAL_BYTES + 1],
                scale: 0
            },
            None
        )
        .to_pg_text("numeric")
        .is_err());
        // Schemaless JSON: base64 unscaled bytes, scale from the column type.
        assert_eq!(
            text(Field::String("z8c=".into()), None, "numeric(12,2)").unwrap(),
            "-123.45"
        );
        assert_eq!(
            text(Field::String("-1.5e3".into()), None, "numeric(12,2)").unwrap(),
            "-1.5e3"
        );
        assert_eq!(
            text(Field::String("NaN".into()), None, "numeric").unwrap(),
            "NaN"
        );
        assert!(typed(Field::String("z8c=".into()), None)
            .to_pg_text("numeric")
            .is_err());
        assert!(typed(Field::String("#!".into()), None)
            .to_pg_text("numeric(5,1)")
            .is_err());
        assert_eq!(
            text(Field::Bytes(vec![0x30, 0x39]), None, "numeric(6,3)").unwrap(),
            "12.345"
        );
    }

    #[test]
    fn dates_and_times_render_in_range() {
        let date = |days: i64| text(Field::Int(days), Some(DATE), "date").unwrap();
        assert_eq!(date(0), "1970-01-01");
        assert_eq!(date(-1), "1969-12-31");
        assert_eq!(date(10956), "1999-12-31");
        assert_eq!(date(-719162), "0001-01-01");
        assert_eq!(date(-719163), "0001-12-31 BC");
        assert_eq!(date(2932896), "9999-12-31");
        assert_eq!(text(Field::Int(-1), None, "date").unwrap(), "1969-12-31");
        assert!(typed(Field::Int(i64::MAX), Some(DATE))
            .to_pg_text("date")
            .is_err());
        assert!(typed(Field::Int(i64::MIN), None)
            .to_pg_text("date")
            .is_err());

        let ts =
            |v: i64, semantic: Option<&str>, pg: &str| text(Field::Int(v), semantic, pg).unwrap();
        let plain_ts = "timestamp without time zone";
        assert_eq!(
            ts(-1, Some(MICRO_TIMESTAMP), plain_ts),
            "1969-12-31 23:59:59.999999"
        );
        assert_eq!(
            ts(1709212455123, Some(TIMESTAMP), plain_ts),
            "2024-02-29 13:14:15.123000"
        );
        assert_eq!(
            ts(1709212455123456789, Some(NANO_TIMESTAMP), plain_ts),
            "2024-02-29 13:14:15.123456"
        );
        assert_eq!(
            ts(1709212455123456, None, plain_ts),
            "2024-02-29 13:14:15.123456"
        );
        assert_eq!(
            ts(1709212455123, None, "timestamp(3) without time zone"),
            "2024-02-29 13:14:15.123000"
        );
        assert_eq!(
            ts(-62135596800000000, None, plain_ts),
            "0001-01-01 00:00:00.000000"
        );
        assert_eq!(
            ts(-62135596800000001, None, plain_ts),
            "0001-12-31 23:59:59.999999 BC"
        );
        assert_eq!(
            ts(0, None, "timestamp with time zone"),
            "1970-01-01 00:00:00.000000+00"
        );
        assert_eq!(
            ts(i64::MIN, None, plain_ts),
            "290309-12-21 19:59:05.224192 BC"
        );
        assert!(typed(Field::Int(i64::MAX), Some(TIMESTAMP))
            .to_pg_text(plain_ts)
            .is_err());
        assert_eq!(
            ts(
                1,
                Some("io.debezium.time.ZonedTimestamp"),
                "timestamp with time zone"
            ),
            "1970-01-01 00:00:00.000001+00"
        );
        assert_eq!(
            text(
                Field::String("2024-02-29T11:14:15.654321Z".into()),
                None,
                "timestamp with time zone"
            )
            .unwrap(),
            "2024-02-29T11:14:15.654321Z"
        );

        let time = "time without time zone";
        assert_eq!(
            ts(45_296_000_001, Some(MICRO_TIME), time),
            "12:34:56.000001"
        );
        assert_eq!(ts(45_296_001, Some(TIME), time), "12:34:56.001000");
        assert_eq!(ts(45_296_000_001, None, time), "12:34:56.000001");
        assert_eq!(ts(86_400_000_000, None, time), "24:00:00.000000");
        assert!(typed(Field::Int(-1), Some(MICRO_TIME))
            .to_pg_text(time)
            .is_err());
        assert!(typed(Field::Int(i64::MAX), Some(TIME))
            .to_pg_text(time)
            .is_err());
        assert_eq!(
            text(Field::String("12:00:00".into()), None, time).unwrap(),
            "12:00:00"
        );
    }

    #[test]
    fn to_pg_text_for_every_type() {
        let s = |v: &str| Field::String(v.to_owned());
        let cases: Vec<(Field, Option<&str>, &str, &str)> = vec![
            (Field::Int(-5), None, "bigint", "-5"),
            (Field::Int(7), None, "integer", "7"),
            (Field::Int(7), None, "smallint", "7"),
            (Field::Int(7), None, "numeric", "7"),
            (Field::Int(7), None, "numeric(12,2)", "7"),
            (Field::Float(0.1), None, "double precision", "0.1"),
            (
                Field::Float(1e20),
                None,
                "double precision",
                "100000000000000000000",
            ),
            (
                Field::Float(-2.5e-7),
                None,
                "double precision",
                "-0.00000025",
            ),
            (Field::Float(f64::NAN), None, "double precision", "NaN"),
            (Field::Float(f64::INFINITY), None, "real", "Infinity"),
            (Field::Float(f64::NEG_INFINITY), None, "real", "-Infinity"),
            (Field::Float(1.5), None, "real", "1.5"),
            (Field::Bool(false), None, "boolean", "false"),
            (s("x"), None, "text", "x"),
            (s("a@x"), None, "character varying(320)", "a@x"),
            (
                s("0b4c8f4e-8f4a-4a4e-9a39-3a7a0c7c2f11"),
                Some(UUID),
                "uuid",
                "0b4c8f4e-8f4a-4a4e-9a39-3a7a0c7c2f11",
            ),
            (
                Field::Bytes((0..16).collect()),
                None,
                "uuid",
                "00010203-0405-0607-0809-0a0b0c0d0e0f",
            ),
            (s("{\"a\":1}"), None, "jsonb", "{\"a\":1}"),
            (s("[1]"), None, "json", "[1]"),
            (
                Field::Json(json!({"b": [1, null]})),
                None,
                "json",
                "{\"b\":[1,null]}",
            ),
            (
                s("2024-01-01T00:00:00Z"),
                None,
                "timestamp with time zone",
                "2024-01-01T00:00:00Z",
            ),
            (
                Field::Int(1),
                Some(MICRO_TIMESTAMP),
                "timestamp without time zone",
                "1970-01-01 00:00:00.000001",
            ),
            (
                Field::Int(1),
                None,
                "timestamp(3) without time zone",
                "1970-01-01 00:00:00.001000",
            ),
            (Field::Int(1), Some(DATE), "date", "1970-01-02"),
            (
                Field::Int(1),
                Some(MICRO_TIME),
                "time without time zone",
                "00:00:00.000001",
            ),
            (Field::Bytes(vec![0xde, 0xad]), None, "bytea", "\\xdead"),
            (s("3q0="), None, "bytea", "\\xdead"),
            (s("\\xdead"), None, "bytea", "\\xdead"),
            (
                Field::Array(vec![s("a"), Field::Null]),
                None,
                "text[]",
                "{\"a\",NULL}",
            ),
            (
                Field::Array(vec![Field::Int(1), Field::Int(-2)]),
                None,
                "integer[]",
                "{\"1\",\"-2\"}",
            ),
            (Field::Array(vec![]), None, "integer[]", "{}"),
            (
                Field::Array(vec![
                    Field::Array(vec![Field::Int(1)]),
                    Field::Array(vec![Field::Null]),
                ]),
                None,
                "integer[]",
                "{{\"1\"},{NULL}}",
            ),
            (
                Field::Json(json!(["x", null])),
                None,
                "text[]",
                "{\"x\",NULL}",
            ),
            (s("{a,b}"), None, "text[]", "{a,b}"),
            (s("closed"), Some(ENUM), "user_status", "closed"),
            (Field::Int(3), None, "user_status", "3"),
            (Field::Float(2.0), None, "some_domain", "2"),
            (Field::Int(5), None, "interval", "5 microseconds"),
            (Field::Int(1), Some(CONNECT_DATE), "date", "1970-01-02"),
            (
                Field::Int(1),
                Some(CONNECT_TIMESTAMP),
                "timestamp without time zone",
                "1970-01-01 00:00:00.001000",
            ),
            (
                Field::Decimal {
                    unscaled: vec![0x04, 0xb0],
                    scale: 2,
                },
                None,
                "bigint",
                "12",
            ),
            (
                Field::Decimal {
                    unscaled: vec![0xfb, 0x50],
                    scale: 2,
                },
                None,
                "integer",
                "-12",
            ),
        ];
        for (field, semantic, pg_type, expected) in cases {
            let got = typed(field.clone(), semantic).to_pg_text(pg_type);
            assert_eq!(got, Ok(Some(expected.to_owned())), "{field:?} as {pg_type}");
        }
        for pg_type in ["text", "bigint", "bytea", "text[]", "numeric"] {
            assert_eq!(plain(Field::Null).to_pg_text(pg_type), Ok(None));
        }
        let errors: Vec<(Field, &str)> = vec![
            (Field::Int(1), "bytea"),
            (s("not base64!"), "bytea"),
            (Field::Array(vec![]), "text"),
            (Field::Int(1), "integer[]"),
            (Field::Bytes(vec![0xff]), "text"),
            (Field::Bytes(vec![1]), "numeric"),
            (
                Field::Decimal {
                    unscaled: vec![0x04, 0xb1],
                    scale: 2,
                },
                "bigint",
            ),
            (Field::Array(vec![Field::Unavailable]), "text[]"),
        ];
        for (field, pg_type) in errors {
            let err = plain(field.clone()).to_pg_text(pg_type).unwrap_err();
            assert!(
                matches!(err, DecodeError::Column { .. }),
                "{field:?} as {pg_type}: {err}"
            );
        }
    }

    #[test]
    fn array_elements_are_quoted_and_escaped() {
        let tags = Field::Array(vec![
            Field::String("a".into()),
            Field::String("b,c".into()),
            Field::Null,
            Field::String("q\"uote".into()),
            Field::String("back\\slash".into()),
            Field::String("NULL".into()),
        ]);
        assert_eq!(
            text(tags, None, "text[]").unwrap(),
            r#"{"a","b,c",NULL,"q\"uote","back\\slash","NULL"}"#
        );
        let value = schemaless(
            "c",
            json!(null),
            json!({"id": 1, "tags": ["a", "b,c", null, "q\"uote"]}),
        );
        let after = change(decode_json(Some(KEY), Some(&value)).unwrap())
            .after
            .unwrap();
        assert_eq!(
            after
                .get("tags")
                .unwrap()
                .to_pg_text("text[]")
                .unwrap()
                .as_deref(),
            Some(r#"{"a","b,c",NULL,"q\"uote"}"#)
        );
    }

    // ---- Avro ----

    fn avro_schema(file: &str) -> Schema {
        Schema::parse_str(file).unwrap()
    }

    fn users_value_schema() -> Schema {
        avro_schema(include_str!("../schemas/avro/public.users-value.avsc"))
    }

    fn users_key_schema() -> Schema {
        avro_schema(include_str!("../schemas/avro/public.users-key.avsc"))
    }

    fn some(value: AvroValue) -> AvroValue {
        AvroValue::Union(1, Box::new(value))
    }

    fn none() -> AvroValue {
        AvroValue::Union(0, Box::new(AvroValue::Null))
    }

    fn record(fields: Vec<(&str, AvroValue)>) -> AvroValue {
        AvroValue::Record(fields.into_iter().map(|(n, v)| (n.to_owned(), v)).collect())
    }

    fn s(v: &str) -> AvroValue {
        AvroValue::String(v.to_owned())
    }

    fn avro_users_row(bio: AvroValue, tags: AvroValue, avatar: AvroValue) -> AvroValue {
        record(vec![
            ("id", AvroValue::Long(1)),
            ("email", s("a@x")),
            ("display_name", some(s("Ann"))),
            ("status", s("active")),
            ("age", some(AvroValue::Int(42))),
            (
                "balance",
                some(AvroValue::Decimal(apache_avro::Decimal::from(vec![
                    0x30, 0x39,
                ]))),
            ),
            (
                "lifetime",
                some(record(vec![
                    ("scale", AvroValue::Int(1)),
                    ("value", AvroValue::Bytes(vec![1])),
                ])),
            ),
            ("score", some(AvroValue::Double(2.5))),
            ("verified", some(AvroValue::Boolean(true))),
            (
                "external_id",
                some(s("0b4c8f4e-8f4a-4a4e-9a39-3a7a0c7c2f11")),
            ),
            ("profile", some(s("{\"theme\":\"dark\"}"))),
            ("tags", tags),
            ("avatar", avatar),
            ("bio", bio),
            ("birth_date", some(AvroValue::Int(10956))),
            ("last_login", some(AvroValue::Long(1709212455123456))),
            ("created_at", s("2024-02-29T11:14:15.654321Z")),
            ("home_region", some(s("eu"))),
            ("hlc", AvroValue::Long(7)),
            ("origin_region", s("us")),
        ])
    }

    fn avro_default_row() -> AvroValue {
        avro_users_row(
            some(s("hello")),
            some(AvroValue::Array(vec![some(s("a")), none()])),
            some(AvroValue::Bytes(vec![1, 2, 0xff])),
        )
    }

    fn avro_envelope_value(
        op: &str,
        before: AvroValue,
        after: AvroValue,
        snapshot: &str,
    ) -> AvroValue {
        let source = record(vec![
            ("version", s("3.6.1.Final")),
            ("connector", s("postgresql")),
            ("name", s("cdc")),
            ("ts_ms", AvroValue::Long(1795813071636)),
            ("snapshot", AvroValue::Union(0, Box::new(s(snapshot)))),
            ("db", s("app")),
            ("sequence", none()),
            ("ts_us", none()),
            ("ts_ns", none()),
            ("schema", s("public")),
            ("table", s("users")),
            ("txId", some(AvroValue::Long(998))),
            ("lsn", some(AvroValue::Long(26864688))),
            ("xmin", none()),
            ("origin", none()),
            ("origin_lsn", none()),
        ]);
        record(vec![
            ("before", before),
            ("after", after),
            ("source", source),
            ("transaction", none()),
            ("op", s(op)),
            ("ts_ms", some(AvroValue::Long(1795813071723))),
            ("ts_us", none()),
            ("ts_ns", none()),
        ])
    }

    /// Encodes and decodes with apache-avro, to get exactly what the reader
    /// hands the caller.
    fn round_trip(value: AvroValue, schema: &Schema) -> AvroValue {
        use apache_avro::reader::datum::GenericDatumReader;
        use apache_avro::writer::datum::GenericDatumWriter;
        let bytes = GenericDatumWriter::builder(schema)
            .build()
            .unwrap()
            .write_value_to_vec(value)
            .unwrap();
        GenericDatumReader::builder(schema)
            .build()
            .unwrap()
            .read_value(&mut bytes.as_slice())
            .unwrap()
    }

    fn avro_key() -> AvroValue {
        round_trip(
            record(vec![("id", AvroValue::Long(1))]),
            &users_key_schema(),
        )
    }

    #[test]
    fn avro_primitive_types_lose_connect_name() {
        // apache-avro 0.22 keeps custom attributes only on records, enums,
        // fixed, arrays and maps: `connect.name` on a primitive is dropped.
        let schema = users_value_schema();
        let Schema::Record(envelope) = &schema else {
            panic!("not a record")
        };
        let Schema::Union(before) = &envelope.fields[0].schema else {
            panic!("not a union")
        };
        let Schema::Record(row) = &before.variants()[1] else {
            panic!("not a record")
        };
        let birth = &row.fields[row.lookup["birth_date"]].schema;
        let Schema::Union(birth) = birth else {
            panic!("not a union")
        };
        assert!(matches!(birth.variants()[1], Schema::Int));
        assert_eq!(birth.variants()[1].custom_attributes(), None);
    }

    #[test]
    fn avro_decodes_the_real_schema() {
        let schema = users_value_schema();
        let value = round_trip(
            avro_envelope_value("c", none(), some(avro_default_row()), "false"),
            &schema,
        );
        let c = change(
            decode_avro(
                avro_key(),
                &users_key_schema(),
                Some((value.clone(), &schema)),
            )
            .unwrap(),
        );
        assert_eq!(c.op, Op::Create);
        assert_eq!((c.schema.as_str(), c.table.as_str()), ("public", "users"));
        assert_eq!(
            (c.source_ts_ms, c.lsn, c.snapshot),
            (1795813071636, Some(26864688), false)
        );
        assert_eq!(c.key.get("id"), Some(&plain(Field::Int(1))));
        assert_eq!(c.before, None);
        let after = c.after.unwrap();
        let get = |name: &str| after.get(name).unwrap().clone();
        assert_eq!(
            get("balance"),
            typed(
                Field::Decimal {
                    unscaled: vec![0x30, 0x39],
                    scale: 2
                },
                Some(DECIMAL)
            )
        );
        assert_eq!(
            get("lifetime"),
            typed(
                Field::Decimal {
                    unscaled: vec![1],
                    scale: 1
                },
                Some(VARIABLE_SCALE_DECIMAL)
            )
        );
        // Primitive types carry no semantic name (see above).
        assert_eq!(get("birth_date"), plain(Field::Int(10956)));
        assert_eq!(get("last_login"), plain(Field::Int(1709212455123456)));
        assert_eq!(get("status"), plain(Field::String("active".into())));
        assert_eq!(
            get("tags"),
            plain(Field::Array(vec![Field::String("a".into()), Field::Null]))
        );
        assert_users_text(&after);

        // The same row as a snapshot read, an update and a delete.
        for (op, snapshot, expected) in [
            ("r", "last", Op::Read),
            ("u", "false", Op::Update),
            ("d", "false", Op::Delete),
        ] {
            let after = if expected == Op::Delete {
                none()
            } else {
                AvroValue::Union(1, Box::new(avro_default_row()))
            };
            let value = round_trip(
                avro_envelope_value(op, some(avro_default_row()), after, snapshot),
                &schema,
            );
            let c = change(
                decode_avro(
                    avro_key(),
                    &users_key_schema(),
                    Some((value.clone(), &schema)),
                )
                .unwrap(),
            );
            assert_eq!((c.op, c.snapshot), (expected, snapshot != "false"));
            let before = c.before.unwrap();
            if expected == Op::Delete {
                assert_users_text(&before);
            } else {
                // Of another change's before image only its version.
                assert_eq!(before.keys().collect::<Vec<_>>(), VERSION_COLUMNS);
            }
        }
        let value = round_trip(avro_envelope_value("t", none(), none(), "false"), &schema);
        let c = change(
            decode_avro(
                avro_key(),
                &users_key_schema(),
                Some((value.clone(), &schema)),
            )
            .unwrap(),
        );
        assert_eq!((c.op, c.before, c.after), (Op::Truncate, None, None));
    }

    #[test]
    fn avro_tombstones_placeholders_and_errors() {
        let schema = users_value_schema();
        let key_schema = users_key_schema();
        let mut key = Row::new();
        key.insert("id".into(), plain(Field::Int(1)));
        assert_eq!(
            decode_avro(avro_key(), &key_schema, None),
            Ok(Decoded::Tombstone { key })
        );
        assert_eq!(
            decode_avro(AvroValue::Null, &key_schema, None),
            Err(DecodeError::MissingKey)
        );

        let row = avro_users_row(
            some(s(UNAVAILABLE_PLACEHOLDER)),
            some(AvroValue::Array(vec![some(s(UNAVAILABLE_PLACEHOLDER))])),
            some(AvroValue::Bytes(
                UNAVAILABLE_PLACEHOLDER.as_bytes().to_vec(),
            )),
        );
        let value = round_trip(
            avro_envelope_value("u", some(avro_default_row()), some(row), "false"),
            &schema,
        );
        let after =
            change(decode_avro(avro_key(), &key_schema, Some((value.clone(), &schema))).unwrap())
                .after
                .unwrap();
        for column in ["bio", "tags", "avatar"] {
            assert_eq!(
                after.get(column).unwrap().field,
                Field::Unavailable,
                "{column}"
            );
        }

        let unknown = round_trip(avro_envelope_value("x", none(), none(), "false"), &schema);
        assert_eq!(
            decode_avro(avro_key(), &key_schema, Some((unknown.clone(), &schema))),
            Err(DecodeError::UnknownOp("x".into()))
        );
        let no_after = round_trip(avro_envelope_value("c", none(), none(), "false"), &schema);
        assert!(envelope_problem(decode_avro(
            avro_key(),
            &key_schema,
            Some((no_after.clone(), &schema))
        ))
        .contains("`after`"));
        let edit = |name: &str, replacement: Option<AvroValue>| {
            let AvroValue::Record(mut fields) =
                avro_envelope_value("c", none(), some(avro_default_row()), "false")
            else {
                unreachable!()
            };
            match replacement {
                Some(v) => fields
                    .iter_mut()
                    .filter(|(n, _)| n == name)
                    .for_each(|f| f.1 = v.clone()),
                None => fields.retain(|(n, _)| n != name),
            }
            AvroValue::Record(fields)
        };
        let missing_op = edit("op", None);
        assert!(envelope_problem(decode_avro(
            avro_key(),
            &key_schema,
            Some((missing_op.clone(), &schema))
        ))
        .contains("`op` is missing"));
        let missing_source = edit("source", None);
        assert!(envelope_problem(decode_avro(
            avro_key(),
            &key_schema,
            Some((missing_source.clone(), &schema))
        ))
        .contains("`source` is missing"));
        let bad_ts = edit(
            "source",
            Some(record(vec![
                ("ts_ms", s("1")),
                ("schema", s("public")),
                ("table", s("users")),
            ])),
        );
        assert!(envelope_problem(decode_avro(
            avro_key(),
            &key_schema,
            Some((bad_ts.clone(), &schema))
        ))
        .contains("`source.ts_ms` is an Avro string"));
        assert!(
            envelope_problem(decode_avro(AvroValue::Long(1), &key_schema, None)).contains("key")
        );
        assert!(envelope_problem(decode_avro(
            avro_key(),
            &key_schema,
            Some((AvroValue::Long(1), &schema))
        ))
        .contains("value"));
    }

    #[test]
    fn avro_logical_types_map_to_semantics() {
        let cases = [
            (AvroValue::Date(-1), DATE, "date", "1969-12-31"),
            (
                AvroValue::TimestampMillis(1),
                TIMESTAMP,
                "timestamp without time zone",
                "1970-01-01 00:00:00.001000",
            ),
            (
                AvroValue::TimestampMicros(-1),
                MICRO_TIMESTAMP,
                "timestamp with time zone",
                "1969-12-31 23:59:59.999999+00",
            ),
            (
                AvroValue::LocalTimestampNanos(1_000),
                NANO_TIMESTAMP,
                "timestamp without time zone",
                "1970-01-01 00:00:00.000001",
            ),
            (
                AvroValue::TimeMillis(1),
                TIME,
                "time without time zone",
                "00:00:00.001000",
            ),
            (
                AvroValue::TimeMicros(1),
                MICRO_TIME,
                "time without time zone",
                "00:00:00.000001",
            ),
            (
                AvroValue::Enum(0, "closed".into()),
                ENUM,
                "user_status",
                "closed",
            ),
        ];
        let names = Names { root: None };
        for (value, semantic, pg_type, expected) in cases {
            let t = avro_typed(value.clone(), None, &names, "c", false).unwrap();
            assert_eq!(t.semantic.as_deref(), Some(semantic), "{value:?}");
            assert_eq!(
                t.to_pg_text(pg_type).unwrap().as_deref(),
                Some(expected),
                "{value:?}"
            );
        }
        let uuid = apache_avro::Uuid::from_bytes([7; 16]);
        let t = avro_typed(AvroValue::Uuid(uuid), None, &names, "c", false).unwrap();
        assert_eq!(t.field, Field::String(uuid.to_string()));
        let err = avro_typed(
            AvroValue::Decimal(vec![1].into()),
            None,
            &names,
            "price",
            false,
        )
        .unwrap_err();
        assert!(matches!(err, DecodeError::Column { column, .. } if column == "price"));
    }

    // ---- never panics ----

    struct XorShift(u64);

    impl XorShift {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }

        fn below(&mut self, n: usize) -> usize {
            (self.next() % n.max(1) as u64) as usize
        }
    }

    #[test]
    fn random_and_mutated_input_never_panics() {
        let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
        let seeds = [
            with_schema("c", json!(null), users_after()),
            schemaless("u", users_after(), users_after()),
            KEY.to_vec(),
        ];
        let alphabet = b"{}[]\":,0123456789-.eEtrufalsn \\abcdxyz_";
        let pg_types = [
            "numeric(12,2)",
            "numeric",
            "bytea",
            "date",
            "timestamp without time zone",
            "timestamp with time zone",
            "time without time zone",
            "text[]",
            "uuid",
            "jsonb",
        ];
        for i in 0..10_000 {
            let bytes: Vec<u8> = if i % 4 == 0 {
                (0..rng.below(64)).map(|_| rng.next() as u8).collect()
            } else {
                let mut bytes = seeds[rng.below(seeds.len())].clone();
                for _ in 0..=rng.below(8) {
                    let at = rng.below(bytes.len());
                    match rng.below(4) {
                        0 => drop(
                            bytes
                                .get_mut(at)
                                .map(|b| *b = alphabet[rng.below(alphabet.len())]),
                        ),
                        1 => drop(if at < bytes.len() {
                            Some(bytes.remove(at))
                        } else {
                            None
                        }),
                        2 => bytes.insert(at.min(bytes.len()), alphabet[rng.below(alphabet.len())]),
                        _ => bytes.truncate(at),
                    }
                }
                bytes
            };
            let key = if i % 3 == 0 {
                Some(bytes.as_slice())
            } else {
                Some(KEY)
            };
            if let Ok(Decoded::Change(c)) = decode_json(key, Some(&bytes)) {
                for row in [c.before, c.after].into_iter().flatten() {
                    for value in row.values() {
                        for pg_type in pg_types {
                            let _ = value.to_pg_text(pg_type);
                        }
                    }
                }
            }
        }
    }

    /// The quick path gives what the general way gives, for every value it
    /// takes; what it declines, the general way decides.
    #[test]
    fn the_quick_path_reads_values_as_the_general_way_does() {
        let values = [
            "null",
            "0",
            "-0",
            "42",
            "-17",
            "9223372036854775807",
            "9223372036854775808",
            "-9223372036854775808",
            "1.5",
            "1e3",
            "true",
            "false",
            "\"\"",
            "\"plain\"",
            "\"with \\\"quote\\\"\"",
            "\"café\"",
            "\"\\u00e9\"",
            "\"__debezium_unavailable_value\"",
            "[1]",
            "{}",
        ];
        let kinds = [
            (ConnectKind::Int, "int64"),
            (ConnectKind::Int, "int32"),
            (ConnectKind::Boolean, "boolean"),
            (ConnectKind::String, "string"),
        ];
        let mut taken = 0;
        for raw in values {
            for (kind, ty) in kinds {
                let Some(quick) = quick_field(raw, kind) else {
                    continue;
                };
                taken += 1;
                let value: Json = serde_json::from_str(raw).unwrap();
                let general = json_with_schema(&value, &json!({ "type": ty }), None, "c", false);
                assert_eq!(Ok(quick), general, "{raw} as {ty}");
            }
        }
        assert!(taken >= 12, "the quick path took only {taken} values");
        for declined in ["\"__debezium_unavailable_value\"", "\"a\\nb\"", "1.5"] {
            assert_eq!(
                quick_field(declined, ConnectKind::String),
                None,
                "{declined}"
            );
        }
        assert_eq!(quick_field("1.5", ConnectKind::Int), None);
    }
}
