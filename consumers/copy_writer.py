"""Rows into a partitioned table by binary COPY, deduplicated, with bad rows isolated.

The fast path is a plain COPY into the parent table, without a savepoint;
when it fails the caller rolls back and writes the batch again carefully.
Only when it meets a duplicate (a client retry, a replayed spool, a
redelivered webhook) does the batch go through a temporary staging table and
``INSERT ... ON CONFLICT DO NOTHING`` on the tables' key, (shop_id, event_id,
<event time>): the same event id of two shops is two events. A row PostgreSQL refuses is isolated by
splitting the batch in halves under savepoints until it is alone; the good
rows still load.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import asyncpg
import orjson

from consumers import binary_copy
from consumers.rows import TableSpec
from consumers.values import Encoded, Row, SessionPart
from ingest.core.db import queries
from ingest.core.identifiers import ident

# Errors that belong to a row, not to the database's health: class 22 (data
# exceptions: NUL bytes, bad encoding, out-of-range numbers, invalid JSON) and
# class 23 (integrity: CHECK, NOT NULL, no partition for the row).
ROW_ERRORS = (asyncpg.DataError, asyncpg.IntegrityConstraintViolationError)


class NeedsCare(Exception):
    """A plain COPY met a duplicate or a row PostgreSQL refuses: write the batch carefully."""


@dataclass(slots=True)
class Pending:
    """A decoded row with the Kafka coordinates it came from.

    ``index`` is the event's place in its record (a record carries one
    request's events); ``record`` is the whole record's bytes, kept by
    reference so a dead letter can be cut from it only when one is needed.
    """

    row: Row
    topic: str
    partition: int
    offset: int
    index: int
    record: bytes
    batched: bool
    context: object = None  # the collector's session facts, for user_sessions

    @property
    def raw(self) -> bytes:
        """The event's own bytes: what a dead letter keeps and replays."""
        if not self.batched:
            return self.record
        return orjson.dumps(orjson.loads(self.record)[self.index])

    def reject(self, reason: str, error: str) -> Rejected:
        """This row as a dead letter."""
        return Rejected(
            self.topic, self.partition, self.offset, self.index, self.raw, reason, error
        )


@dataclass(slots=True)
class Rejected:
    """An event (or a whole record, ``index`` 0) set aside for the dead-letter table."""

    topic: str
    partition: int
    offset: int
    index: int
    raw: bytes
    reason: str
    error: str


@dataclass(slots=True)
class Decoded:
    """One Kafka record, decoded: the rows of its good events and its refused ones.

    The loader's unit of work: a record carries a request's events, and an
    object per record rather than per row keeps the decoding cheap. Per-row
    ``Pending`` items are made only when a write needs them (a duplicate, a
    row PostgreSQL refuses, a month outside the window).

    A record decoded straight to COPY data (``TableSpec.decode_copy``) has
    ``encoded`` and no rows until a write needs them (``built``).
    """

    topic: str
    partition: int
    offset: int
    record: bytes
    batched: bool
    rows: list[Row]
    contexts: list[object]  # one per row, or empty when the table keeps no sessions
    indexes: list[int] | None = None  # the rows' places in the record; None: 0, 1, ...
    rejected: list[Rejected] = field(default_factory=list)
    encoded: Encoded | None = None

    @property
    def count(self) -> int:
        """Its rows (built or not)."""
        return self.encoded.count if self.encoded is not None else len(self.rows)

    def built(self, spec: TableSpec) -> Decoded:
        """This record with its rows, decoded again from the record if they weren't built."""
        if self.encoded is not None and len(self.rows) != self.encoded.count:
            decoded = spec.decode(self.record)
            if decoded is None:  # decode_copy took it: decode does (test_rows)
                raise RuntimeError(f"record at offset {self.offset} no longer decodes")
            self.rows, self.contexts = decoded[0], decoded[1]
        return self

    def emptied(self) -> Decoded:
        """The same record with no rows (nor refusals) yet, to be filled by ``add``."""
        return Decoded(
            self.topic, self.partition, self.offset, self.record, self.batched, [], [], []
        )

    def add(self, row: Row, index: int, context: object) -> None:
        """One more row, the event at ``index`` of the record (after ``emptied``)."""
        assert self.indexes is not None, "add() follows emptied()"
        self.rows.append(row)
        self.indexes.append(index)
        self.contexts.append(context)

    def pending(self) -> list[Pending]:
        """The rows as Pending items (``built`` first)."""
        places = self.indexes if self.indexes is not None else range(len(self.rows))
        contexts = self.contexts or [None] * len(self.rows)
        return [
            Pending(row, self.topic, self.partition, self.offset, i, self.record, self.batched, c)
            for row, i, c in zip(self.rows, places, contexts, strict=True)
        ]


@dataclass
class Written:
    """What one write did: how many rows became new rows, those rows (with their
    session contexts, when the table keeps sessions), and the events refused."""

    count: int = 0
    rows: list[Row] = field(default_factory=list)  # none when written from COPY data
    contexts: list[object] = field(default_factory=list)
    rejected: list[Rejected] = field(default_factory=list)
    # Written from COPY data: what its rows told of their sessions (``Encoded.sessions``).
    sessions: list[SessionPart] = field(default_factory=list)


