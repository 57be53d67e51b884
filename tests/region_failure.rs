//! A whole-region failure, failed over and back with the commands, against
//! the real stack (RUNBOOK.md "Regional failover and failback", followed
//! step by step):
//!
//! writers for both regions' users (us-east-1's in A, eu-west-1's in B);
//! A's PostgreSQL, Kafka, Connect and MirrorMaker 2 killed at once with
//! SIGKILL (`stack.sh region-kill`), with A's worker; `failover-check` and
//! `rehome` in B, A's users writing in B from then on; A brought back
//! (`stack.sh region-up`), `rehome --back`, A's worker started, A's users
//! back home. Then: both regions hold the same rows; every key holds its
//! latest acknowledged write (or a later one whose acknowledgement the
//! failure cut off); each key whose last write in A's RPO window raced
//! with an outage write in B has that version recorded as a losing
//! conflict in B. It prints the RTO (failure → B accepting A's users'
//! writes as their home, driven by the commands) and the RPO (changes
//! committed in A but not mirrored at the failure: count and seconds).
//!
//! `make test` runs the short variant (one policy, short phases) in its
//! own `cargo test` invocation; `make test-failover` the full run (every
//! policy, longer phases). The stack is whole again afterwards (A's
//! connectors RUNNING, MirrorMaker 2 mirroring both ways), also when an
//! assertion fails first.

mod support;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use support::kit::*;
use support::*;

/// How long each phase of a run writes.
#[derive(Clone, Copy)]
struct Phases {
    /// Before the failure (both regions up).
    before: Duration,
    /// After the failover, A's users writing in B (on top of the time A
    /// takes to come back).
    outage: Duration,
    /// After the failback.
    after: Duration,
}

/// Keys per region's users.
const KEYS: usize = 24;
/// How long A's users still write in B after the failback's `rehome
/// --back` returned.
const LOAD_BALANCER_LAG: Duration = Duration::from_secs(1);
/// Pause between two writes of one writer.
const WRITE_EVERY: Duration = Duration::from_millis(40);

#[tokio::test(flavor = "multi_thread")]
async fn a_region_fails_and_comes_back_short() {
    let phases = Phases {
        before: Duration::from_secs(10),
        outage: Duration::from_secs(10),
        after: Duration::from_secs(10),
    };
    let figures = region_failure("reject", phases).await;
    print_figures(&[figures]);
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "the full run, about 30 minutes on a busy machine: make test-failover"]
async fn a_region_fails_and_comes_back_under_every_policy() {
    let phases = Phases {
        before: Duration::from_secs(30),
        outage: Duration::from_secs(30),
        after: Duration::from_secs(20),
    };
    // REGIONSYNC_FAILOVER_POLICIES=manual (a comma list) runs only those.
    let chosen = std::env::var("REGIONSYNC_FAILOVER_POLICIES")
        .unwrap_or_else(|_| "lww,reject,manual".to_string());
    let mut all = Vec::new();
    for policy in chosen.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        all.push(region_failure(policy, phases).await);
    }
    print_figures(&all);
}

/// What one run measured.
struct Figures {
    policy: String,
    rto: Duration,
    rpo_changes: usize,
    rpo_seconds: f64,
    rpo_unknown: usize,
    rpo_metric: f64,
    rpo_window_metric: f64,
    raced: usize,
    writes: usize,
    region_down: Duration,
}

fn print_figures(all: &[Figures]) {
    eprintln!(
        "\nregion failure figures ({}):\npolicy  RTO s  RPO changes  RPO s  (unacknowledged in flight)  regionsync_rpo_changes_total  regionsync_rpo_window_seconds  raced  writes  A down s",
        humantime::format_rfc3339_seconds(SystemTime::now())
    );
    for f in all {
        eprintln!(
            "{:<7} {:>5.1}  {:>11}  {:>5.2}  {:>26}  {:>28}  {:>29.2}  {:>5}  {:>6}  {:>8.0}",
            f.policy,
            f.rto.as_secs_f64(),
            f.rpo_changes,
            f.rpo_seconds,
            f.rpo_unknown,
            f.rpo_metric,
            f.rpo_window_metric,
            f.raced,
            f.writes,
            f.region_down.as_secs_f64()
        );
    }
}

