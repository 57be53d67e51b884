//! `rebuild --shadow`: a table rebuilt beside the live one while the
//! worker keeps applying into the live one, then swapped in (DESIGN.md §7).
//!
//! - The shadow is `CREATE TABLE regionsync.<shadow> (LIKE live INCLUDING
//!   ALL)`: in the `regionsync` schema, so the capture connector (which
//!   publishes and includes the application's schemas) does not turn the
//!   whole build into change messages. The build writes it with the
//!   rebuild's replay and bulk load, under the live table's name for the
//!   tombstones and truncate mark (they are facts about the table's keys,
//!   shared with the worker).
//! - [`refusals`]: what a rename would break, named before anything is
//!   built: views, rules, foreign keys either way, functions of the row
//!   type, inheritance and partitions, row-security policies,
//!   column-level grants, a publication's column list or row filter.
//! - [`swap`] runs in the caller's transaction, after the last catch-up,
//!   under `LOCK TABLE live IN ACCESS EXCLUSIVE MODE`: the live table's
//!   rows of this region newer than the shadow's (written by the
//!   application after the capture connector's last message the catch-up
//!   read) and its newer tombstones are carried over; then the live
//!   table's decorations (owner, grants, triggers with their enable state,
//!   replica identity, storage parameters, row security, explicit
//!   publications, sequences, comments, statistics targets) are given to
//!   the shadow, the live table is renamed away and dropped, the shadow
//!   moved and renamed in, and its indexes, constraints and identity
//!   sequences take the old names. The shadow is made in the live
//!   table's tablespace.

use anyhow::Context as _;
use deadpool_postgres::Transaction;
use tokio_postgres::GenericClient;

use crate::apply::{quote_ident, TargetTable};

/// The shadow table's name in schema `regionsync` for `schema.table`:
/// readable when it fits PostgreSQL's 63 bytes, else hashed.
pub fn shadow_name(schema: &str, table: &str) -> String {
    let readable = format!("shadow__{schema}__{table}");
    if readable.len() <= 63 {
        readable
    } else {
        use std::hash::{Hash, Hasher};
        let mut h = rustc_hash::FxHasher::default();
        (schema, table).hash(&mut h);
        format!("shadow__{:016x}", h.finish())
    }
}

/// The quoted identifier of the shadow of `table`.
pub fn shadow_ident(table: &TargetTable) -> String {
    let (schema, name) = split(&table.name);
    format!(
        "{}.{}",
        quote_ident("regionsync"),
        quote_ident(&shadow_name(schema, name))
    )
}

fn split(name: &str) -> (&str, &str) {
    name.split_once('.').unwrap_or(("public", name))
}

/// `table` as its shadow: the same layout, written under the shadow's
/// identifier, its tombstones and truncate mark still the table's.
pub fn as_shadow(table: &TargetTable) -> TargetTable {
    let mut t = table.clone();
    t.ident = shadow_ident(table);
    t
}

