"""Collector faults on the real stack: every event answered 2xx reaches PostgreSQL exactly once."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from consumers.loader import Loader
from consumers.rows import BEHAVIOR
from ingest.collector.delivery import Delivery
from ingest.collector.server import serving
from ingest.core.db import Database
from ingest.core.processes import free_port
from ingest.core.settings import Settings
from ingest.core.shops import ShopCredentials
from ingest.core.topics import ensure_topics
from ingest.partitions import PartitionManager
from ingest.stack.broker import EmbeddedBroker
from tests.conftest import wait_for
from tests.helpers import batch, own_broker, reconcile

pytestmark = pytest.mark.slow


async def post(http: aiohttp.ClientSession, url: str, events: list[dict[str, Any]]) -> int:
    try:
        async with http.post(url, json=events, timeout=aiohttp.ClientTimeout(total=10)) as resp:
            return resp.status
    except (TimeoutError, aiohttp.ClientError):
        return 0


async def test_broker_paused_while_events_keep_coming(
    tmp_path: Path, settings: Settings, db: Database, shop: ShopCredentials
) -> None:
    async with own_broker(tmp_path, settings) as (broker, own):
        assert broker.pid is not None
        accepted: list[str] = []
        statuses: list[int] = []
        most_spooled = 0
        async with (
            serving(own, db, key_cache_s=5) as (server, delivery),
            aiohttp.ClientSession() as http,
        ):
            url = f"{server.url}/v1/behavior?k={shop.write_key}"
            for i in range(45):
                if i == 10:
                    os.kill(broker.pid, signal.SIGSTOP)
                if i == 35:
                    os.kill(broker.pid, signal.SIGCONT)
                events = batch()
                status = await post(http, url, events)
                statuses.append(status)
                if status == 200:
                    accepted += [e["event_id"] for e in events]
                assert delivery.spool is not None
                most_spooled = max(most_spooled, delivery.spool.frames)
                await asyncio.sleep(0.05)
            assert most_spooled >= 20  # the paused broker's share went to disk
            assert statuses.count(200) == 45, statuses  # the spool took what the broker couldn't
            await wait_for(lambda: _spool_empty(delivery), timeout=60)
        async with Loader(own, BEHAVIOR, db, PartitionManager(db)):
            await wait_for(lambda: _loaded(db, accepted), timeout=60)
        assert await reconcile(db, accepted) == (0, 0)


async def _spool_empty(delivery: Delivery) -> bool:
    return delivery.spool is not None and delivery.spool.empty


async def _loaded(db: Database, ids: list[str]) -> bool:
    n = await db.pool.fetchval(
        "SELECT count(DISTINCT event_id) FROM behavior_events WHERE event_id = ANY($1::uuid[])", ids
    )
    return bool(n == len(ids))


def collector_process(settings: Settings, port: int) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        **settings.to_env(),
        "EVENTPIPE_COLLECTOR_PORT": str(port),
        "EVENTPIPE_LOG_LEVEL": "warning",
    }
    return subprocess.Popen([sys.executable, "-m", "ingest.cli", "collector"], env=env)


async def wait_ready(url: str) -> None:
    async with aiohttp.ClientSession() as http:
        for _ in range(200):
            with contextlib.suppress(aiohttp.ClientError):
                async with http.get(f"{url}/healthz") as resp:
                    if resp.status == 200:
                        return
            await asyncio.sleep(0.05)
    raise AssertionError("collector did not start")


async def test_sigterm_under_load_loses_nothing(
    tmp_path: Path, settings: Settings, db: Database, shop: ShopCredentials
) -> None:
    own = settings.model_copy(update={"state_dir": tmp_path})
    port = free_port()
    proc = collector_process(own, port)
    base = f"http://127.0.0.1:{port}"
    await wait_ready(base)
    accepted: list[str] = []

    async def client(http: aiohttp.ClientSession) -> None:
        while proc.poll() is None:
            events = batch()
            if await post(http, f"{base}/v1/behavior?k={shop.write_key}", events) == 200:
                accepted.extend(e["event_id"] for e in events)

    async with aiohttp.ClientSession() as http:
        clients = [asyncio.create_task(client(http)) for _ in range(8)]
        await asyncio.sleep(2)
        proc.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(proc.wait, 15)
        await asyncio.gather(*clients)
    assert code == 0
    assert len(accepted) > 100
    async with Loader(own, BEHAVIOR, db, PartitionManager(db)):
        await wait_for(lambda: _loaded(db, accepted), timeout=60)
    assert await reconcile(db, accepted) == (0, 0)


async def test_sigkill_with_a_full_spool_replays_it_on_restart(
    tmp_path: Path, settings: Settings, db: Database, shop: ShopCredentials
) -> None:
    async with own_broker(tmp_path, settings) as (broker, own):
        assert broker.pid is not None
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        proc = collector_process(own, port)
        await wait_ready(base)
        accepted: list[str] = []
        os.kill(broker.pid, signal.SIGSTOP)
        try:
            async with aiohttp.ClientSession() as http:
                for _ in range(10):
                    events = batch()
                    assert await post(http, f"{base}/v1/behavior?k={shop.write_key}", events) == 200
                    accepted += [e["event_id"] for e in events]
            assert list((tmp_path / "spool" / "w0").glob("*.seg"))
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        finally:
            os.kill(broker.pid, signal.SIGCONT)
        proc = collector_process(own, port)  # a new collector finds the spool and sends it
        try:
            await wait_ready(base)
            async with Loader(own, BEHAVIOR, db, PartitionManager(db)):
                await wait_for(lambda: _loaded(db, accepted), timeout=60)
        finally:
            proc.send_signal(signal.SIGTERM)
            await asyncio.to_thread(proc.wait, 15)
        assert await reconcile(db, accepted) == (0, 0)


async def test_workers_share_one_port(
    tmp_path: Path, settings: Settings, shop: ShopCredentials
) -> None:
    import psutil

    own = settings.model_copy(update={"state_dir": tmp_path})
    port = free_port()
    env = {**os.environ, **own.to_env(), "EVENTPIPE_LOG_LEVEL": "warning"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "ingest.cli", "collector", "--workers", "2", "--port", str(port)],
        env=env,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        await wait_ready(base)
        await asyncio.sleep(1)  # both workers bound
        workers = psutil.Process(proc.pid).children()
        assert len(workers) == 2
        async with aiohttp.ClientSession() as http:
            statuses = [
                await post(http, f"{base}/v1/behavior?k={shop.write_key}", batch(1))
                for _ in range(20)
            ]
        assert statuses == [200] * 20
        assert sorted(p.name for p in (tmp_path / "spool").iterdir()) == ["w0", "w1"]
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(proc.wait, 20) == 0
        assert not any(w.is_running() and w.status() != "zombie" for w in workers)
    finally:
        proc.kill()


async def test_embedded_broker_restart_recovers_by_itself(
    tmp_path: Path, settings: Settings, db: Database, shop: ShopCredentials
) -> None:
    """An in-memory broker restart empties its log: later events must still all land."""
    async with own_broker(tmp_path, settings) as (broker, own):
        own = own.model_copy(update={"kafka_log_id": ""})  # follow the live cluster id
        before: list[str] = []
        after: list[str] = []
        async with (
            serving(own, db, key_cache_s=5) as (server, _),
            aiohttp.ClientSession() as http,
            Loader(own, BEHAVIOR, db, PartitionManager(db)),
        ):
            url = f"{server.url}/v1/behavior?k={shop.write_key}"
            for _ in range(10):
                events = batch()
                assert await post(http, url, events) == 200
                before += [e["event_id"] for e in events]
            await wait_for(lambda: _loaded(db, before), timeout=60)
            broker.kill()
            await broker.stop()
            await broker.start()  # same port, new empty log, new cluster id
            await ensure_topics(
                broker.bootstrap, [own.topic_behavior], partitions=own.topic_partitions
            )
            for _ in range(10):
                events = batch()
                assert await post(http, url, events) == 200
                after += [e["event_id"] for e in events]
            await wait_for(lambda: _loaded(db, after), timeout=90)
        assert await reconcile(db, before + after) == (0, 0)


def _large_order(target_bytes: int) -> bytes:
    """An ``orders/create`` payload of a little over ``target_bytes`` of JSON."""
    items: list[dict[str, Any]] = []
    size = 0
    while size <= target_bytes:
        item = {"id": len(items), "title": "x" * 400, "quantity": 1, "price": "1.00"}
        items.append(item)
        size += len(orjson.dumps(item)) + 1
    return orjson.dumps({"id": 42, "total_price": "99.00", "currency": "EUR", "line_items": items})


async def test_a_large_webhook_then_1000_beacons(
    tmp_path: Path, settings: Settings, db: Database, shop: ShopCredentials
) -> None:
    """A webhook too big for one Kafka record is refused (413 naming the limit), never
    spooled; the 1,000 beacons behind it are all rows within 10 s."""
    import gzip

    from ingest.collector.webhooks import signature

    own = settings.model_copy(update={"state_dir": tmp_path, "rate_limit_per_s": 0.0})
    body = _large_order(1_100_000)
    assert len(body) > 1_100_000
    compressed = gzip.compress(body)
    assert len(compressed) < own.max_body_bytes
    accepted: list[str] = []
    async with (
        serving(own, db, key_cache_s=5) as (server, delivery),
        aiohttp.ClientSession() as http,
        Loader(own, BEHAVIOR, db, PartitionManager(db)),
    ):
        async with http.post(
            f"{server.url}/v1/webhooks/shopify",
            data=compressed,
            headers={
                "Content-Type": "application/json",
                "Content-Encoding": "gzip",
                "X-Shopify-Hmac-Sha256": signature(shop.webhook_secret, body),
                "X-Shopify-Shop-Domain": shop.domain,
                "X-Shopify-Topic": "orders/create",
                "X-Shopify-Webhook-Id": str(uuid.uuid4()),
            },
        ) as resp:
            assert resp.status == 413, await resp.text()
            assert "max_record_bytes" in (await resp.json())["error"]
        url = f"{server.url}/v1/behavior?k={shop.write_key}"
        queue = [batch(1) for _ in range(1000)]

        async def client() -> None:
            while queue:
                events = queue.pop()
                assert await post(http, url, events) == 200
                accepted.extend(e["event_id"] for e in events)

        await asyncio.gather(*(client() for _ in range(8)))
        assert len(accepted) == 1000
        await wait_for(lambda: _loaded(db, accepted), timeout=10)
        assert delivery.spool is not None and delivery.spool.empty
    assert await reconcile(db, accepted) == (0, 0)


async def _metric(http: aiohttp.ClientSession, base: str, name: str) -> float | None:
    """The value of an unlabelled metric on ``base``'s /metrics, or None when absent."""
    async with http.get(f"{base}/metrics") as resp:
        text = await resp.text()
    for line in text.splitlines():
        if line.startswith(f"{name} "):
            return float(line.split()[1])
    return None


