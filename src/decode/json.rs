//! Kafka Connect's JsonConverter format, with or without `schemas.enable`,
//! into a [`Decoded`] change. Common values (null, integers, booleans,
//! plain strings) are read straight from their text by a per-schema field
//! plan (`connect_schema`); everything else goes through `serde_json`.

use std::borrow::Cow;
use std::rc::Rc;

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use serde_json::value::RawValue;
use serde_json::Value as Json;

use super::connect_schema::*;
use super::envelope::*;
use super::DecodeError;
use crate::change::semantic::*;
use crate::change::{Decoded, Field, Row, Typed, UNAVAILABLE_PLACEHOLDER};

/// The placeholder as schemaless JSON carries it for a `bytes` column.
pub(super) const UNAVAILABLE_BASE64: &str = "X19kZWJleml1bV91bmF2YWlsYWJsZV92YWx1ZQ==";

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

pub(super) fn parse_json(bytes: &[u8], what: &str) -> Result<Json, DecodeError> {
    serde_json::from_slice(bytes).map_err(|e| DecodeError::Json(format!("{what}: {e}")))
}

/// A JSON object as its members' texts, in document order, each parsed
/// only when it is used. Building a `serde_json::Value` for a whole 6 KB
/// envelope (a string and a map entry per member) was most of the decode.
pub(super) struct LazyObject<'a> {
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
pub(super) struct MemberName<'a>(Cow<'a, str>);

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
pub(super) fn lazy_members<'de, A: serde::de::MapAccess<'de>>(
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
pub(super) struct Payload<'a> {
    members: LazyObject<'a>,
    before: Option<Nested<'a>>,
    after: Option<Nested<'a>>,
    source: Option<Nested<'a>>,
}

/// A payload member that should hold an object.
pub(super) enum Nested<'a> {
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
pub(super) fn parse_framed_object<'a, T: serde::Deserialize<'a>>(
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
pub(super) type ParsedObject<T> = (Result<T, Json>, Option<Rc<ConnectSchema>>);

/// The object in `text` (valid JSON) read as `T`; otherwise `Err` with the
/// value `text` holds, for the caller to say what it expected.
pub(super) fn parse_object<'a, T: serde::Deserialize<'a>>(
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
pub(super) fn parse_framed<'a>(
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

pub(super) fn json_kind(value: &Json) -> &'static str {
    match value {
        Json::Null => "null",
        Json::Bool(_) => "a boolean",
        Json::Number(_) => "a number",
        Json::String(_) => "a string",
        Json::Array(_) => "an array",
        Json::Object(_) => "an object",
    }
}

pub(super) fn json_key(bytes: &[u8]) -> Result<Row, DecodeError> {
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

pub(super) fn json_envelope(
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
        typed: schema.is_some(),
    })
}

/// A row image (or key) left as text: each column's value is parsed on its
/// own, straight into its typed form; only the columns `wanted` are.
pub(super) fn json_row(
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
pub(super) fn quick_field(raw: &str, kind: ConnectKind) -> Option<Field> {
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

pub(super) fn json_typed(value: &Json, schema: &Json, column: &str) -> Result<Typed, DecodeError> {
    let semantic = schema_semantic(schema);
    let field = json_with_schema(value, schema, semantic.as_deref(), column, false)?;
    Ok(Typed { field, semantic })
}

/// The semantic name of a field's Connect schema; for an array (which has
/// none of its own) its elements': a `timestamp[]` element's unit is only
/// in its `MicroTimestamp`, and guessing it from this region's element
/// type would read microseconds as milliseconds in a `timestamp(0)[]`.
pub(super) fn schema_semantic(schema: &Json) -> Option<Cow<'static, str>> {
    let name = |s: &Json| s.get("name").and_then(Json::as_str).map(semantic_name);
    name(schema).or_else(|| match schema.get("type").and_then(Json::as_str) {
        Some("array") => schema.get("items").and_then(name),
        _ => None,
    })
}

/// Decodes `value` by its Connect schema. Inside arrays (`in_array`) the
/// placeholder is data: Debezium only replaces whole columns.
pub(super) fn json_with_schema(
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
        // JsonConverter spells Connect's FLOAT32 and FLOAT64 `float` and
        // `double` (measured). A FLOAT32 is the float4 the JSON text stands
        // for, widened exactly (as Avro's `float` is): the text `0.1` is
        // not the double 0.1.
        "float" | "float32" => Field::Float(f64::from(json_float(value).ok_or_else(wrong)? as f32)),
        "double" | "float64" => Field::Float(json_float(value).ok_or_else(wrong)?),
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
            } else if semantic == Some(BITS) {
                // Without its `length` the bits stay bytes, which the
                // renderer refuses for a bit column (the width is unknown).
                match bits_length(schema.get("parameters")) {
                    Some(length) => Field::Bits { bytes, length },
                    None => Field::Bytes(bytes),
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
pub(crate) fn json_plain(value: &Json, column: &str, in_array: bool) -> Result<Field, DecodeError> {
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
pub(crate) fn json_float(value: &Json) -> Option<f64> {
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

pub(super) fn base64_bytes(text: &str, column: &str) -> Result<Vec<u8>, DecodeError> {
    BASE64
        .decode(text)
        .map_err(|e| column_error(column, format!("bytes value is not base64: {e}")))
}

/// `parameters.scale` of a Connect Decimal schema (a string, by Connect's
/// convention; a number is accepted too).
pub(super) fn connect_decimal_scale(schema: &Json, column: &str) -> Result<u32, DecodeError> {
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

/// The `length` parameter of Debezium's `io.debezium.data.Bits` schema (a
/// string, by Connect's convention; a number is accepted too): the source
/// column's `bit(n)` or `bit varying(n)` length. JSON keeps it in the
/// schema's `parameters`, Avro in `connect.parameters`.
pub(crate) fn bits_length(parameters: Option<&Json>) -> Option<u32> {
    match parameters?.get("length")? {
        Json::String(s) => s.parse().ok(),
        Json::Number(n) => n.as_u64().and_then(|n| u32::try_from(n).ok()),
        _ => None,
    }
}

/// Debezium's VariableScaleDecimal struct `{scale: int32, value: bytes}`.
pub(super) fn variable_scale_decimal(value: &Json, column: &str) -> Result<Field, DecodeError> {
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
