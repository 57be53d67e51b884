//! Apply: batches of decoded changes written to PostgreSQL in bulk, under the
//! version guard of DESIGN.md §4, inside the caller's transaction (which also
//! stores the partition's offset, see `offsets`).
//!
//! What it promises:
//! - Several changes of one key in a batch collapse to the last one, so the
//!   batch's net effect per key is that of the last change (update → delete →
//!   update ends with the row present).
//! - An upsert lands only where its `(hlc, origin_region)` is newer than the
//!   stored row's and than the key's tombstone; a delete only removes an
//!   older row, and leaves a tombstone. Region names compare bytewise.
//! - One statement per table and kind per batch: every value is bound as a
//!   `text[]` array parameter and cast in SQL to the column's type, so the
//!   round trips do not grow with the batch. Each statement is prepared once
//!   per connection (the pool's statement cache, one entry per table and
//!   set of columns): a batch's statements are not parsed and analysed
//!   again, and take one round trip, not two. They are still planned on
//!   every execution (`ops::APPLY_SESSION_SQL` says why).
//! - A truncate removes the rows older than its commit time (not newer ones),
//!   so replaying a topic never undoes later writes.

use std::borrow::Cow;
use std::collections::BTreeMap;

use rustc_hash::FxHashMap;

use deadpool_postgres::GenericClient;
use tokio_postgres::types::ToSql;
use tokio_postgres::Row as PgRow;

use crate::config::{Policy, TableConfig, SHARED};
use crate::decode::{Change, Field, Op, PgType, Row};

/// A replicated table as the target database describes it.
#[derive(Clone, Debug)]
pub struct TargetTable {
    /// `schema.table`, as stored in `regionsync.tombstones.table_name`.
    pub name: String,
    /// The quoted, schema-qualified identifier for SQL.
    pub ident: String,
    /// Columns in table order: (name, type as `format_type` prints it).
    pub columns: Vec<(String, String)>,
    /// `columns`' types parsed for rendering, in the same order.
    pub pg_types: Vec<PgType>,
    /// Positions of the key columns in `columns`.
    pub key: Vec<usize>,
    /// Source column name → position in `columns`, renames applied
    /// (looked up for every column of every change).
    pub by_source: FxHashMap<String, usize>,
    /// How the rows are homed; `None` for a shared table.
    pub homing: Option<Homing>,
    /// Residency patterns for pinned rows (`route::resident_in`).
    pub residency: Vec<String>,
    /// CRDT counters: (counter column, companion column of per-region
    /// components), positions in `columns`.
    pub counters: Vec<(usize, usize)>,
}

/// How a table's rows find their home region (DESIGN.md §3).
#[derive(Clone, Debug)]
pub struct Homing {
    /// The affinity column (position in `columns`); `None`: only pins.
    pub affinity: Option<usize>,
    /// The pin column (`home_region_column`), which wins where not NULL.
    pub pin: Option<usize>,
    /// Every region, in routing order.
    pub regions: Vec<String>,
    pub policy: Policy,
}

impl Homing {
    /// The home region of a row given (some of) its rendered values; `None`
    /// if neither the pin nor the affinity value is among them.
    pub fn home(&self, values: &[(usize, Option<String>)]) -> Option<String> {
        let value = |col: Option<usize>| {
            col.and_then(|c| values.iter().find(|(i, _)| *i == c))
                .and_then(|(_, v)| v.as_deref())
        };
        if let Some(pinned) = value(self.pin) {
            return Some(pinned.to_string());
        }
        value(self.affinity).map(|key| crate::route::home_region(key, &self.regions).to_string())
    }

    /// The pin among (some of) a row's rendered values, if set.
    pub fn pin(&self, values: &[(usize, Option<String>)]) -> Option<String> {
        let pin = self.pin?;
        values
            .iter()
            .find(|(i, _)| *i == pin)
            .and_then(|(_, v)| v.clone())
    }

    /// The columns a home is computed from.
    fn columns(&self) -> impl Iterator<Item = usize> {
        self.affinity.into_iter().chain(self.pin)
    }
}

