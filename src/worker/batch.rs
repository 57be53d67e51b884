//! One batch of a partition, in two halves.
//!
//! [`plan`] turns the batch's messages into steps: each is decoded, routed
//! (`route`) and prepared for its table (`apply::prepare`); a message that
//! cannot be used becomes a [`Rejected`] with its [`Fault`], a change that
//! is not for this region a skip with its outcome. No database and no
//! Kafka: it is unit-tested below, with a fixed set of Avro schemas.
//!
//! [`commit`] applies the steps in one transaction, with the conflict
//! check, the dead letters' offsets and the partition's offset row, so the
//! batch's effects and its position are stored together or not at all.
//! If PostgreSQL refuses it, [`commit_in_order`] applies the steps again
//! one by one in source order, to tell a refused change (dead-lettered)
//! from a unique value another partition still holds or a parent row
//! another topic has not brought yet (waited for).
//! [`apply`] drives them, following the verdicts of `failure`.
use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use rdkafka::message::Message;
use tokio::sync::watch;
use tracing::{info, warn};

use super::failure::{self, BatchError, Fault, Verdict};
use super::{Route, Worker};
use crate::apply::{self, Applied, Final, TargetTable};
use crate::change::Decoded;
use crate::clock::{self, Hlc};
use crate::config::{ClockAhead, Config, LateChanges, OnSchemaMismatch, Policy};
use crate::conflict;
use crate::decode::registry::AvroSource;
use crate::decode::{self, DecodeError};
use crate::homing;
use crate::metrics::{self as m, outcome, record, retry};
use crate::offsets;
use crate::route::{self, Decision, HomingOverrides};
use crate::source::dlq::DeadLetter;

/// A message the batch could not use, bound for the dead-letter topic.
pub(crate) struct Rejected<'a, M> {
    pub(crate) msg: &'a M,
    pub(crate) fault: Fault,
    /// Produced to the dead-letter topic already, by an attempt whose
    /// commit then failed: not sent twice, still counted.
    sent: bool,
}

impl<'a, M> Rejected<'a, M> {
    fn new(msg: &'a M, fault: Fault) -> Self {
        Rejected {
            msg,
            fault,
            sent: false,
        }
    }
}

/// One change ready to apply, with the message it came from.
// Rows are nearly every step and live only for one batch: boxing them
// would cost an allocation per change to save a truncate's few bytes.
#[allow(clippy::large_enum_variant)]
pub(crate) enum Step<'a, M> {
    Row {
        table: usize,
        fin: Final,
        msg: &'a M,
        /// Source commit time, for the end-to-end latency.
        ts_ms: i64,
    },
    Truncate {
        table: usize,
        ts_ms: i64,
    },
}

/// What a batch's messages became.
pub(crate) struct Plan<'a, M> {
    pub steps: Vec<Step<'a, M>>,
    pub rejected: Vec<Rejected<'a, M>>,
    /// Changes not for this region, by (outcome, table).
    pub skipped: HashMap<(&'static str, String), u64>,
    /// The same, per message: its outcome (a rebuild tells a relay or an
    /// echo, whose original it replays too, from the others).
    pub skips: Vec<(&'a M, &'static str)>,
    /// The newest source commit time among the batch's changes.
    pub newest_ts_ms: Option<i64>,
}

/// What planning a batch reads: the worker's configuration and tables, and
/// the source region's Avro schemas.
pub(crate) struct Planner<'w> {
    pub config: &'w Config,
    pub tables: &'w [TargetTable],
    pub source_region: &'w str,
    /// Index into `tables`; `None` for a heartbeat topic.
    pub table: Option<usize>,
    pub avro: Option<&'w AvroSource>,
    /// Replaying this region's own capture topic (`regionsync rebuild`):
    /// its rows carry this region's name and are not echoes.
    pub own_topic: bool,
}

