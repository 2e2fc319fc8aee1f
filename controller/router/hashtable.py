"""Shared primitives of the router's open-addressing tables (the prefix index's pair
table and its per-block holder table): bucket layout, key mixing, markers.

Entries are grouped in buckets of 8 uint64 keys (one 64-byte cache line). A key lives in
the first bucket of its probe sequence ``b, b+1, b+3, b+6, ...`` (triangular steps, which
visit every bucket of a power-of-two table) that had room when it was inserted; a lookup
stops at the first bucket that holds the key or an EMPTY entry.
"""

from __future__ import annotations

import numpy as np

EMPTY = 0
"""Key of a never-used entry: a lookup that meets one in a bucket stops there."""
TOMBSTONE = 1
"""Key of a deleted entry: lookups go past it, inserts reuse it."""
BUCKET = 8
"""Entries per bucket: 8 uint64 keys are one 64-byte cache line (``row_any`` relies on 8)."""
LOG_BUCKET = 3
MAX_LOAD = 0.7
"""Occupied (live + tombstone) fraction of a table that triggers a rehash."""
TARGET_LOAD = 0.5
"""Live fraction a rehash sizes a table for, so the next rehash is >= 0.2 * capacity away."""
FIRST_KEY = TOMBSTONE + 1

_U64 = np.uint64
_MASK = (1 << 64) - 1
MIX_K = _K = 0x9E3779B97F4A7C15           # odd: multiplying by it is a bijection mod 2**64
_K_INV = pow(_K, -1, 1 << 64)
_UK, _UK_INV, _S32 = _U64(_K), _U64(_K_INV), _U64(32)


def row_any(flags: np.ndarray) -> np.ndarray:
    """``flags.any(axis=1)`` for a C-contiguous (n, 8) bool array, read as n uint64s
    (NumPy's reduction along a short inner axis is ~20x slower)."""
    return flags.view(np.uint64).reshape(-1) != 0


def mix(hashes: np.ndarray, salt: np.ndarray | np.uint64) -> np.ndarray:
    """Table keys of (block hash, salt) pairs, never 0 or 1: ``x = (hash ^ salt) * K``
    (odd K), then ``x ^ (x >> 32)`` so the low bits that pick a bucket depend on every
    bit. A bijection for a fixed salt, and cheap (block hashes are fmix64 outputs
    already, so the table needs no stronger mixing; the salt scatters one block's copies
    on different nodes over the table)."""
    x = hashes ^ salt
    x *= _UK
    x ^= x >> _S32
    # Keys 0 and 1 are markers: the (2**-63 likely) keys below 2 become key 2.
    return np.maximum(x, _U64(FIRST_KEY), out=x)


def unmix(keys: np.ndarray, salt: np.ndarray | np.uint64) -> np.ndarray:
    """The block hashes whose :func:`mix` with ``salt`` gave ``keys`` (exact, except for
    the 2**-63 keys :func:`mix` clamped to 2)."""
    x = keys.astype(_U64)
    x ^= x >> _S32          # x ^ (x >> 32) is its own inverse on 64 bits
    x *= _UK_INV
    return x ^ salt


def mix_int(block_hash: int, salt: int) -> int:
    """:func:`mix` of one hash, on Python ints (the scalar paths)."""
    x = ((block_hash ^ salt) * _K) & _MASK
    x ^= x >> 32
    return x if x > TOMBSTONE else FIRST_KEY


def distinct(keys: np.ndarray) -> np.ndarray:
    """The distinct values of ``keys``, sorted (cheaper than ``np.unique`` on small arrays)."""
    k = np.sort(keys)
    if k.size > 1:
        k = k[np.concatenate(([True], k[1:] != k[:-1]))]
    return k


def first_of_each(values: np.ndarray) -> np.ndarray:
    """Indices of the first occurrence of each distinct value in ``values``."""
    order = np.argsort(values, kind="stable")
    v = values[order]
    return order[np.concatenate(([True], v[1:] != v[:-1]))]
