//! `regionsync verify` on the real two-region stack: region B's copy of a
//! fresh users-shaped table against region A's (DESIGN.md §7).
mod support;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use support::kit::*;
use support::*;

/// B's worker config for the table, in a file for the CLI.
fn config_file(table: &TestTable) -> PathBuf {
    let dir = repo_root().join("target/test-configs");
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(format!("{}-verify.toml", table.name));
    std::fs::write(
        &path,
        worker_toml(table, &format!("cdc.public.{}", table.name), ""),
    )
    .unwrap();
    path
}

/// A's database as `--against` names it (the password from PGPASSWORD).
fn against_a() -> String {
    format!(
        "host={} port={} dbname=app user=regionsync sslmode=disable",
        stack_env::HOST,
        region_a().pg_port
    )
}

/// Runs `regionsync verify` of B against A: exit code and the JSON report.
fn verify(config: &std::path::Path, table: &TestTable) -> (i32, serde_json::Value) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_regionsync"))
        .arg("--config")
        .arg(config)
        .args(["verify", "--json", "--against", &against_a(), "--table"])
        .arg(format!("public.{}", table.name))
        .env("PGPASSWORD", stack_env::REGIONSYNC_PASSWORD.get())
        .output()
        .expect("run regionsync verify");
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let code = out.status.code().unwrap_or(-1);
    let report = serde_json::from_str(&stdout).unwrap_or_else(|e| {
        panic!(
            "verify (exit {code}) did not print JSON ({e}): {stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (code, report)
}

/// The (key, kind) pairs of a report's one table, sorted.
fn differences(report: &serde_json::Value) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = report["tables"][0]["differences"]
        .as_array()
        .expect("differences")
        .iter()
        .map(|d| {
            (
                d["key"].as_str().unwrap().to_string(),
                d["kind"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    out.sort();
    out
}

/// Runs SQL in B bypassing the triggers (as the replica role does), so no
/// version is stamped and no tombstone written.
async fn in_b_bypassing_triggers(sql: &str) {
    admin_db(&region_b())
        .await
        .batch_execute(&format!(
            "BEGIN; SET LOCAL session_replication_role = replica; {sql}; COMMIT"
        ))
        .await
        .unwrap_or_else(|e| panic!("in B: {sql}: {e}"));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_corrupted_a_deleted_and_an_added_row_are_named_then_equal_once_fixed() {
    let table = TestTable::create("verify").await;
    let first = fresh_key();
    // More than one chunk's leaf: bisection has to find the keys.
    insert_users(&table, first, 1_200).await;
    let worker = Worker::start(worker_config(&table, &format!("cdc.public.{}", table.name)));
    assert_eq!(table.wait_converged(Duration::from_secs(90)).await, 1_200);
    worker.stop().await;
    let config = config_file(&table);
    let (code, report) = verify(&config, &table);
    assert_eq!(code, 0, "{report:#}");
    assert_eq!(report["tables"][0]["rows_here"], 1_200);

    let name = &table.name;
    let (changed, deleted, added) = (first + 17, first + 600, first + 5_000);
    in_b_bypassing_triggers(&format!(
        "UPDATE {name} SET display_name = 'corrupted' WHERE id = {changed};
         DELETE FROM {name} WHERE id = {deleted};
         INSERT INTO {name} (id, email, hlc, origin_region) VALUES ({added}, 'x@example.com', 65536, 'eu-west-1')"
    ))
    .await;
    let (code, report) = verify(&config, &table);
    assert_eq!(code, 1, "{report:#}");
    assert_eq!(
        differences(&report),
        {
            let mut want = vec![
                (changed.to_string(), "different".to_string()),
                (deleted.to_string(), "missing_here".to_string()),
                (added.to_string(), "missing_there".to_string()),
            ];
            want.sort();
            want
        },
        "{report:#}"
    );
    let different = report["tables"][0]["differences"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["kind"] == "different")
        .unwrap()
        .clone();
    assert_eq!(
        different["here"]["hlc"], different["there"]["hlc"],
        "the corruption kept the version: {different}"
    );
    assert_eq!(different["here"]["origin_region"], region_a().name);

    // Fixed in B by hand: A's rows copied, the extra row removed.
    let a = app_db(&region_a()).await;
    for id in [changed, deleted] {
        let row: serde_json::Value = a
            .query_one(
                &format!("SELECT to_jsonb(t) FROM {name} t WHERE id = $1"),
                &[&id],
            )
            .await
            .unwrap()
            .get(0);
        in_b_bypassing_triggers(&format!(
            "DELETE FROM {name} WHERE id = {id};
             INSERT INTO {name} SELECT * FROM jsonb_populate_record(NULL::{name}, '{}')",
            row.to_string().replace('\'', "''")
        ))
        .await;
    }
    in_b_bypassing_triggers(&format!("DELETE FROM {name} WHERE id = {added}")).await;
    let (code, report) = verify(&config, &table);
    assert_eq!(code, 0, "{report:#}");
    assert_eq!(report["equal"], true);
}

#[tokio::test(flavor = "multi_thread")]
async fn writers_in_a_during_verify_cause_no_false_difference() {
    let table = TestTable::create("verify_live").await;
    let first = fresh_key();
    insert_users(&table, first, 30_000).await;
    let worker = Worker::start(worker_config(&table, &format!("cdc.public.{}", table.name)));
    table.wait_converged(Duration::from_secs(120)).await;
    let config = config_file(&table);

    // Writers keep updating and inserting rows in A while verify runs.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let (stop, name) = (stop.clone(), table.name.clone());
        tokio::spawn(async move {
            let a = app_db(&region_a()).await;
            let mut rng = Rng(first as u64 | 1);
            let mut writes = 0;
            let mut next_new = first + 1_000_000;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let id = first + rng.below(30_000) as i64;
                a.batch_execute(&format!(
                    "UPDATE {name} SET age = coalesce(age, 0) + 1 WHERE id = {id};
                     INSERT INTO {name} (id, email) VALUES ({next_new}, 'n@example.com')"
                ))
                .await
                .expect("write in A");
                next_new += 1;
                writes += 2;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            writes
        })
    };
    tokio::time::sleep(Duration::from_secs(1)).await;
    let started = Instant::now();
    let (code, report) = tokio::task::spawn_blocking({
        let (config, name) = (config.clone(), table.name.clone());
        move || verify(&config, &TestTable { name })
    })
    .await
    .unwrap();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let writes = writer.await.unwrap();
    eprintln!(
        "verify took {:?} while {writes} writes were made in A; rechecked {}, settled {}",
        started.elapsed(),
        report["tables"][0]["rechecked"],
        report["tables"][0]["settled_on_recheck"]
    );
    assert!(writes > 100, "the writers wrote during verify: {writes}");
    assert_eq!(code, 0, "a false difference: {report:#}");
    worker.stop().await;
}
