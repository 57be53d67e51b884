//! Offsets: where each partition of each mirrored topic has been applied up
//! to, in `regionsync.offsets` of the target database. The row is written in
//! the same transaction as the batch it follows, so it is the source of truth:
//! on every assignment the worker resumes exactly there. Kafka's committed
//! offsets are written afterwards, for monitoring tools only.

use tokio_postgres::GenericClient;

/// The next offset to apply of `topic`/`partition` for `group`, if stored.
pub async fn load(
    client: &impl GenericClient,
    group: &str,
    topic: &str,
    partition: i32,
) -> Result<Option<i64>, tokio_postgres::Error> {
    let row = client
        .query_opt(
            "SELECT next_offset FROM regionsync.offsets
              WHERE consumer_group = $1 AND topic = $2 AND partition = $3",
            &[&group, &topic, &partition],
        )
        .await?;
    Ok(row.map(|r| r.get(0)))
}

/// Records `next_offset` inside the caller's transaction, with the newest
/// source commit time (ms) applied so far. Both only move forward: a worker
/// that lost the partition in a rebalance and commits late cannot move them
/// back.
pub async fn store(
    client: &impl deadpool_postgres::GenericClient,
    group: &str,
    topic: &str,
    partition: i32,
    next_offset: i64,
    source_ts_ms: Option<i64>,
) -> Result<(), tokio_postgres::Error> {
    let statement = client
        .prepare_cached(
            "INSERT INTO regionsync.offsets AS o
                    (consumer_group, topic, partition, next_offset, source_ts_ms, updated_at)
             VALUES ($1, $2, $3, $4, $5, now())
             ON CONFLICT (consumer_group, topic, partition) DO UPDATE
                SET next_offset = EXCLUDED.next_offset,
                    -- A stored time ahead of the clock (a source clock
                    -- ahead, before the worker capped such times) would
                    -- hold the newest time there for good: cap it first.
                    source_ts_ms = GREATEST(
                        LEAST(o.source_ts_ms, (extract(epoch FROM clock_timestamp()) * 1000)::bigint),
                        EXCLUDED.source_ts_ms),
                    updated_at = now()
              WHERE o.next_offset <= EXCLUDED.next_offset",
        )
        .await?;
    client
        .execute(
            &statement,
            &[&group, &topic, &partition, &next_offset, &source_ts_ms],
        )
        .await?;
    Ok(())
}

/// The newest source commit time (ms) `group` has applied from one
/// partition, as stored with its offset (None: nothing stored yet).
pub async fn newest_source_time(
    client: &impl deadpool_postgres::GenericClient,
    group: &str,
    topic: &str,
    partition: i32,
) -> Result<Option<i64>, tokio_postgres::Error> {
    let statement = client
        .prepare_cached(
            "SELECT source_ts_ms FROM regionsync.offsets
              WHERE consumer_group = $1 AND topic = $2 AND partition = $3",
        )
        .await?;
    Ok(client
        .query_opt(&statement, &[&group, &topic, &partition])
        .await?
        .and_then(|r| r.get(0)))
}

/// Per topic, the newest source commit time (ms) `group` has applied.
pub async fn newest_source_times(
    client: &impl GenericClient,
    group: &str,
) -> Result<Vec<(String, i64)>, tokio_postgres::Error> {
    let rows = client
        .query(
            "SELECT topic, max(source_ts_ms) FROM regionsync.offsets
              WHERE consumer_group = $1 AND source_ts_ms IS NOT NULL
              GROUP BY topic",
            &[&group],
        )
        .await?;
    Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
}

/// Why a partition cannot resume from its stored offset `stored`, given
/// the first (`low`) and next (`high`) offsets the topic holds now; `None`
/// when it can. Either way round, resuming would skip changes silently:
/// above the end, the topic was deleted and re-created (or emptied), and
/// every new message would be taken for one applied already; below the
/// start, retention deleted messages never applied here.
pub fn resume_problem(
    topic: &str,
    partition: i32,
    stored: i64,
    (low, high): (i64, i64),
) -> Option<(&'static str, String)> {
    if stored > high {
        Some((
            "beyond_end",
            format!(
                "{topic}/{partition}: the stored offset {stored} is above the partition's end \
                 ({high}): the topic was deleted and re-created, or emptied; its messages would \
                 be skipped as applied already. The partition is stopped (RUNBOOK.md, \
                 RegionsyncPartitionStopped)"
            ),
        ))
    } else if stored < low {
        Some((
            "retention_gap",
            format!(
                "{topic}/{partition}: the stored offset {stored} is below the partition's first \
                 offset ({low}): retention deleted {} messages never applied here. The partition \
                 is stopped (RUNBOOK.md, RegionsyncPartitionStopped)",
                low - stored
            ),
        ))
    } else {
        None
    }
}

/// Why a partition with no stored offset cannot start from the first
/// offset its topic holds, `low`; `None` when it can. A topic begins at 0:
/// above it, retention (a topic whose `cleanup.policy` deletes records,
/// `deletes`) deleted messages this region never applied. A compacted
/// topic keeps every key's last change, so its first offset says nothing
/// of a gap; `accept` is the operator's explicit `kafka.accept_missing_history`.
pub fn start_problem(
    topic: &str,
    partition: i32,
    low: i64,
    deletes: bool,
    accept: bool,
) -> Option<(&'static str, String)> {
    (low > 0 && deletes && !accept).then(|| {
        (
            "retention_gap",
            format!(
                "{topic}/{partition}: no stored offset (nothing applied here, so the first offset \
                 needed is 0), but the partition's first offset is {low}: retention deleted {low} \
                 messages never applied here. The partition is stopped (RUNBOOK.md, \
                 RegionsyncPartitionStopped; kafka.accept_missing_history starts it anyway)"
            ),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stored_offset_outside_the_topic_is_named_both_ways() {
        assert_eq!(resume_problem("t", 0, 5, (0, 10)), None);
        assert_eq!(resume_problem("t", 0, 10, (0, 10)), None, "caught up");
        assert_eq!(resume_problem("t", 0, 3, (3, 10)), None, "at the first");
        let (kind, why) = resume_problem("us-east-1.cdc.t", 2, 120, (0, 4)).unwrap();
        assert_eq!(kind, "beyond_end");
        assert!(why.contains("us-east-1.cdc.t/2") && why.contains("120") && why.contains("(4)"));
        let (kind, why) = resume_problem("t", 1, 7, (50, 90)).unwrap();
        assert_eq!(kind, "retention_gap");
        assert!(
            why.contains("t/1")
                && why.contains(" 7 ")
                && why.contains("(50)")
                && why.contains("43 messages")
        );
    }

    #[test]
    fn a_partition_without_a_stored_offset_is_checked_on_delete_policy_topics_only() {
        assert_eq!(start_problem("t", 0, 0, true, false), None, "a fresh topic");
        assert_eq!(
            start_problem("t", 0, 9, false, false),
            None,
            "compacted: the first offset is no gap signal"
        );
        assert_eq!(start_problem("t", 0, 9, true, true), None, "opted in");
        let (kind, why) = start_problem("us-east-1.cdc.t", 3, 25, true, false).unwrap();
        assert_eq!(kind, "retention_gap");
        assert!(
            why.contains("us-east-1.cdc.t/3")
                && why.contains("no stored offset")
                && why.contains("first offset is 25")
                && why.contains("25 messages")
                && why.contains("kafka.accept_missing_history"),
            "{why}"
        );
    }
}
