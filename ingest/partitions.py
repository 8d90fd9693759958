"""The partition manager: monthly range partitions made ahead and on demand.

All boundaries are computed in UTC and written as explicit ``+00`` literals, so
the session time zone never shifts them. Partitions are named
``<table>_pYYYY_MM``. New partitions are created as plain tables with a CHECK
constraint matching their range and then ATTACHed, which takes only SHARE
UPDATE EXCLUSIVE on the parent: inserts keep flowing.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta

import asyncpg
import structlog

from ingest.db import Database
from ingest.errors import OutsideRetentionWindow, PartitionError

log = structlog.get_logger(__name__)

_IDENT = re.compile(r"^[a-z_][a-z0-9_]{0,47}$")
_BOUND = re.compile(r"FROM \('([^']+)'\)")


def ident(name: str) -> str:
    """``name`` double-quoted after checking it is a plain lower-case identifier."""
    if not _IDENT.match(name):
        raise PartitionError(
            f"refusing identifier {name!r}", hint="use lower-case letters, digits, _"
        )
    return f'"{name}"'


def month_start(moment: datetime | date) -> date:
    """First day of the UTC month holding ``moment``."""
    if isinstance(moment, datetime):
        moment = moment.astimezone(UTC).date()
    return moment.replace(day=1)


def add_months(month: date, n: int) -> date:
    """``month`` moved by ``n`` months (both first days of a month)."""
    index = month.year * 12 + month.month - 1 + n
    return date(index // 12, index % 12 + 1, 1)


def partition_name(table: str, month: date) -> str:
    """``<table>_pYYYY_MM``."""
    return f"{table}_p{month.year:04d}_{month.month:02d}"


def bound_month(bound: str | None) -> date | None:
    """The month a partition bound expression starts at, in UTC (None: not a range bound)."""
    match = _BOUND.search(bound or "")
    if match is None:
        return None
    try:
        return month_start(datetime.fromisoformat(match[1]))
    except ValueError:
        return None


def _literal(month: date) -> str:
    return f"'{month.isoformat()} 00:00:00+00'"


@dataclass(frozen=True)
class Policy:
    """How one partitioned table is kept (a row of ``partition_policies``)."""

    table: str
    column: str
    months_ahead: int
    retention: timedelta | None
    mode: str
    archive_location: str | None

    @classmethod
    def from_row(cls, row: asyncpg.Record) -> Policy:
        """Build from a ``partition_policies`` row."""
        return cls(
            row["table_name"],
            row["partition_column"],
            row["months_ahead"],
            row["retention"],
            row["retention_mode"],
            row["archive_location"],
        )

    def window(self, now: datetime) -> tuple[date, date]:
        """First and last month (inclusive) whose rows this table accepts at ``now``."""
        oldest = month_start(now - self.retention) if self.retention else date(1970, 1, 1)
        return oldest, add_months(month_start(now), self.months_ahead)


def create_statements(policy: Policy, month: date) -> list[str]:
    """The DDL that makes ``month``'s partition of ``policy.table`` with low locks."""
    parent, child = ident(policy.table), ident(partition_name(policy.table, month))
    column = ident(policy.column)
    lo, hi = _literal(month), _literal(add_months(month, 1))
    check = ident(f"{partition_name(policy.table, month)}_range")
    return [
        f"CREATE TABLE IF NOT EXISTS {child} "
        f"(LIKE {parent} INCLUDING DEFAULTS INCLUDING CONSTRAINTS)",
        f"ALTER TABLE {child} ADD CONSTRAINT {check} CHECK ({column} IS NOT NULL AND "
        f"{column} >= {lo} AND {column} < {hi})",
        f"ALTER TABLE {parent} ATTACH PARTITION {child} FOR VALUES FROM ({lo}) TO ({hi})",
        # The CHECK only served to skip ATTACH's validation scan.
        f"ALTER TABLE {child} DROP CONSTRAINT {check}",
    ]


class PartitionManager:
    """Creates partitions; the API loaders call before writing a month's rows."""

    def __init__(self, db: Database, *, lock_timeout_ms: int = 2000) -> None:
        self.db = db
        self.lock_timeout_ms = lock_timeout_ms
        self._known: set[tuple[str, date]] = set()
        self._policies: dict[str, Policy] = {}

    async def policy(self, table: str) -> Policy:
        """The policy of ``table`` (cached for the life of the manager)."""
        if table not in self._policies:
            row = await self.db.fetchrow("partition_policy", table)
            if row is None:
                raise PartitionError(
                    f"no partition policy for table {table}",
                    hint="add one with a migration or `eventpipe partitions`",
                )
            self._policies[table] = Policy.from_row(row)
        return self._policies[table]

    async def existing_months(self, table: str) -> set[date]:
        """Months that have an attached partition of ``table``."""
        async with self.db.pool.acquire() as conn:
            return await self._months_in(conn, table)

    async def ensure_months(
        self, table: str, months: set[date], now: datetime | None = None
    ) -> None:
        """Make sure each month in ``months`` has a partition.

        Raises OutsideRetentionWindow naming the first month outside the table's
        window (older than retention, or beyond the months made ahead).
        """
        missing = {m for m in months if (table, m) not in self._known}
        if not missing:
            return
        policy = await self.policy(table)
        oldest, newest = policy.window(now or datetime.now(UTC))
        for month in sorted(missing):
            if not oldest <= month <= newest:
                raise OutsideRetentionWindow(
                    f"{table}: month {month:%Y-%m} is outside the window "
                    f"{oldest:%Y-%m}..{newest:%Y-%m}",
                )
        existing = await self.existing_months(table)
        for month in sorted(missing - existing):
            await self.create(policy, month)
        self._known.update((table, m) for m in missing)

    async def create(self, policy: Policy, month: date) -> bool:
        """Create and attach one partition; False when it already existed.

        Safe when several processes race: each takes a per-table advisory lock
        and re-checks inside it.
        """
        async with self.db.pool.acquire() as conn, conn.transaction():
            await conn.execute(f"SET LOCAL lock_timeout = {int(self.lock_timeout_ms)}")
            await conn.execute(self.db.q["partition_lock"], policy.table)
            if month in await self._months_in(conn, policy.table):
                return False
            for statement in create_statements(policy, month):
                await conn.execute(statement)
        log.info("partition created", table=policy.table, month=f"{month:%Y-%m}")
        return True

    async def _months_in(self, conn: asyncpg.Connection, table: str) -> set[date]:
        rows = await conn.fetch(self.db.q["attached_partitions"], table)
        return {m for r in rows if (m := bound_month(r["bound"])) is not None}

    async def maintain(self, now: datetime | None = None) -> list[tuple[str, date]]:
        """Create every missing partition from the oldest kept month through the months ahead."""
        now = now or datetime.now(UTC)
        created: list[tuple[str, date]] = []
        for row in await self.db.fetch("partition_policies"):
            policy = Policy.from_row(row)
            oldest, newest = policy.window(now)
            existing = await self.existing_months(policy.table)
            kept = [m for m in existing if m >= oldest]
            month = min([*kept, month_start(now)])
            while month <= newest:
                if month not in existing and await self.create(policy, month):
                    created.append((policy.table, month))
                month = add_months(month, 1)
        return created
