"""The loader on the real broker and PostgreSQL: each event id exactly once, none missing."""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import orjson
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from consumers.rows import SPECS, STOREFRONT
from ingest.core.db import Database
from ingest.core.settings import Settings
from ingest.core.shops import ShopCredentials
from ingest.partitions import month_start, partition_name
from tests.conftest import wait_for
from tests.helpers import count_ids, produce, record, running_loader, storefront


async def dead_letters(
    db: Database, settings: Settings, topic: str | None = None
) -> list[dict[str, object]]:
    rows = await db.pool.fetch(
        "SELECT kafka_offset, reason, error, raw FROM dead_letters WHERE topic = $1 "
        "ORDER BY kafka_offset",
        topic or settings.topic_behavior,
    )
    return [dict(r) for r in rows]


async def test_rows_land_once_in_their_month_partition(
    settings: Settings, db: Database, shop: ShopCredentials
) -> None:
    last_month = (month_start(datetime.now(UTC)) - timedelta(days=1)).replace(day=15)
    records = [record(shop) for _ in range(30)]
    records.append(
        record(shop, timestamp=datetime.combine(last_month, datetime.min.time(), UTC).isoformat())
    )
    ids = [str(r["event_id"]) for r in records]
    values = [orjson.dumps(r) for r in records]
    await produce(settings, values + values[:10])  # the first ten twice: a producer retry
    async with running_loader(settings, db):
        await wait_for(lambda: _all_present(db, ids))
        # Every id is in once the first copies land; the repeats may still be unread, so wait
        # until the loader has stored its offsets past all 41 records before stopping it.
        await wait_for(lambda: _offsets_at(db, settings, len(values) + 10))
    counts = await count_ids(db, ids)
    assert counts == {i: 1 for i in ids}
    where = await db.pool.fetchval(
        "SELECT tableoid::regclass::text FROM behavior_events WHERE event_id = $1",
        uuid.UUID(ids[-1]),
    )
    assert where == partition_name("behavior_events", month_start(last_month))
    stored = await db.pool.fetchval(
        "SELECT sum(next_offset) FROM loader_offsets WHERE topic = $1", settings.topic_behavior
    )
    assert stored == len(values) + 10


async def _all_present(db: Database, ids: list[str]) -> bool:
    return len(await count_ids(db, ids)) == len(ids)


async def test_poison_records_go_to_dead_letters_and_the_rest_loads(
    settings: Settings, db: Database, shop: ShopCredentials
) -> None:
    good = [record(shop) for _ in range(20)]
    values = [orjson.dumps(r) for r in good]
    far_future = (datetime.now(UTC) + timedelta(days=3650)).isoformat()
    poison = [
        b"\xff\xfenot json",
        orjson.dumps({"event_id": "nope"}),
        orjson.dumps(record(shop, page_url="bad\x00text")),  # PostgreSQL refuses NUL
        orjson.dumps(record(shop, event_type="not-a-type")),  # CHECK constraint
        orjson.dumps(record(shop, timestamp=far_future)),
    ]
    mixed = values[:7] + poison[:3] + values[7:14] + poison[3:] + values[14:]
    await produce(settings, mixed)
    async with running_loader(settings, db):
        await wait_for(lambda: _all_present(db, [str(r["event_id"]) for r in good]))
        await wait_for(lambda: _dead_count(db, settings, len(poison)))
    letters = await dead_letters(db, settings)
    assert sorted(str(d["reason"]) for d in letters) == sorted(
        [
            "decode_error",
            "invalid_record",
            "rejected_by_postgres",
            "rejected_by_postgres",
            "outside_window",
        ]
    )
    assert {bytes(d["raw"]) for d in letters} == set(poison)  # type: ignore[arg-type]
    assert await count_ids(db, [str(r["event_id"]) for r in good]) == {
        str(r["event_id"]): 1 for r in good
    }


