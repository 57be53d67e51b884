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
use support::*;

/// The wide table's columns after `id`, as created in both regions
/// (`{mood}` is the test's own enum type).
const COLUMNS: &str = "
    c_smallint smallint, c_int integer, c_bigint bigint,
    c_real real, c_double double precision,
    c_numeric numeric(12,3), c_numeric_free numeric,
    c_char char(5), c_varchar varchar(20), c_text text,
    c_bytea bytea, c_bool boolean,
    c_date date, c_time time, c_time0 time(0), c_time3 time(3), c_timetz timetz,
    c_ts timestamp, c_ts0 timestamp(0), c_ts3 timestamp(3),
    c_tstz timestamptz, c_tstz3 timestamptz(3),
    c_interval interval, c_uuid uuid, c_json json, c_jsonb jsonb,
    c_inet inet, c_cidr cidr, c_macaddr macaddr, c_mood {mood},
    c_int_arr integer[], c_text_arr text[],
    c_bit bit(8), c_bit1 bit(1), c_varbit bit varying(8), c_point point,
    c_time1 time(1), c_time2 time(2), c_time4 time(4), c_time5 time(5),
    c_ts1 timestamp(1), c_ts2 timestamp(2), c_ts4 timestamp(4), c_ts5 timestamp(5),
    c_tstz0 timestamptz(0), c_tstz6 timestamptz(6),
    c_money money, c_citext citext, c_macaddr8 macaddr8, c_xml xml, c_tsvector tsvector,
    c_tstz1 timestamptz(1), c_tstz2 timestamptz(2), c_tstz4 timestamptz(4), c_tstz5 timestamptz(5),
    c_int4range int4range, c_numrange numrange, c_tsrange tsrange, c_tstzrange tstzrange,
    c_daterange daterange, c_int8range int8range,
    c_hstore hstore, c_ltree ltree, c_posint {posint}, c_day {day},
    c_date_arr date[], c_num_arr numeric(8,2)[], c_numfree_arr numeric[], c_bool_arr boolean[],
    c_f8_arr float8[], c_uuid_arr uuid[], c_jsonb_arr jsonb[], c_ts_arr timestamp[],
    c_tstz_arr timestamptz[], c_time_arr time[], c_bytea_arr bytea[], c_citext_arr citext[],
    c_ltree_arr ltree[], c_hstore_arr hstore[], c_inet_arr inet[], c_mood_arr {mood}[],
    c_char_arr char(3)[], c_narrow varchar(20),
    c_ts_narrow timestamp, c_tstz_narrow timestamptz, c_time_narrow time,
    c_timetz_narrow timetz, c_interval_narrow interval, c_ym_narrow interval,
    c_real_narrow double precision";

/// Columns whose type in B keeps less than A's (set after both tables are
/// created): PostgreSQL would round or drop what B's type does not keep
/// on assignment, silently, so such a value is a schema difference.
const NARROWER_IN_B: &[(&str, &str)] = &[
    ("c_narrow", "varchar(3)"),
    ("c_ts_narrow", "timestamp(0)"),
    ("c_tstz_narrow", "timestamptz(1)"),
    ("c_time_narrow", "time(2)"),
    ("c_timetz_narrow", "timetz(0)"),
    ("c_interval_narrow", "interval day to second(0)"),
    ("c_ym_narrow", "interval year to month"),
    ("c_real_narrow", "real"),
];

/// Rows whose values B's narrower columns hold exactly: they arrive, equal
/// (id, then the values of the columns from `c_ts_narrow` on). The doubles
/// are ones whose shortest texts as float4 and float8 agree, so that
/// `to_jsonb` compares them.
const NARROW_FITS: &[(i64, &str)] = &[
    (
        40,
        "'2024-02-29 13:14:15', '2024-02-29 13:14:15.5+00', '12:34:56.78', '10:00:00+00',
         '1 day 02:03:04', '1 year 2 mons', 1.5",
    ),
    (
        41,
        "'infinity', '-infinity', '24:00:00', '23:59:59+00',
         '-1 days -00:00:01', '-1 years -2 mons', 'NaN'",
    ),
    (
        42,
        "'0044-03-15 12:00:00 BC', '2000-01-01 00:00:00.100000+00', '00:00:00.5', '00:00:00+00',
         '3 mons 4 days', '0', '-Infinity'",
    ),
];

