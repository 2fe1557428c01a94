"""``python -m autoscaler``: run the autoscaler (per-model scaling, scale to zero,
coordinated pre-warming, schedules, placement) and its gRPC service."""
from __future__ import annotations

import argparse
import sys


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m autoscaler",
                                description="Scale every model of the mesh on its own traffic: from zero, to "
                                            "zero, ahead of schedules, packed onto devices.")
    p.add_argument("--config", required=True, help="path to mesh.yaml")
    p.add_argument("--listen", default=None, help="host:port of the Autoscaler service (default: config)")
    p.add_argument("--metrics-port", type=int, default=None, help="Prometheus port; 0 picks a free one")
    p.add_argument("--redis", default=None, help="Redis URL for leader election (default: config, $REDIS_URL)")
    p.add_argument("--provider", choices=("local", "kubernetes"), default=None,
                   help="where replicas run (default: config)")
    p.add_argument("--advertise-host", default="127.0.0.1",
                   help="host that routers use to reach replicas the local provider starts")
    p.add_argument("--no-fork-server", action="store_true",
                   help="local provider: start every replica as a fresh process instead of forking it from "
                        "a pre-imported fork server (slower cold starts; for comparison)")
    p.add_argument("--state-dir", default=None,
                   help="local provider: where replicas' logs and state go (default: $CMESH_STATE_DIR, "
                        "then .cmesh/autoscaler)")
    p.add_argument("--log-level", default="INFO")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    import os

    args = parse_args(argv)
    args.state_dir = args.state_dir or os.environ.get("CMESH_STATE_DIR", ".cmesh/autoscaler")
    from autoscaler.app import run

    return run(args, os.environ)


if __name__ == "__main__":
    sys.exit(main())
