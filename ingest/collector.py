"""The collector process: database pool, shop directory, producer and HTTP server, in order."""

from __future__ import annotations

import asyncio
import contextlib

import structlog

from ingest.app import HttpServer, create_app
from ingest.db import Database
from ingest.producer import EventProducer
from ingest.settings import Settings
from ingest.shops import ShopDirectory

log = structlog.get_logger(__name__)


async def run_collector(settings: Settings, stop: asyncio.Event) -> None:
    """Serve until ``stop`` is set, then stop accepting, drain requests and flush the producer."""
    async with contextlib.AsyncExitStack() as stack:
        db = await stack.enter_async_context(Database(settings.dsn, max_size=4))
        producer = await stack.enter_async_context(EventProducer(settings))
        app = create_app(settings, producer, ShopDirectory(db, settings.write_key_cache_seconds))
        server = await stack.enter_async_context(
            HttpServer(app, settings.collector_host, settings.collector_port)
        )
        log.info("collector ready", url=server.url)
        await stop.wait()
        log.info("collector stopping")
