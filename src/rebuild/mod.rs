//! Rebuild: a region's copy of tables replayed from the change topics
//! (DESIGN.md §7), with the worker's decode, route and version guard.
//!
//! What it promises:
//! - Every topic that holds the tables' rows is replayed from its first
//!   offset: each other region's mirrored topic and this region's own
//!   capture topic ([`feeds`]); in active-active the region's own writes
//!   exist only in the latter. In the own topic, rows carrying this
//!   region's name are applied (they are not echoes there); relays (what
//!   this region's worker applied) are skipped as always, their originals
//!   arriving from the region that made them.
//! - Offsets are stored in `regionsync.offsets` under a consumer group of
//!   its own ([`group`]), in the transaction of the rows they follow, so a
//!   rebuild killed at any point resumes where it stopped; the worker's
//!   rows are untouched. Per table a marker row (topic `rebuild:<table>`,
//!   partition -1) says whether the rebuild is under way (0) or done (1).
//! - Each partition is replayed up to its end as the run found it; the
//!   worker applies what comes later (again, harmlessly: the guard).
//! - Order between partitions and topics does not matter: every write is
//!   "keep the newest version" (DESIGN.md §4). So the changes of many
//!   batches and of every partition are collapsed to the newest version
//!   per key and loaded in bulk, with COPY ([`bulk`]).
//! - No conflicts are recorded and no write is held: a replay into an
//!   empty table has no concurrent writes to detect, and the versions the
//!   policies kept are in the topics as newer writes.
//! - [`history_problem`] says when a topic cannot rebuild a table.

pub mod bulk;
pub mod deferred;
pub mod lock;
pub mod refused;
pub mod shadow;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{BorrowedMessage, Message};
use rdkafka::{Offset, TopicPartitionList};
use tracing::{info, warn};

use crate::apply::{Applied, Final, TargetTable};
use crate::config::Config;
use crate::decode::registry::AvroSource;
use crate::metrics::outcome;
use crate::worker::batch::{Plan, Planner, Step};
use crate::worker::failure::{self, Verdict};
use deferred::HeldMessage;

/// A topic that holds rows of a rebuilt table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Feed {
    pub topic: String,
    /// The region whose database made the changes.
    pub source_region: String,
    /// Index into the config's tables.
    pub table: usize,
    /// This region's own capture topic.
    pub own: bool,
}

/// The topics that hold the rows of `tables` (indexes into the config's):
/// every source region's mirrored copy, and this region's own topic.
pub fn feeds(config: &Config, tables: &[usize]) -> Vec<Feed> {
    let mut out = Vec::new();
    for &t in tables {
        for topic in &config.tables[t].topics {
            for region in config.source_regions() {
                out.push(Feed {
                    topic: format!("{region}.{topic}"),
                    source_region: region,
                    table: t,
                    own: false,
                });
            }
            out.push(Feed {
                topic: topic.clone(),
                source_region: config.region.clone(),
                table: t,
                own: true,
            });
        }
    }
    out
}

/// The consumer group a rebuild stores its offsets under.
pub fn group(config: &Config) -> String {
    format!("{}-rebuild", config.consumer_group())
}

/// The marker row's topic of a table's rebuild.
pub fn marker_topic(table: &str) -> String {
    format!("rebuild:{table}")
}

/// What a topic's retention leaves of its history, for [`history_problem`].
#[derive(Clone, Debug, Default)]
pub struct Retention {
    /// `cleanup.policy`: `delete`, `compact`, or `compact,delete`.
    pub cleanup_policy: String,
    pub delete_retention_ms: Option<i64>,
    /// Per partition: its first offset and that message's timestamp (ms).
    pub partitions: Vec<(i32, i64, Option<i64>)>,
}

/// Why `topic` cannot rebuild a table, or `None` if it holds its whole
/// history: a deleting topic whose first offset is past 0 lost changes;
/// a compacted topic whose oldest message is older than
/// `delete.retention.ms` may have lost the tombstones of deleted rows,
/// which a rebuild would bring back.
pub fn history_problem(topic: &str, r: &Retention, now_ms: i64) -> Option<String> {
    let policies: Vec<&str> = r.cleanup_policy.split(',').map(str::trim).collect();
    if policies.contains(&"delete") {
        if let Some((p, first, _)) = r.partitions.iter().find(|(_, first, _)| *first > 0) {
            return Some(format!(
                "topic {topic} (cleanup.policy={}) no longer holds its whole history: partition {p} starts at offset {first}, not 0; the changes before it were deleted",
                r.cleanup_policy
            ));
        }
    }
    if policies.contains(&"compact") {
        let retention = r.delete_retention_ms.unwrap_or(86_400_000);
        let oldest = r.partitions.iter().filter_map(|(_, _, ts)| *ts).min();
        if let Some(oldest) = oldest {
            let age = now_ms - oldest;
            if age > retention {
                return Some(format!(
                    "topic {topic} is compacted with delete.retention.ms={retention} ({}), but its data began {} ago: the tombstones of rows deleted since may be gone, and a replay would bring those rows back",
                    human(retention),
                    human(age)
                ));
            }
        }
    }
    None
}

/// A duration in ms, roughly, for a message: "3d 4h", "5h 2m", "40s".
fn human(ms: i64) -> String {
    let s = (ms / 1000).max(0);
    let (d, h, m) = (s / 86_400, s % 86_400 / 3_600, s % 3_600 / 60);
    if d > 0 {
        format!("{d}d {h}h")
    } else if h > 0 {
        format!("{h}h {m}m")
    } else if m > 0 {
        format!("{m}m {}s", s % 60)
    } else {
        format!("{s}s")
    }
}

/// One partition's replay: where it starts and the end it runs to.
#[derive(Clone, Debug)]
pub struct Span {
    pub topic: String,
    pub partition: i32,
    pub next: i64,
    pub end: i64,
}

