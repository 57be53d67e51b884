//! Write: a table's collapsed final states applied in the caller's
//! transaction under the version guard, one statement per kind, every value
//! bound as a `text[]` array and cast in SQL; and the truncate.

use std::borrow::Cow;

use deadpool_postgres::GenericClient;
use tokio_postgres::types::ToSql;
use tokio_postgres::Row as PgRow;

use super::{quote_ident, Final, PreparedDelete, PreparedRow, TargetTable};

/// Which value of an upsert PostgreSQL refuses, when it refused the row
/// with a data exception (SQLSTATE class 22), whose message names no column
/// (`value too long for type character varying(3)`): each value is cast
/// alone to its column's type, as the statement casts it, in a savepoint
/// of the caller's transaction. `None` if every value casts (the fault is
/// elsewhere) or the row is a delete.
pub async fn refused_column(
    tx: &mut tokio_postgres::Transaction<'_>,
    table: &TargetTable,
    fin: &Final,
) -> Result<Option<usize>, tokio_postgres::Error> {
    let Final::Upsert(row) = fin else {
        return Ok(None);
    };
    for (idx, value) in &row.values {
        let Some(text) = value else { continue };
        // The statement casts to the unsized type and assigns to the column,
        // which refuses a value longer than the column's length: the same
        // check is whether the value survives the column's own type.
        let (cast, declared) = (&table.cast_types[*idx], &table.columns[*idx].1);
        let sp = tx.savepoint("value_cast").await?;
        let kept = sp
            .query_one(
                &format!("SELECT $1::text::{cast}::{declared}::{cast} = $1::text::{cast}"),
                &[text],
            )
            .await;
        sp.rollback().await?;
        // tokio-postgres keeps a savepoint rolled back to: released, so the
        // probes do not nest a subtransaction per column.
        tx.batch_execute("RELEASE SAVEPOINT value_cast").await?;
        match kept {
            Ok(row) if row.get::<_, Option<bool>>(0) == Some(false) => return Ok(Some(*idx)),
            Err(e) if e.code().is_some_and(|c| c.code().starts_with("22")) => {
                return Ok(Some(*idx))
            }
            _ => {}
        }
    }
    Ok(None)
}

/// How many changes a statement applied and how many the guard skipped.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Applied {
    pub applied: u64,
    /// Skipped by the version guard: the stored row or tombstone is newer.
    pub stale: u64,
    /// Replaced by a later change of the same key in the same batch.
    pub superseded: u64,
    /// Concurrent writes recorded in `regionsync.conflicts`.
    pub conflicts: u64,
    /// Cross-region writes held by the `reject` or `manual` policy.
    pub held: u64,
    /// Of those, held by `reject` (the local row is to be written again).
    pub rejected: u64,
    /// Changes by write class: shared, owner, cross-region, third-region.
    pub classes: [u64; 4],
    /// Upserts older than the tombstone grace for keys with no row: skipped.
    pub late: u64,
    /// Changes committed in their region before it was failed over and
    /// applied here only after (the RPO window), and the longest time
    /// between such a commit and the failover (ms).
    pub rpo: u64,
    pub rpo_span_ms: i64,
}

impl std::ops::AddAssign for Applied {
    fn add_assign(&mut self, o: Applied) {
        self.applied += o.applied;
        self.stale += o.stale;
        self.superseded += o.superseded;
        self.conflicts += o.conflicts;
        self.held += o.held;
        self.rejected += o.rejected;
        self.late += o.late;
        self.rpo += o.rpo;
        self.rpo_span_ms = self.rpo_span_ms.max(o.rpo_span_ms);
        for (a, b) in self.classes.iter_mut().zip(o.classes) {
            *a += b;
        }
    }
}

