//! Metrics: every metric's name in one place (documented in METRICS.md), the
//! one set of bounded label values (`outcome` of a change, `reason` of a
//! dead letter), how a batch's counts are recorded (`record`), and the
//! worker's HTTP endpoint (`server`): `/metrics` (Prometheus text),
//! `/healthz` (the process answers) and `/readyz` (Kafka partitions
//! assigned and PostgreSQL reachable).

pub mod record;
mod server;

pub use server::{install, serve, Readiness, ReadyCheck};

/// Changes by what became of them. Labels: source_region, table, op, outcome.
pub const EVENTS_TOTAL: &str = "regionsync_events_total";
/// Messages a `regionsync rebuild` replayed. Label: topic.
pub const REBUILD_MESSAGES_TOTAL: &str = "regionsync_rebuild_messages_total";
/// Messages a `regionsync rebuild` has still to replay. Label: topic.
pub const REBUILD_REMAINING: &str = "regionsync_rebuild_remaining_messages";
/// Rows per applied batch (histogram).
pub const APPLY_BATCH_ROWS: &str = "regionsync_apply_batch_rows";
/// Seconds from a batch's BEGIN to its COMMIT (histogram).
pub const APPLY_BATCH_SECONDS: &str = "regionsync_apply_batch_seconds";
/// Messages sent to the dead-letter topic. Label: reason.
pub const DLQ_MESSAGES_TOTAL: &str = "regionsync_dlq_messages_total";
/// Waits before a retry, by what was waited out. Label: reason (`retry`).
pub const RETRIES_TOTAL: &str = "regionsync_retries_total";
/// Reconnections to PostgreSQL after a failure.
pub const POSTGRES_RECONNECTS_TOTAL: &str = "regionsync_postgres_reconnects_total";
/// now − source commit time of the newest change or heartbeat whose effects
/// are committed here, in seconds. Label: source_region.
pub const REPLICATION_LAG: &str = "regionsync_replication_lag_seconds";
/// now − source commit time of the newest heartbeat applied here. Label:
/// source_region.
pub const HEARTBEAT_AGE: &str = "regionsync_heartbeat_age_seconds";
/// Apply commit time − source commit time per change (histogram). Label:
/// source_region.
pub const END_TO_END_LATENCY: &str = "regionsync_end_to_end_latency_seconds";
/// High watermark − next offset to apply. Labels: topic, partition.
pub const CONSUMER_LAG: &str = "regionsync_consumer_lag_messages";
/// Concurrent writes detected. Labels: table, policy.
pub const CONFLICTS_TOTAL: &str = "regionsync_conflicts_total";
/// Changes by how their row relates to this region (DESIGN.md §3). Labels:
/// table, class (shared, owner, cross_region, third_region).
pub const WRITES_BY_CLASS_TOTAL: &str = "regionsync_writes_by_class_total";
/// Tombstones removed after `tombstone_grace`.
pub const TOMBSTONES_COLLECTED_TOTAL: &str = "regionsync_tombstones_collected_total";
/// Conflicts in `regionsync.conflicts` not resolved yet (kept however old,
/// unlike resolved ones). Label: table.
pub const CONFLICTS_UNRESOLVED: &str = "regionsync_conflicts_unresolved";
/// Resolved conflicts deleted after `conflicts.retention`.
pub const CONFLICTS_PRUNED_TOTAL: &str = "regionsync_conflicts_pruned_total";
/// Changes whose HLC or source time is further in the future than
/// `max_clock_skew`, dead-lettered or applied by `clock_ahead` (held ones
/// count as retries). Label: source_region.
pub const CLOCK_SKEW_EXCEEDED_TOTAL: &str = "regionsync_clock_skew_exceeded_total";
/// 1 while ready (partitions assigned, PostgreSQL reachable), else 0.
pub const READY: &str = "regionsync_ready";
/// 1 while a partition is stopped because its stored offset is outside the
/// topic (re-created, or a retention gap), else 0. Labels: topic,
/// partition, reason (`beyond_end`, `retention_gap`).
pub const PARTITION_STOPPED: &str = "regionsync_partition_stopped";
/// Partition tasks that panicked and were restarted from their stored
/// offset. Label: topic.
pub const PARTITION_PANICS_TOTAL: &str = "regionsync_partition_panics_total";
/// Source commit time (Unix seconds) of the newest change or heartbeat whose
/// effects are committed here. Label: source_region.
pub const LAST_APPLIED_SOURCE_TIMESTAMP: &str = "regionsync_last_applied_source_timestamp_seconds";

