//! `regionsync failover-check`: whether this region may take over from the
//! others right now (DESIGN.md §7, RUNBOOK.md "Regional failover").
//!
//! It reads, without the worker's help, what decides it:
//! - every mirrored partition's high watermark in this region's Kafka
//!   against the next offset stored in `regionsync.offsets`, and for a
//!   partition behind, the age of its first unapplied message;
//! - the newest heartbeat applied from each source region (the source
//!   commit time stored with the heartbeat topic's offsets);
//! - the unsettled conflicts of `regionsync.conflicts`, which a takeover
//!   would overwrite;
//!
//! and asks the worker's `/readyz`. [`evaluate`] is the rule, pure; the
//! exit code is 0 (may take over), 1 (may not: every reason listed) or 2
//! (cannot tell: the database, Kafka or the worker did not answer).

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::Context as _;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use serde::Serialize;

use crate::apply::session;
use crate::clock;
use crate::config::Config;

/// How long each source of facts may take to answer before the check
/// gives up and says it cannot tell.
const ANSWER_WITHIN: Duration = Duration::from_secs(8);

/// One mirrored partition as this region has it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct PartitionState {
    pub topic: String,
    pub partition: i32,
    pub source_region: String,
    pub heartbeat: bool,
    /// Messages between the stored next offset and the high watermark.
    pub messages_behind: i64,
    /// Age of the first unapplied message (its Kafka timestamp), when
    /// behind and readable.
    pub seconds_behind: Option<f64>,
}

/// The facts the verdict is made of.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Facts {
    pub partitions: Vec<PartitionState>,
    /// Per source region, the age in seconds of the newest heartbeat
    /// applied here (`None`: none ever).
    pub heartbeat_age: BTreeMap<String, Option<f64>>,
    /// `Err(why)` when the worker answered but is not ready.
    pub worker_ready: Result<(), String>,
    /// Unsettled conflicts by (table, resolution).
    pub unsettled_conflicts: BTreeMap<String, i64>,
}

/// Why this region may not take over.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Reason {
    /// `partition_behind`, `heartbeat_stale`, `no_heartbeat`,
    /// `worker_not_ready`, `unsettled_conflicts`.
    pub kind: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source_region: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub topic: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub partition: Option<i32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seconds_behind: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub messages_behind: Option<i64>,
    pub detail: String,
}

impl Reason {
    fn new(kind: &'static str, detail: String) -> Reason {
        Reason {
            kind,
            source_region: None,
            topic: None,
            partition: None,
            seconds_behind: None,
            messages_behind: None,
            detail,
        }
    }
}

/// The verdict on `facts` with the lag threshold `max_lag`: empty when
/// this region may take over.
///
/// A partition behind its high watermark passes while its first
/// unapplied message is younger than `max_lag` (changes in flight on a
/// busy healthy pipeline); one whose age cannot be read does not. A
/// source region passes while its newest applied heartbeat is younger
/// than `max_lag`: a stalled mirror leaves every partition "consumed to
/// the end" of what reached this region, and only the heartbeat shows it.
pub fn evaluate(facts: &Facts, max_lag: Duration) -> Vec<Reason> {
    let max = max_lag.as_secs_f64();
    let mut reasons = Vec::new();
    for (region, age) in &facts.heartbeat_age {
        match age {
            Some(age) if *age <= max => {}
            Some(age) => reasons.push(Reason {
                source_region: Some(region.clone()),
                seconds_behind: Some(*age),
                ..Reason::new(
                    "heartbeat_stale",
                    format!(
                        "the newest heartbeat applied from {region} is {age:.0} s old (limit {max:.0} s): \
                         nothing newer has arrived from {region} (its Debezium, MirrorMaker 2 or this worker stalls)"
                    ),
                )
            }),
            None => reasons.push(Reason {
                source_region: Some(region.clone()),
                ..Reason::new(
                    "no_heartbeat",
                    format!("no heartbeat from {region} has been applied here"),
                )
            }),
        }
    }
    for p in &facts.partitions {
        if p.messages_behind <= 0 {
            continue;
        }
        if p.seconds_behind.is_some_and(|s| s <= max) {
            continue;
        }
        let age = match p.seconds_behind {
            Some(s) => format!("{s:.0} s"),
            None => "an unknown time".to_string(),
        };
        reasons.push(Reason {
            source_region: Some(p.source_region.clone()),
            topic: Some(p.topic.clone()),
            partition: Some(p.partition),
            seconds_behind: p.seconds_behind,
            messages_behind: Some(p.messages_behind),
            ..Reason::new(
                "partition_behind",
                format!(
                    "{}/{} from {} is {} messages behind, the oldest unapplied waiting for {age} (limit {max:.0} s)",
                    p.topic, p.partition, p.source_region, p.messages_behind
                ),
            )
        });
    }
    if let Err(why) = &facts.worker_ready {
        reasons.push(Reason::new(
            "worker_not_ready",
            format!("the worker is not ready: {why}"),
        ));
    }
    for (what, n) in &facts.unsettled_conflicts {
        reasons.push(Reason::new(
            "unsettled_conflicts",
            format!(
                "{n} unsettled conflicts ({what}): settle them first (`regionsync conflicts list --open`), \
                 or taking over overwrites one side"
            ),
        ));
    }
    reasons
}

