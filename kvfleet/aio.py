"""Small asyncio helpers both sides use."""

from __future__ import annotations

import asyncio
from collections import deque

import grpc

# gRPC status codes by their numeric value, as status fields in messages carry them.
STATUS_BY_VALUE = {c.value[0]: c for c in grpc.StatusCode}


class StatusError(grpc.RpcError):
    """One request of a multiplexed call ended with a gRPC status (the call goes on). Has the
    same ``code()`` / ``details()`` as ``grpc.aio.AioRpcError``; ``retry_after_ms`` is the
    server's hint on RESOURCE_EXHAUSTED (0: none)."""

    def __init__(self, code: grpc.StatusCode, details: str, retry_after_ms: int = 0) -> None:
        super().__init__(f"{code.name}: {details}")
        self._code, self._details, self.retry_after_ms = code, details, retry_after_ms

    @classmethod
    def of(cls, value: int, details: str, retry_after_ms: int = 0) -> StatusError:
        """From a status field's numeric code (an unknown one is UNKNOWN)."""
        return cls(STATUS_BY_VALUE.get(value, grpc.StatusCode.UNKNOWN), details, retry_after_ms)

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


async def cancel_and_wait(task: asyncio.Task | None) -> None:
    """Cancels ``task`` (if any) and waits until it has finished unwinding, so whatever
    its ``finally`` blocks release is released when this returns."""
    if task is None:
        return
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        pass


def take_batch(out: deque, max_bytes: int):
    """Pops the first queued message of ``out`` and appends to its ``more`` those queued
    behind it, in order, while the whole stays within ``max_bytes`` (a message alone may
    be larger). Serve and GenerateMany requests batch this way: a burst is one message."""
    msg = out.popleft()
    if out:
        size = msg.ByteSize()
        while out and size + (n := out[0].ByteSize()) <= max_bytes:
            msg.more.append(out.popleft())
            size += n
    return msg
