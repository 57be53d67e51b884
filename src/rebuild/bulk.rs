//! The rebuild's bulk load: the changes of many batches, from every
//! replayed partition, collapsed to the newest version per key and loaded
//! with COPY.
//!
//! A rebuild writes into an emptied table: no stored version is newer than
//! the topics' own, so the guard mostly has nothing to refuse. But the
//! same key arrives from several feeds and partitions (this region's own
//! topic and each other region's) and in several chunks, and COPY cannot
//! upsert. So each [`Chunk`]:
//! - keeps, per table and key, only the newest version among everything
//!   it read (an upsert or a delete, by `(hlc, origin_region)` compared
//!   bytewise, as the guard compares): within one chunk that is exactly
//!   what applying each change under the guard would leave;
//! - is written in one transaction with the offsets of every partition it
//!   read ([`flush`]): truncates first (they only remove older rows and
//!   mark the table), then deletes through the worker's guarded statement
//!   (tombstones included, so a later chunk's older upsert stays out), then
//!   the whole-row upserts COPYed (text format, the values as the worker
//!   renders them) into a temporary staging table of text columns and
//!   moved into the table by one `INSERT … SELECT … ON CONFLICT DO UPDATE
//!   WHERE` newer, under the same tombstone and truncate guards and the same
//!   casts as the worker's upsert. Rows with unsent (TOAST) columns and
//!   tables with CRDT counters take the worker's statements.
//! - A table with CRDT counters keeps the newest version per key *and
//!   partition* instead: the newest version of one region's feed need not
//!   hold another region's increments, which only the worker's upsert
//!   merges in. Those versions are written in rounds of distinct keys
//!   (one statement cannot upsert a key twice), in any order: the merge
//!   and the guards do not depend on it.
//!
//! Killed at any point, a rebuild resumes from the offsets of its last
//! committed chunk; what it reads again is applied again harmlessly.

use std::borrow::Cow;
use std::collections::HashMap;

use deadpool_postgres::Transaction;
use futures::SinkExt as _;
use rustc_hash::FxHashMap;

use crate::apply::{self, quote_ident, Applied, Final, PreparedRow, TargetTable};
use crate::offsets;

/// Where a kept version came from: its message's topic (an index into
/// [`Chunk`]'s topics), partition and offset, and a hash of its key bytes
/// ([`key_hash`]). Carried so that a row PostgreSQL refuses can be
/// dead-lettered as its message, fetched again and checked to be it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct At {
    pub topic: u32,
    pub partition: i32,
    pub offset: i64,
    pub key: u64,
}

/// The hash of a message's key bytes that [`At::key`] holds.
pub fn key_hash(key: Option<&[u8]>) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = rustc_hash::FxHasher::default();
    key.hash(&mut h);
    h.finish()
}

/// An earlier message a kept version took unsent (TOAST) column values
/// from, with its version (hlc, origin region).
pub type Source = (At, i64, String);

/// Changes read since the last flush, collapsed.
#[derive(Default)]
pub struct Chunk {
    /// Per table index: key text → the newest final state read, the
    /// message it came from, and its [`held_bytes`] (kept, so that a
    /// replaced version's size is not measured again).
    rows: FxHashMap<usize, FxHashMap<String, (Final, At, usize)>>,
    /// The topics [`At::topic`] indexes.
    topics: Vec<String>,
    /// Per kept version (its message) whose unsent (TOAST) columns were
    /// filled from older versions of its key: those versions' messages,
    /// oldest first. Its row is those messages' image together: a refused
    /// row is dead-lettered as all of them (`rebuild::refused`).
    merged: FxHashMap<At, Vec<Source>>,
    /// Truncates read: (table index, commit time ms, source region).
    truncates: Vec<(usize, i64, String)>,
    /// Per partition: the next offset and the newest commit time read.
    offsets: HashMap<(String, i32), (i64, Option<i64>)>,
    /// Messages read into the chunk.
    pub messages: usize,
    /// Changes read into the chunk, before collapsing.
    pub changes: usize,
    /// Versions held (after collapsing): the rows the flush writes.
    pub held: usize,
    /// The held versions' estimated memory ([`held_bytes`]).
    pub bytes: usize,
    /// Keyed messages read but not yet planned: only the newest of each
    /// key is ([`super::deferred`]). Planned into the chunk before it is
    /// written.
    pub deferred: super::deferred::Deferred,
}

