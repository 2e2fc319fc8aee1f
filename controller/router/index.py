"""The router's prefix index: which node holds which canonical KV block.

One :class:`PrefixIndex` serves one (model, block_size). It consumes the node agents'
``BlockStored`` / ``BlockRemoved`` / ``AllBlocksCleared`` events (as ``store``, ``remove``
and ``clear``) and answers one question for the policy: for each candidate node, how many
leading blocks of a prompt does it hold (:meth:`PrefixIndex.match`)?

Layout: three structures, all NumPy arrays, no Python object per pair or per block.

1. The pair table: one open-addressing hash table with one entry per cached
   (node, block) pair, as two parallel arrays::

       keys[i]   uint64   mix(block_hash, salt[slot]), or EMPTY (0) / TOMBSTONE (1)
       slots[i]  uint16   the node slot that owns the entry

   Buckets of 8 keys (one cache line), triangular probing (``hashtable.py``).
2. The holder table (:class:`~kvfleet.controller.router.holders.BlockHolders`): one
   entry per distinct block, with how many nodes hold it and the XOR of their slots.
3. Holder bitmaps: a bitmap of node slots for each *popular* block (held by at least
   ``slot capacity / 8 / BITMAP_BYTES_PER_PAIR`` nodes: 16 at 1,000 nodes), by row in one
   uint8 array, found through a dict keyed by block hash.

Why this shape:

* The pair table is the exact truth: 10 bytes per entry, kept between TARGET_LOAD/2 and
  MAX_LOAD full, so a pair costs 14..29 bytes. The holder table costs 12 bytes per
  entry, 17..34 bytes per distinct block, and there are at most as many distinct blocks
  as pairs (far fewer where prompts are shared). Bitmaps cost at most
  BITMAP_BYTES_PER_PAIR bytes per pair they cover. Worst case ~70 bytes per pair
  (every block on one node, both tables just rehashed); measured in the class
  docstring. A dict of sets costs several times more (``bench/bench_router.py``).
* ``match`` needs no probe per (node, depth): along a prompt, holder sets shrink (see
  :meth:`PrefixIndex.match`), so a node's depth is one of the few depths where the
  holder count drops; a popular block's holders are read from its bitmap in one pass,
  and a block with one holder names it by XOR. Only blocks with a few holders (between
  2 and the bitmap threshold) are probed, for the nodes still in the running.
* The per-slot salt scatters the copies of one popular block (a system prompt held by
  all 1,000 nodes) over the pair table instead of piling them into one bucket.
* For a fixed slot ``h -> mix(h, salt)`` is a bijection, and lookups compare the slot
  too, so the table is exact: two distinct (node, block) pairs never alias. (Sole
  exception: per slot, the two hashes whose key would be 0 or 1 take key 2 and alias
  the hash that owns it; probability 2**-63 per block.) Being a bijection, it is also
  inverted (``unmix``) to find the blocks a cleared node held.
* Dropping a node is one vectorised scan of ``slots``; there are no per-node lists.
* Stores, removes and ``holds`` probe the pair table in one compiled loop over the
  batch (``probe.py``), one key after another; nearly every key resolves in its first
  bucket. (NumPy passes, one bucket per pending key per pass, cost ~40 us of calls per
  batch whatever its size: most events are a few blocks.) The holder-count changes of
  batches of at most ``SCALAR_MAX`` blocks are queued and applied in one pass per
  HOLDER_BATCH changes (or before the next ``match``), larger ones at once; a compiled
  loop too, when the holder table has room for them (``BlockHolders.apply``).
* A rehash places entries without probing: sort by bucket, and the first 8 of each
  bucket go straight in; the few overflowing entries are inserted normally.

Measured costs are in :class:`PrefixIndex`'s docstring.

Single writer: the router's event consumer owns the index; nothing else mutates it.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np

from kvfleet.controller.router.hashtable import (  # noqa: F401  (re-exported: tests, docs)
    BUCKET,
    EMPTY,
    MAX_LOAD,
    TARGET_LOAD,
    TOMBSTONE,
)
from kvfleet.controller.router.hashtable import LOG_BUCKET as _LOG_BUCKET
from kvfleet.controller.router.hashtable import delete_entries as _delete_entries
from kvfleet.controller.router.hashtable import first_of_each as _first_of_each
from kvfleet.controller.router.hashtable import mix as _mix
from kvfleet.controller.router.hashtable import mix_int as _mix_int
from kvfleet.controller.router.hashtable import place_by_home_bucket as _place_by_home_bucket
from kvfleet.controller.router.hashtable import row_any as _row_any
from kvfleet.controller.router.hashtable import table_capacity as _table_capacity
from kvfleet.controller.router.hashtable import unmix as _unmix
from kvfleet.controller.router import probe as _probe
from kvfleet.controller.router.holders import BlockHolders
from kvfleet.hashing import fmix_int

MAX_SLOTS = (1 << 16) - 1
"""Node slots are stored as uint16, and so are per-block holder counts (<= MAX_SLOTS)."""
SCALAR_MAX = 32
"""The holder-table changes of a store or remove of up to this many blocks are queued
(and applied HOLDER_BATCH at a time, or before the next ``match``); larger ones are
applied at once."""
MATCH_BATCH = 1024
"""Keys the fallback depth search (``_match_search``) aims to probe per vectorised batch."""
MATCH_LEVELS = 16
"""``match`` walks the depths where a prompt's holder count drops; a prompt with more
such depths than this (many nodes each holding a different length of it) takes the
per-node depth search instead."""
BITMAP_BYTES_PER_PAIR = 8
"""A block gets a holder bitmap (``slot capacity / 8`` bytes) once it has at least that
many bytes / BITMAP_BYTES_PER_PAIR holders, so bitmaps cost <= this many bytes per pair
they cover (16 holders at 1,000 nodes)."""
_STRAGGLERS = 16
"""A vectorised lookup finishes its last few keys (at most this many) in Python."""
HOLDER_BATCH = 1024
"""Small events queue their holder changes; this many are applied in one pass of
``BlockHolders.apply`` (one call per batch instead of one per event)."""

_U64 = np.uint64


def _slot_salt(seed: int, slot: int) -> int:
    return fmix_int(((seed & 0xFFFFFFFF) << 32) ^ (slot * 0x9E3779B97F4A7C15) ^ 0x6B7666)


class PrefixIndex:
    """Which node slot holds which canonical block hash, for one (model, block_size).

    Nodes get small integer slots (``add_node``); events address nodes by slot, so the hot
    path never hashes node ids. ``len(index)`` is the number of (node, block) pairs.

    Costs, measured with ``bench/bench_router.py`` on the 2-core dev box (shared with
    other CPU-bound jobs at the time, so wall-clock p99s there are scheduling noise; CPU
    time given where it differs) with 20 M pairs over 1,000 nodes, 19.4 M distinct blocks
    (pair table 2**25 entries at load 0.60, holder table 2**25 at 0.58, 5,431 bitmaps):

    * memory: 37.0 bytes per pair (16.8 for the pair table, 20 for the holder table,
      0.05 for bitmaps); see the module docstring for the bounds. A fleet that shares no
      block at all, sized up front with ``reserve``, measured 73 bytes per pair;
    * ``store`` (each figure includes its share of the queued holder-count pass): on 20 M
      random pairs, old and new index run back to back, per CPU second: 1-block events
      ~260 k blocks (the previous single-table index: ~290 k), 16-block ~480 k (550 k),
      256-block ~950 k (2.2 M). The bench's own run, on its fleet: 254 k / 436 k / 585 k
      blocks per CPU second (116 k / 263 k / 328 k wall, on the busy box);
    * ``contains``: one bucket read, ~2 us from Python;
    * ``match`` of a 500-block prompt against 979 nodes: ~52 us p50 (CPU p99 162 us)
      when all of them hold its first 128 blocks and one holds 300 more (the per-node
      depth search, :meth:`_match_search`: ~1.2 ms p50 in the same run), ~46 us when 123
      nodes hold a niche prefix (0.48 ms);
    * ``clear`` / ``remove_node``: one scan of the pair table (~60 ms at 20 M pairs) plus
      one vectorised holder pass over the node's blocks (not re-measured);
    * growing past MAX_LOAD rehashes a table: seconds at 20 M pairs, a stall for a
      single-threaded router. Size a big index up front with :meth:`reserve`.
    """

    __slots__ = (
        "_keys", "_slots", "_rows", "_kv", "_sv", "_bmask", "_used", "_live", "_counts", "_salt",
        "_salt_int", "_slot_of", "_node_of", "_free", "_seed", "_min_capacity",
        "_holders", "_bits", "_bitmap_of", "_free_rows", "_pend_h", "_pend_s", "_cntv",
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
        self._cntv = memoryview(self._counts)        # the same, for fast scalar access
        self._salt = np.zeros(0, dtype=_U64)         # per-slot key salt
        self._salt_int: list[int] = []               # the same salts as Python ints
        self._slot_of: dict[str, int] = {}
        self._node_of: list[str | None] = []         # slot -> node id (None: free)
        self._free: list[int] = []                   # freed slots; the lowest is reused first
        self._seed = seed
        self._holders = BlockHolders()                # per block: holder count, xor of slots
        self._bits = np.zeros((0, 2), dtype=np.uint8)  # holder bitmaps of popular blocks, by row
        self._bitmap_of: dict[int, int] = {}         # block hash -> its row in _bits
        self._free_rows: list[int] = []
        # Holder changes of small events not yet applied to _holders: block hash, and
        # slot + 1 for a gain / -(slot + 1) for a loss. Applied in one vectorised pass
        # (_flush) by match, by the vectorised paths, or at HOLDER_BATCH changes.
        self._pend_h: list[int] = []
        self._pend_s: list[int] = []

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
                self._cntv = memoryview(self._counts)
                self._salt = np.concatenate([self._salt, np.zeros(n - slot, _U64)])
                width = -(-n // 8)
                if width > self._bits.shape[1]:
                    bits = np.zeros((self._bits.shape[0], width), np.uint8)
                    bits[:, : self._bits.shape[1]] = self._bits
                    self._bits = bits
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
        h = np.asarray(hashes, dtype=_U64)
        if h.ndim != 1:
            h = h.reshape(-1)
        if h.size == 0:
            return
        if self._used + h.size > MAX_LOAD * len(self._keys):
            self._rehash(self._live + h.size)
        # One compiled loop over the blocks (probe.pairs_store), whatever the batch.
        out = np.empty(h.size, _U64)
        added, reused = _probe.pairs_store(self._keys, self._slots, _U64(self._bmask), self._salt[slot], slot,
                                           np.ascontiguousarray(h), out)
        self._live += added
        self._used += added - reused
        self._cntv[slot] += added
        if added <= SCALAR_MAX:   # (inline: the path of most events)
            if added:
                self._pend_h += out[:added].tolist()
                self._pend_s += [slot + 1] * added
                if len(self._pend_h) >= HOLDER_BATCH:
                    self._flush()
        else:
            self._apply_now(slot, out[:added], 1)

    def remove(self, slot: int, hashes: np.ndarray) -> None:
        """Records that ``slot`` evicted ``hashes``; hashes it does not hold are ignored."""
        slot = self._check_slot(slot)
        h = np.asarray(hashes, dtype=_U64).reshape(-1)
        if h.size == 0 or self._cntv[slot] == 0:
            return
        out = np.empty(h.size, _U64)
        n_gone, emptied = _probe.pairs_remove(self._keys, self._slots, _U64(self._bmask), self._salt[slot], slot,
                                              np.ascontiguousarray(h), out)
        self._live -= n_gone
        self._used -= emptied
        self._cntv[slot] -= n_gone
        if n_gone <= SCALAR_MAX:
            if n_gone:
                self._pend_h += out[:n_gone].tolist()
                self._pend_s += [-slot - 1] * n_gone
                if len(self._pend_h) >= HOLDER_BATCH:
                    self._flush()
        else:
            self._apply_now(slot, out[:n_gone], -1)

    def _apply_now(self, slot: int, hashes: np.ndarray, sign: int) -> None:
        """``slot`` gained (``sign`` 1) or lost (-1) the distinct blocks ``hashes``, too
        many to queue: the holder table takes them now, after what is queued."""
        self._flush()
        self._apply_holders(hashes, np.full(hashes.size, slot, np.int64), np.full(hashes.size, sign, np.int64), True)

    def clear(self, slot: int) -> None:
        """Drops every block of ``slot`` (``AllBlocksCleared``, resync, node loss).
        One vectorised scan of the table: O(capacity)."""
        slot = self._check_slot(slot)
        if self._counts[slot] == 0:
            return
        self._flush()
        pos = np.flatnonzero((self._slots == slot) & (self._keys > TOMBSTONE))
        hashes = _unmix(self._keys[pos], self._salt[slot])
        self._delete(pos)
        self._counts[slot] = 0
        self._apply_holders(hashes, np.full(hashes.size, slot, np.int64), -np.ones(hashes.size, np.int64), True)

    def reserve(self, pairs: int, blocks: int | None = None) -> None:
        """Sizes the tables for ``pairs`` (node, block) pairs over ``blocks`` distinct
        blocks (default: ``pairs``, i.e. no sharing) now, so that growing to them later
        needs no rehash. Cheap on an empty index; a rehash of 20 M pairs takes seconds,
        so size a big fleet's index up front (a node can hold at most its ``num_blocks``)."""
        if pairs > MAX_LOAD * len(self._keys) - (self._used - self._live):
            self._rehash(max(pairs, self._live))
        self._holders.reserve(pairs if blocks is None else blocks)

    # -- queries ---------------------------------------------------------------------------
    def contains(self, slot: int, block_hash: int) -> bool:
        """Whether ``slot`` holds ``block_hash``. O(1)."""
        slot = self._check_slot(slot)
        return self._find_scalar(_mix_int(int(block_hash), self._salt_int[slot]), slot) >= 0

    def holds(self, slot: int, hashes: np.ndarray) -> np.ndarray:
        """Whether ``slot`` holds each of ``hashes`` (bool array). O(len(hashes))."""
        slot = self._check_slot(slot)
        h = np.asarray(hashes, dtype=_U64).reshape(-1)
        out = np.empty(h.size, np.bool_)
        _probe.pairs_holds(self._keys, self._slots, _U64(self._bmask), self._salt[slot], slot,
                           np.ascontiguousarray(h), out)
        return out

    def blocks_of(self, slot: int) -> int:
        """Number of blocks ``slot`` holds. O(1)."""
        slot = self._check_slot(slot)
        return int(self._counts[slot])

    def match(self, hashes: np.ndarray, slots: np.ndarray) -> np.ndarray:
        """For each of ``slots``, how many leading blocks of ``hashes`` it holds (int32).

        Assumes each node's cached set is prefix-closed along a chain: if it holds block
        ``i`` of a prompt it holds blocks ``0..i-1`` too. That holds in practice because
        hashes are chained (block ``i``'s hash names its whole prefix) and engines evict
        leaves first. Then the nodes holding block ``i + 1`` are a subset of those holding
        block ``i``, so the holder count (:class:`BlockHolders`) never rises along the
        prompt, and a node's depth is one of the few depths where it drops. ``match``:

        1. looks up the holder count of each block of the prompt, up to the first block
           nobody holds;
        2. walks the depths ``d`` where the count drops (and the last held depth), keeping
           the slots that hold block ``d - 1``: read from the block's holder bitmap if it
           is popular, from the XOR of its holders' slots if it has one holder, else by
           probing the pair table for the slots still in the running (few, typically);
        3. a slot's answer is the last depth it survived.

        Steps 1 and 2 are compiled loops (``probe.py``). Typical cost: one holder-table
        probe per held block of the prompt plus one pass over ``slots`` per drop; see the
        class docstring. A prompt whose count drops at more than MATCH_LEVELS depths
        takes :meth:`_match_search` instead.

        Exact for prefix-closed sets. If sets have holes, the result ``m`` still has block
        ``m - 1`` held (so it never exceeds the node's deepest held block + 1), but it may
        fall short of the node's leading run when other nodes' holes hide a drop; the
        router then predicts fewer cached tokens, never more than are there.
        """
        h = np.ascontiguousarray(hashes, dtype=_U64).reshape(-1)
        s = np.ascontiguousarray(slots, dtype=np.int64).reshape(-1)
        out = np.zeros(s.size, dtype=np.int32)
        n = h.size
        if n == 0 or s.size == 0 or self._live == 0:
            return out
        if s.min() < 0 or s.max() >= len(self._node_of):
            raise IndexError(f"slots must be in 0..{len(self._node_of) - 1}")
        self._flush()
        count, xor, z = self._holders.lookup_prefix(h)   # z: first block nobody holds
        if z == 0:
            return out
        depths = _probe.drop_depths(count, z)
        if len(depths) > MATCH_LEVELS:
            return self._match_search(h, s)
        bitmap_of = self._bitmap_of
        rows = np.array([bitmap_of.get(int(h[d - 1]), -1) if count[d - 1] >= 2 else -1 for d in depths.tolist()],
                        dtype=np.int64)
        _probe.walk_depths(h, s, count, xor, depths, rows, self._bits, self._keys, self._slots, _U64(self._bmask),
                           self._salt, out)
        return out

    def __len__(self) -> int:
        """Number of (node, block) pairs."""
        return self._live

    def memory_bytes(self) -> int:
        """Bytes held by the index's NumPy arrays; the table dominates. Per-node Python
        objects (id dict, salts as ints: ~200 bytes per node) are not counted."""
        return (self._keys.nbytes + self._slots.nbytes + self._counts.nbytes + self._salt.nbytes
                + self._holders.memory_bytes() + self._bits.nbytes)

    @property
    def capacity(self) -> int:
        """Table entries (a power of two)."""
        return len(self._keys)

    # -- holder bitmaps --------------------------------------------------------------------
    def _popular_min(self) -> int:
        """Holders a block needs to get a bitmap: bitmaps cost <= BITMAP_BYTES_PER_PAIR
        bytes per pair they cover."""
        return max(2, self._bits.shape[1] // BITMAP_BYTES_PER_PAIR)

    def _flush(self) -> None:
        """Applies the queued holder changes of small events."""
        if not self._pend_h:
            return
        h = np.array(self._pend_h, dtype=_U64)
        sv = np.array(self._pend_s, dtype=np.int64)
        self._pend_h, self._pend_s = [], []
        self._apply_holders(h, np.abs(sv) - 1, np.sign(sv))

    def _apply_holders(self, hashes: np.ndarray, slots: np.ndarray, signs: np.ndarray, distinct: bool = False) -> None:
        """Block ``hashes[i]`` gained (sign 1) or lost (-1) holder ``slots[i]``; the pair
        table already says so. Updates the holder counts, then the bitmaps: a block that
        reaches the popularity threshold gets one, one that falls below half of it (a
        hysteresis, so a block near the threshold does not rebuild it over and over)
        loses it, and the changed pairs of the others are re-read from the pair table."""
        u, after, net = self._holders.apply(hashes, slots, signs, distinct)
        need = self._popular_min()
        # Only these can have or need a bitmap: a block with one holder after a gain had
        # none before it (and bitmaps exist only for blocks with >= 2 holders).
        maybe = (after >= 2) | (net < 0) if self._bitmap_of else after >= need
        if not maybe.any():
            return
        u, after = u[maybe], after[maybe]
        popular = after >= need
        bitmap_of, low = self._bitmap_of, max(2, need // 2)
        grown, kept = [], []
        for h, c, pop in zip(u.tolist(), after.tolist(), popular.tolist()):
            row = bitmap_of.get(h)
            if row is None:
                if pop:
                    grown.append(h)
            elif c < low:
                del bitmap_of[h]
                self._bits[row] = 0
                self._free_rows.append(row)
            else:
                kept.append(h)
        if kept:
            on = np.isin(hashes, np.array(kept, dtype=_U64))
            h, sl = hashes[on], slots[on]
            held = self._present(h, sl)
            rows = np.array([bitmap_of[x] for x in h.tolist()], dtype=np.int64)
            byte, bit = sl >> 3, (1 << (sl & 7)).astype(np.uint8)
            # Clear every changed bit, then set the held ones (a pair may change twice).
            np.bitwise_and.at(self._bits, (rows, byte), ~bit)
            np.bitwise_or.at(self._bits, (rows[held], byte[held]), bit[held])
        if grown:
            self._build_bitmaps(grown)

    def _build_bitmaps(self, hashes: list[int]) -> None:
        """Bitmaps of ``hashes`` from the pair table: one probe per (block, live slot)."""
        live = np.flatnonzero(self._counts[: len(self._node_of)] > 0)
        h = np.repeat(np.array(hashes, dtype=_U64), live.size)
        sl = np.tile(live, len(hashes))
        held = self._present(h, sl).reshape(len(hashes), live.size)
        for i, blk in enumerate(hashes):
            if not self._free_rows:
                old = self._bits
                self._bits = np.zeros((max(16, 2 * old.shape[0]), old.shape[1]), np.uint8)
                self._bits[: old.shape[0]] = old
                self._free_rows.extend(range(old.shape[0], self._bits.shape[0])[::-1])
            row = self._free_rows.pop()
            self._bits[row] = 0
            on = live[held[i]]
            np.bitwise_or.at(self._bits[row], on >> 3, (1 << (on & 7)).astype(np.uint8))
            self._bitmap_of[blk] = row

    def _match_search(self, h: np.ndarray, s: np.ndarray) -> np.ndarray:
        """:meth:`match` by a search over depth per slot, probing the pair table only.

        The fallback for prompts along which the holder count drops at many depths. One
        probe batch for block 0 (slots that miss it, or hold nothing, stop at 0), then
        rounds that each probe ``k`` depths per open slot and keep the part of the range
        where held turns into not held. With many open slots ``k = 1`` (a binary search:
        ceil(log2(len(h))) rounds); with few, ``k`` grows so that a round probes
        ~MATCH_BATCH keys, since a NumPy batch costs ~50 us plus ~0.1 us per key.
        O(len(s) * log(len(h))) expected bucket reads, ~1.2 ms for 979 slots and 500
        blocks. With holes the result is a boundary: block ``m-1`` held, block ``m`` not.
        """
        out = np.zeros(s.size, dtype=np.int32)
        n = h.size
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

    def _insert(self, keys: np.ndarray, slots: np.ndarray, added_mask: np.ndarray | None = None) -> tuple[int, int]:
        """Inserts distinct (key, slot) pairs, skipping pairs already present; returns
        (entries added, of which reused tombstones), and sets ``added_mask[i]`` (if
        given) where pair ``i`` was added. The caller ensures room.

        Each pass reads one bucket per pending pair. A pair whose bucket has an EMPTY
        entry (the end of its probe sequence) but not the pair itself takes the first
        tombstone it passed, else that EMPTY entry. Pairs that lose a race for the same
        entry re-read their bucket on the next pass.
        """
        rows, tk, ts, bmask = self._rows, self._keys, self._slots, self._bmask
        b = (keys & _U64(bmask)).view(np.int64)
        step = np.zeros(keys.size, dtype=np.int64)     # probe step of each pair
        free = np.full(keys.size, -1, dtype=np.int64)  # first tombstone passed, if any
        orig = np.arange(keys.size)                    # each pending pair's index in the input
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
                if added_mask is not None:
                    added_mask[orig[winners]] = True
                done = present.copy()
                done[winners] = True
                # Losers forget their tombstone (contested or stale) and retry in place.
                free[e] = -1
            adv = ~present & ~has_empty
            step[adv] += 1
            b[adv] = (b[adv] + step[adv]) & bmask
            keep = ~done
            keys, slots, b, step, free = keys[keep], slots[keep], b[keep], step[keep], free[keep]
            orig = orig[keep]
        return added, reused

    def _delete(self, pos: np.ndarray) -> None:
        """Turns the live entries at ``pos`` into tombstones, or straight into EMPTY where
        their bucket has an EMPTY entry (then no probe sequence goes past that bucket)."""
        emptied = _delete_entries(self._keys, self._rows, pos)
        self._live -= pos.size
        self._used -= emptied

    def _rehash(self, need: int) -> None:
        """Rebuilds the table without tombstones, sized for ``need`` live entries at
        TARGET_LOAD (so it may shrink after mass removal). O(n log n) in live entries:
        sorted by home bucket, the first 8 entries of each bucket go straight in; the
        overflow (~2% at load 0.5) is inserted by ordinary probing."""
        cap = _table_capacity(need, self._min_capacity)
        live = np.flatnonzero(self._keys > TOMBSTONE)
        keys, slots = self._keys[live], self._slots[live]
        del live
        order, fits, pos = _place_by_home_bucket(keys, cap)
        keys, slots = keys[order], slots[order]
        del order
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
