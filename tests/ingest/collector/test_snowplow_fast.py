"""Snowplow's fast path (``snowplow._tracked``, ``_fast``, ``_uuid``) against its
reference (``to_event`` and ``derived``, orjson and ``_fields``, ``uuid.UUID``): the
same events, records, refusals and answers for the same inputs."""

from __future__ import annotations

import asyncio
import base64
import functools
import json
import uuid
from collections.abc import Callable, Coroutine
from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec
import orjson
import pytest
from aiohttp.test_utils import make_mocked_request
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from benchmarks import collector_bench
from ingest.collector import app as collector
from ingest.collector import snowplow
from ingest.collector.enrich import (
    Received,
    behavior_fields_record,
    behavior_record,
    storefront_record,
)
from ingest.collector.models import BehaviorEvent, StorefrontEvent
from ingest.core.db import Database
from ingest.core.settings import Settings
from ingest.core.shops import Shop, ShopCredentials, ShopDirectory
from ingest.loadgen.traffic import Target

SHOP = Shop(uuid.UUID("5f0c3a52-6a47-4f3e-9d55-d0f6b7c1e2a4"), "shop.test", None)
AT = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
RECEIVED = Received(
    AT,
    timedelta(0),
    AT + timedelta(minutes=5),
    {"user_agent": "ua", "device_type": "desktop", "client_ip": "192.0.2.0", "country_code": None},
    {
        "user_agent": "ua",
        "device_type": "desktop",
        "client_ip": "192.0.2.0",
        "country_code": None,
        "referrer": None,
        "language": None,
        "screen_resolution": None,
    },
)

JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3)
    ),
    max_leaves=8,
)
TEXT = st.text(max_size=12)


def _b64(value: Any, alphabet: str) -> str:
    raw = json.dumps(value).encode()
    if alphabet == "url":
        return base64.urlsafe_b64encode(raw).decode().rstrip("=")
    if alphabet == "std":
        return base64.b64encode(raw).decode()
    return base64.urlsafe_b64encode(raw).decode() + " "  # padded, a space around


def _json_text(value: st.SearchStrategy[Any]) -> st.SearchStrategy[str]:
    """``value`` as a tracker sends JSON: plain, base64 of either alphabet, or garbage."""
    return st.one_of(
        value.map(json.dumps),
        st.tuples(value, st.sampled_from(["url", "std", "padded"])).map(lambda t: _b64(*t)),
        TEXT,
        st.sampled_from(["e30", "bnVsbA", "%%%", "W10", "eyJkYXRhIjpbXX0"]),
    )