/// Changes committed in their region before it was failed over and applied
/// here only after (the RPO window of that failover). Label: source_region.
pub const RPO_CHANGES_TOTAL: &str = "regionsync_rpo_changes_total";
/// The longest time, in seconds, between such a change's commit and its
/// region's failover, as seen by this worker. Label: source_region.
pub const RPO_WINDOW_SECONDS: &str = "regionsync_rpo_window_seconds";
/// The newest failover homing epoch in this region's database (0: never
/// re-homed).
pub const HOMING_EPOCH: &str = "regionsync_homing_epoch";
/// 1 while `region`'s rows are homed in `acting_home` (an open failover),
/// else 0. Labels: region, acting_home.
pub const REHOMED: &str = "regionsync_rehomed";
/// When the newest failover began (Unix seconds); `time() - ` it is the time
/// since the last failover.
pub const LAST_FAILOVER_TIMESTAMP: &str = "regionsync_last_failover_timestamp_seconds";

/// Configuration reloads asked for by SIGHUP. Label: `result` (`ok`: the
/// pipeline restarted on the new file; `error`: the file was refused and the
/// old configuration kept running).
pub const CONFIG_RELOADS_TOTAL: &str = "regionsync_config_reloads_total";

/// Outcome label values.
pub mod outcome {
    pub const APPLIED: &str = "applied";
    pub const STALE: &str = "stale";
    /// Replaced by a later change of the same key within one batch.
    pub const SUPERSEDED: &str = "superseded";
    pub const ECHO: &str = "echo";
    /// Applied in the source region by its own worker (Debezium's
    /// `source.origin` names a regionsync session), i.e. relayed: the
    /// original reaches this region directly.
    pub const RELAY: &str = "relay";
    pub const DUPLICATE: &str = "duplicate";
    pub const TOMBSTONE: &str = "tombstone";
    pub const HEARTBEAT: &str = "heartbeat";
    pub const DLQ: &str = "dlq";
    /// A cross-region write to a row homed here, held by the table's
    /// `reject` or `manual` policy (recorded in regionsync.conflicts).
    pub const HELD: &str = "held";
    /// A row pinned to a region whose residency excludes this one: never
    /// written here.
    pub const RESIDENCY: &str = "residency";
    /// Older than `tombstone_grace`, for a key with no row here: not
    /// applied (`late_changes = "skip"`).
    pub const LATE: &str = "late";
}

/// Dead-letter reason label values: the `reason` of
/// `regionsync_dlq_messages_total` and the DLQ header `regionsync.reason`.
/// `worker::failure` gives each fault one of these, the same for JSON and
/// Avro.
pub mod reason {
    /// Key and value above `apply.max_message_bytes`.
    pub const OVERSIZED: &str = "oversized";
    /// An event of a table other than the one its topic feeds.
    pub const UNCONFIGURED_TABLE: &str = "unconfigured_table";
    /// No key on a change that is not a truncate.
    pub const NULL_KEY: &str = "null_key";
    /// Bytes that are not JSON (and not Avro's wire format).
    pub const NOT_JSON: &str = "not_json";
    /// Avro bytes that are not a datum of their writer schema.
    pub const BAD_AVRO: &str = "bad_avro";
    /// An Avro datum beyond a bound of the reader: nested deeper than its
    /// depth limit, or more items than its item-memory budget.
    pub const AVRO_LIMIT: &str = "avro_limit";
    /// The writer schema could not be had from the registry.
    pub const REGISTRY: &str = "registry";
    /// Not a Debezium envelope (missing or wrong parts, unknown op).
    pub const BAD_ENVELOPE: &str = "bad_envelope";
    /// A value that cannot be decoded, or cannot be written to its column
    /// without changing it.
    pub const BAD_VALUE: &str = "bad_value";
    /// A row without what the apply needs (version columns, key).
    pub const BAD_SHAPE: &str = "bad_shape";
    /// An Avro message from a region without a configured registry.
    pub const NO_REGISTRY: &str = "no_registry";
    /// PostgreSQL refused the row alone.
    pub const REJECTED_BY_POSTGRES: &str = "rejected_by_postgres";

