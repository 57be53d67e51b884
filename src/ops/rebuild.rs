//! `regionsync rebuild [--table S.T]… [--shadow]`: this region's copy of
//! tables replayed from the change topics (`crate::rebuild`), into the
//! live tables with the worker stopped, or (`--shadow`) into shadow
//! tables while the worker runs, then swapped in (`rebuild::shadow`).
//!
//! Per table: a first run checks that every topic still holds the table's
//! whole history (`rebuild::history_problem`), empties the table (with its
//! tombstones, truncate mark and the rebuild's own offsets) under a
//! replication origin — or, with `--shadow`, creates the empty shadow —
//! marks the rebuild as under way, and replays; a run after a kill resumes
//! from the stored offsets; a run after a finished rebuild does nothing
//! (`--restart` starts over).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use tracing::{info, warn};

use crate::apply::{session, TargetTable};
use crate::config::Config;
use crate::metrics as m;
use crate::offsets;
use crate::ops::progress::{Bars, Progress};
use crate::rebuild::{self, lock, shadow, Feed, Span};

/// The command.
pub async fn run(
    config: &Config,
    tables: &[String],
    shadow: bool,
    restart: bool,
    limits: rebuild::bulk::Limits,
    swap_timeout: Duration,
) -> anyhow::Result<Finished> {
    let names: Vec<String> = config
        .tables
        .iter()
        .map(|t| {
            let (s, n) = t.target_parts();
            format!("{s}.{n}")
        })
        .collect();
    let mut chosen = Vec::new();
    for t in tables {
        match names.iter().position(|n| n == t) {
            Some(i) => chosen.push(i),
            None => anyhow::bail!(
                "--table {t}: not a table of the config (tables: {})",
                names.join(", ")
            ),
        }
    }
    if chosen.is_empty() {
        chosen = (0..names.len()).collect();
    }
    let _single = lock::take_single_rebuild(config).await?;
    // Into the live tables the worker must be stopped; a shadow rebuild
    // runs beside it.
    let _lock = if shadow {
        None
    } else {
        Some(lock::take_for_rebuild(config).await?)
    };
    // The apply pool: its sessions run under a replication origin, so what
    // the rebuild writes is a relay to the other regions, never an original.
    let pool = session::pool(config)?;
    let client = pool
        .get()
        .await
        .map_err(|e| anyhow::anyhow!(crate::apply::tls::explain_pool(&e, &config.postgres)))?;
    let mut loaded = Vec::new();
    for t in &config.tables {
        loaded.push(TargetTable::load(&**client, t, &config.regions).await?);
    }
    let group = rebuild::group(config);

    // Which tables start, resume, or are done.
    let mut fresh = Vec::new();
    let mut resumed = Vec::new();
    for &t in &chosen {
        let marker: Option<i64> = client
            .query_opt(
                "SELECT next_offset FROM regionsync.offsets WHERE consumer_group = $1 AND topic = $2 AND partition = -1",
                &[&group, &rebuild::marker_topic(&names[t])],
            )
            .await
            .context("reading regionsync.offsets (is the schema current? `regionsync setup` updates it)")?
            .map(|r| r.get(0));
        let shadow_started = shadow_start(&**client, &group, &names[t]).await?;
        match marker {
            Some(1) if !restart => {
                println!(
                    "{}: rebuilt already; nothing to do (--restart rebuilds it again)",
                    names[t]
                )
            }
            Some(0) if !restart => {
                if shadow_started.is_some() != shadow {
                    anyhow::bail!(
                        "{}: a rebuild {} --shadow is under way; run it again the same way to finish it, or start over with --restart",
                        names[t],
                        if shadow { "without" } else { "with" }
                    );
                }
                resumed.push(t)
            }
            _ => fresh.push(t),
        }
    }
    let pending: Vec<usize> = fresh.iter().chain(&resumed).copied().collect();
    if pending.is_empty() {
        return Ok(Finished::default());
    }
    let pending_names: Vec<String> = pending.iter().map(|t| names[*t].clone()).collect();
    let feeds = rebuild::feeds(config, &pending);
    if shadow {
        let mut refused = Vec::new();
        for &t in &pending {
            for why in shadow::refusals(&**client, &loaded[t]).await? {
                refused.push(format!("{}: {why}", names[t]));
            }
            if resumed.contains(&t) && !shadow::exists(&**client, &loaded[t]).await? {
                refused.push(format!(
                    "{}: its shadow table {} is gone; start over with --restart",
                    names[t],
                    shadow::shadow_ident(&loaded[t])
                ));
            }
        }
        if !refused.is_empty() {
            anyhow::bail!(
                "--shadow cannot rebuild by swapping in a renamed copy here:\n  {}\nremove or recreate these around the rebuild, or stop the worker and rebuild without --shadow",
                refused.join("\n  ")
            );
        }
    }

    // Can the topics rebuild the tables?
    let consumer = rebuild::consumer(config)?;
    let mut found = Vec::new();
    let mut problems = Vec::new();
    for f in &feeds {
        match rebuild::inspect(config, &consumer, &f.topic).await? {
            None => {
                warn!(topic = %f.topic, "the topic does not exist: it holds no change to replay")
            }
            Some((retention, parts)) => {
                if fresh.contains(&f.table) {
                    if let Some(p) =
                        rebuild::history_problem(&f.topic, &retention, crate::clock::now_ms())
                    {
                        problems.push(p);
                    }
                }
                found.push((f.topic.clone(), retention, parts));
            }
        }
    }
    if !problems.is_empty() {
        anyhow::bail!(
            "these topics cannot rebuild the table(s):\n  {}\nrebuild through a Debezium incremental snapshot of the source region instead \
             (docs/RUNBOOK.md, \"a region's copy is lost or suspected wrong\")",
            problems.join("\n  ")
        );
    }

    // A fresh start empties the table, its tombstones and truncate mark,
    // and the rebuild's offsets, and marks the rebuild as under way.
    for &t in &fresh {
        let topics: Vec<String> = feeds
            .iter()
            .filter(|f| f.table == t)
            .map(|f| f.topic.clone())
            .collect();
        if shadow {
            start_shadow(&pool, &loaded[t], &group, &topics).await?;
            info!(table = %names[t], shadow = %shadow::shadow_ident(&loaded[t]), "shadow created; replaying into it");
        } else {
            empty(&pool, &loaded[t], &group, &topics).await?;
            info!(table = %names[t], "emptied; replaying");
        }
    }
    // What the replay writes: the shadows of the rebuilt tables, or the
    // tables themselves.
    let targets: Vec<TargetTable> = loaded
        .iter()
        .enumerate()
        .map(|(i, t)| {
            if shadow && pending.contains(&i) {
                shadow::as_shadow(t)
            } else {
                t.clone()
            }
        })
        .collect();

    let bars = Bars::new();
    let mut progress: HashMap<String, (Progress, u64)> = HashMap::new();
    let mut spans = Vec::new();
    for (topic, retention, parts) in &found {
        let mut remaining = 0;
        for (partition, low, high) in parts {
            let stored = offsets::load(&**client, &group, topic, *partition).await?;
            let is_delete = retention
                .cleanup_policy
                .split(',')
                .any(|p| p.trim() == "delete");
            if is_delete && stored.unwrap_or(0) < *low {
                anyhow::bail!(
                    "topic {topic} partition {partition} now starts at offset {low}, past the rebuild's position {}: changes were deleted before they were replayed; \
                     start again with --restart once the topics hold the whole history, or use an incremental snapshot (docs/RUNBOOK.md)",
                    stored.unwrap_or(0)
                );
            }
            let next = stored.unwrap_or(*low).max(*low);
            remaining += (high - next).max(0) as u64;
            spans.push(Span {
                topic: topic.clone(),
                partition: *partition,
                next,
                end: *high,
            });
        }
        metrics::gauge!(m::REBUILD_REMAINING, "topic" => topic.clone()).set(remaining as f64);
        progress.insert(
            topic.clone(),
            (bars.add(topic, Some(remaining), "changes"), remaining),
        );
    }
    drop(client);

    let started = Instant::now();
    let on_progress = |topic: &str, n: u64| {
        if let Some((p, total)) = progress.get(topic) {
            p.inc(n);
            metrics::gauge!(m::REBUILD_REMAINING, "topic" => topic.to_owned())
                .set(total.saturating_sub(p.done()) as f64);
        }
    };
    let replayed =
        rebuild::replay(config, &pool, &targets, &feeds, spans, limits, &on_progress).await?;
    for (p, _) in progress.values() {
        p.finish();
    }

    if shadow {
        let swapped = swap_in(
            config,
            &pool,
            (&loaded, &targets),
            &feeds,
            &pending,
            limits,
            swap_timeout,
        )
        .await?;
        let secs = started.elapsed().as_secs_f64();
        let tables: Vec<&str> = pending.iter().map(|t| names[*t].as_str()).collect();
        println!(
            "rebuilt {} beside the live table(s) and swapped in: {} changes replayed from {} topic(s) in {secs:.1}s ({:.0}/s), \
             {} more caught up to the worker's offsets, {} rows and {} deletes of this region carried over from the live table(s); \
             {} written, {} older than the stored version, {} refused by the decoding or the column checks, {}",
            tables.join(", "),
            replayed.messages,
            found.len(),
            replayed.messages as f64 / secs.max(0.001),
            swapped.caught_up,
            swapped.carried_rows,
            swapped.carried_deletes,
            replayed.applied.applied + swapped.applied.applied,
            replayed.applied.stale + swapped.applied.stale,
            replayed.refused + swapped.refused,
            refused_words(
                replayed.dead_lettered + swapped.dead_lettered,
                replayed.already_dead_lettered + swapped.already_dead_lettered
            ),
        );
        return Ok(Finished {
            dead_lettered: sent_by_rebuild(&pool, &group, &pending_names).await?,
        });
    }
    let client = pool.get().await?;
    for &t in &pending {
        client
            .execute(
                "UPDATE regionsync.offsets SET next_offset = 1, updated_at = now()
                  WHERE consumer_group = $1 AND topic = $2 AND partition = -1",
                &[&group, &rebuild::marker_topic(&names[t])],
            )
            .await?;
    }
    let secs = started.elapsed().as_secs_f64();
    let tables: Vec<&str> = pending.iter().map(|t| names[*t].as_str()).collect();
    println!(
        "rebuilt {}: {} changes replayed from {} topic(s) in {secs:.1}s ({:.0}/s); {} written, {} older than the stored version, {} refused by the decoding or the column checks, {}",
        tables.join(", "),
        replayed.messages,
        found.len(),
        replayed.messages as f64 / secs.max(0.001),
        replayed.applied.applied,
        replayed.applied.stale,
        replayed.refused,
        refused_words(replayed.dead_lettered, replayed.already_dead_lettered),
    );
    Ok(Finished {
        dead_lettered: sent_by_rebuild(&pool, &group, &pending_names).await?,
    })
}

