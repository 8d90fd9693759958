"""The one module that writes the partition manager's SQL text.

Every statement the manager sends that is not a named query of
``sql/queries.sql`` is built here: CREATE / ALTER / ATTACH / DETACH / DROP,
GRANT and CREATE POLICY copied from the parent, LOCK, COPY, the shop purge's
DELETE, the ``lock_timeout`` settings, and the few catalog-free reads whose
table is a partition. Names go through ``ident()`` (checked, then quoted) or,
for names read from the catalog, ``quote()``; bounds are UTC literals made
here from ``date``/``datetime``; numbers through ``int()``. Policy expressions
are the parent's own, as the server deparses them.

Each builder is used both to plan (the dry run prints its output) and to run
(the manager sends that output), so the two cannot drift apart.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, date, datetime

from ingest.core.errors import PartitionError
from ingest.core.identifiers import ident, quote
from ingest.partitions.model import (
    ArchiveStep,
    CreateStep,
    DetachStep,
    DropStep,
    Parent,
    Policy,
    PurgeStep,
    RowPolicy,
)
from ingest.partitions.months import add_months, partition_name

_PRIVILEGES = {"SELECT", "INSERT", "UPDATE", "DELETE", "TRUNCATE", "REFERENCES", "TRIGGER"}
_POLICY_CMDS = {"ALL", "SELECT", "INSERT", "UPDATE", "DELETE"}
RESET_LOCK_TIMEOUT = "RESET lock_timeout"


def _literal(month: date) -> str:
    return f"'{month.isoformat()} 00:00:00+00'"


def _ts_literal(moment: datetime) -> str:
    return f"'{moment.astimezone(UTC).isoformat()}'::timestamptz"


def lock_timeout(ms: int, *, local: bool = True) -> str:
    """``SET [LOCAL] lock_timeout``: LOCAL inside a transaction, a session setting outside."""
    scope = "LOCAL " if local else ""
    return f"SET {scope}lock_timeout = {int(ms)}"


# -- create -------------------------------------------------------------------------------------


def create_policy(policy: RowPolicy, child: str) -> str:
    """``CREATE POLICY`` of the same name and meaning as ``policy`` on ``child`` (quoted).

    The expressions are the parent's, as the server deparses them from its
    catalog (written by the table's owner), never request data.
    """
    if policy.permissive not in ("PERMISSIVE", "RESTRICTIVE") or policy.cmd not in _POLICY_CMDS:
        raise PartitionError(f"unexpected policy {policy.name!r}: {policy.permissive} {policy.cmd}")
    sql = (
        f"CREATE POLICY {quote(policy.name)} ON {child} AS {policy.permissive} FOR {policy.cmd} "
        f"TO {', '.join(policy.roles)}"
    )
    if policy.qual is not None:
        sql += f" USING ({policy.qual})"
    if policy.with_check is not None:
        sql += f" WITH CHECK ({policy.with_check})"
    return sql


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
    out += [create_policy(policy, child) for policy in parent.policies]
    if parent.rls:
        out.append(f"ALTER TABLE {child} ENABLE ROW LEVEL SECURITY")
    if parent.force_rls:
        out.append(f"ALTER TABLE {child} FORCE ROW LEVEL SECURITY")
    out.append(f"ALTER TABLE {child} OWNER TO {parent.owner}")
    return out


def create_step(policy: Policy, month: date, parent: Parent, lock_timeout_ms: int) -> CreateStep:
    """The DDL that makes ``month``'s partition of ``policy.table`` with low locks: a plain
    table with a CHECK matching its range, so that ATTACH skips its validation scan."""
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
    if parent.default is not None:
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
    finish += _inherit_statements(child, parent)
    return CreateStep(lock_timeout(lock_timeout_ms), tuple(prepare), tuple(finish))


def has_rows(name: str) -> str:
    """Whether table ``name`` holds any row (a restore never duplicates a month)."""
    return f"SELECT EXISTS (SELECT 1 FROM {ident(name)})"


def restore_check(name: str, column: str, month: date) -> str:
    """Rows of ``name`` and how many lie outside ``month`` (NULL time included), read
    after a restore's COPY and before its commit: the archive's manifest is the
    archive's own claim, so the rows are checked against the month they fill."""
    c = ident(column)
    lo, hi = _literal(month), _literal(add_months(month, 1))
    return (
        f"SELECT count(*) AS rows, "
        f"count(*) FILTER (WHERE {c} IS NULL OR {c} < {lo} OR {c} >= {hi}) AS outside "
        f"FROM {ident(name)}"
    )


# -- retire -------------------------------------------------------------------------------------


def detach_statement(table: str, child: str, *, concurrently: bool, finalize: bool = False) -> str:
    """DETACH of ``child``: CONCURRENTLY when allowed, FINALIZE for an interrupted one."""
    how = " FINALIZE" if finalize else " CONCURRENTLY" if concurrently else ""
    return f"ALTER TABLE {ident(table)} DETACH PARTITION {ident(child)}{how}"


def detach_step(
    table: str, child: str, *, concurrently: bool, finalize: bool, lock_timeout_ms: int
) -> DetachStep:
    """The detach of ``child`` on a bare session, under a session ``lock_timeout``."""
    return DetachStep(
        lock_timeout(lock_timeout_ms, local=False),
        detach_statement(table, child, concurrently=concurrently, finalize=finalize),
        RESET_LOCK_TIMEOUT,
    )


def drop_step(name: str, lock_timeout_ms: int) -> DropStep:
    """DROP of the detached table ``name`` (never of an attached one: that would take
    ACCESS EXCLUSIVE on the parent)."""
    return DropStep(lock_timeout(lock_timeout_ms), f"DROP TABLE {ident(name)}")


def archive_step(name: str, columns: Sequence[str], lock_timeout_ms: int) -> ArchiveStep:
    """Archive of the detached table ``name``: lock, COPY out, count, drop."""
    cols = ", ".join(quote(c) for c in columns)
    select = f"SELECT {cols} FROM {ident(name)}"
    return ArchiveStep(
        lock_timeout(lock_timeout_ms),
        f"LOCK TABLE {ident(name)} IN SHARE MODE",
        select,
        # As asyncpg's copy_from_query sends ``select`` (no options: the text format).
        f"COPY ({select}) TO STDOUT",
        f"SELECT count(*) FROM {ident(name)}",
        f"DROP TABLE {ident(name)}",
        tuple(columns),
    )


# -- shops' own retention -----------------------------------------------------------------------


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


def purge_step(
    child: str, column: str, shop_id: object, cutoff: datetime, batch_rows: int
) -> PurgeStep:
    """The purge of a shop's older rows from ``child``, one batch at a time."""
    return PurgeStep(purge_statement(child, column, shop_id, cutoff, batch_rows))


def rows_before(child: str, column: str) -> str:
    """Whether ``child`` holds rows of shop ``$1`` older than ``$2`` (a purge to plan)."""
    return (
        f"SELECT EXISTS (SELECT 1 FROM {ident(child)} WHERE shop_id = $1 AND {ident(column)} < $2)"
    )


def count_capped(name: str, cap: int) -> str:
    """Rows of table ``name``, counted up to ``cap`` (status of a default partition)."""
    return f"SELECT count(*) FROM (SELECT 1 FROM {ident(name)} LIMIT {int(cap)}) s"


# -- erasure of a visitor (ingest.privacy) --------------------------------------------------------


def visitor_match(matches: Sequence[tuple[str, str | None]]) -> str:
    """The condition matching a visitor's ids: ``$1`` is the shop (uuid); match ``i`` is
    ``column = ANY($n)`` (a text[] of ids), or ``column ->> $n = ANY($n+1)`` when it
    names a JSON key (the key a parameter too). Parameters are numbered in order."""
    parts: list[str] = []
    n = 2
    for column, key in matches:
        c = ident(column)
        if key is None:
            parts.append(f"{c} = ANY(${int(n)}::text[])")
            n += 1
        else:
            parts.append(f"{c} ->> ${int(n)}::text = ANY(${int(n + 1)}::text[])")
            n += 2
    if not parts:
        raise PartitionError("no column to match a visitor on")
    joined = " OR ".join(parts)
    return f"shop_id = $1::uuid AND ({joined})"


def visitor_delete(table: str, match: str, batch_rows: int) -> str:
    """One bounded batch deleting the rows of ``table`` (a plain table or a leaf
    partition: ctids are per table) that ``match`` (``visitor_match``) selects."""
    t = ident(table)
    return (
        f"DELETE FROM {t} WHERE ctid = ANY(ARRAY(SELECT ctid FROM {t} WHERE {match} "
        f"LIMIT {int(batch_rows)}))"
    )


def visitor_count(table: str, match: str) -> str:
    """The rows of ``table`` that ``match`` selects (an erasure's dry run)."""
    return f"SELECT count(*) FROM {ident(table)} WHERE {match}"
