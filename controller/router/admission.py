"""The router's admission queue: which request goes to a node now, by tier.

A node that already has more prefill queued than it can start within a few engine steps
gains nothing from more work sent now: the work only waits there, out of the router's
reach, in arrival order. So the router holds lower tiers back and keeps that headroom for
the tiers above them:

* **priority** is never held: it goes to a node at once, and the engine schedules it
  ahead of queued work (vLLM's priority scheduling; the sim engine does the same).
* **default**, **flex** and **batch** go to a node only while some node could start
  their prefill within ``steps[tier]`` engine steps of queued work (default 0.5, flex
  0.25, batch 0.125: the lower the tier, the emptier the fleet must be). An engine runs
  the prefill it has admitted before a priority request that comes later, so this is
  what a priority request may find ahead of it. They are routed among
  those nodes only (the policy ranks the rest out), so a busy node holding the prefix is
  traded for an idle one once it is past the tier's limit.
* They also leave part of each node's sequence slots (``max_num_seqs``, where the node
  reports it) free for the tiers above: 12.5 % for default, 25 % for flex, 50 % for
  batch. An engine does not preempt a running request for a priority one (vLLM's
  priority policy preempts only when KV blocks run out), so a priority request that
  found every slot taken would wait for a running sequence to finish.
* Otherwise the request waits in the router's queue. The queue is ordered by ``arrival +
  aging[tier]`` (0 s for default, 60 s for flex, 300 s for batch by default): a flex
  request that has waited 60 s ranks with a default one that just arrived, so lower
  tiers move up while they wait and cannot starve while there is capacity. Flex's
  default wait (30 s) is shorter than its aging, so under sustained overload flex is
  shed before it takes capacity from default; one that asks to wait longer ages in.
  (Defaults: default waits at most 5 s, flex 30 s, batch 120 s, then the client, or
  the batch runner, retries; ``retry-after-ms`` is the queue ahead over the recent
  admission rate.)
* A request waits at most ``max_wait[tier]``, or the request's own ``max_queue_ms``
  (flex may ask for more, the others only for less), and never past its deadline.
  Past it, or at once when the queue ahead of it would take longer than that to drain
  (its position over the rate the router has recently admitted requests at; only once
  requests have waited continuously for 5 s, when that rate is the fleet's pace and not
  the trickle before a burst), it is shed
  with RESOURCE_EXHAUSTED and a ``retry-after-ms`` trailer. Lower tiers sit behind higher
  ones, so they are shed first.

"Queued work in steps" is the node's queued prefill (as :func:`policy.queued_now`
estimates it now, including what this router sent that the node does not show yet) over
the prefill tokens one step can carry next to the running decodes (``B - R``; with the
step budget ``B`` unknown, the prefill of ``STEP_S`` seconds). Measured in the node's
own steps, so the limits mean the same on any hardware: no seconds, no token counts.

:func:`admissible` is the pure part (columns in, mask out); :class:`TierQueue` is the
asyncio edge that holds requests until it says yes.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import math
import time
from dataclasses import dataclass, field
from typing import Callable

import grpc
import numpy as np
from prometheus_client import Counter, Gauge
from pydantic import BaseModel, Field

from kvfleet.aio import cancel_and_wait
from kvfleet.controller.router import cost as _cost
from kvfleet.controller.router.errors import RequestError
from kvfleet.controller.router.metrics import child
from kvfleet.controller.router.nodes import NodeTable
from kvfleet.controller.router.policy import queued_now
from kvfleet.v1 import common_pb2 as cpb

TIER_NAMES = {cpb.TIER_PRIORITY: "priority", cpb.TIER_DEFAULT: "default", cpb.TIER_FLEX: "flex", cpb.TIER_BATCH: "batch"}
QUEUE_DEPTH = Gauge("kvfleet_router_queue_depth", "Requests waiting in the admission queue", ["tier"])
INFLIGHT = Gauge("kvfleet_router_inflight", "Requests admitted and not finished", ["tier"])
SHED = Counter("kvfleet_router_shed_total", "Requests shed with RESOURCE_EXHAUSTED by the admission queue", ["tier", "reason"])
STEP_S = 0.05
"""A step's length where a node does not report its token budget per step: 50 ms of prefill."""


