-- Issue 18, point 2: deduplication is per shop.
--
-- The event tables were unique on (event_id, <event time>) and the loaders
-- insert with ON CONFLICT DO NOTHING, so an event of shop B with the id and
-- time of one of shop A (ids can be predictable: uuid5 of an order id, a
-- client's own scheme) was dropped without a dead letter. The key becomes
-- (shop_id, event_id, <event time>): the time stays in it (a unique index of
-- a partitioned table must hold the partition key), and shop_id first is the
-- distribution column a sharded PostgreSQL (Citus) needs.
--
-- How: DROP CONSTRAINT / ADD PRIMARY KEY on each parent, which PostgreSQL
-- carries to every partition, in this migration's one transaction (a
-- partitioned table's key cannot be built CONCURRENTLY, nor can anything in a
-- transaction). It holds ACCESS EXCLUSIVE on the table while each
-- partition's index is built: nothing for the embedded stack and test sizes;
-- for large production tables see docs/operations.md ("Re-keying the event
-- tables") for the path that builds the partitions' indexes beforehand,
-- concurrently, so that this migration only attaches them. The old keys'
-- rows are unique under the new key as well (it holds one more column), so
-- no row is lost and nothing can fail for duplicates.
--
-- Partitions made later get the key from the parent at ATTACH (the partition
-- manager makes them LIKE the parent, without indexes, then attaches). Tables
-- detached from a parent (retention mode detach, waiting to be dropped or
-- archived) are re-keyed too, so that one attached again fits the parent.
--
-- The ingest role reads the key back (INSERT ... ON CONFLICT DO NOTHING
-- RETURNING of the loaders' careful path): it is now granted SELECT of
-- shop_id as well, on the parents and every partition; new partitions copy
-- the parent's column grants. Policies are untouched.
--
-- The statement trigger of 0006 (keep_one_row_per_event) matched rows by
-- (event_id, time) in its deletes and checks; with two shops' rows of one id
-- and time it could delete shop A's row for a retry of shop B's. It is
-- replaced below with every lookup per shop.

DO $$
DECLARE
  parent record;
  t regclass;
  pk name;
BEGIN
  FOR parent IN
    SELECT * FROM (VALUES ('behavior_events'::regclass, 'timestamp'), ('events'::regclass, 'ts'))
      AS p(rel, time_column)
  LOOP
    -- Only on the parent: attached partitions follow it. A key already per
    -- shop (a database re-keyed by hand, the production path) is kept.
    SELECT conname INTO pk FROM pg_constraint WHERE conrelid = parent.rel AND contype = 'p';
    IF pk IS NOT NULL AND (
      SELECT array_agg(a.attname::text ORDER BY k.o)
      FROM pg_constraint c, unnest(c.conkey) WITH ORDINALITY k(n, o)
      JOIN pg_attribute a ON a.attnum = k.n
      WHERE c.conrelid = parent.rel AND c.conname = pk AND a.attrelid = parent.rel
    ) IS DISTINCT FROM ARRAY['shop_id', 'event_id', parent.time_column] THEN
      EXECUTE format('ALTER TABLE %s DROP CONSTRAINT %I', parent.rel, pk);
      pk := NULL;
    END IF;
    IF pk IS NULL THEN
      EXECUTE format('ALTER TABLE %s ADD CONSTRAINT %I PRIMARY KEY (shop_id, event_id, %I)',
                     parent.rel, parent.rel::text || '_pkey', parent.time_column);
    END IF;

    -- Detached tables named like a partition of the parent: their own key.
    FOR t IN
      SELECT c.oid::regclass FROM pg_class c
      WHERE c.relnamespace = current_schema()::regnamespace AND c.relkind = 'r'
        AND c.relname ~ ('^' || parent.rel::text || '_p[0-9]{4}_[0-9]{2}$')
        AND NOT c.relispartition
    LOOP
      SELECT conname INTO pk FROM pg_constraint WHERE conrelid = t AND contype = 'p';
      IF pk IS NOT NULL THEN
        EXECUTE format('ALTER TABLE %s DROP CONSTRAINT %I', t, pk);
      END IF;
      EXECUTE format('ALTER TABLE %s ADD PRIMARY KEY (shop_id, event_id, %I)', t,
                     parent.time_column);
    END LOOP;

    FOR t IN
      SELECT parent.rel
      UNION ALL
      SELECT inhrelid::regclass FROM pg_inherits WHERE inhparent = parent.rel
    LOOP
      EXECUTE format('GRANT SELECT (shop_id) ON %s TO eventpipe_ingest', t);
    END LOOP;
  END LOOP;
END $$;

-- As in 0006, with the shop in every match of a row: an event is its shop's.
CREATE OR REPLACE FUNCTION keep_one_row_per_event() RETURNS trigger
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
      WHERE EXISTS (SELECT 1 FROM %4$s x
                    WHERE x.shop_id = r.shop_id AND x.event_id = r.event_id
                      AND x.%1$s = r.event_time)
    ),
    earlier AS (
      SELECT event_id, shop_id, t, true AS stored FROM remembered
      UNION ALL
      SELECT event_id, shop_id, t, false FROM marked
    ),
    losers AS (
      -- retimed rows of an event that has a row elsewhere: stored before
      -- this statement, or in it at an earlier time
      SELECT m.shop_id, m.event_id, m.t FROM marked m
      WHERE EXISTS (
        SELECT 1 FROM %4$s o
        WHERE o.event_id = m.event_id AND o.shop_id = m.shop_id AND o.%1$s <> m.t
          AND (o.%1$s < m.t OR NOT EXISTS (
            SELECT 1 FROM new_rows x
            WHERE x.shop_id = o.shop_id AND x.event_id = o.event_id AND x.%1$s = o.%1$s)))
      UNION ALL
      -- other rows of an event stored retimed before, or retimed in this
      -- statement at an earlier time
      SELECT n.shop_id, n.event_id, n.%1$s FROM new_rows n
      JOIN earlier e ON e.event_id = n.event_id AND e.shop_id = n.shop_id
      WHERE NOT (n.%2$s ? %3$s) AND e.t <> n.%1$s AND (e.stored OR e.t < n.%1$s)
    )
    DELETE FROM %4$s d USING losers l
    WHERE d.shop_id = l.shop_id AND d.event_id = l.event_id AND d.%1$s = l.t
  $q$, tc, jc, marker, tbl, name);
  IF any_marked THEN
    -- the retimed rows that stayed are the events' rows from now on
    EXECUTE format($q$
      INSERT INTO event_retimes (table_name, shop_id, session_id, event_id, event_time)
      SELECT DISTINCT ON (n.event_id, n.shop_id) %4$s, n.shop_id, n.session_id, n.event_id, n.%1$s
      FROM new_rows n
      WHERE n.%2$s ? %3$s
        AND EXISTS (SELECT 1 FROM %5$s s
                    WHERE s.shop_id = n.shop_id AND s.event_id = n.event_id
                      AND s.%1$s = n.%1$s)
      ORDER BY n.event_id, n.shop_id, n.%1$s
      ON CONFLICT (table_name, shop_id, session_id, event_id) DO UPDATE SET event_time = EXCLUDED.event_time
    $q$, tc, jc, marker, name, tbl);
  END IF;
  RETURN NULL;
END
$$;
