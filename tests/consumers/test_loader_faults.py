"""Loader faults on the real stack, reconciling known event ids: each exactly once, none missing."""

from __future__ import annotations

import asyncio
import signal
import uuid
from pathlib import Path

import orjson
import pytest

from consumers.loader import Loader
from consumers.rows import BEHAVIOR, SPECS
from ingest.core.db import Database
from ingest.core.migrate import migrate
from ingest.core.settings import Settings
from ingest.core.shops import ShopCredentials, ensure_shop
from ingest.partitions import PartitionManager
from ingest.stack.postgres import EmbeddedPostgres
from tests.conftest import wait_for
from tests.helpers import (
    TABLES,
    at_least,
    loaded,
    loader_process,
    produce,
    produce_many,
    reconcile,
    record,
    seal_partitions,
)

pytestmark = pytest.mark.slow


# Each stream's table: storefront records take another path through the loader
# (straight to COPY data, consumers.binary_copy), so the faults are tried on both.


@pytest.mark.parametrize("stream", sorted(TABLES))
async def test_loader_sigkilled_mid_batch_and_restarted(
    settings: Settings, db: Database, shop: ShopCredentials, stream: str
) -> None:
    table = TABLES[stream]
    ids = await produce_many(settings, shop, 20_000, stream)
    proc = loader_process(settings, stream=stream)

    async def started() -> bool:  # a cheap count (the shop's index), polled often
        n = await db.pool.fetchval(f"SELECT count(*) FROM {table} WHERE shop_id = $1", shop.shop_id)
        return bool(n >= 1500)

    try:
        await wait_for(started, timeout=60, interval=0.005)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert await loaded(db, ids, table) < len(ids), "the loader finished before it was killed"
    finally:
        proc.kill()
    proc = loader_process(settings, stream=stream)
    try:
        await wait_for(lambda: at_least(db, ids, len(ids), table), timeout=90)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0  # SIGTERM drains and exits 0
    finally:
        proc.kill()
    assert await reconcile(db, ids, table) == (0, 0)


async def test_two_loaders_one_leaves_and_rejoins(
    settings: Settings, db: Database, shop: ShopCredentials
) -> None:
    small = settings.model_copy(update={"batch_max_rows": 200})
    manager = PartitionManager(db)
    a = Loader(small, BEHAVIOR, db, manager)
    b = Loader(small, BEHAVIOR, db, manager)
    await a.start()
    await b.start()
    ids = await produce_many(settings, shop, 6000)
    try:
        await wait_for(lambda: at_least(db, ids, 1000), timeout=60, interval=0.02)
        await b.stop()  # leaves the group: a takes over its partitions
        more = await produce_many(settings, shop, 3000)
        b = Loader(small, BEHAVIOR, db, manager)
        await b.start()  # rejoins: partitions move back mid-stream
        ids += more
        await wait_for(lambda: at_least(db, ids, len(ids)), timeout=90)
    finally:
        await a.stop()
        await b.stop()
    assert await reconcile(db, ids) == (0, 0)


@pytest.mark.parametrize("stream", sorted(TABLES))
async def test_postgres_restarted_during_load(
    settings: Settings, tmp_path: Path, stream: str
) -> None:
    table = TABLES[stream]
    pg = EmbeddedPostgres(tmp_path / "pg", settings={"fsync": "off"})
    await pg.start()
    try:
        await migrate(pg.dsn)
        own = settings.model_copy(update={"postgres_dsn": pg.dsn, "batch_max_rows": 300})
        async with Database(pg.dsn, max_size=4) as db:
            shop = await ensure_shop(db, f"pg-restart-{uuid.uuid4().hex[:6]}.myshopify.com")
            ids = await produce_many(own, shop, 8000, stream)
            async with Loader(own, SPECS[stream], db, PartitionManager(db)):
                await wait_for(lambda: at_least(db, ids, 600, table), timeout=60, interval=0.02)
                assert await loaded(db, ids, table) < len(ids)
                await pg.stop()
                await asyncio.sleep(2)  # the loader sees PostgreSQL gone, pauses and retries
                await pg.start()  # same port: the pool reconnects
                await wait_for(lambda: at_least(db, ids, len(ids), table), timeout=90)
            assert await reconcile(db, ids, table) == (0, 0)
    finally:
        await pg.stop()


