"""PostHog's capture API, driven by the real posthog-python SDK and lz-string's encoder."""

from __future__ import annotations

import asyncio
import base64
import gzip
import uuid
from typing import Any

import aiohttp
import lzstring  # type: ignore[import-untyped]
import orjson
import pytest
from posthog import Posthog

from ingest.collector import posthog as capture_api
from ingest.core.db import Database
from ingest.core.settings import Settings
from ingest.core.shops import ShopCredentials
from tests.conftest import wait_for
from tests.helpers import both_loaders

CHAIN = (
    'button.btn.primary:attr__class="btn primary"attr__id="buy"nth-child="1"text="Buy now";'
    'form.cart:attr__class="cart"nth-child="2";body:nth-child="1"'
)


async def _rows(db: Database, shop: ShopCredentials) -> list[dict[str, Any]]:
    behavior = await db.pool.fetch(
        "SELECT event_id::text, event_type, session_id, page_url, element_path, element_type, "
        "element_text, event_data, metadata FROM behavior_events WHERE shop_id = $1",
        shop.shop_id,
    )
    storefront = await db.pool.fetch(
        "SELECT event_id::text, event_type, anon_id, session_id, props FROM events "
        "WHERE shop_id = $1",
        shop.shop_id,
    )
    return [{"table": "behavior", **r} for r in behavior] + [
        {"table": "events", **r} for r in storefront
    ]


async def _loaded(db: Database, shop: ShopCredentials, n: int) -> list[dict[str, Any]]:
    async def enough() -> bool:
        return len(await _rows(db, shop)) >= n

    await wait_for(enough)
    await asyncio.sleep(0.5)  # a duplicate would have landed by now
    return await _rows(db, shop)


def _send_all(client: Posthog) -> list[str]:
    page = {
        "$current_url": "https://shop.test/p/1",
        "$session_id": "ph-s1",
        "$referrer": "https://r/",
    }
    ids = [
        client.capture("$pageview", distinct_id="anon-1", properties=page),
        client.capture(
            "$autocapture",
            distinct_id="anon-1",
            properties={**page, "$event_type": "click", "$elements_chain": CHAIN},
        ),
        client.capture(
            "$rageclick",
            distinct_id="anon-1",
            properties={
                **page,
                "$elements": [{"tag_name": "div", "attr__id": "dead", "$el_text": "Nothing"}],
            },
        ),
        client.capture(
            "Product Viewed", distinct_id="anon-1", properties={"product_id": "sku-1", "price": 3}
        ),
    ]
    client.flush()
    return [i for i in ids if i is not None]


@pytest.mark.parametrize("compress", [False, True])
async def test_posthog_python_events_are_rows_once(
    collector: str, settings: Settings, db: Database, shop: ShopCredentials, compress: bool
) -> None:
    errors: list[Exception] = []
    client = Posthog(
        shop.write_key,
        host=collector,
        gzip=compress,
        sync_mode=True,
        on_error=lambda error, _: errors.append(error),
        enable_local_evaluation=False,
    )
    ids = await asyncio.to_thread(_send_all, client)
    assert errors == [] and len(ids) == 4
    async with both_loaders(settings, db):
        rows = await _loaded(db, shop, 4)
        assert len(rows) == 4, rows
        assert {r["event_id"] for r in rows} == set(ids)
        by_type = {r["event_type"]: r for r in rows}
        view = by_type["page_view"]
        assert (view["session_id"], view["page_url"]) == ("ph-s1", "https://shop.test/p/1")
        assert orjson.loads(view["metadata"])["referrer"] == "https://r/"
        click = by_type["click"]
        assert click["element_path"] == "body > form.cart > button#buy.btn.primary"
        assert (click["element_type"], click["element_text"]) == ("button", "Buy now")
        rage = by_type["rage_click"]
        assert (rage["element_path"], rage["element_text"]) == ("div#dead", "Nothing")
        viewed = by_type["Product Viewed"]
        assert (viewed["table"], viewed["anon_id"]) == ("events", "anon-1")
        assert orjson.loads(viewed["props"])["price"] == 3

        # The SDK retries a batch without a 200: the same events again are stored once.
        body = {
            "api_key": shop.write_key,
            "batch": [
                {
                    "event": "Product Viewed",
                    "distinct_id": "anon-1",
                    "uuid": by_type["Product Viewed"]["event_id"],
                    "timestamp": (
                        await db.pool.fetchval(
                            "SELECT ts FROM events WHERE event_id = $1",
                            uuid.UUID(by_type["Product Viewed"]["event_id"]),
                        )
                    ).isoformat(),
                    "properties": {"product_id": "sku-1", "price": 3},
                }
            ],
        }
        async with aiohttp.ClientSession() as http:
            for _ in range(2):
                async with http.post(
                    collector + "/batch/", data=gzip.compress(orjson.dumps(body))
                ) as answer:
                    assert answer.status == 200, await answer.text()
        assert len(await _loaded(db, shop, 4)) == 4


