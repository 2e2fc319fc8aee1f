"""``kvfleet bench routing``: every policy on the same workload, in one simulated run each."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

bench_app = typer.Typer(help="Benchmarks that need no cluster.", no_args_is_help=True)

DEFAULT_POLICIES = "kvfleet,round_robin,least_loaded,prefix_hash,sglang,dynamo,llmd,preble"


def run_bench(*, trace: Optional[str], fmt: str, workload: Optional[str], requests: Optional[int], nodes: int,
              preset: str, load: float, policies: list[str], block_size: int = 16, kv_delay_ms: float = 0.0,
              seed: int = 0) -> dict:
    """Runs every policy on the same workload; returns the JSON-able report."""
    import kvfleet.controller.sim.baselines  # noqa: F401  (registers the baselines)
    from kvfleet.controller.router.policy import POLICIES
    from kvfleet.controller.sim.des import capacity_scale, simulate, trace_stats
    from kvfleet.controller.sim.presets import preset_config
    from kvfleet.controller.sim.workloads import load_workload

    unknown = [p for p in policies if p not in POLICIES]
    if unknown:
        raise typer.BadParameter(f"unknown policies {unknown}; known: {', '.join(sorted(POLICIES))}",
                                 param_hint="--policies")
    try:
        config = preset_config(preset, block_size=block_size)
        wl = load_workload(trace=trace, fmt=fmt, workload=workload, requests=requests, seed=seed)
    except ValueError as e:
        raise typer.BadParameter(str(e)) from e
    stats = trace_stats(wl, config, nodes)
    scale = capacity_scale(stats, nodes, load)
    results = []
    for p in policies:
        results.append(simulate(wl, p, config, nodes, time_scale=scale, kv_delay_s=kv_delay_ms / 1e3).summary())
    return {
        "workload": {"trace": trace, "format": fmt if trace else None, "workload": workload, "requests": stats.requests,
                     "prompt_tokens": stats.prompt_tokens, "output_tokens": stats.output_tokens},
        "nodes": nodes, "preset": preset, "config": config.model_dump(), "load": load,
        "time_scale": scale, "offered_work_node_s": stats.work_s,
        "bounds": {"infinite_cache_hit_rate": stats.infinite_hit_rate,
                   "pooled_lru_hit_rate": stats.pooled_lru_hit_rate},
        "policies": results,
    }


def print_report(report: dict, console: Console) -> None:
    b = report["bounds"]
    w = report["workload"]
    console.print(
        f"{w['trace'] or w['workload']}: {w['requests']} requests, {report['nodes']} x {report['preset']}, "
        f"load {report['load']} (arrivals x {report['time_scale']:.4g}); "
        f"bounds: infinite-cache hit rate {b['infinite_cache_hit_rate']:.3f}, "
        f"pooled-LRU {b['pooled_lru_hit_rate']:.3f}")
    t = Table()
    for col in ("policy", "hit rate", "TTFT mean ms", "p50", "p90", "p99", "e2e p99 s", "req/s", "out tok/s",
                "imbalance", "preempt", "wall s"):
        t.add_column(col, justify="left" if col == "policy" else "right")
    ms = (lambda x: "-" if math.isnan(x) else f"{x * 1e3:.1f}")
    for r in report["policies"]:
        t.add_row(r["policy"], f"{r['hit_rate']:.3f}", ms(r["ttft_mean_s"]), ms(r["ttft_p50_s"]), ms(r["ttft_p90_s"]),
                  ms(r["ttft_p99_s"]), f"{r['e2e_p99_s']:.2f}", f"{r['throughput_req_s']:.2f}",
                  f"{r['throughput_out_tok_s']:.0f}", f"{r['load_imbalance']:.3f}", str(r["preemptions"]),
                  f"{r['wall_s']:.1f}")
    console.print(t)


@bench_app.command("routing")
def routing(
    trace: Optional[str] = typer.Option(None, "--trace", help="Trace file to replay (see --format)."),
    fmt: str = typer.Option("mooncake", "--format", help="Trace format: mooncake (JSONL) or azure (CSV)."),
    workload: Optional[str] = typer.Option(None, "--workload", help="Generated workload: chat or shared-prefix."),
    requests: Optional[int] = typer.Option(
        None, "--requests", min=1, help="Use at most this many requests (chat: default 2,000; shared-prefix: all 1,024)."),
    nodes: int = typer.Option(8, "--nodes", min=1, help="Simulated nodes."),
    preset: str = typer.Option("h100-llama3-8b", "--preset", help="Engine preset (GPU and model)."),
    load: float = typer.Option(0.8, "--load", min=0.01, help="Offered work as a fraction of fleet capacity."),
    policies: str = typer.Option(DEFAULT_POLICIES, "--policies", help="Comma-separated policy names."),
    block_size: int = typer.Option(16, "--block-size", min=1, help="KV block size, tokens."),
    kv_delay_ms: float = typer.Option(0.0, "--kv-delay-ms", min=0, help="KV event delay to the index, ms."),
    seed: int = typer.Option(0, "--seed", help="Seed of generated workloads and synthetic prefixes."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write the full report here as JSON."),
    live: bool = typer.Option(False, "--live", help="Replay through real processes (etcd, router, N node agents with "
                              "sim engines) in real time; default policy: kvfleet only."),
    time_scale: float = typer.Option(10.0, "--time-scale", min=1.0, help="--live: engines and arrivals run this many "
                                     "times slower than the preset, so Python's costs stay small beside them."),
    overhead_requests: int = typer.Option(200, "--overhead-requests", min=0, help="--live: requests per burst when "
                                          "measuring the router's CPU and added latency afterwards (0: skip)."),
) -> None:
    """Simulate every policy on one workload (virtual time, real policy and index code)."""
    if live:
        _routing_live(trace, fmt, workload, requests, nodes, preset, load, policies, block_size, seed, json_out,
                      time_scale, overhead_requests)
        return
    report = run_bench(trace=trace, fmt=fmt, workload=workload, requests=requests, nodes=nodes, preset=preset,
                       load=load, policies=[p.strip() for p in policies.split(",") if p.strip()],
                       block_size=block_size, kv_delay_ms=kv_delay_ms, seed=seed)
    print_report(report, Console(width=max(Console().width, 150)))
    if json_out is not None:
        json_out.write_text(json.dumps(report, indent=1, default=float))


def _routing_live(trace, fmt, workload, requests, nodes, preset, load, policies, block_size, seed, json_out,
                  time_scale, overhead_requests) -> None:
    # Only the policies a router process serves (the simulator's baselines are not among them).
    from kvfleet.controller.router.policy import POLICIES
    from kvfleet.controller.sim.live import print_live_report, run_live

    names = ["kvfleet"] if policies == DEFAULT_POLICIES else [p.strip() for p in policies.split(",") if p.strip()]
    unknown = [p for p in names if p not in POLICIES]
    if unknown:
        raise typer.BadParameter(f"--live runs only the router's policies; unknown there: {unknown}; "
                                 f"known: {', '.join(sorted(POLICIES))}", param_hint="--policies")
    try:
        report = run_live(trace=trace, fmt=fmt, workload=workload, requests=requests, nodes=nodes, preset=preset,
                          load=load, policies=names, block_size=block_size, seed=seed, time_scale=time_scale,
                          overhead_requests=overhead_requests)
    except ValueError as e:
        raise typer.BadParameter(str(e)) from e
    except RuntimeError as e:
        Console(stderr=True).print(f"[red]live bench failed: {e}[/red]")
        raise typer.Exit(1) from e
    print_live_report(report, Console(width=max(Console().width, 170)))
    if json_out is not None:
        json_out.write_text(json.dumps(report, indent=1, default=float))


@bench_app.command("tiers")
def tiers(
    workload: str = typer.Option("chat", "--workload", help="Generated workload: chat or shared-prefix."),
    requests: int = typer.Option(800, "--requests", min=20, help="Requests offered in the overload phase."),
    nodes: int = typer.Option(4, "--nodes", min=1, max=64, help="Sim node agents (real processes)."),
    preset: str = typer.Option("h100-llama3-8b", "--preset", help="Calibrated sim engine preset."),
    overload: float = typer.Option(2.0, "--overload", min=0.1, help="Offered rate as a multiple of the fleet's capacity."),
    mix: str = typer.Option("0.1,0.6,0.3", "--mix", help="Fractions of priority, default and flex requests."),
    time_scale: float = typer.Option(10.0, "--time-scale", min=1.0, help="Engines run this many times slower than the preset (5 lets Python lag into the figures on 2 cores)."),
    max_num_seqs: int = typer.Option(32, "--max-num-seqs", min=1, help="Running-batch bound of each sim engine (vLLM's --max-num-seqs)."),
    idle_samples: int = typer.Option(30, "--idle-samples", min=1, help="Requests per tier measured on the idle fleet."),
    max_retries: int = typer.Option(20, "--max-retries", min=0, help="Retries of a shed request before the client gives up."),
    flex_queue: float = typer.Option(10.0, "--flex-queue", min=0.1, help="Seconds a flex request asks to wait at most in the router's queue (max_queue_ms)."),
    seed: int = typer.Option(0, "--seed"),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write the report as JSON here."),
) -> None:
    """Service tiers at twice the fleet's capacity (live processes, sim engines): each tier's
    p99 TTFT idle and under overload, and how many requests completed, were shed and failed."""
    from kvfleet.controller.sim.presets import PRESETS
    from kvfleet.controller.sim.tiers import print_tiers_report, run_tiers

    if preset not in PRESETS:
        raise typer.BadParameter(f"unknown preset {preset!r}; known: {', '.join(sorted(PRESETS))}", param_hint="--preset")
    if workload not in ("chat", "shared-prefix"):
        raise typer.BadParameter(f"unknown workload {workload!r}; choose chat or shared-prefix", param_hint="--workload")
    try:
        fractions = tuple(float(x) for x in mix.split(","))
    except ValueError:
        fractions = ()
    if len(fractions) != 3 or any(f < 0 for f in fractions) or not math.isclose(sum(fractions), 1.0, abs_tol=1e-6):
        raise typer.BadParameter(f"expected three fractions summing to 1 (priority,default,flex), got {mix!r}", param_hint="--mix")
    report = run_tiers(workload=workload, requests=requests, nodes=nodes, preset=preset, overload=overload,
                       mix=fractions, time_scale=time_scale, idle_samples=idle_samples, max_retries=max_retries, seed=seed,
                       max_num_seqs=max_num_seqs, flex_queue_s=flex_queue)
    print_tiers_report(report, Console())
    if json_out:
        json_out.write_text(json.dumps(report, indent=2) + "\n")
