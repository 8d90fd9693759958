"""Kafka records to table rows: one spec per stream, and the checked decoders.

Each stream has two decoders. The fast one (``consumers.fast``: msgspec, into
typed structs) takes a well-formed record in one call; the checked one here
(orjson, then field by field, as the record contract ``ingest.core.streams``
says each column is read) runs only for a record the fast one refuses, and
gives each bad event its reason. It is the reference: both make the same rows
(``tests/consumers/test_rows.py``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from functools import cached_property
from typing import Any

import msgspec
import orjson
from asyncpg.pgproto.pgproto import UUID

from consumers import fast
from consumers.values import UUID_TEXT, Encoded, PgTime, Row, Rows, pg_time
from ingest.core import streams
from ingest.core.streams import Kind, Stream


class RecordRejected(Exception):
    """A record that can never become a row; it goes to dead letters with ``reason``."""

    def __init__(self, reason: str, error: str) -> None:
        super().__init__(f"{reason}: {error}")
        self.reason = reason
        self.error = error


def _time(value: Any) -> PgTime:
    if not isinstance(value, str):
        raise TypeError(f"expected an ISO time string, got {type(value).__name__}")
    parsed = datetime.fromisoformat(value)
    if parsed.tzinfo is None:
        raise ValueError(f"time {value!r} has no time zone")
    return pg_time(parsed)


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
    if not UUID_TEXT.fullmatch(canonical):
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


_CONVERTERS: dict[Kind, Callable[[Any], Any]] = {
    "event_id": _event_id,
    "shop_id": _uuid,
    "text": _required_text,
    "optional_text": _text,
    "json": _json,
    "json_object": _json_object,
    "time": _time,
}


def checked_decoder(stream: Stream) -> Callable[[dict[str, Any]], Row]:
    """The checked decoder of one event of ``stream``: its columns in order, each read
    as the contract's kind says (KeyError for a required field that is missing).

    Written out from the contract as one tuple expression, as ``dataclasses``
    writes ``__init__``: a loop over the columns cost a quarter more per row, and
    the naive loader of the benchmarks decodes with it.
    """
    names: dict[str, Any] = {}
    reads = []
    for i, column in enumerate(stream.columns):
        names[f"read{i}"] = _CONVERTERS[column.kind]
        value = f"d[{column.name!r}]" if column.required else f"get({column.name!r})"
        reads.append(f"read{i}({value})")
    source = f"def convert(d):\n    get = d.get\n    return ({', '.join(reads)},)\n"
    exec(compile(source, f"<checked decoder of {stream.name}>", "exec"), names)
    convert: Callable[[dict[str, Any]], Row] = names["convert"]
    return convert


@dataclass(frozen=True)
class TableSpec:
    """How one stream's records become rows of its partitioned table: the record
    contract's stream (``ingest.core.streams``) with its decoders."""

    contract: Stream
    event: type[msgspec.Struct]  # one event, as the fast decoder reads it
    fast: Callable[[list[Any]], Rows | None]  # its events to rows, None if one is bad
    # Its events straight to COPY data (and, for a table that keeps sessions, what
    # they tell of theirs), None if one is bad; ``copy_event``: one event as it reads it.
    fast_copy: Callable[[list[Any], bool], Encoded | None] | None = None
    copy_event: type[msgspec.Struct] | None = None
    # From the contract: plain attributes, read on the loader's paths.
    stream: str = field(init=False)
    table: str = field(init=False)
    time_column: str = field(init=False)
    columns: tuple[str, ...] = field(init=False)
    keeps_sessions: bool = field(init=False)  # whether the loader folds rows into user_sessions
    # Whether identify/alias/group records build identities (consumers.identities).
    keeps_identities: bool = field(init=False)
    convert: Callable[[dict[str, Any]], Row] = field(init=False)  # the checked decoder

    def __post_init__(self) -> None:
        contract = self.contract
        for name, value in (
            ("stream", contract.name),
            ("table", contract.table),
            ("time_column", contract.time_column),
            ("columns", contract.column_names),
            ("keeps_sessions", contract.keeps_sessions),
            ("keeps_identities", contract is streams.STOREFRONT),
            ("convert", checked_decoder(contract)),
        ):
            object.__setattr__(self, name, value)

    @cached_property
    def _decoder(self) -> msgspec.json.Decoder[Any]:
        return msgspec.json.Decoder(list[self.event] | self.event)  # type: ignore[name-defined]

    @cached_property
    def _copy_decoder(self) -> msgspec.json.Decoder[Any]:
        event = self.copy_event or self.event
        return msgspec.json.Decoder(list[event] | event)  # type: ignore[valid-type]

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
            data = self._copy_decoder.decode(raw)
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


BEHAVIOR = TableSpec(
    streams.BEHAVIOR,
    fast.BehaviorEvent,
    fast.behavior_fast,
    fast.behavior_copy,
    fast.BehaviorCopyEvent,
)
STOREFRONT = TableSpec(
    streams.STOREFRONT, fast.StorefrontEvent, fast.storefront_fast, fast.storefront_copy
)
SPECS: dict[str, TableSpec] = {spec.stream: spec for spec in (BEHAVIOR, STOREFRONT)}
