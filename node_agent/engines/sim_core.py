"""A simulated vLLM v1 engine: a step function over an injected clock.

``SimEngineCore`` has no asyncio and reads no clock. The caller says what time it
is (``now``, seconds in any consistent clock domain). ``step`` returns how long the
iteration it models would take (``duration_s``); its outputs and KV events are
visible at ``now + duration_s``. So the same code runs in real time under
``engines.sim.SimEngine`` and in virtual time inside a discrete-event routing
simulator that drives thousands of cores in one process.

It follows vLLM v1 (``vllm/v1/core/sched/scheduler.py``, ``block_pool.py``,
``kv_cache_manager.py``) where that matters to a router:

* Paged KV cache of ``num_blocks`` blocks of ``block_size`` tokens. Full blocks are
  named by a chained hash; a block whose hash is known can be reused by any request
  with the same prefix.
* Unreferenced blocks wait in a free queue in eviction order. A block taken from
  the head of the queue loses its cached hash (``BlockRemoved``). A finished
  request frees its blocks tail first, so leaves are evicted before their parents.
* The prefix hit on admission is capped so the last token is always computed: at
  most ``(num_tokens - 1) // block_size`` blocks.
* Continuous batching with chunked prefill under a token budget per step. RUNNING
  requests are scheduled first, then WAITING ones by ``(priority, arrival)``. When a
  running request needs a block and none is free, the running request with the
  largest ``(priority, arrival)`` is preempted: its blocks are freed, and it is
  recomputed from scratch later (prefix hits permitting).
* Newly full, computed blocks are published as ``BlockStored`` in vLLM's format.

One deliberate difference: vLLM keeps two physical blocks when the same content
is computed twice (for example, a prompt of exactly k blocks, whose last block is
never a hit), and publishes ``BlockStored`` twice. Here the second copy is swapped
for the cached one and returned to the free queue, so each engine hash is stored
once and the parent of every ``BlockStored`` is pinned at the time it is published.
"""

from __future__ import annotations

import hashlib
import heapq
from array import array
from dataclasses import dataclass, field
from typing import Iterable, NewType, Sequence

from pydantic import BaseModel, ConfigDict, Field, model_validator

from kvfleet.hashing import fmix_int
from kvfleet.node_agent.engine import EngineError, EngineOutput, EngineRequest, LoadSnapshot
from kvfleet.node_agent.kv_events import AllBlocksCleared, BlockRemoved, BlockStored

EngineBlockHash = NewType("EngineBlockHash", int)
"""The sim engine's own 64-bit block hash (not kvfleet's canonical hash)."""

KVEvent = BlockStored | BlockRemoved | AllBlocksCleared

MEDIUM = "GPU"
_MASK64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15
_U32 = "I" if array("I").itemsize == 4 else "L"  # 4-byte token ids for hashing
assert array(_U32).itemsize == 4


