//! Verify: whether two regions hold the same rows (DESIGN.md §7).
//!
//! Each table is walked in key order in chunks of [`CHUNK_ROWS`] rows of
//! this side; for each chunk both sides compute, inside PostgreSQL, the
//! count and the md5 of the rows' hashes in key order (a row's hash is the
//! md5 of its canonical text: every column, `hlc` and `origin_region`
//! included; `sql::Shape`). A chunk whose checksums differ is bisected
//! (at the middle key of the side with more rows) until a range holds at
//! most [`LEAF_ROWS`] rows a side; those are fetched and compared by key.
//! Nothing is written on either side: the sessions are read-only and
//! every statement runs as its own `REPEATABLE READ` transaction, so each
//! range's checksum comes from one snapshot.
//!
//! Live systems: a key that differs where the newer version (a row's hlc,
//! or for a missing row the absent side's tombstone) is younger than the
//! lag of the side holding the older one may be a change still in flight.
//! It is fetched again once that lag (plus a margin) has passed, up to
//! [`RECHECK_ROUNDS`] times, and reported only if it still differs.
//!
//! Memory is bounded: at most `CHUNK_ROWS` hashes are aggregated per
//! statement (in PostgreSQL), at most `LEAF_ROWS` rows a side are in
//! memory, and at most `max_differences` differences are kept per table
//! (the rest are counted).

pub mod sql;

use std::collections::HashMap;
use std::time::Duration;

use futures::{pin_mut, TryStreamExt};
use serde::Serialize;
use tokio_postgres::types::ToSql;
use tokio_postgres::Client;

use crate::clock;
pub use sql::{Bounds, Column, Shape};

/// Rows of this side per top-level range.
pub const CHUNK_ROWS: i64 = 10_000;
/// A differing range with at most this many rows a side is compared row
/// by row.
pub const LEAF_ROWS: i64 = 256;
/// How often a key that may be in flight is fetched again.
pub const RECHECK_ROUNDS: usize = 5;
/// Added to the measured lag before a key is fetched again.
pub const RECHECK_MARGIN: Duration = Duration::from_secs(2);
/// The lag assumed for a side whose lag cannot be measured (no worker
/// stored a heartbeat in the last minute).
pub const UNMEASURED_LAG: Duration = Duration::from_secs(10);
/// The longest wait for one recheck round.
pub const MAX_RECHECK_WAIT: Duration = Duration::from_secs(120);

/// The session settings of both sides: read-only, one snapshot per
/// statement, and the text forms the canonical row text depends on.
pub const SESSION_SQL: &str = "SET default_transaction_read_only = on;
    SET default_transaction_isolation = 'repeatable read';
    SET DateStyle = 'ISO, YMD'; SET IntervalStyle = 'postgres'; SET TimeZone = 'UTC';
    SET extra_float_digits = 1; SET bytea_output = 'hex'; SET application_name = 'regionsync verify'";

/// One side's version of a key.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Version {
    pub hlc: i64,
    pub origin_region: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// The other side has the row, this side does not.
    MissingHere,
    /// This side has the row, the other does not.
    MissingThere,
    /// Both have it, with different contents.
    Different,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::MissingHere => "missing here",
            Kind::MissingThere => "missing there",
            Kind::Different => "different",
        }
    }
}

/// A key the two sides disagree on.
#[derive(Clone, Debug, Serialize)]
pub struct Difference {
    /// The key as regionsync writes it (tombstones, conflicts).
    pub key: String,
    pub kind: Kind,
    pub here: Option<Version>,
    pub there: Option<Version>,
    /// The key's column values as text, to fetch it again.
    #[serde(skip)]
    key_values: Vec<String>,
    /// When the two versions were read (ms): a newer version within the
    /// lag of that moment may have been in flight then.
    #[serde(skip)]
    seen_at_ms: i64,
}

/// One table's comparison.
#[derive(Clone, Debug, Default, Serialize)]
pub struct TableReport {
    pub table: String,
    pub rows_here: i64,
    pub rows_there: i64,
    /// Differences found beyond `max_differences`, not listed.
    pub more_differences: i64,
    /// Keys fetched again because they might have been in flight.
    pub rechecked: usize,
    /// Of those, the ones that were then equal (not reported).
    pub settled_on_recheck: usize,
    pub differences: Vec<Difference>,
}

impl TableReport {
    pub fn equal(&self) -> bool {
        self.differences.is_empty() && self.more_differences == 0
    }
}

