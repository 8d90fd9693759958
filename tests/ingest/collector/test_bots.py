"""Bots (issue 23): crawlers, headless browsers and monitors dropped, flagged or kept by
``bot_policy`` on every ingest route; HTTP libraries, SDKs and curl always land."""

from __future__ import annotations

import asyncio
import base64
import json
import random
import re
import string
import uuid
from typing import Any

import aiohttp
import orjson
import pytest
import requests
from crawlerdetect import CrawlerDetect
from crawlerdetect.providers.crawlers import data as crawler_list
from posthog.request import USER_AGENT as POSTHOG_AGENT
from prometheus_client import REGISTRY
from segment.analytics.version import VERSION as SEGMENT_VERSION

from consumers.loader import Loader
from consumers.rows import BEHAVIOR, STOREFRONT
from ingest.collector import bots
from ingest.collector.server import serving
from ingest.core.db import Database
from ingest.core.settings import Settings
from ingest.core.shops import ShopCredentials
from ingest.partitions import PartitionManager
from tests.conftest import wait_for
from tests.helpers import topic_events

CHROME = (
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/120.0.0.0 Safari/537.36"
)
HEADLESS = (
    "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) "
    "HeadlessChrome/120.0.0.0 Safari/537.36"
)
BOTS = {
    "headless": HEADLESS,
    "phantomjs": "Mozilla/5.0 (Unknown; Linux x86_64) AppleWebKit/538.1 (KHTML, like Gecko) "
    "PhantomJS/2.1.1 Safari/538.1",
    "lighthouse": "Mozilla/5.0 (Linux; Android 11; moto g power (2022)) AppleWebKit/537.36 "
    "(KHTML, like Gecko) Chrome/119.0.0.0 Mobile Safari/537.36 Chrome-Lighthouse",
    "googlebot": "Mozilla/5.0 AppleWebKit/537.36 (KHTML, like Gecko; compatible; Googlebot/2.1;"
    " +http://www.google.com/bot.html) Chrome/120.0.0.0 Safari/537.36",
    "uptimerobot": "Mozilla/5.0+(compatible; UptimeRobot/2.0; http://www.uptimerobot.com/)",
    "pingdom": "Pingdom.com_bot_version_1.4_(http://www.pingdom.com/)",
}
# What server-side SDKs, scripts and curl send: never bots. The SDKs' own strings are
# read from the installed packages (snowplow-tracker sends as python-requests).
LIBRARIES = {
    "python-requests": requests.utils.default_user_agent(),
    "segment-analytics-python": f"analytics-python/{SEGMENT_VERSION}",
    "posthog-python": POSTHOG_AGENT,
    "curl": "curl/8.14.1",
    "aiohttp": "Python/3.11 aiohttp/3.12.0",
    "urllib": "Python-urllib/3.11",
    "httpx": "python-httpx/0.28.1",
    "wget": "Wget/1.25.0",
    "node-fetch": "node-fetch/1.0 (+https://github.com/bitinn/node-fetch)",
    "undici": "undici",
    "axios": "axios/1.7.9",
    "go": "Go-http-client/1.1",
    "java": "Java/21.0.5",
    "okhttp": "okhttp/4.12.0",
    "browser": CHROME,
    "iphone": "Mozilla/5.0 (iPhone; CPU iPhone OS 17_0 like Mac OS X) AppleWebKit/605.1.15 "
    "(KHTML, like Gecko) Version/17.0 Mobile/15E148 Safari/604.1",
}


@pytest.mark.parametrize("name", sorted(BOTS))
def test_clients_that_run_pages_are_bots(name: str) -> None:
    assert bots.reason(BOTS[name]) == bots.CRAWLER, name


@pytest.mark.parametrize("name", sorted(LIBRARIES))
def test_http_libraries_sdks_and_curl_are_not_bots(name: str) -> None:
    assert bots.reason(LIBRARIES[name]) is None, (name, bots.crawler(LIBRARIES[name]))


def test_the_carve_out_is_what_lets_libraries_through() -> None:
    """crawlerdetect itself names these libraries (so the carve-out is needed), and every
    entry of HTTP_LIBRARIES is still in its list (a release renaming one would flag that
    library again: this test says which)."""
    detect = CrawlerDetect()
    for name in ("python-requests", "curl", "aiohttp", "urllib", "go", "java", "okhttp"):
        assert detect.isCrawler(LIBRARIES[name]), name
    assert sorted(bots.HTTP_LIBRARIES - set(crawler_list)) == []


