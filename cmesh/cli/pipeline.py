"""``cmesh pipeline run`` and ``cmesh pipeline describe``."""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys

import grpc

from cmesh.cli.defaults import DEFAULT_ROUTER
from protos import mesh_pb2, mesh_pb2_grpc


def _metadata(args: argparse.Namespace) -> list[tuple[str, str]]:
    key = args.api_key or os.environ.get("CMESH_API_KEY")
    return [("authorization", f"Bearer {key}")] if key else []


def node_table(trace: mesh_pb2.Trace) -> str:
    """One line per node: timing split, status, cost; '*' marks the critical path."""
    header = (f"  {'node':<10} {'model':<18} {'status':<9} {'start':>7} {'end':>7} {'queue':>7} {'cold':>7} "
              f"{'compute':>8} {'network':>8} {'cost':>10}")
    lines = [header]
    for n in sorted(trace.nodes, key=lambda n: (n.start_ms, n.node)):
        mark = "*" if n.critical else " "
        model = n.model_used if n.model_used and n.model_used != n.model else n.model
        if n.status == "skipped":
            lines.append(f"{mark} {n.node:<10} {model:<18} {'skipped':<9}")
            continue
        lines.append(f"{mark} {n.node:<10} {model:<18} {n.status:<9} {n.start_ms:7.1f} {n.end_ms:7.1f} "
                     f"{n.queue_ms:7.1f} {n.cold_start_ms:7.1f} {n.compute_ms:8.1f} {n.network_ms:8.1f} "
                     f"{n.cost:10.6f}" + (f"  ({n.error})" if n.error else ""))
    lines.append(f"  critical path: {' -> '.join(trace.critical_path)}   total {trace.total_ms:.1f} ms "
                 f"(times in ms; * on the critical path)")
    return "\n".join(lines)


async def _run(args: argparse.Namespace) -> int:
    request = mesh_pb2.RunRequest(pipeline=args.name, inputs={"text": args.text}, session=args.session or "")
    async with grpc.aio.insecure_channel(args.router) as channel:
        stub = mesh_pb2_grpc.PipelinesStub(channel)
        try:
            if args.stream:
                final = None
                async for event in stub.RunStream(request, metadata=_metadata(args), timeout=args.timeout):
                    kind = event.WhichOneof("event")
                    if kind == "token":
                        print(event.token, end="", flush=True)
                    elif kind == "node_started" and args.verbose:
                        print(f"[{event.node_started.at_ms:7.1f} ms] {event.node_started.node} started",
                              file=sys.stderr)
                    elif kind == "final":
                        final = event.final
                print()
                response = final
            else:
                response = await stub.Run(request, metadata=_metadata(args), timeout=args.timeout)
        except grpc.aio.AioRpcError as exc:
            from cmesh.errors import component_error_of

            err = component_error_of(exc)
            where = f" (pipeline {err.detail.pipeline}, node {err.detail.node})" if err.detail and err.detail.node \
                else ""
            print(f"error: {err.code.name}: {err.message}{where}", file=sys.stderr)
            return 1
    if response is None:
        print("error: the stream ended without a final answer", file=sys.stderr)
        return 1
    if args.json:
        from google.protobuf.json_format import MessageToDict

        print(json.dumps(MessageToDict(response, preserving_proto_field_name=True), indent=2))
        return 0
    if not args.stream:
        print(response.answer)
    print(f"\n{node_table(response.trace)}")
    print(f"cost: {response.cost:.6f}" + ("   (degraded: an optional node failed)" if response.degraded else ""))
    return 0


async def _describe(args: argparse.Namespace) -> int:
    async with grpc.aio.insecure_channel(args.router) as channel:
        try:
            graph = await mesh_pb2_grpc.PipelinesStub(channel).Describe(
                mesh_pb2.DescribeRequest(pipeline=args.name), metadata=_metadata(args), timeout=args.timeout)
        except grpc.aio.AioRpcError as exc:
            print(f"error: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
    print(f"pipeline {graph.pipeline} ({graph.latency_class}); answer from node '{graph.output}'")
    print(graph.drawing)
    return 0


def add_parser(sub) -> None:
    pipeline = sub.add_parser("pipeline", help="run or describe a compound pipeline",
                              description="Run a pipeline of the mesh through the router, or draw its graph.")
    psub = pipeline.add_subparsers(dest="pipeline_command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--router", default=DEFAULT_ROUTER, help="host:port of the router")
    common.add_argument("--api-key", default=None, help="tenant API key (default: $CMESH_API_KEY)")
    common.add_argument("--timeout", type=float, default=120.0)
    run = psub.add_parser("run", parents=[common], help="run a pipeline on a text",
                          description="Run NAME on --text; print the answer, a per-node table (queue, cold start, "
                                      "compute, network, status; * marks the critical path) and the cost.")
    run.add_argument("name")
    run.add_argument("--text", required=True)
    run.add_argument("--stream", action="store_true", help="stream the answer's tokens as they are generated")
    run.add_argument("--json", action="store_true", help="the whole response as JSON")
    run.add_argument("--session", default=None, help="sticky A/B key")
    run.add_argument("--verbose", action="store_true", help="with --stream: print node start events")
    run.set_defaults(func=lambda a: asyncio.run(_run(a)))
    describe = psub.add_parser("describe", parents=[common], help="draw a pipeline's graph as text")
    describe.add_argument("name")
    describe.set_defaults(func=lambda a: asyncio.run(_describe(a)))
