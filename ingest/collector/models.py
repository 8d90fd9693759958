"""What clients may send: pydantic models of batches and of each stream's events.

An event's fields are its stream's columns in the record contract
(``ingest.core.streams``) but those the collector sets (``SERVER_FIELDS``).
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Annotated, Any, Literal, TypeVar
from uuid import UUID

from pydantic import BaseModel, ConfigDict, Field, field_validator

from ingest.core import streams

BehaviorType = Literal[
    "click",
    "scroll",
    "hover",
    "rage_click",
    "hesitation",
    "form_start",
    "form_abandon",
    "form_submit",
    "error",
    "page_view",
    "time_on_element",
    "scroll_depth",
]

ShortText = Annotated[str, Field(min_length=1, max_length=256)]
Url = Annotated[str, Field(min_length=1, max_length=4096)]
Text = Annotated[str, Field(max_length=4096)]


# PostgreSQL text and jsonb cannot hold NUL, so it is refused at the door, not
# in the loader. Checked on an event's JSON text (one regex over bytes the
# collector encodes anyway) rather than field by field: an odd run of
# backslashes before "u0000" is an escaped NUL; an even one is a literal "\\u0000".
_NUL = re.compile(rb"(?<!\\)(?:\\\\)*\\u0000")


def has_nul(encoded: bytes) -> bool:
    """True when JSON text ``encoded`` (as orjson writes it) holds a NUL character."""
    # A NUL in JSON is an escape: without a backslash (a one-byte memchr, cheaper than
    # the five-byte search on bodies of kilobytes) there is none. The substring tests
    # are C-fast and almost always false; the regex runs rarely.
    return b"\\" in encoded and b"u0000" in encoded and _NUL.search(encoded) is not None


# The times the fast decoders parse themselves: RFC 3339 with a 'T', at most 6 digits
# of a second, a 'Z' or an offset in hours and minutes, or no zone (UTC): the shapes
# browsers and the SDKs send. Within them ``datetime.fromisoformat`` and pydantic agree
# (test_segment_fast, test_native_fast): fromisoformat checks the ranges as pydantic
# does (a month's days, no hour 24, no leap second) but for an offset's minutes, which
# it takes up to 99. pydantic reads more (a space for the 'T', unix seconds, a date
# alone): those go the reference way. A text's shape is its bytes with every ASCII
# digit a 0 (bytes.translate, a third of what a regular expression took).
_DIGITS = bytes.maketrans(b"123456789", b"000000000")
_TIME_SHAPES = frozenset(
    f"0000-00-00T00:00:00{fraction}{zone}".encode()
    for fraction in ("", *("." + "0" * digits for digits in range(1, 7)))
    for zone in ("", "Z", "+00:00", "-00:00")
)


def fast_time(value: str) -> datetime | None:
    """A client's time as pydantic's ``datetime`` reads it, for the fast decoders; None
    when its text is not one of the shapes they read (the reference path reads it)."""
    if value.encode().translate(_DIGITS) not in _TIME_SHAPES or (
        value[-6] in "+-" and value[-2] > "5"  # an offset's minutes past 59
    ):
        return None
    try:
        return datetime.fromisoformat(value)
    except ValueError:  # a day its month does not have
        return None


def _utc(value: datetime | None) -> datetime | None:
    if value is not None and value.tzinfo is None:
        return value.replace(tzinfo=UTC)  # a time without a zone is read as UTC
    return value


class _Event(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=False)

    event_id: UUID | None = None


class BehaviorEvent(_Event):
    """One browser interaction; fields named as the columns of ``behavior_events``."""

    event_type: BehaviorType
    session_id: ShortText
    page_url: Url
    timestamp: datetime | None = None  # without a zone: UTC (see enrich.Received.event_time)
    element_path: Text | None = None
    element_type: Annotated[str, Field(max_length=256)] | None = None
    element_text: Text | None = None
    coordinates: dict[str, Any] | None = None
    viewport_size: dict[str, Any] | None = None
    event_data: dict[str, Any] = Field(default_factory=dict)
    component_id: Annotated[str, Field(max_length=256)] | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)

    def event_time(self) -> datetime | None:
        """The client's event time, if it sent one."""
        return self.timestamp


