//! PostgreSQL text rendering: a decoded [`Field`] as the text input of the
//! target column's type, so that the applier can bind every value as text
//! and cast it in SQL (`$1::text[]` → `::numeric`, `::date`, …). Dates,
//! times and decimals are formatted exactly, in integer arithmetic; a value
//! the column's type cannot take is a [`RenderError`], never a different
//! value.

use std::fmt::Write as _;

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;

use crate::change::semantic::*;
use serde_json::Value as Json;

use crate::change::{Field, Typed, UNAVAILABLE_PLACEHOLDER};
use crate::decode::json_plain;

/// Why a value cannot be written to a column of its type. Carries no
/// column name: the caller knows it and names table, column and type.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{0}")]
pub struct RenderError(pub String);

const MICROS_PER_DAY: i128 = 86_400_000_000;
/// Far beyond PostgreSQL's date range, small enough that no calendar
/// arithmetic on it can overflow.
const MAX_ABS_DAYS: i128 = 1_000_000_000;
/// PostgreSQL's largest numeric (131072 digits before the point, 16383
/// after) fits in about 61 KiB; bounding the input bounds the work.
pub(crate) const MAX_DECIMAL_BYTES: usize = 64 * 1024;
/// PostgreSQL's largest numeric display scale.
const MAX_DECIMAL_SCALE: u32 = 16383;

/// What rendering a PostgreSQL type needs from `format_type`'s output.
#[derive(Clone, Debug)]
enum PgKind {
    Int,
    Numeric {
        scale: Option<u32>,
    },
    Float,
    Bool,
    Date,
    Timestamp {
        precision: Option<u32>,
    },
    TimestampTz,
    Time {
        precision: Option<u32>,
    },
    TimeTz {
        precision: Option<u32>,
    },
    Interval,
    Bytea,
    Json,
    Uuid,
    /// Text types, enums and anything unknown.
    Text,
    Array(Box<PgType>),
}

/// A column type as `format_type` prints it, parsed once for rendering
/// (see [`Typed::to_pg_text_as`]).
#[derive(Clone, Debug)]
pub struct PgType {
    name: String,
    kind: PgKind,
}

impl PgType {
    pub fn parse(pg_type: &str) -> PgType {
        let name = pg_type.trim();
        if let Some(element) = name.strip_suffix("[]") {
            return PgType {
                name: name.to_owned(),
                kind: PgKind::Array(Box::new(PgType::parse(element))),
            };
        }
        let lower = name.to_ascii_lowercase();
        // `timestamp(3) without time zone` → base `timestamp without time
        // zone`, modifiers `3`.
        let (base, modifiers) = match lower.split_once('(') {
            Some((head, rest)) => match rest.split_once(')') {
                Some((modifiers, tail)) => (
                    format!("{} {}", head.trim(), tail.trim()).trim().to_owned(),
                    Some(modifiers.to_owned()),
                ),
                None => (lower.clone(), None),
            },
            None => (lower.clone(), None),
        };
        let numbers: Vec<Option<u32>> = modifiers
            .as_deref()
            .map(|m| m.split(',').map(|n| n.trim().parse().ok()).collect())
            .unwrap_or_default();
        let first = numbers.first().copied().flatten();
        let kind = match base.as_str() {
            "smallint" | "integer" | "bigint" | "int" | "int2" | "int4" | "int8" => PgKind::Int,
            "numeric" | "decimal" => PgKind::Numeric {
                // `numeric(p)` has scale 0; plain `numeric` has none.
                scale: match numbers.as_slice() {
                    [] => None,
                    [_] => Some(0),
                    [_, scale, ..] => *scale,
                },
            },
            "real" | "double precision" | "float4" | "float8" => PgKind::Float,
            "boolean" | "bool" => PgKind::Bool,
            "date" => PgKind::Date,
            "timestamp without time zone" | "timestamp" => PgKind::Timestamp { precision: first },
            "timestamp with time zone" | "timestamptz" => PgKind::TimestampTz,
            "time without time zone" | "time" => PgKind::Time { precision: first },
            "time with time zone" | "timetz" => PgKind::TimeTz { precision: first },
            "bytea" => PgKind::Bytea,
            "json" | "jsonb" => PgKind::Json,
            "uuid" => PgKind::Uuid,
            b if b.starts_with("interval") => PgKind::Interval,
            _ => PgKind::Text,
        };
        PgType {
            name: name.to_owned(),
            kind,
        }
    }
}

