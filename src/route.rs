//! Route: where a change goes, and a row's home region (DESIGN.md §3). Pure.
//!
//! The route step decides, per decoded change, whether it is applied here
//! ([`route_change`] before it is rendered for its table, [`admit`] once its
//! row is rendered): a heartbeat, a relay (a change the source region's
//! worker applied there), an echo (this region's own change copied back)
//! and a row resident elsewhere are skipped with their outcome label; an
//! event of a table its topic does not feed is refused. [`Homing`] finds a
//! row's home region, [`classify`] tells an owner's write from a
//! cross-region or third-region one. The topic → table mapping itself lives
//! in [`crate::config`].
//!
//! # Home region of a key
//!
//! A row without an explicit `home_region` pin is homed by its affinity key
//! (e.g. `user_id`). The application, the global load balancer and every
//! regionsync worker must all compute the same answer, so the function is
//! specified here precisely enough to reimplement in any language;
//! `tests/vectors/route.csv` holds vectors to check a reimplementation
//! against (columns: `key`, its `xxh64` in hex, the `regions` list joined by
//! `;`, and the expected `home`).
//!
//! Given the key (a string) and the ordered list of regions `regions`
//! (length `n >= 1`):
//!
//! 1. **Bytes.** Encode the key as UTF-8, exactly as given: no Unicode
//!    normalisation (`"Zoë"` precomposed and `"Zoe\u{308}"` decomposed are
//!    different keys), no trimming, no case folding, no terminating NUL.
//!    A numeric key is hashed as its text, the way the application writes it
//!    (the integer 42 is the two bytes `"42"`; `"042"` is another key).
//! 2. **Hash.** `h = XXH64(bytes, seed = 0)`, the 64-bit xxHash of Yann
//!    Collet's specification, read as an unsigned 64-bit integer (the
//!    canonical big-endian hex form is just its display). For example
//!    `XXH64("") = 0xEF46DB3751D8E999`, `XXH64("a") = 0xD24EC4F1A98C6E5B`.
//! 3. **Jump.** Lamping & Veach's jump consistent hash of `h` into `n`
//!    buckets ("A Fast, Minimal Memory, Consistent Hash Algorithm", 2014):
//!
//!    ```text
//!    b := -1                        (signed 64-bit)
//!    j := 0                         (signed 64-bit)
//!    while j < n:
//!        b := j
//!        h := h * 2862933555777941757 + 1          (unsigned 64-bit, mod 2^64)
//!        j := trunc( double(b + 1) * ( double(2^31) / double((h >> 33) + 1) ) )
//!    return b                       (0 <= b < n)
//!    ```
//!
//!    `>> 33` is a logical shift of the unsigned value, so `(h >> 33) + 1`
//!    lies in `1..=2^31`. `double` is IEEE-754 binary64 with
//!    round-to-nearest-even; both conversions are exact. Keep the order of
//!    the float operations: first the division `2^31 / ((h >> 33) + 1)`,
//!    then the product with `b + 1` (multiplying first rounds differently);
//!    `trunc` drops the fraction (the value is positive). In languages
//!    without unsigned 64-bit integers do the LCG step with arbitrary
//!    precision or BigInt and mask to 64 bits (Python: `& (2**64 - 1)`).
//! 4. **Region.** `home = regions[b]`.
//!
//! The order of `regions` is part of the function: every party must use
//! the same list in the same order (the `regions` key of the config). The
//! jump hash makes *appending* a region cheap: going from `n` to `n + 1`
//! regions moves about `1/(n + 1)` of the keys, every one of them to the new
//! region, and no key moves between the old ones. Removing, inserting or
//! reordering regions anywhere but at the end rehomes most keys; to retire a
//! region, keep its name in the list and pin or migrate its rows instead.

use xxhash_rust::xxh64::xxh64;

use crate::change::{Change, Op};
use crate::config::{Policy, TableConfig};
use crate::metrics::outcome;

/// The prefix of the replication origin every regionsync apply session
/// runs under (`regionsync_<n>`): Debezium's `source.origin` names it on a
/// change this region's worker applied, which is how a relay is told from
/// an original.
pub const ORIGIN_PREFIX: &str = "regionsync_";