/// The dead letters the rebuild of `tables` sent, over all its runs since
/// its fresh start (a run killed after sending them, and resumed, finds
/// them in the topic and does not send them again): counted as they are
/// sent (`rebuild::refused::SENT_PARTITION`). Not those the worker or an
/// earlier rebuild sent, which a replay of the whole history meets again.
async fn sent_by_rebuild(
    pool: &deadpool_postgres::Pool,
    group: &str,
    tables: &[String],
) -> anyhow::Result<u64> {
    let markers: Vec<String> = tables.iter().map(|t| rebuild::marker_topic(t)).collect();
    let sent: i64 = pool
        .get()
        .await?
        .query_one(
            "SELECT coalesce(sum(next_offset), 0)::bigint FROM regionsync.offsets
              WHERE consumer_group = $1 AND topic = ANY($2) AND partition = $3",
            &[&group, &markers, &rebuild::refused::SENT_PARTITION],
        )
        .await
        .context("reading the count of the rebuild's dead letters")?
        .get(0);
    Ok(sent.max(0) as u64)
}

/// Empties a table for a fresh rebuild, in one transaction under a
/// replication origin (so nothing of it is replicated as an original):
/// TRUNCATE (Debezium does not carry truncates), or DELETE where the role
/// may not truncate; its tombstones and truncate mark; the rebuild's
/// stored offsets of its topics; and marks the rebuild as under way.
async fn empty(
    pool: &deadpool_postgres::Pool,
    table: &TargetTable,
    group: &str,
    topics: &[String],
) -> anyhow::Result<()> {
    let mut client = pool.get().await?;
    let mut tx = client.transaction().await?;
    tx.batch_execute(session::APPLY_TRANSACTION_SQL).await?;
    let sp = tx.savepoint("truncate").await?;
    match sp.batch_execute(&format!("TRUNCATE {}", table.ident)).await {
        Ok(()) => sp.commit().await?,
        Err(e) => {
            sp.rollback().await?;
            warn!(table = %table.name, error = %e, "TRUNCATE refused; emptying with DELETE");
            tx.execute(&format!("DELETE FROM {}", table.ident), &[])
                .await?;
        }
    }
    tx.execute(
        "DELETE FROM regionsync.tombstones WHERE table_name = $1",
        &[&table.name],
    )
    .await?;
    tx.execute(
        "DELETE FROM regionsync.truncations WHERE table_name = $1",
        &[&table.name],
    )
    .await?;
    tx.execute(
        "DELETE FROM regionsync.offsets WHERE consumer_group = $1 AND topic = ANY($2)",
        &[&group, &topics],
    )
    .await?;
    // Not a shadow rebuild (any earlier one's start row goes), and no
    // dead letter sent by it yet.
    tx.execute(
        "DELETE FROM regionsync.offsets WHERE consumer_group = $1 AND topic = $2 AND partition IN (-2, $3)",
        &[&group, &rebuild::marker_topic(&table.name), &rebuild::refused::SENT_PARTITION],
    )
    .await?;
    tx.execute(
        "INSERT INTO regionsync.offsets (consumer_group, topic, partition, next_offset)
         VALUES ($1, $2, -1, 0)
         ON CONFLICT (consumer_group, topic, partition) DO UPDATE SET next_offset = 0, updated_at = now()",
        &[&group, &rebuild::marker_topic(&table.name)],
    )
    .await?;
    tx.commit().await?;
    Ok(())
}

