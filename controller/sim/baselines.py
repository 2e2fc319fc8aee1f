"""Published routing policies, re-implemented from their public descriptions as kvfleet
policies, for ``kvfleet bench routing``.

Importing this module registers ``prefix_hash``, ``sglang``, ``dynamo``, ``llmd`` and
``preble`` in :data:`~kvfleet.controller.router.policy.POLICIES`. It changes nothing
else: the router's default policy stays ``kvfleet``. Each one filters with the shared
:func:`evaluate` (so eligibility is the same for every policy) and differs only in how
it orders the eligible nodes. Ties go to the lower node id, so runs are deterministic
(the originals break ties at random).

All of them see the router's exact, event-fed :class:`PrefixIndex`. ``sglang``
and ``preble`` originally keep an approximate tree of the prompts they routed; giving
them the exact index can only help them.
"""

from __future__ import annotations

import bisect
from typing import Sequence

import numpy as np

from kvfleet.controller.router.index import PrefixIndex
from kvfleet.controller.router.policy import (
    Candidate,
    NodeView,
    RouteRequest,
    _node_ids,
    candidates,
    evaluate,
    register,
)
from kvfleet.hashing import fmix_int


def _order(nodes: Sequence[NodeView], idx: np.ndarray, *keys: np.ndarray) -> np.ndarray:
    """``idx`` sorted by ``keys`` (first key most significant, ascending), then node id."""
    return idx[np.lexsort((_node_ids(nodes, idx), *[k[idx] for k in reversed(keys)]))]


def _stable_hash(node_id: str) -> int:
    """A stable 64-bit value of a node id (Python's ``hash`` of str is salted per process)."""
    h = 0
    for b in node_id.encode():
        h = fmix_int(h ^ b)
    return h


@register("prefix_hash")
class PrefixHash:
    """Consistent hashing on the first ``PREFIX_BLOCKS`` blocks of the prompt.

    Ring of ``VNODES`` virtual points per node (fmix64 of the node id and replica);
    the key is the chained hash of block ``min(PREFIX_BLOCKS, n) - 1``, which names the
    whole leading prefix. Nodes are ranked in the order the ring walk first meets them
    clockwise from the key. Blind to load. Prompts shorter than a block hash to key 0.
    """

    PREFIX_BLOCKS = 8
    VNODES = 64
    __slots__ = ("_ring_for", "_points", "_owners")

    def __init__(self) -> None:
        self._ring_for: tuple[str, ...] = ()
        self._points: list[int] = []
        self._owners: list[str] = []

    def _ring(self, ids: tuple[str, ...]) -> None:
        if ids == self._ring_for:
            return
        pts = sorted(
            (fmix_int(_stable_hash(nid) + r * 0x9E3779B97F4A7C15), nid)
            for nid in ids for r in range(self.VNODES)
        )
        self._points = [p for p, _ in pts]
        self._owners = [o for _, o in pts]
        self._ring_for = ids

    def rank(self, request: RouteRequest, nodes: Sequence[NodeView], index: PrefixIndex) -> list[Candidate]:
        ev = evaluate(request, nodes, index)
        idx = np.flatnonzero(ev.eligible)
        if idx.size == 0:
            return candidates(nodes, ev, idx)
        self._ring(tuple(sorted(nodes[i].node_id for i in idx.tolist())))
        h = request.block_hashes
        key = int(h[min(self.PREFIX_BLOCKS, len(h)) - 1]) if len(h) else 0
        pos = {nodes[i].node_id: i for i in idx.tolist()}
        start = bisect.bisect_left(self._points, key)
        order: list[int] = []
        seen: set[str] = set()
        m = len(self._owners)
        for k in range(m):
            o = self._owners[(start + k) % m]
            if o not in seen:
                seen.add(o)
                order.append(pos[o])
                if len(order) == idx.size:
                    break
        return candidates(nodes, ev, np.array(order, dtype=np.int64))


@register("sglang")
class SGLangCacheAware:
    """SGLang router's cache-aware policy (sgl-router ``cache_aware``).

    Load is requests in flight (running + waiting). If ``max - min > BALANCE_ABS`` and
    ``max > BALANCE_REL * min``, the shortest queue wins. Otherwise, if the best prefix
    match ratio (matched / prompt tokens) exceeds ``CACHE_THRESHOLD``, the best-matching
    node wins; else the node with the smallest tree (fewest cached blocks).
    """

    BALANCE_ABS = 64
    BALANCE_REL = 1.5
    CACHE_THRESHOLD = 0.3

    def rank(self, request: RouteRequest, nodes: Sequence[NodeView], index: PrefixIndex) -> list[Candidate]:
        ev = evaluate(request, nodes, index)
        idx = np.flatnonzero(ev.eligible)
        if idx.size == 0:
            return candidates(nodes, ev, idx)
        load = ev.running + np.fromiter((v.waiting for v in nodes), np.int64, len(nodes))
        hi, lo = int(load[idx].max()), int(load[idx].min())
        if hi - lo > self.BALANCE_ABS and hi > self.BALANCE_REL * lo:
            order = _order(nodes, idx, load)
        elif ev.cached[idx].max() / max(request.prompt_tokens, 1) > self.CACHE_THRESHOLD:
            order = _order(nodes, idx, -ev.cached, load)
        else:
            order = _order(nodes, idx, ev.cached_blocks, load)
        return candidates(nodes, ev, order)


