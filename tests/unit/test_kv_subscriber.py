"""KVEventSubscriber against in-process ZMQ sockets speaking vLLM 0.32's protocol, on loopback.

The publisher side is an XPUB socket: on the wire it is vLLM's PUB, and it also tells
the test when the subscription has arrived, so no batch is lost to a slow join.
Payloads are built as raw msgpack in the exact shape vLLM 0.32 encodes
(``vllm/distributed/kv_events.py``: the batch an array, each event a tagged map with
every field present), independently of our own structs.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import tempfile

import msgspec
import pytest
import zmq
import zmq.asyncio

from kvfleet.node_agent.kv_events import AllBlocksCleared, BlockRemoved, BlockStored, KVEventBatch, encode_batch
from kvfleet.node_agent.kv_subscriber import END_SEQ, KVEventSubscriber, publisher_binds

pytestmark = pytest.mark.timeout(20)

TOPIC = "kv"


def vllm_payload(seq: int) -> bytes:
    """One batch as vLLM 0.32 puts it on the wire: a BlockStored of one 4-token block, then a
    BlockRemoved of an older block. Distinct per ``seq``."""
    stored = {
        "type": "BlockStored", "block_hashes": [1000 + seq], "parent_block_hash": None if seq == 0 else 999 + seq,
        "token_ids": [seq, seq + 1, seq + 2, seq + 3], "block_size": 4, "lora_id": None, "medium": "GPU",
        "lora_name": None, "extra_keys": [None], "group_idx": 0, "kv_cache_spec_kind": "full_attention",
        "kv_cache_spec_sliding_window": None, "locality": None, "ownership": None, "session_id": None,
    }
    removed = {"type": "BlockRemoved", "block_hashes": [2000 + seq], "medium": "GPU", "group_idx": 0,
               "locality": None, "ownership": None}
    return msgspec.msgpack.encode([1700000000.0 + seq, [stored, removed], 0])


def frames(seq: int, payload: bytes | None = None, topic: str = TOPIC) -> list[bytes]:
    return [topic.encode(), seq.to_bytes(8, "big"), vllm_payload(seq) if payload is None else payload]


class Recorder:
    def __init__(self) -> None:
        self.got: list[tuple[int, KVEventBatch]] = []
        self.more = asyncio.Event()

    def __call__(self, seq: int, batch: KVEventBatch) -> None:
        self.got.append((seq, batch))
        self.more.set()

    @property
    def seqs(self) -> list[int]:
        return [s for s, _ in self.got]

    async def wait_for(self, n: int, timeout: float = 3.0) -> None:
        async def _wait():
            while len(self.got) < n:
                self.more.clear()
                await self.more.wait()
        await asyncio.wait_for(_wait(), timeout)


@pytest.fixture
async def ctx():
    c = zmq.asyncio.Context()
    yield c
    c.destroy(linger=0)


async def xpub(ctx: zmq.asyncio.Context, *, connect: str | None = None, bind: str | None = None):
    """vLLM's PUB as an XPUB, connected or bound; ``wait_subscribed`` then sees our subscription."""
    pub = ctx.socket(zmq.XPUB)
    pub.setsockopt(zmq.LINGER, 0)
    if connect:
        pub.connect(connect)
    if bind:
        pub.bind(bind)
    return pub


async def wait_subscribed(pub: zmq.asyncio.Socket) -> None:
    msg = await asyncio.wait_for(pub.recv(), 3.0)
    assert msg[:1] == b"\x01"   # a subscribe message (unsubscribes start with 0)


@contextlib.asynccontextmanager
async def subscriber(**kw):
    rec = Recorder()
    sub = KVEventSubscriber(kw.pop("endpoint", "tcp://127.0.0.1:0"), rec, topic=kw.pop("topic", TOPIC), **kw)
    await sub.start()
    try:
        yield sub, rec
    finally:
        await sub.close()


async def fake_replay_router(ctx: zmq.asyncio.Context, buffer: dict[int, bytes], requests: list[int]):
    """vLLM's replay ROUTER (``ZmqEventPublisher._service_replay``), serving ``buffer``."""
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    router.bind("tcp://127.0.0.1:0")
    endpoint = router.getsockopt_string(zmq.LAST_ENDPOINT)

    async def serve():
        while True:
            frame = await router.recv_multipart()
            if len(frame) != 3:
                continue
            client_id, _, start_seq_bytes = frame
            start = int.from_bytes(start_seq_bytes, "big")
            requests.append(start)
            for seq in sorted(buffer):
                if seq >= start:
                    await router.send_multipart([client_id, b"", TOPIC.encode(), seq.to_bytes(8, "big"), buffer[seq]])
            await router.send_multipart([client_id, b"", b"", END_SEQ, b""])

    task = asyncio.create_task(serve())
    return endpoint, task, router


