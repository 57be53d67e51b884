//! A target table as the target database's catalog describes it: its
//! columns and types, key, homing, residency and CRDT counters, checked
//! against the table's configuration once, and the SQL fragments the
//! statements are built from.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use rustc_hash::{FxHashMap, FxHashSet};
use tracing::info;

use super::pg_text::PgType;
use crate::config::{OnSchemaMismatch, TableConfig, SHARED};
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
    /// What each column can hold beyond its type's syntax, in `columns`
    /// order: a value the source held but this region's narrower column
    /// would cut, round or refuse is a schema mismatch, not bad data.
    pub fits: Vec<Fit>,
    /// Every column this table has had in this region
    /// (`regionsync.known_columns`): a source column among them that the
    /// table lacks now was dropped here.
    pub once_had: FxHashSet<String>,
    /// Source columns deliberately not replicated (`ignore_columns`).
    pub ignored: FxHashSet<String>,
    /// Source → target column renames (`columns`).
    pub renames: BTreeMap<String, String>,
    /// What a change meeting a schema difference does.
    pub on_schema_mismatch: OnSchemaMismatch,
    /// Dropped columns already logged as ignored (logged once per layout).
    dropped_logged: Arc<Mutex<FxHashSet<String>>>,
}

/// What a source column the target table does not have is.
#[derive(Debug, PartialEq, Eq)]
pub enum UnknownColumn {
    /// Listed in `ignore_columns`, or dropped here (the table once had it).
    Ignored,
    /// New upstream: the table never had it.
    New,
}

/// The limit a column's type puts on a value beyond its syntax, where an
/// explicit cast or the assignment would cut or round instead of refusing
/// (varchar(n), numeric(p,s), timestamp(p), interval fields, real) or a
/// range narrower than the source's may be (smallint, integer).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Fit {
    Any,
    /// An array of a type with a limit: every element must fit it. The
    /// array is cast to the column's type as a whole, and PostgreSQL
    /// rounds each element to it (`'{1.234}'::numeric(5,2)[]` is
    /// `{1.23}`) as it rounds a scalar.
    Array(Box<Fit>),
    /// `character varying(n)`, or `character(n)` (`padded`: trailing
    /// blanks do not count).
    Chars {
        max: usize,
        padded: bool,
    },
    Int {
        min: i64,
        max: i64,
    },
    /// `numeric(p, s)`: at most `p - s` digits before the point, none
    /// but zeros after the `s`th.
    Numeric {
        precision: u32,
        scale: u32,
    },
    /// `timestamp(p)`, `timestamptz(p)`, `time(p)`, `timetz(p)`: at most
    /// `digits` fractional digits of a second that are not zero
    /// (PostgreSQL rounds the rest away).
    Seconds {
        digits: u32,
    },
    /// `interval` with a fields restriction (`interval year to month`
    /// drops days and time) or a precision (`interval(p)`, `interval day
    /// to second(p)`; `None`: microseconds).
    Interval {
        keeps: IntervalFields,
        digits: Option<u32>,
    },
    /// `real`: a float4 must hold the value exactly (a `double precision`
    /// value would be rounded to the nearest float4).
    Float4,
}

/// What an `interval` column's fields restriction keeps: PostgreSQL zeroes
/// the fields below the last one named (`AdjustIntervalForTypmod`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IntervalFields {
    /// Up to seconds: `interval`, `… to second`, `second`.
    All,
    /// `year`: whole years of months; no days, no time.
    Years,
    /// `month`, `year to month`: no days, no time.
    Months,
    /// `day`: no time.
    Days,
    /// `hour`, `day to hour`: whole hours.
    Hours,
    /// `minute`, `day to minute`, `hour to minute`: whole minutes.
    Minutes,
}

const MICROS_PER_SECOND: i128 = 1_000_000;
const MICROS_PER_MINUTE: i128 = 60 * MICROS_PER_SECOND;
const MICROS_PER_HOUR: i128 = 60 * MICROS_PER_MINUTE;