/// The route step's decision on one decoded change of a topic.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Apply it to the worker's table of this index.
    Apply { table: usize },
    /// Truncate that table (up to the change's commit time).
    Truncate { table: usize },
    /// Not for this region; the `outcome` label says why.
    Skip(&'static str),
    /// An event of a table the topic does not feed: a dead letter.
    Unconfigured,
}

/// Decides where a decoded change of `topic` goes. `table` is the worker's
/// table the topic feeds (its index and config), `None` for a heartbeat
/// topic.
pub fn route_change(
    table: Option<(usize, &TableConfig)>,
    topic: &str,
    change: &Change,
) -> Decision {
    let Some((index, config)) = table else {
        return Decision::Skip(outcome::HEARTBEAT);
    };
    if change
        .origin
        .as_deref()
        .is_some_and(|o| o.starts_with(ORIGIN_PREFIX))
    {
        // A change the source region's worker applied there: its original
        // comes straight from the region that made it.
        return Decision::Skip(outcome::RELAY);
    }
    if !config.accepts_source(topic, &change.schema, &change.table) {
        return Decision::Unconfigured;
    }
    if change.op == Op::Truncate {
        Decision::Truncate { table: index }
    } else {
        Decision::Apply { table: index }
    }
}

/// Whether a rendered upsert or delete is written in region `local`:
/// `None` if it is, or the outcome label of why not. `upsert_origin` is an
/// upsert's `origin_region` (`None` for a delete), `pin` its pinned home.
pub fn admit(
    upsert_origin: Option<&str>,
    pin: Option<&str>,
    residency: &[String],
    local: &str,
) -> Option<&'static str> {
    if upsert_origin == Some(local) {
        // This region's own change, copied back by the reverse flow.
        Some(outcome::ECHO)
    } else if !resident_in(residency, pin, local) {
        Some(outcome::RESIDENCY)
    } else {
        None
    }
}

/// How a table's rows find their home region (DESIGN.md §3).
#[derive(Clone, Debug)]
pub struct Homing {
    /// The affinity column (position in the table's columns); `None`: only
    /// pins.
    pub affinity: Option<usize>,
    /// The pin column (`home_region_column`), which wins where not NULL.
    pub pin: Option<usize>,
    /// Every region, in routing order.
    pub regions: Vec<String>,
    pub policy: Policy,
}

impl Homing {
    /// The home region of a row given (some of) its rendered values; `None`
    /// if neither the pin nor the affinity value is among them.
    pub fn home(&self, values: &[(usize, Option<String>)]) -> Option<String> {
        let value = |col: Option<usize>| {
            col.and_then(|c| values.iter().find(|(i, _)| *i == c))
                .and_then(|(_, v)| v.as_deref())
        };
        if let Some(pinned) = value(self.pin) {
            return Some(pinned.to_string());
        }
        value(self.affinity).map(|key| home_region(key, &self.regions).to_string())
    }

    /// The pin among (some of) a row's rendered values, if set.
    pub fn pin(&self, values: &[(usize, Option<String>)]) -> Option<String> {
        let pin = self.pin?;
        values
            .iter()
            .find(|(i, _)| *i == pin)
            .and_then(|(_, v)| v.clone())
    }

    /// The columns a home is computed from.
    pub fn columns(&self) -> impl Iterator<Item = usize> {
        self.affinity.into_iter().chain(self.pin)
    }
}

/// One re-homing (DESIGN.md §3, "Failover homing"): the rows homed in
/// `region` are homed in `acting_home` for every write committed at or
/// after `from_ms` and before `until_ms` (`None`: still failed over), by
/// its source commit time. Every region's `regionsync.homing` holds the
/// same windows, so every region classifies every write alike, whenever
/// and in whatever order it applies it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct HomingWindow {
    pub region: String,
    pub acting_home: String,
    pub from_ms: i64,
    pub until_ms: Option<i64>,
    /// The `rehome` command that last wrote it.
    pub epoch: i64,
}

