//! The statements `verify` runs on both sides, built from a table's
//! [`Shape`]. Pure: unit-tested below.
//!
//! Every value is bound as text and cast in SQL (`$1::text::bigint`), so a
//! key read as text from one side is compared on the other in its column's
//! type. Text-like key columns compare and sort `COLLATE "C"`, so both
//! sides cut the key space at the same places whatever their collations.

use crate::apply::quote_ident;

/// A table as `verify` compares it: the columns both sides have, in this
/// side's order, and the key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Shape {
    /// `schema.table`.
    pub name: String,
    /// The quoted, schema-qualified identifier.
    pub ident: String,
    pub columns: Vec<Column>,
    /// Positions of the key columns in `columns`.
    pub key: Vec<usize>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Column {
    pub name: String,
    /// As `format_type` prints it.
    pub type_name: String,
    /// Whether the type has a collation (text, varchar, …).
    pub collatable: bool,
}

impl Column {
    /// The column's expression in a row's canonical text. An unconstrained
    /// `numeric` loses its trailing zeros on the way through Debezium
    /// (docs/TYPES.md: 12.50 arrives as 12.5, equal in value), so it is
    /// compared by value.
    fn canonical(&self) -> String {
        let col = format!("t.{}", quote_ident(&self.name));
        if self.type_name == "numeric" {
            format!("trim_scale({col})")
        } else {
            col
        }
    }

    /// The column as a key is compared and ordered.
    fn ordered(&self) -> String {
        let col = format!("t.{}", quote_ident(&self.name));
        if self.collatable {
            format!("{col} COLLATE \"C\"")
        } else {
            col
        }
    }
}

/// Which bounds a key range has: `lo < key <= hi`, either side open.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Bounds {
    pub lo: bool,
    pub hi: bool,
}

impl Shape {
    fn keys(&self) -> impl Iterator<Item = &Column> {
        self.key.iter().map(|i| &self.columns[*i])
    }

    /// The md5 of a row's canonical text: every column, `hlc` and
    /// `origin_region` included, in one record's text form.
    pub fn row_hash(&self) -> String {
        let cols: Vec<String> = self.columns.iter().map(Column::canonical).collect();
        format!("md5(ROW({})::text)", cols.join(", "))
    }

    /// The key columns as a `text[]`.
    pub fn key_texts(&self) -> String {
        let cols: Vec<String> = self
            .keys()
            .map(|c| format!("t.{}::text", quote_ident(&c.name)))
            .collect();
        format!("ARRAY[{}]", cols.join(", "))
    }

    /// `ORDER BY` of the key, ascending or descending.
    pub fn order(&self, desc: bool) -> String {
        let dir = if desc { " DESC" } else { "" };
        let cols: Vec<String> = self
            .keys()
            .map(|c| format!("{}{dir}", c.ordered()))
            .collect();
        cols.join(", ")
    }

    fn key_tuple(&self) -> String {
        let cols: Vec<String> = self.keys().map(Column::ordered).collect();
        format!("({})", cols.join(", "))
    }

    /// The key's values as parameters `$first`…, cast to the key's types.
    fn param_tuple(&self, first: usize) -> String {
        let params: Vec<String> = self
            .keys()
            .enumerate()
            .map(|(i, c)| format!("${}::text::{}", first + i, c.type_name))
            .collect();
        format!("({})", params.join(", "))
    }

    /// The `WHERE` of a key range; the low bound's values are parameters
    /// from `$first`, then the high bound's. Returns the predicate and the
    /// next free parameter number.
    pub fn range(&self, bounds: Bounds, first: usize) -> (String, usize) {
        let n = self.key.len();
        let mut next = first;
        let mut parts = Vec::new();
        if bounds.lo {
            parts.push(format!("{} > {}", self.key_tuple(), self.param_tuple(next)));
            next += n;
        }
        if bounds.hi {
            parts.push(format!(
                "{} <= {}",
                self.key_tuple(),
                self.param_tuple(next)
            ));
            next += n;
        }
        if parts.is_empty() {
            parts.push("true".into());
        }
        (parts.join(" AND "), next)
    }

    /// Count and checksum of a key range: the md5 of the rows' hashes in
    /// key order.
    pub fn checksum(&self, bounds: Bounds) -> String {
        let (range, _) = self.range(bounds, 1);
        format!(
            "SELECT count(*), coalesce(md5(string_agg({hash}, '' ORDER BY {order})), '') FROM {ident} t WHERE {range}",
            hash = self.row_hash(),
            order = self.order(false),
            ident = self.ident,
        )
    }

