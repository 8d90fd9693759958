"""The Segment API's fast batch decoder (msgspec, ``segment._fast_batch`` and
``_fast_sessions``) beside its reference (pydantic's ``_whole_batch`` and ``_sessions``):
whatever a batch holds, the fast path takes only bodies the reference takes whole,
reads them as pydantic does and makes the same records, byte for byte; any other body
it leaves to the reference."""

from __future__ import annotations

import json
import uuid
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from benchmarks import collector_bench
from ingest.collector import app as collector
from ingest.collector import segment
from ingest.collector.enrich import AssignedTimes
from ingest.core.settings import Settings
from ingest.core.shops import Privacy, Shop
from ingest.loadgen.traffic import Target
from tests.helpers import ASTRAL, JSON, LONG, WELL_FORMED

AT = datetime(2026, 12, 1, 12, 0, 0, 250_000, tzinfo=UTC)  # the requests' receive time
SETTINGS = Settings(country_header="CF-IPCountry")
SHOP = Shop(uuid.UUID("5f0c6a4e-8d1b-4c55-9a51-0d4f3c2b1a00"), "fast.example", None)
FLAGGING = replace(SHOP, privacy=Privacy(bot_policy="flag"))
HEADERS = {
    "plain": {},
    "country": {"CF-IPCountry": "de"},
    "bot": {"User-Agent": "Googlebot/2.1 (+http://www.google.com/bot.html)", "CF-IPCountry": "FR"},
}
# The fields of Message a FastMessage's struct has, the same.
FIELDS = ("type", "event", "name", "properties", "traits")


def _request(headers: dict[str, str]) -> web.Request:
    app = web.Application()
    app[collector.SETTINGS] = SETTINGS
    app[collector.TIMES] = AssignedTimes()  # each path its own: time_for remembers
    return make_mocked_request("POST", "/v1/batch", headers=headers, app=app)


def _encoded(shop: Shop, sessions: segment.Sessions) -> list[Any]:
    """What Kafka would get of ``sessions``: each session's records and refusals."""
    out: list[Any] = []
    for session, items in sessions.items():
        late: list[dict[str, Any]] = []
        key = f"{shop.id}:{session}".encode()
        out.append((collector._encode(key, items, "segment", late, 1 << 20), late))
    return out


def _same_time(fast: datetime | None, reference: datetime | None) -> bool:
    if fast is None or reference is None:
        return fast is reference
    return fast == reference and fast.utcoffset() == reference.utcoffset()


def _agree(
    body: bytes, *, historical: bool = False, headers: str = "plain", shop: Shop = SHOP
) -> bool:
    """True when the fast decoder took ``body``, once checked that it read it as the
    reference does and that both made the same records; False when it left it."""
    fast = segment._fast_batch(body, SETTINGS)
    if fast is None:
        return False
    whole = segment._whole_batch(body, SETTINGS)
    assert whole is not None, "the fast decoder took a body the reference does not take whole"
    envelope, validated = whole
    assert fast.context == envelope.context
    assert fast.writeKey == envelope.writeKey
    assert _same_time(fast.sentAt, envelope.sentAt)
    assert len(fast.messages) == len(validated)
    for quick, message in zip(fast.messages, validated, strict=True):
        wire, message_id, anon, user_id, group_id, client_time, sent, context = quick
        for name in FIELDS:
            assert getattr(wire, name) == getattr(message, name), name
        assert (message_id, user_id, group_id) == (
            message.messageId,
            message.userId,
            message.groupId,
        )
        if message.type == "alias":  # _record's anon_id
            assert anon == (message.previousId or "")
        else:
            assert anon == (message.anonymousId or message.userId or "")
        assert context.value == message.context
        assert _same_time(client_time, message.client_time())
        assert _same_time(sent, message.sentAt)
    sent = headers_of(headers)
    shared, sent_at = envelope.context, envelope.sentAt
    reference_request, fast_request = _request(sent), _request(sent)
    # Twice each, the second as a retry a second later: a message without a time gets
    # the time it was given the first time (AssignedTimes).
    for at in (AT, AT + timedelta(seconds=1)):
        reference, refused = segment._sessions(
            reference_request, shop, validated, shared, sent_at, None, historical, at, validated
        )
        made, made_refused = segment._fast_sessions(fast_request, shop, fast, historical, at)
        assert made_refused == refused
        assert _encoded(shop, made) == _encoded(shop, reference)
    return True


