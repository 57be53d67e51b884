//! The ceiling `make bench` compares regionsync with: the JSON topic's
//! changes decoded beforehand and held in memory, applied to an empty copy
//! through the worker's own bulk statements (conflict check, then apply) on
//! two connections. Nothing but PostgreSQL and those statements is timed.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use rdkafka::message::Message;
use regionsync::apply::session::{APPLY_SESSION_SQL, APPLY_TRANSACTION_SQL};
use regionsync::apply::{self, Final, TargetTable};
use regionsync::config::DEFAULT_BATCH_MAX_ROWS;
use regionsync::conflict::check;
use regionsync::decode::{decode_json, Decoded};
use regionsync::route::HomingOverrides;
use regionsync_tools::copy::{drop_copy, fresh_copy, users_copy_target};
use regionsync_tools::kafka::kafka_b_from_beginning;
use regionsync_tools::pg::connect_pooled;
use regionsync_tools::probe::postgres_b_cpu;
use regionsync_tools::stack::{pg_port_b, region_a, region_b};
use tokio_postgres::Client;

const CEILING_COPY: &str = "bench_ceiling";

/// The ceiling's input: the JSON topic's changes decoded into memory, in
/// batches of the worker's default `batch_max_rows` per partition,
/// partitions spread over two lanes (connections).
pub struct CeilingInput {
    table: TargetTable,
    lanes: Vec<Vec<Vec<Final>>>,
}

pub async fn ceiling_input(
    b_admin: &Client,
    topic: &str,
    ends: &HashMap<i32, i64>,
) -> CeilingInput {
    let copy = CEILING_COPY;
    fresh_copy(b_admin, copy).await;
    let consumer = kafka_b_from_beginning(topic, ends.keys().copied());
    let table = users_copy_target(b_admin, &format!("bench.{copy}")).await;
    let source_region = region_a();
    let mut per_partition: HashMap<i32, Vec<Final>> = HashMap::new();
    let mut remaining: HashMap<i32, i64> = ends.clone();
    while !remaining.is_empty() {
        if let Some(Ok(m)) = consumer.poll(Duration::from_millis(500)) {
            if m.offset() + 1 >= remaining.get(&m.partition()).copied().unwrap_or(0) {
                remaining.remove(&m.partition());
            }
            if let Ok(Decoded::Change(c)) = decode_json(m.key(), m.payload()) {
                if let Ok(f) = apply::prepare(&table, c, &source_region) {
                    per_partition.entry(m.partition()).or_default().push(f);
                }
            }
        }
    }
    let mut lanes: Vec<Vec<Vec<Final>>> = vec![vec![], vec![]];
    for (i, (_, finals)) in per_partition.into_iter().enumerate() {
        lanes[i % 2].extend(finals.chunks(DEFAULT_BATCH_MAX_ROWS).map(|c| c.to_vec()));
    }
    CeilingInput { table, lanes }
}

/// The ceiling: the decoded changes applied to an empty copy through the
/// same statements as the worker's (collapsed per batch; the conflict
/// check, then the apply), two connections. Measured once per round, like
/// the runs, so all see the same state of the database.
pub async fn ceiling(b_admin: &Client, input: &CeilingInput, n: u64) -> (f64, f64) {
    fresh_copy(b_admin, CEILING_COPY).await;
    let pg_before = postgres_b_cpu();
    let table = &input.table;
    let lanes = input.lanes.clone();
    let (port, source_region, local_region) = (pg_port_b(), region_a(), region_b());
    let started = Instant::now();
    let mut tasks = Vec::new();
    for lane in lanes {
        let table = table.clone();
        let (source_region, local_region) = (source_region.clone(), local_region.clone());
        tasks.push(tokio::spawn(async move {
            let mut c = connect_pooled(port, "postgres").await;
            c.batch_execute(APPLY_SESSION_SQL).await.unwrap();
            for batch in lane {
                let tx = c.transaction().await.unwrap();
                tx.batch_execute(APPLY_TRANSACTION_SQL).await.unwrap();
                let checked = check(
                    &tx,
                    &table,
                    apply::collapse(&batch),
                    &source_region,
                    &local_region,
                    None,
                    // No failover window: the bench measures the plain path.
                    &HomingOverrides::default(),
                )
                .await
                .expect("check");
                apply::apply_finals(&tx, &table, &checked.finals)
                    .await
                    .expect("apply");
                tx.commit().await.unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let rate = n as f64 / started.elapsed().as_secs_f64();
    // The lanes' backends have exited: their time is in the postmaster's.
    let cpu_pg = postgres_b_cpu() - pg_before;
    drop_copy(b_admin, CEILING_COPY).await;
    (rate, cpu_pg)
}
