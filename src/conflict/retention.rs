//! Retention of recorded conflicts (`conflicts.retention`): a resolved
//! conflict (settled by its policy at once, or by `regionsync conflicts
//! resolve`, or a rejected write whose home row was written again) is
//! deleted once it has been resolved for longer than the retention; an
//! unresolved one is kept however old, and counted, since it still waits
//! for someone (`regionsync_conflicts_unresolved`).

use std::time::Duration;

use tokio_postgres::GenericClient;

/// Rows deleted per statement: short transactions beside the apply.
const CHUNK: i64 = 5_000;

/// Deletes the conflicts resolved more than `retention` ago, in chunks;
/// returns how many. Replicas of one region's worker may run it at once:
/// a row another one is deleting is skipped, not waited for.
pub async fn prune(client: &impl GenericClient, retention: Duration) -> anyhow::Result<u64> {
    let mut deleted = 0;
    loop {
        let n = client
            .execute(
                "WITH old AS (
                     SELECT id FROM regionsync.conflicts
                      WHERE resolved_at < now() - make_interval(secs => $1)
                      ORDER BY resolved_at LIMIT $2
                        FOR UPDATE SKIP LOCKED)
                 DELETE FROM regionsync.conflicts c USING old WHERE c.id = old.id",
                &[&retention.as_secs_f64(), &CHUNK],
            )
            .await?;
        deleted += n;
        if n < CHUNK as u64 {
            return Ok(deleted);
        }
    }
}

/// The unresolved conflicts per table name, of every table that has any.
pub async fn unresolved(client: &impl GenericClient) -> anyhow::Result<Vec<(String, i64)>> {
    let rows = client
        .query(
            "SELECT table_name, count(*) FROM regionsync.conflicts
              WHERE resolved_at IS NULL GROUP BY table_name",
            &[],
        )
        .await?;
    Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
}
