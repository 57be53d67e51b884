-- The example application schema used by the demo and the tests, applied to
-- every region. Together the two tables cover the column types regionsync
-- must carry. Every replicated table has the hlc and origin_region columns of
-- DESIGN.md §4 and REPLICA IDENTITY FULL (full `before` images).
-- Apply after schemas/regionsync.sql (it uses regionsync.stamp_hlc).

DO $$ BEGIN
    CREATE TYPE public.user_status AS ENUM ('active', 'suspended', 'closed');
EXCEPTION WHEN duplicate_object THEN NULL;
END $$;

-- Affinity key: id.
CREATE TABLE IF NOT EXISTS public.users (
    id            bigint PRIMARY KEY,
    email         varchar(320) NOT NULL,
    display_name  text,
    status        public.user_status NOT NULL DEFAULT 'active',
    age           integer,
    balance       numeric(12, 2),          -- numeric with scale
    lifetime      numeric,                 -- numeric without scale
    score         double precision,
    verified      boolean,
    external_id   uuid,
    profile       jsonb,
    tags          text[],
    avatar        bytea,
    bio           text,                    -- large enough to be TOASTed
    birth_date    date,
    last_login    timestamp,
    created_at    timestamptz NOT NULL DEFAULT now(),
    home_region   text,                    -- explicit pin (residency), else hashed
    hlc           bigint NOT NULL DEFAULT 0,
    origin_region text   NOT NULL DEFAULT ''
);
ALTER TABLE public.users REPLICA IDENTITY FULL;

-- Affinity key: user_id.
CREATE TABLE IF NOT EXISTS public.orders (
    id            bigint PRIMARY KEY,
    user_id       bigint NOT NULL,
    quantity      integer NOT NULL,
    amount        numeric(12, 2) NOT NULL,
    currency      varchar(3) NOT NULL,
    note          text,
    placed_at     timestamptz NOT NULL DEFAULT now(),
    hlc           bigint NOT NULL DEFAULT 0,
    origin_region text   NOT NULL DEFAULT ''
);
ALTER TABLE public.orders REPLICA IDENTITY FULL;

CREATE OR REPLACE TRIGGER regionsync_stamp_hlc BEFORE INSERT OR UPDATE ON public.users
    FOR EACH ROW EXECUTE FUNCTION regionsync.stamp_hlc('id');
CREATE OR REPLACE TRIGGER regionsync_mark_deleted AFTER DELETE ON public.users
    FOR EACH ROW EXECUTE FUNCTION regionsync.mark_deleted('id');
CREATE OR REPLACE TRIGGER regionsync_mark_truncated AFTER TRUNCATE ON public.users
    FOR EACH STATEMENT EXECUTE FUNCTION regionsync.mark_truncated();
CREATE OR REPLACE TRIGGER regionsync_stamp_hlc BEFORE INSERT OR UPDATE ON public.orders
    FOR EACH ROW EXECUTE FUNCTION regionsync.stamp_hlc('id');
CREATE OR REPLACE TRIGGER regionsync_mark_deleted AFTER DELETE ON public.orders
    FOR EACH ROW EXECUTE FUNCTION regionsync.mark_deleted('id');
CREATE OR REPLACE TRIGGER regionsync_mark_truncated AFTER TRUNCATE ON public.orders
    FOR EACH STATEMENT EXECUTE FUNCTION regionsync.mark_truncated();
