"""Durable acceptance: a batch is the broker's or the spool's before the client hears 2xx."""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path

import structlog
from aiokafka import errors as kafka_errors

from ingest.collector.spool import Entry, Messages, Quarantine, Spool, SpoolFull, scan_segment
from ingest.core import metrics
from ingest.core.producer import EventProducer, ProduceFailed
from ingest.core.service import Service
from ingest.core.settings import Settings

log = structlog.get_logger(__name__)

# Produce errors that no retry can cure: the frame is quarantined and the drain
# goes on. Anything else (a broker unreachable, a timeout, a leader moving) is
# waited out, the frame retried. aiokafka has already retried what it deems
# retriable (an unknown topic or partition included) before one surfaces.
_PERMANENT: tuple[tuple[type[BaseException], str], ...] = (
    (kafka_errors.MessageSizeTooLargeError, "too_large"),
    (kafka_errors.RecordListTooLargeError, "too_large"),
    (kafka_errors.TopicAuthorizationFailedError, "unauthorized"),
    (kafka_errors.ClusterAuthorizationFailedError, "unauthorized"),
    (kafka_errors.UnknownTopicOrPartitionError, "unknown_topic"),
    (kafka_errors.InvalidTopicError, "unknown_topic"),
    (kafka_errors.CorruptRecordException, "corrupt"),
)
_BACKOFF_FIRST_S = 0.2
_BACKOFF_MAX_S = 5.0


def permanent_reason(exc: BaseException) -> str | None:
    """The quarantine reason when ``exc`` (or what caused it) is a permanent produce error."""
    seen: BaseException | None = exc
    while seen is not None:
        for kind, reason in _PERMANENT:
            if isinstance(seen, kind):
                return reason
        seen = seen.__cause__ or seen.__context__
    return None


class Unavailable(Exception):
    """Neither the broker nor the spool could take a batch: answer 503."""


