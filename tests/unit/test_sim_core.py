"""SimEngineCore, driven directly with a fake clock: exact cache hits, events, eviction
order, load numbers and step durations, in the style of vLLM's test_prefix_caching.py."""

from __future__ import annotations

import dataclasses
import random
from collections import OrderedDict
from dataclasses import dataclass, field

import pytest
from pydantic import ValidationError

from kvfleet.node_agent.engine import EngineError, EngineOutput, EngineRequest, LoadSnapshot
from kvfleet.node_agent.engines.sim_core import SimConfig, SimEngineCore, StepResult, _FreeBlockQueue
from kvfleet.node_agent.kv_events import AllBlocksCleared, BlockRemoved, BlockStored



def _queue_load(core: SimEngineCore) -> LoadSnapshot:
    """``core.load()`` without the decode-step estimate (tests/unit/test_load_signals.py covers it)."""
    return dataclasses.replace(core.load(), decode_step_s=0.0)

def make_core(**overrides) -> SimEngineCore:
    """A small engine: 4-token blocks so that block lists stay short and readable."""
    cfg = dict(block_size=4, num_blocks=64, max_model_len=64)
    cfg.update(overrides)
    return SimEngineCore(SimConfig(**cfg))


def req(rid: str, tokens, max_tokens: int = 1, **kw) -> EngineRequest:
    kw.setdefault("seed", 7)
    return EngineRequest(request_id=rid, prompt_token_ids=list(tokens), max_tokens=max_tokens, **kw)


@dataclass
class Run:
    t: float
    outputs: dict[str, list[EngineOutput]] = field(default_factory=dict)
    events: list = field(default_factory=list)
    steps: list[StepResult] = field(default_factory=list)
    first_token_at: dict[str, float] = field(default_factory=dict)

    def tokens(self, rid: str) -> list[int]:
        return [t for o in self.outputs[rid] for t in o.new_token_ids]


def run_to_idle(core: SimEngineCore, t: float = 0.0) -> Run:
    run = Run(t)
    while core.has_work():
        res = core.step(run.t)
        run.t += res.duration_s
        run.steps.append(res)
        run.events.extend(res.events)
        for rid, out in res.outputs:
            run.outputs.setdefault(rid, []).append(out)
            run.first_token_at.setdefault(rid, run.t)
    return run


# ---------------------------------------------------------------- prefix cache hits


def test_second_request_sharing_a_prefix_gets_exactly_the_shared_full_blocks():
    core = make_core()
    a = list(range(22))                          # 5 full blocks + 2 tokens
    b = a[:14] + list(range(100, 110))           # shares 14 tokens = 3 full blocks
    core.add_request(req("a", a), 0.0)
    first = run_to_idle(core)
    core.add_request(req("b", b), first.t)
    second = run_to_idle(core, first.t)

    assert first.outputs["a"][0].num_cached_tokens == 0
    assert second.outputs["b"][0].num_cached_tokens == 12
    assert core.stats.prefix_cache_queries == 22 + 24
    assert core.stats.prefix_cache_hits == 12


@pytest.mark.parametrize("k", [1, 2, 5])
def test_prompt_of_exactly_k_blocks_hits_k_minus_1_blocks_so_last_token_is_computed(k):
    core = make_core()
    prompt = list(range(4 * k))
    core.add_request(req("a", prompt), 0.0)
    first = run_to_idle(core)
    core.add_request(req("b", prompt), first.t)
    second = run_to_idle(core, first.t)

    assert second.outputs["b"][0].num_cached_tokens == 4 * (k - 1)
    # The recomputed last block is already cached: it is not stored a second time.
    assert second.events == []
    assert core.cached_block_hashes() == core.engine_block_hashes(prompt)


def test_prompt_one_token_past_k_blocks_hits_all_k_blocks():
    core = make_core()
    prompt = list(range(8))
    core.add_request(req("a", prompt), 0.0)
    first = run_to_idle(core)
    core.add_request(req("b", prompt + [99]), first.t)
    second = run_to_idle(core, first.t)
    assert second.outputs["b"][0].num_cached_tokens == 8


def test_same_prompt_computed_twice_in_one_step_is_stored_once_and_shared():
    core = make_core()
    prompt = list(range(8))
    core.add_request(req("a", prompt, max_tokens=3), 0.0)
    core.add_request(req("b", prompt, max_tokens=3), 0.0)
    res = core.step(0.0)
    h = core.engine_block_hashes(prompt)
    assert res.events == [BlockStored(block_hashes=h, parent_block_hash=None, token_ids=prompt,
                                      block_size=4, medium="GPU")]
    assert [o.num_cached_tokens for _, o in res.outputs] == [0, 0]
    # Both hold the same two blocks (4 if the copy were kept) ...
    assert core.num_pinned_blocks == 2
    # ... and each takes a block of its own when its first generated token is computed.
    core.step(0.1)
    assert core.num_pinned_blocks == 2 + 2


