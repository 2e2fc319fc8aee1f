"""PrefixIndex: exact store/remove/clear/match semantics, growth, and a randomised check
against a dict-of-sets reference. No network, no clock."""

from __future__ import annotations

import numpy as np
import pytest

from kvfleet.controller.router import index as index_mod
from kvfleet.controller.router.index import SCALAR_MAX, FleetIndex, PrefixIndex
from kvfleet.hashing import block_hashes

BS = 16


def chain(seed: int, n: int, parent: int | None = None) -> np.ndarray:
    """Canonical hashes of ``n`` blocks of deterministic pseudo-random tokens."""
    tokens = np.random.default_rng(seed).integers(0, 50_000, n * BS)
    return block_hashes(tokens, BS, parent=parent)


def u64(values) -> np.ndarray:
    return np.asarray(values, dtype=np.uint64)


# -- nodes ----------------------------------------------------------------------------------
def test_add_node_is_idempotent_and_slots_are_dense():
    idx = PrefixIndex()
    assert idx.add_node("a") == 0
    assert idx.add_node("b") == 1
    assert idx.add_node("a") == 0
    assert idx.slot_of("a") == 0 and idx.slot_of("b") == 1 and idx.slot_of("zz") is None
    assert sorted(idx.node_ids()) == ["a", "b"]


def test_remove_node_drops_blocks_and_frees_lowest_slot_for_reuse():
    idx = PrefixIndex()
    for name in "abc":
        idx.add_node(name)
    h = chain(1, 10)
    idx.store(0, h)
    idx.store(1, h[:4])
    idx.remove_node("a")
    assert idx.slot_of("a") is None
    assert len(idx) == 4
    assert idx.add_node("d") == 0          # a's slot, reused
    assert idx.blocks_of(0) == 0           # and it comes back empty
    assert not idx.contains(0, int(h[0]))
    assert idx.match(h, u64([0, 1]) .astype(np.int64)).tolist() == [0, 4]


def test_unknown_slot_is_rejected():
    idx = PrefixIndex()
    idx.add_node("a")
    with pytest.raises(KeyError):
        idx.store(1, chain(1, 1))
    idx.remove_node("a")
    with pytest.raises(KeyError):
        idx.blocks_of(0)


# -- store / remove / clear -----------------------------------------------------------------
@pytest.mark.parametrize("n", [1, SCALAR_MAX, SCALAR_MAX + 1, 300])
def test_store_then_contains_exactly_the_stored_blocks(n):
    idx = PrefixIndex()
    a, b = idx.add_node("a"), idx.add_node("b")
    h = chain(7, n)
    idx.store(a, h)
    assert len(idx) == n and idx.blocks_of(a) == n and idx.blocks_of(b) == 0
    assert all(idx.contains(a, int(x)) for x in h)
    assert not any(idx.contains(b, int(x)) for x in h)
    assert not idx.contains(a, int(chain(8, 1)[0]))


@pytest.mark.parametrize("n", [3, 200])
def test_duplicate_stores_are_idempotent(n):
    idx = PrefixIndex()
    a = idx.add_node("a")
    h = chain(3, n)
    idx.store(a, h)
    idx.store(a, h)
    idx.store(a, np.concatenate([h, h[::-1]]))   # duplicates inside one batch too
    assert len(idx) == n and idx.blocks_of(a) == n


def test_same_block_on_many_nodes_is_one_pair_per_node():
    idx = PrefixIndex()
    h = chain(5, 4)
    for i in range(50):
        idx.store(idx.add_node(f"n{i}"), h)
    assert len(idx) == 200
    assert idx.match(h, np.arange(50)).tolist() == [4] * 50


