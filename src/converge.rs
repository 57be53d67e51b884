//! Converge: the apply rules as pure functions — the specification of the
//! version guards that src/apply/write.rs writes in SQL and of the stamping
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
/// This is the guard of the upsert statement in src/apply/write.rs (`upsert`):
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
/// This is the delete statement in src/apply/write.rs (`delete`): the `gone` CTE
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
    use proptest::prelude::*;
    use std::collections::{BTreeMap, VecDeque};

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

    // ---- The simulation: three regions in a full mesh. ----

    /// Sorted bytewise, so ties between them are broken in this order.
    const REGIONS: [&str; 3] = ["ap-south-1", "eu-west-1", "us-east-1"];
    const AP: usize = 0;
    const EU: usize = 1;
    const US: usize = 2;
    const KEYS: u8 = 8;
    /// 2026-01-01T00:00:00Z: the physical clocks read around this.
    const EPOCH_MS: i64 = 1_767_225_600_000;

    type V = Version<'static>;

    /// One key in one region's database.
    #[derive(Clone, Debug, Default, PartialEq, Eq)]
    struct KeyState {
        /// The stored row: its value and version.
        row: Option<(u32, V)>,
        tombstone: Option<V>,
    }

    impl KeyState {
        fn row_version(&self) -> Option<&V> {
            self.row.as_ref().map(|(_, v)| v)
        }

        /// The newest version the region holds for the key, row or
        /// tombstone.
        fn newest(&self) -> Option<&V> {
            self.row_version().max(self.tombstone.as_ref())
        }
    }

    /// A change event as a region's Debezium writes it to its topic.
    #[derive(Clone, Debug)]
    enum Event {
        /// An insert or update: the after image's value and version.
        Upsert { value: u32, version: V },
        /// A delete: the before image's HLC (REPLICA IDENTITY FULL).
        Delete { before: Hlc },
    }

    /// A region's physical clock: off by `skew_ms`, running fast or slow by
    /// `drift_ppm`; each reading may jitter (and so step back) a little.
    #[derive(Clone, Copy, Debug, Default)]
    struct Clock {
        skew_ms: i64,
        drift_ppm: i64,
    }

    impl Clock {
        fn wall_ms(&self, true_ms: i64, jitter_ms: i64) -> i64 {
            EPOCH_MS + true_ms + self.skew_ms + true_ms * self.drift_ppm / 1_000_000 + jitter_ms
        }
    }

    #[derive(Clone, Debug)]
    enum Action {
        /// An insert or update (whichever applies) of `key` in `region`.
        Write { region: usize, key: u8, value: u32 },
        /// A delete of `key` in `region` (nothing if it has no row).
        Delete { region: usize, key: u8 },
        /// One delivery from a queue chosen by `pick`; `again` leaves the
        /// event queued, so it is delivered twice (a replay).
        Deliver { pick: usize, again: bool },
    }

    /// What a region's topic carries besides its own local changes.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    enum Relay {
        /// Nothing: each change travels once, from its region to the others.
        Off,
        /// The rows its worker upserted (Debezium captures the worker's
        /// writes too): the same versions again, echoes or duplicates.
        Upserts,
        /// Those and the deletes its worker applied, which the next worker
        /// would version `before.hlc + 1` from the relaying region — why the
        /// deployed worker skips relays (docs/CONVERGENCE.md).
        All,
    }

    #[derive(Clone, Copy, Debug)]
    struct Mesh {
        /// Per (source, destination, key) in publication order, as a Kafka
        /// partition keeps it and MirrorMaker 2 copies it; else any order.
        fifo: bool,
        relay: Relay,
    }

    struct Sim {
        mesh: Mesh,
        clocks: [Clock; 3],
        /// True time, milliseconds since EPOCH_MS.
        now_ms: i64,
        state: [BTreeMap<u8, KeyState>; 3],
        /// In flight, per (source, destination, key).
        queues: BTreeMap<(usize, usize, u8), VecDeque<Event>>,
        /// Every version a local change gave a key: Some(value) for a
        /// write, None for a delete.
        history: BTreeMap<u8, Vec<(V, Option<u32>)>>,
        /// The newest remote change each region applied to each key.
        applied_remote: BTreeMap<(usize, u8), V>,
        /// Local changes not ordered after what their region had seen.
        causality_violations: Vec<String>,
    }

    impl Sim {
        fn new(mesh: Mesh, clocks: [Clock; 3]) -> Sim {
            Sim {
                mesh,
                clocks,
                now_ms: 0,
                state: Default::default(),
                queues: BTreeMap::new(),
                history: BTreeMap::new(),
                applied_remote: BTreeMap::new(),
                causality_violations: Vec::new(),
            }
        }

        fn key(&self, region: usize, key: u8) -> KeyState {
            self.state[region].get(&key).cloned().unwrap_or_default()
        }

        /// Full mesh: a region's topic is mirrored to each of the others.
        fn publish(&mut self, source: usize, key: u8, event: Event) {
            for dest in (0..REGIONS.len()).filter(|&d| d != source) {
                self.queues
                    .entry((source, dest, key))
                    .or_default()
                    .push_back(event.clone());
            }
        }

        /// A local change must be ordered after everything its region holds
        /// or has applied for the key, whatever the clocks say.
        fn check_causality(&mut self, region: usize, key: u8, new: &V) {
            let s = self.key(region, key);
            let seen = [
                s.row_version(),
                s.tombstone.as_ref(),
                self.applied_remote.get(&(region, key)),
            ];
            for old in seen.into_iter().flatten() {
                if new <= old {
                    self.causality_violations.push(format!(
                        "{}: local change {new:?} of key {key} is not after {old:?}",
                        REGIONS[region]
                    ));
                }
            }
        }

        /// A local INSERT or UPDATE, stamped by `regionsync.stamp_hlc()`.
        fn write(&mut self, region: usize, key: u8, value: u32, jitter_ms: i64) -> V {
            let wall = self.clocks[region].wall_ms(self.now_ms, jitter_ms);
            let s = self.key(region, key);
            let hlc = stamp_hlc(
                s.row_version().map(|r| r.hlc),
                s.tombstone.as_ref().map(|t| t.hlc),
                wall,
            );
            let version = Version {
                hlc,
                origin_region: REGIONS[region],
            };
            self.check_causality(region, key, &version);
            self.state[region].entry(key).or_default().row = Some((value, version.clone()));
            self.history
                .entry(key)
                .or_default()
                .push((version.clone(), Some(value)));
            let event = Event::Upsert {
                value,
                version: version.clone(),
            };
            self.publish(region, key, event);
            version
        }

        /// A local DELETE; `regionsync.mark_deleted()` leaves the tombstone.
        fn delete(&mut self, region: usize, key: u8) -> Option<V> {
            let s = self.key(region, key);
            // DELETE of an absent key: no change, no event.
            let (_, old) = s.row?;
            let d = delete_version(old.hlc, REGIONS[region]);
            self.check_causality(region, key, &d);
            let s = self.state[region].get_mut(&key).unwrap();
            s.row = None;
            if delete_outcome(&d, None, s.tombstone.as_ref()).marks_tombstone {
                s.tombstone = Some(d.clone());
            }
            self.history.entry(key).or_default().push((d.clone(), None));
            self.publish(region, key, Event::Delete { before: old.hlc });
            Some(d)
        }

        /// The worker in `dest` applies one event from `source`'s topic.
        fn apply(&mut self, source: usize, dest: usize, key: u8, event: &Event) {
            let here = REGIONS[dest];
            let s = self.state[dest].entry(key).or_default();
            let (applied, relay) = match event {
                Event::Upsert { value, version } => {
                    if version.origin_region == here {
                        return; // an echo of this region's own change
                    }
                    if !upsert_wins(version, s.row_version(), s.tombstone.as_ref(), None) {
                        return;
                    }
                    s.row = Some((*value, version.clone()));
                    let relay = self.mesh.relay != Relay::Off;
                    (version.clone(), relay.then(|| event.clone()))
                }
                Event::Delete { before } => {
                    let d = delete_version(*before, REGIONS[source]);
                    let outcome = delete_outcome(&d, s.row_version(), s.tombstone.as_ref());
                    let removed = if outcome.removes_row {
                        s.row.take()
                    } else {
                        None
                    };
                    if outcome.marks_tombstone {
                        s.tombstone = Some(d.clone());
                    } else if removed.is_none() {
                        return;
                    }
                    // Only a removed row reaches this region's WAL.
                    let relay = removed
                        .filter(|_| self.mesh.relay == Relay::All)
                        .map(|(_, r)| Event::Delete { before: r.hlc });
                    (d, relay)
                }
            };
            let newest = self
                .applied_remote
                .entry((dest, key))
                .or_insert(applied.clone());
            if *newest < applied {
                *newest = applied;
            }
            if let Some(event) = relay {
                self.publish(dest, key, event);
            }
        }

        /// Delivers the next event from `source` to `dest` for `key`.
        fn deliver_next(&mut self, source: usize, dest: usize, key: u8) {
            let queue = self.queues.get_mut(&(source, dest, key));
            let event = queue
                .and_then(|q| q.pop_front())
                .expect("an event in flight");
            self.apply(source, dest, key, &event);
        }

        /// Delivers one event: from the queue `pick` chooses, its head
        /// (FIFO) or any of its events.
        fn deliver(&mut self, pick: usize, again: bool) {
            let busy: Vec<(usize, usize, u8)> = self
                .queues
                .iter()
                .filter(|(_, q)| !q.is_empty())
                .map(|(k, _)| *k)
                .collect();
            if busy.is_empty() {
                return;
            }
            let (source, dest, key) = busy[pick % busy.len()];
            let queue = self.queues.get_mut(&(source, dest, key)).unwrap();
            let at = if self.mesh.fifo {
                0
            } else {
                (pick / busy.len()) % queue.len()
            };
            let event = if again {
                queue[at].clone()
            } else {
                queue.remove(at).unwrap()
            };
            self.apply(source, dest, key, &event);
        }

        fn step(&mut self, action: &Action, advance_ms: i64, jitter_ms: i64) {
            self.now_ms += advance_ms;
            match *action {
                Action::Write { region, key, value } => {
                    self.write(region, key, value, jitter_ms);
                }
                Action::Delete { region, key } => {
                    self.delete(region, key);
                }
                Action::Deliver { pick, again } => self.deliver(pick, again),
            }
        }

        /// Delivers everything still in flight, in an order `seed` draws.
        fn drain(&mut self, mut seed: u64) {
            while self.queues.values().any(|q| !q.is_empty()) {
                // splitmix64
                seed = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
                let mut z = seed;
                z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
                z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
                self.deliver((z ^ (z >> 31)) as usize, false);
            }
        }

        /// Where the regions differ from each other, or from the newest
        /// version a local change gave the key (the row if a write, no row
        /// if a delete).
        fn divergence(&self) -> Option<String> {
            for (key, history) in &self.history {
                let states: Vec<KeyState> = (0..REGIONS.len()).map(|r| self.key(r, *key)).collect();
                let (newest, value) = history.iter().max_by(|a, b| a.0.cmp(&b.0)).unwrap();
                let row = value.map(|x| (x, newest.clone()));
                let agree = states
                    .iter()
                    .all(|s| s.row == row && s.newest() == Some(newest));
                if !agree {
                    return Some(format!(
                        "key {key}: expected row {row:?} (newest {newest:?}), regions hold {states:#?}"
                    ));
                }
            }
            None
        }
    }

    fn clock() -> impl Strategy<Value = Clock> {
        (
            prop_oneof![Just(0i64), -3i64..=3, -300_000i64..=300_000],
            -1_000i64..=1_000,
        )
            .prop_map(|(skew_ms, drift_ppm)| Clock { skew_ms, drift_ppm })
    }

    /// An action, the true time that passes before it (often none, so
    /// changes share milliseconds) and the jitter of its clock reading.
    fn step() -> impl Strategy<Value = (Action, i64, i64)> {
        let action = prop_oneof![
            3 => (0..3usize, 0..KEYS, 0..4u32)
                .prop_map(|(region, key, value)| Action::Write { region, key, value }),
            1 => (0..3usize, 0..KEYS).prop_map(|(region, key)| Action::Delete { region, key }),
            4 => (any::<usize>(), prop::bool::weighted(0.1))
                .prop_map(|(pick, again)| Action::Deliver { pick, again }),
        ];
        (action, 0i64..=5, -2i64..=2)
    }

    fn run(mesh: Mesh, clocks: [Clock; 3], steps: &[(Action, i64, i64)], seed: u64) -> Sim {
        let mut sim = Sim::new(mesh, clocks);
        for (action, advance_ms, jitter_ms) in steps {
            sim.step(action, *advance_ms, *jitter_ms);
        }
        sim.drain(seed);
        sim
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// Three regions with skewed, drifting clocks and a full mesh;
        /// delivery FIFO per (source, key) but interleaved at random across
        /// sources and keys and with local writes, some replayed: all end
        /// with the same rows, and each key as its newest change left it.
        #[test]
        fn three_regions_converge_in_any_delivery_order(
            clocks in [clock(), clock(), clock()],
            steps in prop::collection::vec(step(), 0..200),
            seed in any::<u64>(),
        ) {
            let mesh = Mesh { fifo: true, relay: Relay::Off };
            let sim = run(mesh, clocks, &steps, seed);
            if let Some(d) = sim.divergence() {
                prop_assert!(false, "{}", d);
            }
        }

        /// Rows converge without FIFO delivery too: the merge keeps the
        /// newest version, whatever order the versions come in.
        #[test]
        fn rows_converge_without_fifo_delivery(
            clocks in [clock(), clock(), clock()],
            steps in prop::collection::vec(step(), 0..200),
            seed in any::<u64>(),
        ) {
            let mesh = Mesh { fifo: false, relay: Relay::Off };
            let sim = run(mesh, clocks, &steps, seed);
            if let Some(d) = sim.divergence() {
                prop_assert!(false, "{}", d);
            }
        }

        /// Upserts a worker applied, captured again by its region's
        /// Debezium and mirrored on, carry their versions unchanged: echoes
        /// where they started, duplicates elsewhere. They change nothing.
        #[test]
        fn relayed_upserts_change_nothing(
            clocks in [clock(), clock(), clock()],
            steps in prop::collection::vec(step(), 0..200),
            seed in any::<u64>(),
        ) {
            let mesh = Mesh { fifo: true, relay: Relay::Upserts };
            let sim = run(mesh, clocks, &steps, seed);
            if let Some(d) = sim.divergence() {
                prop_assert!(false, "{}", d);
            }
        }

        /// Causality under skew: a local change is ordered after every
        /// change its region had applied to the key, even with its clock
        /// minutes behind the writer of that change.
        #[test]
        fn a_local_write_after_a_remote_change_is_ordered_after_it(
            clocks in [clock(), clock(), clock()],
            steps in prop::collection::vec(step(), 0..200),
            seed in any::<u64>(),
        ) {
            let mesh = Mesh { fifo: true, relay: Relay::Off };
            let sim = run(mesh, clocks, &steps, seed);
            prop_assert!(sim.causality_violations.is_empty(), "{:?}", sim.causality_violations);
        }
    }

    /// Three clocks as in docs/CONVERGENCE.md: us-east-1 right, eu-west-1
    /// 90 s behind, ap-south-1 4 min behind.
    fn worked_example_clocks() -> [Clock; 3] {
        let mut clocks = [Clock::default(); 3];
        clocks[EU].skew_ms = -90_000;
        clocks[AP].skew_ms = -240_000;
        clocks
    }

    fn row(value: u32, hlc: i64, origin: &'static str) -> Option<(u32, V)> {
        Some((value, v(hlc, origin)))
    }

    /// The worked example of docs/CONVERGENCE.md, step by step.
    #[test]
    fn the_worked_example_converges() {
        const K: u8 = 42;
        let h0 = EPOCH_MS << 16;
        assert_eq!(h0, 115_816_896_921_600_000);
        assert_eq!(h0, 0x019b_76da_a800_0000);
        let mesh = Mesh {
            fifo: true,
            relay: Relay::Off,
        };
        let mut sim = Sim::new(mesh, worked_example_clocks());
        // us-east-1 inserts the row (value 1); everyone has it.
        assert_eq!(sim.write(US, K, 1, 0), v(h0, "us-east-1"));
        sim.deliver_next(US, EU, K);
        sim.deliver_next(US, AP, K);
        // 20 ms later, concurrently: eu-west-1 and ap-south-1 update the
        // row, their clocks behind its HLC; us-east-1 deletes it.
        sim.now_ms = 20;
        let u_eu = sim.write(EU, K, 2, 0);
        let u_ap = sim.write(AP, K, 3, 0);
        let d_us = sim.delete(US, K).unwrap();
        assert_eq!(u_eu, v(h0 + 1, "eu-west-1"));
        assert_eq!(u_ap, v(h0 + 1, "ap-south-1"));
        assert_eq!(d_us, v(h0 + 1, "us-east-1"));
        // One HLC, three regions: the names decide, bytewise.
        assert!(u_ap < u_eu && u_eu < d_us);

        let gone = |tombstone: &V| KeyState {
            row: None,
            tombstone: Some(tombstone.clone()),
        };
        // us-east-1: ap-south-1's update, then eu-west-1's.
        sim.deliver_next(AP, US, K);
        assert_eq!(sim.key(US, K), gone(&d_us));
        sim.deliver_next(EU, US, K);
        assert_eq!(sim.key(US, K), gone(&d_us));
        // eu-west-1: the delete, then ap-south-1's update.
        sim.deliver_next(US, EU, K);
        assert_eq!(sim.key(EU, K), gone(&d_us));
        sim.deliver_next(AP, EU, K);
        assert_eq!(sim.key(EU, K), gone(&d_us));
        // ap-south-1: eu-west-1's update, then the delete.
        sim.deliver_next(EU, AP, K);
        assert_eq!(sim.key(AP, K).row, row(2, h0 + 1, "eu-west-1"));
        sim.deliver_next(US, AP, K);
        assert_eq!(sim.key(AP, K), gone(&d_us));
        assert_eq!(sim.divergence(), None);

        // ap-south-1, 4 min behind, inserts the key again: ordered after
        // the delete by the tombstone, not by its clock.
        sim.now_ms = 500;
        let wall = sim.clocks[AP].wall_ms(sim.now_ms, 0);
        assert_eq!(wall, EPOCH_MS - 239_500);
        let again = sim.write(AP, K, 4, 0);
        assert_eq!(again, v(h0 + 2, "ap-south-1"));
        // Stamped by its clock alone it would lose to the tombstone
        // everywhere else, and the regions would disagree for good.
        let by_clock = Version {
            hlc: Hlc::new(wall, 0),
            origin_region: "ap-south-1",
        };
        assert!(!upsert_wins(&by_clock, None, Some(&d_us), None));
        sim.deliver_next(AP, US, K);
        sim.deliver_next(AP, EU, K);
        for region in [AP, EU, US] {
            assert_eq!(sim.key(region, K).row, row(4, h0 + 2, "ap-south-1"));
        }
        assert_eq!(sim.divergence(), None);
        assert!(sim.causality_violations.is_empty());
    }

    /// Bytewise names give every database the same winner of an exact tie.
    /// A locale-dependent order need not: with names that differ only in
    /// case, a case-insensitive comparison finds them equal, neither
    /// replaces the other, and each region keeps its own row.
    #[test]
    fn ties_break_bytewise_not_by_a_locale() {
        let (upper, lower) = ("EU-WEST-1", "eu-west-1");
        let a = v(7, upper);
        let b = v(7, lower);
        type Guard<'g> = &'g dyn Fn(&Version<'_>, &Version<'_>) -> bool;
        // Region `upper` stored a, region `lower` b; each receives the other.
        let outcome = |newer: Guard| {
            let at_upper = if newer(&b, &a) { lower } else { upper };
            let at_lower = if newer(&a, &b) { upper } else { lower };
            (at_upper, at_lower)
        };
        let bytewise = |incoming: &Version<'_>, stored: &Version<'_>| {
            upsert_wins(incoming, Some(stored), None, None)
        };
        assert_eq!(outcome(&bytewise), (lower, lower));
        let case_insensitive = |incoming: &Version<'_>, stored: &Version<'_>| {
            let fold = |x: &Version<'_>| (x.hlc, x.origin_region.to_lowercase());
            fold(stored) < fold(incoming)
        };
        assert_eq!(outcome(&case_insensitive), (upper, lower), "diverged");
    }

    /// A tombstone collected before a late, older update arrives lets that
    /// update bring the row back in one region only: the grace period must
    /// outlast the replication lag.
    #[test]
    fn a_tombstone_collected_too_early_lets_a_late_update_resurrect_the_row() {
        const K: u8 = 1;
        let mesh = Mesh {
            fifo: true,
            relay: Relay::Off,
        };
        let mut sim = Sim::new(mesh, worked_example_clocks());
        sim.write(US, K, 1, 0);
        sim.deliver_next(US, EU, K);
        sim.deliver_next(US, AP, K);
        sim.now_ms = 20;
        sim.write(AP, K, 3, 0); // ap-south-1's update: its link is slow
        let d = sim.delete(US, K).unwrap();
        sim.deliver_next(US, EU, K);
        sim.deliver_next(US, AP, K);
        sim.deliver_next(AP, US, K); // refused by the tombstone
                                     // eu-west-1 collects its tombstone before ap-south-1's update comes.
        sim.state[EU].get_mut(&K).unwrap().tombstone = None;
        sim.deliver_next(AP, EU, K);
        assert_eq!(
            sim.key(EU, K).row,
            row(3, (EPOCH_MS << 16) + 1, "ap-south-1")
        );
        assert_eq!(sim.key(US, K).row, None);
        assert_eq!(sim.key(AP, K).row, None);
        assert_eq!(sim.key(US, K).tombstone, Some(d));
    }

    /// Why the worker skips relays (docs/CONVERGENCE.md, "Relays"):
    /// Debezium in a region also captures the deletes its worker applied,
    /// and a worker that applied such a relayed delete would give it a
    /// version of its own, one step after its before image, from the
    /// relaying region. Two regions suffice: here that version equals a
    /// later re-insert's and refuses it, and the regions disagree for good.
    /// The deployed pipeline marks the worker's sessions with a replication
    /// origin and skips relays (`Relay::Off` in the simulations).
    #[test]
    fn relayed_deletes_would_diverge() {
        const K: u8 = 3;
        let mesh = Mesh {
            fifo: true,
            relay: Relay::All,
        };
        let mut clocks = [Clock::default(); 3];
        clocks[EU].skew_ms = -250;
        let mut sim = Sim::new(mesh, clocks);
        let h = EPOCH_MS << 16;
        sim.write(US, K, 1, 0);
        sim.deliver_next(US, EU, K);
        // eu-west-1 updates (clock behind: h + 1), us-east-1 deletes
        // concurrently (h + 1 too, and "us-east-1" > "eu-west-1").
        let u = sim.write(EU, K, 2, 0);
        let d = sim.delete(US, K).unwrap();
        assert_eq!((u.hlc, d.hlc), (Hlc(h + 1), Hlc(h + 1)));
        assert!(d > u);
        sim.deliver_next(EU, US, K); // the insert, relayed back: an echo
        sim.deliver_next(EU, US, K); // the update: refused by the tombstone
        sim.deliver_next(US, EU, K); // removes eu-west-1's row...
                                     // ...which eu-west-1's Debezium publishes as a delete of h + 1.
                                     // eu-west-1 inserts the key again, stamped tombstone + 1 = h + 2.
        let again = sim.write(EU, K, 3, 0);
        assert_eq!(again, v(h + 2, "eu-west-1"));
        // us-east-1 versions the relayed delete h + 2 from eu-west-1: the
        // very version of the insert, which its tombstone then refuses.
        sim.deliver_next(EU, US, K);
        assert_eq!(sim.key(US, K).tombstone, Some(v(h + 2, "eu-west-1")));
        sim.deliver_next(EU, US, K);
        assert_eq!(sim.key(US, K).row, None);
        // Whatever else arrives, in whatever order, nothing repairs it.
        sim.drain(7);
        assert_eq!(sim.key(US, K).row, None);
        assert_eq!(sim.key(EU, K).row, row(3, h + 2, "eu-west-1"));
        assert!(sim.divergence().is_some());
    }
}

