"""`kvfleet batch ...`: the Batch API (submit a JSONL file, follow the job, fetch its output)."""

from __future__ import annotations

import json
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterable

import grpc
import typer
from rich.table import Table

from kvfleet.cli.common import ControllerOpt, JsonOpt, console, err_console, print_json, run_rpc
from kvfleet.cli.infer import ApiKeyOpt, _auth_metadata
from kvfleet.controller.batch.parse import CHAT_URL, parse_window
from kvfleet.v1 import batch_pb2 as pb
from kvfleet.v1 import batch_pb2_grpc as pbg
from kvfleet.v1 import common_pb2 as cpb

batch_app = typer.Typer(help="Batch jobs: a JSONL file of requests run on spare capacity (docs/batch.md).",
                        no_args_is_help=True)

CHUNK = 1 << 20  # bytes per Submit message (gRPC's default limit is 4 MiB)
STATE = {v: k.removeprefix("BATCH_JOB_STATE_").lower() for k, v in pb.BatchJobState.items()}
FINISH = {cpb.FINISH_REASON_LENGTH: "length", cpb.FINISH_REASON_STOP: "stop", cpb.FINISH_REASON_ABORT: "abort",
          cpb.FINISH_REASON_UNSPECIFIED: None}

JobArg = typer.Argument(..., help="job id (as `kvfleet batch submit` printed it)")
OutOpt = typer.Option(None, "--output", "-o", help="write JSONL to this file instead of stdout")


def job_dict(j: pb.BatchJob) -> dict:
    """The stable JSON shape of a job."""
    c = j.counts
    return {
        "id": j.id, "tenant": j.tenant, "state": STATE.get(j.state, "unknown"), "filename": j.filename,
        "created_unix_ms": j.created_unix_ms, "expires_unix_ms": j.expires_unix_ms,
        "finished_unix_ms": j.finished_unix_ms, "completion_window_s": j.completion_window_s,
        "counts": {"total": c.total, "pending": c.pending, "completed": c.completed, "failed": c.failed,
                   "expired": c.expired, "cancelled": c.cancelled, "rejected": c.rejected},
    }


def result_dict(r: pb.BatchResult) -> dict:
    """One line of the results file, in the common batch output format plus kvfleet's fields."""
    finish = FINISH.get(r.finish_reason)
    if r.url == CHAT_URL:
        obj, choice = "chat.completion", {"index": 0, "message": {"role": "assistant", "content": r.text},
                                          "finish_reason": finish}
    else:
        obj, choice = "text_completion", {"index": 0, "text": r.text, "finish_reason": finish}
    return {
        "id": r.request_id, "custom_id": r.custom_id,
        "response": {"status_code": 200, "request_id": r.request_id, "body": {
            "id": r.request_id, "object": obj, "created": r.completed_unix_ms // 1000, "model": r.model,
            "choices": [choice],
            "usage": {"prompt_tokens": r.prompt_tokens, "completion_tokens": r.completion_tokens,
                      "total_tokens": r.prompt_tokens + r.completion_tokens,
                      "prompt_tokens_details": {"cached_tokens": r.cached_prompt_tokens}},
        }},
        "error": None,
        "kvfleet": {"line": r.line, "node_id": r.node_id, "attempts": r.attempts},
    }


def error_dict(e: pb.BatchError) -> dict:
    return {"custom_id": e.custom_id or None, "line": e.line, "response": None,
            "error": {"code": e.code, "message": e.message}}


def _ts(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, timezone.utc).strftime("%Y-%m-%d %H:%M:%S") if ms else "-"


def _unary(controller: str, method: str, req, metadata):
    async def go():
        async with grpc.aio.insecure_channel(controller) as ch:
            return await getattr(pbg.BatchStub(ch), method)(req, timeout=30.0, metadata=metadata)

    return run_rpc(go, controller)


def _write_stream(controller: str, method: str, job: str, metadata, output: Path | None, convert) -> int:
    if output is not None and not output.parent.is_dir():
        raise typer.BadParameter(f"directory {str(output.parent)!r} does not exist", param_hint="--output")

    async def go():
        n = 0
        fh = open(output, "w") if output is not None else sys.stdout
        try:
            async with grpc.aio.insecure_channel(controller) as ch:
                async for msg in getattr(pbg.BatchStub(ch), method)(pb.BatchJobRef(job_id=job), metadata=metadata):
                    fh.write(json.dumps(convert(msg), separators=(",", ":"), ensure_ascii=False) + "\n")
                    n += 1
        finally:
            if output is not None:
                fh.close()
        return n

    return run_rpc(go, controller)


def _chunks(data: bytes, window: str, tenant: str, filename: str) -> Iterable[pb.SubmitBatchChunk]:
    yield pb.SubmitBatchChunk(data=data[:CHUNK], completion_window=window, tenant=tenant, filename=filename)
    for off in range(CHUNK, len(data), CHUNK):
        yield pb.SubmitBatchChunk(data=data[off:off + CHUNK])


