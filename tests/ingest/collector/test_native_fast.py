"""The native routes' fast path (``native.decode`` and ``native.records``: each event's
JSON passed through) beside its reference (``app._whole_batch`` and ``app._records``):
whatever a batch holds, the fast path takes only batches the reference takes whole, and
its records load as the same rows through both of the loaders' decoders; any other
batch it leaves to the reference."""

from __future__ import annotations

import json
import re
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

from consumers.rows import SPECS
from ingest.collector import app as collector
from ingest.collector import native
from ingest.collector.enrich import SESSION_FACTS, AssignedTimes, Received
from ingest.collector.models import BehaviorType
from ingest.core import streams
from ingest.core.settings import Settings
from ingest.core.shops import Privacy, Shop
from ingest.loadgen.traffic import Mix, Target, Traffic
from tests.helpers import ASTRAL, JSON, LONG, WELL_FORMED

AT = datetime(2026, 12, 1, 12, 0, 0, 250_000, tzinfo=UTC)  # the requests' receive time
SETTINGS = Settings(country_header="CF-IPCountry")
SHOP = Shop(uuid.UUID("5f0c6a4e-8d1b-4c55-9a51-0d4f3c2b1a00"), "fast.example", None)
FLAGGING = replace(SHOP, privacy=Privacy(bot_policy="flag"))
KEEPING = replace(SHOP, privacy=Privacy(ip_policy="keep"))
HEADERS = {
    "plain": {},
    "country": {"CF-IPCountry": "de"},
    "bot": {"User-Agent": "Googlebot/2.1 (+http://www.google.com/bot.html)"},
    "anonymous": {"SP-Anonymous": "*"},
}


def _received(headers: str, sent_at: datetime | None, at: datetime = AT) -> Received:
    app = web.Application()
    app[collector.SETTINGS] = SETTINGS
    request = make_mocked_request(
        "POST", "/v1/behavior", headers={"User-Agent": "Mozilla/5.0", **HEADERS[headers]}, app=app
    )
    return Received.of(request, SETTINGS, sent_at, at)


def _rows(stream: str, value: bytes) -> list[list[Any]]:
    """A record's rows as each of the loaders' decoders reads them, jsonb columns parsed
    (the fast path keeps the client's JSON text, spacing and all)."""
    spec = SPECS[stream]
    kinds = [c.kind for c in streams.STREAMS[stream].columns]

    def plain(row: tuple[Any, ...]) -> list[Any]:
        return [
            orjson.loads(v) if k.startswith("json") and isinstance(v, str) else v
            for v, k in zip(row, kinds, strict=True)
        ]

    checked = [plain(row) for row in spec.rows(value)]
    fast = spec.decode(value)
    assert fast is not None, "the loader's fast decoder refused a record of the collector's"
    assert [plain(row) for row in fast[0]] == checked
    contexts = [spec.row(e)[1] for e in spec.events(value)[0]]
    if spec.keeps_sessions:
        assert fast[1] == contexts
    return [*checked, contexts]


def _agree(stream: str, body: bytes, *, headers: str = "plain", shop: Shop = SHOP) -> bool:
    """True when the fast path took ``body``, once checked that the reference takes it
    whole and that both make records of the same rows; False when it left it."""
    fast = native.decode(stream, body, SETTINGS)
    if fast is None:
        return False
    envelope = collector._whole_batch(stream, body, SETTINGS)
    assert envelope is not None, "the fast path took a batch the reference does not take whole"
    assert fast.write_key == envelope.write_key
    assert fast.sent_at == envelope.sent_at
    assert len(fast.events) == len(envelope.events)
    received = _received(headers, envelope.sent_at)
    made = native.records(fast, shop, received, SETTINGS.max_record_bytes)
    if made is None:
        return False
    rejected: list[dict[str, Any]] = []
    valid = collector._valid_events(stream, envelope, SETTINGS.max_event_bytes, rejected)
    again = _received(headers, envelope.sent_at)  # of its own: of_shop caches its views
    limit = SETTINGS.max_record_bytes
    reference, accepted = collector._records(
        stream, valid, shop, again, AssignedTimes(), rejected, limit
    )
    assert (accepted, rejected) == (len(fast.events), [])
    assert [key for key, _ in made] == [key for key, _ in reference]
    for (_, value), (_, expected) in zip(made, reference, strict=True):
        assert _rows(stream, value) == _rows(stream, expected)
    return True


def _at(seconds: float, zone: str = "Z") -> str:
    return (AT + timedelta(seconds=seconds)).replace(tzinfo=None).isoformat() + zone


