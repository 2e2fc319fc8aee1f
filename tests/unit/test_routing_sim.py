"""The routing simulator: exact DES behaviour, the hit-rate bounds, the baselines'
decisions on hand-built views, and a smoke run of ``kvfleet bench routing``."""

from __future__ import annotations

import inspect
import json

import numpy as np
import pytest
from typer.testing import CliRunner

import kvfleet.controller.sim.baselines  # noqa: F401  (registers the baselines)
from kvfleet.controller.router.index import PrefixIndex
from kvfleet.controller.router.policy import POLICIES, NodeView, RouteRequest, get_policy
from kvfleet.controller.router.service import RouterService
from kvfleet.controller.sim.des import capacity_scale, simulate, trace_stats
from kvfleet.controller.sim.presets import PRESETS, preset_config
from kvfleet.controller.sim.workloads import Mooncake, SharedPrefix, TraceRequest, synthetic_tokens
from kvfleet.hashing import block_hashes
from kvfleet.node_agent.engines.sim_core import SimConfig

BS = 4
TINY = SimConfig(model="tiny", block_size=BS, num_blocks=64, max_model_len=64, prefill_tokens_per_s=1000.0,
                 decode_step_base_s=0.01, decode_step_per_seq_s=0.0, vocab_size=1000, eos_token_id=None)


def toks(stream: int, n: int) -> np.ndarray:
    return synthetic_tokens(stream, 0, n, 1000)


def req(at: float, *parts: np.ndarray, out: int = 3) -> TraceRequest:
    return TraceRequest(at, np.concatenate(parts), out)


# -- the discrete-event simulation -----------------------------------------------------------
def test_second_request_on_one_node_reuses_the_shared_prefix_exactly():
    shared = toks(1, 8)                                   # two full blocks of 4
    trace = [req(0.0, shared, toks(2, 4)), req(1.0, shared, toks(3, 5))]
    res = simulate(trace, "kvfleet", TINY, 1)
    a, b = res.requests
    assert (a.cached_tokens, b.cached_tokens) == (0, 8)
    assert a.ttft_s == pytest.approx(12 / 1000)           # 12 prompt tokens in one prefill step
    assert a.e2e_s == pytest.approx(12 / 1000 + 2 * 0.01)  # then two decode steps
    assert b.ttft_s == pytest.approx(5 / 1000)            # only the 5 uncached tokens
    assert res.busy_s == [pytest.approx(0.012 + 0.02 + 0.005 + 0.02)]
    assert res.summary()["hit_rate"] == pytest.approx(8 / 25)


def test_router_follows_kv_events_into_the_index_and_spreads_new_prefixes():
    shared = toks(1, 8)
    trace = [req(0.0, shared, toks(2, 4)), req(1.0, shared, toks(3, 5)), req(2.0, toks(4, 12))]
    res = simulate(trace, "kvfleet", TINY, 2)
    assert [r.node for r in res.requests] == [0, 0, 1]
    assert [r.cached_tokens for r in res.requests] == [0, 8, 0]


def test_delayed_kv_events_hide_a_prefix_from_the_router_until_they_land():
    shared = toks(1, 40)                                  # 40 ms of prefill: worth waiting for a step
    trace = [req(0.0, shared, toks(2, 4), out=10), req(0.06, shared, toks(3, 5))]
    now = simulate(trace, "kvfleet", TINY, 2)
    late = simulate(trace, "kvfleet", TINY, 2, kv_delay_s=1.0)
    assert [r.node for r in now.requests] == [0, 0] and now.requests[1].cached_tokens == 40
    assert [r.node for r in late.requests] == [0, 1] and late.requests[1].cached_tokens == 0