/// Quotes an identifier for SQL (names come from configuration).
pub fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// Why a table cannot be replicated into.
#[derive(Debug, thiserror::Error)]
pub enum TableError {
    #[error("table {0} does not exist in the target database")]
    Missing(String),
    #[error("table {table}: key column {column} does not exist")]
    MissingKeyColumn { table: String, column: String },
    #[error("table {table}: no {column} column; every replicated table needs `hlc bigint not null` and `origin_region text not null` (schemas/regionsync.sql)")]
    MissingVersionColumn { table: String, column: &'static str },
    #[error("table {table}: {field} column {column} does not exist")]
    MissingHomingColumn {
        table: String,
        field: &'static str,
        column: String,
    },
    #[error("table {table}: counter companion column {column} is {found}, not jsonb")]
    CounterCompanionType {
        table: String,
        column: String,
        found: String,
    },
    #[error("table {table}: key {key:?} is not its primary key or a unique index")]
    KeyNotUnique { table: String, key: Vec<String> },
    #[error(transparent)]
    Postgres(#[from] tokio_postgres::Error),
}

impl TargetTable {
    /// Reads the table's columns and checks what the applier relies on.
    pub async fn load(
        client: &impl tokio_postgres::GenericClient,
        config: &TableConfig,
        regions: &[String],
    ) -> Result<TargetTable, TableError> {
        let (schema, table) = config.target_parts();
        let name = format!("{schema}.{table}");
        let rows = client
            .query(
                "SELECT a.attname::text, format_type(a.atttypid, a.atttypmod)
                   FROM pg_attribute a
                   JOIN pg_class c ON c.oid = a.attrelid
                   JOIN pg_namespace n ON n.oid = c.relnamespace
                  WHERE n.nspname = $1 AND c.relname = $2
                    AND a.attnum > 0 AND NOT a.attisdropped
                  ORDER BY a.attnum",
                &[&schema, &table],
            )
            .await?;
        if rows.is_empty() {
            return Err(TableError::Missing(name));
        }
        let columns: Vec<(String, String)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
        let position = |c: &str| columns.iter().position(|(n, _)| n == c);
        let mut key = Vec::new();
        for k in &config.key {
            key.push(position(k).ok_or_else(|| TableError::MissingKeyColumn {
                table: name.clone(),
                column: k.clone(),
            })?);
        }
        for column in ["hlc", "origin_region"] {
            if position(column).is_none() {
                return Err(TableError::MissingVersionColumn {
                    table: name.clone(),
                    column,
                });
            }
        }
        // ON CONFLICT needs a unique index on exactly the key columns.
        let unique: bool = client
            .query_one(
                "SELECT EXISTS (
                   SELECT 1 FROM pg_index i
                    WHERE i.indrelid = (quote_ident($1) || '.' || quote_ident($2))::regclass
                      AND i.indisunique
                      AND (SELECT array_agg(a.attname::text ORDER BY a.attname)
                             FROM pg_attribute a
                            WHERE a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey))
                          = (SELECT array_agg(k ORDER BY k) FROM unnest($3::text[]) k))",
                &[&schema, &table, &config.key],
            )
            .await?
            .get(0);
        if !unique {
            return Err(TableError::KeyNotUnique {
                table: name,
                key: config.key.clone(),
            });
        }
        let homing_column = |field: &'static str, column: &str| {
            position(column).ok_or_else(|| TableError::MissingHomingColumn {
                table: name.clone(),
                field,
                column: column.to_string(),
            })
        };
        let mut counters = Vec::new();
        for (counter, companion) in &config.counters {
            let c = homing_column("counters", counter)?;
            let p = homing_column("counters (companion)", companion)?;
            if columns[p].1 != "jsonb" {
                return Err(TableError::CounterCompanionType {
                    table: name.clone(),
                    column: companion.clone(),
                    found: columns[p].1.clone(),
                });
            }
            counters.push((c, p));
        }
        let homing = if config.is_homed() {
            Some(Homing {
                affinity: match config.affinity.as_str() {
                    SHARED => None,
                    column => Some(homing_column("affinity", column)?),
                },
                pin: match &config.home_region_column {
                    Some(column) => Some(homing_column("home_region_column", column)?),
                    None => None,
                },
                regions: regions.to_vec(),
                policy: config.policy,
            })
        } else {
            None
        };
        Ok(TargetTable {
            by_source: source_positions(&columns, &config.columns),
            pg_types: columns.iter().map(|(_, t)| PgType::parse(t)).collect(),
            ident: format!("{}.{}", quote_ident(schema), quote_ident(table)),
            name,
            columns,
            key,
            homing,
            residency: config.residency.clone(),
            counters,
        })
    }

    /// The key columns, quoted, comma-joined.
    pub fn key_idents(&self) -> String {
        self.key
            .iter()
            .map(|i| quote_ident(&self.columns[*i].0))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// `t.k = alias.k::type AND …` over the key columns: the target row
    /// (`t`) of a text-valued row named `alias`.
    pub fn key_match(&self, alias: &str) -> String {
        self.key
            .iter()
            .map(|i| {
                let c = quote_ident(&self.columns[*i].0);
                format!("t.{c} = {alias}.{c}::{}", self.columns[*i].1)
            })
            .collect::<Vec<_>>()
            .join(" AND ")
    }

    /// `c = <value>, …` for the non-key columns among `cols` (positions in
    /// `columns`); `value` gets each one's quoted name and position.
    pub fn set_non_key(
        &self,
        cols: impl IntoIterator<Item = usize>,
        value: impl Fn(&str, usize) -> String,
    ) -> String {
        cols.into_iter()
            .filter(|i| !self.key.contains(i))
            .map(|i| {
                let c = quote_ident(&self.columns[i].0);
                format!("{c} = {}", value(&c, i))
            })
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// The value an upsert's `ON CONFLICT … SET` gives column `i` if it is a
    /// CRDT counter or its companion: the stored and incoming components
    /// merged (the larger per region), and the counter their sum.
    pub fn counter_set(&self, i: usize) -> Option<String> {
        let merged = |p: usize| {
            let p = quote_ident(&self.columns[p].0);
            format!("regionsync.counter_merge(t.{p}, EXCLUDED.{p})")
        };
        self.counters.iter().find_map(|(c, p)| {
            if *c == i {
                Some(format!("regionsync.counter_value({})", merged(*p)))
            } else if *p == i {
                Some(merged(*p))
            } else {
                None
            }
        })
    }

    fn column_index(&self, source: &str) -> Option<usize> {
        self.by_source.get(source).copied()
    }
}

/// Source column name → position in `columns`: a column's own name, unless
/// the config maps that source name to another column (`columns = { source
/// = "target" }`), which wins; a mapping to no column maps to nothing.
fn source_positions(
    columns: &[(String, String)],
    rename: &BTreeMap<String, String>,
) -> FxHashMap<String, usize> {
    let mut by_source: FxHashMap<String, usize> = columns
        .iter()
        .enumerate()
        .map(|(i, (name, _))| (name.clone(), i))
        .collect();
    for (source, target) in rename {
        match columns.iter().position(|(n, _)| n == target) {
            Some(i) => by_source.insert(source.clone(), i),
            None => by_source.remove(source),
        };
    }
    by_source
}

/// A change that cannot be applied, for the dead-letter topic.
#[derive(Debug, thiserror::Error)]
pub enum RowError {
    #[error("{table}: column {column}: {problem}")]
    Value {
        table: String,
        column: String,
        problem: String,
    },
    #[error("{table}: {problem}")]
    Shape { table: String, problem: String },
}

impl RowError {
    /// A short, bounded label for metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            RowError::Value { .. } => "bad_value",
            RowError::Shape { .. } => "bad_shape",
        }
    }
}

