//! A chunk PostgreSQL refuses, handled as the worker handles a refused
//! batch (worker/failure.rs):
//! - the connection or server failed, a grant or table is missing, or a
//!   schema difference meets a table whose `on_schema_mismatch` is
//!   `hold`: the chunk is written again after a backoff (counted in
//!   `regionsync_retries_total{reason}`), forever, as the worker waits;
//! - the data (a value, a CHECK, or a schema difference under
//!   `on_schema_mismatch = "dlq"`): the chunk is written again in one
//!   transaction, bisected in savepoints down to the rows PostgreSQL
//!   refuses alone; those are dead-lettered as their messages (fetched
//!   again from Kafka by offset) to the worker's dead-letter topic, with
//!   the worker's reasons and a detail naming table, column and type, and
//!   the rest is committed with the chunk's offsets. A message already in
//!   the dead-letter topic (the worker's, or a run killed after sending
//!   it) is not sent again. `on_error = "stop"` (for data) or
//!   `on_schema_mismatch = "stop"` stops the rebuild at the row instead;
//! - a change the worker's planning refuses (it cannot be decoded, or a
//!   value cannot fit, by the worker's verdict: `message_verdict`) is
//!   dead-lettered the same way, by [`Writer::send`], before the offsets
//!   past it are committed;
//! - a unique index or foreign key between rows of different keys, still
//!   refused after the other rows are written: the source satisfied it, so
//!   the other row (the value's holder, the parent) is a change of a later
//!   chunk; as the worker waits, the row waits ([`Waiting`]): it is written
//!   again in each next chunk's transaction until it goes in, and its
//!   partition's stored offset stays at it meanwhile, so a kill loses
//!   nothing. Still refused when every partition is replayed to its end,
//!   the rebuild stops, naming it (it resumes from it when run again).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use deadpool_postgres::Transaction;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use tracing::{info, warn};

use super::bulk::{self, At, Chunk};
use crate::apply::{self, session, Applied, Final, TargetTable};
use crate::config::{Config, OnSchemaMismatch};
use crate::metrics::retry;
use crate::source::dlq::{self, DeadLetter, DeadLetterProducer};
use crate::worker::failure::{self, Backoff, BatchError, Fault, Sqlstate};

