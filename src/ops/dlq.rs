//! `regionsync dlq list|replay`: the region's dead-letter topic read back
//! (`source::dlq::read_all`), listed, and its changes sent again through
//! the worker's own decode, route, conflict check and version guard once
//! their cause is fixed (a column widened, a grant given, a table added to
//! the config).
//!
//! A replay never moves a stored offset and never removes a dead letter:
//! the topic stays the record of what was refused. Each change is applied
//! in a transaction of its own under the replication origin, like the
//! worker's writes, so it is a relay to the other regions, never a new
//! original. Replaying twice, or a change already superseded by a newer
//! version of its row, changes nothing: the version guard keeps the newer
//! row (counted as "already applied or older").

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rdkafka::message::OwnedMessage;
use rdkafka::Timestamp;

use crate::apply::{session, Applied, TargetTable};
use crate::config::Config;
use crate::decode::registry::{AvroError, AvroSource};
use crate::ops::progress::Bars;
use crate::source::dlq::{self, StoredLetter};
use crate::worker::batch::{self, Planner};
use crate::worker::failure::BatchError;

/// Which dead letters a command reads.
#[derive(Clone, Debug, Default)]
pub struct Filter {
    /// Only this reason label (`regionsync.reason`).
    pub reason: Option<String>,
    /// Only this target table (schema.table).
    pub table: Option<String>,
    /// Only those dead-lettered at or after this time (ms since the epoch).
    pub since_ms: Option<i64>,
}

/// `--since`: an RFC 3339 time (`2026-12-06T18:00:00Z`) or a duration
/// back from `now` (`90m`, `2h`, `1d`); ms since the epoch.
pub fn parse_since(s: &str, now: SystemTime) -> Result<i64, String> {
    let at = match humantime::parse_duration(s) {
        Ok(ago) => now.checked_sub(ago).unwrap_or(UNIX_EPOCH),
        Err(_) => humantime::parse_rfc3339_weak(s).map_err(|_| {
            format!("--since {s}: neither a time (2026-12-06T18:00:00Z) nor a duration (90m, 2h)")
        })?,
    };
    Ok(at
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64))
}

/// One dead letter as listed.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Listed {
    pub reason: String,
    /// The target table (the header, else the config's table of its topic).
    pub table: Option<String>,
    /// The original key, readable: a JSON key's fields; an Avro key decoded
    /// through its region's schema registry, as the worker does (in hex
    /// only if the registry cannot give its schema).
    pub key: String,
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    /// When it was dead-lettered, RFC 3339, and in ms since the epoch.
    pub dead_lettered_at: Option<String>,
    pub dead_lettered_at_ms: Option<i64>,
    pub error: String,
    /// Its place in the dead-letter topic.
    pub dlq_partition: i32,
    pub dlq_offset: i64,
}

/// The key bytes as an operator reads them: a JSON key's payload
/// (without the converter's schema), an Avro key (magic byte 0) in hex.
pub fn key_text(key: Option<&[u8]>) -> String {
    let Some(key) = key else {
        return "(no key)".into();
    };
    if key.first() == Some(&0) {
        let hex: String = key.iter().take(64).map(|b| format!("{b:02x}")).collect();
        let more = if key.len() > 64 { "…" } else { "" };
        return format!("avro:{hex}{more}");
    }
    match serde_json::from_slice::<serde_json::Value>(key) {
        Ok(serde_json::Value::Object(mut o)) if o.contains_key("payload") => o
            .remove("payload")
            .map(|p| p.to_string())
            .unwrap_or_default(),
        Ok(v) => v.to_string(),
        Err(_) => String::from_utf8_lossy(key).into_owned(),
    }
}

/// [`key_text`], with an Avro key decoded through `avro` (its source
/// region's registry) into its fields as JSON; hex, saying why, if the
/// registry cannot give its schema. A registry that could not be reached
/// is put in `down` and not asked again: a listing of many letters while
/// it is down would otherwise wait its timeout once per letter.
async fn readable_key(
    key: Option<&[u8]>,
    avro: Option<&AvroSource>,
    down: &mut Option<String>,
) -> String {
    let (Some(bytes), Some(avro)) = (key, avro) else {
        return key_text(key);
    };
    if bytes.first() != Some(&0) {
        return key_text(key);
    }
    if let Some(why) = down {
        return format!("{} (schema registry: {why})", key_text(key));
    }
    match avro.decode(Some(bytes)).await {
        Ok(Some(datum)) => match serde_json::Value::try_from(datum.value) {
            Ok(v) => v.to_string(),
            Err(e) => format!("{} (not shown as JSON: {e})", key_text(key)),
        },
        Ok(None) => key_text(key),
        Err(e @ AvroError::Registry(_)) => {
            *down = Some(e.to_string());
            format!("{} (schema registry: {e})", key_text(key))
        }
        Err(e) => format!("{} (schema registry: {e})", key_text(key)),
    }
}

