"""Helpers the test modules share: records, producing, loaders and reconciliation.

Test modules import from here (or use fixtures of conftest.py), never from each other.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
from aiokafka import AIOKafkaProducer
from hypothesis import strategies as st

from consumers.loader import Loader
from consumers.rows import (
    BEHAVIOR,
    STOREFRONT,
    TableSpec,
)
from ingest.core.db import Database
from ingest.core.settings import Settings
from ingest.core.shops import ShopCredentials
from ingest.core.topics import ensure_topics
from ingest.partitions import PartitionManager
from ingest.stack.broker import EmbeddedBroker


@asynccontextmanager
async def uncommitted_behavior_row(
    db: Database,
    shop_id: uuid.UUID,
    event_id: uuid.UUID,
    *,
    session_id: str = "v",
    timestamp: datetime | None = None,
    received_at: datetime | None = None,
    page_url: str = "/",
    event_type: str = "click",
    component_id: str | None = None,
) -> AsyncIterator[None]:
    """One behavior row inserted by a transaction that stays open while the block runs
    (a loader's COPY not yet committed) and commits when it ends."""
    now = datetime.now(UTC)
    async with db.pool.acquire() as conn, conn.transaction():
        await conn.execute(
            "INSERT INTO behavior_events (event_id, shop_id, session_id, event_type, page_url,"
            ' "timestamp", received_at, component_id) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)',
            event_id,
            shop_id,
            session_id,
            event_type,
            page_url,
            timestamp or now,
            received_at or now,
            component_id,
        )
        yield


def record(shop: ShopCredentials, **overrides: object) -> dict[str, object]:
    now = datetime.now(UTC).isoformat()
    data: dict[str, object] = {
        "event_id": str(uuid.uuid4()),
        "shop_id": str(shop.shop_id),
        "session_id": "s",
        "event_type": "click",
        "page_url": "https://x/",
        "timestamp": now,
        "received_at": now,
        "event_data": {},
        "metadata": {},
    }
    data.update(overrides)
    return data


async def produce(settings: Settings, values: list[bytes], topic: str | None = None) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=settings.bootstrap, acks="all")
    await producer.start()
    try:
        for value in values:
            await producer.send_and_wait(topic or settings.topic_behavior, value, key=b"k")
    finally:
        await producer.stop()


async def seal_partitions(settings: Settings, shop: ShopCredentials) -> list[str]:
    """Produce one behavior record alone to each partition; returns their event ids.

    Tansu answers ListOffsets(latest) with the last batch's base offset + 1, not the log
    end: the records of that batch past its first go uncounted (Apache Kafka is exact).
    A one-record batch last in each partition makes the broker's end offsets exact, for
    tests that assert a lag figure."""
    producer = AIOKafkaProducer(bootstrap_servers=settings.bootstrap, acks="all")
    await producer.start()
    ids: list[str] = []
    try:
        for partition in range(settings.topic_partitions):
            data = record(shop, session_id=f"seal-{partition}")
            ids.append(str(data["event_id"]))
            await producer.send_and_wait(
                settings.topic_behavior, orjson.dumps(data), partition=partition
            )
    finally:
        await producer.stop()
    return ids


@asynccontextmanager
async def running_loader(
    settings: Settings, db: Database, spec: TableSpec = BEHAVIOR
) -> AsyncIterator[Loader]:
    async with Loader(settings, spec, db, PartitionManager(db)) as loader:
        yield loader


async def count_ids(db: Database, ids: list[str], table: str = "behavior_events") -> dict[str, int]:
    rows = await db.pool.fetch(
        f"SELECT event_id::text AS id, count(*) AS n FROM {table} "
        "WHERE event_id = ANY($1::uuid[]) GROUP BY 1",
        ids,
    )
    return {r["id"]: r["n"] for r in rows}


SHOP = str(uuid.uuid4())  # the shop of records that need no shop row
NOW = datetime(2026, 11, 25, 12, 30, 15, 123456, tzinfo=UTC).isoformat()


def storefront(**fields: Any) -> dict[str, Any]:
    """A storefront record (its fields overridden by ``fields``)."""
    event = {
        "event_id": str(uuid.uuid4()),
        "shop_id": SHOP,
        "anon_id": "anon-1",
        "session_id": "s-1",
        "event_type": "add_to_cart",
        "ts": NOW,
        "props": {"value": 12.5, "items": [1, 2]},
        "product_id": "gid://shopify/Product/1",
        "experiment_id": None,
        "variant": None,
        "received_at": NOW,
        "user_id": "user-1",
    }
    return {**event, **fields}


def behavior(**fields: Any) -> dict[str, Any]:
    """A behavior record as the collector writes it (its fields overridden by ``fields``)."""
    event = {
        "event_id": str(uuid.uuid4()),
        "shop_id": SHOP,
        "session_id": "s-1",
        "event_type": "click",
        "element_path": "main > button",
        "element_type": "button",
        "element_text": "Buy",
        "coordinates": {"x": 1, "y": 2},
        "viewport_size": {"width": 390, "height": 844},
        "event_data": {"rage": True},
        "timestamp": NOW,
        "page_url": "https://shop.example/p/1",
        "component_id": None,
        "metadata": {},
        "received_at": NOW,
        "context": {"user_agent": "Mozilla/5.0", "device_type": "mobile"},
    }
    return {**event, **fields}