/// When a chunk is written: on what it holds (the rows the flush writes
/// and their memory), not on what it read, since only the newest version
/// per key is written; and on the messages read, which is what a rebuild
/// killed before the commit reads again.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Versions held (distinct keys, after collapsing).
    pub rows: usize,
    /// Estimated bytes of the held versions ([`held_bytes`]).
    pub bytes: usize,
    /// Messages read since the last commit.
    pub messages: usize,
}

impl Limits {
    /// Whether `chunk` is to be written now. Also, at a quarter of `rows`,
    /// a chunk that collapsed less than a tenth of the changes it read (an
    /// insert-only topic: every key once): growing it would save no row,
    /// and a chunk written earlier is written while the next is read
    /// instead of after all reading.
    /// Messages held unplanned count as their keys (versions) and bytes.
    pub fn reached(&self, chunk: &Chunk) -> bool {
        let held = chunk.held + chunk.deferred.keys();
        let changes = chunk.changes + chunk.deferred.len();
        let not_collapsing = held >= (self.rows / 4).max(1) && held * 10 >= changes * 9;
        held >= self.rows
            || chunk.bytes + chunk.deferred.bytes >= self.bytes
            || chunk.messages >= self.messages
            || not_collapsing
    }
}

/// Roughly what a held version costs in memory: its map slot's key, the
/// version itself and its strings, the map's own overhead per entry. An
/// estimate (allocators round up), for [`Limits::bytes`] to bound memory
/// whatever the number of keys.
pub fn held_bytes(slot_len: usize, fin: &Final) -> usize {
    const ENTRY: usize = std::mem::size_of::<(String, (Final, At))>() + 16;
    let strings = |s: &str| s.len();
    let opt = |s: &Option<String>| s.as_deref().map_or(0, strings);
    ENTRY
        + slot_len
        + match fin {
            Final::Upsert(r) => {
                r.key_text.len()
                    + r.origin.len()
                    + opt(&r.home)
                    + opt(&r.pin)
                    + r.replaced.as_ref().map_or(0, |(_, o)| o.len())
                    + r.values.len() * std::mem::size_of::<(usize, Option<String>)>()
                    + r.values.iter().map(|(_, v)| opt(v)).sum::<usize>()
                    + r.unavailable.len() * std::mem::size_of::<usize>()
            }
            Final::Delete(d) => {
                d.key_text.len()
                    + d.origin.len()
                    + opt(&d.home)
                    + opt(&d.pin)
                    + d.replaced.as_ref().map_or(0, |(_, o)| o.len())
                    + d.key_values.len() * std::mem::size_of::<Option<String>>()
                    + d.key_values.iter().map(opt).sum::<usize>()
            }
        }
}

/// Whether `a` is a newer version than `b`: the guard's order
/// (`(hlc, origin_region COLLATE "C")`; Rust compares strings bytewise).
fn newer(a: (i64, &str), b: (i64, &str)) -> bool {
    a > b
}

