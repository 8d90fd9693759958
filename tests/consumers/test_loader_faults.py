"""Loader faults on the real stack, reconciling known event ids: each exactly once, none missing."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import uuid
from datetime import UTC, datetime
from pathlib import Path

import orjson
import pytest
from aiokafka import AIOKafkaProducer

from consumers.loader import Loader
from consumers.rows import BEHAVIOR, SPECS
from ingest.db import Database
from ingest.migrate import migrate
from ingest.partitions import PartitionManager
from ingest.postgres_process import EmbeddedPostgres
from ingest.settings import Settings
from ingest.shops import ShopCredentials, ensure_shop
from tests.conftest import wait_for
from tests.consumers.test_loader import record
from tests.consumers.test_rows import storefront

pytestmark = pytest.mark.slow


# Each stream's table: storefront records take another path through the loader
# (straight to COPY data, consumers.binary_copy), so the faults are tried on both.
TABLES = {"behavior": "behavior_events", "storefront": "events"}


async def produce_many(
    settings: Settings, shop: ShopCredentials, n: int, stream: str = "behavior"
) -> list[str]:
    """Produce ``n`` records of ``stream`` over many sessions; returns their event ids."""
    producer = AIOKafkaProducer(bootstrap_servers=settings.bootstrap, acks="all", linger_ms=5)
    await producer.start()
    ids: list[str] = []
    now = datetime.now(UTC).isoformat()
    try:
        futures = []
        for i in range(n):
            session = f"s{i % 97}"
            data = (
                record(shop, session_id=session)
                if stream == "behavior"
                else storefront(
                    shop_id=str(shop.shop_id), session_id=session, ts=now, received_at=now
                )
            )
            ids.append(str(data["event_id"]))
            futures.append(
                await producer.send(
                    settings.topic_for(stream), orjson.dumps(data), key=session.encode()
                )
            )
        await asyncio.gather(*futures)
    finally:
        await producer.stop()
    return ids


async def reconcile(
    db: Database, ids: list[str], table: str = "behavior_events"
) -> tuple[int, int]:
    """(missing, duplicated) among ``ids``."""
    rows = await db.pool.fetch(
        f"SELECT event_id::text AS id, count(*) AS n FROM {table} "
        "WHERE event_id = ANY($1::uuid[]) GROUP BY 1",
        ids,
    )
    counts = {r["id"]: r["n"] for r in rows}
    return len(set(ids) - set(counts)), sum(1 for n in counts.values() if n > 1)


async def loaded(db: Database, ids: list[str], table: str = "behavior_events") -> int:
    return int(
        await db.pool.fetchval(
            f"SELECT count(*) FROM {table} WHERE event_id = ANY($1::uuid[])", ids
        )
    )


def loader_process(
    settings: Settings, *extra: str, stream: str = "behavior"
) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "EVENTPIPE_POSTGRES_DSN": settings.dsn,
        "EVENTPIPE_KAFKA_BOOTSTRAP": settings.bootstrap,
        "EVENTPIPE_KAFKA_LOG_ID": settings.kafka_log_id,
        "EVENTPIPE_TOPIC_BEHAVIOR": settings.topic_behavior,
        "EVENTPIPE_TOPIC_STOREFRONT": settings.topic_storefront,
        "EVENTPIPE_CONSUMER_GROUP": settings.consumer_group,
        "EVENTPIPE_KAFKA_SESSION_TIMEOUT_MS": "6000",
        "EVENTPIPE_BATCH_MAX_ROWS": "500",
        "EVENTPIPE_LOADER_METRICS_PORT": "0",
        "EVENTPIPE_LOG_LEVEL": "warning",
    }
    return subprocess.Popen(
        [sys.executable, "-m", "ingest.cli", "loader", "--stream", stream, *extra], env=env
    )


@pytest.mark.parametrize("stream", sorted(TABLES))
async def test_loader_sigkilled_mid_batch_and_restarted(
    settings: Settings, db: Database, shop: ShopCredentials, stream: str
) -> None:
    table = TABLES[stream]
    ids = await produce_many(settings, shop, 20_000, stream)
    proc = loader_process(settings, stream=stream)
    try:
        await wait_for(lambda: _at_least(db, ids, 1500, table), timeout=60, interval=0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert await loaded(db, ids, table) < len(ids), "the loader finished before it was killed"
    finally:
        proc.kill()
    proc = loader_process(settings, stream=stream)
    try:
        await wait_for(lambda: _at_least(db, ids, len(ids), table), timeout=90)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0  # SIGTERM drains and exits 0
    finally:
        proc.kill()
    assert await reconcile(db, ids, table) == (0, 0)


async def _at_least(db: Database, ids: list[str], n: int, table: str = "behavior_events") -> bool:
    return await loaded(db, ids, table) >= n


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
        await wait_for(lambda: _at_least(db, ids, 1000), timeout=60, interval=0.02)
        await b.stop()  # leaves the group: a takes over its partitions
        more = await produce_many(settings, shop, 3000)
        b = Loader(small, BEHAVIOR, db, manager)
        await b.start()  # rejoins: partitions move back mid-stream
        ids += more
        await wait_for(lambda: _at_least(db, ids, len(ids)), timeout=90)
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
                await wait_for(lambda: _at_least(db, ids, 600, table), timeout=60, interval=0.02)
                assert await loaded(db, ids, table) < len(ids)
                await pg.stop()
                await asyncio.sleep(2)  # the loader sees PostgreSQL gone, pauses and retries
                await pg.start()  # same port: the pool reconnects
                await wait_for(lambda: _at_least(db, ids, len(ids), table), timeout=90)
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
        await wait_for(lambda: _at_least(db, ids, len(ids)), timeout=90)
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