/// Why a write failed, sorted.
#[derive(Debug)]
pub enum Failed {
    /// Waited out: written again after a backoff, counted with this label.
    Retry(&'static str, anyhow::Error),
    /// The rebuild stops with this error (it resumes when run again).
    Stop(anyhow::Error),
}

impl Failed {
    pub fn into_error(self) -> anyhow::Error {
        match self {
            Failed::Retry(_, e) | Failed::Stop(e) => e,
        }
    }
}

/// What a chunk's commit did.
#[derive(Clone, Copy, Debug, Default)]
pub struct Committed {
    pub applied: Applied,
    /// Rows PostgreSQL refused, sent to the dead-letter topic by this run.
    pub dead_lettered: u64,
    /// Of those refused, already in the dead-letter topic (not sent again).
    pub already_dead_lettered: u64,
}

/// Why a chunk's bulk write failed: PostgreSQL refused the write (sorted
/// by [`sort`]), or carrying the waiting rows over failed, sorted already.
enum Bulk {
    Write(anyhow::Error),
    Other(Failed),
}

/// How a failed write goes on.
enum Next {
    Retry(&'static str),
    /// Find the refused rows in savepoints.
    Isolate,
    Stop,
}

/// The PostgreSQL error in `e`'s chain, if any.
fn pg_error(e: &anyhow::Error) -> Option<&tokio_postgres::Error> {
    e.chain()
        .find_map(|c| c.downcast_ref::<tokio_postgres::Error>())
}

/// Sorts a failed chunk write by the worker's SQLSTATE table.
fn sort(e: &anyhow::Error, policies: &[OnSchemaMismatch]) -> Next {
    let Some(pg) = pg_error(e) else {
        // The pool could not connect: the server.
        if e.chain()
            .any(|c| c.downcast_ref::<deadpool_postgres::PoolError>().is_some())
        {
            return Next::Retry(retry::POSTGRES_UNAVAILABLE);
        }
        return Next::Stop;
    };
    let Some(code) = pg.code() else {
        return Next::Retry(retry::POSTGRES_UNAVAILABLE);
    };
    match failure::sort_sqlstate(code.code()) {
        Sqlstate::Transient => Next::Retry(retry::POSTGRES_UNAVAILABLE),
        Sqlstate::Held(reason) if reason == retry::SCHEMA_MISMATCH => {
            // Which table refused is found row by row; if every table of
            // the chunk holds, there is nothing to find.
            if policies.iter().all(|p| *p == OnSchemaMismatch::Hold) {
                Next::Retry(reason)
            } else {
                Next::Isolate
            }
        }
        Sqlstate::Held(reason) => Next::Retry(reason),
        Sqlstate::Wait(_) | Sqlstate::Data => Next::Isolate,
    }
}

/// A COMMIT PostgreSQL refused (a deferred constraint checked at the
/// end), by the worker's one decision (`failure::classify`, as the
/// worker's own commits): a constraint between rows the source satisfied
/// (`unique_wait`, `foreign_key_wait`), a grant, the server: waited out
/// with its label; the data (a deferred trigger's refusal): the rebuild
/// stops, as nothing of the chunk can be told apart at COMMIT.
fn commit_refused(e: tokio_postgres::Error) -> Failed {
    match failure::classify(e) {
        BatchError::Data(e) => Failed::Stop(anyhow::Error::from(e).context(
            "PostgreSQL refused a chunk of the rebuild at COMMIT (a deferred constraint or trigger): \
             no row of it can be set aside there; fix the cause and run the rebuild again: it resumes",
        )),
        other => Failed::Retry(other.retry_reason(), other.into_error()),
    }
}

/// What to tell the operator about a wait, by its label.
fn wait_advice(reason: &str) -> &'static str {
    match reason {
        r if r == retry::SCHEMA_MISMATCH => {
            "a schema difference between the source region and this one, and the table's on_schema_mismatch is \"hold\": \
             migrate this region's table (docs/SCHEMA-CHANGES.md), or set on_schema_mismatch = \"dlq\" to dead-letter the rows"
        }
        r if r == retry::POSTGRES_PERMISSION => "a missing grant: GRANT it (regionsync setup)",
        r if r == retry::POSTGRES_SCHEMA => "a table, column or type missing here: fix this region's setup",
        r if r == retry::DLQ_UNAVAILABLE => "the dead-letter topic cannot be read or written",
        r if r == retry::UNIQUE_WAIT || r == retry::FOREIGN_KEY_WAIT => {
            "a unique index or foreign key between rows, checked at COMMIT (deferred): the source satisfied it, \
             so the other row is a change not written yet; it is waited out, as the worker waits"
        }
        _ => "PostgreSQL is unavailable",
    }
}

/// What writes the rebuild's chunks: one per rebuild, shared by its
/// writing tasks.
pub struct Writer {
    pub config: Arc<Config>,
    pub pool: deadpool_postgres::Pool,
    pub group: String,
    pub tables: Arc<Vec<TargetTable>>,
    letters: tokio::sync::Mutex<Letters>,
    /// Rows waiting for a later chunk, and where the chunks committed.
    carried: std::sync::Mutex<Carried>,
}

/// A row a unique index or foreign key refuses after the rest of its
/// chunk was written: waiting for a change of a later chunk.
#[derive(Clone)]
pub struct Waiting {
    table: usize,
    fin: Final,
    topic: String,
    at: At,
}

impl Waiting {
    /// Why the rebuild stops at a row still waiting at the end.
    pub fn stops(&self, tables: &[TargetTable]) -> anyhow::Error {
        anyhow::anyhow!(
            "{} key {} (from {}/{} at offset {}): a unique index or foreign key refuses it, and no change of the replayed \
             topics released the other row (the value's holder, or the parent); the worker would wait at it. The rebuild's \
             offset of that partition stays before it: see RUNBOOK.md (RegionsyncPartitionHeld) for the other row, fix it, \
             and run the rebuild again: it resumes there",
            tables[self.table].name,
            self.fin.key_text(),
            self.topic,
            self.at.partition,
            self.at.offset
        )
    }
}

/// What carries over from one chunk's commit to the next.
#[derive(Default)]
struct Carried {
    /// Rows still waiting ([`Waiting`]), their partitions' offsets held.
    waiting: Vec<Waiting>,
    /// Per partition, where the committed chunks read to.
    positions: HashMap<(String, i32), i64>,
}

/// The dead-letter topic, opened when first needed.
#[derive(Default)]
struct Letters {
    producer: Option<DeadLetterProducer>,
    /// (topic, partition, offset) of every message in the dead-letter
    /// topic, read once, then kept up to date by this run's.
    sent: Option<HashSet<(String, i32, i64)>>,
    /// Fetches a refused row's message again by its offset.
    reader: Option<StreamConsumer>,
}

impl Writer {
    pub fn new(
        config: &Config,
        pool: deadpool_postgres::Pool,
        tables: &[TargetTable],
    ) -> Arc<Writer> {
        Arc::new(Writer {
            config: Arc::new(config.clone()),
            pool,
            group: super::group(config),
            tables: Arc::new(tables.to_vec()),
            letters: tokio::sync::Mutex::new(Letters::default()),
            carried: std::sync::Mutex::new(Carried::default()),
        })
    }

    /// The `on_schema_mismatch` of the chunk's tables.
    fn policies(&self, chunk: &Chunk) -> Vec<OnSchemaMismatch> {
        chunk
            .tables()
            .iter()
            .map(|(t, _)| self.tables[*t].on_schema_mismatch)
            .collect()
    }

