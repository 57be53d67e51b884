//! Converge: the apply rules as pure functions — the specification of the
//! version guards that src/apply.rs writes in SQL and of the stamping
//! triggers in schemas/regionsync.sql, and the model docs/CONVERGENCE.md
//! reasons about (why three or more regions in a full mesh converge).
//!
//! A key's state in one region is its row's version (if a row is stored)
//! and its tombstone's version (if one is stored); versions order as
//! [`Version`] does, `(hlc, origin_region)` with names compared bytewise.
//! The tests simulate three regions exchanging changes in random orders and
//! check that they end identical.

use crate::clock::{send, Hlc, Version};

/// Whether an upsert of version `incoming` lands on a key whose stored row
/// has version `row` (`None`: no row) and whose tombstone has `tombstone`,
/// in a table whose newest truncate mark (`regionsync.truncations`) is at
/// `truncated`.
///
/// This is the guard of the upsert statement in src/apply.rs (`upsert`):
/// `INSERT … SELECT … WHERE NOT EXISTS (tombstone >= incoming) AND NOT
/// EXISTS (truncation.hlc > incoming.hlc) ON CONFLICT … DO UPDATE … WHERE
/// (t.hlc, t.origin_region COLLATE "C") < (EXCLUDED.hlc, …)`. The upsert
/// replaces the row and leaves the tombstone as it is. (The UPDATE-only
/// variant, for rows with unsent TOAST values, has the same guards and
/// lands only where a row is stored.)
pub fn upsert_wins(
    incoming: &Version<'_>,
    row: Option<&Version<'_>>,
    tombstone: Option<&Version<'_>>,
    truncated: Option<Hlc>,
) -> bool {
    row.is_none_or(|r| r < incoming)
        && tombstone.is_none_or(|t| t < incoming)
        && truncated.is_none_or(|t| t <= incoming.hlc)
}

/// What a delete does to a key (see [`delete_outcome`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeleteOutcome {
    /// The stored row is older than the delete and is removed.
    pub removes_row: bool,
    /// The key's tombstone becomes the delete's version: no row at least as
    /// new as the delete survives, and the tombstone was older or absent.
    pub marks_tombstone: bool,
}

/// What a delete of version `delete` does to a key whose stored row has
/// version `row` and whose tombstone has `tombstone`.
///
/// This is the delete statement in src/apply.rs (`delete`): the `gone` CTE
/// removes the row where `(t.hlc, t.origin_region) < delete`; the `marked`
/// CTE inserts the tombstone unless a row `>= delete` exists (it sees the
/// row as it was before `gone`), and `ON CONFLICT … WHERE (ts.hlc, …) <
/// (EXCLUDED.hlc, …)` only ever raises a stored one. The local
/// `regionsync.mark_deleted()` trigger raises the tombstone the same way.
pub fn delete_outcome(
    delete: &Version<'_>,
    row: Option<&Version<'_>>,
    tombstone: Option<&Version<'_>>,
) -> DeleteOutcome {
    let row_survives = row.is_some_and(|r| r >= delete);
    DeleteOutcome {
        removes_row: row.is_some() && !row_survives,
        marks_tombstone: !row_survives && tombstone.is_none_or(|t| t < delete),
    }
}

/// The version of a delete: one step after the version of the row it
/// removed (`before.hlc + 1`), from `region`, the region whose topic
/// carried the event. `apply::prepare` computes it from the event's before
/// image (REPLICA IDENTITY FULL), and `regionsync.mark_deleted()` gives the
/// source region's own tombstone the same version (`OLD.hlc + 1`).
pub fn delete_version(before: Hlc, region: &str) -> Version<'_> {
    Version {
        hlc: Hlc(before.0 + 1),
        origin_region: region,
    }
}

