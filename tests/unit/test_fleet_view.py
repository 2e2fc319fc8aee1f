"""The router's fleet view: state updates into the index, pending work, approximate tracking."""

from __future__ import annotations

import asyncio
import dataclasses

import numpy as np
import pytest

from kvfleet.controller.registry import ModelEntry, NodeEntry
from kvfleet.controller.router import fleet as fleet_module
from kvfleet.controller.router.fleet import ApproxCache, Fleet, NodeConn
from kvfleet.controller.router.mux import CallMux, NodeMux
from kvfleet.controller.router.nodes import NodeTable, NodeView
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
    f._sync(conn)     # as Fleet._upsert does
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


def test_approximate_nodes_learn_routed_prompts():
    f, conn = fleet_with(tracking="approximate")
    h = block_hashes(list(range(320)), 16)
    f.learn("n1", MODEL, h[:10])
    assert matched(f, h) == 10


def test_exact_nodes_hold_a_routed_prompt_provisionally_until_their_events_confirm_it(monkeypatch):
    h = block_hashes(list(range(320)), 16)
    f, conn = fleet_with(tracking="exact")
    f.apply_update(conn, update(1, snapshot=True, stored=h[:4]))      # held, from events
    f.learn("n1", MODEL, h[:10])                                       # first token of a routed prompt
    assert matched(f, h) == 10 and list(conn.provisional[MODEL]) == [int(x) for x in h[4:10]]
    idx = f.index.get(MODEL, 16)
    stored = []
    store = type(idx).store
    monkeypatch.setattr(type(idx), "store", lambda self, slot, hs: (stored.append([int(x) for x in hs]), store(self, slot, hs)))
    f.apply_update(conn, update(2, stored=[*h[4:7], *h[12:14]]))      # the node's events confirm three, add two
    assert list(conn.provisional[MODEL]) == [int(x) for x in h[7:10]]
    assert stored == [[int(x) for x in h[12:14]]]                      # the confirmed three are not stored again
    assert all(idx.contains(idx.slot_of("n1"), x) for x in h[12:14])
    monkeypatch.undo()
    f.apply_update(conn, update(3))                                    # not due yet: still held
    assert matched(f, h) == 10
    # A snapshot replaces everything, provisional blocks included.
    f.learn("n1", MODEL, h)
    assert matched(f, h) == len(h)
    f.apply_update(conn, update(4, snapshot=True, stored=h[:2]))
    assert matched(f, h) == 2 and conn.provisional == {}
    # So does losing the state stream.
    f.learn("n1", MODEL, h)
    f._disconnect(conn)
    assert matched(f, h) == 0 and conn.provisional == {}

    # Blocks the node's events never confirm leave the index with its next update past their time.
    monkeypatch.setattr(fleet_module, "PROVISIONAL_S", 0.0)
    g, gconn = fleet_with(tracking="exact")
    g.apply_update(gconn, update(1, snapshot=True, stored=h[:4]))
    g.learn("n1", MODEL, h[:10])
    assert matched(g, h) == 10
    g.apply_update(gconn, update(2, stored=h[4:6]))                   # two confirmed, the rest due
    assert matched(g, h) == 6 and gconn.provisional == {}


def test_approximate_cache_is_bounded_by_capacity_lru_first():
    c = ApproxCache(capacity=3, ttl_s=100)
    stored, dropped = c.learn(np.array([1, 2, 3], dtype=np.uint64), now=0)
    assert dropped == [] and len(c) == 3
    _, dropped = c.learn(np.array([2], dtype=np.uint64), now=1)   # 2 becomes most recent
    _, dropped = c.learn(np.array([4], dtype=np.uint64), now=2)
    # Within a prompt the tail is older than the head (a node keeps a prompt's head longest,
    # and a set with gaps would break the index's prefix walk): 3 goes first.
    assert dropped == [3] and len(c) == 3


def test_approximate_cache_forgets_entries_older_than_the_ttl():
    c = ApproxCache(capacity=10, ttl_s=5)
    c.learn(np.array([1, 2], dtype=np.uint64), now=0)
    _, dropped = c.learn(np.array([3], dtype=np.uint64), now=6)
    assert dropped == [2, 1] and len(c) == 1   # the tail first


def test_a_broken_state_stream_drops_the_nodes_blocks_and_learned_cache():
    f, conn = fleet_with(tracking="approximate")
    h = block_hashes(list(range(160)), 16)
    f.apply_update(conn, update(1, snapshot=True))
    f.learn("n1", MODEL, h)
    f._disconnect(conn)
    assert matched(f, h) == 0 and not conn.routable and len(conn.approx) == 0


