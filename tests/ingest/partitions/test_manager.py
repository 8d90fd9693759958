"""Partition manager on real PostgreSQL: creation ahead, retention, archive, locks, status."""

from __future__ import annotations

import asyncio
import functools
import gzip
import json
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import structlog

from ingest.cli import main
from ingest.core.db import Database, load_queries, queries, sql_dir
from ingest.core.errors import MaintenanceLocked, OutsideRetentionWindow, PartitionError
from ingest.core.migrate import migrate
from ingest.partitions import (
    PartitionManager,
    Policy,
    add_months,
    month_bound,
    month_start,
    partition_name,
    shift_months,
)


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
    assert (await manager.maintain()).actions == []
    months = await manager.existing_months("behavior_events")
    this_month = month_start(datetime.now(UTC))
    assert {add_months(this_month, n) for n in range(4)} <= months


# -- isolated catalogs: each test below works in a fresh, migrated database -------------------

NOW = datetime(2026, 11, 15, 12, 0, tzinfo=UTC)
BEHAVIOR_MONTHS = {add_months(date(2026, 8, 1), n) for n in range(7)}  # 2026-08 .. 2027-02


@pytest.fixture
async def fresh(scratch_database: Any) -> AsyncIterator[Database]:
    """A migrated database of this test's own, with only the behavior_events policy."""
    dsn = await scratch_database()
    await migrate(dsn)
    async with Database(dsn, max_size=4) as database:
        await database.pool.execute("DELETE FROM partition_policies WHERE table_name = 'events'")
        yield database


async def _insert(
    db: Database, when: datetime, shop: uuid.UUID | None = None, **extra: Any
) -> None:
    await db.pool.execute(
        "INSERT INTO behavior_events (event_id, shop_id, session_id, event_type, page_url, "
        '"timestamp", received_at, element_text, coordinates) '
        "VALUES ($1, $2, 's1', 'click', 'https://x/', $3, $3, $4, $5)",
        uuid.uuid4(),
        shop or uuid.uuid4(),
        when,
        extra.get("text"),
        extra.get("coordinates"),
    )


async def _catalog(db: Database) -> list[tuple[Any, ...]]:
    rows = await db.pool.fetch(
        "SELECT c.relname, c.relkind, c.relispartition, pg_get_expr(c.relpartbound, c.oid), "
        "c.relacl::text, c.relowner, "
        "(SELECT count(*) FROM pg_constraint k WHERE k.conrelid = c.oid) "
        "FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE n.nspname = 'public' ORDER BY 1"
    )
    return [tuple(r) for r in rows]


async def _set_mode(db: Database, mode: str, location: Path | None = None) -> None:
    await db.pool.execute(
        "UPDATE partition_policies SET retention_mode = $1, archive_location = $2 "
        "WHERE table_name = 'behavior_events'",
        mode,
        str(location) if location else None,
    )


async def _old_months(db: Database, manager: PartitionManager, rows_per_month: int = 3) -> None:
    """Partitions 2026-03 .. 2026-07 (past 90-day retention at NOW), each with rows."""
    policy = await manager.policy("behavior_events")
    for n in range(5):
        month = add_months(date(2026, 3, 1), n)
        await manager.create(policy, month)
        for i in range(rows_per_month):
            await _insert(db, month_bound(month) + timedelta(days=i, hours=3))


async def test_creates_ahead_and_fills_gaps(fresh: Database) -> None:
    manager = PartitionManager(fresh)
    report = await manager.maintain(NOW)
    assert {m for _, m in report.created} == BEHAVIOR_MONTHS
    assert await manager.existing_months("behavior_events") == BEHAVIOR_MONTHS
    await fresh.pool.execute("DROP TABLE behavior_events_p2026_10")  # a gap
    assert (await manager.maintain(NOW)).created == [("behavior_events", date(2026, 10, 1))]
    assert (await manager.maintain(NOW)).actions == []
    assert (await manager.status(NOW)).healthy


async def test_dry_run_changes_nothing(fresh: Database) -> None:
    manager = PartitionManager(fresh)
    await _old_months(fresh, manager)
    shop = await fresh.pool.fetchval(
        "INSERT INTO shops (domain, webhook_secret, settings) "
        "VALUES ('d.myshopify.com', 's', '{\"data_retention_days\": 1}') RETURNING id"
    )
    await manager.create(await manager.policy("behavior_events"), date(2026, 11, 1))
    await _insert(fresh, NOW - timedelta(days=3), shop)
    before = await _catalog(fresh)
    report = await manager.maintain(NOW, dry_run=True)
    assert await _catalog(fresh) == before
    assert await fresh.pool.fetchval("SELECT count(*) FROM behavior_events") == 16
    kinds = {a.kind for a in report.actions}
    assert kinds == {"create", "drop", "purge_shop"}
    statements = "\n".join(s for a in report.actions for s in a.statements)
    assert "ATTACH PARTITION" in statements
    assert 'DETACH PARTITION "behavior_events_p2026_03" CONCURRENTLY' in statements
    assert "DELETE FROM" in statements and "LIMIT 5000" in statements


