//! Active-active on the real two-region stack: both regions write, a
//! regionsync worker runs in each, MirrorMaker 2 copies both ways
//! (DESIGN.md §3, §4). Each test uses a fresh table of the users shape.
mod support;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::ClientConfig;
use support::kit::*;
use support::*;

fn start_workers(table: &TestTable, table_extra: &str) -> (Worker, Worker) {
    let config = |r: &Region| {
        regionsync::config::Config::from_toml(&worker_toml_for(r, table, table_extra))
            .expect("valid worker config")
    };
    (
        Worker::start(config(&region_a())),
        Worker::start(config(&region_b())),
    )
}

async fn stop_workers((a, b): (Worker, Worker)) {
    a.stop().await;
    b.stop().await;
}

async fn exec(region: &Region, sql: &str) {
    app_db(region)
        .await
        .batch_execute(sql)
        .await
        .unwrap_or_else(|e| panic!("in {}: {sql}: {e}", region.name));
}

/// A key homed in `home` (by the affinity hash of its id), above `from`.
fn key_homed_in(home: &Region, from: i64) -> i64 {
    let regions = [region_a().name, region_b().name];
    (from..)
        .find(|k| regionsync::route::home_region(&k.to_string(), &regions) == home.name)
        .expect("some key is homed there")
}

/// A worker config for `region` in a file, for the CLI.
fn write_config(region: &Region, table: &TestTable, table_extra: &str) -> std::path::PathBuf {
    let dir = repo_root().join("target/test-configs");
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(format!("{}-{}.toml", table.name, region.name));
    std::fs::write(&path, worker_toml_for(region, table, table_extra)).unwrap();
    path
}

