//! Source: the Kafka side of the worker, and only that. One consumer per
//! worker subscribed to the mirrored CDC and heartbeat topics, whose
//! assignments and revocations are forwarded to the worker's main loop,
//! with a librdkafka queue per partition; and the client settings the
//! consumer and the dead-letter producer share ([`kafka_config`]: the
//! typed TLS and SASL keys, then `kafka.properties`), with the check that
//! the brokers accept them ([`check_connection`]).
//!
//! What it promises:
//! - A newly assigned partition is paused before anything is fetched, and
//!   resumed only when the worker has sought it to its stored offset
//!   ([`seek_and_resume`]); Kafka's own committed offsets are a copy for
//!   monitoring, never the position.
//! - A partition's messages reach only its own queue; librdkafka stops
//!   fetching a partition whose queue is full, which bounds memory.

pub mod dlq;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::consumer::stream_consumer::StreamPartitionQueue;
use rdkafka::consumer::{
    BaseConsumer, Consumer, ConsumerContext, Rebalance, RebalanceProtocol, StreamConsumer,
};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::BorrowedMessage;
use rdkafka::producer::{BaseProducer, Producer};
use rdkafka::types::RDKafkaRespErr;
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use tokio::sync::{mpsc, watch};
use tracing::{debug, error, info, warn};

use crate::config::Config;

/// The worker's consumer.
pub type Kafka = StreamConsumer<RebalanceForwarder>;

/// A partition's own queue of the worker's consumer.
pub type Queue = StreamPartitionQueue<RebalanceForwarder>;

/// paused here, before any fetch, until the main loop has sought them to
/// their stored offsets.
pub struct RebalanceForwarder {
    events: mpsc::UnboundedSender<RebalanceEvent>,
    /// High watermark per partition, from librdkafka's periodic statistics
    /// (no broker round trip of our own).
    pub high_watermarks: Mutex<HashMap<(String, i32), i64>>,
    /// The client's last error, explained, for readiness.
    pub errors: LastError,
}

/// The last error a librdkafka client reported, explained ([`explain`]),
/// with when.
#[derive(Default)]
pub struct LastError(Mutex<Option<(Instant, String)>>);

impl LastError {
    fn record(&self, error: &KafkaError, reason: &str) {
        let why = explain(error.rdkafka_error_code(), reason);
        warn!(error = %why, "kafka");
        *self.0.lock().expect("last error lock") = Some((Instant::now(), why));
    }

    /// A librdkafka log line, forwarded to the log as librdkafka's default
    /// does; a broker connection's failure (facility `FAIL`: a refused
    /// TLS handshake is reported only there) is kept as the last error.
    fn log(&self, level: RDKafkaLogLevel, fac: &str, message: &str) {
        match level {
            RDKafkaLogLevel::Emerg
            | RDKafkaLogLevel::Alert
            | RDKafkaLogLevel::Critical
            | RDKafkaLogLevel::Error => error!(target: "librdkafka", "librdkafka: {fac} {message}"),
            RDKafkaLogLevel::Warning => warn!(target: "librdkafka", "librdkafka: {fac} {message}"),
            RDKafkaLogLevel::Notice | RDKafkaLogLevel::Info => {
                info!(target: "librdkafka", "librdkafka: {fac} {message}")
            }
            RDKafkaLogLevel::Debug => debug!(target: "librdkafka", "librdkafka: {fac} {message}"),
        }
        if fac == "FAIL" {
            let why = explain(None, message);
            *self.0.lock().expect("last error lock") = Some((Instant::now(), why));
        }
    }

    /// The last error, if it is younger than `within`.
    pub fn recent(&self, within: Duration) -> Option<String> {
        self.0
            .lock()
            .expect("last error lock")
            .as_ref()
            .filter(|(at, _)| at.elapsed() < within)
            .map(|(_, why)| why.clone())
    }
}

