"""Refreshes running while the real loader writes (issue 24): events received days ago
(a spool drained late) for old days, loaded batch by batch by the behavior loader
while refreshes run back to back; one more refresh after the last batch and each
rollup equals the source document's query over the shop's events (with the watermark
on received_at, the rollups held none of them). The exact race, a loader transaction
open across a refresh, is test_refresh's test_refresh_beside_a_loader_transaction."""

from __future__ import annotations

import asyncio
import random
import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import orjson

from ingest.core.db import Database
from ingest.core.settings import Settings
from ingest.core.shops import ShopCredentials
from ingest.partitions import PartitionManager, month_start
from ingest.rollups import refresh
from tests.conftest import wait_for
from tests.helpers import loaded, produce, record, running_loader

FRICTION = (  # 002's daily_friction_summary, one shop
    "SELECT DATE(be.timestamp AT TIME ZONE 'UTC'), be.element_path, be.event_type, COUNT(*), "
    "COUNT(DISTINCT be.session_id), AVG((be.event_data->>'hesitation_ms')::INTEGER), "
    "PERCENTILE_CONT(0.5) WITHIN GROUP (ORDER BY (be.event_data->>'hesitation_ms')::INTEGER) "
    "FROM behavior_events be WHERE be.shop_id = $1 GROUP BY 1, 2, 3",
    "SELECT date, element_path, event_type, event_count, unique_sessions, avg_hesitation_ms, "
    "median_hesitation_ms FROM daily_friction_summary WHERE shop_id = $1",
)
COMPONENTS = (  # 002's component_performance, one shop (no funnels: no conversions)
    "SELECT DATE(be.timestamp AT TIME ZONE 'UTC'), be.component_id, be.page_url, COUNT(*), "
    "COUNT(DISTINCT be.session_id), SUM(CASE WHEN be.event_type = 'click' THEN 1 ELSE 0 END), "
    "MIN(be.timestamp), MAX(be.timestamp) "
    "FROM behavior_events be WHERE be.shop_id = $1 AND be.component_id IS NOT NULL "
    "GROUP BY 1, 2, 3",
    "SELECT date, component_id, page_url, total_interactions, unique_users, clicks, "
    "first_seen, last_seen FROM component_performance WHERE shop_id = $1",
)


def _norm(value: Any) -> Any:
    return round(float(value), 9) if isinstance(value, Decimal | float) else value


async def _rows(db: Database, sql: str, shop: uuid.UUID) -> set[tuple[Any, ...]]:
    return {tuple(_norm(v) for v in r.values()) for r in await db.pool.fetch(sql, shop)}


async def test_refreshes_beside_the_loader_miss_nothing(
    settings: Settings, db: Database, shop: ShopCredentials
) -> None:
    rng = random.Random(17)
    now = datetime.now(UTC)
    days = [now - timedelta(days=d) for d in range(1, 4)]
    await PartitionManager(db).ensure_months("behavior_events", {month_start(d) for d in days})
    received = (now - timedelta(days=3)).isoformat()  # drained from a spool days later
    waves: list[list[bytes]] = []
    ids: list[str] = []
    for _ in range(6):
        wave = []
        for _ in range(150):
            kind = rng.choice(["click", "rage_click", "hesitation", "form_abandon", "page_view"])
            data = record(
                shop,
                session_id=f"sess-{rng.randrange(12)}",
                event_type=kind,
                element_path=rng.choice(["#buy", "form#signup", None]),
                component_id=rng.choice(["hero", "cta", None]),
                page_url=rng.choice(["https://x/", "https://x/cart"]),
                timestamp=(rng.choice(days) + timedelta(seconds=rng.randrange(3600))).isoformat(),
                received_at=received,
                event_data={"hesitation_ms": rng.randrange(1500, 9000)}
                if kind == "hesitation"
                else {},
            )
            ids.append(str(data["event_id"]))
            wave.append(orjson.dumps(data))
        waves.append(wave)

    await refresh(db)  # whatever the database held before
    stop = asyncio.Event()
    refreshes = 0

    async def refresh_all_the_time() -> None:
        nonlocal refreshes
        while not stop.is_set():
            await refresh(db)
            refreshes += 1
            await asyncio.sleep(0.01)

    refresher = asyncio.create_task(refresh_all_the_time())
    try:
        async with running_loader(settings, db):
            done = 0
            for wave in waves:
                await produce(settings, wave)
                done += len(wave)
                target = done

                async def reached(target: int = target) -> bool:
                    return await loaded(db, ids) >= target

                await wait_for(reached, timeout=60)
    finally:
        stop.set()
        await refresher
    assert refreshes >= 3  # refreshes did run while batches were committed
    await refresh(db)
    for direct, stored in (FRICTION, COMPONENTS):
        expected = await _rows(db, direct, shop.shop_id)
        assert expected
        assert await _rows(db, stored, shop.shop_id) == expected