def _event(shop: ShopCredentials, name: str = "signup") -> dict[str, Any]:
    return {
        "event": name,
        "uuid": str(uuid.uuid4()),
        "properties": {"distinct_id": "anon-2", "token": shop.write_key, "$session_id": "s2"},
    }


async def test_every_encoding_posthog_js_sends(
    collector: str, settings: Settings, db: Database, shop: ShopCredentials
) -> None:
    events = [_event(shop) for _ in range(6)]
    as_json = [orjson.dumps([e]) for e in events]
    lz = lzstring.LZString()
    async with aiohttp.ClientSession() as http:
        sends = [
            # gzip-js: text/plain gzip, the parameter or not, no Content-Encoding.
            http.post(
                collector + "/e/?compression=gzip-js",
                data=gzip.compress(as_json[0]),
                headers={"Content-Type": "text/plain"},
            ),
            http.post(collector + "/i/v0/e/", data=gzip.compress(as_json[1])),
            # lz-string (lz64), as a form post and as the body.
            http.post(
                collector + "/e/",
                data={"data": lz.compressToBase64(as_json[2].decode()), "compression": "lz64"},
            ),
            http.post(
                collector + "/capture/?compression=lz64",
                data=lz.compressToBase64(as_json[3].decode()),
            ),
            # base64 form post (the beacon fallback), answered 204.
            http.post(
                collector + "/track/?beacon=1",
                data={"data": base64.b64encode(as_json[4]).decode()},
            ),
        ]
        statuses = []
        for send in sends:
            async with send as answer:
                statuses.append(answer.status)
        data = base64.b64encode(as_json[5]).decode()
        async with http.get(collector + "/e/", params={"data": data}) as answer:
            statuses.append(answer.status)
        assert statuses == [200, 200, 200, 200, 204, 200]
    async with both_loaders(settings, db):
        rows = await _loaded(db, shop, 6)
        assert {r["event_id"] for r in rows} == {e["uuid"] for e in events}
        assert all("token" not in orjson.loads(r["props"]) for r in rows)


async def test_bombs_and_bad_keys_are_refused(settings: Settings, shop: ShopCredentials) -> None:
    from ingest.collector.server import serving

    small = settings.model_copy(update={"max_decompressed_bytes": 4096})
    lz = lzstring.LZString()
    body = orjson.dumps([{**_event(shop), "properties": {"distinct_id": "x" * 20_000}}])
    async with (
        Database(settings.dsn) as database,
        serving(small, database, key_cache_s=0.5) as (server, _),
        aiohttp.ClientSession() as http,
    ):
        for send in (
            http.post(server.url + "/e/", data=gzip.compress(body)),  # gzip by its magic
            http.post(server.url + "/e/?compression=lz64", data=lz.compressToBase64(body.decode())),
        ):
            async with send as answer:
                assert answer.status == 413, await answer.text()
                assert "max_decompressed_bytes" in (await answer.json())["error"]
        unknown = orjson.dumps({"api_key": "nope", "batch": [_event(shop)]})
        async with http.post(server.url + "/batch/", data=unknown) as answer:
            assert answer.status == 401
    # Decoded in bounded steps: an lz-string claiming 10 MB stops at the limit.
    bomb = lz.compressToBase64("a" * 200_000)
    assert len(bomb) < 3000
    with pytest.raises(capture_api.LzError):
        capture_api.lz_decompress_base64(bomb, 4096)
    assert capture_api.lz_decompress_base64(bomb, 200_000) == "a" * 200_000