TABLES = {"behavior": "behavior_events", "storefront": "events"}


async def produce_many(
    settings: Settings, shop: ShopCredentials, n: int, stream: str = "behavior"
) -> list[str]:
    """Produce ``n`` records of ``stream`` over many sessions; returns their event ids."""
    producer = AIOKafkaProducer(bootstrap_servers=settings.bootstrap, acks="all", linger_ms=5)
    await producer.start()
    ids: list[str] = []
    now = datetime.now(UTC).isoformat()
    try:
        futures = []
        for i in range(n):
            session = f"s{i % 97}"
            data = (
                record(shop, session_id=session)
                if stream == "behavior"
                else storefront(
                    shop_id=str(shop.shop_id), session_id=session, ts=now, received_at=now
                )
            )
            ids.append(str(data["event_id"]))
            futures.append(
                await producer.send(
                    settings.topic_for(stream), orjson.dumps(data), key=session.encode()
                )
            )
        await asyncio.gather(*futures)
    finally:
        await producer.stop()
    return ids


async def reconcile(
    db: Database, ids: list[str], table: str = "behavior_events"
) -> tuple[int, int]:
    """(missing, duplicated) among ``ids``."""
    rows = await db.pool.fetch(
        f"SELECT event_id::text AS id, count(*) AS n FROM {table} "
        "WHERE event_id = ANY($1::uuid[]) GROUP BY 1",
        ids,
    )
    counts = {r["id"]: r["n"] for r in rows}
    return len(set(ids) - set(counts)), sum(1 for n in counts.values() if n > 1)


async def loaded(db: Database, ids: list[str], table: str = "behavior_events") -> int:
    return int(
        await db.pool.fetchval(
            f"SELECT count(*) FROM {table} WHERE event_id = ANY($1::uuid[])", ids
        )
    )


def loader_process(
    settings: Settings, *extra: str, stream: str = "behavior"
) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "EVENTPIPE_POSTGRES_DSN": settings.dsn,
        "EVENTPIPE_KAFKA_BOOTSTRAP": settings.bootstrap,
        "EVENTPIPE_KAFKA_LOG_ID": settings.kafka_log_id,
        "EVENTPIPE_TOPIC_BEHAVIOR": settings.topic_behavior,
        "EVENTPIPE_TOPIC_STOREFRONT": settings.topic_storefront,
        "EVENTPIPE_CONSUMER_GROUP": settings.consumer_group,
        "EVENTPIPE_KAFKA_SESSION_TIMEOUT_MS": "6000",
        "EVENTPIPE_BATCH_MAX_ROWS": "500",
        "EVENTPIPE_LOADER_METRICS_PORT": "0",
        "EVENTPIPE_LOG_LEVEL": "warning",
    }
    return subprocess.Popen(
        [sys.executable, "-m", "ingest.cli", "loader", "--stream", stream, *extra], env=env
    )


async def at_least(db: Database, ids: list[str], n: int, table: str = "behavior_events") -> bool:
    return await loaded(db, ids, table) >= n


def batch(n: int = 5) -> list[dict[str, Any]]:
    return [
        {
            "event_id": str(uuid.uuid4()),
            "event_type": "click",
            "session_id": f"s{i}",
            "page_url": "https://x/",
        }
        for i in range(n)
    ]


@contextlib.asynccontextmanager
async def own_broker(
    tmp_path: Path, settings: Settings
) -> AsyncIterator[tuple[EmbeddedBroker, Settings]]:
    """A broker of this test's own (it gets paused), and settings pointing at it."""
    async with EmbeddedBroker(tmp_path / "broker") as broker:
        own = settings.model_copy(
            update={
                "kafka_bootstrap": broker.bootstrap,
                "kafka_log_id": broker.log_id,
                "produce_timeout_s": 0.5,
                "state_dir": tmp_path,
            }
        )
        await ensure_topics(broker.bootstrap, [own.topic_behavior], partitions=own.topic_partitions)
        yield broker, own


NPM_CACHE = (
    Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "eventpipe-tests" / "npm"
)