/// The values of the columns from `c_money` on, for the rows of
/// [`EXACT_ROWS`] in the same order (`{posint}`, `{day}`: the test's
/// domains over integer and date).
const EXACT_ROWS_MORE: &[&str] = &[
    r#"'-1234.56', 'MiXeD Case', '08:00:2b:01:02:03:04:05', '<a x="1">t&amp;é</a>', 'a fat cat sat',
       '2024-02-29 13:14:15.1+00', '2024-02-29 13:14:15.12+03', '2024-02-29 13:14:15.1234-01',
       '2024-02-29 13:14:15.12345+00',
       '[1,5)', '(1.5,2.50]', '[2024-01-01 00:00,2024-02-01 12:00:00.5)',
       '[2024-01-01 00:00+02,2024-06-01 00:00+00)', '[2024-01-01,2024-12-31)',
       '[-9223372036854775808,9223372036854775807)',
       'a=>1, b=>NULL, "c d"=>"e\"f", "back\\slash"=>""', 'top.sci.astro', 5, '2024-02-29',
       '{2024-02-29,NULL,1970-01-01}', '{1.50,NULL,-2.00}', '{1.5,NULL,-2}', '{t,f,NULL}',
       '{1.5,NaN,-Infinity,-0}', '{a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11,NULL}',
       ARRAY['{"a": 1}'::jsonb, NULL, '[]'], '{"2024-02-29 13:14:15.123456",NULL}',
       '{"2024-02-29 13:14:15.123456+02"}', '{12:34:56.789,00:00:00}', '{"\\x0102",NULL,"\\x"}',
       '{AbC,NULL}', '{a.b,c}', ARRAY['a=>1, b=>NULL'::hstore, NULL], '{::1,10.0.0.1/8}',
       '{happy,sad}', '{a,bc,"d,e"}', 'abc'"#,
    r#"'92233720368547758.07', '', 'ff:ff:ff:ff:ff:ff:ff:ff', '<!-- c --><r/>', '',
       'infinity', '-infinity', 'infinity', '-infinity',
       'empty', '[-1.5,)', '(,infinity]', '[-infinity,"2024-01-01 00:00+00")', '(,)', 'empty',
       '', '', 2147483647, 'infinity',
       '{infinity,-infinity}', '{}', '{}', '{}', '{}', '{}', '{}', '{infinity,-infinity}',
       '{infinity,-infinity}', '{}', '{}', '{}', '{}', '{}', '{}', '{}', '{}', ''"#,
    r#"'-92233720368547758.08', NULL, NULL, NULL, NULL,
       '0044-03-15 12:00:00.1+00 BC', '1969-12-31 23:59:59.99+00', '10000-01-01 00:00:00.0001+00',
       '2000-01-01 00:00:00.00001+00',
       '(-1,1)', '[0.0000001,1e20]', '["0044-03-15 12:00 BC","2024-01-01")', NULL,
       '[4713-01-01 BC,infinity)', NULL,
       NULL, 'a', 1, '4713-01-01 BC',
       '{NULL}', '{NULL}', '{-12345678901234567890.123456789}', '{NULL}', '{NULL}', '{NULL}',
       '{NULL}', '{NULL}', '{NULL}', '{NULL}', '{NULL}', '{NULL}', '{}', '{NULL}', '{NULL}',
       '{}', '{NULL}', NULL"#,
    r#"NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL,
       NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL,
       NULL, NULL, NULL, NULL, NULL, NULL, NULL"#,
    r#"NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL,
       NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL,
       NULL, NULL, NULL, NULL, NULL, NULL, NULL"#,
];