def test_a_nodes_serve_level_is_what_its_state_stream_last_said():
    f, conn = fleet_with()
    old = update(1, snapshot=True)             # a node agent from before ServeRequest.more
    f.apply_update(conn, old)
    assert conn.serve_level == 0
    new = update(1, snapshot=True)
    new.serve_level = 1
    f.apply_update(conn, new)
    assert conn.serve_level == 1
    f._disconnect(conn)                        # whatever runs there after a restart must say it again
    assert conn.serve_level == 0


def test_provisional_blocks_never_cover_blocks_the_node_already_holds(monkeypatch):
    """Sets with gaps (an eviction order the index does not assume, an approximate node
    sharing the blocks) must not make a held block provisional: its time running out would
    drop it for good, since the engine, holding it, sends no new event for it."""
    monkeypatch.setattr(fleet_module, "PROVISIONAL_S", 0.0)
    h = block_hashes(list(range(320)), 16)
    f, x = fleet_with("x")
    _, y = fleet_with("y")
    f.nodes["y"] = y
    f.index.get_or_create(MODEL, 16).add_node("y")
    f._sync(y)
    f.apply_update(x, update(1, snapshot=True, stored=h[:6]))
    f.apply_update(y, update(1, snapshot=True, stored=h[4:10]))      # a gap: the head evicted
    f.apply_update(x, update(2, stored=h[8:9]))                       # and x holds one deeper block
    f.learn("x", MODEL, h[:10])
    assert sorted(x.provisional[MODEL]) == sorted(int(b) for b in (*h[6:8], h[9]))
    f.apply_update(x, update(3))                                      # unconfirmed: dropped
    idx = f.index.get(MODEL, 16)
    assert x.provisional == {}
    assert idx.holds(idx.slot_of("x"), h[:10]).tolist() == [True] * 6 + [False, False, True, False]


class _Call:
    def __init__(self) -> None:
        self.done = False

    def __aiter__(self):
        return self

    async def __anext__(self):
        while not self.done:
            await asyncio.sleep(0.01)
        raise StopAsyncIteration

    def cancel(self) -> None:
        self.done = True


class _Stub:
    def Serve(self, requests):
        return _Call()

    def Generate(self, request):
        return _Call()


async def test_one_call_per_request_ends_only_for_a_node_restarted_with_serve():
    f, conn = fleet_with()
    conn.stub = _Stub()
    conn.mux = CallMux(conn.stub, "n1")              # the node answered Serve with UNIMPLEMENTED
    f.apply_update(conn, update(1, snapshot=True))   # its stream's snapshot came before that...
    conn.snapshot_at = conn.mux.created_at - 1.0
    conn.set_serve_level(1)                          # ...so a level of 1 now is stale: keep the calls
    old = conn.mux
    conn.stream(npb.NodeGenerateRequest(request_id="a"))
    assert conn.mux is old
    f.apply_update(conn, update(1, snapshot=True))   # resubscribed after a restart: a new snapshot
    upd = update(2)
    upd.serve_level = 1
    f.apply_update(conn, upd)
    conn.stream(npb.NodeGenerateRequest(request_id="b"))
    assert isinstance(conn.mux, NodeMux) and conn.mux.batches
    await conn.mux.close()
    await old.close()


# -- the node table the router's decisions read ---------------------------------------------
def as_rows(nodes) -> list[NodeView]:
    return sorted(nodes, key=lambda v: v.node_id)


def test_columns_follow_every_state_change_exactly_as_views_do():
    f, conn = fleet_with("n1")
    g_entry = NodeEntry(node_id="n2", address="127.0.0.1:2", joined_unix_ms=0, models=[ModelEntry(
        name=MODEL, block_size=16, num_blocks=50, max_model_len=4096, prefill_tokens_per_s=2000.0,
        decode_tokens_per_s=40.0, cache_tracking="exact")])
    conn2 = NodeConn(entry=g_entry)
    f.nodes["n2"] = conn2
    f.index.get_or_create(MODEL, 16).add_node("n2")
    f._sync(conn2)
    assert as_rows(f.columns(MODEL)) == as_rows(f.views(MODEL))
    steps = [
        lambda: f.apply_update(conn, update(1, snapshot=True, queued=100)),
        lambda: f.apply_update(conn2, update(1, snapshot=True, queued=7)),
        lambda: f.add_pending("n1", "r1", 700),
        lambda: f.mark_suspect("n2"),
        lambda: f.apply_update(conn2, update(2, queued=3)),
        lambda: f._set_admin("n1", "cordoned"),
        lambda: f.drop_pending("n1", "r1"),
        lambda: f._set_admin("n1", ""),
        lambda: f._disconnect(conn2),
    ]
    for step in steps:
        step()
        assert as_rows(f.columns(MODEL)) == as_rows(f.views(MODEL))
    assert f.columns(MODEL)[f.columns(MODEL).row_of("n1")].queued_prefill_tokens == 100