def npm_package(spec: str) -> Path | str:
    """Install the npm package ``spec`` (``name@version``) once into a cache folder.

    Returns the package's folder (``.../node_modules/<name>``), or the reason it could
    not be installed (no npm, no registry) for the caller to skip with. Real trackers'
    browser bundles come from here: the test drives the vendor's own code.
    """
    name = spec.rsplit("@", 1)[0] if spec.rfind("@") > 0 else spec
    prefix = NPM_CACHE / spec.replace("/", "+")
    folder = prefix / "node_modules" / name
    if (folder / "package.json").exists():
        return folder
    npm = shutil.which("npm")
    if npm is None:
        return "npm is not installed"
    prefix.mkdir(parents=True, exist_ok=True)
    try:
        subprocess.run(
            [npm, "install", "--prefix", str(prefix), "--no-audit", "--no-fund", "--silent", spec],
            check=True,
            capture_output=True,
            text=True,
            timeout=300,
        )
    except subprocess.CalledProcessError as exc:
        return f"npm install {spec} failed: {(exc.stderr or exc.stdout).strip()[-500:]}"
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"npm install {spec} failed: {exc}"
    return folder if (folder / "package.json").exists() else f"npm install {spec} left no {folder}"


@asynccontextmanager
async def serve_pages(
    pages: dict[str, str], files: dict[str, Path] | None = None
) -> AsyncIterator[str]:
    """Serve HTML ``pages`` (path -> text) and static ``files`` (path -> file) on
    127.0.0.1, another origin than the collector's (as a real shop's site is).

    Yields the base URL.
    """
    from aiohttp import web

    app = web.Application()
    for path, text in pages.items():

        async def page(request: web.Request, text: str = text) -> web.Response:
            return web.Response(text=text, content_type="text/html")

        app.router.add_get(path, page)
    for path, file in (files or {}).items():

        async def static(request: web.Request, file: Path = file) -> web.FileResponse:
            return web.FileResponse(file, headers={"Content-Type": "application/javascript"})

        app.router.add_get(path, static)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


async def topic_events(
    settings: Settings, topic: str, done: Any, timeout: float = 15.0
) -> list[dict[str, Any]]:
    """The events of ``topic``'s records, read from the start until ``done(events)``
    is true (AssertionError after ``timeout`` seconds)."""
    from aiokafka import AIOKafkaConsumer

    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=settings.bootstrap,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    await consumer.start()
    events: list[dict[str, Any]] = []
    try:
        deadline = asyncio.get_running_loop().time() + timeout
        while not done(events):
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(f"{topic}: not there after {timeout} s: {events}")
            for records in (await consumer.getmany(timeout_ms=200)).values():
                events += [e for r in records for e in orjson.loads(r.value)]
    finally:
        await consumer.stop()
    return events


@asynccontextmanager
async def both_loaders(settings: Settings, db: Database) -> AsyncIterator[None]:
    """The behavior and storefront loaders, in-process, started at once (each joins
    its group meanwhile): what the tracker protocols' tests load with."""
    async with contextlib.AsyncExitStack() as stack:
        await asyncio.gather(
            *(
                stack.enter_async_context(Loader(settings, spec, db, PartitionManager(db)))
                for spec in (BEHAVIOR, STOREFRONT)
            )
        )
        yield


BEHAVIOR_JSON_COLUMNS = ("coordinates", "viewport_size", "event_data", "metadata")


async def behavior_rows(db: Database, shop: ShopCredentials) -> list[dict[str, Any]]:
    """The shop's ``behavior_events`` rows in time order, their JSON columns decoded."""
    rows = await db.pool.fetch(
        "SELECT * FROM behavior_events WHERE shop_id = $1 ORDER BY timestamp, event_type",
        shop.shop_id,
    )
    out = [dict(r) for r in rows]
    for event in out:
        for name in BEHAVIOR_JSON_COLUMNS:
            if isinstance(event[name], str):
                event[name] = orjson.loads(event[name])
    return out


def of_type(events: list[dict[str, Any]], event_type: str) -> list[dict[str, Any]]:
    """The rows of ``events`` of one event type."""
    return [e for e in events if e["event_type"] == event_type]


# Hypothesis strategies the fast paths' tests share (each beside its reference).
LONG = st.sampled_from([255, 256, 257, 1024, 1025, 4096, 4097]).map(lambda n: "x" * n)
ASTRAL = st.sampled_from([256, 257]).map(lambda n: "\U0001f600" * n)  # code points, not bytes
JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3)
    ),
    max_leaves=8,
)


def _offset(minutes: int) -> str:
    sign = "-" if minutes < 0 else "+"
    return f"{sign}{abs(minutes) // 60:02d}:{abs(minutes) % 60:02d}"


ZONES = st.one_of(
    st.just(""),
    st.just("Z"),
    st.integers(-23 * 60 - 59, 23 * 60 + 59).map(_offset),
    st.sampled_from(["z", "+05:60", "+24:00", "-00:00", "+0530", "+05", "UTC"]),
)
FRACTIONS = st.one_of(
    st.just(""), st.integers(1, 9).flatmap(lambda n: st.from_regex(rf"\A\.[0-9]{{{n}}}\Z"))
)
WELL_FORMED = st.builds(
    lambda moment, fraction, zone: (
        moment.strftime("%Y-%m-%dT%H:%M:%S").rjust(19, "0") + fraction + zone
    ),
    st.datetimes(min_value=datetime(1, 1, 1), max_value=datetime(9999, 12, 31, 23, 59, 59)),
    FRACTIONS,
    ZONES,
)