impl HomingWindow {
    /// Whether a write committed at `committed_ms` falls in the window.
    pub fn covers(&self, committed_ms: i64) -> bool {
        self.from_ms <= committed_ms && self.until_ms.is_none_or(|u| committed_ms < u)
    }
}

/// Every re-homing window, as read from `regionsync.homing`.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct HomingOverrides {
    pub windows: Vec<HomingWindow>,
}

impl HomingOverrides {
    /// The home of a write to a row whose home is `home`, committed at
    /// `committed_ms`: the acting home of a window that covers it, else
    /// `home`. One step only: a region is never re-homed to a region that
    /// is itself re-homed at that time (`rehome` refuses it).
    pub fn acting_home<'a>(&'a self, home: &'a str, committed_ms: i64) -> &'a str {
        self.windows
            .iter()
            .find(|w| w.region == home && w.covers(committed_ms))
            .map_or(home, |w| w.acting_home.as_str())
    }

    /// For a write of region `source` committed at `committed_ms` and
    /// applied now: how long before `source` was failed over it was
    /// committed, if it was (the next failover of `source` after it). Such
    /// a write is a candidate for the RPO window: committed, not mirrored
    /// when its region failed. A change sent again is a candidate again:
    /// [`RpoCounter`] counts each once.
    pub fn rpo_span_ms(&self, source: &str, committed_ms: i64) -> Option<i64> {
        self.windows
            .iter()
            .filter(|w| w.region == source && w.from_ms > committed_ms)
            .map(|w| w.from_ms - committed_ms)
            .min()
    }

    /// The newest epoch among the windows (0: never re-homed).
    pub fn epoch(&self) -> i64 {
        self.windows.iter().map(|w| w.epoch).max().unwrap_or(0)
    }

    /// The open window of `region` (failed over and not back), if any.
    pub fn open(&self, region: &str) -> Option<&HomingWindow> {
        self.windows
            .iter()
            .find(|w| w.region == region && w.until_ms.is_none())
    }

    /// Where a load balancer sends a key's writes at `now_ms`
    /// (`regionsync route --current`): its home for a write committed
    /// `margin_ms` earlier (the config's `max_clock_skew`). A window's
    /// users move in only once it has been open that long, and back out
    /// only once it has been closed that long, so a writer whose clock is
    /// up to `margin_ms` off still stamps its writes inside the window of
    /// the region it writes in.
    pub fn home_now<'a, S: AsRef<str>>(
        &'a self,
        key: &str,
        regions: &'a [S],
        now_ms: i64,
        margin_ms: i64,
    ) -> &'a str {
        self.acting_home(home_region(key, regions), now_ms - margin_ms)
    }
}

/// The multiplier of the 64-bit linear congruential step of the jump hash.
pub const JUMP_LCG_MULTIPLIER: u64 = 2_862_933_555_777_941_757;

/// The seed of the xxh64 key hash.
pub const KEY_HASH_SEED: u64 = 0;

/// `XXH64(key as UTF-8 bytes, seed 0)`: step 2 of the module docs.
pub fn key_hash(key: &str) -> u64 {
    xxh64(key.as_bytes(), KEY_HASH_SEED)
}

/// Lamping & Veach's jump consistent hash: the bucket in `0..buckets` of a
/// 64-bit `key` (step 3 of the module docs).
///
/// # Panics
/// If `buckets` is 0.
pub fn jump_consistent_hash(mut key: u64, buckets: u32) -> u32 {
    assert!(buckets > 0, "jump_consistent_hash: no buckets");
    let n = i64::from(buckets);
    let mut b: i64 = -1;
    let mut j: i64 = 0;
    while j < n {
        b = j;
        key = key.wrapping_mul(JUMP_LCG_MULTIPLIER).wrapping_add(1);
        // Exact conversions: b + 1 <= 2^32 and (key >> 33) + 1 <= 2^31.
        let step = (1u64 << 31) as f64 / ((key >> 33) + 1) as f64;
        j = ((b + 1) as f64 * step) as i64;
    }
    // 0 <= b < buckets, so it fits.
    b as u32
}

