//! Faults that are not the data's: a revoked grant, a schema registry that
//! stops answering, a source clock far ahead. Each holds the partition (or
//! is capped) and costs no change: nothing is dead-lettered, everything
//! arrives once the cause is gone. The registry test freezes a service of
//! the shared stack, so `make test` runs this file alone, one test at a
//! time.

mod support;

use std::process::Command;
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
    let (dead_before, held_before) = (dead_lettered(), retries("postgres_permission"));
    let worker = Worker::start(worker_config(&table, &topic));
    insert_users(&table, 1, 20).await;

    wait_for(
        "retries for the missing grant",
        Duration::from_secs(90),
        || retries("postgres_permission") >= held_before + 3,
    )
    .await;
    assert_eq!(
        rows_in_b(&table).await,
        0,
        "nothing applied without the grant"
    );
    assert_eq!(dead_lettered(), dead_before, "nothing dead-lettered");

    b.batch_execute(&format!(
        "GRANT INSERT, UPDATE ON public.{} TO regionsync",
        table.name
    ))
    .await
    .expect("grant");
    let rows = table.wait_converged(Duration::from_secs(60)).await;
    assert_eq!(rows, 20, "every row arrives after the GRANT");
    assert_eq!(dead_lettered(), dead_before, "still nothing dead-lettered");
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

#[tokio::test(flavor = "multi_thread")]
async fn a_source_clock_far_ahead_does_not_blind_the_lag() {
    use rdkafka::producer::{FutureProducer, FutureRecord};

    let table = TestTable::create("future").await;
    let topic = format!("cdc.public.{}", table.name);
    let worker = Worker::start(worker_config(&table, &topic));
    insert_users(&table, 1, 5).await;
    table.wait_converged(Duration::from_secs(60)).await;

    // One change stamped in the year 2100, as a source with a broken clock
    // would send it.
    let year_2100_ms: i64 = 4_102_444_800_000;
    let event = serde_json::json!({
        "before": null,
        "after": {"id": 900_001, "email": "future@example.com", "status": "active", "age": 1,
                  "bio": "x", "created_at": "2024-01-01T00:00:00Z", "hlc": now_ms() << 16,
                  "origin_region": region_a().name},
        "source": {"ts_ms": year_2100_ms, "schema": "public", "table": table.name, "lsn": 1, "snapshot": "false"},
        "op": "c",
        "ts_ms": year_2100_ms
    });
    let producer: FutureProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &region_b().kafka)
        .create()
        .expect("producer");
    let mirrored_topic = mirrored(&region_a(), &topic);
    producer
        .send(
            FutureRecord::to(&mirrored_topic)
                .key(&serde_json::to_vec(&serde_json::json!({"id": 900_001})).unwrap())
                .payload(&serde_json::to_vec(&event).unwrap()),
            Duration::from_secs(10),
        )
        .await
        .expect("produce the far-future change");

    let b = app_db(&region_b()).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let n: i64 = b
            .query_one(
                &format!(
                    "SELECT count(*) FROM public.{} WHERE id = 900001",
                    table.name
                ),
                &[],
            )
            .await
            .expect("count")
            .get(0);
        if n == 1 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the far-future change is applied"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    // The newest source time stored for the topic (what lag is computed
    // from, across restarts too) is not in the future.
    let admin = admin_db(&region_b()).await;
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
