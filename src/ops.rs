//! Operations: `setup` (the regionsync schema in the target database and the
//! checks of the replicated tables), and the connection pool the worker and
//! the operations share. `rebuild`, `verify` and `failover-check`
//! (DESIGN.md §7) are still to come.

use anyhow::Context as _;
use deadpool_postgres::{Hook, HookError, Manager, ManagerConfig, Pool, RecyclingMethod};

use crate::apply::TargetTable;
use crate::config::Config;

/// The SQL of the regionsync schema (offsets, tombstones, heartbeat, HLC
/// trigger function); idempotent.
pub const SCHEMA_SQL: &str = include_str!("../schemas/regionsync.sql");

/// Prefix of the replication origin each apply session runs under.
pub const ORIGIN_PREFIX: &str = "regionsync_";

/// Marks the session with a replication origin of its own (PostgreSQL allows
/// one session per origin), so that this region's Debezium tags every change
/// the worker applies with `source.origin`: the other regions then know it
/// for a relay of a change they receive directly, and skip it.
const MARK_SESSION_SQL: &str = "
    SELECT pg_replication_origin_create(o.name)
      FROM (SELECT 'regionsync_' || pg_backend_pid() AS name) o
     WHERE pg_replication_origin_oid(o.name) IS NULL;
    SELECT pg_replication_origin_session_setup('regionsync_' || pg_backend_pid());";

/// A pool of connections to the target database; every connection applies
/// under its own replication origin (`regionsync_<backend pid>`).
pub fn pool(config: &Config) -> anyhow::Result<Pool> {
    let mut pg = tokio_postgres::Config::new();
    pg.host(&config.postgres.host)
        .port(config.postgres.port)
        .dbname(&config.postgres.dbname)
        .user(&config.postgres.user)
        .application_name("regionsync")
        .connect_timeout(std::time::Duration::from_secs(5));
    if let Some(p) = config.postgres_password()? {
        pg.password(p.expose());
    }
    let manager = Manager::from_config(
        pg,
        tokio_postgres::NoTls,
        ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        },
    );
    let user = config.postgres.user.clone();
    Pool::builder(manager)
        .max_size(config.postgres.pool_size)
        .post_create(Hook::async_fn(move |client, _| {
            let user = user.clone();
            Box::pin(async move {
                client.batch_execute(MARK_SESSION_SQL).await.map_err(|e| {
                    HookError::Message(format!(
                        "marking the apply session with a replication origin: {e}; as a superuser run: \
                         GRANT EXECUTE ON FUNCTION pg_replication_origin_create(text), \
                         pg_replication_origin_oid(text), pg_replication_origin_session_setup(text) TO {user}"
                    ).into())
                })
            })
        }))
        .build()
        .context("building the PostgreSQL pool")
}

/// What `setup` found: the problems it could not fix itself.
#[derive(Debug, Default)]
pub struct SetupReport {
    pub problems: Vec<String>,
}

/// Creates the regionsync schema and checks every configured table and the
/// role's right to apply as a replica.
pub async fn setup(config: &Config) -> anyhow::Result<SetupReport> {
    let pool = pool(config)?;
    let client = pool.get().await.context("connecting to PostgreSQL")?;
    client
        .batch_execute(SCHEMA_SQL)
        .await
        .context("creating the regionsync schema (schemas/regionsync.sql)")?;
    let mut report = SetupReport::default();
    for t in &config.tables {
        if let Err(e) = TargetTable::load(&**client, t).await {
            report.problems.push(e.to_string());
        }
    }
    if let Err(e) = client
        .batch_execute("BEGIN; SET LOCAL session_replication_role = replica; ROLLBACK")
        .await
    {
        let _ = client.batch_execute("ROLLBACK").await;
        report.problems.push(format!(
            "role {} may not set session_replication_role ({e}); as a superuser run: GRANT SET ON PARAMETER session_replication_role TO {}",
            config.postgres.user, config.postgres.user
        ));
    }
    Ok(report)
}
