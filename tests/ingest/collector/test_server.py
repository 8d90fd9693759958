"""The collector process's start and stop (``ingest.collector.server``)."""

from __future__ import annotations

import asyncio
import socket

from ingest.collector.server import run_collector
from ingest.core.settings import Settings


async def test_stop_while_postgres_never_answers_ends_at_once(settings: Settings) -> None:
    """PostgreSQL is a socket that accepts and never answers: start-up waits in asyncpg's
    connect (60 s by default). Before this change a stop then (SIGTERM) waited for that
    timeout; now it ends the start-up at once, nothing left running."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)  # the kernel completes the handshake; nobody ever reads
        dsn = f"postgresql://eventpipe@127.0.0.1:{silent.getsockname()[1]}/eventpipe"
        stop = asyncio.Event()
        running = asyncio.create_task(
            run_collector(settings.model_copy(update={"postgres_dsn": dsn}), stop)
        )
        await asyncio.sleep(0.5)
        assert not running.done(), "start-up should still be waiting for PostgreSQL"
        stop.set()
        await asyncio.wait_for(running, timeout=10)