/// A librdkafka error in words that name what was refused: the SASL
/// credentials, the broker's certificate, or the address. librdkafka never
/// puts a password in an error.
pub fn explain(code: Option<rdkafka::types::RDKafkaErrorCode>, reason: &str) -> String {
    let lower = reason.to_ascii_lowercase();
    let refused_credentials = lower.contains("sasl authentication")
        || (code == Some(rdkafka::types::RDKafkaErrorCode::Authentication)
            && lower.contains("sasl"));
    if refused_credentials {
        format!("Kafka refused the SASL credentials (wrong user name or password, or mechanism): {reason}")
    } else if lower.contains("certificate verify failed")
        || lower.contains("certificate could not be verified")
    {
        format!(
            "the Kafka broker's certificate could not be verified (untrusted CA: not signed by a CA in kafka.ssl_ca_location; or a host name mismatch): {reason}"
        )
    } else if lower.contains("ssl") {
        format!("TLS with the Kafka broker failed: {reason}")
    } else {
        format!("Kafka: {reason}")
    }
}

#[derive(Debug)]
pub enum RebalanceEvent {
    Assigned(Vec<(String, i32)>),
    Revoked(Vec<(String, i32)>),
}

fn partitions(tpl: &TopicPartitionList) -> Vec<(String, i32)> {
    tpl.elements()
        .iter()
        .map(|e| (e.topic().to_string(), e.partition()))
        .collect()
}

impl ClientContext for RebalanceForwarder {
    fn error(&self, error: KafkaError, reason: &str) {
        self.errors.record(&error, reason);
    }

    fn log(&self, level: RDKafkaLogLevel, fac: &str, message: &str) {
        self.errors.log(level, fac, message);
    }

    fn stats(&self, statistics: rdkafka::Statistics) {
        let mut highs = self.high_watermarks.lock().expect("watermarks lock");
        for (name, topic) in statistics.topics {
            for (partition, p) in topic.partitions {
                // Partition -1 is librdkafka's internal "unassigned" queue.
                if partition >= 0 && p.hi_offset >= 0 {
                    highs.insert((name.clone(), partition), p.hi_offset);
                }
            }
        }
    }
}

impl ConsumerContext for RebalanceForwarder {
    /// rdkafka's default rebalance, but a newly assigned partition starts
    /// at "the beginning" rather than at the group's committed offset (a
    /// copy, never the position) or `auto.offset.reset`: under "error",
    /// a partition the group never committed would raise AUTO_OFFSET_RESET
    /// at once and stop fetching, and then refuse the worker's seek. It is
    /// paused before anything is fetched ([`Self::post_rebalance`]) and
    /// sought to its checked offset by the worker.
    fn rebalance(
        &self,
        consumer: &BaseConsumer<Self>,
        err: RDKafkaRespErr,
        tpl: &mut TopicPartitionList,
    ) {
        let cooperative = matches!(
            consumer.rebalance_protocol(),
            RebalanceProtocol::Cooperative
        );
        match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                if let Err(e) = tpl.set_all_offsets(Offset::Beginning) {
                    warn!(error = %e, "could not set the start of newly assigned partitions");
                }
                let assigned = if cooperative {
                    consumer.incremental_assign(tpl)
                } else {
                    consumer.assign(tpl)
                };
                if let Err(e) = assigned {
                    error!(error = %e, "assigning partitions failed");
                }
                self.post_rebalance(consumer, &Rebalance::Assign(tpl));
            }
            _ => {
                if err == RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS {
                    self.pre_rebalance(consumer, &Rebalance::Revoke(tpl));
                } else {
                    let code: RDKafkaErrorCode = err.into();
                    error!(error = %code, "rebalancing");
                    self.pre_rebalance(consumer, &Rebalance::Error(KafkaError::Rebalance(code)));
                }
                let unassigned = if cooperative {
                    consumer.incremental_unassign(tpl)
                } else {
                    consumer.unassign()
                };
                if let Err(e) = unassigned {
                    error!(error = %e, "unassigning partitions failed");
                }
            }
        }
    }

    fn pre_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(tpl) = rebalance {
            let _ = self.events.send(RebalanceEvent::Revoked(partitions(tpl)));
        }
    }

    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(tpl) = rebalance {
            if tpl.count() == 0 {
                return;
            }
            if let Err(e) = consumer.pause(tpl) {
                warn!(error = %e, "pausing newly assigned partitions failed");
            }
            let _ = self.events.send(RebalanceEvent::Assigned(partitions(tpl)));
        }
    }
}

