"""Loader throughput vs raw asyncpg binary COPY of the same rows, in the same run,
for both streams.

Usage: python -m benchmarks.loader_bench [--rows N] [--repeat K] [--dsn DSN]
                                         [--profile storefront|behavior]

``--profile STREAM`` ends with one more loader run of that stream under cProfile,
its functions by own time on stderr (where the loader's Python goes).

``benchmarks.run`` runs it in a process of its own (``--stack``), as a real
loader runs: the suite's process has run the load generator by then.

Both sides write the same decoded rows into the same table (with its
indexes), in batches of the same size, over one connection. The loader also
fetches from Kafka, decodes, deduplicates, and commits its offsets in the same
transaction: the exactly-once guarantees stay on.

Storefront: ``events``. Behavior: ``behavior_events``, and both sides also fold
each batch's rows into ``user_sessions`` in the batch's transaction, by the
loader's own ``consumers.sessions.upsert``; the behavior records are the
collector's (``enrich.behavior_record`` of the load generator's beacons).

The topic holds a fifth more rows than are timed (at least two batches), so
the timing ends while the loader still has a backlog in every partition, as
raw COPY does: the end of a backlog (partitions running dry one by one, the
last batch closing by age rather than by size) is latency, measured by the
end-to-end figure, not throughput. Each timed run, on either side, starts
with an empty table and a checkpoint.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import json
import pstats
import sys
import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import orjson
from aiokafka import AIOKafkaProducer

from benchmarks.common import CpuMeter, Stack, embedded_stack, machine, median, write_result
from consumers import sessions
from consumers.loader import Loader
from consumers.rows import BEHAVIOR, STOREFRONT, TableSpec
from consumers.values import Row, as_datetime, pg_times
from ingest.collector.enrich import Received, behavior_record
from ingest.collector.models import BehaviorEvent
from ingest.core import logs, records
from ingest.core.db import Database
from ingest.core.runtime import tune_gc
from ingest.core.settings import Settings
from ingest.core.shops import Shop, ensure_shop
from ingest.core.topics import ensure_topics
from ingest.loadgen.traffic import Mix, Target, Traffic
from ingest.partitions import PartitionManager


def storefront_records(shop_id: str, n: int) -> list[tuple[bytes, bytes]]:
    """``n`` realistic storefront events as the collector would produce them: records of
    20 events of one session (a 20-event request), keyed by shop and session."""
    now = datetime.now(UTC).isoformat()
    kinds = ["page_view", "product_view", "add_to_cart", "begin_checkout", "purchase"]
    out: list[tuple[bytes, bytes]] = []
    for start in range(0, n, 20):
        session = f"sess-{(start // 20) % 20000}"
        events = [
            orjson.dumps(
                {
                    "event_id": str(uuid.uuid4()),
                    "shop_id": shop_id,
                    "anon_id": f"anon-{i % 5000}",
                    "session_id": session,
                    "event_type": kinds[i % len(kinds)],
                    "ts": now,
                    "props": {"url": f"https://shop.example/products/{i % 300}", "value": i % 97},
                    "product_id": f"gid://shopify/Product/{i % 300}",
                    "experiment_id": None,
                    "variant": None,
                    "received_at": now,
                }
            )
            for i in range(start, min(start + 20, n))
        ]
        out += records.pack(f"{shop_id}:{session}".encode(), events)
    return out


# Browsers as the collector's Received context describes them (user_sessions keeps it).
_AGENTS = (
    (
        "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko)"
        " Chrome/131.0.0.0 Safari/537.36",
        "desktop",
    ),
    (
        "Mozilla/5.0 (iPhone; CPU iPhone OS 18_1 like Mac OS X) AppleWebKit/605.1.15"
        " (KHTML, like Gecko) Version/18.1 Mobile/15E148 Safari/604.1",
        "mobile",
    ),
    (
        "Mozilla/5.0 (iPad; CPU OS 17_6 like Mac OS X) AppleWebKit/605.1.15"
        " (KHTML, like Gecko) Version/17.6 Mobile/15E148 Safari/604.1",
        "tablet",
    ),
)
_COUNTRIES = ("FR", "DE", "US", "GB", "ES")


def behavior_records(shop_id: str, n: int, domain: str) -> list[tuple[bytes, bytes]]:
    """``n`` realistic behavior events as the collector produces them: the load
    generator's beacons (20 events of one session), each event validated by the
    collector's model and enriched by ``behavior_record`` (server facts, session
    context), packed into one record per beacon, keyed by shop and session."""
    shop = Shop(uuid.UUID(shop_id), domain, None)
    traffic = Traffic(
        Target("http://bench.invalid", "wk_bench", shop_domain=domain),
        Mix(behavior=1.0, storefront=0.0, webhook=0.0),
        seed=7,
    )
    out: list[tuple[bytes, bytes]] = []
    count = 0
    while count < n:
        body = orjson.loads(traffic.next().body)
        events = body["events"][: n - count]
        agent, device = _AGENTS[count // 20 % len(_AGENTS)]
        context: dict[str, str | None] = {
            "user_agent": agent,
            "device_type": device,
            "client_ip": f"203.0.113.{count // 20 % 250}",
            "country_code": _COUNTRIES[count // 20 % len(_COUNTRIES)],
        }
        at = datetime.now(UTC)
        received = Received(
            at,
            timedelta(0),
            at + timedelta(minutes=5),
            context,
            {**context, "referrer": None, "language": None, "screen_resolution": None},
        )
        encoded = [
            orjson.dumps(behavior_record(BehaviorEvent.model_validate(e), shop, received))
            for e in events
        ]
        out += records.pack(f"{shop_id}:{events[0]['session_id']}".encode(), encoded)
        count += len(events)
    return out


async def prefill(
    settings: Settings, messages: list[tuple[bytes, bytes]], topic: str | None = None
) -> None:
    """Produce ``messages`` into ``topic`` (the storefront topic by default)."""
    producer = AIOKafkaProducer(
        bootstrap_servers=settings.bootstrap, acks="all", linger_ms=20, max_batch_size=512 * 1024
    )
    await producer.start()
    try:
        futures = [
            await producer.send(topic or settings.topic_storefront, value, key=key)
            for key, value in messages
        ]
        await asyncio.gather(*futures)
    finally:
        await producer.stop()


async def fresh_table(db: Database, spec: TableSpec = STOREFRONT) -> None:
    """An empty table (and ``user_sessions``, for a stream that keeps them) and a
    checkpoint before each timed run: no run pays for writing out the pages the one
    before it dirtied, and every run's upserts meet the same (no) sessions."""
    await db.pool.execute(f"TRUNCATE {spec.table}")
    if spec.keeps_sessions:
        await db.pool.execute("TRUNCATE user_sessions")
    # Needs a superuser or pg_checkpoint (--dsn may name neither): then without.
    with contextlib.suppress(asyncpg.InsufficientPrivilegeError):
        await db.pool.execute("CHECKPOINT")


