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
    def keeps_sessions(self) -> bool:
        """Whether the loader folds this stream's rows into ``user_sessions``."""
        return self.stream == "behavior"

    @property
    def time_index(self) -> int:
        """Position of the event-time column in a row."""
        return self.columns.index(self.time_column)

    def events(self, raw: bytes | None) -> tuple[list[Any], bool]:
        """A record's events, and whether it was a batch (a JSON array of events).

        The collector writes one record per request and session: an array of
        events. A record that is a single JSON object (a replayed dead letter,
        or another producer) is one event. RecordRejected when it is neither.
        """
        if raw is None:
            raise RecordRejected("decode_error", "record has no value")
        try:
            data = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise RecordRejected("decode_error", str(exc)) from exc
        if type(data) is list:
            if not data:
                raise RecordRejected("invalid_record", "record is an empty array of events")
            return data, True
        if isinstance(data, dict):
            return [data], False
        raise RecordRejected("invalid_record", "record is not a JSON object or array of them")

    def row(self, data: Any) -> tuple[Row, object]:
        """One event to (row, session context); RecordRejected when that can't be done."""
        if type(data) is not dict:
            raise RecordRejected("invalid_record", "event is not a JSON object")
        try:
            return self.convert(data), data.get("context")
        except KeyError as exc:
            raise RecordRejected("invalid_record", f"missing field {exc}") from exc
        except (TypeError, ValueError) as exc:
            raise RecordRejected("invalid_record", str(exc)) from exc

    def rows(self, raw: bytes | None) -> list[Row]:
        """Every row of a record (RecordRejected at the first bad event): for tools and tests."""
        return [self.row(data)[0] for data in self.events(raw)[0]]


def _behavior_checked(d: dict[str, Any]) -> Row:
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


def _storefront_checked(d: dict[str, Any]) -> Row:
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


# The fast paths below are hand-unrolled because decoding is the loader's
# hottest Python code (it must keep up with COPY). They accept only
# well-formed records; anything else goes through the *_checked converters,
# which return the same row or raise with a precise reason.

_is_uuid = _UUID.fullmatch
_from_iso = datetime.fromisoformat
_dumps = orjson.dumps
_NONE = type(None)


def _opt_text(value: Any) -> bool:
    return value is None or type(value) is str


class _Seen:
    """Values that repeat in every event of a record (a request's shop id and receive
    time), checked or parsed once; bounded: it starts over when full."""

    def __init__(self, limit: int = 4096) -> None:
        self.limit = limit
        self.shops: set[str] = set()
        self.times: dict[str, datetime] = {}

    def shop(self, value: Any) -> bool:
        if type(value) is not str:
            return False
        if value in self.shops:
            return True
        if not _is_uuid(value):
            return False
        if len(self.shops) >= self.limit:
            self.shops.clear()
        self.shops.add(value)
        return True

    def time(self, value: Any) -> datetime:
        parsed = self.times.get(value) if type(value) is str else None
        if parsed is None:
            parsed = _from_iso(value)
            if len(self.times) >= self.limit:
                self.times.clear()
            self.times[value] = parsed
        return parsed


_seen = _Seen()


def _behavior(d: dict[str, Any]) -> Row:
    try:
        event_id, shop_id, session_id = d["event_id"], d["shop_id"], d["session_id"]
        event_type, page_url = d["event_type"], d["page_url"]
        ts, received = _from_iso(d["timestamp"]), _seen.time(d["received_at"])
    except (KeyError, TypeError, ValueError):
        return _behavior_checked(d)
    get = d.get
    path, etype, etext, component = (
        get("element_path"),
        get("element_type"),
        get("element_text"),
        get("component_id"),
    )
    coords, viewport, data, meta = (
        get("coordinates"),
        get("viewport_size"),
        get("event_data"),
        get("metadata"),
    )
    if not (
        type(event_id) is str
        and _is_uuid(event_id)
        and _seen.shop(shop_id)
        and type(session_id) is str
        and type(event_type) is str
        and type(page_url) is str
        and _opt_text(path)
        and _opt_text(etype)
        and _opt_text(etext)
        and _opt_text(component)
        and type(data) in (dict, _NONE)
        and type(meta) in (dict, _NONE)
        and ts.tzinfo is not None
        and received.tzinfo is not None
    ):
        return _behavior_checked(d)
    return (
        event_id,
        shop_id,
        session_id,
        event_type,
        path,
        etype,
        etext,
        None if coords is None else _dumps(coords).decode(),
        None if viewport is None else _dumps(viewport).decode(),
        "{}" if data is None else _dumps(data).decode(),
        ts,
        page_url,
        component,
        "{}" if meta is None else _dumps(meta).decode(),
        received,
    )


def _storefront(d: dict[str, Any]) -> Row:
    try:
        event_id, shop_id, anon_id = d["event_id"], d["shop_id"], d["anon_id"]
        session_id, event_type = d["session_id"], d["event_type"]
        ts, received = _from_iso(d["ts"]), _seen.time(d["received_at"])
    except (KeyError, TypeError, ValueError):
        return _storefront_checked(d)
    get = d.get
    props, product, experiment, variant = (
        get("props"),
        get("product_id"),
        get("experiment_id"),
        get("variant"),
    )
    if not (
        type(event_id) is str
        and _is_uuid(event_id)
        and _seen.shop(shop_id)
        and type(anon_id) is str
        and type(session_id) is str
        and type(event_type) is str
        and _opt_text(product)
        and _opt_text(experiment)
        and _opt_text(variant)
        and type(props) in (dict, _NONE)
        and ts.tzinfo is not None
        and received.tzinfo is not None
    ):
        return _storefront_checked(d)
    return (
        event_id,
        shop_id,
        anon_id,
        session_id,
        event_type,
        ts,
        "{}" if props is None else _dumps(props).decode(),
        product,
        experiment,
        variant,
        received,
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
