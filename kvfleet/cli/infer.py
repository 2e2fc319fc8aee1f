"""`kvfleet generate` and `kvfleet route explain`: the Inference API from a terminal."""

from __future__ import annotations

import sys
import time

import grpc
import typer
from rich.table import Table

from kvfleet.cli.common import JsonOpt, RouterOpt, console, err_console, print_json, run_rpc
from kvfleet.v1 import common_pb2 as cpb
from kvfleet.v1 import inference_pb2 as pb
from kvfleet.v1 import inference_pb2_grpc as pbg

route_app = typer.Typer(help="Inspect routing decisions.", no_args_is_help=True)

TIERS = {"auto": cpb.TIER_AUTO, "priority": cpb.TIER_PRIORITY, "default": cpb.TIER_DEFAULT, "flex": cpb.TIER_FLEX, "batch": cpb.TIER_BATCH}
FINISH = {cpb.FINISH_REASON_LENGTH: "length", cpb.FINISH_REASON_STOP: "stop", cpb.FINISH_REASON_ABORT: "abort",
          cpb.FINISH_REASON_UNSPECIFIED: "unknown"}
TIER_NAMES = {v: k for k, v in TIERS.items()}


def build_request(prompt: str | None, model: str, max_tokens: int, temperature: float | None, seed: int | None,
                  stop: list[str], tier: str, tenant: str, request_id: str, system: str | None,
                  token_ids: str | None, timeout: float | None, stream_interval_ms: int = 0) -> pb.GenerateRequest:
    if tier not in TIERS:
        raise typer.BadParameter(f"choose from {', '.join(TIERS)}", param_hint="--tier")
    if not 0 <= stream_interval_ms <= 60_000:
        raise typer.BadParameter("expected 0 (the tier's default) to 60000 ms", param_hint="--stream-interval-ms")
    req = pb.GenerateRequest(model=model, tier=TIERS[tier], tenant=tenant, request_id=request_id,
                             stream_interval_ms=stream_interval_ms)
    req.sampling.max_tokens = max_tokens
    if temperature is not None:
        req.sampling.temperature = temperature
    if seed is not None:
        req.sampling.seed = seed
    req.sampling.stop.extend(stop)
    if token_ids is not None:
        try:
            ids = [int(x) for x in token_ids.replace(",", " ").split()]
        except ValueError:
            raise typer.BadParameter("expected integers separated by commas or spaces", param_hint="--token-ids") from None
        req.token_ids.ids.extend(ids)
    elif system is not None:
        req.chat.messages.add(role="system", content=system)
        req.chat.messages.add(role="user", content=prompt or "")
    else:
        req.text = prompt or ""
    if timeout:
        req.deadline.FromNanoseconds(int((time.time() + timeout) * 1e9))
    return req


PromptArg = typer.Argument(None, help="prompt text ('-' reads stdin)")
ModelOpt = typer.Option("kvfleet-sim", "--model", "-m", envvar="KVFLEET_MODEL", help="model name")
ApiKeyOpt = typer.Option("", "--api-key", envvar="KVFLEET_API_KEY", show_default=False,
                         help="API key (kvfleet tenants keys create), sent as 'authorization: Bearer'; not needed in local mode")


def _auth_metadata(api_key: str) -> tuple[tuple[str, str], ...] | None:
    """The bearer metadata for ``--api-key`` (a malformed key fails here, naming the flag)."""
    if not api_key:
        return None
    from kvfleet.controller.tenancy import parse_key

    if parse_key(api_key.strip()) is None:
        raise typer.BadParameter("expected kvf_<key id>_<secret> as `kvfleet tenants keys create` prints it", param_hint="--api-key")
    return (("authorization", f"Bearer {api_key.strip()}"),)


def _prompt(prompt: str | None) -> str | None:
    return sys.stdin.read() if prompt == "-" else prompt


