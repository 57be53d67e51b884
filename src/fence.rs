//! The homing fence (DESIGN.md §3, "The returning region learns the homing
//! before it applies"): a worker applies nothing of a source region until
//! it knows that its own database holds every re-homing window that
//! region wrote under. Pure: the worker feeds it heartbeats, its
//! database's homing, and its own losses of the database.
//!
//! Each source region's Debezium heartbeat carries the newest homing epoch
//! of its database (`regionsync.heartbeat.homing_epoch`), and a region's
//! epochs only grow. So a heartbeat of region Y committed at `t` with epoch
//! `e` says: every change Y committed before `t` was written under an
//! epoch ≤ `e`. A source region is *held* from the worker's start (or a
//! re-arm) until a heartbeat of it arrives that is newer than the start
//! and carries an epoch ≤ this database's newest. MirrorMaker 2 mirrors the
//! heartbeat topic independently of the data topics, so the last heartbeat
//! already mirrored at start proves nothing about data mirrored after it;
//! one committed after the start covers everything Y committed before the
//! start, whichever topic runs ahead. What Y commits later is covered by
//! the rule that a heartbeat with an epoch above this database's re-arms
//! the hold (from that heartbeat on), and by re-arming after this worker
//! lost its database for a while (a failover may have happened meanwhile
//! that it could not learn).
//!
//! A source region that is failed over in this database (its window open)
//! is not held: it is down, everything it sends was committed before it
//! failed, under an epoch below the failover's, which this database has.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;

use crate::change::{Change, Field};

/// The column of `regionsync.heartbeat` that carries the source database's
/// newest homing epoch (the connectors' `heartbeat.action.query`).
pub const EPOCH_COLUMN: &str = "homing_epoch";

/// The homing epoch a decoded heartbeat carries, JSON or Avro: `None` when
/// it has none (a heartbeat query that predates the column, or NULL).
pub fn epoch_of(heartbeat: &Change) -> Option<i64> {
    heartbeat
        .after
        .as_ref()
        .and_then(|row| row.get(EPOCH_COLUMN))
        .and_then(|v| match v.field {
            Field::Int(e) => Some(e),
            _ => None,
        })
}

/// What the fence knows of one source region.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Source {
    /// Held until a heartbeat newer than this (source commit time, ms)
    /// carries an epoch ≤ this database's; `None`: released.
    held_until_after_ms: Option<i64>,
    /// The epoch the newest heartbeat carried (0 when it carried none:
    /// a connector whose heartbeat query predates the column).
    newest_epoch: Option<i64>,
}

#[derive(Debug, Default)]
struct State {
    /// This database's newest homing epoch (0: never re-homed).
    mine: i64,
    /// The regions failed over in this database (an open window).
    failed_over: BTreeSet<String>,
    sources: BTreeMap<String, Source>,
}

/// The fence of every source region, shared by the partition tasks (which
/// ask [`Fence::holds`] before each batch), the heartbeat reader and the
/// homing reader (which feed it) and `/readyz` ([`Fence::behind`]).
#[derive(Debug)]
pub struct Fence {
    state: Mutex<State>,
}

impl Fence {
    /// Every one of `sources` held from `now_ms` (the worker's start), with
    /// this database's homing as read at start.
    pub fn new(
        sources: impl IntoIterator<Item = String>,
        now_ms: i64,
        mine: i64,
        failed_over: impl IntoIterator<Item = String>,
    ) -> Fence {
        let sources = sources
            .into_iter()
            .map(|s| {
                (
                    s,
                    Source {
                        held_until_after_ms: Some(now_ms),
                        newest_epoch: None,
                    },
                )
            })
            .collect();
        Fence {
            state: Mutex::new(State {
                mine,
                failed_over: failed_over.into_iter().collect(),
                sources,
            }),
        }
    }

    /// This database's homing as just read: its newest epoch and the
    /// regions failed over in it.
    pub fn database(&self, mine: i64, failed_over: impl IntoIterator<Item = String>) {
        let mut state = self.state.lock().expect("fence lock");
        state.mine = mine;
        state.failed_over = failed_over.into_iter().collect();
    }

