"""Per-block holder counts for the prefix index: how many nodes hold each canonical block.

:class:`BlockHolders` is owned by :class:`~kvfleet.controller.router.index.PrefixIndex`
and updated by it on every pair it adds or drops; nothing else mutates it. It exists so
that ``match`` can find every node's depth without probing every node at every depth:

* under the prefix-closed assumption ``match`` makes (engines evict leaves first), the
  nodes holding block ``i + 1`` of a prompt are a subset of those holding block ``i``,
  so a node's depth can only be a depth where the holder count drops;
* a block held by exactly one node names that node: ``xor`` of the holders' slots;
* a block held by many nodes (``count >= PrefixIndex``'s popularity threshold) gets a
  bitmap of its holders' slots, kept by the index, so its holders are read in one pass.

Layout: one open-addressing table in the pair table's shape (buckets of 8 keys, one
cache line; triangular probing; tombstones), three parallel arrays per entry::

    keys[i]   uint64   mix(block_hash, SALT), or EMPTY (0) / TOMBSTONE (1)
    count[i]  uint16   nodes holding the block (>= 1 for a live entry)
    xor[i]    uint16   XOR of those nodes' slots (their slot if count == 1)

12 bytes per entry, kept between TARGET_LOAD/2 and MAX_LOAD full: 17..34 bytes per
distinct block (every distinct block has at least one (node, block) pair); 20 bytes per
pair on ``bench/bench_router.py``'s fleet (19.4 M distinct blocks for 20 M pairs).
Updates come in vectorised batches (:meth:`apply`; the index queues the changes of
small events and applies them in one pass, since a Python probe per block would
double the cost of a 1-block event). Expected O(1) per change and per lookup.
"""

from __future__ import annotations

import numpy as np

from kvfleet.controller.router import probe as _probe
from kvfleet.controller.router.hashtable import (
    delete_entries,
    place_by_home_bucket,
    table_capacity,
    BUCKET,
    EMPTY,
    LOG_BUCKET,
    MAX_LOAD,
    TARGET_LOAD,
    TOMBSTONE,
    first_of_each,
    mix,
    mix_int,
    row_any,
)

SALT = 0x5EED_B10C_4B1D_0001
"""Salt of the block table's keys (distinct from every slot salt only for readability:
the table holds one entry per block, so no two keys can alias)."""

_U64 = np.uint64