async def test_loader_processes_share_the_group(
    settings: Settings, db: Database, shop: ShopCredentials
) -> None:
    import psutil

    ids = await produce_many(settings, shop, 6000)
    proc = loader_process(settings, "--processes", "2")
    try:
        await wait_for(lambda: at_least(db, ids, len(ids)), timeout=90)
        children = psutil.Process(proc.pid).children(recursive=True)
        assert len(children) == 2
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
        assert not any(c.is_running() and c.status() != "zombie" for c in children)
    finally:
        proc.kill()
    assert await reconcile(db, ids) == (0, 0)
    owners = await db.pool.fetchval(
        "SELECT count(*) FROM loader_offsets WHERE topic = $1", settings.topic_behavior
    )
    assert owners == settings.topic_partitions


async def test_partitions_assigned_while_postgres_is_down_are_loaded_once_it_is_back(
    settings: Settings, tmp_path: Path
) -> None:
    """A rebalance while PostgreSQL is down: the new assignment can't be positioned (its
    offsets are in PostgreSQL). aiokafka only logs a failed assignment callback; the
    partitions' records must not be dropped as if revoked, but loaded once it is back.
    Meanwhile their lag is reported, and past ``loader_assignment_timeout_s`` the loader
    leaves the group and joins again."""
    from aiokafka import AIOKafkaConsumer
    from prometheus_client import REGISTRY

    def sample(name: str, **labels: str) -> float:
        return REGISTRY.get_sample_value(name, {"topic": own.topic_behavior, **labels}) or 0.0

    async def stranded_and_reported(n: int) -> bool:
        lag = sum(
            sample("eventpipe_consumer_lag", partition=str(p)) for p in range(own.topic_partitions)
        )
        unpositioned = sample("eventpipe_partitions_unpositioned")
        return unpositioned == own.topic_partitions and lag >= n

    async def rejoined(since: float) -> bool:
        return sample("eventpipe_loader_rejoins_total") > since

    pg = EmbeddedPostgres(tmp_path / "pg", settings={"fsync": "off"})
    await pg.start()
    try:
        await migrate(pg.dsn)
        own = settings.model_copy(
            update={"postgres_dsn": pg.dsn, "loader_assignment_timeout_s": 4.0}
        )
        async with Database(pg.dsn, max_size=4) as db:
            shop = await ensure_shop(db, f"assign-{uuid.uuid4().hex[:6]}.myshopify.com")
            first = await produce_many(own, shop, 300)
            async with Loader(own, BEHAVIOR, db, PartitionManager(db)) as loader:
                await wait_for(lambda: at_least(db, first, len(first)), timeout=60)
                await pg.stop()
                # Another member joins and leaves: two rebalances, each assignment failing.
                other = AIOKafkaConsumer(
                    own.topic_behavior,
                    bootstrap_servers=own.bootstrap,
                    group_id=loader.group,
                    enable_auto_commit=False,
                    session_timeout_ms=6000,
                    heartbeat_interval_ms=1000,
                )
                await other.start()
                try:
                    await wait_for(lambda: _has_assignment(other), timeout=60)
                finally:
                    await other.stop()
                await wait_for(lambda: _owns(loader, own.topic_partitions), timeout=60)
                rejoins = sample("eventpipe_loader_rejoins_total")
                # Sealed: the broker's end offsets, the lag's measure, exact on Tansu too.
                ids = await produce_many(own, shop, 3000) + await seal_partitions(own, shop)
                # Not positioned, so nothing loads: reported as such, with the lag.
                await wait_for(lambda: stranded_and_reported(len(ids)), timeout=30)
                await wait_for(lambda: rejoined(rejoins), timeout=60)
                await pg.start()  # same port: the pool reconnects
                await wait_for(lambda: at_least(db, ids, len(ids)), timeout=60)
            assert await reconcile(db, first + ids) == (0, 0)
    finally:
        await pg.stop()


