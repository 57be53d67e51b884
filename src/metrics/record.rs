//! A committed batch's counts, recorded in the metrics the worker exports:
//! changes by outcome, conflicts, writes by class, dead letters and the
//! batch's size.

use std::collections::HashMap;

use super::{
    outcome, APPLY_BATCH_ROWS, CONFLICTS_TOTAL, EVENTS_TOTAL, RPO_CHANGES_TOTAL,
    RPO_WINDOW_SECONDS, WRITES_BY_CLASS_TOTAL,
};
use crate::apply::Applied;
use crate::config::Policy;
use crate::route::WriteClass;

/// One table's share of a committed batch.
pub struct TableCounts<'a> {
    pub table: &'a str,
    /// The table's conflict policy, a label of the conflicts counter.
    pub policy: Policy,
    pub applied: Applied,
}

/// Records one committed batch of `source_region`: per table what was
/// applied, skipped changes by (outcome, table), the dead-lettered count and
/// the number of messages in the batch.
pub fn batch(
    source_region: &str,
    tables: Vec<TableCounts<'_>>,
    skipped: &HashMap<(&'static str, String), u64>,
    dlq: usize,
    batch_len: usize,
) {
    let region = source_region.to_owned();
    for TableCounts {
        table,
        policy,
        applied: a,
    } in tables
    {
        let name = table.to_owned();
        metrics::counter!(EVENTS_TOTAL, "source_region" => region.clone(), "table" => name.clone(), "op" => "", "outcome" => outcome::APPLIED).increment(a.applied);
        metrics::counter!(EVENTS_TOTAL, "source_region" => region.clone(), "table" => name.clone(), "op" => "", "outcome" => outcome::STALE).increment(a.stale);
        metrics::counter!(EVENTS_TOTAL, "source_region" => region.clone(), "table" => name.clone(), "op" => "", "outcome" => outcome::SUPERSEDED).increment(a.superseded);
        if a.late > 0 {
            metrics::counter!(EVENTS_TOTAL, "source_region" => region.clone(), "table" => name.clone(), "op" => "", "outcome" => outcome::LATE).increment(a.late);
        }
        if a.held > 0 {
            metrics::counter!(EVENTS_TOTAL, "source_region" => region.clone(), "table" => name.clone(), "op" => "", "outcome" => outcome::HELD).increment(a.held);
        }
        if a.conflicts > 0 {
            metrics::counter!(CONFLICTS_TOTAL, "table" => name.clone(), "policy" => policy.as_str()).increment(a.conflicts);
        }
        if a.rpo > 0 {
            metrics::counter!(RPO_CHANGES_TOTAL, "source_region" => region.clone())
                .increment(a.rpo);
            let span = rpo_span_max(&region, a.rpo_span_ms as f64 / 1000.0);
            metrics::gauge!(RPO_WINDOW_SECONDS, "source_region" => region.clone()).set(span);
        }
        for class in WriteClass::ALL {
            let n = a.classes[class.index()];
            if n > 0 {
                metrics::counter!(WRITES_BY_CLASS_TOTAL, "table" => name.clone(), "class" => class.as_str()).increment(n);
            }
        }
    }
    for ((what, table), n) in skipped {
        metrics::counter!(EVENTS_TOTAL, "source_region" => region.clone(), "table" => table.clone(), "op" => "", "outcome" => *what).increment(*n);
    }
    if dlq > 0 {
        metrics::counter!(EVENTS_TOTAL, "source_region" => region.clone(), "table" => "", "op" => "", "outcome" => outcome::DLQ).increment(dlq as u64);
    }
    metrics::histogram!(APPLY_BATCH_ROWS).record(batch_len as f64);
}

/// The longest RPO span seen from each source region by this process.
static RPO_SPAN_MAX: std::sync::Mutex<Option<HashMap<String, f64>>> = std::sync::Mutex::new(None);

/// The longest RPO span seen from `region` by this process, with `span`.
fn rpo_span_max(region: &str, span: f64) -> f64 {
    let mut max = RPO_SPAN_MAX.lock().expect("rpo lock");
    let slot = max
        .get_or_insert_with(HashMap::new)
        .entry(region.to_string())
        .or_insert(0.0);
    *slot = slot.max(span);
    *slot
}

/// Sets `regionsync_rpo_window_seconds` again for every source region with
/// an RPO span: the exporter drops a gauge not set for a minute, and the
/// RPO of a return must stay readable after its last change is applied.
pub fn refresh_rpo_window() {
    let max = RPO_SPAN_MAX.lock().expect("rpo lock");
    for (region, span) in max.iter().flatten() {
        metrics::gauge!(RPO_WINDOW_SECONDS, "source_region" => region.clone()).set(*span);
    }
}
