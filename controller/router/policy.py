"""Routing policies: pure functions of (request, node views, prefix index) -> ranked nodes.

No I/O, no clock, no globals: a policy sees a :class:`RouteRequest`, frozen
:class:`NodeView` s and the :class:`~kvfleet.controller.router.index.PrefixIndex`, and
returns every node as a :class:`Candidate`, eligible ones first, best first. The only
state a policy may keep lives in the policy object (``round_robin``'s counter).

Every policy runs the same three steps and differs only in the last:

1. filter: a node is eligible when it is routable, serves the request's block size,
   has a known prefill rate, and can hold the whole sequence in its KV cache;
2. evaluate (vectorised over nodes): predicted cached tokens from ``index.match`` and
   the estimated time to first token, ``cost_s``;
3. order: by ``cost_s`` (``kvfleet``), by rotation (``round_robin``) or by queued
   prefill tokens (``least_loaded``).

Policies register by name in :data:`POLICIES`; :func:`get_policy` builds one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol, Sequence

import numpy as np

from kvfleet.controller.router.index import PrefixIndex


@dataclass(frozen=True, slots=True)
class NodeView:
    """A frozen view of one candidate node, as the router last saw it."""

    node_id: str
    address: str                  # host:port of the node agent
    routable: bool                # ready, not cordoned/draining/drained
    block_size: int               # tokens per KV block
    num_blocks: int               # KV capacity, blocks
    prefill_tokens_per_s: float   # prefill throughput, tokens/s
    decode_tokens_per_s: float    # decode speed of one sequence, tokens/s
    running: int                  # sequences in the running (decode) batch
    waiting: int                  # requests queued in the engine
    kv_usage: float               # fraction of KV blocks in use, 0..1
    queued_prefill_tokens: int    # node-reported queue + tokens sent that it does not show yet
    cached_blocks: int            # blocks in the node's prefix cache
    slot: int                     # the node's slot in the PrefixIndex (-1 if none)


@dataclass(frozen=True, slots=True)
class RouteRequest:
    """What the policy knows of one request."""

    block_hashes: np.ndarray      # canonical hashes of the prompt's full blocks (uint64)
    prompt_tokens: int            # prompt length, tokens
    block_size: int               # tokens per block the hashes were computed with
    max_tokens: int               # completion budget, tokens


@dataclass(frozen=True, slots=True)
class Candidate:
    """One node's place in a ranking."""

    node_id: str
    cached_tokens: int            # predicted prompt tokens served from cache on this node
    uncached_tokens: int          # prompt tokens the node must prefill
    queued_prefill_tokens: int    # prefill tokens queued ahead of this request
    cost_s: float                 # estimated time to first token, seconds (inf if ineligible)
    eligible: bool
    reason: str                   # why not eligible; "" if eligible


class Policy(Protocol):
    """Ranks every node for a request: eligible first (best first), then the rest."""

    def rank(self, request: RouteRequest, nodes: Sequence[NodeView], index: PrefixIndex) -> list[Candidate]: ...


