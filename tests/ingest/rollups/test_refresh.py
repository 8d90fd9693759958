"""The rollups (issue 24) on real PostgreSQL: each equals the source document's query
over the same events, and the incremental refresh recomputes only what changed.

The module has a database of its own: rollup_state is global, and the other tests'
events would be refreshed too.
"""

from __future__ import annotations

import asyncio
import random
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from decimal import Decimal
from typing import Any

import orjson
import pytest

from ingest.core.db import Database
from ingest.core.migrate import migrate
from ingest.core.shops import ensure_shop
from ingest.partitions import PartitionManager, month_start
from ingest.rollups import refresh, status
from tests.helpers import uncommitted_behavior_row

TODAY = datetime.now(UTC).date()
DAYS = [TODAY - timedelta(days=d) for d in range(1, 7)]
BEHAVIOR_TYPES = [
    "click",
    "rage_click",
    "hesitation",
    "form_start",
    "form_abandon",
    "form_submit",
    "error",
    "page_view",
    "scroll_depth",
]
STOREFRONT_TYPES = ["page_view", "product_view", "add_to_cart", "begin_checkout", "purchase"]

# -- the source documents' queries, run directly over the events (per shop, UTC days) --------

DOC_DAILY_FRICTION = """
SELECT be.shop_id, DATE(be.timestamp) as date, be.element_path, be.event_type,
  COUNT(*) as event_count,
  COUNT(DISTINCT be.session_id) as unique_sessions,
  AVG((be.event_data->>'hesitation_ms')::INTEGER) as avg_hesitation_ms,
  PERCENTILE_CONT(0.5) WITHIN GROUP (ORDER BY (be.event_data->>'hesitation_ms')::INTEGER)
    as median_hesitation_ms,
  SUM(CASE WHEN be.event_type = 'form_abandon' THEN 1 ELSE 0 END) as form_abandons,
  SUM(CASE WHEN be.event_type = 'form_submit' THEN 1 ELSE 0 END) as form_submits
FROM behavior_events be
WHERE be.shop_id = ANY($1)
GROUP BY be.shop_id, DATE(be.timestamp), be.element_path, be.event_type
"""
DOC_COMPONENT_PERFORMANCE = """
SELECT be.shop_id, DATE(be.timestamp) as date, be.component_id, be.page_url,
  COUNT(*) as total_interactions,
  COUNT(DISTINCT be.session_id) as unique_users,
  SUM(CASE WHEN be.event_type = 'click' THEN 1 ELSE 0 END) as clicks,
  SUM(CASE WHEN be.event_type = 'rage_click' THEN 1 ELSE 0 END) as rage_clicks,
  SUM(CASE WHEN be.event_type = 'hesitation' THEN 1 ELSE 0 END) as hesitations,
  AVG((be.event_data->>'hesitation_ms')::INTEGER) as avg_hesitation_ms,
  COUNT(DISTINCT cf.session_id) as conversions,
  MIN(be.timestamp) as first_seen,
  MAX(be.timestamp) as last_seen
FROM behavior_events be
LEFT JOIN conversion_funnels cf ON be.shop_id = cf.shop_id AND be.session_id = cf.session_id
  AND cf.funnel_name = 'lead_capture'
WHERE be.component_id IS NOT NULL AND be.shop_id = ANY($1)
GROUP BY be.shop_id, DATE(be.timestamp), be.component_id, be.page_url
"""
# 004 gives no query: what results_aggregates means, written plainly.
DOC_RESULTS = """
SELECT e.shop_id, e.experiment_id, e.variant, coalesce(us.device_type, 'unknown') AS segment,
  COUNT(DISTINCT e.anon_id) AS visitors,
  SUM(CASE WHEN e.event_type IN ('page_view', 'product_view') THEN 1 ELSE 0 END) AS views,
  SUM(CASE WHEN e.event_type = 'add_to_cart' THEN 1 ELSE 0 END) AS add_to_cart,
  SUM(CASE WHEN e.event_type = 'begin_checkout' THEN 1 ELSE 0 END) AS begin_checkout,
  SUM(CASE WHEN e.event_type = 'purchase' THEN 1 ELSE 0 END) AS purchase,
  COALESCE(SUM(CASE WHEN e.event_type = 'purchase' THEN (e.props->>'value')::numeric END), 0)
    AS revenue
FROM events e
LEFT JOIN user_sessions us ON us.shop_id = e.shop_id AND us.session_id = e.session_id
WHERE e.experiment_id IS NOT NULL AND e.variant IS NOT NULL AND e.shop_id = ANY($1)
GROUP BY 1, 2, 3, 4
"""
ROLLUP_COLUMNS = {
    "daily_friction_summary": (
        DOC_DAILY_FRICTION,
        "shop_id, date, element_path, event_type, event_count, unique_sessions, "
        "avg_hesitation_ms, median_hesitation_ms, form_abandons, form_submits",
    ),
    "component_performance": (
        DOC_COMPONENT_PERFORMANCE,
        "shop_id, date, component_id, page_url, total_interactions, unique_users, clicks, "
        "rage_clicks, hesitations, avg_hesitation_ms, conversions, first_seen, last_seen",
    ),
    "results_aggregates": (
        DOC_RESULTS,
        "shop_id, experiment_id, variant, segment, visitors, views, add_to_cart, "
        "begin_checkout, purchase, revenue",
    ),
}
READ_ROLLUP = {  # reviewed constants, one per rollup
    name: f"SELECT {cols} FROM {name} WHERE shop_id = ANY($1)"
    for name, (_, cols) in ROLLUP_COLUMNS.items()
}