impl Planner<'_> {
    /// Decodes, routes and prepares each message of `topic`; `now_ms` is
    /// the time clock skew is measured against.
    pub async fn plan<'a, M: Message>(
        &self,
        topic: &str,
        messages: &'a [M],
        now_ms: i64,
    ) -> Plan<'a, M> {
        let mut plan = Plan {
            steps: Vec::new(),
            rejected: Vec::new(),
            skipped: HashMap::new(),
            skips: Vec::new(),
            newest_ts_ms: None,
        };
        let limit = self.config.apply.max_message_bytes;
        for msg in messages {
            let size = msg.key().map_or(0, |k| k.len()) + msg.payload().map_or(0, |p| p.len());
            if size > limit {
                plan.rejected
                    .push(Rejected::new(msg, Fault::Oversized { size, limit }));
                continue;
            }
            let change = match self.decode(msg).await {
                Ok(Decoded::Change(c)) => c,
                Ok(Decoded::Tombstone { .. }) => {
                    *plan
                        .skipped
                        .entry((outcome::TOMBSTONE, String::new()))
                        .or_default() += 1;
                    plan.skips.push((msg, outcome::TOMBSTONE));
                    continue;
                }
                Err(fault) => {
                    // A fault that is waited out holds the whole batch: the
                    // rest is not decoded now (each lookup of a frozen
                    // registry would wait out its own timeout).
                    let held = fault.retry_reason(self.config).is_some();
                    plan.rejected.push(Rejected::new(msg, fault));
                    if held {
                        return plan;
                    }
                    continue;
                }
            };
            plan.newest_ts_ms = Some(plan.newest_ts_ms.unwrap_or(0).max(change.source_ts_ms));
            let routed = self.table.map(|t| (t, &self.config.tables[t]));
            let table = match route::route_change(routed, topic, &change) {
                Decision::Apply { table } => table,
                Decision::Truncate { table } => {
                    // A truncate from a clock far ahead would delete rows
                    // written after it and refuse every later write.
                    if let Some(fault) =
                        self.clock_ahead(topic, msg, None, change.source_ts_ms, now_ms)
                    {
                        let held = fault.retry_reason(self.config).is_some();
                        plan.rejected.push(Rejected::new(msg, fault));
                        if held {
                            return plan;
                        }
                        continue;
                    }
                    plan.steps.push(Step::Truncate {
                        table,
                        ts_ms: change.source_ts_ms,
                    });
                    continue;
                }
                Decision::Skip(why) => {
                    // A heartbeat topic feeds no table: its label is empty.
                    let name = self
                        .table
                        .map_or(String::new(), |t| self.tables[t].name.clone());
                    *plan.skipped.entry((why, name)).or_default() += 1;
                    plan.skips.push((msg, why));
                    continue;
                }
                Decision::Unconfigured => {
                    let config = routed.map(|(_, c)| c.target.clone()).unwrap_or_default();
                    plan.rejected.push(Rejected::new(
                        msg,
                        Fault::UnconfiguredTable {
                            source_table: format!("{}.{}", change.schema, change.table),
                            topic: topic.to_owned(),
                            target: config,
                        },
                    ));
                    continue;
                }
            };
            let target = &self.tables[table];
            let ts_ms = change.source_ts_ms;
            let fin = match apply::prepare(target, change, self.source_region) {
                Ok(fin) => fin,
                Err(e) => {
                    plan.rejected.push(Rejected::new(msg, Fault::Row(e)));
                    continue;
                }
            };
            let upsert_origin = match &fin {
                Final::Upsert(r) if !self.own_topic => Some(r.origin.as_str()),
                _ => None,
            };
            if let Some(why) = route::admit(
                upsert_origin,
                fin.pin(),
                &target.residency,
                &self.config.region,
            ) {
                if why == outcome::RESIDENCY {
                    // Never written here; logged without the row's contents.
                    info!(topic, partition = msg.partition(), offset = msg.offset(),
                        table = %target.name, pinned_to = fin.pin().unwrap_or_default(),
                        "a row restricted to other regions is not written here");
                }
                *plan.skipped.entry((why, target.name.clone())).or_default() += 1;
                plan.skips.push((msg, why));
                continue;
            }
            let hlc = Hlc(fin.version().0);
            if let Some(fault) = self.clock_ahead(topic, msg, Some(hlc), ts_ms, now_ms) {
                let held = fault.retry_reason(self.config).is_some();
                plan.rejected.push(Rejected::new(msg, fault));
                if held {
                    return plan;
                }
                continue;
            }
            plan.steps.push(Step::Row {
                table,
                fin,
                msg,
                ts_ms,
            });
        }
        plan
    }

    /// The fault of a change (or truncate, without an HLC) dated beyond
    /// `max_clock_skew` by its HLC or its source commit time, unless
    /// `clock_ahead = "apply"`: then it is applied, logged and counted.
    fn clock_ahead<M: Message>(
        &self,
        topic: &str,
        msg: &M,
        hlc: Option<Hlc>,
        ts_ms: i64,
        now_ms: i64,
    ) -> Option<Fault> {
        let limit = self.config.max_clock_skew;
        let by_hlc = hlc.map_or(Duration::ZERO, |h| h.ahead_of(now_ms));
        let by_ts = Duration::from_millis(u64::try_from(ts_ms.saturating_sub(now_ms)).unwrap_or(0));
        let (what, ahead) = if by_hlc >= by_ts {
            ("its HLC", by_hlc)
        } else {
            ("its source commit time (ts_ms)", by_ts)
        };
        if ahead <= limit {
            return None;
        }
        let fault = Fault::ClockAhead { what, ahead, limit };
        if self.config.clock_ahead != ClockAhead::Hold {
            metrics::counter!(m::CLOCK_SKEW_EXCEEDED_TOTAL, "source_region" => self.source_region.to_owned())
                .increment(1);
        }
        if self.config.clock_ahead == ClockAhead::Apply {
            // Applied all the same (the version order stays total), but a
            // clock this far ahead wins every conflict: say so.
            warn!(topic, offset = msg.offset(), source_region = %self.source_region,
                error = %fault, "a change is dated further in the future than max_clock_skew (clock_ahead = apply)");
            return None;
        }
        Some(fault)
    }

    /// Avro (Confluent wire format: magic byte 0) or JSON, by the first byte.
    pub(crate) async fn decode<M: Message>(&self, msg: &M) -> Result<Decoded, Fault> {
        let is_avro = |b: Option<&[u8]>| b.is_some_and(|b| b.first() == Some(&0));
        if !(is_avro(msg.key()) || is_avro(msg.payload())) {
            return decode::decode_json(msg.key(), msg.payload()).map_err(Fault::Decode);
        }
        let avro = self
            .avro
            .ok_or_else(|| Fault::NoRegistry(self.source_region.to_owned()))?;
        let key = avro
            .decode(msg.key())
            .await
            .map_err(|error| Fault::Avro { part: "key", error })?;
        let value = avro
            .decode_envelope(msg.payload())
            .await
            .map_err(|error| Fault::Avro {
                part: "value",
                error,
            })?;
        match (key, value) {
            (Some(key), Some(v)) => {
                decode::decode_avro(key.value, &key.schema, Some((v.value, &*v.schema)))
            }
            (Some(key), None) => decode::decode_avro(key.value, &key.schema, None),
            (None, Some(v)) => decode::decode_avro_keyless(v.value, &v.schema),
            (None, None) => Err(DecodeError::MissingKey),
        }
        .map_err(Fault::Decode)
    }
}

/// Plans, commits and stores the offset of one batch, retrying what
/// `failure` says to retry; returns the next offset.
///
/// Dead letters are produced (and acknowledged) before the transaction
/// opens, so a slow Kafka never holds the batch's row locks; their offsets
/// are stored by the commit that follows.
///
/// A partition told to stop (`stop`'s sender dropped: revoked, shutting
/// down, reloading) while its batch is held gives the batch up between
/// two attempts, with [`Abandoned`]: no statement in flight, nothing of it
/// stored beyond what committed, so the drain does not wait out the hold.
pub(super) async fn apply<M: Message>(
    worker: &Worker,
    route: &Route,
    topic: &str,
    partition: i32,
    messages: &[M],
    stop: &watch::Receiver<()>,
) -> anyhow::Result<i64> {
    // Dead letters produced by an earlier attempt at these changes (under
    // an earlier layout, or a batch given up or whose task panicked): not
    // produced again.
    let at = (worker.group.as_str(), topic, partition);
    let mut sent = UNSTORED_DEAD_LETTERS.produced(at);
    loop {
        let tables = worker.tables();
        let batch = (topic, partition, messages);
        if let Some(next) = apply_on_layout(worker, &tables, route, batch, &mut sent, stop).await? {
            UNSTORED_DEAD_LETTERS.stored(at, next);
            return Ok(next);
        }
        // The table's layout changed under a schema fault: planned anew on
        // it (docs/SCHEMA-CHANGES.md).
    }
}

/// The offsets of dead letters produced (and acknowledged) whose batch has
/// not stored its offset yet, per (consumer group, topic, partition). A
/// batch's dead letters are produced before its transaction; if the batch
/// is then given up (a revocation, a shutdown or reload while it is held),
/// or its task panics, the next attempt at the same changes in this
/// process finds them here and does not produce them again. Process-wide,
/// not the worker's: a reload builds a new worker. (Another process, after
/// a crash or a rebalance, may produce them again; `dlq list` shows one
/// record per change.)
#[derive(Default)]
pub(crate) struct UnstoredDeadLetters(
    std::sync::Mutex<HashMap<(String, String, i32), std::collections::BTreeSet<i64>>>,
);

type PartitionOf<'a> = (&'a str, &'a str, i32);

impl UnstoredDeadLetters {
    /// The offsets produced and not yet stored.
    fn produced(&self, (group, topic, partition): PartitionOf<'_>) -> Vec<i64> {
        let key = (group.to_owned(), topic.to_owned(), partition);
        let map = self.0.lock().expect("dead letters lock");
        map.get(&key)
            .map(|s| s.iter().copied().collect())
            .unwrap_or_default()
    }

    fn add(&self, (group, topic, partition): PartitionOf<'_>, offsets: &[i64]) {
        if offsets.is_empty() {
            return;
        }
        let key = (group.to_owned(), topic.to_owned(), partition);
        let mut map = self.0.lock().expect("dead letters lock");
        map.entry(key).or_default().extend(offsets.iter().copied());
    }

