//! `regionsync rehome`: the operator's failover and failback of a region's
//! rows (DESIGN.md §3 "Failover homing", RUNBOOK.md "Regional failover").
//!
//! `rehome --region X --to Y` opens a window from now on: writes committed
//! from then on to rows homed in X are treated as homed in Y by every
//! worker. `rehome --region X --back` closes it (after `--drain`). Both
//! read the windows of every database they reach, merge them, add the
//! change with a new epoch, and write the same rows into every one
//! ([`crate::homing::store`]): the local config's database and each
//! `--peer-config`'s. A region that cannot be reached is named and the
//! command fails; running it again when it is back is safe (idempotent).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context as _};

use crate::apply::session;
use crate::config::Config;
use crate::homing;
use crate::route::{HomingOverrides, HomingWindow};

/// What the operator asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    /// Region `region`'s rows are homed in `to` for writes committed from
    /// `from_ms` on.
    Failover {
        region: String,
        to: String,
        from_ms: i64,
    },
    /// Region `region` is home again for writes committed from `until_ms`.
    Failback { region: String, until_ms: i64 },
}

/// The windows after `change`, with epoch `merged.epoch() + 1`; `Err` says
/// why the change makes no sense. Pure.
pub fn apply(
    merged: &HomingOverrides,
    regions: &[String],
    change: &Change,
) -> Result<Vec<HomingWindow>, String> {
    let epoch = merged.epoch() + 1;
    let known = |r: &str| {
        if regions.iter().any(|x| x == r) {
            Ok(())
        } else {
            Err(format!("{r} is not among the regions {regions:?}"))
        }
    };
    match change {
        Change::Failover {
            region,
            to,
            from_ms,
        } => {
            known(region)?;
            known(to)?;
            if region == to {
                return Err(format!("{region} cannot be re-homed to itself"));
            }
            if let Some(w) = merged.open(region) {
                return Err(format!(
                    "{region} is already failed over to {} (epoch {}); fail it back first",
                    w.acting_home, w.epoch
                ));
            }
            if let Some(w) = merged.open(to) {
                return Err(format!(
                    "{to} is itself failed over to {} (epoch {}): it cannot act as a home",
                    w.acting_home, w.epoch
                ));
            }
            if merged
                .windows
                .iter()
                .any(|w| w.region == *region && w.until_ms.is_some_and(|u| u > *from_ms))
            {
                return Err(format!(
                    "{region}'s last failback ends after the requested start; windows may not overlap"
                ));
            }
            Ok(vec![HomingWindow {
                region: region.clone(),
                acting_home: to.clone(),
                from_ms: *from_ms,
                until_ms: None,
                epoch,
            }])
        }
        Change::Failback { region, until_ms } => {
            known(region)?;
            let Some(open) = merged.open(region) else {
                return Err(format!("{region} is not failed over: nothing to fail back"));
            };
            if *until_ms < open.from_ms {
                return Err(format!(
                    "failback at {until_ms} ms precedes the failover at {} ms",
                    open.from_ms
                ));
            }
            Ok(vec![HomingWindow {
                until_ms: Some(*until_ms),
                epoch,
                ..open.clone()
            }])
        }
    }
}

/// The union of the windows read from several databases: per (region,
/// from_ms), the one of the newest epoch.
pub fn merge(all: impl IntoIterator<Item = HomingOverrides>) -> HomingOverrides {
    let mut windows: Vec<HomingWindow> = Vec::new();
    for o in all {
        for w in o.windows {
            match windows
                .iter_mut()
                .find(|x| x.region == w.region && x.from_ms == w.from_ms)
            {
                Some(x) if x.epoch < w.epoch => *x = w,
                Some(_) => {}
                None => windows.push(w),
            }
        }
    }
    windows.sort_by(|a, b| (&a.region, a.from_ms).cmp(&(&b.region, b.from_ms)));
    HomingOverrides { windows }
}

/// A time in ms since the epoch as RFC 3339 (UTC), and the ms.
pub fn at(ms: i64) -> String {
    let t = std::time::UNIX_EPOCH + Duration::from_millis(ms.max(0) as u64);
    format!("{} ({ms} ms)", humantime::format_rfc3339_millis(t))
}

/// One region's database as the command reaches it.
struct Target {
    region: String,
    client: Option<deadpool_postgres::ClientWrapper>,
    error: Option<String>,
}

