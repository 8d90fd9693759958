"""Incremental refresh of the rollup tables (migrations 0012, 0014).

Each rollup has a watermark in ``rollup_state``: a transaction id (``watermark_xid``)
from which the event rows' ``load_xid`` (the transaction that wrote them) are new to
it, and the time of the snapshot it was taken in (``watermark``: the lag). A refresh,
in one transaction per rollup, under a transaction-level advisory lock of that
rollup:

1. reads the watermark W and takes X, the oldest transaction still running: every
   transaction below X has finished, so all its rows are visible from here on;
2. finds the groups (shop, UTC day; shop, experiment; shop, session) of the rows
   with ``load_xid >= W``: a late event for an old day names that old day,
   whenever it was received (a spool drained after an outage, a dead letter
   replayed): load order, not ``received_at``;
3. deletes those groups' rows and recomputes them whole from the source tables;
4. sets the watermark to X.

A row whose transaction commits after the refresh's snapshot has ``load_xid >= X``
whatever its timestamps, and is found by the next refresh: no margin to guess, and
nothing missed however long a loader's transaction lasts. Rows of transactions the
refresh saw above X are recomputed once more next time: groups are recomputed whole,
so that costs time only. Migration 0014 gives the full reasoning.

The first refresh after 0014 (``watermark_xid`` NULL: rows loaded before carry no
``load_xid``) is a full one. ``component_performance`` counts sessions in the
``lead_capture`` funnel, so its watermark never passes ``conversion_funnels``'
(refreshed first): a session's funnel rows are current when its days are recomputed.

``recompute(db, shop_id, days)`` recomputes one shop's groups without touching the
watermarks: after an erasure deleted a visitor's rows (which no watermark sees).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import Any

import asyncpg
import structlog

from ingest.core import metrics
from ingest.core.db import Database, queries

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class Rollup:
    """A rollup table and the named queries that maintain it."""

    name: str
    groups: str  # (shop_id, key) of rows loaded from xid $1 on
    groups_all: str  # every group within retention (a full refresh)
    groups_shop: str  # one shop's groups ($1 shop; $2 days or NULL when by_day)
    delete: str  # the groups ($1 shops, $2 keys)
    delete_all: str
    insert: tuple[str, ...]  # recompute the groups ($1 shops, $2 keys); the last counts
    by_day: bool = True  # keys are UTC days
    after: str | None = None  # a rollup whose watermark this one never passes


# In refresh order: conversion_funnels before component_performance, which reads it.
ROLLUPS: dict[str, Rollup] = {
    r.name: r
    for r in (
        Rollup(
            "conversion_funnels",
            "rollup_funnel_sessions",
            "rollup_funnel_sessions_all",
            "rollup_funnel_sessions_shop",
            "rollup_funnel_delete",
            "rollup_funnel_delete_all",
            (
                "rollup_funnel_stage",
                "rollup_funnel_stage_fill",
                "rollup_funnel_stage_index",
                "rollup_funnel_stage_analyze",
                "rollup_funnel_insert",
            ),
            by_day=False,
        ),
        Rollup(
            "daily_friction_summary",
            "rollup_behavior_days",
            "rollup_behavior_days_all",
            "rollup_behavior_days_shop",
            "rollup_friction_delete",
            "rollup_friction_delete_all",
            ("rollup_friction_insert",),
        ),
        Rollup(
            "component_performance",
            "rollup_behavior_component_days",
            "rollup_behavior_days_all",
            "rollup_behavior_days_shop",
            "rollup_component_delete",
            "rollup_component_delete_all",
            ("rollup_component_insert",),
            after="conversion_funnels",
        ),
        Rollup(
            "results_aggregates",
            "rollup_experiment_groups",
            "rollup_experiment_groups_all",
            "rollup_experiment_groups_shop",
            "rollup_results_delete",
            "rollup_results_delete_all",
            ("rollup_results_insert",),
            by_day=False,
        ),
    )
}

# Statements of an insert sequence that take no (shops, keys) arguments.
_NO_ARGS = frozenset(
    {"rollup_funnel_stage", "rollup_funnel_stage_index", "rollup_funnel_stage_analyze"}
)


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


async def _recompute_groups(
    conn: asyncpg.Connection, rollup: Rollup, shops: list[Any], keys: list[Any]
) -> int:
    """Delete the groups' rows and insert them again; the rows inserted."""
    await queries.execute(conn, rollup.delete, shops, keys)
    return await _insert(conn, rollup, shops, keys)


async def _insert(
    conn: asyncpg.Connection, rollup: Rollup, shops: list[Any], keys: list[Any]
) -> int:
    status = ""
    for name in rollup.insert:
        if name in _NO_ARGS:
            await queries.execute(conn, name)
        else:
            status = await queries.execute(conn, name, shops, keys)
    return _count(status)


