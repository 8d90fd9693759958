"""Partition manager benchmark: a no-op ``maintain`` over 36 monthly partitions, and insert stalls.

    python -m benchmarks.partitions_bench [--dsn postgresql://...] [--rounds 20]

Without ``--dsn`` it starts an embedded PostgreSQL in a temporary directory.
Either way it works in a scratch database it creates and drops. Reports, in
``benchmarks/results/partitions.json``:

* ``noop_maintain_s``: median seconds of ``maintain`` when nothing is to be done
  (behavior_events with 36 monthly partitions: retention 32 months + 3 ahead);
* ratios against baselines measured in the same run: one ``SELECT 1`` round
  trip, and the catalog query listing the partitions;
* ``writer_max_gap_s``: the longest gap between a writer's consecutive inserts
  into the current month while ``maintain`` creates one month and drops one.
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
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the project importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import scratch_database
from ingest.core.db import Database, queries
from ingest.partitions import PartitionManager, shift_months

RESULTS = Path(__file__).resolve().parent / "results" / "partitions.json"


async def _median(fn: Callable[[], Awaitable[Any]], rounds: int) -> float:
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        await fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


async def _writer_gaps(dsn: str, now: datetime, stop: asyncio.Event) -> tuple[float, int]:
    """Insert into the current month until ``stop``; (longest gap between inserts, inserts)."""
    gaps, count = [0.0], 0
    async with Database(dsn, max_size=1) as db:
        last = time.perf_counter()
        while not stop.is_set():
            await db.pool.execute(
                "INSERT INTO behavior_events (event_id, shop_id, session_id, event_type, "
                'page_url, "timestamp", received_at) '
                "VALUES ($1, $2, 's', 'click', 'https://x/', $3, $3)",
                uuid.uuid4(),
                uuid.uuid4(),
                now,
            )
            count += 1
            gaps.append(time.perf_counter() - last)
            last = time.perf_counter()
            await asyncio.sleep(0.002)
    return max(gaps), count


async def bench(dsn: str, rounds: int) -> dict[str, Any]:
    """Run the measurements in the (migrated) database ``dsn``."""
    now = datetime.now(UTC)
    async with Database(dsn, max_size=4) as db:
        await db.pool.execute(
            "DELETE FROM partition_policies WHERE table_name <> 'behavior_events'; "
            "UPDATE partition_policies SET retention = '32 months', months_ahead = 3"
        )
        manager = PartitionManager(db)
        start = time.perf_counter()
        created = len((await manager.maintain(now)).created)
        initial = time.perf_counter() - start
        partitions = len(await manager.existing_months("behavior_events"))
        assert not (await manager.maintain(now)).actions, "maintain is not idempotent"
        noop = await _median(lambda: manager.maintain(now), rounds)
        select1 = await _median(lambda: db.pool.fetchval("SELECT 1"), rounds)
        listing = await _median(
            lambda: queries.fetch(db.pool, "pm_children", "behavior_events"), rounds
        )
        stop = asyncio.Event()
        writer = asyncio.create_task(_writer_gaps(dsn, now, stop))
        await asyncio.sleep(0.3)
        start = time.perf_counter()
        moved = await manager.maintain(shift_months(now, 1))
        busy = time.perf_counter() - start
        await asyncio.sleep(0.3)
        stop.set()
        max_gap, inserts = await writer
        server = await db.pool.fetchval("SHOW server_version")
    return {
        "measured_at": now.isoformat(),
        "server_version": server,
        "partitions": partitions,
        "initial_create_partitions": created,
        "initial_create_s": round(initial, 4),
        "noop_maintain_s": round(noop, 5),
        "select1_roundtrip_s": round(select1, 6),
        "list_partitions_s": round(listing, 6),
        "noop_vs_select1": round(noop / select1, 1),
        "noop_vs_list_partitions": round(noop / listing, 1),
        "create_and_drop_actions": [a.kind for a in moved.actions],
        "create_and_drop_s": round(busy, 4),
        "writer_inserts": inserts,
        "writer_max_gap_s": round(max_gap, 4),
        "rounds": rounds,
    }


async def main(dsn: str | None, rounds: int) -> dict[str, Any]:
    """Start a server unless ``dsn`` is given, make a scratch database, bench, clean up."""
    with tempfile.TemporaryDirectory() as tmp:
        async with scratch_database(dsn, Path(tmp)) as scratch:
            return await bench(scratch, rounds)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dsn", help="an existing server (default: embedded PostgreSQL)")
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args()
    result = asyncio.run(main(args.dsn, args.rounds))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
