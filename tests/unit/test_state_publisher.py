"""The node's state stream: snapshot then sequenced updates, and a bounded backlog."""

from __future__ import annotations

from kvfleet.node_agent.block_tracker import BlockTracker
from kvfleet.node_agent.engine import LoadSnapshot
from kvfleet.node_agent.kv_events import BlockStored, KVEventBatch
from kvfleet.node_agent.state import StatePublisher
from kvfleet.hashing import block_hashes


def publisher(**kw) -> StatePublisher:
    return StatePublisher({"m": BlockTracker("m", 4)}, load=lambda: LoadSnapshot(0, 0, 0.0, 0),
                          ready=lambda: True, inflight=lambda: 0, **kw)


def stored(tokens: list[int], hashes: list[int], parent=None) -> KVEventBatch:
    return KVEventBatch(ts=0.0, events=[BlockStored(block_hashes=hashes, parent_block_hash=parent,
                                                     token_ids=tokens, block_size=4, lora_id=None, medium="GPU")])


async def test_a_subscriber_gets_a_snapshot_then_every_update_in_sequence():
    pub = publisher()
    pub.on_kv_events("m", 0, stored(list(range(8)), [11, 12]))
    pub.publish()  # (no subscriber yet: re-sending blocks a snapshot holds would be harmless, but not exact)
    stream = pub.subscribe()
    snap = await stream.__anext__()
    assert snap.snapshot and snap.stored["m"] == [int(h) for h in block_hashes(list(range(8)), 4)]
    pub.on_kv_events("m", 1, stored(list(range(8, 12)), [13], parent=12))
    pub.on_accepted("r1")
    pub.publish()
    upd = await stream.__anext__()
    assert upd.seq == snap.seq + 1 and not upd.snapshot
    assert upd.stored["m"] == [int(block_hashes(list(range(12)), 4)[2])]
    assert upd.accepted == ["r1"]


async def test_a_store_then_remove_in_one_window_nets_out_to_the_last_operation():
    from kvfleet.node_agent.kv_events import BlockRemoved

    pub = publisher()
    stream = pub.subscribe()
    await stream.__anext__()
    pub.on_kv_events("m", 0, stored([1, 2, 3, 4], [21]))
    pub.on_kv_events("m", 1, KVEventBatch(ts=0.0, events=[BlockRemoved(block_hashes=[21], medium="GPU")]))
    pub.publish()
    upd = await stream.__anext__()
    h = int(block_hashes([1, 2, 3, 4], 4)[0])
    assert upd.removed == {"m": [h]} and upd.stored == {}


async def test_a_subscriber_that_falls_too_far_behind_has_its_stream_ended():
    pub = publisher(max_backlog=3)
    stream = pub.subscribe()
    await stream.__anext__()
    for _ in range(5):
        pub.publish()
    rest = [u async for u in stream]
    assert rest == []  # ended: the router resubscribes and starts from a fresh snapshot