/// One row's final state in a batch.
#[derive(Clone, Debug, PartialEq)]
pub enum Final {
    Upsert(PreparedRow),
    Delete(PreparedDelete),
}

/// An upsert's values, rendered as PostgreSQL text, in target column order.
#[derive(Clone, Debug, PartialEq)]
pub struct PreparedRow {
    pub key_text: String,
    /// (target column index, value); None is SQL NULL.
    pub values: Vec<(usize, Option<String>)>,
    /// Target columns whose value Debezium did not send (unchanged TOAST):
    /// the stored value is kept.
    pub unavailable: Vec<usize>,
    pub hlc: i64,
    pub origin: String,
    /// The version the writer replaced (the before image's), if it sent one:
    /// what conflict detection compares with the stored version.
    pub replaced: Option<(i64, String)>,
    /// The row's home region (homed tables).
    pub home: Option<String>,
    /// The row's pin (`home_region_column`), if set.
    pub pin: Option<String>,
    /// From a snapshot read (op `r`), not a write.
    pub snapshot: bool,
}

#[derive(Clone, Debug, PartialEq)]
pub struct PreparedDelete {
    pub key_text: String,
    /// Key values in `TargetTable::key` order.
    pub key_values: Vec<Option<String>>,
    pub hlc: i64,
    pub origin: String,
    /// The version the delete replaced (its before image's), if known.
    pub replaced: Option<(i64, String)>,
    /// The row's home region (homed tables), from the before image.
    pub home: Option<String>,
    /// The row's pin (`home_region_column`), from the before image.
    pub pin: Option<String>,
}

