"""Cached, cut tokenisation gives exactly the ids of full encoding.

Tokenizers: the sim's byte-level one, small BPE/WordPiece tokenizers trained here (so the
cutting path is covered with no model on disk), and the tiny real model's (SmolLM2) when
its directory exists; ``tests/vllm/test_tokenizer_exact.py`` runs that one in CI after
``make tiny-model``, where a missing model fails instead of skipping.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import pytest
from tokenizers import AddedToken, Tokenizer as HFTokenizer, decoders, models, normalizers, pre_tokenizers
from tokenizers import processors, trainers

from kvfleet.tokencache import SegmentCache
from kvfleet.tokenizer import BYTE_EOS_ID, Tokenizer, TokenizerFiles, byte_level_tokenizer_files, load_tokenizer_files

MODEL_DIR = Path(os.environ.get("KVFLEET_MODEL_DIR") or "~/.cache/kvfleet/models/smollm2-135m").expanduser()

CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

# Pieces that stress span edges: unicode (multi-byte, combining, CJK, emoji), whitespace
# runs of every kind, digits, and added-token text or fragments of it inside content.
PIECES = [
    "the", " router", " cache", "é", "e\u0301", "日本語", "🙂", "👩‍💻", " ", "  ", "\n", "\n\n", "\t", "\r\n",
    " \n ", "123", "4567", "'s", "'ll", "—", "Ω", "ß", "İ", "x", "Hello", "WORLD", "<|", "|>", "<|im_",
    "<|im_start|>", "<|im_end|>", "<|endoftext|>", "</s>", "\u00a0", "\u3000",
]


def random_text(rng: random.Random, max_pieces: int = 40) -> str:
    return "".join(rng.choice(PIECES) for _ in range(rng.randint(0, max_pieces)))


def random_chats(seed: int, n: int) -> list[list[dict[str, str]]]:
    """Conversations that grow one turn at a time (so later ones reuse earlier segments),
    with empty messages and whitespace at both ends of contents."""
    rng = random.Random(seed)
    chats: list[list[dict[str, str]]] = []
    while len(chats) < n:
        msgs = [{"role": "system", "content": random_text(rng, 80)}]
        for turn in range(rng.randint(1, 8)):
            content = "" if rng.random() < 0.1 else random_text(rng)
            msgs = msgs + [{"role": "user" if turn % 2 == 0 else "assistant", "content": content}]
            chats.append(msgs)
    return chats[:n]


def assert_exact(tok: Tokenizer, seed: int = 0, n: int = 300) -> None:
    rng = random.Random(seed)
    for msgs in random_chats(seed, n):
        assert tok.encode_chat_ids(msgs).tolist() == tok.encode_chat(msgs), msgs
    for _ in range(n):
        text = random_text(rng, 60)
        assert tok.encode_ids(text).tolist() == tok.encode(text), text


def trained(pre: object, normalizer: object = None, model: str = "bpe", post: object = None) -> HFTokenizer:
    """A small tokenizer trained on ``PIECES``, with the ChatML special tokens."""
    corpus = [random_text(random.Random(i), 60) for i in range(300)]
    if model == "bpe":
        tok = HFTokenizer(models.BPE())
        trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS, show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    else:
        tok = HFTokenizer(models.WordPiece(unk_token="[UNK]"))
        trainer = trainers.WordPieceTrainer(vocab_size=400, special_tokens=["[UNK]", *SPECIALS], show_progress=False)
    tok.pre_tokenizer = pre
    if normalizer is not None:
        tok.normalizer = normalizer
    tok.train_from_iterator(corpus, trainer)
    if post is not None:
        tok.post_processor = post
    tok.decoder = decoders.ByteLevel()
    return tok


def wrap(hf: HFTokenizer) -> Tokenizer:
    return Tokenizer(TokenizerFiles(hf.to_str().encode(), CHATML, [0], eos_token="<|endoftext|>"))


SPAN_LOCAL = {
    "bytelevel-bpe": lambda: trained(pre_tokenizers.ByteLevel(add_prefix_space=False)),
    "bytelevel-prefix-space": lambda: trained(pre_tokenizers.ByteLevel(add_prefix_space=True)),
    "digits-bytelevel-nfkc-lowercase": lambda: trained(
        pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel()]),
        normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])),
    "metaspace-always": lambda: trained(pre_tokenizers.Metaspace(prepend_scheme="always")),
    "wordpiece-bert": lambda: trained(
        pre_tokenizers.BertPreTokenizer(), normalizers.BertNormalizer(), model="wordpiece",
        post=processors.BertProcessing(("<|im_end|>", 3), ("<|im_start|>", 2))),
}


# -- the sim's byte-level tokenizer ----------------------------------------------------------------

def test_byte_tokenizer_is_a_table_lookup_and_exact_on_random_chats():
    tok = Tokenizer(byte_level_tokenizer_files())
    assert tok.segments.plan.byte_lut is not None
    assert_exact(tok)
    assert tok.encode_ids("a<|endoftext|>b").tolist() == [97, BYTE_EOS_ID, 98]


# -- cutting at added tokens -------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(SPAN_LOCAL))
def test_cut_encoding_is_exact_for_span_local_tokenizers(name):
    tok = wrap(SPAN_LOCAL[name]())
    assert tok.segments.plan.special is not None, tok.segments.plan.reason
    assert_exact(tok, seed=len(name))


def test_repeated_history_is_served_from_the_cache_and_only_the_new_turn_is_encoded():
    tok = wrap(SPAN_LOCAL["bytelevel-bpe"]())
    history = [{"role": "system", "content": "you are terse " * 50}, {"role": "user", "content": "hi 🙂"},
               {"role": "assistant", "content": "hello"}]
    tok.encode_chat_ids(history + [{"role": "user", "content": "first question"}])
    cache = tok.segments.cache
    before = (cache.hits, cache.misses, cache.miss_tokens)
    new = history + [{"role": "user", "content": "second question"}]
    assert tok.encode_chat_ids(new).tolist() == tok.encode_chat(new)
    assert cache.misses - before[1] == 1                                  # the new turn only
    assert cache.miss_tokens - before[2] == len(tok.encode("user\nsecond question"))
    # each old message and the "\n" after it, the "\n" after the new turn, "assistant\n"
    assert cache.hits - before[0] == len(history) * 2 + 2


def test_overlapping_added_tokens_are_cut_leftmost_longest_as_tokenizers_matches_them():
    hf = trained(pre_tokenizers.ByteLevel(add_prefix_space=False))
    hf.add_special_tokens([AddedToken("<|im", special=True, normalized=False)])   # a prefix of <|im_start|>
    tok = wrap(hf)
    assert tok.encode_ids("a<|im_start|>b<|imx").tolist() == tok.encode("a<|im_start|>b<|imx")
    assert_exact(tok, n=100)


def test_metaspace_prepend_first_turns_cutting_off_because_it_would_change_ids():
    hf = trained(pre_tokenizers.Metaspace(prepend_scheme="first"))
    tok = wrap(hf)
    assert tok.segments.plan.special is None and "first" in tok.segments.plan.reason
    naive = tok.encode("the") + [hf.token_to_id("<|im_start|>")] + tok.encode("the")
    assert tok.encode("the<|im_start|>the") != naive    # the reason: a later span gets no "▁"
    assert_exact(tok, n=100)


def test_added_token_that_strips_whitespace_turns_cutting_off():
    hf = trained(pre_tokenizers.ByteLevel(add_prefix_space=False))
    hf.add_special_tokens([AddedToken("<tool>", lstrip=True, special=True)])
    tok = wrap(hf)
    assert tok.segments.plan.special is None and "strips" in tok.segments.plan.reason
    assert tok.encode_ids("a   <tool> b").tolist() == tok.encode("a   <tool> b")


def test_tokenizer_that_truncates_turns_cutting_off():
    hf = trained(pre_tokenizers.ByteLevel(add_prefix_space=False))
    hf.enable_truncation(16)
    tok = wrap(hf)
    assert tok.segments.plan.special is None and "truncates" in tok.segments.plan.reason
    text = "the router " * 20 + "<|im_end|>" + "cache " * 10
    assert tok.encode_ids(text).tolist() == tok.encode(text)


def test_empty_text_gives_an_empty_array():
    for tok in (Tokenizer(byte_level_tokenizer_files()), wrap(SPAN_LOCAL["bytelevel-bpe"]())):
        ids = tok.encode_ids("")
        assert ids.dtype == np.uint32 and len(ids) == 0


def test_cached_ids_are_read_only_so_no_request_can_corrupt_another():
    tok = wrap(SPAN_LOCAL["bytelevel-bpe"]())
    tok.encode_ids("the router")
    ids = tok.encode_ids("the router")
    with pytest.raises(ValueError):
        ids[0] = 1


# -- the LRU -----------------------------------------------------------------------------------

def test_segment_cache_evicts_least_recently_used_to_stay_within_its_byte_budget():
    ids = np.arange(100, dtype=np.uint32)
    one = SegmentCache.cost("k0", ids)
    cache = SegmentCache(max_bytes=one * 4)
    for k in ("k0", "k1", "k2", "k3"):
        cache.put(k, ids.copy())
    assert cache.get("k0") is not None       # k0 is now the most recent
    cache.put("k4", ids.copy())
    assert cache.get("k1") is None and cache.get("k0") is not None and len(cache) == 4
    assert cache.bytes <= cache.max_bytes


def test_segment_cache_does_not_keep_a_segment_larger_than_a_quarter_of_its_budget():
    cache = SegmentCache(max_bytes=10_000)
    cache.put("big", np.zeros(1_000, dtype=np.uint32))
    assert len(cache) == 0 and cache.bytes == 0


# -- the tiny real model -------------------------------------------------------------------------

@pytest.mark.skipif(not (MODEL_DIR / "tokenizer.json").is_file(),
                    reason=f"no tiny model at {MODEL_DIR} (make tiny-model); tests/vllm runs this in CI")
def test_smollm2_cut_encoding_is_exact_on_random_chats():
    tok = Tokenizer(load_tokenizer_files(MODEL_DIR))
    assert tok.segments.plan.special is not None, tok.segments.plan.reason
    assert_exact(tok, n=400)


# -- the benchmark -------------------------------------------------------------------------------

def test_tokenize_bench_runs_and_warm_beats_full(tmp_path):
    import importlib.util
    import sys

    path = Path(__file__).resolve().parents[2] / "bench" / "bench_tokenize.py"
    spec = importlib.util.spec_from_file_location("bench_tokenize", path)
    bench = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = bench
    spec.loader.exec_module(bench)
    r = bench.main(["--quick", "--tokenizer", str(tmp_path)])     # byte-level only: no model there
    (byte,) = r["tokenizers"].values()
    assert 7000 <= byte["prompt_tokens"] <= 8000
    assert 0 < byte["warm_us"]["p50"] < byte["full_us"]["p50"]
