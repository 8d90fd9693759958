"""Kafka records to table rows: one spec per stream.

Each stream has two decoders. The fast one (msgspec, into typed structs)
takes a well-formed record in one call; the checked one (orjson, then field
by field) runs only for a record the fast one refuses, and gives each bad
event its reason. Both make the same rows (``tests/consumers/test_rows.py``).
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import cached_property
from typing import Annotated, Any

import asyncpg
import msgspec
import orjson
from asyncpg.pgproto.pgproto import UUID

from consumers import binary_copy


class RecordRejected(Exception):
    """A record that can never become a row; it goes to dead letters with ``reason``."""

    def __init__(self, reason: str, error: str) -> None:
        super().__init__(f"{reason}: {error}")
        self.reason = reason
        self.error = error


# Rows carry their times as PostgreSQL's own binary form, (microseconds since
# 2000-01-01 UTC,), for the connections that COPY them (``use_pg_times``):
# asyncpg's datetime encoder costs 1.3 us per value, more than the rest of a
# row together, and every row has two.
PgTime = tuple[int]
_PG_EPOCH = datetime(2000, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)


def pg_time(at: datetime) -> PgTime:
    """``at`` (time-zone aware) as a row carries it."""
    return ((at - _PG_EPOCH) // _MICROSECOND,)


def as_datetime(at: PgTime) -> datetime:
    """A row's time as a datetime (UTC)."""
    return _PG_EPOCH + at[0] * _MICROSECOND


async def use_pg_times(conn: asyncpg.Connection) -> None:
    """Make ``conn`` take and give timestamptz values as PgTime (until ``use_datetimes``)."""
    await conn.set_type_codec(
        "timestamptz", schema="pg_catalog", encoder=tuple, decoder=tuple, format="tuple"
    )


async def use_datetimes(conn: asyncpg.Connection) -> None:
    """Undo ``use_pg_times``: ``conn`` back to asyncpg's datetimes."""
    await conn.reset_type_codec("timestamptz", schema="pg_catalog")


@asynccontextmanager
async def pg_times(conn: asyncpg.Connection) -> AsyncIterator[asyncpg.Connection]:
    """``conn`` speaking PgTime for the block (``use_pg_times``), then datetimes again."""
    await use_pg_times(conn)
    try:
        yield conn
    finally:
        await use_datetimes(conn)


def _time(value: Any) -> PgTime:
    if not isinstance(value, str):
        raise TypeError(f"expected an ISO time string, got {type(value).__name__}")
    parsed = datetime.fromisoformat(value)
    if parsed.tzinfo is None:
        raise ValueError(f"time {value!r} has no time zone")
    return pg_time(parsed)


_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def _event_id(value: Any) -> UUID:
    # asyncpg's own UUID: parsed in C, and its COPY encoder copies the bytes
    # (a uuid.UUID goes through a Python property). It takes the hex digits
    # with or without hyphens, in either case.
    if not isinstance(value, str):
        raise TypeError(f"expected a UUID string, got {type(value).__name__}")
    return UUID(value)


def _uuid(value: Any) -> str:
    # A shop id stays a canonical string: rows of one session are grouped by it.
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
# A record's rows, with each row's session context when the table keeps sessions.
_Rows = tuple[list[Row], list[object]]


@dataclass(frozen=True, slots=True)
class Encoded:
    """A record's events as binary COPY tuples (``binary_copy``), without building rows."""

    data: bytes
    count: int  # events (rows)
    earliest: PgTime  # event times, for the partitions' months
    latest: PgTime
    batched: bool  # whether the record was an array of events


