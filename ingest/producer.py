"""The Kafka producer of the collector: orjson-encoded events, keyed by session, acks=all."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import structlog
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError
from aiokafka.partitioner import DefaultPartitioner

from ingest.errors import StartupError
from ingest.service import Service
from ingest.settings import Settings

log = structlog.get_logger(__name__)

_PARTITION_CACHE_KEYS = 100_000  # keys remembered per topic (then the cache starts over)
_Layout = tuple[frozenset[int], frozenset[int]]  # a topic's partitions, and the available ones
_Keys = dict[bytes, int]  # key -> partition


class ProduceFailed(Exception):
    """The broker did not acknowledge a batch; nothing of it may be promised to the client."""


class EventProducer(Service):
    """An AIOKafkaProducer with explicit start/stop; ``send_batch`` waits for every ack.

    Idempotence is off on purpose: the embedded broker doesn't support it, and
    exactly-once is enforced downstream by event_id deduplication.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._producer: AIOKafkaProducer | None = None
        self._partitioner = DefaultPartitioner()
        # topic -> ((partitions, available), the same sorted as the partitioner
        # takes them, {key: partition})
        self._partition_cache: dict[str, tuple[_Layout, tuple[list[int], list[int]], _Keys]] = {}

    async def start(self) -> None:
        """Connect to the brokers."""
        self._producer = AIOKafkaProducer(
            bootstrap_servers=self.settings.bootstrap,
            acks="all",
            enable_idempotence=False,
            linger_ms=self.settings.kafka_linger_ms,
            compression_type=None
            if self.settings.kafka_compression == "none"
            else self.settings.kafka_compression,
            max_batch_size=256 * 1024,
            request_timeout_ms=self.settings.kafka_request_timeout_ms,
        )
        try:
            await self._producer.start()
        except KafkaError as exc:
            await self._producer.stop()
            self._producer = None
            raise StartupError(
                f"cannot connect a producer to Kafka at {self.settings.bootstrap}: {exc}",
                hint="check EVENTPIPE_KAFKA_BOOTSTRAP",
            ) from exc

    async def stop(self) -> None:
        """Flush what is buffered and disconnect."""
        if self._producer is not None:
            try:  # flushing to a broker that is down would wait out every timeout
                await asyncio.wait_for(self._producer.stop(), timeout=5)
            except TimeoutError:
                log.warning("producer stop timed out; unacknowledged batches are spooled")
            self._producer = None

    async def ready(self) -> bool:
        """True when the producer knows at least one live broker."""
        if self._producer is None:
            return False
        client = self._producer.client
        node = client.get_random_node()
        if node is None:
            return False
        try:
            return bool(await client.ready(node))
        except KafkaError:
            return False

    async def send_batch(self, topic: str, messages: Sequence[tuple[bytes, bytes]]) -> None:
        """Send ``(key, value)`` pairs; return once the broker has acknowledged all of them."""
        assert self._producer is not None, "EventProducer not started"
        try:
            partitions = self._partitions_by_key(topic, messages)
            futures = [
                await self._producer.send(
                    topic, value=value, key=key, partition=partitions.get(key)
                )
                for key, value in messages
            ]
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