/// What a swap of `table` by a renamed copy would break, each named; empty
/// when it can be rebuilt with `--shadow`.
pub async fn refusals(
    client: &impl GenericClient,
    table: &TargetTable,
) -> anyhow::Result<Vec<String>> {
    let oid: u32 = client
        .query_one("SELECT $1::text::regclass::oid", &[&table.ident])
        .await
        .with_context(|| format!("finding table {}", table.name))?
        .get(0);
    let mut out = Vec::new();
    // The swap renames, re-owns and drops the table: its owner's rights.
    let row = client
        .query_one(
            "SELECT current_user::text, pg_get_userbyid(relowner)::text, pg_has_role(current_user, relowner, 'MEMBER')
               FROM pg_class WHERE oid = $1",
            &[&oid],
        )
        .await?;
    let (user, owner, member): (String, String, bool) = (row.get(0), row.get(1), row.get(2));
    if !member {
        out.push(format!(
            "the rebuild's role {user} is not a member of {owner}, the table's owner: the swap renames, re-owns and drops the table; \
             run --shadow with an owner-level role's config (as for `regionsync setup`)"
        ));
    }
    // Anything depending normally on the table or its row type: views and
    // rules (through pg_rewrite), foreign keys of other tables, functions
    // taking or returning its row type, … would follow the renamed old
    // table, then block its drop.
    for r in client
        .query(
            "SELECT DISTINCT pg_describe_object(d.classid, d.objid, d.objsubid)
               FROM pg_depend d
              WHERE d.deptype = 'n'
                AND ((d.refclassid = 'pg_class'::regclass AND d.refobjid = $1)
                  OR (d.refclassid = 'pg_type'::regclass
                      AND d.refobjid = (SELECT reltype FROM pg_class WHERE oid = $1)))
              ORDER BY 1",
            &[&oid],
        )
        .await?
    {
        let what: String = r.get(0);
        out.push(format!("{what} depends on it"));
    }
    let checks: [(&str, &str); 6] = [
        (
            "SELECT conname::text FROM pg_constraint WHERE conrelid = $1 AND contype = 'f' ORDER BY 1",
            "its foreign key {} (a copy made with LIKE has none)",
        ),
        (
            "SELECT c.relname::text FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid WHERE i.inhparent = $1
             UNION ALL
             SELECT c.relname::text FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhparent WHERE i.inhrelid = $1",
            "it inherits from or is inherited by {} (partitions and inheritance are not rebuilt with --shadow)",
        ),
        (
            "SELECT 'partitioned'::text FROM pg_class WHERE oid = $1 AND relkind = 'p'",
            "it is {} (partitions are not rebuilt with --shadow)",
        ),
        (
            "SELECT polname::text FROM pg_policy WHERE polrelid = $1 ORDER BY 1",
            "its row-security policy {} (not copied)",
        ),
        (
            "SELECT attname::text FROM pg_attribute WHERE attrelid = $1 AND attnum > 0 AND attacl IS NOT NULL ORDER BY 1",
            "column-level grants on its column {} (not copied)",
        ),
        (
            "SELECT rulename::text FROM pg_rewrite WHERE ev_class = $1 ORDER BY 1",
            "its rule {} (not copied)",
        ),
    ];
    for (sql, said) in checks {
        for r in client.query(sql, &[&oid]).await? {
            let name: String = r.get(0);
            out.push(said.replace("{}", &name));
        }
    }
    // A publication that lists the table with a column list or row filter
    // (a plain listing is carried over by the swap).
    for r in client
        .query(
            "SELECT p.pubname::text FROM pg_publication_rel pr JOIN pg_publication p ON p.oid = pr.prpubid
              WHERE pr.prrelid = $1 AND (pr.prattrs IS NOT NULL OR pr.prqual IS NOT NULL) ORDER BY 1",
            &[&oid],
        )
        .await?
    {
        let name: String = r.get(0);
        out.push(format!(
            "publication {name} lists it with a column list or row filter (not carried over)"
        ));
    }
    Ok(out)
}

/// A fresh shadow of `table`: dropped if one is left, created empty.
pub async fn create(tx: &Transaction<'_>, table: &TargetTable) -> anyhow::Result<()> {
    let shadow = shadow_ident(table);
    // In the live table's tablespace: moved at the swap, it would be
    // rewritten under the lock.
    let tablespace: Option<String> = tx
        .query_one(
            "SELECT (SELECT quote_ident(t.spcname) FROM pg_tablespace t WHERE t.oid = c.reltablespace)
               FROM pg_class c WHERE c.oid = $1::text::regclass",
            &[&table.ident],
        )
        .await?
        .get(0);
    let tablespace = tablespace.map_or(String::new(), |t| format!(" TABLESPACE {t}"));
    tx.batch_execute(&format!(
        "DROP TABLE IF EXISTS {shadow};
         CREATE TABLE {shadow} (LIKE {} INCLUDING ALL){tablespace}",
        table.ident
    ))
    .await
    .with_context(|| format!("creating the shadow table {shadow} of {}", table.name))?;
    Ok(())
}

