"""posthog-js (npm, its ``dist/array.full.js`` bundle) in headless Chromium -> the
collector's PostHog routes -> Kafka -> loaders -> PostgreSQL.

The library is the vendor's own code, installed from npm by ``helpers.npm_package``;
the pages are served on another origin than the collector (``helpers.serve_pages``).
It is set up as the README says: ``api_host`` the collector, and everything that
would fetch from PostHog's servers or CDN switched off by its own options
(surveys, session recording, toolbar, web experiments, external scripts); the
collector answers its configuration calls. Every console message and page error is
collected: the library must run without one.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from ingest.core.db import Database
from ingest.core.settings import Settings
from ingest.core.shops import ShopCredentials
from tests.conftest import wait_for
from tests.helpers import behavior_rows, both_loaders, npm_package, of_type, serve_pages

pytestmark = pytest.mark.slow

LIBRARY = "posthog-js@1.449.2"
VIEWPORT = {"width": 1024, "height": 700}


@pytest.fixture
def settings(settings: Settings) -> Settings:
    """Headless Chromium's user agent is a bot's to the collector (bot_policy drop by
    default): these tests keep its events, as a shop would set bot_policy keep."""
    return settings.model_copy(update={"bot_policy": "keep"})


def _bundle() -> Path:
    folder = npm_package(LIBRARY)
    if isinstance(folder, str):
        pytest.skip(folder)
    return folder / "dist" / "array.full.js"


def options(collector: str) -> dict[str, Any]:
    """posthog-js's init options, as the README gives them."""
    return {
        "api_host": collector,
        "autocapture": True,
        "rageclick": True,
        "capture_pageview": True,
        "capture_pageleave": True,
        "persistence": "localStorage",
        # Nothing from PostHog's servers or CDN: no recording, surveys, product
        # tours, conversations, web experiments, toolbar, heatmaps, exception or
        # web-vitals scripts (each would load an extension script).
        "disable_external_dependency_loading": True,
        "disable_session_recording": True,
        "disable_surveys": True,
        "disable_product_tours": True,
        "disable_conversations": True,
        "disable_web_experiments": True,
        "advanced_disable_toolbar_metrics": True,
        "capture_heatmaps": False,
        "capture_dead_clicks": False,
        "capture_performance": False,
        "capture_exceptions": False,
    }


# posthog-js drops the events of a browser whose user agent looks like a bot's
# (headless Chromium's does), unless told not to; its own advice for end-to-end tests.
# And batches every 250 ms rather than 3 s (the test waits less).
TEST_ONLY = {"opt_out_useragent_filter": True, "request_queue_config": {"flush_interval_ms": 250}}


def test_the_readme_gives_these_options() -> None:
    """The README's posthog.init block names exactly these options and values."""
    readme = (Path(__file__).parents[3] / "README.md").read_text()
    found = re.search(r"```js\n(posthog\.init\(.*?)```", readme, re.DOTALL)
    assert found, "README: the posthog.init block"
    pairs = re.findall(r"(\w+): (true|false|\"[^\"]*\")", found.group(1))
    given = {name: json.loads(value) for name, value in pairs}
    assert given == options("https://COLLECTOR")


def _page(collector: str, key: str, title: str, body: str) -> str:
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>{title}</title>
<script src="/array.full.js"></script>
<script>posthog.init({json.dumps(key)}, {json.dumps(TEST_ONLY | options(collector))});</script>
</head><body>{body}</body></html>"""


PAGE_1 = """
<div id="main">
  <button id="buy" class="buy primary">Buy now</button>
  <div style="height: 3000px">a long page</div>
  <a id="next" href="/page2">Next page</a>
