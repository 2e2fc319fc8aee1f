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


def first_of_each(values: np.ndarray) -> np.ndarray:
    """Indices of the first occurrence of each distinct value in ``values``."""
    order = np.argsort(values, kind="stable")
    v = values[order]
    return order[np.concatenate(([True], v[1:] != v[:-1]))]


def table_capacity(need: int, min_capacity: int) -> int:
    """Entries (a power of two, at least ``min_capacity``) for ``need`` live entries at TARGET_LOAD."""
    cap = min_capacity
    while need > TARGET_LOAD * cap:
        cap *= 2
    return cap


def place_by_home_bucket(keys: np.ndarray, cap: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Where a rehash into ``cap`` entries puts ``keys`` without probing: sorted by home
    bucket, the first BUCKET keys of each bucket go straight in. Returns ``(order, fits,
    pos)``: the order that sorts the keys (apply it to every column), which sorted keys
    fit their home bucket, and the table positions of those. The rest (~2 % at load 0.5)
    is left to ordinary inserts. O(n log n); the sort is one int64 array of (home
    bucket, original index) packed together, ~1.5 s for 20 M entries."""
    n = keys.size
    bits = max(n.bit_length(), 1)
    packed = (keys & np.uint64(cap // BUCKET - 1)).view(np.int64)
    packed <<= bits
    packed |= np.arange(n, dtype=np.int64)
    packed.sort()
    order = packed & ((1 << bits) - 1)
    home = packed >> bits
    del packed
    i = np.arange(n, dtype=np.int64)
    run_start = np.ones(n, dtype=bool)
    run_start[1:] = home[1:] != home[:-1]
    rank = i - np.maximum.accumulate(np.where(run_start, i, 0))
    fits = rank < BUCKET
    return order, fits, (home[fits] << LOG_BUCKET) + rank[fits]


def delete_entries(keys: np.ndarray, rows: np.ndarray, pos: np.ndarray) -> int:
    """Deletes the entries at ``pos`` of the table ``keys`` (``rows``: the same array as
    (buckets, BUCKET)): each becomes a TOMBSTONE, or EMPTY where its bucket already has an
    EMPTY entry (no probe sequence goes past such a bucket). Returns how many became EMPTY."""
    keys[pos] = TOMBSTONE
    to_empty = pos[row_any(np.take(rows, pos >> LOG_BUCKET, axis=0) == EMPTY)]
    keys[to_empty] = EMPTY
    return int(to_empty.size)
