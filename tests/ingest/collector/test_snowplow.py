"""Snowplow's tracker protocol, driven by the real snowplow-tracker (PyPI)."""

from __future__ import annotations

import asyncio
import base64
import uuid
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import orjson
import pytest
from snowplow_tracker.emitters import Emitter
from snowplow_tracker.events.page_ping import PagePing
from snowplow_tracker.events.page_view import PageView
from snowplow_tracker.events.self_describing import SelfDescribing
from snowplow_tracker.events.structured_event import StructuredEvent
from snowplow_tracker.self_describing_json import SelfDescribingJson
from snowplow_tracker.subject import Subject
from snowplow_tracker.tracker import Tracker

from ingest.collector import snowplow
from ingest.core import metrics
from ingest.core.db import Database
from ingest.core.settings import Settings
from ingest.core.shops import ShopCredentials
from tests.conftest import wait_for
from tests.helpers import both_loaders

LINK_CLICK = "iglu:com.snowplowanalytics.snowplow/link_click/jsonschema/1-0-1"
CUSTOM = "iglu:com.example/add_to_cart/jsonschema/1-0-0"


async def _rows(db: Database, shop: ShopCredentials) -> list[dict[str, Any]]:
    behavior = await db.pool.fetch(
        "SELECT event_id::text, event_type, session_id, page_url, element_path, element_type, "
        "element_text, event_data, viewport_size, metadata FROM behavior_events "
        "WHERE shop_id = $1",
        shop.shop_id,
    )
    storefront = await db.pool.fetch(
        "SELECT event_id::text, event_type, anon_id, session_id, props, user_id FROM events "
        "WHERE shop_id = $1",
        shop.shop_id,
    )
    return [{"table": "behavior", **r} for r in behavior] + [
        {"table": "events", **r} for r in storefront
    ]


async def _loaded(db: Database, shop: ShopCredentials, n: int) -> list[dict[str, Any]]:
    async def enough() -> bool:
        return len(await _rows(db, shop)) >= n

    try:
        await wait_for(enough)
    except AssertionError:
        dead = await db.pool.fetch("SELECT reason, error, raw FROM dead_letters")
        raise AssertionError([dict(r) for r in dead], await _rows(db, shop)) from None
    await asyncio.sleep(0.5)  # a duplicate would have landed by now
    return await _rows(db, shop)


def _tracker(collector: str, key: str, method: str, sent: list[dict[str, Any]]) -> Tracker:
    parts = urlsplit(collector)
    emitter = Emitter(
        str(parts.hostname),
        protocol="http",
        port=parts.port,
        method=method,  # type: ignore[arg-type]
        batch_size=10,
        on_success=lambda events: sent.extend(events),
    )
    subject = (
        Subject()
        .set_domain_user_id("duid-1")
        .set_domain_session_id("sess-1")
        .set_user_id("user-7")
        .set_viewport(1024, 768)
        .set_lang("de-DE")
        .set_screen_resolution(1920, 1080)
    )
    return Tracker("ns", emitter, subject=subject, app_id=key)


def _track_all(tracker: Tracker) -> None:
    tracker.track(
        PageView(page_url="https://shop.test/p/1", page_title="P1", referrer="https://r/")
    )
    tracker.track(PagePing(page_url="https://shop.test/p/1", min_x=0, max_x=0, min_y=0, max_y=900))
    tracker.track(StructuredEvent("cart", "add", label="sku-1", property_="size", value=2))
    tracker.track(
        SelfDescribing(
            SelfDescribingJson(
                LINK_CLICK,
                {
                    "targetUrl": "https://shop.test/p/2",
                    "elementId": "buy",
                    "elementClasses": ["btn", "primary"],
                    "elementContent": "Buy now",
                },
            )
        )
    )
    tracker.track(SelfDescribing(SelfDescribingJson(CUSTOM, {"sku": "sku-9", "qty": 1})))
    tracker.flush()


async def _in_thread(call: Callable[[], Any]) -> Any:
    return await asyncio.to_thread(call)  # the tracker is synchronous (requests)


