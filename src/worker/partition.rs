//! One partition's task: reads its own queue, closes batches by count,
//! bytes or linger time, drops what was applied already, hands each batch
//! to `batch` and moves the partition's position when it committed.

use rdkafka::consumer::{CommitMode, Consumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use std::sync::Arc;
use tokio::sync::{mpsc, watch};
use tracing::{error, info, warn};

use super::{batch, Worker};
use crate::metrics::{self as m, outcome};
use crate::source::{next_message, Next, Queue};

/// Removes a partition's position when its task ends.
struct Forget<'a>(&'a Worker, (String, i32));

impl Drop for Forget<'_> {
    fn drop(&mut self) {
        if let Ok(mut positions) = self.0.positions.lock() {
            positions.remove(&self.1);
        }
        self.0.release(&self.1 .0, self.1 .1);
    }
}

/// The test hook [`super::PANIC_ONCE_AT`].
fn panic_if_asked<M: Message>(topic: &str, messages: &[M]) {
    let mut hook = super::PANIC_ONCE_AT.lock().expect("hook lock");
    let hit = hook
        .as_ref()
        .is_some_and(|(t, o)| t == topic && messages.iter().any(|m| m.offset() == *o));
    if hit {
        *hook = None;
        drop(hook);
        panic!("test hook: a panic in the partition task of {topic}");
    }
}

/// Waits while the homing fence holds `source_region` (the partition
/// marked held with the fence's reason, for `/readyz` after
/// `apply.unready_after`); false when told to stop meanwhile. One lock in
/// the steady state.
async fn fence_open(
    worker: &Worker,
    source_region: &str,
    topic: &str,
    partition: i32,
    stop: &mut watch::Receiver<()>,
) -> bool {
    let mut held = false;
    loop {
        let Some(why) = worker.fence.holds(source_region) else {
            if held {
                info!(topic, partition, "the homing fence released the partition");
                worker.release(topic, partition);
            }
            return true;
        };
        if !held {
            warn!(topic, partition, reason = %why, "the homing fence holds the partition");
            held = true;
        }
        worker.hold(topic, partition, why);
        tokio::select! {
            biased;
            _ = stop.changed() => return false,
            _ = tokio::time::sleep(std::time::Duration::from_millis(250)) => {}
        }
    }
}

