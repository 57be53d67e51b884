//! Conflict: the check step (DESIGN.md §3, §4). Before a batch's changes of
//! one table are applied, the versions stored here for their keys are read;
//! a change whose writer replaced another version than the one stored here
//! (its `before` image's `(hlc, origin_region)`), where the stored one came
//! from another region, was written concurrently with it: both versions are
//! recorded in `regionsync.conflicts`. A remote region's write to a row
//! homed here follows the table's policy: `lww` applies it under the version
//! guard, `reject` and `manual` hold it (the local row stays) and record it.
//!
//! Holding a write is not enough for the regions to agree: the writer's
//! region applied it. So a held write is settled by writing one of the two
//! versions again here as a *local* write with a version newer than both,
//! which this region's Debezium publishes and every region applies:
//! [`resolve`] does that, at once for `reject` (keep the local row) and on
//! `regionsync conflicts resolve ID --keep local|remote` for `manual`. It
//! runs on a connection without the apply sessions' replication origin, so
//! the other regions do not take its change for a relay.
//!
//! [`decide`] is the rule, pure and unit-tested; the rest is its SQL.

use std::borrow::Cow;
use std::fmt;

use anyhow::{bail, Context as _};
use tokio_postgres::types::ToSql;
// The apply path's client (check, lookup, insert) is the pool's, whose
// statements are prepared once per connection.
use deadpool_postgres::GenericClient as CachingClient;
use tokio_postgres::GenericClient;

use crate::apply::{quote_ident, Final, TargetTable};
use crate::clock::{Hlc, Version};
use crate::config::Policy;
use crate::converge;
use crate::route::{classify, WriteClass};

/// What kind of concurrent writes met.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Both regions updated (or inserted, then updated) the row.
    UpdateUpdate,
    /// Both regions inserted the key.
    InsertInsert,
    /// A remote update of a row deleted here.
    UpdateDelete,
    /// A remote delete of a row updated here.
    DeleteUpdate,
    /// A remote region's write to a row homed here, not concurrent with a
    /// local write, held by the `reject` or `manual` policy.
    CrossRegion,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::UpdateUpdate => "update_update",
            Kind::InsertInsert => "insert_insert",
            Kind::UpdateDelete => "update_delete",
            Kind::DeleteUpdate => "delete_update",
            Kind::CrossRegion => "cross_region",
        }
    }
}

/// How a recorded conflict was, or is to be, settled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Resolution {
    /// `lww`: the remote version was newer and was applied.
    RemoteWon,
    /// `lww`: the local version was newer and stayed.
    LocalKept,
    /// `reject`: the remote write was held; the local row is written again
    /// with a newer version (resolved_at is set once that is done).
    Rejected,
    /// `manual`: held until an operator resolves it.
    Open,
}

impl Resolution {
    pub fn as_str(self) -> &'static str {
        match self {
            Resolution::RemoteWon => "remote_won",
            Resolution::LocalKept => "local_kept",
            Resolution::Rejected => "rejected",
            Resolution::Open => "open",
        }
    }
    /// Whether nothing is left to do once it is recorded.
    fn settled(self) -> bool {
        matches!(self, Resolution::RemoteWon | Resolution::LocalKept)
    }
}

/// What becomes of one incoming change.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Decision {
    /// Apply it (under the version guard, which may still find it stale).
    pub apply: bool,
    /// Record it in `regionsync.conflicts`.
    pub record: Option<(Kind, Resolution)>,
}

/// An incoming change and what is stored here for its key.
#[derive(Clone, Debug)]
pub struct Case<'a> {
    pub class: WriteClass,
    pub policy: Policy,
    /// The region whose topic carried the change.
    pub source: &'a str,
    pub incoming: Version<'a>,
    pub is_delete: bool,
    /// A snapshot read (op `r`): it replaced nothing, and says nothing about
    /// concurrency.
    pub snapshot: bool,
    /// The version the writer replaced (its before image), if it sent one.
    pub replaced: Option<Version<'a>>,
    pub row: Option<Version<'a>>,
    pub tombstone: Option<Version<'a>>,
}

