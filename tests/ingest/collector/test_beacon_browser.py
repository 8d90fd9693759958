"""The beacon end to end: headless Chromium -> collector -> Kafka -> loader -> PostgreSQL.

Chromium is the ``browser`` fixture of ``tests/conftest.py`` (Debian's package,
installed on demand, driven by Playwright).

A test page is served from a second aiohttp server on 127.0.0.1 (another port
than the collector: cross-origin, as on a real shop), with the README's snippet.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest
from aiohttp import web

from consumers.loader import Loader
from consumers.rows import BEHAVIOR
from ingest.core.db import Database
from ingest.core.settings import Settings
from ingest.core.shops import ShopCredentials
from ingest.partitions import PartitionManager
from tests.conftest import wait_for
from tests.helpers import behavior_rows, of_type

pytestmark = pytest.mark.slow

VIEWPORT = {"width": 1024, "height": 700}


@pytest.fixture
def settings(settings: Settings) -> Settings:
    """Headless Chromium's user agent is a bot's to the collector (bot_policy drop by
    default): these tests keep its events, as a shop would set bot_policy keep."""
    return settings.model_copy(update={"bot_policy": "keep"})


def _page(collector: str, write_key: str, title: str, body: str, options: str = "") -> str:
    snippet = (
        f'<script src="{collector}/v1/beacon.js" data-write-key="{write_key}"{options} async>'
        "</script>"
    )
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{title}</title>"
        f"{snippet}</head><body>{body}</body></html>"
    )


PAGE_1 = """
<div id="main">
  <button id="buy" class="buy primary">Buy now</button>
  <form id="checkout" action="/thanks">
    <input id="email" name="email" type="email"> <button type="submit">Order</button>
  </form>
  <div style="height: 4000px">a long page</div>
  <a id="next" href="/page2">Next page</a>
</div>
<script>addEventListener("scroll", () => { window.scrolled = true; }, {passive: true});</script>
"""
PAGE_2 = '<div id="main"><h1>Page two</h1><button id="ok">OK</button></div>'


@dataclass
class Site:
    """The test shop's pages, on their own origin."""

    url: str


@pytest.fixture
async def site(collector: str, shop: ShopCredentials) -> AsyncIterator[Site]:
    """Page 1 (button, form, long page, link), page 2, and ``/dnt`` pages with the snippet."""

    def html(title: str, body: str, options: str = "") -> web.Response:
        return web.Response(
            text=_page(collector, shop.write_key, title, body, options), content_type="text/html"
        )

    async def page1(request: web.Request) -> web.Response:
        return html("Page one", PAGE_1, ' data-flush-interval="60000"')

    async def page2(request: web.Request) -> web.Response:
        return html("Page two", PAGE_2, ' data-flush-interval="60000"')

    async def dnt(request: web.Request) -> web.Response:
        respect = request.query.get("respect", "true")
        return html("DNT", PAGE_2, f' data-respect-dnt="{respect}"')

    app = web.Application()
    app.router.add_get("/page1", page1)
    app.router.add_get("/page2", page2)
    app.router.add_get("/dnt", dnt)
    app.router.add_get("/thanks", page2)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    tcp = web.TCPSite(runner, "127.0.0.1", 0)
    await tcp.start()
    port = runner.addresses[0][1]
    try:
        yield Site(f"http://127.0.0.1:{port}")
    finally:
        await runner.cleanup()


@pytest.fixture
async def loader(settings: Settings, db: Database) -> AsyncIterator[Loader]:
    """The behavior loader, in-process, on this test's topics."""
    async with Loader(settings, BEHAVIOR, db, PartitionManager(db)) as running:
        yield running