fn render_error(problem: impl Into<String>) -> RenderError {
    RenderError(problem.into())
}

impl Typed {
    /// Renders the value as PostgreSQL text input for a column of type
    /// `pg_type` (as `format_type` prints it); `None` for SQL NULL.
    /// Fails on [`Field::Unavailable`]: the caller substitutes the stored
    /// value first.
    pub fn to_pg_text(&self, pg_type: &str) -> Result<Option<String>, RenderError> {
        self.to_pg_text_as(&PgType::parse(pg_type))
    }

    /// [`Typed::to_pg_text`] for a type parsed beforehand (per column, not
    /// per value).
    pub fn to_pg_text_as(&self, ty: &PgType) -> Result<Option<String>, RenderError> {
        match &self.field {
            Field::Null => Ok(None),
            field => render(field, self.semantic.as_deref(), ty).map(Some),
        }
    }

    /// As [`Typed::to_pg_text_as`], taking the value: a text that is its
    /// own rendering (`render_string` changes only bytea's and numeric's)
    /// is moved, not copied.
    pub fn into_pg_text_as(self, ty: &PgType) -> Result<Option<String>, RenderError> {
        match (self.field, &ty.kind) {
            (Field::String(s), kind) if !matches!(kind, PgKind::Bytea | PgKind::Numeric { .. }) => {
                Ok(Some(s))
            }
            (field, _) => Typed {
                field,
                semantic: self.semantic,
            }
            .to_pg_text_as(ty),
        }
    }
}

fn render(field: &Field, semantic: Option<&str>, ty: &PgType) -> Result<String, RenderError> {
    if let PgKind::Array(element) = &ty.kind {
        return render_array(field, element, ty);
    }
    match field {
        Field::Null => Err(render_error("NULL has no text form")),
        Field::Unavailable => Err(render_error(format!(
            "the unchanged TOAST placeholder ({UNAVAILABLE_PLACEHOLDER}) cannot be written; \
             the stored value must be substituted first"
        ))),
        Field::Bool(b) => Ok(b.to_string()),
        Field::Int(i) => render_int(*i, semantic, ty),
        Field::Float(f) => Ok(render_float(*f)),
        Field::String(s) => render_string(s, ty),
        Field::Bytes(bytes) => render_bytes(bytes, ty),
        Field::Decimal { unscaled, scale } => match ty.kind {
            PgKind::Bytea => Ok(hex_bytea(unscaled)),
            // Integer input rejects `12.00`; a fraction that is not zero is
            // an error rather than a silent truncation.
            PgKind::Int => {
                let text = decimal_text(unscaled, *scale)?;
                match text.split_once('.') {
                    None => Ok(text),
                    Some((int, frac)) if frac.bytes().all(|b| b == b'0') => Ok(int.to_owned()),
                    Some(_) => Err(render_error(format!(
                        "{text} is not an integer for type {}",
                        ty.name
                    ))),
                }
            }
            _ => decimal_text(unscaled, *scale),
        },
        Field::Json(value) => Ok(value.to_string()),
        Field::Array(_) => Err(render_error(format!(
            "an array value cannot be written to a column of type {}",
            ty.name
        ))),
    }
}

fn render_array(field: &Field, element: &PgType, ty: &PgType) -> Result<String, RenderError> {
    match field {
        Field::Array(items) => array_literal(items, element),
        // Already PostgreSQL's array text.
        Field::String(s) => Ok(s.clone()),
        Field::Json(Json::Array(items)) => {
            let items = items
                .iter()
                .map(|item| json_plain(item, "", true))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| match e {
                    crate::decode::DecodeError::Column { problem, .. } => RenderError(problem),
                    other => RenderError(other.to_string()),
                })?;
            array_literal(&items, element)
        }
        Field::Null | Field::Unavailable => render(field, None, element),
        _ => Err(render_error(format!(
            "a scalar value cannot be written to a column of type {}",
            ty.name
        ))),
    }
}

