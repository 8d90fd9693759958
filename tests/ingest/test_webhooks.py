"""Shopify webhooks: signatures checked, topics mapped, redeliveries stored once."""

from __future__ import annotations

import uuid

import aiohttp
import orjson

from consumers.loader import Loader
from consumers.rows import STOREFRONT
from ingest.db import Database
from ingest.partitions import PartitionManager
from ingest.settings import Settings
from ingest.shops import ShopCredentials
from ingest.webhooks import event_type, signature, verify
from tests.conftest import wait_for

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
