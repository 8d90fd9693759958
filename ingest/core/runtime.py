"""Process-wide tuning of the interpreter for the hot processes (collector, loader)."""

from __future__ import annotations

import asyncio
import contextlib
import gc
from collections.abc import Coroutine
from typing import Any, Literal, TypeVar

from ingest.core import metrics
from ingest.core.service import Service
from ingest.core.settings import Settings

T = TypeVar("T")


def run(main: Coroutine[Any, Any, T], loop: Literal["asyncio", "uvloop"] = "asyncio") -> T:
    """Run ``main`` to completion on the event loop ``loop`` names.

    The collector runs on ``settings.event_loop``: asyncio's loop by default, since
    uvloop measured no cheaper per request in the collector under wrk (three
    alternating rounds, ``benchmarks/README.md``); uvloop stays a setting away
    for a platform where it is. Every other command runs on the standard loop,
    whose subprocess API ``up`` and the embedded PostgreSQL use in full
    (uvloop's refuses ``user=``, for one).
    """
    if loop == "uvloop":
        import uvloop

        return uvloop.run(main)
    return asyncio.run(main)


def tune_gc(settings: Settings) -> None:
    """Freeze what start-up allocated and collect the young generation less often.

    The collector and the loaders allocate many short-lived, acyclic containers
    per request or batch (parsed events, models, rows), and the default
    threshold of 700 allocations makes the cyclic collector traverse each
    batch's objects many times over. Measured by ``benchmarks/loader_bench.py``:
    the loader's Python time per row drops by about a fifth. Cycles are still
    collected, just in fewer, larger passes. Objects made before this call
    (modules, settings, pools) are frozen out of every later pass.
    """
    if metrics.GC_PAUSES.hook not in gc.callbacks:  # timed whatever the threshold
        gc.callbacks.append(metrics.GC_PAUSES.hook)
    if settings.gc_gen0_threshold <= 0:
        return
    gc.collect()
    gc.freeze()
    _, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(settings.gc_gen0_threshold, gen1, gen2)


class LoopMonitor(Service):
    """Measures how late the event loop runs a task that sleeps ``interval_s``
    (``eventpipe_event_loop_lag_seconds``): a collection, a slow callback or a
    starved core each show as lag, which a latency figure alone cannot tell from
    the network or the broker."""

    def __init__(self, interval_s: float = 0.05) -> None:
        self.interval_s = interval_s
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Start probing."""
        self._task = asyncio.create_task(self._probe())

    async def stop(self) -> None:
        """Stop probing."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _probe(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            asked = loop.time() + self.interval_s
            await asyncio.sleep(self.interval_s)
            metrics.EVENT_LOOP_LAG.observe(max(0.0, loop.time() - asked))


async def until_stopped(work: Coroutine[Any, Any, T], stop: asyncio.Event) -> T | None:
    """Await ``work`` unless ``stop`` is set first: then cancel it and return None.

    For start-up, which can wait a minute on a server that accepts and never
    answers (asyncpg's connect timeout): SIGTERM must end the process then too,
    not once the timeout gives up.
    """
    task = asyncio.ensure_future(work)
    stopped = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({task, stopped}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopped.cancel()
    if task.done():
        return task.result()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    return None