/// Whether the shadow of `table` exists.
pub async fn exists(client: &impl GenericClient, table: &TargetTable) -> anyhow::Result<bool> {
    Ok(client
        .query_one(
            "SELECT to_regclass($1) IS NOT NULL",
            &[&shadow_ident(table)],
        )
        .await?
        .get(0))
}

/// Carries into the shadow what the live table holds that the topics did
/// not yet: this region's own rows stamped since `since_hlc` whose
/// version is newer than the shadow's, and the deletes since `since_ms`
/// whose tombstones are newer than the shadow's rows (the swap gives 0
/// for both: all of them). Under the swap's lock,
/// after the last catch-up: the application's writes the capture
/// connector had not yet put into this region's topic. Returns (rows
/// carried, rows deleted).
pub async fn carry_own_writes(
    tx: &Transaction<'_>,
    table: &TargetTable,
    region: &str,
    since_hlc: i64,
    since_ms: i64,
) -> anyhow::Result<(u64, u64)> {
    let shadow = as_shadow(table);
    let all: Vec<usize> = (0..table.columns.len()).collect();
    let keys: Vec<String> = table
        .key
        .iter()
        .map(|i| table.columns[*i].0.clone())
        .collect();
    let from = format!(
        "(SELECT l.*, regionsync.row_key(to_jsonb(l), $2::text[]) AS \"__key\"
            FROM {} l WHERE l.origin_region = $3 AND l.hlc >= $4) AS b",
        table.ident
    );
    let sql = crate::apply::guarded_insert_sql(&shadow, &all, &from, 1);
    let carried = tx
        .execute(&sql, &[&table.name, &keys, &region, &since_hlc])
        .await
        .with_context(|| {
            format!(
                "carrying this region's newest rows of {} into its shadow",
                table.name
            )
        })?;
    // Tombstones joined to the shadow's rows by key: each key column cast
    // from the tombstone's key text, checked exactly by the row's key text.
    let matches: Vec<String> = table
        .key
        .iter()
        .enumerate()
        .map(|(n, i)| {
            let col = quote_ident(&table.columns[*i].0);
            let text = if table.key.len() == 1 {
                "ts.row_key".to_owned()
            } else {
                format!("(ts.row_key::jsonb ->> {n})")
            };
            format!("s.{col} = {text}::{}", table.cast_types[*i])
        })
        .collect();
    let deleted = tx
        .execute(
            &format!(
                "DELETE FROM {} s USING regionsync.tombstones ts
                  WHERE ts.table_name = $1 AND ts.deleted_at >= to_timestamp($3::bigint / 1000.0)
                    AND {}
                    AND ts.row_key = regionsync.row_key(to_jsonb(s), $2::text[])
                    AND (ts.hlc, ts.origin_region COLLATE \"C\") >= (s.hlc, s.origin_region COLLATE \"C\")",
                shadow.ident,
                matches.join(" AND ")
            ),
            &[&table.name, &keys, &since_ms],
        )
        .await
        .with_context(|| format!("carrying the newest deletes of {} into its shadow", table.name))?;
    Ok((carried, deleted))
}

