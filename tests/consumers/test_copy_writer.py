"""The COPY writer's deduplication: inside one batch, and against rows of an earlier batch."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import orjson
import pytest

from consumers.copy_writer import CopyWriter, Decoded, NeedsCare, Written
from consumers.rows import BEHAVIOR
from consumers.values import pg_times
from ingest.core.db import Database
from ingest.partitions import PartitionManager, month_start


def _event(event_id: str, at: str) -> bytes:
    return orjson.dumps(
        {
            "event_id": event_id,
            "shop_id": str(uuid.uuid4()),
            "session_id": "s",
            "event_type": "click",
            "page_url": "https://x/",
            "timestamp": at,
            "received_at": at,
            "event_data": {},
            "metadata": {},
        }
    )


def _decoded(values: list[bytes]) -> list[Decoded]:
    out: list[Decoded] = []
    for offset, value in enumerate(values):
        decoded = BEHAVIOR.decode(value)
        assert decoded is not None
        rows, contexts, batched = decoded
        out.append(Decoded("t", 0, offset, value, batched, rows, contexts))
    return out


async def _write(db: Database, values: list[bytes]) -> Written:
    """Write as the loader does: a plain COPY, and carefully when that meets a duplicate."""
    writer = CopyWriter(BEHAVIOR)
    async with db.pool.acquire() as conn, pg_times(conn) as conn:
        try:
            async with conn.transaction():
                return await writer.write(conn, _decoded(values), careful=False)
        except NeedsCare:
            async with conn.transaction():
                return await writer.write(conn, _decoded(values), careful=True)


async def _count(db: Database, ids: list[str]) -> int:
    n = await db.pool.fetchval(
        "SELECT count(*) FROM behavior_events WHERE event_id = ANY($1::uuid[])", ids
    )
    return int(n)


@pytest.fixture
async def now(db: Database) -> str:
    at = datetime.now(UTC)
    await PartitionManager(db).ensure_months("behavior_events", {month_start(at)})
    return at.isoformat()


async def test_a_duplicate_inside_one_batch_is_one_row_and_counted_once(
    db: Database, now: str
) -> None:
    a, b = str(uuid.uuid4()), str(uuid.uuid4())
    written = await _write(db, [_event(a, now), _event(b, now), _event(a, now)])
    assert written.count == 2
    assert sorted(str(r[0]) for r in written.rows) == sorted([a, b])
    assert await _count(db, [a, b]) == 2


async def test_a_row_of_an_earlier_batch_is_not_written_again(db: Database, now: str) -> None:
    a, c = str(uuid.uuid4()), str(uuid.uuid4())
    first = await _write(db, [_event(a, now)])
    assert first.count == 1
    again = await _write(db, [_event(a, now), _event(c, now)])
    assert again.count == 1
    assert [str(r[0]) for r in again.rows] == [c]
    assert await _count(db, [a, c]) == 2