/// Anchors a regex on exact topic names.
fn subscription_pattern(topics: &[String]) -> String {
    let escaped: Vec<String> = topics
        .iter()
        .map(|t| t.replace('.', "\\.").replace('-', "\\-"))
        .collect();
    format!("^({})$", escaped.join("|"))
}

/// The client settings of the consumer and the dead-letter producer: the
/// brokers, the typed TLS and SASL keys as librdkafka properties, then
/// `kafka.properties`, which win. Holds the SASL password: never print it
/// (`ClientConfig`'s `Debug` shows every value).
pub fn kafka_config(config: &Config) -> anyhow::Result<ClientConfig> {
    let k = &config.kafka;
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &k.bootstrap_servers);
    if let Some(p) = k.security_protocol {
        c.set("security.protocol", p.as_str());
    }
    if let Some(m) = k.sasl_mechanism {
        c.set("sasl.mechanism", m.as_str());
    }
    if let Some(u) = &k.sasl_username {
        c.set("sasl.username", u);
    }
    if let Some(p) = config.kafka_sasl_password()? {
        c.set("sasl.password", p.expose());
    }
    if let Some(ca) = &k.ssl_ca_location {
        c.set("ssl.ca.location", ca);
    }
    for (key, v) in &k.properties {
        c.set(key, v);
    }
    Ok(c)
}

/// Collects a client's errors (the connection check's producer).
#[derive(Default)]
struct ErrorCollector(LastError);

impl ClientContext for ErrorCollector {
    fn error(&self, error: KafkaError, reason: &str) {
        self.0.record(&error, reason);
    }

    fn log(&self, level: RDKafkaLogLevel, fac: &str, message: &str) {
        self.0.log(level, fac, message);
    }
}