LINK_DATA = st.fixed_dictionaries(
    {},
    optional={
        "targetUrl": TEXT | JSON,
        "elementId": TEXT | JSON,
        "elementClasses": st.lists(TEXT | JSON, max_size=3) | JSON,
        "elementContent": st.text(max_size=120) | JSON,
        "elementTarget": TEXT | JSON,
        "formId": TEXT,
    },
)
SELF_DESCRIBING = st.builds(
    lambda schema, data: {"schema": "x", "data": {"schema": schema, "data": data}},
    st.sampled_from(
        [
            f"{snowplow.IGLU}link_click/jsonschema/1-0-1",
            f"{snowplow.IGLU}submit_form/jsonschema/1-0-0",
            f"{snowplow.IGLU}application_error/jsonschema/1-0-0",
            f"{snowplow.FORM_ABANDON}0-0",
            "iglu:com.example/link_click/jsonschema/1-0-0",
            "iglu:com.example/add_to_cart/jsonschema/1-0-0",
        ]
    ),
    LINK_DATA | JSON,
) | JSON.map(lambda v: {"data": v})
STATISTICS = st.fixed_dictionaries(
    {},
    optional={
        "element_name": TEXT | JSON,
        "total_time_visible_ms": st.integers(-5, 2**54) | JSON,
        "element_index": st.integers(-5, 2**32) | JSON,
        "times_in_view": st.integers(-5, 2**32) | JSON,
        "max_y_depth_ratio": st.floats() | JSON,
    },
)
CONTEXTS = (
    st.builds(
        lambda entities: {"schema": "iglu:x/contexts/jsonschema/1-0-0", "data": entities},
        st.lists(
            st.one_of(
                STATISTICS.map(
                    lambda d: {"schema": f"{snowplow.ELEMENT_STATISTICS}0-0", "data": d}
                ),
                st.builds(
                    lambda d: {"schema": "iglu:com.example/page/jsonschema/1-0-0", "data": d}, JSON
                ),
                JSON,
            ),
            max_size=3,
        ),
    )
    | JSON
)
UUIDS = st.one_of(
    st.uuids().map(str),
    st.uuids().map(lambda u: u.hex),
    st.uuids().map(lambda u: str(u).upper()),
    st.uuids().map(lambda u: f"{{{u}}}"),
    st.uuids().map(lambda u: f"urn:uuid:{u}"),
    st.uuids().map(lambda u: str(u)[:-1] + "g"),
    st.uuids().map(lambda u: "+" + u.hex[1:]),
    st.uuids().map(lambda u: u.hex[:10] + "-" + u.hex[10:]),
    TEXT,
)
TIMES = st.one_of(
    st.integers(0, 4 * 10**12).map(str), st.integers(-(10**20), 10**20).map(str), TEXT
)
SIZES = st.one_of(
    st.tuples(st.integers(0, 5000), st.integers(0, 5000)).map(lambda t: f"{t[0]}x{t[1]}"),
    st.tuples(st.integers(0, 10**8), st.integers(0, 10**8)).map(lambda t: f"{t[0]}x{t[1]}"),
    st.tuples(st.integers(0, 4), st.integers(0, 4)).map(lambda t: f"{t[0]}x{t[1]}"),
    st.sampled_from(["0x0", "x", "12x", "x12", " 1x1", "1x1x1", "-1x5", "24"]),
    TEXT,
)
OFFSETS = st.integers(-3, 5).map(str) | st.integers(-(10**12), 10**12).map(str) | TEXT
URLS = st.one_of(
    st.just("https://shop.test/p/1"), st.just(""), st.just("u" * 4097), st.just("u" * 4096), TEXT
)
FIELDS = st.fixed_dictionaries(
    {
        "e": st.sampled_from(["pv", "pp", "ue", "se", "tr", "ti", "x", ""]),
        "url": URLS,
    },
    optional={
        "eid": UUIDS,
        "aid": TEXT,
        "p": TEXT,
        "tv": TEXT,
        "tna": TEXT,
        "duid": TEXT | st.text(min_size=250, max_size=300),
        "uid": TEXT,
        "nuid": TEXT,
        "tnuid": TEXT,
        "vid": TEXT,
        "tz": TEXT,
        "sid": TEXT | st.text(min_size=250, max_size=300),
        "dtm": TIMES,
        "ttm": TIMES,
        "stm": TIMES,
        "refr": TEXT | st.text(min_size=1000, max_size=1100),
        "lang": TEXT,
        "res": SIZES,
        "page": TEXT,
        "vp": SIZES,
        "ds": SIZES,
        "cd": SIZES,
        "pp_mix": OFFSETS,
        "pp_max": OFFSETS,
        "pp_miy": OFFSETS,
        "pp_may": OFFSETS,
        "ue_pr": _json_text(SELF_DESCRIBING),
        "ue_px": _json_text(SELF_DESCRIBING),
        "co": _json_text(CONTEXTS),
        "cx": _json_text(CONTEXTS),
        "se_ac": TEXT,
        "tr_id": TEXT,
        "ti_sk": TEXT,
        "ua": TEXT,
        "other": TEXT,
    },
)


KNOWN_FIELDS = FIELDS.map(lambda f: {k: v for k, v in f.items() if k != "other"})
Made = list[BehaviorEvent | StorefrontEvent | dict[str, Any]]


