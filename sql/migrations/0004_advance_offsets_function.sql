-- The loaders' fenced offsets move as a function that raises when fenced, so
-- the move can travel in the same round trip as the BEGIN that opens a batch's
-- transaction (one plain-text query), instead of a round trip of its own.
-- Fenced: each partition only moves from the position this loader believes in,
-- so a loader that lost a partition in a rebalance cannot apply a batch twice.
CREATE FUNCTION advance_loader_offsets(
  p_group TEXT, p_topic TEXT, p_partitions INTEGER[], p_expected BIGINT[], p_new BIGINT[]
) RETURNS VOID LANGUAGE plpgsql AS $$
DECLARE
  moved INTEGER;
BEGIN
  UPDATE loader_offsets o SET next_offset = m.new, updated_at = now()
  FROM unnest(p_partitions, p_expected, p_new) AS m(kafka_partition, expected, new)
  WHERE o.consumer_group = p_group AND o.topic = p_topic
    AND o.kafka_partition = m.kafka_partition AND o.next_offset = m.expected;
  GET DIAGNOSTICS moved = ROW_COUNT;
  IF moved <> cardinality(p_partitions) THEN
    RAISE EXCEPTION 'fenced: a stored offset of %/% partitions % moved under this loader',
      p_group, p_topic, p_partitions
      USING ERRCODE = 'EPF01', HINT = 'the loader re-reads its offsets and goes on';
  END IF;
END
$$;
