//! Metrics: every metric's name in one place (documented in METRICS.md), the
//! bounded label values, and the worker's HTTP endpoint: `/metrics`
//! (Prometheus text), `/healthz` (the process answers) and `/readyz` (Kafka
//! partitions assigned and PostgreSQL reachable).

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use futures::future::BoxFuture;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use metrics_util::MetricKindMask;

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
/// Changes whose HLC is further in the future than `max_clock_skew` (still
/// applied; they are flagged). Label: source_region.
pub const CLOCK_SKEW_EXCEEDED_TOTAL: &str = "regionsync_clock_skew_exceeded_total";
/// 1 while ready (partitions assigned, PostgreSQL reachable), else 0.
pub const READY: &str = "regionsync_ready";
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

/// Histogram buckets (seconds and rows alike): from a millisecond to five
/// minutes, so a lag-sized latency still lands in a bucket.
const BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
    1000.0, 5000.0,
];

/// Installs the global Prometheus recorder. Gauges not set for a minute are
/// dropped, so a partition this worker no longer owns stops being reported.
pub fn install() -> anyhow::Result<PrometheusHandle> {
    let handle = PrometheusBuilder::new()
        .set_buckets(BUCKETS)?
        .idle_timeout(MetricKindMask::GAUGE, Some(Duration::from_secs(60)))
        .install_recorder()?;
    let upkeep = handle.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(5));
        loop {
            tick.tick().await;
            upkeep.run_upkeep();
        }
    });
    Ok(handle)
}

/// Whether the worker can do its job right now; `Err` says why not.
pub trait ReadyCheck: Send + Sync {
    fn check(&self) -> BoxFuture<'_, Result<(), String>>;
}

/// The worker's readiness, filled in once it has connected.
#[derive(Clone, Default)]
pub struct Readiness(Arc<OnceLock<Arc<dyn ReadyCheck>>>);

impl Readiness {
    pub fn set(&self, check: Arc<dyn ReadyCheck>) {
        let _ = self.0.set(check);
    }

    pub async fn check(&self) -> Result<(), String> {
        match self.0.get() {
            Some(c) => c.check().await,
            None => Err("starting: not connected yet".to_string()),
        }
    }
}

#[derive(Clone)]
struct Endpoint {
    handle: PrometheusHandle,
    readiness: Readiness,
}

/// Serves `/metrics`, `/healthz` and `/readyz` on `listen` until the process
/// ends. Binding fails at once (before anything is consumed).
pub async fn serve(
    listen: SocketAddr,
    handle: PrometheusHandle,
    readiness: Readiness,
) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| anyhow::anyhow!("metrics.listen {listen}: {e}"))?;
    let app = axum::Router::new()
        .route(
            "/metrics",
            get(|State(e): State<Endpoint>| async move { e.handle.render() }),
        )
        .route("/healthz", get(|| async { "ok\n" }))
        .route(
            "/readyz",
            get(|State(e): State<Endpoint>| async move {
                match e.readiness.check().await {
                    Ok(()) => (StatusCode::OK, "ready\n".to_string()),
                    Err(why) => (
                        StatusCode::SERVICE_UNAVAILABLE,
                        format!("not ready: {why}\n"),
                    ),
                }
            }),
        )
        .with_state(Endpoint { handle, readiness });
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "metrics endpoint stopped");
        }
    });
    Ok(())
}
