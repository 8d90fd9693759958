"""The partition manager: monthly range partitions made ahead, retention enforced with low locks.

Boundaries are computed in UTC and written as explicit ``+00`` literals, so the
session time zone never shifts them. Partitions are named ``<table>_pYYYY_MM``.

Locks, step by step:

* create: a plain table with a CHECK matching its range, then ATTACH, which
  takes SHARE UPDATE EXCLUSIVE on the parent (inserts keep flowing) and skips
  the validation scan thanks to the CHECK;
* retire: ``DETACH PARTITION ... CONCURRENTLY`` (the event tables have no
  DEFAULT partition, so the server allows it), then DROP / archive the detached
  table, which no longer involves the parent at all. A DROP of an attached
  partition would take ACCESS EXCLUSIVE on the parent, so it is never done;
* every step is one short transaction with ``lock_timeout``, retried with
  backoff a bounded number of times.

``maintain`` runs hold a session advisory lock, so two runs never interleave;
the second waits a bounded time, then fails with MaintenanceLocked (exit 6).
"""

from __future__ import annotations

import asyncio
import calendar
import contextlib
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import asyncpg
import structlog

from ingest.core import metrics
from ingest.core.db import Database, queries
from ingest.core.errors import MaintenanceLocked, OutsideRetentionWindow, PartitionError
from ingest.core.identifiers import ident, quote
from ingest.core.settings import Settings
from ingest.partitions import archive

log = structlog.get_logger(__name__)

MODES = ("drop", "detach", "archive")
_BOUND = re.compile(r"FROM \('([^']+)'\)")
_CHILD = re.compile(r"_p(\d{4})_(\d{2})$")
_PRIVILEGES = {"SELECT", "INSERT", "UPDATE", "DELETE", "TRUNCATE", "REFERENCES", "TRIGGER"}
_POLICY_CMDS = {"ALL", "SELECT", "INSERT", "UPDATE", "DELETE"}
_POLICY_TTL_S = 60.0
T = TypeVar("T")


def month_start(moment: datetime | date) -> date:
    """First day of the UTC month holding ``moment``."""
    if isinstance(moment, datetime):
        moment = moment.astimezone(UTC).date()
    return moment.replace(day=1)


def add_months(month: date, n: int) -> date:
    """``month`` moved by ``n`` months (both first days of a month)."""
    index = month.year * 12 + month.month - 1 + n
    return date(index // 12, index % 12 + 1, 1)


def shift_months(moment: datetime, n: int) -> datetime:
    """``moment`` (made UTC) moved by ``n`` calendar months, the day clamped like PostgreSQL."""
    moment = moment.astimezone(UTC)
    target = add_months(moment.date().replace(day=1), n)
    day = min(moment.day, calendar.monthrange(target.year, target.month)[1])
    return moment.replace(year=target.year, month=target.month, day=day)


def month_bound(month: date) -> datetime:
    """Midnight UTC of the first day of ``month``."""
    return datetime(month.year, month.month, 1, tzinfo=UTC)


def partition_name(table: str, month: date) -> str:
    """``<table>_pYYYY_MM``."""
    return f"{table}_p{month.year:04d}_{month.month:02d}"


def name_month(name: str) -> date | None:
    """The month a ``<table>_pYYYY_MM`` name stands for."""
    match = _CHILD.search(name)
    if match is None or not 1 <= int(match[2]) <= 12:
        return None
    return date(int(match[1]), int(match[2]), 1)


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


def _ts_literal(moment: datetime) -> str:
    return f"'{moment.astimezone(UTC).isoformat()}'::timestamptz"


@dataclass(frozen=True)
class Policy:
    """How one partitioned table is kept (a row of ``partition_policies``).

    Retention is ``retention_months`` calendar months plus ``retention``;
    ``retention`` None means keep forever.
    """

    table: str
    column: str
    months_ahead: int
    retention: timedelta | None
    mode: str
    archive_location: str | None
    retention_months: int = 0
    retention_text: str | None = None

    @classmethod
    def from_row(cls, row: asyncpg.Record) -> Policy:
        """Build from a ``pm_policies`` row."""
        return cls(
            row["table_name"],
            row["partition_column"],
            row["months_ahead"],
            row["retention_rest"],
            row["retention_mode"],
            row["archive_location"],
            row["retention_months"] or 0,
            row["retention_text"],
        )

    def cutoff(self, now: datetime) -> datetime | None:
        """Rows older than this have passed retention (None: kept forever)."""
        if self.retention is None:
            return None
        return shift_months(now, -self.retention_months) - self.retention

    def window(self, now: datetime) -> tuple[date, date]:
        """First and last month (inclusive) whose rows this table accepts at ``now``."""
        cutoff = self.cutoff(now)
        oldest = month_start(cutoff) if cutoff else date(1970, 1, 1)
        return oldest, add_months(month_start(now), self.months_ahead)

    def expired(self, month: date, now: datetime) -> bool:
        """Whether ``month``'s whole range is older than retention (never the current month)."""
        cutoff = self.cutoff(now)
        return (
            cutoff is not None
            and month < month_start(now)
            and month_bound(add_months(month, 1)) <= cutoff
        )

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "table": self.table,
            "column": self.column,
            "interval": "monthly",
            "months_ahead": self.months_ahead,
            "retention": self.retention_text,
            "mode": self.mode,
            "archive_location": self.archive_location,
        }


