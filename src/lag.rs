//! Lag: how far behind each source region this worker is, in the terms an
//! operator alerts on (DESIGN.md §5, METRICS.md).
//!
//! The worker remembers, per source region, the source commit time of the
//! newest change or heartbeat whose batch it has committed, and of the newest
//! heartbeat alone. Lag is `now − that time`, computed when read, so it keeps
//! growing while anything upstream or the worker's own database stalls, and
//! falls back as soon as a newer batch commits. Heartbeats (written by each
//! source region's Debezium every few seconds) keep it truthful when the
//! source is idle.
//!
//! Clock skew between regions shifts the value by the offset between the
//! clocks; a negative result (source clock ahead) is reported as 0, never
//! below. A stall cannot hide behind skew: once no newer change commits, the
//! value rises by one second per second whatever the offset.

use std::collections::HashMap;
use std::sync::Mutex;

/// What is known of one source region.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Seen {
    /// Newest source commit time (ms) of a change or heartbeat applied here.
    newest_ms: Option<i64>,
    /// Newest source commit time (ms) of a heartbeat applied here.
    heartbeat_ms: Option<i64>,
}

/// One source region's lag, as of `now`.
#[derive(Clone, Debug, PartialEq)]
pub struct RegionLag {
    pub source_region: String,
    /// now − newest applied source commit time, in seconds, never negative.
    /// Before anything was applied (and nothing was stored by an earlier run)
    /// it counts from the worker's start, so a pipeline that never delivers
    /// still shows a growing lag.
    pub replication_lag_seconds: f64,
    /// now − newest applied heartbeat's source commit time (same rules).
    pub heartbeat_age_seconds: f64,
    /// The newest applied source commit time (Unix seconds), if any.
    pub newest_source_seconds: Option<f64>,
}

/// Per source region freshness, shared by the partition tasks (writers) and
/// the metrics ticker and `/readyz` (readers).
#[derive(Debug)]
pub struct LagTracker {
    started_ms: i64,
    regions: Mutex<HashMap<String, Seen>>,
}

impl LagTracker {
    /// Tracks `source_regions`, counting unknown lag from `started_ms`.
    pub fn new(source_regions: impl IntoIterator<Item = String>, started_ms: i64) -> LagTracker {
        LagTracker {
            started_ms,
            regions: Mutex::new(
                source_regions
                    .into_iter()
                    .map(|r| (r, Seen::default()))
                    .collect(),
            ),
        }
    }

    /// A batch from `source_region` committed; `newest_ms` is the newest
    /// source commit time among its changes and heartbeats. Times only move
    /// forward: partitions commit in any order.
    pub fn committed(&self, source_region: &str, newest_ms: i64, heartbeat: bool) {
        let mut regions = self.regions.lock().expect("lag lock");
        let seen = regions.entry(source_region.to_string()).or_default();
        seen.newest_ms = Some(seen.newest_ms.map_or(newest_ms, |t| t.max(newest_ms)));
        if heartbeat {
            seen.heartbeat_ms = Some(seen.heartbeat_ms.map_or(newest_ms, |t| t.max(newest_ms)));
        }
    }

    /// Lag of every tracked source region at `now_ms`, sorted by region.
    pub fn snapshot(&self, now_ms: i64) -> Vec<RegionLag> {
        let regions = self.regions.lock().expect("lag lock");
        let age = |t: Option<i64>| (now_ms - t.unwrap_or(self.started_ms)).max(0) as f64 / 1000.0;
        let mut out: Vec<RegionLag> = regions
            .iter()
            .map(|(region, seen)| RegionLag {
                source_region: region.clone(),
                replication_lag_seconds: age(seen.newest_ms),
                heartbeat_age_seconds: age(seen.heartbeat_ms),
                newest_source_seconds: seen.newest_ms.map(|t| t as f64 / 1000.0),
            })
            .collect();
        out.sort_by(|a, b| a.source_region.cmp(&b.source_region));
        out
    }
}