async fn connect(config: &Config) -> Target {
    let attempt = async {
        let pool = session::plain_pool(config)?;
        let client = pool.get().await?;
        anyhow::Ok(deadpool_postgres::Object::take(client))
    };
    let result = tokio::time::timeout(Duration::from_secs(8), attempt).await;
    let (client, error) = match result {
        Ok(Ok(c)) => (Some(c), None),
        Ok(Err(e)) => (None, Some(format!("{e:#}"))),
        Err(_) => (None, Some("no answer within 8 s".to_string())),
    };
    Target {
        region: config.region.clone(),
        client,
        error,
    }
}

/// Which regions must be written for `change` to be safe: every region
/// but a failing-over one (which is down), and for a failback all of them.
fn required(regions: &[String], change: &Change) -> Vec<String> {
    match change {
        Change::Failover { region, .. } => {
            regions.iter().filter(|r| *r != region).cloned().collect()
        }
        Change::Failback { .. } => regions.to_vec(),
    }
}

/// Runs `rehome`: reads, merges, changes and writes the windows in every
/// region reachable through `config` and `peers`; prints what it did.
pub async fn run(config: &Config, peers: &[PathBuf], change: Change) -> anyhow::Result<()> {
    let mut configs = vec![config.clone()];
    for p in peers {
        let c = Config::load(p).with_context(|| format!("--peer-config {}", p.display()))?;
        if configs.iter().any(|x| x.region == c.region) {
            bail!(
                "--peer-config {}: region {} given twice",
                p.display(),
                c.region
            );
        }
        if c.regions != config.regions {
            bail!(
                "--peer-config {}: its regions {:?} differ from {:?}",
                p.display(),
                c.regions,
                config.regions
            );
        }
        configs.push(c);
    }
    let mut targets = Vec::new();
    for c in &configs {
        targets.push(connect(c).await);
    }
    let mut read = Vec::new();
    for t in &targets {
        if let Some(client) = &t.client {
            read.push(
                homing::load(&**client)
                    .await
                    .with_context(|| format!("reading regionsync.homing in {}", t.region))?,
            );
        }
    }
    if let Change::Failback { region, .. } = &change {
        // The returning region must learn the windows before its worker
        // applies anything: nothing is written unless every region answers.
        let absent: Vec<String> = required(&config.regions, &change)
            .into_iter()
            .filter(|r| !targets.iter().any(|t| &t.region == r && t.client.is_some()))
            .collect();
        if !absent.is_empty() {
            bail!(
                "failing {region} back needs every region's database; not reached: {} \
                 (give each region's config with --peer-config; nothing was written)",
                absent.join(", ")
            );
        }
    }
    let merged = merge(read);
    let new = apply(&merged, &config.regions, &change).map_err(|e| anyhow::anyhow!(e))?;
    let mut windows = merged.windows.clone();
    for w in &new {
        match windows
            .iter_mut()
            .find(|x| x.region == w.region && x.from_ms == w.from_ms)
        {
            Some(x) => *x = w.clone(),
            None => windows.push(w.clone()),
        }
    }
    let mut written = Vec::new();
    let mut missing = Vec::new();
    for t in &mut targets {
        match &mut t.client {
            Some(client) => {
                homing::store(client, &windows)
                    .await
                    .with_context(|| format!("writing regionsync.homing in {}", t.region))?;
                written.push(t.region.clone());
            }
            None => missing.push(format!(
                "{} ({})",
                t.region,
                t.error.as_deref().unwrap_or("unreachable")
            )),
        }
    }
    for w in &new {
        match w.until_ms {
            None => println!(
                "epoch {}: {}'s rows are homed in {} for writes committed from {} on",
                w.epoch,
                w.region,
                w.acting_home,
                at(w.from_ms)
            ),
            Some(u) => println!(
                "epoch {}: {} is home again for writes committed from {} on (homed in {} since {})",
                w.epoch,
                w.region,
                at(u),
                w.acting_home,
                at(w.from_ms)
            ),
        }
    }
    println!("written in: {}", written.join(", "));
    let unwritten: Vec<String> = required(&config.regions, &change)
        .into_iter()
        .filter(|r| !written.contains(r))
        .collect();
    if !missing.is_empty() {
        println!("not reachable: {}", missing.join("; "));
    }
    if unwritten.is_empty() {
        // `route --current` moves the users once the change is
        // max_clock_skew old: returning then, the command's exit is that
        // moment too.
        let effective = match &change {
            Change::Failover { from_ms, .. } => *from_ms,
            Change::Failback { until_ms, .. } => *until_ms,
        } + config.max_clock_skew.as_millis() as i64;
        let wait = effective - crate::clock::now_ms();
        if wait > 0 {
            tokio::time::sleep(Duration::from_millis(wait as u64)).await;
        }
        println!("route --current answers with it from {}", at(effective));
    } else {
        bail!(
            "the homing is not written in {}: run the same command again with their configs \
             (--peer-config) once they answer, before their workers apply anything written since",
            unwritten.join(", ")
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn regions() -> Vec<String> {
        vec!["us-east-1".into(), "eu-west-1".into(), "ap-south-1".into()]
    }

    fn failover(from_ms: i64) -> Change {
        Change::Failover {
            region: "us-east-1".into(),
            to: "eu-west-1".into(),
            from_ms,
        }
    }

    #[test]
    fn failover_then_failback_opens_and_closes_one_window() {
        let none = HomingOverrides::default();
        let opened = apply(&none, &regions(), &failover(1_000)).unwrap();
        assert_eq!(opened[0].epoch, 1);
        assert_eq!(opened[0].until_ms, None);
        let now = HomingOverrides { windows: opened };
        assert_eq!(now.acting_home("us-east-1", 999), "us-east-1");
        assert_eq!(now.acting_home("us-east-1", 1_000), "eu-west-1");
        assert_eq!(now.acting_home("ap-south-1", 5_000), "ap-south-1");
        let closed = apply(
            &now,
            &regions(),
            &Change::Failback {
                region: "us-east-1".into(),
                until_ms: 9_000,
            },
        )
        .unwrap();
        assert_eq!(closed[0].epoch, 2);
        let after = merge([now, HomingOverrides { windows: closed }]);
        assert_eq!(after.windows.len(), 1);
        assert_eq!(after.acting_home("us-east-1", 8_999), "eu-west-1");
        assert_eq!(after.acting_home("us-east-1", 9_000), "us-east-1");
        // A second failover later is a second window.
        let again = apply(&after, &regions(), &failover(20_000)).unwrap();
        assert_eq!(again[0].epoch, 3);
        // Overlapping the closed window is refused.
        assert!(apply(&after, &regions(), &failover(8_000)).is_err());
    }

    #[test]
    fn nonsense_is_refused() {
        let none = HomingOverrides::default();
        let open = HomingOverrides {
            windows: apply(&none, &regions(), &failover(1)).unwrap(),
        };
        assert!(apply(&open, &regions(), &failover(2))
            .unwrap_err()
            .contains("already failed over"));
        let chain = Change::Failover {
            region: "ap-south-1".into(),
            to: "us-east-1".into(),
            from_ms: 3,
        };
        assert!(apply(&open, &regions(), &chain)
            .unwrap_err()
            .contains("cannot act as a home"));
        let back = Change::Failback {
            region: "eu-west-1".into(),
            until_ms: 5,
        };
        assert!(apply(&open, &regions(), &back)
            .unwrap_err()
            .contains("not failed over"));
        let unknown = Change::Failover {
            region: "mars-1".into(),
            to: "eu-west-1".into(),
            from_ms: 3,
        };
        assert!(apply(&none, &regions(), &unknown).is_err());
    }

    #[test]
    fn merging_keeps_the_newest_epoch_of_each_window_whatever_the_order() {
        let w = |epoch, until_ms| HomingWindow {
            region: "us-east-1".into(),
            acting_home: "eu-west-1".into(),
            from_ms: 10,
            until_ms,
            epoch,
        };
        let old = HomingOverrides {
            windows: vec![w(1, None)],
        };
        let new = HomingOverrides {
            windows: vec![w(2, Some(50))],
        };
        assert_eq!(merge([old.clone(), new.clone()]), merge([new, old]));
        assert_eq!(
            merge([
                HomingOverrides::default(),
                HomingOverrides {
                    windows: vec![w(2, Some(50))]
                }
            ])
            .windows[0]
                .until_ms,
            Some(50)
        );
    }
}
