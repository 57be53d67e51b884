//! Schema changes while replicating (docs/SCHEMA-CHANGES.md): each
//! migration runs in the two regions seconds apart, in both orders, while
//! a writer keeps writing in us-east-1 (A) and the worker of eu-west-1 (B)
//! keeps running. At the end both regions hold the same rows, column for
//! column, nothing was dead-lettered, and the worker was never restarted
//! (it stops cleanly at the end, which fails if it had stopped itself).
//!
//! Each scenario has its own table, worker and dead-letter topic, so the
//! scenarios run side by side.

mod support;

use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::ClientConfig;
use support::kit::*;
use support::*;

/// Which region migrates first.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Order {
    /// The source region (A) first: B meets changes of the new schema.
    SourceFirst,
    /// The target region (B) first: B meets changes of the old schema.
    TargetFirst,
}

/// Messages in the scenario's dead-letter topic (0 if it was never made).
fn dead_letters(table: &TestTable) -> i64 {
    let topic = format!("regionsync.dlq.test-{}", table.name);
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &region_b().kafka)
        .set("group.id", "regionsync-tests-unused")
        .create()
        .expect("kafka consumer");
    tokio::task::block_in_place(|| {
        let md = consumer
            .fetch_metadata(Some(&topic), Duration::from_secs(5))
            .expect("metadata");
        let Some(t) = md
            .topics()
            .iter()
            .find(|t| t.name() == topic && t.error().is_none())
        else {
            return 0;
        };
        t.partitions()
            .iter()
            .map(|p| {
                // A topic just made may not have its leaders yet.
                let deadline = Instant::now() + Duration::from_secs(30);
                loop {
                    match consumer.fetch_watermarks(&topic, p.id(), Duration::from_secs(5)) {
                        Ok((low, high)) => break high - low,
                        Err(e) if Instant::now() < deadline => {
                            eprintln!("{topic}: watermarks: {e}; again");
                            std::thread::sleep(Duration::from_millis(500));
                        }
                        Err(e) => panic!("{topic}: watermarks: {e}"),
                    }
                }
            })
            .sum()
    })
}

/// Writes in A until stopped: an insert, an update of an earlier row and
/// now and then a delete, every 40 ms, on columns no migration changes the
/// name of.
struct Writer {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<i64>,
}

impl Writer {
    fn start(table: &TestTable) -> Writer {
        Writer::start_writing(table, false)
    }

    /// Also writes the text column `code` (the row's id as text) on every
    /// insert and update: the column the type scenarios retype.
    fn start_with_code(table: &TestTable) -> Writer {
        Writer::start_writing(table, true)
    }

    fn start_writing(table: &TestTable, code: bool) -> Writer {
        let stop = Arc::new(AtomicBool::new(false));
        let name = table.name.clone();
        let flag = stop.clone();
        let task = tokio::spawn(async move {
            let db = app_db(&region_a()).await;
            let next = AtomicI64::new(1_000);
            let mut rng = Rng(0x2545_f491_4f6c_dd1d);
            let mut writes = 0;
            while !flag.load(Ordering::Relaxed) {
                let id = next.fetch_add(1, Ordering::Relaxed);
                let earlier = 1_000 + rng.below((id - 999) as u64) as i64;
                let mut sql = format!(
                    "INSERT INTO public.{name} (id, email, age) VALUES ({id}, 'w{id}@example.com', {age});
                     UPDATE public.{name} SET age = coalesce(age, 0) + 1, status = 'suspended' WHERE id = {earlier};",
                    age = id % 100
                );
                if code {
                    sql.push_str(&format!(
                        "UPDATE public.{name} SET code = id::text WHERE id IN ({id}, {earlier});"
                    ));
                }
                if id % 7 == 0 {
                    sql.push_str(&format!(
                        "DELETE FROM public.{name} WHERE id = {};",
                        earlier - 1
                    ));
                }
                db.batch_execute(&format!("BEGIN; {sql} COMMIT;"))
                    .await
                    .unwrap_or_else(|e| panic!("the writer in A: {e}"));
                writes += 1;
                tokio::time::sleep(Duration::from_millis(40)).await;
            }
            writes
        });
        Writer { stop, task }
    }

