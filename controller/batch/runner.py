"""The batch runner: a reconcile loop in the controller that feeds job items to the routers.

Each pass (every ``poll_interval_s``, or at once when a slot frees): observe the active
jobs in the store, act - expire jobs whose window has ended, finish cancellations, settle
finished jobs, and fill the in-flight window (``inflight_per_node`` x live nodes) with the
oldest job's pending items in run order (sorted by rendered prompt at submission, so items
sharing a prefix go out together and the router's cache-aware policy keeps each group on
the node holding it). A failed pass is logged and retried, never fatal.

Each item is one ``Inference.Generate`` call to any live router (``P/routers/``), with
``tier=TIER_BATCH`` (the router's admission queue holds it until there is spare capacity),
metadata ``x-kvfleet-batch-item: <job>/<custom_id>`` and ``x-kvfleet-tenant``, and
``request_id = batch-<job>-<custom_id>``: the usage ledger is idempotent by request id, so
an item re-run after a crash is billed once. RESOURCE_EXHAUSTED, UNAVAILABLE and other
transient statuses mean "retry later" (exponential backoff, until the window ends);
INVALID_ARGUMENT and other final statuses become the item's error.

Durability: an item is pending in the store until its outcome is committed (``Recorder``,
group commit), and only a pending item can be recorded. Items in flight when the controller
dies are pending at restart and run again; the engine may compute such an item twice, but
only one result is recorded and the ledger bills it once.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import random
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import grpc
from prometheus_client import Counter, Gauge
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from kvfleet.controller.batch.parse import CHAT_URL
from kvfleet.controller.batch.store import BatchStore, Job, Outcome, PendingItem
from kvfleet.v1 import common_pb2 as cpb
from kvfleet.v1 import inference_pb2 as ipb
from kvfleet.v1 import inference_pb2_grpc as ipbg

log = logging.getLogger(__name__)

ITEMS = Counter("kvfleet_batch_items_total", "Batch items by outcome", ["outcome"])
RETRIES = Counter("kvfleet_batch_retries_total", "Batch item calls to retry later, by status", ["code"])
INFLIGHT = Gauge("kvfleet_batch_inflight", "Batch items in flight")

FINISH = {cpb.FINISH_REASON_LENGTH: "length", cpb.FINISH_REASON_STOP: "stop", cpb.FINISH_REASON_ABORT: "abort"}

# Status -> attempts before the item fails (None: retry until the window ends). Statuses not
# listed are final at once (INVALID_ARGUMENT: the prompt does not fit the model, ...).
# NOT_FOUND is retried a few times: an unknown model may be between nodes (a rolling restart).
RETRY_LIMIT: dict[grpc.StatusCode, int | None] = {
    grpc.StatusCode.RESOURCE_EXHAUSTED: None, grpc.StatusCode.UNAVAILABLE: None,
    grpc.StatusCode.ABORTED: None, grpc.StatusCode.DEADLINE_EXCEEDED: None, grpc.StatusCode.CANCELLED: None,
    grpc.StatusCode.NOT_FOUND: 5, grpc.StatusCode.UNAUTHENTICATED: 5, grpc.StatusCode.PERMISSION_DENIED: 5,
    grpc.StatusCode.INTERNAL: 5, grpc.StatusCode.UNKNOWN: 5,
}

# Short reconnect backoff: a restarted router is dialled again within a second, not gRPC's default two minutes.
CHANNEL_OPTIONS = [("grpc.initial_reconnect_backoff_ms", 200), ("grpc.min_reconnect_backoff_ms", 200),
                   ("grpc.max_reconnect_backoff_ms", 1000), ("grpc.max_receive_message_length", 64 << 20)]


class BatchConfig(BaseSettings):
    """The runner's knobs; each can be set in the controller's environment as
    ``KVFLEET_BATCH_<FIELD>`` (e.g. ``KVFLEET_BATCH_INFLIGHT_PER_NODE=4``)."""

    model_config = SettingsConfigDict(env_prefix="KVFLEET_BATCH_")

    inflight_per_node: int = Field(3, ge=1, description="batch items in flight per live node (the runner's window)")
    poll_interval_s: float = Field(0.25, gt=0, description="seconds between reconcile passes when nothing wakes the runner")
    retry_min_s: float = Field(0.5, gt=0, description="first backoff, seconds, before retrying an item that got a transient status")
    retry_max_s: float = Field(30.0, gt=0, description="longest backoff between retries of one item, seconds")
    registry_refresh_s: float = Field(1.0, gt=0, description="seconds between reads of the live routers and nodes")


def item_request_id(job_id: str, custom_id: str) -> str:
    """The usage ledger's key for an item: the same on every re-run."""
    return f"batch-{job_id}-{custom_id}"