@dataclass(frozen=True)
class TableSpec:
    """How one stream's records become rows of its partitioned table."""

    stream: str
    table: str
    time_column: str
    columns: tuple[str, ...]
    convert: Callable[[dict[str, Any]], Row]  # the checked decoder of one event
    event: type[msgspec.Struct]  # one event, as the fast decoder reads it
    fast: Callable[[list[Any]], _Rows | None]  # its events to rows, None if one is bad
    # Its events straight to COPY data, None if one is bad; only for a table
    # without sessions (they need the rows).
    fast_copy: Callable[[list[Any], bool], Encoded | None] | None = None

    def __post_init__(self) -> None:
        if self.fast_copy is not None and self.keeps_sessions:
            raise ValueError(f"{self.stream}: user_sessions are built from rows, not COPY data")

    @cached_property
    def _decoder(self) -> msgspec.json.Decoder[Any]:
        return msgspec.json.Decoder(list[self.event] | self.event)  # type: ignore[name-defined]

    @property
    def keeps_sessions(self) -> bool:
        """Whether the loader folds this stream's rows into ``user_sessions``."""
        return self.stream == "behavior"

    @property
    def time_index(self) -> int:
        """Position of the event-time column in a row."""
        return self.columns.index(self.time_column)

    def decode(self, raw: bytes | None) -> tuple[list[Row], list[object], bool] | None:
        """The fast path: a record's rows, their session contexts (when the table keeps
        sessions) and whether it was a batch; None when the record or any of its events
        needs the checked path (``events`` and ``row``)."""
        if raw is None:
            return None
        try:
            data = self._decoder.decode(raw)
            batched = type(data) is list
            events = data if batched else [data]
            decoded = self.fast(events) if events else None
        except (msgspec.DecodeError, ValueError):
            return None
        return None if decoded is None else (*decoded, batched)

    def decode_copy(self, raw: bytes | None) -> Encoded | None:
        """The fastest path, for a table with ``fast_copy``: a record's rows as COPY
        data; None when the record needs ``decode`` (or the checked path).

        Takes the records ``decode`` takes (but for values of 4 KB or more),
        and its data loads as ``decode``'s rows do (``tests/consumers/test_rows.py``,
        ``test_binary_copy.py``).
        """
        if raw is None or self.fast_copy is None:
            return None
        try:
            data = self._decoder.decode(raw)
            batched = type(data) is list
            return self.fast_copy(data if batched else [data], batched) if data else None
        except (msgspec.DecodeError, ValueError, IndexError):
            return None

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
        _event_id(d["event_id"]),
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
        _event_id(d["event_id"]),
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


# The fast decoders: msgspec parses a well-formed record straight into typed
# structs in C (times included), and jsonb fields stay as their raw JSON text
# instead of being parsed and dumped again. A record they refuse in any way
# goes to the checked decoders above, which give each bad event its reason.

_is_uuid = _UUID.fullmatch
_Aware = Annotated[datetime, msgspec.Meta(tz=True)]


class _Shops:
    """Shop ids already checked: every event of a record carries the same one.
    Bounded: it starts over when full."""

    def __init__(self, limit: int = 4096) -> None:
        self.limit = limit
        self.seen: set[str] = set()

    def ok(self, value: str) -> bool:
        if value in self.seen:
            return True
        if not _is_uuid(value):
            return False
        if len(self.seen) >= self.limit:
            self.seen.clear()
        self.seen.add(value)
        return True


_shops = _Shops()


_NULL = msgspec.Raw(b"null")  # msgspec can't decode a Raw or None: a missing field is this


def _object_text(raw: msgspec.Raw) -> str:
    """A jsonb column that holds a JSON object: "{}" for null, "" (refused) for another value."""
    text = str(raw, "utf-8")
    if text[0] == "{":
        return text
    return "{}" if text == "null" else ""


def _object_json(raw: msgspec.Raw) -> bytes:
    """``_object_text`` as UTF-8 bytes, for COPY data."""
    data = bytes(raw)
    if data[0] == 0x7B:  # {
        return data
    return b"{}" if data == b"null" else b""


def _json_text(raw: msgspec.Raw) -> str | None:
    """A jsonb column of any JSON value; JSON null is SQL NULL."""
    text = str(raw, "utf-8")
    return None if text == "null" else text


class _BehaviorEvent(msgspec.Struct, kw_only=True, gc=False):
    event_id: str
    shop_id: str
    session_id: str
    event_type: str
    element_path: str | None = None
    element_type: str | None = None
    element_text: str | None = None
    coordinates: msgspec.Raw = _NULL
    viewport_size: msgspec.Raw = _NULL
    event_data: msgspec.Raw = _NULL
    timestamp: _Aware
    page_url: str
    component_id: str | None = None
    metadata: msgspec.Raw = _NULL
    received_at: _Aware
    context: Any = None


def _behavior_fast(events: list[_BehaviorEvent]) -> _Rows | None:
    rows: list[Row] = []
    received: tuple[datetime | None, PgTime] = (None, (0,))  # a request's: the same in each
    for e in events:
        if e.received_at != received[0]:
            received = (e.received_at, pg_time(e.received_at))
        data, meta = _object_text(e.event_data), _object_text(e.metadata)
        if not (_shops.ok(e.shop_id) and data and meta):
            return None
        rows.append(
            (
                UUID(e.event_id),  # ValueError: the checked decoder gives the reason
                e.shop_id,
                e.session_id,
                e.event_type,
                e.element_path,
                e.element_type,
                e.element_text,
                _json_text(e.coordinates),
                _json_text(e.viewport_size),
                data,
                pg_time(e.timestamp),
                e.page_url,
                e.component_id,
                meta,
                received[1],
            )
        )
    return rows, [e.context for e in events]


