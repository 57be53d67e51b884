-- The regionsync schema: what the worker and the source connectors need in
-- every regional database. Idempotent: safe to apply again.
-- Applied by the local stack (deploy/local/stack.sh); `regionsync setup`
-- will apply the same file.
--
-- The database's region name is set once per database, e.g.
--   ALTER DATABASE app SET regionsync.region = 'us-east-1';
-- The HLC trigger stamps it into origin_region on every local write.

CREATE SCHEMA IF NOT EXISTS regionsync;

-- Where each partition of each mirrored topic has been applied up to, written
-- in the same transaction as the rows of each batch (DESIGN.md §2).
CREATE TABLE IF NOT EXISTS regionsync.offsets (
    consumer_group text        NOT NULL,
    topic          text        NOT NULL,
    partition      integer     NOT NULL,
    next_offset    bigint      NOT NULL,
    updated_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer_group, topic, partition)
);
-- Newest source commit time (ms) applied from the partition: lag carries on
-- from it after a restart.
ALTER TABLE regionsync.offsets ADD COLUMN IF NOT EXISTS source_ts_ms bigint;

-- Deleted rows' last versions, so a late older update cannot resurrect them.
CREATE TABLE IF NOT EXISTS regionsync.tombstones (
    table_name    text        NOT NULL,
    row_key       text        NOT NULL,
    hlc           bigint      NOT NULL,
    origin_region text        NOT NULL,
    deleted_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (table_name, row_key)
);
-- The worker's collector finds the tombstones past the grace by delete time,
-- every minute. Without this index that read the whole table each time
-- (280 ms for 2,000,000 tombstones, none due); with it, 0.1 ms.
CREATE INDEX IF NOT EXISTS tombstones_deleted_at ON regionsync.tombstones (deleted_at);

-- The newest truncate of each table: rows (and late changes) with an older
-- HLC are gone. Kept apart from the per-key tombstones so no key can collide
-- with it.
CREATE TABLE IF NOT EXISTS regionsync.truncations (
    table_name    text        PRIMARY KEY,
    hlc           bigint      NOT NULL,
    origin_region text        NOT NULL,
    truncated_at  timestamptz NOT NULL DEFAULT now()
);

-- Every column each replicated table has had in this region, recorded by
-- the worker whenever it reads the table's layout (docs/SCHEMA-CHANGES.md).
-- A source column the target lacks but once had was dropped here: it is
-- ignored; or renamed here (the same table's column number now has another
-- name): its values go to the renamed column. One it never had is new
-- upstream: its partition is held until the column is added here, so no
-- value is lost.
CREATE TABLE IF NOT EXISTS regionsync.known_columns (
    table_name  text        NOT NULL,
    column_name text        NOT NULL,
    table_oid   oid         NOT NULL,
    attnum      smallint    NOT NULL,
    first_seen  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (table_name, column_name)
);

-- Concurrent writes and held cross-region writes (DESIGN.md §3, §4), with
-- both versions: the one stored here (NULL row: deleted here) and the remote
-- one (NULL row: a delete). resolution: remote_won / local_kept (lww,
-- settled at once), rejected (reject: settled once the home row is written
-- again), open (manual, until `regionsync conflicts resolve`), kept_local /
-- kept_remote (resolved by an operator). One remote version of a key is
-- recorded once, however often its topic is replayed.
CREATE TABLE IF NOT EXISTS regionsync.conflicts (
    id            bigserial   PRIMARY KEY,
    table_name    text        NOT NULL,
    row_key       text        NOT NULL,
    kind          text        NOT NULL,
    policy        text        NOT NULL,
    local_hlc     bigint,
    local_origin  text,
    local_row     jsonb,
    remote_hlc    bigint      NOT NULL,
    remote_origin text        NOT NULL,
    remote_row    jsonb,
    resolution    text        NOT NULL,
    detected_at   timestamptz NOT NULL DEFAULT now(),
    resolved_at   timestamptz,
    UNIQUE (table_name, row_key, remote_hlc, remote_origin)
);
CREATE INDEX IF NOT EXISTS conflicts_pending
    ON regionsync.conflicts (id) WHERE resolved_at IS NULL;
-- The worker deletes resolved conflicts after `conflicts.retention`.
CREATE INDEX IF NOT EXISTS conflicts_resolved
    ON regionsync.conflicts (resolved_at) WHERE resolved_at IS NOT NULL;

-- Failover homing (DESIGN.md §3): while `region` is failed over, the rows
-- homed there are homed in `acting_home`, for every write whose source commit
-- time (ms) is in [from_ms, until_ms) (until_ms NULL: not back yet). Written
-- by `regionsync rehome` with the same rows in every reachable region, read
-- by the worker in each batch's transaction and by `regionsync route`.
CREATE TABLE IF NOT EXISTS regionsync.homing (
    region      text        NOT NULL,
    acting_home text        NOT NULL,
    from_ms     bigint      NOT NULL,
    until_ms    bigint,
    epoch       bigint      NOT NULL,
    changed_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (region, from_ms),
    CHECK (until_ms IS NULL OR until_ms >= from_ms),
    CHECK (region <> acting_home)
);

