"""The native routes' fast path: a batch of good events goes to Kafka as the client wrote it.

When every event of a native batch (``/v1/behavior``, ``/v1/storefront``) is one the
collector stores as it came (its id and time given, the time kept as it is, no bot
flag, no session fact to drop), each event's JSON goes into the Kafka record as the
client wrote it, with what the request shares (``shop_id``, ``received_at``,
``context``) encoded once and spliced in: no model, no dict and no re-encoding per
event. msgspec validates each event in C against structs that mirror the pydantic
models (``models.BehaviorEvent``, ``StorefrontEvent``, kept for the reasons of a
refusal and for the OpenAPI schema).

A batch it declines in any way takes the reference path (``app._whole_batch``, then
event by event, with reasons), which would store the same rows: the two are compared
on many hypothesis-made batches, through the loaders' decoders, by
``tests/ingest/collector/test_native_fast.py`` (as aiokafka keeps its C and Python
record code side by side). Where the rows may differ, the fast path stores a jsonb
number as the client wrote it (``1E2``, which the reference re-encodes as ``100.0``:
equal as jsonb, not as text).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated, Any
from uuid import UUID

import msgspec
import orjson

from ingest.collector.enrich import SESSION_FACTS, Received
from ingest.collector.models import BehaviorType, fast_time, has_nul
from ingest.core import streams
from ingest.core.records import RECORD_BYTES
from ingest.core.settings import Settings
from ingest.core.shops import Shop

_Short = Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
_Name = Annotated[str, msgspec.Meta(max_length=256)]
_Url = Annotated[str, msgspec.Meta(min_length=1, max_length=4096)]
_Text = Annotated[str, msgspec.Meta(max_length=4096)]


class _Behavior(msgspec.Struct, kw_only=True, forbid_unknown_fields=True, gc=False):
    """``models.BehaviorEvent`` as msgspec checks it (test_streams keeps the fields equal)."""

    # What msgspec reads as a UUID (hex digits in either case, with its hyphens or
    # none) pydantic, the loaders and PostgreSQL read as the same one; pydantic reads
    # braces and "urn:uuid:" too, which go the reference way.
    event_id: UUID | None = None
    event_type: BehaviorType
    session_id: _Short
    page_url: _Url
    timestamp: str | None = None
    element_path: _Text | None = None
    element_type: _Name | None = None
    element_text: _Text | None = None
    coordinates: dict[str, Any] | None = None
    viewport_size: dict[str, Any] | None = None
    event_data: dict[str, Any] = msgspec.field(default_factory=dict)
    component_id: _Name | None = None
    metadata: dict[str, Any] = msgspec.field(default_factory=dict)


class _Storefront(msgspec.Struct, kw_only=True, forbid_unknown_fields=True, gc=False):
    """``models.StorefrontEvent`` as msgspec checks it."""

    event_id: UUID | None = None
    event_type: _Short
    anon_id: _Short
    session_id: _Short
    ts: str | None = None
    props: dict[str, Any] = msgspec.field(default_factory=dict)
    product_id: _Name | None = None
    experiment_id: _Name | None = None
    variant: _Name | None = None
    user_id: _Name | None = None


class _Envelope(msgspec.Struct):
    """``models.BatchEnvelope``: its events kept as their JSON text (other keys ignored)."""

    events: list[msgspec.Raw]
    sent_at: str | None = None
    write_key: str | None = None


_ENVELOPE = msgspec.json.Decoder(_Envelope | list[msgspec.Raw])
# By stream of the record contract, as ``models.STREAM_MODELS``.
STRUCTS: dict[str, type[msgspec.Struct]] = {
    streams.BEHAVIOR.name: _Behavior,
    streams.STOREFRONT.name: _Storefront,
}
_EVENTS = {stream: msgspec.json.Decoder(struct) for stream, struct in STRUCTS.items()}
# A run of 19 digits may be an integer orjson cannot encode (past 64 bits), which the
# reference refuses: such a body goes its way. Digits become X in one C call.
_DIGIT_RUN = b"X" * 19
_DIGITS_X = bytes(0x58 if 0x30 <= b <= 0x39 else b for b in range(256))


@dataclass(frozen=True, slots=True)
class Batch:
    """A native batch msgspec validated whole: each event's JSON beside its struct."""

    stream: str
    body: bytes  # for the reference path, should ``records`` decline
    # Each event's JSON, its struct, and its time as pydantic reads it (None: none given).
    events: list[tuple[msgspec.Raw, Any, datetime | None]]
    sent_at: datetime | None
    write_key: str | None


