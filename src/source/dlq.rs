//! The dead-letter producer: a change the worker can never apply is produced
//! to the region's dead-letter topic, unchanged, with headers that say why
//! and where it came from, and acknowledged by the broker before its offset
//! is stored.

use std::time::Duration;

use anyhow::Context as _;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
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
}

/// The idempotent producer of the dead-letter topic.
pub struct DeadLetterProducer {
    producer: FutureProducer,
    topic: String,
}

impl DeadLetterProducer {
    pub fn new(config: &Config) -> anyhow::Result<Self> {
        let producer: FutureProducer = super::kafka_config(config)?
            .set("enable.idempotence", "true")
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
        let headers = OwnedHeaders::new()
            .insert(Header {
                key: "regionsync.error",
                value: Some(letter.error),
            })
            .insert(Header {
                key: "regionsync.reason",
                value: Some(letter.reason),
            })
            .insert(Header {
                key: "regionsync.topic",
                value: Some(letter.topic),
            })
            .insert(Header {
                key: "regionsync.partition",
                value: Some(partition.as_str()),
            })
            .insert(Header {
                key: "regionsync.offset",
                value: Some(offset.as_str()),
            });
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
