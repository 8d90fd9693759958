"""The COPY writer's deduplication: inside one batch, against rows of an earlier batch, and
only within one shop (issue 18, point 2: a shop never suppresses another's event)."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import orjson
import pytest

from consumers.copy_writer import CopyWriter, Decoded, NeedsCare, Written
from consumers.rows import BEHAVIOR
from consumers.values import pg_times
from ingest.core.db import Database
from ingest.partitions import PartitionManager, month_start

SHOP = str(uuid.uuid4())  # a retry comes from the shop of its first attempt


def _event(event_id: str, at: str, shop: str = SHOP, client_time: str | None = None) -> bytes:
    """A behavior event; ``client_time``: stored retimed (the collector moved its time)."""
    return orjson.dumps(
        {
            "event_id": event_id,
            "shop_id": shop,
            "session_id": "s",
            "event_type": "click",
            "page_url": "https://x/",
            "timestamp": at,
            "received_at": at,
            "event_data": {},
            "metadata": {} if client_time is None else {"client_timestamp": client_time},
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


async def _rows_of(db: Database, event_id: str) -> list[tuple[str, datetime]]:
    rows = await db.pool.fetch(
        'SELECT shop_id::text AS shop, "timestamp" AS at FROM behavior_events '
        'WHERE event_id = $1 ORDER BY shop_id, "timestamp"',
        uuid.UUID(event_id),
    )
    return [(r["shop"], r["at"]) for r in rows]


async def test_another_shops_event_with_the_same_id_and_time_is_a_row_of_its_own(
    db: Database, now: str
) -> None:
    """Shop A's event is stored; shop B's event of the same id and time is B's own row, and
    in a batch with a retry of A's it is the one row the batch adds (matched by shop)."""
    a_shop, b_shop = sorted(str(uuid.uuid4()) for _ in range(2))
    e = str(uuid.uuid4())
    first = await _write(db, [_event(e, now, a_shop)])
    assert first.count == 1
    again = await _write(db, [_event(e, now, a_shop), _event(e, now, b_shop)])
    assert again.count == 1
    assert [r[1] for r in again.rows] == [b_shop]
    at = datetime.fromisoformat(now)
    assert await _rows_of(db, e) == [(a_shop, at), (b_shop, at)]


async def test_a_retimed_event_of_one_shop_never_removes_another_shops_row(
    db: Database, now: str
) -> None:
    """The trigger keeping one row per retimed event (0006) looks only at the event's shop.

    1. A stores the event; B's of the same id arrives retimed to the same time: both stay.
    2. A stores the event at t; B's is stored retimed at t2, then B's retry comes at t
       (not corrected): B's retry goes, A's row at t stays.
    """
    at = datetime.fromisoformat(now)
    earlier = (at.replace(microsecond=0) - timedelta(minutes=1)).isoformat()
    client = (at - timedelta(hours=3)).isoformat()
    await PartitionManager(db).ensure_months(
        "behavior_events", {month_start(datetime.fromisoformat(earlier))}
    )
    a_shop, b_shop = sorted(str(uuid.uuid4()) for _ in range(2))

    e1 = str(uuid.uuid4())
    await _write(db, [_event(e1, now, a_shop)])
    await _write(db, [_event(e1, now, b_shop, client_time=client)])
    assert await _rows_of(db, e1) == [(a_shop, at), (b_shop, at)]

    e2 = str(uuid.uuid4())
    await _write(db, [_event(e2, now, a_shop)])
    await _write(db, [_event(e2, earlier, b_shop, client_time=now)])
    await _write(db, [_event(e2, now, b_shop)])
    assert await _rows_of(db, e2) == [
        (a_shop, at),
        (b_shop, datetime.fromisoformat(earlier)),
    ]