/// Applies one table's collapsed final states in the caller's transaction.
/// The statements' arrays borrow the changes' texts.
pub async fn apply_finals(
    client: &impl GenericClient,
    table: &TargetTable,
    finals: &[Cow<'_, Final>],
) -> Result<Applied, tokio_postgres::Error> {
    let mut result = Applied::default();
    // Upserts, grouped by the columns they carry and the unsent (TOAST)
    // columns they keep: normally one group. Compared in place, as a batch's
    // rows nearly always match the first group: no key built per row.
    let mut groups: Vec<Vec<&PreparedRow>> = Vec::new();
    let mut deletes = Vec::new();
    for f in finals {
        match &**f {
            Final::Upsert(r) => match groups.iter_mut().find(|g| g[0].same_columns(r)) {
                Some(group) => group.push(r),
                None => groups.push(vec![r]),
            },
            Final::Delete(d) => deletes.push(d),
        }
    }
    // Deletes first: the keys are distinct (collapsed), and a delete only
    // frees unique values, so an upsert that takes a value a deleted row
    // held (a primary-key change keeping its email) finds it free, as it
    // did in the source. The other way round a unique index refuses it.
    if !deletes.is_empty() {
        result += delete(client, table, &deletes).await?;
    }
    for rows in groups {
        result += upsert(client, table, &rows).await?;
    }
    Ok(result)
}

async fn upsert(
    client: &impl GenericClient,
    table: &TargetTable,
    rows: &[&PreparedRow],
) -> Result<Applied, tokio_postgres::Error> {
    let n_rows = rows.len() as u64;
    let mut cols: Vec<usize> = rows[0].values.iter().map(|(i, _)| *i).collect();
    cols.sort_unstable();
    let unavailable = rows[0].unavailable.clone();
    // One text[] per column, plus the key text for the tombstone check. The
    // rows of a group carry the same columns: each fills every array once.
    let mut slot_of = vec![usize::MAX; table.columns.len()];
    for (slot, col) in cols.iter().enumerate() {
        slot_of[*col] = slot;
    }
    let mut arrays: Vec<Vec<Option<&str>>> = vec![Vec::with_capacity(rows.len()); cols.len()];
    let mut keys: Vec<&str> = Vec::with_capacity(rows.len());
    for r in rows {
        for (col, value) in &r.values {
            arrays[slot_of[*col]].push(value.as_deref());
        }
        keys.push(&r.key_text);
    }
    let unnest: Vec<String> = (1..=cols.len()).map(|n| format!("${n}::text[]")).collect();
    let names = column_names(table, &cols);
    let key_param = cols.len() + 1;
    let from = format!(
        "unnest({}, ${key_param}::text[]) AS b({}, \"__key\")",
        unnest.join(", "),
        names.join(", ")
    );
    let sql = if unavailable.is_empty() {
        guarded_insert_sql(table, &cols, &from, cols.len() + 2)
    } else {
        guarded_update_sql(table, &cols, &from, cols.len() + 2)
    };
    let mut params: Vec<&(dyn ToSql + Sync)> =
        arrays.iter().map(|a| a as &(dyn ToSql + Sync)).collect();
    params.push(&keys);
    params.push(&table.name);
    let statement = client.prepare_cached(&sql).await?;
    let n = client.execute(&statement, &params).await?;
    Ok(Applied {
        applied: n,
        stale: n_rows - n.min(n_rows),
        ..Applied::default()
    })
}

fn column_names(table: &TargetTable, cols: &[usize]) -> Vec<String> {
    cols.iter()
        .map(|i| quote_ident(&table.columns[*i].0))
        .collect()
}

/// The tombstone and truncate-mark guards of an incoming text-valued row
/// `b` (with its key text in `b."__key"`); `$table_param` is the table's
/// name.
fn tombstone_guard(table_param: usize) -> String {
    // OFFSET 0 keeps this a probe of the tombstone index per row. Without
    // it PostgreSQL may plan an anti-join that hashes all of the table's
    // tombstones every batch, and did while a table's tombstones grew from
    // none (stale statistics): PostgreSQL's CPU per 1M changes doubled.
    // A table has at most one truncate mark (keyed by the table's name), so
    // that test is a scalar subquery, read once per statement; as a NOT
    // EXISTS it was planned as an anti-join probing the mark's index per row.
    format!(
        "NOT EXISTS (SELECT 1 FROM regionsync.tombstones ts
                      WHERE ts.table_name = ${table_param} AND ts.row_key = b.\"__key\"
                        AND (ts.hlc, ts.origin_region COLLATE \"C\")
                            >= (b.hlc::bigint, b.origin_region COLLATE \"C\")
                     OFFSET 0)
         AND coalesce(b.hlc::bigint >= (SELECT tr.hlc FROM regionsync.truncations tr
                                         WHERE tr.table_name = ${table_param}), true)"
    )
}

const GUARD: &str =
    "(t.hlc, t.origin_region COLLATE \"C\") < (EXCLUDED.hlc, EXCLUDED.origin_region COLLATE \"C\")";

/// The guarded upsert of whole rows (every column in `cols`, positions in
/// `table.columns`) read from `from`, a row source aliased `b` whose
/// columns are the quoted column names as text plus `"__key"`; `$table_param`
/// is the table's name. The worker's batches read `unnest` of arrays, a
/// rebuild's chunks a staging table filled by COPY.
pub(crate) fn guarded_insert_sql(
    table: &TargetTable,
    cols: &[usize],
    from: &str,
    table_param: usize,
) -> String {
    let names = column_names(table, cols);
    let casts: Vec<String> = cols
        .iter()
        .map(|i| {
            format!(
                "b.{}::{}",
                quote_ident(&table.columns[*i].0),
                table.cast_types[*i]
            )
        })
        .collect();
    let counters: Vec<(usize, usize)> = table
        .counters
        .iter()
        .copied()
        .filter(|(c, p)| cols.contains(c) && cols.contains(p))
        .collect();
    // CRDT counters merge whatever the row's version; the other columns
    // follow the version guard, which then decides per column.
    let (set, when) = if counters.is_empty() {
        (
            table.set_non_key(cols.iter().copied(), |c, _| format!("EXCLUDED.{c}")),
            GUARD.to_string(),
        )
    } else {
        let set = table.set_non_key(cols.iter().copied(), |c, i| {
            table
                .counter_set(i)
                .unwrap_or_else(|| format!("CASE WHEN {GUARD} THEN EXCLUDED.{c} ELSE t.{c} END"))
        });
        let changed: Vec<String> = counters
            .iter()
            .map(|(_, p)| {
                let merged = table.counter_set(*p).expect("a companion column");
                format!(
                    "{merged} IS DISTINCT FROM t.{}",
                    quote_ident(&table.columns[*p].0)
                )
            })
            .collect();
        (set, format!("{GUARD} OR {}", changed.join(" OR ")))
    };
    format!(
        "INSERT INTO {ident} AS t ({names})
         SELECT {casts} FROM {from}
          WHERE {tombstone_guard}
         ON CONFLICT ({keys}) DO UPDATE SET {set} WHERE {when}",
        ident = table.ident,
        names = names.join(", "),
        casts = casts.join(", "),
        tombstone_guard = tombstone_guard(table_param),
        keys = table.key_idents(),
    )
}

/// The guarded update of rows some of whose columns were not sent
/// (unchanged TOAST): they keep the stored value, so such rows only update.
fn guarded_update_sql(
    table: &TargetTable,
    cols: &[usize],
    from: &str,
    table_param: usize,
) -> String {
    let set = table.set_non_key(cols.iter().copied(), |c, i| {
        format!("b.{c}::{}", table.cast_types[i])
    });
    format!(
        "UPDATE {ident} AS t SET {set}
           FROM {from}
          WHERE {key_match} AND {tombstone_guard}
            AND (t.hlc, t.origin_region COLLATE \"C\") < (b.hlc::bigint, b.origin_region COLLATE \"C\")",
        ident = table.ident,
        key_match = table.key_match("b"),
        tombstone_guard = tombstone_guard(table_param),
    )
}

async fn delete(
    client: &impl GenericClient,
    table: &TargetTable,
    deletes: &[&PreparedDelete],
) -> Result<Applied, tokio_postgres::Error> {
    let nkeys = table.key.len();
    let mut key_arrays: Vec<Vec<Option<&str>>> = vec![Vec::with_capacity(deletes.len()); nkeys];
    let mut keys = Vec::with_capacity(deletes.len());
    let mut hlcs = Vec::with_capacity(deletes.len());
    let mut origins = Vec::with_capacity(deletes.len());
    for d in deletes {
        for (slot, v) in d.key_values.iter().enumerate() {
            key_arrays[slot].push(v.as_deref());
        }
        keys.push(d.key_text.as_str());
        hlcs.push(d.hlc);
        origins.push(d.origin.as_str());
    }
    let unnest: Vec<String> = (1..=nkeys).map(|n| format!("${n}::text[]")).collect();
    let key_match = table.key_match("d");
    let (pk, ph, po, pt) = (nkeys + 1, nkeys + 2, nkeys + 3, nkeys + 4);
    let sql = format!(
        "WITH d AS (
            SELECT * FROM unnest({unnest}, ${pk}::text[], ${ph}::bigint[], ${po}::text[])
                       AS d({key_names}, \"__key\", \"__hlc\", \"__origin\")
         ),
         gone AS (
            DELETE FROM {ident} AS t USING d
             WHERE {key_match}
               AND (t.hlc, t.origin_region COLLATE \"C\") < (d.\"__hlc\", d.\"__origin\" COLLATE \"C\")
            RETURNING 1
         ),
         marked AS (
            INSERT INTO regionsync.tombstones AS ts (table_name, row_key, hlc, origin_region)
            SELECT ${pt}, d.\"__key\", d.\"__hlc\", d.\"__origin\" FROM d
             -- a row newer than the delete survives it: no tombstone then
             -- (OFFSET 0: an index probe per key, as in the upsert)
             WHERE NOT EXISTS (SELECT 1 FROM {ident} AS t WHERE {key_match}
                  AND (t.hlc, t.origin_region COLLATE \"C\") >= (d.\"__hlc\", d.\"__origin\" COLLATE \"C\")
                  OFFSET 0)
            ON CONFLICT (table_name, row_key) DO UPDATE
               SET hlc = EXCLUDED.hlc, origin_region = EXCLUDED.origin_region, deleted_at = now()
             WHERE (ts.hlc, ts.origin_region COLLATE \"C\") < (EXCLUDED.hlc, EXCLUDED.origin_region COLLATE \"C\")
            RETURNING 1
         )
         SELECT (SELECT count(*) FROM gone), (SELECT count(*) FROM marked)",
        unnest = unnest.join(", "),
        key_names = table.key_idents(),
        ident = table.ident,
    );
    let mut params: Vec<&(dyn ToSql + Sync)> = key_arrays
        .iter()
        .map(|a| a as &(dyn ToSql + Sync))
        .collect();
    params.push(&keys);
    params.push(&hlcs);
    params.push(&origins);
    params.push(&table.name);
    let statement = client.prepare_cached(&sql).await?;
    let row: PgRow = client.query_one(&statement, &params).await?;
    let (gone, marked): (i64, i64) = (row.get(0), row.get(1));
    // A delete counts as applied if it removed a row or newly marked the key.
    let applied = gone.max(marked) as u64;
    Ok(Applied {
        applied,
        stale: deletes.len() as u64 - applied.min(deletes.len() as u64),
        ..Applied::default()
    })
}

/// A truncate committed at `source_ts_ms` in `origin`: removes the rows
/// written before it and marks the table (regionsync.truncations), so a late
/// older change from another partition or region is refused like a deleted
/// row's. Rows with a newer HLC (written after the truncate) stay.
pub async fn apply_truncate(
    client: &impl GenericClient,
    table: &TargetTable,
    source_ts_ms: i64,
    origin: &str,
) -> Result<Applied, tokio_postgres::Error> {
    let cutoff = crate::clock::Hlc::at_ms_saturating(source_ts_ms).0;
    client
        .execute(
            &format!("DELETE FROM {} WHERE hlc < $1", table.ident),
            &[&cutoff],
        )
        .await?;
    client
        .execute(
            "INSERT INTO regionsync.truncations AS tr (table_name, hlc, origin_region)
             VALUES ($1, $2, $3)
             ON CONFLICT (table_name) DO UPDATE
                SET hlc = EXCLUDED.hlc, origin_region = EXCLUDED.origin_region, truncated_at = now()
              WHERE tr.hlc < EXCLUDED.hlc",
            &[&table.name, &cutoff, &origin],
        )
        .await?;
    // The truncate itself is the one change applied, whatever it removed.
    Ok(Applied {
        applied: 1,
        ..Applied::default()
    })
}
