"""Request streams for the routing simulator: traces and generators.

A workload is a re-iterable object: each ``iter()`` yields the same
:class:`TraceRequest` s in arrival order (deterministic for a given seed), so the
simulator can make one pass for bounds and capacity and one per policy without holding
every prompt in memory. Arrival times are in the workload's own seconds; the
simulator rescales them to a target load.

Token ids are drawn from ``0..vocab_size-1`` (default 32,000, inside every preset's
vocabulary). Content is synthetic: only which requests share which prefixes matters.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Iterator

import numpy as np

MOONCAKE_BLOCK = 512
"""Tokens per ``hash_id`` in Mooncake traces."""
DEFAULT_VOCAB = 32_000

_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


@dataclass(frozen=True, slots=True)
class TraceRequest:
    arrival_s: float            # arrival, seconds from the workload's start
    prompt: np.ndarray          # prompt token ids, uint32
    output_tokens: int          # tokens to generate (the engine stops at exactly this many)


def _mix(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser, elementwise (uint64)."""
    with np.errstate(over="ignore"):
        x = x ^ (x >> np.uint64(30))
        x = x * _M1
        x = x ^ (x >> np.uint64(27))
        x = x * _M2
        return x ^ (x >> np.uint64(31))


def synthetic_tokens(stream: int, start: int, n: int, vocab_size: int) -> np.ndarray:
    """Tokens ``start..start+n-1`` of a deterministic pseudo-random token stream named
    ``stream``. Equal (stream, position) give equal tokens, so equal streams share prefixes."""
    pos = np.arange(start, start + n, dtype=np.uint64)
    key = np.uint64((stream * 0x9E3779B97F4A7C15 + 0x5851F42D4C957F2D) & ((1 << 64) - 1))
    return (_mix(pos ^ key) % np.uint64(vocab_size)).astype(np.uint32)


class Mooncake:
    """Mooncake JSONL (``timestamp`` ms, ``input_length``, ``output_length``, ``hash_ids``).

    Each hash id stands for a deterministic 512-token block derived from the id alone,
    so requests that share leading ids share those tokens exactly (Mooncake's ids are
    prefix-chained: an id always has the same predecessor). The last block is truncated
    to ``input_length``.
    """

    def __init__(self, path: str | Path, *, limit: int | None = None, vocab_size: int = DEFAULT_VOCAB) -> None:
        self.path, self.limit, self.vocab_size = Path(path), limit, vocab_size

    def __iter__(self) -> Iterator[TraceRequest]:
        offsets = np.arange(MOONCAKE_BLOCK, dtype=np.uint64)
        with self.path.open() as f:
            for i, line in enumerate(f):
                if self.limit is not None and i >= self.limit:
                    return
                r = json.loads(line)
                ids = np.asarray(r["hash_ids"], dtype=np.uint64)
                pos = (ids[:, None] * np.uint64(MOONCAKE_BLOCK) + offsets).reshape(-1)
                prompt = (_mix(pos ^ np.uint64(0x6D6F6F6E)) % np.uint64(self.vocab_size)).astype(np.uint32)
                yield TraceRequest(r["timestamp"] / 1000.0, prompt[: r["input_length"]], max(1, r["output_length"]))


class Azure:
    """Azure LLM inference trace CSV (``TIMESTAMP,ContextTokens,GeneratedTokens``).

    The trace has no prefix information, so prefixes are synthesised by a stated model:
    each request picks one of ``num_prefixes`` system prompts with Zipf(``zipf_s``)
    popularity (rank k has weight ``k**-s``); prompt k is ``prefix_len[k]`` tokens
    long, log-uniform in [256, 4,096] (seeded). The request's first
    ``min(prefix_len[k], share * ContextTokens)`` tokens are that prompt's, and the rest
    are unique to the request.
    """

    def __init__(self, path: str | Path, *, limit: int | None = None, num_prefixes: int = 64,
                 zipf_s: float = 1.1, share: float = 0.8, seed: int = 0, vocab_size: int = DEFAULT_VOCAB) -> None:
        self.path, self.limit, self.vocab_size, self.seed = Path(path), limit, vocab_size, seed
        self.num_prefixes, self.zipf_s, self.share = num_prefixes, zipf_s, share

    def __iter__(self) -> Iterator[TraceRequest]:
        rng = np.random.default_rng(self.seed)
        lens = np.exp(rng.uniform(np.log(256), np.log(4096), self.num_prefixes)).astype(int)
        w = np.arange(1, self.num_prefixes + 1, dtype=float) ** -self.zipf_s
        w /= w.sum()
        t0 = None
        with self.path.open() as f:
            for i, row in enumerate(csv.DictReader(f)):
                if self.limit is not None and i >= self.limit:
                    return
                ts = row["TIMESTAMP"]
                # 7 fractional digits: datetime takes at most 6.
                t = datetime.fromisoformat(ts[:26]).timestamp() if "." in ts else datetime.fromisoformat(ts).timestamp()
                t0 = t if t0 is None else t0
                n, out = max(1, int(row["ContextTokens"])), max(1, int(row["GeneratedTokens"]))
                k = int(rng.choice(self.num_prefixes, p=w))
                shared = int(min(lens[k], self.share * n))
                prompt = np.concatenate([
                    synthetic_tokens(1_000_000 + k, 0, shared, self.vocab_size),
                    synthetic_tokens(2_000_000_000 + i, 0, n - shared, self.vocab_size),
                ])
                yield TraceRequest(t - t0, prompt, out)