/// `{"a","b,c",NULL}`: every element quoted, so no element text needs
/// PostgreSQL's rules for when quoting is required.
fn array_literal(items: &[Field], element: &PgType) -> Result<String, RenderError> {
    let mut out = String::from("{");
    for (i, item) in items.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        match item {
            Field::Null => out.push_str("NULL"),
            Field::Array(inner) => out.push_str(&array_literal(inner, element)?),
            item => {
                let text = render(item, None, element)?;
                out.push('"');
                for c in text.chars() {
                    if c == '"' || c == '\\' {
                        out.push('\\');
                    }
                    out.push(c);
                }
                out.push('"');
            }
        }
    }
    out.push('}');
    Ok(out)
}

fn render_int(i: i64, semantic: Option<&str>, ty: &PgType) -> Result<String, RenderError> {
    let i = i128::from(i);
    match ty.kind {
        PgKind::Date => {
            let days = match semantic {
                Some(TIMESTAMP | MICRO_TIMESTAMP | NANO_TIMESTAMP | CONNECT_TIMESTAMP) => {
                    instant_micros(i, semantic, None).div_euclid(MICROS_PER_DAY)
                }
                _ => i,
            };
            let (date, bc) = civil_date(days)?;
            Ok(if bc { format!("{date} BC") } else { date })
        }
        PgKind::Timestamp { precision } => {
            timestamp_text(instant_micros(i, semantic, precision), "")
        }
        // A bare number for timestamptz is an instant in UTC microseconds.
        PgKind::TimestampTz => timestamp_text(instant_micros(i, semantic, None), "+00"),
        PgKind::Time { precision } => time_text(time_micros(i, semantic, precision)?),
        PgKind::TimeTz { precision } => {
            Ok(time_text(time_micros(i, semantic, precision)?)? + "+00")
        }
        // Debezium's MicroDuration (interval.handling.mode=numeric).
        PgKind::Interval => Ok(format!("{i} microseconds")),
        PgKind::Bytea => Err(render_error(
            "an integer cannot be written to a bytea column",
        )),
        _ => Ok(i.to_string()),
    }
}

/// Microseconds since the epoch from an integer in the unit its semantic
/// type (or, lacking one, Debezium's adaptive precision mode) says.
fn instant_micros(i: i128, semantic: Option<&str>, precision: Option<u32>) -> i128 {
    match semantic {
        Some(TIMESTAMP | CONNECT_TIMESTAMP) => i * 1000,
        Some(MICRO_TIMESTAMP) => i,
        Some(NANO_TIMESTAMP) => i.div_euclid(1000),
        Some(DATE | CONNECT_DATE) => i * MICROS_PER_DAY,
        _ if precision.is_some_and(|p| p <= 3) => i * 1000,
        _ => i,
    }
}

fn time_micros(
    i: i128,
    semantic: Option<&str>,
    precision: Option<u32>,
) -> Result<i128, RenderError> {
    let micros = match semantic {
        Some(TIME | CONNECT_TIME) => i * 1000,
        Some(MICRO_TIME) => i,
        Some(NANO_TIME) => i.div_euclid(1000),
        _ if precision.is_some_and(|p| p <= 3) => i * 1000,
        _ => i,
    };
    // 24:00:00 is valid PostgreSQL time input.
    if !(0..=MICROS_PER_DAY).contains(&micros) {
        return Err(render_error(format!(
            "time of day {i} ({micros} µs) is outside 00:00:00..24:00:00"
        )));
    }
    Ok(micros)
}

fn time_text(micros: i128) -> Result<String, RenderError> {
    let mut out = String::with_capacity(15);
    push_time(&mut out, micros);
    Ok(out)
}

