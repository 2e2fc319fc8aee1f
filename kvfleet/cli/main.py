"""The `kvfleet` command: one Typer sub-app per noun."""

from __future__ import annotations

import typer

from kvfleet.cli.admin import nodes_app, tokens_app
from kvfleet.cli.batch import batch_app
from kvfleet.cli.infer import generate, route_app
from kvfleet.cli.serve import controller_app, node_app, router_app
from kvfleet.cli.tenants import tenants_app
from kvfleet.cli.up import up
from kvfleet.cli.usage import usage
from kvfleet.controller.sim.cli import bench_app

app = typer.Typer(help="kvfleet: prefix-cache-aware GPU fleet orchestration for LLM inference.",
                  no_args_is_help=True, pretty_exceptions_enable=False)
app.command("up")(up)
app.command("generate")(generate)
app.command("usage")(usage)
app.add_typer(nodes_app, name="nodes")
app.add_typer(tokens_app, name="tokens")
app.add_typer(tenants_app, name="tenants")
app.add_typer(route_app, name="route")
app.add_typer(batch_app, name="batch")
app.add_typer(node_app, name="node")
app.add_typer(controller_app, name="controller")
app.add_typer(router_app, name="router")
app.add_typer(bench_app, name="bench")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
