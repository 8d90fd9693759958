-- Issue 18, point 9: who restored what. `eventpipe partitions restore FILE`
-- records each restore in the same transaction as its rows: the month, the
-- file, its sha256 and row count as verified, and who ran it. Who and when
-- are the server's facts, set by a trigger whatever an INSERT says, and the
-- table is append-only for everyone but its owner.
CREATE TABLE partition_restores (
  id                 BIGSERIAL PRIMARY KEY,
  restored_at        TIMESTAMPTZ NOT NULL DEFAULT now(),
  restored_by        TEXT NOT NULL DEFAULT current_user,    -- the role the rows were written as
  session_user_name  TEXT NOT NULL DEFAULT session_user,    -- the login that ran the restore
  client_addr        INET DEFAULT inet_client_addr(),       -- NULL over a Unix socket
  table_name         TEXT NOT NULL,
  partition_name     TEXT NOT NULL,
  month              DATE NOT NULL,
  file               TEXT NOT NULL,
  sha256             TEXT NOT NULL,
  row_count          BIGINT NOT NULL CHECK (row_count >= 0)
);
CREATE INDEX idx_partition_restores_table_month ON partition_restores(table_name, month);

CREATE FUNCTION partition_restores_server_facts() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog AS $$
BEGIN
  NEW.restored_at := now();
  NEW.restored_by := current_user;
  NEW.session_user_name := session_user;
  NEW.client_addr := inet_client_addr();
  RETURN NEW;
END
$$;
CREATE TRIGGER partition_restores_server_facts BEFORE INSERT ON partition_restores
  FOR EACH ROW EXECUTE FUNCTION partition_restores_server_facts();

REVOKE ALL ON partition_restores FROM PUBLIC;
GRANT SELECT, INSERT ON partition_restores TO eventpipe_partition_admin;
GRANT USAGE ON SEQUENCE partition_restores_id_seq TO eventpipe_partition_admin;