def _outcome(make: Callable[[], Made]) -> Any:
    """What ``make`` makes: each event's type, fields, record and record's JSON (a
    dict of fields, as the fast path gives a behavior event, as the model it stands
    for); or the exception it raises."""
    try:
        made = make()
    except Exception as exc:  # the same exception, whatever it is, from both paths
        return (type(exc), str(exc), getattr(exc, "kind", None))
    out = []
    for event in made:
        if isinstance(event, dict):  # every field, each as validation makes it
            assert list(event) == list(BehaviorEvent.model_fields)
            assert vars(BehaviorEvent.model_validate(event)) == event
            kind: type[Any] = BehaviorEvent
            fields, record = dict(event), behavior_fields_record(dict(event), SHOP, RECEIVED)
        else:
            assert type(event).model_validate(vars(event)) == event  # valid as built
            kind, fields = type(event), vars(event)
            record = (
                behavior_record(event, SHOP, RECEIVED)
                if isinstance(event, BehaviorEvent)
                else storefront_record(event, SHOP, RECEIVED)
            )
        out.append((kind, fields, record, orjson.dumps(record)))
    return out


def _fast(
    fields: dict[str, str], event: Any, identifier: Any, known: Any, taken: list[bool]
) -> Made:
    """``_fast``'s events, else the reference's (``_accept_fast``'s rule)."""
    taken.append(False)  # raised, if not set below
    made = snowplow._fast(SHOP, event, identifier, known)
    taken[-1] = made is not None
    return snowplow.reference_mapped(SHOP, fields) if made is None else made


def _same(*batch: dict[str, str]) -> list[bool]:
    """Assert that the events of a batch the fast path reads are mapped as the reference
    maps each; whether ``_fast`` took each one (none: the body is the reference's)."""
    try:  # as _tracked reads a body (a NUL in it or not: the mapping takes any text)
        decoded: Any = snowplow._TRACKED.decode(orjson.dumps({"schema": "x", "data": batch}))
    except msgspec.ValidationError:
        return []
    events = decoded.data
    identifiers = snowplow._uuids(events)
    known: dict[Any, Any] = {}  # the batch's, shared as _accept_fast shares it
    taken: list[bool] = []
    for fields, event, identifier in zip(batch, events, identifiers, strict=True):
        outcome = _outcome(functools.partial(_fast, fields, event, identifier, known, taken))
        reference = _outcome(functools.partial(snowplow.reference_mapped, SHOP, fields))
        assert outcome == reference, fields
    return taken


@settings(max_examples=1500, deadline=None, suppress_health_check=list(HealthCheck))
@given(batch=st.lists(KNOWN_FIELDS, min_size=1, max_size=3))
def test_the_fast_mapping_is_the_references(batch: list[dict[str, str]]) -> None:
    assert len(_same(*batch)) == len(batch)


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    fields=st.fixed_dictionaries(
        {
            "e": st.sampled_from(["pv", "pp", "ue"]),
            "url": st.just("https://shop.test/p/1"),
            "eid": st.uuids().map(str),
            "dtm": st.integers(1_700_000_000_000, 1_900_000_000_000).map(str),
            "vp": SIZES,
            "ds": SIZES,
            "ue_px": st.builds(
                lambda d: _b64(
                    {"data": {"schema": f"{snowplow.IGLU}link_click/jsonschema/1-0-1", "data": d}},
                    "url",
                ),
                LINK_DATA,
            ),
        },
        optional={
            "cx": _json_text(CONTEXTS),
            "uid": TEXT,
            "duid": TEXT,
            "pp_may": OFFSETS,
            "page": st.text(min_size=4090, max_size=4100) | TEXT,
            "refr": st.text(min_size=1020, max_size=1030) | TEXT,
            "lang": st.text(min_size=250, max_size=260) | TEXT,
            "res": st.text(min_size=60, max_size=70) | SIZES,
        },
    )
)
def test_the_fast_mapping_of_what_browsers_send_is_the_references(fields: dict[str, str]) -> None:
    """Page views, pings and link clicks as a browser tracker sends them (the fast path's
    own events, with identities and element statistics)."""
    without = {k: v for k, v in fields.items() if k != "cx"}  # the same visitor, no contexts
    _same(fields, {**fields, "e": "pp"}, {**fields, "e": "pv", "sid": "other"}, without)


