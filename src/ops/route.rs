//! `regionsync route KEY`: the home region of an affinity key, as every
//! party computes it (`route::home_region`), from `--regions` or the
//! config's region list. Needs neither a runtime nor, given the list, the
//! config file. With `--current`, the home for a write committed now,
//! failover homing included ([`current`]).

use std::path::Path;

use std::time::Duration;

use anyhow::Context as _;

use crate::apply::session;
use crate::config::{region_list_problems, Config};

/// The home region of `key`; `Err` holds every problem with the region
/// list or the config file.
pub fn home(
    config_path: &Path,
    key: &str,
    regions: Option<&[String]>,
) -> Result<String, Vec<String>> {
    let regions = match regions {
        Some(list) => {
            let problems = region_list_problems("--regions", list);
            if !problems.is_empty() {
                return Err(problems);
            }
            list.to_vec()
        }
        None => {
            Config::load(config_path)
                .map_err(|e| vec![e.to_string()])?
                .regions
        }
    };
    Ok(crate::route::home_region(key, &regions).to_string())
}

/// The home of `key` for a write committed now: the natural home, or the
/// acting home of an open failover window stored in this region's
/// database (`regionsync rehome`). `Err` if the database does not answer:
/// a load balancer must not follow a guess.
pub async fn current(config: &Config, key: &str) -> anyhow::Result<String> {
    let read = async {
        let pool = session::plain_pool(config)?;
        let client = pool.get().await?;
        anyhow::Ok(crate::homing::load(&**client).await?)
    };
    let homing = tokio::time::timeout(Duration::from_secs(8), read)
        .await
        .map_err(|_| anyhow::anyhow!("the database did not answer within 8 s"))?
        .context("reading the failover homing (regionsync.homing)")?;
    Ok(homing
        .home_now(
            key,
            &config.regions,
            crate::clock::now_ms(),
            config.max_clock_skew.as_millis() as i64,
        )
        .to_string())
}