# ---------------------------------------------------------------- KV events


def test_prefill_and_decode_publish_exact_block_stored_events():
    core = make_core()
    prompt = list(range(10))                      # blocks 0, 1 full; block 2 partial
    core.add_request(req("a", prompt, max_tokens=7), 0.0)
    run = run_to_idle(core)
    tokens = prompt + run.tokens("a")             # 17 tokens; 16 computed (the last is never fed)
    h = core.engine_block_hashes(tokens)

    assert len(run.steps) == 7
    assert [s.events for s in run.steps] == [
        [BlockStored(block_hashes=h[0:2], parent_block_hash=None, token_ids=tokens[0:8], block_size=4, medium="GPU")],
        [],
        [BlockStored(block_hashes=[h[2]], parent_block_hash=h[1], token_ids=tokens[8:12], block_size=4, medium="GPU")],
        [], [], [],
        [BlockStored(block_hashes=[h[3]], parent_block_hash=h[2], token_ids=tokens[12:16], block_size=4, medium="GPU")],
    ]


def test_engine_hash_depends_on_seed_and_whole_prefix():
    a = make_core(hash_seed=1)
    b = make_core(hash_seed=2)
    tokens = list(range(8))
    assert a.engine_block_hashes(tokens) != b.engine_block_hashes(tokens)
    h = a.engine_block_hashes(tokens)
    assert a.engine_block_hashes(tokens[4:], parent=h[0]) == h[1:]
    assert a.engine_block_hashes([9, 9, 9, 9] + tokens[4:])[1] != h[1]


# ---------------------------------------------------------------- eviction


def test_lru_eviction_removes_leaves_before_parents_and_emits_block_removed():
    core = make_core(num_blocks=8, max_model_len=32)
    a = list(range(13))                           # 3 full blocks + 1 partial
    core.add_request(req("a", a), 0.0)
    run = run_to_idle(core)
    ha = core.engine_block_hashes(a)
    # Freed tail first: the anonymous partial block, then h2, h1, h0.
    assert core.evictable_block_hashes() == [ha[2], ha[1], ha[0]]
    assert core.num_free_blocks == 8

    b = list(range(100, 124))                     # 6 blocks: 4 never used, the anonymous one, then h2
    core.add_request(req("b", b), run.t)
    run = run_to_idle(core, run.t)
    hb = core.engine_block_hashes(b)
    assert run.events == [
        BlockRemoved(block_hashes=[ha[2]], medium="GPU"),
        BlockStored(block_hashes=hb, parent_block_hash=None, token_ids=b, block_size=4, medium="GPU"),
    ]
    assert core.evictable_block_hashes() == [ha[1], ha[0]] + hb[::-1]

    c = list(range(200, 209))                     # 3 blocks
    core.add_request(req("c", c), run.t)
    run = run_to_idle(core, run.t)
    assert run.events[0] == BlockRemoved(block_hashes=[ha[1], ha[0], hb[5]], medium="GPU")
    assert set(core.cached_block_hashes()) == set(hb[:5]) | set(core.engine_block_hashes(c))


def test_prefix_hit_on_a_free_cached_block_protects_it_from_eviction():
    core = make_core(num_blocks=8, max_model_len=32)
    a = list(range(8))
    core.add_request(req("a", a), 0.0)
    run = run_to_idle(core)
    # Needs 6 blocks: 2 hits (taken out of the free queue) + 4 new; 8 - 2 = 6 are free.
    core.add_request(req("b", a + list(range(50, 66))), run.t)
    run = run_to_idle(core, run.t)
    assert run.outputs["b"][0].num_cached_tokens == 8
    assert not any(isinstance(e, BlockRemoved) for e in run.events)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_free_queue_pops_in_the_order_an_ordered_dict_would_through_compactions(seed):
    # The lazy-deletion log against the linked hash map it replaced, with enough
    # removals from the middle that the log is compacted many times.
    rng = random.Random(seed)
    num_blocks = 3000
    q, ref = _FreeBlockQueue(num_blocks), OrderedDict()
    fresh, next_id = num_blocks, 0
    held: list[int] = []
    for _ in range(60_000):
        op = rng.random()
        if op < 0.4 and len(q):
            b = q.popleft()
            if fresh:
                assert b == next_id
                fresh, next_id = fresh - 1, next_id + 1
            else:
                assert b == ref.popitem(last=False)[0]
            held.append(b)
        elif op < 0.75 and held:
            b = held.pop(rng.randrange(len(held)))
            q.append(b)
            ref[b] = None
        elif ref:
            b = rng.choice(list(ref)[:50]) if rng.random() < 0.5 else next(reversed(ref))
            q.remove(b)
            del ref[b]
            held.append(b)
        assert len(q) == fresh + len(ref)
    assert list(q.blocks()) == list(ref)
    assert q.num_used == next_id


