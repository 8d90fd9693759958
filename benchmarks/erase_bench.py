"""Erasure benchmark: ``eventpipe erase`` of 100,000 rows over 3 months while a writer inserts.

    python -m benchmarks.erase_bench [--dsn postgresql://...] [--rows 100000] [--others 100000]

Without ``--dsn`` it starts an embedded PostgreSQL in a temporary directory.
Either way it works in a scratch database it creates and drops. One shop holds
the visitor's rows (storefront events of its anonymous id and behavior events
of its sessions, spread evenly over the current month and the 2 before) and
as many rows of other visitors of the same shop; the erase by anonymous id
removes exactly the visitor's. Meanwhile a writer inserts one behavior event
at a time into the current month (another shop), as a loader's transaction
would. Reports, in ``benchmarks/results/erase.json``:

* ``erase_rows_per_s``: rows removed per second of the erase (its whole run:
  record, suppression, every partition of every table, the dead letters);
* ``writer_median_insert_s``: the writer's median insert time before the erase
  (the baseline, same run), ``writer_median_during_s`` during it;
* ``writer_max_insert_s``: the writer's worst insert during the erase (its
  worst stall), and ``writer_max_vs_median`` against the baseline.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the project importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import scratch_database
from ingest.core.db import Database
from ingest.core.settings import Settings
from ingest.partitions import (
    PartitionManager,
    add_months,
    month_bound,
    month_start,
    shift_months,
)
from ingest.privacy import Erasure, erase

RESULTS = Path(__file__).resolve().parent / "results" / "erase.json"
SHOP = "erase-bench.myshopify.com"
VISITOR = "visitor-erased"
SESSIONS = 100  # the visitor's sessions: its behavior events carry only these


def _times(now: datetime, n: int) -> list[datetime]:
    """``n`` times spread evenly over the current month and the 2 before (none after now)."""
    spans = []
    for k in (2, 1, 0):
        start = month_bound(month_start(shift_months(now, -k)))
        end = min(month_bound(add_months(month_start(start), 1)), now)
        spans.append((start, max(int((end - start).total_seconds()) - 1, 1)))
    return [spans[i % 3][0] + timedelta(seconds=(i * 7919) % spans[i % 3][1]) for i in range(n)]


async def _fill(db: Database, shop: uuid.UUID, now: datetime, rows: int, others: int) -> None:
    """The visitor's ``rows`` (60 % storefront events, 40 % behavior events of its
    sessions) and ``others`` rows of other visitors of the same shop, by COPY."""
    visitor_events = rows * 6 // 10
    visitor_behavior = rows - visitor_events
    events = []
    for i, ts in enumerate(_times(now, visitor_events + others // 2)):
        mine = i < visitor_events
        anon = VISITOR if mine else f"other-{i % 5000}"
        session = f"{VISITOR}-s{i % SESSIONS}" if mine else f"other-s{i % 5000}"
        events.append((uuid.uuid4(), shop, anon, session, "page_view", ts, "{}", ts))
    behavior = []
    for i, ts in enumerate(_times(now, visitor_behavior + others - others // 2)):
        mine = i < visitor_behavior
        session = f"{VISITOR}-s{i % SESSIONS}" if mine else f"other-s{i % 5000}"
        behavior.append((uuid.uuid4(), shop, session, "click", "https://shop.example/", ts, ts))
    async with db.pool.acquire() as conn:
        await conn.copy_records_to_table(
            "events",
            records=events,
            columns=[
                "event_id",
                "shop_id",
                "anon_id",
                "session_id",
                "event_type",
                "ts",
                "props",
                "received_at",
            ],
        )
        await conn.copy_records_to_table(
            "behavior_events",
            records=behavior,
            columns=[
                "event_id",
                "shop_id",
                "session_id",
                "event_type",
                "page_url",
                "timestamp",
                "received_at",
            ],
        )
        await conn.execute("ANALYZE events; ANALYZE behavior_events")


async def _writer(
    dsn: str, now: datetime, stop: asyncio.Event, marks: dict[str, float]
) -> list[tuple[float, float]]:
    """Insert one row at a time until ``stop``; (start time, seconds) of each insert."""
    timings: list[tuple[float, float]] = []
    async with Database(dsn, max_size=1) as db:
        while not stop.is_set():
            start = time.perf_counter()
            await db.pool.execute(
                "INSERT INTO behavior_events (event_id, shop_id, session_id, event_type, "
                'page_url, "timestamp", received_at) '
                "VALUES ($1, $2, 's', 'click', 'https://x/', $3, $3)",
                uuid.uuid4(),
                uuid.uuid4(),
                now,
            )
            timings.append((start, time.perf_counter() - start))
            await asyncio.sleep(0.002)
    marks["writer_done"] = time.perf_counter()
    return timings


async def bench(dsn: str, rows: int, others: int, state: Path) -> dict[str, Any]:
    """Run the measurement in the (migrated) database ``dsn``."""
    now = datetime.now(UTC)
    settings = Settings(postgres_dsn=dsn, state_dir=state)
    async with Database(dsn, max_size=4) as db:
        await PartitionManager(db).maintain(now)
        shop = await db.pool.fetchval(
            "INSERT INTO shops (domain, webhook_secret) VALUES ($1, 's') RETURNING id", SHOP
        )
        await _fill(db, shop, now, rows, others)
        before = await db.pool.fetchval("SELECT count(*) FROM events") + await db.pool.fetchval(
            "SELECT count(*) FROM behavior_events"
        )
        stop = asyncio.Event()
        marks: dict[str, float] = {}
        writer = asyncio.create_task(_writer(dsn, now, stop, marks))
        await asyncio.sleep(2.0)  # the baseline: the writer alone
        start = time.perf_counter()
        report = await erase(db, settings, Erasure(SHOP, anon_ids=[VISITOR]), dry_run=False)
        end = time.perf_counter()
        await asyncio.sleep(0.5)
        stop.set()
        timings = await writer
        after = await db.pool.fetchval("SELECT count(*) FROM events") + await db.pool.fetchval(
            "SELECT count(*) FROM behavior_events"
        )
        server = await db.pool.fetchval("SHOW server_version")
    removed = sum(report.rows.values())
    writer_rows = len(timings)
    if removed != rows or before + writer_rows - after != rows:
        raise AssertionError(f"erased {removed} rows ({report.rows}), expected {rows}")
    alone = [s for t, s in timings if t + s < start]
    during = [s for t, s in timings if t < end and t + s > start]
    seconds = end - start
    baseline = statistics.median(alone)
    return {
        "measured_at": now.isoformat(),
        "server_version": server,
        "rows_erased": removed,
        "rows_by_table": report.rows,
        "rows_of_other_visitors": others,
        "months": 3,
        "erase_batch_rows": settings.erase_batch_rows,
        "erase_s": round(seconds, 3),
        "erase_rows_per_s": round(removed / seconds),
        "writer_inserts_before": len(alone),
        "writer_inserts_during": len(during),
        "writer_median_insert_s": round(baseline, 6),
        "writer_median_during_s": round(statistics.median(during), 6),
        "writer_max_insert_s": round(max(during), 4),
        "writer_max_vs_median": round(max(during) / baseline, 1),
    }


async def main(dsn: str | None, rows: int = 100_000, others: int = 100_000) -> dict[str, Any]:
    """Start a server unless ``dsn`` is given, make a scratch database, bench, clean up."""
    with tempfile.TemporaryDirectory() as tmp:
        async with scratch_database(dsn, Path(tmp)) as scratch:
            return await bench(scratch, rows, others, Path(tmp))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dsn", help="an existing server (default: embedded PostgreSQL)")
    parser.add_argument("--rows", type=int, default=100_000, help="the visitor's rows")
    parser.add_argument("--others", type=int, default=100_000, help="other visitors' rows")
    args = parser.parse_args()
    result = asyncio.run(main(args.dsn, args.rows, args.others))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
