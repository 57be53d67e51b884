//! The lag operators can trust, end to end: the `regionsync` binary runs in
//! region B with its endpoint on B's metrics port, which the stack's real
//! Prometheus scrapes with the project's rules (deploy/prometheus/) loaded.
//!
//! - Idle: with no user writes for 60 s, heartbeats keep lag below 10 s.
//! - Stalls: MirrorMaker 2 stopped, then A's Debezium connector stopped, then
//!   B's PostgreSQL frozen (SIGSTOP): each time lag rises past 30 s and
//!   after recovery falls below 5 s. Through the first stall the page alert
//!   goes pending then firing in Prometheus and resolves after recovery;
//!   through all three with `REGIONSYNC_LONG_TESTS=1` (`make test-long`).
//!   The rule is the same expression for every stall, and each stall
//!   costs its alert's `for: 1m` and more, so `make test` watches it once.
//!
//! It stops services of the stack, so `make test` runs it in its second
//! lane (tests/lane2.sh), on a stack of its own, one test at a time.

mod support;

use std::collections::HashSet;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use support::kit::*;
use support::*;

/// Region B's worker metrics address in the local stack: Prometheus
/// scrapes it.
fn metrics_b() -> String {
    format!(
        "{}:{}",
        stack_env::HOST,
        stack_env::WORKER_METRICS_PORT_B.port()
    )
}

fn prometheus_url() -> String {
    format!(
        "http://{}:{}",
        stack_env::HOST,
        stack_env::PROMETHEUS_PORT.port()
    )
}
const ALERT: &str = "RegionsyncReplicationLagHigh";