/// Swaps the shadow in for the live table, in `tx` (which holds the live
/// table's ACCESS EXCLUSIVE lock and committed nothing yet): decorations
/// copied, live renamed and dropped, shadow moved and renamed. It sets
/// `search_path` empty for the rest of `tx` (so catalog functions print
/// qualified names): statements with unqualified names go before it.
pub async fn swap(tx: &Transaction<'_>, table: &TargetTable) -> anyhow::Result<()> {
    let (schema, name) = split(&table.name);
    let shadow_name = shadow_name(schema, name);
    let shadow = shadow_ident(table);
    let live = &table.ident;
    let live_oid: u32 = tx
        .query_one("SELECT $1::text::regclass::oid", &[live])
        .await?
        .get(0);
    let shadow_oid: u32 = tx
        .query_one("SELECT $1::text::regclass::oid", &[&shadow])
        .await?
        .get(0);
    let mut ddl: Vec<String> = Vec::new();

    // Owner, then grants (the owner's own are its default).
    let owner: String = tx
        .query_one(
            "SELECT pg_get_userbyid(relowner)::text FROM pg_class WHERE oid = $1",
            &[&live_oid],
        )
        .await?
        .get(0);
    ddl.push(format!(
        "ALTER TABLE {shadow} OWNER TO {}",
        quote_ident(&owner)
    ));
    for r in tx
        .query(
            "SELECT CASE WHEN a.grantee = 0 THEN 'PUBLIC' ELSE quote_ident(pg_get_userbyid(a.grantee)) END,
                    a.privilege_type, a.is_grantable
               FROM pg_class c, aclexplode(c.relacl) a
              WHERE c.oid = $1 AND a.grantee <> c.relowner",
            &[&live_oid],
        )
        .await?
    {
        let (grantee, privilege, grantable): (String, String, bool) = (r.get(0), r.get(1), r.get(2));
        ddl.push(format!(
            "GRANT {privilege} ON {shadow} TO {grantee}{}",
            if grantable { " WITH GRANT OPTION" } else { "" }
        ));
    }
    // Triggers (regionsync's and the application's), as defined now, with
    // their enable state.
    tx.batch_execute("SET LOCAL search_path = ''").await?;
    let qualified: String = tx
        .query_one(
            "SELECT format('%I.%I', n.nspname, c.relname) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = $1",
            &[&live_oid],
        )
        .await?
        .get(0);
    for r in tx
        .query(
            "SELECT pg_get_triggerdef(oid), quote_ident(tgname), tgenabled::text FROM pg_trigger
              WHERE tgrelid = $1 AND NOT tgisinternal ORDER BY tgname",
            &[&live_oid],
        )
        .await?
    {
        let (def, trigger, enabled): (String, String, String) = (r.get(0), r.get(1), r.get(2));
        let on = format!(" ON {qualified} ");
        anyhow::ensure!(
            def.contains(&on),
            "cannot copy trigger {trigger} of {}: its definition does not name the table as expected: {def}",
            table.name
        );
        ddl.push(def.replacen(&on, &format!(" ON {shadow} "), 1));
        match enabled.as_str() {
            "D" => ddl.push(format!("ALTER TABLE {shadow} DISABLE TRIGGER {trigger}")),
            "R" => ddl.push(format!(
                "ALTER TABLE {shadow} ENABLE REPLICA TRIGGER {trigger}"
            )),
            "A" => ddl.push(format!(
                "ALTER TABLE {shadow} ENABLE ALWAYS TRIGGER {trigger}"
            )),
            _ => {}
        }
    }
    // Replica identity (the capture connector needs FULL), storage
    // parameters, row security.
    let row = tx
        .query_one(
            "SELECT c.relreplident::text, array_to_string(c.reloptions, ', '), c.relrowsecurity, c.relforcerowsecurity,
                    (SELECT quote_ident(i.relname) FROM pg_index x JOIN pg_class i ON i.oid = x.indexrelid
                      WHERE x.indrelid = c.oid AND x.indisreplident)
               FROM pg_class c WHERE c.oid = $1",
            &[&live_oid],
        )
        .await?;
    let (identity, options, rls, force_rls, ident_index): (
        String,
        Option<String>,
        bool,
        bool,
        Option<String>,
    ) = (row.get(0), row.get(1), row.get(2), row.get(3), row.get(4));
    match identity.as_str() {
        "f" => ddl.push(format!("ALTER TABLE {shadow} REPLICA IDENTITY FULL")),
        "n" => ddl.push(format!("ALTER TABLE {shadow} REPLICA IDENTITY NOTHING")),
        // "i": an index's, re-pointed once the indexes have their names.
        _ => {}
    }
    if let Some(options) = options.filter(|o| !o.is_empty()) {
        ddl.push(format!("ALTER TABLE {shadow} SET ({options})"));
    }
    if rls {
        ddl.push(format!("ALTER TABLE {shadow} ENABLE ROW LEVEL SECURITY"));
    }
    if force_rls {
        ddl.push(format!("ALTER TABLE {shadow} FORCE ROW LEVEL SECURITY"));
    }
    // Comments (the table's: LIKE copies only the columns', and those as
    // they were when the shadow was made) and statistics targets.
    for r in tx
        .query(
            "SELECT format('COMMENT ON TABLE %s IS %L', $2::text, d.description)
               FROM pg_description d
              WHERE d.objoid = $1 AND d.classoid = 'pg_class'::regclass AND d.objsubid = 0
             UNION ALL
             SELECT format('COMMENT ON COLUMN %s.%I IS %L', $2::text, a.attname, d.description)
               FROM pg_attribute a
               LEFT JOIN pg_description d
                 ON d.objoid = a.attrelid AND d.classoid = 'pg_class'::regclass AND d.objsubid = a.attnum
              WHERE a.attrelid = $1 AND a.attnum > 0 AND NOT a.attisdropped
             UNION ALL
             SELECT format('ALTER TABLE %s ALTER COLUMN %I SET STATISTICS %s', $2::text, a.attname, a.attstattarget)
               FROM pg_attribute a
              WHERE a.attrelid = $1 AND a.attnum > 0 AND NOT a.attisdropped AND a.attstattarget >= 0",
            &[&live_oid, &shadow],
        )
        .await?
    {
        ddl.push(r.get(0));
    }
    // Publications that list the table itself (not FOR ALL TABLES or its
    // schema): the shadow listed too; the old one leaves them when dropped.
    for r in tx
        .query(
            "SELECT quote_ident(p.pubname) FROM pg_publication_rel pr JOIN pg_publication p ON p.oid = pr.prpubid
              WHERE pr.prrelid = $1",
            &[&live_oid],
        )
        .await?
    {
        let publication: String = r.get(0);
        ddl.push(format!("ALTER PUBLICATION {publication} ADD TABLE {shadow}"));
    }
    let mut owned_by = Vec::new();
    let mut renamed_sequences = Vec::new();
    // Sequences: a serial column's sequence belongs to the live table's
    // column (the shadow's default uses it too): given to the shadow's, or
    // the drop would take it. An identity column's sequence is the
    // shadow's own: set to where the live one is, and given the live one's
    // name once that is dropped (it moves with the shadow's schema).
    for r in tx
        .query(
            "SELECT quote_ident(a.attname), a.attidentity::text,
                    pg_get_serial_sequence($2, a.attname), pg_get_serial_sequence($3, a.attname),
                    (SELECT quote_ident(relname) FROM pg_class WHERE oid = pg_get_serial_sequence($2, a.attname)::regclass),
                    (SELECT quote_ident(relname) FROM pg_class WHERE oid = pg_get_serial_sequence($3, a.attname)::regclass)
               FROM pg_attribute a WHERE a.attrelid = $1 AND a.attnum > 0 AND NOT a.attisdropped",
            &[&live_oid, &qualified, &shadow],
        )
        .await?
    {
        let (column, identity, live_seq, shadow_seq, live_name, shadow_seq_name): (
            String,
            String,
            Option<String>,
            Option<String>,
            Option<String>,
            Option<String>,
        ) = (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4), r.get(5));
        match (identity.as_str(), live_seq, shadow_seq) {
            // Given once the shadow is in the live table's schema: a
            // sequence can only belong to a table of its own schema.
            ("", Some(seq), _) => owned_by.push((seq, column)),
            (_, Some(live_seq), Some(shadow_seq)) if !identity.is_empty() => {
                ddl.push(format!(
                    "SELECT setval('{}', last_value, is_called) FROM {live_seq}",
                    shadow_seq.replace('\'', "''")
                ));
                if let (Some(live_name), Some(shadow_seq_name)) = (live_name, shadow_seq_name) {
                    if live_name != shadow_seq_name {
                        renamed_sequences.push((shadow_seq_name, live_name));
                    }
                }
            }
            _ => {}
        }
    }
    // The live indexes' and constraints' names, to give to the shadow's
    // matching ones once the old table is gone (matched by definition).
    let index_names = |oid: u32| async move {
        let rows = tx
            .query(
                "SELECT i.relname::text, regexp_replace(pg_get_indexdef(i.oid), '^.* USING ', ''),
                        x.indisunique, con.conname::text
                   FROM pg_index x JOIN pg_class i ON i.oid = x.indexrelid
                   LEFT JOIN pg_constraint con ON con.conindid = i.oid AND con.conrelid = x.indrelid
                  WHERE x.indrelid = $1 ORDER BY i.oid",
                &[&oid],
            )
            .await?;
        anyhow::Ok(
            rows.iter()
                .map(|r| {
                    let (name, def, unique, constraint): (String, String, bool, Option<String>) =
                        (r.get(0), r.get(1), r.get(2), r.get(3));
                    (name, (def, unique), constraint)
                })
                .collect::<Vec<_>>(),
        )
    };
    let live_indexes = index_names(live_oid).await?;
    let mut shadow_indexes = index_names(shadow_oid).await?;

    let old = format!("regionsync_replaced_{live_oid}");
    let (q_schema, q_name) = (quote_ident(schema), quote_ident(name));
    ddl.push(format!(
        "ALTER TABLE {live} RENAME TO {}",
        quote_ident(&old)
    ));
    ddl.push(format!("ALTER TABLE {shadow} SET SCHEMA {q_schema}"));
    ddl.push(format!(
        "ALTER TABLE {q_schema}.{} RENAME TO {q_name}",
        quote_ident(&shadow_name)
    ));
    for (seq, column) in owned_by {
        ddl.push(format!(
            "ALTER SEQUENCE {seq} OWNED BY {q_schema}.{q_name}.{column}"
        ));
    }
    ddl.push(format!("DROP TABLE {q_schema}.{}", quote_ident(&old)));
    for (shadow_seq, live_seq) in renamed_sequences {
        ddl.push(format!(
            "ALTER SEQUENCE {q_schema}.{shadow_seq} RENAME TO {live_seq}"
        ));
    }
    for (name, def, constraint) in &live_indexes {
        let Some(at) = shadow_indexes.iter().position(|(_, d, _)| d == def) else {
            continue;
        };
        let (shadow_index, _, shadow_constraint) = shadow_indexes.remove(at);
        if &shadow_index == name {
            continue;
        }
        match (constraint, shadow_constraint) {
            (Some(c), Some(sc)) => ddl.push(format!(
                "ALTER TABLE {q_schema}.{q_name} RENAME CONSTRAINT {} TO {}",
                quote_ident(&sc),
                quote_ident(c)
            )),
            _ => ddl.push(format!(
                "ALTER INDEX {q_schema}.{} RENAME TO {}",
                quote_ident(&shadow_index),
                quote_ident(name)
            )),
        }
    }
    if let (true, Some(index)) = (identity == "i", ident_index) {
        ddl.push(format!(
            "ALTER TABLE {q_schema}.{q_name} REPLICA IDENTITY USING INDEX {index}"
        ));
    }
    for statement in &ddl {
        tx.batch_execute(statement)
            .await
            .with_context(|| format!("swapping in the rebuilt {}: {statement}", table.name))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_shadow_name_is_readable_when_it_fits_and_hashed_when_not() {
        assert_eq!(shadow_name("public", "users"), "shadow__public__users");
        let long = "t".repeat(60);
        let hashed = shadow_name("public", &long);
        assert!(
            hashed.starts_with("shadow__") && hashed.len() <= 63,
            "{hashed}"
        );
        assert_ne!(hashed, shadow_name("other", &long), "schemas apart");
    }
}
