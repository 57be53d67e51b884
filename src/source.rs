//! Source: the Kafka consumer of the mirrored CDC and heartbeat topics and
//! the per-partition apply loops it feeds.
//!
//! What it promises:
//! - Offsets come from PostgreSQL: a newly assigned partition is paused,
//!   sought to its stored `regionsync.offsets` row, then resumed; messages
//!   below the stored offset are never applied again.
//! - Each partition is applied by its own task, in order, in batches closed
//!   by count, bytes or linger time, reading its own librdkafka queue;
//!   partitions run concurrently on the connection pool. librdkafka stops
//!   fetching a partition whose queue is full, which bounds memory.
//! - A message that cannot be decoded or applied goes to the dead-letter
//!   topic (or stops the worker, with `on_error = stop`), and the offset moves
//!   past it in the same transaction as the batch around it.
//! - Kafka's committed offsets follow PostgreSQL's, for monitoring only.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::stream_consumer::StreamPartitionQueue;
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer,
};
use rdkafka::message::{BorrowedMessage, Header, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tracing::{error, info, warn};

use crate::apply::{self, Applied, Final, TargetTable};
use crate::clock::{self, Hlc};
use crate::config::{Config, LateChanges, OnError, Policy};
use crate::conflict;
use crate::decode::{self, Decoded, Op};
use crate::lag::{self, LagTracker};
use crate::metrics::{self as m, outcome, ReadyCheck};
use crate::offsets;
use crate::ops;
use crate::registry::AvroSource;
use crate::route::WriteClass;

/// Where a mirrored topic's messages go.
#[derive(Clone, Debug)]
struct Route {
    source_region: String,
    /// Index into the worker's tables; None for a heartbeat topic.
    table: Option<usize>,
}

/// What every partition task shares.
pub struct Shared {
    pub config: Config,
    pub group: String,
    pub pool: deadpool_postgres::Pool,
    /// Connections without a replication origin (conflict resolution).
    pub plain_pool: deadpool_postgres::Pool,
    pub tables: Vec<TargetTable>,
    routes: HashMap<String, Route>,
    decoders: HashMap<String, Arc<AvroSource>>,
    producer: FutureProducer,
    consumer: Arc<StreamConsumer<RebalanceForwarder>>,
    /// Freshness per source region, for the lag gauges.
    pub lag: LagTracker,
    /// Next offset to apply per owned partition, for the consumer-lag gauge.
    positions: Mutex<HashMap<(String, i32), i64>>,
    /// When a batch last committed (ms): proof enough that PostgreSQL
    /// answers, so readiness need not queue for a busy pool.
    last_commit_ms: std::sync::atomic::AtomicI64,
}

/// Forwards assignments and revocations to the main loop. New partitions are
/// paused here, before any fetch, until the main loop has sought them to
/// their stored offsets.
pub struct RebalanceForwarder {
    events: mpsc::UnboundedSender<RebalanceEvent>,
    /// High watermark per partition, from librdkafka's periodic statistics
    /// (no broker round trip of our own).
    high_watermarks: Mutex<HashMap<(String, i32), i64>>,
}

#[derive(Debug)]
pub enum RebalanceEvent {
    Assigned(Vec<(String, i32)>),
    Revoked(Vec<(String, i32)>),
}

fn partitions(tpl: &TopicPartitionList) -> Vec<(String, i32)> {
    tpl.elements()
        .iter()
        .map(|e| (e.topic().to_string(), e.partition()))
        .collect()
}

impl ClientContext for RebalanceForwarder {
    fn stats(&self, statistics: rdkafka::Statistics) {
        let mut highs = self.high_watermarks.lock().expect("watermarks lock");
        for (name, topic) in statistics.topics {
            for (partition, p) in topic.partitions {
                // Partition -1 is librdkafka's internal "unassigned" queue.
                if partition >= 0 && p.hi_offset >= 0 {
                    highs.insert((name.clone(), partition), p.hi_offset);
                }
            }
        }
    }
}

impl ConsumerContext for RebalanceForwarder {
    fn pre_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(tpl) = rebalance {
            let _ = self.events.send(RebalanceEvent::Revoked(partitions(tpl)));
        }
    }

    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(tpl) = rebalance {
            if tpl.count() == 0 {
                return;
            }
            if let Err(e) = consumer.pause(tpl) {
                warn!(error = %e, "pausing newly assigned partitions failed");
            }
            let _ = self.events.send(RebalanceEvent::Assigned(partitions(tpl)));
        }
    }
}

/// Anchors a regex on exact topic names.
fn subscription_pattern(topics: &[String]) -> String {
    let escaped: Vec<String> = topics
        .iter()
        .map(|t| t.replace('.', "\\.").replace('-', "\\-"))
        .collect();
    format!("^({})$", escaped.join("|"))
}

fn kafka_config(config: &Config) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &config.kafka.bootstrap_servers);
    for (k, v) in &config.kafka.properties {
        c.set(k, v);
    }
    c
}

