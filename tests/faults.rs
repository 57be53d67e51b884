//! Faults that are not the data's: a revoked grant, a schema registry that
//! stops answering, a source clock far ahead, a unique value or a parent
//! row another partition has not brought yet. Each holds the partition (or
//! is capped) and costs no change: nothing is dead-lettered, everything
//! arrives once the cause is gone. The registry test freezes a service of
//! the stack, so `make test` runs no other suite on its stack meanwhile,
//! and this file one test at a time.

mod support;

use std::process::Command;

use rdkafka::message::Message as _;
use std::time::{Duration, Instant};

use support::kit::*;
use support::*;

fn dead_lettered() -> u64 {
    counters().total("regionsync_dlq_messages_total", &[])
}

fn retries(reason: &str) -> u64 {
    counters().total("regionsync_retries_total", &[("reason", reason)])
}

/// Waits until `f` holds, or fails naming `what`.
async fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "{what}: not within {timeout:?}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

async fn rows_in_b(table: &TestTable) -> usize {
    table.rows(&region_b()).await.len()
}

/// What [`held_until_released`] saw.
struct Held {
    /// Retries of its reason from the first write to the release.
    retries: u64,
    /// From the first write until the retries asked for were seen.
    held_for: Duration,
    /// From the release until B equalled A.
    recovered_in: Duration,
}