    /// Commits `chunk` (its rows and offsets, one transaction), waiting out
    /// what the worker waits out, and dead-lettering the rows PostgreSQL
    /// refuses for their data.
    pub async fn commit(&self, chunk: &Chunk) -> anyhow::Result<Committed> {
        let mut backoff = Backoff::default();
        loop {
            let failed = match self.commit_bulk(chunk).await {
                Ok(done) => return Ok(done),
                Err(Bulk::Other(f)) => f,
                Err(Bulk::Write(e)) => match sort(&e, &self.policies(chunk)) {
                    Next::Stop => return Err(e),
                    Next::Retry(reason) => Failed::Retry(reason, e),
                    Next::Isolate => {
                        warn!(error = %format!("{e:#}"), "PostgreSQL refused a chunk of the rebuild: writing it again, finding the rows it refuses");
                        match self.commit_isolating(chunk).await {
                            Ok(c) => return Ok(c),
                            Err(f) => f,
                        }
                    }
                },
            };
            match failed {
                Failed::Stop(e) => return Err(e),
                Failed::Retry(reason, e) => {
                    warn!(reason, error = %format!("{e:#}"), retry_in = ?backoff.delay(),
                        "a chunk of the rebuild is written again after a wait ({}); stopping the rebuild is safe: it resumes",
                        wait_advice(reason));
                    backoff.wait(reason).await;
                }
            }
        }
    }

    async fn commit_bulk(&self, chunk: &Chunk) -> Result<Committed, Bulk> {
        let write = |e: anyhow::Error| Bulk::Write(e);
        let mut client = self.pool.get().await.map_err(|e| write(e.into()))?;
        let mut tx = client.transaction().await.map_err(|e| write(e.into()))?;
        tx.batch_execute(session::APPLY_TRANSACTION_SQL)
            .await
            .map_err(|e| write(e.into()))?;
        let applied = bulk::flush(&tx, &self.group, &self.tables, chunk)
            .await
            .map_err(write)?;
        let (mut done, still) = self
            .retry_waiting(&mut tx, chunk, Vec::new())
            .await
            .map_err(Bulk::Other)?;
        tx.commit().await.map_err(|e| write(e.into()))?;
        self.settle(chunk, still);
        done.applied += applied;
        Ok(done)
    }

    /// The rows still waiting after the last commit, if any.
    pub fn still_waiting(&self) -> Option<Waiting> {
        let carried = self.carried.lock().expect("carried rows");
        carried.waiting.first().cloned()
    }

    /// After `chunk` committed with `still` waiting: what the next chunk
    /// carries.
    fn settle(&self, chunk: &Chunk, still: Vec<Waiting>) {
        let mut carried = self.carried.lock().expect("carried rows");
        for (topic, partition, next) in chunk.positions() {
            let at = carried
                .positions
                .entry((topic.to_owned(), partition))
                .or_insert(next);
            *at = (*at).max(next);
        }
        carried.waiting = still;
    }

    /// In `tx`, after `chunk`'s rows and offsets: the rows that waited for
    /// a later chunk written again, each in a savepoint; those still
    /// waiting (with `fresh`, this chunk's own) returned, their partitions'
    /// stored offsets held at them, and the offsets of partitions no row
    /// waits in any more stored where the chunks read to.
    async fn retry_waiting(
        &self,
        tx: &mut Transaction<'_>,
        chunk: &Chunk,
        fresh: Vec<Waiting>,
    ) -> Result<(Committed, Vec<Waiting>), Failed> {
        let retry = |e: anyhow::Error| Failed::Retry(retry::POSTGRES_UNAVAILABLE, e);
        let (earlier, positions) = {
            let carried = self.carried.lock().expect("carried rows");
            (carried.waiting.clone(), carried.positions.clone())
        };
        if earlier.is_empty() && fresh.is_empty() {
            return Ok((Committed::default(), fresh));
        }
        let mut done = Committed::default();
        let mut still = fresh;
        for w in &earlier {
            let table = &self.tables[w.table];
            match write_part(tx, table, &[(&w.fin, w.at)]).await? {
                Ok(a) => done.applied += a,
                Err(Refused::Wait | Refused::Part) => still.push(w.clone()),
                Err(Refused::Row(fault)) => {
                    set_aside(
                        &self.config,
                        table,
                        &w.topic,
                        (w.table, &w.fin, w.at),
                        &fault,
                    )?;
                    let place = Place {
                        topic: &w.topic,
                        partition: w.at.partition,
                        offset: w.at.offset,
                    };
                    let name = Some(table.name.as_str());
                    if self
                        .send(place, Body::Refetch(w.at.key), &fault, name, None)
                        .await?
                    {
                        done.dead_lettered += 1;
                    } else {
                        done.already_dead_lettered += 1;
                    }
                }
            }
        }
        let mut held: HashMap<(&str, i32), i64> = HashMap::new();
        for w in &still {
            let at = held
                .entry((w.topic.as_str(), w.at.partition))
                .or_insert(w.at.offset);
            *at = (*at).min(w.at.offset);
        }
        // Released partitions: where the chunks read to (only forward).
        for w in &earlier {
            let key = (w.topic.as_str(), w.at.partition);
            if held.contains_key(&key) {
                continue;
            }
            let read = positions
                .get(&(w.topic.clone(), w.at.partition))
                .copied()
                .into_iter()
                .chain(
                    chunk
                        .positions()
                        .filter(|(t, p, _)| (*t, *p) == key)
                        .map(|(.., next)| next),
                )
                .max();
            if let Some(next) = read {
                crate::offsets::store(&*tx, &self.group, &w.topic, w.at.partition, next, None)
                    .await
                    .map_err(|e| retry(e.into()))?;
            }
        }
        // Held: not past the first waiting row (the chunk stored past it).
        for ((topic, partition), offset) in &held {
            tx.execute(
                "UPDATE regionsync.offsets SET next_offset = LEAST(next_offset, $4)
                  WHERE consumer_group = $1 AND topic = $2 AND partition = $3",
                &[&self.group, topic, partition, offset],
            )
            .await
            .map_err(|e| retry(e.into()))?;
        }
        if !still.is_empty() {
            info!(
                rows = still.len(),
                "rows a unique index or foreign key refuses wait for a later chunk of the rebuild"
            );
        }
        Ok((done, still))
    }

