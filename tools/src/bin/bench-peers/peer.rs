//! The two peers under test, and the JDBC sink's side of a run that is not
//! Connect's REST API: the sink's settings, its connector config
//! (tools/peer/debezium-jdbc-sink[-avro].json with the placeholders filled)
//! and its consumer group's offsets in B's Kafka.

use std::collections::HashMap;
use std::time::Duration;

use rdkafka::consumer::{CommitMode, Consumer};
use rdkafka::{Offset, TopicPartitionList};
use regionsync_tools::kafka::kafka_b_consumer;
use regionsync_tools::stack::{pg_port_b, registry_v2_url, root, HOST};
use serde::Serialize;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Peer {
    Regionsync,
    JdbcSink,
}

impl Peer {
    pub fn name(self) -> &'static str {
        match self {
            Peer::Regionsync => "regionsync",
            Peer::JdbcSink => "Debezium JDBC sink",
        }
    }
    pub fn short(self) -> &'static str {
        match self {
            Peer::Regionsync => "rs",
            Peer::JdbcSink => "jdbc",
        }
    }
}

pub const PEERS: [Peer; 2] = [Peer::Regionsync, Peer::JdbcSink];

/// The JDBC sink's settings under test (`--sink-batch`, `--sink-tasks`).
#[derive(Clone, Copy, Debug, Serialize)]
pub struct SinkSettings {
    pub batch_size: u64,
    pub tasks: u64,
}

/// `tools/peer/debezium-jdbc-sink[-avro].json` with its placeholders filled.
pub fn sink_config(
    encoding: &str,
    topic: &str,
    group: &str,
    copy: &str,
    s: SinkSettings,
) -> String {
    let file = match encoding {
        "avro" => "tools/peer/debezium-jdbc-sink-avro.json",
        _ => "tools/peer/debezium-jdbc-sink.json",
    };
    let template = std::fs::read_to_string(root().join(file)).expect(file);
    let values = [
        ("SINK_TASKS", s.tasks.to_string()),
        ("SINK_TOPICS", topic.to_string()),
        ("SINK_GROUP", group.to_string()),
        ("PG_HOST", HOST.into()),
        ("PG_PORT", pg_port_b().to_string()),
        ("PG_DATABASE", "app".into()),
        ("SINK_USER", "regionsync".into()),
        ("SINK_TABLE_FORMAT", format!("bench.{copy}")),
        ("SINK_BATCH_SIZE", s.batch_size.to_string()),
        ("REGISTRY_URL", registry_v2_url()),
    ];
    let mut out = template;
    for (k, v) in values {
        out = out.replace(&format!("{{{{{k}}}}}"), &v);
    }
    assert!(
        !out.contains("{{"),
        "{file}: a placeholder is left unfilled"
    );
    out
}

/// The offsets the group has committed for `topic` in B's Kafka.
pub fn committed(group: &str, topic: &str, ends: &HashMap<i32, i64>) -> HashMap<i32, i64> {
    let consumer = kafka_b_consumer(group);
    let mut tpl = TopicPartitionList::new();
    for p in ends.keys() {
        tpl.add_partition(topic, *p);
    }
    match consumer.committed_offsets(tpl, Duration::from_secs(5)) {
        Ok(c) => c
            .elements()
            .iter()
            .filter_map(|e| match e.offset() {
                Offset::Offset(o) => Some((e.partition(), o)),
                _ => None,
            })
            .collect(),
        Err(_) => HashMap::new(),
    }
}

/// Commits `positions` for a group that has no members yet, so that a sink
/// started afterwards in that group begins exactly there.
pub fn precommit(group: &str, topic: &str, positions: &HashMap<i32, i64>) {
    let consumer = kafka_b_consumer(group);
    let mut tpl = TopicPartitionList::new();
    for (p, o) in positions {
        tpl.add_partition_offset(topic, *p, Offset::Offset(*o))
            .unwrap();
    }
    consumer
        .commit(&tpl, CommitMode::Sync)
        .unwrap_or_else(|e| panic!("commit start offsets for {group}: {e}"));
}
