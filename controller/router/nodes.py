"""The node table: every candidate node of one model as columns (struct of arrays).

A policy reads a whole column at once (``table.queued_prefill_tokens`` is an int64 array
with one entry per node), so ranking 1,000 nodes builds no per-node Python object. The
router's fleet view keeps one table per model and writes a node's row when that node's
state changes (O(1) per update); the simulator and the tests build one from
:class:`NodeView` s (:meth:`NodeTable.from_views`, O(n)).

A table is also a ``Sequence[NodeView]``: ``table[i]`` materialises row ``i`` as a frozen
:class:`NodeView`, so code written against lists of views keeps working (slowly).

Rows are in no particular order (a removal moves the last row into the hole). Ties
between nodes are broken by ``id_rank``, each row's rank in node-id order, recomputed
when a node joins or leaves (O(n log n), rare). The id list and ``id_rank`` are replaced,
never edited, when nodes join or leave, so a ranking may keep references to them; the
numeric columns are edited in place (a ranking copies what it keeps of them).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Iterable, Iterator, Sequence, overload

import numpy as np


@dataclass(frozen=True, slots=True)
class NodeView:
    """A frozen view of one candidate node, as the router last saw it."""

    node_id: str
    address: str                  # host:port of the node agent
    routable: bool                # ready, not cordoned/draining/drained
    block_size: int               # tokens per KV block
    num_blocks: int               # KV capacity, blocks
    prefill_tokens_per_s: float   # prefill throughput, tokens/s
    decode_tokens_per_s: float    # decode speed of one sequence, tokens/s
    running: int                  # sequences in the running (decode) batch
    waiting: int                  # requests queued in the engine
    kv_usage: float               # fraction of KV blocks in use, 0..1
    queued_prefill_tokens: int    # node-reported queue + tokens sent that it does not show yet
    cached_blocks: int            # blocks in the node's prefix cache
    slot: int                     # the node's slot in the PrefixIndex (-1 if none)
    decode_step_s: float = 0.0    # one decode step at the node's current batch, s (0: idle or unknown)
    max_num_batched_tokens: int = 0  # the engine's token budget per step (0: unknown)
    max_num_seqs: int = 0         # most sequences the engine runs at once (0: unknown)
    work_since_s: float = float("inf")  # since when the node has had queued prefill, as far as the
                                        # router knows (its clock; inf: none)


COLUMNS: dict[str, type] = {
    "routable": np.bool_,
    "block_size": np.int64,
    "num_blocks": np.int64,
    "prefill_tokens_per_s": np.float64,
    "decode_tokens_per_s": np.float64,
    "running": np.int64,
    "waiting": np.int64,
    "kv_usage": np.float64,
    "queued_prefill_tokens": np.int64,
    "cached_blocks": np.int64,
    "slot": np.int64,
    "decode_step_s": np.float64,
    "max_num_batched_tokens": np.int64,
    "max_num_seqs": np.int64,
    "work_since_s": np.float64,
}
"""The numeric :class:`NodeView` fields, each one column of this dtype."""
assert set(COLUMNS) | {"node_id", "address"} == {f.name for f in fields(NodeView)}


class NodeTable(Sequence[NodeView]):
    """Columns of node state, one row per node; see the module docstring.

    Column attributes (``routable``, ``slot``, ...) are NumPy views of the live rows:
    read them, and write through :meth:`upsert` / :meth:`update` only.
    """

    __slots__ = ("_cols", "_ids", "_addresses", "_row_of", "_n", "_id_rank")

    def __init__(self, capacity: int = 16) -> None:
        cap = max(capacity, 1)
        self._cols = {name: np.zeros(cap, dtype) for name, dtype in COLUMNS.items()}
        self._ids: list[str] = []
        self._addresses: list[str] = []
        self._row_of: dict[str, int] = {}
        self._n = 0
        self._id_rank = np.zeros(0, np.int64)

    @classmethod
    def from_views(cls, views: Iterable[NodeView]) -> NodeTable:
        """A table of ``views``, in their order (O(n) Python: for the simulator and tests)."""
        views = list(views)
        t = cls(len(views))
        n = len(views)
        for name, dtype in COLUMNS.items():
            t._cols[name][:n] = np.fromiter((getattr(v, name) for v in views), dtype, n)
        t._ids = [v.node_id for v in views]
        t._addresses = [v.address for v in views]
        t._row_of = {nid: i for i, nid in enumerate(t._ids)}
        if len(t._row_of) != n:
            raise ValueError("node ids must be unique")
        t._n = n
        t._rerank()
        return t

    # -- writes (the fleet view's; O(1) unless a node joins or leaves) ---------------------
    def upsert(self, view: NodeView) -> int:
        """Writes ``view`` into its node's row, adding the row if the node is new; returns it."""
        row = self._row_of.get(view.node_id)
        if row is None:
            row = self._n
            if row == len(self._cols["slot"]):
                self._grow(2 * row)
            self._n += 1
            self._ids = [*self._ids, view.node_id]
            self._addresses.append(view.address)
            self._row_of[view.node_id] = row
            self._rerank()
        else:
            self._addresses[row] = view.address
        for name, col in self._cols.items():
            col[row] = getattr(view, name)
        return row

    def update(self, node_id: str, **values: float | int | bool) -> None:
        """Sets some numeric fields of ``node_id``'s row. O(len(values))."""
        row = self._row_of[node_id]
        cols = self._cols
        for name, value in values.items():
            cols[name][row] = value

    def remove(self, node_id: str) -> None:
        """Drops ``node_id``'s row (the last row moves into it). Unknown ids are ignored."""
        row = self._row_of.pop(node_id, None)
        if row is None:
            return
        last = self._n - 1
        ids = self._ids[:last]
        if row != last:
            for col in self._cols.values():
                col[row] = col[last]
            ids[row], self._addresses[row] = self._ids[last], self._addresses[last]
            self._row_of[ids[row]] = row
        self._ids = ids
        self._addresses.pop()
        self._n = last
        self._rerank()

    # -- reads -----------------------------------------------------------------------------
    def __len__(self) -> int:
        return self._n

    @overload
    def __getitem__(self, i: int) -> NodeView: ...
    @overload
    def __getitem__(self, i: slice) -> list[NodeView]: ...
    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(self._n))]
        if i < 0:
            i += self._n
        if not 0 <= i < self._n:
            raise IndexError(i)
        vals = {name: col[i].item() for name, col in self._cols.items()}
        return NodeView(node_id=self._ids[i], address=self._addresses[i], **vals)

    def __iter__(self) -> Iterator[NodeView]:
        return (self[i] for i in range(self._n))

    def row_of(self, node_id: str) -> int | None:
        return self._row_of.get(node_id)

    def node_id(self, row: int) -> str:
        return self._ids[row]

    @property
    def node_ids(self) -> list[str]:
        """Node ids by row (the table's own list: do not mutate)."""
        return self._ids

    @property
    def id_rank(self) -> np.ndarray:
        """Each row's rank in node-id order (0 = smallest id)."""
        return self._id_rank

    def take(self, rows: np.ndarray) -> NodeTable:
        """A new table of ``rows`` (in that order), e.g. a model's nodes minus excluded ones."""
        rows = np.asarray(rows, dtype=np.int64)
        t = NodeTable(rows.size)
        for name, col in self._cols.items():
            t._cols[name][: rows.size] = col[rows]
        t._ids = [self._ids[r] for r in rows.tolist()]
        t._addresses = [self._addresses[r] for r in rows.tolist()]
        t._row_of = {nid: i for i, nid in enumerate(t._ids)}
        t._n = rows.size
        t._rerank()
        return t

    def _grow(self, cap: int) -> None:
        for name, col in self._cols.items():
            new = np.zeros(cap, col.dtype)
            new[: self._n] = col[: self._n]
            self._cols[name] = new

    def _rerank(self) -> None:
        order = sorted(range(self._n), key=self._ids.__getitem__)
        rank = np.empty(self._n, np.int64)
        rank[order] = np.arange(self._n)
        self._id_rank = rank

    def __repr__(self) -> str:
        return f"NodeTable({self._n} nodes)"


def _column(name: str) -> property:
    def get(self: NodeTable) -> np.ndarray:
        return self._cols[name][: self._n]

    get.__doc__ = f"``{name}`` of every row (a view)."
    return property(get)


for _name in COLUMNS:
    setattr(NodeTable, _name, _column(_name))
