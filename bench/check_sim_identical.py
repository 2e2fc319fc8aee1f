"""Checks that the routing simulator gives exactly the same results as at another commit.

Runs a set of small simulations (chat, Mooncake, shared-prefix; every policy; with and
without a KV event delay; a roomy cache and one so small that blocks are evicted and
requests preempted) on this checkout and on ``--base`` (a git revision, exported to a
temporary directory), each in its own process, and compares every request's node,
cached tokens, TTFT and e2e, and each run's steps, preemptions, per-node busy time and
makespan, bit for bit. Exits 1 on the first difference. For changes to the simulator
that must not change its results (speed, memory).

    .venv/bin/python bench/check_sim_identical.py --base HEAD~1 [--quick]
"""

from __future__ import annotations

import argparse
import pickle
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TRACE = ROOT.parent / "shared" / "traces" / "mooncake-synthetic" / "synthetic_trace.jsonl"
POLICIES = ("kvfleet", "round_robin", "least_loaded", "prefix_hash", "sglang", "dynamo", "llmd", "preble")

# (name, workload, trace, requests, nodes, num_blocks or None for the preset's, policies)
CASES = [
    ("chat", "chat", None, 600, 8, None, POLICIES),
    ("chat-1000n", "chat", None, 1500, 1000, None, ("kvfleet",)),
    ("chat-small-cache", "chat", None, 400, 4, 1200, POLICIES),
    ("shared-prefix", "shared-prefix", None, 1024, 8, None, POLICIES),
    ("shared-prefix-small-cache", "shared-prefix", None, 512, 4, 600, ("kvfleet", "round_robin", "prefix_hash")),
    ("mooncake", None, "mooncake", 300, 8, None, POLICIES),
    ("mooncake-small-cache", None, "mooncake", 200, 4, 4000, ("kvfleet", "least_loaded")),
]
QUICK = {"chat", "chat-small-cache", "shared-prefix-small-cache", "mooncake"}
KV_DELAYS_MS = (0.0, 5.0)


def run_cases(names: list[str]) -> dict:
    """Worker: runs the named cases with the ``kvfleet`` importable now; results keyed by case."""
    import kvfleet.controller.sim.baselines  # noqa: F401  (registers the baselines)
    from kvfleet.controller.sim.des import capacity_scale, simulate, trace_stats
    from kvfleet.controller.sim.presets import preset_config
    from kvfleet.controller.sim.workloads import load_workload

    out = {}
    for name, workload, trace, requests, nodes, num_blocks, policies in CASES:
        if name not in names:
            continue
        config = preset_config("h100-llama3-8b", block_size=16)
        if num_blocks is not None:
            config = config.model_copy(update={"num_blocks": num_blocks, "max_model_len": min(
                config.max_model_len, num_blocks * config.block_size)})
        wl = load_workload(trace=str(TRACE) if trace else None, fmt="mooncake", workload=workload,
                           requests=requests, seed=0)
        stats = trace_stats(wl, config, nodes)
        scale = capacity_scale(stats, nodes, 0.8)
        for delay in KV_DELAYS_MS:
            for p in policies:
                res = simulate(wl, p, config, nodes, time_scale=scale, kv_delay_s=delay / 1e3)
                out[(name, delay, p)] = {
                    "requests": [(r.node, r.cached_tokens, r.ttft_s, r.e2e_s, r.prompt_tokens, r.output_tokens)
                                 for r in res.requests],
                    "steps": res.steps, "preemptions": res.preemptions, "busy_s": res.busy_s,
                    "makespan_s": res.makespan_s, "cpu_s": res.cpu_s,
                }
    return out


def _worker_main(root: str, names: str, dest: str) -> None:
    # The editable install points at the main checkout; import kvfleet from ``root``.
    sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in repr(f).lower()]
    sys.path.insert(0, root)
    import kvfleet
    assert kvfleet.__file__.startswith(root), kvfleet.__file__
    Path(dest).write_bytes(pickle.dumps(run_cases(names.split(","))))


def _run(root: Path, names: list[str], dest: Path) -> dict:
    subprocess.run([sys.executable, __file__, "--worker", str(root), ",".join(names), str(dest)], check=True)
    return pickle.loads(dest.read_bytes())


def _checkout(rev: str, dest: Path) -> Path:
    """``rev`` exported to ``dest``, with the package links ``kvfleet/`` needs."""
    dest.mkdir()
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    for pkg in ("controller", "node_agent"):
        link = dest / "kvfleet" / pkg
        if not link.exists():
            link.symlink_to(f"../{pkg}")
    return dest


def _ensure_links(root: Path) -> None:
    for pkg in ("controller", "node_agent"):
        link = root / "kvfleet" / pkg
        if not link.exists():
            raise SystemExit(f"{link} is missing: the package links are needed (ln -s ../{pkg} {link})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", required=True, help="Git revision to compare against.")
    ap.add_argument("--quick", action="store_true", help=f"Only the cases {sorted(QUICK)}.")
    ap.add_argument("--cases", help="Comma-separated case names (default: all, or --quick's).")
    args = ap.parse_args()
    names = args.cases.split(",") if args.cases else [c[0] for c in CASES if not args.quick or c[0] in QUICK]
    _ensure_links(ROOT)
    with tempfile.TemporaryDirectory(prefix="sim-identical-") as tmp:
        base = _checkout(args.base, Path(tmp) / "base")
        t0 = time.perf_counter()
        old = _run(base, names, Path(tmp) / "old.pkl")
        t1 = time.perf_counter()
        new = _run(ROOT, names, Path(tmp) / "new.pkl")
        t2 = time.perf_counter()
    bad = 0
    for key in sorted(old, key=str):
        a, b = old[key], new[key]
        cpu = f"cpu {a['cpu_s']:.2f} s -> {b['cpu_s']:.2f} s"
        diffs = [k for k in ("steps", "preemptions", "busy_s", "makespan_s", "requests") if a[k] != b[k]]
        if diffs:
            bad += 1
            first = next((i for i, (x, y) in enumerate(zip(a["requests"], b["requests"])) if x != y), None)
            print(f"DIFFERENT {key}: {diffs}; first differing request {first}: "
                  f"{a['requests'][first] if first is not None else ''} vs {b['requests'][first] if first is not None else ''}")
        else:
            print(f"identical {key}: {len(a['requests'])} requests, {a['steps']} steps, "
                  f"{a['preemptions']} preemptions; {cpu}")
    print(f"{len(old)} runs, {bad} different; base {t1 - t0:.0f} s, this checkout {t2 - t1:.0f} s")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--worker":
        _worker_main(*sys.argv[2:])
    else:
        main()
