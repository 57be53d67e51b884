//! Avro messages in the Confluent wire format (magic byte 0, a 4-byte
//! big-endian schema id, then the Avro datum): the writer schema comes from
//! the source region's schema registry through schema_registry_converter;
//! the datum is read by `avro_reader`.
//!
//! Why not `AvroDecoder::decode_with_schema` for every message: it clones
//! the schema's resolved names (a map keyed by strings) and its name on
//! every call, a visible share of the worker's CPU in a profile of an Avro
//! replay. Here each schema id gets one reader, built once and shared.
//!
//! The readers are kept in one cache per source region, bounded by the
//! size of their schemas ([`READER_CACHE_BYTES`]), least recently used
//! first out: a schema id is whatever a message says, so a cache that kept
//! every id ever seen would grow with every bad message. The registry
//! client keeps nothing (a fresh client cache per lookup), so an evicted
//! schema is asked for again, and a failed lookup is never kept.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use apache_avro::types::Value;
use apache_avro::Schema;
use futures::future::BoxFuture;
use rustc_hash::FxHashMap;
use schema_registry_converter::async_impl::avro::AvroDecoder;
use schema_registry_converter::async_impl::schema_registry::SrSettings;

use anyhow::Context as _;

use super::avro_reader::{Plan, ReadError};
use crate::change::semantic::BITS;
use crate::config::Config;

/// How much schema text (canonical form) the readers of one source region
/// may keep: thousands of Debezium schemas (2-10 KB each), a few per table
/// and schema version.
pub const READER_CACHE_BYTES: usize = 16 << 20;

/// How much of a datum to build.
#[derive(Clone, Copy)]
enum Part {
    Whole,
    /// A Debezium envelope's fields that the apply reads.
    Envelope,
}

/// Why an Avro key or value could not be read.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum AvroError {
    /// The registry could not be asked or did not answer with a schema (a
    /// connection refused, a timeout, a 5xx, 429 or 401): a fault of the
    /// infrastructure, not of the message.
    #[error("schema registry: {0}")]
    Registry(String),
    /// The registry answered that it does not know the schema id.
    #[error("schema registry: {0}")]
    UnknownSchema(String),
    /// The bytes are not a datum of their writer schema.
    #[error("{0}")]
    Datum(String),
    /// The datum is beyond a bound of the reader (nesting depth, item
    /// memory; `avro_reader`): bad data, whatever its schema says.
    #[error("{0}")]
    Limit(String),
}

/// Where writer schemas come from, by id: the source region's registry,
/// or a fixed set (tests).
pub trait SchemaSource: Send + Sync {
    fn schema(&self, id: u32) -> BoxFuture<'_, Result<Schema, AvroError>>;
}

/// How long one registry request may take before it counts as failed (and
/// is retried): a registry that accepts a connection and never answers
/// must not hold a partition for good.
pub const REGISTRY_TIMEOUT: Duration = Duration::from_secs(10);

/// A Confluent-compatible schema registry (Apicurio's `ccompat` API too),
/// through schema_registry_converter. It keeps nothing: each lookup gets a
/// client cache of its own, dropped with it, and only schemas it gave are
/// kept (by [`AvroSource`]'s bounded cache).
pub struct ConfluentRegistry(SrSettings);

impl ConfluentRegistry {
    pub fn new(url: &str) -> anyhow::Result<Self> {
        let settings = SrSettings::new_builder(url.to_string())
            .set_timeout(REGISTRY_TIMEOUT)
            .build()
            .map_err(|e| anyhow::anyhow!("schema registry client for {url}: {e}"))?;
        Ok(ConfluentRegistry(settings))
    }