impl Fit {
    /// The limit of a type as `format_type` prints it.
    pub fn of(pg_type: &str) -> Fit {
        let t = pg_type.trim();
        // `format_type` prints any array, of any dimensions, as `…[]`.
        if let Some(element) = t.strip_suffix("[]") {
            return match Fit::of(element) {
                Fit::Any => Fit::Any,
                element => Fit::Array(Box::new(element)),
            };
        }
        let number = |rest: &str| -> Vec<u32> {
            rest.trim_end_matches(')')
                .split(',')
                .filter_map(|n| n.trim().parse().ok())
                .collect()
        };
        if let Some(rest) = t.strip_prefix("character varying(") {
            if let [n] = number(rest)[..] {
                return Fit::Chars {
                    max: n as usize,
                    padded: false,
                };
            }
        }
        if let Some(rest) = t.strip_prefix("character(") {
            if let [n] = number(rest)[..] {
                return Fit::Chars {
                    max: n as usize,
                    padded: true,
                };
            }
        }
        if let Some(rest) = t.strip_prefix("numeric(") {
            match number(rest)[..] {
                [p] => {
                    return Fit::Numeric {
                        precision: p,
                        scale: 0,
                    }
                }
                [p, s] => {
                    return Fit::Numeric {
                        precision: p,
                        scale: s,
                    }
                }
                _ => {}
            }
        }
        // `timestamp(3) without time zone`, `time(0) with time zone`; a
        // precision of 6 or more keeps every microsecond.
        for prefix in ["timestamp(", "time("] {
            if let Some(rest) = t.strip_prefix(prefix) {
                if let Some((p, zone)) = rest.split_once(')') {
                    if matches!(zone.trim(), "without time zone" | "with time zone") {
                        if let Ok(digits @ 0..=5) = p.trim().parse::<u32>() {
                            return Fit::Seconds { digits };
                        }
                    }
                }
            }
        }
        if let Some(rest) = t.strip_prefix("interval") {
            return interval_fit(rest);
        }
        match t {
            "smallint" => Fit::Int {
                min: i16::MIN.into(),
                max: i16::MAX.into(),
            },
            "integer" => Fit::Int {
                min: i32::MIN.into(),
                max: i32::MAX.into(),
            },
            "real" => Fit::Float4,
            _ => Fit::Any,
        }
    }

    /// `Err(why)` if the column cannot hold `text` exactly. Text that is
    /// not a number where one is expected passes: PostgreSQL refuses it,
    /// as the data's fault.
    pub fn check(&self, text: &str) -> Result<(), String> {
        match *self {
            Fit::Any => Ok(()),
            Fit::Array(ref element) => {
                // Not an array literal: PostgreSQL refuses it, as the data's.
                let Some(elements) = array_elements(text) else {
                    return Ok(());
                };
                for item in elements.iter().flatten() {
                    element
                        .check(item)
                        .map_err(|why| format!("an element of the array: {why}"))?;
                }
                Ok(())
            }
            Fit::Chars { max, padded } => {
                if text.len() <= max {
                    return Ok(());
                }
                let text = if padded {
                    text.trim_end_matches(' ')
                } else {
                    text
                };
                let n = text.chars().count();
                if n <= max {
                    Ok(())
                } else {
                    Err(format!("a value of {n} characters does not fit"))
                }
            }
            Fit::Int { min, max } => match text.parse::<i64>() {
                Ok(v) if v < min || v > max => Err(format!("the value {v} is out of its range")),
                _ => Ok(()),
            },
            Fit::Numeric { precision, scale } => {
                let digits = text.strip_prefix('-').unwrap_or(text);
                let (int, frac) = digits.split_once('.').unwrap_or((digits, ""));
                if int.is_empty()
                    || !int.bytes().all(|b| b.is_ascii_digit())
                    || !frac.bytes().all(|b| b.is_ascii_digit())
                {
                    return Ok(());
                }
                let int_digits = int.trim_start_matches('0').len() as u32;
                let frac_digits = frac.trim_end_matches('0').len() as u32;
                if int_digits > precision.saturating_sub(scale) {
                    Err(format!(
                        "the value {text} has {int_digits} digits before the point, the column at most {}",
                        precision.saturating_sub(scale)
                    ))
                } else if frac_digits > scale {
                    Err(format!(
                        "the value {text} has {frac_digits} digits after the point, the column keeps {scale} (it would be rounded)"
                    ))
                } else {
                    Ok(())
                }
            }
            Fit::Seconds { digits } => {
                let Some(fraction) = seconds_fraction(text) else {
                    return Ok(());
                };
                let n = fraction.trim_end_matches('0').len() as u32;
                if n <= digits {
                    Ok(())
                } else {
                    Err(format!(
                        "the value {text} has {n} fractional digits of a second, \
                         the column keeps {digits} (it would be rounded)"
                    ))
                }
            }
            Fit::Interval { keeps, digits } => {
                let Some((months, days, micros)) = interval_parts(text) else {
                    return Ok(());
                };
                let lost = match keeps {
                    IntervalFields::All => None,
                    IntervalFields::Years if months % 12 != 0 || days != 0 || micros != 0 => {
                        Some("months, days or time beyond whole years")
                    }
                    IntervalFields::Months if days != 0 || micros != 0 => Some("days or time"),
                    IntervalFields::Days if micros != 0 => Some("time"),
                    IntervalFields::Hours if micros % MICROS_PER_HOUR != 0 => {
                        Some("minutes or seconds")
                    }
                    IntervalFields::Minutes if micros % MICROS_PER_MINUTE != 0 => Some("seconds"),
                    _ => None,
                };
                if let Some(lost) = lost {
                    return Err(format!(
                        "the value {text} has {lost}, which the column's fields do not keep \
                         (they would be dropped)"
                    ));
                }
                match digits {
                    Some(digits) if micros % 10i128.pow(6 - digits.min(6)) != 0 => Err(format!(
                        "the value {text} has more than {digits} fractional digits of a second, \
                         the column keeps {digits} (it would be rounded)"
                    )),
                    _ => Ok(()),
                }
            }
            Fit::Float4 => match text.parse::<f64>() {
                Ok(v) if v.is_finite() && (v as f32).is_infinite() => Err(format!(
                    "the value {text} is beyond real's (float4's) range"
                )),
                // Exact as a float4 widened (Debezium's float32), or the
                // float4 whose shortest text is this number's (schemaless
                // JSON's 0.1, or a double 0.1: PostgreSQL shows the float4
                // as 0.1 too, and to_jsonb of both rows is equal).
                Ok(v) if v.is_finite()
                    && f64::from(v as f32) != v
                    && (v as f32).to_string().parse::<f64>() != Ok(v) =>
                {
                    Err(format!(
                        "the value {text} has no exact real (float4) form (it would be rounded to {})",
                        v as f32
                    ))
                }
                _ => Ok(()),
            },
        }
    }
}

