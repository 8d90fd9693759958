"""An erasure reaches the rollups (issue 24): after ``eventpipe erase`` of a visitor, each
rollup equals the source document's query over the events without it, its funnel rows
are gone, and a full recompute changes nothing. (Without the erasure's call to
``ingest.rollups.recompute`` the friction, component and results rows still count the
visitor's events.)

The module has a database of its own: rollup_state is global.
"""

from __future__ import annotations

import random
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, time, timedelta
from decimal import Decimal
from typing import Any

import orjson
import pytest

from ingest.core.db import Database
from ingest.core.migrate import migrate
from ingest.core.settings import Settings
from ingest.core.shops import ensure_shop
from ingest.partitions import PartitionManager, month_start
from ingest.privacy import Erasure, erase
from ingest.rollups import funnels, refresh

TODAY = datetime.now(UTC).date()
DAYS = [TODAY - timedelta(days=d) for d in range(0, 3)]

DIRECT = {  # the source documents' queries (002, and 004's definition), per shop
    "daily_friction_summary": (
        "SELECT be.shop_id, DATE(be.timestamp AT TIME ZONE 'UTC'), be.element_path, "
        "be.event_type, COUNT(*), COUNT(DISTINCT be.session_id), "
        "AVG((be.event_data->>'hesitation_ms')::INTEGER), "
        "SUM(CASE WHEN be.event_type = 'form_abandon' THEN 1 ELSE 0 END), "
        "SUM(CASE WHEN be.event_type = 'form_submit' THEN 1 ELSE 0 END) "
        "FROM behavior_events be WHERE be.shop_id = $1 GROUP BY 1, 2, 3, 4",
        "SELECT shop_id, date, element_path, event_type, event_count, unique_sessions, "
        "avg_hesitation_ms, form_abandons, form_submits FROM daily_friction_summary "
        "WHERE shop_id = $1",
    ),
    "component_performance": (
        "SELECT be.shop_id, DATE(be.timestamp AT TIME ZONE 'UTC'), be.component_id, "
        "be.page_url, COUNT(*), COUNT(DISTINCT be.session_id), "
        "SUM(CASE WHEN be.event_type = 'click' THEN 1 ELSE 0 END), "
        "COUNT(DISTINCT cf.session_id), MIN(be.timestamp), MAX(be.timestamp) "
        # a session once however many lead_capture steps it entered (as the rollup does:
        # 002's join counts an event once per step row)
        "FROM behavior_events be LEFT JOIN (SELECT DISTINCT shop_id, session_id "
        "FROM conversion_funnels WHERE funnel_name = 'lead_capture') cf "
        "ON be.shop_id = cf.shop_id AND be.session_id = cf.session_id "
        "WHERE be.component_id IS NOT NULL AND be.shop_id = $1 GROUP BY 1, 2, 3, 4",
        "SELECT shop_id, date, component_id, page_url, total_interactions, unique_users, "
        "clicks, conversions, first_seen, last_seen FROM component_performance "
        "WHERE shop_id = $1",
    ),
    "results_aggregates": (
        "SELECT e.shop_id, e.experiment_id, e.variant, coalesce(us.device_type, 'unknown'), "
        "COUNT(DISTINCT e.anon_id), "
        "SUM(CASE WHEN e.event_type = 'purchase' THEN 1 ELSE 0 END), "
        "COALESCE(SUM(CASE WHEN e.event_type = 'purchase' "
        "THEN (e.props->>'value')::numeric END), 0) "
        "FROM events e LEFT JOIN user_sessions us ON us.shop_id = e.shop_id "
        "AND us.session_id = e.session_id "
        "WHERE e.experiment_id IS NOT NULL AND e.variant IS NOT NULL AND e.shop_id = $1 "
        "GROUP BY 1, 2, 3, 4",
        "SELECT shop_id, experiment_id, variant, segment, visitors, purchase, revenue "
        "FROM results_aggregates WHERE shop_id = $1",
    ),
}
ALL_ROWS = {
    name: f"SELECT * FROM {name} WHERE shop_id = $1" for name in ("conversion_funnels", *DIRECT)
}


@pytest.fixture(scope="module")
async def edb(scratch_database: Any) -> AsyncIterator[tuple[Database, str]]:
    dsn: str = await scratch_database("eventpipe_rollups_erase")
    await migrate(dsn)
    async with Database(dsn, max_size=3) as database:
        manager = PartitionManager(database)
        months = {month_start(datetime.combine(d, time(), UTC)) for d in DAYS}
        for table in ("behavior_events", "events"):
            await manager.ensure_months(table, months)
        yield database, dsn


def _norm(value: Any) -> Any:
    return round(float(value), 9) if isinstance(value, Decimal | float) else value


async def _set(db: Database, sql: str, shop: uuid.UUID) -> set[tuple[Any, ...]]:
    return {tuple(_norm(v) for v in r.values()) for r in await db.pool.fetch(sql, shop)}