/// The answer of the command.
#[derive(Debug, Serialize)]
pub struct Report {
    pub region: String,
    /// `ok`, `not_ready` or `unknown`.
    pub verdict: &'static str,
    pub max_lag_seconds: f64,
    pub reasons: Vec<Reason>,
    /// Why it cannot tell (verdict `unknown`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub facts: Option<Facts>,
}

impl Report {
    /// 0: may take over; 1: may not; 2: cannot tell.
    pub fn exit_code(&self) -> u8 {
        match self.verdict {
            "ok" => 0,
            "not_ready" => 1,
            _ => 2,
        }
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        match self.verdict {
            "ok" => out.push_str(&format!(
                "{}: may take over (every source region within {:.0} s, worker ready, no unsettled conflicts)\n",
                self.region, self.max_lag_seconds
            )),
            "not_ready" => {
                out.push_str(&format!("{}: may NOT take over:\n", self.region));
                for r in &self.reasons {
                    out.push_str(&format!("  - {}: {}\n", r.kind, r.detail));
                }
            }
            _ => out.push_str(&format!(
                "{}: cannot tell: {}\n",
                self.region,
                self.error.as_deref().unwrap_or("?")
            )),
        }
        out
    }
}

/// Runs the check: gathers the facts (`worker_url`: the worker's metrics
/// endpoint) and makes the verdict.
pub async fn check(config: &Config, worker_url: &str, max_lag: Duration) -> Report {
    let report = |verdict, reasons, error, facts| Report {
        region: config.region.clone(),
        verdict,
        max_lag_seconds: max_lag.as_secs_f64(),
        reasons,
        error,
        facts,
    };
    match gather(config, worker_url).await {
        Ok(facts) => {
            let reasons = evaluate(&facts, max_lag);
            let verdict = if reasons.is_empty() {
                "ok"
            } else {
                "not_ready"
            };
            report(verdict, reasons, None, Some(facts))
        }
        Err(e) => report("unknown", Vec::new(), Some(format!("{e:#}")), None),
    }
}

/// What the database, Kafka and the worker say; `Err` when one of them
/// does not answer.
async fn gather(config: &Config, worker_url: &str) -> anyhow::Result<Facts> {
    let group = config.consumer_group();
    let (stored, conflicts) = tokio::time::timeout(ANSWER_WITHIN, read_database(config, &group))
        .await
        .map_err(|_| {
            anyhow::anyhow!(
                "database unreachable: PostgreSQL at {}:{} did not answer within {} s",
                config.postgres.host,
                config.postgres.port,
                ANSWER_WITHIN.as_secs()
            )
        })?
        .context("database unreachable")?;
    let worker_ready = worker_readiness(worker_url).await?;
    let topics = config.mirrored_topics();
    let kafka = crate::source::kafka_config(config)?;
    let now_ms = clock::now_ms();
    let partitions =
        tokio::task::spawn_blocking(move || kafka_positions(kafka, topics, stored, now_ms))
            .await
            .context("reading Kafka")??;
    let mut heartbeat_age: BTreeMap<String, Option<f64>> = config
        .source_regions()
        .into_iter()
        .map(|r| (r, None))
        .collect();
    for (p, newest) in &partitions {
        if let (true, Some(ts)) = (p.heartbeat, newest) {
            let age = ((now_ms - ts).max(0)) as f64 / 1000.0;
            let slot = heartbeat_age.entry(p.source_region.clone()).or_default();
            *slot = Some(slot.map_or(age, |a: f64| a.min(age)));
        }
    }
    Ok(Facts {
        partitions: partitions.into_iter().map(|(p, _)| p).collect(),
        heartbeat_age,
        worker_ready,
        unsettled_conflicts: conflicts,
    })
}