/// Reads a topic's retention settings and partitions' first offsets,
/// first timestamps and ends. `None`: the topic does not exist.
pub async fn inspect(
    config: &Config,
    consumer: &StreamConsumer,
    topic: &str,
) -> anyhow::Result<Option<(Retention, Vec<(i32, i64, i64)>)>> {
    use rdkafka::admin::{AdminClient, AdminOptions, ResourceSpecifier};
    let metadata = tokio::task::block_in_place(|| {
        consumer.fetch_metadata(Some(topic), Duration::from_secs(10))
    })
    .with_context(|| format!("reading the metadata of topic {topic}"))?;
    let Some(t) = metadata.topics().iter().find(|t| t.name() == topic) else {
        return Ok(None);
    };
    if t.error().is_some() || t.partitions().is_empty() {
        return Ok(None);
    }
    let admin: AdminClient<rdkafka::client::DefaultClientContext> =
        crate::source::kafka_config(config)?
            .create()
            .context("creating the Kafka admin client")?;
    let described = admin
        .describe_configs(
            &[ResourceSpecifier::Topic(topic)],
            &AdminOptions::new().request_timeout(Some(Duration::from_secs(10))),
        )
        .await
        .with_context(|| format!("reading the configuration of topic {topic}"))?;
    let mut retention = Retention::default();
    if let Some(Ok(resource)) = described.into_iter().next() {
        let value = |name: &str| resource.get(name).and_then(|e| e.value.clone());
        retention.cleanup_policy = value("cleanup.policy").unwrap_or_else(|| "delete".into());
        retention.delete_retention_ms = value("delete.retention.ms").and_then(|v| v.parse().ok());
    }
    let mut spans = Vec::new();
    for p in t.partitions() {
        let (low, high) = tokio::task::block_in_place(|| {
            consumer.fetch_watermarks(topic, p.id(), Duration::from_secs(10))
        })
        .with_context(|| format!("reading the offsets of {topic}/{}", p.id()))?;
        let first_ts = if high > low {
            first_timestamp(config, topic, p.id(), low).await
        } else {
            None
        };
        retention.partitions.push((p.id(), low, first_ts));
        spans.push((p.id(), low, high));
    }
    Ok(Some((retention, spans)))
}

/// A topic's partitions with their first offsets and ends (next offsets),
/// quickly (no retention read): for a shadow rebuild's catch-up. Empty: no
/// topic.
pub fn partition_ends(
    consumer: &StreamConsumer,
    topic: &str,
) -> anyhow::Result<Vec<(i32, i64, i64)>> {
    tokio::task::block_in_place(|| {
        let metadata = consumer
            .fetch_metadata(Some(topic), Duration::from_secs(10))
            .with_context(|| format!("reading the metadata of topic {topic}"))?;
        let Some(t) = metadata.topics().iter().find(|t| t.name() == topic) else {
            return Ok(Vec::new());
        };
        // Only "no such topic" means no changes to catch up with; any other
        // error would skip the catch-up of a topic that has them.
        match t.error() {
            None => {}
            Some(rdkafka::types::RDKafkaRespErr::RD_KAFKA_RESP_ERR_UNKNOWN_TOPIC_OR_PART) => {
                return Ok(Vec::new())
            }
            Some(e) => anyhow::bail!("reading the metadata of topic {topic}: {e:?}"),
        }
        let mut out = Vec::new();
        for p in t.partitions() {
            let (low, high) = consumer
                .fetch_watermarks(topic, p.id(), Duration::from_secs(10))
                .with_context(|| format!("reading the offsets of {topic}/{}", p.id()))?;
            out.push((p.id(), low, high));
        }
        Ok(out)
    })
}

/// The timestamp of the message at `offset` of a partition (a reader of
/// its own, not in any group).
async fn first_timestamp(config: &Config, topic: &str, partition: i32, offset: i64) -> Option<i64> {
    let reader: StreamConsumer = crate::source::kafka_config(config)
        .ok()?
        .set("group.id", "regionsync-rebuild-inspect")
        .set("enable.auto.commit", "false")
        .create()
        .ok()?;
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, partition, Offset::Offset(offset))
        .ok()?;
    reader.assign(&tpl).ok()?;
    let msg = tokio::time::timeout(Duration::from_secs(10), reader.recv())
        .await
        .ok()?
        .ok()?;
    msg.timestamp().to_millis()
}

/// The rebuild's consumer: no group membership (partitions are assigned),
/// nothing committed to Kafka.
pub fn consumer(config: &Config) -> anyhow::Result<StreamConsumer> {
    crate::source::kafka_config(config)?
        .set("group.id", group(config))
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        // Every partition is assigned at an explicit offset (0, or the
        // stored one, checked against the topic's history at start). A
        // position retention deletes while the rebuild reads behind it is
        // an error ([`received`]), never a silent jump past the gap.
        .set("auto.offset.reset", "error")
        // As the worker's (source::consumer): 2 MiB per partition queue;
        // 16 MiB took a debug rebuild of 8 partitions to 350 MB RSS.
        .set("queued.max.messages.kbytes", "2048")
        .set("fetch.message.max.bytes", "262144")
        .set("fetch.wait.max.ms", "50")
        // As the worker's: librdkafka's default (1 s) postpones a
        // partition's next fetch by a second whenever its queue is full,
        // which held a replay to about one 2 MiB queue per second
        // (8,000 changes/s on bench's Avro topic).
        .set("fetch.queue.backoff.ms", "10")
        .create()
        .context("creating the rebuild's Kafka consumer")
}

