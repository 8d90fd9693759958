-- Dead letters are unique within a broker log: after the log is replaced (an
-- in-memory embedded broker restarted, a topic recreated) the same topic,
-- partition and offset hold another record, and its dead letter must be kept,
-- not dropped by ON CONFLICT as a duplicate of the old log's.
--
-- Rows already there get '' (log unknown), not the log id now stored beside
-- the offsets: which log an old letter came from can't be told, and giving it
-- the current one would make the current log's letter at its offset the one
-- dropped. A record read again from the current log may at worst add a second
-- letter of it (visible; a replay loads its events once).
--
-- Safe with rows: a constant default fills the new column without rewriting
-- the table, and the old key was unique, so the wider new one is too.
ALTER TABLE dead_letters ADD COLUMN log_id TEXT NOT NULL DEFAULT '';
ALTER TABLE dead_letters DROP CONSTRAINT dead_letters_event_key;
ALTER TABLE dead_letters ADD CONSTRAINT dead_letters_event_key
  UNIQUE (log_id, topic, kafka_partition, kafka_offset, record_index);
