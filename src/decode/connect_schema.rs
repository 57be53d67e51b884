//! A JSON message's Connect schema, parsed once per distinct schema text and
//! cached per thread (a decode runs on one thread at a time, and `Rc`
//! keeps the hot path free of atomics), with the positions of its struct
//! fields by name and a plan for reading each field's common values.

use std::borrow::Cow;
use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;

use rustc_hash::FxHashMap;
use serde_json::Value as Json;

use super::json::parse_json;
use super::DecodeError;

/// Distinct schema texts kept per thread; a topic has a handful (one per
/// table version), so the bound is only a guard against a schema per message.
pub(super) const SCHEMA_CACHE_SIZE: usize = 256;

/// Parsed schemas by the xxh64 of their text, with the text to confirm a hit.
pub(super) type SchemaCache = HashMap<u64, (Box<str>, Rc<ConnectSchema>)>;

/// The schema texts last seen (a key's and a value's, per table), tried
/// as a prefix of each message before it is parsed at all.
pub(super) const RECENT_SCHEMAS: usize = 4;

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
#[inline]
pub(super) fn parse_known_framed(bytes: &[u8]) -> Option<(&str, Rc<ConnectSchema>)> {
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

#[inline]
pub(super) fn remember_recent(text: &str, schema: &Rc<ConnectSchema>) {
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
pub(super) struct ConnectSchema {
    pub(super) json: Json,
    /// The schema's own fields.
    pub(super) own: FieldIndex,
    /// The fields of each struct-typed field, by its name.
    pub(super) nested: FxHashMap<String, FieldIndex>,
}

/// A struct schema's fields: their positions by name, and what decoding
/// each one's value needs, read once per schema instead of per message.
pub(super) struct FieldIndex {
    pub(super) positions: FxHashMap<String, usize>,
    pub(super) plans: Vec<FieldPlan>,
}

/// A field's Connect type as far as the common values' quick path needs it,
/// and its semantic name.
pub(super) struct FieldPlan {
    pub(super) kind: ConnectKind,
    pub(super) semantic: Option<Cow<'static, str>>,
}

/// Connect types whose JSON values [`quick_field`] reads without building a
/// JSON value first; the rest go the general way.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum ConnectKind {
    Int,
    Boolean,
    String,
    Other,
}

impl FieldIndex {
    pub(super) fn of(schema: &Json) -> Self {
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
            let semantic = super::json::schema_semantic(f);
            plans.push(FieldPlan { kind, semantic });
        }
        FieldIndex { positions, plans }
    }
}

/// One struct of a [`ConnectSchema`]: its field schemas and their index.
#[derive(Clone, Copy)]
pub(super) struct StructSchema<'a> {
    pub(super) fields: &'a [Json],
    pub(super) index: &'a FieldIndex,
}

impl<'a> StructSchema<'a> {
    #[inline]
    pub(super) fn field(&self, name: &str) -> Option<&'a Json> {
        self.fields.get(*self.index.positions.get(name)?)
    }

    /// A field's schema with its plan.
    #[inline]
    pub(super) fn planned_field(&self, name: &str) -> Option<(&'a Json, &'a FieldPlan)> {
        let i = *self.index.positions.get(name)?;
        Some((self.fields.get(i)?, self.index.plans.get(i)?))
    }
}

impl ConnectSchema {
    pub(super) fn new(json: Json) -> Self {
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
    #[inline]
    pub(super) fn as_struct(&self) -> Option<StructSchema<'_>> {
        Some(StructSchema {
            fields: self.json.get("fields")?.as_array()?,
            index: &self.own,
        })
    }

    /// Its field `name`, as a struct (an envelope's `before` or `after`).
    #[inline]
    pub(super) fn struct_field(&self, name: &str) -> Option<StructSchema<'_>> {
        Some(StructSchema {
            fields: self.as_struct()?.field(name)?.get("fields")?.as_array()?,
            index: self.nested.get(name)?,
        })
    }
}

#[inline]
pub(super) fn cached_schema(
    text: &str,
    what: &str,
) -> Result<Option<Rc<ConnectSchema>>, DecodeError> {
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
