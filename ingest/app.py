"""The collector's HTTP application (aiohttp): authenticate, validate, enrich, produce."""

from __future__ import annotations

from datetime import UTC, datetime
from types import TracebackType
from typing import Any

import orjson
import prometheus_client
import pydantic
import structlog
from aiohttp import web

from ingest import beacon
from ingest.enrich import behavior_record
from ingest.errors import StartupError
from ingest.models import BatchEnvelope, BehaviorEvent
from ingest.producer import EventProducer, ProduceFailed
from ingest.settings import Settings
from ingest.shops import Shop, ShopDirectory

log = structlog.get_logger(__name__)

SETTINGS = web.AppKey("settings", Settings)
PRODUCER = web.AppKey("producer", EventProducer)
SHOPS = web.AppKey("shops", ShopDirectory)


def _error(status: int, reason: str, **extra: Any) -> web.Response:
    return web.json_response({"error": reason, **extra}, status=status, dumps=_dumps)


def _dumps(obj: Any) -> str:
    return orjson.dumps(obj).decode()


def _reason(exc: pydantic.ValidationError) -> str:
    first = exc.errors()[0]
    where = ".".join(str(p) for p in first["loc"])
    return f"{where}: {first['msg']}" if where else str(first["msg"])


async def _read_batch(
    request: web.Request,
) -> tuple[BatchEnvelope, None] | tuple[None, web.Response]:
    try:
        body = await request.read()
    except web.HTTPRequestEntityTooLarge:
        limit = request.app[SETTINGS].max_body_bytes
        return None, _error(413, f"body larger than max_body_bytes={limit}")
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        return None, _error(400, f"body is not JSON: {exc}")
    if isinstance(data, list):
        data = {"events": data}
    try:
        envelope = BatchEnvelope.model_validate(data)
    except pydantic.ValidationError as exc:
        return None, _error(400, f"body is not a batch: {_reason(exc)}")
    limit = request.app[SETTINGS].max_events_per_batch
    if len(envelope.events) > limit:
        return None, _error(
            413, f"batch has {len(envelope.events)} events, max_events_per_batch={limit}"
        )
    return envelope, None


async def _shop(request: web.Request, envelope: BatchEnvelope) -> Shop | None:
    key = request.query.get("k") or request.headers.get("X-Write-Key") or envelope.write_key
    if not key:
        return None
    return await request.app[SHOPS].by_write_key(key)


async def post_behavior(request: web.Request) -> web.Response:
    """``POST /v1/behavior``: a batch of behavior events, accepted one by one."""
    received_at = datetime.now(UTC)
    envelope, failure = await _read_batch(request)
    if failure is not None:
        return failure
    assert envelope is not None
    shop = await _shop(request, envelope)
    if shop is None:
        return _error(
            401, "missing or unknown write key (query k, header X-Write-Key, or body write_key)"
        )
    messages: list[tuple[bytes, bytes]] = []
    rejected: list[dict[str, Any]] = []
    for index, raw in enumerate(envelope.events):
        try:
            event = BehaviorEvent.model_validate(raw)
        except pydantic.ValidationError as exc:
            rejected.append({"index": index, "reason": _reason(exc)})
            continue
        record = behavior_record(event, shop, received_at)
        messages.append((f"{shop.id}:{event.session_id}".encode(), orjson.dumps(record)))
    if messages:
        settings = request.app[SETTINGS]
        try:
            await request.app[PRODUCER].send_batch(settings.topic_behavior, messages)
        except ProduceFailed as exc:
            log.warning("produce failed", error=str(exc), events=len(messages))
            return web.json_response(
                {"error": "event broker unavailable, retry later"},
                status=503,
                headers={"Retry-After": "5"},
            )
    status = 400 if rejected and not messages else 200
    return web.json_response(
        {"accepted": len(messages), "rejected": rejected}, status=status, dumps=_dumps
    )


async def healthz(request: web.Request) -> web.Response:
    """``GET /healthz``: the process is alive."""
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """``GET /readyz``: the broker is reachable, so accepted events can be promised."""
    if await request.app[PRODUCER].ready():
        return web.json_response({"status": "ready"})
    return web.json_response({"status": "broker unreachable"}, status=503)


async def metrics(request: web.Request) -> web.Response:
    """``GET /metrics``: Prometheus exposition of this process's metrics."""
    body = prometheus_client.generate_latest()
    return web.Response(body=body, headers={"Content-Type": prometheus_client.CONTENT_TYPE_LATEST})


def metrics_app() -> web.Application:
    """A bare application serving ``/metrics`` and ``/healthz`` (for loader processes)."""
    app = web.Application()
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    return app


def create_app(
    settings: Settings, producer: EventProducer, shops: ShopDirectory
) -> web.Application:
    """The aiohttp application with every collector route."""
    app = web.Application(client_max_size=settings.max_body_bytes)
    app[SETTINGS] = settings
    app[PRODUCER] = producer
    app[SHOPS] = shops
    app.router.add_post("/v1/behavior", post_behavior)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    beacon.add_routes(app)
    return app


class HttpServer:
    """The collector's HTTP server on ``settings.collector_host:collector_port``.

    ``stop`` stops accepting, lets requests in flight finish, then returns.
    """

    def __init__(self, app: web.Application, host: str, port: int) -> None:
        self.app = app
        self.host = host
        self.port = port
        self._runner = web.AppRunner(
            app, access_log=None, handle_signals=False, shutdown_timeout=5.0
        )

    async def start(self) -> None:
        """Bind and start serving."""
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
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
        log.info("collector listening", url=self.url)

    @property
    def url(self) -> str:
        """Base URL of the server."""
        return f"http://{self.host}:{self.port}"

    async def stop(self) -> None:
        """Graceful stop."""
        await self._runner.cleanup()

    async def __aenter__(self) -> HttpServer:
        await self.start()
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()