/// A message from the rebuild's consumer; `None` for an error librdkafka
/// recovers from by itself (a lost broker connection: logged, read on);
/// or why the rebuild cannot go on: a fetch position outside its partition means retention deleted
/// changes the rebuild had not read yet (librdkafka stops fetching the
/// partition under `auto.offset.reset = error`), so the topics no longer
/// hold the history this rebuild needs.
fn received<M>(m: rdkafka::error::KafkaResult<M>) -> anyhow::Result<Option<M>> {
    if let Err(e) = &m {
        if crate::source::is_passing(e) {
            // librdkafka reconnects by itself; the reading loops' 30 s
            // without a message bound the wait.
            warn!(error = %e, "reading the replayed topics: Kafka said this; reading on");
            return Ok(None);
        }
    }
    m.map(Some).map_err(|e| {
        if crate::source::is_out_of_range(&e) {
            anyhow::anyhow!(
                "retention deleted changes of a replayed topic before this rebuild read them ({e}): \
                 the topics no longer hold the whole history; rebuild from a re-snapshot instead \
                 (docs/RUNBOOK.md, \"When the topics cannot rebuild the table\")"
            )
        } else {
            anyhow::Error::from(e).context("reading the replayed topics")
        }
    })
}

/// What a replay did.
#[derive(Clone, Debug, Default)]
pub struct Replayed {
    pub messages: u64,
    pub applied: Applied,
    /// Messages the worker's planning refused (decoding, a value that
    /// cannot fit): dead-lettered.
    pub refused: u64,
    /// Changes dead-lettered, those refused by the planning and those
    /// PostgreSQL refused for their data: sent to the dead-letter topic by
    /// this run ([`refused`]), and those found there already.
    pub dead_lettered: u64,
    pub already_dead_lettered: u64,
}

impl Replayed {
    fn add(&mut self, c: refused::Committed) {
        self.applied += c.applied;
        self.dead_lettered += c.dead_lettered;
        self.already_dead_lettered += c.already_dead_lettered;
    }
}

/// Something told about each partition's progress: (topic, messages).
pub type OnProgress<'a> = dyn Fn(&str, u64) + Send + Sync + 'a;

/// What a replay reads from: the consumer assigned to the partitions
/// still to read, each with the end it runs to, and what plans their
/// messages.
struct Reader<'a> {
    config: &'a Config,
    tables: &'a [TargetTable],
    feed_of: HashMap<&'a str, &'a Feed>,
    decoders: HashMap<String, Arc<AvroSource>>,
    consumer: StreamConsumer,
    ends: HashMap<(String, i32), i64>,
    /// Dead-letters what the planning refuses.
    writer: Arc<refused::Writer>,
    /// Threads that plan a batch's messages at once.
    decoder_threads: usize,
}