class SimConfig(BaseModel):
    """Shape and speed of one simulated engine. Times are seconds, sizes tokens or blocks."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    model: str = Field("sim-byte", description="Model name the engine reports.")
    block_size: int = Field(16, ge=1, le=4096, description="Tokens per KV block.")
    num_blocks: int = Field(4096, ge=1, description="KV cache capacity in blocks.")
    max_model_len: int = Field(8192, ge=2, description="Context length in tokens (prompt + output).")
    prefill_tokens_per_s: float = Field(8000.0, gt=0, description="Prefill throughput in tokens/s.")
    decode_step_base_s: float = Field(0.010, ge=0, description="Fixed cost of a step that decodes, seconds.")
    decode_step_per_seq_s: float = Field(0.0002, ge=0, description="Added decode step cost per decoding sequence, seconds.")
    decode_step_per_context_token_s: float = Field(
        0.0, ge=0, description="Added decode step cost per context token of the decoding sequences, seconds."
    )
    max_num_seqs: int = Field(256, ge=1, description="Most sequences in the running batch.")
    max_num_batched_tokens: int = Field(2048, ge=1, description="Token budget per step (chunked prefill).")
    vocab_size: int = Field(257, ge=128, description="Valid token ids are 0..vocab_size-1; output text is ASCII.")
    eos_token_id: int | None = Field(256, ge=0, description="End-of-sequence token; generating it finishes with 'stop'.")
    eos_probability: float = Field(
        0.0, ge=0, le=1, description="Chance per generated token that the model emits EOS instead of text."
    )
    hash_seed: int = Field(0, ge=0, le=_MASK64, description="Seed of the engine's block hash (like PYTHONHASHSEED for vLLM).")

    @model_validator(mode="after")
    def _check(self) -> "SimConfig":
        if self.num_blocks * self.block_size < self.max_model_len:
            raise ValueError(
                f"num_blocks * block_size ({self.num_blocks} * {self.block_size}) must hold one "
                f"max_model_len ({self.max_model_len}) sequence"
            )
        if self.eos_token_id is not None and self.eos_token_id >= self.vocab_size:
            raise ValueError(f"eos_token_id {self.eos_token_id} is outside vocab_size {self.vocab_size}")
        return self


@dataclass(slots=True)
class StepResult:
    """What one engine iteration did. Outputs and events are visible at ``now + duration_s``."""

    duration_s: float                                   # modelled duration of the iteration, seconds
    outputs: list[tuple[str, EngineOutput]] = field(default_factory=list)  # (request_id, output), batch order
    events: list[KVEvent] = field(default_factory=list)  # KV events in the order the cache changed
    num_prefill_tokens: int = 0                         # prompt (or recomputed) tokens computed this step
    num_decode_seqs: int = 0                            # sequences that decoded one token this step
    num_preempted: int = 0                              # requests preempted while scheduling this step


@dataclass(slots=True)
class SimStats:
    """Monotonic counters, named after vLLM's metrics."""

    num_preemptions: int = 0        # vllm:num_preemptions_total
    prefix_cache_queries: int = 0   # tokens looked up on admission (vllm:prefix_cache_queries_total)
    prefix_cache_hits: int = 0      # of those, tokens served from cache (vllm:prefix_cache_hits_total)
    prompt_tokens: int = 0          # prompt tokens of admitted requests, counted once per request
    generation_tokens: int = 0      # tokens generated


class _FreeBlockQueue:
    """vLLM's free-block queue: the ids of the blocks no request holds, in eviction order.

    vLLM starts with every block in the queue in id order and appends freed blocks at
    the tail, so never-used blocks always form the head. Here they are only counted
    and given an id on first use: an idle engine costs a few hundred bytes, which
    matters when a simulator holds thousands. After them come freed blocks in the
    order they were freed, in an append-only log of ids with lazy deletion: ``_pos``
    says where each block's live entry is, so an entry whose block was taken out of
    the middle (a prefix hit on a free cached block) or freed again later is skipped.
    Append, pop from the head and removal from the middle are O(1) amortized, as
    vLLM's hand-written linked list is; the log is compacted when more than half of
    it is dead. About 24 bytes per block, where an OrderedDict of block objects took
    about 140.
    """

    __slots__ = ("_fresh", "_next_id", "_log", "_head", "_pos", "_live")

    def __init__(self, num_blocks: int) -> None:
        self._fresh = num_blocks                  # never-used blocks, at the head
        self._next_id = 0                         # id of the next never-used block
        self._log = array("q")                    # freed block ids, oldest first; dead entries skipped
        self._head = 0                            # entries before it are consumed
        self._pos = array("q")                    # per block id: index of its live entry in _log, or -1
        self._live = 0                            # live entries in _log

    def __len__(self) -> int:
        return self._fresh + self._live

    def popleft(self) -> int:
        """The id of the next block to reuse. O(1) amortized. The caller evicts its hash, if any.

        A never-used block's id is ``num_used - 1`` right after the call.
        """
        if self._fresh:
            self._fresh -= 1
            b = self._next_id
            self._next_id = b + 1
            self._pos.append(-1)
            return b
        log, pos, i = self._log, self._pos, self._head
        b = log[i]
        while pos[b] != i:
            i += 1
            b = log[i]
        pos[b] = -1
        self._head = i + 1
        self._live -= 1
        return b

    def append(self, b: int) -> None:
        """Puts a block that no request holds any more at the tail. O(1) amortized."""
        if len(self._log) > 2 * self._live + 1024:
            self._compact()
        log = self._log
        self._pos[b] = len(log)
        log.append(b)
        self._live += 1

    def remove(self, b: int) -> None:
        """Takes a free block out of the queue (a prefix hit). O(1)."""
        self._pos[b] = -1
        self._live -= 1

    def _compact(self) -> None:
        live = array("q", self.blocks())
        pos = self._pos
        for i, b in enumerate(live):
            pos[b] = i
        self._log, self._head = live, 0

    def blocks(self) -> Iterable[int]:
        """Ids of the used free blocks, next eviction first (never-used blocks, not listed, go before them)."""
        log, pos = self._log, self._pos
        return (log[i] for i in range(self._head, len(log)) if pos[log[i]] == i)

    @property
    def num_used(self) -> int:
        """Blocks given an id so far: ids are ``0..num_used-1``."""
        return self._next_id

    def reset(self, num_blocks: int) -> None:
        """Forgets block identities; only valid when every block is free and anonymous."""
        self._fresh, self._next_id = num_blocks, 0
        self._log, self._head, self._pos, self._live = array("q"), 0, array("q"), 0


