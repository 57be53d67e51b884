//! A target table as the target database's catalog describes it: its
//! columns and types, key, homing, residency and CRDT counters, checked
//! against the table's configuration once, and the SQL fragments the
//! statements are built from.

use std::collections::BTreeMap;

use rustc_hash::FxHashMap;

use super::pg_text::PgType;
use crate::config::{TableConfig, SHARED};
use crate::route::Homing;

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
    /// The type each value is cast to in SQL, in the same order
    /// (`cast_type`): the column's, without a length that an explicit
    /// cast would silently truncate to.
    pub cast_types: Vec<String>,
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
/// The type a text value is cast to before it is assigned to a column of
/// type `declared`. An explicit cast to `character varying(n)`,
/// `character(n)` or `bit(n)` cuts a longer value to n silently, where
/// assigning it to the column refuses it ("value too long", SQLSTATE
/// 22001): so the length is left to the assignment. (A replica whose column
/// is narrower than the source's must refuse the value, not keep a part.)
pub fn cast_type(declared: &str) -> String {
    let (element, array) = match declared.strip_suffix("[]") {
        Some(element) => (element, "[]"),
        None => (declared, ""),
    };
    let without_length = match element.split_once('(') {
        Some(("character varying", _)) => "character varying",
        Some(("character", _)) => "bpchar",
        Some(("bit varying", _)) => "bit varying",
        Some(("bit", _)) => "varbit",
        _ => return declared.to_owned(),
    };
    format!("{without_length}{array}")
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
                // The third column is the type a domain stands for (through
                // domains over domains), which Debezium carries the domain
                // column as; the fourth whether it is an array of a domain.
                "SELECT a.attname::text, format_type(a.atttypid, a.atttypmod),
                        (WITH RECURSIVE d(base, mod) AS (
                            SELECT a.atttypid, a.atttypmod
                          UNION ALL
                            SELECT t.typbasetype, t.typtypmod
                              FROM d JOIN pg_type t ON t.oid = d.base AND t.typtype = 'd')
                         SELECT format_type(d.base, d.mod)
                           FROM d JOIN pg_type b ON b.oid = d.base
                          WHERE b.typtype <> 'd'),
                        EXISTS (SELECT 1 FROM pg_type arr JOIN pg_type el ON el.oid = arr.typelem
                                 WHERE arr.oid = a.atttypid AND arr.typcategory = 'A'
                                   AND el.typtype = 'd')
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
        // Values are rendered for the type Debezium carries: a domain's
        // base type (the column keeps its domain name, so casts still check
        // the domain's constraints).
        let pg_types: Vec<PgType> = rows
            .iter()
            .map(|r| {
                let declared: String = r.get(1);
                let base: Option<String> = r.get(2);
                if r.get::<_, bool>(3) {
                    PgType::array_of_domain(&declared)
                } else {
                    PgType::parse(base.as_deref().unwrap_or(&declared))
                }
            })
            .collect();
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
            pg_types,
            cast_types: columns.iter().map(|(_, t)| cast_type(t)).collect(),
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
                format!("t.{c} = {alias}.{c}::{}", self.cast_types[*i])
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

    pub(super) fn column_index(&self, source: &str) -> Option<usize> {
        self.by_source.get(source).copied()
    }
}

/// Source column name → position in `columns`: a column's own name, unless
/// the config maps that source name to another column (`columns = { source
/// = "target" }`), which wins; a mapping to no column maps to nothing.
pub(super) fn source_positions(
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

#[cfg(test)]
impl TargetTable {
    /// A shared (unhomed) table as the catalog would describe it, for
    /// tests without a database: `columns` as (name, type), keyed by the
    /// first.
    pub(crate) fn for_tests(name: &str, columns: &[(&str, &str)]) -> TargetTable {
        let columns: Vec<(String, String)> = columns
            .iter()
            .map(|(n, t)| (n.to_string(), t.to_string()))
            .collect();
        let (schema, table) = name.split_once('.').unwrap_or(("public", name));
        TargetTable {
            name: name.to_owned(),
            ident: format!("{}.{}", quote_ident(schema), quote_ident(table)),
            by_source: source_positions(&columns, &BTreeMap::new()),
            pg_types: columns.iter().map(|(_, t)| PgType::parse(t)).collect(),
            cast_types: columns.iter().map(|(_, t)| cast_type(t)).collect(),
            columns,
            key: vec![0],
            homing: None,
            residency: Vec::new(),
            counters: Vec::new(),
        }
    }
}

#[cfg(test)]
mod cast_tests {
    use super::cast_type;

    #[test]
    fn casts_leave_lengths_to_the_assignment() {
        for (declared, cast) in [
            ("character varying(3)", "character varying"),
            ("character(5)", "bpchar"),
            ("bit(8)", "varbit"),
            ("bit varying(8)", "bit varying"),
            ("character varying(3)[]", "character varying[]"),
            ("character(3)[]", "bpchar[]"),
            ("numeric(12,3)", "numeric(12,3)"),
            (
                "timestamp(3) without time zone",
                "timestamp(3) without time zone",
            ),
            ("text", "text"),
        ] {
            assert_eq!(cast_type(declared), cast, "{declared}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