/// Rows that must arrive exactly, by id (each `INSERT … VALUES` tuple
/// after its id lists the columns above, in order).
const EXACT_ROWS: &[(i64, &str)] = &[
    // Everyday values; the text, jsonb and bytea are large (TOASTed) and
    // stay unchanged through the update below.
    (
        1,
        "1, -32768, 2147483647, -9223372036854775808, 1.5, 0.1, 123456789.123, 3.14159,
         'ab', 'varchar ''quoted''', (SELECT string_agg(md5(s::text), '') FROM generate_series(1, 3000) s),
         (SELECT string_agg(decode(md5(s::text), 'hex'), '') FROM generate_series(1, 4000) s), true,
         '2024-02-29', '12:34:56.789012', '23:59:59', '00:00:00.001', '12:00:00.5+00',
         '2024-02-29 13:14:15.123456', '1999-12-31 23:59:59', '2000-01-01 00:00:00.999',
         '2024-02-29 13:14:15.654321+02', '2024-02-29 23:59:59.999+05:30',
         '1 year 2 mons 20 days 04:05:06.789', 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11',
         '{\"b\": [1, 2.50, null], \"a\": \"\\u00e9t\\u00e9\"}',
         (SELECT jsonb_object_agg('k' || s, md5(s::text)) FROM generate_series(1, 2000) s),
         '192.168.0.1/24', '10.0.0.0/8', '08:00:2b:01:02:03', 'happy',
         '{1,NULL,3}', '{\"a\\\"b\",NULL,\"c,d\",\"\",\"NULL\"}',
         B'00000101', B'1', B'10000001', '(1.5,-2)',
         '12:34:56.7', '12:34:56.78', '12:34:56.7891', '12:34:56.78912',
         '2024-02-29 13:14:15.1', '2024-02-29 13:14:15.12', '2024-02-29 13:14:15.1234',
         '2024-02-29 13:14:15.12345', '2024-02-29 13:14:15+01', '2024-02-29 13:14:15.123456-08'",
    ),
    // Special values, and the far ends of the ranges.
    (
        2,
        "2, 0, -1, 0, 'NaN', 'Infinity', -0.001, 0.000001,
         'abcde', '', 'x', '\\x'::bytea, false,
         'infinity', '24:00:00', '00:00:00', '23:59:59.999', '00:00:00+00',
         'infinity', 'infinity', 'infinity', 'infinity', '-infinity',
         '-1 days +02:03:04.5', '00000000-0000-0000-0000-000000000000', '[]', '{}',
         '::1', '2001:db8::/32', 'ff:ff:ff:ff:ff:ff', 'sad',
         '{}', '{}', B'10000000', B'0', B'11111111', '(NaN,Infinity)',
         '24:00:00', '24:00:00', '24:00:00', '24:00:00',
         'infinity', 'infinity', 'infinity', 'infinity', 'infinity', '-infinity'",
    ),
    (
        3,
        "3, 1, 1, 1, '-Infinity', '-0', 99999.999, -12345678901234567890.123456789,
         NULL, NULL, NULL, NULL, NULL,
         '-infinity', '00:00:00.000001', NULL, NULL, NULL,
         '-infinity', '-infinity', '-infinity', '-infinity', 'infinity',
         '-1 years -2 mons +3 days -00:00:00.000001', NULL, 'null', '\"\"',
         NULL, NULL, NULL, NULL,
         '{NULL}', '{NULL}', B'00000000', NULL, NULL, '(-0,1e-300)',
         '00:00:00', '23:59:59.99', '00:00:00.0001', '23:59:59.99999',
         '-infinity', '-infinity', '-infinity', '-infinity', '-infinity', 'infinity'",
    ),
    // BC dates and timestamps, years beyond 9999.
    (
        4,
        "4, NULL, NULL, NULL, 3.4028235e38, 1e308, NULL, 1e-20,
         NULL, NULL, NULL, NULL, NULL,
         '4713-01-01 BC', NULL, NULL, NULL, NULL,
         '0044-03-15 12:00:00.123456 BC', '0001-12-31 23:59:59 BC', '0001-01-01 00:00:00.001 BC',
         '0044-03-15 12:00:00.123456+00 BC', '10000-01-01 00:00:00+00',
         '0', NULL, NULL, NULL,
         NULL, NULL, NULL, NULL,
         NULL, NULL, NULL, NULL, NULL, NULL,
         NULL, NULL, NULL, NULL,
         '0001-01-01 00:00:00.1 BC', '1969-12-31 23:59:59.99', '1970-01-01 00:00:00.0001',
         '4713-01-01 00:00:00.00001 BC', '0001-01-01 00:00:00+00 BC', '1969-12-31 23:59:59.999999+00'",
    ),
    // Everything NULL.
    (
        5,
        "5, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL,
         NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL,
         NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL,
         NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL",
    ),
];