    async fn stop(self) -> i64 {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await.expect("the writer did not panic")
    }
}

/// The log of the in-process workers of this test binary (every
/// scenario's), echoed to standard error with `SCHEMA_TEST_LOG` set.
static LOG: std::sync::Mutex<Vec<u8>> = std::sync::Mutex::new(Vec::new());

struct LogSink;

impl std::io::Write for LogSink {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        LOG.lock().expect("log lock").extend_from_slice(bytes);
        if std::env::var_os("SCHEMA_TEST_LOG").is_some() {
            let _ = std::io::stderr().write_all(bytes);
        }
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn capture_logs() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter("info,rdkafka=warn")
        .with_ansi(false)
        .with_writer(|| LogSink)
        .try_init();
}

/// The first line logged so far that holds every one of `parts`.
fn logged(parts: &[&str]) -> Option<String> {
    let log = LOG.lock().expect("log lock");
    String::from_utf8_lossy(&log)
        .lines()
        .find(|l| parts.iter().all(|p| l.contains(p)))
        .map(str::to_owned)
}

async fn run_sql(region: &Region, sql: &str) {
    app_db(region)
        .await
        .batch_execute(sql)
        .await
        .unwrap_or_else(|e| panic!("in {}: {sql}: {e}", region.name));
}

fn retries(reason: &str) -> u64 {
    counters().total("regionsync_retries_total", &[("reason", reason)])
}

