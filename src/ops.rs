//! Operations: `setup` (the regionsync schema in the target database and the
//! checks of the replicated tables), and the connection pool the worker and
//! the operations share. `rebuild`, `verify` and `failover-check`
//! (DESIGN.md §7) are still to come.

use anyhow::Context as _;
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};

use crate::apply::TargetTable;
use crate::config::Config;

/// The SQL of the regionsync schema (offsets, tombstones, heartbeat, HLC
/// trigger function); idempotent.
pub const SCHEMA_SQL: &str = include_str!("../schemas/regionsync.sql");

/// A pool of connections to the target database.
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
    Pool::builder(manager)
        .max_size(config.postgres.pool_size)
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