/// The failover model (DESIGN.md §3, "Failover homing"): region X fails
/// with some of its writes not yet mirrored (the RPO window), its rows are
/// re-homed in Y, Y's users keep writing X's rows, X returns and the
/// backlogs cross in any per-key FIFO interleaving, then X is failed back.
/// Each region classifies every change through the same re-homing windows
/// ([`crate::route::HomingOverrides`]), decides it with the worker's rule
/// ([`crate::conflict::decide`]) under each policy, and applies it under the
/// version guard.
#[cfg(test)]
mod failover_tests {
    use super::*;
    use crate::config::Policy;
    use crate::conflict::{decide, Case};
    use crate::route::{classify, HomingOverrides, HomingWindow};
    use proptest::prelude::*;
    use std::collections::{BTreeMap, BTreeSet, VecDeque};

    const X: &str = "us-east-1";
    const Y: &str = "eu-west-1";

    type V = (i64, &'static str);

    fn ver(v: &V) -> Version<'static> {
        Version {
            hlc: Hlc(v.0),
            origin_region: v.1,
        }
    }

    /// One committed write of a key.
    #[derive(Clone, Debug)]
    struct Write {
        key: u8,
        value: u32,
        version: V,
        replaced: Option<V>,
        committed_ms: i64,
    }

