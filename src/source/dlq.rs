//! The dead-letter topic: the producer (a change the worker can never
//! apply is produced to the region's dead-letter topic, unchanged, with
//! headers that say why and where it came from, and acknowledged by the
//! broker before its offset is stored), and the reader `regionsync dlq`
//! lists and replays them with ([`read_all`]).
//!
//! A dead letter is the original message's key and value bytes, unchanged,
//! with the headers [`HEADER_REASON`], [`HEADER_ERROR`], [`HEADER_TOPIC`],
//! [`HEADER_PARTITION`], [`HEADER_OFFSET`] and, when the topic feeds a
//! table, [`HEADER_TABLE`]; its Kafka timestamp is when it was produced.

use std::time::Duration;

use anyhow::Context as _;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};
use tracing::warn;

use crate::config::Config;
use crate::metrics as m;

/// One message bound for the dead-letter topic.
pub struct DeadLetter<'a> {
    pub topic: &'a str,
    pub partition: i32,
    pub offset: i64,
    pub key: Option<&'a [u8]>,
    pub payload: Option<&'a [u8]>,
    /// A label of `metrics::reason`.
    pub reason: &'static str,
    pub error: &'a str,
    /// The target table the message's topic feeds, if any.
    pub table: Option<&'a str>,
}

/// The error, one line.
pub const HEADER_ERROR: &str = "regionsync.error";
/// The reason label (`metrics::reason`).
pub const HEADER_REASON: &str = "regionsync.reason";
/// The original message's topic, partition and offset.
pub const HEADER_TOPIC: &str = "regionsync.topic";
pub const HEADER_PARTITION: &str = "regionsync.partition";
pub const HEADER_OFFSET: &str = "regionsync.offset";
/// The target table (schema.table) its topic feeds; absent on dead letters
/// of a heartbeat topic and on those produced before it was added.
pub const HEADER_TABLE: &str = "regionsync.table";

/// The idempotent producer of the dead-letter topic.
pub struct DeadLetterProducer {
    producer: FutureProducer,
    topic: String,
}

impl DeadLetterProducer {
    pub fn new(config: &Config) -> anyhow::Result<Self> {
        let mut settings = super::kafka_config(config)?;
        settings.set("enable.idempotence", "true");
        // How long one dead letter may wait for the broker's acknowledgement
        // before the attempt fails and the partition's retry (and its
        // `dlq_unavailable` count) shows it. librdkafka's default (300 s)
        // kept a broker refusing every produce (NOT_ENOUGH_REPLICAS) from
        // being seen for 5 minutes. `kafka.properties` may set another.
        if !config.kafka.properties.contains_key("message.timeout.ms")
            && !config.kafka.properties.contains_key("delivery.timeout.ms")
        {
            settings.set("message.timeout.ms", "30000");
        }
        let producer: FutureProducer = settings
            .create()
            .context("creating the dead-letter producer")?;
        Ok(DeadLetterProducer {
            producer,
            topic: config.dlq_topic(),
        })
    }

    /// Produces one dead letter and waits for the broker's acknowledgement.
    pub async fn send(&self, letter: &DeadLetter<'_>) -> anyhow::Result<()> {
        let dlq = &self.topic;
        let partition = letter.partition.to_string();
        let offset = letter.offset.to_string();
        let mut headers = OwnedHeaders::new()
            .insert(Header {
                key: HEADER_ERROR,
                value: Some(letter.error),
            })
            .insert(Header {
                key: HEADER_REASON,
                value: Some(letter.reason),
            })
            .insert(Header {
                key: HEADER_TOPIC,
                value: Some(letter.topic),
            })
            .insert(Header {
                key: HEADER_PARTITION,
                value: Some(partition.as_str()),
            })
            .insert(Header {
                key: HEADER_OFFSET,
                value: Some(offset.as_str()),
            });
        if let Some(table) = letter.table {
            headers = headers.insert(Header {
                key: HEADER_TABLE,
                value: Some(table),
            });
        }
        let mut record: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(dlq).headers(headers);
        if let Some(k) = letter.key {
            record = record.key(k);
        }
        if let Some(p) = letter.payload {
            record = record.payload(p);
        }
        self.producer
            .send(record, Duration::from_secs(30))
            .await
            .map_err(|(e, _)| anyhow::anyhow!("producing to the dead-letter topic {dlq}: {e}"))?;
        warn!(topic = %letter.topic, partition = letter.partition, offset = letter.offset, reason = letter.reason, error = %letter.error, "sent to the dead-letter topic");
        metrics::counter!(m::DLQ_MESSAGES_TOTAL, "reason" => letter.reason).increment(1);
        Ok(())
    }
}

