"""Segment's analytics.js (``@segment/analytics-next``, its UMD bundle from npm) in
headless Chromium, pointed at the collector exactly as the README's "Use an SDK
you already have" shows: ``AnalyticsBrowser.load({writeKey, cdnURL: COLLECTOR})``.

The library's files (``dist/umd``: ``index.js`` and the chunks it may load
lazily) are served from the shop's own origin under ``/analytics-next/bundles/``,
the path the bundle loads its chunks from below its CDN (``window.analytics._cdn``,
Segment's documented way of self-hosting it); its settings come from the
collector's ``/v1/projects/<writeKey>/settings``. Every request the page makes is
recorded: none may leave 127.0.0.1, and the page's console must stay free of
errors.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import orjson
import pytest
from aiohttp import web

from consumers.loader import Loader
from consumers.rows import STOREFRONT
from ingest.core.db import Database
from ingest.core.settings import Settings
from ingest.core.shops import ShopCredentials
from ingest.partitions import PartitionManager
from tests.conftest import wait_for
from tests.helpers import npm_package, serve_pages

pytestmark = pytest.mark.slow

PACKAGE = "@segment/analytics-next@1.84.3"
BUNDLES = "/analytics-next/bundles"  # below the CDN: where the UMD bundle loads its chunks


@pytest.fixture
def settings(settings: Settings) -> Settings:
    """Headless Chromium's user agent is a bot's to the collector (bot_policy drop by
    default): these tests keep its events, as a shop would set bot_policy keep."""
    return settings.model_copy(update={"bot_policy": "keep"})


@pytest.fixture(scope="module")
def umd() -> Path:
    """The package's ``dist/umd`` folder (installed from npm once, cached)."""
    folder = npm_package(PACKAGE)
    if isinstance(folder, str):
        pytest.skip(folder)
    return folder / "dist" / "umd"


def _files(umd: Path) -> dict[str, Path]:
    # Every script of dist/umd: index.js and the chunks it may import lazily.
    return {f"{BUNDLES}/{file.name}": file for file in umd.glob("*.js")}


def _page(collector: str, write_key: str, options: str = "{}") -> str:
    """A shop's page with analytics.js loaded as the README shows (the UMD bundle
    self-hosted: ``_cdn`` set before it loads, ``cdnURL`` the collector)."""
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>Shop</title>
<link rel="icon" href="data:,">
<script>window.analytics = {{_cdn: location.origin}};</script>
<script src="{BUNDLES}/index.js"></script>
<script>
  window.ajs = AnalyticsNext.AnalyticsBrowser.load(
    {{writeKey: "{write_key}", cdnURL: "{collector}"}}, {options});
</script>
</head><body><h1>Shop</h1></body></html>"""


@dataclass
class Watched:
    """What a browser context did: every request's URL, console errors, page errors."""

    requests: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    failed: list[tuple[int, str]] = field(default_factory=list)

    def watch(self, context: Any) -> None:
        context.on("request", lambda r: self.requests.append(r.url))
        context.on(
            "response",
            lambda r: self.failed.append((r.status, r.url)) if r.status >= 400 else None,
        )
        context.on(
            "console",
            lambda m: (
                self.errors.append(f"{m.text} ({m.location.get('url')})")
                if m.type in ("error", "warning")
                else None
            ),
        )

    def page(self, page: Any) -> None:
        page.on("pageerror", lambda e: self.errors.append(str(e)))

    def offsite(self) -> list[str]:
        return [u for u in self.requests if urlsplit(u).hostname != "127.0.0.1"]


@pytest.fixture
async def loader(settings: Settings, db: Database) -> AsyncIterator[Loader]:
    """The storefront loader (events and identities), in-process."""
    async with Loader(settings, STOREFRONT, db, PartitionManager(db)) as running:
        yield running


async def _events(db: Database, shop: ShopCredentials) -> list[dict[str, Any]]:
    rows = await db.pool.fetch(
        "SELECT event_id::text, anon_id, session_id, event_type, ts, props, product_id, user_id"
        " FROM events WHERE shop_id = $1 ORDER BY ts, event_type",
        shop.shop_id,
    )
    return [{**dict(r), "props": orjson.loads(r["props"])} for r in rows]


