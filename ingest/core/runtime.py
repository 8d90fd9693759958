"""Process-wide tuning of the interpreter for the hot processes (collector, loader)."""

from __future__ import annotations

import asyncio
import contextlib
import gc
from collections.abc import Coroutine
from typing import Any, Literal, TypeVar

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
    if settings.gc_gen0_threshold <= 0:
        return
    gc.collect()
    gc.freeze()
    _, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(settings.gc_gen0_threshold, gen1, gen2)


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
