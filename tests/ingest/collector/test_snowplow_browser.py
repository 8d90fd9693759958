"""Snowplow's browser tracker (npm ``@snowplow/browser-tracker``, its UMD bundle) in
headless Chromium -> the collector's tp2 and ``/i`` routes -> Kafka -> loaders -> PostgreSQL.

The tracker is the vendor's own code, installed from npm by ``helpers.npm_package``
(with its form tracking plugin); the pages are served on another origin than the
collector (``helpers.serve_pages``), as on a shop's site. The pages run the
README's blocks as written (its collector, key and method put in): ``appId`` the
write key, activity tracking on (page pings every second), ``setUserId`` for a
signed-in visitor, form and element tracking, and the form_abandon block.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from ingest.core.db import Database
from ingest.core.settings import Settings
from ingest.core.shops import ShopCredentials
from tests.conftest import wait_for
from tests.helpers import behavior_rows, both_loaders, npm_package, of_type, serve_pages

pytestmark = pytest.mark.slow

TRACKER = "@snowplow/browser-tracker@4.10.1"
# The form and element tracking plugins' newest releases (their versions stop at
# 4.6.8; they work with the 4.10 tracker through the plugin interface).
FORMS = "@snowplow/browser-plugin-form-tracking@4.6.8"
ELEMENTS = "@snowplow/browser-plugin-element-tracking@4.6.8"
LINKS = "@snowplow/browser-plugin-link-click-tracking@4.6.8"
VIEWPORT = {"width": 1024, "height": 700}
ALIAS = "/t/p"  # a first-party path (EVENTPIPE_SNOWPLOW_PATH_ALIAS), the README's


@pytest.fixture
def settings(settings: Settings) -> Settings:
    """Headless Chromium's user agent is a bot's to the collector (bot_policy drop by
    default): these tests keep its events, as a shop would set bot_policy keep."""
    return settings.model_copy(update={"bot_policy": "keep", "snowplow_path_alias": ALIAS})


def _bundle(spec: str) -> Path:
    folder = npm_package(spec)
    if isinstance(folder, str):
        pytest.skip(folder)
    return folder / "dist" / "index.umd.min.js"


def _readme_block(first_line: str) -> str:
    """The README's ```js block that starts with ``first_line``."""
    readme = (Path(__file__).parents[3] / "README.md").read_text()
    found = re.search(r"```js\n(" + re.escape(first_line) + r".*?)```", readme, re.DOTALL)
    assert found, f"README: the block starting {first_line!r}"
    return found.group(1)


def _page(collector: str, key: str, title: str, body: str, method: str) -> str:
    """A page running the README's set-up block (the collector, the key and the method
    put in) and its form_abandon block, as a site would."""
    setup = _readme_block("var sp = window.snowplowBrowserTracking;")
    for placeholder, value in (
        ('"https://COLLECTOR"', json.dumps(collector)),
        ('"wk_..."', json.dumps(key)),
        ('eventMethod: "post"', f"eventMethod: {json.dumps(method.removesuffix('-alias'))}"),
    ):
        assert placeholder in setup, placeholder
        setup = setup.replace(placeholder, value)
    if method.endswith("-alias"):  # as the README says: postPath, with the alias set
        setup = setup.replace("bufferSize: 1,", f"bufferSize: 1, postPath: {json.dumps(ALIAS)},")
    abandon = _readme_block("// form_abandon for Snowplow")
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>{title}</title>
<script src="/sp.js"></script><script src="/forms.js"></script><script src="/links.js"></script>
<script src="/elements.js"></script>
<script>{setup}</script>
<script>{abandon}</script>
</head><body>{body}</body></html>"""


PAGE_1 = """
<div id="main">
  <div id="hero" style="height: 300px">Summer sale</div>
  <form id="newsletter" class="signup wide" action="/thanks">
    <input id="email" name="email" type="email"> <button id="go" type="submit">Sign up</button>
  </form>
  <a id="next" href="/thanks">Next page</a>
  <div style="height: 4000px">a long page</div>
