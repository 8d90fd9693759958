-- Issue 23: erasure of a visitor (`eventpipe erase`), its record, and the
-- suppression list the loaders consult so that events still on their way
-- (Kafka, a collector's spool, a replayed dead letter) never land afterwards.
--
-- No erased id is kept in clear: each is an HMAC-SHA256 under a per-install
-- secret salt (erasure_salt), so a repeat request is recognised while whoever
-- reads erasure_requests (operators' exports, backups of that table) cannot
-- test guesses without the salt. Only the owner reads the salt table; the
-- loaders, which must hash what they read to compare, get it through the
-- SECURITY DEFINER function erasure_salt() (they see those ids in clear in
-- the records anyway).

CREATE TABLE erasure_salt (
  singleton  BOOLEAN PRIMARY KEY DEFAULT true CHECK (singleton),
  -- 2 x 122 random bits from gen_random_uuid (pg_strong_random; no pgcrypto).
  salt       BYTEA NOT NULL DEFAULT uuid_send(gen_random_uuid()) || uuid_send(gen_random_uuid()),
  created_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
INSERT INTO erasure_salt DEFAULT VALUES;
REVOKE ALL ON erasure_salt FROM PUBLIC;

DO $$
BEGIN
  EXECUTE format($f$
    CREATE FUNCTION erasure_salt() RETURNS bytea
    LANGUAGE sql STABLE SECURITY DEFINER
    SET search_path = %1$I, pg_catalog, pg_temp AS $body$
      SELECT salt FROM %1$I.erasure_salt
    $body$
  $f$, current_schema());
END $$;
REVOKE ALL ON FUNCTION erasure_salt() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION erasure_salt() TO eventpipe_ingest;

CREATE TABLE erasure_requests (
  id            BIGSERIAL PRIMARY KEY,
  requested_by  TEXT NOT NULL DEFAULT current_user,
  requested_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
  shop_id       UUID NOT NULL,
  shop_domain   TEXT NOT NULL,
  id_kinds      TEXT[] NOT NULL,          -- e.g. {anon_id,session_id}, one per id given
  id_hashes     BYTEA[] NOT NULL,         -- HMAC of each id given, same order
  rows_removed  JSONB NOT NULL DEFAULT '{}',  -- table -> rows deleted
  finished_at   TIMESTAMPTZ
);
CREATE INDEX idx_erasure_requests_shop ON erasure_requests(shop_id, requested_at);

-- Who and when are the server's, not the client's.
CREATE FUNCTION erasure_requests_stamp() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  NEW.requested_by := current_user;
  NEW.requested_at := now();
  RETURN NEW;
END $$;
CREATE TRIGGER erasure_requests_stamp BEFORE INSERT ON erasure_requests
  FOR EACH ROW EXECUTE FUNCTION erasure_requests_stamp();

-- What the loaders drop: (shop, HMAC of kind and id). Written by erase before it
-- deletes, so nothing loaded meanwhile escapes.
CREATE TABLE erasure_suppressions (
  shop_id     UUID NOT NULL,
  id_hash     BYTEA NOT NULL,
  request_id  BIGINT NOT NULL REFERENCES erasure_requests(id),
  created_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
  PRIMARY KEY (shop_id, id_hash)
);
GRANT SELECT ON erasure_suppressions TO eventpipe_ingest;

-- A dead letter's raw bytes as jsonb, or NULL when they are not UTF-8 JSON
-- (dead letters are often exactly that): erase matches on decoded ids.
CREATE FUNCTION eventpipe_try_jsonb(raw bytea) RETURNS jsonb
LANGUAGE plpgsql IMMUTABLE AS $$
BEGIN
  RETURN convert_from(raw, 'UTF8')::jsonb;
EXCEPTION WHEN others THEN
  RETURN NULL;
END $$;
