//! Decoding tests, JSON and Avro, through the module's face and the
//! renderer the applier uses on what it decodes.

use std::borrow::Cow;

use apache_avro::types::Value as AvroValue;
use apache_avro::Schema;
use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use serde_json::json;
use serde_json::Value as Json;

use super::avro::*;
use super::connect_schema::*;
use super::json::*;
use super::*;
use crate::apply::pg_text::*;
use crate::change::semantic::*;
use crate::change::VERSION_COLUMNS;

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
    let before = json!({"id": 1, "email": "old@x", "bio": "kept", "hlc": 6, "origin_region": "us"});
    let after = json!({"id": 1, "email": "new@x", "bio": UNAVAILABLE_PLACEHOLDER,
                       "hlc": 7, "origin_region": "us"});
    let c = change(decode_json(Some(KEY), Some(&schemaless("u", before.clone(), after))).unwrap());
    let kept = c.before.unwrap();
    assert_eq!(
        kept.keys().map(String::as_str).collect::<Vec<_>>(),
        ["bio", "hlc", "origin_region"]
    );
    assert_eq!(kept["bio"].field, Field::String("kept".into()));
    assert_eq!(kept["hlc"].field, Field::Int(6));
    // A delete's before image is whole: it names the row to delete.
    let c = change(decode_json(Some(KEY), Some(&schemaless("d", before, json!(null)))).unwrap());
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
fn a_json_float32_is_the_float4_its_text_stands_for() {
    // JsonConverter's names for FLOAT32 and FLOAT64 (measured on the stack).
    let float32 = json!({"type": "float", "optional": true});
    let float64 = json!({"type": "double", "optional": true});
    let field = |value: Json, schema: &Json| json_typed(&value, schema, "c").unwrap().field;
    // Java's Float.toString text of the float4 0.1, widened exactly (as
    // Avro's float is), not the double 0.1.
    assert_eq!(field(json!(0.1), &float32), Field::Float(f64::from(0.1f32)));
    assert_eq!(
        field(json!(3.4028235e38), &float32),
        Field::Float(f64::from(f32::MAX))
    );
    assert_eq!(field(json!(0.1), &float64), Field::Float(0.1));
    assert_eq!(
        field(json!(0.1), &json!({"type": "float32"})),
        Field::Float(f64::from(0.1f32))
    );
    assert_eq!(
        field(json!(0.1), &json!({"type": "float64"})),
        Field::Float(0.1)
    );
    let Field::Float(nan) = field(json!("NaN"), &float32) else {
        panic!("a float")
    };
    assert!(nan.is_nan());
    assert_eq!(
        field(json!("-Infinity"), &float32),
        Field::Float(f64::NEG_INFINITY)
    );
    // Written to a real column, PostgreSQL reads the same float4 back.
    assert_eq!(
        text(field(json!(0.1), &float32), None, "real").unwrap(),
        "0.10000000149011612"
    );
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
        // The applier names the column (apply::prepare's RowError).
        assert!(err.to_string().contains("TOAST"), "{err}");
        assert!(row.get("tags").unwrap().to_pg_text("text[]").is_err());
    }
    // Inside a longer array the placeholder text is data.
    let mut after = users_after();
    after["tags"] = json!([UNAVAILABLE_PLACEHOLDER, "b"]);
    let row = change(decode_json(Some(KEY), Some(&with_schema("c", json!(null), after))).unwrap())
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
    // decimal.handling.mode=string: the value's text, trailing zeros and
    // the infinities kept (docs/TYPES.md).
    for string_mode in ["12.50", "-0.001", "Infinity", "-Infinity"] {
        assert_eq!(
            text(Field::String(string_mode.into()), None, "numeric").unwrap(),
            string_mode
        );
    }
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

    let ts = |v: i64, semantic: Option<&str>, pg: &str| text(Field::Int(v), semantic, pg).unwrap();
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
        let RenderError(problem) = &err;
        assert!(!problem.is_empty(), "{field:?} as {pg_type}: {err}");
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
    avro_schema(include_str!("../../schemas/avro/public.users-value.avsc"))
}