async def test_a_record_of_many_events_loads_them_all_and_sets_aside_its_bad_ones(
    settings: Settings, db: Database, shop: ShopCredentials
) -> None:
    """The collector's format: one record holds a request's events (a JSON array)."""
    good = [record(shop, session_id="many") for _ in range(12)]
    bad_type = record(shop, event_type="not-a-type")  # refused by PostgreSQL's CHECK
    no_page = {k: v for k, v in record(shop).items() if k != "page_url"}  # refused by decoding
    events = [*good[:4], bad_type, *good[4:8], no_page, "not an object", *good[8:]]
    await produce(settings, [orjson.dumps(events), b"[]", orjson.dumps(good[:3])])
    ids = [str(r["event_id"]) for r in good]
    async with running_loader(settings, db) as loader:
        await wait_for(lambda: _all_present(db, ids))
        await wait_for(lambda: _dead_count(db, settings, 4))
    assert loader.rows_loaded == 12  # the third record's events were all loaded already
    assert await count_ids(db, ids) == {i: 1 for i in ids}
    letters = await db.pool.fetch(
        "SELECT kafka_offset, record_index, reason, raw FROM dead_letters WHERE topic = $1 "
        "ORDER BY kafka_offset, record_index",
        settings.topic_behavior,
    )
    assert [(r["kafka_offset"], r["record_index"], r["reason"]) for r in letters] == [
        (0, 4, "rejected_by_postgres"),
        (0, 9, "invalid_record"),
        (0, 10, "invalid_record"),
        (1, 0, "invalid_record"),
    ]
    # Each dead letter keeps its own event, so a replay sends just that event.
    assert [orjson.loads(r["raw"]) for r in letters[:3]] == [bad_type, no_page, "not an object"]
    assert bytes(letters[3]["raw"]) == b"[]"


async def _dead_count(db: Database, settings: Settings, n: int, topic: str | None = None) -> bool:
    return len(await dead_letters(db, settings, topic)) >= n


async def test_storefront_records_go_straight_to_copy_data_and_still_load_once(
    settings: Settings, db: Database, shop: ShopCredentials
) -> None:
    """Storefront records are encoded for COPY without rows (consumers.binary_copy); rows
    are built only where a batch needs them: a value asyncpg must encode, a batch over
    two months, a careful write (a duplicate, a refused row, a month outside the window)."""

    topic = settings.topic_storefront

    now = datetime.now(UTC).isoformat()

    def event(**fields: object) -> dict[str, object]:
        return storefront(**{"shop_id": str(shop.shop_id), "ts": now, "received_at": now, **fields})

    async def all_present(events: list[dict[str, object]]) -> bool:
        ids = [str(e["event_id"]) for e in events]
        return len(await count_ids(db, ids, "events")) == len(ids)

    last_month = datetime.combine(month_start(datetime.now(UTC)), datetime.min.time(), UTC)
    last_month -= timedelta(hours=12)
    requests = [[event() for _ in range(5)] for _ in range(3)]
    requests += [
        [event(), event(product_id="p" * 5000)],  # 4 KB or more: asyncpg encodes this record
        [event(ts=last_month.isoformat())],  # the batch spans two months
    ]
    # One record of 5 events again (redelivered), a NUL PostgreSQL refuses, a far future.
    again = requests[0]
    refused = [event(), event(anon_id="bad\x00text")]
    far = [event(ts=(datetime.now(UTC) + timedelta(days=3650)).isoformat())]
    async with running_loader(settings, db, STOREFRONT) as loader:
        await produce(settings, [orjson.dumps(r) for r in requests], topic)
        first = [e for r in requests for e in r]
        await wait_for(lambda: all_present(first))
        await produce(settings, [orjson.dumps(r) for r in (again, refused, far)], topic)
        await wait_for(lambda: all_present(refused[:1]))
        await wait_for(lambda: _dead_count(db, settings, 2, topic))
    good = [*first, refused[0]]
    ids = [str(e["event_id"]) for e in good]
    assert await count_ids(db, ids, "events") == {i: 1 for i in ids}
    assert loader.rows_loaded == len(good)
    assert sorted(str(d["reason"]) for d in await dead_letters(db, settings, topic)) == [
        "outside_window",
        "rejected_by_postgres",
    ]
    long = await db.pool.fetchrow(
        "SELECT product_id, ts, props FROM events WHERE event_id = $1",
        uuid.UUID(str(requests[3][1]["event_id"])),
    )
    assert long is not None
    assert long["product_id"] == "p" * 5000
    assert long["ts"] == datetime.fromisoformat(str(requests[3][1]["ts"]))
    assert orjson.loads(long["props"]) == requests[3][1]["props"]


