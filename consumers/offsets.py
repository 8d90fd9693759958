"""Kafka offsets kept in PostgreSQL, beside the rows they produced (exactly-once effect)."""

from __future__ import annotations

from dataclasses import dataclass

import asyncpg

from ingest.core.db import Database, inline, queries

# advance_loader_offsets (migration 0004) raises this when a stored offset moved.
FENCED_SQLSTATE = "EPF01"


@dataclass(frozen=True)
class StoredOffset:
    """Where a loader group is in one Kafka partition, and in which broker log."""

    next_offset: int
    log_id: str


class Fenced(Exception):
    """The stored offset moved under us: another loader owns the partition now."""


class OffsetStore:
    """Reads, claims, resets and (fenced) advances the rows of ``loader_offsets``."""

    def __init__(self, db: Database, group: str, topic: str) -> None:
        self.db = db
        self.group = group
        self.topic = topic

    async def load(self, partitions: list[int]) -> dict[int, StoredOffset]:
        """The stored offsets of ``partitions`` (missing ones are absent)."""
        rows = await queries.fetch(
            self.db.pool, "loader_offsets", self.group, self.topic, partitions
        )
        return {r["kafka_partition"]: StoredOffset(r["next_offset"], r["log_id"]) for r in rows}

    async def claim(self, partition: int, offset: int, log_id: str) -> None:
        """Record a first position for ``partition`` unless one exists."""
        await queries.execute(
            self.db.pool, "claim_offset", self.group, self.topic, partition, offset, log_id
        )

    async def reset(self, partition: int, offset: int, log_id: str) -> None:
        """Overwrite the position of ``partition`` (after a broker log reset)."""
        await queries.execute(
            self.db.pool, "reset_offset", self.group, self.topic, partition, offset, log_id
        )

    async def advance(self, conn: asyncpg.Connection, moves: list[tuple[int, int, int]]) -> None:
        """Move each ``(partition, expected, new)`` in the caller's transaction, in one statement.

        Raises Fenced when a stored offset is not its ``expected``.
        """
        try:
            await queries.execute(conn, "advance_offsets", *self._arguments(moves))
        except asyncpg.PostgresError as exc:
            if is_fenced(exc):
                raise Fenced(str(exc)) from exc
            raise

    def advance_inline(self, moves: list[tuple[int, int, int]]) -> str:
        """``advance`` as plain SQL text, to send with other statements in one round trip
        (``is_fenced`` tells its refusal)."""
        return inline("advance_offsets", *self._arguments(moves))

    def _arguments(
        self, moves: list[tuple[int, int, int]]
    ) -> tuple[str, str, *tuple[list[int], ...]]:
        partitions, expected, new = (list(c) for c in zip(*moves, strict=True))
        return self.group, self.topic, partitions, expected, new


def is_fenced(exc: asyncpg.PostgresError) -> bool:
    """Whether ``exc`` is advance_loader_offsets' refusal: a stored offset moved."""
    return bool(exc.sqlstate == FENCED_SQLSTATE)