/// A row deleted after it arrived.
const DELETED: i64 = 6;
/// Row 4's key is changed to this after it arrived (Debezium: a delete of
/// the old key and a create of the new one).
const REKEYED: i64 = 7;
/// Rows Debezium carries with a documented difference (docs/TYPES.md):
/// (id, column, value in A, the text B must hold for that column; `None`
/// for NULL).
const DIFFERENT: &[(i64, &str, &str, Option<&str>)] = &[
    // An unconstrained numeric loses its trailing zeros.
    (20, "c_numeric_free", "12.50", Some("12.5")),
    // timetz is carried in UTC: the offset is lost, the instant kept.
    (21, "c_timetz", "'12:00:00.5+02'", Some("10:00:00.5+00")),
    // Debezium's stand-in for infinity is this one real timestamp.
    (22, "c_ts", "'294247-01-10 04:00:25.2'", Some("infinity")),
    // Debezium's array converter (pgjdbc's array reader) loses a date's
    // era, turns 24:00:00 into 00:00:00 and a multi-dimensional array into
    // an array of NULLs; a NaN element, or a NULL element of an enum or
    // ltree array, makes it send the whole array as NULL; numeric elements
    // lose trailing zeros.
    (23, "c_date_arr", "'{4713-01-01 BC}'", Some("{4713-01-01}")),
    (24, "c_time_arr", "'{24:00:00}'", Some("{00:00:00}")),
    (25, "c_int_arr", "'{{1,2},{3,4}}'", Some("{NULL,NULL}")),
    (26, "c_numfree_arr", "'{1.5,NaN}'", None),
    (27, "c_mood_arr", "'{sad,NULL}'", None),
    (28, "c_numfree_arr", "'{1.50}'", Some("{1.5}")),
    (29, "c_ltree_arr", "'{a,NULL}'", None),
];
/// Rows that must be refused: (id, column, value in A, its type in B, the
/// dead letter's `regionsync.reason`, a part of its error).
const REFUSED: &[(i64, &str, &str, &str, &str, &str)] = &[
    // A bit varying value below its maximum length: leading zeros are not
    // carried, so 0101 and 101 arrive alike.
    (
        30,
        "c_varbit",
        "B'0101'",
        "bit varying(8)",
        "bad_value",
        "leading zeros",
    ),
    (
        31,
        "c_varbit",
        "B''",
        "bit varying(8)",
        "bad_value",
        "leading zeros",
    ),
    // B's column is narrower than A's: a schema difference, found before
    // PostgreSQL would cut or refuse the value (on_schema_mismatch = dlq).
    (
        32,
        "c_narrow",
        "'longer than three'",
        "character varying(3)",
        "schema_mismatch",
        "does not fit",
    ),
    // B keeps fewer fractional digits, fewer interval fields, a float4:
    // PostgreSQL would round or drop the rest without a word.
    (
        33,
        "c_ts_narrow",
        "'2024-02-29 13:14:15.123456'",
        "timestamp(0) without time zone",
        "schema_mismatch",
        "has 6 fractional digits of a second, the column keeps 0 (it would be rounded)",
    ),
    (
        34,
        "c_tstz_narrow",
        "'2024-02-29 13:14:15.25+00'",
        "timestamp(1) with time zone",
        "schema_mismatch",
        "has 2 fractional digits of a second, the column keeps 1 (it would be rounded)",
    ),
    (
        35,
        "c_time_narrow",
        "'12:34:56.789'",
        "time(2) without time zone",
        "schema_mismatch",
        "has 3 fractional digits of a second, the column keeps 2 (it would be rounded)",
    ),
    (
        36,
        "c_timetz_narrow",
        "'10:00:00.5+00'",
        "time(0) with time zone",
        "schema_mismatch",
        "has 1 fractional digits of a second, the column keeps 0 (it would be rounded)",
    ),
    (
        37,
        "c_interval_narrow",
        "'1 day 00:00:00.5'",
        "interval day to second(0)",
        "schema_mismatch",
        "the column keeps 0 (it would be rounded)",
    ),
    (
        38,
        "c_ym_narrow",
        "'1 year 2 mons 3 days'",
        "interval year to month",
        "schema_mismatch",
        "days or time, which the column's fields do not keep",
    ),
    (
        39,
        "c_real_narrow",
        "3.141592653589793",
        "real",
        "schema_mismatch",
        "has no exact real (float4) form",
    ),
];

