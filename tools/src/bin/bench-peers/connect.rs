//! Kafka Connect's REST API as the benchmark uses it: the JDBC sink
//! registered on region B's Connect worker (register, wait until it runs,
//! delete and wait until it is gone), and region A's Avro capture connector
//! paused for the live phase.

use std::process::Command;
use std::time::{Duration, Instant};

use regionsync_tools::stack::{connect_a, connect_b};

pub struct Sink {
    name: String,
    pub group: String,
    http: reqwest::Client,
}

impl Sink {
    pub async fn register(name: &str, group: &str, config: String) -> Sink {
        let base = connect_b();
        let http = reqwest::Client::new();
        let r = http
            .put(format!("{base}/connectors/{name}/config"))
            .header("Content-Type", "application/json")
            .body(config)
            .send()
            .await
            .expect("Connect B's REST API (is the stack up?)");
        let status = r.status();
        assert!(
            status.is_success(),
            "registering {name} on Connect B: {status}: {}",
            r.text().await.unwrap_or_default()
        );
        Sink {
            name: name.into(),
            group: group.into(),
            http,
        }
    }

    /// Ok(true) once the connector and all its tasks run; Err with the trace
    /// of a failed task.
    pub async fn running(&self) -> Result<bool, String> {
        let base = connect_b();
        let Ok(r) = self
            .http
            .get(format!("{base}/connectors/{}/status", self.name))
            .send()
            .await
        else {
            return Ok(false);
        };
        let Ok(v) = r.json::<serde_json::Value>().await else {
            return Ok(false);
        };
        let tasks = v["tasks"].as_array().cloned().unwrap_or_default();
        if let Some(failed) = tasks.iter().find(|t| t["state"] == "FAILED") {
            let trace = failed["trace"].as_str().unwrap_or("");
            return Err(trace.lines().take(12).collect::<Vec<_>>().join("\n"));
        }
        Ok(v["connector"]["state"] == "RUNNING"
            && !tasks.is_empty()
            && tasks.iter().all(|t| t["state"] == "RUNNING"))
    }

    pub async fn wait_running(&self) {
        let started = Instant::now();
        loop {
            match self.running().await {
                Ok(true) => return,
                Ok(false) => {}
                Err(trace) => panic!("{}: a task failed:\n{trace}", self.name),
            }
            assert!(
                started.elapsed() < Duration::from_secs(120),
                "{} not running after 120 s",
                self.name
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    pub async fn delete(self) {
        let base = connect_b();
        let _ = self
            .http
            .delete(format!("{base}/connectors/{}", self.name))
            .send()
            .await;
        // The worker stops the tasks asynchronously; let it finish before
        // the next peer's run is timed.
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(30) {
            let gone = self
                .http
                .get(format!("{base}/connectors/{}", self.name))
                .send()
                .await
                .map(|r| r.status() == reqwest::StatusCode::NOT_FOUND)
                .unwrap_or(false);
            if gone {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}

/// Region A's Avro capture connector, paused for the live phase and resumed
/// when this is dropped. The live rows travel on the JSON topic only, but
/// both connectors capture every table, and on two cores the second capture
/// in the same Connect worker was the largest cost on the path: at 5,000
/// writes/s Connect A took 18 of the box's 60 CPU seconds per 30 s, the
/// backlog built up before Kafka A (rows behind Debezium 132,368, behind
/// MirrorMaker 2 at most 5,280, behind regionsync at most 1,048), and the
/// writer fell short of its rate. Both peers run under the same condition.
pub struct AvroCapturePaused;

impl AvroCapturePaused {
    const NAME: &'static str = "cdc-avro";

    pub fn pause() -> Self {
        assert!(
            Self::request("pause"),
            "pausing {} on Connect A failed",
            Self::NAME
        );
        let started = Instant::now();
        while Self::task_state().as_deref() != Some("PAUSED") {
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "{} on Connect A not paused after 60 s",
                Self::NAME
            );
            std::thread::sleep(Duration::from_millis(500));
        }
        println!("live phase: {} on Connect A paused", Self::NAME);
        AvroCapturePaused
    }

    fn request(action: &str) -> bool {
        Command::new("curl")
            .args(["-fsS", "-X", "PUT"])
            .arg(format!(
                "{}/connectors/{}/{action}",
                connect_a(),
                Self::NAME
            ))
            .status()
            .is_ok_and(|s| s.success())
    }

    fn task_state() -> Option<String> {
        let out = Command::new("curl")
            .arg("-fsS")
            .arg(format!("{}/connectors/{}/status", connect_a(), Self::NAME))
            .output()
            .ok()?;
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        v["tasks"][0]["state"].as_str().map(str::to_owned)
    }
}

impl Drop for AvroCapturePaused {
    fn drop(&mut self) {
        // Not an assert: this may run while a panic unwinds.
        if Self::request("resume") {
            println!("live phase over: {} on Connect A resumed", Self::NAME);
        } else {
            eprintln!(
                "resuming {} on Connect A failed: resume it by hand (curl -X PUT {}/connectors/{}/resume)",
                Self::NAME,
                connect_a(),
                Self::NAME
            );
        }
    }
}
