-- Core schema: tenants, the two partitioned event tables, sessions, and the
-- bookkeeping the loaders and the partition manager need.
-- Shapes follow the source documents (002: user_sessions, behavior_events;
-- 004: shops, events), adapted for ingestion: every event row carries shop_id,
-- event_id and received_at; uniqueness is (event_id, <event time>); no foreign
-- keys from the partitioned tables (a COPY must never wait on a lookup).
-- The partitioned tables have no DEFAULT partition: the partition manager
-- creates months ahead and on demand, and a default partition would forbid
-- DETACH PARTITION ... CONCURRENTLY.

CREATE TABLE shops (
  id                UUID PRIMARY KEY DEFAULT gen_random_uuid(),
  domain            TEXT NOT NULL UNIQUE,
  -- The source document keeps the Shopify access token here; the pipeline
  -- never calls Shopify, so it may be NULL.
  access_token_enc  BYTEA,
  scope             TEXT,
  plan              TEXT NOT NULL DEFAULT 'starter',
  installed_at      TIMESTAMPTZ NOT NULL DEFAULT now(),
  updated_at        TIMESTAMPTZ NOT NULL DEFAULT now(),
  settings          JSONB NOT NULL DEFAULT '{}',
  uninstalled_at    TIMESTAMPTZ,
  webhook_secret    TEXT NOT NULL,
  allowed_origins   TEXT[]  -- NULL: any origin may post beacons
);
CREATE INDEX idx_shops_installed ON shops(installed_at) WHERE uninstalled_at IS NULL;

-- Public write keys; two may be live at once so a key rotates without downtime.
CREATE TABLE shop_write_keys (
  write_key   TEXT PRIMARY KEY,
  shop_id     UUID NOT NULL REFERENCES shops(id) ON DELETE CASCADE,
  created_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
  revoked_at  TIMESTAMPTZ
);
CREATE INDEX idx_shop_write_keys_shop ON shop_write_keys(shop_id);

CREATE TABLE user_sessions (
  id                 UUID NOT NULL DEFAULT gen_random_uuid(),
  shop_id            UUID NOT NULL,
  session_id         TEXT NOT NULL,
  user_agent         TEXT,
  referrer           TEXT,
  landing_page       TEXT NOT NULL,
  exit_page          TEXT,
  exit_reason        TEXT CHECK (exit_reason IN ('timeout', 'navigation', 'close', 'refresh')),
  device_type        TEXT CHECK (device_type IN ('mobile', 'desktop', 'tablet')),
  screen_resolution  TEXT,
  language           TEXT,
  country_code       CHAR(2),
  first_seen_at      TIMESTAMPTZ NOT NULL,
  last_seen_at       TIMESTAMPTZ NOT NULL,
  created_at         TIMESTAMPTZ NOT NULL DEFAULT now(),
  updated_at         TIMESTAMPTZ NOT NULL DEFAULT now(),
  duration_seconds   INTEGER,
  page_count         INTEGER NOT NULL DEFAULT 0,
  PRIMARY KEY (shop_id, session_id)
);
CREATE INDEX idx_user_sessions_created_at ON user_sessions(created_at);
CREATE INDEX idx_user_sessions_exit_reason ON user_sessions(exit_reason);

CREATE TABLE behavior_events (
  event_id       UUID NOT NULL,
  shop_id        UUID NOT NULL,
  session_id     TEXT NOT NULL,
  event_type     TEXT NOT NULL CHECK (event_type IN (
    'click', 'scroll', 'hover', 'rage_click', 'hesitation', 'form_start',
    'form_abandon', 'form_submit', 'error', 'page_view', 'time_on_element',
    'scroll_depth'
  )),
  element_path   TEXT,
  element_type   TEXT,
  element_text   TEXT,
  coordinates    JSONB,
  viewport_size  JSONB,
  event_data     JSONB NOT NULL DEFAULT '{}',
  "timestamp"    TIMESTAMPTZ NOT NULL,
  page_url       TEXT NOT NULL,
  component_id   TEXT,
  metadata       JSONB NOT NULL DEFAULT '{}',
  received_at    TIMESTAMPTZ NOT NULL,
  PRIMARY KEY (event_id, "timestamp")
) PARTITION BY RANGE ("timestamp");
CREATE INDEX idx_behavior_events_shop_ts ON behavior_events(shop_id, "timestamp");
CREATE INDEX idx_behavior_events_session_id ON behavior_events(session_id);
CREATE INDEX idx_behavior_events_event_type ON behavior_events(event_type);
CREATE INDEX idx_behavior_events_component_id ON behavior_events(component_id);

