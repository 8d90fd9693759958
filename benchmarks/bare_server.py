"""The baseline of the collector figures: a bare aiohttp handler that reads the body, answers 204.

python -m benchmarks.bare_server PORT [--reuse-port]

It runs as the collector does: the same ``HttpServer`` (runner, site and its
options), the same ``client_max_size``, the same event loop policy
(``settings.event_loop``, as the collector's), the same interpreter tuning (``tune_gc``), so the
ratio of the two is what the collector's own work costs. ``--reuse-port`` lets
several share the port, as ``collector --workers N`` does.
"""

from __future__ import annotations

import asyncio
import signal
import sys

from aiohttp import web

from ingest.core import runtime
from ingest.core.http import HttpServer
from ingest.core.runtime import tune_gc
from ingest.core.settings import Settings


async def handle(request: web.Request) -> web.Response:
    """Read the whole body and answer 204, nothing else."""
    await request.read()
    return web.Response(status=204)


async def serve(port: int, reuse_port: bool = False) -> None:
    """Serve every POST path, and GET /healthz, on 127.0.0.1:PORT until SIGTERM."""
    settings = Settings()
    app = web.Application(client_max_size=settings.max_body_bytes)
    app.router.add_post("/{tail:.*}", handle)
    app.router.add_get("/healthz", handle)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with HttpServer(app, "127.0.0.1", port, reuse_port=reuse_port):
        tune_gc(settings)
        await stop.wait()


def main() -> None:
    """Entry point: ``python -m benchmarks.bare_server PORT``."""
    runtime.run(serve(int(sys.argv[1]), "--reuse-port" in sys.argv[2:]), Settings().event_loop)


if __name__ == "__main__":
    main()
