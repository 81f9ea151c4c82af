"""`conveyor serve` runs the server and its Envoy until Ctrl-C or SIGTERM; `conveyor worker`
runs a worker of the Python SDK.

These two are the only commands that are not API clients: `serve` imports the server's stack
(the engine, storage), so it does so inside the command, and nothing else in `conveyor.cli`
imports this module.
"""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path
from typing import TYPE_CHECKING

import click

if TYPE_CHECKING:
    from conveyor.settings import Settings


def _configure_logging(log_format: str) -> None:
    from conveyor import logs

    try:
        logs.configure(log_format)
    except ValueError as e:
        raise click.UsageError(str(e)) from e


async def run_server(settings: Settings) -> None:
    """Start the app, print where it listens, and stop it on SIGINT or SIGTERM."""
    # Imported here: the server's stack (SQLAlchemy, the engine) costs ~1.4 s of start-up that
    # the client commands and `conveyor worker` should not pay.
    from conveyor.app import App

    app = App(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    # Envoy runs in its own process group, so a terminal's Ctrl-C does not reach it: the
    # server catches the signal and stops Envoy itself.
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await app.start()
        if app.ops is not None:  # first: launchers read up to the gRPC line (tests/system/conftest.py)
            print(f"conveyor: metrics on {app.ops.url}/metrics (and /ready, /healthz)", flush=True)
        print(f"conveyor: gRPC on {app.grpc_address}", flush=True)
        if app.gateway is not None:
            print(f"conveyor: REST on {app.gateway.url}", flush=True)
            if app.gateway.serves_ui:
                # On the first start on a terminal, the link signs the browser in (the fragment
                # never leaves the browser; the dashboard moves the token to session storage
                # and drops it). Elsewhere there is no token to put in it (app.py).
                sign_in = f"#token={app.new_admin_token}" if app.new_admin_token else ""
                print(f"conveyor: dashboard on {app.gateway.url}/ui/{sign_in}", flush=True)
        print(f"conveyor: database {app.database}", flush=True)
        await stop.wait()
        print("conveyor: shutting down", flush=True)
    finally:
        await app.stop()


@click.command(help="Serve gRPC and, through Envoy, REST.")
@click.option("--grpc-port", type=int, help="gRPC port (default 50051; 0 picks a free one)")
@click.option("--http-port", type=int, help="REST port of Envoy (default 8080)")
@click.option("--db-url", help="sqlite:///path or postgresql://… (default .conveyor/conveyor.db)")
@click.option("--data-dir", help="directory for the SQLite file and Envoy's files")
@click.option("--no-envoy", is_flag=True, help="serve gRPC only")
@click.option("--metrics-port", type=int,
              help="port of /metrics, /ready and /healthz (default 9464; 0 picks a free one)")
def serve(grpc_port: int | None, http_port: int | None, db_url: str | None, data_dir: str | None,
          no_envoy: bool, metrics_port: int | None) -> None:
    from conveyor.settings import Settings

    try:
        settings = Settings.from_env(grpc_port=grpc_port, http_port=http_port, db_url=db_url,
                                     data_dir=Path(data_dir) if data_dir else None,
                                     envoy_enabled=False if no_envoy else None, metrics_port=metrics_port)
    except ValueError as e:  # a CONVEYOR_* variable that cannot be: say which, no traceback
        raise click.UsageError(str(e)) from e
    _configure_logging(settings.log_format)
    asyncio.run(run_server(settings))


@click.command(help="Run a worker: MODULE:ATTR names a conveyor.sdk.Worker, e.g. "
                    "examples.hello_worker:worker (the current directory is importable).")
@click.argument("spec", metavar="MODULE:ATTR")
@click.option("--target", help="gRPC address of the server (default: the Worker's own)")
@click.option("--slots", type=int, help="tasks held at once (default: the Worker's)")
@click.pass_context
def worker(ctx: click.Context, spec: str, target: str | None, slots: int | None) -> None:
    # The SDK, not the server: a worker process never touches the engine or the database.
    from conveyor.sdk.command import run_worker

    # The worker reads no Settings (it is a client): the variable itself.
    _configure_logging(os.environ.get("CONVEYOR_LOG_FORMAT", "text").strip().lower())
    ctx.exit(run_worker(spec, target=target, slots=slots))
