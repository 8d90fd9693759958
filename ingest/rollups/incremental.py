"""Incremental refresh of the rollup tables (migration 0012).

Each rollup has a watermark on ``received_at`` in ``rollup_state``. A refresh, in
one transaction per rollup, under a transaction-level advisory lock of that
rollup:

1. reads the watermark W and sets the bound U = now - ``margin_s`` (never below W);
2. finds the groups (shop, UTC day; or shop, experiment) of the rows received in
   (W, U]: a late event for an old day names that old day;
3. deletes those groups' rows and recomputes them whole from the source tables;
4. sets the watermark to U.

Why the margin: ``received_at`` is stamped by the collector before the loaders'
transaction commits, so a row received at t may become visible a little after t.
Rows received up to U whose transaction commits after the refresh's snapshot would
be missed; the margin (seconds, several batch ages) makes that window one no
loader stays in. A row received before U but loaded much later (a spool drained
after a broker outage, a dead letter replayed) is only seen by ``full``.

Recomputing a group reads all its rows, whatever their received_at, so rows
received after U in a recomputed group are counted now and counted again (not
twice: the group is recomputed whole) when the next refresh sees them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import structlog

from ingest.core.db import Database, queries

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class Rollup:
    """A rollup table and the named queries that maintain it."""

    name: str
    groups: str  # (shop_id, key) received in ($1, $2]
    delete: str  # the groups ($1 shops, $2 keys)
    delete_all: str
    insert: str  # recompute the groups ($1 shops, $2 keys)


ROLLUPS: dict[str, Rollup] = {
    r.name: r
    for r in (
        Rollup(
            "daily_friction_summary",
            "rollup_behavior_days",
            "rollup_friction_delete",
            "rollup_friction_delete_all",
            "rollup_friction_insert",
        ),
        Rollup(
            "component_performance",
            "rollup_behavior_component_days",
            "rollup_component_delete",
            "rollup_component_delete_all",
            "rollup_component_insert",
        ),
        Rollup(
            "results_aggregates",
            "rollup_experiment_groups",
            "rollup_results_delete",
            "rollup_results_delete_all",
            "rollup_results_insert",
        ),
    )
}


@dataclass(frozen=True)
class RefreshResult:
    """What one rollup's refresh did (or, dry, would do)."""

    rollup: str
    full: bool
    dry_run: bool
    groups: int
    rows: int
    since: datetime
    upto: datetime
    duration_s: float

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        return {
            "rollup": self.rollup,
            "full": self.full,
            "dry_run": self.dry_run,
            "groups": self.groups,
            "rows": self.rows,
            "since": self.since.isoformat(),
            "upto": self.upto.isoformat(),
            "duration_s": round(self.duration_s, 4),
        }


@dataclass(frozen=True)
class RollupStatus:
    """A rollup's state: how fresh it is and how many rows it holds."""

    rollup: str
    watermark: datetime
    last_refresh_at: datetime | None
    last_full_at: datetime | None
    last_groups: int
    last_duration_ms: float
    lag_s: float  # now - watermark (infinite before the first refresh)
    rows: int

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready (an infinite lag is null)."""
        finite = self.lag_s != float("inf")
        return {
            "rollup": self.rollup,
            "watermark": self.watermark.isoformat() if finite else None,
            "last_refresh_at": self.last_refresh_at.isoformat() if self.last_refresh_at else None,
            "last_full_at": self.last_full_at.isoformat() if self.last_full_at else None,
            "last_groups": self.last_groups,
            "last_duration_ms": self.last_duration_ms,
            "lag_s": round(self.lag_s, 3) if finite else None,
            "rows": self.rows,
        }


def _count(status: str) -> int:
    """The row count of a command status such as ``INSERT 0 12``."""
    tail = status.rsplit(" ", 1)[-1]
    return int(tail) if tail.isdigit() else 0


# A full refresh's groups: every row (received_at is always later than this).
_BEGINNING = datetime(1970, 1, 1, tzinfo=UTC)


async def refresh_one(
    db: Database, rollup: Rollup, *, full: bool = False, dry_run: bool = False, margin_s: float
) -> RefreshResult:
    """Refresh ``rollup`` in one transaction (see the module's docstring)."""
    started = time.perf_counter()
    async with db.pool.acquire() as conn, conn.transaction():
        await queries.execute(conn, "rollup_lock", rollup.name)
        state = await queries.fetchrow(conn, "rollup_claim", rollup.name, margin_s)
        assert state is not None, f"rollup_state has no row for {rollup.name}"
        watermark: datetime = state["watermark"]
        since = _BEGINNING if full else watermark
        upto: datetime = state["upto"]
        groups = await queries.fetch(conn, rollup.groups, since, upto)
        shops = [g["shop_id"] for g in groups]
        keys = [g[1] for g in groups]
        rows = 0
        if not dry_run:
            if full:
                await queries.execute(conn, rollup.delete_all)
            else:
                await queries.execute(conn, rollup.delete, shops, keys)
            rows = _count(await queries.execute(conn, rollup.insert, shops, keys))
            took_ms = (time.perf_counter() - started) * 1000
            await queries.execute(
                conn, "rollup_advance", rollup.name, upto, full, len(groups), took_ms
            )
    result = RefreshResult(
        rollup.name, full, dry_run, len(groups), rows, since, upto, time.perf_counter() - started
    )
    log.debug("rollup refreshed", **result.as_dict())  # the CLI prints its own summary
    return result


async def refresh(
    db: Database,
    *,
    tables: list[str] | None = None,
    full: bool = False,
    dry_run: bool = False,
    margin_s: float = 60.0,
) -> list[RefreshResult]:
    """Refresh every rollup (or ``tables``), then drop rows past retention.

    Raises KeyError for a name that is no rollup (the CLI checks names first).
    """
    chosen = [ROLLUPS[t] for t in tables] if tables else list(ROLLUPS.values())
    results = [
        await refresh_one(db, r, full=full, dry_run=dry_run, margin_s=margin_s) for r in chosen
    ]
    if not dry_run:
        pruned = await queries.fetchval(db.pool, "rollup_daily_prune")
        if pruned:
            log.debug("rollup rows past retention removed", rows=pruned)
    return results


async def status(db: Database) -> list[RollupStatus]:
    """Every rollup's watermark, last refresh, lag and rows."""
    out = []
    for r in await queries.fetch(db.pool, "rollup_status"):
        watermark: datetime = r["watermark"]
        lag = float("inf") if r["last_refresh_at"] is None else float(r["lag_s"])
        out.append(
            RollupStatus(
                r["rollup"],
                watermark,
                r["last_refresh_at"],
                r["last_full_at"],
                int(r["last_groups"]),
                float(r["last_duration_ms"]),
                lag,
                int(r["row_count"] or 0),
            )
        )
    return out