async def _settled(db: Database, shop: ShopCredentials, n: int) -> list[dict[str, Any]]:
    """The shop's events once ``n`` landed, and a moment more (for a duplicate to show)."""

    async def enough() -> bool:
        return len(await _events(db, shop)) >= n

    await wait_for(enough)
    await asyncio.sleep(0.5)
    return await _events(db, shop)


async def _identities(db: Database, shop: ShopCredentials) -> list[dict[str, Any]]:
    rows = await db.pool.fetch(
        "SELECT anon_id, user_id, traits FROM identities WHERE shop_id = $1", shop.shop_id
    )
    return [{**dict(r), "traits": orjson.loads(r["traits"])} for r in rows]


async def _visit(browser: Any, url: str, watched: Watched, calls: list[str]) -> str:
    """One visitor: each of ``calls`` (JavaScript on ``ajs``) on ``url``, each awaited
    (analytics-next resolves a call once its delivery ended); returns the visitor's
    anonymous id."""
    context = await browser.new_context()
    watched.watch(context)
    try:
        page = await context.new_page()
        watched.page(page)
        anon = ""
        for n, call in enumerate(calls):
            if call == "reload":
                await page.reload()
                continue
            if n == 0:
                await page.goto(url)
            await page.evaluate(f"async () => {{ await {call}; }}")
            anon = await page.evaluate("async () => (await window.ajs.user()).anonymousId()")
        await page.close()
        return str(anon)
    finally:
        await context.close()


async def test_page_track_identify_are_rows_and_one_session_per_visit(
    browser: Any, umd: Path, collector: str, loader: Loader, db: Database, shop: ShopCredentials
) -> None:
    watched = Watched()
    async with serve_pages({"/shop": _page(collector, shop.write_key)}, _files(umd)) as site:
        url = f"{site}/shop"
        ada = await _visit(
            browser,
            url,
            watched,
            [
                'ajs.page("Shop", "Home", {path: "/shop"})',
                'ajs.track("Product Viewed", {product_id: "sku-1", price: 9.5})',
                'ajs.identify("user-42", {email: "ada@example.com", plan: "pro"})',
                "reload",  # the next page of the visit: same anonymous id, same user
                'ajs.page("Shop", "Cart")',
                'ajs.track("Order Completed", {order_id: "o-1", total: 19})',
            ],
        )
        bob = await _visit(browser, url, watched, ['ajs.track("Product Viewed", {product_id: 2})'])

    async def identified() -> bool:
        return len(await _identities(db, shop)) >= 1

    events = await _settled(db, shop, 5)
    await wait_for(identified)
    assert len(events) == 5, events  # the identify is no event (it builds identities)
    ada_events = [e for e in events if e["anon_id"] == ada]
    assert [e["event_type"] for e in ada_events] == [
        "page_view",
        "Product Viewed",
        "page_view",
        "Order Completed",
    ]
    first, viewed, cart, order = ada_events
    # One visit, one session (no context.sessionId from analytics.js: the visitor and the day).
    assert {e["session_id"] for e in ada_events} == {f"{ada}/{first['ts'].date().isoformat()}"}
    assert first["props"]["$name"] == "Home"
    assert first["props"]["$context"]["page"]["url"] == url
    assert first["props"]["$context"]["library"]["name"] == "analytics.js"
    assert first["props"]["$message_id"].startswith("ajs-next-")
    assert viewed["product_id"] == "sku-1"
    assert viewed["props"]["price"] == 9.5
    assert (first["user_id"], viewed["user_id"]) == (None, None)
    assert (cart["user_id"], order["user_id"]) == ("user-42", "user-42")  # known after identify
    assert cart["props"]["$name"] == "Cart"
    assert order["props"]["total"] == 19
    (other,) = [e for e in events if e["anon_id"] == bob]
    assert bob != ada
    assert other["session_id"] != first["session_id"]
    assert other["product_id"] == "2"
    (identity,) = await _identities(db, shop)
    assert (identity["anon_id"], identity["user_id"]) == (ada, "user-42")
    assert identity["traits"] == {"email": "ada@example.com", "plan": "pro"}
    assert watched.offsite() == [], "nothing fetched from outside 127.0.0.1"
    assert any("/v1/projects/" in u and u.startswith(collector) for u in watched.requests)
    assert watched.failed == []
    assert watched.errors == [], "no console errors from the library against the collector"