/// What verify is told.
#[derive(Clone, Debug)]
pub struct Options {
    pub max_differences: usize,
    /// The heartbeat topic's name (its mirrored copies end with it), to
    /// measure each side's lag from `regionsync.offsets`.
    pub heartbeat_topic: String,
}

/// One side of the comparison.
pub struct Side<'a> {
    pub client: &'a Client,
    pub label: &'a str,
}

fn params(values: &[String]) -> Vec<&(dyn ToSql + Sync)> {
    values.iter().map(|v| v as &(dyn ToSql + Sync)).collect()
}

/// A key range `lo < key <= hi` (either bound open), as key values.
#[derive(Clone, Debug, Default)]
struct Range {
    lo: Option<Vec<String>>,
    hi: Option<Vec<String>>,
}

impl Range {
    fn bounds(&self) -> Bounds {
        Bounds {
            lo: self.lo.is_some(),
            hi: self.hi.is_some(),
        }
    }

    fn values(&self) -> Vec<String> {
        self.lo
            .iter()
            .chain(self.hi.iter())
            .flatten()
            .cloned()
            .collect()
    }
}

/// Reads `schema.table`'s columns on one side: (name, type, collatable).
pub async fn columns(client: &Client, name: &str) -> anyhow::Result<Vec<Column>> {
    let (schema, table) = name
        .split_once('.')
        .ok_or_else(|| anyhow::anyhow!("{name}: not schema.table"))?;
    let rows = client
        .query(
            "SELECT a.attname::text, format_type(a.atttypid, a.atttypmod), a.attcollation <> 0
               FROM pg_attribute a
               JOIN pg_class c ON c.oid = a.attrelid
               JOIN pg_namespace n ON n.oid = c.relnamespace
              WHERE n.nspname = $1 AND c.relname = $2 AND a.attnum > 0 AND NOT a.attisdropped
              ORDER BY a.attnum",
            &[&schema, &table],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| Column {
            name: r.get(0),
            type_name: r.get(1),
            collatable: r.get(2),
        })
        .collect())
}

/// The shape both sides are compared in: this side's columns, which the
/// other must have with the same types; `Err` names what differs.
pub fn shape(
    name: &str,
    key: &[String],
    here: Vec<Column>,
    there: &[Column],
) -> Result<Shape, String> {
    if here.is_empty() {
        return Err(format!("table {name} does not exist here"));
    }
    if there.is_empty() {
        return Err(format!("table {name} does not exist there"));
    }
    let mut problems = Vec::new();
    for c in &here {
        match there.iter().find(|t| t.name == c.name) {
            None => problems.push(format!("column {} is missing there", c.name)),
            Some(t) if t.type_name != c.type_name => problems.push(format!(
                "column {} is {} here, {} there",
                c.name, c.type_name, t.type_name
            )),
            Some(_) => {}
        }
    }
    for t in there {
        if !here.iter().any(|c| c.name == t.name) {
            problems.push(format!("column {} is missing here", t.name));
        }
    }
    let mut positions = Vec::new();
    for k in key {
        match here.iter().position(|c| &c.name == k) {
            Some(p) => positions.push(p),
            None => problems.push(format!("key column {k} does not exist")),
        }
    }
    for v in ["hlc", "origin_region"] {
        if !here.iter().any(|c| c.name == v) {
            problems.push(format!("no {v} column"));
        }
    }
    if !problems.is_empty() {
        return Err(format!("table {name}: {}", problems.join("; ")));
    }
    let (schema, table) = name.split_once('.').unwrap_or(("public", name));
    Ok(Shape {
        name: name.to_owned(),
        ident: format!(
            "{}.{}",
            crate::apply::quote_ident(schema),
            crate::apply::quote_ident(table)
        ),
        columns: here,
        key: positions,
    })
}

/// How far behind its sources a side's worker is: now − the newest
/// heartbeat source time any worker there stored in the last minute.
/// `None` if no worker stored one.
pub async fn measured_lag(client: &Client, heartbeat_topic: &str) -> Option<Duration> {
    let row = client
        .query_one(
            "SELECT (extract(epoch FROM clock_timestamp()) * 1000)::bigint - max(source_ts_ms)
               FROM regionsync.offsets
              WHERE topic LIKE '%.' || $1 AND updated_at > now() - interval '1 minute'",
            &[&heartbeat_topic],
        )
        .await
        .ok()?;
    let ms: Option<i64> = row.get(0);
    ms.map(|ms| Duration::from_millis(ms.max(0) as u64))
}

