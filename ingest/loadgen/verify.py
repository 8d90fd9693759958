"""``eventpipe bench --verify``: every accepted event id becomes exactly one row, and how soon.

There is no "visible at" column, so the lag of an event is the wall time at
which a poll first sees its row minus its ``received_at`` (the collector's
receive time). Polls run every ``poll_s`` (100 ms) while the load runs and
after it, each reading only the rows written since the poll before: those of
transactions from the oldest one still running at the last poll on (their
``load_xid``, as the rollups find new rows). A poll that asked for every id
not seen yet cost PostgreSQL a pass over the table per chunk of ids and
competed with the loaders it measured: with 355 000 ids outstanding the
end-to-end benchmark's drain took 48 s, PostgreSQL's CPU the verifier's.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Self

import asyncpg

from ingest.core.db import queries
from ingest.loadgen.traffic import percentile

VERIFIED_TABLES = ("behavior_events", "events")


@dataclass
class Reconciliation:
    """Outcome of a verification."""

    expected: int = 0
    seen: int = 0
    missing: int = 0
    duplicates: int = 0
    lags_s: list[float] = field(default_factory=list)
    wait_s: float = 0.0
    missing_sample: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        """JSON-friendly figures."""
        return {
            "expected": self.expected,
            "seen": self.seen,
            "missing": self.missing,
            "duplicates": self.duplicates,
            "lag_p50_s": round(percentile(self.lags_s, 50), 3),
            "lag_p90_s": round(percentile(self.lags_s, 90), 3),
            "lag_p99_s": round(percentile(self.lags_s, 99), 3),
            "lag_max_s": round(percentile(self.lags_s, 100), 3),
            "wait_after_load_s": round(self.wait_s, 2),
            "missing_sample": self.missing_sample,
        }


class _Connected:
    """A connection of its own to ``dsn``, open inside ``async with``."""

    dsn: str
    _conn: asyncpg.Connection | None = None

    async def __aenter__(self) -> Self:
        self._conn = await asyncpg.connect(self.dsn)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._conn is not None:
            await self._conn.close()


class Verifier(_Connected):
    """Polls PostgreSQL for expected event ids; run ``poll`` as a task, feed ``expect``."""

    def __init__(self, dsn: str, since: datetime, poll_s: float = 0.1, chunk: int = 5000) -> None:
        # ``chunk``: ids per query of the duplicate count.
        self.dsn = dsn
        # received_at is the collector's clock: allow for a little skew, not for
        # an earlier run's rows.
        self.since = since - timedelta(seconds=2)
        self.poll_s = poll_s
        self.chunk = chunk
        # Ids as their 16 bytes: bytes.fromhex and asyncpg's UUID.bytes are C, where
        # uuid.UUID(text) is Python (2.2 s for 600 000 ids, while loaders still drain).
        self.pending: dict[str, dict[bytes, None]] = {t: {} for t in VERIFIED_TABLES}
        self.all_ids: dict[str, list[bytes]] = {t: [] for t in VERIFIED_TABLES}
        self.result = Reconciliation()
        # Per table, the load_xid from which rows are new to the polls (0: all of them).
        self.watermarks: dict[str, int] = dict.fromkeys(VERIFIED_TABLES, 0)
        # Rows read before their ids were expected (each poll reads a row once or
        # twice, never again), with their lags: an id expected later finds its own.
        self.early: dict[str, dict[bytes, float]] = {t: {} for t in VERIFIED_TABLES}
        self.rows_read = 0  # by the last poll: what it cost PostgreSQL

    def expect(self, table: str, ids: Iterable[str]) -> None:
        """Add accepted ids that must become rows of ``table``."""
        early, all_ids = self.early[table], self.all_ids[table]
        for text in ids:
            value = bytes.fromhex(text.replace("-", ""))
            if len(value) != 16:
                raise ValueError(f"not a UUID: {text!r}")
            all_ids.append(value)
            self.result.expected += 1
            lag = early.pop(value, None)
            if lag is None:
                self.pending[table][value] = None
            else:  # a poll read its row before its answer was counted
                self.result.seen += 1
                self.result.lags_s.append(lag)

    @property
    def outstanding(self) -> int:
        """Ids not seen yet."""
        return sum(len(p) for p in self.pending.values())

    async def poll_once(self) -> int:
        """One read of the rows written since the last poll; how many expected ids it saw."""
        assert self._conn is not None, "use `async with Verifier(...)`"
        found = read = 0
        for table, pending in self.pending.items():
            early = self.early[table]
            rows = await queries.fetch(
                self._conn, f"verify_seen_{table}", self.since, self.watermarks[table]
            )
            now = datetime.now(UTC)
            for row in rows:
                if row["event_id"] is None:
                    continue  # no row: the query's one row carries the next watermark
                key = row["event_id"].bytes
                lag = (now - row["received_at"]).total_seconds()
                if key in pending:
                    del pending[key]
                    found += 1
                    self.result.lags_s.append(lag)
                else:
                    # Not expected (yet), or read again (its transaction ended between
                    # two polls' snapshots): the first reading is kept.
                    early.setdefault(key, lag)
            self.watermarks[table] = rows[0]["upto"]
            read += len(rows) if rows[0]["event_id"] is not None else 0
        self.rows_read = read
        self.result.seen += found
        return found

    async def poll(self, stop: asyncio.Event) -> None:
        """Poll every ``poll_s`` until ``stop`` is set."""
        while not stop.is_set():
            started = time.monotonic()
            await self.poll_once()
            await asyncio.sleep(max(0.0, self.poll_s - (time.monotonic() - started)))

    async def finish(self, timeout_s: float) -> Reconciliation:
        """Wait (up to ``timeout_s``) until every id is seen (``wait_s``: how long); then
        count missing and duplicates."""
        assert self._conn is not None, "use `async with Verifier(...)`"
        started = time.monotonic()
        while self.outstanding and time.monotonic() - started < timeout_s:
            await self.poll_once()
            if self.outstanding:
                await asyncio.sleep(self.poll_s)
        self.result.wait_s = time.monotonic() - started
        self.result.missing = self.outstanding
        self.result.missing_sample = [
            str(uuid.UUID(bytes=i)) for p in self.pending.values() for i in p
        ][:10]
        duplicates = 0
        for table, ids in self.all_ids.items():
            for i in range(0, len(ids), self.chunk):
                duplicates += await queries.fetchval(
                    self._conn,
                    f"verify_duplicates_{table}",
                    self.since,
                    [i.hex() for i in ids[i : i + self.chunk]],  # uuid takes bare hex
                )
        self.result.duplicates = int(duplicates)
        return self.result


class CountedIds(_Connected):
    """Counts the ``behavior_events`` rows whose event ids carry a request counter in
    [``first``, ``last``] in their first 8 hex digits (the ids of benchmarks/wrk.py's
    script), without reading them: the end-to-end benchmark times its drain with it.

    A :class:`Verifier` reads every new row into this process (its lags need each
    row's ``received_at``), and the suite shared the two cores with the loaders whose
    drain it timed; counting in PostgreSQL costs the pipeline a few pages a poll.
    The exact reconciliation (every id, duplicates) is the Verifier's, afterwards.
    Each row is counted once: a poll counts the rows of transactions that had all
    ended (below its snapshot's xmin), the next poll starts where it stopped.
    """

    def __init__(self, dsn: str, since: datetime, first: int, last: int) -> None:
        self.dsn = dsn
        self.since = since
        self.range = (f"{first:08x}", f"{last:08x}")  # zero-padded hex sorts as numbers
        self.counted = 0
        self.watermark = 0

    async def poll_once(self) -> int:
        """Count the rows of the transactions ended since the last poll; the total."""
        assert self._conn is not None, "use `async with CountedIds(...)`"
        row = await queries.fetchrow(
            self._conn, "verify_counted_behavior_events", self.since, self.watermark, *self.range
        )
        assert row is not None  # the query always answers one row
        self.counted += row["n"]
        self.watermark = row["upto"]
        return self.counted

    async def until(self, total: int, timeout_s: float, poll_s: float = 0.1) -> bool:
        """Poll until ``total`` rows are counted (True) or ``timeout_s`` has passed."""
        deadline = time.monotonic() + timeout_s
        while await self.poll_once() < total:
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(poll_s)
        return True