</div>
"""
PAGE_2 = '<div id="main"><h1>Thanks</h1></div>'


@contextlib.asynccontextmanager
async def _site(collector: str, shop: ShopCredentials, method: str) -> AsyncIterator[str]:
    async with serve_pages(
        {
            "/page1": _page(collector, shop.write_key, "Page one", PAGE_1, method),
            "/thanks": _page(collector, shop.write_key, "Thanks", PAGE_2, method),
            "/favicon.ico": "",
        },
        {
            "/sp.js": _bundle(TRACKER),
            "/forms.js": _bundle(FORMS),
            "/links.js": _bundle(LINKS),
            "/elements.js": _bundle(ELEMENTS),
        },
    ) as url:
        yield url


async def _stored_text(db: Database, shop: ShopCredentials) -> list[str]:
    """Every row the shop has in behavior_events and events, as JSON text."""
    rows = await db.pool.fetch(
        "SELECT to_jsonb(b)::text AS t FROM behavior_events b WHERE shop_id = $1 "
        "UNION ALL SELECT to_jsonb(e)::text FROM events e WHERE shop_id = $1",
        shop.shop_id,
    )
    return [r["t"] for r in rows]


@pytest.mark.parametrize("method", ["post", "get", "post-alias"])
async def test_page_views_pings_and_forms_of_the_browser_tracker(
    browser: Any,
    collector: str,
    settings: Settings,
    db: Database,
    shop: ShopCredentials,
    method: str,
) -> None:
    """Page view, scrolling with page pings, a form filled and submitted, the next
    page: rows in behavior_events and one session in user_sessions."""
    posted: list[str] = []
    async with _site(collector, shop, method) as site, both_loaders(settings, db):
        page_1, thanks = f"{site}/page1", f"{site}/thanks?email=ada%40example.com"
        context = await browser.new_context(viewport=VIEWPORT)
        context.on("request", lambda r: posted.append(r.url) if collector in r.url else None)
        page = await context.new_page()
        await page.goto(page_1)

        async def pinged() -> bool:
            # Activity (the scroll) in each 1 s heartbeat sends a ping; once the page
            # is scrolled to the bottom, a ping carries the offset reached.
            await page.mouse.wheel(0, 1500)
            return len(of_type(await behavior_rows(db, shop), "scroll_depth")) >= 2

        await page.mouse.move(100, 100)
        await wait_for(pinged, interval=0.5)
        await page.evaluate("window.scrollTo(0, 0)")
        await page.locator("#email").press_sequentially("ada@example.com")
        await page.click("#go")  # change_form (blur), submit_form, then /thanks
        await page.wait_for_url(thanks)

        async def landed() -> bool:
            events = await behavior_rows(db, shop)
            return (
                len(of_type(events, "page_view")) == 2
                and bool(of_type(events, "form_submit"))
                and bool(of_type(events, "form_start"))
            )

        await wait_for(landed)
        await context.close()

    events = await behavior_rows(db, shop)
    sessions = {e["session_id"] for e in events}
    assert len(sessions) == 1, "one Snowplow session (sid) across both pages"
    views = of_type(events, "page_view")
    assert [v["page_url"] for v in views] == [page_1, thanks]
    assert views[0]["metadata"]["title"] == "Page one"
    assert views[1]["metadata"]["referrer"] == page_1
    assert views[0]["viewport_size"] == VIEWPORT
    meta = views[0]["metadata"]
    assert meta["user_id"] == "user-42"
    assert meta["tracker"] == "js-4.10.1" and meta["app_id"] == shop.write_key
    assert len({v["metadata"]["anon_id"] for v in views}) == 1  # duid, the same visitor

    pings = of_type(events, "scroll_depth")
    assert all(p["event_data"]["ping"] for p in pings)
    # The document is ~4 000 px high, the viewport 700: the pings' offsets and the
    # document size (ds) give the share seen, up to the bottom.
    reached = [p["event_data"].get("percentage") for p in pings]
    assert max(r or 0 for r in reached) == 100, pings
    assert all(r is None or 0 < r <= 100 for r in reached), pings

    starts = of_type(events, "form_start")
    assert {s["component_id"] for s in starts} == {"newsletter"}
    assert starts[0]["element_path"] == "form#newsletter"
    assert {s["event_data"]["field"] for s in starts} == {"email"}
    assert all("ada" not in json.dumps(s["event_data"]) for s in starts), "never a value"
    (submit,) = of_type(events, "form_submit")
    assert submit["element_path"] == "form#newsletter"  # as the start's
    assert submit["event_data"]["classes"] == ["signup", "wide"]
    assert not of_type(events, "form_abandon")
    # The form plugin sends the values (focus_form, change_form, submit_form's
    # elements): none is stored, in any column of any row.
    assert not [t for t in await _stored_text(db, shop) if "ada@example.com" in t]
    assert {e["page_url"] for e in events if e["event_type"] != "page_view"} <= {page_1, thanks}

    session = await db.pool.fetchrow("SELECT * FROM user_sessions WHERE shop_id = $1", shop.shop_id)
    assert session is not None
    assert session["session_id"] == sessions.pop()
    assert (session["landing_page"], session["exit_page"]) == (page_1, thanks)
    assert session["page_count"] == 2
    assert session["first_seen_at"] < session["last_seen_at"]
    assert session["screen_resolution"] and session["language"] == "en-US"
    # setUserId: the visitor (duid) is known as the user, once per page view.
    identity = await db.pool.fetchrow("SELECT * FROM identities WHERE shop_id = $1", shop.shop_id)
    assert identity is not None
    assert (identity["anon_id"], identity["user_id"]) == (meta["anon_id"], "user-42")
    path = {"post": "/com.snowplowanalytics.snowplow/tp2", "get": "/i?"}.get(method, ALIAS)
    assert posted and all(path in url for url in posted), posted


async def test_a_form_left_unsent_is_abandoned_and_elements_have_their_time(
    browser: Any, collector: str, settings: Settings, db: Database, shop: ShopCredentials
) -> None:
    """A field typed into, then a link to the next page (the README's snippet sends the
    abandon as the page goes, link click tracking the click); pings carry the hero's
    time in view (element tracking)."""
    async with _site(collector, shop, "post") as site, both_loaders(settings, db):
        page_1 = f"{site}/page1"
        context = await browser.new_context(viewport=VIEWPORT)
        page = await context.new_page()
        await page.goto(page_1)
        await page.locator("#email").press_sequentially("ada@example.com")

        async def timed() -> bool:
            await page.mouse.move(100, 100 + len(await behavior_rows(db, shop)))  # activity
            return len(of_type(await behavior_rows(db, shop), "time_on_element")) >= 2

        await wait_for(timed, interval=0.5)
        await page.click("#next")
        await page.wait_for_url(f"{site}/thanks")

        async def landed() -> bool:
            events = await behavior_rows(db, shop)
            return (
                bool(of_type(events, "form_abandon"))
                and bool(of_type(events, "click"))
                and len(of_type(events, "page_view")) == 2
            )

        await wait_for(landed)
        await context.close()

    events = await behavior_rows(db, shop)
    (abandon,) = of_type(events, "form_abandon")
    starts = of_type(events, "form_start")
    assert starts and {s["element_path"] for s in starts} == {"form#newsletter"}
    assert (abandon["element_path"], abandon["component_id"]) == ("form#newsletter", "newsletter")
    assert abandon["event_data"] == {"field": "email", "classes": ["signup", "wide"]}
    assert abandon["page_url"] == page_1
    assert not of_type(events, "form_submit")
    # The form plugin sends each field's value (focus_form, change_form): never stored.
    assert not [t for t in await _stored_text(db, shop) if "ada@example.com" in t]
    (link,) = of_type(events, "click")  # link click tracking, as the page goes
    assert (link["element_path"], link["element_type"]) == ("a#next", "a")
    assert (link["element_text"], link["component_id"]) == ("Next page", "next")
    assert link["event_data"]["href"] == f"{site}/thanks"
    assert link["page_url"] == page_1
    times = of_type(events, "time_on_element")
    assert {t["element_path"] for t in times} == {"hero"}
    assert all(t["page_url"] == page_1 and t["event_data"]["cumulative"] for t in times)
    ms = [t["event_data"]["ms"] for t in times]
    assert ms == sorted(ms) and ms[-1] >= 1000, ms  # in view since the load, growing
    assert len({t["event_id"] for t in times}) == len(times)
