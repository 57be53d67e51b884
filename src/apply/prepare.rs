//! Prepare: a decoded change rendered for its target table, as the final
//! state it asks for ([`Final`]): an upsert's values as PostgreSQL text in
//! column order with its version, home and pin, or a delete's key and
//! version. A value the column cannot hold is a [`RowError`] naming table,
//! column and type, each once. [`collapse`] keeps the last final state per
//! key.

use std::borrow::Cow;

use rustc_hash::FxHashMap;

use super::table::UnknownColumn;
use super::{quote_ident, TargetTable};
use crate::change::semantic::BITS;
use crate::change::{Change, Field, Op, Row, Typed};
use crate::config::OnSchemaMismatch;

/// A change that cannot be applied, for the dead-letter topic.
#[derive(Debug, thiserror::Error)]
pub enum RowError {
    /// `problem` says what is wrong with the value (a `RenderError`),
    /// naming neither the column nor its type: this names them, once.
    #[error("{table}: column {column} ({pg_type}): {problem}")]
    Value {
        table: String,
        column: String,
        /// The target column's type as `format_type` prints it.
        pg_type: String,
        problem: String,
    },
    #[error("{table}: {problem}")]
    Shape { table: String, problem: String },
    /// The change meets a schema difference between its source and this
    /// region (a migration run in one region first): `problem` names the
    /// column, the types and what to run.
    #[error("{table}: {problem}")]
    Schema {
        table: String,
        problem: String,
        /// The table's `on_schema_mismatch`.
        policy: OnSchemaMismatch,
    },
}

impl RowError {
    /// A short, bounded label for metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            RowError::Value { .. } => "bad_value",
            RowError::Shape { .. } => "bad_shape",
            RowError::Schema { .. } => "schema_mismatch",
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
    /// The source commit time (ms): which homing epoch the write belongs
    /// to (route::HomingOverrides).
    pub committed_ms: i64,
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
    /// The source commit time (ms), as [`PreparedRow::committed_ms`].
    pub committed_ms: i64,
}