def item_metadata_value(job_id: str, custom_id: str) -> str:
    """``<job>/<custom_id>``, the custom_id percent-encoded (gRPC metadata is printable ASCII)."""
    return f"{job_id}/{quote(custom_id, safe='')}"


def build_generate(item: PendingItem, job_id: str) -> ipb.GenerateRequest:
    """The item's normalised body (parse.py) as an Inference request at tier batch."""
    body = item.request
    req = ipb.GenerateRequest(model=body["model"], tier=cpb.TIER_BATCH,
                              request_id=item_request_id(job_id, item.custom_id))
    if item.url == CHAT_URL:
        for m in body["messages"]:
            req.chat.messages.add(role=m["role"], content=m["content"])
    else:
        req.text = body["prompt"]
    s = req.sampling
    s.max_tokens = body["max_tokens"]
    if "temperature" in body:
        s.temperature = body["temperature"]
    if "top_p" in body:
        s.top_p = body["top_p"]
    if "seed" in body:
        s.seed = body["seed"]
    s.stop.extend(body.get("stop", ()))
    return req


class Routers:
    """The live routers (from the registry) and one channel to each; picks round-robin,
    skipping routers that failed within the last ``down_s`` while another is available."""

    def __init__(self, down_s: float = 2.0) -> None:
        self.addresses: list[str] = []
        self._down: dict[str, float] = {}      # address -> monotonic time it may be tried again
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._next = 0
        self.down_s = down_s

    def update(self, addresses: list[str]) -> None:
        self.addresses = sorted(set(addresses))
        for addr in list(self._channels):
            if addr not in self.addresses:
                ch = self._channels.pop(addr)
                asyncio.ensure_future(ch.close())

    def pick(self) -> tuple[str, ipbg.InferenceStub] | None:
        if not self.addresses:
            return None
        now = time.monotonic()
        up = [a for a in self.addresses if self._down.get(a, 0.0) <= now] or self.addresses
        self._next = (self._next + 1) % len(up)
        addr = up[self._next]
        ch = self._channels.get(addr)
        if ch is None:
            ch = self._channels[addr] = grpc.aio.insecure_channel(addr, options=CHANNEL_OPTIONS)
        return addr, ipbg.InferenceStub(ch)

    def failed(self, addr: str) -> None:
        self._down[addr] = time.monotonic() + self.down_s

    async def close(self) -> None:
        for ch in self._channels.values():
            await ch.close()
        self._channels.clear()


class Recorder:
    """Group commit: outcomes finishing at about the same time share one transaction (one
    disk sync). ``record`` returns once the outcome is durable (True) or found the item no
    longer pending (False)."""

    def __init__(self, store: BatchStore) -> None:
        self.store = store
        self._queue: list[tuple[Outcome, asyncio.Future]] = []
        self._ready = asyncio.Event()

    async def record(self, outcome: Outcome) -> bool:
        fut = asyncio.get_running_loop().create_future()
        self._queue.append((outcome, fut))
        self._ready.set()
        return await fut

    async def run(self) -> None:
        while True:
            await self._ready.wait()
            self._ready.clear()
            batch, self._queue = self._queue, []
            if not batch:
                continue
            try:
                applied = await asyncio.to_thread(self.store.record, [o for o, _ in batch])
            except Exception as exc:  # disk full, ...: the items stay pending and run again
                log.exception("batch: recording %d outcome(s) failed", len(batch))
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(exc)
                continue
            for (_, fut), ok in zip(batch, applied):
                if not fut.done():
                    fut.set_result(ok)


@dataclass(slots=True)
class _Flight:
    task: asyncio.Task
    job_id: str