def _norm(value: Any) -> Any:
    """Numbers compared to 9 places (AVG and PERCENTILE_CONT of ints vs numerics)."""
    if isinstance(value, Decimal | float):
        return round(float(value), 9)
    return value


async def _rows(db: Database, sql: str, shops: list[uuid.UUID]) -> set[tuple[Any, ...]]:
    return {tuple(_norm(v) for v in r.values()) for r in await db.pool.fetch(sql, shops)}


async def assert_rollups_equal_documents(db: Database, shops: list[uuid.UUID]) -> None:
    for name, (doc, _) in ROLLUP_COLUMNS.items():
        expected = await _rows(db, doc, shops)
        assert expected, name  # the data set reaches every rollup
        assert await _rows(db, READ_ROLLUP[name], shops) == expected, name


# -- the data set -----------------------------------------------------------------------------


@dataclass
class DataSet:
    shops: list[uuid.UUID]
    sessions: dict[uuid.UUID, list[str]]


@pytest.fixture(scope="module")
async def rdb(scratch_database: Any) -> AsyncIterator[Database]:
    dsn: str = await scratch_database("eventpipe_rollups")
    await migrate(dsn)
    async with Database(dsn, max_size=4) as database:
        manager = PartitionManager(database)
        months = {month_start(datetime.combine(d, time(), UTC)) for d in [*DAYS, TODAY]}
        for table in ("behavior_events", "events"):
            await manager.ensure_months(table, months)
        yield database


def _at(day: date, rng: random.Random) -> datetime:
    return datetime.combine(day, time(), UTC) + timedelta(seconds=rng.randrange(86400))


def _received() -> datetime:
    """Events are received as they are loaded (a refresh sees them; the times are old)."""
    return datetime.now(UTC)


async def insert_behavior(
    db: Database,
    shop: uuid.UUID,
    sessions: list[str],
    day: date,
    n: int,
    rng: random.Random,
    received_at: datetime | None = None,
) -> None:
    rows = []
    for _ in range(n):
        kind = rng.choice(BEHAVIOR_TYPES)
        data: dict[str, Any] = {}
        if kind == "hesitation":
            data["hesitation_ms"] = rng.randrange(1500, 9000)
        if kind == "scroll_depth":
            data["percentage"] = rng.choice([25, 50, 75, 100])
        when = _at(day, rng)
        rows.append(
            (
                uuid.uuid4(),
                shop,
                rng.choice(sessions),
                kind,
                rng.choice(["#buy", "form#signup", "a.nav", None]),
                rng.choice(["button", "a", None]),
                orjson.dumps(data).decode(),
                when,
                rng.choice(["https://s/", "https://s/cart"]),
                rng.choice(["hero", "cta", None]),
                received_at or _received(),
            )
        )
    await db.pool.executemany(
        "INSERT INTO behavior_events (event_id, shop_id, session_id, event_type, element_path, "
        'element_type, event_data, "timestamp", page_url, component_id, received_at) '
        "VALUES ($1, $2, $3, $4, $5, $6, $7::jsonb, $8, $9, $10, $11)",
        rows,
    )


