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

/// Prefix of the replication origins the apply sessions run under.
pub const ORIGIN_PREFIX: &str = "regionsync_";

/// How many origins (`regionsync_0` … `regionsync_63`) the sessions of all
/// workers on one database share. PostgreSQL lets one session use an origin
/// at a time and keeps a shared-memory slot (out of `max_replication_slots`)
/// for each origin ever used until it is dropped, so the set is fixed: at
/// most this many slots, however often workers reconnect.
pub const ORIGINS: u32 = 64;

/// Marks the session with the first free origin of the set, so that this
/// region's Debezium tags every change the worker applies with
/// `source.origin`: the other regions then know it for a relay of a change
/// they receive directly, and skip it.
const MARK_SESSION_SQL: &str = "
DO $$
BEGIN
    FOR i IN 0..63 LOOP
        BEGIN
            IF pg_replication_origin_oid('regionsync_' || i) IS NULL THEN
                PERFORM pg_replication_origin_create('regionsync_' || i);
            END IF;
            PERFORM pg_replication_origin_session_setup('regionsync_' || i);
            -- fails here, at connect, if APPLY_TRANSACTION_SQL could not run
            PERFORM pg_replication_origin_xact_reset();
            RETURN;
        EXCEPTION
            -- used by another session right now, or created concurrently
            WHEN object_in_use OR unique_violation THEN NULL;
        END;
    END LOOP;
    RAISE EXCEPTION 'all 64 regionsync replication origins are in use'
        USING ERRCODE = 'configuration_limit_exceeded';
END
$$";

/// Settings of every apply session, made once when the pool connects.
///
/// The replication role is set for the session, not only per transaction:
/// PostgreSQL drops every cached statement of the session whenever the
/// role changes, so a bare `SET LOCAL` (and its reset at commit) had every
/// apply statement parsed and analysed again in each transaction.
///
/// The statements are planned on each execution all the same (custom
/// plans): a generic plan is made once, from the statistics of that moment,
/// and kept. Made while the tombstones table was empty, it scanned the
/// whole table once per row ever after (PostgreSQL CPU per 1M changes went
/// from 23 s to 96 s in `make bench`).
pub const APPLY_SESSION_SQL: &str =
    "SET session_replication_role = replica; SET plan_cache_mode = force_custom_plan";

/// The first statements of every apply transaction. The role is set again
/// for the transaction, to the session's value (so no plan is dropped): an
/// apply never runs without it. Under a session origin
/// PostgreSQL records as each transaction's commit timestamp the origin
/// timestamp of the session, which, unless reset, stays that of the
/// session's first commit: `pg_xact_commit_timestamp` of every later row
/// would be wrong (with `track_commit_timestamp = on`). Resetting it makes
/// it the local commit time; the source commit times are kept in the rows'
/// `hlc` and in `regionsync.offsets.source_ts_ms`.
pub const APPLY_TRANSACTION_SQL: &str =
    "SET LOCAL session_replication_role = replica; SELECT pg_replication_origin_xact_reset()";

/// Why marking a session failed, with what to do about it.
fn mark_session_error(e: &tokio_postgres::Error, user: &str) -> String {
    let code = e.code().map(|c| c.code()).unwrap_or_default();
    let detail = e
        .as_db_error()
        .map_or(e.to_string(), |d| d.message().to_string());
    match code {
        "42501" => format!(
            "marking the apply session with a replication origin: {detail}; as a superuser run: \
             GRANT EXECUTE ON FUNCTION pg_replication_origin_create(text), \
             pg_replication_origin_oid(text), pg_replication_origin_session_setup(text), \
             pg_replication_origin_xact_reset() TO {user}"
        ),
        "53400" => format!(
            "marking the apply session with a replication origin: {detail}; set max_replication_slots \
             to at least {ORIGINS}: it also bounds the replication origin states, and regionsync uses up to {ORIGINS} origins"
        ),
        _ => format!("marking the apply session with a replication origin: {detail}"),
    }
}

/// A pool of connections to the target database; every connection applies
/// under a replication origin of its own (`regionsync_0` … `regionsync_63`).
pub fn pool(config: &Config) -> anyhow::Result<Pool> {
    pool_with(config, true)
}

/// A pool of connections without a replication origin, for local writes
/// that every region must apply (`conflict::resolve`).
pub fn plain_pool(config: &Config) -> anyhow::Result<Pool> {
    pool_with(config, false)
}

fn pool_with(config: &Config, mark_sessions: bool) -> anyhow::Result<Pool> {
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
    let mut builder = Pool::builder(manager).max_size(config.postgres.pool_size);
    if mark_sessions {
        builder = builder.post_create(Hook::async_fn(move |client, _| {
            let user = user.clone();
            Box::pin(async move {
                client
                    .batch_execute(MARK_SESSION_SQL)
                    .await
                    .map_err(|e| HookError::Message(mark_session_error(&e, &user).into()))?;
                client.batch_execute(APPLY_SESSION_SQL).await.map_err(|e| {
                    let detail = e
                        .as_db_error()
                        .map_or(e.to_string(), |d| d.message().to_string());
                    HookError::Message(
                        format!("setting up the apply session ({APPLY_SESSION_SQL}): {detail}")
                            .into(),
                    )
                })
            })
        }));
    }
    builder.build().context("building the PostgreSQL pool")
}

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
    let pool = pool_with(config, false)?;
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
