"""The router's side of ``NodeAgent.Serve``: one stream per node carries every request this
router sends it.

Per request, gRPC costs a call (headers, a new HTTP/2 stream, its own reads) and, per
message, a read with its wake-ups of the event loop. Over one long-lived stream a request
costs one small message out, and the node's answers for all of this router's requests come
back batched, one message per engine step. ``NodeStream.read`` also merges token items
already waiting for a request, so a client that reads slower than the engine writes gets
fewer, larger chunks instead of a growing queue of small ones.

Failure of the stream (the node died, its channel closed) ends every request on it with
that status, as a per-request call would have; the next request opens a new stream.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque

import grpc

from kvfleet.aio import StatusError, take_batch
from kvfleet.v1 import node_pb2 as npb

log = logging.getLogger(__name__)

# Starts and cancels batched into one Serve message, in bytes (ServeRequest.more).
MAX_BATCH_BYTES = 1 << 20


class StreamError(StatusError):
    """A request on a node's stream ended with a gRPC status instead of a final message."""


class NodeStream:
    """One request on a node's stream. ``read()`` gives ``("tokens", ids)`` (every token
    item waiting, merged) or ``("final", NodeFinal)``, or raises ``StreamError``."""

    __slots__ = ("_mux", "id", "_items", "_waiter", "done", "_timer", "_settling", "_sink")

    def __init__(self, mux: NodeMux, sid: int) -> None:
        self._mux = mux
        self.id = sid
        self._items: deque = deque()
        self._waiter: asyncio.Future | None = None
        self.done = False          # final or error received, or cancelled
        self._timer: asyncio.TimerHandle | None = None
        self._settling = False     # in settle(): only the end of the request wakes it early
        self._sink = None          # divert(): where token items go instead of waiting for read()

    def push(self, item) -> None:
        if self._sink is not None and item.__class__ is list:
            try:
                self._sink(item)
                return
            except Exception as exc:   # a bug in one request's relay ends that request, not the node's stream
                log.exception("router: relaying stream %d failed", self.id)
                self._sink = None
                item = StreamError(grpc.StatusCode.INTERNAL, f"router relay failed: {exc}")
                if not self.done:
                    self._finish()
                    self._mux.cancel(self.id)   # the node stops making its tokens
        self._items.append(item)
        w = self._waiter
        if w is not None and not w.done() and not (self._settling and item.__class__ is list):
            w.set_result(None)

    async def read(self, timeout: float | None = None):
        """The next output; ``asyncio.TimeoutError`` if none came within ``timeout`` s."""
        if not self._items:
            loop = asyncio.get_running_loop()
            self._waiter = w = loop.create_future()
            timer = loop.call_later(timeout, _expire, w) if timeout is not None else None
            try:
                await w
            finally:
                self._waiter = None
                if timer is not None:
                    timer.cancel()
        items = self._items
        item = items.popleft()
        if item.__class__ is list:
            if items and items[0].__class__ is list:
                item = list(item)
                while items and items[0].__class__ is list:
                    item.extend(items.popleft())
            return "tokens", item
        if isinstance(item, StreamError):
            self._finish()
            raise item
        self._finish()
        return "final", item

    def divert(self, sink) -> None:
        """From now on, token items go to ``sink(ids)`` as they arrive (in the stream
        reader's task, no wake-up of the reader of this stream); ``read()`` then gives only
        the request's end. Token items already waiting go first, merged. ``None``: back to
        ``read()`` (the sink may call this from inside itself)."""
        self._sink = sink
        items = self._items
        if sink is not None and items and items[0].__class__ is list:
            ids = items.popleft()
            while items and items[0].__class__ is list:
                ids = ids + items.popleft()
            sink(ids)

    async def settle(self, seconds: float) -> None:
        """Waits ``seconds`` for more output to merge, or less if the request ends meanwhile
        (its final or an error came: nothing more can be merged)."""
        loop = asyncio.get_running_loop()
        until = loop.time() + seconds
        while not self.done:
            items = self._items
            if items and items[-1].__class__ is not list:
                return
            left = until - loop.time()
            if left <= 0:
                return
            self._waiter = w = loop.create_future()
            self._settling = True
            timer = loop.call_later(left, _wake, w)
            try:
                await w
            finally:
                self._waiter = None
                self._settling = False
                timer.cancel()

    def expire_at(self, when: float, details: str) -> None:
        """Ends the request with DEADLINE_EXCEEDED at loop time ``when`` (and cancels it on the node)."""
        self._timer = asyncio.get_running_loop().call_at(when, self._deadline, details)

    def _deadline(self, details: str) -> None:
        self._timer = None
        if not self.done:
            self.push(StreamError(grpc.StatusCode.DEADLINE_EXCEEDED, details))
            self._mux.cancel(self.id)

    def cancel(self) -> None:
        """Stops the request on the node if it has not ended (idempotent)."""
        if not self.done:
            self._finish()
            self._mux.cancel(self.id)

    def _finish(self) -> None:
        self.done = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


def _wake(w: asyncio.Future) -> None:
    if not w.done():
        w.set_result(None)


def _expire(w: asyncio.Future) -> None:
    if not w.done():
        w.set_exception(asyncio.TimeoutError())