impl<'a> Reader<'a> {
    /// `None`: every span is read already.
    fn new(
        config: &'a Config,
        tables: &'a [TargetTable],
        feeds: &'a [Feed],
        spans: &[Span],
        writer: Arc<refused::Writer>,
    ) -> anyhow::Result<Option<Reader<'a>>> {
        let mut decoders: HashMap<String, Arc<AvroSource>> = HashMap::new();
        for f in feeds {
            if let Some(url) = config.registry_for(&f.source_region) {
                if !decoders.contains_key(&f.source_region) {
                    decoders.insert(
                        f.source_region.clone(),
                        Arc::new(AvroSource::with_settings(url, config)?),
                    );
                }
            }
        }
        let feed_of: HashMap<&str, &Feed> = feeds.iter().map(|f| (f.topic.as_str(), f)).collect();
        let mut ends: HashMap<(String, i32), i64> = HashMap::new();
        let mut tpl = TopicPartitionList::new();
        for s in spans {
            if s.next < s.end {
                tpl.add_partition_offset(&s.topic, s.partition, Offset::Offset(s.next))?;
                ends.insert((s.topic.clone(), s.partition), s.end);
            }
        }
        if ends.is_empty() {
            return Ok(None);
        }
        let consumer = consumer(config)?;
        consumer
            .assign(&tpl)
            .context("assigning the partitions to replay")?;
        Ok(Some(Reader {
            config,
            tables,
            feed_of,
            decoders,
            consumer,
            ends,
            writer,
            decoder_threads: decoder_threads(),
        }))
    }

    fn done(&self) -> bool {
        self.ends.is_empty()
    }

    /// Reads the next batch (up to `apply.batch_max_rows` messages) and
    /// plans it into `chunk`; `unreported` counts its messages per topic.
    async fn read_into(
        &mut self,
        chunk: &mut bulk::Chunk,
        done: &mut Replayed,
        unreported: &mut HashMap<String, u64>,
    ) -> anyhow::Result<()> {
        let (config, tables) = (self.config, self.tables);
        let max_rows = config.apply.batch_max_rows.max(1);
        let mut batch: Vec<BorrowedMessage<'_>> = Vec::new();
        let mut idle = Duration::ZERO;
        let first = loop {
            match tokio::time::timeout(Duration::from_secs(1), self.consumer.recv()).await {
                Ok(m) => {
                    if let Some(m) = received(m)? {
                        break Some(m);
                    }
                }
                Err(_) => {
                    // Nothing came: a partition may end in offsets that are
                    // no messages (transaction markers, compacted away).
                    reached_by_position(&self.consumer, &mut self.ends);
                    if self.ends.is_empty() {
                        break None;
                    }
                    idle += Duration::from_secs(1);
                    if idle >= Duration::from_secs(30) {
                        anyhow::bail!(
                            "no message from Kafka for 30 s while {} partition(s) are not replayed to their end",
                            self.ends.len()
                        );
                    }
                }
            }
        };
        let Some(first) = first else { return Ok(()) };
        batch.push(first);
        let linger = tokio::time::Instant::now() + Duration::from_millis(50);
        while batch.len() < max_rows {
            match tokio::time::timeout_at(linger, self.consumer.recv()).await {
                Ok(m) => batch.extend(received(m)?),
                Err(_) => break,
            }
        }
        // Per partition, in offset order; past its end is the worker's.
        // Found by a scan of the batch's few partitions: a map keyed by
        // (topic, partition) would allocate the topic's name per message.
        let mut groups: Vec<PartitionMessages<'_>> = Vec::new();
        for m in batch {
            let found = groups
                .iter()
                .position(|((t, p), _, _)| *p == m.partition() && t == m.topic());
            let i = found.unwrap_or_else(|| {
                let key = (m.topic().to_owned(), m.partition());
                let end = self.ends.get(&key).copied();
                groups.push((key, end, Vec::new()));
                groups.len() - 1
            });
            let (_, end, messages) = &mut groups[i];
            if end.is_some_and(|end| m.offset() < end) {
                messages.push(m);
            }
        }
        // Keyed messages of a table without counters are held unplanned:
        // only the newest of each key is planned, before the chunk is
        // written (`deferred`). The others are planned now.
        let mut now: Vec<((String, i32), Vec<BorrowedMessage<'_>>)> = Vec::new();
        for ((topic, partition), _, messages) in groups {
            let Some(last) = messages.last() else {
                continue;
            };
            let feed = self
                .feed_of
                .get(topic.as_str())
                .ok_or_else(|| anyhow::anyhow!("a message of {topic}, which is not replayed"))?;
            let next = last.offset() + 1;
            chunk.read_to(&topic, partition, next, None);
            chunk.messages += messages.len();
            *unreported.entry(topic.clone()).or_default() += messages.len() as u64;
            let key = (topic, partition);
            if self.ends.get(&key).is_some_and(|end| next >= *end) {
                self.ends.remove(&key);
                info!(topic = %key.0, partition, "read to its end");
            }
            let messages: Vec<_> = if tables[feed.table].counters.is_empty() {
                messages
                    .into_iter()
                    .filter(|m| !chunk.deferred.hold(m))
                    .collect()
            } else {
                messages
            };
            if !messages.is_empty() {
                now.push((key, messages));
            }
        }
        let runs: Vec<Run<'_, BorrowedMessage<'_>>> = now
            .iter()
            .map(|((topic, partition), messages)| {
                ((topic.as_str(), *partition), messages.as_slice())
            })
            .collect();
        for (run, plan) in self.plan_runs(&runs).await? {
            let (topic, partition) = runs[run].0;
            self.take(chunk, done, topic, partition, plan).await?;
        }
        Ok(())
    }

    /// Plans the messages the chunk holds unplanned into it ([`deferred`]):
    /// the newest of each key per partition, and, read again from Kafka,
    /// every message in the chunk of a key whose newest does not plan to a
    /// whole row or a delete. Before the chunk is written.
    async fn settle(&self, chunk: &mut bulk::Chunk, done: &mut Replayed) -> anyhow::Result<()> {
        let held = std::mem::take(&mut chunk.deferred);
        if held.is_empty() {
            return Ok(());
        }
        let newest = held.newest();
        let runs: Vec<Run<'_, HeldMessage<'_>>> = newest
            .iter()
            .map(|(at, messages)| (*at, messages.as_slice()))
            .collect();
        let mut again = Vec::new();
        let mut planned = 0;
        for (run, plan) in self.plan_runs(&runs).await? {
            let (topic, partition) = runs[run].0;
            let PiecePlan {
                plan,
                planned: messages,
            } = plan;
            chunk.read_to(topic, partition, 0, plan.newest_ts_ms);
            let topic_index = chunk.topic_index(topic);
            // Planned: a whole row or a delete, or a relay or an echo (the
            // original, at least as new as anything before it here, is in
            // the topic of the region that made it, which is replayed too).
            let mut whole = rustc_hash::FxHashSet::default();
            for (msg, why) in &plan.skips {
                if [outcome::RELAY, outcome::ECHO].contains(why) {
                    whole.insert(msg.offset());
                }
            }
            for step in plan.steps {
                if let Step::Row {
                    table, fin, msg, ..
                } = step
                {
                    let is_whole = match &fin {
                        Final::Upsert(r) => r.unavailable.is_empty(),
                        Final::Delete(_) => true,
                    };
                    if is_whole && self.tables[table].counters.is_empty() {
                        whole.insert(msg.offset());
                        let at = bulk::At {
                            topic: topic_index,
                            partition,
                            offset: msg.offset(),
                            key: bulk::key_hash(msg.key()),
                        };
                        chunk.add(table, fin, None, at);
                    }
                }
            }
            planned += messages.len();
            again.extend(messages.iter().filter(|m| !whole.contains(&m.offset())));
        }
        // The replaced messages count as read, not as rows.
        chunk.changes += held.len() - planned;
        info!(
            held = held.len(),
            newest = planned,
            replanned = again.len(),
            "planned the newest message of each key (replanned: keys whose newest is not a whole row, a delete, a relay or an echo)"
        );
        if again.is_empty() {
            return Ok(());
        }
        // Their keys' messages in the chunk, read again: only the newest
        // of each key was held.
        let ranges = held.ranges_of(&again);
        let every = self.read_again(&ranges).await?;
        let runs: Vec<Run<'_, rdkafka::message::OwnedMessage>> = ranges
            .iter()
            .zip(&every)
            .map(|(r, messages)| ((r.topic, r.partition), messages.as_slice()))
            .collect();
        for (run, plan) in self.plan_runs(&runs).await? {
            let (topic, partition) = runs[run].0;
            self.take(chunk, done, topic, partition, plan).await?;
        }
        Ok(())
    }

    /// Reads `ranges` again from Kafka, with a consumer of their own: per
    /// range, the messages it wants, in offset order.
    async fn read_again(
        &self,
        ranges: &[deferred::Range<'_>],
    ) -> anyhow::Result<Vec<Vec<rdkafka::message::OwnedMessage>>> {
        let consumer = consumer(self.config)?;
        let mut tpl = TopicPartitionList::new();
        for r in ranges {
            tpl.add_partition_offset(r.topic, r.partition, Offset::Offset(r.from))?;
        }
        consumer
            .assign(&tpl)
            .context("assigning the partitions to read again")?;
        let mut out: Vec<Vec<rdkafka::message::OwnedMessage>> =
            ranges.iter().map(|_| Vec::new()).collect();
        let mut open = ranges.len();
        let mut reached = vec![false; ranges.len()];
        let mut idle = Duration::ZERO;
        while open > 0 {
            let m = match tokio::time::timeout(Duration::from_secs(1), consumer.recv()).await {
                Ok(m) => match received(m)? {
                    Some(m) => m,
                    None => continue,
                },
                Err(_) => {
                    idle += Duration::from_secs(1);
                    if idle >= Duration::from_secs(30) {
                        anyhow::bail!(
                            "no message from Kafka for 30 s while reading again {open} partition(s)"
                        );
                    }
                    continue;
                }
            };
            idle = Duration::ZERO;
            let Some(i) = ranges
                .iter()
                .position(|r| r.partition == m.partition() && r.topic == m.topic())
            else {
                continue;
            };
            let r = &ranges[i];
            if reached[i] {
                continue;
            }
            if r.wants(m.offset(), m.key(), m.payload()) {
                out[i].push(m.detach());
            }
            // The newest may have been compacted away since (a later
            // message of its key exists then): past it is as good.
            if m.offset() >= r.to {
                reached[i] = true;
                open -= 1;
                let mut done = TopicPartitionList::new();
                done.add_partition(r.topic, r.partition);
                consumer
                    .pause(&done)
                    .context("pausing a partition read again")?;
            }
        }
        Ok(out)
    }

    /// Plans `runs` (each a partition's messages in offset order) in pieces
    /// on several threads: that is most of a rebuild's CPU. Returns each
    /// piece's plan with the index of its run, in the runs' offset order.
    async fn plan_runs<'m, M: Message + Sync>(
        &self,
        runs: &[Run<'m, M>],
    ) -> anyhow::Result<Vec<(usize, PiecePlan<'m, M>)>> {
        let mut planners = Vec::with_capacity(runs.len());
        for ((topic, _), _) in runs {
            let feed = self
                .feed_of
                .get(topic)
                .ok_or_else(|| anyhow::anyhow!("a message of {topic}, which is not replayed"))?;
            planners.push(Planner {
                config: self.config,
                tables: self.tables,
                source_region: &feed.source_region,
                table: Some(feed.table),
                avro: self.decoders.get(&feed.source_region).map(|a| &**a),
                own_topic: feed.own,
            });
        }
        let total: usize = runs.iter().map(|(_, m)| m.len()).sum();
        let piece_len = pieces_of(total, self.decoder_threads);
        let mut pieces = Vec::new();
        for (i, ((topic, _), messages)) in runs.iter().enumerate() {
            for piece in messages.chunks(piece_len) {
                pieces.push(Piece {
                    planner: &planners[i],
                    topic,
                    messages: piece,
                    partition: i,
                });
            }
        }
        let plans = plan_pieces(&pieces, crate::clock::now_ms(), self.decoder_threads).await;
        Ok(plans
            .into_iter()
            .zip(&pieces)
            .map(|(plan, piece)| {
                (
                    piece.partition,
                    PiecePlan {
                        plan,
                        planned: piece.messages,
                    },
                )
            })
            .collect())
    }

    /// Takes a piece's plan into `chunk`: its rows and truncates, and its
    /// partition's newest commit time. What it refused is dead-lettered, as
    /// the worker does, or stops the rebuild where the worker would hold or
    /// stop.
    async fn take<M: Message>(
        &self,
        chunk: &mut bulk::Chunk,
        done: &mut Replayed,
        topic: &str,
        partition: i32,
        plan: PiecePlan<'_, M>,
    ) -> anyhow::Result<()> {
        let (config, tables) = (self.config, self.tables);
        let feed = self.feed_of[topic];
        let plan = plan.plan;
        for r in &plan.rejected {
            if let Some(why) = stops_rebuild(&r.fault, config) {
                anyhow::bail!(
                    "{topic}/{partition} at offset {}: {} ({why}); run the rebuild again once it is fixed: it resumes",
                    r.msg.offset(),
                    r.fault
                );
            }
            warn!(topic = %topic, partition, offset = r.msg.offset(), reason = r.fault.reason(),
                error = %r.fault, "a change that cannot be applied is dead-lettered, as the worker does");
            // Sent before the offsets past it are committed (with the
            // chunk); a message the worker (or an earlier run) sent already
            // is not sent again.
            let place = refused::Place {
                topic,
                partition,
                offset: r.msg.offset(),
            };
            let table = Some(tables[feed.table].name.as_str());
            let mut backoff = failure::Backoff::default();
            loop {
                match self
                    .writer
                    .send(
                        place,
                        refused::Body::Bytes((r.msg.key(), r.msg.payload())),
                        &r.fault,
                        table,
                        None,
                    )
                    .await
                {
                    Ok(true) => done.dead_lettered += 1,
                    Ok(false) => done.already_dead_lettered += 1,
                    Err(refused::Failed::Retry(reason, e)) => {
                        warn!(reason, error = %format!("{e:#}"), retry_in = ?backoff.delay(), "dead-lettering a change failed; again");
                        backoff.wait(reason).await;
                        continue;
                    }
                    Err(refused::Failed::Stop(e)) => return Err(e),
                }
                break;
            }
        }
        done.refused += plan.rejected.len() as u64;
        chunk.read_to(topic, partition, 0, plan.newest_ts_ms);
        let topic_index = chunk.topic_index(topic);
        for step in plan.steps {
            match step {
                Step::Row {
                    table, fin, msg, ..
                } => {
                    let per_partition =
                        (!tables[table].counters.is_empty()).then_some((topic, partition));
                    let at = bulk::At {
                        topic: topic_index,
                        partition,
                        offset: msg.offset(),
                        key: bulk::key_hash(msg.key()),
                    };
                    chunk.add(table, fin, per_partition, at)
                }
                Step::Truncate { table, ts_ms } => {
                    chunk.truncate(table, ts_ms, &feed.source_region)
                }
            }
        }
        Ok(())
    }
}

/// A partition's messages to plan, in offset order.
type Run<'r, M> = ((&'r str, i32), &'r [M]);

