//! regionsync — the apply side of a multi-region PostgreSQL deployment.
//!
//! Debezium captures each region's changes into Kafka, MirrorMaker 2 copies
//! them to the other regions, and regionsync consumes them there and applies
//! them to the regional database, exactly once in effect, with
//! region-affinity routing and hybrid-logical-clock conflict checks, while
//! publishing the end-to-end replication lag. docs/DESIGN.md is the design,
//! README.md says how to run it.
//!
//! # Layout
//! One module per step of a change's path through the worker, in the order
//! a change meets them, then what observes and operates it:
//!
//! | module     | step                                                        |
//! |------------|-------------------------------------------------------------|
//! | `config`   | the worker's configuration, validated before anything runs  |
//! | `source`   | Kafka: the consumer of the mirrored topics, the DLQ producer |
//! | `change`   | the vocabulary decode makes and the later steps read        |
//! | `decode`   | Debezium envelopes (JSON, Avro + registry) into changes     |
//! | `route`    | where a change goes: table, relay, echo, residency, home    |
//! | `homing`   | failover re-homing windows as stored in regionsync.homing   |
//! | `fence`    | holding a source region until this database has its homing — pure |
//! | `conflict` | concurrent writes detected, recorded, settled by policy     |
//! | `apply`    | changes rendered and written to PostgreSQL under the guard  |
//! | `offsets`  | partition offsets stored with each batch                    |
//! | `worker`   | the loop tying them together, one task per partition; the one error decision |
//! | `clock`    | hybrid logical clocks, version order, the local clock — pure |
//! | `converge` | the apply rules as pure functions, convergence model — pure |
//! | `lag`      | how far behind each source region the worker is — pure      |
//! | `metrics`  | metric names and labels, recording, /metrics /healthz /readyz |
//! | `ops`      | the operator commands: setup, status, conflicts, route, verify, rebuild |
//! | `verify`   | comparing two regions' tables by key-range checksums         |
//! | `rebuild`  | replaying the change topics into a region's tables           |
//!
//! docs/DESIGN.md describes the design in these terms.
//!
//! [`run`] is the worker: `regionsync run` calls it with the loaded config
//! and a shutdown future (SIGTERM / Ctrl-C); tests call it in-process.

pub mod apply;
pub mod change;
pub mod clock;
pub mod config;
pub mod conflict;
pub mod converge;
pub mod decode;
pub mod fence;
pub mod homing;
pub mod lag;
pub mod metrics;
pub mod offsets;
pub mod ops;
pub mod rebuild;
pub mod route;
pub mod source;
pub mod verify;
pub mod worker;

use std::future::Future;

/// Serves metrics (when asked), connects, checks the target tables and
/// consumes until `shutdown` resolves. Errors that stop the worker are
/// returned.
///
/// Start-up first proves that PostgreSQL and Kafka accept the worker's
/// credentials and certificates ([`check_connections`]), retrying
/// [`START_ATTEMPTS`] times while `/readyz` says why not; then it stops with
/// that reason (a wrong password, an untrusted CA, a host name mismatch).
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
    pipeline(config, &readiness, shutdown).await
}

/// [`run`] that also reloads its configuration: each message on `reloads`
/// (SIGHUP in `regionsync run`) reads `path` again. A file that does not
/// validate, or names a table this region's database cannot give the
/// worker, is refused: the error is logged, counted
/// (`regionsync_config_reloads_total{result="error"}`) and the running
/// pipeline goes on untouched. A good one restarts the pipeline in this
/// process: the partitions finish and commit their in-flight batches as on
/// SIGTERM, then everything (tables, consumer, pools) starts again from the
/// new file and the offsets stored in PostgreSQL, so nothing is lost or
/// applied twice. The metrics endpoint stays up throughout (a new
/// `metrics.listen` needs a restart).
pub async fn run_reloading(
    path: std::path::PathBuf,
    config: config::Config,
    shutdown: impl Future<Output = ()>,
    mut reloads: tokio::sync::mpsc::UnboundedReceiver<()>,
) -> anyhow::Result<()> {
    let readiness = metrics::Readiness::default();
    let handle = metrics::install()?;
    metrics::serve(config.metrics.listen.parse()?, handle, readiness.clone()).await?;
    tokio::pin!(shutdown);
    let mut config = config;
    loop {
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let running = pipeline(config.clone(), &readiness, async move {
            let _ = stopped.await;
        });
        tokio::pin!(running);
        let next = loop {
            tokio::select! {
                biased;
                result = &mut running => return result,
                _ = &mut shutdown => {
                    let _ = stop.send(());
                    return running.await;
                }
                Some(()) = reloads.recv() => match {
                    // SIGHUPs sent before the file is read again are all
                    // answered by this one reading: one drain, not one per
                    // signal.
                    while reloads.try_recv().is_ok() {}
                    tokio::select! {
                    // The check connects to PostgreSQL and Kafka: a SIGTERM
                    // or the pipeline's end meanwhile is still honoured.
                    biased;
                    result = &mut running => return result,
                    _ = &mut shutdown => {
                        let _ = stop.send(());
                        return running.await;
                    }
                    checked = tokio::time::timeout(RELOAD_CHECK_TIMEOUT, reload(&path, &config)) =>
                        checked.unwrap_or_else(|_| Err(format!(
                            "checking the new configuration took over {RELOAD_CHECK_TIMEOUT:?}"
                        ))),
                    }
                } {
                    Ok(next) => break next,
                    Err(why) => {
                        tracing::error!(config = %path.display(), error = %why,
                            "configuration reload refused; the running configuration is kept");
                        ::metrics::counter!(metrics::CONFIG_RELOADS_TOTAL, "result" => "error")
                            .increment(1);
                    }
                },
            }
        };
        tracing::info!(config = %path.display(),
            "configuration reloaded: draining the in-flight batches, then starting again on it");
        let _ = stop.send(());
        running.await?;
        readiness.restarting("reloading the configuration");
        ::metrics::counter!(metrics::CONFIG_RELOADS_TOTAL, "result" => "ok").increment(1);
        config = next;
    }
}

