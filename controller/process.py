"""Controller and router processes: wiring of registry, services, health and metrics."""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import time
import uuid
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from prometheus_client import Histogram, start_http_server
from pydantic import BaseModel, Field

from kvfleet.controller.accounting import Accounting
from kvfleet.controller.batch.service import serve_batch
from kvfleet.controller.membership import Membership
from kvfleet.controller.prices import PriceTable
from kvfleet.controller.registry import Registry, RouterEntry
from kvfleet.controller.router.admission import AdmissionConfig
from kvfleet.controller.service import ControllerService
from kvfleet.controller.tenancy import TenantStore
from kvfleet.controller.tenancy_service import TenantsService
from kvfleet.looplag import start_loop_lag_watch, stop_loop_lag_watch
from kvfleet.v1 import controller_pb2_grpc as cpbg
from kvfleet.v1 import inference_pb2_grpc as ipbg
from kvfleet.v1 import tenancy_pb2_grpc as tpbg

log = logging.getLogger(__name__)

GC_PAUSE = Histogram("kvfleet_gc_pause_seconds", "Python garbage collector pauses by generation", ["generation"],
                     buckets=(0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5))


class RouterConfig(BaseModel):
    etcd: list[str] = Field(description="etcd endpoints host:port")
    prefix: str = Field("/kvfleet", description="registry key prefix in etcd")
    listen: str = Field("127.0.0.1:50051", description="address the Inference server binds")
    policy: str = Field("kvfleet", description="routing policy name")
    first_token_timeout_s: float = Field(5.0, description="seconds a node may take beyond its estimated TTFT before the request is retried elsewhere")
    metrics_listen: str = Field("", description="host:port for Prometheus /metrics; empty: off")
    advertise: str = Field("", description="address clients and the batch runner dial; defaults to listen")
    lease_ttl_s: int = Field(5, ge=1, description="seconds after the router stops before it leaves the registry")
    auth: bool = Field(True, description="require an API key (authorization: Bearer) on Inference calls; off in kvfleet up's local mode")
    admission: AdmissionConfig | None = Field(None, description="tier limits of the admission queue (--admission JSON); None: defaults")



class ControllerConfig(BaseModel):
    etcd: list[str] = Field(description="etcd endpoints host:port")
    prefix: str = Field("/kvfleet", description="registry key prefix in etcd")
    listen: str = Field("127.0.0.1:50050", description="address the Controller server binds")
    advertise: str = Field("", description="address nodes and the CLI dial; defaults to listen")
    lease_ttl_s: int = Field(5, ge=1, description="seconds without heartbeat before a node leaves routing")
    metrics_listen: str = Field("", description="host:port for Prometheus /metrics; empty: off")
    router: RouterConfig | None = Field(None, description="run a router in this process")
    data_dir: Path = Field(Path("~/.local/share/kvfleet/controller").expanduser(),
                           description="controller state outside etcd (usage ledger, batch inputs and results)")
    prices: PriceTable = Field(default_factory=PriceTable, description="price table per model and tier (--prices FILE; built-in defaults otherwise)")
    auth: bool = Field(True, description="callers of the Batch API need an API key (the in-process router: router.auth); off in kvfleet up's local mode")


def settle_gc() -> None:
    """Once a server is ready: move every object alive now (modules, compiled kernels,
    tokenizers, the fleet view: some 150,000 of them in a router) out of the collector's
    reach, so a full collection scans only what was made since. Without it a full
    collection stopped a router for 65-125 ms (every request in flight waited). Pauses are
    exported as ``kvfleet_gc_pause_seconds``."""
    gc.collect()
    gc.freeze()
    if _gc_timer not in gc.callbacks:
        gc.callbacks.append(_gc_timer)


_gc_started = [0.0]
# Bound once: the timer runs inside every collection and must not take the metric's lock.
_GC_PAUSE_BY_GEN = {g: GC_PAUSE.labels(str(g)) for g in range(3)}


def _gc_timer(phase: str, info: dict) -> None:
    if phase == "start":
        _gc_started[0] = time.perf_counter()
    elif (h := _GC_PAUSE_BY_GEN.get(info.get("generation", -1))) is not None:
        h.observe(time.perf_counter() - _gc_started[0])


