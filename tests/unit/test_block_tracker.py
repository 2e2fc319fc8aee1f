"""BlockTracker: engine KV events in, canonical block hashes out."""

from __future__ import annotations

import pytest

from kvfleet.hashing import block_hashes
from kvfleet.node_agent.block_tracker import BlockTracker, Delta
from kvfleet.node_agent.engine import EngineRequest
from kvfleet.node_agent.engines.sim_core import SimConfig, SimEngineCore
from kvfleet.node_agent.kv_events import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    KVEventBatch,
    decode_batch,
    encode_batch,
)

BS = 4


def canon(tokens, parent=None) -> list[int]:
    return block_hashes(tokens, BS, parent=parent).tolist()


def stored(hashes, parent, tokens, **kw) -> BlockStored:
    return BlockStored(block_hashes=list(hashes), parent_block_hash=parent, token_ids=list(tokens),
                       block_size=BS, medium="GPU", **kw)


def batch(*events) -> KVEventBatch:
    return KVEventBatch(ts=0.0, events=list(events))


class Feed:
    """Applies batches with consecutive sequence numbers, like a healthy event stream."""

    def __init__(self, tracker: BlockTracker) -> None:
        self.tracker, self.seq = tracker, 0

    def __call__(self, *events) -> Delta:
        d = self.tracker.apply(self.seq, batch(*events))
        self.seq += 1
        return d


# ---------------------------------------------------------------- with the sim engine


def drive(core: SimEngineCore, tracker: BlockTracker, t: float, seq: int) -> tuple[float, int, list[Delta], dict]:
    """Runs ``core`` until idle, passing each step's events through the msgpack wire format."""
    deltas, tokens = [], {}
    while core.has_work():
        res = core.step(t)
        t += res.duration_s
        for rid, out in res.outputs:
            tokens.setdefault(rid, []).extend(out.new_token_ids)
        if res.events:
            deltas.append(tracker.apply(seq, decode_batch(encode_batch(KVEventBatch(ts=t, events=res.events)))))
            seq += 1
    return t, seq, deltas, tokens


def test_sim_engine_events_give_the_canonical_hashes_of_the_stored_prefix():
    core = SimEngineCore(SimConfig(block_size=BS, num_blocks=64, max_model_len=64))
    tracker = BlockTracker("m", BS)
    prompt = list(b"the quick brown fox jumps")       # 25 tokens: 6 full blocks
    core.add_request(EngineRequest("a", prompt, max_tokens=9, seed=1), 0.0)
    _, _, deltas, out = drive(core, tracker, 0.0, 0)

    tokens = prompt + out["a"]                        # 34 tokens, 33 computed: 8 full blocks
    expected = canon(tokens[:32])
    assert [h for d in deltas for h in d.stored] == expected
    assert tracker.snapshot() == expected
    assert deltas[0].stored == canon(prompt)          # the prefill's blocks come first, in order
    assert not any(d.gap or d.cleared or d.removed for d in deltas)
    assert tracker.summary() == [(expected[-1], 8)]


def test_evictions_in_the_sim_engine_map_back_to_canonical_hashes():
    core = SimEngineCore(SimConfig(block_size=BS, num_blocks=8, max_model_len=32))
    tracker = BlockTracker("m", BS)
    a, b = list(range(13)), list(range(100, 124))
    core.add_request(EngineRequest("a", a, max_tokens=1), 0.0)
    t, seq, _, _ = drive(core, tracker, 0.0, 0)
    core.add_request(EngineRequest("b", b, max_tokens=1), t)
    t, seq, deltas, _ = drive(core, tracker, t, seq)

    ca = canon(a)
    assert deltas == [Delta(stored=canon(b), removed=[ca[2]])]  # leaf of "a" evicted first
    assert set(tracker.snapshot()) == set(ca[:2]) | set(canon(b))
    assert sorted(tracker.summary()) == sorted([(ca[1], 2), (canon(b)[-1], 6)])


# ---------------------------------------------------------------- translation


