"""Routing policies: pure functions of (request, node table, prefix index) -> ranked nodes.

No I/O, no clock, no globals: a policy sees a :class:`RouteRequest`, the candidate nodes
(a :class:`~kvfleet.controller.router.nodes.NodeTable` of columns, or any sequence of
frozen :class:`NodeView` s, which is turned into one) and the
:class:`~kvfleet.controller.router.index.PrefixIndex`, and returns every node as a
:class:`Candidate`, eligible ones first, best first. The only state a policy may keep
lives in the policy object (``round_robin``'s counter).

Every policy runs the same three steps and differs only in the last:

1. filter: a node is eligible when it is routable, serves the request's block size,
   has a known prefill rate, and can hold the whole sequence in its KV cache;
2. evaluate (vectorised over the table's columns): predicted cached tokens from
   ``index.match`` and the estimated time to first token, :func:`estimated_ttft_s`;
3. order: by ``cost_s`` (``kvfleet``), by rotation (``round_robin``) or by queued
   prefill tokens (``least_loaded``).

The ranking is a :class:`Ranking`: a list-like sequence that builds a node's
:class:`Candidate` only when it is read, and sorts beyond the best few only when
something reads that far. Ranking 1,000 nodes thus costs a few NumPy passes over
columns, not 1,000 Python objects.

Policies register by name in :data:`POLICIES`; :func:`get_policy` builds one.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Iterator, Protocol, Sequence, overload

import math

import numpy as np

from kvfleet.controller.router import cost as _cost
from kvfleet.controller.router.index import PrefixIndex
from kvfleet.controller.router.nodes import NodeTable, NodeView

__all__ = [
    "POLICIES", "ArrivalRate", "Candidate", "PrefixRates", "Evaluation", "NodeTable", "NodeView", "Policy", "Ranking", "RouteRequest",
    "as_table", "candidates", "estimated_ttft_s", "evaluate", "get_policy", "predicted_cached_tokens", "queued_now",
    "register",
]

HEAD = 8
"""A ranking sorts its best HEAD nodes (plus any tied with the last of them) up front;
the rest only when read."""


@dataclass(frozen=True, slots=True)
class RouteRequest:
    """What the policy knows of one request."""

    block_hashes: np.ndarray      # canonical hashes of the prompt's full blocks (uint64)
    prompt_tokens: int            # prompt length, tokens
    block_size: int               # tokens per block the hashes were computed with
    max_tokens: int               # completion budget, tokens
    arrival_rate: float = 0.0     # requests/s arriving for this model (the router's recent rate; 0: unknown)
    now_s: float = float("-inf")  # the router's clock at the decision (same clock as work_since_s; -inf: none)
    latency_weight: float = 1.0   # what a second of this request's own TTFT is worth against a second of
                                  # delay to others (1: interactive; lower for flex and batch, which pay
                                  # less for latency, so their cost leans further towards cache affinity)
    shared_rates: PrefixRates | None = None  # the router's rates of requests by deepest cached block (None: not
                                             # kept; then every arrival counts in the delay term)


class ArrivalRate:
    """Requests per second, as an exponentially weighted rate with time constant ``tau_s``:
    each arrival adds ``1 / tau_s`` and the rate decays by ``exp(-dt / tau_s)``. The caller
    passes the clock, so the estimator is a pure function of the arrival times. A steady
    stream of ``r`` requests/s converges to ``r``."""

    __slots__ = ("tau_s", "_rate", "_t")

    def __init__(self, tau_s: float = 5.0) -> None:
        if not tau_s > 0:
            raise ValueError("tau_s must be > 0")
        self.tau_s, self._rate, self._t = tau_s, 0.0, None

    def arrive(self, now: float) -> float:
        """Counts one arrival at ``now`` (seconds, non-decreasing); returns the rate including it."""
        if self._t is not None:
            self._rate *= math.exp(-max(now - self._t, 0.0) / self.tau_s)
        self._rate += 1.0 / self.tau_s
        self._t = now
        return self._rate

    def peek(self, now: float) -> float:
        """The rate at ``now`` without counting an arrival."""
        if self._t is None:
            return 0.0
        return self._rate * math.exp(-max(now - self._t, 0.0) / self.tau_s)


class PrefixRates:
    """Arrival rates of recent requests, by the deepest block of their prompt that some
    node held when they were routed (:attr:`Ranking.prefix_key`): how many requests per
    second share that cached prefix. One :class:`ArrivalRate` per block, the
    ``max_entries`` most recently used kept (a burst's prefix is always recent).

    The cost's delay term leaves these requests out of the traffic a recomputation
    delays (see :func:`evaluate`)."""

    __slots__ = ("tau_s", "max_entries", "_rates")

    def __init__(self, tau_s: float = 5.0, max_entries: int = 65_536) -> None:
        self.tau_s, self.max_entries = tau_s, max_entries
        self._rates: OrderedDict[int, ArrivalRate] = OrderedDict()

    def peek(self, block_hash: int, now: float) -> float:
        """Requests/s recently routed with ``block_hash`` as their deepest cached block."""
        r = self._rates.get(block_hash)
        return 0.0 if r is None else r.peek(now)

    def arrive(self, block_hash: int, now: float) -> None:
        """Counts one request routed at ``now`` whose deepest cached block was ``block_hash``."""
        r = self._rates.get(block_hash)
        if r is None:
            r = self._rates[block_hash] = ArrivalRate(self.tau_s)
            if len(self._rates) > self.max_entries:
                self._rates.popitem(last=False)
        else:
            self._rates.move_to_end(block_hash)
        r.arrive(now)

    def __len__(self) -> int:
        return len(self._rates)


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
    credit_s: float = 0.0         # replica credit (s) ``kvfleet`` subtracts from cost_s to rank (evaluate)


Nodes = NodeTable | Sequence[NodeView]
"""What a policy accepts as candidate nodes."""


class Policy(Protocol):
    """Ranks every node for a request: eligible first (best first), then the rest."""

    def rank(self, request: RouteRequest, nodes: Nodes, index: PrefixIndex) -> Sequence[Candidate]: ...


def as_table(nodes: Nodes) -> NodeTable:
    """``nodes`` as a :class:`NodeTable` (itself if it is one; else built, O(n) Python)."""
    return nodes if isinstance(nodes, NodeTable) else NodeTable.from_views(nodes)


def predicted_cached_tokens(matched_blocks: int, prompt_tokens: int, block_size: int) -> int:
    """Prompt tokens an engine will serve from its prefix cache, vLLM's rule.

    vLLM always computes the last prompt token (its logits give the first output token),
    so at most ``(prompt_tokens - 1) // block_size`` blocks can be cache hits: a prompt of
    exactly ``k * block_size`` tokens can hit ``k - 1`` blocks, not ``k``.
    """
    return min(matched_blocks, max(prompt_tokens - 1, 0) // block_size) * block_size


# -- the cost ---------------------------------------------------------------------------------
def estimated_ttft_s(queued_prefill_tokens: np.ndarray, uncached_tokens: np.ndarray, running: np.ndarray,
                     prefill_tokens_per_s: np.ndarray, decode_step_s: np.ndarray,
                     max_num_batched_tokens: np.ndarray, arrivals_per_node_s: float,
                     latency_weight: float = 1.0) -> np.ndarray:
    """kvfleet's cost, seconds, vectorised over nodes: the request's estimated time to
    first token on each node plus the delay its prefill adds to the requests that will
    arrive at that node while it is ahead of them.

    With ``Q`` = queued prefill tokens, ``U`` = this request's uncached tokens, ``R`` =
    running sequences, ``rate`` = prefill tokens/s, ``D`` = the node's current decode
    step (s), ``B`` = its token budget per step, ``lam`` = requests/s arriving per node::

        work  = Q + U                                   tokens to prefill up to our first token
        steps = ceil(work / (B - R))                    vLLM runs the R decodes first in each step
        ttft  = work / rate + steps * D + (D / 2 if the node is busy)
        cost  = w * ttft + (lam * ttft) * U / rate

    * ``work / rate``: the prefill queued ahead plus our own.
    * ``steps * D``: every engine step that carries part of that prefill also decodes the
      running batch, which takes ``D`` (reported by the node: its model on the sim
      engine, the recent inter-token latency on vLLM). With ``B`` unknown (0) the
      prefill is taken to fit one step. Where ``D`` is unknown the decode cost falls back
      to ``R / rate`` (a decode token costs about a prefill token in a compute-bound
      step).
    * ``D / 2``: on a busy node a new request first waits for the step in progress,
      half of one on average. (A node with no running batch has ``D = 0``, so the term
      needs no separate busy test.)
    * ``(lam * ttft) * U / rate``: the delay imposed on others. The requests that reach
      the node while this one is queued or prefilling (``lam * ttft`` of them, by
      Little's law) wait for its ``U`` prefill tokens. This is what makes a cache hit
      worth more on a busy fleet than on an idle one: recomputing a prefix on an empty
      node costs that node's next arrivals the recomputation, and the busier the fleet,
      the more of them there are. At ``lam = 0`` (no traffic yet) the cost is the TTFT.

    There are no thresholds: every term is seconds derived from the nodes' reports and
    the arrival rate. Not in the cost: ``kv_usage`` beyond the decode step (a full cache
    evicts, which costs later hits, not this request's TTFT; a sequence that cannot fit at
    all is filtered out).

    All arguments but the arrival rate and the weight are arrays over the same nodes (or
    scalars), with rates > 0. The formula itself is :func:`.cost.ttft_cost`, compiled;
    this function applies it elementwise, and :func:`evaluate` applies it to the
    eligible rows of a table in the same compiled pass that filters them.
    """
    out = np.broadcast_arrays(*(np.asarray(a, np.float64) for a in (
        queued_prefill_tokens, uncached_tokens, running, prefill_tokens_per_s, decode_step_s, max_num_batched_tokens)))
    cost = np.empty(out[0].shape)
    _cost.ttft_cost_array(*(a.ravel() for a in out), float(arrivals_per_node_s), float(latency_weight), cost.ravel())
    return cost


def queued_now(queued_prefill_tokens: np.ndarray, work_since_s: np.ndarray, prefill_tokens_per_s: np.ndarray,
               now_s: float) -> np.ndarray:
    """The prefill still queued on each node now: what the router last knew (the node's
    report plus what it sent since) less what the node can have prefilled since it had
    that work (``work_since_s``: the state update that reported it, or the first send
    after an idle report). A node reports its state once per engine step, so a long
    prefill in progress would otherwise count in full until the step ends. Never below 0;
    unchanged where ``work_since_s`` is unknown (inf) or ``now_s`` is not given."""
    q, since, rate = np.broadcast_arrays(*(np.asarray(a, np.float64) for a in (
        queued_prefill_tokens, work_since_s, prefill_tokens_per_s)))
    out = np.empty(q.shape)
    _cost.queued_now_array(q.ravel(), since.ravel(), rate.ravel(), float(now_s), out.ravel())
    return out


# -- shared filter + evaluation ---------------------------------------------------------------
class Evaluation:
    """Column-wise facts about the nodes (by row of the table evaluated) that every policy
    orders by. A snapshot: it copies what it keeps, so a table that changes afterwards
    (the fleet's, as state updates arrive) does not change a ranking already made."""

    __slots__ = ("node_ids", "id_rank", "eligible", "n_eligible", "cached", "uncached", "queued", "running",
                 "cached_blocks", "cost_s", "prefix_key", "credit_s", "_why", "_block_size", "_need_blocks",
                 "_reasons")

    def __init__(self, nodes: NodeTable, eligible: np.ndarray, ineligible: np.ndarray, cached: np.ndarray,
                 uncached: np.ndarray, cost_s: np.ndarray, block_size: int, need_blocks: int,
                 prefix_key: int = 0, credit_s: np.ndarray | None = None) -> None:
        self.node_ids = nodes.node_ids                  # by row (a table replaces, never edits, it)
        self.id_rank = nodes.id_rank                    # rank of each row's node id (ditto)
        self.queued = nodes.queued_prefill_tokens.copy()  # int64, queued prefill tokens
        self.running = nodes.running.copy()             # int64
        self.cached_blocks = nodes.cached_blocks.copy()  # int64
        self.eligible = eligible          # bool
        self.n_eligible = len(eligible) - len(ineligible)
        self.cached = cached              # int64, predicted cached prompt tokens
        self.uncached = uncached          # int64, prompt tokens to prefill
        self.cost_s = cost_s              # float64, estimated TTFT (inf where ineligible)
        self.prefix_key = prefix_key      # hash of the prompt's deepest block an eligible node holds (0: none)
        self.credit_s = credit_s          # float64, replica credit (s) of the nodes lacking that block; None: none
        rows = ineligible                 # what the reasons need, for the ineligible rows only
        self._why = (rows, nodes.routable[rows], nodes.block_size[rows], nodes.prefill_tokens_per_s[rows],
                     nodes.num_blocks[rows])
        self._block_size, self._need_blocks = block_size, need_blocks
        self._reasons: list[str] | None = None

    @property
    def reasons(self) -> list[str]:
        """Why each node is not eligible; "" where it is. Built on first use."""
        if self._reasons is None:
            r = [""] * len(self.eligible)
            rows, *cols = self._why
            for i, routable, bs, rate, num_blocks in zip(rows.tolist(), *(c.tolist() for c in cols)):
                r[i] = _ineligible(routable, bs, rate, num_blocks, self._block_size, self._need_blocks)
            self._reasons = r
        return self._reasons


def evaluate(request: RouteRequest, nodes: Nodes, index: PrefixIndex) -> Evaluation:
    """Filters the nodes and estimates each eligible one's time to first token
    (:func:`estimated_ttft_s` of the queue as :func:`queued_now` estimates it at
    ``request.now_s``; ``inf`` where ineligible).

    The arrival rate in the delay term is the request's, less the rate of earlier
    requests whose deepest cached block was this prompt's (``request.shared_rates``): those
    would go to a node that recomputes the prefix for the hit, so its recomputation does
    not delay them (docs/routing.md, "Bursts on one prefix").

    Where that rate ``r`` is above 0, the nodes lacking the block also get a credit
    (``credit_s``; :func:`.cost.replica_credit_rows`): recomputing the prefix there makes one
    more holder of it for the ``r * tau`` requests expected to share it over the rate's
    horizon, ``1 / (holders + 1)`` of which would go there and each save what that node is
    faster than the best holder (docs/routing.md, "A popular prefix on one node").
    ``cost_s`` does not include it; ``kvfleet`` ranks by ``cost_s - credit_s``.

    Two compiled passes over the table's columns (:mod:`.cost`) around one
    ``index.match`` over the eligible nodes' slots; no per-node Python.
    """
    t = as_table(nodes)
    n = len(t)
    bs, prompt = request.block_size, request.prompt_tokens
    need_blocks = -(-(prompt + request.max_tokens) // bs)
    eligible = np.empty(n, np.bool_)
    lookup, ineligible = _cost.eligible_rows(t.routable, t.block_size, t.prefill_tokens_per_s, t.num_blocks, t.slot,
                                             bs, need_blocks, eligible)
    arrival_rate, prefix_key, shared_rate = request.arrival_rate, 0, 0.0
    if lookup.size and len(request.block_hashes):
        matched = np.asarray(index.match(request.block_hashes, t.slot[lookup]), np.int32)
        deepest = int(matched.max())
        if deepest > 0:
            # Requests that share this prompt's deepest cached prefix are not delayed by a
            # node recomputing it: they would go to that node for the hit. Left out of the
            # delay term, a burst on one prefix stops charging its own future arrivals to
            # every miss, and spills once waiting costs more than recomputing.
            prefix_key = int(request.block_hashes[deepest - 1])
            if request.shared_rates is not None:
                shared_rate = request.shared_rates.peek(prefix_key, request.now_s)
                arrival_rate = max(arrival_rate - shared_rate, 0.0)
    else:
        matched, lookup = _NO_MATCH, _NO_ROWS
    cached, uncached, cost = np.empty(n, np.int64), np.empty(n, np.int64), np.empty(n)
    _cost.evaluate_rows(eligible, n - ineligible.size, lookup, matched, bs, prompt, t.queued_prefill_tokens,
                        t.work_since_s, t.running, t.prefill_tokens_per_s, t.decode_step_s,
                        t.max_num_batched_tokens, float(arrival_rate), float(request.now_s),
                        float(request.latency_weight), cached, uncached, cost)
    credit = None
    if shared_rate > 0:
        # A node that recomputes the shared prefix becomes one more holder of it for the
        # requests that share it (see replica_credit_rows and docs/routing.md).
        credit = np.empty(n)
        _cost.replica_credit_rows(eligible, cached, prompt, t.queued_prefill_tokens, t.work_since_s, t.running,
                                  t.prefill_tokens_per_s, t.decode_step_s, t.max_num_batched_tokens,
                                  float(request.now_s), float(shared_rate), float(request.shared_rates.tau_s),
                                  credit)
    return Evaluation(t, eligible, ineligible, cached, uncached, cost, bs, need_blocks, prefix_key, credit)


_NO_MATCH = np.zeros(0, np.int32)
_NO_ROWS = np.zeros(0, np.int64)


def _ineligible(routable: bool, node_block_size: int, rate: float, num_blocks: int, block_size: int,
                need_blocks: int) -> str:
    """Why a node cannot take a request (the first reason that applies)."""
    if not routable:
        return "not routable (not ready, cordoned, draining or drained)"
    if node_block_size != block_size:
        return f"block_size {node_block_size} != request's {block_size}"
    if not rate > 0:
        return "no prefill rate reported"
    return f"sequence needs {need_blocks} KV blocks, node has {num_blocks}"


# -- rankings ---------------------------------------------------------------------------------
class Ranking(Sequence[Candidate]):
    """Every node as a :class:`Candidate`: the eligible ones in the policy's order, then
    the ineligible ones by node id. Behaves like a list (index, slice, iterate, ``len``,
    ``==`` a list); each Candidate is built when first read, and ``order`` (the eligible
    rows) may be given as a head plus a function that sorts the rest when needed."""

    __slots__ = ("_ev", "_head", "_tail", "_rows", "_built")

    def __init__(self, ev: Evaluation, head: np.ndarray, tail: Callable[[], np.ndarray] | None = None) -> None:
        self._ev = ev
        self._head = head                 # rows, best first
        self._tail = tail                 # () -> the remaining eligible rows, in order
        self._rows: list[int] | None = None
        self._built: dict[int, Candidate] = {}

    def _all_rows(self) -> list[int]:
        if self._rows is None:
            ev = self._ev
            order = self._head if self._tail is None else np.concatenate([self._head, self._tail()])
            rest = np.flatnonzero(~ev.eligible)
            rest = rest[np.argsort(ev.id_rank[rest], kind="stable")]
            self._rows = [*order.tolist(), *rest.tolist()]
        return self._rows

    def _row(self, i: int) -> int:
        if self._rows is None and 0 <= i < len(self._head):
            return int(self._head[i])
        return self._all_rows()[i]

    def _candidate(self, row: int) -> Candidate:
        c = self._built.get(row)
        if c is None:
            ev = self._ev
            ok = bool(ev.eligible[row])
            c = self._built[row] = Candidate(
                ev.node_ids[row], int(ev.cached[row]), int(ev.uncached[row]), int(ev.queued[row]),
                float(ev.cost_s[row]), ok, "" if ok else ev.reasons[row],
                0.0 if ev.credit_s is None else float(ev.credit_s[row]))
        return c

    def __len__(self) -> int:
        return len(self._ev.eligible)

    @property
    def prefix_key(self) -> int:
        """Hash of the prompt's deepest block an eligible node holds (0: none); the router
        counts the request under it in its :class:`PrefixRates`."""
        return self._ev.prefix_key

    @overload
    def __getitem__(self, i: int) -> Candidate: ...
    @overload
    def __getitem__(self, i: slice) -> list[Candidate]: ...
    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self._candidate(r) for r in self._all_rows()[i]]
        n = len(self)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError("ranking index out of range")
        return self._candidate(self._row(i))

    def __iter__(self) -> Iterator[Candidate]:
        for r in self._head.tolist():
            yield self._candidate(r)
        for r in self._all_rows()[len(self._head):]:
            yield self._candidate(r)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, (Ranking, list, tuple)):
            return list(self) == list(other)
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"Ranking({len(self)} nodes, best {self[0].node_id if len(self) else None})"


def ranked(ev: Evaluation, *keys: np.ndarray, head: int = HEAD) -> Ranking:
    """The eligible rows of ``ev`` ordered by ``keys`` (columns over all rows; first key
    most significant, ascending), then node id. Only the best ``head`` rows (and rows
    tied with them on the first key) are sorted now; the rest when read."""
    id_rank = ev.id_rank

    def order(r: np.ndarray) -> np.ndarray:
        return r[np.lexsort((id_rank[r], *[k[r] for k in reversed(keys)]))]

    if ev.n_eligible <= 4 * head:
        return Ranking(ev, order(np.flatnonzero(ev.eligible)))
    top, tail_rows = _cost.head_rows(np.asarray(keys[0], np.float64), ev.eligible, head)
    return Ranking(ev, order(top), lambda: order(tail_rows))


def candidates(nodes: Nodes, ev: Evaluation, order: np.ndarray) -> Ranking:
    """A :class:`Ranking` of the eligible rows in ``order``, then the ineligible by node id.
    (``nodes`` is unused: ``ev`` carries what the ranking needs; kept for the callers.)"""
    return Ranking(ev, np.asarray(order, dtype=np.int64))


def _node_ids(nodes: Nodes, idx: np.ndarray) -> np.ndarray:
    """Node ids of rows ``idx``, as an array to sort by (tables: their id rank)."""
    if isinstance(nodes, NodeTable):
        return nodes.id_rank[idx]
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
    """Lowest estimated time to first token (:func:`estimated_ttft_s`).

    Cache affinity and load balance are one trade-off in one unit: a cached prefix saves
    its prefill time, and a queue costs its prefill time. Under a burst on one prefix the
    cached node's queue grows until it costs more than recomputing the prefix elsewhere,
    and the next request goes elsewhere; no threshold decides that.

    A prefix that many requests share also earns a node that lacks it the time a second
    copy there would save them (:func:`evaluate`'s replica credit), so a popular prefix
    does not keep one node as its only holder while that node's batch grows.

    Ties (e.g. an idle fleet and prompts nobody holds) go to the node with fewer cached
    blocks, i.e. more free cache, so distinct prefixes spread; then to the lower node id.
    """

    def rank(self, request: RouteRequest, nodes: Nodes, index: PrefixIndex) -> Ranking:
        ev = evaluate(request, nodes, index)
        key = ev.cost_s if ev.credit_s is None else ev.cost_s - ev.credit_s
        return ranked(ev, key, ev.cached_blocks)


@register("least_loaded")
class LeastLoaded:
    """Fewest queued prefill tokens, then fewest running sequences, then node id. Blind
    to the cache: a baseline."""

    def rank(self, request: RouteRequest, nodes: Nodes, index: PrefixIndex) -> Ranking:
        ev = evaluate(request, nodes, index)
        return ranked(ev, ev.queued, ev.running)


@register("round_robin")
class RoundRobin:
    """Eligible nodes in node-id order, rotated by one per ranked request. Blind to cache
    and load: a baseline. The rotation counter is this object's only state."""

    __slots__ = ("_turn",)

    def __init__(self) -> None:
        self._turn = 0

    def rank(self, request: RouteRequest, nodes: Nodes, index: PrefixIndex) -> Ranking:
        ev = evaluate(request, nodes, index)
        idx = np.flatnonzero(ev.eligible)
        order = idx[np.argsort(ev.id_rank[idx], kind="stable")]
        if order.size:
            order = np.roll(order, -(self._turn % order.size))
            self._turn += 1
        return Ranking(ev, order)