# A port another process holds must fail the bind with a clear error, not be shared with it
# (gRPC sets SO_REUSEPORT by default, so a second router on the same port would silently
# take half of the connections).
NO_REUSEPORT = [("grpc.so_reuseport", 0)]


def _bind(server: grpc.aio.Server, listen: str, flag: str) -> int:
    try:
        port = server.add_insecure_port(listen)
    except RuntimeError as exc:
        raise OSError(f"{flag} {listen}: cannot bind ({exc})") from exc
    if port == 0:
        raise OSError(f"{flag} {listen}: cannot bind")
    return port


def _metrics(listen: str) -> None:
    if listen:
        host, _, port = listen.rpartition(":")
        start_http_server(int(port), addr=host or "127.0.0.1")


async def _health_server(server: grpc.aio.Server, services: list[str]):
    servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    return servicer


async def _register_router(registry: Registry, cfg: RouterConfig, admission=None, router_id: str = "") -> None:
    """Keeps ``P/routers/<id>`` alive while this router runs (quotas are shared among the
    live routers; the batch runner dials them; `kvfleet nodes list` shows their queues).
    A lost lease is re-granted; the entry is rewritten when its queue figures change."""
    entry = RouterEntry(router_id=router_id or uuid.uuid4().hex[:12], address=cfg.advertise or cfg.listen,
                        started_unix_ms=int(time.time() * 1000))
    lease = 0
    written = None
    try:
        while True:
            try:
                if admission is not None and hasattr(admission, "inflight"):
                    entry.queue_depth, entry.inflight = admission.depths(), admission.inflight()
                if not lease or not await registry.refresh_lease(lease):
                    lease = await registry.grant_lease(cfg.lease_ttl_s)
                    written = None
                if written != (entry.queue_depth, entry.inflight):
                    await registry.put_router(entry, lease)
                    written = (dict(entry.queue_depth), dict(entry.inflight))
            except Exception as exc:  # etcd briefly away: retry at the next beat
                log.warning("router registration: %s", exc)
                lease = 0
            await asyncio.sleep(min(max(cfg.lease_ttl_s / 3, 0.2), 1.0))
    finally:
        if lease:
            await registry.revoke_lease(lease)


async def _serve_router(cfg: RouterConfig, registry: Registry, listen_flag: str = "--router-listen"):
    from kvfleet.controller.router import chain, cost, probe
    from kvfleet.controller.router.admission import build_admission
    from kvfleet.controller.router.auth import build_auth
    from kvfleet.controller.router.fleet import Fleet
    from kvfleet.controller.router.quota import build_quotas
    from kvfleet.controller.router.service import RouterService
    from kvfleet.controller.router.usage import build_usage_sink

    cost.warm_up()          # compiled, or loaded from Numba's cache, before the first request
    probe.warm_up()
    chain.warm_up()
    fleet = Fleet(registry)
    fleet_task = asyncio.create_task(fleet.run(), name="fleet")
    server = grpc.aio.server(options=NO_REUSEPORT)
    usage = build_usage_sink(cfg, registry)
    router_id = uuid.uuid4().hex[:12]
    auth, quotas = build_auth(cfg, registry), build_quotas(cfg, registry, router_id)
    admission = build_admission(cfg, fleet)
    service = RouterService(
        fleet, policy=cfg.policy, first_token_timeout_s=cfg.first_token_timeout_s,
        auth=auth, quotas=quotas, usage=usage,
        admission=admission,
    )
    ipbg.add_InferenceServicer_to_server(service, server)
    await auth.start()     # API keys, tenants and live routers loaded before the first request
    await quotas.start()
    h = await _health_server(server, ["kvfleet.v1.Inference"])
    _bind(server, cfg.listen, listen_flag)
    await server.start()
    await asyncio.wait_for(fleet.synced.wait(), timeout=30)
    reg_task = asyncio.create_task(_register_router(registry, cfg, admission, router_id), name="router-registration")
    await h.set("", health_pb2.HealthCheckResponse.SERVING)
    await h.set("kvfleet.v1.Inference", health_pb2.HealthCheckResponse.SERVING)
    return server, fleet, _Tasks(fleet_task, reg_task, usage, admission, auth, quotas)


