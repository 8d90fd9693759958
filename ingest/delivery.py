"""Durable acceptance: a batch is the broker's or the spool's before the client hears 2xx."""

from __future__ import annotations

import asyncio
import contextlib
import time

import structlog

from ingest import metrics
from ingest.producer import EventProducer, ProduceFailed
from ingest.service import Service
from ingest.settings import Settings
from ingest.spool import Messages, Spool, SpoolFull, read_segment

log = structlog.get_logger(__name__)


class Unavailable(Exception):
    """Neither the broker nor the spool could take a batch: answer 503."""


class Delivery(Service):
    """Sends batches to Kafka, or to the spool when the broker is slow or down.

    While the spool holds anything, new batches go to the spool too, so a
    session's events reach Kafka in the order they were accepted; a drainer
    task sends the spool, oldest first, and deletes each segment once the
    broker has acknowledged all of it. A batch that reaches Kafka late after
    it was spooled arrives twice; the loaders keep one row per event_id.
    """

    def __init__(self, settings: Settings, producer: EventProducer, spool: Spool | None) -> None:
        self.settings = settings
        self.producer = producer
        self.spool = spool
        self._spool_lock = asyncio.Lock()
        self._wake = asyncio.Event()
        self._drainer: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Open the spool and start draining what a previous run left."""
        if self.spool is not None:
            self.spool.open()
            self._gauge()
            self._drainer = asyncio.create_task(self._drain_forever(), name="spool-drainer")
            self._wake.set()

    async def stop(self) -> None:
        """Stop draining; what is spooled stays on disk for the next start."""
        if self._drainer is not None:
            self._drainer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._drainer
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
        metrics.SPOOL_BYTES.set(self.spool.bytes)
        metrics.SPOOL_RECORDS.set(self.spool.frames)

    async def _drain_forever(self) -> None:
        assert self.spool is not None
        delay = 0.2
        while True:
            await self._wake.wait()
            self._wake.clear()
            while not self.spool.empty:
                try:
                    await self._drain_one()
                    delay = 0.2
                except (TimeoutError, ProduceFailed) as exc:
                    log.info("spool drain waiting for the broker", error=str(exc), retry_in=delay)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 5.0)

    async def _drain_one(self) -> None:
        """Send the oldest segment in order; delete it when all of it is acknowledged."""
        assert self.spool is not None
        async with self._spool_lock:
            segments = self.spool.segments()
            if len(segments) == 1:
                self.spool.seal()  # new batches start a new segment
        path = segments[0]
        frames = await asyncio.to_thread(read_segment, path)
        for frame in frames:
            await asyncio.wait_for(
                self.producer.send_batch(frame.topic, frame.messages),
                timeout=max(self.settings.produce_timeout_s * 5, 10),
            )
        async with self._spool_lock:
            self.spool.remove(path, len(frames))
        self._gauge()
        log.info("spool segment delivered", segment=path.name, batches=len(frames))
