"""``make up``: run the mesh on this machine until Ctrl-C.

The autoscaler (whose local provider starts and stops model-server replicas on
demand) and the router in front, following the autoscaler's endpoint stream.
Children run in their own process groups; on exit the router stops first, then
the autoscaler drains and stops every replica (SIGTERM, then SIGKILL after the
grace period), so nothing is left running.
"""
from __future__ import annotations

import argparse
import os
import secrets
import signal
import subprocess
import sys
import time

from cmesh.config import load_config
from cmesh.proc import spawn_service


def _start(args: list[str]) -> tuple[subprocess.Popen, dict]:
    return spawn_service([*args, "--log-level", "WARNING"], new_session=True)


def _stop(procs: list[subprocess.Popen], grace: float) -> None:
    for proc in procs:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    for proc in procs:
        while proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


def _demo_keys(config) -> dict[str, str]:
    """API keys for the demo tenants (and an admin key) where the environment sets
    none, so the secured demo config works out of the box; real deployments set them."""
    envs = [t.api_keys_env for t in config.tenants.values()]
    if config.security.admin_keys_env:
        envs.append(config.security.admin_keys_env)
    keys = {}
    for env in envs:
        if not os.environ.get(env):
            os.environ[env] = f"{env.lower().replace('_', '-')}-demo"
        keys[env] = os.environ[env].split(",")[0]
    return keys


def _internal_token(config) -> tuple[str, str] | None:
    """(env var, token) of the mesh-internal token every service reads: a fresh random
    one for this run where the environment sets none (children inherit it)."""
    env = config.security.internal_token_env
    if not env:
        return None
    if not os.environ.get(env, "").strip():
        os.environ[env] = secrets.token_urlsafe(32)
    return env, os.environ[env]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m cmesh.up", description="Run the mesh locally until Ctrl-C.")
    p.add_argument("--config", default="compose/mesh.yaml")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000, help="router gRPC port (the front door)")
    p.add_argument("--http-port", type=int, default=8080, help="router's OpenAI-compatible HTTP port")
    p.add_argument("--autoscaler-port", type=int, default=8500, help="autoscaler gRPC port")
    args = p.parse_args(argv)
    config = load_config(args.config)
    procs: list[subprocess.Popen] = []

    def terminate(signum, frame):           # SIGTERM runs the same clean-up as Ctrl-C
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, terminate)
    try:
        internal = _internal_token(config)          # before any service starts: they all need it
        print("starting the autoscaler (model servers start on demand; min replicas now)", flush=True)
        scaler, sready = _start(["-m", "autoscaler", "--config", args.config, "--listen",
                                 f"{args.host}:{args.autoscaler_port}", "--metrics-port", "9102"])
        procs.append(scaler)
        autoscaler = f"{args.host}:{sready['port']}"
        redis = ["--redis", os.environ["REDIS_URL"]] if os.environ.get("REDIS_URL") else []
        keys = _demo_keys(config)
        router, rready = _start(["-m", "router", "--config", args.config, "--host", args.host,
                                 "--port", str(args.port), "--http-port", str(args.http_port),
                                 "--metrics-port", "9100", "--autoscaler", autoscaler, *redis])
        procs.append(router)
        front = f"{args.host}:{rready['port']}"
        print(f"\nrouter        grpc  {front}   (Open Inference Protocol; tritonclient works; metering: "
              f"{rready['metering']})")
        openai_base = f"http://{args.host}:{rready['http_port']}/v1"
        print(f"router        http  {openai_base}   (OpenAI API: chat, completions, embeddings, pipelines as models)")
        print(f"autoscaler    grpc  {autoscaler}   (provider {sready['provider']}; leader election "
              f"{sready['leader_election']})")
        print(f"metrics       http  http://{args.host}:9100/metrics (router), "
              f"http://{args.host}:9102/metrics (autoscaler)")
        for env, value in keys.items():
            print(f"demo key      {env}={value}")
        if internal:
            print(f"internal      {internal[0]}={internal[1]}   (replicas and the autoscaler accept only "
                  "callers with it; export it for cmesh status)")
        tenant_key = next((v for k, v in keys.items() if k != config.security.admin_keys_env), "")
        auth = f" --api-key {tenant_key}" if tenant_key else ""
        admin = keys.get(config.security.admin_keys_env or "", "")
        token = f"{internal[0]}={internal[1]} " if internal else ""
        print(f"\ntry:\n  {token}.venv/bin/cmesh status --autoscaler {autoscaler} --config {args.config}")
        print(f"  .venv/bin/cmesh infer embedder --text 'How do I reset my password?' --address {front}{auth}")
        print(f"  .venv/bin/cmesh infer dialogue-llm --text 'Customer: hello\\nAgent:' --stream --address {front}{auth}")
        bearer = f" -H 'Authorization: Bearer {tenant_key}'" if tenant_key else ""
        print(f"  curl -s {openai_base}/chat/completions{bearer} -H 'Content-Type: application/json' "
              "-d '{\"model\": \"support-agent\", \"messages\": [{\"role\": \"user\", "
              "\"content\": \"Where is my order 1042?\"}]}'")
        print(f"  .venv/bin/cmesh cost --by model --router {front}" + (f" --admin-key {admin}" if admin else ""))
        print("\nCtrl-C stops everything.", flush=True)
        while all(proc.poll() is None for proc in procs):
            time.sleep(0.5)
        print("a mesh process exited; stopping the rest", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    except RuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        # A second Ctrl-C or SIGTERM must not cut the clean-up short (that would
        # orphan the autoscaler and its replicas): ignore them from here on.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        _stop(list(reversed(procs)), config.server.drain_grace_s + config.server.drain_delay_s + 5)
        print("mesh stopped", flush=True)


if __name__ == "__main__":
    sys.exit(main())
