//! What the demo watches in region B: the worker's applied count and its
//! own replication lag (its /metrics, read through regionsync's status
//! parser), and how many demo rows differ between A and B.

use std::collections::HashMap;

use regionsync::ops::status;
use tokio_postgres::Client;

use crate::writer::DEMO_ID_BASE;

/// What the demo reads from B's worker.
#[derive(Clone, Copy, Default)]
pub struct Scrape {
    pub applied: f64,
    /// The worker's own `regionsync_replication_lag_seconds`.
    pub lag: Option<f64>,
}

/// The two numbers the demo shows, from the worker's exposition.
fn parse_metrics(text: &str, source_region: &str) -> Scrape {
    let picture = status::parse(text).unwrap_or_default();
    let applied = picture.regions.values().map(|r| r.applied).sum();
    let lag = picture
        .regions
        .get(source_region)
        .and_then(|r| r.lag_seconds);
    Scrape { applied, lag }
}

pub async fn scrape(
    http: &reqwest::Client,
    url: &str,
    source_region: &str,
) -> Result<Scrape, String> {
    let resp = http
        .get(url)
        .send()
        .await
        .map_err(|e| format!("{url}: {e}"))?;
    if !resp.status().is_success() {
        return Err(format!("{url}: HTTP {}", resp.status()));
    }
    let text = resp.text().await.map_err(|e| format!("{url}: {e}"))?;
    Ok(parse_metrics(&text, source_region))
}

/// Rows of the demo range that differ between A and B (missing on one side
/// or with different content), over both tables.
pub async fn diff(a: &Client, b: &Client) -> Result<usize, tokio_postgres::Error> {
    let mut differing = 0;
    for table in ["users", "orders"] {
        let sql = format!("SELECT id, md5(t::text) FROM public.{table} t WHERE id >= $1");
        let (ra, rb) = tokio::join!(
            a.query(&sql, &[&DEMO_ID_BASE]),
            b.query(&sql, &[&DEMO_ID_BASE])
        );
        let mut in_a: HashMap<i64, String> = ra?.iter().map(|r| (r.get(0), r.get(1))).collect();
        for r in rb? {
            let id: i64 = r.get(0);
            match in_a.remove(&id) {
                Some(h) if h == r.get::<_, String>(1) => {}
                _ => differing += 1,
            }
        }
        differing += in_a.len();
    }
    Ok(differing)
}
