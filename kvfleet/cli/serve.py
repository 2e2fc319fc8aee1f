"""Long-running processes: `controller run`, `router run`, `node join`."""

from __future__ import annotations

import logging
from pathlib import Path

import typer

from kvfleet.cli.common import ControllerOpt, fail, run_until_signal

controller_app = typer.Typer(help="Run the controller (node registry, leases, admin API) and, by default, a router.", no_args_is_help=True)
router_app = typer.Typer(help="Run a standalone router (the Inference endpoint).", no_args_is_help=True)
node_app = typer.Typer(help="Run a node agent on this machine.", no_args_is_help=True)

EtcdOpt = typer.Option("127.0.0.1:2379", "--etcd", envvar="KVFLEET_ETCD", help="etcd endpoints, comma-separated host:port (an http:// prefix is accepted)")
PrefixOpt = typer.Option("/kvfleet", "--prefix", envvar="KVFLEET_PREFIX", help="registry key prefix in etcd")
PolicyOpt = typer.Option("kvfleet", "--policy", envvar="KVFLEET_POLICY", help="routing policy")
FirstTokenTimeoutOpt = typer.Option(5.0, "--first-token-timeout", min=0.1, envvar="KVFLEET_FIRST_TOKEN_TIMEOUT",
                                    help="seconds beyond the estimated TTFT before retrying on another node")
MetricsOpt = typer.Option("", "--metrics-listen", envvar="KVFLEET_METRICS_LISTEN", help="host:port for Prometheus /metrics (empty: off)")
AuthOpt = typer.Option(True, "--auth/--no-auth", envvar="KVFLEET_AUTH",
                       help="require an API key on Inference and Batch API calls (`kvfleet tenants keys create`); --no-auth: the request names its tenant")


def _check_policy(policy: str) -> None:
    from kvfleet.controller.router.policy import POLICIES

    if policy not in POLICIES:
        raise typer.BadParameter(f"unknown policy {policy!r}; choose from {', '.join(POLICIES)}", param_hint="--policy")


def _endpoints(value: str) -> list[str]:
    eps = [e.strip().removeprefix("http://").removeprefix("https://") for e in value.split(",") if e.strip()]
    if not eps or any(":" not in e for e in eps):
        raise typer.BadParameter(f"expected host:port[,host:port...], got {value!r}", param_hint="--etcd")
    return eps


def _admission(value: str):
    """``--admission``: a JSON object of AdmissionConfig fields (or @FILE holding one)."""
    if not value:
        return None
    from pydantic import ValidationError

    from kvfleet.controller.router.admission import AdmissionConfig

    try:
        text = Path(value[1:]).read_text() if value.startswith("@") else value
        return AdmissionConfig.model_validate_json(text)
    except (OSError, ValidationError) as exc:
        raise typer.BadParameter(str(exc).replace("\n", "; "), param_hint="--admission") from exc


AdmissionOpt = typer.Option("", "--admission", envvar="KVFLEET_ADMISSION",
                            help='tier limits of the admission queue as JSON (or @FILE), e.g. \'{"flex_max_wait_s": 60}\'')


def _check_addr(value: str, flag: str) -> str:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise typer.BadParameter(f"expected host:port, got {value!r}", param_hint=flag)
    return value


def _prices(path: Path | None):
    from kvfleet.controller.prices import PriceTable, PricesError, load_prices

    if path is None:
        return PriceTable()
    try:
        return load_prices(path.expanduser())
    except PricesError as exc:
        raise typer.BadParameter(str(exc), param_hint="--prices") from exc


def _logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # An attached engine polls /health and /metrics several times a second.
    logging.getLogger("httpx").setLevel(logging.WARNING)