@dataclass(frozen=True)
class RowPolicy:
    """A row level security policy of a parent table, as ``pg_policies`` shows it."""

    name: str
    permissive: str
    cmd: str
    roles: list[str]
    qual: str | None
    with_check: str | None

    def create_on(self, child: str) -> str:
        """``CREATE POLICY`` of the same name and meaning on ``child`` (already quoted).

        The expressions are the parent's, as the server deparses them from its
        catalog (written by the table's owner), never request data.
        """
        if self.permissive not in ("PERMISSIVE", "RESTRICTIVE") or self.cmd not in _POLICY_CMDS:
            raise PartitionError(f"unexpected policy {self.name!r}: {self.permissive} {self.cmd}")
        sql = (
            f"CREATE POLICY {quote(self.name)} ON {child} AS {self.permissive} FOR {self.cmd} "
            f"TO {', '.join(self.roles)}"
        )
        if self.qual is not None:
            sql += f" USING ({self.qual})"
        if self.with_check is not None:
            sql += f" WITH CHECK ({self.with_check})"
        return sql


@dataclass(frozen=True)
class Parent:
    """What new partitions copy from their parent: owner, grants, row level security."""

    table: str
    owner: str
    rls: bool
    force_rls: bool
    columns: list[str]
    grants: list[tuple[str | None, str, bool]]
    default: str | None = None
    column_grants: list[tuple[str | None, str, str, bool]] = field(default_factory=list)
    policies: list[RowPolicy] = field(default_factory=list)


@dataclass(frozen=True)
class PartitionInfo:
    """One child table of a policy's parent (attached, pending detach, default or detached)."""

    name: str
    month: date | None
    state: str  # attached | detach_pending | default | detached
    est_rows: int
    size_bytes: int

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        data = asdict(self)
        data["month"] = f"{self.month:%Y-%m}" if self.month else None
        data["range_from"] = month_bound(self.month).isoformat() if self.month else None
        data["range_to"] = (
            month_bound(add_months(self.month, 1)).isoformat() if self.month else None
        )
        return data


@dataclass
class Action:
    """One step of maintenance with the exact statements it runs."""

    table: str
    kind: str  # create | detach | drop | archive | purge_shop
    month: date | None
    statements: list[str]
    partition: str = ""
    attached: bool = True
    rows: int = 0
    note: str = ""

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "table": self.table,
            "kind": self.kind,
            "month": f"{self.month:%Y-%m}" if self.month else None,
            "partition": self.partition,
            "statements": self.statements,
            "rows": self.rows,
            "note": self.note,
        }


@dataclass
class MaintenanceReport:
    """What a ``maintain`` run did (or, dry, would do)."""

    dry_run: bool
    actions: list[Action] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    @property
    def created(self) -> list[tuple[str, date]]:
        """(table, month) of each partition created."""
        return [(a.table, a.month) for a in self.actions if a.kind == "create" and a.month]

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "dry_run": self.dry_run,
            "actions": [a.as_dict() for a in self.actions],
            "skipped": self.skipped,
        }


@dataclass
class TableStatus:
    """Partitions of one policy's table and what is wrong with them."""

    policy: Policy
    exists: bool
    partitions: list[PartitionInfo] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    missing_ahead: int = 0
    retention_overdue: int = 0
    default_rows: int = 0

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "policy": self.policy.as_dict(),
            "exists": self.exists,
            "partitions": [p.as_dict() for p in self.partitions],
            "warnings": self.warnings,
            "missing_ahead": self.missing_ahead,
            "retention_overdue": self.retention_overdue,
            "default_rows": self.default_rows,
        }


@dataclass
class StatusReport:
    """``partitions status``: healthy when no table has a warning."""

    tables: list[TableStatus]

    @property
    def warnings(self) -> list[str]:
        """Every warning, prefixed with its table."""
        return [f"{t.policy.table}: {w}" for t in self.tables for w in t.warnings]

    @property
    def healthy(self) -> bool:
        """No warnings."""
        return not self.warnings

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "healthy": self.healthy,
            "warnings": self.warnings,
            "tables": [t.as_dict() for t in self.tables],
        }