LINK_CLICK = f"{snowplow.IGLU}link_click/jsonschema/1-0-1"
EID = "7d1c4b0c-3b44-4c2e-9a0e-0f3a3e1b5f01"
PAGE = {"url": "https://shop.test/p/1", "eid": EID, "dtm": "1790000000000", "aid": "wk"}
STATS = {
    "schema": "x",
    "data": [
        {
            "schema": f"{snowplow.ELEMENT_STATISTICS}0-0",
            "data": {
                "element_name": "hero",
                "total_time_visible_ms": 1200,
                "element_index": 1,
                "times_in_view": 2,
                "max_y_depth_ratio": 0.5,
            },
        },
        {"schema": "iglu:com.example/page/jsonschema/1-0-0", "data": {"id": "p"}},
    ],
}


def _ue(data: Any, schema: str = LINK_CLICK) -> str:
    return _b64({"schema": "x", "data": {"schema": schema, "data": data}}, "url")


@pytest.mark.parametrize(
    "fields",
    [
        {**PAGE, "e": "pv", "uid": "user-7", "duid": "d-1", "sid": "s", "page": "T", "res": "1x2"},
        {**PAGE, "e": "pv", "uid": "same", "duid": "same", "refr": "r" * 2000, "lang": "de"},
        {**PAGE, "e": "pp", "cx": _b64(STATS, "url"), "vp": "1x1", "ds": "1x2"},
        {**PAGE, "e": "pp", "co": json.dumps(STATS), "pp_may": "0", "vp": "10x10", "ds": "1x40"},
        {**PAGE, "e": "pp", "pp_may": "3232", "vp": "1024x768", "ds": "1024x4000"},
        {**PAGE, "e": "pp", "pp_may": "3235", "vp": "1024x768", "ds": "1024x4000"},
        {**PAGE, "e": "pp", "pp_may": "-7", "pp_mix": "x", "vp": "1024x768", "cd": "1024x4000"},
        {**PAGE, "e": "pp", "ds": "1024x0", "vp": "1024x768", "ttm": "1790000000001"},
        {**PAGE, "e": "pp", "ds": "1x0", "vp": "1x0"},
        {**PAGE, "e": "ue", "ue_px": _ue({"elementId": "b", "elementClasses": ["x", 1, ""]})},
        {**PAGE, "e": "ue", "ue_pr": json.dumps({"data": {"schema": LINK_CLICK, "data": {}}})},
        {**PAGE, "e": "ue", "ue_px": _ue({"targetUrl": {"not": "text"}, "elementTarget": 1})},
        {**PAGE, "e": "ue", "ue_px": _ue({"formId": "f"}, f"{snowplow.IGLU}submit_form/j/1-0")},
        {**PAGE, "e": "ue", "ue_px": "%%%"},
        {**PAGE, "e": "ue", "ue_px": _ue({}), "cx": "%%%"},
        {**PAGE, "e": "pv", "url": ""},
        {**PAGE, "e": "pv", "url": "u" * 4097},
        {**PAGE, "e": "pv", "eid": "not a uuid"},
        {**PAGE, "e": "pv", "eid": f"{{{EID}}}", "sid": ""},
        {**PAGE, "e": "pp", "dtm": "x", "duid": "d" * 300},
        {**PAGE, "e": "se", "se_ac": "add"},
    ],
)
def test_the_fast_mapping_of_each_case_is_the_references(fields: dict[str, str]) -> None:
    _same(fields)


def test_the_fast_path_makes_a_pings_element_times_and_a_views_identity() -> None:
    ping = {**PAGE, "e": "pp", "cx": _b64(STATS, "std")}
    view = {**PAGE, "e": "pv", "uid": "u", "duid": "d"}
    assert _same(ping, view) == [True, True]
    events = snowplow._tracked(orjson.dumps({"data": [ping, view]}), 32_768)
    assert events is not None
    made = [snowplow._fast(SHOP, e, uuid.UUID(EID), {}) for e in events]
    assert [
        [e["event_type"] if isinstance(e, dict) else e.event_type for e in m or []] for m in made
    ] == [
        ["scroll_depth", "time_on_element"],
        ["page_view", "$identify"],
    ]


