"""Migrations: applied in order, once, each in one transaction; changed files refused."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path

import asyncpg
import pytest

from ingest.core.errors import MigrationError
from ingest.core.migrate import discover, migrate


async def test_real_migrations_apply_once(scratch_database: Callable[[], Awaitable[str]]) -> None:
    dsn = await scratch_database()
    applied = await migrate(dsn)
    assert [m.version for m in applied] == [m.version for m in discover()]
    assert await migrate(dsn) == []
    conn = await asyncpg.connect(dsn)
    try:
        kinds = dict(
            await conn.fetch(
                "SELECT relname, relkind::text FROM pg_class WHERE relname = ANY($1)",
                ["behavior_events", "events", "shops", "user_sessions"],
            )
        )
    finally:
        await conn.close()
    assert kinds == {"behavior_events": "p", "events": "p", "shops": "r", "user_sessions": "r"}


async def test_changed_migration_is_refused(
    scratch_database: Callable[[], Awaitable[str]], tmp_path: Path
) -> None:
    dsn = await scratch_database()
    (tmp_path / "0001_a.sql").write_text("CREATE TABLE a (x int);")
    await migrate(dsn, tmp_path)
    (tmp_path / "0001_a.sql").write_text("CREATE TABLE a (x bigint);")
    with pytest.raises(MigrationError, match="changed after it was applied"):
        await migrate(dsn, tmp_path)


async def test_failing_migration_applies_nothing(
    scratch_database: Callable[[], Awaitable[str]], tmp_path: Path
) -> None:
    dsn = await scratch_database()
    (tmp_path / "0001_ok.sql").write_text("CREATE TABLE ok (x int);")
    (tmp_path / "0002_bad.sql").write_text("CREATE TABLE half (x int); SELECT * FROM nowhere;")
    with pytest.raises(MigrationError, match="0002_bad failed"):
        await migrate(dsn, tmp_path)
    conn = await asyncpg.connect(dsn)
    try:
        assert await conn.fetchval("SELECT to_regclass('ok') IS NOT NULL")
        assert await conn.fetchval("SELECT to_regclass('half') IS NULL")
        assert await conn.fetchval("SELECT max(version) FROM schema_migrations") == 1
    finally:
        await conn.close()


def test_badly_named_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "create_things.sql").write_text("")
    with pytest.raises(MigrationError, match=r"NNNN_name\.sql"):
        discover(tmp_path)