def headers_of(name: str) -> dict[str, str]:
    return {"Content-Type": "text/plain", **HEADERS[name]}


# What a batch may hold: mostly what SDKs send, with the odd values around every rule.
IDS = st.one_of(
    st.text(min_size=1, max_size=40),
    st.just(""),
    st.none(),
    st.integers(),
    st.integers(min_value=10**19, max_value=10**40),
    st.just(10**5000),  # more digits than str() writes
    st.floats(allow_nan=False, allow_infinity=False),
    st.booleans(),
    LONG,
    ASTRAL,
)


NEAR = st.builds(  # around the receive time: skew corrections, clamps, neither
    lambda seconds, zone: (AT + timedelta(seconds=seconds)).replace(tzinfo=None).isoformat() + zone,
    st.integers(-5 * 86400, 5 * 86400),
    st.sampled_from(["Z", "", "+02:00", "-07:30"]),
)
TEXTS = st.one_of(
    WELL_FORMED,
    NEAR,
    st.from_regex(
        r"\A[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt ][0-9]{2}:[0-9]{2}(:[0-9]{2})?(\.[0-9]{0,7})?"
        r"([Zz]|[+-][0-9]{2}(:?[0-9]{2})?)?\Z"
    ),
    st.sampled_from(
        [
            "",
            "2026-11-30 10:00:00",
            "2026-11-30",
            "2026-11-30T10:00",
            "2026-12-31T23:59:60Z",
            "2026-11-30T24:00:00Z",
            "2026-02-29T10:00:00Z",
            "2028-02-29T10:00:00Z",
            "2026-11-30T10:00:00.Z",
            "0001-01-01T00:00:00+05:00",
            "9999-12-31T23:59:59-01:00",
            "9999-12-31T23:59:59Z",
            "0001-01-01T00:00:00Z",
            "1700000000",
            "not a time",
            "\uff12\uff10\uff12\uff16-11-30T10:00:00Z",  # fullwidth digits
        ]
    ),
)
TIMES = st.one_of(
    TEXTS,
    st.integers(0, 2_000_000_000_000),
    st.floats(0, 2e9),
    st.none(),
)
TEXT = st.text(max_size=20) | LONG | ASTRAL
PROPERTIES = st.dictionaries(
    st.sampled_from(
        [
            "product_id",
            "experiment_id",
            "variation_id",
            "variant",
            "$context",
            "client_ts",
            "bot",
            "$name",
            "$message_id",
            "price",
            "name",
        ]
    ),
    JSON | TEXT,
    max_size=5,
)
CONTEXT = st.dictionaries(
    st.sampled_from(["sessionId", "geo", "page", "userAgent", "locale", "library"]),
    JSON | TEXT | st.integers(-(10**20), 10**20),
    max_size=4,
)
MESSAGE = st.fixed_dictionaries(
    {
        "type": st.sampled_from([*segment.TYPES, "track", "page", "purchase", ""]),
        "messageId": IDS,
    },
    optional={
        "event": TEXT | st.none() | st.integers(),
        "name": TEXT | st.none(),
        "properties": PROPERTIES | st.none() | JSON,
        "traits": PROPERTIES | st.none(),
        "context": CONTEXT | st.none() | JSON,  # JSON: a context that is no object
        "anonymousId": IDS,
        "userId": IDS,
        "groupId": IDS,
        "previousId": IDS,
        "timestamp": TIMES,
        "originalTimestamp": TIMES,
        "sentAt": TIMES,
        "integrations": JSON,
    },
)
# Messages every rule takes, so that most batches go the fast way.
GOOD = st.fixed_dictionaries(
    {
        "type": st.sampled_from(["track", "page", "screen", "identify"]),
        "event": st.text(min_size=1, max_size=20),
        "messageId": st.text(min_size=1, max_size=40) | st.integers(),
        "anonymousId": st.text(min_size=1, max_size=20),
    },
    optional={
        "userId": st.text(max_size=20) | st.integers(),
        "timestamp": WELL_FORMED | NEAR,
        "originalTimestamp": NEAR | st.just(""),
        "properties": PROPERTIES,
        "context": CONTEXT,
        "name": st.text(max_size=20),
    },
)
ENCODINGS = [
    lambda v: json.dumps(v).encode(),  # non-ASCII as \\u escapes
    lambda v: json.dumps(v, ensure_ascii=False).encode("utf-8", "surrogatepass"),
    lambda v: json.dumps(v, indent=1).encode(),
]


