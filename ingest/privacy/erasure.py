"""``eventpipe erase``: delete every row of a visitor, in bounded batches, and record it.

Order matters: the request is recorded and the visitor's ids put on the
suppression list first (loaders drop their events from then on, within their
refresh interval), then each table is emptied of them: every table of the
schema with a ``shop_id`` and an ``anon_id``/``session_id``/``user_id`` column
(events, behavior events, sessions, identities, rollups: whatever migrations
made them), partition by partition, ``erase_batch_rows`` rows per DELETE, each
its own short transaction under ``lock_timeout`` (a DELETE takes ROW
EXCLUSIVE, which writers' COPY shares; the lock timeout keeps it from queueing
behind a partition DDL and blocking writers behind it), then the dead letters,
decoded, window by window. An anonymous id's sessions (read from ``events``)
are erased too: behavior events carry only the session.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import orjson
import structlog

from ingest.core.db import Database, queries
from ingest.core.errors import ConfigError, PartitionError
from ingest.core.settings import Settings
from ingest.core.suppression import id_hash
from ingest.partitions import lock_timeout, visitor_count, visitor_delete, visitor_match
from ingest.rollups import recompute as recompute_rollups

log = structlog.get_logger(__name__)

# JSON keys where a protocol keeps a user id in tables without a user_id column.
_JSON_USER_KEYS = {"props": "$user_id", "metadata": "user_id"}


@dataclass
class Erasure:
    """What to erase: a shop and ids of each kind."""

    shop: str
    anon_ids: list[str] = field(default_factory=list)
    user_ids: list[str] = field(default_factory=list)
    session_ids: list[str] = field(default_factory=list)

    def given(self) -> list[tuple[str, str]]:
        """(kind, id) as given, in order."""
        return [
            *(("anon_id", v) for v in self.anon_ids),
            *(("user_id", v) for v in self.user_ids),
            *(("session_id", v) for v in self.session_ids),
        ]


@dataclass
class ErasureReport:
    """Rows removed (or, dry run, that would be) per table."""

    shop: str
    dry_run: bool
    request_id: int | None = None
    repeat_of: list[int] = field(default_factory=list)
    derived_sessions: int = 0
    rows: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """For ``--json`` (no ids: they are not kept)."""
        return {
            "shop": self.shop,
            "dry_run": self.dry_run,
            "request_id": self.request_id,
            "repeat_of": self.repeat_of,
            "derived_sessions": self.derived_sessions,
            "rows": self.rows,
            "total": sum(self.rows.values()),
        }


def _matches(
    id_columns: Sequence[str], json_columns: Sequence[str], ids: dict[str, list[str]]
) -> tuple[list[tuple[str, str | None]], list[Any]]:
    """The columns to match a table's rows on and the arguments after the shop."""
    matches: list[tuple[str, str | None]] = []
    args: list[Any] = []
    for column in id_columns:
        if ids[column]:
            matches.append((column, None))
            args.append(ids[column])
    if "user_id" not in id_columns and ids["user_id"]:
        for column in json_columns:
            matches.append((column, _JSON_USER_KEYS[column]))
            args += [_JSON_USER_KEYS[column], ids["user_id"]]
    return matches, args


async def _batched(conn: asyncpg.Connection, settings: Settings, sql: str, args: list[Any]) -> int:
    """``sql`` (one bounded DELETE) again and again until a batch is short; each in its
    own transaction under lock_timeout, a lock wait retried with backoff."""
    total = 0
    while True:
        for attempt in range(settings.partition_lock_retries):
            try:
                async with conn.transaction():
                    await conn.execute(lock_timeout(settings.partition_lock_timeout_ms))
                    status = await conn.execute(sql, *args)
                break
            except asyncpg.LockNotAvailableError:
                await asyncio.sleep(min(0.1 * 2**attempt, 5.0))
        else:
            raise PartitionError(
                "erase: a table stayed locked (a partition DDL?); nothing is half-done: "
                "run the same erase again"
            )
        deleted = int(status.split()[-1])
        total += deleted
        if deleted < settings.erase_batch_rows:
            return total