/// Stored (topic, partition) → (next offset, newest source time), and the
/// unsettled conflicts by "table, resolution".
type Stored = BTreeMap<(String, i32), (i64, Option<i64>)>;

async fn read_database(
    config: &Config,
    group: &str,
) -> anyhow::Result<(Stored, BTreeMap<String, i64>)> {
    let pool = session::plain_pool(config)?;
    let client = pool.get().await?;
    let rows = client
        .query(
            "SELECT topic, partition, next_offset, source_ts_ms FROM regionsync.offsets
              WHERE consumer_group = $1",
            &[&group],
        )
        .await?;
    let stored = rows
        .iter()
        .map(|r| ((r.get(0), r.get(1)), (r.get(2), r.get(3))))
        .collect();
    // Only this worker's tables: the conflicts of another deployment's
    // tables in the same database are not this region's to settle.
    let tables: Vec<String> = config
        .tables
        .iter()
        .map(|t| {
            let (s, t) = t.target_parts();
            format!("{s}.{t}")
        })
        .collect();
    let rows = client
        .query(
            "SELECT table_name || ', ' || resolution, count(*) FROM regionsync.conflicts
              WHERE resolved_at IS NULL AND table_name = ANY($1) GROUP BY 1 ORDER BY 1",
            &[&tables],
        )
        .await?;
    let conflicts = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    Ok((stored, conflicts))
}

/// `Ok(Err(why))`: the worker answered, not ready; `Err`: it did not answer.
async fn worker_readiness(base: &str) -> anyhow::Result<Result<(), String>> {
    let url = format!("{}/readyz", base.trim_end_matches('/'));
    let resp = reqwest::Client::builder()
        .timeout(ANSWER_WITHIN)
        .build()?
        .get(&url)
        .send()
        .await
        .map_err(|e| anyhow::anyhow!("worker unreachable: {url}: {e}"))?;
    let ok = resp.status().is_success();
    let body = resp.text().await.unwrap_or_default();
    Ok(if ok {
        Ok(())
    } else {
        Err(body.trim().trim_start_matches("not ready: ").to_string())
    })
}

fn kafka_positions(
    kafka: rdkafka::ClientConfig,
    topics: Vec<(String, String, Option<usize>)>,
    stored: Stored,
    now_ms: i64,
) -> anyhow::Result<Vec<(PartitionState, Option<i64>)>> {
    let consumer: BaseConsumer = kafka
        .clone()
        .set("group.id", "regionsync-failover-check")
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .create()
        .context("creating a Kafka client")?;
    let metadata = consumer
        .fetch_metadata(None, ANSWER_WITHIN)
        .map_err(|e| anyhow::anyhow!("Kafka unreachable: {e}"))?;
    let mut out = Vec::new();
    for (topic, source_region, table) in topics {
        let Some(t) = metadata.topics().iter().find(|t| t.name() == topic) else {
            // Not mirrored here yet: nothing of it to apply. A missing
            // heartbeat topic shows as a missing heartbeat.
            continue;
        };
        for p in t.partitions() {
            let (low, high) = consumer
                .fetch_watermarks(&topic, p.id(), ANSWER_WITHIN)
                .map_err(|e| anyhow::anyhow!("Kafka: watermarks of {topic}/{}: {e}", p.id()))?;
            let (next, newest) = stored
                .get(&(topic.clone(), p.id()))
                .copied()
                .unwrap_or((low, None));
            let behind = (high - next.max(low)).max(0);
            let seconds_behind = if behind > 0 {
                first_message_age(&consumer, &topic, p.id(), next.max(low), now_ms)
            } else {
                None
            };
            let state = PartitionState {
                topic: topic.clone(),
                partition: p.id(),
                source_region: source_region.clone(),
                heartbeat: table.is_none(),
                messages_behind: behind,
                seconds_behind,
            };
            out.push((state, newest));
        }
    }
    Ok(out)
}