async def test_browser_session_lands_in_behavior_events_and_user_sessions(
    browser: Any, site: Site, loader: Loader, db: Database, shop: ShopCredentials
) -> None:
    page_1, page_2 = f"{site.url}/page1", f"{site.url}/page2"
    context = await browser.new_context(viewport=VIEWPORT)
    page = await context.new_page()
    ready = "window.eventpipe && window.eventpipe.version"
    await page.goto(page_1)
    await page.wait_for_function(ready)
    await page.click("#buy")
    await page.click("#buy", click_count=4)  # a rage click: 4 clicks in one burst
    await page.evaluate("window.scrollTo(0, document.documentElement.scrollHeight)")
    await page.wait_for_function("window.scrolled === true")
    await page.locator("#email").press_sequentially("ada@example.com")
    await page.click("#next")  # navigate: page 1's pagehide flushes its batch
    await page.wait_for_url(page_2)
    await page.wait_for_function(ready)
    await page.close()  # pagehide on page 2 flushes its page view
    await context.close()

    wanted = {"page_view", "click", "rage_click", "scroll_depth", "form_start", "form_abandon"}

    async def landed() -> bool:
        events = await behavior_rows(db, shop)
        session = await db.pool.fetchrow(
            "SELECT page_count FROM user_sessions WHERE shop_id = $1", shop.shop_id
        )
        return (
            wanted <= {e["event_type"] for e in events}
            and len(of_type(events, "page_view")) >= 2
            and session is not None
            and session["page_count"] >= 2
        )

    await wait_for(landed)
    events = await behavior_rows(db, shop)
    assert len({e["session_id"] for e in events}) == 1, "one session across both pages"
    views = of_type(events, "page_view")
    assert [v["page_url"] for v in views] == [page_1, page_2]
    assert views[0]["metadata"]["title"] == "Page one"
    assert views[1]["metadata"]["referrer"] == page_1

    clicks = of_type(events, "click")
    buy = [c for c in clicks if c["element_path"].endswith("button#buy.buy.primary")]
    assert len(buy) == 5, clicks
    assert buy[0]["element_path"] == "body > div#main > button#buy.buy.primary"
    assert buy[0]["element_type"] == "button"
    assert buy[0]["element_text"] == "Buy now"
    assert set(buy[0]["coordinates"]) == {"x", "y"}
    assert buy[0]["viewport_size"] == VIEWPORT
    assert any(c["element_path"].endswith("a#next") for c in clicks)

    (rage,) = of_type(events, "rage_click")
    assert rage["element_path"] == buy[0]["element_path"]
    assert rage["event_data"]["clicks"] >= 3
    depths = {e["event_data"]["percentage"] for e in of_type(events, "scroll_depth")}
    assert {25, 50, 75, 100} <= depths
    (start,) = of_type(events, "form_start")
    (abandon,) = of_type(events, "form_abandon")
    assert start["element_path"] == abandon["element_path"] == "body > div#main > form#checkout"
    assert start["event_data"]["field"] == "email"
    assert not of_type(events, "form_submit")
    assert {e["page_url"] for e in events if e["event_type"] != "page_view"} == {page_1}

    session = await db.pool.fetchrow("SELECT * FROM user_sessions WHERE shop_id = $1", shop.shop_id)
    assert session is not None
    assert session["session_id"] == events[0]["session_id"]
    assert session["landing_page"] == page_1
    assert session["exit_page"] == page_2
    assert session["page_count"] == 2
    assert session["first_seen_at"] < session["last_seen_at"]


async def test_do_not_track_sends_nothing(
    browser: Any, site: Site, loader: Loader, db: Database, shop: ShopCredentials
) -> None:
    context = await browser.new_context(viewport=VIEWPORT)
    await context.add_init_script(
        "Object.defineProperty(Navigator.prototype, 'doNotTrack', {get: () => '1'});"
    )
    posted: list[str] = []
    context.on("request", lambda r: posted.append(r.url) if "/v1/behavior" in r.url else None)
    page = await context.new_page()
    for respect in ("true", "false"):  # with DNT respected, then a control page ignoring it
        await page.goto(f"{site.url}/dnt?respect={respect}")
        await page.wait_for_function("window.eventpipe && window.eventpipe.version")
        await page.click("#ok")
        await page.evaluate("window.eventpipe.flush()")
    await page.close()
    await context.close()

    async def control_landed() -> bool:
        return any(e["page_url"].endswith("respect=false") for e in await behavior_rows(db, shop))

    await wait_for(control_landed)
    events = await behavior_rows(db, shop)
    assert {e["page_url"] for e in events} == {f"{site.url}/dnt?respect=false"}
    assert {e["event_type"] for e in events} == {"page_view", "click"}
    assert len(posted) == 1, posted


async def test_hesitation_errors_and_form_submit(
    browser: Any, site: Site, loader: Loader, db: Database, shop: ShopCredentials
) -> None:
    context = await browser.new_context(viewport=VIEWPORT)
    page = await context.new_page()
    await page.clock.install()  # a fake clock: hesitate 2 s without waiting 2 s
    await page.goto(f"{site.url}/page1")
    await page.wait_for_function("window.eventpipe && window.eventpipe.version")
    await page.hover("#buy")
    await page.clock.fast_forward(2000)
    await page.click("#buy")
    await page.add_script_tag(content="throw new Error('boom');")
    await page.add_script_tag(content="Promise.reject(new Error('nope'));")
    await page.locator("#email").press_sequentially("ada@example.com")
    await page.click("button[type=submit]")  # submits, navigates to /thanks
    await page.wait_for_url(f"{site.url}/thanks?email=ada%40example.com")
    await page.close()
    await context.close()

    wanted = {"page_view", "click", "hesitation", "error", "form_start", "form_submit"}

    async def landed() -> bool:
        events = await behavior_rows(db, shop)
        return wanted <= {e["event_type"] for e in events} and len(of_type(events, "error")) >= 2

    await wait_for(landed)
    events = await behavior_rows(db, shop)
    (hesitation,) = of_type(events, "hesitation")
    assert hesitation["element_path"] == "body > div#main > button#buy.buy.primary"
    assert hesitation["event_data"]["hesitation_ms"] >= 1500
    errors = {e["event_data"]["message"]: e["event_data"] for e in of_type(events, "error")}
    assert len(errors) == 2, errors
    (boom,) = (data for message, data in errors.items() if "boom" in message)
    (nope,) = (data for message, data in errors.items() if "nope" in message)
    assert boom["line"] == 1
    assert nope["source"] == "unhandledrejection"
    assert len(of_type(events, "form_submit")) == 1
    assert not of_type(events, "form_abandon")


