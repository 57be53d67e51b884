//! The one error decision. Every failure of a message or of a batch is
//! named here and given its verdict: retry, dead-letter (with one label of
//! [`metrics::reason`](crate::metrics::reason)), or stop. JSON and Avro
//! give the same label for the same fault; the DLQ header
//! `regionsync.reason` and the `reason` label of
//! `regionsync_dlq_messages_total` carry it.
//!
//! A change is dead-lettered only when it would fail the same way whatever
//! the state of the infrastructure: it cannot be decoded, or a value cannot
//! be written to its column. A fault of the infrastructure (the registry,
//! a missing grant or table, a lost connection) holds the partition at the
//! change and is retried, counted in `regionsync_retries_total{reason}`
//! (labels in [`metrics::retry`](crate::metrics::retry)).
//!
//! Also the one backoff: capped exponential with jitter, used by every loop
//! that waits a fault out.

use std::time::Duration;

use tracing::warn;

use crate::apply::RowError;
use crate::config::{ClockAhead, Config, OnError, OnSchemaMismatch, UnknownSchema};
use crate::decode::registry::AvroError;
use crate::decode::DecodeError;
use crate::metrics::{self as m, reason, retry};

/// Why one message cannot be applied.
#[derive(Debug, thiserror::Error)]
pub enum Fault {
    #[error("message of {size} bytes is above apply.max_message_bytes ({limit})")]
    Oversized { size: usize, limit: usize },
    #[error("{0}")]
    Decode(DecodeError),
    #[error("{part}: {error}")]
    Avro {
        part: &'static str,
        error: AvroError,
    },
    #[error("an Avro message, but no schema registry is configured for region {0}")]
    NoRegistry(String),
    #[error("an event of table {source_table} on {topic}, which feeds {target}")]
    UnconfiguredTable {
        source_table: String,
        topic: String,
        target: String,
    },
    #[error("{0}")]
    Row(RowError),
    /// PostgreSQL refused the row alone, in a savepoint.
    #[error("{table}: {detail}")]
    RefusedByPostgres { table: String, detail: String },
    /// PostgreSQL refused the row alone because this region's schema is
    /// not the source's (a CHECK, NOT NULL or limit only this region has),
    /// set aside under `on_schema_mismatch = "dlq"`.
    #[error("{table}: {detail} (a schema difference: this region's column or constraint is not the source's)")]
    SchemaRefused { table: String, detail: String },
    /// A change or truncate dated further ahead of the local clock than
    /// `max_clock_skew` (`what`: its HLC or its source commit time).
    #[error("{what} is {ahead:?} ahead of this worker's clock, beyond max_clock_skew ({limit:?})")]
    ClockAhead {
        what: &'static str,
        ahead: std::time::Duration,
        limit: std::time::Duration,
    },
}

impl Fault {
    /// The fault's bounded label, the same whichever encoding carried it.
    pub fn reason(&self) -> &'static str {
        match self {
            Fault::Oversized { .. } => reason::OVERSIZED,
            Fault::Decode(e) => match e {
                DecodeError::MissingKey => reason::NULL_KEY,
                DecodeError::Json(_) => reason::NOT_JSON,
                DecodeError::Avro(_) => reason::BAD_AVRO,
                DecodeError::Column { .. } => reason::BAD_VALUE,
                DecodeError::Envelope(_) | DecodeError::UnknownOp(_) => reason::BAD_ENVELOPE,
            },
            Fault::Avro {
                error: AvroError::Registry(_),
                ..
            } => reason::REGISTRY,
            Fault::Avro {
                error: AvroError::Datum(_),
                ..
            } => reason::BAD_AVRO,
            Fault::Avro {
                error: AvroError::Limit(_),
                ..
            } => reason::AVRO_LIMIT,
            Fault::Avro {
                error: AvroError::UnknownSchema(_),
                ..
            } => reason::UNKNOWN_SCHEMA,
            Fault::NoRegistry(_) => reason::NO_REGISTRY,
            Fault::UnconfiguredTable { .. } => reason::UNCONFIGURED_TABLE,
            Fault::Row(RowError::Value { .. }) => reason::BAD_VALUE,
            Fault::Row(RowError::Shape { .. }) => reason::BAD_SHAPE,
            Fault::Row(RowError::Schema { .. }) => reason::SCHEMA_MISMATCH,
            Fault::RefusedByPostgres { .. } => reason::REJECTED_BY_POSTGRES,
            Fault::SchemaRefused { .. } => reason::SCHEMA_MISMATCH,
            Fault::ClockAhead { .. } => reason::CLOCK_AHEAD,
        }
    }
}