/// The HLC `regionsync.stamp_hlc()` gives a local write at wall-clock
/// milliseconds `wall_ms`: an UPDATE of a row stamped `old` gets
/// `greatest(wall_ms << 16, OLD.hlc + 1)` ([`send`]); an INSERT (`old` is
/// `None`) gets `greatest(wall_ms << 16, tombstone.hlc + 1)`, or the wall
/// clock alone where the key has no tombstone. Either way the write is
/// ordered after every version the region holds for the key, however far
/// behind its clock is.
pub fn stamp_hlc(old: Option<Hlc>, tombstone: Option<Hlc>, wall_ms: i64) -> Hlc {
    match old {
        Some(old) => send(old, wall_ms),
        None => Hlc::new(wall_ms, 0).max(tombstone.map_or(Hlc(0), |t| Hlc(t.0 + 1))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(hlc: i64, origin_region: &str) -> Version<'_> {
        Version {
            hlc: Hlc(hlc),
            origin_region,
        }
    }

    #[test]
    fn an_upsert_lands_only_above_the_row_the_tombstone_and_the_truncate() {
        let x = v(10, "eu-west-1");
        assert!(upsert_wins(&x, None, None, None));
        assert!(upsert_wins(&x, Some(&v(9, "us-east-1")), None, None));
        // Equal HLCs: the bytewise greater name wins; an equal version is a
        // duplicate and changes nothing.
        assert!(upsert_wins(&x, Some(&v(10, "ap-south-1")), None, None));
        assert!(!upsert_wins(&x, Some(&v(10, "us-east-1")), None, None));
        assert!(!upsert_wins(&x, Some(&x), None, None));
        // A tombstone refuses versions up to and including its own.
        assert!(!upsert_wins(&x, None, Some(&x), None));
        assert!(!upsert_wins(&x, None, Some(&v(10, "us-east-1")), None));
        assert!(upsert_wins(&x, None, Some(&v(10, "ap-south-1")), None));
        // A truncate refuses strictly older HLCs, whatever the region.
        assert!(upsert_wins(&x, None, None, Some(Hlc(10))));
        assert!(!upsert_wins(&x, None, None, Some(Hlc(11))));
    }

    #[test]
    fn a_delete_removes_only_an_older_row_and_raises_the_tombstone() {
        let d = v(10, "eu-west-1");
        let both = DeleteOutcome {
            removes_row: true,
            marks_tombstone: true,
        };
        assert_eq!(delete_outcome(&d, Some(&v(9, "us-east-1")), None), both);
        assert_eq!(
            delete_outcome(&d, Some(&v(10, "ap-south-1")), Some(&v(3, "a"))),
            both
        );
        // A row as new as the delete or newer survives, and no tombstone.
        for row in [v(10, "eu-west-1"), v(10, "us-east-1"), v(11, "a")] {
            let none = DeleteOutcome {
                removes_row: false,
                marks_tombstone: false,
            };
            assert_eq!(delete_outcome(&d, Some(&row), None), none);
        }
        // No row: the tombstone is raised, never lowered.
        let mark = DeleteOutcome {
            removes_row: false,
            marks_tombstone: true,
        };
        assert_eq!(delete_outcome(&d, None, None), mark);
        assert_eq!(delete_outcome(&d, None, Some(&v(9, "z"))), mark);
        assert!(!delete_outcome(&d, None, Some(&d)).marks_tombstone);
        assert!(!delete_outcome(&d, None, Some(&v(10, "us-east-1"))).marks_tombstone);
        // The delete's version is one step after the row it removed.
        assert_eq!(delete_version(Hlc(41), "us-east-1"), v(42, "us-east-1"));
    }

    #[test]
    fn local_writes_are_stamped_as_the_trigger_stamps_them() {
        let wall = 1_000;
        // Clock ahead of the row: the wall clock, counter 0.
        assert_eq!(
            stamp_hlc(Some(Hlc::new(900, 5)), None, wall),
            Hlc::new(1_000, 0)
        );
        // Clock behind the row (or its tombstone): one step after it.
        assert_eq!(
            stamp_hlc(Some(Hlc::new(1_200, 5)), None, wall),
            Hlc::new(1_200, 6)
        );
        assert_eq!(
            stamp_hlc(None, Some(Hlc::new(1_200, 5)), wall),
            Hlc::new(1_200, 6)
        );
        assert_eq!(
            stamp_hlc(None, Some(Hlc::new(900, 5)), wall),
            Hlc::new(1_000, 0)
        );
        assert_eq!(stamp_hlc(None, None, wall), Hlc::new(1_000, 0));
    }
}
