-- A Kafka record carries one request's events (an array), so a dead letter is
-- one event of a record: identified by its record and its place in it.
ALTER TABLE dead_letters ADD COLUMN record_index INTEGER NOT NULL DEFAULT 0;
ALTER TABLE dead_letters DROP CONSTRAINT dead_letters_topic_kafka_partition_kafka_offset_key;
ALTER TABLE dead_letters ADD CONSTRAINT dead_letters_event_key
  UNIQUE (topic, kafka_partition, kafka_offset, record_index);
