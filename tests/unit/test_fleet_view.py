"""The router's fleet view: state updates into the index, pending work, approximate tracking."""

from __future__ import annotations

import numpy as np
import pytest

from kvfleet.controller.registry import ModelEntry, NodeEntry
from kvfleet.controller.router.fleet import ApproxCache, Fleet, NodeConn
from kvfleet.hashing import block_hashes
from kvfleet.v1 import common_pb2 as cpb
from kvfleet.v1 import node_pb2 as npb

MODEL = "m"


def fleet_with(node_id: str = "n1", tracking: str = "exact", num_blocks: int = 100) -> tuple[Fleet, NodeConn]:
    f = Fleet(None)
    entry = NodeEntry(node_id=node_id, address="127.0.0.1:1", joined_unix_ms=0, models=[ModelEntry(
        name=MODEL, block_size=16, num_blocks=num_blocks, max_model_len=4096, prefill_tokens_per_s=1000.0,
        decode_tokens_per_s=50.0, cache_tracking=tracking)])
    conn = NodeConn(entry=entry)
    f.nodes[node_id] = conn
    f.index.get_or_create(MODEL, 16).add_node(node_id)
    return f, conn


def update(seq: int, snapshot: bool = False, stored=(), removed=(), cleared=False, accepted=(), queued=0) -> npb.StateUpdate:
    u = npb.StateUpdate(seq=seq, snapshot=snapshot, ready=True, accepted_request_ids=list(accepted),
                        load=cpb.LoadSignals(queued_prefill_tokens=queued))
    if len(stored):
        u.stored.add(model=MODEL, block_size=16, block_hashes=[int(h) for h in stored])
    if len(removed):
        u.removed.add(model=MODEL, block_size=16, block_hashes=[int(h) for h in removed])
    if cleared:
        u.cleared_models.append(MODEL)
    return u


def matched(f: Fleet, hashes: np.ndarray, node_id: str = "n1") -> int:
    idx = f.index.get(MODEL, 16)
    return int(idx.match(hashes, np.array([idx.slot_of(node_id)]))[0])


def test_snapshot_replaces_and_deltas_apply_in_order():
    f, conn = fleet_with()
    h = block_hashes(list(range(160)), 16)
    f.apply_update(conn, update(5, snapshot=True, stored=h[:4]))
    assert matched(f, h) == 4 and conn.routable
    f.apply_update(conn, update(6, stored=h[4:8]))
    assert matched(f, h) == 8
    f.apply_update(conn, update(7, removed=h[6:8]))
    assert matched(f, h) == 6
    f.apply_update(conn, update(8, snapshot=True, stored=h[:2]))
    assert matched(f, h) == 2
    f.apply_update(conn, update(9, cleared=True))
    assert matched(f, h) == 0


def test_a_sequence_gap_is_an_error_so_the_stream_is_resubscribed():
    f, conn = fleet_with()
    f.apply_update(conn, update(1, snapshot=True))
    with pytest.raises(ConnectionError):
        f.apply_update(conn, update(3))


def test_pending_tokens_count_until_the_node_reports_the_request_accepted():
    f, conn = fleet_with()
    f.apply_update(conn, update(1, snapshot=True, queued=100))
    f.add_pending("n1", "r1", 700)
    assert f.views(MODEL)[0].queued_prefill_tokens == 800
    f.apply_update(conn, update(2, accepted=["r1"], queued=800))
    assert f.views(MODEL)[0].queued_prefill_tokens == 800  # now counted once, by the node
    f.drop_pending("n1", "r1")
    assert conn.pending_tokens == 0


def test_suspect_node_is_unroutable_until_its_next_state_update():
    f, conn = fleet_with()
    f.apply_update(conn, update(1, snapshot=True))
    f.mark_suspect("n1")
    assert not f.views(MODEL)[0].routable
    f.apply_update(conn, update(2))
    assert f.views(MODEL)[0].routable


def test_admin_state_makes_a_node_unroutable():
    f, conn = fleet_with()
    f.apply_update(conn, update(1, snapshot=True))
    conn.admin = "cordoned"
    assert not f.views(MODEL)[0].routable


def test_approximate_nodes_learn_routed_prompts_and_exact_nodes_do_not():
    f, conn = fleet_with(tracking="approximate")
    h = block_hashes(list(range(320)), 16)
    f.learn("n1", MODEL, h[:10])
    assert matched(f, h) == 10
    g, gconn = fleet_with(tracking="exact")
    g.learn("n1", MODEL, h[:10])
    assert matched(g, h) == 0


def test_approximate_cache_is_bounded_by_capacity_lru_first():
    c = ApproxCache(capacity=3, ttl_s=100)
    stored, dropped = c.learn(np.array([1, 2, 3], dtype=np.uint64), now=0)
    assert dropped == [] and len(c) == 3
    _, dropped = c.learn(np.array([1], dtype=np.uint64), now=1)   # 1 becomes most recent
    _, dropped = c.learn(np.array([4], dtype=np.uint64), now=2)
    assert dropped == [2] and len(c) == 3


def test_approximate_cache_forgets_entries_older_than_the_ttl():
    c = ApproxCache(capacity=10, ttl_s=5)
    c.learn(np.array([1, 2], dtype=np.uint64), now=0)
    _, dropped = c.learn(np.array([3], dtype=np.uint64), now=6)
    assert dropped == [1, 2] and len(c) == 1


def test_a_broken_state_stream_drops_the_nodes_blocks_and_learned_cache():
    f, conn = fleet_with(tracking="approximate")
    h = block_hashes(list(range(160)), 16)
    f.apply_update(conn, update(1, snapshot=True))
    f.learn("n1", MODEL, h)
    f._disconnect(conn)
    assert matched(f, h) == 0 and not conn.routable and len(conn.approx) == 0