@pytest.mark.parametrize("n", [5, 100])
def test_remove_ignores_absent_blocks_and_other_nodes_copies(n):
    idx = PrefixIndex()
    a, b = idx.add_node("a"), idx.add_node("b")
    h = chain(11, n)
    idx.store(a, h)
    idx.store(b, h)
    idx.remove(a, np.concatenate([h[n // 2 :], chain(12, 3)]))   # plus 3 never stored
    assert idx.blocks_of(a) == n // 2 and idx.blocks_of(b) == n
    assert len(idx) == n // 2 + n
    assert [idx.contains(a, int(x)) for x in h] == [True] * (n // 2) + [False] * (n - n // 2)
    assert all(idx.contains(b, int(x)) for x in h)


def test_clear_drops_only_that_nodes_blocks():
    idx = PrefixIndex()
    a, b = idx.add_node("a"), idx.add_node("b")
    h = chain(2, 40)
    idx.store(a, h)
    idx.store(b, h[:10])
    idx.clear(a)
    assert idx.blocks_of(a) == 0 and idx.blocks_of(b) == 10 and len(idx) == 10
    assert idx.match(h, np.array([a, b])).tolist() == [0, 10]
    idx.store(a, h[:3])                     # a cleared slot takes new blocks
    assert idx.match(h, np.array([a, b])).tolist() == [3, 10]


def test_store_after_remove_reuses_tombstones_without_growing():
    idx = PrefixIndex(capacity=1024)
    a = idx.add_node("a")
    for i in range(40):                     # 40 x 200 stores through a 1024-entry table
        h = chain(100 + i, 200)
        idx.store(a, h)
        idx.remove(a, h)
    assert len(idx) == 0 and idx.capacity == 1024


# -- growth ---------------------------------------------------------------------------------
def test_growth_and_rehash_keep_every_pair():
    idx = PrefixIndex(capacity=64)
    slots = [idx.add_node(f"n{i}") for i in range(8)]
    chains = {s: chain(1000 + s, 400 + 37 * s) for s in slots}
    for s in slots:
        for i in range(0, len(chains[s]), 50):  # many small stores: several rehashes
            idx.store(s, chains[s][i : i + 50])
    assert idx.capacity > 64
    assert len(idx) == sum(len(c) for c in chains.values())
    assert idx.match(chains[3], np.array(slots)).tolist() == [0, 0, 0, len(chains[3]), 0, 0, 0, 0]
    for s in slots:
        assert idx.blocks_of(s) == len(chains[s])
        assert all(idx.contains(s, int(x)) for x in chains[s])


def test_rehash_after_mass_removal_shrinks_the_table_and_keeps_the_rest():
    idx = PrefixIndex(capacity=64)
    a = idx.add_node("a")
    h = chain(1, 5000)
    idx.store(a, h)
    idx.remove(a, h[10:])
    idx._rehash(len(idx))
    assert idx.capacity == 64 and len(idx) == 10
    assert idx.match(h, np.array([a])).tolist() == [10]


def test_reserve_sizes_the_table_so_growing_to_it_needs_no_rehash():
    idx = PrefixIndex(capacity=64)
    a = idx.add_node("a")
    idx.store(a, chain(1, 100))
    idx.reserve(10_000)
    cap = idx.capacity
    assert cap >= 10_000 / index_mod.TARGET_LOAD and len(idx) == 100
    for i in range(99):
        idx.store(a, chain(2 + i, 100))
    assert idx.capacity == cap and len(idx) == 10_000
    idx.reserve(5_000)                       # never shrinks below what it holds
    assert idx.capacity == cap


def test_rehash_places_overflowing_buckets_correctly():
    # A tiny table forces many buckets past 8 entries during the sorted placement.
    idx = PrefixIndex(capacity=64)
    a = idx.add_node("a")
    h = chain(77, 3000)
    idx.store(a, h)
    idx._rehash(len(idx))
    assert len(idx) == 3000 and all(idx.contains(a, int(x)) for x in h)


# -- match ----------------------------------------------------------------------------------
def test_match_counts_leading_blocks_per_slot():
    idx = PrefixIndex()
    slots = [idx.add_node(n) for n in ("a", "b", "c", "d", "e")]
    system = chain(1, 8)
    user = chain(2, 12, parent=int(system[-1]))
    prompt = np.concatenate([system, user])       # 20 blocks
    idx.store(slots[0], prompt)                   # all 20
    idx.store(slots[1], system)                   # 8
    idx.store(slots[2], prompt[:1])               # 1
    idx.store(slots[3], chain(3, 30))             # unrelated
    # slots[4] holds nothing
    assert idx.match(prompt, np.array(slots)).tolist() == [20, 8, 1, 0, 0]
    assert idx.match(prompt[:5], np.array(slots)).tolist() == [5, 5, 1, 0, 0]
    assert idx.match(prompt, np.array([slots[1], slots[0], slots[1]])).tolist() == [8, 20, 8]


@pytest.mark.parametrize("depth", list(range(0, 18)))
def test_match_finds_every_depth_exactly(depth):
    idx = PrefixIndex()
    a = idx.add_node("a")
    prompt = chain(9, 17)
    idx.store(a, prompt[:depth])
    assert idx.match(prompt, np.array([a])).tolist() == [depth]


@pytest.mark.parametrize("batch", [1, 3, 40, 1024])
def test_match_is_exact_whether_the_search_is_binary_or_wide(monkeypatch, batch):
    # MATCH_BATCH sets how many depths each slot probes per round (1 slot -> wide split,
    # many slots -> binary); the answer must not depend on it.
    monkeypatch.setattr(index_mod, "MATCH_BATCH", batch)
    idx = PrefixIndex()
    prompt = chain(31, 97)
    depths = [0, 1, 2, 3, 47, 48, 49, 95, 96, 97, 60, 1]
    slots = np.array([idx.add_node(f"n{i}") for i in range(len(depths))])
    for s, d in zip(slots, depths):
        idx.store(s, np.concatenate([prompt[:d], chain(100 + int(s), 5)]))
    assert idx.match(prompt, slots).tolist() == depths
    assert idx.match(prompt[:50], slots).tolist() == [min(d, 50) for d in depths]


def test_match_with_a_hole_returns_a_boundary_within_documented_bounds():
    idx = PrefixIndex()
    a = idx.add_node("a")
    prompt = chain(4, 16)
    held = [0, 1, 2, 3, 5, 6, 7, 8, 9]            # hole at 4; true leading run is 4
    idx.store(a, prompt[held])
    (m,) = idx.match(prompt, np.array([a])).tolist()
    assert 4 <= m <= 10
    assert idx.contains(a, int(prompt[m - 1])) and not idx.contains(a, int(prompt[m]))


def test_match_empty_inputs_and_empty_index():
    idx = PrefixIndex()
    a = idx.add_node("a")
    assert idx.match(chain(1, 4), np.array([a])).tolist() == [0]
    assert idx.match(np.empty(0, np.uint64), np.array([a])).tolist() == [0]
    assert idx.match(chain(1, 4), np.empty(0, np.int64)).tolist() == []
    idx.store(a, chain(1, 4))
    with pytest.raises(IndexError):
        idx.match(chain(1, 4), np.array([5]))


# -- memory ---------------------------------------------------------------------------------
def test_memory_is_ten_bytes_per_pair_entry_plus_twelve_per_block_entry():
    idx = PrefixIndex()
    a, b = idx.add_node("a"), idx.add_node("b")
    shared = chain(1, 10_000)
    idx.store(a, shared)
    idx.store(b, np.concatenate([shared, chain(2, 10_000)]))   # 30,000 pairs, 20,000 blocks
    holders = idx._holders
    assert idx.memory_bytes() >= 10 * idx.capacity + 12 * holders.capacity
    assert len(holders) == 20_000
    # Both tables are kept at least TARGET_LOAD / 2 full (bitmaps and per-slot arrays: small).
    per_pair = idx.memory_bytes() / len(idx)
    assert per_pair <= (10 + 12 * 20_000 / 30_000) / (index_mod.TARGET_LOAD / 2) + 1


# -- randomised, against a reference --------------------------------------------------------
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_ops_agree_with_dict_of_sets_reference(seed):
    rng = np.random.default_rng(seed)
    idx = PrefixIndex(capacity=64)
    ref: dict[str, set[int]] = {}
    # A small universe so that stores, removes and duplicates collide often.
    universe = rng.integers(1, 2**64, 3000, dtype=np.uint64)
    for step in range(600):
        op = rng.choice(["add", "store", "store", "store", "remove", "remove", "clear", "drop"],
                        p=[.05, .2, .2, .2, .15, .1, .05, .05])
        if op == "add" or not ref:
            name = f"n{rng.integers(0, 12)}"
            idx.add_node(name)
            ref.setdefault(name, set())
            continue
        name = sorted(ref)[rng.integers(0, len(ref))]
        slot = idx.slot_of(name)
        size = int(rng.choice([1, 2, 5, SCALAR_MAX, SCALAR_MAX + 1, 100, 700]))
        batch = universe[rng.integers(0, len(universe), size)]
        if op == "store":
            idx.store(slot, batch)
            ref[name] |= {int(x) for x in batch}
        elif op == "remove":
            idx.remove(slot, batch)
            ref[name] -= {int(x) for x in batch}
        elif op == "clear":
            idx.clear(slot)
            ref[name] = set()
        else:
            idx.remove_node(name)
            del ref[name]
        if step % 50 == 0 or step == 599:
            assert len(idx) == sum(len(v) for v in ref.values())
            for n, held in ref.items():
                s = idx.slot_of(n)
                assert idx.blocks_of(s) == len(held)
                present = [idx.contains(s, int(x)) for x in universe]
                assert {int(x) for x, p in zip(universe, present) if p} == held
    assert idx._used <= index_mod.MAX_LOAD * idx.capacity


def test_scalar_and_vectorised_paths_build_equivalent_tables(monkeypatch):
    h = chain(21, 500)
    tables = []
    for scalar_max in (0, 10_000):
        monkeypatch.setattr(index_mod, "SCALAR_MAX", scalar_max)
        idx = PrefixIndex(capacity=64)
        a, b = idx.add_node("a"), idx.add_node("b")
        for i in range(0, 500, 7):
            idx.store(a, h[i : i + 7])
        idx.store(b, h[:250])
        idx.remove(a, h[100:300])
        tables.append(idx)
    for idx in tables:
        assert len(idx) == 300 + 250
        assert idx.match(h, np.array([0, 1])).tolist() == [100, 250]
    assert [tables[0].contains(0, int(x)) for x in h] == [tables[1].contains(0, int(x)) for x in h]


@pytest.mark.parametrize("n", [3, 200])
def test_equal_keys_of_different_slots_never_alias(monkeypatch, n):
    # With one salt for every slot, the same block on two nodes has the same key: the
    # table must still tell the owners apart by slot (the 2**-64 case, made certain).
    monkeypatch.setattr(index_mod, "_slot_salt", lambda seed, slot: 12345)
    idx = PrefixIndex(capacity=64)
    a, b, c = idx.add_node("a"), idx.add_node("b"), idx.add_node("c")
    h = chain(5, n)
    idx.store(a, h)
    idx.store(b, h[: n // 2])
    idx.store(b, h[: n // 2])                      # duplicate: found despite a's equal key
    assert len(idx) == n + n // 2
    assert idx.match(h, np.array([a, b, c])).tolist() == [n, n // 2, 0]
    idx.remove(b, h)
    assert idx.match(h, np.array([a, b, c])).tolist() == [n, 0, 0]
    assert idx.blocks_of(a) == n and all(idx.contains(a, int(x)) for x in h)
    idx.store(c, h[:1])
    idx.remove(a, h[:1])
    assert idx.contains(c, int(h[0])) and not idx.contains(a, int(h[0]))


# -- FleetIndex -----------------------------------------------------------------------------
def test_fleet_index_keeps_one_index_per_model_and_block_size():
    fleet = FleetIndex()
    assert fleet.get("m", 16) is None
    i16 = fleet.get_or_create("m", 16)
    assert fleet.get_or_create("m", 16) is i16
    i32 = fleet.get_or_create("m", 32)
    other = fleet.get_or_create("n", 16)
    assert len({id(i16), id(i32), id(other)}) == 3 and len(fleet) == 3
    assert dict(fleet.items())[("m", 32)] is i32


def test_fleet_index_remove_node_drops_it_everywhere():
    fleet = FleetIndex()
    h = chain(1, 5)
    for key in (("m", 16), ("n", 16)):
        idx = fleet.get_or_create(*key)
        idx.store(idx.add_node("x"), h)
        idx.store(idx.add_node("y"), h)
    fleet.remove_node("x")
    for _, idx in fleet.items():
        assert idx.slot_of("x") is None and len(idx) == 5
    fleet.remove_node("never-seen")


# -- match against a per-node reference (holder counts, bitmaps, XOR, probes) ----------------
def leading_run(held: set[int], prompt: np.ndarray) -> int:
    """The reference: how many leading blocks of ``prompt`` a node holds."""
    m = 0
    for h in prompt.tolist():
        if h not in held:
            break
        m += 1
    return m


def random_prefix_closed_fleet(seed: int, bs: int, nodes: int = 40):
    """An index and a dict-of-sets reference of a fleet whose nodes hold prefix-closed
    sets: shared system prompts of several popularities, per-node conversations chained
    on them, then leaf-first evictions, cleared and removed nodes; small and big events."""
    rng = np.random.default_rng(seed)
    tok = lambda n: rng.integers(0, 50_000, n * bs)          # noqa: E731
    system = [block_hashes(tok(int(rng.integers(1, 20))), bs) for _ in range(6)]
    idx = PrefixIndex(capacity=64)
    ref: dict[str, set[int]] = {}
    chains: dict[str, list[np.ndarray]] = {}
    for i in range(nodes):
        name = f"n{i:02d}"
        slot = idx.add_node(name)
        ref[name], chains[name] = set(), []
        # Popularity: system prompt k on about nodes / 2**k nodes.
        for k, sp in enumerate(system):
            if rng.random() < 0.5 ** k:
                depth = int(rng.integers(1, len(sp) + 1))
                chain = sp[:depth]
                if depth == len(sp) and rng.random() < 0.7:
                    chain = np.concatenate([sp, block_hashes(tok(int(rng.integers(1, 30))), bs, parent=int(sp[-1]))])
                chains[name].append(chain)
        for chain in chains[name]:
            if rng.random() < 0.5:
                idx.store(slot, chain)                       # one event
            else:
                for j in range(0, len(chain), 3):            # small events
                    idx.store(slot, chain[j : j + 3])
            ref[name] |= set(chain.tolist())
    names = sorted(ref)
    for name in rng.choice(names, nodes // 4, replace=False).tolist():
        slot = idx.slot_of(name)
        for chain in chains[name]:                           # evict leaves first: stays prefix-closed
            keep = int(rng.integers(0, len(chain) + 1))
            still = set().union(*(set(c.tolist()) for c in chains[name] if c is not chain)) if len(chains[name]) > 1 else set()
            gone = [h for h in chain[keep:].tolist() if h not in still]
            if gone:
                idx.remove(slot, np.array(gone, dtype=np.uint64))
                ref[name] -= set(gone)
    for name in rng.choice(names, 3, replace=False).tolist():
        idx.clear(idx.slot_of(name))
        ref[name] = set()
    for name in rng.choice(names, 2, replace=False).tolist():
        if name in ref:
            idx.remove_node(name)
            del ref[name]
    return idx, ref, system, rng


@pytest.mark.parametrize("bs", [1, 16, 64])
@pytest.mark.parametrize("bitmap_bytes", [1, 8, 1 << 20])   # threshold: width, width/8, 2 holders
@pytest.mark.parametrize("levels", [0, 16])                 # 0: always the fallback depth search
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_match_equals_the_per_node_reference_on_random_prefix_closed_fleets(monkeypatch, seed, levels, bitmap_bytes, bs):
    monkeypatch.setattr(index_mod, "MATCH_LEVELS", levels)
    monkeypatch.setattr(index_mod, "BITMAP_BYTES_PER_PAIR", bitmap_bytes)
    idx, ref, system, rng = random_prefix_closed_fleet(seed, bs)
    names = sorted(ref)
    held_chains = [np.array(sorted(ref[n]), dtype=np.uint64) for n in names]
    for k in range(len(system)):
        for prompt in (system[k], np.concatenate([system[k], block_hashes(rng.integers(0, 50_000, 5 * bs), bs,
                                                                         parent=int(system[k][-1]))])):
            query = rng.choice(names, int(rng.integers(1, len(names) + 1)), replace=True).tolist()
            slots = np.array([idx.slot_of(n) for n in query])
            expected = [leading_run(ref[n], prompt) for n in query]
            assert idx.match(prompt, slots).tolist() == expected
    # Each node's own deepest chain, as the prompt (its conversation, held by it alone).
    for n in rng.choice(names, 5, replace=False).tolist():
        for k in range(len(system)):
            if system[k][0] in ref[n]:
                prompt = np.concatenate([system[k], block_hashes(rng.integers(0, 50_000, 3 * bs), bs)])
                slots = np.array([idx.slot_of(x) for x in names])
                assert idx.match(prompt, slots).tolist() == [leading_run(ref[x], prompt) for x in names]
    assert held_chains   # the fleet is not empty


@pytest.mark.parametrize("bitmap_bytes", [1, 8, 1 << 20])
@pytest.mark.parametrize("seed", [0, 1])
def test_holder_counts_xor_and_bitmaps_equal_a_recount_after_random_ops(monkeypatch, seed, bitmap_bytes):
    monkeypatch.setattr(index_mod, "BITMAP_BYTES_PER_PAIR", bitmap_bytes)
    rng = np.random.default_rng(seed)
    idx = PrefixIndex(capacity=64)
    ref: dict[str, set[int]] = {}
    universe = rng.integers(1, 2**64, 400, dtype=np.uint64)
    for step in range(500):
        op = rng.choice(["add", "store", "store", "remove", "clear", "drop"], p=[.1, .45, .25, .1, .05, .05])
        if op == "add" or not ref:
            name = f"n{rng.integers(0, 30)}"
            idx.add_node(name)
            ref.setdefault(name, set())
            continue
        name = sorted(ref)[rng.integers(0, len(ref))]
        slot = idx.slot_of(name)
        batch = universe[rng.integers(0, len(universe), int(rng.choice([1, 3, SCALAR_MAX + 5, 200])))]
        if op == "store":
            idx.store(slot, batch)
            ref[name] |= set(batch.tolist())
        elif op == "remove":
            idx.remove(slot, batch)
            ref[name] -= set(batch.tolist())
        elif op == "clear":
            idx.clear(slot)
            ref[name] = set()
        else:
            idx.remove_node(name)
            del ref[name]
    idx._flush()
    count, xor = idx._holders.lookup(universe)
    need = idx._popular_min()
    for h, c, x in zip(universe.tolist(), count.tolist(), xor.tolist()):
        holders = {idx.slot_of(n) for n, held in ref.items() if h in held}
        assert c == len(holders)
        acc = 0
        for s in holders:
            acc ^= s
        assert x == acc
        row = idx._bitmap_of.get(h)
        if c >= need:
            assert row is not None
        if row is not None:
            bits = np.unpackbits(idx._bits[row], bitorder="little")
            assert set(np.flatnonzero(bits).tolist()) == holders
    assert len(idx._holders) == len(set().union(*ref.values())) if ref else True


@pytest.mark.parametrize("distinct", [False, True])
def test_the_compiled_holder_update_equals_the_vectorised_one(distinct):
    """BlockHolders.apply takes one compiled loop when the batch fits the table and the
    NumPy passes otherwise; both must return the same blocks, counts after and net
    changes, and leave the same holders (duplicates in a batch, gains and losses of one
    block in one batch, blocks dropping to no holder, tombstones reused)."""
    from kvfleet.controller.router.holders import BlockHolders
    rng = np.random.default_rng(11 + distinct)
    compiled, vectorised = BlockHolders(capacity=4096), BlockHolders(capacity=4096)
    universe = rng.integers(2, 2**64 - 1, 600, dtype=np.uint64)
    held: dict[int, list[int]] = {}     # block -> its holders' slots (a multiset, like the index's pairs)
    deleted = 0
    for _ in range(400):
        n = int(rng.choice([1, 5, 40, 300]))
        picks = rng.choice(len(universe), n, replace=not distinct)
        hashes, slots, signs = universe[picks], np.empty(n, np.int64), np.empty(n, np.int64)
        for k, h in enumerate(hashes.tolist()):
            if held.get(h) and rng.random() < 0.5:
                slots[k], signs[k] = held[h].pop(int(rng.integers(0, len(held[h])))), -1   # a real loss
            else:
                slots[k], signs[k] = int(rng.integers(0, 64)), 1
                held.setdefault(h, []).append(int(slots[k]))
        deleted += sum(1 for h in set(hashes.tolist()) if not held.get(h))
        assert compiled._used + n <= 0.7 * compiled.capacity      # the compiled path is the one taken
        got = compiled.apply(hashes, slots, signs, distinct)
        want = vectorised._apply_vectorised(hashes, slots, signs, distinct)
        for g, w in zip(got, want):
            assert g.tolist() == w.tolist()
        assert len(compiled) == len(vectorised)
    count, xor = compiled.lookup(universe)
    v_count, v_xor = vectorised.lookup(universe)
    assert count.tolist() == v_count.tolist() and xor.tolist() == v_xor.tolist()
    for h, c, x in zip(universe.tolist(), count.tolist(), xor.tolist()):
        assert c == len(held.get(h, []))
        acc = 0
        for s in held.get(h, []):
            acc ^= s
        assert x == acc
    assert deleted > 50 and len(compiled) > 100   # blocks came and went


def test_match_with_holes_never_claims_a_block_the_node_lacks():
    rng = np.random.default_rng(5)
    idx = PrefixIndex()
    prompt = chain(40, 60)
    ref = {}
    for i in range(30):
        held = {int(h) for h in prompt[: int(rng.integers(0, 61))]}
        held -= {int(h) for h in rng.choice(prompt, int(rng.integers(0, 6))).tolist()}   # holes
        ref[idx.add_node(f"n{i}")] = held
        if held:
            idx.store(i, np.array(sorted(held), dtype=np.uint64))
    slots = np.array(sorted(ref))
    for s, m in zip(slots.tolist(), idx.match(prompt, slots).tolist()):
        assert m == 0 or int(prompt[m - 1]) in ref[s]
        deepest = max((i + 1 for i, h in enumerate(prompt.tolist()) if h in ref[s]), default=0)
        assert m <= deepest


def test_a_block_held_by_one_node_is_matched_by_the_xor_of_its_holders():
    idx = PrefixIndex()
    slots = np.array([idx.add_node(f"n{i}") for i in range(5)])
    system = chain(50, 4)
    convo = chain(51, 6, parent=int(system[-1]))
    for s in slots.tolist():
        idx.store(s, system)
    idx.store(int(slots[3]), convo)
    assert idx.match(np.concatenate([system, convo]), slots).tolist() == [4, 4, 4, 10, 4]
    idx.remove(int(slots[3]), convo[3:])                     # evicts its leaves
    assert idx.match(np.concatenate([system, convo]), slots).tolist() == [4, 4, 4, 7, 4]


def test_unmix_inverts_the_table_key_mix():
    from kvfleet.controller.router.hashtable import mix, mix_int, unmix
    h = np.random.default_rng(3).integers(0, 2**64 - 1, 1000, dtype=np.uint64, endpoint=True)
    salt = np.uint64(0x1234_5678_9ABC_DEF0)
    keys = mix(h.copy(), salt)
    assert (unmix(keys, salt) == h).all()
    assert keys.tolist()[:50] == [mix_int(int(x), int(salt)) for x in h[:50]]


def test_holder_lookup_of_a_prompt_is_exact_up_to_its_first_unheld_block_in_a_crowded_table():
    from kvfleet.controller.router.holders import BlockHolders
    rng = np.random.default_rng(0)
    holders = BlockHolders(capacity=1024)
    held = rng.integers(1, 2**64 - 1, 700, dtype=np.uint64)
    holders.apply(held, np.arange(700) % 50, np.ones(700, np.int64))
    assert holders.capacity == 1024                 # load 0.68: some keys overflow their home bucket
    unheld = rng.integers(1, 2**64 - 1, 3, dtype=np.uint64)
    for _ in range(300):
        prompt = np.concatenate([rng.permutation(held)[: int(rng.integers(1, 700))], unheld[: int(rng.integers(0, 4))]])
        count, xor, z = holders.lookup_prefix(prompt)
        full_count, full_xor = holders.lookup(prompt)
        assert z == (int(np.argmax(full_count == 0)) if (full_count == 0).any() else len(prompt))
        assert (count[:z] == full_count[:z]).all() and (xor[:z] == full_xor[:z]).all() and not count[z:].any()


@pytest.mark.parametrize("n", [SCALAR_MAX // 2, SCALAR_MAX * 4])
def test_holds_says_per_block_what_contains_says(n):
    idx = PrefixIndex()
    a, b = idx.add_node("a"), idx.add_node("b")
    h = block_hashes(list(range(16 * n)), 16)
    idx.store(a, h[::2])
    idx.store(b, h[1::3])
    for slot in (a, b):
        got = idx.holds(slot, h)
        assert got.dtype == bool and got.tolist() == [idx.contains(slot, int(x)) for x in h]
    assert idx.holds(a, h[::2]).all() and not idx.holds(a, h[1::2]).any()
    assert idx.holds(a, np.zeros(0, np.uint64)).size == 0
