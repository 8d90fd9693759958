"""conversion_funnels (issue 24) on real PostgreSQL: the refresh's rows equal a direct
walk of the same events (written here in Python, from the rows read straight from
behavior_events, events and user_sessions), for several shops and funnels, after late
events, a redefinition and a drop; an analyst of shop A reads none of shop B's rows.

The module has a database of its own: rollup_state is global.
"""

from __future__ import annotations

import math
import random
import re
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from typing import Any

import orjson
import pytest

from ingest.core.db import Database
from ingest.core.errors import ConfigError
from ingest.core.migrate import migrate
from ingest.core.shops import ensure_shop
from ingest.partitions import PartitionManager, month_start
from ingest.rollups import funnels, refresh

TODAY = datetime.now(UTC).date()
DAYS = [TODAY - timedelta(days=d) for d in range(0, 4)]
BEHAVIOR_TYPES = ["click", "rage_click", "form_start", "form_abandon", "form_submit", "error",
                  "page_view"]  # fmt: skip
STOREFRONT_TYPES = ["page_view", "product_view", "add_to_cart", "begin_checkout", "purchase"]
URLS = ["https://s/", "https://s/product/1", "https://s/cart", "https://s/checkout/pay"]
FRICTION = ("form_abandon", "error", "rage_click")

FUNNELS = {  # shop index -> {name: [--step, ...]}
    0: {
        "checkout": [
            "product: event=page_view; url=*/product*",
            "cart: event=add_to_cart",
            "pay: url=*/checkout*",
            "bought: event=purchase",
        ],
        "signup": [
            "start: event=form_start; element=form#signup",
            "done: event=form_submit; element=form#signup",
        ],
    },
    1: {
        "checkout": ["hero: component=hero", "cta: component=cta; event=click"],
        "lead_capture": ["event=form_submit"],
    },
    2: {},  # a shop without funnels: none of its sessions gets a row
}


@dataclass
class Shops:
    ids: list[uuid.UUID]
    domains: list[str]
    sessions: dict[uuid.UUID, list[str]]


@pytest.fixture(scope="module")
async def fdb(scratch_database: Any) -> AsyncIterator[Database]:
    dsn: str = await scratch_database("eventpipe_funnels")
    await migrate(dsn)
    async with Database(dsn, max_size=4) as database:
        manager = PartitionManager(database)
        months = {month_start(datetime.combine(d, time(), UTC)) for d in DAYS}
        for table in ("behavior_events", "events"):
            await manager.ensure_months(table, months)
        yield database


def _at(day: date, rng: random.Random) -> datetime:
    # whole milliseconds, some equal: ties are broken by source then event id
    return datetime.combine(day, time(), UTC) + timedelta(milliseconds=rng.randrange(40) * 500)


async def add_events(
    db: Database, shop: uuid.UUID, sessions: list[str], n: int, rng: random.Random
) -> None:
    behavior, storefront = [], []
    for _ in range(n):
        session = rng.choice(sessions)
        day = rng.choice(DAYS)
        if rng.random() < 0.55:
            behavior.append(
                (
                    uuid.uuid4(),
                    shop,
                    session,
                    rng.choice(BEHAVIOR_TYPES),
                    rng.choice(["form#signup", "#buy", None]),
                    _at(day, rng),
                    rng.choice(URLS),
                    rng.choice(["hero", "cta", None]),
                    # received long ago, loaded now: the watermark is load order
                    datetime.now(UTC) - timedelta(days=3),
                )
            )
        else:
            storefront.append(
                (
                    uuid.uuid4(),
                    shop,
                    f"anon-{session}",
                    session,
                    rng.choice(STOREFRONT_TYPES),
                    _at(day, rng),
                    orjson.dumps({"url": rng.choice(URLS)}).decode(),
                    datetime.now(UTC),
                )
            )
    await db.pool.executemany(
        "INSERT INTO behavior_events (event_id, shop_id, session_id, event_type, element_path, "
        '"timestamp", page_url, component_id, received_at) '
        "VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
        behavior,
    )
    await db.pool.executemany(
        "INSERT INTO events (event_id, shop_id, anon_id, session_id, event_type, ts, props, "
        "received_at) VALUES ($1, $2, $3, $4, $5, $6, $7::jsonb, $8)",
        storefront,
    )


