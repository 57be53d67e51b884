//! Messages read but not yet decoded: a rebuild decodes the newest message
//! of each key, not every message.
//!
//! A rebuild replays every version of every row and writes only the newest
//! of each key; in the bench topic four changes in five are replaced by a
//! later one of their key. Decoding, routing and preparing a change is
//! most of a rebuild's CPU, so a replayed partition's keyed messages are
//! held here as bytes, and before the chunk is written only the newest
//! message of each key (its Kafka key bytes) in each partition is planned
//! ([`Deferred::newest`]).
//!
//! Why that is what the worker would leave: one partition of a change topic
//! carries one source database's row states in commit order, and the
//! source's trigger only moves a row's version forward
//! (`regionsync.stamp_hlc`: an update takes at least the old hlc + 1, a
//! re-insert at least its tombstone's). So under the guard the newest
//! message of a key leaves the row as the whole run of them would — when
//! it plans to a whole row or a delete. When it does not (refused, skipped
//! by routing, unsent TOAST columns to be taken from an older version, a
//! fault that holds the partition), every held message of the key in the
//! partition is planned, as the worker plans them ([`Deferred::all_of`]).
//!
//! What differs: a bad change replaced by a later valid change of its key
//! in the same partition is not dead-lettered again by a rebuild (the
//! worker dead-lettered it when it read it). Messages without a key
//! (truncates) or without a payload (tombstones, a delete's second
//! message), and every message of a table with CRDT counters (which merges
//! versions rather than replacing them), are not held: they are planned as
//! read.
use rdkafka::message::{Message, OwnedHeaders, Timestamp};
use rustc_hash::FxHashMap;

/// No earlier message of the same (topic, partition, key hash).
const NONE: u32 = u32::MAX;

/// Bytes of a block of held messages: allocated whole, never grown, so
/// holding does not copy what is held (as one growing buffer would, with
/// up to twice its size allocated).
const BLOCK: usize = 4 << 20;

/// One held message: where it came from, and where its bytes are.
struct Held {
    topic: u32,
    partition: i32,
    offset: i64,
    timestamp: Timestamp,
    /// Its key, then its payload, in [`Deferred::blocks`].
    block: u32,
    start: u32,
    key_len: u32,
    payload_len: u32,
    /// The previous held message of its (topic, partition, key hash).
    prev: u32,
}

/// Keyed messages held since the chunk began, in read order.
#[derive(Default)]
pub struct Deferred {
    blocks: Vec<Vec<u8>>,
    held: Vec<Held>,
    topics: Vec<String>,
    /// (topic, partition, key hash) → its newest held message.
    newest: FxHashMap<(u32, i32, u64), u32>,
    /// Estimated memory held: the bytes and each message's bookkeeping.
    pub bytes: usize,
}

/// A held message, read as a Kafka message (the planner's input).
#[derive(Clone, Copy)]
pub struct HeldMessage<'d> {
    store: &'d Deferred,
    index: u32,
}

impl<'d> HeldMessage<'d> {
    fn held(&self) -> &'d Held {
        &self.store.held[self.index as usize]
    }

    /// Its key and payload, one after the other.
    fn bytes(&self) -> &'d [u8] {
        let h = self.held();
        let from = h.start as usize;
        &self.store.blocks[h.block as usize][from..from + (h.key_len + h.payload_len) as usize]
    }

    fn key_bytes(&self) -> &'d [u8] {
        &self.bytes()[..self.held().key_len as usize]
    }
}

impl Message for HeldMessage<'_> {
    type Headers = OwnedHeaders;

    fn key(&self) -> Option<&[u8]> {
        Some(self.key_bytes())
    }

    fn payload(&self) -> Option<&[u8]> {
        Some(&self.bytes()[self.held().key_len as usize..])
    }

    unsafe fn payload_mut(&mut self) -> Option<&mut [u8]> {
        None
    }

    fn topic(&self) -> &str {
        &self.store.topics[self.held().topic as usize]
    }

    fn partition(&self) -> i32 {
        self.held().partition
    }

    fn offset(&self) -> i64 {
        self.held().offset
    }

    fn timestamp(&self) -> Timestamp {
        self.held().timestamp
    }

    fn headers(&self) -> Option<&OwnedHeaders> {
        None
    }
}

/// A partition's held messages to plan, in offset order.
pub type PartitionRun<'d> = ((&'d str, i32), Vec<HeldMessage<'d>>);

