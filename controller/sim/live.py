"""``kvfleet bench routing --live``: the simulator's workload through real processes.

Per policy it starts a fresh local cluster on 127.0.0.1: etcd, a controller (no
router), a standalone router process (so its CPU time is its own) and N node agents
whose sim engines run the preset ``time_scale`` times slower than real hardware. The
workload's arrivals are stretched by the same factor (on top of the simulator's
capacity scale for ``--load``), so the run is the simulated one slowed down
uniformly: the router's cost estimates, the engines' steps and the arrivals keep
their proportions, while Python's per-message costs shrink relative to them. Times in
the report are divided by ``time_scale`` back into the preset's seconds.

Then, on the now idle fleet, it measures the router itself:

* added latency: the same (cached) prompt sent through the router and straight to
  the node the router picked, alternately; the difference of the TTFT medians;
* CPU: ``utime + stime`` of the router process from ``/proc/<pid>/stat`` over two
  bursts that differ only in output length. Their difference gives µs per relayed
  stream message, the rest µs per request; the idle rate of the process (state
  streams, etcd watch) is measured first and subtracted.

Prompts are the workload's token ids modulo 256: the sim engine serves a byte-level
tokenizer (257 ids) and the router checks ids against it. Distinct 16-token blocks stay
distinct (128 bits each), so which requests share prefixes is unchanged; the
simulator's figure in the report is computed on the same mapped prompts.

The node agent processes are started through this module (``python -m
kvfleet.controller.sim.live node ...``) because ``node join`` takes only a few sim
flags, not a whole preset; they run the production ``node_agent.agent.serve``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import grpc
import numpy as np

from kvfleet.many import ManyError, ManyClient
from kvfleet.controller.sim.workloads import TraceRequest
from kvfleet.node_agent.engines.sim_core import SimConfig

MODEL = "kvfleet-sim"
STATS_FILE = "live-stats.json"
_ME = [sys.executable, "-m"]
_CLK_TCK = os.sysconf("SC_CLK_TCK")
_GRPC_OPTS = [("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20)]


# ---------------------------------------------------------------------------- workload

def scaled_config(config: SimConfig, time_scale: float) -> SimConfig:
    """``config`` running ``time_scale`` times slower: every duration multiplied, the
    prefill rate divided. Capacity and batching are unchanged."""
    return config.model_copy(update={
        "model": MODEL,
        "prefill_tokens_per_s": config.prefill_tokens_per_s / time_scale,
        "decode_step_base_s": config.decode_step_base_s * time_scale,
        "decode_step_per_seq_s": config.decode_step_per_seq_s * time_scale,
        "decode_step_per_context_token_s": config.decode_step_per_context_token_s * time_scale,
    })


class ByteMapped:
    """A workload with every prompt token taken modulo 256 (see the module doc)."""

    def __init__(self, inner: Iterable[TraceRequest]) -> None:
        self.inner = inner

    def __iter__(self) -> Iterator[TraceRequest]:
        for r in self.inner:
            yield TraceRequest(r.arrival_s, (r.prompt % 256).astype(np.uint32), r.output_tokens)


# ---------------------------------------------------------------------------- processes

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process ``pid``, seconds (clock-tick resolution)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK   # utime, stime: fields 14 and 15


@dataclass
class LiveFleet:
    """Processes of one live cluster and where they listen."""

    data_dir: Path
    controller: str
    router: str
    procs: list[tuple[str, subprocess.Popen]] = field(default_factory=list)
    node_addr: dict[str, str] = field(default_factory=dict)  # node id -> address
    node_dirs: dict[str, Path] = field(default_factory=dict)  # node id -> data dir (stats file)

    def spawn(self, name: str, args: list[str]) -> subprocess.Popen:
        log = open(self.data_dir / f"{name}.log", "ab")
        p = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                             start_new_session=True)
        log.close()
        self.procs.append((name, p))
        return p

    def log(self, name: str) -> str:
        return (self.data_dir / f"{name}.log").read_text(errors="replace")

    def check(self) -> None:
        for name, p in self.procs:
            if p.poll() is not None:
                tail = "\n  ".join(self.log(name).strip().splitlines()[-8:])
                raise RuntimeError(f"{name} exited with code {p.returncode}:\n  {tail}")

    def pid(self, name: str) -> int:
        return next(p.pid for n, p in self.procs if n == name)

    def stop(self, timeout: float = 10.0) -> None:
        """Stops every process, newest first (nodes, router, controller, etcd)."""
        for _, p in reversed(self.procs):
            if p.poll() is None:
                p.terminate()
        deadline = time.monotonic() + timeout
        for _, p in reversed(self.procs):
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def _wait(pred, timeout: float, fleet: LiveFleet, what: str, interval: float = 0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        fleet.check()
        value = pred()
        if value:
            return value
        time.sleep(interval)
    raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what} (logs in {fleet.data_dir})")


def _routable(router: str) -> int:
    """How many nodes the router would route a one-token prompt to now."""
    from kvfleet.v1 import inference_pb2 as ipb
    from kvfleet.v1 import inference_pb2_grpc as ipbg

    req = ipb.GenerateRequest(model=MODEL, token_ids={"ids": [1]})
    req.sampling.max_tokens = 1
    try:
        with grpc.insecure_channel(router) as ch:
            resp = ipbg.InferenceStub(ch).ExplainRoute(req, timeout=2.0)
    except grpc.RpcError:
        return 0
    return sum(1 for c in resp.candidates if c.eligible)


def start_fleet(data_dir: Path, nodes: int, config: SimConfig, policy: str, timeout: float = 90.0,
                router_args: tuple[str, ...] = ()) -> LiveFleet:
    """Starts etcd, controller, router and ``nodes`` sim node agents; returns once the
    router can route to every node. Stops what it started if that fails."""
    from kvfleet.cli.up import etcd_command
    from kvfleet.v1 import controller_pb2 as cpb
    from kvfleet.v1 import controller_pb2_grpc as cpbg

    data_dir.mkdir(parents=True, exist_ok=True)
    etcd_client, etcd_peer = f"127.0.0.1:{_free_port()}", f"127.0.0.1:{_free_port()}"
    fleet = LiveFleet(data_dir, f"127.0.0.1:{_free_port()}", f"127.0.0.1:{_free_port()}")
    try:
        fleet.spawn("etcd", etcd_command("live", data_dir / "etcd", etcd_client, etcd_peer))
        fleet.spawn("controller", _ME + [
            "kvfleet.cli.main", "controller", "run", "--no-router", "--etcd", etcd_client, "--listen", fleet.controller,
            "--lease-ttl", "10", "--data-dir", str(data_dir / "controller"),
        ])
        _wait(lambda: '"controller_ready"' in fleet.log("controller"), timeout, fleet, "the controller")
        fleet.spawn("router", _ME + [
            "kvfleet.cli.main", "router", "run", "--etcd", etcd_client, "--listen", fleet.router, "--policy", policy,
            # Scaled engines are slow; a node is only "silent" well beyond its estimate.
            "--first-token-timeout", "60", "--no-auth", *router_args,
        ])
        _wait(lambda: '"router_ready"' in fleet.log("router"), timeout, fleet, "the router")
        with grpc.insecure_channel(fleet.controller) as ch:
            token = cpbg.ControllerStub(ch).CreateJoinToken(
                cpb.CreateJoinTokenRequest(ttl_s=0, description="bench routing --live"), timeout=10).token
        cfg_path = data_dir / "sim-config.json"
        cfg_path.write_text(config.model_dump_json())
        for i in range(nodes):
            d = data_dir / f"node-{i}"
            fleet.spawn(f"node-{i}", _ME + [
                "kvfleet.controller.sim.live", "node", "--controller", fleet.controller, "--token", token,
                "--config", str(cfg_path), "--data-dir", str(d),
            ])

        def ready_nodes():
            found = {}
            for i in range(nodes):
                for line in fleet.log(f"node-{i}").splitlines():
                    if '"node_ready"' in line:
                        r = json.loads(line[line.index("{"):])
                        found[r["node_id"]] = (r["address"], data_dir / f"node-{i}")
            return found if len(found) == nodes else None

        for nid, (addr, d) in _wait(ready_nodes, timeout, fleet, f"{nodes} nodes to join").items():
            fleet.node_addr[nid], fleet.node_dirs[nid] = addr, d
        _wait(lambda: _routable(fleet.router) >= nodes, timeout, fleet, f"the router to route to {nodes} nodes",
              interval=0.3)
    except BaseException:
        fleet.stop()
        raise
    return fleet


# ---------------------------------------------------------------------------- client

@dataclass(slots=True)
class LiveResult:
    """One request as the client saw it. Times are real seconds."""

    prompt_tokens: int
    output_tokens: int             # asked for
    sent_s: float = math.nan       # loop time the call started
    lag_s: float = 0.0             # how late the client sent it (event loop behind schedule)
    ttft_s: float = math.nan       # first message carrying token ids
    e2e_s: float = math.nan        # usage received
    completion_tokens: int = 0
    cached_tokens: int = 0
    messages: int = 0              # stream messages received (chunks and usage)
    node_id: str = ""
    error: str = ""


async def _generate(stub, prompt: list[int], max_tokens: int, res: LiveResult, timeout: float,
                    tier: int = 0, stream_interval_ms: int = 0) -> None:
    """One request through the router: ``stub`` is an ``InferenceStub`` (one Generate call)
    or a ``ManyClient`` (one request of its GenerateMany call)."""
    from kvfleet.v1 import inference_pb2 as ipb

    req = ipb.GenerateRequest(model=MODEL, token_ids={"ids": prompt}, request_id=uuid.uuid4().hex, tier=tier,
                              stream_interval_ms=stream_interval_ms)
    req.sampling.max_tokens = max_tokens
    req.sampling.temperature = 0.0
    t0 = time.perf_counter()
    res.sent_s = t0
    try:
        call = stub.generate if isinstance(stub, ManyClient) else stub.Generate
        async for msg in call(req, timeout=timeout):
            res.messages += 1
            if msg.HasField("chunk"):
                if msg.chunk.token_ids and math.isnan(res.ttft_s):
                    res.ttft_s = time.perf_counter() - t0
            else:
                u = msg.usage
                res.e2e_s = time.perf_counter() - t0
                res.completion_tokens, res.cached_tokens, res.node_id = u.completion_tokens, u.cached_prompt_tokens, u.node_id
    except (grpc.aio.AioRpcError, ManyError) as exc:
        res.error = f"{exc.code().name}: {exc.details()}"


async def replay(router: str, requests: list[TraceRequest], arrival_scale: float, timeout: float) -> tuple[list[LiveResult], float]:
    """Sends ``requests`` to the router at their arrival times times ``arrival_scale``
    (real seconds, open loop); returns the results and the makespan, seconds."""
    from kvfleet.v1 import inference_pb2_grpc as ipbg

    results = [LiveResult(len(r.prompt), r.output_tokens) for r in requests]
    prompts = [r.prompt.tolist() for r in requests]
    async with grpc.aio.insecure_channel(router, options=_GRPC_OPTS) as ch:
        stub = ipbg.InferenceStub(ch)
        first = requests[0].arrival_s if requests else 0.0
        t0 = time.perf_counter() + 0.2
        tasks = []
        for r, res, prompt in zip(requests, results, prompts):
            due = t0 + (r.arrival_s - first) * arrival_scale
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            res.lag_s = max(0.0, time.perf_counter() - due)
            tasks.append(asyncio.create_task(_generate(stub, prompt, r.output_tokens, res, timeout)))
        await asyncio.gather(*tasks)
        end = max((r.sent_s + r.e2e_s for r in results if not math.isnan(r.e2e_s)), default=t0)
    return results, end - t0


async def _direct(stub, prompt: list[int], max_tokens: int) -> float:
    """TTFT of ``prompt`` sent straight to a node agent (``stub`` on a long-lived channel), seconds."""
    from kvfleet.v1 import node_pb2 as npb

    req = npb.NodeGenerateRequest(request_id=uuid.uuid4().hex, model=MODEL, prompt_token_ids=prompt)
    req.sampling.max_tokens = max_tokens
    req.sampling.temperature = 0.0
    t0 = time.perf_counter()
    ttft = math.nan
    async for msg in stub.Generate(req, timeout=60):
        if msg.WhichOneof("kind") == "tokens" and math.isnan(ttft):
            ttft = time.perf_counter() - t0
    return ttft


async def added_latency(fleet: LiveFleet, samples: int, prompt_tokens: int = 256, seed: int = 1,
                        many: bool = False) -> dict:
    """TTFT through the router vs straight to the node it picked, same cached prompt,
    alternating which goes first; every channel (the client's to the router and to each
    node) is long-lived and connected before the first timing, as a client keeps them.
    ``many``: the routed requests go over one open GenerateMany call."""
    from kvfleet.v1 import inference_pb2_grpc as ipbg
    from kvfleet.v1 import node_pb2_grpc as npbg

    rng = np.random.default_rng(seed)
    routed, direct = [], []
    node_channels = {nid: grpc.aio.insecure_channel(addr, options=_GRPC_OPTS) for nid, addr in fleet.node_addr.items()}
    try:
        node_stubs = {nid: npbg.NodeAgentStub(ch) for nid, ch in node_channels.items()}
        async with grpc.aio.insecure_channel(fleet.router, options=_GRPC_OPTS) as ch:
            stub = ipbg.InferenceStub(ch)
            if many:
                stub = ManyClient(stub)
            for i in range(samples):
                prompt = rng.integers(0, 256, prompt_tokens).tolist()
                warm = LiveResult(prompt_tokens, 1)
                await _generate(stub, prompt, 1, warm, 60)           # caches the prompt; learns the node
                if warm.error or warm.node_id not in node_stubs:
                    continue
                node = node_stubs[warm.node_id]
                await _direct(node, prompt, 1)                        # connects the node's channel
                for order in ((0, 1) if i % 2 == 0 else (1, 0)):
                    if order == 0:
                        r = LiveResult(prompt_tokens, 1)
                        await _generate(stub, prompt, 1, r, 60)
                        if not r.error:
                            routed.append(r.ttft_s)
                    else:
                        direct.append(await _direct(node, prompt, 1))
            if many:
                await stub.close()
    finally:
        for c in node_channels.values():
            await c.close()
    med = (lambda a: float(np.median(a)) if a else math.nan)
    return {"samples": min(len(routed), len(direct)), "routed_ttft_p50_s": med(routed), "direct_ttft_p50_s": med(direct),
            "added_p50_s": med(routed) - med(direct)}


async def _burst(router: str, n: int, max_tokens: int, concurrency: int, seed: int, tier: int = 0,
                 stream_interval_ms: int = 0, many: bool = False) -> tuple[int, int]:
    """``n`` requests of 128 random tokens, ``concurrency`` at a time; returns
    (requests completed, stream messages the router relayed). ``many``: over one
    GenerateMany call, where a relayed message is an item (many share a gRPC message)."""
    from kvfleet.v1 import inference_pb2_grpc as ipbg

    rng = np.random.default_rng(seed)
    results = [LiveResult(128, max_tokens) for _ in range(n)]
    prompts = [rng.integers(0, 256, 128).tolist() for _ in range(n)]
    sem = asyncio.Semaphore(concurrency)
    async with grpc.aio.insecure_channel(router, options=_GRPC_OPTS) as ch:
        stub = ipbg.InferenceStub(ch)
        if many:
            stub = ManyClient(stub)

        async def one(i: int) -> None:
            async with sem:
                await _generate(stub, prompts[i], max_tokens, results[i], 120, tier, stream_interval_ms)

        await asyncio.gather(*(one(i) for i in range(n)))
        if many:
            await stub.close()
    return sum(1 for r in results if not r.error), sum(r.messages for r in results)


async def router_cpu(fleet: LiveFleet, requests: int, long_tokens: int = 32, concurrency: int = 32,
                     time_scale: float = 1.0, many: bool = False, seed: int = 100) -> dict:
    """Router CPU per request and per relayed message, from two bursts (1 and
    ``long_tokens`` output tokens) after subtracting the process's idle rate. A third
    burst, like the second but in the flex tier (chunks at least 100 ms of preset time
    apart), gives the CPU per token when tokens are merged into fewer messages. The
    bursts' prompts come from ``seed``: runs to compare take different seeds, or a later
    run finds an earlier one's prompts cached (less prefill, no new blocks to index)."""
    pid = fleet.pid("router")
    c0, t0 = cpu_seconds(pid), time.perf_counter()
    await asyncio.sleep(2.0)
    idle_rate = (cpu_seconds(pid) - c0) / (time.perf_counter() - t0)
    from kvfleet.v1 import common_pb2 as cpb

    phases = []
    flex_ms = max(1, round(100 * time_scale))
    for k, (tokens, tier, interval) in enumerate(((1, 0, 0), (long_tokens, 0, 0), (long_tokens, cpb.TIER_FLEX, flex_ms))):
        c0, t0 = cpu_seconds(pid), time.perf_counter()
        done, msgs = await _burst(fleet.router, requests, tokens, concurrency, seed=seed + k, tier=tier,
                                  stream_interval_ms=interval, many=many)
        wall = time.perf_counter() - t0
        phases.append((done, msgs, max(0.0, cpu_seconds(pid) - c0 - idle_rate * wall), wall))
    (n1, m1, c1, _), (n2, m2, c2, _), (n3, m3, c3, _) = phases
    per_msg = (c2 / max(n2, 1) - c1 / max(n1, 1)) / max(m2 / max(n2, 1) - m1 / max(n1, 1), 1e-9)
    per_req = c1 / max(n1, 1) - per_msg * m1 / max(n1, 1)
    per_tok = {   # CPU beyond a one-token request's, per extra token: every token vs merged
        "default": (c2 / max(n2, 1) - c1 / max(n1, 1)) / max(long_tokens - 1, 1),
        "flex": (c3 / max(n3, 1) - c1 / max(n1, 1)) / max(long_tokens - 1, 1),
    }
    return {
        "flex": {"requests": n3, "messages": m3, "cpu_s": c3, "output_tokens": long_tokens,
                 "stream_interval_ms": flex_ms},
        "cpu_us_per_token": {k: v * 1e6 for k, v in per_tok.items()},
        "idle_cpu_fraction": idle_rate,
        "short": {"requests": n1, "messages": m1, "cpu_s": c1, "output_tokens": 1},
        "long": {"requests": n2, "messages": m2, "cpu_s": c2, "output_tokens": long_tokens},
        "cpu_us_per_request": per_req * 1e6,
        "cpu_us_per_message": per_msg * 1e6,
    }