@pytest.mark.parametrize("method", ["post", "get"])
async def test_the_python_tracker_events_are_rows_once(
    collector: str, settings: Settings, db: Database, shop: ShopCredentials, method: str
) -> None:
    sent: list[dict[str, Any]] = []
    tracker = _tracker(collector, shop.write_key, method, sent)
    await _in_thread(lambda: _track_all(tracker))
    assert len(sent) == 5
    async with both_loaders(settings, db):
        rows = await _loaded(db, shop, 5)
        assert len(rows) == 5, rows
        assert {r["event_id"] for r in rows} == {e["eid"] for e in sent}
        by_type = {r["event_type"]: r for r in rows}
        view = by_type["page_view"]
        assert view["table"] == "behavior"
        assert (view["session_id"], view["page_url"]) == ("sess-1", "https://shop.test/p/1")
        meta = orjson.loads(view["metadata"])
        assert meta["referrer"] == "https://r/" and meta["language"] == "de-DE"
        assert (meta["anon_id"], meta["user_id"], meta["app_id"]) == (
            "duid-1",
            "user-7",
            shop.write_key,
        )
        assert orjson.loads(view["viewport_size"]) == {"width": 1024, "height": 768}
        ping = by_type["scroll_depth"]
        assert orjson.loads(ping["event_data"])["pp_may"] == 900
        # A server tracker's link click has no page url: kept as a storefront event.
        click = by_type["link_click"]
        assert orjson.loads(click["props"])["data"]["elementId"] == "buy"
        structured = by_type["add"]
        assert (structured["table"], structured["anon_id"]) == ("events", "duid-1")
        props = orjson.loads(structured["props"])
        assert props["data"]["category"] == "cart" and props["data"]["value"] == 2.0
        assert structured["user_id"] == "user-7" and "$user_id" not in props

        # The page view (uid beside duid) made the visitor known as the user.
        async def identity() -> tuple[str, str] | None:
            row = await db.pool.fetchrow(
                "SELECT anon_id, user_id FROM identities WHERE shop_id = $1", shop.shop_id
            )
            return None if row is None else (row["anon_id"], row["user_id"])

        await wait_for(identity)
        assert await identity() == ("duid-1", "user-7")
        custom = by_type["add_to_cart"]
        assert orjson.loads(custom["props"])["$schema"] == CUSTOM
        assert orjson.loads(custom["props"])["data"] == {"sku": "sku-9", "qty": 1}

        # A tracker retries what got no 200: the same payloads again are stored once.
        async with aiohttp.ClientSession() as http:
            # As the tracker sends them: every value a string.
            again = [{k: str(v) for k, v in event.items()} for event in sent]
            body = {"schema": snowplow.POST_PATH, "data": again}
            async with http.post(collector + snowplow.POST_PATH, json=body) as answer:
                assert answer.status == 200, await answer.text()
        assert len(await _loaded(db, shop, 5)) == 5


async def test_a_link_click_with_its_page_is_a_click(
    collector: str, settings: Settings, db: Database, shop: ShopCredentials
) -> None:
    event = {
        "schema": "iglu:com.snowplowanalytics.snowplow/unstruct_event/jsonschema/1-0-0",
        "data": {
            "schema": LINK_CLICK,
            "data": {
                "targetUrl": "https://shop.test/p/2",
                "elementId": "buy",
                "elementClasses": ["btn", "primary"],
                "elementContent": "Buy now",
            },
        },
    }
    encoded = base64.urlsafe_b64encode(orjson.dumps(event)).decode().rstrip("=")
    query = {"e": "ue", "ue_px": encoded, "aid": shop.write_key, "url": "https://shop.test/"}
    async with aiohttp.ClientSession() as http, http.get(collector + "/i", params=query) as answer:
        assert answer.status == 200
    async with both_loaders(settings, db):
        (click,) = await _loaded(db, shop, 1)
        assert (click["element_path"], click["element_type"], click["element_text"]) == (
            "a#buy.btn.primary",
            "a",
            "Buy now",
        )
        assert orjson.loads(click["event_data"])["href"] == "https://shop.test/p/2"
        assert click["page_url"] == "https://shop.test/"