async def test_retention_drop_keeps_partly_retained_month(fresh: Database) -> None:
    manager = PartitionManager(fresh)
    await _old_months(fresh, manager)
    report = await manager.maintain(NOW)
    dropped = {a.month for a in report.actions if a.kind == "drop"}
    assert dropped == {add_months(date(2026, 3, 1), n) for n in range(5)}
    assert await manager.existing_months("behavior_events") == BEHAVIOR_MONTHS
    assert await manager.detached("behavior_events") == []
    assert (await manager.maintain(NOW)).actions == []
    # The month holding now is never past retention, even with a zero retention.
    policy = Policy("behavior_events", "timestamp", 3, timedelta(0), "drop", None)
    assert not policy.expired(month_start(NOW), NOW)


async def test_retention_detach_keeps_tables(fresh: Database) -> None:
    manager = PartitionManager(fresh)
    await _old_months(fresh, manager)
    await _set_mode(fresh, "detach")
    report = await manager.maintain(NOW)
    assert {a.kind for a in report.actions} == {"create", "detach"}
    assert len(await manager.detached("behavior_events")) == 5
    assert await fresh.pool.fetchval("SELECT count(*) FROM behavior_events_p2026_03") == 3
    assert await fresh.pool.fetchval("SELECT count(*) FROM behavior_events") == 0
    assert (await manager.maintain(NOW)).actions == []
    assert (await manager.status(NOW)).healthy


async def test_archive_verify_drop_and_restore(fresh: Database, tmp_path: Path) -> None:
    manager = PartitionManager(fresh)
    policy = await manager.policy("behavior_events")
    await manager.create(policy, date(2026, 4, 1))
    odd = ["tab\there", "new\nline", "back\\slash", "ünïcødé ✓", None, "", "\\N"]
    for i, text in enumerate(odd):
        await _insert(
            fresh, datetime(2026, 4, 2 + i, tzinfo=UTC), text=text, coordinates='{"x": 1}'
        )
    select = "SELECT * FROM behavior_events_p2026_04 ORDER BY event_id"
    original = [tuple(r) for r in await fresh.pool.fetch(select)]
    # An archive location that cannot be written: nothing may be dropped.
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    await _set_mode(fresh, "archive", blocker)
    with pytest.raises((OSError, PartitionError)):
        await manager.maintain(NOW)
    assert await fresh.pool.fetchval("SELECT count(*) FROM behavior_events_p2026_04") == 7
    assert not (await manager.status(NOW)).healthy  # retention overdue
    await _set_mode(fresh, "archive", tmp_path / "archive")
    report = await manager.maintain(NOW)
    archived = [a for a in report.actions if a.kind == "archive"]
    assert [(a.partition, a.rows) for a in archived] == [("behavior_events_p2026_04", 7)]
    assert await fresh.pool.fetchval("SELECT to_regclass('behavior_events_p2026_04')") is None
    manifest_file = tmp_path / "archive/behavior_events/behavior_events_p2026_04.manifest.json"
    manifest = json.loads(manifest_file.read_text())
    assert manifest["row_count"] == 7 and manifest["range_from"].startswith("2026-04-01T00:00")
    restored = await manager.restore(manifest_file)
    assert restored.rows == 7
    assert [tuple(r) for r in await fresh.pool.fetch(select)] == original
    with pytest.raises(PartitionError, match="holds rows"):
        await manager.restore(manifest_file)