    async fn commit_isolating(&self, chunk: &Chunk) -> Result<Committed, Failed> {
        let retry = |e: anyhow::Error| Failed::Retry(retry::POSTGRES_UNAVAILABLE, e);
        let mut client = self.pool.get().await.map_err(|e| retry(e.into()))?;
        let mut tx = client.transaction().await.map_err(|e| retry(e.into()))?;
        tx.batch_execute(session::APPLY_TRANSACTION_SQL)
            .await
            .map_err(|e| retry(e.into()))?;
        let (mut done, fresh) = self.isolate_in(&mut tx, chunk).await?;
        let (more, still) = self.retry_waiting(&mut tx, chunk, fresh).await?;
        tx.commit().await.map_err(commit_refused)?;
        self.settle(chunk, still);
        done.applied += more.applied;
        done.dead_lettered += more.dead_lettered;
        done.already_dead_lettered += more.already_dead_lettered;
        Ok(done)
    }

    /// Writes `chunk` and its offsets in `tx` (the caller commits), the
    /// refused rows found in savepoints and dead-lettered; returns the rows
    /// that wait for a later chunk.
    async fn isolate_in(
        &self,
        tx: &mut Transaction<'_>,
        chunk: &Chunk,
    ) -> Result<(Committed, Vec<Waiting>), Failed> {
        let (applied, refused, waiting) = isolate(tx, &self.config, &self.tables, chunk).await?;
        let mut done = Committed {
            applied,
            ..Committed::default()
        };
        for (t, at, fault) in &refused {
            let (sent, already) = self.dead_letter(chunk, *t, *at, fault).await?;
            done.dead_lettered += sent;
            done.already_dead_lettered += already;
        }
        chunk
            .store_offsets(tx, &self.group)
            .await
            .map_err(|e| Failed::Retry(retry::POSTGRES_UNAVAILABLE, e))?;
        let waiting = waiting
            .into_iter()
            .map(|(table, fin, at)| Waiting {
                table,
                fin: fin.clone(),
                topic: chunk.topic(at).to_owned(),
                at,
            })
            .collect();
        Ok((done, waiting))
    }

    /// Writes `chunk` and its offsets in the caller's `tx`, in a savepoint;
    /// refused, found row by row as in [`Writer::commit`]. Nothing is
    /// retried here: a wait is the caller's.
    pub async fn flush_in(
        &self,
        tx: &mut Transaction<'_>,
        chunk: &Chunk,
    ) -> Result<Committed, Failed> {
        let sp = tx
            .savepoint("rebuild_chunk")
            .await
            .map_err(|e| Failed::Retry(retry::POSTGRES_UNAVAILABLE, e.into()))?;
        let e = match bulk::flush(&sp, &self.group, &self.tables, chunk).await {
            Ok(applied) => {
                sp.commit()
                    .await
                    .map_err(|e| Failed::Retry(retry::POSTGRES_UNAVAILABLE, e.into()))?;
                return Ok(Committed {
                    applied,
                    ..Committed::default()
                });
            }
            Err(e) => e,
        };
        sp.rollback()
            .await
            .map_err(|e| Failed::Retry(retry::POSTGRES_UNAVAILABLE, e.into()))?;
        tx.batch_execute("RELEASE SAVEPOINT rebuild_chunk")
            .await
            .map_err(|e| Failed::Retry(retry::POSTGRES_UNAVAILABLE, e.into()))?;
        match sort(&e, &self.policies(chunk)) {
            Next::Stop => Err(Failed::Stop(e)),
            Next::Retry(reason) => Err(Failed::Retry(reason, e)),
            Next::Isolate => {
                // Under the swap's lock every partition is read to its
                // end: a row still waiting waits for nothing to come.
                let (done, waiting) = self.isolate_in(tx, chunk).await?;
                match waiting.first() {
                    Some(w) => Err(Failed::Stop(w.stops(&self.tables))),
                    None => Ok(done),
                }
            }
        }
    }

