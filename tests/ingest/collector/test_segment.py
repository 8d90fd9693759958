"""The Segment tracking API, driven by the real segment-analytics-python SDK."""

from __future__ import annotations

import asyncio
import base64
import gzip
import os
import signal
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from prometheus_client import REGISTRY
from segment.analytics import Client
from segment.analytics.request import APIError, post

from consumers.loader import Loader
from consumers.rows import STOREFRONT
from ingest.collector.server import serving
from ingest.core.db import Database
from ingest.core.settings import Settings
from ingest.core.shops import ShopCredentials
from ingest.core.topics import ensure_topics
from ingest.partitions import PartitionManager
from tests.conftest import wait_for
from tests.helpers import own_broker


async def _rows(db: Database, shop: ShopCredentials) -> list[dict[str, Any]]:
    rows = await db.pool.fetch(
        "SELECT event_id::text, anon_id, session_id, event_type, ts, props, product_id, "
        "experiment_id, variant FROM events WHERE shop_id = $1 ORDER BY ts, event_type",
        shop.shop_id,
    )
    return [dict(r) for r in rows]


async def _loaded(db: Database, shop: ShopCredentials, n: int) -> list[dict[str, Any]]:
    async def enough() -> bool:
        return len(await _rows(db, shop)) >= n

    await wait_for(enough)
    await asyncio.sleep(0.3)  # anything more (a duplicate) would have landed by now
    return await _rows(db, shop)


async def _in_thread(call: Callable[[], Any]) -> Any:
    # The SDK is synchronous (requests); the collector runs on this test's loop.
    return await asyncio.to_thread(call)


@pytest.mark.parametrize("compress", [False, True])
async def test_the_python_sdk_track_page_screen_are_rows_once(
    collector: str, settings: Settings, db: Database, shop: ShopCredentials, compress: bool
) -> None:
    errors: list[Exception] = []
    client = Client(
        shop.write_key,
        host=collector,
        gzip=compress,
        upload_size=10,
        max_retries=1,
        on_error=lambda error, _: errors.append(error),
    )
    client.track(
        anonymous_id="anon-1",
        event="Product Viewed",
        properties={"product_id": "sku-1", "price": 9.5},
        context={"sessionId": 1700000000},
    )
    client.track(
        anonymous_id="anon-1",
        event="Experiment Viewed",
        properties={"experiment_id": "exp-1", "variation_id": 2},
    )
    client.page(anonymous_id="anon-1", category="Docs", name="Home", properties={"url": "/"})
    client.screen(user_id="user-7", name="Cart")
    await _in_thread(client.flush)
    client.join()
    assert errors == []
    async with Loader(settings, STOREFRONT, db, PartitionManager(db)):
        rows = await _loaded(db, shop, 4)
        by_type = {r["event_type"]: r for r in rows}
        assert len(rows) == 4, rows
        viewed = by_type["Product Viewed"]
        assert viewed["anon_id"] == "anon-1"
        assert viewed["product_id"] == "sku-1"
        assert viewed["session_id"] == "1700000000"
        props = orjson.loads(viewed["props"])
        assert props["price"] == 9.5
        assert props["$context"]["library"]["name"] == "analytics-python"
        experiment = by_type["Experiment Viewed"]
        assert (experiment["experiment_id"], experiment["variant"]) == ("exp-1", "2")
        page = by_type["page_view"]
        assert orjson.loads(page["props"])["$name"] == "Home"
        # Without context.sessionId: the visitor and the UTC day of the event.
        assert page["session_id"] == f"anon-1/{page['ts'].date().isoformat()}"
        assert by_type["screen_view"]["anon_id"] == "user-7"  # only a userId: it stands in

        # The SDK retries a batch it got no 2xx for: the same messages again are stored once.
        stored = await db.pool.fetch(
            "SELECT props->>'$message_id' AS id, ts FROM events WHERE shop_id = $1", shop.shop_id
        )
        batch = [
            {
                "type": "track",
                "event": "Product Viewed",
                "anonymousId": "anon-1",
                "messageId": row["id"],
                "timestamp": row["ts"].isoformat(),
                "properties": {"product_id": "sku-1"},
            }
            for row in stored
            if row["id"] is not None
        ][:1]
        for _ in range(2):
            await _in_thread(
                lambda: post(shop.write_key, host=collector, gzip=compress, batch=batch)
            )
        assert len(await _loaded(db, shop, 4)) == 4