@batch_app.command("submit")
def submit(
    file: Path = typer.Argument(..., exists=True, dir_okay=False, readable=True, metavar="FILE",
                                help="JSONL file: one request per line (custom_id, method, url, body)"),
    window: str = typer.Option("24h", "--window", help="completion window: items not done by then expire (e.g. 24h, 90m, 3600s)"),
    tenant: str = typer.Option("", "--tenant", help="tenant (local mode; with auth the --api-key decides)"),
    controller: str = ControllerOpt,
    api_key: str = ApiKeyOpt,
    json_out: bool = JsonOpt,
) -> None:
    """Submit a batch file; prints the job id (bad lines are reported by `batch errors`)."""
    try:
        parse_window(window)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--window") from None
    metadata = _auth_metadata(api_key)
    data = file.read_bytes()
    if not data.strip():
        raise typer.BadParameter(f"{str(file)!r} is empty: expected one JSON request per line", param_hint="FILE")

    async def go():
        async with grpc.aio.insecure_channel(controller) as ch:
            return await pbg.BatchStub(ch).Submit(_chunks(data, window, tenant, file.name), timeout=300.0, metadata=metadata)

    job = run_rpc(go, controller)
    if json_out:
        print_json(job_dict(job))
        return
    sys.stdout.write(job.id + "\n")
    err_console.print(f"[dim]{job.counts.total} request(s) accepted, {job.counts.rejected} line(s) rejected"
                      f"{' (see `kvfleet batch errors ' + job.id + '`)' if job.counts.rejected else ''}; "
                      f"state {STATE.get(job.state)}; expires {_ts(job.expires_unix_ms)} UTC[/dim]", highlight=False)


@batch_app.command("status")
def status(job: str = JobArg, controller: str = ControllerOpt, api_key: str = ApiKeyOpt, json_out: bool = JsonOpt) -> None:
    """A job's state and counts."""
    d = job_dict(_unary(controller, "GetJob", pb.BatchJobRef(job_id=job), _auth_metadata(api_key)))
    if json_out:
        print_json(d)
        return
    t = Table(title=f"batch job {d['id']}", show_header=False)
    t.add_column("field")
    t.add_column("value")
    for k in ("state", "tenant", "filename"):
        t.add_row(k, str(d[k]))
    t.add_row("created", _ts(d["created_unix_ms"]) + " UTC")
    t.add_row("expires", _ts(d["expires_unix_ms"]) + " UTC")
    t.add_row("finished", _ts(d["finished_unix_ms"]) + (" UTC" if d["finished_unix_ms"] else ""))
    for k, v in d["counts"].items():
        t.add_row(k, str(v))
    console.print(t)


@batch_app.command("list")
def list_jobs(
    tenant: str = typer.Option("", "--tenant", help="only this tenant's jobs (local mode; with auth: the key's tenant)"),
    limit: int = typer.Option(100, "--limit", min=1, help="newest jobs to show"),
    controller: str = ControllerOpt, api_key: str = ApiKeyOpt, json_out: bool = JsonOpt,
) -> None:
    """Jobs, newest first."""
    resp = _unary(controller, "ListJobs", pb.ListBatchJobsRequest(tenant=tenant, limit=limit), _auth_metadata(api_key))
    jobs = [job_dict(j) for j in resp.jobs]
    if json_out:
        print_json(jobs)
        return
    t = Table(title=f"{len(jobs)} batch job(s)")
    for col in ("job", "tenant", "state", "created (UTC)", "total", "pending", "completed", "failed", "expired", "cancelled", "rejected"):
        t.add_column(col)
    for d in jobs:
        c = d["counts"]
        t.add_row(d["id"], d["tenant"], d["state"], _ts(d["created_unix_ms"]), str(c["total"]), str(c["pending"]),
                  str(c["completed"]), str(c["failed"]), str(c["expired"]), str(c["cancelled"]), str(c["rejected"]))
    console.print(t)


@batch_app.command("results")
def results(job: str = JobArg, output: Path = OutOpt, controller: str = ControllerOpt, api_key: str = ApiKeyOpt) -> None:
    """Completed items as JSONL (custom_id, response with text and usage), in input order."""
    n = _write_stream(controller, "Results", job, _auth_metadata(api_key), output, result_dict)
    if output is not None:
        err_console.print(f"[dim]{n} result(s) written to {output}[/dim]", highlight=False)


@batch_app.command("errors")
def errors(job: str = JobArg, output: Path = OutOpt, controller: str = ControllerOpt, api_key: str = ApiKeyOpt) -> None:
    """Rejected lines and failed, expired or cancelled items as JSONL (custom_id, line, error code and message)."""
    n = _write_stream(controller, "Errors", job, _auth_metadata(api_key), output, error_dict)
    if output is not None:
        err_console.print(f"[dim]{n} error(s) written to {output}[/dim]", highlight=False)


@batch_app.command("cancel")
def cancel(job: str = JobArg, controller: str = ControllerOpt, api_key: str = ApiKeyOpt, json_out: bool = JsonOpt) -> None:
    """Cancel a job: pending items are cancelled, items in flight finish."""
    d = job_dict(_unary(controller, "Cancel", pb.BatchJobRef(job_id=job), _auth_metadata(api_key)))
    if json_out:
        print_json(d)
        return
    console.print(f"{d['id']}: {d['state']} (queued items cancelled; {d['counts']['pending']} in flight finishing)")