    /// The next chunk after the low bound (if any) of at most `$n` rows
    /// (the last parameter): its count, its checksum as [`Shape::checksum`]
    /// computes it, and its last key (the high bound the other side's
    /// checksum takes).
    pub fn chunk(&self, lo: bool) -> String {
        let (range, next) = self.range(Bounds { lo, hi: false }, 1);
        format!(
            "WITH c AS MATERIALIZED (
                SELECT {keys} AS k, {hash} AS h, row_number() OVER (ORDER BY {order}) AS n
                  FROM (SELECT * FROM {ident} t WHERE {range} ORDER BY {order} LIMIT ${next}) t)
             SELECT count(*), coalesce(md5(string_agg(h, '' ORDER BY n)), ''),
                    (SELECT k FROM c ORDER BY n DESC LIMIT 1)
               FROM c",
            keys = self.key_texts(),
            hash = self.row_hash(),
            order = self.order(false),
            ident = self.ident,
        )
    }

    /// The key `$last` rows into a range (0: its first).
    pub fn nth_key(&self, bounds: Bounds) -> String {
        let (range, next) = self.range(bounds, 1);
        format!(
            "SELECT {keys} FROM {ident} t WHERE {range} ORDER BY {order} OFFSET ${next} LIMIT 1",
            keys = self.key_texts(),
            ident = self.ident,
            order = self.order(false),
        )
    }

    /// Every row of a range: key values, key as regionsync writes it
    /// (`regionsync.row_key`, as tombstones and conflicts hold it), row
    /// hash, version. The key column names are the last parameter.
    pub fn rows(&self, bounds: Bounds) -> String {
        let (range, next) = self.range(bounds, 1);
        self.rows_where(&range, next)
    }

    /// [`Shape::rows`] of one key, given as parameters `$1`….
    pub fn row_of_key(&self) -> String {
        let range = format!("{} = {}", self.key_tuple(), self.param_tuple(1));
        self.rows_where(&range, 1 + self.key.len())
    }

    fn rows_where(&self, range: &str, names_param: usize) -> String {
        format!(
            "SELECT {keys}, regionsync.row_key(to_jsonb(t), ${names_param}::text::text[]), {hash}, t.hlc, t.origin_region::text
               FROM {ident} t WHERE {range} ORDER BY {order}",
            keys = self.key_texts(),
            hash = self.row_hash(),
            ident = self.ident,
            order = self.order(false),
        )
    }

    /// The key column names, the parameter of `regionsync.row_key`.
    pub fn key_names(&self) -> Vec<String> {
        self.keys().map(|c| c.name.clone()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape() -> Shape {
        let col = |name: &str, type_name: &str, collatable| Column {
            name: name.into(),
            type_name: type_name.into(),
            collatable,
        };
        Shape {
            name: "public.t".into(),
            ident: "\"public\".\"t\"".into(),
            columns: vec![
                col("tenant", "text", true),
                col("id", "bigint", false),
                col("amount", "numeric", false),
                col("price", "numeric(10,2)", false),
                col("hlc", "bigint", false),
                col("origin_region", "text", true),
            ],
            key: vec![0, 1],
        }
    }

    #[test]
    fn the_row_text_holds_every_column_and_numeric_by_value() {
        assert_eq!(
            shape().row_hash(),
            "md5(ROW(t.\"tenant\", t.\"id\", trim_scale(t.\"amount\"), t.\"price\", t.\"hlc\", t.\"origin_region\")::text)"
        );
    }

    #[test]
    fn ranges_compare_text_keys_bytewise_and_bind_text() {
        let s = shape();
        let (both, next) = s.range(Bounds { lo: true, hi: true }, 1);
        assert_eq!(
            both,
            "(t.\"tenant\" COLLATE \"C\", t.\"id\") > ($1::text::text, $2::text::bigint) AND \
             (t.\"tenant\" COLLATE \"C\", t.\"id\") <= ($3::text::text, $4::text::bigint)"
        );
        assert_eq!(next, 5);
        let (open, next) = s.range(
            Bounds {
                lo: false,
                hi: false,
            },
            1,
        );
        assert_eq!((open.as_str(), next), ("true", 1));
        assert_eq!(
            s.order(true),
            "t.\"tenant\" COLLATE \"C\" DESC, t.\"id\" DESC"
        );
    }

    #[test]
    fn the_chunk_limit_is_the_last_parameter() {
        let s = shape();
        assert!(s.chunk(true).contains("LIMIT $3)"), "{}", s.chunk(true));
        assert!(s.chunk(false).contains("LIMIT $1)"));
        assert!(s
            .nth_key(Bounds { lo: true, hi: true })
            .ends_with("OFFSET $5 LIMIT 1"));
        assert!(s
            .row_of_key()
            .contains("row_key(to_jsonb(t), $3::text::text[])"));
    }
}