/// The elements of a PostgreSQL array literal (`{"a","b,c",NULL}`,
/// `{{1,2},{3,4}}`, `[0:1]={x,y}`), flattened, `None` for a NULL; `None`
/// for text that is not such a literal. Quoted elements may hold anything
/// with `\` escapes; unquoted ones are trimmed, and `NULL` unquoted is
/// NULL. The delimiter is `,` (only `box`, which Debezium does not
/// carry, uses another).
pub fn array_elements(text: &str) -> Option<Vec<Option<String>>> {
    let text = text.trim();
    let body = if text.starts_with('[') {
        &text[text.find('=')? + 1..]
    } else {
        text
    };
    let mut chars = body.trim_start().chars().peekable();
    if chars.next()? != '{' {
        return None;
    }
    let mut depth = 1usize;
    let mut out = Vec::new();
    while depth > 0 {
        match chars.next()? {
            '{' => depth += 1,
            '}' => depth -= 1,
            ',' => {}
            c if c.is_whitespace() => {}
            '"' => {
                let mut item = String::new();
                loop {
                    match chars.next()? {
                        '"' => break,
                        '\\' => item.push(chars.next()?),
                        c => item.push(c),
                    }
                }
                out.push(Some(item));
            }
            first => {
                let mut item = String::new();
                let mut c = first;
                loop {
                    if c == '\\' {
                        item.push(chars.next()?);
                    } else {
                        item.push(c);
                    }
                    match chars.peek() {
                        Some(',' | '}') | None => break,
                        Some(_) => c = chars.next()?,
                    }
                }
                let item = item.trim();
                out.push((!item.eq_ignore_ascii_case("NULL")).then(|| item.to_owned()));
            }
        }
    }
    chars.all(char::is_whitespace).then_some(out)
}

