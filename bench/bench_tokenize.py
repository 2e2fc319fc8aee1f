"""Router tokenisation of an ~8,000-token chat: cold, warm, and its parts; the route total.

For each tokenizer (the sim's byte-level one, and the tiny real model's, SmolLM2, when its
directory exists), p50/p99 in us of:

- full:  ``Tokenizer.encode_chat`` (render, then encode all of it: the path before the
         segment cache, and the reference the others must equal), the baseline;
- cold:  ``encode_chat_ids`` on a conversation never seen (every segment is new);
- warm:  ``encode_chat_ids`` on a conversation whose system prompt and history were seen,
         with a new last user turn of ~100 tokens, as real clients send;
  and the parts of warm: the chat template's render, cutting and lookups
  (``encode_ids`` of the rendered text), and the list conversions the router's
  ``Prepared.tokens: list[int]`` costs (``tolist`` in ``prepare``, ``np.asarray`` in ``rank``).

With ``--route`` it also times the whole route per request at ``--nodes`` nodes (the
fleet of bench_router.py): warm tokenisation + list conversions + block hashing +
``policy.rank`` on the fleet's node table (reading the best candidate), each iteration
summed before taking percentiles (so p99 is the total's).

    .venv/bin/python bench/bench_tokenize.py                      # both tokenizers
    .venv/bin/python bench/bench_tokenize.py --route              # + route total, 1,000 nodes
    .venv/bin/python bench/bench_tokenize.py --quick              # smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from kvfleet.tokenizer import Tokenizer, byte_level_tokenizer_files, load_tokenizer_files

PROMPT_TOKENS = 8000
NEW_TURN_TOKENS = 100
MODEL_DIR = Path(os.environ.get("KVFLEET_MODEL_DIR") or "~/.cache/kvfleet/models/smollm2-135m").expanduser()
WORDS = ("the router sends each request to the node most likely to hold its prompt prefix weighed against "
         "that node's load so repeated system prompts are computed once; call tool search_docs(query: str, "
         "limit: int = 10) -> list[Doc] when asked — résumé naïve 東京 🙂 2026-11-25 42").split(" ")


def percentiles(wall_ns: np.ndarray, cpu_ns: np.ndarray | None = None) -> dict[str, float]:
    out = {"p50": float(np.percentile(wall_ns, 50)) / 1e3, "p99": float(np.percentile(wall_ns, 99)) / 1e3}
    if cpu_ns is not None:
        out |= {"cpu_p50": float(np.percentile(cpu_ns, 50)) / 1e3, "cpu_p99": float(np.percentile(cpu_ns, 99)) / 1e3}
    return out


def sample(fn: Callable[[int], object], iters: int, warmup: int = 5) -> dict[str, float]:
    """p50/p99 (us) of ``fn(i)`` for i in range(iters), after ``warmup`` untimed calls: wall
    time, and this thread's CPU time, which leaves out the time other processes on shared
    cores take (on a quiet machine the two agree)."""
    for i in range(warmup):
        fn(iters + i)
    wall, cpu = np.empty(iters), np.empty(iters)
    for i in range(iters):
        c0, t0 = time.thread_time_ns(), time.perf_counter_ns()
        fn(i)
        wall[i], cpu[i] = time.perf_counter_ns() - t0, time.thread_time_ns() - c0
    return percentiles(wall, cpu)


def words(rng: random.Random, tok: Tokenizer, tokens: int) -> str:
    """English-ish text of about ``tokens`` tokens with this tokenizer."""
    text = ""
    while len(tok.encode(text)) < tokens:
        text += " ".join(rng.choice(WORDS) for _ in range(max(8, (tokens - len(tok.encode(text))) // 2))) + " "
    return tok.decode(tok.encode(text)[:tokens]).strip()


def conversation(tok: Tokenizer, seed: int) -> list[dict[str, str]]:
    """System prompt (~2,000 tokens, with tool definitions) and alternating turns up to
    ~``PROMPT_TOKENS - NEW_TURN_TOKENS`` tokens in all."""
    rng = random.Random(seed)
    msgs = [{"role": "system", "content": "You are a careful assistant.\n# Tools\n" + words(rng, tok, 2000)}]
    while len(tok.encode_chat(msgs)) < PROMPT_TOKENS - NEW_TURN_TOKENS - 400:
        role = "user" if len(msgs) % 2 else "assistant"
        msgs.append({"role": role, "content": words(rng, tok, 150 if role == "user" else 450)})
    return msgs


def new_turns(tok: Tokenizer, seed: int, n: int) -> list[dict[str, str]]:
    """``n`` distinct user turns of about ``NEW_TURN_TOKENS`` tokens: never cached."""
    rng = random.Random(seed)
    n_words = len(words(rng, tok, NEW_TURN_TOKENS).split(" "))
    return [{"role": "user", "content": f"({seed}.{i}) " + " ".join(rng.choice(WORDS) for _ in range(n_words))}
            for i in range(n)]


def measure(tok: Tokenizer, iters: int, cold_iters: int) -> dict:
    history = conversation(tok, seed=0)
    # Every warm request ends in a turn never seen: one set per timing, so none reuses another's.
    warm = [history + [t] for t in new_turns(tok, 1, iters + 5)]
    warm_parts = [history + [t] for t in new_turns(tok, 2, iters + 5)]
    prompt_tokens = len(tok.encode_chat(warm[0]))
    # Cold: conversations never seen; each is built from a different seed.
    colds = [conversation(tok, seed=100 + i) + [warm[0][-1]] for i in range(cold_iters + 5)]

    tok.encode_chat_ids(warm[0])  # the history is now cached, as after the conversation's first request
    full = sample(lambda i: tok.encode_chat(warm[i]), cold_iters)
    cold = sample(lambda i: tok.encode_chat_ids(colds[i]), cold_iters)
    hot = sample(lambda i: tok.encode_chat_ids(warm[i]), iters)
    rendered = [tok.render_chat(m) for m in warm_parts]
    render = sample(lambda i: tok.render_chat(warm_parts[i]), iters)
    cut = sample(lambda i: tok.encode_ids(rendered[i]), iters)
    ids = tok.encode_chat_ids(warm[0])
    as_list = ids.tolist()
    tolist = sample(lambda i: ids.tolist(), iters)
    asarray = sample(lambda i: np.asarray(as_list, dtype=np.uint32), iters)
    for m in (warm[0], colds[0]):  # exactness, also on the benchmark's own prompts
        assert tok.encode_chat_ids(m).tolist() == tok.encode_chat(m)
    c = tok.segments.cache
    return {
        "prompt_tokens": prompt_tokens, "messages": len(warm[0]), "path": path_of(tok),
        "full_us": full, "cold_us": cold, "warm_us": hot,
        "warm_render_us": render, "warm_cut_and_lookup_us": cut,
        "tolist_us": tolist, "list_to_array_us": asarray,
        "cache": {"entries": len(c), "bytes": c.bytes, "hits": c.hits, "misses": c.misses},
        "_route_prompts": [history + [t] for t in new_turns(tok, 3, iters + 5)],
    }


def path_of(tok: Tokenizer) -> str:
    plan = tok.segments.plan
    if plan.byte_lut is not None:
        return "byte table lookup"
    return "cut at added tokens, cached" if plan.special is not None else f"whole text cached ({plan.reason})"


def route_total(tok: Tokenizer, prompts: list, nodes: int, blocks_per_node: int, iters: int) -> dict:
    """Per iteration, the router's path (``RouterService.prepare`` then ``rank``): warm
    tokenisation (ids stay a uint32 array), block hashing, ``policy.rank`` to the first
    candidate. ``node_request_list`` is the one ``tolist`` the node request needs, after the
    decision (reported, not in the route total)."""
    from bench_router import BLOCK_SIZE, build_fleet

    from kvfleet.controller.router.chain import block_hashes   # the router's (kvfleet.hashing's, compiled)
    from kvfleet.controller.router.policy import RouteRequest, get_policy

    fleet = build_fleet(nodes, blocks_per_node)
    policy = get_policy("kvfleet")
    # Decided on the fleet's hot prompt: its global prefix is on every node, the costliest
    # case for index.match (our chat's blocks are in no node's cache).
    nodes_arg = getattr(fleet, "table", None) or fleet.views   # the router's NodeTable where there is one
    hot_request = RouteRequest(block_hashes(fleet.hot_tokens, BLOCK_SIZE), len(fleet.hot_tokens), BLOCK_SIZE, 256,
                               arrival_rate=200.0, now_s=0.0)
    parts = {k: np.empty(iters) for k in ("tokenise", "hash", "rank")}
    to_list = np.empty(iters)
    cpu = np.empty(iters)
    for i in range(-5, iters):
        c0 = time.thread_time_ns()
        t0 = time.perf_counter_ns()
        arr = np.asarray(tok.encode_chat_ids(prompts[i]), dtype=np.uint32)   # as prepare() keeps it
        t1 = time.perf_counter_ns()
        hashes = block_hashes(arr, BLOCK_SIZE)
        t2 = time.perf_counter_ns()
        policy.rank(hot_request, nodes_arg, fleet.index)[0]      # the best candidate, as the router reads it
        t3 = time.perf_counter_ns()
        c1 = time.thread_time_ns()
        arr.tolist()
        t4 = time.perf_counter_ns()
        if i >= 0:
            cpu[i] = c1 - c0
            to_list[i] = t4 - t3
            for k, v in zip(parts, (t1 - t0, t2 - t1, t3 - t2)):
                parts[k][i] = v
    total = sum(parts.values())
    out = {f"{k}_us": percentiles(v) for k, v in parts.items()}
    out["total_us"] = percentiles(total, cpu)
    out["node_request_list_us"] = percentiles(to_list)
    out["nodes"] = nodes
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--iters", type=int, default=None, help="warm iterations (default 1000; --quick: 50)")
    ap.add_argument("--cold-iters", type=int, default=None, help="cold and full iterations (default 200; --quick: 10)")
    ap.add_argument("--tokenizer", metavar="MODEL_DIR", default=None,
                    help=f"a real model's directory (default {MODEL_DIR}, when it exists)")
    ap.add_argument("--route", action="store_true", help="also time the whole route at --nodes nodes")
    ap.add_argument("--nodes", type=int, default=1000)
    ap.add_argument("--blocks-per-node", type=int, default=20_000)
    ap.add_argument("--quick", action="store_true", help="few iterations, for a smoke test")
    ap.add_argument("--json", metavar="OUT", help="also write the results as JSON to OUT")
    args = ap.parse_args(argv)
    iters = args.iters or (50 if args.quick else 1000)
    cold_iters = args.cold_iters or (10 if args.quick else 200)
    model_dir = Path(args.tokenizer) if args.tokenizer else MODEL_DIR
    toks = {"byte-level sim": Tokenizer(byte_level_tokenizer_files())}
    if (model_dir / "tokenizer.json").is_file():
        toks[model_dir.name] = Tokenizer(load_tokenizer_files(model_dir))
    else:
        print(f"(no tokenizer.json in {model_dir}: `make tiny-model` to include a real BPE tokenizer)")

    results: dict = {"iters": iters, "cold_iters": cold_iters, "tokenizers": {}}
    for name, tok in toks.items():
        r = measure(tok, iters, cold_iters)
        route_prompts = r.pop("_route_prompts")
        if args.route:
            r["route"] = route_total(tok, route_prompts, args.nodes, args.blocks_per_node, iters)
        results["tokenizers"][name] = r
        _print(name, r)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return results


def _print(name: str, r: dict) -> None:
    def row(label: str, t: dict, base: dict | None = None) -> None:
        cpu = f"   cpu p50 {t['cpu_p50']:8.1f}  p99 {t['cpu_p99']:8.1f}" if "cpu_p50" in t else ""
        ratio = f"   {base['cpu_p50'] / t['cpu_p50']:5.1f}x less cpu than full (p50)" if base else ""
        print(f"  {label:<46} p50 {t['p50']:8.1f}  p99 {t['p99']:8.1f}{cpu}{ratio}")

    print(f"{name} tokenizer: {r['prompt_tokens']} tokens, {r['messages']} messages; path: {r['path']}; "
          "us, wall and thread CPU time")
    row("full encode_chat (baseline)", r["full_us"])
    row("cold: conversation never seen", r["cold_us"], r["full_us"])
    row(f"warm: seen history + new {NEW_TURN_TOKENS}-token turn", r["warm_us"], r["full_us"])
    row("  of which: chat template render", r["warm_render_us"])
    row("  of which: cut + lookups + new turn's encode", r["warm_cut_and_lookup_us"])
    row("ids.tolist() (the node request, after routing)", r["tolist_us"])
    row("np.asarray(list) (a list round trip, for scale)", r["list_to_array_us"])
    c = r["cache"]
    print(f"  segment cache: {c['entries']} entries, {c['bytes'] / 1e6:.2f} MB, {c['hits']} hits, {c['misses']} misses")
    if "route" in r:
        rt = r["route"]
        print(f"  route total at {rt['nodes']} nodes (per-request sums):")
        row("    warm tokenisation", rt["tokenise_us"])
        row("    block hashing", rt["hash_us"])
        row("    policy.rank (hot prompt)", rt["rank_us"])
        row("    route total (tokenise + hash + rank)", rt["total_us"])
        row("    then ids.tolist() for the node request", rt["node_request_list_us"])


if __name__ == "__main__":
    main()
