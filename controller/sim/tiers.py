"""``kvfleet bench tiers``: service tiers under twice the fleet's capacity, live.

Real processes, as ``bench routing --live``: etcd, a controller, a router and N sim node
agents, every duration of the engines ``time_scale`` times longer (so the Python router
and clients keep up on a small machine) and the router's admission waits scaled alike.

1. **Capacity**: the workload's saturation throughput on the simulated fleet (every
   request arriving at once, the kvfleet policy, the production routing code:
   :func:`~kvfleet.controller.sim.des.simulate`), in requests per virtual second. It
   credits the prefix cache, so "twice the capacity" is twice what this fleet can serve
   of this workload, not of a cache-blind one.
2. **Idle**: a fresh fleet; a sample of each tier's requests, one at a time
   (``max_tokens`` 1: only the first token is measured), so nothing else runs. This is
   each tier's TTFT on an idle fleet.
3. **Overload**: a fresh fleet; every request at its arrival time, the times scaled so
   the offered rate is ``overload`` x capacity, tiers drawn at random with the ``mix``
   (10 % priority, 60 % default, 30 % flex by default); flex requests ask to wait at
   most ``flex_queue_s`` (10 s) in the router's queue (``max_queue_ms``). A client shed with
   RESOURCE_EXHAUSTED waits the router's ``retry-after-ms`` and retries, up to
   ``max_retries`` times; then it gives up, and the report says so. Nothing is dropped
   without a status: every request ends completed, given up after sheds, or failed.

TTFT under overload is the successful attempt's (the latency promise is for requests
the fleet admits); ``wait_p99_s`` adds the time spent being shed and retrying.
"""

from __future__ import annotations

import asyncio
import json
import math
import shutil
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np

from kvfleet.controller.sim.live import MODEL, _GRPC_OPTS, ByteMapped, scaled_config, start_fleet
from kvfleet.controller.sim.workloads import TraceRequest
from kvfleet.v1 import common_pb2 as cpb

TIERS = {"priority": cpb.TIER_PRIORITY, "default": cpb.TIER_DEFAULT, "flex": cpb.TIER_FLEX}


@dataclass(slots=True)
class TierResult:
    tier: str
    prompt_tokens: int
    output_tokens: int
    ttft_s: float = math.nan          # of the attempt that completed
    e2e_s: float = math.nan           # of the attempt that completed
    wait_s: float = math.nan          # first send to first token, sheds and retries included
    sheds: int = 0                    # RESOURCE_EXHAUSTED answers received
    outcome: str = "pending"          # completed | gave_up | failed
    error: str = ""
    cached_tokens: int = 0


async def _attempt(stub, prompt: list[int], max_tokens: int, tier: int, res: TierResult, timeout: float,
                   max_queue_s: float = 0.0) -> int | None:
    """One Generate call. Returns the retry-after in ms if shed, else None."""
    from kvfleet.v1 import inference_pb2 as ipb

    req = ipb.GenerateRequest(model=MODEL, token_ids={"ids": prompt}, request_id=uuid.uuid4().hex, tier=tier,
                              max_queue_ms=int(max_queue_s * 1000))
    req.sampling.max_tokens = max_tokens
    req.sampling.temperature = 0.0
    t0 = time.perf_counter()
    ttft = math.nan
    call = stub.Generate(req, timeout=timeout)
    try:
        async for msg in call:
            if msg.HasField("chunk"):
                if msg.chunk.token_ids and math.isnan(ttft):
                    ttft = time.perf_counter() - t0
            else:
                res.ttft_s, res.e2e_s = ttft, time.perf_counter() - t0
                res.cached_tokens = msg.usage.cached_prompt_tokens
                res.outcome = "completed"
        if res.outcome != "completed":
            res.outcome, res.error = "failed", "stream ended without usage"
        return None
    except grpc.aio.AioRpcError as exc:
        if exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
            md = dict(exc.trailing_metadata() or ())
            return int(md.get("retry-after-ms", "1000"))
        res.outcome, res.error = "failed", f"{exc.code().name}: {exc.details()}"
        return None


