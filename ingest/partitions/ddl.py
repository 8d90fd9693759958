"""The one module that writes the partition manager's SQL text.

Every statement the manager sends that is not a named query of
``sql/queries.sql`` is built here: CREATE / ALTER / ATTACH / DETACH / DROP,
GRANT and CREATE POLICY copied from the parent, LOCK, COPY, the shop purge's
DELETE, an uninstalled shop's DELETE or anonymising UPDATE, the ``lock_timeout``
settings, and the few catalog-free reads whose table is a partition. Names go
through ``ident()`` (checked, then quoted) or, for names read from the catalog,
``quote()``; bounds are UTC literals made
here from ``date``/``datetime``; numbers through ``int()``. Policy expressions
are the parent's own, as the server deparses them.

Each builder is used both to plan (the dry run prints its output) and to run
(the manager sends that output), so the two cannot drift apart.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import UTC, date, datetime

from ingest.core.db import literal
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
    ShopStep,
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


def retimes_prune_step(table: str, before: datetime, batch_rows: int) -> PurgeStep:
    """The pruning of ``table``'s ``event_retimes`` rows stored before ``before`` (the
    oldest month still attached), one bounded batch at a time."""
    return PurgeStep(
        "DELETE FROM event_retimes WHERE ctid IN (SELECT ctid FROM event_retimes "
        f"WHERE table_name = {literal(table)} AND event_time < {_ts_literal(before)} "
        f"LIMIT {int(batch_rows)})"
    )


RETIMES_BEFORE = (
    "SELECT EXISTS (SELECT 1 FROM event_retimes WHERE table_name = $1 AND event_time < $2)"
)


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


# -- uninstalled shops (source document 004: "hard-delete or anonymize after retention") -------

# Ids replaced by their pseudonym (migration 0015: eventpipe_pseudonym), where a table has them.
PSEUDONYMOUS = ("anon_id", "session_id", "user_id", "group_id")
# Free text, and how it is cleared: text that may name or locate a person goes, JSON keeps
# its numbers and booleans (eventpipe_scrub), a URL keeps its origin and path (a query
# string or fragment often carries an email, a token, a search).
_STRIP_URL = r"regexp_replace({c}, '[?#].*$', '')"
FREE_TEXT = {
    "element_text": "NULL",
    "user_agent": "NULL",
    "referrer": "NULL",
    "page_url": _STRIP_URL,
    "landing_page": _STRIP_URL,
    "exit_page": _STRIP_URL,
    "props": "eventpipe_scrub({c})",
    "event_data": "eventpipe_scrub({c})",
    "metadata": "eventpipe_scrub({c})",
    "traits": "'{{}}'::jsonb",
    "group_traits": "'{{}}'::jsonb",
}


def _shop(shop_id: object) -> str:
    # A shop id read from shops.id, checked by its own round trip through UUID.
    return f"'{uuid.UUID(str(shop_id))}'::uuid"


def anonymizable(columns: Sequence[str]) -> bool:
    """Whether a table of these columns holds ids to pseudonymise (else it is left as it
    is when a shop is anonymised: aggregates name nobody)."""
    return any(c in PSEUDONYMOUS for c in columns)


def _guard(columns: Sequence[str]) -> str:
    """Rows not anonymised yet: the first id column that is always set is not a pseudonym
    (an UPDATE moves a row, possibly into a block range still to come)."""
    column = next(c for c in ("session_id", "anon_id", "user_id", "group_id") if c in columns)
    return f"NOT coalesce(eventpipe_is_pseudonym({ident(column)}), false)"


def uninstalled_delete(table: str, shop_id: object, batch_rows: int) -> str:
    """One bounded batch deleting rows of uninstalled shop ``shop_id`` from ``table``
    (a leaf partition, a detached month or a plain table: ctids are per table)."""
    t, shop = ident(table), _shop(shop_id)
    return (
        f"DELETE FROM {t} WHERE ctid = ANY(ARRAY(SELECT ctid FROM {t} "
        f"WHERE shop_id = {shop} LIMIT {int(batch_rows)}))"
    )


def uninstalled_anonymize(table: str, columns: Sequence[str], shop_id: object) -> str:
    """One batch anonymising the rows of shop ``shop_id`` in ``table`` whose ctid lies in
    ``[$1, $2)`` (tids: a TID range scan reads those blocks only): ids become
    pseudonyms, free text is cleared."""
    sets = [
        f"{quote(c)} = eventpipe_pseudonym(shop_id, {quote(c)})"
        for c in columns
        if c in PSEUDONYMOUS
    ]
    sets += [f"{quote(c)} = " + FREE_TEXT[c].format(c=quote(c)) for c in columns if c in FREE_TEXT]
    if not sets or not anonymizable(columns):
        raise PartitionError(f"{table}: no id column to anonymise")
    t, shop, guard = ident(table), _shop(shop_id), _guard(columns)
    return (
        f"UPDATE {t} SET {', '.join(sets)} WHERE ctid >= $1::tid AND ctid < $2::tid "
        f"AND shop_id = {shop} AND {guard}"
    )


def uninstalled_step(
    table: str,
    columns: Sequence[str],
    shop_id: object,
    mode: str,
    *,
    batch_rows: int,
    lock_timeout_ms: int,
) -> ShopStep:
    """The removal (``mode`` delete) or anonymisation of shop ``shop_id``'s rows of
    ``table``, batch after batch under a session lock_timeout."""
    if mode == "delete":
        batch, blocks = uninstalled_delete(table, shop_id, batch_rows), 0
    elif mode == "anonymize":
        # About batch_rows rows per batch: a heap block holds some 30 to 100 event rows.
        batch, blocks = uninstalled_anonymize(table, columns, shop_id), max(1, batch_rows // 50)
    else:
        raise PartitionError(f"unknown uninstalled-shop mode {mode!r}")
    return ShopStep(lock_timeout(lock_timeout_ms, local=False), batch, RESET_LOCK_TIMEOUT, blocks)


def dead_letters_step(lock_timeout_ms: int) -> ShopStep:
    """An uninstalled shop's dead letters (decoded by a named query, window by window)."""
    return ShopStep(lock_timeout(lock_timeout_ms, local=False), None, RESET_LOCK_TIMEOUT)


