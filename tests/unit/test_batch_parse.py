"""The batch input format: every non-blank line is exactly one item or one error."""

from __future__ import annotations

import json

import pytest

from kvfleet.controller.batch.parse import (
    CHAT_URL, COMPLETIONS_URL, DEFAULT_WINDOW_S, BatchFileError, parse_batch, parse_window,
)

MODELS = {"m1", "m2"}


def chat(cid, content="hi", model="m1", **body) -> dict:
    return {"custom_id": cid, "method": "POST", "url": CHAT_URL,
            "body": {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": 8, **body}}


def jsonl(*lines) -> bytes:
    return "\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines).encode()


def test_valid_chat_and_completion_lines_become_normalised_items():
    data = jsonl(chat("a", temperature=0.5, top_p=0.9, seed=7, stop="END"),
                 {"custom_id": "b", "method": "POST", "url": COMPLETIONS_URL,
                  "body": {"model": "m2", "prompt": "Once", "max_completion_tokens": 3, "user": "ignored"}})
    p = parse_batch(data, MODELS)
    assert p.errors == [] and p.lines == 2
    by_id = {it.custom_id: it for it in p.items}
    assert by_id["a"].request == {"model": "m1", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8,
                                  "temperature": 0.5, "top_p": 0.9, "seed": 7, "stop": ["END"]}
    assert by_id["a"].line == 1 and by_id["a"].url == CHAT_URL
    assert by_id["b"].request == {"model": "m2", "prompt": "Once", "max_tokens": 3}
    assert by_id["b"].line == 2


@pytest.mark.parametrize("line, code, cid", [
    ("{not json", "invalid_json", ""),
    ("[1, 2]", "invalid_request", ""),
    (json.dumps({**chat("x"), "custom_id": ""}), "missing_custom_id", ""),
    (json.dumps({k: v for k, v in chat("x").items() if k != "custom_id"}), "missing_custom_id", ""),
    (json.dumps({**chat("x"), "custom_id": 5}), "invalid_custom_id", ""),
    (json.dumps({**chat("x"), "method": "GET"}), "unsupported_method", "x"),
    (json.dumps({**chat("x"), "url": "/v1/embeddings"}), "unsupported_url", "x"),
    (json.dumps({**chat("x"), "body": None}), "missing_body", "x"),
    (json.dumps(chat("x", model="nope")), "unknown_model", "x"),
    (json.dumps({**chat("x"), "body": {"messages": [{"role": "user", "content": "a"}], "max_tokens": 1}}), "missing_model", "x"),
    (json.dumps({**chat("x"), "body": {"model": "m1", "messages": [], "max_tokens": 1}}), "missing_messages", "x"),
    (json.dumps({**chat("x"), "body": {"model": "m1", "messages": [{"role": "robot", "content": "a"}], "max_tokens": 1}}), "invalid_messages", "x"),
    (json.dumps({**chat("x"), "body": {"model": "m1", "messages": [{"role": "user", "content": 3}], "max_tokens": 1}}), "invalid_messages", "x"),
    (json.dumps({**chat("x"), "body": {"model": "m1", "messages": [{"role": "user", "content": "a"}]}}), "missing_max_tokens", "x"),
    (json.dumps(chat("x", max_tokens=0)), "invalid_max_tokens", "x"),
    (json.dumps(chat("x", max_tokens="8")), "invalid_max_tokens", "x"),
    (json.dumps(chat("x", max_tokens=2**32)), "invalid_max_tokens", "x"),   # the wire field is uint32
    (json.dumps(chat("x", temperature=9)), "invalid_param", "x"),
    (json.dumps(chat("x", seed=-1)), "invalid_param", "x"),
    (json.dumps(chat("x", stop=[""])), "invalid_param", "x"),
    (json.dumps(chat("x", stream=True)), "unsupported_param", "x"),
    (json.dumps(chat("x", n=2)), "unsupported_param", "x"),
    (json.dumps({"custom_id": "x", "url": COMPLETIONS_URL, "body": {"model": "m1", "max_tokens": 2}}), "missing_prompt", "x"),
])
def test_each_bad_line_gets_exactly_one_error_and_the_rest_runs(line, code, cid):
    p = parse_batch(jsonl(chat("good1"), line, chat("good2")), MODELS)
    assert [it.custom_id for it in p.items] == ["good1", "good2"]
    assert len(p.errors) == 1
    err = p.errors[0]
    assert (err.line, err.code, err.custom_id) == (2, code, cid)
    assert err.message


def test_duplicate_custom_id_keeps_the_first_line_and_rejects_later_ones():
    p = parse_batch(jsonl(chat("a", "first"), chat("b"), chat("a", "second"), chat("a", "third")), MODELS)
    assert {it.custom_id: it.request["messages"][0]["content"] for it in p.items} == {"a": "first", "b": "hi"}
    assert [(e.line, e.code, e.custom_id) for e in p.errors] == [(3, "duplicate_custom_id", "a"), (4, "duplicate_custom_id", "a")]


def test_a_bad_first_line_still_owns_its_custom_id():
    p = parse_batch(jsonl(chat("a", model="nope"), chat("a")), MODELS)
    assert p.items == []
    assert [e.code for e in p.errors] == ["unknown_model", "duplicate_custom_id"]


def test_blank_lines_are_skipped_but_line_numbers_follow_the_file():
    p = parse_batch(b"\n" + jsonl(chat("a")) + b"\r\n\n   \n" + jsonl("{bad") + b"\n", MODELS)
    assert [it.line for it in p.items] == [2]
    assert [(e.line, e.code) for e in p.errors] == [(5, "invalid_json")]
    assert p.lines == 2


def test_items_run_in_prompt_order_so_shared_prefixes_are_adjacent():
    sys_a, sys_b = "You are A. " * 20, "You are B. " * 20
    lines = []
    for i in range(6):
        system = sys_a if i % 2 == 0 else sys_b
        lines.append({"custom_id": f"q{i}", "url": CHAT_URL, "body": {
            "model": "m1", "max_tokens": 2,
            "messages": [{"role": "system", "content": system}, {"role": "user", "content": f"question {i}"}]}})
    p = parse_batch(jsonl(*lines), MODELS)
    order = [it.custom_id for it in p.items]
    assert order == ["q0", "q2", "q4", "q1", "q3", "q5"]


def test_text_content_parts_are_joined():
    line = chat("a")
    line["body"]["messages"][0]["content"] = [{"type": "text", "text": "he"}, {"type": "text", "text": "llo"}]
    p = parse_batch(jsonl(line), MODELS)
    assert p.items[0].request["messages"][0]["content"] == "hello"


def test_empty_file_and_too_many_lines_are_whole_file_errors():
    with pytest.raises(BatchFileError, match="empty"):
        parse_batch(b"\n  \n", MODELS)
    with pytest.raises(BatchFileError, match="more than 2"):
        parse_batch(jsonl(chat("a"), chat("b"), chat("c")), MODELS, max_items=2)


def test_unknown_model_message_lists_the_served_models():
    p = parse_batch(jsonl(chat("a", model="gpt")), MODELS)
    assert "m1, m2" in p.errors[0].message


@pytest.mark.parametrize("text, seconds", [("", DEFAULT_WINDOW_S), ("24h", 86400), ("90m", 5400), ("15s", 15), (" 2h ", 7200)])
def test_completion_window_units(text, seconds):
    assert parse_window(text) == seconds


@pytest.mark.parametrize("text", ["24", "1d", "0s", "-5m", "999h", "h"])
def test_bad_completion_windows_are_refused(text):
    with pytest.raises(ValueError, match="completion window"):
        parse_window(text)
