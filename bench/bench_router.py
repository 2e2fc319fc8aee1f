"""Router microbenchmark at fleet scale, with no network: the decision path alone.

Reports, each separately, for ``--nodes`` nodes (default 1,000):

(a) routing decision time: ``policy.rank(...)[0]`` (the ranking, including
    ``index.match``, and reading the best candidate) for an 8,000-token prompt
    (block_size 16 -> 500 blocks) over the fleet's node table (a ``NodeTable``, as the
    router's fleet view keeps it), p50/p99 in us; with the share spent in
    ``index.match``, and for comparison, in the same run: the previous ``match`` (a
    depth search per node, ``_match_search``) and ``rank`` given a list of
    ``NodeView`` s (the simulator's input, converted to a table per call). Two prompts:
    one that starts with a system prompt every node holds (the worst case for the
    per-node search) and one with a niche system prompt;
(b) hashing that prompt's blocks (``kvfleet.hashing.block_hashes``, the NumPy form node
    agents apply to event tokens, and the router's compiled form of the same function,
    ``controller/router/chain.py``), p50/p99 in us;
(c) index memory per cached (node, block) pair, bytes (the index's NumPy arrays: pair
    table, holder table and bitmaps), and
    for scale a dict-of-sets index (node -> set of hashes) measured on a sample;
(d) event apply rate of ``store``, blocks/s, for 1-, 16- and 256-block events.

Tokenisation is timed with the router's own tokenizer (``--tokenizer MODEL_DIR`` for a real one).

The fill is realistic in shape: one global system prompt (128 blocks) on every node,
31 niche system prompts (64..256 blocks) of which each node holds 4, and per-node
conversations (16..1,024 blocks) chained onto those prompts, up to ``--blocks-per-node``.
All hashes are canonical (``block_hashes`` of random token ids), so the routed prompt
(global prompt + one node's conversation + new text) matches what that node holds.

    .venv/bin/python bench/bench_router.py                # 1,000 nodes x 20,000 blocks
    .venv/bin/python bench/bench_router.py --quick        # smoke test, seconds
    .venv/bin/python bench/bench_router.py --json out.json
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import sys
import time
import tracemalloc
from dataclasses import dataclass
from typing import Callable

import numpy as np

from kvfleet.controller.router.index import PrefixIndex
from kvfleet.controller.router.policy import NodeTable, NodeView, PrefixRates, RouteRequest, get_policy
from kvfleet.controller.router.chain import block_hashes as chain_hashes
from kvfleet.hashing import block_hashes

BLOCK_SIZE = 16
PROMPT_TOKENS = 8000            # 500 blocks
GLOBAL_PROMPT_BLOCKS = 128      # held by every node
NICHE_PROMPTS = 31
NICHE_PER_NODE = 4
CONVERSATION_BLOCKS = (16, 1024)
ROUTED_CONVERSATION_BLOCKS = 300
VOCAB = 150_000


@dataclass(frozen=True, slots=True)
class Timing:
    p50_us: float
    p99_us: float
    cpu_p50_us: float = 0.0     # the same calls' CPU time (this thread): what one core of its own
    cpu_p99_us: float = 0.0     # would take, on a box where other processes compete for the cores


@dataclass(frozen=True, slots=True)
class Fleet:
    index: PrefixIndex
    views: list[NodeView]
    table: NodeTable            # the same nodes as columns
    hot_tokens: np.ndarray      # global prompt + one node's conversation + new text
    hot_node: str               # the node that holds the hot prompt's conversation
    niche_tokens: np.ndarray    # a niche prompt + new text
    fill_s: float


def _timed(fn: Callable[[], object], iters: int, warmup: int = 5) -> Timing:
    for _ in range(warmup):
        fn()
    samples = np.empty(iters)
    cpu = np.empty(iters)
    for i in range(iters):
        c0 = time.thread_time_ns()
        t0 = time.perf_counter_ns()
        fn()
        samples[i] = time.perf_counter_ns() - t0
        cpu[i] = time.thread_time_ns() - c0
    p = lambda a, q: float(np.percentile(a, q)) / 1e3   # noqa: E731
    return Timing(p(samples, 50), p(samples, 99), p(cpu, 50), p(cpu, 99))


def build_fleet(nodes: int, blocks_per_node: int, seed: int = 0) -> Fleet:
    """Fills an index as described in the module docstring and makes one view per node."""
    rng = np.random.default_rng(seed)
    bs = BLOCK_SIZE
    global_tokens = rng.integers(0, VOCAB, GLOBAL_PROMPT_BLOCKS * bs)
    global_hashes = block_hashes(global_tokens, bs)
    niche_tokens = [rng.integers(0, VOCAB, int(rng.integers(64, 257)) * bs) for _ in range(NICHE_PROMPTS)]
    niche_hashes = [block_hashes(t, bs) for t in niche_tokens]
    hot_slot = min(7, nodes - 1)
    index = PrefixIndex()
    views = []
    hot_tokens = np.empty(0)
    t0 = time.perf_counter()
    for n in range(nodes):
        node_id = f"node-{n:04d}"
        slot = index.add_node(node_id)
        held = [global_hashes] + [niche_hashes[i] for i in rng.choice(NICHE_PROMPTS, NICHE_PER_NODE, replace=False)]
        budget = blocks_per_node - sum(len(h) for h in held)
        if budget < ROUTED_CONVERSATION_BLOCKS:
            raise ValueError(f"--blocks-per-node must be >= {blocks_per_node - budget + ROUTED_CONVERSATION_BLOCKS}")
        chains = list(held)
        while budget > 0:
            first = n == hot_slot and len(chains) == len(held)
            length = ROUTED_CONVERSATION_BLOCKS if first else int(rng.integers(*CONVERSATION_BLOCKS))
            length = min(length, budget)
            parent = global_hashes if first else held[int(rng.integers(len(held)))]
            tokens = rng.integers(0, VOCAB, length * bs)
            chains.append(block_hashes(tokens, bs, parent=int(parent[-1])))
            if first:
                new_text = rng.integers(0, VOCAB, PROMPT_TOKENS - len(global_tokens) - len(tokens))
                hot_tokens = np.concatenate([global_tokens, tokens, new_text])
            budget -= length
        index.store(slot, np.concatenate(chains))
        views.append(NodeView(
            node_id=node_id, address=f"10.0.{n // 256}.{n % 256}:7000",
            routable=n == hot_slot or rng.random() > 0.02,         # ~2% cordoned or not ready
            block_size=bs, num_blocks=60_000,
            prefill_tokens_per_s=float(rng.choice([8_000.0, 16_000.0])),  # two GPU generations
            decode_tokens_per_s=float(rng.uniform(30, 80)),
            running=int(rng.integers(0, 64)), waiting=int(rng.integers(0, 4)),
            kv_usage=float(rng.uniform(0.2, 0.95)),
            queued_prefill_tokens=int(rng.integers(0, 20_000)),
            work_since_s=float(rng.uniform(-0.05, 0.0)),   # reported up to 50 ms before the decision (at 0)
            cached_blocks=index.blocks_of(slot), slot=slot,
        ))
    fill_s = time.perf_counter() - t0
    niche = niche_tokens[0]
    niche_prompt = np.concatenate([niche, rng.integers(0, VOCAB, PROMPT_TOKENS - len(niche))])
    return Fleet(index, views, NodeTable.from_views(views), hot_tokens.astype(np.uint32), views[hot_slot].node_id,
                 niche_prompt.astype(np.uint32), fill_s)


def time_tokenisation(iters: int, tokenizer_dir: str | None = None) -> tuple[Timing, str]:
    """Tokenising an ~8,000-token prompt with the router's own ``Tokenizer`` (Hugging Face
    ``tokenizers``), p50/p99. Without ``--tokenizer`` it is the sim's byte-level tokenizer
    (8,000 bytes = 8,000 tokens); with a model directory, that model's tokenizer.json on
    English text of the same token count."""
    from kvfleet.tokenizer import Tokenizer, byte_level_tokenizer_files, load_tokenizer_files

    files = load_tokenizer_files(tokenizer_dir) if tokenizer_dir else byte_level_tokenizer_files()
    tok = Tokenizer(files)
    words = ("the router sends each request to the node most likely to hold its prompt prefix "
             "weighed against that node's load so repeated system prompts are computed once ").split()
    rng = np.random.default_rng(1)
    text = ""
    while len(tok.encode(text)) < PROMPT_TOKENS:
        text += " ".join(rng.choice(words, 200)) + " "
    ids = tok.encode(text)
    text = tok.decode(ids[:PROMPT_TOKENS])
    label = f"{tokenizer_dir or 'byte-level sim'} tokenizer, {len(tok.encode(text))} tokens"
    return _timed(lambda: tok.encode(text), iters), label


def time_route(fleet: Fleet, tokens: np.ndarray, iters: int) -> tuple[dict[str, Timing], dict]:
    """(timings: rank, match and their baselines; facts about the ranking) for one prompt."""
    hashes = block_hashes(tokens, BLOCK_SIZE)
    # As the router builds it: its arrival rate and its clock (0 here; the nodes' work_since_s are just before).
    req = RouteRequest(hashes, len(tokens), BLOCK_SIZE, max_tokens=256, arrival_rate=200.0, now_s=0.0)
    policy = get_policy("kvfleet")
    # As under traffic: earlier requests shared this prompt's deepest cached block, so the
    # decision also computes the replica credit of the nodes lacking it (its costlier case).
    shared = PrefixRates()
    key = policy.rank(req, fleet.table, fleet.index).prefix_key
    for k in range(10):
        shared.arrive(key, -0.01 * (10 - k))
    req = dataclasses.replace(req, shared_rates=shared)
    slots = np.array([v.slot for v in fleet.views if v.routable])
    if (fleet.index.match(hashes, slots) != fleet.index._match_search(hashes, slots)).any():
        raise AssertionError("match and the per-node depth search disagree")
    base_iters = max(iters // 5, 10)
    t = {
        "rank": _timed(lambda: policy.rank(req, fleet.table, fleet.index)[0], iters),
        "match": _timed(lambda: fleet.index.match(hashes, slots), iters),
        "match_search": _timed(lambda: fleet.index._match_search(hashes, slots), base_iters),
        "rank_views": _timed(lambda: policy.rank(req, fleet.views, fleet.index)[0], base_iters),
    }
    ranked = policy.rank(req, fleet.table, fleet.index)
    holders = int(np.count_nonzero(fleet.index.match(hashes[:1], slots)))
    best = ranked[0]
    pos, holder = next((i, c) for i, c in enumerate(ranked) if c.node_id == fleet.hot_node)
    if ranked._ev.credit_s is None:
        raise AssertionError("the timed decision did not compute the replica credit")
    return t, {"node_id": best.node_id, "cached_tokens": best.cached_tokens,
                         "cost_s": best.cost_s, "nodes_holding_block_0": holders,
                         "shared_prefix_rate": shared.peek(key, 0.0),
                         "hot_node_rank": pos, "hot_node_cached_tokens": holder.cached_tokens,
                         "hot_node_cost_s": holder.cost_s}


def dict_of_sets_bytes_per_pair(pairs: int, nodes: int, seed: int) -> float:
    """Baseline for (c): bytes per pair of ``{node_id: set(hashes)}`` (Python ints),
    measured with tracemalloc on ``pairs`` random hashes spread over ``nodes`` nodes."""
    chunks = np.random.default_rng(seed).integers(1, 2**63, pairs, dtype=np.uint64).reshape(nodes, -1)
    lists = [c.tolist() for c in chunks]
    tracemalloc.start()
    ref = {f"node-{i:04d}": set(hs) for i, hs in enumerate(lists)}
    size, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert sum(len(v) for v in ref.values()) == pairs
    return size / pairs


def time_store(index: PrefixIndex, nodes: int, blocks: int, events: int, seed: int) -> tuple[float, float]:
    """(blocks/s wall, blocks/s of this thread's CPU time) applying ``events`` store events
    of ``blocks`` fresh blocks to random nodes, including the queued holder changes."""
    rng = np.random.default_rng(seed)
    hashes = rng.integers(1, 2**64 - 1, (events, blocks), dtype=np.uint64, endpoint=True)
    slots = rng.integers(0, nodes, events).tolist()
    c0, t0 = time.thread_time(), time.perf_counter()
    for slot, h in zip(slots, hashes):
        index.store(slot, h)
    index._flush()
    return events * blocks / (time.perf_counter() - t0), events * blocks / (time.thread_time() - c0)


def _us(t: Timing) -> dict:
    return {"p50": t.p50_us, "p99": t.p99_us, "cpu_p50": t.cpu_p50_us, "cpu_p99": t.cpu_p99_us}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--nodes", type=int, default=None, help="nodes in the fleet (default 1000; --quick: 100)")
    ap.add_argument("--blocks-per-node", type=int, default=None,
                    help="cached blocks per node (default 20000 -> 20 M pairs; --quick: 1500)")
    ap.add_argument("--iters", type=int, default=None, help="timed iterations per figure (default 500; --quick: 30)")
    ap.add_argument("--quick", action="store_true", help="small fleet, for a smoke test")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tokenizer", metavar="MODEL_DIR", help="time this model's tokenizer.json (default: the sim's byte-level one)")
    ap.add_argument("--json", metavar="OUT", help="also write the results as JSON to OUT")
    args = ap.parse_args(argv)
    nodes = args.nodes or (100 if args.quick else 1000)
    bpn = args.blocks_per_node or (1500 if args.quick else 20_000)
    iters = args.iters or (30 if args.quick else 500)
    events = (200, 100, 20) if args.quick else (20_000, 5_000, 400)

    fleet = build_fleet(nodes, bpn, args.seed)
    pairs = len(fleet.index)
    hot, hot_best = time_route(fleet, fleet.hot_tokens, iters)
    expected = (GLOBAL_PROMPT_BLOCKS + ROUTED_CONVERSATION_BLOCKS) * BLOCK_SIZE
    if hot_best["hot_node_cached_tokens"] != expected:   # the index must find the conversation
        raise AssertionError(f"{fleet.hot_node}: {hot_best['hot_node_cached_tokens']} cached, expected {expected}")
    niche, niche_best = time_route(fleet, fleet.niche_tokens, iters)
    hashing = _timed(lambda: block_hashes(fleet.hot_tokens, BLOCK_SIZE), iters)
    hot_u32 = np.asarray(fleet.hot_tokens, np.uint32)   # as the router keeps a prompt
    if not np.array_equal(chain_hashes(hot_u32, BLOCK_SIZE), block_hashes(fleet.hot_tokens, BLOCK_SIZE)):
        raise AssertionError("the router's compiled hash differs from kvfleet.hashing's")
    hashing_router = _timed(lambda: chain_hashes(hot_u32, BLOCK_SIZE), iters)
    tokenise, tokenise_label = time_tokenisation(iters, args.tokenizer)
    memory = fleet.index.memory_bytes()
    capacity = fleet.index.capacity
    sample_nodes = min(nodes, 20)
    baseline_pairs = sample_nodes * min(bpn, 20_000)
    baseline = dict_of_sets_bytes_per_pair(baseline_pairs, sample_nodes, args.seed)
    gc.collect()
    store = {b: time_store(fleet.index, nodes, b, e, args.seed + b) for b, e in zip((1, 16, 256), events)}

    results = {
        "nodes": nodes, "blocks_per_node": bpn, "pairs": pairs, "block_size": BLOCK_SIZE,
        "prompt_tokens": PROMPT_TOKENS, "iters": iters, "fill_s": fleet.fill_s,
        **{f"{out}_{name}_us": _us(t[key]) for name, t in (("hot", hot), ("niche", niche))
           for key, out in (("rank", "route"), ("match", "match"), ("match_search", "match_search"),
                            ("rank_views", "route_views"))},
        "route_hot_best": hot_best, "hot_node": fleet.hot_node,
        "route_niche_best": niche_best,
        "hash_us": _us(hashing),
        "hash_router_us": _us(hashing_router),
        "tokenise_us": _us(tokenise),
        "tokenise_label": tokenise_label,
        "index_bytes": memory, "index_capacity": capacity,
        "holder_bytes": fleet.index._holders.memory_bytes(), "distinct_blocks": len(fleet.index._holders),
        "bitmap_bytes": fleet.index._bits.nbytes, "bitmaps": len(fleet.index._bitmap_of),
        "bytes_per_pair": memory / pairs,
        "dict_of_sets_bytes_per_pair": baseline, "dict_of_sets_sample_pairs": baseline_pairs,
        "store_blocks_per_s": {str(b): r[0] for b, r in store.items()},
        "store_blocks_per_cpu_s": {str(b): r[1] for b, r in store.items()},
    }
    _print(results)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return results


def _print(r: dict) -> None:
    hb, nb = r["route_hot_best"], r["route_niche_best"]
    print(f"kvfleet router microbenchmark: {r['nodes']} nodes, block_size {r['block_size']}, "
          f"{r['pairs']:,} (node, block) pairs (fill, incl. generating and hashing: {r['fill_s']:.1f} s); "
          f"{r['iters']} iterations per timing")
    rows = [
        ("(a) route 8,000-token prompt, global prefix", r["route_hot_us"], "us"),
        ("      of which index.match", r["match_hot_us"], "us"),
        ("      baseline: per-node depth search", r["match_search_hot_us"], "us"),
        ("      baseline: rank from a list of NodeViews", r["route_views_hot_us"], "us"),
        ("(a) route 8,000-token prompt, niche prefix", r["route_niche_us"], "us"),
        ("      of which index.match", r["match_niche_us"], "us"),
        ("      baseline: per-node depth search", r["match_search_niche_us"], "us"),
        ("      baseline: rank from a list of NodeViews", r["route_views_niche_us"], "us"),
        ("(b) hash 500 blocks (block_hashes, NumPy: agents)", r["hash_us"], "us"),
        ("(b) same, compiled (chain.block_hashes: router)", r["hash_router_us"], "us"),
        ("(e) tokenise the prompt", r["tokenise_us"], "us"),
    ]
    print(f"{'figure':<48}{'p50':>12}{'p99':>12}  unit  {'CPU p50':>10}{'CPU p99':>10}")
    for name, t, unit in rows:
        print(f"{name:<48}{t['p50']:>12.1f}{t['p99']:>12.1f}  {unit}  {t['cpu_p50']:>10.1f}{t['cpu_p99']:>10.1f}")
    print(f"{'    tokenizer':<48}{r['tokenise_label']:>38}")
    print(f"{'(c) index memory per (node, block) pair':<48}{r['bytes_per_pair']:>12.1f}{'':>12}  bytes"
          f"   ({r['index_bytes'] / 2**20:.0f} MiB, table {r['index_capacity']:,} entries,"
          f" load {r['pairs'] / r['index_capacity']:.2f}; of which holder table"
          f" {r['holder_bytes'] / 2**20:.0f} MiB for {r['distinct_blocks']:,} distinct blocks,"
          f" {r['bitmaps']:,} bitmaps {r['bitmap_bytes'] / 2**20:.1f} MiB)")
    base = r["dict_of_sets_bytes_per_pair"]
    print(f"{'    baseline: dict of sets, same measure':<48}{base:>12.1f}{'':>12}  bytes"
          f"   ({base / r['bytes_per_pair']:.1f}x the index; sampled on {r['dict_of_sets_sample_pairs']:,} pairs)")
    for b, rate in r["store_blocks_per_s"].items():
        print(f"{f'(d) store, {b}-block events':<48}{rate:>12,.0f}{'':>12}  blocks/s"
              f"   ({r['store_blocks_per_cpu_s'][b]:,.0f} per CPU second)")
    print(f"global prefix: {hb['nodes_holding_block_0']} routable nodes hold block 0; picked {hb['node_id']}, "
          f"{hb['cached_tokens']} cached tokens, est. TTFT {hb['cost_s'] * 1e3:.1f} ms; the conversation's "
          f"holder {r['hot_node']}: {hb['hot_node_cached_tokens']} cached tokens, est. TTFT "
          f"{hb['hot_node_cost_s'] * 1e3:.1f} ms, ranked #{hb['hot_node_rank'] + 1}")
    print(f"niche prefix: {nb['nodes_holding_block_0']} routable nodes hold block 0; picked {nb['node_id']}, "
          f"{nb['cached_tokens']} cached tokens, est. TTFT {nb['cost_s'] * 1e3:.1f} ms")


if __name__ == "__main__":
    main(sys.argv[1:])