# ---------------------------------------------------------------- load and abort


def test_load_counts_pinned_blocks_and_uncached_prompt_tokens():
    core = make_core(num_blocks=16, max_model_len=64, max_num_batched_tokens=8)
    shared = list(range(12))
    core.add_request(req("a", shared), 0.0)
    t = run_to_idle(core).t
    assert _queue_load(core) == LoadSnapshot(running=0, waiting=0, kv_usage=0.0, queued_prefill_tokens=0)

    core.add_request(req("b", shared + list(range(50, 62)), max_tokens=4), t)   # 24 tokens, 12 cached
    assert _queue_load(core) == LoadSnapshot(running=0, waiting=1, kv_usage=0.0, queued_prefill_tokens=12)
    core.step(t)                                  # budget 8: computes tokens 12..19
    assert _queue_load(core) == LoadSnapshot(running=1, waiting=0, kv_usage=5 / 16, queued_prefill_tokens=4)
    core.step(t + 1)                              # tokens 20..23, samples the first token
    assert _queue_load(core) == LoadSnapshot(running=1, waiting=0, kv_usage=6 / 16, queued_prefill_tokens=0)


def test_abort_of_running_request_frees_its_blocks_and_drops_running_at_once():
    core = make_core()
    prompt = list(range(10))
    core.add_request(req("a", prompt, max_tokens=20), 0.0)
    core.step(0.0)
    assert core.load().running == 1
    assert core.num_pinned_blocks == 3

    assert core.abort("a", 0.1) is True
    assert _queue_load(core) == LoadSnapshot(running=0, waiting=0, kv_usage=0.0, queued_prefill_tokens=0)
    assert not core.has_work()
    # Its computed full blocks stay cached for the next request.
    assert core.evictable_block_hashes() == core.engine_block_hashes(prompt)[::-1]
    assert core.abort("a", 0.2) is False


def test_abort_of_waiting_request_removes_it_from_the_queue():
    core = make_core(max_num_seqs=1)
    core.add_request(req("a", [1, 2, 3], max_tokens=3), 0.0)
    core.add_request(req("b", [4, 5, 6], max_tokens=3), 0.0)
    core.step(0.0)
    assert core.load().waiting == 1
    assert core.abort("b", 0.1) is True
    assert _queue_load(core) == LoadSnapshot(running=1, waiting=0, kv_usage=1 / 64, queued_prefill_tokens=0)
    run = run_to_idle(core, 0.1)
    assert list(run.outputs) == ["a"]


# ---------------------------------------------------------------- scheduling


def test_waiting_queue_admits_by_priority_then_arrival():
    core = make_core(max_num_seqs=1)
    core.add_request(req("a", [1, 2, 3], max_tokens=2, priority=0), 0.0)
    core.step(0.0)                                # "a" runs; the rest must wait for it
    for i, (rid, prio) in enumerate([("b", 5), ("c", 1), ("d", 1), ("e", -1)]):
        core.add_request(req(rid, [10 + i, 11, 12], max_tokens=2, priority=prio), 0.1 * (i + 1))
    assert core.request_ids() == (["a"], ["e", "c", "d", "b"])
    run = run_to_idle(core, 0.5)
    assert sorted(run.first_token_at, key=run.first_token_at.get) == ["a", "e", "c", "d", "b"]


def test_chunked_prefill_of_4000_tokens_at_8000_per_s_gives_first_token_after_half_a_second():
    core = SimEngineCore(SimConfig())             # defaults: 2048-token budget, 8,000 tokens/s
    prompt = [ord("a") + i % 26 for i in range(4000)]
    core.add_request(req("a", prompt, max_tokens=2), 0.0)
    assert core.load().queued_prefill_tokens == 4000

    s1 = core.step(0.0)
    assert s1.outputs == []
    assert s1.duration_s == pytest.approx(2048 / 8000)
    assert core.num_computed_tokens("a") == 2048
    assert _queue_load(core) == LoadSnapshot(running=1, waiting=0, kv_usage=128 / 4096, queued_prefill_tokens=1952)

    s2 = core.step(s1.duration_s)
    assert s2.duration_s == pytest.approx(1952 / 8000)
    assert [rid for rid, _ in s2.outputs] == ["a"]
    assert s1.duration_s + s2.duration_s == pytest.approx(0.5)

    s3 = core.step(0.5)                            # one decode step: 10 ms + 0.2 ms per sequence
    assert s3.duration_s == pytest.approx(0.0102)
    assert s3.outputs[0][1].finish_reason == "length"


