"""Shared CLI plumbing: cluster addresses, gRPC error reporting, JSON output."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from typing import Any, Awaitable, Callable, TypeVar

import grpc
import typer
from google.protobuf.json_format import MessageToDict
from rich.console import Console

DEFAULT_CONTROLLER = "127.0.0.1:50050"
DEFAULT_ROUTER = "127.0.0.1:50051"

console = Console()
err_console = Console(stderr=True, soft_wrap=True)

T = TypeVar("T")

ControllerOpt = typer.Option(DEFAULT_CONTROLLER, "--controller", envvar="KVFLEET_CONTROLLER", help="controller address host:port")
RouterOpt = typer.Option(DEFAULT_ROUTER, "--router", envvar="KVFLEET_ROUTER", help="router address host:port")
JsonOpt = typer.Option(False, "--json", help="print machine-readable JSON")


def fail(message: str, code: int = 1) -> None:
    err_console.print(f"[red]error:[/red] {message}", highlight=False)
    raise typer.Exit(code)


def run_rpc(fn: Callable[[], Awaitable[T]], target: str) -> T:
    """Runs an async client call; a gRPC error becomes one line and exit code 1."""
    try:
        return asyncio.run(fn())
    except grpc.aio.AioRpcError as exc:
        if exc.code() == grpc.StatusCode.UNAVAILABLE and "connect" in (exc.details() or "").lower():
            fail(f"cannot reach {target}: is the cluster up? ({exc.details()})")
        fail(f"{exc.code().name}: {exc.details()}")
    raise AssertionError("unreachable")


def to_dict(msg) -> dict[str, Any]:
    return MessageToDict(msg, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)


def print_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def run_until_signal(main: Callable[[asyncio.Event], Awaitable[None]]) -> None:
    """Runs a server coroutine until SIGINT/SIGTERM, then lets it shut down cleanly."""

    async def runner() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await main(stop)

    asyncio.run(runner())