/// Runs the regionsync command with `config`; fails the test unless it
/// succeeds; returns its standard output.
fn cli(config: &std::path::Path, args: &[&str]) -> String {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_regionsync"))
        .arg("--config")
        .arg(config)
        .args(args)
        .output()
        .expect("run regionsync");
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "regionsync {args:?}: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// One column of one row in `region`, as text (`None`: no row or NULL).
async fn value(region: &Region, table: &TestTable, id: i64, column: &str) -> Option<String> {
    app_db(region)
        .await
        .query_opt(
            &format!("SELECT {column}::text FROM {} WHERE id = $1", table.name),
            &[&id],
        )
        .await
        .expect("select")
        .and_then(|r| r.get(0))
}

/// Waits until both regions hold identical rows and `done` holds.
async fn wait_until_equal<F, Fut>(table: &TestTable, timeout: Duration, what: &str, done: F)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if table.rows(&region_a()).await == table.rows(&region_b()).await && done().await {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{}: {what} not reached in {timeout:?}",
            table.name
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// One recorded conflict.
#[derive(Debug)]
struct Conflict {
    id: i64,
    key: String,
    kind: String,
    resolution: String,
    resolved: bool,
    local: Option<(i64, String)>,
    local_row: Option<String>,
    remote: (i64, String),
    remote_row: Option<String>,
}

async fn conflicts(region: &Region, table: &TestTable) -> Vec<Conflict> {
    admin_db(region)
        .await
        .query(
            "SELECT id, row_key, kind, resolution, resolved_at IS NOT NULL, local_hlc, local_origin,
                    local_row::text, remote_hlc, remote_origin, remote_row::text
               FROM regionsync.conflicts WHERE table_name = $1 ORDER BY id",
            &[&format!("public.{}", table.name)],
        )
        .await
        .expect("select conflicts")
        .iter()
        .map(|r| Conflict {
            id: r.get(0),
            key: r.get(1),
            kind: r.get(2),
            resolution: r.get(3),
            resolved: r.get(4),
            local: r.get::<_, Option<i64>>(5).zip(r.get::<_, Option<String>>(6)),
            local_row: r.get(7),
            remote: (r.get(8), r.get(9)),
            remote_row: r.get(10),
        })
        .collect()
}

/// Waits (up to 120 s) until `region` has open conflicts of the table,
/// and returns them.
async fn open_conflicts(region: &Region, table: &TestTable) -> Vec<Conflict> {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let open: Vec<Conflict> = conflicts(region, table)
            .await
            .into_iter()
            .filter(|c| c.resolution == "open")
            .collect();
        if !open.is_empty() {
            return open;
        }
        assert!(
            Instant::now() < deadline,
            "no open conflict in {}",
            region.name
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// The end offsets of every topic that carries the table's changes, in both
/// regions (the local capture and the mirrored copy).
fn end_offsets(table: &TestTable) -> HashMap<String, i64> {
    let mut out = HashMap::new();
    for (region, other) in [(region_a(), region_b()), (region_b(), region_a())] {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &region.kafka)
            .create()
            .expect("consumer");
        let own = format!("cdc.public.{}", table.name);
        for topic in [own.clone(), mirrored(&other, &own)] {
            let metadata = consumer
                .fetch_metadata(Some(&topic), Duration::from_secs(10))
                .expect("metadata");
            let mut sum = 0;
            for t in metadata.topics() {
                for p in t.partitions() {
                    let (_, high) = consumer
                        .fetch_watermarks(&topic, p.id(), Duration::from_secs(10))
                        .expect("watermarks");
                    sum += high;
                }
            }
            out.insert(format!("{}:{topic}", region.name), sum);
        }
    }
    out
}

/// A writer in `region` updating random keys of `keys` for `run`.
async fn update_randomly(
    region: Region,
    table: String,
    keys: Vec<i64>,
    run: Duration,
    seed: u64,
) -> u64 {
    let db = app_db(&region).await;
    let mut rng = Rng(seed | 1);
    let deadline = Instant::now() + run;
    let mut n = 0u64;
    while Instant::now() < deadline {
        let mut sql = String::from("BEGIN;");
        for _ in 0..5 {
            let id = keys[rng.below(keys.len() as u64) as usize];
            n += 1;
            sql.push_str(&format!(
                "UPDATE {table} SET display_name = '{r}-{n}', age = {age} WHERE id = {id};",
                r = region.name,
                age = rng.below(100),
            ));
        }
        sql.push_str("COMMIT;");
        db.batch_execute(&sql).await.expect("update batch");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    n
}

/// Two writers, one per region, update an overlapping set of 1,000 keys of
/// a shared table for 60 s: both regions end row-for-row identical, the
/// concurrent writes are in regionsync.conflicts with both versions and the
/// outcome the version order gives, and no topic keeps growing (no loop).
#[tokio::test(flavor = "multi_thread")]
async fn concurrent_writers_in_both_regions_converge_and_their_conflicts_are_recorded() {
    let (a, b) = (region_a(), region_b());
    let table = TestTable::create("aa_shared").await;
    let workers = start_workers(&table, "");
    let first = fresh_key();
    insert_users(&table, first, 1_000).await;
    table.wait_converged(Duration::from_secs(120)).await;

    let keys: Vec<i64> = (first..first + 1_000).collect();
    let run = Duration::from_secs(60);
    let wa = tokio::spawn(update_randomly(
        a.clone(),
        table.name.clone(),
        keys.clone(),
        run,
        11,
    ));
    let wb = tokio::spawn(update_randomly(
        b.clone(),
        table.name.clone(),
        keys,
        run,
        29,
    ));
    let (na, nb) = (wa.await.unwrap(), wb.await.unwrap());
    assert!(na > 1_000 && nb > 1_000, "{na} and {nb} updates written");

    wait_until_equal(
        &table,
        Duration::from_secs(180),
        "identical regions",
        || async { true },
    )
    .await;
    // Quiescent: nothing is still on its way. Ten seconds without a new
    // event on any of the table's topics, in either region.
    let mut last = end_offsets(&table);
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        tokio::time::sleep(Duration::from_secs(10)).await;
        let now = end_offsets(&table);
        if now == last {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the topics keep growing: {last:?} → {now:?}"
        );
        last = now;
    }
    assert_eq!(
        table.rows(&a).await,
        table.rows(&b).await,
        "identical once quiescent"
    );

    let (ca, cb) = (conflicts(&a, &table).await, conflicts(&b, &table).await);
    assert!(
        !ca.is_empty() && !cb.is_empty(),
        "concurrent updates of the same keys were detected in both regions ({} in A, {} in B)",
        ca.len(),
        cb.len()
    );
    for (region, list) in [(&a, &ca), (&b, &cb)] {
        for c in list {
            assert_eq!(c.kind, "update_update", "{c:?}");
            let local = c.local.as_ref().expect("the local version is recorded");
            assert!(
                c.local_row.is_some() && c.remote_row.is_some(),
                "both rows: {c:?}"
            );
            assert_ne!(local.1, c.remote.1, "versions of two regions: {c:?}");
            assert_ne!(
                c.remote.1, region.name,
                "the remote version is the other region's: {c:?}"
            );
            // The outcome is the version order's.
            let remote_newer = (c.remote.0, c.remote.1.as_bytes()) > (local.0, local.1.as_bytes());
            let expected = if remote_newer {
                "remote_won"
            } else {
                "local_kept"
            };
            assert_eq!(c.resolution, expected, "{c:?}");
            assert!(c.resolved, "lww settles at once: {c:?}");
        }
    }
    stop_workers(workers).await;
}

/// `reject`: a write in B to a row homed in A is held in A, and A writes
/// its row again, so both regions end with the home version; B's write to
/// a row homed in B applies in both.
#[tokio::test(flavor = "multi_thread")]
async fn reject_keeps_the_home_version_in_every_region() {
    let (a, b) = (region_a(), region_b());
    let table = TestTable::create("aa_reject").await;
    let workers = start_workers(&table, "affinity = \"id\"\npolicy = \"reject\"");
    let in_a = key_homed_in(&a, fresh_key());
    let in_b = key_homed_in(&b, in_a + 1);
    exec(
        &a,
        &format!(
            "INSERT INTO {t} (id, email, display_name) VALUES ({in_a}, 'a@x', 'home'), ({in_b}, 'b@x', 'home')",
            t = table.name
        ),
    )
    .await;
    table.wait_converged(Duration::from_secs(120)).await;

    exec(
        &b,
        &format!(
            "UPDATE {t} SET display_name = 'from-b' WHERE id IN ({in_a}, {in_b})",
            t = table.name
        ),
    )
    .await;
    wait_until_equal(
        &table,
        Duration::from_secs(120),
        "the home versions",
        || async {
            value(&b, &table, in_a, "display_name").await.as_deref() == Some("home")
                && value(&b, &table, in_b, "display_name").await.as_deref() == Some("from-b")
        },
    )
    .await;
    assert_eq!(
        value(&a, &table, in_a, "display_name").await.as_deref(),
        Some("home")
    );
    assert_eq!(
        value(&a, &table, in_b, "display_name").await.as_deref(),
        Some("from-b")
    );

    let held: Vec<Conflict> = conflicts(&a, &table)
        .await
        .into_iter()
        .filter(|c| c.resolution == "rejected")
        .collect();
    assert_eq!(held.len(), 1, "{held:?}");
    assert_eq!(held[0].key, in_a.to_string());
    assert!(held[0].resolved, "A wrote its row again: {:?}", held[0]);
    assert!(held[0]
        .remote_row
        .as_deref()
        .unwrap_or("")
        .contains("from-b"));
    stop_workers(workers).await;
}

/// `manual`: A keeps its row and records both versions; until someone
/// resolves it the regions differ; `regionsync conflicts resolve ID --keep
/// remote` in A makes B's version every region's.
#[tokio::test(flavor = "multi_thread")]
async fn manual_conflicts_wait_for_the_operator_and_resolve_everywhere() {
    let (a, b) = (region_a(), region_b());
    let table = TestTable::create("aa_manual").await;
    let extra = "affinity = \"id\"\npolicy = \"manual\"";
    let workers = start_workers(&table, extra);
    let in_a = key_homed_in(&a, fresh_key());
    exec(
        &a,
        &format!(
            "INSERT INTO {t} (id, email, display_name) VALUES ({in_a}, 'a@x', 'home')",
            t = table.name
        ),
    )
    .await;
    table.wait_converged(Duration::from_secs(120)).await;
    exec(
        &b,
        &format!(
            "UPDATE {t} SET display_name = 'from-b', age = 7 WHERE id = {in_a}",
            t = table.name
        ),
    )
    .await;

    let open = open_conflicts(&a, &table).await;
    assert_eq!(open.len(), 1, "{open:?}");
    assert!(!open[0].resolved);
    assert!(open[0].local_row.as_deref().unwrap_or("").contains("home"));
    assert!(open[0]
        .remote_row
        .as_deref()
        .unwrap_or("")
        .contains("from-b"));
    // Held: A keeps its row, B has its own.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        value(&a, &table, in_a, "display_name").await.as_deref(),
        Some("home")
    );
    assert_eq!(
        value(&b, &table, in_a, "display_name").await.as_deref(),
        Some("from-b")
    );

    // The operator's commands, in region A.
    let config = write_config(&a, &table, extra);
    let cli = |args: &[&str]| cli(&config, args);
    let target = format!("public.{}", table.name);
    let listed = cli(&["conflicts", "list", "--open", "--table", &target]);
    assert!(
        listed.starts_with(&format!("{}\t", open[0].id)) && listed.contains("open (pending)"),
        "{listed}"
    );
    let id = open[0].id.to_string();
    let resolved = cli(&["conflicts", "resolve", &id, "--keep", "remote"]);
    assert!(resolved.contains("written again"), "{resolved}");

    wait_until_equal(
        &table,
        Duration::from_secs(120),
        "B's version everywhere",
        || async { value(&a, &table, in_a, "display_name").await.as_deref() == Some("from-b") },
    )
    .await;
    assert_eq!(value(&b, &table, in_a, "age").await.as_deref(), Some("7"));
    let after = conflicts(&a, &table).await;
    let c = after.iter().find(|c| c.id == open[0].id).unwrap();
    assert_eq!((c.resolution.as_str(), c.resolved), ("kept_remote", true));
    assert!(
        cli(&["conflicts", "resolve", &id, "--keep", "local"]).contains("already resolved"),
        "a second resolve changes nothing"
    );
    stop_workers(workers).await;
}

/// A delete in A concurrent with an update in B (both written while no
/// worker runs) converges identically in both regions under each policy:
/// `lww` on a shared table lets the newer update win everywhere; `reject`
/// on a row homed in A keeps A's delete everywhere; `manual` holds B's
/// update in A until the operator keeps A's delete, then everywhere.
#[tokio::test(flavor = "multi_thread")]
async fn a_delete_concurrent_with_an_update_converges_under_each_policy() {
    let (a, b) = (region_a(), region_b());
    for (extra, update_survives) in [
        ("", true),
        ("affinity = \"id\"\npolicy = \"reject\"", false),
        ("affinity = \"id\"\npolicy = \"manual\"", false),
    ] {
        let table = TestTable::create("aa_delete").await;
        let id = key_homed_in(&a, fresh_key());
        let workers = start_workers(&table, extra);
        exec(
            &a,
            &format!(
                "INSERT INTO {t} (id, email) VALUES ({id}, 'a@x')",
                t = table.name
            ),
        )
        .await;
        table.wait_converged(Duration::from_secs(120)).await;
        stop_workers(workers).await;

        exec(
            &a,
            &format!("DELETE FROM {t} WHERE id = {id}", t = table.name),
        )
        .await;
        exec(
            &b,
            &format!(
                "UPDATE {t} SET display_name = 'from-b' WHERE id = {id}",
                t = table.name
            ),
        )
        .await;
        let workers = start_workers(&table, extra);
        if extra.contains("manual") {
            // Held in A until the operator keeps A's delete.
            let open = open_conflicts(&a, &table).await;
            assert_eq!(open.len(), 1, "{open:?}");
            let open = &open[0];
            assert_eq!(open.kind, "update_delete");
            let config = write_config(&a, &table, extra);
            let out = cli(
                &config,
                &[
                    "conflicts",
                    "resolve",
                    &open.id.to_string(),
                    "--keep",
                    "local",
                ],
            );
            assert!(out.contains("written again"), "{out}");
        }
        wait_until_equal(&table, Duration::from_secs(120), "one outcome", || async {
            let there = value(&b, &table, id, "email").await.is_some();
            there == update_survives
        })
        .await;
        // Settled: still the same a little later.
        tokio::time::sleep(Duration::from_secs(5)).await;
        let rows = table.rows(&a).await;
        assert_eq!(rows, table.rows(&b).await, "policy {extra:?}");
        assert_eq!(
            rows.len(),
            usize::from(update_survives),
            "policy {extra:?}: {rows:?}"
        );
        if update_survives {
            assert!(rows[0].contains("from-b"));
        }
        let kinds: Vec<String> = conflicts(&a, &table)
            .await
            .into_iter()
            .chain(conflicts(&b, &table).await)
            .map(|c| c.kind)
            .collect();
        assert!(
            kinds.iter().any(|k| k == "update_delete")
                && kinds.iter().any(|k| k == "delete_update"),
            "policy {extra:?}: both regions saw the conflict: {kinds:?}"
        );
        stop_workers(workers).await;
    }
}

/// Residency: rows pinned to eu-west-1 under `residency = ["eu-*"]`, written
/// in B, never appear in A's table, and A's worker counts them; unpinned
/// rows and rows pinned elsewhere replicate as usual.
#[tokio::test(flavor = "multi_thread")]
async fn rows_pinned_to_eu_regions_never_leave_them() {
    let counters = counters();
    let (a, b) = (region_a(), region_b());
    let table = TestTable::create("aa_residency").await;
    let workers = start_workers(
        &table,
        "home_region_column = \"home_region\"\nresidency = [\"eu-*\"]",
    );
    let first = fresh_key();
    exec(
        &b,
        &format!(
            "INSERT INTO {t} (id, email, home_region)
             SELECT g, 'r' || g || '@x', CASE g % 3 WHEN 0 THEN 'eu-west-1' WHEN 1 THEN 'us-east-1' END
               FROM generate_series({first}::bigint, {last}::bigint) g;
             UPDATE {t} SET display_name = 'updated' WHERE id % 2 = 0;",
            t = table.name,
            last = first + 299,
        ),
    )
    .await;
    let ids = |rows: Vec<String>| -> Vec<i64> {
        rows.iter()
            .map(|r| {
                serde_json::from_str::<serde_json::Value>(r).unwrap()["id"]
                    .as_i64()
                    .unwrap()
            })
            .collect()
    };
    let expected: Vec<i64> = (first..first + 300).filter(|g| g % 3 != 0).collect();
    let target = format!("public.{}", table.name);
    let counted = || {
        counters.total(
            "regionsync_events_total",
            &[
                ("source_region", b.name.as_str()),
                ("table", target.as_str()),
                ("outcome", "residency"),
            ],
        )
    };
    let deadline = Instant::now() + Duration::from_secs(120);
    // 100 inserts and 50 updates of EU rows.
    while ids(table.rows(&a).await) != expected || counted() < 150 {
        assert!(
            Instant::now() < deadline,
            "A has {} of {} rows, {} residency skips counted",
            table.rows(&a).await.len(),
            expected.len(),
            counted()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let in_a: Vec<String> = table.rows(&a).await;
    let pinned_to = |r: &String| {
        serde_json::from_str::<serde_json::Value>(r).unwrap()["home_region"]
            .as_str()
            .map(str::to_string)
    };
    assert!(
        in_a.iter()
            .all(|r| pinned_to(r).as_deref() != Some("eu-west-1")),
        "no EU-pinned row in A"
    );
    // And B keeps every row, with the updates A got too.
    assert_eq!(table.rows(&b).await.len(), 300);
    let b_rows: Vec<String> = table
        .rows(&b)
        .await
        .into_iter()
        .filter(|r| pinned_to(r).as_deref() != Some("eu-west-1"))
        .collect();
    assert_eq!(in_a, b_rows, "the other rows are identical");
    stop_workers(workers).await;
}

/// Tombstones are collected after `tombstone_grace`; a change older than
/// the grace for a key without a row is then counted and not applied (it
/// could be a deleted row's), while current changes apply as usual.
#[tokio::test(flavor = "multi_thread")]
async fn tombstones_are_collected_after_the_grace_and_late_changes_are_not_applied() {
    let counters = counters();
    let (a, b) = (region_a(), region_b());
    let table = TestTable::create("aa_grace").await;
    let topic = format!("cdc.public.{}", table.name);
    let (deleted, late, current) = (fresh_key(), fresh_key(), fresh_key());
    // First with the default grace: a new topic takes MirrorMaker 2 and the
    // consumer some seconds to find, longer than the short grace below.
    let worker = Worker::start(worker_config(&table, &topic));
    exec(
        &a,
        &format!(
            "INSERT INTO {t} (id, email) VALUES ({deleted}, 'd@x');",
            t = table.name
        ),
    )
    .await;
    table.wait_converged(Duration::from_secs(120)).await;
    worker.stop().await;
    let toml = worker_toml(&table, &topic, "").replace(
        "consumer_group = ",
        "tombstone_grace = \"3s\"\nconsumer_group = ",
    );
    let worker = Worker::start(regionsync::config::Config::from_toml(&toml).expect("config"));
    exec(
        &a,
        &format!("DELETE FROM {t} WHERE id = {deleted}", t = table.name),
    )
    .await;
    table.wait_converged(Duration::from_secs(120)).await;

    let tombstone_in_b = || async {
        admin_db(&region_b())
            .await
            .query_opt(
                "SELECT 1 FROM regionsync.tombstones WHERE table_name = $1 AND row_key = $2",
                &[&format!("public.{}", table.name), &deleted.to_string()],
            )
            .await
            .unwrap()
            .is_some()
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while tombstone_in_b().await {
        assert!(
            Instant::now() < deadline,
            "the tombstone is still there after 30 s"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    // A change stamped an hour ago (written past the stamping trigger, as a
    // change delayed that long would carry), and a current one.
    let hour_ago = (now_ms() - 3_600_000) << 16;
    admin_db(&a)
        .await
        .batch_execute(&format!(
            "BEGIN; SET LOCAL session_replication_role = replica;
             INSERT INTO public.{t} (id, email, hlc, origin_region) VALUES ({late}, 'late@x', {hour_ago}, '{a}');
             COMMIT;
             INSERT INTO public.{t} (id, email) VALUES ({current}, 'now@x');",
            t = table.name,
            a = a.name,
        ))
        .await
        .expect("writes in A");
    let target = format!("public.{}", table.name);
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let skipped = counters.total(
            "regionsync_events_total",
            &[("table", target.as_str()), ("outcome", "late")],
        );
        if skipped >= 1 && value(&b, &table, current, "email").await.is_some() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "late change not counted ({skipped})"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert_eq!(value(&b, &table, late, "email").await, None, "not applied");
    assert_eq!(
        value(&a, &table, late, "email").await.as_deref(),
        Some("late@x")
    );
    worker.stop().await;
}

/// CRDT counters: 10,000 increments split across both regions, written
/// concurrently to the same rows, end with the exact total in both.
#[tokio::test(flavor = "multi_thread")]
async fn concurrent_increments_in_both_regions_all_count() {
    let (a, b) = (region_a(), region_b());
    let name = format!("aa_likes_{}", fresh_key());
    for region in [&a, &b] {
        exec(
            region,
            &format!(
                "CREATE TABLE public.{name} (
                     id bigint PRIMARY KEY,
                     likes bigint NOT NULL DEFAULT 0,
                     likes_parts jsonb,
                     note text,
                     hlc bigint NOT NULL DEFAULT 0,
                     origin_region text NOT NULL DEFAULT '');
                 ALTER TABLE public.{name} REPLICA IDENTITY FULL;
                 CREATE TRIGGER regionsync_stamp_hlc BEFORE INSERT OR UPDATE ON public.{name}
                     FOR EACH ROW EXECUTE FUNCTION regionsync.stamp_hlc('id');
                 CREATE TRIGGER regionsync_count_by_region BEFORE INSERT OR UPDATE ON public.{name}
                     FOR EACH ROW EXECUTE FUNCTION regionsync.count_by_region('likes', 'likes_parts');
                 CREATE TRIGGER regionsync_mark_deleted AFTER DELETE ON public.{name}
                     FOR EACH ROW EXECUTE FUNCTION regionsync.mark_deleted('id');"
            ),
        )
        .await;
    }
    let table = TestTable { name: name.clone() };
    let workers = start_workers(&table, "counters = { likes = \"likes_parts\" }");
    let first = fresh_key();
    let keys: Vec<i64> = (first..first + 10).collect();
    exec(
        &a,
        &format!(
            "INSERT INTO {name} (id, note) SELECT g, 'n' FROM generate_series({first}::bigint, {last}::bigint) g",
            last = first + 9
        ),
    )
    .await;
    let likes = |region: Region| {
        let name = name.clone();
        async move {
            app_db(&region)
                .await
                .query(
                    &format!("SELECT id, likes, note FROM {name} ORDER BY id"),
                    &[],
                )
                .await
                .unwrap()
                .iter()
                .map(|r| {
                    (
                        r.get::<_, i64>(0),
                        r.get::<_, i64>(1),
                        r.get::<_, Option<String>>(2),
                    )
                })
                .collect::<Vec<_>>()
        }
    };
    let deadline = Instant::now() + Duration::from_secs(120);
    while likes(b.clone()).await.len() < 10 {
        assert!(Instant::now() < deadline, "the rows did not reach B");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    // 5,000 increments per region, one per transaction (a transaction of
    // several rows could deadlock with the worker's batch), over the same
    // 10 rows, with some note updates (an ordinary LWW column).
    let increment = |region: Region, seed: u64| {
        let (name, keys) = (name.clone(), keys.clone());
        async move {
            let db = app_db(&region).await;
            let mut rng = Rng(seed);
            for n in 0..5_000 {
                let id = keys[rng.below(10) as usize];
                let sql = if n % 500 == 0 {
                    format!(
                        "UPDATE {name} SET likes = likes + 1, note = '{}-{n}' WHERE id = {id}",
                        region.name
                    )
                } else {
                    format!("UPDATE {name} SET likes = likes + 1 WHERE id = {id}")
                };
                db.batch_execute(&sql).await.expect("increment");
            }
        }
    };
    tokio::join!(increment(a.clone(), 7), increment(b.clone(), 13));

    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let (in_a, in_b) = (likes(a.clone()).await, likes(b.clone()).await);
        let total = |rows: &Vec<(i64, i64, Option<String>)>| rows.iter().map(|r| r.1).sum::<i64>();
        if in_a == in_b && total(&in_a) == 10_000 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not converged: A {} likes, B {}; A {in_a:?} B {in_b:?}",
            total(&in_a),
            total(&in_b)
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    stop_workers(workers).await;
}

/// Clock skew: region A's HLC source runs 5 minutes ahead, region B's 5
/// minutes behind (`regionsync.clock_offset_ms` shifts the stamping
/// trigger's clock). A write after seeing a remote one still wins
/// everywhere, in both directions; B's worker flags A's changes as beyond
/// `max_clock_skew`.
#[tokio::test(flavor = "multi_thread")]
async fn causality_holds_with_clocks_five_minutes_apart() {
    let counters = counters();
    let (a, b) = (region_a(), region_b());
    let table = TestTable::create("aa_skew").await;
    // Applied all the same (and counted), not held until the clocks meet.
    let config = |r: &Region| {
        regionsync::config::Config::from_toml(
            &worker_toml_for(r, &table, "").replace("[kafka]", "clock_ahead = \"apply\"\n[kafka]"),
        )
        .expect("valid worker config")
    };
    let workers = (Worker::start(config(&a)), Worker::start(config(&b)));
    let skewed = |region: Region, offset_ms: i64| async move {
        let db = app_db(&region).await;
        db.batch_execute(&format!("SET regionsync.clock_offset_ms = {offset_ms}"))
            .await
            .expect("set the clock offset");
        db
    };
    let (db_a, db_b) = (
        skewed(a.clone(), 300_000).await,
        skewed(b.clone(), -300_000).await,
    );
    let id = fresh_key();
    let flagged = || {
        counters.total(
            "regionsync_clock_skew_exceeded_total",
            &[("source_region", a.name.as_str())],
        )
    };
    let flagged_before = flagged();
    let name = table.name.clone();
    let converged_on = |value: &'static str| {
        let (table, b) = (&table, b.clone());
        async move {
            wait_until_equal(table, Duration::from_secs(120), value, || async {
                value_of(&b, table, id).await.as_deref() == Some(value)
            })
            .await
        }
    };
    db_a.batch_execute(&format!(
        "INSERT INTO {name} (id, email, display_name) VALUES ({id}, 'a@x', 'a1')"
    ))
    .await
    .unwrap();
    converged_on("a1").await;
    assert!(
        flagged() > flagged_before,
        "A's clock, 5 min ahead, is flagged"
    );
    // B is 10 minutes behind A's stamps: its write after A's still wins.
    db_b.batch_execute(&format!(
        "UPDATE {name} SET display_name = 'b1' WHERE id = {id}"
    ))
    .await
    .unwrap();
    converged_on("b1").await;
    db_a.batch_execute(&format!(
        "UPDATE {name} SET display_name = 'a2' WHERE id = {id}"
    ))
    .await
    .unwrap();
    converged_on("a2").await;
    db_b.batch_execute(&format!(
        "UPDATE {name} SET display_name = 'b2' WHERE id = {id}"
    ))
    .await
    .unwrap();
    converged_on("b2").await;
    // B's stamps follow the row's version, not its slow clock.
    let hlc: i64 = app_db(&b)
        .await
        .query_one(&format!("SELECT hlc FROM {name} WHERE id = {id}"), &[])
        .await
        .unwrap()
        .get(0);
    assert!(
        (hlc >> 16) > now_ms() + 200_000,
        "B's write is ordered after A's"
    );
    stop_workers(workers).await;
}

async fn value_of(region: &Region, table: &TestTable, id: i64) -> Option<String> {
    value(region, table, id, "display_name").await
}

/// `regionsync setup` installs the stamping, tombstone, truncate and
/// counter triggers on a replicated table that lacks them (idempotently),
/// and names a table without REPLICA IDENTITY FULL with the fix.
#[tokio::test(flavor = "multi_thread")]
async fn setup_installs_the_triggers_and_checks_the_replica_identity() {
    let b = region_b();
    let name = format!("aa_setup_{}", fresh_key());
    exec(
        &b,
        &format!(
            "CREATE TABLE public.{name} (id bigint PRIMARY KEY, note text, likes bigint NOT NULL DEFAULT 0,
                                         likes_parts jsonb, hlc bigint NOT NULL DEFAULT 0,
                                         origin_region text NOT NULL DEFAULT '');
             GRANT TRIGGER ON public.{name} TO regionsync;"
        ),
    )
    .await;
    let table = TestTable { name: name.clone() };
    let dir = repo_root().join("target/test-configs");
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join(format!("{name}.toml"));
    std::fs::write(
        &config,
        // Setup runs as an administrator: it creates functions and
        // triggers the worker's own role may not.
        worker_toml_for(&b, &table, "counters = { likes = \"likes_parts\" }")
            .replace("user = \"regionsync\"", "user = \"postgres\""),
    )
    .unwrap();
    let setup = || {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_regionsync"))
            .arg("--config")
            .arg(&config)
            .arg("setup")
            .output()
            .expect("run regionsync setup");
        (
            out.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    };
    let (ok, out) = setup();
    assert!(
        !ok,
        "a table without REPLICA IDENTITY FULL is a problem: {out}"
    );
    assert!(
        out.contains(&format!(
            "ALTER TABLE \"public\".\"{name}\" REPLICA IDENTITY FULL"
        )),
        "{out}"
    );
    exec(
        &b,
        &format!("ALTER TABLE public.{name} REPLICA IDENTITY FULL"),
    )
    .await;
    for _ in 0..2 {
        let (ok, out) = setup();
        assert!(ok && out.contains("setup: ok"), "{out}");
    }
    // Local writes are now stamped, counted and tombstoned.
    let db = app_db(&b).await;
    db.batch_execute(&format!(
        "INSERT INTO public.{name} (id, note) VALUES (1, 'x');
         UPDATE public.{name} SET likes = likes + 2 WHERE id = 1;"
    ))
    .await
    .unwrap();
    let row = db
        .query_one(
            &format!("SELECT hlc, origin_region, likes_parts::text FROM public.{name}"),
            &[],
        )
        .await
        .unwrap();
    let (hlc, origin, parts): (i64, String, String) = (row.get(0), row.get(1), row.get(2));
    assert!((hlc >> 16) > now_ms() - 60_000, "stamped: {hlc}");
    assert_eq!(origin, b.name);
    assert_eq!(parts, format!("{{\"{}\": [2, 0]}}", b.name));
    db.batch_execute(&format!("DELETE FROM public.{name} WHERE id = 1"))
        .await
        .unwrap();
    let tombstones: i64 = admin_db(&b)
        .await
        .query_one(
            "SELECT count(*) FROM regionsync.tombstones WHERE table_name = $1 AND row_key = '1'",
            &[&format!("public.{name}")],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(tombstones, 1);
    let triggers: i64 = admin_db(&b)
        .await
        .query_one(
            "SELECT count(*) FROM pg_trigger WHERE tgrelid = $1::text::regclass AND NOT tgisinternal",
            &[&format!("public.{name}")],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(triggers, 4, "installed once each");
}

/// `conflicts.retention`: the worker deletes the conflicts resolved longer
/// ago than it, and only those; unresolved ones stay however old, counted
/// in `regionsync_conflicts_unresolved`.
#[tokio::test]
async fn resolved_conflicts_are_pruned_after_the_retention_and_open_ones_are_kept_and_counted() {
    let table = TestTable::create("retention").await;
    let b = region_b();
    let name = format!("public.{}", table.name);
    let db = admin_db(&b).await;
    // (key, resolution, detected, resolved) with a retention of 30 minutes.
    let recorded = [
        ("old-resolved", "remote_won", "2 hours", Some("2 hours")),
        ("resolved-1h-ago", "kept_local", "3 days", Some("1 hour")),
        (
            "recently-resolved",
            "remote_won",
            "2 hours",
            Some("1 minute"),
        ),
        ("old-open", "open", "3 days", None),
        ("old-rejected-pending", "rejected", "3 days", None),
    ];
    for (key, resolution, detected, resolved) in recorded {
        db.execute(
            "INSERT INTO regionsync.conflicts
                    (table_name, row_key, kind, policy, remote_hlc, remote_origin, resolution,
                     detected_at, resolved_at)
             VALUES ($1, $2, 'update_update', 'lww', 1, $3, $4,
                     now() - $5::text::interval, now() - $6::text::interval)",
            &[
                &name,
                &key,
                &region_a().name,
                &resolution,
                &detected,
                &resolved,
            ],
        )
        .await
        .expect("record a conflict");
    }
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let toml = format!(
        "{}\n[metrics]\nlisten = \"127.0.0.1:{port}\"\n[conflicts]\nretention = \"30m\"\n",
        worker_toml_for(&b, &table, "")
    );
    let (mut worker, log) = spawn_worker(&toml, &format!("{}-retention", table.name));
    let keys = || async {
        admin_db(&b)
            .await
            .query(
                "SELECT row_key FROM regionsync.conflicts WHERE table_name = $1 ORDER BY row_key",
                &[&name],
            )
            .await
            .expect("select conflicts")
            .iter()
            .map(|r| r.get::<_, String>(0))
            .collect::<Vec<_>>()
    };
    let metric = |text: &str, line_start: &str| {
        text.lines()
            .find(|l| l.starts_with(line_start))
            .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
    };
    let gauge = format!("regionsync_conflicts_unresolved{{table=\"{name}\"}}");
    let deadline = Instant::now() + Duration::from_secs(90);
    let (left, text) = loop {
        let text = match reqwest::get(format!("http://127.0.0.1:{port}/metrics")).await {
            Ok(resp) => resp.text().await.unwrap_or_default(),
            Err(_) => String::new(),
        };
        let left = keys().await;
        if left.len() == 3 && metric(&text, &gauge).is_some() {
            break (left, text);
        }
        if Instant::now() > deadline {
            let _ = worker.kill();
            let log = log.lock().unwrap();
            panic!(
                "not pruned in 90 s: {left:?} left; log:\n{}",
                log[log.len().saturating_sub(20)..].join("\n")
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let _ = worker.kill();
    let _ = worker.wait();
    assert_eq!(
        left,
        ["old-open", "old-rejected-pending", "recently-resolved"],
        "only the conflicts resolved before the retention are deleted"
    );
    assert_eq!(metric(&text, &gauge), Some(2.0), "{gauge}");
    assert!(
        metric(&text, "regionsync_conflicts_pruned_total").is_some_and(|n| n >= 2.0),
        "pruned counter"
    );
}
