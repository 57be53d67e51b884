//! The tombstone collector's statement: a delete's tombstone guards its key
//! against older upserts for `tombstone_grace`; after that it is removed,
//! in chunks so that no statement holds many locks for long.

use std::time::Duration;

use tokio_postgres::GenericClient;

/// Rows removed per statement.
const CHUNK: u64 = 10_000;

/// Removes the tombstones of `tables` deleted (local time) more than
/// `grace` ago; returns how many.
pub async fn collect(
    client: &impl GenericClient,
    tables: &[String],
    grace: Duration,
) -> Result<u64, tokio_postgres::Error> {
    let mut total = 0u64;
    loop {
        let n = client
            .execute(
                "WITH old AS (
                    SELECT table_name, row_key FROM regionsync.tombstones
                     WHERE table_name = ANY($2) AND deleted_at < now() - make_interval(secs => $1)
                     LIMIT 10000)
                 DELETE FROM regionsync.tombstones ts USING old
                  WHERE ts.table_name = old.table_name AND ts.row_key = old.row_key",
                &[&grace.as_secs_f64(), &tables],
            )
            .await?;
        total += n;
        if n < CHUNK {
            return Ok(total);
        }
    }
}