    /// The partition's offset `next` is stored: what is below it is done.
    fn stored(&self, (group, topic, partition): PartitionOf<'_>, next: i64) {
        let key = (group.to_owned(), topic.to_owned(), partition);
        let mut map = self.0.lock().expect("dead letters lock");
        if let Some(set) = map.get_mut(&key) {
            *set = set.split_off(&next);
            if set.is_empty() {
                map.remove(&key);
            }
        }
    }
}

static UNSTORED_DEAD_LETTERS: std::sync::LazyLock<UnstoredDeadLetters> =
    std::sync::LazyLock::new(UnstoredDeadLetters::default);

/// A held batch given up because its partition was told to stop.
#[derive(Debug, thiserror::Error)]
#[error("the held batch was given up: the partition is stopping")]
pub(super) struct Abandoned;

/// Waits out `backoff`, or fails with [`Abandoned`] as soon as the
/// partition is told to stop (its stop sender dropped).
async fn wait_or_stop(
    backoff: &mut failure::Backoff,
    reason: &'static str,
    stop: &watch::Receiver<()>,
) -> anyhow::Result<()> {
    let mut stop = stop.clone();
    tokio::select! {
        () = backoff.wait(reason) => Ok(()),
        () = async { while stop.changed().await.is_ok() {} } => Err(Abandoned.into()),
    }
}

/// Reads table `t`'s layout again after a schema fault; true if it differs
/// from the batch's snapshot (read again by this call, or already by
/// another partition's).
async fn refresh_layout(worker: &Worker, tables: &[TargetTable], t: usize) -> bool {
    if let Err(e) = worker.refresh_layout(t).await {
        warn!(error = %format!("{e:#}"), "reading the table's layout again failed");
    }
    !worker.tables()[t].same_layout(&tables[t])
}

/// [`apply`] on one snapshot of the target tables: `None` when a schema
/// fault found the table's layout changed, so the batch must be planned
/// again.
async fn apply_on_layout<M: Message>(
    worker: &Worker,
    tables: &[TargetTable],
    route: &Route,
    (topic, partition, messages): (&str, i32, &[M]),
    sent: &mut Vec<i64>,
    stop: &watch::Receiver<()>,
) -> anyhow::Result<Option<i64>> {
    let next = messages.last().map(|m| m.offset() + 1).unwrap_or(0);
    let planner = Planner {
        config: &worker.config,
        tables,
        source_region: &route.source_region,
        table: route.table,
        avro: worker.decoders.get(&route.source_region).map(|a| &**a),
        own_topic: false,
    };
    let mut backoff = failure::Backoff::default();
    // A change whose fault is the infrastructure's (the registry) holds
    // the partition: the whole batch is planned again once waited out.
    let Plan {
        mut steps,
        mut rejected,
        skipped,
        newest_ts_ms,
        ..
    } = loop {
        let plan = planner.plan(topic, messages, clock::now_ms()).await;
        let held = plan.rejected.iter().find_map(|r| {
            let reason = r.fault.retry_reason(&worker.config)?;
            Some((reason, r.msg.offset(), r.fault.to_string()))
        });
        let Some((reason, offset, cause)) = held else {
            break plan;
        };
        warn!(topic, partition, offset, reason, error = %cause, retry_in = ?backoff.delay(),
            "holding the partition at a change until the fault is gone");
        worker.hold(topic, partition, cause);
        wait_or_stop(&mut backoff, reason, stop).await?;
        if reason == retry::SCHEMA_MISMATCH {
            if let Some(t) = route.table {
                if refresh_layout(worker, tables, t).await {
                    return Ok(None);
                }
            }
        }
    };
    for r in &mut rejected {
        r.sent = sent.contains(&r.msg.offset());
    }
    let stops = rejected
        .iter()
        .find(|r| failure::message_verdict(&r.fault, &worker.config) == Verdict::Stop);
    if let Some(r) = stops {
        anyhow::bail!(
            "{} at {}/{}/{}: {} (on_error or on_schema_mismatch = stop)",
            r.fault.reason(),
            r.msg.topic(),
            r.msg.partition(),
            r.msg.offset(),
            r.fault
        );
    }
    // A source clock ahead of ours must not make lag read zero for good:
    // the newest source time counts at most as now.
    let newest_ts_ms = newest_ts_ms.map(|t| t.min(clock::now_ms()));
    let mut order = Order::Collapsed;
    // What commits up to a held change applied already.
    let mut counts: HashMap<usize, Applied> = HashMap::new();
    loop {
        let table = route.table.map(|t| tables[t].name.as_str());
        if let Err(e) = send_to_dlq(worker, table, &mut rejected).await {
            warn!(topic, partition, error = %format!("{e:#}"), retry_in = ?backoff.delay(), "dead letters not acknowledged; retrying");
            worker.hold(topic, partition, format!("{e:#}"));
            wait_or_stop(&mut backoff, retry::DLQ_UNAVAILABLE, stop).await?;
            continue;
        }
        sent.extend(rejected.iter().map(|r| r.msg.offset()));
        UNSTORED_DEAD_LETTERS.add((worker.group.as_str(), topic, partition), sent);
        let at = (topic, partition, next, newest_ts_ms);
        let e = match order {
            Order::Collapsed => {
                match commit(worker, tables, &route.source_region, at, &steps).await {
                    Ok(c) => {
                        add_counts(&mut counts, c);
                        break;
                    }
                    Err(e) => e,
                }
            }
            Order::Source => {
                match commit_in_order(worker, tables, &route.source_region, at, &steps).await {
                    Ok(InOrder::Committed(c)) => {
                        add_counts(&mut counts, c);
                        break;
                    }
                    Ok(InOrder::HeldAt {
                        counts: c,
                        step,
                        reason,
                        detail,
                    }) => {
                        if step > 0 {
                            add_counts(&mut counts, c);
                            committed(worker, route, &steps[..step], prefix_ts(&steps[..step]));
                            steps.drain(..step);
                        }
                        let (table, key, offset) = match &steps[0] {
                            Step::Row {
                                table, fin, msg, ..
                            } => (
                                tables[*table].name.as_str(),
                                fin.key_text().to_owned(),
                                msg.offset(),
                            ),
                            Step::Truncate { .. } => unreachable!("a held change is a row"),
                        };
                        if reason == retry::FOREIGN_KEY_WAIT {
                            warn!(topic, partition, offset, table, key, reason, error = %detail, retry_in = ?backoff.delay(),
                            "a foreign key refuses a change in source order: the changes before it are committed, the partition waits at it until the row it needs (applied from another topic or partition) is there");
                        } else {
                            warn!(topic, partition, offset, table, key, reason, error = %detail, retry_in = ?backoff.delay(),
                            "a unique index refuses a change in source order: the changes before it are committed, the partition waits at it until the row holding the value has moved");
                        }
                        worker.hold(
                            topic,
                            partition,
                            format!("{reason}: {table} key {key} at offset {offset}: {detail}"),
                        );
                        wait_or_stop(&mut backoff, reason, stop).await?;
                        order = Order::Collapsed;
                        continue;
                    }
                    Ok(InOrder::Refused(refused)) => {
                        // A schema refusal is dead-lettered by its table's
                        // on_schema_mismatch = "dlq", whatever on_error says.
                        let stops_at = refused
                            .iter()
                            .find(|(_, f)| !matches!(f, Fault::SchemaRefused { .. }));
                        if let (Some((i, fault)), Verdict::Stop) =
                            (stops_at, failure::refused_verdict(worker.config.on_error))
                        {
                            let offset = match &steps[*i] {
                                Step::Row { msg, .. } => msg.offset(),
                                Step::Truncate { .. } => -1,
                            };
                            anyhow::bail!(
                                "applying {topic}/{partition} failed at offset {offset}: {fault} (on_error = stop)"
                            );
                        }
                        // Highest index first, so the others stay where they are.
                        for (i, fault) in refused.into_iter().rev() {
                            if let Step::Row { msg, .. } = steps.remove(i) {
                                rejected.push(Rejected::new(msg, fault));
                            }
                        }
                        order = Order::Collapsed;
                        continue;
                    }
                    Err(e) => e,
                }
            }
        };
        // A value refused for its column's type: the column may have been
        // retyped here since the layout was read. Read again, the batch
        // is planned anew, and the change's own types are checked against
        // the column's (apply::prepare) before any value is called bad.
        if e.is_type_refusal() {
            if let Some(t) = route.table {
                if refresh_layout(worker, tables, t).await {
                    return Ok(None);
                }
            }
        }
        // A schema difference PostgreSQL found (a value this region's
        // column cannot hold): the table's `on_schema_mismatch` decides.
        let on_schema_mismatch = route
            .table
            .map_or(Default::default(), |t| tables[t].on_schema_mismatch);
        match failure::schema_verdict(&e, on_schema_mismatch) {
            Some(Verdict::Stop) => {
                let e = e.into_error();
                anyhow::bail!(
                    "applying {topic}/{partition} failed: {e} (on_schema_mismatch = stop)"
                );
            }
            // Found change by change in source order and dead-lettered.
            Some(Verdict::DeadLetter) if order == Order::Collapsed => {
                order = Order::Source;
                continue;
            }
            _ => {}
        }
        let verdict = failure::batch_verdict(&e);
        if verdict == Verdict::InSourceOrder && order == Order::Collapsed {
            order = Order::Source;
            continue;
        }
        // Retried as it is: an outage or a missing grant, or (in source
        // order) a refusal of no single change's: a deferred unique index
        // at commit, the offset row. Never a loop without a backoff.
        let reason = match &e {
            BatchError::Data(_) => retry::POSTGRES_REFUSED,
            _ => e.retry_reason(),
        };
        let e = e.into_error();
        let db = e
            .downcast_ref::<tokio_postgres::Error>()
            .and_then(|e| e.as_db_error());
        let detail = db.map_or_else(|| format!("{e:#}"), failure::db_error_text);
        warn!(topic, partition, reason, error = %detail, retry_in = ?backoff.delay(), "batch failed; retrying");
        // Not the detail: it quotes row values ("Key (email)=(…)"), and
        // the hold is served by the unauthenticated /readyz.
        let summary = db.map_or_else(
            || format!("{e:#}"),
            |d| format!("{} (SQLSTATE {})", d.message(), d.code().code()),
        );
        worker.hold(topic, partition, format!("PostgreSQL: {summary}"));
        wait_or_stop(&mut backoff, reason, stop).await?;
        order = Order::Collapsed;
        // A column or type changed here: read the layout again.
        if [retry::POSTGRES_SCHEMA, retry::SCHEMA_MISMATCH].contains(&reason) {
            if let Some(t) = route.table {
                if refresh_layout(worker, tables, t).await {
                    return Ok(None);
                }
            }
        }
    }
    worker.release(topic, partition);
    committed(worker, route, &steps, newest_ts_ms);
    let to_reassert: u64 = counts.values().map(|a| a.rejected).sum();
    let table_counts = counts
        .into_iter()
        .map(|(t, applied)| record::TableCounts {
            table: &tables[t].name,
            policy: tables[t].homing.as_ref().map_or(Policy::Lww, |h| h.policy),
            applied,
        })
        .collect();
    record::batch(
        &route.source_region,
        table_counts,
        &skipped,
        rejected.len(),
        messages.len(),
    );
    if to_reassert > 0 {
        super::reassert_rejected(worker).await;
    }
    Ok(Some(next))
}

