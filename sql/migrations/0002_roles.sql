-- Roles and row level security (source documents: an ingest role that only
-- inserts events, a partition admin role for DDL, an analyst role that only
-- reads its own shop's rows).
--
-- The roles are NOLOGIN groups; operators grant them to login users:
--   CREATE ROLE loader LOGIN PASSWORD '...';
--   GRANT eventpipe_ingest, eventpipe_partition_admin TO loader;
--   CREATE ROLE analyst_a LOGIN PASSWORD '...'; GRANT eventpipe_analyst TO analyst_a;
-- An analyst session picks its shop with SET app.current_shop = '<shop uuid>';
-- without it, it sees no row.
--
-- Roles are cluster-wide: created only when missing (several databases of one
-- server, or several migrations at once, may get here).

DO $$
DECLARE
  r text;
BEGIN
  FOREACH r IN ARRAY ARRAY['eventpipe_ingest', 'eventpipe_partition_admin', 'eventpipe_analyst'] LOOP
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = r) THEN
      BEGIN
        EXECUTE format('CREATE ROLE %I NOLOGIN', r);
      EXCEPTION WHEN duplicate_object OR unique_violation THEN
        NULL;  -- created meanwhile by a migration of another database
      END;
    END IF;
  END LOOP;
  -- COPY FROM is refused on a table with row level security unless the role
  -- bypasses it; the ingest role's privileges (INSERT, and SELECT of the dedup
  -- key only) are what confine it, not policies. Only a superuser may grant it.
  IF NOT (SELECT rolbypassrls FROM pg_roles WHERE rolname = 'eventpipe_ingest') THEN
    IF (SELECT rolsuper FROM pg_roles WHERE rolname = current_user) THEN
      ALTER ROLE eventpipe_ingest BYPASSRLS;
    ELSE
      RAISE WARNING 'eventpipe_ingest lacks BYPASSRLS, which COPY into the event tables needs; '
        'a superuser must run: ALTER ROLE eventpipe_ingest BYPASSRLS';
    END IF;
  END IF;
  -- A non-superuser owner must belong to a role to give it its tables.
  IF NOT (SELECT rolsuper FROM pg_roles WHERE rolname = current_user)
     AND NOT pg_has_role(current_user, 'eventpipe_partition_admin', 'MEMBER') THEN
    EXECUTE format('GRANT eventpipe_partition_admin TO %I', current_user);
  END IF;

  EXECUTE format('GRANT USAGE ON SCHEMA %I TO eventpipe_ingest, eventpipe_partition_admin, '
                 'eventpipe_analyst', current_schema());
  EXECUTE format('GRANT CREATE ON SCHEMA %I TO eventpipe_partition_admin', current_schema());
  -- TEMPORARY: the loaders' staging table for batches that meet duplicates.
  EXECUTE format('GRANT CONNECT, TEMPORARY ON DATABASE %I TO eventpipe_ingest', current_database());
  EXECUTE format('GRANT CONNECT ON DATABASE %I TO eventpipe_partition_admin, eventpipe_analyst',
                 current_database());
END $$;

-- Bookkeeping the loaders write in their batch transaction.
GRANT SELECT, INSERT, UPDATE ON loader_offsets TO eventpipe_ingest;
GRANT INSERT ON dead_letters TO eventpipe_ingest;
GRANT USAGE ON SEQUENCE dead_letters_id_seq TO eventpipe_ingest;
-- Loaders read policies to create a missing month on demand.
GRANT SELECT ON partition_policies TO eventpipe_ingest;
-- Sessions are folded in by INSERT ... ON CONFLICT DO UPDATE, which reads the row.
GRANT SELECT, INSERT, UPDATE ON user_sessions TO eventpipe_ingest;

GRANT SELECT, INSERT, UPDATE ON partition_policies TO eventpipe_partition_admin;
-- Per-shop retention reads shops' data_retention_days.
GRANT SELECT (id, settings) ON shops TO eventpipe_partition_admin;

GRANT SELECT ON user_sessions TO eventpipe_analyst;
GRANT SELECT (id, domain, plan, installed_at, uninstalled_at) ON shops TO eventpipe_analyst;

-- The event tables and every partition they already have. The partition admin
-- owns them (ATTACH, DETACH and DROP of partitions need ownership of the
-- parent; as owner it also deletes for per-shop retention and bypasses row
-- level security). The ingest role may INSERT, and SELECT only the dedup key
-- (event_id, event time) that INSERT ... ON CONFLICT DO NOTHING RETURNING of
-- the staging path reads back: never the content. Partitions made later copy
-- all of this from their parent (ingest/partitions.py).
DO $$
DECLARE
  parent record;
  t regclass;
BEGIN
  FOR parent IN
    SELECT * FROM (VALUES ('behavior_events'::regclass, 'timestamp'), ('events'::regclass, 'ts'))
      AS p(rel, time_column)
  LOOP
    FOR t IN
      SELECT parent.rel
      UNION ALL
      SELECT inhrelid::regclass FROM pg_inherits WHERE inhparent = parent.rel
    LOOP
      EXECUTE format('ALTER TABLE %s OWNER TO eventpipe_partition_admin', t);
      EXECUTE format('GRANT INSERT ON %s TO eventpipe_ingest', t);
      EXECUTE format('GRANT SELECT (event_id, %I) ON %s TO eventpipe_ingest',
                     parent.time_column, t);
      EXECUTE format('GRANT SELECT ON %s TO eventpipe_analyst', t);
      EXECUTE format('ALTER TABLE %s ENABLE ROW LEVEL SECURITY', t);
      EXECUTE format('CREATE POLICY analyst_own_shop ON %s FOR SELECT TO eventpipe_analyst '
                     'USING (shop_id = nullif(current_setting(''app.current_shop'', true), '''')::uuid)', t);
      EXECUTE format('CREATE POLICY ingest_insert ON %s FOR INSERT TO eventpipe_ingest '
                     'WITH CHECK (true)', t);
      -- Only the dedup key columns are granted: what RETURNING reads back.
      EXECUTE format('CREATE POLICY ingest_returning ON %s FOR SELECT TO eventpipe_ingest '
                     'USING (true)', t);
      EXECUTE format('CREATE POLICY partition_admin_all ON %s TO eventpipe_partition_admin '
                     'USING (true) WITH CHECK (true)', t);
    END LOOP;
  END LOOP;
END $$;

ALTER TABLE user_sessions ENABLE ROW LEVEL SECURITY;
CREATE POLICY analyst_own_shop ON user_sessions FOR SELECT TO eventpipe_analyst
  USING (shop_id = nullif(current_setting('app.current_shop', true), '')::uuid);
CREATE POLICY ingest_insert ON user_sessions FOR INSERT TO eventpipe_ingest WITH CHECK (true);
CREATE POLICY ingest_update ON user_sessions FOR UPDATE TO eventpipe_ingest
  USING (true) WITH CHECK (true);
CREATE POLICY ingest_select ON user_sessions FOR SELECT TO eventpipe_ingest USING (true);

ALTER TABLE shops ENABLE ROW LEVEL SECURITY;
CREATE POLICY analyst_own_shop ON shops FOR SELECT TO eventpipe_analyst
  USING (id = nullif(current_setting('app.current_shop', true), '')::uuid);
CREATE POLICY partition_admin_read ON shops FOR SELECT TO eventpipe_partition_admin
  USING (true);
