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
//!   refused after the other rows are written: the rebuild stops, saying
//!   so (it resumes when run again).

use std::collections::HashSet;
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
use crate::config::{Config, OnError, OnSchemaMismatch};
use crate::metrics::retry;
use crate::source::dlq::{self, DeadLetter, DeadLetterProducer};
use crate::worker::failure::{self, Backoff, Fault, Sqlstate};

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
                Ok(applied) => {
                    return Ok(Committed {
                        applied,
                        ..Committed::default()
                    })
                }
                Err(e) => match sort(&e, &self.policies(chunk)) {
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

    async fn commit_bulk(&self, chunk: &Chunk) -> anyhow::Result<Applied> {
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
        tx.batch_execute(session::APPLY_TRANSACTION_SQL).await?;
        let total = bulk::flush(&tx, &self.group, &self.tables, chunk).await?;
        tx.commit().await?;
        Ok(total)
    }

    async fn commit_isolating(&self, chunk: &Chunk) -> Result<Committed, Failed> {
        let retry = |e: anyhow::Error| Failed::Retry(retry::POSTGRES_UNAVAILABLE, e);
        let mut client = self.pool.get().await.map_err(|e| retry(e.into()))?;
        let mut tx = client.transaction().await.map_err(|e| retry(e.into()))?;
        tx.batch_execute(session::APPLY_TRANSACTION_SQL)
            .await
            .map_err(|e| retry(e.into()))?;
        let done = self.isolate_in(&mut tx, chunk).await?;
        tx.commit().await.map_err(|e| retry(e.into()))?;
        Ok(done)
    }

    /// Writes `chunk` and its offsets in `tx` (the caller commits), the
    /// refused rows found in savepoints and dead-lettered.
    pub async fn isolate_in(
        &self,
        tx: &mut Transaction<'_>,
        chunk: &Chunk,
    ) -> Result<Committed, Failed> {
        let (applied, refused) = isolate(tx, &self.config, &self.tables, chunk).await?;
        let mut done = Committed {
            applied,
            ..Committed::default()
        };
        for (t, at, fault) in &refused {
            if self.dead_letter(chunk, *t, *at, fault).await? {
                done.dead_lettered += 1;
            } else {
                done.already_dead_lettered += 1;
            }
        }
        chunk
            .store_offsets(tx, &self.group)
            .await
            .map_err(|e| Failed::Retry(retry::POSTGRES_UNAVAILABLE, e))?;
        Ok(done)
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
            Next::Isolate => self.isolate_in(tx, chunk).await,
        }
    }

    /// Sends the message of a refused row to the dead-letter topic, unless
    /// it is there already; `true` if sent.
    async fn dead_letter(
        &self,
        chunk: &Chunk,
        table: usize,
        at: At,
        fault: &Fault,
    ) -> Result<bool, Failed> {
        let place = Place {
            topic: chunk.topic(at),
            partition: at.partition,
            offset: at.offset,
        };
        self.send(place, None, fault, Some(&self.tables[table].name))
            .await
    }

    /// Sends a message the rebuild cannot use (`key`, `payload`: its bytes;
    /// `None`: fetched again from Kafka by its offset) to the dead-letter
    /// topic, unless it is there already; `true` if sent.
    pub async fn send(
        &self,
        place: Place<'_>,
        message: Option<KeyAndPayload<'_>>,
        fault: &Fault,
        table: Option<&str>,
    ) -> Result<bool, Failed> {
        let unavailable = |e: anyhow::Error| Failed::Retry(retry::DLQ_UNAVAILABLE, e);
        let Place {
            topic,
            partition,
            offset,
        } = place;
        let mut letters = self.letters.lock().await;
        if letters.sent.is_none() {
            let mut sent = HashSet::new();
            for letter in dlq::read_all(&self.config)
                .await
                .map_err(unavailable)?
                .into_iter()
                .flatten()
            {
                sent.insert((letter.topic, letter.partition, letter.offset));
            }
            letters.sent = Some(sent);
        }
        let key = (topic.to_owned(), partition, offset);
        if letters.sent.as_ref().is_some_and(|s| s.contains(&key)) {
            info!(topic, partition, offset, error = %fault,
                "a change the rebuild cannot apply is in the dead-letter topic already; not sent again");
            return Ok(false);
        }
        if letters.producer.is_none() {
            letters.producer = Some(DeadLetterProducer::new(&self.config).map_err(unavailable)?);
        }
        let error = fault.to_string();
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
            Some((key, payload)) => {
                let producer = letters.producer.as_ref().expect("opened above");
                producer
                    .send(&letter(key, payload))
                    .await
                    .map_err(unavailable)?;
            }
            None => {
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
                let msg = tokio::time::timeout(Duration::from_secs(30), reader.recv())
                    .await
                    .map_err(|_| {
                        unavailable(anyhow::anyhow!(
                            "fetching {topic}/{partition} offset {offset} again to dead-letter it: nothing in 30 s"
                        ))
                    })?
                    .map_err(|e| unavailable(e.into()))?;
                if msg.offset() != offset {
                    return Err(unavailable(anyhow::anyhow!(
                        "fetching {topic}/{partition} offset {offset} again to dead-letter it: got offset {}",
                        msg.offset()
                    )));
                }
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
        Ok(true)
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
async fn isolate(
    tx: &mut Transaction<'_>,
    config: &Config,
    tables: &[TargetTable],
    chunk: &Chunk,
) -> Result<(Applied, Vec<(usize, At, Fault)>), Failed> {
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
                        let schema = matches!(fault, Fault::SchemaRefused { .. });
                        if !schema && config.on_error == OnError::Stop {
                            return Err(Failed::Stop(anyhow::anyhow!(
                                "{} key {} (from {}/{} at offset {}): {fault} (on_error = stop); \
                                 run the rebuild again once it is fixed: it resumes",
                                table.name,
                                fin.key_text(),
                                chunk.topic(at),
                                at.partition,
                                at.offset
                            )));
                        }
                        warn!(table = %table.name, key = fin.key_text(), topic = chunk.topic(at), partition = at.partition,
                            offset = at.offset, reason = fault.reason(), error = %fault,
                            "PostgreSQL refuses a change of the rebuild: it is dead-lettered");
                        refused.push((*t, at, fault));
                    }
                }
            }
        }
    }
    // A unique index or foreign key may wait for another row of the chunk
    // written meanwhile: once more, row by row.
    for (t, fin, at) in waiting {
        let table = &tables[t];
        match write_part(tx, table, &[(fin, at)]).await? {
            Ok(a) => applied += a,
            Err(Refused::Row(fault)) => refused.push((t, at, fault)),
            Err(Refused::Wait | Refused::Part) => {
                return Err(Failed::Stop(anyhow::anyhow!(
                    "{} key {} (from {}/{} at offset {}): a unique index or foreign key refuses it, held by a row of \
                     another partition or table the rebuild has not replayed yet; the worker would wait at it; \
                     run the rebuild again (it resumes), and see RUNBOOK.md (RegionsyncPartitionHeld) if it stops here again",
                    table.name,
                    fin.key_text(),
                    chunk.topic(at),
                    at.partition,
                    at.offset
                )))
            }
        }
    }
    Ok((applied, refused))
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
