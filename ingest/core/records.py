"""The Kafka record format the collector writes and the loaders read.

A record's key is ``<shop_id>:<session_id>``, so one session's events stay in
one partition, in order. Its value is a JSON array of enriched events: one
record per request and session (cut where it would pass ``RECORD_BYTES``),
because per-record costs (the producer's futures, the broker's bookkeeping,
the consumer's record objects) dominate when every event is its own record.
A loader also accepts a value that is a single JSON object: one event.
"""

from __future__ import annotations

from collections.abc import Iterable

RECORD_BYTES = 256 * 1024
# What a record costs beyond its key and value in a Kafka record batch (the
# batch header, the record's varints, attributes and headers), generously.
RECORD_OVERHEAD = 1024


def max_request_size(max_record_bytes: int) -> int:
    """The producer's ``max_request_size`` for records up to ``max_record_bytes``.

    aiokafka checks each record's estimated batch size against it, so every
    record the collector let through is sendable, and no larger one is.
    """
    return max_record_bytes + RECORD_OVERHEAD


def topic_max_message_bytes(max_record_bytes: int) -> int:
    """A topic's ``max.message.bytes`` for records up to ``max_record_bytes``.

    The broker checks a record batch as it arrives, compressed: a quarter more
    than the record leaves room for a compressor's worst case on bytes that
    don't compress (snappy's bound is n + n/6) and for the batch's overhead.
    """
    return max_record_bytes + max_record_bytes // 4 + RECORD_OVERHEAD


def pack(
    key: bytes, events: Iterable[bytes], limit: int = RECORD_BYTES
) -> list[tuple[bytes, bytes]]:
    """``(key, value)`` records holding the JSON-encoded ``events`` in order, each value
    cut before it passes ``limit`` bytes (an event larger than that is a record alone)."""
    records: list[tuple[bytes, bytes]] = []
    chunk: list[bytes] = []
    size = 0
    for event in events:
        if chunk and size + len(event) > limit:
            records.append((key, b"[" + b",".join(chunk) + b"]"))
            chunk, size = [], 0
        chunk.append(event)
        size += len(event) + 1
    if chunk:
        records.append((key, b"[" + b",".join(chunk) + b"]"))
    return records