async def test_the_configuration_calls_answer_a_minimal_document(collector: str) -> None:
    async with aiohttp.ClientSession() as http:
        for method, path in (
            ("POST", "/decide/?v=4"),
            ("POST", "/flags/?v=2"),
            ("GET", "/array/phc_x/config"),
        ):
            async with http.request(method, collector + path, json={"token": "t"}) as answer:
                assert answer.status == 200
                document = await answer.json()
                assert document["featureFlags"] == {} and document["sessionRecording"] is False
                assert document["config"]["enable_collect_everything"] is True
        async with http.get(collector + "/array/phc_x/config.js") as answer:
            assert "_POSTHOG_REMOTE_CONFIG" in await answer.text()


async def test_identify_and_alias_build_identities(
    collector: str, settings: Settings, db: Database, shop: ShopCredentials
) -> None:
    """posthog-python's alias, and an $identify as posthog-js sends it, become identities."""
    errors: list[Exception] = []
    client = Posthog(
        shop.write_key,
        host=collector,
        sync_mode=True,
        on_error=lambda error, _: errors.append(error),
        enable_local_evaluation=False,
    )

    def send() -> None:
        client.capture(
            "$identify",
            distinct_id="user-9",
            properties={"$anon_distinct_id": "anon-9", "$set": {"plan": "pro"}},
        )
        client.alias(previous_id="anon-10", distinct_id="user-9")
        client.flush()

    await asyncio.to_thread(send)
    assert errors == []

    async def identities() -> list[Any]:
        return list(
            await db.pool.fetch(
                "SELECT anon_id, user_id, traits FROM identities WHERE shop_id = $1 "
                "ORDER BY anon_id",
                shop.shop_id,
            )
        )

    async with both_loaders(settings, db):
        await wait_for(lambda: _count(identities, 2), timeout=30)
    rows = await identities()
    assert [(r["anon_id"], r["user_id"]) for r in rows] == [
        ("anon-10", "user-9"),
        ("anon-9", "user-9"),
    ]
    assert orjson.loads(rows[1]["traits"])["plan"] == "pro"
    stored = await db.pool.fetchval(
        "SELECT count(*) FROM events WHERE shop_id = $1 AND event_type LIKE '$%'", shop.shop_id
    )
    assert stored == 0  # identity messages are not events


async def _count(fetch: Any, n: int) -> bool:
    return len(await fetch()) >= n


def test_a_remembered_chain_gives_the_fields_its_parse_gives() -> None:
    from ingest.collector import posthog

    chain = 'button.buy.primary:nth-child="1"text="Buy now";div:attr__id="main"'
    for properties in (
        {"$elements_chain": chain},
        {"$elements_chain": chain + ";" + "span:" * 600},  # too long to remember
        {"$elements": [{"tag_name": "a", "attr__id": "next", "$el_text": "Next"}]},
    ):
        once = posthog._autocaptured(properties)
        assert once == posthog._element_fields(posthog._elements(properties))
        assert posthog._autocaptured(properties) == once  # and again, remembered or not
    assert posthog._autocaptured({"$elements_chain": chain})["element_path"] == (
        "div#main > button.buy.primary"
    )


def test_an_odd_event_type_or_time_is_an_answer_not_a_crash() -> None:
    """A ``$event_type`` that is a list, and a time whose UTC day is out of range, crashed
    the mapping (a 500 for the whole batch): the first is an event like any unknown
    kind, the second a refused event with its reason."""
    from datetime import UTC, datetime

    from ingest.collector import app as collector
    from ingest.collector.models import StorefrontEvent
    from ingest.core.shops import Shop

    shop = Shop(uuid.uuid4(), "odd.example", None)
    now = datetime.now(UTC)
    page = {"distinct_id": "d", "$current_url": "https://shop.test/"}
    odd = {"event": "$autocapture", "properties": {**page, "$event_type": ["click"]}}
    event = capture_api.to_event(shop, odd, None, now)
    assert isinstance(event, StorefrontEvent) and event.event_type == "$autocapture"
    year_one = datetime(1, 1, 1, tzinfo=UTC)
    for raw, sent_at in (
        ({"event": "$pageview", "timestamp": "0001-01-01T00:00:00+05:00"}, None),
        ({"event": "$pageview", "timestamp": "9999-12-31T23:59:59-05:00"}, None),
        ({"event": "$pageview", "offset": 1000}, year_one),
    ):
        with pytest.raises(collector.EventRejected, match="timestamp: out of range"):
            capture_api.to_event(shop, {**raw, "properties": page}, sent_at, now)