    /// The registry at `url` with the configuration's credentials (basic
    /// authentication or a bearer token) and CA file, trusted beside the
    /// system's roots.
    pub fn with_settings(url: &str, config: &Config) -> anyhow::Result<Self> {
        let r = &config.schema_registry;
        let mut settings = SrSettings::new_builder(url.to_string());
        settings.set_timeout(REGISTRY_TIMEOUT);
        if let Some(token) = config.registry_token()? {
            settings.set_token_authorization(token.expose());
        } else if let Some(user) = &r.username {
            let password = config.registry_password()?;
            settings.set_basic_authorization(user, password.as_ref().map(|p| p.expose()));
        }
        let mut client = reqwest::Client::builder();
        if let Some(file) = &r.ca_file {
            let pem =
                std::fs::read(file).with_context(|| format!("schema_registry.ca_file {file}"))?;
            let certs = reqwest::Certificate::from_pem_bundle(&pem)
                .with_context(|| format!("schema_registry.ca_file {file}"))?;
            client = client.tls_certs_merge(certs);
        }
        // SRCError's text holds no credential.
        let settings = settings
            .build_with(client)
            .map_err(|e| anyhow::anyhow!("schema registry client for {url}: {e}"))?;
        Ok(ConfluentRegistry(settings))
    }
}

impl SchemaSource for ConfluentRegistry {
    fn schema(&self, id: u32) -> BoxFuture<'_, Result<Schema, AvroError>> {
        Box::pin(async move {
            // A decoder of its own (the settings, with their HTTP client,
            // are shared): the client caches every id it resolves, and
            // failures, for good; this one is dropped with its cache.
            let client = AvroDecoder::new(self.0.clone());
            match client.get_schema(id).await {
                Ok(registered) => Ok(with_debezium_marks(&registered.raw)
                    .unwrap_or_else(|| registered.parsed.clone())),
                Err(e) => Err(registry_error(id, &e.to_string())),
            }
        })
    }
}

/// The record field attribute [`with_debezium_marks`] gives a bit string
/// field: the `length` of its `io.debezium.data.Bits` type.
pub const BITS_LENGTH_ATTRIBUTE: &str = "regionsync.bits.length";

/// The writer schema `raw` with Debezium's time types marked with the Avro
/// logical type of their unit, parsed; `None` if there is nothing to mark
/// or the result does not parse (the schema is then read as registered).
///
/// Why: Debezium names the unit of a time value only in `connect.name`
/// (`io.debezium.time.MicroTimestamp` is a bare `long` of microseconds),
/// and apache-avro keeps no attribute of a primitive. Without it the unit
/// would have to be guessed from the target column's precision, which
/// is wrong wherever this region's column is narrower or wider than the
/// source's across `timestamp(3)`/`timestamp(4)`: microseconds read as
/// milliseconds are another instant. The logical types read the same
/// bytes, and the decoder names them back (`avro::avro_typed`).
///
/// Likewise a bit string's `length` (`io.debezium.data.Bits`'s
/// `connect.parameters`, the source column's width) is copied onto the
/// record field that holds it, as [`BITS_LENGTH_ATTRIBUTE`]: apache-avro
/// keeps a field's own attributes, and without the source's width a
/// `bit(8)` value could be padded or cut to this region's `bit(n)`.
pub fn with_debezium_marks(raw: &str) -> Option<Schema> {
    /// The Bits length of a field's type, directly or in a union.
    fn bits_length(ty: &serde_json::Value) -> Option<serde_json::Value> {
        match ty {
            serde_json::Value::Object(t) => {
                if t.get("connect.name").and_then(|n| n.as_str()) != Some(BITS) {
                    return None;
                }
                t.get("connect.parameters")?.get("length").cloned()
            }
            serde_json::Value::Array(branches) => branches.iter().find_map(bits_length),
            _ => None,
        }
    }
    fn mark(value: &mut serde_json::Value, marked: &mut bool) {
        match value {
            serde_json::Value::Object(map) => {
                // A record field (`name` and a `type` that is no type name).
                if map.contains_key("name") {
                    if let Some(length) = map.get("type").and_then(bits_length) {
                        map.insert(BITS_LENGTH_ATTRIBUTE.into(), length);
                        *marked = true;
                    }
                }
                let unit = match (
                    map.get("type").and_then(|t| t.as_str()),
                    map.get("connect.name").and_then(|n| n.as_str()),
                ) {
                    (Some("int"), Some("io.debezium.time.Date")) => Some("date"),
                    (Some("int"), Some("io.debezium.time.Time")) => Some("time-millis"),
                    (Some("long"), Some("io.debezium.time.MicroTime")) => Some("time-micros"),
                    (Some("long"), Some("io.debezium.time.Timestamp")) => {
                        Some("local-timestamp-millis")
                    }
                    (Some("long"), Some("io.debezium.time.MicroTimestamp")) => {
                        Some("local-timestamp-micros")
                    }
                    (Some("long"), Some("io.debezium.time.NanoTimestamp")) => {
                        Some("local-timestamp-nanos")
                    }
                    _ => None,
                };
                if let Some(unit) = unit {
                    if !map.contains_key("logicalType") {
                        map.insert("logicalType".into(), unit.into());
                        *marked = true;
                    }
                }
                for v in map.values_mut() {
                    mark(v, marked);
                }
            }
            serde_json::Value::Array(items) => {
                for v in items {
                    mark(v, marked);
                }
            }
            _ => {}
        }
    }
    let mut json: serde_json::Value = serde_json::from_str(raw).ok()?;
    let mut marked = false;
    mark(&mut json, &mut marked);
    if !marked {
        return None;
    }
    Schema::parse(&json).ok()
}