def _benchmark_bodies() -> list[bytes]:
    requests = collector_bench.bodies(Target("http://x", "wk_bench"), 1, 10)["snowplow"]
    return [r.body for r in requests]


def test_the_benchmarks_events_take_the_fast_path_and_are_the_references() -> None:
    for body in _benchmark_bodies():
        batch = orjson.loads(body)["data"]
        assert _same(*batch) == [True] * len(batch)


@settings(max_examples=500, deadline=None)
@given(text=UUIDS)
def test_a_fast_uuid_is_uuid_uuids(text: str) -> None:
    fast = snowplow._uuid(text)
    if fast is not None:
        assert type(fast) is uuid.UUID
        assert (fast, fast.is_safe) == (uuid.UUID(text), uuid.UUID(text).is_safe)


@settings(max_examples=500, deadline=None)
@given(texts=st.lists(UUIDS | st.uuids().map(str) | st.none(), min_size=1, max_size=4))
def test_eids_written_as_orjson_writes_their_uuids_are_spliced_as_sent(
    texts: list[str | None],
) -> None:
    """``_written``: every eid is the text orjson writes of its UUID, the splice's."""
    body = orjson.dumps({"data": [{} if t is None else {"eid": t} for t in texts]})
    decoded: Any = snowplow._TRACKED.decode(body)
    sent = [t for t in texts if t is not None]
    if snowplow._written(decoded.data):
        assert len(sent) == len(texts)
        assert [orjson.dumps(uuid.UUID(t)) for t in sent] == [orjson.dumps(t) for t in sent]
    elif len(sent) == len(texts) and all(t.isascii() for t in sent):
        assert any(orjson.dumps(snowplow._uuid(t)) != orjson.dumps(t) for t in sent)
    one: Any = snowplow._TRACKED.decode(orjson.dumps({"data": [{"eid": EID}]}))
    assert snowplow._written(one.data)


@given(value=st.uuids())
def test_the_uuids_trackers_send_take_the_fast_path(value: uuid.UUID) -> None:
    for text in (str(value), value.hex, str(value).upper()):
        assert snowplow._uuid(text) == value


# Bodies of payload_data: events of strings mostly, escapes and whitespace of any kind,
# a key twice, a value not a string, another member beside schema and data.
STRINGS = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=8)
EVENTS = st.lists(
    st.dictionaries(st.sampled_from(["e", "eid", "url", "aid", "ua", "se_ca"]), STRINGS)
    | st.dictionaries(st.sampled_from(["e", "sid", "x\u2028", "é"]), STRINGS)
    | st.dictionaries(TEXT, JSON, max_size=3)
    | JSON,
    max_size=4,
)


def _body(document: Any, ascii_only: bool, spaced: bool, twice: bool) -> bytes:
    text = json.dumps(
        document, ensure_ascii=ascii_only, separators=(", ", ": ") if spaced else (",", ":")
    )
    if twice and isinstance(document, dict) and text.startswith("{") and len(text) > 2:
        text = '{"data": [{"e": "1", "e": "2"}], ' + text[1:]  # a member twice
    return text.encode()


