//! What a run costs, read from /proc: CPU seconds and resident memory of a
//! process, of region B's PostgreSQL with its backends, and a sampler for
//! the peak RSS of a process that outlives the run.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::stack::{region_b, stack_pid};

/// user + system CPU seconds of a process (and its reaped children).
pub fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat.rsplit(") ").next().unwrap_or("").split(' ').collect();
    let ticks: f64 = [11, 12, 13, 14]
        .iter()
        .filter_map(|i| fields.get(*i).and_then(|v| v.parse::<f64>().ok()))
        .sum();
    ticks / 100.0
}

/// CPU seconds of region B's PostgreSQL: the postmaster and its backends.
pub fn postgres_b_cpu() -> f64 {
    postgres_cpu(&region_b())
}

/// CPU seconds of `region`'s PostgreSQL: the postmaster and its backends.
pub fn postgres_cpu(region: &str) -> f64 {
    let pid = stack_pid(&format!("postgres-{region}"));
    let mut total = cpu_seconds(pid);
    if let Ok(entries) = std::fs::read_dir("/proc") {
        for e in entries.flatten() {
            if let Ok(child) = e.file_name().to_string_lossy().parse::<u32>() {
                let stat =
                    std::fs::read_to_string(format!("/proc/{child}/stat")).unwrap_or_default();
                let ppid = stat.rsplit(") ").next().and_then(|r| r.split(' ').nth(1));
                if ppid == Some(&pid.to_string()) {
                    total += cpu_seconds(child);
                }
            }
        }
    }
    total
}

/// Resident set size of a process now, in MB.
pub fn rss_mb(pid: u32) -> f64 {
    status_kb(pid, "VmRSS:") / 1024.0
}

/// Peak resident set size of a process over its life, in MB.
pub fn peak_rss_mb(pid: u32) -> f64 {
    status_kb(pid, "VmHWM:") / 1024.0
}

fn status_kb(pid: u32, field: &str) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<f64>().ok())
        .unwrap_or(0.0)
}

/// Samples a process's RSS every 100 ms until stopped; `stop` returns the
/// largest sample in MB. For a process that outlives the run (the Connect
/// worker), where VmHWM would span its whole life.
pub struct RssSampler {
    stop: Arc<AtomicBool>,
    peak_kb: Arc<AtomicU64>,
    thread: std::thread::JoinHandle<()>,
}

impl RssSampler {
    pub fn start(pid: u32) -> RssSampler {
        let stop = Arc::new(AtomicBool::new(false));
        let peak_kb = Arc::new(AtomicU64::new(0));
        let (s, p) = (stop.clone(), peak_kb.clone());
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                p.fetch_max(status_kb(pid, "VmRSS:") as u64, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(100));
            }
        });
        RssSampler {
            stop,
            peak_kb,
            thread,
        }
    }

    pub fn stop(self) -> f64 {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.thread.join();
        self.peak_kb.load(Ordering::Relaxed) as f64 / 1024.0
    }
}

/// Samples a child's CPU seconds every 50 ms until it exits: a process's
/// CPU time is readable only while it runs (from /proc), so the last sample
/// before its exit is what `cpu` returns.
pub struct ChildCpu {
    seen: Arc<std::sync::Mutex<f64>>,
    thread: std::thread::JoinHandle<()>,
}

impl ChildCpu {
    pub fn start(pid: u32) -> ChildCpu {
        let seen = Arc::new(std::sync::Mutex::new(0.0));
        let s = seen.clone();
        let thread = std::thread::spawn(move || loop {
            let c = cpu_seconds(pid);
            if c > 0.0 {
                *s.lock().unwrap() = c;
            }
            if !std::path::Path::new(&format!("/proc/{pid}/stat")).exists() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        });
        ChildCpu { seen, thread }
    }

    /// The CPU seconds last seen; call after the child was waited for.
    pub fn cpu(self) -> f64 {
        let _ = self.thread.join();
        let c = *self.seen.lock().unwrap();
        c
    }
}