/// A failed lookup of schema `id`: unknown to the registry (HTTP 404), or
/// anything else. The client words an HTTP error as "… failed with status
/// 404 Not Found"; a URL or an id that merely contains 404 is no 404.
fn registry_error(id: u32, error: &str) -> AvroError {
    let text = format!("schema id {id}: {error}");
    if error.contains("status 404") {
        AvroError::UnknownSchema(text)
    } else {
        AvroError::Registry(text)
    }
}

/// A fixed set of schemas by id, in memory: what a registry would answer.
#[derive(Default)]
pub struct FixedSchemas(pub FxHashMap<u32, Schema>);

impl SchemaSource for FixedSchemas {
    fn schema(&self, id: u32) -> BoxFuture<'_, Result<Schema, AvroError>> {
        let found = self.0.get(&id).cloned();
        Box::pin(async move {
            found.ok_or_else(|| AvroError::UnknownSchema(format!("schema id {id}: not registered")))
        })
    }
}

/// A reader in the cache: its size (what it costs the cache) and when it
/// was last used (by [`Readers::clock`]).
struct Cached {
    plan: Arc<Plan>,
    bytes: usize,
    used: AtomicU64,
}

/// The readers of the schema ids seen lately, within `limit` bytes.
struct Readers {
    by_id: FxHashMap<u32, Cached>,
    bytes: usize,
    limit: usize,
}

impl Readers {
    /// Keeps `plan` for `id` at the cost of `bytes`, dropping the least
    /// recently used readers beyond the limit. A schema larger than the
    /// whole cache is not kept (it is read once and asked for again).
    fn insert(&mut self, id: u32, plan: Arc<Plan>, bytes: usize, now: u64) -> Arc<Plan> {
        if let Some(kept) = self.by_id.get(&id) {
            return kept.plan.clone();
        }
        if bytes > self.limit {
            return plan;
        }
        while self.bytes + bytes > self.limit {
            let Some(oldest) = self
                .by_id
                .iter()
                .min_by_key(|(_, c)| c.used.load(Ordering::Relaxed))
                .map(|(id, _)| *id)
            else {
                break;
            };
            if let Some(gone) = self.by_id.remove(&oldest) {
                self.bytes -= gone.bytes;
            }
        }
        self.bytes += bytes;
        let used = AtomicU64::new(now);
        self.by_id.insert(
            id,
            Cached {
                plan: plan.clone(),
                bytes,
                used,
            },
        );
        plan
    }
}

