//! The report as a chart (target/bench/peers.svg): bulk rows/s per input
//! and live p50/p99 per rate, one colour per peer. Plain SVG text, no
//! plotting crate.

use std::fmt::Write as _;

use crate::peer::{Peer, PEERS};
use crate::report::Report;

/// Two bar charts side by side: bulk rows/s per input and live p50/p99 per
/// rate, one colour per peer.
pub fn chart(r: &Report) -> String {
    let colour = |p: Peer| match p {
        Peer::Regionsync => "#1f77b4",
        Peer::JdbcSink => "#d62728",
    };
    let (w, h, top, bottom) = (960.0, 420.0, 50.0, 360.0);
    let mut svg = format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">
<rect width="100%" height="100%" fill="white"/>
"#
    );
    // (panel x, title, groups of (label, [(peer, value)]))
    let bulk: Vec<(String, Vec<(Peer, f64)>)> = ["json", "avro"]
        .iter()
        .map(|enc| {
            (
                enc.to_string(),
                r.bulk
                    .iter()
                    .filter(|b| b.encoding == *enc)
                    .map(|b| (b.peer, b.rows_per_s_median))
                    .collect(),
            )
        })
        .filter(|g: &(String, Vec<(Peer, f64)>)| !g.1.is_empty())
        .collect();
    let mut live: Vec<(String, Vec<(Peer, f64)>)> = Vec::new();
    let mut rates: Vec<u64> = r.live.iter().map(|l| l.rate).collect();
    rates.dedup();
    for rate in rates {
        for (q, pick) in [("p50", 0), ("p99", 1)] {
            live.push((
                format!("{rate}/s {q}"),
                r.live
                    .iter()
                    .filter(|l| l.rate == rate)
                    .map(|l| (l.peer, if pick == 0 { l.p50_ms } else { l.p99_ms }))
                    .collect(),
            ));
        }
    }
    for (x0, title, groups) in [
        (40.0, "bulk apply, rows/s (median)", bulk),
        (520.0, "live end-to-end latency, ms", live),
    ] {
        let max = groups
            .iter()
            .flat_map(|g| g.1.iter().map(|v| v.1))
            .filter(|v| v.is_finite())
            .fold(1.0, f64::max);
        let _ = writeln!(
            svg,
            r#"<text x="{}" y="25" font-size="14" font-weight="bold">{title}</text>"#,
            x0
        );
        let _ = writeln!(
            svg,
            r#"<line x1="{x0}" y1="{bottom}" x2="{}" y2="{bottom}" stroke="black"/>"#,
            x0 + 400.0
        );
        let slot = 400.0 / groups.len().max(1) as f64;
        for (i, (label, bars)) in groups.iter().enumerate() {
            let gx = x0 + i as f64 * slot;
            let bw = (slot - 20.0) / bars.len().max(1) as f64;
            for (j, (peer, v)) in bars.iter().enumerate() {
                let bh = if v.is_finite() {
                    v / max * (bottom - top)
                } else {
                    0.0
                };
                let bx = gx + 10.0 + j as f64 * bw;
                let _ = writeln!(
                    svg,
                    r#"<rect x="{bx:.1}" y="{:.1}" width="{:.1}" height="{bh:.1}" fill="{}"/><text x="{:.1}" y="{:.1}" text-anchor="middle" font-size="10">{v:.0}</text>"#,
                    bottom - bh,
                    bw - 4.0,
                    colour(*peer),
                    bx + (bw - 4.0) / 2.0,
                    bottom - bh - 4.0
                );
            }
            let _ = writeln!(
                svg,
                r#"<text x="{:.1}" y="{}" text-anchor="middle">{label}</text>"#,
                gx + slot / 2.0,
                bottom + 18.0
            );
        }
    }
    for (i, p) in PEERS.iter().enumerate() {
        let y = 395.0;
        let x = 40.0 + i as f64 * 200.0;
        let _ = writeln!(
            svg,
            r#"<rect x="{x}" y="{}" width="12" height="12" fill="{}"/><text x="{}" y="{y}">{}</text>"#,
            y - 10.0,
            colour(*p),
            x + 18.0,
            p.name()
        );
    }
    svg.push_str("</svg>\n");
    svg
}
