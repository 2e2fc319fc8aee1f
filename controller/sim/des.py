"""Discrete-event routing simulation in virtual time, with the production routing code.

One process holds N :class:`SimEngineCore` s and one router. Per arrival the router does
what production does: hash the prompt (:func:`kvfleet.hashing.block_hashes`), keep a
row per node in a :class:`NodeTable` from the core's ``load()`` and the index, and dispatch to the
first eligible candidate of the real policy's ``rank``. Engine KV events go through a
per-node :class:`BlockTracker` (engine hashes -> canonical hashes) into the one
:class:`PrefixIndex`, after ``kv_delay_s`` of virtual time (0: at the end of the step
that produced them).

The event loop is a heap of (time, seq, kind, payload): arrivals (pulled lazily from
the workload, one ahead), step completions, and delayed KV deliveries.

What keeps it cheap (a 12,000-request, 64-node run is about a minute of wall time): the
router reads the index and the nodes' load only when a request arrives, so KV events
delivered between two arrivals are held per node and applied as one batch just before
the next routing decision, and a node's row in the router's :class:`NodeTable` is
rewritten only if that node stepped, took a request or had KV events applied since the
last arrival (:func:`node_views`). Both give the policy exactly the state it would see if every
event were applied at once. A node runs
back-to-back steps while it has work; a step's outputs and events are visible at its
end. The router sees a node as production's router does: the load the node published
at the end of its last step (a node agent publishes on each engine step), plus the
requests the router sent it since, counted with their predicted uncached tokens.
Differences from production, all small: a request reaches the engine at the instant it
is routed (no network), and a node's state reaches the router with no delay.

Offered load (:func:`capacity_scale`): a request's work on one node, in seconds, is
``prompt / prefill_tokens_per_s + output * t_tok(ctx)``, where ``t_tok`` is the decode
cost of one token when the batch is as large as memory and ``max_num_seqs`` allow:
``base / B + per_seq + per_ctx * ctx``, ``ctx = prompt + output / 2``,
``B = min(max_num_seqs, num_blocks * block_size / mean ctx)``. No prefix caching is
credited, so capacity does not depend on the policy: at ``load`` 1.0 a cache-blind
fleet is saturated; a policy that hits the cache has headroom. Arrival times are scaled
so the total work divided by (nodes x span) equals ``load``.
"""

from __future__ import annotations

import gc
import heapq
import math
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Iterable, Iterator

import numpy as np

from kvfleet.controller.router.index import PrefixIndex
from kvfleet.controller.router.policy import ArrivalRate, NodeTable, NodeView, PrefixRates, RouteRequest, get_policy
from kvfleet.controller.sim.workloads import TraceRequest
from kvfleet.hashing import block_hashes
from kvfleet.node_agent.block_tracker import BlockTracker
from kvfleet.node_agent.engine import EngineRequest, LoadSnapshot
from kvfleet.node_agent.engines.sim_core import SimConfig, SimEngineCore, StepResult
from kvfleet.node_agent.kv_events import KVEventBatch

_ARRIVAL, _STEP_DONE, _KV = 0, 1, 2


def clip(req: TraceRequest, config: SimConfig) -> TraceRequest:
    """``req`` shortened to fit ``max_model_len`` (the prompt's tail is dropped; the output
    keeps at least 1 token)."""
    out = min(req.output_tokens, config.max_model_len - 1)
    n = min(len(req.prompt), config.max_model_len - out)
    if n == len(req.prompt) and out == req.output_tokens:
        return req
    return TraceRequest(req.arrival_s, req.prompt[:n], out)


@dataclass(slots=True)
class TraceStats:
    """One pass over a workload: what capacity and the bounds need."""

    requests: int = 0
    prompt_tokens: int = 0
    output_tokens: int = 0
    span_s: float = 0.0               # last arrival - first arrival, workload seconds
    work_s: float = 0.0               # node-seconds of work, no caching
    infinite_hit_tokens: int = 0      # every block seen before is a hit
    pooled_lru_hit_tokens: int = 0    # one LRU of nodes x num_blocks blocks

    @property
    def infinite_hit_rate(self) -> float:
        return self.infinite_hit_tokens / max(self.prompt_tokens, 1)

    @property
    def pooled_lru_hit_rate(self) -> float:
        return self.pooled_lru_hit_tokens / max(self.prompt_tokens, 1)


