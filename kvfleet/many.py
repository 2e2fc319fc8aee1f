"""Client of ``Inference.GenerateMany``: many Generate requests over one call.

For callers that carry many clients' requests (a gateway, an HTTP front, a load
generator). ``ManyClient.generate`` looks like ``InferenceStub.Generate``: it yields the
request's ``GenerateResponse`` messages and raises a ``grpc.RpcError`` (``ManyError``,
with ``code()`` and ``details()``) with the status Generate's call would end with. The
call is opened on first use and reopened after it fails; a failed call fails every
request it carried with its status. Each request's outputs wait in memory until its
iterator reads them: read every request you start (or break out, which cancels it).

    client = ManyClient(InferenceStub(channel), metadata=(("authorization", "Bearer KEY"),))
    async for msg in client.generate(request, timeout=30):
        ...
    await client.close()
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import deque
from typing import AsyncIterator

import grpc

from kvfleet.aio import StatusError, take_batch
from kvfleet.v1 import inference_pb2 as pb


# Starts and cancels queued at once go in one message up to this many bytes (a router's
# gRPC server refuses messages over 4 MB, failing the whole call).
MAX_BATCH_BYTES = 1 << 20


class ManyError(StatusError):
    """How one request of a GenerateMany call ended, as ``grpc.aio.AioRpcError`` would tell it."""


class _Stream:
    __slots__ = ("items", "wake", "done")

    def __init__(self) -> None:
        self.items: deque = deque()   # GenerateResponse, or a ManyError (the last)
        self.wake = asyncio.Event()
        self.done = False


class _Call:
    """One open GenerateMany call and the requests it carries."""

    def __init__(self, stub, metadata) -> None:
        self.out: deque[pb.GenerateManyRequest] = deque()
        self.out_wake = asyncio.Event()
        self.streams: dict[int, _Stream] = {}
        self.closed = False
        self.half_closed = False
        self.call = stub.GenerateMany(self._requests(), metadata=metadata)
        self.reader = asyncio.create_task(self._read())

    async def _requests(self):
        out = self.out
        while True:
            while out:
                yield take_batch(out, MAX_BATCH_BYTES)   # everything queued, in one message
            if self.half_closed:
                return
            self.out_wake.clear()
            await self.out_wake.wait()

    def send(self, msg: pb.GenerateManyRequest) -> None:
        self.out.append(msg)
        self.out_wake.set()

    async def _read(self) -> None:
        error = ManyError(grpc.StatusCode.UNAVAILABLE, "GenerateMany call ended")
        try:
            async for resp in self.call:
                for item in resp.items:
                    s = self.streams.get(item.stream)
                    if s is None:
                        continue   # cancelled by this side
                    if item.HasField("error"):
                        e = item.error
                        s.items.append(ManyError.of(e.code, e.message, e.retry_after_ms))
                        del self.streams[item.stream]
                    else:
                        s.items.append(item.response)
                        if item.response.HasField("usage"):
                            del self.streams[item.stream]
                    s.wake.set()
        except grpc.aio.AioRpcError as exc:
            error = ManyError(exc.code(), exc.details() or exc.code().name)
        except asyncio.CancelledError:
            error = ManyError(grpc.StatusCode.CANCELLED, "client closed")
            raise
        finally:
            self.closed = True
            for s in self.streams.values():
                s.items.append(error)
                s.wake.set()
            self.streams.clear()


def _with_deadline(request: pb.GenerateRequest, unix_s: float) -> pb.GenerateRequest:
    r = pb.GenerateRequest()
    r.CopyFrom(request)
    r.deadline.FromNanoseconds(int(unix_s * 1e9))
    return r


class ManyClient:
    """Generate requests multiplexed over one ``GenerateMany`` call (see the module doc)."""

    def __init__(self, stub, metadata=None) -> None:
        self.stub = stub
        self.metadata = metadata
        self._call: _Call | None = None
        self._ids = itertools.count(1)

    def _open(self) -> _Call:
        if self._call is None or self._call.closed:
            self._call = _Call(self.stub, self.metadata)
        return self._call

    async def generate(self, request: pb.GenerateRequest, timeout: float | None = None) -> AsyncIterator[pb.GenerateResponse]:
        """Yields ``request``'s responses; raises ``ManyError`` as Generate's call would
        end. ``timeout``: seconds until the request is cancelled (DEADLINE_EXCEEDED)."""
        if timeout is not None and not request.HasField("deadline"):
            # The router's deadline handling (fail before a node is tried, cancel the node's
            # work) needs the deadline: a Generate call carries it as gRPC's.
            request = _with_deadline(request, time.time() + timeout)
        call = self._open()
        sid = next(self._ids)
        s = call.streams[sid] = _Stream()
        call.send(pb.GenerateManyRequest(stream=sid, start=request))
        expired = False

        def expire() -> None:
            nonlocal expired
            expired = True
            s.wake.set()

        # One timer for the whole request (not a wait_for, and its task, per wait).
        timer = None if timeout is None else asyncio.get_running_loop().call_later(timeout, expire)
        try:
            while True:
                while not s.items:
                    if expired:
                        raise ManyError(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded")
                    s.wake.clear()
                    await s.wake.wait()
                item = s.items.popleft()
                if isinstance(item, ManyError):
                    s.done = True
                    raise item
                yield item
                if item.HasField("usage"):
                    s.done = True
                    return
        finally:
            if timer is not None:
                timer.cancel()
            if not s.done and call.streams.pop(sid, None) is not None and not call.closed:
                call.send(pb.GenerateManyRequest(stream=sid, cancel=True))

    async def close(self) -> None:
        """Half-closes the call: what runs finishes, then the call ends."""
        call, self._call = self._call, None
        if call is None:
            return
        call.half_closed = True
        call.out_wake.set()
        try:
            await call.reader
        except asyncio.CancelledError:
            pass

    def cancel(self) -> None:
        """Ends the call now; its running requests fail with CANCELLED."""
        if self._call is not None:
            self._call.call.cancel()
            self._call = None
