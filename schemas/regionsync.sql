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

-- Deleted rows' last versions, so a late older update cannot resurrect them.
CREATE TABLE IF NOT EXISTS regionsync.tombstones (
    table_name    text        NOT NULL,
    row_key       text        NOT NULL,
    hlc           bigint      NOT NULL,
    origin_region text        NOT NULL,
    deleted_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (table_name, row_key)
);

-- One row per region, touched every few seconds by that region's Debezium
-- (heartbeat.action.query) so that an idle pipeline still carries a fresh
-- source commit time to the other regions (DESIGN.md §5).
CREATE TABLE IF NOT EXISTS regionsync.heartbeat (
    region  text        PRIMARY KEY,
    beat_at timestamptz NOT NULL
);
ALTER TABLE regionsync.heartbeat REPLICA IDENTITY FULL;

-- HLC stamping of local writes (DESIGN.md §4): hlc = wall milliseconds << 16,
-- and never below the stored version + 1, so a local write after a replicated
-- one is ordered after it whatever the clock skew. The applier runs with
-- session_replication_role = replica, so this trigger does not re-stamp rows
-- it writes.
CREATE OR REPLACE FUNCTION regionsync.stamp_hlc() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    wall bigint := (floor(extract(epoch FROM clock_timestamp()) * 1000)::bigint) << 16;
BEGIN
    IF TG_OP = 'UPDATE' THEN
        NEW.hlc := greatest(wall, OLD.hlc + 1);
    ELSE
        NEW.hlc := wall;
    END IF;
    NEW.origin_region := current_setting('regionsync.region');
    RETURN NEW;
END
$$;
