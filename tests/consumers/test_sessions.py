"""user_sessions follows the behavior rows exactly once, across batches and duplicates."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import orjson

from ingest.core.db import Database
from ingest.core.settings import Settings
from ingest.core.shops import ShopCredentials
from tests.conftest import wait_for
from tests.helpers import produce, record, running_loader


async def test_sessions_from_behavior_events(
    settings: Settings, db: Database, shop: ShopCredentials
) -> None:
    start = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=10)
    session = f"sess-{uuid.uuid4().hex[:6]}"
    context = {"user_agent": "Mozilla/5.0 (iPhone)", "device_type": "mobile", "country_code": "de"}

    def event(minute: int, page: str, kind: str = "page_view") -> bytes:
        at = (start + timedelta(minutes=minute)).isoformat()
        return orjson.dumps(
            record(
                shop,
                session_id=session,
                event_type=kind,
                page_url=page,
                timestamp=at,
                context=context,
            )
        )

    first = [event(0, "/landing"), event(1, "/landing", "click"), event(2, "/product")]
    await produce(settings, first + first[:2])  # two duplicates in the same load
    async with running_loader(settings, db):
        await wait_for(lambda: _session(db, shop, session, pages=2))
        # A later batch: an event earlier than all (clock skew) and the exit page.
        await produce(settings, [event(-1, "/ad"), event(5, "/thanks"), first[2]])
        await wait_for(lambda: _session(db, shop, session, pages=4))
        # A third batch, in the middle of the session: neither end moves.
        await produce(settings, [event(3, "/cart")])
        await wait_for(lambda: _session(db, shop, session, pages=5))
    row = await db.pool.fetchrow(
        "SELECT * FROM user_sessions WHERE shop_id = $1 AND session_id = $2", shop.shop_id, session
    )
    assert row is not None
    assert (row["landing_page"], row["exit_page"]) == ("/ad", "/thanks")
    assert row["page_count"] == 5  # /ad, /landing, /product, /cart, /thanks; no duplicates
    assert row["first_seen_at"] == start - timedelta(minutes=1)
    assert row["last_seen_at"] == start + timedelta(minutes=5)
    assert row["duration_seconds"] == 6 * 60
    assert (row["device_type"], row["country_code"]) == ("mobile", "DE")
    assert row["user_agent"] == "Mozilla/5.0 (iPhone)"


async def _session(db: Database, shop: ShopCredentials, session: str, pages: int) -> bool:
    count = await db.pool.fetchval(
        "SELECT page_count FROM user_sessions WHERE shop_id = $1 AND session_id = $2",
        shop.shop_id,
        session,
    )
    return bool(count == pages)
