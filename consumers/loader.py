"""The loader: one stream's Kafka topic into its partitioned table, exactly once.

Each batch's rows, its dead letters and the new offsets of its Kafka
partitions are committed in one PostgreSQL transaction; a partition resumes
from the offsets stored there. Offsets are advanced with a fence (only from
the position this loader read at assignment), so a loader that lost a
partition in a rebalance can never apply a batch a second time.

A partition is loaded only once it is positioned at its stored offset. When
that fails at assignment (PostgreSQL away, a broker leader change), the
partition is paused, so nothing of it is read, and positioning is retried with
backoff; past ``loader_assignment_timeout_s`` the loader leaves the group and
joins again. A loader started without a reachable broker keeps trying too.

What a batch holds and how its records are decoded is ``consumers.batch``;
running loaders in a process or a group of processes is ``consumers.runner``.
Over 600 lines because ``Loader`` is one state machine: positioning, reading
and writing share its partitions' positions, seek epochs and lock, and
split across modules each half would reach into the other's state.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections import defaultdict, deque
from collections.abc import Callable
from datetime import date

import asyncpg
import structlog
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.abc import ConsumerRebalanceListener
from aiokafka.errors import KafkaError

from consumers import dead_letters, identities, sessions
from consumers.batch import Batch
from consumers.copy_writer import CopyWriter, Decoded, NeedsCare, Rejected, Written
from consumers.offsets import Fenced, OffsetStore, is_fenced
from consumers.rows import TableSpec
from consumers.values import Row, as_datetime, use_datetimes, use_pg_times
from ingest.core import metrics
from ingest.core.db import Database, inline, queries
from ingest.core.errors import OutsideRetentionWindow
from ingest.core.service import Service
from ingest.core.settings import Settings
from ingest.core.suppression import Suppression
from ingest.core.topics import cluster_id
from ingest.partitions import PartitionManager, month_start

log = structlog.get_logger(__name__)

# PostgreSQL being away or restarting: wait and retry the same batch.
DB_UNAVAILABLE = (
    OSError,
    asyncio.TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.CannotConnectNowError,
    asyncpg.AdminShutdownError,
    asyncpg.CrashShutdownError,
    # A connection cut in the middle of a COPY can leave asyncpg's protocol
    # state confused; the pool drops that connection and the retry gets a new one.
    asyncpg.InternalClientError,
)


# The reader shares the event loop with the batch being written: it works in
# small pieces so the writer's round trips to PostgreSQL aren't kept waiting.
_READ_SLICE = 500  # events (about) per getmany: aiokafka parses its records in one go
_DECODE_SLICE = 100  # events (about) decoded between two yields to the event loop
_FETCH_BYTES = 1024 * 1024  # prefetched per Kafka partition
_KAFKA_COMMIT_EVERY_S = 1.0  # offsets told to Kafka (for lag tools) at most this often
_RETRY_FIRST_S = 0.2  # first pause before positioning again / reaching the broker again
_RETRY_MAX_S = 10.0  # the backoff's cap
_LAG_EVERY_S = 1.0  # lag of unpositioned partitions (asked of the broker) at most this often
_WATCH_TICK_S = 0.1


def _jitter(delay: float) -> float:
    return delay * random.uniform(0.5, 1.5)


class _Rebalance(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, loader: Loader) -> None:
        self.loader = loader

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        # Waits for the batch in flight to commit, so nothing is half-applied.
        async with self.loader.lock:
            self.loader.forget(revoked)

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        # Never raises: aiokafka would only log it, and the partitions would stay
        # assigned, fetched and (unpositioned) never loaded. ``assigned`` pauses
        # what it cannot position yet and the loader retries it.
        async with self.loader.lock:
            await self.loader.assigned(assigned)


class Loader(Service):
    """Consumes one stream in the loaders' consumer group and COPYs it into its table."""

    def __init__(
        self, settings: Settings, spec: TableSpec, db: Database, partitions: PartitionManager
    ) -> None:
        self.settings = settings
        self.spec = spec
        self.db = db
        self.partitions = partitions
        self.topic = settings.topic_for(spec.stream)
        self.group = f"{settings.consumer_group}.{spec.stream}"
        self.offsets = OffsetStore(db, self.group, self.topic)
        self.writer = CopyWriter(spec)
        self.lock = asyncio.Lock()
        self.positions: dict[TopicPartition, int] = {}
        # The identity of the broker log each partition was positioned in (dead letters
        # are unique within a log: a replaced log reuses offsets).
        self.log_ids: dict[int, str] = {}
        # Assigned, not positioned yet (paused); retried from ``_keep_positioned``.
        self._unpositioned: set[TopicPartition] = set()
        self._unpositioned_since: float | None = None
        self._retry_at = 0.0
        self._retry_delay = _RETRY_FIRST_S
        self._epochs: dict[TopicPartition, int] = defaultdict(int)  # seeks per partition
        self._connect_error = ""
        self._watch: asyncio.Task[None] | None = None
        self._stopped = False
        self.rows_loaded = 0
        # Events per Kafka record, as last seen; it starts at a beacon's usual 20 so
        # that a first read of a backlog doesn't make a batch 20 times too big.
        self._per_record = 20.0
        self._consumer: AIOKafkaConsumer | None = None
        self._task: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()
        self._kafka_commit: asyncio.Task[None] | None = None
        self._uncommitted: dict[TopicPartition, int] = {}  # loaded, not yet told to Kafka
        self._kafka_committed_at = 0.0
        self.role: str | None = None
        # Held from batch to batch: a pool release resets the connection, one
        # more round trip per batch. Given back when stopped or when it broke.
        self._conn: asyncpg.Connection | None = None
        self._retired: deque[Batch] = deque()  # written batches the reader frees piecemeal
        self._reader_waits: Callable[[], None] | None = None  # lets it read the next batch
        self.suppression = Suppression()  # erased visitors, whose events are dropped

    async def start(self) -> None:
        """Join the consumer group and start loading in the background.

        Without a reachable broker it returns all the same: the background task
        keeps trying, with backoff, and loads once the broker answers.
        """
        metrics.init_loader(self.spec.table, self.topic)
        self.role = await self.db.role_for(self.settings.loader_role, copies=True)
        await self.suppression.load(self.db.pool)
        self.suppression.start_refresh(self.db.pool, self.settings.suppression_refresh_s)
        connected = await self._connect()
        self._task = asyncio.create_task(self._main(connected), name=f"loader-{self.spec.stream}")
        log.info("loader started", stream=self.spec.stream, topic=self.topic, group=self.group)

    async def _connect(self) -> bool:
        """One attempt at reaching the broker and joining the group; False when it failed."""
        consumer = AIOKafkaConsumer(
            bootstrap_servers=self.settings.bootstrap,
            group_id=self.group,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            max_partition_fetch_bytes=_FETCH_BYTES,
            fetch_max_bytes=min(self.settings.batch_max_bytes, 50 * 1024 * 1024),
            # A fetch never waits longer than a batch may age.
            fetch_max_wait_ms=min(self.settings.batch_max_age_ms, 500),
            fetch_min_bytes=self.settings.loader_fetch_min_bytes,
            session_timeout_ms=self.settings.kafka_session_timeout_ms,
            heartbeat_interval_ms=max(self.settings.kafka_session_timeout_ms // 6, 100),
        )
        consumer.subscribe([self.topic], listener=_Rebalance(self))
        # Set before it starts: the group may assign partitions (the listener uses
        # it) before start() returns.
        self._consumer = consumer
        try:
            await consumer.start()
        except (KafkaError, OSError, TimeoutError) as exc:
            self._consumer = None
            metrics.BROKER_CONNECT_FAILURES.labels(self.topic).inc()
            self._connect_error = f"{type(exc).__name__}: {exc}"
            with contextlib.suppress(Exception):
                await consumer.stop()
            return False
        _fetch_drained_partitions_at_once(consumer)
        return True

    async def _main(self, connected: bool) -> None:
        """Reach the broker (retrying with backoff), then load until stopped."""
        delay, attempt = _RETRY_FIRST_S, 1
        while not connected:
            wait = _jitter(delay)
            log.warning(
                "loader cannot reach Kafka yet, retrying",
                bootstrap=self.settings.bootstrap,
                attempt=attempt,
                error=self._connect_error,
                retry_in=round(wait, 2),
                hint="check EVENTPIPE_KAFKA_BOOTSTRAP",
            )
            if await self._pause(wait):
                return  # stopped before the broker came
            attempt += 1
            delay = min(delay * 2, _RETRY_MAX_S)
            connected = await self._connect()
            if connected:
                log.info("loader reached Kafka", bootstrap=self.settings.bootstrap, attempt=attempt)
        self._watch = asyncio.create_task(self._keep_positioned())
        try:
            await self._run()
        finally:
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch

    async def _pause(self, seconds: float) -> bool:
        """Sleep ``seconds`` or until stopped; True when stopped."""
        try:
            await asyncio.wait_for(self._stopping.wait(), seconds)
        except TimeoutError:
            return False
        return True

    async def stop(self) -> None:
        """Finish and commit the batch in flight, then leave the group."""
        if self._stopped:
            return
        self._stopped = True
        self._stopping.set()
        self.suppression.stop()
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._kafka_commit is not None:
            await self._kafka_commit
        if self._consumer is not None:
            self._commit_to_kafka({}, now=True)
            if self._kafka_commit is not None:
                await self._kafka_commit
            await self._consumer.stop()
        # Leaving the group revokes nothing through the listener: a stopped loader's
        # lag figures would stay, frozen, beside its partitions' new owner's.
        self.forget(set(self.positions) | self._unpositioned)
        log.info("loader stopped", stream=self.spec.stream, rows_loaded=self.rows_loaded)

    @property
    def task(self) -> asyncio.Task[None]:
        """The background task that reads and loads."""
        assert self._task is not None, "Loader not started"
        return self._task

    @property
    def consumer(self) -> AIOKafkaConsumer:
        """The running Kafka consumer."""
        assert self._consumer is not None, "Loader not started"
        return self._consumer

    def forget(self, revoked: set[TopicPartition]) -> None:
        """Stop loading ``revoked`` partitions (their new owner resumes them from
        PostgreSQL); called with ``lock`` held, so no batch is half-applied."""
        for tp in revoked:
            self.positions.pop(tp, None)
            self._uncommitted.pop(tp, None)
            self._unpositioned.discard(tp)
            # Its new owner reports its lag; a stale figure here would count twice.
            with contextlib.suppress(KeyError):
                metrics.CONSUMER_LAG.remove(tp.topic, str(tp.partition))
        if not self._unpositioned:
            self._unpositioned_since = None
        metrics.PARTITIONS_UNPOSITIONED.labels(self.topic).set(len(self._unpositioned))

    async def assigned(self, tps: set[TopicPartition]) -> None:
        """Position ``tps`` (newly assigned, or to be positioned again) at their stored
        offsets; called with ``lock`` held. Never raises: those that cannot be positioned
        yet are paused, so nothing of them is read, and retried with backoff."""
        if not tps:
            return
        for tp in tps:
            self.positions.pop(tp, None)
        self._unpositioned |= tps
        held = tps & self.consumer.assignment()
        if held:
            self.consumer.pause(*held)
        if self._unpositioned_since is None:
            self._unpositioned_since = asyncio.get_running_loop().time()
            self._retry_delay = _RETRY_FIRST_S
        await self._try_position()

    async def _try_position(self) -> None:
        """One attempt at positioning the unpositioned partitions still assigned (lock held)."""
        self._unpositioned &= self.consumer.assignment()  # a revoked one isn't ours to position
        if self._unpositioned:
            try:
                await self.position(set(self._unpositioned))
            except Exception as exc:  # whatever it is, the partitions must not be stranded
                metrics.ASSIGNMENT_FAILURES.labels(self.topic).inc()
                wait = _jitter(self._retry_delay)
                self._retry_at = asyncio.get_running_loop().time() + wait
                self._retry_delay = min(self._retry_delay * 2, _RETRY_MAX_S)
                log.warning(
                    "cannot position assigned partitions yet; their records wait in Kafka",
                    topic=self.topic,
                    partitions=sorted(tp.partition for tp in self._unpositioned),
                    error=f"{type(exc).__name__}: {exc}",
                    retry_in=round(wait, 2),
                )
        if not self._unpositioned:
            self._unpositioned_since = None
        metrics.PARTITIONS_UNPOSITIONED.labels(self.topic).set(len(self._unpositioned))

    async def _keep_positioned(self) -> None:
        """Retry positioning what could not be, report its lag, and rejoin the group when
        it takes longer than ``loader_assignment_timeout_s``; report the positioned
        partitions' lag every ``loader_lag_refresh_s`` (whether batches commit or not)."""
        loop = asyncio.get_running_loop()
        lag_at = 0.0
        positioned_lag_at = 0.0
        while not self._stopping.is_set():
            if loop.time() >= positioned_lag_at:
                positioned_lag_at = loop.time() + self.settings.loader_lag_refresh_s
                await self._report_lag()
            if self._unpositioned and loop.time() >= self._retry_at:
                async with self.lock:
                    await self._try_position()
                since = self._unpositioned_since
                if (
                    self._unpositioned
                    and since is not None
                    and loop.time() - since > self.settings.loader_assignment_timeout_s
                ):
                    await self._rejoin(loop.time() - since)
            if self._unpositioned and loop.time() >= lag_at:
                lag_at = loop.time() + _LAG_EVERY_S
                await self._report_unpositioned_lag()
            await self._pause(_WATCH_TICK_S)

    async def _rejoin(self, waited: float) -> None:
        """Leave the consumer group and join it again: a new assignment, positioned anew."""
        metrics.LOADER_REJOINS.labels(self.topic).inc()
        log.error(
            "assigned partitions unpositioned too long: leaving the consumer group to join again",
            topic=self.topic,
            partitions=sorted(tp.partition for tp in self._unpositioned),
            waited_s=round(waited, 1),
        )
        async with self.lock:
            self.forget(set(self.positions) | self._unpositioned)
            self.consumer.unsubscribe()
            self.consumer.subscribe([self.topic], listener=_Rebalance(self))

    async def _report_lag(self) -> None:
        """Lag of the positioned partitions: the broker's end offsets against the
        position this loader stored in PostgreSQL with its last batch. Asked of the
        broker, not taken from the last batch: with PostgreSQL stalled no batch
        commits, and the lag must grow all the same (it reads 0 when idle)."""
        tps = sorted(set(self.positions) & self.consumer.assignment(), key=lambda tp: tp.partition)
        if not tps:
            return
        try:
            # Bounded: this loop also retries positioning, which must not wait on
            # a broker that doesn't answer (aiokafka would wait its request timeout).
            end = await asyncio.wait_for(
                self.consumer.end_offsets(tps), max(self.settings.loader_lag_refresh_s, 1.0)
            )
        except Exception as exc:  # the broker away: the last figures stay
            log.debug("cannot tell the lag of positioned partitions", error=str(exc))
            return
        for tp in tps:
            # Revoked or repositioned while we asked: not ours to report (no await below).
            position = self.positions.get(tp)
            if position is not None and tp in self.consumer.assignment():
                metrics.CONSUMER_LAG.labels(tp.topic, str(tp.partition)).set(
                    max(end[tp] - position, 0)
                )

    async def _report_unpositioned_lag(self) -> None:
        """Lag of the unpositioned partitions: the log's end against the offset last
        committed to Kafka (PostgreSQL, where the true one is, may be what is away)."""
        tps = sorted(self._unpositioned & self.consumer.assignment(), key=lambda tp: tp.partition)
        if not tps:
            return
        try:
            end = await self.consumer.end_offsets(tps)
            begin = await self.consumer.beginning_offsets(tps)
            for tp in tps:
                committed = await self.consumer.committed(tp)
                start = begin[tp] if committed is None else committed
                metrics.CONSUMER_LAG.labels(tp.topic, str(tp.partition)).set(
                    max(end[tp] - start, 0)
                )
        except Exception as exc:  # the broker away too: the last figures stay
            log.debug("cannot tell the lag of unpositioned partitions", error=str(exc))

    async def position(self, assigned: set[TopicPartition]) -> None:
        """Seek each of ``assigned`` to the offset stored in PostgreSQL, and resume it.

        Raises when PostgreSQL or the broker can't tell; those not seeked yet stay
        unpositioned (``assigned`` is the caller that never raises).
        """
        if not assigned:
            return
        tps = sorted(assigned, key=lambda tp: tp.partition)
        begin = await self.consumer.beginning_offsets(tps)
        end = await self.consumer.end_offsets(tps)
        log_id = self.settings.kafka_log_id or await cluster_id(self.settings.bootstrap)
        stored = await self.offsets.load([tp.partition for tp in tps])
        for tp in tps:
            current = stored.get(tp.partition)
            if current is None:
                await self.offsets.claim(tp.partition, begin[tp], log_id)
                current = (await self.offsets.load([tp.partition]))[tp.partition]
            reset_reason = ""
            if current.log_id != log_id:
                reset_reason = "the broker's log was replaced (embedded broker restarted?)"
            elif current.next_offset > end[tp]:
                reset_reason = "the stored offset is past the end of the log (topic recreated?)"
            elif current.next_offset < begin[tp]:
                reset_reason = "records expired from Kafka before they were loaded"
            offset = current.next_offset
            if reset_reason:
                log.warning(
                    "offset reset: loading this partition from the start of its log",
                    reason=reset_reason,
                    topic=tp.topic,
                    partition=tp.partition,
                    stored_offset=current.next_offset,
                    log_start=begin[tp],
                    log_end=end[tp],
                )
                offset = begin[tp]
                await self.offsets.reset(tp.partition, offset, log_id)
            self.consumer.seek(tp, offset)
            self._epochs[tp] += 1  # records read before this seek are read again
            self.positions[tp] = offset
            self.log_ids[tp.partition] = log_id
            self._unpositioned.discard(tp)
            self.consumer.resume(tp)
            metrics.CONSUMER_LAG.labels(tp.topic, str(tp.partition)).set(max(end[tp] - offset, 0))

    async def _run(self) -> None:
        # Two stages: while this task writes batch N, a reader task fetches and
        # decodes batch N+1 and hands it over as soon as it is full, so the
        # database gets its next COPY the moment a commit returns. Batches commit
        # one at a time, in order; at most three are in memory (one written, one
        # read, and the one before, which the reader frees as it reads).
        ready: asyncio.Queue[Batch | None] = asyncio.Queue(maxsize=1)
        reader = asyncio.create_task(self._read(ready), name=f"reader-{self.spec.stream}")
        try:
            while (batch := await ready.get()) is not None:
                # The reader starts the next batch once this one's transaction is
                # open: its work would otherwise delay that round trip.
                self._reader_waits = ready.task_done
                try:
                    await self._apply_with_retry(batch)
                finally:
                    self._let_reader_go()
                self._retired.append(batch)
            await reader  # its error, if it stopped on one
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader
            await self._release_connection()

    async def _read(self, ready: asyncio.Queue[Batch | None]) -> None:
        """Collect batches into ``ready`` until stopped; None tells the writer to finish."""
        try:
            while not self._stopping.is_set():
                batch = await self._collect()
                if batch.count:
                    await ready.put(batch)
                    await ready.join()  # wait until the writer took it
        finally:
            with contextlib.suppress(asyncio.QueueFull):
                ready.put_nowait(None)

    async def _collect(self) -> Batch:
        """Read until the batch is full by rows or bytes, or its first record is old enough."""
        batch = Batch()
        loop = asyncio.get_running_loop()
        max_age = self.settings.batch_max_age_ms / 1000
        max_rows = self.settings.batch_max_rows
        first_at: float | None = None
        while not self._stopping.is_set():
            wait = max_age if first_at is None else max(0.0, first_at + max_age - loop.time())
            got = await self.consumer.getmany(
                timeout_ms=int(wait * 1000),
                # Records carry several events each: ask for about as many
                # records as there are rows left to fill (in slices).
                max_records=max(
                    1, int(min(max_rows - batch.count, _READ_SLICE) / self._per_record)
                ),
            )
            epochs = dict(self._epochs)  # as they were when ``got`` was read
            step = max(1, int(_DECODE_SLICE / self._per_record))
            for tp, records in got.items():
                for i in range(0, len(records), step):
                    batch.add(
                        tp, records[i : i + step], self.spec, epochs.get(tp, 0), self.suppression
                    )
                    self._free_retired(_DECODE_SLICE)
                    await asyncio.sleep(0)
            if not got:
                self._retired.clear()  # nothing else to do
            if batch.records_read:
                self._per_record = batch.count / batch.records_read
            if batch.count and first_at is None:
                first_at = loop.time()
            if first_at is not None and (
                batch.count >= max_rows
                or batch.size >= self.settings.batch_max_bytes
                or loop.time() - first_at >= max_age
            ):
                break
        return batch

    def _let_reader_go(self) -> None:
        release, self._reader_waits = self._reader_waits, None
        if release is not None:
            release()

    def _free_retired(self, events: int) -> None:
        if self._retired and not self._retired[0].free_some(events):
            self._retired.popleft()

    async def _apply_with_retry(self, batch: Batch) -> None:
        delay = 0.2
        while True:
            try:
                async with self.lock:
                    await self._apply(batch)
                return
            except DB_UNAVAILABLE as exc:
                log.warning("postgres unavailable, retrying batch", error=str(exc), retry_in=delay)
                await self._release_connection()
                await asyncio.sleep(delay * random.uniform(0.5, 1.5))
                delay = min(delay * 2, 10.0)
            except Fenced as exc:
                log.warning("fenced: re-reading offsets", error=str(exc))
                async with self.lock:
                    owned = set(self.positions)
                    for tp in owned:
                        self._uncommitted.pop(tp, None)
                    await self.assigned(owned)
                return

    async def _apply(self, batch: Batch) -> None:
        decoded: list[Decoded] = []
        rejected: list[Rejected] = []
        ranges: dict[TopicPartition, tuple[int, int]] = {}
        for tp, records in batch.records.items():
            start = self.positions.get(tp)
            if start is None:
                # Revoked while we read (its new owner loads it), or not positioned
                # yet: paused, and read again from its stored offset once positioned.
                continue
            if batch.epochs.get(tp, 0) != self._epochs[tp]:
                continue  # read before it was positioned again: read again from there
            highwater = self.consumer.highwater(tp)
            if highwater is not None and highwater < start:
                # The log is shorter than what we loaded: the broker lost it
                # (an in-memory broker restarted). Re-read where to start.
                await self.assigned({tp})
                continue
            fresh = [r for r in records if r.offset >= start]
            if not fresh:
                continue
            ranges[tp] = (start, fresh[-1].offset + 1)
            decoded += fresh
            for entry in fresh:
                rejected += entry.rejected
        if not ranges:
            return
        decoded = await self._ensure_partitions(batch, decoded, rejected)
        started = time.perf_counter()
        moves = [(tp.partition, start, end) for tp, (start, end) in ranges.items()]
        if self._conn is None:
            self._conn = await self.db.pool.acquire()
            await use_pg_times(self._conn)
        try:
            written = await self._transaction(self._conn, decoded, rejected, moves, careful=False)
        except NeedsCare:
            # A duplicate or a refused row: the batch again, row by row where needed.
            written = await self._transaction(self._conn, decoded, rejected, moves, careful=True)
        rejected = rejected + written.rejected
        for tp, (_, end) in ranges.items():
            self.positions[tp] = end
        self._observe(batch, written, rejected, time.perf_counter() - started)
        self._commit_to_kafka({tp: end for tp, (_, end) in ranges.items()})

    async def _transaction(
        self,
        conn: asyncpg.Connection,
        decoded: list[Decoded],
        rejected: list[Rejected],
        moves: list[tuple[int, int, int]],
        *,
        careful: bool,
    ) -> Written:
        """One batch's rows, sessions, dead letters and offsets in one transaction.

        Not ``careful`` (the path almost every batch takes): one plain COPY,
        which raises NeedsCare when it meets a duplicate or a row PostgreSQL
        refuses (the transaction is rolled back), and the offsets moved in the
        round trip that opens the transaction: three round trips, as a bare
        COPY in a transaction takes. That transaction is begun by hand:
        asyncpg's ``transaction()`` sends its BEGIN alone. ``careful``: each
        refused row isolated and set aside (savepoints).
        """
        if careful:
            async with conn.transaction():
                if self.role:
                    await queries.execute(conn, "set_local_role", self.role)
                written = await self._write(conn, decoded, rejected, careful=True)
                await self.offsets.advance(conn, moves)
            return written
        opening = ["BEGIN"]
        if self.role:
            opening.append(inline("set_local_role", self.role))
        opening.append(self.offsets.advance_inline(moves))
        try:
            await conn.execute(";\n".join(opening))
            self._let_reader_go()
            written = await self._write(conn, decoded, rejected, careful=False)
            await conn.execute("COMMIT")
        except BaseException as exc:
            await _rollback(conn)
            if isinstance(exc, asyncpg.PostgresError) and is_fenced(exc):
                raise Fenced(str(exc)) from exc
            raise
        return written

    async def _write(
        self,
        conn: asyncpg.Connection,
        decoded: list[Decoded],
        rejected: list[Rejected],
        *,
        careful: bool,
    ) -> Written:
        """A batch's rows, the sessions they touch and its dead letters, in the
        caller's transaction."""
        found: list[Row] = []
        if self.spec.keeps_identities:  # identify/alias/group: identities, not rows
            decoded, found = identities.split(decoded)
        written = await self.writer.write(conn, decoded, careful=careful)
        if self.spec.keeps_sessions:
            await sessions.upsert(conn, written.rows, written.contexts, written.sessions)
        if found:
            await identities.upsert(conn, found)
        await dead_letters.record(conn, self.group, rejected + written.rejected, self.log_ids)
        return written

    async def _release_connection(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            # A broken connection is closed by the pool; nothing here may stop a retry.
            try:
                await use_datetimes(conn)
            except Exception:
                # Never hand the pool a connection that speaks PgTime.
                with contextlib.suppress(Exception):
                    conn.terminate()
            with contextlib.suppress(Exception):
                await self.db.pool.release(conn, timeout=5)

    def _commit_to_kafka(self, offsets: dict[TopicPartition, int], *, now: bool = False) -> None:
        """Commit to Kafka in the background, for lag tools only: PostgreSQL is the truth.

        At most one commit a second (``now``: whatever is pending), not one per batch:
        each is a round trip to the group coordinator the loader's event loop and
        the broker pay for.
        """
        self._uncommitted.update(offsets)
        if not self._uncommitted or (
            self._kafka_commit is not None and not self._kafka_commit.done()
        ):
            return
        at = time.monotonic()
        if not now and at - self._kafka_committed_at < _KAFKA_COMMIT_EVERY_S:
            return
        pending, self._uncommitted, self._kafka_committed_at = self._uncommitted, {}, at

        async def commit() -> None:
            with contextlib.suppress(KafkaError, asyncio.CancelledError):
                await self.consumer.commit(pending)

        self._kafka_commit = asyncio.create_task(commit())

    def _observe(
        self, batch: Batch, written: Written, rejected: list[Rejected], seconds: float
    ) -> None:
        table = self.spec.table
        self.rows_loaded += written.count
        metrics.ROWS_LOADED.labels(table).inc(written.count)
        metrics.BATCH_ROWS.labels(table).observe(batch.count)
        metrics.COPY_LATENCY.labels(table).observe(seconds)
        for tp in batch.records:
            highwater = self.consumer.highwater(tp)
            if highwater is not None and tp in self.positions:
                lag = max(highwater - self.positions[tp], 0)
                metrics.CONSUMER_LAG.labels(tp.topic, str(tp.partition)).set(lag)
        for r in rejected:
            metrics.DEAD_LETTERS.labels(table, r.reason).inc()
        if rejected:
            log.warning(
                "records dead-lettered",
                count=len(rejected),
                reasons=sorted({r.reason for r in rejected}),
            )

    async def _ensure_partitions(
        self, batch: Batch, decoded: list[Decoded], rejected: list[Rejected]
    ) -> list[Decoded]:
        """Create missing month partitions; rows outside the window become dead letters."""
        index = self.spec.time_index
        if batch.earliest is None or batch.latest is None:
            return decoded
        first, last = (
            month_start(as_datetime(batch.earliest)),
            month_start(as_datetime(batch.latest)),
        )
        # Almost every batch is within one month (the reader kept its bounds):
        # two conversions instead of one per row.
        months = (
            {first}
            if first == last
            else {
                month_start(as_datetime(row[index]))
                for d in decoded
                for row in d.built(self.spec).rows
            }
        )
        refused: dict[date, str] = {}
        for month in sorted(months):
            try:
                await self.partitions.ensure_months(self.spec.table, {month})
            except OutsideRetentionWindow as exc:
                refused[month] = exc.message
        if not refused:
            return decoded
        kept: list[Decoded] = []
        for d in decoded:
            inside = d.emptied()
            for item in d.built(self.spec).pending():
                reason = refused.get(month_start(as_datetime(item.row[index])))
                if reason is None:
                    inside.add(item.row, item.index, item.context)
                else:
                    rejected.append(item.reject("outside_window", reason))
            kept.append(inside)
        return kept


def _fetch_drained_partitions_at_once(consumer: AIOKafkaConsumer) -> None:
    """Have aiokafka fetch a partition as soon as its records are consumed.

    aiokafka (0.14) sends no fetch to a broker while any partition it leads still
    has records fetched less than ``prefetch_backoff`` (0.1 s) ago, and the
    consumer doesn't take that option. A loader drains its partitions one after
    another, so the reader waited a whole fetch round trip each time its buffers
    ran dry, and the writer waited for the reader (measured with 0: no such wait;
    ``benchmarks/README.md``). Memory stays bounded: a partition with
    records not yet consumed is still not fetched again.
    """
    fetcher = getattr(consumer, "_fetcher", None)
    if fetcher is not None and hasattr(fetcher, "_prefetch_backoff"):
        fetcher._prefetch_backoff = 0.0
    else:
        log.warning("cannot tune aiokafka's prefetching: its internals changed")


async def _rollback(conn: asyncpg.Connection) -> None:
    """End a transaction begun by hand; a broken connection is the caller's retry to handle."""
    with contextlib.suppress(Exception):
        if not conn.is_closed() and conn.is_in_transaction():
            await conn.execute("ROLLBACK")