def test_the_screen_answers_as_crawlerdetect_does() -> None:
    """bots' automaton (literals, the catch-all's words, each regex entry's fixed start
    confirmed by its regex) against crawlerdetect's own regex: the same verdict on an
    agent made of each literal entry, on browsers, and on noise (agents opening with an
    HTTP library left out: those differ on purpose)."""
    meta = re.compile(r"(?<!\\)[\^$.*+?()\[\]{}|]")
    corpus = [*BOTS.values(), CHROME, LIBRARIES["iphone"]]
    for entry in crawler_list:
        if entry not in bots.HTTP_LIBRARIES and not meta.search(entry):
            text = re.sub(r"\\(.)", r"\1", entry)
            corpus += [text, f"Mozilla/5.0 (compatible; {text}/2.1; +http://example.com)"]
    noise = random.Random(7)
    alphabet = string.ascii_letters + string.digits + " /;()._-"
    corpus += ["".join(noise.choices(alphabet, k=noise.randint(5, 300))) for _ in range(3000)]
    detect = CrawlerDetect()
    differ = [
        agent
        for agent in corpus
        if (bots.crawler(agent) is not None) != detect.is_crawler(agent)
        and not bots.HTTP_LIBRARY_TOKEN.search(agent)
    ]
    assert differ == []
    assert bots.crawler("Mozilla/5.0 (compatible; YandexSearch/1.0)") is None  # a lookahead
    assert bots.crawler("Mozilla/5.0 (compatible; Yandex/1.0)") is not None


def test_a_shops_deny_list_is_case_insensitive_substrings() -> None:
    agent = "Mozilla/5.0 (compatible; Acme-Monitor/3.1)"
    assert bots.reason(agent) is None
    assert bots.reason(agent, ("acme-monitor",)) == bots.DENY_LIST
    assert bots.reason(agent, ("other",)) is None
    assert bots.reason(None, ("acme",)) is None


def _dropped(reason: str) -> float:
    return (
        REGISTRY.get_sample_value("eventpipe_bot_requests_dropped_total", {"reason": reason}) or 0
    )


async def _set(db: Database, shop: ShopCredentials, **values: Any) -> None:
    await db.pool.execute(
        "UPDATE shops SET settings = settings || $2::jsonb WHERE id = $1",
        shop.shop_id,
        json.dumps(values),
    )


def _requests(key: str, marker: str) -> dict[str, tuple[str, dict[str, str], bytes]]:
    """One request per ingest route, each carrying ``marker`` in its event: (path,
    headers, body). Its session (hence its Kafka key and partition) is the marker's."""
    basic = "Basic " + base64.b64encode(f"{key}:".encode()).decode()
    session = f"s-{marker}"
    return {
        "behavior": (
            f"/v1/behavior?k={key}",
            {},
            orjson.dumps(
                [
                    {
                        "event_type": "click",
                        "session_id": session,
                        "page_url": "https://shop.test/",
                        "event_data": {"marker": marker},
                    }
                ]
            ),
        ),
        "storefront": (
            f"/v1/storefront?k={key}",
            {},
            orjson.dumps(
                [
                    {
                        "event_type": "product_view",
                        "session_id": session,
                        "anon_id": session,
                        "props": {"marker": marker},
                    }
                ]
            ),
        ),
        "segment": (
            "/v1/batch",
            {"Authorization": basic, "Content-Type": "application/json"},
            orjson.dumps(
                {
                    "batch": [
                        {
                            "type": "track",
                            "event": "Viewed",
                            "anonymousId": session,
                            "context": {"sessionId": session},
                            "properties": {"marker": marker},
                        }
                    ]
                }
            ),
        ),
        "snowplow": (
            "/com.snowplowanalytics.snowplow/tp2",
            {"Content-Type": "application/json"},
            orjson.dumps(
                {
                    "schema": "iglu:com.snowplowanalytics.snowplow/payload_data/jsonschema/1-0-4",
                    "data": [
                        {
                            "e": "se",
                            "se_ca": "c",
                            "se_ac": "a",
                            "se_la": marker,
                            "aid": key,
                            "duid": session,
                            "sid": str(uuid.uuid5(uuid.NAMESPACE_URL, marker)),
                        }
                    ],
                }
            ),
        ),
        "posthog": (
            "/batch/",
            {"Content-Type": "application/json"},
            orjson.dumps(
                {
                    "api_key": key,
                    "batch": [
                        {
                            "event": "signup",
                            "distinct_id": session,
                            "properties": {"$session_id": session, "marker": marker},
                        }
                    ],
                }
            ),
        ),
    }


