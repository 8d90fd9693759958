"""COPY data encoded by the loader loads exactly as asyncpg's COPY of the same rows,
and the sessions it gathers on the way are those the rows give.

Checked on the real PostgreSQL: both go into copies of ``events`` (or
``behavior_events``) and are read back; any difference in the hand-written
format shows as a refused COPY or a different row.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from consumers import binary_copy, sessions
from consumers.rows import BEHAVIOR, STOREFRONT, TableSpec
from consumers.values import Encoded, pg_times
from ingest.core.db import Database
from tests.helpers import behavior, storefront


def same_sessions(spec: TableSpec, encoded: Encoded, raw: bytes) -> None:
    """The sessions ``encoded`` gathered are those its rows give (``user_sessions``)."""
    decoded = spec.decode(raw)
    assert decoded is not None
    rows, contexts, _ = decoded
    if not spec.keeps_sessions:
        assert encoded.sessions == ()
        return
    assert sessions.aggregate([], [], encoded.sessions) == sessions.aggregate(rows, contexts)
    # Folding the parts leaves them as they were: a batch written again folds them again.
    assert sessions.aggregate([], [], encoded.sessions) == sessions.aggregate(rows, contexts)


async def loaded(
    conn: asyncpg.Connection, encoded: Encoded, raw: bytes, spec: TableSpec = STOREFRONT
) -> None:
    """Load ``encoded`` into ``mine`` and asyncpg's COPY of ``raw``'s rows into ``theirs``;
    assert the two tables hold the same rows."""
    decoded = spec.decode(raw)
    assert decoded is not None
    rows, _, batched = decoded
    assert (encoded.count, encoded.batched) == (len(rows), batched)
    times = [row[spec.time_index] for row in rows]
    assert (encoded.earliest, encoded.latest) == (min(times), max(times))
    same_sessions(spec, encoded, raw)
    async with conn.transaction():
        for table in ("mine", "theirs"):
            await conn.execute(f"CREATE TEMP TABLE {table} (LIKE {spec.table}) ON COMMIT DROP")
        await conn.copy_to_table(
            "mine",
            source=binary_copy.stream([encoded.data]),
            columns=spec.columns,
            format="binary",
        )
        async with pg_times(conn):
            await conn.copy_records_to_table("theirs", records=rows, columns=spec.columns)
        order = f"ORDER BY event_id, {spec.time_column}"
        mine = await conn.fetch(f"SELECT * FROM mine {order}")
        theirs = await conn.fetch(f"SELECT * FROM theirs {order}")
    assert mine == theirs
    assert len(mine) == len(rows)


def encode(
    events: list[dict[str, Any]] | dict[str, Any], spec: TableSpec = STOREFRONT
) -> tuple[Encoded, bytes]:
    raw = orjson.dumps(events)
    encoded = spec.decode_copy(raw)
    assert encoded is not None
    return encoded, raw


LATER = (datetime.now(UTC) + timedelta(minutes=5)).isoformat()


@pytest.mark.parametrize(
    "events",
    [
        [storefront() for _ in range(3)],
        storefront(),  # a record that is one event, not an array
        [
            storefront(product_id=None, props=None, anon_id="", variant="b", experiment_id="e1"),
            storefront(session_id="other", received_at=LATER, ts=LATER),
            storefront(anon_id="änon-☃-🛒", event_type="ünïcode", props={"k": "\\\"'\t\n"}),
            storefront(product_id="p" * 4095, props={"v": [1.5, None, True]}),
            storefront(ts="1970-01-01T00:00:00+00:00", received_at="2999-12-31T23:59:59.999999Z"),
            storefront(ts="2026-11-25T12:00:00.5-08:00"),
        ],
    ],
    ids=["array", "object", "varied"],
)
async def test_encoded_records_load_as_asyncpgs_copy_of_their_rows(
    db: Database, events: list[dict[str, Any]] | dict[str, Any]
) -> None:
    async with db.pool.acquire() as conn:
        await loaded(conn, *encode(events))


def _at(minute: int) -> str:
    return datetime(2026, 11, 25, 12, minute, tzinfo=UTC).isoformat()


MOBILE = {"user_agent": "Mozilla/5.0 (iPhone)", "device_type": "mobile", "country_code": "de"}


@pytest.mark.parametrize(
    "events",
    [
        [behavior() for _ in range(3)],
        behavior(),  # a record that is one event, not an array
        [
            behavior(
                element_path=None,
                element_type=None,
                element_text=None,
                coordinates=None,
                viewport_size=None,
                event_data=None,
                metadata=None,
                context=None,
                component_id="hero",
            ),
            behavior(event_type="page_view", page_url="https://x/ünï-☃", timestamp=_at(5)),
            behavior(session_id="other", received_at=LATER, timestamp=LATER, context=MOBILE),
            behavior(element_text="t" * 4095, coordinates=[1.5, None, True], context=[1]),
            behavior(timestamp="1970-01-01T00:00:00+00:00", event_type="page_view"),
            behavior(timestamp="2026-11-25T12:00:00.5-08:00", context={"referrer": "r" * 2000}),
        ],
        # One session's pages with equal times (the first is the landing page, the
        # last the exit), interrupted by another's, its context completed later.
        [
            behavior(event_type="page_view", page_url="/a", timestamp=_at(1), context=None),
            behavior(event_type="page_view", page_url="/b", timestamp=_at(1), context=MOBILE),
            behavior(session_id="other", page_url="/o", timestamp=_at(0)),
            behavior(event_type="page_view", page_url="/c", timestamp=_at(3), context=MOBILE),
            behavior(page_url="/d", timestamp=_at(3), context={"referrer": "https://ref/"}),
            behavior(page_url="/e", timestamp=_at(0)),
        ],
    ],
    ids=["array", "object", "varied", "sessions"],
)
async def test_encoded_behavior_loads_as_asyncpgs_copy_with_its_sessions(
    db: Database, events: list[dict[str, Any]] | dict[str, Any]
) -> None:
    async with db.pool.acquire() as conn:
        await loaded(conn, *encode(events, BEHAVIOR), BEHAVIOR)


def test_what_is_not_encoded_goes_the_rows_way() -> None:
    long = orjson.dumps([storefront(), storefront(product_id="p" * 4096)])
    assert STOREFRONT.decode_copy(long) is None  # 4 KB or more: asyncpg encodes it
    assert STOREFRONT.decode(long) is not None
    for raw in (None, b"", b"[]", b"[1]", orjson.dumps([storefront(props=[1])])):
        assert STOREFRONT.decode_copy(raw) is None
    for shop in (str(uuid.uuid4()).upper(), ""):
        assert STOREFRONT.decode_copy(orjson.dumps([storefront(shop_id=shop)])) is None
    long = orjson.dumps([behavior(), behavior(page_url="p" * 4096)])
    assert BEHAVIOR.decode_copy(long) is None
    assert BEHAVIOR.decode(long) is not None
    for raw in (
        b"[]",
        orjson.dumps([behavior(metadata=[1])]),
        orjson.dumps([behavior(shop_id="")]),
    ):
        assert BEHAVIOR.decode_copy(raw) is None


async def test_a_nul_in_encoded_text_is_refused_by_postgres_as_in_asyncpgs_copy(
    db: Database,
) -> None:
    encoded, _ = encode([storefront(anon_id="bad\x00text")])
    async with db.pool.acquire() as conn:
        with pytest.raises(asyncpg.DataError):
            await conn.copy_to_table(
                "events",
                source=binary_copy.stream([encoded.data]),
                columns=STOREFRONT.columns,
                format="binary",
            )


TEXT = st.text(st.characters(codec="utf-8", exclude_characters="\x00"), max_size=40)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    texts=st.fixed_dictionaries(
        {
            "anon_id": TEXT,
            "session_id": TEXT,
            "event_type": TEXT,
            "product_id": st.none() | TEXT,
            "experiment_id": st.none() | TEXT,
            "variant": st.none() | TEXT,
        }
    ),
    props=st.dictionaries(TEXT, st.none() | TEXT | st.integers(-(2**53), 2**53), max_size=3),
    micros=st.integers(0, 10**6 - 1),
)
async def test_any_text_loads_as_asyncpgs_copy(
    db: Database, texts: dict[str, Any], props: dict[str, Any], micros: int
) -> None:
    at = datetime(2026, 11, 25, 12, 0, 0, micros, tzinfo=UTC).isoformat()
    events = [storefront(**texts, props=props, ts=at), storefront(ts=at)]
    async with db.pool.acquire() as conn:
        await loaded(conn, *encode(events))


CONTEXTS = st.sampled_from(
    [None, MOBILE, {"referrer": "https://ref/", "language": "fr"}, {"device_type": "robot"}, 7]
)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["s-1", "s-2"]),
            st.sampled_from(["page_view", "click"]),
            st.integers(0, 3),  # few minutes: equal times are common
            st.sampled_from(["/a", "/b", "/c"]),
            CONTEXTS,
        ),
        min_size=1,
        max_size=8,
    )
)
def test_the_sessions_gathered_are_those_the_rows_give(
    events: list[tuple[str, str, int, str, Any]],
) -> None:
    raw = orjson.dumps(
        [
            behavior(session_id=s, event_type=k, timestamp=_at(m), page_url=u, context=c)
            for s, k, m, u, c in events
        ]
    )
    encoded = BEHAVIOR.decode_copy(raw)
    assert encoded is not None
    same_sessions(BEHAVIOR, encoded, raw)
