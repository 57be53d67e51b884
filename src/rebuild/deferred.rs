//! Messages read but not yet decoded: a rebuild decodes the newest message
//! of each key, not every message.
//!
//! A rebuild replays every version of every row and writes only the newest
//! of each key; in the bench topic nine changes in ten are replaced by a
//! later one of their key. Decoding, routing and preparing a change is
//! most of a rebuild's CPU, so of a replayed partition's keyed messages
//! only the newest of each key (its Kafka key bytes) is held, as bytes,
//! with where the key's run in the chunk began; before the chunk is
//! written these are planned ([`Deferred::newest`]).
//!
//! Why that is what the worker would leave: one partition of a change topic
//! carries one source database's row states in commit order, and the
//! source's trigger only moves a row's version forward
//! (`regionsync.stamp_hlc`: an update takes at least the old hlc + 1, a
//! re-insert at least its tombstone's). So under the guard the newest
//! message of a key leaves the row as the whole run of them would — when
//! it plans to a whole row or a delete. A newest that is a relay or an
//! echo (skipped: a change another region made) needs nothing older
//! either: its original, at least as new as every earlier state here, is
//! in the topic of the region that made it, which the rebuild replays too.
//! Otherwise (refused, not resident here, unsent TOAST columns to be taken
//! from an older version, a fault that holds the partition), the key's
//! messages in the chunk are read again from Kafka ([`Deferred::ranges_of`])
//! and all planned, as the worker plans them.
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

/// A key's newest message in the chunk, and where its run began.
struct Newest {
    offset: i64,
    timestamp: Timestamp,
    payload: Vec<u8>,
    /// The offset of the key's first message in the chunk.
    first: i64,
}

/// One partition's held keys.
struct Part {
    topic: u32,
    partition: i32,
    keys: FxHashMap<Box<[u8]>, Newest>,
}

/// What a held key costs besides its key and payload bytes: its map slot,
/// the two allocations' headers.
const KEY_OVERHEAD: usize =
    std::mem::size_of::<(Box<[u8]>, Newest)>() + 2 * std::mem::size_of::<usize>() + 32;

/// The newest keyed message of each key, per partition, since the chunk
/// began.
#[derive(Default)]
pub struct Deferred {
    topics: Vec<String>,
    parts: Vec<Part>,
    /// Messages held (replaced ones included).
    messages: usize,
    /// Estimated memory held.
    pub bytes: usize,
}

/// A held message, read as a Kafka message (the planner's input).
#[derive(Clone, Copy)]
pub struct HeldMessage<'d> {
    topic: &'d str,
    partition: i32,
    key: &'d [u8],
    newest: &'d Newest,
}

impl Message for HeldMessage<'_> {
    type Headers = OwnedHeaders;

    fn key(&self) -> Option<&[u8]> {
        Some(self.key)
    }

    fn payload(&self) -> Option<&[u8]> {
        Some(&self.newest.payload)
    }

    unsafe fn payload_mut(&mut self) -> Option<&mut [u8]> {
        None
    }

    fn topic(&self) -> &str {
        self.topic
    }

    fn partition(&self) -> i32 {
        self.partition
    }

    fn offset(&self) -> i64 {
        self.newest.offset
    }

    fn timestamp(&self) -> Timestamp {
        self.newest.timestamp
    }

    fn headers(&self) -> Option<&OwnedHeaders> {
        None
    }
}

/// A partition's held messages to plan, in offset order.
pub type PartitionRun<'d> = ((&'d str, i32), Vec<HeldMessage<'d>>);

/// What to read again of one partition: from `from` up to `to` (both
/// included), the messages of `keys`, each within its (first, newest)
/// offsets.
pub struct Range<'d> {
    pub topic: &'d str,
    pub partition: i32,
    pub from: i64,
    pub to: i64,
    pub keys: FxHashMap<&'d [u8], (i64, i64)>,
}