impl PreparedRow {
    /// Carries the same columns, in the same order, and keeps the same
    /// unsent ones: one statement can apply both. (Rows of one schema list
    /// their columns in one order; another order only makes another group.)
    fn same_columns(&self, other: &PreparedRow) -> bool {
        self.unavailable == other.unavailable
            && self.values.len() == other.values.len()
            && self
                .values
                .iter()
                .zip(&other.values)
                .all(|((a, _), (b, _))| a == b)
    }
}

impl Final {
    pub fn key_text(&self) -> &str {
        match self {
            Final::Upsert(r) => &r.key_text,
            Final::Delete(d) => &d.key_text,
        }
    }
    pub fn version(&self) -> (i64, &str) {
        match self {
            Final::Upsert(r) => (r.hlc, &r.origin),
            Final::Delete(d) => (d.hlc, &d.origin),
        }
    }
    pub fn replaced(&self) -> Option<&(i64, String)> {
        match self {
            Final::Upsert(r) => r.replaced.as_ref(),
            Final::Delete(d) => d.replaced.as_ref(),
        }
    }
    fn set_replaced(&mut self, replaced: Option<(i64, String)>) {
        match self {
            Final::Upsert(r) => r.replaced = replaced,
            Final::Delete(d) => d.replaced = replaced,
        }
    }
    pub fn home(&self) -> Option<&str> {
        match self {
            Final::Upsert(r) => r.home.as_deref(),
            Final::Delete(d) => d.home.as_deref(),
        }
    }
    pub fn pin(&self) -> Option<&str> {
        match self {
            Final::Upsert(r) => r.pin.as_deref(),
            Final::Delete(d) => d.pin.as_deref(),
        }
    }
}

/// The `(hlc, origin_region)` of a row image, if it has both.
fn version_of(row: &Row) -> Option<(i64, String)> {
    Some((
        int_of(row, "hlc")?,
        str_of(row, "origin_region")?.to_string(),
    ))
}

fn row_error(table: &TargetTable, column: &str, problem: impl ToString) -> RowError {
    RowError::Value {
        table: table.name.clone(),
        column: column.to_string(),
        problem: problem.to_string(),
    }
}

fn int_of(row: &Row, column: &str) -> Option<i64> {
    match row.get(column).map(|t| &t.field) {
        Some(Field::Int(v)) => Some(*v),
        Some(Field::String(s)) => s.parse().ok(),
        _ => None,
    }
}

fn str_of<'a>(row: &'a Row, column: &str) -> Option<&'a str> {
    match row.get(column).map(|t| &t.field) {
        Some(Field::String(s)) => Some(s),
        _ => None,
    }
}

/// The key as text: one column's PostgreSQL text, or a JSON array of them
/// for composite keys, spelled as `regionsync.row_key()` in
/// schemas/regionsync.sql spells it (jsonb's text form).
fn key_text(values: &[Option<String>]) -> String {
    match values {
        [Some(one)] => one.clone(),
        _ => {
            let parts: Vec<String> = values
                .iter()
                .map(|v| serde_json::to_string(v).unwrap_or_default())
                .collect();
            format!("[{}]", parts.join(", "))
        }
    }
}

/// Renders one source row image into target columns. Takes the image: its
/// texts become the statement's without a copy where they need no change.
fn render(table: &TargetTable, row: Row, before: Option<&Row>) -> Result<PreparedRow, RowError> {
    let hlc =
        int_of(&row, "hlc").ok_or_else(|| row_error(table, "hlc", "missing or not an integer"))?;
    let origin = str_of(&row, "origin_region")
        .ok_or_else(|| row_error(table, "origin_region", "missing or not text"))?
        .to_string();
    let mut values = Vec::with_capacity(row.len());
    let mut unavailable = Vec::new();
    for (source_col, typed) in row {
        // Columns the target does not have are not replicated.
        let Some(idx) = table.column_index(&source_col) else {
            continue;
        };
        let name = &table.columns[idx].0;
        let ty = &table.pg_types[idx];
        let text = if typed.field == Field::Unavailable {
            // With REPLICA IDENTITY FULL the before image has the value.
            match before.and_then(|b| b.get(&source_col)) {
                Some(b) if b.field != Field::Unavailable => b.to_pg_text_as(ty),
                _ => {
                    unavailable.push(idx);
                    continue;
                }
            }
        } else {
            typed.into_pg_text_as(ty)
        };
        values.push((idx, text.map_err(|e| row_error(table, name, e))?));
    }
    let key_values = key_values(table, &values)?;
    let home = table.homing.as_ref().and_then(|h| h.home(&values));
    let pin = table.homing.as_ref().and_then(|h| h.pin(&values));
    Ok(PreparedRow {
        key_text: key_text(&key_values),
        values,
        unavailable,
        hlc,
        origin,
        replaced: before.and_then(version_of),
        home,
        pin,
        snapshot: false,
    })
}