/// The age of the message at `offset` by its Kafka timestamp (MirrorMaker
/// 2 keeps the source record's), if it can be read within a few seconds.
fn first_message_age(
    consumer: &BaseConsumer,
    topic: &str,
    partition: i32,
    offset: i64,
    now_ms: i64,
) -> Option<f64> {
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, partition, Offset::Offset(offset))
        .ok()?;
    consumer.assign(&tpl).ok()?;
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while std::time::Instant::now() < deadline {
        if let Some(Ok(msg)) = consumer.poll(Duration::from_millis(200)) {
            if msg.topic() == topic && msg.partition() == partition {
                let ts = msg.timestamp().to_millis()?;
                return Some(((now_ms - ts).max(0)) as f64 / 1000.0);
            }
        }
    }
    None
}

/// Runs the command: prints the report (JSON with `json`), returns the
/// exit code.
pub async fn run(config: &Config, worker_url: &str, max_lag: Duration, json: bool) -> u8 {
    let report = check(config, worker_url, max_lag).await;
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&report)
                .unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
        );
    } else {
        print!("{}", report.render());
    }
    report.exit_code()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn healthy() -> Facts {
        Facts {
            partitions: vec![PartitionState {
                topic: "us-east-1.cdc.public.users".into(),
                partition: 0,
                source_region: "us-east-1".into(),
                heartbeat: false,
                messages_behind: 0,
                seconds_behind: None,
            }],
            heartbeat_age: [("us-east-1".to_string(), Some(2.5))].into(),
            worker_ready: Ok(()),
            unsettled_conflicts: BTreeMap::new(),
        }
    }

    const LIMIT: Duration = Duration::from_secs(30);

    #[test]
    fn a_healthy_region_may_take_over() {
        assert_eq!(evaluate(&healthy(), LIMIT), vec![]);
        // Changes in flight, young: still fine.
        let mut f = healthy();
        f.partitions[0].messages_behind = 40;
        f.partitions[0].seconds_behind = Some(1.0);
        assert_eq!(evaluate(&f, LIMIT), vec![]);
    }

    #[test]
    fn a_stale_heartbeat_names_its_source_region() {
        let mut f = healthy();
        f.heartbeat_age.insert("us-east-1".into(), Some(45.0));
        f.heartbeat_age.insert("ap-south-1".into(), None);
        let r = evaluate(&f, LIMIT);
        assert_eq!(r.len(), 2, "{r:?}");
        assert_eq!(r[0].kind, "no_heartbeat");
        assert_eq!(r[0].source_region.as_deref(), Some("ap-south-1"));
        assert_eq!(r[1].kind, "heartbeat_stale");
        assert_eq!(r[1].source_region.as_deref(), Some("us-east-1"));
        assert_eq!(r[1].seconds_behind, Some(45.0));
        assert!(r[1].detail.contains("45 s old"), "{}", r[1].detail);
    }

    #[test]
    fn a_partition_behind_gives_messages_and_seconds() {
        let mut f = healthy();
        f.partitions[0].messages_behind = 1200;
        f.partitions[0].seconds_behind = Some(95.0);
        let r = evaluate(&f, LIMIT);
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].kind, "partition_behind");
        assert_eq!(r[0].messages_behind, Some(1200));
        assert_eq!(r[0].partition, Some(0));
        assert!(
            r[0].detail.contains("1200 messages behind"),
            "{}",
            r[0].detail
        );
        // Behind by an unknown time: not taken as fine.
        f.partitions[0].seconds_behind = None;
        assert_eq!(evaluate(&f, LIMIT)[0].kind, "partition_behind");
    }

    #[test]
    fn an_unready_worker_and_unsettled_conflicts_are_reasons() {
        let mut f = healthy();
        f.worker_ready = Err("partition us-east-1.cdc.public.users/0 held".into());
        f.unsettled_conflicts.insert("public.users, open".into(), 3);
        let kinds: Vec<_> = evaluate(&f, LIMIT).iter().map(|r| r.kind).collect();
        assert_eq!(kinds, ["worker_not_ready", "unsettled_conflicts"]);
    }
}