/// When a shadow rebuild of `table` began (ms, the database's clock): its
/// row beside the marker (partition -2); `None`: the rebuild under way (or
/// done) is not a shadow one.
async fn shadow_start(
    client: &impl tokio_postgres::GenericClient,
    group: &str,
    table: &str,
) -> anyhow::Result<Option<i64>> {
    Ok(client
        .query_opt(
            "SELECT next_offset FROM regionsync.offsets WHERE consumer_group = $1 AND topic = $2 AND partition = -2",
            &[&group, &rebuild::marker_topic(table)],
        )
        .await?
        .map(|r| r.get(0)))
}

/// A fresh shadow rebuild of `table`, in one transaction: the empty
/// shadow (a leftover one dropped), the rebuild's offsets of its topics
/// forgotten, the marker set to under way, and the start time stored
/// (partition -2). The live table and its tombstones are not touched.
async fn start_shadow(
    pool: &deadpool_postgres::Pool,
    table: &TargetTable,
    group: &str,
    topics: &[String],
) -> anyhow::Result<()> {
    let mut client = pool.get().await?;
    let tx = client.transaction().await?;
    shadow::create(&tx, table).await?;
    tx.execute(
        "DELETE FROM regionsync.offsets WHERE consumer_group = $1 AND topic = ANY($2)",
        &[&group, &topics],
    )
    .await?;
    let marker = rebuild::marker_topic(&table.name);
    // No dead letter sent by this rebuild yet.
    tx.execute(
        "DELETE FROM regionsync.offsets WHERE consumer_group = $1 AND topic = $2 AND partition = $3",
        &[&group, &marker, &rebuild::refused::SENT_PARTITION],
    )
    .await?;
    tx.execute(
        "INSERT INTO regionsync.offsets (consumer_group, topic, partition, next_offset)
         VALUES ($1, $2, -1, 0), ($1, $2, -2, (extract(epoch FROM clock_timestamp()) * 1000)::bigint)
         ON CONFLICT (consumer_group, topic, partition) DO UPDATE SET next_offset = EXCLUDED.next_offset, updated_at = now()",
        &[&group, &marker],
    )
    .await?;
    tx.commit().await?;
    Ok(())
}

