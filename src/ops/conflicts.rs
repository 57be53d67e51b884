//! `regionsync conflicts list|resolve`: the conflicts recorded in this
//! region's database (`regionsync.conflicts`, DESIGN.md §4), listed newest
//! first, and settled by writing the kept version again as a local write
//! that every region applies.

use std::collections::BTreeMap;

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
        let out: Vec<serde_json::Value> = listed
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

/// One conflict of `conflicts list --json`. `current` is the row's version
/// here now (`null`: no row), absent when the config does not replicate
/// the table.
fn to_json(
    c: &conflict::Listed,
    current: Option<&Option<(i64, String)>>,
) -> anyhow::Result<serde_json::Value> {
    let version = |hlc: i64, origin: &str, row: &Option<String>| -> anyhow::Result<_> {
        // The row as PostgreSQL printed it, digits and all.
        let row: Option<Box<serde_json::value::RawValue>> = row
            .as_ref()
            .map(|r| serde_json::value::RawValue::from_string(r.clone()))
            .transpose()?;
        Ok(serde_json::json!({ "hlc": hlc, "origin_region": origin, "row": row }))
    };
    let local = match &c.local_version {
        Some((hlc, origin)) => version(*hlc, origin, &c.local_row)?,
        None => serde_json::Value::Null,
    };
    let (remote_hlc, remote_origin) = &c.remote_version;
    let mut out = serde_json::json!({
        "id": c.id,
        "detected_at": c.detected_at,
        "table": c.table,
        "key": c.key,
        "kind": c.kind,
        "policy": c.policy,
        "resolution": c.resolution.trim_end_matches(" (pending)"),
        "resolved": c.resolved,
        "local": local,
        "remote": version(*remote_hlc, remote_origin, &c.remote_row)?,
    });
    if let Some(current) = current {
        out["current"] = match current {
            Some((hlc, origin)) => serde_json::json!({ "hlc": hlc, "origin_region": origin }),
            None => serde_json::Value::Null,
        };
    }
    Ok(out)
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