# ---------------------------------------------------------------- endpoints


@pytest.mark.parametrize("endpoint, vllm_binds, we_dial", [
    ("tcp://127.0.0.1:5557", False, "tcp://127.0.0.1:5557"),
    ("tcp://*:5557", True, "tcp://127.0.0.1:5557"),
    ("tcp://[::]:5557", True, "tcp://[::1]:5557"),
    ("ipc:///tmp/kv.sock", True, "ipc:///tmp/kv.sock"),
])
def test_who_binds_follows_vllms_rule(endpoint, vllm_binds, we_dial):
    assert publisher_binds(endpoint) is vllm_binds
    assert KVEventSubscriber(endpoint, lambda s, b: None).endpoint == we_dial


# ---------------------------------------------------------------- delivery


async def test_plain_tcp_endpoint_is_bound_and_vllm_batches_arrive_in_order_with_their_seq(ctx):
    async with subscriber() as (sub, rec):
        assert sub.endpoint.startswith("tcp://127.0.0.1:") and not sub.endpoint.endswith(":0")
        pub = await xpub(ctx, connect=sub.endpoint)   # vLLM's PUB connects to us
        await wait_subscribed(pub)
        assert await sub.wait_connected(1.0)
        for seq in range(3):
            await pub.send_multipart(frames(seq))
        await rec.wait_for(3)

    assert rec.seqs == [0, 1, 2]
    first = rec.got[0][1]
    assert first.ts == 1700000000.0 and first.data_parallel_rank == 0
    assert first.events == [
        BlockStored(block_hashes=[1000], parent_block_hash=None, token_ids=[0, 1, 2, 3], block_size=4,
                    lora_id=None, medium="GPU", lora_name=None, extra_keys=[None], group_idx=0,
                    kv_cache_spec_kind="full_attention"),
        BlockRemoved(block_hashes=[2000], medium="GPU", group_idx=0),
    ]
    assert sub.last_seq == 2 and sub.stats.delivered == 3 and sub.stats.missed == 0


async def test_ipc_endpoint_bound_by_vllm_is_connected_to(ctx):
    with tempfile.TemporaryDirectory() as d:
        endpoint = f"ipc://{os.path.join(d, 'kv.sock')}"
        pub = await xpub(ctx, bind=endpoint)          # vLLM binds ipc endpoints
        async with subscriber(endpoint=endpoint) as (sub, rec):
            await wait_subscribed(pub)
            await pub.send_multipart(frames(0))
            await rec.wait_for(1)
        assert rec.seqs == [0]


async def test_batches_of_another_topic_sharing_the_prefix_are_ignored(ctx):
    async with subscriber() as (sub, rec):
        pub = await xpub(ctx, connect=sub.endpoint)
        await wait_subscribed(pub)
        await pub.send_multipart(frames(0, topic="kv2"))
        await pub.send_multipart(frames(0))
        await rec.wait_for(1)
        await asyncio.sleep(0.05)
    assert rec.seqs == [0] and sub.stats.malformed == 0


async def test_malformed_messages_are_logged_and_skipped_and_the_stream_goes_on(ctx, caplog):
    async with subscriber() as (sub, rec):
        pub = await xpub(ctx, connect=sub.endpoint)
        await wait_subscribed(pub)
        await pub.send_multipart(frames(0))
        await pub.send_multipart([TOPIC.encode(), (1).to_bytes(8, "big")])          # two frames
        await pub.send_multipart([TOPIC.encode(), b"\x00" * 7, vllm_payload(1)])    # short seq frame
        await pub.send_multipart(frames(1, payload=b"\xc1not msgpack"))             # undecodable
        await pub.send_multipart(frames(2, payload=msgspec.msgpack.encode([1.0, [{"type": "Nope"}], 0])))
        await pub.send_multipart(frames(3))
        await rec.wait_for(2)

    assert rec.seqs == [0, 3]
    assert sub.stats.malformed == 4
    # An undecodable batch is lost history, but the numbering goes on: no gap is reported after it.
    assert sub.stats.missed == 0
    assert "malformed" in caplog.text


async def test_an_exception_in_the_sink_is_logged_and_the_stream_goes_on(ctx, caplog):
    got = []

    def sink(seq, batch):
        got.append(seq)
        if seq == 0:
            raise ValueError("tracker rejected the batch")

    sub = KVEventSubscriber("tcp://127.0.0.1:0", sink, topic=TOPIC)
    await sub.start()
    try:
        pub = await xpub(ctx, connect=sub.endpoint)
        await wait_subscribed(pub)
        await pub.send_multipart(frames(0))
        await pub.send_multipart(frames(1))
        for _ in range(100):
            if len(got) == 2:
                break
            await asyncio.sleep(0.01)
    finally:
        await sub.close()
    assert got == [0, 1]
    assert "sink failed on batch 0" in caplog.text


