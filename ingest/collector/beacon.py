"""``GET /v1/beacon.js``: the browser beacon script, served by the collector.

The script is read once, at import; its ETag is a hash of its bytes, so a
browser or CDN revalidates cheaply (304) after ``max-age`` and picks up a new
version as soon as the collector serves one.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from aiohttp import web

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


def add_routes(app: web.Application) -> None:
    """Register the beacon's routes on the collector's application."""
    app.router.add_get("/v1/beacon.js", beacon_js)