async def test_restart_resumes_from_stored_offsets(
    settings: Settings, db: Database, shop: ShopCredentials
) -> None:
    first = [record(shop) for _ in range(15)]
    await produce(settings, [orjson.dumps(r) for r in first])
    async with running_loader(settings, db):
        await wait_for(lambda: _all_present(db, [str(r["event_id"]) for r in first]))
    second = [record(shop) for _ in range(15)]
    await produce(settings, [orjson.dumps(r) for r in second])
    async with running_loader(settings, db) as loader:
        ids = [str(r["event_id"]) for r in first + second]
        await wait_for(lambda: _all_present(db, ids))
    assert loader.rows_loaded == 15  # nothing of the first run was read again
    assert await count_ids(db, ids) == {i: 1 for i in ids}


async def test_partitions_are_fetched_again_as_soon_as_they_are_drained(
    settings: Settings, db: Database
) -> None:
    # aiokafka's default holds back fetches while any partition has buffered
    # records (see loader._fetch_drained_partitions_at_once); a warning says when
    # an aiokafka release moves the knob.
    async with running_loader(settings, db) as loader:
        assert loader.consumer._fetcher._prefetch_backoff == 0.0


async def test_kafka_hears_of_the_loaded_offsets_for_lag_tools(
    settings: Settings, db: Database, shop: ShopCredentials
) -> None:
    first, second = [record(shop) for _ in range(15)], [record(shop) for _ in range(15)]
    async with running_loader(settings, db) as loader:
        for events in (first, second):  # the second, likely within the commit interval
            await produce(settings, [orjson.dumps(r) for r in events])
            await wait_for(lambda: _all_present(db, [str(r["event_id"]) for r in events]))  # noqa: B023
        stored = {p: s.next_offset for p, s in (await loader.offsets.load([0, 1, 2])).items()}
    # Commits to Kafka are throttled while loading; stopping tells Kafka the rest.
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.bootstrap, group_id=loader.group)
    await consumer.start()
    try:
        committed = {
            p: await consumer.committed(TopicPartition(settings.topic_behavior, p)) for p in stored
        }
    finally:
        await consumer.stop()
    assert sum(stored.values()) == 30
    loaded = {p: o for p, o in stored.items() if o}  # partitions never loaded have no commit
    assert {p: o for p, o in committed.items() if o is not None} == loaded


async def test_a_new_broker_log_resets_offsets_without_duplicates(
    settings: Settings, db: Database, shop: ShopCredentials
) -> None:
    rows = [record(shop) for _ in range(10)]
    await produce(settings, [orjson.dumps(r) for r in rows])
    ids = [str(r["event_id"]) for r in rows]
    async with running_loader(settings, db):
        await wait_for(lambda: _all_present(db, ids))
    # Same topic, but the loader is told the log is another one (an embedded broker restart).
    reset = settings.model_copy(update={"kafka_log_id": "another-log"})
    async with running_loader(reset, db) as loader:
        await wait_for(lambda: _offsets_in_log(db, settings, "another-log", upto=10))
    assert loader.rows_loaded == 0  # all ten read again, none stored twice
    assert await count_ids(db, ids) == {i: 1 for i in ids}


async def _offsets_in_log(db: Database, settings: Settings, log_id: str, upto: int) -> bool:
    row = await db.pool.fetchrow(
        "SELECT count(*) AS n, sum(next_offset) AS upto FROM loader_offsets "
        "WHERE topic = $1 AND log_id = $2",
        settings.topic_behavior,
        log_id,
    )
    return bool(row and row["n"] == settings.topic_partitions and row["upto"] == upto)