class BatchRunner:
    """Runs every active job of ``store`` through the routers in ``registry``."""

    def __init__(self, store: BatchStore, registry, data_dir: Path, cfg: BatchConfig | None = None) -> None:
        self.store = store
        self.registry = registry
        self.data_dir = Path(data_dir)
        self.cfg = cfg or BatchConfig()
        self.routers = Routers()
        self.recorder = Recorder(store)
        self.live_nodes = 0
        self.live_models: set[str] = set()   # models some live node serves: items of others wait
        self._inflight: dict[tuple[str, str], _Flight] = {}   # (job, custom_id) -> its task
        self._not_before: dict[tuple[str, str], float] = {}   # backoff: monotonic time of the next try
        self._attempts: dict[tuple[str, str], int] = {}       # calls made since this process started
        self._code_attempts: dict[tuple[str, str], dict] = {}  # per item: failures by status (for RETRY_LIMIT)
        self._wake = asyncio.Event()
        self._refreshed = -1e9
        self._auth: list[tuple[str, str]] = []
        self._auth_state = "unknown"   # unknown -> ready | none (no tenancy module)
        self._tasks: list[asyncio.Task] = []

    # -- lifecycle -----------------------------------------------------------------------------
    def start(self) -> None:
        self._tasks = [asyncio.create_task(self.recorder.run(), name="batch-recorder"),
                       asyncio.create_task(self.run(), name="batch-runner")]

    async def close(self) -> None:
        """Stops calling routers. Items in flight stay pending in the store: they run again
        at the next start."""
        for t in self._tasks:
            t.cancel()
        flights = [f.task for f in self._inflight.values()]
        for t in flights:
            t.cancel()
        await asyncio.gather(*self._tasks, *flights, return_exceptions=True)
        await self.routers.close()

    def in_flight(self, job_id: str) -> list[str]:
        """custom_ids of the job's items being called now."""
        return [cid for (j, cid), _ in self._inflight.items() if j == job_id]

    def wake(self) -> None:
        """Run a pass now (a job was submitted or cancelled, or a slot freed)."""
        self._wake.set()

    async def run(self) -> None:
        while True:
            try:
                await self.pass_once()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("batch: runner pass failed")
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=self.cfg.poll_interval_s)
                await asyncio.sleep(0.005)   # let a burst of finishing items free their slots first
            except asyncio.TimeoutError:
                pass
            self._wake.clear()

    # -- one reconcile pass ----------------------------------------------------------------------
    async def pass_once(self) -> None:
        await self._observe_fleet()
        jobs = await asyncio.to_thread(self.store.active_jobs)
        now_ms = int(time.time() * 1000)
        window = self.cfg.inflight_per_node * self.live_nodes
        for job in jobs:
            flying = [k for k, f in self._inflight.items() if f.job_id == job.id]
            if now_ms >= job.expires_ms:
                for k in flying:
                    self._inflight[k].task.cancel()
                n = await asyncio.to_thread(self.store.expire_job, job.id, now_ms)
                self._forget(job.id)
                ITEMS.labels("expired").inc(n)
                log.info("batch: job %s expired (%d item(s) unfinished)", job.id, n)
                continue
            if job.state == "cancelling":
                n = await asyncio.to_thread(self.store.cancel_pending, job.id, [cid for _, cid in flying])
                ITEMS.labels("cancelled").inc(n)
                if not flying:
                    await asyncio.to_thread(self.store.settle, job.id)
                    self._forget(job.id)
                continue
            if job.counts.pending == 0:
                await asyncio.to_thread(self.store.settle, job.id)
                continue
            free = window - len(self._inflight)
            if free <= 0 or not self.routers.addresses:
                continue
            now = time.monotonic()
            waiting = sum(1 for (j, _), t in self._not_before.items() if j == job.id and t > now)
            # Items of a model no live node serves now (nodes restarting) wait rather than spend
            # their attempts; they expire with the window if the model never returns.
            items = await asyncio.to_thread(self.store.pending_items, job.id, len(flying) + waiting + free,
                                            sorted(self.live_models))
            for item in items:
                key = (job.id, item.custom_id)
                if free <= 0:
                    break
                if key in self._inflight or self._not_before.get(key, 0.0) > now:
                    continue
                self._not_before.pop(key, None)
                task = asyncio.create_task(self._run_item(job, item), name=f"batch-item-{job.id}")
                self._inflight[key] = _Flight(task, job.id)
                task.add_done_callback(lambda _t, key=key: self._landed(key))
                free -= 1
        INFLIGHT.set(len(self._inflight))

    def _forget(self, job_id: str) -> None:
        for d in (self._not_before, self._attempts, self._code_attempts):
            for k in [k for k in d if k[0] == job_id]:
                del d[k]

    def _landed(self, key: tuple[str, str]) -> None:
        self._inflight.pop(key, None)
        INFLIGHT.set(len(self._inflight))
        self._wake.set()

    async def _observe_fleet(self) -> None:
        now = time.monotonic()
        if now - self._refreshed < self.cfg.registry_refresh_s:
            return
        self._refreshed = now
        try:
            routers = await self.registry.list_routers()
            nodes = await self.registry.list_nodes()
        except Exception as exc:  # etcd briefly away: keep the last view (expiry and settling go on)
            log.warning("batch: cannot read routers and nodes: %s", exc)
            return
        self.routers.update([r.address for r in routers])
        self.live_nodes = len(nodes)
        self.live_models = {m.name for n in nodes for m in n.models}
        await self._ensure_auth()

    async def _ensure_auth(self) -> None:
        """``authorization`` metadata from the tenancy module's service key, when it exists;
        without it (auth off, or tenancy not installed) items go without a key."""
        if self._auth_state != "unknown":
            return
        try:
            from kvfleet.controller.tenancy import ensure_service_key  # lazily: optional module
        except ImportError:
            self._auth_state = "none"
            return
        try:
            key = ensure_service_key(self.registry, self.data_dir)
            if inspect.isawaitable(key):
                key = await key
        except Exception as exc:  # etcd away: items go without a key meanwhile; tried again next refresh
            log.warning("batch: no service key yet: %s", exc)
            return
        self._auth = [("authorization", f"Bearer {key}")] if key else []
        self._auth_state = "ready"

    # -- one item --------------------------------------------------------------------------------
    async def _run_item(self, job: Job, item: PendingItem) -> None:
        try:
            await self._try_item(job, item)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug or an item no request can be built from: its error, not a busy loop
            log.exception("batch: %s/%s failed in the runner", job.id, item.custom_id)
            outcome = Outcome(job.id, item.custom_id, "error", error_code="internal",
                              error_message=f"the batch runner could not run this item: {exc}",
                              attempts=self._attempts.get((job.id, item.custom_id), 1))
            try:
                if await self.recorder.record(outcome):
                    ITEMS.labels("error").inc()
            except Exception:
                self._backoff((job.id, item.custom_id), self._attempts.get((job.id, item.custom_id), 1))
                return
            self._attempts.pop((job.id, item.custom_id), None)
            self._not_before.pop((job.id, item.custom_id), None)

    async def _try_item(self, job: Job, item: PendingItem) -> None:
        key = (job.id, item.custom_id)
        attempts = self._attempts[key] = self._attempts.get(key, 0) + 1
        picked = self.routers.pick()
        if picked is None:
            self._backoff(key, attempts)
            return
        addr, stub = picked
        metadata = [("x-kvfleet-batch-item", item_metadata_value(job.id, item.custom_id)),
                    ("x-kvfleet-tenant", job.tenant), *self._auth]
        timeout = max(1.0, job.expires_ms / 1000 - time.time())
        req = build_generate(item, job.id)
        text: list[str] = []
        usage = None
        try:
            async for msg in stub.Generate(req, metadata=metadata, timeout=timeout):
                if msg.HasField("chunk"):
                    text.append(msg.chunk.text)
                else:
                    usage = msg.usage
        except grpc.aio.AioRpcError as exc:
            code = exc.code()
            limit = RETRY_LIMIT.get(code, 0)
            if code == grpc.StatusCode.UNAVAILABLE:
                self.routers.failed(addr)
            if code == grpc.StatusCode.UNAUTHENTICATED:
                self._auth_state = "unknown"   # a revoked or re-created service key: fetch it again
            # A limited status counts only its own failures: sheds before it do not use up its tries.
            same = self._code_attempts[key] = self._code_attempts.get(key, {})
            same[code] = same.get(code, 0) + 1
            if limit is None or same[code] < limit:
                RETRIES.labels(code.name.lower()).inc()
                log.debug("batch: %s/%s: %s %s; retrying later", job.id, item.custom_id, code.name, exc.details())
                self._backoff(key, attempts, _retry_after_s(exc))
                return
            outcome = Outcome(job.id, item.custom_id, "error", error_code=code.name.lower(),
                              error_message=exc.details() or code.name, attempts=attempts)
        else:
            if usage is None:  # the stream ended without its final message: run it again
                self._backoff(key, attempts)
                return
            outcome = Outcome(job.id, item.custom_id, "done", attempts=attempts, result={
                "text": "".join(text), "finish_reason": FINISH.get(usage.finish_reason, "length"),
                "model": req.model, "prompt_tokens": usage.prompt_tokens,
                "cached_prompt_tokens": usage.cached_prompt_tokens, "completion_tokens": usage.completion_tokens,
                "node_id": usage.node_id, "request_id": usage.request_id or req.request_id,
            })
        try:
            recorded = await self.recorder.record(outcome)
        except Exception:  # the store failed (logged by the recorder): the item is still pending
            self._backoff(key, attempts)
            return
        if recorded:
            ITEMS.labels(outcome.state).inc()
        self._attempts.pop(key, None)
        self._code_attempts.pop(key, None)
        self._not_before.pop(key, None)

    def _backoff(self, key: tuple[str, str], attempts: int, hint_s: float = 0.0) -> None:
        """Next try after exponential backoff (jittered), or the router's ``retry-after-ms``
        hint if longer; both capped at ``retry_max_s``."""
        delay = min(self.cfg.retry_max_s, self.cfg.retry_min_s * 2 ** min(attempts - 1, 16)) * random.uniform(0.5, 1.0)
        self._not_before[key] = time.monotonic() + min(self.cfg.retry_max_s, max(delay, hint_s))


def _retry_after_s(exc: grpc.aio.AioRpcError) -> float:
    """The ``retry-after-ms`` trailer (the router's admission queue sends it), in seconds; 0 if absent."""
    for k, v in exc.trailing_metadata() or ():
        if k == "retry-after-ms":
            try:
                return max(0.0, float(v) / 1000)
            except ValueError:
                return 0.0
    return 0.0