_TIMES = [i for i, c in enumerate(STOREFRONT.columns) if c in ("ts", "received_at")]


async def raw_copy(
    db: Database,
    messages: list[tuple[bytes, bytes]],
    n: int,
    batch: int,
    cpu: CpuMeter,
    *,
    datetimes: bool = False,
) -> float:
    """Seconds for plain binary COPY of the first ``n`` decoded rows, batch by batch,
    one connection; times as the loader sends them, or with ``datetimes`` as asyncpg
    takes them by default (what hand-written asyncpg code sends)."""
    rows = [row for _, value in messages for row in STOREFRONT.rows(value)][:n]
    if datetimes:
        rows = [tuple(as_datetime(v) if i in _TIMES else v for i, v in enumerate(r)) for r in rows]
    await fresh_table(db)
    async with (
        db.pool.acquire() as conn,
        contextlib.nullcontext() if datetimes else pg_times(conn),
    ):
        cpu.start()
        started = time.perf_counter()
        for i in range(0, len(rows), batch):
            async with conn.transaction():
                await conn.copy_records_to_table(
                    "events", records=rows[i : i + batch], columns=STOREFRONT.columns
                )
        return time.perf_counter() - started


def behavior_rows(messages: list[tuple[bytes, bytes]], n: int) -> tuple[list[Row], list[object]]:
    """The first ``n`` rows of behavior records and their session contexts, decoded as
    the loader decodes them (its fast path; every record here takes it)."""
    rows: list[Row] = []
    contexts: list[object] = []
    for _, value in messages:
        decoded = BEHAVIOR.decode(value)
        if decoded is None:
            raise RuntimeError("a benchmark record the loader's fast decoder refuses")
        rows += decoded[0]
        contexts += decoded[1]
        if len(rows) >= n:
            break
    return rows[:n], contexts[:n]


