"""``cmesh cost``: the cost report from the metering store or a router."""
from __future__ import annotations

import argparse
import json
import sys

from cmesh.cli.defaults import DEFAULT_CONFIG, DEFAULT_ROUTER
from cmesh.cli.mesh_calls import admin_metadata, replica_seconds


def _cmd_cost(args: argparse.Namespace) -> int:
    """The cost report: straight from the metering store in Redis, or from a router."""
    import asyncio
    import os

    from cmesh.cost import build_report, format_table, format_warning, report_from_proto, to_json

    redis_url, router = args.redis, args.router
    if redis_url is None and router is None:
        redis_url = os.environ.get("REDIS_URL") or None     # the CLI's entry point: no config to consult
        router = None if redis_url else DEFAULT_ROUTER

    def from_redis(url: str):
        from cmesh.config import load_config
        from cmesh.errors import MeshError
        from router.metering import RedisMeter

        from cmesh.validation import ConfigError

        try:                                   # prices; the router uses its own with --router
            config = load_config(args.config)
        except ConfigError as exc:
            print(f"error: {exc}\n(--redis prices the rows with --config PATH)", file=sys.stderr)
            return None

        async def read() -> list:
            meter = RedisMeter(url, timeout_s=args.timeout)
            try:
                return await meter.rows()
            finally:
                await meter.close()

        try:
            return build_report(asyncio.run(read()), config, args.by)
        except MeshError as exc:
            print(f"error: {exc.message}", file=sys.stderr)
            return None

    def from_router(address: str):
        import grpc

        from cmesh.errors import component_error_of
        from protos import mesh_pb2, mesh_pb2_grpc

        metadata = admin_metadata(args.admin_key)
        with grpc.insecure_channel(address) as channel:
            try:
                response = mesh_pb2_grpc.AdminStub(channel).CostReport(
                    mesh_pb2.CostReportRequest(group_by=args.by), timeout=args.timeout,
                    metadata=metadata)
            except grpc.RpcError as exc:
                err = component_error_of(exc)
                hint = ""
                if err.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                    hint = (f"; is a router listening on {address}? start one, or pass "
                            "--router HOST:PORT, or --redis URL to read the metering store directly")
                elif err.code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
                    hint = "; pass an admin key with --admin-key KEY or CMESH_ADMIN_KEY"
                print(f"error: router {address}: {err.code.name}: {err.message}{hint}", file=sys.stderr)
                return None
        return report_from_proto(response)

    report = from_redis(redis_url) if redis_url else from_router(router)
    if report is None:
        return 1
    idle = None
    if args.autoscaler:
        # Idle capacity: replica time the autoscaler ran, minus compute requests used.
        replica_s = replica_seconds(args.autoscaler, args.timeout, args.config)
        if replica_s is None:
            return 1
        if args.by != "model":
            args.by = "model"
            by_model = from_redis(redis_url) if redis_url else from_router(router)
            if by_model is None:
                return 1
        else:
            by_model = report
        from cmesh.config import load_config
        from cmesh.cost import idle_capacity

        idle = idle_capacity(replica_s, {line.key: line.compute_s for line in by_model.rows},
                             load_config(args.config))
    warning = format_warning(report)          # events spooled or dropped by the router
    if args.json:
        out = to_json(report)
        if idle is not None:
            out["idle_capacity"] = [vars(line) for line in idle]
        if warning:
            print(warning, file=sys.stderr)   # stdout stays JSON; "incomplete" says the same
        print(json.dumps(out, indent=2))
    else:
        if warning:
            print(warning)
        print(format_table(report))
        if idle is not None:
            from cmesh.cost import format_idle

            print("\n" + format_idle(idle))
    return 0


def add_parsers(sub) -> None:
    cost = sub.add_parser("cost", help="the cost report by pipeline, tenant, model or variant",
                          description="Print metered requests, errors, tokens, compute seconds and "
                                      "cost. Reads the metering store with --redis (priced by "
                                      "--config), or asks a router's Admin service with --router. "
                                      "With neither: REDIS_URL if set, else the router at "
                                      f"{DEFAULT_ROUTER}.")
    cost.add_argument("--by", default="pipeline", choices=["pipeline", "tenant", "model", "variant"],
                      help="group rows by this (default pipeline; variant groups by model:variant)")
    cost.add_argument("--json", action="store_true", help="machine-readable output")
    cost.add_argument("--autoscaler", default=None, metavar="HOST:PORT",
                      help="also show idle capacity: replica time the autoscaler ran that no request used")
    cost.add_argument("--config", default=DEFAULT_CONFIG,
                      help=f"mesh.yaml with the prices, used with --redis, and naming the env var of the "
                           f"mesh-internal token for --autoscaler (default {DEFAULT_CONFIG})")
    source = cost.add_mutually_exclusive_group()
    source.add_argument("--redis", metavar="URL", default=None, help="read the metering store in Redis")
    source.add_argument("--router", metavar="HOST:PORT", default=None,
                        help=f"ask this router's Admin service (default {DEFAULT_ROUTER})")
    cost.add_argument("--admin-key", default=None,
                      help="admin API key for --router (default: $CMESH_ADMIN_KEY)")
    cost.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for Redis or the router")
    cost.set_defaults(func=_cmd_cost)

