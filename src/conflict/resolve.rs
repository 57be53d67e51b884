//! Settling recorded conflicts: `resolve` writes the kept version again as
//! a local write newer than both (`regionsync conflicts resolve`, and at
//! once for `reject`), `reassert_rejected` does so for every rejected write
//! not yet settled, `list` reads them for `regionsync conflicts list`.

use std::fmt;

use anyhow::{bail, Context as _};
use tokio_postgres::types::ToSql;
use tokio_postgres::GenericClient;

use crate::apply::{quote_ident, TargetTable};
use crate::clock::Hlc;

/// Which version `resolve` writes again.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Keep {
    /// The row as this region has it.
    Local,
    /// The remote region's version.
    Remote,
}

/// What [`resolve`] did.
#[derive(Debug, PartialEq, Eq)]
pub enum Resolved {
    /// Written again as a local write with this HLC.
    Written(i64),
    /// Nothing was left to write (e.g. keep local, and neither region has
    /// the row); the conflict is marked resolved.
    NothingToWrite,
    /// Someone resolved it first.
    AlreadyResolved,
}

impl fmt::Display for Resolved {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Resolved::Written(hlc) => write!(f, "written again with hlc {hlc}"),
            Resolved::NothingToWrite => {
                f.write_str("nothing to write (neither region has the row)")
            }
            Resolved::AlreadyResolved => f.write_str("already resolved"),
        }
    }
}