# What a batch may hold: mostly what beacon.js sends, with the odd values around every rule.
IDS = st.one_of(
    st.uuids().map(str),
    st.uuids().map(lambda u: str(u).upper()),
    st.uuids().map(lambda u: u.hex),
    st.uuids().map(lambda u: f"{{{u}}}"),
    st.uuids().map(lambda u: f"urn:uuid:{u}"),
    st.text(max_size=40),
    st.none(),
    st.integers(),
)
TIMES = st.one_of(
    st.integers(-600, 600).map(_at),  # near now: kept, or clamped past max_future_skew_s
    st.sampled_from(["+02:00", "-07:30", "", "z", "+0200"]).map(lambda z: _at(-5, z)),
    WELL_FORMED,
    st.sampled_from(
        [
            _at(-1).replace("T", " "),
            _at(-1).replace("T", "t"),
            "2026-12-01T11:59:00.1234567Z",  # msgspec rounds past 6 digits, pydantic cuts
            "2026-12-01T11:59:00.9999999Z",
            "2026-12-01T23:59:60Z",
            "2026-12-01T11:59Z",
            "2026-12-01",
            "1700000000",
            "",
        ]
    ),
    st.integers(0, 2_000_000_000),
    st.none(),
)
TEXT = st.text(max_size=20) | LONG | ASTRAL
OBJECT = st.dictionaries(st.text(max_size=8), JSON, max_size=4)
METADATA = st.dictionaries(
    st.sampled_from([*SESSION_FACTS, "utm_source", "bot", "client_timestamp"]),
    JSON | TEXT,
    max_size=4,
)
BEHAVIOR = st.fixed_dictionaries(
    {
        "event_type": st.sampled_from([*BehaviorType.__args__, "purchase", ""]),
        "session_id": TEXT,
        "page_url": TEXT,
    },
    optional={
        "event_id": IDS,
        "timestamp": TIMES,
        "element_path": TEXT | st.none() | st.integers(),
        "element_type": TEXT | st.none(),
        "element_text": TEXT | st.none(),
        "coordinates": OBJECT | st.none() | JSON,
        "viewport_size": OBJECT | st.none(),
        "event_data": OBJECT | st.none() | JSON,
        "component_id": TEXT | st.none(),
        "metadata": METADATA | st.none(),
        "shop_id": st.just(str(SHOP.id)),  # the collector's to set: refused
    },
)
# JSON values of every kind but those sent the reference way (NUL, runs of 19 digits:
# an integer's, or a float's as repr writes it, 0.00032959612813936097 say).
PLAIN = st.text(
    st.characters(blacklist_categories=["Cs"], blacklist_characters="\x00"), max_size=12
)
GOOD_JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(10**15), 10**15)
    | st.floats(allow_nan=False, allow_infinity=False).filter(
        lambda f: re.search(r"[0-9]{19}", repr(f)) is None
    )
    | PLAIN,
    lambda children: st.lists(children, max_size=3) | st.dictionaries(PLAIN, children, max_size=3),
    max_leaves=8,
)
GOOD_OBJECT = st.dictionaries(PLAIN, GOOD_JSON, max_size=4)
GOOD_BEHAVIOR = st.fixed_dictionaries(
    {
        "event_id": st.uuids().map(str),
        "event_type": st.sampled_from(BehaviorType.__args__),
        "session_id": PLAIN.filter(bool),
        "page_url": PLAIN.filter(bool),
        "timestamp": st.integers(-600, 200).map(_at),
    },
    optional={
        "element_path": PLAIN | st.none(),
        "coordinates": GOOD_OBJECT | st.none(),
        "event_data": GOOD_OBJECT,
        "metadata": st.dictionaries(st.sampled_from([*SESSION_FACTS, "utm"]), GOOD_JSON),
    },
)
STOREFRONT = st.fixed_dictionaries(
    {
        "event_type": TEXT,
        "anon_id": TEXT,
        "session_id": TEXT,
    },
    optional={
        "event_id": IDS,
        "ts": TIMES,
        "props": st.dictionaries(st.sampled_from(["price", "$context", "url"]), JSON, max_size=3)
        | st.none(),
        "product_id": TEXT | st.none(),
        "variant": TEXT | st.none(),
        "user_id": TEXT | st.none() | st.integers(),
        "received_at": st.just(AT.isoformat()),
    },
)
GOOD_STOREFRONT = st.fixed_dictionaries(
    {
        "event_id": st.uuids().map(str),
        "event_type": st.text(min_size=1, max_size=20),
        "anon_id": st.text(min_size=1, max_size=20),
        "session_id": st.sampled_from(["s1", "s2"]),
        "ts": st.integers(-600, 200).map(_at),
    },
    optional={"props": OBJECT, "product_id": st.text(max_size=20) | st.none()},
)
SENT = st.one_of(
    st.none(), st.integers(-900, 900).map(_at), st.sampled_from(["2026-12-01 11:00:00", "x"])
)


def _body(events: list[Any], sent_at: str | None, bare: bool) -> bytes:
    # The stdlib's encoder: it writes integers past 64 bits, which orjson refuses.
    data = events if bare else {"events": events, **({"sent_at": sent_at} if sent_at else {})}
    return json.dumps(data, ensure_ascii=False).encode()


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    stream_events=st.one_of(
        st.tuples(st.just("behavior"), st.lists(BEHAVIOR | GOOD_BEHAVIOR, max_size=5)),
        st.tuples(st.just("storefront"), st.lists(STOREFRONT | GOOD_STOREFRONT, max_size=5)),
    ),
    sent_at=SENT,
    bare=st.booleans(),
    headers=st.sampled_from(list(HEADERS)),
    shop=st.sampled_from([SHOP, FLAGGING, KEEPING]),
)
def test_the_fast_path_stores_what_the_reference_stores(
    stream_events: tuple[str, list[Any]], sent_at: str | None, bare: bool, headers: str, shop: Shop
) -> None:
    stream, events = stream_events
    taken = _agree(stream, _body(events, sent_at, bare), headers=headers, shop=shop)
    event(f"{stream}: {'fast' if taken else 'reference'}")