/// A piece's plan and the messages it planned.
struct PiecePlan<'m, M> {
    plan: Plan<'m, M>,
    planned: &'m [M],
}

/// A batch's messages of one partition: its (topic, partition), the end it
/// is replayed to (`None`: read to it already), and its messages before
/// that end.
type PartitionMessages<'m> = ((String, i32), Option<i64>, Vec<BorrowedMessage<'m>>);

/// Threads that decode a rebuild's batches: one per core.
fn decoder_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Messages per piece of a batch of `total` planned on `threads` threads:
/// a few pieces per thread, so that one slow piece does not leave the
/// other threads idle, but not so small that handing them out costs.
fn pieces_of(total: usize, threads: usize) -> usize {
    (total / (threads * 4).max(1)).max(64)
}

/// A run of one partition's messages, planned as one.
struct Piece<'p, 'm, M> {
    planner: &'p Planner<'p>,
    topic: &'p str,
    messages: &'m [M],
    /// Index of its partition in the batch.
    partition: usize,
}

/// Plans `pieces` on up to `threads` threads (this one among them),
/// returning their plans in the pieces' order. Each piece is planned as the
/// worker plans a batch; only the registry lookups await, so each thread
/// runs its pieces' futures to completion on the runtime's handle.
async fn plan_pieces<'m, M: Message + Sync>(
    pieces: &[Piece<'_, 'm, M>],
    now_ms: i64,
    threads: usize,
) -> Vec<Plan<'m, M>> {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Mutex;
    let handle = tokio::runtime::Handle::current();
    let threads = threads.min(pieces.len());
    if threads <= 1 || handle.runtime_flavor() == tokio::runtime::RuntimeFlavor::CurrentThread {
        let mut plans = Vec::with_capacity(pieces.len());
        for p in pieces {
            plans.push(p.planner.plan(p.topic, p.messages, now_ms).await);
        }
        return plans;
    }
    let next = AtomicUsize::new(0);
    let slots: Vec<Mutex<Option<Plan<'m, M>>>> = pieces.iter().map(|_| Mutex::new(None)).collect();
    let work = || loop {
        let i = next.fetch_add(1, Ordering::Relaxed);
        let Some(p) = pieces.get(i) else { break };
        let plan = handle.block_on(p.planner.plan(p.topic, p.messages, now_ms));
        *slots[i].lock().expect("plan slot") = Some(plan);
    };
    tokio::task::block_in_place(|| {
        std::thread::scope(|s| {
            for _ in 1..threads {
                s.spawn(work);
            }
            work();
        })
    });
    slots
        .into_iter()
        .map(|s| {
            s.into_inner()
                .expect("plan slot")
                .expect("every piece planned")
        })
        .collect()
}