-- Storefront events (source document 004), event_id instead of a BIGSERIAL.
CREATE TABLE events (
  event_id       UUID NOT NULL,
  shop_id        UUID NOT NULL,
  anon_id        TEXT NOT NULL,
  session_id     TEXT NOT NULL,
  event_type     TEXT NOT NULL,
  ts             TIMESTAMPTZ NOT NULL,
  props          JSONB NOT NULL DEFAULT '{}',
  product_id     TEXT,
  experiment_id  TEXT,
  variant        TEXT,
  received_at    TIMESTAMPTZ NOT NULL,
  PRIMARY KEY (event_id, ts)
) PARTITION BY RANGE (ts);
CREATE INDEX idx_events_shop_ts ON events(shop_id, ts);
CREATE INDEX idx_events_shop_type_ts ON events(shop_id, event_type, ts);
CREATE INDEX idx_events_experiment ON events(shop_id, experiment_id, variant, ts)
  WHERE experiment_id IS NOT NULL;

-- How each partitioned table is kept: months made ahead, what leaves and how.
CREATE TABLE partition_policies (
  table_name        TEXT PRIMARY KEY,
  partition_column  TEXT NOT NULL,
  partition_interval TEXT NOT NULL DEFAULT 'monthly' CHECK (partition_interval = 'monthly'),
  months_ahead      INTEGER NOT NULL DEFAULT 3 CHECK (months_ahead BETWEEN 0 AND 24),
  retention         INTERVAL,  -- NULL: keep forever
  retention_mode    TEXT NOT NULL DEFAULT 'drop' CHECK (retention_mode IN ('drop', 'detach', 'archive')),
  archive_location  TEXT,
  updated_at        TIMESTAMPTZ NOT NULL DEFAULT now()
);
-- Retention per the source documents: behavior events 90 days; storefront
-- events 2 years.
INSERT INTO partition_policies (table_name, partition_column, retention, retention_mode)
VALUES ('behavior_events', 'timestamp', INTERVAL '90 days', 'drop'),
       ('events', 'ts', INTERVAL '2 years', 'drop');

-- The loaders' source of truth for where each Kafka partition was read up to,
-- written in the same transaction as the rows (exactly-once effect).
CREATE TABLE loader_offsets (
  consumer_group  TEXT NOT NULL,
  topic           TEXT NOT NULL,
  kafka_partition INTEGER NOT NULL,
  next_offset     BIGINT NOT NULL,
  log_id          TEXT NOT NULL DEFAULT '',
  updated_at      TIMESTAMPTZ NOT NULL DEFAULT now(),
  PRIMARY KEY (consumer_group, topic, kafka_partition)
);

-- Records that could not be loaded, with everything needed to look and replay.
CREATE TABLE dead_letters (
  id              BIGSERIAL PRIMARY KEY,
  consumer_group  TEXT NOT NULL,
  topic           TEXT NOT NULL,
  kafka_partition INTEGER NOT NULL,
  kafka_offset    BIGINT NOT NULL,
  raw             BYTEA NOT NULL,
  reason          TEXT NOT NULL,
  error           TEXT NOT NULL,
  created_at      TIMESTAMPTZ NOT NULL DEFAULT now(),
  replayed_at     TIMESTAMPTZ,
  UNIQUE (topic, kafka_partition, kafka_offset)
);
CREATE INDEX idx_dead_letters_reason ON dead_letters(reason, created_at);