def trace_stats(workload: Iterable[TraceRequest], config: SimConfig, nodes: int) -> TraceStats:
    """Bounds and offered work of ``workload`` on ``nodes`` engines of ``config``.

    Both bounds count hits as the engine does: the leading run of cached full blocks,
    capped at ``(prompt - 1) // block_size`` blocks; after the lookup every full prompt
    block is inserted (LRU: touched, evicting the least recently used). O(total blocks).
    """
    bs = config.block_size
    st = TraceStats()
    seen: set[int] = set()
    lru: OrderedDict[int, None] = OrderedDict()
    cap = nodes * config.num_blocks
    first = last = None
    lens: list[tuple[int, int]] = []
    for r in workload:
        r = clip(r, config)
        n = len(r.prompt)
        lens.append((n, r.output_tokens))
        st.requests += 1
        st.prompt_tokens += n
        st.output_tokens += r.output_tokens
        first = r.arrival_s if first is None else first
        last = r.arrival_s
        hashes = block_hashes(r.prompt, bs).tolist()
        limit = max(n - 1, 0) // bs
        k = 0
        while k < min(limit, len(hashes)) and hashes[k] in seen:
            k += 1
        st.infinite_hit_tokens += k * bs
        seen.update(hashes)
        k = 0
        while k < min(limit, len(hashes)) and hashes[k] in lru:
            k += 1
        st.pooled_lru_hit_tokens += k * bs
        for h in reversed(hashes):            # leaf first, so the root is most recent
            if h in lru:
                lru.move_to_end(h)
            else:
                lru[h] = None
                if len(lru) > cap:
                    lru.popitem(last=False)
    st.span_s = float(last - first) if st.requests > 1 else 0.0
    if lens:
        a = np.array(lens, dtype=np.float64)
        ctx = a[:, 0] + a[:, 1] / 2
        batch = max(1.0, min(config.max_num_seqs, config.num_blocks * bs / max(float(ctx.mean()), 1.0)))
        t_tok = (config.decode_step_base_s / batch + config.decode_step_per_seq_s
                 + config.decode_step_per_context_token_s * ctx)
        st.work_s = float((a[:, 0] / config.prefill_tokens_per_s + a[:, 1] * t_tok).sum())
    return st


def capacity_scale(stats: TraceStats, nodes: int, load: float) -> float:
    """Factor to multiply workload arrival times by so the offered work is ``load`` of
    the fleet's capacity (see the module docstring)."""
    if stats.span_s <= 0 or stats.work_s <= 0:
        return 1.0
    return float(stats.work_s / (load * nodes) / stats.span_s)


@dataclass(slots=True)
class _Node:
    node_id: str
    core: SimEngineCore
    tracker: BlockTracker
    slot: int
    busy: bool = False
    busy_s: float = 0.0               # sum of step durations
    seq: int = -1                     # KV batch sequence number, as the node agent numbers it
    pending: list = field(default_factory=list)  # KV events delivered, not yet applied to the index
    published: LoadSnapshot = field(default_factory=lambda: LoadSnapshot(0, 0, 0.0, 0))  # load as of its last step end
    sent: int = 0                     # requests the router sent since then
    sent_tokens: int = 0              # their uncached tokens, as the router predicted them
    work_since: float = math.inf      # since when it has had the prefill the router counts (see policy.queued_now)


def fleet_table(fleet: list[_Node], config: SimConfig) -> NodeTable:
    """The router's table of ``fleet`` (one row per node, fleet order), every node idle;
    :func:`node_views` keeps it current."""
    decode_tps = 1.0 / (config.decode_step_base_s + config.decode_step_per_seq_s)
    return NodeTable.from_views(NodeView(
        node_id=nd.node_id, address="", routable=True, block_size=config.block_size,
        num_blocks=config.num_blocks, prefill_tokens_per_s=config.prefill_tokens_per_s,
        decode_tokens_per_s=decode_tps, running=0, waiting=0, kv_usage=0.0, queued_prefill_tokens=0,
        cached_blocks=0, slot=nd.slot, max_num_batched_tokens=config.max_num_batched_tokens,
        max_num_seqs=config.max_num_seqs,
    ) for nd in fleet)


def node_views(fleet: list[_Node], index: PrefixIndex, table: NodeTable, stale: set[int]) -> NodeTable:
    """The policy's input: ``table`` with the rows of the nodes in ``stale`` rewritten from
    the load each node last published (at the end of its last step) plus the requests the
    router sent it since, and the index; ``stale`` emptied.

    The one place the simulator writes what the router sees of a node, as the router's
    fleet view does on a state change (node state plus its own pending requests). O(len(stale)).
    """
    for i in stale:
        nd = fleet[i]
        ld = nd.published
        table.update(nd.node_id, running=ld.running, waiting=ld.waiting + nd.sent, kv_usage=ld.kv_usage,
                     queued_prefill_tokens=ld.queued_prefill_tokens + nd.sent_tokens,
                     cached_blocks=index.blocks_of(nd.slot), decode_step_s=ld.decode_step_s,
                     work_since_s=nd.work_since)
    stale.clear()
    return table


