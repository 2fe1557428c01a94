"""``cmesh status``: pools, replicas, queues and devices as the autoscaler sees them."""
from __future__ import annotations

import argparse
import json
import sys

from cmesh.cli.defaults import DEFAULT_CONFIG
from cmesh.cli.mesh_calls import internal_token, token_hint


def _cmd_status(args: argparse.Namespace) -> int:
    """Each model's pools and replicas as the autoscaler sees them, and device use."""
    import grpc
    from google.protobuf.json_format import MessageToDict

    from protos import mesh_pb2, mesh_pb2_grpc

    try:
        with grpc.insecure_channel(args.autoscaler) as channel:
            status = mesh_pb2_grpc.AutoscalerStub(channel).Status(
                mesh_pb2.StatusRequest(), timeout=args.timeout, metadata=internal_token(args.config))
    except grpc.RpcError as exc:
        hint = token_hint(exc.code(), args.config) or \
            "; is one running? (make up starts one; pass --autoscaler HOST:PORT)"
        print(f"error: autoscaler {args.autoscaler}: {exc.code().name}: {exc.details()}{hint}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(MessageToDict(status, preserving_proto_field_name=True), indent=2))
        return 0
    print(f"autoscaler {args.autoscaler}  {'leader' if status.leader else 'standby'}  "
          f"endpoint table v{status.endpoint_version}  config {status.config_id or '-'}")
    print(f"{'model':<18} {'mode':<10} {'want d/s':>8} {'replicas':<34} {'queue':>5} {'held':>4} "
          f"{'cold start':>10}  decision")
    for m in status.models:
        states: dict[str, int] = {}
        for r in m.replicas:
            state = f"{r.state} (outgoing)" if r.outgoing else r.state
            states[state] = states.get(state, 0) + 1
        summary = ", ".join(f"{n} {state}" for state, n in sorted(states.items())) or "0 (scaled to zero)"
        cold = f"{m.last_cold_start_s:.2f}s" if m.last_cold_start_s else "-"
        print(f"{m.model:<18} {m.mode:<10} {m.desired_dedicated:>3}/{m.desired_serverless:<4} {summary:<34} "
              f"{m.queue_depth:>5} {m.held:>4} {cold:>10}  {'PANIC ' if m.panic else ''}{m.last_decision}")
        if args.replicas:
            for r in m.replicas:
                print(f"    {r.id:<36} {r.pool:<10} {r.state:<9} {r.address:<22} {r.device:<6} "
                      f"cold start {r.cold_start_s:.2f}s, up {r.age_s:.0f}s, generation {r.generation or '-'}"
                      f"{' (outgoing)' if r.outgoing else ''}, config {r.config_id or '-'}")
    print("devices:")
    for d in status.devices:
        pct = 100.0 * d.used_mb / d.memory_mb if d.memory_mb else 0.0
        print(f"  {d.name:<8} {d.kind:<5} {d.used_mb:>6}/{d.memory_mb} MB ({pct:.0f}%), {d.replicas} replica(s)")
    return 0


def add_parsers(sub) -> None:
    status = sub.add_parser("status", help="pools, replicas, queues, cold starts, device use",
                            description="Show each model's pools and replicas (cold, warming, ready, draining), "
                                        "queue depth, measured cold starts and device utilisation, as the "
                                        "autoscaler sees them.")
    status.add_argument("--autoscaler", default="127.0.0.1:8500", help="host:port of the autoscaler")
    status.add_argument("--replicas", action="store_true", help="list every replica")
    status.add_argument("--json", action="store_true")
    status.add_argument("--timeout", type=float, default=5.0)
    status.add_argument("--config", default=DEFAULT_CONFIG,
                        help="mesh.yaml whose security.internal_token_env names the env var holding the "
                             f"mesh-internal token the autoscaler wants (default {DEFAULT_CONFIG})")
    status.set_defaults(func=_cmd_status)