/// Replays `spans` of `feeds` into `tables` (the config's, loaded): read
/// and planned in batches of `apply.batch_max_rows` messages, collapsed
/// into chunks that are written once they hold `limits` (rows, bytes) or
/// have read its messages, each loaded in bulk and committed with its
/// partitions' offsets under the rebuild's group ([`bulk`]).
pub async fn replay(
    config: &Config,
    pool: &deadpool_postgres::Pool,
    tables: &[TargetTable],
    feeds: &[Feed],
    spans: Vec<Span>,
    limits: bulk::Limits,
    on_progress: &OnProgress<'_>,
) -> anyhow::Result<Replayed> {
    let mut done = Replayed::default();
    let writer = refused::Writer::new(config, pool.clone(), tables);
    let Some(mut reader) = Reader::new(config, tables, feeds, &spans, writer.clone())? else {
        return Ok(done);
    };
    let mut chunk = bulk::Chunk::default();
    // Messages per topic in the chunk being read, and in the one being
    // written: told once it is committed.
    let mut unreported: HashMap<String, u64> = HashMap::new();
    let mut written: HashMap<String, u64> = HashMap::new();
    let report = |counts: &mut HashMap<String, u64>| {
        for (topic, n) in counts.drain() {
            on_progress(&topic, n);
            metrics::counter!(crate::metrics::REBUILD_MESSAGES_TOTAL, "topic" => topic)
                .increment(n);
        }
    };
    // A chunk is written (by PostgreSQL) while the next one is read and
    // decoded (here): on a small box those are the two cores' work. One
    // write at a time, so chunks commit in order.
    let mut writing: Option<tokio::task::JoinHandle<anyhow::Result<refused::Committed>>> = None;
    while !reader.done() {
        reader
            .read_into(&mut chunk, &mut done, &mut unreported)
            .await?;
        // Written on what the chunk holds, not on what it read: the
        // versions it collapsed away cost nothing to write.
        if limits.reached(&chunk) || reader.done() {
            // Planned while the chunk before is written.
            reader.settle(&mut chunk, &mut done).await?;
            if let Some(committed) = written_chunk(&mut writing).await? {
                done.add(committed);
                report(&mut written);
            }
            done.messages += chunk.messages as u64;
            written = std::mem::take(&mut unreported);
            let chunk = std::mem::take(&mut chunk);
            let writer = writer.clone();
            writing = Some(tokio::spawn(async move { writer.commit(&chunk).await }));
        }
    }
    if let Some(committed) = written_chunk(&mut writing).await? {
        done.add(committed);
        report(&mut written);
    }
    if !chunk.is_empty() {
        reader.settle(&mut chunk, &mut done).await?;
        done.messages += chunk.messages as u64;
        done.add(writer.commit(&chunk).await?);
        report(&mut unreported);
    }
    // Every partition is replayed to its end: nothing releases a row that
    // still waits (its partition's stored offset stayed at it).
    if let Some(w) = writer.still_waiting() {
        return Err(w.stops(tables));
    }
    Ok(done)
}

