//! The report of `make bench-peers`: what was measured, on which machine,
//! with which sink settings, and where it is written — the table as
//! markdown (markdown.rs), the whole report as JSON, and a chart as SVG
//! (svg.rs), all under target/bench/.

use std::collections::HashMap;

use regionsync_tools::stack::root;
use serde::Serialize;

use crate::bulk::BulkSummary;
use crate::live::LiveResult;
use crate::markdown::markdown;
use crate::peer::SinkSettings;
use crate::svg::chart;

#[derive(Serialize)]
pub struct Report {
    pub machine: String,
    pub changes: u64,
    pub runs: u64,
    pub sink_settings: SinkSettings,
    pub bulk: Vec<BulkSummary>,
    pub ratios: HashMap<String, f64>,
    pub live: Vec<LiveResult>,
}

pub fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .map(|s| s.trim().to_string())
        .unwrap_or_default();
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let mem_gib = std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<f64>().ok())
        .unwrap_or(0.0)
        / 1024.0
        / 1024.0;
    format!("{cores} cores ({cpu}), {mem_gib:.0} GiB, everything on one box")
}

/// Writes target/bench/peers.md, peers.json and peers.svg, and prints the
/// markdown table.
pub fn write(report: &Report) {
    let dir = root().join("target/bench");
    std::fs::create_dir_all(&dir).unwrap();
    let md = markdown(report);
    std::fs::write(dir.join("peers.md"), &md).unwrap();
    std::fs::write(
        dir.join("peers.json"),
        serde_json::to_string_pretty(report).unwrap(),
    )
    .unwrap();
    std::fs::write(dir.join("peers.svg"), chart(report)).unwrap();
    println!("\n{md}");
    println!("written: target/bench/peers.md, target/bench/peers.json, target/bench/peers.svg");
}
