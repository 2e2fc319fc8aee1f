"""KV cache events in vLLM's wire format (``vllm/distributed/kv_events.py``, vLLM 0.32).

vLLM publishes these over ZMQ as three frames: topic, an 8-byte big-endian sequence
number, and a msgpack ``KVEventBatch`` (see ``kv_subscriber``). The sim engine emits
the very same structs, so the node agent has one code path for both. Hashes here are
the *engine's* hashes; the agent translates them into kvfleet's canonical hashes (see
``block_tracker``).

Shape on the wire, as vLLM 0.32 encodes it:

* the batch is an array ``[ts, events, data_parallel_rank]`` (``array_like``);
* each event is a *map* tagged by class name,
  ``{"type": "BlockStored", "block_hashes": [...], "parent_block_hash": ..., ...}``.
  (Older vLLM releases sent events as arrays; 0.32 does not, and this module decodes
  0.32's maps.) Fields are matched by name, so their order does not matter, and
  fields a later vLLM adds are ignored when decoding.

Engine hashes are 64-bit ints by default (``VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=1``)
and the raw hash bytes when that is set to 0; both decode, and both work as keys.
"""

from __future__ import annotations

from typing import Any

import msgspec

ExternalBlockHash = int | bytes
"""An engine's name for a block, as vLLM publishes it: a 64-bit int, or hash bytes."""


class EventBatch(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    ts: float                               # wall-clock seconds (vLLM: time.time()) when published
    events: list[Any]
    data_parallel_rank: int | None = None   # vLLM fills in the publishing DP rank


class KVCacheEvent(msgspec.Struct, gc=False, tag=True):
    """Base class of the KV cache events: a map on the wire, tagged ``"type": <class name>``.

    Every field is encoded, None included (no ``omit_defaults``): vLLM declares
    ``lora_id``, ``medium`` and ``lora_name`` without defaults, so its own decoder
    (and consumers built on it) needs them present in what the sim engine emits.
    """


class BlockStored(KVCacheEvent):
    block_hashes: list[ExternalBlockHash]          # engine hashes, one per block, parent first
    parent_block_hash: ExternalBlockHash | None    # engine hash of the block before block_hashes[0]
    token_ids: list[int]                           # len(block_hashes) * block_size tokens
    block_size: int                                # tokens per block
    lora_id: int | None = None                     # LoRA adapter id (deprecated in vLLM for lora_name)
    medium: str | None = None                      # "GPU", "CPU", "STORAGE"
    lora_name: str | None = None                   # LoRA adapter name; None for the base model
    # Per block: the extra hash inputs (LoRA name, multimodal items, cache_salt), None
    # for a plain-text block. A block with extra keys is not a hit for a plain prompt.
    extra_keys: list[tuple[Any, ...] | None] | None = None
    group_idx: int | None = None                   # KV cache group (hybrid models have several)
    kv_cache_spec_kind: str | None = None          # kind of the group's KV cache spec
    kv_cache_spec_sliding_window: int | None = None  # the group's sliding window, in tokens
    locality: str | None = None                    # "LOCAL" or "REMOTE" relative to the publisher
    ownership: str | None = None                   # secondary offloading tier, if one stored it
    session_id: str | None = None                  # session of the request that stored the blocks


class BlockRemoved(KVCacheEvent):
    block_hashes: list[ExternalBlockHash]
    medium: str | None = None
    group_idx: int | None = None
    locality: str | None = None
    ownership: str | None = None


class AllBlocksCleared(KVCacheEvent):
    pass


class KVEventBatch(EventBatch):
    events: list[BlockStored | BlockRemoved | AllBlocksCleared]


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(type=KVEventBatch)


def encode_batch(batch: KVEventBatch) -> bytes:
    return _encoder.encode(batch)


def decode_batch(payload: bytes) -> KVEventBatch:
    """Decodes one msgpack payload; raises ``msgspec.DecodeError`` (a ValueError) if malformed."""
    return _decoder.decode(payload)