@settings(max_examples=1000, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    document=st.one_of(
        st.builds(lambda e: {"schema": "x", "data": e}, EVENTS),
        st.builds(lambda e: {"data": e}, EVENTS),
        st.builds(lambda e, s: {"schema": s, "data": e}, EVENTS, JSON),
        st.builds(lambda e, o: {"schema": "x", "data": e, "other": o}, EVENTS, JSON),
        JSON,
    ),
    ascii_only=st.booleans(),
    spaced=st.booleans(),
    twice=st.booleans(),
    limit=st.sampled_from([256, 32_768]),
    cut=st.none() | st.integers(0, 200),
)
def test_the_fast_decode_is_the_references(
    document: Any, ascii_only: bool, spaced: bool, twice: bool, limit: int, cut: int | None
) -> None:
    """Whenever ``_tracked`` takes a body, orjson reads the same events from it, the
    reference's decode of such a body reads them in the same order, and no event would
    be refused by its own checks."""
    body = _body(document, ascii_only, spaced, twice)
    if cut is not None:
        body = body[:cut]
    fast = snowplow._tracked(body, limit)
    if fast is None:
        return
    data = orjson.loads(body)
    assert isinstance(data, dict) and isinstance(data["data"], list)
    sent = [
        {k: v for k, v in msgspec.structs.asdict(e).items() if v is not msgspec.UNSET} for e in fast
    ]
    assert sent == data["data"]
    payloads = snowplow._PAYLOAD_DATA.decode(body).data
    assert [list(e.items()) for e in payloads] == [list(e.items()) for e in data["data"]]
    for raw in data["data"]:
        snowplow._fields(raw)
        collector.check_encoded(raw, limit)


@pytest.mark.parametrize(
    "body",
    [
        b'{"data":[{"e":"pv","x":"\\u0000"}]}',  # a NUL: refused by the reference
        b'{"data":[{"e":"pv","x":1}]}',  # not a string
        b'{"data":[{"e":"pv"}],"x":1e999}',  # not JSON for orjson
        b'{"schema":1,"data":[]}',
        b'{"data":{}}',
        b"[]",
        b'{"data":[{"e":"pv","unknown":"x"}]}',  # a field of no tracker
        b'{"data":[{"e":null}]}',
    ],
)
def test_bodies_the_fast_decode_leaves_to_the_reference(body: bytes) -> None:
    assert snowplow._tracked(body, 32_768) is None
    assert snowplow._tracked(b'{"data":[{"e":"pv","ua":"x"}]}', 32_768) is not None