</div>
"""
PAGE_2 = '<div id="main"><h1>Page two</h1><button id="ok">OK</button></div>'


@contextlib.asynccontextmanager
async def _site(collector: str, shop: ShopCredentials) -> AsyncIterator[str]:
    async with serve_pages(
        {
            "/page1": _page(collector, shop.write_key, "Page one", PAGE_1),
            "/page2": _page(collector, shop.write_key, "Page two", PAGE_2),
            "/favicon.ico": "",  # Chromium asks for it: a 404 would be a console error
        },
        {"/array.full.js": _bundle()},
    ) as url:
        yield url


async def test_autocapture_rage_clicks_and_leaving_without_console_errors(
    browser: Any, collector: str, settings: Settings, db: Database, shop: ShopCredentials
) -> None:
    """Page view, clicks, a rage click, a scroll, the next page and leaving it: rows in
    behavior_events, the session's exit page the last page left, and not one console
    error, page error or request outside the collector and the site."""
    console: list[str] = []
    foreign: list[str] = []
    async with _site(collector, shop) as site, both_loaders(settings, db):
        page_1, page_2 = f"{site}/page1", f"{site}/page2"
        origins = {urlsplit(collector).netloc, urlsplit(site).netloc}
        context = await browser.new_context(viewport=VIEWPORT)
        context.on(
            "request",
            lambda r: foreign.append(r.url) if urlsplit(r.url).netloc not in origins else None,
        )
        page = await context.new_page()
        page.on(
            "console",
            lambda m: (
                console.append(f"{m.type}: {m.text}") if m.type in ("error", "warning") else None
            ),
        )
        page.on("pageerror", lambda e: console.append(f"pageerror: {e}"))
        ready = "window.posthog && window.posthog.__loaded"
        await page.goto(page_1)
        await page.wait_for_function(ready)
        await page.click("#buy")
        await page.click("#buy", click_count=4)  # a rage click: 3 or more in 1 s
        await page.evaluate("window.scrollTo(0, document.documentElement.scrollHeight)")
        await page.click("#next")  # $pageleave of page 1, then page 2's $pageview
        await page.wait_for_url(page_2)
        await page.wait_for_function(ready)

        async def page_2_viewed() -> bool:
            views = of_type(await behavior_rows(db, shop), "page_view")
            return page_2 in [v["page_url"] for v in views]

        # Page 2's view stored: posthog-js has loaded its config and turned autocapture on
        # (a click right after loading was once not captured: CI).
        await wait_for(page_2_viewed)
        await page.click("#ok")
        await page.evaluate("posthog.identify('user-42', {plan: 'pro'})")  # signs in

        async def identified() -> bool:
            return bool(
                await db.pool.fetchval(
                    "SELECT count(*) FROM identities WHERE shop_id = $1", shop.shop_id
                )
            )

        await wait_for(identified)  # sent in its batch, before the page goes
        await page.close(run_before_unload=True)  # $pageleave of page 2, by sendBeacon
        await context.close()

        async def landed() -> bool:
            events = await behavior_rows(db, shop)
            views = of_type(events, "page_view")
            leaves = [e for e in events if e["metadata"].get("event") == "$pageleave"]
            return len(views) == 2 and len(leaves) == 2 and bool(of_type(events, "rage_click"))

        await wait_for(landed)

    assert not console, console
    assert not foreign, foreign
    events = await behavior_rows(db, shop)
    sessions = {e["session_id"] for e in events}
    assert len(sessions) == 1, "one $session_id across both pages"
    views = of_type(events, "page_view")
    assert [v["page_url"] for v in views] == [page_1, page_2]
    assert views[0]["metadata"]["title"] == "Page one"
    assert views[0]["viewport_size"] == VIEWPORT
    (anon,) = {e["metadata"]["anon_id"] for e in events if e["page_url"] == page_1}
    # identify() makes user-42 the distinct_id of what follows (page 2's leave)
    assert {e["metadata"]["anon_id"] for e in events} <= {anon, "user-42"}
    identity = await db.pool.fetchrow("SELECT * FROM identities WHERE shop_id = $1", shop.shop_id)
    assert identity is not None
    assert (identity["anon_id"], identity["user_id"]) == (anon, "user-42")
    assert json.loads(identity["traits"])["plan"] == "pro"

    clicks = of_type(events, "click")
    buy = [c for c in clicks if c["component_id"] == "buy"]
    assert len(buy) >= 2, clicks
    assert buy[0]["element_path"] == "body > div#main > button#buy.buy.primary"
    assert (buy[0]["element_type"], buy[0]["element_text"]) == ("button", "Buy now")
    assert any(c["component_id"] == "next" for c in clicks)
    assert any(c["component_id"] == "ok" and c["page_url"] == page_2 for c in clicks)
    (rage,) = of_type(events, "rage_click")
    assert rage["element_path"] == buy[0]["element_path"]
    assert rage["page_url"] == page_1

    leaves = [e for e in events if e["metadata"].get("event") == "$pageleave"]
    assert [leave["page_url"] for leave in leaves] == [page_1, page_2]
    # A leave is the page's last scroll depth: the share of page 1 scrolled.
    assert leaves[0]["event_type"] == "scroll_depth"
    assert leaves[0]["event_data"]["final"] is True
    assert leaves[0]["event_data"]["percentage"] == 100

    session = await db.pool.fetchrow("SELECT * FROM user_sessions WHERE shop_id = $1", shop.shop_id)
    assert session is not None
    assert session["session_id"] == sessions.pop()
    assert (session["landing_page"], session["exit_page"]) == (page_1, page_2)
    assert session["page_count"] == 2
    assert session["last_seen_at"] == leaves[-1]["timestamp"], "the last leave ends the session"
