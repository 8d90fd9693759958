"""``GET /v1/beacon.js``: the browser beacon script, served by the collector.

The script is read once, at import; its ETag is a hash of its bytes, so a
browser or CDN revalidates cheaply (304) after ``max-age`` and picks up a new
version as soon as the collector serves one.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from aiohttp import web

from ingest.core.headers import printable_ascii

BEACON_JS = Path(__file__).resolve().parent / "static" / "beacon.js"
BEACON_BODY = BEACON_JS.read_bytes()
BEACON_ETAG = f'"{hashlib.sha256(BEACON_BODY).hexdigest()[:32]}"'
CACHE_CONTROL = "public, max-age=3600, stale-while-revalidate=86400"

_HEADERS = {
    "Cache-Control": CACHE_CONTROL,
    "ETag": BEACON_ETAG,
    "Access-Control-Allow-Origin": "*",
    "X-Content-Type-Options": "nosniff",
}


def _matches(if_none_match: str) -> bool:
    tags = {tag.strip().removeprefix("W/") for tag in if_none_match.split(",")}
    return "*" in tags or BEACON_ETAG in tags


async def beacon_js(request: web.Request) -> web.Response:
    """The beacon script: cacheable for an hour, 304 when the client's ETag is current."""
    if _matches(request.headers.get("If-None-Match", "")):
        return web.Response(status=304, headers=_HEADERS)
    return web.Response(
        body=BEACON_BODY,
        content_type="application/javascript",
        charset="utf-8",
        headers=_HEADERS,
    )


# How long a browser (or CDN) may reuse a shop's beacon configuration: a change of the
# shop's consent_required reaches pages within this (plus the collector's key cache).
CONFIG_MAX_AGE_S = 300


async def beacon_config(request: web.Request) -> web.Response:
    """``GET /v1/beacon/config?k=KEY``: what the beacon of a shop must know before it sends
    anything: ``consent_required`` (the shop's setting, else the collector's default).
    Public and cacheable: it says nothing a page's source does not (the key is in it)."""
    from ingest.collector import app as collector  # builds on this module

    key = printable_ascii(request.query.get("k"))
    shop = await request.app[collector.SHOPS].by_write_key(key) if key else None
    if shop is None:
        return web.json_response(
            {"error": "missing or unknown write key (query k)"},
            status=401,
            headers={"Cache-Control": "no-store"},
        )
    required = shop.privacy.consent_required
    if required is None:
        required = request.app[collector.SETTINGS].consent_required
    return web.json_response(
        {"consent_required": required},
        headers={"Cache-Control": f"public, max-age={CONFIG_MAX_AGE_S}"},
    )


def add_routes(app: web.Application) -> None:
    """Register the beacon's routes on the collector's application."""
    app.router.add_get("/v1/beacon.js", beacon_js)
    app.router.add_get("/v1/beacon/config", beacon_config)