async def test_archive_is_fsynced_before_the_drop(
    fresh: Database, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Power loss after DROP TABLE commits must not lose the month: the archive file, its
    manifest, their directory (and the new directory's own entry) are on disk first."""
    import os

    import asyncpg

    events: list[tuple[str, str, int]] = []  # (what, path or statement, inode)
    real_fsync = os.fsync
    real_execute = asyncpg.Connection.execute

    def fsync(fd: int) -> None:
        # The path the fd has at fsync time (a temporary name, for a file renamed later)
        # and its inode, which the final file keeps.
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"), os.fstat(fd).st_ino))
        real_fsync(fd)

    async def execute(self: asyncpg.Connection, query: str, *args: Any, **kw: Any) -> str:
        if query.startswith("DROP TABLE"):
            events.append(("drop", query, 0))
        return await real_execute(self, query, *args, **kw)

    manager = PartitionManager(fresh)
    await _old_months(fresh, manager, rows_per_month=2)
    location = tmp_path / "archive"  # does not exist yet: created by the archive
    await _set_mode(fresh, "archive", location)
    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(asyncpg.Connection, "execute", execute)
    report = await manager.maintain(NOW)
    monkeypatch.undo()
    archived = [a.partition for a in report.actions if a.kind == "archive"]
    assert len(archived) == 5
    directory = location / "behavior_events"
    drops = [i for i, e in enumerate(events) if e[0] == "drop"]
    assert len(drops) == 5
    for name, drop in zip(archived, drops, strict=True):
        assert name in events[drop][1]
        before = events[:drop]
        data = directory / f"{name}.copy.gz"
        manifest = directory / f"{name}.manifest.json"
        synced_inodes = {ino for what, _, ino in before if what == "fsync"}
        synced_paths = {path for what, path, _ in before if what == "fsync"}
        assert data.stat().st_ino in synced_inodes, f"{data} not fsynced before its DROP"
        assert manifest.stat().st_ino in synced_inodes, f"{manifest} not fsynced before DROP"
        # The renames into place, and the new directory's entry, are durable too.
        assert str(directory) in synced_paths, "archive directory not fsynced before DROP"
        assert str(location) in synced_paths, "parent of the new directory not fsynced"
        # The directory is fsynced after both renames (the last fsync of it follows
        # the fsync of the manifest's inode).
        last_dir = max(i for i, e in enumerate(before) if e[:2] == ("fsync", str(directory)))
        manifest_sync = max(
            i for i, e in enumerate(before) if e[0] == "fsync" and e[2] == manifest.stat().st_ino
        )
        assert last_dir > manifest_sync


async def test_restore_refuses_a_corrupt_archive(fresh: Database, tmp_path: Path) -> None:
    manager = PartitionManager(fresh)
    await _old_months(fresh, manager, rows_per_month=2)
    await _set_mode(fresh, "archive", tmp_path)
    await manager.maintain(NOW)
    data = tmp_path / "behavior_events/behavior_events_p2026_05.copy.gz"
    with gzip.open(data, "rb") as f:
        rows = f.read()
    with gzip.open(data, "wb") as f:
        f.write(rows.replace(b"click", b"hover", 1))
    with pytest.raises(PartitionError, match="does not match its manifest"):
        await manager.restore(data)
    assert await fresh.pool.fetchval("SELECT to_regclass('behavior_events_p2026_05')") is None


async def test_concurrent_maintain_runs_take_turns(fresh: Database) -> None:
    async with Database(fresh.dsn, max_size=3) as a, Database(fresh.dsn, max_size=3) as b:
        holder = await a.pool.acquire()
        assert await queries.fetchval(holder, "pm_maintenance_try_lock")
        with pytest.raises(MaintenanceLocked) as caught:
            await PartitionManager(b, lock_wait_s=0.3).maintain(NOW)
        assert caught.value.exit_code == 6
        await queries.fetchval(holder, "pm_maintenance_unlock")
        await a.pool.release(holder)
        reports = await asyncio.gather(
            PartitionManager(a).maintain(NOW), PartitionManager(b).maintain(NOW)
        )
    created = [set(r.created) for r in reports]
    assert not created[0] & created[1]
    assert {m for _, m in created[0] | created[1]} == BEHAVIOR_MONTHS


async def test_session_time_zone_gives_same_boundaries(scratch_database: Any) -> None:
    edge = datetime(2026, 11, 30, 23, 30, tzinfo=UTC)  # already December east of UTC
    bounds = []
    for zone in ("UTC", "Pacific/Kiritimati", "America/Los_Angeles"):
        dsn = await scratch_database()
        await migrate(dsn)
        async with Database(dsn, server_settings={"timezone": zone}) as db:
            await PartitionManager(db).maintain(edge, table="behavior_events")
        async with Database(dsn) as utc:
            bounds.append(await _bounds(utc, "behavior_events"))
    assert bounds[0] == bounds[1] == bounds[2]
    assert "behavior_events_p2027_02" in bounds[0] and "behavior_events_p2027_03" not in bounds[0]
    assert bounds[0]["behavior_events_p2026_11"] == (
        "FOR VALUES FROM ('2026-11-01 00:00:00+00') TO ('2026-12-01 00:00:00+00')"
    )


async def test_stray_future_row_creates_nothing_beyond_policy(fresh: Database) -> None:
    manager = PartitionManager(fresh)
    with pytest.raises(OutsideRetentionWindow) as caught:
        await manager.ensure_months("behavior_events", {date(2031, 5, 1)}, now=NOW)
    assert caught.value.reason == "too_new"
    # An operator made a partition years ahead and a row landed in it.
    await manager.create(await manager.policy("behavior_events"), date(2030, 1, 1))
    await _insert(fresh, datetime(2030, 1, 5, tzinfo=UTC))
    await manager.maintain(NOW)
    assert await manager.existing_months("behavior_events") == BEHAVIOR_MONTHS | {date(2030, 1, 1)}


async def test_inserts_continue_while_maintenance_runs(fresh: Database) -> None:
    now = datetime.now(UTC)
    this_month = month_start(now)
    manager = PartitionManager(fresh)
    await manager.maintain(now)
    policy = await manager.policy("behavior_events")
    for n in (-9, -8, -7):
        await manager.create(policy, add_months(this_month, n))
        await _insert(fresh, month_bound(add_months(this_month, n)) + timedelta(days=1))
    await fresh.pool.execute(
        f"DROP TABLE {partition_name('behavior_events', add_months(this_month, 3))}"
    )
    stop = asyncio.Event()
    gaps: list[float] = []
    errors: list[BaseException] = []

    async def writer(db: Database) -> None:
        loop = asyncio.get_running_loop()
        last = loop.time()
        while not stop.is_set():
            try:
                await _insert(db, now)
            except Exception as exc:
                errors.append(exc)
            gaps.append(loop.time() - last)
            last = loop.time()
            await asyncio.sleep(0.005)

    async with Database(fresh.dsn, max_size=2) as wdb:
        task = asyncio.create_task(writer(wdb))
        await asyncio.sleep(0.2)
        first = await manager.maintain(now)
        second = await manager.maintain(shift_months(now, 1))
        await asyncio.sleep(0.2)
        stop.set()
        await task
    kinds = [a.kind for a in first.actions + second.actions]
    assert kinds.count("create") == 2 and kinds.count("drop") >= 3
    assert errors == []
    assert len(gaps) > 20 and max(gaps) < 1.5


async def test_new_partitions_carry_owner_grants_rls_indexes(fresh: Database) -> None:
    tag = uuid.uuid4().hex[:8]
    owner, reader = f"ep_owner_{tag}", f"ep_reader_{tag}"
    pool = fresh.pool
    await pool.execute(f"CREATE ROLE {owner}; CREATE ROLE {reader}")
    try:
        await pool.execute(
            f"ALTER TABLE behavior_events OWNER TO {owner}; "
            f"GRANT SELECT, INSERT ON behavior_events TO {reader}; "
            "ALTER TABLE behavior_events ENABLE ROW LEVEL SECURITY"
        )
        await PartitionManager(fresh).maintain(NOW)
        child = "behavior_events_p2026_12"
        row = await pool.fetchrow(
            "SELECT pg_get_userbyid(relowner) AS owner, relrowsecurity FROM pg_class "
            "WHERE relname = $1",
            child,
        )
        assert row["owner"] == owner and row["relrowsecurity"]
        assert await pool.fetchval("SELECT has_table_privilege($1, $2, 'INSERT')", reader, child)
        indexes = "SELECT count(*) FROM pg_index WHERE indrelid = $1::regclass"
        assert await pool.fetchval(indexes, child) == await pool.fetchval(
            indexes, "behavior_events"
        )
    finally:
        who = await pool.fetchval("SELECT current_user")
        await pool.execute(
            f"REASSIGN OWNED BY {owner} TO {who}; DROP OWNED BY {owner}, {reader}; "
            f"DROP ROLE {owner}; DROP ROLE {reader}"
        )


async def test_shop_retention_deletes_in_batches(fresh: Database) -> None:
    shops = await fresh.pool.fetch(
        "INSERT INTO shops (domain, webhook_secret, settings) VALUES "
        "('short.myshopify.com', 's', '{\"data_retention_days\": 30}'), "
        "('long.myshopify.com', 's', '{\"data_retention_days\": 400}'), "
        "('plain.myshopify.com', 's', '{}') RETURNING id, domain"
    )
    ids = {r["domain"].split(".")[0]: r["id"] for r in shops}
    manager = PartitionManager(fresh, batch_rows=2)
    await manager.maintain(NOW)
    for name, shop in ids.items():
        for days in (60, 50, 45, 40, 35, 10, 1):
            await _insert(fresh, NOW - timedelta(days=days), shop)
        assert name
    report = await manager.maintain(NOW)
    purges = [a for a in report.actions if a.kind == "purge_shop"]
    assert sum(a.rows for a in purges) == 5
    assert {a.note.split(":")[0] for a in purges} == {f"shop {ids['short']}"}
    count = "SELECT count(*) FROM behavior_events WHERE shop_id = $1"
    assert [await fresh.pool.fetchval(count, ids[n]) for n in ("short", "long", "plain")] == [
        2,
        7,
        7,
    ]
    assert (await manager.maintain(NOW)).actions == []


async def test_retimes_of_months_retired_are_pruned_in_batches(fresh: Database) -> None:
    """Before this change event_retimes kept its rows for ever: it grows with every
    retimed event, and nothing ever read the rows of a dropped month again."""
    manager = PartitionManager(fresh, batch_rows=2)
    await _old_months(fresh, manager)
    insert = (
        "INSERT INTO event_retimes (table_name, shop_id, session_id, event_id, event_time) "
        "VALUES ($1, $2, 's1', $3, $4)"
    )
    old = [month_bound(date(2026, 3, 1)) + timedelta(days=d) for d in range(5)]
    recent = [NOW - timedelta(days=d) for d in (1, 2)]
    for when in old + recent:
        await fresh.pool.execute(insert, "behavior_events", uuid.uuid4(), uuid.uuid4(), when)
    # Another table's rows of the same time follow that table's own months.
    await fresh.pool.execute(insert, "events", uuid.uuid4(), uuid.uuid4(), old[0])
    dry = await manager.maintain(NOW, dry_run=True)
    pruning = [a for a in dry.actions if a.kind == "prune_retimes"]
    assert len(pruning) == 1 and "LIMIT 2" in pruning[0].statements[0]
    assert await fresh.pool.fetchval("SELECT count(*) FROM event_retimes") == 8
    report = await manager.maintain(NOW)
    [pruned] = [a for a in report.actions if a.kind == "prune_retimes"]
    assert pruned.rows == 5 and pruned.table == "behavior_events"
    left = await fresh.pool.fetch("SELECT table_name, event_time FROM event_retimes")
    assert sorted((r["table_name"], r["event_time"]) for r in left) == sorted(
        [("behavior_events", t) for t in recent] + [("events", old[0])]
    )
    assert (await manager.maintain(NOW)).actions == []


async def test_status_warnings_and_default_partition_rows(fresh: Database) -> None:
    manager = PartitionManager(fresh)
    report = await manager.status(NOW)
    assert not report.healthy and report.tables[0].missing_ahead == 4
    await fresh.pool.execute(
        "INSERT INTO partition_policies (table_name, partition_column) VALUES ('ghost', 'ts')"
    )
    await manager.maintain(NOW)
    warnings = (await manager.status(NOW)).warnings
    assert warnings == ["ghost: policy names a table that is missing or not partitioned"]
    await fresh.pool.execute("DELETE FROM partition_policies WHERE table_name = 'ghost'")
    # Someone added a default partition and a row for a month not made yet landed there.
    await fresh.pool.execute(
        "CREATE TABLE behavior_events_default PARTITION OF behavior_events DEFAULT"
    )
    await _insert(fresh, datetime(2027, 3, 10, tzinfo=UTC))
    status = await manager.status(NOW)
    assert status.tables[0].default_rows == 1 and not status.healthy
    later = shift_months(NOW, 1)
    report = await manager.maintain(later)
    assert ("behavior_events", date(2027, 3, 1)) in report.created
    detach = [s for a in report.actions for s in a.statements if "DETACH" in s]
    assert detach and not any("CONCURRENTLY" in s for s in detach)  # refused with a default
    assert await fresh.pool.fetchval("SELECT count(*) FROM behavior_events_p2027_03") == 1
    assert (await manager.status(later)).healthy


async def test_cli_status_maintain_policy(
    fresh: Database, capsys: pytest.CaptureFixture[str]
) -> None:
    """The CLI end to end; main() reconfigures structlog, so the config is restored after."""
    saved = structlog.get_config()
    try:
        await _cli(fresh, capsys)
    finally:
        structlog.configure(**saved)


async def _cli(fresh: Database, capsys: pytest.CaptureFixture[str]) -> None:
    common = ["--postgres-dsn", fresh.dsn]
    run = functools.partial(asyncio.to_thread, main)
    assert await run(["partitions", "status", "--json", *common]) == 1
    assert json.loads(capsys.readouterr().out)["healthy"] is False
    assert await run(["partitions", "maintain", "--dry-run", "--json", *common]) == 0
    planned = json.loads(capsys.readouterr().out)
    assert planned["dry_run"] and len(planned["actions"]) == 7
    assert await run(["partitions", "maintain", *common]) == 0
    assert await run(["partitions", "status", *common]) == 0
    out = capsys.readouterr().out
    assert "healthy" in out and "behavior_events_p" in out
    assert (
        await run(
            [
                "partitions",
                "policy",
                "behavior_events",
                "--retention",
                "30 days",
                "--mode",
                "detach",
                "--json",
                *common,
            ]
        )
        == 0
    )
    assert json.loads(capsys.readouterr().out)[0]["retention"] == "30 days"
    for bad in ("0 days", "-1 month"):  # would retire the month being written: refused
        args = ["partitions", "policy", "behavior_events", "--retention", bad]
        assert await run([*args, *common]) != 0
        err = capsys.readouterr().err.strip().splitlines()
        assert any("is not positive" in line for line in err), err
    with pytest.raises(Exception, match="partition_policies_retention_positive"):
        await fresh.pool.execute(
            "UPDATE partition_policies SET retention = INTERVAL '-1 day' "
            "WHERE table_name = 'behavior_events'"
        )


# -- the dry run prints what the run executes ---------------------------------------------------


def _named_queries() -> set[str]:
    """The text of every named query (catalog reads, advisory locks, SET LOCAL ROLE)."""
    return set(load_queries(sql_dir() / "queries.sql").values())


_TX = {"BEGIN;", "COMMIT;", "ROLLBACK;"}


@pytest.mark.parametrize("mode", ["drop", "detach", "archive"])
async def test_dry_run_reports_exactly_the_statements_the_run_executes(
    fresh: Database, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mode: str
) -> None:
    """Every statement sent to the server, recorded at asyncpg's Connection, is compared.

    Left out of the comparison: named queries of sql/queries.sql, statements with
    bind parameters (both runs read the catalog to plan, and the run re-checks under
    its locks), and what asyncpg writes itself (BEGIN/COMMIT/ROLLBACK of
    ``conn.transaction()``, the reset a pool sends on release). Normalised:
    consecutive repeats of a purge batch (how many batches a purge takes depends on
    the rows; the plan shows the batch once), and trailing blanks (asyncpg ends
    ``COPY (...) TO STDOUT`` with a space when given no option).
    """
    import asyncpg

    manager = PartitionManager(fresh, batch_rows=2)
    await _old_months(fresh, manager)
    shop = await fresh.pool.fetchval(
        "INSERT INTO shops (domain, webhook_secret, settings) "
        "VALUES ('d.myshopify.com', 's', '{\"data_retention_days\": 1}') RETURNING id"
    )
    await manager.create(await manager.policy("behavior_events"), date(2026, 11, 1))
    for hours in (30, 40, 50, 60, 70):
        await _insert(fresh, NOW - timedelta(hours=hours), shop)
    gone = await fresh.pool.fetchval(
        "INSERT INTO shops (domain, webhook_secret, uninstalled_at) "
        "VALUES ('gone.myshopify.com', 's', $1) RETURNING id",
        NOW - timedelta(days=31),
    )
    for hours in (30, 40, 50):
        await _insert(fresh, NOW - timedelta(hours=hours), gone)
    await _set_mode(fresh, mode, tmp_path / "archive")
    named = _named_queries()
    sent: list[str] = []

    def recording(name: str) -> Any:
        real = getattr(asyncpg.Connection, name)

        async def method(self: asyncpg.Connection, query: str, *args: Any, **kw: Any) -> Any:
            # Not the manager's text: asyncpg's transaction control and a pool's reset.
            own = query in named or query in _TX or query == self.get_reset_query()
            if not own and not (args if name != "_copy_out" else ()):
                sent.append(query.strip())
            return await real(self, query, *args, **kw)

        return method

    for name in ("execute", "fetch", "fetchval", "fetchrow", "_copy_out"):
        monkeypatch.setattr(asyncpg.Connection, name, recording(name))
    planned = await manager.maintain(NOW, dry_run=True)
    assert sent == []  # the dry run only reads
    report = await manager.maintain(NOW)
    monkeypatch.undo()
    executed = [s for i, s in enumerate(sent) if not (s.startswith("DELETE") and s == sent[i - 1])]
    kinds = {a.kind for a in planned.actions}
    assert kinds == {"create", mode, "purge_shop", "delete_uninstalled"}
    assert len(executed) < len(sent)  # purge batches did repeat, and were collapsed
    assert [s for a in planned.actions for s in a.statements] == executed
    assert [a.statements for a in report.actions] == [a.statements for a in planned.actions]


# -- uninstalled shops (source document 004: hard-delete or anonymize after retention) ----------

_TABLES = ("behavior_events", "events", "user_sessions", "identities")


async def _shop_rows(db: Database, shop: uuid.UUID, tag: str, *, offset: int = 0) -> None:
    """Rows of ``shop`` in every table: 3 months of events and behavior events (2 sessions),
    its 2 sessions and 2 identities; ``tag`` makes its ids its own."""
    for n, month in enumerate((date(2026, 9, 1), date(2026, 10, 1), date(2026, 11, 1))):
        for i in range(3):
            at = month_bound(month) + timedelta(days=i + offset, hours=2)
            session = f"{tag}-s{i % 2}"
            await db.pool.execute(
                "INSERT INTO behavior_events (event_id, shop_id, session_id, event_type, "
                'page_url, "timestamp", received_at, element_text, metadata) VALUES '
                "($1, $2, $3, 'click', $4, $5, $5, 'Dear Ann Smith', $6)",
                uuid.uuid4(),
                shop,
                session,
                f"https://shop.example/p/{n}?email=ann%40example.com#x",
                at,
                json.dumps({"user_id": f"{tag}-u", "depth": 3}),
            )
            await db.pool.execute(
                "INSERT INTO events (event_id, shop_id, anon_id, session_id, user_id, event_type, "
                "ts, received_at, props) VALUES ($1, $2, $3, $4, $5, 'purchase', $6, $6, $7)",
                uuid.uuid4(),
                shop,
                f"{tag}-a",
                session,
                f"{tag}-u" if i else None,
                at,
                json.dumps({"value": 12.5, "paid": True, "customer": {"email": "ann@x"}}),
            )
    for i in range(2):
        await db.pool.execute(
            "INSERT INTO user_sessions (shop_id, session_id, user_agent, referrer, landing_page, "
            "first_seen_at, last_seen_at) VALUES ($1, $2, 'Mozilla/5.0 (Ann)', "
            "'https://mail.example/?q=ann', 'https://shop.example/?token=t', now(), now())",
            shop,
            f"{tag}-s{i}",
        )
        await db.pool.execute(
            "INSERT INTO identities (shop_id, anon_id, user_id, traits, group_id, first_seen_at, "
            "last_seen_at) VALUES ($1, $2, $3, '{\"email\": \"ann@x\"}', 'g1', now(), now())",
            shop,
            f"{tag}-a{i}",
            f"{tag}-u",
        )


async def _dead_letter(db: Database, raw: bytes) -> int:
    return int(
        await db.pool.fetchval(
            "INSERT INTO dead_letters (consumer_group, topic, kafka_partition, kafka_offset, raw, "
            "reason, error) VALUES ('g', 't', 0, "
            "(SELECT coalesce(max(kafka_offset), 0) + 1 FROM dead_letters), $1, 'x', 'x') "
            "RETURNING id",
            raw,
        )
    )


async def _counts(db: Database, shop: uuid.UUID) -> dict[str, int]:
    return {
        t: int(await db.pool.fetchval(f"SELECT count(*) FROM {t} WHERE shop_id = $1", shop))
        for t in _TABLES
    }


async def _three_shops(db: Database, manager: PartitionManager) -> dict[str, uuid.UUID]:
    """Partitions made, then 4 shops with rows in every table, then uninstalled: gone 40
    days before NOW (default 30 days kept: due); recent 5 days before (kept); own 50 days
    before but keeps 90 (its data_retention_days); live never."""
    await db.pool.execute(
        "INSERT INTO partition_policies (table_name, partition_column, retention) "
        "VALUES ('events', 'ts', INTERVAL '2 years')"
    )
    await manager.maintain(NOW)
    rows = await db.pool.fetch(
        "INSERT INTO shops (domain, webhook_secret, settings) VALUES "
        "('gone.myshopify.com', 's', '{}'), ('recent.myshopify.com', 's', '{}'), "
        "('own.myshopify.com', 's', '{\"data_retention_days\": 90}'), "
        "('live.myshopify.com', 's', '{}') RETURNING id, domain"
    )
    shops = {r["domain"].split(".")[0]: r["id"] for r in rows}
    for name, shop in shops.items():
        await _shop_rows(db, shop, name)
    for name, days in (("gone", 40), ("recent", 5), ("own", 50)):
        await db.pool.execute(
            "UPDATE shops SET uninstalled_at = $2 WHERE id = $1",
            shops[name],
            NOW - timedelta(days=days),
        )
    return shops


async def test_uninstalled_shop_rows_are_deleted_after_retention_in_batches(
    fresh: Database,
) -> None:
    manager = PartitionManager(fresh, batch_rows=2)
    shops = await _three_shops(fresh, manager)
    gone = str(shops["gone"])
    alone = await _dead_letter(fresh, json.dumps([{"shop_id": gone, "session_id": "x"}]).encode())
    mixed = await _dead_letter(
        fresh,
        json.dumps(
            [{"shop_id": gone, "session_id": "y"}, {"shop_id": str(shops["live"]), "n": 1}]
        ).encode(),
    )
    other = await _dead_letter(fresh, json.dumps({"shop_id": str(shops["live"])}).encode())
    junk = await _dead_letter(fresh, b"\xff not json " + gone.encode())
    full = {"behavior_events": 9, "events": 9, "user_sessions": 2, "identities": 2}
    assert all([await _counts(fresh, s) == full for s in shops.values()])
    # A month detached by retention (mode detach) is a plain table: purged too.
    await _set_mode(fresh, "detach")
    may = "behavior_events_p2026_05"
    await fresh.pool.execute(f"CREATE TABLE {may} (LIKE behavior_events INCLUDING DEFAULTS)")
    for shop in (shops["gone"], shops["gone"], shops["live"]):
        await fresh.pool.execute(
            f"INSERT INTO {may} (event_id, shop_id, session_id, event_type, page_url, "
            "\"timestamp\", received_at) VALUES ($1, $2, 's', 'click', 'https://x/', "
            "'2026-05-02', '2026-05-02')",
            uuid.uuid4(),
            shop,
        )

    status = await manager.status(NOW)
    states = {u.shop_id: u.state(NOW) for u in status.uninstalled}
    assert states == {
        gone: "overdue",
        str(shops["recent"]): "retained",
        str(shops["own"]): "retained",
    }
    assert not status.healthy and any("uninstalled shop " + gone in w for w in status.warnings)

    planned = await manager.maintain(NOW, dry_run=True)
    assert await _counts(fresh, shops["gone"]) == full  # a dry run changes nothing
    report = await manager.maintain(NOW)
    assert [a.as_dict() | {"rows": 0} for a in report.actions] == [
        a.as_dict() for a in planned.actions
    ]
    purged = [a for a in report.actions if a.kind == "delete_uninstalled"]
    assert {a.partition for a in purged} == {
        may,
        "behavior_events_p2026_09",
        "behavior_events_p2026_10",
        "behavior_events_p2026_11",
        "events_p2026_09",
        "events_p2026_10",
        "events_p2026_11",
        "user_sessions",
        "identities",
        "dead_letters",
    }
    assert all(
        "LIMIT 2" in s for a in purged if a.table != "dead_letters" for s in a.statements[1:2]
    )
    assert {a.table: 0 for a in purged} | {
        t: sum(a.rows for a in purged if a.table == t) for t in {a.table for a in purged}
    } == {**full, "dead_letters": 2, may: 2}
    assert await _counts(fresh, shops["gone"]) == dict.fromkeys(_TABLES, 0)
    left = await fresh.pool.fetch(f"SELECT shop_id FROM {may}")
    assert [r["shop_id"] for r in left] == [shops["live"]]
    for name in ("recent", "own", "live"):
        assert await _counts(fresh, shops[name]) == full, name
    letters = {
        r["id"]: bytes(r["raw"]) for r in await fresh.pool.fetch("SELECT id, raw FROM dead_letters")
    }
    assert alone not in letters and {other, junk, mixed} <= set(letters)
    assert json.loads(letters[mixed]) == [{"shop_id": str(shops["live"]), "n": 1}]

    done = await fresh.pool.fetchrow("SELECT * FROM shop_purges WHERE shop_id = $1", shops["gone"])
    assert done["mode"] == "delete" and done["finished_at"] is not None
    assert json.loads(done["rows"]) == {**full, "dead_letters": 2, may: 2}
    status = await manager.status(NOW)
    assert status.healthy, status.warnings
    assert {u.shop_id: u.state(NOW) for u in status.uninstalled}[gone] == "purged"
    listed = {u["shop_id"]: u for u in status.as_dict()["uninstalled_shops"]}
    assert listed[gone]["state"] == "purged" and listed[gone]["rows"]["events"] == 9
    assert (await manager.maintain(NOW)).actions == []
    # 41 days on, 'recent' (30 days from its uninstall) and 'own' (90) are due too.
    later = NOW + timedelta(days=41)
    report = await manager.maintain(later)
    assert {a.note.split(":")[0] for a in report.actions if a.kind.endswith("uninstalled")} == {
        f"shop {shops['own']}",
        f"shop {shops['recent']}",
    }
    assert await _counts(fresh, shops["own"]) == dict.fromkeys(_TABLES, 0)
    assert await _counts(fresh, shops["recent"]) == dict.fromkeys(_TABLES, 0)
    assert await _counts(fresh, shops["live"]) == full


async def test_uninstalled_shop_rows_are_anonymised_when_so_set(fresh: Database) -> None:
    manager = PartitionManager(fresh, batch_rows=50, uninstalled_mode="anonymize")
    shops = await _three_shops(fresh, manager)
    gone = shops["gone"]
    # An id a client sent that looks like a pseudonym is still an id: it is replaced too.
    fake = "p:" + "ab" * 40
    await fresh.pool.execute(
        "UPDATE events SET session_id = $2 WHERE shop_id = $1 AND ts < '2026-10-01'", gone, fake
    )
    before = await _counts(fresh, gone)
    pseudonym = "SELECT eventpipe_pseudonym($1, $2)"

    # A run for events alone (an interrupted purge, in effect) then the whole run: every
    # row anonymised once, never a pseudonym of a pseudonym.
    await manager.maintain(NOW, table="events")
    assert (
        await fresh.pool.fetchval("SELECT finished_at FROM shop_purges WHERE shop_id = $1", gone)
        is None
    )
    report = await manager.maintain(NOW)
    kinds = {a.kind for a in report.actions}
    assert kinds == {"anonymize_uninstalled", "delete_uninstalled"}  # dead letters go
    assert "events" not in {a.table for a in report.actions}  # done by the first run
    assert await _counts(fresh, gone) == before  # rows stay, anonymised
    p_a = await fresh.pool.fetchval(pseudonym, gone, "gone-a")
    p_s0 = await fresh.pool.fetchval(pseudonym, gone, "gone-s0")
    p_u = await fresh.pool.fetchval(pseudonym, gone, "gone-u")
    p_fake = await fresh.pool.fetchval(pseudonym, gone, fake)
    assert p_a != await fresh.pool.fetchval(pseudonym, shops["live"], "gone-a")  # per shop
    events = await fresh.pool.fetch(
        "SELECT anon_id, session_id, user_id, props FROM events WHERE shop_id = $1 ORDER BY ts",
        gone,
    )
    assert {e["anon_id"] for e in events} == {p_a}
    assert {e["user_id"] for e in events} == {p_u, None}
    assert [e["session_id"] for e in events][:3] == [p_fake] * 3
    assert p_s0 in {e["session_id"] for e in events}
    assert {e["props"] for e in events} == {json.dumps({"paid": True, "value": 12.5})}
    behavior = await fresh.pool.fetch(
        "SELECT session_id, page_url, element_text, metadata FROM behavior_events "
        "WHERE shop_id = $1",
        gone,
    )
    assert p_s0 in {b["session_id"] for b in behavior}  # the same pseudonym: joins survive
    assert all(b["session_id"].startswith("p:") for b in behavior)
    assert {b["element_text"] for b in behavior} == {None}
    assert all("?" not in b["page_url"] and "#" not in b["page_url"] for b in behavior)
    assert {b["metadata"] for b in behavior} == {json.dumps({"depth": 3})}
    sessions = await fresh.pool.fetch(
        "SELECT session_id, user_agent, referrer, landing_page FROM user_sessions "
        "WHERE shop_id = $1",
        gone,
    )
    assert p_s0 in {s["session_id"] for s in sessions}
    assert {(s["user_agent"], s["referrer"], s["landing_page"]) for s in sessions} == {
        (None, None, "https://shop.example/")
    }
    ids = await fresh.pool.fetch("SELECT * FROM identities WHERE shop_id = $1", gone)
    assert {i["user_id"] for i in ids} == {p_u} and {i["traits"] for i in ids} == {"{}"}
    assert all(i["anon_id"].startswith("p:") and i["group_id"].startswith("p:") for i in ids)
    text = ""
    for t in _TABLES:
        text += str(await fresh.pool.fetch(f"SELECT * FROM {t} WHERE shop_id = $1", gone))
    for clear in ("gone-", "Ann", "ann@", "email", fake):
        assert clear not in text, clear
    for name in ("recent", "own", "live"):
        assert (
            await fresh.pool.fetchval(
                "SELECT count(*) FROM events WHERE shop_id = $1 AND anon_id = $2",
                shops[name],
                f"{name}-a",
            )
            == 9
        )
    assert (await manager.maintain(NOW)).actions == []
    assert (await manager.status(NOW)).healthy
    # Only the partition admin can compute pseudonyms (an oracle for guesses otherwise).
    async with fresh.pool.acquire() as conn, conn.transaction():
        await conn.execute("SET LOCAL ROLE eventpipe_analyst")
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await conn.fetchval(pseudonym, gone, "gone-a")


async def test_cli_status_lists_uninstalled_shops(
    fresh: Database, capsys: pytest.CaptureFixture[str]
) -> None:
    """`partitions status` shows an uninstalled shop past its retention as a warning (exit
    1) until `maintain` has purged it; --json lists it with its state."""
    saved = structlog.get_config()
    try:
        common = ["--postgres-dsn", fresh.dsn]
        run = functools.partial(asyncio.to_thread, main)
        assert await run(["partitions", "maintain", *common]) == 0
        shop = await fresh.pool.fetchval(
            "INSERT INTO shops (domain, webhook_secret, uninstalled_at) "
            "VALUES ('gone.myshopify.com', 's', now() - interval '31 days') RETURNING id"
        )
        await _insert(fresh, datetime.now(UTC), shop)
        capsys.readouterr()
        assert await run(["partitions", "status", *common]) == 1
        out = capsys.readouterr().out
        assert "uninstalled shops" in out and f"uninstalled shop {shop}: delete overdue" in out
        assert await run(["partitions", "maintain", *common]) == 0
        capsys.readouterr()
        assert await run(["partitions", "status", "--json", *common]) == 0
        listed = json.loads(capsys.readouterr().out)["uninstalled_shops"]
        assert [(u["shop_id"], u["state"], u["rows"]) for u in listed] == [
            (str(shop), "purged", {"behavior_events": 1, "dead_letters": 0})
        ]
        assert (
            await fresh.pool.fetchval(
                "SELECT count(*) FROM behavior_events WHERE shop_id = $1", shop
            )
            == 0
        )
    finally:
        structlog.configure(**saved)