def generate(
    prompt: str = PromptArg,
    model: str = ModelOpt,
    max_tokens: int = typer.Option(64, "--max-tokens", "-n", help="tokens to generate (> 0)"),
    temperature: float = typer.Option(None, "--temperature", help="sampling temperature"),
    seed: int = typer.Option(None, "--seed", help="sampling seed"),
    stop: list[str] = typer.Option([], "--stop", help="stop string (repeatable)"),
    tier: str = typer.Option("auto", "--tier", help="auto, priority, default or flex"),
    tenant: str = typer.Option("", "--tenant", help="tenant (local mode; with auth the --api-key decides)"),
    request_id: str = typer.Option("", "--request-id", help="client request id"),
    system: str = typer.Option(None, "--system", help="send as chat: this system message, then the prompt as the user's"),
    token_ids: str = typer.Option(None, "--token-ids", help="send these token ids instead of text"),
    timeout: float = typer.Option(None, "--timeout", help="deadline in seconds"),
    stream_interval_ms: int = typer.Option(0, "--stream-interval-ms", help="least ms between two chunks; tokens made meanwhile come merged (0: the tier's default: flex 100, others every token)"),
    router: str = RouterOpt,
    api_key: str = ApiKeyOpt,
    json_out: bool = JsonOpt,
) -> None:
    """Stream a completion to the terminal, then show its usage."""
    metadata = _auth_metadata(api_key)
    req = build_request(_prompt(prompt), model, max_tokens, temperature, seed, stop, tier, tenant, request_id, system, token_ids, timeout,
                        stream_interval_ms)
    chunks = 0

    async def go():
        nonlocal chunks
        text, ids, usage = [], [], None
        t0 = time.monotonic()
        ttft = None
        async with grpc.aio.insecure_channel(router) as ch:
            async for msg in pbg.InferenceStub(ch).Generate(req, metadata=metadata):
                if msg.HasField("chunk"):
                    if ttft is None:
                        ttft = time.monotonic() - t0
                    chunks += 1
                    text.append(msg.chunk.text)
                    ids.extend(msg.chunk.token_ids)
                    if not json_out:
                        sys.stdout.write(msg.chunk.text)
                        sys.stdout.flush()
                else:
                    usage = msg.usage
        return "".join(text), ids, usage, ttft, time.monotonic() - t0

    text, ids, usage, ttft, total = run_rpc(go, router)
    u = usage_dict(usage)
    if json_out:
        print_json({"text": text, "token_ids": ids, "usage": u, "chunks": chunks,
                    "ttft_s": round(ttft or 0.0, 6), "total_s": round(total, 6)})
    else:
        sys.stdout.write("\n")
        err_console.print(
            f"[dim]node {u['node_id']} · prompt {u['prompt_tokens']} tok (cached {u['cached_prompt_tokens']}, "
            f"predicted {u['predicted_cached_tokens']}) · completion {u['completion_tokens']} tok · "
            f"finish {u['finish_reason']} · ttft {1000 * (ttft or 0):.0f} ms · total {1000 * total:.0f} ms[/dim]",
            highlight=False,
        )


def usage_dict(u: pb.Usage | None) -> dict:
    if u is None:
        return {}
    return {"prompt_tokens": u.prompt_tokens, "cached_prompt_tokens": u.cached_prompt_tokens,
            "completion_tokens": u.completion_tokens, "predicted_cached_tokens": u.predicted_cached_tokens,
            "node_id": u.node_id, "finish_reason": FINISH[u.finish_reason], "request_id": u.request_id,
            "attempts": u.attempts, "tier": TIER_NAMES.get(u.tier, "default")}


@route_app.command("explain")
def route_explain(
    prompt: str = PromptArg,
    model: str = ModelOpt,
    max_tokens: int = typer.Option(64, "--max-tokens", "-n", help="tokens the request would generate"),
    system: str = typer.Option(None, "--system", help="as chat: this system message, then the prompt"),
    token_ids: str = typer.Option(None, "--token-ids", help="token ids instead of text"),
    router: str = RouterOpt,
    api_key: str = ApiKeyOpt,
    json_out: bool = JsonOpt,
) -> None:
    """Every candidate's predicted cached tokens, load and cost for a prompt, and the pick."""
    metadata = _auth_metadata(api_key)
    req = build_request(_prompt(prompt), model, max_tokens, None, None, [], "auto", "", "", system, token_ids, None)

    async def go():
        async with grpc.aio.insecure_channel(router) as ch:
            return await pbg.InferenceStub(ch).ExplainRoute(req, timeout=10.0, metadata=metadata)

    r = run_rpc(go, router)
    d = {
        "model": r.model, "prompt_tokens": r.prompt_tokens, "block_size": r.block_size, "picked": r.picked_node_id,
        "timing_us": {"tokenize": round(r.tokenize_us, 1), "hash": round(r.hash_us, 1), "decide": round(r.decide_us, 1)},
        "candidates": [
            {"node_id": c.node_id, "address": c.address, "predicted_cached_tokens": c.predicted_cached_tokens,
             "queued_prefill_tokens": c.queued_prefill_tokens, "running": c.running, "kv_usage": round(c.kv_usage, 4),
             "estimated_ttft_s": c.estimated_ttft_s, "replica_credit_s": c.replica_credit_s, "eligible": c.eligible,
             "reason": c.reason}
            for c in r.candidates
        ],
    }
    if json_out:
        print_json(d)
        return
    t = Table(title=f"{r.model}: {r.prompt_tokens} prompt tokens, block {r.block_size} → picked {r.picked_node_id or 'none'}")
    for col in ("node", "cached tok", "queued tok", "running", "kv use", "est. TTFT", "replica credit", "eligible"):
        t.add_column(col)
    for c in d["candidates"]:
        mark = "→ " if c["node_id"] == r.picked_node_id else ""
        t.add_row(mark + c["node_id"], str(c["predicted_cached_tokens"]), str(c["queued_prefill_tokens"]),
                  str(c["running"]), f"{c['kv_usage']:.0%}", f"{1000 * c['estimated_ttft_s']:.2f} ms",
                  f"{1000 * c['replica_credit_s']:.2f} ms" if c["replica_credit_s"] else "-",
                  "yes" if c["eligible"] else f"no ({c['reason']})")
    console.print(t)
    console.print(f"[dim]tokenize {r.tokenize_us:.0f} µs · hash {r.hash_us:.0f} µs · decide {r.decide_us:.0f} µs[/dim]")
