"""Loader processes: the loaders of one process with their metrics server, and a
supervised group of loader processes.

The pipeline itself (a stream's topic into its table) is ``consumers.loader``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
from typing import Any

import prometheus_client
import structlog
from aiohttp import web

from consumers.loader import Loader
from consumers.rows import TableSpec
from ingest.core import metrics
from ingest.core.db import Database
from ingest.core.http import HttpServer, healthz
from ingest.core.runtime import LoopMonitor, tune_gc, until_stopped
from ingest.core.settings import Settings
from ingest.core.supervisor import Child, Supervisor
from ingest.partitions import PartitionManager
from ingest.rollups import export_gauges as export_rollup_gauges

log = structlog.get_logger(__name__)


async def _loader_metrics(request: web.Request) -> web.Response:
    """``GET /metrics`` of a loader process: its metrics, not the collector's (a loader
    has no spool and no producer: their zeros would pollute the collectors' panels)."""
    body = prometheus_client.generate_latest(metrics.LOADER_REGISTRY)
    return web.Response(body=body, headers={"Content-Type": prometheus_client.CONTENT_TYPE_LATEST})


def loader_metrics_app() -> web.Application:
    """``/metrics`` and ``/healthz`` of a loader process."""
    app = web.Application()
    app.router.add_get("/metrics", _loader_metrics)
    app.router.add_get("/healthz", healthz)
    return app


async def _start_loaders(
    stack: contextlib.AsyncExitStack, settings: Settings, specs: list[TableSpec]
) -> tuple[Database, PartitionManager, list[Loader]]:
    """The metrics server, the pool and one started loader per spec, on ``stack``."""
    if settings.loader_metrics_port:
        await stack.enter_async_context(
            HttpServer(loader_metrics_app(), settings.collector_host, settings.loader_metrics_port)
        )
    db = await stack.enter_async_context(Database(settings.dsn, max_size=2 + len(specs)))
    partitions = PartitionManager.from_settings(
        db, settings, role=await db.role_for(settings.partition_role)
    )
    loaders = [Loader(settings, spec, db, partitions) for spec in specs]
    # Joining a consumer group takes seconds: join all streams at once.
    await asyncio.gather(*(stack.enter_async_context(loader) for loader in loaders))
    return db, partitions, loaders


async def run_loaders(settings: Settings, specs: list[TableSpec], stop: asyncio.Event) -> None:
    """Run one loader per spec until ``stop`` is set; a loader that fails ends the process."""
    # Every series an alert reads exists before the first scrape can come: the
    # metrics server answers while the loaders still connect (seconds).
    for spec in specs:
        metrics.init_loader(spec.table, settings.topic_for(spec.stream))
    async with contextlib.AsyncExitStack() as stack:
        started = await until_stopped(_start_loaders(stack, settings, specs), stop)
        if started is None:  # stopped while connecting: what started is closed on the way out
            return
        db, partitions, loaders = started
        tune_gc(settings)
        await stack.enter_async_context(LoopMonitor())
        gauges = asyncio.create_task(
            refresh_partition_gauges(partitions, settings.partition_status_refresh_s, stop)
        )
        rollup_gauges = asyncio.create_task(
            export_rollup_gauges(
                db, settings.rollup_status_refresh_s, settings.rollup_max_lag_s, stop
            )
        )
        stopped = asyncio.create_task(stop.wait())
        tasks: list[asyncio.Task[Any]] = [stopped, *(loader.task for loader in loaders)]
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        stopped.cancel()
        gauges.cancel()
        rollup_gauges.cancel()
        for task in done:
            if task is not stopped and (error := task.exception()) is not None:
                raise error


async def refresh_partition_gauges(
    partitions: PartitionManager, every_s: float, stop: asyncio.Event
) -> None:
    """Read the partition catalog every ``every_s`` and set the partition gauges
    (``eventpipe_partitions_missing_ahead``, ``_retention_overdue``), until ``stop``.

    Loader processes are long-lived and scraped, unlike ``partitions maintain``
    (a CronJob or a loop) and ``partitions status``: partition health is read
    from the catalog itself, so it tells whatever maintained it, or failed to.
    """
    if every_s <= 0:
        return
    while not stop.is_set():
        try:
            await partitions.status()
        except Exception as exc:  # PostgreSQL away: the last figures stay, try again later
            log.warning("cannot read partition status for the gauges", error=str(exc))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), every_s)


async def run_loader_processes(
    settings: Settings, stream: str, processes: int, stop: asyncio.Event
) -> int:
    """Run ``processes`` loader processes of ``stream`` in one consumer group, supervised.

    Each child gets its own metrics port (``loader_metrics_port + i``) when one is set.
    """
    argv = [sys.executable, "-m", "ingest.cli", "loader", "--stream", stream]
    children = [
        Child(
            f"loader-{i}",
            argv,
            env={
                "EVENTPIPE_LOADER_METRICS_PORT": str(
                    settings.loader_metrics_port + i if settings.loader_metrics_port else 0
                )
            },
        )
        for i in range(processes)
    ]
    async with Supervisor(children, {**os.environ, **settings.to_env()}) as supervisor:
        failed = await supervisor.wait(stop)
    if failed:
        log.error("loader processes failed", reason=supervisor.failure)
        return 1
    return 0
