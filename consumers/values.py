"""How rows carry their values, shared by the checked decoders (``rows``), the fast
ones (``fast``) and the writers.

Rows carry their times as PostgreSQL's own binary form, (microseconds since
2000-01-01 UTC,), for the connections that COPY them (``use_pg_times``):
asyncpg's datetime encoder costs more per value than the rest of a row
together (``benchmarks/README.md``), and every row has two.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg

PgTime = tuple[int]
PG_EPOCH = datetime(2000, 1, 1, tzinfo=UTC)
MICROSECOND = timedelta(microseconds=1)
# A canonical UUID's text: how a shop id is checked.
UUID_TEXT = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")

Row = tuple[Any, ...]
# A record's rows, with each row's session context when the table keeps sessions.
Rows = tuple[list[Row], list[object]]


def pg_time(at: datetime) -> PgTime:
    """``at`` (time-zone aware) as a row carries it."""
    return ((at - PG_EPOCH) // MICROSECOND,)


def as_datetime(at: PgTime) -> datetime:
    """A row's time as a datetime (UTC)."""
    return PG_EPOCH + at[0] * MICROSECOND


async def use_pg_times(conn: asyncpg.Connection) -> None:
    """Make ``conn`` take and give timestamptz values as PgTime (until ``use_datetimes``)."""
    await conn.set_type_codec(
        "timestamptz", schema="pg_catalog", encoder=tuple, decoder=tuple, format="tuple"
    )


async def use_datetimes(conn: asyncpg.Connection) -> None:
    """Undo ``use_pg_times``: ``conn`` back to asyncpg's datetimes."""
    await conn.reset_type_codec("timestamptz", schema="pg_catalog")


@asynccontextmanager
async def pg_times(conn: asyncpg.Connection) -> AsyncIterator[asyncpg.Connection]:
    """``conn`` speaking PgTime for the block (``use_pg_times``), then datetimes again."""
    await use_pg_times(conn)
    try:
        yield conn
    finally:
        await use_datetimes(conn)


@dataclass(slots=True)
class Session:
    """What some behavior rows of one session tell of it, as ``user_sessions`` keeps it
    (``consumers.sessions`` folds rows, and these, into its upsert)."""

    first_seen: PgTime
    landing_page: str  # the page of the earliest row (the first of equal times)
    last_seen: PgTime
    exit_page: str  # the page of the latest row (the last of equal times)
    page_views: int
    context: dict[str, str | None]  # each fact the first row that has it gives


# A session's (shop id, session id) and what some of its rows tell of it.
SessionPart = tuple[tuple[str, str], Session]


@dataclass(frozen=True, slots=True)
class Encoded:
    """A record's events as binary COPY tuples (``binary_copy``), without building rows."""

    data: bytes
    count: int  # events (rows)
    earliest: PgTime  # event times, for the partitions' months
    latest: PgTime
    batched: bool  # whether the record was an array of events
    # For a table that keeps sessions: what the rows tell of theirs, in row order
    # (one part per run of rows of one session: the collector writes one a record).
    sessions: tuple[SessionPart, ...] = ()
