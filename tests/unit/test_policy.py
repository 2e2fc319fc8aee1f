"""Routing policies: exact rankings from plain data (views + a real PrefixIndex)."""

from __future__ import annotations

import math

import dataclasses
import random

import numpy as np
import pytest

from kvfleet.controller.router.index import PrefixIndex
from kvfleet.controller.router.policy import (
    POLICIES,
    PrefixRates,
    ArrivalRate,
    queued_now,
    Candidate,
    NodeTable,
    NodeView,
    RouteRequest,
    estimated_ttft_s,
    evaluate,
    get_policy,
    predicted_cached_tokens,
)
from kvfleet.hashing import block_hashes

BS = 16


def chain(seed: int, n: int) -> np.ndarray:
    return block_hashes(np.random.default_rng(seed).integers(0, 50_000, n * BS), BS)


def view(node_id: str, slot: int = -1, **kw) -> NodeView:
    fields = dict(
        node_id=node_id, address=f"{node_id}:7000", routable=True, block_size=BS, num_blocks=10_000,
        prefill_tokens_per_s=1000.0, decode_tokens_per_s=50.0, running=0, waiting=0, kv_usage=0.0,
        queued_prefill_tokens=0, cached_blocks=0, slot=slot,
    )
    fields.update(kw)
    return NodeView(**fields)


def fleet(index: PrefixIndex, names: list[str], **kw) -> list[NodeView]:
    return [view(n, index.add_node(n), **kw) for n in names]


def request(hashes: np.ndarray, prompt_tokens: int, max_tokens: int = 16) -> RouteRequest:
    return RouteRequest(block_hashes=hashes, prompt_tokens=prompt_tokens, block_size=BS, max_tokens=max_tokens)


def send(nodes: list[NodeView], best: Candidate) -> list[NodeView]:
    """What the router does after a pick: the node's queue grows by the uncached tokens."""
    return [
        dataclasses.replace(v, queued_prefill_tokens=v.queued_prefill_tokens + best.uncached_tokens)
        if v.node_id == best.node_id else v
        for v in nodes
    ]


# -- vLLM's cached-token rule ---------------------------------------------------------------
@pytest.mark.parametrize(
    ("matched", "prompt", "expected"),
    [
        (4, 64, 48),     # exactly 4 blocks: the last token is computed, so only 3 blocks hit
        (4, 65, 64),     # one token past 4 blocks: all 4 hit
        (4, 63, 48),     # 3 full blocks + 15 tokens: at most 3 blocks hit
        (2, 65, 32),     # fewer blocks matched than allowed
        (0, 65, 0),
        (1, 16, 0),      # a one-block prompt never hits
        (1, 17, 16),
        (0, 1, 0),
        (0, 0, 0),       # empty prompt
        (500, 8000, 7984),
    ],
)
def test_predicted_cached_tokens_follows_vllm_rule(matched, prompt, expected):
    assert predicted_cached_tokens(matched, prompt, BS) == expected


