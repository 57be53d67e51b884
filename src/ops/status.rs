//! `regionsync status`: one worker's picture in the terminal, read from its
//! own metrics endpoint — the same numbers Prometheus and the dashboard show.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

use prometheus_parse::{Scrape, Value};

use crate::metrics as m;

/// What one scrape of `/metrics` says, per source region and in total.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Picture {
    pub regions: BTreeMap<String, RegionPicture>,
    /// Dead-lettered messages by reason.
    pub dlq: BTreeMap<String, f64>,
    /// Conflicts by `table/policy`.
    pub conflicts: BTreeMap<String, f64>,
    /// Sum of the consumer lag over the owned partitions.
    pub consumer_lag: f64,
    pub ready: Option<bool>,
}

#[derive(Debug, Default, Clone, PartialEq)]
pub struct RegionPicture {
    pub lag_seconds: Option<f64>,
    pub heartbeat_age_seconds: Option<f64>,
    /// Change events seen (every outcome but heartbeats).
    pub events: f64,
    pub applied: f64,
    /// Mean end-to-end latency over the worker's life.
    pub mean_latency_seconds: Option<f64>,
}

/// Reads a Prometheus text exposition.
pub fn parse(text: &str) -> anyhow::Result<Picture> {
    let scrape = Scrape::parse(text.lines().map(|l| Ok(l.to_string())))?;
    let mut p = Picture::default();
    let mut latency: BTreeMap<String, (f64, f64)> = BTreeMap::new();
    for s in scrape.samples {
        let value = match &s.value {
            Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => *v,
            _ => continue,
        };
        let label = |name: &str| s.labels.get(name).unwrap_or("").to_string();
        let region = || p_region(&label("source_region"));
        match s.metric.as_str() {
            m::REPLICATION_LAG => p.regions.entry(region()).or_default().lag_seconds = Some(value),
            m::HEARTBEAT_AGE => {
                p.regions.entry(region()).or_default().heartbeat_age_seconds = Some(value)
            }
            m::EVENTS_TOTAL => {
                let outcome = label("outcome");
                if outcome == m::outcome::HEARTBEAT {
                    continue;
                }
                let r = p.regions.entry(region()).or_default();
                r.events += value;
                if outcome == m::outcome::APPLIED {
                    r.applied += value;
                }
            }
            m::DLQ_MESSAGES_TOTAL => *p.dlq.entry(label("reason")).or_default() += value,
            m::CONFLICTS_TOTAL => {
                *p.conflicts
                    .entry(format!("{}/{}", label("table"), label("policy")))
                    .or_default() += value
            }
            m::CONSUMER_LAG => p.consumer_lag += value,
            m::READY => p.ready = Some(value >= 1.0),
            _ if s.metric == format!("{}_sum", m::END_TO_END_LATENCY) => {
                latency.entry(region()).or_default().0 += value
            }
            _ if s.metric == format!("{}_count", m::END_TO_END_LATENCY) => {
                latency.entry(region()).or_default().1 += value
            }
            _ => {}
        }
    }
    for (region, (sum, count)) in latency {
        if count > 0.0 {
            p.regions.entry(region).or_default().mean_latency_seconds = Some(sum / count);
        }
    }
    Ok(p)
}

fn p_region(r: &str) -> String {
    if r.is_empty() {
        "-".to_string()
    } else {
        r.to_string()
    }
}

fn secs(v: Option<f64>) -> String {
    v.map_or("-".to_string(), |v| format!("{v:.1}s"))
}

/// The terminal table: `now` and, when given, an earlier scrape `interval`
/// before it for the rates.
pub fn render(
    url: &str,
    ready: &str,
    now: &Picture,
    earlier: Option<(&Picture, Duration)>,
) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "worker   {url}");
    let _ = writeln!(out, "ready    {ready}");
    let _ = writeln!(
        out,
        "consumer lag  {} messages behind the high watermarks",
        now.consumer_lag
    );
    let _ = writeln!(
        out,
        "\n{:<16} {:>9} {:>14} {:>10} {:>12} {:>12}",
        "SOURCE REGION", "LAG", "HEARTBEAT AGE", "EVENTS/S", "APPLIED", "MEAN E2E"
    );
    for (region, r) in &now.regions {
        let rate = match earlier {
            Some((before, interval)) if interval.as_secs_f64() > 0.0 => {
                let was = before.regions.get(region).map_or(0.0, |b| b.events);
                format!("{:.1}", (r.events - was).max(0.0) / interval.as_secs_f64())
            }
            _ => "-".to_string(),
        };
        let _ = writeln!(
            out,
            "{:<16} {:>9} {:>14} {:>10} {:>12} {:>12}",
            region,
            secs(r.lag_seconds),
            secs(r.heartbeat_age_seconds),
            rate,
            r.applied,
            secs(r.mean_latency_seconds)
        );
    }
    let total = |m: &BTreeMap<String, f64>| m.values().sum::<f64>();
    let _ = writeln!(out, "\ndead-lettered  {}", total(&now.dlq));
    for (reason, n) in &now.dlq {
        let _ = writeln!(out, "  {reason:<28} {n}");
    }
    let _ = writeln!(out, "conflicts      {}", total(&now.conflicts));
    for (what, n) in &now.conflicts {
        let _ = writeln!(out, "  {what:<28} {n}");
    }
    out
}