/// Compares one table; `progress` is told the rows of this side done.
pub async fn compare_table(
    here: &Side<'_>,
    there: &Side<'_>,
    shape: &Shape,
    options: &Options,
    progress: &dyn Fn(u64),
) -> anyhow::Result<TableReport> {
    let mut report = TableReport {
        table: shape.name.clone(),
        ..TableReport::default()
    };
    let mut found = Found {
        shape,
        max: options.max_differences,
        report: &mut report,
    };
    let mut lo: Option<Vec<String>> = None;
    let mut chunk = here_chunk(here.client, shape, None).await?;
    loop {
        let (count_here, sum_here, last) = chunk;
        let hi = if count_here < CHUNK_ROWS { None } else { last };
        let range = Range {
            lo: lo.clone(),
            hi: hi.clone(),
        };
        let (there_sum, next) = tokio::join!(checksum(there.client, shape, &range), async {
            match &hi {
                Some(h) => Some(here_chunk(here.client, shape, Some(h)).await),
                None => None,
            }
        });
        let (count_there, sum_there) = there_sum?;
        found.report.rows_here += count_here;
        found.report.rows_there += count_there;
        if (count_here, &sum_here) != (count_there, &sum_there) {
            found
                .bisect(here, there, range, count_here, count_there)
                .await?;
        }
        progress(count_here as u64);
        match next {
            Some(n) => {
                chunk = n?;
                lo = hi;
            }
            None => break,
        }
    }
    recheck(here, there, shape, options, &mut report).await?;
    Ok(report)
}

type Chunk = (i64, String, Option<Vec<String>>);

async fn here_chunk(
    client: &Client,
    shape: &Shape,
    lo: Option<&Vec<String>>,
) -> anyhow::Result<Chunk> {
    let values: Vec<String> = lo.cloned().unwrap_or_default();
    let mut p = params(&values);
    p.push(&CHUNK_ROWS);
    let row = client.query_one(&shape.chunk(lo.is_some()), &p).await?;
    Ok((row.get(0), row.get(1), row.get(2)))
}

async fn checksum(client: &Client, shape: &Shape, range: &Range) -> anyhow::Result<(i64, String)> {
    let values = range.values();
    let row = client
        .query_one(&shape.checksum(range.bounds()), &params(&values))
        .await?;
    Ok((row.get(0), row.get(1)))
}

/// One side's row of a key: values, label, hash, version.
struct KeyRow {
    values: Vec<String>,
    label: String,
    hash: String,
    version: Version,
}

fn key_row(r: &tokio_postgres::Row) -> KeyRow {
    KeyRow {
        values: r.get(0),
        label: r.get(1),
        hash: r.get(2),
        version: Version {
            hlc: r.get(3),
            origin_region: r.get(4),
        },
    }
}

/// The differences found so far in one table.
struct Found<'a> {
    shape: &'a Shape,
    max: usize,
    report: &'a mut TableReport,
}

