"""The partition manager: monthly range partitions made ahead, retention enforced with low locks.

This module orchestrates: it reads the catalog, plans each maintenance as
actions whose statements ``ddl`` builds (months, names and bounds come from
``months``; the data from ``model``), and runs them under locks and retries.
The dry run prints those same statements.

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
import contextlib
import functools
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import TypeVar

import asyncpg
import orjson
import structlog

from ingest.core import metrics
from ingest.core.db import Database, queries
from ingest.core.errors import MaintenanceLocked, OutsideRetentionWindow, PartitionError
from ingest.core.settings import Settings
from ingest.core.suppression import KINDS, id_hash
from ingest.partitions import archive, ddl
from ingest.partitions.catalog import Catalog
from ingest.partitions.model import (
    Action,
    ArchiveStep,
    CreateStep,
    DetachStep,
    DropStep,
    MaintenanceReport,
    Parent,
    PartitionInfo,
    Policy,
    PurgeStep,
    Restored,
    ShopStep,
    StatusReport,
    Step,
    TableStatus,
    UninstalledShop,
)
from ingest.partitions.months import (
    add_months,
    month_bound,
    month_start,
    name_month,
    partition_name,
)

log = structlog.get_logger(__name__)

_POLICY_TTL_S = 60.0
T = TypeVar("T")


class PartitionManager(Catalog):
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
        uninstalled_days: int = 30,
        uninstalled_mode: str = "delete",
    ) -> None:
        super().__init__(db)
        self.uninstalled_days = uninstalled_days
        self.uninstalled_mode = uninstalled_mode
        self.role = role
        self.lock_timeout_ms = lock_timeout_ms
        self.lock_retries = lock_retries
        self.lock_wait_s = lock_wait_s
        self.archive_dir = archive_dir
        self.batch_rows = batch_rows
        self._known: set[tuple[str, date]] = set()

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
            uninstalled_days=settings.uninstalled_retention_days,
            uninstalled_mode=settings.uninstalled_data,
        )

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
        return await self._create(
            policy, month, ddl.create_step(policy, month, parent, self.lock_timeout_ms)
        )

    async def _create(self, policy: Policy, month: date, step: CreateStep) -> bool:
        async def attempt() -> bool:
            async with self.db.pool.acquire() as conn, conn.transaction():
                if self.role:
                    # The partition (and anything half-made) belongs to this role.
                    await queries.execute(conn, "set_local_role", self.role)
                await self._lock_table(conn, policy.table, step)
                if month in {c.month for c in await self.children(policy.table, conn)}:
                    return False
                for statement in (*step.prepare, *step.finish):
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
            await self._uninstalled(report, now, table, dry_run=True)
            return report
        async with self._maintenance_lock():
            for policy in await self.policies(table):
                for action in await self._plan_into(report, policy, now):
                    await self._apply(policy, action)
            await self._uninstalled(report, now, table, dry_run=False)
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
        wanted = self.months_wanted(policy, now, set(attached))
        actions = [
            Action(
                policy.table,
                "create",
                m,
                [ddl.create_step(policy, m, parent, self.lock_timeout_ms)],
                partition_name(policy.table, m),
            )
            for m in wanted
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
        months = {c.month for c in kept if c.month is not None} | set(wanted)
        actions += await self._retimes_actions(policy, months)
        return actions

    async def _retimes_actions(self, policy: Policy, months: set[date]) -> list[Action]:
        """The pruning of ``event_retimes`` rows older than every month attached once
        this maintenance is done (``months``): what it remembers is where a retimed
        event's row was stored, for its retries, and no retry of an event that old comes."""
        if not months:
            return []
        before = month_bound(min(months))
        if not await self.db.pool.fetchval(ddl.RETIMES_BEFORE, policy.table, before):
            return []
        step = ddl.retimes_prune_step(policy.table, before, self.batch_rows)
        note = f"event_retimes rows before {before.date().isoformat()}"
        return [Action(policy.table, "prune_retimes", None, [step], "event_retimes", note=note)]

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
        steps: list[Step] = []
        if child.state != "detached":
            steps.append(self._detach_step(policy, child, parent.default is not None))
        note = ""
        if policy.mode == "archive":
            data, _ = archive.paths(self._archive_dir(policy), child.name)
            note = f"to {data}; rows and sha256 verified from the file before the DROP"
            steps.append(ddl.archive_step(child.name, parent.columns, self.lock_timeout_ms))
        elif policy.mode == "drop":
            steps.append(ddl.drop_step(child.name, self.lock_timeout_ms))
        kind = "detach" if policy.mode == "detach" else policy.mode
        return Action(policy.table, kind, child.month, steps, child.name, note=note)

    def _detach_step(self, policy: Policy, child: PartitionInfo, has_default: bool) -> DetachStep:
        """CONCURRENTLY unless the parent has a default partition (the server refuses it
        then); FINALIZE for one left pending by an interrupted detach."""
        return ddl.detach_step(
            policy.table,
            child.name,
            concurrently=not has_default,
            finalize=child.state == "detach_pending",
            lock_timeout_ms=self.lock_timeout_ms,
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
                step = ddl.purge_step(
                    child.name, policy.column, shop["id"], cutoff, self.batch_rows
                )
                actions.append(
                    Action(
                        policy.table,
                        "purge_shop",
                        child.month,
                        [step],
                        child.name,
                        note=f"shop {shop['id']}: data_retention_days={shop['days']}",
                    )
                )
        return actions

    async def _has_rows_before(
        self, child: str, column: str, shop_id: object, cutoff: datetime
    ) -> bool:
        sql = ddl.rows_before(child, column)
        return bool(await self.db.pool.fetchval(sql, shop_id, cutoff))

    async def _apply(self, policy: Policy, action: Action) -> None:
        for index, step in enumerate(list(action.steps)):
            if isinstance(step, CreateStep):
                assert action.month is not None
                if not await self._create(policy, action.month, step):
                    action.note = "already created by a loader"
                    return
                continue
            if isinstance(step, DetachStep):
                await self._detach(policy, action, index)
            elif isinstance(step, ArchiveStep):
                action.rows = await self._archive_and_drop(policy, action.partition, step)
            elif isinstance(step, DropStep):
                drop = functools.partial(self._transaction, step.statements)
                await self._retrying(f"drop {action.partition}", drop)
            elif isinstance(step, PurgeStep):
                action.rows = await self._purge(step)
        if action.kind != "create":
            metrics.PARTITION_ACTIONS.labels(policy.table, action.kind).inc()
            log.info(
                "partition maintenance",
                table=policy.table,
                kind=action.kind,
                partition=action.partition,
                rows=action.rows,
            )

    async def _detach(self, policy: Policy, action: Action, index: int) -> None:
        """Run ``action.steps[index]``, re-decided from the catalog at each attempt: a
        retried DETACH CONCURRENTLY may have left the partition pending (FINALIZE then).
        The action keeps the step sent, so the report shows what ran."""

        async def attempt() -> None:
            children = {c.name: c for c in await self.children(policy.table)}
            child = children.get(action.partition)
            if child is None:
                return
            has_default = any(c.state == "default" for c in children.values())
            step = self._detach_step(policy, child, has_default)
            action.steps[index] = step
            async with self.db.pool.acquire() as conn:
                # DETACH CONCURRENTLY cannot run in a transaction block: a session setting.
                await conn.execute(step.lock_timeout)
                try:
                    await conn.execute(step.detach)
                finally:
                    await conn.execute(step.reset)

        await self._retrying(f"detach {action.partition}", attempt)

    async def _archive_and_drop(self, policy: Policy, name: str, step: ArchiveStep) -> int:
        """Write the detached ``name`` to its archive, verify it, then drop it; returns rows."""
        month = name_month(name)
        assert month is not None
        directory = self._archive_dir(policy)
        data, manifest_file = archive.paths(directory, name)
        async with self.db.pool.acquire() as conn, conn.transaction():
            await conn.execute(step.lock_timeout)
            await conn.execute(step.lock)
            writer = await asyncio.to_thread(archive.ArchiveWriter, data)
            try:
                # Sent as ``step.copy``: asyncpg wraps the query in that COPY.
                await conn.copy_from_query(step.select, output=writer)
            except BaseException:
                await asyncio.to_thread(writer.abort)
                raise
            rows, digest = await asyncio.to_thread(writer.close)
            counted = await conn.fetchval(step.count)
            manifest = archive.Manifest(
                table=policy.table,
                partition=name,
                column=policy.column,
                range_from=month_bound(month).isoformat(),
                range_to=month_bound(add_months(month, 1)).isoformat(),
                columns=list(step.columns),
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
            await conn.execute(step.drop)
        log.info(
            "partition archived", table=policy.table, partition=name, rows=rows, file=str(data)
        )
        return rows

    async def _purge(self, step: PurgeStep) -> int:
        total = 0
        while True:
            status = await self.db.pool.execute(step.delete)
            deleted = int(status.split()[-1])
            total += deleted
            if deleted < self.batch_rows:
                return total

    # -- uninstalled shops ------------------------------------------------------------------

    async def uninstalled_shops(self) -> list[UninstalledShop]:
        """Every uninstalled shop: when its rows are due to go, how, and whether they went."""
        rows = await queries.fetch(
            self.db.pool, "pm_uninstalled_shops", self.uninstalled_days, self.uninstalled_mode
        )
        return [
            UninstalledShop(
                str(r["id"]),
                r["uninstalled_at"],
                r["due_at"],
                r["mode"],
                r["finished_at"],
                {k: int(v) for k, v in orjson.loads(r["rows"]).items()},
            )
            for r in rows
        ]

    async def _uninstalled(
        self, report: MaintenanceReport, now: datetime, table: str | None, *, dry_run: bool
    ) -> None:
        """Delete or anonymise the rows of every shop uninstalled longer ago than its
        retention (source document 004), table by table, leaf by leaf, in bounded
        batches; the purge is recorded in ``shop_purges`` (finished once every table is
        done, so a run for one ``table`` never finishes it)."""
        # A dry run plans after retention that did not happen: leave out what it retires.
        gone = {a.partition for a in report.actions if a.kind in ("drop", "archive")}
        for shop in await self.uninstalled_shops():
            if shop.state(now) != "overdue":
                continue
            actions = await self._plan_uninstalled(shop, table, gone)
            report.actions += actions
            if dry_run:
                continue
            shop_id = _uuid(shop.shop_id)
            await queries.execute(
                self.db.pool, "pm_shop_purge_start", shop_id, shop.mode, shop.uninstalled_at
            )
            for action in actions:
                action.rows = await self._apply_shop(action, shop)
                await queries.execute(
                    self.db.pool, "pm_shop_purge_rows", shop_id, action.table, action.rows
                )
                metrics.PARTITION_ACTIONS.labels(action.table, action.kind).inc()
                log.info(
                    "uninstalled shop",
                    shop=shop.shop_id,
                    kind=action.kind,
                    partition=action.partition,
                    rows=action.rows,
                )
            if table is None:
                await queries.execute(self.db.pool, "pm_shop_purge_finish", shop_id)

    async def _plan_uninstalled(
        self, shop: UninstalledShop, table: str | None, gone: set[str]
    ) -> list[Action]:
        pool, shop_id = self.db.pool, _uuid(shop.shop_id)
        kind = f"{shop.mode}_uninstalled"
        note = f"shop {shop.shop_id}: uninstalled {shop.uninstalled_at:%Y-%m-%d}"
        actions: list[Action] = []
        for t in await queries.fetch(pool, "pm_shop_tables"):
            name, columns = t["table_name"], list(t["columns"])
            if table is not None and name != table:
                continue
            if shop.mode == "anonymize" and not ddl.anonymizable(columns):
                continue  # aggregates: no id to pseudonymise, nobody named
            leaves = (
                [r["name"] for r in await queries.fetch(pool, "erase_leaves", name)]
                if t["partitioned"]
                else [name]
            )
            for leaf in leaves:
                if leaf in gone or not await pool.fetchval(
                    ddl.shop_rows_left(leaf, columns, shop.mode), shop_id
                ):
                    continue
                step = ddl.uninstalled_step(
                    leaf,
                    columns,
                    shop_id,
                    shop.mode,
                    batch_rows=self.batch_rows,
                    lock_timeout_ms=self.lock_timeout_ms,
                )
                actions.append(Action(name, kind, name_month(leaf), [step], leaf, note=note))
        if table in (None, "dead_letters"):
            # Dead letters go in both modes: raw records cannot be anonymised in place.
            step = ddl.dead_letters_step(self.lock_timeout_ms)
            actions.append(
                Action(
                    "dead_letters", "delete_uninstalled", None, [step], "dead_letters", note=note
                )
            )
        return actions

    async def _apply_shop(self, action: Action, shop: UninstalledShop) -> int:
        """Run an uninstalled shop's step on one session, batch after batch (each its own
        transaction, a lock wait retried); returns the rows deleted or anonymised."""
        step = action.steps[0]
        assert isinstance(step, ShopStep)
        async with self.db.pool.acquire() as conn:
            await conn.execute(step.lock_timeout)
            try:
                return await self._shop_batches(conn, step, action.partition, shop.shop_id)
            finally:
                await conn.execute(step.reset)

    async def _shop_batches(
        self, conn: asyncpg.Connection, step: ShopStep, table: str, shop_id: str
    ) -> int:
        """``step``'s batches on ``table`` until done; the rows they touched."""
        total = 0
        if step.batch is None:
            span = await queries.fetchrow(conn, "erase_dead_letter_span")
            assert span is not None
            low, high = int(span["low"]), int(span["high"])
            for start in range(low, high + 1, self.batch_rows):
                # Erasure's query, matching every event of the shop (no ids, $8).
                total += await self._shop_batch(
                    conn,
                    "erase_dead_letters",
                    shop_id,
                    [],
                    [],
                    [],
                    start,
                    start + self.batch_rows,
                    False,
                    True,
                )
        elif step.blocks:
            blocks = int(await conn.fetchval(ddl.table_blocks(table)))
            for start in range(0, blocks, step.blocks):
                total += await self._shop_batch(
                    conn, step.batch, (start, 0), (start + step.blocks, 0)
                )
        else:
            while (deleted := await self._shop_batch(conn, step.batch)) > 0:
                total += deleted
                if deleted < self.batch_rows:
                    break
        return total

    async def _shop_batch(self, conn: asyncpg.Connection, sql: str, *args: object) -> int:
        """One batch (a statement, or a named query whose first column counts the rows
        or records it touched), retried with backoff when its lock is not granted
        within the session's lock_timeout."""
        for n in range(self.lock_retries):
            try:
                if not args:
                    status = await conn.execute(sql)
                    return int(status.split()[-1])
                if sql in queries:
                    return int(await queries.fetchval(conn, sql, *args))
                status = await conn.execute(sql, *args)
                return int(status.split()[-1])
            except asyncpg.LockNotAvailableError:
                log.warning("uninstalled shop batch waited too long for a lock", attempt=n + 1)
                await asyncio.sleep(min(0.1 * 2**n, 2.0))
        raise PartitionError(
            f"uninstalled shop: lock not granted within {self.lock_timeout_ms} ms, "
            f"{self.lock_retries} tries",
            hint="a long transaction holds a lock on the table; maintain again later "
            "(what was done stays done)",
        )

    # -- restore ----------------------------------------------------------------------------

    async def restore(self, path: Path) -> Restored:
        """Put an archived month back as an attached partition, after verifying the file.

        The manifest is the archive's own claim (whoever writes the archive
        location writes it too), so it must describe one month of a policy's
        table exactly (partition name, time column, range, the table's columns),
        the data must match its count and sha256, and every row's time must lie
        in that month: checked by the partition's bounds while COPY runs and
        counted again before the commit. A refusal is one line and restores
        nothing; a restore is recorded in ``partition_restores`` (who, file,
        sha256, rows, when) in its own transaction.
        """
        manifest_file = archive.manifest_path(path)
        manifest = await asyncio.to_thread(archive.Manifest.load, manifest_file)
        data = archive.data_path(manifest_file, manifest)
        policy = await self.policy(manifest.table)
        parent = await self._require_parent(manifest.table)
        month = _restore_month(manifest, policy, parent)
        await asyncio.to_thread(archive.verify, manifest, data)
        name = partition_name(manifest.table, month)
        step = ddl.create_step(policy, month, parent, self.lock_timeout_ms)
        source = await asyncio.to_thread(archive.open_data, data)
        try:
            async with self.db.pool.acquire() as conn, conn.transaction():
                await self._lock_table(conn, manifest.table, step)
                exists = month in {c.month for c in await self.children(manifest.table, conn)}
                if exists and await conn.fetchval(ddl.has_rows(name)):
                    raise PartitionError(
                        f"{name} exists and holds rows; restoring would duplicate them",
                        hint=f"detach or empty {name} first",
                    )
                for statement in () if exists else step.prepare:
                    await conn.execute(statement)
                await self._copy_archive(conn, name, source, manifest, data, month)
                check = await conn.fetchrow(ddl.restore_check(name, policy.column, month))
                assert check is not None
                if check["outside"]:  # the bounds refused these already; counted to be sure
                    raise _outside(data, month, policy.column)
                if check["rows"] != manifest.row_count:
                    raise PartitionError(
                        f"archive {data} loaded {check['rows']} rows into {name}, its manifest "
                        f"says {manifest.row_count}; nothing restored"
                    )
                # Erasures and uninstalled shops' purges made since the archive was written
                # apply to it too; before the ATTACH, nobody else sees these rows yet.
                privacy = await self._privacy_on_restore(conn, name, parent.columns)
                for statement in () if exists else step.finish:
                    await conn.execute(statement)
                await queries.execute(
                    conn,
                    "pm_record_restore",
                    manifest.table,
                    name,
                    month,
                    str(data.resolve()),
                    manifest.sha256,
                    manifest.row_count,
                    orjson.dumps(privacy).decode(),
                )
        except asyncpg.DuplicateTableError as exc:
            raise PartitionError(
                f"a table {name} exists but is not attached", hint="rename or drop it first"
            ) from exc
        finally:
            await asyncio.to_thread(source.close)
        self._known.discard((manifest.table, month))
        log.info(
            "partition restored",
            table=manifest.table,
            partition=name,
            rows=manifest.row_count,
            file=str(data),
            sha256=manifest.sha256,
            privacy=privacy,
        )
        return Restored(manifest.table, name, month, manifest.row_count, privacy)

    async def _privacy_on_restore(
        self, conn: asyncpg.Connection, name: str, columns: list[str]
    ) -> dict[str, int]:
        """Take out of ``name`` (a month being restored) the rows of erased visitors and
        delete or anonymise those of shops purged since it was archived, as ``erase`` and
        ``maintain`` did to the rest; the rows touched, by cause."""
        done = {"erased": 0, "uninstalled": 0}
        purges = await queries.fetch(conn, "pm_restore_purges")
        present = {
            r["shop_id"]
            for r in await conn.fetch(ddl.shops_in(name), [p["shop_id"] for p in purges])
        }
        for p in purges:
            if p["shop_id"] not in present:
                continue
            if p["mode"] == "anonymize" and not ddl.anonymizable(columns):
                continue
            step = ddl.uninstalled_step(
                name,
                columns,
                p["shop_id"],
                p["mode"],
                batch_rows=self.batch_rows,
                lock_timeout_ms=self.lock_timeout_ms,
            )
            done["uninstalled"] += await self._shop_batches(conn, step, name, str(p["shop_id"]))
        erased = await queries.fetch(conn, "pm_restore_suppressions")
        present = {
            r["shop_id"]
            for r in await conn.fetch(ddl.shops_in(name), [e["shop_id"] for e in erased])
        }
        salt = bytes(await queries.fetchval(conn, "erase_salt")) if present else b""
        for e in erased:
            if e["shop_id"] in present:
                done["erased"] += await self._erase_on_restore(
                    conn, name, columns, e["shop_id"], {bytes(h) for h in e["hashes"]}, salt
                )
        return done

    async def _erase_on_restore(
        self,
        conn: asyncpg.Connection,
        name: str,
        columns: list[str],
        shop_id: uuid.UUID,
        hashes: set[bytes],
        salt: bytes,
    ) -> int:
        """Delete from ``name`` the rows of shop ``shop_id`` whose ids hash to one of
        ``hashes``: every distinct id of each id column (and JSON user id) is hashed as
        ``erase`` hashed the ids it was given."""
        shop = str(shop_id)
        matches: list[tuple[str, str | None]] = []
        args: list[object] = []
        wanted: list[tuple[str, str | None, str]] = [(c, None, c) for c in KINDS if c in columns]
        wanted += [(c, k, "user_id") for c, k in _JSON_USER_KEYS if c in columns]
        for column, key, kind in wanted:
            sql = ddl.distinct_ids(name, column, json_key=key is not None)
            rows = await conn.fetch(sql, shop_id, *(() if key is None else (key,)))
            hit = [r["v"] for r in rows if id_hash(salt, shop, kind, r["v"]) in hashes]
            if hit:
                matches.append((column, key))
                args += [hit] if key is None else [key, hit]
        if not matches:
            return 0
        delete = ddl.visitor_delete(name, ddl.visitor_match(matches), self.batch_rows)
        total = 0
        while True:
            deleted = int((await conn.execute(delete, shop_id, *args)).split()[-1])
            total += deleted
            if deleted < self.batch_rows:
                return total

    @staticmethod
    async def _copy_archive(
        conn: asyncpg.Connection,
        name: str,
        source: object,
        manifest: archive.Manifest,
        data: Path,
        month: date,
    ) -> None:
        """COPY the archive into ``name``; PostgreSQL's refusals become one line each (the
        server's DETAIL, which quotes the row, is left out)."""
        try:
            await conn.copy_to_table(name, source=source, columns=manifest.columns, format="text")
        except asyncpg.CheckViolationError as exc:
            # The new table's CHECK, or an attached partition's bound.
            raise _outside(data, month, manifest.column) from exc
        except asyncpg.PostgresError as exc:
            reason = (str(exc).splitlines() or [type(exc).__name__])[0]
            raise PartitionError(
                f"archive {data} cannot be loaded into {name}: {reason}; nothing restored"
            ) from exc

    # -- status -----------------------------------------------------------------------------

    async def status(self, now: datetime | None = None, table: str | None = None) -> StatusReport:
        """Partitions of every policy's table and warnings; sets the partition gauges."""
        now = now or datetime.now(UTC)
        tables = [await self._table_status(p, now) for p in await self.policies(table)]
        for t in tables:
            metrics.PARTITIONS_MISSING_AHEAD.labels(t.policy.table).set(t.missing_ahead)
            metrics.RETENTION_OVERDUE.labels(t.policy.table).set(t.retention_overdue)
        return StatusReport(tables, await self.uninstalled_shops(), now)

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
        return int(await self.db.pool.fetchval(ddl.count_capped(name, cap)))

    # -- helpers ----------------------------------------------------------------------------

    def _archive_dir(self, policy: Policy) -> Path:
        base = Path(policy.archive_location) if policy.archive_location else self.archive_dir
        if base is None:
            raise PartitionError(
                f"{policy.table}: retention mode archive needs an archive location",
                hint="set it with `eventpipe partitions policy TABLE --archive-location DIR`",
            )
        return base / policy.table

    async def _lock_table(self, conn: asyncpg.Connection, table: str, step: CreateStep) -> None:
        """``step``'s lock timeout, then the table's advisory lock that creators take turns on."""
        await conn.execute(step.lock_timeout)
        await queries.execute(conn, "partition_lock", table)

    async def _transaction(self, statements: Iterable[str]) -> None:
        async with self.db.pool.acquire() as conn, conn.transaction():
            for statement in statements:
                await conn.execute(statement)

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


# Where a protocol keeps a user id in a table without a user_id column (as erase matches).
_JSON_USER_KEYS = (("props", "$user_id"), ("metadata", "user_id"))


def _uuid(value: str) -> uuid.UUID:
    return uuid.UUID(value)


def _outside(data: Path, month: date, column: str) -> PartitionError:
    return PartitionError(
        f"archive {data} holds rows outside {month:%Y-%m} ({column} not in "
        f"[{month_bound(month).isoformat()}, {month_bound(add_months(month, 1)).isoformat()})); "
        "nothing restored",
        hint="a month's archive holds that month's rows only: this file was not written by "
        "`partitions maintain`, or was changed since",
    )


def _restore_month(manifest: archive.Manifest, policy: Policy, parent: Parent) -> date:
    """The month an archive fills, once its manifest is seen to describe exactly one
    month of ``policy``'s table; PartitionError (one line) naming what does not fit."""
    where = f"archive manifest of {manifest.partition!r}"
    try:
        start = datetime.fromisoformat(manifest.range_from)
        end = datetime.fromisoformat(manifest.range_to)
        if start.tzinfo is None or end.tzinfo is None:
            raise ValueError("a time without a zone")
    except (TypeError, ValueError) as exc:
        raise PartitionError(
            f"{where}: range {manifest.range_from!r} to {manifest.range_to!r} is not a pair "
            f"of times with a zone ({exc})"
        ) from exc
    month = month_start(start)
    if (start, end) != (month_bound(month), month_bound(add_months(month, 1))):
        raise PartitionError(
            f"{where}: range {manifest.range_from} to {manifest.range_to} is not one month"
        )
    expected = partition_name(policy.table, month)
    if manifest.partition != expected:
        raise PartitionError(
            f"{where}: its range is {month:%Y-%m}, whose partition of {policy.table} is {expected}"
        )
    if manifest.column != policy.column:
        raise PartitionError(
            f"{where}: time column {manifest.column!r}, but {policy.table} is partitioned "
            f"by {policy.column!r}"
        )
    if list(manifest.columns) != list(parent.columns):
        raise PartitionError(
            f"{where}: columns {manifest.columns} are not {policy.table}'s ({parent.columns})"
        )
    return month