impl Shared {
    pub async fn connect(
        config: Config,
        pool: deadpool_postgres::Pool,
    ) -> anyhow::Result<(Arc<Shared>, mpsc::UnboundedReceiver<RebalanceEvent>)> {
        let client = pool.get().await.context("connecting to PostgreSQL")?;
        let mut tables = Vec::new();
        for t in &config.tables {
            tables.push(TargetTable::load(&**client, t, &config.regions).await?);
        }
        let mut routes = HashMap::new();
        for (topic, region, table) in config.mirrored_topics() {
            routes.insert(
                topic,
                Route {
                    source_region: region,
                    table,
                },
            );
        }
        // Lag carries on from what earlier runs committed, so a restart does
        // not reset it to zero.
        let group = config.consumer_group();
        let lag = LagTracker::new(config.source_regions(), lag::now_ms());
        let stored = offsets::newest_source_times(&**client, &group)
            .await
            .context(
                "reading regionsync.offsets (is the schema current? `regionsync setup` updates it)",
            )?;
        record_stored_times(&lag, &routes, stored);
        drop(client);
        let mut decoders = HashMap::new();
        for region in config.source_regions() {
            if let Some(url) = config.registry_for(&region) {
                decoders.insert(region, Arc::new(AvroSource::new(url)));
            }
        }
        let (events_tx, events_rx) = mpsc::unbounded_channel();
        let consumer: StreamConsumer<RebalanceForwarder> = kafka_config(&config)
            .set("group.id", &group)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            .set("partition.assignment.strategy", "cooperative-sticky")
            .set("topic.metadata.refresh.interval.ms", "5000")
            .set_if_absent("session.timeout.ms", "10000")
            .set_if_absent("fetch.wait.max.ms", "50")
            // librdkafka prefetches up to 64 MiB per partition by default;
            // 2 MiB per partition queue keeps every fetch busy (measured) and
            // the worker's memory bounded whatever the backlog.
            .set_if_absent("queued.max.messages.kbytes", "2048")
            // Both limits count compressed bytes, and a fetch may overshoot
            // the queue by up to this much per partition: 1 MiB (the
            // default) of lz4 JSON events is 10-30 MiB decompressed, which
            // took a replay's peak RSS from about 110 MB to 171-195 MB
            // (make bench). 256 KiB: 134 MB, at the same rate.
            .set_if_absent("fetch.message.max.bytes", "262144")
            // Default 1 s: a partition whose queue filled up while its batch
            // was committing would then wait a whole second for its next
            // fetch — most of the replay time with large JSON messages.
            .set_if_absent("fetch.queue.backoff.ms", "10")
            // Feeds the consumer-lag gauge with high watermarks.
            .set_if_absent("statistics.interval.ms", "5000")
            .create_with_context(RebalanceForwarder {
                events: events_tx,
                high_watermarks: Mutex::new(HashMap::new()),
            })
            .context("creating the Kafka consumer")?;
        let producer: FutureProducer = kafka_config(&config)
            .set("enable.idempotence", "true")
            .create()
            .context("creating the dead-letter producer")?;
        let shared = Shared {
            group,
            plain_pool: ops::plain_pool(&config)?,
            pool,
            tables,
            routes,
            decoders,
            producer,
            consumer: Arc::new(consumer),
            config,
            lag,
            positions: Mutex::new(HashMap::new()),
            last_commit_ms: std::sync::atomic::AtomicI64::new(0),
        };
        Ok((Arc::new(shared), events_rx))
    }
}

trait SetIfAbsent {
    fn set_if_absent(&mut self, key: &str, value: &str) -> &mut Self;
}

impl SetIfAbsent for ClientConfig {
    fn set_if_absent(&mut self, key: &str, value: &str) -> &mut Self {
        if self.get(key).is_none() {
            self.set(key, value);
        }
        self
    }
}

impl ReadyCheck for Shared {
    fn check(&self) -> futures::future::BoxFuture<'_, Result<(), String>> {
        Box::pin(async move {
            let assigned = self
                .consumer
                .assignment()
                .map_err(|e| format!("Kafka: {e}"))?;
            if assigned.count() == 0 {
                return Err("Kafka: no partitions assigned".to_string());
            }
            let last_commit = self
                .last_commit_ms
                .load(std::sync::atomic::Ordering::Relaxed);
            if lag::now_ms() - last_commit < 5_000 {
                return Ok(());
            }
            let ping = async {
                let client = self.pool.get().await.map_err(|e| e.to_string())?;
                client
                    .simple_query("SELECT 1")
                    .await
                    .map_err(|e| e.to_string())
            };
            match tokio::time::timeout(Duration::from_secs(2), ping).await {
                Ok(Ok(_)) => Ok(()),
                Ok(Err(e)) => Err(format!("PostgreSQL: {e}")),
                Err(_) => Err("PostgreSQL: no answer within 2 s".to_string()),
            }
        })
    }
}

/// Feeds the newest source times stored per topic (by any replica of the
/// group) into the lag tracker.
fn record_stored_times(
    lag: &LagTracker,
    routes: &HashMap<String, Route>,
    stored: Vec<(String, i64)>,
) {
    for (topic, ts_ms) in stored {
        if let Some(route) = routes.get(&topic) {
            lag.committed(&route.source_region, ts_ms, route.table.is_none());
        }
    }
}

