"""Compiled lookups in the prefix index's tables, for ``PrefixIndex.match``.

The tables' layout and the probe sequence are in ``hashtable.py``; these are the same
reads done in one compiled loop instead of NumPy passes (whose ~1 us per call, times a
dozen calls, was most of ``match``). Writes stay in NumPy: they are batched already.

All arithmetic on keys is uint64 (Numba, like NumPy, would turn mixed uint64/int64
arithmetic into float64); positions are int64.
"""

from __future__ import annotations

import numba
import numpy as np

from kvfleet.controller.router.hashtable import BUCKET, EMPTY, FIRST_KEY, LOG_BUCKET, MIX_K, TOMBSTONE

_U = np.uint64
_K = _U(MIX_K)
_S32 = _U(32)
_FIRST = _U(FIRST_KEY)
_EMPTY = _U(EMPTY)


@numba.njit(cache=True, nogil=True, inline="always")
def mix1(block_hash, salt):
    """``hashtable.mix`` of one hash (uint64 in, uint64 out)."""
    x = (block_hash ^ salt) * _K
    x ^= x >> _S32
    return max(x, _FIRST)


@numba.njit(cache=True, nogil=True, inline="always")
def find_key(keys, bmask, key):
    """Position of ``key`` in the table ``keys`` (one entry per key), or -1."""
    b = key & bmask
    step = _U(0)
    while True:
        base = np.int64(b) << LOG_BUCKET
        ended = False
        for j in range(BUCKET):
            k = keys[base + j]
            if k == key:
                return base + j
            if k == _EMPTY:
                ended = True
        if ended:
            return -1
        step += _U(1)
        b = (b + step) & bmask


@numba.njit(cache=True, nogil=True, inline="always")
def find_pair(keys, slots, bmask, key, slot):
    """Position of the (key, slot) entry in the pair table, or -1."""
    b = key & bmask
    step = _U(0)
    while True:
        base = np.int64(b) << LOG_BUCKET
        ended = False
        for j in range(BUCKET):
            k = keys[base + j]
            if k == key and slots[base + j] == slot:
                return base + j
            if k == _EMPTY:
                ended = True
        if ended:
            return -1
        step += _U(1)
        b = (b + step) & bmask


@numba.njit(cache=True, nogil=True)
def holders_prefix(keys, count, xor, bmask, salt, hashes, count_out, xor_out):
    """Fills the holder count and slot XOR of ``hashes[i]`` for ``i`` before the first
    block nobody holds, 0 from there on; returns that first block's index (``z``)."""
    n = hashes.shape[0]
    z = n
    for i in range(n):
        p = find_key(keys, bmask, mix1(hashes[i], salt))
        if p < 0:
            z = i
            break
        count_out[i] = count[p]
        xor_out[i] = xor[p]
    for i in range(z, n):
        count_out[i] = 0
        xor_out[i] = 0
    return z


@numba.njit(cache=True, nogil=True)
def drop_depths(count, z):
    """The depths ``d`` (1..z) after which the running minimum of ``count`` drops, then
    ``z``: the only depths a prefix-closed node's match can end at."""
    out = np.empty(z, np.int64)
    m = 0
    low = count[0]
    for i in range(1, z):
        if count[i] < low:
            out[m] = i
            m += 1
            low = count[i]
    out[m] = z
    return out[: m + 1]


@numba.njit(cache=True, nogil=True)
def walk_depths(hashes, slots, count, xor, depths, bitmap_rows, bits, pair_keys, pair_slots, pair_bmask, salt, out):
    """``PrefixIndex.match``'s walk: for each depth ``d`` in order, keeps the slots still
    in the running that hold block ``d - 1`` (from its bitmap row if it has one, from
    its XOR if it has one holder, else by probing the pair table) and sets their
    ``out`` to ``d``; stops when none is left."""
    n = slots.shape[0]
    alive = np.arange(n)
    na = n
    for k in range(depths.shape[0]):
        d = depths[k]
        b = d - 1
        c = count[b]
        row = bitmap_rows[k]
        h = hashes[b]
        m = 0
        for a in range(na):
            i = alive[a]
            s = slots[i]
            if row >= 0:
                keep = (bits[row, s >> 3] >> (s & 7)) & 1 == 1
            elif c == 1:
                keep = s == xor[b]
            else:
                keep = find_pair(pair_keys, pair_slots, pair_bmask, mix1(h, salt[s]), s) >= 0
            if keep:
                alive[m] = i
                m += 1
                out[i] = d
        na = m
        if na == 0:
            break


_TOMB = _U(TOMBSTONE)


@numba.njit(cache=True, nogil=True, inline="always")
def delete_entry(keys, p):
    """``hashtable.delete_entries`` of one entry: a TOMBSTONE, or EMPTY where its bucket
    already has an EMPTY entry; returns 1 if it became EMPTY, else 0."""
    keys[p] = _TOMB
    base = (p >> LOG_BUCKET) << LOG_BUCKET
    for j in range(BUCKET):
        if keys[base + j] == _EMPTY:
            keys[p] = _EMPTY
            return 1
    return 0