@dataclass(frozen=True)
class Restored:
    """An archived month put back."""

    table: str
    partition: str
    month: date
    rows: int


def _create_parts(
    policy: Policy, month: date, parent: Parent | None
) -> tuple[list[str], list[str]]:
    """DDL making ``month``'s partition: (make the plain table, fill and attach it)."""
    table = policy.table
    name = partition_name(table, month)
    parent_q, child, column = ident(table), ident(name), ident(policy.column)
    lo, hi = _literal(month), _literal(add_months(month, 1))
    check = ident(f"{name}_range")
    prepare = [
        f"CREATE TABLE {child} (LIKE {parent_q} INCLUDING DEFAULTS INCLUDING CONSTRAINTS)",
        f"ALTER TABLE {child} ADD CONSTRAINT {check} CHECK ({column} IS NOT NULL AND "
        f"{column} >= {lo} AND {column} < {hi})",
    ]
    finish: list[str] = []
    if parent is not None and parent.default is not None:
        # ATTACH would fail on rows of this range sitting in the default partition.
        cols = ", ".join(quote(c) for c in parent.columns)
        finish.append(
            f"WITH moved AS (DELETE FROM {ident(parent.default)} WHERE {column} >= {lo} "
            f"AND {column} < {hi} RETURNING {cols}) "
            f"INSERT INTO {child} ({cols}) SELECT {cols} FROM moved"
        )
    finish += [
        f"ALTER TABLE {parent_q} ATTACH PARTITION {child} FOR VALUES FROM ({lo}) TO ({hi})",
        # The CHECK only served to skip ATTACH's validation scan.
        f"ALTER TABLE {child} DROP CONSTRAINT {check}",
    ]
    if parent is not None:
        finish += _inherit_statements(child, parent)
    return prepare, finish


def _inherit_statements(child: str, parent: Parent) -> list[str]:
    """Grants (table and column), row level security, policies and owner of the parent."""
    out = []
    for grantee, privilege, grantable in parent.grants:
        if privilege in _PRIVILEGES:
            option = " WITH GRANT OPTION" if grantable else ""
            out.append(f"GRANT {privilege} ON {child} TO {grantee or 'PUBLIC'}{option}")
    for grantee, privilege, column, grantable in parent.column_grants:
        if privilege in _PRIVILEGES:
            option = " WITH GRANT OPTION" if grantable else ""
            out.append(
                f"GRANT {privilege} ({quote(column)}) ON {child} TO {grantee or 'PUBLIC'}{option}"
            )
    out += [policy.create_on(child) for policy in parent.policies]
    if parent.rls:
        out.append(f"ALTER TABLE {child} ENABLE ROW LEVEL SECURITY")
    if parent.force_rls:
        out.append(f"ALTER TABLE {child} FORCE ROW LEVEL SECURITY")
    out.append(f"ALTER TABLE {child} OWNER TO {parent.owner}")
    return out


def create_statements(policy: Policy, month: date, parent: Parent | None = None) -> list[str]:
    """The DDL that makes ``month``'s partition of ``policy.table`` with low locks."""
    prepare, finish = _create_parts(policy, month, parent)
    return prepare + finish


def detach_statement(table: str, child: str, *, concurrently: bool, finalize: bool = False) -> str:
    """DETACH of ``child``: CONCURRENTLY when allowed, FINALIZE for an interrupted one."""
    how = " FINALIZE" if finalize else " CONCURRENTLY" if concurrently else ""
    return f"ALTER TABLE {ident(table)} DETACH PARTITION {ident(child)}{how}"


def purge_statement(
    child: str, column: str, shop_id: object, cutoff: datetime, batch_rows: int
) -> str:
    """One bounded batch deleting a shop's rows older than its own retention from ``child``."""
    c = ident(column)
    return (
        f"DELETE FROM {ident(child)} WHERE ctid IN (SELECT ctid FROM {ident(child)} "
        f"WHERE shop_id = '{shop_id!s}'::uuid AND {c} < {_ts_literal(cutoff)} "
        f"LIMIT {int(batch_rows)})"
    )


