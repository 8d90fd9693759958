"""Segment's identify, alias and group messages build ``identities`` (issue 19, point 2),
sent by the real segment-analytics-python SDK and loaded by a real loader."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
from segment.analytics import Client
from segment.analytics.request import post

from consumers.loader import Loader
from consumers.rows import STOREFRONT
from ingest.core.db import Database
from ingest.core.settings import Settings
from ingest.core.shops import ShopCredentials
from ingest.partitions import PartitionManager
from tests.conftest import wait_for


async def _identities(db: Database, shop: ShopCredentials) -> dict[str, dict[str, Any]]:
    rows = await db.pool.fetch(
        "SELECT anon_id, user_id, traits, group_id, group_traits, first_seen_at, last_seen_at"
        " FROM identities WHERE shop_id = $1",
        shop.shop_id,
    )
    return {
        r["anon_id"]: {
            **dict(r),
            "traits": orjson.loads(r["traits"]),
            "group_traits": orjson.loads(r["group_traits"]),
        }
        for r in rows
    }


def _near(a: datetime, b: datetime) -> bool:
    return abs(a - b) < timedelta(seconds=1)


def _client(shop: ShopCredentials, collector: str, errors: list[Exception]) -> Client:
    return Client(
        shop.write_key,
        host=collector,
        upload_size=20,
        max_retries=1,
        on_error=lambda error, _: errors.append(error),
    )


async def _send(client: Client) -> None:
    # The SDK is synchronous (requests); the collector runs on this test's loop.
    await asyncio.to_thread(client.flush)
    client.join()  # its threads end: a client sends once here


async def test_identify_alias_group_build_identities_and_track_carries_the_user(
    collector: str, settings: Settings, db: Database, shop: ShopCredentials
) -> None:
    errors: list[Exception] = []
    client = _client(shop, collector, errors)
    t0 = datetime.now(UTC) - timedelta(hours=5)
    hour = timedelta(hours=1)
    client.identify(
        "user-1", {"email": "a@example.com", "plan": "free"}, anonymous_id="anon-1", timestamp=t0
    )
    client.identify("user-1", {"plan": "pro"}, anonymous_id="anon-1", timestamp=t0 + hour)
    client.alias("anon-old", "user-1", timestamp=t0 + 2 * hour)
    client.group(
        "user-1", "org-1", {"name": "Acme"}, anonymous_id="anon-1", timestamp=t0 + 3 * hour
    )
    client.group(
        "user-1", "org-1", {"employees": 5}, anonymous_id="anon-1", timestamp=t0 + 4 * hour
    )
    client.track("user-1", "Order Completed", {"total": 3}, anonymous_id="anon-1", timestamp=t0)
    client.track(event="Anonymous Browse", anonymous_id="anon-2", timestamp=t0)
    await _send(client)
    assert errors == []
    async with Loader(settings, STOREFRONT, db, PartitionManager(db)):

        async def loaded() -> bool:
            found = await _identities(db, shop)
            return len(found) == 2 and found["anon-1"]["group_traits"] == {
                "name": "Acme",
                "employees": 5,
            }

        await wait_for(loaded)
        # Loaded later, older than everything stored: it fills, it does not overwrite.
        client = _client(shop, collector, errors)
        client.identify(
            "user-1", {"plan": "trial", "age": 3}, anonymous_id="anon-1", timestamp=t0 - hour
        )
        await _send(client)
        assert errors == []

        async def late_one() -> bool:
            return "age" in (await _identities(db, shop))["anon-1"]["traits"]

        await wait_for(late_one)
        found = await _identities(db, shop)
        one = found["anon-1"]
        assert one["user_id"] == "user-1"
        assert one["traits"] == {"email": "a@example.com", "plan": "pro", "age": 3}
        assert (one["group_id"], one["group_traits"]) == ("org-1", {"name": "Acme", "employees": 5})
        assert _near(one["first_seen_at"], t0 - hour) and _near(one["last_seen_at"], t0 + 4 * hour)
        old = found["anon-old"]  # the alias: previousId -> userId
        assert (old["user_id"], old["traits"], old["group_id"]) == ("user-1", {}, None)
        assert (
            _near(old["first_seen_at"], t0 + 2 * hour)
            and old["last_seen_at"] == old["first_seen_at"]
        )

        # identify, alias and group are no rows of events; a track's userId is its user_id.
        events = await db.pool.fetch(
            "SELECT event_type, anon_id, user_id FROM events WHERE shop_id = $1"
            " ORDER BY event_type",
            shop.shop_id,
        )
        assert [tuple(e) for e in events] == [
            ("Anonymous Browse", "anon-2", None),
            ("Order Completed", "anon-1", "user-1"),
        ]

        # A message delivered again (an SDK retry, a replay) changes nothing.
        again = [
            {
                "type": "identify",
                "userId": "user-1",
                "anonymousId": "anon-1",
                "traits": {"plan": "pro"},
                "messageId": "m-again",
                "timestamp": (t0 + hour).isoformat(),
            }
        ]
        before = await db.pool.fetchval(
            "SELECT max(updated_at) FROM identities WHERE shop_id = $1", shop.shop_id
        )
        for _ in range(2):
            await asyncio.to_thread(lambda: post(shop.write_key, host=collector, batch=again))

        async def applied() -> bool:
            return bool(
                await db.pool.fetchval(
                    "SELECT max(updated_at) > $2 FROM identities WHERE shop_id = $1",
                    shop.shop_id,
                    before,
                )
            )

        await wait_for(applied)
        assert await _identities(db, shop) == found