async def test_collector_started_with_the_broker_down_spools_then_delivers(
    tmp_path: Path, settings: Settings, db: Database, shop: ShopCredentials
) -> None:
    """Nothing listens on the bootstrap port when the collector starts: it starts anyway,
    answers 2xx from its spool, and /readyz is 200 (it can take batches). The broker then
    comes up on that port: the producer connects, the spool drains, every event is a row."""
    port = free_port()
    own = settings.model_copy(
        update={
            "kafka_bootstrap": f"127.0.0.1:{port}",
            "kafka_connect_backoff_max_s": 1.0,
            "state_dir": tmp_path,
        }
    )
    accepted: list[str] = []
    async with (
        serving(own, db, key_cache_s=5) as (server, delivery),
        aiohttp.ClientSession() as http,
    ):
        url = f"{server.url}/v1/behavior?k={shop.write_key}"
        for _ in range(10):
            events = batch()
            assert await post(http, url, events) == 200
            accepted += [e["event_id"] for e in events]
        assert delivery.spool is not None and delivery.spool.frames == 10
        async with http.get(f"{server.url}/readyz") as resp:
            assert resp.status == 200, await resp.text()
        assert await _metric(http, server.url, "eventpipe_broker_up") == 0
        async with EmbeddedBroker(tmp_path / "broker", port=port) as broker:
            await ensure_topics(
                broker.bootstrap, [own.topic_behavior], partitions=own.topic_partitions
            )
            await wait_for(lambda: _spool_empty(delivery), timeout=60)
            for _ in range(5):  # now straight to Kafka
                events = batch()
                assert await post(http, url, events) == 200
                accepted += [e["event_id"] for e in events]
            async with http.get(f"{server.url}/readyz") as resp:
                assert resp.status == 200
            assert await _metric(http, server.url, "eventpipe_broker_up") == 1
            loading = own.model_copy(update={"kafka_log_id": broker.log_id})
            async with Loader(loading, BEHAVIOR, db, PartitionManager(db)):
                await wait_for(lambda: _loaded(db, accepted), timeout=60)
    assert len(accepted) == 75
    assert await reconcile(db, accepted) == (0, 0)