async def _one(stub, prompt: list[int], max_tokens: int, res: TierResult, *, max_retries: int,
               retry_floor_s: float, timeout: float, flex_queue_s: float = 0.0) -> None:
    t0 = time.perf_counter()
    for _ in range(max_retries + 1):
        retry_ms = await _attempt(stub, prompt, max_tokens, TIERS[res.tier], res, timeout,
                                  flex_queue_s if res.tier == "flex" else 0.0)
        if retry_ms is None:
            if res.outcome == "completed":
                res.wait_s = (time.perf_counter() - t0) - (res.e2e_s - res.ttft_s)
            return
        res.sheds += 1
        await asyncio.sleep(max(retry_ms / 1000, retry_floor_s))
    res.outcome = "gave_up"


async def _overload(router: str, requests: list[TraceRequest], tiers: list[str], arrival_scale: float, *,
                    max_retries: int, retry_floor_s: float, timeout: float, flex_queue_s: float) -> list[TierResult]:
    from kvfleet.v1 import inference_pb2_grpc as ipbg

    results = [TierResult(t, len(r.prompt), r.output_tokens) for r, t in zip(requests, tiers)]
    async with grpc.aio.insecure_channel(router, options=_GRPC_OPTS) as ch:
        stub = ipbg.InferenceStub(ch)
        first = requests[0].arrival_s
        t0 = time.perf_counter() + 0.2
        tasks = []
        for r, res in zip(requests, results):
            delay = t0 + (r.arrival_s - first) * arrival_scale - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(_one(stub, r.prompt.tolist(), r.output_tokens, res, max_retries=max_retries,
                                                  retry_floor_s=retry_floor_s, timeout=timeout,
                                                  flex_queue_s=flex_queue_s)))
        await asyncio.gather(*tasks)
    return results


async def _idle(router: str, requests: list[TraceRequest], tiers: list[str], timeout: float) -> list[TierResult]:
    """One request at a time, first token only."""
    from kvfleet.v1 import inference_pb2_grpc as ipbg

    results = [TierResult(t, len(r.prompt), 1) for r, t in zip(requests, tiers)]
    async with grpc.aio.insecure_channel(router, options=_GRPC_OPTS) as ch:
        stub = ipbg.InferenceStub(ch)
        for r, res in zip(requests, results):
            await _one(stub, r.prompt.tolist(), 1, res, max_retries=0, retry_floor_s=0.0, timeout=timeout)
    return results


def _p(values: list[float], q: float) -> float:
    v = [x for x in values if not math.isnan(x)]
    return float(np.percentile(v, q)) if v else math.nan


def saturation_throughput(requests: list[TraceRequest], config, nodes: int) -> float:
    """Requests per virtual second the simulated fleet completes with all of them queued at once."""
    from kvfleet.controller.sim.des import simulate

    return float(simulate(requests, "kvfleet", config, nodes, time_scale=1e-9).summary()["throughput_req_s"])


