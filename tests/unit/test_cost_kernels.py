"""The compiled routing cost (controller/router/cost.py) against NumPy transcriptions.

The kernels replaced vectorised NumPy code; they must give the same bits, not just close
values, so that the benchmark tables measured before them stay valid and ties between
nodes break the same way. Inputs cover the formula's branches: no running batch, an
unknown decode step or token budget, a budget below the running batch, queues with and
without a known start, no clock.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from kvfleet.controller.router import cost
from kvfleet.controller.router.policy import estimated_ttft_s, queued_now

N = 1000


def numpy_queued_now(queued, work_since_s, rate, now_s):
    """The vectorised form the kernel replaced."""
    elapsed = now_s - work_since_s
    drained = np.where(np.isfinite(elapsed), np.maximum(elapsed, 0.0) * rate, 0.0)
    return np.maximum(queued - drained, 0.0)


def numpy_ttft_cost(queued, uncached, running, rate, decode_step_s, max_batched, per_node, weight):
    """The vectorised form the kernel replaced."""
    work = queued + uncached
    step = np.where(decode_step_s > 0, decode_step_s, running / rate)
    step *= running > 0
    steps = np.ceil(work / np.maximum(max_batched - running, 1))
    steps[max_batched <= 0] = 1.0
    ttft = work / rate + (steps + 0.5) * step
    return ttft * (weight + per_node * uncached / rate)


def columns(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "queued": rng.choice([0, 0, 1, 700, 20_000, 123_457], N).astype(np.int64),
        "uncached": rng.integers(1, 9_000, N).astype(np.int64),
        "running": rng.choice([0, 0, 1, 7, 64, 300], N).astype(np.int64),
        "rate": rng.choice([1.0, 999.5, 8_000.0, 16_000.0], N) * rng.uniform(0.5, 1.5, N),
        "decode_step_s": rng.choice([0.0, 0.0, 0.012, 0.0375], N),
        "max_batched": rng.choice([0, 64, 256, 2_048, 8_192], N).astype(np.int64),
        "work_since_s": rng.choice([math.inf, -0.05, 0.0, 0.01, 3.0], N),
    }


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("now_s", [-math.inf, 0.0, 0.02, 7.5])
def test_queued_now_is_bit_identical_to_the_numpy_form(seed, now_s):
    c = columns(seed)
    want = numpy_queued_now(c["queued"], c["work_since_s"], c["rate"], now_s)
    got = queued_now(c["queued"], c["work_since_s"], c["rate"], now_s)
    assert got.dtype == np.float64 and np.array_equal(got, want)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("per_node,weight", [(0.0, 1.0), (0.37, 1.0), (25.0, 0.5), (3.0, 0.25)])
def test_estimated_ttft_is_bit_identical_to_the_numpy_form(seed, per_node, weight):
    c = columns(seed)
    q = numpy_queued_now(c["queued"], c["work_since_s"], c["rate"], 0.01)
    args = (q, c["uncached"], c["running"], c["rate"], c["decode_step_s"], c["max_batched"])
    want = numpy_ttft_cost(*args, per_node, weight)
    got = estimated_ttft_s(*args, per_node, weight)
    assert np.array_equal(got, want)


def test_estimated_ttft_takes_scalars_and_integer_arrays():
    got = estimated_ttft_s(3000, 1000, 10, 1000.0, 0.02, 2048, 0.5)
    assert got.shape == () and float(got) == pytest.approx((4.0 + 2.5 * 0.02) * (1 + 0.5))
    ints = estimated_ttft_s(np.array([3000]), np.array([1000]), np.array([10]), np.array([1000]),
                            np.array([0.0]), np.array([0]), 0.0)
    assert ints.tolist() == [4.0 + 1.5 * 0.01]


@pytest.mark.parametrize("seed", range(6))
def test_evaluate_rows_equals_the_numpy_evaluation(seed):
    """eligible_rows + evaluate_rows against the vectorised evaluation they replaced."""
    rng = np.random.default_rng(seed)
    c = columns(seed)
    routable = rng.random(N) > 0.05
    block_size = rng.choice([16, 16, 16, 32], N).astype(np.int64)
    rate = np.where(rng.random(N) < 0.03, 0.0, c["rate"])
    num_blocks = rng.choice([10, 60_000], N, p=[0.02, 0.98]).astype(np.int64)
    slot = np.where(rng.random(N) < 0.05, -1, np.arange(N)).astype(np.int64)
    bs, prompt, max_tokens, arrival, now, weight = 16, 4_321, 200, 180.0, 0.01, 0.5
    need = -(-(prompt + max_tokens) // bs)

    eligible = np.empty(N, np.bool_)
    lookup, rest = cost.eligible_rows(routable, block_size, rate, num_blocks, slot, bs, need, eligible)
    want_eligible = routable & (block_size == bs) & (rate > 0) & (num_blocks >= need)
    assert np.array_equal(eligible, want_eligible)
    assert np.array_equal(lookup, np.flatnonzero(want_eligible & (slot >= 0)))
    assert np.array_equal(rest, np.flatnonzero(~want_eligible))

    matched = rng.integers(0, prompt // bs + 3, lookup.size).astype(np.int32)
    cached, uncached, got = np.empty(N, np.int64), np.empty(N, np.int64), np.empty(N)
    cost.evaluate_rows(eligible, int(want_eligible.sum()), lookup, matched, bs, prompt, c["queued"], c["work_since_s"],
                       c["running"], rate, c["decode_step_s"], c["max_batched"], arrival, now, weight,
                       cached, uncached, got)
    m = np.zeros(N, np.int64)
    m[lookup] = matched
    want_cached = np.minimum(m, (prompt - 1) // bs) * bs
    rate1 = np.where(want_eligible, rate, 1.0)
    want = numpy_ttft_cost(numpy_queued_now(c["queued"], c["work_since_s"], rate1, now), prompt - want_cached,
                           c["running"], rate1, c["decode_step_s"], c["max_batched"],
                           arrival / want_eligible.sum(), weight)
    want[~want_eligible] = np.inf
    assert np.array_equal(cached, want_cached) and np.array_equal(uncached, prompt - want_cached)
    assert np.array_equal(got, want)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("shared_rate", [0.5, 40.0])
def test_replica_credit_equals_its_numpy_definition(seed, shared_rate):
    """Every eligible node lacking the deepest cached prefix is credited what the requests
    sharing that prefix (shared_rate * horizon of them, split over one more holder) would
    save on it against the best holder, at the holders' uncached length; 0 elsewhere."""
    rng = np.random.default_rng(100 + seed)
    c = columns(seed)
    eligible = rng.random(N) > 0.1
    cached = rng.choice([0, 0, 16, 1024, 2048], N, p=[0.5, 0.2, 0.15, 0.1, 0.05]).astype(np.int64)
    prompt, now, horizon = 2_100, 0.01, 5.0
    got = np.full(N, np.nan)
    holders = cost.replica_credit_rows(eligible, cached, prompt, c["queued"], c["work_since_s"], c["running"],
                                       c["rate"], c["decode_step_s"], c["max_batched"], now, shared_rate, horizon, got)
    top = cached[eligible].max()
    is_holder = eligible & (cached == top)
    ttft = numpy_ttft_cost(numpy_queued_now(c["queued"], c["work_since_s"], c["rate"], now), float(prompt - top),
                           c["running"], c["rate"], c["decode_step_s"], c["max_batched"], 0.0, 1.0)
    best = ttft[is_holder].min()
    want = np.where(eligible & ~is_holder, shared_rate * horizon / (is_holder.sum() + 1) * np.maximum(best - ttft, 0.0),
                    0.0)
    assert holders == is_holder.sum() > 0
    assert np.allclose(got, want, rtol=1e-12, atol=0.0)
    assert (got[is_holder] == 0).all() and (got[~eligible] == 0).all() and (got > 0).any()


def test_replica_credit_is_zero_without_an_eligible_node():
    credit = np.full(3, np.nan)
    z = np.zeros(3)
    i = np.zeros(3, np.int64)
    assert cost.replica_credit_rows(np.zeros(3, np.bool_), i, 100, i, z, i, np.ones(3), z, i, 0.0, 9.0, 5.0,
                                    credit) == 0
    assert (credit == 0).all()


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("head", [1, 3, 8])
def test_head_rows_are_the_best_eligible_keys_with_ties_at_the_boundary(seed, head):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(head, 300))
    key = rng.choice([0.5, 1.0, 1.0, 2.0, 3.0, math.inf], n) if seed % 2 else rng.uniform(0, 1, n)
    eligible = rng.random(n) > 0.2
    eligible[rng.choice(n, head, replace=False)] = True        # at least head eligible
    top, rest = cost.head_rows(key, eligible, head)
    rows = np.flatnonzero(eligible)
    kth = np.partition(key[rows], head - 1)[head - 1]
    assert np.array_equal(top, rows[key[rows] <= kth])
    assert np.array_equal(rest, rows[key[rows] > kth])