class NodeMux:
    """One ``Serve`` call to one node. ``start`` sends a request on it; a failed or ended
    call sets ``closed``, and the owner opens a new one for the next request."""

    def __init__(self, stub, node_id: str, batches: bool = False) -> None:
        self.node_id = node_id
        self.batches = batches         # the node takes ServeRequest.more: send what is queued as one message
        self.streams: dict[int, NodeStream] = {}
        self.closed = False
        self.unimplemented = False     # the node answered Serve with UNIMPLEMENTED
        self._next = 0
        self._out: deque[npb.ServeRequest] = deque()
        self._out_wake: asyncio.Future | None = None
        self._call = stub.Serve(self._requests())
        self._task = asyncio.get_running_loop().create_task(self._read(), name=f"mux-{node_id}")

    def start(self, request: npb.NodeGenerateRequest) -> NodeStream:
        if self.closed:
            raise StreamError(grpc.StatusCode.UNAVAILABLE, f"stream to {self.node_id} is closed")
        self._next += 1
        s = NodeStream(self, self._next)
        self.streams[s.id] = s
        self._send(npb.ServeRequest(stream=s.id, start=request))
        return s

    def cancel(self, sid: int) -> None:
        if self.streams.pop(sid, None) is not None and not self.closed:
            self._send(npb.ServeRequest(stream=sid, cancel=True))

    def _send(self, msg: npb.ServeRequest) -> None:
        self._out.append(msg)
        w = self._out_wake
        if w is not None and not w.done():
            w.set_result(None)

    async def _requests(self):
        loop = asyncio.get_running_loop()
        out = self._out
        while not self.closed:
            while out:
                # Everything queued, in one message up to MAX_BATCH_BYTES (a node's gRPC
                # server refuses messages over 4 MB, failing the whole stream).
                yield take_batch(out, MAX_BATCH_BYTES) if self.batches else out.popleft()
            if self.closed:
                return
            self._out_wake = loop.create_future()
            try:
                await self._out_wake
            finally:
                self._out_wake = None

    async def _read(self) -> None:
        err = StreamError(grpc.StatusCode.UNAVAILABLE, f"{self.node_id} ended its stream")
        streams = self.streams
        try:
            async for resp in self._call:
                for item in resp.items:
                    s = streams.get(item.stream)
                    if s is None:       # cancelled here; its last items may still come
                        continue
                    kind = item.WhichOneof("kind")
                    if kind == "tokens":
                        s.push(list(item.tokens.ids))
                        continue
                    del streams[item.stream]
                    if kind == "final":
                        s.push(item.final)
                    else:
                        e = item.error
                        s.push(StreamError.of(e.code, e.message))
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.UNIMPLEMENTED:
                # A node agent from before Serve: its requests go one call each from now on
                # (NodeConn.stream); those on this stream are retried like a refused call.
                self.unimplemented = True
                err = StreamError(grpc.StatusCode.UNAVAILABLE, f"{self.node_id} has no Serve (an older node agent)")
            else:
                err = StreamError(exc.code(), exc.details() or exc.code().name)
        except asyncio.CancelledError:
            err = StreamError(grpc.StatusCode.CANCELLED, "router closing")
            raise
        except Exception as exc:   # a bug: fail the requests, not silently hang them
            log.exception("router: stream to %s failed", self.node_id)
            err = StreamError(grpc.StatusCode.INTERNAL, f"stream to {self.node_id} failed: {exc}")
        finally:
            self.closed = True
            self._call.cancel()   # ends the node's side too (a no-op once the call is over)
            for s in streams.values():
                s.push(err)
            streams.clear()
            self._out.clear()
            if self._out_wake is not None and not self._out_wake.done():
                self._out_wake.set_result(None)   # _requests sees closed and ends

    async def close(self) -> None:
        self.closed = True
        self._call.cancel()
        self._task.cancel()
        try:
            await self._task
        except (asyncio.CancelledError, Exception):
            pass


class CallMux:
    """For a node agent without ``Serve``: each request is its own ``Generate`` call, read
    by a task into a ``NodeStream``, so the router's relay is the same for both. Slower
    (a call per request, a message per output), correct."""

    def __init__(self, stub, node_id: str) -> None:
        self.node_id = node_id
        self.closed = False
        self.created_at = time.monotonic()
        self._stub = stub
        self._next = 0
        self._calls: dict[int, asyncio.Task] = {}

    def start(self, request: npb.NodeGenerateRequest) -> NodeStream:
        self._next += 1
        s = NodeStream(self, self._next)   # type: ignore[arg-type]
        task = asyncio.get_running_loop().create_task(self._run(s, self._stub.Generate(request)))
        self._calls[s.id] = task
        task.add_done_callback(lambda t, sid=s.id: self._calls.pop(sid, None))
        return s

    def cancel(self, sid: int) -> None:
        if (t := self._calls.pop(sid, None)) is not None:
            t.cancel()

    @staticmethod
    async def _run(s: NodeStream, call) -> None:
        try:
            async for msg in call:
                if msg.WhichOneof("kind") == "tokens":
                    s.push(list(msg.tokens.ids))
                else:
                    s.push(msg.final)
                    return
            s.push(StreamError(grpc.StatusCode.UNAVAILABLE, "the node ended the stream without a final message"))
        except grpc.aio.AioRpcError as exc:
            s.push(StreamError(exc.code(), exc.details() or exc.code().name))
        except asyncio.CancelledError:
            call.cancel()
            raise

    async def close(self) -> None:
        self.closed = True
        for t in list(self._calls.values()):
            t.cancel()
