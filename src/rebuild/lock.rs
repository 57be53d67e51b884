//! The lock that keeps a rebuild into the live tables and the worker
//! apart: every running worker holds a shared PostgreSQL advisory lock,
//! keyed by its consumer group, on a connection of its own for its whole
//! life; `regionsync rebuild` (without `--shadow`) takes the same lock
//! exclusively, so it refuses while a worker of the group runs, and a
//! worker started during a rebuild waits until it is done. A second key
//! keeps rebuilds of a group one at a time, whatever their mode.

use std::time::Duration;

use tracing::warn;

use crate::apply::session;
use crate::config::Config;

/// The lock's key: a 64-bit hash of the worker's consumer group.
const KEY_SQL: &str = "hashtextextended('regionsync worker ' || $1, 0)";

/// A connection that holds the lock; dropping it (and its one-connection
/// pool, which would otherwise keep the session open) releases the lock.
pub struct Held {
    _client: deadpool_postgres::Object,
    _pool: deadpool_postgres::Pool,
}

async fn connection(
    config: &Config,
) -> anyhow::Result<(deadpool_postgres::Pool, deadpool_postgres::Object)> {
    let mut one = config.clone();
    one.postgres.pool_size = 1;
    let pool = session::plain_pool(&one)?;
    let client = pool
        .get()
        .await
        .map_err(|e| anyhow::anyhow!(crate::apply::tls::explain_pool(&e, &config.postgres)))?;
    Ok((pool, client))
}

/// The worker's side: waits until no rebuild of its group runs, then
/// holds the shared lock.
pub async fn hold_as_worker(config: &Config) -> anyhow::Result<Held> {
    let group = config.consumer_group();
    let (pool, client) = connection(config).await?;
    loop {
        let got: bool = client
            .query_one(
                &format!("SELECT pg_try_advisory_lock_shared({KEY_SQL})"),
                &[&group],
            )
            .await?
            .get(0);
        if got {
            return Ok(Held {
                _client: client,
                _pool: pool,
            });
        }
        warn!(group = %group, "a regionsync rebuild of this region is running; the worker starts when it is done");
        tokio::time::sleep(Duration::from_secs(5)).await;
    }
}

/// The rebuild's side: the lock exclusively, or `Err` saying that a
/// worker runs.
pub async fn take_for_rebuild(config: &Config) -> anyhow::Result<Held> {
    let group = config.consumer_group();
    let (pool, client) = connection(config).await?;
    let got: bool = client
        .query_one(
            &format!("SELECT pg_try_advisory_lock({KEY_SQL})"),
            &[&group],
        )
        .await?
        .get(0);
    if !got {
        anyhow::bail!(
            "a worker of consumer group {group} is running against this database (it holds the advisory lock \
             hashtextextended('regionsync worker {group}', 0)); a rebuild into the live tables needs it stopped: \
             stop the worker (or every replica of it), or rebuild with --shadow"
        );
    }
    Ok(Held {
        _client: client,
        _pool: pool,
    })
}

/// One rebuild of a group at a time, whatever its mode: a second one
/// (`--shadow` or not) refuses while one runs, since both write the same
/// offset rows and a shadow rebuild its shadow tables. `Err` says so.
pub async fn take_single_rebuild(config: &Config) -> anyhow::Result<Held> {
    let group = config.consumer_group();
    let (pool, client) = connection(config).await?;
    let got: bool = client
        .query_one(
            "SELECT pg_try_advisory_lock(hashtextextended('regionsync rebuild ' || $1, 0))",
            &[&group],
        )
        .await?
        .get(0);
    if !got {
        anyhow::bail!(
            "another `regionsync rebuild` of consumer group {group} is running against this database; \
             wait for it (or stop it: it resumes when run again)"
        );
    }
    Ok(Held {
        _client: client,
        _pool: pool,
    })
}