@settings(max_examples=600, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    messages=st.lists(GOOD, max_size=5) | st.lists(GOOD | MESSAGE, max_size=5),
    shared=st.none() | CONTEXT | JSON,
    sent_at=st.none() | NEAR | TIMES,
    write_key=st.none() | st.text(max_size=10) | st.integers(),
    encoding=st.sampled_from(range(len(ENCODINGS))),
    historical=st.booleans(),
    headers=st.sampled_from(list(HEADERS)),
    flagging=st.booleans(),
)
@example(  # a time the skew correction moves past year 9999, no sessionId
    messages=[
        {"type": "page", "anonymousId": "a", "messageId": "m", "timestamp": "9999-12-31T23:59:59Z"}
    ],
    shared=None,
    sent_at="2000-01-01T00:00:00Z",
    write_key=None,
    encoding=0,
    historical=False,
    headers="plain",
    flagging=False,
)
def test_the_fast_path_makes_the_reference_records(
    messages: list[dict[str, Any]],
    shared: Any,
    sent_at: Any,
    write_key: Any,
    encoding: int,
    historical: bool,
    headers: str,
    flagging: bool,
) -> None:
    body: dict[str, Any] = {"batch": messages, "integrations": {"All": True}}
    if shared is not None:
        body["context"] = shared
    if sent_at is not None:
        body["sentAt"] = sent_at
    if write_key is not None:
        body["writeKey"] = write_key
    try:
        raw = ENCODINGS[encoding](body)
    except (ValueError, UnicodeEncodeError):  # 10**5000 and json's int limit
        return
    taken = _agree(raw, historical=historical, headers=headers, shop=FLAGGING if flagging else SHOP)
    event("fast" if taken else "reference")


@settings(max_examples=2000, deadline=None)
@given(text=TEXTS)
@example(text="2026-11-30T10:00:00+05:60")  # fromisoformat takes it, pydantic does not
@example(text="2026-11-30T10:00:00-05:99")
@example(text="2026-11-30T10:00:60")
@example(text="2026-11-30T10:00:00.000000-00:00")
@example(text="\u0662026-11-30T10:00:00Z")  # an Arabic-Indic digit
@example(text="2026-11-30T10:00:00.Z")
@example(text="2026-11-30T10:00:00.1234567Z")  # pydantic cuts the 7th digit
def test_a_time_the_fast_decoder_reads_is_pydantics(text: str) -> None:
    try:
        fast = segment._fast_time(text) if text else None
    except segment._Decline:
        event("declined")
        return
    event("read")
    reference = segment.Message.model_validate_json(
        orjson.dumps({"type": "page", "timestamp": text})
    ).timestamp
    assert _same_time(fast, reference), (text, fast, reference)


def _benchmark_bodies() -> list[bytes]:
    requests = collector_bench.bodies(Target("http://x", "wk_x"), 7, 40)["segment"]
    return [r.body for r in requests]


@pytest.mark.parametrize("headers", list(HEADERS))
@pytest.mark.parametrize("historical", [False, True])
def test_what_analytics_js_sends_goes_the_fast_way_with_the_same_records(
    headers: str, historical: bool
) -> None:
    for body in _benchmark_bodies():
        assert _agree(body, historical=historical, headers=headers, shop=FLAGGING)


def _sdk_batch() -> dict[str, Any]:
    return {
        "batch": [
            {
                "type": "track",
                "event": "Product Viewed",
                "messageId": "ajs-next-1-a",
                "anonymousId": "anon-1",
                "userId": 42,
                "timestamp": "2026-12-01T11:59:00.123Z",
                "properties": {"product_id": 7, "variation_id": 2, "experiment_id": "x" * 300},
                "context": {"page": {"path": "/p"}},
            },
            {
                "type": "identify",
                "messageId": 1.5,
                "userId": "u-1",
                "anonymousId": "",
                "originalTimestamp": "2026-12-01T10:00:00",
                "timestamp": "",
                "traits": {"plan": "pro"},
                "name": "n",
            },
            {
                "type": "alias",
                "messageId": "m-3",
                "userId": "u-1",
                "previousId": "anon-1",
                "sentAt": "2026-12-01T14:00:00+02:00",
            },
            {"type": "group", "messageId": "m-4", "userId": "u-1", "groupId": 99},
            {"type": "screen", "messageId": "m-5", "anonymousId": "a", "name": "Home"},
        ],
        "context": {"library": {"name": "analytics-python"}, "sessionId": 1700000000},
        "sentAt": "2026-12-01T09:00:00Z",
        "writeKey": "wk_x",
    }


