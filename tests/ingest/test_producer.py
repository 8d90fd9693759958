"""The collector's producer against the real broker: keys keep their partition."""

from __future__ import annotations

from aiokafka import AIOKafkaConsumer
from aiokafka.partitioner import DefaultPartitioner

from ingest.producer import EventProducer
from ingest.settings import Settings


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