/// The Avro side of one source region: its schemas and the readers of the
/// schema ids seen lately.
pub struct AvroSource {
    registry: Box<dyn SchemaSource>,
    readers: RwLock<Readers>,
    /// Ticks once per lookup: the cache's notion of recent.
    clock: AtomicU64,
}

/// A decoded Avro datum with the schema it was written with.
pub struct Datum {
    pub value: Value,
    pub schema: Arc<Schema>,
}

impl AvroSource {
    /// The region's registry at `registry_url`.
    pub fn new(registry_url: &str) -> anyhow::Result<Self> {
        Ok(Self::with_schemas(ConfluentRegistry::new(registry_url)?))
    }

    /// The region's registry at `registry_url`, with the configuration's
    /// credentials and CA ([`ConfluentRegistry::with_settings`]).
    pub fn with_settings(registry_url: &str, config: &Config) -> anyhow::Result<Self> {
        Ok(Self::with_schemas(ConfluentRegistry::with_settings(
            registry_url,
            config,
        )?))
    }

    pub fn with_schemas(schemas: impl SchemaSource + 'static) -> Self {
        Self::with_cache_limit(schemas, READER_CACHE_BYTES)
    }

    /// With readers kept up to `limit` bytes of schema text.
    pub fn with_cache_limit(schemas: impl SchemaSource + 'static, limit: usize) -> Self {
        AvroSource {
            registry: Box::new(schemas),
            readers: RwLock::new(Readers {
                by_id: FxHashMap::default(),
                bytes: 0,
                limit,
            }),
            clock: AtomicU64::new(0),
        }
    }

    /// How many readers are kept, and their schemas' size.
    pub fn cached(&self) -> (usize, usize) {
        let readers = self.readers.read().expect("readers lock");
        (readers.by_id.len(), readers.bytes)
    }

    /// Decodes one key or value whole; `None` for a null (a tombstone's
    /// value).
    pub async fn decode(&self, bytes: Option<&[u8]>) -> Result<Option<Datum>, AvroError> {
        self.decode_part(bytes, Part::Whole).await
    }

    /// Decodes a value as a Debezium envelope, building only the fields the
    /// apply reads (`avro::Plan::read_envelope`); `None` for a null.
    pub async fn decode_envelope(&self, bytes: Option<&[u8]>) -> Result<Option<Datum>, AvroError> {
        self.decode_part(bytes, Part::Envelope).await
    }

    async fn decode_part(
        &self,
        bytes: Option<&[u8]>,
        part: Part,
    ) -> Result<Option<Datum>, AvroError> {
        let Some(bytes) = bytes else {
            return Ok(None);
        };
        let (id, datum) = split_wire_format(bytes).map_err(AvroError::Datum)?;
        let plan = self.reader(id).await?;
        let value = match part {
            Part::Whole => plan.read(datum),
            Part::Envelope => plan.read_envelope(datum),
        }
        .map_err(|e| match e {
            ReadError::Limit(e) => AvroError::Limit(format!("schema id {id}: {e}")),
            ReadError::Datum(e) => {
                AvroError::Datum(format!("the datum does not match writer schema {id}: {e}"))
            }
        })?;
        Ok(Some(Datum {
            value,
            schema: plan.schema().clone(),
        }))
    }

    async fn reader(&self, id: u32) -> Result<Arc<Plan>, AvroError> {
        let now = self.clock.fetch_add(1, Ordering::Relaxed);
        if let Some(r) = self.readers.read().expect("readers lock").by_id.get(&id) {
            r.used.store(now, Ordering::Relaxed);
            return Ok(r.plan.clone());
        }
        let schema = self.registry.schema(id).await?;
        let bytes = schema.canonical_form().len();
        let plan = Arc::new(Plan::new(Arc::new(schema)));
        Ok(self
            .readers
            .write()
            .expect("readers lock")
            .insert(id, plan, bytes, now))
    }
}