    /// Sends what a replay of a refused row needs to the dead-letter topic,
    /// each message unless it is there already: its message, and first
    /// (oldest first) the older messages its unsent (TOAST) columns were
    /// filled from, for its row is their image together (`dlq replay`
    /// applies them in that order, each under the version guard). Returns
    /// (sent, found there already).
    async fn dead_letter(
        &self,
        chunk: &Chunk,
        table: usize,
        at: At,
        fault: &Fault,
    ) -> Result<(u64, u64), Failed> {
        let name = Some(self.tables[table].name.as_str());
        let (mut sent, mut already) = (0, 0);
        let mut count = |was_sent: bool| {
            if was_sent {
                sent += 1
            } else {
                already += 1
            }
        };
        let refused = Place {
            topic: chunk.topic(at),
            partition: at.partition,
            offset: at.offset,
        };
        let note = format!(
            "an earlier version of the refused change's row, at {}/{} offset {}, which takes its unchanged (TOAST) column values from it: \
             replay them together",
            refused.topic, refused.partition, refused.offset
        );
        for (source, ..) in chunk.merged_from(at) {
            let place = Place {
                topic: chunk.topic(*source),
                partition: source.partition,
                offset: source.offset,
            };
            count(
                self.send(place, Body::Refetch(source.key), fault, name, Some(&note))
                    .await?,
            );
        }
        count(
            self.send(refused, Body::Refetch(at.key), fault, name, None)
                .await?,
        );
        Ok((sent, already))
    }

    /// Reads which messages the dead-letter topic holds, if not read yet:
    /// before the swap's lock is taken, so that a refusal under it reads
    /// only what was dead-lettered since ([`Writer::send`]).
    pub async fn load_dead_letters(&self) -> Result<(), Failed> {
        let mut letters = self.letters.lock().await;
        letters.load(&self.config).await
    }

