"""The dead-letter table: records that could not be loaded, kept to look at and replay."""

from __future__ import annotations

from collections.abc import Mapping

import asyncpg

from consumers.copy_writer import Rejected
from ingest.core.db import Database, queries
from ingest.core.producer import EventProducer


async def record(
    conn: asyncpg.Connection,
    group: str,
    rejected: list[Rejected],
    log_ids: Mapping[int, str],
) -> None:
    """Insert ``rejected`` into ``dead_letters`` in the caller's transaction.

    ``log_ids`` names the broker log each Kafka partition was read from: a letter is
    unique by its log, topic, partition, offset and place in the record, so one read
    again from the same log is kept once, and one at an offset a new log reuses is kept.
    """
    if rejected:
        await queries.executemany(
            conn,
            "insert_dead_letter",
            [
                (
                    group,
                    log_ids.get(r.partition, ""),
                    r.topic,
                    r.partition,
                    r.offset,
                    r.index,
                    r.raw,
                    r.reason,
                    r.error[:2000],
                )
                for r in rejected
            ],
        )


async def listing(
    db: Database, *, reason: str | None = None, include_replayed: bool = False, limit: int = 100
) -> list[asyncpg.Record]:
    """Dead letters, oldest first."""
    return await queries.fetch(db.pool, "list_dead_letters", reason, include_replayed, limit)


async def replay(
    db: Database,
    producer: EventProducer,
    *,
    ids: list[int] | None = None,
    reason: str | None = None,
    everything: bool = False,
) -> int:
    """Produce the chosen dead letters' raw records to their topics again; returns how many.

    A replayed record is loaded like any other: if it is still bad it comes back
    as a new dead letter; if it was loaded before, deduplication keeps one row.
    """
    rows = await queries.fetch(db.pool, "dead_letters_to_replay", ids or [], reason, everything)
    by_topic: dict[str, list[tuple[bytes, bytes]]] = {}
    for row in rows:
        by_topic.setdefault(row["topic"], []).append((b"replay", bytes(row["raw"])))
    for topic, messages in by_topic.items():
        await producer.send_batch(topic, messages)
    await queries.execute(db.pool, "mark_replayed", [row["id"] for row in rows])
    return len(rows)
