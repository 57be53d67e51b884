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