/// How a batch's changes are applied.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Order {
    /// Collapsed per key, one statement per table and kind: the fast way.
    Collapsed,
    /// Change by change, in the order the source committed them.
    Source,
}

/// What applying a batch in source order came to.
enum InOrder {
    /// Every change applied, the batch's offset stored.
    Committed(HashMap<usize, Applied>),
    /// A unique index or a foreign key refused step `step` (`reason`, a
    /// `retry` label): the steps before it are committed with the offset
    /// of its message (nothing when it is the first), it and the rest are
    /// not.
    HeldAt {
        counts: HashMap<usize, Applied>,
        step: usize,
        reason: &'static str,
        detail: String,
    },
    /// These steps PostgreSQL refuses alone, after the changes before
    /// them: nothing was committed; they are to be dead-lettered.
    Refused(Vec<(usize, Fault)>),
}

fn add_counts(into: &mut HashMap<usize, Applied>, from: HashMap<usize, Applied>) {
    for (t, a) in from {
        *into.entry(t).or_default() += a;
    }
}

/// The newest source time of `steps`, at most now.
fn prefix_ts<M>(steps: &[Step<'_, M>]) -> Option<i64> {
    steps
        .iter()
        .map(|s| match s {
            Step::Row { ts_ms, .. } | Step::Truncate { ts_ms, .. } => *ts_ms,
        })
        .max()
        .map(|t| t.min(clock::now_ms()))
}

/// Bookkeeping after `steps` committed: readiness, lag, latency.
fn committed<M>(worker: &Worker, route: &Route, steps: &[Step<'_, M>], newest_ts_ms: Option<i64>) {
    let now = clock::now_ms();
    worker
        .last_commit_ms
        .store(now, std::sync::atomic::Ordering::Relaxed);
    if let Some(ts) = newest_ts_ms {
        worker
            .lag
            .committed(&route.source_region, ts, route.table.is_none());
    }
    let latency =
        metrics::histogram!(m::END_TO_END_LATENCY, "source_region" => route.source_region.clone());
    for step in steps {
        if let Step::Row { ts_ms, .. } = step {
            latency.record(crate::lag::latency_seconds(now, *ts_ms));
        }
    }
}

/// Where a commit stores its offset: topic, partition, the next offset and
/// the newest source time.
type At<'t> = (&'t str, i32, i64, Option<i64>);

/// What every row of one transaction is checked against: the batch's
/// table layouts, the late-change cutoff and the failover homing read in
/// the transaction.
struct Rules<'r> {
    tables: &'r [TargetTable],
    /// Upserts older than this HLC (now − tombstone grace) are applied only
    /// where their row is stored (`late_changes = skip`).
    late_before: Option<Hlc>,
    homing: HomingOverrides,
}

