-- Issue 24: the rollups' watermark follows load order, not received_at; funnels.
--
-- Why not received_at (0012): it is stamped by the collector, so a row
-- received long ago and loaded now (a spool drained after a broker outage, a
-- dead letter replayed) sorts before a watermark that has already moved past
-- it, and an incremental refresh never sees it. Nor a loaded_at DEFAULT now():
-- now() is the loader transaction's START, and that transaction commits later;
-- a refresh whose snapshot is taken in between moves its watermark past a row
-- it cannot see yet.
--
-- What a refresh can know exactly is which transactions its snapshot sees.
-- Each event row records the transaction that wrote it (load_xid, the 64-bit
-- xid8 as bigint: no wraparound; bigint because BRIN has no xid8 operator
-- class). A refresh takes X = pg_snapshot_xmin(pg_current_snapshot()): every
-- transaction with an xid below X has finished (committed or aborted) when
-- the refresh starts, so all their rows are visible to every statement of the
-- refresh after it. The refresh recomputes the groups of the rows with
-- load_xid >= the previous watermark and stores X as the new one. A row
-- written by a transaction still running (xid >= X) is after the new
-- watermark whatever its timestamps, and is taken by the next refresh. Rows
-- between X and the transactions the refresh did see are recomputed twice at
-- most: groups are recomputed whole, so that costs time, never correctness.
-- A long-running writer holds X back (each refresh rescans from it) but
-- never makes a refresh miss a row.
--
-- The column is added without a default (no table rewrite), then given one:
-- rows loaded before this migration have NULL, which no watermark comparison
-- matches, so the first refresh after it is a full one (watermark_xid NULL).

DO $$
DECLARE
  t regclass;
BEGIN
  -- The parents (their partitions follow) and the months detached from them
  -- (so that one attached again still fits its parent).
  FOR t IN
    SELECT c.oid::regclass FROM pg_class c
    WHERE c.relnamespace = current_schema()::regnamespace
      AND (c.relname IN ('behavior_events', 'events')
           OR (c.relkind = 'r' AND NOT c.relispartition
               AND c.relname ~ '^(behavior_events|events)_p[0-9]{4}_[0-9]{2}$'))
      AND NOT EXISTS (SELECT 1 FROM pg_attribute a
                      WHERE a.attrelid = c.oid AND a.attname = 'load_xid' AND NOT a.attisdropped)
  LOOP
    EXECUTE format('ALTER TABLE %s ADD COLUMN load_xid BIGINT', t);
    EXECUTE format('ALTER TABLE %s ALTER COLUMN load_xid SET DEFAULT '
                   '(pg_current_xact_id()::text::bigint)', t);
  END LOOP;
END $$;

-- load_xid follows insertion order: a BRIN is a few pages per partition.
CREATE INDEX idx_behavior_events_load_xid ON behavior_events USING brin (load_xid);
CREATE INDEX idx_events_load_xid ON events USING brin (load_xid);
-- A touched session's storefront events, for its funnels (behavior events have
-- idx_behavior_events_session_id already).
CREATE INDEX idx_events_shop_session ON events (shop_id, session_id);

-- watermark_xid: rows written by transactions below it are in the rollup
-- (NULL: never refreshed since this migration; the next refresh is full).
-- watermark (0012) becomes the time of that snapshot: every row committed
-- before it is in, which is what the lag measures.
ALTER TABLE rollup_state ADD COLUMN watermark_xid BIGINT;

-- Funnels per shop: ordered steps, each a match on any of event type, page URL
-- (a glob: * any text), element path, component id (all given must match),
-- over behavior and storefront events. defined_xid: the transaction that
-- (re)defined it, so the next funnel refresh recomputes the shop's sessions.
CREATE TABLE funnels (
  shop_id      UUID NOT NULL REFERENCES shops(id) ON DELETE CASCADE,
  name         TEXT NOT NULL CHECK (length(name) BETWEEN 1 AND 200),
  steps        JSONB NOT NULL CHECK (jsonb_typeof(steps) = 'array'
                                     AND jsonb_array_length(steps) BETWEEN 1 AND 50),
  defined_xid  BIGINT NOT NULL DEFAULT (pg_current_xact_id()::text::bigint),
  created_at   TIMESTAMPTZ NOT NULL DEFAULT now(),
  updated_at   TIMESTAMPTZ NOT NULL DEFAULT now(),
  PRIMARY KEY (shop_id, name)
);
ALTER TABLE funnels OWNER TO eventpipe_partition_admin;
GRANT SELECT ON funnels TO eventpipe_analyst;
ALTER TABLE funnels ENABLE ROW LEVEL SECURITY;
CREATE POLICY analyst_own_shop ON funnels FOR SELECT TO eventpipe_analyst
  USING (shop_id = ANY ((SELECT analyst_shop_ids(current_user))::uuid[]));
CREATE POLICY partition_admin_all ON funnels TO eventpipe_partition_admin
  USING (true) WITH CHECK (true);

-- A page URL glob as a LIKE pattern (* any text; LIKE's own % _ \ literal).
CREATE FUNCTION eventpipe_glob_like(pattern text) RETURNS text
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
RETURN replace(replace(replace(replace(pattern, '\', '\\'), '%', '\%'), '_', '\_'), '*', '%');

INSERT INTO rollup_state (rollup) VALUES ('conversion_funnels');