async def test_our_encoded_batches_decode_too(ctx):
    ours = KVEventBatch(ts=5.0, events=[AllBlocksCleared()])
    async with subscriber() as (sub, rec):
        pub = await xpub(ctx, connect=sub.endpoint)
        await wait_subscribed(pub)
        await pub.send_multipart(frames(7, payload=encode_batch(ours)))
        await rec.wait_for(1)
    assert rec.got == [(7, ours)]


# ---------------------------------------------------------------- gaps and replay


async def test_gap_without_replay_endpoint_is_delivered_as_is(ctx):
    async with subscriber() as (sub, rec):
        pub = await xpub(ctx, connect=sub.endpoint)
        await wait_subscribed(pub)
        await pub.send_multipart(frames(0))
        await pub.send_multipart(frames(3))
        await rec.wait_for(2)
    assert rec.seqs == [0, 3]
    assert sub.stats.missed == 2


async def test_gap_is_filled_from_vllms_replay_socket_before_the_newer_batch(ctx):
    buffer = {s: vllm_payload(s) for s in range(5)}     # vLLM keeps its last batches, 0..4
    requests: list[int] = []
    replay_ep, task, router = await fake_replay_router(ctx, buffer, requests)
    try:
        async with subscriber(replay_endpoint=replay_ep) as (sub, rec):
            pub = await xpub(ctx, connect=sub.endpoint)
            await wait_subscribed(pub)
            await pub.send_multipart(frames(0))
            await pub.send_multipart(frames(3))             # 1 and 2 were dropped on the way
            await pub.send_multipart(frames(4))
            await rec.wait_for(5)
    finally:
        task.cancel()
        router.close(linger=0)

    assert requests == [1]                                  # asked from the first missing number
    assert rec.seqs == [0, 1, 2, 3, 4]                      # each once, in order (4 came live, not twice)
    assert [b.events[0].block_hashes for _, b in rec.got] == [[1000], [1001], [1002], [1003], [1004]]
    assert sub.stats.replayed == 2 and sub.stats.missed == 0


async def test_replay_that_no_longer_holds_the_range_leaves_the_rest_of_the_gap(ctx):
    buffer = {s: vllm_payload(s) for s in (2, 3)}       # 1 fell out of vLLM's buffer
    requests: list[int] = []
    replay_ep, task, router = await fake_replay_router(ctx, buffer, requests)
    try:
        async with subscriber(replay_endpoint=replay_ep) as (sub, rec):
            pub = await xpub(ctx, connect=sub.endpoint)
            await wait_subscribed(pub)
            await pub.send_multipart(frames(0))
            await pub.send_multipart(frames(3))
            await rec.wait_for(3)
    finally:
        task.cancel()
        router.close(linger=0)
    assert rec.seqs == [0, 2, 3]
    assert sub.stats.missed == 1 and sub.stats.replayed == 1


async def test_unanswered_replay_times_out_and_the_batch_is_delivered_with_its_gap(ctx):
    silent = ctx.socket(zmq.ROUTER)          # takes the request, never answers
    silent.setsockopt(zmq.LINGER, 0)
    silent.bind("tcp://127.0.0.1:0")
    try:
        async with subscriber(replay_endpoint=silent.getsockopt_string(zmq.LAST_ENDPOINT),
                              replay_timeout_s=0.2) as (sub, rec):
            pub = await xpub(ctx, connect=sub.endpoint)
            await wait_subscribed(pub)
            await pub.send_multipart(frames(0))
            await pub.send_multipart(frames(2))
            await rec.wait_for(2)
    finally:
        silent.close(linger=0)
    assert rec.seqs == [0, 2] and sub.stats.missed == 1


async def test_numbering_that_goes_back_is_a_publisher_restart_and_is_delivered(ctx):
    async with subscriber() as (sub, rec):
        pub = await xpub(ctx, connect=sub.endpoint)
        await wait_subscribed(pub)
        for seq in (0, 1, 0, 1):                              # a new vLLM process numbers from 0
            await pub.send_multipart(frames(seq))
        await rec.wait_for(4)
    assert rec.seqs == [0, 1, 0, 1]
    assert sub.stats.restarts == 1 and sub.stats.missed == 0


async def test_first_batch_is_taken_as_the_start_whatever_its_number(ctx):
    async with subscriber() as (sub, rec):
        pub = await xpub(ctx, connect=sub.endpoint)
        await wait_subscribed(pub)
        await pub.send_multipart(frames(41))
        await pub.send_multipart(frames(42))
        await rec.wait_for(2)
    assert rec.seqs == [41, 42] and sub.stats.missed == 0


async def test_wait_connected_is_false_while_no_publisher_is_there():
    async with subscriber() as (sub, rec):
        assert not await sub.wait_connected(0.05)
        assert not sub.connected