async def test_dead_letters_list_and_replay_after_a_fix(
    settings: Settings, db: Database, shop: ShopCredentials
) -> None:
    from consumers import dead_letters
    from ingest.core.producer import EventProducer

    good = record(shop)
    broken = dict(good, page_url=123)  # a record the loader can't use ...
    await produce(settings, [orjson.dumps(broken)])
    async with running_loader(settings, db):
        await wait_for(lambda: _dead_count(db, settings, 1))
        letters = [
            r for r in await dead_letters.listing(db) if r["topic"] == settings.topic_behavior
        ]
        assert [r["reason"] for r in letters] == ["invalid_record"]
        assert "expected text" in letters[0]["error"]
        # ... fixed by hand (as an operator would, after fixing the producer) and replayed.
        await db.pool.execute(
            "UPDATE dead_letters SET raw = $1 WHERE id = $2", orjson.dumps(good), letters[0]["id"]
        )
        async with EventProducer(settings) as producer:
            assert await dead_letters.replay(db, producer, ids=[letters[0]["id"]]) == 1
            assert await dead_letters.replay(db, producer, ids=[letters[0]["id"]]) == 0
        await wait_for(lambda: _all_present(db, [str(good["event_id"])]))
    assert await count_ids(db, [str(good["event_id"])]) == {str(good["event_id"]): 1}


def test_a_written_batch_is_freed_piecemeal() -> None:
    from aiokafka import TopicPartition

    from consumers.batch import Batch
    from consumers.copy_writer import Decoded

    batch = Batch()
    for partition in (0, 1):
        for offset in range(10):  # records of 20 rows, and one refused record per partition
            rows: list[tuple[object, ...]] = [(i,) for i in range(0 if offset == 9 else 20)]
            batch.records[TopicPartition("t", partition)].append(
                Decoded("t", partition, offset, b"", True, rows, [])
            )
    left = [sum(len(d) for d in batch.records.values())]
    while batch.free_some(100):
        left.append(sum(len(d) for d in batch.records.values()))
    # At least 100 events a step, newest first: a record without rows counts as one,
    # so the first step takes it and five of 20 rows; the last step empties the batch.
    assert left == [20, 14, 8, 3]
    assert not batch.records
    assert not batch.free_some(100)


@pytest.mark.parametrize("stream", ["behavior", "storefront"])
async def test_metrics_count_rows_batches_copies_lag_and_dead_letters(
    settings: Settings, db: Database, shop: ShopCredentials, stream: str
) -> None:
    """What the loader's /metrics serves (prometheus-client's registry), on both paths."""
    from prometheus_client import REGISTRY

    spec = SPECS[stream]
    table, topic = spec.table, settings.topic_for(stream)

    def sample(name: str, **labels: str) -> float:
        return REGISTRY.get_sample_value(name, labels) or 0.0

    def counters() -> list[float]:
        return [
            sample("eventpipe_rows_loaded_total", table=table),
            sample("eventpipe_batch_rows_count", table=table),
            sample("eventpipe_copy_latency_seconds_count", table=table),
            sample("eventpipe_dead_letters_total", table=table, reason="decode_error"),
        ]

    now = datetime.now(UTC).isoformat()
    events = [
        record(shop)
        if stream == "behavior"
        else storefront(shop_id=str(shop.shop_id), ts=now, received_at=now)
        for _ in range(12)
    ]
    before = counters()
    await produce(settings, [orjson.dumps(events[:6]), orjson.dumps(events[6:]), b"{"], topic)
    async with running_loader(settings, db, spec):
        await wait_for(lambda: _dead_count(db, settings, 1, topic))
        ids = [str(e["event_id"]) for e in events]
        assert await count_ids(db, ids, table) == {i: 1 for i in ids}

        def lags() -> list[float | None]:
            return [
                REGISTRY.get_sample_value(
                    "eventpipe_consumer_lag", {"topic": topic, "partition": str(p)}
                )
                for p in range(settings.topic_partitions)
            ]

        # Every assigned partition is reported, not only the one keyed records went to
        # (loaded to its end): a partition that loads nothing has a lag too.
        async def all_zero() -> bool:
            return lags() == [0.0] * settings.topic_partitions

        await wait_for(all_zero, timeout=15)
    rows, batches, copies, dead = (a - b for a, b in zip(counters(), before, strict=True))
    assert (rows, dead) == (12, 1)
    assert batches >= 1
    assert copies == batches
    # A stopped loader's figures are removed (its partitions' next owner reports them).
    assert lags() == [None] * settings.topic_partitions


