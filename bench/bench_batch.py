"""Batch API throughput against the same requests sent interactively.

Starts a local cluster on 127.0.0.1 (etcd, a controller with its router, ``--nodes`` sim
nodes with a small KV cache so arrival order decides hit rates), then runs three times the
same shared-prefix workload (``--groups`` system prompts x ``--per-group`` questions; each
run with fresh prefixes, so every run starts from cold caches):

1. as a batch job (``Batch.Submit``): the runner sends items in prompt order, tier batch;
2. interactively, shuffled: ``Inference.Generate`` calls with the same concurrency as the
   runner's window (``--inflight-per-node`` x nodes), no prefix ordering;
3. interactively in prompt order (same concurrency): what ordering alone buys.

Prints items/s and prompt-token cache hit rates, and the batch/shuffled ratios.

    .venv/bin/python bench/bench_batch.py [--json OUT]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc

from kvfleet.cli.up import etcd_command
from kvfleet.controller.batch.runner import BatchConfig
from kvfleet.controller.batch.workload import RunStats, run_interactive, shared_prefix_lines, to_jsonl
from kvfleet.v1 import batch_pb2 as bpb
from kvfleet.v1 import batch_pb2_grpc as bpbg
from kvfleet.v1 import controller_pb2 as cpb
from kvfleet.v1 import controller_pb2_grpc as cpbg
from kvfleet.v1 import inference_pb2 as ipb
from kvfleet.v1 import inference_pb2_grpc as ipbg

KVFLEET = [sys.executable, "-m", "kvfleet.cli.main"]


def _port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(pred, timeout: float, what: str, interval: float = 0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if value := pred():
                return value
        except grpc.RpcError:
            pass
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout} s waiting for {what}")


class LocalCluster:
    def __init__(self, tmp: Path, nodes: int, node_args: list[str]) -> None:
        self.tmp, self.procs = tmp, []
        etcd = f"127.0.0.1:{_port()}"
        self.controller, self.router = f"127.0.0.1:{_port()}", f"127.0.0.1:{_port()}"
        self._spawn("etcd", etcd_command("b", tmp / "etcd", etcd, f"127.0.0.1:{_port()}"))
        self._spawn("controller", KVFLEET + ["controller", "run", "--etcd", etcd, "--listen", self.controller,
                                             "--router-listen", self.router, "--data-dir", str(tmp / "controller"),
                                             "--no-auth"])
        ctl = cpbg.ControllerStub(grpc.insecure_channel(self.controller))
        token = _wait(lambda: ctl.CreateJoinToken(cpb.CreateJoinTokenRequest(ttl_s=600), timeout=2).token, 60, "controller")
        for i in range(nodes):
            self._spawn(f"node{i}", KVFLEET + ["node", "join", "--controller", self.controller, "--token", token,
                                               "--data-dir", str(tmp / f"node{i}"), *node_args])
        inf = ipbg.InferenceStub(grpc.insecure_channel(self.router))
        req = ipb.GenerateRequest(model="kvfleet-sim", text="x")
        req.sampling.max_tokens = 1
        _wait(lambda: sum(c.eligible for c in inf.ExplainRoute(req, timeout=2).candidates) == nodes, 60, "nodes routable")

    def _spawn(self, name: str, args: list[str]) -> None:
        log = open(self.tmp / f"{name}.log", "ab")
        self.procs.append(subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL))

    def stop(self) -> None:
        for p in reversed(self.procs):
            p.terminate()
        for p in self.procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()


def run_batch(controller: str, lines: list[dict], timeout: float) -> RunStats:
    stub = bpbg.BatchStub(grpc.insecure_channel(controller))
    data = to_jsonl(lines)
    job = stub.Submit(iter([bpb.SubmitBatchChunk(data=data, completion_window="1h")]), timeout=60)
    final = _wait(lambda: (j := stub.GetJob(bpb.BatchJobRef(job_id=job.id), timeout=5)).finished_unix_ms and j,
                  timeout, "batch job", 0.05)
    results = list(stub.Results(bpb.BatchJobRef(job_id=job.id), timeout=60))
    return RunStats(final.counts.completed, final.counts.failed + final.counts.expired,
                    (final.finished_unix_ms - final.created_unix_ms) / 1000,
                    sum(r.prompt_tokens for r in results), sum(r.cached_prompt_tokens for r in results))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--nodes", type=int, default=3)
    ap.add_argument("--groups", type=int, default=50, help="distinct system prompts")
    ap.add_argument("--per-group", type=int, default=20, help="requests sharing each system prompt")
    ap.add_argument("--prefix", type=int, default=1024, help="system prompt length, tokens (the sim's tokenizer is byte-level)")
    ap.add_argument("--suffix", type=int, default=32, help="question length, tokens")
    ap.add_argument("--max-tokens", type=int, default=4)
    ap.add_argument("--sim-blocks", type=int, default=384, help="KV blocks of 16 tokens per node")
    ap.add_argument("--sim-prefill-tps", type=float, default=20000)
    ap.add_argument("--sim-decode-step-ms", type=float, default=2.0)
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = ap.parse_args()
    concurrency = args.nodes * BatchConfig().inflight_per_node
    node_args = ["--sim-blocks", str(args.sim_blocks), "--sim-prefill-tps", str(args.sim_prefill_tps),
                 "--sim-decode-step-ms", str(args.sim_decode_step_ms), "--sim-max-model-len", str(args.sim_blocks * 16 // 2)]
    tmp = Path(tempfile.mkdtemp(prefix="kvfleet-bench-batch-"))
    cluster = LocalCluster(tmp, args.nodes, node_args)
    shape = (args.groups, args.per_group, args.prefix, args.suffix, args.max_tokens)
    try:
        rows = {
            "batch job (prompt order, tier batch)": run_batch(cluster.controller, shared_prefix_lines(*shape, salt=1), 600),
            "interactive, shuffled": asyncio.run(run_interactive(cluster.router, shared_prefix_lines(*shape, salt=2), concurrency)),
            "interactive, prompt order": asyncio.run(run_interactive(cluster.router, shared_prefix_lines(*shape, salt=3),
                                                                     concurrency, shuffle=False)),
        }
    finally:
        cluster.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    n = args.groups * args.per_group
    print(f"{n} requests ({args.groups} prefixes of {args.prefix} tokens x {args.per_group}, +{args.suffix}-token question, "
          f"{args.max_tokens} output tokens), {args.nodes} sim nodes of {args.sim_blocks} blocks, concurrency {concurrency}")
    print(f"{'run':<40} {'items':>6} {'failed':>6} {'seconds':>8} {'items/s':>8} {'cache hit':>9}")
    for name, r in rows.items():
        print(f"{name:<40} {r.items:>6} {r.failed:>6} {r.seconds:>8.2f} {r.items_per_s:>8.1f} {r.hit_rate:>9.1%}")
    b, s = rows["batch job (prompt order, tier batch)"], rows["interactive, shuffled"]
    print(f"batch / interactive shuffled: throughput x{b.items_per_s / s.items_per_s:.2f}, "
          f"uncached prompt tokens x{(b.prompt_tokens - b.cached_prompt_tokens) / max(1, s.prompt_tokens - s.cached_prompt_tokens):.2f}")
    if args.json:
        args.json.write_text(json.dumps({name: {"items": r.items, "failed": r.failed, "seconds": round(r.seconds, 3),
                                                "items_per_s": round(r.items_per_s, 2), "hit_rate": round(r.hit_rate, 4),
                                                "prompt_tokens": r.prompt_tokens, "cached_prompt_tokens": r.cached_prompt_tokens}
                                         for name, r in rows.items()}, indent=2) + "\n")


if __name__ == "__main__":
    main()
