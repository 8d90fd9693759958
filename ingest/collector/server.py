"""The collector process: pool, shop directory, producer, spool and HTTP server, in order."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
from collections.abc import AsyncIterator

import structlog

from ingest.collector.app import create_app
from ingest.collector.delivery import Delivery
from ingest.collector.spool import Spool
from ingest.core import metrics, streams
from ingest.core.db import Database
from ingest.core.http import HttpServer
from ingest.core.producer import EventProducer
from ingest.core.runtime import LoopMonitor, tune_gc, until_stopped
from ingest.core.settings import Settings
from ingest.core.shops import ShopDirectory
from ingest.core.supervisor import Child, Supervisor

log = structlog.get_logger(__name__)


def spool_for(settings: Settings) -> Spool | None:
    """This worker's spool (``<state>/spool/w<index>``), or None when spooling is off."""
    if not settings.spool_enabled:
        return None
    directory = settings.state_dir / "spool" / f"w{settings.collector_worker_index}"
    return Spool(directory, settings.spool_max_bytes)


@contextlib.asynccontextmanager
async def serving(
    settings: Settings, db: Database, *, key_cache_s: float | None = None, spool: bool = True
) -> AsyncIterator[tuple[HttpServer, Delivery]]:
    """Producer, delivery (with this worker's spool unless ``spool`` is False) and HTTP
    server, started in order and stopped in reverse: the collector of one process."""
    ttl = settings.write_key_cache_seconds if key_cache_s is None else key_cache_s
    metrics.init_collector(
        spool_max_bytes=settings.spool_max_bytes if spool and settings.spool_enabled else 0,
        spool_high_water=settings.spool_high_water,
        streams=[*streams.STREAMS, "webhook"],
    )
    async with contextlib.AsyncExitStack() as stack:
        # The broker may be down right now: the collector serves from the spool
        # meanwhile, which is what the spool is for (the producer keeps connecting).
        producer = await stack.enter_async_context(
            EventProducer(settings, connect_in_background=True)
        )
        delivery = await stack.enter_async_context(
            Delivery(settings, producer, spool_for(settings) if spool else None)
        )
        server = await stack.enter_async_context(
            HttpServer(
                create_app(settings, delivery, ShopDirectory(db, ttl)),
                settings.collector_host,
                settings.collector_port,
                reuse_port=settings.collector_reuse_port,
            )
        )
        yield server, delivery


async def run_collector(settings: Settings, stop: asyncio.Event) -> None:
    """Serve until ``stop`` is set; then stop accepting, finish requests, flush or spool."""
    async with contextlib.AsyncExitStack() as stack:

        async def start() -> HttpServer:
            db = await stack.enter_async_context(Database(settings.dsn, max_size=4))
            server, _ = await stack.enter_async_context(serving(settings, db))
            return server

        server = await until_stopped(start(), stop)
        if server is None:  # stopped while connecting: what started closes on the way out
            return
        tune_gc(settings)
        await stack.enter_async_context(LoopMonitor())
        log.info("collector ready", url=server.url, worker=settings.collector_worker_index)
        await stop.wait()
        log.info("collector stopping: draining requests")


async def run_collector_workers(settings: Settings, stop: asyncio.Event) -> int:
    """``collector_workers`` processes on one port (SO_REUSEPORT), each with its own spool."""
    argv = [sys.executable, "-m", "ingest.cli", "collector"]
    children = [
        Child(
            f"collector-{i}",
            argv,
            env={
                "EVENTPIPE_COLLECTOR_WORKER_INDEX": str(i),
                "EVENTPIPE_COLLECTOR_WORKERS": "1",  # a worker serves; it doesn't spawn
                "EVENTPIPE_COLLECTOR_REUSE_PORT": "true",
            },
        )
        for i in range(settings.collector_workers)
    ]
    # A worker that keeps exiting is restarted with backoff, never given up on.
    async with Supervisor(children, {**os.environ, **settings.to_env()}) as supervisor:
        await supervisor.wait(stop)
    return 0
