//! `regionsync rebuild` on the real two-region stack: region B's copy of a
//! fresh users-shaped table, written in both regions, lost and replayed
//! from the topics, then checked with `regionsync verify` against A.
mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, TopicPartitionList};
use support::kit::*;
use support::*;

/// A worker config file for `region`, replicating the table from the
/// other region's topic (`table_extra` into its `[[tables]]` entry).
fn config_file(region: &Region, table: &TestTable, suffix: &str, apply_extra: &str) -> PathBuf {
    config_file_with(region, table, suffix, apply_extra, "")
}

/// [`config_file`], with `table_extra` in the table's `[[tables]]` entry.
fn config_file_with(
    region: &Region,
    table: &TestTable,
    suffix: &str,
    apply_extra: &str,
    table_extra: &str,
) -> PathBuf {
    let dir = repo_root().join("target/test-configs");
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(format!("{}-{}-{suffix}.toml", table.name, region.name));
    let toml = worker_toml_for(region, table, table_extra)
        .replace("[apply]", &format!("[apply]\n{apply_extra}"));
    std::fs::write(&path, toml).unwrap();
    path
}

fn regionsync(config: &Path, args: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_regionsync"));
    cmd.arg("--config")
        .arg(config)
        .args(args)
        .env("PGPASSWORD", stack_env::REGIONSYNC_PASSWORD.get())
        .env("RUST_LOG", "info,rdkafka=warn")
        .env("NO_COLOR", "1");
    cmd
}

fn output(config: &Path, args: &[&str]) -> Output {
    tokio::task::block_in_place(|| regionsync(config, args).output()).expect("run regionsync")
}