_WAITING, _RUNNING, _FINISHED = 0, 1, 2

_WORDS = tuple(
    w.encode()
    for w in (
        "the of and to in is that for it as with on be by this are from at or an "
        "cache block prefix token route node model fleet batch queue step decode "
        "prefill request engine index hash memory latency throughput tensor layer "
        "attention value key page chunk event stream policy score cost load warm "
        "cold hit miss shard replica lease worker graph kernel budget window"
    ).split()
)


class _TextStream:
    """Deterministic, readable ASCII text, one byte token per call.

    SplitMix64 over a 64-bit state: a few integer operations per token and 40 bytes
    of state per request (a ``random.Random`` would be 2.5 kB).
    """

    __slots__ = ("_state", "_buf", "_pos", "_sentence_start", "_eos_threshold", "_eos")

    def __init__(self, seed: int, eos_token_id: int | None, eos_probability: float) -> None:
        self._state = seed & _MASK64
        self._buf = b""
        self._pos = 0
        self._sentence_start = True
        self._eos = eos_token_id
        # Compare against the top 53 bits of a draw; 0 disables EOS.
        self._eos_threshold = int(eos_probability * (1 << 53)) if eos_token_id is not None else 0

    def _next(self) -> int:
        self._state = (self._state + _GOLDEN) & _MASK64
        return fmix_int(self._state)

    def next_token(self) -> int:
        # SimEngineCore._sample inlines the common case (no EOS draw, a byte left in the
        # buffer); keep the two in step.
        if self._eos_threshold and (self._next() >> 11) < self._eos_threshold:
            return self._eos  # type: ignore[return-value]
        if self._pos >= len(self._buf):
            r = self._next()
            word = _WORDS[r % len(_WORDS)]
            if self._sentence_start:
                word = word[:1].upper() + word[1:]
            self._sentence_start = (r >> 32) % 9 == 0
            self._buf = word + (b". " if self._sentence_start else b" ")
            self._pos = 0
        self._pos += 1
        return self._buf[self._pos - 1]


class _Request:
    """A request inside the core. ``tokens`` is prompt + output so far, 4 bytes a token
    (a list would hold an int object of 28 bytes for each id above 256: gigabytes across
    the live requests of a 1,000-node simulation)."""

    __slots__ = (
        "request_id", "tokens", "num_prompt_tokens", "max_tokens", "stop_token_ids",
        "priority", "arrival_time", "arrival_seq", "block_hashes", "blocks",
        "num_computed_tokens", "num_cached_blocks", "num_cached_tokens", "num_output_tokens",
        "prefill_end", "pending_prefill", "num_scheduled", "status", "text",
    )

    def __init__(self, req: EngineRequest, arrival_time: float, arrival_seq: int, text: _TextStream) -> None:
        self.request_id = req.request_id
        self.tokens = array(_U32, req.prompt_token_ids)
        self.num_prompt_tokens = len(self.tokens)
        self.max_tokens = req.max_tokens
        self.stop_token_ids = frozenset(req.stop_token_ids)
        self.priority = req.priority
        self.arrival_time = arrival_time
        self.arrival_seq = arrival_seq                # tie-break for equal arrival times
        self.block_hashes = array("Q")                # engine hashes of the full blocks of tokens
        self.blocks = array("q")                      # ids of its physical blocks, one per started block
        self.num_computed_tokens = 0                  # tokens whose KV is in the cache
        self.num_cached_blocks = 0                    # leading blocks registered in the prefix cache
        self.num_cached_tokens: int | None = None     # prefix hit of the first admission, tokens
        self.num_output_tokens = 0
        self.prefill_end = self.num_prompt_tokens     # tokens to compute before the next sample
        self.pending_prefill = 0                      # this request's share of queued_prefill_tokens
        self.num_scheduled = 0                        # tokens scheduled in the current step
        self.status = _WAITING
        self.text = text

    def sort_key(self) -> tuple[int, float, int]:
        return (self.priority, self.arrival_time, self.arrival_seq)