impl rdkafka::producer::ProducerContext for ErrorCollector {
    type DeliveryOpaque = ();
    fn delivery(&self, _: &rdkafka::message::DeliveryResult<'_>, _: Self::DeliveryOpaque) {}
}

/// Whether the brokers accept this worker's settings: fetches the cluster's
/// metadata with a client of the same settings (a producer, as the
/// dead-letter producer), within `within`. `Err` says what was refused (the
/// SASL credentials, the broker's certificate), not only that it timed out.
pub async fn check_connection(config: &Config, within: Duration) -> Result<(), String> {
    let producer: BaseProducer<ErrorCollector> = kafka_config(config)
        .map_err(|e| format!("{e:#}"))?
        .create_with_context(ErrorCollector::default())
        .map_err(|e| format!("creating a Kafka client: {e}"))?;
    let producer = Arc::new(producer);
    let servers = config.kafka.bootstrap_servers.clone();
    tokio::task::spawn_blocking(move || {
        let deadline = Instant::now() + within;
        loop {
            let step = Duration::from_millis(500);
            let fetched = producer.client().fetch_metadata(None, step);
            // Serves the error events the attempt raised.
            producer.poll(Duration::ZERO);
            if fetched.is_ok() {
                return Ok(());
            }
            if let Some(why) = producer.context().0.recent(within) {
                return Err(why);
            }
            if Instant::now() >= deadline {
                let detail = fetched.err().map(|e| e.to_string()).unwrap_or_default();
                return Err(format!(
                    "Kafka at {servers}: no answer within {} s ({detail}); is kafka.bootstrap_servers right?",
                    within.as_secs()
                ));
            }
        }
    })
    .await
    .map_err(|e| format!("checking Kafka: {e}"))?
}

/// The worker's consumer of `group`, and the channel its rebalances arrive
/// on. Offsets are never committed automatically: PostgreSQL holds them.
pub fn consumer(
    config: &Config,
    group: &str,
) -> anyhow::Result<(Kafka, mpsc::UnboundedReceiver<RebalanceEvent>)> {
    let (events_tx, events_rx) = mpsc::unbounded_channel();
    let consumer: Kafka = kafka_config(config)?
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        // Never a silent jump: every position is sought explicitly (the
        // stored offset, or the first offset the check accepted), so the
        // only resets are a position outside the partition (retention
        // deleted changes not fetched yet, the topic re-created) and the
        // group's missing committed offset at assignment. librdkafka then
        // stops fetching the partition and puts AUTO_OFFSET_RESET on its
        // queue ([`Next::OutOfRange`]); "earliest" would skip the gap.
        .set("auto.offset.reset", "error")
        .set("partition.assignment.strategy", "cooperative-sticky")
        .set("topic.metadata.refresh.interval.ms", "5000")
        .set_if_absent("session.timeout.ms", "10000")
        .set_if_absent("fetch.wait.max.ms", "50")
        // librdkafka prefetches up to 64 MiB per partition by default;
        // 2 MiB per partition queue keeps every fetch busy (measured) and
        // the worker's memory bounded whatever the backlog.
        .set_if_absent("queued.max.messages.kbytes", "2048")
        // Both limits count compressed bytes, and a fetch may overshoot
        // the queue by up to this much per partition: 1 MiB (the
        // default) of lz4 JSON events is 10-30 MiB decompressed, which
        // took a replay's peak RSS from about 110 MB to 171-195 MB
        // (make bench). 256 KiB: 134 MB, at the same rate.
        .set_if_absent("fetch.message.max.bytes", "262144")
        // Default 1 s: a partition whose queue filled up while its batch
        // was committing would then wait a whole second for its next
        // fetch — most of the replay time with large JSON messages.
        .set_if_absent("fetch.queue.backoff.ms", "10")
        // Feeds the consumer-lag gauge with high watermarks.
        .set_if_absent("statistics.interval.ms", "5000")
        .create_with_context(RebalanceForwarder {
            events: events_tx,
            high_watermarks: Mutex::new(HashMap::new()),
            errors: LastError::default(),
        })
        .context("creating the Kafka consumer")?;
    Ok((consumer, events_rx))
}

/// Subscribes to exactly `topics`.
pub fn subscribe(consumer: &Kafka, topics: &[String]) -> anyhow::Result<()> {
    consumer
        .subscribe(&[&subscription_pattern(topics)])
        .context("subscribing to the mirrored topics")
}

trait SetIfAbsent {
    fn set_if_absent(&mut self, key: &str, value: &str) -> &mut Self;
}

impl SetIfAbsent for ClientConfig {
    fn set_if_absent(&mut self, key: &str, value: &str) -> &mut Self {
        if self.get(key).is_none() {
            self.set(key, value);
        }
        self
    }
}

/// What a partition's queue gave.
pub enum Next<'q> {
    Message(BorrowedMessage<'q>),
    /// librdkafka found the partition's fetch position outside the
    /// partition (`auto.offset.reset = error`: it stopped fetching it).
    /// Also raised for the group's missing committed offset at assignment,
    /// before the worker's own seek: the task checks its position against
    /// the topic to tell the two apart.
    OutOfRange(String),
}

/// Whether an error from a partition's queue says its fetch position was
/// outside the partition (librdkafka's AUTO_OFFSET_RESET under
/// `auto.offset.reset = error`).
pub fn is_out_of_range(error: &KafkaError) -> bool {
    matches!(
        error,
        KafkaError::MessageConsumption(RDKafkaErrorCode::AutoOffsetReset)
            | KafkaError::MessageConsumptionFatal(RDKafkaErrorCode::AutoOffsetReset)
    )
}

/// Whether a consumer's error is one librdkafka recovers from by itself: a
/// broker connection lost (for a moment all of them: `AllBrokersDown`), a
/// leader moving. A reader logs it and reads on within its own wait limit,
/// as the worker does ([`next_message`]). Not a fetch position outside the
/// partition ([`is_out_of_range`]), nor a fatal error.
pub fn is_passing(error: &KafkaError) -> bool {
    matches!(error, KafkaError::MessageConsumption(code) if *code != RDKafkaErrorCode::AutoOffsetReset)
}

/// The partition's next message (or the news that its fetch position is
/// outside it), or `None` once told to stop. Borrowed from librdkafka's
/// fetch buffer, not copied: a batch holds its messages until it is
/// applied.
pub async fn next_message<'q>(
    queue: &'q Queue,
    stop: &mut watch::Receiver<()>,
) -> Option<Next<'q>> {
    loop {
        tokio::select! {
            biased;
            // Err: the sender is gone, i.e. the partition was revoked.
            _ = stop.changed() => return None,
            m = queue.recv() => match m {
                Ok(m) => return Some(Next::Message(m)),
                Err(e) if is_out_of_range(&e) => return Some(Next::OutOfRange(e.to_string())),
                Err(e) => warn!(error = %e, "kafka"),
            },
        }
    }
}