def _control(key: str, marker: str, route: str) -> tuple[str, dict[str, str], bytes]:
    """``_requests(key, marker)[route]`` with its marker ``ok-<marker>``, its session kept."""
    path, headers, body = _requests(key, marker)[route]
    for field in (b'"marker":"', b'"se_la":"'):
        body = body.replace(field, field + b"ok-")
    return path, headers, body


async def _post(
    http: aiohttp.ClientSession, base: str, request: tuple[str, dict[str, str], bytes], agent: str
) -> dict[str, Any]:
    path, headers, body = request
    async with http.post(base + path, data=body, headers={**headers, "User-Agent": agent}) as r:
        assert r.status == 200, (path, r.status, await r.text())
        answer: dict[str, Any] = await r.json(content_type=None)
        return answer


def _marked(events: list[dict[str, Any]], marker: str) -> list[dict[str, Any]]:
    return [e for e in events if marker in orjson.dumps(e).decode()]


async def test_bots_are_dropped_on_every_ingest_route_by_default(
    collector: str, settings: Settings, shop: ShopCredentials
) -> None:
    """The same request from HeadlessChrome: 200 and not in the topic; from Chrome: in it
    (after the bot's, on the same Kafka key: its absence is no timing accident)."""
    assert settings.bot_policy == "drop"
    before = _dropped(bots.CRAWLER)
    async with aiohttp.ClientSession() as http:
        for route in _requests(shop.write_key, "x"):
            bot = f"bot-{uuid.uuid4().hex}"
            answer = await _post(http, collector, _requests(shop.write_key, bot)[route], HEADLESS)
            assert "not stored: the client is a bot" in orjson.dumps(answer).decode(), answer
            # The control: the same request (same session: same Kafka key and partition)
            # from a browser, its marker "ok-<bot>".
            await _post(http, collector, _control(shop.write_key, bot, route), CHROME)
            topic = settings.topic_behavior if route == "behavior" else settings.topic_storefront
            events = await topic_events(
                settings, topic, lambda events, b=bot: bool(_marked(events, f"ok-{b}"))
            )
            [only] = _marked(events, bot)
            assert f"ok-{bot}" in orjson.dumps(only).decode(), route
    assert _dropped(bots.CRAWLER) - before == 5


async def test_curl_and_python_requests_land(
    collector: str, settings: Settings, shop: ShopCredentials
) -> None:
    """The curl that `eventpipe up` prints (curl's own User-Agent), and a script."""
    marker = f"curl-{uuid.uuid4().hex}"
    body = json.dumps(
        [{"event_type": "click", "session_id": marker, "page_url": "https://shop.test/"}]
    )
    process = await asyncio.create_subprocess_exec(
        "curl",
        "-sS",
        "-X",
        "POST",
        f"{collector}/v1/behavior?k={shop.write_key}",
        "-H",
        "Content-Type: application/json",
        "-d",
        body,
        stdout=asyncio.subprocess.PIPE,
    )
    out, _ = await process.communicate()
    assert json.loads(out) == {"accepted": 1, "rejected": []}
    answer = await asyncio.to_thread(
        requests.post,
        f"{collector}/v1/behavior?k={shop.write_key}",
        json=[{"event_type": "click", "session_id": marker, "page_url": "https://shop.test/"}],
        timeout=10,
    )
    assert answer.json() == {"accepted": 1, "rejected": []}
    events = await topic_events(
        settings, settings.topic_behavior, lambda events: len(_marked(events, marker)) == 2
    )
    assert len(_marked(events, marker)) == 2