@register("dynamo")
class Dynamo:
    """NVIDIA Dynamo's KV router cost, lowest wins (temperature 0)::

        cost = max(active_prefill_blocks + prompt_blocks - overlap_blocks, 0) + active_decode_blocks

    with ``active_prefill_blocks = queued_prefill_tokens / block_size``,
    ``prompt_blocks = ceil(prompt / block_size)``, ``overlap_blocks`` the cached blocks,
    and ``active_decode_blocks = kv_usage * num_blocks`` (blocks held by live requests).
    """

    def rank(self, request: RouteRequest, nodes: Sequence[NodeView], index: PrefixIndex) -> list[Candidate]:
        ev = evaluate(request, nodes, index)
        idx = np.flatnonzero(ev.eligible)
        bs = request.block_size
        prompt_blocks = -(-request.prompt_tokens // bs)
        decode = np.fromiter((v.kv_usage * v.num_blocks for v in nodes), np.float64, len(nodes))
        cost = np.maximum(ev.queued / bs + prompt_blocks - ev.cached // bs, 0) + decode
        return candidates(nodes, ev, _order(nodes, idx, cost))


@register("llmd")
class LLMD:
    """llm-d inference scheduler: weighted scorers, highest total wins.

    * prefix (weight 2.0): matched blocks / prompt blocks;
    * KV utilisation (1.0): ``1 - kv_usage``;
    * queue (1.0): waiting requests, min-max normalised over the candidates to [0, 1]
      (shortest queue 1; all equal -> 1).
    """

    WEIGHTS = (2.0, 1.0, 1.0)

    def rank(self, request: RouteRequest, nodes: Sequence[NodeView], index: PrefixIndex) -> list[Candidate]:
        ev = evaluate(request, nodes, index)
        idx = np.flatnonzero(ev.eligible)
        if idx.size == 0:
            return candidates(nodes, ev, idx)
        n = len(nodes)
        prompt_blocks = max(-(-request.prompt_tokens // request.block_size), 1)
        prefix = (ev.cached // request.block_size) / prompt_blocks
        kv = 1.0 - np.fromiter((v.kv_usage for v in nodes), np.float64, n)
        waiting = np.fromiter((v.waiting for v in nodes), np.float64, n)
        lo, hi = waiting[idx].min(), waiting[idx].max()
        queue = np.ones(n) if hi == lo else (hi - waiting) / (hi - lo)
        wp, wk, wq = self.WEIGHTS
        score = wp * prefix + wk * kv + wq * queue
        return candidates(nodes, ev, _order(nodes, idx, -score))


@register("preble")
class Preble:
    """Preble (Srivatsa et al., ICLR 2025), E2 scheduling: exploit or explore.

    If some node has more of the prompt cached than not (cached > uncached), the node
    with the longest match wins (exploit; among equal matches, the lower load). Otherwise
    the node with the lowest load cost wins (explore), where load cost is the prefill
    time queued on the node plus this request's prefill there, plus one decode step per
    running sequence: ``(queued + uncached) / prefill_rate + running / decode_rate``.
    Preble's history window and eviction-cost terms are not modelled.
    """

    def rank(self, request: RouteRequest, nodes: Sequence[NodeView], index: PrefixIndex) -> list[Candidate]:
        ev = evaluate(request, nodes, index)
        idx = np.flatnonzero(ev.eligible)
        if idx.size == 0:
            return candidates(nodes, ev, idx)
        n = len(nodes)
        prate = np.fromiter((v.prefill_tokens_per_s for v in nodes), np.float64, n)
        drate = np.fromiter((v.decode_tokens_per_s for v in nodes), np.float64, n)
        with np.errstate(divide="ignore", invalid="ignore"):
            load = (ev.queued + ev.uncached) / prate + ev.running / drate
        if (ev.cached[idx] > ev.uncached[idx]).any():
            order = _order(nodes, idx, -ev.cached, load)
        else:
            order = _order(nodes, idx, load)
        return candidates(nodes, ev, order)