fn key_values(
    table: &TargetTable,
    values: &[(usize, Option<String>)],
) -> Result<Vec<Option<String>>, RowError> {
    table
        .key
        .iter()
        .map(|k| {
            let v = values
                .iter()
                .find(|(i, _)| i == k)
                .and_then(|(_, v)| v.clone());
            match v {
                Some(v) => Ok(Some(v)),
                None => Err(row_error(
                    table,
                    &table.columns[*k].0,
                    "key column is missing or null",
                )),
            }
        })
        .collect()
}

/// The final state one change asks for, from region `source_region`.
pub fn prepare(
    table: &TargetTable,
    change: Change,
    source_region: &str,
) -> Result<Final, RowError> {
    match change.op {
        Op::Create | Op::Update | Op::Read => {
            let after = change.after.ok_or_else(|| RowError::Shape {
                table: table.name.clone(),
                problem: format!("{:?} without an after image", change.op),
            })?;
            let mut row = render(table, after, change.before.as_ref())?;
            row.snapshot = change.op == Op::Read;
            Ok(Final::Upsert(row))
        }
        Op::Delete => {
            // The key message carries the key; the before image (REPLICA
            // IDENTITY FULL) carries the version the delete replaced.
            let image = change.before.as_ref().unwrap_or(&change.key);
            let mut values = Vec::new();
            let homing_columns: Vec<usize> =
                table.homing.iter().flat_map(|h| h.columns()).collect();
            for (source_col, typed) in image.iter().chain(change.key.iter()) {
                if let Some(idx) = table.column_index(source_col) {
                    let wanted = table.key.contains(&idx) || homing_columns.contains(&idx);
                    if wanted && !values.iter().any(|(i, _)| *i == idx) {
                        let text = typed
                            .to_pg_text_as(&table.pg_types[idx])
                            .map_err(|e| row_error(table, source_col, e))?;
                        values.push((idx, text));
                    }
                }
            }
            let key_values = key_values(table, &values)?;
            // The delete is the version right after the one it replaced: the
            // source's own tombstone (regionsync.mark_deleted) has the same
            // version, and orders a later re-insert of the key after it.
            // (The commit time cannot serve: a re-insert in the same
            // transaction or millisecond is stamped before the commit.)
            let hlc = match change.before.as_ref().and_then(|b| int_of(b, "hlc")) {
                Some(before) => before + 1,
                None => change.source_ts_ms << crate::clock::LOGICAL_BITS,
            };
            Ok(Final::Delete(PreparedDelete {
                key_text: key_text(&key_values),
                key_values,
                hlc,
                origin: source_region.to_string(),
                replaced: change.before.as_ref().and_then(version_of),
                home: table.homing.as_ref().and_then(|h| h.home(&values)),
                pin: table.homing.as_ref().and_then(|h| h.pin(&values)),
            }))
        }
        Op::Truncate => Err(RowError::Shape {
            table: table.name.clone(),
            problem: "a truncate is applied by apply_truncate, not as a row".into(),
        }),
    }
}