fn text(out: &Output) -> String {
    format!(
        "exit {:?}\n{}{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// `verify` of B against A: its exit code and output.
fn verify(config_b: &Path, table: &TestTable) -> (i32, String) {
    let against = format!(
        "host={} port={} dbname=app user=regionsync sslmode=disable",
        stack_env::HOST,
        region_a().pg_port
    );
    let out = output(
        config_b,
        &[
            "verify",
            "--against",
            &against,
            "--table",
            &format!("public.{}", table.name),
        ],
    );
    (out.status.code().unwrap_or(-1), text(&out))
}

fn start_worker(region: &Region, table: &TestTable) -> Worker {
    Worker::start(
        regionsync::config::Config::from_toml(&worker_toml_for(region, table, ""))
            .expect("valid config"),
    )
}

/// Loses B's copy, as a restore gone wrong would: the table truncated
/// bypassing the triggers (no truncate mark). Not row deletes: Debezium
/// would carry those to A as changes.
async fn lose_b(table: &TestTable) {
    admin_db(&region_b())
        .await
        .batch_execute(&format!(
            "BEGIN; SET LOCAL session_replication_role = replica; TRUNCATE {}; COMMIT",
            table.name
        ))
        .await
        .expect("empty B");
}

async fn count(region: &Region, table: &TestTable) -> i64 {
    app_db(region)
        .await
        .query_one(&format!("SELECT count(*) FROM {}", table.name), &[])
        .await
        .unwrap()
        .get(0)
}

/// Writes in both regions: inserts, updates and deletes in A, and rows of
/// B's own (inserted and updated in B), so B's copy needs its own topic too.
async fn write_both(table: &TestTable, rows: i64) -> i64 {
    let first = fresh_key();
    insert_users(table, first, rows).await;
    write_mixed(table, 400, 300, first as u64).await;
    let b = app_db(&region_b()).await;
    b.execute(
        &format!(
            "INSERT INTO {} (id, email) SELECT g, 'b' || g || '@example.com' FROM generate_series($1::bigint, $1::bigint + 199) g",
            table.name
        ),
        &[&(first + 10_000_000)],
    )
    .await
    .expect("insert in B");
    b.execute(
        &format!(
            "UPDATE {} SET display_name = 'changed in B' WHERE id % 7 = 0",
            table.name
        ),
        &[],
    )
    .await
    .expect("update in B");
    first
}

#[tokio::test(flavor = "multi_thread")]
async fn a_lost_copy_is_rebuilt_from_both_regions_topics_and_verifies_equal() {
    let table = TestTable::create("rebuild").await;
    let (a, b) = (
        start_worker(&region_a(), &table),
        start_worker(&region_b(), &table),
    );
    write_both(&table, 1_000).await;
    table.wait_converged(Duration::from_secs(120)).await;
    let config_b = config_file(&region_b(), &table, "rebuild", "");

    // Refused while B's worker runs.
    let out = output(&config_b, &["rebuild"]);
    assert!(!out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("is running"), "{}", text(&out));

    b.stop().await;
    lose_b(&table).await;
    assert_eq!(count(&region_b(), &table).await, 0);
    let (code, report) = verify(&config_b, &table);
    assert_eq!(code, 1, "{report}");

    let out = output(&config_b, &["rebuild"]);
    assert!(out.status.success(), "{}", text(&out));
    let (code, report) = verify(&config_b, &table);
    assert_eq!(code, 0, "{report}");
    assert_eq!(table.rows(&region_a()).await, table.rows(&region_b()).await);

    // Done: a second run does nothing.
    let out = output(&config_b, &["rebuild"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("nothing to do"), "{}", text(&out));

    // The worker takes over from where it was, and A was not disturbed.
    let b = start_worker(&region_b(), &table);
    app_db(&region_a())
        .await
        .execute(
            &format!(
                "UPDATE {} SET age = 99 WHERE id IN (SELECT id FROM {0} ORDER BY id LIMIT 5)",
                table.name
            ),
            &[],
        )
        .await
        .unwrap();
    table.wait_converged(Duration::from_secs(60)).await;
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_rebuild_killed_three_times_resumes_and_ends_equal() {
    let table = TestTable::create("rebuild_kill").await;
    let (a, b) = (
        start_worker(&region_a(), &table),
        start_worker(&region_b(), &table),
    );
    write_both(&table, 30_000).await;
    table.wait_converged(Duration::from_secs(180)).await;
    b.stop().await;
    lose_b(&table).await;
    // Small batches: many commits to be killed between.
    let config_b = config_file(&region_b(), &table, "kill", "batch_max_rows = 300");
    let mut seen = 0;
    for kill in 1..=3 {
        // Small chunks too: a commit every 2,000 changes.
        let mut child = regionsync(&config_b, &["rebuild", "--chunk", "2000"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start rebuild");
        // Killed once it made progress past the last kill.
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let n = count(&region_b(), &table).await;
            if n > seen + 500 {
                seen = n;
                break;
            }
            assert!(
                Instant::now() < deadline && child.try_wait().unwrap().is_none(),
                "kill {kill}: the rebuild made no progress past {seen} rows (or ended first)"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        child.kill().expect("kill -9");
        child.wait().unwrap();
        eprintln!("killed the rebuild at {seen} rows");
    }
    let out = output(&config_b, &["rebuild"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        !text(&out).contains("nothing to do"),
        "it resumed: {}",
        text(&out)
    );
    let (code, report) = verify(&config_b, &table);
    assert_eq!(code, 0, "{report}");
    a.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_topic_without_its_whole_history_is_refused() {
    let table = TestTable::create("rebuild_hist").await;
    // The table's own topic in B: a deleting topic whose first records
    // were deleted.
    let topic = format!("hist.public.{}", table.name);
    let b = region_b();
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", &b.kafka)
        .create()
        .unwrap();
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    admin
        .create_topics(
            &[
                NewTopic::new(&topic, 1, TopicReplication::Fixed(1))
                    .set("cleanup.policy", "delete"),
            ],
            &options,
        )
        .await
        .unwrap();
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &b.kafka)
        .create()
        .unwrap();
    for i in 0..3 {
        producer
            .send(
                FutureRecord::to(&topic).key(&format!("{i}")).payload("{}"),
                Duration::from_secs(10),
            )
            .await
            .unwrap();
    }
    let mut upto = TopicPartitionList::new();
    upto.add_partition_offset(&topic, 0, rdkafka::Offset::Offset(2))
        .unwrap();
    admin.delete_records(&upto, &options).await.unwrap();

    let dir = repo_root().join("target/test-configs");
    let config = dir.join(format!("{}-hist.toml", table.name));
    std::fs::write(
        &config,
        worker_toml_for(&b, &table, "").replace(
            &format!("topics = [\"cdc.public.{}\"]", table.name),
            &format!("topics = [\"{topic}\"]"),
        ),
    )
    .unwrap();
    let out = output(&config, &["rebuild"]);
    let said = text(&out);
    assert!(!out.status.success(), "{said}");
    assert!(
        said.contains(&format!("topic {topic} (cleanup.policy=delete) no longer holds its whole history: partition 0 starts at offset 2")),
        "{said}"
    );
    assert!(said.contains("incremental snapshot"), "{said}");
}

/// A config for B's `rebuild --shadow`: B's worker config with an
/// owner-level role (the swap renames, drops and re-owns the table).
fn owner_config_file(table: &TestTable, suffix: &str, apply_extra: &str) -> PathBuf {
    let path = config_file(&region_b(), table, suffix, apply_extra);
    let toml = std::fs::read_to_string(&path)
        .unwrap()
        .replace("user = \"regionsync\"", "user = \"postgres\"");
    std::fs::write(&path, toml).unwrap();
    path
}

/// Changes one of A's rows in B only, as a bad restore would: bypassing
/// the triggers (its version and origin kept) and under a replication
/// origin named like a worker's, so B's capture marks it as a relay, which
/// A's worker and B's rebuild skip: it is in no change of the topics.
/// (`write_both` made the rows whose id is a multiple of 7 B's: the next
/// other id from `near`.)
async fn corrupt_b(table: &TestTable, near: i64) {
    let id = (near..).find(|i| i % 7 != 0).unwrap();
    admin_db(&region_b())
        .await
        .batch_execute(&format!(
            "DO $$ BEGIN
                 IF NOT EXISTS (SELECT 1 FROM pg_replication_origin WHERE roname = 'regionsync_test_corrupt') THEN
                     PERFORM pg_replication_origin_create('regionsync_test_corrupt');
                 END IF;
             END $$;
             SELECT pg_replication_origin_session_setup('regionsync_test_corrupt');
             BEGIN; SET LOCAL session_replication_role = replica;
             UPDATE {} SET display_name = 'corrupted in B' WHERE id = {id}; COMMIT;
             SELECT pg_replication_origin_session_reset();",
            table.name
        ))
        .await
        .expect("corrupt B");
}

/// Adds 1 to `age` of `keys` in `region`, round robin, until `stop`;
/// returns how many increments committed.
fn increment_until(
    region: Region,
    table: String,
    keys: Vec<i64>,
    insert_from: Option<i64>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> tokio::task::JoinHandle<(i64, i64)> {
    tokio::spawn(async move {
        let db = app_db(&region).await;
        let (mut increments, mut inserted) = (0i64, 0i64);
        let mut i = 0;
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            let id = keys[i % keys.len()];
            let n = db
                .execute(
                    &format!("UPDATE {table} SET age = age + 1 WHERE id = $1"),
                    &[&id],
                )
                .await
                .expect("increment");
            assert_eq!(n, 1, "{table} key {id} in {}", region.name);
            increments += 1;
            if let Some(first) = insert_from {
                if i % 5 == 0 {
                    db.execute(
                        &format!("INSERT INTO {table} (id, email) VALUES ($1, 'late@example.com')"),
                        &[&(first + inserted)],
                    )
                    .await
                    .expect("insert");
                    inserted += 1;
                }
            }
            i += 1;
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        (increments, inserted)
    })
}

async fn age_sum(region: &Region, table: &TestTable, keys: &[i64]) -> i64 {
    app_db(region)
        .await
        .query_one(
            &format!(
                "SELECT coalesce(sum(age), 0)::bigint FROM {} WHERE id = ANY($1)",
                table.name
            ),
            &[&keys],
        )
        .await
        .unwrap()
        .get(0)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_shadow_rebuild_swaps_in_while_the_worker_applies_and_loses_nothing() {
    use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
    use std::sync::Arc;
    let table = TestTable::create("rebuild_shadow").await;
    let (a, b) = (
        start_worker(&region_a(), &table),
        start_worker(&region_b(), &table),
    );
    let first = write_both(&table, 2_000).await;
    // Counters: keys written in A only, and keys of B's own written in B
    // only (so no conflicts), all starting at 0.
    let a_keys: Vec<i64> = (first + 500..first + 520).collect();
    let b_keys: Vec<i64> = (first + 10_000_100..first + 10_000_120).collect();
    for (region, keys) in [(region_a(), &a_keys), (region_b(), &b_keys)] {
        app_db(&region)
            .await
            .execute(
                &format!("UPDATE {} SET age = 0 WHERE id = ANY($1)", table.name),
                &[keys],
            )
            .await
            .unwrap();
    }
    table.wait_converged(Duration::from_secs(120)).await;
    corrupt_b(&table, first + 600).await;
    let config_b = owner_config_file(&table, "shadow", "batch_max_rows = 300");
    let (code, report) = verify(&config_b, &table);
    assert_eq!(code, 1, "the corrupted row is seen: {report}");
    let before = count(&region_b(), &table).await;

    // Readers of B: never fewer rows than before (the writers only add).
    let stop = Arc::new(AtomicBool::new(false));
    let fewest = Arc::new(AtomicI64::new(i64::MAX));
    let reader = {
        let (stop, fewest, name) = (stop.clone(), fewest.clone(), table.name.clone());
        tokio::spawn(async move {
            let db = app_db(&region_b()).await;
            let mut reads = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let n: i64 = db
                    .query_one(&format!("SELECT count(*) FROM {name}"), &[])
                    .await
                    .expect("a reader of B")
                    .get(0);
                fewest.fetch_min(n, Ordering::Relaxed);
                reads += 1;
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            reads
        })
    };
    let writer_a = increment_until(
        region_a(),
        table.name.clone(),
        a_keys.clone(),
        Some(first + 20_000_000),
        stop.clone(),
    );
    let writer_b = increment_until(
        region_b(),
        table.name.clone(),
        b_keys.clone(),
        None,
        stop.clone(),
    );

    let started = Instant::now();
    let out = tokio::task::block_in_place(|| {
        regionsync(&config_b, &["rebuild", "--shadow", "--chunk", "2000"]).output()
    })
    .expect("run rebuild --shadow");
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("swapped in"), "{}", text(&out));
    eprintln!(
        "rebuild --shadow took {:?}:\n{}",
        started.elapsed(),
        text(&out)
    );
    // The worker and both regions' writers go on after the swap.
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.store(true, Ordering::Relaxed);
    let (a_increments, inserted) = writer_a.await.unwrap();
    let (b_increments, _) = writer_b.await.unwrap();
    let reads = reader.await.unwrap();
    eprintln!("{a_increments} increments and {inserted} inserts in A, {b_increments} increments in B, {reads} reads of B");
    assert!(a_increments > 50 && b_increments > 50 && inserted > 10);

    table.wait_converged(Duration::from_secs(120)).await;
    let (code, report) = verify(&config_b, &table);
    assert_eq!(code, 0, "{report}");
    for region in [region_a(), region_b()] {
        assert_eq!(
            age_sum(&region, &table, &a_keys).await,
            a_increments,
            "A's counter in {}",
            region.name
        );
        assert_eq!(
            age_sum(&region, &table, &b_keys).await,
            b_increments,
            "B's counter in {}",
            region.name
        );
    }
    let fewest = fewest.load(Ordering::Relaxed);
    assert!(
        fewest >= before,
        "a reader of B saw {fewest} rows, fewer than the {before} before the rebuild"
    );

    // The swapped-in table is the live one in every way the pipeline
    // needs: its triggers, replica identity and owner; nothing left over.
    let admin = admin_db(&region_b()).await;
    let row = admin
        .query_one(
            &format!(
                "SELECT (SELECT count(*) FROM pg_trigger WHERE tgrelid = c.oid AND NOT tgisinternal),
                        c.relreplident::text, pg_get_userbyid(c.relowner)::text,
                        (SELECT count(*) FROM pg_class o WHERE o.relname LIKE 'regionsync_replaced_%'
                            OR o.relname = 'shadow__public__{0}')
                   FROM pg_class c WHERE c.oid = 'public.{0}'::regclass",
                table.name
            ),
            &[],
        )
        .await
        .unwrap();
    let (triggers, identity, owner, left): (i64, String, String, i64) =
        (row.get(0), row.get(1), row.get(2), row.get(3));
    assert_eq!(
        (triggers, identity.as_str(), owner.as_str(), left),
        (3, "f", "app", 0)
    );

    // Done: a second run does nothing.
    let out = output(&config_b, &["rebuild", "--shadow"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("nothing to do"), "{}", text(&out));
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_shadow_rebuild_killed_mid_way_resumes_and_ends_equal() {
    let table = TestTable::create("rebuild_shkill").await;
    let (a, b) = (
        start_worker(&region_a(), &table),
        start_worker(&region_b(), &table),
    );
    let first = write_both(&table, 20_000).await;
    table.wait_converged(Duration::from_secs(180)).await;
    let config_b = owner_config_file(&table, "shkill", "batch_max_rows = 300");

    // The worker's role may not rename the table: refused, said so.
    let worker_role = config_file(&region_b(), &table, "shkill-worker", "");
    let out = output(&worker_role, &["rebuild", "--shadow"]);
    assert!(!out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("the rebuild's role regionsync is not a member of app"),
        "{}",
        text(&out)
    );
    // What a rename would break is refused, named.
    let admin = admin_db(&region_b()).await;
    admin
        .batch_execute(&format!(
            "CREATE VIEW {0}_v AS SELECT id FROM {0}",
            table.name
        ))
        .await
        .unwrap();
    let out = output(&config_b, &["rebuild", "--shadow"]);
    assert!(!out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains(&format!("view {}_v depends on it", table.name)),
        "{}",
        text(&out)
    );
    admin
        .batch_execute(&format!("DROP VIEW {}_v", table.name))
        .await
        .unwrap();

    corrupt_b(&table, first + 700).await;
    let shadow = format!("regionsync.shadow__public__{}", table.name);
    let mut seen = 0;
    for kill in 1..=3 {
        let mut child = regionsync(&config_b, &["rebuild", "--shadow", "--chunk", "2000"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start rebuild --shadow");
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let n: i64 = admin
                .query_opt(&format!("SELECT count(*) FROM {shadow}"), &[])
                .await
                .ok()
                .flatten()
                .map_or(0, |r| r.get(0));
            if n > seen + 500 {
                seen = n;
                break;
            }
            assert!(
                Instant::now() < deadline && child.try_wait().unwrap().is_none(),
                "kill {kill}: the shadow rebuild made no progress past {seen} rows (or ended first)"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        child.kill().expect("kill -9");
        child.wait().unwrap();
        eprintln!("killed the shadow rebuild at {seen} rows");
        // The live table is untouched meanwhile, and A keeps writing.
        write_mixed(&table, 100, 300, first as u64 + kill).await;
    }
    let out = output(&config_b, &["rebuild", "--shadow"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("swapped in"),
        "it resumed: {}",
        text(&out)
    );
    table.wait_converged(Duration::from_secs(120)).await;
    let (code, report) = verify(&config_b, &table);
    assert_eq!(code, 0, "{report}");
    a.stop().await;
    b.stop().await;
}

/// The dead letters of the test's table in B, as `regionsync dlq list
/// --json` shows them.
fn dlq_list(config: &Path) -> Vec<serde_json::Value> {
    let out = output(config, &["dlq", "list", "--json"]);
    assert!(out.status.success(), "{}", text(&out));
    let said = String::from_utf8_lossy(&out.stdout).into_owned();
    if said.trim().starts_with("no dead letters") {
        return Vec::new();
    }
    let listed: serde_json::Value = serde_json::from_str(&said).expect("dlq list --json");
    listed.as_array().expect("an array").clone()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_row_postgresql_refuses_is_dead_lettered_once_and_every_other_row_rebuilt() {
    let table = TestTable::create("rebuild_refuse").await;
    let (a, b) = (
        start_worker(&region_a(), &table),
        start_worker(&region_b(), &table),
    );
    let first = fresh_key();
    insert_users(&table, first, 3_000).await;
    // Two rows B's schema will refuse (below): a display_name its narrower
    // column cannot hold (found by the worker's column checks, before
    // PostgreSQL), and an age only its CHECK refuses (found by PostgreSQL:
    // the chunk is refused, and bisected to the row).
    let (long, negative) = (first + 1_234, first + 2_345);
    let db = app_db(&region_a()).await;
    db.execute(
        &format!(
            "UPDATE {} SET display_name = repeat('x', 40) WHERE id = $1",
            table.name
        ),
        &[&long],
    )
    .await
    .unwrap();
    db.execute(
        &format!("UPDATE {} SET age = -5 WHERE id = $1", table.name),
        &[&negative],
    )
    .await
    .unwrap();
    table.wait_converged(Duration::from_secs(120)).await;
    b.stop().await;
    a.stop().await;
    // B's copy is lost, and its schema narrowed (a migration only B ran).
    lose_b(&table).await;
    admin_db(&region_b())
        .await
        .batch_execute(&format!(
            "ALTER TABLE {0} ALTER COLUMN display_name TYPE varchar(20);
             ALTER TABLE {0} ADD CONSTRAINT age_not_negative CHECK (age >= 0)",
            table.name
        ))
        .await
        .expect("narrow B's schema");
    // The worker's rule: with on_schema_mismatch = "dlq" such changes are
    // dead-lettered (with "hold" the worker, and the rebuild, would wait).
    let config_b = config_file_with(
        &region_b(),
        &table,
        "refuse",
        "",
        "on_schema_mismatch = \"dlq\"",
    );
    assert!(dlq_list(&config_b).is_empty());

    // Small chunks: the refused row's chunk is bisected, the others not.
    let out = output(&config_b, &["rebuild", "--chunk", "1000"]);
    let said = text(&out);
    assert_eq!(out.status.code(), Some(3), "{said}");
    assert!(
        said.contains("2 dead-lettered (2 sent now, 0 in the dead-letter topic already"),
        "{said}"
    );
    // Every other row as in A; each of the two keeps the version before
    // the refused change if that was written in an earlier chunk (as
    // under the worker), or is absent if it was collapsed into the refused
    // row's chunk.
    let (rows_a, rows_b) = (table.rows(&region_a()).await, table.rows(&region_b()).await);
    let is_bad = |r: &String| {
        [long, negative]
            .iter()
            .any(|id| r.contains(&format!("\"id\": {id},")))
    };
    let others = |rows: &[String]| {
        rows.iter()
            .filter(|r| !is_bad(r))
            .cloned()
            .collect::<Vec<_>>()
    };
    assert_eq!(others(&rows_a), others(&rows_b));
    assert_eq!(others(&rows_b).len(), 2_998);
    let kept: Vec<(Option<String>, Option<i32>)> = app_db(&region_b())
        .await
        .query(
            &format!(
                "SELECT display_name::text, age FROM {} WHERE id = ANY($1) ORDER BY id",
                table.name
            ),
            &[&vec![long, negative]],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert!(
        kept.len() <= 2 && kept.iter().all(|k| *k == (None, None)),
        "the versions before, or none: {kept:?}"
    );

    let mut letters = dlq_list(&config_b);
    letters.sort_by_key(|l| {
        l["error"]
            .as_str()
            .unwrap_or("")
            .contains("age_not_negative")
    });
    assert_eq!(letters.len(), 2, "{letters:?}");
    for (l, id) in letters.iter().zip([long, negative]) {
        assert_eq!(l["reason"], "schema_mismatch", "{l}");
        assert_eq!(l["table"], format!("public.{}", table.name), "{l}");
        assert_eq!(
            l["topic"],
            format!("{}.cdc.public.{}", region_a().name, table.name),
            "{l}"
        );
        assert!(l["offset"].as_i64().is_some(), "{l}");
        let key: serde_json::Value =
            serde_json::from_str(l["key"].as_str().expect("key")).expect("a JSON key");
        assert_eq!(key["id"].as_i64(), Some(id), "{l}");
        let error = l["error"].as_str().unwrap_or("");
        assert!(error.contains(&format!("public.{}", table.name)), "{l}");
    }
    let said = letters[0]["error"].as_str().unwrap_or("");
    assert!(
        said.contains("column display_name (character varying(20))"),
        "{said}"
    );
    let said = letters[1]["error"].as_str().unwrap_or("");
    assert!(said.contains("age_not_negative"), "{said}");

    // As if that run had been killed after sending them and run again: the
    // rebuild marked under way again, its offsets forgotten. It resumes,
    // finds the letters in the topic (not sent twice), and they are still
    // this rebuild's: exit status 3.
    admin_db(&region_b())
        .await
        .batch_execute(&format!(
            "UPDATE regionsync.offsets SET next_offset = 0
              WHERE consumer_group LIKE '%{t}-rebuild' AND topic = 'rebuild:public.{t}' AND partition = -1;
             DELETE FROM regionsync.offsets
              WHERE consumer_group LIKE '%{t}-rebuild' AND partition >= 0",
            t = table.name
        ))
        .await
        .unwrap();
    let out = output(&config_b, &["rebuild", "--chunk", "1000"]);
    let said = text(&out);
    assert_eq!(out.status.code(), Some(3), "{said}");
    assert!(
        said.contains("2 dead-lettered (0 sent now, 2 in the dead-letter topic already"),
        "{said}"
    );

    // Rebuilt again from the start: the same rows are refused, but they
    // are in the dead-letter topic already: not sent twice, and not this
    // rebuild's dead letters (exit status 0, the summary names them).
    let out = output(&config_b, &["rebuild", "--restart", "--chunk", "1000"]);
    let said = text(&out);
    assert_eq!(out.status.code(), Some(0), "{said}");
    assert!(
        said.contains("2 dead-lettered (0 sent now, 2 in the dead-letter topic already"),
        "{said}"
    );
    assert_eq!(dlq_list(&config_b).len(), 2);
    assert_eq!(others(&table.rows(&region_b()).await), others(&rows_a));
}

/// A config for B naming `tables` (the first one's config, with a
/// `[[tables]]` entry per other table), with an owner-level role.
fn two_table_config(tables: [&TestTable; 2], suffix: &str) -> (PathBuf, String) {
    let mut toml = worker_toml_for(&region_b(), tables[0], "");
    for t in &tables[1..] {
        toml.push_str(&format!(
            "\n[[tables]]\ntopics = [\"cdc.public.{0}\"]\ntarget = \"public.{0}\"\nkey = [\"id\"]\n",
            t.name
        ));
    }
    let dir = repo_root().join("target/test-configs");
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(format!("{}-{suffix}.toml", tables[0].name));
    let owner = toml.replace("user = \"regionsync\"", "user = \"postgres\"");
    std::fs::write(&path, &owner).unwrap();
    (path, toml)
}

/// What the swap must keep of a table: its identity sequence's name and
/// value, its comments and a statistics target.
async fn decorations(
    region: &Region,
    table: &TestTable,
) -> (String, i64, Option<String>, Option<String>, i32) {
    let row = admin_db(region)
        .await
        .query_one(
            &format!(
                "SELECT pg_get_serial_sequence('public.{0}', 'seq_no'),
                        (SELECT last_value FROM pg_sequences
                          WHERE format('%I.%I', schemaname, sequencename) = pg_get_serial_sequence('public.{0}', 'seq_no')),
                        obj_description('public.{0}'::regclass, 'pg_class'),
                        col_description('public.{0}'::regclass,
                            (SELECT attnum FROM pg_attribute WHERE attrelid = 'public.{0}'::regclass AND attname = 'email')::int),
                        (SELECT attstattarget::int FROM pg_attribute WHERE attrelid = 'public.{0}'::regclass AND attname = 'email')",
                table.name
            ),
            &[],
        )
        .await
        .unwrap();
    (row.get(0), row.get(1), row.get(2), row.get(3), row.get(4))
}

#[tokio::test(flavor = "multi_thread")]
async fn a_shadow_rebuild_of_two_tables_keeps_sequences_and_comments_and_ends_equal() {
    let (t1, t2) = (
        TestTable::create("rebuild_sh2a").await,
        TestTable::create("rebuild_sh2b").await,
    );
    // An identity column in the first table, in both regions.
    for region in [region_a(), region_b()] {
        app_db(&region)
            .await
            .batch_execute(&format!(
                "ALTER TABLE {} ADD COLUMN seq_no bigint GENERATED BY DEFAULT AS IDENTITY",
                t1.name
            ))
            .await
            .unwrap();
    }
    let (config_b, worker_b) = two_table_config([&t1, &t2], "shadow2");
    let workers = vec![
        start_worker(&region_a(), &t1),
        start_worker(&region_a(), &t2),
        Worker::start(regionsync::config::Config::from_toml(&worker_b).expect("valid config")),
    ];
    write_both(&t1, 1_000).await;
    write_both(&t2, 1_000).await;
    t1.wait_converged(Duration::from_secs(120)).await;
    t2.wait_converged(Duration::from_secs(120)).await;
    // B's decorations of the first table: a comment on it and a column,
    // and a statistics target. Its sequence moved on by B's inserts.
    admin_db(&region_b())
        .await
        .batch_execute(&format!(
            "COMMENT ON TABLE {0} IS 'the users, rebuilt';
             COMMENT ON COLUMN {0}.email IS 'where to write';
             ALTER TABLE {0} ALTER COLUMN email SET STATISTICS 321",
            t1.name
        ))
        .await
        .unwrap();
    let before = decorations(&region_b(), &t1).await;
    assert_eq!(before.0, format!("public.{}_seq_no_seq", t1.name));
    assert!(before.1 >= 200, "B's own inserts took values: {before:?}");
    assert_eq!(before.2.as_deref(), Some("the users, rebuilt"));

    let both = [
        "rebuild".to_owned(),
        "--shadow".to_owned(),
        "--table".to_owned(),
        format!("public.{}", t1.name),
        "--table".to_owned(),
        format!("public.{}", t2.name),
    ];
    let both: Vec<&str> = both.iter().map(String::as_str).collect();
    let oids = || async {
        admin_db(&region_b())
            .await
            .query_one(
                "SELECT $1::text::regclass::oid::bigint, $2::text::regclass::oid::bigint",
                &[&t1.name, &t2.name],
            )
            .await
            .map(|r| (r.get::<_, i64>(0), r.get::<_, i64>(1)))
            .unwrap()
    };
    let live = oids().await;

    // A long transaction reading the second table: the swap cannot lock it
    // within --swap-timeout; each attempt is rolled back whole and the
    // rebuild fails saying so, nothing swapped, nothing left locked.
    let mut holder = admin_db(&region_b()).await;
    let reading = holder.transaction().await.unwrap();
    reading
        .batch_execute(&format!("LOCK TABLE {} IN ACCESS SHARE MODE", t2.name))
        .await
        .unwrap();
    let started = Instant::now();
    let mut args = both.clone();
    args.extend(["--swap-timeout", "2"]);
    let out = output(&config_b, &args);
    let said = text(&out);
    eprintln!("a held swap failed after {:?}", started.elapsed());
    assert_eq!(out.status.code(), Some(1), "{said}");
    assert!(
        said.contains(
            "did not complete in 3 attempts, each rolled back whole: nothing was swapped"
        ),
        "{said}"
    );
    assert!(said.contains("within --swap-timeout (2s)"), "{said}");
    assert_eq!(oids().await, live, "nothing swapped");
    let left: i64 = admin_db(&region_b())
        .await
        .query_one(
            "SELECT count(*) FROM pg_locks WHERE relation = $1::text::regclass AND pid <> pg_backend_pid()",
            &[&t1.name],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(left, 0, "no lock left on the first table");
    reading.commit().await.unwrap();

    let out = output(&config_b, &both);
    let said = text(&out);
    assert!(out.status.success(), "{said}");
    assert_ne!(oids().await.0, live.0, "swapped");
    assert!(said.contains("swapped in"), "{said}");
    assert!(
        said.contains(&format!("public.{}", t1.name))
            && said.contains(&format!("public.{}", t2.name)),
        "{said}"
    );
    assert_eq!(
        decorations(&region_b(), &t1).await,
        before,
        "kept by the swap"
    );
    // The sequence goes on from where it was.
    let next: i64 = app_db(&region_b())
        .await
        .query_one(
            &format!(
                "INSERT INTO {} (id, email) VALUES ($1, 'next@example.com') RETURNING seq_no",
                t1.name
            ),
            &[&(fresh_key() + 30_000_000)],
        )
        .await
        .expect("nextval after the swap")
        .get(0);
    assert_eq!(next, before.1 + 1);
    t1.wait_converged(Duration::from_secs(60)).await;
    for t in [&t1, &t2] {
        let (code, report) = verify(&config_b, t);
        assert_eq!(code, 0, "{report}");
    }
    for w in workers {
        w.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_missing_grant_is_waited_out_not_dead_lettered() {
    let table = TestTable::create("rebuild_grant").await;
    let (a, b) = (
        start_worker(&region_a(), &table),
        start_worker(&region_b(), &table),
    );
    insert_users(&table, fresh_key(), 500).await;
    table.wait_converged(Duration::from_secs(120)).await;
    b.stop().await;
    a.stop().await;
    lose_b(&table).await;
    let admin = admin_db(&region_b()).await;
    admin
        .batch_execute(&format!(
            "REVOKE INSERT, UPDATE ON public.{} FROM regionsync",
            table.name
        ))
        .await
        .unwrap();
    let config_b = config_file(&region_b(), &table, "grant", "");
    let child = regionsync(&config_b, &["rebuild"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start rebuild");
    // PostgreSQL refuses every chunk: the rebuild waits, writes nothing,
    // dead-letters nothing, and goes on once the grant is back.
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(count(&region_b(), &table).await, 0);
    admin
        .batch_execute(&format!(
            "GRANT INSERT, UPDATE ON public.{} TO regionsync",
            table.name
        ))
        .await
        .unwrap();
    let out = tokio::task::block_in_place(|| child.wait_with_output()).expect("rebuild ends");
    let said = text(&out);
    assert!(out.status.success(), "{said}");
    assert!(said.contains("written again after a wait"), "{said}");
    assert!(said.contains("reason=\"postgres_permission\""), "{said}");
    assert!(said.contains("none dead-lettered"), "{said}");
    assert!(dlq_list(&config_b).is_empty());
    let (code, report) = verify(&config_b, &table);
    assert_eq!(code, 0, "{report}");
}

/// Whether `region`'s copy of the table has the row `id`.
async fn has_row(region: &Region, table: &TestTable, id: i64) -> bool {
    app_db(region)
        .await
        .query_opt(
            &format!("SELECT 1 FROM {} WHERE id = $1", table.name),
            &[&id],
        )
        .await
        .unwrap()
        .is_some()
}

/// A refused row whose newest version takes an unchanged (TOASTed) column
/// from an older message of the same chunk: every message its image came
/// from is dead-lettered (oldest first), so that `dlq replay` rebuilds the
/// source's row; meanwhile the key is missing (not an older value), and
/// verify says so.
#[tokio::test(flavor = "multi_thread")]
async fn a_refused_row_made_of_several_messages_is_dead_lettered_with_all_of_them() {
    let table = TestTable::create("rebuild_toast").await;
    let db = app_db(&region_a()).await;
    // No before image: an update leaving the large column alone carries
    // Debezium's unavailable-value placeholder.
    db.batch_execute(&format!(
        "ALTER TABLE {} REPLICA IDENTITY DEFAULT",
        table.name
    ))
    .await
    .unwrap();
    let (a, b) = (
        start_worker(&region_a(), &table),
        start_worker(&region_b(), &table),
    );
    let first = fresh_key();
    insert_users(&table, first, 200).await;
    let big = first + 7;
    // Each write applied by B's worker before the next: the worker's own
    // batch keeps only a key's last version (apply::collapse), which here
    // would be the partial one: an update of a row not stored yet.
    table.wait_converged(Duration::from_secs(120)).await;
    db.execute(
        &format!(
            "UPDATE {} SET bio = (SELECT string_agg(md5(s::text), '') FROM generate_series(1, 3000) s) WHERE id = $1",
            table.name
        ),
        &[&big],
    )
    .await
    .unwrap();
    table.wait_converged(Duration::from_secs(120)).await;
    db.execute(
        &format!("UPDATE {} SET age = -5 WHERE id = $1", table.name),
        &[&big],
    )
    .await
    .unwrap();
    table.wait_converged(Duration::from_secs(120)).await;
    b.stop().await;
    a.stop().await;
    lose_b(&table).await;
    let admin = admin_db(&region_b()).await;
    admin
        .batch_execute(&format!(
            "ALTER TABLE {} ADD CONSTRAINT age_not_negative CHECK (age >= 0)",
            table.name
        ))
        .await
        .unwrap();
    let config_b = config_file_with(
        &region_b(),
        &table,
        "toast",
        "",
        "on_schema_mismatch = \"dlq\"",
    );
    let out = output(&config_b, &["rebuild"]);
    let said = text(&out);
    assert_eq!(out.status.code(), Some(3), "{said}");
    // Only each key's newest message is planned at first; this key's is
    // not a whole row, so its messages were read again from Kafka.
    assert!(said.contains("replanned=1\n"), "{said}");
    // The age update (its bio a placeholder) and the bio update it took
    // the value from; the row's first insert is not part of its image.
    assert!(
        said.contains("2 dead-lettered (2 sent now, 0 in the dead-letter topic already"),
        "{said}"
    );
    let letters = dlq_list(&config_b);
    assert_eq!(letters.len(), 2, "{letters:?}");
    // Two messages of the row's partition.
    assert_eq!(letters[0]["topic"], letters[1]["topic"], "{letters:?}");
    assert_eq!(letters[0]["partition"], letters[1]["partition"]);
    assert_ne!(letters[0]["offset"], letters[1]["offset"]);
    assert!(
        letters.iter().any(|l| l["error"]
            .as_str()
            .unwrap_or("")
            .contains("unchanged (TOAST)")),
        "{letters:?}"
    );
    // Not an older value: the key is missing, and verify reports it.
    assert!(!has_row(&region_b(), &table, big).await);
    let (code, report) = verify(&config_b, &table);
    assert_eq!(code, 1, "{report}");
    assert!(
        report.contains(&format!("missing here\tkey {big}\t")),
        "{report}"
    );
    assert_eq!(
        report.matches("missing here").count(),
        1,
        "only the refused key: {report}"
    );

    // The cause fixed, the dead letters replayed: the source's row.
    admin
        .batch_execute(&format!(
            "ALTER TABLE {} DROP CONSTRAINT age_not_negative",
            table.name
        ))
        .await
        .unwrap();
    let out = output(&config_b, &["dlq", "replay"]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(table.rows(&region_b()).await, table.rows(&region_a()).await);
    let (code, report) = verify(&config_b, &table);
    assert_eq!(code, 0, "{report}");
}

/// Loses B's copy of a table of two rows written in A, `x` and `x + 1`,
/// after running `sql` in B (`{t}`: the table, `{x}`: x's id).
async fn two_rows_lost_in_b(table: &TestTable, sql: &str) -> i64 {
    let (a, b) = (
        start_worker(&region_a(), table),
        start_worker(&region_b(), table),
    );
    let x = fresh_key();
    insert_users(table, x, 2).await;
    table.wait_converged(Duration::from_secs(120)).await;
    b.stop().await;
    a.stop().await;
    lose_b(table).await;
    admin_db(&region_b())
        .await
        .batch_execute(
            &sql.replace("{t}", &format!("public.{}", table.name))
                .replace("{x}", &x.to_string()),
        )
        .await
        .expect("set up B");
    x
}

/// `on_error = "stop"` holds for a row refused for its data when written
/// again after the rest of its chunk (a unique index first refused it).
#[tokio::test(flavor = "multi_thread")]
async fn on_error_stop_stops_at_a_row_refused_after_it_waited() {
    let table = TestTable::create("rebuild_stop").await;
    // Row x: refused by a unique index on its first three writes (the
    // chunk, the part of both rows, x alone), then for its value.
    let x = two_rows_lost_in_b(
        &table,
        "CREATE SEQUENCE {t}_calls; GRANT USAGE ON SEQUENCE {t}_calls TO regionsync;
         CREATE FUNCTION {t}_refuse() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN
           IF NEW.id = {x} THEN
             IF nextval('{t}_calls') <= 3 THEN
               RAISE EXCEPTION 'held by another row' USING ERRCODE = 'unique_violation';
             END IF;
             RAISE EXCEPTION 'not a value' USING ERRCODE = 'invalid_text_representation';
           END IF;
           RETURN NEW;
         END $$;
         CREATE TRIGGER refuse BEFORE INSERT OR UPDATE ON {t} FOR EACH ROW EXECUTE FUNCTION {t}_refuse();
         ALTER TABLE {t} ENABLE ALWAYS TRIGGER refuse;",
    )
    .await;
    let config_b = config_file(&region_b(), &table, "stop", "");
    let out = tokio::task::block_in_place(|| {
        regionsync(&config_b, &["rebuild"])
            .env("REGIONSYNC_ON_ERROR", "stop")
            .output()
    })
    .expect("run rebuild");
    let said = text(&out);
    assert_eq!(out.status.code(), Some(1), "{said}");
    assert!(said.contains("(on_error = stop)"), "{said}");
    assert!(said.contains(&format!("key {x} ")), "{said}");
    assert!(
        dlq_list(&config_b)
            .iter()
            .all(|l| l["table"] != format!("public.{}", table.name)),
        "nothing dead-lettered"
    );
}

/// A deferred constraint refusing a chunk at COMMIT is sorted as the
/// worker sorts it: a unique index's refusal is waited out as
/// `unique_wait`, not taken for an outage.
#[tokio::test(flavor = "multi_thread")]
async fn a_chunk_refused_at_commit_is_waited_out_with_the_workers_label() {
    let table = TestTable::create("rebuild_deferred").await;
    let x = two_rows_lost_in_b(
        &table,
        // The flag is a sequence: a table would be captured by B's
        // connector (keyless, its topic compacted: the connector fails).
        "CREATE SEQUENCE {t}_released; GRANT SELECT ON SEQUENCE {t}_released TO regionsync;
         CREATE FUNCTION {t}_deferred() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN
           IF NEW.id = {x} AND NOT (SELECT is_called FROM {t}_released) THEN
             RAISE EXCEPTION 'value held by another row' USING ERRCODE = 'unique_violation';
           END IF;
           RETURN NULL;
         END $$;
         CREATE CONSTRAINT TRIGGER deferred AFTER INSERT OR UPDATE ON {t}
           DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION {t}_deferred();
         ALTER TABLE {t} ENABLE ALWAYS TRIGGER deferred;",
    )
    .await;
    let config_b = config_file(&region_b(), &table, "deferred", "");
    let child = regionsync(&config_b, &["rebuild"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start rebuild");
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert!(
        !has_row(&region_b(), &table, x).await,
        "waiting: nothing committed"
    );
    admin_db(&region_b())
        .await
        .batch_execute(&format!("SELECT nextval('public.{}_released')", table.name))
        .await
        .unwrap();
    let out = tokio::task::block_in_place(|| child.wait_with_output()).expect("rebuild ends");
    let said = text(&out);
    assert!(out.status.success(), "{said}");
    assert!(said.contains("written again after a wait"), "{said}");
    assert!(said.contains("reason=\"unique_wait\""), "{said}");
    assert!(!said.contains("postgres_unavailable"), "{said}");
    let (code, report) = verify(&config_b, &table);
    assert_eq!(code, 0, "{report}");
}

/// A unique value whose holder moves away in a later chunk: the row that
/// takes it waits for that chunk (as the worker waits), the rebuild goes
/// on and ends equal.
#[tokio::test(flavor = "multi_thread")]
async fn a_row_waiting_for_a_unique_value_of_a_later_chunk_is_written_when_it_is_free() {
    let table = TestTable::create("rebuild_unique").await;
    let (a, b) = (
        start_worker(&region_a(), &table),
        start_worker(&region_b(), &table),
    );
    let first = fresh_key();
    let pairs = 60;
    insert_users(&table, first, pairs).await;
    // Each email moves from row i to row i + 1,000,000: in the source the
    // old holder lets it go before the new one takes it.
    let db = app_db(&region_a()).await;
    for i in first..first + pairs {
        db.batch_execute(&format!(
            "BEGIN;
             UPDATE {t} SET email = 'moved' || id || '@example.com' WHERE id = {i};
             INSERT INTO {t} (id, email) VALUES ({i} + 1000000, 'g' || {i} || '@example.com');
             COMMIT",
            t = table.name
        ))
        .await
        .unwrap();
    }
    table.wait_converged(Duration::from_secs(120)).await;
    b.stop().await;
    a.stop().await;
    lose_b(&table).await;
    admin_db(&region_b())
        .await
        .batch_execute(&format!(
            "CREATE UNIQUE INDEX ON public.{} (email)",
            table.name
        ))
        .await
        .unwrap();
    // A chunk per message: partitions are read in blocks, so for some
    // pairs the new holder's insert comes before the old one's update.
    let config_b = config_file(&region_b(), &table, "unique", "batch_max_rows = 1");
    let out = output(&config_b, &["rebuild", "--chunk", "1"]);
    let said = text(&out);
    assert!(out.status.success(), "{said}");
    assert!(
        said.contains("wait for a later chunk of the rebuild"),
        "a row waited: {said}"
    );
    assert!(said.contains("none dead-lettered"), "{said}");
    assert_eq!(table.rows(&region_b()).await, table.rows(&region_a()).await);
    let (code, report) = verify(&config_b, &table);
    assert_eq!(code, 0, "{report}");
}