class SimEngineCore:
    """The simulated engine's state machine. Not thread-safe; one owner drives it.

    Costs: ``add_request`` hashes the prompt, O(prompt blocks); ``step`` is
    O(running requests + blocks touched), with one small hash per block that fills;
    ``load`` and ``has_work`` are O(1). Measured: about 2.5 us of step time per
    output token with ~30 sequences running; about 1.3 kB per idle core, about 115
    bytes per block in use or cached (its entry in the cache dict with the hash and id
    objects, about 90; the per-block arrays and the free log, about 25), plus 4 bytes
    per token and 16 per block of each live request; never-used blocks cost nothing.
    """

    __slots__ = (
        "config", "stats", "_bs", "_num_blocks", "_max_seqs", "_max_batched", "_max_model_len",
        "_vocab", "_eos", "_eos_prob", "_prefill_rate", "_dec_base", "_dec_seq", "_dec_ctx",
        "_hasher", "_root", "_free", "_ref", "_hash", "_cached", "_requests", "_running", "_waiting",
        "_num_waiting", "_arrivals", "_queued_prefill", "_events", "_last_step_at",
    )

    def __init__(self, config: SimConfig | None = None) -> None:
        cfg = config or SimConfig()
        self.config = cfg
        self.stats = SimStats()
        # Hot-path copies of the config: attribute reads on a slotted object are cheap.
        self._bs = cfg.block_size
        self._num_blocks = cfg.num_blocks
        self._max_seqs = cfg.max_num_seqs
        self._max_batched = cfg.max_num_batched_tokens
        self._max_model_len = cfg.max_model_len
        self._vocab = cfg.vocab_size
        self._eos = cfg.eos_token_id
        self._eos_prob = cfg.eos_probability
        self._prefill_rate = cfg.prefill_tokens_per_s
        self._dec_base = cfg.decode_step_base_s
        self._dec_seq = cfg.decode_step_per_seq_s
        self._dec_ctx = cfg.decode_step_per_context_token_s
        key = cfg.hash_seed.to_bytes(8, "little")
        self._hasher = hashlib.blake2b(digest_size=8, key=key)
        # Parent of the first block in the hash chain (vLLM's NONE_HASH); events still say None.
        root = self._hasher.copy()
        root.update(b"kvfleet-sim-none-hash")
        self._root = root.digest()
        self._free = _FreeBlockQueue(cfg.num_blocks)
        # Per block id, arrays rather than an object per block (see _FreeBlockQueue).
        self._ref = array("i")                        # requests holding the block
        self._hash = array("Q")                       # its engine hash while cached (stale after)
        self._cached: dict[int, int] = {}             # engine hash -> id of the one block holding it
        self._requests: dict[str, _Request] = {}      # live requests (waiting or running)
        self._running: list[_Request] = []            # admission order
        self._waiting: list[tuple[int, float, int, _Request]] = []  # heap; aborted entries skipped lazily
        self._num_waiting = 0
        self._arrivals = 0
        self._queued_prefill = 0                      # sum of pending_prefill, tokens
        self._events: list[KVEvent] = []              # produced since the last step() / drain_events()
        self._last_step_at = float("-inf")

    # ------------------------------------------------------------------ requests

    def check_request(self, req: EngineRequest) -> None:
        """Raises EngineError, with a message fit for a client, if ``req`` can't be served."""
        prompt = req.prompt_token_ids
        if not prompt:
            raise EngineError(f"request {req.request_id!r}: the prompt is empty")
        if req.max_tokens < 1:
            raise EngineError(f"request {req.request_id!r}: max_tokens must be at least 1, got {req.max_tokens}")
        lo, hi = min(prompt), max(prompt)
        if lo < 0 or hi >= self._vocab:
            bad = lo if lo < 0 else hi
            raise EngineError(
                f"request {req.request_id!r}: token id {bad} at position {list(prompt).index(bad)} "
                f"is outside the vocabulary 0..{self._vocab - 1}"
            )
        total = len(prompt) + req.max_tokens
        if total > self._max_model_len:
            raise EngineError(
                f"request {req.request_id!r}: prompt ({len(prompt)} tokens) + max_tokens ({req.max_tokens}) "
                f"= {total} exceeds max_model_len {self._max_model_len}"
            )
        if req.request_id in self._requests:
            raise EngineError(f"request id {req.request_id!r} is already in use")

    def add_request(self, req: EngineRequest, now: float) -> None:
        """Queues ``req`` as arrived at ``now``. Raises EngineError if it can't be served.

        O(prompt blocks): the prompt's block hashes are computed here, once.
        """
        self.check_request(req)
        text = _TextStream(self._text_seed(req), self._eos, self._eos_prob)
        r = _Request(req, now, self._arrivals, text)
        self._arrivals += 1
        r.block_hashes = array("Q", self.engine_block_hashes(r.tokens))
        self._requests[r.request_id] = r
        self._enqueue(r)

    def abort(self, request_id: str, now: float) -> bool:
        """Drops a live request at once and frees its blocks. False if it isn't live.

        O(running) when the request is running (it leaves the batch list); O(1) when
        waiting (its heap entry is skipped later).
        """
        r = self._requests.pop(request_id, None)
        if r is None:
            return False
        if r.status == _RUNNING:
            self._running.remove(r)
            self._free_request_blocks(r)
        else:
            self._num_waiting -= 1
        r.status = _FINISHED
        self._set_pending(r, 0)
        return True

    def has_work(self) -> bool:
        """True while any request is running or waiting. O(1)."""
        return bool(self._running) or self._num_waiting > 0

    # ------------------------------------------------------------------ the step

    def step(self, now: float) -> StepResult:
        """Runs one engine iteration starting at ``now`` (seconds; must not go backwards).

        Schedules RUNNING requests (preempting on block shortage), then, if nothing
        was preempted, admits WAITING ones; computes the scheduled tokens; publishes
        newly full blocks; samples one token for each request whose scheduled tokens
        reach its end. Duration: ``prefill_tokens / prefill_tokens_per_s``, plus, if
        any sequence decodes, ``decode_step_base_s + decode_step_per_seq_s * n +
        decode_step_per_context_token_s * context_tokens``.
        """
        if now < self._last_step_at:
            raise ValueError(f"step(now={now}) is earlier than the previous step at {self._last_step_at}")
        self._last_step_at = now
        scheduled, preempted = self._schedule()

        bs = self._bs
        outputs: list[tuple[str, EngineOutput]] = []
        prefill_tokens = decode_seqs = context_tokens = 0
        finished_any = False
        for r in scheduled:
            n, r.num_scheduled = r.num_scheduled, 0
            start = r.num_computed_tokens
            if start < r.prefill_end:
                prefill_tokens += n
            else:
                decode_seqs += 1
                context_tokens += start + 1
            r.num_computed_tokens = done = start + n
            if done // bs > r.num_cached_blocks:
                self._cache_full_blocks(r)
            if done < len(r.tokens):                  # a prefill chunk; no token yet
                self._set_pending(r, r.prefill_end - done)
                continue
            if r.pending_prefill:
                self._set_pending(r, 0)
            out = self._sample(r)
            outputs.append((r.request_id, out))
            if out.finished:
                self._finish(r)
                finished_any = True
        if finished_any:
            self._running = [r for r in self._running if r.status == _RUNNING]
        self.stats.generation_tokens += len(outputs)

        duration = prefill_tokens / self._prefill_rate
        if decode_seqs:
            duration += self._dec_base + self._dec_seq * decode_seqs + self._dec_ctx * context_tokens
        events, self._events = self._events, []
        return StepResult(duration, outputs, events, prefill_tokens, decode_seqs, preempted)

    def _schedule(self) -> tuple[list[_Request], int]:
        """Chooses this step's requests and token counts (``num_scheduled``), as vLLM does."""
        budget = self._max_batched
        running = self._running
        bs = self._bs
        scheduled: list[_Request] = []
        preempted = 0
        i = 0
        while i < len(running) and budget > 0:
            r = running[i]
            n = min(len(r.tokens) - r.num_computed_tokens, budget)
            need = r.num_computed_tokens + n
            # Most steps fit in the blocks a request holds: skip the call (it would return True).
            while need > len(r.blocks) * bs and not self._allocate(r, need):
                victim = max(running, key=_Request.sort_key)
                running.remove(victim)
                if victim.num_scheduled:              # scheduled earlier in this step: undo
                    budget += victim.num_scheduled
                    victim.num_scheduled = 0
                    scheduled.remove(victim)
                    i -= 1
                self._preempt(victim)
                preempted += 1
                if victim is r:
                    break
            else:
                r.num_scheduled = n
                scheduled.append(r)
                budget -= n
                i += 1
                continue
            break                                     # r itself was preempted

        if preempted:
            return scheduled, preempted
        heap, free, ref = self._waiting, self._free, self._ref
        while heap and budget > 0 and len(running) < self._max_seqs:
            r = heap[0][3]
            if r.status != _WAITING:                  # aborted while waiting
                heapq.heappop(heap)
                continue
            hits = self._lookup(r)
            computed = len(hits) * bs
            n = min(len(r.tokens) - computed, budget)
            new_blocks = -(-(computed + n) // bs) - len(hits)
            if new_blocks + sum(1 for b in hits if ref[b] == 0) > len(free):
                break                                 # head of line waits, as in vLLM
            heapq.heappop(heap)
            for b in hits:                            # pin the hit before allocating can evict it
                if ref[b] == 0:
                    free.remove(b)
                ref[b] += 1
            r.blocks = array("q", hits)
            r.num_computed_tokens = computed
            r.num_cached_blocks = len(hits)
            self._allocate(r, computed + n)
            st = self.stats
            st.prefix_cache_queries += len(r.tokens)
            st.prefix_cache_hits += computed
            if r.num_cached_tokens is None:
                r.num_cached_tokens = computed
                st.prompt_tokens += r.num_prompt_tokens
            r.prefill_end = len(r.tokens)
            self._set_pending(r, r.prefill_end - computed)
            r.status = _RUNNING
            self._num_waiting -= 1
            running.append(r)
            r.num_scheduled = n
            scheduled.append(r)
            budget -= n
        return scheduled, 0

    # ------------------------------------------------------------------ blocks

    def _lookup(self, r: _Request) -> list[int]:
        """The longest cached prefix of ``r``, capped so its last token is computed. O(hit)."""
        cap = min((len(r.tokens) - 1) // self._bs, len(r.block_hashes))
        cached, hashes = self._cached, r.block_hashes
        hits: list[int] = []
        for i in range(cap):
            b = cached.get(hashes[i])
            if b is None:
                break
            hits.append(b)
        return hits

    def _allocate(self, r: _Request, num_tokens: int) -> bool:
        """Gives ``r`` blocks for its first ``num_tokens`` tokens; False (no change) if too few free.

        Blocks come from the head of the free queue; a cached one loses its hash, and
        all hashes evicted by one call go out in one ``BlockRemoved``, in eviction order.
        """
        need = -(-num_tokens // self._bs) - len(r.blocks)
        if need <= 0:
            return True
        free = self._free
        if need > len(free):
            return False
        evicted: list[int] = []
        blocks, ref, bhash, cached = r.blocks, self._ref, self._hash, self._cached
        for _ in range(need):
            b = free.popleft()
            if b == len(ref):                         # never used: its slots are made now
                ref.append(1)
                bhash.append(0)
            else:
                h = bhash[b]
                if cached.get(h) == b:
                    del cached[h]
                    evicted.append(h)
                ref[b] = 1
            blocks.append(b)
        if evicted:
            self._events.append(BlockRemoved(block_hashes=evicted, medium=MEDIUM))
        return True

    def _cache_full_blocks(self, r: _Request) -> None:
        """Registers ``r``'s newly computed full blocks and publishes them as ``BlockStored``.

        A block whose hash is already cached is not stored again: ``r`` takes the
        cached block and returns its own copy to the free queue. Each run of newly
        stored blocks becomes one event whose parent is the block before the run.
        """
        bs = self._bs
        full = min(r.num_computed_tokens // bs, len(r.block_hashes))
        hashes, blocks, cached, ref = r.block_hashes, r.blocks, self._cached, self._ref
        run = -1
        for i in range(r.num_cached_blocks, full):
            h = hashes[i]
            existing = cached.get(h)
            if existing is None:
                self._hash[blocks[i]] = h
                cached[h] = blocks[i]
                if run < 0:
                    run = i
                continue
            if existing != blocks[i]:
                if ref[existing] == 0:
                    self._free.remove(existing)
                ref[existing] += 1
                own, blocks[i] = blocks[i], existing
                ref[own] -= 1
                if ref[own] == 0:
                    self._free.append(own)
            if run >= 0:
                self._publish(r, run, i)
                run = -1
        if run >= 0:
            self._publish(r, run, full)
        r.num_cached_blocks = full

    def _publish(self, r: _Request, start: int, end: int) -> None:
        bs = self._bs
        self._events.append(BlockStored(
            block_hashes=r.block_hashes[start:end].tolist(),
            parent_block_hash=r.block_hashes[start - 1] if start else None,
            token_ids=r.tokens[start * bs:end * bs].tolist(),
            block_size=bs,
            medium=MEDIUM,
        ))

    def _free_request_blocks(self, r: _Request) -> None:
        """Releases ``r``'s blocks tail first, so its leaves are evicted before its parents."""
        free, ref = self._free, self._ref
        for b in reversed(r.blocks):
            ref[b] -= 1
            if ref[b] == 0:
                free.append(b)
        r.blocks = array("q")
        r.num_cached_blocks = 0

    # ------------------------------------------------------------------ requests in flight

    def _enqueue(self, r: _Request) -> None:
        r.status = _WAITING
        heapq.heappush(self._waiting, (r.priority, r.arrival_time, r.arrival_seq, r))
        self._num_waiting += 1
        # Estimate of the work ahead; the hit is looked up again on admission.
        self._set_pending(r, len(r.tokens) - len(self._lookup(r)) * self._bs)

    def _preempt(self, r: _Request) -> None:
        """Frees all of ``r``'s blocks and requeues it to be recomputed (vLLM's recompute mode)."""
        self._free_request_blocks(r)
        r.num_computed_tokens = 0
        self.stats.num_preemptions += 1
        self._enqueue(r)

    def _finish(self, r: _Request) -> None:
        r.status = _FINISHED
        del self._requests[r.request_id]
        self._free_request_blocks(r)

    def _sample(self, r: _Request) -> EngineOutput:
        """Appends one generated token to ``r`` and decides whether ``r`` is finished.

        Runs once per generated token, so it is written for speed: the caller counts
        ``stats.generation_tokens``, and the common case of ``_TextStream.next_token``
        is inlined.
        """
        text = r.text
        pos = text._pos
        if not text._eos_threshold and pos < len(text._buf):
            tok = text._buf[pos]
            text._pos = pos + 1
        else:
            tok = text.next_token()
        tokens = r.tokens
        tokens.append(tok)
        r.num_output_tokens += 1
        bs = self._bs
        if len(tokens) % bs == 0:                     # a block of tokens is complete: name it
            r.block_hashes.append(self._hash_block(
                r.block_hashes[-1] if r.block_hashes else None,
                tokens[-bs:].tobytes(),
            ))
        # vLLM's order: length first, then EOS, then stop tokens.
        if r.num_output_tokens >= r.max_tokens or len(tokens) >= self._max_model_len:
            reason: str | None = "length"
        elif tok == self._eos or tok in r.stop_token_ids:
            reason = "stop"
        else:
            reason = None
        # Positional: (new_token_ids, finished, finish_reason, num_cached_tokens).
        return EngineOutput([tok], reason is not None, reason,
                            r.num_cached_tokens if r.num_output_tokens == 1 else None)

    def _set_pending(self, r: _Request, value: int) -> None:
        self._queued_prefill += value - r.pending_prefill
        r.pending_prefill = value

    def _text_seed(self, req: EngineRequest) -> int:
        """The output's seed: the request's seed; for greedy sampling, the prompt; else the id."""
        if req.seed is not None:
            return req.seed
        h = self._hasher.copy()
        if req.temperature == 0:
            h.update(array(_U32, req.prompt_token_ids).tobytes())
        else:
            h.update(req.request_id.encode())
        return int.from_bytes(h.digest(), "little")

    # ------------------------------------------------------------------ hashing

    def _hash_block(self, parent: int | None, token_bytes: bytes) -> int:
        h = self._hasher.copy()
        h.update(self._root if parent is None else parent.to_bytes(8, "little"))
        h.update(token_bytes)
        return int.from_bytes(h.digest(), "little")

    def engine_block_hashes(self, token_ids: Sequence[int], parent: int | None = None) -> list[int]:
        """The engine's hashes of the full blocks of ``token_ids`` (a trailing partial block is ignored).

        ``h_i = blake2b_64(key=hash_seed, h_{i-1} || tokens_i as uint32)``, with a seeded
        constant standing in for the parent of the first block. Deliberately unlike
        kvfleet's canonical hash, so the node agent's translation is exercised.
        O(len(token_ids)).
        """
        bs = self._bs
        if isinstance(token_ids, array) and token_ids.typecode == _U32:
            data = token_ids.tobytes()
        else:
            data = array(_U32, token_ids).tobytes()
        width = 4 * bs
        out: list[int] = []
        for i in range(len(token_ids) // bs):
            parent = self._hash_block(parent, data[i * width:(i + 1) * width])
            out.append(parent)
        return out

    # ------------------------------------------------------------------ cache control and load

    def reset_prefix_cache(self) -> bool:
        """Forgets every cached block and queues ``AllBlocksCleared``.

        As in vLLM, this only works when no request holds a block; otherwise it does
        nothing and returns False. The event comes out of the next ``step`` or
        ``drain_events``.
        """
        if len(self._free) != self._num_blocks:
            return False
        self._cached.clear()
        self._free.reset(self._num_blocks)
        self._ref, self._hash = array("i"), array("Q")
        self._events.append(AllBlocksCleared())
        return True

    def drain_events(self) -> list[KVEvent]:
        """Events produced outside ``step`` (by ``reset_prefix_cache``), taken now."""
        events, self._events = self._events, []
        return events

    def load(self) -> LoadSnapshot:
        """Load right now. ``queued_prefill_tokens`` counts, for waiting requests, their
        tokens minus the prefix hit they would get at arrival (or preemption); for
        running requests still in prefill, the tokens left to compute. ``decode_step_s``
        is the modelled duration of a step that decodes every running sequence, with the
        pinned blocks standing in for their context (0 when nothing runs). O(1)."""
        running, pinned = len(self._running), self.num_pinned_blocks
        step = (self._dec_base + self._dec_seq * running + self._dec_ctx * pinned * self._bs) if running else 0.0
        return LoadSnapshot(
            running=running,
            waiting=self._num_waiting,
            kv_usage=pinned / self._num_blocks,
            queued_prefill_tokens=self._queued_prefill,
            decode_step_s=step,
        )

    # ------------------------------------------------------------------ inspection (tests, simulator)

    @property
    def num_free_blocks(self) -> int:
        """Blocks no request holds (never used, anonymous, or cached and evictable)."""
        return len(self._free)

    @property
    def num_pinned_blocks(self) -> int:
        """Blocks held by at least one live request."""
        return self._num_blocks - len(self._free)

    def cached_block_hashes(self) -> list[int]:
        """Engine hashes of every cached block, in the order they were stored. O(cached)."""
        return list(self._cached)

    def evictable_block_hashes(self) -> list[int]:
        """Engine hashes of cached blocks no request holds, next eviction first. O(free)."""
        cached, bhash = self._cached, self._hash
        return [bhash[b] for b in self._free.blocks() if cached.get(bhash[b]) == b]

    def num_computed_tokens(self, request_id: str) -> int:
        """Tokens of a live request whose KV is computed; raises KeyError if not live."""
        return self._requests[request_id].num_computed_tokens

    def request_ids(self) -> tuple[list[str], list[str]]:
        """``(running, waiting)`` request ids; running in batch order, waiting in admission order."""
        waiting = [e[3] for e in sorted(self._waiting) if e[3].status == _WAITING]
        return [r.request_id for r in self._running], [r.request_id for r in waiting]
