"""settle_gc: a ready server's objects leave the collector's reach; pauses are exported."""

from __future__ import annotations

import gc

from prometheus_client import REGISTRY

from kvfleet.controller.process import settle_gc


def _pauses(generation: str) -> float:
    return REGISTRY.get_sample_value("kvfleet_gc_pause_seconds_count", {"generation": generation}) or 0.0


def test_settle_gc_freezes_what_is_alive_and_times_every_collection():
    before = gc.get_freeze_count()
    try:
        settle_gc()
        assert gc.get_freeze_count() > before          # what was alive now sits in the permanent generation
        kept = [[i] for i in range(1000)]              # made after: still collectable, still scanned
        n2 = _pauses("2")
        gc.collect()
        assert _pauses("2") == n2 + 1                  # a full collection, timed
        settle_gc()                                    # idempotent: one timer, not two
        n2 = _pauses("2")
        gc.collect()
        assert _pauses("2") == n2 + 1
        assert len(kept) == 1000
    finally:
        gc.unfreeze()