async def make_shops(db: Database, rng: random.Random) -> Shops:
    shops = Shops([], [], {})
    for index in range(3):
        domain = f"fun-{uuid.uuid4().hex[:8]}.myshopify.com"
        shop = (await ensure_shop(db, domain)).shop_id
        shops.ids.append(shop)
        shops.domains.append(domain)
        sessions = [f"s{index}-{uuid.uuid4().hex[:6]}" for _ in range(10)]
        shops.sessions[shop] = sessions
        for session in sessions:
            await db.pool.execute(
                "INSERT INTO user_sessions (shop_id, session_id, landing_page, exit_reason, "
                "first_seen_at, last_seen_at) VALUES ($1, $2, 'https://s/', $3, now(), now())",
                shop,
                session,
                rng.choice(["timeout", "close", None]),
            )
        for name, steps in FUNNELS[index].items():
            assert await funnels.define(db, domain, name, steps)
        await add_events(db, shop, sessions, 150, rng)
    return shops


# -- the walk, written directly over the source rows ------------------------------------------


def _like(glob: str) -> re.Pattern[str]:
    return re.compile(".*".join(re.escape(part) for part in glob.split("*")), re.DOTALL)


def _matches(step: dict[str, str], ev: dict[str, Any]) -> bool:
    for key, column in (
        ("event_type", "event_type"),
        ("element_path", "element_path"),
        ("component_id", "component_id"),
    ):
        if key in step and ev[column] != step[key]:
            return False
    return "page_url" not in step or (
        ev["page_url"] is not None and _like(step["page_url"]).fullmatch(ev["page_url"]) is not None
    )


async def expected_rows(db: Database, shops: list[uuid.UUID]) -> set[tuple[Any, ...]]:
    events: dict[tuple[uuid.UUID, str], list[dict[str, Any]]] = {}
    for r in await db.pool.fetch(
        'SELECT shop_id, session_id, "timestamp" AS at, 0 AS src, event_id, event_type, '
        "page_url, element_path, component_id FROM behavior_events WHERE shop_id = ANY($1)",
        shops,
    ):
        events.setdefault((r["shop_id"], r["session_id"]), []).append(dict(r))
    for r in await db.pool.fetch(
        "SELECT shop_id, session_id, ts AS at, 1 AS src, event_id, event_type, "
        "props->>'url' AS page_url, NULL AS element_path, NULL AS component_id "
        "FROM events WHERE shop_id = ANY($1)",
        shops,
    ):
        events.setdefault((r["shop_id"], r["session_id"]), []).append(dict(r))
    exits = {
        (r["shop_id"], r["session_id"]): r["exit_reason"]
        for r in await db.pool.fetch(
            "SELECT shop_id, session_id, exit_reason FROM user_sessions WHERE shop_id = ANY($1)",
            shops,
        )
    }
    defined = await db.pool.fetch(
        "SELECT shop_id, name, steps FROM funnels WHERE shop_id = ANY($1)", shops
    )
    out: set[tuple[Any, ...]] = set()

    def key(ev: dict[str, Any]) -> tuple[Any, ...]:
        return (ev["at"], ev["src"], ev["event_id"])

    for f in defined:
        steps = orjson.loads(f["steps"])
        for (shop, session), evs in events.items():
            if shop != f["shop_id"]:
                continue
            evs = sorted(evs, key=key)
            reached: list[dict[str, Any]] = []
            for step in steps:
                after = key(reached[-1]) if reached else None
                hit = next(
                    (e for e in evs if (after is None or key(e) > after) and _matches(step, e)),
                    None,
                )
                if hit is None:
                    break
                reached.append(hit)
            last_at = max(e["at"] for e in evs)
            for i, ev in enumerate(reached):
                order = i + 1
                reason = None
                if i + 1 < len(reached):
                    exited = reached[i + 1]["at"]
                elif order == len(steps):
                    exited = ev["at"]
                else:
                    exited = last_at
                    friction = [
                        e
                        for e in evs
                        if e["src"] == 0 and e["event_type"] in FRICTION and key(e) > key(ev)
                    ]
                    reason = (
                        friction[-1]["event_type"]
                        if friction
                        else exits.get((shop, session)) or "session_ended"
                    )
                meta = {
                    "source": "behavior" if ev["src"] == 0 else "storefront",
                    "event_id": str(ev["event_id"]),
                    "page_url": ev["page_url"],
                    "completed": order == len(steps),
                }
                out.add(
                    (
                        shop,
                        f["name"],
                        steps[i]["name"],
                        order,
                        session,
                        ev["component_id"],
                        ev["at"],
                        exited,
                        math.floor((exited - ev["at"]).total_seconds()),
                        reason,
                        orjson.dumps(meta, option=orjson.OPT_SORT_KEYS),
                    )
                )
    return out


