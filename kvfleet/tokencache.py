"""Exact, incremental tokenisation: token ids of prompt segments seen before are reused.

Real chat requests repeat their system prompt, tool definitions and earlier turns; only
the last turn is new. Encoding all of it again costs milliseconds at 8,000 tokens.

**Why cutting is exact.** Hugging Face ``tokenizers`` first cuts its input at every
added token that is matched before normalisation ("non-normalized": the ``<|im_start|>``
and ``<|im_end|>`` a chat template inserts), leftmost-longest, and then normalises,
pre-tokenises and encodes each span between them on its own. So, for such a token S::

    encode(a + S + b) == encode(a) + [id(S)] + encode(b)

provided that no later stage looks at where a span sits in the original string. Only
components known to act on a span alone are admitted (the ``_SPAN_LOCAL_*`` sets). One
that does look, Metaspace with ``prepend_scheme: "first"`` (it prepends "▁" only when
``offsets_original().0 == 0``), turns cutting off, and so do added tokens with
``lstrip``/``rstrip``/``single_word`` (they move where spans begin), truncation or
padding in the tokenizer file, and ``encode_special_tokens``. A self-check on probe
strings at construction backs the analysis up; if it ever disagrees, cutting is off.
When cutting is off, the whole text is one segment: still exact, reused only when the
identical text comes again.

**Char-local tokenizers** (the sim engine's byte-level one: ByteLevel bytes, BPE with no
merges) map each UTF-8 byte on its own, so every span is one table lookup and nothing
needs caching.

Segments are keyed by the segment text itself: Python's string hash (SipHash, cached on
the string) finds the entry and a string comparison confirms it, so a hash collision can
never return the wrong ids.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import threading
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
from tokenizers import Tokenizer as HFTokenizer

log = logging.getLogger(__name__)

TOKEN_DTYPE = np.uint32

# Components that act on each span alone (no offsets, no neighbours). Any other type
# turns cutting off: an unknown component is assumed to look across spans.
_SPAN_LOCAL_NORMALIZERS = {
    "NFC", "NFD", "NFKC", "NFKD", "Lowercase", "Strip", "StripAccents", "Replace", "Prepend",
    "BertNormalizer", "Precompiled", "Nmt", "ByteLevel", "Sequence",
}
_SPAN_LOCAL_PRE_TOKENIZERS = {
    "ByteLevel", "Split", "Digits", "Whitespace", "WhitespaceSplit", "Punctuation", "BertPreTokenizer",
    "UnicodeScripts", "CharDelimiterSplit", "Metaspace", "Sequence",
}
# With add_special_tokens=False these leave ids alone (they only add tokens or fix offsets).
_IDS_NEUTRAL_POST_PROCESSORS = {"TemplateProcessing", "RobertaProcessing", "BertProcessing", "ByteLevel", "Sequence"}

# Bytes an entry costs beyond its key's string and its ids: the ndarray header (112) and
# the OrderedDict's slot and link (~100).
_ENTRY_OVERHEAD = 212


@dataclass(frozen=True, slots=True)
class SplitPlan:
    """How one tokenizer's input may be cut without changing its ids."""

    special: re.Pattern[str] | None   # the non-normalized added tokens, longest first; None: no cutting
    special_ids: dict[str, int]       # added token text -> id
    byte_lut: np.ndarray | None       # id of each UTF-8 byte value, when the tokenizer is char-local
    reason: str                       # why cutting is off ("" when on)


def _types(node: dict | None, children: str) -> list[dict]:
    """The node and, for a Sequence, its members (recursively)."""
    if not node:
        return []
    if node.get("type") == "Sequence":
        return [node] + [t for c in node.get(children, []) for t in _types(c, children)]
    return [node]


def _state(component: object) -> dict | None:
    """A live tokenizers component as its JSON definition (None when absent)."""
    return None if component is None else json.loads(component.__getstate__())


