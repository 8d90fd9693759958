"""Kafka topic administration: reachability and idempotent topic creation."""

from __future__ import annotations

import asyncio
import contextlib

import structlog
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError

from ingest.core.errors import StartupError

log = structlog.get_logger(__name__)

_TOPIC_ALREADY_EXISTS = 36


async def broker_reachable(bootstrap: str, timeout: float = 5.0) -> bool:
    """True when a metadata request to ``bootstrap`` succeeds within ``timeout``."""
    host, _, port = bootstrap.split(",")[0].rpartition(":")
    try:  # a plain connect first, so a closed port doesn't make aiokafka log errors
        _, writer = await asyncio.wait_for(asyncio.open_connection(host, int(port)), timeout)
        writer.close()
    except (TimeoutError, OSError, ValueError):
        return False
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=int(timeout * 1000))
    try:
        await asyncio.wait_for(admin.start(), timeout)
        await asyncio.wait_for(admin.list_topics(), timeout)
        return True
    except (TimeoutError, KafkaError, OSError):
        return False
    finally:
        with contextlib.suppress(Exception):
            await admin.close()


async def cluster_id(bootstrap: str) -> str:
    """The cluster id the brokers report: it changes when an embedded broker restarts."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=10_000)
    try:
        await admin.start()
        return str((await admin.describe_cluster()).get("cluster_id") or "")
    finally:
        with contextlib.suppress(Exception):
            await admin.close()


async def ensure_topics(
    bootstrap: str,
    topics: list[str],
    *,
    partitions: int,
    replication: int = 1,
    max_message_bytes: int | None = None,
) -> None:
    """Create each missing topic; existing ones are left as they are.

    ``max_message_bytes`` sets the topics' ``max.message.bytes`` (see
    ``records.topic_max_message_bytes``) so the broker takes every record the
    collector lets through; an existing topic keeps its own (deploy/README.md).
    """
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=10_000)
    try:
        await admin.start()
        configs = {} if max_message_bytes is None else {"max.message.bytes": str(max_message_bytes)}
        existing = set(await admin.list_topics())
        missing = [t for t in topics if t not in existing]
        if missing:
            response = await admin.create_topics(
                [NewTopic(t, partitions, replication, topic_configs=configs) for t in missing]
            )
            for topic, code, message in response.topic_errors:
                if code not in (0, _TOPIC_ALREADY_EXISTS):
                    raise StartupError(
                        f"cannot create Kafka topic {topic}: error {code} {message}",
                        hint="create it by hand or check the broker's permissions",
                    )
            log.info("topics created", topics=missing, partitions=partitions)
    except KafkaError as exc:
        raise StartupError(
            f"cannot reach Kafka at {bootstrap}: {exc}", hint="check EVENTPIPE_KAFKA_BOOTSTRAP"
        ) from exc
    finally:
        with contextlib.suppress(Exception):
            await admin.close()