/// The check of DESIGN.md §4 and the policy of §3 for one change.
///
/// Concurrent: what is stored here is not what the writer replaced, came
/// from another region than the writer's, and is not older than what the
/// writer replaced (an older stored version only means this region has not
/// yet seen the replaced one, whose own arrival is checked in its turn).
/// A stored tombstone conflicts with an update only, never with an insert
/// (an insert after a delete seen in its region has no before image) or a
/// delete (both deletes agree).
///
/// Held: a cross-region write to a row homed here under `reject` or
/// `manual`, where the row is stored here (or, for an update, deleted here),
/// which the version guard would let in. Everything else is
/// applied, and recorded if concurrent.
pub fn decide(c: &Case<'_>) -> Decision {
    let concurrent_with = |stored: &Version<'_>| {
        c.replaced.as_ref() != Some(stored)
            && stored.origin_region != c.source
            && c.replaced.as_ref().is_none_or(|r| r < stored)
    };
    let kind = match (&c.row, &c.tombstone) {
        _ if c.snapshot => None,
        (Some(row), _) if concurrent_with(row) => Some(match (c.is_delete, c.replaced.is_some()) {
            (true, _) => Kind::DeleteUpdate,
            (false, false) => Kind::InsertInsert,
            (false, true) => Kind::UpdateUpdate,
        }),
        (None, Some(t)) if !c.is_delete && c.replaced.is_some() && concurrent_with(t) => {
            Some(Kind::UpdateDelete)
        }
        _ => None,
    };
    let wins = if c.is_delete {
        converge::delete_outcome(&c.incoming, c.row.as_ref(), c.tombstone.as_ref()).removes_row
    } else {
        converge::upsert_wins(&c.incoming, c.row.as_ref(), c.tombstone.as_ref(), None)
    };
    // Something of the home region's to keep: its row, or its delete.
    let home_state = c.row.is_some() || (c.tombstone.is_some() && !c.is_delete);
    let held = c.class == WriteClass::CrossRegion && c.policy != Policy::Lww && home_state;
    if held && wins {
        let resolution = match c.policy {
            Policy::Reject => Resolution::Rejected,
            _ => Resolution::Open,
        };
        return Decision {
            apply: false,
            record: Some((kind.unwrap_or(Kind::CrossRegion), resolution)),
        };
    }
    Decision {
        apply: true,
        record: kind.map(|k| {
            let r = if wins {
                Resolution::RemoteWon
            } else {
                Resolution::LocalKept
            };
            (k, r)
        }),
    }
}

/// What the check did to one table's batch.
#[derive(Debug, Default)]
pub struct Checked<'a> {
    /// The changes to apply, in their order.
    pub finals: Vec<Cow<'a, Final>>,
    /// Conflicts recorded (new rows in `regionsync.conflicts`).
    pub recorded: u64,
    /// Changes held by `reject` or `manual`.
    pub held: u64,
    /// Of those, held by `reject`: [`reassert_rejected`] has work.
    pub rejected: u64,
    /// Changes per write class, indexed by [`WriteClass::index`].
    pub classes: [u64; 4],
    /// Upserts older than the tombstone grace for keys with no row here:
    /// not applied (their tombstone may be collected already).
    pub late: u64,
}

struct Stored {
    row: Option<(i64, String)>,
    row_json: Option<String>,
    tombstone: Option<(i64, String)>,
}

fn v(version: &(i64, String)) -> Version<'_> {
    Version {
        hlc: Hlc(version.0),
        origin_region: &version.1,
    }
}

/// The key values of a change, in key order.
fn key_values<'f>(table: &TargetTable, f: &'f Final) -> Vec<Option<&'f str>> {
    match f {
        Final::Delete(d) => d.key_values.iter().map(Option::as_deref).collect(),
        Final::Upsert(r) => table
            .key
            .iter()
            .map(|k| {
                r.values
                    .iter()
                    .find(|(i, _)| i == k)
                    .and_then(|(_, v)| v.as_deref())
            })
            .collect(),
    }
}