def test_the_router_sees_a_node_as_of_its_last_step_end_plus_what_it_sent_since(monkeypatch):
    """A node agent publishes its load when an engine step ends; in between, the router
    knows only what it sent. So a request arriving mid-step sees the step's work as
    still queued, not the state the simulated engine has already advanced to."""
    seen = []

    class Spy:
        def rank(self, request, nodes, index):
            t = nodes if hasattr(nodes, "queued_prefill_tokens") else None
            seen.append((t.queued_prefill_tokens.tolist(), t.waiting.tolist(), t.running.tolist()))
            return get_policy("round_robin").rank(request, nodes, index)

    monkeypatch.setitem(POLICIES, "spy", Spy)
    a, b = toks(7, 12), toks(8, 12)
    # A: 12 tokens, one 12 ms prefill step; B arrives at 5 ms (mid-step), C at 20 ms (after it).
    simulate([req(0.0, a, out=4), req(0.005, b), req(0.020, toks(9, 12))], "spy", TINY, 1)
    assert seen[0] == ([0], [0], [0])                   # idle fleet
    assert seen[1] == ([12], [1], [0])                  # A as the router sent it: 12 tokens, not yet admitted
    assert seen[2] == ([12], [1], [1])                  # step end: A decoding, B waiting with its 12 tokens


def test_simulation_is_deterministic():
    wl = SharedPrefix(groups=4, per_group=4, system_tokens=64, question_tokens=8, output_tokens=4)
    cfg = TINY.model_copy(update={"vocab_size": 32_000, "max_model_len": 128, "num_blocks": 256})
    a = simulate(wl, "kvfleet", cfg, 3).summary()
    b = simulate(wl, "kvfleet", cfg, 3).summary()
    for k in ("wall_s", "cpu_s"):
        a.pop(k), b.pop(k)
    assert a == b and a["completed"] == 16


def test_kv_events_batched_between_arrivals_reach_the_index_before_each_decision(monkeypatch):
    # The simulator applies a node's KV events in one batch just before the next routing
    # decision and rebuilds only changed views; the policy must still see the live index.
    consistent = []

    class Audit:
        def __init__(self) -> None:
            self.inner = get_policy("kvfleet")

        def rank(self, request, nodes, index):
            consistent.append(all(v.cached_blocks == index.blocks_of(v.slot) for v in nodes))
            return self.inner.rank(request, nodes, index)

    monkeypatch.setitem(POLICIES, "audit", Audit)
    wl = SharedPrefix(groups=4, per_group=8, system_tokens=64, question_tokens=8, output_tokens=12)
    cfg = TINY.model_copy(update={"vocab_size": 32_000, "max_model_len": 128, "num_blocks": 48})  # evicts
    audited = simulate(wl, "audit", cfg, 3)
    plain = simulate(wl, "kvfleet", cfg, 3)
    assert len(consistent) == 32 and all(consistent)
    assert [(r.node, r.cached_tokens, r.ttft_s) for r in audited.requests] == \
        [(r.node, r.cached_tokens, r.ttft_s) for r in plain.requests]


def test_a_burst_on_one_prefix_spreads_under_kvfleet_but_not_under_prefix_hash():
    cfg = TINY.model_copy(update={"num_blocks": 1024, "max_model_len": 256})
    hot = toks(1, 160)
    burst = [req(i * 0.001, hot, toks(100 + i, 8), out=4) for i in range(40)]
    spread = {r.node for r in simulate(burst, "kvfleet", cfg, 4).requests}
    pinned = {r.node for r in simulate(burst, "prefix_hash", cfg, 4).requests}
    assert spread == {0, 1, 2, 3} and len(pinned) == 1


# -- bounds and capacity ---------------------------------------------------------------------
@pytest.mark.parametrize(("nodes", "lru_hit"), [(1, 0), (2, 8)])
def test_infinite_and_pooled_lru_bounds_on_a_tiny_trace(nodes, lru_hit):
    cfg = TINY.model_copy(update={"num_blocks": 4, "max_model_len": 16})
    a, b, d = toks(1, 8), toks(2, 8), toks(3, 8)
    trace = [req(0, a, out=1), req(1, b, out=1), req(2, d, out=1), req(3, a, toks(4, 4), out=1)]
    st = trace_stats(trace, cfg, nodes)
    assert st.prompt_tokens == 36 and st.requests == 4 and st.span_s == 3
    assert st.infinite_hit_tokens == 8             # the last request's two blocks of `a`
    assert st.pooled_lru_hit_tokens == lru_hit     # 4 blocks: `a` was evicted by `b` and `d`


def test_bounds_cap_the_hit_so_the_last_prompt_token_is_computed():
    x = toks(1, 8)
    st = trace_stats([req(0, x, out=1), req(1, x, out=1)], TINY, 1)
    assert st.infinite_hit_tokens == st.pooled_lru_hit_tokens == 4


