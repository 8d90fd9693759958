"""What the partition manager reads and reports: policies, parents, partitions, the
steps and actions of a maintenance, and the reports of ``maintain`` and ``status``.

Plain data: the SQL text of a step is built by ``ddl``, never here.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from datetime import date, datetime, timedelta
from typing import Any

import asyncpg

from ingest.partitions.months import add_months, month_bound, month_start, shift_months

MODES = ("drop", "detach", "archive")


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


# -- steps: the statements of one action, grouped as they are sent -----------------------------


@dataclass(frozen=True)
class CreateStep:
    """One transaction: under ``lock_timeout`` and the table's advisory lock (and a
    re-check that the month is still missing), make the plain table, then fill and
    attach it (``restore`` copies rows in between)."""

    lock_timeout: str
    prepare: tuple[str, ...]
    finish: tuple[str, ...]

    @property
    def statements(self) -> tuple[str, ...]:
        """In the order they are sent."""
        return (self.lock_timeout, *self.prepare, *self.finish)


@dataclass(frozen=True)
class DetachStep:
    """On a bare session: DETACH CONCURRENTLY cannot run in a transaction block, so
    its ``lock_timeout`` is a session setting, set before and reset after."""

    lock_timeout: str
    detach: str
    reset: str

    @property
    def statements(self) -> tuple[str, ...]:
        """In the order they are sent."""
        return (self.lock_timeout, self.detach, self.reset)


@dataclass(frozen=True)
class DropStep:
    """One transaction dropping a detached table."""

    lock_timeout: str
    drop: str

    @property
    def statements(self) -> tuple[str, ...]:
        """In the order they are sent."""
        return (self.lock_timeout, self.drop)


@dataclass(frozen=True)
class ArchiveStep:
    """One transaction: lock the detached table, COPY it out to the archive file
    (``copy`` is ``select`` as the COPY asyncpg sends), count its rows against the
    file's, drop it once the archive is durable."""

    lock_timeout: str
    lock: str
    select: str
    copy: str
    count: str
    drop: str
    columns: tuple[str, ...]  # of ``select``, in order: the archive's manifest lists them

    @property
    def statements(self) -> tuple[str, ...]:
        """In the order they are sent."""
        return (self.lock_timeout, self.lock, self.copy, self.count, self.drop)


@dataclass(frozen=True)
class PurgeStep:
    """One bounded DELETE batch, sent again until a batch deletes fewer rows than the batch."""

    delete: str

    @property
    def statements(self) -> tuple[str, ...]:
        """The batch (sent as many times as it takes)."""
        return (self.delete,)


@dataclass(frozen=True)
class ShopStep:
    """An uninstalled shop's rows of one table, removed or anonymised batch after batch
    on one session under a session ``lock_timeout`` (each batch its own transaction):
    a bounded DELETE sent until a batch is short, or (``blocks``) an UPDATE of the
    block range ``$1 <= ctid < $2``, range after range up to the table's size when
    the step began. ``batch`` is None for the dead letters: their named query, window
    by window of ids, decodes each record to find the shop's events."""

    lock_timeout: str
    batch: str | None
    reset: str
    blocks: int = 0  # blocks per UPDATE batch; 0: a DELETE batch

    @property
    def statements(self) -> tuple[str, ...]:
        """In the order they are sent (the batch as many times as it takes)."""
        return (self.lock_timeout, *((self.batch,) if self.batch else ()), self.reset)


Step = CreateStep | DetachStep | DropStep | ArchiveStep | PurgeStep | ShopStep


@dataclass
class Action:
    """One step of maintenance with the exact statements it runs.

    ``steps`` are built once, by ``ddl``, when maintenance is planned: the run
    sends them and the dry run prints them. A detach re-decided at run time
    (an interrupted one needs FINALIZE) replaces its step, so a run's report
    still shows what was sent.
    """

    table: str
    # create | detach | drop | archive | purge_shop | prune_retimes | delete_uninstalled |
    # anonymize_uninstalled
    kind: str
    month: date | None
    steps: list[Step]
    partition: str = ""
    rows: int = 0
    note: str = ""

    @property
    def statements(self) -> list[str]:
        """Every statement of every step, in the order they are sent."""
        return [s for step in self.steps for s in step.statements]

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
class UninstalledShop:
    """An uninstalled shop as ``status`` reports it: when its rows are due to go (or be
    anonymised) and whether that is done."""

    shop_id: str
    uninstalled_at: datetime
    due_at: datetime
    mode: str
    finished_at: datetime | None
    rows: dict[str, int] = field(default_factory=dict)

    def state(self, now: datetime) -> str:
        """``purged`` (done), ``overdue`` (due and not done) or ``retained`` (not due)."""
        if self.finished_at is not None:
            return "purged"
        return "overdue" if self.due_at <= now else "retained"

    def as_dict(self, now: datetime) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "shop_id": self.shop_id,
            "uninstalled_at": self.uninstalled_at.isoformat(),
            "due_at": self.due_at.isoformat(),
            "mode": self.mode,
            "state": self.state(now),
            "finished_at": self.finished_at.isoformat() if self.finished_at else None,
            "rows": self.rows,
        }


@dataclass
class StatusReport:
    """``partitions status``: healthy when no table has a warning and no uninstalled
    shop's purge is overdue."""

    tables: list[TableStatus]
    uninstalled: list[UninstalledShop] = field(default_factory=list)
    now: datetime | None = None

    @property
    def warnings(self) -> list[str]:
        """Every warning, prefixed with its table (or the uninstalled shop)."""
        out = [f"{t.policy.table}: {w}" for t in self.tables for w in t.warnings]
        if self.now is not None:
            out += [
                f"uninstalled shop {u.shop_id}: {u.mode} overdue since {u.due_at:%Y-%m-%d %H:%M}"
                for u in self.uninstalled
                if u.state(self.now) == "overdue"
            ]
        return out

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
            "uninstalled_shops": [
                u.as_dict(self.now) for u in self.uninstalled if self.now is not None
            ],
        }


@dataclass(frozen=True)
class Restored:
    """An archived month put back."""

    table: str
    partition: str
    month: date
    rows: int
    # Rows the restore took out again or anonymised: erased visitors ("erased"), shops
    # uninstalled and purged since the archive was written ("uninstalled").
    privacy: dict[str, int] = field(default_factory=dict)