@dataclass(slots=True)
class RequestResult:
    arrival_s: float                  # virtual seconds
    node: int                         # index of the node it ran on
    prompt_tokens: int
    output_tokens: int
    cached_tokens: int = -1           # engine-reported prompt tokens served from cache
    ttft_s: float = math.nan
    e2e_s: float = math.nan


@dataclass(slots=True)
class SimResult:
    policy: str
    requests: list[RequestResult]
    busy_s: list[float]               # per node
    makespan_s: float                 # first arrival to last completion, virtual seconds
    preemptions: int
    steps: int
    wall_s: float = 0.0               # real seconds the simulation took
    cpu_s: float = 0.0                # CPU seconds of this process (wall_s is inflated on a busy machine)

    def summary(self) -> dict:
        done = [r for r in self.requests if not math.isnan(r.e2e_s)]
        ttft = np.array([r.ttft_s for r in done])
        e2e = np.array([r.e2e_s for r in done])
        prompt = sum(r.prompt_tokens for r in self.requests)
        busy = np.array(self.busy_s)
        pct = (lambda a, q: float(np.percentile(a, q)) if a.size else math.nan)
        return {
            "policy": self.policy,
            "requests": len(self.requests),
            "completed": len(done),
            "hit_rate": sum(max(r.cached_tokens, 0) for r in self.requests) / max(prompt, 1),
            "ttft_mean_s": float(ttft.mean()) if ttft.size else math.nan,
            "ttft_p50_s": pct(ttft, 50), "ttft_p90_s": pct(ttft, 90), "ttft_p99_s": pct(ttft, 99),
            "e2e_p99_s": pct(e2e, 99),
            "throughput_req_s": len(done) / self.makespan_s if self.makespan_s > 0 else math.nan,
            "throughput_out_tok_s": sum(r.output_tokens for r in done) / self.makespan_s if self.makespan_s > 0 else math.nan,
            "load_imbalance": float(busy.max() / busy.mean()) if busy.size and busy.mean() > 0 else math.nan,
            "busy_s": [round(b, 3) for b in self.busy_s],
            "preemptions": self.preemptions,
            "steps": self.steps,
            "makespan_s": self.makespan_s,
            "wall_s": self.wall_s,
            "cpu_s": self.cpu_s,
        }


def simulate(workload: Iterable[TraceRequest], policy: str, config: SimConfig, nodes: int, *,
             time_scale: float = 1.0, kv_delay_s: float = 0.0) -> SimResult:
    """Replays ``workload`` (arrivals times ``time_scale``) on ``nodes`` engines routed by
    the registered policy ``policy``. Deterministic.

    Cost per arrival: hashing the prompt, rewriting the table rows of the nodes that changed,
    one batched KV apply per node with new events, and the policy's ``rank``; per engine
    step: the core's ``step`` and one pass over its outputs.
    """
    # The simulation makes millions of long-lived objects (cached blocks, live requests)
    # and almost no reference cycles, so the cyclic collector's passes over them only cost
    # time: about a quarter of a 10,000-request, 1,000-node run, more as the heap grows.
    # It runs again, and collects what few cycles there are, when the simulation ends.
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        return _simulate(workload, policy, config, nodes, time_scale=time_scale, kv_delay_s=kv_delay_s)
    finally:
        if gc_was_enabled:
            gc.enable()