class _Sink:
    """A Delivery that keeps what it is given."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, str, list[tuple[bytes, bytes]]]] = []

    async def deliver(self, stream: str, topic: str, messages: list[tuple[bytes, bytes]]) -> None:
        self.sent.append((stream, topic, messages))


def _route(
    pg_dsn: str, db: Database, at: datetime = AT
) -> Callable[[bytes, dict[str, str] | None], Coroutine[Any, Any, None]]:
    """An app delivering to a sink, and what asserts that a body posted to it (with more
    headers) answers the same and delivers the same records by either path, received
    at ``at``."""
    settings_ = Settings(postgres_dsn=pg_dsn, kafka_bootstrap="127.0.0.1:1", rate_limit_per_s=0)
    sink = _Sink()
    app = collector.create_app(settings_, sink, ShopDirectory(db, 60))  # type: ignore[arg-type]

    async def post(body: bytes, fast: bool, more: dict[str, str]) -> tuple[int, bytes, list[Any]]:
        headers = {"Content-Type": "application/json", "Content-Length": str(len(body))}
        request = make_mocked_request(
            "POST", snowplow.POST_PATH, headers={**headers, **more}, app=app
        )
        request._read_bytes = body
        del sink.sent[:]
        answer = await snowplow._tp2(request, at, fast=fast)
        return answer.status, answer.body, list(sink.sent)  # type: ignore[attr-defined]

    async def both(body: bytes, more: dict[str, str] | None = None) -> None:
        fast, reference = await post(body, True, more or {}), await post(body, False, more or {})
        assert fast == reference, body

    return both


async def test_the_fast_route_answers_and_delivers_as_the_reference(
    pg_dsn: str, db: Database, shop: ShopCredentials
) -> None:
    """The whole route, in process: the same body received at the same time answers the
    same and delivers the same records by either path."""
    both = _route(pg_dsn, db)
    loop = asyncio.get_running_loop()
    for body in _benchmark_bodies():
        await both(body.replace(b"wk_bench", shop.write_key.encode()), None)

    @settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
    @given(events=st.lists(FIELDS, max_size=6), known=st.lists(st.booleans(), max_size=6))
    def check(events: list[dict[str, str]], known: list[bool]) -> None:
        for fields, key in zip(events, known, strict=False):
            if key:
                fields["aid"] = shop.write_key
        body = orjson.dumps({"schema": "x", "data": events})
        asyncio.run_coroutine_threadsafe(both(body, None), loop).result(30)

    await asyncio.to_thread(check)


MS = 1_796_126_400_000  # AT in ms
# Text without a NUL (a body holding one is the reference's).
PLAIN_CHARACTERS = st.characters(
    codec="utf-8", exclude_categories=["Cs"], exclude_characters="\x00"
)
PLAIN = st.text(PLAIN_CHARACTERS, max_size=12)


ABSENT: Any = object()  # a field not sent
PLAIN_SIZES = st.one_of(
    st.tuples(st.integers(0, 5000), st.integers(0, 5000)).map(lambda t: f"{t[0]}x{t[1]}"),
    st.sampled_from(["0x0", "x", "12x", "1x1x1", "-1x5", "24", "²x1"]),
    PLAIN,
)
PLAIN_OFFSETS = st.integers(-3, 5000).map(str) | st.sampled_from(["", "x", "1e3", "99999999999999"])


def _long(size: int) -> st.SearchStrategy[str]:
    """``PLAIN`` mostly, a text about ``size`` long at times."""
    long = st.text(PLAIN_CHARACTERS, min_size=size - 6, max_size=size + 6)
    return st.integers(0, 3).flatmap(lambda i: long if i == 0 else PLAIN)


def _rarely(value: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """``value`` at times, else ABSENT."""
    return st.integers(0, 6).flatmap(lambda i: value if i == 0 else st.just(ABSENT))


# What the splice writes (``_accept_fast``): pings, clicks and page views of trackers
# with a session id, a UUID eid, a dtm, no contexts, stored as they came; and the
# events beside them it leaves to _fast (a time too far ahead or past its range, an
# eid not lower case, no sid, a $identify, a clock off).
SPLICED = st.fixed_dictionaries(
    {
        "e": st.sampled_from(["pv", "pp", "ue"]),
        "url": st.sampled_from(["https://shop.test/p/1", 'https://shop.test/é?q="x"', "u" * 4096]),
        "eid": st.one_of(
            st.uuids().map(str),
            st.uuids().map(str),
            st.uuids().map(lambda u: str(u).upper()),
            st.uuids().map(lambda u: u.hex),
            st.just("12345678-1234-1234-1234-123456789012"),
        ),
        "dtm": st.integers(0, 6).flatmap(
            lambda i: (
                [
                    st.integers(MS + 299_000, MS + 301_000),  # about the latest kept
                    st.integers(3_999_999_999_000, 4_000_000_001_000),
                    st.sampled_from(["0", "-1", "x", "1_796_126_400_000", " 1796126400000"]),
                ][i].map(str)
                if i < 3
                else st.integers(MS - 10**9, MS + 10**6).map(str)
            )
        ),
        "sid": st.sampled_from(["s-1", "s-1", "s-1", "s-2", "", "ß" * 300]),
        "aid": st.just("KEY"),
        # Mostly none: any sends the event to _fast.
        "ttm": _rarely(st.sampled_from([str(MS), ""])),
        "cx": _rarely(_json_text(CONTEXTS)),
    },
    optional={
        "stm": st.sampled_from([str(MS), str(MS + 1000), str(MS - 10**9), "", "x"]),
        "duid": st.sampled_from(["d-1", "u-1", ""]),
        "uid": st.sampled_from(["u-1", ""]),
        "p": st.just("web"),
        "tv": st.just("js-4.10.1"),
        "tna": PLAIN,
        "vid": st.just("3"),
        "tz": st.just("Europe/Berlin"),
        "vp": PLAIN_SIZES,
        "ds": PLAIN_SIZES,
        "cd": PLAIN_SIZES,
        "pp_mix": PLAIN_OFFSETS,
        "pp_max": PLAIN_OFFSETS,
        "pp_miy": PLAIN_OFFSETS,
        "pp_may": PLAIN_OFFSETS,
        "ue_px": st.builds(
            lambda d: _b64(
                {"data": {"schema": f"{snowplow.IGLU}link_click/jsonschema/1-0-1", "data": d}},
                "url",
            ),
            LINK_DATA,
        )
        | SELF_DESCRIBING.map(json.dumps),
        "refr": _long(1024),
        "lang": _long(256),
        "res": _long(64),
        "page": _long(4096),
    },
).map(lambda f: {k: v for k, v in f.items() if v is not ABSENT})


# An event's own fields; the others are its tracker's, but for a few (SHARED).
OWN = frozenset(("e", "eid", "dtm", "ttm", "pp_mix", "pp_max", "pp_miy", "pp_may", "ue_px", "cx"))
SHARED = ["url", "sid", "stm", "duid", "uid", "vp", "ds", "cd", "refr", "lang", "res", "page"]


async def test_the_splice_answers_and_delivers_as_the_reference(
    pg_dsn: str, db: Database, shop: ShopCredentials
) -> None:
    """Batches of what the splice writes, beside what it leaves to _fast, mostly from a
    few trackers (their records share parts the splice writes once): the same answers
    and records by either path, anonymous requests' too."""
    both = _route(pg_dsn, db)
    loop = asyncio.get_running_loop()

    @settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
    @given(
        trackers=st.lists(SPLICED, min_size=1, max_size=3),
        events=st.lists(
            st.tuples(st.integers(0, 2), SPLICED, st.lists(st.sampled_from(SHARED), max_size=2)),
            min_size=1,
            max_size=8,
        ),
        anonymous=st.sampled_from([False, False, False, True]),
    )
    def check(
        trackers: list[dict[str, str]],
        events: list[tuple[int, dict[str, str], list[str]]],
        anonymous: bool,
    ) -> None:
        batch = []
        for which, fields, own in events:
            # A tracker's fields, the event's own, and a few of the tracker's its own.
            tracker = trackers[which % len(trackers)]
            event = {k: v for k, v in tracker.items() if k not in OWN}
            event |= {k: v for k, v in fields.items() if k in OWN or k in own}
            event = {k: v for k, v in event.items() if k in fields or k not in own}
            batch.append({k: shop.write_key if v == "KEY" else v for k, v in event.items()})
        body = orjson.dumps({"schema": "x", "data": batch})
        more = {"SP-Anonymous": "*"} if anonymous else None
        asyncio.run_coroutine_threadsafe(both(body, more), loop).result(30)

    await asyncio.to_thread(check)


