"""Numbered plain-SQL migrations from ``sql/migrations``, each applied in one transaction."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import structlog

from ingest.core.db import connect, queries, sql_dir
from ingest.core.errors import MigrationError

log = structlog.get_logger(__name__)

_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")


@dataclass(frozen=True)
class Migration:
    """One migration file."""

    version: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        """sha256 of the file's text."""
        return hashlib.sha256(self.sql.encode()).hexdigest()


def discover(directory: Path | None = None) -> list[Migration]:
    """The migrations in ``directory`` (default ``sql/migrations``), in version order."""
    directory = directory or sql_dir() / "migrations"
    found: list[Migration] = []
    for path in sorted(directory.glob("*.sql")):
        match = _NAME.match(path.name)
        if not match:
            raise MigrationError(
                f"migration file {path.name} is not named NNNN_name.sql",
                hint="rename it, e.g. 0007_add_index.sql",
            )
        found.append(Migration(int(match[1]), match[2], path.read_text()))
    versions = [m.version for m in found]
    if len(set(versions)) != len(versions):
        raise MigrationError(f"two migrations share a version in {directory}")
    return found


async def migrate(dsn: str, directory: Path | None = None) -> list[Migration]:
    """Apply every pending migration; return those applied now (empty: up to date).

    Concurrent runs serialise on an advisory lock. An applied migration whose
    file has changed since is an error: migrations are append-only.
    """
    migrations = discover(directory)
    conn = await connect(dsn)
    applied_now: list[Migration] = []
    try:
        await queries.execute(conn, "create_migrations_table")
        for migration in migrations:
            async with conn.transaction():
                await queries.execute(conn, "migrations_lock")
                done = {r["version"]: r for r in await queries.fetch(conn, "applied_migrations")}
                if migration.version in done:
                    if done[migration.version]["checksum"] != migration.checksum:
                        raise MigrationError(
                            f"migration {migration.version:04d}_{migration.name} was changed "
                            "after it was applied",
                            hint="restore the file as it was and put the change in a new migration",
                        )
                    continue
                try:
                    await conn.execute(migration.sql)
                except asyncpg.PostgresError as exc:
                    raise MigrationError(
                        f"migration {migration.version:04d}_{migration.name} failed: {exc}",
                        hint="nothing of it was applied; fix the file and run migrate again",
                    ) from exc
                await queries.execute(
                    conn,
                    "record_migration",
                    migration.version,
                    migration.name,
                    migration.checksum,
                )
                applied_now.append(migration)
                log.info("migration applied", version=migration.version, name=migration.name)
    finally:
        await conn.close()
    return applied_now
