"""Property-based: Snowplow's and PostHog's routes never answer a 5xx, whatever is sent."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import gzip
import http.client
import json
from urllib.parse import urlencode, urlsplit

import lzstring  # type: ignore[import-untyped]
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ingest.collector import posthog, snowplow
from ingest.core.shops import ShopCredentials

SNOWPLOW_FIELDS = [
    "e", "eid", "aid", "dtm", "stm", "ttm", "duid", "uid", "sid", "url", "refr", "res",
    "vp", "cd", "lang", "ue_pr", "ue_px", "cx", "co", "pp_mix", "pp_max", "pp_miy",
    "pp_may", "se_ca", "se_ac", "se_va", "tr_id", "ti_sk",
]  # fmt: skip
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3)
    ),
    max_leaves=10,
)
VALUES = st.one_of(
    st.text(max_size=30),
    st.sampled_from(["pv", "pp", "ue", "se", "tr", "ti", "1x1", "0x0", "99999999999999999999"]),
    JSON.map(lambda v: base64.urlsafe_b64encode(json.dumps(v).encode()).decode()),
)


def _exchange(base: str, method: str, path: str, body: bytes = b"", ctype: str = "") -> int:
    parts = urlsplit(base)
    conn = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=15)
    try:
        conn.request(method, path, body=body, headers={"Content-Type": ctype} if ctype else {})
        return conn.getresponse().status
    finally:
        conn.close()


async def test_snowplow_never_a_5xx(collector: str, shop: ShopCredentials) -> None:
    @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
    @given(
        fields=st.dictionaries(st.sampled_from(SNOWPLOW_FIELDS), VALUES, max_size=10),
        raw_query=st.text(max_size=60),
        known=st.booleans(),
        payloads=st.lists(st.dictionaries(st.sampled_from(SNOWPLOW_FIELDS), JSON, max_size=6)),
    )
    def check(
        fields: dict[str, str], raw_query: str, known: bool, payloads: list[dict[str, object]]
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
