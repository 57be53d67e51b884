//! What the worker does beside applying batches, for as long as it runs:
//! the lag reporter (gauges every second, readiness every five), the
//! tombstone collector, the retention of resolved conflicts, and
//! re-asserting the local rows of rejected cross-region writes.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use rdkafka::consumer::Consumer;
use tracing::{info, warn};

use super::{Route, Worker};
use crate::apply::tombstones;
use crate::clock;
use crate::conflict;
use crate::lag::LagTracker;
use crate::metrics::{self as m, ReadyCheck};
use crate::offsets;

/// Feeds the newest source times stored per topic (by any replica of the
/// group) into the lag tracker. A time ahead of the local clock (stored
/// before such times were capped, or by a replica with a clock ahead) is
/// left out: it would read as no lag at all.
pub(super) fn record_stored_times(
    lag: &LagTracker,
    routes: &HashMap<String, Route>,
    stored: Vec<(String, i64)>,
) {
    let now = clock::now_ms();
    for (topic, ts_ms) in stored.into_iter().filter(|(_, t)| *t <= now) {
        if let Some(route) = routes.get(&topic) {
            lag.committed(&route.source_region, ts_ms, route.table.is_none());
        }
    }
}

/// Removes the tombstones of this worker's tables older than
/// `tombstone_grace` (by local delete time), in chunks, every minute (or
/// every tenth of the grace, if shorter). Failures are retried next time.
pub(super) async fn collect_tombstones(worker: Arc<Worker>) {
    let grace = worker.config.tombstone_grace;
    let every = (grace / 10).clamp(Duration::from_secs(1), Duration::from_secs(60));
    let tables: Vec<String> = worker.tables().iter().map(|t| t.name.clone()).collect();
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let collect = async {
            let client = worker.pool.get().await?;
            anyhow::Ok(tombstones::collect(&**client, &tables, grace).await?)
        };
        match collect.await {
            Ok(0) => {}
            Ok(n) => {
                metrics::counter!(m::TOMBSTONES_COLLECTED_TOTAL).increment(n);
                info!(collected = n, tombstone_grace = ?grace, "tombstones collected");
            }
            Err(e) => {
                warn!(error = %format!("{e:#}"), "collecting tombstones failed; retried later")
            }
        }
    }
}

/// Deletes the conflicts resolved longer than `conflicts.retention` ago and
/// sets the gauge of unresolved ones (0 for a configured table without
/// any), every minute (or every tenth of the retention, if shorter).
/// Failures are retried next time.
pub(super) async fn maintain_conflicts(worker: Arc<Worker>) {
    let retention = worker.config.conflicts.retention;
    let every = (retention / 10).clamp(Duration::from_secs(1), Duration::from_secs(60));
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let maintain = async {
            let client = worker.pool.get().await?;
            let pruned = conflict::prune(&**client, retention).await?;
            anyhow::Ok((pruned, conflict::unresolved(&**client).await?))
        };
        match maintain.await {
            Ok((pruned, unresolved)) => {
                if pruned > 0 {
                    metrics::counter!(m::CONFLICTS_PRUNED_TOTAL).increment(pruned);
                    info!(pruned, conflicts_retention = ?retention, "resolved conflicts pruned");
                }
                let mut counts: HashMap<String, i64> = worker
                    .tables()
                    .iter()
                    .map(|t| (t.name.clone(), 0))
                    .collect();
                counts.extend(unresolved);
                for (table, n) in counts {
                    metrics::gauge!(m::CONFLICTS_UNRESOLVED, "table" => table).set(n as f64);
                }
            }
            Err(e) => {
                warn!(error = %format!("{e:#}"), "pruning resolved conflicts failed; retried later")
            }
        }
    }
}

