-- event_retimes (0006) remembers where a retimed event's row was stored, so a retry
-- stored at another time is dropped. Nothing removed its rows: it grew with every
-- retimed event for ever. `partitions maintain` now prunes the rows of months no
-- longer attached (dropped, archived or detached by retention: a retry of an event
-- that old does not come), in bounded batches, by this index.
CREATE INDEX idx_event_retimes_table_time ON event_retimes (table_name, event_time);