@controller_app.command("run")
def controller_run(
    etcd: str = EtcdOpt,
    prefix: str = PrefixOpt,
    listen: str = typer.Option("127.0.0.1:50050", "--listen", envvar="KVFLEET_CONTROLLER_LISTEN", help="address the Controller server binds"),
    advertise: str = typer.Option("", "--advertise", envvar="KVFLEET_CONTROLLER_ADVERTISE", help="address nodes dial (default: --listen)"),
    lease_ttl: int = typer.Option(5, "--lease-ttl", min=1, envvar="KVFLEET_LEASE_TTL", help="seconds without heartbeats before a node leaves routing"),
    router: bool = typer.Option(True, "--router/--no-router", help="also run a router in this process"),
    router_listen: str = typer.Option("127.0.0.1:50051", "--router-listen", envvar="KVFLEET_ROUTER_LISTEN", help="address the in-process router binds"),
    policy: str = PolicyOpt,
    first_token_timeout: float = FirstTokenTimeoutOpt,
    admission: str = AdmissionOpt,
    auth: bool = AuthOpt,
    metrics_listen: str = MetricsOpt,
    data_dir: Path = typer.Option(Path("~/.local/share/kvfleet/controller"), "--data-dir", envvar="KVFLEET_CONTROLLER_DATA",
                                  help="controller state outside etcd: usage ledger, batch inputs and results"),
    prices: Path | None = typer.Option(None, "--prices", envvar="KVFLEET_PRICES", help="price table per model and tier, TOML or JSON (docs/accounting.md); default: built-in prices"),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    """Serve the Controller API against any etcd."""
    from kvfleet.controller.process import ControllerConfig, RouterConfig, run_controller

    _logging(verbose)
    if router:
        _check_policy(policy)
    eps = _endpoints(etcd)
    cfg = ControllerConfig(
        etcd=eps, prefix=prefix, listen=_check_addr(listen, "--listen"), advertise=advertise,
        lease_ttl_s=lease_ttl, metrics_listen=metrics_listen, data_dir=data_dir.expanduser(),
        prices=_prices(prices), auth=auth,
        router=RouterConfig(etcd=eps, prefix=prefix, listen=_check_addr(router_listen, "--router-listen"),
                            policy=policy, first_token_timeout_s=first_token_timeout,
                            admission=_admission(admission), auth=auth) if router else None,
    )
    try:
        run_until_signal(lambda stop: run_controller(cfg, stop))
    except (OSError, ConnectionError) as exc:
        fail(str(exc))


@router_app.command("run")
def router_run(
    etcd: str = EtcdOpt,
    prefix: str = PrefixOpt,
    listen: str = typer.Option("127.0.0.1:50051", "--listen", envvar="KVFLEET_ROUTER_LISTEN", help="address the Inference server binds"),
    advertise: str = typer.Option("", "--advertise", envvar="KVFLEET_ROUTER_ADVERTISE", help="address clients and the batch runner dial (default: --listen)"),
    policy: str = PolicyOpt,
    first_token_timeout: float = FirstTokenTimeoutOpt,
    admission: str = AdmissionOpt,
    auth: bool = AuthOpt,
    metrics_listen: str = MetricsOpt,
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    """Serve the Inference API, watching the registry in etcd."""
    from kvfleet.controller.process import RouterConfig, run_router

    _logging(verbose)
    _check_policy(policy)
    cfg = RouterConfig(etcd=_endpoints(etcd), prefix=prefix, listen=_check_addr(listen, "--listen"),
                       advertise=_check_addr(advertise, "--advertise") if advertise else "", policy=policy,
                       first_token_timeout_s=first_token_timeout, metrics_listen=metrics_listen,
                       admission=_admission(admission), auth=auth)
    try:
        run_until_signal(lambda stop: run_router(cfg, stop))
    except (OSError, ConnectionError) as exc:
        fail(str(exc))


@node_app.command("join")
def node_join(
    controller: str = ControllerOpt,
    token: str = typer.Option("", "--token", envvar="KVFLEET_JOIN_TOKEN", help="join token (first join; later starts use the stored credential)"),
    engine: str = typer.Option("sim", "--engine", help="engine kind: sim, vllm (managed: the agent runs vLLM) or openai (attach to a running server)"),
    model: str = typer.Option("", "--model", help="sim/openai: model name to serve (sim default kvfleet-sim); vllm: model directory or name"),
    served_name: str = typer.Option("", "--served-model-name", help="vllm: name clients use (default: the --model directory's name)"),
    engine_arg: list[str] = typer.Option([], "--engine-arg", help="vllm: extra vLLM server argument, repeatable (e.g. --engine-arg=--max-model-len=2048)"),
    url: str = typer.Option("", "--url", help="openai: base URL of the running server, e.g. http://127.0.0.1:8000"),
    kv_events_endpoint: str = typer.Option("", "--kv-events-endpoint", help="openai: the server's ZMQ KV events endpoint (exact cache tracking); omit for approximate"),
    replay_endpoint: str = typer.Option("", "--replay-endpoint", help="openai: the server's KV events replay endpoint, used to fill sequence gaps"),
    kv_replay: bool = typer.Option(False, "--kv-replay", help="vllm: open vLLM's KV events replay endpoint and fill sequence gaps from it"),
    tokenizer: str = typer.Option("", "--tokenizer", help="openai: Hugging Face model dir with tokenizer.json (default: the server's model path)"),
    listen: str = typer.Option("127.0.0.1:0", "--listen", envvar="KVFLEET_NODE_LISTEN", help="address the NodeAgent server binds (port 0: any)"),
    advertise: str = typer.Option("", "--advertise", envvar="KVFLEET_NODE_ADVERTISE", help="address routers dial (default: the bound --listen address)"),
    data_dir: Path = typer.Option(Path.home() / ".local/share/kvfleet/node", "--data-dir", envvar="KVFLEET_NODE_DATA_DIR", help="where the node keeps its identity and engine logs"),
    sim_blocks: int = typer.Option(4096, "--sim-blocks", min=1, help="sim: KV capacity in blocks"),
    sim_block_size: int = typer.Option(16, "--sim-block-size", min=1, max=4096, help="sim: tokens per block"),
    sim_prefill_tps: float = typer.Option(8000.0, "--sim-prefill-tps", min=1.0, help="sim: prefill tokens per second"),
    sim_decode_step_ms: float = typer.Option(10.0, "--sim-decode-step-ms", min=0.01, help="sim: base decode step time in ms"),
    sim_max_model_len: int = typer.Option(8192, "--sim-max-model-len", min=2, help="sim: context length in tokens"),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    """Start a node agent and join it to the fleet."""
    from kvfleet.node_agent.agent import AgentConfig, JoinError, serve
    from kvfleet.node_agent.engine import EngineError

    _logging(verbose)
    _check_addr(controller, "--controller")
    _check_addr(listen, "--listen")
    if engine == "sim":
        built = _sim_engine(model or "kvfleet-sim", sim_block_size, sim_blocks, sim_max_model_len, sim_prefill_tps, sim_decode_step_ms)
    elif engine == "vllm":
        built = _vllm_engine(model, served_name, engine_arg, kv_replay, data_dir)
    elif engine == "openai":
        built = _openai_engine(url, model, kv_events_endpoint, replay_endpoint, tokenizer)
    else:
        raise typer.BadParameter(f"unknown engine {engine!r}; available: sim, vllm, openai", param_hint="--engine")
    cfg = AgentConfig(controller=controller, token=token, listen=listen, advertise=advertise, data_dir=data_dir)
    try:
        run_until_signal(lambda stop: serve(cfg, [built], stop))
    except (JoinError, EngineError, OSError) as exc:
        fail(str(exc))


def _sim_engine(model: str, block_size: int, blocks: int, max_len: int, prefill_tps: float, decode_ms: float):
    import pydantic

    from kvfleet.node_agent.engines.sim import SimEngine
    from kvfleet.node_agent.engines.sim_core import SimConfig

    flags = {"block_size": "--sim-block-size", "num_blocks": "--sim-blocks", "max_model_len": "--sim-max-model-len",
             "prefill_tokens_per_s": "--sim-prefill-tps", "decode_step_base_s": "--sim-decode-step-ms", "model": "--model"}
    try:
        return SimEngine(SimConfig(
            model=model, block_size=block_size, num_blocks=blocks, max_model_len=max_len,
            prefill_tokens_per_s=prefill_tps, decode_step_base_s=decode_ms / 1000.0,
        ))
    except pydantic.ValidationError as exc:
        first = exc.errors()[0]
        names = [flags.get(str(f), str(f)) for f in first.get("loc", ())] or ["--sim-blocks", "--sim-max-model-len"]
        fail(f"{'/'.join(names)}: {first['msg']}")


def _vllm_engine(model: str, served_name: str, engine_args: list[str], replay: bool, data_dir: Path):
    if not model:
        raise typer.BadParameter("a model directory (or name) is required with --engine vllm", param_hint="--model")
    try:
        from kvfleet.node_agent.engines.vllm_managed import ManagedVLLM, ManagedVLLMConfig
    except ImportError as exc:
        fail(f"--engine vllm: {exc}")
    import pydantic

    try:
        return ManagedVLLM(ManagedVLLMConfig(
            model=model, served_model_name=served_name or None, engine_args=engine_args,
            log_dir=data_dir, replay=replay,
        ))
    except pydantic.ValidationError as exc:
        fail(f"--engine vllm: {exc.errors()[0]['msg']}")


def _openai_engine(url: str, model: str, kv_events_endpoint: str, replay_endpoint: str, tokenizer: str):
    if not url:
        raise typer.BadParameter("the server's base URL is required with --engine openai", param_hint="--url")
    from kvfleet.node_agent.engines.openai import OpenAIEngine, OpenAIEngineConfig
    import pydantic

    try:
        return OpenAIEngine(OpenAIEngineConfig(
            url=url, model=model or None, kv_events_endpoint=kv_events_endpoint or None,
            replay_endpoint=replay_endpoint or None, tokenizer=tokenizer or None,
        ))
    except pydantic.ValidationError as exc:
        fail(f"--engine openai: {exc.errors()[0]['msg']}")