impl Deferred {
    /// Holds `m` if it has a key and a payload; `false` (not held) for a
    /// message without a key, to be planned as read, or a tombstone.
    pub fn hold<M: Message>(&mut self, m: &M) -> bool {
        let (Some(key), Some(payload)) = (m.key(), m.payload()) else {
            return false;
        };
        let (Ok(key_len), Ok(payload_len)) =
            (u32::try_from(key.len()), u32::try_from(payload.len()))
        else {
            return false;
        };
        let topic = match self.topics.iter().position(|t| t == m.topic()) {
            Some(i) => i as u32,
            None => {
                self.topics.push(m.topic().to_owned());
                (self.topics.len() - 1) as u32
            }
        };
        // A message shares a block only within its first BLOCK bytes (a
        // larger one has a block of its own): `start` fits in u32.
        let need = key.len() + payload.len();
        if self
            .blocks
            .last()
            .is_none_or(|b| b.len() + need > b.capacity().min(BLOCK))
        {
            self.blocks.push(Vec::with_capacity(need.max(BLOCK)));
            self.bytes += need.max(BLOCK);
        }
        let block = self.blocks.len() - 1;
        let arena = &mut self.blocks[block];
        let start = arena.len() as u32;
        arena.extend_from_slice(key);
        arena.extend_from_slice(payload);
        let index = self.held.len() as u32;
        let slot = self
            .newest
            .entry((topic, m.partition(), super::bulk::key_hash(Some(key))))
            .or_insert(NONE);
        let prev = std::mem::replace(slot, index);
        self.held.push(Held {
            topic,
            partition: m.partition(),
            offset: m.offset(),
            timestamp: m.timestamp(),
            block: block as u32,
            start,
            key_len,
            payload_len,
            prev,
        });
        self.bytes += std::mem::size_of::<Held>();
        if prev == NONE {
            self.bytes += std::mem::size_of::<((u32, i32, u64), u32)>() + 8;
        }
        true
    }

    /// Messages held.
    pub fn len(&self) -> usize {
        self.held.len()
    }

    pub fn is_empty(&self) -> bool {
        self.held.is_empty()
    }

    /// Distinct (topic, partition, key hash) held: about the keys.
    pub fn keys(&self) -> usize {
        self.newest.len()
    }