/// `HH:MM:SS.ffffff` of a time of day in 0..=24h (in i64: formatting an
/// i128 is several times slower, and this runs for every time value).
fn push_time(out: &mut String, micros: i128) {
    let micros = micros.clamp(0, MICROS_PER_DAY) as i64;
    let (secs, frac) = (micros / 1_000_000, micros % 1_000_000);
    let _ = write!(
        out,
        "{:02}:{:02}:{:02}.{frac:06}",
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    );
}

fn timestamp_text(micros: i128, zone: &str) -> Result<String, RenderError> {
    let mut out = String::with_capacity(32);
    let bc = push_civil_date(&mut out, micros.div_euclid(MICROS_PER_DAY))?;
    out.push(' ');
    push_time(&mut out, micros.rem_euclid(MICROS_PER_DAY));
    out.push_str(zone);
    if bc {
        out.push_str(" BC");
    }
    Ok(out)
}

/// Days since 1970-01-01 → (`YYYY-MM-DD`, before Christ) in the proleptic
/// Gregorian calendar PostgreSQL uses (year 0 is 1 BC).
fn civil_date(days: i128) -> Result<(String, bool), RenderError> {
    let mut out = String::with_capacity(10);
    let bc = push_civil_date(&mut out, days)?;
    Ok((out, bc))
}

/// Appends [`civil_date`]'s text; returns whether the date is BC.
fn push_civil_date(out: &mut String, days: i128) -> Result<bool, RenderError> {
    if !(-MAX_ABS_DAYS..=MAX_ABS_DAYS).contains(&days) {
        return Err(render_error(format!(
            "date {days} days from 1970-01-01 is out of range"
        )));
    }
    // In range, so i64 cannot overflow. Howard Hinnant's civil_from_days.
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let bc = year <= 0;
    let year = if bc { 1 - year } else { year };
    let _ = write!(out, "{year:04}-{month:02}-{day:02}");
    Ok(bc)
}

fn render_float(f: f64) -> String {
    if f.is_nan() {
        "NaN".to_owned()
    } else if f.is_infinite() {
        if f > 0.0 { "Infinity" } else { "-Infinity" }.to_owned()
    } else {
        // Display is the shortest text that round-trips.
        f.to_string()
    }
}

fn render_string(s: &str, ty: &PgType) -> Result<String, RenderError> {
    match ty.kind {
        // Schemaless JSON carries bytes as base64.
        PgKind::Bytea if s.starts_with("\\x") => Ok(s.to_owned()),
        PgKind::Bytea => BASE64
            .decode(s)
            .map(|bytes| hex_bytea(&bytes))
            .map_err(|e| render_error(format!("text for a bytea column is not base64: {e}"))),
        PgKind::Numeric { .. } if is_numeric_literal(s) => Ok(s.to_owned()),
        // Schemaless JSON carries a Decimal as base64 of its unscaled value.
        PgKind::Numeric { scale } => {
            let bytes = BASE64.decode(s).map_err(|_| {
                render_error(format!(
                    "{s:?} is neither a number nor a base64 decimal for type {}",
                    ty.name
                ))
            })?;
            let scale = scale.ok_or_else(|| {
                render_error(format!(
                    "base64 decimal {s:?} for type {} that has no scale: the scale is unknown",
                    ty.name
                ))
            })?;
            decimal_text(&bytes, scale)
        }
        _ => Ok(s.to_owned()),
    }
}