impl Range<'_> {
    /// Whether a message read again is one of the keys' run.
    pub fn wants(&self, offset: i64, key: Option<&[u8]>, payload: Option<&[u8]>) -> bool {
        let (Some(key), Some(_)) = (key, payload) else {
            return false;
        };
        self.keys
            .get(key)
            .is_some_and(|(first, newest)| (*first..=*newest).contains(&offset))
    }
}

impl Deferred {
    /// Holds `m` (replacing its key's older message) if it has a key and a
    /// payload; `false` (not held) for a message without a key, to be
    /// planned as read, or a tombstone.
    pub fn hold<M: Message>(&mut self, m: &M) -> bool {
        let (Some(key), Some(payload)) = (m.key(), m.payload()) else {
            return false;
        };
        let i = match self.parts.iter().rposition(|p| {
            p.partition == m.partition() && self.topics[p.topic as usize] == m.topic()
        }) {
            Some(i) => i,
            None => {
                let topic = match self.topics.iter().position(|t| t == m.topic()) {
                    Some(t) => t,
                    None => {
                        self.topics.push(m.topic().to_owned());
                        self.topics.len() - 1
                    }
                };
                self.parts.push(Part {
                    topic: topic as u32,
                    partition: m.partition(),
                    keys: FxHashMap::default(),
                });
                self.parts.len() - 1
            }
        };
        let keys = &mut self.parts[i].keys;
        match keys.get_mut(key) {
            Some(n) => {
                // The older message's bytes are replaced in place (its
                // buffer reused): nothing of it is needed unless the newest
                // does not plan whole, and then it is read again.
                self.bytes = self.bytes + payload.len() - n.payload.len();
                n.payload.clear();
                n.payload.extend_from_slice(payload);
                n.offset = m.offset();
                n.timestamp = m.timestamp();
            }
            None => {
                self.bytes += KEY_OVERHEAD + key.len() + payload.len();
                keys.insert(
                    key.into(),
                    Newest {
                        offset: m.offset(),
                        timestamp: m.timestamp(),
                        payload: payload.to_vec(),
                        first: m.offset(),
                    },
                );
            }
        }
        self.messages += 1;
        true
    }

    /// Messages held, replaced ones included.
    pub fn len(&self) -> usize {
        self.messages
    }

    pub fn is_empty(&self) -> bool {
        self.messages == 0
    }

    /// Keys held (per partition).
    pub fn keys(&self) -> usize {
        self.parts.iter().map(|p| p.keys.len()).sum()
    }