/// Removes the tombstones of this worker's tables older than
/// `tombstone_grace` (by local delete time), in chunks, every minute (or
/// every tenth of the grace, if shorter). Failures are retried next time.
async fn collect_tombstones(shared: Arc<Shared>) {
    let grace = shared.config.tombstone_grace;
    let every = (grace / 10).clamp(Duration::from_secs(1), Duration::from_secs(60));
    let tables: Vec<String> = shared.tables.iter().map(|t| t.name.clone()).collect();
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let collect = async {
            let client = shared.pool.get().await?;
            let mut total = 0u64;
            loop {
                let n = client
                    .execute(
                        "WITH old AS (
                            SELECT table_name, row_key FROM regionsync.tombstones
                             WHERE table_name = ANY($2) AND deleted_at < now() - make_interval(secs => $1)
                             LIMIT 10000)
                         DELETE FROM regionsync.tombstones ts USING old
                          WHERE ts.table_name = old.table_name AND ts.row_key = old.row_key",
                        &[&grace.as_secs_f64(), &tables],
                    )
                    .await?;
                total += n;
                if n < 10_000 {
                    return anyhow::Ok(total);
                }
            }
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
async fn report_lag(shared: Arc<Shared>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    for n in 0u64.. {
        tick.tick().await;
        if n % 3 == 0 {
            let read = async {
                let client = shared.pool.get().await.map_err(|e| e.to_string())?;
                offsets::newest_source_times(&**client, &shared.group)
                    .await
                    .map_err(|e| e.to_string())
            };
            if let Ok(Ok(stored)) = tokio::time::timeout(Duration::from_millis(800), read).await {
                record_stored_times(&shared.lag, &shared.routes, stored);
            }
        }
        for l in shared.lag.snapshot(lag::now_ms()) {
            let region = l.source_region;
            metrics::gauge!(m::REPLICATION_LAG, "source_region" => region.clone())
                .set(l.replication_lag_seconds);
            metrics::gauge!(m::HEARTBEAT_AGE, "source_region" => region.clone())
                .set(l.heartbeat_age_seconds);
            if let Some(t) = l.newest_source_seconds {
                metrics::gauge!(m::LAST_APPLIED_SOURCE_TIMESTAMP, "source_region" => region).set(t);
            }
        }
        let positions = shared.positions.lock().expect("positions lock").clone();
        let highs = shared
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
            let ready = shared.check().await.is_ok();
            metrics::gauge!(m::READY).set(if ready { 1.0 } else { 0.0 });
        }
    }
}

/// A partition's apply task and the sender whose drop tells it to stop.
type PartitionTask = (watch::Sender<()>, JoinHandle<anyhow::Result<()>>);

/// This worker's consumer, with a queue per partition.
type Queue = StreamPartitionQueue<RebalanceForwarder>;

/// Consumes until `shutdown` resolves, then drains the partition tasks and
/// leaves the group.
///
/// Each assigned partition gets its own librdkafka queue and apply task, so
/// a partition that is busy committing never holds up the others; librdkafka
/// stops fetching a partition whose queue is full (bounded memory).
pub async fn run(
    shared: Arc<Shared>,
    mut events: mpsc::UnboundedReceiver<RebalanceEvent>,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    let topics: Vec<String> = shared.routes.keys().cloned().collect();
    shared
        .consumer
        .subscribe(&[&subscription_pattern(&topics)])
        .context("subscribing to the mirrored topics")?;
    info!(group = %shared.group, topics = ?topics, "consuming");
    let reporter = tokio::spawn(report_lag(shared.clone()));
    let collector = tokio::spawn(collect_tombstones(shared.clone()));
    let mut tasks: HashMap<(String, i32), PartitionTask> = HashMap::new();
    // One queue per partition for the consumer's life: dropping a split
    // queue detaches librdkafka's wake-up from it, which would leave a new
    // queue of the same partition (reassigned while the old task finished
    // its batch) never woken again.
    let mut queues: HashMap<(String, i32), Arc<Queue>> = HashMap::new();
    let (failed_tx, mut failed_rx) = mpsc::unbounded_channel::<anyhow::Error>();
    tokio::pin!(shutdown);
    let result = loop {
        tokio::select! {
            biased;
            _ = &mut shutdown => break Ok(()),
            Some(err) = failed_rx.recv() => break Err(err),
            Some(ev) = events.recv() => match ev {
                RebalanceEvent::Assigned(parts) => {
                    // Split each (still paused) partition off the main queue
                    // before it is resumed, so no message lands there.
                    for (topic, partition) in &parts {
                        let key = (topic.clone(), *partition);
                        let queue = match queues.get(&key) {
                            Some(q) => q.clone(),
                            None => match shared.consumer.split_partition_queue(topic, *partition) {
                                Some(q) => queues.entry(key).or_insert(Arc::new(q)).clone(),
                                None => {
                                    // Its messages would reach the main queue,
                                    // which restarts the worker (from the
                                    // stored offsets).
                                    warn!(topic = %topic, partition, "could not give the partition its own queue");
                                    continue;
                                }
                            },
                        };
                        let (stop, stopped) = watch::channel(());
                        let task = tokio::spawn(partition_loop(
                            shared.clone(), topic.clone(), *partition, queue, stopped, failed_tx.clone(),
                        ));
                        tasks.insert((topic.clone(), *partition), (stop, task));
                    }
                    if let Err(e) = seek_to_stored(&shared, &parts).await {
                        break Err(e);
                    }
                }
                RebalanceEvent::Revoked(parts) => {
                    // Dropping the stop sender lets the task finish the batch
                    // it holds (it then forgets its position).
                    for p in parts {
                        tasks.remove(&p);
                    }
                }
            },
            // Serves rebalances and errors; messages all go to the
            // partitions' own queues.
            msg = shared.consumer.recv() => match msg {
                Ok(m) => break Err(anyhow::anyhow!(
                    "a message of {}/{} arrived outside its partition queue; restarting from the stored offsets",
                    m.topic(), m.partition()
                )),
                Err(e) => warn!(error = %e, "kafka"),
            },
        }
    };
    // Let the partition tasks finish their in-flight batches (bounded).
    let handles: Vec<JoinHandle<anyhow::Result<()>>> =
        tasks.into_values().map(|(_, h)| h).collect();
    let drained =
        tokio::time::timeout(Duration::from_secs(8), futures::future::join_all(handles)).await;
    if drained.is_err() {
        warn!("in-flight batches did not finish within 8 s; abandoning them (their offsets were not stored)");
    }
    shared.consumer.unsubscribe();
    reporter.abort();
    collector.abort();
    result
}