/// Settles conflict `id` of `table` by writing the kept version again in
/// this region (`local`) as a new local write, newer than the local row, the
/// remote version and the key's tombstone, so that every region applies
/// it. Runs its own transaction on `client`, which must not carry an apply
/// session's replication origin.
pub async fn resolve(
    client: &mut tokio_postgres::Client,
    table: &TargetTable,
    id: i64,
    keep: Keep,
    local: &str,
) -> anyhow::Result<Resolved> {
    let tx = client.transaction().await?;
    // The stamping triggers must not re-stamp the chosen version.
    tx.batch_execute("SET LOCAL session_replication_role = replica")
        .await?;
    let Some(c) = tx
        .query_opt(
            "SELECT row_key, remote_hlc, remote_row::text, resolved_at IS NOT NULL, table_name
               FROM regionsync.conflicts WHERE id = $1 FOR UPDATE",
            &[&id],
        )
        .await?
    else {
        bail!("no conflict {id}");
    };
    let (row_key, remote_hlc, remote_row, resolved, table_name): (
        String,
        i64,
        Option<String>,
        bool,
        String,
    ) = (c.get(0), c.get(1), c.get(2), c.get(3), c.get(4));
    if table_name != table.name {
        bail!("conflict {id} is of table {table_name}, not {}", table.name);
    }
    if resolved {
        return Ok(Resolved::AlreadyResolved);
    }
    let (key_where, keys) = key_condition(table, &row_key)
        .with_context(|| format!("conflict {id}: row_key {row_key:?}"))?;
    let key_params: Vec<&(dyn ToSql + Sync)> =
        keys.iter().map(|k| k as &(dyn ToSql + Sync)).collect();
    let local_row = tx
        .query_opt(
            &format!(
                "SELECT to_jsonb(t)::text, t.hlc FROM {} t WHERE {key_where} FOR UPDATE",
                table.ident
            ),
            &key_params,
        )
        .await?;
    let (local_json, local_hlc): (Option<String>, Option<i64>) = match &local_row {
        Some(r) => (r.get(0), r.get(1)),
        None => (None, None),
    };
    let tombstone: Option<i64> = tx
        .query_opt(
            "SELECT hlc FROM regionsync.tombstones WHERE table_name = $1 AND row_key = $2",
            &[&table.name, &row_key],
        )
        .await?
        .map(|r| r.get(0));
    let wall = Hlc::new(crate::clock::now_ms(), 0).0;
    let hlc = [
        Some(wall),
        local_hlc.map(|h| h.saturating_add(1)),
        Some(remote_hlc.saturating_add(1)),
        tombstone.map(|h| h.saturating_add(1)),
    ]
    .into_iter()
    .flatten()
    .max()
    .unwrap_or(wall);
    let version = serde_json::json!({ "hlc": hlc, "origin_region": local }).to_string();
    // CRDT counters keep every region's components, whichever version is
    // kept.
    let set = table.set_non_key(0..table.columns.len(), |c, i| {
        table
            .counter_set(i)
            .unwrap_or_else(|| format!("EXCLUDED.{c}"))
    });
    let upsert = format!(
        "INSERT INTO {ident} AS t SELECT * FROM jsonb_populate_record(NULL::{ident}, $1::text::jsonb)
         ON CONFLICT ({keys}) DO UPDATE SET {set}",
        ident = table.ident,
        keys = table.key_idents(),
    );
    let delete = format!("DELETE FROM {} t WHERE {key_where}", table.ident);
    let tombstone_sql = "INSERT INTO regionsync.tombstones AS ts (table_name, row_key, hlc, origin_region)
         VALUES ($1, $2, $3, $4)
         ON CONFLICT (table_name, row_key) DO UPDATE
            SET hlc = EXCLUDED.hlc, origin_region = EXCLUDED.origin_region, deleted_at = now()
          WHERE (ts.hlc, ts.origin_region COLLATE \"C\") < (EXCLUDED.hlc, EXCLUDED.origin_region COLLATE \"C\")";
    // The kept row image with the new version: for keep remote, the remote
    // values over the local row (a value Debezium did not send keeps the
    // local one).
    let kept: Option<String> = match (keep, &local_json, &remote_row) {
        (Keep::Local, Some(l), _) => Some(merge(&tx, &[l, &version]).await?),
        (Keep::Remote, l, Some(r)) => {
            let l = l.clone().unwrap_or_else(|| "{}".into());
            Some(merge(&tx, &[&l, r, &version]).await?)
        }
        _ => None,
    };
    let written = match (keep, kept) {
        (_, Some(image)) => {
            tx.execute(upsert.as_str(), &[&image]).await?;
            Resolved::Written(hlc)
        }
        (keep, None) => {
            // Keeping a delete where a row is left (here, or in the remote
            // region): write that row with the new version, then delete it,
            // so every region's delete is newer than the row it holds.
            let row = match keep {
                Keep::Remote => local_json.as_deref(),
                Keep::Local => remote_row.as_deref(),
            };
            match row {
                Some(row) => {
                    let bumped = merge(&tx, &[row, &version]).await?;
                    tx.execute(upsert.as_str(), &[&bumped]).await?;
                    tx.execute(delete.as_str(), &key_params).await?;
                    tx.execute(tombstone_sql, &[&table.name, &row_key, &(hlc + 1), &local])
                        .await?;
                    Resolved::Written(hlc + 1)
                }
                None => Resolved::NothingToWrite,
            }
        }
    };
    let resolution = match keep {
        Keep::Local => "kept_local",
        Keep::Remote => "kept_remote",
    };
    tx.execute(
        "UPDATE regionsync.conflicts
            SET resolution = CASE WHEN resolution = 'rejected' THEN resolution ELSE $2 END,
                resolved_at = now()
          WHERE id = $1",
        &[&id, &resolution],
    )
    .await?;
    tx.commit().await?;
    Ok(written)
}

/// The SQL condition on `t` selecting the row of `row_key` (as
/// `regionsync.conflicts.row_key` spells it: the value as text, or a JSON
/// array of texts for a composite key), with its parameters.
fn key_condition(table: &TargetTable, row_key: &str) -> anyhow::Result<(String, Vec<String>)> {
    let keys: Vec<String> = if table.key.len() == 1 {
        vec![row_key.to_string()]
    } else {
        serde_json::from_str(row_key).context("not a JSON array")?
    };
    if keys.len() != table.key.len() {
        bail!(
            "{} key values where {} has {} key columns",
            keys.len(),
            table.name,
            table.key.len()
        );
    }
    let key_where = table
        .key
        .iter()
        .enumerate()
        .map(|(n, i)| {
            format!(
                "t.{} = ${}::text::{}",
                quote_ident(&table.columns[*i].0),
                n + 1,
                table.columns[*i].1
            )
        })
        .collect::<Vec<_>>()
        .join(" AND ");
    Ok((key_where, keys))
}

/// The version of the row of `row_key` stored here now: `(hlc,
/// origin_region)`, or `None` when there is no row. A conflict records the
/// local version at its detection; the row may have moved on since, and
/// settling a conflict means comparing with what is there now.
pub async fn current_version(
    client: &impl GenericClient,
    table: &TargetTable,
    row_key: &str,
) -> anyhow::Result<Option<(i64, String)>> {
    let (key_where, keys) = key_condition(table, row_key)?;
    let params: Vec<&(dyn ToSql + Sync)> = keys.iter().map(|k| k as &(dyn ToSql + Sync)).collect();
    let row = client
        .query_opt(
            &format!(
                "SELECT t.hlc, t.origin_region FROM {} t WHERE {key_where}",
                table.ident
            ),
            &params,
        )
        .await?;
    Ok(row.map(|r| (r.get(0), r.get(1))))
}

/// JSON objects merged left to right (later keys win) by jsonb `||` in
/// SQL, so that numbers keep every digit.
async fn merge(
    client: &impl GenericClient,
    objects: &[&str],
) -> Result<String, tokio_postgres::Error> {
    let terms: Vec<String> = (1..=objects.len())
        .map(|n| format!("${n}::text::jsonb"))
        .collect();
    let params: Vec<&(dyn ToSql + Sync)> =
        objects.iter().map(|o| o as &(dyn ToSql + Sync)).collect();
    let row = client
        .query_one(&format!("SELECT ({})::text", terms.join(" || ")), &params)
        .await?;
    Ok(row.get(0))
}

/// Writes the local row again for every `reject`ed write not yet settled
/// (see the module docs); returns how many were settled.
pub async fn reassert_rejected(
    client: &mut tokio_postgres::Client,
    tables: &[TargetTable],
    local: &str,
) -> anyhow::Result<u64> {
    let pending = client
        .query(
            "SELECT id, table_name FROM regionsync.conflicts
              WHERE resolution = 'rejected' AND resolved_at IS NULL ORDER BY id LIMIT 1000",
            &[],
        )
        .await?;
    let mut settled = 0;
    for row in pending {
        let (id, name): (i64, String) = (row.get(0), row.get(1));
        let Some(table) = tables.iter().find(|t| t.name == name) else {
            continue;
        };
        if resolve(client, table, id, Keep::Local, local).await? != Resolved::AlreadyResolved {
            settled += 1;
        }
    }
    Ok(settled)
}

/// One row of `regionsync conflicts list`.
#[derive(Debug)]
pub struct Listed {
    pub id: i64,
    pub detected_at: String,
    pub table: String,
    pub key: String,
    pub kind: String,
    pub policy: String,
    pub resolution: String,
    /// The local version at detection, as text (region, hlc, row).
    pub local: String,
    /// The remote version, as text (region, hlc, row or "(delete)").
    pub remote: String,
    /// Settled (`resolved_at` set).
    pub resolved: bool,
    /// The local version at detection: (hlc, region), `None` if there was
    /// none, and the row as JSON (`None`: deleted or none).
    pub local_version: Option<(i64, String)>,
    pub local_row: Option<String>,
    /// The remote version: (hlc, region), and the row as JSON (`None`: a
    /// delete).
    pub remote_version: (i64, String),
    pub remote_row: Option<String>,
}

/// The newest `limit` conflicts, optionally only the unresolved ones or
/// one table's.
pub async fn list(
    client: &impl GenericClient,
    table: Option<&str>,
    open_only: bool,
    limit: i64,
) -> Result<Vec<Listed>, tokio_postgres::Error> {
    let rows = client
        .query(
            "SELECT id, to_char(detected_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"'),
                    table_name, row_key, kind, policy,
                    resolution || CASE WHEN resolved_at IS NULL THEN ' (pending)' ELSE '' END,
                    coalesce(local_origin || ' ' || local_hlc || coalesce(' ' || local_row::text, ' (deleted)'), '(none)'),
                    remote_origin || ' ' || remote_hlc || coalesce(' ' || remote_row::text, ' (delete)'),
                    resolved_at IS NOT NULL, local_hlc, local_origin, local_row::text,
                    remote_hlc, remote_origin, remote_row::text
               FROM regionsync.conflicts
              WHERE ($1::text IS NULL OR table_name = $1)
                AND (NOT $2 OR resolved_at IS NULL)
              ORDER BY id DESC LIMIT $3",
            &[&table, &open_only, &limit],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| Listed {
            id: r.get(0),
            detected_at: r.get(1),
            table: r.get(2),
            key: r.get(3),
            kind: r.get(4),
            policy: r.get(5),
            resolution: r.get(6),
            local: r.get(7),
            remote: r.get(8),
            resolved: r.get(9),
            local_version: r
                .get::<_, Option<i64>>(10)
                .zip(r.get::<_, Option<String>>(11)),
            local_row: r.get(12),
            remote_version: (r.get(13), r.get(14)),
            remote_row: r.get(15),
        })
        .collect())
}