class Delivery(Service):
    """Sends batches to Kafka, or to the spool when the broker is slow or down.

    While the spool holds anything, new batches go to the spool too, so a
    session's events reach Kafka in the order they were accepted; a drainer
    task sends the spool, oldest first, frame by frame, and deletes each
    segment once all of it is delivered or quarantined. A frame the broker
    refuses for good (too large, unauthorised, unknown topic, undecodable) is
    moved to ``<state>/spool/quarantine/`` (``eventpipe spool list|replay``)
    and the frames behind it go on. A batch that reaches Kafka late after it
    was spooled arrives twice; the loaders keep one row per event_id.

    On start, the spools of workers that no longer run (``w<i>`` directories
    whose lock nobody holds) are adopted and drained too, each in its own
    order and by its own task, so this worker's new batches never wait behind
    them.
    """

    def __init__(self, settings: Settings, producer: EventProducer, spool: Spool | None) -> None:
        self.settings = settings
        self.producer = producer
        self.spool = spool
        self.adopted: list[Spool] = []
        self._spool_lock = asyncio.Lock()
        self._wake = asyncio.Event()
        self._drainers: list[asyncio.Task[None]] = []
        # Bytes of each segment already delivered or quarantined in this run: a
        # retry after a transient error starts behind them. After a restart a
        # segment is sent from its start again; those duplicates are harmless,
        # the loaders keep one row per event_id.
        self._progress: dict[Path, int] = {}

    async def start(self) -> None:
        """Open the spool, adopt orphaned ones, and start draining what is there."""
        if self.spool is None:
            return
        self.spool.open()
        self.spool.adopt_orphans()
        self.adopted = self.spool.adopted()
        for adopted in self.adopted:
            adopted.open()
        self._gauge()
        for spool in [self.spool, *self.adopted]:
            self._drainers.append(
                asyncio.create_task(self._drain_forever(spool), name=f"spool-drainer-{spool.label}")
            )
        self._wake.set()

    async def stop(self) -> None:
        """Stop draining; what is spooled stays on disk for the next start."""
        for task in self._drainers:
            task.cancel()
        for task in self._drainers:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._drainers.clear()
        if self.spool is not None:
            self.spool.close()

    @property
    def spool_below_high_water(self) -> bool:
        """False when the spool is nearly full (/readyz then fails)."""
        if self.spool is None or self.spool.max_bytes == 0:
            return True
        return self.spool.bytes < self.settings.spool_high_water * self.spool.max_bytes

    async def deliver(self, stream: str, topic: str, messages: Messages) -> None:
        """Return once the batch is acknowledged by the broker or fsynced to the spool."""
        if self.spool is not None and not self.spool.empty:
            await self._to_spool(topic, messages)
            return
        started = time.perf_counter()
        try:
            # On a timeout the wait is cancelled, not the send: records already
            # handed to the producer may still reach Kafka, a harmless duplicate
            # of the spooled copy (the loaders keep one row per event).
            async with asyncio.timeout(self.settings.produce_timeout_s):
                await self.producer.send_batch(topic, messages)
        except Exception as exc:  # timeout, ProduceFailed, or a producer in trouble: spool
            error = str(exc) or type(exc).__name__
            log.warning("broker did not acknowledge, spooling", error=error, records=len(messages))
        else:
            metrics.PRODUCE_LATENCY.labels(stream).observe(time.perf_counter() - started)
            return
        if self.spool is None:
            raise Unavailable("the broker did not acknowledge and the spool is disabled")
        await self._to_spool(topic, messages)

    async def _to_spool(self, topic: str, messages: Messages) -> None:
        assert self.spool is not None
        async with self._spool_lock:
            try:
                await asyncio.to_thread(self.spool.append, topic, messages)
            except SpoolFull as exc:
                raise Unavailable(str(exc)) from exc
        self._gauge()
        self._wake.set()

    def _gauge(self) -> None:
        assert self.spool is not None
        spools = [self.spool, *self.adopted]
        metrics.SPOOL_BYTES.set(sum(s.bytes for s in spools))
        metrics.SPOOL_RECORDS.set(sum(s.frames for s in spools))
        for spool in spools:
            metrics.SPOOL_DIR_BYTES.labels(spool.label).set(spool.bytes)
            metrics.SPOOL_DIR_FRAMES.labels(spool.label).set(spool.frames)

    async def _drain_forever(self, spool: Spool) -> None:
        """Drain ``spool`` whenever it holds anything; never dies but by cancellation.

        An adopted spool is drained once, then its directory removed.
        """
        own = spool is self.spool
        delay = _BACKOFF_FIRST_S
        while True:
            try:
                if own:
                    await self._wake.wait()
                    self._wake.clear()
                while not spool.empty:
                    try:
                        await self._drain_segment(spool)
                        delay = _BACKOFF_FIRST_S
                    except (TimeoutError, ProduceFailed, kafka_errors.KafkaError) as exc:
                        log.info(
                            "spool drain waiting for the broker",
                            spool=spool.label,
                            error=str(exc) or type(exc).__name__,
                            retry_in=delay,
                        )
                        await asyncio.sleep(delay)
                        delay = min(delay * 2, _BACKOFF_MAX_S)
                if not own:
                    await self._retire(spool)
                    return
            except asyncio.CancelledError:
                raise
            except Exception:
                # A bug or the disk: say so, count it, and start over, so the
                # spool is never left behind without a drainer.
                metrics.SPOOL_DRAIN_ERRORS.inc()
                log.exception("spool drainer failed; restarting", spool=spool.label, retry_in=delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, _BACKOFF_MAX_S)
                if own:
                    self._wake.set()

    async def _retire(self, spool: Spool) -> None:
        """An adopted spool is drained: remove it and its metrics."""
        await asyncio.to_thread(spool.discard)
        self.adopted.remove(spool)
        with contextlib.suppress(KeyError):
            metrics.SPOOL_DIR_BYTES.remove(spool.label)
            metrics.SPOOL_DIR_FRAMES.remove(spool.label)
        self._gauge()
        log.info("adopted spool drained", spool=spool.label, origin=spool.origin)

    async def _drain_segment(self, spool: Spool) -> None:
        """Send the oldest segment frame by frame; delete it when every frame is delivered
        or quarantined. A transient error propagates, and the retry resumes at that frame."""
        async with self._spool_lock:
            segments = spool.segments()
            if not segments:
                spool.reset()
                self._gauge()
                return
            if spool is self.spool and len(segments) == 1:
                spool.seal()  # new batches start a new segment
        path = segments[0]
        entries = await asyncio.to_thread(scan_segment, path)
        done = self._progress.get(path, 0)
        for entry in entries:
            if entry.end <= done:
                continue
            if entry.frame is None:
                await self._quarantine(spool, entry, "corrupt", entry.error)
            else:
                try:
                    await asyncio.wait_for(
                        self.producer.send_batch(entry.frame.topic, entry.frame.messages),
                        timeout=max(self.settings.produce_timeout_s * 5, 10),
                    )
                except Exception as exc:
                    reason = permanent_reason(exc)
                    if reason is None:
                        raise
                    await self._quarantine(spool, entry, reason, str(exc) or type(exc).__name__)
            self._progress[path] = entry.end
        async with self._spool_lock:
            spool.remove(path, len(entries))
        self._progress.pop(path, None)
        self._gauge()
        log.info(
            "spool segment delivered", spool=spool.label, segment=path.name, batches=len(entries)
        )

    async def _quarantine(self, spool: Spool, entry: Entry, reason: str, error: str) -> None:
        """Set a frame aside for good (durably), count it, say why."""
        source = spool.origin or spool.directory.name
        kept = await asyncio.to_thread(
            Quarantine(spool.root).add, entry.raw, reason=reason, error=error, source=source
        )
        metrics.SPOOL_QUARANTINED.labels(reason).inc()
        log.error(
            "spooled batch quarantined: the broker refuses it for good",
            reason=reason,
            error=error,
            topic=kept.topic,
            records=kept.records,
            bytes=kept.bytes,
            file=kept.file,
            hint="fix the cause, then `eventpipe spool replay`",
        )
