"""kvfleet's routing cost, compiled: one pass over the node table per decision.

The formula is :func:`ttft_cost` (one node, scalars); its meaning is documented in
:func:`kvfleet.controller.router.policy.estimated_ttft_s`, the NumPy-facing entry point
that applies it to arrays. :func:`evaluate_rows` applies it to every eligible row of a
table in one loop, fused with the cached-token rule and the queue drain, where the
NumPy version took some 40 array operations of ~1 us each over 1,000 nodes.

Numba compiles these on first use (``cache=True``: once per machine, then ~0.15 s to
load); :func:`warm_up` does it ahead of the first request. The arithmetic is IEEE, with
no fast-math flags, in the same order as the NumPy expressions it replaced, so it gives
bit-identical costs (``tests/unit/test_policy.py`` checks the kernels against a NumPy
transcription on random tables).
"""

from __future__ import annotations

import math

import numba
import numpy as np

_njit = numba.njit(cache=True, nogil=True)


@numba.njit(cache=True, nogil=True, inline="always")
def queued_now_1(queued: float, work_since_s: float, rate: float, now_s: float) -> float:
    """One node's prefill still queued at ``now_s`` (see ``policy.queued_now``).
    ``work_since_s = inf`` or ``now_s = -inf`` make the elapsed time -inf: nothing drained."""
    return max(queued - max(now_s - work_since_s, 0.0) * rate, 0.0)


@numba.njit(cache=True, nogil=True, inline="always")
def ttft_cost(queued: float, uncached: float, running: float, rate: float, decode_step_s: float,
              max_num_batched_tokens: float, arrivals_per_node_s: float, latency_weight: float) -> float:
    """One node's cost, seconds: estimated TTFT, weighted, plus the delay imposed on the
    node's next arrivals (``policy.estimated_ttft_s`` documents each term)."""
    work = queued + uncached
    step = decode_step_s if decode_step_s > 0 else running / rate
    if not running > 0:
        step = 0.0          # no running batch: no decode step (and nothing in progress to wait for)
    if max_num_batched_tokens <= 0:
        steps = 1.0         # budget unknown: the prefill is taken to fit one step
    else:
        steps = math.ceil(work / max(max_num_batched_tokens - running, 1.0))
    ttft = work / rate + (steps + 0.5) * step
    return ttft * (arrivals_per_node_s * uncached / rate + latency_weight)


@_njit
def ttft_cost_array(queued, uncached, running, rate, decode_step_s, max_num_batched_tokens,
                    arrivals_per_node_s, latency_weight, out):
    """``out[i] = ttft_cost(...[i])`` over float64 arrays of one length."""
    for i in range(out.shape[0]):
        out[i] = ttft_cost(queued[i], uncached[i], running[i], rate[i], decode_step_s[i],
                           max_num_batched_tokens[i], arrivals_per_node_s, latency_weight)


@_njit
def queued_now_array(queued, work_since_s, rate, now_s, out):
    for i in range(out.shape[0]):
        out[i] = queued_now_1(queued[i], work_since_s[i], rate[i], now_s)


@_njit
def eligible_rows(routable, block_size, rate, num_blocks, slot, bs, need_blocks, eligible):
    """Fills ``eligible`` (routable, the request's block size, a known prefill rate, room
    for the whole sequence); returns (rows to look up in the index: eligible with a slot,
    ineligible rows), each ascending."""
    n = eligible.shape[0]
    lookup = np.empty(n, np.int64)
    rest = np.empty(n, np.int64)
    nl = 0
    nr = 0
    for i in range(n):
        ok = routable[i] and block_size[i] == bs and rate[i] > 0 and num_blocks[i] >= need_blocks
        eligible[i] = ok
        if ok:
            if slot[i] >= 0:
                lookup[nl] = i
                nl += 1
        else:
            rest[nr] = i
            nr += 1
    return lookup[:nl], rest[:nr]


@_njit
def evaluate_rows(eligible, n_eligible, lookup, matched, block_size, prompt_tokens, queued, work_since_s, running,
                  rate, decode_step_s, max_num_batched_tokens, arrival_rate, now_s, latency_weight,
                  cached, uncached, cost):
    """Fills ``cached`` / ``uncached`` (tokens) and ``cost`` (s; inf where ineligible) for
    every row. ``matched[k]`` is the blocks ``lookup[k]`` holds; the fleet's arrival rate
    is split evenly over the ``n_eligible`` nodes."""
    n = eligible.shape[0]
    max_hit = max(prompt_tokens - 1, 0) // block_size     # vLLM computes the last prompt token
    for i in range(n):
        cached[i] = 0
    for k in range(lookup.shape[0]):
        cached[lookup[k]] = min(matched[k], max_hit) * block_size
    per_node = arrival_rate / max(n_eligible, 1)
    for i in range(n):
        u = prompt_tokens - cached[i]
        uncached[i] = u
        if not eligible[i]:
            cost[i] = np.inf
            continue
        r = rate[i]
        q = queued_now_1(queued[i], work_since_s[i], r, now_s)
        cost[i] = ttft_cost(q, u, running[i], r, decode_step_s[i], max_num_batched_tokens[i],
                            per_node, latency_weight)