class _Tasks:
    """The router's background work, stopped together."""

    def __init__(self, *items) -> None:
        self.items = items

    def cancel(self) -> None:
        for t in self.items:
            if isinstance(t, asyncio.Task):
                t.cancel()

    async def close(self) -> None:
        self.cancel()
        for t in self.items:
            if isinstance(t, asyncio.Task):
                try:
                    await t
                except (asyncio.CancelledError, Exception):
                    pass
            elif hasattr(t, "close"):
                await t.close()


async def run_router(cfg: RouterConfig, stop: asyncio.Event) -> None:
    registry = await Registry.connect(cfg.etcd, cfg.prefix)
    _metrics(cfg.metrics_listen)
    server, fleet, task = await _serve_router(cfg, registry, "--listen")
    settle_gc()
    lag_watch = start_loop_lag_watch("router")   # once ready: start-up compiles hold the loop by design
    print(json.dumps({"event": "router_ready", "listen": cfg.listen}), flush=True)
    try:
        await stop.wait()
    finally:
        await stop_loop_lag_watch(lag_watch)
        task.cancel()
        await server.stop(2.0)
        await task.close()
        await fleet.close()
        await registry.close()


def _batch_auth(cfg: ControllerConfig) -> bool:
    """Whether Batch API callers need an API key: the controller's own setting if it has
    one, else its in-process router's; a controller without either requires keys."""
    auth = getattr(cfg, "auth", None)
    if auth is None:
        auth = cfg.router.auth if cfg.router is not None else True
    return bool(auth)


async def run_controller(cfg: ControllerConfig, stop: asyncio.Event) -> None:
    registry = await Registry.connect(cfg.etcd, cfg.prefix)
    membership = Membership(registry, lease_ttl_s=cfg.lease_ttl_s)
    await membership.load_state()
    _metrics(cfg.metrics_listen)
    cfg.data_dir.mkdir(parents=True, exist_ok=True)
    server = grpc.aio.server(options=NO_REUSEPORT)
    cpbg.add_ControllerServicer_to_server(ControllerService(membership), server)
    tpbg.add_TenantsServicer_to_server(TenantsService(TenantStore(registry)), server)
    accounting = Accounting(registry, cfg.data_dir, cfg.prices)   # usage ledger: drains the routers' inbox
    await accounting.start(server)
    batch = await serve_batch(server, registry, cfg.data_dir, auth=_batch_auth(cfg))
    h = await _health_server(server, ["kvfleet.v1.Controller"])
    _bind(server, cfg.listen, "--listen")
    await server.start()
    await h.set("", health_pb2.HealthCheckResponse.SERVING)
    await h.set("kvfleet.v1.Controller", health_pb2.HealthCheckResponse.SERVING)

    router = None
    if cfg.router is not None:
        router = await _serve_router(cfg.router, registry)

    async def reconcile() -> None:
        # Observe, act, repeat; a failed pass is logged, never fatal.
        while True:
            try:
                await membership.expire_silent()
            except Exception:
                log.exception("reconcile pass failed")
            await asyncio.sleep(1.0)

    loop_task = asyncio.create_task(reconcile(), name="reconcile")
    settle_gc()
    # One loop for the controller and its in-process router: the role is the process's.
    lag_watch = start_loop_lag_watch("controller")
    print(json.dumps({"event": "controller_ready", "listen": cfg.listen,
                      "router": cfg.router.listen if cfg.router else None}), flush=True)
    try:
        await stop.wait()
    finally:
        await stop_loop_lag_watch(lag_watch)
        loop_task.cancel()
        await batch.close()  # first: no new batch calls while the routers stop
        if router is not None:
            rserver, fleet, task = router
            task.cancel()
            await rserver.stop(2.0)
            await task.close()
            await fleet.close()
        await server.stop(2.0)
        await accounting.close()  # after the router: what it flushed on the way out is drained
        await registry.close()
