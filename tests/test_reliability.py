"""Faults the pipeline promises to survive, each reconciling known event ids.

Every test here runs the real broker and PostgreSQL, is bounded in time, and
asserts exact counts: each accepted id stored once, none missing.
docs/reliability.md summarises what each shows.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aiohttp
import orjson
import pytest
from hypothesis import given
from hypothesis import settings as hyp_settings
from hypothesis import strategies as st

from consumers.loader import Loader
from consumers.rows import BEHAVIOR, SPECS, RecordRejected
from ingest.collector.delivery import Delivery
from ingest.collector.server import serving
from ingest.core.db import Database
from ingest.core.settings import Settings
from ingest.core.shops import ShopCredentials
from ingest.partitions import PartitionManager
from tests.conftest import wait_for
from tests.helpers import (
    at_least,
    batch,
    loaded,
    loader_process,
    own_broker,
    produce_many,
    reconcile,
)

pytestmark = pytest.mark.slow


async def _all_in(db: Database, ids: list[str]) -> bool:
    return await loaded(db, ids) == len(set(ids))


async def test_broker_unreachable_30s_clients_retry_503s(
    tmp_path: Path, settings: Settings, db: Database, shop: ShopCredentials
) -> None:
    """Broker paused 30 s, spool too small to hold it all: 2xx'd events land, 503'd retries once."""
    async with own_broker(tmp_path, settings) as (broker, own):
        assert broker.pid is not None
        small = own.model_copy(update={"spool_max_bytes": 6000, "produce_timeout_s": 0.3})
        accepted: set[str] = set()
        counts = {"200": 0, "503": 0, "other": 0}
        async with (
            serving(small, db, key_cache_s=5) as (server, delivery),
            aiohttp.ClientSession() as http,
        ):
            url = f"{server.url}/v1/behavior?k={shop.write_key}"

            async def client() -> None:
                loop = asyncio.get_running_loop()
                end = loop.time() + 40
                while loop.time() < end:
                    events = batch()
                    for _attempt in range(200):  # retry the same ids until accepted
                        async with http.post(url, json=events) as resp:
                            key = str(resp.status) if resp.status in (200, 503) else "other"
                            counts[key] += 1
                            if resp.status == 200:
                                accepted.update(e["event_id"] for e in events)
                                break
                        await asyncio.sleep(0.2)
                    await asyncio.sleep(0.1)

            clients = [asyncio.create_task(client()) for _ in range(3)]
            await asyncio.sleep(3)
            os.kill(broker.pid, signal.SIGSTOP)
            await asyncio.sleep(30)
            os.kill(broker.pid, signal.SIGCONT)
            await asyncio.gather(*clients)
            assert delivery.spool is not None
            await wait_for(lambda: _empty(delivery), timeout=60)
        assert counts["503"] > 0, counts  # the small spool filled: clients were told to retry
        assert counts["other"] == 0, counts
        async with Loader(own, BEHAVIOR, db, PartitionManager(db)):
            try:
                await wait_for(lambda: _all_in(db, sorted(accepted)), timeout=90)
            except AssertionError:
                print("DEBUG", counts, len(accepted), await reconcile(db, sorted(accepted)))
                raise
        assert await reconcile(db, sorted(accepted)) == (0, 0)


async def _empty(delivery: Delivery) -> bool:
    return delivery.spool is not None and delivery.spool.empty


async def test_spool_full_answers_503_without_corruption_and_recovers(
    tmp_path: Path, settings: Settings, db: Database, shop: ShopCredentials
) -> None:
    """A spool out of room (its cap here; a full disk takes the same path) answers 503."""
    async with own_broker(tmp_path, settings) as (broker, own):
        assert broker.pid is not None
        tiny = own.model_copy(update={"spool_max_bytes": 8000, "produce_timeout_s": 0.3})
        accepted: list[str] = []
        statuses: list[int] = []
        async with (
            serving(tiny, db, key_cache_s=5) as (server, delivery),
            aiohttp.ClientSession() as http,
        ):
            url = f"{server.url}/v1/behavior?k={shop.write_key}"
            os.kill(broker.pid, signal.SIGSTOP)
            try:
                for _ in range(12):
                    events = batch()
                    async with http.post(url, json=events) as resp:
                        statuses.append(resp.status)
                        if resp.status == 200:
                            accepted += [e["event_id"] for e in events]
                        else:
                            assert resp.headers["Retry-After"]
                async with http.get(f"{server.url}/readyz") as resp:
                    assert resp.status == 503  # above the high-water mark
            finally:
                os.kill(broker.pid, signal.SIGCONT)
            assert 200 in statuses and 503 in statuses
            await wait_for(lambda: _empty(delivery), timeout=60)
            events = batch()  # room again: accepted straight away
            async with http.post(url, json=events) as resp:
                assert resp.status == 200
            accepted += [e["event_id"] for e in events]
        async with Loader(own, BEHAVIOR, db, PartitionManager(db)):
            await wait_for(lambda: _all_in(db, accepted), timeout=60)
        assert await reconcile(db, accepted) == (0, 0)


async def test_two_loader_processes_one_sigkilled(
    settings: Settings, db: Database, shop: ShopCredentials
) -> None:
    ids = await produce_many(settings, shop, 12_000)
    first, second = loader_process(settings), loader_process(settings)
    try:
        await wait_for(lambda: at_least(db, ids, 1000), timeout=60, interval=0.02)
        first.send_signal(signal.SIGKILL)
        first.wait()
        await wait_for(lambda: at_least(db, ids, len(ids)), timeout=120)
    finally:
        first.kill()
        second.send_signal(signal.SIGTERM)
        second.wait(15)
    assert await reconcile(db, ids) == (0, 0)


async def test_clock_skew_and_the_retention_window(
    collector: str, settings: Settings, db: Database, shop: ShopCredentials
) -> None:
    """Hours off either way are stored (the future clamped); months too old are dead letters."""
    now = datetime.now(UTC)
    cases = {
        "hours_past": now - timedelta(hours=6),
        "hours_future": now + timedelta(hours=6),
        "months_old": now - timedelta(days=200),  # behavior_events keeps 90 days
    }
    events = [
        {
            "event_id": str(uuid.uuid4()),
            "event_type": "click",
            "session_id": name,
            "page_url": "https://x/",
            "timestamp": at.isoformat(),
        }
        for name, at in cases.items()
    ]
    async with (
        aiohttp.ClientSession() as http,
        http.post(f"{collector}/v1/behavior?k={shop.write_key}", json=events) as resp,
    ):
        assert (await resp.json())["accepted"] == 3
    async with Loader(settings, BEHAVIOR, db, PartitionManager(db)):
        await wait_for(lambda: _all_in(db, [e["event_id"] for e in events[:2]]), timeout=60)
        await wait_for(lambda: _dead(db, settings), timeout=60)
    stored = {
        r["session_id"]: r["timestamp"]
        for r in await db.pool.fetch(
            "SELECT session_id, timestamp FROM behavior_events WHERE shop_id = $1", shop.shop_id
        )
    }
    assert abs(stored["hours_past"] - cases["hours_past"]) < timedelta(seconds=1)
    assert stored["hours_future"] <= now + timedelta(minutes=1)  # clamped to receipt time
    [letter] = await db.pool.fetch(
        "SELECT reason, error, raw FROM dead_letters WHERE topic = $1", settings.topic_behavior
    )
    assert letter["reason"] == "outside_window"
    assert "is outside the window" in letter["error"]
    assert orjson.loads(letter["raw"])["event_id"] == events[2]["event_id"]


async def _dead(db: Database, settings: Settings) -> bool:
    n = await db.pool.fetchval(
        "SELECT count(*) FROM dead_letters WHERE topic = $1", settings.topic_behavior
    )
    return bool(n >= 1)


def _json(value: object) -> bytes:
    # The standard library, not orjson: it writes what orjson refuses to read
    # (integers past 64 bits, NaN), which is exactly what this test wants in Kafka.
    return json.dumps(value).encode()


@hyp_settings(max_examples=400, deadline=None)
@given(
    raw=st.one_of(
        st.binary(max_size=300),
        st.recursive(
            st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
            lambda c: (
                st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=12), c, max_size=5)
            ),
            max_leaves=15,
        ).map(_json),
        st.dictionaries(
            st.sampled_from(
                [
                    "event_id",
                    "shop_id",
                    "session_id",
                    "event_type",
                    "page_url",
                    "timestamp",
                    "received_at",
                    "anon_id",
                    "ts",
                    "props",
                    "metadata",
                    "event_data",
                    "coordinates",
                ]
            ),
            st.one_of(
                st.text(max_size=40),
                st.integers(),
                st.none(),
                st.just(str(uuid.uuid4())),
                st.just(datetime.now(UTC).isoformat()),
                st.dictionaries(st.text(), st.integers()),
            ),
            max_size=13,
        ).map(_json),
    ),
    stream=st.sampled_from(sorted(SPECS)),
)
def test_loader_decoding_never_crashes(raw: bytes, stream: str) -> None:
    """Whatever bytes sit in Kafka, decoding gives a row or a RecordRejected: never a crash.

    The fast decoders give rows (or COPY data) or hand the record on (None)."""
    spec = SPECS[stream]
    for value in (raw, b"[" + raw + b"]"):  # a record of one event, or an array of events
        fast = spec.decode(value)
        if fast is not None:
            assert all(len(row) == len(spec.columns) for row in fast[0])
        encoded = spec.decode_copy(value)
        assert encoded is None or (fast is not None and encoded.count == len(fast[0]))
        try:
            events, _ = spec.events(value)
            for data in events:
                row, _ = spec.row(data)
        except RecordRejected as exc:
            assert exc.reason in ("decode_error", "invalid_record")
            continue
        assert len(row) == len(spec.columns)
        assert isinstance(row[spec.time_index][0], int)  # a PgTime


def _month_start(at: datetime) -> datetime:
    return at.replace(day=1, hour=0, minute=0, second=0, microsecond=0)


async def _post_retry(
    http: aiohttp.ClientSession, url: str, stream: str, event: dict[str, object], sent_at: object
) -> None:
    body: dict[str, object] = {"events": [event]}
    if sent_at is not None:
        body["sent_at"] = sent_at.isoformat() if isinstance(sent_at, datetime) else sent_at
    async with http.post(f"{url}/v1/{stream}", json=body) as resp:
        assert resp.status == 200, await resp.text()
        assert (await resp.json())["accepted"] == 1


async def test_a_retry_is_one_row_whatever_the_time_correction_does(
    collector: str, settings: Settings, db: Database, shop: ShopCredentials
) -> None:
    """Same event id and client time, any sent_at: one row, across every way the time moves.

    Each case sends one event twice, the second attempt with another
    ``sent_at`` (or later), so that the collector stores it at another time:
    the skew correction rounding to another minute, the future clamp taking
    another receive time, a correction moving it into the month before, a
    first attempt stored as sent and a retry corrected, and the reverse.
    """
    now = datetime.now(UTC)
    # a client time just after this month began (or the previous one, so that
    # the time is in the past), for a correction that crosses into the month before
    start = _month_start(now)
    if now - start < timedelta(minutes=20):
        start = _month_start(start - timedelta(days=1))
    month_edge = start + timedelta(seconds=30)
    future = now + timedelta(minutes=20)
    cases: dict[str, tuple[datetime, object, object]] = {
        # client time, first sent_at, retry's sent_at
        "minute": (
            now - timedelta(hours=2),
            now - timedelta(hours=2),
            now - timedelta(hours=2, seconds=40),
        ),
        "clamp": (future, None, None),
        "clamp_then_corrected": (future, None, future),
        "month": (month_edge, None, datetime.now(UTC) + timedelta(minutes=10)),
        "corrected_then_not": (now - timedelta(minutes=30), now - timedelta(minutes=30), None),
    }
    url = f"{collector}"
    sent: dict[str, str] = {}
    async with aiohttp.ClientSession(headers={"X-Write-Key": shop.write_key}) as http:
        for stream, time_field in (("behavior", "timestamp"), ("storefront", "ts")):
            for name, (client_time, first, retry) in cases.items():
                event_id = str(uuid.uuid4())
                sent[f"{stream}:{name}"] = event_id
                event: dict[str, object] = {
                    "event_id": event_id,
                    "event_type": "click" if stream == "behavior" else "page_view",
                    "session_id": f"retry-{name}",
                    time_field: client_time.isoformat(),
                }
                if stream == "behavior":
                    event["page_url"] = "https://x/"
                else:
                    event["anon_id"] = "a"
                await _post_retry(http, url, stream, event, first)
                await asyncio.sleep(1.1)  # the retry is received later
                await _post_retry(http, url, stream, event, retry)
    async with (
        Loader(settings, BEHAVIOR, db, PartitionManager(db)),
        Loader(settings, SPECS["storefront"], db, PartitionManager(db)),
    ):
        behavior = [v for k, v in sent.items() if k.startswith("behavior:")]
        storefront = [v for k, v in sent.items() if k.startswith("storefront:")]

        async def loaded() -> bool:
            b = await db.pool.fetchval(
                "SELECT count(DISTINCT event_id) FROM behavior_events "
                "WHERE event_id = ANY($1::uuid[])",
                behavior,
            )
            s = await db.pool.fetchval(
                "SELECT count(DISTINCT event_id) FROM events WHERE event_id = ANY($1::uuid[])",
                storefront,
            )
            return bool(b == len(behavior) and s == len(storefront))

        await wait_for(loaded, timeout=60)
        await asyncio.sleep(1.0)  # any second row would be loaded by now too
    rows = {
        str(r["event_id"]): r["n"]
        for r in await db.pool.fetch(
            "SELECT event_id, count(*) AS n FROM behavior_events WHERE event_id = ANY($1::uuid[]) "
            "GROUP BY 1 UNION ALL "
            "SELECT event_id, count(*) FROM events WHERE event_id = ANY($1::uuid[]) GROUP BY 1",
            list(sent.values()),
        )
    }
    assert {k: rows.get(v) for k, v in sent.items()} == dict.fromkeys(sent, 1)