class PartitionManager:
    """Creates partitions ahead and on demand, enforces retention, reports status.

    ``role``: partitions made by ``create`` are made under ``SET LOCAL ROLE role``
    (the loaders pass the partition admin role when their user is a member).
    """

    def __init__(
        self,
        db: Database,
        *,
        lock_timeout_ms: int = 1000,
        lock_retries: int = 5,
        lock_wait_s: float = 30.0,
        archive_dir: Path | None = None,
        batch_rows: int = 5000,
        role: str | None = None,
    ) -> None:
        self.db = db
        self.role = role
        self.lock_timeout_ms = lock_timeout_ms
        self.lock_retries = lock_retries
        self.lock_wait_s = lock_wait_s
        self.archive_dir = archive_dir
        self.batch_rows = batch_rows
        self._known: set[tuple[str, date]] = set()
        self._policies: dict[str, tuple[float, Policy]] = {}

    @classmethod
    def from_settings(
        cls, db: Database, settings: Settings, *, role: str | None = None
    ) -> PartitionManager:
        """A manager configured by ``settings`` (locks, archive, batches), as every
        program builds it: maintenance, ``up`` and the loaders' on-demand partitions."""
        return cls(
            db,
            lock_timeout_ms=settings.partition_lock_timeout_ms,
            lock_retries=settings.partition_lock_retries,
            lock_wait_s=settings.maintenance_lock_wait_s,
            archive_dir=settings.archive_path,
            batch_rows=settings.retention_batch_rows,
            role=role,
        )

    # -- policies ---------------------------------------------------------------------------

    async def policies(self, table: str | None = None) -> list[Policy]:
        """Every policy, or ``table``'s only."""
        return [Policy.from_row(r) for r in await queries.fetch(self.db.pool, "pm_policies", table)]

    async def policy(self, table: str) -> Policy:
        """The policy of ``table`` (cached for a minute)."""
        cached = self._policies.get(table)
        if cached is None or time.monotonic() - cached[0] > _POLICY_TTL_S:
            found = await self.policies(table)
            if not found:
                raise PartitionError(
                    f"no partition policy for table {table}",
                    hint="add one with `eventpipe partitions policy TABLE --column C`",
                )
            cached = (time.monotonic(), found[0])
            self._policies[table] = cached
        return cached[1]

    async def set_policy(self, policy: Policy, retention: str | None) -> Policy:
        """Insert or replace ``policy.table``'s policy; ``retention`` is an interval or None."""
        ident(policy.table)
        ident(policy.column)
        if policy.mode not in MODES:
            raise PartitionError(
                f"unknown retention mode {policy.mode!r}", hint="drop|detach|archive"
            )
        if not await queries.fetchval(self.db.pool, "pm_has_column", policy.table, policy.column):
            raise PartitionError(
                f"table {policy.table} has no column {policy.column}",
                hint="name an existing partitioned table and its partition column",
            )
        try:
            await queries.execute(
                self.db.pool,
                "pm_upsert_policy",
                policy.table,
                policy.column,
                policy.months_ahead,
                retention,
                policy.mode,
                policy.archive_location,
            )
        except asyncpg.CheckViolationError as exc:
            if exc.constraint_name == "partition_policies_retention_positive":
                raise PartitionError(
                    f"retention {retention!r} is not positive",
                    hint="give an interval such as '90 days', or 'none' to keep forever",
                ) from exc
            raise PartitionError(f"policy refused: {exc}") from exc
        except (asyncpg.DataError, asyncpg.IntegrityConstraintViolationError) as exc:
            raise PartitionError(f"policy refused: {exc}") from exc
        self._policies.pop(policy.table, None)
        return await self.policy(policy.table)

    # -- catalog ----------------------------------------------------------------------------

    async def parent(self, table: str) -> Parent | None:
        """The partitioned table ``table`` (None when missing or not partitioned)."""
        row = await queries.fetchrow(self.db.pool, "pm_parent", table)
        if row is None or row["relkind"] != "p":
            return None
        grants = [
            (g["grantee"], g["privilege_type"], g["is_grantable"])
            for g in await queries.fetch(self.db.pool, "pm_parent_grants", table)
        ]
        column_grants = [
            (g["grantee"], g["privilege_type"], g["column_name"], g["is_grantable"])
            for g in await queries.fetch(self.db.pool, "pm_parent_column_grants", table)
        ]
        policies = [
            RowPolicy(
                p["name"], p["permissive"], p["cmd"], list(p["roles"]), p["qual"], p["with_check"]
            )
            for p in await queries.fetch(self.db.pool, "pm_parent_policies", table)
        ]
        children = await self.children(table)
        default = next((c.name for c in children if c.state == "default"), None)
        return Parent(
            table,
            row["owner"],
            row["relrowsecurity"],
            row["relforcerowsecurity"],
            list(row["columns"]),
            grants,
            default,
            column_grants,
            policies,
        )

    async def children(
        self, table: str, conn: asyncpg.Connection | None = None
    ) -> list[PartitionInfo]:
        """Attached partitions of ``table``, the default one included."""
        rows = await queries.fetch(conn or self.db.pool, "pm_children", table)
        out = []
        for r in rows:
            state = (
                "default"
                if r["bound"] == "DEFAULT"
                else "detach_pending"
                if r["detach_pending"]
                else "attached"
            )
            out.append(
                PartitionInfo(
                    r["name"], bound_month(r["bound"]), state, r["est_rows"], r["size_bytes"]
                )
            )
        return out

    async def detached(self, table: str) -> list[PartitionInfo]:
        """Tables named like ``table``'s partitions that are not attached."""
        return [
            PartitionInfo(
                r["name"], name_month(r["name"]), "detached", r["est_rows"], r["size_bytes"]
            )
            for r in await queries.fetch(self.db.pool, "pm_detached", table)
        ]

    async def existing_months(self, table: str) -> set[date]:
        """Months that have an attached partition of ``table``."""
        return {c.month for c in await self.children(table) if c.month is not None}

    # -- on demand (loaders) ----------------------------------------------------------------

    async def ensure_months(
        self, table: str, months: set[date], now: datetime | None = None
    ) -> None:
        """Make sure each month in ``months`` has a partition.

        Raises OutsideRetentionWindow naming the first month outside the table's
        window: older than retention (``too_old``) or beyond the months made
        ahead (``too_new``). The loader sends those rows to dead letters.
        """
        policy = await self.policy(table)
        oldest, newest = policy.window(now or datetime.now(UTC))
        for month in sorted(months):
            if not oldest <= month <= newest:
                reason = "too_old" if month < oldest else "too_new"
                metrics.PARTITION_REFUSED_MONTHS.labels(table, reason).inc()
                raise OutsideRetentionWindow(
                    f"{table}: month {month:%Y-%m} is outside the window "
                    f"{oldest:%Y-%m}..{newest:%Y-%m}",
                    reason=reason,
                )
        missing = {m for m in months if (table, m) not in self._known}
        if not missing:
            return
        existing = await self.existing_months(table)
        for month in sorted(missing - existing):
            await self.create(policy, month)
        self._known.update((table, m) for m in missing)

    async def create(self, policy: Policy, month: date, parent: Parent | None = None) -> bool:
        """Create and attach one partition; False when it already existed.

        Safe when several processes race: each takes a per-table advisory lock
        and re-checks inside it.
        """
        parent = parent or await self._require_parent(policy.table)
        statements = create_statements(policy, month, parent)

        async def attempt() -> bool:
            async with self.db.pool.acquire() as conn, conn.transaction():
                if self.role:
                    # The partition (and anything half-made) belongs to this role.
                    await queries.execute(conn, "set_local_role", self.role)
                await self._lock_table(conn, policy.table)
                if month in {c.month for c in await self.children(policy.table, conn)}:
                    return False
                for statement in statements:
                    await conn.execute(statement)
            return True

        created = await self._retrying(f"create {partition_name(policy.table, month)}", attempt)
        if created:
            metrics.PARTITION_ACTIONS.labels(policy.table, "create").inc()
            log.info("partition created", table=policy.table, month=f"{month:%Y-%m}")
        return created

    # -- maintenance ------------------------------------------------------------------------

    async def maintain(
        self, now: datetime | None = None, *, table: str | None = None, dry_run: bool = False
    ) -> MaintenanceReport:
        """Create missing partitions, enforce retention, purge shops' older rows.

        Idempotent. ``dry_run`` plans only: the report lists the exact
        statements and nothing changes.
        """
        now = now or datetime.now(UTC)
        report = MaintenanceReport(dry_run)
        if dry_run:
            for policy in await self.policies(table):
                await self._plan_into(report, policy, now)
            return report
        async with self._maintenance_lock():
            for policy in await self.policies(table):
                for action in await self._plan_into(report, policy, now):
                    await self._apply(policy, action)
        return report

    async def _plan_into(
        self, report: MaintenanceReport, policy: Policy, now: datetime
    ) -> list[Action]:
        parent = await self.parent(policy.table)
        if parent is None:
            report.skipped.append(f"{policy.table}: no partitioned table of that name")
            log.warning("partition policy names no partitioned table", table=policy.table)
            return []
        actions = await self.plan(policy, parent, now)
        report.actions += actions
        return actions

    async def plan(self, policy: Policy, parent: Parent, now: datetime) -> list[Action]:
        """Everything ``maintain`` would do to ``policy.table`` at ``now``."""
        children = await self.children(policy.table)
        attached = {c.month: c for c in children if c.month is not None}
        actions = [
            Action(
                policy.table,
                "create",
                m,
                create_statements(policy, m, parent),
                partition_name(policy.table, m),
            )
            for m in self.months_wanted(policy, now, set(attached))
            if m not in attached
        ]
        retiring = [c for c in children if c.month and policy.expired(c.month, now)]
        if policy.mode != "detach":
            retiring += [
                d
                for d in await self.detached(policy.table)
                if d.month and policy.expired(d.month, now)
            ]
        actions += [self._retire_action(policy, parent, c) for c in retiring]
        gone = {c.name for c in retiring}
        kept = [c for c in children if c.month and c.name not in gone]
        actions += await self._purge_actions(policy, now, kept)
        return actions

    @staticmethod
    def months_wanted(policy: Policy, now: datetime, existing: set[date]) -> list[date]:
        """Months that must have a partition: the oldest retained through the months ahead.

        With a retention, the oldest retained month is the one holding the
        cutoff; kept forever, it is the oldest existing partition. Partitions
        beyond the months ahead never count, so a stray far-future partition
        makes no gap to fill.
        """
        oldest, newest = policy.window(now)
        if policy.retention is None:
            oldest = min([m for m in existing if m <= newest] + [month_start(now)])
        months, month = [], oldest
        while month <= newest:
            months.append(month)
            month = add_months(month, 1)
        return months

    def _retire_action(self, policy: Policy, parent: Parent, child: PartitionInfo) -> Action:
        assert child.month is not None
        statements = []
        if child.state != "detached":
            statements.append(
                detach_statement(
                    policy.table,
                    child.name,
                    concurrently=parent.default is None,
                    finalize=child.state == "detach_pending",
                )
            )
        if policy.mode == "archive":
            data, _ = archive.paths(self._archive_dir(policy), child.name)
            cols = ", ".join(quote(c) for c in parent.columns)
            statements += [
                f"LOCK TABLE {ident(child.name)} IN SHARE MODE",
                f"COPY (SELECT {cols} FROM {ident(child.name)}) TO STDOUT (FORMAT text)",
                f"-- written to {data}; rows and sha256 verified from the file",
                f"SELECT count(*) FROM {ident(child.name)}",
            ]
        if policy.mode in ("drop", "archive"):
            statements.append(f"DROP TABLE {ident(child.name)}")
        kind = "detach" if policy.mode == "detach" else policy.mode
        return Action(
            policy.table, kind, child.month, statements, child.name, child.state != "detached"
        )

    async def _purge_actions(
        self, policy: Policy, now: datetime, kept: list[PartitionInfo]
    ) -> list[Action]:
        if not await queries.fetchval(self.db.pool, "pm_has_column", policy.table, "shop_id"):
            return []
        table_cutoff = policy.cutoff(now)
        actions = []
        for shop in await queries.fetch(self.db.pool, "pm_shop_retention"):
            cutoff = now - timedelta(days=shop["days"])
            if table_cutoff is not None and cutoff <= table_cutoff:
                continue  # the table's own retention removes these rows first
            for child in kept:
                assert child.month is not None
                if month_bound(child.month) >= cutoff:
                    continue
                if not await self._has_rows_before(child.name, policy.column, shop["id"], cutoff):
                    continue
                sql = purge_statement(
                    child.name, policy.column, shop["id"], cutoff, self.batch_rows
                )
                actions.append(
                    Action(
                        policy.table,
                        "purge_shop",
                        child.month,
                        [sql],
                        child.name,
                        note=f"shop {shop['id']}: data_retention_days={shop['days']}",
                    )
                )
        return actions

    async def _has_rows_before(
        self, child: str, column: str, shop_id: object, cutoff: datetime
    ) -> bool:
        sql = (
            f"SELECT EXISTS (SELECT 1 FROM {ident(child)} "
            f"WHERE shop_id = $1 AND {ident(column)} < $2)"
        )
        return bool(await self.db.pool.fetchval(sql, shop_id, cutoff))

    async def _apply(self, policy: Policy, action: Action) -> None:
        if action.kind == "create":
            assert action.month is not None
            parent = await self._require_parent(policy.table)
            if not await self.create(policy, action.month, parent):
                action.note = "already created by a loader"
            return
        if action.kind == "purge_shop":
            action.rows = await self._purge(action.statements[0])
        else:
            if action.attached:
                await self._detach(policy, action.partition)
            if action.kind == "archive":
                action.rows = await self._archive_and_drop(policy, action.partition)
            elif action.kind == "drop":
                await self._retrying(
                    f"drop {action.partition}",
                    lambda: self._execute(f"DROP TABLE {ident(action.partition)}"),
                )
        metrics.PARTITION_ACTIONS.labels(policy.table, action.kind).inc()
        log.info(
            "partition maintenance",
            table=policy.table,
            kind=action.kind,
            partition=action.partition,
            rows=action.rows,
        )

    async def _detach(self, policy: Policy, name: str) -> None:
        async def attempt() -> None:
            children = {c.name: c for c in await self.children(policy.table)}
            child = children.get(name)
            if child is None:
                return
            has_default = any(c.state == "default" for c in children.values())
            sql = detach_statement(
                policy.table,
                name,
                concurrently=not has_default,
                finalize=child.state == "detach_pending",
            )
            async with self.db.pool.acquire() as conn:
                # DETACH CONCURRENTLY cannot run in a transaction block: a session setting.
                await conn.execute(f"SET lock_timeout = {int(self.lock_timeout_ms)}")
                try:
                    await conn.execute(sql)
                finally:
                    await conn.execute("RESET lock_timeout")

        await self._retrying(f"detach {name}", attempt)

    async def _archive_and_drop(self, policy: Policy, name: str) -> int:
        """Write the detached ``name`` to its archive, verify it, then drop it; returns rows."""
        month = name_month(name)
        assert month is not None
        parent = await self._require_parent(policy.table)
        directory = self._archive_dir(policy)
        data, manifest_file = archive.paths(directory, name)
        cols = ", ".join(quote(c) for c in parent.columns)
        async with self.db.pool.acquire() as conn, conn.transaction():
            await conn.execute(f"SET LOCAL lock_timeout = {int(self.lock_timeout_ms)}")
            await conn.execute(f"LOCK TABLE {ident(name)} IN SHARE MODE")
            writer = await asyncio.to_thread(archive.ArchiveWriter, data)
            try:
                await conn.copy_from_query(f"SELECT {cols} FROM {ident(name)}", output=writer)
            except BaseException:
                await asyncio.to_thread(writer.abort)
                raise
            rows, digest = await asyncio.to_thread(writer.close)
            counted = await conn.fetchval(f"SELECT count(*) FROM {ident(name)}")
            manifest = archive.Manifest(
                table=policy.table,
                partition=name,
                column=policy.column,
                range_from=month_bound(month).isoformat(),
                range_to=month_bound(add_months(month, 1)).isoformat(),
                columns=list(parent.columns),
                row_count=rows,
                sha256=digest,
                data_file=data.name,
                created_at=datetime.now(UTC).isoformat(),
            )
            if counted != rows:
                raise PartitionError(
                    f"archive of {name} holds {rows} rows but the table has {counted}",
                    hint="the partition was kept (detached); run maintain again",
                )
            await asyncio.to_thread(archive.verify, manifest, data)
            await asyncio.to_thread(manifest.save, manifest_file)
            # The data file, the manifest and their directory entries are fsynced by now
            # (ArchiveWriter.close, Manifest.save): a power loss after this DROP commits
            # cannot take the archive with it.
            await conn.execute(f"DROP TABLE {ident(name)}")
        log.info(
            "partition archived", table=policy.table, partition=name, rows=rows, file=str(data)
        )
        return rows

    async def _purge(self, statement: str) -> int:
        total = 0
        while True:
            status = await self.db.pool.execute(statement)
            deleted = int(status.split()[-1])
            total += deleted
            if deleted < self.batch_rows:
                return total

    # -- restore ----------------------------------------------------------------------------

    async def restore(self, path: Path) -> Restored:
        """Put an archived month back as an attached partition, after verifying the file."""
        manifest_file = archive.manifest_path(path)
        manifest = await asyncio.to_thread(archive.Manifest.load, manifest_file)
        data = manifest_file.with_name(manifest.data_file)
        await asyncio.to_thread(archive.verify, manifest, data)
        month = month_start(datetime.fromisoformat(manifest.range_from))
        policy = await self.policy(manifest.table)
        parent = await self._require_parent(manifest.table)
        name = partition_name(manifest.table, month)
        prepare, finish = _create_parts(policy, month, parent)
        source = await asyncio.to_thread(archive.open_data, data)
        try:
            async with self.db.pool.acquire() as conn, conn.transaction():
                await self._lock_table(conn, manifest.table)
                exists = month in {c.month for c in await self.children(manifest.table, conn)}
                if exists and await conn.fetchval(f"SELECT EXISTS (SELECT 1 FROM {ident(name)})"):
                    raise PartitionError(
                        f"{name} exists and holds rows; restoring would duplicate them",
                        hint=f"detach or empty {name} first",
                    )
                for statement in [] if exists else prepare:
                    await conn.execute(statement)
                await conn.copy_to_table(
                    name, source=source, columns=manifest.columns, format="text"
                )
                for statement in [] if exists else finish:
                    await conn.execute(statement)
        except asyncpg.DuplicateTableError as exc:
            raise PartitionError(
                f"a table {name} exists but is not attached", hint="rename or drop it first"
            ) from exc
        finally:
            await asyncio.to_thread(source.close)
        self._known.discard((manifest.table, month))
        log.info(
            "partition restored", table=manifest.table, partition=name, rows=manifest.row_count
        )
        return Restored(manifest.table, name, month, manifest.row_count)

    # -- status -----------------------------------------------------------------------------

    async def status(self, now: datetime | None = None, table: str | None = None) -> StatusReport:
        """Partitions of every policy's table and warnings; sets the partition gauges."""
        now = now or datetime.now(UTC)
        tables = [await self._table_status(p, now) for p in await self.policies(table)]
        for t in tables:
            metrics.PARTITIONS_MISSING_AHEAD.labels(t.policy.table).set(t.missing_ahead)
            metrics.RETENTION_OVERDUE.labels(t.policy.table).set(t.retention_overdue)
        return StatusReport(tables)

    async def _table_status(self, policy: Policy, now: datetime) -> TableStatus:
        parent = await self.parent(policy.table)
        if parent is None:
            return TableStatus(
                policy, False, warnings=["policy names a table that is missing or not partitioned"]
            )
        children = await self.children(policy.table)
        detached = await self.detached(policy.table)
        st = TableStatus(policy, True, children + detached)
        attached = {c.month for c in children if c.month is not None}
        this_month = month_start(now)
        wanted = self.months_wanted(policy, now, attached)
        ahead = [m for m in wanted if m >= this_month and m not in attached]
        gaps = [m for m in wanted if m < this_month and m not in attached]
        st.missing_ahead = len(ahead)
        if ahead:
            st.warnings.append("missing months ahead: " + ", ".join(f"{m:%Y-%m}" for m in ahead))
        if gaps:
            st.warnings.append("missing retained months: " + ", ".join(f"{m:%Y-%m}" for m in gaps))
        overdue = [c for c in children if c.month and policy.expired(c.month, now)]
        if policy.mode != "detach":
            overdue += [d for d in detached if d.month and policy.expired(d.month, now)]
        st.retention_overdue = len(overdue)
        if overdue:
            st.warnings.append("retention overdue: " + ", ".join(c.name for c in overdue))
        pending = [c.name for c in children if c.state == "detach_pending"]
        if pending:
            st.warnings.append("detach pending (interrupted): " + ", ".join(pending))
        if parent.default is not None:
            st.default_rows = await self._count_capped(parent.default)
            if st.default_rows:
                st.warnings.append(
                    f"{st.default_rows} row(s) in default partition {parent.default} "
                    "(maintain moves rows of months it creates; others need attention)"
                )
        return st

    async def _count_capped(self, name: str, cap: int = 1_000_000) -> int:
        sql = f"SELECT count(*) FROM (SELECT 1 FROM {ident(name)} LIMIT {cap}) s"
        return int(await self.db.pool.fetchval(sql))

    # -- helpers ----------------------------------------------------------------------------

    async def _require_parent(self, table: str) -> Parent:
        parent = await self.parent(table)
        if parent is None:
            raise PartitionError(
                f"{table} is missing or not a partitioned table",
                hint="fix the policy with `eventpipe partitions policy` or migrate the schema",
            )
        return parent

    def _archive_dir(self, policy: Policy) -> Path:
        base = Path(policy.archive_location) if policy.archive_location else self.archive_dir
        if base is None:
            raise PartitionError(
                f"{policy.table}: retention mode archive needs an archive location",
                hint="set it with `eventpipe partitions policy TABLE --archive-location DIR`",
            )
        return base / policy.table

    async def _lock_table(self, conn: asyncpg.Connection, table: str) -> None:
        await conn.execute(f"SET LOCAL lock_timeout = {int(self.lock_timeout_ms)}")
        await queries.execute(conn, "partition_lock", table)

    async def _execute(self, sql: str) -> None:
        async with self.db.pool.acquire() as conn, conn.transaction():
            await conn.execute(f"SET LOCAL lock_timeout = {int(self.lock_timeout_ms)}")
            await conn.execute(sql)

    async def _retrying(self, what: str, attempt: Callable[[], Awaitable[T]]) -> T:
        """Run ``attempt``; on a lock timeout retry with backoff, at most ``lock_retries`` times."""
        for n in range(self.lock_retries):
            try:
                return await attempt()
            except asyncpg.LockNotAvailableError:
                log.warning("partition step waited too long for a lock", step=what, attempt=n + 1)
                await asyncio.sleep(min(0.1 * 2**n, 2.0))
        raise PartitionError(
            f"{what}: lock not granted within {self.lock_timeout_ms} ms, {self.lock_retries} tries",
            hint="a long transaction holds a lock on the table; maintain again later",
        )

    @contextlib.asynccontextmanager
    async def _maintenance_lock(self) -> AsyncIterator[None]:
        """The session advisory lock that makes ``maintain`` runs take turns."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.lock_wait_s
        async with self.db.pool.acquire() as conn:
            while not await queries.fetchval(conn, "pm_maintenance_try_lock"):
                if loop.time() >= deadline:
                    raise MaintenanceLocked(
                        f"another `partitions maintain` is running (waited {self.lock_wait_s:g} s)",
                        hint="let it finish, or raise EVENTPIPE_MAINTENANCE_LOCK_WAIT_S",
                    )
                await asyncio.sleep(0.1)
            try:
                yield
            finally:
                await queries.fetchval(conn, "pm_maintenance_unlock")