def test_a_removed_node_leaves_the_table_and_its_late_updates_are_ignored():
    f, conn = fleet_with("n1")
    f.apply_update(conn, update(1, snapshot=True))
    assert [v.node_id for v in f.columns(MODEL)] == ["n1"]
    f.nodes.pop("n1")
    f.columns(MODEL).remove("n1")
    f.add_pending("n1", "r1", 5)
    f._sync(conn)
    assert len(f.columns(MODEL)) == 0


def test_node_table_upsert_update_remove_take_and_id_order():
    views = [NodeView(node_id=n, address=f"{n}:1", routable=True, block_size=16, num_blocks=10,
                      prefill_tokens_per_s=1.0, decode_tokens_per_s=1.0, running=i, waiting=0, kv_usage=0.0,
                      queued_prefill_tokens=10 * i, cached_blocks=0, slot=i) for i, n in enumerate("dbca")]
    t = NodeTable.from_views(views)
    assert list(t) == views and t.id_rank.tolist() == [3, 1, 2, 0]
    t.update("b", running=9, routable=False)
    assert t[1].running == 9 and not t[1].routable
    t.remove("d")                                   # the last row ("a") moves into row 0
    assert [v.node_id for v in t] == ["a", "b", "c"] and t.id_rank.tolist() == [0, 1, 2]
    t.upsert(dataclasses.replace(views[0], node_id="e", slot=7))
    assert t[3].node_id == "e" and t.slot.tolist() == [3, 1, 2, 7]
    sub = t.take(np.array([3, 0]))
    assert [v.node_id for v in sub] == ["e", "a"] and sub.id_rank.tolist() == [1, 0]
    assert t[-1] == t[3] and t[1:3] == [t[1], t[2]]
    for _ in range(40):                             # growth keeps every row
        t.upsert(dataclasses.replace(views[0], node_id=f"z{_:02d}"))
    assert len(t) == 44 and t.row_of("e") == 3 and t[3].slot == 7


def test_decode_step_step_budget_and_requests_sent_but_not_yet_shown_reach_the_table():
    f, conn = fleet_with()
    conn.entry.models[0].max_num_batched_tokens = 4096
    u = update(1, snapshot=True)
    u.load.running, u.load.waiting, u.load.decode_step_s = 3, 2, 0.025
    f.apply_update(conn, u)
    f.add_pending("n1", "r1", 100)
    f.add_pending("n1", "r2", 50)
    t = f.columns(MODEL)
    assert (t.running[0], t.waiting[0], t.queued_prefill_tokens[0]) == (3, 2 + 2, 150)
    assert t.decode_step_s[0] == pytest.approx(0.025) and t.max_num_batched_tokens[0] == 4096
    f.apply_update(conn, update(2, accepted=["r1"]))             # the node now counts r1 itself
    assert (t.waiting[0], t.queued_prefill_tokens[0], t.decode_step_s[0]) == (0 + 1, 50, 0.0)


def test_work_since_is_the_report_that_showed_queued_prefill_or_the_first_send_after_an_idle_one(monkeypatch):
    clock = [100.0]
    monkeypatch.setattr("kvfleet.controller.router.fleet.time.monotonic", lambda: clock[0])
    f, conn = fleet_with()
    t = f.columns(MODEL)
    f.apply_update(conn, update(1, snapshot=True))                 # idle report at 100.0
    assert t.work_since_s[0] == float("inf")
    clock[0] = 100.5
    f.add_pending("n1", "r1", 300)                                 # sent at 100.5: work from then on
    clock[0] = 100.7
    f.add_pending("n1", "r2", 200)
    assert t.work_since_s[0] == 100.5
    clock[0] = 101.0
    f.apply_update(conn, update(2, accepted=["r1"]))               # idle report, r2 still unshown
    assert t.work_since_s[0] == 100.7
    clock[0] = 101.2
    f.apply_update(conn, update(3, accepted=["r2"], queued=400))   # the node now reports queued prefill
    assert t.work_since_s[0] == 101.2
    clock[0] = 101.4
    f.apply_update(conn, update(4))                                # idle again, nothing pending
    assert t.work_since_s[0] == float("inf")