/// Sets the lag gauges every second and readiness every five, for as long
/// as the worker runs.
///
/// Lag counts what the whole consumer group has committed, not only this
/// replica: every three seconds the newest source times stored in
/// `regionsync.offsets` (by whichever replica owns the partitions, the
/// heartbeat's among them) are read back, with a short timeout, so a
/// replica without a region's heartbeat partition does not report a stall
/// that is not there. When the database does not answer, the value keeps
/// growing from what was last known — which is the truth then.
pub(super) async fn report_lag(worker: Arc<Worker>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut homing_unread = 0u32;
    for n in 0u64.. {
        tick.tick().await;
        if n % 3 == 0 {
            let read = async {
                let client = worker.pool.get().await.map_err(|e| e.to_string())?;
                offsets::newest_source_times(&**client, &worker.group)
                    .await
                    .map_err(|e| e.to_string())
            };
            if let Ok(Ok(stored)) = tokio::time::timeout(Duration::from_millis(800), read).await {
                record_stored_times(&worker.lag, &worker.routes, stored);
            }
        }
        for l in worker.lag.snapshot(clock::now_ms()) {
            let region = l.source_region;
            metrics::gauge!(m::REPLICATION_LAG, "source_region" => region.clone())
                .set(l.replication_lag_seconds);
            metrics::gauge!(m::HEARTBEAT_AGE, "source_region" => region.clone())
                .set(l.heartbeat_age_seconds);
            if let Some(t) = l.newest_source_seconds {
                metrics::gauge!(m::LAST_APPLIED_SOURCE_TIMESTAMP, "source_region" => region).set(t);
            }
        }
        let positions = worker.positions.lock().expect("positions lock").clone();
        let highs = worker
            .consumer
            .context()
            .high_watermarks
            .lock()
            .expect("watermarks lock")
            .clone();
        for ((topic, partition), next) in positions {
            if let Some(high) = highs.get(&(topic.clone(), partition)) {
                metrics::gauge!(m::CONSUMER_LAG, "topic" => topic, "partition" => partition.to_string())
                    .set((high - next).max(0) as f64);
            }
        }
        if n % 5 == 0 {
            report_homing(&worker, &mut homing_unread).await;
            crate::metrics::record::refresh_rpo_window();
            let ready = worker.check().await.is_ok();
            metrics::gauge!(m::READY).set(if ready { 1.0 } else { 0.0 });
        }
    }
}

/// Sets the failover homing gauges from `regionsync.homing` (a failed read
/// leaves them as they were) and tells the homing fence. `unread` counts
/// the reads in a row that failed: the first that succeeds after two or
/// more (10 s without the database) re-arms the fence, as a failover may
/// have been written everywhere but here meanwhile.
async fn report_homing(worker: &Worker, unread: &mut u32) {
    let read = async {
        let client = worker.pool.get().await.map_err(|e| e.to_string())?;
        crate::homing::load(&**client)
            .await
            .map_err(|e| e.to_string())
    };
    let Ok(Ok(homing)) = tokio::time::timeout(Duration::from_millis(800), read).await else {
        *unread += 1;
        return;
    };
    if std::mem::take(unread) >= 2 {
        info!("the database answers again: the homing fence holds every source region until a fresh heartbeat");
        worker.fence.rearm(clock::now_ms());
    }
    worker
        .fence
        .database(homing.epoch(), super::failed_over(&homing));
    metrics::gauge!(m::HOMING_EPOCH).set(homing.epoch() as f64);
    for w in &homing.windows {
        let open = if w.until_ms.is_none() { 1.0 } else { 0.0 };
        metrics::gauge!(m::REHOMED, "region" => w.region.clone(), "acting_home" => w.acting_home.clone())
            .set(open);
    }
    if let Some(newest) = homing.windows.iter().map(|w| w.from_ms).max() {
        metrics::gauge!(m::LAST_FAILOVER_TIMESTAMP).set(newest as f64 / 1000.0);
    }
}

/// Writes the local rows again whose remote writes the `reject` policy held
/// (conflict::reassert_rejected). A failure is logged and left for the next
/// batch or restart: the held writes stay recorded as pending.
pub async fn reassert_rejected(worker: &Worker) {
    let result = async {
        let mut client = worker.plain_pool.get().await?;
        conflict::reassert_rejected(&mut client, &worker.tables(), &worker.config.region).await
    }
    .await;
    match result {
        Ok(n) if n > 0 => info!(
            settled = n,
            "rejected cross-region writes: the home rows were written again"
        ),
        Ok(_) => {}
        Err(e) => {
            warn!(error = %format!("{e:#}"), "writing the home rows of rejected writes again failed; retried later")
        }
    }
}