async def insert_storefront(
    db: Database,
    shop: uuid.UUID,
    sessions: list[str],
    day: date,
    n: int,
    rng: random.Random,
    received_at: datetime | None = None,
) -> None:
    rows = []
    for _ in range(n):
        kind = rng.choice(STOREFRONT_TYPES)
        experiment = rng.choice(["exp-price", "exp-copy", None])
        props: dict[str, Any] = {}
        if kind == "purchase":
            props["value"] = rng.choice([12.5, "40.00", 7])
        when = _at(day, rng)
        session = rng.choice(sessions)
        rows.append(
            (
                uuid.uuid4(),
                shop,
                f"anon-{session}-{rng.randrange(2)}",
                session,
                kind,
                when,
                orjson.dumps(props).decode(),
                experiment,
                rng.choice(["control", "variant_a"]) if experiment else None,
                received_at or _received(),
            )
        )
    await db.pool.executemany(
        "INSERT INTO events (event_id, shop_id, anon_id, session_id, event_type, ts, props, "
        "experiment_id, variant, received_at) VALUES ($1, $2, $3, $4, $5, $6, $7::jsonb, $8, "
        "$9, $10)",
        rows,
    )


async def make_data(db: Database, n_shops: int = 3, seed: int = 24) -> DataSet:
    rng = random.Random(seed)
    data = DataSet([], {})
    for _ in range(n_shops):
        shop = (await ensure_shop(db, f"roll-{uuid.uuid4().hex[:8]}.myshopify.com")).shop_id
        data.shops.append(shop)
        sessions = [f"sess-{uuid.uuid4().hex[:8]}" for _ in range(6)]
        data.sessions[shop] = sessions
        for session in sessions:
            first = _at(DAYS[-1], rng)
            await db.pool.execute(
                "INSERT INTO user_sessions (shop_id, session_id, landing_page, device_type, "
                "first_seen_at, last_seen_at) VALUES ($1, $2, 'https://s/', $3, $4, $4)",
                shop,
                session,
                rng.choice(["mobile", "desktop", "tablet", None]),
                first,
            )
        # component_performance's conversions: the sessions in lead_capture
        await db.pool.execute(
            "INSERT INTO funnels (shop_id, name, steps) VALUES ($1, 'lead_capture', "
            """'[{"name": "form", "event_type": "form_submit", "element_path": "form#signup"}]')""",
            shop,
        )
        for day in DAYS:
            await insert_behavior(db, shop, sessions, day, 60, rng)
            await insert_storefront(db, shop, sessions, day, 20, rng)
    return data


async def _state(db: Database) -> dict[str, Any]:
    return {r["rollup"]: dict(r) for r in await db.pool.fetch("SELECT * FROM rollup_state")}


async def _refreshed_at(db: Database, shops: list[uuid.UUID]) -> dict[tuple[Any, ...], datetime]:
    rows = await db.pool.fetch(
        "SELECT shop_id, date, element_path, event_type, refreshed_at "
        "FROM daily_friction_summary WHERE shop_id = ANY($1)",
        shops,
    )
    return {tuple(r.values())[:4]: r["refreshed_at"] for r in rows}


# -- tests --------------------------------------------------------------------------------------


async def test_rollups_equal_the_documents_queries_and_follow_late_events(rdb: Database) -> None:
    data = await make_data(rdb)
    done = await refresh(rdb)
    assert {r.rollup for r in done} == {*ROLLUP_COLUMNS, "conversion_funnels"}
    await assert_rollups_equal_documents(rdb, data.shops)
    before = await _refreshed_at(rdb, data.shops)
    state = await _state(rdb)

    # Late events for an old day of shop 0, and a new day (today) of shop 1.
    rng = random.Random(99)
    now = datetime.now(UTC)
    old_day, shop0, shop1 = DAYS[-1], data.shops[0], data.shops[1]
    await insert_behavior(rdb, shop0, data.sessions[shop0], old_day, 15, rng, received_at=now)
    await insert_behavior(rdb, shop1, data.sessions[shop1], TODAY, 15, rng, received_at=now)
    await insert_storefront(rdb, shop0, data.sessions[shop0], old_day, 10, rng, received_at=now)
    assert await _rows(rdb, DOC_DAILY_FRICTION, data.shops) != await _rows(
        rdb, READ_ROLLUP["daily_friction_summary"], data.shops
    )

    done = await refresh(rdb)
    by_name = {r.rollup: r for r in done}
    # Only the two (shop, day) groups received anything: only they were recomputed.
    assert by_name["daily_friction_summary"].groups == 2
    # and the component days of the sessions that got events (their lead_capture rows)
    assert by_name["component_performance"].groups >= 2
    assert by_name["results_aggregates"].groups <= 2  # shop 0's experiments
    await assert_rollups_equal_documents(rdb, data.shops)
    after = await _refreshed_at(rdb, data.shops)
    touched = {k for k, at in after.items() if before.get(k) != at}
    assert touched and {(k[0], k[1]) for k in touched} <= {(shop0, old_day), (shop1, TODAY)}
    new_state = await _state(rdb)
    for name in ROLLUP_COLUMNS:
        assert new_state[name]["watermark"] > state[name]["watermark"]
        assert new_state[name]["last_refresh_at"] > state[name]["last_refresh_at"]

    # Nothing new: nothing recomputed.
    done = await refresh(rdb)
    assert all(r.groups == 0 and r.rows == 0 for r in done)
    await assert_rollups_equal_documents(rdb, data.shops)

    # --full gives the same rows.
    done = await refresh(rdb, full=True)
    assert all(r.full for r in done)
    await assert_rollups_equal_documents(rdb, data.shops)