async def stored_rows(db: Database, shops: list[uuid.UUID]) -> set[tuple[Any, ...]]:
    sort = orjson.OPT_SORT_KEYS
    return {
        (*tuple(r.values())[:-1], orjson.dumps(orjson.loads(r["metadata"]), option=sort))
        for r in await db.pool.fetch(
            "SELECT shop_id, funnel_name, step_name, step_order, session_id, component_id, "
            "entered_at, exited_at, duration_seconds, dropoff_reason, metadata "
            "FROM conversion_funnels WHERE shop_id = ANY($1)",
            shops,
        )
    }  # fmt: skip


async def assert_funnels_equal_the_walk(db: Database, shops: list[uuid.UUID]) -> None:
    expected = await expected_rows(db, shops)
    assert await stored_rows(db, shops) == expected


# -- tests --------------------------------------------------------------------------------------


async def test_conversion_funnels_equal_a_direct_walk_and_follow_changes(fdb: Database) -> None:
    rng = random.Random(2024)
    shops = await make_shops(fdb, rng)
    await refresh(fdb)
    expected = await expected_rows(fdb, shops.ids)
    # the data set reaches every kind of row: completed, dropped (each reason), shops
    assert {r[0] for r in expected} == set(shops.ids[:2])
    assert any(r[10] and orjson.loads(r[10])["completed"] for r in expected)
    reasons = {r[9] for r in expected}
    assert None in reasons and len(reasons & set(FRICTION)) >= 2
    assert reasons & {"timeout", "close", "session_ended"}  # no friction: the session's exit
    assert {(r[0], r[1]) for r in expected} == {
        (shops.ids[i], n) for i, fs in FUNNELS.items() for n in fs
    }
    await assert_funnels_equal_the_walk(fdb, shops.ids)

    # Late events (old days, received days ago, loaded now) for some sessions of shops 0, 2
    # and a new session of shop 1: only the sessions loaded are walked again.
    before = await stored_rows(fdb, shops.ids)
    await add_events(fdb, shops.ids[0], shops.sessions[shops.ids[0]][:3], 40, rng)
    new_session = f"s1-new-{uuid.uuid4().hex[:6]}"
    await add_events(fdb, shops.ids[1], [new_session], 30, rng)
    await add_events(fdb, shops.ids[2], shops.sessions[shops.ids[2]], 20, rng)
    done = {r.rollup: r for r in await refresh(fdb)}
    assert not done["conversion_funnels"].full
    assert done["conversion_funnels"].groups == 4  # shop 2 has no funnels
    await assert_funnels_equal_the_walk(fdb, shops.ids)
    assert await stored_rows(fdb, shops.ids) != before

    # Nothing loaded: nothing walked, once the watermark has passed what was loaded. A
    # transaction with an xid running anywhere in the cluster when a refresh starts
    # (other tests' databases share the server) holds its watermark below the rows
    # loaded after it, and the next refresh walks them again, by design (CI saw one
    # such session): so a refresh may still walk a few, and one after it nothing.
    walked = []
    for _ in range(3):
        done = {r.rollup: r for r in await refresh(fdb)}
        walked.append(done["conversion_funnels"].groups)
        if walked[-1] == 0:
            break
    assert walked[-1] == 0 and all(n <= 4 for n in walked), walked

    # A redefinition walks the shop's sessions again with the new steps.
    assert not await funnels.define(
        fdb, shops.domains[1], "checkout", ["cta: component=cta", "buy: event=purchase"]
    )
    done = {r.rollup: r for r in await refresh(fdb)}
    assert done["conversion_funnels"].groups >= len(shops.sessions[shops.ids[1]])
    await assert_funnels_equal_the_walk(fdb, shops.ids)
    rows = await fdb.pool.fetch(
        "SELECT DISTINCT step_name FROM conversion_funnels "
        "WHERE shop_id = $1 AND funnel_name = 'checkout'",
        shops.ids[1],
    )
    assert {r[0] for r in rows} <= {"cta", "buy"} and rows

    # A drop takes the funnel's rows at once; full gives the same rows as incremental.
    assert await funnels.drop(fdb, shops.domains[0], "signup") > 0
    assert not await fdb.pool.fetchval(
        "SELECT count(*) FROM conversion_funnels WHERE shop_id = $1 AND funnel_name = 'signup'",
        shops.ids[0],
    )
    await assert_funnels_equal_the_walk(fdb, shops.ids)
    await refresh(fdb, full=True)
    await assert_funnels_equal_the_walk(fdb, shops.ids)

    # component_performance counts lead_capture's sessions: dropping it recomputes them.
    conversions = (
        "SELECT coalesce(sum(conversions), 0) FROM component_performance WHERE shop_id = $1"
    )
    assert await fdb.pool.fetchval(conversions, shops.ids[1]) > 0
    await funnels.drop(fdb, shops.domains[1], "lead_capture")
    assert await fdb.pool.fetchval(conversions, shops.ids[1]) == 0