async def test_a_backlog_is_loaded_in_batches_bounded_by_bytes(
    settings: Settings, db: Database, shop: ShopCredentials
) -> None:
    """Memory stays bounded with any backlog: a batch closes at ``batch_max_bytes`` (it may
    pass it by what one read brings: aiokafka buffers at most 1 MiB a partition)."""
    from prometheus_client import REGISTRY

    capped = settings.model_copy(update={"batch_max_rows": 100_000, "batch_max_bytes": 256 * 1024})

    def sample(name: str, **labels: str) -> float:
        return REGISTRY.get_sample_value(name, {"table": "behavior_events", **labels}) or 0.0

    def histogram() -> tuple[float, float]:
        return sample("eventpipe_batch_rows_count"), sample(
            "eventpipe_batch_rows_bucket", le="1000.0"
        )

    events = [record(shop, element_text="x" * 900, session_id=f"s{i % 50}") for i in range(3000)]
    producer = AIOKafkaProducer(bootstrap_servers=capped.bootstrap, linger_ms=5)
    await producer.start()
    try:
        sent = [
            await producer.send(
                capped.topic_behavior, orjson.dumps(e), key=str(e["session_id"]).encode()
            )
            for e in events
        ]
        for future in sent:
            await future
    finally:
        await producer.stop()
    (batches, small), ids = histogram(), [str(e["event_id"]) for e in events]
    async with running_loader(capped, db):
        await wait_for(lambda: _all_present(db, ids), timeout=60)
    batches, small = (a - b for a, b in zip(histogram(), (batches, small), strict=True))
    assert batches >= 3  # 3 MB in batches of about 256 KB
    assert small == batches  # none over 1 000 rows (about 1 MB), though 100 000 were allowed


async def test_a_dead_letter_at_an_offset_a_new_broker_log_reuses_is_kept(
    settings: Settings, db: Database, tmp_path: Path
) -> None:
    """The broker's log replaced (an embedded broker restarted, a topic recreated): the same
    topic, partition and offset now hold another record; when it is bad too, it is a dead
    letter of its own beside the old log's, not dropped as a duplicate of it."""
    from ingest.core.topics import ensure_topics
    from ingest.stack.broker import EmbeddedBroker

    first = b'{"bad": "under the first log'
    await produce(settings, [first])
    async with running_loader(settings, db):
        await wait_for(lambda: _dead_count(db, settings, 1))
    async with EmbeddedBroker(tmp_path / "broker-b") as replacement:
        replaced = settings.model_copy(
            update={"kafka_bootstrap": replacement.bootstrap, "kafka_log_id": replacement.log_id}
        )
        await ensure_topics(
            replacement.bootstrap, [replaced.topic_behavior], partitions=replaced.topic_partitions
        )
        second = b'{"bad": "under the second log'
        await produce(replaced, [second])  # the same key: the same partition, offset 0 again
        async with running_loader(replaced, db):
            await wait_for(lambda: _dead_count(db, settings, 2))
    letters = await db.pool.fetch(
        "SELECT log_id, kafka_partition, kafka_offset, record_index, raw FROM dead_letters "
        "WHERE topic = $1 ORDER BY id",
        settings.topic_behavior,
    )
    assert [bytes(r["raw"]) for r in letters] == [first, second]
    assert [r["log_id"] for r in letters] == [settings.kafka_log_id, replacement.log_id]
    assert len({(r["kafka_partition"], r["kafka_offset"], r["record_index"]) for r in letters}) == 1