class Chat:
    """Multi-turn conversations (open loop).

    Conversations start as a Poisson process (rate 1/s; the simulator rescales time).
    Each picks a system prompt among ``num_system`` by Zipf(``zipf_s``) popularity
    (``system_tokens`` long) and has a geometric number of turns (mean ``mean_turns``,
    at most ``max_turns``). Turn j's prompt is the system prompt, then every earlier
    (user, assistant) pair, then the new user message, so each turn extends the last
    turn's prompt. User messages are lognormal (median ``user_tokens``), replies
    lognormal (median ``reply_tokens``). The next turn arrives ``think_s``
    (exponential mean) after this one's arrival: the generator cannot know the
    simulated response time.

    The assistant tokens in the history are synthetic, not what the sim engine
    generated, so the engine's cached output blocks never match them: each turn
    recomputes the previous reply (a few hundred tokens) but hits everything before it.
    """

    def __init__(self, *, requests: int = 2000, num_system: int = 32, zipf_s: float = 1.1,
                 system_tokens: int = 1024, mean_turns: float = 4.0, max_turns: int = 16,
                 user_tokens: int = 128, reply_tokens: int = 256, think_s: float = 30.0,
                 seed: int = 0, vocab_size: int = DEFAULT_VOCAB) -> None:
        self.requests, self.num_system, self.zipf_s, self.system_tokens = requests, num_system, zipf_s, system_tokens
        self.mean_turns, self.max_turns, self.user_tokens, self.reply_tokens = mean_turns, max_turns, user_tokens, reply_tokens
        self.think_s, self.seed, self.vocab_size = think_s, seed, vocab_size

    def __iter__(self) -> Iterator[TraceRequest]:
        rng = np.random.default_rng(self.seed)
        w = np.arange(1, self.num_system + 1, dtype=float) ** -self.zipf_s
        w /= w.sum()
        # (arrival, conversation, turn, lengths of the (user, reply) pairs); built up front
        # because turns of different conversations interleave.
        reqs: list[tuple[float, int, int, int]] = []
        convs: list[tuple[int, list[int], list[int]]] = []
        t, c = 0.0, 0
        while len(reqs) < self.requests:
            t += rng.exponential(1.0)
            turns = min(int(rng.geometric(1.0 / self.mean_turns)), self.max_turns)
            users = np.maximum(1, rng.lognormal(np.log(self.user_tokens), 0.6, turns).astype(int)).tolist()
            replies = np.maximum(1, rng.lognormal(np.log(self.reply_tokens), 0.6, turns).astype(int)).tolist()
            convs.append((int(rng.choice(self.num_system, p=w)), users, replies))
            at = t
            for j in range(turns):
                reqs.append((at, c, j, 0))
                at += rng.exponential(self.think_s)
            c += 1
        reqs.sort()
        for at, c, j, _ in reqs[: self.requests]:
            sys_id, users, replies = convs[c]
            parts = [synthetic_tokens(1_000_000 + sys_id, 0, self.system_tokens, self.vocab_size)]
            for k in range(j + 1):
                parts.append(synthetic_tokens(3_000_000_000 + 2 * (c * self.max_turns + k), 0, users[k], self.vocab_size))
                if k < j:
                    parts.append(synthetic_tokens(3_000_000_001 + 2 * (c * self.max_turns + k), 0, replies[k], self.vocab_size))
            yield TraceRequest(float(at), np.concatenate(parts), replies[j])


class SharedPrefix:
    """SGLang's ``generated-shared-prefix`` benchmark: ``groups`` system prompts of
    ``system_tokens``, each followed by ``per_group`` questions of ``question_tokens``,
    ``output_tokens`` generated. Requests are shuffled (seeded), as SGLang's
    ``bench_serving`` does, and arrive as a Poisson process of rate 1/s (the simulator
    rescales time)."""

    def __init__(self, *, groups: int = 64, per_group: int = 16, system_tokens: int = 2048,
                 question_tokens: int = 128, output_tokens: int = 256, requests: int | None = None,
                 seed: int = 0, vocab_size: int = DEFAULT_VOCAB) -> None:
        self.groups, self.per_group, self.system_tokens = groups, per_group, system_tokens
        self.question_tokens, self.output_tokens, self.requests = question_tokens, output_tokens, requests
        self.seed, self.vocab_size = seed, vocab_size

    def __iter__(self) -> Iterator[TraceRequest]:
        rng = np.random.default_rng(self.seed)
        pairs = [(g, q) for g in range(self.groups) for q in range(self.per_group)]
        order = rng.permutation(len(pairs))
        n = len(pairs) if self.requests is None else min(self.requests, len(pairs))
        gaps = rng.exponential(1.0, n)
        t = 0.0
        for i in range(n):
            g, q = pairs[order[i]]
            t += gaps[i]
            prompt = np.concatenate([
                synthetic_tokens(4_000_000 + g, 0, self.system_tokens, self.vocab_size),
                synthetic_tokens(5_000_000_000 + g * self.per_group + q, 0, self.question_tokens, self.vocab_size),
            ])
            yield TraceRequest(float(t), prompt, self.output_tokens)


def load_workload(*, trace: str | None = None, fmt: str = "mooncake", workload: str | None = None,
                  requests: int | None = None, seed: int = 0):
    """The workload the CLI's flags name."""
    if (trace is None) == (workload is None):
        raise ValueError("give exactly one of --trace and --workload")
    if trace is not None:
        if fmt == "mooncake":
            return Mooncake(trace, limit=requests)
        if fmt == "azure":
            return Azure(trace, limit=requests, seed=seed)
        raise ValueError(f"unknown trace format {fmt!r}; known: mooncake, azure")
    if workload == "chat":
        return Chat(requests=requests or 2000, seed=seed)
    if workload == "shared-prefix":
        return SharedPrefix(requests=requests, seed=seed)
    raise ValueError(f"unknown workload {workload!r}; known: chat, shared-prefix")