    /// The newest held message of each key, per partition, in offset order.
    pub fn newest(&self) -> Vec<PartitionRun<'_>> {
        let mut out: Vec<PartitionRun<'_>> = self
            .parts
            .iter()
            .map(|p| {
                let topic = self.topics[p.topic as usize].as_str();
                let mut run: Vec<HeldMessage<'_>> = p
                    .keys
                    .iter()
                    .map(|(key, newest)| HeldMessage {
                        topic,
                        partition: p.partition,
                        key,
                        newest,
                    })
                    .collect();
                run.sort_by_key(|m| m.newest.offset);
                ((topic, p.partition), run)
            })
            .filter(|(_, run)| !run.is_empty())
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    /// What to read again for `messages`' keys: per partition, the offsets
    /// from the earliest of their runs' first messages to the latest of
    /// their newest.
    pub fn ranges_of<'d>(&self, messages: &[HeldMessage<'d>]) -> Vec<Range<'d>> {
        let mut out: Vec<Range<'d>> = Vec::new();
        for m in messages {
            let (first, newest) = (m.newest.first, m.newest.offset);
            let i = match out
                .iter()
                .position(|r| r.partition == m.partition && r.topic == m.topic)
            {
                Some(i) => i,
                None => {
                    out.push(Range {
                        topic: m.topic,
                        partition: m.partition,
                        from: first,
                        to: newest,
                        keys: FxHashMap::default(),
                    });
                    out.len() - 1
                }
            };
            let r = &mut out[i];
            r.from = r.from.min(first);
            r.to = r.to.max(newest);
            r.keys.insert(m.key, (first, newest));
        }
        out.sort_by(|a, b| (a.topic, a.partition).cmp(&(b.topic, b.partition)));
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

    fn held(d: &mut Deferred, messages: &[OwnedMessage]) {
        for m in messages {
            assert!(d.hold(m), "{} held", m.offset());
        }
    }

    #[test]
    fn the_newest_message_of_each_key_per_partition_is_planned() {
        let mut d = Deferred::default();
        held(
            &mut d,
            &[
                msg("a", 0, 1, Some("k1"), Some("v1")),
                msg("a", 0, 2, Some("k2"), Some("v1")),
                msg("a", 0, 3, Some("k1"), Some("v2")),
                msg("a", 1, 4, Some("k1"), Some("v1")),
                msg("b", 0, 5, Some("k1"), Some("v1")),
                msg("a", 0, 6, Some("k1"), Some("v3 is longer")),
            ],
        );
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
            (six.key(), six.payload(), six.topic(), six.partition()),
            (Some(&b"k1"[..]), Some(&b"v3 is longer"[..]), "a", 0)
        );
        assert_eq!(six.timestamp(), Timestamp::CreateTime(6));
    }

    #[test]
    fn a_key_read_again_is_read_from_its_first_message_to_its_newest() {
        let mut d = Deferred::default();
        held(
            &mut d,
            &[
                msg("a", 0, 10, Some("k1"), Some("v1")),
                msg("a", 0, 11, Some("k2"), Some("v1")),
                msg("a", 0, 12, Some("k1"), Some("v2")),
                msg("a", 0, 13, Some("k3"), Some("v1")),
                msg("a", 0, 14, Some("k3"), Some("v2")),
                msg("a", 1, 20, Some("k1"), Some("v1")),
            ],
        );
        let newest = d.newest();
        let k1_and_k3: Vec<HeldMessage<'_>> = newest[0]
            .1
            .iter()
            .copied()
            .filter(|m| m.key() != Some(&b"k2"[..]))
            .collect();
        let ranges = d.ranges_of(&k1_and_k3);
        assert_eq!(ranges.len(), 1, "one partition");
        let r = &ranges[0];
        assert_eq!((r.topic, r.partition, r.from, r.to), ("a", 0, 10, 14));
        let wanted: Vec<i64> = [
            (10, "k1"),
            (11, "k2"),
            (12, "k1"),
            (13, "k3"),
            (14, "k3"),
            (15, "k1"),
        ]
        .into_iter()
        .filter(|(o, k)| r.wants(*o, Some(k.as_bytes()), Some(b"v")))
        .map(|(o, _)| o)
        .collect();
        assert_eq!(
            wanted,
            vec![10, 12, 13, 14],
            "k2 and what came after k1's newest are not"
        );
        assert!(
            !r.wants(12, Some(b"k1"), None),
            "a tombstone was planned as read"
        );
    }

    #[test]
    fn a_message_without_a_key_or_a_tombstone_is_not_held() {
        let mut d = Deferred::default();
        assert!(!d.hold(&msg("a", 0, 1, None, Some("truncate"))));
        assert!(!d.hold(&msg("a", 0, 2, Some("k1"), None)));
        assert!(d.is_empty());
        assert_eq!((d.bytes, d.keys()), (0, 0));
    }

    #[test]
    fn held_bytes_follow_the_newest_payloads_not_the_messages_read() {
        let mut d = Deferred::default();
        d.hold(&msg("a", 0, 1, Some("k1"), Some("0123456789")));
        let one = d.bytes;
        assert!(one >= 12 + KEY_OVERHEAD);
        d.hold(&msg("a", 0, 2, Some("k1"), Some("01234")));
        assert_eq!(d.bytes, one - 5, "the replaced payload's bytes are gone");
        d.hold(&msg("a", 0, 3, Some("k2"), Some("0123456789")));
        assert_eq!(d.bytes, 2 * one - 5);
    }
}
