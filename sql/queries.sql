-- Named queries, loaded once at import by ingest/db.py.
-- Each starts with a "-- name: <name>" line.

-- name: create_migrations_table
CREATE TABLE IF NOT EXISTS schema_migrations (
  version     INTEGER PRIMARY KEY,
  name        TEXT NOT NULL,
  checksum    TEXT NOT NULL,
  applied_at  TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- name: migrations_lock
SELECT pg_advisory_xact_lock(hashtext('eventpipe:migrate'));

-- name: applied_migrations
SELECT version, name, checksum FROM schema_migrations ORDER BY version;

-- name: record_migration
INSERT INTO schema_migrations (version, name, checksum) VALUES ($1, $2, $3);

-- name: shop_by_write_key
SELECT s.id, s.domain, s.allowed_origins, s.settings
FROM shop_write_keys k JOIN shops s ON s.id = k.shop_id
WHERE k.write_key = $1 AND k.revoked_at IS NULL AND s.uninstalled_at IS NULL;

-- name: shop_by_domain
SELECT id, domain, allowed_origins, settings, webhook_secret FROM shops
WHERE domain = $1 AND uninstalled_at IS NULL;

-- name: upsert_shop
INSERT INTO shops (domain, webhook_secret) VALUES ($1, $2)
ON CONFLICT (domain) DO UPDATE SET updated_at = shops.updated_at
RETURNING id, webhook_secret;

-- name: live_write_key
SELECT write_key FROM shop_write_keys
WHERE shop_id = $1 AND revoked_at IS NULL ORDER BY created_at DESC LIMIT 1;

-- name: add_write_key
INSERT INTO shop_write_keys (write_key, shop_id) VALUES ($1, $2);

-- name: loader_offsets
SELECT kafka_partition, next_offset, log_id FROM loader_offsets
WHERE consumer_group = $1 AND topic = $2 AND kafka_partition = ANY($3::int[]);

-- name: claim_offset
-- First sight of a Kafka partition: record where reading starts; a row that is
-- already there wins (another loader got there first).
INSERT INTO loader_offsets (consumer_group, topic, kafka_partition, next_offset, log_id)
VALUES ($1, $2, $3, $4, $5)
ON CONFLICT (consumer_group, topic, kafka_partition) DO NOTHING;

-- name: reset_offset
UPDATE loader_offsets SET next_offset = $4, log_id = $5, updated_at = now()
WHERE consumer_group = $1 AND topic = $2 AND kafka_partition = $3;

-- name: advance_offsets
-- Fenced (raises EPF01, see migration 0004): each partition only moves from the
-- position this loader believes in.
SELECT advance_loader_offsets($1, $2, $3::int[], $4::bigint[], $5::bigint[]);

-- name: insert_dead_letter
-- Unique within a broker log (migration 0005): a replaced log reuses offsets.
INSERT INTO dead_letters
  (consumer_group, log_id, topic, kafka_partition, kafka_offset, record_index, raw, reason, error)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
ON CONFLICT (log_id, topic, kafka_partition, kafka_offset, record_index) DO NOTHING;

-- name: partition_lock
SELECT pg_advisory_xact_lock(hashtext('eventpipe:partition:' || $1));

-- name: claimed_partitions
SELECT count(*) FROM loader_offsets WHERE log_id = $1 AND topic = ANY($2::text[]);

-- name: upsert_sessions
-- One row per session touched by a batch (only rows that were new), folded in:
-- landing page of the earliest event, exit page of the latest, page views added.
INSERT INTO user_sessions AS s (
  shop_id, session_id, user_agent, referrer, landing_page, exit_page, device_type,
  screen_resolution, language, country_code, first_seen_at, last_seen_at, page_count,
  duration_seconds
)
SELECT u.*, EXTRACT(EPOCH FROM (u.last_seen_at - u.first_seen_at))::int
FROM unnest(
  $1::uuid[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[], $7::text[],
  $8::text[], $9::text[], $10::text[], $11::timestamptz[], $12::timestamptz[], $13::int[]
) AS u(shop_id, session_id, user_agent, referrer, landing_page, exit_page, device_type,
       screen_resolution, language, country_code, first_seen_at, last_seen_at, page_count)
ON CONFLICT (shop_id, session_id) DO UPDATE SET
  landing_page = CASE WHEN EXCLUDED.first_seen_at < s.first_seen_at
                      THEN EXCLUDED.landing_page ELSE s.landing_page END,
  exit_page = CASE WHEN EXCLUDED.last_seen_at >= s.last_seen_at
                   THEN EXCLUDED.exit_page ELSE s.exit_page END,
  first_seen_at = LEAST(s.first_seen_at, EXCLUDED.first_seen_at),
  last_seen_at = GREATEST(s.last_seen_at, EXCLUDED.last_seen_at),
  page_count = s.page_count + EXCLUDED.page_count,
  duration_seconds = EXTRACT(EPOCH FROM (GREATEST(s.last_seen_at, EXCLUDED.last_seen_at)
                                       - LEAST(s.first_seen_at, EXCLUDED.first_seen_at)))::int,
  user_agent = COALESCE(s.user_agent, EXCLUDED.user_agent),
  referrer = COALESCE(s.referrer, EXCLUDED.referrer),
  device_type = COALESCE(s.device_type, EXCLUDED.device_type),
  screen_resolution = COALESCE(s.screen_resolution, EXCLUDED.screen_resolution),
  language = COALESCE(s.language, EXCLUDED.language),
  country_code = COALESCE(s.country_code, EXCLUDED.country_code),
  updated_at = now();

-- name: list_dead_letters
SELECT id, consumer_group, log_id, topic, kafka_partition, kafka_offset, record_index, reason,
       error, created_at,
       replayed_at, length(raw) AS size
FROM dead_letters
WHERE ($1::text IS NULL OR reason = $1) AND ($2::bool OR replayed_at IS NULL)
ORDER BY id
LIMIT $3;

-- name: dead_letters_to_replay
SELECT id, topic, raw FROM dead_letters
WHERE replayed_at IS NULL AND (id = ANY($1::bigint[]) OR ($2::text IS NOT NULL AND reason = $2)
                               OR $3::bool)
ORDER BY id;

-- name: mark_replayed
UPDATE dead_letters SET replayed_at = now() WHERE id = ANY($1::bigint[]);

-- partition manager

-- name: pm_policies
-- Retention split into whole months and the rest, so the cutoff is computed
-- with calendar months in UTC (asyncpg would turn months into 30-day blocks).
SELECT table_name, partition_column, months_ahead, retention_mode, archive_location,
       retention::text AS retention_text,
       (extract(year FROM retention) * 12 + extract(month FROM retention))::int
         AS retention_months,
       retention - date_trunc('month', retention) AS retention_rest
FROM partition_policies
WHERE $1::text IS NULL OR table_name = $1
ORDER BY table_name;

-- name: pm_upsert_policy
INSERT INTO partition_policies
  (table_name, partition_column, months_ahead, retention, retention_mode, archive_location)
VALUES ($1, $2, $3, $4::text::interval, $5, $6)
ON CONFLICT (table_name) DO UPDATE SET
  partition_column = EXCLUDED.partition_column,
  months_ahead = EXCLUDED.months_ahead,
  retention = EXCLUDED.retention,
  retention_mode = EXCLUDED.retention_mode,
  archive_location = EXCLUDED.archive_location,
  updated_at = now();

-- name: pm_parent
-- The partitioned table a policy names, with what new partitions must copy.
SELECT c.relkind::text AS relkind, quote_ident(pg_get_userbyid(c.relowner)) AS owner,
       c.relrowsecurity, c.relforcerowsecurity,
       pg_get_partkeydef(c.oid) AS partkey,
       ARRAY(SELECT a.attname::text FROM pg_attribute a
             WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
             ORDER BY a.attnum) AS columns
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.relname = $1 AND n.nspname = current_schema();

-- name: pm_parent_grants
-- grantee NULL: PUBLIC.
SELECT CASE WHEN x.grantee = 0 THEN NULL ELSE quote_ident(pg_get_userbyid(x.grantee)) END
         AS grantee,
       x.privilege_type, x.is_grantable
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace,
     LATERAL aclexplode(c.relacl) x
WHERE c.relname = $1 AND n.nspname = current_schema() AND x.grantee <> c.relowner
ORDER BY 1, 2;

-- name: pm_children
-- Attached partitions (bound 'DEFAULT' for a default partition), with size estimates.
SELECT c.relname::text AS name, pg_get_expr(c.relpartbound, c.oid) AS bound,
       i.inhdetachpending AS detach_pending,
       greatest(c.reltuples, 0)::bigint AS est_rows,
       pg_total_relation_size(c.oid) AS size_bytes
FROM pg_inherits i
JOIN pg_class c ON c.oid = i.inhrelid
JOIN pg_class p ON p.oid = i.inhparent
JOIN pg_namespace n ON n.oid = p.relnamespace
WHERE p.relname = $1 AND n.nspname = current_schema()
ORDER BY c.relname;

-- name: pm_detached
-- Plain tables named like a partition of $1 that are not attached: detached
-- by retention (mode detach, or a run interrupted before drop/archive).
SELECT c.relname::text AS name, greatest(c.reltuples, 0)::bigint AS est_rows,
       pg_total_relation_size(c.oid) AS size_bytes
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname = current_schema() AND c.relkind = 'r' AND NOT c.relispartition
  AND c.relname ~ ('^' || $1 || '_p[0-9]{4}_[0-9]{2}$')
ORDER BY c.relname;

-- name: pm_has_column
SELECT EXISTS (
  SELECT 1 FROM pg_attribute a
  JOIN pg_class c ON c.oid = a.attrelid JOIN pg_namespace n ON n.oid = c.relnamespace
  WHERE c.relname = $1 AND n.nspname = current_schema() AND a.attname = $2
    AND a.attnum > 0 AND NOT a.attisdropped);

-- name: pm_shop_retention
-- Shops with their own data_retention_days (source documents: shops.settings).
SELECT id, floor((settings->>'data_retention_days')::numeric)::int AS days
FROM shops
WHERE jsonb_typeof(settings->'data_retention_days') = 'number'
  AND (settings->>'data_retention_days')::numeric >= 0
ORDER BY id;

-- name: pm_maintenance_try_lock
SELECT pg_try_advisory_lock(hashtext('eventpipe:partitions:maintain'));

-- name: pm_maintenance_unlock
SELECT pg_advisory_unlock(hashtext('eventpipe:partitions:maintain'));

-- name: pm_parent_column_grants
-- Column privileges (e.g. the ingest role's SELECT of the dedup key); grantee NULL: PUBLIC.
SELECT CASE WHEN x.grantee = 0 THEN NULL ELSE quote_ident(pg_get_userbyid(x.grantee)) END
         AS grantee,
       x.privilege_type, a.attname::text AS column_name, x.is_grantable
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped,
     LATERAL aclexplode(a.attacl) x
WHERE c.relname = $1 AND n.nspname = current_schema() AND x.grantee <> c.relowner
ORDER BY 1, 2, a.attnum;

-- name: pm_parent_policies
-- Row level security policies, copied to each new partition so that reading a
-- partition directly is filtered like reading the parent.
SELECT p.policyname::text AS name, p.permissive, p.cmd,
       ARRAY(SELECT quote_ident(r) FROM unnest(p.roles) r) AS roles,
       p.qual, p.with_check
FROM pg_policies p
WHERE p.tablename = $1 AND p.schemaname = current_schema()
ORDER BY p.policyname;

-- roles

-- name: switchable_role
-- $1 when the connected user may SET ROLE to it as a member (superusers, who
-- are members of everything, keep their own rights); with whether it bypasses
-- row level security.
SELECT r.rolname::text AS role, r.rolbypassrls AS bypass_rls
FROM pg_roles r
WHERE r.rolname = $1
  AND NOT (SELECT u.rolsuper FROM pg_roles u WHERE u.rolname = current_user)
  AND pg_has_role(current_user, r.oid, 'MEMBER');

-- name: set_local_role
SELECT set_config('role', $1, true);

-- name: stage_columns
-- Column definitions of a loader's staging table, from the catalog: CREATE
-- TABLE ... (LIKE t) needs SELECT on all of t, which the ingest role lacks.
SELECT string_agg(quote_ident(a.attname) || ' ' || format_type(a.atttypid, a.atttypmod)
                    || CASE WHEN a.attnotnull THEN ' NOT NULL' ELSE '' END,
                  ', ' ORDER BY a.attnum)
FROM pg_attribute a
WHERE a.attrelid = $1::text::regclass AND a.attname = ANY($2::text[])
  AND a.attnum > 0 AND NOT a.attisdropped;

-- write keys

-- name: shop_id_by_domain
SELECT id, domain FROM shops WHERE domain = $1;

-- name: list_write_keys
SELECT write_key, created_at, revoked_at FROM shop_write_keys
WHERE shop_id = $1 ORDER BY created_at, write_key;

-- name: revoke_write_keys
-- $2 NULL: every live key of the shop except $3 (the one just made), else that key only.
UPDATE shop_write_keys SET revoked_at = now()
WHERE shop_id = $1 AND revoked_at IS NULL
  AND ($2::text IS NULL OR write_key = $2) AND ($3::text IS NULL OR write_key <> $3)
RETURNING write_key;

-- name: verify_seen_behavior_events
-- `eventpipe bench --verify`: the rows received since $1 that transactions from
-- load_xid $2 on wrote, and the next poll's $2 (upto: every older transaction has
-- ended, as for the rollups' watermark, migration 0014). A row of upto NULL: none.
SELECT s.upto, e.event_id, e.received_at
FROM (SELECT pg_snapshot_xmin(pg_current_snapshot())::text::bigint AS upto) s
LEFT JOIN behavior_events e ON e.received_at >= $1 AND e.load_xid >= $2;

-- name: verify_duplicates_behavior_events
SELECT coalesce(sum(n - 1), 0) FROM (
  SELECT count(*) AS n FROM behavior_events
  WHERE received_at >= $1 AND event_id = ANY($2::uuid[])
  GROUP BY event_id HAVING count(*) > 1
) d;

-- name: verify_counted_behavior_events
-- The end-to-end benchmark's drain watch (`loadgen.verify.CountedIds`): how many
-- rows received since $1 carry an event id whose first 8 hex digits (a request
-- counter, benchmarks/wrk.py) lie in [$3, $4], of those written by transactions
-- from load_xid $2 up to upto, and upto: every transaction below it has ended, so
-- each row is counted by exactly one poll (a row of a later xid waits for the
-- next). Counted here, not read into the suite: the drain is timed while it runs.
SELECT s.upto, count(e.event_id) AS n
FROM (SELECT pg_snapshot_xmin(pg_current_snapshot())::text::bigint AS upto) s
LEFT JOIN behavior_events e ON e.received_at >= $1 AND e.load_xid >= $2
  AND e.load_xid < s.upto AND left(e.event_id::text, 8) BETWEEN $3 AND $4
GROUP BY s.upto;

-- name: verify_seen_events
-- `eventpipe bench --verify`: the rows received since $1 that transactions from
-- load_xid $2 on wrote, and the next poll's $2 (upto: every older transaction has
-- ended, as for the rollups' watermark, migration 0014). A row of upto NULL: none.
SELECT s.upto, e.event_id, e.received_at
FROM (SELECT pg_snapshot_xmin(pg_current_snapshot())::text::bigint AS upto) s
LEFT JOIN events e ON e.received_at >= $1 AND e.load_xid >= $2;

-- name: verify_duplicates_events
SELECT coalesce(sum(n - 1), 0) FROM (
  SELECT count(*) AS n FROM events
  WHERE received_at >= $1 AND event_id = ANY($2::uuid[])
  GROUP BY event_id HAVING count(*) > 1
) d;

-- analysts (`eventpipe analysts`, issue 18.1): which shops a role may read.

-- name: analyst_role
SELECT oid, rolname::text AS name, rolsuper, rolbypassrls, rolcanlogin
FROM pg_roles WHERE rolname = $1;

-- name: analyst_create_role_ddl
-- The statement text, quoted by the server (%I, %L); $2 a SCRAM verifier, never a
-- plain password, or NULL for a role that can't log in.
SELECT format('CREATE ROLE %I %s', $1::text,
              CASE WHEN $2::text IS NULL THEN 'NOLOGIN'
                   ELSE format('LOGIN PASSWORD %L', $2::text) END);

-- name: analyst_grant_group_ddl
SELECT format('GRANT eventpipe_analyst TO %I', $1::text);

-- name: analyst_grant_shop
INSERT INTO analyst_shops (role_id, shop_id) VALUES ($1, $2)
ON CONFLICT (role_id, shop_id) DO NOTHING;

-- name: analyst_revoke_shop
DELETE FROM analyst_shops WHERE role_id = $1 AND shop_id = $2 RETURNING shop_id;

-- name: analyst_memberships
-- A dropped role's rows are shown (role NULL) but grant nothing: the policies join pg_roles.
SELECT r.rolname::text AS role, m.role_id::bigint AS role_id, s.domain, s.id AS shop_id,
       m.granted_at, coalesce(r.rolcanlogin, false) AS can_login
FROM analyst_shops m
JOIN shops s ON s.id = m.shop_id
LEFT JOIN pg_roles r ON r.oid = m.role_id
WHERE ($1::text IS NULL OR r.rolname = $1) AND ($2::text IS NULL OR s.domain = $2)
ORDER BY r.rolname NULLS LAST, s.domain;

-- name: shop_create
-- `eventpipe shops add`: NULL when the domain exists.
INSERT INTO shops (domain, webhook_secret, allowed_origins, settings)
VALUES ($1, $2, $3::text[], $4::jsonb)
ON CONFLICT (domain) DO NOTHING
RETURNING id;

-- name: shop_list
-- `eventpipe shops list|show`: a shop's facts, never its webhook secret (see shop_secret).
SELECT s.id, s.domain, s.allowed_origins,
       CASE WHEN jsonb_typeof(s.settings->'data_retention_days') = 'number'
            THEN floor((s.settings->>'data_retention_days')::numeric)::int END AS retention_days,
       s.settings, s.installed_at, s.uninstalled_at,
       (SELECT count(*) FROM shop_write_keys k
        WHERE k.shop_id = s.id AND k.revoked_at IS NULL) AS live_keys
FROM shops s
WHERE $1::text IS NULL OR s.domain = $1
ORDER BY s.domain;

-- name: shop_secret
SELECT webhook_secret FROM shops WHERE domain = $1;

-- name: shop_set
-- `eventpipe shops set`: $2 true: any origin (NULL); else $3 (when not NULL) replaces the
-- origins; $4 (when not NULL) becomes settings.data_retention_days; the keys of $5 (an
-- object, when not NULL) are set in settings and the keys $6 removed (their defaults
-- apply). NULL: no such shop.
UPDATE shops SET
  allowed_origins = CASE WHEN $2::bool THEN NULL
                         WHEN $3::text[] IS NOT NULL THEN $3::text[]
                         ELSE allowed_origins END,
  settings = (CASE WHEN $4::int IS NULL THEN settings
                   ELSE settings || jsonb_build_object('data_retention_days', $4::int) END
              || coalesce($5::jsonb, '{}'::jsonb))
             - coalesce($6::text[], '{}'::text[]),
  updated_at = now()
WHERE domain = $1
RETURNING id;

-- name: pm_record_restore
-- `partitions restore`: the month put back, in the restore's own transaction. Who and when
-- are set by the table's trigger (migration 0010); $7: the rows erasures and uninstalled
-- shops' purges took out of it on the way back (migration 0015).
INSERT INTO partition_restores (table_name, partition_name, month, file, sha256, row_count,
                                privacy_rows)
VALUES ($1, $2, $3, $4, $5, $6, coalesce($7::jsonb, '{}'))
RETURNING id;

-- name: upsert_identities
-- One row per (shop, anonymous id) of a batch's identify/alias/group messages,
-- folded in time order (consumers.identities), merged with the stored row by
-- whether the batch is newer than its last seen: the newer side's user id,
-- group and trait values win, the older side fills what the newer lacks.
INSERT INTO identities AS i (
  shop_id, anon_id, user_id, traits, group_id, group_traits, first_seen_at, last_seen_at
)
SELECT u.shop_id, u.anon_id, u.user_id, u.traits::jsonb, u.group_id, u.group_traits::jsonb,
       u.first_seen_at, u.last_seen_at
FROM unnest(
  $1::uuid[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[],
  $7::timestamptz[], $8::timestamptz[]
) AS u(shop_id, anon_id, user_id, traits, group_id, group_traits, first_seen_at, last_seen_at)
ON CONFLICT (shop_id, anon_id) DO UPDATE SET
  user_id = CASE WHEN EXCLUDED.last_seen_at >= i.last_seen_at
                 THEN COALESCE(EXCLUDED.user_id, i.user_id)
                 ELSE COALESCE(i.user_id, EXCLUDED.user_id) END,
  traits = CASE WHEN EXCLUDED.last_seen_at >= i.last_seen_at
                THEN i.traits || EXCLUDED.traits ELSE EXCLUDED.traits || i.traits END,
  group_id = CASE WHEN EXCLUDED.last_seen_at >= i.last_seen_at
                  THEN COALESCE(EXCLUDED.group_id, i.group_id)
                  ELSE COALESCE(i.group_id, EXCLUDED.group_id) END,
  group_traits = CASE
    WHEN EXCLUDED.group_id IS NULL THEN i.group_traits
    WHEN i.group_id IS NULL OR i.group_id = EXCLUDED.group_id THEN
      CASE WHEN EXCLUDED.last_seen_at >= i.last_seen_at
           THEN i.group_traits || EXCLUDED.group_traits
           ELSE EXCLUDED.group_traits || i.group_traits END
    WHEN EXCLUDED.last_seen_at >= i.last_seen_at THEN EXCLUDED.group_traits
    ELSE i.group_traits END,
  first_seen_at = LEAST(i.first_seen_at, EXCLUDED.first_seen_at),
  last_seen_at = GREATEST(i.last_seen_at, EXCLUDED.last_seen_at),
  updated_at = now();

-- Rollups (issue 24, ingest/rollups): incremental refresh of the analysis tables.
-- Days are UTC days of the event time. Every group is recomputed whole from its
-- source rows (DELETE + INSERT in the refresh's transaction), so a late event of an
-- old day, a row loaded twice or a retention delete all end in the same rows.

-- name: rollup_lock
-- One refresh of a rollup at a time (a second one waits, then finds little to do).
SELECT pg_advisory_xact_lock(hashtext('eventpipe:rollup:' || $1));

-- name: rollup_claim
-- The rollup's watermark (the load_xid from which rows are new; NULL: never
-- refreshed since migration 0014) and this refresh's: the oldest transaction
-- still running now, every older one's rows visible from here on (migration 0014
-- explains why). upto_at: the statement's start, before that snapshot: every row
-- committed before it is in.
SELECT watermark, watermark_xid,
       pg_snapshot_xmin(pg_current_snapshot())::text::bigint AS upto_xid,
       greatest(watermark, statement_timestamp()) AS upto_at
FROM rollup_state WHERE rollup = $1 FOR UPDATE;

-- name: rollup_watermark_xid
-- Another rollup's watermark (component_performance reads conversion_funnels: it
-- never goes past the funnels' refresh).
SELECT watermark_xid, watermark FROM rollup_state WHERE rollup = $1;

-- name: rollup_advance
UPDATE rollup_state SET watermark = $2, watermark_xid = $6, last_refresh_at = now(),
  last_full_at = CASE WHEN $3::bool THEN now() ELSE last_full_at END,
  last_groups = $4, last_duration_ms = $5
WHERE rollup = $1;

-- name: rollup_status
SELECT rollup, watermark, last_refresh_at, last_full_at, last_groups, last_duration_ms,
       extract(epoch FROM now() - watermark)::float8 AS lag_s,
       CASE rollup
         WHEN 'daily_friction_summary' THEN (SELECT count(*) FROM daily_friction_summary)
         WHEN 'component_performance' THEN (SELECT count(*) FROM component_performance)
         WHEN 'results_aggregates' THEN (SELECT count(*) FROM results_aggregates)
         WHEN 'conversion_funnels' THEN (SELECT count(*) FROM conversion_funnels)
       END AS row_count
FROM rollup_state ORDER BY rollup;

-- name: rollup_behavior_days
-- (shop, day) groups of behavior events loaded by transactions from $1 on (BRIN on
-- load_xid): a late event of an old day names that old day, whenever it was received.
SELECT shop_id, ("timestamp" AT TIME ZONE 'UTC')::date AS day
FROM behavior_events WHERE load_xid >= $1
GROUP BY 1, 2;

-- name: rollup_behavior_days_all
SELECT shop_id, ("timestamp" AT TIME ZONE 'UTC')::date AS day
FROM behavior_events WHERE "timestamp" >= (SELECT retention_start('behavior_events'))
GROUP BY 1, 2;

-- name: rollup_behavior_days_shop
-- Shop $1's days ($2, or all when NULL) that have behavior events or friction rows.
SELECT $1::uuid AS shop_id, day FROM (
  SELECT ("timestamp" AT TIME ZONE 'UTC')::date AS day FROM behavior_events
  WHERE shop_id = $1 AND "timestamp" >= (SELECT retention_start('behavior_events'))
  UNION SELECT date FROM daily_friction_summary WHERE shop_id = $1
  UNION SELECT date FROM component_performance WHERE shop_id = $1
) d WHERE $2::date[] IS NULL OR day = ANY($2::date[]);

-- name: rollup_behavior_component_days
-- component_performance's groups: days of component events loaded from $1 on, and
-- every component day of a session whose funnels may have changed (new events of
-- the session since $1, or its shop's lead_capture funnel defined since $1):
-- conversions count the sessions in lead_capture.
WITH touched AS (
  SELECT shop_id, session_id FROM behavior_events WHERE load_xid >= $1
  UNION SELECT shop_id, session_id FROM events WHERE load_xid >= $1
)
SELECT shop_id, ("timestamp" AT TIME ZONE 'UTC')::date AS day
FROM behavior_events
WHERE load_xid >= $1 AND component_id IS NOT NULL
GROUP BY 1, 2
UNION
SELECT be.shop_id, (be."timestamp" AT TIME ZONE 'UTC')::date
FROM touched t
JOIN funnels f ON f.shop_id = t.shop_id AND f.name = 'lead_capture'
JOIN behavior_events be ON be.session_id = t.session_id AND be.shop_id = t.shop_id
WHERE be.component_id IS NOT NULL
UNION
SELECT be.shop_id, (be."timestamp" AT TIME ZONE 'UTC')::date
FROM funnels f JOIN behavior_events be ON be.shop_id = f.shop_id
WHERE f.name = 'lead_capture' AND f.defined_xid >= $1 AND be.component_id IS NOT NULL
  AND be."timestamp" >= (SELECT retention_start('behavior_events'));

-- name: rollup_friction_delete
DELETE FROM daily_friction_summary d USING unnest($1::uuid[], $2::date[]) g(shop_id, day)
WHERE d.shop_id = g.shop_id AND d.date = g.day;

-- name: rollup_friction_delete_all
DELETE FROM daily_friction_summary;

-- name: rollup_friction_insert
-- 002's daily_friction_summary per shop, for the groups ($1[i], $2[i]). hesitation_ms
-- only when it is a JSON number (a string would make the document's cast fail the
-- whole refresh).
INSERT INTO daily_friction_summary (shop_id, date, element_path, event_type, event_count,
  unique_sessions, avg_hesitation_ms, median_hesitation_ms, form_abandons, form_submits)
SELECT be.shop_id, g.day, be.element_path, be.event_type, COUNT(*),
  COUNT(DISTINCT be.session_id),
  AVG(h.ms),
  PERCENTILE_CONT(0.5) WITHIN GROUP (ORDER BY h.ms),
  SUM(CASE WHEN be.event_type = 'form_abandon' THEN 1 ELSE 0 END),
  SUM(CASE WHEN be.event_type = 'form_submit' THEN 1 ELSE 0 END)
FROM unnest($1::uuid[], $2::date[]) g(shop_id, day)
-- Each group's day read through (shop_id, "timestamp") of its one partition: OFFSET 0
-- keeps the subquery a parameterized scan per group (joined flat, the planner hashes
-- every partition whole against a handful of groups).
CROSS JOIN LATERAL (
  SELECT b.shop_id, b.element_path, b.event_type, b.session_id, b.event_data
  FROM behavior_events b
  WHERE b.shop_id = g.shop_id
    AND b."timestamp" >= (g.day::timestamp AT TIME ZONE 'UTC')
    AND b."timestamp" < ((g.day + 1)::timestamp AT TIME ZONE 'UTC')
    AND b."timestamp" >= (SELECT retention_start('behavior_events'))
  OFFSET 0) be
CROSS JOIN LATERAL (SELECT CASE WHEN jsonb_typeof(be.event_data->'hesitation_ms') = 'number'
  THEN (be.event_data->>'hesitation_ms')::numeric END AS ms) h
GROUP BY be.shop_id, g.day, be.element_path, be.event_type;

-- name: rollup_component_delete
DELETE FROM component_performance c USING unnest($1::uuid[], $2::date[]) g(shop_id, day)
WHERE c.shop_id = g.shop_id AND c.date = g.day;

-- name: rollup_component_delete_all
DELETE FROM component_performance;

-- name: rollup_component_insert
-- 002's component_performance per shop and day; conversions: sessions in the
-- shop's 'lead_capture' funnel, as the document counts them.
INSERT INTO component_performance (shop_id, date, component_id, page_url, total_interactions,
  unique_users, clicks, rage_clicks, hesitations, avg_hesitation_ms, conversions, first_seen,
  last_seen)
SELECT be.shop_id, g.day, be.component_id, be.page_url, COUNT(*),
  COUNT(DISTINCT be.session_id),
  SUM(CASE WHEN be.event_type = 'click' THEN 1 ELSE 0 END),
  SUM(CASE WHEN be.event_type = 'rage_click' THEN 1 ELSE 0 END),
  SUM(CASE WHEN be.event_type = 'hesitation' THEN 1 ELSE 0 END),
  AVG(CASE WHEN jsonb_typeof(be.event_data->'hesitation_ms') = 'number'
      THEN (be.event_data->>'hesitation_ms')::numeric END),
  COUNT(DISTINCT cf.session_id),
  MIN(be."timestamp"), MAX(be."timestamp")
FROM unnest($1::uuid[], $2::date[]) g(shop_id, day)
CROSS JOIN LATERAL (  -- a parameterized scan per group (see rollup_friction_insert)
  SELECT b.shop_id, b.component_id, b.page_url, b.event_type, b.session_id, b.event_data,
         b."timestamp"
  FROM behavior_events b
  WHERE b.shop_id = g.shop_id
    AND b."timestamp" >= (g.day::timestamp AT TIME ZONE 'UTC')
    AND b."timestamp" < ((g.day + 1)::timestamp AT TIME ZONE 'UTC')
    AND b.component_id IS NOT NULL
    AND b."timestamp" >= (SELECT retention_start('behavior_events'))
  OFFSET 0) be
LEFT JOIN (SELECT DISTINCT shop_id, session_id FROM conversion_funnels
           WHERE funnel_name = 'lead_capture') cf
  ON cf.shop_id = be.shop_id AND cf.session_id = be.session_id
GROUP BY be.shop_id, g.day, be.component_id, be.page_url;

-- name: rollup_daily_prune
-- Rows past behavior_events' retention, or past their shop's data_retention_days: per
-- shop (the later of the two limits), so each table is read through its (shop_id, day)
-- index, not scanned whole at every refresh.
WITH lim AS (
  SELECT s.id AS shop_id,
         greatest((SELECT retention_start('behavior_events')),
                  CASE WHEN jsonb_typeof(s.settings->'data_retention_days') = 'number'
                       THEN now() - make_interval(
                         days => floor((s.settings->>'data_retention_days')::numeric)::int)
                  END) AS at
  FROM shops s
), gone AS (
  DELETE FROM daily_friction_summary d USING lim
  WHERE d.shop_id = lim.shop_id AND d.date < (lim.at AT TIME ZONE 'UTC')::date
  RETURNING 1
), gone2 AS (
  DELETE FROM component_performance c USING lim
  WHERE c.shop_id = lim.shop_id AND c.date < (lim.at AT TIME ZONE 'UTC')::date
  RETURNING 1
), gone3 AS (
  DELETE FROM conversion_funnels c USING lim
  WHERE c.shop_id = lim.shop_id AND c.entered_at < lim.at
  RETURNING 1
)
SELECT (SELECT count(*) FROM gone) + (SELECT count(*) FROM gone2) + (SELECT count(*) FROM gone3);

-- name: rollup_experiment_groups
-- (shop, experiment) groups of storefront events loaded by transactions from $1 on.
SELECT shop_id, experiment_id AS key
FROM events
WHERE load_xid >= $1 AND experiment_id IS NOT NULL AND variant IS NOT NULL
GROUP BY 1, 2;

-- name: rollup_experiment_groups_all
SELECT shop_id, experiment_id AS key
FROM events
WHERE experiment_id IS NOT NULL AND variant IS NOT NULL
  AND ts >= (SELECT retention_start('events'))
GROUP BY 1, 2;

-- name: rollup_experiment_groups_shop
-- Shop $1's experiments, in its events or in its results rows.
SELECT $1::uuid AS shop_id, key FROM (
  SELECT experiment_id AS key FROM events
  WHERE shop_id = $1 AND experiment_id IS NOT NULL AND variant IS NOT NULL
    AND ts >= (SELECT retention_start('events'))
  UNION SELECT experiment_id FROM results_aggregates WHERE shop_id = $1
) x;

-- name: rollup_results_delete
DELETE FROM results_aggregates r USING unnest($1::uuid[], $2::text[]) g(shop_id, experiment_id)
WHERE r.shop_id = g.shop_id AND r.experiment_id = g.experiment_id;

-- name: rollup_results_delete_all
DELETE FROM results_aggregates;

-- name: rollup_results_insert
-- 004's results_aggregates over the events tagged with the experiment (exposures and
-- the outcome events that carry it for attribution). A visitor (anon_id) counts once
-- per variant and segment however many events it has; the segment is the session's
-- device type. Revenue: a purchase's props.value when it is a number or a decimal text.
INSERT INTO results_aggregates (shop_id, experiment_id, variant, segment, visitors, views,
  add_to_cart, begin_checkout, purchase, revenue)
SELECT e.shop_id, e.experiment_id, e.variant, coalesce(us.device_type, 'unknown'),
  COUNT(DISTINCT e.anon_id),
  COUNT(*) FILTER (WHERE e.event_type IN ('page_view', 'product_view')),
  COUNT(*) FILTER (WHERE e.event_type = 'add_to_cart'),
  COUNT(*) FILTER (WHERE e.event_type = 'begin_checkout'),
  COUNT(*) FILTER (WHERE e.event_type = 'purchase'),
  coalesce(SUM(CASE WHEN e.event_type = 'purchase'
                     AND (e.props->>'value') ~ '^-?[0-9]{1,11}(\.[0-9]+)?$'
                    THEN (e.props->>'value')::numeric END), 0)
FROM unnest($1::uuid[], $2::text[]) g(shop_id, experiment_id)
JOIN events e ON e.shop_id = g.shop_id AND e.experiment_id = g.experiment_id
LEFT JOIN user_sessions us ON us.shop_id = e.shop_id AND us.session_id = e.session_id
WHERE e.variant IS NOT NULL AND e.ts >= (SELECT retention_start('events'))
GROUP BY e.shop_id, e.experiment_id, e.variant, coalesce(us.device_type, 'unknown');

-- name: rollup_funnel_sessions
-- conversion_funnels' groups: (shop, session) of the shops with funnels whose behavior
-- or storefront events were loaded from $1 on, and every session of a shop whose
-- funnels were (re)defined since $1.
SELECT shop_id, session_id AS key FROM behavior_events
WHERE load_xid >= $1 AND shop_id IN (SELECT shop_id FROM funnels)
UNION
SELECT shop_id, session_id FROM events
WHERE load_xid >= $1 AND shop_id IN (SELECT shop_id FROM funnels)
UNION
SELECT be.shop_id, be.session_id FROM behavior_events be
WHERE be.shop_id IN (SELECT shop_id FROM funnels WHERE defined_xid >= $1)
  AND be."timestamp" >= (SELECT retention_start('behavior_events'))
UNION
SELECT e.shop_id, e.session_id FROM events e
WHERE e.shop_id IN (SELECT shop_id FROM funnels WHERE defined_xid >= $1)
  AND e.ts >= (SELECT retention_start('events'));

-- name: rollup_funnel_sessions_all
SELECT be.shop_id, be.session_id AS key FROM behavior_events be
WHERE be.shop_id IN (SELECT shop_id FROM funnels)
  AND be."timestamp" >= (SELECT retention_start('behavior_events'))
UNION
SELECT e.shop_id, e.session_id FROM events e
WHERE e.shop_id IN (SELECT shop_id FROM funnels)
  AND e.ts >= (SELECT retention_start('events'));

-- name: rollup_funnel_sessions_shop
-- Shop $1's sessions: those with events, and those with funnel rows (erased ones).
SELECT $1::uuid AS shop_id, key FROM (
  SELECT session_id AS key FROM behavior_events
  WHERE shop_id = $1 AND "timestamp" >= (SELECT retention_start('behavior_events'))
  UNION SELECT session_id FROM events
  WHERE shop_id = $1 AND ts >= (SELECT retention_start('events'))
  UNION SELECT session_id FROM conversion_funnels WHERE shop_id = $1
) s;

-- name: rollup_funnel_delete
DELETE FROM conversion_funnels c USING unnest($1::uuid[], $2::text[]) g(shop_id, session_id)
WHERE c.shop_id = g.shop_id AND c.session_id = g.session_id;

-- name: rollup_funnel_delete_all
DELETE FROM conversion_funnels;

-- name: rollup_funnel_stage
-- The events of the sessions being recomputed, behavior (src 0) and storefront (src 1)
-- alike, in one temporary table the funnel walk reads step by step.
CREATE TEMP TABLE IF NOT EXISTS _funnel_events (
  shop_id UUID NOT NULL, session_id TEXT NOT NULL, at TIMESTAMPTZ NOT NULL,
  src SMALLINT NOT NULL, event_id UUID NOT NULL, event_type TEXT NOT NULL, page_url TEXT,
  element_path TEXT, component_id TEXT
) ON COMMIT DROP;

-- name: rollup_funnel_stage_fill
-- A storefront event's page: props.url (Segment page), $url (Snowplow), $current_url
-- (PostHog).
INSERT INTO _funnel_events
SELECT be.shop_id, be.session_id, be."timestamp", 0, be.event_id, be.event_type, be.page_url,
  be.element_path, be.component_id
FROM unnest($1::uuid[], $2::text[]) g(shop_id, session_id)
JOIN behavior_events be ON be.session_id = g.session_id AND be.shop_id = g.shop_id
WHERE be."timestamp" >= (SELECT retention_start('behavior_events'))
UNION ALL
SELECT e.shop_id, e.session_id, e.ts, 1, e.event_id, e.event_type,
  coalesce(e.props->>'url', e.props->>'$url', e.props->>'$current_url'), NULL, NULL
FROM unnest($1::uuid[], $2::text[]) g(shop_id, session_id)
JOIN events e ON e.shop_id = g.shop_id AND e.session_id = g.session_id
WHERE e.ts >= (SELECT retention_start('events'));

-- name: rollup_funnel_stage_index
CREATE INDEX IF NOT EXISTS _funnel_events_order ON _funnel_events (shop_id, session_id, at, src, event_id);

-- name: rollup_funnel_stage_analyze
ANALYZE _funnel_events;

-- name: rollup_funnel_insert
-- 002's conversion_funnels for the sessions ($1[i], $2[i]) staged in _funnel_events.
-- A session enters a funnel's step 1 at its first event matching it, and step k at
-- its first event matching step k after the one that entered step k-1 (events in
-- (time, behavior before storefront, event id) order; one event enters one step).
-- A step matches an event when every criterion it gives does: event_type, page_url
-- (glob), element_path, component_id. exited_at: when the next step was entered; a
-- funnel's last step is left as it is entered (metadata.completed); the last step a
-- session reached short of the end is left at the session's last event, with a
-- dropoff_reason: its latest friction event (form_abandon, error, rage_click) after
-- entering the step, else the session's exit_reason, else 'session_ended'.
-- component_id: that of the event that entered the step.
WITH RECURSIVE steps AS (
  SELECT f.shop_id, f.name, s.ord::int AS step_order,
         jsonb_array_length(f.steps) AS n_steps,
         coalesce(s.step->>'name', 'step ' || s.ord) AS step_name,
         s.step->>'event_type' AS event_type,
         eventpipe_glob_like(s.step->>'page_url') AS url_like,
         s.step->>'element_path' AS element_path,
         s.step->>'component_id' AS component_id
  FROM funnels f CROSS JOIN LATERAL jsonb_array_elements(f.steps) WITH ORDINALITY s(step, ord)
  WHERE f.shop_id = ANY($1::uuid[])
), sessions AS (
  SELECT DISTINCT shop_id, session_id FROM unnest($1::uuid[], $2::text[]) g(shop_id, session_id)
), walk AS (
  SELECT st.shop_id, st.name, st.step_order, st.n_steps, st.step_name, ss.session_id,
         m.at, m.src, m.event_id, m.component_id, m.page_url
  FROM sessions ss
  JOIN steps st ON st.shop_id = ss.shop_id AND st.step_order = 1
  CROSS JOIN LATERAL (
    SELECT e.at, e.src, e.event_id, e.component_id, e.page_url FROM _funnel_events e
    WHERE e.shop_id = ss.shop_id AND e.session_id = ss.session_id
      AND (st.event_type IS NULL OR e.event_type = st.event_type)
      AND (st.url_like IS NULL OR e.page_url LIKE st.url_like)
      AND (st.element_path IS NULL OR e.element_path = st.element_path)
      AND (st.component_id IS NULL OR e.component_id = st.component_id)
    ORDER BY e.at, e.src, e.event_id LIMIT 1) m
  UNION ALL
  SELECT st.shop_id, st.name, st.step_order, st.n_steps, st.step_name, w.session_id,
         m.at, m.src, m.event_id, m.component_id, m.page_url
  FROM walk w
  JOIN steps st ON st.shop_id = w.shop_id AND st.name = w.name AND st.step_order = w.step_order + 1
  CROSS JOIN LATERAL (
    SELECT e.at, e.src, e.event_id, e.component_id, e.page_url FROM _funnel_events e
    WHERE e.shop_id = w.shop_id AND e.session_id = w.session_id
      AND (e.at, e.src, e.event_id) > (w.at, w.src, w.event_id)
      AND (st.event_type IS NULL OR e.event_type = st.event_type)
      AND (st.url_like IS NULL OR e.page_url LIKE st.url_like)
      AND (st.element_path IS NULL OR e.element_path = st.element_path)
      AND (st.component_id IS NULL OR e.component_id = st.component_id)
    ORDER BY e.at, e.src, e.event_id LIMIT 1) m
), placed AS (
  SELECT w.*, nx.at AS next_at,
         (SELECT max(e.at) FROM _funnel_events e
          WHERE e.shop_id = w.shop_id AND e.session_id = w.session_id) AS last_at
  FROM walk w
  LEFT JOIN walk nx ON nx.shop_id = w.shop_id AND nx.name = w.name
    AND nx.session_id = w.session_id AND nx.step_order = w.step_order + 1
), left_at AS (
  SELECT p.*, CASE WHEN p.next_at IS NOT NULL THEN p.next_at
                   WHEN p.step_order = p.n_steps THEN p.at
                   ELSE p.last_at END AS exited_at,
         p.next_at IS NULL AND p.step_order < p.n_steps AS dropped
  FROM placed p
)
INSERT INTO conversion_funnels (shop_id, funnel_name, step_name, step_order, session_id,
  component_id, entered_at, exited_at, duration_seconds, dropoff_reason, metadata)
SELECT l.shop_id, l.name, l.step_name, l.step_order, l.session_id, l.component_id, l.at,
  l.exited_at, floor(extract(epoch FROM l.exited_at - l.at))::int,
  CASE WHEN l.dropped THEN coalesce(
    (SELECT e.event_type FROM _funnel_events e
     WHERE e.shop_id = l.shop_id AND e.session_id = l.session_id AND e.src = 0
       AND e.event_type IN ('form_abandon', 'error', 'rage_click')
       AND (e.at, e.src, e.event_id) > (l.at, l.src, l.event_id)
     ORDER BY e.at DESC, e.src DESC, e.event_id DESC LIMIT 1),
    (SELECT us.exit_reason FROM user_sessions us
     WHERE us.shop_id = l.shop_id AND us.session_id = l.session_id),
    'session_ended') END,
  jsonb_build_object('source', CASE l.src WHEN 0 THEN 'behavior' ELSE 'storefront' END,
                     'event_id', l.event_id, 'page_url', l.page_url,
                     'completed', l.step_order = l.n_steps)
FROM left_at l;

-- name: funnel_define
-- `eventpipe funnels define`: a new funnel or new steps for one (refreshed again).
INSERT INTO funnels (shop_id, name, steps) VALUES ($1, $2, $3::jsonb)
ON CONFLICT (shop_id, name) DO UPDATE SET steps = EXCLUDED.steps,
  defined_xid = EXCLUDED.defined_xid, updated_at = now()
RETURNING (xmax = 0) AS created;

-- name: funnel_list
SELECT f.name, f.steps, f.created_at, f.updated_at,
       (SELECT count(DISTINCT c.session_id) FROM conversion_funnels c
        WHERE c.shop_id = f.shop_id AND c.funnel_name = f.name) AS sessions
FROM funnels f WHERE f.shop_id = $1 ORDER BY f.name;

-- name: funnel_drop
-- `eventpipe funnels drop`: the funnel and its conversion_funnels rows.
WITH gone AS (DELETE FROM funnels WHERE shop_id = $1 AND name = $2 RETURNING name)
, rows AS (DELETE FROM conversion_funnels c USING gone
           WHERE c.shop_id = $1 AND c.funnel_name = gone.name RETURNING 1)
SELECT (SELECT count(*) FROM gone) AS funnels, (SELECT count(*) FROM rows) AS rows;

-- name: erase_shop
-- `eventpipe erase`: the shop of a domain.
SELECT id FROM shops WHERE domain = $1;

-- name: erase_tables
-- `eventpipe erase`: every table of the schema holding a visitor's rows (a shop_id and an
-- anon_id, session_id or user_id column): the event tables, sessions, identities and
-- rollups alike, whichever migrations made them. Partitions are reached through their
-- parent (erase_leaves). The erasure's own bookkeeping is never a target.
SELECT c.relname AS table_name, c.relkind = 'p' AS partitioned,
       array_agg(a.attname::text ORDER BY a.attname) FILTER (
         WHERE a.attname IN ('anon_id', 'session_id', 'user_id')) AS id_columns,
       array_agg(a.attname::text) FILTER (WHERE a.attname IN ('props', 'metadata')
         AND a.atttypid = 'jsonb'::regtype) AS json_columns
FROM pg_class c
JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
WHERE c.relnamespace = current_schema()::regnamespace
  AND c.relkind IN ('r', 'p') AND NOT c.relispartition
  AND c.relname NOT LIKE 'erasure\_%'
GROUP BY c.oid, c.relname, c.relkind
HAVING bool_or(a.attname = 'shop_id')
   AND bool_or(a.attname IN ('anon_id', 'session_id', 'user_id'))
ORDER BY c.relname;

-- name: erase_leaves
-- The leaf partitions of partitioned table $1, attached now.
SELECT c.relname AS name
FROM pg_partition_tree($1::regclass) t JOIN pg_class c ON c.oid = t.relid
WHERE t.isleaf AND c.relkind = 'r'
ORDER BY c.relname;

-- name: erase_sessions_of_anon
-- The sessions of anonymous ids $2 of shop $1 (their behavior events carry no anon_id).
SELECT DISTINCT session_id FROM events WHERE shop_id = $1 AND anon_id = ANY($2::text[]);

-- name: erase_previous
-- Earlier finished requests of shop $1 that named one of the same ids (HMACs $2).
SELECT id FROM erasure_requests
WHERE shop_id = $1 AND id_hashes && $2::bytea[] AND finished_at IS NOT NULL
ORDER BY id;

-- name: erase_record_request
-- The request, before anything is deleted (who and when are set by its trigger).
INSERT INTO erasure_requests (shop_id, shop_domain, id_kinds, id_hashes)
VALUES ($1, $2, $3::text[], $4::bytea[])
RETURNING id;

-- name: erase_suppress
-- The loaders drop events of these (shop, HMAC) from now on.
INSERT INTO erasure_suppressions (shop_id, id_hash, request_id)
SELECT $1, h, $3 FROM unnest($2::bytea[]) AS h
ON CONFLICT DO NOTHING;

-- name: erase_finish
UPDATE erasure_requests SET rows_removed = $2::jsonb, finished_at = now() WHERE id = $1;

-- name: erase_status
-- `eventpipe erase status`: the latest $1 requests (no ids: they are not kept).
SELECT id, requested_by, requested_at, shop_domain, id_kinds, rows_removed, finished_at
FROM erasure_requests ORDER BY id DESC LIMIT $1;

-- name: erase_salt
SELECT erasure_salt();

-- name: erase_dead_letter_span
SELECT coalesce(min(id), 0) AS low, coalesce(max(id), -1) AS high FROM dead_letters;

-- name: erase_dead_letters
-- One window of dead letters (ids $5 <= id < $6): each record decoded (not a text
-- search: eventpipe_try_jsonb, NULL when not UTF-8 JSON), each of its events matched on
-- its shop ($1, text) and ids ($2 anon_ids, $3 session_ids, $4 user_ids), or on the shop
-- alone when $8 (an uninstalled shop's purge). A record of matched events alone is
-- deleted; a batch holding others' events too keeps theirs only. $7: dry run (count,
-- change nothing). ``matched``: the records holding a matched event.
WITH decoded AS (
  SELECT id, j FROM (
    SELECT id, eventpipe_try_jsonb(raw) AS j FROM dead_letters WHERE id >= $5 AND id < $6
  ) s WHERE j IS NOT NULL
), matched AS (
  SELECT d.id, jsonb_typeof(d.j) = 'array' AS batched,
         coalesce(jsonb_agg(x.e) FILTER (WHERE NOT x.hit), '[]'::jsonb) AS kept,
         bool_or(x.hit) AS any_hit
  FROM decoded d,
       LATERAL (
         SELECT e, coalesce(e ->> 'shop_id' = $1::text AND ($8::bool
                  OR e ->> 'anon_id' = ANY($2::text[])
                  OR e ->> 'session_id' = ANY($3::text[])
                  OR e ->> 'user_id' = ANY($4::text[])
                  OR e -> 'props' ->> '$user_id' = ANY($4::text[])
                  OR e -> 'metadata' ->> 'user_id' = ANY($4::text[])), false) AS hit
         FROM jsonb_array_elements(
           CASE jsonb_typeof(d.j) WHEN 'array' THEN d.j ELSE jsonb_build_array(d.j) END) AS e
       ) x
  GROUP BY d.id, d.j
), removed AS (
  DELETE FROM dead_letters t USING matched m
  WHERE NOT $7::bool AND t.id = m.id AND m.any_hit
    AND (NOT m.batched OR jsonb_array_length(m.kept) = 0)
  RETURNING t.id
), trimmed AS (
  UPDATE dead_letters t SET raw = convert_to(m.kept::text, 'UTF8')
  FROM matched m
  WHERE NOT $7::bool AND t.id = m.id AND m.any_hit AND m.batched
    AND jsonb_array_length(m.kept) > 0
  RETURNING t.id
)
SELECT (SELECT count(*) FROM matched WHERE any_hit) AS matched,
       (SELECT count(*) FROM removed) AS removed,
       (SELECT count(*) FROM trimmed) AS trimmed;

-- name: suppression_list
-- The loaders' suppression list: (shop, HMAC of kind and id) of erased visitors.
SELECT shop_id::text AS shop_id, id_hash FROM erasure_suppressions;

-- name: pm_uninstalled_shops
-- Uninstalled shops (source document 004): when their rows are due to go ($1: days kept
-- when settings hold no data_retention_days), what happens to them ($2: delete or
-- anonymize, unless settings.uninstalled_data says; a purge begun keeps its mode), and
-- the purge of that uninstall, if begun.
SELECT s.id, s.uninstalled_at, s.uninstalled_at + make_interval(days => d.days) AS due_at,
       coalesce(p.mode, m.mode) AS mode, p.finished_at, coalesce(p.rows, '{}')::text AS rows
FROM shops s
CROSS JOIN LATERAL (
  SELECT CASE WHEN jsonb_typeof(s.settings->'data_retention_days') = 'number'
                   AND (s.settings->>'data_retention_days')::numeric >= 0
              THEN floor((s.settings->>'data_retention_days')::numeric)::int
              ELSE $1::int END AS days) d
CROSS JOIN LATERAL (
  SELECT CASE WHEN s.settings->>'uninstalled_data' IN ('delete', 'anonymize')
              THEN s.settings->>'uninstalled_data' ELSE $2::text END AS mode) m
LEFT JOIN shop_purges p ON p.shop_id = s.id AND p.uninstalled_at = s.uninstalled_at
WHERE s.uninstalled_at IS NOT NULL
ORDER BY s.uninstalled_at, s.id;

-- name: pm_shop_tables
-- Every table holding a shop's rows (a shop_id column), partitioned parents with their
-- leaves reached through erase_leaves, detached months as the plain tables they are;
-- not the shop itself, its keys and grants, the erasure records or this purge's own.
SELECT c.relname::text AS table_name, c.relkind = 'p' AS partitioned,
       array_agg(a.attname::text ORDER BY a.attnum) AS columns
FROM pg_class c
JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
WHERE c.relnamespace = current_schema()::regnamespace
  AND c.relkind IN ('r', 'p') AND NOT c.relispartition
  AND c.relname NOT IN ('shops', 'shop_write_keys', 'analyst_shops', 'shop_purges', 'dead_letters')
  AND c.relname NOT LIKE 'erasure\_%'
GROUP BY c.oid, c.relname, c.relkind
HAVING bool_or(a.attname = 'shop_id')
ORDER BY c.relname;

-- name: pm_shop_purge_start
-- The purge of shop $1's uninstall at $3 begins in mode $2 (again after a reinstall).
INSERT INTO shop_purges (shop_id, mode, uninstalled_at) VALUES ($1, $2, $3)
ON CONFLICT (shop_id) DO UPDATE
  SET mode = EXCLUDED.mode, uninstalled_at = EXCLUDED.uninstalled_at, started_at = now(),
      finished_at = NULL, rows = '{}'
  WHERE shop_purges.uninstalled_at IS DISTINCT FROM EXCLUDED.uninstalled_at;

-- name: pm_shop_purge_rows
-- $3 more rows of table $2 deleted or anonymised for shop $1.
UPDATE shop_purges
SET rows = rows || jsonb_build_object($2::text, coalesce((rows->>$2::text)::bigint, 0) + $3::bigint)
WHERE shop_id = $1;

-- name: pm_shop_purge_finish
UPDATE shop_purges SET finished_at = now() WHERE shop_id = $1;

-- name: shop_uninstall
-- `eventpipe shops uninstall`: uninstalled now (an earlier uninstall's time kept) and every
-- live key revoked; returns the uninstall time and the keys revoked. NULL: no such shop.
WITH s AS (
  UPDATE shops SET uninstalled_at = coalesce(uninstalled_at, now()), updated_at = now()
  WHERE domain = $1
  RETURNING id, uninstalled_at
), k AS (
  UPDATE shop_write_keys SET revoked_at = now()
  WHERE shop_id = (SELECT id FROM s) AND revoked_at IS NULL
  RETURNING write_key
)
SELECT (SELECT uninstalled_at FROM s) AS uninstalled_at, (SELECT count(*) FROM k) AS revoked,
       (SELECT id FROM s) AS id;

-- name: pm_restore_purges
-- `partitions restore`: shops whose purge (begun or finished) answers their current
-- uninstall, with its mode: a month put back gets the same treatment.
SELECT p.shop_id, p.mode
FROM shop_purges p JOIN shops s ON s.id = p.shop_id AND s.uninstalled_at = p.uninstalled_at
ORDER BY p.shop_id;

-- name: pm_restore_suppressions
-- `partitions restore`: every erased visitor, as (shop, HMACs): a month put back loses them.
SELECT shop_id, array_agg(id_hash) AS hashes FROM erasure_suppressions GROUP BY shop_id;
