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
