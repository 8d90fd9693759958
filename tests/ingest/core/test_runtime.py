"""Interpreter tuning of the hot processes."""

from __future__ import annotations

import asyncio
import gc
import time

from prometheus_client import REGISTRY

from ingest.core import metrics
from ingest.core.runtime import LoopMonitor, tune_gc
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


def _sample(name: str, labels: dict[str, str] | None = None) -> float:
    return REGISTRY.get_sample_value(name, labels or {}) or 0.0


def test_gc_pauses_are_timed_by_generation() -> None:
    before = gc.get_threshold()
    try:
        tune_gc(Settings(gc_gen0_threshold=0))  # the hook, whatever the threshold
        tune_gc(Settings(gc_gen0_threshold=0))  # installed once
        assert gc.callbacks.count(metrics.GC_PAUSES.hook) == 1
        full = {"generation": "2"}
        count, total = (
            _sample("eventpipe_gc_pause_seconds_count", full),
            _sample("eventpipe_gc_pause_seconds_sum", full),
        )
        garbage = [[] for _ in range(100_000)]
        for item in garbage:
            item.append(item)  # cycles: the collection has work to do
        del garbage
        gc.collect()  # and maybe automatic ones on the way
        after = _sample("eventpipe_gc_pause_seconds_count", full)
        assert after >= count + 1
        assert _sample("eventpipe_gc_pause_seconds_sum", full) > total
        assert _sample("eventpipe_gc_pause_seconds_bucket", {**full, "le": "+Inf"}) == after
    finally:
        gc.callbacks.remove(metrics.GC_PAUSES.hook)
        gc.unfreeze()
        gc.set_threshold(*before)


async def test_a_blocked_event_loop_shows_as_lag() -> None:
    def late(bound: str) -> float:  # probes that woke more than ``bound`` seconds late
        count = _sample("eventpipe_event_loop_lag_seconds_count")
        return count - _sample("eventpipe_event_loop_lag_seconds_bucket", {"le": bound})

    async with LoopMonitor(interval_s=0.01):
        await asyncio.sleep(0.05)  # a few probes
        before = late("0.1")
        time.sleep(0.2)  # noqa: ASYNC251 (the point: the loop blocked, the probe 190 ms late)
        await asyncio.sleep(0.05)
        assert late("0.1") == before + 1