/// Replays `spans` into `tables` inside the caller's transaction `tx`, as
/// one chunk with its offsets (a shadow rebuild's last catch-up, under the
/// lock that stops the worker's writes: a small gap). A refusal is handled
/// as [`replay`]'s, except that what is waited out returns
/// [`refused::Failed::Retry`] for the caller to retry. `writer`: made for
/// `tables` before the lock was taken, with the dead-letter topic read
/// ([`refused::Writer::load_dead_letters`]): not read under the lock.
pub async fn replay_in(
    tx: &mut deadpool_postgres::Transaction<'_>,
    writer: &Arc<refused::Writer>,
    config: &Config,
    tables: &[TargetTable],
    feeds: &[Feed],
    spans: Vec<Span>,
) -> anyhow::Result<Replayed> {
    let mut done = Replayed::default();
    let writer = writer.clone();
    let Some(mut reader) = Reader::new(config, tables, feeds, &spans, writer.clone())? else {
        return Ok(done);
    };
    let mut chunk = bulk::Chunk::default();
    let mut unreported = HashMap::new();
    while !reader.done() {
        reader
            .read_into(&mut chunk, &mut done, &mut unreported)
            .await?;
    }
    reader.settle(&mut chunk, &mut done).await?;
    done.messages += chunk.messages as u64;
    done.add(writer.flush_in(tx, &chunk).await.map_err(|f| {
        let retried = matches!(f, refused::Failed::Retry(..));
        let e = f.into_error();
        if retried {
            e.context(SWAP_RETRY)
        } else {
            e
        }
    })?);
    Ok(done)
}

/// Waits for the chunk being written, if one is: what it applied.
async fn written_chunk(
    writing: &mut Option<tokio::task::JoinHandle<anyhow::Result<refused::Committed>>>,
) -> anyhow::Result<Option<refused::Committed>> {
    match writing.take() {
        None => Ok(None),
        Some(w) => Ok(Some(w.await.context("writing a chunk")??)),
    }
}

/// The context of a shadow catch-up's failure that a new attempt may get
/// past (an outage, a grant): the swap tries again.
pub const SWAP_RETRY: &str =
    "the last catch-up under the swap's lock met a failure the worker waits out";

/// Drops from `ends` the partitions whose fetch position reached their end.
fn reached_by_position(consumer: &StreamConsumer, ends: &mut HashMap<(String, i32), i64>) {
    let Ok(positions) = consumer.position() else {
        return;
    };
    for e in positions.elements() {
        if let Offset::Offset(at) = e.offset() {
            let key = (e.topic().to_owned(), e.partition());
            if ends.get(&key).is_some_and(|end| at >= *end) {
                ends.remove(&key);
            }
        }
    }
}