async fn create_table(prefix: &str) -> TestTable {
    let name = format!("{prefix}_{}", fresh_key());
    let (mood, posint, day) = (
        format!("{name}_mood"),
        format!("{name}_posint"),
        format!("{name}_day"),
    );
    for region in [region_a(), region_b()] {
        let db = app_db(&region).await;
        db.batch_execute(&format!(
            "CREATE TYPE public.{mood} AS ENUM ('sad', 'ok', 'happy');
             CREATE DOMAIN public.{posint} AS integer CHECK (VALUE > 0);
             CREATE DOMAIN public.{day} AS date;
             CREATE TABLE public.{name} (id bigint PRIMARY KEY, {columns},
                 hlc bigint NOT NULL DEFAULT 0, origin_region text NOT NULL DEFAULT '');
             ALTER TABLE public.{name} REPLICA IDENTITY FULL;
             CREATE TRIGGER regionsync_stamp_hlc BEFORE INSERT OR UPDATE ON public.{name}
                 FOR EACH ROW EXECUTE FUNCTION regionsync.stamp_hlc('id');
             CREATE TRIGGER regionsync_mark_deleted AFTER DELETE ON public.{name}
                 FOR EACH ROW EXECUTE FUNCTION regionsync.mark_deleted('id');",
            columns = COLUMNS
                .replace("{mood}", &mood)
                .replace("{posint}", &posint)
                .replace("{day}", &day),
        ))
        .await
        .unwrap_or_else(|e| panic!("create {name} in {}: {e}", region.name));
    }
    let narrow: Vec<String> = NARROWER_IN_B
        .iter()
        .map(|(column, pg_type)| format!("ALTER COLUMN {column} TYPE {pg_type}"))
        .collect();
    app_db(&region_b())
        .await
        .batch_execute(&format!("ALTER TABLE public.{name} {}", narrow.join(", ")))
        .await
        .expect("narrow B's columns");
    TestTable { name }
}

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
    let table = create_table(prefix).await;
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
        let letter = letters
            .iter()
            .map(headers)
            .find(|h| {
                h.get("regionsync.error")
                    .is_some_and(|e| e.starts_with(&expected))
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