async def test_an_orphan_spool_is_drained_by_worker_0(
    tmp_path: Path, settings: Settings, db: Database, shop: ShopCredentials
) -> None:
    """``--workers 4`` became ``--workers 1``: what worker 3 spooled (2xx'd) still lands."""
    from aiokafka import AIOKafkaConsumer

    from ingest.collector.spool import Spool

    # Real collector records, captured from a topic of their own, become worker 3's spool.
    capture = settings.model_copy(
        update={"state_dir": tmp_path / "capture", "topic_behavior": f"capture.{uuid.uuid4().hex}"}
    )
    await ensure_topics(capture.bootstrap, [capture.topic_behavior], partitions=1)
    accepted: list[str] = []
    async with (
        serving(capture, db, key_cache_s=5, spool=False) as (server, _),
        aiohttp.ClientSession() as http,
    ):
        for _ in range(10):
            events = batch()
            assert await post(http, f"{server.url}/v1/behavior?k={shop.write_key}", events) == 200
            accepted += [e["event_id"] for e in events]
    consumer = AIOKafkaConsumer(
        capture.topic_behavior, bootstrap_servers=capture.bootstrap, auto_offset_reset="earliest"
    )
    await consumer.start()
    captured: list[tuple[bytes, bytes]] = []
    try:
        async with asyncio.timeout(30):
            while sum(len(orjson.loads(v)) for _, v in captured) < len(accepted):
                for recs in (await consumer.getmany(timeout_ms=500)).values():
                    captured += [(r.key or b"", r.value or b"") for r in recs]
    finally:
        await consumer.stop()
    own = settings.model_copy(update={"state_dir": tmp_path, "collector_worker_index": 0})
    orphan = Spool(tmp_path / "spool" / "w3", own.spool_max_bytes)
    orphan.open()
    for record in captured:
        orphan.append(own.topic_behavior, [record])
    orphan.close()
    async with (
        serving(own, db, key_cache_s=5) as (_, delivery),
        Loader(own, BEHAVIOR, db, PartitionManager(db)),
    ):
        await wait_for(lambda: _loaded(db, accepted), timeout=60)
        await wait_for(lambda: _no_adopted(delivery), timeout=30)
    assert not list((tmp_path / "spool").glob("**/*.seg"))
    assert await reconcile(db, accepted) == (0, 0)


