//! The report as markdown (target/bench/peers.md, and printed at the end):
//! the bulk table with the ratios, and the live table with the backlog per
//! stage.

use std::fmt::Write as _;

use crate::report::Report;

pub fn markdown(r: &Report) -> String {
    let mut md = String::new();
    let _ = writeln!(md, "# regionsync vs the Debezium JDBC sink\n");
    let _ = writeln!(
        md,
        "Machine: {}. Command: `make bench-peers` (N = {}, {} runs per peer and input, alternating). JDBC sink: batch.size = max.poll.records = {}, tasks.max = {}, reduction buffer, reWriteBatchedInserts.\n",
        r.machine, r.changes, r.runs, r.sink_settings.batch_size, r.sink_settings.tasks
    );
    if !r.bulk.is_empty() {
        let _ = writeln!(
            md,
            "## Bulk apply ({} changes to users, replayed from the first offset)\n",
            r.changes
        );
        let _ = writeln!(md, "| input | peer | rows/s median | min | max | CPU s / 1M events (sink) | CPU s / 1M (PostgreSQL) | peak RSS MB |");
        let _ = writeln!(md, "|---|---|---:|---:|---:|---:|---:|---:|");
        for b in &r.bulk {
            let _ = writeln!(
                md,
                "| {} | {} | {:.0} | {:.0} | {:.0} | {:.1} | {:.1} | {:.0} |",
                b.encoding,
                b.peer.name(),
                b.rows_per_s_median,
                b.rows_per_s_min,
                b.rows_per_s_max,
                b.cpu_sink_per_m_median,
                b.cpu_pg_per_m_median,
                b.peak_rss_mb
            );
        }
        let _ = writeln!(md);
        let mut ratios: Vec<_> = r.ratios.iter().collect();
        ratios.sort_by(|a, b| a.0.cmp(b.0));
        for (enc, ratio) in ratios {
            let _ = writeln!(
                md,
                "- {enc}: regionsync / JDBC sink = **{ratio:.1}×** (medians)"
            );
        }
        let _ = writeln!(md);
    }
    if !r.live.is_empty() {
        let _ = writeln!(
            md,
            "## Live end-to-end latency (commit in B − commit in A, per row)\n"
        );
        let _ = writeln!(md, "| writes/s | peer | rows | p50 ms | p99 ms | max ms | p50 first/last tenth ms | drain s | backlog | rows behind Debezium / MM2 / sink, max | at the writer's end | CPU s / 1M (sink) | CPU s / 1M (PostgreSQL) |");
        let _ = writeln!(
            md,
            "|---:|---|---:|---:|---:|---:|---|---:|---|---|---|---:|---:|"
        );
        for l in &r.live {
            let _ = writeln!(
                md,
                "| {} | {} | {} | {:.0} | {:.0} | {:.0} | {:.0} / {:.0} | {:.1} | {} | {} / {} / {} | {} / {} / {} | {:.1} | {:.1} |",
                l.rate,
                l.peer.name(),
                l.rows,
                l.p50_ms,
                l.p99_ms,
                l.max_ms,
                l.p50_first_ms,
                l.p50_last_ms,
                l.drain_s,
                if l.backlog_grows() { "GROWS" } else { "steady" },
                l.stages.debezium_max,
                l.stages.mirrormaker_max,
                l.stages.sink_max,
                l.stages.debezium_at_end,
                l.stages.mirrormaker_at_end,
                l.stages.sink_at_end,
                l.cpu_sink_per_m,
                l.cpu_pg_per_m
            );
        }
        let _ = writeln!(md);
    }
    let _ = writeln!(md, "Sink CPU and RSS for the JDBC sink are those of region B's whole Connect worker JVM (it also hosts B's idle Debezium source connectors); for regionsync, of its process.");
    md
}