async def _has_assignment(consumer: object) -> bool:
    return bool(consumer.assignment())  # type: ignore[attr-defined]


async def _owns(loader: Loader, partitions: int) -> bool:
    return len(loader.consumer.assignment()) == partitions


async def test_a_loader_started_before_the_broker_waits_for_it(
    settings: Settings, db: Database, shop: ShopCredentials, tmp_path: Path
) -> None:
    """Started while nothing listens at the bootstrap address, a loader keeps trying (with
    backoff) instead of exiting, and loads once a broker comes up there."""
    from ingest.core.processes import free_port
    from ingest.core.topics import ensure_topics
    from ingest.stack.broker import EmbeddedBroker

    port = free_port()
    early = settings.model_copy(update={"kafka_bootstrap": f"127.0.0.1:{port}", "kafka_log_id": ""})
    loader = Loader(early, BEHAVIOR, db, PartitionManager(db))
    await loader.start()
    try:
        await asyncio.sleep(4)  # several attempts
        assert not loader.task.done(), "the loader gave up without a broker"
        async with EmbeddedBroker(tmp_path / "late-broker", port=port) as late:
            await ensure_topics(
                late.bootstrap, [early.topic_behavior], partitions=early.topic_partitions
            )
            ids = await produce_many(early, shop, 500)
            await wait_for(lambda: at_least(db, ids, len(ids)), timeout=60)
            await loader.stop()
    finally:
        await loader.stop()
    assert await reconcile(db, ids) == (0, 0)


async def test_a_fenced_loader_takes_the_stored_offset_and_moves_on(
    settings: Settings, db: Database, shop: ShopCredentials
) -> None:
    """Another owner moves a partition's stored offset under a running loader.

    The loader loads records 0-2; then the stored offset is moved to 4, as an
    owner that took record 3 in a rebalance would. Records 3-5 are produced:
    the loader's move from 3 is fenced, it re-reads the stored offset and
    loads 4 and 5, once each, and never 3 (the other owner's). Without the
    fence in ``advance_loader_offsets`` record 3 is loaded; without re-reading
    after ``Fenced`` the loader stays behind and loads nothing more.
    """

    ids = [str(uuid.uuid4()) for _ in range(6)]
    values = [orjson.dumps(record(shop, event_id=i, session_id="fence")) for i in ids]
    async with Loader(settings, BEHAVIOR, db, PartitionManager(db)) as loader:
        await produce(settings, values[:3])
        await wait_for(lambda: at_least(db, ids[:3], 3))
        stored = await db.pool.fetchrow(
            "SELECT kafka_partition, next_offset FROM loader_offsets "
            "WHERE consumer_group = $1 AND topic = $2 AND next_offset > 0",
            loader.group,
            settings.topic_behavior,
        )
        assert stored is not None and stored["next_offset"] == 3
        await db.pool.execute(
            "UPDATE loader_offsets SET next_offset = 4 "
            "WHERE consumer_group = $1 AND topic = $2 AND kafka_partition = $3",
            loader.group,
            settings.topic_behavior,
            stored["kafka_partition"],
        )
        await produce(settings, values[3:])
        await wait_for(lambda: at_least(db, ids[4:], 2))

        async def moved_to_6() -> bool:
            n = await db.pool.fetchval(
                "SELECT next_offset FROM loader_offsets WHERE consumer_group = $1 "
                "AND topic = $2 AND kafka_partition = $3",
                loader.group,
                settings.topic_behavior,
                stored["kafka_partition"],
            )
            return bool(n == 6)

        await wait_for(moved_to_6)
    counts = await db.pool.fetch(
        "SELECT event_id::text AS id, count(*) AS n FROM behavior_events "
        "WHERE event_id = ANY($1::uuid[]) GROUP BY 1",
        ids,
    )
    assert {r["id"]: r["n"] for r in counts} == {i: 1 for i in ids[:3] + ids[4:]}
