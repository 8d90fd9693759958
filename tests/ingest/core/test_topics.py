"""Topic administration on the real broker: topics take every record the collector lets through."""

from __future__ import annotations

import uuid

from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

from ingest.core import records
from ingest.core.producer import EventProducer
from ingest.core.settings import Settings
from ingest.core.topics import ensure_topics


async def test_topics_are_created_with_a_max_message_bytes_from_max_record_bytes(
    settings: Settings,
) -> None:
    topic = f"sized.{uuid.uuid4().hex[:8]}"
    limit = records.topic_max_message_bytes(settings.max_record_bytes)
    await ensure_topics(settings.bootstrap, [topic], partitions=1, max_message_bytes=limit)
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.bootstrap)
    await admin.start()
    try:
        [response] = await admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, topic)])
    finally:
        await admin.close()
    [resource] = response.resources
    configs = {entry[0]: entry[1] for entry in resource[4]}
    assert configs["max.message.bytes"] == str(limit)
    assert limit > records.max_request_size(settings.max_record_bytes) > settings.max_record_bytes
    # The largest record the collector lets through is sendable as it is.
    key = b"k" * 40
    async with EventProducer(settings) as producer:
        await producer.send_batch(topic, [(key, b"v" * (settings.max_record_bytes - len(key)))])
