"""Controller and router processes: wiring of registry, services, health and metrics."""

from __future__ import annotations

import asyncio
import json
import logging

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from prometheus_client import start_http_server
from pydantic import BaseModel, Field

from kvfleet.controller.membership import Membership
from kvfleet.controller.registry import Registry
from kvfleet.controller.service import ControllerService
from kvfleet.v1 import controller_pb2_grpc as cpbg
from kvfleet.v1 import inference_pb2_grpc as ipbg

log = logging.getLogger(__name__)


class RouterConfig(BaseModel):
    etcd: list[str] = Field(description="etcd endpoints host:port")
    prefix: str = Field("/kvfleet", description="registry key prefix in etcd")
    listen: str = Field("127.0.0.1:50051", description="address the Inference server binds")
    policy: str = Field("kvfleet", description="routing policy name")
    first_token_timeout_s: float = Field(5.0, description="seconds a node may take beyond its estimated TTFT before the request is retried elsewhere")
    metrics_listen: str = Field("", description="host:port for Prometheus /metrics; empty: off")


class ControllerConfig(BaseModel):
    etcd: list[str] = Field(description="etcd endpoints host:port")
    prefix: str = Field("/kvfleet", description="registry key prefix in etcd")
    listen: str = Field("127.0.0.1:50050", description="address the Controller server binds")
    advertise: str = Field("", description="address nodes and the CLI dial; defaults to listen")
    lease_ttl_s: int = Field(5, ge=1, description="seconds without heartbeat before a node leaves routing")
    metrics_listen: str = Field("", description="host:port for Prometheus /metrics; empty: off")
    router: RouterConfig | None = Field(None, description="run a router in this process")


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


async def _serve_router(cfg: RouterConfig, registry: Registry):
    from kvfleet.controller.router.fleet import Fleet
    from kvfleet.controller.router.service import RouterService

    fleet = Fleet(registry)
    fleet_task = asyncio.create_task(fleet.run(), name="fleet")
    server = grpc.aio.server()
    ipbg.add_InferenceServicer_to_server(
        RouterService(fleet, policy=cfg.policy, first_token_timeout_s=cfg.first_token_timeout_s), server
    )
    h = await _health_server(server, ["kvfleet.v1.Inference"])
    _bind(server, cfg.listen, "--router-listen")
    await server.start()
    await asyncio.wait_for(fleet.synced.wait(), timeout=30)
    await h.set("", health_pb2.HealthCheckResponse.SERVING)
    await h.set("kvfleet.v1.Inference", health_pb2.HealthCheckResponse.SERVING)
    return server, fleet, fleet_task


async def run_router(cfg: RouterConfig, stop: asyncio.Event) -> None:
    registry = await Registry.connect(cfg.etcd, cfg.prefix)
    _metrics(cfg.metrics_listen)
    server, fleet, task = await _serve_router(cfg, registry)
    print(json.dumps({"event": "router_ready", "listen": cfg.listen}), flush=True)
    try:
        await stop.wait()
    finally:
        task.cancel()
        await server.stop(2.0)
        await fleet.close()
        await registry.close()


async def run_controller(cfg: ControllerConfig, stop: asyncio.Event) -> None:
    registry = await Registry.connect(cfg.etcd, cfg.prefix)
    membership = Membership(registry, lease_ttl_s=cfg.lease_ttl_s)
    await membership.load_state()
    _metrics(cfg.metrics_listen)
    server = grpc.aio.server()
    cpbg.add_ControllerServicer_to_server(ControllerService(membership), server)
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
    print(json.dumps({"event": "controller_ready", "listen": cfg.listen,
                      "router": cfg.router.listen if cfg.router else None}), flush=True)
    try:
        await stop.wait()
    finally:
        loop_task.cancel()
        if router is not None:
            rserver, fleet, task = router
            task.cancel()
            await rserver.stop(2.0)
            await fleet.close()
        await server.stop(2.0)
        await registry.close()