/// One partition: batches, applies, stores offsets, until told to stop
/// (its stop sender dropped on revocation or shutdown). `next` is the
/// next offset to apply: the one stored in PostgreSQL, or (nothing stored
/// yet) the partition's first offset, checked against the topic at
/// assignment. A failure that stops the worker is sent on `failed`.
pub(super) async fn run(
    worker: Arc<Worker>,
    (topic, partition): (String, i32),
    mut next: i64,
    queue: Arc<Queue>,
    mut stop: watch::Receiver<()>,
    failed: mpsc::UnboundedSender<anyhow::Error>,
) -> anyhow::Result<()> {
    let Some(route) = worker.routes.get(&topic).cloned() else {
        return Ok(());
    };
    let set_position = |next: i64| {
        worker
            .positions
            .lock()
            .expect("positions lock")
            .insert((topic.clone(), partition), next);
    };
    set_position(next);
    // However the task ends, its partition leaves the consumer-lag gauge
    // and the held partitions.
    let _forget = Forget(&worker, (topic.clone(), partition));
    let linger = worker.config.apply.linger();
    // The offset the partition was sought to, until its first message.
    let mut sought = Some(next);
    // librdkafka's word that the fetch position is outside the partition,
    // seen after the messages fetched before it (which are applied first).
    let mut out_of_range: Option<String> = None;
    loop {
        if let Some(why) = out_of_range.take() {
            if !position_still_inside(&worker, (&topic, partition), next, &why, &stop).await {
                return Ok(());
            }
            sought = Some(next);
        }
        let first = match next_message(&queue, &mut stop).await {
            None => return Ok(()),
            Some(Next::Message(m)) => m,
            Some(Next::OutOfRange(why)) => {
                out_of_range = Some(why);
                continue;
            }
        };
        let deadline = tokio::time::Instant::now() + linger;
        let mut bytes = first.payload().map_or(0, |p| p.len());
        let mut messages = vec![first];
        while messages.len() < worker.config.apply.batch_max_rows
            && bytes < worker.config.apply.batch_max_bytes
        {
            tokio::select! {
                m = next_message(&queue, &mut stop) => match m {
                    Some(Next::Message(m)) => { bytes += m.payload().map_or(0, |p| p.len()); messages.push(m); }
                    Some(Next::OutOfRange(why)) => { out_of_range = Some(why); break; }
                    None => break,
                },
                _ = tokio::time::sleep_until(deadline) => break,
            }
        }
        // The first message after the seek is past the offset sought: the
        // offset may be a gap of compaction, or retention deleted it since
        // the check (which librdkafka reports as out of range, above; this
        // is a second guard, should a broker answer with a later offset).
        // The latter stops the partition as the check would have.
        if let Some(sought) = sought.take() {
            if messages[0].offset() > sought {
                let Some(gap) = gap_since_check(&worker, &topic, partition, sought, &stop).await
                else {
                    return Ok(());
                };
                if let Some(problem) = gap {
                    error!(topic = %topic, partition, first = messages[0].offset(), sought, "{}", problem.1);
                    worker.set_stopped(&topic, partition, Some(problem));
                    let mut tpl = TopicPartitionList::new();
                    tpl.add_partition(&topic, partition);
                    let _ = worker.consumer.pause(&tpl);
                    return Ok(());
                }
            }
        }
        // Already applied (redelivered after a crash between the PostgreSQL
        // and the Kafka commit): never apply again.
        let before = messages.len();
        messages.retain(|m| m.offset() >= next);
        if messages.len() < before {
            metrics::counter!(m::EVENTS_TOTAL, "source_region" => route.source_region.clone(), "table" => "", "op" => "", "outcome" => outcome::DUPLICATE)
                .increment((before - messages.len()) as u64);
        }
        if messages.is_empty() {
            continue;
        }
        panic_if_asked(&topic, &messages);
        // The homing fence: a source region's changes wait until this
        // database has the homing they were written under. Heartbeats pass
        // (they apply nothing, and feed the lag).
        if route.table.is_some()
            && !fence_open(&worker, &route.source_region, &topic, partition, &mut stop).await
        {
            return Ok(());
        }
        match batch::apply(&worker, &route, &topic, partition, &messages, &stop).await {
            Ok(new_next) => {
                next = new_next;
                set_position(next);
                let mut tpl = TopicPartitionList::new();
                let _ = tpl.add_partition_offset(&topic, partition, Offset::Offset(next));
                let _ = worker.consumer.commit(&tpl, CommitMode::Async);
            }
            // Told to stop while held: the next owner (or this worker,
            // reloaded) starts again from the stored offset.
            Err(e) if e.is::<batch::Abandoned>() => {
                info!(topic = %topic, partition, "the held batch was given up: the partition is stopping");
                return Ok(());
            }
            Err(e) => {
                error!(topic = %topic, partition, error = %format!("{e:#}"), "stopping");
                let _ = failed.send(e);
                return Ok(());
            }
        }
    }
}

/// librdkafka said the partition's fetch position is outside it (and
/// stopped fetching it): `next`, the offset to apply next (every message
/// before the news was taken), is checked against the topic as at
/// assignment. Below the first offset (retention deleted changes this
/// worker had not fetched yet, while it was running behind) or above the
/// end (the topic re-created), the partition is stopped as the check at
/// assignment would have stopped it: same message, metric and alert, and
/// nothing past the gap applied. Inside (the group's missing committed
/// offset at assignment, reported after the worker's own seek), the
/// partition is sought to `next` again and goes on. False when the task
/// must end (stopped, or told to stop meanwhile).
async fn position_still_inside(
    worker: &Worker,
    (topic, partition): (&str, i32),
    next: i64,
    why: &str,
    stop: &watch::Receiver<()>,
) -> bool {
    let Some(gap) = gap_since_check(worker, topic, partition, next, stop).await else {
        return false;
    };
    if let Some(problem) = gap {
        error!(topic = %topic, partition, stored = next, librdkafka = %why, "{}", problem.1);
        worker.set_stopped(topic, partition, Some(problem));
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition(topic, partition);
        let _ = worker.consumer.pause(&tpl);
        return false;
    }
    info!(topic = %topic, partition, offset = next, librdkafka = %why, "the partition's position is inside it: seeking it again");
    super::seek_until_taken(worker, topic, partition, next, stop, false)
        .await
        .is_some()
}

/// Whether the partition's first offset is above `sought` now (retention
/// deleted messages never applied): the reason and message to stop it
/// with. Kafka is asked until it answers (`None` from `?` if told to stop
/// meanwhile: the task ends).
async fn gap_since_check(
    worker: &Worker,
    topic: &str,
    partition: i32,
    sought: i64,
    stop: &watch::Receiver<()>,
) -> Option<Option<(&'static str, String)>> {
    let checked = super::unless_stopped(stop, async {
        super::check_start(
            topic,
            partition,
            Some(sought),
            false,
            || super::watermarks(worker, topic, partition),
            || async { Ok(true) },
            |_| {},
        )
        .await
    })
    .await?;
    Some(checked.err())
}