def _why_not_span_local(tok: HFTokenizer) -> str:
    if tok.truncation or tok.padding:
        return "the tokenizer truncates or pads"
    if getattr(tok, "encode_special_tokens", False):
        return "encode_special_tokens is on"
    for n in _types(_state(tok.normalizer), "normalizers"):
        if n.get("type") not in _SPAN_LOCAL_NORMALIZERS:
            return f"normalizer {n.get('type')} is not known to be span-local"
    for p in _types(_state(tok.pre_tokenizer), "pretokenizers"):
        if p.get("type") not in _SPAN_LOCAL_PRE_TOKENIZERS:
            return f"pre-tokenizer {p.get('type')} is not known to be span-local"
        if p.get("type") == "Metaspace" and p.get("prepend_scheme", "always") not in ("always", "never"):
            return "Metaspace prepend_scheme 'first' depends on where a span starts"
    for p in _types(_state(tok.post_processor), "processors"):
        if p.get("type") not in _IDS_NEUTRAL_POST_PROCESSORS:
            return f"post-processor {p.get('type')} may change ids"
    return ""


def _byte_lut(tok: HFTokenizer) -> np.ndarray | None:
    """Each byte's id when the tokenizer maps UTF-8 bytes one by one, else None."""
    from kvfleet.tokenizer import _bytes_to_unicode  # the GPT-2 byte -> char map

    if tok.normalizer is not None or tok.get_vocab_size(with_added_tokens=False) > 1024:
        return None  # (a large vocabulary means merges; skip reading the model)
    pre = _state(tok.pre_tokenizer) or {}
    if pre.get("type") != "ByteLevel" or pre.get("add_prefix_space"):
        return None
    model = _state(tok.model) or {}
    if model.get("type") != "BPE" or model.get("merges") or model.get("dropout"):
        return None
    if model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
        return None
    vocab: dict[str, int] = model.get("vocab") or {}
    if model.get("ignore_merges") and any(len(k) > 1 for k in vocab):
        return None  # a whole pre-token could then be one multi-char token
    b2u = _bytes_to_unicode()
    if any(b2u[b] not in vocab for b in range(256)):
        return None
    return np.array([vocab[b2u[b]] for b in range(256)], dtype=TOKEN_DTYPE)


def plan_splits(tok: HFTokenizer) -> SplitPlan:
    """Decides, from the tokenizer's own components, where its input may be cut exactly."""
    added = tok.get_added_tokens_decoder()
    special_ids = {t.content: i for i, t in added.items()}
    cut = [t for t in added.values() if not t.normalized and t.content]
    if getattr(tok, "encode_special_tokens", False):
        cut = [t for t in cut if not t.special]
    off = _why_not_span_local(tok)
    if not off and any(t.lstrip or t.rstrip or t.single_word for t in cut):
        off = "an added token strips whitespace or needs word boundaries"
    pattern = None
    if cut and not off:
        # Python's regex takes the first alternative that matches at the leftmost
        # position; longest first makes that leftmost-longest, as tokenizers matches.
        contents = sorted({t.content for t in cut}, key=len, reverse=True)
        pattern = re.compile("(" + "|".join(map(re.escape, contents)) + ")")
    lut = _byte_lut(tok) if not off else None
    return SplitPlan(pattern, special_ids, lut, off or ("" if cut else "no added tokens to cut at"))