/// Checks one table's collapsed changes from `source` in the caller's
/// transaction, records the conflicts, and returns the changes to apply.
/// Upserts with an HLC below `late_before` (now − tombstone grace) are
/// applied only where their row is stored here.
pub async fn check<'a>(
    client: &impl CachingClient,
    table: &TargetTable,
    finals: Vec<Cow<'a, Final>>,
    source: &str,
    local: &str,
    late_before: Option<Hlc>,
) -> Result<Checked<'a>, tokio_postgres::Error> {
    let policy = table.homing.as_ref().map_or(Policy::Lww, |h| h.policy);
    let classes: Vec<WriteClass> = finals
        .iter()
        .map(|f| {
            let home = table.homing.as_ref().and(f.home());
            match (&table.homing, home) {
                (None, _) => WriteClass::Shared,
                // A homed table's row without a home value: as if shared.
                (Some(_), None) => WriteClass::Shared,
                (Some(_), home) => classify(source, home, local),
            }
        })
        .collect();
    let mut class_counts = [0u64; 4];
    for c in &classes {
        class_counts[c.index()] += 1;
    }
    let late: Vec<bool> = finals
        .iter()
        .map(|f| matches!(&**f, Final::Upsert(r) if late_before.is_some_and(|l| Hlc(r.hlc) < l)))
        .collect();
    let stored = lookup(client, table, &finals, &classes, &late, source, policy).await?;

    let mut keep = Vec::with_capacity(finals.len());
    let mut records = Records::default();
    let (mut held, mut rejected, mut too_late) = (0, 0, 0);
    for (i, f) in finals.into_iter().enumerate() {
        if late[i] && stored.get(&i).is_none_or(|s| s.row.is_none()) {
            too_late += 1;
            continue;
        }
        let Some(s) = stored.get(&i) else {
            keep.push(f);
            continue;
        };
        let (hlc, origin) = f.version();
        let case = Case {
            class: classes[i],
            policy,
            source,
            incoming: Version {
                hlc: Hlc(hlc),
                origin_region: origin,
            },
            is_delete: matches!(&*f, Final::Delete(_)),
            snapshot: matches!(&*f, Final::Upsert(r) if r.snapshot),
            replaced: f.replaced().map(v),
            row: s.row.as_ref().map(v),
            tombstone: s.tombstone.as_ref().map(v),
        };
        let d = decide(&case);
        if let Some((kind, resolution)) = d.record {
            records.push(table, &f, s, kind, resolution, policy);
        }
        if d.apply {
            keep.push(f);
        } else {
            held += 1;
            if policy == Policy::Reject {
                rejected += 1;
            }
        }
    }
    let recorded = records.insert(client, table).await?;
    Ok(Checked {
        finals: keep,
        recorded,
        held,
        rejected,
        classes: class_counts,
        late: too_late,
    })
}

