//! `regionsync conflicts list|resolve`: the conflicts recorded in this
//! region's database (`regionsync.conflicts`, DESIGN.md §4), listed newest
//! first, and settled by writing the kept version again as a local write
//! that every region applies.

use std::collections::BTreeMap;

use serde_json::value::RawValue;

use crate::apply::{session, TargetTable};
use crate::config::{Config, TableConfig};
use crate::conflict::{self, Keep};

/// Prints the newest `limit` conflicts (of `table`, only the unsettled
/// ones with `open`), each with the version its row has here now (what a
/// settling compares with: RUNBOOK.md "Settling open conflicts"); as a
/// JSON array with `json`.
pub async fn list(
    config: &Config,
    table: Option<&str>,
    open: bool,
    limit: i64,
    json: bool,
) -> anyhow::Result<()> {
    let pool = session::plain_pool(config)?;
    let client = pool.get().await?;
    let rows = conflict::list(&**client, table, open, limit).await?;
    // The current version of each row, for the tables this config
    // replicates (`None` where it does not: unknown).
    let mut tables: BTreeMap<String, Option<TargetTable>> = BTreeMap::new();
    let mut listed = Vec::with_capacity(rows.len());
    for c in rows {
        if !tables.contains_key(&c.table) {
            let loaded = match table_config(config, &c.table) {
                Some(t) => Some(TargetTable::load(&**client, t, &config.regions).await?),
                None => None,
            };
            tables.insert(c.table.clone(), loaded);
        }
        let current = match &tables[&c.table] {
            Some(t) => Some(conflict::current_version(&**client, t, &c.key).await?),
            None => None,
        };
        listed.push((c, current));
    }
    if json {
        let out: Vec<JsonConflict<'_>> = listed
            .iter()
            .map(|(c, current)| to_json(c, current.as_ref()))
            .collect::<anyhow::Result<_>>()?;
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    if listed.is_empty() {
        println!("no conflicts");
    }
    for (c, current) in listed {
        let now = match current {
            Some(Some((hlc, origin))) => format!("{origin} {hlc}"),
            Some(None) => "(no row)".to_string(),
            None => "(unknown: the config does not replicate the table)".to_string(),
        };
        println!(
            "{id}\t{at}\t{table}\t{key}\t{kind}\t{policy}\t{resolution}\n\tlocal:  {local}\n\tremote: {remote}\n\tnow:    {now}",
            id = c.id,
            at = c.detected_at,
            table = c.table,
            key = c.key,
            kind = c.kind,
            policy = c.policy,
            resolution = c.resolution,
            local = c.local,
            remote = c.remote,
        );
    }
    Ok(())
}

/// The table of the config whose target is `name` (`schema.table`).
fn table_config<'a>(config: &'a Config, name: &str) -> Option<&'a TableConfig> {
    config.tables.iter().find(|t| {
        let (s, t) = t.target_parts();
        format!("{s}.{t}") == name
    })
}

/// One version in `conflicts list --json`; `row` as PostgreSQL printed it,
/// every digit kept (`null`: a delete, or no row).
#[derive(serde::Serialize)]
struct JsonVersion<'a> {
    hlc: i64,
    origin_region: &'a str,
    row: Option<Box<RawValue>>,
}

/// The row's version now (no `row`).
#[derive(serde::Serialize)]
struct JsonCurrent<'a> {
    hlc: i64,
    origin_region: &'a str,
}

/// One conflict of `conflicts list --json`. `current` is the row's version
/// here now (`null`: no row), absent when the config does not replicate
/// the table.
#[derive(serde::Serialize)]
struct JsonConflict<'a> {
    id: i64,
    detected_at: &'a str,
    table: &'a str,
    key: &'a str,
    kind: &'a str,
    policy: &'a str,
    resolution: &'a str,
    resolved: bool,
    local: Option<JsonVersion<'a>>,
    remote: JsonVersion<'a>,
    #[serde(skip_serializing_if = "Option::is_none")]
    current: Option<Option<JsonCurrent<'a>>>,
}