def decode(stream: str, body: bytes, settings: Settings) -> Batch | None:
    """The batch of ``body`` when every event in it validates; None for the reference
    path. Taken, like ``app._whole_batch``, only when no event needs its own check:
    the body is no larger than ``max_event_bytes`` (so no event can be) and holds no
    NUL (which PostgreSQL refuses; msgspec refuses a lone surrogate itself)."""
    if len(body) > settings.max_event_bytes or has_nul(body):
        return None
    if _DIGIT_RUN in body.translate(_DIGITS_X):
        return None
    try:
        if not body.isascii():
            # msgspec checks the UTF-8 of the texts it decodes, not of the keys it skips
            # (the envelope's unknown ones): the reference refuses such a body.
            body.decode()
        envelope = _ENVELOPE.decode(body)
        if isinstance(envelope, list):
            raws, sent, key = envelope, None, None
        else:
            raws, sent, key = envelope.events, envelope.sent_at, envelope.write_key
        decoder = _EVENTS[stream]
        structs = [decoder.decode(raw) for raw in raws]
    except (msgspec.DecodeError, RecursionError, UnicodeDecodeError):
        # Invalid (a ValidationError is a DecodeError), nested deeper than msgspec goes,
        # or not UTF-8: the reference refuses it, with a 400 and its reason.
        return None
    time_field = streams.STREAMS[stream].time_column
    events: list[tuple[msgspec.Raw, Any, datetime | None]] = []
    for raw, event in zip(raws, structs, strict=True):
        text = getattr(event, time_field)
        time = None if text is None else fast_time(text)
        if time is None and text is not None:
            return None  # a text pydantic may read otherwise, or refuse
        events.append((raw, event, time))
    sent_at = None
    if sent is not None:
        sent_at = fast_time(sent)
        if sent_at is None:
            return None
        if sent_at.tzinfo is None:
            sent_at = sent_at.replace(tzinfo=UTC)  # as models.BatchEnvelope reads it
    return Batch(stream, body, events, sent_at, key)


def records(
    batch: Batch, shop: Shop, received: Received, max_record_bytes: int
) -> list[tuple[bytes, bytes]] | None:
    """The Kafka records of ``batch`` (one per session, as ``app._records`` makes them)
    when every event is stored as it came; None for the reference path: a clock the
    collector corrects, a bot it flags, an event without an id or a time (given one
    here), a time without a zone or too far ahead, an anonymous request's session
    facts, a Segment context to add the country to, a record too large."""
    if received.skew:
        return None
    view = received.of_shop(shop)
    if view.bot:
        return None
    stream = streams.STREAMS[batch.stream]
    behavior = stream is streams.BEHAVIOR
    head = b"".join(
        (
            b',"shop_id":"',
            str(shop.id).encode(),
            b'","received_at":',
            orjson.dumps(received.at),
            b',"' + streams.CONTEXT.encode() + b'":',
        )
    )
    tail = head + orjson.dumps(view.behavior_context if behavior else view.context) + b"}"
    geo = not behavior and view.context.get("country_code") is not None
    latest = received.latest
    sessions: dict[str, list[Any]] = {}
    for raw, event, time in batch.events:
        if event.event_id is None or time is None or time.tzinfo is None or time > latest:
            return None
        own = tail
        if behavior:
            metadata = event.metadata
            if metadata and not metadata.keys().isdisjoint(SESSION_FACTS):
                if view.anonymous:
                    return None  # the facts are dropped from its metadata: the reference's
                own = head + orjson.dumps(view.with_facts(metadata)) + b"}"
        elif geo and isinstance(event.props.get("$context"), dict):
            return None  # an SDK's context the country is added to
        parts = sessions.setdefault(event.session_id, [b"["])
        # The event's JSON but its closing brace, then the request's fields and it.
        parts += (memoryview(raw)[:-1], own, b",")
    messages: list[tuple[bytes, bytes]] = []
    for session, parts in sessions.items():
        key = f"{shop.id}:{session}".encode()
        parts[-1] = b"]"
        value = b"".join(parts)
        if len(value) > min(RECORD_BYTES, max_record_bytes - len(key)):
            return None
        messages.append((key, value))
    return messages