impl Chunk {
    /// A change's final state for table `table`: kept if newer than what
    /// the chunk holds for its key. `partition`: for a table with CRDT
    /// counters, the partition it was read from (a version is kept per
    /// key and partition, see the module docs); `None` for the others.
    pub fn add(&mut self, table: usize, fin: Final, partition: Option<(&str, i32)>, at: At) {
        self.changes += 1;
        let rows = self.rows.entry(table).or_default();
        let slot: Cow<'_, str> = match partition {
            None => Cow::Borrowed(fin.key_text()),
            Some((topic, p)) => Cow::Owned(format!("{}\u{0}{topic}\u{0}{p}", fin.key_text())),
        };
        let slot_len = slot.len();
        match rows.get_mut(slot.as_ref()) {
            Some((held, held_at, held_size)) => {
                if newer(fin.version(), held.version()) {
                    let mut fin = fin;
                    let older = self.merged.remove(held_at);
                    if keep_unsent(&mut fin, held) {
                        let mut sources = older.unwrap_or_default();
                        let (hlc, origin) = held.version();
                        sources.push((*held_at, hlc, origin.to_owned()));
                        self.merged.insert(at, sources);
                    }
                    *held = fin;
                    *held_at = at;
                } else if matches!(&*held, Final::Upsert(r) if !r.unavailable.is_empty()) {
                    // Feeds are read in any order: a newer version with
                    // unsent (TOAST) columns may come first. It can only
                    // update a stored row, so it takes those values from
                    // the older version, which would have inserted it.
                    if keep_unsent(held, &fin) {
                        let (hlc, origin) = fin.version();
                        let sources = self.merged.entry(*held_at).or_default();
                        sources.push((at, hlc, origin.to_owned()));
                        sources.sort_by(|a, b| (a.1, &a.2).cmp(&(b.1, &b.2)));
                    }
                } else {
                    // An older version: nothing held changes.
                    return;
                }
                let size = held_bytes(slot_len, held);
                self.bytes = self.bytes - *held_size + size;
                *held_size = size;
            }
            None => {
                self.held += 1;
                let size = held_bytes(slot_len, &fin);
                self.bytes += size;
                rows.insert(slot.into_owned(), (fin, at, size));
            }
        }
    }

    /// The index of `topic` for [`At::topic`] (a handful of topics: a scan).
    pub fn topic_index(&mut self, topic: &str) -> u32 {
        match self.topics.iter().position(|t| t == topic) {
            Some(i) => i as u32,
            None => {
                self.topics.push(topic.to_owned());
                (self.topics.len() - 1) as u32
            }
        }
    }

    /// The older messages whose values the version kept from `at` took
    /// for its unsent (TOAST) columns, oldest first; empty for most.
    pub fn merged_from(&self, at: At) -> &[Source] {
        self.merged.get(&at).map_or(&[], Vec::as_slice)
    }

    /// The topic an [`At`] names.
    pub fn topic(&self, at: At) -> &str {
        &self.topics[at.topic as usize]
    }

    /// The truncates read: (table index, commit time ms, source region).
    pub fn truncates(&self) -> &[(usize, i64, String)] {
        &self.truncates
    }

    /// Per table index (ascending), its kept versions and their messages.
    pub fn tables(&self) -> Vec<(usize, Vec<(&Final, At)>)> {
        let mut out: Vec<(usize, Vec<(&Final, At)>)> = self
            .rows
            .iter()
            .map(|(t, rows)| (*t, rows.values().map(|(f, at, _)| (f, *at)).collect()))
            .collect();
        out.sort_by_key(|(t, _)| *t);
        out
    }

    /// Stores the offsets of every partition read, under `group`, in `tx`.
    pub async fn store_offsets(&self, tx: &Transaction<'_>, group: &str) -> anyhow::Result<()> {
        for ((topic, partition), (next, ts)) in &self.offsets {
            offsets::store(tx, group, topic, *partition, *next, *ts).await?;
        }
        Ok(())
    }

    pub fn truncate(&mut self, table: usize, ts_ms: i64, source_region: &str) {
        self.changes += 1;
        self.bytes += std::mem::size_of::<(usize, i64, String)>() + source_region.len();
        self.truncates
            .push((table, ts_ms, source_region.to_owned()));
    }

    /// A partition's messages up to `next` (exclusive) are in the chunk.
    pub fn read_to(&mut self, topic: &str, partition: i32, next: i64, newest_ts_ms: Option<i64>) {
        let at = self
            .offsets
            .entry((topic.to_owned(), partition))
            .or_insert((next, newest_ts_ms));
        at.0 = at.0.max(next);
        at.1 = at.1.max(newest_ts_ms);
    }

    pub fn is_empty(&self) -> bool {
        self.offsets.is_empty()
    }

    /// Per partition read: (topic, partition, the next offset).
    pub fn positions(&self) -> impl Iterator<Item = (&str, i32, i64)> {
        self.offsets
            .iter()
            .map(|((topic, partition), (next, _))| (topic.as_str(), *partition, *next))
    }

    /// Distinct keys held.
    pub fn keys(&self) -> usize {
        self.rows.values().map(|r| r.len()).sum()
    }
}

/// Writes a chunk and its partitions' offsets under `group` in `tx`. The
/// chunk is kept: refused, it is written again (a retry) or row by row
/// (`rebuild::refused`).
pub async fn flush(
    tx: &Transaction<'_>,
    group: &str,
    tables: &[TargetTable],
    chunk: &Chunk,
) -> anyhow::Result<Applied> {
    let mut total = Applied::default();
    for (t, ts_ms, region) in &chunk.truncates {
        total += apply::apply_truncate(tx, &tables[*t], *ts_ms, region).await?;
    }
    for (t, rows) in chunk.tables() {
        let table = &tables[t];
        let finals: Vec<&Final> = rows.into_iter().map(|(f, _)| f).collect();
        total += write_table(tx, table, &finals).await?;
    }
    chunk.store_offsets(tx, group).await?;
    Ok(total)
}