/// Scrapes `base` (e.g. http://127.0.0.1:29464) once, or twice `interval`
/// apart for rates, and renders the picture.
/// The command: prints the picture of the worker at `base`.
pub async fn run(base: &str, interval: Duration) -> anyhow::Result<()> {
    print!("{}", show(base, interval).await?);
    Ok(())
}

pub async fn show(base: &str, interval: Duration) -> anyhow::Result<String> {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()?;
    let scrape = || async {
        let url = format!("{base}/metrics");
        let resp = http
            .get(&url)
            .send()
            .await
            .map_err(|e| anyhow::anyhow!("{url}: {e} (is the worker running?)"))?;
        let text = resp.error_for_status()?.text().await?;
        parse(&text)
    };
    let first = scrape().await?;
    let (now, earlier) = if interval.is_zero() {
        (first, None)
    } else {
        tokio::time::sleep(interval).await;
        (scrape().await?, Some(first))
    };
    let ready = match http.get(format!("{base}/readyz")).send().await {
        Ok(r) => {
            let ok = r.status().is_success();
            let body = r.text().await.unwrap_or_default();
            if ok {
                "yes".to_string()
            } else {
                format!("NO ({})", body.trim())
            }
        }
        Err(e) => format!("unknown ({e})"),
    };
    Ok(render(
        base,
        &ready,
        &now,
        earlier.as_ref().map(|e| (e, interval)),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SCRAPE: &str = r#"# TYPE regionsync_replication_lag_seconds gauge
regionsync_replication_lag_seconds{source_region="us-east-1"} 2.5
# TYPE regionsync_heartbeat_age_seconds gauge
regionsync_heartbeat_age_seconds{source_region="us-east-1"} 1.5
# TYPE regionsync_events_total counter
regionsync_events_total{source_region="us-east-1",table="public.users",op="",outcome="applied"} 90
regionsync_events_total{source_region="us-east-1",table="public.users",op="",outcome="stale"} 10
regionsync_events_total{source_region="us-east-1",table="",op="",outcome="heartbeat"} 500
# TYPE regionsync_dlq_messages_total counter
regionsync_dlq_messages_total{reason="not_json"} 3
# TYPE regionsync_consumer_lag_messages gauge
regionsync_consumer_lag_messages{topic="t",partition="0"} 4
regionsync_consumer_lag_messages{topic="t",partition="1"} 6
# TYPE regionsync_ready gauge
regionsync_ready 1
# TYPE regionsync_end_to_end_latency_seconds histogram
regionsync_end_to_end_latency_seconds_bucket{source_region="us-east-1",le="1"} 90
regionsync_end_to_end_latency_seconds_bucket{source_region="us-east-1",le="+Inf"} 100
regionsync_end_to_end_latency_seconds_sum{source_region="us-east-1"} 50
regionsync_end_to_end_latency_seconds_count{source_region="us-east-1"} 100
"#;

    #[test]
    fn a_scrape_reads_into_the_picture() {
        let p = parse(SCRAPE).unwrap();
        let r = &p.regions["us-east-1"];
        assert_eq!(r.lag_seconds, Some(2.5));
        assert_eq!(r.heartbeat_age_seconds, Some(1.5));
        assert_eq!(r.events, 100.0, "heartbeats are not change events");
        assert_eq!(r.applied, 90.0);
        assert_eq!(r.mean_latency_seconds, Some(0.5));
        assert_eq!(p.dlq["not_json"], 3.0);
        assert_eq!(p.consumer_lag, 10.0);
        assert_eq!(p.ready, Some(true));
    }

    #[test]
    fn rates_come_from_two_scrapes() {
        let now = parse(SCRAPE).unwrap();
        let mut before = now.clone();
        before.regions.get_mut("us-east-1").unwrap().events = 60.0;
        let out = render(
            "http://w",
            "yes",
            &now,
            Some((&before, Duration::from_secs(2))),
        );
        let row = out.lines().find(|l| l.starts_with("us-east-1")).unwrap();
        assert!(row.contains(" 20.0 "), "40 events in 2 s: {row}");
        assert!(row.contains("2.5s"), "{row}");
        assert!(out.contains("dead-lettered  3"), "{out}");
    }
}