/// Keeps the last final state per key, in first-seen key order, with the
/// version the first of them replaced (what the batch as a whole replaces,
/// for conflict detection). Borrows the changes: the batch keeps them for a
/// retry, and only a change whose replaced version this alters is copied.
pub fn collapse<'a>(finals: impl IntoIterator<Item = &'a Final>) -> Vec<Cow<'a, Final>> {
    let finals = finals.into_iter();
    let mut position: FxHashMap<&'a str, usize> =
        FxHashMap::with_capacity_and_hasher(finals.size_hint().0, Default::default());
    let mut out: Vec<Cow<'a, Final>> = Vec::with_capacity(finals.size_hint().0);
    for f in finals {
        match position.get(f.key_text()) {
            Some(&i) => {
                let first = out[i].replaced();
                out[i] = if f.replaced() == first {
                    Cow::Borrowed(f)
                } else {
                    let mut f = f.clone();
                    f.set_replaced(first.cloned());
                    Cow::Owned(f)
                };
            }
            None => {
                position.insert(f.key_text(), out.len());
                out.push(Cow::Borrowed(f));
            }
        }
    }
    out
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
    for rows in groups {
        result += upsert(client, table, &rows).await?;
    }
    if !deletes.is_empty() {
        result += delete(client, table, &deletes).await?;
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
    let names: Vec<String> = cols
        .iter()
        .map(|i| quote_ident(&table.columns[*i].0))
        .collect();
    let casts: Vec<String> = cols
        .iter()
        .map(|i| {
            format!(
                "b.{}::{}",
                quote_ident(&table.columns[*i].0),
                table.columns[*i].1
            )
        })
        .collect();
    let unnest: Vec<String> = (1..=cols.len()).map(|n| format!("${n}::text[]")).collect();
    let key_param = cols.len() + 1;
    let table_param = cols.len() + 2;
    // Unsent (TOAST) columns keep the stored value: they are not in the
    // statement at all. An insert of such a row could not know the value, so
    // those rows only update.
    let guard = "(t.hlc, t.origin_region COLLATE \"C\") < (EXCLUDED.hlc, EXCLUDED.origin_region COLLATE \"C\")";
    // OFFSET 0 keeps this a probe of the tombstone index per row. Without
    // it PostgreSQL may plan an anti-join that hashes all of the table's
    // tombstones every batch, and did while a table's tombstones grew from
    // none (stale statistics): PostgreSQL's CPU per 1M changes doubled.
    // A table has at most one truncate mark (keyed by the table's name), so
    // that test is a scalar subquery, read once per statement; as a NOT
    // EXISTS it was planned as an anti-join probing the mark's index per row.
    let tombstone_guard = format!(
        "NOT EXISTS (SELECT 1 FROM regionsync.tombstones ts
                      WHERE ts.table_name = ${table_param} AND ts.row_key = b.\"__key\"
                        AND (ts.hlc, ts.origin_region COLLATE \"C\")
                            >= (b.hlc::bigint, b.origin_region COLLATE \"C\")
                     OFFSET 0)
         AND coalesce(b.hlc::bigint >= (SELECT tr.hlc FROM regionsync.truncations tr
                                         WHERE tr.table_name = ${table_param}), true)"
    );
    let counters: Vec<(usize, usize)> = table
        .counters
        .iter()
        .copied()
        .filter(|(c, p)| cols.contains(c) && cols.contains(p))
        .collect();
    let sql = if unavailable.is_empty() {
        // CRDT counters merge whatever the row's version; the other columns
        // follow the version guard, which then decides per column.
        let (set, when) = if counters.is_empty() {
            (
                table.set_non_key(cols.iter().copied(), |c, _| format!("EXCLUDED.{c}")),
                guard.to_string(),
            )
        } else {
            let set = table.set_non_key(cols.iter().copied(), |c, i| {
                table.counter_set(i).unwrap_or_else(|| {
                    format!("CASE WHEN {guard} THEN EXCLUDED.{c} ELSE t.{c} END")
                })
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
            (set, format!("{guard} OR {}", changed.join(" OR ")))
        };
        format!(
            "INSERT INTO {ident} AS t ({names})
             SELECT {casts} FROM unnest({unnest}, ${key_param}::text[]) AS b({names}, \"__key\")
              WHERE {tombstone_guard}
             ON CONFLICT ({keys}) DO UPDATE SET {set} WHERE {when}",
            ident = table.ident,
            names = names.join(", "),
            casts = casts.join(", "),
            unnest = unnest.join(", "),
            keys = table.key_idents(),
        )
    } else {
        let set = table.set_non_key(cols.iter().copied(), |c, i| {
            format!("b.{c}::{}", table.columns[i].1)
        });
        format!(
            "UPDATE {ident} AS t SET {set}
               FROM unnest({unnest}, ${key_param}::text[]) AS b({names}, \"__key\")
              WHERE {key_match} AND {tombstone_guard}
                AND (t.hlc, t.origin_region COLLATE \"C\") < (b.hlc::bigint, b.origin_region COLLATE \"C\")",
            ident = table.ident,
            unnest = unnest.join(", "),
            names = names.join(", "),
            key_match = table.key_match("b"),
        )
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
    let cutoff = source_ts_ms << crate::clock::LOGICAL_BITS;
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decode::Typed;

    #[test]
    fn source_columns_find_their_target_renames_first() {
        let columns: Vec<(String, String)> = ["id", "mail", "email"]
            .iter()
            .map(|n| (n.to_string(), "text".to_string()))
            .collect();
        let rename: BTreeMap<String, String> = [
            ("email_address", "mail"),
            ("email", "mail"),
            ("gone", "no_such_column"),
        ]
        .iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect();
        let by = source_positions(&columns, &rename);
        assert_eq!(by.get("id"), Some(&0));
        assert_eq!(by.get("email_address"), Some(&1));
        // A mapping wins over a column of the same name.
        assert_eq!(by.get("email"), Some(&1));
        assert_eq!(by.get("mail"), Some(&1));
        assert_eq!(by.get("gone"), None);
        assert_eq!(by.get("other"), None);
    }

    fn table() -> TargetTable {
        let columns: Vec<(String, String)> = vec![
            ("id".into(), "bigint".into()),
            ("email".into(), "text".into()),
            ("bio".into(), "text".into()),
            ("hlc".into(), "bigint".into()),
            ("origin_region".into(), "text".into()),
        ];
        TargetTable {
            name: "public.users".into(),
            ident: "\"public\".\"users\"".into(),
            by_source: source_positions(&columns, &BTreeMap::new()),
            pg_types: columns.iter().map(|(_, t)| PgType::parse(t)).collect(),
            columns,
            key: vec![0],
            homing: None,
            residency: Vec::new(),
            counters: Vec::new(),
        }
    }

    fn t(field: Field) -> Typed {
        Typed {
            field,
            semantic: None,
        }
    }

    fn row(id: i64, email: &str, bio: Field, hlc: i64) -> Row {
        [
            ("id".to_string(), t(Field::Int(id))),
            ("email".to_string(), t(Field::String(email.into()))),
            ("bio".to_string(), t(bio)),
            ("hlc".to_string(), t(Field::Int(hlc))),
            (
                "origin_region".to_string(),
                t(Field::String("us-east-1".into())),
            ),
            ("dropped_in_target".to_string(), t(Field::Int(1))),
        ]
        .into_iter()
        .collect()
    }

    fn change(op: Op, id: i64, before: Option<Row>, after: Option<Row>) -> Change {
        Change {
            op,
            schema: "public".into(),
            table: "users".into(),
            key: [("id".to_string(), t(Field::Int(id)))]
                .into_iter()
                .collect(),
            before,
            after,
            source_ts_ms: 1_000,
            lsn: None,
            origin: None,
            snapshot: false,
        }
    }

    #[test]
    fn an_upsert_renders_target_columns_and_its_version() {
        let c = change(
            Op::Create,
            7,
            None,
            Some(row(7, "a@x", Field::String("b".into()), 99)),
        );
        let Final::Upsert(r) = prepare(&table(), c.clone(), "us-east-1").unwrap() else {
            panic!("upsert expected")
        };
        assert_eq!(r.key_text, "7");
        assert_eq!(r.hlc, 99);
        assert_eq!(r.origin, "us-east-1");
        assert!(r.values.contains(&(1, Some("a@x".into()))));
        assert_eq!(r.values.len(), 5, "the column the target lacks is left out");
    }

    #[test]
    fn an_unsent_toast_value_comes_from_the_before_image_or_is_kept() {
        let before = row(7, "a@x", Field::String("long bio".into()), 5);
        let after = row(7, "b@x", Field::Unavailable, 6);
        let c = change(Op::Update, 7, Some(before), Some(after.clone()));
        let Final::Upsert(r) = prepare(&table(), c.clone(), "us-east-1").unwrap() else {
            panic!()
        };
        assert!(r.values.contains(&(2, Some("long bio".into()))));
        assert!(r.unavailable.is_empty());

        let c = change(Op::Update, 7, None, Some(after));
        let Final::Upsert(r) = prepare(&table(), c.clone(), "us-east-1").unwrap() else {
            panic!()
        };
        assert_eq!(r.unavailable, vec![2]);
        assert!(!r.values.iter().any(|(i, _)| *i == 2));
    }

    #[test]
    fn a_delete_is_versioned_after_the_row_it_replaced() {
        let before = row(7, "a@x", Field::Null, (5_000 << 16) + 3);
        let c = change(Op::Delete, 7, Some(before), None);
        let Final::Delete(d) = prepare(&table(), c.clone(), "us-east-1").unwrap() else {
            panic!()
        };
        assert_eq!(d.hlc, (5_000 << 16) + 4, "before.hlc + 1");
        // Even when the commit time is later: a re-insert stamped before the
        // commit (same transaction or millisecond) must still win.
        let mut c = change(
            Op::Delete,
            7,
            Some(row(7, "a@x", Field::Null, 500 << 16)),
            None,
        );
        c.source_ts_ms = 501;
        let Final::Delete(d) = prepare(&table(), c.clone(), "us-east-1").unwrap() else {
            panic!()
        };
        assert_eq!(d.hlc, (500 << 16) + 1);
        assert_eq!(d.key_values, vec![Some("7".to_string())]);
        let c = change(Op::Delete, 8, None, None);
        let Final::Delete(d) = prepare(&table(), c.clone(), "eu-west-1").unwrap() else {
            panic!()
        };
        assert_eq!(d.hlc, 1_000 << 16);
        assert_eq!(d.origin, "eu-west-1");
    }

    #[test]
    fn collapse_keeps_the_last_change_per_key() {
        let up = |id: i64, hlc: i64| {
            let c = change(Op::Update, id, None, Some(row(id, "x", Field::Null, hlc)));
            prepare(&table(), c.clone(), "us-east-1").unwrap()
        };
        let del =
            |id: i64| prepare(&table(), change(Op::Delete, id, None, None), "us-east-1").unwrap();
        // update → delete → update ends with the row present.
        let changes = [up(1, 1), del(1), up(2, 1), up(1, 3)];
        let out = collapse(&changes);
        assert_eq!(out.len(), 2);
        assert!(matches!(&*out[0], Final::Upsert(r) if r.key_text == "1" && r.hlc == 3));
        assert!(matches!(&*out[1], Final::Upsert(r) if r.key_text == "2"));
        // update → delete ends deleted.
        let changes = [up(1, 1), del(1)];
        let out = collapse(&changes);
        assert!(matches!(&out[..], [d] if matches!(**d, Final::Delete(_))));
    }

    #[test]
    fn collapse_keeps_the_version_the_first_change_replaced() {
        let up = |before_hlc: i64, hlc: i64| {
            let before = row(1, "x", Field::Null, before_hlc);
            let c = change(
                Op::Update,
                1,
                Some(before),
                Some(row(1, "x", Field::Null, hlc)),
            );
            prepare(&table(), c.clone(), "us-east-1").unwrap()
        };
        let changes = [up(1, 2), up(2, 3), up(3, 4)];
        let out = collapse(&changes);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].version(), (4, "us-east-1"));
        assert_eq!(out[0].replaced(), Some(&(1, "us-east-1".to_string())));
        // Only that change is copied; a key met once is borrowed as it is.
        assert!(matches!(out[0], Cow::Owned(_)));
        let out = collapse(&changes[1..2]);
        assert!(matches!(&out[..], [Cow::Borrowed(f)] if std::ptr::eq(*f, &changes[1])));
    }

    #[test]
    fn a_homed_row_is_homed_by_its_pin_or_its_affinity_value() {
        let mut homed = table();
        homed.homing = Some(Homing {
            affinity: Some(0),
            pin: Some(2),
            regions: vec!["us-east-1".into(), "eu-west-1".into()],
            policy: Policy::Reject,
        });
        let upsert = |bio: Field| {
            let c = change(Op::Create, 7, None, Some(row(7, "x", bio, 1)));
            prepare(&homed, c.clone(), "us-east-1").unwrap()
        };
        let by_key = crate::route::home_region("7", &["us-east-1", "eu-west-1"]);
        assert_eq!(upsert(Field::Null).home(), Some(by_key));
        assert_eq!(
            upsert(Field::String("ap-south-1".into())).home(),
            Some("ap-south-1")
        );
        // A delete is homed from its before image.
        let before = row(7, "x", Field::String("eu-west-1".into()), 1);
        let d = prepare(
            &homed,
            change(Op::Delete, 7, Some(before), None),
            "us-east-1",
        )
        .unwrap();
        assert_eq!(d.home(), Some("eu-west-1"));
        assert_eq!(d.replaced(), Some(&(1, "us-east-1".to_string())));
    }

    #[test]
    fn a_null_key_is_a_row_error_naming_the_column() {
        let mut r = row(7, "a@x", Field::Null, 1);
        r.insert("id".into(), t(Field::Null));
        let err = prepare(&table(), change(Op::Create, 7, None, Some(r)), "us-east-1").unwrap_err();
        assert!(err.to_string().contains("column id"), "{err}");
    }

    #[test]
    fn identifiers_are_quoted() {
        assert_eq!(quote_ident("we\"ird"), "\"we\"\"ird\"");
    }
}
