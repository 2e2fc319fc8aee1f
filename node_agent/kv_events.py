"""KV cache events in vLLM's wire format (``vllm/distributed/kv_events.py``).

vLLM publishes these over ZMQ as three frames: topic, an 8-byte big-endian sequence
number, and a msgpack ``KVEventBatch``. The sim engine emits the very same structs, so
the node agent has one code path for both. Hashes here are the *engine's* hashes; the
agent translates them into kvfleet's canonical hashes (see ``block_tracker``).
"""

from __future__ import annotations

from typing import Any

import msgspec


class EventBatch(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    ts: float
    events: list[Any]
    data_parallel_rank: int | None = None


class KVCacheEvent(msgspec.Struct, array_like=True, omit_defaults=True, gc=False, tag=True):
    """Base class of the KV cache events."""


class BlockStored(KVCacheEvent):
    block_hashes: list[int]          # engine hashes, one per block, parent first
    parent_block_hash: int | None    # engine hash of the block before block_hashes[0]
    token_ids: list[int]             # len(block_hashes) * block_size tokens
    block_size: int
    lora_id: int | None = None
    medium: str | None = None


class BlockRemoved(KVCacheEvent):
    block_hashes: list[int]
    medium: str | None = None


class AllBlocksCleared(KVCacheEvent):
    pass


class KVEventBatch(EventBatch):
    events: list[BlockStored | BlockRemoved | AllBlocksCleared]


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(type=KVEventBatch)


def encode_batch(batch: KVEventBatch) -> bytes:
    return _encoder.encode(batch)


def decode_batch(payload: bytes) -> KVEventBatch:
    return _decoder.decode(payload)