async def raw_copy_sessions(
    db: Database, messages: list[tuple[bytes, bytes]], n: int, batch: int, cpu: CpuMeter
) -> float:
    """Seconds for plain binary COPY of the first ``n`` decoded behavior rows plus the
    loader's own ``user_sessions`` upsert of the same rows, once per batch, each batch
    in one transaction, one connection (times as the loader sends them)."""
    rows, contexts = behavior_rows(messages, n)
    await fresh_table(db, BEHAVIOR)
    async with db.pool.acquire() as conn, pg_times(conn):
        cpu.start()
        started = time.perf_counter()
        for i in range(0, len(rows), batch):
            async with conn.transaction():
                await conn.copy_records_to_table(
                    BEHAVIOR.table, records=rows[i : i + batch], columns=BEHAVIOR.columns
                )
                await sessions.upsert(conn, rows[i : i + batch], contexts[i : i + batch])
        return time.perf_counter() - started


async def loader_run(
    settings: Settings, db: Database, n: int, cpu: CpuMeter, spec: TableSpec = STOREFRONT
) -> float:
    """Seconds for the loader to load all ``n`` records once it owns its partitions."""
    await fresh_table(db, spec)
    group = f"bench-{uuid.uuid4().hex[:8]}"
    run = settings.model_copy(update={"consumer_group": group})
    loader = Loader(run, spec, db, PartitionManager(db))
    await loader.start()
    try:
        while len(loader.positions) < run.topic_partitions:
            await asyncio.sleep(0.005)
        cpu.start()
        started = time.perf_counter()
        while loader.rows_loaded < n:
            await asyncio.sleep(0.005)
        return time.perf_counter() - started
    finally:
        await loader.stop()