    /// Sends a message the rebuild cannot use (its bytes, or fetched again
    /// from Kafka by its place and checked to be it) to the dead-letter
    /// topic, unless it is there already; `true` if sent. `note`, if any,
    /// follows the fault in the letter's error. A letter sent is counted
    /// for the rebuild of `table` (in a row of its own, [`SENT_PARTITION`]),
    /// whatever run sends it.
    pub async fn send(
        &self,
        place: Place<'_>,
        message: Body<'_>,
        fault: &Fault,
        table: Option<&str>,
        note: Option<&str>,
    ) -> Result<bool, Failed> {
        let unavailable = |e: anyhow::Error| Failed::Retry(retry::DLQ_UNAVAILABLE, e);
        let Place {
            topic,
            partition,
            offset,
        } = place;
        let mut letters = self.letters.lock().await;
        letters.load(&self.config).await?;
        let key = (topic.to_owned(), partition, offset);
        if letters.sent.as_ref().is_some_and(|s| s.contains(&key)) {
            info!(topic, partition, offset, error = %fault,
                "a change the rebuild cannot apply is in the dead-letter topic already; not sent again");
            return Ok(false);
        }
        if letters.producer.is_none() {
            letters.producer = Some(DeadLetterProducer::new(&self.config).map_err(unavailable)?);
        }
        let error = match note {
            Some(note) => format!("{fault} ({note})"),
            None => fault.to_string(),
        };
        let letter = |key, payload| DeadLetter {
            topic,
            partition,
            offset,
            key,
            payload,
            reason: fault.reason(),
            error: &error,
            table,
        };
        match message {
            Body::Bytes((key, payload)) => {
                let producer = letters.producer.as_ref().expect("opened above");
                producer
                    .send(&letter(key, payload))
                    .await
                    .map_err(unavailable)?;
            }
            Body::Refetch(key_hash) => {
                if letters.reader.is_none() {
                    let reader: StreamConsumer = crate::source::kafka_config(&self.config)
                        .map_err(unavailable)?
                        .set("group.id", format!("{}-refetch", self.group))
                        .set("enable.auto.commit", "false")
                        .set("enable.auto.offset.store", "false")
                        .create()
                        .context("creating the rebuild's reader of refused messages")
                        .map_err(unavailable)?;
                    letters.reader = Some(reader);
                }
                let reader = letters.reader.as_ref().expect("opened above");
                let mut tpl = TopicPartitionList::new();
                tpl.add_partition_offset(topic, partition, Offset::Offset(offset))
                    .map_err(|e| unavailable(e.into()))?;
                reader.assign(&tpl).map_err(|e| unavailable(e.into()))?;
                let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
                // A later offset of its partition: the message may be gone
                // (compacted since it was read), or that is one left from an
                // earlier fetch; only the deadline tells.
                let mut past = None;
                let msg = loop {
                    let Ok(msg) = tokio::time::timeout_at(deadline, reader.recv()).await else {
                        return Err(match past {
                            Some(next) => Failed::Stop(anyhow::anyhow!(
                                "{topic}/{partition} offset {offset}, fetched again to dead-letter it, is no longer in the topic \
                                 (the next message there is at offset {next}: compacted since it was read); \
                                 run the rebuild again: it resumes and reads the newer version of its key"
                            )),
                            None => unavailable(anyhow::anyhow!(
                                "fetching {topic}/{partition} offset {offset} again to dead-letter it: not received in 30 s"
                            )),
                        });
                    };
                    let msg = msg.map_err(|e| unavailable(e.into()))?;
                    match refetched(&msg, place, key_hash) {
                        Refetched::It => break msg,
                        // Left from an earlier fetch of another place.
                        Refetched::Elsewhere => continue,
                        Refetched::Gone => {
                            past = Some(msg.offset());
                            continue;
                        }
                        Refetched::OtherKey => {
                            return Err(Failed::Stop(anyhow::anyhow!(
                                "{topic}/{partition} offset {offset}, fetched again to dead-letter it, is not the message the rebuild read \
                                 (its key differs): the topic was deleted and created again, or rewritten, during the rebuild; \
                                 start it over with --restart"
                            )))
                        }
                    }
                };
                let producer = letters.producer.as_ref().expect("opened above");
                producer
                    .send(&letter(msg.key(), msg.payload()))
                    .await
                    .map_err(unavailable)?;
            }
        }
        if let Some(sent) = letters.sent.as_mut() {
            sent.insert(key);
        }
        drop(letters);
        if let Some(table) = table {
            failure::with_retry("counting a dead letter of the rebuild", || {
                count_sent(&self.pool, &self.group, table)
            })
            .await;
        }
        Ok(true)
    }
}

impl Letters {
    /// Reads which messages the dead-letter topic holds, once.
    async fn load(&mut self, config: &Config) -> Result<(), Failed> {
        if self.sent.is_some() {
            return Ok(());
        }
        let mut sent = HashSet::new();
        for letter in dlq::read_all(config)
            .await
            .map_err(|e| Failed::Retry(retry::DLQ_UNAVAILABLE, e))?
            .into_iter()
            .flatten()
        {
            sent.insert((letter.topic, letter.partition, letter.offset));
        }
        self.sent = Some(sent);
        Ok(())
    }
}

/// The row (partition -3 beside the rebuild's marker) that counts the
/// dead letters a rebuild of a table sent, over all its runs: a fresh
/// start removes it; its end reads it (`ops::rebuild`, exit status 3).
pub const SENT_PARTITION: i32 = -3;

/// Counts one dead letter sent by the rebuild of `table`, at once (not
/// with the chunk: the letter is sent whether or not its chunk commits,
/// and a later run finds it in the topic and does not send it again).
async fn count_sent(
    pool: &deadpool_postgres::Pool,
    group: &str,
    table: &str,
) -> anyhow::Result<()> {
    let client = pool.get().await?;
    client
        .execute(
            "INSERT INTO regionsync.offsets AS o (consumer_group, topic, partition, next_offset)
             VALUES ($1, $2, $3, 1)
             ON CONFLICT (consumer_group, topic, partition) DO UPDATE SET next_offset = o.next_offset + 1, updated_at = now()",
            &[&group, &super::marker_topic(table), &SENT_PARTITION],
        )
        .await?;
    Ok(())
}

/// What a dead letter is made of.
pub enum Body<'a> {
    /// The message's key and payload.
    Bytes(KeyAndPayload<'a>),
    /// Fetched again from Kafka by its place; its key bytes must hash to
    /// this ([`bulk::key_hash`]).
    Refetch(u64),
}

/// What a message fetched again is.
#[derive(Debug, PartialEq, Eq)]
enum Refetched {
    It,
    /// Another topic or partition, or an earlier offset.
    Elsewhere,
    /// Its partition, past its offset: the message may be gone
    /// (compacted), or this one is left from an earlier fetch.
    Gone,
    /// The place asked for, but another key: not the message read.
    OtherKey,
}

fn refetched<M: Message>(msg: &M, place: Place<'_>, key_hash: u64) -> Refetched {
    if msg.topic() != place.topic
        || msg.partition() != place.partition
        || msg.offset() < place.offset
    {
        Refetched::Elsewhere
    } else if msg.offset() > place.offset {
        Refetched::Gone
    } else if bulk::key_hash(msg.key()) != key_hash {
        Refetched::OtherKey
    } else {
        Refetched::It
    }
}

/// A message's key and payload bytes.
pub type KeyAndPayload<'a> = (Option<&'a [u8]>, Option<&'a [u8]>);

/// Where a message is.
#[derive(Clone, Copy, Debug)]
pub struct Place<'a> {
    pub topic: &'a str,
    pub partition: i32,
    pub offset: i64,
}

/// Rows of one table to write: a slice of (version, its message).
type Part<'s, 'c> = &'s [(&'c Final, At)];