impl Found<'_> {
    fn push(&mut self, mut d: Difference) {
        d.seen_at_ms = clock::now_ms();
        if self.report.differences.len() < self.max {
            self.report.differences.push(d);
        } else {
            self.report.more_differences += 1;
        }
    }

    /// Narrows a differing range down to its differing keys.
    async fn bisect(
        &mut self,
        here: &Side<'_>,
        there: &Side<'_>,
        range: Range,
        count_here: i64,
        count_there: i64,
    ) -> anyhow::Result<()> {
        let shape = self.shape;
        let mut stack = vec![(range, count_here, count_there)];
        while let Some((range, ch, ct)) = stack.pop() {
            if ch == 0 || ct == 0 {
                // Every row of the other side is missing on this one.
                let (side, kind) = if ch == 0 {
                    (there, Kind::MissingHere)
                } else {
                    (here, Kind::MissingThere)
                };
                self.all_missing(side.client, &range, kind).await?;
                continue;
            }
            if ch.max(ct) <= LEAF_ROWS {
                self.compare_rows(here, there, &range).await?;
                continue;
            }
            // Split at the middle key of the side with more rows.
            let (side, n) = if ch >= ct { (here, ch) } else { (there, ct) };
            let values = range.values();
            let offset = n / 2;
            let mut p = params(&values);
            p.push(&offset);
            let mid: Vec<String> = side
                .client
                .query_one(&shape.nth_key(range.bounds()), &p)
                .await?
                .get(0);
            for half in [
                Range {
                    lo: range.lo.clone(),
                    hi: Some(mid.clone()),
                },
                Range {
                    lo: Some(mid.clone()),
                    hi: range.hi.clone(),
                },
            ] {
                let (h, t) = tokio::join!(
                    checksum(here.client, shape, &half),
                    checksum(there.client, shape, &half)
                );
                let (h, t) = (h?, t?);
                if h != t {
                    stack.push((half, h.0, t.0));
                }
            }
        }
        Ok(())
    }

    /// Streams one side's rows of a range the other side has none of.
    async fn all_missing(
        &mut self,
        client: &Client,
        range: &Range,
        kind: Kind,
    ) -> anyhow::Result<()> {
        let shape = self.shape;
        let mut values = range.values();
        values.push(array_literal(&shape.key_names()));
        let rows = client
            .query_raw(&shape.rows(range.bounds()), params(&values))
            .await?;
        pin_mut!(rows);
        while let Some(r) = rows.try_next().await? {
            let row = key_row(&r);
            let (here, there) = match kind {
                Kind::MissingHere => (None, Some(row.version)),
                _ => (Some(row.version), None),
            };
            self.push(Difference {
                key: row.label,
                kind,
                here,
                there,
                key_values: row.values,
                seen_at_ms: 0,
            });
        }
        Ok(())
    }

    /// Fetches a small range from both sides and compares it key by key.
    async fn compare_rows(
        &mut self,
        here: &Side<'_>,
        there: &Side<'_>,
        range: &Range,
    ) -> anyhow::Result<()> {
        let (h, t) = tokio::join!(
            range_rows(here.client, self.shape, range),
            range_rows(there.client, self.shape, range)
        );
        let (h, t) = (h?, t?);
        let mut theirs: HashMap<String, KeyRow> =
            t.into_iter().map(|r| (r.label.clone(), r)).collect();
        for mine in h {
            match theirs.remove(&mine.label) {
                Some(other) if other.hash == mine.hash => {}
                Some(other) => self.push(Difference {
                    key: mine.label,
                    kind: Kind::Different,
                    here: Some(mine.version),
                    there: Some(other.version),
                    key_values: mine.values,
                    seen_at_ms: 0,
                }),
                None => self.push(Difference {
                    key: mine.label,
                    kind: Kind::MissingThere,
                    here: Some(mine.version),
                    there: None,
                    key_values: mine.values,
                    seen_at_ms: 0,
                }),
            }
        }
        let mut rest: Vec<KeyRow> = theirs.into_values().collect();
        rest.sort_by(|a, b| a.label.cmp(&b.label));
        for other in rest {
            self.push(Difference {
                key: other.label,
                kind: Kind::MissingHere,
                here: None,
                there: Some(other.version),
                key_values: other.values,
                seen_at_ms: 0,
            });
        }
        Ok(())
    }
}

/// A `text[]` literal of plain names (bound as text, cast in SQL).
fn array_literal(names: &[String]) -> String {
    let quoted: Vec<String> = names
        .iter()
        .map(|n| format!("\"{}\"", n.replace('\\', "\\\\").replace('"', "\\\"")))
        .collect();
    format!("{{{}}}", quoted.join(","))
}

async fn range_rows(client: &Client, shape: &Shape, range: &Range) -> anyhow::Result<Vec<KeyRow>> {
    let mut values = range.values();
    values.push(array_literal(&shape.key_names()));
    let rows = client
        .query(&shape.rows(range.bounds()), &params(&values))
        .await?;
    Ok(rows.iter().map(key_row).collect())
}

async fn key_now(client: &Client, shape: &Shape, key: &[String]) -> anyhow::Result<Option<KeyRow>> {
    let mut values = key.to_vec();
    values.push(array_literal(&shape.key_names()));
    let row = client
        .query_opt(&shape.row_of_key(), &params(&values))
        .await?;
    Ok(row.as_ref().map(key_row))
}

/// The hlc of a key's tombstone on one side, if any.
async fn tombstone(client: &Client, table: &str, key: &str) -> anyhow::Result<Option<i64>> {
    let row = client
        .query_opt(
            "SELECT hlc FROM regionsync.tombstones WHERE table_name = $1 AND row_key = $2",
            &[&table, &key],
        )
        .await?;
    Ok(row.map(|r| r.get(0)))
}