/// The index in a list of `n` regions of `key`'s home region.
///
/// # Panics
/// If `n` is 0 or above `u32::MAX`.
pub fn home_index(key: &str, n: usize) -> usize {
    let buckets = u32::try_from(n).expect("home_index: more than u32::MAX regions");
    jump_consistent_hash(key_hash(key), buckets) as usize
}

/// The home region of `key` among the ordered `regions`:
/// `regions[jump_consistent_hash(xxh64(key, 0), regions.len())]`.
///
/// # Panics
/// If `regions` is empty (a valid config never has an empty list).
pub fn home_region<'a, S: AsRef<str>>(key: &str, regions: &'a [S]) -> &'a str {
    assert!(!regions.is_empty(), "home_region: no regions");
    regions[home_index(key, regions.len())].as_ref()
}

/// How a change from another region relates to this one (DESIGN.md §3).
/// Echoes (the row's `origin_region` is this region) are skipped before
/// this question is asked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WriteClass {
    /// The table's rows have no home: applied under the version guard.
    Shared,
    /// The row's home region wrote it: applied under the version guard.
    Owner,
    /// Another region wrote a row homed here: the table's policy decides.
    CrossRegion,
    /// A region wrote a row homed in a third region: applied under the
    /// version guard (the home region's policy speaks for the row).
    ThirdRegion,
}

impl WriteClass {
    /// Every class, in the order of [`WriteClass::index`].
    pub const ALL: [WriteClass; 4] = [
        WriteClass::Shared,
        WriteClass::Owner,
        WriteClass::CrossRegion,
        WriteClass::ThirdRegion,
    ];

    pub fn index(self) -> usize {
        self as usize
    }

    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            WriteClass::Shared => "shared",
            WriteClass::Owner => "owner",
            WriteClass::CrossRegion => "cross_region",
            WriteClass::ThirdRegion => "third_region",
        }
    }
}

/// The class of a write from `source` to a row homed in `home` (`None`: a
/// shared table), as seen by the worker of region `local`.
pub fn classify(source: &str, home: Option<&str>, local: &str) -> WriteClass {
    match home {
        None => WriteClass::Shared,
        Some(h) if h == source => WriteClass::Owner,
        Some(h) if h == local => WriteClass::CrossRegion,
        Some(_) => WriteClass::ThirdRegion,
    }
}

/// Whether `region` matches a residency pattern: a region name, or a
/// prefix ending in `*` (`"eu-*"`).
pub fn region_matches(pattern: &str, region: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(prefix) => region.starts_with(prefix),
        None => pattern == region,
    }
}

/// Whether a row pinned to `pin` may be stored in region `local` under a
/// table's residency patterns: a row pinned to a region matching a pattern
/// stays in the regions matching that pattern (the first that matches
/// decides); any other row, pinned or not, may be stored anywhere.
pub fn resident_in(patterns: &[String], pin: Option<&str>, local: &str) -> bool {
    let Some(pin) = pin else { return true };
    match patterns.iter().find(|p| region_matches(p, pin)) {
        Some(p) => region_matches(p, local),
        None => true,
    }
}

/// Counts the RPO-window changes of one partition of a source region's
/// topic (DESIGN.md §3, `regionsync_rpo_changes_total`): changes committed
/// before their region was failed over and applied here for the first
/// time after it. Fed every change of a batch in partition order, the
/// superseded ones included.
///
/// A partition carries a region's first copies in commit order (Debezium
/// emits in commit order, Kafka and MirrorMaker 2 keep a partition's
/// order); what arrives out of that order is a copy sent again (a restarted
/// Debezium resends from its last flushed position, a restarted
/// MirrorMaker 2 from its last committed offset). So a change whose commit
/// time is older than one already applied from the partition — stored in
/// `regionsync.offsets.source_ts_ms`, or earlier in the batch — is a copy
/// of one this region has seen, and is not counted again. A change of the
/// same millisecond as the newest is counted only if that version (key,
/// HLC) was not seen in the batch; at the stored boundary, where the
/// versions are not known, it is taken for a copy.
#[derive(Debug, Default)]
pub struct RpoCounter {
    /// Newest commit time applied from the partition (stored or seen).
    newest_ms: Option<i64>,
    /// The versions (key, HLC) seen at `newest_ms` in this batch; `None`:
    /// not known (the stored boundary), every version there is a copy.
    at_newest: Option<Vec<(String, i64)>>,
    /// RPO-window changes counted, and the longest span before the
    /// failover (ms).
    pub count: u64,
    pub span_ms: i64,
}