/// Writes `chunk`'s truncates and rows in `tx`, each table's deletes and
/// then its other rows bisected in savepoints until the parts PostgreSQL
/// refuses are single rows: those are returned with their faults (table
/// index, message, fault); the rest is written.
#[allow(clippy::type_complexity)]
async fn isolate<'c>(
    tx: &mut Transaction<'_>,
    config: &Config,
    tables: &[TargetTable],
    chunk: &'c Chunk,
) -> Result<
    (
        Applied,
        Vec<(usize, At, Fault)>,
        Vec<(usize, &'c Final, At)>,
    ),
    Failed,
> {
    let mut applied = Applied::default();
    for (t, ts_ms, region) in chunk.truncates() {
        applied += apply::apply_truncate(&*tx, &tables[*t], *ts_ms, region)
            .await
            .map_err(|e| {
                let e = anyhow::Error::from(e).context(format!("truncating {}", tables[*t].name));
                match sort(&e, &[OnSchemaMismatch::Hold]) {
                    Next::Retry(reason) => Failed::Retry(reason, e),
                    _ => Failed::Stop(e),
                }
            })?;
    }
    let mut refused = Vec::new();
    let mut waiting: Vec<(usize, &Final, At)> = Vec::new();
    let by_table = chunk.tables();
    for (t, rows) in &by_table {
        let table = &tables[*t];
        let (deletes, upserts): (Vec<_>, Vec<_>) = rows
            .iter()
            .copied()
            .partition(|(f, _)| matches!(f, Final::Delete(_)));
        for kind in [&deletes, &upserts] {
            let mut todo: Vec<Part<'_, '_>> = vec![&kind[..]];
            while let Some(part) = todo.pop() {
                if part.is_empty() {
                    continue;
                }
                match write_part(tx, table, part).await? {
                    Ok(a) => applied += a,
                    Err(Refused::Part) => {
                        let (left, right) = part.split_at(part.len() / 2);
                        todo.push(right);
                        todo.push(left);
                    }
                    Err(Refused::Wait) => waiting.push((*t, part[0].0, part[0].1)),
                    Err(Refused::Row(fault)) => {
                        let (fin, at) = part[0];
                        set_aside(config, table, chunk.topic(at), (*t, fin, at), &fault)?;
                        refused.push((*t, at, fault));
                    }
                }
            }
        }
    }
    // A unique index or foreign key may wait for another row of the chunk
    // written meanwhile: once more, row by row; still refused, the other
    // row is a change of a later chunk: the row waits for it.
    let mut still = Vec::new();
    for (t, fin, at) in waiting {
        let table = &tables[t];
        match write_part(tx, table, &[(fin, at)]).await? {
            Ok(a) => applied += a,
            Err(Refused::Row(fault)) => {
                set_aside(config, table, chunk.topic(at), (t, fin, at), &fault)?;
                refused.push((t, at, fault));
            }
            Err(Refused::Wait | Refused::Part) => still.push((t, fin, at)),
        }
    }
    Ok((applied, refused, still))
}

/// A row PostgreSQL refused alone for its data, by the worker's verdict
/// (`failure::refused_verdict`; a schema difference reaches here only
/// under `on_schema_mismatch = "dlq"`): set aside to be dead-lettered, or
/// the rebuild stops under `on_error = "stop"`.
fn set_aside(
    config: &Config,
    table: &TargetTable,
    topic: &str,
    (_, fin, at): (usize, &Final, At),
    fault: &Fault,
) -> Result<(), Failed> {
    let schema = matches!(fault, Fault::SchemaRefused { .. });
    if !schema && failure::refused_verdict(config.on_error) == failure::Verdict::Stop {
        return Err(Failed::Stop(anyhow::anyhow!(
            "{} key {} (from {}/{} at offset {}): {fault} (on_error = stop); \
             run the rebuild again once it is fixed: it resumes",
            table.name,
            fin.key_text(),
            topic,
            at.partition,
            at.offset
        )));
    }
    warn!(table = %table.name, key = fin.key_text(), topic, partition = at.partition,
        offset = at.offset, reason = fault.reason(), error = %fault,
        "PostgreSQL refuses a change of the rebuild: it is dead-lettered");
    Ok(())
}

/// Why PostgreSQL refused a part.
enum Refused {
    /// A part of several rows, for its data or between rows: bisected.
    Part,
    /// One row, by a unique index or foreign key (between rows).
    Wait,
    /// One row, for its data: the fault it is dead-lettered with.
    Row(Fault),
}

/// Writes `part` of `table` in a savepoint of `tx`: `Ok(Ok)` written,
/// `Ok(Err)` refused for the data (rolled back), `Err` what is waited out
/// or stops.
async fn write_part(
    tx: &mut Transaction<'_>,
    table: &TargetTable,
    part: Part<'_, '_>,
) -> Result<Result<Applied, Refused>, Failed> {
    let retry = |e: anyhow::Error| Failed::Retry(retry::POSTGRES_UNAVAILABLE, e);
    let finals: Vec<&Final> = part.iter().map(|(f, _)| *f).collect();
    let sp = tx
        .savepoint("rebuild_part")
        .await
        .map_err(|e| retry(e.into()))?;
    let e = match bulk::write_table(&sp, table, &finals).await {
        Ok(a) => {
            // The staging table keeps its rows to the commit: emptied, so
            // the next part does not write them again.
            bulk::clear_stage(&sp, table).await.map_err(retry)?;
            sp.commit().await.map_err(|e| retry(e.into()))?;
            return Ok(Ok(a));
        }
        Err(e) => e,
    };
    sp.rollback().await.map_err(|e| retry(e.into()))?;
    // tokio-postgres rolls back to the savepoint but keeps it: released,
    // so bisecting a chunk does not nest a subtransaction per refused part.
    tx.batch_execute("RELEASE SAVEPOINT rebuild_part")
        .await
        .map_err(|e| retry(e.into()))?;
    let Some(pg) = pg_error(&e) else {
        return Err(match sort(&e, &[table.on_schema_mismatch]) {
            Next::Retry(reason) => Failed::Retry(reason, e),
            _ => Failed::Stop(e),
        });
    };
    let Some(code) = pg.code().map(|c| c.code().to_owned()) else {
        return Err(retry(e));
    };
    let schema = match failure::sort_sqlstate(&code) {
        Sqlstate::Transient => return Err(retry(e)),
        Sqlstate::Wait(_) if part.len() > 1 => return Ok(Err(Refused::Part)),
        Sqlstate::Wait(_) => return Ok(Err(Refused::Wait)),
        // A class-42 refusal of the rebuild's own COPY and staging
        // statements is the statement's, whatever the row: bisecting would
        // dead-letter every row of the table. Stopped instead.
        Sqlstate::Data if code.starts_with("42") => {
            return Err(Failed::Stop(e.context(format!(
                "{}: PostgreSQL refuses the rebuild's statement ({code}), not a row's value: \
                 nothing was dead-lettered; check the table's columns against the source's \
                 (docs/SCHEMA-CHANGES.md) and run the rebuild again: it resumes",
                table.name
            ))))
        }
        Sqlstate::Data => false,
        Sqlstate::Held(reason) if reason == retry::SCHEMA_MISMATCH => {
            match table.on_schema_mismatch {
                OnSchemaMismatch::Dlq => true,
                OnSchemaMismatch::Hold => return Err(Failed::Retry(reason, e)),
                OnSchemaMismatch::Stop => {
                    return Err(Failed::Stop(e.context(format!(
                        "{}: a schema difference between the source region and this one (on_schema_mismatch = stop); \
                         migrate this region's table (docs/SCHEMA-CHANGES.md) and run the rebuild again: it resumes",
                        table.name
                    ))))
                }
            }
        }
        Sqlstate::Held(reason) => return Err(Failed::Retry(reason, e)),
    };
    if part.len() > 1 {
        return Ok(Err(Refused::Part));
    }
    let mut detail = pg
        .as_db_error()
        .map(|d| d.message().to_string())
        .unwrap_or_else(|| pg.to_string());
    // A data exception names no column: find the value, as the worker does.
    if code.starts_with("22") {
        if let Some(idx) = apply::refused_column(&mut *tx, table, part[0].0)
            .await
            .map_err(|e| retry(e.into()))?
        {
            let (column, pg_type) = &table.columns[idx];
            detail = format!("column {column} ({pg_type}): {detail}");
        }
    }
    let name = table.name.clone();
    Ok(Err(Refused::Row(if schema {
        Fault::SchemaRefused {
            table: name,
            detail,
        }
    } else {
        Fault::RefusedByPostgres {
            table: name,
            detail,
        }
    })))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rdkafka::message::OwnedMessage;

    fn message(topic: &str, partition: i32, offset: i64, key: &[u8]) -> OwnedMessage {
        OwnedMessage::new(
            Some(b"{}".to_vec()),
            Some(key.to_vec()),
            topic.into(),
            rdkafka::Timestamp::NotAvailable,
            partition,
            offset,
            None,
        )
    }

    #[test]
    fn a_message_fetched_again_is_it_only_at_its_place_with_its_key() {
        let place = Place {
            topic: "us-east-1.cdc.public.users",
            partition: 2,
            offset: 40,
        };
        let key = bulk::key_hash(Some(b"{\"id\": 7}"));
        let at = |topic, partition, offset, k: &[u8]| {
            refetched(&message(topic, partition, offset, k), place, key)
        };
        assert_eq!(
            at("us-east-1.cdc.public.users", 2, 40, b"{\"id\": 7}"),
            Refetched::It
        );
        // The same offset of another topic or partition (left from an
        // earlier fetch) is skipped, not taken for it.
        assert_eq!(
            at("cdc.public.users", 2, 40, b"{\"id\": 7}"),
            Refetched::Elsewhere
        );
        assert_eq!(
            at("us-east-1.cdc.public.users", 1, 40, b"{\"id\": 7}"),
            Refetched::Elsewhere
        );
        assert_eq!(
            at("us-east-1.cdc.public.users", 2, 39, b"{\"id\": 7}"),
            Refetched::Elsewhere
        );
        // Past it: it was compacted away since it was read.
        assert_eq!(
            at("us-east-1.cdc.public.users", 2, 41, b"{\"id\": 7}"),
            Refetched::Gone
        );
        // Its place, another key: the topic was rewritten.
        assert_eq!(
            at("us-east-1.cdc.public.users", 2, 40, b"{\"id\": 8}"),
            Refetched::OtherKey
        );
        assert_ne!(bulk::key_hash(None), bulk::key_hash(Some(b"")));
    }
}