/// The schema id and the datum of a message in the Confluent wire format.
pub fn split_wire_format(bytes: &[u8]) -> Result<(u32, &[u8]), String> {
    match bytes {
        [0, a, b, c, d, datum @ ..] => Ok((u32::from_be_bytes([*a, *b, *c, *d]), datum)),
        [0, ..] => Err(format!(
            "{} bytes: too short for the Avro wire format (magic byte, 4-byte schema id, datum)",
            bytes.len()
        )),
        _ => Err("no Avro magic byte 0".to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unknown_schema_id_is_told_from_an_outage() {
        let unknown = registry_error(
            7,
            "HTTP request to schema registry failed with status 404 Not Found",
        );
        assert!(matches!(unknown, AvroError::UnknownSchema(ref t) if t.contains("schema id 7")));
        for outage in [
            "error sending request for url (http://127.0.0.1:18081/schemas/ids/404): operation timed out",
            "error sending request for url (http://127.0.0.1:18081/...): connection refused",
            "HTTP request to schema registry failed with status 503 Service Unavailable",
            "HTTP request to schema registry failed with status 401 Unauthorized",
            "operation timed out",
        ] {
            assert!(
                matches!(registry_error(7, outage), AvroError::Registry(_)),
                "{outage}"
            );
        }
    }

    /// A row as Debezium's Avro converter registers it: the time units only
    /// in `connect.name`.
    const DEBEZIUM_TIMES: &str = r#"{"type": "record", "name": "Value", "fields": [
        {"name": "d", "type": ["null", {"type": "int", "connect.version": 1, "connect.name": "io.debezium.time.Date"}], "default": null},
        {"name": "t3", "type": ["null", {"type": "int", "connect.version": 1, "connect.name": "io.debezium.time.Time"}], "default": null},
        {"name": "t6", "type": ["null", {"type": "long", "connect.version": 1, "connect.name": "io.debezium.time.MicroTime"}], "default": null},
        {"name": "ts3", "type": ["null", {"type": "long", "connect.version": 1, "connect.name": "io.debezium.time.Timestamp"}], "default": null},
        {"name": "ts6", "type": {"type": "long", "connect.version": 1, "connect.name": "io.debezium.time.MicroTimestamp"}},
        {"name": "n", "type": {"type": "long"}}
    ]}"#;

    #[tokio::test]
    async fn debezium_time_units_are_kept_as_avro_logical_types() {
        use apache_avro::types::Record;
        use apache_avro::writer::datum::GenericDatumWriter;

        let registered = Schema::parse_str(DEBEZIUM_TIMES).unwrap();
        let marked = with_debezium_marks(DEBEZIUM_TIMES).expect("time fields to mark");
        let mut record = Record::new(&registered).unwrap();
        let union = |v: Value| Value::Union(1, Box::new(v));
        record.put("d", union(Value::Int(19_782)));
        record.put("t3", union(Value::Int(45_296_789)));
        record.put("t6", union(Value::Long(45_296_789_012)));
        record.put("ts3", union(Value::Long(1_709_212_455_123)));
        record.put("ts6", Value::Long(1_709_212_455_123_456));
        record.put("n", Value::Long(7));
        let datum = GenericDatumWriter::builder(&registered)
            .build()
            .unwrap()
            .write_value_to_vec(Value::from(record))
            .unwrap();
        // The same bytes, read with the marked schema as the worker reads
        // them (wire format, schema id 1).
        let source =
            AvroSource::with_schemas(FixedSchemas([(1, marked.clone())].into_iter().collect()));
        let message: Vec<u8> = [0, 0, 0, 0, 1].into_iter().chain(datum).collect();
        let value = source.decode(Some(&message)).await.unwrap().unwrap().value;
        let Value::Record(fields) = value else {
            panic!("a record: {value:?}")
        };
        let names = super::super::avro::Names {
            root: Some(&marked),
        };
        let text = |column: &str, pg_type: &str| {
            let (_, v) = fields.iter().find(|(n, _)| n == column).unwrap();
            let field_schema = super::super::avro::record_field_schema(Some(&marked), column);
            super::super::avro::avro_typed(v.clone(), field_schema, &names, column, false)
                .unwrap()
                .to_pg_text(pg_type)
                .unwrap()
                .unwrap()
        };
        // Each unit as Debezium sent it, whatever this region's column
        // precision (a timestamp(6) value into timestamp(0) is the same
        // instant, which Fit then refuses for its digits).
        assert_eq!(text("d", "date"), "2024-02-29");
        assert_eq!(text("t3", "time(6) without time zone"), "12:34:56.789000");
        assert_eq!(text("t6", "time(0) without time zone"), "12:34:56.789012");
        assert_eq!(
            text("ts3", "timestamp(6) without time zone"),
            "2024-02-29 13:14:15.123000"
        );
        assert_eq!(
            text("ts6", "timestamp(0) without time zone"),
            "2024-02-29 13:14:15.123456"
        );
        assert_eq!(text("n", "bigint"), "7");
        // Nothing to mark: read as registered.
        assert!(with_debezium_marks(r#"{"type": "long"}"#).is_none());
    }

    #[test]
    fn a_bit_string_field_keeps_its_source_length() {
        // As Debezium's Avro converter registers a bit(12) column.
        let raw = r#"{"type": "record", "name": "Value", "fields": [
            {"name": "b", "type": ["null", {"type": "bytes", "connect.version": 1,
                "connect.parameters": {"length": "12"}, "connect.name": "io.debezium.data.Bits"}],
             "default": null},
            {"name": "raw", "type": ["null", "bytes"], "default": null}]}"#;
        let Schema::Record(record) = with_debezium_marks(raw).expect("a bits field to mark") else {
            panic!("a record")
        };
        let attribute = |i: usize| {
            record.fields[i]
                .custom_attributes
                .get(BITS_LENGTH_ATTRIBUTE)
        };
        assert_eq!(attribute(0), Some(&serde_json::json!("12")));
        assert_eq!(attribute(1), None, "plain bytes are no bit string");
    }

    #[tokio::test]
    async fn a_failed_lookup_is_not_kept() {
        // Nothing listens on port 1: the request fails at once.
        let registry = ConfluentRegistry::new("http://127.0.0.1:1").unwrap();
        for _ in 0..2 {
            let e = registry.schema(5).await.unwrap_err();
            assert!(matches!(e, AvroError::Registry(_)), "{e}");
        }
        let source = AvroSource::with_schemas(FixedSchemas::default());
        let bytes = [0, 0, 0, 0, 9, 2];
        assert!(matches!(
            source.decode(Some(&bytes)).await,
            Err(AvroError::UnknownSchema(_))
        ));
        assert!(source.cached().0 == 0, "no reader kept for a failure");
    }

    #[test]
    fn wire_format_is_magic_id_datum() {
        assert_eq!(
            split_wire_format(&[0, 0, 0, 1, 7, 42, 43]),
            Ok((263, &[42u8, 43][..]))
        );
        assert_eq!(split_wire_format(&[0, 0, 0, 0, 1]), Ok((1, &[][..])));
        assert!(split_wire_format(&[0, 0, 1])
            .unwrap_err()
            .contains("too short"));
        assert!(split_wire_format(&[1, 0, 0, 0, 1, 2])
            .unwrap_err()
            .contains("magic"));
    }

    /// A registry of `n` distinct schemas (ids 1..=n) that counts lookups.
    struct Counting(FixedSchemas, Arc<std::sync::atomic::AtomicUsize>);

    impl SchemaSource for Counting {
        fn schema(&self, id: u32) -> BoxFuture<'_, Result<Schema, AvroError>> {
            self.1.fetch_add(1, Ordering::Relaxed);
            self.0.schema(id)
        }
    }

    fn counting(n: u32) -> (Counting, Arc<std::sync::atomic::AtomicUsize>) {
        let schemas = (1..=n)
            .map(|id| {
                let text = format!(r#"{{"type": "record", "name": "R{id}", "fields": [{{"name": "x", "type": "long"}}]}}"#);
                (id, Schema::parse_str(&text).unwrap())
            })
            .collect();
        let asked = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        (Counting(FixedSchemas(schemas), asked.clone()), asked)
    }

    fn message(id: u32) -> Vec<u8> {
        let mut bytes = vec![0];
        bytes.extend(id.to_be_bytes());
        bytes.push(2); // x = 1
        bytes
    }

    #[tokio::test]
    async fn readers_of_arbitrary_schema_ids_are_kept_within_the_cache_bound() {
        let one = Schema::parse_str(
            r#"{"type": "record", "name": "R1000", "fields": [{"name": "x", "type": "long"}]}"#,
        )
        .unwrap()
        .canonical_form()
        .len();
        // Room for 10 schemas; 1,000 ids are seen.
        let (registry, asked) = counting(1000);
        let source = AvroSource::with_cache_limit(registry, 10 * one);
        for id in 1..=1000 {
            let datum = source.decode(Some(&message(id))).await.unwrap().unwrap();
            assert_eq!(
                datum.value,
                Value::Record(vec![("x".into(), Value::Long(1))])
            );
        }
        let (kept, bytes) = source.cached();
        assert!(
            kept <= 10 && bytes <= 10 * one,
            "{kept} readers, {bytes} bytes"
        );
        // A schema in use stays (least recently used out), an evicted one
        // is asked for again.
        assert_eq!(asked.load(Ordering::Relaxed), 1000);
        for _ in 0..3 {
            for id in [7, 1000] {
                source.decode(Some(&message(id))).await.unwrap();
            }
        }
        assert_eq!(
            asked.load(Ordering::Relaxed),
            1001,
            "7 asked for once again, 1000 kept"
        );
    }

    #[tokio::test]
    async fn a_recursive_schema_with_a_uuid_is_bounded_too() {
        // A uuid once made apache-avro read the whole datum, recursing once
        // per level with no limit: now it reads only the uuid itself.
        let schema = Schema::parse_str(
            r#"{"type": "record", "name": "Node", "fields": [
                {"name": "id", "type": {"type": "string", "logicalType": "uuid"}},
                {"name": "next", "type": ["null", "Node"]}]}"#,
        )
        .unwrap();
        let source = AvroSource::with_schemas(FixedSchemas([(3, schema)].into_iter().collect()));
        let uuid = "0b7c1a36-5f8e-4c0e-9d4e-2f3a1b6c7d8e";
        let node = |last: bool| {
            let mut bytes = vec![uuid.len() as u8 * 2];
            bytes.extend(uuid.as_bytes());
            bytes.push(if last { 0 } else { 2 });
            bytes
        };
        let mut shallow = vec![0, 0, 0, 0, 3];
        shallow.extend(node(false));
        shallow.extend(node(true));
        let read = source.decode(Some(&shallow)).await.unwrap().unwrap();
        assert!(matches!(read.value, Value::Record(_)));
        let mut deep = vec![0, 0, 0, 0, 3];
        for _ in 0..50_000 {
            deep.extend(node(false));
        }
        deep.extend(node(true));
        match source.decode_envelope(Some(&deep)).await {
            Err(AvroError::Limit(e)) => {
                assert!(
                    e.contains("schema id 3") && e.contains("depth limit"),
                    "{e}"
                )
            }
            Err(other) => panic!("{other}"),
            Ok(_) => panic!("read"),
        }
    }
}
