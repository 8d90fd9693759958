"""``GET /v1/beacon.js`` on the in-process collector (no browser)."""

from __future__ import annotations

import re
from typing import get_args

import aiohttp

from ingest.collector.beacon import BEACON_BODY, BEACON_ETAG
from ingest.collector.models import BehaviorType


async def test_beacon_js_is_served_cacheable(collector: str) -> None:
    async with aiohttp.ClientSession() as http, http.get(f"{collector}/v1/beacon.js") as resp:
        assert resp.status == 200
        assert resp.content_type == "application/javascript"
        assert "max-age=3600" in resp.headers["Cache-Control"]
        assert "public" in resp.headers["Cache-Control"]
        assert resp.headers["ETag"] == BEACON_ETAG
        assert resp.headers["Access-Control-Allow-Origin"] == "*"
        body = await resp.read()
    assert body == BEACON_BODY
    text = body.decode()
    assert "sendBeacon" in text and "keepalive: true" in text
    # Consent and anonymous mode (issue 23) took it past 14 KiB: ~5.5 KB gzipped.
    assert len(body) < 16 * 1024, "the beacon should stay small"


async def test_beacon_js_revalidates_with_etag(collector: str) -> None:
    async with aiohttp.ClientSession() as http:
        for tag in (BEACON_ETAG, f"W/{BEACON_ETAG}", f'"other", {BEACON_ETAG}'):
            headers = {"If-None-Match": tag}
            async with http.get(f"{collector}/v1/beacon.js", headers=headers) as resp:
                assert resp.status == 304, tag
                assert resp.headers["ETag"] == BEACON_ETAG
                assert await resp.read() == b""
        headers = {"If-None-Match": '"stale"'}
        async with http.get(f"{collector}/v1/beacon.js", headers=headers) as resp:
            assert resp.status == 200
            assert await resp.read() == BEACON_BODY


def test_beacon_knows_exactly_the_models_event_types() -> None:
    """``eventpipe.track`` refuses types the collector would refuse, and only those."""
    match = re.search(r"var TYPES = ((?:\s*\+?\s*\"[^\"]*\")+);", BEACON_BODY.decode())
    assert match is not None
    types = "".join(re.findall(r'"([^"]*)"', match.group(1))).split()
    assert types == list(get_args(BehaviorType))