# ---------------------------------------------------------------------------- one policy

def _summary(policy: str, results: list[LiveResult], makespan_s: float, time_scale: float, busy: list[float],
             preemptions: int) -> dict:
    ok = [r for r in results if not r.error and not math.isnan(r.e2e_s)]
    ttft = np.array([r.ttft_s for r in ok if not math.isnan(r.ttft_s)]) / time_scale
    e2e = np.array([r.e2e_s for r in ok]) / time_scale
    pct = (lambda a, q: float(np.percentile(a, q)) if a.size else math.nan)
    span = makespan_s / time_scale
    b = np.array(busy)
    return {
        "policy": policy,
        "requests": len(results),
        "completed": len(ok),
        "errors": sorted({r.error for r in results if r.error})[:5],
        "hit_rate": sum(r.cached_tokens for r in ok) / max(sum(r.prompt_tokens for r in results), 1),
        "ttft_mean_s": float(ttft.mean()) if ttft.size else math.nan,
        "ttft_p50_s": pct(ttft, 50), "ttft_p90_s": pct(ttft, 90), "ttft_p99_s": pct(ttft, 99),
        "e2e_p99_s": pct(e2e, 99),
        "throughput_req_s": len(ok) / span if span > 0 else math.nan,
        "throughput_out_tok_s": sum(r.completion_tokens for r in ok) / span if span > 0 else math.nan,
        "load_imbalance": float(b.max() / b.mean()) if b.size and b.mean() > 0 else math.nan,
        "busy_s": [round(x / time_scale, 3) for x in busy],
        "preemptions": preemptions,
        "makespan_s": span,
        "wall_s": makespan_s,
        "messages": sum(r.messages for r in results),
        "client_lag_max_s": max((r.lag_s for r in results), default=0.0),
        # In workload order: (node id, cached prompt tokens, TTFT in preset seconds), for
        # comparing decisions with the simulator's request by request.
        "per_request": [(r.node_id, r.cached_tokens, round(r.ttft_s / time_scale, 6)) for r in results],
    }