def test_block_stored_with_known_parent_continues_the_canonical_chain():
    tracker = BlockTracker("m", BS)
    feed = Feed(tracker)
    tokens = list(range(16))
    assert feed(stored([11, 12], None, tokens[:8])).stored == canon(tokens)[:2]
    d = feed(stored([13, 14], 12, tokens[8:]))
    assert d.stored == canon(tokens)[2:]
    assert tracker.canonical(14) == canon(tokens)[3]
    assert tracker.summary() == [(canon(tokens)[3], 4)]


def test_block_removed_reports_the_canonical_hash_it_had():
    tracker = BlockTracker("m", BS)
    feed = Feed(tracker)
    tokens = list(range(12))
    c = canon(tokens)
    feed(stored([1, 2, 3], None, tokens))
    assert feed(BlockRemoved(block_hashes=[3, 2])) == Delta(removed=[c[2], c[1]])
    assert tracker.snapshot() == [c[0]]
    assert len(tracker) == 1


def test_removal_of_an_unknown_engine_hash_is_ignored():
    tracker = BlockTracker("m", BS)
    feed = Feed(tracker)
    assert feed(BlockRemoved(block_hashes=[404])) == Delta()


def test_duplicate_stores_of_one_block_need_as_many_removals():
    # vLLM can hold the same content in two physical blocks and publishes both.
    tracker = BlockTracker("m", BS)
    feed = Feed(tracker)
    tokens = list(range(4))
    assert feed(stored([7], None, tokens)).stored == canon(tokens)
    assert feed(stored([7], None, tokens)) == Delta()
    assert feed(BlockRemoved(block_hashes=[7])) == Delta()
    assert feed(BlockRemoved(block_hashes=[7])) == Delta(removed=canon(tokens))
    assert len(tracker) == 0


def test_store_and_remove_within_one_batch_net_out():
    tracker = BlockTracker("m", BS)
    feed = Feed(tracker)
    tokens = list(range(8))
    c = canon(tokens)
    d = feed(stored([1, 2], None, tokens), BlockRemoved(block_hashes=[2]))
    assert d == Delta(stored=[c[0]])
    d = feed(BlockRemoved(block_hashes=[1]), stored([1], None, tokens[:4]))
    assert d == Delta()
    assert tracker.snapshot() == [c[0]]


def test_lora_blocks_are_not_tracked():
    tracker = BlockTracker("m", BS)
    feed = Feed(tracker)
    assert feed(stored([5], None, range(4), lora_id=3)) == Delta()
    assert len(tracker) == 0


@pytest.mark.parametrize(
    "event, message",
    [
        (BlockStored(block_hashes=[1], parent_block_hash=None, token_ids=[1, 2, 3], block_size=BS), "3 tokens for 1 blocks"),
        (BlockStored(block_hashes=[1], parent_block_hash=None, token_ids=list(range(16)), block_size=16), "block_size 16"),
    ],
)
def test_malformed_block_stored_raises(event, message):
    with pytest.raises(ValueError, match=message):
        BlockTracker("m", BS).apply(0, batch(event))


# ---------------------------------------------------------------- gaps and clears


def test_sequence_gap_clears_state_and_reports_gap_then_applies_the_batch():
    tracker = BlockTracker("m", BS)
    tokens = list(range(8))
    tracker.apply(0, batch(stored([1], None, tokens[:4])))
    d = tracker.apply(2, batch(stored([9], None, [50, 51, 52, 53]), stored([2], 1, tokens[4:])))
    # Block 1 was forgotten with everything else, so its child can't be named: dropped.
    assert d == Delta(stored=canon([50, 51, 52, 53]), cleared=True, gap=True)
    assert tracker.snapshot() == canon([50, 51, 52, 53])
    assert tracker.last_seq == 2
    assert tracker.apply(3, batch()) == Delta()


def test_first_batch_must_carry_the_first_sequence_number():
    assert BlockTracker("m", BS).apply(0, batch()) == Delta()
    assert BlockTracker("m", BS).apply(5, batch()) == Delta(cleared=True, gap=True)
    assert BlockTracker("m", BS, first_seq=5).apply(5, batch()) == Delta()


