"""What the partition manager reads: policies (cached a minute), a parent table
(owner, grants, row level security, columns, default partition) and its
partitions, attached or detached. Every read is a named query."""

from __future__ import annotations

import time
from datetime import date

import asyncpg

from ingest.core.db import Database, queries
from ingest.core.errors import PartitionError
from ingest.core.identifiers import ident
from ingest.partitions.model import MODES, Parent, PartitionInfo, Policy, RowPolicy
from ingest.partitions.months import bound_month, name_month

_POLICY_TTL_S = 60.0


class Catalog:
    """Reads of ``partition_policies`` and the system catalog for the partition manager."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self._policies: dict[str, tuple[float, Policy]] = {}

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

    async def _require_parent(self, table: str) -> Parent:
        parent = await self.parent(table)
        if parent is None:
            raise PartitionError(
                f"{table} is missing or not a partitioned table",
                hint="fix the policy with `eventpipe partitions policy` or migrate the schema",
            )
        return parent
