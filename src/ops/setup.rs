//! `regionsync setup`: the regionsync schema in the target database
//! (idempotent), the triggers of every replicated table, and the checks of
//! what setup cannot fix itself (replica identity, grants), each reported
//! with the SQL to run.

use anyhow::Context as _;

use crate::apply::session::{mark_session_error, plain_pool, MARK_SESSION_SQL};
use crate::apply::TargetTable;
use crate::config::Config;

/// The SQL of the regionsync schema (offsets, tombstones, heartbeat, HLC
/// trigger function); idempotent.
pub const SCHEMA_SQL: &str = include_str!("../../schemas/regionsync.sql");

/// Installs on a replicated table the triggers of schemas/regionsync.sql
/// that it lacks (HLC stamping, tombstones, the truncate mark, and the CRDT
/// counters' components), and checks its replica identity. Returns what it
/// could not fix, with the SQL to run.
async fn ensure_triggers(
    client: &tokio_postgres::Client,
    config: &crate::config::TableConfig,
    table: &TargetTable,
) -> anyhow::Result<Vec<String>> {
    let mut problems = Vec::new();
    let literal = |s: &str| format!("'{}'", s.replace('\'', "''"));
    let keys: Vec<String> = table
        .key
        .iter()
        .map(|i| literal(&table.columns[*i].0))
        .collect();
    let keys = keys.join(", ");
    let ident = &table.ident;
    let mut wanted = vec![
        (
            "regionsync_stamp_hlc",
            format!("CREATE TRIGGER regionsync_stamp_hlc BEFORE INSERT OR UPDATE ON {ident} FOR EACH ROW EXECUTE FUNCTION regionsync.stamp_hlc({keys})"),
        ),
        (
            "regionsync_mark_deleted",
            format!("CREATE TRIGGER regionsync_mark_deleted AFTER DELETE ON {ident} FOR EACH ROW EXECUTE FUNCTION regionsync.mark_deleted({keys})"),
        ),
        (
            "regionsync_mark_truncated",
            format!("CREATE TRIGGER regionsync_mark_truncated AFTER TRUNCATE ON {ident} FOR EACH STATEMENT EXECUTE FUNCTION regionsync.mark_truncated()"),
        ),
    ];
    if !config.counters.is_empty() {
        let pairs: Vec<String> = config
            .counters
            .iter()
            .flat_map(|(c, p)| [literal(c), literal(p)])
            .collect();
        wanted.push((
            "regionsync_count_by_region",
            format!(
                "CREATE TRIGGER regionsync_count_by_region BEFORE INSERT OR UPDATE ON {ident} FOR EACH ROW EXECUTE FUNCTION regionsync.count_by_region({})",
                pairs.join(", ")
            ),
        ));
    }
    let present: Vec<String> = client
        .query(
            "SELECT tgname::text FROM pg_trigger WHERE tgrelid = $1::text::regclass AND NOT tgisinternal",
            &[ident],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    for (name, sql) in wanted {
        if present.iter().any(|p| p == name) {
            continue;
        }
        if let Err(e) = client.batch_execute(&sql).await {
            let detail = e
                .as_db_error()
                .map_or(e.to_string(), |d| d.message().to_string());
            problems.push(format!(
                "table {}: trigger {name} is missing and could not be created ({detail}); as the table's owner run: {sql}",
                table.name
            ));
        }
    }
    let identity: i8 = client
        .query_one(
            "SELECT relreplident::\"char\" FROM pg_class WHERE oid = $1::text::regclass",
            &[ident],
        )
        .await?
        .get(0);
    if identity != b'f' as i8 {
        problems.push(format!(
            "table {}: REPLICA IDENTITY is not FULL, so its events carry no before image (conflict detection, unchanged TOAST values and deletes need it); run: ALTER TABLE {ident} REPLICA IDENTITY FULL",
            table.name
        ));
    }
    Ok(problems)
}

/// What `setup` found: the problems it could not fix itself.
#[derive(Debug, Default)]
pub struct SetupReport {
    pub problems: Vec<String>,
}

/// Creates the regionsync schema and checks every configured table and the
/// role's right to apply as a replica.
pub async fn setup(config: &Config) -> anyhow::Result<SetupReport> {
    // Unmarked: a missing grant is a problem to report, not a failure.
    let pool = plain_pool(config)?;
    let client = pool.get().await.context("connecting to PostgreSQL")?;
    // The schema's DDL locks regionsync's tables; against running workers
    // it can deadlock (and is then rolled back whole): try again.
    let mut attempt = 1;
    loop {
        match client.batch_execute(SCHEMA_SQL).await {
            Ok(()) => break,
            Err(e)
                if attempt < 5
                    && e.code().is_some_and(|c| {
                        *c == tokio_postgres::error::SqlState::T_R_DEADLOCK_DETECTED
                    }) =>
            {
                attempt += 1;
                tokio::time::sleep(std::time::Duration::from_millis(200 * attempt)).await;
            }
            Err(e) => {
                return Err(e).context("creating the regionsync schema (schemas/regionsync.sql)")
            }
        }
    }
    let mut report = SetupReport::default();
    for t in &config.tables {
        match TargetTable::load(&**client, t, &config.regions).await {
            Ok(table) => report
                .problems
                .extend(ensure_triggers(&client, t, &table).await?),
            Err(e) => report.problems.push(e.to_string()),
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
    if let Err(e) = client.batch_execute(MARK_SESSION_SQL).await {
        report
            .problems
            .push(mark_session_error(&e, &config.postgres.user));
    }
    Ok(report)
}

/// The command: sets up, prints each problem, fails if there were any.
pub async fn run(config: &Config) -> anyhow::Result<()> {
    let report = setup(config).await?;
    if report.problems.is_empty() {
        println!("setup: ok");
        return Ok(());
    }
    for p in &report.problems {
        println!("setup: {p}");
    }
    anyhow::bail!("{} problem(s) need fixing", report.problems.len())
}
