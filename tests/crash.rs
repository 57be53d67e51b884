//! The `regionsync` binary as operators run it, killed and stopped: kill -9
//! at random moments while it applies a long stream loses and duplicates
//! nothing, and every restart resumes exactly at the offsets stored in
//! PostgreSQL; SIGTERM ends it cleanly within 10 s.

mod support;

use std::collections::HashMap;
use std::process::Command;
use std::time::{Duration, Instant};

use support::kit::*;
use support::*;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

fn worker_file(table: &TestTable, topic: &str) -> String {
    // The binary serves metrics; give each test its own port.
    worker_toml(table, topic, "").replace(
        "[apply]",
        &format!(
            "[metrics]\n        listen = \"127.0.0.1:{}\"\n        [apply]",
            free_port()
        ),
    )
}

/// `partition=N offset=M` of the first "resuming at stored offset" log line
/// of each partition of `topic` (later ones follow rebalances within the
/// same run; the worker also reads the heartbeat topic's partitions, whose
/// partitions start in their own tasks, in any order with these).
fn resumed_at(lines: &[String], topic: &str) -> HashMap<i32, i64> {
    let field = |line: &str, name: &str| -> Option<i64> {
        let start = line.find(&format!("{name}="))? + name.len() + 1;
        line[start..].split([' ', ',']).next()?.parse().ok()
    };
    let mut first = HashMap::new();
    for (partition, offset) in lines
        .iter()
        .filter(|l| l.contains("resuming at stored offset"))
        .filter(|l| l.contains(&format!("topic={topic} ")))
        .filter_map(|l| Some((field(l, "partition")? as i32, field(l, "offset")?)))
    {
        first.entry(partition).or_insert(offset);
    }
    first
}

async fn stored_offsets(group: &str, topic: &str) -> HashMap<i32, i64> {
    admin_db(&region_b())
        .await
        .query(
            "SELECT partition, next_offset FROM regionsync.offsets WHERE consumer_group = $1 AND topic = $2",
            &[&group, &topic],
        )
        .await
        .expect("offsets")
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

/// The stored offsets once they stop moving: a COMMIT the killed process
/// had already sent still completes on the server after the kill.
async fn settled_offsets(group: &str, topic: &str) -> HashMap<i32, i64> {
    let mut last = stored_offsets(group, topic).await;
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let now = stored_offsets(group, topic).await;
        if now == last {
            return now;
        }
        last = now;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn kill_9_at_random_moments_loses_and_duplicates_nothing() {
    let table = TestTable::create("crash").await;
    let topic = format!("cdc.public.{}", table.name);
    let mirrored_topic = mirrored(&region_a(), &topic);
    let group = format!("test-{}", table.name);
    let toml = worker_file(&table, &topic);

    // 100,000 changes written in A while the worker is killed and restarted.
    let writer = {
        let name = table.name.clone();
        tokio::spawn(async move {
            write_mixed(&TestTable { name }, 100_000, 20_000, 0xc0ffee).await;
        })
    };
    let mut rng = Rng(0x2545f4914f6cdd1d);
    let mut kills = 0;
    let mut checked_resumes = 0;
    let mut last_stored: Option<HashMap<i32, i64>> = None;
    while kills < 5 {
        let (mut child, lines) = spawn_worker(&toml, &table.name);
        // The killed member holds its partitions until its session times out
        // (10 s), so the new one is assigned after about that; then it
        // applies for a random 1–8 s before it is killed.
        tokio::time::sleep(Duration::from_millis(12_000 + rng.below(7_000))).await;
        if let Some(stored) = &last_stored {
            let resumed = resumed_at(&lines.lock().unwrap(), &mirrored_topic);
            for (partition, offset) in stored {
                assert_eq!(
                    resumed.get(partition),
                    Some(offset),
                    "restart {kills}: partition {partition} must resume at its stored offset {offset}; log said {resumed:?}; the worker's log:\n{}",
                    lines.lock().unwrap().join("\n")
                );
                checked_resumes += 1;
            }
        }
        child.kill().expect("kill -9"); // SIGKILL
        let _ = child.wait();
        kills += 1;
        last_stored = Some(settled_offsets(&group, &mirrored_topic).await);
    }
    assert!(
        checked_resumes > 0,
        "at least one restart resumed from stored offsets"
    );
    writer.await.expect("writer");

    // The last run goes on until B equals A.
    let (mut child, lines) = spawn_worker(&toml, &table.name);
    let rows = table.wait_converged(Duration::from_secs(600)).await;
    assert!(rows > 1_000, "{rows} rows");
    // B can equal A before this worker is even assigned its partitions
    // (the killed member holds them for its 10 s session) when the killed
    // one had applied everything: wait for every partition's resume line.
    let last_stored = last_stored.unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let resumed = loop {
        let resumed = resumed_at(&lines.lock().unwrap(), &mirrored_topic);
        if last_stored.keys().all(|p| resumed.contains_key(p)) || Instant::now() > deadline {
            break resumed;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    for (partition, offset) in last_stored {
        assert_eq!(
            resumed.get(&partition),
            Some(&offset),
            "final restart resumes at the stored offset"
        );
    }
    // Stored offsets reach the end of every partition of the mirrored topic.
    let deadline = Instant::now() + Duration::from_secs(60);
    let ends: HashMap<i32, i64> = tokio::task::block_in_place(|| {
        let msgs = TopicReader::open(&region_b(), &mirrored_topic, deadline).read_all(deadline);
        let mut ends = HashMap::new();
        for m in &msgs {
            use rdkafka::message::Message;
            let e = ends.entry(m.partition()).or_insert(0);
            *e = (*e).max(m.offset() + 1);
        }
        ends
    });
    loop {
        let stored = stored_offsets(&group, &mirrored_topic).await;
        if stored == ends {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "stored {stored:?} != topic ends {ends:?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    child.kill().expect("kill");
    let _ = child.wait();
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_stops_the_worker_cleanly_within_10_s() {
    let table = TestTable::create("sigterm").await;
    let topic = format!("cdc.public.{}", table.name);
    let (mut child, lines) = spawn_worker(&worker_file(&table, &topic), &table.name);
    insert_users(&table, 1, 500).await;
    table.wait_converged(Duration::from_secs(120)).await;
    insert_users(&table, 501, 500).await;
    let sent = Instant::now();
    let status = Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status()
        .expect("kill -TERM");
    assert!(status.success());
    let exit = loop {
        if let Some(exit) = child.try_wait().expect("wait") {
            break exit;
        }
        assert!(
            sent.elapsed() < Duration::from_secs(10),
            "still running 10 s after SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(
        exit.success(),
        "exit status {exit}; log: {:?}",
        lines.lock().unwrap()
    );
    assert!(lines
        .lock()
        .unwrap()
        .iter()
        .any(|l| l.contains("shutting down")));
}