/// What the worker does about a failure.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Wait (with backoff) and try the same changes again.
    Retry,
    /// Send the message to the dead-letter topic and move past it.
    DeadLetter,
    /// Stop the worker with the error.
    Stop,
    /// Apply the batch again change by change, in the order the source
    /// committed them, in one transaction: an order the source proved
    /// possible. Only a change refused there is the data's fault.
    InSourceOrder,
}

impl Fault {
    /// The `retry` label of a fault that is waited out, `None` for the
    /// message's own faults.
    pub fn retry_reason(&self, config: &Config) -> Option<&'static str> {
        match self {
            Fault::Avro {
                error: AvroError::Registry(_),
                ..
            } => Some(retry::REGISTRY),
            Fault::Avro {
                error: AvroError::UnknownSchema(_),
                ..
            } if config.schema_registry.unknown_schema == UnknownSchema::Retry => {
                Some(retry::UNKNOWN_SCHEMA)
            }
            // A migration not yet run here: waited out, the table's layout
            // read again before each retry.
            Fault::Row(RowError::Schema {
                policy: OnSchemaMismatch::Hold,
                ..
            }) => Some(retry::SCHEMA_MISMATCH),
            Fault::ClockAhead { .. } if config.clock_ahead == ClockAhead::Hold => {
                Some(retry::CLOCK_AHEAD)
            }
            _ => None,
        }
    }
}

/// The verdict on a message that cannot be applied.
pub fn message_verdict(fault: &Fault, config: &Config) -> Verdict {
    if fault.retry_reason(config).is_some() {
        return Verdict::Retry;
    }
    match fault {
        Fault::Row(RowError::Schema {
            policy: OnSchemaMismatch::Stop,
            ..
        }) => return Verdict::Stop,
        Fault::Row(RowError::Schema {
            policy: OnSchemaMismatch::Dlq,
            ..
        }) => return Verdict::DeadLetter,
        _ => {}
    }
    match config.on_error {
        OnError::Stop => Verdict::Stop,
        OnError::Dlq => Verdict::DeadLetter,
    }
}