async def test_every_authentication_of_the_issue(
    collector: str, settings: Settings, db: Database, shop: ShopCredentials
) -> None:
    key = shop.write_key
    basic = "Basic " + base64.b64encode(f"{key}:".encode()).decode()
    message = {"type": "track", "event": "e", "anonymousId": "a"}
    cases: list[tuple[str, dict[str, str], dict[str, Any]]] = [
        ("/v1/track", {"Authorization": basic}, message),
        ("/v1/t", {"X-Write-Key": key}, message),
        ("/api/s/track", {"X-Write-Key": f"{key}:secret"}, message),
        ("/api/s/s2s/page", {"X-Write-Key": key}, {"anonymousId": "a", "name": "p"}),
        ("/v1/p", {}, {**message, "type": "page", "writeKey": key}),
        (f"/beacon/v1/batch?writeKey={key}", {"Content-Type": "text/plain"}, {"batch": [message]}),
        ("/v1/b", {}, {"batch": [message], "writeKey": key}),
        ("/v1/import", {"Authorization": basic}, {"batch": [message]}),
        ("/v1/screen", {"Authorization": basic}, {"userId": "u", "name": "s"}),
    ]
    async with aiohttp.ClientSession() as http:
        for n, (path, headers, body) in enumerate(cases):
            # Without a messageId the same content is the same message (a retry): one row.
            if "batch" in body:
                body = {**body, "batch": [{**message, "messageId": f"auth-{n}"}]}
            else:
                body = {**body, "messageId": f"auth-{n}"}
            async with http.post(collector + path, data=orjson.dumps(body), headers=headers) as r:
                assert r.status == 200, (path, await r.text())
                assert await r.json() == {"success": True, "accepted": 1, "rejected": []}, path
        # A bad key, or none, is a 401 on every route.
        for path, headers in [
            ("/v1/batch", {"Authorization": "Basic " + base64.b64encode(b"wk_nope:").decode()}),
            ("/v1/track", {"X-Write-Key": "wk_nope"}),
            ("/v1/t", {}),
        ]:
            body = {"batch": [message]} if path.endswith("batch") else message
            async with http.post(collector + path, data=orjson.dumps(body), headers=headers) as r:
                assert r.status == 401, path
    async with Loader(settings, STOREFRONT, db, PartitionManager(db)):
        assert len(await _loaded(db, shop, len(cases))) == len(cases)


async def test_refusals_as_the_sdk_sees_them(
    collector: str, settings: Settings, db: Database, shop: ShopCredentials
) -> None:
    def track(i: int, **extra: Any) -> dict[str, Any]:
        return {
            "type": "track",
            "event": f"e{i}",
            "anonymousId": "a",
            "messageId": f"m-{i}",
            **extra,
        }

    # A bad key: the SDK gets a 4xx (and so drops the batch, never retrying it).
    with pytest.raises(APIError) as refused:
        await _in_thread(lambda: post("wk_unknown", host=collector, batch=[track(0)]))
    assert refused.value.status == 401
    # One bad message among good ones, and one too large: 200, those two rejected alone.
    batch = [
        track(1),
        {"type": "track", "anonymousId": "a"},  # no event name
        track(2, properties={"blob": "x" * 40_000}),  # over segment_max_message_bytes
        track(3),
        {"type": "identify"},  # neither anonymousId nor userId
        "not a message",
    ]
    answer = await _in_thread(lambda: post(shop.write_key, host=collector, batch=batch))
    data = answer.json()
    assert (answer.status_code, data["success"], data["accepted"]) == (200, True, 2)
    assert [r["index"] for r in data["rejected"]] == [1, 2, 4, 5]
    assert "segment_max_message_bytes" in data["rejected"][1]["reason"]
    # A batch over segment_max_batch_bytes (gzip or not): 413, nothing stored.
    big = [track(10 + i, properties={"blob": "y" * 30_000}) for i in range(20)]
    for compress in (False, True):
        with pytest.raises(APIError) as refused:
            await _in_thread(
                lambda c=compress: post(shop.write_key, host=collector, gzip=c, batch=big)  # type: ignore[misc]
            )
        assert refused.value.status == 413
    too_many = [track(100 + i) for i in range(settings.segment_max_batch_messages + 1)]
    with pytest.raises(APIError) as refused:
        await _in_thread(lambda: post(shop.write_key, host=collector, batch=too_many))
    assert refused.value.status == 413
    # A single message too large on its own route: 413.
    async with aiohttp.ClientSession() as http:
        headers = {"X-Write-Key": shop.write_key}
        async with http.post(
            collector + "/v1/track",
            data=orjson.dumps(track(7, properties={"blob": "z" * 40_000})),
            headers=headers,
        ) as r:
            assert r.status == 413
        # Not JSON, gzip or not, or not a batch: 400.
        for body, extra in [
            (b"{not json", {}),
            (gzip.compress(b"{not json"), {"Content-Encoding": "gzip"}),
            (b'{"batch": 3}', {}),
            (b"[1, 2]", {}),
            (b'{"batch": [{"type": "page", "anonymousId": "a"}], "context": {"x": "\\u0000"}}', {}),
        ]:
            async with http.post(
                collector + "/v1/batch", data=body, headers={**headers, **extra}
            ) as r:
                assert r.status == 400, body
    async with Loader(settings, STOREFRONT, db, PartitionManager(db)):
        rows = await _loaded(db, shop, 2)
        assert sorted(r["event_type"] for r in rows) == ["e1", "e3"]


