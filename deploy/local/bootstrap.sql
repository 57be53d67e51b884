-- Roles, publication and grants of one region's database in the local stack.
-- Run by stack.sh as the superuser against database `app`, after
-- schemas/regionsync.sql and schemas/app.sql. Idempotent.
-- psql variables: region, app_password, debezium_password, regionsync_password.

SELECT format('ALTER DATABASE app SET regionsync.region = %L', :'region') \gexec
SET regionsync.region = :'region';

DO $$ BEGIN
    CREATE ROLE app LOGIN;
EXCEPTION WHEN duplicate_object THEN NULL;
END $$;
DO $$ BEGIN
    CREATE ROLE debezium LOGIN REPLICATION;
EXCEPTION WHEN duplicate_object THEN NULL;
END $$;
DO $$ BEGIN
    CREATE ROLE regionsync LOGIN;
EXCEPTION WHEN duplicate_object THEN NULL;
END $$;
ALTER ROLE app PASSWORD :'app_password';
ALTER ROLE debezium PASSWORD :'debezium_password';
ALTER ROLE regionsync PASSWORD :'regionsync_password';

-- Contrib types the applications may use (docs/TYPES.md). Created before
-- the connectors start: Debezium looks up hstore's, ltree's and citext's
-- type ids once, when its task starts, and treats them as unknown types
-- (leaving such columns out of its events) if they did not exist then.
CREATE EXTENSION IF NOT EXISTS hstore SCHEMA public;
CREATE EXTENSION IF NOT EXISTS ltree SCHEMA public;
CREATE EXTENSION IF NOT EXISTS citext SCHEMA public;

-- Debezium: read the captured tables (snapshot) and write its heartbeat row.
GRANT USAGE ON SCHEMA public, regionsync TO debezium;
GRANT SELECT ON ALL TABLES IN SCHEMA public TO debezium;
ALTER DEFAULT PRIVILEGES FOR ROLE app IN SCHEMA public GRANT SELECT ON TABLES TO debezium;
ALTER DEFAULT PRIVILEGES FOR ROLE postgres IN SCHEMA public GRANT SELECT ON TABLES TO debezium;
GRANT SELECT, INSERT, UPDATE ON regionsync.heartbeat TO debezium;
-- Its heartbeat carries this database's newest homing epoch (the homing fence).
GRANT SELECT ON regionsync.homing TO debezium;

-- The regionsync worker: write the replicated tables and its own schema, and
-- apply with session_replication_role = replica (PostgreSQL 15+ grant).
GRANT USAGE ON SCHEMA public TO regionsync;
GRANT ALL ON SCHEMA regionsync TO regionsync;
GRANT ALL ON ALL TABLES IN SCHEMA regionsync TO regionsync;
GRANT ALL ON ALL SEQUENCES IN SCHEMA regionsync TO regionsync;
GRANT SELECT, INSERT, UPDATE, DELETE, TRUNCATE ON ALL TABLES IN SCHEMA public TO regionsync;
ALTER DEFAULT PRIVILEGES FOR ROLE app IN SCHEMA public
    GRANT SELECT, INSERT, UPDATE, DELETE, TRUNCATE, TRIGGER ON TABLES TO regionsync;
ALTER DEFAULT PRIVILEGES FOR ROLE postgres IN SCHEMA public
    GRANT SELECT, INSERT, UPDATE, DELETE, TRUNCATE, TRIGGER ON TABLES TO regionsync;
GRANT SET ON PARAMETER session_replication_role TO regionsync;
-- Each apply session runs under a replication origin of its own, so this
-- region's Debezium marks the changes the worker applies (source.origin).
GRANT EXECUTE ON FUNCTION pg_replication_origin_create(text),
    pg_replication_origin_oid(text), pg_replication_origin_session_setup(text),
    pg_replication_origin_xact_reset() TO regionsync;

-- The application owns its tables (tests create theirs as `app` too).
ALTER TABLE public.users OWNER TO app;
ALTER TABLE public.orders OWNER TO app;
GRANT CREATE ON SCHEMA public TO app;
GRANT USAGE ON SCHEMA regionsync TO app;

-- Every table of schema public, present and future, plus the heartbeat table,
-- is published for Debezium (publication.autocreate.mode=disabled).
DO $$ BEGIN
    CREATE PUBLICATION regionsync_cdc FOR TABLE regionsync.heartbeat, TABLES IN SCHEMA public;
EXCEPTION WHEN duplicate_object THEN NULL;
END $$;
