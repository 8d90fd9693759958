"""The Kafka producer of the collector: orjson-encoded events, keyed by session, acks=all."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence

import structlog
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError
from aiokafka.partitioner import DefaultPartitioner
from aiokafka.protocol.admin import ApiVersionRequest

from ingest.core import metrics, records
from ingest.core.errors import StartupError
from ingest.core.service import Service
from ingest.core.settings import Settings

log = structlog.get_logger(__name__)

_PARTITION_CACHE_KEYS = 100_000  # keys remembered per topic (then the cache starts over)
_Layout = tuple[frozenset[int], frozenset[int]]  # a topic's partitions, and the available ones
_Keys = dict[bytes, int]  # key -> partition
_BACKOFF_FIRST_S = 0.5  # first wait between connection attempts; doubles up to the setting
_FIRST_ATTEMPT_WAIT_S = 5.0  # how long a background-connecting start waits for attempt one
_HEALTH_CHECK_INTERVAL_S = 5.0  # broker round trips between /readyz probes (for the gauge)
_CHECK_TIMEOUT_S = 1.0  # a broker slower than this to answer a tiny request counts as down


class ProduceFailed(Exception):
    """The broker did not acknowledge a batch; nothing of it may be promised to the client."""


class EventProducer(Service):
    """An AIOKafkaProducer with explicit start/stop; ``send_batch`` waits for every ack.

    Idempotence is off on purpose: the embedded broker doesn't support it, and
    exactly-once is enforced downstream by event_id deduplication.
    """

    def __init__(self, settings: Settings, *, connect_in_background: bool = False) -> None:
        self.settings = settings
        self.connect_in_background = connect_in_background
        self._producer: AIOKafkaProducer | None = None  # set once connected
        self._keeper: asyncio.Task[None] | None = None
        self._partitioner = DefaultPartitioner()
        # topic -> ((partitions, available), the same sorted as the partitioner
        # takes them, {key: partition})
        self._partition_cache: dict[str, tuple[_Layout, tuple[list[int], list[int]], _Keys]] = {}

    def _new_producer(self) -> AIOKafkaProducer:
        """An unstarted aiokafka producer (one per connection attempt: a failed start
        leaves an AIOKafkaProducer that cannot be started again)."""
        return AIOKafkaProducer(
            bootstrap_servers=self.settings.bootstrap,
            acks="all",
            enable_idempotence=False,
            linger_ms=self.settings.kafka_linger_ms,
            compression_type=None
            if self.settings.kafka_compression == "none"
            else self.settings.kafka_compression,
            max_batch_size=256 * 1024,
            max_request_size=records.max_request_size(self.settings.max_record_bytes),
            request_timeout_ms=self.settings.kafka_request_timeout_ms,
        )

    async def _connect(self) -> None:
        """One attempt to reach the brokers; raises what aiokafka raised."""
        producer = self._new_producer()
        try:
            await producer.start()
        except BaseException:
            with contextlib.suppress(Exception):
                await producer.stop()
            raise
        self._producer = producer
        self._set_broker_up(True)
        log.info("producer connected", bootstrap=self.settings.bootstrap)

    async def start(self) -> None:
        """Connect to the brokers.

        Without ``connect_in_background`` a broker that can't be reached is a
        StartupError. With it, start returns anyway (after one attempt) and a
        background task keeps trying with backoff; meanwhile ``send_batch``
        fails at once, so the collector spools and still answers 2xx.
        """
        if not self.connect_in_background:
            try:
                await self._connect()
            except KafkaError as exc:
                raise StartupError(
                    f"cannot connect a producer to Kafka at {self.settings.bootstrap}: {exc}",
                    hint="check EVENTPIPE_KAFKA_BOOTSTRAP",
                ) from exc
            return
        self._set_broker_up(False)
        first_attempt = asyncio.Event()
        self._keeper = asyncio.create_task(self._keep_connected(first_attempt), name="producer")
        # A reachable broker gets the moment it needs, so a healthy start sends the
        # first batches to Kafka rather than to the spool; an unreachable one (or a
        # black-holed address) doesn't hold the HTTP server back for long.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(first_attempt.wait(), _FIRST_ATTEMPT_WAIT_S)

    async def _keep_connected(self, first_attempt: asyncio.Event) -> None:
        """Connect with capped exponential backoff, then check the broker periodically."""
        delay = _BACKOFF_FIRST_S
        while True:
            if self._producer is None:
                try:
                    await self._connect()
                except Exception as exc:  # KafkaError mostly; anything else must not kill us
                    self._set_broker_up(False)
                    # One line per attempt: the wait doubles, so a long outage logs
                    # a few lines a minute, not a flood.
                    log.warning(
                        "broker unreachable; spooling and retrying",
                        bootstrap=self.settings.bootstrap,
                        error=str(exc) or type(exc).__name__,
                        retry_in=delay,
                    )
                    first_attempt.set()
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, self.settings.kafka_connect_backoff_max_s)
                    continue
                first_attempt.set()
                delay = _BACKOFF_FIRST_S
            await asyncio.sleep(_HEALTH_CHECK_INTERVAL_S)
            await self.ready()  # keeps eventpipe_broker_up current between /readyz probes

    def _set_broker_up(self, up: bool) -> None:
        metrics.BROKER_UP.set(1 if up else 0)

    async def stop(self) -> None:
        """Stop connecting, flush what is buffered and disconnect."""
        if self._keeper is not None:
            self._keeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._keeper
            self._keeper = None
        if self._producer is not None:
            try:  # flushing to a broker that is down would wait out every timeout
                await asyncio.wait_for(self._producer.stop(), timeout=5)
            except TimeoutError:
                log.warning("producer stop timed out; unacknowledged batches are spooled")
            self._producer = None

    async def ready(self) -> bool:
        """True when a broker answers a request now (within ~1 s); sets eventpipe_broker_up.

        A round trip, not just an open connection: a hung broker (SIGSTOPped,
        or its disk stalled) keeps its TCP connections open.
        """
        up = await self._answers()
        self._set_broker_up(up)
        return up

    async def _answers(self) -> bool:
        if self._producer is None:
            return False
        client = self._producer.client
        node = client.get_random_node()
        if node is None:
            return False
        try:
            await asyncio.wait_for(client.send(node, ApiVersionRequest()), _CHECK_TIMEOUT_S)
        except (TimeoutError, KafkaError, OSError):
            return False
        return True

    async def send_batch(self, topic: str, messages: Sequence[tuple[bytes, bytes]]) -> None:
        """Send ``(key, value)`` pairs; return once the broker has acknowledged all of them."""
        if self._producer is None:
            # Fail at once rather than after the produce timeout: the batch goes to the
            # spool while the background task is still connecting.
            raise ProduceFailed("not connected to the broker (yet)")
        try:
            partitions = self._partitions_by_key(topic, messages)
            futures = [
                await self._producer.send(
                    topic, value=value, key=key, partition=partitions.get(key)
                )
                for key, value in messages
            ]
            if len(futures) == 1:  # a beacon's one session: gather would cost 30 times more
                await futures[0]
            else:
                await asyncio.gather(*futures)
        except KafkaError as exc:
            raise ProduceFailed(str(exc)) from exc

    def _partitions_by_key(
        self, topic: str, messages: Sequence[tuple[bytes, bytes]]
    ) -> dict[bytes, int]:
        """A key -> partition map covering every key of ``messages`` (the same murmur2 as
        aiokafka's and Java's default partitioner); empty until the topic's metadata is
        known, and then aiokafka partitions each message itself.

        aiokafka's murmur2 is pure Python, and a session sends many requests with
        one key: partitions are remembered per key while the topic's partitions
        stay the same.
        """
        assert self._producer is not None
        cluster = self._producer.client.cluster
        every = cluster.partitions_for_topic(topic)
        if not every:
            return {}
        layout = (
            frozenset(every),
            frozenset(cluster.available_partitions_for_topic(topic) or every),
        )
        cached = self._partition_cache.get(topic)
        if cached is None or cached[0] != layout or len(cached[2]) > _PARTITION_CACHE_KEYS:
            ordered = (sorted(layout[0]), sorted(layout[1]))
            cached = self._partition_cache[topic] = (layout, ordered, {})
        _, (every_sorted, available_sorted), known = cached
        for key, _ in messages:
            if key not in known:
                known[key] = self._partitioner(key, every_sorted, available_sorted)
        return known
