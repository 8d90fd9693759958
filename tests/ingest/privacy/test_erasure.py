"""``eventpipe erase`` on the real PostgreSQL and broker: exact counts, every table,
every partition, dead letters decoded, the record, and the loaders' suppression."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import orjson
import pytest
import structlog

from consumers.rows import BEHAVIOR, STOREFRONT
from ingest.cli.main import main
from ingest.core import metrics
from ingest.core.db import Database
from ingest.core.settings import Settings
from ingest.core.shops import ShopCredentials
from ingest.privacy import Erasure, erase, status
from tests.conftest import wait_for
from tests.helpers import produce, record, running_loader, storefront


@pytest.fixture(autouse=True)
def _restore_structlog() -> Iterator[None]:
    """main() reconfigures structlog (onto capsys's stdout): restored after each test."""
    saved = structlog.get_config()
    yield
    structlog.configure(**saved)


def _months_ago(n: int) -> str:
    return (datetime.now(UTC) - timedelta(days=30 * n)).isoformat()


async def _load(
    settings: Settings, db: Database, shop: ShopCredentials, anon: str, other: str
) -> None:
    """Storefront events of ``anon`` and ``other`` over 3 months, behavior events of their
    sessions over 2, loaded; returns the marker ids of the other visitor."""
    sid = str(shop.shop_id)
    store = []
    for months in (0, 1, 2):
        for who in (anon, other):
            for _i in range(5):
                at = _months_ago(months)
                store.append(
                    storefront(
                        shop_id=sid,
                        anon_id=who,
                        session_id=f"{who}-s{months}",
                        ts=at,
                        received_at=at,
                        event_id=str(uuid.uuid4()),
                    )
                )
    behavior = [
        record(
            shop,
            session_id=f"{who}-s{months}",
            timestamp=_months_ago(months),
            event_type="page_view",
            page_url=f"https://x/{i}",
        )
        for months in (0, 1)
        for who in (anon, other)
        for i in range(4)
    ]
    await produce(settings, [orjson.dumps(store)], settings.topic_storefront)
    await produce(settings, [orjson.dumps(behavior)])
    async with running_loader(settings, db, STOREFRONT), running_loader(settings, db, BEHAVIOR):
        await wait_for(lambda: _count(db, "events", sid), timeout=30)
        await wait_for(lambda: _count(db, "behavior_events", sid), timeout=30)


async def _count(db: Database, table: str, shop_id: str, where: str = "true") -> int:
    return int(
        await db.pool.fetchval(
            f"SELECT count(*) FROM {table} WHERE shop_id = $1::uuid AND {where}", shop_id
        )
    )


async def test_erase_every_table_every_month_and_dead_letters(
    settings: Settings, db: Database, shop: ShopCredentials, capsys: pytest.CaptureFixture[str]
) -> None:
    sid = str(shop.shop_id)
    anon, other = f"a-{uuid.uuid4().hex[:6]}", f"o-{uuid.uuid4().hex[:6]}"
    await _load(settings, db, shop, anon, other)
    assert await _count(db, "events", sid) == 30
    assert await _count(db, "behavior_events", sid) == 16
    assert await _count(db, "user_sessions", sid) == 4
    months = await db.pool.fetchval(
        "SELECT count(DISTINCT tableoid) FROM events WHERE shop_id = $1::uuid AND anon_id = $2",
        shop.shop_id,
        anon,
    )
    assert months == 3  # three partitions
    # Dead letters: the visitor's alone, a batch with another's event, not JSON, another
    # shop's event of the same anon id (kept), text naming the anon id (kept: no text search).
    mine = {"shop_id": sid, "anon_id": anon, "session_id": "x", "event_type": "e"}
    theirs = {"shop_id": sid, "anon_id": other, "session_id": "y", "event_type": "e"}
    elsewhere = {**mine, "shop_id": str(uuid.uuid4())}
    raws = [
        orjson.dumps(mine),
        orjson.dumps([mine, theirs]),
        b"\xff\xfe not json " + anon.encode(),
        orjson.dumps(elsewhere),
        orjson.dumps({"shop_id": sid, "note": anon}),
    ]
    topic = f"dl-{uuid.uuid4().hex[:6]}"
    dl_ids = [
        await db.pool.fetchval(
            "INSERT INTO dead_letters (consumer_group, topic, kafka_partition, kafka_offset, raw,"
            " reason, error) VALUES ('g', $1, 0, $2, $3, 'invalid_record', 'e') RETURNING id",
            topic,
            i,
            raw,
        )
        for i, raw in enumerate(raws)
    ]

    dry = await erase(db, settings, Erasure(shop.domain, anon_ids=[anon]), dry_run=True)
    assert dry.rows["events"] == 15
    assert dry.rows["behavior_events"] == 8
    assert dry.rows["user_sessions"] == 2
    assert dry.rows["dead_letters"] == 2
    assert await _count(db, "events", sid) == 30  # a dry run deletes nothing
    assert dry.request_id is None

    settings = settings.model_copy(update={"erase_batch_rows": 2})  # many batches
    code = await asyncio.to_thread(
        main,
        [
            "erase",
            "--postgres-dsn",
            settings.dsn,
            "--state-dir",
            str(settings.state_dir),
            "--shop",
            shop.domain,
            "--anon-id",
            anon,
            "--json",
        ],
    )
    assert code == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["rows"]["events"] == 15
    assert out["rows"]["behavior_events"] == 8
    assert out["rows"]["user_sessions"] == 2
    assert out["rows"]["dead_letters"] == 2
    assert out["derived_sessions"] == 3
    assert await _count(db, "events", sid) == 15
    assert await _count(db, "events", sid, f"anon_id = '{anon}'") == 0
    assert await _count(db, "behavior_events", sid) == 8
    assert await _count(db, "behavior_events", sid, f"session_id LIKE '{anon}%'") == 0
    assert await _count(db, "user_sessions", sid) == 2
    left = {
        r["id"]: bytes(r["raw"])
        for r in await db.pool.fetch("SELECT id, raw FROM dead_letters WHERE topic = $1", topic)
    }
    assert sorted(left) == dl_ids[1:]
    assert orjson.loads(left[dl_ids[1]]) == [theirs]  # the batch keeps the other's event
    assert left[dl_ids[2]] == raws[2]

    # The record: who, when, counts, finished; the id only as an HMAC.
    req = await db.pool.fetchrow("SELECT * FROM erasure_requests WHERE id = $1", out["request_id"])
    assert req is not None
    assert req["requested_by"] == await db.pool.fetchval("SELECT current_user")
    assert req["id_kinds"] == ["anon_id"] and req["finished_at"] is not None
    assert json.loads(req["rows_removed"]) == out["rows"]
    dump = " ".join(str(v) for v in dict(req).values())
    assert anon not in dump and anon.encode() not in req["id_hashes"][0]
    assert len(req["id_hashes"][0]) == 32
    # A repeat is recognised, and removes nothing more.
    again = await erase(db, settings, Erasure(shop.domain, anon_ids=[anon]), dry_run=False)
    assert again.repeat_of == [out["request_id"]]
    assert sum(again.rows.values()) == 0
    listed = await status(db)
    assert listed[0]["id"] == again.request_id and listed[1]["id"] == out["request_id"]
    assert (
        await asyncio.to_thread(main, ["erase", "status", "--postgres-dsn", settings.dsn, "--json"])
        == 0
    )
    assert anon not in capsys.readouterr().out


async def test_erase_refusals_are_one_line(
    settings: Settings, shop: ShopCredentials, capsys: pytest.CaptureFixture[str]
) -> None:
    base = ["erase", "--postgres-dsn", settings.dsn]
    assert await asyncio.to_thread(main, [*base, "--shop", "nope.example", "--anon-id", "a"]) != 0
    assert await asyncio.to_thread(main, [*base, "--shop", shop.domain]) != 0
    assert await asyncio.to_thread(main, [*base, "--anon-id", "a"]) != 0
    err = capsys.readouterr().err
    assert "no shop 'nope.example'" in err and "nothing to erase" in err and "--shop" in err
    assert "Traceback" not in err


async def test_events_in_flight_before_the_erase_never_land(
    settings: Settings, db: Database, shop: ShopCredentials
) -> None:
    sid = str(shop.shop_id)
    anon, other = f"a-{uuid.uuid4().hex[:6]}", f"o-{uuid.uuid4().hex[:6]}"
    now = datetime.now(UTC).isoformat()

    def ev(who: str, session: str) -> dict[str, object]:
        return storefront(
            shop_id=sid,
            anon_id=who,
            session_id=session,
            ts=now,
            received_at=now,
            event_id=str(uuid.uuid4()),
        )

    # In the topic before the erase: the visitor's alone, mixed with another's, by session.
    await produce(
        settings,
        [
            orjson.dumps([ev(anon, "s1"), ev(anon, "s1")]),
            orjson.dumps([ev(anon, "s2"), ev(other, "s3")]),
            orjson.dumps(ev(other, "gone-session")),
            orjson.dumps(ev(other, "s4")),
        ],
        settings.topic_storefront,
    )
    report = await erase(
        db,
        settings,
        Erasure(shop.domain, anon_ids=[anon], session_ids=["gone-session"]),
        dry_run=False,
    )
    assert sum(report.rows.values()) == 0  # nothing landed yet
    before = metrics.EVENTS_SUPPRESSED.labels("events")._value.get()
    async with running_loader(settings, db, STOREFRONT):
        await wait_for(lambda: _count(db, "events", sid, "session_id = 's4'"), timeout=30)
    assert await _count(db, "events", sid, f"anon_id = '{anon}'") == 0
    assert await _count(db, "events", sid, "session_id = 'gone-session'") == 0
    assert await _count(db, "events", sid) == 2  # the other's s3 and s4
    assert metrics.EVENTS_SUPPRESSED.labels("events")._value.get() - before == 4
    dead = await db.pool.fetchval(
        "SELECT count(*) FROM dead_letters WHERE topic = $1", settings.topic_storefront
    )
    assert dead == 0