async def _no_adopted(delivery: Delivery) -> bool:
    return not delivery.adopted


async def test_an_event_too_large_for_one_record_is_refused_never_spooled(
    tmp_path: Path, settings: Settings, db: Database, shop: ShopCredentials
) -> None:
    """An event whose record would pass max_record_bytes: 413 alone, its neighbours kept."""
    own = settings.model_copy(update={"state_dir": tmp_path, "max_record_bytes": 16 * 1024})
    big = {**batch(1)[0], "event_data": {"blob": "x" * 20_000}}
    small = batch(1)[0]
    async with (
        serving(own, db, key_cache_s=5) as (server, delivery),
        aiohttp.ClientSession() as http,
    ):
        url = f"{server.url}/v1/behavior?k={shop.write_key}"
        async with http.post(url, json=[big]) as resp:
            assert resp.status == 413
            [rejected] = (await resp.json())["rejected"]
            assert "max_record_bytes=16384" in rejected["reason"]
        async with http.post(url, json=[big, small]) as resp:
            assert resp.status == 200
            answer = await resp.json()
            assert answer["accepted"] == 1 and [r["index"] for r in answer["rejected"]] == [0]
        assert delivery.spool is not None and delivery.spool.empty
    async with Loader(own, BEHAVIOR, db, PartitionManager(db)):
        await wait_for(lambda: _loaded(db, [small["event_id"]]), timeout=60)