/// What the swap of a shadow rebuild did.
#[derive(Default)]
struct Swapped {
    /// Messages replayed after the build, up to the worker's offsets.
    caught_up: u64,
    applied: crate::apply::Applied,
    refused: u64,
    dead_lettered: u64,
    already_dead_lettered: u64,
    /// This region's rows and deletes taken from the live table.
    carried_rows: u64,
    carried_deletes: u64,
}

impl Swapped {
    fn add(&mut self, r: &rebuild::Replayed) {
        self.applied += r.applied;
        self.refused += r.refused;
        self.dead_lettered += r.dead_lettered;
        self.already_dead_lettered += r.already_dead_lettered;
    }
}

/// How a rebuild that ran to its end went.
#[derive(Clone, Copy, Debug, Default)]
pub struct Finished {
    /// Changes this rebuild dead-lettered (over its runs since its fresh
    /// start; not those found in the dead-letter topic already, sent by
    /// the worker or an earlier rebuild): `regionsync dlq list`.
    pub dead_lettered: u64,
}

/// The summary's words for the changes dead-lettered.
fn refused_words(dead_lettered: u64, already: u64) -> String {
    if dead_lettered + already == 0 {
        return "none dead-lettered".to_owned();
    }
    format!(
        "{} dead-lettered ({dead_lettered} sent now, {already} in the dead-letter topic already: \
         see `regionsync dlq list`)",
        dead_lettered + already
    )
}