struct LagWorker {
    child: Child,
    base: String,
    log: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl LagWorker {
    /// The binary for region B, consuming A's heartbeats and a table of its
    /// own that nobody writes.
    async fn start(name: &str) -> LagWorker {
        assert!(
            std::net::TcpStream::connect(metrics_b()).is_err(),
            "{} is taken (stop `make workers-up` workers before the lag tests)",
            metrics_b()
        );
        let table = TestTable::create(name).await;
        let topic = format!("cdc.public.{}", table.name);
        let toml = worker_toml(&table, &topic, "").replace(
            "[apply]",
            &format!(
                "[metrics]\n        listen = \"{}\"\n        [apply]",
                metrics_b()
            ),
        );
        let (child, log) = spawn_worker(&toml, &table.name);
        let worker = LagWorker {
            child,
            base: format!("http://{}", metrics_b()),
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while worker.get("/healthz").await.map(|r| r.0) != Some(200) {
            assert!(
                Instant::now() < deadline,
                "/healthz does not answer: {}",
                worker.log_tail()
            );
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        worker
    }

    fn log_tail(&self) -> String {
        let log = self.log.lock().expect("log lock");
        log[log.len().saturating_sub(15)..].join("\n")
    }

    async fn get(&self, path: &str) -> Option<(u16, String)> {
        let resp = reqwest::Client::new()
            .get(format!("{}{path}", self.base))
            .timeout(Duration::from_secs(5))
            .send()
            .await
            .ok()?;
        let status = resp.status().as_u16();
        Some((status, resp.text().await.unwrap_or_default()))
    }

    /// (replication lag, heartbeat age) of source region A, as served.
    async fn lag(&self) -> Option<(f64, f64)> {
        let (_, text) = self.get("/metrics").await?;
        let picture = regionsync::ops::status::parse(&text).ok()?;
        let r = picture.regions.get(&region_a().name)?;
        Some((r.lag_seconds?, r.heartbeat_age_seconds?))
    }

    /// Waits until `pred(lag)` holds; returns the lag then.
    async fn wait_lag(&self, what: &str, within: Duration, pred: impl Fn(f64) -> bool) -> f64 {
        let deadline = Instant::now() + within;
        let mut last = None;
        loop {
            if let Some((lag, _)) = self.lag().await {
                if pred(lag) {
                    return lag;
                }
                last = Some(lag);
            }
            assert!(
                Instant::now() < deadline,
                "{what}: not within {within:?}; last lag {last:?}; worker log:\n{}",
                self.log_tail()
            );
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }
}

impl Drop for LagWorker {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        let _ = self.child.wait();
    }
}

async fn prometheus(path: &str) -> serde_json::Value {
    reqwest::Client::new()
        .get(format!("{}{path}", prometheus_url()))
        .timeout(Duration::from_secs(5))
        .send()
        .await
        .unwrap_or_else(|e| panic!("Prometheus {path}: {e}"))
        .json()
        .await
        .expect("Prometheus JSON")
}

/// The page alert's state for B's worker and source region A, if active.
async fn alert_state() -> Option<String> {
    let alerts = prometheus("/api/v1/alerts").await;
    alerts["data"]["alerts"]
        .as_array()?
        .iter()
        .find(|a| {
            a["labels"]["alertname"] == ALERT
                && a["labels"]["region"] == region_b().name.as_str()
                && a["labels"]["source_region"] == region_a().name.as_str()
        })
        .map(|a| a["state"].as_str().unwrap_or_default().to_string())
}

/// Whether the long variant runs (`make test-long`): the alert watched
/// through every stall, not only the first.
fn long_variant() -> bool {
    std::env::var_os("REGIONSYNC_LONG_TESTS").is_some_and(|v| v == "1")
}

/// Waits until the alert has been seen pending and then firing.
async fn alert_goes_pending_then_firing(stall: &str) {
    let deadline = Instant::now() + Duration::from_secs(150);
    let mut seen = Vec::<String>::new();
    loop {
        if let Some(state) = alert_state().await {
            if seen.last() != Some(&state) {
                seen.push(state.clone());
            }
            if state == "firing" {
                assert!(
                    seen.contains(&"pending".to_string()),
                    "{stall}: {ALERT} fired without being pending first: {seen:?}"
                );
                return;
            }
        }
        assert!(
            Instant::now() < deadline,
            "{stall}: {ALERT} did not fire; states seen: {seen:?}"
        );
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}

async fn alert_resolves(stall: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while let Some(state) = alert_state().await {
        assert!(
            Instant::now() < deadline,
            "{stall}: {ALERT} still {state} 60 s after recovery"
        );
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}

/// Prometheus has the project's rules loaded and scrapes B's worker.
async fn prometheus_watches(worker: &LagWorker) {
    let rules = prometheus("/api/v1/rules").await.to_string();
    assert!(
        rules.contains(ALERT),
        "Prometheus has not loaded deploy/prometheus rules ({ALERT} missing): restart it with `make stack-up` after stopping it"
    );
    let query = format!(
        "/api/v1/query?query=regionsync_replication_lag_seconds%7Bregion%3D%22{}%22%2Csource_region%3D%22{}%22%7D",
        region_b().name,
        region_a().name
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let v = prometheus(&query).await;
        if let Some(lag) = v["data"]["result"][0]["value"][1]
            .as_str()
            .and_then(|s| s.parse::<f64>().ok())
        {
            assert!(lag < 10.0, "Prometheus sees lag {lag}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "Prometheus does not see B's worker lag: {v}"
        );
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    let _ = worker;
}

async fn stop_connector_a() {
    let url = format!(
        "http://{}:{}/connectors/cdc-json/stop",
        support::stack_env::HOST,
        support::stack_env::CONNECT_PORT_A.get()
    );
    let resp = reqwest::Client::new()
        .put(&url)
        .send()
        .await
        .unwrap_or_else(|e| panic!("{url}: {e}"));
    assert!(resp.status().is_success(), "{url}: {}", resp.status());
}

#[tokio::test(flavor = "multi_thread")]
async fn idle_pipeline_reports_low_lag_from_heartbeats() {
    let worker = LagWorker::start("lag_idle").await;
    assert_eq!(
        worker.get("/healthz").await.map(|r| r.0),
        Some(200),
        "/healthz answers while the process runs"
    );
    worker
        .wait_lag(
            "catching up with A's heartbeats",
            Duration::from_secs(180),
            |l| l < 10.0,
        )
        .await;
    let ready = worker.get("/readyz").await;
    assert_eq!(ready.as_ref().map(|r| r.0), Some(200), "/readyz: {ready:?}");
    prometheus_watches(&worker).await;

    // No user writes for 60 s: only heartbeats flow, and they keep lag low.
    let until = Instant::now() + Duration::from_secs(60);
    let mut samples = 0;
    while Instant::now() < until {
        let (lag, heartbeat_age) = worker.lag().await.expect("lag is served");
        assert!(lag < 10.0, "idle lag {lag} s");
        assert!(heartbeat_age < 10.0, "heartbeat age {heartbeat_age} s");
        samples += 1;
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    assert!(samples >= 25, "{samples} samples");

    // `regionsync status` shows the same picture.
    let out = tokio::task::block_in_place(|| {
        Command::new(env!("CARGO_BIN_EXE_regionsync"))
            .args(["status", "--url", &worker.base, "--interval", "1"])
            .output()
            .expect("regionsync status")
    });
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "status failed: {text}");
    assert!(text.contains("ready    yes"), "{text}");
    let row = text
        .lines()
        .find(|l| l.starts_with(&region_a().name))
        .unwrap_or_else(|| panic!("no row for {}: {text}", region_a().name));
    let lag: f64 = row
        .split_whitespace()
        .nth(1)
        .unwrap()
        .trim_end_matches('s')
        .parse()
        .unwrap();
    assert!(lag < 10.0, "status shows lag {lag}: {row}");
}

#[tokio::test(flavor = "multi_thread")]
async fn lag_rises_and_pages_through_each_stall_then_recovers() {
    let worker = LagWorker::start("lag_stalls").await;
    worker
        .wait_lag("catching up", Duration::from_secs(180), |l| l < 5.0)
        .await;
    prometheus_watches(&worker).await;
    let mut seen_stalls = HashSet::new();

    // 1. MirrorMaker 2 stops: nothing crosses from A to B.
    let stall = "MirrorMaker 2 stopped";
    let restart = Restore::with("make", &["-C", &repo_root().to_string_lossy(), "stack-up"]);
    run(Command::new("kill")
        .arg("-TERM")
        .arg(stack_pid("mirrormaker2")));
    worker
        .wait_lag(stall, Duration::from_secs(90), |l| l > 30.0)
        .await;
    alert_goes_pending_then_firing(stall).await;
    tokio::task::block_in_place(|| drop(restart));
    worker
        .wait_lag(
            &format!("{stall}, restarted"),
            Duration::from_secs(120),
            |l| l < 5.0,
        )
        .await;
    alert_resolves(stall).await;
    seen_stalls.insert(stall);

    // 2. A's Debezium connector stops: no change or heartbeat is captured.
    let stall = "Debezium connector stopped";
    let resume = Restore::with(
        "curl",
        &[
            "-fsS",
            "-X",
            "PUT",
            &format!(
                "http://{}:{}/connectors/cdc-json/resume",
                support::stack_env::HOST,
                support::stack_env::CONNECT_PORT_A.get()
            ),
        ],
    );
    stop_connector_a().await;
    worker
        .wait_lag(stall, Duration::from_secs(90), |l| l > 30.0)
        .await;
    if long_variant() {
        alert_goes_pending_then_firing(stall).await;
    }
    tokio::task::block_in_place(|| drop(resume));
    worker
        .wait_lag(
            &format!("{stall}, resumed"),
            Duration::from_secs(120),
            |l| l < 5.0,
        )
        .await;
    alert_resolves(stall).await;
    seen_stalls.insert(stall);

    // 3. B's PostgreSQL freezes: the worker cannot commit, and is not ready.
    let stall = "PostgreSQL B frozen";
    let frozen = postgres_b_processes();
    let parent: Vec<String> = postgres_b_parent().into_iter().collect();
    let thaw = Restore::with(
        "kill",
        &[&["-CONT".to_string()], frozen.as_slice(), parent.as_slice()]
            .concat()
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
    );
    // Not asserted: a short-lived child may exit between pgrep and kill
    // (kill then exits non-zero); the others are stopped all the same.
    let _ = Command::new("kill").arg("-STOP").args(&frozen).status();
    worker
        .wait_lag(stall, Duration::from_secs(90), |l| l > 30.0)
        .await;
    let ready = worker.get("/readyz").await;
    assert_eq!(
        ready.as_ref().map(|r| r.0),
        Some(503),
        "{stall}: /readyz {ready:?}"
    );
    assert_eq!(worker.get("/healthz").await.map(|r| r.0), Some(200));
    if long_variant() {
        alert_goes_pending_then_firing(stall).await;
    }
    drop(thaw);
    worker
        .wait_lag(&format!("{stall}, thawed"), Duration::from_secs(120), |l| {
            l < 5.0
        })
        .await;
    alert_resolves(stall).await;
    seen_stalls.insert(stall);
    assert_eq!(seen_stalls.len(), 3);
}

/// Undoes a stall when dropped — on the happy path and when an assertion
/// fails first, so a stopped service cannot wedge the tests after it.
struct Restore(Vec<String>);

impl Restore {
    fn with(program: &str, args: &[&str]) -> Restore {
        Restore(
            std::iter::once(program)
                .chain(args.iter().copied())
                .map(str::to_string)
                .collect(),
        )
    }
}

impl Drop for Restore {
    fn drop(&mut self) {
        match Command::new(&self.0[0]).args(&self.0[1..]).status() {
            Ok(s) if s.success() => {}
            other => eprintln!("restoring with {:?}: {other:?}", self.0),
        }
    }
}