class AdmissionConfig(BaseModel):
    """Tier limits of the admission queue (see the module docstring)."""

    default_steps: float = Field(0.5, gt=0, description="default tier: most engine steps of queued prefill on a node it is sent to")
    flex_steps: float = Field(0.25, gt=0, description="flex tier: most engine steps of queued prefill on a node it is sent to")
    batch_steps: float = Field(0.125, gt=0, description="batch tier: most engine steps of queued prefill on a node it is sent to")
    default_headroom: float = Field(0.125, ge=0, lt=1, description="default tier: fraction of a node's sequence slots (max_num_seqs) left free for priority")
    flex_headroom: float = Field(0.25, ge=0, lt=1, description="flex tier: fraction of a node's sequence slots left free for the tiers above")
    batch_headroom: float = Field(0.5, ge=0, lt=1, description="batch tier: fraction of a node's sequence slots left free for interactive tiers")
    flex_aging_s: float = Field(60.0, ge=0, description="seconds a flex request waits to rank with a new default one")
    batch_aging_s: float = Field(300.0, ge=0, description="seconds a batch request waits to rank with a new default one")
    default_max_wait_s: float = Field(5.0, gt=0, description="longest a default request waits in the router's queue")
    flex_max_wait_s: float = Field(30.0, gt=0, description="longest a flex request waits when it names no deadline")
    batch_max_wait_s: float = Field(120.0, gt=0, description="longest a batch item waits before it is handed back to the runner")
    max_queue: int = Field(10_000, ge=1, description="requests the queue holds; beyond it the lowest tier's newest is shed")

    def steps(self, tier: int) -> float:
        return {cpb.TIER_FLEX: self.flex_steps, cpb.TIER_BATCH: self.batch_steps}.get(tier, self.default_steps)

    def headroom(self, tier: int) -> float:
        return {cpb.TIER_FLEX: self.flex_headroom, cpb.TIER_BATCH: self.batch_headroom}.get(tier, self.default_headroom)

    def aging(self, tier: int) -> float:
        return {cpb.TIER_FLEX: self.flex_aging_s, cpb.TIER_BATCH: self.batch_aging_s}.get(tier, 0.0)

    def max_wait(self, tier: int) -> float:
        return {cpb.TIER_FLEX: self.flex_max_wait_s, cpb.TIER_BATCH: self.batch_max_wait_s}.get(tier, self.default_max_wait_s)


def queued_steps(t: NodeTable, now_s: float) -> np.ndarray:
    """Each node's queued prefill now, in its engine steps (float; see the module doc)."""
    rate = np.where(t.prefill_tokens_per_s > 0, t.prefill_tokens_per_s, 1.0)
    queued = queued_now(t.queued_prefill_tokens.astype(np.float64), t.work_since_s, rate, now_s)
    budget = t.max_num_batched_tokens
    per_step = np.where(budget > 0, np.maximum(budget - t.running, 1), rate * STEP_S)
    return queued / per_step


def admissible(t: NodeTable, steps_limit: float, now_s: float, headroom: float = 0.0) -> np.ndarray:
    """Rows of ``t`` a request may be sent to now: routable, with at most
    ``steps_limit`` steps of prefill queued (``inf``: no limit), and a sequence slot free
    beyond the ``headroom`` fraction of the engine's ``max_num_seqs`` kept for higher tiers
    (where the node reports it). :func:`queued_steps` is the steps part; one compiled pass
    (``cost.admissible_rows``) computes the same."""
    ok = np.empty(len(t), np.bool_)
    _admissible(t, steps_limit, now_s, headroom, ok)
    return ok


def _admissible(t: NodeTable, steps_limit: float, now_s: float, headroom: float, ok: np.ndarray) -> tuple[int, int]:
    return _cost.admissible_rows(t.routable, t.queued_prefill_tokens, t.work_since_s, t.prefill_tokens_per_s,
                                 t.max_num_batched_tokens, t.running, t.waiting, t.max_num_seqs, float(now_s),
                                 float(steps_limit), float(headroom), STEP_S, ok)