async def test_an_analyst_of_a_reads_none_of_bs_funnels(fdb: Database) -> None:
    rng = random.Random(7)
    shops = await make_shops(fdb, rng)
    await refresh(fdb)
    a, b = shops.ids[0], shops.ids[1]
    role = f"fun_analyst_{uuid.uuid4().hex[:8]}"
    async with fdb.pool.acquire() as conn:
        await conn.execute(f"CREATE ROLE {role} NOLOGIN IN ROLE eventpipe_analyst")
        try:
            await conn.execute(
                "INSERT INTO analyst_shops (role_id, shop_id) "
                "SELECT oid, $1 FROM pg_roles WHERE rolname = $2",
                a,
                role,
            )
            async with conn.transaction():
                await conn.execute(f"SET LOCAL ROLE {role}")
                for table in ("conversion_funnels", "funnels", "session_analytics"):
                    seen = {
                        r[0]
                        for r in await conn.fetch(
                            f"SELECT DISTINCT shop_id FROM {table} WHERE shop_id = ANY($1)",
                            [a, b],
                        )
                    }
                    assert seen == {a}, table
                # and every row it reads at all is A's
                assert {
                    r[0]
                    for r in await conn.fetch("SELECT DISTINCT shop_id FROM conversion_funnels")
                } == {a}
        finally:
            await conn.execute("DELETE FROM analyst_shops WHERE role_id = "
                               "(SELECT oid FROM pg_roles WHERE rolname = $1)", role)  # fmt: skip
            await conn.execute(f"DROP ROLE {role}")


@pytest.mark.parametrize(
    ("steps", "error"),
    [
        ([], "a funnel needs steps"),
        (["event"], "is not KEY=VALUE"),
        (["colour=red"], "unknown key 'colour'"),
        (["a: event=x; event=y"], "'event' given twice"),
        (["nothing:"], "step 1 matches nothing"),
        (["a: event=x", "a: event=y"], "two steps are named 'a'"),
        (["event=  "], "step 1's event is empty"),
    ],
)
def test_bad_steps_are_refused_in_one_line(steps: list[str], error: str) -> None:
    with pytest.raises(ConfigError) as caught:
        funnels.parse_steps(steps)
    assert error in str(caught.value) and "\n" not in str(caught.value)


def test_a_step_names_its_criteria() -> None:
    assert funnels.parse_step("pay: url=https://s/checkout*; event=page_view", 2) == {
        "name": "pay",
        "page_url": "https://s/checkout*",
        "event_type": "page_view",
    }
    assert funnels.parse_step("url=https://s/*", 3) == {"name": "step 3", "page_url": "https://s/*"}