    #[derive(Default)]
    struct Region {
        rows: BTreeMap<u8, (u32, V)>,
        /// (key, incoming version) of every conflict recorded here.
        recorded: BTreeSet<(u8, V)>,
    }

    impl Region {
        fn local_write(&mut self, name: &'static str, key: u8, value: u32, wall_ms: i64) -> Write {
            let old = self.rows.get(&key).map(|r| r.1);
            let hlc = stamp_hlc(old.map(|o| Hlc(o.0)), None, wall_ms).0;
            self.rows.insert(key, (value, (hlc, name)));
            Write {
                key,
                value,
                version: (hlc, name),
                replaced: old,
                committed_ms: wall_ms,
            }
        }

        /// The worker of `local` applying `w` from `source`; panics if the
        /// policy holds it (the homing must make that impossible here).
        fn apply(
            &mut self,
            local: &'static str,
            source: &'static str,
            w: &Write,
            policy: Policy,
            homing: &HomingOverrides,
        ) {
            let stored = self.rows.get(&w.key).map(|r| r.1);
            // Every key is naturally homed in X.
            let home = homing.acting_home(X, w.committed_ms);
            let stored_version = stored.as_ref().map(ver);
            let d = decide(&Case {
                class: classify(source, Some(home), local),
                policy,
                source,
                incoming: ver(&w.version),
                is_delete: false,
                snapshot: false,
                replaced: w.replaced.as_ref().map(ver),
                row: stored_version.clone(),
                tombstone: None,
            });
            assert!(
                d.apply,
                "{local} held {w:?} from {source} under {policy:?} (home {home})"
            );
            if d.record.is_some() {
                self.recorded.insert((w.key, w.version));
            }
            if upsert_wins(&ver(&w.version), stored_version.as_ref(), None, None) {
                self.rows.insert(w.key, (w.value, w.version));
            }
        }
    }

