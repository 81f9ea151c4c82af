"""The `conveyor` command: `serve` runs the server and its Envoy until Ctrl-C or SIGTERM."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from conveyor.settings import Settings


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="conveyor", description="Conveyor workflow-run engine")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="serve gRPC and, through Envoy, REST")
    serve.add_argument("--grpc-port", type=int, help="gRPC port (default 50051; 0 picks a free one)")
    serve.add_argument("--http-port", type=int, help="REST port of Envoy (default 8080)")
    serve.add_argument("--db-url", help="sqlite:///path or postgresql://… (default .conveyor/conveyor.db)")
    serve.add_argument("--data-dir", help="directory for the SQLite file and Envoy's files")
    serve.add_argument("--no-envoy", action="store_true", help="serve gRPC only")
    worker = sub.add_parser("worker", help="run a worker: MODULE:ATTR names a conveyor.sdk.Worker")
    worker.add_argument("spec", metavar="MODULE:ATTR",
                        help="e.g. examples.hello_worker:worker (the current directory is importable)")
    worker.add_argument("--target", help="gRPC address of the server (default: the Worker's own)")
    worker.add_argument("--slots", type=int, help="tasks held at once (default: the Worker's)")
    return parser


async def serve(settings: Settings) -> None:
    # Imported here: the server's stack (SQLAlchemy, the engine) costs ~1.4 s of start-up that
    # `conveyor worker`, a pure gRPC client, should not pay.
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
        print(f"conveyor: gRPC on {app.grpc_address}", flush=True)
        if app.gateway is not None:
            print(f"conveyor: REST on {app.gateway.url}", flush=True)
        print(f"conveyor: database {settings.db_url}", flush=True)
        await stop.wait()
        print("conveyor: shutting down", flush=True)
    finally:
        await app.stop()


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # httpx logs every request at INFO; the gateway's readiness polls are not news.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    if args.command == "serve":
        settings = Settings.from_env(grpc_port=args.grpc_port, http_port=args.http_port, db_url=args.db_url,
                                     data_dir=Path(args.data_dir) if args.data_dir else None,
                                     envoy_enabled=False if args.no_envoy else None)
        asyncio.run(serve(settings))
    elif args.command == "worker":
        # The SDK, not the server: a worker process never touches the engine or the database.
        from conveyor.sdk.command import run_worker

        return run_worker(args.spec, target=args.target, slots=args.slots)
    return 0


if __name__ == "__main__":
    sys.exit(main())
