"""Prometheus metrics of every component (prometheus-client), defined in one place.

Every labelled series an alert relies on is created at 0 when its process starts
(``init_collector``, ``init_loader``): a counter series that appears at its first
increment already reads 1, and ``increase()`` over it reads 0, so the first dead
letter of a table would never fire an alert. The collector's spool and broker
gauges are left out of a loader's ``/metrics`` (``LOADER_REGISTRY``): a loader has no
spool and no producer, and exporting their zeros would pollute "spool per collector"
and page for a broker a loader never uses.
"""

from __future__ import annotations

import bisect
import itertools
import time
from collections.abc import Iterable, Iterator

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import HistogramMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

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
BOT_REQUESTS_DROPPED = Counter(
    "eventpipe_bot_requests_dropped_total",
    "Requests from bots answered 2xx and not stored (bot_policy drop), by reason: crawler "
    "(the crawler list) or deny_list (the shop's own)",
    ["reason"],
)
PRODUCE_LATENCY = Histogram(
    "eventpipe_produce_latency_seconds",
    "Time from handing a batch to the producer to the broker's acknowledgement",
    ["stream"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
SPOOL_BYTES = Gauge("eventpipe_spool_bytes", "Bytes waiting in the collector's local spool")
SPOOL_RECORDS = Gauge(
    "eventpipe_spool_records",
    "Records waiting in the collector's local spool",
)
SPOOL_MAX_BYTES = Gauge(
    "eventpipe_spool_max_bytes",
    "The spool's size cap (spool_max_bytes): above it batches are refused with 503; 0: none",
)
SPOOL_HIGH_WATER_BYTES = Gauge(
    "eventpipe_spool_high_water_bytes",
    "spool_high_water * spool_max_bytes: above it, with the broker away, /readyz fails",
)
BATCHES_REFUSED = Counter(
    "eventpipe_batches_refused_total",
    "Client batches (and webhooks) refused with 503: broker_unavailable (broker and spool "
    "could not take it) or busy (no decode slot); /readyz answers are not counted",
    ["reason"],
)
BATCH_REFUSAL_REASONS = ("broker_unavailable", "busy")
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
EVENTS_SUPPRESSED = Counter(
    "eventpipe_events_suppressed_total",
    "Events of erased visitors a loader dropped (erasure_suppressions; not dead letters)",
    ["table"],
)
# Every reason a loader gives a dead letter (consumers.rows, copy_writer, loader).
DEAD_LETTER_REASONS = ("decode_error", "invalid_record", "outside_window", "rejected_by_postgres")
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

# Partition manager (set by `partitions status`, and by every loader process on its timer)
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
PARTITION_REFUSAL_REASONS = ("too_old", "too_new")
PARTITION_ACTIONS = Counter(
    "eventpipe_partition_actions_total",
    "Partition maintenance actions done (create, detach, drop, archive, purge_shop, prune_retimes)",
    ["table", "kind"],
)

# Rollups (issue 24): read from rollup_state by whoever calls ingest.rollups.status()
# (a loader process's gauge loop, scraped; `rollups status`), so they tell whatever
# refreshes the rollups (`up`, a CronJob), or fails to.
ROLLUP_LAG = Gauge(
    "eventpipe_rollup_lag_seconds",
    "Seconds since the snapshot a rollup's watermark was taken in (every row committed "
    "before it is in the rollup); +Inf: never refreshed",
    ["rollup"],
)
ROLLUP_MAX_LAG = Gauge(
    "eventpipe_rollup_max_lag_seconds",
    "rollup_max_lag_s: `rollups status` fails, and the alert fires, past it",
)

# Both hot processes (collector, loader): what stops their event loop.
STALL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
EVENT_LOOP_LAG = Histogram(
    "eventpipe_event_loop_lag_seconds",
    "How late the event loop woke a probe that sleeps 50 ms: the longest a request or "
    "batch can have waited behind other work (runtime.LoopMonitor)",
    buckets=STALL_BUCKETS,
)


class GcPauses(Collector):
    """``eventpipe_gc_pause_seconds{generation}``: the cyclic garbage collector's pauses.

    Counted by a ``gc.callbacks`` hook into plain integers and floats, and made a
    histogram only when scraped: the hook runs wherever a collection starts,
    possibly inside prometheus-client's own (non-reentrant) lock, so it must not
    call into it.
    """

    def __init__(self) -> None:
        self.buckets = [[0] * (len(STALL_BUCKETS) + 1) for _ in range(3)]  # +Inf last
        self.sums = [0.0, 0.0, 0.0]
        self._started = 0.0

    def hook(self, phase: str, info: dict[str, int]) -> None:
        """The ``gc.callbacks`` entry (``runtime.tune_gc`` installs it)."""
        if phase == "start":
            self._started = time.perf_counter()
            return
        pause, generation = time.perf_counter() - self._started, info["generation"]
        self.sums[generation] += pause
        self.buckets[generation][bisect.bisect_left(STALL_BUCKETS, pause)] += 1

    def collect(self) -> Iterator[Metric]:
        family = HistogramMetricFamily(
            "eventpipe_gc_pause_seconds",
            "Pauses of the cyclic garbage collector, by generation (2: a full collection)",
            labels=["generation"],
        )
        for generation in range(3):
            counts = list(itertools.accumulate(self.buckets[generation]))
            bounds = [str(b) for b in STALL_BUCKETS] + ["+Inf"]
            family.add_metric(
                [str(generation)], list(zip(bounds, counts, strict=True)), self.sums[generation]
            )
        yield family


GC_PAUSES = GcPauses()
REGISTRY.register(GC_PAUSES)

# The collector's own families: a loader process's /metrics leaves them out.
COLLECTOR_ONLY = frozenset(
    family.name
    for metric in (
        SPOOL_BYTES,
        SPOOL_RECORDS,
        SPOOL_MAX_BYTES,
        SPOOL_HIGH_WATER_BYTES,
        BATCHES_REFUSED,
        SPOOL_DIR_BYTES,
        SPOOL_DIR_FRAMES,
        SPOOL_QUARANTINED,
        SPOOL_DRAIN_ERRORS,
        BROKER_UP,
        HTTP_REQUESTS,
        EVENTS_ACCEPTED,
        EVENTS_REJECTED,
        BOT_REQUESTS_DROPPED,
        PRODUCE_LATENCY,
    )
    for family in metric.describe()
)


class _WithoutCollectorMetrics(Collector):
    """Every metric of the process's registry but the collector's own."""

    def collect(self) -> Iterator[Metric]:
        return (family for family in REGISTRY.collect() if family.name not in COLLECTOR_ONLY)


# What a loader process's /metrics serves (consumers.runner).
LOADER_REGISTRY = CollectorRegistry(auto_describe=False)
LOADER_REGISTRY.register(_WithoutCollectorMetrics())


def init_collector(
    *, spool_max_bytes: int, spool_high_water: float, streams: Iterable[str]
) -> None:
    """Called when a collector starts: every series an alert reads at 0, and the
    spool's limits (alerts are fractions of them)."""
    SPOOL_MAX_BYTES.set(spool_max_bytes)
    SPOOL_HIGH_WATER_BYTES.set(spool_high_water * spool_max_bytes)
    for reason in BATCH_REFUSAL_REASONS:
        BATCHES_REFUSED.labels(reason)
    for reason in ("crawler", "deny_list"):
        BOT_REQUESTS_DROPPED.labels(reason)
    for stream in streams:
        EVENTS_ACCEPTED.labels(stream)
        PRODUCE_LATENCY.labels(stream)


def init_loader(table: str, topic: str) -> None:
    """Called when a loader of ``table`` (consuming ``topic``) starts: every series of
    it an alert reads, at 0."""
    for reason in DEAD_LETTER_REASONS:
        DEAD_LETTERS.labels(table, reason)
    for reason in PARTITION_REFUSAL_REASONS:
        PARTITION_REFUSED_MONTHS.labels(table, reason)
    ROWS_LOADED.labels(table)
    EVENTS_SUPPRESSED.labels(table)
    BATCH_ROWS.labels(table)
    COPY_LATENCY.labels(table)
    PARTITIONS_UNPOSITIONED.labels(topic).set(0)
    ASSIGNMENT_FAILURES.labels(topic)
    LOADER_REJOINS.labels(topic)
    BROKER_CONNECT_FAILURES.labels(topic)