@dataclass
class Gate:
    """A proxy in front of the collector (the Host header kept, as a reverse proxy
    does). The first batch posted goes through, but its answer is replaced by a 503
    with Retry-After (as when a proxy's upstream timeout fires after the collector
    took the batch): the SDK must retry a batch already stored. Records each
    batch's messageIds, the collector's status and the status the SDK got."""

    url: str = ""
    failures: int = 1
    posts: list[tuple[int, int, list[str]]] = field(default_factory=list)


@pytest.fixture
async def gate(collector: str) -> AsyncIterator[Gate]:
    state = Gate()
    http = aiohttp.ClientSession(auto_decompress=False)

    async def forward(request: web.Request) -> web.Response:
        body = await request.read()
        async with http.request(
            request.method,
            collector + request.path_qs,
            data=body,
            headers={k: v for k, v in request.headers.items() if k.lower() != "content-length"},
        ) as resp:
            answer = await resp.read()
            status = resp.status
            headers = {
                k: v
                for k, v in resp.headers.items()
                if k.lower() not in ("content-length", "transfer-encoding", "connection")
            }
        if request.method != "POST":
            return web.Response(body=answer, status=status, headers=headers)
        try:
            ids = [m.get("messageId") for m in json.loads(body)["batch"]]
        except (ValueError, KeyError, TypeError, AttributeError):
            ids = []
        if state.failures > 0:
            state.failures -= 1
            state.posts.append((status, 503, ids))
            return web.json_response(
                {"error": "upstream timeout"},
                status=503,
                headers={
                    "Access-Control-Allow-Origin": request.headers.get("Origin", "*"),
                    "Retry-After": "1",
                },
            )
        state.posts.append((status, status, ids))
        return web.Response(body=answer, status=status, headers=headers)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", forward)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    state.url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    try:
        yield state
    finally:
        await runner.cleanup()
        await http.close()


# analytics.js's batching delivery: up to 10 messages a POST to /v1/b, after 300 ms.
BATCHING = (
    '{integrations: {"Segment.io": {deliveryStrategy: '
    '{strategy: "batching", config: {size: 10, timeout: 300}}}}}'
)


async def test_a_batch_refused_with_503_is_retried_and_stored_once(
    browser: Any, umd: Path, gate: Gate, loader: Loader, db: Database, shop: ShopCredentials
) -> None:
    """analytics.js's batching delivery (``/v1/b``) gets a 503 for its first batch
    (which the collector had stored), retries it after its backoff, and each message
    is one row (its messageId is its event id)."""
    watched = Watched()
    page_html = _page(gate.url, shop.write_key, BATCHING)
    async with serve_pages({"/shop": page_html}, _files(umd)) as site:
        context = await browser.new_context()
        watched.watch(context)
        try:
            page = await context.new_page()
            watched.page(page)
            await page.goto(f"{site}/shop")
            await page.evaluate(
                """async () => { await Promise.all([
                    ajs.page("Shop", "Home"),
                    ajs.track("Product Viewed", {product_id: "sku-1"}),
                    ajs.track("Product Added", {product_id: "sku-1"}),
                ]); }"""
            )

            async def delivered() -> bool:
                return any(answered == 200 for _, answered, _ in gate.posts)

            await wait_for(delivered)
            await page.close()
        finally:
            await context.close()
    stored, answered, first = gate.posts[0]
    assert (stored, answered) == (200, 503), gate.posts  # taken, but the SDK saw a 503
    refused = set(first)
    assert len(refused) == 3, gate.posts
    again = {i for _, answered, ids in gate.posts[1:] if answered == 200 for i in ids}
    assert refused <= again, "the SDK sent the refused batch again"

    events = await _settled(db, shop, 3)
    ids = sorted(e["props"]["$message_id"] for e in events)
    assert ids == sorted(refused), "each message of the retried batch is one row"
    assert watched.offsite() == []
    # The one 503 is Chromium's own resource error line; nothing else.
    assert [e for e in watched.errors if "503" not in e] == [], watched.errors