class BlockHolders:
    """Holder count and XOR of holder slots per block hash. Single writer: the index."""

    __slots__ = ("_keys", "_count", "_xor", "_rows", "_kv", "_cv", "_xv", "_bmask", "_used", "_live",
                 "_min_capacity")

    def __init__(self, capacity: int = 1024) -> None:
        cap = 64
        while cap < capacity:
            cap *= 2
        self._min_capacity = cap
        self._set_table(np.zeros(cap, _U64), np.zeros(cap, np.uint16), np.zeros(cap, np.uint16))
        self._used = 0     # live entries + tombstones
        self._live = 0     # distinct blocks held by at least one node

    def __len__(self) -> int:
        """Distinct blocks held by at least one node."""
        return self._live

    @property
    def capacity(self) -> int:
        return len(self._keys)

    def memory_bytes(self) -> int:
        return self._keys.nbytes + self._count.nbytes + self._xor.nbytes

    def reserve(self, blocks: int) -> None:
        """Sizes the table for ``blocks`` distinct blocks now (see ``PrefixIndex.reserve``)."""
        if blocks > MAX_LOAD * len(self._keys) - (self._used - self._live):
            self._rehash(max(blocks, self._live))

    # -- lookups ---------------------------------------------------------------------------
    def lookup(self, hashes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(count, xor) of each of ``hashes`` (uint64), both int64; 0 where nobody holds it."""
        pos = self._find(mix(hashes, _U64(SALT)))
        found = pos >= 0
        p = np.where(found, pos, 0)
        count = np.where(found, self._count[p], 0).astype(np.int64)
        xor = np.where(found, self._xor[p], 0).astype(np.int64)
        return count, xor

    def lookup_prefix(self, hashes: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
        """(count, xor, z) for a prompt's chained ``hashes``: ``z`` is the first block
        nobody holds (``len(hashes)`` if none), and count/xor are exact for blocks before
        ``z`` and 0 from it on. Cheaper than :meth:`lookup`, because a prompt's tail
        that nobody holds needs no exact answer: one compiled loop (``probe.py``) that
        stops at ``z``."""
        h = np.ascontiguousarray(hashes, dtype=_U64).reshape(-1)
        count = np.empty(h.size, dtype=np.int64)
        xor = np.empty(h.size, dtype=np.int64)
        z = _probe.holders_prefix(self._keys, self._count, self._xor, _U64(self._bmask), _U64(SALT), h, count, xor)
        return count, xor, z

    def count_of(self, block_hash: int) -> int:
        """Nodes holding ``block_hash``. O(1)."""
        p = self._find_scalar(mix_int(block_hash, SALT))
        return 0 if p < 0 else self._cv[p]

    # -- updates ---------------------------------------------------------------------------
    def apply(self, hashes: np.ndarray, slots: np.ndarray, signs: np.ndarray,
              distinct: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Applies holder changes in one vectorised pass: block ``hashes[i]`` (uint64)
        gained (``signs[i] == 1``) or lost (``-1``) holder ``slots[i]``. Each change must
        be real (the index calls this only for pairs it added or dropped), so the net
        change per block is exact whatever the order. Returns (the distinct blocks
        touched, their holder counts after, the net change), sorted by hash unless the
        caller says ``hashes`` are ``distinct`` (then in their order, not grouped)."""
        if hashes.size == 0:
            return np.zeros(0, _U64), np.zeros(0, np.int64), np.zeros(0, np.int64)
        if self._used + hashes.size <= MAX_LOAD * len(self._keys):
            # Room for every block of the batch: one compiled loop (probe.holders_apply),
            # where the vectorised form below costs some 40 NumPy calls whatever the size.
            n = hashes.size
            u, after, net = np.empty(n, _U64), np.empty(n, np.int64), np.empty(n, np.int64)
            nu, inserted, used, deleted, emptied = _probe.holders_apply(
                self._keys, self._count, self._xor, _U64(self._bmask), _U64(SALT),
                np.ascontiguousarray(hashes, _U64), np.ascontiguousarray(slots, np.int64),
                np.ascontiguousarray(signs, np.int64), distinct, u, after, net)
            self._live += inserted - deleted
            self._used += used - emptied
            return u[:nu], after[:nu], net[:nu]
        return self._apply_vectorised(hashes, slots, signs, distinct)

    def _apply_vectorised(self, hashes: np.ndarray, slots: np.ndarray, signs: np.ndarray,
                          distinct: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """:meth:`apply` in NumPy passes; rehashes first when the batch may not fit."""
        if distinct:
            u, net, xr = hashes, signs.astype(np.int64), slots.astype(np.uint16)
        else:
            order = np.argsort(hashes, kind="stable")
            h = hashes[order]
            start = np.flatnonzero(np.concatenate(([True], h[1:] != h[:-1])))
            u = h[start]
            net = np.add.reduceat(signs[order].astype(np.int64), start)
            xr = np.bitwise_xor.reduceat(slots[order].astype(np.uint16), start)
        if self._used + u.size > MAX_LOAD * len(self._keys):
            self._rehash(self._live + u.size)
        keys = mix(u, _U64(SALT))
        pos = self._find(keys)
        new = np.flatnonzero((pos < 0) & (net > 0))
        if new.size:
            pos[new] = self._insert(keys[new])
        ok = pos >= 0        # (a block absent with net <= 0 can only be a 2**-63 key alias)
        p = pos[ok]
        after = np.zeros(u.size, np.int64)
        after[ok] = self._count[p].astype(np.int64) + net[ok]
        self._count[p] = after[ok]
        self._xor[p] ^= xr[ok]
        self._delete(p[after[ok] == 0])
        return u, after, net

    # -- table internals (as in the pair table, without a slot to compare) ------------------
    def _set_table(self, keys: np.ndarray, count: np.ndarray, xor: np.ndarray) -> None:
        self._keys, self._count, self._xor = keys, count, xor
        self._bmask = len(keys) // BUCKET - 1
        self._rows = keys.reshape(-1, BUCKET)
        self._kv, self._cv, self._xv = memoryview(keys), memoryview(count), memoryview(xor)

    def _find_scalar(self, key: int) -> int:
        tk, bmask = self._kv, self._bmask
        b, step = key & bmask, 0
        while True:
            base = b << LOG_BUCKET
            ents = tk[base : base + BUCKET].tolist()
            if key in ents:
                return base + ents.index(key)
            if EMPTY in ents:
                return -1
            step += 1
            b = (b + step) & bmask

    def _find(self, keys: np.ndarray) -> np.ndarray:
        """Table position of each key, or -1; one bucket per pending key per pass."""
        rows, bmask = self._rows, self._bmask
        out = np.full(keys.size, -1, dtype=np.int64)
        idx = np.arange(keys.size)
        b = (keys & _U64(bmask)).view(np.int64)
        step = 0
        while idx.size:
            at = np.take(rows, b, axis=0)
            eq = at == keys[:, None]
            hit = row_any(eq)
            h = np.flatnonzero(hit)
            if h.size:
                out[idx[h]] = (b[h] << LOG_BUCKET) | eq[h].argmax(axis=1)
            go = ~(hit | row_any(at == EMPTY))
            step += 1
            idx, keys, b = idx[go], keys[go], (b[go] + step) & bmask
        return out

    def _insert(self, keys: np.ndarray) -> np.ndarray:
        """Inserts distinct keys that are not in the table (count 0, xor 0); returns their
        positions. Each takes the first free (EMPTY or TOMBSTONE) entry on its probe
        sequence; keys that lose a race for one entry retry their bucket next pass."""
        rows, tk, bmask = self._rows, self._keys, self._bmask
        out = np.full(keys.size, -1, dtype=np.int64)
        idx = np.arange(keys.size)
        b = (keys & _U64(bmask)).view(np.int64)
        step = np.zeros(keys.size, dtype=np.int64)
        while idx.size:
            at = np.take(rows, b, axis=0)
            free = at <= TOMBSTONE
            has = row_any(free)
            e = np.flatnonzero(has)
            done = np.zeros(idx.size, dtype=bool)
            if e.size:
                target = (b[e] << LOG_BUCKET) | free[e].argmax(axis=1)
                first = first_of_each(target)
                won, pos = e[first], target[first]
                self._used += int(np.count_nonzero(tk[pos] == EMPTY))
                tk[pos] = keys[won]
                self._count[pos] = 0
                self._xor[pos] = 0
                out[idx[won]] = pos
                done[won] = True
            adv = ~has
            step[adv] += 1
            b[adv] = (b[adv] + step[adv]) & bmask
            keep = ~done
            idx, keys, b, step = idx[keep], keys[keep], b[keep], step[keep]
        self._live += out.size
        return out

    def _delete(self, pos: np.ndarray) -> None:
        emptied = delete_entries(self._keys, self._rows, pos)
        self._live -= pos.size
        self._used -= emptied

    def _rehash(self, need: int) -> None:
        """Rebuilds the table without tombstones, sized for ``need`` live entries at
        TARGET_LOAD: entries sorted by home bucket, the first 8 of each go straight in."""
        cap = table_capacity(need, self._min_capacity)
        live = np.flatnonzero(self._keys > TOMBSTONE)
        keys, count, xor = self._keys[live], self._count[live], self._xor[live]
        del live
        order, fits, pos = place_by_home_bucket(keys, cap)
        keys, count, xor = keys[order], count[order], xor[order]
        del order
        nk, nc, nx = np.zeros(cap, _U64), np.zeros(cap, np.uint16), np.zeros(cap, np.uint16)
        nk[pos], nc[pos], nx[pos] = keys[fits], count[fits], xor[fits]
        self._set_table(nk, nc, nx)
        self._used = self._live = int(pos.size)
        over = ~fits
        if over.any():
            p = self._insert(keys[over])
            self._count[p], self._xor[p] = count[over], xor[over]
        self._used = self._live
