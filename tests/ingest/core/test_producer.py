"""The collector's producer against the real broker: keys keep their partition, and a
broker that is down at start is connected to when it comes up."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer
from aiokafka.partitioner import DefaultPartitioner
from prometheus_client import REGISTRY

from ingest.core.errors import StartupError
from ingest.core.processes import free_port
from ingest.core.producer import EventProducer, ProduceFailed
from ingest.core.settings import Settings
from ingest.core.topics import ensure_topics
from ingest.stack.broker import EmbeddedBroker
from tests.conftest import wait_for


async def test_each_key_lands_in_the_default_partitioners_partition(settings: Settings) -> None:
    topic = settings.topic_behavior
    keys = {f"shop:session-{i}".encode() for i in range(40)}
    async with EventProducer(settings) as producer:
        await producer.send_batch(topic, [(b"warm-up", b"[]")])  # the topic's metadata is known
        # Twice: the second time every key's partition comes from the producer's cache.
        for _ in range(2):
            await producer.send_batch(topic, [(key, b"[]") for key in keys])
    consumer = AIOKafkaConsumer(
        topic, bootstrap_servers=settings.bootstrap, auto_offset_reset="earliest"
    )
    await consumer.start()
    landed: dict[bytes, list[int]] = {}
    try:
        for _ in range(40):
            for tp, records in (await consumer.getmany(timeout_ms=250)).items():
                for record in records:
                    if record.key in keys:
                        landed.setdefault(record.key, []).append(tp.partition)
            if sum(len(p) for p in landed.values()) == 2 * len(keys):
                break
    finally:
        await consumer.stop()
    every = list(range(settings.topic_partitions))
    partitioner = DefaultPartitioner()
    assert landed == {key: [partitioner(key, every, every)] * 2 for key in keys}
    assert len({p for ps in landed.values() for p in ps}) > 1  # the keys really spread


def _broker_up_gauge() -> float | None:
    return REGISTRY.get_sample_value("eventpipe_broker_up")


async def test_starts_without_a_broker_and_connects_when_it_appears(
    settings: Settings, tmp_path: Path
) -> None:
    """The collector's producer starts with nothing listening; sends fail at once (not after
    the request timeout) until the broker comes up on that port, then go through."""
    port = free_port()
    own = settings.model_copy(
        update={
            "kafka_bootstrap": f"127.0.0.1:{port}",
            "kafka_request_timeout_ms": 60_000,  # a send that waited would wait a minute
            "kafka_connect_backoff_max_s": 1.0,
        }
    )
    topic = own.topic_behavior
    async with EventProducer(own, connect_in_background=True) as producer:
        assert not await producer.ready()
        assert _broker_up_gauge() == 0
        async with asyncio.timeout(10):
            with pytest.raises(ProduceFailed, match="not connected"):
                await producer.send_batch(topic, [(b"k", b"[]")])
        async with EmbeddedBroker(tmp_path / "broker", port=port) as broker:
            await ensure_topics(broker.bootstrap, [topic], partitions=own.topic_partitions)
            await wait_for(producer.ready, timeout=30)
            assert _broker_up_gauge() == 1
            await producer.send_batch(topic, [(b"k", b"[]")])


async def test_without_background_connect_start_fails_clearly(settings: Settings) -> None:
    """CLI commands (dead-letter replay) keep a one-line error when the broker is down."""
    own = settings.model_copy(update={"kafka_bootstrap": f"127.0.0.1:{free_port()}"})
    with pytest.raises(StartupError, match="cannot connect a producer"):
        async with EventProducer(own):
            pass