    /// This database's newest epoch as last read.
    pub fn mine(&self) -> i64 {
        self.state.lock().expect("fence lock").mine
    }

    /// The worker could not read its database for a while: a failover may
    /// have been written everywhere but here meanwhile. Every source region
    /// is held again until a heartbeat newer than `now_ms` clears it.
    pub fn rearm(&self, now_ms: i64) {
        let mut state = self.state.lock().expect("fence lock");
        for s in state.sources.values_mut() {
            s.held_until_after_ms = Some(s.held_until_after_ms.map_or(now_ms, |t| t.max(now_ms)));
        }
    }

    /// A heartbeat of `source` committed at `ts_ms` (its clock) carrying
    /// `epoch` (`None`: the heartbeat has no epoch column, read as 0).
    /// Returns true when its epoch is above this database's as last read:
    /// the caller may read the database again and feed [`Fence::database`]
    /// (the next heartbeat then decides).
    pub fn heartbeat(&self, source: &str, ts_ms: i64, epoch: Option<i64>) -> bool {
        let mut state = self.state.lock().expect("fence lock");
        let mine = state.mine;
        let Some(s) = state.sources.get_mut(source) else {
            return false;
        };
        let epoch = epoch.unwrap_or(0);
        s.newest_epoch = Some(epoch);
        if epoch > mine {
            // Y wrote under a homing this database lacks: whatever Y
            // committed from here on waits for a later heartbeat that this
            // database has caught up with.
            s.held_until_after_ms = Some(s.held_until_after_ms.map_or(ts_ms, |t| t.max(ts_ms)));
            return true;
        }
        if s.held_until_after_ms.is_some_and(|after| ts_ms > after) {
            s.held_until_after_ms = None;
        }
        false
    }

    /// Why `source`'s changes must not be applied now, if they must not.
    pub fn holds(&self, source: &str) -> Option<String> {
        let state = self.state.lock().expect("fence lock");
        if state.failed_over.contains(source) {
            return None;
        }
        let s = state.sources.get(source)?;
        let after = s.held_until_after_ms?;
        Some(match s.newest_epoch {
            Some(e) if e > state.mine => behind_reason(source, e, state.mine),
            _ => format!(
                "homing fence: waiting for a heartbeat of {source} committed after {} with a homing epoch <= {} (this database's)",
                crate::ops::rehome::at(after),
                state.mine
            ),
        })
    }

    /// The source regions whose newest heartbeat carries an epoch above
    /// this database's, described: the worker is not ready while any is.
    pub fn behind(&self) -> Option<String> {
        let state = self.state.lock().expect("fence lock");
        let why: Vec<String> = state
            .sources
            .iter()
            .filter(|(name, _)| !state.failed_over.contains(*name))
            .filter_map(|(name, s)| {
                let e = s.newest_epoch?;
                (e > state.mine).then(|| behind_reason(name, e, state.mine))
            })
            .collect();
        (!why.is_empty()).then(|| why.join("; "))
    }
}

