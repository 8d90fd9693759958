"""The fast (msgspec) and checked (orjson, field by field) decoders agree.

The fast decoder must give exactly the checked decoder's rows for a record
it takes, and must refuse (hand to the checked decoder) every record with an
event the checked decoder refuses, so that each bad event gets its reason.
The storefront's decoder straight to COPY data takes the same records.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from consumers.rows import (
    BEHAVIOR,
    SPECS,
    STOREFRONT,
    RecordRejected,
    TableSpec,
)
from consumers.values import Row, as_datetime, pg_time, pg_times
from ingest.core.db import Database
from tests.helpers import NOW, SHOP, behavior, storefront

EVENTS = {"behavior": behavior, "storefront": storefront}


def comparable(spec: TableSpec, rows: list[Row]) -> list[tuple[Any, ...]]:
    """Rows with their jsonb text parsed: the two decoders may space JSON differently."""
    jsonb = {"coordinates", "viewport_size", "event_data", "metadata", "props"}
    at = [i for i, c in enumerate(spec.columns) if c in jsonb]
    return [
        tuple(orjson.loads(v) if i in at and v is not None else v for i, v in enumerate(row))
        for row in rows
    ]


def checked(spec: TableSpec, raw: bytes) -> list[Row] | None:
    """The checked decoder's rows, None when it refuses any event."""
    try:
        return spec.rows(raw)
    except RecordRejected:
        return None


@pytest.mark.parametrize("stream", ["behavior", "storefront"])
def test_a_good_record_gives_the_checked_rows(stream: str) -> None:
    spec = SPECS[stream]
    raw = orjson.dumps([EVENTS[stream]() for _ in range(3)])
    decoded = spec.decode(raw)
    assert decoded is not None
    rows, contexts, batched = decoded
    assert batched and len(rows) == 3
    assert comparable(spec, rows) == comparable(spec, spec.rows(raw))
    assert contexts == ([e["context"] for e in orjson.loads(raw)] if spec.keeps_sessions else [])


def test_one_event_record_and_missing_optional_fields() -> None:
    event = storefront()
    for name in ("props", "product_id", "experiment_id", "variant"):
        del event[name]
    raw = orjson.dumps(event)  # a replayed dead letter: one object, not an array
    decoded = STOREFRONT.decode(raw)
    assert decoded is not None
    rows, _, batched = decoded
    assert not batched
    assert rows == STOREFRONT.rows(raw)
    assert rows[0][STOREFRONT.columns.index("props")] == "{}"


def test_json_null_is_sql_null_and_a_missing_object_is_empty() -> None:
    raw = orjson.dumps([behavior(coordinates=None, event_data=None, metadata=None)])
    decoded = BEHAVIOR.decode(raw)
    assert decoded is not None
    [row] = decoded[0]
    at = BEHAVIOR.columns.index
    jsonb = (row[at("coordinates")], row[at("event_data")], row[at("metadata")])
    assert jsonb == (None, "{}", "{}")
    assert decoded[0] == BEHAVIOR.rows(raw)


@pytest.mark.parametrize("stream", ["behavior", "storefront"])
def test_the_checked_decoder_needs_the_contracts_required_fields(stream: str) -> None:
    spec = SPECS[stream]
    for column in spec.contract.columns:
        event = EVENTS[stream]()
        del event[column.name]
        raw = orjson.dumps([event])
        if column.required:
            with pytest.raises(RecordRejected, match=f"missing field '{column.name}'"):
                spec.rows(raw)
        else:
            [row] = spec.rows(raw)
            assert row[spec.columns.index(column.name)] in (None, "{}")


BAD = {
    "missing id": {"event_id": None},
    "id not a uuid": {"event_id": "abc"},
    "shop not a uuid": {"shop_id": "shop"},
    "number as text": {"session_id": 5},
    "naive time": {"received_at": "2026-11-25T12:00:00"},
    "not a time": {"received_at": "yesterday"},
}


@pytest.mark.parametrize("stream", ["behavior", "storefront"])
@pytest.mark.parametrize("case", sorted(BAD))
def test_a_bad_event_sends_its_record_to_the_checked_decoder(stream: str, case: str) -> None:
    spec = SPECS[stream]
    bad = EVENTS[stream](**BAD[case])
    if bad["event_id"] is None:
        del bad["event_id"]
    raw = orjson.dumps([EVENTS[stream](), bad])
    assert spec.decode(raw) is None
    assert checked(spec, raw) is None