/// A batch's database failure.
#[derive(Debug)]
pub enum BatchError {
    /// PostgreSQL refused the data (a bad value, a constraint): find the
    /// rows it refuses, one by one.
    Data(tokio_postgres::Error),
    /// A constraint between rows refused a row: a unique index or an
    /// exclusion constraint (23505, 23P01: `unique_wait`), a foreign key
    /// (23503, 23001: `foreign_key_wait`). The source satisfied it, so the
    /// order of the writes is at fault, never the row: applied in source
    /// order, and where that still fails (the value is held, or the parent
    /// row is missing, because a change of another partition or topic has
    /// not been applied yet) waited out with the `retry` label.
    Wait(&'static str, tokio_postgres::Error),
    /// The connection or server failed: retry the whole batch.
    Transient(anyhow::Error),
    /// PostgreSQL refused for a reason outside the data (a privilege, a
    /// missing table or column): hold the batch and retry it, with the
    /// `retry` label.
    Held(&'static str, tokio_postgres::Error),
}

impl BatchError {
    /// The `retry` label of a failure that is waited out.
    pub fn retry_reason(&self) -> &'static str {
        match self {
            BatchError::Held(reason, _) | BatchError::Wait(reason, _) => reason,
            _ => retry::POSTGRES_UNAVAILABLE,
        }
    }

    pub fn into_error(self) -> anyhow::Error {
        match self {
            BatchError::Data(e) | BatchError::Wait(_, e) | BatchError::Held(_, e) => e.into(),
            BatchError::Transient(e) => e,
        }
    }
}

/// A PostgreSQL error as the operator needs it: its message, with its
/// SQLSTATE, detail and hint (which name the other table of a foreign key,
/// and what to do), for the log line of a batch held by it. The detail
/// quotes row values: for the log, not for `/readyz`.
pub fn db_error_text(d: &tokio_postgres::error::DbError) -> String {
    let mut text = format!("{} (SQLSTATE {})", d.message(), d.code().code());
    if let Some(detail) = d.detail() {
        text.push_str(&format!("; {detail}"));
    }
    if let Some(hint) = d.hint() {
        text.push_str(&format!("; hint: {hint}"));
    }
    text
}

/// SQLSTATEs of a value refused for its column's type: text the type
/// cannot read (22P02), a date or time it cannot read (22007, 22008), an
/// expression of another type than the column's (42804, 42846: the
/// statement was built on a layout read before the column was retyped).
/// Most often the column's type was changed here: the table's layout is
/// read again, and the batch planned anew on it, before any value is
/// judged bad data (docs/SCHEMA-CHANGES.md).
pub const TYPE_REFUSALS: &[&str] = &["22P02", "22007", "22008", "42804", "42846"];

impl BatchError {
    /// PostgreSQL refused a value for its column's type ([`TYPE_REFUSALS`]).
    pub fn is_type_refusal(&self) -> bool {
        matches!(self, BatchError::Data(e)
            if e.code().is_some_and(|c| TYPE_REFUSALS.contains(&c.code())))
    }
}

/// Sorts a PostgreSQL error into [`BatchError`] by its SQLSTATE.
pub fn classify(e: tokio_postgres::Error) -> BatchError {
    let Some(code) = e.code().map(|c| c.code().to_owned()) else {
        return BatchError::Transient(e.into());
    };
    match sort_sqlstate(&code) {
        Sqlstate::Held(reason) => BatchError::Held(reason, e),
        Sqlstate::Wait(reason) => BatchError::Wait(reason, e),
        Sqlstate::Data => BatchError::Data(e),
        Sqlstate::Transient => BatchError::Transient(e.into()),
    }
}

/// What a SQLSTATE is, for [`classify`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sqlstate {
    /// Outside the data: hold the batch, with this `retry` label.
    Held(&'static str),
    /// A constraint between rows the source satisfied: source order, then
    /// a wait with this `retry` label.
    Wait(&'static str),
    /// The row's own fault: source order, then dead-lettered.
    Data,
    /// The connection or the server.
    Transient,
}

/// The kind of a SQLSTATE (the one table of them).
pub fn sort_sqlstate(code: &str) -> Sqlstate {
    match code {
        // A REVOKE, or a role set up without its grants: a GRANT fixes it.
        "42501" => Sqlstate::Held(retry::POSTGRES_PERMISSION),
        // Undefined table, column, object (type) or function: a migration
        // in progress, or a table not yet created.
        "42P01" | "42703" | "42704" | "42883" => Sqlstate::Held(retry::POSTGRES_SCHEMA),
        // Feature not supported (class 0A), e.g. a TRUNCATE of a table
        // another table's foreign key references: this region's setup
        // differs (the error's detail and hint, logged, name the tables),
        // never a passing outage nor the row's fault.
        c if c.starts_with("0A") => Sqlstate::Held(retry::POSTGRES_SCHEMA),
        // Object not in prerequisite state, exactly (not the rest of class
        // 55: 55P03 is a lock timeout): this region's setup again, e.g. a
        // DEFERRABLE key an upsert cannot take as its arbiter, or a table
        // published for updates without a replica identity.
        "55000" => Sqlstate::Held(retry::POSTGRES_SCHEMA),
        // A value too long or out of range, a NULL where this region has
        // NOT NULL, a CHECK only this region has: the source's row passed
        // its own schema, and a CHECK reads only its row, so this region's
        // schema differs (`on_schema_mismatch` decides).
        "22001" | "22003" | "23502" | "23514" => Sqlstate::Held(retry::SCHEMA_MISMATCH),
        // Constraints between rows the source satisfied: the other row
        // (the value's holder, the parent) is a change not applied yet.
        "23505" | "23P01" => Sqlstate::Wait(retry::UNIQUE_WAIT),
        // A foreign key refuses only where its triggers fire on replicated
        // writes (ENABLE ALWAYS): the apply role `replica` skips them.
        "23503" | "23001" => Sqlstate::Wait(retry::FOREIGN_KEY_WAIT),
        // Classes 22 (data exception), 23 (integrity constraint), the rest
        // of 42 (e.g. a cast that does not fit): the row, not the server.
        c if ["22", "23", "42"].iter().any(|class| c.starts_with(class)) => Sqlstate::Data,
        _ => Sqlstate::Transient,
    }
}

/// The verdict on a batch that failed in PostgreSQL when applied collapsed
/// (one statement per table and kind): a data error, a unique index or a
/// foreign key is first tried again in source order (where a refused change then
/// becomes a [`Fault::RefusedByPostgres`] with [`refused_verdict`]);
/// anything else is retried.
pub fn batch_verdict(e: &BatchError) -> Verdict {
    match e {
        BatchError::Data(_) | BatchError::Wait(..) => Verdict::InSourceOrder,
        BatchError::Transient(_) | BatchError::Held(..) => Verdict::Retry,
    }
}

/// The verdict on a change PostgreSQL refused alone, in source order after
/// the changes before it: dead-lettered, or the worker stops with
/// `on_error = stop`. (A unique index or a foreign key is never this: it
/// is waited out.)
pub fn refused_verdict(on_error: OnError) -> Verdict {
    match on_error {
        OnError::Stop => Verdict::Stop,
        OnError::Dlq => Verdict::DeadLetter,
    }
}

/// The verdict on a batch PostgreSQL refused for a schema difference (a
/// value this region's column cannot hold, a NOT NULL the source lacks),
/// by the table's `on_schema_mismatch`; `None` for any other failure.
/// Dead-lettering isolates the rows at fault, as for a data error.
pub fn schema_verdict(e: &BatchError, policy: OnSchemaMismatch) -> Option<Verdict> {
    match e {
        BatchError::Held(reason, _) if *reason == retry::SCHEMA_MISMATCH => Some(match policy {
            OnSchemaMismatch::Hold => Verdict::Retry,
            OnSchemaMismatch::Dlq => Verdict::DeadLetter,
            OnSchemaMismatch::Stop => Verdict::Stop,
        }),
        _ => None,
    }
}

/// Capped exponential backoff: 200 ms, doubling, at most 5 s, each wait
/// shortened by up to a fifth at random so that partitions held by one
/// fault do not retry in step. Each wait counts in
/// `regionsync_retries_total{reason}`, and a wait for PostgreSQL's
/// connection in `regionsync_postgres_reconnects_total` too.
pub struct Backoff {
    delay: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            delay: Duration::from_millis(200),
        }
    }
}

