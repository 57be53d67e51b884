//! The homing fence's heartbeat reader: every source region's heartbeat
//! topic, read by this worker process itself, outside the consumer group,
//! so that each replica of the group learns every region's homing epoch
//! whichever replica owns the heartbeat partitions. It starts at each
//! partition's last heartbeat and feeds [`crate::fence::Fence`]: one
//! message per region every few seconds, one query only when a heartbeat
//! carries an epoch above this database's as last read.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use tracing::{info, warn};

use super::batch::Planner;
use super::Worker;
use crate::change::Decoded;
use crate::source;

/// Reads the heartbeat topics for as long as the worker runs.
pub(super) async fn read_heartbeats(worker: Arc<Worker>) {
    // topic → source region
    let topics: HashMap<String, String> = worker
        .routes
        .iter()
        .filter(|(_, r)| r.table.is_none())
        .map(|(t, r)| (t.clone(), r.source_region.clone()))
        .collect();
    if topics.is_empty() {
        return;
    }
    let consumer = loop {
        match heartbeat_consumer(&worker) {
            Ok(c) => break Arc::new(c),
            Err(e) => {
                warn!(error = %format!("{e:#}"), "the homing fence's heartbeat reader could not start; retried in 5 s");
                tokio::time::sleep(Duration::from_secs(5)).await;
            }
        }
    };
    let mut assignment = TopicPartitionList::new();
    let mut missing: Vec<String> = topics.keys().cloned().collect();
    loop {
        if !missing.is_empty() && assign_found(&consumer, &mut missing, &mut assignment).await {
            if let Err(e) = consumer.assign(&assignment) {
                warn!(error = %e, "the homing fence's heartbeat reader could not assign its partitions");
            }
        }
        tokio::select! {
            m = consumer.recv() => match m {
                Ok(m) => {
                    let Some(region) = topics.get(m.topic()) else { continue };
                    heartbeat(&worker, region, &m).await;
                }
                Err(e) => warn!(error = %e, "kafka (homing fence)"),
            },
            _ = tokio::time::sleep(Duration::from_secs(5)), if !missing.is_empty() => {}
        }
    }
}

/// A consumer outside the group (assigned, never subscribed, never
/// committing), with the worker's client settings.
fn heartbeat_consumer(worker: &Worker) -> anyhow::Result<StreamConsumer> {
    source::kafka_config(&worker.config)?
        .set("group.id", format!("{}-homing-fence", worker.group))
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        // It wants the newest heartbeat only (assigned at the last one):
        // a position retention deleted while it lagged goes to the end.
        // Not the worker consumer's "error", which `kafka.properties`
        // might otherwise set here too.
        .set("auto.offset.reset", "latest")
        .create()
        .context("creating the homing fence's heartbeat consumer")
}

/// Adds the partitions of the `missing` topics that exist now to
/// `assignment`, each from its last message; true if any was added.
async fn assign_found(
    consumer: &Arc<StreamConsumer>,
    missing: &mut Vec<String>,
    assignment: &mut TopicPartitionList,
) -> bool {
    let mut added = false;
    let mut still = Vec::new();
    for topic in missing.drain(..) {
        let (c, t) = (consumer.clone(), topic.clone());
        let partitions = tokio::task::spawn_blocking(move || {
            c.fetch_metadata(Some(&t), Duration::from_secs(5))
                .map(|md| {
                    md.topics()
                        .iter()
                        .find(|x| x.name() == t && x.error().is_none())
                        .map(|x| x.partitions().iter().map(|p| p.id()).collect::<Vec<_>>())
                        .unwrap_or_default()
                })
                .unwrap_or_default()
        })
        .await
        .unwrap_or_default();
        if partitions.is_empty() {
            still.push(topic);
            continue;
        }
        for p in partitions {
            // From the last heartbeat: its epoch tells at once whether this
            // database is behind; only a later one can release the fence.
            let _ = assignment.add_partition_offset(&topic, p, Offset::OffsetTail(1));
        }
        info!(topic = %topic, "the homing fence reads this heartbeat topic");
        added = true;
    }
    *missing = still;
    added
}

/// Feeds one heartbeat message of `region` to the fence; when it carries an
/// epoch above this database's as last read, reads the database's homing
/// again at once (a failover written here too need not hold anything).
async fn heartbeat<M: Message>(worker: &Worker, region: &str, msg: &M) {
    let planner = Planner {
        config: &worker.config,
        tables: &[],
        source_region: region,
        table: None,
        avro: worker.decoders.get(region).map(|a| &**a),
        own_topic: false,
    };
    let change = match planner.decode(msg).await {
        Ok(Decoded::Change(c)) => c,
        Ok(Decoded::Tombstone { .. }) => return,
        Err(fault) => {
            warn!(topic = msg.topic(), offset = msg.offset(), error = %fault, "a heartbeat the homing fence cannot read");
            return;
        }
    };
    let epoch = crate::fence::epoch_of(&change);
    if !worker.fence.heartbeat(region, change.source_ts_ms, epoch) {
        return;
    }
    let read = async {
        let client = worker.pool.get().await.map_err(anyhow::Error::from)?;
        anyhow::Ok(crate::homing::load(&**client).await?)
    };
    match tokio::time::timeout(Duration::from_secs(2), read).await {
        Ok(Ok(homing)) => worker
            .fence
            .database(homing.epoch(), super::failed_over(&homing)),
        Ok(Err(e)) => {
            warn!(error = %format!("{e:#}"), "reading regionsync.homing for the homing fence failed")
        }
        Err(_) => warn!("reading regionsync.homing for the homing fence: no answer within 2 s"),
    }
}
