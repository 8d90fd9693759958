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


def pack(key: bytes, events: Iterable[bytes]) -> list[tuple[bytes, bytes]]:
    """``(key, value)`` records holding the JSON-encoded ``events`` in order."""
    records: list[tuple[bytes, bytes]] = []
    chunk: list[bytes] = []
    size = 0
    for event in events:
        if chunk and size + len(event) > RECORD_BYTES:
            records.append((key, b"[" + b",".join(chunk) + b"]"))
            chunk, size = [], 0
        chunk.append(event)
        size += len(event) + 1
    if chunk:
        records.append((key, b"[" + b",".join(chunk) + b"]"))
    return records
