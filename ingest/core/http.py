"""The small HTTP server every long-lived process uses: the collector's routes, or a
loader's ``/metrics`` and ``/healthz``."""

from __future__ import annotations

import orjson
import prometheus_client
import structlog
from aiohttp import web

from ingest.core.errors import StartupError
from ingest.core.service import Service

log = structlog.get_logger(__name__)


async def healthz(request: web.Request) -> web.Response:
    """``GET /healthz``: the process is alive."""
    return web.Response(body=orjson.dumps({"status": "ok"}), content_type="application/json")


async def metrics_endpoint(request: web.Request) -> web.Response:
    """``GET /metrics``: Prometheus exposition of this process's metrics."""
    body = prometheus_client.generate_latest()
    return web.Response(body=body, headers={"Content-Type": prometheus_client.CONTENT_TYPE_LATEST})


def metrics_app() -> web.Application:
    """A bare application serving ``/metrics`` and ``/healthz`` (for loader processes)."""
    app = web.Application()
    app.router.add_get("/metrics", metrics_endpoint)
    app.router.add_get("/healthz", healthz)
    return app


class HttpServer(Service):
    """An aiohttp server on ``host:port``; ``stop`` stops accepting and drains requests.

    ``reuse_port`` lets several collector processes share one port (SO_REUSEPORT).
    """

    def __init__(
        self, app: web.Application, host: str, port: int, *, reuse_port: bool = False
    ) -> None:
        self.app = app
        self.host = host
        self.port = port
        self.reuse_port = reuse_port
        self._runner = web.AppRunner(
            app, access_log=None, handle_signals=False, shutdown_timeout=5.0
        )

    async def start(self) -> None:
        """Bind and start serving."""
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port, reuse_port=self.reuse_port or None)
        try:
            await site.start()
        except OSError as exc:
            await self._runner.cleanup()
            raise StartupError(
                f"cannot listen on {self.host}:{self.port}: {exc.strerror or exc}",
                hint="choose another port (--port, EVENTPIPE_COLLECTOR_PORT or "
                "EVENTPIPE_LOADER_METRICS_PORT)",
            ) from exc
        if self.port == 0:
            server = site._server
            assert server is not None
            self.port = server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]
        log.info("listening", url=self.url)

    @property
    def url(self) -> str:
        """Base URL of the server."""
        return f"http://{self.host}:{self.port}"

    async def stop(self) -> None:
        """Graceful stop."""
        await self._runner.cleanup()
