"""ManyClient's side of GenerateMany, against a fake call: what is queued at once goes out
as one message (GenerateManyRequest.more), in order, under the byte cap; answers reach the
right request. (The real router is in tests/integration/test_generate_many.py.)"""

from __future__ import annotations

import asyncio

import grpc
import pytest

from kvfleet import many as many_module
from kvfleet.many import ManyClient, ManyError
from kvfleet.v1 import inference_pb2 as pb

pytestmark = pytest.mark.timeout(10)   # each runs in well under a second: a hang is a bug


class FakeCall:
    """Reads the client's messages; answers each start with one usage item, in one message
    per message read (a router answering a batch at once)."""

    def __init__(self, requests) -> None:
        self.requests = requests
        self.messages: list[pb.GenerateManyRequest] = []
        self.answers: asyncio.Queue = asyncio.Queue()
        self.task = asyncio.ensure_future(self._pump())

    async def _pump(self) -> None:
        async for m in self.requests:
            self.messages.append(m)
            items = [pb.GenerateManyItem(stream=e.stream, response=pb.GenerateResponse(
                usage=pb.Usage(request_id=e.start.request_id, prompt_tokens=len(e.start.text))))
                for e in (m, *m.more) if e.WhichOneof("kind") == "start"]
            await self.answers.put(pb.GenerateManyResponse(items=items))
        await self.answers.put(None)

    def __aiter__(self):
        return self

    async def __anext__(self):
        resp = await self.answers.get()
        if resp is None:
            raise StopAsyncIteration
        return resp


class FakeStub:
    def __init__(self) -> None:
        self.calls: list[FakeCall] = []

    def GenerateMany(self, requests, metadata=None):
        self.calls.append(call := FakeCall(requests))
        return call


async def one(client: ManyClient, i: int, size: int = 10) -> pb.Usage:
    out = [m async for m in client.generate(pb.GenerateRequest(request_id=f"r{i}", text="x" * size))]
    assert len(out) == 1
    return out[0].usage


async def test_starts_queued_at_once_go_in_one_message_in_order_and_each_gets_its_answer():
    stub = FakeStub()
    client = ManyClient(stub)
    usages = await asyncio.gather(*(one(client, i) for i in range(20)))
    assert [u.request_id for u in usages] == [f"r{i}" for i in range(20)]
    await client.close()
    (call,) = stub.calls
    # The first start may go alone (the writer wakes on it); the rest were queued together.
    assert len(call.messages) <= 2, [1 + len(m.more) for m in call.messages]
    sent = [e.start.request_id for m in call.messages for e in (m, *m.more)]
    assert sent == [f"r{i}" for i in range(20)]


async def test_a_batch_stays_under_the_byte_cap(monkeypatch):
    monkeypatch.setattr(many_module, "MAX_BATCH_BYTES", 5_000)
    stub = FakeStub()
    client = ManyClient(stub)
    usages = await asyncio.gather(*(one(client, i, size=1_000) for i in range(20)))
    assert sorted(u.prompt_tokens for u in usages) == [1_000] * 20
    await client.close()
    (call,) = stub.calls
    assert max(m.ByteSize() for m in call.messages) <= 5_000
    assert sum(1 + len(m.more) for m in call.messages) == 20
    assert any(m.more for m in call.messages)        # still batched, a few per message
    assert len(call.messages) >= 4


class SilentCall(FakeCall):
    """Reads the client's messages and never answers."""

    async def _pump(self) -> None:
        async for m in self.requests:
            self.messages.append(m)
        await self.answers.put(None)


class SilentStub(FakeStub):
    def GenerateMany(self, requests, metadata=None):
        self.calls.append(call := SilentCall(requests))
        return call


async def test_a_request_past_its_timeout_ends_with_deadline_exceeded_and_is_cancelled_on_the_call():
    stub = SilentStub()
    client = ManyClient(stub)
    t0 = asyncio.get_running_loop().time()
    with pytest.raises(ManyError) as err:
        async for _ in client.generate(pb.GenerateRequest(request_id="slow", text="x"), timeout=0.05):
            pass
    took = asyncio.get_running_loop().time() - t0
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert 0.05 <= took < 2.0
    await asyncio.sleep(0)   # the cancel is written on the call's next turn
    (call,) = stub.calls
    sent = [(e.stream, e.WhichOneof("kind")) for m in call.messages for e in (m, *m.more)]
    assert sent == [(1, "start"), (1, "cancel")]
    assert call.messages[0].start.HasField("deadline")   # the router gets the deadline too
    await client.close()   # half-closes: the call ends