fn render_bytes(bytes: &[u8], ty: &PgType) -> Result<String, RenderError> {
    match ty.kind {
        PgKind::Bytea => Ok(hex_bytea(bytes)),
        PgKind::Numeric { scale: Some(scale) } => decimal_text(bytes, scale),
        PgKind::Numeric { scale: None } => Err(render_error(format!(
            "bytes for type {} that has no scale: the scale is unknown",
            ty.name
        ))),
        PgKind::Uuid if bytes.len() == 16 => {
            let hex = hex(bytes);
            let part =
                |range: std::ops::Range<usize>| hex.get(range).unwrap_or_default().to_owned();
            Ok([
                part(0..8),
                part(8..12),
                part(12..16),
                part(16..20),
                part(20..32),
            ]
            .join("-"))
        }
        _ => String::from_utf8(bytes.to_vec()).map_err(|_| {
            render_error(format!(
                "bytes that are not UTF-8 cannot be written to a column of type {}",
                ty.name
            ))
        }),
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn hex_bytea(bytes: &[u8]) -> String {
    format!("\\x{}", hex(bytes))
}

/// A number PostgreSQL's numeric input accepts: `-12.5`, `1e-3`, `NaN`, …
fn is_numeric_literal(s: &str) -> bool {
    let body = s.trim();
    let body = body.strip_prefix(['+', '-']).unwrap_or(body);
    if ["nan", "infinity", "inf"]
        .iter()
        .any(|w| body.eq_ignore_ascii_case(w))
    {
        return true;
    }
    let (mantissa, exponent) = match body.split_once(['e', 'E']) {
        Some((m, e)) => (m, Some(e)),
        None => (body, None),
    };
    let (int, frac) = mantissa.split_once('.').unwrap_or((mantissa, ""));
    let digits = |t: &str| t.bytes().all(|b| b.is_ascii_digit());
    let mantissa_ok = digits(int) && digits(frac) && !(int.is_empty() && frac.is_empty());
    let exponent_ok = exponent.is_none_or(|e| {
        let e = e.strip_prefix(['+', '-']).unwrap_or(e);
        !e.is_empty() && digits(e)
    });
    mantissa_ok && exponent_ok
}

/// Exact decimal text of a big-endian two's-complement unscaled value.
fn decimal_text(unscaled: &[u8], scale: u32) -> Result<String, RenderError> {
    if unscaled.len() > MAX_DECIMAL_BYTES {
        return Err(render_error(format!(
            "decimal of {} bytes exceeds PostgreSQL's numeric range",
            unscaled.len()
        )));
    }
    if scale > MAX_DECIMAL_SCALE {
        return Err(render_error(format!(
            "decimal scale {scale} exceeds PostgreSQL's maximum {MAX_DECIMAL_SCALE}"
        )));
    }
    let negative = unscaled.first().is_some_and(|b| b & 0x80 != 0);
    let mut magnitude = unscaled.to_vec();
    if negative {
        // Two's-complement negation: invert, then add one.
        let mut carry = true;
        for b in magnitude.iter_mut().rev() {
            *b = !*b;
            if carry {
                let (sum, overflow) = b.overflowing_add(1);
                *b = sum;
                carry = overflow;
            }
        }
    }
    // Base 2^32 limbs, most significant first.
    let padding = (4 - magnitude.len() % 4) % 4;
    let padded: Vec<u8> = std::iter::repeat_n(0, padding).chain(magnitude).collect();
    let mut limbs: Vec<u32> = padded
        .chunks_exact(4)
        .map(|c| c.iter().fold(0u32, |acc, &b| (acc << 8) | u32::from(b)))
        .collect();
    // Base 10^9 chunks, least significant first, by repeated long division.
    let mut chunks: Vec<u32> = Vec::new();
    loop {
        let lead = limbs.iter().take_while(|&&l| l == 0).count();
        limbs.drain(..lead);
        if limbs.is_empty() {
            break;
        }
        let mut rem: u64 = 0;
        for limb in limbs.iter_mut() {
            let cur = (rem << 32) | u64::from(*limb);
            // rem < 10^9, so the quotient fits in 32 bits.
            *limb = (cur / 1_000_000_000) as u32;
            rem = cur % 1_000_000_000;
        }
        chunks.push(rem as u32);
    }
    let mut digits = match chunks.split_last() {
        None => "0".to_owned(),
        Some((most, rest)) => {
            let mut d = most.to_string();
            for chunk in rest.iter().rev() {
                d.push_str(&format!("{chunk:09}"));
            }
            d
        }
    };
    let scale = scale as usize;
    if scale > 0 {
        if digits.len() <= scale {
            digits = "0".repeat(scale + 1 - digits.len()) + &digits;
        }
        digits.insert(digits.len() - scale, '.');
    }
    Ok(if negative {
        format!("-{digits}")
    } else {
        digits
    })
}