/// A dead letter read back from the dead-letter topic.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredLetter {
    /// Where it is in the dead-letter topic.
    pub dlq_partition: i32,
    pub dlq_offset: i64,
    /// When it was dead-lettered (ms since the epoch), if Kafka says.
    pub at_ms: Option<i64>,
    pub reason: String,
    pub error: String,
    /// The target table its topic feeds, if the header says.
    pub table: Option<String>,
    /// The original message: topic, partition, offset, key and value.
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub payload: Option<Vec<u8>>,
}

impl StoredLetter {
    /// Reads one message of the dead-letter topic; an error names what is
    /// missing (a message not produced by regionsync).
    pub fn from_message<M: Message>(msg: &M) -> Result<StoredLetter, String> {
        let mut header = std::collections::HashMap::new();
        if let Some(headers) = msg.headers() {
            for h in headers.iter() {
                if let Some(v) = h.value {
                    header.insert(h.key, String::from_utf8_lossy(v).into_owned());
                }
            }
        }
        let get = |name: &str| {
            header.get(name).cloned().ok_or_else(|| {
                format!(
                    "dead letter {}/{} has no header {name}",
                    msg.partition(),
                    msg.offset()
                )
            })
        };
        let number = |name: &str| -> Result<i64, String> {
            get(name)?.parse().map_err(|_| {
                format!(
                    "dead letter {}/{}: header {name} is not a number",
                    msg.partition(),
                    msg.offset()
                )
            })
        };
        Ok(StoredLetter {
            dlq_partition: msg.partition(),
            dlq_offset: msg.offset(),
            at_ms: msg.timestamp().to_millis(),
            reason: get(HEADER_REASON)?,
            error: get(HEADER_ERROR).unwrap_or_default(),
            table: header.get(HEADER_TABLE).cloned(),
            topic: get(HEADER_TOPIC)?,
            partition: i32::try_from(number(HEADER_PARTITION)?).map_err(|e| e.to_string())?,
            offset: number(HEADER_OFFSET)?,
            key: msg.key().map(<[u8]>::to_vec),
            payload: msg.payload().map(<[u8]>::to_vec),
        })
    }
}

/// Every message of the region's dead-letter topic, oldest first per
/// partition, read from each partition's first offset to its end as
/// found at the start (a reader without a consumer group position: it
/// commits nothing). Messages that are not dead letters are returned as
/// errors, in place. An absent topic holds nothing.
pub async fn read_all(config: &Config) -> anyhow::Result<Vec<Result<StoredLetter, String>>> {
    let topic = config.dlq_topic();
    let consumer: StreamConsumer = super::kafka_config(config)?
        .set(
            "group.id",
            format!("{}-dlq-reader", config.consumer_group()),
        )
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .create()
        .context("creating the dead-letter topic's reader")?;
    let metadata = tokio::task::block_in_place(|| {
        consumer.fetch_metadata(Some(&topic), Duration::from_secs(10))
    })
    .with_context(|| format!("reading the metadata of topic {topic}"))?;
    let Some(t) = metadata.topics().iter().find(|t| t.name() == topic) else {
        return Ok(Vec::new());
    };
    if t.error().is_some() {
        return Ok(Vec::new());
    }
    let mut tpl = TopicPartitionList::new();
    let mut ends = std::collections::HashMap::new();
    for p in t.partitions() {
        let (low, high) = tokio::task::block_in_place(|| {
            consumer.fetch_watermarks(&topic, p.id(), Duration::from_secs(10))
        })
        .with_context(|| format!("reading the offsets of {topic}/{}", p.id()))?;
        if high > low {
            tpl.add_partition_offset(&topic, p.id(), Offset::Offset(low))?;
            ends.insert(p.id(), high);
        }
    }
    let mut out = Vec::new();
    if ends.is_empty() {
        return Ok(out);
    }
    consumer
        .assign(&tpl)
        .with_context(|| format!("assigning the partitions of {topic}"))?;
    let mut idle = Duration::ZERO;
    while !ends.is_empty() {
        let Ok(msg) = tokio::time::timeout(Duration::from_secs(1), consumer.recv()).await else {
            // A partition may end in offsets that are no messages.
            if let Ok(positions) = consumer.position() {
                for e in positions.elements() {
                    if let Offset::Offset(at) = e.offset() {
                        if ends.get(&e.partition()).is_some_and(|end| at >= *end) {
                            ends.remove(&e.partition());
                        }
                    }
                }
            }
            idle += Duration::from_secs(1);
            if !ends.is_empty() && idle >= Duration::from_secs(30) {
                anyhow::bail!(
                    "no message from {topic} for 30 s while {} partition(s) are not read to their end",
                    ends.len()
                );
            }
            continue;
        };
        let msg = match msg {
            Ok(msg) => msg,
            // Within the 30 s without a message above.
            Err(e) if super::is_passing(&e) => {
                warn!(error = %e, topic = %topic, "reading the dead-letter topic: Kafka said this; reading on");
                continue;
            }
            Err(e) => return Err(anyhow::Error::from(e).context(format!("reading {topic}"))),
        };
        // 30 s without a message, not 30 s of gaps over a long read.
        idle = Duration::ZERO;
        let Some(end) = ends.get(&msg.partition()).copied() else {
            continue;
        };
        if msg.offset() < end {
            out.push(StoredLetter::from_message(&msg));
        }
        if msg.offset() + 1 >= end {
            ends.remove(&msg.partition());
        }
    }
    Ok(one_per_change(out))
}

