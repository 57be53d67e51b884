//! The worker's HTTP endpoint: `/metrics`, `/healthz`, `/readyz`, and the
//! Prometheus recorder behind `/metrics`.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use futures::future::BoxFuture;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use metrics_util::MetricKindMask;

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

/// The worker's readiness, filled in once it has connected; until then,
/// what start-up is waiting for (e.g. why the last connection attempt was
/// refused).
#[derive(Clone, Default)]
pub struct Readiness(Arc<ReadinessInner>);

#[derive(Default)]
struct ReadinessInner {
    check: Mutex<Option<Arc<dyn ReadyCheck>>>,
    starting: Mutex<Option<String>>,
}

impl Readiness {
    pub fn set(&self, check: Arc<dyn ReadyCheck>) {
        *self.0.check.lock().expect("readiness lock") = Some(check);
    }

    /// What start-up is waiting for, until [`Readiness::set`].
    pub fn starting(&self, why: impl Into<String>) {
        *self.0.starting.lock().expect("readiness lock") = Some(why.into());
    }

    /// The pipeline stops to start again (a configuration reload): not
    /// ready until it is [`Readiness::set`] again, and the old worker is
    /// let go.
    pub fn restarting(&self, why: impl Into<String>) {
        *self.0.check.lock().expect("readiness lock") = None;
        self.starting(why);
    }

    pub async fn check(&self) -> Result<(), String> {
        let check = self.0.check.lock().expect("readiness lock").clone();
        match check {
            Some(c) => c.check().await,
            None => Err(match &*self.0.starting.lock().expect("readiness lock") {
                Some(why) => format!("starting: {why}"),
                None => "starting: not connected yet".to_string(),
            }),
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