async def test_message_ids_are_stable_event_ids_per_shop(
    collector: str, shop: ShopCredentials
) -> None:
    from ingest.collector.segment import event_id
    from ingest.core.shops import Shop

    one = Shop(id=shop.shop_id, domain=shop.domain, allowed_origins=None)  # type: ignore[call-arg]
    other = Shop(id=uuid.uuid4(), domain="x", allowed_origins=None)  # type: ignore[call-arg]
    mid = "ajs-next-1700000000000-6c9b1e2e-8c1d-4f3e-9a0b-2b3c4d5e6f70"
    assert event_id(one, {}, mid) == event_id(one, {"other": 1}, mid)
    assert event_id(one, {}, mid) != event_id(other, {}, mid)
    assert event_id(one, {"a": 1, "b": 2}, None) == event_id(one, {"b": 2, "a": 1}, None)


async def test_the_sdks_configuration_calls_and_preflights(collector: str) -> None:
    asked = "authorization, content-type, anonymousid, x-retry-count, x-ip-policy"
    async with aiohttp.ClientSession() as http:
        async with http.get(collector + "/v1/projects/wk_demo/settings") as r:
            assert r.status == 200
            document = await r.json()
        segment_io = document["integrations"]["Segment.io"]
        assert segment_io["apiKey"] == "wk_demo"
        assert segment_io["apiHost"] == collector.split("://")[1] + "/v1"
        assert set(document["integrations"]) == {"Segment.io"}  # no device-mode integration
        async with http.get(collector + "/sourceConfig?p=npm&v=3&writeKey=wk_demo") as r:
            assert r.status == 200
            source = (await r.json())["source"]
        assert (source["writeKey"], source["enabled"], source["destinations"]) == (
            "wk_demo",
            True,
            [],
        )
        for path in ("/v1/batch", "/v1/t", "/beacon/v1/batch", "/api/s/track", "/sourceConfig"):
            async with http.options(
                collector + path,
                headers={
                    "Origin": "https://shop.example",
                    "Access-Control-Request-Method": "POST",
                    "Access-Control-Request-Headers": asked,
                },
            ) as r:
                assert r.status == 204, path
                assert r.headers["Access-Control-Allow-Headers"] == asked, path
                assert r.headers["Access-Control-Allow-Origin"] == "https://shop.example"
                assert "Access-Control-Allow-Credentials" not in r.headers


def _answered(endpoint: str, status: int) -> float:
    """How many requests of ``endpoint`` the collector answered with ``status`` (its
    own counter: the collector runs in this process)."""
    value = REGISTRY.get_sample_value(
        "eventpipe_http_requests_total", {"endpoint": endpoint, "status": str(status)}
    )
    return value or 0.0


def _sdk(key: str, host: str, errors: list[tuple[Exception, list[Any]]], **options: Any) -> Client:
    """segment-analytics-python's client with its own retries and backoff (few
    retries, so a test ends; on_error records what the SDK gave up on)."""
    return Client(
        key,
        host=host,
        upload_interval=0.05,
        max_retries=3,
        on_error=lambda error, batch: errors.append((error, batch)),
        **options,
    )


