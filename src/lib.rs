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
//! | `decode`  | Debezium envelopes (JSON, Avro) into typed changes — pure   |
//! | `route`   | topic → table, a row's home region, classification — pure   |
//! | `clock`   | hybrid logical clocks and version order — pure              |
//! | `apply`   | batched, guarded writes to PostgreSQL                       |
//! | `offsets` | partition offsets stored with each batch                    |
//! | `metrics` | counters, histograms and the lag operators watch            |
//! | `ops`     | rebuild, verify, failover-check                             |
//!
//! [`run`] is the worker: `regionsync run` calls it with the loaded config
//! and a shutdown future (SIGTERM / Ctrl-C); tests call it in-process.

pub mod apply;
pub mod clock;
pub mod config;
pub mod decode;
pub mod metrics;
pub mod offsets;
pub mod ops;
pub mod route;
pub mod source;

use std::future::Future;

/// Connects, checks the target tables, serves metrics and consumes until
/// `shutdown` resolves. Errors that stop the worker are returned.
pub async fn run(
    config: config::Config,
    shutdown: impl Future<Output = ()>,
    serve_metrics: bool,
) -> anyhow::Result<()> {
    if serve_metrics {
        metrics::serve(config.metrics.listen.parse()?)?;
    }
    let pool = ops::pool(&config)?;
    let (shared, events) = source::Shared::connect(config, pool).await?;
    source::run(shared, events, shutdown).await
}
