//! `regionsync rebuild [--table S.T]…`: this region's copy of tables
//! replayed from the change topics (`crate::rebuild`), into the live
//! tables with the worker stopped.
//!
//! Per table: a first run checks that every topic still holds the table's
//! whole history (`rebuild::history_problem`), empties the table (with its
//! tombstones, truncate mark and the rebuild's own offsets) under a
//! replication origin, marks the rebuild as under way, and replays; a run
//! after a kill resumes from the stored offsets; a run after a finished
//! rebuild does nothing (`--restart` starts over).

use std::collections::HashMap;
use std::time::Instant;

use anyhow::Context as _;
use tracing::{info, warn};

use crate::apply::{session, TargetTable};
use crate::config::Config;
use crate::metrics as m;
use crate::offsets;
use crate::ops::progress::{Bars, Progress};
use crate::rebuild::{self, lock, Span};

/// The command.
pub async fn run(
    config: &Config,
    tables: &[String],
    shadow: bool,
    restart: bool,
    chunk_changes: usize,
) -> anyhow::Result<()> {
    if shadow {
        anyhow::bail!(
            "--shadow is not built yet; stop the worker and rebuild into the live tables, \
             or follow docs/RUNBOOK.md (\"a region's copy is lost or suspected wrong\")"
        );
    }
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
    let _lock = lock::take_for_rebuild(config).await?;
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
        match marker {
            Some(1) if !restart => {
                println!(
                    "{}: rebuilt already; nothing to do (--restart rebuilds it again)",
                    names[t]
                )
            }
            Some(0) if !restart => resumed.push(t),
            _ => fresh.push(t),
        }
    }
    let pending: Vec<usize> = fresh.iter().chain(&resumed).copied().collect();
    if pending.is_empty() {
        return Ok(());
    }
    let feeds = rebuild::feeds(config, &pending);

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
        empty(&pool, &loaded[t], &group, &topics).await?;
        info!(table = %names[t], "emptied; replaying");
    }

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
        &loaded,
        &feeds,
        spans,
        chunk_changes.max(1),
        &on_progress,
    )
    .await?;
    for (p, _) in progress.values() {
        p.finish();
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