async def _send(client: Client) -> None:
    await _in_thread(client.flush)  # returns once every batch is answered or given up
    client.join()


async def _message_ids(db: Database, shop: ShopCredentials) -> list[str]:
    rows = await db.pool.fetch(
        "SELECT props->>'$message_id' AS id FROM events WHERE shop_id = $1", shop.shop_id
    )
    return sorted(r["id"] for r in rows)


async def test_the_sdk_drops_a_refused_batch_once_and_keeps_good_messages(
    settings: Settings, db: Database, shop: ShopCredentials
) -> None:
    """The SDK's own client (its retries on) against the collector's 4xx answers:
    a bad key and an oversize batch are given up at once (one request each, the
    SDK's on_error told), one bad message costs only itself."""
    small = settings.model_copy(update={"segment_max_batch_bytes": 8192})
    async with Database(settings.dsn) as database, serving(small, database) as (server, _):
        errors: list[tuple[Exception, list[Any]]] = []
        before = _answered("/v1/batch", 401)
        client = _sdk("wk_unknown", server.url, errors)
        for i in range(3):
            client.track(anonymous_id="a", event="e", message_id=f"bad-key-{i}")
        await _send(client)
        assert _answered("/v1/batch", 401) - before == 1, "a 401 is never retried"
        assert [(type(e), getattr(e, "status", None), len(b)) for e, b in errors] == [
            (APIError, 401, 3)
        ]

        errors.clear()
        before = _answered("/v1/batch", 413)
        client = _sdk(shop.write_key, server.url, errors, upload_size=10)
        for i in range(4):  # 4 messages of 3 KB: over the collector's 8 KB batch
            client.track(
                anonymous_id="a", event="big", properties={"x": "y" * 3000}, message_id=f"big-{i}"
            )
        await _send(client)
        assert _answered("/v1/batch", 413) - before == 1, "a 413 is never retried"
        assert [(getattr(e, "status", None), len(b)) for e, b in errors] == [(413, 4)]

        errors.clear()
        before = _answered("/v1/batch", 200)
        client = _sdk(shop.write_key, server.url, errors, upload_size=10)
        client.track(anonymous_id="a", event="good", message_id="good-1")
        client.track(anonymous_id="a", event="x" * 300, message_id="too-long-a-name")
        client.track(anonymous_id="a", event="good", message_id="good-2")
        await _send(client)
        assert errors == []
        assert _answered("/v1/batch", 200) - before == 1  # one batch, answered 200
    async with Loader(settings, STOREFRONT, db, PartitionManager(db)):
        await _loaded(db, shop, 2)
        # Only what the collector took: the good messages once, the bad one alone refused
        # (its reason in the 200's "rejected"), nothing of the batches given up.
        assert await _message_ids(db, shop) == ["good-1", "good-2"]


async def test_the_sdk_retries_a_429_after_its_retry_after_and_stores_each_once(
    settings: Settings, db: Database, shop: ShopCredentials
) -> None:
    """The collector's own rate limit (1 request/s per key and client, no burst):
    the SDK's batches beyond it get 429 with Retry-After, the SDK waits and sends
    them again; nothing lost, nothing twice."""
    limited = settings.model_copy(
        update={"rate_limit_client_per_s": 1.0, "rate_limit_client_burst": 1}
    )
    async with Database(settings.dsn) as database, serving(limited, database) as (server, _):
        errors: list[tuple[Exception, list[Any]]] = []
        before, ok = _answered("/v1/batch", 429), _answered("/v1/batch", 200)
        client = _sdk(shop.write_key, server.url, errors, upload_size=2)
        sent = [f"rl-{i}" for i in range(4)]
        for mid in sent:  # 2 batches of 2, sent back to back
            client.track(anonymous_id="a", event="e", message_id=mid)
        await _send(client)
        assert errors == [], errors
        assert _answered("/v1/batch", 429) - before >= 1, "the rate limit answered"
        assert _answered("/v1/batch", 200) - ok == 2, "each batch taken once, in the end"
    async with Loader(settings, STOREFRONT, db, PartitionManager(db)):
        await _loaded(db, shop, len(sent))
        assert await _message_ids(db, shop) == sorted(sent)


