"""The echo baseline: a bare grpc.aio server with only the standard health service.

bench/trigger.py runs it as a subprocess and drives grpc.health.v1.Health/Check with the same
clients as the trigger load, so trigger/echo says how much of what a trivial grpc.aio service
manages on this machine Conveyor's trigger path keeps. Like `conveyor serve`, it runs on the
default asyncio event loop and prints "gRPC on HOST:PORT" once it listens.
"""

from __future__ import annotations

import asyncio
import signal

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc


async def main() -> None:
    server = grpc.aio.server()
    servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    await servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    print(f"echo: gRPC on 127.0.0.1:{port}", flush=True)
    await stop.wait()
    await server.stop(1)


if __name__ == "__main__":
    asyncio.run(main())