@dataclass
class _Outcome:
    inserted: list[Pending] = field(default_factory=list)
    rejected: list[Rejected] = field(default_factory=list)


class CopyWriter:
    """Writes Pending rows of one table inside the caller's transaction."""

    def __init__(self, spec: TableSpec) -> None:
        self.spec = spec
        self.table = ident(spec.table)
        self.stage = ident(f"_stage_{spec.table}")
        cols = ", ".join(ident(c) for c in spec.columns)
        # The tables' primary key: an event is unique within its shop (0009).
        key = ", ".join(ident(c) for c in spec.contract.key)
        self._create_stage = ""  # needs the column types: made on first use
        self._merge = (
            f"INSERT INTO {self.table} ({cols}) SELECT DISTINCT ON ({key}) {cols} "
            f"FROM {self.stage} ON CONFLICT DO NOTHING RETURNING {key}"
        )
        shop, event, time = (spec.columns.index(c) for c in spec.contract.key)
        self._key_at = (shop, event, time)

    async def write(
        self, conn: asyncpg.Connection, decoded: list[Decoded], *, careful: bool = True
    ) -> Written:
        """Load the rows of ``decoded`` inside the caller's transaction (``conn`` takes
        times as rows carry them: ``rows.use_pg_times``).

        Returns the rows that became new rows (duplicates of stored rows are
        not among them) and the events PostgreSQL refused. Not ``careful``:
        one plain COPY, and NeedsCare (the caller's transaction is then
        aborted) when it meets a duplicate or a refused row; this saves the
        savepoint's round trips on the path almost every batch takes.
        """
        decoded = [d for d in decoded if d.count]
        if not decoded:
            return Written()
        if careful:
            out = _Outcome()
            items = [p for d in decoded for p in d.built(self.spec).pending()]
            await self._load(conn, items, out, staged=False)
            return Written(
                len(out.inserted),
                [i.row for i in out.inserted],
                [i.context for i in out.inserted],
                out.rejected,
            )
        try:
            if all(d.encoded is not None for d in decoded):
                await conn.copy_to_table(
                    self.spec.table,
                    source=binary_copy.stream(d.encoded.data for d in decoded if d.encoded),
                    columns=self.spec.columns,
                    format="binary",
                )
                return Written(
                    sum(d.count for d in decoded),
                    sessions=[p for d in decoded if d.encoded for p in d.encoded.sessions],
                )
            rows = [row for d in decoded for row in d.built(self.spec).rows]
            await conn.copy_records_to_table(
                self.spec.table, records=rows, columns=self.spec.columns
            )
        except (asyncpg.UniqueViolationError, *ROW_ERRORS) as exc:
            raise NeedsCare(str(exc)) from exc
        return Written(len(rows), rows, [c for d in decoded for c in d.contexts])

    async def _load(
        self, conn: asyncpg.Connection, items: list[Pending], out: _Outcome, *, staged: bool
    ) -> None:
        try:
            async with conn.transaction():  # a savepoint
                inserted = await self._insert(conn, items, staged=staged)
        except asyncpg.UniqueViolationError:
            if staged:
                raise  # cannot happen: ON CONFLICT DO NOTHING
            await self._load(conn, items, out, staged=True)
        except ROW_ERRORS as exc:
            # Split in halves until each bad row is alone and set aside.
            if len(items) > 1:
                middle = len(items) // 2
                await self._load(conn, items[:middle], out, staged=staged)
                await self._load(conn, items[middle:], out, staged=staged)
                return
            error = f"{type(exc).__name__}: {exc}"
            out.rejected.append(items[0].reject("rejected_by_postgres", error))
        else:
            out.inserted += inserted

    async def _insert(
        self, conn: asyncpg.Connection, items: list[Pending], *, staged: bool
    ) -> list[Pending]:
        rows: list[Row] = [i.row for i in items]
        if not staged:
            await conn.copy_records_to_table(
                self.spec.table, records=rows, columns=self.spec.columns
            )
            return items
        if not self._create_stage:
            columns = await queries.fetchval(
                conn, "stage_columns", self.spec.table, self.spec.columns
            )
            self._create_stage = (
                f"CREATE TEMP TABLE IF NOT EXISTS {self.stage} ({columns}) ON COMMIT DELETE ROWS"
            )
        await conn.execute(self._create_stage)
        await conn.execute(f"TRUNCATE {self.stage}")
        await conn.copy_records_to_table(
            f"_stage_{self.spec.table}", records=rows, columns=self.spec.columns
        )
        # Rows hold event ids as asyncpg's UUIDs, the type fetch returns (see rows._event_id),
        # and shop ids as canonical strings (rows._uuid), what str() of a UUID gives.
        new = {(str(r[0]), r[1], r[2]) for r in await conn.fetch(self._merge)}
        shop_at, id_at, time_at = self._key_at
        inserted: list[Pending] = []
        for item in items:
            key = (item.row[shop_at], item.row[id_at], item.row[time_at])
            if key in new:
                inserted.append(item)
                new.discard(key)  # a duplicate inside the batch counts once
        return inserted
