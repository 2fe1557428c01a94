"""``python -m model_server``: run one model-server replica."""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m model_server",
        description="Serve models from the mesh config over the Open Inference Protocol (gRPC).")
    p.add_argument("--config", required=True, help="path to mesh.yaml")
    p.add_argument("--models", required=True,
                   help="comma-separated models to load, e.g. embedder,intent-classifier "
                        "(name:variant loads one variant)")
    p.add_argument("--host", default="127.0.0.1", help="listen address (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8001, help="gRPC port; 0 picks a free one (default 8001)")
    p.add_argument("--metrics-port", type=int, default=None,
                   help="Prometheus /metrics port; 0 picks a free one (default: off)")
    p.add_argument("--store", default=None, help="model store root (overrides the config's store)")
    p.add_argument("--grace", type=float, default=None,
                   help="seconds to finish in-flight work after SIGTERM (default: config)")
    p.add_argument("--drain-delay", type=float, default=None,
                   help="seconds to stay up as NOT_SERVING before closing, so routers notice "
                        "(default: config)")
    p.add_argument("--log-level", default="INFO")
    return p.parse_args(argv)


async def serve(args: argparse.Namespace) -> int:
    from cmesh.config import load_config
    from model_server.server import ModelServer, ServerOptions

    config = load_config(args.config)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    for spec in models:
        name = spec.partition(":")[0]
        if name not in config.models:
            print(f"error: --models: unknown model {name!r}; the config has "
                  f"{sorted(config.models)}", file=sys.stderr)
            return 2
    from cmesh.internal_auth import token_from_env

    server = ModelServer(config, ServerOptions(
        models=models, host=args.host, port=args.port, metrics_port=args.metrics_port,
        store=args.store, grace_s=args.grace, drain_delay_s=args.drain_delay,
        internal_token=token_from_env(config, os.environ)))
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda: asyncio.ensure_future(server.drain()))
    await server.start()
    # One machine-readable line tells a supervisor (the autoscaler's local provider)
    # where we listen and how long the cold start took.
    from cmesh.proc import settle_heap

    settle_heap()
    print(json.dumps({"event": "ready", "port": server.port, "metrics_port": server.metrics_port,
                      "cold_start_s": round(server.cold_start_s or 0.0, 4),
                      "models": {e.name: {v.name: round(v.load_seconds, 4) for v in e.variants.values()}
                                 for e in server.repository.entries()}}), flush=True)
    await server.wait_closed()
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from cmesh.errors import MeshError
    from cmesh.proc import run_service

    # A model that cannot load or a port in use is a start-up failure (exit 1).
    return run_service(lambda: serve(args), args.log_level, fatal=(MeshError, OSError, ValueError),
                       what="model server")


if __name__ == "__main__":
    sys.exit(main())