@pytest.mark.slow
async def test_the_sdk_retries_a_503_when_neither_broker_nor_spool_can_take_it(
    tmp_path: Path, settings: Settings, db: Database, shop: ShopCredentials
) -> None:
    """The broker stopped (SIGSTOP) and no spool: the collector answers 503 with
    Retry-After; the SDK waits it out and sends the batch again once the broker is
    back. The first attempt's records may reach Kafka late (the producer had them
    in flight): each message is still one row."""
    async with own_broker(tmp_path, settings) as (broker, own):
        own = own.model_copy(update={"spool_enabled": False})
        await ensure_topics(
            broker.bootstrap, [own.topic_storefront], partitions=own.topic_partitions
        )
        assert broker.pid is not None
        async with Database(own.dsn) as database, serving(own, database) as (server, _):
            errors: list[tuple[Exception, list[Any]]] = []
            before, ok = _answered("/v1/batch", 503), _answered("/v1/batch", 200)
            client = _sdk(shop.write_key, server.url, errors, upload_size=10)
            sent = [f"down-{i}" for i in range(5)]
            os.kill(broker.pid, signal.SIGSTOP)
            try:
                for mid in sent:
                    client.track(anonymous_id="a", event="e", message_id=mid)
                sending = asyncio.create_task(_send(client))

                async def refused() -> bool:
                    return _answered("/v1/batch", 503) > before

                await wait_for(refused)
            finally:
                os.kill(broker.pid, signal.SIGCONT)
            await sending
            assert errors == [], errors
            assert _answered("/v1/batch", 200) - ok == 1, "the SDK sent the batch again"
        async with Loader(own, STOREFRONT, db, PartitionManager(db)):
            await _loaded(db, shop, len(sent))
            assert await _message_ids(db, shop) == sorted(sent)


def _fast_path_batch() -> dict[str, Any]:
    context = {"library": {"name": "analytics.js", "version": "next-1.84.3"}, "locale": "en"}
    return {
        "batch": [
            {
                "type": "track",
                "event": "Order Completed",
                "messageId": "ajs-next-1-a",
                "anonymousId": "anon-1",
                "properties": {"product_id": 7, "revenue": 9.5},
                "context": {"page": {"url": "https://a.example/p"}, "locale": "fr"},
                "timestamp": "2026-12-01T10:00:00Z",
            },
            {"type": "page", "messageId": "ajs-next-2-b", "userId": "u-1", "name": "Home"},
            {
                "type": "identify",
                "messageId": "ajs-next-3-c",
                "userId": "u-1",
                "anonymousId": "anon-1",
                "traits": {"plan": "pro"},
            },
        ],
        "context": context,
        "sentAt": "2026-12-01T10:00:01Z",
    }


def test_the_whole_batch_path_validates_as_the_per_message_path_does() -> None:
    """The fast path (one parse and validation of the body) gives the messages the
    per-message path gives, the batch's context merged the same way, and declines
    every body the per-message path must decide (with its reasons)."""
    from ingest.collector import segment

    settings = Settings()
    data = _fast_path_batch()
    whole = segment._whole_batch(orjson.dumps(data), settings)
    assert whole is not None
    one_by_one = [
        segment._message(raw, data["context"], None, settings.segment_max_message_bytes)
        for raw in data["batch"]
    ]
    assert whole[1] == one_by_one
    assert whole[1][0].context == {**data["context"], **data["batch"][0]["context"]}
    assert whole[1][1].context == data["context"]

    def declined(change: Callable[[dict[str, Any]], None]) -> bool:
        body = _fast_path_batch()
        change(body)
        return segment._whole_batch(orjson.dumps(body), settings) is None

    assert declined(lambda b: b["batch"][1].pop("messageId"))  # its id is of its raw JSON
    assert declined(lambda b: b["batch"][0].pop("event"))  # a track without its name
    assert declined(lambda b: b["batch"][1].pop("userId"))  # neither id
    assert declined(lambda b: b["batch"][0].update(type="purchase"))  # not a type
    assert declined(lambda b: b["batch"][2].update(traits={"x": "\u0000"}))  # NUL
    big = "x" * settings.segment_max_message_bytes
    assert declined(lambda b: b["batch"][0]["properties"].update(note=big))  # too large


def test_the_fast_uuid5_is_the_standard_librarys() -> None:
    from ingest.collector import segment

    for name in ("ajs-next-1733000000000-0a452b53", "", "é-ünïcode-名前", "x" * 1024):
        for _ in range(20):
            space = uuid.uuid4()
            assert segment.uuid5(space, name) == uuid.uuid5(space, name)