async def test_the_dead_letters_log_id_migration_keeps_existing_rows(
    scratch_database: Callable[[], Awaitable[str]], tmp_path: Path
) -> None:
    """Migration 0005 on a table with rows: they stay, with the log identity unknown ('');
    the unique key takes the log identity, so a letter of a new log at their offset is kept."""
    import asyncpg

    from ingest.core.db import sql_dir
    from ingest.core.migrate import discover, migrate

    before = [m for m in discover() if m.version < 5]
    for m in before:
        (tmp_path / f"{m.version:04d}_{m.name}.sql").write_text(m.sql)
    dsn = await scratch_database()
    await migrate(dsn, tmp_path)
    conn = await asyncpg.connect(dsn)
    try:
        insert = (
            "INSERT INTO dead_letters (consumer_group, topic, kafka_partition, kafka_offset, "
            "record_index, raw, reason, error) VALUES ('g', 't', 0, $1, 0, $2, 'decode_error', '')"
        )
        await conn.execute(insert, 7, b"old")
        await conn.execute(insert, 8, b"older")
        applied = await migrate(dsn, sql_dir() / "migrations")
        assert [m.version for m in applied if m.version == 5] == [5]
        rows = await conn.fetch("SELECT log_id, kafka_offset, raw FROM dead_letters ORDER BY id")
        assert [(r["log_id"], r["kafka_offset"], bytes(r["raw"])) for r in rows] == [
            ("", 7, b"old"),
            ("", 8, b"older"),
        ]
        from consumers import dead_letters as letters
        from consumers.copy_writer import Rejected

        # What the loader writes now: offset 7 again, under a log of its own, and a repeat.
        again = Rejected("t", 0, 7, 0, b"new", "decode_error", "")
        async with conn.transaction():
            await letters.record(conn, "g", [again, again], {0: "log-b"})
        rows = await conn.fetch("SELECT log_id, raw FROM dead_letters ORDER BY id")
        assert [(r["log_id"], bytes(r["raw"])) for r in rows] == [
            ("", b"old"),
            ("", b"older"),
            ("log-b", b"new"),
        ]
    finally:
        await conn.close()


async def test_another_shops_event_of_the_same_id_and_time_is_loaded_too(
    settings: Settings, db: Database, shop: ShopCredentials
) -> None:
    """Issue 18, point 2: event ids are only unique within a shop (uuid5 of an order id, a
    client's own scheme), so shop B's event with the id and time of shop A's, loaded
    after it, is a row of B's own, not a duplicate dropped without a dead letter."""
    from ingest.core.shops import ensure_shop

    other = await ensure_shop(db, f"shop-{uuid.uuid4().hex[:8]}.myshopify.com")
    first = record(shop)
    theirs = record(other, event_id=first["event_id"], timestamp=first["timestamp"])
    mine_again = dict(first)  # and a redelivery of A's: still one row of A's
    async with running_loader(settings, db) as loader:
        await produce(settings, [orjson.dumps(first)])
        await wait_for(lambda: _all_present(db, [str(first["event_id"])]))
        await produce(settings, [orjson.dumps(mine_again), orjson.dumps(theirs)])
        await wait_for(lambda: _offsets_at(db, settings, 3))
    rows = await db.pool.fetch(
        "SELECT shop_id FROM behavior_events WHERE event_id = $1 ORDER BY shop_id",
        uuid.UUID(str(first["event_id"])),
    )
    assert sorted(str(r["shop_id"]) for r in rows) == sorted(
        [str(shop.shop_id), str(other.shop_id)]
    )
    assert loader.rows_loaded == 2
    assert await dead_letters(db, settings) == []


async def _offsets_at(db: Database, settings: Settings, n: int) -> bool:
    stored = await db.pool.fetchval(
        "SELECT coalesce(sum(next_offset), 0) FROM loader_offsets WHERE topic = $1",
        settings.topic_behavior,
    )
    return bool(stored >= n)