@_njit
def replica_credit_rows(eligible, cached, prompt_tokens, queued, work_since_s, running, rate, decode_step_s,
                        max_num_batched_tokens, now_s, shared_rate, horizon_s, credit):
    """Fills ``credit`` (s): what recomputing the prompt's deepest cached prefix on each
    eligible node that lacks it saves the requests that share that prefix
    (``policy.evaluate`` documents the term); 0 on the prefix's holders and on
    ineligible rows. ``cached`` is in tokens; the holders are the eligible rows with the
    most. Returns the number of holders (0: no eligible row)."""
    n = eligible.shape[0]
    top = -1
    for i in range(n):
        if eligible[i] and cached[i] > top:
            top = cached[i]
    holders = 0
    best = np.inf
    u = float(prompt_tokens - top)
    for i in range(n):
        credit[i] = 0.0
        if eligible[i] and cached[i] == top:
            holders += 1
            q = queued_now_1(queued[i], work_since_s[i], rate[i], now_s)
            t = ttft_cost(q, u, running[i], rate[i], decode_step_s[i], max_num_batched_tokens[i], 0.0, 1.0)
            if t < best:
                best = t
    if holders == 0:
        return 0
    scale = shared_rate * horizon_s / (holders + 1)
    for i in range(n):
        if eligible[i] and cached[i] != top:
            q = queued_now_1(queued[i], work_since_s[i], rate[i], now_s)
            t = ttft_cost(q, u, running[i], rate[i], decode_step_s[i], max_num_batched_tokens[i], 0.0, 1.0)
            if best > t:
                credit[i] = scale * (best - t)
    return holders


@_njit
def head_rows(key, eligible, head):
    """The eligible rows whose ``key`` is at most the ``head``-th smallest eligible key
    (ties at the boundary included), ascending by row; and the other eligible rows. At
    least ``head`` rows must be eligible."""
    best = np.full(head, np.inf)            # the head smallest keys so far, ascending
    n = key.shape[0]
    for i in range(n):
        v = key[i]
        if eligible[i] and v < best[head - 1]:
            j = head - 1
            while j > 0 and best[j - 1] > v:
                best[j] = best[j - 1]
                j -= 1
            best[j] = v
    kth = best[head - 1]
    top = np.empty(n, np.int64)
    rest = np.empty(n, np.int64)
    nt = 0
    nr = 0
    for i in range(n):
        if eligible[i]:
            if key[i] <= kth:
                top[nt] = i
                nt += 1
            else:
                rest[nr] = i
                nr += 1
    return top[:nt], rest[:nr]


@_njit
def admissible_rows(routable, queued, work_since_s, rate, budget, running, waiting, max_num_seqs, now_s,
                    steps_limit, headroom, step_s, ok):
    """``admission.admissible`` in one pass: fills ``ok`` (routable, at most ``steps_limit``
    engine steps of prefill queued now, a sequence slot free beyond ``headroom``); returns
    how many rows are ok and how many are routable but not."""
    n_ok = 0
    n_held = 0
    limit_steps = not math.isinf(steps_limit)
    for i in range(ok.shape[0]):
        a = routable[i]
        if a and limit_steps:
            r = rate[i] if rate[i] > 0 else 1.0
            q = queued_now_1(float(queued[i]), work_since_s[i], r, now_s)
            per_step = float(max(budget[i] - running[i], 1)) if budget[i] > 0 else r * step_s
            a = q / per_step <= steps_limit
        if a and headroom > 0:
            seqs = max_num_seqs[i]
            a = seqs <= 0 or running[i] + waiting[i] + 1 <= math.floor(seqs * (1.0 - headroom))
        ok[i] = a
        if a:
            n_ok += 1
        elif routable[i]:
            n_held += 1
    return n_ok, n_held


def warm_up() -> None:
    """Compiles (or loads from the cache) every kernel, so that the first routing
    decision does not pay for it."""
    f = np.ones(2)
    i = np.ones(2, np.int64)
    b = np.ones(2, np.bool_)
    ttft_cost_array(f, f, f, f, f, f, 1.0, 1.0, np.empty(2))
    queued_now_array(f, f, f, 0.0, np.empty(2))
    lookup, _ = eligible_rows(b, i, f, i, i, 1, 1, np.empty(2, np.bool_))
    evaluate_rows(b, 2, lookup, np.ones(lookup.size, np.int32), 1, 2, i, f, i, f, f, i, 1.0, 0.0, 1.0,
                  np.empty(2, np.int64), np.empty(2, np.int64), np.empty(2))
    replica_credit_rows(b, i, 2, i, f, i, f, f, i, 0.0, 1.0, 5.0, np.empty(2))
    head_rows(f, b, 1)
    admissible_rows(b, i, f, f, i, i, i, i, 0.0, 1.0, 0.5, 0.05, np.empty(2, np.bool_))