@numba.njit(cache=True, nogil=True)
def holders_apply(keys, count, xor, bmask, salt, hashes, slots, signs, distinct, u_out, after_out, net_out):
    """``BlockHolders.apply`` as one loop, for a batch the table has room for (no rehash):
    groups the changes by block (sorted by hash, unless ``distinct``), then per block
    finds its entry, inserts it (first free entry on its probe sequence) if it gains
    holders and is new, updates count and XOR, and deletes it (a TOMBSTONE, or EMPTY
    where its bucket has an EMPTY entry) when no holder is left. Fills the outputs
    (distinct blocks, count after, net change); returns (blocks, entries inserted,
    EMPTY entries taken, entries deleted, deleted entries made EMPTY)."""
    n = hashes.shape[0]
    order = np.arange(n) if distinct else np.argsort(hashes, kind="mergesort")
    nu = inserted = used = deleted = emptied = 0
    i = 0
    while i < n:
        r = order[i]
        h = hashes[r]
        s = np.int64(signs[r])
        x = np.uint16(slots[r])
        j = i + 1
        if not distinct:
            while j < n and hashes[order[j]] == h:
                s += np.int64(signs[order[j]])
                x ^= np.uint16(slots[order[j]])
                j += 1
        key = mix1(h, salt)
        p = find_key(keys, bmask, key)
        if p < 0 and s > 0:
            b = key & bmask
            step = _U(0)
            while p < 0:
                base = np.int64(b) << LOG_BUCKET
                for e in range(BUCKET):
                    if keys[base + e] <= _TOMB:
                        p = base + e
                        break
                step += _U(1)
                b = (b + step) & bmask
            if keys[p] == _EMPTY:
                used += 1
            keys[p] = key
            count[p] = 0
            xor[p] = 0
            inserted += 1
        a = np.int64(0)
        if p >= 0:   # (absent with no gain: only a 2**-63 key alias; left alone, as apply does)
            a = np.int64(count[p]) + s
            count[p] = a
            xor[p] ^= x
            if a == 0:
                emptied += delete_entry(keys, p)
                deleted += 1
        u_out[nu] = h
        after_out[nu] = a
        net_out[nu] = s
        nu += 1
        i = j
    return nu, inserted, used, deleted, emptied


@numba.njit(cache=True, nogil=True)
def pairs_store(keys, slots, bmask, salt, slot, hashes, new_out):
    """``PrefixIndex.store`` of blocks of one slot, in order: a (block, slot) pair already
    held is skipped; a new one takes the first TOMBSTONE on its probe sequence before the
    bucket with an EMPTY entry, else that EMPTY entry. Fills ``new_out`` with the blocks added; returns (how many, how many
    of them reused a TOMBSTONE)."""
    nn = 0
    reused = 0
    s16 = np.uint16(slot)
    for i in range(hashes.shape[0]):
        h = hashes[i]
        key = mix1(h, salt)
        b = key & bmask
        step = _U(0)
        free = -1
        p = -1
        held = False
        while True:
            base = np.int64(b) << LOG_BUCKET
            empty = -1
            for j in range(BUCKET):
                k = keys[base + j]
                if k == key and slots[base + j] == s16:
                    held = True
                    break
                if free < 0 and k == _TOMB:
                    free = base + j
                if empty < 0 and k == _EMPTY:
                    empty = base + j
            if held:
                break
            if empty >= 0:
                p = empty
                break
            step += _U(1)
            b = (b + step) & bmask
        if held:
            continue
        if free >= 0:
            p = free
            reused += 1
        keys[p] = key
        slots[p] = s16
        new_out[nn] = h
        nn += 1
    return nn, reused


@numba.njit(cache=True, nogil=True)
def pairs_remove(keys, slots, bmask, salt, slot, hashes, gone_out):
    """``PrefixIndex.remove`` of blocks of one slot, in order: a held pair's entry is
    deleted (:func:`delete_entry`). Fills ``gone_out`` with the blocks that were held;
    returns (how many, how many entries became EMPTY)."""
    ng = 0
    emptied = 0
    s16 = np.uint16(slot)
    for i in range(hashes.shape[0]):
        h = hashes[i]
        p = find_pair(keys, slots, bmask, mix1(h, salt), s16)
        if p < 0:
            continue
        emptied += delete_entry(keys, p)
        gone_out[ng] = h
        ng += 1
    return ng, emptied


@numba.njit(cache=True, nogil=True)
def pairs_holds(keys, slots, bmask, salt, slot, hashes, out):
    """``out[i]``: whether the pair table holds (``hashes[i]``, ``slot``)."""
    s16 = np.uint16(slot)
    for i in range(hashes.shape[0]):
        out[i] = find_pair(keys, slots, bmask, mix1(hashes[i], salt), s16) >= 0


def warm_up() -> None:
    """Compiles (or loads from Numba's cache) the kernels with the index's dtypes."""
    keys = np.zeros(8, _U)
    c16 = np.zeros(8, np.uint16)
    h = np.ones(1, _U)
    cnt, xr = np.zeros(1, np.int64), np.zeros(1, np.int64)
    holders_prefix(keys, c16, c16, _U(0), _U(1), h, cnt, xr)
    drop_depths(np.ones(2, np.int64), 2)
    walk_depths(h, np.zeros(1, np.int64), np.ones(1, np.int64), xr, np.ones(1, np.int64), np.full(1, -1, np.int64),
                np.zeros((1, 1), np.uint8), keys, c16, _U(0), np.zeros(1, _U), np.zeros(1, np.int32))
    pairs_store(np.zeros(64, _U), np.zeros(64, np.uint16), _U(7), _U(1), 0, h, np.zeros(1, _U))
    pairs_holds(np.zeros(64, _U), np.zeros(64, np.uint16), _U(7), _U(1), 0, h, np.zeros(1, np.bool_))
    pairs_remove(np.zeros(64, _U), np.zeros(64, np.uint16), _U(7), _U(1), 0, h, np.zeros(1, _U))
    for distinct in (False, True):
        holders_apply(np.zeros(64, _U), np.zeros(64, np.uint16), np.zeros(64, np.uint16), _U(7), _U(1), h,
                      np.zeros(1, np.int64), np.ones(1, np.int64), distinct, np.zeros(1, _U), np.zeros(1, np.int64),
                      np.zeros(1, np.int64))
