//! Conflict: the check step (DESIGN.md §3, §4). Before a batch's changes of
//! one table are applied, the versions stored here for their keys are read;
//! a change whose writer replaced another version than the one stored here
//! (its `before` image's `(hlc, origin_region)`), where the stored one came
//! from another region, was written concurrently with it: both versions are
//! recorded in `regionsync.conflicts`. A remote region's write to a row
//! homed here follows the table's policy: `lww` applies it under the version
//! guard, `reject` and `manual` hold it (the local row stays) and record it.
//!
//! Holding a write is not enough for the regions to agree: the writer's
//! region applied it. So a held write is settled by writing one of the two
//! versions again here as a *local* write with a version newer than both,
//! which this region's Debezium publishes and every region applies:
//! [`resolve`] does that, at once for `reject` (keep the local row) and on
//! `regionsync conflicts resolve ID --keep local|remote` for `manual`. It
//! runs on a connection without the apply sessions' replication origin, so
//! the other regions do not take its change for a relay.
//!
//! [`decide`] is the rule, pure and unit-tested, here; `check` is its SQL
//! inside the batch's transaction, `resolve` the settling of what it
//! recorded. It checks rows as `apply::prepare` rendered them, before
//! `apply::write` writes them, so it reads the applier's table and row
//! types. `retention` deletes resolved conflicts after
//! `conflicts.retention` and counts the unresolved ones.

mod check;
mod resolve;
mod retention;

pub use check::{check, Checked};
pub use resolve::{current_version, list, reassert_rejected, resolve, Keep, Listed, Resolved};
pub use retention::{prune, unresolved};

use crate::clock::Version;
use crate::config::Policy;
use crate::converge;
use crate::route::WriteClass;

/// What kind of concurrent writes met.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Both regions updated (or inserted, then updated) the row.
    UpdateUpdate,
    /// Both regions inserted the key.
    InsertInsert,
    /// A remote update of a row deleted here.
    UpdateDelete,
    /// A remote delete of a row updated here.
    DeleteUpdate,
    /// A remote region's write to a row homed here, not concurrent with a
    /// local write, held by the `reject` or `manual` policy.
    CrossRegion,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::UpdateUpdate => "update_update",
            Kind::InsertInsert => "insert_insert",
            Kind::UpdateDelete => "update_delete",
            Kind::DeleteUpdate => "delete_update",
            Kind::CrossRegion => "cross_region",
        }
    }
}

/// How a recorded conflict was, or is to be, settled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Resolution {
    /// `lww`: the remote version was newer and was applied.
    RemoteWon,
    /// `lww`: the local version was newer and stayed.
    LocalKept,
    /// `reject`: the remote write was held; the local row is written again
    /// with a newer version (resolved_at is set once that is done).
    Rejected,
    /// `manual`: held until an operator resolves it.
    Open,
}

impl Resolution {
    pub fn as_str(self) -> &'static str {
        match self {
            Resolution::RemoteWon => "remote_won",
            Resolution::LocalKept => "local_kept",
            Resolution::Rejected => "rejected",
            Resolution::Open => "open",
        }
    }
    /// Whether nothing is left to do once it is recorded.
    fn settled(self) -> bool {
        matches!(self, Resolution::RemoteWon | Resolution::LocalKept)
    }
}

/// What becomes of one incoming change.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Decision {
    /// Apply it (under the version guard, which may still find it stale).
    pub apply: bool,
    /// Record it in `regionsync.conflicts`.
    pub record: Option<(Kind, Resolution)>,
}

/// An incoming change and what is stored here for its key.
#[derive(Clone, Debug)]
pub struct Case<'a> {
    pub class: WriteClass,
    pub policy: Policy,
    /// The region whose topic carried the change.
    pub source: &'a str,
    pub incoming: Version<'a>,
    pub is_delete: bool,
    /// A snapshot read (op `r`): it replaced nothing, and says nothing about
    /// concurrency.
    pub snapshot: bool,
    /// The version the writer replaced (its before image), if it sent one.
    pub replaced: Option<Version<'a>>,
    pub row: Option<Version<'a>>,
    pub tombstone: Option<Version<'a>>,
}

