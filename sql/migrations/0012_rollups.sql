-- Issue 24: the analysis tables of the source documents, per shop.
--
-- Document 002 defines friction_points and session_analytics as views and
-- daily_friction_summary and component_performance as materialized views;
-- document 004 defines results_aggregates, "refreshed by worker". A
-- materialized view has no row level security (an analyst granted SELECT on
-- one reads every shop's rows), so:
--   * daily_friction_summary, component_performance, results_aggregates (and
--     conversion_funnels) are TABLES the pipeline maintains (ingest/rollups),
--     per shop and day, recomputed incrementally, with the event tables'
--     analyst policy (analyst_shop_ids(current_user), migration 0008);
--   * friction_points and session_analytics are views WITH (security_invoker),
--     so an analyst reads them with its own rights: the policies of the
--     tables beneath apply.
-- Adapted to our tables: behavior_events."timestamp" (UTC days),
-- user_sessions keyed by (shop_id, session_id), the session's start is
-- first_seen_at (created_at is when the collector made the row).
--
-- Incremental refresh finds the days that received events by received_at:
-- BRIN indexes (received_at follows insertion order, so a BRIN is a few pages
-- per partition and nearly free for the loaders' COPY) keep that scan from
-- reading whole tables. Partitions made later get them at ATTACH.

CREATE INDEX idx_behavior_events_received_at ON behavior_events USING brin (received_at);
CREATE INDEX idx_events_received_at ON events USING brin (received_at);

-- The start of a table's retention window (its partition policy), for the
-- views: analysts may not read partition_policies themselves.
DO $$
BEGIN
  EXECUTE format($f$
    CREATE FUNCTION retention_start(tbl text) RETURNS timestamptz
    LANGUAGE sql STABLE SECURITY DEFINER
    SET search_path = %1$I, pg_catalog, pg_temp AS $body$
      SELECT coalesce((SELECT now() - p.retention FROM %1$I.partition_policies p
                       WHERE p.table_name = tbl), '-infinity'::timestamptz)
    $body$
  $f$, current_schema());
END $$;
REVOKE ALL ON FUNCTION retention_start(text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION retention_start(text) TO eventpipe_analyst, eventpipe_partition_admin;

-- 002's conversion_funnels, per shop (filled by the funnel refresh).
CREATE TABLE conversion_funnels (
  shop_id           UUID NOT NULL,
  funnel_name       TEXT NOT NULL,
  step_name         TEXT NOT NULL,
  step_order        INTEGER NOT NULL,
  session_id        TEXT NOT NULL,
  component_id      TEXT,
  entered_at        TIMESTAMPTZ NOT NULL,
  exited_at         TIMESTAMPTZ,
  duration_seconds  INTEGER,
  dropoff_reason    TEXT,
  metadata          JSONB NOT NULL DEFAULT '{}',
  PRIMARY KEY (shop_id, session_id, funnel_name, step_order)
);
CREATE INDEX idx_conversion_funnels_funnel ON conversion_funnels(shop_id, funnel_name);
CREATE INDEX idx_conversion_funnels_entered_at ON conversion_funnels(shop_id, entered_at);

-- 002's daily_friction_summary, per shop and UTC day.
CREATE TABLE daily_friction_summary (
  shop_id               UUID NOT NULL,
  date                  DATE NOT NULL,
  element_path          TEXT,
  event_type            TEXT NOT NULL,
  event_count           BIGINT NOT NULL,
  unique_sessions       BIGINT NOT NULL,
  avg_hesitation_ms     NUMERIC,
  median_hesitation_ms  DOUBLE PRECISION,
  form_abandons         BIGINT NOT NULL,
  form_submits          BIGINT NOT NULL,
  refreshed_at          TIMESTAMPTZ NOT NULL DEFAULT now()
);
-- element_path may be NULL (a page_view): one row for it all the same.
CREATE UNIQUE INDEX idx_daily_friction_summary
  ON daily_friction_summary (shop_id, date, element_path, event_type) NULLS NOT DISTINCT;

-- 002's component_performance, per shop and UTC day.
CREATE TABLE component_performance (
  shop_id             UUID NOT NULL,
  date                DATE NOT NULL,
  component_id        TEXT NOT NULL,
  page_url            TEXT NOT NULL,
  total_interactions  BIGINT NOT NULL,
  unique_users        BIGINT NOT NULL,
  clicks              BIGINT NOT NULL,
  rage_clicks         BIGINT NOT NULL,
  hesitations         BIGINT NOT NULL,
  avg_hesitation_ms   NUMERIC,
  conversions         BIGINT NOT NULL,
  first_seen          TIMESTAMPTZ NOT NULL,
  last_seen           TIMESTAMPTZ NOT NULL,
  refreshed_at        TIMESTAMPTZ NOT NULL DEFAULT now(),
  PRIMARY KEY (shop_id, date, component_id, page_url)
);

-- 004's results_aggregates: per shop, experiment, variant and segment (the
-- session's device type, 'unknown' without one). experiment_id is TEXT as in
-- events (there is no experiments table in the pipeline).
CREATE TABLE results_aggregates (
  shop_id         UUID NOT NULL,
  experiment_id   TEXT NOT NULL,
  variant         TEXT NOT NULL,
  segment         TEXT NOT NULL,
  visitors        BIGINT NOT NULL DEFAULT 0,
  views           BIGINT NOT NULL DEFAULT 0,
  add_to_cart     BIGINT NOT NULL DEFAULT 0,
  begin_checkout  BIGINT NOT NULL DEFAULT 0,
  purchase        BIGINT NOT NULL DEFAULT 0,
  revenue         NUMERIC(14,2) NOT NULL DEFAULT 0,
  updated_at      TIMESTAMPTZ NOT NULL DEFAULT now(),
  PRIMARY KEY (shop_id, experiment_id, variant, segment)
);

-- Where each rollup's incremental refresh got to: every row received up to
-- the watermark is in it.
CREATE TABLE rollup_state (
  rollup            TEXT PRIMARY KEY,
  -- not -infinity: drivers decode it as a naive datetime
  watermark         TIMESTAMPTZ NOT NULL DEFAULT '1970-01-01 00:00:00+00',
  last_refresh_at   TIMESTAMPTZ,
  last_full_at      TIMESTAMPTZ,
  last_groups       BIGINT NOT NULL DEFAULT 0,
  last_duration_ms  DOUBLE PRECISION NOT NULL DEFAULT 0
);
INSERT INTO rollup_state (rollup)
VALUES ('daily_friction_summary'), ('component_performance'), ('results_aggregates');

-- Owned by the partition admin, like the event tables: the refresh runs as
-- the owner (or a member of that role, through partition_admin_all).
DO $$
DECLARE
  t text;
BEGIN
  FOREACH t IN ARRAY ARRAY['conversion_funnels', 'daily_friction_summary',
                           'component_performance', 'results_aggregates'] LOOP
    EXECUTE format('ALTER TABLE %I OWNER TO eventpipe_partition_admin', t);
    EXECUTE format('GRANT SELECT ON %I TO eventpipe_analyst', t);
    EXECUTE format('ALTER TABLE %I ENABLE ROW LEVEL SECURITY', t);
    EXECUTE format('CREATE POLICY analyst_own_shop ON %I FOR SELECT TO eventpipe_analyst '
                   'USING (shop_id = ANY ((SELECT analyst_shop_ids(current_user))::uuid[]))', t);
    EXECUTE format('CREATE POLICY partition_admin_all ON %I TO eventpipe_partition_admin '
                   'USING (true) WITH CHECK (true)', t);
  END LOOP;
END $$;
ALTER TABLE rollup_state OWNER TO eventpipe_partition_admin;
REVOKE ALL ON rollup_state FROM PUBLIC;

-- 002's friction_points, per shop, over the retention window of behavior_events.
CREATE VIEW friction_points WITH (security_invoker = true) AS
SELECT
  be.shop_id,
  be.element_path,
  be.element_type,
  be.event_type,
  COUNT(*) AS event_count,
  COUNT(DISTINCT be.session_id) AS affected_sessions,
  AVG(EXTRACT(EPOCH FROM (be."timestamp" - us.first_seen_at))) AS avg_time_to_event,
  MIN(be."timestamp") AS first_seen,
  MAX(be."timestamp") AS last_seen,
  ARRAY_AGG(DISTINCT be.page_url) AS pages_affected
FROM behavior_events be
JOIN user_sessions us ON us.shop_id = be.shop_id AND us.session_id = be.session_id
WHERE be.event_type IN ('rage_click', 'hesitation', 'form_abandon', 'error')
  AND be."timestamp" >= (SELECT retention_start('behavior_events'))
GROUP BY be.shop_id, be.element_path, be.element_type, be.event_type
HAVING COUNT(*) > 10;

-- 002's session_analytics, per shop: sessions seen within the retention window.
CREATE VIEW session_analytics WITH (security_invoker = true) AS
SELECT
  us.shop_id,
  us.session_id,
  us.landing_page,
  us.exit_page,
  us.exit_reason,
  us.duration_seconds,
  us.page_count,
  COUNT(DISTINCT be.event_id) AS total_events,
  COUNT(DISTINCT CASE WHEN be.event_type = 'click' THEN be.event_id END) AS click_count,
  COUNT(DISTINCT CASE WHEN be.event_type = 'rage_click' THEN be.event_id END) AS rage_click_count,
  COUNT(DISTINCT CASE WHEN be.event_type = 'hesitation' THEN be.event_id END) AS hesitation_count,
  COUNT(DISTINCT CASE WHEN be.event_type = 'form_abandon' THEN be.event_id END) AS form_abandon_count,
  COUNT(DISTINCT CASE WHEN be.event_type = 'form_submit' THEN be.event_id END) AS form_submit_count,
  MAX(CASE WHEN be.event_type = 'scroll_depth' AND jsonb_typeof(be.event_data->'percentage') = 'number'
      THEN (be.event_data->>'percentage')::DECIMAL END) AS max_scroll_depth,
  ARRAY_AGG(DISTINCT cf.funnel_name) FILTER (WHERE cf.funnel_name IS NOT NULL) AS funnels_entered
FROM user_sessions us
LEFT JOIN behavior_events be ON be.shop_id = us.shop_id AND be.session_id = us.session_id
  AND be."timestamp" >= (SELECT retention_start('behavior_events'))
LEFT JOIN conversion_funnels cf ON cf.shop_id = us.shop_id AND cf.session_id = us.session_id
WHERE us.last_seen_at >= (SELECT retention_start('behavior_events'))
GROUP BY us.shop_id, us.session_id, us.landing_page, us.exit_page, us.exit_reason,
  us.duration_seconds, us.page_count;

ALTER VIEW friction_points OWNER TO eventpipe_partition_admin;
ALTER VIEW session_analytics OWNER TO eventpipe_partition_admin;
GRANT SELECT ON friction_points, session_analytics TO eventpipe_analyst;
