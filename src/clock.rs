//! Clock: hybrid logical clocks (DESIGN.md §4). An HLC is physical
//! milliseconds shifted left by 16 bits plus a 16-bit logical counter, the
//! same encoding the `regionsync.stamp_hlc()` trigger in schemas/ writes.
//! Versions order by `(hlc, origin_region)`, the region names compared
//! bytewise so that every region picks the same winner.
//!
//! Physical parts are milliseconds since the Unix epoch; the functions here
//! assume them in `0..2^47` (until the year 6429), where packing cannot
//! overflow.
//!
//! [`send`] and [`recv`] are the HLC update rules (Kulkarni et al.,
//! "Logical Physical Clocks", 2014) on packed values. [`exceeds_clock_skew`]
//! is the bound `max_clock_skew` in the config sets: a change stamped
//! further in the future than that says its writer's clock is wrong.

use std::cmp::Ordering;
use std::time::Duration;

/// Milliseconds since the Unix epoch by the local clock.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Bits of the logical counter in the low end of an HLC.
pub const LOGICAL_BITS: u32 = 16;

/// A hybrid logical clock value as stored in the `hlc bigint` column.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Hlc(pub i64);

impl Hlc {
    /// Packs wall-clock milliseconds and a logical counter.
    pub fn new(physical_ms: i64, logical: u16) -> Hlc {
        Hlc((physical_ms << LOGICAL_BITS) | logical as i64)
    }

    /// The HLC of wall-clock milliseconds `ms` with a zero counter, held
    /// within `0..=i64::MAX` whatever `ms` is (a source time far ahead
    /// must not wrap around to the past).
    pub fn at_ms_saturating(ms: i64) -> Hlc {
        Hlc(ms.clamp(0, i64::MAX >> LOGICAL_BITS) << LOGICAL_BITS)
    }

    /// The wall-clock milliseconds part.
    pub fn physical_ms(self) -> i64 {
        self.0 >> LOGICAL_BITS
    }

    /// The logical counter part.
    pub fn logical(self) -> u16 {
        (self.0 & 0xffff) as u16
    }

    /// How far this HLC's physical part is ahead of the physical time
    /// `now_ms`; zero when it is not ahead. The logical part does not count.
    pub fn ahead_of(self, now_ms: i64) -> Duration {
        let ahead = i128::from(self.physical_ms()) - i128::from(now_ms);
        Duration::from_millis(u64::try_from(ahead.max(0)).unwrap_or(u64::MAX))
    }
}

/// Whether `hlc`'s physical part is further ahead of the local physical
/// time `now_ms` than `max_clock_skew` allows. Exactly at the bound is still
/// within it. No clock is read: the caller passes `now_ms`.
pub fn exceeds_clock_skew(hlc: Hlc, now_ms: i64, max_clock_skew: Duration) -> bool {
    hlc.ahead_of(now_ms) > max_clock_skew
}

/// The send (local event) rule: the HLC of a write made here after `local`
/// at physical time `now_ms`, `max(now_ms << 16, local + 1)`, which is what
/// the `regionsync.stamp_hlc()` trigger computes
/// (`greatest(now_ms << 16, OLD.hlc + 1)`).
///
/// In the paper's terms: the physical part becomes `max(local.pt, now)`;
/// the counter resets to 0 if `now` is ahead, else it counts up. A counter
/// at 65535 carries into the physical part (packed `+ 1`), so the result is
/// always above `local`.
pub fn send(local: Hlc, now_ms: i64) -> Hlc {
    Hlc::new(now_ms, 0).max(Hlc(local.0.saturating_add(1)))
}

/// The receive rule: the local HLC after seeing `remote` at physical time
/// `now_ms`, `max(now_ms << 16, max(local, remote) + 1)`.
///
/// In the paper's terms: the physical part becomes
/// `pt = max(local.pt, remote.pt, now)`; the counter is
/// `max(local.c, remote.c) + 1` if both clocks have that `pt`,
/// `local.c + 1` or `remote.c + 1` if only one has, and 0 if only `now`
/// has. A counter at 65535 carries into the physical part, as in [`send`],
/// so the result is always above both `local` and `remote`.
pub fn recv(local: Hlc, remote: Hlc, now_ms: i64) -> Hlc {
    Hlc::new(now_ms, 0).max(Hlc(local.max(remote).0.saturating_add(1)))
}

/// One version of a row: its HLC and the region that wrote it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Version<'a> {
    pub hlc: Hlc,
    pub origin_region: &'a str,
}

impl Ord for Version<'_> {
    /// HLC first; exact ties broken by the region name, bytewise (as
    /// `COLLATE "C"` in SQL), never by a locale.
    fn cmp(&self, other: &Self) -> Ordering {
        self.hlc.cmp(&other.hlc).then_with(|| {
            self.origin_region
                .as_bytes()
                .cmp(other.origin_region.as_bytes())
        })
    }
}

