"""Shopify webhooks: signatures checked, topics mapped, redeliveries stored once."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import aiohttp
import orjson
import pytest

from consumers.loader import Loader
from consumers.rows import STOREFRONT
from ingest.collector.webhooks import event_type, signature, verify
from ingest.core.db import Database
from ingest.core.settings import Settings
from ingest.core.shops import ShopCredentials
from ingest.partitions import PartitionManager
from tests.conftest import raw_request, wait_for

ORDER = {
    "id": 820982911946154508,
    "created_at": "2026-11-20T10:00:00-05:00",
    "total_price": "199.00",
    "currency": "EUR",
    "cart_token": "c1d2e3",
    "customer": {"id": 115310627314723954},
}


def headers(shop: ShopCredentials, body: bytes, topic: str, webhook_id: str) -> dict[str, str]:
    return {
        "Content-Type": "application/json",
        "X-Shopify-Hmac-Sha256": signature(shop.webhook_secret, body),
        "X-Shopify-Shop-Domain": shop.domain,
        "X-Shopify-Topic": topic,
        "X-Shopify-Webhook-Id": webhook_id,
    }


def test_signature_and_mapping() -> None:
    body = b'{"a":1}'
    good = signature("s3cret", body)
    assert verify("s3cret", body, good)
    assert not verify("s3cret", body + b" ", good)
    assert not verify("other", body, good)
    assert not verify("s3cret", body, None)
    # hmac.compare_digest raises on non-ASCII str: such a header is just wrong.
    for bad in ["\udcff\udcfe", "é" + good[1:], good[:-1] + "\ud800", ""]:
        assert not verify("s3cret", body, bad)
    assert event_type("orders/create") == "purchase"
    assert event_type("checkouts/create") == "begin_checkout"
    assert event_type("carts/update") == "cart_update"
    assert event_type("app/uninstalled") == "shopify_app_uninstalled"


async def test_valid_invalid_and_redelivered(
    collector: str, settings: Settings, db: Database, shop: ShopCredentials
) -> None:
    body = orjson.dumps(ORDER)
    webhook_id = str(uuid.uuid4())
    url = f"{collector}/v1/webhooks/shopify"
    async with aiohttp.ClientSession() as http:
        for _ in range(3):  # Shopify redelivers when it doesn't hear back in time
            async with http.post(
                url, data=body, headers=headers(shop, body, "orders/create", webhook_id)
            ) as resp:
                assert resp.status == 200, await resp.text()
                event_id = (await resp.json())["event_id"]
        bad = headers(shop, body, "orders/create", webhook_id)
        bad["X-Shopify-Hmac-Sha256"] = signature("not-the-secret", body)
        async with http.post(url, data=body, headers=bad) as resp:
            assert resp.status == 401
        tampered = body.replace(b"199.00", b"1.00")
        async with http.post(
            url, data=tampered, headers=headers(shop, body, "orders/create", webhook_id)
        ) as resp:
            assert resp.status == 401
        unknown = headers(shop, body, "orders/create", webhook_id)
        unknown["X-Shopify-Shop-Domain"] = "nobody.myshopify.com"
        async with http.post(url, data=body, headers=unknown) as resp:
            assert resp.status == 401
        async with http.post(url, data=body) as resp:  # no headers at all
            assert resp.status == 401
        no_topic = headers(shop, body, "orders/create", webhook_id)
        del no_topic["X-Shopify-Topic"]
        async with http.post(url, data=body, headers=no_topic) as resp:
            assert resp.status == 400
        array = b"[1, 2]"
        async with http.post(
            url, data=array, headers=headers(shop, array, "orders/create", "w2")
        ) as resp:
            assert resp.status == 400

    async with Loader(settings, STOREFRONT, db, PartitionManager(db)) as loader:
        await wait_for(lambda: _offsets_at(db, settings, 3))
    assert loader.rows_loaded == 1
    row = await db.pool.fetchrow(
        "SELECT event_type, anon_id, session_id, props, ts FROM events WHERE event_id = $1",
        uuid.UUID(event_id),
    )
    assert row is not None
    props = orjson.loads(row["props"])
    assert (row["event_type"], props["value"], props["currency"]) == ("purchase", "199.00", "EUR")
    assert (row["anon_id"], row["session_id"]) == ("115310627314723954", "c1d2e3")
    assert props["payload"]["id"] == ORDER["id"]
    assert row["ts"].isoformat() == "2026-11-20T15:00:00+00:00"


async def _offsets_at(db: Database, settings: Settings, n: int) -> bool:
    total = await db.pool.fetchval(
        "SELECT sum(next_offset) FROM loader_offsets WHERE topic = $1", settings.topic_storefront
    )
    return bool(total == n)


# (header, raw value, expected status), each sent with an otherwise good, signed webhook.
WEBHOOK_HEADER_BYTES = [
    ("X-Shopify-Hmac-Sha256", b"\xff\xfe", 401),
    ("X-Shopify-Hmac-Sha256", b"\xc3\xa9", 401),  # UTF-8, but not base64
    ("X-Shopify-Shop-Domain", b"\xff.myshopify.com", 401),
    ("X-Shopify-Shop-Domain", b"b\xc3\xbccher.myshopify.com", 401),
    ("X-Shopify-Topic", b"orders/\xff", 400),
    ("X-Shopify-Topic", b"orders/cr\xc3\xa9ate", 400),
    ("X-Shopify-Webhook-Id", b"\xff\xfe", 400),
    ("X-Shopify-Webhook-Id", b"\xed\xa0\x80", 400),
    ("X-Shopify-Triggered-At", b"2026-11-20T\xff", 200),  # unreadable: the payload's time
    ("Content-Type", b"application/\xff", 415),
    ("Content-Encoding", b"\xff", 415),
]


@pytest.mark.parametrize(("name", "value", "expected"), WEBHOOK_HEADER_BYTES)
async def test_webhook_header_bytes_get_a_4xx_not_a_500(
    collector: str, shop: ShopCredentials, name: str, value: bytes, expected: int
) -> None:
    body = orjson.dumps(ORDER)
    good = headers(shop, body, "orders/create", str(uuid.uuid4()))
    sent = [(k, v.encode()) for k, v in good.items() if k != name] + [(name, value)]
    status, answer = await raw_request(collector, "POST", "/v1/webhooks/shopify", sent, body)
    assert status == expected, answer
    assert orjson.loads(answer)


async def _storefront_rows(db: Database, shop: ShopCredentials) -> int:
    count = await db.pool.fetchval(
        "SELECT count(*) FROM events e JOIN shops s ON s.id = e.shop_id WHERE s.domain = $1",
        shop.domain,
    )
    return int(count)


async def test_a_signed_body_replayed_with_new_webhook_ids_is_one_row(
    collector: str, settings: Settings, db: Database, shop: ShopCredentials
) -> None:
    """Issue 18.5: only the body is signed, so its headers are the attacker's to choose.

    One captured orders/create, sent again with five new X-Shopify-Webhook-Id
    values (and new X-Shopify-Event-Id / X-Shopify-Triggered-At values), is one
    purchase; the event id and time come from the signed payload.
    """
    body = orjson.dumps(ORDER)
    url = f"{collector}/v1/webhooks/shopify"
    ids = set()
    async with aiohttp.ClientSession() as http:
        for n in range(6):
            sent = headers(shop, body, "orders/create", str(uuid.uuid4()))
            if n % 2:
                sent["X-Shopify-Event-Id"] = str(uuid.uuid4())
            sent["X-Shopify-Triggered-At"] = (datetime.now(UTC) - timedelta(minutes=n)).isoformat()
            async with http.post(url, data=body, headers=sent) as resp:
                assert resp.status == 200, await resp.text()
                ids.add((await resp.json())["event_id"])
    assert len(ids) == 1
    async with Loader(settings, STOREFRONT, db, PartitionManager(db)) as loader:
        await wait_for(lambda: _offsets_at(db, settings, 6))
    assert loader.rows_loaded == 1
    assert await _storefront_rows(db, shop) == 1


async def test_a_payload_without_a_time_replayed_is_one_row(
    collector: str, settings: Settings, db: Database, shop: ShopCredentials
) -> None:
    """A payload without updated_at/created_at: its time is the (unsigned) triggered-at,
    so replays may land at other times; they are still one row."""
    body = orjson.dumps({"id": 788032119674292922})
    url = f"{collector}/v1/webhooks/shopify"
    async with aiohttp.ClientSession() as http:
        for n in range(4):
            sent = headers(shop, body, "products/delete", str(uuid.uuid4()))
            sent["X-Shopify-Triggered-At"] = (datetime.now(UTC) - timedelta(minutes=n)).isoformat()
            async with http.post(url, data=body, headers=sent) as resp:
                assert resp.status == 200, await resp.text()
    async with Loader(settings, STOREFRONT, db, PartitionManager(db)):
        await wait_for(lambda: _offsets_at(db, settings, 4))
    assert await _storefront_rows(db, shop) == 1


async def test_a_stale_delivery_is_refused_and_not_stored(
    collector: str, settings: Settings, db: Database, shop: ShopCredentials
) -> None:
    """A delivery triggered longer ago than webhook_max_age_s gets a 401 and no row."""
    body = orjson.dumps({**ORDER, "id": 1})
    url = f"{collector}/v1/webhooks/shopify"
    stale = datetime.now(UTC) - timedelta(days=30)  # past any window Shopify retries in
    fresh = datetime.now(UTC) - timedelta(minutes=1)
    async with aiohttp.ClientSession() as http:
        sent = headers(shop, body, "orders/create", str(uuid.uuid4()))
        sent["X-Shopify-Triggered-At"] = stale.isoformat()
        async with http.post(url, data=body, headers=sent) as resp:
            assert resp.status == 401, await resp.text()
            assert "X-Shopify-Triggered-At" in (await resp.json())["error"]
        fresh_body = orjson.dumps({**ORDER, "id": 2})
        sent = headers(shop, fresh_body, "orders/create", str(uuid.uuid4()))
        sent["X-Shopify-Triggered-At"] = fresh.isoformat()
        async with http.post(url, data=fresh_body, headers=sent) as resp:
            assert resp.status == 200, await resp.text()
    async with Loader(settings, STOREFRONT, db, PartitionManager(db)) as loader:
        await wait_for(lambda: _offsets_at(db, settings, 1))
    assert loader.rows_loaded == 1
    assert await _storefront_rows(db, shop) == 1
