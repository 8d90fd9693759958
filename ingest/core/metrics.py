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
SPOOL_DIR_BYTES = Gauge(
    "eventpipe_spool_dir_bytes",
    "Bytes waiting in one spool directory this process drains (its own or an adopted one)",
    ["spool"],
)
SPOOL_DIR_FRAMES = Gauge(
    "eventpipe_spool_dir_frames",
    "Batches waiting in one spool directory this process drains",
    ["spool"],
)
SPOOL_QUARANTINE_REASONS = ("too_large", "unauthorized", "unknown_topic", "corrupt")
SPOOL_QUARANTINED = Counter(
    "eventpipe_spool_quarantined_total",
    "Spooled batches the broker refused for good, set aside in <state>/spool/quarantine",
    ["reason"],
)
for _reason in SPOOL_QUARANTINE_REASONS:  # at 0 from the start, so rate() and alerts see them
    SPOOL_QUARANTINED.labels(_reason)
SPOOL_DRAIN_ERRORS = Counter(
    "eventpipe_spool_drain_errors_total",
    "Unexpected errors of the spool drainer (it logs each and restarts with backoff)",
)
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
PARTITIONS_UNPOSITIONED = Gauge(
    "eventpipe_partitions_unpositioned",
    "Kafka partitions assigned to a loader but not positioned at their stored offsets yet "
    "(nothing of them loads until they are)",
    ["topic"],
)
ASSIGNMENT_FAILURES = Counter(
    "eventpipe_assignment_failures_total",
    "Attempts to position assigned Kafka partitions that failed (retried with backoff)",
    ["topic"],
)
LOADER_REJOINS = Counter(
    "eventpipe_loader_rejoins_total",
    "Times a loader left its consumer group and joined again, its partitions unpositioned "
    "for longer than loader_assignment_timeout_s",
    ["topic"],
)
BROKER_CONNECT_FAILURES = Counter(
    "eventpipe_loader_broker_connect_failures_total",
    "Loader attempts to reach the Kafka broker at start that failed (retried with backoff)",
    ["topic"],
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