impl PreparedRow {
    /// Carries the same columns, in the same order, and keeps the same
    /// unsent ones: one statement can apply both. (Rows of one schema list
    /// their columns in one order; another order only makes another group.)
    pub(super) fn same_columns(&self, other: &PreparedRow) -> bool {
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
    /// An upsert that keeps some stored columns (unsent TOAST values):
    /// what it leaves depends on the row stored before it, so it cannot be
    /// collapsed with an earlier version of its key ([`collapse`]).
    pub fn keeps_stored_columns(&self) -> bool {
        matches!(self, Final::Upsert(r) if !r.unavailable.is_empty())
    }
    fn set_replaced(&mut self, replaced: Option<(i64, String)>) {
        match self {
            Final::Upsert(r) => r.replaced = replaced,
            Final::Delete(d) => d.replaced = replaced,
        }
    }
    /// The source commit time (ms).
    pub fn committed_ms(&self) -> i64 {
        match self {
            Final::Upsert(r) => r.committed_ms,
            Final::Delete(d) => d.committed_ms,
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

/// A value of target column `idx` that cannot be written.
fn row_error(table: &TargetTable, idx: usize, problem: impl ToString) -> RowError {
    RowError::Value {
        table: table.name.clone(),
        column: table.columns[idx].0.clone(),
        pg_type: table.columns[idx].1.clone(),
        problem: problem.to_string(),
    }
}

/// A value of source column `column` that cannot be written, by its name
/// (the version columns, read before any value is rendered).
fn named_row_error(table: &TargetTable, column: &str, problem: impl ToString) -> RowError {
    match table.column_index(column) {
        Some(idx) => row_error(table, idx, problem),
        None => RowError::Shape {
            table: table.name.clone(),
            problem: format!("column {column}: {}", problem.to_string()),
        },
    }
}

/// A version or key column the change does not carry at all: the row is
/// not of the table's shape, whatever its values (`bad_shape`).
fn absent(table: &TargetTable, column: &str, what: &str) -> RowError {
    RowError::Shape {
        table: table.name.clone(),
        problem: format!("the change has no {what} column {column}"),
    }
}

/// What a source value is, for a message about a column: its Debezium
/// semantic type, or its kind.
fn describe(typed: &Typed) -> String {
    // Debezium gives `bit(n)` and `bit varying(n)` the same schema.
    if let Field::Bits { length, .. } = typed.field {
        // Unconstrained `bit varying` has Debezium's largest length.
        return if length == i32::MAX as u32 {
            format!("{BITS} (bit varying)")
        } else {
            format!("{BITS} values of length {length} (bit({length}) or bit varying({length}))")
        };
    }
    if let Some(semantic) = &typed.semantic {
        // An array carries its elements' semantic name.
        return match typed.field {
            Field::Array(_) => format!("arrays of {semantic}"),
            _ => semantic.to_string(),
        };
    }
    match &typed.field {
        Field::Null => "null",
        Field::Bool(_) => "boolean",
        Field::Int(_) => "integer",
        Field::Float(_) => "floating point",
        Field::String(_) => "string",
        Field::Bytes(_) => "bytes",
        Field::Bits { .. } => "bit string",
        Field::Decimal { .. } => "decimal",
        Field::Array(_) => "array",
        Field::Json(_) => "json",
        Field::Unavailable => "unchanged toast",
    }
    .to_owned()
}

/// A value this region's column cannot hold exactly, though the source's
/// held it: a widening run upstream first.
fn does_not_fit(table: &TargetTable, idx: usize, why: &str) -> RowError {
    let (column, pg_type) = &table.columns[idx];
    RowError::Schema {
        table: table.name.clone(),
        problem: format!(
            "column {column} ({pg_type}): {why}, though the source region's column held it: \
             was the column widened there first? Widen it here too \
             (ALTER TABLE {ident} ALTER COLUMN {col} TYPE <the source's type>), \
             or set on_schema_mismatch = \"dlq\" if this region's type is narrower by design",
            ident = table.ident,
            col = quote_ident(column),
        ),
        policy: table.on_schema_mismatch,
    }
}

/// A value of a kind this region's column cannot come from (`carried`:
/// the source's type as the change carries it): the column's type was
/// changed in one region and not in the other.
fn type_differs(table: &TargetTable, idx: usize, carried: &str) -> RowError {
    let (column, pg_type) = &table.columns[idx];
    RowError::Schema {
        table: table.name.clone(),
        problem: format!(
            "column {column} is {pg_type} here, but the source region sends {carried} values: \
             the column's type differs between the regions (changed in one region only?). \
             Give it the same type in both: here, ALTER TABLE {ident} ALTER COLUMN {col} TYPE \
             <the source region's type> USING {col}::<that type>; or change it back in the \
             source region. Or set on_schema_mismatch = \"dlq\" to set such changes aside",
            ident = table.ident,
            col = quote_ident(column),
        ),
        policy: table.on_schema_mismatch,
    }
}

/// Source columns this region's table does not have and never had: added
/// upstream first, or renamed there.
fn new_column(
    table: &TargetTable,
    new: &[(String, String)],
    values: &[(usize, Option<String>)],
    unavailable: &[usize],
) -> RowError {
    // Columns here the change does not carry: what a rename came from.
    let missing: Vec<&str> = (0..table.columns.len())
        .filter(|i| {
            !values.iter().any(|(v, _)| v == i)
                && !unavailable.contains(i)
                && !table.key.contains(i)
        })
        .map(|i| table.columns[i].0.as_str())
        .filter(|c| !matches!(*c, "hlc" | "origin_region"))
        .collect();
    let (column, kind) = &new[0];
    let others = if new.len() > 1 {
        let rest: Vec<&str> = new[1..].iter().map(|(c, _)| c.as_str()).collect();
        format!(" (and {})", rest.join(", "))
    } else {
        String::new()
    };
    let rename = match missing.first() {
        Some(old) => format!(
            "; if it was renamed from {old} there, rename it here too \
             (ALTER TABLE {ident} RENAME COLUMN {old_q} TO {col}) or map it (columns = {{ {column} = \"{old}\" }})",
            ident = table.ident,
            old_q = quote_ident(old),
            col = quote_ident(column),
        ),
        None => String::new(),
    };
    RowError::Schema {
        table: table.name.clone(),
        problem: format!(
            "source column {column}{others} ({kind}) is not in this region's table, which never had it: \
             was it added in the source region first? Add it here \
             (ALTER TABLE {ident} ADD COLUMN {col} <type>){rename}; \
             or, to leave it out here by design, list it in ignore_columns",
            ident = table.ident,
            col = quote_ident(column),
        ),
        policy: table.on_schema_mismatch,
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
///
/// `typed_by_schema`: the values' kinds are their source columns' types
/// ([`Change::typed`]): a kind this region's column cannot come from is a
/// schema difference, found here with its column (before PostgreSQL
/// refuses it as if it were bad data).
fn render(
    table: &TargetTable,
    row: Row,
    before: Option<&Row>,
    typed_by_schema: bool,
) -> Result<PreparedRow, RowError> {
    let hlc = int_of(&row, "hlc").ok_or_else(|| match row.contains_key("hlc") {
        true => named_row_error(table, "hlc", "not an integer"),
        false => absent(table, "hlc", "version"),
    })?;
    let origin = str_of(&row, "origin_region")
        .ok_or_else(|| match row.contains_key("origin_region") {
            true => named_row_error(table, "origin_region", "not text"),
            false => absent(table, "origin_region", "version"),
        })?
        .to_string();
    let mut values = Vec::with_capacity(row.len());
    let mut unavailable = Vec::new();
    let mut new_columns = Vec::new();
    for (source_col, typed) in row {
        let Some(idx) = table.column_index(&source_col) else {
            // Dropped here or not replicated by configuration: left out.
            // Never had: added upstream first, and its values must not be
            // lost (reported below, once every column is seen).
            if table.unknown_column(&source_col) == UnknownColumn::New {
                new_columns.push((source_col, describe(&typed)));
            }
            continue;
        };
        let ty = &table.pg_types[idx];
        if typed_by_schema && ty.cannot_come_from(&typed) {
            return Err(type_differs(table, idx, &describe(&typed)));
        }
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
        let text = text.map_err(|e| row_error(table, idx, e))?;
        if let Some(t) = &text {
            // A value the source's column held and this one cannot: the
            // source's column is wider (widened there first).
            table.fits[idx]
                .check(t)
                .map_err(|why| does_not_fit(table, idx, &why))?;
        }
        values.push((idx, text));
    }
    if !new_columns.is_empty() {
        return Err(new_column(table, &new_columns, &values, &unavailable));
    }
    // Debezium leaves a column of a type it cannot convert out of every
    // event; writing the row without it would leave a different value (the
    // default, or the stored one) in that column.
    for (idx, ty) in table.pg_types.iter().enumerate() {
        if let Some(why) = ty.not_carried() {
            if !values.iter().any(|(i, _)| *i == idx) && !unavailable.contains(&idx) {
                return Err(row_error(table, idx, why));
            }
        }
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
        committed_ms: 0,
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
                None if values.iter().any(|(i, _)| i == k) => {
                    Err(row_error(table, *k, "key column is null"))
                }
                None => Err(absent(table, &table.columns[*k].0, "key")),
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
            let mut row = render(table, after, change.before.as_ref(), change.typed)?;
            row.snapshot = change.op == Op::Read;
            row.committed_ms = change.source_ts_ms;
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
                            .map_err(|e| row_error(table, idx, e))?;
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
                Some(before) => before.checked_add(1).ok_or_else(|| {
                    named_row_error(
                        table,
                        "hlc",
                        "at the largest bigint: no version can follow it",
                    )
                })?,
                None => crate::clock::Hlc::at_ms_saturating(change.source_ts_ms).0,
            };
            Ok(Final::Delete(PreparedDelete {
                key_text: key_text(&key_values),
                key_values,
                hlc,
                origin: source_region.to_string(),
                replaced: change.before.as_ref().and_then(version_of),
                home: table.homing.as_ref().and_then(|h| h.home(&values)),
                pin: table.homing.as_ref().and_then(|h| h.pin(&values)),
                committed_ms: change.source_ts_ms,
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

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::apply::pg_text::PgType;
    use crate::apply::quote_ident;
    use crate::apply::table::source_positions;
    use crate::change::Typed;
    use crate::config::Policy;
    use crate::route::Homing;

    fn table() -> TargetTable {
        let mut t = TargetTable::for_tests(
            "public.users",
            &[
                ("id", "bigint"),
                ("email", "text"),
                ("bio", "text"),
                ("hlc", "bigint"),
                ("origin_region", "text"),
            ],
        );
        // The rows below carry a column this table had and dropped.
        t.once_had.insert("dropped_in_target".into());
        t
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
            typed: false,
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
    fn a_value_error_names_table_column_and_type_once() {
        let mut bits = table();
        bits.columns[2] = ("c_bit".into(), "bit varying(8)".into());
        bits.pg_types[2] = PgType::parse("bit varying(8)");
        bits.by_source = source_positions(&bits.columns, &BTreeMap::new());
        let mut r = row(7, "a@x", Field::Null, 1);
        r.remove("bio");
        r.insert("c_bit".into(), t(Field::Bytes(vec![0x05])));
        let err = prepare(&bits, change(Op::Create, 7, None, Some(r)), "us-east-1").unwrap_err();
        let text = err.to_string();
        assert!(
            text.starts_with("public.users: column c_bit (bit varying(8)): "),
            "{text}"
        );
        for once in ["public.users", "c_bit", "bit varying(8)"] {
            assert_eq!(text.matches(once).count(), 1, "{once} in {text}");
        }
        assert!(!text.contains("column :"), "{text}");
        assert_eq!(err.reason(), "bad_value");
    }

    #[test]
    fn a_row_without_its_version_columns_or_key_is_bad_shape_naming_the_table() {
        for (column, what) in [
            ("hlc", "version"),
            ("origin_region", "version"),
            ("id", "key"),
        ] {
            let mut r = row(7, "a@x", Field::Null, 1);
            r.remove(column);
            let err =
                prepare(&table(), change(Op::Create, 7, None, Some(r)), "us-east-1").unwrap_err();
            assert_eq!(err.reason(), "bad_shape", "{err}");
            assert_eq!(
                err.to_string(),
                format!("public.users: the change has no {what} column {column}")
            );
        }
        // Present but not of its kind: a value its column cannot hold.
        let mut r = row(7, "a@x", Field::Null, 1);
        r.insert("hlc".into(), t(Field::String("forty".into())));
        let err = prepare(&table(), change(Op::Create, 7, None, Some(r)), "us-east-1").unwrap_err();
        assert_eq!(err.reason(), "bad_value", "{err}");
        let mut r = row(7, "a@x", Field::Null, 1);
        r.insert("id".into(), t(Field::Null));
        let err = prepare(&table(), change(Op::Create, 7, None, Some(r)), "us-east-1").unwrap_err();
        assert_eq!(err.reason(), "bad_value", "{err}");
        assert!(err.to_string().contains("key column is null"), "{err}");
    }

    #[test]
    fn a_column_new_upstream_is_a_schema_mismatch_naming_it_and_the_fix() {
        let mut t = table();
        t.once_had.remove("dropped_in_target");
        let c = change(
            Op::Create,
            7,
            None,
            Some(row(7, "a@x", Field::String("b".into()), 1)),
        );
        let err = prepare(&t, c.clone(), "us-east-1").unwrap_err();
        let text = err.to_string();
        assert!(
            text.starts_with("public.users: source column dropped_in_target (integer)"),
            "{text}"
        );
        assert!(
            text.contains("ALTER TABLE \"public\".\"users\" ADD COLUMN \"dropped_in_target\""),
            "{text}"
        );
        assert!(text.contains("ignore_columns"), "{text}");
        assert_eq!(err.reason(), "schema_mismatch");
        // A rename: the target has a column the change does not carry.
        let mut r = row(7, "a@x", Field::String("b".into()), 1);
        r.remove("bio");
        let err = prepare(&t, change(Op::Create, 7, None, Some(r)), "us-east-1").unwrap_err();
        assert!(
            err.to_string()
                .contains("RENAME COLUMN \"bio\" TO \"dropped_in_target\""),
            "{err}"
        );
        // Listed in ignore_columns: left out.
        t.ignored.insert("dropped_in_target".into());
        assert!(prepare(&t, c.clone(), "us-east-1").is_ok());
        // A delete needs only its key: never held by a new column.
        let before = row(7, "a@x", Field::Null, 1);
        t.ignored.clear();
        assert!(prepare(&t, change(Op::Delete, 7, Some(before), None), "us-east-1").is_ok());
    }

    #[test]
    fn a_column_retyped_in_one_region_is_a_schema_mismatch_naming_both_types() {
        let retyped = TargetTable::for_tests(
            "public.users",
            &[
                ("id", "bigint"),
                ("email", "integer"),
                ("bio", "text"),
                ("hlc", "bigint"),
                ("origin_region", "text"),
            ],
        );
        let mut r = row(7, "a@xyz", Field::Null, 1);
        r.remove("dropped_in_target");
        let mut c = change(Op::Create, 7, None, Some(r));
        c.typed = true;
        let err = prepare(&retyped, c.clone(), "us-east-1").unwrap_err();
        let text = err.to_string();
        assert!(
            text.starts_with(
                "public.users: column email is integer here, but the source region sends string values"
            ),
            "{text}"
        );
        assert!(
            text.contains("ALTER TABLE \"public\".\"users\" ALTER COLUMN \"email\" TYPE"),
            "{text}"
        );
        assert_eq!(err.reason(), "schema_mismatch");
        // Schemaless JSON: the kind says nothing of the source's column,
        // and PostgreSQL judges the value.
        c.typed = false;
        assert!(prepare(&retyped, c, "us-east-1").is_ok());
    }

    #[test]
    fn a_value_the_target_column_cannot_hold_is_a_schema_mismatch() {
        let narrow = TargetTable::for_tests(
            "public.users",
            &[
                ("id", "bigint"),
                ("email", "character varying(3)"),
                ("bio", "text"),
                ("hlc", "bigint"),
                ("origin_region", "text"),
            ],
        );
        let mut r = row(7, "a@xyz", Field::Null, 1);
        r.remove("dropped_in_target");
        let err = prepare(&narrow, change(Op::Create, 7, None, Some(r)), "us-east-1").unwrap_err();
        let text = err.to_string();
        assert!(
            text.starts_with("public.users: column email (character varying(3)): a value of 5 characters does not fit"),
            "{text}"
        );
        assert!(text.contains("ALTER COLUMN \"email\" TYPE"), "{text}");
        assert!(matches!(
            err,
            RowError::Schema {
                policy: OnSchemaMismatch::Hold,
                ..
            }
        ));
    }

    #[test]
    fn a_column_debezium_leaves_out_refuses_the_row_naming_it() {
        for pg_type in ["box", "int4multirange", "money[]", "interval[]", "polygon"] {
            let mut shapes = table();
            shapes.columns[2] = ("c_shape".into(), pg_type.into());
            shapes.pg_types[2] = PgType::parse(pg_type);
            shapes.by_source = source_positions(&shapes.columns, &BTreeMap::new());
            let mut r = row(7, "a@x", Field::Null, 1);
            r.remove("bio");
            let err =
                prepare(&shapes, change(Op::Create, 7, None, Some(r)), "us-east-1").unwrap_err();
            let text = err.to_string();
            assert!(
                text.starts_with(&format!(
                    "public.users: column c_shape ({pg_type}): Debezium does not carry"
                )),
                "{text}"
            );
            assert_eq!(err.reason(), "bad_value");
        }
        // A column of an array of a domain, too.
        let mut domains = table();
        domains.columns[2] = ("c_tags".into(), "tag[]".into());
        domains.pg_types[2] = PgType::array_of_domain("tag[]");
        domains.by_source = source_positions(&domains.columns, &BTreeMap::new());
        let mut r = row(7, "a@x", Field::Null, 1);
        r.remove("bio");
        let err = prepare(&domains, change(Op::Create, 7, None, Some(r)), "us-east-1").unwrap_err();
        assert!(err.to_string().contains("arrays of a domain"), "{err}");
        // A column absent for another reason (not in the source) is not.
        let mut extra = table();
        extra.columns[2] = ("c_text".into(), "text".into());
        extra.pg_types[2] = PgType::parse("text");
        extra.by_source = source_positions(&extra.columns, &BTreeMap::new());
        let mut r = row(7, "a@x", Field::Null, 1);
        r.remove("bio");
        assert!(prepare(&extra, change(Op::Create, 7, None, Some(r)), "us-east-1").is_ok());
    }

    #[test]
    fn identifiers_are_quoted() {
        assert_eq!(quote_ident("we\"ird"), "\"we\"\"ird\"");
    }
}