async def test_refresh_beside_a_loader_transaction_misses_nothing(rdb: Database) -> None:
    """Rows a loader's transaction wrote before a refresh's snapshot but committed after
    it (their timestamps all older than the refresh) are taken by the next refresh."""
    data = await make_data(rdb, n_shops=1, seed=5)
    shop = data.shops[0]
    await refresh(rdb)
    rng = random.Random(3)
    # received an hour ago, loaded now, still uncommitted while the refresh runs
    async with uncommitted_behavior_row(
        rdb,
        shop,
        uuid.uuid4(),
        session_id=data.sessions[shop][0],
        timestamp=_at(DAYS[2], rng),
        received_at=datetime.now(UTC) - timedelta(hours=1),
        page_url="https://s/late",
        event_type="rage_click",
        component_id="hero",
    ):
        await refresh(rdb)
    await refresh(rdb)
    await assert_rollups_equal_documents(rdb, data.shops)


async def test_a_row_received_long_ago_and_loaded_now_is_counted(rdb: Database) -> None:
    """A spool drained days after the events were received: the next incremental
    refresh counts them (with a received_at watermark it never did)."""
    data = await make_data(rdb, n_shops=1, seed=41)
    shop = data.shops[0]
    await refresh(rdb)
    await assert_rollups_equal_documents(rdb, data.shops)
    rng = random.Random(4)
    long_ago = datetime.now(UTC) - timedelta(days=2)
    await insert_behavior(rdb, shop, data.sessions[shop], DAYS[3], 12, rng, received_at=long_ago)
    await insert_storefront(rdb, shop, data.sessions[shop], DAYS[3], 8, rng, received_at=long_ago)
    done = {r.rollup: r for r in await refresh(rdb)}
    assert not done["daily_friction_summary"].full and done["daily_friction_summary"].groups >= 1
    await assert_rollups_equal_documents(rdb, data.shops)


async def test_concurrent_refreshes_do_not_interleave(rdb: Database) -> None:
    data = await make_data(rdb, n_shops=2, seed=11)
    results = await asyncio.gather(*(refresh(rdb) for _ in range(3)))
    await assert_rollups_equal_documents(rdb, data.shops)
    # Each group was recomputed by one of them; the others found it done.
    friction = [r for rs in results for r in rs if r.rollup == "daily_friction_summary"]
    assert sum(1 for r in friction if r.groups > 0) >= 1


async def test_dry_run_changes_nothing_and_status_reports_lag(rdb: Database) -> None:
    await make_data(rdb, n_shops=1, seed=8)
    before = await _state(rdb)
    done = await refresh(rdb, dry_run=True)
    assert all(r.dry_run and r.groups > 0 and r.rows == 0 for r in done)
    assert await _state(rdb) == before
    await refresh(rdb)
    report = {s.rollup: s for s in await status(rdb)}
    assert set(report) == {*ROLLUP_COLUMNS, "conversion_funnels"}
    assert all(0 <= s.lag_s < 60 for s in report.values())
    assert all(s.rows > 0 for s in report.values() if s.rollup in ROLLUP_COLUMNS)


async def test_rollup_rows_follow_the_shops_retention(rdb: Database) -> None:
    data = await make_data(rdb, n_shops=1, seed=9)
    shop = data.shops[0]
    await rdb.pool.execute(
        "UPDATE shops SET settings = settings || '{\"data_retention_days\": 3}' WHERE id = $1",
        shop,
    )
    await refresh(rdb)
    days = {
        r["date"]
        for r in await rdb.pool.fetch(
            "SELECT date FROM daily_friction_summary WHERE shop_id = $1 "
            "UNION SELECT date FROM component_performance WHERE shop_id = $1",
            shop,
        )
    }
    assert days and min(days) >= TODAY - timedelta(days=3)