async def test_the_per_shop_key_migration_keeps_rows_grants_and_policies(
    scratch_database: Callable[[], Awaitable[str]], tmp_path: Path
) -> None:
    """Migration 0009 on tables with rows in partitions: every row stays, the primary keys
    (of the parents and of every partition) become (shop_id, event_id, <time>), the ingest
    role may read shop_id back (RETURNING of the careful path), the analyst policies are
    untouched, and a partition made afterwards has the new key and grants."""
    import asyncpg

    from ingest.core.db import Database, sql_dir
    from ingest.core.migrate import discover, migrate
    from ingest.partitions import PartitionManager

    for m in (m for m in discover() if m.version < 9):
        (tmp_path / f"{m.version:04d}_{m.name}.sql").write_text(m.sql)
    dsn = await scratch_database()
    await migrate(dsn, tmp_path)
    month = month_start(datetime.now(UTC))
    async with Database(dsn) as database:
        await PartitionManager(database).ensure_months("behavior_events", {month})
        await PartitionManager(database).ensure_months("events", {month})
    conn = await asyncpg.connect(dsn)
    try:
        at = datetime.now(UTC)
        shops = sorted(uuid.uuid4() for _ in range(2))
        ids = [uuid.uuid4() for _ in range(20)]
        await conn.executemany(
            "INSERT INTO behavior_events (event_id, shop_id, session_id, event_type, page_url, "
            "\"timestamp\", received_at) VALUES ($1, $2, 's', 'click', 'https://x/', $3, $3)",
            [(i, shops[0], at) for i in ids],
        )
        await conn.executemany(
            "INSERT INTO events (event_id, shop_id, anon_id, session_id, event_type, ts, "
            "received_at) VALUES ($1, $2, 'a', 's', 'page_view', $3, $3)",
            [(i, shops[0], at) for i in ids],
        )
        policies = "SELECT tablename, policyname, qual FROM pg_policies ORDER BY 1, 2"
        before = await conn.fetch(policies)
        applied = await migrate(dsn, sql_dir() / "migrations")
        assert 9 in [m.version for m in applied]
        # Those of the tables there before (later migrations add tables with their own).
        tables = {p["tablename"] for p in before}
        assert [p for p in await conn.fetch(policies) if p["tablename"] in tables] == before
        for table, time in (("behavior_events", "timestamp"), ("events", "ts")):
            assert await conn.fetchval(f"SELECT count(*) FROM {table}") == len(ids)
            keys = await conn.fetch(
                "SELECT c.conrelid::regclass::text AS rel, "
                "array(SELECT attname FROM unnest(c.conkey) WITH ORDINALITY k(n, o) "
                "JOIN pg_attribute a ON a.attrelid = c.conrelid AND a.attnum = k.n "
                "ORDER BY k.o)::text[] AS cols "
                "FROM pg_constraint c WHERE c.contype = 'p' AND (c.conrelid = $1::regclass OR "
                "c.conrelid IN (SELECT inhrelid FROM pg_inherits WHERE inhparent = $1::regclass))",
                table,
            )
            assert len(keys) == 2  # the parent and its partition
            assert {tuple(k["cols"]) for k in keys} == {("shop_id", "event_id", time)}
            granted = await conn.fetch(
                "SELECT table_name, column_name FROM information_schema.column_privileges "
                "WHERE grantee = 'eventpipe_ingest' AND privilege_type = 'SELECT' "
                "AND table_name LIKE $1",
                f"{table}%",
            )
            by_table: dict[str, set[str]] = {}
            for g in granted:
                by_table.setdefault(g["table_name"], set()).add(g["column_name"])
            assert by_table == {
                table: {"shop_id", "event_id", time},
                partition_name(table, month): {"shop_id", "event_id", time},
            }
        # Shop B's rows of the same ids and times are rows of their own now.
        await conn.executemany(
            "INSERT INTO behavior_events (event_id, shop_id, session_id, event_type, page_url, "
            "\"timestamp\", received_at) VALUES ($1, $2, 's', 'click', 'https://x/', $3, $3)",
            [(i, shops[1], at) for i in ids],
        )
        assert await conn.fetchval("SELECT count(*) FROM behavior_events") == 2 * len(ids)
        # A month made after the migration gets the key (ATTACH builds it) and the grants.
        later = month_start(at + timedelta(days=40))
        async with Database(dsn) as database:
            await PartitionManager(database).ensure_months("behavior_events", {later})
        new = partition_name("behavior_events", later)
        cols = await conn.fetchval(
            "SELECT array(SELECT a.attname FROM pg_index i, "
            "unnest(i.indkey) WITH ORDINALITY k(n, o) JOIN pg_attribute a ON a.attnum = k.n "
            "WHERE i.indrelid = $1::regclass "
            "AND i.indisprimary AND a.attrelid = i.indrelid ORDER BY k.o)::text[]",
            new,
        )
        assert cols == ["shop_id", "event_id", "timestamp"]
        assert await conn.fetchval(
            "SELECT has_column_privilege('eventpipe_ingest', $1::regclass, 'shop_id', 'SELECT')",
            new,
        )
    finally:
        await conn.close()
