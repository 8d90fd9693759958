"""Partition manager (spine part): UTC month boundaries, on-demand creation, the window."""

from __future__ import annotations

import asyncio
from datetime import UTC, date, datetime, timedelta

import pytest

from ingest.db import Database
from ingest.errors import OutsideRetentionWindow, PartitionError
from ingest.partitions import (
    PartitionManager,
    Policy,
    add_months,
    bound_month,
    ident,
    month_start,
    partition_name,
)


def test_month_math() -> None:
    assert add_months(date(2026, 11, 1), 3) == date(2027, 2, 1)
    assert add_months(date(2026, 1, 1), -1) == date(2025, 12, 1)
    # 23:30 on Oct 31 in New York is November in UTC.
    from zoneinfo import ZoneInfo

    late = datetime(2026, 10, 31, 23, 30, tzinfo=ZoneInfo("America/New_York"))
    assert month_start(late) == date(2026, 11, 1)
    assert partition_name("events", date(2027, 2, 1)) == "events_p2027_02"
    assert bound_month("FOR VALUES FROM ('2026-10-31 19:00:00-05') TO ('x')") == date(2026, 11, 1)


def test_identifiers_are_checked() -> None:
    assert ident("behavior_events") == '"behavior_events"'
    for bad in ['x"; DROP TABLE shops; --', "Events", "", "a b"]:
        with pytest.raises(PartitionError):
            ident(bad)


def test_window() -> None:
    policy = Policy("events", "ts", 3, timedelta(days=90), "drop", None)
    now = datetime(2026, 11, 25, tzinfo=UTC)
    assert policy.window(now) == (date(2026, 8, 1), date(2027, 2, 1))


async def _bounds(db: Database, table: str) -> dict[str, str]:
    rows = await db.pool.fetch(
        "SELECT c.relname, pg_get_expr(c.relpartbound, c.oid) AS b FROM pg_inherits i "
        "JOIN pg_class c ON c.oid = i.inhrelid WHERE i.inhparent = $1::regclass",
        table,
    )
    return {r["relname"]: r["b"] for r in rows}


async def test_ensure_months_creates_on_demand_and_refuses_outside(db: Database) -> None:
    manager = PartitionManager(db)
    now = datetime.now(UTC)
    this_month = month_start(now)
    await manager.ensure_months("behavior_events", {this_month, add_months(this_month, -1)})
    names = await _bounds(db, "behavior_events")
    assert partition_name("behavior_events", add_months(this_month, -1)) in names
    with pytest.raises(OutsideRetentionWindow, match="outside the window"):
        await manager.ensure_months("behavior_events", {add_months(this_month, 12)})
    with pytest.raises(OutsideRetentionWindow):
        await manager.ensure_months("behavior_events", {add_months(this_month, -12)})


async def test_boundaries_ignore_session_time_zone(pg_dsn: str, db: Database) -> None:
    month = add_months(month_start(datetime.now(UTC)), 4)
    async with Database(pg_dsn, server_settings={"timezone": "Asia/Kolkata"}) as kolkata:
        manager = PartitionManager(kolkata)
        assert await manager.create(await manager.policy("events"), month)
    bound = (await _bounds(db, "events"))[partition_name("events", month)]
    assert f"FROM ('{month.isoformat()} 00:00:00+00')" in bound


async def test_racing_creators_make_one_partition(pg_dsn: str) -> None:
    month = add_months(month_start(datetime.now(UTC)), 5)
    async with Database(pg_dsn, max_size=4) as a, Database(pg_dsn, max_size=4) as b:
        managers = [PartitionManager(d) for d in (a, b, a, b)]
        policy = await managers[0].policy("events")
        results = await asyncio.gather(*(m.create(policy, month) for m in managers))
    assert sorted(results) == [False, False, False, True]


async def test_maintain_is_idempotent(db: Database) -> None:
    manager = PartitionManager(db)
    await manager.maintain()
    assert await manager.maintain() == []
    months = await manager.existing_months("behavior_events")
    this_month = month_start(datetime.now(UTC))
    assert {add_months(this_month, n) for n in range(4)} <= months