fn users_key_schema() -> Schema {
    avro_schema(include_str!("../../schemas/avro/public.users-key.avsc"))
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

fn avro_envelope_value(op: &str, before: AvroValue, after: AvroValue, snapshot: &str) -> AvroValue {
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

/// The homing fence reads the epoch from Avro heartbeats as from JSON
/// ones (`regionsync.heartbeat.homing_epoch`, a nullable bigint).
#[test]
fn avro_heartbeat_carries_the_homing_epoch() {
    let schema = avro_schema(include_str!(
        "../../schemas/avro/regionsync.heartbeat-value.avsc"
    ));
    let key_schema = avro_schema(include_str!(
        "../../schemas/avro/regionsync.heartbeat-key.avsc"
    ));
    let beat = |epoch: AvroValue| {
        let row = record(vec![
            ("region", s("us-east-1")),
            ("beat_at", s("2026-12-07T08:00:00.123456Z")),
            ("homing_epoch", epoch),
        ]);
        let value = round_trip(
            avro_envelope_value("u", none(), some(row), "false"),
            &schema,
        );
        let key = round_trip(record(vec![("region", s("us-east-1"))]), &key_schema);
        change(decode_avro(key, &key_schema, Some((value, &schema))).unwrap())
    };
    let c = beat(some(AvroValue::Long(7)));
    assert_eq!(c.source_ts_ms, 1795813071636);
    assert_eq!(crate::fence::epoch_of(&c), Some(7));
    assert_eq!(crate::fence::epoch_of(&beat(none())), None);
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
    assert!(envelope_problem(decode_avro(AvroValue::Long(1), &key_schema, None)).contains("key"));
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

// ---- special values: ±infinity, intervals, bit strings, points ----

/// The row of `public.probe` as Debezium 3.6.1 wrote it on the local stack
/// (JSON with schemas, `interval.handling.mode=string`): the sentinels of
/// `-infinity`, an ISO 8601 interval, bit strings, a point with NaN.
fn probe_row_schema(field: &str) -> Json {
    json!({"type": "struct", "optional": true, "name": "cdc.public.probe.Value", "field": field,
    "fields": [
      {"type": "int64", "optional": false, "field": "id"},
      {"type": "int32", "optional": true, "name": "io.debezium.time.Date", "version": 1, "field": "d"},
      {"type": "int64", "optional": true, "name": "io.debezium.time.MicroTimestamp", "version": 1, "field": "ts"},
      {"type": "int64", "optional": true, "name": "io.debezium.time.Timestamp", "version": 1, "field": "ts3"},
      {"type": "string", "optional": true, "name": "io.debezium.time.ZonedTimestamp", "version": 1, "field": "tstz"},
      {"type": "string", "optional": true, "name": "io.debezium.time.Interval", "version": 1, "field": "iv"},
      {"type": "bytes", "optional": true, "name": "io.debezium.data.Bits", "version": 1,
       "parameters": {"length": "8"}, "field": "b8"},
      {"type": "boolean", "optional": true, "field": "b1"},
      {"type": "bytes", "optional": true, "name": "io.debezium.data.Bits", "version": 1,
       "parameters": {"length": "8"}, "field": "vb"},
      {"type": "bytes", "optional": true, "name": "io.debezium.data.Bits", "version": 1,
       "parameters": {"length": "2147483647"}, "field": "vbu"},
      {"type": "struct", "fields": [{"type": "double", "optional": false, "field": "x"},
                                    {"type": "double", "optional": false, "field": "y"},
                                    {"type": "bytes", "optional": true, "field": "wkb"},
                                    {"type": "int32", "optional": true, "field": "srid"}],
       "optional": true, "name": "io.debezium.data.geometry.Point", "version": 1,
       "doc": "Geometry (POINT)", "field": "p"},
      {"type": "int64", "optional": false, "default": 0, "field": "hlc"},
      {"type": "string", "optional": false, "default": "x", "field": "origin_region"}
    ]})
}

/// (column, type as `format_type` prints it, value as Debezium sent it,
/// text expected, or None where the value must be refused).
const PROBE: &[(&str, &str, &str, Option<&str>)] = &[
    ("d", "date", "-2147472691", Some("-infinity")),
    (
        "ts",
        "timestamp without time zone",
        "-9223372036832400000",
        Some("-infinity"),
    ),
    (
        "ts3",
        "timestamp(3) without time zone",
        "-9223372036832400",
        Some("-infinity"),
    ),
    (
        "tstz",
        "timestamp with time zone",
        "\"-infinity\"",
        Some("-infinity"),
    ),
    (
        "iv",
        "interval",
        "\"P0Y0M-1DT2H3M4.5S\"",
        Some("P0Y0M-1DT2H3M4.5S"),
    ),
    ("b8", "bit(8)", "\"gA==\"", Some("10000000")),
    ("b1", "bit(1)", "false", Some("0")),
    ("vb", "bit varying(8)", "\"gQ==\"", Some("10000001")),
    // '' and '0' alike: no length to write.
    ("vbu", "bit varying", "\"\"", None),
    (
        "p",
        "point",
        r#"{"x":"NaN","y":"Infinity","wkb":"AQEAAAAAAAAAAAD4fwAAAAAAAPB/","srid":null}"#,
        Some("(NaN,Infinity)"),
    ),
];

#[test]
fn json_special_values_decode_and_render_exactly_or_are_refused() {
    let mut after: serde_json::Map<String, Json> = PROBE
        .iter()
        .map(|(c, _, v, _)| (c.to_string(), serde_json::from_str(v).unwrap()))
        .collect();
    after.insert("id".into(), json!(2));
    after.insert("hlc".into(), json!(1));
    after.insert("origin_region".into(), json!("x"));
    let mut source = source();
    source["table"] = json!("probe");
    let envelope = json!({"type": "struct", "optional": false, "name": "cdc.public.probe.Envelope",
        "fields": [probe_row_schema("before"), probe_row_schema("after"),
            {"type": "struct", "fields": [{"type": "int64", "optional": false, "field": "ts_ms"}],
             "optional": false, "name": "io.debezium.connector.postgresql.Source", "field": "source"},
            {"type": "string", "optional": false, "field": "op"}]});
    let message = json!({"schema": envelope, "payload": {"before": null, "after": after,
        "source": source, "op": "c", "ts_ms": 1}});
    let c = change(decode_json(Some(KEY), Some(message.to_string().as_bytes())).unwrap());
    let row = c.after.expect("after");
    assert_eq!(row["iv"].semantic.as_deref(), Some(INTERVAL));
    assert_eq!(row["b8"].semantic.as_deref(), Some(BITS));
    // The source column's width travels with the bits.
    assert_eq!(
        row["b8"].field,
        Field::Bits {
            bytes: vec![0x80],
            length: 8
        }
    );
    assert_eq!(
        row["vbu"].field,
        Field::Bits {
            bytes: vec![],
            length: 2_147_483_647
        }
    );
    // Another width here is refused, never padded: bit(8)'s 10000000 is
    // not bit(12)'s 000010000000.
    assert!(row["b8"].to_pg_text("bit(12)").is_err());
    assert_eq!(row["p"].semantic.as_deref(), Some(POINT));
    for (column, pg_type, _, expected) in PROBE {
        let got = row[*column].to_pg_text(pg_type);
        match expected {
            Some(text) => assert_eq!(got, Ok(Some(text.to_string())), "{column} ({pg_type})"),
            None => assert!(
                got.is_err(),
                "{column} ({pg_type}) must be refused: {got:?}"
            ),
        }
    }
}

#[test]
fn avro_special_values_decode_and_render_exactly_or_are_refused() {
    // The shapes Debezium's Avro converter gives these columns: primitives
    // lose their connect.name, the Point record keeps it; read as the
    // worker reads a registered schema (a Bits length marked on its field).
    let schema = crate::decode::registry::with_debezium_marks(&json!({"type": "record", "name": "Value", "namespace": "cdc.avro.public.probe",
        "fields": [
            {"name": "d", "type": ["null", {"type": "int", "connect.name": "io.debezium.time.Date"}]},
            {"name": "ts", "type": ["null", {"type": "long", "connect.name": "io.debezium.time.MicroTimestamp"}]},
            {"name": "ts3", "type": ["null", {"type": "long", "connect.name": "io.debezium.time.Timestamp"}]},
            {"name": "iv", "type": ["null", {"type": "string", "connect.name": "io.debezium.time.Interval"}]},
            {"name": "b8", "type": ["null", {"type": "bytes", "connect.name": "io.debezium.data.Bits",
                                              "connect.parameters": {"length": "8"}}]},
            {"name": "vb", "type": ["null", {"type": "bytes", "connect.name": "io.debezium.data.Bits",
                                              "connect.parameters": {"length": "8"}}]},
            {"name": "p", "type": ["null", {"type": "record", "name": "Point",
                "namespace": "io.debezium.data.geometry", "connect.name": "io.debezium.data.geometry.Point",
                "fields": [{"name": "x", "type": "double"}, {"name": "y", "type": "double"},
                           {"name": "wkb", "type": ["null", "bytes"]}, {"name": "srid", "type": ["null", "int"]}]}]}
        ]}).to_string())
    .expect("a schema with marks");
    let point = |x: f64, y: f64| {
        some(record(vec![
            ("x", AvroValue::Double(x)),
            ("y", AvroValue::Double(y)),
            ("wkb", none()),
            ("srid", none()),
        ]))
    };
    let row = |d: i32, ts: i64, ts3: i64, iv: &str, b8: &[u8], vb: &[u8], p: AvroValue| {
        round_trip(
            record(vec![
                ("d", some(AvroValue::Int(d))),
                ("ts", some(AvroValue::Long(ts))),
                ("ts3", some(AvroValue::Long(ts3))),
                ("iv", some(s(iv))),
                ("b8", some(AvroValue::Bytes(b8.to_vec()))),
                ("vb", some(AvroValue::Bytes(vb.to_vec()))),
                ("p", p),
            ]),
            &schema,
        )
    };
    let types = [
        ("d", "date"),
        ("ts", "timestamp without time zone"),
        ("ts3", "timestamp(3) without time zone"),
        ("iv", "interval"),
        ("b8", "bit(8)"),
        ("vb", "bit varying(8)"),
        ("p", "point"),
    ];
    let render = |value: AvroValue| -> Vec<Result<Option<String>, RenderError>> {
        let AvroValue::Record(fields) = value else {
            panic!("a record")
        };
        let decoded = avro_row(
            fields,
            Some(&schema),
            &Names {
                root: Some(&schema),
            },
        )
        .unwrap();
        types
            .iter()
            .map(|(c, t)| decoded[*c].to_pg_text(t))
            .collect()
    };
    let ok = |t: &str| Ok(Some(t.to_string()));
    assert_eq!(
        render(row(
            -2147472692,
            9223372036825200000,
            9223372036825200,
            "P1Y2M20DT4H5M6.789S",
            &[0x05],
            &[0x81],
            point(f64::NAN, f64::NEG_INFINITY),
        )),
        vec![
            ok("infinity"),
            ok("infinity"),
            ok("infinity"),
            ok("P1Y2M20DT4H5M6.789S"),
            ok("00000101"),
            ok("10000001"),
            ok("(NaN,-Infinity)"),
        ]
    );
    let refused = render(row(
        0,
        0,
        0,
        "P0Y0M0DT0H0M0S",
        &[],
        &[0x05],
        point(-0.0, 1.5),
    ));
    assert_eq!(refused[4], ok("00000000"));
    // The width came through Avro too: bit(8)'s bits into a bit(4) column
    // are refused, not cut.
    let AvroValue::Record(fields) = row(0, 0, 0, "P0Y", &[0x05], &[0x81], point(0.0, 0.0)) else {
        panic!("a record")
    };
    let decoded = avro_row(
        fields,
        Some(&schema),
        &Names {
            root: Some(&schema),
        },
    )
    .unwrap();
    assert_eq!(
        decoded["b8"].field,
        Field::Bits {
            bytes: vec![0x05],
            length: 8
        }
    );
    assert_eq!(decoded["b8"].semantic.as_deref(), Some(BITS));
    assert!(decoded["b8"].to_pg_text("bit(4)").is_err());
    assert!(
        refused[5].is_err(),
        "bit varying without its length: {:?}",
        refused[5]
    );
    assert_eq!(refused[6], ok("(-0,1.5)"));
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

#[test]
fn an_array_carries_its_elements_semantic_name() {
    let schema = json!({"type": "array", "optional": true,
        "items": {"type": "int64", "optional": true, "name": "io.debezium.time.MicroTimestamp"}});
    assert_eq!(
        super::json::schema_semantic(&schema).as_deref(),
        Some(MICRO_TIMESTAMP)
    );
    let named = json!({"type": "int32", "name": "io.debezium.time.Date"});
    assert_eq!(super::json::schema_semantic(&named).as_deref(), Some(DATE));
    assert_eq!(
        super::json::schema_semantic(&json!({"type": "array", "items": {"type": "string"}})),
        None
    );
}