/// The fit of `interval…` after the word: a fields phrase (`year to
/// month`, `day to second`) and a precision (`(3)`), either or both.
fn interval_fit(rest: &str) -> Fit {
    let (fields, digits) = match rest.split_once('(') {
        Some((fields, p)) => (
            fields.trim(),
            p.trim_end_matches(')').trim().parse::<u32>().ok(),
        ),
        None => (rest.trim(), None),
    };
    let keeps = match fields {
        "" | "second" | "day to second" | "hour to second" | "minute to second" => {
            IntervalFields::All
        }
        "year" => IntervalFields::Years,
        "month" | "year to month" => IntervalFields::Months,
        "day" => IntervalFields::Days,
        "hour" | "day to hour" => IntervalFields::Hours,
        "minute" | "day to minute" | "hour to minute" => IntervalFields::Minutes,
        _ => return Fit::Any,
    };
    let digits = digits.filter(|d| *d < 6);
    if keeps == IntervalFields::All && digits.is_none() {
        Fit::Any
    } else {
        Fit::Interval { keeps, digits }
    }
}

/// The fractional digits of the seconds in a time or timestamp text
/// (`2024-02-29 13:14:15.123456`, `2024-02-29T11:14:15.5Z`,
/// `10:00:00.5+00`): the digits after `HH:MM:SS.`, `""` without a
/// fraction; `None` without a time (`infinity`).
fn seconds_fraction(text: &str) -> Option<&str> {
    let colon = text.find(':')?;
    let b = text.as_bytes();
    let digit = |i: usize| b.get(i).is_some_and(u8::is_ascii_digit);
    // `:MM:SS` from the first colon.
    let minutes_and_seconds = digit(colon + 1)
        && digit(colon + 2)
        && b.get(colon + 3) == Some(&b':')
        && digit(colon + 4)
        && digit(colon + 5);
    if !minutes_and_seconds {
        return None;
    }
    let after = &text[colon + 6..];
    Some(match after.strip_prefix('.') {
        Some(fraction) => {
            let n = fraction.bytes().take_while(u8::is_ascii_digit).count();
            &fraction[..n]
        }
        None => "",
    })
}

