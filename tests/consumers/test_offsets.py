"""Offsets kept in PostgreSQL: the fence, on both ways the loader moves them."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import orjson
import pytest

from consumers.copy_writer import Decoded
from consumers.loader import Loader
from consumers.offsets import Fenced, OffsetStore
from consumers.rows import BEHAVIOR
from consumers.values import pg_times
from ingest.core.db import Database
from ingest.core.settings import Settings
from ingest.core.shops import ShopCredentials
from ingest.partitions import PartitionManager, month_start
from tests.helpers import count_ids, record


async def positions(store: OffsetStore) -> dict[int, int]:
    return {p: s.next_offset for p, s in (await store.load([0, 1])).items()}


async def test_offsets_move_only_from_where_the_loader_believes_they_are(db: Database) -> None:
    store = OffsetStore(db, f"g-{uuid.uuid4().hex[:8]}", "t")
    await store.claim(0, 10, "log")
    await store.claim(1, 5, "log")
    async with db.pool.acquire() as conn, conn.transaction():
        await store.advance(conn, [(0, 10, 20), (1, 5, 7)])
    assert await positions(store) == {0: 20, 1: 7}
    with pytest.raises(Fenced, match="moved under this loader"):
        async with db.pool.acquire() as conn, conn.transaction():
            # Partition 1 is at 7, not 6: another loader moved it. Partition 0 stays too.
            await store.advance(conn, [(0, 20, 30), (1, 6, 8)])
    assert await positions(store) == {0: 20, 1: 7}


async def test_a_fenced_batch_writes_nothing_and_the_connection_goes_on(
    settings: Settings, db: Database, shop: ShopCredentials
) -> None:
    loader = Loader(settings, BEHAVIOR, db, PartitionManager(db))
    await loader.partitions.ensure_months("behavior_events", {month_start(datetime.now(UTC))})
    await loader.offsets.claim(0, 0, "log")
    events = [record(shop) for _ in range(3)]
    raw = orjson.dumps(events)
    decoded = BEHAVIOR.decode(raw)
    assert decoded is not None
    rows, contexts, batched = decoded
    batch = [Decoded(loader.topic, 0, 0, raw, batched, rows, contexts)]
    ids = [str(e["event_id"]) for e in events]
    async with db.pool.acquire() as conn, pg_times(conn):
        with pytest.raises(Fenced):
            await loader._transaction(conn, batch, [], [(0, 4, 5)], careful=False)
        assert not conn.is_in_transaction()
        assert await count_ids(db, ids) == {}
        written = await loader._transaction(conn, batch, [], [(0, 0, 1)], careful=False)
    assert len(written.rows) == 3
    assert await count_ids(db, ids) == dict.fromkeys(ids, 1)
    assert {p: s.next_offset for p, s in (await loader.offsets.load([0])).items()} == {0: 1}
