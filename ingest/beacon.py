"""``GET /v1/beacon.js``: the browser beacon script, served by the collector."""

from __future__ import annotations

from pathlib import Path

from aiohttp import web

BEACON_JS = Path(__file__).resolve().parent / "static" / "beacon.js"


async def beacon_js(request: web.Request) -> web.Response:
    """The beacon script, cacheable for an hour."""
    return web.Response(
        body=BEACON_JS.read_bytes(),
        content_type="application/javascript",
        headers={"Cache-Control": "public, max-age=3600"},
    )


def add_routes(app: web.Application) -> None:
    """Register the beacon's routes on the collector's application."""
    app.router.add_get("/v1/beacon.js", beacon_js)