/// (months, days, microseconds) of an interval as the renderer writes it:
/// Debezium's ISO 8601 text (`P1Y2M20DT4H5M6.789S`, a sign per field,
/// `interval.handling.mode=string`) or `N microseconds` (`numeric`
/// mode). `None` for anything else (PostgreSQL reads it, or refuses it).
fn interval_parts(text: &str) -> Option<(i64, i64, i128)> {
    if let Some(n) = text.strip_suffix(" microseconds") {
        return Some((0, 0, n.parse().ok()?));
    }
    let body = text.strip_prefix('P')?;
    let (date, time) = body.split_once('T').unwrap_or((body, ""));
    let (mut months, mut days, mut micros) = (0i64, 0i64, 0i128);
    // `-1D`, `6.789S`: a signed decimal and its unit letter.
    let fields = |part: &str| -> Option<Vec<(String, char)>> {
        let mut out = Vec::new();
        let mut number = String::new();
        for c in part.chars() {
            if c.is_ascii_digit() || matches!(c, '-' | '+' | '.') {
                number.push(c);
            } else {
                out.push((std::mem::take(&mut number), c));
            }
        }
        number.is_empty().then_some(out)
    };
    for (n, unit) in fields(date)? {
        let n: i64 = n.parse().ok()?;
        match unit {
            'Y' => months = months.checked_add(n.checked_mul(12)?)?,
            'M' => months = months.checked_add(n)?,
            'W' => days = days.checked_add(n.checked_mul(7)?)?,
            'D' => days = days.checked_add(n)?,
            _ => return None,
        }
    }
    for (n, unit) in fields(time)? {
        let (scale, n) = match unit {
            'H' => (MICROS_PER_HOUR, n),
            'M' => (MICROS_PER_MINUTE, n),
            'S' => (MICROS_PER_SECOND, n),
            _ => return None,
        };
        let negative = n.starts_with('-');
        let digits = n.trim_start_matches(['-', '+']);
        let (whole, fraction) = digits.split_once('.').unwrap_or((digits, ""));
        if fraction.len() > 6 || !fraction.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        if unit != 'S' && !fraction.is_empty() {
            return None;
        }
        let whole: i128 = whole.parse().ok()?;
        let fraction: i128 = if fraction.is_empty() {
            0
        } else {
            format!("{fraction:0<6}").parse().ok()?
        };
        let value = whole.checked_mul(scale)?.checked_add(fraction)?;
        micros = micros.checked_add(if negative { -value } else { value })?;
    }
    Some((months, days, micros))
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
    #[error("table {table}: recording its columns in regionsync.known_columns (is the schema current? `regionsync setup` updates it): {source}")]
    KnownColumns {
        table: String,
        source: tokio_postgres::Error,
    },
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
                // The fifth column is the type a domain stands for (through
                // domains over domains), which Debezium carries the domain
                // column as; the sixth whether it is an array of a domain.
                "SELECT a.attname::text, format_type(a.atttypid, a.atttypmod), a.attnum, c.oid,
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
        let attnums: Vec<i16> = rows.iter().map(|r| r.get(2)).collect();
        let oid: u32 = rows[0].get(3);
        // Values are rendered for the type Debezium carries: a domain's
        // base type (the column keeps its domain name, so casts still check
        // the domain's constraints).
        let pg_types: Vec<PgType> = rows
            .iter()
            .map(|r| {
                let declared: String = r.get(1);
                let base: Option<String> = r.get(4);
                if r.get::<_, bool>(5) {
                    PgType::array_of_domain(&declared)
                } else {
                    PgType::parse(base.as_deref().unwrap_or(&declared))
                }
            })
            .collect();
        // A domain's limit is its base type's (a domain over varchar(3) cuts
        // and rounds as varchar(3) does).
        let fits: Vec<Fit> = rows
            .iter()
            .map(|r| {
                let declared: String = r.get(1);
                let base: Option<String> = r.get(4);
                Fit::of(base.as_deref().unwrap_or(&declared))
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
        // Every column seen is remembered, so that one missing later is
        // known for dropped or renamed here, not new upstream (also across
        // restarts).
        let names: Vec<&str> = columns.iter().map(|(n, _)| n.as_str()).collect();
        let known = |source| TableError::KnownColumns {
            table: name.clone(),
            source,
        };
        client
            .execute(
                "INSERT INTO regionsync.known_columns AS k (table_name, column_name, table_oid, attnum)
                 SELECT $1::text, unnest($2::text[]), $3::oid, unnest($4::smallint[])
                 ON CONFLICT (table_name, column_name) DO UPDATE
                    SET table_oid = EXCLUDED.table_oid, attnum = EXCLUDED.attnum
                  WHERE (k.table_oid, k.attnum) IS DISTINCT FROM (EXCLUDED.table_oid, EXCLUDED.attnum)",
                &[&name, &names, &oid, &attnums],
            )
            .await
            .map_err(known)?;
        let mut once_had = FxHashSet::default();
        let mut renamed_here = Vec::new();
        for r in client
            .query(
                "SELECT column_name, table_oid, attnum FROM regionsync.known_columns WHERE table_name = $1",
                &[&name],
            )
            .await
            .map_err(known)?
        {
            let (column, was_oid, was_attnum): (String, u32, i16) = (r.get(0), r.get(1), r.get(2));
            // The same table's column number under another name: renamed.
            if was_oid == oid && !names.contains(&column.as_str()) {
                if let Some(now) = attnums.iter().position(|a| *a == was_attnum) {
                    renamed_here.push((column.clone(), now));
                }
            }
            once_had.insert(column);
        }
        let mut by_source = source_positions(&columns, &config.columns);
        for (old, now) in renamed_here {
            // A source still sending the old name writes the renamed column,
            // unless the configuration maps that name itself.
            if !config.columns.contains_key(&old) {
                by_source.insert(old, now);
            }
        }
        Ok(TargetTable {
            by_source,
            fits,
            once_had,
            ignored: config.ignore_columns.iter().cloned().collect(),
            renames: config.columns.clone(),
            on_schema_mismatch: config.on_schema_mismatch.unwrap_or_default(),
            dropped_logged: Arc::default(),
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

    /// What a source column this table does not have is: ignored by
    /// configuration or dropped here (logged once), or new upstream.
    pub fn unknown_column(&self, source: &str) -> UnknownColumn {
        if self.ignored.contains(source) {
            return UnknownColumn::Ignored;
        }
        let target = self.renames.get(source).map_or(source, String::as_str);
        if !self.once_had.contains(target) {
            return UnknownColumn::New;
        }
        let mut logged = self.dropped_logged.lock().expect("dropped_logged lock");
        if logged.insert(source.to_owned()) {
            info!(table = %self.name, column = source,
                "the source still sends a column dropped here: its values are not replicated");
        }
        UnknownColumn::Ignored
    }

    /// Whether the layouts differ in what the apply reads: columns and
    /// their types.
    pub fn same_layout(&self, other: &TargetTable) -> bool {
        self.columns == other.columns && self.once_had == other.once_had
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
            fits: Vec::new(),
            once_had: FxHashSet::default(),
            ignored: FxHashSet::default(),
            renames: BTreeMap::new(),
            on_schema_mismatch: OnSchemaMismatch::Hold,
            dropped_logged: Arc::default(),
        }
        .with_fits()
    }

    fn with_fits(mut self) -> TargetTable {
        self.fits = self.columns.iter().map(|(_, t)| Fit::of(t)).collect();
        self.once_had = self.columns.iter().map(|(n, _)| n.clone()).collect();
        self
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

    #[test]
    fn array_literals_are_read_element_by_element() {
        let items = |t: &str| array_elements(t);
        let some = |v: &[Option<&str>]| Some(v.iter().map(|x| x.map(str::to_owned)).collect());
        assert_eq!(items("{}"), some(&[]));
        assert_eq!(
            items(r#"{"a","b,c",NULL,"NULL","q\"uote\\"}"#),
            some(&[
                Some("a"),
                Some("b,c"),
                None,
                Some("NULL"),
                Some("q\"uote\\")
            ])
        );
        assert_eq!(
            items("{{1, 2},{3,NULL}}"),
            some(&[Some("1"), Some("2"), Some("3"), None])
        );
        assert_eq!(items("[0:1]={x,y}"), some(&[Some("x"), Some("y")]));
        assert_eq!(items(r#"{a\,b}"#), some(&[Some("a,b")]));
        for bad in ["", "abc", "{", r#"{"a}"#, "{a}x", "[0:1]"] {
            assert_eq!(items(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn array_elements_must_fit_the_element_type() {
        // What PostgreSQL would round silently when the array is cast:
        // '{1.234}'::numeric(5,2)[] is {1.23}.
        let numeric = Fit::of("numeric(5,2)[]");
        assert_eq!(
            numeric,
            Fit::Array(Box::new(Fit::Numeric {
                precision: 5,
                scale: 2
            }))
        );
        assert!(numeric.check(r#"{"1.23",NULL,"-999.9"}"#).is_ok());
        let err = numeric.check(r#"{"1.23","1.234"}"#).unwrap_err();
        assert!(
            err.starts_with(
                "an element of the array: the value 1.234 has 3 digits after the point"
            ),
            "{err}"
        );
        assert!(numeric.check(r#"{{"1"},{"1000"}}"#).is_err());
        let ts = Fit::of("timestamp(0) without time zone[]");
        assert!(ts
            .check(r#"{"2024-01-01 00:00:00.000000","infinity"}"#)
            .is_ok());
        assert!(ts.check(r#"{"2024-01-01 00:00:00.600000"}"#).is_err());
        assert!(Fit::of("time(2) without time zone[]")
            .check(r#"{"12:34:56.789000"}"#)
            .is_err());
        assert!(Fit::of("real[]").check(r#"{"1.5","0.1"}"#).is_ok());
        assert!(Fit::of("real[]").check(r#"{"3.141592653589793"}"#).is_err());
        assert!(Fit::of("character varying(3)[]")
            .check(r#"{"abcdef"}"#)
            .is_err());
        assert!(Fit::of("character(2)[]").check(r#"{"ab  ","a"}"#).is_ok());
        assert!(Fit::of("character(2)[]").check(r#"{"abc"}"#).is_err());
        assert!(Fit::of("smallint[]").check("{70000}").is_err());
        // Types without a limit, and arrays of them, check nothing.
        assert_eq!(Fit::of("text[]"), Fit::Any);
        assert_eq!(Fit::of("numeric[]"), Fit::Any);
    }

    #[test]
    fn a_narrower_column_is_told_from_a_value_it_can_hold() {
        let chars = Fit::of("character varying(5)");
        assert_eq!(
            chars,
            Fit::Chars {
                max: 5,
                padded: false
            }
        );
        assert!(chars.check("héllo").is_ok(), "characters, not bytes");
        assert!(chars.check("hello!").is_err());
        let padded = Fit::of("character(3)");
        assert!(
            padded.check("ab     ").is_ok(),
            "trailing blanks of char(n)"
        );
        assert!(padded.check("abcd").is_err());
        let int = Fit::of("integer");
        assert!(int.check("2147483647").is_ok());
        assert!(int.check("2147483648").is_err());
        assert!(
            int.check("forty").is_ok(),
            "not a number: PostgreSQL refuses it"
        );
        assert!(Fit::of("smallint").check("-32769").is_err());
        assert_eq!(Fit::of("bigint"), Fit::Any);
        assert_eq!(Fit::of("text"), Fit::Any);
        let num = Fit::of("numeric(5,2)");
        assert_eq!(
            num,
            Fit::Numeric {
                precision: 5,
                scale: 2
            }
        );
        assert!(num.check("-999.99").is_ok());
        assert!(num.check("0999.9900").is_ok(), "leading and trailing zeros");
        assert!(
            num.check("1000.00").is_err(),
            "four digits before the point"
        );
        assert!(num.check("1.234").is_err(), "rounded away");
        assert!(Fit::of("numeric(4)").check("12345").is_err());
        assert_eq!(Fit::of("numeric"), Fit::Any);
    }

    #[test]
    fn a_column_keeping_fewer_fractional_digits_refuses_what_it_would_round() {
        for declared in [
            "timestamp(0) without time zone",
            "timestamp(0) with time zone",
            "time(0) without time zone",
            "time(0) with time zone",
        ] {
            assert_eq!(Fit::of(declared), Fit::Seconds { digits: 0 }, "{declared}");
        }
        assert_eq!(
            Fit::of("timestamp(3) without time zone"),
            Fit::Seconds { digits: 3 }
        );
        // Six digits keep every microsecond there is.
        for declared in [
            "timestamp(6) without time zone",
            "timestamp without time zone",
            "time with time zone",
            "timestamp with time zone",
        ] {
            assert_eq!(Fit::of(declared), Fit::Any, "{declared}");
        }
        let ts0 = Fit::of("timestamp(0) without time zone");
        // The renderer's text, Debezium's ISO texts, the words.
        assert!(ts0.check("2024-02-29 13:14:15.000000").is_ok());
        assert!(ts0.check("2024-02-29T13:14:15Z").is_ok());
        assert!(ts0.check("0044-03-15 12:00:00.000000 BC").is_ok());
        assert!(ts0.check("infinity").is_ok());
        assert!(ts0.check("-infinity").is_ok());
        let refused = ts0.check("2024-02-29 13:14:15.123456").unwrap_err();
        assert_eq!(
            refused,
            "the value 2024-02-29 13:14:15.123456 has 6 fractional digits of a second, \
             the column keeps 0 (it would be rounded)"
        );
        assert!(ts0.check("2024-02-29T13:14:15.5Z").is_err());
        assert!(ts0.check("0044-03-15 12:00:00.000001 BC").is_err());
        let ts1 = Fit::of("timestamp(1) without time zone");
        assert!(
            ts1.check("2024-02-29 13:14:15.500000").is_ok(),
            "fits exactly"
        );
        assert!(ts1.check("2024-02-29 13:14:15.550000").is_err());
        let tz3 = Fit::of("timestamp(3) with time zone");
        assert!(tz3.check("2024-02-29T11:14:15.654Z").is_ok());
        assert!(tz3.check("2024-02-29T11:14:15.6541Z").is_err());
        let time2 = Fit::of("time(2) without time zone");
        assert!(time2.check("12:34:56.780000").is_ok());
        assert!(time2.check("24:00:00.000000").is_ok());
        assert!(time2.check("12:34:56.789000").is_err());
        let timetz0 = Fit::of("time(0) with time zone");
        assert!(timetz0.check("10:00:00Z").is_ok());
        assert!(timetz0.check("10:00:00.5Z").is_err());
        // Not a time at all: PostgreSQL refuses it as the data's fault.
        assert!(ts0.check("yesterday").is_ok());
    }

    #[test]
    fn an_interval_column_refuses_fields_and_digits_it_would_drop() {
        assert_eq!(Fit::of("interval"), Fit::Any);
        assert_eq!(Fit::of("interval(6)"), Fit::Any);
        assert_eq!(Fit::of("interval day to second"), Fit::Any);
        assert_eq!(
            Fit::of("interval(0)"),
            Fit::Interval {
                keeps: IntervalFields::All,
                digits: Some(0)
            }
        );
        assert_eq!(
            Fit::of("interval day to second(0)"),
            Fit::Interval {
                keeps: IntervalFields::All,
                digits: Some(0)
            }
        );
        assert_eq!(
            Fit::of("interval year to month"),
            Fit::Interval {
                keeps: IntervalFields::Months,
                digits: None
            }
        );
        let p0 = Fit::of("interval day to second(0)");
        assert!(p0.check("P1Y2M20DT4H5M6S").is_ok());
        assert!(p0.check("P0Y0M-1DT2H3M4S").is_ok());
        assert!(p0.check("P1Y2M20DT4H5M6.000S").is_ok());
        assert!(p0.check("P1Y2M20DT4H5M6.789S").is_err());
        assert!(p0.check("P0Y0M0DT0H0M-0.000001S").is_err());
        assert!(p0.check("86400000000 microseconds").is_ok(), "numeric mode");
        assert!(p0.check("1500000 microseconds").is_err());
        let p3 = Fit::of("interval(3)");
        assert!(p3.check("P0Y0M0DT0H0M4.5S").is_ok());
        assert!(p3.check("P0Y0M0DT0H0M4.5001S").is_err());
        let ym = Fit::of("interval year to month");
        assert!(ym.check("P1Y2M0DT0H0M0S").is_ok());
        assert!(ym.check("P-1Y-2M0DT0H0M0S").is_ok());
        let lost = ym.check("P1Y2M3DT0H0M0S").unwrap_err();
        assert!(lost.contains("days or time"), "{lost}");
        assert!(ym.check("P1Y2M0DT0H0M0.5S").is_err());
        let year = Fit::of("interval year");
        assert!(year.check("P2Y0M0DT0H0M0S").is_ok());
        assert!(year.check("P1Y2M0DT0H0M0S").is_err(), "2 months dropped");
        let day = Fit::of("interval day");
        assert!(day.check("P0Y3M20DT0H0M0S").is_ok(), "months stay");
        assert!(day.check("P0Y0M20DT1H0M0S").is_err());
        let hour = Fit::of("interval day to hour");
        assert!(hour.check("P0Y0M1DT-5H0M0S").is_ok());
        assert!(hour.check("P0Y0M1DT5H1M0S").is_err());
        let minute = Fit::of("interval hour to minute");
        assert!(minute.check("PT5H1M").is_ok());
        assert!(minute.check("PT5H1M1S").is_err());
        // Not Debezium's forms: PostgreSQL decides.
        assert!(ym.check("1 day").is_ok());
    }

    #[test]
    fn a_real_column_refuses_a_double_it_cannot_hold() {
        let real = Fit::of("real");
        assert_eq!(real, Fit::Float4);
        for fits in [
            "1.5",
            "0",
            "-0",
            "NaN",
            "Infinity",
            "-Infinity",
            "16777216",
            // A float4 value widened to a double, as Debezium's float32.
            "0.10000000149011612",
            "340282346638528860000000000000000000000",
            // The float4 0.1's own text (schemaless JSON), or a double
            // whose float4 PostgreSQL shows as the same number.
            "0.1",
            "3.1415927",
        ] {
            assert!(real.check(fits).is_ok(), "{fits}");
        }
        for rounded in [
            "16777217",
            "1e308",
            "3.141592653589793",
            "0.123456789",
            "1e-46",
        ] {
            assert!(real.check(rounded).is_err(), "{rounded}");
        }
        assert_eq!(Fit::of("double precision"), Fit::Any);
    }

    #[test]
    fn a_missing_column_is_ignored_if_dropped_here_or_configured_else_new() {
        let mut t = TargetTable::for_tests("public.t", &[("id", "bigint"), ("a", "text")]);
        t.once_had.insert("gone".into());
        t.ignored.insert("local_only".into());
        t.renames.insert("old_name".into(), "gone".into());
        assert_eq!(t.unknown_column("gone"), UnknownColumn::Ignored);
        assert_eq!(t.unknown_column("old_name"), UnknownColumn::Ignored);
        assert_eq!(t.unknown_column("local_only"), UnknownColumn::Ignored);
        assert_eq!(t.unknown_column("added_upstream"), UnknownColumn::New);
    }
}
