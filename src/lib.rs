//! regionsync — the apply side of a multi-region PostgreSQL deployment.
//!
//! Debezium captures each region's changes into Kafka, MirrorMaker 2 copies
//! them to the other regions, and regionsync consumes them there and applies
//! them to the regional database, exactly once in effect, with
//! region-affinity routing and hybrid-logical-clock conflict checks, while
//! publishing the end-to-end replication lag. `../DESIGN.md` (shared) is the
//! contract; README.md says how to run it.
//!
//! # Layout
//! One module per step of an event's path through the worker:
//!
//! | module    | step                                                        |
//! |-----------|-------------------------------------------------------------|
//! | `config`  | the worker's configuration, validated before anything runs  |
//! | `source`  | the Kafka consumer of the mirrored CDC topics               |
//! | `registry` | Avro wire format: writer schemas from the registry      |
//! | `decode`  | Debezium envelopes (JSON, Avro) into typed changes — pure   |
//! | `route`   | topic → table, a row's home region, classification — pure   |
//! | `conflict` | concurrent writes detected, recorded, settled by policy    |
//! | `clock`   | hybrid logical clocks and version order — pure              |
//! | `converge` | the apply rules as pure functions, convergence model — pure |
//! | `apply`   | batched, guarded writes to PostgreSQL                       |
//! | `offsets` | partition offsets stored with each batch                    |
//! | `lag`     | how far behind each source region the worker is — pure      |
//! | `metrics` | metric names and the /metrics, /healthz, /readyz endpoint   |
//! | `ops`     | rebuild, verify, failover-check                             |
//! | `status`  | `regionsync status`: one worker's picture in the terminal   |
//!
//! [`run`] is the worker: `regionsync run` calls it with the loaded config
//! and a shutdown future (SIGTERM / Ctrl-C); tests call it in-process.

pub mod apply;
pub mod avro;
pub mod clock;
pub mod config;
pub mod conflict;
pub mod converge;
pub mod decode;
pub mod lag;
pub mod metrics;
pub mod offsets;
pub mod ops;
pub mod registry;
pub mod route;
pub mod source;
pub mod status;

use std::future::Future;

/// Serves metrics (when asked), connects, checks the target tables and
/// consumes until `shutdown` resolves. Errors that stop the worker are
/// returned.
pub async fn run(
    config: config::Config,
    shutdown: impl Future<Output = ()>,
    serve_metrics: bool,
) -> anyhow::Result<()> {
    let readiness = metrics::Readiness::default();
    if serve_metrics {
        let handle = metrics::install()?;
        metrics::serve(config.metrics.listen.parse()?, handle, readiness.clone()).await?;
    }
    let pool = ops::pool(&config)?;
    let (shared, events) = source::Shared::connect(config, pool).await?;
    readiness.set(shared.clone());
    // Rejected writes a crash left pending (conflict::reassert_rejected).
    source::reassert_rejected(&shared).await;
    source::run(shared, events, shutdown).await
}