/// How long the swap waits for the live tables' lock.
const SWAP_LOCK_TIMEOUT: Duration = Duration::from_secs(10);

/// Attempts at the swap before the rebuild gives up (the shadow is kept).
const SWAP_ATTEMPTS: u32 = 3;

/// Per partition of `feeds`: from the rebuild's stored offset to where
/// the shadow must be to stand for the live table: a mirrored topic's
/// partition to the worker's stored offset (or the rebuild's, if the
/// worker is behind it), this region's own topic to its end.
async fn catch_up_spans(
    client: &impl tokio_postgres::GenericClient,
    consumer: &rdkafka::consumer::StreamConsumer,
    config: &Config,
    feeds: &[Feed],
) -> anyhow::Result<Vec<Span>> {
    let group = rebuild::group(config);
    let worker = config.consumer_group();
    let mut spans = Vec::new();
    for f in feeds {
        for (partition, low, high) in rebuild::partition_ends(consumer, &f.topic)? {
            // Nothing stored: from the first offset, as the build started.
            // A stored offset below it is a gap the reader stops at.
            let next = offsets::load(client, &group, &f.topic, partition)
                .await?
                .unwrap_or(low);
            let end = if f.own {
                high
            } else {
                offsets::load(client, &worker, &f.topic, partition)
                    .await?
                    .unwrap_or(next)
                    .max(next)
            };
            spans.push(Span {
                topic: f.topic.clone(),
                partition,
                next,
                end,
            });
        }
    }
    Ok(spans)
}