def run_tiers(*, workload: str = "chat", requests: int = 600, nodes: int = 4, preset: str = "h100-llama3-8b",
              overload: float = 2.0, mix: tuple[float, float, float] = (0.1, 0.6, 0.3), time_scale: float = 10.0,
              idle_samples: int = 30, idle_time_scale: float = 2.0, max_retries: int = 20, max_num_seqs: int = 32,
              flex_queue_s: float = 10.0, seed: int = 0, data_dir: Path | None = None,
              timeout_s: float = 900.0) -> dict:
    from kvfleet.controller.sim.des import clip
    from kvfleet.controller.sim.presets import preset_config
    from kvfleet.controller.sim.workloads import load_workload

    if not math.isclose(sum(mix), 1.0, abs_tol=1e-6) or any(m < 0 for m in mix):
        raise ValueError(f"--mix must be three non-negative fractions summing to 1, got {mix}")
    # Operators bound the running batch (vLLM's --max-num-seqs) to bound decode latency; a
    # fleet then saturates on sequence slots, and lower tiers start to wait.
    config = preset_config(preset).model_copy(update={"max_num_seqs": max_num_seqs})
    reqs = [clip(r, config) for r in ByteMapped(load_workload(workload=workload, requests=requests, seed=seed))]
    rng = np.random.default_rng(seed + 17)
    u = rng.random(len(reqs))
    tiers = ["priority" if x < mix[0] else "default" if x < mix[0] + mix[1] else "flex" for x in u]

    capacity = saturation_throughput(reqs, config, nodes)             # requests per virtual second
    span = reqs[-1].arrival_s - reqs[0].arrival_s
    arrival_scale = len(reqs) / (span * overload * capacity) if span > 0 else 1.0
    # Router waits, in real seconds: the engines run time_scale times slower.
    from kvfleet.controller.router.admission import AdmissionConfig

    defaults = AdmissionConfig()
    admission = {k: getattr(defaults, k) * time_scale for k in
                 ("default_max_wait_s", "flex_max_wait_s", "batch_max_wait_s", "flex_aging_s", "batch_aging_s")}
    router_args = ("--admission", json.dumps(admission))
    tmp = Path(tempfile.mkdtemp(prefix="kvfleet-tiers-")) if data_dir is None else data_dir
    scaled = scaled_config(config, time_scale)

    idle_reqs, idle_tiers = [], []
    for name in TIERS:
        # Every priority request (its p99 is compared), a sample of the others.
        picked = [r for r, t in zip(reqs, tiers) if t == name][:None if name == "priority" else idle_samples]
        idle_reqs += picked
        idle_tiers += [name] * len(picked)

    t_start = time.perf_counter()
    # One request at a time keeps up with the engines at any scale: a small one saves wall time.
    fleet = start_fleet(tmp / "idle", nodes, scaled_config(config, idle_time_scale), "kvfleet", router_args=router_args)
    try:
        idle = asyncio.run(_idle(fleet.router, idle_reqs, idle_tiers, timeout_s))
    finally:
        fleet.stop()
        shutil.rmtree(tmp / "idle" / "etcd", ignore_errors=True)
    fleet = start_fleet(tmp / "overload", nodes, scaled, "kvfleet", router_args=router_args)
    try:
        t0 = time.perf_counter()
        loaded = asyncio.run(_overload(fleet.router, reqs, tiers, arrival_scale * time_scale, max_retries=max_retries,
                                       retry_floor_s=0.5 * time_scale / 10, timeout=timeout_s,
                                       flex_queue_s=flex_queue_s * time_scale))
        makespan = time.perf_counter() - t0
    finally:
        fleet.stop()
        shutil.rmtree(tmp / "overload" / "etcd", ignore_errors=True)

    out_tiers = {}
    for name in TIERS:
        i = [r for r in idle if r.tier == name]
        for r in i:
            r.ttft_s *= time_scale / idle_time_scale   # reported below in the overload phase's units
        o = [r for r in loaded if r.tier == name]
        done = [r for r in o if r.outcome == "completed"]
        idle_p99 = _p([r.ttft_s for r in i], 99) / time_scale
        over_p99 = _p([r.ttft_s for r in done], 99) / time_scale
        out_tiers[name] = {
            "offered": len(o),
            "completed": len(done),
            "shed": sum(r.sheds for r in o),                       # RESOURCE_EXHAUSTED answers
            "shed_then_completed": sum(1 for r in done if r.sheds),
            "gave_up": sum(1 for r in o if r.outcome == "gave_up"),
            "failed": sum(1 for r in o if r.outcome == "failed"),
            "errors": sorted({r.error for r in o if r.error})[:5],
            "idle_samples": len(i),
            "ttft_idle_p50_s": _p([r.ttft_s for r in i], 50) / time_scale,
            "ttft_idle_p99_s": idle_p99,
            "ttft_overload_p50_s": _p([r.ttft_s for r in done], 50) / time_scale,
            "ttft_overload_p99_s": over_p99,
            "ttft_p99_ratio": over_p99 / idle_p99 if idle_p99 > 0 else math.nan,
            "wait_p99_s": _p([r.wait_s for r in done], 99) / time_scale,
            "hit_rate": sum(r.cached_tokens for r in done) / max(sum(r.prompt_tokens for r in done), 1),
        }
    # Priority requests one by one (the same requests, idle and under overload), for a reader
    # who wants to see where the tail comes from.
    pi = [r for r in idle if r.tier == "priority"]
    po = [r for r in loaded if r.tier == "priority"]
    priority_requests = [
        {"prompt_tokens": a.prompt_tokens, "ttft_idle_s": a.ttft_s / time_scale, "cached_idle": a.cached_tokens,
         "ttft_overload_s": b.ttft_s / time_scale, "cached_overload": b.cached_tokens}
        for a, b in zip(pi, po)]
    offered_rate = len(reqs) / (span * arrival_scale) if span > 0 else math.nan
    return {
        "bench": "tiers",
        "workload": workload, "requests": len(reqs), "nodes": nodes, "preset": preset, "seed": seed,
        "max_num_seqs": max_num_seqs, "flex_max_queue_s": flex_queue_s, "mix": dict(zip(TIERS, mix)), "overload": overload, "time_scale": time_scale, "idle_time_scale": idle_time_scale,
        "capacity_req_s": capacity, "offered_req_s": offered_rate,
        "completed_req_s": sum(t["completed"] for t in out_tiers.values()) / (makespan / time_scale),
        "makespan_s": makespan / time_scale, "wall_s": time.perf_counter() - t_start,
        "admission": admission, "max_retries": max_retries, "data_dir": str(tmp),
        "tiers": out_tiers,
        "priority_requests": priority_requests,
        "priority_ok": out_tiers["priority"]["ttft_p99_ratio"] <= 1.5,
        "none_dropped": all(t["completed"] + t["gave_up"] + t["failed"] == t["offered"] for t in out_tiers.values()),
    }