/// A decoder per source region that has a schema registry.
fn decoders(config: &Config) -> anyhow::Result<HashMap<String, Arc<AvroSource>>> {
    let mut decoders = HashMap::new();
    for region in config.source_regions() {
        if let Some(url) = config.registry_for(&region) {
            decoders.insert(region, Arc::new(AvroSource::with_settings(url, config)?));
        }
    }
    Ok(decoders)
}

/// Where a mirrored topic's changes go: source region and table index.
fn routes(config: &Config) -> HashMap<String, (String, Option<usize>)> {
    config
        .mirrored_topics()
        .into_iter()
        .map(|(topic, region, table)| (topic, (region, table)))
        .collect()
}

fn table_name(config: &Config, t: usize) -> String {
    let (s, n) = config.tables[t].target_parts();
    format!("{s}.{n}")
}

/// The dead letters that pass `filter`, oldest first per DLQ partition,
/// with the table each belongs to. Messages of the topic that are not
/// dead letters are reported on standard error and left out.
pub async fn read(config: &Config, filter: &Filter) -> anyhow::Result<Vec<(StoredLetter, Listed)>> {
    let routes = routes(config);
    let decoders = decoders(config)?;
    // Per source region: why its registry could not be reached, once it
    // could not.
    let mut registry_down: HashMap<String, Option<String>> = HashMap::new();
    let mut out = Vec::new();
    for letter in dlq::read_all(config).await? {
        let letter = match letter {
            Ok(l) => l,
            Err(why) => {
                tracing::warn!("{why}; left out");
                continue;
            }
        };
        let table = letter.table.clone().or_else(|| {
            routes
                .get(&letter.topic)
                .and_then(|(_, t)| t.map(|t| table_name(config, t)))
        });
        let keep = filter.reason.as_ref().is_none_or(|r| *r == letter.reason)
            && filter
                .table
                .as_ref()
                .is_none_or(|t| table.as_ref() == Some(t))
            && filter
                .since_ms
                .is_none_or(|s| letter.at_ms.is_some_and(|at| at >= s));
        if !keep {
            continue;
        }
        let region = routes.get(&letter.topic).map(|(region, _)| region);
        let key = readable_key(
            letter.key.as_deref(),
            region.and_then(|r| decoders.get(r)).map(|a| &**a),
            registry_down
                .entry(region.cloned().unwrap_or_default())
                .or_default(),
        )
        .await;
        let listed = Listed {
            reason: letter.reason.clone(),
            table,
            key,
            topic: letter.topic.clone(),
            partition: letter.partition,
            offset: letter.offset,
            dead_lettered_at: letter.at_ms.map(|ms| {
                humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_millis(ms as u64))
                    .to_string()
            }),
            dead_lettered_at_ms: letter.at_ms,
            error: letter.error.clone(),
            dlq_partition: letter.dlq_partition,
            dlq_offset: letter.dlq_offset,
        };
        out.push((letter, listed));
    }
    Ok(out)
}

/// `dlq list`: one line per dead letter (time, reason, table, key, the
/// original topic/partition/offset, then the error indented), or a JSON
/// array with `--json`.
pub async fn list(config: &Config, filter: &Filter, json: bool) -> anyhow::Result<()> {
    let listed: Vec<Listed> = read(config, filter)
        .await?
        .into_iter()
        .map(|(_, l)| l)
        .collect();
    if json {
        println!("{}", serde_json::to_string_pretty(&listed)?);
        return Ok(());
    }
    if listed.is_empty() {
        println!("no dead letters in {}", config.dlq_topic());
    }
    for l in &listed {
        println!(
            "{at}\t{reason}\t{table}\t{key}\t{topic}/{partition}/{offset}\n\t{error}",
            at = l.dead_lettered_at.as_deref().unwrap_or("-"),
            reason = l.reason,
            table = l.table.as_deref().unwrap_or("-"),
            key = l.key,
            topic = l.topic,
            partition = l.partition,
            offset = l.offset,
            error = l.error,
        );
    }
    Ok(())
}

/// What a replay did.
#[derive(Clone, Debug, Default)]
pub struct Replayed {
    /// Dead letters read (after the filter).
    pub letters: u64,
    /// What the changes did: `applied` written, `stale` found a row or
    /// tombstone as new or newer (already applied), conflicts, held, and
    /// `late` not written (older than `tombstone_grace` for a key with no
    /// row, under `late_changes = "skip"`: the command fails on them).
    pub applied: Applied,
    /// Changes not for this region (routing: an echo, residency, a
    /// tombstone).
    pub skipped: u64,
    /// Still refused, each described: (topic/partition/offset, why).
    pub refused: Vec<(String, String)>,
}

