-- A retention of zero or less would retire the month being written (the
-- manager's guard keeps the current month, but a negative interval put every
-- month behind the cutoff). Such a policy is refused; one already stored
-- becomes "keep forever", the direction that deletes nothing.
DO $$
BEGIN
  IF EXISTS (SELECT 1 FROM partition_policies WHERE retention <= INTERVAL '0') THEN
    RAISE WARNING 'partition_policies: retentions of zero or less set to keep forever: %',
      (SELECT string_agg(table_name, ', ') FROM partition_policies WHERE retention <= INTERVAL '0');
    UPDATE partition_policies SET retention = NULL WHERE retention <= INTERVAL '0';
  END IF;
END $$;
ALTER TABLE partition_policies ADD CONSTRAINT partition_policies_retention_positive
  CHECK (retention IS NULL OR retention > INTERVAL '0');