impl Backoff {
    /// The delay the next [`Backoff::wait`] sleeps.
    pub fn delay(&self) -> Duration {
        self.delay
    }

    pub async fn wait(&mut self, reason: &'static str) {
        metrics::counter!(m::RETRIES_TOTAL, "reason" => reason).increment(1);
        if reason == retry::POSTGRES_UNAVAILABLE {
            metrics::counter!(m::POSTGRES_RECONNECTS_TOTAL).increment(1);
        }
        // Jitter from the clock's nanoseconds: no generator state needed.
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let jitter = self.delay.mul_f64(f64::from(nanos % 1000) / 5000.0);
        tokio::time::sleep(self.delay - jitter).await;
        self.delay = (self.delay * 2).min(Duration::from_secs(5));
    }
}

/// Runs `f` until it succeeds, logging each failure and backing off.
pub async fn with_retry<T, E: std::fmt::Display, F, Fut>(what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, E>>,
{
    let mut backoff = Backoff::default();
    loop {
        match f().await {
            Ok(v) => return v,
            Err(e) => {
                warn!(error = %e, retry_in = ?backoff.delay(), "{what} failed");
                backoff.wait(retry::POSTGRES_UNAVAILABLE).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decode::{decode_avro, decode_json};
    use apache_avro::types::Value as AvroValue;
    use apache_avro::Schema;
    use serde_json::json;

    fn json_fault(key: Option<serde_json::Value>, value: serde_json::Value) -> &'static str {
        let key = key.map(|k| serde_json::to_vec(&k).unwrap());
        let value = serde_json::to_vec(&value).unwrap();
        let e = decode_json(key.as_deref(), Some(&value)).expect_err("a fault");
        Fault::Decode(e).reason()
    }

    const VALUE_SCHEMA: &str = r#"{"type": "record", "name": "Envelope", "namespace": "t", "fields": [
        {"name": "before", "type": ["null", {"type": "record", "name": "Value", "fields": [
            {"name": "id", "type": "long"},
            {"name": "d", "type": ["null", {"type": "record", "name": "VariableScaleDecimal",
                "namespace": "io.debezium.data", "connect.name": "io.debezium.data.VariableScaleDecimal",
                "fields": [{"name": "scale", "type": "int"}, {"name": "value", "type": "bytes"}]}]}]}]},
        {"name": "after", "type": ["null", "Value"]},
        {"name": "source", "type": {"type": "record", "name": "Source", "fields": [
            {"name": "ts_ms", "type": "long"}, {"name": "schema", "type": "string"},
            {"name": "table", "type": "string"}]}},
        {"name": "op", "type": "string"}]}"#;

    fn avro_fault(op: &str, after: AvroValue) -> &'static str {
        let schema = Schema::parse_str(VALUE_SCHEMA).unwrap();
        let key_schema = Schema::parse_str(
            r#"{"type": "record", "name": "Key", "fields": [{"name": "id", "type": "long"}]}"#,
        )
        .unwrap();
        let key = AvroValue::Record(vec![("id".into(), AvroValue::Long(1))]);
        let source = AvroValue::Record(vec![
            ("ts_ms".into(), AvroValue::Long(1)),
            ("schema".into(), AvroValue::String("public".into())),
            ("table".into(), AvroValue::String("t".into())),
        ]);
        let value = AvroValue::Record(vec![
            (
                "before".into(),
                AvroValue::Union(0, Box::new(AvroValue::Null)),
            ),
            ("after".into(), after),
            ("source".into(), source),
            ("op".into(), AvroValue::String(op.into())),
        ]);
        let key_schema: &'static Schema = Box::leak(Box::new(key_schema));
        let schema: &'static Schema = Box::leak(Box::new(schema));
        let e = decode_avro(key, key_schema, Some((value, schema))).expect_err("a fault");
        Fault::Decode(e).reason()
    }

    fn avro_row(d: AvroValue) -> AvroValue {
        AvroValue::Union(
            1,
            Box::new(AvroValue::Record(vec![
                ("id".into(), AvroValue::Long(1)),
                ("d".into(), d),
            ])),
        )
    }

    #[test]
    fn json_and_avro_give_one_reason_per_fault() {
        let source = json!({"ts_ms": 1, "schema": "public", "table": "t"});
        let key = Some(json!({"id": 1}));
        // An op that is none of c, u, d, r, t.
        assert_eq!(
            json_fault(
                key.clone(),
                json!({"op": "x", "source": source, "after": {"id": 1}})
            ),
            reason::BAD_ENVELOPE
        );
        assert_eq!(
            avro_fault(
                "x",
                avro_row(AvroValue::Union(0, Box::new(AvroValue::Null)))
            ),
            reason::BAD_ENVELOPE
        );
        // An insert without its row image.
        assert_eq!(
            json_fault(key.clone(), json!({"op": "c", "source": source})),
            reason::BAD_ENVELOPE
        );
        assert_eq!(
            avro_fault("c", AvroValue::Union(0, Box::new(AvroValue::Null))),
            reason::BAD_ENVELOPE
        );
        // A value that is not what its semantic type says (a numeric
        // with a negative scale).
        assert_eq!(
            json_fault(
                key.clone(),
                json!({"schema": {"type": "struct", "fields": [
                    {"field": "after", "type": "struct", "optional": true, "fields": [
                        {"field": "id", "type": "int64"},
                        {"field": "d", "type": "struct", "optional": true,
                         "name": "io.debezium.data.VariableScaleDecimal", "fields": [
                            {"field": "scale", "type": "int32"}, {"field": "value", "type": "bytes"}]}]},
                    {"field": "op", "type": "string"},
                    {"field": "source", "type": "struct", "fields": []}]},
                 "payload": {"op": "c", "source": source, "after": {"id": 1, "d": {"scale": -1, "value": "AQ=="}}}})
            ),
            reason::BAD_VALUE
        );
        assert_eq!(
            avro_fault(
                "c",
                avro_row(AvroValue::Union(
                    1,
                    Box::new(AvroValue::Record(vec![
                        ("scale".into(), AvroValue::Int(-1)),
                        ("value".into(), AvroValue::Bytes(vec![1])),
                    ]))
                ))
            ),
            reason::BAD_VALUE
        );
        // No key on a change that is not a truncate.
        assert_eq!(
            json_fault(
                None,
                json!({"op": "c", "source": source, "after": {"id": 1}})
            ),
            reason::NULL_KEY
        );
    }

    #[test]
    fn avro_faults_tell_the_registry_from_the_datum() {
        let registry = Fault::Avro {
            part: "value",
            error: AvroError::Registry("connection refused".into()),
        };
        let datum = Fault::Avro {
            part: "value",
            error: AvroError::Datum("the datum ends".into()),
        };
        let limit = Fault::Avro {
            part: "value",
            error: AvroError::Limit("values nested deeper than 64 levels".into()),
        };
        assert_eq!(registry.reason(), reason::REGISTRY);
        assert_eq!(datum.reason(), reason::BAD_AVRO);
        // A datum beyond the reader's bounds is the data's fault.
        assert_eq!(limit.reason(), reason::AVRO_LIMIT);
        let config = config("");
        assert_eq!(message_verdict(&limit, &config), Verdict::DeadLetter);
        assert_eq!(limit.retry_reason(&config), None);
        assert_eq!(
            Fault::Decode(DecodeError::Avro("x".into())).reason(),
            reason::BAD_AVRO
        );
    }

    #[test]
    fn every_label_is_one_of_the_documented_set() {
        let faults = [
            Fault::Oversized { size: 2, limit: 1 },
            Fault::Decode(DecodeError::MissingKey),
            Fault::Decode(DecodeError::Json("x".into())),
            Fault::NoRegistry("r".into()),
            Fault::Avro {
                part: "value",
                error: AvroError::Limit("l".into()),
            },
            Fault::UnconfiguredTable {
                source_table: "a.b".into(),
                topic: "t".into(),
                target: "c".into(),
            },
            Fault::Row(RowError::Shape {
                table: "t".into(),
                problem: "p".into(),
            }),
            Fault::Row(RowError::Schema {
                table: "t".into(),
                problem: "p".into(),
                policy: OnSchemaMismatch::Dlq,
            }),
            Fault::RefusedByPostgres {
                table: "t".into(),
                detail: "d".into(),
            },
            Fault::SchemaRefused {
                table: "t".into(),
                detail: "d".into(),
            },
            Fault::ClockAhead {
                what: "ts_ms",
                ahead: std::time::Duration::from_secs(60),
                limit: std::time::Duration::from_secs(5),
            },
        ];
        for f in &faults {
            assert!(reason::ALL.contains(&f.reason()), "{f:?}");
        }
    }

    fn config(extra: &str) -> Config {
        super::super::test_config(extra)
    }

    #[test]
    fn the_registry_is_waited_out_and_never_costs_a_change() {
        let unreachable = Fault::Avro {
            part: "key",
            error: AvroError::Registry("connection refused".into()),
        };
        let unknown = Fault::Avro {
            part: "value",
            error: AvroError::UnknownSchema("schema id 9: 404".into()),
        };
        for on_error in ["", "on_error = \"stop\""] {
            let c = config(on_error);
            assert_eq!(message_verdict(&unreachable, &c), Verdict::Retry);
            assert_eq!(message_verdict(&unknown, &c), Verdict::Retry);
            assert_eq!(unreachable.retry_reason(&c), Some(retry::REGISTRY));
        }
        // Dead-lettered only where the operator says so.
        let mut c = config("");
        c.schema_registry.unknown_schema = UnknownSchema::Dlq;
        assert_eq!(message_verdict(&unknown, &c), Verdict::DeadLetter);
        assert_eq!(unknown.reason(), reason::UNKNOWN_SCHEMA);
        assert_eq!(message_verdict(&unreachable, &c), Verdict::Retry);
    }

    #[test]
    fn constraints_the_source_satisfied_are_waits_or_schema_differences() {
        // Between rows: another partition's change is not applied yet.
        assert_eq!(sort_sqlstate("23505"), Sqlstate::Wait(retry::UNIQUE_WAIT));
        assert_eq!(sort_sqlstate("23P01"), Sqlstate::Wait(retry::UNIQUE_WAIT));
        assert_eq!(
            sort_sqlstate("23503"),
            Sqlstate::Wait(retry::FOREIGN_KEY_WAIT)
        );
        assert_eq!(
            sort_sqlstate("23001"),
            Sqlstate::Wait(retry::FOREIGN_KEY_WAIT)
        );
        // Within the row: this region's schema differs.
        for code in ["23514", "23502", "22001", "22003"] {
            assert_eq!(
                sort_sqlstate(code),
                Sqlstate::Held(retry::SCHEMA_MISMATCH),
                "{code}"
            );
        }
        // A value PostgreSQL cannot take at all: the row's fault, once the
        // layout read again shows the column's type unchanged (type
        // refusals read it again first).
        assert_eq!(sort_sqlstate("22P02"), Sqlstate::Data);
        assert_eq!(sort_sqlstate("42804"), Sqlstate::Data);
        for code in TYPE_REFUSALS {
            assert_eq!(sort_sqlstate(code), Sqlstate::Data, "{code}");
        }
        assert_eq!(
            sort_sqlstate("42501"),
            Sqlstate::Held(retry::POSTGRES_PERMISSION)
        );
        assert_eq!(sort_sqlstate("57P01"), Sqlstate::Transient);
        // A truncate of a table a foreign key references: the setup's.
        assert_eq!(
            sort_sqlstate("0A000"),
            Sqlstate::Held(retry::POSTGRES_SCHEMA)
        );
        // An upsert whose key is DEFERRABLE here: the setup's too; a lock
        // timeout of the same class is not.
        assert_eq!(
            sort_sqlstate("55000"),
            Sqlstate::Held(retry::POSTGRES_SCHEMA)
        );
        assert_eq!(sort_sqlstate("55P03"), Sqlstate::Transient);
        for s in [
            retry::UNIQUE_WAIT,
            retry::FOREIGN_KEY_WAIT,
            retry::SCHEMA_MISMATCH,
        ] {
            assert!(retry::ALL.contains(&s));
        }
    }

    #[test]
    fn on_error_decides_between_dead_letter_and_stop() {
        let f = Fault::Oversized { size: 2, limit: 1 };
        assert_eq!(message_verdict(&f, &config("")), Verdict::DeadLetter);
        assert_eq!(
            message_verdict(&f, &config("on_error = \"stop\"")),
            Verdict::Stop
        );
        let transient = BatchError::Transient(anyhow::anyhow!("connection reset"));
        assert_eq!(batch_verdict(&transient), Verdict::Retry);
        assert_eq!(refused_verdict(OnError::Stop), Verdict::Stop);
        assert_eq!(refused_verdict(OnError::Dlq), Verdict::DeadLetter);
    }

    #[test]
    fn a_schema_mismatch_follows_on_schema_mismatch_not_on_error() {
        let fault = |policy| {
            Fault::Row(RowError::Schema {
                table: "public.t".into(),
                problem: "source column c is not in this region's table".into(),
                policy,
            })
        };
        for on_error in ["", "on_error = \"stop\""] {
            let c = config(on_error);
            let held = fault(OnSchemaMismatch::Hold);
            assert_eq!(message_verdict(&held, &c), Verdict::Retry);
            assert_eq!(held.retry_reason(&c), Some(retry::SCHEMA_MISMATCH));
            assert_eq!(
                message_verdict(&fault(OnSchemaMismatch::Dlq), &c),
                Verdict::DeadLetter
            );
            assert_eq!(
                message_verdict(&fault(OnSchemaMismatch::Stop), &c),
                Verdict::Stop
            );
        }
        assert_eq!(
            fault(OnSchemaMismatch::Dlq).reason(),
            reason::SCHEMA_MISMATCH
        );
    }
}
