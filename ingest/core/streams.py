"""The record contract: each stream defined once.

A stream is what one collector route accepts, one Kafka topic carries and one
loader COPYs into one partitioned table. Its definition here (name, the
``Settings`` field holding its topic, table, event-time column, and each
column with the kind of value it takes from a record) is the one the rest
derives from: ``Settings.topic_for``, the collector's stream names and its
records' time fields, the loaders' ``TableSpec`` and their checked decoder, the
CLI's ``--stream`` choices. What cannot be derived (the collector's pydantic
models, the loaders' msgspec structs, ``sql/migrations``) is checked against
it by ``tests/ingest/core/test_streams.py``.

A record's value is a JSON array of events (``ingest.core.records``); each
event is an object holding the stream's columns by name, plus ``context``
(session facts the collector knows from the request).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

# What a column takes from an event, and so how the loader checks it:
# "event_id" and "shop_id" a UUID string (a shop id canonical), "text" a
# string, "optional_text" a string or null, "json" any JSON value (null: SQL
# NULL), "json_object" a JSON object (null or missing: {}), "time" an ISO
# time with a zone.
Kind = Literal["event_id", "shop_id", "text", "optional_text", "json", "json_object", "time"]

_REQUIRED: frozenset[Kind] = frozenset({"event_id", "shop_id", "text", "time"})
_NULLABLE: frozenset[Kind] = frozenset({"optional_text", "json"})
_SQL_TYPES: dict[Kind, str] = {
    "event_id": "uuid",
    "shop_id": "uuid",
    "text": "text",
    "optional_text": "text",
    "json": "jsonb",
    "json_object": "jsonb",
    "time": "timestamp with time zone",
}

# Fields the collector sets on every event of a record, never the client.
SERVER_FIELDS = ("shop_id", "received_at")
# The field of an event holding its session facts (not a column).
CONTEXT = "context"
# Columns of every stream's table that PostgreSQL fills, never a record: the
# transaction that wrote the row (the rollups' watermark, migration 0014).
DATABASE_COLUMNS = ("load_xid",)


@dataclass(frozen=True, slots=True)
class Column:
    """One column of a stream's table, read from the event field of the same name."""

    name: str
    kind: Kind

    @property
    def required(self) -> bool:
        """Whether every event must carry it (the others may be missing)."""
        return self.kind in _REQUIRED

    @property
    def nullable(self) -> bool:
        """Whether the column may hold SQL NULL."""
        return self.kind in _NULLABLE

    @property
    def sql_type(self) -> str:
        """Its type as ``information_schema.columns.data_type`` names it."""
        return _SQL_TYPES[self.kind]


@dataclass(frozen=True)
class Stream:
    """One stream: its topic, its table, and how an event becomes a row of it."""

    name: str
    topic_setting: str  # the Settings field holding its Kafka topic
    table: str
    time_column: str  # the event time: the table is partitioned by month of it
    # The jsonb object column where the collector keeps the client's own time
    # (as ``client_<time_column>``) when it corrected or clamped it.
    extra_column: str
    columns: tuple[Column, ...]  # in the table's order, as rows carry them
    keeps_sessions: bool  # whether the loader folds its rows into user_sessions

    @property
    def column_names(self) -> tuple[str, ...]:
        """The columns' names, in order: what a COPY names."""
        return tuple(c.name for c in self.columns)

    @property
    def client_fields(self) -> tuple[str, ...]:
        """The fields a client may send (the rest the collector sets)."""
        return tuple(c.name for c in self.columns if c.name not in SERVER_FIELDS)

    @property
    def record_fields(self) -> tuple[str, ...]:
        """The fields of an event in a record: its columns and its ``context``."""
        return (*self.column_names, CONTEXT)

    @property
    def key(self) -> tuple[str, str, str]:
        """What makes an event one event: its shop, its id and its time.

        The table's primary key and the loaders' deduplication: an id is unique
        within its shop only (a client's own scheme, uuid5 of an order id), so
        two shops' events never count as one. The time is in it because a
        unique index of a partitioned table must hold the partition key.
        """
        return ("shop_id", "event_id", self.time_column)

    @property
    def original_time_key(self) -> str:
        """The key in ``extra_column`` holding a client's time the collector changed."""
        return f"client_{self.time_column}"


BEHAVIOR = Stream(
    name="behavior",
    topic_setting="topic_behavior",
    table="behavior_events",
    time_column="timestamp",
    extra_column="metadata",
    columns=(
        Column("event_id", "event_id"),
        Column("shop_id", "shop_id"),
        Column("session_id", "text"),
        Column("event_type", "text"),
        Column("element_path", "optional_text"),
        Column("element_type", "optional_text"),
        Column("element_text", "optional_text"),
        Column("coordinates", "json"),
        Column("viewport_size", "json"),
        Column("event_data", "json_object"),
        Column("timestamp", "time"),
        Column("page_url", "text"),
        Column("component_id", "optional_text"),
        Column("metadata", "json_object"),
        Column("received_at", "time"),
    ),
    keeps_sessions=True,
)
STOREFRONT = Stream(
    name="storefront",
    topic_setting="topic_storefront",
    table="events",
    time_column="ts",
    extra_column="props",
    columns=(
        Column("event_id", "event_id"),
        Column("shop_id", "shop_id"),
        Column("anon_id", "text"),
        Column("session_id", "text"),
        Column("event_type", "text"),
        Column("ts", "time"),
        Column("props", "json_object"),
        Column("product_id", "optional_text"),
        Column("experiment_id", "optional_text"),
        Column("variant", "optional_text"),
        Column("received_at", "time"),
        # Last: added by migration 0011 (ADD COLUMN appends). Segment's userId.
        Column("user_id", "optional_text"),
    ),
    keeps_sessions=False,
)
STREAMS: dict[str, Stream] = {stream.name: stream for stream in (BEHAVIOR, STOREFRONT)}