async def test_a_page_ping_has_the_percentage_seen(
    collector: str, settings: Settings, db: Database, shop: ShopCredentials
) -> None:
    query = {
        "e": "pp",
        "eid": "7d1c4b0c-3b44-4c2e-9a0e-0f3a3e1b5f01",
        "aid": shop.write_key,
        "url": "https://shop.test/long",
        "sid": "s-pp",
        "dtm": "1790000000000",
        "pp_miy": "0",
        "pp_may": "1232",
        "vp": "1024x768",
        "cd": "1024x4000",
    }
    async with aiohttp.ClientSession() as http, http.get(collector + "/i", params=query) as answer:
        assert answer.status == 200
        assert answer.content_type == "image/gif"
        assert answer.headers["Cache-Control"].startswith("no-store")
        assert await answer.read() == snowplow.PIXEL
    async with both_loaders(settings, db):
        (row,) = await _loaded(db, shop, 1)
        assert orjson.loads(row["event_data"])["percentage"] == 50  # (1232 + 768) / 4000


async def test_an_unknown_app_id_is_refused_and_a_pixel_still_gets_its_gif(
    collector: str, shop: ShopCredentials, db: Database
) -> None:
    event = {"e": "pv", "aid": "not-a-key", "url": "https://x/", "eid": "bad"}
    before = metrics.EVENTS_REJECTED.labels(snowplow.KIND, "pixel_refused")._value.get()
    async with aiohttp.ClientSession() as http:
        body = {"schema": "x", "data": [event]}
        async with http.post(collector + snowplow.POST_PATH, json=body) as answer:
            assert answer.status == 401
            assert "appId" in (await answer.json())["error"]
        async with http.get(collector + "/i", params=event) as answer:
            assert answer.status == 200 and await answer.read() == snowplow.PIXEL
        # Wrong types in payload_data: a 400 with the reason, never a 5xx.
        bad = {"schema": "x", "data": [{"e": 1, "aid": shop.write_key}]}
        async with http.post(collector + snowplow.POST_PATH, json=bad) as answer:
            assert answer.status == 400
            assert "must be a string" in (await answer.json())["rejected"][0]["reason"]
    after = metrics.EVENTS_REJECTED.labels(snowplow.KIND, "pixel_refused")._value.get()
    assert after == before + 1


async def test_the_path_alias_serves_tp2_and_the_pixel(
    settings: Settings, shop: ShopCredentials
) -> None:
    from ingest.collector.server import serving

    aliased = settings.model_copy(update={"snowplow_path_alias": "/t/p"})
    event = {"e": "se", "se_ca": "c", "se_ac": "a", "aid": shop.write_key, "duid": "d"}
    async with (
        Database(settings.dsn) as database,
        serving(aliased, database, key_cache_s=0.5) as (server, _),
        aiohttp.ClientSession() as http,
    ):
        async with http.post(server.url + "/t/p", json={"schema": "x", "data": [event]}) as answer:
            assert answer.status == 200 and (await answer.json())["accepted"] == 1
        async with http.get(server.url + "/t/p", params=event) as answer:
            assert answer.content_type == "image/gif"


@pytest.mark.parametrize("path", ["fast", "reference"])
async def test_events_of_one_shop_and_send_time_under_several_app_ids_or_stm_texts_all_land(
    path: str, collector: str, settings: Settings, db: Database, shop: ShopCredentials
) -> None:
    # A shop has two live write keys while it rotates them; "" and "x" are both no
    # send time. Events grouped apart by (app id, stm) but delivered by (shop, time)
    # were once merged by replacing one group with the other: accepted, and lost.
    second = f"wk_{uuid.uuid4().hex}"
    await db.pool.execute(
        "INSERT INTO shop_write_keys (write_key, shop_id) VALUES ($1, $2)", second, shop.shop_id
    )
    sends = [(shop.write_key, ""), (shop.write_key, "x"), (second, "")]
    sends += [(shop.write_key, "1790000000000"), (second, "1790000000000")]
    extra = {} if path == "fast" else {"zz_unknown": "1"}  # a field no tracker sends
    events = [
        {
            "e": "pv",
            "eid": str(uuid.uuid4()),
            "aid": aid,
            "stm": stm,
            "url": "https://x/",
            "sid": "s-keys",
            "duid": "d-keys",
            "dtm": "1790000000000",
            **extra,
        }
        for aid, stm in sends
    ]
    async with aiohttp.ClientSession() as http:
        body = {"schema": "x", "data": events}
        async with http.post(collector + snowplow.POST_PATH, json=body) as answer:
            assert answer.status == 200
            assert await answer.json() == {"accepted": 5, "rejected": []}
    async with both_loaders(settings, db):
        rows = await _loaded(db, shop, 5)
    assert sorted(r["event_id"] for r in rows) == sorted(e["eid"] for e in events)