async def test_the_benchmarks_events_are_spliced(
    pg_dsn: str, db: Database, shop: ShopCredentials, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every event of the benchmark's bodies (what browser trackers send most) is written
    by the splice: none is mapped by _fast (received as they were made)."""
    both = _route(pg_dsn, db, datetime.now(UTC))
    mapped: list[Any] = []
    fast = snowplow._fast

    def counted(*args: Any) -> Any:
        mapped.append(args[1])
        return fast(*args)

    monkeypatch.setattr(snowplow, "_fast", counted)
    for body in _benchmark_bodies():
        await both(body.replace(b"wk_bench", shop.write_key.encode()), None)
    assert mapped == []


@pytest.mark.parametrize("size", ["²x1", "1x①", "¹²x³⁴"])
def test_a_size_of_digits_int_cannot_read_is_no_size(size: str) -> None:
    """``str.isdigit`` is true of superscripts and circled digits, which ``int`` refuses:
    such a ``vp``, ``ds`` or ``res`` was a ValueError out of the mapping (a 500, the
    pixel's too), not a size it cannot read."""
    assert snowplow._size(size) is None
    for kind in ("pp", "pv"):
        fields = {**PAGE, "e": kind, "vp": size, "ds": size, "res": size}
        (event,) = snowplow.reference_mapped(SHOP, fields)
        assert isinstance(event, BehaviorEvent) and event.viewport_size is None
        assert _same(fields) == [True]
