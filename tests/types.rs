//! Every PostgreSQL type of the wide table replicates exactly, or is refused
//! loudly (docs/TYPES.md). A table of its own in both regions holds the
//! everyday types, time and timestamp at every precision 0–6, and their
//! special values (±infinity, BC dates, 24:00:00, NaN and ±Infinity, -0,
//! bit strings, points, intervals with months, days and time apart, arrays
//! with NULL elements); rows written in us-east-1
//! (inserts, an update that leaves TOASTed text, jsonb and bytea unchanged,
//! a delete) must arrive in eu-west-1 with `to_jsonb(row)` equal, `hlc` and
//! `origin_region` included, through the JSON topics and through the Avro
//! topics. Values Debezium carries with a documented difference are checked
//! for exactly that difference; values it carries without what would make
//! them exact must land in the dead-letter topic with a reason naming the
//! table, the column and its type. Columns narrower in eu-west-1 (fewer
//! fractional digits, interval fields, `real` for a double, a shorter
//! varchar) take the values they hold exactly and dead-letter the others
//! as schema differences, never a rounded value. A table whose names have
//! capitals, spaces and a double quote replicates end to end.

mod support;

use std::time::{Duration, Instant};

use support::kit::*;
use support::wide::*;
use support::*;

/// A row deleted after it arrived.
const DELETED: i64 = 6;
/// Row 4's key is changed to this after it arrived (Debezium: a delete of
/// the old key and a create of the new one).
const REKEYED: i64 = 7;

/// `to_jsonb(row)` of the given ids in `region`, ordered by id.
async fn rows(table: &TestTable, region: &Region, ids: &[i64]) -> Vec<String> {
    app_db(region)
        .await
        .query(
            &format!(
                "SELECT to_jsonb(t)::text FROM public.{} t WHERE id = ANY($1) ORDER BY id",
                table.name
            ),
            &[&ids],
        )
        .await
        .expect("select rows")
        .iter()
        .map(|r| r.get(0))
        .collect()
}

/// Whether B holds exactly A's rows of `ids`; else the first differences.
async fn converged(table: &TestTable, ids: &[i64]) -> Result<(), String> {
    let (in_a, in_b) = (
        rows(table, &region_a(), ids).await,
        rows(table, &region_b(), ids).await,
    );
    if in_a == in_b {
        return Ok(());
    }
    let differ: Vec<String> = in_a
        .iter()
        .zip(in_b.iter().map(Some).chain(std::iter::repeat(None)))
        .filter(|(x, y)| Some(*x) != *y)
        .take(2)
        .map(|(x, y)| format!("\nA: {x}\nB: {y:?}"))
        .collect();
    Err(format!(
        "{} rows in A, {} in B; first differences:{}",
        in_a.len(),
        in_b.len(),
        differ.concat()
    ))
}

/// Polls until `check` holds, or fails with what it last returned.
async fn eventually<F, Fut>(what: &str, timeout: Duration, check: F)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Result<(), String>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        match check().await {
            Ok(()) => return,
            Err(e) if Instant::now() > deadline => panic!("{what} not within {timeout:?}: {e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(500)).await,
        }
    }
}

