"""What a loader process exports for the alerts, scraped from its /metrics on the real
broker and PostgreSQL: series at 0 from the start, lag that follows the broker while
PostgreSQL stalls, partition health read from the catalog."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
from datetime import UTC, date, datetime

import aiohttp
import orjson
import prometheus_client
from prometheus_client.parser import text_string_to_metric_families

from consumers.rows import BEHAVIOR
from consumers.runner import run_loaders
from ingest.core import metrics
from ingest.core.db import Database
from ingest.core.settings import Settings
from ingest.core.shops import ShopCredentials
from ingest.partitions import PartitionManager, partition_name
from tests.conftest import wait_for
from tests.helpers import produce, record, running_loader

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def scrape(url: str) -> Samples:
    """Every sample of ``url``'s exposition, by name and sorted labels."""
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        text = await response.text()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


async def scrape_when_up(url: str) -> Samples:
    got: Samples = {}

    async def up() -> bool:
        nonlocal got
        try:
            got = await scrape(url)
        except aiohttp.ClientError:
            return False
        return True

    await wait_for(up, timeout=30)
    return got


def loader_env(settings: Settings, port: int, **extra: str) -> dict[str, str]:
    return {
        **os.environ,
        **settings.to_env(),
        "EVENTPIPE_LOADER_METRICS_PORT": str(port),
        "EVENTPIPE_COLLECTOR_HOST": "127.0.0.1",
        "EVENTPIPE_LOG_LEVEL": "warning",
        **extra,
    }


async def test_loader_process_exports_alert_series_at_zero_and_no_spool(
    settings: Settings,
) -> None:
    """Before this change the first dead letter's series appeared already at 1
    (``increase()`` read 0) and a loader exported the collector's spool and broker
    gauges, always 0."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "ingest.cli", "loader", "--stream", "behavior"],
        env=loader_env(settings, port),
    )
    try:
        samples = await scrape_when_up(f"http://127.0.0.1:{port}/metrics")
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    for reason in metrics.DEAD_LETTER_REASONS:
        key = ("eventpipe_dead_letters_total", (("reason", reason), ("table", "behavior_events")))
        assert samples.get(key) == 0, f"no dead-letter series at 0 for {reason}"
    topic = (("topic", settings.topic_behavior),)
    assert samples[("eventpipe_partitions_unpositioned", topic)] == 0
    assert samples[("eventpipe_loader_rejoins_total", topic)] == 0
    names = {name for name, _ in samples}
    for collector_only in (
        "eventpipe_spool_bytes",
        "eventpipe_spool_records",
        "eventpipe_spool_max_bytes",
        "eventpipe_broker_up",
        "eventpipe_batches_refused_total",
    ):
        assert collector_only not in names, f"a loader exports {collector_only}"


async def test_loader_series_exist_before_postgres_answers(settings: Settings) -> None:
    """The metrics server answers while the loader still connects: before this change
    a scrape in that window (seconds on a loaded machine; CI caught it) had no
    dead-letter series. Here PostgreSQL is a socket that never answers, so the window
    stays open until the scrape. SIGTERM then ends it at once (it waited for
    asyncpg's 60 s connect timeout)."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)  # the kernel completes the handshake; nobody ever reads
        dsn = f"postgresql://eventpipe@127.0.0.1:{silent.getsockname()[1]}/eventpipe"
        port = free_port()
        proc = subprocess.Popen(
            [sys.executable, "-m", "ingest.cli", "loader", "--stream", "behavior"],
            env=loader_env(settings, port, EVENTPIPE_POSTGRES_DSN=dsn),
        )
        try:
            samples = await scrape_when_up(f"http://127.0.0.1:{port}/metrics")
        finally:
            proc.terminate()
            code = proc.wait(timeout=30)
    assert code == 0, "a loader stopped while connecting exits cleanly"
    for reason in metrics.DEAD_LETTER_REASONS:
        key = ("eventpipe_dead_letters_total", (("reason", reason), ("table", "behavior_events")))
        assert samples.get(key) == 0, f"no dead-letter series at 0 for {reason}"


def lag(settings: Settings) -> float:
    total = 0.0
    for p in range(settings.topic_partitions):
        value = prometheus_client.REGISTRY.get_sample_value(
            "eventpipe_consumer_lag", {"topic": settings.topic_behavior, "partition": str(p)}
        )
        total += value or 0.0
    return total


async def lag_series(settings: Settings) -> set[str]:
    return {
        s.labels["partition"]
        for family in prometheus_client.REGISTRY.collect()
        if family.name == "eventpipe_consumer_lag"
        for s in family.samples
        if s.labels["topic"] == settings.topic_behavior
    }


async def test_lag_rises_while_postgres_stalls_and_returns_to_zero(
    settings: Settings, db: Database, shop: ShopCredentials
) -> None:
    """Before: lag was set only after a committed batch, so with the loader's COPY
    stalled every series read 0 (and an idle loader had none)."""
    own = settings.model_copy(update={"loader_lag_refresh_s": 0.5})
    async with running_loader(own, db) as loader:
        # Idle and assigned: a series per partition, at 0.
        await wait_for(
            lambda: _true(len(loader.positions) == own.topic_partitions and lag(own) == 0),
            timeout=30,
        )
        assert await lag_series(own) == {str(p) for p in range(own.topic_partitions)}
        async with db.pool.acquire() as conn:
            tx = conn.transaction()
            await tx.start()
            await conn.execute("LOCK TABLE behavior_events IN ACCESS EXCLUSIVE MODE")
            try:
                await produce(own, [orjson.dumps(record(shop)) for _ in range(40)])
                # Within a few refresh intervals, though no batch can commit.
                await wait_for(lambda: _true(lag(own) >= 39), timeout=5)
                assert loader.rows_loaded == 0
            finally:
                await tx.rollback()
        await wait_for(lambda: _true(lag(own) == 0 and loader.rows_loaded == 40), timeout=30)
    # Stopped and revoked: nothing of this topic left to double-count.
    assert await lag_series(own) == set()


async def _true(value: bool) -> bool:
    return value


async def test_loader_process_publishes_partition_health(settings: Settings, db: Database) -> None:
    """Before: the partition gauges were set only by `partitions status`, a command
    nobody scrapes; no long-lived process exported them."""
    manager = PartitionManager(db)
    await manager.maintain()
    own = settings.model_copy(
        update={"loader_metrics_port": free_port(), "partition_status_refresh_s": 0.2}
    )
    own = own.model_copy(update={"collector_host": "127.0.0.1"})
    stop = asyncio.Event()
    task = asyncio.create_task(run_loaders(own, [BEHAVIOR], stop))
    url = f"http://127.0.0.1:{own.loader_metrics_port}/metrics"
    key = ("eventpipe_partitions_missing_ahead", (("table", "behavior_events"),))
    overdue = ("eventpipe_partitions_retention_overdue", (("table", "behavior_events"),))
    try:
        samples = await scrape_when_up(url)

        async def gauge(expected: float) -> bool:
            nonlocal samples
            samples = await scrape(url)
            return samples.get(key) == expected

        await wait_for(lambda: gauge(0), timeout=10)
        assert samples[overdue] == 0
        # The farthest month ahead dropped: the loader's next read reports it missing.
        policy = await manager.policy("behavior_events")
        wanted = manager.months_wanted(policy, datetime.now(UTC), set())
        last: date = max(wanted)
        await db.pool.execute(f"DROP TABLE {partition_name('behavior_events', last)}")
        await wait_for(lambda: gauge(1), timeout=10)
        await manager.maintain()
        await wait_for(lambda: gauge(0), timeout=10)
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)