-- One row per region, touched every few seconds by that region's Debezium
-- (heartbeat.action.query) so that an idle pipeline still carries a fresh
-- source commit time to the other regions (DESIGN.md §5), and the newest
-- homing epoch of this database (max(regionsync.homing.epoch), 0 without
-- windows) for the other regions' homing fence (DESIGN.md §3).
CREATE TABLE IF NOT EXISTS regionsync.heartbeat (
    region  text        PRIMARY KEY,
    beat_at timestamptz NOT NULL
);
ALTER TABLE regionsync.heartbeat REPLICA IDENTITY FULL;
-- Added after the table's first release: existing deployments gain it here.
ALTER TABLE regionsync.heartbeat ADD COLUMN IF NOT EXISTS homing_epoch bigint;

-- HLC stamping of local writes (DESIGN.md §4): hlc = wall milliseconds << 16,
-- and never below what the row (or its tombstone) had + 1, so a local write
-- after a replicated one, or after a delete, is ordered after it whatever
-- the clock skew. The applier runs with session_replication_role = replica,
-- so these triggers do not fire for the rows it writes.
--
-- Install on a replicated table, naming its key columns:
--   CREATE TRIGGER regionsync_stamp_hlc BEFORE INSERT OR UPDATE ON t
--       FOR EACH ROW EXECUTE FUNCTION regionsync.stamp_hlc('id');
--   CREATE TRIGGER regionsync_mark_deleted AFTER DELETE ON t
--       FOR EACH ROW EXECUTE FUNCTION regionsync.mark_deleted('id');
--   CREATE TRIGGER regionsync_mark_truncated AFTER TRUNCATE ON t
--       FOR EACH STATEMENT EXECUTE FUNCTION regionsync.mark_truncated();

-- The key of a row as text, as regionsync writes it into tombstones.row_key:
-- the value's text for a one-column key, else a JSON array of the texts.
-- (Trigger arguments arrive as an array indexed from 0.)
CREATE OR REPLACE FUNCTION regionsync.row_key(r jsonb, cols text[]) RETURNS text
LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE WHEN cardinality(cols) = 1 THEN r ->> cols[array_lower(cols, 1)]
                ELSE (SELECT jsonb_agg(r ->> c ORDER BY o) FROM unnest(cols) WITH ORDINALITY u(c, o))::text
           END
$$;

-- The version right after `h` (NULL for NULL), held at the largest bigint:
-- a row at i64::MAX (a clock far ahead, or a value written by hand) stays
-- updatable instead of failing with "bigint out of range".
CREATE OR REPLACE FUNCTION regionsync.hlc_after(h bigint) RETURNS bigint
LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE WHEN h < 9223372036854775807 THEN h + 1 ELSE h END
$$;

CREATE OR REPLACE FUNCTION regionsync.stamp_hlc() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, regionsync AS $$
DECLARE
    -- regionsync.clock_offset_ms shifts this database's (or session's) HLC
    -- source, to test clock skew; unset it is 0.
    wall bigint := (floor(extract(epoch FROM clock_timestamp()) * 1000)::bigint
                    + coalesce(nullif(current_setting('regionsync.clock_offset_ms', true), '')::bigint, 0)) << 16;
    deleted bigint;
BEGIN
    IF TG_OP = 'UPDATE' THEN
        NEW.hlc := greatest(wall, regionsync.hlc_after(OLD.hlc));
    ELSE
        -- TG_TABLE_SCHEMA and TG_TABLE_NAME are of type name, collation
        -- "C": without the COLLATE the comparison cannot use the primary
        -- key's first column, and every insert scans all tombstones.
        SELECT t.hlc INTO deleted FROM regionsync.tombstones t
         WHERE t.table_name = (TG_TABLE_SCHEMA || '.' || TG_TABLE_NAME) COLLATE "default"
           AND t.row_key = regionsync.row_key(to_jsonb(NEW), TG_ARGV::text[]);
        NEW.hlc := greatest(wall, coalesce(regionsync.hlc_after(deleted), 0));
    END IF;
    NEW.origin_region := current_setting('regionsync.region');
    RETURN NEW;
END
$$;

