"""Rollup refresh benchmark: an incremental refresh after one new hour of events against
the full recompute, same data, same run.

    python -m benchmarks.rollups_bench [--dsn postgresql://...] [--quick]

Without ``--dsn`` it starts an embedded PostgreSQL in a temporary directory. Either way
it works in a scratch database it creates and drops. The data: 2 million behavior
events (``--quick``: 200 000) over 60 days, 5 shops, sessions of 20 events within a
day, a storefront event stream of a sixth of that with 2 experiments per shop, and two
funnels per shop (``lead_capture``: form start, submit; ``checkout``: product view, add
to cart, purchase). Each day is loaded by a transaction of its own, as loaders would.

Measured, in ``benchmarks/results/rollups.json`` (or the suite's results):

* ``full_s``: ``refresh(full=True)`` of every rollup, the faster of two runs (the
  baseline is never made slower than it is);
* ``incremental_s``: the median of 3 rounds of (load one new hour of events, at the
  same rate, into the current hour; ``refresh()``);
* ``full_vs_incremental``: their ratio (the goal: at least 20), and both per rollup.
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

import asyncpg

if __package__ in (None, ""):  # run as a script: make the project importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import scratch_database
from ingest.core import logs
from ingest.core.db import Database
from ingest.core.shops import ensure_shop
from ingest.partitions import PartitionManager, month_start
from ingest.rollups import RefreshResult, refresh

RESULTS = Path(__file__).resolve().parent / "results" / "rollups.json"
SHOPS = 5
DAYS = 60
SESSION_EVENTS = 20
ROUNDS = 3

# One batch of behavior events: $1 shops, $2 day start, $3 sessions, $4 first session
# number, $5 seconds the sessions start within, $6 session id prefix. Event types, paths
# and components drawn with random() (setseed first: the same data every run).
BEHAVIOR = """
INSERT INTO behavior_events (event_id, shop_id, session_id, event_type, element_path,
  element_type, event_data, "timestamp", page_url, component_id, received_at)
SELECT gen_random_uuid(), ($1::uuid[])[1 + s % cardinality($1::uuid[])],
  $6 || s::text, t.kind,
  (ARRAY['#buy', 'form#signup', 'a.nav', 'div.hero > button', NULL])[1 + floor(random() * 5)::int],
  'button',
  CASE WHEN t.kind = 'hesitation'
       THEN jsonb_build_object('hesitation_ms', 1500 + floor(random() * 7000)::int)
       WHEN t.kind = 'scroll_depth'
       THEN jsonb_build_object('percentage', 25 * (1 + floor(random() * 4)::int))
       ELSE '{}'::jsonb END,
  $2::timestamptz + make_interval(secs => (s * 7919) % $5 + i * 9),
  (ARRAY['https://s/', 'https://s/product/1', 'https://s/cart', 'https://s/checkout'])
    [1 + floor(random() * 4)::int],
  (ARRAY['hero', 'cta', 'nav', 'footer', NULL, NULL])[1 + floor(random() * 6)::int],
  now()
FROM generate_series($4::int, $4::int + $3::int - 1) s,
     generate_series(0, 19) i,
     LATERAL (SELECT (ARRAY['click', 'click', 'click', 'scroll', 'hover', 'rage_click',
       'hesitation', 'form_start', 'form_abandon', 'form_submit', 'error', 'page_view',
       'page_view', 'scroll_depth'])[1 + floor(random() * 14 + 0 * (s + i))::int] AS kind) t
"""
# A third of the sessions: 6 storefront events each, tagged with one of 2 experiments.
STOREFRONT = """
INSERT INTO events (event_id, shop_id, anon_id, session_id, event_type, ts, props,
  experiment_id, variant, received_at)
SELECT gen_random_uuid(), ($1::uuid[])[1 + s % cardinality($1::uuid[])],
  'anon-' || $6 || s::text, $6 || s::text, k.kind,
  $2::timestamptz + make_interval(secs => (s * 7919) % $5 + k.n * 15 + 4),
  CASE WHEN k.kind = 'purchase' THEN jsonb_build_object('value', 10 + s % 90)
       ELSE jsonb_build_object('url', 'https://s/product/1') END,
  'exp-' || (s % 2), CASE WHEN s % 4 < 2 THEN 'control' ELSE 'variant_a' END, now()
FROM generate_series($4::int, $4::int + $3::int - 1) s,
     unnest(ARRAY['page_view', 'product_view', 'add_to_cart', 'begin_checkout',
                  'product_view', 'purchase']) WITH ORDINALITY k(kind, n)
WHERE s % 3 = 0 AND (k.kind <> 'purchase' OR s % 6 = 0)
"""
SESSIONS = """
INSERT INTO user_sessions (shop_id, session_id, landing_page, exit_reason, device_type,
  first_seen_at, last_seen_at)
SELECT ($1::uuid[])[1 + s % cardinality($1::uuid[])], $6 || s::text, 'https://s/',
  (ARRAY['timeout', 'navigation', 'close', NULL])[1 + s % 4],
  (ARRAY['mobile', 'desktop', 'tablet'])[1 + s % 3],
  $2::timestamptz + make_interval(secs => (s * 7919) % $5),
  $2::timestamptz + make_interval(secs => (s * 7919) % $5 + 180)