    fn policy() -> impl Strategy<Value = Policy> {
        prop_oneof![
            Just(Policy::Lww),
            Just(Policy::Reject),
            Just(Policy::Manual)
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]
        #[test]
        fn failover_and_failback_lose_no_outage_write_and_record_every_rpo_race(
            policy in policy(),
            before in proptest::collection::vec((0u8..4, 0i64..50), 1..30),
            mirrored_share in 0usize..=100,
            detection_ms in 200i64..3_000,
            outage in proptest::collection::vec((0u8..4, 0i64..200), 0..30),
            skew_x in -100i64..100,
            skew_y in -100i64..100,
            interleave in proptest::collection::vec(any::<bool>(), 0..120),
            after in proptest::collection::vec((0u8..4, 0i64..50), 0..10),
        ) {
            let (mut x, mut y) = (Region::default(), Region::default());
            let mut value = 0u32;
            let mut next = || { value += 1; value };
            let no_homing = HomingOverrides::default();
            // Before the failure: X writes, a prefix of its stream reaches Y.
            let mut t = 10_000;
            let mut x_stream = VecDeque::new();
            for (key, dt) in before {
                t += dt + 1;
                x_stream.push_back(x.local_write(X, key, next(), t + skew_x));
            }
            let mirrored = x_stream.len() * mirrored_share / 100;
            for _ in 0..mirrored {
                let w = x_stream.pop_front().unwrap();
                y.apply(Y, X, &w, policy, &no_homing);
            }
            let rpo: Vec<Write> = x_stream.iter().cloned().collect();
            // X fails at t; the operator re-homes X's rows in Y.
            let from_ms = t + detection_ms;
            let mut homing = HomingOverrides { windows: vec![HomingWindow {
                region: X.into(), acting_home: Y.into(), from_ms, until_ms: None, epoch: 1,
            }] };
            // Y's users write X's rows, from when `route --current` sends
            // them there (from_ms + max_clock_skew, more than the skews
            // here); every write is acknowledged.
            let mut t = from_ms + 200;
            let mut y_stream = VecDeque::new();
            for (key, dt) in outage {
                t += dt + 1;
                y_stream.push_back(y.local_write(Y, key, next(), t + skew_y));
            }
            let acknowledged: Vec<Write> = y_stream.iter().cloned().collect();
            // X returns: both backlogs cross, interleaved.
            let mut picks = interleave.into_iter();
            while !x_stream.is_empty() || !y_stream.is_empty() {
                let from_x = match (x_stream.is_empty(), y_stream.is_empty()) {
                    (false, true) => true,
                    (true, false) => false,
                    _ => picks.next().unwrap_or(true),
                };
                if from_x {
                    let w = x_stream.pop_front().unwrap();
                    y.apply(Y, X, &w, policy, &homing);
                } else {
                    let w = y_stream.pop_front().unwrap();
                    x.apply(X, Y, &w, policy, &homing);
                }
            }
            // Failback: X's users write at X again.
            let until_ms = t + 1_000;
            homing.windows[0].until_ms = Some(until_ms);
            homing.windows[0].epoch = 2;
            let mut t = until_ms + 200;
            let mut later = Vec::new();
            for (key, dt) in after {
                t += dt + 1;
                let w = x.local_write(X, key, next(), t + skew_x);
                y.apply(Y, X, &w, policy, &homing);
                later.push(w);
            }
            // Both regions hold the same rows.
            prop_assert_eq!(&x.rows, &y.rows);
            // No outage write is overwritten by anything written before it:
            // the final version of each key is at least its newest
            // acknowledged outage write.
            for w in &acknowledged {
                let (_, final_version) = x.rows[&w.key];
                prop_assert!(ver(&final_version) >= ver(&w.version),
                    "outage write {:?} lost to {:?}", w, final_version);
            }
            // Every RPO change that is not the final version raced with an
            // outage write and is recorded as a conflict in Y, or it was
            // superseded by a later write of X itself.
            for r in &rpo {
                let (_, final_version) = x.rows[&r.key];
                let superseded_by_x = rpo.iter().chain(&later)
                    .any(|o| o.key == r.key && ver(&o.version) > ver(&r.version));
                if final_version != r.version && !superseded_by_x {
                    let raced = acknowledged.iter().any(|w| w.key == r.key);
                    prop_assert!(raced, "RPO change {:?} vanished without a race", r);
                    prop_assert!(y.recorded.contains(&(r.key, r.version))
                        || x.recorded.iter().any(|(k, _)| *k == r.key),
                        "RPO change {:?} lost to an outage write without a conflict record", r);
                }
            }
        }
    }

    /// Without failover homing, `reject` in X holds Y's outage writes when
    /// X returns: what the re-homing prevents.
    #[test]
    fn without_the_window_the_home_policy_holds_outage_writes() {
        let mut y = Region::default();
        let w = y.local_write(Y, 1, 7, 50_000);
        let mut x = Region::default();
        x.rows.insert(1, (3, (Hlc::new(40_000, 0).0, X)));
        let stored = x.rows[&1].1;
        let d = decide(&Case {
            class: classify(Y, Some(X), X),
            policy: Policy::Reject,
            source: Y,
            incoming: ver(&w.version),
            is_delete: false,
            snapshot: false,
            replaced: None,
            row: Some(ver(&stored)),
            tombstone: None,
        });
        assert!(!d.apply);
    }
}