fn behind_reason(source: &str, theirs: i64, mine: i64) -> String {
    format!(
        "homing epoch behind {source}: run rehome --back ({source}'s heartbeats carry homing epoch {theirs}, this database's newest is {mine}; nothing of {source} is applied meanwhile)"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const START: i64 = 1_000_000;

    fn fence(mine: i64) -> Fence {
        Fence::new(
            ["eu-west-1".to_string(), "ap-south-1".to_string()],
            START,
            mine,
            Vec::new(),
        )
    }

    #[test]
    fn held_at_start_until_a_heartbeat_newer_than_the_start_with_an_epoch_not_above_mine() {
        let f = fence(3);
        assert!(f.holds("eu-west-1").is_some());
        // The last heartbeat mirrored before the start proves nothing
        // about data topics mirrored ahead of it.
        assert!(!f.heartbeat("eu-west-1", START - 1_500, Some(3)));
        assert!(f
            .holds("eu-west-1")
            .unwrap()
            .contains("waiting for a heartbeat"));
        assert_eq!(f.behind(), None);
        // A fresh one with an epoch this database has: released.
        assert!(!f.heartbeat("eu-west-1", START + 500, Some(2)));
        assert_eq!(f.holds("eu-west-1"), None);
        // Each source region on its own.
        assert!(f.holds("ap-south-1").is_some());
    }

    #[test]
    fn an_epoch_above_mine_holds_and_makes_the_worker_unready_until_rehome_back() {
        // us-east-1 returns after a failover it missed (epoch 0 here);
        // eu-west-1 wrote under epoch 1.
        let f = fence(0);
        assert!(f.heartbeat("eu-west-1", START + 2_000, Some(1)));
        let why = f.holds("eu-west-1").unwrap();
        assert!(
            why.starts_with("homing epoch behind eu-west-1: run rehome --back"),
            "{why}"
        );
        assert!(f.behind().unwrap().contains("eu-west-1"));
        // More heartbeats under the same epoch change nothing.
        assert!(f.heartbeat("eu-west-1", START + 4_000, Some(1)));
        assert!(f.holds("eu-west-1").is_some());
        // `rehome --back` writes epoch 2 here and there; a heartbeat sent
        // before it was read here still carries 1, and keeps the hold.
        f.database(2, Vec::new());
        assert_eq!(f.behind(), None);
        assert!(f.holds("eu-west-1").is_some());
        assert!(!f.heartbeat("eu-west-1", START + 6_000, Some(2)));
        assert_eq!(f.holds("eu-west-1"), None);
    }

    #[test]
    fn a_released_region_is_held_again_by_an_epoch_above_mine_then_by_a_later_heartbeat_only() {
        let f = fence(1);
        f.heartbeat("eu-west-1", START + 1, Some(1));
        assert_eq!(f.holds("eu-west-1"), None);
        assert!(f.heartbeat("eu-west-1", START + 10_000, Some(2)));
        assert!(f.holds("eu-west-1").is_some());
        // This database read again: it has 2 as well. A heartbeat no newer
        // than the one that re-armed does not release.
        f.database(2, Vec::new());
        assert!(!f.heartbeat("eu-west-1", START + 10_000, Some(2)));
        assert!(f.holds("eu-west-1").is_some());
        assert!(!f.heartbeat("eu-west-1", START + 12_000, Some(2)));
        assert_eq!(f.holds("eu-west-1"), None);
    }

    #[test]
    fn losing_the_database_rearms_every_region() {
        let f = fence(0);
        f.heartbeat("eu-west-1", START + 1, None);
        f.heartbeat("ap-south-1", START + 1, Some(0));
        assert_eq!(f.holds("eu-west-1"), None);
        f.rearm(START + 60_000);
        assert!(f.holds("eu-west-1").is_some() && f.holds("ap-south-1").is_some());
        f.heartbeat("eu-west-1", START + 59_000, Some(0));
        assert!(f.holds("eu-west-1").is_some());
        f.heartbeat("eu-west-1", START + 61_000, Some(0));
        assert_eq!(f.holds("eu-west-1"), None);
    }

    #[test]
    fn a_region_failed_over_here_is_not_held_and_heartbeats_without_an_epoch_read_as_zero() {
        // eu-west-1 is down and failed over in this database: its backlog
        // was committed before it failed, under an older epoch.
        let f = Fence::new(
            ["eu-west-1".to_string()],
            START,
            1,
            ["eu-west-1".to_string()],
        );
        assert_eq!(f.holds("eu-west-1"), None);
        f.database(2, Vec::new());
        assert!(f.holds("eu-west-1").is_some());
        // A connector whose heartbeat query predates the column: epoch 0,
        // which never exceeds this database's.
        assert!(!f.heartbeat("eu-west-1", START + 1, None));
        assert_eq!(f.holds("eu-west-1"), None);
        assert_eq!(f.behind(), None);
        // A region this worker does not replicate from is nobody's concern.
        assert!(!f.heartbeat("us-west-2", START + 1, Some(9)));
        assert_eq!(f.holds("us-west-2"), None);
    }
}