FROM generate_series($4::int, $4::int + $3::int - 1) s
"""
FUNNELS = [
    ("lead_capture", '[{"name": "form", "event_type": "form_start"}, '
                     '{"name": "sent", "event_type": "form_submit"}]'),
    ("checkout", '[{"name": "product", "event_type": "product_view"}, '
                 '{"name": "cart", "event_type": "add_to_cart"}, '
                 '{"name": "bought", "event_type": "purchase"}]'),
]  # fmt: skip


async def _load(
    conn: asyncpg.Connection,
    shops: list[uuid.UUID],
    start: datetime,
    sessions: int,
    first: int,
    within_s: int,
    prefix: str,
) -> None:
    """One batch of sessions, behavior and storefront events, in one transaction."""
    args = (shops, start, sessions, first, within_s, prefix)
    async with conn.transaction():
        for sql in (SESSIONS, BEHAVIOR, STOREFRONT):
            await conn.execute(sql, *args)


def _by_rollup(results: list[RefreshResult]) -> dict[str, float]:
    return {r.rollup: round(r.duration_s, 4) for r in results}


async def bench(dsn: str, events: int) -> dict[str, Any]:
    """Load, then time the full and the incremental refreshes in database ``dsn``."""
    now = datetime.now(UTC)
    today = datetime(now.year, now.month, now.day, tzinfo=UTC)
    per_day = -(-events // (DAYS * SESSION_EVENTS))  # sessions a day (rounded up)
    async with Database(dsn, max_size=2) as db:
        manager = PartitionManager(db)
        months = {month_start(today - timedelta(days=d)) for d in range(DAYS + 1)}
        for table in ("behavior_events", "events"):
            await manager.ensure_months(table, months)
        shops = [
            (await ensure_shop(db, f"bench-{i}-{uuid.uuid4().hex[:6]}.myshopify.com")).shop_id
            for i in range(SHOPS)
        ]
        for shop in shops:
            for name, steps in FUNNELS:
                await db.pool.execute(
                    "INSERT INTO funnels (shop_id, name, steps) VALUES ($1, $2, $3::jsonb)",
                    shop,
                    name,
                    steps,
                )
        started = time.perf_counter()
        async with db.pool.acquire() as conn:
            await conn.execute("SELECT setseed(0.24)")
            for d in range(DAYS, 0, -1):  # the 60 days before today, a transaction each
                await _load(conn, shops, today - timedelta(days=d), per_day, 0, 86000, f"d{d}-")
            await conn.execute("ANALYZE behavior_events, events, user_sessions")
        load_s = time.perf_counter() - started
        behavior = await db.pool.fetchval("SELECT count(*) FROM behavior_events")
        storefront = await db.pool.fetchval("SELECT count(*) FROM events")

        await refresh(db)  # the first refresh after migration 0014 is full anyway
        fulls = []
        for _ in range(2):
            t0 = time.perf_counter()
            full = await refresh(db, full=True)
            fulls.append((time.perf_counter() - t0, full))
        full_s, full_results = min(fulls, key=lambda f: f[0])

        hour = max(1, per_day // 24)  # sessions of one hour at the same rate
        rounds = []
        async with db.pool.acquire() as conn:
            for r in range(ROUNDS):
                start = datetime.now(UTC) - timedelta(hours=1)
                start = max(start, today)  # the current UTC day
                await _load(conn, shops, start, hour, 0, 3000, f"h{r}-{uuid.uuid4().hex[:4]}-")
                t0 = time.perf_counter()
                inc = await refresh(db)
                rounds.append((time.perf_counter() - t0, inc))
        incremental_s = statistics.median(t for t, _ in rounds)
        inc_results = sorted(rounds, key=lambda r: r[0])[len(rounds) // 2][1]
        new_hour = hour * SESSION_EVENTS
        server = await db.pool.fetchval("SHOW server_version")
    full_by = _by_rollup(full_results)
    inc_by = _by_rollup(inc_results)
    return {
        "measured_at": now.isoformat(),
        "server_version": server,
        "behavior_events": behavior,
        "storefront_events": storefront,
        "days": DAYS,
        "shops": SHOPS,
        "funnels_per_shop": len(FUNNELS),
        "load_s": round(load_s, 1),
        "new_hour_behavior_events": new_hour,
        "full_s": round(full_s, 3),
        "full_runs_s": [round(t, 3) for t, _ in fulls],
        "incremental_s": round(incremental_s, 4),
        "incremental_runs_s": [round(t, 4) for t, _ in rounds],
        "full_vs_incremental": round(full_s / incremental_s, 1),
        "full_s_by_rollup": full_by,
        "incremental_s_by_rollup": inc_by,
        "full_vs_incremental_by_rollup": {
            k: round(full_by[k] / inc_by[k], 1) for k in full_by if inc_by.get(k)
        },
        "incremental_groups": {r.rollup: r.groups for r in inc_results},
        "rounds": ROUNDS,
    }


async def main(dsn: str | None, quick: bool = False) -> dict[str, Any]:
    """Start a server unless ``dsn`` is given, make a scratch database, bench, clean up."""
    events = 200_000 if quick else 2_000_000
    with tempfile.TemporaryDirectory() as tmp:
        async with scratch_database(dsn, Path(tmp)) as scratch:
            return await bench(scratch, events)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--dsn", help="an existing server (default: embedded PostgreSQL)")
    parser.add_argument("--quick", action="store_true", help="200 000 events instead of 2M")
    args = parser.parse_args()
    logs.configure("warning")
    result = asyncio.run(main(args.dsn, args.quick))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
