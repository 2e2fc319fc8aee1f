"""The node agent process: engines, the NodeAgent gRPC server, join and heartbeats.

Lifecycle: start engines -> serve NodeAgent -> Join (token on first start, stored
credential afterwards) -> heartbeat stream that keeps the lease alive. If the
controller goes away the agent keeps serving and rejoins with its credential when the
controller is back; a wrong or expired token is fatal at start, with a clear message.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from pydantic import BaseModel, Field

from kvfleet.looplag import start_loop_lag_watch, stop_loop_lag_watch
from kvfleet.node_agent.block_tracker import BlockTracker
from kvfleet.node_agent.engine import Engine, EngineError, LoadSnapshot
from kvfleet.node_agent.service import NodeAgentService, load_pb, model_info_pb
from kvfleet.node_agent.state import StatePublisher
from kvfleet.v1 import common_pb2 as cpb
from kvfleet.v1 import controller_pb2 as cpb_ctl
from kvfleet.v1 import controller_pb2_grpc as cpbg
from kvfleet.v1 import node_pb2_grpc as npbg

log = logging.getLogger(__name__)


class JoinError(Exception):
    """The controller refused this node; retrying will not help."""


class AgentConfig(BaseModel):
    controller: str = Field(description="controller address host:port")
    token: str = Field("", description="join token (first join only)")
    listen: str = Field("127.0.0.1:0", description="address the NodeAgent server binds")
    advertise: str = Field("", description="address routers dial; defaults to the bound listen address")
    data_dir: Path = Field(description="where the node keeps its identity")
    heartbeat_interval_s: float = Field(1.0, description="seconds between heartbeats")


class Identity(BaseModel):
    node_id: str
    credential: str
    controller: str


class NodeAgent:
    def __init__(self, cfg: AgentConfig, engines: list[Engine]) -> None:
        self.cfg = cfg
        self._engine_list = engines
        self.engines: dict[str, Engine] = {}        # by model name, once started (info may need the engine up)
        self.node_id = ""
        self.trackers: dict[str, BlockTracker] = {}
        self.service: NodeAgentService | None = None
        self.publisher = StatePublisher(
            self.trackers, load=self._load, ready=lambda: all(e.ready for e in engines),
            inflight=lambda: self.service.inflight if self.service else 0,
        )
        self.server: grpc.aio.Server | None = None
        self.health = health.aio.HealthServicer() if hasattr(health, "aio") else health.HealthServicer()
        self.address = ""
        self.joined = asyncio.Event()
        self._tasks: list[asyncio.Task] = []

    def _load(self) -> LoadSnapshot:
        """All engines' load as one node's."""
        loads = [e.load() for e in self.engines.values()]
        return LoadSnapshot(
            running=sum(l.running for l in loads), waiting=sum(l.waiting for l in loads),
            kv_usage=max((l.kv_usage for l in loads), default=0.0),
            queued_prefill_tokens=sum(l.queued_prefill_tokens for l in loads),
            decode_step_s=max((l.decode_step_s for l in loads), default=0.0),
        )

    # -- identity ----------------------------------------------------------------------------------
    @property
    def _identity_path(self) -> Path:
        return self.cfg.data_dir / "identity.json"

    def _read_identity(self) -> Identity | None:
        try:
            return Identity.model_validate_json(self._identity_path.read_text())
        except FileNotFoundError:
            return None
        except ValueError as exc:  # truncated or corrupt: join afresh with the token
            log.warning("ignoring unreadable identity %s: %s", self._identity_path, exc)
            return None

    def _write_identity(self, ident: Identity) -> None:
        self.cfg.data_dir.mkdir(parents=True, exist_ok=True)
        tmp = self._identity_path.with_suffix(".tmp")
        tmp.write_text(ident.model_dump_json())
        os.chmod(tmp, 0o600)
        tmp.replace(self._identity_path)

    # -- lifecycle ---------------------------------------------------------------------------------
    async def start(self) -> None:
        # Bind --listen before any engine starts: a managed engine picks free ports for its
        # own servers, and must not be handed the one this agent was told to listen on.
        self.server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
        port = self.server.add_insecure_port(self.cfg.listen)
        if port == 0:
            raise OSError(f"--listen {self.cfg.listen}: cannot bind")
        host = self.cfg.listen.rsplit(":", 1)[0]
        self.address = self.cfg.advertise or f"{host}:{port}"
        for engine in self._engine_list:
            # The sink is set before start so that no event is missed. Until start()
            # returns (and tells us the model's name and block size) events are held.
            held: list = []
            name: list[str] = []

            def sink(seq, batch, held=held, name=name) -> None:
                if name:
                    self.publisher.on_kv_events(name[0], seq, batch)
                else:
                    held.append((seq, batch))

            engine.set_event_sink(sink)
            await engine.start()
            self.engines[engine.info.name] = engine
            self.trackers[engine.info.name] = BlockTracker(engine.info.name, engine.info.block_size)
            name.append(engine.info.name)
            for seq, batch in held:
                self.publisher.on_kv_events(engine.info.name, seq, batch)
        self.service = NodeAgentService(lambda: self.node_id, self.engines, self.publisher)
        npbg.add_NodeAgentServicer_to_server(self.service, self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        await self.server.start()
        await self.health.set("", health_pb2.HealthCheckResponse.SERVING)
        self._tasks.append(asyncio.create_task(self.publisher.run(), name="publisher"))
        await self._join_once(first=True)
        self._tasks.append(asyncio.create_task(self._membership_loop(), name="membership"))

    async def stop(self, grace: float = 2.0) -> None:
        for t in self._tasks:
            t.cancel()
        self.publisher.close()
        if self.service is not None:
            self.service.close()
        if self.server is not None:
            await self.server.stop(grace)
        for e in self.engines.values():
            await e.stop()

    # -- membership ----------------------------------------------------------------------------------
    def _channel(self) -> grpc.aio.Channel:
        return grpc.aio.insecure_channel(self.cfg.controller)

    async def _join_once(self, first: bool = False) -> None:
        """Joins (or rejoins). Raises JoinError when the controller refuses us."""
        ident = self._read_identity()
        req = cpb_ctl.JoinRequest(
            address=self.address, hostname=socket.gethostname(),
            models=[model_info_pb(e) for e in self.engines.values()],
        )
        if ident is not None:
            req.node_id, req.credential = ident.node_id, ident.credential
        elif self.cfg.token:
            req.token = self.cfg.token
        else:
            raise JoinError("no join token given (--token) and no stored identity in "
                            f"{self._identity_path}")
        backoff = 0.2
        while True:
            async with self._channel() as ch:
                try:
                    resp = await cpbg.ControllerStub(ch).Join(req, timeout=10.0)
                    break
                except grpc.aio.AioRpcError as exc:
                    if exc.code() == grpc.StatusCode.UNAUTHENTICATED and req.credential and self.cfg.token:
                        # The stored credential is unknown here (e.g. a rebuilt control
                        # plane): a join token was given, so join as a new node.
                        log.warning("stored identity %s refused (%s); joining with the token", req.node_id, exc.details())
                        req.node_id, req.credential, req.token = "", "", self.cfg.token
                        continue
                    if exc.code() in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.INVALID_ARGUMENT):
                        raise JoinError(f"controller {self.cfg.controller} refused to join: {exc.details()}") from exc
                    if first:
                        log.warning("controller %s not reachable (%s); retrying", self.cfg.controller, exc.code().name)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 5.0)
        self.node_id = resp.node_id
        if resp.credential:
            self._write_identity(Identity(node_id=resp.node_id, credential=resp.credential, controller=self.cfg.controller))
        self.heartbeat_interval_s = min(self.cfg.heartbeat_interval_s, resp.lease_ttl_s / 3)
        self.joined.set()
        log.info("joined as %s (serving %s at %s)", self.node_id, list(self.engines), self.address)

    async def _membership_loop(self) -> None:
        backoff = 0.2
        while True:
            try:
                await self._heartbeats()
            except asyncio.CancelledError:
                raise
            except JoinError:
                raise
            except Exception as exc:
                log.warning("heartbeat stream lost (%s); rejoining", exc)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 2.0)
            try:
                await self._join_once()
                backoff = 0.2
            except JoinError as exc:
                log.error("%s", exc)

    async def _heartbeats(self) -> None:
        ident = self._read_identity()
        assert ident is not None
        last_summary: list | None = None

        async def requests():
            nonlocal last_summary
            while True:
                summaries = [
                    cpb.CacheSummary(
                        model=m, cached_blocks=len(t),
                        heads=[cpb.ChainHead(block_hash=h, depth=d) for h, d in t.summary(32)],
                    )
                    for m, t in self.trackers.items()
                ]
                key = [(s.model, s.cached_blocks, tuple((h.block_hash, h.depth) for h in s.heads)) for s in summaries]
                send = summaries if key != last_summary else []
                last_summary = key
                yield cpb_ctl.HeartbeatRequest(
                    ready=all(e.ready for e in self.engines.values()), summaries=send,
                    load=load_pb(self.publisher.current()),
                )
                slept_at, cpu_at = time.monotonic(), time.process_time()
                await asyncio.sleep(self.heartbeat_interval_s)
                late = time.monotonic() - slept_at - self.heartbeat_interval_s
                if late > self.heartbeat_interval_s:
                    # CPU used meanwhile near the whole wait: the event loop was blocked
                    # by this process's own work; near zero: the process was starved.
                    log.warning("heartbeat %.1f s late; this process used %.1f s of CPU in the %.1f s",
                                late, time.process_time() - cpu_at, late + self.heartbeat_interval_s)

        md = (("x-kvfleet-node-id", ident.node_id), ("authorization", f"Bearer {ident.credential}"))
        async with self._channel() as ch:
            call = cpbg.ControllerStub(ch).Heartbeat(requests(), metadata=md)
            async for resp in call:
                self.admin_state = resp.state


async def serve(cfg: AgentConfig, engines: list[Engine], stop: asyncio.Event) -> None:
    """Runs an agent until ``stop`` is set. Raises JoinError / EngineError on fatal setup errors."""
    agent = NodeAgent(cfg, engines)
    lag_watch = None
    try:
        await agent.start()
        lag_watch = start_loop_lag_watch("node")   # once ready: an engine's start may hold the loop
        print(json.dumps({"event": "node_ready", "node_id": agent.node_id, "address": agent.address}), flush=True)
        stopper = asyncio.create_task(stop.wait())
        membership = agent._tasks[-1]
        done, _ = await asyncio.wait({stopper, membership}, return_when=asyncio.FIRST_COMPLETED)
        if membership in done and membership.exception():
            raise membership.exception()  # type: ignore[misc]
    finally:
        await stop_loop_lag_watch(lag_watch)
        await agent.stop()