impl RpoCounter {
    /// Starts after `stored_newest_ms`, the partition's newest applied
    /// commit time as stored (None: nothing applied yet).
    pub fn after(stored_newest_ms: Option<i64>) -> RpoCounter {
        RpoCounter {
            newest_ms: stored_newest_ms,
            at_newest: None,
            count: 0,
            span_ms: 0,
        }
    }

    /// One change of `source`, in partition order: true if it is counted.
    pub fn change(
        &mut self,
        homing: &HomingOverrides,
        source: &str,
        committed_ms: i64,
        key: &str,
        hlc: i64,
    ) -> bool {
        let first_copy = match self.newest_ms {
            None => true,
            Some(n) if committed_ms > n => true,
            Some(n) if committed_ms == n => self
                .at_newest
                .as_ref()
                .is_some_and(|seen| !seen.iter().any(|(k, h)| k == key && *h == hlc)),
            Some(_) => false,
        };
        if self.newest_ms.is_none_or(|n| committed_ms > n) {
            self.newest_ms = Some(committed_ms);
            self.at_newest = Some(Vec::new());
        }
        if self.newest_ms == Some(committed_ms) {
            if let Some(seen) = self.at_newest.as_mut() {
                seen.push((key.to_owned(), hlc));
            }
        }
        if !first_copy {
            return false;
        }
        let Some(span) = homing.rpo_span_ms(source, committed_ms) else {
            return false;
        };
        self.count += 1;
        self.span_ms = self.span_ms.max(span);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::change::Row;
    use crate::config::{TableConfig, SHARED};
    use proptest::prelude::*;

    /// us-east-1 failed over to eu-west-1 at 10,000 ms.
    fn failed_over_at_10s() -> HomingOverrides {
        HomingOverrides {
            windows: vec![HomingWindow {
                region: "us-east-1".into(),
                acting_home: "eu-west-1".into(),
                from_ms: 10_000,
                until_ms: Some(50_000),
                epoch: 2,
            }],
        }
    }

    #[test]
    fn rpo_changes_count_once_each_in_partition_order_and_resends_not_at_all() {
        let homing = failed_over_at_10s();
        const US: &str = "us-east-1";
        // eu-west-1 applied the partition up to 7,000 ms before the failure.
        let mut c = RpoCounter::after(Some(7_000));
        // At return: Debezium's resend of what was mirrored before the
        // failure (its last flushed position was at 5,000 ms), then the
        // first copies never mirrored, then the resend of those.
        for (ms, key, hlc) in [(5_000, "1", 50), (7_000, "2", 70)] {
            assert!(!c.change(&homing, US, ms, key, hlc), "{ms}: a resend");
        }
        // Two RPO changes of key 3 (the first superseded in the batch), one
        // of key 4 in the same millisecond.
        assert!(c.change(&homing, US, 8_000, "3", 80));
        assert!(c.change(&homing, US, 9_000, "3", 90));
        assert!(c.change(&homing, US, 9_000, "4", 91));
        // Debezium restarted again: the same versions once more.
        for (ms, key, hlc) in [(8_000, "3", 80), (9_000, "3", 90), (9_000, "4", 91)] {
            assert!(!c.change(&homing, US, ms, key, hlc), "{ms} {key}: a resend");
        }
        assert_eq!((c.count, c.span_ms), (3, 2_000));
        // After the failover: not the RPO window (an outage write would
        // not even come from us-east-1; after failback, us-east-1 at home).
        assert!(!c.change(&homing, US, 60_000, "5", 600));
        assert_eq!(c.count, 3);
    }

    #[test]
    fn rpo_counting_starts_from_the_stored_boundary_and_needs_a_failover() {
        let homing = failed_over_at_10s();
        // The next batch: its counter starts after the previous batch's
        // newest time as stored; a copy at the boundary is a resend.
        let mut c = RpoCounter::after(Some(9_000));
        assert!(!c.change(&homing, "us-east-1", 9_000, "4", 91));
        assert!(c.change(&homing, "us-east-1", 9_500, "6", 95));
        // Nothing stored yet: the first change counts.
        let mut c = RpoCounter::after(None);
        assert!(c.change(&homing, "us-east-1", 1_000, "7", 10));
        // Another region, or no failover: never counted.
        let mut c = RpoCounter::after(None);
        assert!(!c.change(&homing, "ap-south-1", 1_000, "8", 10));
        assert!(!c.change(&HomingOverrides::default(), "us-east-1", 1_000, "8", 11));
        assert_eq!(c.count, 0);
    }

    fn users_config() -> TableConfig {
        TableConfig {
            topics: vec!["us-east-1.cdc.public.users".into()],
            target: "public.users".into(),
            key: vec![],
            columns: Default::default(),
            source_table: None,
            affinity: SHARED.into(),
            home_region_column: None,
            policy: Policy::Lww,
            residency: vec![],
            counters: Default::default(),
            ignore_columns: vec![],
            on_schema_mismatch: None,
        }
    }

    fn change(op: Op, table: &str, origin: Option<&str>) -> Change {
        Change {
            op,
            schema: "public".into(),
            table: table.into(),
            key: Row::new(),
            before: None,
            after: None,
            source_ts_ms: 1,
            lsn: None,
            origin: origin.map(Into::into),
            snapshot: false,
            typed: true,
        }
    }

    #[test]
    fn changes_are_routed_to_their_table_or_skipped_with_their_outcome() {
        let config = users_config();
        let topic = "us-east-1.cdc.public.users";
        let users = Some((3, &config));
        assert_eq!(
            route_change(users, topic, &change(Op::Update, "users", None)),
            Decision::Apply { table: 3 }
        );
        assert_eq!(
            route_change(users, topic, &change(Op::Truncate, "users", None)),
            Decision::Truncate { table: 3 }
        );
        assert_eq!(
            route_change(None, "us-east-1.heartbeat", &change(Op::Update, "hb", None)),
            Decision::Skip(outcome::HEARTBEAT)
        );
        assert_eq!(
            route_change(
                users,
                topic,
                &change(Op::Update, "users", Some("regionsync_7"))
            ),
            Decision::Skip(outcome::RELAY)
        );
        // Another origin (an application's own replication) is no relay.
        assert_eq!(
            route_change(users, topic, &change(Op::Create, "users", Some("pg_app"))),
            Decision::Apply { table: 3 }
        );
        assert_eq!(
            route_change(users, topic, &change(Op::Create, "orders", None)),
            Decision::Unconfigured
        );
    }

    #[test]
    fn echoes_and_rows_resident_elsewhere_are_not_written() {
        let eu_only = vec!["eu-*".to_string()];
        assert_eq!(
            admit(Some("eu-west-1"), None, &[], "eu-west-1"),
            Some(outcome::ECHO)
        );
        assert_eq!(admit(Some("us-east-1"), None, &[], "eu-west-1"), None);
        assert_eq!(admit(None, None, &[], "eu-west-1"), None);
        assert_eq!(
            admit(Some("eu-west-1"), Some("eu-west-1"), &eu_only, "us-east-1"),
            Some(outcome::RESIDENCY)
        );
        assert_eq!(
            admit(None, Some("eu-central-1"), &eu_only, "us-east-1"),
            Some(outcome::RESIDENCY)
        );
        assert_eq!(
            admit(
                Some("eu-central-1"),
                Some("eu-central-1"),
                &eu_only,
                "eu-west-1"
            ),
            None
        );
    }

    #[test]
    fn pinned_rows_stay_in_the_regions_of_their_pattern() {
        let eu = vec!["eu-*".to_string()];
        assert!(resident_in(&eu, Some("eu-west-1"), "eu-central-1"));
        assert!(!resident_in(&eu, Some("eu-west-1"), "us-east-1"));
        assert!(
            resident_in(&eu, Some("us-east-1"), "eu-west-1"),
            "unrestricted pin"
        );
        assert!(resident_in(&eu, None, "us-east-1"), "unpinned");
        let exact = vec!["eu-west-1".to_string()];
        assert!(!resident_in(&exact, Some("eu-west-1"), "eu-central-1"));
        assert!(resident_in(&exact, Some("eu-west-1"), "eu-west-1"));
    }

    #[test]
    fn writes_are_classified_by_source_home_and_local_region() {
        let (us, eu, ap) = ("us-east-1", "eu-west-1", "ap-south-1");
        assert_eq!(classify(us, None, eu), WriteClass::Shared);
        assert_eq!(classify(us, Some(us), eu), WriteClass::Owner);
        assert_eq!(classify(us, Some(eu), eu), WriteClass::CrossRegion);
        assert_eq!(classify(us, Some(ap), eu), WriteClass::ThirdRegion);
    }

    // Every expected value below comes from an independent implementation
    // (the xxHash C library through Python, and the jump hash written from
    // the paper in Python), never from this module.

    #[test]
    fn xxh64_matches_the_reference_implementation() {
        assert_eq!(key_hash(""), 0xEF46_DB37_51D8_E999);
        assert_eq!(key_hash("a"), 0xD24E_C4F1_A98C_6E5B);
        assert_eq!(key_hash("abc"), 0x44BC_2CF5_AD77_0999);
        assert_eq!(
            key_hash("Nobody inspects the spammish repetition"),
            0xFBCE_A83C_8A37_8BF1
        );
        // Over 32 bytes: exercises the four-lane main loop.
        assert_eq!(key_hash(&"x".repeat(100)), 0x92F0_DE5A_88A3_C094);
    }

    #[test]
    fn jump_hash_matches_the_published_and_reference_vectors() {
        // Vectors quoted with implementations of the paper.
        assert_eq!(jump_consistent_hash(1, 1), 0);
        assert_eq!(jump_consistent_hash(42, 57), 43);
        assert_eq!(jump_consistent_hash(0xDEAD_10CC, 1), 0);
        assert_eq!(jump_consistent_hash(0xDEAD_10CC, 666), 361);
        assert_eq!(jump_consistent_hash(256, 1024), 520);
        assert_eq!(jump_consistent_hash(0, 60), 0);
        assert_eq!(jump_consistent_hash(1, 60), 55);
        assert_eq!(jump_consistent_hash(2, 60), 46);
        assert_eq!(jump_consistent_hash(16_045_690_984_833_335_023, 255), 237);
        // (key, buckets 1, 2, 3, 5, 10, 100, 1000, 2^20, 2^31 - 1).
        let buckets = [1, 2, 3, 5, 10, 100, 1000, 1 << 20, (1 << 31) - 1];
        let table: [(u64, [u32; 9]); 8] = [
            (0x0, [0, 0, 0, 0, 0, 0, 0, 0, 0]),
            (0x1, [0, 0, 0, 0, 6, 55, 549, 985611, 262355607]),
            (0x2, [0, 0, 0, 3, 6, 62, 338, 152951, 736532115]),
            (0xdeadbeef, [0, 1, 2, 3, 5, 87, 285, 479362, 1452406526]),
            (
                0xef46db3751d8e999,
                [0, 1, 2, 2, 7, 40, 332, 912092, 730414282],
            ),
            (
                0xffffffffffffffff,
                [0, 1, 2, 2, 9, 92, 313, 589430, 699554662],
            ),
            (
                0x8000000000000000,
                [0, 1, 1, 4, 5, 84, 453, 802256, 1119800965],
            ),
            (123456789, [0, 0, 0, 0, 7, 34, 294, 561473, 1234790967]),
        ];
        for (key, expected) in table {
            for (n, want) in buckets.iter().zip(expected) {
                assert_eq!(
                    jump_consistent_hash(key, *n),
                    want,
                    "key {key:#x}, {n} buckets"
                );
            }
        }
    }

    #[test]
    fn home_region_indexes_the_ordered_list() {
        let regions = ["us-east-1", "eu-west-1", "ap-south-1"];
        assert_eq!(home_region("", &regions), "ap-south-1");
        assert_eq!(home_region("a", &regions), "eu-west-1");
        assert_eq!(home_region("0", &regions), "us-east-1");
        let owned: Vec<String> = regions.iter().map(|r| r.to_string()).collect();
        assert_eq!(home_region("a", &owned), "eu-west-1");
        assert_eq!(home_region("anything", &regions[..1]), "us-east-1");
    }

    #[test]
    #[should_panic(expected = "no regions")]
    fn an_empty_region_list_has_no_home() {
        let none: [&str; 0] = [];
        home_region("a", &none);
    }

    /// Splits one line of RFC 4180 CSV (quoted fields, `""` for a quote; no
    /// line breaks inside fields, which the vectors do not use).
    fn csv_fields(line: &str) -> Vec<String> {
        let mut fields = vec![String::new()];
        let mut quoted = false;
        let mut chars = line.chars().peekable();
        while let Some(c) = chars.next() {
            match (quoted, c) {
                (true, '"') if chars.peek() == Some(&'"') => {
                    chars.next();
                    fields.last_mut().unwrap().push('"');
                }
                (_, '"') => quoted = !quoted,
                (false, ',') => fields.push(String::new()),
                (_, c) => fields.last_mut().unwrap().push(c),
            }
        }
        assert!(!quoted, "unterminated quote in {line:?}");
        fields
    }

    #[test]
    fn every_row_of_the_route_vectors_matches() {
        let text = include_str!("../tests/vectors/route.csv");
        let mut lines = text.lines();
        assert_eq!(lines.next(), Some("key,xxh64,regions,home"));
        let mut rows = 0;
        for line in lines {
            let f = csv_fields(line);
            assert_eq!(f.len(), 4, "{line:?}");
            let (key, hash, regions, home) = (&f[0], &f[1], &f[2], &f[3]);
            let regions: Vec<&str> = regions.split(';').collect();
            assert_eq!(format!("{:016x}", key_hash(key)), *hash, "xxh64 of {key:?}");
            assert_eq!(home_region(key, &regions), home, "{key:?} over {regions:?}");
            rows += 1;
        }
        assert!(rows >= 150, "only {rows} rows");
    }

    #[test]
    fn three_regions_share_100k_keys_within_a_few_percent() {
        let mut counts = [0usize; 3];
        for i in 0..100_000 {
            counts[home_index(&format!("user-{i}"), 3)] += 1;
        }
        // The reference implementation counts [33480, 33549, 32971].
        assert_eq!(counts, [33480, 33549, 32971]);
        for c in counts {
            assert!(c.abs_diff(33_333) < 1_000, "{counts:?}");
        }
    }

    proptest! {
        #[test]
        fn appending_a_region_moves_keys_only_to_it(key in any::<String>(), n in 1usize..64) {
            let before = home_index(&key, n);
            let after = home_index(&key, n + 1);
            prop_assert!(before < n);
            prop_assert!(after == before || after == n, "{key:?}: {before} -> {after} of {n}");
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(32))]
        #[test]
        fn appending_a_region_moves_about_one_in_n_plus_one(prefix in "[a-z0-9]{0,8}", n in 1usize..16) {
            const KEYS: usize = 4_000;
            let moved = (0..KEYS)
                .filter(|i| {
                    let key = format!("{prefix}{i}");
                    home_index(&key, n) != home_index(&key, n + 1)
                })
                .count();
            let share = moved as f64 / KEYS as f64;
            let expected = 1.0 / (n + 1) as f64;
            // The standard deviation is at most 0.008: this is over 6 of them.
            prop_assert!((share - expected).abs() < 0.05, "{moved} of {KEYS} moved from {n} regions");
        }
    }
}
