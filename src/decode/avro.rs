//! The Avro form of a Debezium envelope (values already read by
//! `avro_reader` with the writer schema from `registry`) into a
//! [`Decoded`] change.
//!
//! apache-avro keeps custom attributes only on named and container schemas,
//! so an Avro primitive loses Debezium's `connect.name` (a Date is a bare
//! `int`); semantic names there come from records, Avro logical types and
//! decimals only, and rendering falls back on the column type.

use std::borrow::Cow;

use apache_avro::schema::Name;
use apache_avro::types::Value as AvroValue;
use apache_avro::Schema;

use super::envelope::*;
use super::DecodeError;
use crate::change::semantic::*;
use serde_json::Value as Json;

use crate::change::{Decoded, Field, Row, Typed, UNAVAILABLE_PLACEHOLDER};

/// The schema a message was written with, to follow its `Schema::Ref`s to
/// the named schema they refer to. Found by walking the (small) schema, not
/// through a map built for every message.
#[derive(Clone, Copy)]
pub(super) struct Names<'a> {
    pub(super) root: Option<&'a Schema>,
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

pub(super) fn resolve<'a>(schema: &'a Schema, names: &Names<'a>) -> &'a Schema {
    match schema {
        Schema::Ref { name } => names.get(name).unwrap_or(schema),
        _ => schema,
    }
}

/// Steps through unions (picking the branch's schema) to the value inside.
pub(super) fn avro_branch<'a>(
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

pub(super) fn record_field_schema<'a>(
    schema: Option<&'a Schema>,
    name: &str,
) -> Option<&'a Schema> {
    match schema {
        Some(Schema::Record(record)) => record
            .lookup
            .get(name)
            .and_then(|&i| record.fields.get(i))
            .map(|f| &f.schema),
        _ => None,
    }
}

/// The `length` of a bit string field (`registry::BITS_LENGTH_ATTRIBUTE`).
fn bits_length_of_field(schema: Option<&Schema>, name: &str) -> Option<u32> {
    let Some(Schema::Record(record)) = schema else {
        return None;
    };
    let field = record.fields.get(*record.lookup.get(name)?)?;
    let length = field
        .custom_attributes
        .get(super::registry::BITS_LENGTH_ATTRIBUTE)?;
    super::json::bits_length(Some(&serde_json::json!({ "length": length })))
}

pub(super) fn avro_kind(value: &AvroValue) -> &'static str {
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

pub(super) fn avro_get<'v>(fields: &'v [(String, AvroValue)], name: &str) -> Option<&'v AvroValue> {
    let value = fields.iter().find(|(n, _)| n == name).map(|(_, v)| v)?;
    let mut value = value;
    while let AvroValue::Union(_, inner) = value {
        value = inner;
    }
    Some(value)
}

/// Takes a field's value out of a record (leaving a null).
pub(super) fn avro_take(fields: &mut [(String, AvroValue)], name: &str) -> Option<AvroValue> {
    let (_, value) = fields.iter_mut().find(|(n, _)| n == name)?;
    Some(std::mem::replace(value, AvroValue::Null))
}

pub(super) fn unwrap_unions(mut value: AvroValue) -> AvroValue {
    while let AvroValue::Union(_, inner) = value {
        value = *inner;
    }
    value
}

pub(super) fn avro_envelope<'a>(
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
        typed: true,
    })
}

pub(super) fn avro_row<'a>(
    fields: Vec<(String, AvroValue)>,
    schema: Option<&'a Schema>,
    names: &Names<'a>,
) -> Result<Row, DecodeError> {
    fields
        .into_iter()
        .map(|(name, value)| {
            let mut typed = avro_typed(
                value,
                record_field_schema(schema, &name),
                names,
                &name,
                false,
            )?;
            // A bit string's source width, which `registry` copied onto
            // its field (apache-avro drops a primitive's attributes).
            if matches!(typed.field, Field::Bytes(_)) {
                if let Some(length) = bits_length_of_field(schema, &name) {
                    if let Field::Bytes(bytes) = typed.field {
                        typed = Typed {
                            field: Field::Bits { bytes, length },
                            semantic: Some(Cow::Borrowed(BITS)),
                        };
                    }
                }
            }
            Ok((name, typed))
        })
        .collect()
}

/// `connect.name` where apache-avro keeps custom attributes (records, enums,
/// fixed, arrays, maps; not primitives).
pub(super) fn connect_name(schema: Option<&Schema>) -> Option<Cow<'static, str>> {
    schema?
        .custom_attributes()?
        .get("connect.name")?
        .as_str()
        .map(semantic_name)
}

pub(super) fn avro_typed<'a>(
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
                // The array's semantic name is its elements' (their unit:
                // `json::schema_semantic`), which the first that has one
                // says: apache-avro keeps none on the array of primitives.
                let mut element_semantic = None;
                let items = items
                    .into_iter()
                    .map(|item| {
                        let typed = avro_typed(item, item_schema, names, column, true)?;
                        if element_semantic.is_none() {
                            element_semantic = typed.semantic;
                        }
                        Ok(typed.field)
                    })
                    .collect::<Result<_, DecodeError>>()?;
                (
                    Field::Array(items),
                    connect_name(schema).or(element_semantic),
                )
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
            } else if semantic.as_deref() == Some(POINT) {
                (avro_point(fields, column)?, semantic)
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

pub(super) fn avro_json(value: AvroValue, column: &str) -> Result<Field, DecodeError> {
    Json::try_from(value)
        .map(Field::Json)
        .map_err(|e| column_error(column, format!("Avro value has no JSON form: {e}")))
}

/// Debezium's Point record `{x, y, wkb, srid}` as the JSON struct
/// JsonConverter writes, coordinates only: a NaN or infinite double (which
/// a JSON number cannot hold) as the string JsonConverter uses for it.
pub(super) fn avro_point(
    fields: &[(String, AvroValue)],
    column: &str,
) -> Result<Field, DecodeError> {
    let coordinate = |name: &str| match avro_get(fields, name) {
        Some(AvroValue::Double(v)) => Ok(*v),
        Some(AvroValue::Float(v)) => Ok(f64::from(*v)),
        _ => Err(column_error(
            column,
            format!("Point has no double `{name}`"),
        )),
    };
    let json = |v: f64| match serde_json::Number::from_f64(v) {
        Some(n) => Json::Number(n),
        None if v.is_nan() => Json::String("NaN".into()),
        None if v > 0.0 => Json::String("Infinity".into()),
        None => Json::String("-Infinity".into()),
    };
    Ok(Field::Json(serde_json::json!({
        "x": json(coordinate("x")?),
        "y": json(coordinate("y")?),
    })))
}

pub(super) fn avro_variable_scale_decimal(
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
