//! Clock: hybrid logical clocks (DESIGN.md §4). An HLC is physical
//! milliseconds shifted left by 16 bits plus a 16-bit logical counter, the
//! same encoding the `regionsync.stamp_hlc()` trigger in schemas/ writes.
//! Versions order by `(hlc, origin_region)`, the region names compared
//! bytewise so that every region picks the same winner.

use std::cmp::Ordering;

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

    /// The wall-clock milliseconds part.
    pub fn physical_ms(self) -> i64 {
        self.0 >> LOGICAL_BITS
    }

    /// The logical counter part.
    pub fn logical(self) -> u16 {
        (self.0 & 0xffff) as u16
    }
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

    #[test]
    fn packs_and_unpacks_physical_and_logical_parts() {
        let h = Hlc::new(1_795_813_071_636, 7);
        assert_eq!(h.physical_ms(), 1_795_813_071_636);
        assert_eq!(h.logical(), 7);
        assert_eq!(h.0, (1_795_813_071_636 << 16) | 7);
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
}
