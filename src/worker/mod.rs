//! Worker: the apply loop that ties the steps together. It owns what every
//! partition task shares ([`Worker`]), the main loop that starts a task per
//! assigned partition and stops it on revocation, and readiness.
//!
//! What it promises:
//! - Offsets come from PostgreSQL: a newly assigned partition is paused,
//!   sought to its stored `regionsync.offsets` row, then resumed; messages
//!   below the stored offset are never applied again.
//! - Each partition is applied by its own task (`partition`), in order, in
//!   batches closed by count, bytes or linger time; partitions run
//!   concurrently on the connection pool.
//! - A batch is planned (decode → route → prepare, `batch::plan`) and then
//!   committed in one transaction with its offset (`batch::commit`); what
//!   cannot be applied is decided once, in `failure`.
//! - Kafka's committed offsets follow PostgreSQL's, for monitoring only.
//!
//! | file | holds |
//! |---|---|
//! | `partition` | one partition's task: batching, duplicates, the batch retry loop |
//! | `batch` | a batch's plan (pure) and its transaction |
//! | `failure` | the one error decision: retry, dead-letter or stop; the backoff |
//! | `fence` | the homing fence's heartbeat reader (`crate::fence` decides) |
//! | `background` | the lag reporter, the tombstone collector, the conflicts' retention, re-asserting rejected writes |

mod background;
pub(crate) mod batch;
pub mod failure;
mod fence;
mod partition;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use rdkafka::consumer::Consumer;
use rdkafka::message::Message;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tracing::{error, info, warn};

use crate::apply::TargetTable;
use crate::clock;
use crate::config::Config;
use crate::decode::registry::AvroSource;
use crate::fence::Fence;
use crate::lag::LagTracker;
use crate::metrics::ReadyCheck;
use crate::offsets;
use crate::source::dlq::DeadLetterProducer;
use crate::source::{self, Kafka, Queue, RebalanceEvent};

pub use background::reassert_rejected;

/// Where a mirrored topic's messages go.
#[derive(Clone, Debug)]
struct Route {
    source_region: String,
    /// Index into the worker's tables; None for a heartbeat topic.
    table: Option<usize>,
}

/// A partition of a topic: (topic, partition).
type PartitionKey = (String, i32);

/// What every partition task shares.
pub struct Worker {
    pub config: Config,
    pub group: String,
    pub pool: deadpool_postgres::Pool,
    /// Connections without a replication origin (conflict resolution).
    pub plain_pool: deadpool_postgres::Pool,
    /// The target tables as last read from the catalog, in `config.tables`
    /// order. A batch works on one snapshot ([`Worker::tables`]); a schema
    /// fault reads a table again ([`Worker::refresh_layout`]).
    layouts: std::sync::RwLock<Arc<Vec<TargetTable>>>,
    routes: HashMap<String, Route>,
    decoders: HashMap<String, Arc<AvroSource>>,
    dlq: DeadLetterProducer,
    consumer: Arc<Kafka>,
    /// Freshness per source region, for the lag gauges.
    pub lag: LagTracker,
    /// Holds a source region's changes until this database has the
    /// homing it wrote under (`fence`).
    pub fence: Fence,
    /// Next offset to apply per owned partition, for the consumer-lag gauge.
    positions: Mutex<HashMap<PartitionKey, i64>>,
    /// When a batch last committed (ms): proof enough that PostgreSQL
    /// answers, so readiness need not queue for a busy pool.
    last_commit_ms: std::sync::atomic::AtomicI64,
    /// Partitions held at a change by a fault being waited out: since
    /// when, and why (for `/readyz`).
    held: Mutex<HashMap<(String, i32), (Instant, String)>>,
    /// Partitions not resumed because their stored offset is outside the
    /// topic: (reason label, why), for `/readyz` and the gauge.
    stopped: Mutex<HashMap<PartitionKey, (&'static str, String)>>,
    /// Partitions whose task panicked and was restarted: when, and the
    /// panic's message (`/readyz` is false for `apply.unready_after`).
    panicked: Mutex<HashMap<(String, i32), (Instant, String)>>,
}

/// A test hook: the partition task that reaches a message of this topic
/// at this offset panics, once. Never set outside tests.
#[doc(hidden)]
pub static PANIC_ONCE_AT: Mutex<Option<(String, i64)>> = Mutex::new(None);

impl Worker {
    /// The target tables as last read: one snapshot for a whole batch, so
    /// that its plan and its statements agree on the columns.
    pub fn tables(&self) -> Arc<Vec<TargetTable>> {
        self.layouts.read().expect("layouts lock").clone()
    }