/// Writes `finals` (at most one version per key, or per key and partition
/// for a table with counters) of one table: deletes, then whole rows with
/// COPY, then the rest with the worker's statements.
pub async fn write_table(
    tx: &Transaction<'_>,
    table: &TargetTable,
    finals: &[&Final],
) -> anyhow::Result<Applied> {
    use anyhow::Context as _;
    let mut total = Applied::default();
    let mut seen = Vec::new();
    let mut whole: Vec<&PreparedRow> = Vec::new();
    let mut others: Vec<Cow<'_, Final>> = Vec::new();
    for fin in finals {
        match fin {
            Final::Upsert(r)
                if table.counters.is_empty() && is_whole(r, table.columns.len(), &mut seen) =>
            {
                whole.push(r)
            }
            _ => others.push(Cow::Borrowed(*fin)),
        }
    }
    // Deletes first (as apply_finals orders them): a delete only frees
    // unique values an upsert of another key may take.
    let (deletes, odd): (Vec<_>, Vec<_>) = others
        .into_iter()
        .partition(|f| matches!(&**f, Final::Delete(_)));
    for round in distinct_key_rounds(deletes) {
        total += apply::apply_finals(tx, table, &round)
            .await
            .with_context(|| format!("deleting from {}", table.name))?;
    }
    if !whole.is_empty() {
        total += copy_upserts(tx, table, &whole)
            .await
            .with_context(|| format!("loading {} with COPY", table.name))?;
    }
    for round in distinct_key_rounds(odd) {
        total += apply::apply_finals(tx, table, &round)
            .await
            .with_context(|| format!("writing {}", table.name))?;
    }
    Ok(total)
}

/// `finals` in rounds where each key occurs once: the n-th version of a
/// key goes to the n-th round. One round for a table without counters.
fn distinct_key_rounds(finals: Vec<Cow<'_, Final>>) -> Vec<Vec<Cow<'_, Final>>> {
    let mut rounds: Vec<Vec<Cow<'_, Final>>> = Vec::new();
    let mut seen: HashMap<String, usize> = HashMap::new();
    for fin in finals {
        let n = seen.entry(fin.key_text().to_owned()).or_insert(0);
        if rounds.len() <= *n {
            rounds.push(Vec::new());
        }
        rounds[*n].push(fin);
        *n += 1;
    }
    rounds
}

/// An upsert whose unsent (TOAST) columns the replaced version `older`
/// of the same key carried: those values are kept, as the worker's update
/// of the stored row would keep them. Whether any was taken.
fn keep_unsent(fin: &mut Final, older: &Final) -> bool {
    let (Final::Upsert(new), Final::Upsert(old)) = (fin, older) else {
        return false;
    };
    if new.unavailable.is_empty() {
        return false;
    }
    let before = new.unavailable.len();
    let mut still = Vec::new();
    for col in std::mem::take(&mut new.unavailable) {
        match old.values.iter().find(|(c, _)| *c == col) {
            Some(v) => new.values.push(v.clone()),
            None => still.push(col),
        }
    }
    let took = still.len() < before;
    new.unavailable = still;
    new.values.sort_by_key(|(c, _)| *c);
    took
}

/// A row that carries each of its table's `columns` once, none unsent.
/// Its values come in the source's column-name order (`apply::prepare`),
/// not the table's: [`copy_upserts`] puts them in the table's. `seen`: a
/// buffer reused between rows.
fn is_whole(r: &PreparedRow, columns: usize, seen: &mut Vec<bool>) -> bool {
    if !r.unavailable.is_empty() || r.values.len() != columns {
        return false;
    }
    seen.clear();
    seen.resize(columns, false);
    r.values
        .iter()
        .all(|(c, _)| *c < columns && !std::mem::replace(&mut seen[*c], true))
}

/// Whole rows COPYed into a staging table of text columns, then moved
/// into the table under the guards (`apply::guarded_insert_sql`).
async fn copy_upserts(
    tx: &Transaction<'_>,
    table: &TargetTable,
    rows: &[&PreparedRow],
) -> anyhow::Result<Applied> {
    let all: Vec<usize> = (0..table.columns.len()).collect();
    let names: Vec<String> = table.columns.iter().map(|(n, _)| quote_ident(n)).collect();
    // A temporary table per table layout and session, emptied at each
    // commit; text columns, so the casts are the worker's, in SQL.
    let stage = quote_ident(&stage_name(table));
    let columns: Vec<String> = names.iter().map(|n| format!("{n} text")).collect();
    tx.batch_execute(&format!(
        "CREATE TEMPORARY TABLE IF NOT EXISTS {stage} ({}, \"__key\" text) ON COMMIT DELETE ROWS",
        columns.join(", ")
    ))
    .await?;
    let sink = tx
        .copy_in(&format!(
            "COPY {stage} ({}, \"__key\") FROM STDIN",
            names.join(", ")
        ))
        .await?;
    futures::pin_mut!(sink);
    let mut buf: Vec<u8> = Vec::with_capacity(1 << 20);
    let mut ordered = Vec::new();
    for r in rows {
        copy_line(&mut buf, &mut ordered, r);
        if buf.len() >= 1 << 20 {
            let full = std::mem::replace(&mut buf, Vec::with_capacity(1 << 20));
            sink.send(bytes::Bytes::from(full)).await?;
        }
    }
    if !buf.is_empty() {
        sink.send(bytes::Bytes::from(buf)).await?;
    }
    sink.finish().await?;
    let sql = apply::guarded_insert_sql(table, &all, &format!("{stage} AS b"), 1);
    let n = tx.execute(&sql, &[&table.name]).await?;
    let n_rows = rows.len() as u64;
    Ok(Applied {
        applied: n,
        stale: n_rows - n.min(n_rows),
        ..Applied::default()
    })
}

/// Empties `table`'s staging table in `tx`, if this session has one: its
/// rows stay until the commit, and a second load of the table in the same
/// transaction (the rows of a refused chunk written in parts) would move
/// them again.
pub async fn clear_stage(tx: &Transaction<'_>, table: &TargetTable) -> anyhow::Result<()> {
    let stage = stage_name(table);
    let exists: bool = tx
        .query_one(
            "SELECT to_regclass('pg_temp.' || $1::text) IS NOT NULL",
            &[&stage],
        )
        .await?
        .get(0);
    if exists {
        tx.batch_execute(&format!("TRUNCATE pg_temp.{}", quote_ident(&stage)))
            .await?;
    }
    Ok(())
}

/// The staging table's name (unquoted) of `table`'s layout.
fn stage_name(table: &TargetTable) -> String {
    format!("regionsync_rebuild_stage_{:016x}", layout_hash(table))
}

/// A whole row's line of COPY's text format: its values in the table's
/// column order (each is there once: [`is_whole`]), then its key text.
/// `ordered`: a buffer reused between rows.
fn copy_line<'r>(buf: &mut Vec<u8>, ordered: &mut Vec<Option<&'r str>>, r: &'r PreparedRow) {
    ordered.clear();
    ordered.resize(r.values.len(), None);
    for (c, value) in &r.values {
        ordered[*c] = value.as_deref();
    }
    for value in ordered.iter() {
        match value {
            Some(text) => copy_text(buf, text),
            None => buf.extend_from_slice(b"\\N"),
        }
        buf.push(b'\t');
    }
    copy_text(buf, &r.key_text);
    buf.push(b'\n');
}