def test_every_message_type_and_normalised_id_goes_the_fast_way() -> None:
    assert _agree(orjson.dumps(_sdk_batch()))
    assert _agree(orjson.dumps(_sdk_batch()), headers="bot", shop=FLAGGING)
    assert _agree(orjson.dumps({"batch": []}))
    duplicated = orjson.dumps(_sdk_batch()).replace(
        b'"type":"track",', b'"type":"page","userId":"x","type":"track",'
    )
    assert _agree(duplicated)  # a key twice: the last, in both


@pytest.mark.parametrize(
    "change",
    [
        lambda b: b["batch"][0].update(timestamp="2026-12-01 11:59:00Z"),  # pydantic's only
        lambda b: b["batch"][0].update(timestamp=1764590340),  # unix seconds
        lambda b: b["batch"][0].update(originalTimestamp="2026-11-31T00:00:00Z"),
        lambda b: b["batch"][0].update(anonymousId=True),  # refused by the reference
        lambda b: b["batch"][0].update(anonymousId="a" * 257),
        lambda b: b["batch"][0].update(userId=10**300),  # 301 digits
        lambda b: b["batch"][0].update(event=""),  # a track without its name
        lambda b: b["batch"][1].pop("messageId"),  # an id of its raw JSON
        lambda b: b["batch"][2].pop("previousId"),
        lambda b: b["batch"][3].update(groupId=""),
        lambda b: b["batch"][4].update(type="purchase"),
        lambda b: b["batch"][4].update(name="x" * 4097),
        lambda b: b["batch"][4].update(properties=[1]),
        lambda b: b.update(sentAt="yesterday"),
        lambda b: b.update(writeKey=7),
        lambda b: b["batch"].append(3),
        lambda b: b["batch"][0]["properties"].update(note="\u0000"),
        lambda b: b["batch"][0]["properties"].update(note="x" * 40_000),  # past the limit
    ],
)
def test_a_body_the_fast_decoder_declines_goes_the_reference_way(change: Any) -> None:
    body = _sdk_batch()
    change(body)
    assert not _agree(json.dumps(body).encode())


@pytest.mark.parametrize(
    "raw",
    [
        b'{"batch": [{"type": "page", "anonymousId": "a", "messageId": "m", "x": NaN}]}',
        b'{"batch": [{"type": "page", "anonymousId": "a", "messageId": 1e400}]}',
        b'{"batch": [{"type": "page", "anonymousId": "\\ud800", "messageId": "m"}]}',
        b'{"batch": [{"type": "page", "anonymousId": "\xff", "messageId": "m"}]}',
        # Not UTF-8 in what msgspec skips (it was taken: the reference refuses the body).
        b'{"batch": [{"type": "page", "anonymousId": "a", "messageId": "m", "x": "\xff"}]}',
        b'{"batch": [{"type": "page", "anonymousId": "a", "messageId": "m"}], "y": ["\xff"]}',
        b'{"batch": [{"type": "page", "anonymousId": "a\tb", "messageId": "m"}]}',
        b'{"batch": [{"type": "page", "anonymousId": "a", "messageId": "m"},]}',
        b'{"batch": [{"type": "page", "anonymousId": "a", "messageId": "m"}]} x',
        b"[]",
    ],
)
def test_json_pydantic_reads_otherwise_goes_the_reference_way(raw: bytes) -> None:
    assert not _agree(raw)


def test_the_fast_event_id_is_uuid5_of_the_message_id() -> None:
    fast = segment._fast_batch(orjson.dumps(_sdk_batch()), SETTINGS)
    assert fast is not None
    sessions, _ = segment._fast_sessions(_request(headers_of("plain")), SHOP, fast, False, AT)
    ids = [record["event_id"] for items in sessions.values() for _, record in items]
    space = segment.namespace(SHOP)
    expected = ["ajs-next-1-a", "1.5", "m-3", "m-4", "m-5"]
    assert sorted(ids) == sorted(str(uuid.uuid5(space, name)) for name in expected)