/// Seeks a partition to `offset` (the worker's stored offset, or the first
/// offset its check against the topic accepted; never Kafka's committed
/// offset, which is only a copy) and, if `resume`, resumes it (a newly
/// assigned partition is paused until then).
pub fn seek_and_resume(
    consumer: &Kafka,
    topic: &str,
    partition: i32,
    offset: i64,
    resume: bool,
) -> anyhow::Result<()> {
    debug!(topic = %topic, partition, offset, "seeking");
    let mut seek = TopicPartitionList::new();
    seek.add_partition_offset(topic, partition, Offset::Offset(offset))?;
    let sought = consumer
        .seek_partitions(seek, Duration::from_secs(10))
        .context("seeking to the stored offset")?;
    for e in sought.elements() {
        e.error().context("seeking to the stored offset")?;
    }
    if resume {
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition(topic, partition);
        consumer.resume(&tpl).context("resuming the partition")?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lost_broker_connection_is_read_past_a_position_outside_or_a_fatal_error_is_not() {
        for e in [
            KafkaError::MessageConsumption(RDKafkaErrorCode::AllBrokersDown),
            KafkaError::MessageConsumption(RDKafkaErrorCode::BrokerTransportFailure),
            KafkaError::MessageConsumption(RDKafkaErrorCode::NotLeaderForPartition),
        ] {
            assert!(is_passing(&e), "{e}");
        }
        for e in [
            KafkaError::MessageConsumption(RDKafkaErrorCode::AutoOffsetReset),
            KafkaError::MessageConsumptionFatal(RDKafkaErrorCode::AllBrokersDown),
            KafkaError::PartitionEOF(3),
        ] {
            assert!(!is_passing(&e), "{e}");
        }
    }

    #[test]
    fn only_auto_offset_reset_says_the_position_is_outside_the_partition() {
        for e in [
            KafkaError::MessageConsumption(RDKafkaErrorCode::AutoOffsetReset),
            KafkaError::MessageConsumptionFatal(RDKafkaErrorCode::AutoOffsetReset),
        ] {
            assert!(is_out_of_range(&e), "{e}");
        }
        for e in [
            KafkaError::MessageConsumption(RDKafkaErrorCode::OffsetOutOfRange),
            KafkaError::MessageConsumption(RDKafkaErrorCode::BrokerTransportFailure),
            KafkaError::PartitionEOF(3),
            KafkaError::Rebalance(RDKafkaErrorCode::AutoOffsetReset),
        ] {
            assert!(!is_out_of_range(&e), "{e}");
        }
    }
}
