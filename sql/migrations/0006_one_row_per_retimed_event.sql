-- One row per event even when the collector moved its time.
--
-- Rows are unique on (event_id, event time): the time is the partition key,
-- and a unique index of a partitioned table must hold it. A retry of an event
-- carries the same event id and client time, but the collector may store it
-- at another time: the skew correction depends on received_at - sent_at, and
-- the future clamp on the receive time. Such a row carries the client's own
-- time (behavior: metadata.client_timestamp, storefront: props.client_ts), so
-- it is known as retimed. After every statement that inserts rows, a trigger
-- keeps the first row stored of each event:
--   * a new retimed row is deleted when the event already has a row at
--     another time (stored before, or in the same statement at an earlier
--     time), and otherwise remembered in event_retimes;
--   * a new row that is not retimed is deleted when event_retimes says the
--     event was stored, retimed, at another time (and that row still exists).
-- A retry belongs to the same session as its first attempt, so the events
-- remembered are looked up by the statement's distinct sessions (a few
-- hundred in a batch of thousands of rows), not row by row; nothing is
-- looked up while event_retimes is empty.
CREATE TABLE event_retimes (
  table_name  TEXT NOT NULL,
  shop_id     UUID NOT NULL,
  session_id  TEXT NOT NULL,
  event_id    UUID NOT NULL,
  event_time  TIMESTAMPTZ NOT NULL,  -- where the event's row is stored
  created_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
  PRIMARY KEY (table_name, shop_id, session_id, event_id)
);
CREATE INDEX idx_event_retimes_created_at ON event_retimes(created_at);
ALTER TABLE event_retimes ENABLE ROW LEVEL SECURITY;  -- nobody but its owner reads it

-- TG_ARGV: the time column, the jsonb column, the key holding the client's time.
CREATE FUNCTION keep_one_row_per_event() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path FROM CURRENT AS $$
DECLARE
  tc text := quote_ident(TG_ARGV[0]);
  jc text := quote_ident(TG_ARGV[1]);
  marker text := quote_literal(TG_ARGV[2]);
  tbl text := format('%I.%I', TG_TABLE_SCHEMA, TG_TABLE_NAME);
  name text := quote_literal(TG_TABLE_NAME);
  any_marked boolean;
  any_remembered boolean;
BEGIN
  EXECUTE format('SELECT EXISTS (SELECT 1 FROM new_rows WHERE %s ? %s)', jc, marker)
    INTO any_marked;
  any_remembered := EXISTS (SELECT 1 FROM event_retimes WHERE table_name = TG_TABLE_NAME);
  IF NOT any_marked AND NOT any_remembered THEN
    RETURN NULL;
  END IF;
  EXECUTE format($q$
    WITH marked AS MATERIALIZED (
      SELECT event_id, shop_id, %1$s AS t FROM new_rows WHERE %2$s ? %3$s
    ),
    remembered AS MATERIALIZED (
      SELECT r.event_id, r.shop_id, r.event_time AS t
      FROM (SELECT DISTINCT shop_id, session_id FROM new_rows) s
      JOIN event_retimes r
        ON r.table_name = %5$s AND r.shop_id = s.shop_id AND r.session_id = s.session_id
      WHERE EXISTS (SELECT 1 FROM %4$s x WHERE x.event_id = r.event_id AND x.%1$s = r.event_time)
    ),
    earlier AS (
      SELECT event_id, shop_id, t, true AS stored FROM remembered
      UNION ALL
      SELECT event_id, shop_id, t, false FROM marked
    ),
    losers AS (
      -- retimed rows of an event that has a row elsewhere: stored before
      -- this statement, or in it at an earlier time
      SELECT m.event_id, m.t FROM marked m
      WHERE EXISTS (
        SELECT 1 FROM %4$s o
        WHERE o.event_id = m.event_id AND o.shop_id = m.shop_id AND o.%1$s <> m.t
          AND (o.%1$s < m.t OR NOT EXISTS (
            SELECT 1 FROM new_rows x WHERE x.event_id = o.event_id AND x.%1$s = o.%1$s)))
      UNION ALL
      -- other rows of an event stored retimed before, or retimed in this
      -- statement at an earlier time
      SELECT n.event_id, n.%1$s FROM new_rows n
      JOIN earlier e ON e.event_id = n.event_id AND e.shop_id = n.shop_id
      WHERE NOT (n.%2$s ? %3$s) AND e.t <> n.%1$s AND (e.stored OR e.t < n.%1$s)
    )
    DELETE FROM %4$s d USING losers l WHERE d.event_id = l.event_id AND d.%1$s = l.t
  $q$, tc, jc, marker, tbl, name);
  IF any_marked THEN
    -- the retimed rows that stayed are the events' rows from now on
    EXECUTE format($q$
      INSERT INTO event_retimes (table_name, shop_id, session_id, event_id, event_time)
      SELECT DISTINCT ON (n.event_id, n.shop_id) %4$s, n.shop_id, n.session_id, n.event_id, n.%1$s
      FROM new_rows n
      WHERE n.%2$s ? %3$s
        AND EXISTS (SELECT 1 FROM %5$s s WHERE s.event_id = n.event_id AND s.%1$s = n.%1$s)
      ORDER BY n.event_id, n.shop_id, n.%1$s
      ON CONFLICT (table_name, shop_id, session_id, event_id) DO UPDATE SET event_time = EXCLUDED.event_time
    $q$, tc, jc, marker, name, tbl);
  END IF;
  RETURN NULL;
END
$$;

CREATE TRIGGER behavior_events_one_row_per_event AFTER INSERT ON behavior_events
  REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT
  EXECUTE FUNCTION keep_one_row_per_event('timestamp', 'metadata', 'client_timestamp');
CREATE TRIGGER events_one_row_per_event AFTER INSERT ON events
  REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT
  EXECUTE FUNCTION keep_one_row_per_event('ts', 'props', 'client_ts');

-- The function runs as the event tables' owner, who may delete from them.
ALTER TABLE event_retimes OWNER TO eventpipe_partition_admin;
ALTER FUNCTION keep_one_row_per_event() OWNER TO eventpipe_partition_admin;
