//! Metrics: every metric's name in one place (documented in METRICS.md), the
//! bounded label values, and the Prometheus endpoint.

use std::net::SocketAddr;

use metrics_exporter_prometheus::PrometheusBuilder;

/// Changes by what became of them. Labels: source_region, table, op, outcome.
pub const EVENTS_TOTAL: &str = "regionsync_events_total";
/// Rows per applied batch (histogram).
pub const APPLY_BATCH_ROWS: &str = "regionsync_apply_batch_rows";
/// Seconds from a batch's BEGIN to its COMMIT (histogram).
pub const APPLY_BATCH_SECONDS: &str = "regionsync_apply_batch_seconds";
/// Messages sent to the dead-letter topic. Label: reason.
pub const DLQ_MESSAGES_TOTAL: &str = "regionsync_dlq_messages_total";
/// Reconnections to PostgreSQL after a failure.
pub const POSTGRES_RECONNECTS_TOTAL: &str = "regionsync_postgres_reconnects_total";
/// Source commit time (Unix seconds) of the newest change or heartbeat whose
/// effects are committed here. Label: source_region.
pub const LAST_APPLIED_SOURCE_TIMESTAMP: &str = "regionsync_last_applied_source_timestamp_seconds";

/// Outcome label values.
pub mod outcome {
    pub const APPLIED: &str = "applied";
    pub const STALE: &str = "stale";
    /// Replaced by a later change of the same key within one batch.
    pub const SUPERSEDED: &str = "superseded";
    pub const ECHO: &str = "echo";
    pub const DUPLICATE: &str = "duplicate";
    pub const TOMBSTONE: &str = "tombstone";
    pub const HEARTBEAT: &str = "heartbeat";
    pub const DLQ: &str = "dlq";
}

/// Installs the global recorder and serves it on `listen` at `/metrics`.
pub fn serve(listen: SocketAddr) -> anyhow::Result<()> {
    PrometheusBuilder::new()
        .with_http_listener(listen)
        .set_buckets(&[
            0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
        ])?
        .install()?;
    Ok(())
}