/// End-to-end latency of one change, in seconds: local commit time − source
/// commit time, never negative (a source clock ahead of ours reads as 0).
pub fn latency_seconds(committed_ms: i64, source_ms: i64) -> f64 {
    (committed_ms - source_ms).max(0) as f64 / 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tracker() -> LagTracker {
        LagTracker::new(
            ["us-east-1".to_string(), "ap-south-1".to_string()],
            1_000_000,
        )
    }

    fn lag_of(t: &LagTracker, now: i64, region: &str) -> RegionLag {
        t.snapshot(now)
            .into_iter()
            .find(|l| l.source_region == region)
            .unwrap()
    }

    #[test]
    fn before_anything_arrives_lag_counts_from_the_start() {
        let t = tracker();
        let l = lag_of(&t, 1_045_000, "us-east-1");
        assert_eq!(l.replication_lag_seconds, 45.0);
        assert_eq!(l.heartbeat_age_seconds, 45.0);
        assert_eq!(l.newest_source_seconds, None);
    }

    #[test]
    fn lag_grows_while_nothing_commits_and_falls_when_a_batch_does() {
        let t = tracker();
        t.committed("us-east-1", 2_000_000, false);
        assert_eq!(
            lag_of(&t, 2_000_500, "us-east-1").replication_lag_seconds,
            0.5
        );
        assert_eq!(
            lag_of(&t, 2_040_000, "us-east-1").replication_lag_seconds,
            40.0
        );
        t.committed("us-east-1", 2_039_000, true);
        let l = lag_of(&t, 2_040_000, "us-east-1");
        assert_eq!(l.replication_lag_seconds, 1.0);
        assert_eq!(l.heartbeat_age_seconds, 1.0);
    }

    #[test]
    fn heartbeat_age_follows_heartbeats_only() {
        let t = tracker();
        t.committed("us-east-1", 2_000_000, true);
        t.committed("us-east-1", 2_010_000, false);
        let l = lag_of(&t, 2_010_000, "us-east-1");
        assert_eq!(l.replication_lag_seconds, 0.0);
        assert_eq!(l.heartbeat_age_seconds, 10.0);
    }

    #[test]
    fn an_older_batch_committed_late_does_not_move_lag_back() {
        let t = tracker();
        t.committed("us-east-1", 2_000_000, true);
        t.committed("us-east-1", 1_990_000, true);
        assert_eq!(
            lag_of(&t, 2_001_000, "us-east-1").replication_lag_seconds,
            1.0
        );
        assert_eq!(
            lag_of(&t, 2_001_000, "us-east-1").heartbeat_age_seconds,
            1.0
        );
    }

    #[test]
    fn a_source_clock_ahead_reads_as_zero_and_a_stall_still_shows() {
        let t = tracker();
        // The source clock runs 5 s ahead of ours.
        t.committed("us-east-1", 2_005_000, true);
        assert_eq!(
            lag_of(&t, 2_000_000, "us-east-1").replication_lag_seconds,
            0.0
        );
        // Nothing more arrives: after 40 s the lag shows 35 s and keeps rising.
        assert_eq!(
            lag_of(&t, 2_040_000, "us-east-1").replication_lag_seconds,
            35.0
        );
        assert_eq!(
            lag_of(&t, 2_041_000, "us-east-1").replication_lag_seconds,
            36.0
        );
    }

    #[test]
    fn regions_are_independent_and_sorted() {
        let t = tracker();
        t.committed("us-east-1", 2_000_000, true);
        let all = t.snapshot(2_000_000);
        assert_eq!(all[0].source_region, "ap-south-1");
        assert_eq!(all[0].replication_lag_seconds, 1_000.0);
        assert_eq!(all[1].replication_lag_seconds, 0.0);
    }

    #[test]
    fn latency_never_negative() {
        assert_eq!(latency_seconds(10_000, 7_500), 2.5);
        assert_eq!(latency_seconds(10_000, 12_000), 0.0);
    }
}