class SegmentCache:
    """LRU map from segment text to its token ids, bounded by bytes.

    Memory per entry: the key string (``sys.getsizeof``: ~49 bytes + 1, 2 or 4 bytes per
    character), 4 bytes per token, plus ``_ENTRY_OVERHEAD``. Lookup and insert are O(1)
    (dict plus the OrderedDict's linked list); eviction pops least recently used entries.
    A lock makes it safe to share between threads; under asyncio it is never contended.
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._entries: OrderedDict[str, np.ndarray] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0            # segments found
        self.misses = 0          # segments encoded
        self.hit_tokens = 0
        self.miss_tokens = 0

    @staticmethod
    def cost(key: str, ids: np.ndarray) -> int:
        return sys.getsizeof(key) + ids.nbytes + _ENTRY_OVERHEAD

    def get(self, key: str) -> np.ndarray | None:
        return self.get_many([key])[0]

    def get_many(self, keys: list[str]) -> list[np.ndarray | None]:
        """The ids of each key (None when absent; empty keys are not counted), under one lock."""
        out: list[np.ndarray | None] = []
        entries = self._entries
        with self._lock:
            for key in keys:
                ids = entries.get(key)
                if ids is not None:
                    entries.move_to_end(key)
                    self.hits += 1
                    self.hit_tokens += len(ids)
                out.append(ids)
        return out

    def put(self, key: str, ids: np.ndarray) -> None:
        cost = self.cost(key, ids)
        with self._lock:
            self.misses += 1
            self.miss_tokens += len(ids)
            if cost > self.max_bytes // 4 or key in self._entries:
                return  # one huge segment would flush everything else
            ids.flags.writeable = False  # shared between requests
            self._entries[key] = ids
            self._bytes += cost
            while self._bytes > self.max_bytes:
                k, v = self._entries.popitem(last=False)
                self._bytes -= self.cost(k, v)

    @property
    def bytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._entries)


_EMPTY = np.empty(0, dtype=TOKEN_DTYPE)
_EMPTY.flags.writeable = False


class SegmentEncoder:
    """``encode`` that gives exactly the ids of ``tokenizers``' own ``encode`` (without
    added special tokens), as a read-only uint32 array, reusing cached segments."""

    def __init__(self, tok: HFTokenizer, cache_bytes: int = 64 << 20) -> None:
        self._tok = tok
        self.plan = plan_splits(tok)
        self.cache = SegmentCache(cache_bytes)
        self._single = {t: np.array([i], dtype=TOKEN_DTYPE) for t, i in self.plan.special_ids.items()}
        for a in self._single.values():
            a.flags.writeable = False
        mismatch = self._self_check()
        if mismatch:
            log.warning("tokenizer: cutting at added tokens is off: %s", mismatch)
            self.plan = SplitPlan(None, self.plan.special_ids, None, mismatch)
            self.cache = SegmentCache(cache_bytes)

    def _reference(self, text: str) -> np.ndarray:
        return np.array(self._tok.encode(text, add_special_tokens=False).ids, dtype=TOKEN_DTYPE)

    def encode(self, text: str) -> np.ndarray:
        plan, single = self.plan, self._single
        # With a capturing group, split gives [span, token, span, token, ..., span].
        pieces = plan.special.split(text) if plan.special is not None else [text]
        if plan.byte_lut is not None:
            lut = plan.byte_lut
            parts = [lut[np.frombuffer(p.encode(), dtype=np.uint8)] if i % 2 == 0 else single[p]
                     for i, p in enumerate(pieces) if p]
        else:
            found = self.cache.get_many(pieces[0::2])
            parts = []
            for i, p in enumerate(pieces):
                if i % 2:
                    parts.append(single[p])
                elif p:          # an empty span encodes to nothing, as in the full text
                    ids = found[i // 2]
                    if ids is None:
                        ids = self._reference(p)
                        self.cache.put(p, ids)
                    parts.append(ids)
        if not parts:
            return _EMPTY
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def _self_check(self) -> str:
        """'' if cut encoding matches full encoding on probe strings, else the first miss."""
        plan = self.plan
        if plan.special is None and plan.byte_lut is None:
            return ""
        tokens = sorted(plan.special_ids)[:4]
        spans = ["", " ", "\n", "  x ", "héllo wörld", " 12345 ", "🙂 a\t", "\n\nnew para", "tail  "]
        probes = [a + s + b for s in tokens for a, b in zip(spans, reversed(spans))]
        probes += ["".join(tokens) + "x" + "".join(reversed(tokens)), "plain text only", ""]
        for text in probes:
            if not np.array_equal(self.encode(text), self._reference(text)):
                return f"self-check failed on {text!r}"
        self.cache = SegmentCache(self.cache.max_bytes)  # the probes are not worth keeping
        return ""
