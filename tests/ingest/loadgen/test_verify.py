"""The verifier sees every loaded id once, whenever its id is expected, and each poll
reads only the rows written since the one before (it must not load the database it
measures)."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

from ingest.core.db import Database
from ingest.core.settings import Settings
from ingest.core.shops import ShopCredentials
from ingest.loadgen.verify import CountedIds, Verifier
from ingest.partitions.manager import PartitionManager
from tests.helpers import uncommitted_behavior_row


async def _insert(db: Database, shop: ShopCredentials, ids: list[str], minutes: int = 0) -> None:
    at = datetime.now(UTC) + timedelta(minutes=minutes)
    await db.pool.executemany(
        "INSERT INTO behavior_events (event_id, shop_id, session_id, event_type, page_url,"
        " \"timestamp\", received_at) VALUES ($1::uuid, $2, $3, 'click', '/', $4, $4)",
        [(i, shop.shop_id, "verify", at) for i in ids],
    )


def _ids(n: int) -> list[str]:
    return [str(uuid.uuid4()) for _ in range(n)]


def _counted(counter: int, n: int) -> list[str]:
    """``n`` ids of request ``counter``, as benchmarks/wrk.py's script writes them."""
    return [f"{counter:08x}{i[8:]}" for i in _ids(n)]


async def test_every_id_is_seen_once_whenever_it_is_expected(
    settings: Settings, db: Database, shop: ShopCredentials
) -> None:
    await PartitionManager(db).maintain()
    before, after, never = _ids(40), _ids(40), _ids(1)
    started = datetime.now(UTC)
    await _insert(db, shop, before)
    async with Verifier(settings.dsn, started, poll_s=0.01) as verifier:
        verifier.expect("behavior_events", before[:20])
        assert await verifier.poll_once() == 20
        # Rows a poll read before their ids were expected are not lost.
        verifier.expect("behavior_events", before[20:])
        await _insert(db, shop, after)
        await _insert(db, shop, after[:1], minutes=1)  # the same id stored twice
        verifier.expect("behavior_events", after + never)
        result = await verifier.finish(0.5)
    assert (result.expected, result.seen, result.missing) == (81, 80, 1)
    assert result.missing_sample == never
    assert result.duplicates == 1
    assert len(result.lags_s) == 80


async def test_a_poll_reads_only_the_rows_written_since_the_last(
    settings: Settings, db: Database, shop: ShopCredentials
) -> None:
    await PartitionManager(db).maintain()
    started = datetime.now(UTC)
    await _insert(db, shop, _ids(2000))
    async with Verifier(settings.dsn, started) as verifier:
        verifier.expect("behavior_events", _ids(1))  # outstanding the whole time
        await verifier.poll_once()
        assert verifier.rows_read >= 2000
        new = _ids(3)
        await _insert(db, shop, new)
        verifier.expect("behavior_events", new)
        assert await verifier.poll_once() == 3
        assert 3 <= verifier.rows_read < 2000  # not the table again
        await verifier.poll_once()
        assert verifier.rows_read < 2000


async def test_counted_ids_counts_each_row_of_the_counters_once_its_transaction_ended(
    settings: Settings, db: Database, shop: ShopCredentials
) -> None:
    await PartitionManager(db).maintain()
    started = datetime.now(UTC)
    # The counters as hex: 0x0a in [2, 0x0f], 0x10 and 0x20 beyond it.
    await _insert(db, shop, _counted(1, 5) + _counted(2, 3) + _counted(0x0A, 4))
    await _insert(db, shop, _counted(0x10, 6) + _counted(0x20, 2))
    async with CountedIds(settings.dsn, started, 2, 0x0F) as counted:
        assert await counted.poll_once() == 3 + 4
        assert await counted.poll_once() == 7  # not again
        # A transaction still open holds back the rows of every later one: a poll
        # counts only what all the transactions below its xmin wrote.
        async with uncommitted_behavior_row(db, shop.shop_id, uuid.UUID(_counted(3, 1)[0])):
            await _insert(db, shop, _counted(4, 2))  # committed, after the open one
            assert await counted.poll_once() == 7
        assert await counted.poll_once() == 10
        assert await counted.poll_once() == 10
        assert await counted.until(10, timeout_s=1)
        assert not await counted.until(11, timeout_s=0.2, poll_s=0.05)
