//! Regional failover as commands, against the real stack (RUNBOOK.md
//! "Regional failover and failback"):
//!
//! - `failover-check` in region B: 0 while healthy; 1 within a minute of
//!   MirrorMaker 2 being paused (SIGSTOP), naming the stale source region
//!   A; 0 again once it is resumed and caught up; 2 while B's PostgreSQL
//!   does not answer (frozen).
//! - `rehome` and `route --current`: A's users move to B and back, the
//!   same windows are written in both databases, nonsense is refused.
//! - Outage writes survive failback: a write B made to a row
//!   homed in A while A's rows were re-homed in B is applied in A as an
//!   owner write under every policy, not held and overwritten by A's policy;
//!   A's unmirrored changes (RPO) are applied, or recorded where they race.
//!
//! It pauses services of the stack, so `make test` runs it in its second
//! lane (tests/lane2.sh), on a stack of its own, one test at a time.

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use support::kit::*;
use support::*;

fn metrics_b() -> String {
    format!(
        "{}:{}",
        stack_env::HOST,
        stack_env::WORKER_METRICS_PORT_B.get()
    )
}

/// Runs `failover-check --json` until its exit code is `want`, within
/// `within`; returns the JSON report then.
async fn check_until(config: &Path, want: i32, within: Duration, what: &str) -> serde_json::Value {
    let deadline = Instant::now() + within;
    loop {
        let out = regionsync(config, &["failover-check", "--max-lag", "30s", "--json"]);
        if out.status.code() == Some(want) {
            return serde_json::from_slice(&out.stdout)
                .unwrap_or_else(|e| panic!("{what}: not JSON ({e}): {}", text(&out)));
        }
        assert!(
            Instant::now() < deadline,
            "{what}: failover-check did not exit {want} within {within:?}; last: {}",
            text(&out)
        );
        tokio::time::sleep(Duration::from_secs(3)).await;
    }
}

/// Undoes a pause when dropped, on the happy path and when an assertion
/// fails first.
struct Continue(Vec<String>);

