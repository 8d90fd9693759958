"""The dead-letter table: records that could not be loaded, kept with their coordinates."""

from __future__ import annotations

import asyncpg

from consumers.copy_writer import Rejected
from ingest.db import QUERIES


async def record(conn: asyncpg.Connection, group: str, rejected: list[Rejected]) -> None:
    """Insert ``rejected`` into ``dead_letters`` in the caller's transaction."""
    if rejected:
        await conn.executemany(
            QUERIES["insert_dead_letter"],
            [
                (group, r.topic, r.partition, r.offset, r.raw, r.reason, r.error[:2000])
                for r in rejected
            ],
        )
