//! `regionsync conflicts list|resolve`: the conflicts recorded in this
//! region's database (`regionsync.conflicts`, DESIGN.md §4), listed newest
//! first, and settled by writing the kept version again as a local write
//! that every region applies.

use crate::apply::{session, TargetTable};
use crate::config::Config;
use crate::conflict::{self, Keep};

/// Prints the newest `limit` conflicts (of `table`, only the unsettled
/// ones with `open`).
pub async fn list(
    config: &Config,
    table: Option<&str>,
    open: bool,
    limit: i64,
) -> anyhow::Result<()> {
    let pool = session::plain_pool(config)?;
    let client = pool.get().await?;
    let rows = conflict::list(&**client, table, open, limit).await?;
    if rows.is_empty() {
        println!("no conflicts");
    }
    for c in rows {
        println!(
            "{id}\t{at}\t{table}\t{key}\t{kind}\t{policy}\t{resolution}\n\tlocal:  {local}\n\tremote: {remote}",
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
    let table_config = config
        .tables
        .iter()
        .find(|t| {
            let (s, t) = t.target_parts();
            format!("{s}.{t}") == name
        })
        .ok_or_else(|| {
            anyhow::anyhow!("conflict {id} is of table {name}, which the config does not replicate")
        })?;
    let table = TargetTable::load(&**client, table_config, &config.regions).await?;
    let done = conflict::resolve(&mut client, &table, id, keep, &config.region).await?;
    println!("conflict {id}: {done}");
    Ok(())
}
