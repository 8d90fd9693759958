"""The collector's behavior endpoint against the real broker and PostgreSQL."""

from __future__ import annotations

import uuid

import aiohttp
import orjson
from aiokafka import AIOKafkaConsumer

from ingest.settings import Settings
from ingest.shops import ShopCredentials


def beacon(**overrides: object) -> dict[str, object]:
    event: dict[str, object] = {
        "event_type": "click",
        "session_id": "s-1",
        "page_url": "https://shop.example/p/1",
        "element_path": "body > button#buy",
        "coordinates": {"x": 10, "y": 20},
    }
    event.update(overrides)
    return event


async def read_topic(settings: Settings, count: int) -> list[dict[str, object]]:
    consumer = AIOKafkaConsumer(
        settings.topic_behavior,
        bootstrap_servers=settings.bootstrap,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    await consumer.start()
    out: list[dict[str, object]] = []
    try:
        for _ in range(50):
            for records in (await consumer.getmany(timeout_ms=200)).values():
                out += [orjson.loads(r.value) for r in records]
            if len(out) >= count:
                break
    finally:
        await consumer.stop()
    return out


async def test_beacon_as_text_plain_with_query_key(
    collector: str, settings: Settings, shop: ShopCredentials
) -> None:
    event_id = str(uuid.uuid4())
    body = orjson.dumps({"events": [beacon(event_id=event_id), beacon(event_type="scroll")]})
    async with (
        aiohttp.ClientSession() as http,
        http.post(
            f"{collector}/v1/behavior?k={shop.write_key}",
            data=body,
            headers={"Content-Type": "text/plain;charset=UTF-8"},
        ) as resp,
    ):
        assert resp.status == 200, await resp.text()
        assert await resp.json() == {"accepted": 2, "rejected": []}
    records = await read_topic(settings, 2)
    assert len(records) == 2
    first = next(r for r in records if r["event_id"] == event_id)
    assert first["shop_id"] == str(shop.shop_id)
    assert first["received_at"] and first["timestamp"]


async def test_write_key_in_header_or_body(collector: str, shop: ShopCredentials) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.post(
            f"{collector}/v1/behavior", json=[beacon()], headers={"X-Write-Key": shop.write_key}
        ) as resp:
            assert resp.status == 200
        async with http.post(
            f"{collector}/v1/behavior", json={"events": [beacon()], "write_key": shop.write_key}
        ) as resp:
            assert resp.status == 200


async def test_missing_or_unknown_key_is_401(collector: str) -> None:
    async with aiohttp.ClientSession() as http:
        for url in (f"{collector}/v1/behavior", f"{collector}/v1/behavior?k=wk_nope"):
            async with http.post(url, json=[beacon()]) as resp:
                assert resp.status == 401
                assert "write key" in (await resp.json())["error"]


async def test_partial_acceptance_and_bad_bodies(collector: str, shop: ShopCredentials) -> None:
    url = f"{collector}/v1/behavior?k={shop.write_key}"
    async with aiohttp.ClientSession() as http:
        async with http.post(
            url, json=[beacon(), beacon(event_type="dance"), beacon(page_url="a\x00b")]
        ) as resp:
            assert resp.status == 200
            result = await resp.json()
        assert result["accepted"] == 1
        assert [r["index"] for r in result["rejected"]] == [1, 2]
        assert "event_type" in result["rejected"][0]["reason"]
        assert "NUL" in result["rejected"][1]["reason"]
        for body in (b"{not json", b'"a string"', b'{"events": 3}'):
            async with http.post(url, data=body) as resp:
                assert resp.status == 400, body
                assert (await resp.json())["error"]
        async with http.post(url, json=[beacon(event_type="nope")]) as resp:
            assert resp.status == 400


async def test_body_limits_are_413(
    collector: str, settings: Settings, shop: ShopCredentials
) -> None:
    url = f"{collector}/v1/behavior?k={shop.write_key}"
    async with aiohttp.ClientSession() as http:
        too_many = [beacon() for _ in range(settings.max_events_per_batch + 1)]
        async with http.post(url, json=too_many) as resp:
            assert resp.status == 413
            assert "max_events_per_batch" in (await resp.json())["error"]
        huge = b"[" + b" " * settings.max_body_bytes + b"]"
        async with http.post(url, data=huge) as resp:
            assert resp.status == 413