@settings(max_examples=100, deadline=None)
@given(events=st.lists(GOOD_BEHAVIOR, min_size=1, max_size=5))
def test_good_batches_take_the_fast_path(events: list[Any]) -> None:
    """A test that could pass with the fast path declining everything would prove nothing."""
    assert _agree("behavior", _body(events, _at(-1), bare=False))


_GOOD = orjson.dumps(
    {
        "event_id": "2f1c9a1e-0a6b-4c9e-8f6e-3b1f2d4c5a60",
        "event_type": "click",
        "session_id": "s",
        "page_url": "https://x/",
        "timestamp": _at(-1),
    }
)


@pytest.mark.parametrize(
    ("event", "taken"),
    [
        (_GOOD, True),
        (b'{ "event_type" : "click" ,\n "session_id":"s", ' + _GOOD[1:], True),  # spacing
        (_GOOD[:-1] + b',"event_type":"scroll"}', True),  # a repeated key: the last counts
        (_GOOD[:-1] + b',"event_data":{"n":1E2,"m":-0.0}}', True),
        (_GOOD[:-1] + b',"event_data":{"n":12345678901234567890123}}', False),  # > 64 bits
        (_GOOD[:-1] + b',"event_data":{"n":1e400}}', False),  # no double holds it
        (_GOOD[:-1] + b',"coordinates":{"x":0.00032959612813936097}}', False),  # 19 digits
        (_GOOD[:-1] + b',"element_text":"caf\xc3\xa9 \xf0\x9f\x98\x80"}', True),
        (_GOOD[:-1] + b',"element_text":"caf\\u00e9 \\u001f"}', True),
        (_GOOD[:-1] + b',"event_data":{"t":"\\ud83d\\ude00"}}', True),  # a surrogate pair
        (_GOOD[:-1] + b',"event_data":{"t":"\\u0000"}}', False),  # NUL: refused
        (_GOOD[:-1] + b',"element_text":"\\ud800"}', False),
        (_GOOD[:-1] + b',"element_text":"\xff"}', False),  # not UTF-8
        (_GOOD[:-1] + b',"context":{"country_code":"FR"}}', False),  # the collector's field
        (_GOOD.replace(b'"event_id":"2f1c', b'"event_id":"{2f1c'), False),
        (_GOOD[:-1] + b',"event_data":{"a":' + b"[" * 5000 + b"]" * 5000 + b"}}", False),
    ],
)
def test_bodies_at_the_edges(event: bytes, taken: bool) -> None:
    body = b'{"events":[' + event + b"," + _GOOD + b"]}"
    if collector._whole_batch("behavior", body, SETTINGS) is None:
        assert native.decode("behavior", body, SETTINGS) is None
    else:
        assert _agree("behavior", body) is taken


@example(headers="anonymous")
@given(headers=st.sampled_from(list(HEADERS)))
@settings(max_examples=10, deadline=None)
def test_what_the_reference_changes_goes_its_way(headers: str) -> None:
    """A session fact of an anonymous request (dropped from the metadata), a bot's flag
    (added to it), a clock off by minutes (every time corrected): the reference path."""
    event = {**orjson.loads(_GOOD), "metadata": {"referrer": "https://r/"}}
    body = _body([event], None, bare=False)
    taken = _agree("behavior", body, headers=headers, shop=FLAGGING)
    assert taken is (headers in ("plain", "country"))
    skewed = _body([event], _at(-3600), bare=False)
    assert native.decode("behavior", skewed, SETTINGS) is not None
    assert not _agree("behavior", skewed)


def test_the_benchmarks_bodies_take_the_fast_path() -> None:
    target = Target("http://127.0.0.1", "key")
    for kind, stream in (("behavior", "behavior"), ("storefront", "storefront")):
        traffic = Traffic(target, Mix(**{k: float(k == kind) for k in Mix.__dataclass_fields__}))
        for _ in range(20):
            body = traffic.next().body
            fast = native.decode(stream, body, SETTINGS)
            assert fast is not None
            received = _received("plain", fast.sent_at, datetime.now(UTC))
            assert native.records(fast, SHOP, received, SETTINGS.max_record_bytes) is not None


@pytest.mark.parametrize(
    "body",
    [
        b'{"events":[' + _GOOD + b'],"x\xff":"\xfe"}',  # in a key no struct names
        b'{"events":[],"x":"\xfe"}',  # nothing to take: still not JSON
    ],
)
def test_a_body_not_utf8_anywhere_is_refused_as_the_reference_refuses_it(body: bytes) -> None:
    assert native.decode("behavior", body, SETTINGS) is None
    with pytest.raises(collector.Refused) as refused:
        collector._envelope(body)
    assert refused.value.status == 400
