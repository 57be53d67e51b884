//! The connections to the target database: the apply pool, whose every
//! connection runs under a replication origin of its own and with the apply
//! session's settings, and the plain pool for local writes every region
//! must apply. Every command connects through here, with the one TLS
//! connector of `postgres.sslmode` (`tls`).

use std::time::Duration;

use anyhow::Context as _;
use deadpool_postgres::{Hook, HookError, Manager, ManagerConfig, Pool, RecyclingMethod};

use crate::config::Config;

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
pub(crate) const MARK_SESSION_SQL: &str = "
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
pub(crate) fn mark_session_error(e: &tokio_postgres::Error, user: &str) -> String {
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
        .connect_timeout(config.postgres.connect_timeout)
        .keepalives(true)
        .keepalives_idle(config.postgres.keepalives_idle)
        .keepalives_interval((config.postgres.keepalives_idle / 3).max(Duration::from_secs(1)))
        .keepalives_retries(3);
    if !config.postgres.tcp_user_timeout.is_zero() {
        pg.tcp_user_timeout(config.postgres.tcp_user_timeout);
    }
    if mark_sessions {
        // Apply statements only: a statement that hangs (a lock held
        // elsewhere, a stalled server) is cancelled (57014) and its batch
        // retried with the backoff.
        pg.options(format!(
            "-c statement_timeout={}",
            config.postgres.statement_timeout.as_millis()
        ));
    }
    if let Some(addr) = &config.postgres.hostaddr {
        pg.hostaddr(
            addr.parse()
                .with_context(|| format!("postgres.hostaddr {addr:?}"))?,
        );
    }
    if let Some(p) = config.postgres_password()? {
        pg.password(p.expose());
    }
    let manager = Manager::from_connect(
        pg,
        super::tls::connector(&config.postgres)?,
        ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        },
    );
    let user = config.postgres.user.clone();
    let mut builder = Pool::builder(manager)
        .max_size(config.postgres.pool_size)
        // A connection that never comes is a transient fault like any other.
        .wait_timeout(Some(config.postgres.pool_wait_timeout))
        .create_timeout(Some(config.postgres.connect_timeout * 2))
        .runtime(deadpool_postgres::Runtime::Tokio1);
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
