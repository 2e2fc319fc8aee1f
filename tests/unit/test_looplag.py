"""watch_loop_lag: a held event loop shows in kvfleet_event_loop_lag_seconds and in a
warning whose CPU figure tells a loop busy in its own code from one that was not running."""

from __future__ import annotations

import asyncio
import logging
import time

from prometheus_client import REGISTRY

from kvfleet.looplag import start_loop_lag_watch, stop_loop_lag_watch

INTERVAL_S = 0.01


def _observed(role: str, le: str | None = None) -> float:
    """Lags observed for ``role``: all of them, or those at most ``le`` seconds."""
    if le is None:
        return REGISTRY.get_sample_value("kvfleet_event_loop_lag_seconds_count", {"role": role}) or 0.0
    return REGISTRY.get_sample_value("kvfleet_event_loop_lag_seconds_bucket", {"role": role, "le": le}) or 0.0


def _stalls(caplog, role: str, at_least_s: float) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "kvfleet.looplag" and r.role == role and r.lag_s >= at_least_s]


async def _hold_loop(role: str, hold) -> None:
    """Runs the watch (10 ms interval, warning past 0.1 s) around one call of ``hold``,
    which keeps the loop from running anything else."""
    watch = start_loop_lag_watch(role, interval_s=INTERVAL_S, warn_s=0.1)
    await asyncio.sleep(0.05)          # the watch is in one of its sleeps
    hold()
    await asyncio.sleep(0.05)          # it wakes, late, and reports
    await stop_loop_lag_watch(watch)
    assert watch.cancelled()


async def test_a_loop_held_in_time_sleep_records_the_lag_and_warns_with_cpu_far_below_wall(caplog):
    caplog.set_level(logging.WARNING, logger="kvfleet.looplag")
    await _hold_loop("test-sleep", lambda: time.sleep(0.3))

    # The timer was due at most one interval after the hold began: it woke >= 0.29 s late.
    assert _observed("test-sleep") - _observed("test-sleep", "0.25") >= 1
    [stall] = _stalls(caplog, "test-sleep", 0.25)
    assert stall.levelno == logging.WARNING
    assert abs(stall.wall_s - (stall.lag_s + INTERVAL_S)) < 1e-9
    assert stall.cpu_s < stall.wall_s / 2 and stall.loop_cpu_s <= stall.cpu_s + 1e-3   # sleeping takes no CPU
    msg = stall.getMessage()
    assert msg.startswith("test-sleep: event loop stalled")
    assert f"wall {stall.wall_s:.3f} s, process CPU {stall.cpu_s:.3f} s, loop thread CPU {stall.loop_cpu_s:.3f} s" in msg


async def test_a_loop_held_by_its_own_computation_warns_with_that_cpu_time(caplog):
    # Spins until the loop thread has used 0.15 s of CPU, however long a busy machine makes that take.
    def spin() -> None:
        end = time.thread_time() + 0.15
        while time.thread_time() < end:
            pass

    caplog.set_level(logging.WARNING, logger="kvfleet.looplag")
    await _hold_loop("test-busy", spin)

    [stall] = _stalls(caplog, "test-busy", 0.14)
    assert stall.loop_cpu_s >= 0.15 and stall.cpu_s >= stall.loop_cpu_s - 1e-3
    assert stall.loop_cpu_s <= stall.wall_s + 1e-3


async def test_a_loop_left_free_observes_every_interval_and_logs_nothing(caplog):
    caplog.set_level(logging.DEBUG, logger="kvfleet.looplag")
    watch = start_loop_lag_watch("test-free", interval_s=0.02, warn_s=0.5)
    await asyncio.sleep(0.3)
    await stop_loop_lag_watch(watch)

    assert _observed("test-free") >= 5                               # about 15: one per interval
    assert _observed("test-free", "0.5") == _observed("test-free")   # none past warn_s ...
    assert [r for r in caplog.records if r.name == "kvfleet.looplag"] == []   # ... so no warning