def predicted_cached_tokens(matched_blocks: int, prompt_tokens: int, block_size: int) -> int:
    """Prompt tokens an engine will serve from its prefix cache, vLLM's rule.

    vLLM always computes the last prompt token (its logits give the first output token),
    so at most ``(prompt_tokens - 1) // block_size`` blocks can be cache hits: a prompt of
    exactly ``k * block_size`` tokens can hit ``k - 1`` blocks, not ``k``.
    """
    return min(matched_blocks, max(prompt_tokens - 1, 0) // block_size) * block_size


# -- shared filter + evaluation ---------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Evaluation:
    """Column-wise facts about ``nodes`` (same order) that every policy orders by."""

    eligible: np.ndarray          # bool
    reasons: list[str]            # "" where eligible
    cached: np.ndarray            # int64, predicted cached prompt tokens
    uncached: np.ndarray          # int64, prompt tokens to prefill
    queued: np.ndarray            # int64, queued prefill tokens
    running: np.ndarray           # int64
    cached_blocks: np.ndarray     # int64
    cost_s: np.ndarray            # float64, estimated TTFT (inf where ineligible)


def evaluate(request: RouteRequest, nodes: Sequence[NodeView], index: PrefixIndex) -> Evaluation:
    """Filters the nodes and estimates each eligible one's time to first token.

    ``cost_s = (queued_prefill_tokens + uncached_tokens + running) / prefill_tokens_per_s``

    * queued + uncached: the prefill work queued ahead of this request plus its own, at
      the node's prefill rate.
    * running: decode interference. The engine step that runs this request's prefill
      also runs one decode token for each running sequence (vLLM schedules running
      requests first), and in that compute-bound step a decode token costs about what a
      prefill token does. That is a lower bound: a long prefill spans several steps, but
      how many depends on the engine's per-step token budget, which the view does not
      carry, so the policy charges no more than it can justify.

    Not in the cost: ``decode_tokens_per_s`` (it sets the time per output token, not the
    first one) and ``kv_usage`` (a full cache evicts, which costs later hits, not this
    request's TTFT; a sequence that cannot fit at all is filtered out).

    O(len(nodes)) plus one ``index.match`` over the eligible nodes' slots.
    """
    n = len(nodes)
    bs, prompt = request.block_size, request.prompt_tokens
    need_blocks = -(-(prompt + request.max_tokens) // bs)
    slot = np.fromiter([v.slot for v in nodes], np.int64, n)
    rate = np.fromiter([v.prefill_tokens_per_s for v in nodes], np.float64, n)
    queued = np.fromiter([v.queued_prefill_tokens for v in nodes], np.int64, n)
    running = np.fromiter([v.running for v in nodes], np.int64, n)
    cached_blocks = np.fromiter([v.cached_blocks for v in nodes], np.int64, n)
    eligible = np.fromiter(
        [v.routable and v.block_size == bs and v.prefill_tokens_per_s > 0 and v.num_blocks >= need_blocks
         for v in nodes], bool, n)
    reasons = [""] * n
    for i in np.flatnonzero(~eligible).tolist():
        reasons[i] = _ineligible(nodes[i], bs, need_blocks)
    matched = np.zeros(n, dtype=np.int64)
    lookup = np.flatnonzero(eligible & (slot >= 0))
    if lookup.size and len(request.block_hashes):
        matched[lookup] = index.match(request.block_hashes, slot[lookup])
    cached = np.minimum(matched, max(prompt - 1, 0) // bs) * bs
    uncached = prompt - cached
    with np.errstate(divide="ignore", invalid="ignore"):
        cost = np.where(eligible, (queued + uncached + running) / rate, np.inf)
    return Evaluation(eligible, reasons, cached, uncached, queued, running, cached_blocks, cost)


def _ineligible(v: NodeView, block_size: int, need_blocks: int) -> str:
    """Why ``v`` cannot take a request (the first reason that applies)."""
    if not v.routable:
        return "not routable (not ready, cordoned, draining or drained)"
    if v.block_size != block_size:
        return f"block_size {v.block_size} != request's {block_size}"
    if not v.prefill_tokens_per_s > 0:
        return "no prefill rate reported"
    return f"sequence needs {need_blocks} KV blocks, node has {v.num_blocks}"


def candidates(nodes: Sequence[NodeView], ev: Evaluation, order: np.ndarray) -> list[Candidate]:
    """``Candidate`` s for the eligible nodes in ``order``, then the ineligible by node id."""
    rest = sorted(np.flatnonzero(~ev.eligible).tolist(), key=lambda i: nodes[i].node_id)
    cached, uncached, queued, cost = (a.tolist() for a in (ev.cached, ev.uncached, ev.queued, ev.cost_s))
    return [
        Candidate(nodes[i].node_id, cached[i], uncached[i], queued[i], cost[i], not ev.reasons[i], ev.reasons[i])
        for i in [*order.tolist(), *rest]
    ]


def _node_ids(nodes: Sequence[NodeView], idx: np.ndarray) -> np.ndarray:
    return np.array([nodes[i].node_id for i in idx.tolist()], dtype=str)


# -- registry ---------------------------------------------------------------------------------
POLICIES: dict[str, Callable[[], Policy]] = {}
"""Policy factories by name (a policy may hold state, so each user gets its own)."""


def register(name: str) -> Callable[[Callable[[], Policy]], Callable[[], Policy]]:
    """Class decorator: makes a policy available to :func:`get_policy` as ``name``."""

    def add(factory: Callable[[], Policy]) -> Callable[[], Policy]:
        if name in POLICIES:
            raise ValueError(f"policy {name!r} registered twice")
        POLICIES[name] = factory
        return factory

    return add


def get_policy(name: str) -> Policy:
    """A new instance of the policy registered as ``name``."""
    factory = POLICIES.get(name)
    if factory is None:
        raise ValueError(f"unknown routing policy {name!r}; known: {', '.join(sorted(POLICIES))}")
    return factory()


# -- policies ---------------------------------------------------------------------------------
@register("kvfleet")
class EstimatedTTFT:
    """Lowest estimated time to first token (see :func:`evaluate` for ``cost_s``).

    Cache affinity and load balance are one trade-off in one unit: a cached prefix saves
    its prefill time, and a queue costs its prefill time. Under a burst on one prefix the
    cached node's queue grows until it costs more than recomputing the prefix elsewhere,
    and the next request goes elsewhere; no threshold decides that.

    Ties (e.g. an idle fleet and prompts nobody holds) go to the node with fewer cached
    blocks, i.e. more free cache, so distinct prefixes spread; then to the lower node id.
    """

    def rank(self, request: RouteRequest, nodes: Sequence[NodeView], index: PrefixIndex) -> list[Candidate]:
        ev = evaluate(request, nodes, index)
        idx = np.flatnonzero(ev.eligible)
        order = idx[np.lexsort((_node_ids(nodes, idx), ev.cached_blocks[idx], ev.cost_s[idx]))]
        return candidates(nodes, ev, order)


@register("least_loaded")
class LeastLoaded:
    """Fewest queued prefill tokens, then fewest running sequences, then node id. Blind
    to the cache: a baseline."""

    def rank(self, request: RouteRequest, nodes: Sequence[NodeView], index: PrefixIndex) -> list[Candidate]:
        ev = evaluate(request, nodes, index)
        idx = np.flatnonzero(ev.eligible)
        order = idx[np.lexsort((_node_ids(nodes, idx), ev.running[idx], ev.queued[idx]))]
        return candidates(nodes, ev, order)


@register("round_robin")
class RoundRobin:
    """Eligible nodes in node-id order, rotated by one per ranked request. Blind to cache
    and load: a baseline. The rotation counter is this object's only state."""

    __slots__ = ("_turn",)

    def __init__(self) -> None:
        self._turn = 0

    def rank(self, request: RouteRequest, nodes: Sequence[NodeView], index: PrefixIndex) -> list[Candidate]:
        ev = evaluate(request, nodes, index)
        idx = np.flatnonzero(ev.eligible)
        order = idx[np.argsort(_node_ids(nodes, idx), kind="stable")]
        if order.size:
            order = np.roll(order, -(self._turn % order.size))
            self._turn += 1
        return candidates(nodes, ev, order)