def test_a_time_moved_out_of_range_refuses_its_message_on_both_paths() -> None:
    """It was a 500 on the reference path when the message had no sessionId (the time
    of its default session was worked out outside the refusals)."""
    for timestamp, sent_at in (
        ("9999-12-31T23:59:59Z", "2000-01-01T00:00:00Z"),  # skew past year 9999
        ("0001-01-01T00:00:00+05:00", None),  # before year 1 in UTC
    ):
        body: dict[str, Any] = {
            "batch": [
                {"type": "page", "anonymousId": "a", "messageId": "m", "timestamp": timestamp},
                {"type": "page", "anonymousId": "a", "messageId": "n"},
            ]
        }
        if sent_at:
            body["sentAt"] = sent_at
        assert _agree(orjson.dumps(body))
        whole = segment._whole_batch(orjson.dumps(body), SETTINGS)
        assert whole is not None
        envelope, validated = whole
        sessions, refused = segment._sessions(
            _request({}), SHOP, validated, None, envelope.sentAt, None, False, AT, validated
        )
        assert refused == [
            {"index": 0, "reason": "message cannot be stored: date value out of range"}
        ]
        assert [i for items in sessions.values() for i, _ in items] == [1]


async def test_a_shared_context_that_cannot_be_encoded_is_a_400_not_a_500(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A batch's context with an integer beyond 64 bits: every message would carry it;
    the batch is refused, on both paths (it was a 500: orjson's error went unhandled)."""
    app = _app()
    body = _sdk_batch()
    body["context"] = {"n": 10**30}
    raw = json.dumps(body).encode()
    assert segment._fast_batch(raw, SETTINGS) is not None
    for fast in (True, False):
        if not fast:
            monkeypatch.setattr(segment, "_fast_batch", lambda body, settings: None)
        request = make_mocked_request(
            "POST", "/v1/batch", headers={"Content-Type": "text/plain"}, app=app
        )
        request._read_bytes = raw  # the body, as if read already
        response = await segment._handler(None, batched=True)(request)
        assert isinstance(response, web.Response)
        assert response.status == 400
        assert isinstance(response.body, bytes)
        assert orjson.loads(response.body) == {
            "error": "context cannot be encoded: Integer exceeds 64-bit range"
        }


def test_the_fast_time_keeps_the_zone_it_was_given() -> None:
    assert segment._fast_time("2026-12-01T10:00:00+05:30").utcoffset() == timedelta(
        hours=5, minutes=30
    )
    assert segment._fast_time("2026-12-01T10:00:00Z").tzinfo == UTC
    assert segment._fast_time("2026-12-01T10:00:00").tzinfo is None


def _batch_with_contexts(context: bytes, shared: bytes) -> bytes:
    """Messages sharing one context text, one without, one with a context of its own."""
    messages = [
        b'{"type": "page", "anonymousId": "a", "messageId": "m1", "context": ' + context + b"}",
        b'{"type": "track", "event": "e", "userId": "u", "messageId": "m2", "context": '
        + context
        + b"}",
        b'{"type": "page", "anonymousId": "b", "messageId": "m3"}',
        b'{"type": "identify", "userId": "u", "messageId": "m4", "context": '
        + context
        + b', "traits": {"plan": "pro"}}',
        b'{"type": "page", "anonymousId": "a", "messageId": "m5", "context": {"geo": {}}}',
        b'{"type": "screen", "anonymousId": "a", "messageId": "m6", "context": ' + context + b"}",
    ]
    return b'{"batch": [' + b", ".join(messages) + b"]" + shared + b"}"


SHARED = [b"", b', "context": {"sessionId": "batch", "library": {"name": "x"}, "geo": null}']


@pytest.mark.parametrize("shared", SHARED)
@pytest.mark.parametrize(
    "context",
    [
        b'{"sessionId": "s", "page": {"path": "/"}}',
        b'{"sessionId": "s", "a": 1, "a": 2, "sessionId": 7}',  # keys twice: the last
        b'{"sessionId": ""}',
        b'{"n": 100000000000000000000000}',  # beyond 64 bits: both refuse the messages
        b'{"x": "\\ud83d\\ude00", "y": "\xc3\xa9", "z": "\\"q\\""}',
        b'{"geo": {"city": "x"}}',
        b"{}",
        b"null",
    ],
)
def test_a_context_decoded_once_for_its_messages_makes_the_reference_records(
    context: bytes, shared: bytes
) -> None:
    """The fast decoder reads each distinct context text once and copies its JSON into
    every record that holds it: the records are still the reference's, with the batch's
    context merged in or not, the country added or not, the messages' bot flag or not."""
    body = _batch_with_contexts(context, shared)
    for headers in HEADERS:
        assert _agree(body, headers=headers, shop=FLAGGING)


@pytest.mark.parametrize(
    "context",
    [
        b"[1]",  # not an object: pydantic refuses the message
        b'"x"',
        b"1",
        b'{"x": "\\ud800"}',  # a lone surrogate
        b'{"x": "\xff"}',  # not UTF-8
        b'{"x": 1e400}',  # past a float: pydantic reads inf
        b'{"x": "\\u0000"}',
    ],
)
def test_a_context_the_fast_decoder_cannot_read_goes_the_reference_way(context: bytes) -> None:
    assert not _agree(_batch_with_contexts(context, b""))


def test_a_context_as_deep_as_orjson_can_write_is_refused_as_the_reference_refuses_it() -> None:
    """A context's JSON is written once, outside its records, as deep as a record holds
    it: a context too deep for orjson in the record refuses its messages as the
    reference's records do, and the others go. (pydantic reads no body nested past 200
    levels whole, so the reference here is its per-message path; that path refuses a
    message too deep for orjson on its own before making its record, with a reason of
    its own, where the fast path's record is refused: the same messages either way.)"""
    outcomes = set()
    for depth in range(246, 258):
        context = b'{"a":' * depth + b"1" + b"}" * depth
        body = _batch_with_contexts(context, b"")
        fast = segment._fast_batch(body, SETTINGS)
        assert fast is not None
        assert segment._whole_batch(body, SETTINGS) is None
        messages = orjson.loads(body)["batch"]
        made, made_refused = segment._fast_sessions(_request({}), SHOP, fast, False, AT)
        reference, refused = segment._sessions(
            _request({}), SHOP, messages, None, None, None, False, AT
        )
        fast_out, reference_out = _encoded(SHOP, made), _encoded(SHOP, reference)
        # (The sessions in another order: a session's first message refused on the way.)
        kafka = sorted(record for records, _ in fast_out for record in records)
        assert kafka == sorted(record for records, _ in reference_out for record in records)

        def indices(refusals: list[dict[str, Any]], out: list[Any]) -> list[int]:
            late = [r for _, lates in out for r in lates]
            return sorted(r["index"] for r in refusals + late)

        refused_indices = indices(made_refused, fast_out)
        assert refused_indices == indices(refused, reference_out)
        outcomes.add(bool(refused_indices))
    assert outcomes == {True, False}  # both sides of orjson's limit


def _app() -> web.Application:
    """A collector of SHOP ("wk_x") whose delivery must not be reached."""

    class Shops:
        async def by_write_key(self, key: str) -> Shop | None:
            return SHOP if key == "wk_x" else None

    class Sink:
        async def deliver(self, kind: str, topic: str, messages: Any) -> None:
            raise AssertionError("nothing is delivered")

    return collector.create_app(Settings(rate_limit_per_s=0), Sink(), Shops())  # type: ignore[arg-type]


@pytest.mark.parametrize("depth", [1010, 3000])
async def test_json_nested_past_msgspecs_limit_is_a_400_not_a_500(depth: int) -> None:
    """msgspec's RecursionError was a 500; the body goes the reference way, which
    refuses it."""
    nested = b'{"a":' * depth + b"1" + b"}" * depth
    raw = b'{"writeKey": "wk_x", "batch": [{"type": "page", "anonymousId": "a", '
    raw += b'"messageId": "m", "properties": ' + nested + b"}]}"
    assert segment._fast_batch(raw, SETTINGS) is None
    request = make_mocked_request(
        "POST", "/v1/batch", headers={"Content-Type": "text/plain"}, app=_app()
    )
    request._read_bytes = raw
    response = await segment._handler(None, batched=True)(request)
    assert isinstance(response, web.Response)
    assert response.status == 400
    assert isinstance(response.body, bytes)
    assert orjson.loads(response.body)["error"]
