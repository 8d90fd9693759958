-- Issue 19, point 2: who an anonymous visitor is (Segment's identify, alias
-- and group messages).
--
-- events.user_id: the userId a track, page or screen message carried (NULL
-- when it carried none). Added on the parent, so every attached partition has
-- it; tables detached from events (retention mode detach) get it too, so that
-- one attached again still fits the parent.
--
-- identities: one row per shop and anonymous id, maintained by the
-- storefront loader in the transaction of the events it loads (as
-- user_sessions): the latest user_id, traits merged (a later message's values
-- win), the latest group and its traits, first and last seen. An alias makes
-- the row of its previousId point at its userId. Events are not rewritten
-- with a user id learnt later: analysts join identities on (shop_id, anon_id).
--
-- Row level security as for the event tables (0008): analysts read their
-- shops' rows only; the ingest role inserts and updates (the loaders run as it
-- with SET LOCAL ROLE).

ALTER TABLE events ADD COLUMN user_id TEXT;

DO $$
DECLARE
  t regclass;
BEGIN
  FOR t IN
    SELECT c.oid::regclass FROM pg_class c
    WHERE c.relnamespace = current_schema()::regnamespace AND c.relkind = 'r'
      AND c.relname ~ '^events_p[0-9]{4}_[0-9]{2}$'
      AND NOT c.relispartition
      AND NOT EXISTS (SELECT 1 FROM pg_attribute a
                      WHERE a.attrelid = c.oid AND a.attname = 'user_id' AND NOT a.attisdropped)
  LOOP
    EXECUTE format('ALTER TABLE %s ADD COLUMN user_id TEXT', t);
  END LOOP;
END $$;

CREATE TABLE identities (
  shop_id       UUID NOT NULL REFERENCES shops(id) ON DELETE CASCADE,
  anon_id       TEXT NOT NULL,
  user_id       TEXT,
  traits        JSONB NOT NULL DEFAULT '{}',
  group_id      TEXT,
  group_traits  JSONB NOT NULL DEFAULT '{}',
  first_seen_at TIMESTAMPTZ NOT NULL,
  last_seen_at  TIMESTAMPTZ NOT NULL,
  updated_at    TIMESTAMPTZ NOT NULL DEFAULT now(),
  PRIMARY KEY (shop_id, anon_id)
);
-- Who an analyst's user is: every anonymous id of a user.
CREATE INDEX idx_identities_user ON identities (shop_id, user_id) WHERE user_id IS NOT NULL;

GRANT SELECT ON identities TO eventpipe_analyst;
GRANT SELECT, INSERT, UPDATE ON identities TO eventpipe_ingest;

ALTER TABLE identities ENABLE ROW LEVEL SECURITY;
CREATE POLICY analyst_own_shop ON identities FOR SELECT TO eventpipe_analyst
  USING (shop_id = ANY ((SELECT analyst_shop_ids(current_user))::uuid[]));
CREATE POLICY ingest_insert ON identities FOR INSERT TO eventpipe_ingest WITH CHECK (true);
CREATE POLICY ingest_update ON identities FOR UPDATE TO eventpipe_ingest
  USING (true) WITH CHECK (true);
CREATE POLICY ingest_select ON identities FOR SELECT TO eventpipe_ingest USING (true);
