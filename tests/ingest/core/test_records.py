"""The Kafka record format: a request's events of one session, as JSON arrays."""

from __future__ import annotations

import orjson

from ingest.core.records import RECORD_BYTES, pack


def test_events_of_a_session_share_a_record_in_order() -> None:
    events = [orjson.dumps({"n": n}) for n in range(5)]
    assert pack(b"k", events) == [(b"k", orjson.dumps([{"n": n} for n in range(5)]))]


def test_a_record_is_cut_before_it_passes_the_size_limit() -> None:
    big = b'"' + b"x" * (RECORD_BYTES // 3) + b'"'
    records = pack(b"k", [big] * 7)
    assert [len(orjson.loads(value)) for _, value in records] == [2, 2, 2, 1]
    assert all(len(value) <= RECORD_BYTES for _, value in records)
    assert {key for key, _ in records} == {b"k"}


def test_an_event_larger_than_the_limit_still_gets_a_record_of_its_own() -> None:
    huge = b'"' + b"x" * RECORD_BYTES + b'"'
    assert pack(b"k", [b"1", huge, b"2"]) == [
        (b"k", b"[1]"),
        (b"k", b"[" + huge + b"]"),
        (b"k", b"[2]"),
    ]