fn stack_script(args: &[&str]) -> std::process::Output {
    Command::new("bash")
        .arg(repo_root().join("deploy/local/stack.sh"))
        .args(args)
        .output()
        .expect("run stack.sh")
}

/// Brings region A's services back when dropped, so that a failed
/// assertion does not leave the shared stack without A (the later tests
/// need it whole).
struct RegionBack;

impl Drop for RegionBack {
    fn drop(&mut self) {
        let out = stack_script(&["region-up", &region_a().name]);
        if !out.status.success() {
            eprintln!(
                "stack.sh region-up failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
}

/// Removes the homing windows this run opened, in both regions, when
/// dropped: a window left open would re-home other tests' writes.
struct ForgetWindows(i64);

impl Drop for ForgetWindows {
    fn drop(&mut self) {
        let since = self.0;
        let _ = std::thread::spawn(move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime")
                .block_on(async move {
                    for region in [region_a(), region_b()] {
                        admin_db(&region)
                            .await
                            .execute(
                                "DELETE FROM regionsync.homing WHERE from_ms >= $1",
                                &[&since],
                            )
                            .await
                            .expect("delete windows");
                    }
                })
        })
        .join();
    }
}

/// SIGKILLs a worker process when dropped (one left by a failed assertion).
struct KillOnDrop(Option<Child>);

impl KillOnDrop {
    fn kill(&mut self) {
        if let Some(mut child) = self.0.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM, then wait for the exit.
    fn stop(&mut self) {
        if let Some(mut child) = self.0.take() {
            let _ = Command::new("kill")
                .arg("-TERM")
                .arg(child.id().to_string())
                .status();
            let deadline = Instant::now() + Duration::from_secs(30);
            while child.try_wait().expect("wait").is_none() {
                if Instant::now() > deadline {
                    let _ = child.kill();
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        self.kill();
    }
}

/// One acknowledged (or possibly committed) write of a writer.
#[derive(Clone, Debug)]
struct Write {
    key: i64,
    /// `<group>-<seq>`: seq grows with every write of the group.
    seq: u64,
    value: String,
    region: String,
    /// `true`: the database answered; `false`: the statement was sent and
    /// the answer cut off (it may have committed).
    acked: bool,
    at: Instant,
}

/// The writes of one group of users (the users homed in one region).
struct Writer {
    group: &'static str,
    keys: Vec<i64>,
    /// Where the load balancer sends this group now.
    target: Mutex<Region>,
    ledger: Mutex<Vec<Write>>,
    stop: AtomicBool,
    seq: AtomicU64,
}

async fn try_connect(region: &Region) -> Option<tokio_postgres::Client> {
    let conn = format!(
        "host={} port={} dbname=app user=app password={} connect_timeout=2",
        stack_env::HOST,
        region.pg_port,
        stack_env::APP_PASSWORD.get()
    );
    let (client, connection) = tokio_postgres::connect(&conn, tokio_postgres::NoTls)
        .await
        .ok()?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Some(client)
}

impl Writer {
    fn new(group: &'static str, keys: Vec<i64>, home: Region) -> Arc<Writer> {
        Arc::new(Writer {
            group,
            keys,
            target: Mutex::new(home),
            ledger: Mutex::new(Vec::new()),
            stop: AtomicBool::new(false),
            seq: AtomicU64::new(0),
        })
    }

    fn send_to(&self, region: Region) {
        *self.target.lock().unwrap() = region;
    }

    /// Writes until stopped: one update of a pseudo-random key of the
    /// group every `WRITE_EVERY`, in whichever region it is sent to. A
    /// region that does not answer is retried; only statements that
    /// reached a database are in the ledger.
    async fn run(self: Arc<Self>, table: String) {
        let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ self.keys[0] as u64);
        let mut client: Option<(String, tokio_postgres::Client)> = None;
        while !self.stop.load(Ordering::Relaxed) {
            let region = self.target.lock().unwrap().clone();
            if client.as_ref().is_none_or(|(r, _)| *r != region.name) {
                client = try_connect(&region).await.map(|c| (region.name.clone(), c));
                if client.is_none() {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
            }
            let key = self.keys[rng.below(self.keys.len() as u64) as usize];
            let seq = self.seq.fetch_add(1, Ordering::Relaxed) + 1;
            let value = format!("{}-{seq}", self.group);
            let db = &client.as_ref().unwrap().1;
            let result = tokio::time::timeout(
                Duration::from_secs(10),
                db.execute(
                    &format!("UPDATE public.{table} SET display_name = $1 WHERE id = $2"),
                    &[&value, &key],
                ),
            )
            .await;
            let acked = matches!(result, Ok(Ok(1)));
            if let Ok(Ok(n)) = result {
                assert_eq!(n, 1, "{table}: row {key} missing in {}", region.name);
            }
            self.ledger.lock().unwrap().push(Write {
                key,
                seq,
                value,
                region: region.name.clone(),
                acked,
                at: Instant::now(),
            });
            if !acked {
                client = None;
            }
            tokio::time::sleep(WRITE_EVERY).await;
        }
    }
}

/// `n` keys homed in `region`, beyond any other test's.
fn keys_homed_in(region: &str, n: usize) -> Vec<i64> {
    let regions = [region_a().name, region_b().name];
    let first = fresh_key();
    (first..)
        .filter(|k| regionsync::route::home_region(&k.to_string(), &regions) == region)
        .take(n)
        .collect()
}

/// The worker TOML of `region` for the table, with the policy, affinity
/// by `id`, a short clock-skew bound (the rehome waits for it) and its
/// metrics endpoint (failover-check asks its /readyz).
fn worker_toml(region: &Region, table: &TestTable, policy: &str, metrics_port: String) -> String {
    worker_toml_for(
        region,
        table,
        &format!("affinity = \"id\"\npolicy = \"{policy}\""),
    )
    .replace(
        "consumer_group =",
        "max_clock_skew = \"1s\"\n        consumer_group =",
    )
    .replace(
        "[apply]",
        &format!(
            "[metrics]\n        listen = \"{}:{metrics_port}\"\n        [apply]",
            stack_env::HOST
        ),
    )
}

/// Runs `failover-check --json` in `config`'s region; exit code and report.
fn failover_check(config: &Path) -> (Option<i32>, serde_json::Value) {
    let out = regionsync(config, &["failover-check", "--max-lag", "30s", "--json"]);
    let report = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("failover-check: not JSON ({e}): {}", text(&out)));
    (out.status.code(), report)
}

/// Runbook "Failover" step 3: the check in B until it lets B take over
/// from the failed A (exit 0, or 1 for A's heartbeats only) and the
/// backlog of A already in B's Kafka is applied.
async fn wait_may_take_over(b: &Path, failed: &str) {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let (code, report) = failover_check(b);
        let only_failed_heartbeat = report["reasons"].as_array().is_some_and(|rs| {
            rs.iter().all(|r| {
                (r["kind"] == "heartbeat_stale" || r["kind"] == "no_heartbeat")
                    && r["source_region"] == failed
            })
        });
        let backlog: i64 = report["facts"]["partitions"]
            .as_array()
            .map(|ps| {
                ps.iter()
                    .filter(|p| p["heartbeat"] == false)
                    .map(|p| p["messages_behind"].as_i64().unwrap_or(0).max(0))
                    .sum()
            })
            .unwrap_or(0);
        assert_ne!(code, Some(2), "B cannot tell: {report}");
        if (code == Some(0) || (code == Some(1) && only_failed_heartbeat)) && backlog == 0 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "B may not take over after 120 s: {report}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Runs `failover-check` in `config`'s region until it exits 0.
async fn wait_check_ok(config: &Path, what: &str, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let (code, report) = failover_check(config);
        if code == Some(0) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: failover-check not 0 within {within:?}: {report}"
        );
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}

/// Runs `failover-check` in `config`'s region until it exits 0 or its
/// only reasons are unsettled conflicts (runbook failback step 5: caught
/// up; under `manual` the held writes are settled next).
async fn wait_caught_up(config: &Path, what: &str, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let (code, report) = failover_check(config);
        let only_conflicts = report["reasons"]
            .as_array()
            .is_some_and(|rs| rs.iter().all(|r| r["kind"] == "unsettled_conflicts"));
        if code == Some(0) || (code == Some(1) && only_conflicts) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: not caught up within {within:?}: {report}"
        );
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}

/// A version as `conflicts list --json` prints it: (hlc, origin_region),
/// which orders like the versions (the names bytewise).
fn version_of(v: &serde_json::Value) -> (i64, String) {
    (
        v["hlc"].as_i64().expect("hlc"),
        v["origin_region"]
            .as_str()
            .expect("origin_region")
            .to_string(),
    )
}

/// Runbook failback step 6, "Settling open conflicts", in `config`'s
/// region: per key, the newest of the row's current version and every open
/// conflict's remote version (by their original HLCs) is kept: when it is
/// a remote one, that conflict is resolved `--keep remote` first; every
/// other open conflict of the key `--keep local`. Returns how many were
/// resolved each way (local, remote).
fn settle_open_conflicts(config: &Path, region: &str, table: &str) -> (usize, usize) {
    // The run's table only: other tests' tables share the stack's
    // conflict log (and have no current version in this config).
    let out = regionsync(
        config,
        &[
            "conflicts",
            "list",
            "--open",
            "--json",
            "--limit",
            "100000",
            "--table",
            &format!("public.{table}"),
        ],
    );
    assert!(out.status.success(), "conflicts list: {}", text(&out));
    let open: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("conflicts list --json: not JSON ({e}): {}", text(&out)));
    let mut by_key: BTreeMap<(String, String), Vec<&serde_json::Value>> = BTreeMap::new();
    // `manual`'s held writes; a pending `rejected` one is the worker's to
    // settle (it writes the home row again).
    for c in open.iter().filter(|c| c["resolution"] == "open") {
        let table = c["table"].as_str().expect("table").to_string();
        let key = c["key"].as_str().expect("key").to_string();
        by_key.entry((table, key)).or_default().push(c);
    }
    let resolve = |id: i64, keep: &str| {
        let out = regionsync(
            config,
            &["conflicts", "resolve", &id.to_string(), "--keep", keep],
        );
        assert!(
            out.status.success(),
            "{region}: conflicts resolve {id} --keep {keep}: {}",
            text(&out)
        );
    };
    let (mut local, mut remote) = (0, 0);
    for ((table, key), conflicts) in by_key {
        // The test deletes nothing: every row is here.
        let current = version_of(&conflicts[0]["current"]);
        let newest = conflicts
            .iter()
            .max_by_key(|c| version_of(&c["remote"]))
            .expect("one at least");
        let first = (version_of(&newest["remote"]) > current).then_some(newest);
        if let Some(c) = first {
            resolve(c["id"].as_i64().expect("id"), "remote");
            remote += 1;
        }
        for c in &conflicts {
            if first.is_some_and(|f| f["id"] == c["id"]) {
                continue;
            }
            resolve(c["id"].as_i64().expect("id"), "local");
            local += 1;
        }
        eprintln!(
            "{region}: {table} {key}: {} open, kept {}",
            conflicts.len(),
            if first.is_some() {
                "a remote version"
            } else {
                "the row"
            }
        );
    }
    (local, remote)
}

fn route_current(config: &Path, key: i64) -> String {
    let out = regionsync(config, &["route", "--current", "--", &key.to_string()]);
    assert!(out.status.success(), "{}", text(&out));
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// `display_name` of every row of the table in `region`.
async fn names(region: &Region, table: &TestTable) -> BTreeMap<i64, String> {
    app_db(region)
        .await
        .query(
            &format!(
                "SELECT id, coalesce(display_name, '') FROM public.{}",
                table.name
            ),
            &[],
        )
        .await
        .expect("read names")
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

/// The seq of a `<group>-<seq>` value (0 for the initial rows).
fn seq_of(value: &str) -> u64 {
    value
        .rsplit_once('-')
        .and_then(|(_, s)| s.parse().ok())
        .unwrap_or(0)
}

/// A gauge or counter of a worker's /metrics, summed over the series with
/// `label`.
fn scrape(port: &str, name: &str, label: &str) -> f64 {
    let body = tokio::task::block_in_place(|| {
        Command::new("curl")
            .args([
                "-fsS",
                &format!("http://{}:{port}/metrics", stack_env::HOST),
            ])
            .output()
            .expect("curl")
    });
    String::from_utf8_lossy(&body.stdout)
        .lines()
        .filter(|l| l.starts_with(name) && l.contains(label))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

async fn region_failure(policy: &str, phases: Phases) -> Figures {
    let (a, b) = (region_a(), region_b());
    let (port_a, port_b) = (
        stack_env::WORKER_METRICS_PORT_A.get(),
        stack_env::WORKER_METRICS_PORT_B.get(),
    );
    for port in [&port_a, &port_b] {
        let listen = format!("{}:{port}", stack_env::HOST);
        assert!(
            std::net::TcpStream::connect(&listen).is_err(),
            "{listen} is taken (stop `make workers-up` workers first)"
        );
    }
    let table = TestTable::create(&format!("regionfail_{policy}")).await;
    let toml_a = worker_toml(&a, &table, policy, port_a.clone());
    let toml_b = worker_toml(&b, &table, policy, port_b.clone());
    let config_a: PathBuf = config_file(&format!("{}-a", table.name), &toml_a);
    let config_b: PathBuf = config_file(&format!("{}-b", table.name), &toml_b);
    let mut worker_b = KillOnDrop(Some(spawn_worker(&toml_b, &format!("{}-b", table.name)).0));
    let mut worker_a = KillOnDrop(Some(spawn_worker(&toml_a, &format!("{}-a", table.name)).0));

    // Each region's users, their rows made at home.
    let keys_a = keys_homed_in(&a.name, KEYS);
    let keys_b = keys_homed_in(&b.name, KEYS);
    for (region, keys) in [(&a, &keys_a), (&b, &keys_b)] {
        app_db(region)
            .await
            .execute(
                &format!(
                    "INSERT INTO public.{} (id, email) SELECT k, 'k' || k || '@example.com' FROM unnest($1::bigint[]) k",
                    table.name
                ),
                &[keys],
            )
            .await
            .expect("insert users");
    }
    table.wait_converged(Duration::from_secs(120)).await;
    wait_check_ok(&config_b, "B before the run", Duration::from_secs(120)).await;

    let users_a = Writer::new("a", keys_a.clone(), a.clone());
    let users_b = Writer::new("b", keys_b.clone(), b.clone());
    let writers = [
        tokio::spawn(users_a.clone().run(table.name.clone())),
        tokio::spawn(users_b.clone().run(table.name.clone())),
    ];
    tokio::time::sleep(phases.before).await;

    // The failure: A's worker and A's services, at once.
    let _forget = ForgetWindows(now_ms() - 1_000);
    let back = RegionBack;
    let failed_at = Instant::now();
    worker_a.kill();
    let out = tokio::task::block_in_place(|| stack_script(&["region-kill", &a.name]));
    assert!(out.status.success(), "region-kill: {}", text(&out));
    // Writes A answered until its PostgreSQL died are A's too.
    let killed_at = Instant::now();
    eprintln!("{policy}: {} killed", a.name);

    // Failover (runbook steps 3 and 4), then the users follow the route.
    wait_may_take_over(&config_b, &a.name).await;
    let out = regionsync(&config_b, &["rehome", "--region", &a.name, "--to", &b.name]);
    assert!(out.status.success(), "rehome: {}", text(&out));
    assert_eq!(route_current(&config_b, keys_a[0]), b.name);
    let rto = failed_at.elapsed();
    eprintln!(
        "{policy}: RTO {:.1} s (failure -> rehome returned, route answers {})",
        rto.as_secs_f64(),
        b.name
    );
    // The test's bookkeeping, after the RTO: a message MirrorMaker 2 had
    // in flight when it was killed could still land in B's Kafka and be
    // applied after the first check. So the users move only once B has
    // settled; what B holds of A's users then is
    // everything that crossed before the failure: the RPO is what A
    // acknowledged beyond it.
    tokio::time::sleep(Duration::from_secs(3)).await;
    wait_may_take_over(&config_b, &a.name).await;
    let crossed = names(&b, &table).await;
    users_a.send_to(b.clone());

    let before_failure: Vec<Write> = users_a
        .ledger
        .lock()
        .unwrap()
        .iter()
        .filter(|w| w.at <= killed_at && w.region == a.name)
        .cloned()
        .collect();
    let unmirrored: Vec<&Write> = before_failure
        .iter()
        .filter(|w| w.seq > seq_of(crossed.get(&w.key).map_or("", |s| s.as_str())))
        .collect();
    let rpo: Vec<&&Write> = unmirrored.iter().filter(|w| w.acked).collect();
    let rpo_unknown = unmirrored.len() - rpo.len();
    let rpo_seconds = rpo
        .iter()
        .map(|w| failed_at.saturating_duration_since(w.at).as_secs_f64())
        .fold(0.0, f64::max);
    eprintln!(
        "{policy}: RPO {} acknowledged changes not mirrored at the failure, {rpo_seconds:.2} s (and {rpo_unknown} sent, unacknowledged)",
        rpo.len()
    );

    // The outage: A's users write in B.
    tokio::time::sleep(phases.outage).await;

    // Failback (runbook "Failback"): A's services without its worker;
    // the window closed in both databases; A's worker; the users back.
    let out = tokio::task::block_in_place(|| stack_script(&["region-up", &a.name]));
    assert!(out.status.success(), "region-up: {}", text(&out));
    let region_down = failed_at.elapsed();
    let out = regionsync(
        &config_b,
        &[
            "rehome",
            "--region",
            &a.name,
            "--back",
            "--drain",
            "3s",
            "--peer-config",
            &config_a.to_string_lossy(),
        ],
    );
    assert!(out.status.success(), "rehome --back: {}", text(&out));
    worker_a = KillOnDrop(Some(spawn_worker(&toml_a, &format!("{}-a2", table.name)).0));
    assert_eq!(route_current(&config_a, keys_a[0]), a.name);
    assert_eq!(route_current(&config_b, keys_a[0]), a.name);
    // The load balancer follows `route --current` with a lag: A's users
    // write in B for a moment after the window closed. Those are
    // cross-region writes to A's rows (under `manual` held in A, settled
    // in runbook failback step 6).
    tokio::time::sleep(LOAD_BALANCER_LAG).await;
    if policy == "manual" {
        // Longer, until A has applied B's backlog: A then takes their
        // writes in B before anything newer of A's, and holds them (a
        // held write is one that would win). Late ones only lose (seen:
        // `local_kept`, nothing held), and step 6 would not be exercised.
        wait_caught_up(
            &config_a,
            "A before its users return",
            Duration::from_secs(300),
        )
        .await;
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    users_a.send_to(a.clone());
    tokio::time::sleep(phases.after).await;

    for w in [&users_a, &users_b] {
        w.stop.store(true, Ordering::Relaxed);
    }
    for w in writers {
        w.await.expect("writer");
    }

    // Runbook failback step 5: both regions caught up, the mirror fresh
    // both ways; then step 6: what `manual` held (writes of A's users that
    // B took after the window closed, before they moved back) is settled,
    // each key keeping its newest version; then the check is 0.
    wait_caught_up(&config_a, "A after the failback", Duration::from_secs(180)).await;
    wait_caught_up(&config_b, "B after the failback", Duration::from_secs(180)).await;
    let settled = [
        settle_open_conflicts(&config_a, &a.name, &table.name),
        settle_open_conflicts(&config_b, &b.name, &table.name),
    ];
    eprintln!(
        "{policy}: settled open conflicts (keep local, keep remote): {}: {:?}, {}: {:?}",
        a.name, settled[0], b.name, settled[1]
    );
    if policy == "manual" {
        // The load balancer's lag left writes held in A.
        assert!(
            settled[0].0 + settled[0].1 > 0,
            "{policy}: nothing held in A"
        );
    } else {
        assert_eq!(settled, [(0, 0), (0, 0)], "{policy}: open conflicts");
    }
    wait_check_ok(&config_a, "A after the failback", Duration::from_secs(180)).await;
    wait_check_ok(&config_b, "B after the failback", Duration::from_secs(180)).await;
    table.wait_converged(Duration::from_secs(120)).await;

    // Every key holds its latest acknowledged write, or a later one whose
    // answer the failure cut off (it committed).
    let fin = names(&a, &table).await;
    let mut writes = 0;
    for writer in [&users_a, &users_b] {
        let ledger = writer.ledger.lock().unwrap();
        writes += ledger.iter().filter(|w| w.acked).count();
        for key in &writer.keys {
            let of_key: Vec<&Write> = ledger.iter().filter(|w| w.key == *key).collect();
            let Some(last_acked) = of_key.iter().rposition(|w| w.acked) else {
                continue;
            };
            let allowed: Vec<&str> = of_key[last_acked..]
                .iter()
                .enumerate()
                .filter(|(i, w)| *i == 0 || !w.acked)
                .map(|(_, w)| w.value.as_str())
                .collect();
            let got = fin.get(key).map(String::as_str).unwrap_or("<no row>");
            assert!(
                allowed.contains(&got),
                "{policy}: row {key} ends {got:?}, its latest acknowledged write was {:?} ({:?})",
                of_key[last_acked].value,
                of_key[last_acked..]
                    .iter()
                    .map(|w| format!("{} in {}", w.value, w.region))
                    .collect::<Vec<_>>()
            );
        }
    }

    // Each key whose last unmirrored version from A was overtaken by an
    // outage write in B: that version is recorded as the losing one.
    let recorded: Vec<(String, String, String)> = admin_db(&b)
        .await
        .query(
            "SELECT row_key, resolution, coalesce(remote_row->>'display_name', '')
               FROM regionsync.conflicts WHERE table_name = $1 AND remote_origin = $2",
            &[&format!("public.{}", table.name), &a.name],
        )
        .await
        .expect("read conflicts")
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    let ledger_a = users_a.ledger.lock().unwrap().clone();
    let mut raced = 0;
    let mut unrecorded = Vec::new();
    for key in &keys_a {
        // Acknowledged: a write the failure cut off unanswered may never
        // have committed in A (seen: not in A's change stream at all).
        let Some(last_rpo) = unmirrored.iter().rfind(|w| w.key == *key && w.acked) else {
            continue;
        };
        // The next write that reached a database: the ones the failure cut
        // off in A (sent, unanswered) are not outage writes.
        let next = ledger_a
            .iter()
            .find(|w| w.key == *key && w.seq > last_rpo.seq && w.acked);
        if next.is_none_or(|w| w.region != b.name) {
            continue;
        }
        raced += 1;
        if !recorded
            .iter()
            .any(|(k, _, v)| *k == key.to_string() && *v == last_rpo.value)
        {
            unrecorded.push(format!(
                "{}'s unmirrored {:?} of row {key} was overtaken by {:?} in {} and is not recorded",
                a.name,
                last_rpo.value,
                next.map(|w| &w.value),
                b.name,
            ));
        }
    }
    for u in &unrecorded {
        eprintln!("{policy}: {u}");
    }
    assert!(
        unrecorded.is_empty(),
        "{policy}: {} raced RPO versions not recorded; {}'s conflicts from {}: {recorded:?}",
        unrecorded.len(),
        b.name,
        a.name
    );
    let rpo_metric = scrape(
        &port_b,
        "regionsync_rpo_changes_total",
        &format!("source_region=\"{}\"", a.name),
    );
    let rpo_window_metric = scrape(
        &port_b,
        "regionsync_rpo_window_seconds",
        &format!("source_region=\"{}\"", a.name),
    );
    eprintln!(
        "{policy}: {writes} acknowledged writes, {raced} RPO versions raced, {} of them not recorded, B's regionsync_rpo_changes_total {rpo_metric}, regionsync_rpo_window_seconds {rpo_window_metric}",
        unrecorded.len()
    );

    worker_a.stop();
    worker_b.stop();
    drop(back);
    Figures {
        policy: policy.to_string(),
        rto,
        rpo_changes: rpo.len(),
        rpo_seconds,
        rpo_unknown,
        rpo_metric,
        rpo_window_metric,
        raced,
        writes,
        region_down,
    }
}
