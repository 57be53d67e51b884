//! The stage sampler of the live experiment: once a second, how many rows
//! are behind at each stage of the path (Debezium A, MirrorMaker 2, the sink
//! under test), from the writer's progress, both Kafkas' end offsets and
//! the copy's row count.

use std::sync::atomic::Ordering::SeqCst;
use std::sync::atomic::{AtomicBool, AtomicI64};
use std::sync::Arc;
use std::time::Duration;

use rdkafka::consumer::BaseConsumer;
use regionsync_tools::kafka::{ends_seen_by, kafka_b_consumer, kafka_consumer};
use regionsync_tools::pg::connect;
use regionsync_tools::stack::{kafka_a, pg_port_b};
use serde::Serialize;

use crate::live::count_ids;

/// Rows behind at each stage of the path, in rows (one change event each):
/// Debezium A (committed in A, not yet in Kafka A), MirrorMaker 2 (in Kafka
/// A, not yet in Kafka B) and the sink under test (in Kafka B, not yet in
/// B's copy). The largest sample, and the sample when the writer stopped.
#[derive(Clone, Debug, Default, Serialize)]
pub struct StageBacklog {
    pub debezium_max: i64,
    pub mirrormaker_max: i64,
    pub sink_max: i64,
    pub debezium_at_end: i64,
    pub mirrormaker_at_end: i64,
    pub sink_at_end: i64,
    pub samples: usize,
}

impl StageBacklog {
    pub fn summary(&self) -> String {
        format!(
            "{} / {} / {} (max), {} / {} / {} (writer's end)",
            self.debezium_max,
            self.mirrormaker_max,
            self.sink_max,
            self.debezium_at_end,
            self.mirrormaker_at_end,
            self.sink_at_end
        )
    }
}

/// Samples [`StageBacklog`] each second until `done` is set. `written` is
/// the writer's next id; `writing` is cleared when the writer stops.
pub async fn sample_stages(
    source_topic: String,
    mirrored_topic: String,
    copy: String,
    first_id: i64,
    written: Arc<AtomicI64>,
    writing: Arc<AtomicBool>,
    done: Arc<AtomicBool>,
) -> StageBacklog {
    let b = connect(pg_port_b(), "postgres", "").await;
    // One consumer per Kafka for the whole window: the box is saturated
    // while it is sampled, so no new client every second.
    let consumers = Arc::new((
        kafka_consumer(&kafka_a(), "bench-unused"),
        kafka_b_consumer("bench-unused"),
    ));
    // Messages in the source topic in Kafka A and in its copy in Kafka B.
    let ends = || {
        let (consumers, source, mirrored) = (
            consumers.clone(),
            source_topic.clone(),
            mirrored_topic.clone(),
        );
        tokio::task::spawn_blocking(move || {
            let (a, b) = &*consumers;
            let sum = |c: &BaseConsumer, t: &str| ends_seen_by(c, t).values().sum::<i64>();
            (sum(a, &source), sum(b, &mirrored))
        })
    };
    let (base_a, base_b) = ends().await.expect("topic ends");
    let mut s = StageBacklog::default();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut was_writing = true;
    while !done.load(SeqCst) {
        tick.tick().await;
        let still_writing = writing.load(SeqCst);
        let committed = written.load(SeqCst) - first_id;
        let (in_a, in_b) = ends().await.expect("topic ends");
        let (in_a, in_b) = (in_a - base_a, in_b - base_b);
        let applied = count_ids(&b, &format!("bench.{copy}"), (first_id, i64::MAX)).await;
        let (dbz, mm2, sink) = (
            (committed - in_a).max(0),
            (in_a - in_b).max(0),
            (in_b - applied).max(0),
        );
        s.debezium_max = s.debezium_max.max(dbz);
        s.mirrormaker_max = s.mirrormaker_max.max(mm2);
        s.sink_max = s.sink_max.max(sink);
        if was_writing && !still_writing {
            (s.debezium_at_end, s.mirrormaker_at_end, s.sink_at_end) = (dbz, mm2, sink);
        }
        was_writing = still_writing;
        s.samples += 1;
    }
    s
}