/// The partition's next message, or `None` once told to stop. Borrowed from
/// librdkafka's fetch buffer, not copied: a batch holds its messages until
/// it is applied.
async fn next_message<'q>(
    queue: &'q Queue,
    stop: &mut watch::Receiver<()>,
) -> Option<BorrowedMessage<'q>> {
    loop {
        tokio::select! {
            biased;
            // Err: the sender is gone, i.e. the partition was revoked.
            _ = stop.changed() => return None,
            m = queue.recv() => match m {
                Ok(m) => return Some(m),
                Err(e) => warn!(error = %e, "kafka"),
            },
        }
    }
}

/// Seeks newly assigned (paused) partitions to their stored offsets and
/// resumes them.
async fn seek_to_stored(shared: &Shared, parts: &[(String, i32)]) -> anyhow::Result<()> {
    let mut seek = TopicPartitionList::new();
    let mut resume = TopicPartitionList::new();
    for (topic, partition) in parts {
        resume.add_partition(topic, *partition);
        let stored = with_retry("reading stored offsets", || async {
            let client = shared.pool.get().await.map_err(anyhow::Error::from)?;
            offsets::load(&**client, &shared.group, topic, *partition)
                .await
                .map_err(anyhow::Error::from)
        })
        .await?;
        match stored {
            Some(next) => {
                info!(topic = %topic, partition, offset = next, "resuming at stored offset");
                seek.add_partition_offset(topic, *partition, Offset::Offset(next))?;
            }
            None => {
                // Not from Kafka's committed offset, which is only a copy.
                info!(topic = %topic, partition, "no stored offset; starting from the beginning");
                seek.add_partition_offset(topic, *partition, Offset::Beginning)?;
            }
        }
    }
    if seek.count() > 0 {
        shared
            .consumer
            .seek_partitions(seek, Duration::from_secs(10))
            .context("seeking to stored offsets")?;
    }
    shared
        .consumer
        .resume(&resume)
        .context("resuming partitions")?;
    Ok(())
}

async fn with_retry<T, E: std::fmt::Display, F, Fut>(what: &str, mut f: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, E>>,
{
    let mut delay = Duration::from_millis(200);
    loop {
        match f().await {
            Ok(v) => return Ok(v),
            Err(e) => {
                warn!(error = %e, retry_in = ?delay, "{what} failed");
                metrics::counter!(m::POSTGRES_RECONNECTS_TOTAL).increment(1);
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
            }
        }
    }
}

/// Removes a partition's position when its task ends.
struct Forget<'a>(&'a Shared, (String, i32));

impl Drop for Forget<'_> {
    fn drop(&mut self) {
        if let Ok(mut positions) = self.0.positions.lock() {
            positions.remove(&self.1);
        }
    }
}