async def refresh_one(
    db: Database, rollup: Rollup, *, full: bool = False, dry_run: bool = False
) -> RefreshResult:
    """Refresh ``rollup`` in one transaction (see the module's docstring)."""
    started = time.perf_counter()
    async with db.pool.acquire() as conn, conn.transaction():
        await queries.execute(conn, "rollup_lock", rollup.name)
        state = await queries.fetchrow(conn, "rollup_claim", rollup.name)
        assert state is not None, f"rollup_state has no row for {rollup.name}"
        since: datetime = state["watermark"]
        since_xid: int | None = state["watermark_xid"]
        full = full or since_xid is None  # rows loaded before 0014 carry no load_xid
        upto_xid: int = state["upto_xid"]
        upto: datetime = state["upto_at"]
        if rollup.after is not None:
            other = await queries.fetchrow(conn, "rollup_watermark_xid", rollup.after)
            if other is not None and other["watermark_xid"] is not None:
                upto_xid = min(upto_xid, other["watermark_xid"])
                upto = max(since, min(upto, other["watermark"]))
        if full:
            groups = await queries.fetch(conn, rollup.groups_all)
        else:
            groups = await queries.fetch(conn, rollup.groups, since_xid)
        shops = [g[0] for g in groups]
        keys = [g[1] for g in groups]
        rows = 0
        if not dry_run:
            if full:
                await queries.execute(conn, rollup.delete_all)
                rows = await _insert(conn, rollup, shops, keys)
            else:
                rows = await _recompute_groups(conn, rollup, shops, keys)
            took_ms = (time.perf_counter() - started) * 1000
            await queries.execute(
                conn, "rollup_advance", rollup.name, upto, full, len(groups), took_ms, upto_xid
            )
    result = RefreshResult(
        rollup.name,
        full,
        dry_run,
        len(groups),
        rows,
        _BEGINNING if full else since,
        upto,
        time.perf_counter() - started,
    )
    log.debug("rollup refreshed", **result.as_dict())  # the CLI prints its own summary
    return result


# A full refresh's "since" in its result.
_BEGINNING = datetime(1970, 1, 1, tzinfo=UTC)


@contextlib.asynccontextmanager
async def _connection(
    db_or_conn: Database | asyncpg.Connection,
) -> AsyncIterator[asyncpg.Connection]:
    if isinstance(db_or_conn, Database):
        async with db_or_conn.pool.acquire() as conn:
            yield conn
    else:
        yield db_or_conn


async def recompute(
    db_or_conn: Database | asyncpg.Connection,
    shop_id: uuid.UUID,
    days: Sequence[date] | None = None,
    *,
    tables: Sequence[str] | None = None,
) -> dict[str, int]:
    """Recompute shop ``shop_id``'s rollup rows (its ``days``, or all when None).

    For deletions no watermark sees: after an erasure removed a visitor's rows, its
    funnel rows go (every session of the shop is walked again: a session whose events
    are gone gets none), the days' friction and component rows and the shop's
    experiments are recomputed (``tables``: only those rollups). Watermarks are left
    alone; each rollup is done in its own transaction under the refresh's lock (on
    ``db_or_conn`` itself when it is a connection, outside any transaction: an
    erasure's). Returns the rows inserted per rollup.
    """
    out: dict[str, int] = {}
    for rollup in ROLLUPS.values():
        if tables is not None and rollup.name not in tables:
            continue
        async with _connection(db_or_conn) as conn, conn.transaction():
            await queries.execute(conn, "rollup_lock", rollup.name)
            if rollup.by_day:
                args: tuple[Any, ...] = (shop_id, list(days) if days is not None else None)
            else:
                args = (shop_id,)
            groups = await queries.fetch(conn, rollup.groups_shop, *args)
            shops = [g[0] for g in groups]
            keys = [g[1] for g in groups]
            out[rollup.name] = await _recompute_groups(conn, rollup, shops, keys)
    log.info("rollups recomputed", shop_id=str(shop_id), days=len(days or []), **out)
    return out


async def refresh(
    db: Database,
    *,
    tables: list[str] | None = None,
    full: bool = False,
    dry_run: bool = False,
) -> list[RefreshResult]:
    """Refresh every rollup (or ``tables``), then drop rows past retention.

    Raises KeyError for a name that is no rollup (the CLI checks names first).
    """
    unknown = [t for t in tables or [] if t not in ROLLUPS]
    if unknown:
        raise KeyError(unknown[0])
    chosen = [r for r in ROLLUPS.values() if not tables or r.name in tables]  # refresh order
    results = [await refresh_one(db, r, full=full, dry_run=dry_run) for r in chosen]
    if not dry_run:
        pruned = await queries.fetchval(db.pool, "rollup_daily_prune")
        if pruned:
            log.debug("rollup rows past retention removed", rows=pruned)
    return results


async def status(db: Database, *, max_lag_s: float | None = None) -> list[RollupStatus]:
    """Every rollup's watermark, last refresh, lag and rows; sets the rollup gauges
    (``eventpipe_rollup_lag_seconds``, and ``_max_lag_seconds`` when ``max_lag_s``)."""
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
        metrics.ROLLUP_LAG.labels(r["rollup"]).set(lag)
    if max_lag_s is not None:
        metrics.ROLLUP_MAX_LAG.set(max_lag_s)
    return out


async def export_gauges(
    db: Database, every_s: float, max_lag_s: float, stop: asyncio.Event
) -> None:
    """Read ``rollup_state`` every ``every_s`` and set the rollup gauges, until ``stop``.

    Run by loader processes (long-lived and scraped): the lag is read from the
    database, so it tells whatever refreshes the rollups (``up``'s timer, a CronJob),
    or fails to. ``every_s`` 0: never.
    """
    if every_s <= 0:
        return
    while not stop.is_set():
        try:
            await status(db, max_lag_s=max_lag_s)
        except Exception as exc:  # PostgreSQL away: the last figures stay, try again later
            log.warning("cannot read rollup status for the gauges", error=str(exc))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), every_s)