@pytest.mark.parametrize(
    ("stream", "fields"),
    [
        ("storefront", {"props": [1, 2]}),
        ("storefront", {"props": "text"}),
        ("behavior", {"event_data": 3}),
        ("behavior", {"metadata": []}),
    ],
)
def test_a_json_column_that_must_be_an_object(stream: str, fields: dict[str, Any]) -> None:
    spec = SPECS[stream]
    raw = orjson.dumps([EVENTS[stream](**fields)])
    assert spec.decode(raw) is None
    assert checked(spec, raw) is None


@pytest.mark.parametrize(
    "raw",
    [b"", b"not json", b"[]", b"[1, 2]", b'"text"', b'[{"event_id": "\xff"}]', b"[{}]"],
)
def test_records_that_are_not_events(raw: bytes) -> None:
    assert STOREFRONT.decode(raw) is None
    assert BEHAVIOR.decode(raw) is None
    assert STOREFRONT.decode(None) is None


@pytest.mark.parametrize(
    "fields",
    [
        # msgspec reads RFC 3339 only; Python's ISO parser also takes a time without seconds.
        {"ts": "2026-11-25T12:00+00:00"},
    ],
)
def test_what_only_the_checked_decoder_reads_still_loads(fields: dict[str, Any]) -> None:
    raw = orjson.dumps([storefront(**fields)])
    assert STOREFRONT.decode(raw) is None
    assert checked(STOREFRONT, raw) is not None


@pytest.mark.parametrize(
    "spelling", ["A0EEBC99-9C0B-4EF8-BB6D-6BB9BD380A11", "a0eebc999c0b4ef8bb6d6bb9bd380a11"]
)
def test_an_event_id_is_read_in_any_hex_spelling(spelling: str) -> None:
    raw = orjson.dumps([storefront(event_id=spelling)])
    decoded = STOREFRONT.decode(raw)
    assert decoded is not None
    assert decoded[0] == STOREFRONT.rows(raw)
    assert str(decoded[0][0][0]) == "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"


VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False),
    st.text(max_size=8),
    st.sampled_from([NOW, "2026-11-25T12:00:00", "2026-02-30T00:00:00Z", SHOP, SHOP.upper()]),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
    st.lists(st.integers(), max_size=2),
)


FIELDS = st.sampled_from(sorted(behavior() | storefront()))


# One or two fields changed at a time: more changes and nearly every event is bad.
@settings(max_examples=600, deadline=None)
@given(
    stream=st.sampled_from(["behavior", "storefront"]),
    changes=st.dictionaries(FIELDS, VALUES, max_size=2),
    dropped=st.sets(FIELDS, max_size=1),
)
def test_the_fast_decoder_never_takes_what_the_checked_one_refuses(
    stream: str, changes: dict[str, Any], dropped: set[str]
) -> None:
    spec = SPECS[stream]
    event = EVENTS[stream](**changes)
    for name in dropped:
        event.pop(name, None)
    try:
        raw = orjson.dumps([event])
    except orjson.JSONEncodeError:
        return  # an integer beyond 64 bits: the collector never writes one
    decoded = spec.decode(raw)
    expected = checked(spec, raw)
    if spec.fast_copy is not None:  # the same records straight to COPY data (test_binary_copy)
        encoded = spec.decode_copy(raw)
        assert (encoded is None) == (decoded is None), event
        assert encoded is None or decoded is None or encoded.count == len(decoded[0])
    if decoded is None:
        return  # the checked decoder decides, with reasons
    assert expected is not None, f"fast decoder took an event the checked one refuses: {event}"
    assert comparable(spec, decoded[0]) == comparable(spec, expected)


@given(st.datetimes(timezones=st.just(UTC)))
def test_a_row_time_is_postgres_microseconds_and_back(at: datetime) -> None:
    assert as_datetime(pg_time(at)) == at
    assert pg_time(datetime(2000, 1, 1, tzinfo=UTC)) == (0,)


async def test_a_pg_time_connection_copies_and_reads_exact_times(db: Database) -> None:
    times = [datetime(1999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC), datetime.now(UTC)]
    async with db.pool.acquire() as conn:
        async with pg_times(conn), conn.transaction():
            await conn.execute("CREATE TEMP TABLE times (at timestamptz) ON COMMIT DROP")
            await conn.copy_records_to_table("times", records=[(pg_time(t),) for t in times])
            read = [r["at"] for r in await conn.fetch("SELECT at FROM times")]
        assert read == [pg_time(t) for t in times]
        assert await conn.fetchval("SELECT $1::timestamptz", times[1]) == times[1]
