"""gRPC edge of the Batch API (``kvfleet.v1.Batch``), served by the controller.

Translates between the wire and the store/runner and maps errors to statuses:
INVALID_ARGUMENT (empty or oversized file, bad completion window, missing job id),
NOT_FOUND (unknown job, or another tenant's job with auth on), FAILED_PRECONDITION
(cancelling a finished job), UNAUTHENTICATED (auth on, missing or bad key).

Tenant: with auth on, the caller's API key decides (``authorization: Bearer <key>``, checked
by the router's ``KeyAuth`` against the same etcd view); the chunk's ``tenant`` field is
ignored. With auth off the first chunk's ``tenant`` names it (``default`` when empty).
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from pathlib import Path

import grpc
from pydantic import ValidationError

from kvfleet.controller.batch.parse import MAX_FILE_BYTES, BatchFileError, parse_batch, parse_window
from kvfleet.controller.batch.runner import BatchConfig, BatchRunner
from kvfleet.controller.batch.store import BatchStore, Job, JobFinished, JobNotFound
from kvfleet.controller.router.auth import OpenAuth, Principal
from kvfleet.controller.router.errors import RequestError
from kvfleet.v1 import batch_pb2 as pb
from kvfleet.v1 import batch_pb2_grpc as pbg
from kvfleet.v1 import common_pb2 as cpb

log = logging.getLogger(__name__)

STATES = {
    "validating": pb.BATCH_JOB_STATE_VALIDATING, "in_progress": pb.BATCH_JOB_STATE_IN_PROGRESS,
    "cancelling": pb.BATCH_JOB_STATE_CANCELLING, "cancelled": pb.BATCH_JOB_STATE_CANCELLED,
    "completed": pb.BATCH_JOB_STATE_COMPLETED, "expired": pb.BATCH_JOB_STATE_EXPIRED,
    "failed": pb.BATCH_JOB_STATE_FAILED,
}
FINISH = {"length": cpb.FINISH_REASON_LENGTH, "stop": cpb.FINISH_REASON_STOP, "abort": cpb.FINISH_REASON_ABORT}
PAGE = 500   # rows read from the store per step of a Results/Errors stream


def job_pb(job: Job) -> pb.BatchJob:
    c = job.counts
    return pb.BatchJob(
        id=job.id, tenant=job.tenant, state=STATES[job.state], created_unix_ms=job.created_ms,
        expires_unix_ms=job.expires_ms, finished_unix_ms=job.finished_ms, completion_window_s=job.window_s,
        filename=job.filename,
        counts=pb.BatchCounts(total=c.total, pending=c.pending, completed=c.done, failed=c.error,
                              expired=c.expired, cancelled=c.cancelled, rejected=c.rejected),
    )


async def _served_models(registry) -> set[str]:
    return {m.name for n in await registry.list_nodes() for m in n.models}


class BatchService(pbg.BatchServicer):
    def __init__(self, store: BatchStore, runner: BatchRunner | None, registry, auth=None) -> None:
        self.store = store
        self.runner = runner
        self.registry = registry
        self.auth = auth or OpenAuth()   # .authenticate(metadata, tenant) -> Principal; RequestError when refused

    # -- helpers -------------------------------------------------------------------------------
    async def _principal(self, context, tenant: str = "") -> Principal:
        md = {k: v for k, v in (context.invocation_metadata() or ()) if isinstance(v, str)}
        try:
            return self.auth.authenticate(md, tenant)
        except RequestError as exc:
            await context.abort(exc.code, str(exc))
            raise  # unreachable: abort raises

    async def _job(self, job_id: str, context) -> Job:
        """The caller's job (NOT_FOUND for another tenant's job when auth is on)."""
        principal = await self._principal(context)
        if not job_id:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "job_id is required")
        job = await asyncio.to_thread(self.store.get_job, job_id)
        if job is None or (self.auth.enabled and job.tenant != principal.tenant and not principal.internal):
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no batch job {job_id!r}")
        return job  # type: ignore[return-value]

    # -- RPCs ----------------------------------------------------------------------------------
    async def Submit(self, request_iterator, context) -> pb.BatchJob:
        if self.auth.enabled:   # a caller without a valid key is refused before the upload is buffered
            await self._principal(context)
        parts: list[bytes] = []
        size = 0
        window_s = 0
        tenant = filename = ""
        first = True
        async for chunk in request_iterator:
            if first:
                first = False
                try:
                    window_s = parse_window(chunk.completion_window)
                except ValueError as exc:
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
                tenant, filename = chunk.tenant, chunk.filename
            size += len(chunk.data)
            if size > MAX_FILE_BYTES:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                    f"file is larger than {MAX_FILE_BYTES} bytes; split it into several jobs")
            parts.append(chunk.data)
        if first:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "file is empty: expected one JSON request per line")
        principal = await self._principal(context, tenant)
        try:
            models = await _served_models(self.registry)
        except Exception as exc:  # etcd away: the file cannot be checked against the fleet now
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"cannot read the served models from the registry: {exc}")
        try:
            parsed = await asyncio.to_thread(parse_batch, b"".join(parts), models)
        except BatchFileError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        job_id = f"batch_{uuid.uuid4().hex[:16]}"
        job = await asyncio.to_thread(self.store.create_job, job_id, principal.tenant, window_s,
                                      parsed.items, parsed.errors, filename)
        log.info("batch: job %s for tenant %s: %d item(s), %d line(s) rejected, window %d s",
                 job_id, job.tenant, len(parsed.items), len(parsed.errors), window_s)
        if self.runner is not None:
            self.runner.wake()
        return job_pb(job)

    async def GetJob(self, request: pb.BatchJobRef, context) -> pb.BatchJob:
        return job_pb(await self._job(request.job_id, context))

    async def ListJobs(self, request: pb.ListBatchJobsRequest, context) -> pb.ListBatchJobsResponse:
        principal = await self._principal(context, request.tenant)
        if self.auth.enabled:
            tenant = None if principal.internal else principal.tenant
        else:
            tenant = request.tenant or None
        jobs = await asyncio.to_thread(self.store.list_jobs, tenant, request.limit or 100)
        return pb.ListBatchJobsResponse(jobs=[job_pb(j) for j in jobs])

    async def Results(self, request: pb.BatchJobRef, context):
        job = await self._job(request.job_id, context)
        after = 0
        while True:
            rows = await asyncio.to_thread(self.store.results, job.id, after, PAGE)
            for r in rows:
                res = r.result
                yield pb.BatchResult(
                    custom_id=r.custom_id, line=r.line, model=res.get("model", ""), url=r.url, text=res.get("text", ""),
                    finish_reason=FINISH.get(res.get("finish_reason", ""), cpb.FINISH_REASON_UNSPECIFIED),
                    prompt_tokens=res.get("prompt_tokens", 0), cached_prompt_tokens=res.get("cached_prompt_tokens", 0),
                    completion_tokens=res.get("completion_tokens", 0), node_id=res.get("node_id", ""),
                    request_id=res.get("request_id", ""), attempts=r.attempts, completed_unix_ms=r.completed_ms,
                )
            if len(rows) < PAGE:
                return
            after = rows[-1].line

    async def Errors(self, request: pb.BatchJobRef, context):
        job = await self._job(request.job_id, context)
        after = 0
        while True:
            rows = await asyncio.to_thread(self.store.errors, job.id, after, PAGE)
            for r in rows:
                yield pb.BatchError(line=r.line, custom_id=r.custom_id, code=r.code, message=r.message)
            if len(rows) < PAGE:
                return
            after = rows[-1].line

    async def Cancel(self, request: pb.BatchJobRef, context) -> pb.BatchJob:
        job = await self._job(request.job_id, context)
        try:
            job = await asyncio.to_thread(self.store.request_cancel, job.id)
        except JobNotFound:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no batch job {request.job_id!r}")
        except JobFinished as exc:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"cannot cancel: {exc}")
        if self.runner is not None:  # queued items now; the runner settles the job once its in-flight ones land
            await asyncio.to_thread(self.store.cancel_pending, job.id, self.runner.in_flight(job.id))
            job = await asyncio.to_thread(self.store.get_job, job.id)
            self.runner.wake()
        return job_pb(job)


class BatchAPI:
    """The Batch API inside the controller process: store, runner and gRPC service."""

    def __init__(self, store: BatchStore, runner: BatchRunner, service: BatchService) -> None:
        self.store, self.runner, self.service = store, runner, service

    async def close(self) -> None:
        await self.runner.close()
        if hasattr(self.service.auth, "close"):
            await self.service.auth.close()
        await asyncio.to_thread(self.store.close)


async def serve_batch(server: grpc.aio.Server, registry, data_dir: Path, *, auth: bool,
                      cfg: BatchConfig | None = None) -> BatchAPI:
    """Opens ``<data_dir>/batch/batch.sqlite``, adds the Batch service to ``server`` and starts
    the runner. ``auth``: the caller's API key decides the tenant (as on the routers)."""
    if cfg is None:
        try:
            cfg = BatchConfig()
        except ValidationError as exc:
            # OSError: what `controller run` reports as one line (it names the variable).
            bad = "; ".join(f"KVFLEET_BATCH_{'_'.join(map(str, e['loc'])).upper()}: {e['msg']}" for e in exc.errors())
            raise OSError(bad) from None
    store = await asyncio.to_thread(BatchStore.in_data_dir, data_dir)
    runner = BatchRunner(store, registry, data_dir, cfg)
    authn = None
    if auth:
        from kvfleet.controller.router.auth import KeyAuth
        from kvfleet.controller.tenancy import TenancyView

        authn = KeyAuth(TenancyView.of(registry))
        await authn.start()
    service = BatchService(store, runner, registry, authn)
    pbg.add_BatchServicer_to_server(service, server)
    runner.start()
    return BatchAPI(store, runner, service)