@dataclass
class Gate:
    """A proxy in front of the collector that answers 503 while ``failing``; it records
    the event ids of every batch it is sent."""

    url: str
    failing: bool
    posts: list[tuple[int, list[str]]]


@pytest.fixture
async def gate(collector: str) -> AsyncIterator[Gate]:
    import aiohttp

    state = Gate("", True, [])
    http = aiohttp.ClientSession()

    async def behavior(request: web.Request) -> web.Response:
        body = await request.read()
        try:
            ids = [e.get("event_id") for e in json.loads(body)["events"]]
        except (ValueError, KeyError, TypeError):
            ids = []
        cors = {
            "Access-Control-Allow-Origin": request.headers.get("Origin", "*"),
            "Access-Control-Expose-Headers": "Retry-After",
        }
        if state.failing:
            state.posts.append((503, ids))
            return web.json_response(
                {"error": "down"}, status=503, headers={**cors, "Retry-After": "1"}
            )
        headers = {"Content-Type": request.headers.get("Content-Type", "text/plain")}
        if "Origin" in request.headers:
            headers["Origin"] = request.headers["Origin"]
        async with http.post(
            f"{collector}/v1/behavior", params=request.query, data=body, headers=headers
        ) as resp:
            answer = await resp.read()
            state.posts.append((resp.status, ids))
            return web.Response(body=answer, status=resp.status, headers=cors)

    app = web.Application()
    app.router.add_post("/v1/behavior", behavior)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    state.url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    try:
        yield state
    finally:
        await runner.cleanup()
        await http.close()


async def test_batches_refused_with_503_are_kept_and_sent_once_after_a_reload(
    browser: Any, collector: str, gate: Gate, loader: Loader, db: Database, shop: ShopCredentials
) -> None:
    """The collector answers 503 to the first posts (and to the pagehide beacon of a
    reload); the beacon keeps the events in localStorage, the reloaded page sends them
    with backoff once the collector is back, and each event id is one row."""

    async def page_html(request: web.Request) -> web.Response:
        options = f' data-endpoint="{gate.url}" data-flush-interval="200"'
        return web.Response(
            text=_page(collector, shop.write_key, "Retry", PAGE_2, options),
            content_type="text/html",
        )

    app = web.Application()
    app.router.add_get("/retry", page_html)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    page_url = f"http://127.0.0.1:{runner.addresses[0][1]}/retry"
    context = await browser.new_context(viewport=VIEWPORT)
    try:
        page = await context.new_page()
        await page.goto(page_url)
        await page.wait_for_function("window.eventpipe && window.eventpipe.version")
        for _ in range(3):
            await page.click("#ok")
        await wait_for(lambda: _async(len(gate.posts) >= 2))  # the first post and a retry
        outbox = await page.evaluate("JSON.parse(localStorage.getItem('eventpipe.outbox'))")
        assert len(outbox) >= 4, outbox  # page view, three clicks (and a rage click), kept
        await page.reload()
        await page.wait_for_function("window.eventpipe && window.eventpipe.version")
        gate.failing = False

        async def box_empty() -> bool:
            return bool(await page.evaluate("localStorage.getItem('eventpipe.outbox') === null"))

        await wait_for(box_empty, timeout=30)
        await page.close()
    finally:
        await context.close()
        await runner.cleanup()
    assert {status for status, _ in gate.posts} >= {503, 200}
    sent = {i for _, ids in gate.posts for i in ids}

    async def all_rows() -> bool:
        return {str(e["event_id"]) for e in await behavior_rows(db, shop)} >= sent

    await wait_for(all_rows)
    events = await behavior_rows(db, shop)
    ids = [str(e["event_id"]) for e in events]
    assert sorted(ids) == sorted(sent), "every event sent is one row"
    assert len(of_type(events, "click")) == 3
    assert len(of_type(events, "page_view")) == 2  # one per load


async def _async(value: bool) -> bool:
    return value