def shop_rows_left(table: str, columns: Sequence[str], mode: str) -> str:
    """Whether ``table`` holds rows of shop ``$1`` still to delete or anonymise."""
    t, guard = ident(table), _guard(columns) if mode == "anonymize" else "true"
    extra = f" AND {guard}"
    return f"SELECT EXISTS (SELECT 1 FROM {t} WHERE shop_id = $1{extra})"


def table_blocks(table: str) -> str:
    """The heap blocks of ``table`` now (an anonymisation's block ranges end there)."""
    name = ident(table)
    return (
        f"SELECT (pg_relation_size('{name}'::regclass) / "
        "current_setting('block_size')::bigint)::bigint"
    )


# -- what a restore applies to the month it puts back ---------------------------------------------


def distinct_ids(table: str, column: str, *, json_key: bool) -> str:
    """The distinct ids of shop ``$1`` in ``table``'s ``column`` (``json_key``: its JSON key
    ``$2``), which a restore hashes to find erased visitors (an erasure keeps HMACs only)."""
    t, c = ident(table), quote(column)
    value = f"{c} ->> $2::text" if json_key else c
    return f"SELECT DISTINCT {value} AS v FROM {t} WHERE shop_id = $1 AND {value} IS NOT NULL"


def shops_in(table: str) -> str:
    """Which of shops ``$1`` (uuid[]) have rows in ``table``."""
    return f"SELECT DISTINCT shop_id FROM {ident(table)} WHERE shop_id = ANY($1::uuid[])"