/// The end of a shadow rebuild: caught up to the worker, then in one
/// transaction holding the live tables' ACCESS EXCLUSIVE locks (which
/// stop the worker's and the application's writes to them, and their
/// readers, for its length): the last catch-up, this region's writes not
/// yet in its topic, the worker's offsets moved to the shadows' position
/// where it was behind, the swap, and the markers set to done.
///
/// Bounded: the lock is waited for at most [`SWAP_LOCK_TIMEOUT`], and the
/// transaction holding it lasts at most `deadline` (PostgreSQL's
/// `statement_timeout` and `idle_in_transaction_session_timeout` as
/// well as a timer here, so that a stuck Kafka read or a killed process
/// cannot hold it longer). Past either, or at an outage, it is rolled
/// back whole and tried again after a new catch-up outside the lock, up
/// to [`SWAP_ATTEMPTS`] times; then the rebuild fails saying so, with
/// nothing swapped and the shadow kept for the next run.
async fn swap_in(
    config: &Config,
    pool: &deadpool_postgres::Pool,
    (loaded, targets): (&[TargetTable], &[TargetTable]),
    feeds: &[Feed],
    pending: &[usize],
    limits: rebuild::bulk::Limits,
    deadline: Duration,
) -> anyhow::Result<Swapped> {
    let consumer = rebuild::consumer(config)?;
    let mut done = Swapped::default();
    let mut backoff = crate::worker::failure::Backoff::default();
    let mut failures = Vec::new();
    // What the dead-letter topic holds is read now, not under the lock:
    // the whole topic may be large, and a refusal under the lock needs it.
    // (A letter the worker sends meanwhile may then be sent once more by
    // the catch-up under the lock: readers keep one per change.)
    let writer = rebuild::refused::Writer::new(config, pool.clone(), targets);
    loop {
        match writer.load_dead_letters().await {
            Ok(()) => break,
            Err(rebuild::refused::Failed::Retry(reason, e)) => {
                warn!(reason, error = %format!("{e:#}"), retry_in = ?backoff.delay(),
                    "reading the dead-letter topic before the swap failed; again");
                backoff.wait(reason).await;
            }
            Err(rebuild::refused::Failed::Stop(e)) => return Err(e),
        }
    }
    for attempt in 1..=SWAP_ATTEMPTS {
        // Outside the lock: up to the worker's offsets as they are now, so
        // that under it only what the worker applied meanwhile is left.
        let client = pool.get().await?;
        let spans = catch_up_spans(&**client, &consumer, config, feeds).await?;
        drop(client);
        let first =
            rebuild::replay(config, pool, targets, feeds, spans, limits, &|_, _| {}).await?;
        done.caught_up += first.messages;
        done.add(&first);
        if attempt == 1 {
            let client = pool.get().await?;
            for &t in pending {
                client
                    .batch_execute(&format!("ANALYZE {}", targets[t].ident))
                    .await?;
            }
        }
        let mut client = pool.get().await?;
        let pid: i32 = client
            .query_one("SELECT pg_backend_pid()", &[])
            .await?
            .get(0);
        let attempted = tokio::time::timeout(
            deadline,
            swap_locked(
                config,
                &mut client,
                (loaded, targets),
                feeds,
                pending,
                (&writer, &consumer),
                deadline,
            ),
        )
        .await;
        let e = match attempted {
            Ok(Ok(under)) => {
                done.caught_up += under.caught_up;
                done.applied += under.applied;
                done.refused += under.refused;
                done.dead_lettered += under.dead_lettered;
                done.already_dead_lettered += under.already_dead_lettered;
                done.carried_rows += under.carried_rows;
                done.carried_deletes += under.carried_deletes;
                return Ok(done);
            }
            Ok(Err(e)) => e,
            Err(_) => anyhow::anyhow!(
                "the swap did not finish within --swap-timeout ({}s) while holding the lock",
                deadline.as_secs_f64()
            ),
        };
        // Its session ended, not returned to the pool: a statement of it
        // may still run, or wait for the lock (queuing every reader of the
        // table behind it); ending the session rolls back and releases.
        drop(deadpool_postgres::Object::take(client));
        match pool.get().await {
            Ok(other) => {
                if let Err(end) = other
                    // Waits (up to 5 s) for the session to be gone, so that
                    // whether its COMMIT happened can be read next.
                    .execute("SELECT pg_terminate_backend($1, 5000)", &[&pid])
                    .await
                {
                    warn!(pid, error = %end, "ending the failed swap's session (it ends at its timeouts anyway)");
                }
            }
            Err(end) => {
                warn!(pid, error = %end, "ending the failed swap's session (it ends at its timeouts anyway)")
            }
        }
        // The timer or a lost connection may have met the COMMIT itself,
        // which the server then carried out: the swap deletes each
        // table's shadow-start row in its transaction, so their absence
        // says it committed (never catch up into shadows that are gone).
        match swap_committed(pool, config, loaded, pending).await {
            Ok(true) => {
                warn!(error = %format!("{e:#}"), "the swap's session failed as it committed; the swap is done");
                return Ok(done);
            }
            Ok(false) => {}
            Err(unknown) => {
                return Err(e.context(format!(
                    "the swap failed and whether it committed cannot be read ({unknown:#}); \
                     run `rebuild --shadow` again: it finds the swap done or resumes"
                )))
            }
        }
        if !swap_retryable(&e) {
            return Err(e.context(
                "the swap failed and was rolled back: nothing was swapped, the live table(s) are as they were; \
                 the shadow is kept, and `rebuild --shadow` run again resumes and swaps",
            ));
        }
        warn!(attempt, of = SWAP_ATTEMPTS, error = %format!("{e:#}"), retry_in = ?backoff.delay(),
            "the swap was rolled back (nothing swapped); catching up again and retrying");
        failures.push(format!("attempt {attempt}: {e:#}"));
        if attempt < SWAP_ATTEMPTS {
            backoff
                .wait(crate::metrics::retry::POSTGRES_UNAVAILABLE)
                .await;
        }
    }
    anyhow::bail!(
        "the swap of {} did not complete in {SWAP_ATTEMPTS} attempts, each rolled back whole: nothing was swapped, \
         the live table(s) are as they were and the shadow is kept:\n  {}\n\
         run `rebuild --shadow` again (it resumes and catches up) when fewer transactions hold the table(s), \
         or with a longer --swap-timeout",
        pending
            .iter()
            .map(|t| loaded[*t].name.as_str())
            .collect::<Vec<_>>()
            .join(", "),
        failures.join("\n  ")
    )
}