    fn at(&self, index: u32) -> HeldMessage<'_> {
        HeldMessage { store: self, index }
    }

    /// The messages of the run of `head` (newest first) whose key is `key`.
    fn run_of<'d>(&'d self, head: u32, key: &'d [u8]) -> impl Iterator<Item = HeldMessage<'d>> {
        let mut i = head;
        std::iter::from_fn(move || {
            while i != NONE {
                let m = self.at(i);
                i = m.held().prev;
                if m.key() == Some(key) {
                    return Some(m);
                }
            }
            None
        })
    }

    /// The newest held message of each key, per partition, in offset order.
    /// Keys are told apart by their bytes (two keys of one hash are both
    /// here).
    pub fn newest(&self) -> Vec<PartitionRun<'_>> {
        let mut out: FxHashMap<(u32, i32), Vec<HeldMessage<'_>>> = FxHashMap::default();
        for (&(topic, partition, _), &head) in &self.newest {
            let mut i = head;
            let mut seen: Vec<&[u8]> = Vec::new();
            let run = out.entry((topic, partition)).or_default();
            while i != NONE {
                let m = self.at(i);
                let key = m.key_bytes();
                if !seen.contains(&key) {
                    seen.push(key);
                    run.push(m);
                }
                i = m.held().prev;
            }
        }
        self.sorted(out)
    }

    /// Every held message of each of `messages`' keys, per partition, in
    /// offset order.
    pub fn all_of<'d>(&'d self, messages: &[HeldMessage<'d>]) -> Vec<PartitionRun<'d>> {
        let mut out: FxHashMap<(u32, i32), Vec<HeldMessage<'d>>> = FxHashMap::default();
        for m in messages {
            let h = m.held();
            let key = m.key_bytes();
            let head = self.newest[&(h.topic, h.partition, super::bulk::key_hash(Some(key)))];
            out.entry((h.topic, h.partition))
                .or_default()
                .extend(self.run_of(head, key));
        }
        self.sorted(out)
    }

    fn sorted<'d>(
        &'d self,
        runs: FxHashMap<(u32, i32), Vec<HeldMessage<'d>>>,
    ) -> Vec<PartitionRun<'d>> {
        let mut out: Vec<PartitionRun<'d>> = runs
            .into_iter()
            .map(|((topic, partition), mut run)| {
                run.sort_by_key(|m| m.offset());
                run.dedup_by_key(|m| m.offset());
                ((self.topics[topic as usize].as_str(), partition), run)
            })
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rdkafka::message::OwnedMessage;

    fn msg(
        topic: &str,
        partition: i32,
        offset: i64,
        key: Option<&str>,
        payload: Option<&str>,
    ) -> OwnedMessage {
        OwnedMessage::new(
            payload.map(|p| p.as_bytes().to_vec()),
            key.map(|k| k.as_bytes().to_vec()),
            topic.to_owned(),
            Timestamp::CreateTime(offset),
            partition,
            offset,
            None,
        )
    }

    fn offsets(runs: &[PartitionRun<'_>]) -> Vec<(String, i32, Vec<i64>)> {
        runs.iter()
            .map(|((t, p), run)| (t.to_string(), *p, run.iter().map(|m| m.offset()).collect()))
            .collect()
    }

    #[test]
    fn the_newest_message_of_each_key_per_partition_is_planned() {
        let mut d = Deferred::default();
        for m in [
            msg("a", 0, 1, Some("k1"), Some("v1")),
            msg("a", 0, 2, Some("k2"), Some("v1")),
            msg("a", 0, 3, Some("k1"), Some("v2")),
            msg("a", 1, 4, Some("k1"), Some("v1")),
            msg("b", 0, 5, Some("k1"), Some("v1")),
            msg("a", 0, 6, Some("k1"), Some("v3")),
        ] {
            assert!(d.hold(&m));
        }
        assert_eq!((d.len(), d.keys()), (6, 4));
        let newest = d.newest();
        assert_eq!(
            offsets(&newest),
            vec![
                ("a".into(), 0, vec![2, 6]),
                ("a".into(), 1, vec![4]),
                ("b".into(), 0, vec![5]),
            ]
        );
        let six = newest[0].1[1];
        assert_eq!(
            (six.key(), six.payload(), six.topic()),
            (Some(&b"k1"[..]), Some(&b"v3"[..]), "a")
        );
        assert_eq!(six.timestamp(), Timestamp::CreateTime(6));
        // Every message of k1 in a/0, oldest first; not k2's, not a/1's.
        assert_eq!(
            offsets(&d.all_of(&[six])),
            vec![("a".into(), 0, vec![1, 3, 6])]
        );
    }

    #[test]
    fn a_message_without_a_key_or_a_tombstone_is_not_held() {
        let mut d = Deferred::default();
        assert!(!d.hold(&msg("a", 0, 1, None, Some("truncate"))));
        assert!(!d.hold(&msg("a", 0, 2, Some("k1"), None)));
        assert!(d.is_empty());
        assert_eq!(d.bytes, 0);
    }

    #[test]
    fn keys_of_one_hash_are_told_apart_by_their_bytes() {
        let mut d = Deferred::default();
        // Two keys forced into one run, as a hash collision would put them.
        for m in [
            msg("a", 0, 1, Some("k1"), Some("v1")),
            msg("a", 0, 2, Some("k2"), Some("v1")),
            msg("a", 0, 3, Some("k1"), Some("v2")),
        ] {
            assert!(d.hold(&m));
        }
        // Both keys' runs made one, newest first: 3 → 2 → 1.
        for head in d.newest.values_mut() {
            *head = 2;
        }
        d.held[2].prev = 1;
        d.held[1].prev = 0;
        d.held[0].prev = NONE;
        assert_eq!(offsets(&d.newest()), vec![("a".into(), 0, vec![2, 3])]);
        let k1 = d.at(2);
        assert_eq!(offsets(&d.all_of(&[k1])), vec![("a".into(), 0, vec![1, 3])]);
    }

    #[test]
    fn held_bytes_count_whole_blocks_and_a_large_message_gets_its_own() {
        let mut d = Deferred::default();
        d.hold(&msg("a", 0, 1, Some("k1"), Some("0123456789")));
        let one = d.bytes;
        assert!(one >= BLOCK);
        d.hold(&msg("a", 0, 2, Some("k1"), Some("0123456789")));
        assert!(
            d.bytes - one < 100,
            "a message in the same block adds its bookkeeping only"
        );
        let large = "x".repeat(BLOCK + 1);
        d.hold(&msg("a", 0, 3, Some("k2"), Some(&large)));
        d.hold(&msg("a", 0, 4, Some("k3"), Some("after")));
        assert_eq!(d.blocks.len(), 3, "the large message's block is its own");
        assert!(d.bytes >= 2 * BLOCK + large.len());
        let newest = d.newest();
        let payloads: Vec<usize> = newest[0]
            .1
            .iter()
            .map(|m| m.payload().map_or(0, |p| p.len()))
            .collect();
        assert_eq!(payloads, vec![10, BLOCK + 1, 5]);
        assert_eq!(newest[0].1[1].key(), Some(&b"k2"[..]));
    }
}
