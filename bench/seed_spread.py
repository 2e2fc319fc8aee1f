"""One cell of the routing matrix over several seeds.

The matrix runs each cell once, on seed 0. On the generated workloads (``chat``,
``shared-prefix``) a seed is a different sample of the same workload; on ``azure`` the
arrivals and lengths are the trace's and the seed draws the synthesised prefixes. With 2,000
requests on 8 nodes the tail moves between seeds by more than the targets' 2 %. This
runs the cell on seeds 0 .. N-1 and prints, per policy, each seed's TTFT mean and p90, and
the mean, p90 and p99 of all the seeds' requests pooled; then kvfleet's pooled figures
over the best other policy's (each figure's best separately, as the matrix does).

    .venv/bin/python bench/seed_spread.py --workload chat|shared-prefix|azure --nodes 8 --load 0.8 \\
        [--seeds 6] [--policies kvfleet,sglang,llmd,preble] [--requests N] [--traces DIR]

Runs take about 6 s per policy and seed for chat at 8 nodes on one core.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import numpy as np

import kvfleet.controller.sim.baselines  # noqa: F401  (registers the baselines)
from kvfleet.controller.sim.des import capacity_scale, simulate, trace_stats
from kvfleet.controller.sim.presets import preset_config
from kvfleet.controller.sim.workloads import load_workload
from routing_matrix import REQUESTS, TRACES, workload_args  # bench/, beside this script


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workload", choices=("chat", "shared-prefix", "azure"), required=True)
    ap.add_argument("--nodes", type=int, default=8)
    ap.add_argument("--load", type=float, default=0.8)
    ap.add_argument("--seeds", type=int, default=6, help="Seeds 0 .. N-1.")
    ap.add_argument("--policies", default="kvfleet,sglang,llmd,preble",
                    help="Comma-separated; kvfleet first is compared with the rest.")
    ap.add_argument("--requests", type=int, default=None,
                    help="Requests per seed (default: the matrix's, 2,000 for chat and azure, all 1,024 of shared-prefix).")
    ap.add_argument("--traces", type=Path, default=TRACES,
                    help="The shared traces directory (azure).")
    ap.add_argument("--preset", default="h100-llama3-8b")
    a = ap.parse_args()
    if a.seeds < 1 or a.nodes < 1 or not a.load > 0:
        ap.error("--seeds and --nodes must be >= 1 and --load > 0")
    policies = a.policies.split(",")
    config = preset_config(a.preset)
    ttft: dict[str, list[np.ndarray]] = {p: [] for p in policies}
    hits = {p: [0, 0] for p in policies}
    t0 = time.perf_counter()
    for seed in range(a.seeds):
        requests = a.requests if a.requests is not None else REQUESTS[a.workload]
        wl = load_workload(**workload_args(a.workload, requests, a.traces), seed=seed)
        scale = capacity_scale(trace_stats(wl, config, a.nodes), a.nodes, a.load)
        for p in policies:
            res = simulate(wl, p, config, a.nodes, time_scale=scale)
            ttft[p].append(np.array([r.ttft_s for r in res.requests]))
            hits[p][0] += sum(max(r.cached_tokens, 0) for r in res.requests)
            hits[p][1] += sum(r.prompt_tokens for r in res.requests)
    print(f"{a.workload}, {a.nodes} nodes, load {a.load}, seeds 0-{a.seeds - 1} "
          f"({time.perf_counter() - t0:.0f} s); TTFT ms")
    pooled = {}
    for p in policies:
        allt = np.concatenate(ttft[p])
        pooled[p] = (allt.mean(), np.percentile(allt, 90), np.percentile(allt, 99))
        per = " ".join(f"{t.mean() * 1e3:.1f}/{np.percentile(t, 90) * 1e3:.1f}" for t in ttft[p])
        print(f"  {p:13s} pooled mean {pooled[p][0] * 1e3:6.1f} p90 {pooled[p][1] * 1e3:6.1f} "
              f"p99 {pooled[p][2] * 1e3:6.1f} hit {hits[p][0] / max(hits[p][1], 1):.3f} | per seed mean/p90: {per}")
    if "kvfleet" in pooled and len(pooled) > 1:
        others = [p for p in policies if p != "kvfleet"]
        ratios = []
        for k, label in enumerate(("mean", "p90", "p99")):
            best = min(others, key=lambda p: pooled[p][k])
            r = pooled["kvfleet"][k] / pooled[best][k] if pooled[best][k] > 0 else math.inf
            ratios.append(f"{label} {r:.3f} ({best})")
        print("  kvfleet pooled / best other: " + ", ".join(ratios))


if __name__ == "__main__":
    main()