impl Drop for Continue {
    fn drop(&mut self) {
        let _ = Command::new("kill").arg("-CONT").args(&self.0).status();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn failover_check_follows_mirrormaker_and_the_database() {
    let listen = metrics_b();
    assert!(
        std::net::TcpStream::connect(&listen).is_err(),
        "{listen} is taken (stop `make workers-up` workers first)"
    );
    let table = TestTable::create("fcheck").await;
    let topic = format!("cdc.public.{}", table.name);
    let toml = worker_toml(&table, &topic, "").replace(
        "[apply]",
        &format!("[metrics]\n        listen = \"{listen}\"\n        [apply]"),
    );
    let config = config_file(&format!("{}-check", table.name), &toml);
    let (mut child, log) = spawn_worker(&toml, &table.name);
    let _stop = scopeguard(child.id());

    // Healthy: 0.
    let report = check_until(&config, 0, Duration::from_secs(120), "healthy").await;
    assert_eq!(report["verdict"], "ok", "{report}");
    insert_users(&table, 1, 50).await;
    table.wait_converged(Duration::from_secs(60)).await;
    check_until(&config, 0, Duration::from_secs(30), "healthy after writes").await;

    // MirrorMaker 2 paused: 1 within a minute, naming A.
    let mm2 = stack_pid("mirrormaker2");
    let paused = Continue(vec![mm2.clone()]);
    run(Command::new("kill").arg("-STOP").arg(&mm2));
    let stopped_at = Instant::now();
    let report = check_until(&config, 1, Duration::from_secs(60), "MirrorMaker 2 paused").await;
    let took = stopped_at.elapsed();
    let reasons = report["reasons"].as_array().expect("reasons");
    let stale = reasons
        .iter()
        .find(|r| r["kind"] == "heartbeat_stale")
        .unwrap_or_else(|| panic!("no heartbeat_stale reason: {report}"));
    assert_eq!(stale["source_region"], region_a().name.as_str(), "{report}");
    assert!(stale["seconds_behind"].as_f64().unwrap() > 30.0, "{report}");
    eprintln!("failover-check said 1 {took:?} after MirrorMaker 2 was paused: {stale}");
    // The human form names the region too.
    let out = regionsync(&config, &["failover-check"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let human = String::from_utf8_lossy(&out.stdout);
    assert!(
        human.contains("heartbeat_stale") && human.contains(&region_a().name),
        "{human}"
    );

    // Resumed and caught up: 0 again.
    drop(paused);
    check_until(
        &config,
        0,
        Duration::from_secs(120),
        "MirrorMaker 2 resumed",
    )
    .await;

    // B's PostgreSQL frozen: the check cannot tell, 2.
    let mut frozen = postgres_b_processes();
    frozen.extend(postgres_b_parent());
    let thaw = Continue(frozen.clone());
    let _ = Command::new("kill").arg("-STOP").args(&frozen).status();
    let out = regionsync(&config, &["failover-check", "--json"]);
    drop(thaw);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(report["verdict"], "unknown", "{report}");
    assert!(
        report["error"].as_str().unwrap().contains("database"),
        "{report}"
    );
    check_until(&config, 0, Duration::from_secs(120), "PostgreSQL thawed").await;

    let _ = Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status();
    let _ = child.wait();
    let _ = log;
}

/// Sends SIGTERM to `pid` when dropped (a worker left by a failed
/// assertion).
fn scopeguard(pid: u32) -> impl Drop {
    struct Term(u32);
    impl Drop for Term {
        fn drop(&mut self) {
            let _ = Command::new("kill")
                .arg("-TERM")
                .arg(self.0.to_string())
                .stderr(std::process::Stdio::null())
                .status();
        }
    }
    Term(pid)
}

/// A key homed in region A.
fn key_homed_in_a() -> String {
    let regions = [region_a().name, region_b().name];
    (0..)
        .map(|i| format!("{}", fresh_key() + i))
        .find(|k| regionsync::route::home_region(k, &regions) == regions[0])
        .unwrap()
}

async fn homing_rows(region: &Region) -> Vec<String> {
    admin_db(region)
        .await
        .query(
            "SELECT region || ' ' || acting_home || ' ' || from_ms || ' ' || coalesce(until_ms::text, '-') || ' ' || epoch
               FROM regionsync.homing ORDER BY region, from_ms",
            &[],
        )
        .await
        .expect("read homing")
        .iter()
        .map(|r| r.get(0))
        .collect()
}

/// Removes the windows this test opened (after `since_ms`), so that no
/// other test's writes are classified by them.
async fn forget_windows(since_ms: i64) {
    for region in [region_a(), region_b()] {
        admin_db(&region)
            .await
            .execute(
                "DELETE FROM regionsync.homing WHERE from_ms >= $1",
                &[&since_ms],
            )
            .await
            .expect("delete windows");
    }
}

/// Forgets the windows opened since `.0` when dropped, also when an
/// assertion failed first (a window left open would re-home other tests'
/// writes).
struct ForgetWindows(i64);

impl Drop for ForgetWindows {
    fn drop(&mut self) {
        let since = self.0;
        let _ = std::thread::spawn(move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime")
                .block_on(forget_windows(since))
        })
        .join();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn rehome_moves_a_region_s_users_and_back_in_every_database() {
    let table = TestTable::create("rehome").await;
    let quick = |toml: String| {
        toml.replace(
            "consumer_group =",
            "max_clock_skew = \"1s\"\n        consumer_group =",
        )
    };
    let b = config_file(
        &format!("{}-b", table.name),
        &quick(worker_toml_for(&region_b(), &table, "")),
    );
    let a = config_file(
        &format!("{}-a", table.name),
        &quick(worker_toml_for(&region_a(), &table, "")),
    );
    let (a_name, b_name) = (region_a().name, region_b().name);
    let key = key_homed_in_a();
    let route = |config: &PathBuf| {
        let out = regionsync(config, &["route", "--current", "--", &key]);
        assert!(out.status.success(), "{}", text(&out));
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    assert_eq!(route(&b), a_name);
    let _forget = ForgetWindows(now_ms() - 1_000);

    // Failover: A's users are homed in B, in both databases.
    rehome_both(&b, &a_name, &["--to", &b_name], &a);
    {
        assert_eq!(route(&b), b_name);
        assert_eq!(route(&a), b_name);
        let (in_a, in_b) = (
            homing_rows(&region_a()).await,
            homing_rows(&region_b()).await,
        );
        assert_eq!(in_a, in_b, "the same windows in both regions");
        assert!(
            in_b.iter()
                .any(|w| w.starts_with(&format!("{a_name} {b_name} ")) && w.contains(" - ")),
            "{in_b:?}"
        );
        // Twice is refused.
        let out = regionsync(&b, &["rehome", "--region", &a_name, "--to", &b_name]);
        assert_eq!(out.status.code(), Some(1), "{}", text(&out));
        assert!(text(&out).contains("already failed over"), "{}", text(&out));
        // Failback needs every region's database: without A's config,
        // nothing is written.
        let out = regionsync(&b, &["rehome", "--region", &a_name, "--back"]);
        assert_eq!(out.status.code(), Some(1), "{}", text(&out));
        assert!(text(&out).contains("nothing was written"), "{}", text(&out));
        assert_eq!(route(&b), b_name);

        // Failback: A is home again everywhere.
        rehome_both(&b, &a_name, &["--back"], &a);
        assert_eq!(route(&b), a_name);
        assert_eq!(route(&a), a_name);
        let (in_a, in_b) = (
            homing_rows(&region_a()).await,
            homing_rows(&region_b()).await,
        );
        assert_eq!(in_a, in_b);
        assert!(in_b.iter().all(|w| !w.contains(" - ")), "{in_b:?}");
    }
}

/// `regionsync rehome --region <region> <target…>` through `config`, in
/// both databases (`--peer-config peer`); it must succeed.
fn rehome_both(config: &Path, region: &str, target: &[&str], peer: &Path) {
    let peer = peer.to_string_lossy();
    let mut args = vec!["rehome", "--region", region];
    args.extend_from_slice(target);
    args.extend(["--peer-config", &peer]);
    let out = regionsync(config, &args);
    assert!(out.status.success(), "{}", text(&out));
}

/// A region's display_name of row `id`, with its origin.
async fn name_of(region: &Region, table: &TestTable, id: i64) -> Option<(Option<String>, String)> {
    app_db(region)
        .await
        .query_opt(
            &format!(
                "SELECT display_name, origin_region FROM public.{} WHERE id = $1",
                table.name
            ),
            &[&id],
        )
        .await
        .expect("read row")
        .map(|r| (r.get(0), r.get(1)))
}

/// Updates row `id` in `region`; returns the write's HLC.
async fn set_name(region: &Region, table: &TestTable, id: i64, name: &str) -> i64 {
    app_db(region)
        .await
        .query_one(
            &format!(
                "UPDATE public.{} SET display_name = $1 WHERE id = $2 RETURNING hlc",
                table.name
            ),
            &[&name, &id],
        )
        .await
        .expect("update")
        .get(0)
}

async fn wait_name(table: &TestTable, id: i64, want: &str, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let (a, b) = (
            name_of(&region_a(), table, id).await,
            name_of(&region_b(), table, id).await,
        );
        if a.as_ref().and_then(|r| r.0.as_deref()) == Some(want)
            && b.as_ref().and_then(|r| r.0.as_deref()) == Some(want)
        {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "row {id}: want {want:?} in both regions; A has {a:?}, B has {b:?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// The short variant of the whole-region scenario, under each policy
/// (`reject` and `manual` held, and `reject` overwrote, outage writes
/// before failover homing): with MirrorMaker 2 paused, A commits changes
/// that do not cross (the RPO window); A's users are re-homed in B; B
/// writes one of the same rows (the race) and another of A's rows; then
/// the mirror resumes. The outage writes end in both regions, the RPO
/// change without a race is applied, the one that raced is recorded as a
/// conflict in B, and A holds nothing. Prints RTO and RPO per policy.
#[tokio::test(flavor = "multi_thread")]
async fn outage_writes_survive_and_the_rpo_window_is_applied_or_recorded_under_each_policy() {
    for policy in ["reject", "manual", "lww"] {
        outage_scenario(policy).await;
    }
}

async fn outage_scenario(policy: &str) {
    let table = TestTable::create(&format!("outage_{policy}")).await;
    let extra = format!("affinity = \"id\"\npolicy = \"{policy}\"");
    let extra = extra.as_str();
    let quick = |toml: String| {
        toml.replace(
            "consumer_group =",
            "max_clock_skew = \"1s\"\n        consumer_group =",
        )
    };
    let toml_a = quick(worker_toml_for(&region_a(), &table, extra));
    let toml_b = quick(worker_toml_for(&region_b(), &table, extra));
    let a = config_file(&format!("{}-a", table.name), &toml_a);
    let b = config_file(&format!("{}-b", table.name), &toml_b);
    let worker_a = Worker::start(regionsync::config::Config::from_toml(&toml_a).unwrap());
    let worker_b = Worker::start(regionsync::config::Config::from_toml(&toml_b).unwrap());
    let (a_name, b_name) = (region_a().name, region_b().name);
    let regions = [a_name.clone(), b_name.clone()];
    // Three rows homed in A.
    let ids: Vec<i64> = (1..)
        .filter(|i: &i64| regionsync::route::home_region(&i.to_string(), &regions) == a_name)
        .take(3)
        .collect();
    let (raced, rpo_only, outage_only) = (ids[0], ids[1], ids[2]);
    for id in &ids {
        insert_users(&table, *id, 1).await;
    }
    table.wait_converged(Duration::from_secs(90)).await;

    // A commits two changes the mirror does not carry yet.
    let mm2 = stack_pid("mirrormaker2");
    let paused = Continue(vec![mm2.clone()]);
    run(Command::new("kill").arg("-STOP").arg(&mm2));
    let failed = Instant::now();
    let first_rpo_hlc = set_name(&region_a(), &table, raced, "rpo-a-raced").await;
    set_name(&region_a(), &table, rpo_only, "rpo-a-only").await;
    tokio::time::sleep(Duration::from_secs(1)).await;

    // Failover: A's users are homed in B from now on.
    let _forget = ForgetWindows(now_ms() - 1_000);
    rehome_both(&b, &a_name, &["--to", &b_name], &a);
    // RTO here: the mirror's stop to B taking A's users as their home,
    // without detection (the test knows); RPO: A's two changes not
    // mirrored, from the first one's commit to the failover.
    let rto = failed.elapsed();
    let from_ms: i64 = admin_db(&region_b())
        .await
        .query_one(
            "SELECT max(from_ms) FROM regionsync.homing WHERE region = $1",
            &[&a_name],
        )
        .await
        .unwrap()
        .get(0);
    let rpo_seconds = (from_ms - (first_rpo_hlc >> 16)) as f64 / 1000.0;
    eprintln!(
        "{policy}: RTO {:.1} s (mirror stopped -> rehome returned); RPO 2 changes, {rpo_seconds:.1} s",
        rto.as_secs_f64()
    );
    set_name(&region_b(), &table, raced, "outage-b-raced").await;
    set_name(&region_b(), &table, outage_only, "outage-b-only").await;

    // The mirror resumes: both backlogs cross.
    drop(paused);
    wait_name(&table, raced, "outage-b-raced", Duration::from_secs(120)).await;
    wait_name(
        &table,
        outage_only,
        "outage-b-only",
        Duration::from_secs(60),
    )
    .await;
    wait_name(&table, rpo_only, "rpo-a-only", Duration::from_secs(60)).await;
    table.wait_converged(Duration::from_secs(60)).await;

    // The RPO change that raced is a recorded losing version in B.
    let recorded = admin_db(&region_b())
        .await
        .query(
            "SELECT resolution, remote_row->>'display_name' FROM regionsync.conflicts
              WHERE table_name = $1 AND row_key = $2 AND remote_origin = $3",
            &[
                &format!("public.{}", table.name),
                &raced.to_string(),
                &a_name,
            ],
        )
        .await
        .unwrap();
    let recorded: Vec<(String, Option<String>)> =
        recorded.iter().map(|r| (r.get(0), r.get(1))).collect();
    assert_eq!(
        recorded,
        vec![("local_kept".to_string(), Some("rpo-a-raced".to_string()))]
    );
    // A held none of B's outage writes.
    let held: i64 = admin_db(&region_a())
        .await
        .query_one(
            "SELECT count(*) FROM regionsync.conflicts
              WHERE table_name = $1 AND resolution IN ('rejected', 'open')",
            &[&format!("public.{}", table.name)],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(held, 0, "A held outage writes");

    // Failback; A's users write at home again.
    rehome_both(&b, &a_name, &["--back"], &a);
    set_name(&region_a(), &table, outage_only, "after-a").await;
    wait_name(&table, outage_only, "after-a", Duration::from_secs(60)).await;
    table.wait_converged(Duration::from_secs(60)).await;

    worker_a.stop().await;
    worker_b.stop().await;
}

/// How long Kubernetes waits after SIGTERM before it kills the pod
/// (deploy/k8s/base/deployment.yaml).
const GRACE: Duration = Duration::from_secs(30);

/// Sends SIGTERM to `child` and waits (up to `GRACE`) for it to exit;
/// returns how long that took, or fails naming the log.
fn terminate(
    child: &mut std::process::Child,
    log: &std::sync::Mutex<Vec<String>>,
    what: &str,
) -> Duration {
    let asked = Instant::now();
    run(Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string()));
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            assert!(status.success(), "{what}: the worker exited with {status}");
            return asked.elapsed();
        }
        if asked.elapsed() > GRACE {
            let _ = child.kill();
            let log = log.lock().unwrap();
            panic!(
                "{what}: still running {GRACE:?} after SIGTERM; log:\n{}",
                log[log.len().saturating_sub(20)..].join("\n")
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A SIGTERM ends the worker within its grace period whatever is down:
/// here B's PostgreSQL frozen (SIGSTOP), once while batches wait on it and
/// once while the worker is starting.
#[tokio::test(flavor = "multi_thread")]
async fn sigterm_stops_the_worker_within_its_grace_period_with_postgres_frozen() {
    let table = TestTable::create("drain").await;
    let topic = format!("cdc.public.{}", table.name);
    let toml = worker_toml(&table, &topic, "");
    let (mut child, log) = spawn_worker(&toml, &format!("{}-drain", table.name));
    let _stop = scopeguard(child.id());
    insert_users(&table, 1, 20).await;
    // Generous: on a loaded box (make test runs two stacks) a worker
    // started before its topic exists has been seen to take minutes.
    table.wait_converged(Duration::from_secs(240)).await;

    let mut frozen = postgres_b_processes();
    frozen.extend(postgres_b_parent());
    let thaw = Continue(frozen.clone());
    let _ = Command::new("kill").arg("-STOP").args(&frozen).status();
    // Changes arrive for a database that does not answer: their batch
    // waits on it.
    insert_users(&table, 21, 20).await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let running = tokio::task::block_in_place(|| terminate(&mut child, &log, "running"));

    // Started with the database already frozen.
    let (mut child, log) = spawn_worker(&toml, &format!("{}-drain-start", table.name));
    let _stop = scopeguard(child.id());
    tokio::time::sleep(Duration::from_secs(3)).await;
    let starting = tokio::task::block_in_place(|| terminate(&mut child, &log, "starting"));
    drop(thaw);
    eprintln!("exited {running:?} after SIGTERM while running, {starting:?} while starting");
    assert!(running < Duration::from_secs(20), "running: {running:?}");
    assert!(starting < Duration::from_secs(5), "starting: {starting:?}");
    // Nothing lost: the changes held by the frozen database arrive.
    let (mut child, log) = spawn_worker(&toml, &format!("{}-drain-after", table.name));
    let _stop = scopeguard(child.id());
    assert_eq!(table.wait_converged(Duration::from_secs(120)).await, 40);
    tokio::task::block_in_place(|| terminate(&mut child, &log, "after"));
}

/// `/readyz` of the worker listening on `listen`: (ready, body).
fn readyz(listen: &str) -> (bool, String) {
    let out = tokio::task::block_in_place(|| {
        Command::new("curl")
            .args([
                "-sS",
                "-w",
                "\n%{http_code}",
                &format!("http://{listen}/readyz"),
            ])
            .output()
            .expect("curl")
    });
    let out = String::from_utf8_lossy(&out.stdout).to_string();
    let (body, code) = out.trim_end().rsplit_once('\n').unwrap_or(("", &out));
    (code == "200", body.to_string())
}

/// The homing fence (DESIGN.md §3, "The returning region learns the
/// homing before it applies"): A is down (simulated: its worker stopped,
/// the failover written into B only, as `rehome --to` does when A does not
/// answer); A's users write in B. A's worker started before `rehome
/// --back` holds B's partitions: not ready, naming the reason, and B's
/// outage writes are not applied in A (under `reject` A would hold them and
/// write its old rows again over them). After `rehome --back` it continues
/// on its own: the outage writes end in both regions, A holds nothing.
#[tokio::test(flavor = "multi_thread")]
async fn a_returning_worker_holds_until_rehome_back_has_taught_its_database() {
    let listen = format!(
        "{}:{}",
        stack_env::HOST,
        stack_env::WORKER_METRICS_PORT_A.get()
    );
    assert!(
        std::net::TcpStream::connect(&listen).is_err(),
        "{listen} is taken (stop `make workers-up` workers first)"
    );
    let table = TestTable::create("fence").await;
    let extra = "affinity = \"id\"\npolicy = \"reject\"";
    let quick = |toml: String| {
        toml.replace(
            "consumer_group =",
            "max_clock_skew = \"1s\"\n        consumer_group =",
        )
    };
    let toml_a = quick(worker_toml_for(&region_a(), &table, extra));
    let toml_b = quick(worker_toml_for(&region_b(), &table, extra));
    let a = config_file(&format!("{}-a", table.name), &toml_a);
    let b = config_file(&format!("{}-b", table.name), &toml_b);
    let (a_name, b_name) = (region_a().name, region_b().name);
    let regions = [a_name.clone(), b_name.clone()];
    let ids: Vec<i64> = (1..)
        .filter(|i: &i64| regionsync::route::home_region(&i.to_string(), &regions) == a_name)
        .take(3)
        .collect();
    for id in &ids {
        insert_users(&table, *id, 1).await;
    }
    let worker_b = Worker::start(regionsync::config::Config::from_toml(&toml_b).unwrap());
    table.wait_converged(Duration::from_secs(90)).await;

    // A is down: the failover reaches B only.
    let _forget = ForgetWindows(now_ms() - 1_000);
    let out = regionsync(&b, &["rehome", "--region", &a_name, "--to", &b_name]);
    assert!(out.status.success(), "{}", text(&out));
    for id in &ids {
        set_name(&region_b(), &table, *id, "outage-b").await;
    }

    // A's worker comes back before `rehome --back`.
    let toml_a_served = toml_a.replace(
        "[apply]",
        &format!("[metrics]\n        listen = \"{listen}\"\n        [apply]"),
    );
    let (mut child, log) = spawn_worker(&toml_a_served, &format!("{}-a-run", table.name));
    let _stop = scopeguard(child.id());
    let deadline = Instant::now() + Duration::from_secs(60);
    let body = loop {
        let (ready, body) = readyz(&listen);
        if !ready && body.contains(&format!("homing epoch behind {b_name}: run rehome --back")) {
            break body;
        }
        assert!(
            Instant::now() < deadline,
            "A's worker did not say it is behind within 60 s: {body}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    eprintln!("A's worker before rehome --back: {}", body.trim());
    // Held: a while later, still nothing of B's applied in A, nothing held
    // or rejected there.
    tokio::time::sleep(Duration::from_secs(8)).await;
    assert!(!readyz(&listen).0);
    for id in &ids {
        let in_a = name_of(&region_a(), &table, *id).await;
        assert_eq!(
            in_a.as_ref().map(|r| (r.0.clone(), r.1.as_str())),
            Some((None, a_name.as_str())),
            "row {id}: A applied an outage write before rehome --back"
        );
    }
    let conflicts_in_a = || async {
        admin_db(&region_a())
            .await
            .query_one(
                "SELECT count(*) FROM regionsync.conflicts WHERE table_name = $1",
                &[&format!("public.{}", table.name)],
            )
            .await
            .unwrap()
            .get::<_, i64>(0)
    };
    assert_eq!(conflicts_in_a().await, 0);

    // `rehome --back` teaches A's database: A's worker continues alone.
    rehome_both(&b, &a_name, &["--back"], &a);
    for id in &ids {
        wait_name(&table, *id, "outage-b", Duration::from_secs(60)).await;
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while !readyz(&listen).0 {
        assert!(
            Instant::now() < deadline,
            "A's worker not ready after rehome --back: {}",
            readyz(&listen).1
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    table.wait_converged(Duration::from_secs(60)).await;
    // Nothing overwritten: B's outage writes stand in both regions, A held
    // and rejected none of them.
    tokio::time::sleep(Duration::from_secs(3)).await;
    for id in &ids {
        for region in [region_a(), region_b()] {
            let row = name_of(&region, &table, *id).await.unwrap();
            assert_eq!(
                (row.0.as_deref(), row.1.as_str()),
                (Some("outage-b"), b_name.as_str()),
                "row {id} in {}",
                region.name
            );
        }
    }
    assert_eq!(conflicts_in_a().await, 0);
    assert!(
        log.lock()
            .unwrap()
            .iter()
            .any(|l| l.contains("the homing fence released the partition")),
        "A's worker log says nothing of the fence's release"
    );
    let _ = Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status();
    let _ = child.wait();
    worker_b.stop().await;
}
