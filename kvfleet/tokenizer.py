"""Tokenizers as files that travel over the wire.

A node serves its model's Hugging Face ``tokenizer.json`` (plus chat template and end
tokens) through ``GetTokenizer``; routers load it with the ``tokenizers`` library, so no
shared filesystem is needed and the router always encodes exactly as the engine does.
The sim engine's tokenizer is an ordinary ``tokenizer.json`` too: byte level, one token
per UTF-8 byte (ids 0..255), plus ``<|endoftext|>`` (256).
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import jinja2.sandbox
import numpy as np
from tokenizers import Tokenizer as HFTokenizer

from kvfleet.tokencache import SegmentEncoder


@dataclass(frozen=True, slots=True)
class TokenizerFiles:
    tokenizer_json: bytes
    chat_template: str = ""          # Jinja2; empty when the model has none
    eos_token_ids: list[int] = field(default_factory=list)
    bos_token: str = ""
    eos_token: str = ""

    @property
    def digest(self) -> str:
        """sha256 hex of ``tokenizer_json``: the identity of a tokenizer."""
        return hashlib.sha256(self.tokenizer_json).hexdigest()


# The sim engine's chat template: ChatML-like, rendered to plain bytes.
BYTE_CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
BYTE_EOS_ID = 256


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable-char map, as the ByteLevel pre-tokenizer uses."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


@functools.cache
def byte_level_tokenizer_files() -> TokenizerFiles:
    """The sim engine's tokenizer: token id == UTF-8 byte value; 256 is end-of-text."""
    b2u = _bytes_to_unicode()
    spec = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [
            {"id": BYTE_EOS_ID, "content": "<|endoftext|>", "single_word": False, "lstrip": False,
             "rstrip": False, "normalized": False, "special": True}
        ],
        "normalizer": None,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False},
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                  "vocab": {b2u[b]: b for b in range(256)}, "merges": []},
    }
    return TokenizerFiles(
        tokenizer_json=json.dumps(spec, sort_keys=True).encode(),
        chat_template=BYTE_CHAT_TEMPLATE,
        eos_token_ids=[BYTE_EOS_ID],
        eos_token="<|endoftext|>",
    )


def load_tokenizer_files(model_dir: str | Path) -> TokenizerFiles:
    """Reads a Hugging Face model directory's tokenizer.json and tokenizer_config.json."""
    d = Path(model_dir)
    tj = d / "tokenizer.json"
    if not tj.is_file():
        raise FileNotFoundError(f"{d}: no tokenizer.json")
    cfg: dict = {}
    if (d / "tokenizer_config.json").is_file():
        cfg = json.loads((d / "tokenizer_config.json").read_text())
    tok = HFTokenizer.from_str(tj.read_text())

    def _tok_str(v: object) -> str:
        return v.get("content", "") if isinstance(v, dict) else (v or "")  # type: ignore[union-attr]

    eos = _tok_str(cfg.get("eos_token"))
    eos_ids = [i for i in [tok.token_to_id(eos)] if eos and i is not None]
    template = cfg.get("chat_template") or ""
    if isinstance(template, list):  # named templates: take "default"
        template = next((t["template"] for t in template if t.get("name") == "default"), "")
    if not template and (d / "chat_template.jinja").is_file():
        template = (d / "chat_template.jinja").read_text()
    return TokenizerFiles(tj.read_bytes(), template, eos_ids, _tok_str(cfg.get("bos_token")), eos)


class Tokenizer:
    """Encodes and decodes exactly as the serving engine does.

    ``encode``/``encode_chat`` run the Hugging Face tokenizer on the whole text (the
    reference). ``encode_ids``/``encode_chat_ids`` give the same ids, reusing those of
    segments seen before from a cache of at most ``segment_cache_bytes`` bytes.
    """

    def __init__(self, files: TokenizerFiles, segment_cache_bytes: int = 64 << 20) -> None:
        self.files = files
        self._tok = HFTokenizer.from_str(files.tokenizer_json.decode())
        # Exact reuse of the ids of repeated prompt segments; see kvfleet.tokencache.
        self.segments = SegmentEncoder(self._tok, segment_cache_bytes)
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        self._template = env.from_string(files.chat_template) if files.chat_template else None

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``, with no special tokens added (templates add their own)."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def render_chat(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        if self._template is None:
            raise ValueError("this model has no chat template; send text or token ids")
        return self._template.render(
            messages=messages, add_generation_prompt=add_generation_prompt,
            bos_token=self.files.bos_token, eos_token=self.files.eos_token,
        )

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        return self.encode(self.render_chat(messages))

    def encode_ids(self, text: str) -> np.ndarray:
        """The ids of ``encode(text)`` as a read-only uint32 array, reusing the ids of
        segments seen before (exact; see kvfleet.tokencache). The router's hot path."""
        return self.segments.encode(text)

    def encode_chat_ids(self, messages: list[dict[str, str]]) -> np.ndarray:
        """The ids of ``encode_chat(messages)``, as ``encode_ids`` gives them."""
        return self.segments.encode(self.render_chat(messages))

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True)


class IncrementalDetokenizer:
    """Turns a growing token list into text deltas.

    A delta never ends in a partial UTF-8 sequence: text ending in U+FFFD is held back
    until the next tokens complete it (or ``flush``). Decoding re-reads only the tokens
    since the last emitted boundary plus a few before it, so the cost per token is flat.
    """

    _CONTEXT = 4  # tokens re-decoded before the boundary, so merges across it decode right

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tok = tokenizer
        self._ids: list[int] = []
        self._prefix = 0   # start of the window that is re-decoded
        self._read = 0     # tokens whose text has been emitted

    def push(self, ids: list[int]) -> str:
        self._ids.extend(ids)
        prefix_text = self._tok.decode(self._ids[self._prefix : self._read])
        text = self._tok.decode(self._ids[self._prefix :])
        if text.endswith("\ufffd") or len(text) <= len(prefix_text):
            return ""
        delta = text[len(prefix_text) :]
        self._prefix = max(0, len(self._ids) - self._CONTEXT)
        self._read = len(self._ids)
        return delta

    def flush(self) -> str:
        prefix_text = self._tok.decode(self._ids[self._prefix : self._read])
        text = self._tok.decode(self._ids[self._prefix :])
        self._read = len(self._ids)
        return text[len(prefix_text) :] if len(text) > len(prefix_text) else ""