fn to_json<'a>(
    c: &'a conflict::Listed,
    current: Option<&'a Option<(i64, String)>>,
) -> anyhow::Result<JsonConflict<'a>> {
    let raw = |row: &Option<String>| -> anyhow::Result<Option<Box<RawValue>>> {
        Ok(row
            .as_ref()
            .map(|r| RawValue::from_string(r.clone()))
            .transpose()?)
    };
    let local = match &c.local_version {
        Some((hlc, origin)) => Some(JsonVersion {
            hlc: *hlc,
            origin_region: origin,
            row: raw(&c.local_row)?,
        }),
        None => None,
    };
    let (remote_hlc, remote_origin) = &c.remote_version;
    Ok(JsonConflict {
        id: c.id,
        detected_at: &c.detected_at,
        table: &c.table,
        key: &c.key,
        kind: &c.kind,
        policy: &c.policy,
        resolution: c.resolution.trim_end_matches(" (pending)"),
        resolved: c.resolved,
        local,
        remote: JsonVersion {
            hlc: *remote_hlc,
            origin_region: remote_origin,
            row: raw(&c.remote_row)?,
        },
        current: current.map(|now| {
            now.as_ref().map(|(hlc, origin)| JsonCurrent {
                hlc: *hlc,
                origin_region: origin,
            })
        }),
    })
}

/// Settles conflict `id` by keeping `keep`, and prints what was done.
pub async fn resolve(config: &Config, id: i64, keep: Keep) -> anyhow::Result<()> {
    // Without a replication origin: a resolution is a local write that
    // every region must apply.
    let pool = session::plain_pool(config)?;
    let mut client = pool.get().await?;
    let name: String = client
        .query_opt(
            "SELECT table_name FROM regionsync.conflicts WHERE id = $1",
            &[&id],
        )
        .await?
        .map(|r| r.get(0))
        .ok_or_else(|| anyhow::anyhow!("no conflict {id}"))?;
    let table_config = table_config(config, &name).ok_or_else(|| {
        anyhow::anyhow!("conflict {id} is of table {name}, which the config does not replicate")
    })?;
    let table = TargetTable::load(&**client, table_config, &config.regions).await?;
    let done = conflict::resolve(&mut client, &table, id, keep, &config.region).await?;
    println!("conflict {id}: {done}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn listed() -> conflict::Listed {
        conflict::Listed {
            id: 7,
            detected_at: "2026-12-07T02:20:37Z".into(),
            table: "public.users".into(),
            key: "42".into(),
            kind: "cross_region".into(),
            policy: "manual".into(),
            resolution: "open (pending)".into(),
            local: String::new(),
            remote: String::new(),
            resolved: false,
            local_version: Some((10, "us-east-1".into())),
            local_row: Some(r#"{"id": 42, "n": 1.000000000000000000001}"#.into()),
            remote_version: (12, "eu-west-1".into()),
            remote_row: None,
        }
    }

    #[test]
    fn the_json_has_the_current_version_and_every_digit() {
        let c = listed();
        let now = Some((15, "us-east-1".to_string()));
        let json = serde_json::to_string(&to_json(&c, Some(&now)).unwrap()).unwrap();
        assert!(json.contains(r#""n": 1.000000000000000000001"#), "{json}");
        let v: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(v["resolution"], "open");
        assert_eq!(v["current"]["hlc"], 15);
        assert_eq!(v["current"]["origin_region"], "us-east-1");
        assert_eq!(v["remote"]["row"], serde_json::Value::Null);
        assert_eq!(v["local"]["hlc"], 10);
        // No row now: null; a table the config does not replicate: absent.
        let v = serde_json::to_value(to_json(&c, Some(&None)).unwrap()).unwrap();
        assert!(v.get("current").is_some_and(|c| c.is_null()), "{v}");
        let v = serde_json::to_value(to_json(&c, None).unwrap()).unwrap();
        assert!(v.get("current").is_none(), "{v}");
    }
}