impl<'r> Rules<'r> {
    /// Read in the batch's transaction: a `rehome` committed before it is
    /// seen by it (DESIGN.md §3, "Failover homing").
    async fn read<M>(
        client: &impl tokio_postgres::GenericClient,
        config: &Config,
        tables: &'r [TargetTable],
        steps: &[Step<'_, M>],
    ) -> Result<Rules<'r>, tokio_postgres::Error> {
        let homed = steps
            .iter()
            .any(|s| matches!(s, Step::Row { table, .. } if tables[*table].homing.is_some()));
        let homing = if homed {
            homing::load(client).await?
        } else {
            HomingOverrides::default()
        };
        let late_before = (config.late_changes == LateChanges::Skip).then(|| {
            let grace_ms = config.tombstone_grace.as_millis() as i64;
            Hlc::new(clock::now_ms() - grace_ms, 0)
        });
        Ok(Rules {
            tables,
            late_before,
            homing,
        })
    }
}

/// One table's changes, collapsed per key, checked for conflicts (which
/// are recorded) and applied, in the caller's transaction.
async fn apply_rows(
    client: &impl deadpool_postgres::GenericClient,
    config: &Config,
    source_region: &str,
    rules: &Rules<'_>,
    t: usize,
    finals: Vec<&Final>,
) -> Result<Applied, tokio_postgres::Error> {
    let table = &rules.tables[t];
    let changes = finals.len() as u64;
    let finals = apply::collapse(finals);
    let superseded = changes - finals.len() as u64;
    let checked = conflict::check(
        client,
        table,
        finals,
        source_region,
        &config.region,
        rules.late_before,
        &rules.homing,
    )
    .await?;
    if checked.late > 0 {
        warn!(table = %table.name, count = checked.late,
            tombstone_grace = ?config.tombstone_grace,
            "changes older than tombstone_grace for keys without a row were not applied (late_changes = skip)");
    }
    let mut applied = Applied {
        superseded,
        conflicts: checked.recorded,
        held: checked.held,
        rejected: checked.rejected,
        classes: checked.classes,
        late: checked.late,
        ..Applied::default()
    };
    applied += apply::apply_finals(client, table, &checked.finals).await?;
    Ok(applied)
}