async def erase(
    db: Database, settings: Settings, request: Erasure, *, dry_run: bool
) -> ErasureReport:
    """Erase (or count) every row of the visitor ``request`` names."""
    given = request.given()
    if not given:
        raise ConfigError("nothing to erase", hint="give --anon-id, --user-id or --session-id")
    if any(not v or "\x00" in v for _, v in given):
        raise ConfigError("an id is empty or holds NUL")
    shop_id = await queries.fetchval(db.pool, "erase_shop", request.shop)
    if shop_id is None:
        raise ConfigError(f"no shop {request.shop!r}", hint="see `eventpipe shops list`")
    shop = str(shop_id)
    report = ErasureReport(request.shop, dry_run)
    derived = (
        [
            r["session_id"]
            for r in await queries.fetch(
                db.pool, "erase_sessions_of_anon", shop_id, request.anon_ids
            )
        ]
        if request.anon_ids
        else []
    )
    sessions = list(dict.fromkeys([*request.session_ids, *derived]))
    report.derived_sessions = len(set(derived) - set(request.session_ids))
    ids = {"anon_id": request.anon_ids, "session_id": sessions, "user_id": request.user_ids}

    async with db.pool.acquire() as conn:
        if not dry_run:
            salt = bytes(await queries.fetchval(conn, "erase_salt"))
            hashes = [id_hash(salt, shop, kind, value) for kind, value in given]
            suppressed = hashes + [id_hash(salt, shop, "session_id", s) for s in derived]
            report.repeat_of = [
                r["id"] for r in await queries.fetch(conn, "erase_previous", shop_id, hashes)
            ]
            async with conn.transaction():
                report.request_id = await queries.fetchval(
                    conn,
                    "erase_record_request",
                    shop_id,
                    request.shop,
                    [k for k, _ in given],
                    hashes,
                )
                await queries.execute(
                    conn, "erase_suppress", shop_id, suppressed, report.request_id
                )
        for table in await queries.fetch(conn, "erase_tables"):
            name = table["table_name"]
            matches, args = _matches(table["id_columns"], table["json_columns"] or [], ids)
            if not matches:
                continue
            match = visitor_match(matches)
            leaves = (
                [r["name"] for r in await queries.fetch(conn, "erase_leaves", name)]
                if table["partitioned"]
                else [name]
            )
            rows = 0
            for leaf in leaves:
                if dry_run:
                    rows += int(await conn.fetchval(visitor_count(leaf, match), shop_id, *args))
                else:
                    sql = visitor_delete(leaf, match, settings.erase_batch_rows)
                    rows += await _batched(conn, settings, sql, [shop_id, *args])
            report.rows[name] = rows
            log.info("erase", table=name, partitions=len(leaves), rows=rows, dry_run=dry_run)
        if not dry_run:  # the rollups hold the visitor's events counted: recompute them
            await recompute_rollups(conn, shop_id)
        report.rows["dead_letters"] = await _dead_letters(conn, settings, shop, ids, dry_run)
        if report.request_id is not None:
            await queries.execute(
                conn, "erase_finish", report.request_id, orjson.dumps(report.rows).decode()
            )
    return report


async def _dead_letters(
    conn: asyncpg.Connection,
    settings: Settings,
    shop: str,
    ids: dict[str, list[str]],
    dry_run: bool,
) -> int:
    """Dead letter records holding the visitor's events, window by window of ids."""
    span = await queries.fetchrow(conn, "erase_dead_letter_span")
    assert span is not None
    low, high, step = int(span["low"]), int(span["high"]), settings.erase_batch_rows
    touched = 0
    for start in range(low, high + 1, step):
        async with conn.transaction():
            await conn.execute(lock_timeout(settings.partition_lock_timeout_ms))
            row = await queries.fetchrow(
                conn,
                "erase_dead_letters",
                shop,
                ids["anon_id"],
                ids["session_id"],
                ids["user_id"],
                start,
                start + step,
                dry_run,
                False,  # the visitor's events, not the whole shop's
            )
        assert row is not None
        touched += int(row["matched"])
    return touched


async def status(db: Database, limit: int = 100) -> list[dict[str, Any]]:
    """The latest erasure requests, newest first."""
    out = []
    for r in await queries.fetch(db.pool, "erase_status", limit):
        d = dict(r)
        d["rows_removed"] = orjson.loads(d["rows_removed"]) if d["rows_removed"] else {}
        out.append(d)
    return out
