"""pg_partman 4.7 beside our manager: same policy, same clock, same set of monthly partitions.

Runs on the machine's PostgreSQL 15 (``EVENTPIPE_PARTMAN_DSN``, default
``postgresql://postgres@127.0.0.1:5432/postgres``) in a scratch database made
and dropped here; installs the Debian package ``postgresql-15-partman`` when
the extension is missing, and skips with the reason when the server is not
reachable, is not version 15, or the package cannot be installed.

The clock is the real one (pg_partman reads ``CURRENT_TIMESTAMP``), so both
sides get the same ``now``. Policy on both: monthly, premake 3, retention
90 days, drop. Compared: the set of month ranges (names agree too, but ranges
are what matters). Known difference: pg_partman adds a DEFAULT partition; we
deliberately have none (it would forbid DETACH ... CONCURRENTLY), so it is
left out of the comparison.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, date, datetime

import asyncpg
import pytest

from ingest.core.db import Database
from ingest.partitions import PartitionManager, add_months, bound_month, month_start

SERVER = os.environ.get("EVENTPIPE_PARTMAN_DSN", "postgresql://postgres@127.0.0.1:5432/postgres")
TABLE_DDL = (
    "CREATE TABLE {name} (id bigint NOT NULL, ts timestamptz NOT NULL) PARTITION BY RANGE (ts)"
)


def _apt_install() -> str | None:
    """Install postgresql-15-partman; the reason it could not be, or None."""
    if shutil.which("apt-get") is None or os.geteuid() != 0:
        return "apt-get unavailable or not root"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    cmd = ["apt-get", "install", "-y", "-q", "postgresql-15-partman"]
    for prepare in ([], ["apt-get", "update", "-q"]):
        if prepare:
            subprocess.run(prepare, env=env, capture_output=True, timeout=300, check=False)
        done = subprocess.run(cmd, env=env, capture_output=True, timeout=300, check=False)
        if done.returncode == 0:
            return None
    return f"apt-get install failed: {done.stderr.decode(errors='replace')[-300:]}"


async def _partman_available(conn: asyncpg.Connection) -> bool:
    return bool(
        await conn.fetchval("SELECT 1 FROM pg_available_extensions WHERE name = 'pg_partman'")
    )


@pytest.fixture
async def partman_dsn() -> AsyncIterator[str]:
    """A scratch database on the PostgreSQL 15 server with pg_partman installed in it."""
    try:
        conn = await asyncpg.connect(SERVER, timeout=5)
    except (OSError, asyncpg.PostgresError) as exc:
        pytest.skip(f"pg_partman comparison skipped: PostgreSQL at {SERVER} unreachable ({exc})")
    name = f"eventpipe_partman_{uuid.uuid4().hex[:8]}"
    try:
        if await conn.fetchval("SHOW server_version_num") < "150000" or (
            await conn.fetchval("SHOW server_version_num") >= "160000"
        ):
            pytest.skip("pg_partman comparison skipped: the server is not PostgreSQL 15")
        if not await _partman_available(conn):
            reason = await asyncio.to_thread(_apt_install)
            if reason or not await _partman_available(conn):
                pytest.skip(f"pg_partman comparison skipped: {reason or 'extension not found'}")
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    dsn = SERVER.rsplit("/", 1)[0] + "/" + name
    try:
        yield dsn
    finally:
        conn = await asyncpg.connect(SERVER)
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await conn.close()


async def _months(conn: asyncpg.Connection, table: str) -> set[date]:
    rows = await conn.fetch(
        "SELECT pg_get_expr(c.relpartbound, c.oid) AS b FROM pg_inherits i "
        "JOIN pg_class c ON c.oid = i.inhrelid WHERE i.inhparent = $1::regclass",
        table,
    )
    return {m for r in rows if (m := bound_month(r["b"])) is not None}


async def test_same_partitions_as_pg_partman(partman_dsn: str) -> None:
    from ingest.core.migrate import migrate

    await migrate(partman_dsn)  # partition_policies and friends for our side
    now = datetime.now(UTC)
    this_month = month_start(now)
    start = month_start(add_months(this_month, -3))  # the month holding now - 90 days, or later
    async with Database(partman_dsn, max_size=4) as db:
        pool = db.pool
        await pool.execute(TABLE_DDL.format(name="pm_x") + "; " + TABLE_DDL.format(name="ep_x"))
        await pool.execute(
            "INSERT INTO partition_policies (table_name, partition_column, months_ahead, "
            "retention, retention_mode) VALUES ('ep_x', 'ts', 3, '90 days', 'drop')"
        )
        manager = PartitionManager(db)
        oldest = manager.months_wanted(await manager.policy("ep_x"), now, set())[0]
        assert oldest >= start
        await pool.execute("CREATE SCHEMA partman; CREATE EXTENSION pg_partman SCHEMA partman")
        await pool.execute(
            "SELECT partman.create_parent(p_parent_table => 'public.pm_x', p_control => 'ts', "
            "p_type => 'native', p_interval => 'monthly', p_premake => 3, "
            "p_start_partition => $1)",
            f"{oldest.isoformat()} 00:00:00+00",
        )
        await manager.maintain(now, table="ep_x")
        created = await _months(pool, "ep_x")
        assert await _months(pool, "pm_x") == created
        assert max(created) == add_months(this_month, 3)

        # Older months on both sides, then retention 90 days on both.
        old = [add_months(oldest, -n) for n in range(1, 7)]
        policy = await manager.policy("ep_x")
        for month in old:
            await manager.create(policy, month)
        await pool.execute(
            "SELECT partman.create_partition_time('public.pm_x', $1::timestamptz[])",
            [datetime(m.year, m.month, 1, tzinfo=UTC) for m in old],
        )
        assert await _months(pool, "pm_x") == await _months(pool, "ep_x") == created | set(old)
        await pool.execute(
            "UPDATE partman.part_config SET retention = '90 days', retention_keep_table = false "
            "WHERE parent_table = 'public.pm_x'"
        )
        await pool.execute("SELECT partman.run_maintenance('public.pm_x')")
        report = await manager.maintain(now, table="ep_x")
        assert {a.kind for a in report.actions} == {"drop"}
        kept = await _months(pool, "ep_x")
        assert await _months(pool, "pm_x") == kept
        assert min(kept) == oldest and kept == created