/// One migration while A writes: `migration` (with `{t}` for the table)
/// run in both regions in `order`, three seconds apart; `after_a` (also
/// with `{t}`) written in A right after A migrated, using the new schema.
/// `between` runs while only the first region has migrated.
async fn scenario(
    prefix: &str,
    connector: &str,
    order: Order,
    migration: &str,
    after_a: &str,
    between: impl AsyncFnOnce(&TestTable),
) {
    capture_logs();
    let table = TestTable::create(prefix).await;
    let t = format!("public.{}", table.name);
    let (migration, after_a) = (migration.replace("{t}", &t), after_a.replace("{t}", &t));
    insert_users(&table, 1, 20).await;
    run_sql(
        &region_a(),
        &format!(
            "UPDATE {t} SET display_name = 'd' || id, bio = 'bio ' || id, age = id, balance = id * 1.5"
        ),
    )
    .await;
    let topic = format!("{connector}.public.{}", table.name);
    let worker = Worker::start(worker_config(&table, &topic));
    table.wait_converged(Duration::from_secs(90)).await;
    let writer = Writer::start(&table);
    tokio::time::sleep(Duration::from_secs(1)).await;

    let (a, b) = (region_a(), region_b());
    let (first, second) = match order {
        Order::SourceFirst => (&a, &b),
        Order::TargetFirst => (&b, &a),
    };
    run_sql(first, &migration).await;
    if order == Order::SourceFirst {
        run_sql(&a, &after_a).await;
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    between(&table).await;
    run_sql(second, &migration).await;
    if order == Order::TargetFirst {
        run_sql(&a, &after_a).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let writes = writer.stop().await;
    let rows = table.wait_converged(Duration::from_secs(120)).await;
    assert_eq!(dead_letters(&table), 0, "{prefix}: nothing dead-lettered");
    eprintln!(
        "{prefix} ({order:?}): {writes} writer transactions, {rows} rows identical in both regions"
    );
    worker.stop().await;
}

/// A (nullable, defaulted) column added in one region first. Source
/// first: B holds the changes that carry it (counted as `schema_mismatch`
/// retries, nothing applied without the new values) until B has it, then
/// applies them with their values, no restart. Target first: the changes
/// without it apply and B's rows get the column's default.
async fn add_column(prefix: &str, connector: &str, order: Order) {
    let held_before = retries("schema_mismatch");
    scenario(
        prefix,
        connector,
        order,
        "ALTER TABLE {t} ADD COLUMN nickname text DEFAULT 'none'",
        "UPDATE {t} SET nickname = 'nick ' || id WHERE id <= 10",
        async |table: &TestTable| {
            let b = app_db(&region_b()).await;
            let t = &table.name;
            match order {
                Order::SourceFirst => {
                    // Held: every change A writes now carries the new
                    // column, so none of them reaches B until B has it.
                    let a = app_db(&region_a()).await;
                    let newest: i64 = a
                        .query_one(&format!("SELECT max(id) FROM public.{t} WHERE id < 900000"), &[])
                        .await
                        .expect("max id in A")
                        .get(0);
                    let deadline = Instant::now() + Duration::from_secs(30);
                    while retries("schema_mismatch") < held_before + 2 {
                        assert!(Instant::now() < deadline, "{t}: the partition is held");
                        tokio::time::sleep(Duration::from_millis(250)).await;
                    }
                    let applied: i64 = b
                        .query_one(
                            &format!("SELECT count(*) FROM public.{t} WHERE id > $1"),
                            &[&newest],
                        )
                        .await
                        .expect("count")
                        .get(0);
                    assert_eq!(applied, 0, "{t}: no change written after the migration was applied without its column");
                }
                Order::TargetFirst => {
                    // A change without the column applies here; the column
                    // keeps its default.
                    run_sql(
                        &region_a(),
                        &format!("INSERT INTO public.{t} (id, email) VALUES (900001, 'probe@example.com')"),
                    )
                    .await;
                    let deadline = Instant::now() + Duration::from_secs(60);
                    loop {
                        let got = b
                            .query_opt(
                                &format!("SELECT nickname FROM public.{t} WHERE id = 900001"),
                                &[],
                            )
                            .await
                            .expect("probe");
                        if let Some(row) = got {
                            assert_eq!(row.get::<_, Option<String>>(0).as_deref(), Some("none"));
                            break;
                        }
                        assert!(Instant::now() < deadline, "{t}: the probe row arrives in B");
                        tokio::time::sleep(Duration::from_millis(250)).await;
                    }
                }
            }
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_column_added_in_the_source_region_first_is_held_then_applied() {
    add_column("add_src", "cdc", Order::SourceFirst).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_column_added_in_the_target_region_first_keeps_its_default() {
    add_column("add_tgt", "cdc", Order::TargetFirst).await;
}

/// Avro: the new schema version Debezium registers when the column is
/// added is fetched by the running worker (readers are per schema id).
#[tokio::test(flavor = "multi_thread")]
async fn avro_a_column_added_in_the_source_region_first_is_held_then_applied() {
    add_column("add_src_avro", "cdc.avro", Order::SourceFirst).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn avro_a_column_added_in_the_target_region_first_keeps_its_default() {
    add_column("add_tgt_avro", "cdc.avro", Order::TargetFirst).await;
}

/// A column dropped in one region first: no change fails. Target first,
/// the source still sends the column: PostgreSQL reports it undefined
/// (42703), the worker reads the layout again, finds the column among
/// those the table had, and leaves it out.
#[tokio::test(flavor = "multi_thread")]
async fn a_column_dropped_in_the_source_region_first() {
    let drop = "ALTER TABLE {t} DROP COLUMN bio";
    scenario(
        "drop_src",
        "cdc",
        Order::SourceFirst,
        drop,
        "",
        async |_: &TestTable| {},
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_column_dropped_in_the_target_region_first() {
    let drop = "ALTER TABLE {t} DROP COLUMN bio";
    scenario(
        "drop_tgt",
        "cdc",
        Order::TargetFirst,
        drop,
        "",
        async |_: &TestTable| {},
    )
    .await;
}

const WIDEN: &str = "ALTER TABLE {t} ALTER COLUMN age TYPE bigint,
    ALTER COLUMN email TYPE text, ALTER COLUMN balance TYPE numeric(20, 2)";
/// Values only the widened columns hold.
const WIDE_VALUES: &str = "UPDATE {t} SET age = 3000000000 + id,
    email = repeat('x', 400) || id, balance = 1000000000000000.25 + id WHERE id <= 10";

/// int → bigint, varchar(320) → text, numeric(12,2) → numeric(20,2).
/// Source first: a value B's narrower column cannot hold is a schema lag,
/// held (never cut, rounded or dead-lettered) until B widens.
#[tokio::test(flavor = "multi_thread")]
async fn types_widened_in_the_source_region_first() {
    scenario(
        "widen_src",
        "cdc",
        Order::SourceFirst,
        WIDEN,
        WIDE_VALUES,
        async |_: &TestTable| {},
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn avro_types_widened_in_the_source_region_first() {
    scenario(
        "widen_src_avro",
        "cdc.avro",
        Order::SourceFirst,
        WIDEN,
        WIDE_VALUES,
        async |_: &TestTable| {},
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn types_widened_in_the_target_region_first() {
    scenario(
        "widen_tgt",
        "cdc",
        Order::TargetFirst,
        WIDEN,
        WIDE_VALUES,
        async |_: &TestTable| {},
    )
    .await;
}

const RENAME: &str = "ALTER TABLE {t} RENAME COLUMN display_name TO nick";
const RENAMED_VALUES: &str = "UPDATE {t} SET nick = 'renamed ' || id WHERE id <= 10";

/// Source first: the new name is a column B never had, held (the log
/// says to rename or map it) until B renames. Target first: B's column
/// number under a new name is known for a rename, and the old name's
/// values go to it.
#[tokio::test(flavor = "multi_thread")]
async fn a_column_renamed_in_the_source_region_first() {
    scenario(
        "rename_src",
        "cdc",
        Order::SourceFirst,
        RENAME,
        RENAMED_VALUES,
        async |_: &TestTable| {},
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_column_renamed_in_the_target_region_first() {
    scenario(
        "rename_tgt",
        "cdc",
        Order::TargetFirst,
        RENAME,
        RENAMED_VALUES,
        async |table: &TestTable| {
            // Values written under the old name while only B renamed.
            run_sql(
                &region_a(),
                &format!(
                    "UPDATE public.{} SET display_name = 'old name ' || id WHERE id > 10 AND id <= 20",
                    table.name
                ),
            )
            .await;
        },
    )
    .await;
}

/// The dead letters of the scenario's dead-letter topic: (reason, error).
fn dead_letter_headers(table: &TestTable, at_least: usize) -> Vec<(String, String)> {
    let topic = format!("regionsync.dlq.test-{}", table.name);
    let deadline = Instant::now() + Duration::from_secs(30);
    tokio::task::block_in_place(|| {
        TopicReader::open(&region_b(), &topic, deadline).collect(
            deadline,
            |_| true,
            |found| found.len() >= at_least,
        )
    })
    .iter()
    .map(|m| {
        let h = headers(m);
        (
            h.get("regionsync.reason").cloned().unwrap_or_default(),
            h.get("regionsync.error").cloned().unwrap_or_default(),
        )
    })
    .collect()
}

/// The text column `code` is retyped to integer in B only, while A keeps
/// writing text into it: every change that carries a code is a schema
/// difference, found from the change's own types (JSON schema or Avro)
/// against B's layout, read again when PostgreSQL refuses the statement
/// built on the old one. `hold`: nothing dead-lettered, the partition held
/// (the `schema_mismatch` retries, the log naming table, column and both
/// types) until B's column is text again, then the rows converge, the
/// worker never restarted. `dlq`: dead-lettered as `schema_mismatch`, the
/// error naming table, column and types.
async fn retyped_in_the_target(prefix: &str, connector: &str, policy: &str) {
    capture_logs();
    let table = TestTable::create(prefix).await;
    let t = format!("public.{}", table.name);
    for region in [region_a(), region_b()] {
        run_sql(&region, &format!("ALTER TABLE {t} ADD COLUMN code text")).await;
    }
    insert_users(&table, 1, 20).await;
    run_sql(&region_a(), &format!("UPDATE {t} SET code = id::text")).await;
    let topic = format!("{connector}.public.{}", table.name);
    let toml = worker_toml(&table, &topic, "").replace(
        "key = [\"id\"]",
        &format!("key = [\"id\"]\non_schema_mismatch = \"{policy}\""),
    );
    let worker = Worker::start(regionsync::config::Config::from_toml(&toml).expect("config"));
    table.wait_converged(Duration::from_secs(120)).await;
    let held_before = retries("schema_mismatch");
    let writer = Writer::start_with_code(&table);
    tokio::time::sleep(Duration::from_secs(1)).await;
    // Every code in B is a number's text: the retyping keeps them.
    run_sql(
        &region_b(),
        &format!("ALTER TABLE {t} ALTER COLUMN code TYPE integer USING code::integer"),
    )
    .await;
    let expected = [
        t.as_str(),
        "column code is integer here, but the source region sends string values",
        "ALTER COLUMN \"code\" TYPE",
    ];
    if policy == "hold" {
        let deadline = Instant::now() + Duration::from_secs(60);
        let line = loop {
            if let Some(line) = logged(&[&expected[..], &["holding the partition"]].concat()) {
                break line;
            }
            assert!(
                Instant::now() < deadline,
                "{t}: no log line holds the partition naming the column and both types"
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        };
        while retries("schema_mismatch") < held_before + 2 {
            assert!(
                Instant::now() < deadline,
                "{t}: schema_mismatch retries counted"
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        assert_eq!(
            dead_letters(&table),
            0,
            "{t}: nothing dead-lettered while held"
        );
        eprintln!("{prefix}: held: {line}");
        // The operator's fix: the column's type as the source has it.
        run_sql(
            &region_b(),
            &format!("ALTER TABLE {t} ALTER COLUMN code TYPE text USING code::text"),
        )
        .await;
        tokio::time::sleep(Duration::from_secs(2)).await;
        let writes = writer.stop().await;
        let rows = table.wait_converged(Duration::from_secs(120)).await;
        assert_eq!(dead_letters(&table), 0, "{t}: nothing dead-lettered");
        eprintln!("{prefix}: {writes} writer transactions, {rows} rows identical after the fix");
    } else {
        let deadline = Instant::now() + Duration::from_secs(60);
        while dead_letters(&table) == 0 {
            assert!(
                Instant::now() < deadline,
                "{t}: the changes are dead-lettered"
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        let writes = writer.stop().await;
        let letters = dead_letter_headers(&table, 1);
        assert!(!letters.is_empty());
        for (reason, error) in &letters {
            assert_eq!(reason, "schema_mismatch", "{error}");
            for part in expected {
                assert!(error.contains(part), "{part:?} not in {error:?}");
            }
        }
        eprintln!(
            "{prefix}: {writes} writer transactions, {} dead letters, e.g. {}",
            letters.len(),
            letters[0].1
        );
    }
    // Fails if the worker had stopped itself.
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_column_retyped_incompatibly_in_the_target_is_held_until_fixed() {
    retyped_in_the_target("retype_hold", "cdc", "hold").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn avro_a_column_retyped_incompatibly_in_the_target_is_held_until_fixed() {
    retyped_in_the_target("retype_hold_avro", "cdc.avro", "hold").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_column_retyped_incompatibly_in_the_target_is_dead_lettered_with_dlq() {
    retyped_in_the_target("retype_dlq", "cdc", "dlq").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn avro_a_column_retyped_incompatibly_in_the_target_is_dead_lettered_with_dlq() {
    retyped_in_the_target("retype_dlq_avro", "cdc.avro", "dlq").await;
}

/// A new table joins replication by the documented steps
/// (docs/SCHEMA-CHANGES.md, "Adding a table"): DDL in both regions (the
/// stack's publication covers schema `public`), `regionsync setup` for its
/// triggers, a `[[tables]]` entry, and a rolling restart of the worker.
/// Rows written in A before the restart wait in Kafka and arrive after it;
/// the table already replicated loses nothing across the restart.
#[tokio::test(flavor = "multi_thread")]
async fn a_table_added_to_replication_is_picked_up_on_a_rolling_restart() {
    let old = TestTable::create("newtbl_old").await;
    let old_topic = format!("cdc.public.{}", old.name);
    let worker = Worker::start(worker_config(&old, &old_topic));
    insert_users(&old, 1, 20).await;
    let writer = Writer::start(&old);

    // 1. The table in every region, without triggers yet.
    let new = TestTable {
        name: format!("newtbl_{}", fresh_key()),
    };
    for region in [region_a(), region_b()] {
        run_sql(
            &region,
            &format!(
                "CREATE TABLE public.{n} (LIKE public.users INCLUDING DEFAULTS INCLUDING CONSTRAINTS INCLUDING INDEXES);
                 ALTER TABLE public.{n} REPLICA IDENTITY FULL;",
                n = new.name
            ),
        )
        .await;
    }
    // 2. Its [[tables]] entry, next to the old one.
    let toml = format!(
        "{}\n[[tables]]\ntopics = [\"cdc.public.{n}\"]\ntarget = \"public.{n}\"\nkey = [\"id\"]\n",
        worker_toml(&old, &old_topic, ""),
        n = new.name
    );
    // 3. `regionsync setup` in every region, as an administrator.
    for region in [region_a(), region_b()] {
        let admin = toml
            .replace("user = \"regionsync\"", "user = \"postgres\"")
            .replace(
                &format!("port = {}", region_b().pg_port),
                &format!("port = {}", region.pg_port),
            );
        let config = regionsync::config::Config::from_toml(&admin).expect("config");
        setup_clean(&config, &region.name).await;
    }
    // Written while the running worker does not know the table.
    insert_users(&new, 1, 30).await;
    run_sql(
        &region_a(),
        &format!(
            "UPDATE public.{} SET bio = 'before the restart' WHERE id <= 5",
            new.name
        ),
    )
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        new.rows(&region_b()).await.is_empty(),
        "not replicated before the restart"
    );
    // 4. The rolling restart: this region's only worker stops, the new
    // configuration starts.
    worker.stop().await;
    let worker = Worker::start(
        regionsync::config::Config::from_toml(&toml).expect("config with the new table"),
    );
    insert_users(&new, 31, 10).await;
    let writes = writer.stop().await;
    let rows = new.wait_converged(Duration::from_secs(120)).await;
    assert_eq!(rows, 40, "every row of the new table arrives");
    let old_rows = old.wait_converged(Duration::from_secs(120)).await;
    assert_eq!(dead_letters(&old), 0, "nothing dead-lettered");
    eprintln!(
        "new table: {rows} rows; old table: {old_rows} rows after {writes} writer transactions across the restart"
    );
    worker.stop().await;
}

/// A free local port for a worker process's metrics endpoint.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

/// Sends `signal` (HUP, TERM) to the worker process.
fn signal(child: &std::process::Child, signal: &str) {
    let status = std::process::Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(child.id().to_string())
        .status()
        .expect("kill");
    assert!(status.success(), "kill -{signal}");
}

/// Waits for a log line of the worker process holding every one of `parts`.
async fn wait_logged(
    lines: &std::sync::Mutex<Vec<String>>,
    parts: &[&str],
    within: Duration,
) -> String {
    let deadline = Instant::now() + within;
    loop {
        if let Some(line) = lines
            .lock()
            .expect("log lock")
            .iter()
            .find(|l| parts.iter().all(|p| l.contains(p)))
        {
            return line.clone();
        }
        assert!(Instant::now() < deadline, "no log line with {parts:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// `regionsync_config_reloads_total{result}` as the worker process serves it.
async fn reloads(port: u16, result: &str) -> f64 {
    let text = reqwest::Client::new()
        .get(format!("http://127.0.0.1:{port}/metrics"))
        .timeout(Duration::from_secs(5))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("metrics text");
    let series = format!("regionsync_config_reloads_total{{result=\"{result}\"}}");
    text.lines()
        .find_map(|l| l.strip_prefix(&series))
        .map_or(0.0, |v| v.trim().parse().expect("a number"))
}

/// A new table joins replication by the documented steps
/// (docs/SCHEMA-CHANGES.md, "Adding a table") without a restart: DDL in
/// both regions, `regionsync setup` for its triggers, its `[[tables]]`
/// entry written into the running worker's configuration file, SIGHUP.
/// Before that, a broken file on SIGHUP is refused and the worker goes on
/// applying the old configuration. One worker process throughout (same
/// pid, never exited); rows written in A before and after the reload
/// arrive in B, and the table already replicated loses nothing.
#[tokio::test(flavor = "multi_thread")]
async fn a_table_added_to_replication_is_picked_up_on_sighup() {
    let old = TestTable::create("hup_old").await;
    let old_topic = format!("cdc.public.{}", old.name);
    let port = free_port();
    let with_metrics = |toml: String| {
        toml.replace(
            "[apply]",
            &format!("[metrics]\n        listen = \"127.0.0.1:{port}\"\n        [apply]"),
        )
    };
    let old_toml = with_metrics(worker_toml(&old, &old_topic, ""));
    let name = format!("{}-hup", old.name);
    let (mut child, lines) = spawn_worker(&old_toml, &name);
    let path = repo_root().join(format!("target/test-configs/{name}.toml"));
    let pid = child.id();
    insert_users(&old, 1, 20).await;
    old.wait_converged(Duration::from_secs(120)).await;

    // A broken file: refused, named, the old configuration keeps applying.
    std::fs::write(&path, "region = [this is not toml").expect("write config");
    signal(&child, "HUP");
    let refused = wait_logged(
        &lines,
        &["configuration reload refused"],
        Duration::from_secs(20),
    )
    .await;
    let problem = wait_logged(
        &lines,
        &["TOML parse error at line 1"],
        Duration::from_secs(5),
    )
    .await;
    eprintln!("broken config: {refused} / {problem}");
    assert!(child.try_wait().expect("wait").is_none(), "still running");
    insert_users(&old, 21, 10).await;
    old.wait_converged(Duration::from_secs(60)).await;
    assert_eq!(reloads(port, "error").await, 1.0);
    let writer = Writer::start(&old);

    // 1. The table in every region, without triggers yet.
    let new = TestTable {
        name: format!("newtbl_{}", fresh_key()),
    };
    for region in [region_a(), region_b()] {
        run_sql(
            &region,
            &format!(
                "CREATE TABLE public.{n} (LIKE public.users INCLUDING DEFAULTS INCLUDING CONSTRAINTS INCLUDING INDEXES);
                 ALTER TABLE public.{n} REPLICA IDENTITY FULL;",
                n = new.name
            ),
        )
        .await;
    }
    // 2. Its [[tables]] entry, next to the old one.
    let toml = format!(
        "{old_toml}\n[[tables]]\ntopics = [\"cdc.public.{n}\"]\ntarget = \"public.{n}\"\nkey = [\"id\"]\n",
        n = new.name
    );
    // 3. `regionsync setup` in every region, as an administrator.
    for region in [region_a(), region_b()] {
        let admin = toml
            .replace("user = \"regionsync\"", "user = \"postgres\"")
            .replace(
                &format!("port = {}", region_b().pg_port),
                &format!("port = {}", region.pg_port),
            );
        let config = regionsync::config::Config::from_toml(&admin).expect("config");
        setup_clean(&config, &region.name).await;
    }
    // Written while the running worker does not know the table.
    insert_users(&new, 1, 30).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        new.rows(&region_b()).await.is_empty(),
        "not replicated before the reload"
    );
    // 4. The file rewritten, SIGHUP.
    std::fs::write(&path, &toml).expect("write config");
    signal(&child, "HUP");
    wait_logged(&lines, &["configuration reloaded"], Duration::from_secs(20)).await;
    insert_users(&new, 31, 10).await;
    let rows = new.wait_converged(Duration::from_secs(120)).await;
    assert_eq!(rows, 40, "every row of the new table arrives");
    let writes = writer.stop().await;
    let old_rows = old.wait_converged(Duration::from_secs(120)).await;
    assert_eq!(dead_letters(&old), 0, "nothing dead-lettered");
    assert_eq!(reloads(port, "ok").await, 1.0);
    assert_eq!(child.id(), pid);
    assert!(
        child.try_wait().expect("wait").is_none(),
        "the same process, never exited"
    );
    eprintln!(
        "new table: {rows} rows; old table: {old_rows} rows after {writes} writer transactions across a refused and an applied reload"
    );
    signal(&child, "TERM");
    let deadline = Instant::now() + Duration::from_secs(15);
    while child.try_wait().expect("wait").is_none() {
        assert!(Instant::now() < deadline, "stops on SIGTERM");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