/// Why a change the rebuild cannot use stops it, by the worker's verdict
/// (worker/failure.rs): what the worker waits out (a registry fault,
/// `on_schema_mismatch = "hold"`) or stops at (`on_schema_mismatch` or
/// `on_error` = `"stop"`) stops the rebuild too; `None` for what the
/// worker dead-letters, which the rebuild dead-letters too.
fn stops_rebuild(fault: &failure::Fault, config: &Config) -> Option<String> {
    match failure::message_verdict(fault, config) {
        Verdict::DeadLetter => None,
        Verdict::Retry => Some(format!(
            "{}: the worker holds its partition here",
            fault.retry_reason(config).unwrap_or_default()
        )),
        _ => Some(format!(
            "{}: the worker stops here (on_schema_mismatch or on_error = \"stop\")",
            fault.reason()
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A schemaless JSON insert of `users` key `id`, or a message that is
    /// not JSON at all.
    fn json_message(offset: i64, id: i64) -> rdkafka::message::OwnedMessage {
        let (key, value) = if id % 97 == 0 {
            (format!("{{\"id\": {id}}}"), "{not json".to_owned())
        } else {
            let row = serde_json::json!({"id": id, "name": format!("n{id}"),
                "hlc": (1_000_i64 + id) << 16, "origin_region": "us-east-1"});
            let value = serde_json::json!({"op": "c", "before": null, "after": row,
                "source": {"ts_ms": id, "schema": "public", "table": "users"}});
            (format!("{{\"id\": {id}}}"), value.to_string())
        };
        rdkafka::message::OwnedMessage::new(
            Some(value.into_bytes()),
            Some(key.into_bytes()),
            "us-east-1.cdc.public.users".into(),
            rdkafka::Timestamp::NotAvailable,
            0,
            offset,
            None,
        )
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_batch_planned_in_pieces_on_threads_is_the_batch_planned_at_once() {
        let config = crate::worker::test_config("");
        let tables = vec![TargetTable::for_tests(
            "public.users",
            &[
                ("id", "bigint"),
                ("name", "text"),
                ("hlc", "bigint"),
                ("origin_region", "text"),
            ],
        )];
        let planner = Planner {
            config: &config,
            tables: &tables,
            source_region: "us-east-1",
            table: Some(0),
            avro: None,
            own_topic: false,
        };
        let topic = "us-east-1.cdc.public.users";
        // Keys repeat, so the order of the steps matters to the collapse.
        let messages: Vec<_> = (0..1000).map(|i| json_message(i, i % 300)).collect();
        let summary = |plans: Vec<Plan<'_, rdkafka::message::OwnedMessage>>| {
            let mut steps = Vec::new();
            let mut rejected = Vec::new();
            for plan in plans {
                for s in plan.steps {
                    if let Step::Row { fin, msg, .. } = s {
                        steps.push((msg.offset(), fin.key_text().to_owned(), fin.version().0));
                    }
                }
                rejected.extend(plan.rejected.iter().map(|r| r.msg.offset()));
            }
            (steps, rejected)
        };
        let whole = summary(vec![planner.plan(topic, &messages, 0).await]);
        let pieces: Vec<Piece<'_, '_, _>> = messages
            .chunks(pieces_of(messages.len(), 3))
            .map(|m| Piece {
                planner: &planner,
                topic,
                messages: m,
                partition: 0,
            })
            .collect();
        assert!(pieces.len() >= 3, "{} pieces", pieces.len());
        let pieced = summary(plan_pieces(&pieces, 0, 3).await);
        assert_eq!(whole.0.len(), 1000 - 14, "every change but the 14 not JSON");
        assert_eq!(whole.1.len(), 14);
        assert_eq!(pieced, whole);
    }

    #[test]
    fn pieces_share_a_batch_between_threads_but_not_below_64_messages() {
        assert_eq!(pieces_of(1000, 2), 125);
        assert_eq!(pieces_of(100, 2), 64);
        assert_eq!(pieces_of(0, 1), 64);
    }

    #[test]
    fn every_region_topic_and_the_own_one_feed_a_table() {
        let config = crate::worker::test_config("");
        let f = feeds(&config, &[0]);
        assert_eq!(
            f,
            vec![
                Feed {
                    topic: "us-east-1.cdc.public.users".into(),
                    source_region: "us-east-1".into(),
                    table: 0,
                    own: false
                },
                Feed {
                    topic: "cdc.public.users".into(),
                    source_region: "eu-west-1".into(),
                    table: 0,
                    own: true
                },
            ]
        );
        assert_eq!(group(&config), "regionsync-eu-west-1-rebuild");
    }

    #[test]
    fn a_change_stops_the_rebuild_where_the_worker_would_not_dead_letter_it() {
        use crate::apply::RowError;
        use crate::config::OnSchemaMismatch;
        let schema = |policy| {
            failure::Fault::Row(RowError::Schema {
                table: "public.users".into(),
                problem: "source column c is not in this region's table".into(),
                policy,
            })
        };
        let config = crate::worker::test_config("");
        let held = stops_rebuild(&schema(OnSchemaMismatch::Hold), &config).unwrap();
        assert!(held.contains("schema_mismatch"), "{held}");
        let stopped = stops_rebuild(&schema(OnSchemaMismatch::Stop), &config).unwrap();
        assert!(stopped.contains("on_schema_mismatch"), "{stopped}");
        assert_eq!(stops_rebuild(&schema(OnSchemaMismatch::Dlq), &config), None);
        // The message's own faults follow on_error.
        let oversized = failure::Fault::Oversized { size: 2, limit: 1 };
        assert_eq!(stops_rebuild(&oversized, &config), None);
        let stop = crate::worker::test_config("on_error = \"stop\"");
        assert!(stops_rebuild(&oversized, &stop).is_some());
        // A table's dlq wins over on_error = stop, as in the worker.
        assert_eq!(stops_rebuild(&schema(OnSchemaMismatch::Dlq), &stop), None);
    }

    #[test]
    fn a_position_retention_deleted_stops_the_rebuild_naming_why() {
        use rdkafka::error::{KafkaError, RDKafkaErrorCode};
        let gone = received::<()>(Err(KafkaError::MessageConsumption(
            RDKafkaErrorCode::AutoOffsetReset,
        )))
        .unwrap_err()
        .to_string();
        assert!(
            gone.starts_with(
                "retention deleted changes of a replayed topic before this rebuild read them"
            ),
            "{gone}"
        );
        // A lost connection is read past (librdkafka reconnects); a fatal
        // error stops.
        for passing in [
            RDKafkaErrorCode::BrokerTransportFailure,
            RDKafkaErrorCode::AllBrokersDown,
        ] {
            let read_on = received::<()>(Err(KafkaError::MessageConsumption(passing)));
            assert!(matches!(read_on, Ok(None)), "{passing:?}: {read_on:?}");
        }
        let other = received::<()>(Err(KafkaError::MessageConsumptionFatal(
            RDKafkaErrorCode::Fatal,
        )))
        .unwrap_err();
        assert_eq!(other.to_string(), "reading the replayed topics");
        assert_eq!(received(Ok(7)).unwrap(), Some(7));
    }

    #[test]
    fn a_topic_without_its_whole_history_is_named() {
        let now = 10 * 86_400_000;
        let deleting = Retention {
            cleanup_policy: "delete".into(),
            delete_retention_ms: None,
            partitions: vec![(0, 0, Some(now - 1000)), (1, 42, Some(now - 1000))],
        };
        let why = history_problem("us-east-1.cdc.public.users", &deleting, now).unwrap();
        assert!(why.contains("partition 1 starts at offset 42"), "{why}");
        let whole = Retention {
            partitions: vec![(0, 0, Some(now - 1000))],
            ..deleting.clone()
        };
        assert_eq!(history_problem("t", &whole, now), None);

        let compacted = Retention {
            cleanup_policy: "compact".into(),
            delete_retention_ms: Some(86_400_000),
            // A compacted topic's first offset past 0 is normal.
            partitions: vec![(0, 5, Some(now - 3_600_000))],
        };
        assert_eq!(history_problem("t", &compacted, now), None);
        let old = Retention {
            partitions: vec![(0, 5, Some(now - 2 * 86_400_000))],
            ..compacted
        };
        let why = history_problem("t", &old, now).unwrap();
        assert!(why.contains("delete.retention.ms=86400000"), "{why}");
    }
}