async def _snapshot(db: Database, shop: uuid.UUID) -> dict[str, set[tuple[Any, ...]]]:
    """Every rollup row of ``shop`` (but when it was refreshed)."""
    return {
        name: {
            tuple(v for k, v in r.items() if k not in ("refreshed_at", "updated_at"))
            for r in await db.pool.fetch(sql, shop)
        }
        for name, sql in ALL_ROWS.items()
    }


async def _load_visitor(db: Database, shop: uuid.UUID, anon: str, rng: random.Random) -> list[str]:
    sessions = [f"{anon}-s{i}" for i in range(2)]
    for session in sessions:
        await db.pool.execute(
            "INSERT INTO user_sessions (shop_id, session_id, landing_page, device_type, "
            "first_seen_at, last_seen_at) VALUES ($1, $2, 'https://s/', $3, now(), now())",
            shop,
            session,
            rng.choice(["mobile", "desktop"]),
        )
        for day in DAYS:
            start = datetime.combine(day, time(), UTC) + timedelta(hours=rng.randrange(20))
            behavior = [
                (
                    uuid.uuid4(),
                    shop,
                    session,
                    kind,
                    "form#signup" if kind.startswith("form") else "#buy",
                    orjson.dumps({"hesitation_ms": rng.randrange(2000, 5000)}).decode()
                    if kind == "hesitation"
                    else "{}",
                    start + timedelta(minutes=i),
                    "https://s/",
                    rng.choice(["hero", "cta"]),
                )
                for i, kind in enumerate(
                    rng.choice(["click", "hesitation", "form_start", "form_submit"])
                    for _ in range(8)
                )
            ]
            await db.pool.executemany(
                "INSERT INTO behavior_events (event_id, shop_id, session_id, event_type, "
                'element_path, event_data, "timestamp", page_url, component_id, received_at) '
                "VALUES ($1, $2, $3, $4, $5, $6::jsonb, $7, $8, $9, now())",
                behavior,
            )
            storefront = [
                (
                    uuid.uuid4(),
                    shop,
                    anon,
                    session,
                    kind,
                    start + timedelta(minutes=i, seconds=30),
                    orjson.dumps({"value": 10} if kind == "purchase" else {}).decode(),
                    "exp-1",
                    rng.choice(["control", "b"]),
                )
                for i, kind in enumerate(["page_view", "add_to_cart", "purchase"])
            ]
            await db.pool.executemany(
                "INSERT INTO events (event_id, shop_id, anon_id, session_id, event_type, ts, "
                "props, experiment_id, variant, received_at) "
                "VALUES ($1, $2, $3, $4, $5, $6, $7::jsonb, $8, $9, now())",
                storefront,
            )
    return sessions


async def test_an_erased_visitor_leaves_the_rollups(edb: tuple[Database, str]) -> None:
    db, dsn = edb
    rng = random.Random(23)
    domain = f"erase-{uuid.uuid4().hex[:8]}.myshopify.com"
    shop = (await ensure_shop(db, domain)).shop_id
    other = (await ensure_shop(db, f"other-{uuid.uuid4().hex[:8]}.myshopify.com")).shop_id
    for s in (shop, other):
        await funnels.define(
            db,
            await db.pool.fetchval("SELECT domain FROM shops WHERE id = $1", s),
            "lead_capture",
            ["form: event=form_start", "sent: event=form_submit"],
        )
    gone = await _load_visitor(db, shop, "anon-gone", rng)
    for anon in ("anon-stays", "anon-too"):
        await _load_visitor(db, shop, anon, rng)
    await _load_visitor(db, other, "anon-gone", rng)  # the same id in another shop stays
    await refresh(db)
    others_before = await _snapshot(db, other)
    assert await db.pool.fetchval(
        "SELECT count(*) FROM conversion_funnels WHERE shop_id = $1 AND session_id = ANY($2)",
        shop,
        gone,
    )

    report = await erase(
        db, Settings(postgres_dsn=dsn), Erasure(domain, anon_ids=["anon-gone"]), dry_run=False
    )
    assert report.rows["behavior_events"] and report.rows["events"]

    for name, (direct, stored) in DIRECT.items():
        expected = await _set(db, direct, shop)
        assert expected, name
        assert await _set(db, stored, shop) == expected, name
    assert not await db.pool.fetchval(
        "SELECT count(*) FROM conversion_funnels WHERE shop_id = $1 AND session_id = ANY($2)",
        shop,
        gone,
    )
    visitors = await db.pool.fetchval(
        "SELECT sum(visitors) FROM results_aggregates WHERE shop_id = $1", shop
    )
    assert visitors == await db.pool.fetchval(
        "SELECT count(*) FROM (SELECT DISTINCT anon_id, variant, coalesce(us.device_type, "
        "'unknown') FROM events e LEFT JOIN user_sessions us USING (shop_id, session_id) "
        "WHERE e.shop_id = $1 AND experiment_id IS NOT NULL) v",
        shop,
    )
    after = await _snapshot(db, shop)
    assert await _snapshot(db, other) == others_before  # another shop untouched
    # The incremental refresh after it, and a full one, find the same rows.
    await refresh(db)
    assert await _snapshot(db, shop) == after
    await refresh(db, full=True)
    assert await _snapshot(db, shop) == after
