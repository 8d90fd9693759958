"""Prometheus metrics of every component (prometheus-client), defined in one place."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

# Collector
HTTP_REQUESTS = Counter(
    "eventpipe_http_requests_total", "HTTP requests answered", ["endpoint", "status"]
)
EVENTS_ACCEPTED = Counter(
    "eventpipe_events_accepted_total", "Events accepted by the collector", ["stream"]
)
EVENTS_REJECTED = Counter(
    "eventpipe_events_rejected_total", "Events refused by the collector", ["stream", "reason"]
)
PRODUCE_LATENCY = Histogram(
    "eventpipe_produce_latency_seconds",
    "Time from handing a batch to the producer to the broker's acknowledgement",
    ["stream"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
SPOOL_BYTES = Gauge("eventpipe_spool_bytes", "Bytes waiting in the collector's local spool")
SPOOL_RECORDS = Gauge("eventpipe_spool_records", "Records waiting in the collector's local spool")
BROKER_UP = Gauge(
    "eventpipe_broker_up",
    "1 while the collector's producer reaches a Kafka broker, 0 while it doesn't (batches "
    "then go to the spool); set by the producer's background checks and by /readyz",
)

# Loaders
ROWS_LOADED = Counter("eventpipe_rows_loaded_total", "Rows committed to PostgreSQL", ["table"])
BATCH_ROWS = Histogram(
    "eventpipe_batch_rows",
    "Records per loader batch",
    ["table"],
    buckets=(1, 10, 50, 100, 500, 1000, 2500, 5000, 10000, 25000),
)
COPY_LATENCY = Histogram(
    "eventpipe_copy_latency_seconds",
    "Time to write and commit one loader batch",
    ["table"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
CONSUMER_LAG = Gauge(
    "eventpipe_consumer_lag", "Records in Kafka not yet loaded", ["topic", "partition"]
)
DEAD_LETTERS = Counter(
    "eventpipe_dead_letters_total", "Records set aside in dead_letters", ["table", "reason"]
)

# Partition manager (set by `eventpipe partitions status` and by `up`'s timer)
PARTITIONS_MISSING_AHEAD = Gauge(
    "eventpipe_partitions_missing_ahead",
    "Future monthly partitions that should exist but don't",
    ["table"],
)
RETENTION_OVERDUE = Gauge(
    "eventpipe_partitions_retention_overdue",
    "Partitions older than retention still attached",
    ["table"],
)
PARTITION_REFUSED_MONTHS = Counter(
    "eventpipe_partition_refused_months_total",
    "Months of incoming events refused by the partition window (their rows go to dead letters)",
    ["table", "reason"],
)
PARTITION_ACTIONS = Counter(
    "eventpipe_partition_actions_total",
    "Partition maintenance actions done (create, detach, drop, archive, purge_shop)",
    ["table", "kind"],
)