async fn every_type_replicates_or_is_refused(prefix: &str, topic_prefix: &str) {
    let table = create_table(prefix, true).await;
    let name = table.name.clone();
    // A value B's narrower c_narrow cannot hold is a schema difference
    // (docs/SCHEMA-CHANGES.md): dead-lettered here rather than held, so the
    // rows after it arrive.
    let toml = worker_toml(&table, &format!("{topic_prefix}.public.{name}"), "").replace(
        "key = [\"id\"]",
        "key = [\"id\"]\non_schema_mismatch = \"dlq\"",
    );
    let worker =
        Worker::start(regionsync::config::Config::from_toml(&toml).expect("valid test config"));
    let a = app_db(&region_a()).await;
    let insert = |values: String| format!("INSERT INTO public.{name} VALUES ({values});");
    let mut sql: String = EXACT_ROWS
        .iter()
        .zip(EXACT_ROWS_MORE)
        .map(|((_, v), more)| insert(format!("{v}, {more}")))
        .collect();
    sql.push_str(&format!(
        "INSERT INTO public.{name} (id, c_int) VALUES ({DELETED}, 6);"
    ));
    for (id, values) in NARROW_FITS {
        sql.push_str(&format!(
            "INSERT INTO public.{name} (id, c_ts_narrow, c_tstz_narrow, c_time_narrow,
                 c_timetz_narrow, c_interval_narrow, c_ym_narrow, c_real_narrow)
             VALUES ({id}, {values});"
        ));
    }
    for (id, values) in NARROW_ARRAY_FITS {
        sql.push_str(&format!(
            "INSERT INTO public.{name} (id, {NARROW_ARRAY_COLUMNS}) VALUES ({id}, {values});"
        ));
    }
    let probes = DIFFERENT
        .iter()
        .map(|(id, column, value, _)| (id, column, value))
        .chain(
            REFUSED
                .iter()
                .map(|(id, column, value, ..)| (id, column, value)),
        );
    for (id, column, value) in probes {
        sql.push_str(&format!(
            "INSERT INTO public.{name} (id, {column}) VALUES ({id}, {value});"
        ));
    }
    a.batch_execute(&sql)
        .await
        .expect("insert the wide rows in A");

    // Everything but the refused rows arrives; then an update that leaves
    // the TOASTed columns unchanged, and a delete.
    let mut with_deleted: Vec<i64> = EXACT_ROWS.iter().map(|(id, _)| *id).collect();
    with_deleted.extend(NARROW_FITS.iter().map(|(id, _)| *id));
    with_deleted.extend(NARROW_ARRAY_FITS.iter().map(|(id, _)| *id));
    with_deleted.push(DELETED);
    let (t, ids) = (&table, &with_deleted);
    eventually(
        "the inserted rows in B",
        Duration::from_secs(180),
        || async move { converged(t, ids).await },
    )
    .await;
    a.batch_execute(&format!(
        "UPDATE public.{name} SET c_int = c_int - 1, c_varchar = 'updated' WHERE id = 1;
         DELETE FROM public.{name} WHERE id = {DELETED};
         UPDATE public.{name} SET id = {REKEYED} WHERE id = 4;"
    ))
    .await
    .expect("update, delete and key change in A");
    with_deleted.push(REKEYED);
    let ids = &with_deleted;
    eventually(
        "the update, the delete and the key change in B",
        Duration::from_secs(120),
        || async move {
            converged(t, ids).await?;
            if rows(t, &region_b(), &[4, REKEYED]).await.len() != 1 {
                return Err("row 4 is not yet row 7 in B".into());
            }
            let b = rows(t, &region_b(), &[1]).await;
            if b.first().is_some_and(|r| r.contains("\"updated\"")) {
                Ok(())
            } else {
                Err(format!("row 1 in B is not updated yet: {b:?}"))
            }
        },
    )
    .await;
    let updated = rows(&table, &region_b(), &[1]).await;
    assert!(
        updated[0].len() > 100_000,
        "the unchanged TOASTed values are kept ({} bytes of row 1)",
        updated[0].len()
    );

    // The documented differences, exactly as documented.
    let b = app_db(&region_b()).await;
    for (id, column, value, expected) in DIFFERENT {
        let got: Option<String> = b
            .query_opt(
                &format!("SELECT {column}::text FROM public.{name} WHERE id = $1"),
                &[id],
            )
            .await
            .expect("select a documented difference")
            .and_then(|r| r.get(0));
        assert_eq!(
            got.as_deref(),
            *expected,
            "{column} = {value} in A arrives in B as documented"
        );
    }

    // The refused rows: in the dead-letter topic, each with a reason naming
    // table, column and type, and not in B.
    let dlq = format!("regionsync.dlq.test-{name}");
    let deadline = Instant::now() + Duration::from_secs(60);
    let letters = tokio::task::block_in_place(|| {
        TopicReader::open(&region_b(), &dlq, deadline).collect(
            deadline,
            |_| true,
            |found| found.len() >= REFUSED.len(),
        )
    });
    assert_eq!(
        letters.len(),
        REFUSED.len(),
        "one dead letter per refused row"
    );
    for (id, column, value, pg_type, reason, why) in REFUSED {
        let expected = format!("public.{name}: column {column} ({pg_type}): ");
        // A column of another type here says so in these words.
        let retyped = format!("public.{name}: column {column} is {pg_type} here, ");
        let letter = letters
            .iter()
            .map(headers)
            .find(|h| {
                h.get("regionsync.error")
                    .is_some_and(|e| e.starts_with(&expected) || e.starts_with(&retyped))
                    && h.get("regionsync.offset").is_some()
            })
            .unwrap_or_else(|| {
                panic!(
                    "no dead letter for {column} = {value} (id {id}) naming {expected:?}: {:?}",
                    letters.iter().map(headers).collect::<Vec<_>>()
                )
            });
        assert_eq!(letter["regionsync.reason"], *reason, "{column} = {value}");
        assert!(
            letter["regionsync.error"].contains(why),
            "{}",
            letter["regionsync.error"]
        );
    }
    let refused: Vec<i64> = REFUSED.iter().map(|(id, ..)| *id).collect();
    assert!(
        rows(&table, &region_b(), &refused).await.is_empty(),
        "a refused row is not written"
    );
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn every_type_replicates_or_is_refused_through_json() {
    every_type_replicates_or_is_refused("types_json", "cdc").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn every_type_replicates_or_is_refused_through_avro() {
    every_type_replicates_or_is_refused("types_avro", "cdc.avro").await;
}

/// Types Debezium's PostgreSQL connector leaves out of its change events
/// (no converter: the column is missing from the event's schema and
/// payload): (column, its type; `{posint}` is a domain over integer).
const LEFT_OUT: &[(&str, &str)] = &[
    ("c_box", "box"),
    ("c_lseg", "lseg"),
    ("c_path", "path"),
    ("c_polygon", "polygon"),
    ("c_circle", "circle"),
    ("c_line", "line"),
    ("c_multi", "int4multirange"),
    ("c_money_arr", "money[]"),
    ("c_interval_arr", "interval[]"),
    ("c_xml_arr", "xml[]"),
    ("c_point_arr", "point[]"),
    ("c_posint_arr", "{posint}[]"),
    ("c_tsquery", "tsquery"),
    ("c_lsn", "pg_lsn"),
    // Present in the event, but NULL whatever the value.
    ("c_bit_arr", "bit(4)[]"),
];

/// A value of each [`LEFT_OUT`] type, in the same order.
const LEFT_OUT_VALUES: &[&str] = &[
    "'((1,2),(3,4))'",
    "'[(1,2),(3,4)]'",
    "'[(0,0),(1,1),(2,0)]'",
    "'((0,0),(1,1),(2,0))'",
    "'<(1,2),3>'",
    "'{1,-1,0}'",
    "'{[1,3), [5,7)}'",
    "'{1.50}'",
    "'{\"1 day\"}'",
    "ARRAY['<a/>'::xml]",
    "'{\"(1,2)\"}'",
    "'{1,2}'",
    "'a & b'",
    "'0/16B3748'",
    "'{1010,0001}'",
];

/// A row with a column of a type Debezium leaves out is dead-lettered
/// naming table, column and type: written without it, B's row would hold
/// the column's default instead of A's value. One table per type (a row is
/// refused at its first such column), one worker for all of them.
async fn left_out_types_are_refused(prefix: &str, topic_prefix: &str) {
    let key = fresh_key();
    let posint = format!("{prefix}_{key}_posint");
    let mut tables = Vec::new();
    for (i, (column, pg_type)) in LEFT_OUT.iter().enumerate() {
        let name = format!("{prefix}_{key}_{i}");
        let pg_type = pg_type.replace("{posint}", &posint);
        for region in [region_a(), region_b()] {
            let domain = if i == 0 {
                format!("CREATE DOMAIN public.{posint} AS integer CHECK (VALUE > 0);")
            } else {
                String::new()
            };
            app_db(&region)
                .await
                .batch_execute(&format!(
                    "{domain}
                     CREATE TABLE public.{name} (id bigint PRIMARY KEY, {column} {pg_type},
                         hlc bigint NOT NULL DEFAULT 0, origin_region text NOT NULL DEFAULT '');
                     ALTER TABLE public.{name} REPLICA IDENTITY FULL;
                     CREATE TRIGGER regionsync_stamp_hlc BEFORE INSERT OR UPDATE ON public.{name}
                         FOR EACH ROW EXECUTE FUNCTION regionsync.stamp_hlc('id');"
                ))
                .await
                .unwrap_or_else(|e| panic!("create {name} in {}: {e}", region.name));
        }
        tables.push((name, *column, pg_type));
    }
    // One worker for every table: the first table's configuration, and a
    // [[tables]] entry per other table.
    let first = TestTable {
        name: tables[0].0.clone(),
    };
    let mut toml = worker_toml(&first, &format!("{topic_prefix}.public.{}", first.name), "");
    for (name, ..) in &tables[1..] {
        toml.push_str(&format!(
            "\n[[tables]]\ntopics = [\"{topic_prefix}.public.{name}\"]\n\
             target = \"public.{name}\"\nkey = [\"id\"]\n"
        ));
    }
    let worker =
        Worker::start(regionsync::config::Config::from_toml(&toml).expect("valid test config"));
    let a = app_db(&region_a()).await;
    for ((name, column, _), value) in tables.iter().zip(LEFT_OUT_VALUES) {
        a.batch_execute(&format!(
            "INSERT INTO public.{name} (id, {column}) VALUES (1, {value});"
        ))
        .await
        .unwrap_or_else(|e| panic!("insert into {name}: {e}"));
    }
    let dlq = format!("regionsync.dlq.test-{}", first.name);
    let deadline = Instant::now() + Duration::from_secs(120);
    let letters = tokio::task::block_in_place(|| {
        TopicReader::open(&region_b(), &dlq, deadline).collect(
            deadline,
            |_| true,
            |found| found.len() >= tables.len(),
        )
    });
    let errors: Vec<String> = letters
        .iter()
        .map(headers)
        .filter(|h| h.get("regionsync.reason").map(String::as_str) == Some("bad_value"))
        .filter_map(|h| h.get("regionsync.error").cloned())
        .collect();
    for (name, column, pg_type) in &tables {
        let expected =
            format!("public.{name}: column {column} ({pg_type}): Debezium does not carry");
        assert!(
            errors.iter().any(|e| e.starts_with(&expected)),
            "no dead letter naming {expected:?}: {errors:?}"
        );
        let b = app_db(&region_b())
            .await
            .query(&format!("SELECT 1 FROM public.{name}"), &[])
            .await
            .expect("select");
        assert!(b.is_empty(), "{name}: a refused row is not written");
    }
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn left_out_types_are_refused_through_json() {
    left_out_types_are_refused("types_out_json", "cdc").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn left_out_types_are_refused_through_avro() {
    left_out_types_are_refused("types_out_avro", "cdc.avro").await;
}

/// A table whose name and columns have capitals, spaces and a double quote
/// replicates end to end: `regionsync setup` installs its triggers in both
/// regions, inserts, an update and a delete arrive equal, and a value B's
/// narrower column cannot hold is dead-lettered with a reason that names
/// the table and the column as PostgreSQL spells them. The topic is the
/// table's name with Debezium's `_` for each character Kafka does not
/// allow; the Avro connector also replaces the characters Avro names do
/// not allow (`field.name.adjustment.mode = avro`), which `columns` maps
/// back.
async fn names_with_capitals_spaces_and_quotes_replicate(prefix: &str, topic_prefix: &str) {
    let key = fresh_key();
    let table = format!("Names \"Q\" {prefix} {key}");
    let topic = format!("{topic_prefix}.public.Names__Q__{prefix}_{key}");
    let ident = format!("\"public\".\"{}\"", table.replace('"', "\"\""));
    let (some, say) = ("Some Column", "Say \"Hi\"");
    let say_ident = "\"Say \"\"Hi\"\"\"";
    for region in [region_a(), region_b()] {
        let width = if region.name == region_b().name {
            3
        } else {
            20
        };
        app_db(&region)
            .await
            .batch_execute(&format!(
                "CREATE TABLE {ident} (\"Id\" bigint PRIMARY KEY, \"{some}\" text,
                     {say_ident} varchar({width}),
                     hlc bigint NOT NULL DEFAULT 0, origin_region text NOT NULL DEFAULT '');
                 ALTER TABLE {ident} REPLICA IDENTITY FULL;"
            ))
            .await
            .unwrap_or_else(|e| panic!("create {ident} in {}: {e}", region.name));
    }
    let columns = if topic_prefix.contains("avro") {
        "columns = { 'Some_Column' = 'Some Column', 'Say__Hi_' = 'Say \"Hi\"' }"
    } else {
        ""
    };
    let group = format!("test-names-{prefix}-{key}");
    let b = region_b();
    let toml_for = |region: &Region, user: &str| {
        format!(
            r#"
            region = "{b}"
            regions = ["{a}", "{b}"]
            consumer_group = "{group}"
            dlq_topic = "regionsync.dlq.{group}"
            [kafka]
            bootstrap_servers = "{kafka}"
            [schema_registry]
            url = "{registry}"
            [postgres]
            host = "{host}"
            port = {port}
            dbname = "app"
            user = "{user}"
            password = "{password}"
            [apply]
            linger_ms = 20
            [[tables]]
            topics = ['{topic}']
            source_table = 'public.{table}'
            target = 'public.{table}'
            key = ['Id']
            on_schema_mismatch = "dlq"
            {columns}
            "#,
            a = region_a().name,
            b = b.name,
            kafka = b.kafka,
            registry = registry_ccompat_url(),
            host = stack_env::HOST,
            port = region.pg_port,
            password = stack_env::REGIONSYNC_PASSWORD.get(),
        )
    };
    // `regionsync setup` in both regions installs the triggers.
    for region in [region_a(), region_b()] {
        let config = regionsync::config::Config::from_toml(&toml_for(&region, "postgres"))
            .expect("valid setup config");
        setup_clean(&config, &region.name).await;
    }
    let worker = Worker::start(
        regionsync::config::Config::from_toml(&toml_for(&b, "regionsync"))
            .expect("valid test config"),
    );
    let a = app_db(&region_a()).await;
    a.batch_execute(&format!(
        "INSERT INTO {ident} VALUES (1, 'one', 'hi'), (2, 'two', 'yo'), (3, 'three', NULL);
         INSERT INTO {ident} VALUES (4, 'four', 'too long for B');
         UPDATE {ident} SET \"{some}\" = 'two, updated', {say_ident} = 'ok' WHERE \"Id\" = 2;
         DELETE FROM {ident} WHERE \"Id\" = 3;"
    ))
    .await
    .expect("write in A");
    let select =
        format!("SELECT to_jsonb(t)::text FROM {ident} t WHERE \"Id\" = ANY($1) ORDER BY \"Id\"");
    let rows = |region: Region| {
        let select = select.clone();
        async move {
            app_db(&region)
                .await
                .query(&select, &[&vec![1i64, 2, 3, 4]])
                .await
                .expect("select rows")
                .iter()
                .map(|r| r.get::<_, String>(0))
                .collect::<Vec<_>>()
        }
    };
    let rows = &rows;
    eventually(
        "rows 1 and 2 in B as in A, 3 deleted",
        Duration::from_secs(120),
        || async move {
            let (in_a, in_b) = (rows(region_a()).await, rows(region_b()).await);
            let expected: Vec<String> = in_a
                .iter()
                .filter(|r| !r.contains("too long"))
                .cloned()
                .collect();
            if expected.len() == 2 && in_b == expected && in_b[1].contains("two, updated") {
                Ok(())
            } else {
                Err(format!("A: {in_a:?}\nB: {in_b:?}"))
            }
        },
    )
    .await;
    let dlq = format!("regionsync.dlq.{group}");
    let deadline = Instant::now() + Duration::from_secs(60);
    let letters = tokio::task::block_in_place(|| {
        TopicReader::open(&b, &dlq, deadline).collect(deadline, |_| true, |found| !found.is_empty())
    });
    let expected = format!("public.{table}: column {say} (character varying(3)): ");
    let letter = letters
        .iter()
        .map(headers)
        .find(|h| {
            h.get("regionsync.error")
                .is_some_and(|e| e.starts_with(&expected))
        })
        .unwrap_or_else(|| {
            panic!(
                "no dead letter naming {expected:?}: {:?}",
                letters.iter().map(headers).collect::<Vec<_>>()
            )
        });
    assert_eq!(letter["regionsync.reason"], "schema_mismatch");
    assert!(
        letter["regionsync.error"]
            .contains(&format!("ALTER TABLE {ident} ALTER COLUMN {say_ident}")),
        "the advice quotes the names: {}",
        letter["regionsync.error"]
    );
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn names_with_capitals_spaces_and_quotes_replicate_through_json() {
    names_with_capitals_spaces_and_quotes_replicate("json", "cdc").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn names_with_capitals_spaces_and_quotes_replicate_through_avro() {
    names_with_capitals_spaces_and_quotes_replicate("avro", "cdc.avro").await;
}

/// `regionsync conflicts resolve` on a table whose name has capitals,
/// spaces and a double quote: under `policy = "manual"`, us-east-1's insert
/// of a row homed in eu-west-1 that eu-west-1 wrote too is held there and
/// recorded under the table's name as PostgreSQL spells it; `conflicts list`
/// shows it and `conflicts resolve ID --keep remote` writes us-east-1's
/// version in eu-west-1 (the command quotes the names).
#[tokio::test(flavor = "multi_thread")]
async fn conflicts_on_a_table_with_capitals_spaces_and_quotes_resolve() {
    let key = fresh_key();
    let table = format!("Conflicts \"Q\" {key}");
    let topic = format!("cdc.public.Conflicts__Q__{key}");
    let ident = format!("\"public\".\"{}\"", table.replace('"', "\"\""));
    let (a, b) = (region_a(), region_b());
    for region in [&a, &b] {
        app_db(region)
            .await
            .batch_execute(&format!(
                "CREATE TABLE {ident} (\"Id\" bigint PRIMARY KEY, \"Some Value\" text,
                     hlc bigint NOT NULL DEFAULT 0, origin_region text NOT NULL DEFAULT '');
                 ALTER TABLE {ident} REPLICA IDENTITY FULL;"
            ))
            .await
            .unwrap_or_else(|e| panic!("create {ident} in {}: {e}", region.name));
    }
    let group = format!("test-conflict-names-{key}");
    let toml_for = |region: &Region, user: &str| {
        format!(
            r#"
            region = "{region}"
            regions = ["{a}", "{b}"]
            consumer_group = "{group}"
            dlq_topic = "regionsync.dlq.{group}"
            [kafka]
            bootstrap_servers = "{kafka}"
            [postgres]
            host = "{host}"
            port = {port}
            dbname = "app"
            user = "{user}"
            password = "{password}"
            [apply]
            linger_ms = 20
            [[tables]]
            topics = ['{topic}']
            source_table = 'public.{table}'
            target = 'public.{table}'
            key = ['Id']
            affinity = 'Id'
            policy = "manual"
            "#,
            region = region.name,
            a = a.name,
            b = b.name,
            kafka = region.kafka,
            host = stack_env::HOST,
            port = region.pg_port,
            password = stack_env::REGIONSYNC_PASSWORD.get(),
        )
    };
    for region in [&a, &b] {
        let config = regionsync::config::Config::from_toml(&toml_for(region, "postgres"))
            .expect("valid setup config");
        setup_clean(&config, &region.name).await;
    }
    // A row homed in eu-west-1, written there first, then in us-east-1.
    let regions = [a.name.clone(), b.name.clone()];
    let id = (key..)
        .find(|k| regionsync::route::home_region(&k.to_string(), &regions) == b.name)
        .expect("a key homed in B");
    app_db(&b)
        .await
        .batch_execute(&format!("INSERT INTO {ident} VALUES ({id}, 'home')"))
        .await
        .expect("write in B");
    app_db(&a)
        .await
        .batch_execute(&format!("INSERT INTO {ident} VALUES ({id}, 'from-a')"))
        .await
        .expect("write in A");
    let worker = Worker::start(
        regionsync::config::Config::from_toml(&toml_for(&b, "regionsync"))
            .expect("valid worker config"),
    );
    let name = format!("public.{table}");
    let open = |name: String| async move {
        admin_db(&region_b())
            .await
            .query(
                "SELECT id FROM regionsync.conflicts WHERE table_name = $1 AND resolved_at IS NULL",
                &[&name],
            )
            .await
            .expect("select conflicts")
            .iter()
            .map(|r| r.get::<_, i64>(0))
            .collect::<Vec<i64>>()
    };
    let (open, name_ref) = (&open, &name);
    eventually(
        "the held insert recorded in B",
        Duration::from_secs(120),
        || async move {
            match open(name_ref.clone()).await.len() {
                1 => Ok(()),
                n => Err(format!("{n} open conflicts for {name_ref}")),
            }
        },
    )
    .await;
    let conflict = open(name.clone()).await[0];
    let value = |region: Region| {
        let ident = ident.clone();
        async move {
            app_db(&region)
                .await
                .query_one(
                    &format!("SELECT \"Some Value\" FROM {ident} WHERE \"Id\" = $1"),
                    &[&id],
                )
                .await
                .expect("select the row")
                .get::<_, String>(0)
        }
    };
    assert_eq!(value(b.clone()).await, "home", "held: B keeps its row");

    // The operator's commands, in eu-west-1.
    let dir = repo_root().join("target/test-configs");
    std::fs::create_dir_all(&dir).expect("config dir");
    let config = dir.join(format!("conflict-names-{key}.toml"));
    std::fs::write(&config, toml_for(&b, "regionsync")).expect("write config");
    let cli = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_regionsync"))
            .arg("--config")
            .arg(&config)
            .args(args)
            .output()
            .expect("run regionsync");
        let stdout = String::from_utf8_lossy(&out.stdout).to_string();
        assert!(
            out.status.success(),
            "regionsync {args:?}: {stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        stdout
    };
    let listed = cli(&["conflicts", "list", "--open", "--table", &name]);
    assert!(
        listed.starts_with(&format!("{conflict}\t")),
        "the conflict listed under {name:?}: {listed}"
    );
    let resolved = cli(&[
        "conflicts",
        "resolve",
        &conflict.to_string(),
        "--keep",
        "remote",
    ]);
    assert!(resolved.contains("written again"), "{resolved}");
    assert_eq!(value(b.clone()).await, "from-a", "A's version kept in B");
    assert!(open(name.clone()).await.is_empty(), "resolved");
    worker.stop().await;
}