/// Names a staging table by the table's name and columns, so that a
/// session keeps one per layout.
fn layout_hash(table: &TargetTable) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = rustc_hash::FxHasher::default();
    table.name.hash(&mut h);
    table.columns.hash(&mut h);
    h.finish()
}

/// `text` escaped for COPY's text format: backslash, and the delimiter,
/// newline and carriage return, which would otherwise end the field or row.
/// The runs between them are copied whole (byte by byte, this was 5 % of a
/// rebuild's CPU).
fn copy_text(buf: &mut Vec<u8>, text: &str) {
    let bytes = text.as_bytes();
    let mut start = 0;
    for (i, b) in bytes.iter().enumerate() {
        let escaped: &[u8] = match b {
            b'\\' => b"\\\\",
            b'\t' => b"\\t",
            b'\n' => b"\\n",
            b'\r' => b"\\r",
            _ => continue,
        };
        buf.extend_from_slice(&bytes[start..i]);
        buf.extend_from_slice(escaped);
        start = i + 1;
    }
    buf.extend_from_slice(&bytes[start..]);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::apply::PreparedDelete;

    const AT: At = At {
        topic: 0,
        partition: 0,
        offset: 0,
        key: 0,
    };

    fn upsert(key: &str, hlc: i64, origin: &str) -> Final {
        Final::Upsert(PreparedRow {
            key_text: key.into(),
            values: vec![(0, Some(key.into()))],
            unavailable: vec![],
            hlc,
            origin: origin.into(),
            replaced: None,
            home: None,
            pin: None,
            snapshot: false,
            committed_ms: 0,
        })
    }

    fn delete(key: &str, hlc: i64, origin: &str) -> Final {
        Final::Delete(PreparedDelete {
            key_text: key.into(),
            key_values: vec![Some(key.into())],
            hlc,
            origin: origin.into(),
            replaced: None,
            home: None,
            pin: None,
            committed_ms: 0,
        })
    }

    #[test]
    fn the_newest_version_per_key_wins_whatever_the_order_read() {
        let mut c = Chunk::default();
        // Key 1: a newer delete read before an older upsert (another feed).
        c.add(0, delete("1", 20, "us-east-1"), None, AT);
        c.add(0, upsert("1", 10, "eu-west-1"), None, AT);
        // Key 2: same hlc, the origin decides bytewise.
        c.add(0, upsert("2", 5, "eu-west-1"), None, AT);
        c.add(0, upsert("2", 5, "us-east-1"), None, AT);
        c.add(0, upsert("2", 5, "ap-south-1"), None, AT);
        // Key 3: an upsert newer than a delete.
        c.add(0, delete("3", 1, "us-east-1"), None, AT);
        c.add(0, upsert("3", 2, "us-east-1"), None, AT);
        assert_eq!(c.changes, 7);
        assert_eq!(c.keys(), 3);
        let rows = &c.rows[&0];
        assert!(matches!(rows["1"].0, Final::Delete(_)));
        assert_eq!(rows["2"].0.version(), (5, "us-east-1"));
        assert!(matches!(rows["3"].0, Final::Upsert(_)));
    }

    #[test]
    fn an_unsent_column_keeps_the_older_versions_value() {
        let mut c = Chunk::default();
        let Final::Upsert(mut whole) = upsert("1", 1, "a") else {
            unreachable!()
        };
        whole.values.push((1, Some("big".into())));
        c.add(0, Final::Upsert(whole), None, AT);
        let Final::Upsert(mut partial) = upsert("1", 2, "a") else {
            unreachable!()
        };
        partial.unavailable = vec![1];
        c.add(0, Final::Upsert(partial), None, AT);
        let Final::Upsert(kept) = &c.rows[&0]["1"].0 else {
            panic!("an upsert")
        };
        assert_eq!(kept.hlc, 2);
        assert!(kept.unavailable.is_empty());
        assert_eq!(kept.values[1], (1, Some("big".into())));
    }

    #[test]
    fn a_counter_table_keeps_a_version_per_partition_written_in_rounds() {
        let mut c = Chunk::default();
        // Region Y's older increment and region X's newer row, from two
        // feeds: X's row need not hold Y's component, so both are kept.
        c.add(0, upsert("1", 10, "y"), Some(("y.cdc.t", 0)), AT);
        c.add(0, upsert("1", 20, "x"), Some(("x.cdc.t", 0)), AT);
        // Within one partition the newest still replaces the older.
        c.add(0, upsert("1", 5, "y"), Some(("y.cdc.t", 0)), AT);
        c.add(0, upsert("2", 1, "x"), Some(("x.cdc.t", 0)), AT);
        assert_eq!(c.keys(), 3);
        let finals: Vec<Cow<'_, Final>> = c.rows[&0]
            .values()
            .map(|(f, _, _)| Cow::Borrowed(f))
            .collect();
        let rounds = distinct_key_rounds(finals);
        assert_eq!(rounds.len(), 2, "key 1 twice: two rounds");
        for round in &rounds {
            let mut keys: Vec<&str> = round.iter().map(|f| f.key_text()).collect();
            keys.sort_unstable();
            keys.dedup();
            assert_eq!(keys.len(), round.len(), "a key once per round");
        }
        let mut versions: Vec<(i64, String)> = rounds
            .iter()
            .flatten()
            .filter(|f| f.key_text() == "1")
            .map(|f| (f.version().0, f.version().1.to_owned()))
            .collect();
        versions.sort();
        assert_eq!(versions, [(10, "y".to_owned()), (20, "x".to_owned())]);
    }

    #[test]
    fn a_newer_version_read_first_takes_its_unsent_column_from_an_older_one() {
        let mut c = Chunk::default();
        let Final::Upsert(mut partial) = upsert("1", 2, "x") else {
            unreachable!()
        };
        partial.unavailable = vec![1];
        c.add(0, Final::Upsert(partial), None, AT);
        let Final::Upsert(mut whole) = upsert("1", 1, "y") else {
            unreachable!()
        };
        whole.values.push((1, Some("big".into())));
        c.add(0, Final::Upsert(whole), None, AT);
        let Final::Upsert(kept) = &c.rows[&0]["1"].0 else {
            panic!("an upsert")
        };
        assert_eq!((kept.hlc, kept.origin.as_str()), (2, "x"));
        assert!(kept.unavailable.is_empty(), "whole: it can insert the row");
        assert_eq!(kept.values[1], (1, Some("big".into())));
    }

    #[test]
    fn the_kept_version_keeps_its_messages_place() {
        let mut c = Chunk::default();
        let (x, y) = (c.topic_index("x.cdc.t"), c.topic_index("y.cdc.t"));
        assert_eq!((x, y, c.topic_index("x.cdc.t")), (0, 1, 0));
        let at = |topic, offset| At {
            topic,
            partition: 3,
            offset,
            key: 0,
        };
        c.add(0, upsert("1", 10, "x"), None, at(x, 7));
        c.add(0, upsert("1", 20, "y"), None, at(y, 2));
        c.add(0, upsert("1", 15, "x"), None, at(x, 9));
        let (_, kept, _) = &c.rows[&0]["1"];
        assert_eq!(*kept, at(y, 2), "the newest version's message");
        assert_eq!(c.topic(*kept), "y.cdc.t");
    }

    #[test]
    fn a_version_filled_from_older_ones_names_their_messages_oldest_first() {
        let at = |offset| At {
            topic: 0,
            partition: 0,
            offset,
            key: 0,
        };
        let partial = |hlc| {
            let Final::Upsert(mut r) = upsert("1", hlc, "x") else {
                unreachable!()
            };
            r.unavailable = vec![1];
            Final::Upsert(r)
        };
        let Final::Upsert(mut whole) = upsert("1", 1, "x") else {
            unreachable!()
        };
        whole.values.push((1, Some("big".into())));
        let mut c = Chunk::default();
        // Read out of order: the newest first, then the whole row, then one
        // between them; each partial one takes the big value.
        c.add(0, partial(3), None, at(30));
        c.add(0, Final::Upsert(whole.clone()), None, at(10));
        c.add(0, partial(2), None, at(20));
        let (_, kept, _) = &c.rows[&0]["1"];
        assert_eq!(*kept, at(30));
        let sources: Vec<(i64, i64)> = c
            .merged_from(*kept)
            .iter()
            .map(|(a, hlc, _)| (a.offset, *hlc))
            .collect();
        assert_eq!(sources, [(10, 1)], "the message the value came from");
        // In order: the whole row, then a partial one, then the next.
        let mut c = Chunk::default();
        c.add(0, Final::Upsert(whole.clone()), None, at(10));
        c.add(0, partial(2), None, at(20));
        c.add(0, partial(3), None, at(30));
        let (_, kept, _) = &c.rows[&0]["1"];
        let sources: Vec<i64> = c
            .merged_from(*kept)
            .iter()
            .map(|(a, ..)| a.offset)
            .collect();
        assert_eq!(sources, [10, 20]);
        // A whole newer version stands alone.
        let Final::Upsert(mut newest) = upsert("1", 4, "x") else {
            unreachable!()
        };
        newest.values.push((1, Some("other".into())));
        c.add(0, Final::Upsert(newest), None, at(40));
        assert!(c.merged_from(at(40)).is_empty());
        assert!(
            c.merged_from(at(30)).is_empty(),
            "forgotten with its version"
        );
    }

    #[test]
    fn a_chunk_is_full_on_the_versions_it_holds_not_on_what_it_read() {
        let limits = Limits {
            rows: 3,
            bytes: usize::MAX,
            messages: 1000,
        };
        let mut c = Chunk::default();
        // The same three keys read again and again: still three rows to
        // write, however many changes were read (the bench's topic: ten
        // changes per key).
        for round in 0..100 {
            for key in ["1", "2"] {
                c.add(0, upsert(key, round, "x"), None, AT);
                c.messages += 1;
            }
        }
        assert_eq!((c.changes, c.held), (200, 2));
        assert!(!limits.reached(&c));
        c.add(0, delete("3", 1, "x"), None, AT);
        assert_eq!(c.held, 3);
        assert!(limits.reached(&c), "three versions held");
        // An insert-only topic (every key once): a row per change, written
        // from a quarter of the limit on (nothing collapses).
        let limits = Limits { rows: 8, ..limits };
        let mut c = Chunk::default();
        for key in 0..2 {
            c.add(0, upsert(&key.to_string(), 1, "x"), None, AT);
        }
        assert!(limits.reached(&c), "2 of 2 changes held: not collapsing");
        let mut c = Chunk::default();
        for round in 0..2 {
            for key in 0..3 {
                c.add(0, upsert(&key.to_string(), round, "x"), None, AT);
            }
        }
        assert!(
            !limits.reached(&c),
            "3 of 6 changes held: collapsing, below 8"
        );
        // What a kill makes re-read is bounded too.
        let c = Chunk {
            messages: 1000,
            ..Chunk::default()
        };
        assert!(limits.reached(&c));
    }

    #[test]
    fn a_chunks_bytes_follow_the_versions_it_holds() {
        let mut c = Chunk::default();
        c.add(0, upsert("1", 1, "x"), None, AT);
        let one = c.bytes;
        assert_eq!(one, held_bytes(1, &c.rows[&0]["1"].0));
        assert!(one > std::mem::size_of::<Final>(), "{one}");
        // Replaced by a newer version of the same size: the same bytes.
        c.add(0, upsert("1", 2, "x"), None, AT);
        assert_eq!(c.bytes, one);
        // A larger value counts its length.
        let Final::Upsert(mut big) = upsert("1", 3, "x") else {
            unreachable!()
        };
        big.values[0].1 = Some("x".repeat(10_000));
        c.add(0, Final::Upsert(big), None, AT);
        assert_eq!(c.bytes, one + 9_999, "the value grew from 1 byte to 10,000");
        // An older one read later changes nothing.
        let before = c.bytes;
        c.add(0, upsert("1", 0, "x"), None, AT);
        assert_eq!(c.bytes, before);
        let limits = Limits {
            rows: usize::MAX,
            bytes: 10_000,
            messages: usize::MAX,
        };
        assert!(limits.reached(&c), "one large row fills 10,000 bytes");
        assert_eq!(c.held, 1);
    }

    #[test]
    fn offsets_only_move_forward() {
        let mut c = Chunk::default();
        c.read_to("t", 0, 10, Some(5));
        c.read_to("t", 0, 7, Some(3));
        assert_eq!(c.offsets[&("t".to_string(), 0)], (10, Some(5)));
    }

    #[test]
    fn a_whole_row_in_the_sources_column_order_is_copied_in_the_tables() {
        let table = TargetTable::for_tests(
            "public.users",
            &[
                ("id", "bigint"),
                ("name", "text"),
                ("hlc", "bigint"),
                ("origin_region", "text"),
            ],
        );
        let value = serde_json::json!({"op": "c", "before": null,
            "after": {"id": 1, "name": "a\tb", "hlc": 65536, "origin_region": "us-east-1"},
            "source": {"ts_ms": 1, "schema": "public", "table": "users"}});
        let change = match crate::decode::decode_json(
            Some(b"{\"id\": 1}"),
            Some(value.to_string().as_bytes()),
        ) {
            Ok(crate::change::Decoded::Change(c)) => c,
            other => panic!("{other:?}"),
        };
        let Final::Upsert(row) = apply::prepare(&table, change, "us-east-1").unwrap() else {
            panic!("an upsert")
        };
        // Rendered in the source's column-name order, not the table's:
        // whole all the same (this was once refused, so nothing was COPYed).
        assert_ne!(row.values[0].0, 0);
        let mut seen = Vec::new();
        assert!(is_whole(&row, 4, &mut seen));
        let (mut buf, mut ordered) = (Vec::new(), Vec::new());
        copy_line(&mut buf, &mut ordered, &row);
        assert_eq!(buf, b"1\ta\\tb\t65536\tus-east-1\t1\n");

        // A column missing, unsent or twice is not whole.
        let mut short = row.clone();
        short.values.pop();
        assert!(!is_whole(&short, 4, &mut seen));
        let mut twice = row.clone();
        twice.values[1].0 = twice.values[0].0;
        assert!(!is_whole(&twice, 4, &mut seen));
        let mut unsent = short;
        unsent.unavailable.push(3);
        assert!(!is_whole(&unsent, 4, &mut seen));
    }

    #[test]
    fn copy_text_escapes_what_would_end_a_field() {
        let mut buf = Vec::new();
        copy_text(&mut buf, "a\tb\nc\\d\re");
        assert_eq!(buf, b"a\\tb\\nc\\\\d\\re");
        buf.clear();
        copy_text(&mut buf, "\\zoë\n");
        assert_eq!(buf, "\\\\zoë\\n".as_bytes());
        buf.clear();
        copy_text(&mut buf, "plain");
        assert_eq!(buf, b"plain");
    }
}