def _simulate(workload: Iterable[TraceRequest], policy: str, config: SimConfig, nodes: int, *,
              time_scale: float, kv_delay_s: float) -> SimResult:
    wall0, cpu0 = time.perf_counter(), time.process_time()
    pol = get_policy(policy)
    index = PrefixIndex()
    fleet = []
    for i in range(nodes):
        nid = f"node-{i:04d}"
        fleet.append(_Node(nid, SimEngineCore(config), BlockTracker(config.model, config.block_size), index.add_node(nid)))
    by_id = {n.node_id: i for i, n in enumerate(fleet)}
    bs = config.block_size
    results: list[RequestResult] = []
    live: dict[str, RequestResult] = {}
    heap: list[tuple[float, int, int, object]] = []
    counter = 0
    steps = 0
    arrivals: Iterator[TraceRequest] = iter(workload)
    table = fleet_table(fleet, config)
    arrival_rate = ArrivalRate()            # the router's arrival rate, as production measures it
    shared_rates = PrefixRates()            # and its rates by deepest cached block (policy.PrefixRates)
    stale: set[int] = set()                 # nodes whose row in ``table`` is out of date
    unapplied: set[int] = set()             # nodes with KV events not yet in the index

    def push(t: float, kind: int, payload: object) -> None:
        nonlocal counter
        heapq.heappush(heap, (t, counter, kind, payload))
        counter += 1

    def next_arrival() -> None:
        r = next(arrivals, None)
        if r is not None:
            push(r.arrival_s * time_scale, _ARRIVAL, r)

    def deliver(i: int, events: list) -> None:
        # Held until the router next reads the index; see the module docstring.
        fleet[i].pending.extend(events)
        unapplied.add(i)

    def apply_kv() -> None:
        for i in unapplied:
            n = fleet[i]
            n.seq += 1
            delta = n.tracker.apply(n.seq, KVEventBatch(ts=0.0, events=n.pending))
            n.pending = []
            if delta.cleared:
                index.clear(n.slot)
            if delta.removed:
                index.remove(n.slot, np.array(delta.removed, dtype=np.uint64))
            if delta.stored:
                index.store(n.slot, np.array(delta.stored, dtype=np.uint64))
            stale.add(i)
        unapplied.clear()

    def publish(i: int, t: float) -> None:
        # The node's state update at a step end: its engine's load now, which counts
        # every request the router sent it so far.
        n = fleet[i]
        n.published, n.sent, n.sent_tokens = n.core.load(), 0, 0
        n.work_since = t if n.published.queued_prefill_tokens > 0 else math.inf
        stale.add(i)

    def start_step(i: int, t: float) -> None:
        nonlocal steps
        n = fleet[i]
        res = n.core.step(t)          # the core is now past this step; the router sees it at the step's end
        steps += 1
        if res.duration_s <= 0 and not res.outputs:
            # Nothing could be scheduled (cannot happen while a request is running or fits).
            n.busy = False
            publish(i, t)
            return
        n.busy = True
        n.busy_s += res.duration_s
        push(t + res.duration_s, _STEP_DONE, (i, res))

    first_arrival = None
    now = 0.0
    next_arrival()
    while heap:
        now, _, kind, payload = heapq.heappop(heap)
        if kind == _ARRIVAL:
            r = clip(payload, config)  # type: ignore[arg-type]
            first_arrival = now if first_arrival is None else first_arrival
            rid = f"r{len(results)}"
            n_prompt = len(r.prompt)
            req = RouteRequest(block_hashes(r.prompt, bs), n_prompt, bs, r.output_tokens, arrival_rate.arrive(now), now,
                               shared_rates=shared_rates)
            if unapplied:
                apply_kv()
            ranked = pol.rank(req, node_views(fleet, index, table, stale), index)
            if getattr(ranked, "prefix_key", 0):
                shared_rates.arrive(ranked.prefix_key, now)
            if not ranked or not ranked[0].eligible:
                raise ValueError(f"request {rid} ({n_prompt} prompt tokens) fits no node")
            i = by_id[ranked[0].node_id]
            rr = RequestResult(now, i, n_prompt, r.output_tokens)
            results.append(rr)
            live[rid] = rr
            fleet[i].core.add_request(
                EngineRequest(request_id=rid, prompt_token_ids=r.prompt.tolist(), max_tokens=r.output_tokens,
                              temperature=0.0, seed=len(results)), now)
            if fleet[i].work_since == math.inf:
                fleet[i].work_since = now
            fleet[i].sent += 1
            fleet[i].sent_tokens += ranked[0].uncached_tokens
            stale.add(i)
            if not fleet[i].busy:
                start_step(i, now)
            next_arrival()
        elif kind == _STEP_DONE:
            i, res = payload  # type: ignore[misc]
            n = fleet[i]
            for rid, out in res.outputs:
                # Only a request's first output (it carries num_cached_tokens) and its last matter.
                if out.num_cached_tokens is None and not out.finished:
                    continue
                rr = live[rid]
                if out.num_cached_tokens is not None:
                    rr.cached_tokens = out.num_cached_tokens
                if math.isnan(rr.ttft_s):
                    rr.ttft_s = now - rr.arrival_s
                if out.finished:
                    rr.e2e_s = now - rr.arrival_s
                    del live[rid]
            if res.events:
                if kv_delay_s > 0:
                    push(now + kv_delay_s, _KV, (i, res.events))
                else:
                    deliver(i, res.events)
            publish(i, now)
            if n.core.has_work():
                start_step(i, now)
            else:
                n.busy = False
        else:
            deliver(*payload)  # type: ignore[misc]
    makespan = float(now - (first_arrival or 0.0))
    return SimResult(
        policy=policy, requests=results, busy_s=[n.busy_s for n in fleet], makespan_s=makespan,
        preemptions=sum(n.core.stats.num_preemptions for n in fleet), steps=steps,
        wall_s=time.perf_counter() - wall0, cpu_s=time.process_time() - cpu0,
    )