def node_stats(fleet: LiveFleet, timeout: float = 10.0) -> tuple[list[float], int]:
    """Each node's engine busy time so far (scaled seconds; NaN if it did not answer) and
    the fleet's preemptions, asked for by SIGUSR1 (see :func:`_node_main`)."""
    files = {name: fleet.node_dirs[nid] / STATS_FILE for nid, name in _node_names(fleet).items()}
    for name, f in files.items():
        f.unlink(missing_ok=True)
        os.kill(fleet.pid(name), signal.SIGUSR1)
    deadline = time.monotonic() + timeout
    while not all(f.exists() for f in files.values()) and time.monotonic() < deadline:
        time.sleep(0.05)
    busy, preempt = [], 0
    for f in files.values():
        try:
            st = json.loads(f.read_text())
            busy.append(st["busy_s"])
            preempt += st["preemptions"]
        except (OSError, ValueError, KeyError):
            busy.append(math.nan)
    return busy, preempt


def _node_names(fleet: LiveFleet) -> dict[str, str]:
    """node id -> process name."""
    return {nid: d.name for nid, d in fleet.node_dirs.items()}


def run_live_policy(policy: str, requests: list[TraceRequest], config: SimConfig, nodes: int, *, arrival_scale: float,
                    time_scale: float, overhead_requests: int, data_dir: Path, timeout_s: float) -> dict:
    """One live run of ``policy``: replay, then the router's overhead on the idle fleet."""
    fleet = start_fleet(data_dir, nodes, scaled_config(config, time_scale), policy)
    try:
        pid = fleet.pid("router")
        c0 = cpu_seconds(pid)
        results, makespan = asyncio.run(replay(fleet.router, requests, arrival_scale * time_scale, timeout_s))
        cpu = cpu_seconds(pid) - c0
        busy, preempt = node_stats(fleet)
        overhead: dict = {}
        if overhead_requests > 0:
            # Each request its own Generate call, then all over one GenerateMany call.
            overhead["latency"] = asyncio.run(added_latency(fleet, max(5, overhead_requests // 10)))
            overhead["cpu"] = asyncio.run(router_cpu(fleet, overhead_requests, time_scale=time_scale))
            overhead["latency_many"] = asyncio.run(added_latency(fleet, max(5, overhead_requests // 10), many=True))
            overhead["cpu_many"] = asyncio.run(router_cpu(fleet, overhead_requests, time_scale=time_scale, many=True,
                                                          seed=200))
    finally:
        fleet.stop()
        # etcd preallocates ~60 MB of WAL; the logs (kept) are what a reader may want.
        shutil.rmtree(data_dir / "etcd", ignore_errors=True)
    out = _summary(policy, results, makespan, time_scale, busy, preempt)
    msgs = out["messages"]
    out["router_cpu_s"] = cpu
    out["router_cpu_us_per_request"] = cpu / max(len(results), 1) * 1e6
    out["router_cpu_us_per_message"] = cpu / max(msgs, 1) * 1e6
    out["overhead"] = overhead
    return out


def run_live(*, trace, fmt, workload, requests, nodes, preset, load, policies, block_size=16, seed=0,
             time_scale=10.0, overhead_requests=200, data_dir: Path | None = None, timeout_s: float = 600.0) -> dict:
    """Every policy in ``policies`` live, plus the simulator's figures for the same mapped
    workload; the JSON-able report."""
    from kvfleet.controller.sim.des import capacity_scale, clip, simulate, trace_stats
    from kvfleet.controller.sim.presets import preset_config
    from kvfleet.controller.sim.workloads import load_workload

    config = preset_config(preset, block_size=block_size)
    wl = ByteMapped(load_workload(trace=trace, fmt=fmt, workload=workload, requests=requests, seed=seed))
    reqs = [clip(r, config) for r in wl]
    stats = trace_stats(reqs, config, nodes)
    scale = capacity_scale(stats, nodes, load)
    tmp = Path(tempfile.mkdtemp(prefix="kvfleet-live-")) if data_dir is None else data_dir
    out = []
    for p in policies:
        sim = simulate(reqs, p, config, nodes, time_scale=scale).summary()
        live = run_live_policy(p, reqs, config, nodes, arrival_scale=scale, time_scale=time_scale,
                               overhead_requests=overhead_requests, data_dir=tmp / p, timeout_s=timeout_s)
        live["sim"] = {k: sim[k] for k in ("hit_rate", "ttft_mean_s", "ttft_p50_s", "ttft_p90_s", "ttft_p99_s",
                                           "e2e_p99_s", "throughput_req_s", "load_imbalance")}
        out.append(live)
    return {
        "mode": "live",
        "workload": {"trace": trace, "format": fmt if trace else None, "workload": workload, "requests": stats.requests,
                     "prompt_tokens": stats.prompt_tokens, "output_tokens": stats.output_tokens},
        "nodes": nodes, "preset": preset, "config": config.model_dump(), "load": load, "arrival_scale": scale,
        "time_scale": time_scale, "data_dir": str(tmp),
        "bounds": {"infinite_cache_hit_rate": stats.infinite_hit_rate, "pooled_lru_hit_rate": stats.pooled_lru_hit_rate},
        "policies": out,
    }


def print_live_report(report: dict, console) -> None:
    from rich.table import Table

    w, b = report["workload"], report["bounds"]
    console.print(
        f"LIVE {w['trace'] or w['workload']}: {w['requests']} requests, {report['nodes']} x {report['preset']} "
        f"(engines and arrivals x {report['time_scale']:g} slower; times below in preset seconds), load {report['load']}; "
        f"bounds: infinite-cache {b['infinite_cache_hit_rate']:.3f}, pooled-LRU {b['pooled_lru_hit_rate']:.3f}")
    t = Table()
    for col in ("policy", "done", "hit rate", "sim hit", "TTFT mean ms", "p50", "p90", "p99", "sim p50", "e2e p99 s",
                "req/s", "imbalance", "router CPU ms/req", "µs/msg", "msgs/req"):
        t.add_column(col, justify="left" if col == "policy" else "right")
    ms = (lambda x: "-" if math.isnan(x) else f"{x * 1e3:.1f}")
    for r in report["policies"]:
        t.add_row(r["policy"], f"{r['completed']}/{r['requests']}", f"{r['hit_rate']:.3f}", f"{r['sim']['hit_rate']:.3f}",
                  ms(r["ttft_mean_s"]), ms(r["ttft_p50_s"]), ms(r["ttft_p90_s"]), ms(r["ttft_p99_s"]),
                  ms(r["sim"]["ttft_p50_s"]), f"{r['e2e_p99_s']:.2f}", f"{r['throughput_req_s']:.2f}",
                  f"{r['load_imbalance']:.3f}", f"{r['router_cpu_us_per_request'] / 1e3:.1f}",
                  f"{r['router_cpu_us_per_message']:.1f}", f"{r['messages'] / max(r['completed'], 1):.1f}")
    console.print(t)
    console.print("[dim]router CPU ms/req and µs/msg: the router process's whole CPU time during the replay, "
                  "divided by requests or by the stream messages it sent[/dim]")
    for r in report["policies"]:
        o = r["overhead"]
        for suffix, how in (("", "one Generate call per request"), ("_many", "one GenerateMany call")):
            if "latency" + suffix not in o:
                continue
            lat, cpu = o["latency" + suffix], o["cpu" + suffix]
            console.print(
                f"{r['policy']} router overhead on the idle fleet, {how}: added TTFT p50 {lat['added_p50_s'] * 1e3:.2f} ms "
                f"(router {lat['routed_ttft_p50_s'] * 1e3:.2f} ms vs direct {lat['direct_ttft_p50_s'] * 1e3:.2f} ms, "
                f"{lat['samples']} pairs, real time); CPU {cpu['cpu_us_per_request']:.0f} µs/request + "
                f"{cpu['cpu_us_per_message']:.1f} µs/message (idle {cpu['idle_cpu_fraction'] * 100:.1f} % of a core "
                f"subtracted); per token beyond the first: {cpu['cpu_us_per_token']['default']:.1f} µs one message each, "
                f"{cpu['cpu_us_per_token']['flex']:.1f} µs merged (flex tier, "
                f"{cpu['flex']['messages'] / max(cpu['flex']['requests'], 1):.1f} messages per "
                f"{cpu['flex']['output_tokens']}-token request)")
        if r["errors"]:
            console.print(f"[red]{r['policy']} errors: {r['errors']}[/red]")


# ---------------------------------------------------------------------------- node process

def _node_main(argv: list[str]) -> None:
    """A node agent serving one sim engine of a given :class:`SimConfig` (JSON file);
    on SIGUSR1 it writes its busy time and preemptions so far to ``DATA/live-stats.json``."""
    from kvfleet.cli.common import run_until_signal
    from kvfleet.node_agent.agent import AgentConfig, serve
    from kvfleet.node_agent.engines.sim import SimEngine

    ap = argparse.ArgumentParser(prog="kvfleet.controller.sim.live node")
    ap.add_argument("--controller", required=True)
    ap.add_argument("--token", required=True)
    ap.add_argument("--config", required=True, help="SimConfig as JSON")
    ap.add_argument("--data-dir", required=True)
    ap.add_argument("--listen", default="127.0.0.1:0")
    a = ap.parse_args(argv)
    engine = SimEngine(SimConfig.model_validate_json(Path(a.config).read_text()))
    cfg = AgentConfig(controller=a.controller, token=a.token, listen=a.listen, data_dir=Path(a.data_dir))
    stats = Path(a.data_dir) / STATS_FILE

    def write_stats() -> None:
        tmp = stats.with_suffix(".tmp")
        tmp.write_text(json.dumps({"busy_s": engine.busy_s, "preemptions": engine.core.stats.num_preemptions}))
        tmp.replace(stats)

    async def main(stop: asyncio.Event) -> None:
        asyncio.get_running_loop().add_signal_handler(signal.SIGUSR1, write_stats)
        await serve(cfg, [engine], stop)

    run_until_signal(main)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "node":
        import logging

        logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        _node_main(sys.argv[2:])
    else:
        sys.exit("usage: python -m kvfleet.controller.sim.live node --controller ADDR --token T --config FILE --data-dir DIR")
