"""The router's prefix index: which node holds which canonical KV block.

One :class:`PrefixIndex` serves one (model, block_size). It consumes the node agents'
``BlockStored`` / ``BlockRemoved`` / ``AllBlocksCleared`` events (as ``store``, ``remove``
and ``clear``) and answers one question for the policy: for each candidate node, how many
leading blocks of a prompt does it hold (:meth:`PrefixIndex.match`)?

Layout: one open-addressing hash table, as two parallel NumPy arrays with one entry per
cached (node, block) pair::

    keys[i]   uint64   fmix64(block_hash ^ salt[slot]), or EMPTY (0) / TOMBSTONE (1)
    slots[i]  uint16   the node slot that owns the entry

Entries are grouped in buckets of 8 (64 bytes of keys: one cache line). A key lives in
the first bucket of its probe sequence ``b, b+1, b+3, b+6, ...`` (triangular steps, which
visit every bucket of a power-of-two table) that had room when it was inserted; a lookup
stops at the first bucket that holds the key or an EMPTY entry.

Why this shape:

* 10 bytes per entry and no Python object per pair (a dict of sets costs several times
  more; ``bench/bench_router.py`` measures it). The table is kept between
  TARGET_LOAD/2 and MAX_LOAD full, so a pair costs 14..29 bytes.
* The per-slot salt scatters the copies of one popular block (a system prompt held by
  all 1,000 nodes) over the table instead of piling them into one bucket.
* For a fixed slot ``h -> fmix64(h ^ salt)`` is a bijection, and lookups compare the slot
  too, so the table is exact: two distinct (node, block) pairs never alias. (Sole
  exception: per slot, the two hashes whose key would be 0 or 1 take key 2 and alias
  the hash that owns it; probability 2**-63 per block.)
* Dropping a node is one vectorised scan of ``slots``; there are no per-node lists.
* Batches are probed in NumPy, one bucket per pending key per pass (a row gather);
  nearly every key resolves in its first bucket. Batches of at most ``SCALAR_MAX``
  hashes (most events) take a plain-Python probe instead, since NumPy's ~1 us per call
  dominates there.
* A rehash places entries without probing: sort by bucket, and the first 8 of each
  bucket go straight in; the few overflowing entries are inserted normally.

Measured costs are in :class:`PrefixIndex`'s docstring.

Single writer: the router's event consumer owns the index; nothing else mutates it.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np

from kvfleet.hashing import fmix_int

EMPTY = 0
"""Key of a never-used entry: a lookup that meets one in a bucket stops there."""
TOMBSTONE = 1
"""Key of a deleted entry: lookups go past it, inserts reuse it."""
BUCKET = 8
"""Entries per bucket: 8 uint64 keys are one 64-byte cache line (``_row_any`` relies on 8)."""
MAX_LOAD = 0.7
"""Occupied (live + tombstone) fraction of the table that triggers a rehash."""
TARGET_LOAD = 0.5
"""Live fraction a rehash sizes the table for, so the next rehash is >= 0.2 * capacity away."""
MAX_SLOTS = 1 << 16
"""Node slots are stored as uint16."""
SCALAR_MAX = 32
"""Batches of up to this many hashes are probed in plain Python: below this, NumPy's
per-call overhead (~40 us per batch) costs more than ~1.5 us per hash in Python."""
MATCH_BATCH = 1024
"""Keys ``match`` aims to probe per vectorised batch (see the search loop)."""
_STRAGGLERS = 16
"""A vectorised lookup finishes its last few keys (at most this many) in Python."""
CHUNK = 1 << 16
"""Largest batch probed in one vectorised go (bounds the (n, 8) temporaries)."""

_U64 = np.uint64
_FIRST_KEY = TOMBSTONE + 1
_S30, _S27, _S31 = _U64(30), _U64(27), _U64(31)
_M1, _M2 = _U64(0xBF58476D1CE4E5B9), _U64(0x94D049BB133111EB)
_LOG_BUCKET = 3


def _row_any(flags: np.ndarray) -> np.ndarray:
    """``flags.any(axis=1)`` for a C-contiguous (n, 8) bool array, read as n uint64s
    (NumPy's reduction along a short inner axis is ~20x slower)."""
    return flags.view(np.uint64).reshape(-1) != 0


def _mix(hashes: np.ndarray, salt: np.ndarray | np.uint64) -> np.ndarray:
    """Table keys of (block hash, slot salt) pairs: SplitMix64's finaliser, never 0 or 1."""
    x = hashes ^ salt
    x ^= x >> _S30
    x *= _M1
    x ^= x >> _S27
    x *= _M2
    x ^= x >> _S31
    # Keys 0 and 1 are markers: the (2**-63 likely) keys below 2 become key 2.
    return np.maximum(x, _U64(_FIRST_KEY), out=x)


def _mix_int(block_hash: int, salt: int) -> int:
    """:func:`_mix` of one hash, on Python ints (the scalar path)."""
    return max(fmix_int(block_hash ^ salt), _FIRST_KEY)


def _distinct(keys: np.ndarray) -> np.ndarray:
    """The distinct values of ``keys``, sorted (cheaper than ``np.unique`` on small arrays)."""
    k = np.sort(keys)
    if k.size > 1:
        k = k[np.concatenate(([True], k[1:] != k[:-1]))]
    return k


def _first_of_each(values: np.ndarray) -> np.ndarray:
    """Indices of the first occurrence of each distinct value in ``values``."""
    order = np.argsort(values, kind="stable")
    v = values[order]
    return order[np.concatenate(([True], v[1:] != v[:-1]))]


def _slot_salt(seed: int, slot: int) -> int:
    return fmix_int(((seed & 0xFFFFFFFF) << 32) ^ (slot * 0x9E3779B97F4A7C15) ^ 0x6B7666)


class PrefixIndex:
    """Which node slot holds which canonical block hash, for one (model, block_size).

    Nodes get small integer slots (``add_node``); events address nodes by slot, so the hot
    path never hashes node ids. ``len(index)`` is the number of (node, block) pairs.

    Costs, measured on the 2-core dev box with 20 M pairs over 1,000 nodes (table of
    2**25 entries at load 0.60; ``bench/bench_router.py``):

    * memory: 16.8 bytes per pair (10 bytes per entry / load; 14..29 by design);
    * ``store``: 1-block events ~3.2 us each (310 k blocks/s); 16-block events ~28 us
      (580 k blocks/s); 256-block events 1.3 M blocks/s;
    * ``contains``: one bucket read, ~2 us from Python;
    * ``match`` of a 500-block prompt: ~1.15 ms against 979 nodes that all hold its
      first block (10 probe batches of ~1,000 keys, each a cache miss), ~0.47 ms when
      123 nodes hold it;
    * ``clear`` / ``remove_node``: one scan of the table, ~60 ms;
    * growing past MAX_LOAD rehashes everything: ~5 s at 20 M pairs on this box, a
      stall for a single-threaded router. Size a big index up front with
      :meth:`reserve`.
    """

    __slots__ = (
        "_keys", "_slots", "_rows", "_kv", "_sv", "_bmask", "_used", "_live", "_counts", "_salt",
        "_salt_int", "_slot_of", "_node_of", "_free", "_seed", "_min_capacity",
    )

    def __init__(self, capacity: int = 1024, seed: int = 0) -> None:
        """``capacity``: initial table entries (rounded up to a power of two, at least 64).
        ``seed`` derives the per-slot salts (fixed by default so runs are reproducible)."""
        cap = 64
        while cap < capacity:
            cap *= 2
        self._min_capacity = cap
        self._set_table(np.zeros(cap, dtype=_U64), np.zeros(cap, dtype=np.uint16))
        self._used = 0            # live entries + tombstones
        self._live = 0            # live entries == (node, block) pairs
        self._counts = np.zeros(0, dtype=np.int64)   # live entries per slot
        self._salt = np.zeros(0, dtype=_U64)         # per-slot key salt
        self._salt_int: list[int] = []               # the same salts as Python ints
        self._slot_of: dict[str, int] = {}
        self._node_of: list[str | None] = []         # slot -> node id (None: free)
        self._free: list[int] = []                   # freed slots; the lowest is reused first
        self._seed = seed

    # -- nodes -----------------------------------------------------------------------------
    def add_node(self, node_id: str) -> int:
        """The slot of ``node_id``, allocating the lowest free one if it is new."""
        slot = self._slot_of.get(node_id)
        if slot is not None:
            return slot
        if self._free:
            slot = min(self._free)
            self._free.remove(slot)
            self._node_of[slot] = node_id
        else:
            slot = len(self._node_of)
            if slot >= MAX_SLOTS:
                raise OverflowError(f"a PrefixIndex holds at most {MAX_SLOTS} nodes")
            self._node_of.append(node_id)
            self._salt_int.append(_slot_salt(self._seed, slot))
            if slot >= len(self._counts):
                n = max(16, 2 * len(self._counts))
                self._counts = np.concatenate([self._counts, np.zeros(n - slot, np.int64)])
                self._salt = np.concatenate([self._salt, np.zeros(n - slot, _U64)])
            self._salt[slot] = self._salt_int[slot]
        self._slot_of[node_id] = slot
        return slot

    def remove_node(self, node_id: str) -> None:
        """Drops every block of ``node_id`` and frees its slot. Unknown ids are ignored."""
        slot = self._slot_of.pop(node_id, None)
        if slot is None:
            return
        self.clear(slot)
        self._node_of[slot] = None
        self._free.append(slot)

    def slot_of(self, node_id: str) -> int | None:
        """The node's slot, or None if it was never added (or was removed)."""
        return self._slot_of.get(node_id)

    def node_ids(self) -> Iterator[str]:
        """The nodes that hold a slot."""
        return iter(self._slot_of)

    # -- events ----------------------------------------------------------------------------
    def store(self, slot: int, hashes: np.ndarray) -> None:
        """Records that ``slot`` holds ``hashes`` (uint64). Blocks it already holds and
        duplicates within the batch are fine. Expected O(len(hashes)), plus amortised
        rehashes."""
        slot = self._check_slot(slot)
        h = np.asarray(hashes, dtype=_U64).reshape(-1)
        if h.size == 0:
            return
        if self._used + h.size > MAX_LOAD * len(self._keys):
            self._rehash(self._live + h.size)
        if h.size <= SCALAR_MAX:
            added, reused = self._store_scalar(slot, h.tolist())
        else:
            added = reused = 0
            for i in range(0, h.size, CHUNK):
                keys = _distinct(_mix(h[i : i + CHUNK], self._salt[slot]))
                a, r = self._insert(keys, np.full(keys.size, slot, dtype=np.uint16))
                added, reused = added + a, reused + r
        self._live += added
        self._used += added - reused
        self._counts[slot] += added

    def remove(self, slot: int, hashes: np.ndarray) -> None:
        """Records that ``slot`` evicted ``hashes``; hashes it does not hold are ignored."""
        slot = self._check_slot(slot)
        h = np.asarray(hashes, dtype=_U64).reshape(-1)
        if h.size == 0 or self._counts[slot] == 0:
            return
        if h.size <= SCALAR_MAX:
            removed = self._remove_scalar(slot, h.tolist())
        else:
            keys = _distinct(_mix(h, self._salt[slot]))
            pos = self._find(keys, np.full(keys.size, slot, dtype=np.uint16))
            pos = pos[pos >= 0]
            self._delete(pos)
            removed = pos.size
        self._counts[slot] -= removed

    def clear(self, slot: int) -> None:
        """Drops every block of ``slot`` (``AllBlocksCleared``, resync, node loss).
        One vectorised scan of the table: O(capacity)."""
        slot = self._check_slot(slot)
        if self._counts[slot] == 0:
            return
        pos = np.flatnonzero((self._slots == slot) & (self._keys > TOMBSTONE))
        self._delete(pos)
        self._counts[slot] = 0

    def reserve(self, pairs: int) -> None:
        """Sizes the table for ``pairs`` (node, block) pairs now, so that growing to them
        later needs no rehash. Cheap on an empty index; a rehash of 20 M pairs takes
        seconds, so size a big fleet's index up front (a node can hold at most its
        ``num_blocks``)."""
        if pairs > MAX_LOAD * len(self._keys) - (self._used - self._live):
            self._rehash(max(pairs, self._live))

    # -- queries ---------------------------------------------------------------------------
    def contains(self, slot: int, block_hash: int) -> bool:
        """Whether ``slot`` holds ``block_hash``. O(1)."""
        slot = self._check_slot(slot)
        return self._find_scalar(_mix_int(int(block_hash), self._salt_int[slot]), slot) >= 0

    def blocks_of(self, slot: int) -> int:
        """Number of blocks ``slot`` holds. O(1)."""
        slot = self._check_slot(slot)
        return int(self._counts[slot])

    def match(self, hashes: np.ndarray, slots: np.ndarray) -> np.ndarray:
        """For each of ``slots``, how many leading blocks of ``hashes`` it holds (int32).

        Assumes each node's cached set is prefix-closed along a chain: if it holds block
        ``i`` of a prompt it holds blocks ``0..i-1`` too. That holds in practice because
        hashes are chained (block ``i``'s hash names its whole prefix) and engines evict
        leaves first. Under that assumption the answer is found by searching over the depth,
        vectorised across all slots at once: one probe batch for block 0 (slots that miss
        it, or hold nothing, stop at 0), then rounds that each probe ``k`` depths per open
        slot and keep the part of the range where held turns into not held. With many open
        slots ``k = 1`` (a binary search: ceil(log2(len(hashes))) rounds); with few, ``k``
        grows so that a round probes ~MATCH_BATCH keys and fewer rounds are needed, since
        a NumPy batch costs ~50 us plus ~0.1 us per key. Cost: O(len(slots) *
        log(len(hashes))) expected bucket reads.

        If a node's set has holes, the result ``m`` is still a boundary: block ``m-1`` is
        held and block ``m`` is not (or ``m == len(hashes)``). So it is never less than the
        true leading run and never more than one past the deepest block the node holds.
        """
        h = np.asarray(hashes, dtype=_U64).reshape(-1)
        s = np.asarray(slots, dtype=np.int64).reshape(-1)
        out = np.zeros(s.size, dtype=np.int32)
        n = h.size
        if n == 0 or s.size == 0 or self._live == 0:
            return out
        if s.min() < 0 or s.max() >= len(self._node_of):
            raise IndexError(f"slots must be in 0..{len(self._node_of) - 1}")
        act = np.flatnonzero(self._counts[s] > 0)
        act = act[self._present(h[0], s[act])]
        if act.size == 0:
            return out
        s = s[act]
        # Invariant per open slot: block lo-1 is held; block hi is not held (or hi == n).
        lo = np.ones(act.size, dtype=np.int64)
        hi = np.full(act.size, n, dtype=np.int64)
        salt, s16 = self._salt[s], s.astype(np.uint16)
        open_ = np.flatnonzero(lo < hi)
        while open_.size:
            olo, ohi = lo[open_], hi[open_]
            # Probe k depths per open slot, splitting (lo, hi] into k + 1 parts.
            k = int(min(max(1, MATCH_BATCH // open_.size), (ohi - olo).max()))
            if k == 1:
                mid = (olo + ohi + 1) >> 1
                held = self._find(_mix(h[mid - 1], salt[open_]), s16[open_]) >= 0
                lo[open_] = np.where(held, mid, olo)
                hi[open_] = np.where(held, ohi, mid - 1)
            else:
                depth = olo[:, None] + -(-np.arange(1, k + 1) * (ohi - olo)[:, None] // (k + 1))
                rows = np.repeat(open_, k)
                keys = _mix(h[depth.reshape(-1) - 1], salt[rows])
                held2 = (self._find(keys, s16[rows]) >= 0).reshape(depth.shape)
                # j: how many probes, shallowest first, are held before the first miss.
                j = np.where(held2.all(axis=1), k, held2.argmin(axis=1))
                r = np.arange(open_.size)
                lo[open_] = np.where(j > 0, depth[r, j - 1], olo)
                hi[open_] = np.where(j < k, depth[r, np.minimum(j, k - 1)] - 1, ohi)
            open_ = open_[lo[open_] < hi[open_]]
        out[act] = lo
        return out

    def __len__(self) -> int:
        """Number of (node, block) pairs."""
        return self._live

    def memory_bytes(self) -> int:
        """Bytes held by the index's NumPy arrays; the table dominates. Per-node Python
        objects (id dict, salts as ints: ~200 bytes per node) are not counted."""
        return self._keys.nbytes + self._slots.nbytes + self._counts.nbytes + self._salt.nbytes

    @property
    def capacity(self) -> int:
        """Table entries (a power of two)."""
        return len(self._keys)

    # -- table internals -------------------------------------------------------------------
    def _set_table(self, keys: np.ndarray, slots: np.ndarray) -> None:
        self._keys, self._slots = keys, slots
        self._bmask = len(keys) // BUCKET - 1
        self._rows = keys.reshape(-1, BUCKET)    # a view: one row per bucket
        # Memoryviews index to Python ints, ~10x faster than NumPy scalar access.
        self._kv, self._sv = memoryview(keys), memoryview(slots)

    def _check_slot(self, slot: int) -> int:
        """``slot`` as a Python int, if a node holds it."""
        slot = int(slot)
        if not 0 <= slot < len(self._node_of) or self._node_of[slot] is None:
            raise KeyError(f"no node in slot {slot}")
        return slot

    def _find_scalar(self, key: int, slot: int, b: int = -1, step: int = 0) -> int:
        """Table position of (key, slot), or -1. Probing starts at bucket ``b`` reached
        after ``step`` steps (default: the key's home bucket)."""
        tk, ts, bmask = self._kv, self._sv, self._bmask
        if b < 0:
            b = key & bmask
        while True:
            base = b << _LOG_BUCKET
            ents = tk[base : base + BUCKET].tolist()
            if key in ents:
                for j, k in enumerate(ents):
                    if k == key and ts[base + j] == slot:
                        return base + j
            if EMPTY in ents:
                return -1
            step += 1
            b = (b + step) & bmask

    def _store_scalar(self, slot: int, hashes: list[int]) -> tuple[int, int]:
        """Inserts hashes one at a time; returns (entries added, of which reused tombstones)."""
        tk, ts, bmask, salt = self._kv, self._sv, self._bmask, self._salt_int[slot]
        added = reused = 0
        for h in hashes:
            key = _mix_int(h, salt)
            b, step, free = key & bmask, 0, -1
            while True:
                base = b << _LOG_BUCKET
                ents = tk[base : base + BUCKET].tolist()
                if key in ents and any(k == key and ts[base + j] == slot for j, k in enumerate(ents)):
                    p = -1
                    break
                if free < 0 and TOMBSTONE in ents:
                    free = base + ents.index(TOMBSTONE)
                if EMPTY in ents:
                    p = base + ents.index(EMPTY)
                    break
                step += 1
                b = (b + step) & bmask
            if p < 0:
                continue
            if free >= 0:
                p = free
                reused += 1
            tk[p] = key
            ts[p] = slot
            added += 1
        return added, reused

    def _remove_scalar(self, slot: int, hashes: list[int]) -> int:
        """Deletes hashes one at a time (as :meth:`_delete`); returns how many were held."""
        tk, salt = self._kv, self._salt_int[slot]
        removed = 0
        for h in hashes:
            p = self._find_scalar(_mix_int(h, salt), slot)
            if p < 0:
                continue
            base = p & ~(BUCKET - 1)
            tk[p] = EMPTY if EMPTY in tk[base : base + BUCKET].tolist() else TOMBSTONE
            self._used -= tk[p] == EMPTY
            removed += 1
        self._live -= removed
        return removed

    def _present(self, hashes: np.ndarray | np.uint64, slots: np.ndarray, salt: np.ndarray | None = None) -> np.ndarray:
        """Whether each ``slots[i]`` holds ``hashes[i]`` (``hashes`` may be one scalar);
        ``salt`` is ``self._salt[slots]`` if the caller has it."""
        keys = _mix(np.broadcast_to(hashes, slots.shape), self._salt[slots] if salt is None else salt)
        return self._find(keys, slots.astype(np.uint16)) >= 0

    def _find(self, keys: np.ndarray, slots: np.ndarray) -> np.ndarray:
        """Table position of each (key, slot), or -1. All pending keys are at the same
        probe step, so one pass reads one whole bucket per key (a row gather)."""
        rows, ts, bmask = self._rows, self._slots, self._bmask
        out = np.full(keys.size, -1, dtype=np.int64)
        idx = np.arange(keys.size)
        b = (keys & _U64(bmask)).view(np.int64)
        step = 0
        while idx.size:
            at = np.take(rows, b, axis=0)
            eq = at == keys[:, None]
            ended = _row_any(at == EMPTY)
            hit = np.flatnonzero(_row_any(eq))
            if hit.size:
                pos = (b[hit] << _LOG_BUCKET) | eq[hit].argmax(axis=1)
                ok = ts[pos] == slots[hit]
                out[idx[hit[ok]]] = pos[ok]
                ended[hit] = True
                # The key's first copy in the bucket belongs to another slot (p ~ 2**-60):
                # look at the rest of the bucket and beyond in Python.
                for i in hit[~ok].tolist():
                    out[idx[i]] = self._find_scalar(int(keys[i]), int(slots[i]), int(b[i]), step)
            go = ~ended
            step += 1
            idx, keys, slots, b = idx[go], keys[go], slots[go], (b[go] + step) & bmask
            if 0 < idx.size <= _STRAGGLERS:
                # A few keys in long probe sequences: a NumPy pass would cost ~20 us each.
                for i, k, sl, bk in zip(idx.tolist(), keys.tolist(), slots.tolist(), b.tolist()):
                    out[i] = self._find_scalar(k, sl, bk, step)
                break
        return out

    def _insert(self, keys: np.ndarray, slots: np.ndarray) -> tuple[int, int]:
        """Inserts distinct (key, slot) pairs, skipping pairs already present; returns
        (entries added, of which reused tombstones). The caller ensures room.

        Each pass reads one bucket per pending pair. A pair whose bucket has an EMPTY
        entry (the end of its probe sequence) but not the pair itself takes the first
        tombstone it passed, else that EMPTY entry. Pairs that lose a race for the same
        entry re-read their bucket on the next pass.
        """
        rows, tk, ts, bmask = self._rows, self._keys, self._slots, self._bmask
        b = (keys & _U64(bmask)).view(np.int64)
        step = np.zeros(keys.size, dtype=np.int64)     # probe step of each pair
        free = np.full(keys.size, -1, dtype=np.int64)  # first tombstone passed, if any
        added = reused = 0
        while keys.size:
            at = np.take(rows, b, axis=0)
            present = np.zeros(keys.size, dtype=bool)
            r, c = np.nonzero(at == keys[:, None])
            if r.size:
                present[r[ts[(b[r] << _LOG_BUCKET) | c] == slots[r]]] = True
            empty = at == EMPTY
            has_empty = _row_any(empty)
            tomb = at == TOMBSTONE
            new_free = np.flatnonzero(_row_any(tomb) & (free < 0) & ~present)
            if new_free.size:
                free[new_free] = (b[new_free] << _LOG_BUCKET) | tomb[new_free].argmax(axis=1)
            done = present
            e = np.flatnonzero(has_empty & ~present)
            if e.size:
                f = free[e]
                # A tombstone remembered on an earlier pass may have been claimed since.
                mem = f >= 0
                if mem.any():
                    mem[mem] = tk[f[mem]] > TOMBSTONE
                    f[mem] = -1
                target = np.where(f >= 0, f, (b[e] << _LOG_BUCKET) | empty[e].argmax(axis=1))
                first = _first_of_each(target)
                winners = e[first]
                tk[target[first]] = keys[winners]
                ts[target[first]] = slots[winners]
                added += winners.size
                reused += int(np.count_nonzero(f[first] >= 0))
                done = present.copy()
                done[winners] = True
                # Losers forget their tombstone (contested or stale) and retry in place.
                free[e] = -1
            adv = ~present & ~has_empty
            step[adv] += 1
            b[adv] = (b[adv] + step[adv]) & bmask
            keep = ~done
            keys, slots, b, step, free = keys[keep], slots[keep], b[keep], step[keep], free[keep]
        return added, reused

    def _delete(self, pos: np.ndarray) -> None:
        """Turns the live entries at ``pos`` into tombstones, or straight into EMPTY where
        their bucket has an EMPTY entry (then no probe sequence goes past that bucket)."""
        tk = self._keys
        tk[pos] = TOMBSTONE
        to_empty = pos[_row_any(np.take(self._rows, pos >> _LOG_BUCKET, axis=0) == EMPTY)]
        tk[to_empty] = EMPTY
        self._live -= pos.size
        self._used -= to_empty.size

    def _rehash(self, need: int) -> None:
        """Rebuilds the table without tombstones, sized for ``need`` live entries at
        TARGET_LOAD (so it may shrink after mass removal). O(n log n) in live entries:
        sorted by home bucket, the first 8 entries of each bucket go straight in; the
        overflow (~2% at load 0.5) is inserted by ordinary probing."""
        cap = self._min_capacity
        while need > TARGET_LOAD * cap:
            cap *= 2
        live = np.flatnonzero(self._keys > TOMBSTONE)
        keys, slots = self._keys[live], self._slots[live]
        del live
        n = keys.size
        bits = max(n.bit_length(), 1)
        # Sort (home bucket, original index) packed in one int64; 20 M entries ~1.5 s.
        packed = (keys & _U64(cap // BUCKET - 1)).view(np.int64)
        packed <<= bits
        packed |= np.arange(n, dtype=np.int64)
        packed.sort()
        order = packed & ((1 << bits) - 1)
        keys, slots = keys[order], slots[order]
        del order
        home = packed >> bits
        del packed
        i = np.arange(n, dtype=np.int64)
        run_start = np.ones(n, dtype=bool)
        run_start[1:] = home[1:] != home[:-1]
        rank = i - np.maximum.accumulate(np.where(run_start, i, 0))
        fits = rank < BUCKET
        pos = (home[fits] << _LOG_BUCKET) + rank[fits]
        new_keys = np.zeros(cap, dtype=_U64)
        new_slots = np.zeros(cap, dtype=np.uint16)
        new_keys[pos] = keys[fits]
        new_slots[pos] = slots[fits]
        self._set_table(new_keys, new_slots)
        over = ~fits
        added, _ = self._insert(keys[over], slots[over])
        assert pos.size + added == self._live, (pos.size, added, self._live)
        self._used = self._live


class FleetIndex:
    """One :class:`PrefixIndex` per (model, block_size) that the fleet serves."""

    __slots__ = ("_indexes",)

    def __init__(self) -> None:
        self._indexes: dict[tuple[str, int], PrefixIndex] = {}

    def get(self, model: str, block_size: int) -> PrefixIndex | None:
        """The index of (model, block_size), or None if none was created."""
        return self._indexes.get((model, block_size))

    def get_or_create(self, model: str, block_size: int) -> PrefixIndex:
        """The index of (model, block_size), created empty on first use."""
        idx = self._indexes.get((model, block_size))
        if idx is None:
            idx = self._indexes[(model, block_size)] = PrefixIndex()
        return idx

    def remove_node(self, node_id: str) -> None:
        """Drops ``node_id`` (its blocks and its slot) from every index."""
        for idx in self._indexes.values():
            idx.remove_node(node_id)

    def items(self) -> Iterator[tuple[tuple[str, int], PrefixIndex]]:
        """((model, block_size), index) pairs."""
        return iter(self._indexes.items())

    def __len__(self) -> int:
        """Number of (model, block_size) indexes."""
        return len(self._indexes)