impl PartialOrd for Version<'_> {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn packs_and_unpacks_physical_and_logical_parts() {
        let h = Hlc::new(1_795_813_071_636, 7);
        assert_eq!(h.physical_ms(), 1_795_813_071_636);
        assert_eq!(h.logical(), 7);
        assert_eq!(h.0, (1_795_813_071_636 << 16) | 7);
    }

    #[test]
    fn hlc_arithmetic_never_wraps() {
        // A year-2100 or absurd source time stays the largest version, not
        // a negative one.
        assert_eq!(Hlc::at_ms_saturating(i64::MAX).0, (i64::MAX >> 16) << 16);
        assert_eq!(Hlc::at_ms_saturating(-5).0, 0);
        assert_eq!(Hlc::at_ms_saturating(1_000).0, 1_000 << 16);
        assert_eq!(send(Hlc(i64::MAX), 0), Hlc(i64::MAX));
        assert_eq!(recv(Hlc(1), Hlc(i64::MAX), 0), Hlc(i64::MAX));
    }

    #[test]
    fn a_later_millisecond_beats_any_logical_count() {
        assert!(Hlc::new(1001, 0) > Hlc::new(1000, u16::MAX));
        assert!(Hlc::new(1000, 2) > Hlc::new(1000, 1));
    }

    #[test]
    fn ties_break_on_region_name_bytewise() {
        let a = Version {
            hlc: Hlc(5),
            origin_region: "eu-west-1",
        };
        let b = Version {
            hlc: Hlc(5),
            origin_region: "us-east-1",
        };
        assert!(b > a);
        // Bytewise: uppercase sorts before lowercase, unlike most locales.
        let upper = Version {
            hlc: Hlc(5),
            origin_region: "Z",
        };
        assert!(upper < a);
        let newer = Version {
            hlc: Hlc(6),
            origin_region: "a",
        };
        assert!(newer > b);
    }

    #[test]
    fn a_change_within_the_skew_bound_passes_and_one_beyond_it_does_not() {
        let now = 1_795_813_071_636;
        let max = Duration::from_secs(5);
        assert!(!exceeds_clock_skew(Hlc::new(now - 60_000, 0), now, max));
        assert!(!exceeds_clock_skew(Hlc::new(now, u16::MAX), now, max));
        // Exactly at the bound is within it, whatever the logical part.
        assert!(!exceeds_clock_skew(
            Hlc::new(now + 5_000, u16::MAX),
            now,
            max
        ));
        assert!(exceeds_clock_skew(Hlc::new(now + 5_001, 0), now, max));
        // Bounds finer than a millisecond compare exactly.
        let max = Duration::from_micros(1_500);
        assert!(!exceeds_clock_skew(Hlc::new(now + 1, 0), now, max));
        assert!(exceeds_clock_skew(Hlc::new(now + 2, 0), now, max));
        // A zero bound rejects any future millisecond.
        assert!(exceeds_clock_skew(
            Hlc::new(now + 1, 0),
            now,
            Duration::ZERO
        ));
        assert!(!exceeds_clock_skew(Hlc::new(now, 9), now, Duration::ZERO));
    }

    #[test]
    fn ahead_of_measures_the_physical_part_only() {
        assert_eq!(
            Hlc::new(1_000, 77).ahead_of(400),
            Duration::from_millis(600)
        );
        assert_eq!(Hlc::new(1_000, 77).ahead_of(1_000), Duration::ZERO);
        assert_eq!(Hlc::new(1_000, 0).ahead_of(5_000), Duration::ZERO);
        // Extremes do not overflow.
        assert_eq!(
            Hlc(i64::MAX).ahead_of(i64::MIN).as_millis(),
            (i64::MAX >> 16) as u128 + (1u128 << 63)
        );
    }

    #[test]
    fn send_follows_the_stamp_hlc_trigger() {
        // The wall clock is ahead: the counter resets.
        assert_eq!(send(Hlc::new(1_000, 5), 2_000), Hlc::new(2_000, 0));
        // The clock is behind or equal: count up on the stored physical part.
        assert_eq!(send(Hlc::new(1_000, 5), 900), Hlc::new(1_000, 6));
        assert_eq!(send(Hlc::new(1_000, 5), 1_000), Hlc::new(1_000, 6));
        // A full counter carries into the physical part.
        assert_eq!(send(Hlc::new(1_000, u16::MAX), 1_000), Hlc::new(1_001, 0));
    }

    #[test]
    fn recv_takes_the_largest_physical_part_and_counts_past_both() {
        let (l, r) = (Hlc::new(1_000, 5), Hlc::new(1_000, 9));
        assert_eq!(recv(l, r, 990), Hlc::new(1_000, 10));
        assert_eq!(recv(r, l, 1_000), Hlc::new(1_000, 10));
        assert_eq!(recv(Hlc::new(1_002, 3), r, 1_001), Hlc::new(1_002, 4));
        assert_eq!(recv(l, Hlc::new(1_003, 7), 1_001), Hlc::new(1_003, 8));
        assert_eq!(recv(l, r, 1_004), Hlc::new(1_004, 0));
        assert_eq!(
            recv(Hlc::new(7, u16::MAX), Hlc::new(7, 1), 0),
            Hlc::new(8, 0)
        );
    }

    /// The receive rule as the paper writes it, case by case, on unpacked
    /// parts (counters below 65535, where nothing carries).
    fn recv_by_cases(local: Hlc, remote: Hlc, now_ms: i64) -> Hlc {
        let (lp, rp) = (local.physical_ms(), remote.physical_ms());
        let (lc, rc) = (local.logical(), remote.logical());
        let pt = lp.max(rp).max(now_ms);
        let c = if pt == lp && pt == rp {
            lc.max(rc) + 1
        } else if pt == lp {
            lc + 1
        } else if pt == rp {
            rc + 1
        } else {
            0
        };
        Hlc::new(pt, c)
    }

    const MAX_MS: i64 = 1 << 47;

    fn hlc() -> impl Strategy<Value = Hlc> {
        (0..MAX_MS - 1, any::<u16>()).prop_map(|(p, l)| Hlc::new(p, l))
    }

    fn version() -> impl Strategy<Value = (Hlc, String)> {
        // Few distinct HLCs and short names, so ties and shared prefixes
        // are common; any Unicode, so multi-byte names meet ASCII ones.
        (
            prop_oneof![hlc(), (0i64..3).prop_map(Hlc)],
            prop_oneof!["[a-cA-C-]{0,3}", any::<String>()],
        )
    }

    proptest! {
        #[test]
        fn pack_and_unpack_round_trip(p in 0..MAX_MS, l in any::<u16>(), raw in any::<i64>()) {
            let h = Hlc::new(p, l);
            prop_assert_eq!((h.physical_ms(), h.logical()), (p, l));
            let r = Hlc(raw);
            prop_assert_eq!(Hlc::new(r.physical_ms(), r.logical()), r);
        }

        #[test]
        fn packing_preserves_the_order_of_physical_then_logical(
            a in (0..MAX_MS, any::<u16>()),
            b in (0..MAX_MS, any::<u16>()),
        ) {
            prop_assert_eq!(Hlc::new(a.0, a.1).cmp(&Hlc::new(b.0, b.1)), a.cmp(&b));
        }

        #[test]
        fn version_order_is_the_tuple_order_with_bytewise_names(
            a in version(), b in version(), c in version(),
        ) {
            let va = Version { hlc: a.0, origin_region: &a.1 };
            let vb = Version { hlc: b.0, origin_region: &b.1 };
            let vc = Version { hlc: c.0, origin_region: &c.1 };
            // Consistent with (hlc, name bytes) and with equality.
            let bytes = |v: &(Hlc, String)| (v.0, v.1.as_bytes().to_vec());
            prop_assert_eq!(va.cmp(&vb), bytes(&a).cmp(&bytes(&b)));
            prop_assert_eq!(va.cmp(&vb) == Ordering::Equal, va == vb);
            prop_assert_eq!(va.partial_cmp(&vb), Some(va.cmp(&vb)));
            // Antisymmetric and transitive: a total order.
            prop_assert_eq!(va.cmp(&vb), vb.cmp(&va).reverse());
            if va <= vb && vb <= vc {
                prop_assert!(va <= vc);
            }
        }

        #[test]
        fn recv_is_above_both_inputs_and_now(l in hlc(), r in hlc(), now in 0..MAX_MS - 1) {
            let h = recv(l, r, now);
            prop_assert!(h > l && h > r, "{:?} {:?} -> {:?}", l, r, h);
            prop_assert!(h >= Hlc::new(now, 0));
            prop_assert!(h.physical_ms() >= l.physical_ms().max(r.physical_ms()).max(now));
            let s = send(l, now);
            prop_assert!(s > l && s >= Hlc::new(now, 0));
        }

        #[test]
        fn recv_is_the_papers_rule_where_no_counter_is_full(
            lp in 0i64..4, lc in 0u16..4, rp in 0i64..4, rc in 0u16..4, now in 0i64..5,
            base in 0..MAX_MS - 10,
        ) {
            let (l, r) = (Hlc::new(base + lp, lc), Hlc::new(base + rp, rc));
            prop_assert_eq!(recv(l, r, base + now), recv_by_cases(l, r, base + now));
        }

        #[test]
        fn recv_matches_the_cases_on_any_clocks(l in hlc(), r in hlc(), now in 0..MAX_MS - 1) {
            prop_assume!(l.logical() < u16::MAX && r.logical() < u16::MAX);
            prop_assert_eq!(recv(l, r, now), recv_by_cases(l, r, now));
        }

        #[test]
        fn exceeds_clock_skew_compares_the_physical_lead(
            p in 0..MAX_MS, l in any::<u16>(), now in 0..MAX_MS, max_ms in 0u64..100_000,
        ) {
            let beyond = exceeds_clock_skew(Hlc::new(p, l), now, Duration::from_millis(max_ms));
            prop_assert_eq!(beyond, p - now > max_ms as i64);
        }
    }
}