/// The frame of a partition held by a cause the test has put in place:
/// writes `n` rows from id `first` (the `first - 1` before them applied
/// already) and waits for `at_least` retries of `reason`; meanwhile
/// nothing is dead-lettered and, where B can be read (a cut connection
/// cannot), nothing of them applied. `release` removes the cause; then
/// every row arrives, still with nothing dead-lettered.
async fn held_until_released<R: std::future::Future<Output = ()>>(
    table: &TestTable,
    (first, n): (i64, i64),
    (reason, at_least): (&str, u64),
    b_readable: bool,
    release: impl FnOnce() -> R,
) -> Held {
    let (dead_before, retried_before) = (dead_lettered(), retries(reason));
    let writing = Instant::now();
    insert_users(table, first, n).await;
    wait_for(
        &format!("{at_least} retries ({reason})"),
        Duration::from_secs(90),
        || retries(reason) >= retried_before + at_least,
    )
    .await;
    let held_for = writing.elapsed();
    if b_readable {
        assert_eq!(
            rows_in_b(table).await as i64,
            first - 1,
            "nothing applied while held ({reason})"
        );
    }
    assert_eq!(dead_lettered(), dead_before, "nothing dead-lettered");
    let retried = retries(reason) - retried_before;
    release().await;
    let released = Instant::now();
    assert_eq!(
        table.wait_converged(Duration::from_secs(60)).await as i64,
        first - 1 + n,
        "every row arrives once the cause is gone ({reason})"
    );
    let recovered_in = released.elapsed();
    assert_eq!(dead_lettered(), dead_before, "still nothing dead-lettered");
    Held {
        retries: retried,
        held_for,
        recovered_in,
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_revoked_grant_holds_the_partition_and_costs_no_change() {
    let table = TestTable::create("revoke").await;
    let topic = format!("cdc.public.{}", table.name);
    let b = app_db(&region_b()).await;
    b.batch_execute(&format!(
        "REVOKE INSERT, UPDATE ON public.{} FROM regionsync",
        table.name
    ))
    .await
    .expect("revoke");
    let worker = Worker::start(worker_config(&table, &topic));
    let grant = format!(
        "GRANT INSERT, UPDATE ON public.{} TO regionsync",
        table.name
    );
    held_until_released(
        &table,
        (1, 20),
        ("postgres_permission", 3),
        true,
        || async move {
            b.batch_execute(&grant).await.expect("grant");
        },
    )
    .await;
    worker.stop().await;
}

/// Restarts Debezium's Avro tasks that failed while the registry was away
/// (a task that could not register a schema stays failed until restarted).
fn restart_failed_avro_tasks() {
    for port in [
        support::stack_env::CONNECT_PORT_A.get(),
        support::stack_env::CONNECT_PORT_B.get(),
    ] {
        let _ = Command::new("curl")
            .args(["-fsS", "-o", "/dev/null", "-X", "POST"])
            .arg(format!(
                "http://{}:{port}/connectors/cdc-avro/restart?includeTasks=true&onlyFailed=true",
                support::stack_env::HOST
            ))
            .status();
    }
}

/// Sends SIGCONT to a frozen process when dropped (also on a panic).
struct Resume(String);

impl Drop for Resume {
    fn drop(&mut self) {
        let _ = Command::new("kill").arg("-CONT").arg(&self.0).status();
        restart_failed_avro_tasks();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_frozen_registry_holds_avro_changes_and_loses_none() {
    let table = TestTable::create("registry").await;
    let topic = format!("cdc.avro.public.{}", table.name);
    // The changes are captured (their schemas registered) while the
    // registry is up, then wait in B's Kafka.
    insert_users(&table, 1, 100).await;
    let mirrored_topic = mirrored(&region_a(), &topic);
    let deadline = Instant::now() + Duration::from_secs(90);
    let waiting = tokio::task::block_in_place(|| {
        TopicReader::open(&region_b(), &mirrored_topic, deadline).collect(
            deadline,
            |_| true,
            |found| found.len() >= 100,
        )
    });
    assert!(waiting.len() >= 100, "100 Avro changes wait in B's Kafka");

    // The registry freezes: it accepts connections and never answers. A
    // new worker knows no schema yet.
    let registry = stack_pid("registry");
    run(Command::new("kill").arg("-STOP").arg(&registry));
    // However the test ends, the registry runs again.
    let _resume = Resume(registry.clone());
    let (dead_before, held_before) = (dead_lettered(), retries("registry"));
    let worker = Worker::start(worker_config(&table, &topic));
    let frozen = Instant::now();
    let waited = async {
        wait_for(
            "retries for the frozen registry",
            Duration::from_secs(60),
            || retries("registry") >= held_before + 2,
        )
        .await;
        (rows_in_b(&table).await, dead_lettered())
    }
    .await;
    run(Command::new("kill").arg("-CONT").arg(&registry));
    restart_failed_avro_tasks();
    let (rows, dead) = waited;
    assert_eq!(rows, 0, "nothing applied while the registry is frozen");
    assert_eq!(dead, dead_before, "nothing dead-lettered");

    let rows = table.wait_converged(Duration::from_secs(60)).await;
    assert_eq!(rows, 100, "all 100 arrive once the registry answers");
    assert_eq!(dead_lettered(), dead_before, "still nothing dead-lettered");
    eprintln!(
        "registry frozen: 100 written, 0 dead-lettered, 100 arrived {:?} after the freeze began",
        frozen.elapsed()
    );
    worker.stop().await;
}

/// A change and a truncate from a source clock far ahead (the year 2100):
/// held by default, dead-lettered with `clock_ahead = "dlq"`, never
/// applied. The truncate deletes no newer row and leaves no mark that
/// would refuse later writes; the stored source time (what lag is
/// computed from, across restarts too) is not in the future.
#[tokio::test(flavor = "multi_thread")]
async fn a_source_clock_far_ahead_is_held_and_applies_nothing() {
    use rdkafka::producer::{FutureProducer, FutureRecord};

    let table = TestTable::create("future").await;
    let topic = format!("cdc.public.{}", table.name);
    let worker = Worker::start(worker_config(&table, &topic));
    insert_users(&table, 1, 5).await;
    table.wait_converged(Duration::from_secs(60)).await;

    let year_2100_ms: i64 = 4_102_444_800_000;
    let source = serde_json::json!({"ts_ms": year_2100_ms, "schema": "public", "table": table.name,
                                    "lsn": 1, "snapshot": "false"});
    let change = serde_json::json!({
        "before": null,
        "after": {"id": 900_001, "email": "future@example.com", "status": "active", "age": 1,
                  "bio": "x", "created_at": "2024-01-01T00:00:00Z", "hlc": now_ms() << 16,
                  "origin_region": region_a().name},
        "source": source, "op": "c", "ts_ms": year_2100_ms
    });
    let truncate = serde_json::json!({"before": null, "after": null, "source": source,
                                      "op": "t", "ts_ms": year_2100_ms});
    let producer: FutureProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &region_b().kafka)
        .create()
        .expect("producer");
    let mirrored_topic = mirrored(&region_a(), &topic);
    let (dead_before, held_before) = (dead_lettered(), retries("clock_ahead"));
    producer
        .send(
            FutureRecord::to(&mirrored_topic)
                .key(&serde_json::to_vec(&serde_json::json!({"id": 900_001})).unwrap())
                .payload(&serde_json::to_vec(&change).unwrap()),
            Duration::from_secs(10),
        )
        .await
        .expect("produce the far-future change");
    producer
        .send(
            // With a key: the mirrored topics are compacted, which refuses
            // a message without one.
            FutureRecord::to(&mirrored_topic)
                .partition(0)
                .key(&serde_json::to_vec(&serde_json::json!({"id": 900_002})).unwrap())
                .payload(&serde_json::to_vec(&truncate).unwrap()),
            Duration::from_secs(10),
        )
        .await
        .expect("produce the far-future truncate");

    wait_for(
        "retries for the clock far ahead",
        Duration::from_secs(60),
        || retries("clock_ahead") >= held_before + 4,
    )
    .await;
    assert_eq!(
        rows_in_b(&table).await,
        5,
        "held: nothing applied, nothing deleted"
    );
    assert_eq!(dead_lettered(), dead_before, "held: nothing dead-lettered");
    worker.stop().await;

    // The operator decides: dead-letter what a clock far ahead sent.
    let toml = worker_toml(&table, &topic, "").replace("[kafka]", "clock_ahead = \"dlq\"\n[kafka]");
    let worker = Worker::start(regionsync::config::Config::from_toml(&toml).expect("config"));
    wait_for("two dead letters", Duration::from_secs(60), || {
        counters().total(
            "regionsync_dlq_messages_total",
            &[("reason", "clock_ahead")],
        ) >= 2
            && dead_lettered() >= dead_before + 2
    })
    .await;
    // The table is not frozen: later writes arrive, the earlier rows stay.
    insert_users(&table, 6, 5).await;
    assert_eq!(table.wait_converged(Duration::from_secs(60)).await, 10);
    let admin = admin_db(&region_b()).await;
    let marks: i64 = admin
        .query_one(
            "SELECT count(*) FROM regionsync.truncations WHERE table_name = $1",
            &[&format!("public.{}", table.name)],
        )
        .await
        .expect("truncation marks")
        .get(0);
    assert_eq!(marks, 0, "no truncate mark from the year 2100");
    let stored: i64 = admin
        .query_one(
            "SELECT max(source_ts_ms) FROM regionsync.offsets WHERE topic = $1",
            &[&mirrored_topic],
        )
        .await
        .expect("stored source time")
        .get(0);
    assert!(
        stored <= now_ms(),
        "stored newest source time {stored} is ahead of now {}",
        now_ms()
    );
    worker.stop().await;
}

/// The partition of each id's change on the mirrored topic in B (read
/// until every id in `ids` is seen).
async fn partitions_of(table: &TestTable, ids: &[i64]) -> std::collections::HashMap<i64, i32> {
    let topic = mirrored(&region_a(), &format!("cdc.public.{}", table.name));
    let deadline = Instant::now() + Duration::from_secs(60);
    let wanted: std::collections::HashSet<i64> = ids.iter().copied().collect();
    let found = tokio::task::block_in_place(|| {
        TopicReader::open(&region_b(), &topic, deadline).collect(
            deadline,
            |_| true,
            |found| {
                let seen: std::collections::HashSet<i64> = found
                    .iter()
                    .filter_map(|m| json_payload(m.key())?["id"].as_i64())
                    .collect();
                wanted.is_subset(&seen)
            },
        )
    });
    let map: std::collections::HashMap<i64, i32> = found
        .iter()
        .filter_map(|m| Some((json_payload(m.key())?["id"].as_i64()?, m.partition())))
        .collect();
    assert!(
        ids.iter().all(|id| map.contains_key(id)),
        "every id's change is on the mirrored topic"
    );
    map
}

#[tokio::test(flavor = "multi_thread")]
async fn a_unique_index_the_source_satisfied_costs_no_change() {
    let table = TestTable::create("uniq").await;
    let name = &table.name;
    for region in [region_a(), region_b()] {
        app_db(&region)
            .await
            .batch_execute(&format!(
                "CREATE UNIQUE INDEX {name}_email ON public.{name} (email)"
            ))
            .await
            .expect("unique index on email");
    }
    let topic = format!("cdc.public.{name}");
    let (dead_before, waits_before) = (dead_lettered(), retries("unique_wait"));
    let worker = Worker::start(worker_config(&table, &topic));
    // Ids 1-40 stay; 41-80 are deleted again, so that the partitions of
    // ids free for a primary-key change are known.
    insert_users(&table, 1, 80).await;
    let ids: Vec<i64> = (1..=80).collect();
    let partition = partitions_of(&table, &ids).await;
    let a = app_db(&region_a()).await;
    a.batch_execute(&format!("DELETE FROM {name} WHERE id > 40"))
        .await
        .expect("delete 41-80");
    table.wait_converged(Duration::from_secs(60)).await;

    let by_partition = |same: bool, from: &[i64], to: &[i64]| -> (i64, i64) {
        from.iter()
            .flat_map(|x| to.iter().map(move |y| (*x, *y)))
            .find(|(x, y)| x != y && (partition[x] == partition[y]) == same)
            .expect("a pair of ids with the partitions wanted")
    };
    let email = |id: i64| format!("g{id}@example.com");
    // A primary-key change keeping the unique value, once to an id of the
    // same partition and once to one of another.
    // Targets from disjoint ranges: both changes may not pick the same
    // free id (the source itself would refuse the second).
    let (pk_same_from, pk_same_to) = by_partition(true, &ids[0..5], &ids[40..60]);
    let (pk_other_from, pk_other_to) = by_partition(false, &ids[5..10], &ids[60..]);
    // Two rows exchanging emails through a temporary value in one
    // transaction, on one partition and across two.
    let (p, q) = by_partition(true, &ids[10..25], &ids[10..25]);
    let (r, s) = by_partition(false, &ids[25..40], &ids[25..40]);
    let mut sql = format!(
        "BEGIN;
         UPDATE {name} SET id = {pk_same_to} WHERE id = {pk_same_from};
         UPDATE {name} SET id = {pk_other_to} WHERE id = {pk_other_from};
         COMMIT;"
    );
    for (x, y) in [(p, q), (r, s)] {
        sql.push_str(&format!(
            "BEGIN;
             UPDATE {name} SET email = 'swap-{x}' WHERE id = {x};
             UPDATE {name} SET email = '{ex}' WHERE id = {y};
             UPDATE {name} SET email = '{ey}' WHERE id = {x};
             COMMIT;",
            ex = email(x),
            ey = email(y),
        ));
    }
    a.batch_execute(&sql).await.expect("exchanges in A");

    let started = Instant::now();
    let rows = table.wait_converged(Duration::from_secs(90)).await;
    assert_eq!(rows, 40);
    let b = app_db(&region_b()).await;
    let moved: i64 = b
        .query_one(
            &format!(
                "SELECT count(*) FROM {name} WHERE (id = {pk_same_to} AND email = '{}')
                    OR (id = {pk_other_to} AND email = '{}')
                    OR (id = {p} AND email = '{}') OR (id = {q} AND email = '{}')
                    OR (id = {r} AND email = '{}') OR (id = {s} AND email = '{}')",
                email(pk_same_from),
                email(pk_other_from),
                email(q),
                email(p),
                email(s),
                email(r)
            ),
            &[],
        )
        .await
        .expect("count")
        .get(0);
    assert_eq!(moved, 6, "every key and email moved in B as in A");
    assert_eq!(dead_lettered(), dead_before, "nothing dead-lettered");
    eprintln!(
        "unique index: 2 primary-key changes and 2 exchanges, 0 dead-lettered, converged in {:?}, {} waits for a unique value",
        started.elapsed(),
        retries("unique_wait") - waits_before
    );
    worker.stop().await;
}

/// A parent and a child table on two topics, the child's id a foreign key
/// to the parent's, in both regions (the source satisfies it: every child
/// row is written after its parent); in B, with `enforced`, the foreign
/// key's check triggers fire on replicated writes too (ENABLE ALWAYS).
/// The parent's topic cannot be applied in B (a missing grant holds its
/// partitions), so every child row arrives before its parent, whatever
/// the timing. Returns the tables and a worker consuming both.
async fn child_before_parent(enforced: bool) -> (TestTable, TestTable, Worker) {
    let parent = TestTable::create("fkparent").await;
    let child = TestTable::create("fkchild").await;
    let (p, c) = (&parent.name, &child.name);
    for region in [region_a(), region_b()] {
        app_db(&region)
            .await
            .batch_execute(&format!(
                "ALTER TABLE public.{c} ADD CONSTRAINT {c}_parent FOREIGN KEY (id) REFERENCES public.{p} (id)"
            ))
            .await
            .expect("foreign key");
    }
    if enforced {
        // Internal triggers: only a superuser may change them.
        admin_db(&region_b())
            .await
            .batch_execute(&format!(
                "DO $$ DECLARE t text; BEGIN
                   FOR t IN SELECT tgname FROM pg_trigger
                       WHERE tgrelid = 'public.{c}'::regclass AND tgisinternal
                         AND tgfoid IN ('\"RI_FKey_check_ins\"'::regproc, '\"RI_FKey_check_upd\"'::regproc)
                   LOOP EXECUTE format('ALTER TABLE public.{c} ENABLE ALWAYS TRIGGER %I', t); END LOOP;
                 END $$"
            ))
            .await
            .expect("enforce the foreign key on replicated writes in B");
    }
    app_db(&region_b())
        .await
        .batch_execute(&format!(
            "REVOKE INSERT, UPDATE ON public.{p} FROM regionsync"
        ))
        .await
        .expect("revoke");
    let mut toml = worker_toml(&parent, &format!("cdc.public.{p}"), "");
    toml.push_str(&format!(
        "
        [[tables]]
        topics = [\"cdc.public.{c}\"]
        target = \"public.{c}\"
        key = [\"id\"]
        "
    ));
    let worker = Worker::start(
        regionsync::config::Config::from_toml(&toml).expect("valid two-table config"),
    );
    insert_users(&parent, 1, 30).await;
    insert_users(&child, 1, 30).await;
    (parent, child, worker)
}

async fn grant_parent(parent: &TestTable) {
    app_db(&region_b())
        .await
        .batch_execute(&format!(
            "GRANT INSERT, UPDATE ON public.{} TO regionsync",
            parent.name
        ))
        .await
        .expect("grant");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_child_row_before_its_parent_is_applied_as_logical_replication_does() {
    // As in PostgreSQL's own logical replication, the apply sessions run
    // with session_replication_role = replica, where a foreign key's
    // triggers do not fire: the child row is applied at once, and the
    // parent makes the replica whole when it comes.
    let dead_before = dead_lettered();
    let waits_before = retries("foreign_key_wait");
    let (parent, child, worker) = child_before_parent(false).await;
    assert_eq!(child.wait_converged(Duration::from_secs(90)).await, 30);
    assert_eq!(rows_in_b(&parent).await, 0, "the parents are still held");
    grant_parent(&parent).await;
    assert_eq!(parent.wait_converged(Duration::from_secs(60)).await, 30);
    assert_eq!(dead_lettered(), dead_before, "nothing dead-lettered");
    assert_eq!(retries("foreign_key_wait"), waits_before, "nothing waited");
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_child_row_before_its_parent_waits_where_the_foreign_key_is_enforced() {
    let dead_before = dead_lettered();
    let waits_before = retries("foreign_key_wait");
    let (parent, child, worker) = child_before_parent(true).await;
    wait_for(
        "waits for the missing parent rows",
        Duration::from_secs(90),
        || retries("foreign_key_wait") >= waits_before + 3,
    )
    .await;
    assert_eq!(rows_in_b(&child).await, 0, "no child without its parent");
    assert_eq!(dead_lettered(), dead_before, "nothing dead-lettered");

    let started = Instant::now();
    grant_parent(&parent).await;
    assert_eq!(parent.wait_converged(Duration::from_secs(60)).await, 30);
    assert_eq!(child.wait_converged(Duration::from_secs(60)).await, 30);
    assert_eq!(dead_lettered(), dead_before, "still nothing dead-lettered");
    eprintln!(
        "foreign key enforced in B: 30 parents and 30 children written, 0 dead-lettered, {} waits for a parent, converged {:?} after the grant",
        retries("foreign_key_wait") - waits_before,
        started.elapsed()
    );
    worker.stop().await;
}

/// The end offset of each of `partitions` partitions of `topic`.
fn ends(region: &Region, topic: &str, partitions: i32) -> Vec<i64> {
    let consumer: rdkafka::consumer::BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &region.kafka)
        .create()
        .expect("consumer");
    tokio::task::block_in_place(|| {
        (0..partitions)
            .map(|p| {
                rdkafka::consumer::Consumer::fetch_watermarks(
                    &consumer,
                    topic,
                    p,
                    Duration::from_secs(5),
                )
                .map_or(-1, |(_, high)| high)
            })
            .collect()
    })
}

/// Deletes `topic` on `region`'s Kafka and creates it again, empty, with
/// `partitions` partitions.
async fn recreate_topic(region: &Region, topic: &str, partitions: i32) {
    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
    use rdkafka::client::DefaultClientContext;
    let admin: AdminClient<DefaultClientContext> = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &region.kafka)
        .create()
        .expect("admin client");
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    admin
        .delete_topics(&[topic], &options)
        .await
        .expect("delete topics")
        .into_iter()
        .for_each(|r| r.map(|_| ()).expect("topic deleted"));
    // The broker finishes the deletion in the background: create until it
    // takes (MirrorMaker 2 may create it first, which is as good).
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let created = admin
            .create_topics(
                &[NewTopic::new(topic, partitions, TopicReplication::Fixed(1))],
                &options,
            )
            .await
            .expect("create topics");
        match &created[0] {
            Ok(_) => break,
            Err((_, rdkafka::types::RDKafkaErrorCode::TopicAlreadyExists)) => {
                // Gone and back already, or still being deleted: the end
                // offsets tell (a re-created topic starts at 0 again).
                if ends(region, topic, partitions).iter().all(|e| *e == 0) {
                    break;
                }
            }
            Err((_, e)) => panic!("create {topic}: {e}"),
        }
        assert!(Instant::now() < deadline, "{topic} re-created within 60 s");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_recreated_topic_stops_its_partitions_and_skips_nothing() {
    let table = TestTable::create("recreate").await;
    let topic = format!("cdc.public.{}", table.name);
    let mirrored_topic = mirrored(&region_a(), &topic);
    let group = format!("test-{}", table.name);
    let worker = Worker::start(worker_config(&table, &topic));
    insert_users(&table, 1, 20).await;
    assert_eq!(table.wait_converged(Duration::from_secs(60)).await, 20);
    worker.stop().await;
    let admin = admin_db(&region_b()).await;
    let stored: Vec<i32> = admin
        .query(
            "SELECT partition FROM regionsync.offsets
              WHERE consumer_group = $1 AND topic = $2 AND next_offset > 0 ORDER BY partition",
            &[&group, &mirrored_topic],
        )
        .await
        .expect("stored offsets")
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(!stored.is_empty(), "offsets stored for the topic");

    recreate_topic(&region_b(), &mirrored_topic, 4).await;
    let worker = Worker::start(worker_config(&table, &topic));
    let stopped = || {
        counters().gauge(
            "regionsync_partition_stopped",
            &[("topic", mirrored_topic.as_str()), ("reason", "beyond_end")],
        ) as usize
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while stopped() != stored.len() {
        assert!(
            Instant::now() < deadline,
            "every partition with a stored offset ({stored:?}) stopped: {} of them within 60 s; ends now {:?}",
            stopped(),
            ends(&region_b(), &mirrored_topic, 4)
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    // New changes reach the re-created topic; none is taken for one
    // applied already on a stopped partition.
    insert_users(&table, 21, 20).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    let arrived = tokio::task::block_in_place(|| {
        TopicReader::open(&region_b(), &mirrored_topic, deadline).collect(
            deadline,
            |m| m.payload().is_some(),
            |found| found.len() >= 20,
        )
    });
    assert_eq!(
        arrived.len(),
        20,
        "the new changes are on the re-created topic"
    );
    let on_running: usize = arrived
        .iter()
        .filter(|m| !stored.contains(&m.partition()))
        .count();
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        rows_in_b(&table).await,
        20 + on_running,
        "the first 20 kept; of the new ones only those on partitions not stopped"
    );
    worker.stop().await;

    // The runbook's way forward: start the re-created topic from its
    // beginning, on purpose.
    admin
        .execute(
            "DELETE FROM regionsync.offsets WHERE consumer_group = $1 AND topic = $2",
            &[&group, &mirrored_topic],
        )
        .await
        .expect("reset the stored offsets");
    let worker = Worker::start(worker_config(&table, &topic));
    assert_eq!(table.wait_converged(Duration::from_secs(60)).await, 40);
    assert_eq!(stopped(), 0, "nothing stopped after the reset");
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_panicking_partition_task_is_reported_and_restarted_from_its_offset() {
    let table = TestTable::create("panic").await;
    let topic = format!("cdc.public.{}", table.name);
    let mirrored_topic = mirrored(&region_a(), &topic);
    let (dead_before, panics_before) = (
        dead_lettered(),
        counters().total(
            "regionsync_partition_panics_total",
            &[("topic", mirrored_topic.as_str())],
        ),
    );
    // The task that reaches offset 2 of any partition panics, once: the
    // offsets before it are committed, the rest waits in the queue.
    *regionsync::worker::PANIC_ONCE_AT.lock().unwrap() = Some((mirrored_topic.clone(), 2));
    let worker = Worker::start(worker_config(&table, &topic));
    for first in [1, 11, 21, 31] {
        insert_users(&table, first, 10).await;
    }
    assert_eq!(table.wait_converged(Duration::from_secs(60)).await, 40);
    assert_eq!(
        counters().total(
            "regionsync_partition_panics_total",
            &[("topic", mirrored_topic.as_str())],
        ) - panics_before,
        1,
        "the panic is counted"
    );
    assert!(
        regionsync::worker::PANIC_ONCE_AT.lock().unwrap().is_none(),
        "the hook fired"
    );
    // Readiness reports it (the gauge is refreshed every few seconds).
    wait_for(
        "/readyz false after the panic",
        Duration::from_secs(20),
        || counters().gauge("regionsync_ready", &[]) == 0.0,
    )
    .await;
    assert_eq!(dead_lettered(), dead_before, "nothing dead-lettered");
    worker.stop().await;
}

/// The value of the first series of `/metrics` text whose line starts with
/// `series` (a name and, optionally, labels up to some point); 0 if none.
fn scraped(text: &str, series: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(series))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// `/metrics` (or another path) of a spawned worker; empty if it does not
/// answer yet.
async fn http_text(port: u16, path: &str) -> (u16, String) {
    match reqwest::get(format!("http://127.0.0.1:{port}{path}")).await {
        Ok(resp) => (
            resp.status().as_u16(),
            resp.text().await.unwrap_or_default(),
        ),
        Err(_) => (0, String::new()),
    }
}

/// Two rows exchange their unique values directly in one source
/// transaction, which only a DEFERRABLE constraint allows, and they are on
/// two partitions. No order of single-partition commits can apply that in
/// a region whose index is checked per statement (nor per transaction: a
/// DEFERRABLE target index is checked at each partition's commit, which
/// holds only half of the exchange). Both partitions are held and
/// reported (retries, a log naming table and keys, `/readyz`; the
/// RegionsyncPartitionHeld alert after 3 min), nothing is dead-lettered,
/// and the runbook's way out (drop B's unique index, let the partitions
/// catch up, create it again) converges.
#[tokio::test(flavor = "multi_thread")]
async fn a_deferrable_exchange_across_partitions_is_held_and_reported_never_dead_lettered() {
    let table = TestTable::create("defer").await;
    let name = &table.name;
    app_db(&region_a())
        .await
        .batch_execute(&format!(
            "ALTER TABLE public.{name} ADD CONSTRAINT {name}_email UNIQUE (email) DEFERRABLE INITIALLY DEFERRED"
        ))
        .await
        .expect("deferrable unique constraint in A");
    let b = app_db(&region_b()).await;
    b.batch_execute(&format!(
        "CREATE UNIQUE INDEX {name}_email ON public.{name} (email)"
    ))
    .await
    .expect("unique index in B");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let toml = worker_toml(
        &table,
        &format!("cdc.public.{name}"),
        "unready_after = \"3s\"",
    )
    .replace(
        "[kafka]",
        &format!("[metrics]\nlisten = \"127.0.0.1:{port}\"\n[kafka]"),
    );
    let (mut worker, log) = spawn_worker(&toml, name);
    insert_users(&table, 1, 20).await;
    let ids: Vec<i64> = (1..=20).collect();
    let partition = partitions_of(&table, &ids).await;
    assert_eq!(table.wait_converged(Duration::from_secs(60)).await, 20);
    let (x, y) = ids
        .iter()
        .flat_map(|x| ids.iter().map(move |y| (*x, *y)))
        .find(|(x, y)| partition[x] != partition[y])
        .expect("two ids on different partitions");

    // The exchange, direct: only the deferred check lets A commit it.
    app_db(&region_a())
        .await
        .batch_execute(&format!(
            "BEGIN;
             UPDATE {name} SET email = 'g{y}@example.com' WHERE id = {x};
             UPDATE {name} SET email = 'g{x}@example.com' WHERE id = {y};
             COMMIT;"
        ))
        .await
        .expect("the exchange in A");

    let unique_waits =
        |text: &str| scraped(text, "regionsync_retries_total{reason=\"unique_wait\"");
    let logged = |key: i64| {
        log.lock().unwrap().iter().any(|l| {
            l.contains("a unique index refuses a change")
                && l.contains(&format!("public.{name}"))
                && (l.contains(&format!("key=\"{key}\"")) || l.contains(&format!("key={key} ")))
        })
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    let (text, ready) = loop {
        let (_, text) = http_text(port, "/metrics").await;
        let (status, ready) = http_text(port, "/readyz").await;
        if unique_waits(&text) >= 6.0 && logged(x) && logged(y) && status == 503 {
            break (text, ready);
        }
        if Instant::now() > deadline {
            let _ = worker.kill();
            let log = log.lock().unwrap();
            panic!(
                "both partitions not held and reported within 60 s ({} unique waits, /readyz {status});\nlog:\n{}",
                unique_waits(&text),
                log[log.len().saturating_sub(30)..].join("\n")
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    assert!(
        ready.contains("unique_wait") && ready.contains(&format!("public.{name}")),
        "/readyz names the cause and the table: {ready}"
    );
    assert_eq!(
        scraped(&text, "regionsync_dlq_messages_total"),
        0.0,
        "nothing dead-lettered"
    );
    let emails =
        |rows: Vec<tokio_postgres::Row>| -> Vec<String> { rows.iter().map(|r| r.get(0)).collect() };
    let select = format!("SELECT email FROM public.{name} WHERE id IN ({x}, {y}) ORDER BY id");
    assert_eq!(
        emails(b.query(&select, &[]).await.expect("select")),
        [
            format!("g{}@example.com", x.min(y)),
            format!("g{}@example.com", x.max(y))
        ],
        "B keeps the values from before the exchange: neither half is applied"
    );

    // The runbook's way out: B's index goes, the partitions catch up, the
    // index comes back (the exchange is complete, so it builds).
    let started = Instant::now();
    b.batch_execute(&format!("DROP INDEX public.{name}_email"))
        .await
        .expect("drop B's unique index");
    assert_eq!(table.wait_converged(Duration::from_secs(60)).await, 20);
    let recovered = started.elapsed();
    b.batch_execute(&format!(
        "CREATE UNIQUE INDEX {name}_email ON public.{name} (email)"
    ))
    .await
    .expect("B's unique index again");
    let (_, text) = http_text(port, "/metrics").await;
    assert_eq!(
        scraped(&text, "regionsync_dlq_messages_total"),
        0.0,
        "still nothing dead-lettered"
    );
    eprintln!(
        "deferrable exchange across partitions {} and {}: 2 changes written, 0 dead-lettered, {} unique waits, 2 arrived {recovered:?} after B's index was dropped",
        partition[&x],
        partition[&y],
        unique_waits(&text)
    );
    let _ = worker.kill();
    let _ = worker.wait();
}

/// Deletes the records of each partition `p` of B's `mirrored_topic`
/// below `upto[p]`, as retention would. The mirrored topics are
/// compacted, where Kafka deletes no records: deletion is allowed first
/// (`cleanup.policy = "compact,delete"`).
async fn delete_records_below(mirrored_topic: &str, upto: &[i64]) {
    use rdkafka::admin::{AdminClient, AdminOptions, AlterConfig, ResourceSpecifier};
    use rdkafka::client::DefaultClientContext;
    let admin: AdminClient<DefaultClientContext> = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &region_b().kafka)
        .create()
        .expect("admin client");
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    admin
        .alter_configs(
            &[AlterConfig::new(ResourceSpecifier::Topic(mirrored_topic))
                .set("cleanup.policy", "compact,delete")],
            &options,
        )
        .await
        .expect("alter configs")
        .into_iter()
        .for_each(|r| {
            r.expect("cleanup.policy compact,delete");
        });
    let mut tpl = rdkafka::TopicPartitionList::new();
    for (p, high) in upto.iter().enumerate() {
        tpl.add_partition_offset(mirrored_topic, p as i32, rdkafka::Offset::Offset(*high))
            .expect("partition offset");
    }
    // The new policy reaches the partitions' logs a moment later.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let deleted = admin
            .delete_records(&tpl, &options)
            .await
            .expect("delete records");
        let refused: Vec<String> = deleted
            .elements()
            .iter()
            .filter(|e| e.error().is_err())
            .map(|e| format!("{e:?}"))
            .collect();
        if refused.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "records deleted within 30 s: {refused:?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Waits until B's `mirrored_topic` (4 partitions) holds at least `n`
/// messages in all; its partitions' ends.
async fn mirrored_ends(mirrored_topic: &str, n: i64) -> Vec<i64> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let highs = ends(&region_b(), mirrored_topic, 4);
        if highs.iter().sum::<i64>() >= n {
            return highs;
        }
        assert!(
            Instant::now() < deadline,
            "{n} changes mirrored within 60 s"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Retention deleted the beginning of a mirrored topic before this region
/// ever applied it (a worker deployed, or a consumer group renamed, after
/// the topic's `retention.ms`): a partition with no stored offset whose
/// first offset is above 0 is stopped like a stored offset below it,
/// naming topic, partition and both offsets. Only
/// `kafka.accept_missing_history` starts it, from the first offset held.
#[tokio::test(flavor = "multi_thread")]
async fn a_partition_never_applied_whose_beginning_was_deleted_is_stopped() {
    let table = TestTable::create("firstgap").await;
    let topic = format!("cdc.public.{}", table.name);
    let mirrored_topic = mirrored(&region_a(), &topic);
    let dead_before = dead_lettered();
    insert_users(&table, 1, 20).await;
    let highs = mirrored_ends(&mirrored_topic, 20).await;
    delete_records_below(&mirrored_topic, &highs).await;
    let gapped: Vec<i32> = (0..4).filter(|p| highs[*p as usize] > 0).collect();
    assert!(!gapped.is_empty(), "some partition lost its beginning");

    let stopped = || {
        counters().gauge(
            "regionsync_partition_stopped",
            &[
                ("topic", mirrored_topic.as_str()),
                ("reason", "retention_gap"),
            ],
        ) as usize
    };
    let worker = Worker::start(worker_config(&table, &topic));
    wait_for(
        "every partition whose beginning was deleted stopped",
        Duration::from_secs(60),
        || stopped() == gapped.len(),
    )
    .await;
    // Later changes are not applied on a stopped partition either.
    insert_users(&table, 21, 10).await;
    let later = mirrored_ends(&mirrored_topic, highs.iter().sum::<i64>() + 10).await;
    let on_running: i64 = (0..4)
        .filter(|p| !gapped.contains(p))
        .map(|p| later[p as usize] - highs[p as usize])
        .sum();
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        rows_in_b(&table).await as i64,
        on_running,
        "nothing applied on a stopped partition"
    );
    assert_eq!(stopped(), gapped.len(), "still stopped");
    worker.stop().await;
    assert_eq!(stopped(), 0, "a stopped worker reports nothing");

    // The operator accepts the loss explicitly: every partition starts
    // from its first offset held, so the 10 later changes arrive and the
    // 20 deleted ones never do.
    let mut config = worker_config(&table, &topic);
    config.kafka.accept_missing_history = true;
    let worker = Worker::start(config);
    let deadline = Instant::now() + Duration::from_secs(60);
    while rows_in_b(&table).await < 10 {
        assert!(Instant::now() < deadline, "the 10 later changes arrive");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(rows_in_b(&table).await, 10, "the deleted 20 never arrive");
    assert_eq!(stopped(), 0, "nothing stopped once accepted");
    assert_eq!(dead_lettered(), dead_before, "nothing dead-lettered");
    eprintln!(
        "no stored offset, beginning deleted: 20 written and deleted, 0 dead-lettered, partitions {gapped:?} stopped (first offsets {highs:?}); with accept_missing_history 10 later changes arrived"
    );
    worker.stop().await;
}

/// Kafka freezes (SIGSTOP) the moment a partition is assigned, before its
/// stored offset is checked against the topic, and retention has deleted
/// changes never applied: the partition is not resumed unchecked. The
/// check is retried (`kafka_unavailable`), `/readyz` turns false, and once
/// Kafka answers the gap is found and its partitions stopped, nothing
/// skipped silently, nothing dead-lettered.
#[tokio::test(flavor = "multi_thread")]
async fn a_kafka_freeze_at_assignment_holds_the_partition_until_its_offset_is_checked() {
    let table = TestTable::create("wmfreeze").await;
    let topic = format!("cdc.public.{}", table.name);
    let mirrored_topic = mirrored(&region_a(), &topic);
    let worker = Worker::start(worker_config(&table, &topic));
    insert_users(&table, 1, 40).await;
    assert_eq!(table.wait_converged(Duration::from_secs(60)).await, 40);
    worker.stop().await;
    // 20 changes are deleted before they were applied.
    let applied = ends(&region_b(), &mirrored_topic, 4);
    insert_users(&table, 41, 20).await;
    let highs = mirrored_ends(&mirrored_topic, applied.iter().sum::<i64>() + 20).await;
    delete_records_below(&mirrored_topic, &highs).await;
    let gapped: Vec<i32> = (0..4)
        .filter(|p| applied[*p as usize] < highs[*p as usize])
        .collect();

    let kafka = stack_pid(&format!("kafka-{}", region_b().name));
    let _resume = Resume(kafka.clone());
    let (dead_before, held_before) = (dead_lettered(), retries("kafka_unavailable"));
    let to_freeze = kafka.clone();
    *regionsync::worker::BEFORE_WATERMARKS.lock().unwrap() = Some(Box::new(move || {
        let _ = Command::new("kill").arg("-STOP").arg(&to_freeze).status();
    }));
    let worker = Worker::start(worker_config_with(
        &table,
        &topic,
        r#"unready_after = "3s""#,
    ));
    wait_for(
        "retries of the check while Kafka is frozen",
        Duration::from_secs(60),
        || retries("kafka_unavailable") >= held_before + 2,
    )
    .await;
    wait_for(
        "/readyz false while the check waits",
        Duration::from_secs(30),
        || counters().gauge("regionsync_ready", &[]) == 0.0,
    )
    .await;
    let waited = retries("kafka_unavailable") - held_before;
    run(Command::new("kill").arg("-CONT").arg(&kafka));
    let thawed = Instant::now();
    let stopped = || {
        counters().gauge(
            "regionsync_partition_stopped",
            &[
                ("topic", mirrored_topic.as_str()),
                ("reason", "retention_gap"),
            ],
        ) as usize
    };
    wait_for(
        "the gap found once Kafka answers",
        Duration::from_secs(90),
        || stopped() == gapped.len(),
    )
    .await;
    let found = thawed.elapsed();
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(rows_in_b(&table).await, 40, "nothing after the gap applied");
    assert_eq!(dead_lettered(), dead_before, "nothing dead-lettered");
    eprintln!(
        "Kafka frozen at assignment: {waited} retries of the check; after SIGCONT the gap on partitions {gapped:?} was found in {found:?} (20 written and deleted, 0 dead-lettered, 0 arrived)"
    );
    worker.stop().await;
}

/// B's table is renamed away while changes arrive (a migration half done):
/// PostgreSQL answers 42P01 (undefined table), the partition holds and
/// retries (`postgres_schema`), nothing is dead-lettered; renamed back,
/// every row arrives.
#[tokio::test(flavor = "multi_thread")]
async fn a_missing_table_holds_the_partition_and_costs_no_change() {
    let table = TestTable::create("renamed").await;
    let topic = format!("cdc.public.{}", table.name);
    let worker = Worker::start(worker_config(&table, &topic));
    insert_users(&table, 1, 5).await;
    assert_eq!(table.wait_converged(Duration::from_secs(60)).await, 5);
    let b = app_db(&region_b()).await;
    let name = &table.name;
    b.batch_execute(&format!("ALTER TABLE public.{name} RENAME TO {name}_away"))
        .await
        .expect("rename away");
    let (dead_before, held_before) = (dead_lettered(), retries("postgres_schema"));
    insert_users(&table, 6, 20).await;
    wait_for(
        "retries for the missing table",
        Duration::from_secs(90),
        || retries("postgres_schema") >= held_before + 3,
    )
    .await;
    let kept: i64 = b
        .query_one(&format!("SELECT count(*) FROM public.{name}_away"), &[])
        .await
        .expect("count")
        .get(0);
    assert_eq!(kept, 5, "nothing applied while the table is missing");
    assert_eq!(dead_lettered(), dead_before, "nothing dead-lettered");
    // A held batch does not hold up a drain (a SIGTERM, a reload): it is
    // given up between two attempts, not waited for 8 s and aborted.
    let stopping = Instant::now();
    worker.stop().await;
    let drained = stopping.elapsed();
    assert!(
        drained < Duration::from_secs(4),
        "a held partition drains at once, not after 8 s: {drained:?}"
    );
    let worker = Worker::start(worker_config(&table, &topic));
    b.batch_execute(&format!("ALTER TABLE public.{name}_away RENAME TO {name}"))
        .await
        .expect("rename back");
    assert_eq!(
        table.wait_converged(Duration::from_secs(60)).await,
        25,
        "every row arrives once the table is back"
    );
    assert_eq!(dead_lettered(), dead_before, "still nothing dead-lettered");
    eprintln!(
        "table renamed away: 20 written, 0 dead-lettered, 20 arrived after the rename back; the held worker stopped in {drained:?}"
    );
    worker.stop().await;
}

/// B's table has a rule only this region has (an audit `NOTIFY` on
/// update): PostgreSQL refuses an upsert on a table with INSERT or UPDATE
/// rules with 0A000 (feature not supported). This region's setup, not the
/// row's fault: the partition holds and retries (`postgres_schema`),
/// nothing is dead-lettered; the rule dropped, every row arrives.
#[tokio::test(flavor = "multi_thread")]
async fn a_feature_this_regions_setup_lacks_holds_the_partition_and_costs_no_change() {
    let table = TestTable::create("rule").await;
    let topic = format!("cdc.public.{}", table.name);
    let worker = Worker::start(worker_config(&table, &topic));
    insert_users(&table, 1, 5).await;
    assert_eq!(table.wait_converged(Duration::from_secs(60)).await, 5);
    let b = app_db(&region_b()).await;
    let name = &table.name;
    b.batch_execute(&format!(
        "CREATE RULE audit AS ON UPDATE TO public.{name} DO ALSO NOTIFY {name}_changed"
    ))
    .await
    .expect("a rule");
    let drop_rule = format!("DROP RULE audit ON public.{name}");
    held_until_released(
        &table,
        (6, 20),
        ("postgres_schema", 3),
        true,
        || async move {
            b.batch_execute(&drop_rule).await.expect("drop the rule");
        },
    )
    .await;
    worker.stop().await;
}

/// Changes the worker never applied are deleted from a mirrored topic
/// (what retention does to a worker stopped for longer than the topic's
/// `retention.ms`): every partition whose stored offset is now below the
/// partition's first offset is stopped, named, counted, and nothing after
/// the gap is applied as if the gap were not there.
#[tokio::test(flavor = "multi_thread")]
async fn a_retention_gap_stops_its_partitions_and_skips_nothing() {
    let table = TestTable::create("gap").await;
    let topic = format!("cdc.public.{}", table.name);
    let mirrored_topic = mirrored(&region_a(), &topic);
    let group = format!("test-{}", table.name);
    let dead_before = dead_lettered();
    let worker = Worker::start(worker_config(&table, &topic));
    // Enough rows that every partition has an applied change, and so a
    // stored offset.
    insert_users(&table, 1, 40).await;
    assert_eq!(table.wait_converged(Duration::from_secs(60)).await, 40);
    worker.stop().await;
    let stored: std::collections::HashMap<i32, i64> = admin_db(&region_b())
        .await
        .query(
            "SELECT partition, next_offset FROM regionsync.offsets
              WHERE consumer_group = $1 AND topic = $2",
            &[&group, &mirrored_topic],
        )
        .await
        .expect("stored offsets")
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(stored.len(), 4, "an offset stored for each of 4 partitions");

    // 20 more changes reach B's Kafka while no worker runs...
    insert_users(&table, 41, 20).await;
    let applied: i64 = stored.values().sum();
    let deadline = Instant::now() + Duration::from_secs(60);
    let highs = loop {
        let highs = ends(&region_b(), &mirrored_topic, 4);
        if highs.iter().sum::<i64>() >= applied + 20 {
            break highs;
        }
        assert!(
            Instant::now() < deadline,
            "20 new changes mirrored within 60 s"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    // ... and are deleted before it comes back.
    delete_records_below(&mirrored_topic, &highs).await;
    let gapped: Vec<i32> = (0..4).filter(|p| stored[p] < highs[*p as usize]).collect();
    assert!(!gapped.is_empty(), "some partition lost unapplied changes");

    let worker = Worker::start(worker_config(&table, &topic));
    let stopped = || {
        counters().gauge(
            "regionsync_partition_stopped",
            &[
                ("topic", mirrored_topic.as_str()),
                ("reason", "retention_gap"),
            ],
        ) as usize
    };
    wait_for(
        "every partition with a gap stopped",
        Duration::from_secs(60),
        || stopped() == gapped.len(),
    )
    .await;
    // Nothing moves on, not even with changes after the gap: a stopped
    // partition stays where it was.
    insert_users(&table, 61, 10).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    let later = loop {
        let later = ends(&region_b(), &mirrored_topic, 4);
        if later.iter().sum::<i64>() >= highs.iter().sum::<i64>() + 10 {
            break later;
        }
        assert!(
            Instant::now() < deadline,
            "10 later changes mirrored within 60 s"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    let on_running: i64 = (0..4)
        .filter(|p| !gapped.contains(p))
        .map(|p| later[p as usize] - highs[p as usize])
        .sum();
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        rows_in_b(&table).await as i64,
        40 + on_running,
        "nothing after the gap applied on a stopped partition"
    );
    let after: Vec<(i32, i64)> = admin_db(&region_b())
        .await
        .query(
            "SELECT partition, next_offset FROM regionsync.offsets
              WHERE consumer_group = $1 AND topic = $2 ORDER BY partition",
            &[&group, &mirrored_topic],
        )
        .await
        .expect("stored offsets")
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    for (p, next) in after {
        if gapped.contains(&p) {
            assert_eq!(
                next, stored[&p],
                "stopped partition {p}'s stored offset did not move"
            );
        }
    }
    assert_eq!(stopped(), gapped.len(), "still stopped");
    assert_eq!(dead_lettered(), dead_before, "nothing dead-lettered");
    eprintln!(
        "retention gap: 20 changes written and deleted before they were applied, 0 dead-lettered, 0 arrived; partitions {gapped:?} stopped (stored {stored:?}, first offsets now {highs:?}); of 10 later changes {on_running} applied (on partitions not stopped)"
    );
    worker.stop().await;
}

/// A CHECK constraint only B has refuses some rows (the source's rows
/// passed the source's checks, so this region's schema differs): with the
/// table's `on_schema_mismatch = "dlq"` exactly those rows are
/// dead-lettered, reason `schema_mismatch`, naming table and constraint,
/// even under `on_error = "stop"`; every other row arrives.
#[tokio::test(flavor = "multi_thread")]
async fn a_row_only_this_regions_check_refuses_is_dead_lettered_as_a_schema_mismatch() {
    let table = TestTable::create("check").await;
    let name = &table.name;
    app_db(&region_b())
        .await
        .batch_execute(&format!(
            "ALTER TABLE public.{name} ADD CONSTRAINT {name}_young CHECK (age < 100)"
        ))
        .await
        .expect("a CHECK only B has");
    let topic = format!("cdc.public.{name}");
    let toml = worker_toml(&table, &topic, "")
        .replace("[kafka]", "on_error = \"stop\"\n[kafka]")
        .replace(
            "key = [\"id\"]",
            "key = [\"id\"]\non_schema_mismatch = \"dlq\"",
        );
    let refused_before = counters().total(
        "regionsync_dlq_messages_total",
        &[("reason", "schema_mismatch")],
    );
    let dead_before = dead_lettered();
    let worker = Worker::start(regionsync::config::Config::from_toml(&toml).expect("config"));
    app_db(&region_a())
        .await
        .execute(
            &format!(
                "INSERT INTO {name} (id, email, age)
                 SELECT g, 'g' || g || '@example.com', CASE WHEN g IN (3, 7) THEN 150 ELSE 30 END
                   FROM generate_series(1, 10) g"
            ),
            &[],
        )
        .await
        .expect("insert in A");
    wait_for("two dead letters", Duration::from_secs(60), || {
        counters().total(
            "regionsync_dlq_messages_total",
            &[("reason", "schema_mismatch")],
        ) >= refused_before + 2
    })
    .await;
    let deadline = Instant::now() + Duration::from_secs(60);
    while rows_in_b(&table).await < 8 {
        assert!(Instant::now() < deadline, "8 rows in B within 60 s");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let ids: Vec<i64> = app_db(&region_b())
        .await
        .query(&format!("SELECT id FROM {name} ORDER BY id"), &[])
        .await
        .expect("ids in B")
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(ids, [1, 2, 4, 5, 6, 8, 9, 10], "all but the refused rows");
    assert_eq!(dead_lettered(), dead_before + 2, "exactly the refused rows");

    let dlq_topic = format!("regionsync.dlq.test-{name}");
    let deadline = Instant::now() + Duration::from_secs(30);
    let letters = tokio::task::block_in_place(|| {
        TopicReader::open(&region_b(), &dlq_topic, deadline).collect(
            deadline,
            |_| true,
            |found| found.len() >= 2,
        )
    });
    assert_eq!(letters.len(), 2, "two dead letters on {dlq_topic}");
    for letter in &letters {
        let h = headers(letter);
        assert_eq!(
            h.get("regionsync.reason").map(String::as_str),
            Some("schema_mismatch"),
            "{h:?}"
        );
        let error = h.get("regionsync.error").cloned().unwrap_or_default();
        assert!(
            error.contains(&format!("public.{name}")) && error.contains(&format!("{name}_young")),
            "the error names the table and the constraint: {error}"
        );
    }
    // on_error = "stop" did not stop it: later rows still arrive.
    insert_users(&table, 11, 2).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    while rows_in_b(&table).await < 10 {
        assert!(Instant::now() < deadline, "later rows arrive");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    eprintln!(
        "CHECK only in B: 10 written, 2 dead-lettered (schema_mismatch), 8 arrived, then 2 more"
    );
    worker.stop().await;
}

/// A statement stuck on a lock this region's application holds (a long
/// migration, a forgotten open transaction): PostgreSQL cancels it after
/// `postgres.statement_timeout` (57014), the batch is retried
/// (`postgres_unavailable`) and nothing is dead-lettered; once the lock
/// is released every row arrives.
#[tokio::test(flavor = "multi_thread")]
async fn a_statement_stuck_on_a_lock_is_cancelled_and_retried_without_a_dead_letter() {
    let table = TestTable::create("locked").await;
    let topic = format!("cdc.public.{}", table.name);
    let mut config = worker_config(&table, &topic);
    config.postgres.statement_timeout = Duration::from_secs(1);
    let worker = Worker::start(config);
    insert_users(&table, 1, 5).await;
    assert_eq!(table.wait_converged(Duration::from_secs(60)).await, 5);
    let b = lock_in_b(&table).await;
    let held = held_until_released(
        &table,
        (6, 20),
        ("postgres_unavailable", 2),
        true,
        || async move {
            b.batch_execute("ROLLBACK").await.expect("release the lock");
        },
    )
    .await;
    eprintln!(
        "table locked: 20 written, 0 dead-lettered, {} retries, 20 arrived {:?} after the release",
        held.retries, held.recovered_in
    );
    worker.stop().await;
}

/// A connection to B holding `table`'s lock in an open transaction
/// (EXCLUSIVE: the worker's writes wait, the test's reads do not); its
/// `ROLLBACK` releases it.
async fn lock_in_b(table: &TestTable) -> tokio_postgres::Client {
    let b = app_db(&region_b()).await;
    b.batch_execute(&format!(
        "BEGIN; LOCK TABLE public.{} IN EXCLUSIVE MODE",
        table.name
    ))
    .await
    .expect("hold the table's lock (writes wait; the test's reads do not)");
    b
}

/// No pooled connection is free: the pool has one, and a batch holds it
/// with a statement waiting on a lock the test holds (its
/// `statement_timeout`, 60 s, is not reached). The other partitions'
/// batches wait `pool_wait_timeout` (1 s) for it and are retried
/// (`postgres_unavailable`), nothing is dead-lettered, and every row
/// arrives once the lock is released.
#[tokio::test(flavor = "multi_thread")]
async fn a_pool_without_a_free_connection_is_waited_out_without_a_dead_letter() {
    let table = TestTable::create("poolwait").await;
    let topic = format!("cdc.public.{}", table.name);
    let mut config = worker_config(&table, &topic);
    config.postgres.pool_size = 1;
    config.postgres.pool_wait_timeout = Duration::from_secs(1);
    config.postgres.statement_timeout = Duration::from_secs(60);
    let worker = Worker::start(config);
    insert_users(&table, 1, 8).await;
    assert_eq!(table.wait_converged(Duration::from_secs(60)).await, 8);
    let b = lock_in_b(&table).await;
    let held = held_until_released(
        &table,
        (9, 20),
        ("postgres_unavailable", 2),
        true,
        || async move {
            b.batch_execute("ROLLBACK").await.expect("release the lock");
        },
    )
    .await;
    // Well before the held statement's own timeout: these are pool waits.
    assert!(
        held.held_for < Duration::from_secs(50),
        "retried before any statement_timeout: {:?}",
        held.held_for
    );
    eprintln!(
        "pool wait: 20 written, 0 dead-lettered, {} retries in {:?}, all arrived {:?} after the release",
        held.retries, held.held_for, held.recovered_in
    );
    worker.stop().await;
}

/// Drops every packet to and from a TCP port (the connection neither
/// answers nor is reset: half-open) for as long as it lives; the rules go
/// when it is dropped, on a panic too.
struct Blackhole(String);

impl Blackhole {
    fn port(port: u16) -> Blackhole {
        let hole = Blackhole(port.to_string());
        for rule in hole.rules() {
            let status = Command::new("iptables")
                .arg("-I")
                .args(&rule)
                .status()
                .expect("iptables (the test needs it, as root)");
            assert!(status.success(), "iptables -I {rule:?}: {status}");
        }
        hole
    }

    fn rules(&self) -> Vec<Vec<String>> {
        ["--dport", "--sport"]
            .iter()
            .map(|dir| {
                ["INPUT", "-p", "tcp", dir, &self.0, "-j", "DROP"]
                    .iter()
                    .map(|s| s.to_string())
                    .collect()
            })
            .collect()
    }
}

impl Drop for Blackhole {
    fn drop(&mut self) {
        for rule in self.rules() {
            let _ = Command::new("iptables").arg("-D").args(&rule).status();
        }
    }
}

/// B's PostgreSQL stops answering without closing anything (every packet
/// of its port dropped): the batch sent into the dead connection fails
/// within `tcp_user_timeout` (2 s here) instead of stalling, new
/// connections within `connect_timeout`, and is retried
/// (`postgres_unavailable`); nothing is dead-lettered, every row arrives
/// once packets pass again.
#[tokio::test(flavor = "multi_thread")]
async fn a_half_open_postgres_connection_fails_the_batch_and_is_retried() {
    let table = TestTable::create("halfopen").await;
    let topic = format!("cdc.public.{}", table.name);
    let mut config = worker_config(&table, &topic);
    config.postgres.tcp_user_timeout = Duration::from_secs(2);
    config.postgres.keepalives_idle = Duration::from_secs(2);
    config.postgres.connect_timeout = Duration::from_secs(2);
    let worker = Worker::start(config);
    insert_users(&table, 1, 8).await;
    assert_eq!(table.wait_converged(Duration::from_secs(60)).await, 8);
    let hole = Blackhole::port(region_b().pg_port);
    // B cannot be read while its packets are dropped.
    let held = held_until_released(
        &table,
        (9, 20),
        ("postgres_unavailable", 2),
        false,
        || async move {
            drop(hole);
        },
    )
    .await;
    eprintln!(
        "half-open PostgreSQL: 20 written, 0 dead-lettered, 2 retries {:?} after the cut ({} in all), all arrived {:?} after packets passed again",
        held.held_for, held.retries, held.recovered_in
    );
    worker.stop().await;
}

/// A message that arrives outside its partition's own queue (a test hook
/// starts one partition without its queue, so its messages reach the
/// consumer's main queue) stops the worker, naming the partition, before
/// anything of it is applied; a worker started again resumes from the
/// stored offsets: every row arrives, nothing dead-lettered.
#[tokio::test(flavor = "multi_thread")]
async fn a_message_outside_its_partition_queue_stops_the_worker_and_a_restart_resumes() {
    let table = TestTable::create("mainq").await;
    let topic = format!("cdc.public.{}", table.name);
    let mirrored_topic = mirrored(&region_a(), &topic);
    let dead_before = dead_lettered();
    *regionsync::worker::NO_OWN_QUEUE_FOR.lock().unwrap() = Some((mirrored_topic.clone(), 0));
    let worker = Worker::start(worker_config(&table, &topic));
    insert_users(&table, 1, 40).await;
    let err = worker
        .ended(Duration::from_secs(60))
        .await
        .expect_err("the worker stops");
    let text = format!("{err:#}");
    assert!(
        text.contains(&format!(
            "a message of {mirrored_topic}/0 arrived outside its partition queue"
        )),
        "{text}"
    );
    assert!(
        regionsync::worker::NO_OWN_QUEUE_FOR
            .lock()
            .unwrap()
            .is_none(),
        "the hook fired"
    );
    let worker = Worker::start(worker_config(&table, &topic));
    assert_eq!(
        table.wait_converged(Duration::from_secs(60)).await,
        40,
        "every row after the restart"
    );
    assert_eq!(dead_lettered(), dead_before, "nothing dead-lettered");
    worker.stop().await;
}

/// Kafka keeps refusing the check of one newly assigned partition (its
/// offsets, as a missing ACL would): that partition stays paused and is
/// retried (`kafka_unavailable`), while the other partitions of the same
/// assignment start and apply; a drain (SIGTERM) ends its wait at once;
/// once Kafka answers, its changes arrive. Nothing dead-lettered.
#[tokio::test(flavor = "multi_thread")]
async fn a_partition_whose_check_kafka_refuses_holds_only_itself() {
    let table = TestTable::create("refusedcheck").await;
    let topic = format!("cdc.public.{}", table.name);
    let mirrored_topic = mirrored(&region_a(), &topic);
    let (dead_before, retried_before) = (dead_lettered(), retries("kafka_unavailable"));
    insert_users(&table, 1, 40).await;
    let ids: Vec<i64> = (1..=40).collect();
    let partitions = partitions_of(&table, &ids).await;
    let held = partitions[&1];
    let elsewhere = ids.iter().filter(|id| partitions[id] != held).count();
    assert!(elsewhere > 0, "the ids span several partitions");
    *regionsync::worker::REFUSE_WATERMARKS_OF.lock().unwrap() =
        Some((mirrored_topic.clone(), held));
    let worker = Worker::start(worker_config(&table, &topic));
    let deadline = Instant::now() + Duration::from_secs(60);
    while rows_in_b(&table).await < elsewhere {
        assert!(
            Instant::now() < deadline,
            "the other partitions apply while one check is refused"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    wait_for(
        "retries of the refused check",
        Duration::from_secs(30),
        || retries("kafka_unavailable") >= retried_before + 2,
    )
    .await;
    assert_eq!(
        rows_in_b(&table).await,
        elsewhere,
        "nothing of the unchecked partition applied"
    );
    let stopping = Instant::now();
    worker.stop().await;
    let drained = stopping.elapsed();
    assert!(
        drained < Duration::from_secs(4),
        "the check's wait ends with the drain: {drained:?}"
    );
    *regionsync::worker::REFUSE_WATERMARKS_OF.lock().unwrap() = None;
    let worker = Worker::start(worker_config(&table, &topic));
    assert_eq!(table.wait_converged(Duration::from_secs(60)).await, 40);
    assert_eq!(dead_lettered(), dead_before, "nothing dead-lettered");
    eprintln!(
        "check refused on partition {held}: 40 written, {elsewhere} arrived meanwhile on the other partitions, {} retries, drained in {drained:?}, 40 after Kafka answered, 0 dead-lettered",
        retries("kafka_unavailable") - retried_before
    );
    worker.stop().await;
}

/// Retention runs between a partition's check against the topic and its
/// seek (a partition never applied, whose topic began at 0 when checked):
/// the seek goes to the offset the check accepted, librdkafka finds it
/// gone and starts at the first offset left, and the partition's task
/// finds the gap with its first message and stops the partition, as the
/// check would have. Seeking to "the beginning" instead would have
/// applied the later changes past the gap silently.
#[tokio::test(flavor = "multi_thread")]
async fn retention_between_the_check_and_the_seek_stops_the_partition() {
    let table = TestTable::create("seekgap").await;
    let topic = format!("cdc.public.{}", table.name);
    let mirrored_topic = mirrored(&region_a(), &topic);
    let dead_before = dead_lettered();
    insert_users(&table, 1, 20).await;
    let ids: Vec<i64> = (1..=40).collect();
    let highs = mirrored_ends(&mirrored_topic, 20).await;
    // The first partition of the table's topic to pass its check has
    // its records deleted before its seek.
    let (reached_tx, reached_rx) = std::sync::mpsc::channel::<i32>();
    let (deleted_tx, deleted_rx) = std::sync::mpsc::channel::<()>();
    *regionsync::worker::BEFORE_SEEK.lock().unwrap() = Some((
        mirrored_topic.clone(),
        Box::new(move |partition| {
            let _ = reached_tx.send(partition);
            let _ = deleted_rx.recv_timeout(Duration::from_secs(60));
        }),
    ));
    let worker = Worker::start(worker_config(&table, &topic));
    let gapped = tokio::task::block_in_place(|| reached_rx.recv_timeout(Duration::from_secs(60)))
        .expect("a partition reached its seek");
    let upto: Vec<i64> = (0..4)
        .map(|p| if p == gapped { highs[p as usize] } else { 0 })
        .collect();
    delete_records_below(&mirrored_topic, &upto).await;
    deleted_tx.send(()).expect("release the seek");
    // Later changes: the gapped partition's show the gap (were it left
    // empty, its first message after the seek is one of them).
    insert_users(&table, 21, 20).await;
    let partitions = partitions_of(&table, &ids[20..]).await;
    let stopped = || {
        counters().gauge(
            "regionsync_partition_stopped",
            &[
                ("topic", mirrored_topic.as_str()),
                ("partition", gapped.to_string().as_str()),
                ("reason", "retention_gap"),
            ],
        )
    };
    wait_for(
        "the partition stopped at the gap after its seek",
        Duration::from_secs(60),
        || stopped() == 1.0,
    )
    .await;
    let elsewhere: Vec<i64> = ids[20..]
        .iter()
        .copied()
        .filter(|id| partitions[id] != gapped)
        .collect();
    let ids_in_b = || async {
        app_db(&region_b())
            .await
            .query(&format!("SELECT id FROM public.{}", table.name), &[])
            .await
            .expect("ids in B")
            .iter()
            .map(|r| r.get::<_, i64>(0))
            .collect::<std::collections::HashSet<i64>>()
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let in_b = ids_in_b().await;
        if elsewhere.iter().all(|id| in_b.contains(id)) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the other partitions' later changes arrive"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let in_b = ids_in_b().await;
    let past_gap: Vec<i64> = ids[20..]
        .iter()
        .copied()
        .filter(|id| partitions[id] == gapped && in_b.contains(id))
        .collect();
    assert!(
        past_gap.is_empty(),
        "nothing applied past the gap: {past_gap:?}"
    );
    assert_eq!(dead_lettered(), dead_before, "nothing dead-lettered");
    eprintln!(
        "retention between check and seek on partition {gapped}: {} of its changes deleted unapplied, partition stopped, 0 applied past the gap, {} later changes on the other partitions arrived, 0 dead-lettered",
        highs[gapped as usize],
        elsewhere.len()
    );
    worker.stop().await;
}

/// Where each id's change is on B's mirrored topic: (partition, offset).
async fn placed(table: &TestTable, ids: &[i64]) -> std::collections::HashMap<i64, (i32, i64)> {
    let topic = mirrored(&region_a(), &format!("cdc.public.{}", table.name));
    let deadline = Instant::now() + Duration::from_secs(60);
    let wanted: std::collections::HashSet<i64> = ids.iter().copied().collect();
    let found = tokio::task::block_in_place(|| {
        TopicReader::open(&region_b(), &topic, deadline).collect(
            deadline,
            |m| {
                json_payload(m.key())
                    .is_some_and(|k| k["id"].as_i64().is_some_and(|id| wanted.contains(&id)))
            },
            |found| found.len() >= wanted.len(),
        )
    });
    let map: std::collections::HashMap<i64, (i32, i64)> = found
        .iter()
        .filter_map(|m| {
            Some((
                json_payload(m.key())?["id"].as_i64()?,
                (m.partition(), m.offset()),
            ))
        })
        .collect();
    assert_eq!(
        map.len(),
        wanted.len(),
        "every id's change is on the mirrored topic"
    );
    map
}

/// The ids of the test's table in B.
async fn ids_in_b(table: &TestTable) -> std::collections::HashSet<i64> {
    app_db(&region_b())
        .await
        .query(&format!("SELECT id FROM public.{}", table.name), &[])
        .await
        .expect("ids in B")
        .iter()
        .map(|r| r.get::<_, i64>(0))
        .collect()
}

/// Retention deletes changes a running worker has not fetched yet (it is
/// behind: its batches wait on a lock in B, and its consumer fetches at
/// most one record batch ahead). librdkafka finds the fetch position
/// outside the partition; with `auto.offset.reset = error` that reaches
/// the partition's task, which stops the partition as the check at
/// assignment would (`retention_gap`, naming topic, partition, the stored
/// offset and the first offset), instead of jumping to the first offset
/// left (the gap skipped silently). The changes after the gap are not
/// applied, nothing is dead-lettered, the other partitions apply all.
#[tokio::test(flavor = "multi_thread")]
async fn retention_past_a_running_workers_position_stops_the_partition() {
    let table = TestTable::create("behind").await;
    let name = &table.name;
    let topic = format!("cdc.public.{name}");
    let mirrored_topic = mirrored(&region_a(), &topic);
    let group = format!("test-{name}");
    let mut config = worker_config_with(&table, &topic, "batch_max_rows = 1");
    config.postgres.statement_timeout = Duration::from_secs(1);
    // One record batch in a partition's queue at most: the consumer does
    // not prefetch past what the held batch is waiting to apply.
    for (k, v) in [
        ("queued.min.messages", "1"),
        ("queued.max.messages.kbytes", "1"),
        ("fetch.message.max.bytes", "1024"),
    ] {
        config.kafka.properties.insert(k.into(), v.into());
    }
    let dead_before = dead_lettered();
    let worker = Worker::start(config);
    insert_users(&table, 1, 8).await;
    assert_eq!(table.wait_converged(Duration::from_secs(60)).await, 8);

    let b = app_db(&region_b()).await;
    b.batch_execute(&format!(
        "BEGIN; LOCK TABLE public.{name} IN ACCESS EXCLUSIVE MODE"
    ))
    .await
    .expect("hold the table's lock");
    let retried_before = retries("postgres_unavailable");
    insert_users(&table, 9, 40).await;
    wait_for(
        "the worker held at the lock",
        Duration::from_secs(60),
        || retries("postgres_unavailable") > retried_before,
    )
    .await;
    // Every partition's queue holds what was fetched; these are not.
    tokio::time::sleep(Duration::from_secs(2)).await;
    insert_users(&table, 49, 40).await;
    let before_gap: Vec<i64> = (1..=88).collect();
    let place = placed(&table, &before_gap).await;
    let highs = mirrored_ends(&mirrored_topic, 88).await;
    // The partition with the most changes waiting loses them all.
    let gapped = (0..4)
        .max_by_key(|p| place.values().filter(|(q, _)| q == p).count())
        .expect("a partition");
    let upto: Vec<i64> = (0..4)
        .map(|p| if p == gapped { highs[p as usize] } else { 0 })
        .collect();
    delete_records_below(&mirrored_topic, &upto).await;
    // Changes after the gap: not one of the gapped partition's may apply.
    insert_users(&table, 89, 20).await;
    let after_gap: Vec<i64> = (89..=108).collect();
    let place_after = placed(&table, &after_gap).await;
    b.batch_execute("ROLLBACK").await.expect("release the lock");
    let released = Instant::now();

    let stopped = || {
        counters().gauge(
            "regionsync_partition_stopped",
            &[
                ("topic", mirrored_topic.as_str()),
                ("partition", gapped.to_string().as_str()),
                ("reason", "retention_gap"),
            ],
        )
    };
    wait_for(
        "the partition stopped at the gap",
        Duration::from_secs(60),
        || stopped() == 1.0,
    )
    .await;
    let stopped_after = released.elapsed();
    let stored: i64 = admin_db(&region_b())
        .await
        .query_one(
            "SELECT next_offset FROM regionsync.offsets
              WHERE consumer_group = $1 AND topic = $2 AND partition = $3",
            &[&group, &mirrored_topic, &gapped],
        )
        .await
        .expect("the stopped partition's stored offset")
        .get(0);
    assert!(
        stored < highs[gapped as usize],
        "the worker was behind: stored {stored}, deleted below {}",
        highs[gapped as usize]
    );
    // Every change of the other partitions, and the gapped partition's
    // below its stored offset, and nothing else.
    let expected: std::collections::HashSet<i64> = place
        .iter()
        .chain(place_after.iter())
        .filter(|(_, (p, offset))| *p != gapped || *offset < stored)
        .map(|(id, _)| *id)
        .collect();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !expected.is_subset(&ids_in_b(&table).await) {
        assert!(
            Instant::now() < deadline,
            "the other partitions' changes arrive"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        ids_in_b(&table).await,
        expected,
        "nothing of the gapped partition applied past its stored offset"
    );
    let stored_later: i64 = admin_db(&region_b())
        .await
        .query_one(
            "SELECT next_offset FROM regionsync.offsets
              WHERE consumer_group = $1 AND topic = $2 AND partition = $3",
            &[&group, &mirrored_topic, &gapped],
        )
        .await
        .expect("stored offset")
        .get(0);
    assert_eq!(
        stored_later, stored,
        "the stopped partition stays where it was"
    );
    assert_eq!(stopped(), 1.0, "still stopped");
    assert_eq!(dead_lettered(), dead_before, "nothing dead-lettered");
    let lost = highs[gapped as usize] - stored;
    let later_there = place_after.values().filter(|(p, _)| *p == gapped).count();
    eprintln!(
        "retention behind a running worker: partition {gapped} stopped {stopped_after:?} after the release at stored offset {stored} (first offset now {}): {lost} changes deleted unfetched, 0 of its {later_there} later changes applied, {} changes arrived (all of the other partitions', the stopped one's below its offset), 0 dead-lettered",
        highs[gapped as usize],
        expected.len()
    );
    worker.stop().await;
}

/// An exclusion constraint (23P01) refuses a change even in source order:
/// the value is still held by a row of another partition whose change has
/// not landed (held here by a row lock in B). As a unique index: the
/// partition waits at the change (`unique_wait`), nothing is
/// dead-lettered, and it converges once the other partition applies.
#[tokio::test(flavor = "multi_thread")]
async fn an_exclusion_constraint_the_source_satisfied_waits_and_costs_no_change() {
    let table = TestTable::create("excl").await;
    let name = &table.name;
    for region in [region_a(), region_b()] {
        app_db(&region)
            .await
            .batch_execute(&format!(
                "ALTER TABLE public.{name} ADD CONSTRAINT {name}_email_excl
                     EXCLUDE USING btree (email WITH =)"
            ))
            .await
            .expect("exclusion constraint on email");
    }
    let topic = format!("cdc.public.{name}");
    let mut config = worker_config(&table, &topic);
    config.postgres.statement_timeout = Duration::from_secs(1);
    let worker = Worker::start(config);
    insert_users(&table, 1, 20).await;
    let ids: Vec<i64> = (1..=20).collect();
    let partition = partitions_of(&table, &ids).await;
    assert_eq!(table.wait_converged(Duration::from_secs(60)).await, 20);
    // x gives its email up to y, on another partition.
    let (x, y) = ids
        .iter()
        .flat_map(|x| ids.iter().map(move |y| (*x, *y)))
        .find(|(x, y)| partition[x] != partition[y])
        .expect("two ids on two partitions");
    // x's partition cannot apply in B until the lock is released.
    let b = app_db(&region_b()).await;
    b.batch_execute(&format!(
        "BEGIN; SELECT 1 FROM public.{name} WHERE id = {x} FOR UPDATE"
    ))
    .await
    .expect("lock x's row in B");
    let (dead_before, waits_before) = (dead_lettered(), retries("unique_wait"));
    app_db(&region_a())
        .await
        .batch_execute(&format!(
            "BEGIN;
             UPDATE {name} SET email = 'moved-{x}' WHERE id = {x};
             UPDATE {name} SET email = 'g{x}@example.com' WHERE id = {y};
             COMMIT;"
        ))
        .await
        .expect("x's email to y in A");
    wait_for(
        "y's partition waits at the exclusion constraint",
        Duration::from_secs(60),
        || retries("unique_wait") > waits_before,
    )
    .await;
    let y_email: String = app_db(&region_b())
        .await
        .query_one(
            &format!("SELECT email FROM public.{name} WHERE id = {y}"),
            &[],
        )
        .await
        .expect("y in B")
        .get(0);
    assert_eq!(y_email, format!("g{y}@example.com"), "y not changed yet");
    assert_eq!(dead_lettered(), dead_before, "nothing dead-lettered");
    b.batch_execute("ROLLBACK").await.expect("release x's row");
    let released = Instant::now();
    assert_eq!(table.wait_converged(Duration::from_secs(60)).await, 20);
    let converged = released.elapsed();
    assert_eq!(dead_lettered(), dead_before, "still nothing dead-lettered");
    eprintln!(
        "exclusion constraint: 2 changes, {} waits (unique_wait), 0 dead-lettered, converged {converged:?} after the release",
        retries("unique_wait") - waits_before
    );
    worker.stop().await;
}

/// Messages of a replicated table without its version columns, or
/// without its key column, produced into the mirrored topic: each is
/// dead-lettered `bad_shape`, the error naming the table and the column;
/// the partition's stored offset moves past them and the next good
/// change applies.
#[tokio::test(flavor = "multi_thread")]
async fn a_row_without_its_version_columns_or_key_is_dead_lettered_bad_shape() {
    use rdkafka::producer::{FutureProducer, FutureRecord};
    use serde_json::json;
    let table = TestTable::create("shape").await;
    let name = &table.name;
    let topic = format!("cdc.public.{name}");
    let mirrored_topic = mirrored(&region_a(), &topic);
    let dead_before = dead_lettered();
    let worker = Worker::start(worker_config(&table, &topic));
    insert_users(&table, 1, 4).await;
    assert_eq!(table.wait_converged(Duration::from_secs(60)).await, 4);

    let event = |after: serde_json::Value| {
        serde_json::to_vec(&json!({
            "before": null,
            "after": after,
            "source": {"ts_ms": now_ms(), "schema": "public", "table": name, "lsn": 1, "snapshot": "false"},
            "op": "c",
            "ts_ms": now_ms()
        }))
        .expect("json")
    };
    let poison = [
        (
            900_001,
            json!({"id": 900_001, "email": "s1@example.com", "status": "active",
                   "created_at": "2024-01-01T00:00:00Z"}),
            "the change has no version column hlc",
        ),
        (
            900_002,
            json!({"email": "s2@example.com", "status": "active",
                   "created_at": "2024-01-01T00:00:00Z", "hlc": now_ms() << 16,
                   "origin_region": "us-east-1"}),
            "the change has no key column id",
        ),
    ];
    let producer: FutureProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &region_b().kafka)
        .create()
        .expect("producer");
    let mut produced = Vec::new();
    for (id, after, _) in &poison {
        let key = serde_json::to_vec(&json!({ "id": id })).expect("key");
        let value = event(after.clone());
        let delivery = producer
            .send(
                FutureRecord::to(&mirrored_topic)
                    .key(key.as_slice())
                    .payload(value.as_slice())
                    .partition(0),
                Duration::from_secs(10),
            )
            .await
            .unwrap_or_else(|(e, _)| panic!("produce {id}: {e}"));
        produced.push(delivery.offset);
    }
    // The next good changes, after them.
    insert_users(&table, 5, 8).await;
    assert_eq!(table.wait_converged(Duration::from_secs(60)).await, 12);
    let dlq = format!("regionsync.dlq.test-{name}");
    let deadline = Instant::now() + Duration::from_secs(60);
    let dead = tokio::task::block_in_place(|| {
        TopicReader::open(&region_b(), &dlq, deadline).collect(
            deadline,
            |_| true,
            |found| found.len() >= poison.len(),
        )
    });
    assert_eq!(dead.len(), poison.len(), "one dead letter per message");
    for ((_, _, problem), offset) in poison.iter().zip(&produced) {
        let letter = dead
            .iter()
            .find(|m| headers(m).get("regionsync.offset") == Some(&offset.to_string()))
            .unwrap_or_else(|| panic!("a dead letter of offset {offset}"));
        let h = headers(letter);
        assert_eq!(h["regionsync.reason"], "bad_shape");
        assert_eq!(
            h["regionsync.error"],
            format!("public.{name}: {problem}"),
            "the error names the table and the column"
        );
    }
    let group = format!("test-{name}");
    let last = *produced.iter().max().expect("offsets");
    let stored = || async {
        admin_db(&region_b())
            .await
            .query_one(
                "SELECT next_offset FROM regionsync.offsets
                  WHERE consumer_group = $1 AND topic = $2 AND partition = 0",
                &[&group, &mirrored_topic],
            )
            .await
            .map(|r| r.get::<_, i64>(0))
            .unwrap_or(-1)
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while stored().await <= last {
        assert!(
            Instant::now() < deadline,
            "the stored offset moves past the dead letters"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    wait_for("both dead letters counted", Duration::from_secs(30), || {
        dead_lettered() == dead_before + 2
    })
    .await;
    eprintln!(
        "bad shape: 2 messages dead-lettered bad_shape (offsets {produced:?} of partition 0), stored offset now {}, 8 later changes arrived",
        stored().await
    );
    worker.stop().await;
}

/// A batch whose dead letter was produced before its transaction, and
/// whose transaction is then refused (a revoked grant) and given up (the
/// worker stopped while held) is tried again by the next worker of this
/// process: the dead letter is not produced a second time. One poison
/// message and 20 rows: exactly 1 dead letter, every row after the GRANT.
#[tokio::test(flavor = "multi_thread")]
async fn a_batch_given_up_after_its_dead_letter_does_not_produce_it_again() {
    use rdkafka::producer::{FutureProducer, FutureRecord};
    let table = TestTable::create("dlqonce").await;
    let topic = format!("cdc.public.{}", table.name);
    let mirrored_topic = mirrored(&region_a(), &topic);
    let b = app_db(&region_b()).await;
    b.batch_execute(&format!(
        "REVOKE INSERT, UPDATE ON public.{} FROM regionsync",
        table.name
    ))
    .await
    .expect("revoke");
    let producer: FutureProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &region_b().kafka)
        .create()
        .expect("producer");
    // The poison first on every partition, then the rows: each partition's
    // first batch holds a dead letter and rows the grant refuses.
    let dead_before = dead_lettered();
    for p in 0..4 {
        producer
            .send(
                FutureRecord::<'_, [u8], [u8]>::to(&mirrored_topic)
                    .key(format!("{{\"id\":{}}}", 900_000 + p).as_bytes())
                    .payload(b"not json at all")
                    .partition(p),
                Duration::from_secs(10),
            )
            .await
            .unwrap_or_else(|(e, _)| panic!("produce the poison: {e}"));
    }
    insert_users(&table, 1, 20).await;
    mirrored_ends(&mirrored_topic, 24).await;
    let held_before = retries("postgres_permission");
    let worker = Worker::start(worker_config(&table, &topic));
    wait_for(
        "retries for the missing grant",
        Duration::from_secs(60),
        || retries("postgres_permission") >= held_before + 4,
    )
    .await;
    wait_for("the 4 dead letters", Duration::from_secs(30), || {
        dead_lettered() >= dead_before + 4
    })
    .await;
    // Given up while held, and tried again by a new worker.
    worker.stop().await;
    let held_before = retries("postgres_permission");
    let worker = Worker::start(worker_config(&table, &topic));
    wait_for(
        "retries of the batches tried again",
        Duration::from_secs(60),
        || retries("postgres_permission") >= held_before + 4,
    )
    .await;
    b.batch_execute(&format!(
        "GRANT INSERT, UPDATE ON public.{} TO regionsync",
        table.name
    ))
    .await
    .expect("grant");
    assert_eq!(table.wait_converged(Duration::from_secs(60)).await, 20);
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        dead_lettered() - dead_before,
        4,
        "each poison message dead-lettered exactly once"
    );
    eprintln!(
        "dead letters before a refused transaction, batches given up and tried again: 4 poison + 20 rows written, 4 dead letters (not 8), 20 arrived after the GRANT"
    );
    worker.stop().await;
}

/// PostgreSQL refuses a batch at its commit, in a statement no change
/// owns: a deferred constraint trigger of B's (enabled ALWAYS, so it fires
/// for the apply sessions too) refuses every commit while a "blocker" row
/// exists. The source satisfied its own constraints, so no change is at
/// fault: the partition is held and retried (`postgres_refused`) with the
/// backoff, never in a loop, nothing is dead-lettered, and every row
/// arrives once the blocker is gone.
#[tokio::test(flavor = "multi_thread")]
async fn a_commit_a_deferred_constraint_refuses_is_retried_never_dead_lettered() {
    let table = TestTable::create("deferred").await;
    let topic = format!("cdc.public.{}", table.name);
    let name = &table.name;
    let b = app_db(&region_b()).await;
    b.batch_execute(&format!(
        "CREATE TABLE public.{name}_blocker (x int PRIMARY KEY);
         INSERT INTO public.{name}_blocker VALUES (1);
         CREATE FUNCTION public.{name}_refuse() RETURNS trigger
             LANGUAGE plpgsql SECURITY DEFINER AS $$
             BEGIN
                 IF EXISTS (SELECT 1 FROM public.{name}_blocker) THEN
                     RAISE EXCEPTION 'refused at commit while a blocker exists'
                         USING ERRCODE = '23000';
                 END IF;
                 RETURN NULL;
             END $$;
         CREATE CONSTRAINT TRIGGER {name}_at_commit AFTER INSERT OR UPDATE ON public.{name}
             DEFERRABLE INITIALLY DEFERRED FOR EACH ROW
             EXECUTE FUNCTION public.{name}_refuse();
         ALTER TABLE public.{name} ENABLE ALWAYS TRIGGER {name}_at_commit;"
    ))
    .await
    .expect("a deferred constraint trigger in B");
    let (dead_before, refused_before) = (dead_lettered(), retries("postgres_refused"));
    let worker = Worker::start(worker_config(&table, &topic));
    insert_users(&table, 1, 20).await;
    wait_for(
        "retries of the refused commits",
        Duration::from_secs(60),
        || retries("postgres_refused") > refused_before,
    )
    .await;
    let first = Instant::now();
    let at_first = retries("postgres_refused");
    tokio::time::sleep(Duration::from_secs(10)).await;
    let in_10s = retries("postgres_refused") - at_first;
    assert!(in_10s >= 1, "still retried");
    // The backoff (0.2 s doubling to 5 s) allows some 6 per partition in
    // 10 s; a loop without it would count thousands.
    assert!(in_10s <= 4 * 8, "no hot loop: {in_10s} retries in 10 s");
    assert_eq!(rows_in_b(&table).await, 0, "nothing committed");
    assert_eq!(dead_lettered(), dead_before, "nothing dead-lettered");
    b.batch_execute(&format!("DELETE FROM public.{name}_blocker"))
        .await
        .expect("remove the blocker");
    let removed = Instant::now();
    assert_eq!(table.wait_converged(Duration::from_secs(60)).await, 20);
    let recovered = removed.elapsed();
    assert_eq!(dead_lettered(), dead_before, "still nothing dead-lettered");
    eprintln!(
        "deferred constraint at commit: 20 written, 0 dead-lettered, {in_10s} retries in the 10 s after the first ({:?}), 20 arrived {recovered:?} after the blocker was removed",
        first.elapsed()
    );
    worker.stop().await;
}

/// The dead-letter topic does not acknowledge: it refuses every dead
/// letter (`max.message.bytes` = 100, MSG_SIZE_TOO_LARGE). (Asking for 2
/// in-sync replicas of a one-replica topic does not do it: this Kafka
/// acknowledges with min(min.insync.replicas, replication factor).) The
/// partition is held at the poison message (`dlq_unavailable`), nothing
/// after it is applied; once the topic accepts, the dead letter is there
/// exactly once and everything after it arrives.
#[tokio::test(flavor = "multi_thread")]
async fn a_dead_letter_topic_that_does_not_acknowledge_holds_the_partition() {
    use rdkafka::admin::{AdminClient, AdminOptions, AlterConfig, NewTopic, ResourceSpecifier};
    use rdkafka::client::DefaultClientContext;
    use rdkafka::producer::{FutureProducer, FutureRecord};
    let table = TestTable::create("dlqdown").await;
    let topic = format!("cdc.public.{}", table.name);
    let mirrored_topic = mirrored(&region_a(), &topic);
    let dlq_topic = format!("regionsync.dlq.{}", table.name);
    let admin: AdminClient<DefaultClientContext> = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &region_b().kafka)
        .create()
        .expect("admin client");
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    admin
        .create_topics(
            &[
                NewTopic::new(&dlq_topic, 1, rdkafka::admin::TopicReplication::Fixed(1))
                    .set("max.message.bytes", "100"),
            ],
            &options,
        )
        .await
        .expect("create the dead-letter topic")
        .into_iter()
        .for_each(|r| {
            r.expect("the dead-letter topic created");
        });
    // The poison on partition 0, then rows on every partition.
    let producer: FutureProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &region_b().kafka)
        .create()
        .expect("producer");
    producer
        .send(
            FutureRecord::<'_, [u8], [u8]>::to(&mirrored_topic)
                .key(b"{\"schema\":null,\"payload\":{\"id\":900000}}")
                .payload(b"not json at all")
                .partition(0),
            Duration::from_secs(10),
        )
        .await
        .unwrap_or_else(|(e, _)| panic!("produce the poison: {e}"));
    insert_users(&table, 1, 20).await;
    let ids: Vec<i64> = (1..=20).collect();
    let partitions = partitions_of(&table, &ids).await;
    let after_poison = ids.iter().filter(|id| partitions[id] == 0).count();
    let elsewhere = ids.len() - after_poison;
    assert!(
        after_poison > 0,
        "some rows follow the poison on partition 0"
    );

    let mut config = worker_config(&table, &topic);
    config.dlq_topic = Some(dlq_topic.clone());
    config
        .kafka
        .properties
        .insert("message.timeout.ms".into(), "3000".into());
    let (dead_before, retried_before) = (dead_lettered(), retries("dlq_unavailable"));
    let worker = Worker::start(config);
    wait_for(
        "retries of the unacknowledged dead letter",
        Duration::from_secs(60),
        || retries("dlq_unavailable") >= retried_before + 2,
    )
    .await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while rows_in_b(&table).await < elsewhere {
        assert!(Instant::now() < deadline, "the other partitions apply");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert_eq!(
        rows_in_b(&table).await,
        elsewhere,
        "nothing after the poison applied past it"
    );
    assert_eq!(dead_lettered(), dead_before, "nothing acknowledged yet");
    admin
        .alter_configs(
            &[AlterConfig::new(ResourceSpecifier::Topic(&dlq_topic))
                .set("max.message.bytes", "1048588")],
            &options,
        )
        .await
        .expect("alter configs")
        .into_iter()
        .for_each(|r| {
            r.expect("max.message.bytes back");
        });
    let accepted = Instant::now();
    assert_eq!(table.wait_converged(Duration::from_secs(60)).await, 20);
    let recovered = accepted.elapsed();
    assert_eq!(
        dead_lettered() - dead_before,
        1,
        "one dead letter acknowledged"
    );
    assert_eq!(
        ends(&region_b(), &dlq_topic, 1),
        vec![1],
        "the dead-letter topic holds it exactly once"
    );
    eprintln!(
        "dead-letter topic not acknowledging: 1 poison + 20 written, {} retries, {elsewhere} arrived meanwhile, {after_poison} held behind the poison; 1 dead letter and all 20 rows {recovered:?} after the topic accepted",
        retries("dlq_unavailable") - retried_before
    );
    worker.stop().await;
}
