"""``make up``: run the mesh on this machine until Ctrl-C.

Today the mesh is the model server hosting every demo model; the router and the
autoscaler join here as they land. Children run in their own process group and
are stopped (SIGTERM, then SIGKILL after the grace period) on exit.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time

from cmesh.config import load_config


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m cmesh.up", description="Run the mesh locally until Ctrl-C.")
    p.add_argument("--config", default="compose/mesh.yaml")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8001, help="model server gRPC port")
    p.add_argument("--metrics-port", type=int, default=9101)
    args = p.parse_args(argv)
    config = load_config(args.config)
    models = sorted(config.models)
    print(f"starting the model server with {', '.join(models)} (loading takes a few seconds)", flush=True)
    proc = subprocess.Popen(
        [sys.executable, "-m", "model_server", "--config", args.config, "--models", ",".join(models),
         "--host", args.host, "--port", str(args.port), "--metrics-port", str(args.metrics_port),
         "--log-level", "WARNING"], stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        for line in proc.stdout:
            if line.startswith("{") and json.loads(line).get("event") == "ready":
                ready = json.loads(line)
                break
        else:
            print("error: the model server exited during start-up (see the log above)", file=sys.stderr)
            return 1
        print(f"\nmodel server  grpc  {args.host}:{ready['port']}   (Open Inference Protocol; tritonclient works)")
        print(f"metrics       http  http://{args.host}:{ready['metrics_port']}/metrics")
        print(f"cold start    {ready['cold_start_s']:.1f}s; model load times: {json.dumps(ready['models'])}")
        print("\ntry:\n  .venv/bin/cmesh infer embedder --text 'How do I reset my password?' "
              f"--address {args.host}:{ready['port']}")
        print(f"  .venv/bin/cmesh infer dialogue-llm --text 'Hello' --stream --address {args.host}:{ready['port']}")
        print("\nCtrl-C stops everything.", flush=True)
        return proc.wait()
    except KeyboardInterrupt:
        return 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            deadline = time.monotonic() + config.server.drain_grace_s + config.server.drain_delay_s + 5
            while proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.1)
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
        print("mesh stopped", flush=True)


if __name__ == "__main__":
    sys.exit(main())