def test_mixed_step_costs_prefill_tokens_plus_one_decode_step():
    core = SimEngineCore(SimConfig(decode_step_per_context_token_s=1e-6))
    core.add_request(req("a", list(range(8)), max_tokens=3), 0.0)
    core.step(0.0)                                # prefill of "a"
    core.add_request(req("b", list(range(100)), max_tokens=3), 0.0)
    res = core.step(0.001)                        # "a" decodes (context 9 tokens), "b" prefills 100
    assert (res.num_prefill_tokens, res.num_decode_seqs) == (100, 1)
    assert res.duration_s == pytest.approx(100 / 8000 + 0.010 + 0.0002 + 9e-6)


def test_preemption_under_kv_pressure_recomputes_and_loses_no_request():
    prompts = {"a": list(range(0, 8)), "b": list(range(20, 28)), "c": list(range(40, 48))}

    def add_all(core: SimEngineCore) -> None:
        for rid, p in prompts.items():            # output text seeded by the request id
            core.add_request(req(rid, p, max_tokens=12, seed=None), 0.0)

    roomy = make_core(num_blocks=64, max_model_len=32)
    add_all(roomy)
    expected = run_to_idle(roomy)
    assert roomy.stats.num_preemptions == 0

    core = make_core(num_blocks=8, max_model_len=32)   # 3 requests x 5 blocks > 8 blocks
    add_all(core)
    s1 = core.step(0.0)                            # all admitted, 2 blocks each
    s2 = core.step(1.0)                            # each needs a 3rd block; only 2 are free
    assert s2.num_preempted == 1
    assert core.request_ids() == (["a", "b"], ["c"])   # the latest arrival is the victim
    rest = run_to_idle(core, 2.0)

    for rid in prompts:
        early = [t for s in (s1, s2) for r, o in s.outputs if r == rid for t in o.new_token_ids]
        # Same tokens as without pressure: recomputation changes timing, never content.
        assert early + rest.tokens(rid) == expected.tokens(rid)
        assert len(expected.tokens(rid)) == 12
        assert rest.outputs[rid][-1].finish_reason == "length"
    assert core.stats.num_preemptions >= 1
    assert core.num_pinned_blocks == 0
    assert not core.has_work()


def test_preemption_victim_is_the_lowest_priority_even_if_already_scheduled_this_step():
    core = make_core(num_blocks=8, max_model_len=32)
    core.add_request(req("a", list(range(0, 8)), max_tokens=12, priority=0), 0.0)
    core.add_request(req("b", list(range(20, 28)), max_tokens=12, priority=2), 0.0)
    core.add_request(req("c", list(range(40, 48)), max_tokens=12, priority=0), 0.0)
    core.step(0.0)
    s2 = core.step(1.0)
    # "b" got its block first, then lost it (and its budget) so that "c" could run.
    assert s2.num_preempted == 1
    assert core.request_ids() == (["a", "c"], ["b"])
    assert [rid for rid, _ in s2.outputs] == ["a", "c"]
    run = run_to_idle(core, 2.0)
    assert sorted(run.outputs) == ["a", "b", "c"]


def test_no_request_is_lost_when_many_compete_for_a_tiny_cache():
    core = make_core(num_blocks=8, max_model_len=32, max_num_batched_tokens=6)
    for i in range(12):
        core.add_request(req(f"r{i}", [i] * 5 + [i + 1] * 3, max_tokens=10, priority=i % 3), 0.01 * i)
    run = run_to_idle(core, 0.2)
    assert sorted(run.outputs) == sorted(f"r{i}" for i in range(12))
    assert all(len(run.tokens(rid)) == 10 for rid in run.outputs)
    assert all(outs[-1].finish_reason == "length" for outs in run.outputs.values())
    assert core.num_pinned_blocks == 0


# ---------------------------------------------------------------- outputs


def test_output_is_deterministic_readable_ascii():
    core = make_core(max_model_len=256)
    core.add_request(req("x", [1, 2, 3], max_tokens=200, seed=42), 0.0)
    core.add_request(req("y", [1, 2, 3], max_tokens=200, seed=42), 0.0)
    core.add_request(req("z", [1, 2, 3], max_tokens=200, seed=43), 0.0)
    run = run_to_idle(core)
    assert run.tokens("x") == run.tokens("y") != run.tokens("z")
    text = bytes(run.tokens("x")).decode("ascii")
    assert text.isprintable() and " " in text


