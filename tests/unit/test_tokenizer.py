"""The byte-level sim tokenizer and incremental detokenisation."""

from __future__ import annotations

from kvfleet.tokenizer import BYTE_EOS_ID, IncrementalDetokenizer, Tokenizer, byte_level_tokenizer_files


def tok() -> Tokenizer:
    return Tokenizer(byte_level_tokenizer_files())


def test_byte_tokenizer_gives_one_token_per_utf8_byte():
    s = "héllo 🙂"
    assert tok().encode(s) == list(s.encode())


def test_byte_tokenizer_round_trips_and_skips_eos():
    t = tok()
    s = "mixed ünïcode ✓"
    assert t.decode(t.encode(s) + [BYTE_EOS_ID]) == s
    assert t.vocab_size == 257


def test_digest_is_stable_and_identifies_the_file():
    a, b = byte_level_tokenizer_files(), byte_level_tokenizer_files()
    assert a.digest == b.digest and len(a.digest) == 64


def test_incremental_detokenizer_never_splits_a_utf8_sequence():
    t = tok()
    s = "a🙂b ü"
    d = IncrementalDetokenizer(t)
    deltas = [d.push([i]) for i in t.encode(s)]
    assert "".join(deltas) + d.flush() == s
    assert all("\ufffd" not in x for x in deltas)


def test_chat_template_renders_roles_and_generation_prompt():
    t = tok()
    text = t.render_chat([{"role": "system", "content": "S"}, {"role": "user", "content": "U"}])
    assert text == "<|system|>\nS\n<|user|>\nU\n<|assistant|>\n"
    assert t.encode_chat([{"role": "user", "content": "U"}]) == list(b"<|user|>\nU\n<|assistant|>\n")