    /// Reads table `t`'s layout from the catalog again (after a schema
    /// fault: a column added, dropped or retyped here); true if it changed.
    pub(crate) async fn refresh_layout(&self, t: usize) -> anyhow::Result<bool> {
        let client = self.pool.get().await?;
        let fresh = load_table(&**client, &self.config, t).await?;
        let mut layouts = self.layouts.write().expect("layouts lock");
        let old = &layouts[t];
        if old.same_layout(&fresh) {
            return Ok(false);
        }
        let added: Vec<&str> = fresh
            .columns
            .iter()
            .filter(|c| !old.columns.iter().any(|o| o.0 == c.0))
            .map(|c| c.0.as_str())
            .collect();
        let dropped: Vec<&str> = old
            .columns
            .iter()
            .filter(|c| !fresh.columns.iter().any(|f| f.0 == c.0))
            .map(|c| c.0.as_str())
            .collect();
        let retyped: Vec<String> = fresh
            .columns
            .iter()
            .filter_map(|c| {
                let o = old.columns.iter().find(|o| o.0 == c.0)?;
                (o.1 != c.1).then(|| format!("{} {} -> {}", c.0, o.1, c.1))
            })
            .collect();
        info!(table = %fresh.name, ?added, ?dropped, ?retyped, "the table's layout changed; read again");
        let mut next = (**layouts).clone();
        next[t] = fresh;
        *layouts = Arc::new(next);
        Ok(true)
    }

    /// Marks a partition as held by `cause` (from its first retry on).
    fn hold(&self, topic: &str, partition: i32, cause: String) {
        let mut held = self.held.lock().expect("held lock");
        match held.get_mut(&(topic.to_owned(), partition)) {
            Some((_, why)) => *why = cause,
            None => {
                held.insert((topic.to_owned(), partition), (Instant::now(), cause));
            }
        }
    }

    /// The partition moved on (or was given up).
    fn release(&self, topic: &str, partition: i32) {
        self.held
            .lock()
            .expect("held lock")
            .remove(&(topic.to_owned(), partition));
    }

    /// Records whether a newly assigned partition may resume (`problem`:
    /// why not), for `/readyz` and `regionsync_partition_stopped`.
    fn set_stopped(&self, topic: &str, partition: i32, problem: Option<(&'static str, String)>) {
        let key = (topic.to_owned(), partition);
        let mut stopped = self.stopped.lock().expect("stopped lock");
        let gauge = |reason: &'static str, v: f64| {
            metrics::gauge!(crate::metrics::PARTITION_STOPPED, "topic" => topic.to_owned(),
                "partition" => partition.to_string(), "reason" => reason)
            .set(v);
        };
        if let Some((reason, _)) = stopped.remove(&key) {
            gauge(reason, 0.0);
        }
        if let Some((reason, why)) = problem {
            gauge(reason, 1.0);
            stopped.insert(key, (reason, why));
        }
    }