async def test_flag_stores_bots_marked_and_keep_as_they_are(
    collector: str, settings: Settings, db: Database, shop: ShopCredentials
) -> None:
    """bot_policy flag: metadata.bot / props.bot true in the rows; a browser's rows carry
    no bot key. Then keep: the bot's rows as anyone's."""
    await _set(db, shop, bot_policy="flag")
    flagged, person = f"flag-{uuid.uuid4().hex}", f"person-{uuid.uuid4().hex}"
    async with aiohttp.ClientSession() as http:
        for marker, agent in ((flagged, HEADLESS), (person, CHROME)):
            for route in ("behavior", "storefront"):
                answer = await _post(
                    http, collector, _requests(shop.write_key, marker)[route], agent
                )
                assert answer == {"accepted": 1, "rejected": []}
    async with (
        Loader(settings, BEHAVIOR, db, PartitionManager(db)),
        Loader(settings, STOREFRONT, db, PartitionManager(db)),
    ):

        async def landed() -> bool:
            a = await db.pool.fetchval(
                "SELECT count(*) FROM behavior_events WHERE shop_id = $1", shop.shop_id
            )
            b = await db.pool.fetchval(
                "SELECT count(*) FROM events WHERE shop_id = $1", shop.shop_id
            )
            return bool(a == 2 and b == 2)

        await wait_for(landed)
    rows = await db.pool.fetch(
        "SELECT session_id, metadata::text AS extra FROM behavior_events WHERE shop_id = $1 "
        "UNION ALL SELECT session_id, props::text FROM events WHERE shop_id = $1",
        shop.shop_id,
    )
    extras = [(r["session_id"], json.loads(r["extra"])) for r in rows]
    assert sorted(e.get("bot") for s, e in extras if s == f"s-{flagged}") == [True, True]
    assert [e for s, e in extras if s == f"s-{person}" and "bot" in e] == []


async def test_the_global_default_and_the_shops_override(
    settings: Settings, db: Database, shop: ShopCredentials
) -> None:
    """Collector default keep: a bot lands, unflagged. The shop's drop wins over it, and
    its deny list names a bot the crawler list does not (counted as deny_list)."""
    keeping = settings.model_copy(update={"bot_policy": "keep"})
    kept, denied = f"kept-{uuid.uuid4().hex}", f"denied-{uuid.uuid4().hex}"
    monitor = "Mozilla/5.0 (compatible; Acme-Monitor/3.1)"
    async with (
        serving(keeping, db, key_cache_s=0) as (server, _),
        aiohttp.ClientSession() as http,
    ):
        answer = await _post(
            http, server.url, _requests(shop.write_key, kept)["behavior"], HEADLESS
        )
        assert answer == {"accepted": 1, "rejected": []}
        await _set(db, shop, bot_policy="drop", bot_deny_list=["ACME-monitor"])
        before = _dropped(bots.DENY_LIST)
        answer = await _post(
            http, server.url, _requests(shop.write_key, denied)["behavior"], monitor
        )
        assert "dropped" in answer
        assert _dropped(bots.DENY_LIST) - before == 1
        await _post(http, server.url, _control(shop.write_key, denied, "behavior"), CHROME)
    events = await topic_events(
        settings, settings.topic_behavior, lambda events: bool(_marked(events, f"ok-{denied}"))
    )
    [bot] = _marked(events, kept)
    assert "bot" not in bot["metadata"]
    assert len(_marked(events, denied)) == 1


async def test_webhooks_are_never_screened(settings: Settings, shop: ShopCredentials) -> None:
    """Shopify's webhooks come server to server: no bot_policy applies (a bot-looking
    agent on one is still stored)."""
    import hashlib
    import hmac

    payload = orjson.dumps({"id": 1, "total_price": "1.00"})
    signature = base64.b64encode(
        hmac.new(shop.webhook_secret.encode(), payload, hashlib.sha256).digest()
    ).decode()
    headers = {
        "X-Shopify-Shop-Domain": shop.domain,
        "X-Shopify-Topic": "orders/create",
        "X-Shopify-Webhook-Id": str(uuid.uuid4()),
        "X-Shopify-Hmac-Sha256": signature,
        "User-Agent": "Shopify-Captain-Hook bot",
        "Content-Type": "application/json",
    }
    async with (
        Database(settings.dsn) as database,
        serving(settings, database, key_cache_s=0) as (server, _),
        aiohttp.ClientSession() as http,
        http.post(server.url + "/v1/webhooks/shopify", data=payload, headers=headers) as answer,
    ):
        assert answer.status == 200 and (await answer.json())["accepted"] == 1
