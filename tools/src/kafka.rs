//! Kafka clients of regions A and B, and what the benchmarks ask Kafka:
//! topics' end offsets (settled once Debezium and MirrorMaker 2 have carried
//! everything), whether a position has reached them, and whether a mirrored
//! topic keeps every change.

use std::collections::HashMap;
use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, ResourceSpecifier};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

use crate::stack::kafka_b;

pub fn admin(bootstrap: &str) -> AdminClient<DefaultClientContext> {
    ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .create()
        .expect("Kafka admin client")
}

pub fn kafka_b_consumer(group: &str) -> BaseConsumer {
    kafka_consumer(&kafka_b(), group)
}

pub fn kafka_consumer(bootstrap: &str, group: &str) -> BaseConsumer {
    ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .create()
        .expect("consumer")
}

/// A consumer of B's Kafka assigned to partitions `partitions` of `topic`,
/// each from its first offset.
pub fn kafka_b_from_beginning(
    topic: &str,
    partitions: impl IntoIterator<Item = i32>,
) -> BaseConsumer {
    let consumer = kafka_b_consumer("bench-unused");
    let mut tpl = TopicPartitionList::new();
    for p in partitions {
        tpl.add_partition_offset(topic, p, Offset::Beginning)
            .expect("partition offset");
    }
    consumer.assign(&tpl).expect("assign");
    consumer
}

/// Panics unless the mirrored topic `topic` in B keeps every message: a
/// compacted one (left by an older bench) would make a run apply fewer
/// changes than it is credited with.
pub async fn assert_uncompacted(topic: &str) {
    let opts = AdminOptions::new().request_timeout(Some(Duration::from_secs(30)));
    let results = admin(&kafka_b())
        .describe_configs(&[ResourceSpecifier::Topic(topic)], &opts)
        .await
        .expect("describe_configs");
    let policy = results
        .into_iter()
        .next()
        .and_then(|r| r.ok())
        .and_then(|r| r.get("cleanup.policy").and_then(|e| e.value.clone()));
    assert_eq!(
        policy.as_deref(),
        Some("delete"),
        "{topic} in B's Kafka has cleanup.policy {policy:?}: the log cleaner may have dropped changes. \
         Delete its row from regionsync.bench_meta in A to regenerate the source"
    );
}

/// A topic's current end offset per partition in B's Kafka.
pub fn topic_ends(topic: &str) -> HashMap<i32, i64> {
    ends_seen_by(&kafka_b_consumer("bench-unused"), topic)
}

/// A topic's current end offset per partition in the Kafka `consumer` is
/// connected to (kept by a caller that asks often).
pub fn ends_seen_by(consumer: &BaseConsumer, topic: &str) -> HashMap<i32, i64> {
    let md = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(5))
        .expect("metadata");
    let partitions = md
        .topics()
        .first()
        .map(|t| t.partitions().len())
        .unwrap_or(0);
    (0..partitions as i32)
        .map(|p| {
            // A topic created moments ago may have no leader yet
            // (NotLeaderForPartition): ask again for up to 30 s.
            let mut attempts = 0;
            let (_, high) = loop {
                match consumer.fetch_watermarks(topic, p, Duration::from_secs(5)) {
                    Ok(w) => break w,
                    Err(e) if attempts < 30 => {
                        attempts += 1;
                        eprintln!("watermarks of {topic}/{p}: {e}; asking again");
                        std::thread::sleep(Duration::from_secs(1));
                    }
                    Err(e) => panic!("watermarks of {topic}/{p}: {e}"),
                }
            };
            (p, high)
        })
        .collect()
}

/// The mirrored topic's end offsets, once they stop growing (Debezium and
/// MirrorMaker 2 have carried everything).
pub fn settled_ends(topic: &str) -> HashMap<i32, i64> {
    let mut last = HashMap::new();
    let mut stable = 0;
    loop {
        let ends = topic_ends(topic);
        if !ends.is_empty() && ends == last {
            stable += 1;
            if stable >= 5 {
                return ends;
            }
        } else {
            stable = 0;
        }
        last = ends;
        std::thread::sleep(Duration::from_secs(2));
    }
}

/// Whether every partition's position has reached its end offset.
pub fn reached(ends: &HashMap<i32, i64>, positions: &HashMap<i32, i64>) -> bool {
    ends.iter()
        .all(|(p, e)| positions.get(p).copied().unwrap_or(0) >= *e)
}