class _StorefrontEvent(msgspec.Struct, kw_only=True, gc=False):
    event_id: str
    shop_id: str
    anon_id: str
    session_id: str
    event_type: str
    ts: _Aware
    props: msgspec.Raw = _NULL
    product_id: str | None = None
    experiment_id: str | None = None
    variant: str | None = None
    received_at: _Aware


# The two loops share their shape on purpose: a per-stream row builder called
# from one loop would cost a Python call per row on the loader's hottest path.
def _storefront_fast(events: list[_StorefrontEvent]) -> _Rows | None:
    rows: list[Row] = []
    received: tuple[datetime | None, PgTime] = (None, (0,))  # a request's: the same in each
    for e in events:
        if e.received_at != received[0]:
            received = (e.received_at, pg_time(e.received_at))
        props = _object_text(e.props)
        if not (_shops.ok(e.shop_id) and props):
            return None
        rows.append(
            (
                UUID(e.event_id),  # ValueError: the checked decoder gives the reason
                e.shop_id,
                e.anon_id,
                e.session_id,
                e.event_type,
                pg_time(e.ts),
                props,
                e.product_id,
                e.experiment_id,
                e.variant,
                received[1],
            )
        )
    return rows, []


_STOREFRONT_FIELDS = binary_copy.field_count(11)
_COPY_NULL, _LENGTHS, _JSONB = binary_copy.NULL, binary_copy.LENGTHS, binary_copy.JSONB_VERSION
_UUID_LENGTH, _INT64_LENGTH = _LENGTHS[16], _LENGTHS[8]
_int64, _uuid_text = binary_copy.int64, binary_copy.uuid_text


def _storefront_copy(events: list[_StorefrontEvent], batched: bool) -> Encoded | None:
    # _storefront_fast's checks, each row encoded (binary_copy) instead of
    # built. Written out field by field, with what a request's events share
    # (shop, session, receive time) encoded once: this is the loader's hottest
    # loop, and a call per field cost as much again. IndexError (a value of
    # 4 KB or more, see LENGTHS) and UnicodeEncodeError send the record down
    # the path asyncpg encodes.
    out: list[bytes] = []
    times: list[int] = []
    received: datetime | None = None
    shop: str | None = None  # not "": that is a value (a refused one for a shop)
    session: str | None = None
    received_field = shop_field = session_field = b""
    for e in events:
        if e.received_at != received:
            received = e.received_at
            received_field = _INT64_LENGTH + _int64((received - _PG_EPOCH) // _MICROSECOND)
        if e.shop_id != shop:
            if not _shops.ok(e.shop_id):
                return None
            shop = e.shop_id
            shop_field = _uuid_text(shop)
        if e.session_id != session:
            session = e.session_id
            data = session.encode()
            session_field = _LENGTHS[len(data)] + data
        props = _object_json(e.props)
        if not props:
            return None
        ts = (e.ts - _PG_EPOCH) // _MICROSECOND
        times.append(ts)
        anon, kind = e.anon_id.encode(), e.event_type.encode()
        product, experiment, variant = e.product_id, e.experiment_id, e.variant
        null = _COPY_NULL
        out.append(
            b"".join(
                (
                    _STOREFRONT_FIELDS,
                    _UUID_LENGTH,
                    UUID(e.event_id).bytes,  # ValueError: the checked decoder says why
                    shop_field,
                    _LENGTHS[len(anon)],
                    anon,
                    session_field,
                    _LENGTHS[len(kind)],
                    kind,
                    _INT64_LENGTH,
                    _int64(ts),
                    _LENGTHS[len(props) + 1],
                    _JSONB,
                    props,
                    null if product is None else _LENGTHS[len(p := product.encode())] + p,
                    null if experiment is None else _LENGTHS[len(x := experiment.encode())] + x,
                    null if variant is None else _LENGTHS[len(v := variant.encode())] + v,
                    received_field,
                )
            )
        )
    return Encoded(b"".join(out), len(out), (min(times),), (max(times),), batched)


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
    _behavior_checked,
    _BehaviorEvent,
    _behavior_fast,
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
    _storefront_checked,
    _StorefrontEvent,
    _storefront_fast,
    _storefront_copy,
)
SPECS: dict[str, TableSpec] = {spec.stream: spec for spec in (BEHAVIOR, STOREFRONT)}