@pytest.mark.parametrize("prompt", [15, 16, 17, 31, 32, 33, 48, 64, 80, 81])
def test_evaluate_cached_tokens_equal_the_scalar_rule_for_every_depth(prompt):
    idx = PrefixIndex()
    h = chain(1, prompt // BS)
    nodes = [view(f"n{d}", idx.add_node(f"n{d}")) for d in range(len(h) + 1)]
    for d, v in enumerate(nodes):
        if d:
            idx.store(v.slot, h[:d])
    ev = evaluate(request(h, prompt), nodes, idx)
    assert ev.cached.tolist() == [predicted_cached_tokens(d, prompt, BS) for d in range(len(h) + 1)]
    assert (ev.cached + ev.uncached).tolist() == [prompt] * len(nodes)


# -- the kvfleet policy: estimated time to first token ---------------------------------------
def test_kvfleet_prefers_the_node_holding_the_prefix_with_exact_costs():
    idx = PrefixIndex()
    nodes = fleet(idx, ["a", "b", "c"])
    h = chain(1, 65)                                  # 1040-token prompt
    idx.store(nodes[1].slot, h[:40])
    idx.store(nodes[2].slot, h[:64])
    ranked = get_policy("kvfleet").rank(request(h, 1040), nodes, idx)
    assert [(c.node_id, c.cached_tokens, c.uncached_tokens) for c in ranked] == [
        ("c", 1024, 16), ("b", 640, 400), ("a", 0, 1040)]
    assert [c.cost_s for c in ranked] == [16 / 1000, 400 / 1000, 1040 / 1000]
    assert all(c.eligible and c.reason == "" for c in ranked)


def test_kvfleet_cost_without_a_reported_decode_step_charges_a_prefill_token_per_running_sequence():
    idx = PrefixIndex()
    nodes = [
        view("a", idx.add_node("a"), queued_prefill_tokens=300, running=20),
        view("b", idx.add_node("b"), queued_prefill_tokens=300, running=0),
        view("c", idx.add_node("c"), queued_prefill_tokens=0, running=40, prefill_tokens_per_s=2000.0),
    ]
    ranked = get_policy("kvfleet").rank(request(chain(2, 10), 160), nodes, idx)
    # work / rate, plus one step of R decode tokens, plus half a step waited for (busy nodes)
    assert {c.node_id: c.cost_s for c in ranked} == pytest.approx({
        "a": (300 + 160) / 1000 + 20 / 1000 * 1.5, "b": (300 + 160) / 1000, "c": 160 / 2000 + 40 / 2000 * 1.5})
    assert [c.node_id for c in ranked] == ["c", "b", "a"]
    assert ranked[1].queued_prefill_tokens == 300


def test_kvfleet_faster_node_wins_when_recomputing_there_is_quicker():
    idx = PrefixIndex()
    slow = view("slow", idx.add_node("slow"), prefill_tokens_per_s=1000.0)
    fast = view("fast", idx.add_node("fast"), prefill_tokens_per_s=8000.0)
    h = chain(3, 65)
    idx.store(slow.slot, h[:32])                      # slow: 528 tokens left -> 0.528 s
    ranked = get_policy("kvfleet").rank(request(h, 1040), [slow, fast], idx)
    assert [(c.node_id, c.cost_s) for c in ranked] == [("fast", 1040 / 8000), ("slow", 528 / 1000)]


def test_kvfleet_burst_on_one_prefix_spills_once_the_queue_outweighs_recomputing():
    idx = PrefixIndex()
    nodes = fleet(idx, ["a", "b", "c"])
    h = chain(4, 65)
    idx.store(nodes[0].slot, h[:64])
    nodes[0] = dataclasses.replace(nodes[0], cached_blocks=64)
    policy = get_policy("kvfleet")
    picks = []
    for _ in range(67):
        best = policy.rank(request(h, 1040), nodes, idx)[0]
        picks.append(best.node_id)
        nodes = send(nodes, best)
    # a costs (16 * k + 16) / rate after k requests; b and c cost 1040 / rate. At k = 64
    # both cost 1.04 s and the tie goes to the node with fewer cached blocks.
    assert picks[:64] == ["a"] * 64
    assert picks[64:] == ["b", "c", "a"]


def test_kvfleet_spreads_distinct_prefixes_over_an_idle_fleet():
    idx = PrefixIndex()
    nodes = [view("n0", idx.add_node("n0"), cached_blocks=5), view("n1", idx.add_node("n1")),
             view("n2", idx.add_node("n2")), view("n3", idx.add_node("n3"), cached_blocks=3)]
    policy = get_policy("kvfleet")
    picks = []
    for i in range(5):
        best = policy.rank(request(chain(100 + i, 8), 130), nodes, idx)[0]
        picks.append(best.node_id)
        nodes = send(nodes, best)
    assert picks == ["n1", "n2", "n3", "n0", "n1"]


def test_kvfleet_ranking_does_not_depend_on_node_order():
    idx = PrefixIndex()
    nodes = fleet(idx, [f"n{i}" for i in range(12)])
    h = chain(5, 20)
    for i, v in enumerate(nodes):
        idx.store(v.slot, h[: i % 4])
    expected = [c.node_id for c in get_policy("kvfleet").rank(request(h, 330), nodes, idx)]
    shuffled = nodes[:]
    random.Random(0).shuffle(shuffled)
    assert [c.node_id for c in get_policy("kvfleet").rank(request(h, 330), shuffled, idx)] == expected
    assert expected[:3] == ["n11", "n3", "n7"]      # 3 blocks each, then by node id


def test_kvfleet_node_without_index_slot_is_eligible_with_nothing_cached():
    idx = PrefixIndex()
    h = chain(6, 4)
    ranked = get_policy("kvfleet").rank(request(h, 70), [view("x", -1)], idx)
    assert ranked == [Candidate("x", 0, 70, 0, 70 / 1000, True, "")]


# -- eligibility ----------------------------------------------------------------------------
def ineligible_fleet(idx: PrefixIndex, h: np.ndarray) -> list[NodeView]:
    nodes = [
        view("cordoned", idx.add_node("cordoned"), routable=False),
        view("other-bs", idx.add_node("other-bs"), block_size=32),
        view("no-rate", idx.add_node("no-rate"), prefill_tokens_per_s=0.0),
        view("tiny", idx.add_node("tiny"), num_blocks=10),
        view("ok-busy", idx.add_node("ok-busy"), queued_prefill_tokens=1_000_000),
    ]
    for v in nodes[:4]:
        idx.store(v.slot, h)          # the ineligible ones hold the whole prompt
    return nodes


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_ineligible_nodes_are_never_picked_and_come_last_with_reasons(name):
    idx = PrefixIndex()
    h = chain(7, 20)
    nodes = ineligible_fleet(idx, h)
    for _ in range(3):
        ranked = get_policy(name).rank(request(h, 330, max_tokens=100), nodes, idx)
        assert ranked[0].node_id == "ok-busy" and ranked[0].eligible
    assert [(c.node_id, c.eligible, c.reason, c.cost_s) for c in ranked[1:]] == [
        ("cordoned", False, "not routable (not ready, cordoned, draining or drained)", float("inf")),
        ("no-rate", False, "no prefill rate reported", float("inf")),
        ("other-bs", False, "block_size 32 != request's 16", float("inf")),
        ("tiny", False, "sequence needs 27 KV blocks, node has 10", float("inf")),
    ]
    assert all(c.cached_tokens == 0 and c.uncached_tokens == 330 for c in ranked[1:])


def test_all_ineligible_returns_every_node_and_no_eligible_one():
    idx = PrefixIndex()
    h = chain(8, 4)
    nodes = ineligible_fleet(idx, h)[:4]
    ranked = get_policy("kvfleet").rank(request(h, 70, max_tokens=200), nodes, idx)
    assert len(ranked) == 4 and not any(c.eligible for c in ranked)


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_every_policy_returns_every_node_once_and_handles_no_nodes(name):
    idx = PrefixIndex()
    nodes = fleet(idx, [f"n{i}" for i in range(7)])
    ranked = get_policy(name).rank(request(chain(9, 3), 50), nodes, idx)
    assert sorted(c.node_id for c in ranked) == sorted(v.node_id for v in nodes)
    assert get_policy(name).rank(request(chain(9, 3), 50), [], idx) == []


# -- the baselines --------------------------------------------------------------------------
def test_round_robin_rotates_over_eligible_nodes_in_id_order():
    idx = PrefixIndex()
    nodes = [view("c", idx.add_node("c")), view("a", idx.add_node("a")),
             view("x", idx.add_node("x"), routable=False), view("b", idx.add_node("b"))]
    rr = get_policy("round_robin")
    firsts = [rr.rank(request(chain(10, 2), 40), nodes, idx)[0].node_id for _ in range(5)]
    assert firsts == ["a", "b", "c", "a", "b"]
    assert [c.node_id for c in rr.rank(request(chain(10, 2), 40), nodes, idx)] == ["c", "a", "b", "x"]


def test_round_robin_counter_lives_in_each_policy_object():
    idx = PrefixIndex()
    nodes = fleet(idx, ["a", "b"])
    first, second = get_policy("round_robin"), get_policy("round_robin")
    first.rank(request(chain(11, 2), 40), nodes, idx)
    assert second.rank(request(chain(11, 2), 40), nodes, idx)[0].node_id == "a"
    assert first.rank(request(chain(11, 2), 40), nodes, idx)[0].node_id == "b"


def test_least_loaded_orders_by_queue_then_running_then_id_and_ignores_cache():
    idx = PrefixIndex()
    h = chain(12, 10)
    nodes = [view("a", idx.add_node("a"), queued_prefill_tokens=50),
             view("b", idx.add_node("b"), queued_prefill_tokens=10, running=3),
             view("c", idx.add_node("c"), queued_prefill_tokens=10, running=1),
             view("d", idx.add_node("d"), queued_prefill_tokens=10, running=1)]
    idx.store(nodes[0].slot, h)
    ranked = get_policy("least_loaded").rank(request(h, 170), nodes, idx)
    assert [c.node_id for c in ranked] == ["c", "d", "b", "a"]
    assert ranked[3].cached_tokens == 160          # still reported, just not used


# -- registry and purity --------------------------------------------------------------------
def test_registry_knows_the_policies_and_rejects_unknown_names():
    assert {"kvfleet", "round_robin", "least_loaded"} <= set(POLICIES)
    with pytest.raises(ValueError, match="unknown routing policy 'nope'; known: .*kvfleet"):
        get_policy("nope")


def test_kvfleet_rank_is_pure_same_inputs_same_output_and_index_untouched():
    idx = PrefixIndex()
    nodes = fleet(idx, ["a", "b", "c"])
    h = chain(13, 9)
    idx.store(nodes[1].slot, h[:5])
    before = len(idx)
    policy = get_policy("kvfleet")
    assert policy.rank(request(h, 150), nodes, idx) == policy.rank(request(h, 150), nodes, idx)
    assert len(idx) == before and idx.blocks_of(nodes[1].slot) == 5


# -- vectorised ranking vs a plain-Python per-node reference --------------------------------
def scalar_cost(v: NodeView, uncached: int, per_node_rate: float = 0.0, now: float = float("-inf")) -> float:
    """kvfleet's cost for one node, written out step by step (the docstring's formula)."""
    queued = v.queued_prefill_tokens
    if math.isfinite(now) and math.isfinite(v.work_since_s):
        queued = max(queued - max(now - v.work_since_s, 0.0) * v.prefill_tokens_per_s, 0.0)
    work = queued + uncached
    if v.running == 0:
        step = 0.0
    elif v.decode_step_s > 0:
        step = v.decode_step_s
    else:
        step = v.running / v.prefill_tokens_per_s
    steps = math.ceil(work / max(v.max_num_batched_tokens - v.running, 1)) if v.max_num_batched_tokens > 0 else 1
    busy = v.running > 0 or v.queued_prefill_tokens > 0
    ttft = work / v.prefill_tokens_per_s + steps * step + (step / 2 if busy else 0.0)
    return ttft + per_node_rate * ttft * uncached / v.prefill_tokens_per_s


def reference_rank(name: str, req: RouteRequest, nodes: list[NodeView], held: dict[str, set[int]]) -> list[tuple]:
    """The policies as a plain loop over nodes: eligibility, leading-run match, the cost,
    the order (ties by node id), then the ineligible by id."""
    bs, prompt = req.block_size, req.prompt_tokens
    need = -(-(prompt + req.max_tokens) // bs)
    n_ok = sum(v.routable and v.block_size == bs and v.prefill_tokens_per_s > 0 and v.num_blocks >= need for v in nodes)
    per_node = req.arrival_rate / max(n_ok, 1)
    rows = []
    for v in nodes:
        ok = v.routable and v.block_size == bs and v.prefill_tokens_per_s > 0 and v.num_blocks >= need
        m = 0
        if ok and v.slot >= 0:
            for h in req.block_hashes.tolist():
                if h not in held.get(v.node_id, set()):
                    break
                m += 1
        cached = predicted_cached_tokens(m, prompt, bs)
        cost = scalar_cost(v, prompt - cached, per_node, req.now_s) if ok else float("inf")
        rows.append((v, ok, cached, cost))
    elig = [r for r in rows if r[1]]
    if name == "kvfleet":
        elig.sort(key=lambda r: (r[3], r[0].cached_blocks, r[0].node_id))
    else:   # least_loaded
        elig.sort(key=lambda r: (r[0].queued_prefill_tokens, r[0].running, r[0].node_id))
    rest = sorted((r for r in rows if not r[1]), key=lambda r: r[0].node_id)
    return [(r[0].node_id, r[1], r[2], prompt - r[2], r[0].queued_prefill_tokens, r[3]) for r in elig + rest]


@pytest.mark.parametrize("name", ["kvfleet", "least_loaded"])
@pytest.mark.parametrize("seed", range(6))
def test_ranking_equals_the_plain_python_reference_on_random_fleets(seed, name):
    rng = np.random.default_rng(seed)
    idx = PrefixIndex()
    system = [chain(200 + seed * 10 + k, int(rng.integers(1, 12))) for k in range(4)]
    nodes, held = [], {}
    n = int(rng.integers(1, 60))
    for i in rng.permutation(n).tolist():           # rows not in id order
        nid = f"node-{i:03d}"
        slot = idx.add_node(nid) if rng.random() > 0.1 else -1
        mine: set[int] = set()
        if slot >= 0:
            for sp in system:
                if rng.random() < 0.5:
                    part = sp[: int(rng.integers(1, len(sp) + 1))]
                    idx.store(slot, part)
                    mine |= set(part.tolist())
        held[nid] = mine
        nodes.append(view(
            nid, slot, routable=bool(rng.random() > 0.1), block_size=int(rng.choice([BS, BS, BS, 32])),
            num_blocks=int(rng.choice([10_000, 5])), prefill_tokens_per_s=float(rng.choice([0.0, 1000.0, 2000.0, 2000.0])),
            running=int(rng.integers(0, 4)), queued_prefill_tokens=int(rng.choice([0, 0, 100, 2000])),
            cached_blocks=int(rng.integers(0, 3)), waiting=int(rng.integers(0, 5)),
            decode_step_s=float(rng.choice([0.0, 0.01, 0.03])), max_num_batched_tokens=int(rng.choice([0, 64, 2048])),
            work_since_s=float(rng.choice([math.inf, 9.9, 10.0, 10.5])),
        ))
    for sp in system:
        tail = block_hashes(np.random.default_rng(300 + seed).integers(0, 50_000, 3 * BS), BS, parent=int(sp[-1]))
        prompt = np.concatenate([sp, tail])
        req = dataclasses.replace(request(prompt, len(prompt) * BS + int(rng.integers(0, BS))),
                                  arrival_rate=float(rng.choice([0.0, 5.0, 50.0])),
                                  now_s=float(rng.choice([-math.inf, 10.0, 10.2])))
        expected = reference_rank(name, req, nodes, held)
        for given in (nodes, NodeTable.from_views(nodes)):
            got = [(c.node_id, c.eligible, c.cached_tokens, c.uncached_tokens, c.queued_prefill_tokens, c.cost_s)
                   for c in get_policy(name).rank(req, given, idx)]
            assert [g[:5] for g in got] == [e[:5] for e in expected]
            assert [g[5] for g in got] == pytest.approx([e[5] for e in expected], rel=1e-12)


def test_ranking_is_list_like():
    idx = PrefixIndex()
    nodes = fleet(idx, [f"n{i:02d}" for i in range(40)], queued_prefill_tokens=0)
    nodes = [dataclasses.replace(v, queued_prefill_tokens=(i * 37) % 40) for i, v in enumerate(nodes)]
    ranked = get_policy("kvfleet").rank(request(chain(14, 3), 50), nodes, idx)
    as_list = list(ranked)
    assert len(ranked) == 40 and ranked == as_list and as_list == ranked
    assert [ranked[i] for i in range(40)] == as_list and ranked[-1] == as_list[-1]
    assert ranked[3:7] == as_list[3:7] and ranked[0] is ranked[0]
    assert [c.queued_prefill_tokens for c in ranked] == sorted(c.queued_prefill_tokens for c in ranked)
    with pytest.raises(IndexError):
        ranked[40]


def test_many_ties_beyond_the_sorted_head_keep_the_full_order():
    idx = PrefixIndex()
    names = [f"n{i:02d}" for i in range(50)]
    nodes = [view(n, idx.add_node(n), cached_blocks=i % 3) for i, n in enumerate(names)]   # all costs equal
    ranked = get_policy("kvfleet").rank(request(chain(15, 2), 40), nodes, idx)
    assert [c.node_id for c in ranked] == [v.node_id for v in sorted(nodes, key=lambda v: (v.cached_blocks, v.node_id))]


def test_a_ranking_is_a_snapshot_when_the_table_changes_later():
    idx = PrefixIndex()
    table = NodeTable.from_views(fleet(idx, ["a", "b", "c"]))
    table.update("a", queued_prefill_tokens=500)
    ranked = get_policy("kvfleet").rank(request(chain(16, 2), 40), table, idx)
    table.remove("b")
    table.update("c", queued_prefill_tokens=9_999, routable=False)
    assert [(c.node_id, c.queued_prefill_tokens, c.eligible) for c in ranked] == [
        ("b", 0, True), ("c", 0, True), ("a", 500, True)]


def test_estimated_ttft_counts_prefill_work_the_decode_steps_it_spans_and_the_delay_it_imposes():
    a = np.array
    got = estimated_ttft_s(
        queued_prefill_tokens=a([0, 0, 3000, 0]), uncached_tokens=a([1000, 1000, 1000, 1000]),
        running=a([0, 10, 10, 0]), prefill_tokens_per_s=a([1000.0] * 4),
        decode_step_s=a([0.0, 0.02, 0.02, 0.0]), max_num_batched_tokens=a([2048, 2048, 2048, 0]),
        arrivals_per_node_s=0.0)
    assert got.tolist() == pytest.approx([
        1.0,                                   # idle: the prefill alone
        1.0 + 0.02 + 0.01,                     # one mixed step, plus half a step in progress
        4.0 + 2 * 0.02 + 0.01,                 # 4,000 tokens at 2,038 per step: 2 steps
        1.0,                                   # budget unknown: one step
    ])
    # 0.5 requests/s per node: those arriving during the TTFT (0.5 * ttft of them) wait 1 s each
    loaded = estimated_ttft_s(a([3000]), a([1000]), a([10]), a([1000.0]), a([0.02]), a([2048]), 0.5)
    ttft = 4.0 + 2 * 0.02 + 0.01
    assert loaded.tolist() == pytest.approx([ttft + 0.5 * ttft * 1.0])


def test_arrival_rate_converges_to_a_steady_stream_and_decays():
    r = ArrivalRate(tau_s=2.0)
    assert r.peek(0.0) == 0.0
    for i in range(400):
        rate = r.arrive(i * 0.1)                   # 10 requests/s for 40 s
    assert rate == pytest.approx(10.0, rel=0.05)
    assert r.peek(39.9 + 2.0) == pytest.approx(rate * math.exp(-1.0))
    assert r.peek(39.9) == rate                    # peeking counts nothing
    with pytest.raises(ValueError):
        ArrivalRate(tau_s=0)


def test_kvfleet_a_hit_is_worth_more_on_a_busy_fleet():
    """Same queue ahead of the holder: with no traffic the empty node wins (recomputing is
    quicker than waiting); once requests arrive, recomputing also delays the empty node's
    next arrivals, and the holder wins."""
    idx = PrefixIndex()
    h = chain(5, 64)                                   # 1,024 tokens
    for rate, winner in ((0.0, "empty"), (8.0, "holder")):
        nodes = [view("holder", idx.add_node("holder"), queued_prefill_tokens=1200),
                 view("empty", idx.add_node("empty"), queued_prefill_tokens=0)]
        idx.store(nodes[0].slot, h[:60])
        req = RouteRequest(h, 1024, BS, 16, arrival_rate=rate)
        assert get_policy("kvfleet").rank(req, nodes, idx)[0].node_id == winner


def test_queued_now_drains_what_the_node_can_have_prefilled_since_it_had_the_work():
    a = np.array
    got = queued_now(a([3000, 3000, 3000, 500, 0]), a([10.0, 10.0, math.inf, 9.0, 9.0]), a([1000.0] * 5), 11.0)
    assert got.tolist() == [2000, 2000, 3000, 0, 0]     # 1 s at 1,000 tokens/s; inf: unknown; never below 0
    assert queued_now(a([3000]), a([10.0]), a([1000.0]), -math.inf).tolist() == [3000]   # no clock given
    assert queued_now(a([3000]), a([12.0]), a([1000.0]), 11.0).tolist() == [3000]         # work starts later


def test_kvfleet_prefers_a_holder_whose_queued_prefill_is_mostly_done():
    """A prefill sent 60 ms ago to the holder is mostly computed even though the node has
    not reported since: counting it in full sends the request to recompute elsewhere."""
    idx = PrefixIndex()
    h = chain(6, 136)                                  # 2,176 tokens
    nodes = [view("holder", idx.add_node("holder"), queued_prefill_tokens=2176, work_since_s=100.0,
                  prefill_tokens_per_s=27_000.0),
             view("idle", idx.add_node("idle"), prefill_tokens_per_s=27_000.0)]
    idx.store(nodes[0].slot, h[:128])
    stale = RouteRequest(h, 2176, BS, 16)
    fresh = RouteRequest(h, 2176, BS, 16, now_s=100.06)
    assert get_policy("kvfleet").rank(stale, nodes, idx)[0].node_id == "idle"
    assert get_policy("kvfleet").rank(fresh, nodes, idx)[0].node_id == "holder"

def test_a_lower_latency_weight_trades_more_load_for_cache_affinity():
    # Node a holds 60 of the prompt's 64 blocks but has 1,500 tokens queued; b is idle.
    # Cost with lam = 0.5 req/s per node, rate 1,000 tok/s:
    #   a: ttft = (1500 + 64) / 1000 = 1.564  -> w * 1.564 + 0.5 * 1.564 * 0.064
    #   b: ttft = 1024 / 1000 = 1.024         -> w * 1.024 + 0.5 * 1.024 * 1.024
    # w = 1 (interactive): a 1.614 > b 1.548: b.  w = 0.5 (flex): a 0.832 < b 1.036: a.
    idx = PrefixIndex()
    nodes = fleet(idx, ["a", "b"])
    hashes = chain(7, 64)
    idx.store(idx.slot_of("a"), hashes[:60])
    nodes = [dataclasses.replace(nodes[0], queued_prefill_tokens=1500), nodes[1]]
    pick = lambda w: get_policy("kvfleet").rank(  # noqa: E731
        RouteRequest(hashes, 64 * BS, BS, 16, arrival_rate=1.0, latency_weight=w), nodes, idx)[0].node_id
    assert pick(1.0) == "b"
    assert pick(0.5) == "a"


def burst_until_first_spill(rate: float, shared: bool, limit: int = 3000) -> int:
    """Requests the holder of a 1,024-token prefix takes, in a burst on that prefix at
    ``rate`` requests/s, before the router sends one elsewhere (3 nodes at 1,000 prefill
    tokens/s, 1,040-token prompts; each pick adds its uncached tokens to that node's queue).
    ``shared``: the router keeps PrefixRates, as the service and the simulator do."""
    idx = PrefixIndex()
    nodes = fleet(idx, ["a", "b", "c"])
    h = chain(4, 65)
    idx.store(nodes[0].slot, h[:64])
    nodes[0] = dataclasses.replace(nodes[0], cached_blocks=64)
    arrivals, prefixes = ArrivalRate(), PrefixRates()
    policy = get_policy("kvfleet")
    for k in range(limit):
        now = k / rate if rate else 0.0
        req = dataclasses.replace(request(h, 1040), arrival_rate=arrivals.arrive(now) if rate else 0.0, now_s=now,
                                  shared_rates=prefixes if shared else None)
        ranking = policy.rank(req, nodes, idx)
        best = ranking[0]
        if best.node_id != "a":
            return k
        prefixes.arrive(ranking.prefix_key, now)
        nodes = send(nodes, best)
    return limit


@pytest.mark.parametrize("rate", [0.0, 10.0, 100.0, 1000.0])
def test_a_burst_on_one_prefix_gets_a_second_holder_early_at_any_traffic(rate):
    # On TTFT alone, recomputing elsewhere wins after 64 requests (the test above). The
    # burst's earlier arrivals share the prefix, so they do not count as traffic a
    # recomputation would delay. They do count as the prefix's own rate r: about k of them
    # in the last tau after k requests, the same number expected in the next tau. A second
    # holder would take half of those, each saving the holder's queue, 16 k tokens: a
    # credit of about k * 16 k / 2 tokens' time against the 1,024 recomputed, which wins
    # from k = 11. Without the credit: 64 to 69 requests at any rate; without the prefix
    # rates at all, 276 at 10 /s.
    assert 10 <= burst_until_first_spill(rate, shared=True) <= 13


@pytest.mark.parametrize("rate", [0.0, 100.0])
def test_without_the_replica_credit_a_burst_spills_only_when_waiting_costs_more_than_recomputing(rate, monkeypatch):
    from kvfleet.controller.router import policy as pol

    def rank_by_cost_alone(self, request, nodes, index):
        ev = pol.evaluate(request, nodes, index)
        return pol.ranked(ev, ev.cost_s, ev.cached_blocks)

    monkeypatch.setattr(pol.EstimatedTTFT, "rank", rank_by_cost_alone)
    assert 64 <= burst_until_first_spill(rate, shared=True) <= 70


def popular_prefix_pick(shared_rate: float | None) -> str:
    """A prefix that many requests share is held by one node, ``a``, whose decode batch is
    large (80 sequences, 12.3 ms steps); ``b`` runs 13 (8.7 ms steps). Both have empty
    queues. A request of 1,113 tokens, 1,024 of them that prefix: on ``a`` its TTFT is
    about 89 / rate + 1.5 steps = 21.7 ms; on ``b`` it recomputes the prefix, 53.2 ms,
    and delays b's other arrivals (4 /s over the two nodes) by 4.3 ms more."""
    idx = PrefixIndex()
    rate = 27_722.0
    a, b = fleet(idx, ["a", "b"], prefill_tokens_per_s=rate, max_num_batched_tokens=8192)
    a = dataclasses.replace(a, running=80, decode_step_s=0.0123, cached_blocks=64)
    b = dataclasses.replace(b, running=13, decode_step_s=0.0087)
    h = chain(9, 69)
    idx.store(a.slot, h[:64])
    prefixes = None
    if shared_rate is not None:
        prefixes = PrefixRates(tau_s=5.0)
        for k in range(int(shared_rate * 5.0 * 20)):     # a steady rate, 20 tau long
            prefixes.arrive(int(h[63]), k / shared_rate)
    now = 100.0
    req = RouteRequest(h, 1113, BS, 256, arrival_rate=4.0 + (shared_rate or 0.0), now_s=now, shared_rates=prefixes)
    ranking = get_policy("kvfleet").rank(req, [a, b], idx)
    by_id = {c.node_id: c for c in ranking}
    assert by_id["a"].credit_s == 0.0                      # the holder
    assert (by_id["b"].credit_s > 0) == (shared_rate is not None)
    assert by_id["a"].cost_s < by_id["b"].cost_s           # the estimate itself still favours the holder
    return ranking[0].node_id


def test_a_popular_prefix_on_one_busy_node_gets_a_second_holder():
    # Each request alone is better off on the holder (21.8 ms against 57.5), and
    # without the prefix's rate every one of them goes there, growing its batch. With r
    # requests/s sharing the prefix, a second holder would serve half of the next r * tau
    # of them, 1.5 steps faster each (5.4 ms): worth the 35.7 ms a recomputation costs from
    # about r = 2.65 /s (the rates measured here are 0.9 and 3.9 /s).
    assert popular_prefix_pick(None) == "a"
    assert popular_prefix_pick(1.0) == "a"
    assert popular_prefix_pick(4.0) == "b"


def test_without_prefix_rates_a_heavy_burst_piles_onto_the_holder():
    # The failure mode the prefix rates fix (docs/routing.md): every arrival counted as
    # traffic a miss delays, the holder's queue grows to many times a recomputation.
    assert burst_until_first_spill(100.0, shared=False) > 1000


def test_prefix_rates_count_recent_requests_per_block_and_forget_the_least_recent():
    r = PrefixRates(tau_s=5.0, max_entries=2)
    for k in range(50):
        r.arrive(7, k * 0.1)                      # 10 requests/s for 5 s
    assert r.peek(7, 4.9) == pytest.approx(10 * (1 - math.exp(-5.0 / 5.0)), rel=0.05)
    assert r.peek(8, 4.9) == 0.0
    r.arrive(8, 5.0)
    r.arrive(9, 5.0)                              # a third key: 7, the least recent, goes
    assert len(r) == 2 and r.peek(7, 5.0) == 0.0 and r.peek(9, 5.0) > 0