/// When a difference may still settle by itself: the newest version's
/// time plus the lag of the side holding the older one, if that was still
/// to come when the difference was seen; `None`: a real difference.
async fn in_flight_until(
    here: &Side<'_>,
    there: &Side<'_>,
    table: &str,
    d: &Difference,
    lags: (Duration, Duration),
) -> anyhow::Result<Option<i64>> {
    let hlc_here = match &d.here {
        Some(v) => Some(v.hlc),
        None => tombstone(here.client, table, &d.key).await?,
    };
    let hlc_there = match &d.there {
        Some(v) => Some(v.hlc),
        None => tombstone(there.client, table, &d.key).await?,
    };
    // The side with the older (or no) version is the one catching up.
    let (newest, lag) = match (hlc_here, hlc_there) {
        (Some(h), Some(t)) if h >= t => (h, lags.1),
        (Some(h), None) => (h, lags.1),
        (_, Some(t)) => (t, lags.0),
        (None, None) => return Ok(None),
    };
    let until = (newest >> 16) + (lag + RECHECK_MARGIN).as_millis() as i64;
    Ok((until > d.seen_at_ms).then_some(until))
}

/// Fetches again, after the lag has passed, the differences that may have
/// been changes in flight; drops those that settled.
async fn recheck(
    here: &Side<'_>,
    there: &Side<'_>,
    shape: &Shape,
    options: &Options,
    report: &mut TableReport,
) -> anyhow::Result<()> {
    if report.differences.is_empty() {
        return Ok(());
    }
    let lag = |l: Option<Duration>| l.unwrap_or(UNMEASURED_LAG);
    let lags = (
        lag(measured_lag(here.client, &options.heartbeat_topic).await),
        lag(measured_lag(there.client, &options.heartbeat_topic).await),
    );
    let mut pending = std::mem::take(&mut report.differences);
    let mut rechecked = std::collections::HashSet::new();
    for _round in 0..RECHECK_ROUNDS {
        let mut waiting = Vec::new();
        let mut until_max = 0;
        for d in pending.drain(..) {
            match in_flight_until(here, there, &shape.name, &d, lags).await? {
                Some(until) => {
                    until_max = until_max.max(until);
                    waiting.push(d);
                }
                None => report.differences.push(d),
            }
        }
        if waiting.is_empty() {
            break;
        }
        let wait = Duration::from_millis((until_max - clock::now_ms()).max(0) as u64);
        tracing::info!(table = %shape.name, keys = waiting.len(), wait = ?wait.min(MAX_RECHECK_WAIT),
            "differences that may be changes in flight: fetching them again after the lag");
        tokio::time::sleep(wait.min(MAX_RECHECK_WAIT)).await;
        for d in waiting {
            rechecked.insert(d.key.clone());
            let (h, t) = tokio::join!(
                key_now(here.client, shape, &d.key_values),
                key_now(there.client, shape, &d.key_values)
            );
            let now = match (h?, t?) {
                (None, None) => None,
                (Some(h), Some(t)) if h.hash == t.hash => None,
                (Some(h), Some(t)) => Some((Kind::Different, Some(h.version), Some(t.version))),
                (Some(h), None) => Some((Kind::MissingThere, Some(h.version), None)),
                (None, Some(t)) => Some((Kind::MissingHere, None, Some(t.version))),
            };
            match now {
                None => report.settled_on_recheck += 1,
                Some((kind, h, t)) => pending.push(Difference {
                    kind,
                    here: h,
                    there: t,
                    seen_at_ms: clock::now_ms(),
                    ..d
                }),
            }
        }
    }
    // Still changing after every round: reported as they are now.
    report.differences.extend(pending);
    report.rechecked = rechecked.len();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn col(name: &str, type_name: &str) -> Column {
        Column {
            name: name.into(),
            type_name: type_name.into(),
            collatable: type_name == "text",
        }
    }

    #[test]
    fn both_sides_must_have_the_same_columns() {
        let here = vec![
            col("id", "bigint"),
            col("hlc", "bigint"),
            col("origin_region", "text"),
        ];
        let ok = shape("public.users", &["id".into()], here.clone(), &here).unwrap();
        assert_eq!(ok.key, vec![0]);
        assert_eq!(ok.ident, "\"public\".\"users\"");
        let mut there = here.clone();
        there[0].type_name = "integer".into();
        there.push(col("extra", "text"));
        let err = shape("public.users", &["id".into()], here.clone(), &there).unwrap_err();
        assert!(
            err.contains("column id is bigint here, integer there"),
            "{err}"
        );
        assert!(err.contains("column extra is missing here"), "{err}");
        let err = shape("public.users", &["id".into()], here, &[]).unwrap_err();
        assert!(err.contains("does not exist there"), "{err}");
    }

    #[test]
    fn key_names_become_a_text_array_literal() {
        assert_eq!(
            array_literal(&["id".into(), "we\"ird".into()]),
            "{\"id\",\"we\\\"ird\"}"
        );
    }
}
