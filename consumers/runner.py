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

import structlog

from consumers.loader import Loader
from consumers.rows import TableSpec
from ingest.core.db import Database
from ingest.core.http import HttpServer, metrics_app
from ingest.core.runtime import tune_gc
from ingest.core.settings import Settings
from ingest.core.supervisor import Child, Supervisor
from ingest.partitions import PartitionManager

log = structlog.get_logger(__name__)


async def run_loaders(settings: Settings, specs: list[TableSpec], stop: asyncio.Event) -> None:
    """Run one loader per spec until ``stop`` is set; a loader that fails ends the process."""
    async with contextlib.AsyncExitStack() as stack:
        if settings.loader_metrics_port:
            await stack.enter_async_context(
                HttpServer(metrics_app(), settings.collector_host, settings.loader_metrics_port)
            )
        db = await stack.enter_async_context(Database(settings.dsn, max_size=2 + len(specs)))
        partitions = PartitionManager.from_settings(
            db, settings, role=await db.role_for(settings.partition_role)
        )
        loaders = [Loader(settings, spec, db, partitions) for spec in specs]
        # Joining a consumer group takes seconds: join all streams at once.
        await asyncio.gather(*(stack.enter_async_context(loader) for loader in loaders))
        tune_gc(settings)
        stopped = asyncio.create_task(stop.wait())
        tasks: list[asyncio.Task[Any]] = [stopped, *(loader.task for loader in loaders)]
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        stopped.cancel()
        for task in done:
            if task is not stopped and (error := task.exception()) is not None:
                raise error


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