async def _require_consent(db: Database, shop: ShopCredentials) -> None:
    await db.pool.execute(
        "UPDATE shops SET settings = settings || '{\"consent_required\": true}' WHERE id = $1",
        shop.shop_id,
    )


STORED = "[sessionStorage.getItem('eventpipe.sid'), localStorage.getItem('eventpipe.outbox')]"


async def test_headless_chromium_is_a_bot_to_the_collector(browser: Any) -> None:
    """Why this module keeps bots (its ``settings``): the list names our own Chromium."""
    from ingest.collector import bots

    context = await browser.new_context()
    page = await context.new_page()
    agent = await page.evaluate("navigator.userAgent")
    await context.close()
    assert bots.reason(agent) == bots.CRAWLER, agent


async def test_consent_required_sends_and_stores_nothing_until_consent(
    browser: Any, site: Site, loader: Loader, db: Database, shop: ShopCredentials
) -> None:
    """The shop requires consent: the page view and a click wait in memory (no request,
    nothing in sessionStorage or localStorage) until eventpipe.consent({analytics: true})
    sends them, with their own times."""
    await _require_consent(db, shop)
    context = await browser.new_context(viewport=VIEWPORT)
    posted: list[str] = []
    context.on("request", lambda r: posted.append(r.url) if "/v1/behavior" in r.url else None)
    page = await context.new_page()
    async with page.expect_response(lambda r: "/v1/beacon/config" in r.url) as config:
        await page.goto(f"{site.url}/page2")
    assert await (await config.value).json() == {"consent_required": True}
    await page.wait_for_function("window.eventpipe && window.eventpipe.version")
    await page.click("#ok")
    await page.evaluate("window.eventpipe.flush()")
    await page.wait_for_timeout(300)
    assert posted == []
    assert await page.evaluate(STORED) == [None, None]
    assert await page.evaluate("window.eventpipe.sessionId()") is None
    consented = await page.evaluate(
        "(() => { const t = new Date().toISOString();"
        " window.eventpipe.consent({analytics: true}); window.eventpipe.flush(); return t; })()"
    )
    await wait_for(lambda: _async(len(posted) >= 1))
    await page.close()
    await context.close()

    async def landed() -> bool:
        return {"page_view", "click"} <= {e["event_type"] for e in await behavior_rows(db, shop)}

    await wait_for(landed)
    events = await behavior_rows(db, shop)
    assert sorted(e["event_type"] for e in events) == ["click", "page_view"]
    assert all(e["timestamp"].isoformat() < consented.replace("Z", "+00:00") for e in events)
    assert of_type(events, "page_view")[0]["metadata"]["language"]  # identified: facts kept


async def test_anonymous_consent_keeps_no_session_facts_or_storage(
    browser: Any, site: Site, loader: Loader, db: Database, shop: ShopCredentials
) -> None:
    """consent({analytics: false}) discards what waits and sends nothing; then anonymous
    consent sends later events with ?anonymous=1, no referrer/language/screen, and keeps
    nothing in sessionStorage or localStorage."""
    await _require_consent(db, shop)
    context = await browser.new_context(viewport=VIEWPORT)
    posted: list[str] = []
    context.on("request", lambda r: posted.append(r.url) if "/v1/behavior" in r.url else None)
    page = await context.new_page()
    await page.goto(f"{site.url}/page1")  # then page 2: a referrer to leave out
    await page.click("#next")
    await page.wait_for_url(f"{site.url}/page2")
    await page.wait_for_function("window.eventpipe && window.eventpipe.version")
    await page.evaluate("window.eventpipe.consent({analytics: false})")
    await page.click("#ok")
    await page.evaluate("window.eventpipe.flush()")
    await page.wait_for_timeout(300)
    assert posted == []
    await page.evaluate("window.eventpipe.consent({analytics: true, anonymous: true})")
    await page.evaluate("window.eventpipe.track('page_view', {manual: true})")
    await page.click("#ok")
    await page.evaluate("window.eventpipe.flush()")
    await wait_for(lambda: _async(len(posted) >= 1))
    assert await page.evaluate(STORED) == [None, None]
    await page.close()
    await context.close()

    async def landed() -> bool:
        return len(await behavior_rows(db, shop)) >= 2

    await wait_for(landed)
    events = await behavior_rows(db, shop)
    assert sorted(e["event_type"] for e in events) == ["click", "page_view"]
    assert all("anonymous=1" in url for url in posted), posted
    for event in events:
        assert not {"referrer", "language", "screen_resolution"} & set(event["metadata"])
    session = await db.pool.fetchrow("SELECT * FROM user_sessions WHERE shop_id = $1", shop.shop_id)
    assert session is not None
    assert (session["referrer"], session["language"], session["screen_resolution"]) == (
        None,
        None,
        None,
    )