/// One partition: batches, applies, stores offsets, until told to stop
/// (its stop sender dropped on revocation or shutdown).
async fn partition_loop(
    shared: Arc<Shared>,
    topic: String,
    partition: i32,
    queue: Arc<Queue>,
    mut stop: watch::Receiver<()>,
    failed: mpsc::UnboundedSender<anyhow::Error>,
) -> anyhow::Result<()> {
    let Some(route) = shared.routes.get(&topic).cloned() else {
        return Ok(());
    };
    let stored = with_retry("reading the stored offset", || async {
        let client = shared.pool.get().await.map_err(anyhow::Error::from)?;
        offsets::load(&**client, &shared.group, &topic, partition)
            .await
            .map_err(anyhow::Error::from)
    })
    .await?;
    let mut next = match stored {
        Some(n) => n,
        // No stored offset: the consumer starts at the earliest one.
        None => {
            let (consumer, t) = (shared.consumer.clone(), topic.clone());
            tokio::task::spawn_blocking(move || {
                consumer.fetch_watermarks(&t, partition, Duration::from_secs(5))
            })
            .await
            .ok()
            .and_then(Result::ok)
            .map_or(0, |(low, _)| low)
        }
    };
    let set_position = |next: i64| {
        shared
            .positions
            .lock()
            .expect("positions lock")
            .insert((topic.clone(), partition), next);
    };
    set_position(next);
    // However the task ends, its partition leaves the consumer-lag gauge.
    let _forget = Forget(&shared, (topic.clone(), partition));
    let linger = shared.config.apply.linger();
    loop {
        let Some(first) = next_message(&queue, &mut stop).await else {
            return Ok(());
        };
        let deadline = tokio::time::Instant::now() + linger;
        let mut bytes = first.payload().map_or(0, |p| p.len());
        let mut batch = vec![first];
        while batch.len() < shared.config.apply.batch_max_rows
            && bytes < shared.config.apply.batch_max_bytes
        {
            tokio::select! {
                m = next_message(&queue, &mut stop) => match m {
                    Some(m) => { bytes += m.payload().map_or(0, |p| p.len()); batch.push(m); }
                    None => break,
                },
                _ = tokio::time::sleep_until(deadline) => break,
            }
        }
        // Already applied (redelivered after a crash between the PostgreSQL
        // and the Kafka commit): never apply again.
        let before = batch.len();
        batch.retain(|m| m.offset() >= next);
        if batch.len() < before {
            metrics::counter!(m::EVENTS_TOTAL, "source_region" => route.source_region.clone(), "table" => "", "op" => "", "outcome" => outcome::DUPLICATE)
                .increment((before - batch.len()) as u64);
        }
        if batch.is_empty() {
            continue;
        }
        match apply_batch(&shared, &route, &topic, partition, &batch).await {
            Ok(new_next) => {
                next = new_next;
                set_position(next);
                let mut tpl = TopicPartitionList::new();
                let _ = tpl.add_partition_offset(&topic, partition, Offset::Offset(next));
                let _ = shared.consumer.commit(&tpl, CommitMode::Async);
            }
            Err(e) => {
                error!(topic = %topic, partition, error = %format!("{e:#}"), "stopping");
                let _ = failed.send(e);
                return Ok(());
            }
        }
    }
}

/// A message the batch could not use, bound for the dead-letter topic.
struct Rejected<'a> {
    msg: &'a BorrowedMessage<'a>,
    reason: &'static str,
    error: String,
    /// Produced to the dead-letter topic already, by an attempt whose
    /// commit then failed: not sent twice, still counted.
    sent: bool,
}

impl<'a> Rejected<'a> {
    fn new(msg: &'a BorrowedMessage<'a>, reason: &'static str, error: String) -> Self {
        Rejected {
            msg,
            reason,
            error,
            sent: false,
        }
    }
}

/// One change ready to apply, with the message it came from.
enum Step<'a> {
    Row {
        table: usize,
        fin: Final,
        msg: &'a BorrowedMessage<'a>,
        /// Source commit time, for the end-to-end latency.
        ts_ms: i64,
    },
    Truncate {
        table: usize,
        ts_ms: i64,
    },
}

