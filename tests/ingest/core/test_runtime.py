"""Interpreter tuning of the hot processes."""

from __future__ import annotations

import gc

from ingest.core.runtime import tune_gc
from ingest.core.settings import Settings


def test_tune_gc_sets_the_young_threshold_and_zero_leaves_gc_alone() -> None:
    before = gc.get_threshold()
    try:
        tune_gc(Settings(gc_gen0_threshold=0))
        assert gc.get_threshold() == before
        tune_gc(Settings(gc_gen0_threshold=12_345))
        assert gc.get_threshold() == (12_345, before[1], before[2])
        assert gc.get_freeze_count() > 0  # start-up objects are out of every later pass
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)


def test_run_uses_the_event_loop_the_settings_name() -> None:
    """The collector runs on asyncio's loop by default, on uvloop when told (each
    run in a thread of its own: pytest's loop may be running in this one)."""
    import asyncio
    import concurrent.futures

    import uvloop

    from ingest.core.runtime import run

    async def loop_type() -> type:
        return type(asyncio.get_running_loop())

    def in_thread(**given: str) -> type:
        return run(loop_type(), Settings(**given).event_loop)  # type: ignore[arg-type]

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        assert issubclass(pool.submit(in_thread, event_loop="uvloop").result(), uvloop.Loop)
        plain = pool.submit(in_thread).result()
    assert not issubclass(plain, uvloop.Loop)
    assert issubclass(plain, asyncio.BaseEventLoop)