/// One transaction: the rows, collapsed per key between truncates, and the
/// offset row (with the newest source commit time, so lag survives a
/// restart), which also moves past the dead letters produced before it.
async fn commit<M: Message>(
    worker: &Worker,
    tables: &[TargetTable],
    source_region: &str,
    (topic, partition, next, newest_ts_ms): At<'_>,
    steps: &[Step<'_, M>],
) -> Result<HashMap<usize, Applied>, BatchError> {
    let classify = failure::classify;
    let mut client = worker
        .pool
        .get()
        .await
        .map_err(|e| BatchError::Transient(e.into()))?;
    let started = Instant::now();
    let tx = client.transaction().await.map_err(classify)?;
    tx.batch_execute(apply::session::APPLY_TRANSACTION_SQL)
        .await
        .map_err(classify)?;
    let mut counts: HashMap<usize, Applied> = HashMap::new();
    let rules = Rules::read(&*tx, &worker.config, tables, steps)
        .await
        .map_err(classify)?;
    // Rows between truncates, per table, and their keys.
    let mut pending: HashMap<usize, Vec<&Final>> = HashMap::new();
    let mut pending_keys: HashMap<usize, HashSet<&str>> = HashMap::new();
    let end = Step::Truncate {
        table: usize::MAX,
        ts_ms: 0,
    };
    for step in steps.iter().chain(std::iter::once(&end)) {
        match step {
            Step::Row { table, fin, .. } => {
                // An update that keeps a stored (unsent TOAST) value keeps
                // what the earlier versions of its key leave stored here,
                // if they apply: they are applied first, as one change at a
                // time would be. Collapsed, the update alone would find no
                // row after an insert, or keep a value the batch replaced.
                let keys = pending_keys.entry(*table).or_default();
                if fin.keeps_stored_columns() && keys.contains(fin.key_text()) {
                    keys.clear();
                    let finals = pending.remove(table).unwrap_or_default();
                    let a = apply_rows(&tx, &worker.config, source_region, &rules, *table, finals)
                        .await
                        .map_err(classify)?;
                    *counts.entry(*table).or_default() += a;
                }
                keys.insert(fin.key_text());
                pending.entry(*table).or_default().push(fin);
            }
            Step::Truncate { table, ts_ms } => {
                pending_keys.clear();
                for (t, finals) in pending.drain() {
                    let a = apply_rows(&tx, &worker.config, source_region, &rules, t, finals)
                        .await
                        .map_err(classify)?;
                    *counts.entry(t).or_default() += a;
                }
                if *table != usize::MAX {
                    let a = apply::apply_truncate(&tx, &tables[*table], *ts_ms, source_region)
                        .await
                        .map_err(classify)?;
                    *counts.entry(*table).or_default() += a;
                }
            }
        }
    }
    finish(
        tx,
        worker,
        source_region,
        &rules,
        (topic, partition, next, newest_ts_ms),
        steps,
        &mut counts,
        started,
    )
    .await?;
    Ok(counts)
}

/// The end of every batch transaction that commits: the RPO-window changes
/// among `steps` counted into `counts`, the partition's offset row moved to
/// `next` (with the newest source commit time), the commit, and its time.
#[allow(clippy::too_many_arguments)]
async fn finish<M>(
    tx: deadpool_postgres::Transaction<'_>,
    worker: &Worker,
    source_region: &str,
    rules: &Rules<'_>,
    (topic, partition, next, newest_ts_ms): At<'_>,
    steps: &[Step<'_, M>],
    counts: &mut HashMap<usize, Applied>,
    started: Instant,
) -> Result<(), BatchError> {
    let classify = failure::classify;
    add_rpo(
        counts,
        count_rpo(&tx, worker, (topic, partition), source_region, rules, steps)
            .await
            .map_err(classify)?,
    );
    offsets::store(&tx, &worker.group, topic, partition, next, newest_ts_ms)
        .await
        .map_err(classify)?;
    tx.commit().await.map_err(classify)?;
    metrics::histogram!(m::APPLY_BATCH_SECONDS).record(started.elapsed().as_secs_f64());
    Ok(())
}

/// The RPO-window changes among `steps`, per table: (count, longest span
/// in ms), counted once each in partition order ([`route::RpoCounter`]),
/// after the partition's newest applied commit time as stored. Read in
/// the batch's transaction, and only for a batch with candidates (a
/// change committed before a failover of its region): nothing in the
/// steady state.
async fn count_rpo<M>(
    client: &impl deadpool_postgres::GenericClient,
    worker: &Worker,
    (topic, partition): (&str, i32),
    source_region: &str,
    rules: &Rules<'_>,
    steps: &[Step<'_, M>],
) -> Result<HashMap<usize, (u64, i64)>, tokio_postgres::Error> {
    let rows = || {
        steps.iter().filter_map(|s| match s {
            Step::Row { table, fin, .. } if rules.tables[*table].homing.is_some() => {
                Some((*table, fin))
            }
            _ => None,
        })
    };
    let mut out = HashMap::new();
    if !rows().any(|(_, f)| {
        rules
            .homing
            .rpo_span_ms(source_region, f.committed_ms())
            .is_some()
    }) {
        return Ok(out);
    }
    let stored = offsets::newest_source_time(client, &worker.group, topic, partition).await?;
    let mut counter = route::RpoCounter::after(stored);
    for (t, f) in rows() {
        let (hlc, _) = f.version();
        if counter.change(
            &rules.homing,
            source_region,
            f.committed_ms(),
            f.key_text(),
            hlc,
        ) {
            let span = rules
                .homing
                .rpo_span_ms(source_region, f.committed_ms())
                .unwrap_or(0);
            let slot: &mut (u64, i64) = out.entry(t).or_default();
            slot.0 += 1;
            slot.1 = slot.1.max(span);
        }
    }
    Ok(out)
}

fn add_rpo(counts: &mut HashMap<usize, Applied>, rpo: HashMap<usize, (u64, i64)>) {
    for (t, (n, span)) in rpo {
        let a = counts.entry(t).or_default();
        a.rpo += n;
        a.rpo_span_ms = a.rpo_span_ms.max(span);
    }
}

/// One replayed change (`regionsync dlq replay`) in a transaction of its
/// own, through the same conflict check and version guard as a batch, but
/// without an offset: the partition's stored offset moved past it long
/// ago and must stay where the worker left it. Applied twice, it changes
/// nothing the second time (the guard finds the row as new as it).
pub(crate) async fn apply_replayed<M: Message>(
    pool: &deadpool_postgres::Pool,
    config: &Config,
    tables: &[TargetTable],
    source_region: &str,
    steps: &[Step<'_, M>],
) -> Result<Applied, BatchError> {
    let classify = failure::classify;
    let mut client = pool
        .get()
        .await
        .map_err(|e| BatchError::Transient(e.into()))?;
    let tx = client.transaction().await.map_err(classify)?;
    tx.batch_execute(apply::session::APPLY_TRANSACTION_SQL)
        .await
        .map_err(classify)?;
    let rules = Rules::read(&*tx, config, tables, steps)
        .await
        .map_err(classify)?;
    let mut total = Applied::default();
    for step in steps {
        total += match step {
            Step::Row { table, fin, .. } => {
                apply_rows(&tx, config, source_region, &rules, *table, vec![fin]).await
            }
            Step::Truncate { table, ts_ms } => {
                apply::apply_truncate(&tx, &tables[*table], *ts_ms, source_region).await
            }
        }
        .map_err(classify)?;
    }
    tx.commit().await.map_err(classify)?;
    Ok(total)
}

/// The batch again, one change at a time in source order, each under a
/// savepoint, in one transaction: the order the source committed them in,
/// so a unique index the source satisfied is satisfied here too, as long
/// as the other partitions have caught up. Truncates and the conflict
/// log are applied the same way, so whatever PostgreSQL refuses is found.
///
/// A change refused as data (class 22, 23 but the constraints between
/// rows, the rest of 42) is set aside and the next one tried; then
/// nothing is committed and the caller dead-letters them. A change a
/// unique index or a foreign key refuses (23505, 23P01, 23503, 23001)
/// stops the pass: the changes before it are committed with its offset.
/// A value this region's column cannot hold is set aside the same way
/// when its table's `on_schema_mismatch` is `dlq`, and held otherwise.
async fn commit_in_order<M: Message>(
    worker: &Worker,
    tables: &[TargetTable],
    source_region: &str,
    (topic, partition, next, newest_ts_ms): At<'_>,
    steps: &[Step<'_, M>],
) -> Result<InOrder, BatchError> {
    let classify = failure::classify;
    let mut client = worker
        .pool
        .get()
        .await
        .map_err(|e| BatchError::Transient(e.into()))?;
    let started = Instant::now();
    let mut tx = client.transaction().await.map_err(classify)?;
    tx.batch_execute(apply::session::APPLY_TRANSACTION_SQL)
        .await
        .map_err(classify)?;
    let rules = Rules::read(&*tx, &worker.config, tables, steps)
        .await
        .map_err(classify)?;
    let mut counts: HashMap<usize, Applied> = HashMap::new();
    let mut refused = Vec::new();
    let mut held = None;
    for (i, step) in steps.iter().enumerate() {
        let sp = tx.savepoint("change").await.map_err(classify)?;
        let (table, result) = match step {
            Step::Row { table, fin, .. } => (
                *table,
                apply_rows(
                    &sp,
                    &worker.config,
                    source_region,
                    &rules,
                    *table,
                    vec![fin],
                )
                .await,
            ),
            Step::Truncate { table, ts_ms } => (
                *table,
                apply::apply_truncate(&sp, &tables[*table], *ts_ms, source_region).await,
            ),
        };
        match result {
            Ok(a) => {
                sp.commit().await.map_err(classify)?;
                *counts.entry(table).or_default() += a;
            }
            Err(e) => {
                sp.rollback().await.map_err(classify)?;
                // Kept by tokio-postgres after the rollback: released, so
                // refused changes do not nest subtransactions.
                tx.batch_execute("RELEASE SAVEPOINT change")
                    .await
                    .map_err(classify)?;
                let Step::Row { fin, .. } = step else {
                    return Err(classify(e));
                };
                let (set_aside, schema) = match classify(e) {
                    BatchError::Wait(reason, e) => {
                        held = Some((i, reason, e));
                        break;
                    }
                    BatchError::Data(e) => (e, false),
                    BatchError::Held(reason, e)
                        if reason == retry::SCHEMA_MISMATCH
                            && tables[table].on_schema_mismatch == OnSchemaMismatch::Dlq =>
                    {
                        (e, true)
                    }
                    other => return Err(other),
                };
                let mut detail = set_aside
                    .as_db_error()
                    .map(|d| d.message().to_string())
                    .unwrap_or_else(|| set_aside.to_string());
                // A data exception names no column: find the value.
                if set_aside.code().is_some_and(|c| c.code().starts_with("22")) {
                    let target = &tables[table];
                    if let Some(idx) = apply::refused_column(&mut tx, target, fin)
                        .await
                        .map_err(classify)?
                    {
                        let (column, pg_type) = &target.columns[idx];
                        detail = format!("column {column} ({pg_type}): {detail}");
                    }
                }
                let table = tables[table].name.clone();
                refused.push((
                    i,
                    if schema {
                        Fault::SchemaRefused { table, detail }
                    } else {
                        Fault::RefusedByPostgres { table, detail }
                    },
                ));
            }
        }
    }
    if !refused.is_empty() {
        tx.rollback().await.map_err(classify)?;
        return Ok(InOrder::Refused(refused));
    }
    let Some((step, reason, error)) = held else {
        finish(
            tx,
            worker,
            source_region,
            &rules,
            (topic, partition, next, newest_ts_ms),
            steps,
            &mut counts,
            started,
        )
        .await?;
        return Ok(InOrder::Committed(counts));
    };
    let detail = error.as_db_error().map_or_else(
        || error.to_string(),
        |d| match d.detail() {
            Some(more) => format!("{} ({more})", d.message()),
            None => d.message().to_owned(),
        },
    );
    if step == 0 {
        tx.rollback().await.map_err(classify)?;
    } else {
        let Step::Row { msg, .. } = &steps[step] else {
            unreachable!("a held change is a row")
        };
        // Commits the changes before the held one; the partition resumes at it.
        finish(
            tx,
            worker,
            source_region,
            &rules,
            (topic, partition, msg.offset(), prefix_ts(&steps[..step])),
            &steps[..step],
            &mut counts,
            started,
        )
        .await?;
    }
    Ok(InOrder::HeldAt {
        counts,
        step,
        reason,
        detail,
    })
}

/// Produces the rejected messages to the dead-letter topic and waits for
/// the broker's acknowledgement (before the offset moves past them).
async fn send_to_dlq<M: Message>(
    worker: &Worker,
    table: Option<&str>,
    rejected: &mut [Rejected<'_, M>],
) -> anyhow::Result<()> {
    for r in rejected.iter_mut().filter(|r| !r.sent) {
        let error = r.fault.to_string();
        worker
            .dlq
            .send(&DeadLetter {
                topic: r.msg.topic(),
                partition: r.msg.partition(),
                offset: r.msg.offset(),
                key: r.msg.key(),
                payload: r.msg.payload(),
                reason: r.fault.reason(),
                error: &error,
                table,
            })
            .await?;
        r.sent = true;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use apache_avro::types::Value as AvroValue;
    use apache_avro::writer::datum::GenericDatumWriter;
    use apache_avro::Schema;
    use rdkafka::message::OwnedMessage;
    use rdkafka::Timestamp;
    use serde_json::json;

    use super::*;
    use crate::decode::registry::FixedSchemas;
    use crate::metrics::reason;

    const TOPIC: &str = "us-east-1.cdc.public.users";

    fn config() -> Config {
        let mut config = super::super::test_config("");
        config.apply.max_message_bytes = 4096;
        config
    }

    fn tables() -> Vec<TargetTable> {
        vec![TargetTable::for_tests(
            "public.users",
            &[
                ("id", "bigint"),
                ("name", "text"),
                ("hlc", "bigint"),
                ("origin_region", "text"),
            ],
        )]
    }

    fn message(offset: i64, key: Option<Vec<u8>>, value: Option<Vec<u8>>) -> OwnedMessage {
        OwnedMessage::new(
            value,
            key,
            TOPIC.into(),
            Timestamp::NotAvailable,
            0,
            offset,
            None,
        )
    }

    /// A schemaless JSON change of `users` (JsonConverter without schemas).
    fn json_change(
        offset: i64,
        op: &str,
        table: &str,
        origin: Option<&str>,
        ts_ms: i64,
        origin_region: &str,
    ) -> OwnedMessage {
        let row =
            json!({"id": 7, "name": "Zoë", "hlc": 1_000_i64 << 16, "origin_region": origin_region});
        let value = json!({
            "op": op,
            "before": if op == "d" { row.clone() } else { json!(null) },
            "after": if op == "d" || op == "t" { json!(null) } else { row },
            "source": {"ts_ms": ts_ms, "schema": "public", "table": table, "origin": origin},
        });
        let key = (op != "t").then(|| serde_json::to_vec(&json!({"id": 7})).unwrap());
        message(offset, key, Some(serde_json::to_vec(&value).unwrap()))
    }

    async fn plan_of(
        messages: &[OwnedMessage],
        table: Option<usize>,
        avro: Option<&AvroSource>,
    ) -> (
        Vec<String>,
        Vec<&'static str>,
        HashMap<(&'static str, String), u64>,
    ) {
        let (config, tables) = (config(), tables());
        let planner = Planner {
            config: &config,
            tables: &tables,
            source_region: "us-east-1",
            table,
            avro,
            own_topic: false,
        };
        let plan = planner.plan(TOPIC, messages, 0).await;
        let steps = plan
            .steps
            .iter()
            .map(|s| match s {
                Step::Row { fin, msg, .. } => {
                    format!("{} {:?} @{}", msg.offset(), fin.key_text(), fin.version().0)
                }
                Step::Truncate { ts_ms, .. } => format!("truncate {ts_ms}"),
            })
            .collect();
        let rejected = plan.rejected.iter().map(|r| r.fault.reason()).collect();
        (steps, rejected, plan.skipped)
    }

    #[test]
    fn a_dead_letter_produced_by_a_batch_given_up_is_not_produced_again() {
        let memory = UnstoredDeadLetters::default();
        let p = ("g", "us-east-1.cdc.public.users", 2);
        // An attempt produced the dead letters of offsets 5 and 8, then
        // was given up before its commit.
        memory.add(p, &[5, 8]);
        assert_eq!(
            memory.produced(p),
            vec![5, 8],
            "the next attempt skips them"
        );
        assert!(memory
            .produced(("g", "us-east-1.cdc.public.users", 3))
            .is_empty());
        assert!(memory
            .produced(("other", "us-east-1.cdc.public.users", 2))
            .is_empty());
        // A held change at 7 committed what was before it: 8 still waits.
        memory.stored(p, 7);
        assert_eq!(memory.produced(p), vec![8]);
        memory.stored(p, 9);
        assert!(memory.produced(p).is_empty(), "forgotten once stored");
        assert!(memory.0.lock().unwrap().is_empty());
    }

    #[tokio::test]
    async fn a_batch_is_planned_change_by_change() {
        let messages = vec![
            json_change(10, "c", "users", None, 5, "us-east-1"),
            // Relayed by us-east-1's worker: skipped.
            json_change(11, "u", "users", Some("regionsync_3"), 6, "ap-south-1"),
            // This region's own change, copied back: skipped.
            json_change(12, "u", "users", None, 7, "eu-west-1"),
            // An event of another table on this table's topic.
            json_change(13, "c", "orders", None, 8, "us-east-1"),
            json_change(14, "t", "users", None, 9, "us-east-1"),
            // Compaction's tombstone after a delete.
            message(15, Some(b"{\"id\": 7}".to_vec()), None),
            message(
                16,
                Some(b"{\"id\": 7}".to_vec()),
                Some(b"{not json".to_vec()),
            ),
            message(17, None, Some(vec![b' '; 5000])),
            json_change(18, "d", "users", None, 10, "us-east-1"),
        ];
        let (steps, rejected, skipped) = plan_of(&messages, Some(0), None).await;
        let hlc = 1_000_i64 << 16;
        assert_eq!(
            steps,
            vec![
                format!("10 \"7\" @{hlc}"),
                "truncate 9".to_string(),
                // A delete is versioned just after the row it removes.
                format!("18 \"7\" @{}", hlc + 1),
            ]
        );
        assert_eq!(
            rejected,
            vec![
                reason::UNCONFIGURED_TABLE,
                reason::NOT_JSON,
                reason::OVERSIZED
            ]
        );
        let users = "public.users".to_string();
        assert_eq!(skipped[&(outcome::RELAY, users.clone())], 1);
        assert_eq!(skipped[&(outcome::ECHO, users)], 1);
        assert_eq!(skipped[&(outcome::TOMBSTONE, String::new())], 1);
        assert_eq!(skipped.len(), 3);
    }

    #[tokio::test]
    async fn a_clock_far_ahead_is_held_dead_lettered_or_applied_as_configured() {
        use crate::config::ClockAhead;
        let now = 1_000_000_000_i64;
        // A change whose source time is an hour ahead, then a truncate two
        // hours ahead, then a change of now.
        let messages = vec![
            json_change(1, "c", "users", None, now + 3_600_000, "us-east-1"),
            json_change(2, "t", "users", None, now + 7_200_000, "us-east-1"),
            json_change(3, "c", "users", None, now, "us-east-1"),
        ];
        let tables = tables();
        let run = |mode: ClockAhead| {
            let mut config = config();
            config.clock_ahead = mode;
            let (tables, messages) = (&tables, &messages);
            async move {
                let planner = Planner {
                    config: &config,
                    tables,
                    source_region: "us-east-1",
                    table: Some(0),
                    avro: None,
                    own_topic: false,
                };
                let plan = planner.plan(TOPIC, messages, now).await;
                let rejected: Vec<(i64, &'static str, bool)> = plan
                    .rejected
                    .iter()
                    .map(|r| {
                        let held = r.fault.retry_reason(&config).is_some();
                        (r.msg.offset(), r.fault.reason(), held)
                    })
                    .collect();
                (plan.steps.len(), rejected)
            }
        };
        // Held: planning stops at the first, nothing is applied.
        assert_eq!(
            run(ClockAhead::Hold).await,
            (0, vec![(1, reason::CLOCK_AHEAD, true)])
        );
        // Dead-lettered: both, and the change of now is applied.
        assert_eq!(
            run(ClockAhead::Dlq).await,
            (
                1,
                vec![
                    (1, reason::CLOCK_AHEAD, false),
                    (2, reason::CLOCK_AHEAD, false)
                ]
            )
        );
        // Applied all the same (counted and logged).
        assert_eq!(run(ClockAhead::Apply).await, (3, vec![]));
    }

    #[tokio::test]
    async fn a_heartbeat_topic_feeds_no_table() {
        let messages = vec![json_change(1, "u", "heartbeat", None, 5, "us-east-1")];
        let (steps, rejected, skipped) = plan_of(&messages, None, None).await;
        assert!(steps.is_empty() && rejected.is_empty());
        assert_eq!(skipped[&(outcome::HEARTBEAT, String::new())], 1);
    }

    const KEY_SCHEMA: &str = r#"{"type": "record", "name": "Key", "namespace": "us_east_1.public.users",
        "fields": [{"name": "id", "type": "long"}]}"#;
    const VALUE_SCHEMA: &str = r#"{"type": "record", "name": "Envelope", "namespace": "us_east_1.public.users",
        "fields": [
          {"name": "before", "type": ["null", {"type": "record", "name": "Value", "fields": [
            {"name": "id", "type": "long"}, {"name": "name", "type": ["null", "string"]},
            {"name": "hlc", "type": "long"}, {"name": "origin_region", "type": "string"}]}]},
          {"name": "after", "type": ["null", "Value"]},
          {"name": "source", "type": {"type": "record", "name": "Source", "namespace": "io.debezium.connector.postgresql",
            "fields": [{"name": "ts_ms", "type": "long"}, {"name": "schema", "type": "string"},
                       {"name": "table", "type": "string"}, {"name": "origin", "type": ["null", "string"]}]}},
          {"name": "op", "type": "string"}]}"#;

    /// The same change as `json_change(offset, "c", "users", None, 5, "us-east-1")`,
    /// in Avro's wire format with schema ids 1 (key) and 2 (value).
    fn avro_change(offset: i64) -> OwnedMessage {
        let wire = |id: u32, schema: &str, value: AvroValue| {
            let schema = Schema::parse_str(schema).unwrap();
            let mut bytes = vec![0];
            bytes.extend(id.to_be_bytes());
            let datum = GenericDatumWriter::builder(&schema)
                .build()
                .and_then(|w| w.write_value_to_vec(value))
                .unwrap();
            bytes.extend(datum);
            bytes
        };
        let key = AvroValue::Record(vec![("id".into(), AvroValue::Long(7))]);
        let row = AvroValue::Record(vec![
            ("id".into(), AvroValue::Long(7)),
            (
                "name".into(),
                AvroValue::Union(1, Box::new(AvroValue::String("Zoë".into()))),
            ),
            ("hlc".into(), AvroValue::Long(1_000 << 16)),
            (
                "origin_region".into(),
                AvroValue::String("us-east-1".into()),
            ),
        ]);
        let value = AvroValue::Record(vec![
            (
                "before".into(),
                AvroValue::Union(0, Box::new(AvroValue::Null)),
            ),
            ("after".into(), AvroValue::Union(1, Box::new(row))),
            (
                "source".into(),
                AvroValue::Record(vec![
                    ("ts_ms".into(), AvroValue::Long(5)),
                    ("schema".into(), AvroValue::String("public".into())),
                    ("table".into(), AvroValue::String("users".into())),
                    (
                        "origin".into(),
                        AvroValue::Union(0, Box::new(AvroValue::Null)),
                    ),
                ]),
            ),
            ("op".into(), AvroValue::String("c".into())),
        ]);
        message(
            offset,
            Some(wire(1, KEY_SCHEMA, key)),
            Some(wire(2, VALUE_SCHEMA, value)),
        )
    }

    fn registry(with: &[(u32, &str)]) -> AvroSource {
        let mut schemas = FixedSchemas::default();
        for (id, text) in with {
            schemas.0.insert(*id, Schema::parse_str(text).unwrap());
        }
        AvroSource::with_schemas(schemas)
    }

    #[tokio::test]
    async fn avro_and_json_plan_the_same_step() {
        let avro = registry(&[(1, KEY_SCHEMA), (2, VALUE_SCHEMA)]);
        let (config, tables) = (config(), tables());
        let planner = Planner {
            config: &config,
            tables: &tables,
            source_region: "us-east-1",
            table: Some(0),
            avro: Some(&avro),
            own_topic: false,
        };
        let from_json = [json_change(1, "c", "users", None, 5, "us-east-1")];
        let from_avro = [avro_change(1)];
        let (a, b) = (
            planner.plan(TOPIC, &from_json, 0).await,
            planner.plan(TOPIC, &from_avro, 0).await,
        );
        let fin = |p: &Plan<'_, OwnedMessage>| match &p.steps[..] {
            [Step::Row { fin, .. }] => fin.clone(),
            _ => panic!("one row step expected"),
        };
        assert_eq!(fin(&a), fin(&b));
        assert_eq!(a.newest_ts_ms, b.newest_ts_ms);
    }

    #[tokio::test]
    async fn avro_without_its_schema_is_a_registry_fault() {
        let messages = [avro_change(1)];
        let (_, rejected, _) = plan_of(&messages, Some(0), Some(&registry(&[]))).await;
        assert_eq!(rejected, vec![reason::UNKNOWN_SCHEMA]);
        let (_, rejected, _) = plan_of(&messages, Some(0), None).await;
        assert_eq!(rejected, vec![reason::NO_REGISTRY]);
        // A datum cut short is the message's fault.
        let mut cut = avro_change(1);
        let payload = cut.payload().unwrap();
        let cut_payload = payload[..payload.len() - 3].to_vec();
        cut = message(1, cut.key().map(<[u8]>::to_vec), Some(cut_payload));
        let messages = [cut];
        let full = registry(&[(1, KEY_SCHEMA), (2, VALUE_SCHEMA)]);
        let (_, rejected, _) = plan_of(&messages, Some(0), Some(&full)).await;
        assert_eq!(rejected, vec![reason::BAD_AVRO]);
    }
}
