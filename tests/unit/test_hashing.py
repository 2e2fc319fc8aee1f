"""Canonical block hashes: exact, chained, continuable, and the same as the reference loop."""

from __future__ import annotations

import random

import numpy as np
import pytest

from kvfleet.hashing import block_hashes, block_hashes_reference, fmix_int, unfmix_int


@pytest.mark.parametrize("block_size", [1, 16, 128])
def test_vectorised_hashes_equal_the_reference_loop(block_size):
    rng = random.Random(block_size)
    tokens = [rng.randrange(0, 200_000) for _ in range(block_size * 37 + 5)]
    assert [int(h) for h in block_hashes(tokens, block_size)] == block_hashes_reference(tokens, block_size)


def test_only_full_blocks_are_hashed():
    assert len(block_hashes(list(range(47)), 16)) == 2
    assert len(block_hashes(list(range(15)), 16)) == 0


def test_a_chain_continues_from_any_parent_hash():
    tokens = list(range(1000, 1000 + 16 * 20))
    whole = block_hashes(tokens, 16)
    for cut in (1, 7, 19):
        tail = block_hashes(tokens[cut * 16 :], 16, parent=int(whole[cut - 1]))
        assert list(tail) == list(whole[cut:])


def test_a_block_hash_depends_on_every_earlier_token():
    tokens = list(range(64))
    changed = list(tokens)
    changed[0] = 999
    a, b = block_hashes(tokens, 16), block_hashes(changed, 16)
    assert all(x != y for x, y in zip(a, b))


def test_token_order_inside_a_block_matters():
    assert block_hashes([1, 2] + [0] * 14, 16)[0] != block_hashes([2, 1] + [0] * 14, 16)[0]


def test_hashes_are_never_zero_and_distinct_on_random_prompts():
    rng = np.random.default_rng(0)
    hashes = block_hashes(rng.integers(0, 50_000, 16 * 20_000), 16)
    assert (hashes != 0).all()
    assert len(set(hashes.tolist())) == len(hashes)


def test_fmix_is_a_bijection_on_samples():
    for x in [0, 1, 2**63, 2**64 - 1, 123456789]:
        assert unfmix_int(fmix_int(x)) == x


def test_invalid_block_size_is_rejected():
    with pytest.raises(ValueError, match="block_size"):
        block_hashes([1, 2, 3], 0)


@pytest.mark.parametrize("block_size", [1, 7, 16, 128])
def test_the_routers_compiled_hash_is_the_same_function(block_size):
    """The router hashes prompts with a compiled loop (controller/router/chain.py); node
    agents hash event tokens with the NumPy form. Both must give the same bits, from the
    root and from any parent, on token ids up to 2**32 - 1."""
    from kvfleet.controller.router.chain import block_hashes as compiled

    rng = np.random.default_rng(block_size)
    for n in (0, block_size - 1, block_size * 41 + 3):
        tokens = rng.integers(0, 2**32, max(n, 0), dtype=np.uint64).astype(np.uint32)
        assert compiled(tokens, block_size).tolist() == block_hashes(tokens, block_size).tolist()
        parent = int(block_hashes(rng.integers(0, 50_000, block_size), block_size)[0])
        assert compiled(tokens, block_size, parent).tolist() == block_hashes(tokens, block_size, parent).tolist()
    tokens = rng.integers(0, 200_000, block_size * 5).astype(np.uint32)
    assert compiled(tokens, block_size).tolist() == block_hashes_reference(tokens.tolist(), block_size)
    with pytest.raises(ValueError, match="block_size"):
        compiled(tokens, 0)
