//! Outages in region B while the worker applies a stream: PostgreSQL B
//! stopped for 20 s, then Kafka B restarted. The worker recovers by itself
//! (reconnecting with backoff) and B converges to A. It stops services of
//! the stack, so `make test` runs no other suite on its stack meanwhile.

mod support;

use std::process::Command;
use std::time::Duration;

use support::kit::*;
use support::*;

fn make_stack_up() {
    run(Command::new("make")
        .arg("stack-up")
        .current_dir(repo_root()));
}

#[tokio::test(flavor = "multi_thread")]
async fn the_worker_rides_out_postgres_and_kafka_outages_in_its_region() {
    let b = region_b();
    let table = TestTable::create("outage").await;
    let topic = format!("cdc.public.{}", table.name);
    let worker = Worker::start(worker_config(&table, &topic));

    // PostgreSQL B stops for 20 s while changes keep arriving.
    let writer = {
        let name = table.name.clone();
        tokio::spawn(async move { write_mixed(&TestTable { name }, 20_000, 2_000, 0xabcdef).await })
    };
    tokio::time::sleep(Duration::from_secs(3)).await;
    let data = stack_dir().join(format!("postgres-{}", b.name));
    run(Command::new("runuser")
        .args(["-u", "postgres", "--"])
        .arg("/usr/lib/postgresql/15/bin/pg_ctl")
        .arg("-D")
        .arg(&data)
        .args(["-m", "fast", "-w", "stop"]));
    tokio::time::sleep(Duration::from_secs(20)).await;
    make_stack_up();
    writer.await.expect("writer");
    table.wait_converged(Duration::from_secs(300)).await;

    // Kafka B restarts while changes keep arriving.
    let writer = {
        let name = table.name.clone();
        tokio::spawn(async move { write_mixed(&TestTable { name }, 10_000, 2_000, 0x123457).await })
    };
    tokio::time::sleep(Duration::from_secs(2)).await;
    let kafka = stack_pid(&format!("kafka-{}", b.name));
    run(Command::new("kill").arg("-TERM").arg(&kafka));
    tokio::time::sleep(Duration::from_secs(5)).await;
    // Restart only once the old broker has let go of its port and log dir.
    let gone = std::time::Instant::now() + Duration::from_secs(60);
    while std::path::Path::new(&format!("/proc/{kafka}")).exists()
        && std::time::Instant::now() < gone
    {
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    make_stack_up();
    writer.await.expect("writer");
    table.wait_converged(Duration::from_secs(300)).await;

    worker.stop().await;
}