class StorefrontEvent(_Event):
    """One storefront event; fields named as the columns of ``events``."""

    event_type: ShortText
    anon_id: ShortText
    session_id: ShortText
    ts: datetime | None = None
    props: dict[str, Any] = Field(default_factory=dict)
    product_id: Annotated[str, Field(max_length=256)] | None = None
    experiment_id: Annotated[str, Field(max_length=256)] | None = None
    variant: Annotated[str, Field(max_length=256)] | None = None
    user_id: Annotated[str, Field(max_length=256)] | None = None  # a known user's id

    def event_time(self) -> datetime | None:
        """The client's event time, if it sent one."""
        return self.ts


class BatchEnvelope(BaseModel):
    """A batch body: ``{"events": [...], "sent_at": ..., "write_key": ...}``.

    Events stay raw here; each is validated on its own so one bad event
    doesn't sink its batch.
    """

    model_config = ConfigDict(extra="ignore")

    events: list[Any]
    sent_at: datetime | None = None
    write_key: str | None = None

    _utc_sent = field_validator("sent_at")(classmethod(lambda cls, v: _utc(v)))


class BehaviorBatch(BatchEnvelope):
    """A batch of behavior events."""

    events: list[BehaviorEvent]


class StorefrontBatch(BatchEnvelope):
    """A batch of storefront events."""

    events: list[StorefrontEvent]


EventModel = TypeVar("EventModel", "BehaviorEvent", "StorefrontEvent")
# An event model's fields as a dict: every field, in the model's order, each already
# what validation would make of it (``trusted``'s contract). A tracker protocol's fast
# path hands these to ``app._records`` in place of a model (which would only be copied
# back into a dict); which model's fields they are is the stream they are delivered to.
EventFields = dict[str, Any]
# The slots of a pydantic model instance, set as its ``model_construct`` sets them
# (pydantic's internals: should a release hold a model's state otherwise, the tests
# comparing ``trusted`` with ``model_validate`` fail).
_SET_DICT = BaseModel.__dict__["__dict__"].__set__
_SET_FIELDS_SET = BaseModel.__dict__["__pydantic_fields_set__"].__set__
_SET_EXTRA = BaseModel.__dict__["__pydantic_extra__"].__set__
_SET_PRIVATE = BaseModel.__dict__["__pydantic_private__"].__set__


def trusted(model: type[EventModel], fields: dict[str, Any], given: frozenset[str]) -> EventModel:
    """The ``model`` holding ``fields`` without validating them: for a tracker
    protocol's fast path, whose values are ones the model always accepts.

    ``fields`` holds every field of the model, in its order, each already what
    validation would make of it (the caller's contract: its fast/reference tests
    compare the result with ``model_validate``'s); ``given`` is what
    ``model_validate`` would record as set. What pydantic's ``model_construct`` ends
    with, without its per-field Python loop, which costs more than a validation.
    """
    event = object.__new__(model)
    _SET_DICT(event, fields)
    _SET_FIELDS_SET(event, set(given))
    _SET_EXTRA(event, None)
    _SET_PRIVATE(event, None)
    return event


# What a tracker protocol maps one of its events to: a model, or (from a fast path) a
# behavior event's fields.
MappedEvent = BehaviorEvent | StorefrontEvent | EventFields


def is_behavior(event: MappedEvent) -> bool:
    """Whether a mapped event goes to the behavior stream (a fast path's fields are a
    behavior event's: storefront ones are models)."""
    return type(event) is dict or isinstance(event, BehaviorEvent)


# By stream of the record contract; each model's fields are the stream's client
# fields (tests/ingest/core/test_streams.py).
STREAM_MODELS: dict[str, type[BehaviorEvent] | type[StorefrontEvent]] = {
    streams.BEHAVIOR.name: BehaviorEvent,
    streams.STOREFRONT.name: StorefrontEvent,
}
BATCH_MODELS: dict[str, type[BehaviorBatch] | type[StorefrontBatch]] = {
    streams.BEHAVIOR.name: BehaviorBatch,
    streams.STOREFRONT.name: StorefrontBatch,
}
