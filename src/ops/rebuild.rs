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
use std::time::Instant;

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
    chunk_changes: usize,
) -> anyhow::Result<()> {
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
        return Ok(());
    }
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
    let replayed = rebuild::replay(
        config,
        &pool,
        &targets,
        &feeds,
        spans,
        chunk_changes.max(1),
        &on_progress,
    )
    .await?;
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
            chunk_changes.max(1),
        )
        .await?;
        let secs = started.elapsed().as_secs_f64();
        let tables: Vec<&str> = pending.iter().map(|t| names[*t].as_str()).collect();
        println!(
            "rebuilt {} beside the live table(s) and swapped in: {} changes replayed from {} topic(s) in {secs:.1}s ({:.0}/s), \
             {} more caught up to the worker's offsets, {} rows and {} deletes of this region carried over from the live table(s); \
             {} written, {} older than the stored version, {} refused (the worker dead-lettered them)",
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
        );
        return Ok(());
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
        "rebuilt {}: {} changes replayed from {} topic(s) in {secs:.1}s ({:.0}/s); {} written, {} older than the stored version, {} refused (the worker dead-lettered them)",
        tables.join(", "),
        replayed.messages,
        found.len(),
        replayed.messages as f64 / secs.max(0.001),
        replayed.applied.applied,
        replayed.applied.stale,
        replayed.refused,
    );
    Ok(())
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
    // Not a shadow rebuild (any earlier one's start row goes).
    tx.execute(
        "DELETE FROM regionsync.offsets WHERE consumer_group = $1 AND topic = $2 AND partition = -2",
        &[&group, &rebuild::marker_topic(&table.name)],
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
    /// This region's rows and deletes taken from the live table.
    carried_rows: u64,
    carried_deletes: u64,
}

/// How long the swap waits for the live tables' lock.
const SWAP_LOCK_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

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
        for (partition, high) in rebuild::partition_ends(consumer, &f.topic)? {
            let next = offsets::load(client, &group, &f.topic, partition)
                .await?
                .unwrap_or(0);
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
async fn swap_in(
    config: &Config,
    pool: &deadpool_postgres::Pool,
    (loaded, targets): (&[TargetTable], &[TargetTable]),
    feeds: &[Feed],
    pending: &[usize],
    chunk_changes: usize,
) -> anyhow::Result<Swapped> {
    let group = rebuild::group(config);
    let consumer = rebuild::consumer(config)?;
    let mut done = Swapped::default();
    // Outside the lock: up to the worker's offsets as they are now, so that
    // under it only what the worker applied meanwhile is left.
    let client = pool.get().await?;
    let spans = catch_up_spans(&**client, &consumer, config, feeds).await?;
    drop(client);
    let first = rebuild::replay(
        config,
        pool,
        targets,
        feeds,
        spans,
        chunk_changes,
        &|_, _| {},
    )
    .await?;
    done.caught_up += first.messages;
    done.applied += first.applied;
    done.refused += first.refused;
    let client = pool.get().await?;
    for &t in pending {
        client
            .batch_execute(&format!("ANALYZE {}", targets[t].ident))
            .await?;
    }
    drop(client);

    let mut client = pool.get().await?;
    let tx = client.transaction().await?;
    tx.batch_execute(session::APPLY_TRANSACTION_SQL).await?;
    let mut live: Vec<&str> = pending.iter().map(|t| loaded[*t].ident.as_str()).collect();
    live.sort_unstable();
    let waited = Instant::now();
    // Waits for the transactions writing the tables (the worker's batches
    // among them) to end; every later one waits for this transaction.
    // Bounded: while it waits, every later reader queues behind it.
    tx.batch_execute(&format!(
        "SET LOCAL lock_timeout = '{}ms'; LOCK TABLE {} IN ACCESS EXCLUSIVE MODE; SET LOCAL lock_timeout = 0",
        SWAP_LOCK_TIMEOUT.as_millis(),
        live.join(", ")
    ))
    .await
    .with_context(|| {
        format!(
            "locking the live table(s) for the swap (waited at most {}s: a long transaction on them holds a lock); \
             run the rebuild again: the shadow is kept and caught up again",
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
    let spans = catch_up_spans(&*tx, &consumer, config, feeds).await?;
    let last = rebuild::replay_in(&tx, config, targets, feeds, spans.clone()).await?;
    done.caught_up += last.messages;
    done.applied += last.applied;
    done.refused += last.refused;
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