/// The stored row version (with the row as JSON) or tombstone of every
/// change that could be concurrent or held: where the stored version came
/// from another region than `source`, or the change is a cross-region
/// write under a holding policy, or late. Keyed by the change's index.
async fn lookup(
    client: &impl CachingClient,
    table: &TargetTable,
    finals: &[Cow<'_, Final>],
    classes: &[WriteClass],
    late: &[bool],
    source: &str,
    policy: Policy,
) -> Result<std::collections::HashMap<usize, Stored>, tokio_postgres::Error> {
    let nkeys = table.key.len();
    let mut key_arrays: Vec<Vec<Option<&str>>> = vec![Vec::with_capacity(finals.len()); nkeys];
    let mut key_texts = Vec::with_capacity(finals.len());
    let mut force = Vec::with_capacity(finals.len());
    for ((f, class), late) in finals.iter().zip(classes).zip(late) {
        for (slot, value) in key_values(table, f).into_iter().enumerate() {
            key_arrays[slot].push(value);
        }
        key_texts.push(f.key_text());
        force.push(*late || (*class == WriteClass::CrossRegion && policy != Policy::Lww));
    }
    let unnest: Vec<String> = (1..=nkeys).map(|n| format!("${n}::text[]")).collect();
    let (pk, pf, ps, pt) = (nkeys + 1, nkeys + 2, nkeys + 3, nkeys + 4);
    let sql = format!(
        "SELECT b.\"__i\", t.hlc, t.origin_region::text, to_jsonb(t)::text, ts.hlc, ts.origin_region
           FROM unnest({unnest}, ${pk}::text[], ${pf}::bool[]) WITH ORDINALITY
                AS b({key_names}, \"__key\", \"__force\", \"__i\")
           -- One index probe per key (LIMIT: the key is unique anyway).
           -- As a plain join, a batch of ~1,000 keys or more was planned
           -- as a hash join over a sequential scan of the whole table,
           -- 58 ms per batch of 1,900 on a 100,000-row table (EXPLAIN
           -- ANALYZE) against 17 ms like this.
           LEFT JOIN LATERAL (SELECT * FROM {ident} AS t WHERE {key_match} LIMIT 1) t ON true
           -- The tombstone only where no row is stored, the same way: the
           -- row test gates the index probe.
           LEFT JOIN LATERAL (SELECT ts.hlc, ts.origin_region FROM regionsync.tombstones ts
                               WHERE t.hlc IS NULL AND ts.table_name = ${pt}
                                 AND ts.row_key = b.\"__key\" LIMIT 1) ts ON true
          WHERE (t.hlc IS NOT NULL AND (b.\"__force\" OR t.origin_region <> ${ps}))
             OR (t.hlc IS NULL AND ts.hlc IS NOT NULL AND ts.origin_region <> ${ps})",
        unnest = unnest.join(", "),
        key_names = table.key_idents(),
        ident = table.ident,
        key_match = table.key_match("b"),
    );
    let mut params: Vec<&(dyn ToSql + Sync)> = key_arrays
        .iter()
        .map(|a| a as &(dyn ToSql + Sync))
        .collect();
    params.push(&key_texts);
    params.push(&force);
    let source = source.to_string();
    params.push(&source);
    params.push(&table.name);
    let statement = client.prepare_cached(&sql).await?;
    let rows = client.query(&statement, &params).await?;
    let mut out = std::collections::HashMap::with_capacity(rows.len());
    for r in rows {
        let i: i64 = r.get(0);
        let row_hlc: Option<i64> = r.get(1);
        let row_origin: Option<String> = r.get(2);
        let tomb_hlc: Option<i64> = r.get(4);
        let tomb_origin: Option<String> = r.get(5);
        out.insert(
            (i - 1) as usize,
            Stored {
                row: row_hlc.zip(row_origin),
                row_json: if row_hlc.is_some() { r.get(3) } else { None },
                tombstone: tomb_hlc.zip(tomb_origin),
            },
        );
    }
    Ok(out)
}

/// Conflict rows to insert, one array per column.
#[derive(Default)]
struct Records {
    key: Vec<String>,
    kind: Vec<&'static str>,
    policy: Vec<&'static str>,
    local_hlc: Vec<Option<i64>>,
    local_origin: Vec<Option<String>>,
    local_row: Vec<Option<String>>,
    remote_hlc: Vec<i64>,
    remote_origin: Vec<String>,
    remote_row: Vec<Option<String>>,
    resolution: Vec<&'static str>,
    settled: Vec<bool>,
}

impl Records {
    fn push(
        &mut self,
        table: &TargetTable,
        f: &Final,
        s: &Stored,
        kind: Kind,
        resolution: Resolution,
        policy: Policy,
    ) {
        let local = s.row.as_ref().or(s.tombstone.as_ref());
        let (hlc, origin) = f.version();
        self.key.push(f.key_text().to_string());
        self.kind.push(kind.as_str());
        self.policy.push(policy.as_str());
        self.local_hlc.push(local.map(|l| l.0));
        self.local_origin.push(local.map(|l| l.1.clone()));
        self.local_row.push(s.row_json.clone());
        self.remote_hlc.push(hlc);
        self.remote_origin.push(origin.to_string());
        self.remote_row.push(match f {
            Final::Upsert(r) => {
                let object: serde_json::Map<String, serde_json::Value> = r
                    .values
                    .iter()
                    .map(|(i, value)| {
                        let (name, pg_type) = &table.columns[*i];
                        (name.clone(), row_json_value(pg_type, value.as_deref()))
                    })
                    .collect();
                Some(serde_json::Value::Object(object).to_string())
            }
            Final::Delete(_) => None,
        });
        self.resolution.push(resolution.as_str());
        self.settled.push(resolution.settled());
    }

    /// Inserts the records; one already recorded (the same remote version of
    /// the same key, e.g. on a replay) is not recorded twice.
    async fn insert(
        &self,
        client: &impl CachingClient,
        table: &TargetTable,
    ) -> Result<u64, tokio_postgres::Error> {
        if self.key.is_empty() {
            return Ok(0);
        }
        client
            .execute(
                "INSERT INTO regionsync.conflicts
                        (table_name, row_key, kind, policy, local_hlc, local_origin, local_row,
                         remote_hlc, remote_origin, remote_row, resolution, resolved_at)
                 SELECT $1, u.key, u.kind, u.policy, u.lh, u.lo, u.lr::jsonb, u.rh, u.ro, u.rr::jsonb,
                        u.res, CASE WHEN u.settled THEN now() END
                   FROM unnest($2::text[], $3::text[], $4::text[], $5::bigint[], $6::text[], $7::text[],
                               $8::bigint[], $9::text[], $10::text[], $11::text[], $12::bool[])
                        AS u(key, kind, policy, lh, lo, lr, rh, ro, rr, res, settled)
                 ON CONFLICT (table_name, row_key, remote_hlc, remote_origin) DO NOTHING",
                &[
                    &table.name,
                    &self.key,
                    &self.kind,
                    &self.policy,
                    &self.local_hlc,
                    &self.local_origin,
                    &self.local_row,
                    &self.remote_hlc,
                    &self.remote_origin,
                    &self.remote_row,
                    &self.resolution,
                    &self.settled,
                ],
            )
            .await
    }
}

/// A value's PostgreSQL text as `to_jsonb` of the row would hold it, as far
/// as `jsonb_populate_record` needs: json and jsonb values as JSON, every
/// other type as its text (which the column type's input function reads).
fn row_json_value(pg_type: &str, text: Option<&str>) -> serde_json::Value {
    match text {
        None => serde_json::Value::Null,
        Some(t) if pg_type == "json" || pg_type == "jsonb" => {
            serde_json::from_str(t).unwrap_or_else(|_| serde_json::Value::String(t.to_string()))
        }
        Some(t) => serde_json::Value::String(t.to_string()),
    }
}

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
    let keys: Vec<String> = if table.key.len() == 1 {
        vec![row_key.clone()]
    } else {
        serde_json::from_str(&row_key)
            .with_context(|| format!("conflict {id}: row_key {row_key:?} is not a JSON array"))?
    };
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
    let wall = Hlc::new(crate::lag::now_ms(), 0).0;
    let hlc = [
        Some(wall),
        local_hlc.map(|h| h + 1),
        Some(remote_hlc + 1),
        tombstone.map(|h| h + 1),
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
    pub local: String,
    pub remote: String,
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
                    remote_origin || ' ' || remote_hlc || coalesce(' ' || remote_row::text, ' (delete)')
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
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    const US: &str = "us-east-1";
    const EU: &str = "eu-west-1";

    fn ver(hlc: i64, origin: &str) -> Version<'_> {
        Version {
            hlc: Hlc(hlc),
            origin_region: origin,
        }
    }

    /// A change from us-east-1 arriving in eu-west-1.
    fn case<'a>(replaced: Option<Version<'a>>, row: Option<Version<'a>>) -> Case<'a> {
        Case {
            class: WriteClass::Shared,
            policy: Policy::Lww,
            source: US,
            incoming: ver(20, US),
            is_delete: false,
            snapshot: false,
            replaced,
            row,
            tombstone: None,
        }
    }

    #[test]
    fn json_columns_are_kept_as_json_in_a_recorded_row() {
        assert_eq!(
            row_json_value("jsonb", Some("{\"n\": 1}")),
            serde_json::json!({"n": 1})
        );
        assert_eq!(
            row_json_value("text", Some("{\"n\": 1}")),
            serde_json::json!("{\"n\": 1}")
        );
        assert_eq!(row_json_value("integer", None), serde_json::Value::Null);
    }

    #[test]
    fn an_update_of_the_stored_version_is_no_conflict() {
        let d = decide(&case(Some(ver(10, EU)), Some(ver(10, EU))));
        assert_eq!(
            d,
            Decision {
                apply: true,
                record: None
            }
        );
    }

    #[test]
    fn the_writer_s_own_earlier_versions_are_no_conflict() {
        // Stored here from the same region: the stream of one region is in
        // order, so nothing concurrent.
        let d = decide(&case(Some(ver(12, US)), Some(ver(11, US))));
        assert_eq!(d.record, None);
        // The store here is behind what the writer replaced: no conflict yet.
        let d = decide(&case(Some(ver(15, "ap-south-1")), Some(ver(10, EU))));
        assert_eq!(d.record, None);
    }

    #[test]
    fn concurrent_updates_are_recorded_with_the_lww_outcome() {
        let d = decide(&case(Some(ver(10, EU)), Some(ver(15, EU))));
        assert_eq!(
            d,
            Decision {
                apply: true,
                record: Some((Kind::UpdateUpdate, Resolution::RemoteWon))
            }
        );
        let mut late = case(Some(ver(10, EU)), Some(ver(25, EU)));
        late.incoming = ver(20, US);
        assert_eq!(
            decide(&late).record,
            Some((Kind::UpdateUpdate, Resolution::LocalKept))
        );
        assert_eq!(
            decide(&case(None, Some(ver(15, EU)))).record,
            Some((Kind::InsertInsert, Resolution::RemoteWon))
        );
        // A snapshot read is no write: nothing to record.
        let mut read = case(None, Some(ver(15, EU)));
        read.snapshot = true;
        assert_eq!(
            decide(&read),
            Decision {
                apply: true,
                record: None
            }
        );
    }

    #[test]
    fn deletes_against_updates_conflict_both_ways() {
        // A remote delete of a row updated here.
        let mut del = case(Some(ver(10, EU)), Some(ver(15, EU)));
        del.is_delete = true;
        del.incoming = ver(11, US);
        assert_eq!(
            decide(&del),
            Decision {
                apply: true,
                record: Some((Kind::DeleteUpdate, Resolution::LocalKept))
            }
        );
        // A remote update of a row deleted here (tombstone = deleted + 1).
        let mut upd = case(Some(ver(10, US)), None);
        upd.tombstone = Some(ver(11, EU));
        assert_eq!(
            decide(&upd).record,
            Some((Kind::UpdateDelete, Resolution::RemoteWon))
        );
        // An insert after a delete the writer saw has no before image.
        let mut insert = case(None, None);
        insert.tombstone = Some(ver(11, EU));
        assert_eq!(decide(&insert).record, None);
    }

    #[test]
    fn reject_and_manual_hold_cross_region_writes_to_stored_rows() {
        for (policy, resolution) in [
            (Policy::Reject, Resolution::Rejected),
            (Policy::Manual, Resolution::Open),
        ] {
            let mut c = case(Some(ver(10, EU)), Some(ver(10, EU)));
            c.class = WriteClass::CrossRegion;
            c.policy = policy;
            assert_eq!(
                decide(&c),
                Decision {
                    apply: false,
                    record: Some((Kind::CrossRegion, resolution))
                }
            );
            // Concurrent, and held all the same.
            c.row = Some(ver(15, EU));
            assert_eq!(decide(&c).record, Some((Kind::UpdateUpdate, resolution)));
            // Nothing stored here: nothing to keep, applied.
            c.row = None;
            assert!(decide(&c).apply);
            // Deleted here: the delete is kept.
            c.tombstone = Some(ver(11, EU));
            assert_eq!(decide(&c).record, Some((Kind::UpdateDelete, resolution)));
            c.tombstone = None;
            // Stale anyway: the guard skips it, nothing to hold.
            c.row = Some(ver(30, EU));
            assert!(decide(&c).apply);
        }
        // lww applies a cross-region write.
        let mut c = case(Some(ver(10, EU)), Some(ver(10, EU)));
        c.class = WriteClass::CrossRegion;
        assert_eq!(
            decide(&c),
            Decision {
                apply: true,
                record: None
            }
        );
    }
}