def print_tiers_report(rep: dict, console) -> None:
    from rich.table import Table

    console.print(
        f"[bold]tiers[/bold]: {rep['workload']} x {rep['requests']}, {rep['nodes']} nodes ({rep['preset']}), "
        f"capacity {rep['capacity_req_s']:.2f} req/s, offered {rep['offered_req_s']:.2f} req/s "
        f"({rep['overload']:.1f}x), completed {rep['completed_req_s']:.2f} req/s; time scale {rep['time_scale']:g}, "
        f"wall {rep['wall_s']:.0f} s")
    t = Table(title="TTFT (s, simulated time): idle vs overload")
    for col in ("tier", "offered", "completed", "shed", "shed→done", "gave up", "failed", "idle p50", "idle p99",
                "load p50", "load p99", "p99 ratio", "wait p99", "hit"):
        t.add_column(col, justify="right")
    for name, x in rep["tiers"].items():
        t.add_row(name, str(x["offered"]), str(x["completed"]), str(x["shed"]), str(x["shed_then_completed"]),
                  str(x["gave_up"]), str(x["failed"]), f"{x['ttft_idle_p50_s']:.3f}", f"{x['ttft_idle_p99_s']:.3f}",
                  f"{x['ttft_overload_p50_s']:.3f}", f"{x['ttft_overload_p99_s']:.3f}", f"{x['ttft_p99_ratio']:.2f}",
                  f"{x['wait_p99_s']:.2f}", f"{x['hit_rate']:.2f}")
    console.print(t)
    console.print(f"priority p99 within 1.5x idle: {'yes' if rep['priority_ok'] else 'NO'}; "
                  f"every request completed, gave up or failed with a status: {'yes' if rep['none_dropped'] else 'NO'}")
