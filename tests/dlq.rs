//! `regionsync dlq list|replay` against the stack: a change dead-lettered
//! for a value its column could not hold is listed, refused again while
//! the column is still too narrow, applied once the column is widened, and
//! a second replay changes nothing (the version guard); the same for Avro
//! changes, listed by their decoded key. The tests count dead letters in
//! the process-wide metrics, so `make test` runs them one at a time.

mod support;

use std::process::Command;
use std::time::{Duration, Instant};

use regionsync::ops::dlq::{self, Filter};
use support::kit::*;
use support::*;

fn dead_lettered() -> u64 {
    counters().total("regionsync_dlq_messages_total", &[])
}

/// Runs the `regionsync` binary with the config at `config` and `args`;
/// its exit success and standard output.
fn regionsync(config: &std::path::Path, args: &[&str]) -> (bool, String) {
    let out = tokio::task::block_in_place(|| {
        Command::new(env!("CARGO_BIN_EXE_regionsync"))
            .arg("--config")
            .arg(config)
            .args(args)
            .env("RUST_LOG", "warn,rdkafka=error")
            .output()
            .expect("run regionsync")
    });
    eprintln!("{}", String::from_utf8_lossy(&out.stderr));
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

/// A test table whose `email` column in B is too narrow for A's addresses,
/// read from `topic` by a worker config that dead-letters a schema
/// difference instead of holding its partition; the config, also written
/// to a file for the CLI.
async fn narrowed_in_b(
    prefix: &str,
    topic_prefix: &str,
) -> (TestTable, regionsync::config::Config, std::path::PathBuf) {
    let table = TestTable::create(prefix).await;
    let name = &table.name;
    set_email_width_in_b(&table, 3).await;
    let toml = worker_toml(&table, &format!("{topic_prefix}.public.{name}"), "").replace(
        "key = [\"id\"]",
        "key = [\"id\"]\non_schema_mismatch = \"dlq\"",
    );
    let config = regionsync::config::Config::from_toml(&toml).expect("valid test config");
    let dir = repo_root().join("target/test-configs");
    std::fs::create_dir_all(&dir).expect("config dir");
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(&path, &toml).expect("write config");
    (table, config, path)
}

async fn set_email_width_in_b(table: &TestTable, width: u32) {
    app_db(&region_b())
        .await
        .batch_execute(&format!(
            "ALTER TABLE public.{} ALTER COLUMN email TYPE varchar({width})",
            table.name
        ))
        .await
        .expect("retype email in B");
}

/// Waits until the process has dead-lettered `n` more than `before`.
async fn wait_dead_letters(before: u64, n: u64) {
    let deadline = Instant::now() + Duration::from_secs(90);
    while dead_lettered() < before + n {
        assert!(Instant::now() < deadline, "{n} dead letters within 90 s");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_dead_letter_is_listed_and_replayed_once_its_column_is_widened() {
    // B's email column cannot hold A's addresses; the table dead-letters a
    // schema difference instead of holding its partition.
    let (table, config, path) = narrowed_in_b("dlq", "cdc").await;
    let name = &table.name;
    let before = dead_lettered();
    let worker = Worker::start(config.clone());
    insert_users(&table, 1, 5).await;
    wait_dead_letters(before, 5).await;
    assert!(table.rows(&region_b()).await.is_empty(), "nothing applied");

    // Listed, as JSON, with what replay needs.
    let (ok, out) = regionsync(&path, &["dlq", "list", "--json"]);
    assert!(ok, "dlq list succeeds");
    let listed: serde_json::Value = serde_json::from_str(&out).expect("dlq list --json");
    let listed = listed.as_array().expect("an array");
    assert_eq!(listed.len(), 5, "{out}");
    let mirrored_topic = mirrored(&region_a(), &format!("cdc.public.{name}"));
    let mut ids: Vec<i64> = Vec::new();
    for l in listed {
        assert_eq!(l["reason"], "schema_mismatch", "{l}");
        assert_eq!(l["table"], format!("public.{name}"), "{l}");
        assert_eq!(l["topic"], mirrored_topic.as_str(), "{l}");
        assert!(l["offset"].as_i64().is_some() && l["partition"].as_i64().is_some());
        assert!(l["dead_lettered_at"].as_str().is_some(), "{l}");
        assert!(l["error"].as_str().unwrap_or("").contains("email"), "{l}");
        let key: serde_json::Value =
            serde_json::from_str(l["key"].as_str().expect("key")).expect("a JSON key");
        ids.push(key["id"].as_i64().expect("id"));
    }
    ids.sort();
    assert_eq!(ids, vec![1, 2, 3, 4, 5]);
    // Filters: another reason or table, or a time after them, list none.
    let (_, out) = regionsync(&path, &["dlq", "list", "--reason", "bad_value"]);
    assert!(out.starts_with("no dead letters"), "{out}");
    let (_, out) = regionsync(&path, &["dlq", "list", "--since", "2099-01-01T00:00:00Z"]);
    assert!(out.starts_with("no dead letters"), "{out}");

    // The cause is not fixed yet: still refused, nothing written.
    let mine = Filter {
        table: Some(format!("public.{name}")),
        ..Filter::default()
    };
    let early = dlq::replay(&config, &mine).await.expect("replay runs");
    assert_eq!(early.refused.len(), 5, "{:?}", early.refused);
    assert_eq!(early.applied.applied, 0);
    assert!(table.rows(&region_b()).await.is_empty());

    set_email_width_in_b(&table, 64).await;
    let started = Instant::now();
    let done = dlq::replay(&config, &mine).await.expect("replay");
    assert_eq!(done.letters, 5);
    assert!(done.refused.is_empty(), "{:?}", done.refused);
    assert_eq!(done.applied.applied, 5, "{:?}", done.applied);
    assert_eq!(table.wait_converged(Duration::from_secs(30)).await, 5);
    let replayed = table.rows(&region_b()).await;
    eprintln!(
        "dlq replay: 5 dead-lettered, 5 written by the replay in {:?}",
        started.elapsed()
    );

    // Again, through the command: nothing changes.
    let (ok, out) = regionsync(&path, &["dlq", "replay", "--reason", "schema_mismatch"]);
    assert!(ok, "a second replay succeeds: {out}");
    assert!(
        out.contains("5 dead letter(s)") && out.contains(": 0 written, 5 already applied"),
        "{out}"
    );
    assert_eq!(
        table.rows(&region_b()).await,
        replayed,
        "a second replay changes nothing"
    );
    assert_eq!(dead_lettered(), before + 5, "no new dead letters");
    worker.stop().await;
}

/// The same for Avro changes (`cdc.avro.*`): `dlq list` shows the key
/// decoded through the schema registry, as the worker reads it (not the
/// Avro bytes in hex), and `dlq replay` applies the Avro dead letters
/// once the column is widened.
#[tokio::test(flavor = "multi_thread")]
async fn an_avro_dead_letter_is_listed_with_its_key_and_replayed() {
    let (table, config, path) = narrowed_in_b("dlqavro", "cdc.avro").await;
    let before = dead_lettered();
    let worker = Worker::start(config.clone());
    insert_users(&table, 1, 3).await;
    wait_dead_letters(before, 3).await;
    worker.stop().await;

    let (ok, out) = regionsync(&path, &["dlq", "list", "--json"]);
    assert!(ok, "dlq list succeeds");
    let listed: serde_json::Value = serde_json::from_str(&out).expect("dlq list --json");
    let mut ids: Vec<i64> = listed
        .as_array()
        .expect("an array")
        .iter()
        .map(|l| {
            let key: serde_json::Value = serde_json::from_str(l["key"].as_str().expect("key"))
                .unwrap_or_else(|e| panic!("the Avro key decoded as JSON: {l}: {e}"));
            key["id"].as_i64().expect("the key's id")
        })
        .collect();
    ids.sort();
    assert_eq!(ids, vec![1, 2, 3], "{out}");

    set_email_width_in_b(&table, 64).await;
    let (ok, out) = regionsync(&path, &["dlq", "replay"]);
    assert!(ok, "the replay succeeds: {out}");
    assert!(out.contains(": 3 written"), "{out}");
    assert_eq!(table.wait_converged(Duration::from_secs(30)).await, 3);
    eprintln!("dlq (Avro): 3 dead-lettered, listed by key, 3 written by the replay");
}
