//! `regionsync route KEY`: the home region of an affinity key, as every
//! party computes it (`route::home_region`), from `--regions` or the
//! config's region list. Needs neither a runtime nor, given the list, the
//! config file.

use std::path::Path;

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