def test_engine_restart_resetting_seq_is_a_gap():
    tracker = BlockTracker("m", BS)
    feed = Feed(tracker)
    feed(stored([1], None, range(4)))
    feed()
    assert tracker.apply(0, batch()) == Delta(cleared=True, gap=True)
    assert len(tracker) == 0


def test_unknown_parent_is_a_gap_that_keeps_the_rest_of_the_state():
    tracker = BlockTracker("m", BS)
    feed = Feed(tracker)
    feed(stored([1], None, range(4)))
    d = feed(stored([3, 4], 2, range(8)), stored([5], 1, range(4, 8)))
    assert d == Delta(stored=canon(range(8))[1:], gap=True)
    assert sorted(tracker.snapshot()) == sorted(canon(range(8)))
    assert 3 not in tracker and 4 not in tracker


def test_all_blocks_cleared_empties_the_tracker_and_later_events_in_the_batch_apply():
    tracker = BlockTracker("m", BS)
    feed = Feed(tracker)
    feed(stored([1, 2], None, range(8)))
    d = feed(stored([3], 2, range(8, 12)), AllBlocksCleared(), stored([7], None, [9, 9, 9, 9]))
    assert d == Delta(stored=canon([9, 9, 9, 9]), cleared=True)
    assert tracker.snapshot() == canon([9, 9, 9, 9])
    assert tracker.summary() == [(canon([9, 9, 9, 9])[0], 1)]


def test_sim_engine_reset_reaches_the_tracker_as_cleared():
    core = SimEngineCore(SimConfig(block_size=BS, num_blocks=64, max_model_len=64))
    tracker = BlockTracker("m", BS)
    core.add_request(EngineRequest("a", list(range(9)), max_tokens=1), 0.0)
    t, seq, _, _ = drive(core, tracker, 0.0, 0)
    assert len(tracker) == 2
    assert core.reset_prefix_cache()
    assert tracker.apply(seq, batch(*core.drain_events())) == Delta(cleared=True)
    assert len(tracker) == 0


# ---------------------------------------------------------------- summary


def test_summary_lists_the_deepest_chain_heads_first_and_is_bounded():
    tracker = BlockTracker("m", BS)
    feed = Feed(tracker)
    shared = list(range(8))
    x = shared + list(range(100, 112))                # 5 blocks
    y = shared + list(range(200, 204))                # 3 blocks
    cx, cy = canon(x), canon(y)
    feed(stored([1, 2], None, shared))
    feed(stored([13, 14, 15], 2, x[8:]))
    feed(stored([23], 2, y[8:]))
    feed(stored([31], None, [7, 7, 7, 7]))
    assert tracker.summary() == [(cx[4], 5), (cy[2], 3), (canon([7, 7, 7, 7])[0], 1)]
    assert tracker.summary(max_heads=1) == [(cx[4], 5)]

    feed(BlockRemoved(block_hashes=[15]))             # the leaf of x goes: its parent is a head now
    assert tracker.summary(max_heads=2) == [(cx[3], 4), (cy[2], 3)]
    feed(BlockRemoved(block_hashes=[23, 14, 13]))     # only the shared prefix and [7]*4 remain
    assert tracker.summary() == [(cx[1], 2), (canon([7, 7, 7, 7])[0], 1)]


def test_parent_evicted_before_its_child_and_cached_again_is_not_a_head():
    tracker = BlockTracker("m", BS)
    feed = Feed(tracker)
    c = canon(range(8))
    feed(stored([1, 2], None, range(8)))
    feed(BlockRemoved(block_hashes=[1]))              # parent first: possible across requests
    assert tracker.summary() == [(c[1], 2)]
    feed(stored([1], None, range(4)))
    assert tracker.summary() == [(c[1], 2)]
    feed(BlockRemoved(block_hashes=[2]))
    assert tracker.summary() == [(c[0], 1)]