    /// The partitions held longer than `apply.unready_after`, described.
    fn held_too_long(&self) -> Option<String> {
        let limit = self.config.apply.unready_after;
        let held = self.held.lock().expect("held lock");
        let mut long: Vec<String> = held
            .iter()
            .filter(|(_, (since, _))| since.elapsed() >= limit)
            .map(|((topic, partition), (since, why))| {
                format!(
                    "{topic}/{partition} held for {}s: {why}",
                    since.elapsed().as_secs()
                )
            })
            .collect();
        long.sort();
        (!long.is_empty()).then(|| long.join("; "))
    }
}

impl Worker {
    /// Reads the target tables and the stored source times, creates the
    /// consumer and the dead-letter producer. Nothing is consumed yet.
    pub async fn connect(
        config: Config,
        pool: deadpool_postgres::Pool,
    ) -> anyhow::Result<(Arc<Worker>, mpsc::UnboundedReceiver<RebalanceEvent>)> {
        let client = pool
            .get()
            .await
            .map_err(|e| anyhow::anyhow!(crate::apply::tls::explain_pool(&e, &config.postgres)))?;
        let mut tables = Vec::new();
        for t in 0..config.tables.len() {
            tables.push(load_table(&**client, &config, t).await?);
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
        let lag = LagTracker::new(config.source_regions(), clock::now_ms());
        let stored = offsets::newest_source_times(&**client, &group)
            .await
            .context(
                "reading regionsync.offsets (is the schema current? `regionsync setup` updates it)",
            )?;
        background::record_stored_times(&lag, &routes, stored);
        // The fence starts closed: each source region is held until a
        // heartbeat committed after this start clears it.
        let homing = crate::homing::load(&**client).await.context(
            "reading regionsync.homing (is the schema current? `regionsync setup` updates it)",
        )?;
        let fence = Fence::new(
            config.source_regions(),
            clock::now_ms(),
            homing.epoch(),
            failed_over(&homing),
        );
        drop(client);
        let mut decoders = HashMap::new();
        for region in config.source_regions() {
            if let Some(url) = config.registry_for(&region) {
                decoders.insert(region, Arc::new(AvroSource::with_settings(url, &config)?));
            }
        }
        let (consumer, events) = source::consumer(&config, &group)?;
        let worker = Worker {
            group,
            plain_pool: crate::apply::session::plain_pool(&config)?,
            pool,
            layouts: std::sync::RwLock::new(Arc::new(tables)),
            routes,
            decoders,
            dlq: DeadLetterProducer::new(&config)?,
            consumer: Arc::new(consumer),
            config,
            lag,
            fence,
            positions: Mutex::new(HashMap::new()),
            last_commit_ms: std::sync::atomic::AtomicI64::new(0),
            held: Mutex::new(HashMap::new()),
            stopped: Mutex::new(HashMap::new()),
            panicked: Mutex::new(HashMap::new()),
        };
        Ok((Arc::new(worker), events))
    }
}

impl ReadyCheck for Worker {
    fn check(&self) -> futures::future::BoxFuture<'_, Result<(), String>> {
        Box::pin(async move {
            let assigned = self
                .consumer
                .assignment()
                .map_err(|e| format!("Kafka: {e}"))?;
            if assigned.count() == 0 {
                return Err(
                    match self
                        .consumer
                        .context()
                        .errors
                        .recent(Duration::from_secs(60))
                    {
                        Some(why) => format!("Kafka: no partitions assigned; {why}"),
                        None => "Kafka: no partitions assigned".to_string(),
                    },
                );
            }
            if let Some(behind) = self.fence.behind() {
                return Err(behind);
            }
            if let Some(held) = self.held_too_long() {
                return Err(held);
            }
            {
                let limit = self.config.apply.unready_after;
                let panicked = self.panicked.lock().expect("panicked lock");
                let mut recent: Vec<String> = panicked
                    .iter()
                    .filter(|(_, (at, _))| at.elapsed() < limit)
                    .map(|((t, p), (at, why))| {
                        format!(
                            "{t}/{p}: its task panicked {}s ago ({why}) and was restarted",
                            at.elapsed().as_secs()
                        )
                    })
                    .collect();
                if !recent.is_empty() {
                    recent.sort();
                    return Err(recent.join("; "));
                }
            }
            {
                let stopped = self.stopped.lock().expect("stopped lock");
                if !stopped.is_empty() {
                    let mut why: Vec<&str> = stopped.values().map(|(_, w)| w.as_str()).collect();
                    why.sort_unstable();
                    return Err(why.join("; "));
                }
            }
            let last_commit = self
                .last_commit_ms
                .load(std::sync::atomic::Ordering::Relaxed);
            if clock::now_ms() - last_commit < 5_000 {
                return Ok(());
            }
            let ping = async {
                let client = self
                    .pool
                    .get()
                    .await
                    .map_err(|e| crate::apply::tls::explain_pool(&e, &self.config.postgres))?;
                client
                    .simple_query("SELECT 1")
                    .await
                    .map_err(|e| e.to_string())
            };
            match tokio::time::timeout(Duration::from_secs(2), ping).await {
                Ok(Ok(_)) => Ok(()),
                Ok(Err(e)) if e.starts_with("PostgreSQL") => Err(e),
                Ok(Err(e)) => Err(format!("PostgreSQL: {e}")),
                Err(_) => Err("PostgreSQL: no answer within 2 s".to_string()),
            }
        })
    }
}

/// A partition's apply task and the sender whose drop tells it to stop.
type PartitionTask = (watch::Sender<()>, JoinHandle<anyhow::Result<()>>);

/// Consumes until `shutdown` resolves, then drains the partition tasks and
/// leaves the group.
///
/// Each assigned partition gets its own librdkafka queue and apply task, so
/// a partition that is busy committing never holds up the others; librdkafka
/// stops fetching a partition whose queue is full (bounded memory).
pub async fn run(
    worker: Arc<Worker>,
    mut events: mpsc::UnboundedReceiver<RebalanceEvent>,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    let topics: Vec<String> = worker.routes.keys().cloned().collect();
    source::subscribe(&worker.consumer, &topics)?;
    info!(group = %worker.group, topics = ?topics, "consuming");
    let reporter = tokio::spawn(background::report_lag(worker.clone()));
    let collector = tokio::spawn(background::collect_tombstones(worker.clone()));
    let conflicts = tokio::spawn(background::maintain_conflicts(worker.clone()));
    let heartbeats = tokio::spawn(fence::read_heartbeats(worker.clone()));
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
                    // Each partition reads its stored offset, has it
                    // checked against the topic and is sought and resumed
                    // in its own task (`supervise`): one partition whose
                    // check Kafka keeps refusing never holds the others,
                    // a revocation or this loop.
                    for (topic, partition) in &parts {
                        let key = (topic.clone(), *partition);
                        if started_without_its_queue(&worker, &key, &mut tasks) {
                            continue;
                        }
                        // Split each (still paused) partition off the main
                        // queue before it is resumed, so no message lands
                        // there.
                        let queue = match queues.get(&key) {
                            Some(q) => q.clone(),
                            None => match worker.consumer.split_partition_queue(topic, *partition) {
                                Some(q) => queues.entry(key.clone()).or_insert(Arc::new(q)).clone(),
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
                        let task = tokio::spawn(supervise(
                            worker.clone(), key.clone(), queue, stopped, failed_tx.clone(),
                        ));
                        tasks.insert(key, (stop, task));
                    }
                }
                RebalanceEvent::Revoked(parts) => {
                    // Dropping the stop sender lets the task finish the batch
                    // it holds (it then forgets its position).
                    for p in parts {
                        worker.set_stopped(&p.0, p.1, None);
                        tasks.remove(&p);
                    }
                }
            },
            // Serves rebalances and errors; messages all go to the
            // partitions' own queues.
            msg = worker.consumer.recv() => match msg {
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
    let aborts: Vec<tokio::task::AbortHandle> = handles.iter().map(|h| h.abort_handle()).collect();
    let drained =
        tokio::time::timeout(Duration::from_secs(8), futures::future::join_all(handles)).await;
    if drained.is_err() {
        warn!("in-flight batches did not finish within 8 s; abandoning them (their offsets were not stored)");
        // Ended, not left running: a pipeline started again in this
        // process (a configuration reload) must be the only one applying
        // these partitions. An abandoned transaction commits with its
        // offset or not at all, as after a crash.
        for a in &aborts {
            a.abort();
        }
        while aborts.iter().any(|a| !a.is_finished()) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    worker.consumer.unsubscribe();
    // Stopped partitions are no longer this worker's.
    let stopped: Vec<(String, i32)> = worker
        .stopped
        .lock()
        .expect("stopped lock")
        .keys()
        .cloned()
        .collect();
    for (topic, partition) in stopped {
        worker.set_stopped(&topic, partition, None);
    }
    reporter.abort();
    collector.abort();
    conflicts.abort();
    heartbeats.abort();
    result
}

/// The regions failed over in `homing` (an open window): the fence holds
/// none of them.
fn failed_over(homing: &crate::route::HomingOverrides) -> Vec<String> {
    homing
        .windows
        .iter()
        .filter(|w| w.until_ms.is_none())
        .map(|w| w.region.clone())
        .collect()
}

/// Reads configured table `t` from the catalog, with its
/// `on_schema_mismatch` (the table's, else the global one).
pub(crate) async fn load_table(
    client: &impl tokio_postgres::GenericClient,
    config: &Config,
    t: usize,
) -> Result<TargetTable, crate::apply::TableError> {
    let table_config = &config.tables[t];
    let mut table = TargetTable::load(client, table_config, &config.regions).await?;
    table.on_schema_mismatch = table_config
        .on_schema_mismatch
        .unwrap_or(config.on_schema_mismatch);
    Ok(table)
}

/// The next offset to apply of a partition, as stored with its last batch
/// (`None`: nothing applied yet), read until PostgreSQL answers.
async fn stored_offset(worker: &Worker, topic: &str, partition: i32) -> Option<i64> {
    failure::with_retry("reading the stored offset", || async {
        let client = worker.pool.get().await.map_err(anyhow::Error::from)?;
        offsets::load(&**client, &worker.group, topic, partition)
            .await
            .map_err(anyhow::Error::from)
    })
    .await
}

/// Runs `f` unless the partition is told to stop first (its stop sender
/// dropped: revoked, shutting down, reloading): `None` then, at once.
async fn unless_stopped<T>(
    stop: &watch::Receiver<()>,
    f: impl std::future::Future<Output = T>,
) -> Option<T> {
    let mut stop = stop.clone();
    tokio::select! {
        biased;
        () = async { while stop.changed().await.is_ok() {} } => None,
        v = f => Some(v),
    }
}

/// Starts a newly assigned (paused) partition: reads its stored offset,
/// checks it against the topic ([`checked_start`]), seeks the partition to
/// the offset the check accepted and resumes it. `None` if the partition
/// must not be resumed (stopped: outside the topic) or was told to stop
/// meanwhile. Runs in the partition's own task, so
/// a check Kafka keeps refusing waits for this partition only.
async fn start_partition(
    worker: &Worker,
    (topic, partition): (&str, i32),
    stop: &watch::Receiver<()>,
) -> Option<i64> {
    let checked = unless_stopped(stop, async {
        let stored = stored_offset(worker, topic, partition).await;
        (
            stored,
            checked_start(worker, topic, partition, stored).await,
        )
    })
    .await;
    let Some((stored, start)) = checked else {
        // Its wait for Kafka ended by the stop: no longer held here.
        worker.release(topic, partition);
        return None;
    };
    // Resuming from an offset outside the topic would skip changes
    // silently: such a partition stays paused, without a task, until an
    // operator acts.
    let problem = start.as_ref().err().cloned();
    if let Some((_, why)) = &problem {
        error!(topic = %topic, partition, stored = ?stored, "{why}");
    }
    worker.set_stopped(topic, partition, problem);
    let start = start.ok()?;
    let hook = {
        let mut hook = BEFORE_SEEK.lock().expect("hook lock");
        match hook.take() {
            Some((t, h)) if t == topic => Some(h),
            other => {
                *hook = other;
                None
            }
        }
    };
    if let Some(hook) = hook {
        let _ = tokio::task::spawn_blocking(move || hook(partition)).await;
    }
    // To the offset the check accepted, never "the beginning": retention
    // run since the check would move that, and skip changes silently. If
    // that offset is gone by now, librdkafka says so on the partition's
    // queue (`auto.offset.reset = error`) and the partition's task stops
    // it (`partition::run`).
    // Asked again until librdkafka takes it (a partition whose fetcher
    // is still starting refuses a seek with "Local: Erroneous state"):
    // never resumed anywhere else.
    seek_until_taken(worker, topic, partition, start, stop, true).await?;
    // The crash test reads where each partition resumed from this line.
    if stored == Some(start) {
        info!(topic = %topic, partition, offset = start, "resuming at stored offset");
    } else {
        info!(topic = %topic, partition, offset = start, "nothing stored: starting at the first offset the check accepted");
    }
    Some(start)
}

/// Seeks a partition to `offset` (and resumes it if `resume`), asked
/// again with the backoff (`kafka_unavailable`, the partition held) until
/// librdkafka takes it; `None` if told to stop meanwhile.
async fn seek_until_taken(
    worker: &Worker,
    topic: &str,
    partition: i32,
    offset: i64,
    stop: &watch::Receiver<()>,
    resume: bool,
) -> Option<()> {
    let mut backoff = failure::Backoff::default();
    loop {
        match seek(worker, topic, partition, offset, stop, resume).await? {
            Ok(()) => {
                worker.release(topic, partition);
                return Some(());
            }
            Err(e) => {
                warn!(topic, partition, offset, error = %format!("{e:#}"), "could not seek the partition; it stays where it is");
                worker.hold(
                    topic,
                    partition,
                    format!("seeking to offset {offset}: {e:#}"),
                );
                unless_stopped(stop, backoff.wait(crate::metrics::retry::KAFKA_UNAVAILABLE))
                    .await?;
            }
        }
    }
}

/// Seeks a partition to `offset` (and resumes it if `resume`), off the
/// runtime (it blocks up to 10 s); `None` if told to stop meanwhile.
async fn seek(
    worker: &Worker,
    topic: &str,
    partition: i32,
    offset: i64,
    stop: &watch::Receiver<()>,
    resume: bool,
) -> Option<anyhow::Result<()>> {
    let (consumer, t) = (worker.consumer.clone(), topic.to_owned());
    let sought = tokio::task::spawn_blocking(move || {
        source::seek_and_resume(&consumer, &t, partition, offset, resume)
    });
    match unless_stopped(stop, sought).await? {
        Ok(r) => Some(r),
        Err(e) => Some(Err(anyhow::anyhow!("seeking {topic}/{partition}: {e}"))),
    }
}

/// Starts a newly assigned partition ([`start_partition`]), then runs its
/// task and restarts it from its stored offset if it panics: the panic is
/// logged, counted (`regionsync_partition_panics_total`) and makes
/// `/readyz` false for `apply.unready_after`. The messages the dead task
/// had taken from the queue are fetched again by seeking the partition to
/// the stored offset.
async fn supervise(
    worker: Arc<Worker>,
    key: (String, i32),
    queue: Arc<Queue>,
    stop: watch::Receiver<()>,
    failed: mpsc::UnboundedSender<anyhow::Error>,
) -> anyhow::Result<()> {
    let (topic, partition) = key.clone();
    let Some(mut next) = start_partition(&worker, (&topic, partition), &stop).await else {
        return Ok(());
    };
    loop {
        let task = AbortOnDrop(tokio::spawn(partition::run(
            worker.clone(),
            key.clone(),
            next,
            queue.clone(),
            stop.clone(),
            failed.clone(),
        )));
        let panic = match task.join().await {
            Ok(result) => return result,
            Err(e) if e.is_panic() => e.into_panic(),
            Err(_) => return Ok(()),
        };
        let why = panic
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "a panic without a message".to_string());
        error!(topic = %topic, partition, panic = %why, "the partition's task panicked; restarting it from the stored offset");
        metrics::counter!(crate::metrics::PARTITION_PANICS_TOTAL, "topic" => topic.clone())
            .increment(1);
        worker
            .panicked
            .lock()
            .expect("panicked lock")
            .insert(key.clone(), (Instant::now(), why));
        // Revoked or shutting down meanwhile: nothing to restart.
        let restart = unless_stopped(&stop, async {
            tokio::time::sleep(Duration::from_secs(1)).await;
            stored_offset(&worker, &topic, partition).await
        });
        let Some(stored) = restart.await else {
            return Ok(());
        };
        // Nothing stored yet: from the offset the assignment's check
        // accepted, not "the beginning" (retention may have moved it).
        next = stored.unwrap_or(next);
        match seek(&worker, &topic, partition, next, &stop, false).await {
            None => return Ok(()),
            Some(Ok(())) => {}
            Some(Err(e)) => {
                // The worker restarts from the stored offsets instead.
                let _ = failed.send(e.context(format!(
                    "seeking {topic}/{partition} after its task panicked"
                )));
                return Ok(());
            }
        }
    }
}

/// A partition task that ends with its supervisor: aborting [`supervise`]
/// aborts the task it runs.
struct AbortOnDrop(JoinHandle<anyhow::Result<()>>);

impl AbortOnDrop {
    async fn join(mut self) -> Result<anyhow::Result<()>, tokio::task::JoinError> {
        (&mut self.0).await
    }
}

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Where a newly assigned partition resumes (its stored offset, or with
/// none its first offset), or why it cannot (`offsets::resume_problem`,
/// `offsets::start_problem`): checked against Kafka, and asked again with
/// the backoff (`regionsync_retries_total{reason="kafka_unavailable"}`,
/// the partition held for `/readyz`) until Kafka answers.
async fn checked_start(
    worker: &Worker,
    topic: &str,
    partition: i32,
    stored: Option<i64>,
) -> Result<i64, (&'static str, String)> {
    let start = check_start(
        topic,
        partition,
        stored,
        worker.config.kafka.accept_missing_history,
        || watermarks(worker, topic, partition),
        || deletes_records(worker, topic),
        |e| {
            warn!(topic, partition, error = %format!("{e:#}"), "could not check the stored offset against the topic; the partition stays paused");
            worker.hold(
                topic,
                partition,
                format!("checking its stored offset against the topic: {e:#}"),
            );
        },
    )
    .await;
    worker.release(topic, partition);
    start
}

/// [`checked_start`]'s decision, with Kafka's answers given: the
/// partition's (low, high) watermarks, and whether its topic's cleanup
/// policy deletes records (asked only for a partition without a stored
/// offset whose first offset is not 0). Any failure to answer is retried
/// with the backoff after `on_fail`; nothing is decided unchecked.
async fn check_start<W, WF, D, DF>(
    topic: &str,
    partition: i32,
    stored: Option<i64>,
    accept_missing_history: bool,
    mut watermarks: W,
    mut deletes_records: D,
    mut on_fail: impl FnMut(&anyhow::Error),
) -> Result<i64, (&'static str, String)>
where
    W: FnMut() -> WF,
    WF: std::future::Future<Output = anyhow::Result<(i64, i64)>>,
    D: FnMut() -> DF,
    DF: std::future::Future<Output = anyhow::Result<bool>>,
{
    let mut backoff = failure::Backoff::default();
    loop {
        let answer = async {
            let (low, high) = watermarks().await?;
            Ok::<_, anyhow::Error>(match stored {
                Some(next) => match offsets::resume_problem(topic, partition, next, (low, high)) {
                    Some(problem) => Err(problem),
                    None => Ok(next),
                },
                None if low == 0 || accept_missing_history => Ok(low),
                None => {
                    let deletes = deletes_records().await?;
                    match offsets::start_problem(topic, partition, low, deletes, false) {
                        Some(problem) => Err(problem),
                        None => Ok(low),
                    }
                }
            })
        };
        match answer.await {
            Ok(start) => return start,
            Err(e) => {
                on_fail(&e);
                backoff.wait(crate::metrics::retry::KAFKA_UNAVAILABLE).await;
            }
        }
    }
}

/// A test hook: runs (once) when a partition's watermarks are first asked
/// for, e.g. to freeze the broker at an assignment. Never set outside tests.
#[doc(hidden)]
#[allow(clippy::type_complexity)]
pub static BEFORE_WATERMARKS: Mutex<Option<Box<dyn FnOnce() + Send>>> = Mutex::new(None);

/// A test hook: runs (once, given the partition) between the check of a
/// partition of this topic against the topic and its seek, e.g. to run
/// retention there. Never set outside tests.
#[doc(hidden)]
#[allow(clippy::type_complexity)]
pub static BEFORE_SEEK: Mutex<Option<(String, Box<dyn FnOnce(i32) + Send>)>> = Mutex::new(None);

/// A test hook: this (topic, partition) is started (checked, sought and
/// resumed) without a queue of its own, so that its messages reach the
/// consumer's main queue, which must stop the worker. Never set outside
/// tests.
#[doc(hidden)]
pub static NO_OWN_QUEUE_FOR: Mutex<Option<(String, i32)>> = Mutex::new(None);

/// [`NO_OWN_QUEUE_FOR`]: starts `key` without its own queue (and no task)
/// if the hook names it; true then.
fn started_without_its_queue(
    worker: &Arc<Worker>,
    key: &(String, i32),
    tasks: &mut HashMap<(String, i32), PartitionTask>,
) -> bool {
    let mut hook = NO_OWN_QUEUE_FOR.lock().expect("hook lock");
    if hook.as_ref() != Some(key) {
        return false;
    }
    *hook = None;
    let (stop, stopped) = watch::channel(());
    let (worker, k) = (worker.clone(), key.clone());
    let task = tokio::spawn(async move {
        start_partition(&worker, (&k.0, k.1), &stopped).await;
        Ok(())
    });
    tasks.insert(key.clone(), (stop, task));
    true
}

/// A test hook: Kafka "refuses" the watermarks of this (topic, partition)
/// for as long as it is set, as a missing ACL would. Never set outside
/// tests.
#[doc(hidden)]
pub static REFUSE_WATERMARKS_OF: Mutex<Option<(String, i32)>> = Mutex::new(None);

/// A partition's (low, high) watermarks, asked of Kafka (5 s at most).
async fn watermarks(worker: &Worker, topic: &str, partition: i32) -> anyhow::Result<(i64, i64)> {
    let hook = BEFORE_WATERMARKS.lock().expect("hook lock").take();
    if let Some(hook) = hook {
        tokio::task::spawn_blocking(hook).await?;
    }
    let refused = REFUSE_WATERMARKS_OF
        .lock()
        .expect("hook lock")
        .as_ref()
        .is_some_and(|(t, p)| t == topic && *p == partition);
    if refused {
        anyhow::bail!("test hook: the offsets of {topic}/{partition} refused");
    }
    let (consumer, t) = (worker.consumer.clone(), topic.to_owned());
    let answer = tokio::task::spawn_blocking(move || {
        consumer.fetch_watermarks(&t, partition, Duration::from_secs(5))
    })
    .await?;
    answer.with_context(|| format!("reading the offsets of {topic}/{partition}"))
}

/// Whether `topic`'s `cleanup.policy` deletes records (`delete`, or
/// `compact,delete`), asked of Kafka (5 s at most). Retention deletes
/// the oldest records only under such a policy; compaction keeps every
/// key's last change.
async fn deletes_records(worker: &Worker, topic: &str) -> anyhow::Result<bool> {
    use rdkafka::admin::{AdminClient, AdminOptions, ResourceSpecifier};
    let admin: AdminClient<rdkafka::client::DefaultClientContext> =
        source::kafka_config(&worker.config)?
            .create()
            .context("creating the Kafka admin client")?;
    let described = admin
        .describe_configs(
            &[ResourceSpecifier::Topic(topic)],
            &AdminOptions::new().request_timeout(Some(Duration::from_secs(5))),
        )
        .await
        .with_context(|| format!("reading the configuration of topic {topic}"))?;
    let resource = described
        .into_iter()
        .next()
        .with_context(|| format!("no configuration returned for topic {topic}"))?
        .map_err(|code| anyhow::anyhow!("reading the configuration of topic {topic}: {code}"))?;
    let policy = resource
        .get("cleanup.policy")
        .and_then(|e| e.value.clone())
        .unwrap_or_else(|| "delete".to_string());
    Ok(policy.split(',').any(|p| p.trim() == "delete"))
}

/// A worker configuration for eu-west-1 replicating `public.users` from
/// us-east-1, with `extra` top-level keys; nothing in it is reached.
#[cfg(test)]
pub(crate) fn test_config(extra: &str) -> Config {
    Config::from_toml(&format!(
        r#"
        region = "eu-west-1"
        regions = ["us-east-1", "eu-west-1"]
        {extra}
        [kafka]
        bootstrap_servers = "127.0.0.1:1"
        [schema_registry]
        url = "http://127.0.0.1:1"
        [postgres]
        host = "127.0.0.1"
        dbname = "app"
        user = "regionsync"
        [[tables]]
        topics = ["cdc.public.users"]
        target = "public.users"
        key = ["id"]
        "#
    ))
    .expect("a valid config")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;

    /// Runs [`check_start`] with Kafka's answers scripted: the watermarks
    /// fail `watermark_failures` times first, the cleanup policy
    /// `policy_failures` times. Gives the decision, the failures reported
    /// and how often the policy was asked.
    async fn decide(
        stored: Option<i64>,
        accept: bool,
        marks: (i64, i64),
        deletes: bool,
        watermark_failures: u32,
        policy_failures: u32,
    ) -> (Result<i64, (&'static str, String)>, u32, u32) {
        let (marks_asked, policy_asked, failed) = (Cell::new(0), Cell::new(0), Cell::new(0));
        let start = check_start(
            "us-east-1.cdc.t",
            1,
            stored,
            accept,
            || {
                marks_asked.set(marks_asked.get() + 1);
                let fail = marks_asked.get() <= watermark_failures;
                async move {
                    if fail {
                        anyhow::bail!("Local: Timed out")
                    }
                    Ok(marks)
                }
            },
            || {
                policy_asked.set(policy_asked.get() + 1);
                let fail = policy_asked.get() <= policy_failures;
                async move {
                    if fail {
                        anyhow::bail!("Local: Timed out")
                    }
                    Ok(deletes)
                }
            },
            |_| failed.set(failed.get() + 1),
        )
        .await;
        (start, failed.get(), policy_asked.get())
    }

    #[tokio::test]
    async fn a_partition_is_never_resumed_before_kafka_answers_its_check() {
        // Kafka times out twice: asked again until it answers, then the
        // stored offset is checked as usual.
        let (start, failed, _) = decide(Some(4), false, (0, 10), true, 2, 0).await;
        assert_eq!((start, failed), (Ok(4), 2));
        let (start, failed, _) = decide(Some(12), false, (0, 10), true, 1, 0).await;
        assert_eq!(failed, 1);
        assert_eq!(start.unwrap_err().0, "beyond_end");
        let (start, _, _) = decide(Some(3), false, (7, 10), true, 0, 0).await;
        assert_eq!(start.unwrap_err().0, "retention_gap");
    }

    #[tokio::test]
    async fn a_check_kafka_keeps_refusing_holds_its_partition_only_and_ends_with_its_stop() {
        // Partition 0's check never succeeds (a missing ACL); partition 1's
        // is answered. Each waits in its own task, as `supervise` does.
        let check = |refused: bool| {
            check_start(
                "us-east-1.cdc.t",
                i32::from(!refused),
                Some(3),
                false,
                move || async move {
                    if refused {
                        anyhow::bail!("Broker: Topic authorization failed")
                    }
                    Ok((0, 10))
                },
                || async { Ok(true) },
                |_| {},
            )
        };
        let (stop0, stopped0) = watch::channel(());
        let (_stop1, stopped1) = watch::channel(());
        let refused = tokio::spawn(async move { unless_stopped(&stopped0, check(true)).await });
        let answered = tokio::spawn(async move { unless_stopped(&stopped1, check(false)).await });
        assert_eq!(
            answered.await.unwrap(),
            Some(Ok(3)),
            "not held by the other"
        );
        // Still waiting after several rounds of backoff: never resumed
        // unchecked.
        tokio::time::sleep(Duration::from_secs(3)).await;
        assert!(!refused.is_finished(), "no start without Kafka's answer");
        // A revocation (or SIGTERM's drain) drops the stop sender: the
        // wait ends at once, without a start.
        drop(stop0);
        let ended = tokio::time::timeout(Duration::from_millis(100), refused).await;
        assert_eq!(ended.expect("ended at once").unwrap(), None);
    }

    #[tokio::test]
    async fn a_partition_without_a_stored_offset_stops_at_a_retention_gap() {
        // A fresh topic: from 0, the policy not even asked.
        assert_eq!(decide(None, false, (0, 5), true, 0, 0).await, (Ok(0), 0, 0));
        // Retention deleted its beginning: stopped, naming both offsets;
        // the policy asked again after it timed out.
        let (start, failed, asked) = decide(None, false, (25, 40), true, 0, 1).await;
        let (kind, why) = start.unwrap_err();
        assert_eq!((kind, failed, asked), ("retention_gap", 1, 2));
        assert!(why.contains("us-east-1.cdc.t/1") && why.contains("first offset is 25"));
        // Compacted: the first offset is no gap signal.
        assert_eq!(
            decide(None, false, (25, 40), false, 0, 0).await,
            (Ok(25), 0, 1)
        );
        // The operator opted in: from the first offset held.
        assert_eq!(
            decide(None, true, (25, 40), true, 0, 0).await,
            (Ok(25), 0, 0)
        );
    }
}