/// Decodes, applies and stores the offset of one batch; retries on
/// connection failures; returns the next offset.
async fn apply_batch(
    shared: &Shared,
    route: &Route,
    topic: &str,
    partition: i32,
    batch: &[BorrowedMessage<'_>],
) -> anyhow::Result<i64> {
    let next = batch.last().map(|m| m.offset() + 1).unwrap_or(0);
    let mut steps = Vec::new();
    let mut rejected = Vec::new();
    let mut newest_ts_ms = None::<i64>;
    let mut skipped: HashMap<(&'static str, String), u64> = HashMap::new();
    let now_ms = lag::now_ms();
    for msg in batch {
        let size = msg.key().map_or(0, |k| k.len()) + msg.payload().map_or(0, |p| p.len());
        if size > shared.config.apply.max_message_bytes {
            rejected.push(Rejected::new(
                msg,
                "oversized",
                format!(
                    "message of {size} bytes is above apply.max_message_bytes ({})",
                    shared.config.apply.max_message_bytes
                ),
            ));
            continue;
        }
        let decoded = match decode_message(shared, route, msg).await {
            Ok(d) => d,
            Err((reason, error)) => {
                rejected.push(Rejected::new(msg, reason, error));
                continue;
            }
        };
        let change = match decoded {
            Decoded::Tombstone { .. } => {
                *skipped
                    .entry((outcome::TOMBSTONE, String::new()))
                    .or_default() += 1;
                continue;
            }
            Decoded::Change(c) => c,
        };
        newest_ts_ms = Some(newest_ts_ms.unwrap_or(0).max(change.source_ts_ms));
        let Some(table) = route.table else {
            *skipped
                .entry((outcome::HEARTBEAT, String::new()))
                .or_default() += 1;
            continue;
        };
        if change
            .origin
            .as_deref()
            .is_some_and(|o| o.starts_with(ops::ORIGIN_PREFIX))
        {
            // A change the source region's worker applied there: its
            // original comes straight from the region that made it.
            *skipped
                .entry((outcome::RELAY, shared.tables[table].name.clone()))
                .or_default() += 1;
            continue;
        }
        let config = &shared.config.tables[table];
        if !config.accepts_source(topic, &change.schema, &change.table) {
            rejected.push(Rejected::new(
                msg,
                "unconfigured_table",
                format!(
                    "an event of table {}.{} on {topic}, which feeds {}",
                    change.schema, change.table, config.target
                ),
            ));
            continue;
        }
        if change.op == Op::Truncate {
            steps.push(Step::Truncate {
                table,
                ts_ms: change.source_ts_ms,
            });
            continue;
        }
        let ts_ms = change.source_ts_ms;
        match apply::prepare(&shared.tables[table], change, &route.source_region) {
            Ok(Final::Upsert(r)) if r.origin == shared.config.region => {
                // This region's own change, copied back by the reverse flow.
                *skipped
                    .entry((outcome::ECHO, shared.tables[table].name.clone()))
                    .or_default() += 1;
            }
            Ok(fin)
                if !crate::route::resident_in(
                    &shared.tables[table].residency,
                    fin.pin(),
                    &shared.config.region,
                ) =>
            {
                // Never written here; logged without the row's contents.
                info!(topic, partition = msg.partition(), offset = msg.offset(),
                    table = %shared.tables[table].name, pinned_to = fin.pin().unwrap_or_default(),
                    "a row restricted to other regions is not written here");
                *skipped
                    .entry((outcome::RESIDENCY, shared.tables[table].name.clone()))
                    .or_default() += 1;
            }
            Ok(fin) => {
                let hlc = match &fin {
                    Final::Upsert(r) => r.hlc,
                    Final::Delete(d) => d.hlc,
                };
                if clock::exceeds_clock_skew(Hlc(hlc), now_ms, shared.config.max_clock_skew) {
                    // Applied all the same (the version order stays total),
                    // but a clock this far ahead wins every conflict: say so.
                    warn!(topic, offset = msg.offset(), source_region = %route.source_region,
                        ahead = ?Hlc(hlc).ahead_of(now_ms), max_clock_skew = ?shared.config.max_clock_skew,
                        "a change is dated further in the future than max_clock_skew");
                    metrics::counter!(m::CLOCK_SKEW_EXCEEDED_TOTAL, "source_region" => route.source_region.clone())
                        .increment(1);
                }
                steps.push(Step::Row {
                    table,
                    fin,
                    msg,
                    ts_ms,
                });
            }
            Err(e) => rejected.push(Rejected::new(msg, e.reason(), e.to_string())),
        }
    }
    if !rejected.is_empty() && shared.config.on_error == OnError::Stop {
        let r = &rejected[0];
        anyhow::bail!(
            "{} at {}/{}/{}: {} (on_error = stop)",
            r.reason,
            r.msg.topic(),
            r.msg.partition(),
            r.msg.offset(),
            r.error
        );
    }

    let mut delay = Duration::from_millis(200);
    loop {
        let committed = commit_batch(
            shared,
            &route.source_region,
            topic,
            partition,
            (next, newest_ts_ms),
            &steps,
            &mut rejected,
        )
        .await;
        match committed {
            Ok(counts) => {
                let now = lag::now_ms();
                shared
                    .last_commit_ms
                    .store(now, std::sync::atomic::Ordering::Relaxed);
                if let Some(ts) = newest_ts_ms {
                    shared
                        .lag
                        .committed(&route.source_region, ts, route.table.is_none());
                }
                let latency = metrics::histogram!(m::END_TO_END_LATENCY, "source_region" => route.source_region.clone());
                for step in &steps {
                    if let Step::Row { ts_ms, .. } = step {
                        latency.record(lag::latency_seconds(now, *ts_ms));
                    }
                }
                let to_reassert: u64 = counts.iter().map(|(_, a)| a.rejected).sum();
                record(shared, route, counts, &skipped, rejected.len(), batch.len());
                if to_reassert > 0 {
                    reassert_rejected(shared).await;
                }
                return Ok(next);
            }
            Err(BatchError::Data(e)) if shared.config.on_error == OnError::Stop => {
                anyhow::bail!("applying {topic}/{partition} failed: {e} (on_error = stop)");
            }
            Err(BatchError::Data(_)) => {
                // Find the changes PostgreSQL refuses, one by one.
                isolate_bad_rows(shared, &mut steps, &mut rejected).await?;
            }
            Err(BatchError::Transient(e)) => {
                warn!(topic, partition, error = %e, retry_in = ?delay, "batch failed; retrying");
                metrics::counter!(m::POSTGRES_RECONNECTS_TOTAL).increment(1);
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
            }
        }
    }
}

fn record(
    shared: &Shared,
    route: &Route,
    counts: Vec<(usize, Applied)>,
    skipped: &HashMap<(&'static str, String), u64>,
    dlq: usize,
    batch_len: usize,
) {
    let region = route.source_region.clone();
    for (table, a) in counts {
        let name = shared.tables[table].name.clone();
        metrics::counter!(m::EVENTS_TOTAL, "source_region" => region.clone(), "table" => name.clone(), "op" => "", "outcome" => outcome::APPLIED).increment(a.applied);
        metrics::counter!(m::EVENTS_TOTAL, "source_region" => region.clone(), "table" => name.clone(), "op" => "", "outcome" => outcome::STALE).increment(a.stale);
        metrics::counter!(m::EVENTS_TOTAL, "source_region" => region.clone(), "table" => name.clone(), "op" => "", "outcome" => outcome::SUPERSEDED).increment(a.superseded);
        if a.late > 0 {
            metrics::counter!(m::EVENTS_TOTAL, "source_region" => region.clone(), "table" => name.clone(), "op" => "", "outcome" => outcome::LATE).increment(a.late);
        }
        if a.held > 0 {
            metrics::counter!(m::EVENTS_TOTAL, "source_region" => region.clone(), "table" => name.clone(), "op" => "", "outcome" => outcome::HELD).increment(a.held);
        }
        if a.conflicts > 0 {
            let policy = shared.tables[table]
                .homing
                .as_ref()
                .map_or(Policy::Lww, |h| h.policy);
            metrics::counter!(m::CONFLICTS_TOTAL, "table" => name.clone(), "policy" => policy.as_str()).increment(a.conflicts);
        }
        for class in WriteClass::ALL {
            let n = a.classes[class.index()];
            if n > 0 {
                metrics::counter!(m::WRITES_BY_CLASS_TOTAL, "table" => name.clone(), "class" => class.as_str()).increment(n);
            }
        }
    }
    for ((what, table), n) in skipped {
        metrics::counter!(m::EVENTS_TOTAL, "source_region" => region.clone(), "table" => table.clone(), "op" => "", "outcome" => *what).increment(*n);
    }
    if dlq > 0 {
        metrics::counter!(m::EVENTS_TOTAL, "source_region" => region.clone(), "table" => "", "op" => "", "outcome" => outcome::DLQ).increment(dlq as u64);
    }
    metrics::histogram!(m::APPLY_BATCH_ROWS).record(batch_len as f64);
}

enum BatchError {
    /// PostgreSQL refused the data (a bad value, a constraint): isolate it.
    Data(tokio_postgres::Error),
    /// The connection or server failed: retry the whole batch.
    Transient(anyhow::Error),
}

fn classify(e: tokio_postgres::Error) -> BatchError {
    match e.code() {
        // Classes 22 (data exception), 23 (integrity constraint), 42 (e.g.
        // a cast that does not fit): the row, not the server.
        Some(code)
            if ["22", "23", "42"]
                .iter()
                .any(|c| code.code().starts_with(c)) =>
        {
            BatchError::Data(e)
        }
        _ => BatchError::Transient(e.into()),
    }
}

/// One transaction: the rows, the dead letters' offsets, the offset row
/// (with the newest source commit time, so lag survives a restart).
async fn commit_batch(
    shared: &Shared,
    source_region: &str,
    topic: &str,
    partition: i32,
    (next, newest_ts_ms): (i64, Option<i64>),
    steps: &[Step<'_>],
    rejected: &mut Vec<Rejected<'_>>,
) -> Result<Vec<(usize, Applied)>, BatchError> {
    let mut client = shared
        .pool
        .get()
        .await
        .map_err(|e| BatchError::Transient(e.into()))?;
    let started = Instant::now();
    let tx = client.transaction().await.map_err(classify)?;
    tx.batch_execute(ops::APPLY_TRANSACTION_SQL)
        .await
        .map_err(classify)?;
    let mut counts: HashMap<usize, Applied> = HashMap::new();
    let late_before = (shared.config.late_changes == LateChanges::Skip).then(|| {
        let grace_ms = shared.config.tombstone_grace.as_millis() as i64;
        Hlc::new(lag::now_ms() - grace_ms, 0)
    });
    // Rows between truncates, per table, collapsed to the last change per key.
    let mut pending: HashMap<usize, Vec<&Final>> = HashMap::new();
    for step in steps.iter().chain(std::iter::once(&Step::Truncate {
        table: usize::MAX,
        ts_ms: 0,
    })) {
        match step {
            Step::Row { table, fin, .. } => pending.entry(*table).or_default().push(fin),
            Step::Truncate { table, ts_ms } => {
                for (t, finals) in pending.drain() {
                    let changes = finals.len() as u64;
                    let finals = apply::collapse(finals);
                    let superseded = changes - finals.len() as u64;
                    let checked = conflict::check(
                        &tx,
                        &shared.tables[t],
                        finals,
                        source_region,
                        &shared.config.region,
                        late_before,
                    )
                    .await
                    .map_err(classify)?;
                    if checked.late > 0 {
                        warn!(table = %shared.tables[t].name, topic, partition, count = checked.late,
                            tombstone_grace = ?shared.config.tombstone_grace,
                            "changes older than tombstone_grace for keys without a row were not applied (late_changes = skip)");
                    }
                    *counts.entry(t).or_default() += Applied {
                        superseded,
                        conflicts: checked.recorded,
                        held: checked.held,
                        rejected: checked.rejected,
                        classes: checked.classes,
                        late: checked.late,
                        ..Applied::default()
                    };
                    let a = apply::apply_finals(&tx, &shared.tables[t], &checked.finals)
                        .await
                        .map_err(classify)?;
                    *counts.entry(t).or_default() += a;
                }
                if *table != usize::MAX {
                    let a =
                        apply::apply_truncate(&tx, &shared.tables[*table], *ts_ms, source_region)
                            .await
                            .map_err(classify)?;
                    *counts.entry(*table).or_default() += a;
                }
            }
        }
    }
    send_to_dlq(shared, rejected)
        .await
        .map_err(BatchError::Transient)?;
    offsets::store(&tx, &shared.group, topic, partition, next, newest_ts_ms)
        .await
        .map_err(classify)?;
    tx.commit().await.map_err(classify)?;
    metrics::histogram!(m::APPLY_BATCH_SECONDS).record(started.elapsed().as_secs_f64());
    Ok(counts.into_iter().collect())
}

/// Writes the local rows again whose remote writes the `reject` policy held
/// (conflict::reassert_rejected). A failure is logged and left for the next
/// batch or restart: the held writes stay recorded as pending.
pub async fn reassert_rejected(shared: &Shared) {
    let result = async {
        let mut client = shared.plain_pool.get().await?;
        conflict::reassert_rejected(&mut client, &shared.tables, &shared.config.region).await
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

/// Tries each row change alone (inside a savepoint); those PostgreSQL refuses
/// move from `steps` to `rejected`.
async fn isolate_bad_rows<'a>(
    shared: &Shared,
    steps: &mut Vec<Step<'a>>,
    rejected: &mut Vec<Rejected<'a>>,
) -> anyhow::Result<()> {
    let mut client = shared.pool.get().await?;
    let mut tx = client.transaction().await?;
    tx.batch_execute(ops::APPLY_TRANSACTION_SQL).await?;
    let mut keep = Vec::new();
    for step in steps.drain(..) {
        if let Step::Row {
            table, fin, msg, ..
        } = &step
        {
            let sp = tx.savepoint("row").await?;
            let result =
                apply::apply_finals(&sp, &shared.tables[*table], &[Cow::Borrowed(fin)]).await;
            match result {
                Ok(_) => sp.rollback().await?,
                Err(e) => {
                    let _ = sp.rollback().await;
                    let detail = e
                        .as_db_error()
                        .map(|d| d.message().to_string())
                        .unwrap_or_else(|| e.to_string());
                    rejected.push(Rejected::new(
                        msg,
                        "rejected_by_postgres",
                        format!("{}: {detail}", shared.tables[*table].name),
                    ));
                    continue;
                }
            }
        }
        keep.push(step);
    }
    tx.rollback().await?;
    *steps = keep;
    Ok(())
}

/// Produces the rejected messages to the dead-letter topic and waits for
/// the broker's acknowledgement (before the offset moves past them).
async fn send_to_dlq(shared: &Shared, rejected: &mut [Rejected<'_>]) -> anyhow::Result<()> {
    let dlq = shared.config.dlq_topic();
    for r in rejected.iter_mut().filter(|r| !r.sent) {
        let partition = r.msg.partition().to_string();
        let offset = r.msg.offset().to_string();
        let headers = OwnedHeaders::new()
            .insert(Header {
                key: "regionsync.error",
                value: Some(r.error.as_str()),
            })
            .insert(Header {
                key: "regionsync.reason",
                value: Some(r.reason),
            })
            .insert(Header {
                key: "regionsync.topic",
                value: Some(r.msg.topic()),
            })
            .insert(Header {
                key: "regionsync.partition",
                value: Some(partition.as_str()),
            })
            .insert(Header {
                key: "regionsync.offset",
                value: Some(offset.as_str()),
            });
        let mut record: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(&dlq).headers(headers);
        if let Some(k) = r.msg.key() {
            record = record.key(k);
        }
        if let Some(p) = r.msg.payload() {
            record = record.payload(p);
        }
        shared
            .producer
            .send(record, Duration::from_secs(30))
            .await
            .map_err(|(e, _)| anyhow::anyhow!("producing to the dead-letter topic {dlq}: {e}"))?;
        warn!(topic = %r.msg.topic(), partition = r.msg.partition(), offset = r.msg.offset(), reason = r.reason, error = %r.error, "sent to the dead-letter topic");
        metrics::counter!(m::DLQ_MESSAGES_TOTAL, "reason" => r.reason).increment(1);
        r.sent = true;
    }
    Ok(())
}

/// A bounded label for the dead-letter metric.
fn decode_reason(e: &decode::DecodeError) -> &'static str {
    match e {
        decode::DecodeError::MissingKey => "null_key",
        decode::DecodeError::Json(_) => "not_json",
        decode::DecodeError::Avro(_) => "bad_avro",
        decode::DecodeError::Column { .. } => "bad_value",
        decode::DecodeError::Envelope(_) | decode::DecodeError::UnknownOp(_) => "bad_envelope",
    }
}

/// Avro (Confluent wire format: magic byte 0) or JSON, by the first byte.
async fn decode_message(
    shared: &Shared,
    route: &Route,
    msg: &BorrowedMessage<'_>,
) -> Result<Decoded, (&'static str, String)> {
    let is_avro = |b: Option<&[u8]>| b.is_some_and(|b| b.first() == Some(&0));
    if is_avro(msg.key()) || is_avro(msg.payload()) {
        let decoder = shared.decoders.get(&route.source_region).ok_or((
            "no_registry",
            format!(
                "an Avro message, but no schema registry is configured for region {}",
                route.source_region
            ),
        ))?;
        let key = decoder
            .decode(msg.key())
            .await
            .map_err(|e| ("avro_key", format!("key: {e}")))?;
        let value = decoder
            .decode_envelope(msg.payload())
            .await
            .map_err(|e| ("avro_value", format!("value: {e}")))?;
        match (key, value) {
            (Some(key), value) => {
                decode::decode_avro(key.value, key.schema, value.map(|v| (v.value, v.schema)))
            }
            (None, Some(v)) => decode::decode_avro_keyless(v.value, v.schema),
            (None, None) => Err(decode::DecodeError::MissingKey),
        }
        .map_err(|e| match e {
            decode::DecodeError::MissingKey => ("null_key", "message has no key".to_string()),
            e => ("decode", e.to_string()),
        })
    } else {
        decode::decode_json(msg.key(), msg.payload())
            .map_err(|e| (decode_reason(&e), e.to_string()))
    }
}