/// Whether the swap of `pending` committed: no table's shadow-start row
/// is left (the swap's transaction deletes them).
async fn swap_committed(
    pool: &deadpool_postgres::Pool,
    config: &Config,
    loaded: &[TargetTable],
    pending: &[usize],
) -> anyhow::Result<bool> {
    let client = pool.get().await?;
    let group = rebuild::group(config);
    for &t in pending {
        if shadow_start(&**client, &group, &loaded[t].name)
            .await?
            .is_some()
        {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Whether a failed swap may succeed when tried again: a lock not got in
/// time, a statement or the transaction cancelled by its timeouts, a
/// deadlock or serialization failure, a lost connection, or an outage met
/// by the last catch-up. Not the swap's own DDL refused, nor a change the
/// rebuild stops at.
fn swap_retryable(e: &anyhow::Error) -> bool {
    if e.chain().any(|c| c.to_string() == rebuild::SWAP_RETRY)
        || e.to_string().starts_with("the swap did not finish within")
    {
        return true;
    }
    match e
        .chain()
        .find_map(|c| c.downcast_ref::<tokio_postgres::Error>())
    {
        Some(pg) => match pg.code() {
            None => true,
            Some(code) => {
                ["55P03", "57014", "40P01", "40001", "25P03", "57P01"].contains(&code.code())
            }
        },
        None => e
            .chain()
            .any(|c| c.downcast_ref::<deadpool_postgres::PoolError>().is_some()),
    }
}

/// One attempt at the swap, in one transaction on `client`, bounded by
/// PostgreSQL's timeouts as `deadline`; committed only whole.
async fn swap_locked(
    config: &Config,
    client: &mut deadpool_postgres::Object,
    (loaded, targets): (&[TargetTable], &[TargetTable]),
    feeds: &[Feed],
    pending: &[usize],
    (writer, consumer): (
        &std::sync::Arc<rebuild::refused::Writer>,
        &rdkafka::consumer::StreamConsumer,
    ),
    deadline: Duration,
) -> anyhow::Result<Swapped> {
    let group = rebuild::group(config);
    let mut done = Swapped::default();
    let mut tx = client.transaction().await?;
    tx.batch_execute(session::APPLY_TRANSACTION_SQL).await?;
    let mut live: Vec<&str> = pending.iter().map(|t| loaded[*t].ident.as_str()).collect();
    live.sort_unstable();
    let waited = Instant::now();
    // Waits for the transactions writing the tables (the worker's batches
    // among them) to end; every later one waits for this transaction.
    // Bounded: while it waits, every later reader queues behind it.
    tx.batch_execute(&format!(
        "SET LOCAL lock_timeout = '{}ms'; LOCK TABLE {} IN ACCESS EXCLUSIVE MODE; SET LOCAL lock_timeout = 0;
         SET LOCAL statement_timeout = '{}ms'; SET LOCAL idle_in_transaction_session_timeout = '{}ms'",
        SWAP_LOCK_TIMEOUT.as_millis(),
        live.join(", "),
        deadline.as_millis(),
        deadline.as_millis()
    ))
    .await
    .with_context(|| {
        format!(
            "locking the live table(s) for the swap (waited at most {}s: a long transaction on them holds a lock)",
            SWAP_LOCK_TIMEOUT.as_secs()
        )
    })?;
    // The worker's offsets of these topics, frozen: a batch of it that
    // wrote nothing to the tables cannot store past them meanwhile.
    let mirrored: Vec<String> = feeds
        .iter()
        .filter(|f| !f.own)
        .map(|f| f.topic.clone())
        .collect();
    tx.query(
        "SELECT 1 FROM regionsync.offsets WHERE consumer_group = $1 AND topic = ANY($2) FOR UPDATE",
        &[&config.consumer_group(), &mirrored],
    )
    .await?;
    let spans = catch_up_spans(&*tx, consumer, config, feeds).await?;
    let last = rebuild::replay_in(&mut tx, writer, config, targets, feeds, spans.clone()).await?;
    done.caught_up += last.messages;
    done.add(&last);
    // The worker continues from the shadows' position: its own where it was
    // ahead of the rebuild (equal now), the rebuild's where it was behind.
    for s in spans
        .iter()
        .filter(|s| mirrored.contains(&s.topic) && s.end > 0)
    {
        offsets::store(
            &tx,
            &config.consumer_group(),
            &s.topic,
            s.partition,
            s.end,
            None,
        )
        .await?;
    }
    for &t in pending {
        // Every own row and delete, whenever stamped: the capture
        // connector may be behind by any amount (paused, a slot lagging, a
        // transaction open long before it committed), and the worker never
        // reads this region's own topic. Only what is newer than the
        // shadow's version is written.
        let (rows, deletes) =
            shadow::carry_own_writes(&tx, &loaded[t], &config.region, 0, 0).await?;
        done.carried_rows += rows;
        done.carried_deletes += deletes;
    }
    for &t in pending {
        shadow::swap(&tx, &loaded[t]).await?;
        tx.execute(
            "UPDATE regionsync.offsets SET next_offset = 1, updated_at = now()
              WHERE consumer_group = $1 AND topic = $2 AND partition = -1",
            &[&group, &rebuild::marker_topic(&loaded[t].name)],
        )
        .await?;
        tx.execute(
            "DELETE FROM regionsync.offsets WHERE consumer_group = $1 AND topic = $2 AND partition = -2",
            &[&group, &rebuild::marker_topic(&loaded[t].name)],
        )
        .await?;
    }
    tx.commit().await.context("committing the swap")?;
    let held = waited.elapsed();
    println!(
        "swapped in {}: the live table(s) were locked for {} ms ({} changes caught up under the lock)",
        live.join(", "),
        held.as_millis(),
        last.messages
    );
    Ok(done)
}