/// How long a reload may take to check its new configuration.
const RELOAD_CHECK_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// The configuration at `path` if the pipeline can start on it: it
/// validates, PostgreSQL and Kafka accept its credentials and
/// certificates ([`check_connections`]), and each configured table is
/// readable in this region's database as the worker reads it at start (so
/// a table not created yet refuses the reload instead of stopping the
/// worker).
async fn reload(
    path: &std::path::Path,
    running: &config::Config,
) -> Result<config::Config, String> {
    let next = config::Config::load(path).map_err(|e| e.to_string())?;
    if next.metrics.listen != running.metrics.listen {
        tracing::warn!(
            running = %running.metrics.listen, file = %next.metrics.listen,
            "metrics.listen changed: the endpoint stays where it is until a restart"
        );
    }
    let pool = apply::session::pool(&next).map_err(|e| format!("{e:#}"))?;
    check_connections(&next, &pool).await?;
    let client = pool
        .get()
        .await
        .map_err(|e| apply::tls::explain_pool(&e, &next.postgres))?;
    for t in 0..next.tables.len() {
        worker::load_table(&**client, &next, t)
            .await
            .map_err(|e| e.to_string())?;
    }
    Ok(next)
}

/// One run of the worker on `config`, until `shutdown` resolves: connects,
/// checks the target tables and consumes.
async fn pipeline(
    config: config::Config,
    readiness: &metrics::Readiness,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let pool = apply::session::pool(&config)?;
    // Every wait of start-up (connection attempts and their backoff, a
    // running rebuild's lock, reading the tables, a frozen PostgreSQL)
    // ends on a shutdown: a SIGTERM then stops the worker within its grace
    // period whatever is down.
    tokio::pin!(shutdown);
    let start = async {
        let mut attempt = 1;
        while let Err(why) = check_connections(&config, &pool).await {
            readiness.starting(why.clone());
            if attempt == START_ATTEMPTS {
                anyhow::bail!("{why}");
            }
            let wait = std::time::Duration::from_secs(1 << (attempt - 1));
            tracing::warn!(error = %why, attempt, retry_in = ?wait, "start-up: connecting failed");
            tokio::time::sleep(wait).await;
            attempt += 1;
        }
        // Held for the worker's life: a rebuild into the live tables refuses
        // while it is held, and a worker waits for a running rebuild.
        let running = rebuild::lock::hold_as_worker(&config).await?;
        let (worker, events) = worker::Worker::connect(config, pool).await?;
        readiness.set(worker.clone());
        // Rejected writes a crash left pending (conflict::reassert_rejected).
        worker::reassert_rejected(&worker).await;
        anyhow::Ok((running, worker, events))
    };
    let (_running, worker, events) = tokio::select! {
        biased;
        _ = &mut shutdown => {
            tracing::info!("shut down during start-up");
            return Ok(());
        }
        started = start => started?,
    };
    worker::run(worker, events, shutdown).await
}

/// How often start-up tries to connect before it gives up (waiting 1, 2,
/// 4 … s between attempts: about 15 s in all).
pub const START_ATTEMPTS: u32 = 5;

/// Whether PostgreSQL (through the apply pool: TLS, password, the session's
/// set-up) and Kafka (the brokers' TLS and SASL) accept this worker; `Err`
/// says which refused and why.
pub async fn check_connections(
    config: &config::Config,
    pool: &deadpool_postgres::Pool,
) -> Result<(), String> {
    if let Err(e) = pool.get().await {
        return Err(apply::tls::explain_pool(&e, &config.postgres));
    }
    source::check_connection(config, std::time::Duration::from_secs(10)).await
}
