"""``python -m router``: run one router (the Prediction Service)."""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m router",
                                description="Route Open Inference Protocol calls to model-server replicas: "
                                            "priority queues, spill-over, breakers, retries, metering.")
    p.add_argument("--config", required=True, help="path to mesh.yaml")
    p.add_argument("--host", default="127.0.0.1", help="listen address (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="gRPC port; 0 picks a free one (default 8000)")
    p.add_argument("--http-port", type=int, default=None,
                   help="serve the OpenAI-compatible HTTP API (/v1/...) on this port; 0 picks a free one")
    p.add_argument("--metrics-port", type=int, default=None, help="Prometheus port; 0 picks a free one")
    p.add_argument("--autoscaler", default=None, help="host:port of the autoscaler (overrides the config)")
    p.add_argument("--redis", default=None, help="Redis URL for metering (default: config, then $REDIS_URL)")
    p.add_argument("--log-level", default="INFO")
    return p.parse_args(argv)


async def serve(args: argparse.Namespace) -> int:
    from cmesh.config import load_config, redis_url, with_overrides
    from router.server import RouterOptions, RouterServer

    from pathlib import Path

    file_text = Path(args.config).read_text() if Path(args.config).is_file() else ""
    config = load_config(args.config)
    overrides = {"router.autoscaler": args.autoscaler, "redis_url": redis_url(args.redis, config, os.environ)}
    config = with_overrides(config, overrides)
    from cmesh.internal_auth import token_from_env
    from router.backends.secrets import secrets_from_env

    server = RouterServer(config, RouterOptions(host=args.host, port=args.port, metrics_port=args.metrics_port,
                                                http_port=args.http_port,
                                                internal_token=token_from_env(config, os.environ),
                                                backend_secrets=secrets_from_env(config, os.environ),
                                                # What this process connects to stays as it started.
                                                overrides={"router.autoscaler": config.router.autoscaler,
                                                           "redis_url": config.redis_url},
                                                file_text=file_text, environ=dict(os.environ)))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    reloads: set[asyncio.Task] = set()

    def on_sighup() -> None:                      # reload the file (router.live)
        task = asyncio.ensure_future(server.reload_file(args.config))
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    loop.add_signal_handler(signal.SIGHUP, on_sighup)
    await server.start()
    from cmesh.proc import settle_heap

    settle_heap()
    print(json.dumps({"event": "ready", "port": server.port, "http_port": server.http_port,
                      "metrics_port": server.metrics_port,
                      "metering": "redis" if config.redis_url else "memory",
                      "endpoints": "autoscaler" if config.router.autoscaler else "static"}), flush=True)
    await stop.wait()
    await server.stop()
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from cmesh.proc import run_service

    return run_service(lambda: serve(args), args.log_level)


if __name__ == "__main__":
    sys.exit(main())