/// `dlq replay`: every dead letter that passes `filter`, through the
/// worker's path, one transaction each; what could not be replayed is
/// described in the result.
pub async fn replay(config: &Config, filter: &Filter) -> anyhow::Result<Replayed> {
    let letters = read(config, filter).await?;
    // The apply pool: its sessions run under the replication origin.
    let pool = session::pool(config)?;
    let tables = {
        let client = pool
            .get()
            .await
            .map_err(|e| anyhow::anyhow!(crate::apply::tls::explain_pool(&e, &config.postgres)))?;
        let mut tables: Vec<TargetTable> = Vec::new();
        for t in 0..config.tables.len() {
            tables.push(crate::worker::load_table(&**client, config, t).await?);
        }
        tables
    };
    let routes = routes(config);
    let decoders = decoders(config)?;
    let bars = Bars::new();
    let progress = bars.add("dlq replay", Some(letters.len() as u64), "dead letters");
    let mut done = Replayed {
        letters: letters.len() as u64,
        ..Replayed::default()
    };
    for (letter, _) in letters {
        let at = format!("{}/{}/{}", letter.topic, letter.partition, letter.offset);
        let Some((source_region, table)) = routes.get(&letter.topic) else {
            done.refused.push((
                at,
                format!(
                    "topic {} is not one this config consumes (a table to add to `tables`?)",
                    letter.topic
                ),
            ));
            progress.inc(1);
            continue;
        };
        let msg = OwnedMessage::new(
            letter.payload,
            letter.key,
            letter.topic.clone(),
            Timestamp::NotAvailable,
            letter.partition,
            letter.offset,
            None,
        );
        let planner = Planner {
            config,
            tables: &tables,
            source_region,
            table: *table,
            avro: decoders.get(source_region).map(|a| &**a),
            own_topic: false,
        };
        let messages = [msg];
        let plan = planner
            .plan(&letter.topic, &messages, crate::clock::now_ms())
            .await;
        if let Some(r) = plan.rejected.first() {
            done.refused
                .push((at, format!("{}: {}", r.fault.reason(), r.fault)));
        } else if plan.steps.is_empty() {
            done.skipped += 1;
        } else {
            match batch::apply_replayed(&pool, config, &tables, source_region, &plan.steps).await {
                Ok(applied) => done.applied += applied,
                // PostgreSQL away: stop here, a later run does the rest.
                Err(BatchError::Transient(e)) => {
                    return Err(e.context(format!("replaying {at}")));
                }
                Err(e) => {
                    let e = e.into_error();
                    let detail = e
                        .downcast_ref::<tokio_postgres::Error>()
                        .and_then(|e| e.as_db_error())
                        .map_or_else(|| format!("{e:#}"), |d| d.message().to_owned());
                    done.refused.push((at, format!("PostgreSQL: {detail}")));
                }
            }
        }
        progress.inc(1);
    }
    progress.finish();
    Ok(done)
}

/// `dlq replay` as a command: prints what it did; fails if any dead
/// letter is still refused (its cause is not fixed yet).
pub async fn run_replay(config: &Config, filter: &Filter) -> anyhow::Result<()> {
    let done = replay(config, filter).await?;
    for (at, why) in &done.refused {
        println!("still refused: {at}: {why}");
    }
    let a = &done.applied;
    println!(
        "replayed {} dead letter(s) from {}: {} written, {} already applied or older than the row (version guard), {} late (not written), {} not for this region, {} still refused{}",
        done.letters,
        config.dlq_topic(),
        a.applied,
        a.stale,
        a.late,
        done.skipped,
        done.refused.len(),
        if a.conflicts + a.held > 0 {
            format!(
                "; {} conflict(s) recorded, {} held (see `regionsync conflicts list`)",
                a.conflicts, a.held
            )
        } else {
            String::new()
        }
    );
    if a.late > 0 {
        // Not written, and not already here: saying "done" would lose them
        // silently (a dead letter is usually an insert with no row here).
        anyhow::bail!(
            "{} dead letter(s) not written: older than tombstone_grace for a key with no row here, \
             which late_changes = \"skip\" does not apply (a deleted row could come back). If no \
             such delete happened, replay them with REGIONSYNC_LATE_CHANGES=apply",
            a.late
        );
    }
    if !done.refused.is_empty() {
        anyhow::bail!(
            "{} dead letter(s) still refused: fix the cause and run `dlq replay` again (what applied stays applied)",
            done.refused.len()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn since_is_a_time_or_a_duration_back() {
        let now = UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        assert_eq!(parse_since("2h", now), Ok(1_800_000_000_000 - 7_200_000));
        assert_eq!(
            parse_since("2027-01-15T08:00:00Z", now),
            Ok(1_800_000_000_000)
        );
        let why = parse_since("yesterday", now).unwrap_err();
        assert!(why.contains("--since yesterday"), "{why}");
    }

    #[test]
    fn keys_are_shown_as_their_fields() {
        assert_eq!(key_text(Some(br#"{"id":7}"#)), r#"{"id":7}"#);
        assert_eq!(
            key_text(Some(br#"{"schema":{"type":"struct"},"payload":{"id":7}}"#)),
            r#"{"id":7}"#
        );
        assert_eq!(key_text(Some(&[0, 0, 0, 0, 1, 14])), "avro:00000000010e");
        assert_eq!(key_text(None), "(no key)");
    }
}