/// Keeps the first dead letter of each change (its original topic,
/// partition and offset). A batch abandoned after its dead letters were
/// produced (a crash, a rebalance to another worker) may produce them
/// again on its next attempt; readers see one record per change.
fn one_per_change(letters: Vec<Result<StoredLetter, String>>) -> Vec<Result<StoredLetter, String>> {
    let mut seen = std::collections::HashSet::new();
    letters
        .into_iter()
        .filter(|l| match l {
            Ok(l) => seen.insert((l.topic.clone(), l.partition, l.offset)),
            Err(_) => true,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rdkafka::message::OwnedMessage;
    use rdkafka::Timestamp;

    #[test]
    fn a_dead_letter_is_read_back_with_its_origin_and_bytes() {
        let headers = OwnedHeaders::new()
            .insert(Header {
                key: HEADER_ERROR,
                value: Some("public.t: column c (varchar(3)): too long"),
            })
            .insert(Header {
                key: HEADER_REASON,
                value: Some("schema_mismatch"),
            })
            .insert(Header {
                key: HEADER_TOPIC,
                value: Some("us-east-1.cdc.public.t"),
            })
            .insert(Header {
                key: HEADER_PARTITION,
                value: Some("2"),
            })
            .insert(Header {
                key: HEADER_OFFSET,
                value: Some("41"),
            })
            .insert(Header {
                key: HEADER_TABLE,
                value: Some("public.t"),
            });
        let msg = OwnedMessage::new(
            Some(b"{\"op\":\"c\"}".to_vec()),
            Some(b"{\"id\":7}".to_vec()),
            "regionsync.dlq.eu-west-1".into(),
            Timestamp::CreateTime(1_700_000_000_000),
            0,
            5,
            Some(headers),
        );
        let letter = StoredLetter::from_message(&msg).expect("a dead letter");
        assert_eq!(letter.reason, "schema_mismatch");
        assert_eq!(letter.table.as_deref(), Some("public.t"));
        assert_eq!(
            (letter.topic.as_str(), letter.partition, letter.offset),
            ("us-east-1.cdc.public.t", 2, 41)
        );
        assert_eq!(letter.key.as_deref(), Some(&b"{\"id\":7}"[..]));
        assert_eq!(letter.at_ms, Some(1_700_000_000_000));
        assert_eq!((letter.dlq_partition, letter.dlq_offset), (0, 5));

        let foreign = OwnedMessage::new(
            None,
            None,
            "regionsync.dlq.eu-west-1".into(),
            Timestamp::NotAvailable,
            0,
            6,
            None,
        );
        let why = StoredLetter::from_message(&foreign).expect_err("not a dead letter");
        assert!(why.contains("0/6") && why.contains(HEADER_REASON), "{why}");
    }

    #[test]
    fn a_change_dead_lettered_twice_is_read_back_once() {
        let letter = |dlq_offset: i64, offset: i64| StoredLetter {
            dlq_partition: 0,
            dlq_offset,
            at_ms: None,
            reason: "not_json".into(),
            error: String::new(),
            table: None,
            topic: "us-east-1.cdc.public.t".into(),
            partition: 1,
            offset,
            key: None,
            payload: None,
        };
        let read = vec![
            Ok(letter(0, 7)),
            Ok(letter(1, 9)),
            Err("dead letter 0/2 has no header".into()),
            // The same two changes, produced again by a retried batch.
            Ok(letter(3, 7)),
            Ok(letter(4, 9)),
        ];
        let kept: Vec<(i64, i64)> = one_per_change(read.clone())
            .into_iter()
            .filter_map(|l| l.ok())
            .map(|l| (l.dlq_offset, l.offset))
            .collect();
        assert_eq!(kept, vec![(0, 7), (1, 9)]);
        assert_eq!(
            one_per_change(read).len(),
            3,
            "what is not a dead letter stays"
        );
    }
}
