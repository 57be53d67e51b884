//! The copies a benchmark run applies into: empty copies of `users` in
//! region B's schema `bench`, created fresh before each run and dropped
//! with their tombstones after it, and the target table the worker would
//! load for one.

use regionsync::apply::TargetTable;
use regionsync::config::{TableConfig, SHARED};
use tokio_postgres::Client;

use crate::stack::{region_a, region_b};

/// The replicas live in schema `bench`, outside the `regionsync_cdc`
/// publication (which covers `public`): otherwise region B's own Debezium
/// would capture every applied row and compete for the two cores, measuring
/// the stack rather than the apply path.
pub const BENCH_SCHEMA_SQL: &str = "CREATE SCHEMA IF NOT EXISTS bench;
     GRANT USAGE ON SCHEMA bench TO regionsync;";

/// An empty copy of `public.users` in B's schema `bench`, writable by the
/// `regionsync` role (which the JDBC sink uses too).
pub async fn fresh_copy(b_admin: &Client, copy: &str) {
    b_admin
        .batch_execute(&format!(
            "{BENCH_SCHEMA_SQL}
             DROP TABLE IF EXISTS bench.{copy};
             CREATE TABLE bench.{copy} (LIKE public.users INCLUDING DEFAULTS INCLUDING CONSTRAINTS INCLUDING INDEXES);
             GRANT ALL ON bench.{copy} TO regionsync;
             {}",
            forget_copy_sql(copy)
        ))
        .await
        .unwrap_or_else(|e| panic!("create bench.{copy}: {e}"));
    // Each timed run starts with no checkpoint pending from the last one.
    b_admin
        .batch_execute("CHECKPOINT")
        .await
        .expect("checkpoint");
}

/// Removes a verified copy and its tombstones, so that the next run finds
/// the database as this one did.
pub async fn drop_copy(b_admin: &Client, copy: &str) {
    b_admin
        .batch_execute(&format!(
            "DROP TABLE IF EXISTS bench.{copy}; {}",
            forget_copy_sql(copy)
        ))
        .await
        .unwrap_or_else(|e| panic!("drop bench.{copy}: {e}"));
    b_admin
        .batch_execute("VACUUM regionsync.tombstones")
        .await
        .expect("vacuum");
}

/// Forgets what an earlier run of a copy left in regionsync's schema: its
/// tombstones would otherwise refuse the replay's older inserts (less work
/// than an empty copy really takes) and its truncation marks everything.
pub fn forget_copy_sql(copy: &str) -> String {
    format!(
        "DELETE FROM regionsync.tombstones WHERE table_name = 'bench.{copy}';
         DELETE FROM regionsync.truncations WHERE table_name = 'bench.{copy}';"
    )
}

/// The target table `target` in region B, a copy of `users` keyed by `id`,
/// as the worker loads it (shared affinity, last writer wins).
pub async fn users_copy_target(b: &Client, target: &str) -> TargetTable {
    let config = TableConfig {
        topics: vec![],
        target: target.into(),
        key: vec!["id".into()],
        columns: Default::default(),
        source_table: None,
        affinity: SHARED.into(),
        home_region_column: None,
        policy: Default::default(),
        residency: vec![],
        counters: Default::default(),
        ignore_columns: vec![],
        on_schema_mismatch: None,
    };
    let regions = [region_a(), region_b()];
    TargetTable::load(b, &config, &regions)
        .await
        .unwrap_or_else(|e| panic!("target table {target} in region B: {e}"))
}