def test_greedy_requests_with_the_same_prompt_generate_the_same_text():
    core = make_core()
    core.add_request(req("x", [1, 2, 3], max_tokens=20, seed=None, temperature=0.0), 0.0)
    core.add_request(req("y", [1, 2, 3], max_tokens=20, seed=None, temperature=0.0), 0.0)
    core.add_request(req("z", [1, 2, 4], max_tokens=20, seed=None, temperature=0.0), 0.0)
    run = run_to_idle(core)
    assert run.tokens("x") == run.tokens("y") != run.tokens("z")


def test_stop_token_finishes_with_stop_and_is_the_last_token():
    core = make_core()
    core.add_request(req("a", [1, 2, 3], max_tokens=50, stop_token_ids=[ord(" ")]), 0.0)
    run = run_to_idle(core)
    toks = run.tokens("a")
    assert toks[-1] == ord(" ") and ord(" ") not in toks[:-1]
    assert run.outputs["a"][-1].finish_reason == "stop"


def test_eos_finishes_with_stop_and_length_wins_over_eos():
    core = make_core(eos_probability=1.0)
    core.add_request(req("a", [1, 2, 3], max_tokens=5), 0.0)
    core.add_request(req("b", [1, 2, 3], max_tokens=1), 0.0)
    run = run_to_idle(core)
    assert run.outputs["a"] == [EngineOutput(new_token_ids=[256], finished=True, finish_reason="stop",
                                             num_cached_tokens=0)]
    assert run.outputs["b"][-1].finish_reason == "length"


def test_max_tokens_gives_exactly_that_many_tokens_and_finish_length():
    core = make_core()
    core.add_request(req("a", [1, 2, 3], max_tokens=9), 0.0)
    run = run_to_idle(core)
    assert len(run.outputs["a"]) == 9
    assert [o.finished for o in run.outputs["a"]] == [False] * 8 + [True]
    assert run.outputs["a"][-1].finish_reason == "length"
    assert [o.num_cached_tokens for o in run.outputs["a"]] == [0] + [None] * 8


# ---------------------------------------------------------------- reset, validation, clock


def test_reset_prefix_cache_clears_only_when_idle_and_emits_all_blocks_cleared():
    core = make_core()
    prompt = list(range(9))
    core.add_request(req("a", prompt, max_tokens=3), 0.0)
    core.step(0.0)
    assert core.reset_prefix_cache() is False
    assert core.drain_events() == []
    t = run_to_idle(core, 1.0).t

    assert core.reset_prefix_cache() is True
    assert core.drain_events() == [AllBlocksCleared()]
    assert core.cached_block_hashes() == []
    assert core.num_free_blocks == 64
    core.add_request(req("b", prompt), t)
    assert run_to_idle(core, t).outputs["b"][0].num_cached_tokens == 0


def test_events_from_reset_come_out_of_the_next_step():
    core = make_core()
    assert core.reset_prefix_cache() is True
    assert core.step(0.0).events == [AllBlocksCleared()]


@pytest.mark.parametrize(
    "request_, message",
    [
        (EngineRequest("e", [], 4), "prompt is empty"),
        (EngineRequest("e", [1, 257, 3], 4), "token id 257 at position 1 is outside the vocabulary 0..256"),
        (EngineRequest("e", [1, -1], 4), "token id -1 at position 1"),
        (EngineRequest("e", [1] * 60, 5), "prompt (60 tokens) + max_tokens (5) = 65 exceeds max_model_len 64"),
        (EngineRequest("e", [1], 0), "max_tokens must be at least 1"),
    ],
)
def test_invalid_requests_raise_engine_error_with_a_clear_message(request_, message):
    core = make_core()
    with pytest.raises(EngineError) as err:
        core.add_request(request_, 0.0)
    assert message in str(err.value)
    assert not core.has_work()


def test_duplicate_live_request_id_is_rejected():
    core = make_core()
    core.add_request(req("a", [1, 2]), 0.0)
    with pytest.raises(EngineError, match="already in use"):
        core.add_request(req("a", [3, 4]), 0.0)


def test_step_rejects_a_clock_going_backwards():
    core = make_core()
    core.step(1.0)
    with pytest.raises(ValueError, match="earlier"):
        core.step(0.5)


def test_config_must_hold_one_full_length_sequence():
    with pytest.raises(ValidationError, match="must hold one max_model_len"):
        SimConfig(block_size=16, num_blocks=4, max_model_len=128)
