"""The baseline of the collector figures: a bare aiohttp handler that reads the body, answers 204.

python -m benchmarks.bare_server PORT
"""

from __future__ import annotations

import sys

from aiohttp import web


async def handle(request: web.Request) -> web.Response:
    """Read the whole body and answer 204, nothing else."""
    await request.read()
    return web.Response(status=204)


def main() -> None:
    """Serve every POST path on 127.0.0.1:PORT."""
    app = web.Application(client_max_size=1 << 20)
    app.router.add_post("/{tail:.*}", handle)
    app.router.add_get("/healthz", lambda request: handle(request))
    web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), access_log=None, print=None)


if __name__ == "__main__":
    main()