def test_capacity_scale_makes_offered_work_the_requested_fraction():
    trace = [req(float(i), toks(i, 12), out=2) for i in range(11)]
    st = trace_stats(trace, TINY, 2)
    scale = capacity_scale(st, 2, 0.5)
    assert st.work_s / (2 * st.span_s * scale) == pytest.approx(0.5)


def test_mooncake_blocks_are_shared_exactly_when_hash_ids_are(tmp_path):
    p = tmp_path / "t.jsonl"
    p.write_text('{"timestamp": 0, "input_length": 600, "output_length": 5, "hash_ids": [7, 8]}\n'
                 '{"timestamp": 1500, "input_length": 1024, "output_length": 0, "hash_ids": [7, 9]}\n')
    a, b = list(Mooncake(p))
    assert (len(a.prompt), len(b.prompt), a.prompt.dtype) == (600, 1024, np.uint32)
    assert (a.arrival_s, b.arrival_s, b.output_tokens) == (0.0, 1.5, 1)
    assert np.array_equal(a.prompt[:512], b.prompt[:512]) and not np.array_equal(a.prompt[512:600], b.prompt[512:600])


def test_presets_follow_the_stated_derivation():
    c = preset_config("h100-llama3-8b")
    kv_per_token = 2 * 32 * 8 * 128 * 2
    assert c.block_size == 16 and c.decode_step_per_context_token_s == pytest.approx(kv_per_token / (3.35e12 * 0.8))
    assert c.num_blocks == int((81_559 * 2**20 * 0.9 - 8.03e9 * 2 - 1.5 * 2**30) // (kv_per_token * 16))
    assert c.prefill_tokens_per_s == pytest.approx(989.4e12 * 0.45 / (2 * 8.03e9))
    assert preset_config("h100-llama3-8b", block_size=32).num_blocks == c.num_blocks // 2
    assert set(PRESETS) >= {"h100-llama3-8b", "a100-llama3-8b", "h100-llama3-70b-tp4"}


# -- baselines on hand-built views -----------------------------------------------------------
def view(node_id: str, slot: int, **kw) -> NodeView:
    f = dict(node_id=node_id, address="", routable=True, block_size=16, num_blocks=10_000,
             prefill_tokens_per_s=1000.0, decode_tokens_per_s=50.0, running=0, waiting=0, kv_usage=0.0,
             queued_prefill_tokens=0, cached_blocks=0, slot=slot)
    f.update(kw)
    return NodeView(**f)


def route(hashes: np.ndarray, prompt: int) -> RouteRequest:
    return RouteRequest(block_hashes=hashes, prompt_tokens=prompt, block_size=16, max_tokens=16)


def chain(seed: int, n: int) -> np.ndarray:
    return block_hashes(np.random.default_rng(seed).integers(0, 50_000, n * 16), 16)


def setup(specs: dict[str, dict], held: dict[str, np.ndarray] | None = None):
    idx = PrefixIndex()
    nodes = [view(n, idx.add_node(n), **kw) for n, kw in specs.items()]
    for n, h in (held or {}).items():
        idx.store(idx.slot_of(n), h)
    return idx, nodes


def order(name: str, idx, nodes, r) -> list[str]:
    return [c.node_id for c in get_policy(name).rank(r, nodes, idx)]


def test_baselines_are_registered_without_changing_the_default_policy():
    assert {"prefix_hash", "sglang", "dynamo", "llmd", "preble"} <= set(POLICIES)
    assert inspect.signature(RouterService.__init__).parameters["policy"].default == "kvfleet"


def test_prefix_hash_sends_a_prefix_to_one_node_whatever_the_load():
    h = chain(1, 20)
    idx, nodes = setup({f"n{i}": {} for i in range(5)})
    first = order("prefix_hash", idx, nodes, route(h, 320))[0]
    busy = [view(v.node_id, v.slot, queued_prefill_tokens=10**6 if v.node_id == first else 0) for v in nodes]
    longer = np.concatenate([h[:8], chain(2, 4)])          # same first 8 blocks, different tail
    assert order("prefix_hash", idx, busy, route(longer, 12 * 16))[0] == first
    targets = {order("prefix_hash", idx, nodes, route(chain(s, 10), 160))[0] for s in range(100, 160)}
    assert targets == {v.node_id for v in nodes}          # distinct prefixes spread over all nodes


def test_sglang_balances_when_imbalanced_else_follows_the_cache_else_the_smallest_tree():
    h = chain(3, 10)
    # Imbalanced (100 - 10 > 64 and 100 > 1.5 * 10): shortest queue, cache ignored.
    idx, nodes = setup({"a": dict(running=100), "b": dict(running=10, cached_blocks=50),
                        "c": dict(running=30)}, {"a": h})
    assert order("sglang", idx, nodes, route(h, 160))[0] == "b"
    # Balanced, match 9/10 of the prompt > 0.3: best match.
    idx, nodes = setup({"a": dict(running=20), "b": dict(running=10)}, {"a": h})
    assert order("sglang", idx, nodes, route(h, 160))[0] == "a"
    # Balanced, match 2/10 <= 0.3: the smallest tree.
    idx, nodes = setup({"a": dict(cached_blocks=5), "b": dict(cached_blocks=3), "c": dict(cached_blocks=9)},
                       {"c": h[:2]})
    assert order("sglang", idx, nodes, route(h, 160)) == ["b", "a", "c"]


def test_dynamo_picks_the_lowest_prefill_plus_decode_block_cost():
    h = chain(4, 10)                                      # 160 tokens: 10 prompt blocks, 9 cacheable
    # a: max(0 + 10 - 9, 0) + 0.02 * 1000 = 21; b: 10 + 5 = 15; c: 160/16 + 10 + 0 = 20
    idx, nodes = setup({"a": dict(kv_usage=0.02, num_blocks=1000), "b": dict(kv_usage=0.005, num_blocks=1000),
                        "c": dict(queued_prefill_tokens=160, num_blocks=1000)}, {"a": h})
    assert order("dynamo", idx, nodes, route(h, 160)) == ["b", "c", "a"]


def test_llmd_weights_prefix_two_kv_one_queue_one():
    h = chain(5, 10)
    # a: 2 * 0.9 + 0.5 + 0 = 2.3; b: 0 + 1.0 + 1.0 = 2.0; c: 2 * 0.4 + 0.9 + 0.5 = 2.2
    idx, nodes = setup({"a": dict(kv_usage=0.5, waiting=4), "b": dict(), "c": dict(kv_usage=0.1, waiting=2)},
                       {"a": h, "c": h[:4]})
    assert order("llmd", idx, nodes, route(h, 160)) == ["a", "c", "b"]


def test_preble_exploits_a_mostly_cached_prompt_and_otherwise_explores_by_load():
    h = chain(6, 10)
    idx, nodes = setup({"a": dict(queued_prefill_tokens=5000), "b": dict()}, {"a": h[:6]})
    assert order("preble", idx, nodes, route(h, 160))[0] == "a"      # 96 cached > 64 uncached
    idx, nodes = setup({"a": dict(queued_prefill_tokens=5000), "b": dict(running=3)}, {"a": h[:4]})
    assert order("preble", idx, nodes, route(h, 160))[0] == "b"      # 64 cached < 96: lowest load


# -- the command -----------------------------------------------------------------------------
def test_bench_routing_command_prints_every_policy_and_writes_json(tmp_path):
    from kvfleet.cli.main import app

    out = tmp_path / "r.json"
    res = CliRunner().invoke(app, ["bench", "routing", "--workload", "shared-prefix", "--requests", "48",
                                   "--nodes", "2", "--preset", "h100-llama3-8b", "--load", "0.8",
                                   "--policies", "kvfleet,round_robin,sglang", "--json", str(out)])
    assert res.exit_code == 0, res.output
    assert "pooled-LRU" in res.output and "round_robin" in res.output
    report = json.loads(out.read_text())
    assert [p["policy"] for p in report["policies"]] == ["kvfleet", "round_robin", "sglang"]
    assert all(p["completed"] == 48 for p in report["policies"])
    b = report["bounds"]
    assert 0 < b["pooled_lru_hit_rate"] <= b["infinite_cache_hit_rate"] < 1
    assert all(p["hit_rate"] <= b["infinite_cache_hit_rate"] + 1e-9 for p in report["policies"])
