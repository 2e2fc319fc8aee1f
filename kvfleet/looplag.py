"""How late a process's event loop runs what is due: ``kvfleet_event_loop_lag_seconds``.

Every coroutine of a process (a router's relays, a node's Serve streams, heartbeats)
waits while one callback holds its event loop, so a stalled loop delays every request
that process carries. A stall is either the process's own work (a long callback, a
full garbage collection, another thread holding the GIL) or time it spent off the CPU
(descheduled on a busy machine, or blocked in a synchronous call). Their CPU time tells
them apart, so the warning for a stall gives the CPU time the process used during it
next to the wall time: CPU close to wall means busy in its own code; CPU far below wall
means it was not running.
"""

from __future__ import annotations

import asyncio
import logging
import time

from prometheus_client import Histogram

from kvfleet.aio import cancel_and_wait

log = logging.getLogger(__name__)

LOOP_LAG = Histogram(
    "kvfleet_event_loop_lag_seconds", "How late the event loop ran a timer due every interval, by process role",
    ["role"], buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
)


async def watch_loop_lag(role: str, interval_s: float = 0.1, warn_s: float = 0.5) -> None:
    """Runs until cancelled: sleeps ``interval_s``, observes how late it woke (seconds)
    in ``LOOP_LAG{role}``, and logs a WARNING when that exceeds ``warn_s``. Costs one
    timer and two CPU clock reads per interval.

    The warning's figures, also on the record as ``extra`` attributes (``lag_s``,
    ``wall_s``, ``cpu_s``, ``loop_cpu_s``): the wall time since the sleep began, the
    process's CPU time in it (all threads; ``time.process_time``) and the loop thread's
    own (``time.thread_time``). Process CPU near wall with little on the loop thread:
    another thread (gRPC's, an engine's) held the GIL."""
    loop = asyncio.get_running_loop()
    lag_hist = LOOP_LAG.labels(role)
    while True:
        began, cpu0, loop_cpu0 = loop.time(), time.process_time(), time.thread_time()
        await asyncio.sleep(interval_s)
        now = loop.time()
        # asyncio runs a timer up to one clock resolution early: that is no lag.
        lag = max(0.0, now - began - interval_s)
        lag_hist.observe(lag)
        if lag > warn_s:
            wall, cpu, loop_cpu = now - began, time.process_time() - cpu0, time.thread_time() - loop_cpu0
            log.warning(
                "%s: event loop stalled %.3f s (wall %.3f s, process CPU %.3f s, loop thread CPU %.3f s; "
                "CPU near wall: busy in its own code, far below: not running, descheduled or blocked "
                "in a synchronous call)", role, lag, wall, cpu, loop_cpu,
                extra={"role": role, "lag_s": lag, "wall_s": wall, "cpu_s": cpu, "loop_cpu_s": loop_cpu},
            )


def start_loop_lag_watch(role: str, **kwargs) -> asyncio.Task:
    """``watch_loop_lag`` as a task of the running loop; cancel it on shutdown
    (``stop_loop_lag_watch``)."""
    return asyncio.create_task(watch_loop_lag(role, **kwargs), name=f"loop-lag-{role}")


async def stop_loop_lag_watch(task: asyncio.Task | None) -> None:
    await cancel_and_wait(task)
