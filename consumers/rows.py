"""Kafka records to table rows: one spec per stream, decoding with orjson."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import orjson


class RecordRejected(Exception):
    """A record that can never become a row; it goes to dead letters with ``reason``."""

    def __init__(self, reason: str, error: str) -> None:
        super().__init__(f"{reason}: {error}")
        self.reason = reason
        self.error = error


def _time(value: Any) -> datetime:
    if not isinstance(value, str):
        raise TypeError(f"expected an ISO time string, got {type(value).__name__}")
    parsed = datetime.fromisoformat(value)
    if parsed.tzinfo is None:
        raise ValueError(f"time {value!r} has no time zone")
    return parsed


_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def _uuid(value: Any) -> str:
    # Checked here, parsed by asyncpg's C encoder: uuid.UUID() would cost more
    # than the COPY of the row.
    if not isinstance(value, str):
        raise TypeError(f"expected a UUID string, got {type(value).__name__}")
    canonical = value.lower()
    if not _UUID.fullmatch(canonical):
        raise ValueError(f"{value!r} is not a canonical UUID")
    return canonical


def _text(value: Any) -> str | None:
    if value is None or isinstance(value, str):
        return value
    raise TypeError(f"expected text, got {type(value).__name__}")


def _required_text(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError(f"expected text, got {type(value).__name__}")
    return value


def _json(value: Any) -> str | None:
    return None if value is None else orjson.dumps(value).decode()


def _json_object(value: Any) -> str:
    if value is None:
        return "{}"
    if not isinstance(value, dict):
        raise TypeError(f"expected a JSON object, got {type(value).__name__}")
    return orjson.dumps(value).decode()


Row = tuple[Any, ...]


@dataclass(frozen=True)
class TableSpec:
    """How one stream's records become rows of its partitioned table."""

    stream: str
    table: str
    time_column: str
    columns: tuple[str, ...]
    convert: Callable[[dict[str, Any]], Row]

    @property
    def time_index(self) -> int:
        """Position of the event-time column in a row."""
        return self.columns.index(self.time_column)

    def decode(self, raw: bytes | None) -> tuple[Row, object]:
        """Bytes of a Kafka record to (row, context); RecordRejected when that can't be done."""
        if raw is None:
            raise RecordRejected("decode_error", "record has no value")
        try:
            data = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise RecordRejected("decode_error", str(exc)) from exc
        if not isinstance(data, dict):
            raise RecordRejected("invalid_record", "record is not a JSON object")
        try:
            return self.convert(data), data.get("context")
        except KeyError as exc:
            raise RecordRejected("invalid_record", f"missing field {exc}") from exc
        except (TypeError, ValueError) as exc:
            raise RecordRejected("invalid_record", str(exc)) from exc


def _behavior(d: dict[str, Any]) -> Row:
    return (
        _uuid(d["event_id"]),
        _uuid(d["shop_id"]),
        _required_text(d["session_id"]),
        _required_text(d["event_type"]),
        _text(d.get("element_path")),
        _text(d.get("element_type")),
        _text(d.get("element_text")),
        _json(d.get("coordinates")),
        _json(d.get("viewport_size")),
        _json_object(d.get("event_data")),
        _time(d["timestamp"]),
        _required_text(d["page_url"]),
        _text(d.get("component_id")),
        _json_object(d.get("metadata")),
        _time(d["received_at"]),
    )


def _storefront(d: dict[str, Any]) -> Row:
    return (
        _uuid(d["event_id"]),
        _uuid(d["shop_id"]),
        _required_text(d["anon_id"]),
        _required_text(d["session_id"]),
        _required_text(d["event_type"]),
        _time(d["ts"]),
        _json_object(d.get("props")),
        _text(d.get("product_id")),
        _text(d.get("experiment_id")),
        _text(d.get("variant")),
        _time(d["received_at"]),
    )


BEHAVIOR = TableSpec(
    "behavior",
    "behavior_events",
    "timestamp",
    (
        "event_id",
        "shop_id",
        "session_id",
        "event_type",
        "element_path",
        "element_type",
        "element_text",
        "coordinates",
        "viewport_size",
        "event_data",
        "timestamp",
        "page_url",
        "component_id",
        "metadata",
        "received_at",
    ),
    _behavior,
)
STOREFRONT = TableSpec(
    "storefront",
    "events",
    "ts",
    (
        "event_id",
        "shop_id",
        "anon_id",
        "session_id",
        "event_type",
        "ts",
        "props",
        "product_id",
        "experiment_id",
        "variant",
        "received_at",
    ),
    _storefront,
)
SPECS: dict[str, TableSpec] = {spec.stream: spec for spec in (BEHAVIOR, STOREFRONT)}