async def bench(stack: Stack, rows: int, repeat: int, profile: str | None = None) -> dict[str, Any]:
    """Alternate raw COPY and loader runs on each stream; report medians and their ratio
    (storefront at the top level, behavior under ``"behavior"``)."""
    tag = uuid.uuid4().hex[:6]
    settings = Settings(
        postgres_dsn=stack.dsn,
        kafka_bootstrap=stack.bootstrap,
        kafka_log_id=stack.log_id,
        topic_storefront=f"bench.storefront.{tag}",
        topic_behavior=f"bench.behavior.{tag}",
        kafka_session_timeout_ms=6000,
        loader_metrics_port=0,
    )
    await ensure_topics(
        settings.bootstrap,
        [settings.topic_storefront, settings.topic_behavior],
        partitions=settings.topic_partitions,
    )
    batch = settings.batch_max_rows
    async with Database(stack.dsn, max_size=4) as db:
        shop = await ensure_shop(db, "bench.myshopify.com")
        await PartitionManager(db).maintain()
        spare = max(2 * batch, rows // 5)
        values = storefront_records(str(shop.shop_id), rows + spare)
        await prefill(settings, values)
        behavior = behavior_records(str(shop.shop_id), rows + spare, shop.domain)
        await prefill(settings, behavior, settings.topic_behavior)
        copy_s: list[float] = []
        loader_s: list[float] = []
        plain_s: list[float] = []
        cpu = CpuMeter(stack.pids)
        tune_gc(settings)  # as a loader process does (both sides run in this process)
        # An untimed pair first: first runs pay for imports, prepared statements, caches.
        warm = min(rows, 4 * batch)
        await raw_copy(db, values, warm, batch, cpu)
        await loader_run(settings, db, warm, cpu)
        for _ in range(repeat):
            copy_s.append(await raw_copy(db, values, rows, batch, cpu))
            copy_cpu = cpu.stop()
            loader_s.append(await loader_run(settings, db, rows, cpu))
            loader_cpu = cpu.stop()
            plain_s.append(await raw_copy(db, values, rows, batch, cpu, datetimes=True))
            cpu.stop()
        # The behavior stream, the same way: its own warm-up pair, then alternate runs.
        b_copy_s: list[float] = []
        b_loader_s: list[float] = []
        await raw_copy_sessions(db, behavior, warm, batch, cpu)
        await loader_run(settings, db, warm, cpu, BEHAVIOR)
        for _ in range(repeat):
            b_copy_s.append(await raw_copy_sessions(db, behavior, rows, batch, cpu))
            b_copy_cpu = cpu.stop()
            b_loader_s.append(await loader_run(settings, db, rows, cpu, BEHAVIOR))
            b_loader_cpu = cpu.stop()
        sessions_kept = await db.pool.fetchval("SELECT count(*) FROM user_sessions")
        if profile:
            spec = BEHAVIOR if profile == "behavior" else STOREFRONT
            profiler = cProfile.Profile()
            profiler.enable()
            seconds = await loader_run(settings, db, rows, cpu, spec)
            profiler.disable()
            print(f"{profile} loader, {rows} rows: {seconds:.3f} s under cProfile", file=sys.stderr)
            pstats.Stats(profiler, stream=sys.stderr).sort_stats("tottime").print_stats(25)
    copy_rate, loader_rate = rows / median(copy_s), rows / median(loader_s)
    plain_rate = rows / median(plain_s)
    b_copy_rate, b_loader_rate = rows / median(b_copy_s), rows / median(b_loader_s)
    return {
        "rows": rows,
        "rows_in_topic": rows + spare,
        "batch_rows": batch,
        "connections": 1,
        "copy_rows_per_s": round(copy_rate),
        "loader_rows_per_s": round(loader_rate),
        "ratio_vs_copy": round(loader_rate / copy_rate, 3),
        "copy_seconds": [round(s, 3) for s in copy_s],
        "loader_seconds": [round(s, 3) for s in loader_s],
        # Context, not the target: raw COPY of the same rows with asyncpg's own
        # datetime encoding, as hand-written asyncpg code sends them.
        "copy_datetimes_rows_per_s": round(plain_rate),
        "ratio_vs_copy_datetimes": round(loader_rate / plain_rate, 3),
        # Where the cores went (last run): on a 2-core machine the loader's
        # Python, PostgreSQL and the broker share them, while raw COPY has no broker.
        "cpu_seconds_copy": copy_cpu,
        "cpu_seconds_loader": loader_cpu,
        # behavior_events plus user_sessions; the baseline is raw COPY of the same
        # rows plus the loader's own sessions upsert, once per batch, in its transaction.
        "behavior": {
            "rows": rows,
            "rows_in_topic": rows + spare,
            "batch_rows": batch,
            "connections": 1,
            "sessions": sessions_kept,  # user_sessions rows after the last run
            "copy_rows_per_s": round(b_copy_rate),
            "loader_rows_per_s": round(b_loader_rate),
            "ratio_vs_copy": round(b_loader_rate / b_copy_rate, 3),
            "copy_seconds": [round(s, 3) for s in b_copy_s],
            "loader_seconds": [round(s, 3) for s in b_loader_s],
            "cpu_seconds_copy": b_copy_cpu,
            "cpu_seconds_loader": b_loader_cpu,
        },
    }


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--dsn", help="PostgreSQL to use instead of an embedded one")
    parser.add_argument(
        "--profile",
        choices=["storefront", "behavior"],
        help="then cProfile one more loader run of this stream (stderr)",
    )
    parser.add_argument(
        "--stack",
        help="a running stack as JSON (benchmarks.run): print the result as one JSON line",
    )
    args = parser.parse_args()
    logs.configure("warning")
    if args.stack:
        result = await bench(Stack(**json.loads(args.stack)), args.rows, args.repeat)
        print(json.dumps(result))
        return
    async with embedded_stack(args.dsn) as stack:
        result = await bench(stack, args.rows, args.repeat, args.profile)
    result = {"machine": machine(), "loader": result}
    path = write_result("loader", result)
    print(orjson.dumps(result["loader"], option=orjson.OPT_INDENT_2).decode())
    print(f"written to {path}")


if __name__ == "__main__":
    asyncio.run(main())
