"""The node's published state: canonical cached blocks and load, as a sequenced stream.

Engines push KV events (vLLM format) into a ``BlockTracker`` per model; this module
coalesces the resulting canonical deltas with the current load into ``StateUpdate``s,
numbered by one global sequence, and fans them out to every ``WatchState`` subscriber.
A new subscriber first gets a snapshot carrying the current sequence number, then every
later update, so a gap in sequence numbers on the router side always means loss.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable

from kvfleet.node_agent.block_tracker import BlockTracker
from kvfleet.node_agent.engine import LoadSnapshot
from kvfleet.node_agent.kv_events import KVEventBatch

log = logging.getLogger(__name__)


@dataclass(slots=True)
class ModelDelta:
    """Net change since the last update: the last operation on a block wins."""

    present: dict[int, bool] = field(default_factory=dict)  # canonical hash -> stored (True) / removed (False)
    cleared: bool = False

    @property
    def stored(self) -> list[int]:
        return [h for h, p in self.present.items() if p]

    @property
    def removed(self) -> list[int]:
        return [h for h, p in self.present.items() if not p]


@dataclass(frozen=True, slots=True)
class Update:
    """One published state update, in domain types (the gRPC edge converts it)."""

    seq: int
    snapshot: bool
    stored: dict[str, list[int]]
    removed: dict[str, list[int]]
    cleared: list[str]
    load: LoadSnapshot
    cached_blocks: int
    inflight: int
    ready: bool
    accepted: list[str]


class StatePublisher:
    """Coalesces engine events into updates every ``interval_s`` (or sooner on demand)."""

    def __init__(
        self, trackers: dict[str, BlockTracker], load: Callable[[], LoadSnapshot],
        ready: Callable[[], bool], inflight: Callable[[], int],
        interval_s: float = 0.02, keepalive_s: float = 1.0, max_backlog: int = 1000,
    ) -> None:
        self.max_backlog = max_backlog  # updates queued per subscriber before it is cut off
        self.trackers = trackers
        self._load, self._ready, self._inflight = load, ready, inflight
        self.interval_s, self.keepalive_s = interval_s, keepalive_s
        self.seq = 0
        self._pending: dict[str, ModelDelta] = {}
        self._accepted: list[str] = []
        self._dirty = asyncio.Event()
        self._subscribers: set[asyncio.Queue] = set()
        self._last_load: tuple | None = None

    # -- inputs -----------------------------------------------------------------------------
    def on_kv_events(self, model: str, seq: int, batch: KVEventBatch) -> None:
        tracker = self.trackers[model]
        delta = tracker.apply(seq, batch)
        pending = self._pending.setdefault(model, ModelDelta())
        if delta.cleared:
            # A clear is applied before this update's removals and stores.
            pending.present.clear()
            pending.cleared = True
            if delta.gap:
                log.warning("KV event gap on %s: treating the cache as cleared", model)
        for h in delta.removed:
            pending.present[h] = False
        for h in delta.stored:
            pending.present[h] = True
        self._dirty.set()

    def on_accepted(self, request_id: str) -> None:
        self._accepted.append(request_id)
        self._dirty.set()

    def poke(self) -> None:
        """Load or readiness changed: publish soon."""
        self._dirty.set()

    # -- outputs ----------------------------------------------------------------------------
    def _cached_blocks(self) -> int:
        return sum(len(t) for t in self.trackers.values())

    def current(self) -> Update:
        """Load, readiness and cache size now, without blocks and without a sequence number."""
        return Update(seq=self.seq, snapshot=False, stored={}, removed={}, cleared=[], load=self._load(),
                      cached_blocks=self._cached_blocks(), inflight=self._inflight(), ready=self._ready(), accepted=[])

    def _make(self, snapshot: bool) -> Update:
        load = self._load()
        if snapshot:
            return Update(
                seq=self.seq, snapshot=True, stored={m: t.snapshot() for m, t in self.trackers.items()},
                removed={}, cleared=[], load=load, cached_blocks=self._cached_blocks(),
                inflight=self._inflight(), ready=self._ready(), accepted=[],
            )
        self.seq += 1
        pending, self._pending = self._pending, {}
        accepted, self._accepted = self._accepted, []
        return Update(
            seq=self.seq, snapshot=False,
            stored={m: s for m, d in pending.items() if (s := d.stored)},
            removed={m: r for m, d in pending.items() if (r := d.removed)},
            cleared=[m for m, d in pending.items() if d.cleared],
            load=load, cached_blocks=self._cached_blocks(), inflight=self._inflight(),
            ready=self._ready(), accepted=accepted,
        )

    async def subscribe(self) -> AsyncIterator[Update]:
        q: asyncio.Queue = asyncio.Queue(maxsize=self.max_backlog)
        # Snapshot and registration happen with no await between them: nothing is missed.
        first = self._make(snapshot=True)
        self._subscribers.add(q)
        try:
            yield first
            while True:
                update = await q.get()
                if update is None:
                    return
                yield update
        finally:
            self._subscribers.discard(q)

    def publish(self) -> None:
        """Sends one update (the changes since the last) to every subscriber."""
        update = self._make(snapshot=False)
        for q in list(self._subscribers):
            try:
                q.put_nowait(update)
            except asyncio.QueueFull:
                # A subscriber this far behind gets its stream ended instead of
                # unbounded memory here; it resubscribes and starts from a snapshot.
                log.warning("state subscriber %d updates behind: ending its stream", q.qsize())
                self._subscribers.discard(q)
                while not q.empty():
                    q.get_nowait()
                q.put_nowait(None)

    async def run(self) -> None:
        """Publishes whenever something changed, at most every ``interval_s``; a
        keepalive update every ``keepalive_s`` lets routers see the node is alive."""
        loop = asyncio.get_running_loop()
        last = loop.time()
        while True:
            try:
                await asyncio.wait_for(self._dirty.wait(), timeout=self.keepalive_s)
            except asyncio.TimeoutError:
                pass
            self._dirty.clear()
            self.publish()
            now = loop.time()
            wait = self.interval_s - (now - last)
            last = now
            if wait > 0:
                await asyncio.sleep(wait)

    def close(self) -> None:
        for q in list(self._subscribers):
            q.put_nowait(None)
