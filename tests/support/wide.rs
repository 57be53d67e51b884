//! The wide table of every PostgreSQL type (docs/TYPES.md): its columns,
//! the rows of special values written in us-east-1, and its creation in
//! both regions. `tests/types.rs` replicates it through regionsync;
//! `tests/types_peer.rs` writes the same rows through the Debezium JDBC sink.
#![allow(dead_code)]

use super::kit::TestTable;
use super::*;

/// The wide table's columns after `id`, as created in both regions
/// (`{mood}` is the test's own enum type).
pub const COLUMNS: &str = "
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
    c_real_narrow double precision,
    c_bit_wide bit(8), c_varbit_wide bit varying(8), c_num_arr_narrow numeric(8,3)[],
    c_ts_arr_narrow timestamp[], c_varchar_arr_narrow varchar(10)[], c_char_arr_narrow char(5)[]";

/// Columns whose type in B keeps less than A's (set after both tables are
/// created): PostgreSQL would round or drop what B's type does not keep
/// on assignment, silently, so such a value is a schema difference.
pub const NARROWER_IN_B: &[(&str, &str)] = &[
    ("c_narrow", "varchar(3)"),
    ("c_ts_narrow", "timestamp(0)"),
    ("c_tstz_narrow", "timestamptz(1)"),
    ("c_time_narrow", "time(2)"),
    ("c_timetz_narrow", "timetz(0)"),
    ("c_interval_narrow", "interval day to second(0)"),
    ("c_ym_narrow", "interval year to month"),
    ("c_real_narrow", "real"),
    // Bit strings of another width: padded or cut by an explicit cast.
    ("c_bit_wide", "bit(12)"),
    ("c_varbit_wide", "bit varying(4)"),
    // Arrays whose elements B's element type keeps less of: PostgreSQL
    // rounds each element when the array is cast (varchar and char
    // elements it refuses; regionsync finds them first).
    ("c_num_arr_narrow", "numeric(8,2)[]"),
    ("c_ts_arr_narrow", "timestamp(0)[]"),
    ("c_varchar_arr_narrow", "varchar(3)[]"),
    ("c_char_arr_narrow", "char(2)[]"),
];

/// A row whose array elements B's narrower element types hold exactly: it
/// arrives, equal (id, then the values of [`NARROW_ARRAY_COLUMNS`]).
pub const NARROW_ARRAY_COLUMNS: &str = "c_ts_arr_narrow, c_varchar_arr_narrow";
pub const NARROW_ARRAY_FITS: &[(i64, &str)] =
    &[(49, "'{\"2024-02-29 13:14:15\",NULL}', '{abc,NULL,\"\"}'")];

/// Rows whose values B's narrower columns hold exactly: they arrive, equal
/// (id, then the values of the columns from `c_ts_narrow` on). The doubles
/// are ones whose shortest texts as float4 and float8 agree, so that
/// `to_jsonb` compares them.
pub const NARROW_FITS: &[(i64, &str)] = &[
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
pub const EXACT_ROWS_MORE: &[&str] = &[
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
pub const EXACT_ROWS: &[(i64, &str)] = &[
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

/// Rows Debezium carries with a documented difference (docs/TYPES.md):
/// (id, column, value in A, the text B must hold for that column; `None`
/// for NULL).
pub const DIFFERENT: &[(i64, &str, &str, Option<&str>)] = &[
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
pub const REFUSED: &[(i64, &str, &str, &str, &str, &str)] = &[
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
    // A bit(8) value is no bit(12) value: never padded (Debezium's Bits
    // length says the source's width, in JSON and in Avro).
    (
        43,
        "c_bit_wide",
        "B'00000101'",
        "bit(12)",
        "schema_mismatch",
        "io.debezium.data.Bits values of length 8",
    ),
    (
        44,
        "c_varbit_wide",
        "B'10000001'",
        "bit varying(4)",
        "schema_mismatch",
        "io.debezium.data.Bits values of length 8",
    ),
    // An array element B's element type would round, or cut.
    (
        45,
        "c_num_arr_narrow",
        "'{1.25,1.234}'",
        "numeric(8,2)[]",
        "schema_mismatch",
        "an element of the array: the value 1.234 has 3 digits after the point, \
         the column keeps 2 (it would be rounded)",
    ),
    (
        46,
        "c_ts_arr_narrow",
        "'{\"2024-02-29 13:14:15\",\"2024-02-29 13:14:15.5\"}'",
        "timestamp(0) without time zone[]",
        "schema_mismatch",
        "an element of the array: the value 2024-02-29 13:14:15.500000 has 1 fractional \
         digits of a second, the column keeps 0 (it would be rounded)",
    ),
    (
        47,
        "c_varchar_arr_narrow",
        "'{abc,abcdef}'",
        "character varying(3)[]",
        "schema_mismatch",
        "an element of the array: a value of 6 characters does not fit",
    ),
    (
        48,
        "c_char_arr_narrow",
        "'{abc}'",
        "character(2)[]",
        "schema_mismatch",
        "an element of the array: a value of 3 characters does not fit",
    ),
];

/// Creates the wide table in both regions (with its enum and domains), and
/// narrows B's [`NARROWER_IN_B`] columns if `narrow_b`.
pub async fn create_table(prefix: &str, narrow_b: bool) -> TestTable {
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
    if narrow_b {
        let narrow: Vec<String> = NARROWER_IN_B
            .iter()
            .map(|(column, pg_type)| format!("ALTER COLUMN {column} TYPE {pg_type}"))
            .collect();
        app_db(&region_b())
            .await
            .batch_execute(&format!("ALTER TABLE public.{name} {}", narrow.join(", ")))
            .await
            .expect("narrow B's columns");
    }
    TestTable { name }
}
