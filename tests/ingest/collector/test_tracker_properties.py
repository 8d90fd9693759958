"""Property-based: Snowplow's, PostHog's and the Segment API's routes never answer a 5xx,
whatever is sent."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import gzip
import http.client
import json
from urllib.parse import urlencode, urlsplit

import lzstring  # type: ignore[import-untyped]
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from ingest.collector import posthog, segment, snowplow
from ingest.core.shops import ShopCredentials

SNOWPLOW_FIELDS = [
    "e", "eid", "aid", "dtm", "stm", "ttm", "duid", "uid", "sid", "url", "refr", "res",
    "vp", "cd", "lang", "ue_pr", "ue_px", "cx", "co", "pp_mix", "pp_max", "pp_miy",
    "pp_may", "se_ca", "se_ac", "se_va", "tr_id", "ti_sk", "ds",
]  # fmt: skip
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3)
    ),
    max_leaves=10,
)
# Entities and events the mapping reads into (element statistics on a page ping,
# forms), with arbitrary data: JSON for co / ue_pr, base64url for cx / ue_px.
SNOWPLOW_JSON = st.one_of(
    st.builds(
        lambda data: {
            "schema": "iglu:com.snowplowanalytics.snowplow/contexts/jsonschema/1-0-0",
            "data": [{"schema": f"{snowplow.ELEMENT_STATISTICS}0-0", "data": data}],
        },
        st.fixed_dictionaries(
            {},
            optional={
                "element_name": JSON,
                "total_time_visible_ms": JSON | st.integers(),
                "element_index": JSON,
                "times_in_view": JSON,
                "max_y_depth_ratio": JSON,
            },
        ),
    ),
    st.builds(
        lambda schema, data: {"schema": "x", "data": {"schema": schema, "data": data}},
        st.sampled_from(
            [
                f"{snowplow.FORM_ABANDON}0-0",
                f"{snowplow.IGLU}submit_form/jsonschema/1-0-0",
                f"{snowplow.IGLU}focus_form/jsonschema/1-0-0",
                f"{snowplow.IGLU}link_click/jsonschema/1-0-1",
            ]
        ),
        st.dictionaries(
            st.sampled_from(["formId", "elementId", "formClasses", "elementClasses", "value"]),
            JSON,
        ),
    ),
)
VALUES = st.one_of(
    st.text(max_size=30),
    SNOWPLOW_JSON.map(json.dumps),
    SNOWPLOW_JSON.map(lambda v: base64.urlsafe_b64encode(json.dumps(v).encode()).decode()),
    st.sampled_from(["pv", "pp", "ue", "se", "tr", "ti", "1x1", "0x0", "99999999999999999999"]),
    JSON.map(lambda v: base64.urlsafe_b64encode(json.dumps(v).encode()).decode()),
)


def _exchange(base: str, method: str, path: str, body: bytes = b"", ctype: str = "") -> int:
    return _answer(base, method, path, body, {"Content-Type": ctype} if ctype else {})[0]


def _answer(
    base: str, method: str, path: str, body: bytes, headers: dict[str, str]
) -> tuple[int, bytes]:
    parts = urlsplit(base)
    conn = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=15)
    try:
        conn.request(method, path, body=body, headers=headers)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


async def test_snowplow_never_a_5xx(collector: str, shop: ShopCredentials) -> None:
    @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
    @given(
        fields=st.dictionaries(st.sampled_from(SNOWPLOW_FIELDS), VALUES, max_size=10),
        raw_query=st.text(max_size=60),
        known=st.booleans(),
        payloads=st.lists(st.dictionaries(st.sampled_from(SNOWPLOW_FIELDS), JSON, max_size=6)),
        mapped=st.fixed_dictionaries(
            {
                "e": st.sampled_from(["pp", "ue", "pv"]),
                "url": st.just("https://shop.test/"),
                "co": SNOWPLOW_JSON.map(json.dumps),
                "ue_pr": SNOWPLOW_JSON.map(json.dumps),
            },
            optional={k: VALUES for k in ("uid", "duid", "eid", "vp", "ds", "pp_may", "dtm")},
        ),
    )
    def check(
        fields: dict[str, str],
        raw_query: str,
        known: bool,
        payloads: list[dict[str, object]],
        mapped: dict[str, str],
    ) -> None:
        if known:
            fields["aid"] = shop.write_key
        query = urlencode(fields)
        status = _exchange(collector, "GET", f"/i?{query}")
        assert status in (200, 429, 503), (fields, status)
        raw = raw_query.encode("utf-8", "surrogatepass").hex()  # arbitrary bytes, escaped
        status = _exchange(
            collector, "GET", "/i?" + "".join(f"%{raw[i : i + 2]}" for i in range(0, len(raw), 2))
        )
        assert status < 500
        body = json.dumps({"schema": "x", "data": [fields, *payloads]}).encode()
        status = _exchange(collector, "POST", snowplow.POST_PATH, body, "application/json")
        assert status < 500, (payloads, status)
        # Events the mapping reads far into (stats, forms, identities), known app id.
        body = json.dumps({"schema": "x", "data": [{**mapped, "aid": shop.write_key}]}).encode()
        status = _exchange(collector, "POST", snowplow.POST_PATH, body, "application/json")
        event(f"mapped: {status}")
        assert status in (200, 400, 429, 503), (mapped, status)

    await asyncio.to_thread(check)


async def test_posthog_never_a_5xx(collector: str, shop: ShopCredentials) -> None:
    lz = lzstring.LZString()
    event = json.dumps(
        [{"event": "x", "properties": {"distinct_id": "d", "token": shop.write_key}}]
    )
    good_lz = lz.compressToBase64(event)
    good_gzip = gzip.compress(event.encode())

    @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
    @given(
        body=st.one_of(
            st.binary(max_size=300),
            st.integers(0, len(good_gzip)).map(lambda n: good_gzip[:n]),  # truncated gzip
            st.integers(0, len(good_lz)).map(lambda n: good_lz[:n].encode()),  # truncated lz
            st.text(max_size=80).map(str.encode),  # corrupt base64
            JSON.map(lambda v: json.dumps(v).encode()),
        ),
        path=st.sampled_from(posthog.CAPTURE_PATHS),
        compression=st.sampled_from(["", "gzip-js", "lz64", "lz-string", "base64", "zz"]),
        form=st.booleans(),
    )
    def check(body: bytes, path: str, compression: str, form: bool) -> None:
        target = f"{path}?compression={compression}" if compression else path
        if form:
            payload = urlencode({"data": body.decode("latin-1")}).encode()
            status = _exchange(collector, "POST", target, payload, posthog.FORM)
        else:
            status = _exchange(collector, "POST", target, body, "text/plain")
        assert status < 500, (body[:100], path, compression, form, status)
        query = urlencode({"data": body.decode("latin-1"), "compression": compression})
        assert _exchange(collector, "GET", f"{path}?{query}") < 500

    await asyncio.to_thread(check)


SEGMENT_FIELDS = [
    "type", "event", "name", "properties", "traits", "context", "anonymousId", "userId",
    "groupId", "previousId", "messageId", "timestamp", "originalTimestamp", "sentAt",
    "integrations", "writeKey",
]  # fmt: skip
SEGMENT_VALUES = st.one_of(
    JSON,
    st.sampled_from([*segment.TYPES, "", "2026-11-30T10:00:00Z", "not a time", 10**30]),
)
SEGMENT_MESSAGE = st.dictionaries(st.sampled_from(SEGMENT_FIELDS), SEGMENT_VALUES, max_size=8)


async def test_segment_never_a_5xx_and_counts_every_message(
    collector: str, shop: ShopCredentials
) -> None:
    """Any body on any route of the Segment API, keyed any of its ways: never a 5xx; a
    200 accounts for every message of the batch (accepted or rejected with its index),
    and a good message in it is accepted whatever its neighbours are."""
    basic = "Basic " + base64.b64encode(f"{shop.write_key}:".encode()).decode()
    keys = {
        "basic": ({"Authorization": basic}, ""),
        "header": ({"X-Write-Key": f"{shop.write_key}:secret"}, ""),
        "query": ({}, f"?writeKey={shop.write_key}"),
        "body": ({}, ""),
        "bad": ({"Authorization": "Basic " + base64.b64encode(b"wk_bad:").decode()}, ""),
        "garbled": ({"Authorization": "Basic %%%"}, ""),
    }
    batch_paths = [*segment.BATCH_PATHS, segment.IMPORT_PATH]
    message_paths = [*segment.message_paths(), "/api/s/track", "/api/s/s2s/page", "/api/s/x"]
    good = {"type": "track", "event": "good", "anonymousId": "a"}

    @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
    @given(
        batched=st.booleans(),
        data=st.data(),
        messages=st.lists(st.one_of(SEGMENT_MESSAGE, JSON), max_size=5),
        with_good=st.booleans(),
        shared=st.one_of(st.none(), JSON),
        key=st.sampled_from(list(keys)),  # good keys first: hypothesis favours them
        compress=st.booleans(),
        ctype=st.sampled_from(["application/json", "text/plain", ""]),
        raw=st.none() | st.binary(max_size=200),  # mostly JSON, sometimes any bytes
    )
    def check(
        batched: bool,
        data: st.DataObject,
        messages: list[object],
        with_good: bool,
        shared: object,
        key: str,
        compress: bool,
        ctype: str,
        raw: bytes | None,
    ) -> None:
        headers, query = keys[key]
        messages = list(messages)
        if with_good:
            messages.append(good)
        if batched:
            path = data.draw(st.sampled_from(batch_paths))
            document: object = {"batch": messages, "context": shared}
        else:
            path = data.draw(st.sampled_from(message_paths))
            document = messages[-1] if messages else shared
        if key == "body" and isinstance(document, dict):
            document = {**document, "writeKey": shop.write_key}
        body = json.dumps(document).encode() if raw is None else raw
        sent = {**headers, **({"Content-Type": ctype} if ctype else {})}
        if compress:
            body = gzip.compress(body)
            sent["Content-Encoding"] = "gzip"
        status, answer = _answer(collector, "POST", path + query, body, sent)
        assert status < 500, (path, document, status)
        event(f"{'batch' if batched else 'message'} {status}")
        if not batched or status not in (200, 400, 413):
            return
        result = json.loads(answer)
        if "rejected" not in result:  # refused whole: not JSON, not a batch
            assert status != 200 and "error" in result, (status, result)
            return
        # Every message accounted for: accepted, or rejected with its index and reason.
        assert result["success"] is (status == 200)
        indexes = [r["index"] for r in result["rejected"]]
        assert result["accepted"] + len(indexes) == len(messages), (messages, result)
        assert indexes == sorted(set(indexes))
        assert all(r["reason"] for r in result["rejected"])
        assert (status == 200) == (result["accepted"] > 0 or not indexes)
        if with_good:  # a good message is taken whatever its neighbours are
            assert len(messages) - 1 not in indexes, (messages, shared, result)

    await asyncio.to_thread(check)


# The reference package reads code points as 16-bit units: text within the BMP.
BMP = st.characters(max_codepoint=0xFFFF, exclude_categories=["Cs"])


@settings(max_examples=200, deadline=None)
@given(text=st.text(alphabet=BMP, max_size=300), cut=st.integers(0, 400))
def test_the_bounded_lz_decoder_is_lz_strings(text: str, cut: int) -> None:
    encoded = lzstring.LZString().compressToBase64(text)
    assert posthog.lz_decompress_base64(encoded, 10_000) == text
    # Truncated: an error of its own (or a shorter text), never another exception.
    with contextlib.suppress(posthog.LzError):
        posthog.lz_decompress_base64(encoded[:cut], 10_000)