    /// The registry does not know the schema id (with
    /// `schema_registry.unknown_schema = "dlq"`).
    pub const UNKNOWN_SCHEMA: &str = "unknown_schema";

    /// A schema difference between source and target, dead-lettered by
    /// `on_schema_mismatch = "dlq"`.
    pub const SCHEMA_MISMATCH: &str = "schema_mismatch";
    /// A change or truncate dated beyond `max_clock_skew` (with
    /// `clock_ahead = "dlq"`).
    pub const CLOCK_AHEAD: &str = "clock_ahead";

    /// Every reason, for documentation checks.
    pub const ALL: [&str; 15] = [
        OVERSIZED,
        UNCONFIGURED_TABLE,
        NULL_KEY,
        NOT_JSON,
        BAD_AVRO,
        AVRO_LIMIT,
        REGISTRY,
        BAD_ENVELOPE,
        BAD_VALUE,
        BAD_SHAPE,
        NO_REGISTRY,
        REJECTED_BY_POSTGRES,
        UNKNOWN_SCHEMA,
        SCHEMA_MISMATCH,
        CLOCK_AHEAD,
    ];
}

/// Retry reason label values: the `reason` of `regionsync_retries_total`.
/// A fault the worker waits out holds its partition at the change; none of
/// them is ever dead-lettered.
pub mod retry {
    /// The schema registry could not be reached, timed out or failed.
    pub const REGISTRY: &str = "registry";
    /// The registry does not know a schema id (`unknown_schema = "retry"`).
    pub const UNKNOWN_SCHEMA: &str = "unknown_schema";
    /// PostgreSQL refused for want of a privilege (SQLSTATE 42501).
    pub const POSTGRES_PERMISSION: &str = "postgres_permission";
    /// A table, column, type or function the statement needs is missing
    /// (SQLSTATE 42P01, 42703, 42704, 42883).
    pub const POSTGRES_SCHEMA: &str = "postgres_schema";
    /// The connection or the server failed.
    pub const POSTGRES_UNAVAILABLE: &str = "postgres_unavailable";
    /// The dead-letter topic did not acknowledge.
    pub const DLQ_UNAVAILABLE: &str = "dlq_unavailable";
    /// A change met a schema difference this region has not caught up
    /// with (a column added upstream first, a type widened there first),
    /// held by `on_schema_mismatch = "hold"`.
    pub const SCHEMA_MISMATCH: &str = "schema_mismatch";

    /// A unique index refuses a change in source order: the value is still
    /// held by a row another partition (or the source's later change) has
    /// not moved yet (SQLSTATE 23505).
    pub const UNIQUE_WAIT: &str = "unique_wait";
    /// A foreign key refuses a change in source order (SQLSTATE 23503,
    /// 23001): the row it needs (a parent, on another topic or partition)
    /// has not arrived yet, or a row still referencing it has not gone.
    /// Only where the key's triggers fire on replicated writes (ENABLE
    /// ALWAYS): the apply sessions' replica role skips them otherwise.
    pub const FOREIGN_KEY_WAIT: &str = "foreign_key_wait";
    /// PostgreSQL refused a statement that is no single change's (the
    /// offset row, the commit, a truncate): held, never dead-lettered.
    pub const POSTGRES_REFUSED: &str = "postgres_refused";
    /// A change or truncate dated beyond `max_clock_skew`, held until the
    /// local clock is within it (`clock_ahead = "hold"`).
    pub const CLOCK_AHEAD: &str = "clock_ahead";
    /// Kafka did not answer the check of a newly assigned partition's
    /// stored offset against the topic (its watermarks, its cleanup
    /// policy): the partition is not resumed until it does.
    pub const KAFKA_UNAVAILABLE: &str = "kafka_unavailable";

    pub const ALL: [&str; 12] = [
        REGISTRY,
        UNKNOWN_SCHEMA,
        POSTGRES_PERMISSION,
        POSTGRES_SCHEMA,
        POSTGRES_UNAVAILABLE,
        DLQ_UNAVAILABLE,
        SCHEMA_MISMATCH,
        UNIQUE_WAIT,
        FOREIGN_KEY_WAIT,
        POSTGRES_REFUSED,
        CLOCK_AHEAD,
        KAFKA_UNAVAILABLE,
    ];
}
