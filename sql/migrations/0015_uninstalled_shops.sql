-- Issue 23 (source document 004): "On uninstall set uninstalled_at; background
-- job can hard-delete or anonymize after retention". `eventpipe shops uninstall`
-- sets uninstalled_at and revokes the keys; `partitions maintain` deletes (or
-- anonymises) the rows of a shop uninstalled longer ago than its
-- data_retention_days, and records it here. A restore of an archived month
-- applies these purges and the erasures (erasure_suppressions) to what it puts back.

-- One row per uninstalled shop whose purge began; finished_at once every table is
-- done. uninstalled_at is the uninstall it answers: a shop installed and
-- uninstalled again is purged again.
CREATE TABLE shop_purges (
  shop_id         UUID PRIMARY KEY REFERENCES shops(id) ON DELETE CASCADE,
  mode            TEXT NOT NULL CHECK (mode IN ('delete', 'anonymize')),
  uninstalled_at  TIMESTAMPTZ NOT NULL,
  started_at      TIMESTAMPTZ NOT NULL DEFAULT now(),
  finished_at     TIMESTAMPTZ,
  rows            JSONB NOT NULL DEFAULT '{}'   -- table -> rows deleted or anonymised
);
REVOKE ALL ON shop_purges FROM PUBLIC;
GRANT SELECT, INSERT, UPDATE ON shop_purges TO eventpipe_partition_admin;

-- maintain reads which shops were uninstalled, and when.
GRANT SELECT (uninstalled_at) ON shops TO eventpipe_partition_admin;
-- A restore applies erasures: it hashes the ids it restores to compare them.
GRANT SELECT ON erasure_suppressions TO eventpipe_partition_admin;
GRANT EXECUTE ON FUNCTION erasure_salt() TO eventpipe_partition_admin;

-- What a restore removed or anonymised on the way back (table -> rows).
ALTER TABLE partition_restores ADD COLUMN privacy_rows JSONB NOT NULL DEFAULT '{}';

-- The pseudonym of an id of shop `shop` in an anonymised shop: 'p:' || 64 hex of
-- sha256(salt, shop, id) || a 16 hex tag of sha256(salt, that hash). The same id gets
-- the same pseudonym in every table (joins survive), another shop's the other one, and
-- without the salt nobody can test a guess. The tag lets eventpipe_is_pseudonym tell a
-- pseudonym from an id a client sent that merely looks like one (so an anonymisation
-- interrupted and run again never skips a real id, nor hashes a pseudonym twice).
DO $$
BEGIN
  EXECUTE format($f$
    CREATE FUNCTION eventpipe_pseudonym(shop uuid, v text) RETURNS text
    LANGUAGE sql STABLE STRICT SECURITY DEFINER
    SET search_path = %1$I, pg_catalog, pg_temp AS $body$
      SELECT 'p:' || h || left(encode(sha256(s.salt || convert_to('tag:' || h, 'UTF8')), 'hex'), 16)
      FROM %1$I.erasure_salt s,
           LATERAL (SELECT encode(sha256(s.salt || convert_to(shop::text || ':' || v, 'UTF8')),
                                  'hex') AS h) x
    $body$
  $f$, current_schema());
  EXECUTE format($f$
    CREATE FUNCTION eventpipe_is_pseudonym(v text) RETURNS boolean
    LANGUAGE sql STABLE STRICT SECURITY DEFINER
    SET search_path = %1$I, pg_catalog, pg_temp AS $body$
      SELECT v ~ '^p:[0-9a-f]{80}$' AND right(v, 16) = left(encode(
               sha256(s.salt || convert_to('tag:' || substr(v, 3, 64), 'UTF8')), 'hex'), 16)
      FROM %1$I.erasure_salt s
    $body$
  $f$, current_schema());
END $$;
-- An oracle for guesses in the wrong hands: the partition admin only.
REVOKE ALL ON FUNCTION eventpipe_pseudonym(uuid, text) FROM PUBLIC;
REVOKE ALL ON FUNCTION eventpipe_is_pseudonym(text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION eventpipe_pseudonym(uuid, text) TO eventpipe_partition_admin;
GRANT EXECUTE ON FUNCTION eventpipe_is_pseudonym(text) TO eventpipe_partition_admin;

-- Free text out of a JSON object: only its top-level numbers and booleans stay (a
-- price, a count, a flag); strings, arrays and objects (names, emails, addresses,
-- a webhook's whole payload) go.
CREATE FUNCTION eventpipe_scrub(j jsonb) RETURNS jsonb
LANGUAGE sql IMMUTABLE AS $$
  SELECT coalesce(jsonb_object_agg(key, value)
                    FILTER (WHERE jsonb_typeof(value) IN ('number', 'boolean')), '{}'::jsonb)
  FROM jsonb_each(CASE WHEN jsonb_typeof(j) = 'object' THEN j ELSE '{}'::jsonb END)
$$;
