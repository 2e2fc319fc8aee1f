"""The common batch input format (OpenAI's), parsed into items and per-line errors.

One request per line::

    {"custom_id": "q1", "method": "POST", "url": "/v1/chat/completions",
     "body": {"model": "m", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 64}}

``url`` is ``/v1/chat/completions`` (``messages``) or ``/v1/completions`` (``prompt``, a string).
``body`` also takes ``temperature``, ``top_p``, ``seed`` and ``stop`` (a string or a list of
strings); ``max_completion_tokens`` is accepted for ``max_tokens``; other body fields are ignored.

Contract: every non-blank line yields exactly one ``ItemSpec`` or exactly one ``LineError``;
the job runs the valid lines. The first line that names a custom_id owns it (even if that line
is bad otherwise); later lines with the same id are ``duplicate_custom_id``. Pure: no I/O.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Collection
from dataclasses import dataclass, field

CHAT_URL = "/v1/chat/completions"
COMPLETIONS_URL = "/v1/completions"
URLS = (CHAT_URL, COMPLETIONS_URL)
ROLES = frozenset({"system", "developer", "user", "assistant", "tool"})

MAX_FILE_BYTES = 200 * 1024 * 1024   # same limit as OpenAI's batch files
MAX_ITEMS = 50_000                   # lines per job (blank lines not counted)
MAX_CUSTOM_ID_CHARS = 512
MAX_STOPS = 8
DEFAULT_WINDOW_S = 24 * 3600
MAX_WINDOW_S = 7 * 24 * 3600
_WINDOW = re.compile(r"^\s*(\d+)\s*([hms])\s*$")


class BatchFileError(ValueError):
    """The whole file is unusable (empty, too large): no job is created."""


@dataclass(frozen=True, slots=True)
class LineError:
    line: int          # 1-based line number in the file
    custom_id: str     # "" when the line had no usable custom_id
    code: str          # stable machine-readable code, e.g. "duplicate_custom_id"
    message: str


@dataclass(frozen=True, slots=True)
class ItemSpec:
    line: int                  # 1-based line number in the file
    custom_id: str
    url: str                   # CHAT_URL or COMPLETIONS_URL
    request: dict              # normalised body: model, messages|prompt, max_tokens, optional sampling
    order_key: tuple[str, str, str] = field(compare=False)   # (model, url, rendered prompt)


@dataclass(slots=True)
class ParsedBatch:
    items: list[ItemSpec]      # valid lines, in run order (see ``run_order``)
    errors: list[LineError]    # bad lines, in line order
    lines: int                 # non-blank lines read


def parse_window(text: str) -> int:
    """``"24h"``, ``"90m"``, ``"3600s"`` -> seconds (``""``: 24 h). ValueError names the limits."""
    if not text.strip():
        return DEFAULT_WINDOW_S
    m = _WINDOW.match(text)
    if not m:
        raise ValueError(f"completion window {text!r}: expected a number with a unit h, m or s, e.g. 24h")
    seconds = int(m.group(1)) * {"h": 3600, "m": 60, "s": 1}[m.group(2)]
    if not 1 <= seconds <= MAX_WINDOW_S:
        raise ValueError(f"completion window {text!r}: must be between 1s and {MAX_WINDOW_S // 3600}h")
    return seconds


def run_order(items: list[ItemSpec]) -> list[ItemSpec]:
    """Items sorted by (model, url, rendered prompt): requests sharing a prefix run next to
    each other, so the router's cache-aware policy sends each group to the node holding it.
    Stable: equal prompts keep file order."""
    return sorted(items, key=lambda it: it.order_key)


def parse_batch(data: bytes, models: Collection[str], *, max_items: int = MAX_ITEMS) -> ParsedBatch:
    """Parses a whole JSONL file. ``models``: the names the fleet serves now.

    Raises ``BatchFileError`` for an empty or oversized file; every other problem is a
    ``LineError`` for its line."""
    if len(data) > MAX_FILE_BYTES:
        raise BatchFileError(f"file is {len(data)} bytes; the limit is {MAX_FILE_BYTES} bytes")
    served = set(models)
    items: list[ItemSpec] = []
    errors: list[LineError] = []
    seen: set[str] = set()
    lines = 0
    for number, raw in enumerate(data.split(b"\n"), start=1):
        if not raw.strip():
            continue
        lines += 1
        if lines > max_items:
            raise BatchFileError(f"file has more than {max_items} requests; split it into several jobs")
        item = _parse_line(number, raw, served, seen)
        (items if isinstance(item, ItemSpec) else errors).append(item)
    if not lines:
        raise BatchFileError("file is empty: expected one JSON request per line")
    return ParsedBatch(run_order(items), errors, lines)


class _Bad(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def _parse_line(number: int, raw: bytes, served: set[str], seen: set[str]) -> ItemSpec | LineError:
    custom_id = ""
    try:
        try:
            obj = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            raise _Bad("invalid_json", f"not valid JSON: {exc}") from None
        if not isinstance(obj, dict):
            raise _Bad("invalid_request", "a line must be a JSON object")
        cid = obj.get("custom_id")
        if cid is None or cid == "":
            raise _Bad("missing_custom_id", "custom_id is required (a non-empty string)")
        if not isinstance(cid, str):
            raise _Bad("invalid_custom_id", f"custom_id must be a string, not {type(cid).__name__}")
        if len(cid) > MAX_CUSTOM_ID_CHARS:
            raise _Bad("invalid_custom_id", f"custom_id is longer than {MAX_CUSTOM_ID_CHARS} characters")
        if cid in seen:
            custom_id = cid
            raise _Bad("duplicate_custom_id", f"custom_id {cid!r} already appeared on an earlier line")
        seen.add(cid)
        custom_id = cid
        method = obj.get("method", "POST")
        if method != "POST":
            raise _Bad("unsupported_method", f"method {method!r} is not supported; use POST")
        url = obj.get("url")
        if url not in URLS:
            raise _Bad("unsupported_url", f"url {url!r} is not supported; use {CHAT_URL} or {COMPLETIONS_URL}")
        body = obj.get("body")
        if not isinstance(body, dict):
            raise _Bad("missing_body", "body is required (a JSON object)")
        request, rendered = _body(body, url, served)
        return ItemSpec(number, cid, url, request, (request["model"], url, rendered))
    except _Bad as bad:
        return LineError(number, custom_id, bad.code, str(bad))


def _body(body: dict, url: str, served: set[str]) -> tuple[dict, str]:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise _Bad("missing_model", "body.model is required (a string)")
    if model not in served:
        raise _Bad("unknown_model", f"unknown model {model!r}; the fleet serves: {', '.join(sorted(served)) or 'none'}")
    req: dict = {"model": model}
    if url == CHAT_URL:
        msgs = body.get("messages")
        if not isinstance(msgs, list) or not msgs:
            raise _Bad("missing_messages", "body.messages is required for /v1/chat/completions (a non-empty list)")
        req["messages"] = [_message(i, m) for i, m in enumerate(msgs)]
        rendered = "\x00".join(f"{m['role']}\x01{m['content']}" for m in req["messages"])
    else:
        prompt = body.get("prompt")
        if not isinstance(prompt, str) or not prompt:
            raise _Bad("missing_prompt", "body.prompt is required for /v1/completions (a non-empty string)")
        req["prompt"] = rendered = prompt
    max_tokens = body.get("max_tokens", body.get("max_completion_tokens"))
    if max_tokens is None:
        raise _Bad("missing_max_tokens", "body.max_tokens is required")
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or not 0 < max_tokens < 2**32:
        raise _Bad("invalid_max_tokens", f"body.max_tokens must be a positive integer below 2**32, not {max_tokens!r}")
    req["max_tokens"] = max_tokens
    if body.get("stream"):
        raise _Bad("unsupported_param", "body.stream is not supported in a batch")
    if body.get("n", 1) != 1:
        raise _Bad("unsupported_param", "body.n must be 1 in a batch")
    for name, lo, hi in (("temperature", 0.0, 2.0), ("top_p", 0.0, 1.0)):
        v = body.get(name)
        if v is None:
            continue
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not lo <= v <= hi:
            raise _Bad("invalid_param", f"body.{name} must be a number in [{lo:g}, {hi:g}], not {v!r}")
        req[name] = float(v)
    seed = body.get("seed")
    if seed is not None:
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**64:
            raise _Bad("invalid_param", f"body.seed must be a non-negative integer, not {seed!r}")
        req["seed"] = seed
    stop = body.get("stop")
    if stop is not None:
        stops = [stop] if isinstance(stop, str) else stop
        if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops) or len(stops) > MAX_STOPS:
            raise _Bad("invalid_param", f"body.stop must be a string or a list of at most {MAX_STOPS} non-empty strings")
        if stops:
            req["stop"] = stops
    return req, rendered


def _message(i: int, m) -> dict:
    if not isinstance(m, dict):
        raise _Bad("invalid_messages", f"body.messages[{i}] must be an object with role and content")
    role = m.get("role")
    if role not in ROLES:
        raise _Bad("invalid_messages", f"body.messages[{i}].role {role!r} is not one of {', '.join(sorted(ROLES))}")
    content = m.get("content")
    if isinstance(content, list):  # OpenAI's content parts: text parts only
        if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
            raise _Bad("invalid_messages", f"body.messages[{i}].content: only text parts are supported")
        content = "".join(p["text"] for p in content)
    if not isinstance(content, str):
        raise _Bad("invalid_messages", f"body.messages[{i}].content must be a string")
    return {"role": role, "content": content}