class Rate:
    """Events per second, exponentially weighted over ``tau_s``."""

    __slots__ = ("tau_s", "value", "_t")

    def __init__(self, tau_s: float = 5.0) -> None:
        self.tau_s, self.value, self._t = tau_s, 0.0, -math.inf

    def tick(self, now: float) -> None:
        if math.isinf(self._t):
            self._t = now
            return
        decay = math.exp(-max(now - self._t, 0.0) / self.tau_s)
        self.value = self.value * decay + 1.0 / self.tau_s
        self._t = now

    def at(self, now: float) -> float:
        return 0.0 if math.isinf(self._t) else self.value * math.exp(-max(now - self._t, 0.0) / self.tau_s)


@dataclass(order=True, slots=True)
class _Waiter:
    key: float                                    # arrival + aging: smaller goes first
    seq: int
    tier: int = field(compare=False)
    model: str = field(compare=False)
    deadline: float = field(compare=False)       # monotonic s
    future: asyncio.Future = field(compare=False)
    gone: bool = field(default=False, compare=False)


class TierQueue:
    """Holds non-priority requests until :func:`admissible` finds a node for them.

    ``enter`` returns the node ids the request must not be sent to (those past its
    tier's limit) or raises RESOURCE_EXHAUSTED; ``leave`` is called once it ends.
    One heap per model; one dispatcher task serves them in key order: it re-checks the
    heads whenever a request ends or enters, and every ``poll_s`` while anything waits
    (node state arrives once per engine step), and after each release waits until the
    router has counted that request on its node (``sent``). ``enter`` counts the
    requests ahead (O(n) in the model's queue, for shedding) only when the whole queue
    could make it late; a check is one compiled pass over the model's node table.
    """

    def __init__(self, fleet, config: AdmissionConfig | None = None, *,
                 clock: Callable[[], float] = time.monotonic, poll_s: float = 0.005) -> None:
        self.fleet = fleet
        self.config = config or AdmissionConfig()
        self.clock = clock
        self.poll_s = poll_s
        # One heap per model (a model's requests only compete for that model's nodes), each
        # lazily cleaned: ``gone`` entries stay until popped or compacted.
        self._heaps: dict[str, list[_Waiter]] = {}
        self._gone: dict[str, int] = {}
        self._sent = asyncio.Event()          # the request released last has reached a node
        self._seq = itertools.count()
        self._depth = dict.fromkeys(TIER_NAMES, 0)          # waiting, by tier
        self._inflight = dict.fromkeys(TIER_NAMES, 0)       # admitted and not ended, by tier
        self._admitted = Rate()                               # admissions/s (direct and from the queue)
        self._saturated_since = math.inf                      # since when something has waited, continuously
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self.shed = dict.fromkeys(TIER_NAMES, 0)             # requests shed, by tier (counters)

    # -- the request path ------------------------------------------------------------------
    async def enter(self, p, rank=None) -> frozenset[str]:  # noqa: ARG002 - rank kept for the hook's signature
        tier = p.tier if p.tier in TIER_NAMES else cpb.TIER_DEFAULT
        now = self.clock()
        if tier == cpb.TIER_PRIORITY:
            return self._admit(tier, now, frozenset())
        heap = self._heaps.setdefault(p.model, [])
        if not self._live(p.model):
            exclude = self._check(p.model, tier, now)
            if exclude is not None:
                return self._admit(tier, now, exclude)
        wait = self.config.max_wait(tier)
        asked = getattr(p, "max_queue_s", 0.0)
        if asked > 0:   # the request's own limit: flex may wait longer than the default, others only less
            wait = asked if tier == cpb.TIER_FLEX else min(wait, asked)
        deadline = now + wait
        own_deadline = p.deadline is not None and p.deadline <= deadline
        if own_deadline:
            deadline = p.deadline
        w = _Waiter(now + self.config.aging(tier), next(self._seq), tier, p.model, deadline,
                    asyncio.get_running_loop().create_future())
        # Only a router that has been saturated for a while admits at the fleet's pace; a
        # burst after a quiet spell would otherwise look hopeless and be shed at once.
        saturated = now - self._saturated_since >= self._admitted.tau_s
        rate = self._admitted.at(now)
        # The requests ahead are counted (O(n)) only when the whole queue could make it late.
        if saturated and rate > 0 and now + self._live(p.model) / rate > deadline:
            ahead = sum(1 for x in heap if x < w and not x.gone)
            if now + ahead / rate > deadline:
                self._count_shed(tier, "backlog")
                raise self._exhausted(tier, self._retry_after(tier, now, p.model), f"{ahead} requests are queued ahead of it")
        if sum(self._depth.values()) >= self.config.max_queue:
            self._evict_for(w)
        heapq.heappush(heap, w)
        if not any(self._depth.values()):
            self._saturated_since = now
        self._depth[tier] += 1
        self._gauges(tier)
        self._ensure_dispatcher()
        self._wake.set()
        try:
            exclude = await asyncio.wait_for(asyncio.shield(w.future), timeout=max(deadline - now, 0.0))
        except asyncio.TimeoutError:
            if not w.future.done():
                self._drop(w)
                later = self.clock()
                if own_deadline:   # the request's own deadline: a retry cannot help
                    raise RequestError(grpc.StatusCode.DEADLINE_EXCEEDED,
                                       f"deadline exceeded after {later - now:.1f} s in the router's queue") from None
                self._count_shed(tier)
                raise self._exhausted(tier, self._retry_after(tier, later, p.model),
                                      f"it waited {later - now:.1f} s in the router's queue") from None
            exclude = w.future.result()
        except asyncio.CancelledError:
            if (w.future.done() and not w.future.cancelled() and w.future.exception() is None
                    and isinstance(w.future.result(), frozenset)):
                self.leave(p)   # admitted at the instant the client went away
            else:
                self._drop(w)
            raise
        if isinstance(exclude, RequestError):
            raise exclude
        return exclude

    def sent(self, p) -> None:  # noqa: ARG002
        """The router has counted ``p`` in its node's pending work: the dispatcher may
        check the next request against that node's new state."""
        self._sent.set()

    def leave(self, p) -> None:
        tier = p.tier if p.tier in TIER_NAMES else cpb.TIER_DEFAULT
        self._inflight[tier] = max(self._inflight[tier] - 1, 0)
        self._gauges(tier)
        self._wake.set()

    def _gauges(self, tier: int) -> None:
        child(QUEUE_DEPTH, TIER_NAMES[tier]).set(self._depth[tier])
        child(INFLIGHT, TIER_NAMES[tier]).set(self._inflight[tier])

    def depths(self) -> dict[str, int]:
        """Requests waiting in the queue, by tier name."""
        return {TIER_NAMES[t]: n for t, n in self._depth.items()}

    def inflight(self) -> dict[str, int]:
        return {TIER_NAMES[t]: n for t, n in self._inflight.items()}

    async def close(self) -> None:
        await cancel_and_wait(self._task)

    # -- internals -----------------------------------------------------------------------------
    def _check(self, model: str, tier: int, now: float) -> frozenset[str] | None:
        """None if no node may take a request of ``tier`` now; else the ids to avoid."""
        t = self.fleet.columns(model)
        ok = np.empty(len(t), np.bool_)
        n_ok, n_held = _admissible(t, self.config.steps(tier), now, self.config.headroom(tier), ok)
        if not n_ok:
            # Nothing routable at all: let routing fail with UNAVAILABLE now.
            return frozenset() if not n_held else None
        if not n_held:
            return frozenset()
        return frozenset(t.node_ids[r] for r in np.flatnonzero(~ok & t.routable).tolist())

    def _admit(self, tier: int, now: float, exclude: frozenset[str]) -> frozenset[str]:
        self._inflight[tier] += 1
        self._gauges(tier)
        self._admitted.tick(now)
        return exclude

    def _live(self, model: str) -> int:
        heap = self._heaps.get(model)
        return len(heap) - self._gone.get(model, 0) if heap else 0

    def _retry_after(self, tier: int, now: float, model: str) -> float:
        """When a request of ``tier`` arriving now could expect a node: the queue ahead of
        it (same model) over the recent admission rate; at most the tier's wait."""
        key = now + self.config.aging(tier)
        ahead = sum(1 for x in self._heaps.get(model, ()) if not x.gone and x.key <= key)
        rate = self._admitted.at(now)
        est = ahead / rate if rate > 0 else self.config.max_wait(tier) / 2
        return min(est, self.config.max_wait(tier))

    def _exhausted(self, tier: int, retry_s: float, why: str) -> RequestError:
        ms = int(max(retry_s, 0.5) * 1000)
        return RequestError(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            f"fleet at capacity for tier {TIER_NAMES[tier]}: {why}; retry after {ms / 1000:.1f} s",
            (("retry-after-ms", str(ms)),))

    def _count_shed(self, tier: int, reason: str = "wait") -> None:
        self.shed[tier] += 1
        SHED.labels(TIER_NAMES[tier], reason).inc()

    def _drop(self, w: _Waiter, error: RequestError | None = None) -> None:
        """Takes ``w`` out of the queue; its ``enter`` raises ``error`` (if given)."""
        if self._remove(w) and not w.future.done():
            if error is not None:
                w.future.set_result(error)
            else:
                w.future.cancel()

    def _remove(self, w: _Waiter) -> bool:
        """Bookkeeping of taking ``w`` out (the heap entry goes lazily); False if it was out."""
        if w.gone:
            return False
        w.gone = True
        self._depth[w.tier] -= 1
        if not any(self._depth.values()):
            self._saturated_since = math.inf
        self._gauges(w.tier)
        heap = self._heaps[w.model]
        gone = self._gone[w.model] = self._gone.get(w.model, 0) + 1
        if gone > 64 and gone > len(heap) // 2:
            heap[:] = [x for x in heap if not x.gone]
            heapq.heapify(heap)
            self._gone[w.model] = 0
        return True

    def _evict_for(self, newcomer: _Waiter) -> None:
        """Queue full: shed the newest of the lowest tier waiting (maybe the newcomer)."""
        live = [x for heap in self._heaps.values() for x in heap if not x.gone]
        victim = max(live + [newcomer], key=lambda x: (x.tier == cpb.TIER_BATCH, x.tier == cpb.TIER_FLEX, x.key))
        if victim is newcomer:
            self._count_shed(newcomer.tier, "full")
            raise self._exhausted(newcomer.tier, self._retry_after(newcomer.tier, self.clock(), newcomer.model),
                                  "the router's queue is full")
        self._drop(victim, self._exhausted(victim.tier, self._retry_after(victim.tier, self.clock(), victim.model),
                                           "the router's queue is full"))
        self._count_shed(victim.tier, "full")

    def _ensure_dispatcher(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._dispatch(), name="admission")

    async def _dispatch(self) -> None:
        while True:
            for model in list(self._heaps):
                heap = self._heaps[model]
                while heap and heap[0].gone:
                    heapq.heappop(heap)
                    self._gone[model] = max(self._gone.get(model, 0) - 1, 0)
                if not heap:
                    del self._heaps[model]
                    self._gone.pop(model, None)
            if not self._heaps:
                self._wake.clear()
                await self._wake.wait()
                continue
            self._sent.clear()
            if self._release_one():
                # Let the released request reach its node and the router's pending count
                # before the next check reads that node's row (bounded: it may fail first).
                try:
                    await asyncio.wait_for(self._sent.wait(), timeout=0.05)
                except asyncio.TimeoutError:
                    pass
                continue
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=self.poll_s)
            except asyncio.TimeoutError:
                pass

    def _release_one(self) -> bool:
        """Admits, model by model (oldest head first), the first of each model's few
        best-ranked waiters that a node can take now."""
        now = self.clock()
        heads = sorted((heap[0].key, model) for model, heap in self._heaps.items() if heap)
        for _, model in heads:
            checked: dict[int, frozenset[str] | None] = {}   # a check depends only on (model, tier, now)
            for w in heapq.nsmallest(8, (x for x in self._heaps[model] if not x.gone)):
                if w.tier in checked:
                    exclude = checked[w.tier]
                else:
                    exclude = checked[w.tier] = self._check(w.model, w.tier, now)
                if exclude is None:
                    continue
                if w.future.done():          # the caller went away at the same instant
                    self._drop(w)
                    return True
                self._remove(w)               # out of the queue...
                self._admit(w.tier, now, exclude)
                w.future.set_result(exclude)  # ...and on its way
                return True
        return False


class OpenAdmission:
    """No queue: every request goes at once (unit tests of the request path)."""

    async def enter(self, p, rank=None) -> frozenset[str]:  # noqa: ARG002
        return frozenset()

    def sent(self, p) -> None:  # noqa: ARG002
        return None

    def leave(self, p) -> None:  # noqa: ARG002
        return None

    def depths(self) -> dict[str, int]:
        return {}

    async def close(self) -> None:
        return None


def build_admission(cfg, fleet) -> TierQueue:
    return TierQueue(fleet, getattr(cfg, "admission", None) or AdmissionConfig())
