-- Issue 18, points 1 and 7: which shops an analyst sees is a fact the
-- database holds; the collector gets a role of its own.
--
-- 1. Until now the analyst policies compared shop_id with
--    current_setting('app.current_shop'), which any session sets to any shop
--    id. Now a login role reads the shops granted to it in analyst_shops
--    (`eventpipe analysts grant|revoke|list`), or to a role whose privileges
--    it has (pg_has_role ... 'USAGE': a member inherits its group's shops, and
--    after SET ROLE has that role's own; SET ROLE only reaches roles the
--    login is a member of, so nothing more than PostgreSQL grants it).
--    app.current_shop still narrows to one of those shops; it can't widen:
--    unset or empty means every shop granted, another value means that shop
--    if granted, else none.
--
--    Analysts can neither read nor write analyst_shops: the policies call
--    analyst_shop_ids(current_user), SECURITY DEFINER with a fixed search_path
--    (pg_temp last, so a temporary table can't stand in for analyst_shops),
--    which refuses to answer for a role the session user may not become. The
--    call sits in a sub-select, so it runs once per query, not once per row.
--
-- 7. eventpipe_collector: SELECT of the shop columns the collector's lookups
--    read (shop_by_write_key, shop_by_domain), settings for per-shop options,
--    webhook_secret (it verifies the webhooks' HMAC with it), and
--    shop_write_keys (public keys). Nothing else: no event table, no write.

CREATE TABLE analyst_shops (
  -- The role's oid, not its name: a role dropped and created again under the
  -- same name does not inherit the old one's shops.
  role_id     OID NOT NULL,
  shop_id     UUID NOT NULL REFERENCES shops(id) ON DELETE CASCADE,
  granted_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
  PRIMARY KEY (role_id, shop_id)
);
CREATE INDEX idx_analyst_shops_shop ON analyst_shops(shop_id);
-- No grant and no policy: only the owner (and so analyst_shop_ids) reads it.
REVOKE ALL ON analyst_shops FROM PUBLIC;
ALTER TABLE analyst_shops ENABLE ROW LEVEL SECURITY;

DO $$
BEGIN
  EXECUTE format($f$
    CREATE FUNCTION analyst_shop_ids(who name) RETURNS uuid[]
    LANGUAGE plpgsql STABLE SECURITY DEFINER
    SET search_path = %1$I, pg_catalog, pg_temp AS $body$
    DECLARE
      narrow text := nullif(current_setting('app.current_shop', true), '');
    BEGIN
      -- Only about a role this session could become anyway (its own, one it
      -- may SET ROLE to): nobody learns another role's shops.
      IF NOT pg_catalog.pg_has_role(session_user, who, 'MEMBER') THEN
        RAISE EXCEPTION 'permission denied: %% may not act as role %%', session_user, who
          USING ERRCODE = 'insufficient_privilege';
      END IF;
      RETURN (
        SELECT coalesce(array_agg(DISTINCT m.shop_id), '{}')
        FROM %1$I.analyst_shops m
        JOIN pg_catalog.pg_roles r ON r.oid = m.role_id
        WHERE pg_catalog.pg_has_role(who, r.oid, 'USAGE')
          -- compared as text: a malformed setting narrows to nothing, no error
          AND (narrow IS NULL OR m.shop_id::text = pg_catalog.lower(narrow))
      );
    END
    $body$
  $f$, current_schema());
END $$;
REVOKE ALL ON FUNCTION analyst_shop_ids(name) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION analyst_shop_ids(name) TO eventpipe_analyst;

-- Every analyst policy of the schema: the parents, their partitions, and
-- tables detached from them (still readable by analysts). Partitions made or
-- restored later copy the parent's policy text (ingest/partitions).
DO $$
DECLARE
  p record;
BEGIN
  FOR p IN
    SELECT tablename FROM pg_policies
    WHERE schemaname = current_schema() AND policyname = 'analyst_own_shop'
  LOOP
    EXECUTE format(
      'ALTER POLICY analyst_own_shop ON %I USING (%I = ANY ((SELECT analyst_shop_ids(current_user))::uuid[]))',
      p.tablename, CASE WHEN p.tablename = 'shops' THEN 'id' ELSE 'shop_id' END);
  END LOOP;
END $$;

-- The collector's role (cluster-wide, created once like those of 0002_roles).
DO $$
BEGIN
  IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'eventpipe_collector') THEN
    BEGIN
      CREATE ROLE eventpipe_collector NOLOGIN;
    EXCEPTION WHEN duplicate_object OR unique_violation THEN
      NULL;  -- created meanwhile by a migration of another database
    END;
  END IF;
  EXECUTE format('GRANT USAGE ON SCHEMA %I TO eventpipe_collector', current_schema());
  EXECUTE format('GRANT CONNECT ON DATABASE %I TO eventpipe_collector', current_database());
END $$;

GRANT SELECT (id, domain, allowed_origins, settings, uninstalled_at, webhook_secret)
  ON shops TO eventpipe_collector;
GRANT SELECT ON shop_write_keys TO eventpipe_collector;
-- shops has row level security: the collector resolves every shop's keys.
CREATE POLICY collector_read ON shops FOR SELECT TO eventpipe_collector USING (true);