-- A local delete leaves a tombstone one step after the deleted version: the
-- version every region gives the delete (its `before` image's hlc + 1), so
-- that a later local insert of the key is ordered after it.
CREATE OR REPLACE FUNCTION regionsync.mark_deleted() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, regionsync AS $$
BEGIN
    INSERT INTO regionsync.tombstones AS ts (table_name, row_key, hlc, origin_region)
    VALUES (TG_TABLE_SCHEMA || '.' || TG_TABLE_NAME,
            regionsync.row_key(to_jsonb(OLD), TG_ARGV::text[]),
            regionsync.hlc_after(OLD.hlc), current_setting('regionsync.region'))
    ON CONFLICT (table_name, row_key) DO UPDATE
       SET hlc = EXCLUDED.hlc, origin_region = EXCLUDED.origin_region, deleted_at = now()
     WHERE (ts.hlc, ts.origin_region COLLATE "C") < (EXCLUDED.hlc, EXCLUDED.origin_region COLLATE "C");
    RETURN OLD;
END
$$;

-- A local TRUNCATE leaves a table-wide mark, so a late change from another
-- region that is older than the truncate cannot bring a row back here (the
-- applier checks regionsync.truncations as it checks tombstones).
CREATE OR REPLACE FUNCTION regionsync.mark_truncated() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, regionsync AS $$
BEGIN
    INSERT INTO regionsync.truncations AS tr (table_name, hlc, origin_region)
    VALUES (TG_TABLE_SCHEMA || '.' || TG_TABLE_NAME,
            (floor(extract(epoch FROM clock_timestamp()) * 1000)::bigint) << 16,
            current_setting('regionsync.region'))
    ON CONFLICT (table_name) DO UPDATE
       SET hlc = EXCLUDED.hlc, origin_region = EXCLUDED.origin_region, truncated_at = now()
     WHERE tr.hlc < EXCLUDED.hlc;
    RETURN NULL;
END
$$;

-- CRDT counters (DESIGN.md §4). A counter column (e.g. likes) has a jsonb
-- companion (e.g. likes_parts) holding one component per region,
-- {"us-east-1": [increments, decrements], ...}; the visible column is the
-- sum of increments minus decrements. A local write changes only the local
-- region's component (by the change of the visible value); the applier
-- merges a replicated row's components into the stored ones, the larger of
-- each per region, whatever the row's version. So concurrent increments in
-- several regions all count, in every region.
--
-- Install on a table, naming counter and companion column pairs:
--   CREATE TRIGGER regionsync_count_by_region BEFORE INSERT OR UPDATE ON t
--       FOR EACH ROW EXECUTE FUNCTION regionsync.count_by_region('likes', 'likes_parts');
-- and declare them in the worker's config: counters = { likes = "likes_parts" }.

CREATE OR REPLACE FUNCTION regionsync.counter_merge(a jsonb, b jsonb) RETURNS jsonb
LANGUAGE sql IMMUTABLE AS $$
    SELECT coalesce(jsonb_object_agg(r, jsonb_build_array(greatest(pa, pb), greatest(na, nb))), '{}'::jsonb)
      FROM (SELECT coalesce(x.key, y.key) AS r,
                   coalesce((x.value ->> 0)::bigint, 0) AS pa, coalesce((y.value ->> 0)::bigint, 0) AS pb,
                   coalesce((x.value ->> 1)::bigint, 0) AS na, coalesce((y.value ->> 1)::bigint, 0) AS nb
              FROM jsonb_each(coalesce(a, '{}'::jsonb)) x
              FULL JOIN jsonb_each(coalesce(b, '{}'::jsonb)) y ON x.key = y.key) m
$$;

CREATE OR REPLACE FUNCTION regionsync.counter_value(parts jsonb) RETURNS bigint
LANGUAGE sql IMMUTABLE AS $$
    SELECT coalesce(sum((v ->> 0)::bigint - (v ->> 1)::bigint), 0)::bigint
      FROM jsonb_each(coalesce(parts, '{}'::jsonb)) e(k, v)
$$;

CREATE OR REPLACE FUNCTION regionsync.count_by_region() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, regionsync AS $$
DECLARE
    region text := current_setting('regionsync.region');
    new_row jsonb := to_jsonb(NEW);
    old_row jsonb := CASE WHEN TG_OP = 'UPDATE' THEN to_jsonb(OLD) ELSE '{}'::jsonb END;
    i int := 0;
    counter text;
    companion text;
    parts jsonb;
    delta bigint;
    up bigint;
    down bigint;
BEGIN
    WHILE i + 1 < TG_NARGS LOOP
        counter := TG_ARGV[i];
        companion := TG_ARGV[i + 1];
        -- The stored components; the application only moves the visible value.
        parts := coalesce(old_row -> companion, '{}'::jsonb);
        IF jsonb_typeof(parts) <> 'object' THEN
            parts := '{}'::jsonb;
        END IF;
        delta := coalesce((new_row ->> counter)::bigint, 0)
               - coalesce((old_row ->> counter)::bigint, 0);
        up := coalesce((parts -> region ->> 0)::bigint, 0);
        down := coalesce((parts -> region ->> 1)::bigint, 0);
        IF delta > 0 THEN
            up := up + delta;
        ELSE
            down := down - delta;
        END IF;
        parts := jsonb_set(parts, ARRAY[region], jsonb_build_array(up, down));
        new_row := jsonb_set(new_row, ARRAY[companion], parts);
        new_row := jsonb_set(new_row, ARRAY[counter], to_jsonb(counter_value(parts)));
        i := i + 2;
    END LOOP;
    NEW := jsonb_populate_record(NEW, new_row);
    RETURN NEW;
END
$$;