/// The check of DESIGN.md §4 and the policy of §3 for one change.
///
/// Concurrent: what is stored here is not what the writer replaced, came
/// from another region than the writer's, and is not older than what the
/// writer replaced (an older stored version only means this region has not
/// yet seen the replaced one, whose own arrival is checked in its turn).
/// A stored tombstone conflicts with an update only, never with an insert
/// (an insert after a delete seen in its region has no before image) or a
/// delete (both deletes agree).
///
/// Held: a cross-region write to a row homed here under `reject` or
/// `manual`, where the row is stored here (or, for an update, deleted here),
/// which the version guard would let in. Everything else is
/// applied, and recorded if concurrent.
pub fn decide(c: &Case<'_>) -> Decision {
    let concurrent_with = |stored: &Version<'_>| {
        c.replaced.as_ref() != Some(stored)
            && stored.origin_region != c.source
            && c.replaced.as_ref().is_none_or(|r| r < stored)
    };
    let kind = match (&c.row, &c.tombstone) {
        _ if c.snapshot => None,
        (Some(row), _) if concurrent_with(row) => Some(match (c.is_delete, c.replaced.is_some()) {
            (true, _) => Kind::DeleteUpdate,
            (false, false) => Kind::InsertInsert,
            (false, true) => Kind::UpdateUpdate,
        }),
        (None, Some(t)) if !c.is_delete && c.replaced.is_some() && concurrent_with(t) => {
            Some(Kind::UpdateDelete)
        }
        _ => None,
    };
    let wins = if c.is_delete {
        converge::delete_outcome(&c.incoming, c.row.as_ref(), c.tombstone.as_ref()).removes_row
    } else {
        converge::upsert_wins(&c.incoming, c.row.as_ref(), c.tombstone.as_ref(), None)
    };
    // Something of the home region's to keep: its row, or its delete.
    let home_state = c.row.is_some() || (c.tombstone.is_some() && !c.is_delete);
    let held = c.class == WriteClass::CrossRegion && c.policy != Policy::Lww && home_state;
    if held && wins {
        let resolution = match c.policy {
            Policy::Reject => Resolution::Rejected,
            _ => Resolution::Open,
        };
        return Decision {
            apply: false,
            record: Some((kind.unwrap_or(Kind::CrossRegion), resolution)),
        };
    }
    Decision {
        apply: true,
        record: kind.map(|k| {
            let r = if wins {
                Resolution::RemoteWon
            } else {
                Resolution::LocalKept
            };
            (k, r)
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::Hlc;

    const US: &str = "us-east-1";
    const EU: &str = "eu-west-1";

    fn ver(hlc: i64, origin: &str) -> Version<'_> {
        Version {
            hlc: Hlc(hlc),
            origin_region: origin,
        }
    }

    /// A change from us-east-1 arriving in eu-west-1.
    fn case<'a>(replaced: Option<Version<'a>>, row: Option<Version<'a>>) -> Case<'a> {
        Case {
            class: WriteClass::Shared,
            policy: Policy::Lww,
            source: US,
            incoming: ver(20, US),
            is_delete: false,
            snapshot: false,
            replaced,
            row,
            tombstone: None,
        }
    }

    #[test]
    fn an_update_of_the_stored_version_is_no_conflict() {
        let d = decide(&case(Some(ver(10, EU)), Some(ver(10, EU))));
        assert_eq!(
            d,
            Decision {
                apply: true,
                record: None
            }
        );
    }

    #[test]
    fn the_writer_s_own_earlier_versions_are_no_conflict() {
        // Stored here from the same region: the stream of one region is in
        // order, so nothing concurrent.
        let d = decide(&case(Some(ver(12, US)), Some(ver(11, US))));
        assert_eq!(d.record, None);
        // The store here is behind what the writer replaced: no conflict yet.
        let d = decide(&case(Some(ver(15, "ap-south-1")), Some(ver(10, EU))));
        assert_eq!(d.record, None);
    }

    #[test]
    fn concurrent_updates_are_recorded_with_the_lww_outcome() {
        let d = decide(&case(Some(ver(10, EU)), Some(ver(15, EU))));
        assert_eq!(
            d,
            Decision {
                apply: true,
                record: Some((Kind::UpdateUpdate, Resolution::RemoteWon))
            }
        );
        let mut late = case(Some(ver(10, EU)), Some(ver(25, EU)));
        late.incoming = ver(20, US);
        assert_eq!(
            decide(&late).record,
            Some((Kind::UpdateUpdate, Resolution::LocalKept))
        );
        assert_eq!(
            decide(&case(None, Some(ver(15, EU)))).record,
            Some((Kind::InsertInsert, Resolution::RemoteWon))
        );
        // A snapshot read is no write: nothing to record.
        let mut read = case(None, Some(ver(15, EU)));
        read.snapshot = true;
        assert_eq!(
            decide(&read),
            Decision {
                apply: true,
                record: None
            }
        );
    }

    #[test]
    fn deletes_against_updates_conflict_both_ways() {
        // A remote delete of a row updated here.
        let mut del = case(Some(ver(10, EU)), Some(ver(15, EU)));
        del.is_delete = true;
        del.incoming = ver(11, US);
        assert_eq!(
            decide(&del),
            Decision {
                apply: true,
                record: Some((Kind::DeleteUpdate, Resolution::LocalKept))
            }
        );
        // A remote update of a row deleted here (tombstone = deleted + 1).
        let mut upd = case(Some(ver(10, US)), None);
        upd.tombstone = Some(ver(11, EU));
        assert_eq!(
            decide(&upd).record,
            Some((Kind::UpdateDelete, Resolution::RemoteWon))
        );
        // An insert after a delete the writer saw has no before image.
        let mut insert = case(None, None);
        insert.tombstone = Some(ver(11, EU));
        assert_eq!(decide(&insert).record, None);
    }

    #[test]
    fn reject_and_manual_hold_cross_region_writes_to_stored_rows() {
        for (policy, resolution) in [
            (Policy::Reject, Resolution::Rejected),
            (Policy::Manual, Resolution::Open),
        ] {
            let mut c = case(Some(ver(10, EU)), Some(ver(10, EU)));
            c.class = WriteClass::CrossRegion;
            c.policy = policy;
            assert_eq!(
                decide(&c),
                Decision {
                    apply: false,
                    record: Some((Kind::CrossRegion, resolution))
                }
            );
            // Concurrent, and held all the same.
            c.row = Some(ver(15, EU));
            assert_eq!(decide(&c).record, Some((Kind::UpdateUpdate, resolution)));
            // Nothing stored here: nothing to keep, applied.
            c.row = None;
            assert!(decide(&c).apply);
            // Deleted here: the delete is kept.
            c.tombstone = Some(ver(11, EU));
            assert_eq!(decide(&c).record, Some((Kind::UpdateDelete, resolution)));
            c.tombstone = None;
            // Stale anyway: the guard skips it, nothing to hold.
            c.row = Some(ver(30, EU));
            assert!(decide(&c).apply);
        }
        // lww applies a cross-region write.
        let mut c = case(Some(ver(10, EU)), Some(ver(10, EU)));
        c.class = WriteClass::CrossRegion;
        assert_eq!(
            decide(&c),
            Decision {
                apply: true,
                record: None
            }
        );
    }
}
